//! The zoo plans' outputs on the committed samples, pinned by digest: a restructure of the
//! compiler, the plan format or the executors must leave every output byte as it was.
//!
//! Each model's output codes (int8, or the classifier's 16-bit logits as little-endian byte
//! pairs), concatenated in a fixed order, are hashed with SHA-256 and
//! compared with `tests/data/zoo_outputs.json`:
//! - `eurosat-rgb`: the 300 sample chips (class folders, then files, sorted);
//! - `nwpu-vhr10`: every tile of the 7 sample scenes, cut as `DetectorStep` cuts them.
//!
//! The digests were made with the generic kernels (the oracle) and the AVX2 ones, which agreed;
//! the test runs the fastest kernels this CPU has, as a flight build does (the generic kernels
//! take 4 minutes over the detector's 38 tiles; `plan_ops` and the kernels' own tests check the
//! others against them bit for bit). If a change is meant to change outputs (a retrained model), the
//! failure prints the new digest to commit.

use std::fmt::Write as _;
use std::path::Path;

use kestrel_host::decode_image;
use kestrel_plan::cpu::Int8Cpu;
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::preprocess::prepare_input;
use kestrel_runtime::tile::TileGrid;
use kestrel_tests::{sorted_files, whole_image_input};
use models::ZooModel;
use sha2::{Digest, Sha256};

fn sample(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../sim/sample")
        .join(path)
}

/// The model's inputs on the committed samples, in the digest's order.
fn inputs(model: &ZooModel) -> Vec<Vec<f32>> {
    let spec = model.preprocess_spec().unwrap();
    match model.detector_config() {
        None => sorted_files(&sample("eurosat-rgb"))
            .iter()
            .flat_map(|class| sorted_files(class))
            .map(|chip| whole_image_input(&chip, &spec))
            .collect(),
        Some(config) => {
            let mut inputs = Vec::new();
            for scene in sorted_files(&sample("nwpu-vhr10/images")) {
                let image = decode_image(&scene).unwrap();
                let g = image.geometry;
                let view = FrameView::new(g, &image.samples).unwrap();
                let (w, h) = (spec.width() as u32, spec.height() as u32);
                let grid = TileGrid::new(g.width, g.height, w, h, config.tile_overlap).unwrap();
                for region in grid.iter() {
                    let mut input = vec![0.0; spec.input_len()];
                    prepare_input(view, region, &spec, &mut input).unwrap();
                    inputs.push(input);
                }
            }
            inputs
        }
    }
}

/// SHA-256 (hex) of the output codes of `backend` on every input.
fn digest(backend: &mut Int8Cpu, inputs: &[Vec<f32>]) -> String {
    let program = backend.program().clone();
    let output = program.tensor(program.header().output_tensor).unwrap();
    let mut scores = vec![0.0; program.output_len()];
    let mut hash = Sha256::new();
    for input in inputs {
        backend.infer(input, &mut scores).unwrap();
        let codes: Vec<u8> = backend.arena()[output.clone()]
            .iter()
            .map(|&c| c as u8)
            .collect();
        hash.update(&codes);
    }
    hash.finalize().iter().fold(String::new(), |mut hex, byte| {
        let _ = write!(hex, "{byte:02x}");
        hex
    })
}

#[test]
fn zoo_plan_outputs_match_the_committed_digests() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/zoo_outputs.json");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    // Every model and kernel set first, so one failing run reports all the new digests.
    let mut mismatches = Vec::new();
    for name in ["eurosat-rgb", "nwpu-vhr10"] {
        let model = ZooModel::load(name).unwrap();
        let inputs = inputs(&model);
        let plan = model.plan_bytes().unwrap().unwrap();
        let entry = &expected[name];
        if entry["inputs"].as_u64() != Some(inputs.len() as u64) {
            mismatches.push(format!("{name}: {} inputs", inputs.len()));
        }
        let mut backend = Int8Cpu::from_bytes(plan).unwrap();
        let got = digest(&mut backend, &inputs);
        let kernels = backend.kernel_name();
        eprintln!("{name} on the {kernels} kernels: {got}");
        if entry["sha256"].as_str() != Some(got.as_str()) {
            mismatches.push(format!("{name} on the {kernels} kernels: sha256 {got}"));
        }
    }
    assert!(
        mismatches.is_empty(),
        "outputs differ from {}:\n{}",
        path.display(),
        mismatches.join("\n")
    );
}
