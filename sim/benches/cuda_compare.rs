//! Kestrel's CUDA executor on the zoo models, timed the way `tests/gpu/torch_bench.py` times
//! PyTorch on the same models and inputs, in the same run of `tests/gpu/check.sh`.
//!
//! `cargo bench -p sim --features cuda-13000 --bench cuda_compare -- <dir> [runs]` writes into
//! `<dir>` the inputs both sides use (`chips.f32`: 256 committed EuroSAT chips preprocessed,
//! NCHW; `frame.u8`: the 1024 x 1024 mosaic, HWC) and `kestrel.json`:
//! - `classify_batch1`: one chip, host floats in, class scores on the host out
//!   (`Backend::run`: quantise, copy, the CUDA graph, copy back, dequantise), with and
//!   without the graph;
//! - `classify_batch256`: 256 quantised chips in one batch, host to host, as tiles per second;
//! - `detect_frame`: the u8 frame in, nine 512-pixel tiles cut, normalised and quantised on the
//!   GPU, the detector, head codes back on the host;
//! - `detect_frame_boxes`: the same, with the heads decoded on the GPU (peaks back, not heads),
//!   then on the host each tile's boxes, NMS and the merge across seams, as `DetectorStep`
//!   does; `boxes_match_cpu` says whether the boxes equal `DetectorStep` on the int8 CPU
//!   executor.
//!
//! Times are medians, p90 and p99 of `runs` repetitions after warm-up. Without a GPU it exits with
//! the reason.

mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use kestrel_backend::Backend;
use kestrel_cuda::launch::HeadShape;
use kestrel_cuda::{CudaBackend, CudaError, CudaOptions, DecodedTile, HeadCodes, PeakSearch};
use kestrel_host::decode_image;
use kestrel_runtime::detect::{decode, decode_peaks, Detections, Head};
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::preprocess::{prepare_input, Region};
use kestrel_runtime::step::{DetectorConfig, DetectorStep};
use models::ZooModel;

use common::{frame_tiles, mosaic, GEOMETRY, SIZE};

const BATCH: usize = 256;

/// Quantiles of repeated timings, in µs.
struct Timing {
    median: f64,
    p90: f64,
    p99: f64,
}

impl Timing {
    /// The JSON fields, without braces.
    fn fields(&self) -> String {
        format!(
            "\"median_us\": {:.1}, \"p90_us\": {:.1}, \"p99_us\": {:.1}",
            self.median, self.p90, self.p99
        )
    }
}

/// `runs` timings of `f` after `runs / 10 + 3` untimed calls.
fn time(runs: usize, mut f: impl FnMut()) -> Timing {
    for _ in 0..runs / 10 + 3 {
        f();
    }
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    Timing {
        median: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
    }
}

fn gpu(plan: &[u8], max_batch: u32, graphs: bool) -> CudaBackend {
    let options = CudaOptions {
        max_batch,
        graphs,
        ..CudaOptions::default()
    };
    match CudaBackend::new(plan, &options) {
        Ok(gpu) => gpu,
        Err(CudaError::NotAvailable(why)) => {
            eprintln!("cuda_compare: no GPU to measure: {why}");
            std::process::exit(2);
        }
        Err(e) => panic!("CUDA backend: {e}"),
    }
}

/// The first `BATCH` committed EuroSAT chips (class folders and files sorted), preprocessed.
fn chips(model: &ZooModel) -> Vec<Vec<f32>> {
    let spec = model.preprocess_spec().expect("spec");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("sample/eurosat-rgb");
    let sorted = |dir: &Path| {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("sample folder")
            .map(|e| e.expect("entry").path())
            .collect();
        paths.sort();
        paths
    };
    sorted(&root)
        .iter()
        .flat_map(|class| sorted(class))
        .take(BATCH)
        .map(|path| {
            let image = decode_image(&path).expect("chip");
            let g = image.geometry;
            let view = FrameView::new(g, &image.samples).expect("frame");
            let mut input = vec![0.0; spec.input_len()];
            prepare_input(view, Region::whole(g.width, g.height), &spec, &mut input)
                .expect("preprocess");
            input
        })
        .collect()
}

/// The frame's boxes from its tiles decoded on the GPU: `DetectorStep::detect`'s steps after
/// the backend, per tile from its peaks (or its head, when its list overflowed).
fn frame_boxes(
    tiles: &[DecodedTile],
    origins: &[(u32, u32)],
    config: &DetectorConfig,
    codes: &HeadCodes,
    program: &kestrel_plan::program::Program<'_>,
    found: &mut Detections<1024>,
) {
    found.clear();
    let Head::CenterNet(layout) = config.head else {
        panic!("the GPU's decoding kernel reads CenterNet heads");
    };
    let mut tile_boxes = Detections::<128>::new();
    let mut head = vec![0.0; config.head.len()];
    for (tile, &(x, y)) in tiles.iter().zip(origins) {
        match tile {
            DecodedTile::Peaks(peaks) => decode_peaks(
                peaks.iter().map(|p| p.values(&codes.values)),
                &layout,
                &mut tile_boxes,
            ),
            DecodedTile::Codes(codes) => {
                program.dequantize_codes(codes, &mut head).expect("head");
                decode(&head, &layout, config.score_threshold, &mut tile_boxes)
            }
        }
        .expect("decode");
        tile_boxes.suppress(config.nms_iou);
        found.add_from_tile(&tile_boxes, x as f32, y as f32, 1.0);
    }
    found.merge_tiles(config.nms_iou, config.seam_containment);
    found.clip_to(SIZE as f32, SIZE as f32);
    found.keep_per_class(config.max_per_class);
}

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let dir = PathBuf::from(
        args.next()
            .unwrap_or_else(|| "target/gpu-check/bench".into()),
    );
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(200);
    std::fs::create_dir_all(&dir).expect("output folder");

    let classifier = ZooModel::load("eurosat-rgb").expect("built-in classifier");
    let inputs = chips(&classifier);
    let floats: Vec<u8> = inputs
        .iter()
        .flatten()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    std::fs::write(dir.join("chips.f32"), floats).expect("write chips");
    let frame = mosaic();
    std::fs::write(dir.join("frame.u8"), &frame).expect("write frame");

    let plan = classifier
        .plan_bytes()
        .expect("plan")
        .expect("built-in plan");
    let mut json = String::from("{");
    let mut output = vec![0.0; 10];
    for graphs in [true, false] {
        let mut cuda = gpu(plan, 1, graphs);
        if graphs {
            let info = cuda.info().clone();
            let _ = write!(
                json,
                "\"gpu\": \"{}\", \"compute_capability\": \"{}.{}\", \"driver_version\": {}, \"nvrtc_version\": \"{}.{}\", \"kernels_from_cache\": {}, ",
                info.name,
                info.compute_capability.0,
                info.compute_capability.1,
                info.driver_version,
                info.nvrtc_version.0,
                info.nvrtc_version.1,
                info.cache_hit
            );
        }
        let mut i = 0;
        let timing = time(runs * 5, || {
            cuda.run(&inputs[i % inputs.len()], &mut output)
                .expect("run");
            i += 1;
        });
        let key = if graphs {
            "classify_batch1"
        } else {
            "classify_batch1_no_graph"
        };
        let _ = write!(json, "\"{key}\": {{{}}}, ", timing.fields());
    }

    let mut cuda = gpu(plan, BATCH as u32, true);
    let owned = kestrel_plan::program::OwnedProgram::new(plan).expect("plan");
    let program = owned.program();
    let mut codes = vec![0i8; program.input_len() * BATCH];
    for (chunk, input) in codes.chunks_exact_mut(program.input_len()).zip(&inputs) {
        program.quantize_codes(input, chunk).expect("quantise");
    }
    let mut scores = vec![0i8; program.output_len() * BATCH];
    let timing = time(runs / 4 + 5, || {
        cuda.run_codes(&codes, &mut scores).expect("batch")
    });
    let _ = write!(
        json,
        "\"classify_batch256\": {{{}, \"tiles_per_s\": {:.0}}}, ",
        timing.fields(),
        BATCH as f64 / (timing.median * 1e-6)
    );

    let detector = ZooModel::load(models::DEFAULT_DETECTOR).expect("built-in detector");
    let config = detector.detector_config().expect("a detector");
    let Head::CenterNet(layout) = config.head else {
        panic!("the built-in detector is a CenterNet");
    };
    let spec = detector.preprocess_spec().expect("spec");
    let grid = frame_tiles(&spec, &config);
    let origins: Vec<(u32, u32)> = grid.iter().map(|r| (r.x, r.y)).collect();
    let plan = detector.plan_bytes().expect("plan").expect("built-in plan");
    let mut cuda = gpu(plan, origins.len() as u32, true);
    let mut head = vec![0i8; cuda.output_len() * origins.len()];
    let side = SIZE as u32;
    let timing = time(runs / 4 + 5, || {
        cuda.run_tiles(&frame, side, side, &origins, &mut head)
            .expect("tiles")
    });
    let _ = write!(
        json,
        "\"detect_frame\": {{\"tiles\": {}, {}}}, ",
        origins.len(),
        timing.fields()
    );

    let owned = kestrel_plan::program::OwnedProgram::new(plan).expect("plan");
    let codes = HeadCodes::new(owned.program()).expect("a detector head");
    let mut found = Detections::<1024>::new();
    let mut boxes = || {
        let tiles = cuda
            .detect_tiles(
                &frame,
                side,
                side,
                &origins,
                PeakSearch {
                    shape: HeadShape {
                        classes: layout.classes,
                        height: layout.height,
                        width: layout.width,
                    },
                    threshold: config.score_threshold,
                    capacity: 1024,
                },
            )
            .expect("tiles");
        frame_boxes(
            &tiles,
            &origins,
            &config,
            &codes,
            owned.program(),
            &mut found,
        );
    };
    let timing = time(runs / 4 + 5, &mut boxes);
    boxes();
    let view = FrameView::new(GEOMETRY, &frame).expect("frame");
    let mut backend = detector
        .int8_backend()
        .expect("plan")
        .expect("built-in plan");
    let (mut input, mut head) = (vec![0.0; spec.input_len()], vec![0.0; config.head.len()]);
    let mut step = DetectorStep::<_, 128>::new(&mut backend, spec, config, &mut input, &mut head)
        .expect("step");
    let mut on_cpu = Detections::<1024>::new();
    step.detect(view, &mut on_cpu).expect("detect");
    let _ = write!(
        json,
        "\"detect_frame_boxes\": {{\"tiles\": {}, \"boxes\": {}, \"boxes_match_cpu\": {}, {}}}, \"runs\": {runs}}}",
        origins.len(),
        found.as_slice().len(),
        found == on_cpu,
        timing.fields()
    );
    std::fs::write(dir.join("kestrel.json"), &json).expect("write results");
    println!("{json}");
}
