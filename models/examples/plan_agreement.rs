//! How close are compiled plans to the float model on images they were not calibrated on?
//! Runs tract and each plan on a labelled EuroSAT-style folder's images (one split, evenly
//! spread) and prints, per plan, how often its top-1 equals tract's, its own top-1 accuracy
//! and its output's relative RMS error against tract's: the figures `models compile` reports
//! on its calibration images, here on others. `train` leaves out the 200 chips `models compile
//! --split train` calibrates on. `--predictions FILE` also writes each image's file name, label
//! and top-1 of tract and of each plan (CSV), to pair with another runtime's predictions
//! (`sim/benches/suite/ort_accuracy.py --predictions`).
//!
//!     cargo run --release -p models --example plan_agreement -- MODEL FOLDER train|val IMAGES \
//!         PLAN... [--predictions FILE]

use std::path::Path;

use anyhow::{bail, Context, Result};
use kestrel_backend::Backend;
use kestrel_eval::Split;
use kestrel_plan::cpu::Int8Cpu;
use models::compile::{calibration_images, calibration_input};
use models::ZooModel;

fn argmax(values: &[f32]) -> usize {
    (0..values.len()).fold(0, |best, i| if values[i] > values[best] { i } else { best })
}

/// One plan's tallies against tract.
#[derive(Default)]
struct Tally {
    agree: usize,
    right: usize,
    error_squares: f64,
    float_squares: f64,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: plan_agreement MODEL FOLDER train|val IMAGES PLAN... [--predictions FILE]";
    let (args, predictions_path) = match args.iter().position(|a| a == "--predictions") {
        Some(at) => (&args[..at], Some(args.get(at + 1).context(usage)?)),
        None => (&args[..], None),
    };
    let [model, folder, split, images, plans @ ..] = args else {
        bail!(usage);
    };
    let split = match split.as_str() {
        "train" => Split::Train,
        "val" => Split::Validation,
        other => bail!("split {other}: train or val"),
    };
    let count: usize = images.parse().context("IMAGES")?;
    let model = ZooModel::load(model)?;
    let spec = model.preprocess_spec()?;
    let all = calibration_images(Path::new(folder), &model.manifest.labels, split)?;
    // `models compile --split train --max-images 200` calibrates on every `stride`th image.
    let stride = (all.len() / 200).max(1);
    let calibration =
        |i: usize| split == Split::Train && i.is_multiple_of(stride) && i / stride < 200;
    let others: Vec<_> = (0..all.len()).filter(|&i| !calibration(i)).collect();
    let step = (others.len() / count.max(1)).max(1);
    let chosen: Vec<_> = others
        .iter()
        .step_by(step)
        .take(count)
        .map(|&i| &all[i])
        .collect();
    let mut tract = model.tract_backend()?;
    let mut executors = plans
        .iter()
        .map(|path| {
            let bytes = std::fs::read(path).with_context(|| path.clone())?;
            Ok(Int8Cpu::from_bytes(&bytes)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut tallies: Vec<Tally> = plans.iter().map(|_| Tally::default()).collect();
    let (mut float, mut quantised) = (vec![0.0; tract.output_len()], vec![0.0; tract.output_len()]);
    let mut float_right = 0;
    let mut predictions = format!("file,label,tract,{}\n", plans.join(","));
    for image in &chosen {
        let label = image.label.context("images must sit in class folders")?;
        let input = calibration_input(&model, &spec, &image.path).map_err(anyhow::Error::msg)?;
        tract.run(&input, &mut float)?;
        float_right += usize::from(argmax(&float) == label);
        let name = image.path.file_name().unwrap_or_default().to_string_lossy();
        predictions += &format!("{name},{label},{}", argmax(&float));
        for (executor, tally) in executors.iter_mut().zip(&mut tallies) {
            executor.run(&input, &mut quantised)?;
            predictions += &format!(",{}", argmax(&quantised));
            tally.agree += usize::from(argmax(&quantised) == argmax(&float));
            tally.right += usize::from(argmax(&quantised) == label);
            for (f, q) in float.iter().zip(&quantised) {
                tally.error_squares += f64::from(q - f).powi(2);
                tally.float_squares += f64::from(*f).powi(2);
            }
        }
        predictions.push('\n');
    }
    if let Some(path) = predictions_path {
        std::fs::write(path, predictions).with_context(|| path.clone())?;
    }
    let n = chosen.len();
    println!(
        "{n} {split:?}-split images; tract top-1 {float_right} ({:.2}%)",
        100.0 * float_right as f64 / n as f64
    );
    for (plan, t) in plans.iter().zip(&tallies) {
        println!(
            "{plan}: top-1 equals tract's on {} ({:.2}%), right on {} ({:.2}%), output relative RMS error {:.4}",
            t.agree,
            100.0 * t.agree as f64 / n as f64,
            t.right,
            100.0 * t.right as f64 / n as f64,
            (t.error_squares / t.float_squares.max(f64::MIN_POSITIVE)).sqrt()
        );
    }
    Ok(())
}
