//! A fixed-capacity frame pool: `SLOTS` buffers of `CAP` samples each, handed out by index.
//!
//! Sized at compile time so it can live in a `static` on a microcontroller; acquiring and
//! releasing never allocates. An exhausted pool is an error the caller counts, not a wait.

use kestrel_hal::{Frame, FrameSource};

use crate::frame::{FrameError, FrameView, Sample};
use crate::FrameGeometry;

/// Index of a slot in a [`FramePool`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SlotId(usize);

/// Why a pool operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PoolError {
    /// Every slot is in use.
    Exhausted,
    /// The slot is not currently acquired (released twice, or from another pool).
    NotAcquired,
    /// The slot holds no frame yet.
    NoFrame,
    /// The frame does not fit a slot.
    Frame(FrameError),
}

impl core::fmt::Display for PoolError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Exhausted => f.write_str("frame pool exhausted"),
            Self::NotAcquired => f.write_str("frame slot is not acquired"),
            Self::NoFrame => f.write_str("frame slot holds no frame"),
            Self::Frame(e) => write!(f, "{e}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for PoolError {}

/// Why [`FramePool::fill`] failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillError<E> {
    /// The source could not deliver this frame; it has moved on to the next.
    Source(E),
    /// The slot was not acquired, or the frame does not fit it.
    Pool(PoolError),
}

/// `SLOTS` frame buffers of `CAP` samples.
pub struct FramePool<S, const CAP: usize, const SLOTS: usize> {
    buffers: [[S; CAP]; SLOTS],
    frames: [Option<FrameGeometry>; SLOTS],
    acquired: [bool; SLOTS],
}

impl<S: Sample, const CAP: usize, const SLOTS: usize> Default for FramePool<S, CAP, SLOTS> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Sample, const CAP: usize, const SLOTS: usize> FramePool<S, CAP, SLOTS> {
    /// An empty pool; `const` so it can initialise a `static`.
    pub const fn new() -> Self {
        Self {
            buffers: [[S::ZERO; CAP]; SLOTS],
            frames: [None; SLOTS],
            acquired: [false; SLOTS],
        }
    }

    /// Slots not acquired.
    pub fn free(&self) -> usize {
        self.acquired.iter().filter(|a| !**a).count()
    }

    /// Take a free slot.
    pub fn acquire(&mut self) -> Result<SlotId, PoolError> {
        let (index, acquired) = self
            .acquired
            .iter_mut()
            .enumerate()
            .find(|(_, a)| !**a)
            .ok_or(PoolError::Exhausted)?;
        *acquired = true;
        *self.frame_mut(index)? = None;
        Ok(SlotId(index))
    }

    /// Give a slot back.
    pub fn release(&mut self, slot: SlotId) -> Result<(), PoolError> {
        let acquired = self
            .acquired
            .get_mut(slot.0)
            .ok_or(PoolError::NotAcquired)?;
        if !*acquired {
            return Err(PoolError::NotAcquired);
        }
        *acquired = false;
        Ok(())
    }

    /// Fill an acquired slot from `source`: the frame's geometry and metadata; `Ok(None)` at
    /// the end of the stream.
    pub fn fill<Src: FrameSource<S>>(
        &mut self,
        slot: SlotId,
        source: &mut Src,
    ) -> Result<Option<Frame>, FillError<Src::Error>> {
        self.check(slot).map_err(FillError::Pool)?;
        *self.frame_mut(slot.0).map_err(FillError::Pool)? = None;
        let buffer = self
            .buffers
            .get_mut(slot.0)
            .ok_or(FillError::Pool(PoolError::NotAcquired))?;
        let frame = match source.next_frame(buffer).map_err(FillError::Source)? {
            Some(frame) => frame,
            None => return Ok(None),
        };
        FrameView::new(frame.geometry, buffer).map_err(|e| FillError::Pool(PoolError::Frame(e)))?;
        *self.frame_mut(slot.0).map_err(FillError::Pool)? = Some(frame.geometry);
        Ok(Some(frame))
    }

    /// The frame in an acquired, filled slot.
    pub fn view(&self, slot: SlotId) -> Result<FrameView<'_, S>, PoolError> {
        self.check(slot)?;
        let geometry = self
            .frames
            .get(slot.0)
            .copied()
            .flatten()
            .ok_or(PoolError::NoFrame)?;
        let buffer = self.buffers.get(slot.0).ok_or(PoolError::NotAcquired)?;
        FrameView::new(geometry, buffer).map_err(PoolError::Frame)
    }

    /// The frame record of slot `index` (every slot has one).
    fn frame_mut(&mut self, index: usize) -> Result<&mut Option<FrameGeometry>, PoolError> {
        self.frames.get_mut(index).ok_or(PoolError::NotAcquired)
    }

    fn check(&self, slot: SlotId) -> Result<(), PoolError> {
        match self.acquired.get(slot.0) {
            Some(true) => Ok(()),
            _ => Err(PoolError::NotAcquired),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Delivers `frames` 2x1 single-band frames whose samples are the frame number.
    struct Counter {
        next: u8,
        frames: u8,
    }

    impl FrameSource<u8> for Counter {
        type Error = ();
        fn next_frame(&mut self, buffer: &mut [u8]) -> Result<Option<Frame>, ()> {
            if self.next == self.frames {
                return Ok(None);
            }
            buffer[..2].fill(self.next);
            self.next += 1;
            Ok(Some(Frame {
                geometry: FrameGeometry {
                    width: 2,
                    height: 1,
                    bands: 1,
                },
                meta: kestrel_hal::FrameMeta::default(),
            }))
        }
    }

    #[test]
    fn acquire_fill_release_cycle() {
        let mut pool: FramePool<u8, 4, 2> = FramePool::new();
        let mut source = Counter { next: 0, frames: 3 };
        let a = pool.acquire().unwrap();
        let b = pool.acquire().unwrap();
        assert_eq!(pool.acquire(), Err(PoolError::Exhausted));
        assert_eq!(pool.view(a).unwrap_err(), PoolError::NoFrame);
        pool.fill(a, &mut source).unwrap();
        pool.fill(b, &mut source).unwrap();
        assert_eq!(pool.view(a).unwrap().samples(), &[0, 0]);
        assert_eq!(pool.view(b).unwrap().samples(), &[1, 1]);
        pool.release(a).unwrap();
        assert_eq!(pool.release(a), Err(PoolError::NotAcquired));
        assert_eq!(pool.view(a).unwrap_err(), PoolError::NotAcquired);
        assert_eq!(pool.free(), 1);
        let c = pool.acquire().unwrap();
        assert_eq!(
            pool.fill(c, &mut source).unwrap().map(|f| f.geometry.width),
            Some(2)
        );
        assert_eq!(pool.fill(c, &mut source), Ok(None));
        assert_eq!(pool.release(SlotId(7)), Err(PoolError::NotAcquired));
    }
}
