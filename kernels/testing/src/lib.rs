//! Test support for Kestrel's kernels and executors, used only by tests and benchmarks (never by
//! a flight build): reproducible random draws, and with `conformance` random one-op plans whose
//! expected arenas the generic executor computes, to check the CUDA executor (on its CPU emulator
//! or a GPU) byte for byte.
#![deny(missing_docs)]

#[cfg(feature = "conformance")]
pub mod conformance;
mod rng;

pub use rng::Rng;
