//! Batch-1, one-thread latency of Kestrel's backends on the model suite (folders written by
//! `suite/export.py`, plans by `models compile`), and the time Kestrel's preprocessing of one
//! real chip into each model's input takes, measured apart from the model.
//!
//! `cargo bench -p sim --bench suite -- [--runs N] DIR...` prints one JSON line per model and
//! backend with the median, p10 and p90 in microseconds. `suite/run.sh` runs it beside ONNX
//! Runtime and tract on the same models and input, in one run.

use std::path::Path;
use std::time::Instant;

use kestrel_backend::Backend;
use kestrel_host::decode_image;
use kestrel_runtime::detect::Detections;
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::preprocess::{prepare_input, Region};
use models::ZooModel;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mut runs = 100;
    let mut folders = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => runs = args.next().and_then(|n| n.parse().ok()).expect("--runs N"),
            folder => folders.push(folder.to_string()),
        }
    }
    let chip =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("sample/eurosat-rgb/Forest/Forest_10.jpg");
    let image = decode_image(&chip).expect("sample chip");
    let view = FrameView::new(image.geometry, &image.samples).expect("frame");
    let whole = Region::whole(image.geometry.width, image.geometry.height);
    for folder in folders {
        let model = ZooModel::load(&folder).unwrap_or_else(|e| panic!("{folder}: {e}"));
        let spec = model.preprocess_spec().expect("spec");
        let mut input = vec![0.0; spec.input_len()];
        let name = Path::new(&folder)
            .file_name()
            .map_or(folder.clone(), |n| n.to_string_lossy().into_owned());
        let preprocess = timed(runs, || {
            prepare_input(view, whole, &spec, &mut input).expect("preprocess")
        });
        report(&name, "kestrel-preprocess", runs, preprocess);
        // The model's own input file when the exporter wrote one, so every backend of every
        // runner sees the same tensor; else the preprocessed chip.
        if let Ok(bytes) = std::fs::read(Path::new(&folder).join("input.f32")) {
            let values: Vec<f32> = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(values.len(), input.len(), "{folder}: input.f32 size");
            input = values;
        }
        match model.int8_backend() {
            Ok(Some(mut plan)) => {
                let kernels = plan.kernel_name();
                // A detector's decoding and suppression of the int8 head, which ONNX Runtime's
                // and tract's graphs include for a YOLO export.
                if let Some(config) = model.detector_config() {
                    let mut head = vec![0.0; plan.output_len()];
                    plan.run(&input, &mut head).expect("inference");
                    let mut found = Detections::<4096>::new();
                    let decode = timed(runs, || {
                        config
                            .head
                            .decode(&head, config.score_threshold, &mut found)
                            .expect("decode");
                        found.suppress(config.nms_iou);
                    });
                    report(&name, "kestrel-decode", runs, decode);
                }
                measure(
                    &name,
                    &format!("kestrel-int8-{kernels}"),
                    plan,
                    &input,
                    runs,
                );
            }
            Ok(None) => eprintln!("{name}: no model.plan; compile it first"),
            Err(e) => eprintln!("{name}: {e}"),
        }
        match model.tract_backend() {
            Ok(tract) => measure(&name, "tract-f32", tract, &input, runs),
            Err(e) => eprintln!("{name}: {e}"),
        }
    }
}

/// Median, p10 and p90 in microseconds of `runs` calls of `work` after `runs / 10` warm-up ones.
fn timed(runs: usize, mut work: impl FnMut()) -> [f64; 3] {
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs + runs / 10 {
        let started = Instant::now();
        work();
        if i >= runs / 10 {
            times.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    [at(0.5), at(0.1), at(0.9)]
}

fn measure(model: &str, name: &str, mut backend: impl Backend, input: &[f32], runs: usize) {
    let mut output = vec![0.0; backend.output_len()];
    let times = timed(runs, || backend.run(input, &mut output).expect("inference"));
    report(model, name, runs, times);
}

fn report(model: &str, backend: &str, runs: usize, [median, p10, p90]: [f64; 3]) {
    println!(
        "{{\"model\": \"{model}\", \"backend\": \"{backend}\", \"runs\": {runs}, \"median_us\": {median:.1}, \"p10_us\": {p10:.1}, \"p90_us\": {p90:.1}}}"
    );
}
