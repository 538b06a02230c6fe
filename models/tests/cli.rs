//! The compiler's command line: a real compile on committed chips, and the calibration-folder
//! errors a user meets first.

use std::path::{Path, PathBuf};
use std::process::Command;

fn models() -> Command {
    Command::new(env!("CARGO_BIN_EXE_models"))
}

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sim/sample/eurosat-rgb")
}

#[test]
fn compiles_verifies_and_writes_a_loadable_plan() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("eurosat.plan");
    let report = dir.path().join("report.json");
    let out = models()
        .args(["compile", "eurosat-rgb", "--max-images", "20", "--calib"])
        .arg(sample())
        .arg("--out")
        .arg(&plan)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("agreement"), "{stdout}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(summary["calibration_images"], 20);
    assert!(
        summary["top1_agreement"].as_f64().unwrap() >= 0.9,
        "{summary}"
    );
    assert!(
        summary["delta_points"].as_f64().is_some(),
        "class folders give accuracy"
    );
    let bytes = std::fs::read(&plan).unwrap();
    assert_eq!(summary["plan_bytes"], bytes.len());
    let backend = kestrel_plan::cpu::Int8Cpu::from_bytes(&bytes).unwrap();
    assert_eq!(backend.program().header().name, "eurosat-rgb");
    assert!(!dir.path().join("eurosat.plan.partial").exists());
}

#[test]
fn calibration_folder_problems_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let corrupt = dir.path().join("corrupt");
    std::fs::create_dir(&corrupt).unwrap();
    std::fs::write(corrupt.join("chip.jpg"), b"not a jpeg").unwrap();
    let cases = [
        (dir.path().join("missing"), "cannot read"),
        (empty, "has no PNG or JPEG images"),
        (corrupt, "none of the 1 calibration images could be used"),
    ];
    for (calib, expected) in cases {
        let out = models()
            .args(["compile", "eurosat-rgb", "--calib"])
            .arg(&calib)
            .arg("--out")
            .arg(dir.path().join("x.plan"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{}: {stderr}", calib.display());
        assert!(!dir.path().join("x.plan").exists());
    }
}

#[test]
fn an_unsupported_operator_names_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/unsupported_op.onnx");
    let onnx = std::fs::read(&fixture).unwrap();
    let digest: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&onnx)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let zoo = Path::new(env!("CARGO_MANIFEST_DIR")).join("zoo/eurosat-rgb/manifest.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(zoo).unwrap()).unwrap();
    manifest["onnx_sha256"] = digest.into();
    std::fs::write(dir.path().join("model.onnx"), &onnx).unwrap();
    std::fs::write(dir.path().join("manifest.json"), manifest.to_string()).unwrap();
    let out = models()
        .arg("compile")
        .arg(dir.path())
        .arg("--calib")
        .arg(sample())
        .arg("--out")
        .arg(dir.path().join("x.plan"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "operators the Kestrel compiler does not support: Softplus ('odd_activation')"
        ),
        "{stderr}"
    );
}

/// The detector compiles on native-scale tiles of real scenes, and its int8 head stays close
/// to float (the compiler measures the relative RMS error of the whole output against tract).
#[test]
fn compiles_the_detector_on_scene_tiles() {
    use kestrel_backend::Backend;
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("nwpu.plan");
    let report = dir.path().join("report.json");
    let scenes = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sim/sample/nwpu-vhr10/images");
    let out = models()
        .args(["compile", "nwpu-vhr10", "--max-images", "3", "--calib"])
        .arg(scenes)
        .arg("--out")
        .arg(&plan)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(summary["calibration_images"], 3);
    let error = summary["output_rel_rms"].as_f64().unwrap();
    assert!(error > 0.0 && error < 0.1, "relative RMS error {error}");
    let backend = kestrel_plan::cpu::Int8Cpu::from_bytes(&std::fs::read(&plan).unwrap()).unwrap();
    assert_eq!(backend.program().header().name, "nwpu-vhr10");
    assert_eq!(backend.output_len(), 14 * 128 * 128);
}
