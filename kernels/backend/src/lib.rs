//! Kestrel's backend contract: one trait, [`Backend`], runs a model on an input tensor into a
//! caller-owned output buffer, and [`spec`] describes what a model expects (shapes,
//! preprocessing) so that the runtime can prepare inputs without knowing which backend runs them.
//! `no_std`, no `alloc`, no dependencies: every executor (the int8 plan, CUDA, tract) and the
//! runtime build on it.
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
#![forbid(unsafe_code)]

pub mod spec;

pub use spec::{PreprocessSpec, ResizeRule, SpecError, MAX_BANDS};

/// Why one inference failed. Small and `Copy` so it can be counted and reported in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BackendError {
    /// The input buffer does not hold `expected` values.
    InputLength {
        /// Values the model takes.
        expected: usize,
        /// Values supplied.
        got: usize,
    },
    /// The output buffer does not hold `expected` values.
    OutputLength {
        /// Values the model produces.
        expected: usize,
        /// Room supplied.
        got: usize,
    },
    /// The backend itself failed while running (details were logged by the backend).
    Execution,
    /// This backend cannot run on this machine (feature off, no driver, no device).
    NotAvailable,
    /// The device ran out of memory.
    OutOfMemory,
    /// A kernel launch failed; the device may still work.
    LaunchFailed,
    /// The device is gone or in a state nothing more runs in until it is reset (an illegal
    /// address, an uncorrectable ECC error, a fallen-off bus).
    DeviceLost,
    /// The backend did not answer within its deadline (a hung kernel or driver call): it was
    /// abandoned and is being restarted.
    Hung,
}

impl BackendError {
    /// A fault of the backend or its device, not of the input: the same frame may succeed on
    /// another backend, which is what failover does with it.
    pub fn is_device_fault(&self) -> bool {
        matches!(
            self,
            Self::Execution
                | Self::NotAvailable
                | Self::OutOfMemory
                | Self::LaunchFailed
                | Self::DeviceLost
                | Self::Hung
        )
    }
}

impl core::fmt::Display for BackendError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::InputLength { expected, got } => {
                write!(f, "input has {got} values, the model takes {expected}")
            }
            Self::OutputLength { expected, got } => {
                write!(
                    f,
                    "output buffer has room for {got} values, the model produces {expected}"
                )
            }
            Self::Execution => f.write_str("the backend failed while running the model"),
            Self::NotAvailable => f.write_str("this backend is not available on this machine"),
            Self::OutOfMemory => f.write_str("the device ran out of memory"),
            Self::LaunchFailed => f.write_str("a kernel launch failed"),
            Self::DeviceLost => f.write_str("the device was lost"),
            Self::Hung => f.write_str("the backend did not answer within its deadline"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for BackendError {}

/// What a scrub of a loaded model's memory found ([`Backend::scrub`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Scrub {
    /// Every checksummed byte matches what was loaded.
    Clean,
    /// A checksum fails: the model in memory is not the one loaded, and its results since the
    /// last clean scrub are suspect.
    Corrupt,
    /// This backend keeps nothing it can check (tract's float graph, a device's memory).
    Uncovered,
}

/// Where an injected upset landed ([`Backend::upset`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Landed {
    /// This backend has no such memory; nothing changed.
    Missed,
    /// In memory a scrub checks.
    Checked,
    /// In memory no scrub checks: padding nothing reads, or activations.
    Unchecked,
}

/// Where an injected single-event upset lands ([`Backend::upset`]): fault injection only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Upset {
    /// Flip bit `bit` (modulo its size in bits) of the loaded model: its weights, parameters,
    /// op list and tables, or the padding between them.
    Model {
        /// Which bit, counted from the first byte's lowest.
        bit: u64,
    },
    /// Flip a bit of the activations during the next inference, between two layers: `bit`
    /// picks the layer and the bit of its output (each modulo its size). Several before one
    /// inference all flip in it.
    Activations {
        /// Which layer and bit.
        bit: u64,
    },
}

/// Runs one model: a float input tensor in, a float output tensor out.
///
/// Implementations check buffer lengths and never panic on bad input.
pub trait Backend {
    /// Short name for reports, e.g. `"tract"`.
    fn name(&self) -> &'static str;
    /// Number of f32 values in one input tensor (the product of the input shape).
    fn input_len(&self) -> usize;
    /// Number of f32 values in one output tensor.
    fn output_len(&self) -> usize;
    /// Run the model on `input` and write the result into `output`.
    fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), BackendError>;

    /// Check the loaded model's memory against the checksums it was loaded with.
    fn scrub(&mut self) -> Scrub {
        Scrub::Uncovered
    }

    /// Reload the model from its golden copy, checked, after a failed scrub.
    fn restore(&mut self) -> Result<(), BackendError> {
        Err(BackendError::NotAvailable)
    }

    /// Fault injection: flip a bit as a radiation upset would, and say where it landed.
    fn upset(&mut self, upset: Upset) -> Landed {
        let _ = upset;
        Landed::Missed
    }

    /// Check that the buffers fit this model; for use at the top of [`Backend::run`].
    fn check_lengths(&self, input: &[f32], output: &[f32]) -> Result<(), BackendError> {
        if input.len() != self.input_len() {
            return Err(BackendError::InputLength {
                expected: self.input_len(),
                got: input.len(),
            });
        }
        if output.len() != self.output_len() {
            return Err(BackendError::OutputLength {
                expected: self.output_len(),
                got: output.len(),
            });
        }
        Ok(())
    }
}

#[cfg(feature = "std")]
impl<B: Backend + ?Sized> Backend for std::boxed::Box<B> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn input_len(&self) -> usize {
        (**self).input_len()
    }
    fn output_len(&self) -> usize {
        (**self).output_len()
    }
    fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), BackendError> {
        (**self).run(input, output)
    }
    fn scrub(&mut self) -> Scrub {
        (**self).scrub()
    }
    fn restore(&mut self) -> Result<(), BackendError> {
        (**self).restore()
    }
    fn upset(&mut self, upset: Upset) -> Landed {
        (**self).upset(upset)
    }
}

/// A borrowed backend, so a step can run a backend its caller keeps.
impl<B: Backend + ?Sized> Backend for &mut B {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn input_len(&self) -> usize {
        (**self).input_len()
    }
    fn output_len(&self) -> usize {
        (**self).output_len()
    }
    fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), BackendError> {
        (**self).run(input, output)
    }
    fn scrub(&mut self) -> Scrub {
        (**self).scrub()
    }
    fn restore(&mut self) -> Result<(), BackendError> {
        (**self).restore()
    }
    fn upset(&mut self, upset: Upset) -> Landed {
        (**self).upset(upset)
    }
}
