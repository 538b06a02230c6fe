//! Kestrel's library API for a classifier, in one file: load a compiled plan from disk, decode an
//! image, classify it with `ClassifierStep`, read the answer. Everything a board needs is in the
//! plan's header: its labels, input size and normalisation.
//!
//!     cargo run -p models --example classify_chip -- [PLAN] [IMAGE]
//!
//! By default, the built-in EuroSAT plan (`models/zoo/eurosat-rgb/model.plan`) on a committed
//! validation chip (`sim/sample/eurosat-rgb/River/River_105.jpg`).

use std::path::{Path, PathBuf};

use kestrel_backend::Backend;
use kestrel_plan::cpu::Int8Cpu;
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::preprocess::Region;
use kestrel_runtime::step::ClassifierStep;

fn main() -> anyhow::Result<()> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut args = std::env::args_os().skip(1).map(PathBuf::from);
    let plan_path = args
        .next()
        .unwrap_or_else(|| here.join("zoo/eurosat-rgb/model.plan"));
    let image_path = args
        .next()
        .unwrap_or_else(|| here.join("../sim/sample/eurosat-rgb/River/River_105.jpg"));

    // The plan: verified (magic, version, CRCs) and laid out for this CPU's kernels.
    let plan = std::fs::read(&plan_path)?;
    let backend = Int8Cpu::from_bytes(&plan)?;
    let header = backend.program().header();
    let spec = header.preprocess_spec()?;
    let labels: Vec<String> = header.labels().map(String::from).collect();

    // A frame: 8-bit samples, band-interleaved by pixel, as a camera or a file delivers them.
    let image = kestrel_host::decode_image(&image_path)?;
    let g = image.geometry;
    let frame = FrameView::new(g, &image.samples)?;

    // The step borrows its buffers: it allocates nothing per frame.
    let mut input = vec![0.0; spec.input_len()];
    let mut output = vec![0.0; backend.output_len()];
    let kernels = backend.kernel_name();
    let mut step = ClassifierStep::new(backend, spec, &mut input, &mut output)?;
    let result = step.classify(frame, Region::whole(g.width, g.height))?;

    let label = labels
        .get(usize::from(result.class()))
        .map_or("?", String::as_str);
    println!(
        "{}: {label} ({:.1}%), {} on the {kernels} kernels",
        image_path.display(),
        100.0 * result.confidence(),
        plan_path.display()
    );
    Ok(())
}
