//! Kestrel's hardware boundary: the traits a board implements so that the flight pipeline never
//! names a board. `no_std`, no allocation.
#![no_std]
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

/// Size and band count of one frame, with samples stored band-interleaved by pixel (HWC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FrameGeometry {
    /// Pixels per row.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Samples per pixel (3 for RGB, 13 for Sentinel-2 L1C).
    pub bands: u16,
}

impl FrameGeometry {
    /// Number of samples in the frame, or `None` if it does not fit in `usize`.
    pub fn sample_count(&self) -> Option<usize> {
        (self.width as usize)
            .checked_mul(self.height as usize)?
            .checked_mul(self.bands as usize)
    }
}

/// A sensor, file reader or link that delivers frames into a caller-owned buffer.
pub trait FrameSource<S> {
    /// Why one frame could not be delivered. The source has moved past that frame, so the
    /// caller counts the error and asks for the next one.
    type Error;

    /// Write the next frame's samples into `buffer` and return its geometry, or `Ok(None)` at the
    /// end of the stream. The samples occupy `buffer[..geometry.sample_count()]`.
    fn next_frame(&mut self, buffer: &mut [S]) -> Result<Option<FrameGeometry>, Self::Error>;
}

/// A monotonic microsecond clock for latency accounting and pacing.
pub trait MonotonicClock {
    /// Microseconds since an arbitrary fixed origin; never goes backwards.
    fn now_us(&self) -> u64;
}
