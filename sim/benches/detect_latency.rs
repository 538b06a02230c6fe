//! Per-frame latency of the NWPU VHR-10 detector on a 1024 x 1024 frame, one thread.
//!
//! `cargo bench -p sim --bench detect_latency -- [runs] [tiles.f32]` prints one JSON line per
//! backend: the median (and p10, p90) of the whole frame through `DetectorStep` (nine 512-pixel
//! tiles: preprocessing, the model, decoding, merging) and of the model alone over those nine
//! tiles. With a second argument it writes the nine preprocessed tiles there (raw f32, NCHW),
//! so `detect_compare.sh` can time ONNX Runtime on exactly the same inputs.
//!
//! The frame is [`common::mosaic`]: real airport, storage tanks and sports fields.

use std::time::Instant;

use kestrel_backend::Backend;
use kestrel_runtime::detect::Detections;
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::preprocess::prepare_input;
use kestrel_runtime::step::DetectorStep;
use models::ZooModel;

mod common;

use common::{frame_tiles, mosaic, GEOMETRY};

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(9);
    let tiles_out = args.next();
    let model = ZooModel::load(models::DEFAULT_DETECTOR).expect("built-in detector");
    let config = model.detector_config().expect("a detector");
    let spec = model.preprocess_spec().expect("spec");
    let pixels = mosaic();
    let view = FrameView::new(GEOMETRY, &pixels).expect("frame");

    // The nine tiles exactly as the step prepares them.
    let grid = frame_tiles(&spec, &config);
    let tiles: Vec<Vec<f32>> = grid
        .iter()
        .map(|region| {
            let mut input = vec![0.0; spec.input_len()];
            prepare_input(view, region, &spec, &mut input).expect("tile");
            input
        })
        .collect();
    if let Some(path) = tiles_out {
        let bytes: Vec<u8> = tiles
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        std::fs::write(&path, bytes).expect("write tiles");
    }

    let plan = model.int8_backend().expect("plan").expect("built-in plan");
    let name = format!("kestrel-int8-{}", plan.kernel_name());
    measure(&name, plan, &model, view, &tiles, runs);
    let tract = model.tract_backend().expect("tract");
    measure("tract-f32", tract, &model, view, &tiles, runs);
}

/// Median, p10 and p90 of `runs` timings (after one warm-up) of the frame through the step,
/// then of the model alone over the same tiles; one JSON line.
fn measure(
    name: &str,
    mut backend: impl Backend,
    model: &ZooModel,
    view: FrameView<'_, u8>,
    tiles: &[Vec<f32>],
    runs: usize,
) {
    let spec = model.preprocess_spec().expect("spec");
    let config = model.detector_config().expect("detector");
    let mut output = vec![0.0; backend.output_len()];
    let mut model_times = Vec::new();
    for i in 0..=runs {
        let started = Instant::now();
        for tile in tiles {
            backend.run(tile, &mut output).expect("inference");
        }
        if i > 0 {
            model_times.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    let (mut input, mut head) = (vec![0.0; spec.input_len()], vec![0.0; config.head.len()]);
    let mut step = DetectorStep::<_, 128>::new(&mut backend, spec, config, &mut input, &mut head)
        .expect("step");
    let mut found = Detections::<1024>::new();
    let mut frame_times = Vec::new();
    for i in 0..=runs {
        let started = Instant::now();
        step.detect(view, &mut found).expect("detect");
        if i > 0 {
            frame_times.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    let stats = |times: &mut Vec<f64>| {
        times.sort_by(f64::total_cmp);
        let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        (at(0.5), at(0.1), at(0.9))
    };
    let (frame, frame_p10, frame_p90) = stats(&mut frame_times);
    let (alone, ..) = stats(&mut model_times);
    println!(
        "{{\"backend\": \"{name}\", \"runs\": {runs}, \"tiles\": {}, \"frame_median_us\": {frame:.0}, \"frame_p10_us\": {frame_p10:.0}, \"frame_p90_us\": {frame_p90:.0}, \"model_median_us\": {alone:.0}, \"detections\": {}}}",
        tiles.len(),
        found.as_slice().len()
    );
}
