//! Accuracy of the int8 program (generic reference kernels) against the float model, on a
//! labelled dataset split: the number issue 3's "within 0.5 points" target is about.
//!
//!     cargo run --release -p sim --example int8_accuracy -- ../shared/data/eurosat-rgb [calibration chips] [percentile|minmax|entropy]
//!
//! Calibrates on chips of the training split (spread over the classes), evaluates on the
//! validation split, and prints float top-1, int8 top-1 and their agreement.

use std::path::PathBuf;

use kestrel_eval::dataset::scan_labelled;
use kestrel_eval::Split;
use kestrel_host::decode_image;
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::preprocess::{prepare_input, Region};
use models::calibrate::{Calibrator, Method};
use models::graph::Graph;
use models::quantize::QuantizedGraph;
use models::ZooModel;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let data = PathBuf::from(
        args.first()
            .ok_or_else(|| anyhow::anyhow!("usage: int8_accuracy <dataset> [chips] [method]"))?,
    );
    let calibration_chips: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(200);
    let method = match args.get(2).map(String::as_str) {
        None | Some("percentile") => Method::Percentile(0.01),
        Some("minmax") => Method::MinMax,
        Some("entropy") => Method::Entropy,
        Some(other) => anyhow::bail!("unknown method {other}"),
    };
    let model = ZooModel::load(models::DEFAULT_MODEL)?;
    let graph = Graph::from_onnx(model.onnx())?;
    let spec = model.preprocess_spec()?;
    let tensor = |path: &std::path::Path| -> anyhow::Result<Vec<f32>> {
        let image = decode_image(path)?;
        let view = FrameView::new(image.geometry, &image.samples)?;
        let mut input = vec![0.0; spec.input_len()];
        let g = image.geometry;
        prepare_input(view, Region::whole(g.width, g.height), &spec, &mut input)?;
        Ok(input)
    };

    let train = scan_labelled(&data, &model.manifest.labels, Split::Train)?;
    let stride = (train.len() / calibration_chips.max(1)).max(1);
    let calibration: Vec<Vec<f32>> = train
        .iter()
        .step_by(stride)
        .take(calibration_chips)
        .map(|i| tensor(&i.path))
        .collect::<Result<_, _>>()?;
    let runs: Vec<_> = calibration
        .iter()
        .map(|input| graph.run_f32(input))
        .collect();
    let mut calibrator = Calibrator::new(graph.shapes.len());
    runs.iter().for_each(|v| calibrator.observe_range(v));
    runs.iter().for_each(|v| calibrator.observe_histogram(v));
    let program = QuantizedGraph::build(&graph, &calibrator.finish(method))?;
    let plan = models::compile::encode(&model, &program)?;
    let mut int8_backend = kestrel_plan::cpu::Int8Cpu::from_bytes(&plan)?;
    println!(
        "int8 program: {} steps, activation arena {} bytes, plan {} bytes",
        program.steps.len(),
        int8_backend.program().arena_size(),
        plan.len()
    );
    let mut logits = vec![0.0; int8_backend.program().output_len()];

    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |m| m.0)
    };
    let validation = scan_labelled(&data, &model.manifest.labels, Split::Validation)?;
    let (mut float_right, mut int8_right, mut agree) = (0, 0, 0);
    for (n, image) in validation.iter().enumerate() {
        let input = tensor(&image.path)?;
        let float = argmax(&graph.run_f32(&input)[graph.output]);
        int8_backend.infer(&input, &mut logits)?;
        let int8 = argmax(&logits);
        float_right += usize::from(float == image.label);
        int8_right += usize::from(int8 == image.label);
        agree += usize::from(float == int8);
        if (n + 1) % 500 == 0 {
            eprintln!("[{}/{}]", n + 1, validation.len());
        }
    }
    let pct = |k: usize| 100.0 * k as f64 / validation.len() as f64;
    println!(
        "{} validation chips, {} calibration chips ({method:?}): float top-1 {:.2}%, int8 top-1 {:.2}% (delta {:+.2} points), agreement {:.2}%",
        validation.len(),
        calibration.len(),
        pct(float_right),
        pct(int8_right),
        pct(int8_right) - pct(float_right),
        pct(agree)
    );
    Ok(())
}
