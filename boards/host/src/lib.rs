//! Board support for desktops and hardware-in-the-loop hosts.
//!
//! Image files (JPEG, PNG) and folders of them become frame sources, and scene-sized ones (TIFF
//! too) are read a band of rows at a time ([`scene`]); so does a frame link over a
//! byte stream (TCP for hardware in the loop), whose sending side is here too. The host clock is
//! `std::time::Instant`. Every failure names the file and the reason on one line.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod frame_link;
pub mod fuzzing;
pub mod image_file;
pub mod scene;

pub use image_file::{
    decode_image, decode_image_bytes, decode_image_bytes_within, decode_image_within, DecodedImage,
    FolderSource, ImageError,
};
pub use scene::{image_size, ScanOptions, SceneReader, SceneStrip};

use std::time::Instant;

use kestrel_hal::MonotonicClock;

/// Microseconds since the clock was made, from the OS monotonic clock.
#[derive(Clone, Copy, Debug)]
pub struct HostClock {
    origin: Instant,
}

impl Default for HostClock {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl MonotonicClock for HostClock {
    fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }
}
