//! The pixels and model inputs Kestrel makes from a JPEG are the ones the training scripts made,
//! byte for byte and bit for bit: `tests/data/training_pixels/`, made with PIL (libjpeg-turbo)
//! and numpy by its `make_fixture.py`.

use std::path::{Path, PathBuf};

use kestrel_host::decode_image;
use kestrel_tests::whole_image_input;
use models::ZooModel;
use sha2::{Digest, Sha256};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture() -> serde_json::Value {
    let text = std::fs::read_to_string(root().join("tests/data/training_pixels/pil_decoded.json"))
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every committed sample JPEG (the 300 EuroSAT chips and the 7 NWPU scenes) decodes to the
/// samples PIL decodes it to.
#[test]
fn every_sample_jpeg_decodes_to_the_pixels_pil_gives() {
    let fixture = fixture();
    let images = fixture["images"].as_object().unwrap();
    assert_eq!(images.len(), 307, "the fixture covers every sample JPEG");
    let mut differing = Vec::new();
    for (path, expected) in images {
        let image = decode_image(&root().join(path)).unwrap();
        let g = image.geometry;
        assert_eq!(expected["mode"], "RGB", "{path}: colour JPEGs only");
        assert_eq!(
            (u64::from(g.width), u64::from(g.height), g.bands),
            (
                expected["width"].as_u64().unwrap(),
                expected["height"].as_u64().unwrap(),
                3
            ),
            "{path}"
        );
        let digest: String = Sha256::digest(&image.samples)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if digest != expected["rgb_sha256"] {
            differing.push(path.clone());
        }
    }
    assert!(
        differing.is_empty(),
        "{} of {} JPEGs decode to other pixels than PIL {} (libjpeg-turbo {}) gave: {:?}",
        differing.len(),
        images.len(),
        fixture["pillow"],
        fixture["libjpeg_turbo"],
        &differing[..differing.len().min(5)]
    );
}

/// The EuroSAT model's input for a chip equals the training script's `(x - mean) / std` of the
/// same PIL pixels, bit for bit.
#[test]
fn the_model_input_is_the_training_scripts_bit_for_bit() {
    let bytes =
        std::fs::read(root().join("tests/data/training_pixels/River_105.normalised.f32")).unwrap();
    let expected: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let spec = ZooModel::load("eurosat-rgb")
        .unwrap()
        .preprocess_spec()
        .unwrap();
    let chip = root().join("sim/sample/eurosat-rgb/River/River_105.jpg");
    let input = whole_image_input(&chip, &spec);
    assert_eq!(input.len(), expected.len());
    let differing = input
        .iter()
        .zip(&expected)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differing, 0, "of {} input values", input.len());
}
