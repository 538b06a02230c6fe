//! Kestrel's compiled int8 plan and its executor.
//!
//! - [`plan`]: the container, a versioned file of CRC-protected sections whose header says
//!   everything a board needs (labels, preprocessing, a detector's postprocessing).
//! - [`program`]: the verified op list, run step by step over an arena the caller owns.
//! - [`session`]: a program, an arena and kernels behind the `Backend` contract, with no `std`
//!   or heap: what a microcontroller runs.
//!
//! With `alloc`: the plan writer and [`program::OwnedProgram`] (a plan copied to an aligned
//! buffer). With `std`: [`cpu::Int8Cpu`], the host backend running the CPU's kernel table.
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

#[cfg(feature = "alloc")]
extern crate alloc;

#[cfg(feature = "std")]
pub mod cpu;
#[cfg(feature = "std")]
pub mod fuzzing;
pub mod plan;
pub mod program;
pub mod session;
