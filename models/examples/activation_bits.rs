//! Would wider activations help this model? Simulates the int8 plan's activation rounding on
//! the float graph (each layer's output rounded to its calibrated int8 grid, percentile range
//! as `models compile`; or, for a layer at 16 bits, to a grid over its observed min-max range,
//! unclipped, 256 times as many steps) and reports, per choice of layers at 16 bits,
//! how often the result's top-1 agrees with the float graph's. Weights stay float, so the
//! figures isolate the activations. Calibration takes 200
//! training-split images; the evaluation other training-split images: never the validation
//! split.
//!
//!     cargo run --release -p models --example activation_bits -- MODEL EUROSAT_RGB \
//!         [--images N] [--wide NAME_PART]... [--input-minmax]
//!
//! Each `--wide` adds one run with the layers whose ONNX node name contains NAME_PART at 16
//! bits; the runs with none and all of them are always made. `--input-minmax` gives the input
//! its observed range instead of the percentile one.

use std::path::Path;

use anyhow::{bail, Context, Result};
use kestrel_eval::Split;
use models::calibrate::{ActivationQuant, Calibrator, Method};
use models::compile::{calibration_images, calibration_input};
use models::ZooModel;

/// Round `values` to the grid of `quant` refined by `2^(bits - 8)`, clamped to its range.
fn round_to_grid(values: &mut [f32], quant: ActivationQuant, bits: u32) {
    let levels = (1u32 << (bits - 8)) as f32;
    let step = quant.scale / levels;
    let zero = f32::from(quant.zero_point) * levels;
    let (lo, hi) = (-128.0 * levels, 128.0 * levels - 1.0);
    for v in values {
        *v = (((*v / step).round() + zero).clamp(lo, hi) - zero) * step;
    }
}

fn argmax(values: &[f32]) -> usize {
    (0..values.len()).fold(0, |best, i| if values[i] > values[best] { i } else { best })
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: activation_bits MODEL EUROSAT_RGB [--images N] [--wide NAME_PART]... \
                 [--input-minmax]";
    let (Some(model), Some(data)) = (args.next(), args.next()) else {
        bail!(usage);
    };
    let (mut images, mut parts, mut input_minmax) = (300usize, Vec::new(), false);
    while let Some(flag) = args.next() {
        if flag == "--input-minmax" {
            input_minmax = true;
            continue;
        }
        let value = args.next().context(usage)?;
        match flag.as_str() {
            "--images" => images = value.parse().context("--images takes a count")?,
            "--wide" => parts.push(value),
            _ => bail!(usage),
        }
    }
    let model = ZooModel::load(&model)?;
    let graph = model.graph()?;
    let spec = model.preprocess_spec()?;
    let train = calibration_images(Path::new(&data), &model.manifest.labels, Split::Train)?;
    let load = |path: &Path| calibration_input(&model, &spec, path).map_err(anyhow::Error::msg);
    // Calibration as `models compile --split train --max-images 200` chooses (every
    // `stride`-th image); the evaluation images lie halfway between them.
    let stride = train.len() / 200;
    if stride < 2 {
        bail!("{data}: 400 training-split images are needed, to evaluate on others than the 200 that calibrate");
    }
    let calibration: Vec<Vec<f32>> = train
        .iter()
        .step_by(stride)
        .take(200)
        .map(|image| load(&image.path))
        .collect::<Result<_>>()?;
    let evaluation: Vec<(Vec<f32>, usize)> = train
        .iter()
        .skip(stride / 2)
        .step_by(stride)
        .filter_map(|image| Some((&image.path, image.label?)))
        .take(images)
        .map(|(path, label)| Ok((load(path)?, label)))
        .collect::<Result<_>>()?;
    eprintln!("calibrating on {} images", calibration.len());
    let mut calibrator = Calibrator::new(graph.shapes.len());
    let runs: Vec<_> = calibration.iter().map(|i| graph.run_f32(i)).collect();
    runs.iter().for_each(|v| calibrator.observe_range(v));
    runs.iter().for_each(|v| calibrator.observe_histogram(v));
    let narrow = calibrator.finish(Method::Percentile(0.01));
    let wide_quant = calibrator.finish(Method::MinMax);
    let floats: Vec<usize> = evaluation
        .iter()
        .map(|(i, _)| argmax(&graph.run_f32(i)[graph.output]))
        .collect();

    let mut runs: Vec<(String, Vec<bool>)> = vec![
        ("none (all int8)".into(), vec![false; graph.nodes.len()]),
        ("all".into(), vec![true; graph.nodes.len()]),
    ];
    for part in &parts {
        let wide = graph
            .nodes
            .iter()
            .map(|n| n.name.contains(part.as_str()))
            .collect::<Vec<_>>();
        let count = wide.iter().filter(|&&w| w).count();
        runs.push((format!("'{part}' ({count} layers)"), wide));
    }
    println!(
        "{} evaluation images; float top-1 {:.2}%",
        evaluation.len(),
        100.0
            * floats
                .iter()
                .zip(&evaluation)
                .filter(|(f, (_, l))| *f == l)
                .count() as f64
            / evaluation.len() as f64
    );
    for (name, wide) in &runs {
        let (mut agree, mut right) = (0, 0);
        for ((input, label), float) in evaluation.iter().zip(&floats) {
            let mut x = input.clone();
            let input_quant = if input_minmax {
                wide_quant[0]
            } else {
                narrow[0]
            };
            round_to_grid(&mut x, input_quant, 8);
            let values = graph.run_f32_with(&x, |i, y| {
                let output = graph.nodes[i].output;
                match wide[i] {
                    true => round_to_grid(y, wide_quant[output], 16),
                    false => round_to_grid(y, narrow[output], 8),
                }
            });
            let top = argmax(&values[graph.output]);
            agree += usize::from(top == *float);
            right += usize::from(top == *label);
        }
        let n = evaluation.len() as f64;
        println!(
            "layers at 16 bits: {name:40} agrees with float {:.1}%, top-1 {:.2}%",
            100.0 * agree as f64 / n,
            100.0 * right as f64 / n
        );
    }
    Ok(())
}
