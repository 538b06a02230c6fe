//! Kestrel's int8 kernels.
//!
//! [`int8`] holds the generic reference kernels (the oracle every faster kernel must equal bit for
//! bit) and [`quant`] the fixed-point requantisation; both are `no_std` without `alloc`. [`Kernels`]
//! is the set of kernels a program's steps run on. With `std`, `table::KernelTable` is the
//! host's set: generic entries, overwritten after CPU feature detection by the AVX2 (x86-64) and
//! NEON (aarch64) plug-ins.
#![cfg_attr(not(feature = "std"), no_std)]
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

// The SIMD kernels (hosts only, behind `std`) index packed buffers whose sizes they computed at
// setup, and fall back to the generic kernel for any layer whose buffers do not match; their
// property tests (`odd_geometry_never_panics`, bit-for-bit checks) stand in for the lints.
#[cfg(all(feature = "std", target_arch = "x86_64"))]
#[allow(clippy::indexing_slicing)]
pub mod avx2;
pub mod int16;
pub mod int8;
mod kernels;
#[cfg(all(feature = "std", target_arch = "aarch64"))]
#[allow(clippy::indexing_slicing)]
pub mod neon;
pub mod quant;
#[cfg(feature = "std")]
#[allow(clippy::indexing_slicing)]
mod strips;
#[cfg(feature = "std")]
pub mod table;

pub use kernels::{Kernels, Reference};

/// Quantise float inputs to int8 codes (`x * inverse` rounded half away from zero, offset by
/// `zero_point`, clamped, NaN to `zero_point as i8`) with this CPU's vectors, as the plan's
/// scalar quantiser does: how many leading values it wrote (none where the CPU has no vector
/// quantiser); the caller quantises the rest.
#[cfg(feature = "std")]
pub fn quantize_input(input: &[f32], codes: &mut [i8], inverse: f32, zero_point: i32) -> usize {
    #[cfg(target_arch = "x86_64")]
    return avx2::quantize_input(input, codes, inverse, zero_point);
    #[cfg(target_arch = "aarch64")]
    return neon::quantize_input(input, codes, inverse, zero_point);
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (input, codes, inverse, zero_point);
        0
    }
}
