//! Kestrel's evaluation tools, for `sim`, the compiler and the tests (never flight code):
//! - [`coco`]: COCO-style mAP of detections against ground truth (checked against pycocotools),
//!   and the COCO annotation loader;
//! - [`dataset`]: the deterministic train/validation split every training script and evaluation
//!   shares, and labelled chip folders.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod coco;
pub mod dataset;

pub use dataset::{DatasetError, LabelledImage, Split};
