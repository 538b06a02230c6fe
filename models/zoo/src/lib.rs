//! Kestrel's model zoo as data, for a flight binary to embed: each built-in model's compiled
//! int8 plan, 16-byte aligned so `kestrel_plan::program::Program::new` reads it in place, and its
//! `manifest.json` as text (provenance: dataset, split, training command, accuracy). A plan
//! states everything a board needs to run it (labels, preprocessing, a detector's
//! postprocessing), so nothing here needs parsing. With the `onnx` feature, the ONNX models too.
//!
//! The repository's README describes the models, their training and their accuracy; the compiler
//! that makes the plans is the `models` crate.
#![no_std]
#![deny(missing_docs)]
// Flight code returns typed errors; it never panics on any input (tests may).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]
#![forbid(unsafe_code)]

/// Bytes on a 16-byte boundary.
#[repr(C, align(16))]
struct Aligned<B: ?Sized>(B);

/// One built-in model.
#[derive(Clone, Copy, Debug)]
pub struct ZooEntry {
    /// Zoo name, e.g. `eurosat-rgb`.
    pub name: &'static str,
    /// `manifest.json`.
    pub manifest: &'static str,
    /// `model.plan`, starting on a 16-byte boundary.
    pub plan: &'static [u8],
    /// `model.onnx`.
    #[cfg(feature = "onnx")]
    pub onnx: &'static [u8],
}

static EUROSAT_RGB_PLAN: &Aligned<[u8]> = &Aligned(*include_bytes!("../eurosat-rgb/model.plan"));
static NWPU_VHR10_PLAN: &Aligned<[u8]> = &Aligned(*include_bytes!("../nwpu-vhr10/model.plan"));

/// The EuroSAT RGB land-cover classifier (10 classes, 64x64 chips).
pub const EUROSAT_RGB: ZooEntry = ZooEntry {
    name: "eurosat-rgb",
    manifest: include_str!("../eurosat-rgb/manifest.json"),
    plan: &EUROSAT_RGB_PLAN.0,
    #[cfg(feature = "onnx")]
    onnx: include_bytes!("../eurosat-rgb/model.onnx"),
};

/// The NWPU VHR-10 object detector (10 classes, 512x512 tiles).
pub const NWPU_VHR10: ZooEntry = ZooEntry {
    name: "nwpu-vhr10",
    manifest: include_str!("../nwpu-vhr10/manifest.json"),
    plan: &NWPU_VHR10_PLAN.0,
    #[cfg(feature = "onnx")]
    onnx: include_bytes!("../nwpu-vhr10/model.onnx"),
};

/// Every built-in model.
pub const ALL: [ZooEntry; 2] = [EUROSAT_RGB, NWPU_VHR10];

/// The built-in model called `name`.
pub fn find(name: &str) -> Option<ZooEntry> {
    ALL.into_iter().find(|entry| entry.name == name)
}

#[cfg(test)]
mod tests {
    #[test]
    fn plans_are_aligned_and_named() {
        for entry in super::ALL {
            assert_eq!(entry.plan.as_ptr() as usize % 16, 0, "{}", entry.name);
            assert_eq!(
                entry.plan.get(..8),
                Some(&b"KSTRLPLN"[..]),
                "{}",
                entry.name
            );
            assert!(entry.manifest.contains(entry.name));
            assert_eq!(super::find(entry.name).map(|e| e.name), Some(entry.name));
        }
        assert!(super::find("nonexistent").is_none());
    }
}
