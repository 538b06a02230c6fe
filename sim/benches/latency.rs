//! Batch-1 model latency of Kestrel's backends on one real EuroSAT chip, one thread.
//!
//! `cargo bench -p sim --bench latency -- [runs]` prints one JSON line with the median, p10 and
//! p90 in microseconds per backend. `bench/compare.sh` runs it beside ONNX Runtime on the same
//! model and chip, in one run, and prints the ratios recorded in BENCHMARKS.md.

use std::path::Path;
use std::time::Instant;

use kestrel_backend::Backend;
use kestrel_host::decode_image;
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::preprocess::{prepare_input, Region};
use models::ZooModel;

fn main() {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(500);
    let chip =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("sample/eurosat-rgb/Forest/Forest_10.jpg");
    let model = ZooModel::load(models::DEFAULT_MODEL).expect("built-in model");
    let spec = model.preprocess_spec().expect("spec");
    let image = decode_image(&chip).expect("sample chip");
    let view = FrameView::new(image.geometry, &image.samples).expect("frame");
    let mut input = vec![0.0; spec.input_len()];
    let g = image.geometry;
    prepare_input(view, Region::whole(g.width, g.height), &spec, &mut input).expect("preprocess");

    let plan = model.int8_backend().expect("plan").expect("built-in plan");
    let kernels = plan.kernel_name();
    measure(
        &format!("kestrel-int8-{kernels}"),
        plan,
        &input,
        runs,
        &chip,
    );
    // Two-thread scaling: one backend per thread, each running `runs` frames.
    for threads in [1, 2] {
        let started = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    let mut backend = model.int8_backend().expect("plan").expect("plan");
                    let mut output = vec![0.0; backend.output_len()];
                    for _ in 0..runs {
                        backend.run(&input, &mut output).expect("inference");
                    }
                });
            }
        });
        let fps = (threads * runs) as f64 / started.elapsed().as_secs_f64();
        println!(
            "{{\"backend\": \"kestrel-int8-{kernels}\", \"threads\": {threads}, \"frames_per_s\": {fps:.1}}}"
        );
    }
    measure(
        "tract-f32",
        model.tract_backend().expect("tract"),
        &input,
        runs,
        &chip,
    );
}

/// Time `runs` inferences after `runs / 10` warm-up ones and print one JSON line.
fn measure(name: &str, mut backend: impl Backend, input: &[f32], runs: usize, chip: &Path) {
    let mut output = vec![0.0; backend.output_len()];
    let mut times = Vec::with_capacity(runs);
    for i in 0..runs + runs / 10 {
        let started = Instant::now();
        backend.run(input, &mut output).expect("inference");
        // The first tenth warms caches and is not counted.
        if i >= runs / 10 {
            times.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    println!(
        "{{\"backend\": \"{name}\", \"runs\": {runs}, \"median_us\": {:.1}, \"p10_us\": {:.1}, \"p90_us\": {:.1}, \"chip\": \"{}\"}}",
        at(0.5),
        at(0.1),
        at(0.9),
        chip.display()
    );
}
