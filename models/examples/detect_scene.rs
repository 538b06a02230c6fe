//! Kestrel's library API for a detector, in one file: load a compiled plan from disk, decode a
//! scene, find its objects with `DetectorStep` (tiled as the plan's header says, boxes merged
//! across tile seams), read the detections.
//!
//!     cargo run -p models --example detect_scene -- [PLAN] [IMAGE]
//!
//! By default, the built-in NWPU VHR-10 plan (`models/zoo/nwpu-vhr10/model.plan`) on a
//! committed validation scene with airplanes (`sim/sample/nwpu-vhr10/images/017.jpg`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use kestrel_backend::Backend;
use kestrel_plan::cpu::Int8Cpu;
use kestrel_runtime::detect::Detections;
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::step::{DetectorConfig, DetectorStep};

/// Detections kept per tile, and per frame after merging (more are counted as overflow).
const PER_TILE: usize = 128;
const PER_FRAME: usize = 1024;

fn main() -> anyhow::Result<()> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let plan_path = args
        .next()
        .unwrap_or_else(|| here.join("zoo/nwpu-vhr10/model.plan"));
    let image_path = args
        .next()
        .unwrap_or_else(|| here.join("../sim/sample/nwpu-vhr10/images/017.jpg"));

    let plan = std::fs::read(&plan_path)?;
    let backend = Int8Cpu::from_bytes(&plan)?;
    let header = backend.program().header();
    let spec = header.preprocess_spec()?;
    let config = DetectorConfig::from_plan(header).context("not a detector plan")?;
    let labels: Vec<String> = header.labels().map(String::from).collect();

    let image = kestrel_host::decode_image(&image_path)?;
    let frame = FrameView::new(image.geometry, &image.samples)?;

    let mut input = vec![0.0; spec.input_len()];
    let mut output = vec![0.0; backend.output_len()];
    let mut step =
        DetectorStep::<_, PER_TILE>::new(backend, spec, config, &mut input, &mut output)?;
    let mut found = Detections::<PER_FRAME>::new();
    step.detect(frame, &mut found)?;

    let g = image.geometry;
    println!(
        "{}: {}x{}, {} object(s) from a score of {}",
        image_path.display(),
        g.width,
        g.height,
        found.as_slice().len(),
        config.score_threshold
    );
    // Best first; boxes in frame pixels, (x, y) the top-left corner.
    for d in found.as_slice() {
        let label = labels.get(usize::from(d.class)).map_or("?", String::as_str);
        println!(
            "  {label:<18} {:.2}  x {:6.1}  y {:6.1}  w {:5.1}  h {:5.1}",
            d.score, d.x, d.y, d.w, d.h
        );
    }
    Ok(())
}
