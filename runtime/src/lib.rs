//! Kestrel's flight pipeline: frames, preprocessing, tiling, classification and health counters.
//!
//! The core is `no_std` without `alloc`: every buffer is supplied by the caller or sized by a
//! const generic, so a frame's trip through [`step::ClassifierStep`] allocates nothing. With the
//! `std` feature, [`threaded`] runs ingest, inference and output on their own threads over
//! bounded channels with an explicit drop policy.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(missing_docs)]
#![forbid(unsafe_code)]
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

// First, so that its macros are in scope in every module after it.
mod fmt;

pub mod classify;
pub mod detect;
#[cfg(feature = "std")]
pub mod failover;
#[cfg(feature = "std")]
pub mod faults;
pub mod frame;
pub mod health;
pub mod ledger;
pub mod pool;
pub mod preprocess;
pub mod step;
#[cfg(feature = "std")]
pub mod supervise;
#[cfg(feature = "std")]
pub mod switch;
#[cfg(feature = "std")]
pub mod threaded;
pub mod tile;
#[cfg(feature = "std")]
pub mod tmr;
#[cfg(feature = "std")]
pub mod waits;

pub use kestrel_backend::{Backend, BackendError, PreprocessSpec, ResizeRule};
pub use kestrel_hal::{Frame, FrameGeometry, FrameMeta, FrameSource, MonotonicClock};
