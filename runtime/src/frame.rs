//! Frames: N-band images of u8 or u16 samples, band-interleaved by pixel (HWC).

use crate::FrameGeometry;

/// A sample type a sensor delivers.
pub trait Sample: Copy + Send + Sync + 'static {
    /// The zero sample, for initialising buffers.
    const ZERO: Self;
    /// The largest magnitude a sample can have as a float; infinite where any float can be
    /// (then preprocessing checks every value it makes for NaN and infinity).
    const MAX_MAGNITUDE: f32;
    /// The sample as a float in its raw units.
    fn to_f32(self) -> f32;
}

impl Sample for u8 {
    const ZERO: Self = 0;
    const MAX_MAGNITUDE: f32 = 255.0;
    #[inline]
    fn to_f32(self) -> f32 {
        f32::from(self)
    }
}

/// Float samples: a calibrated product (radiance, reflectance) rather than raw counts.
impl Sample for f32 {
    const ZERO: Self = 0.0;
    const MAX_MAGNITUDE: f32 = f32::INFINITY;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
}

impl Sample for u16 {
    const ZERO: Self = 0;
    const MAX_MAGNITUDE: f32 = 65535.0;
    #[inline]
    fn to_f32(self) -> f32 {
        f32::from(self)
    }
}

/// Why samples and a geometry do not make a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FrameError {
    /// Width, height or band count is zero.
    Empty,
    /// The frame needs more samples than the buffer holds.
    TooLarge {
        /// Samples the geometry needs (saturated at `usize::MAX`).
        needed: usize,
        /// Samples the buffer holds.
        capacity: usize,
    },
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Empty => f.write_str("frame has a zero width, height or band count"),
            Self::TooLarge { needed, capacity } => {
                write!(
                    f,
                    "frame needs {needed} samples, the buffer holds {capacity}"
                )
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for FrameError {}

/// A borrowed, validated frame: `geometry.sample_count()` samples, HWC order.
#[derive(Clone, Copy, Debug)]
pub struct FrameView<'a, S> {
    geometry: FrameGeometry,
    samples: &'a [S],
}

impl<'a, S: Sample> FrameView<'a, S> {
    /// A view of the first `geometry.sample_count()` samples of `buffer`.
    pub fn new(geometry: FrameGeometry, buffer: &'a [S]) -> Result<Self, FrameError> {
        if geometry.width == 0 || geometry.height == 0 || geometry.bands == 0 {
            return Err(FrameError::Empty);
        }
        let needed = geometry.sample_count().unwrap_or(usize::MAX);
        let samples = buffer.get(..needed).ok_or(FrameError::TooLarge {
            needed,
            capacity: buffer.len(),
        })?;
        Ok(Self { geometry, samples })
    }

    /// Size and band count.
    pub fn geometry(&self) -> FrameGeometry {
        self.geometry
    }

    /// All samples, HWC.
    pub fn samples(&self) -> &'a [S] {
        self.samples
    }

    /// The sample at column `x`, row `y`, `band`, or `None` outside the frame.
    #[inline]
    pub fn get(&self, x: usize, y: usize, band: usize) -> Option<S> {
        let g = self.geometry;
        if x >= g.width as usize || y >= g.height as usize || band >= g.bands as usize {
            return None;
        }
        let bands = g.bands as usize;
        self.samples
            .get((y * g.width as usize + x) * bands + band)
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry(width: u32, height: u32, bands: u16) -> FrameGeometry {
        FrameGeometry {
            width,
            height,
            bands,
        }
    }

    #[test]
    fn view_checks_length_and_indexes_hwc() {
        let buffer: [u16; 12] = core::array::from_fn(|i| i as u16);
        assert_eq!(
            FrameView::new(geometry(0, 2, 3), &buffer).unwrap_err(),
            FrameError::Empty
        );
        assert_eq!(
            FrameView::new(geometry(3, 2, 3), &buffer).unwrap_err(),
            FrameError::TooLarge {
                needed: 18,
                capacity: 12
            }
        );
        assert_eq!(
            FrameView::new(geometry(u32::MAX, u32::MAX, 16), &buffer).unwrap_err(),
            FrameError::TooLarge {
                needed: usize::MAX,
                capacity: 12
            }
        );
        let view = FrameView::new(geometry(2, 2, 3), &buffer).unwrap();
        assert_eq!(view.get(1, 1, 2), Some(11));
        assert_eq!(view.get(0, 1, 0), Some(6));
        assert_eq!(view.get(2, 0, 0), None);
        assert_eq!(view.get(0, 0, 3), None);
    }
}
