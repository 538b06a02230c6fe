//! The flight loop: frames from a source through the pipeline, each result down the downlink
//! as telemetry (with crops of what a detector found), health when it is due. `kestrel-flight`
//! runs it; the allocation test runs it too, to show that its steady state allocates nothing.

use std::fmt::Display;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kestrel_backend::Backend;
use kestrel_hal::{FrameSource, MonotonicClock};
use kestrel_payload::downlink::{rgb_image, Downlink};
use kestrel_runtime::detect::Detections;
use kestrel_runtime::health::Health;
use kestrel_runtime::step::{ClassifierStep, DetectorStep};
use kestrel_runtime::threaded::{
    run_pipeline, run_pipeline_with_frames, FrameFailure, Outcome, PipelineConfig,
};

/// Detections kept per tile, and per frame after merging.
pub const TILE_CAP: usize = 128;
/// Detections kept per frame after merging.
pub const FRAME_CAP: usize = 1024;

/// Classify every frame of `source`, sending each result down `downlink`; the pipeline's
/// health when the source ends.
pub fn classify<Src, B>(
    source: Src,
    step: ClassifierStep<'_, B>,
    clock: &(impl MonotonicClock + Sync),
    pipeline: PipelineConfig,
    downlink: &mut Downlink,
    tally: &mut Tally,
) -> Health
where
    Src: FrameSource<u8> + Send,
    Src::Error: Display + Send,
    B: Backend + Send,
{
    run_pipeline(source, step, clock, pipeline, |o| {
        if let Some((sequence, c)) = tally.take(downlink, o) {
            downlink.classification(sequence, 0, &c);
        }
    })
}

/// Detect in every frame of `source`, sending each frame's boxes down `downlink` with a crop
/// of each cut from the frame (products allocate; a frame with nothing found does not); the
/// pipeline's health when the source ends.
pub fn detect<Src, B>(
    source: Src,
    step: DetectorStep<'_, B, TILE_CAP>,
    clock: &(impl MonotonicClock + Sync),
    pipeline: PipelineConfig,
    downlink: &mut Downlink,
    tally: &mut Tally,
) -> Health
where
    Src: FrameSource<u8> + Send,
    Src::Error: Display + Send,
    B: Backend + Send,
{
    run_pipeline_with_frames(source, step, clock, pipeline, |o, frame| {
        if let Some((sequence, found)) = tally.take(downlink, o) {
            let found: Detections<FRAME_CAP> = found;
            let picture = frame
                .filter(|_| !found.as_slice().is_empty() && !downlink.args().no_products)
                .map(|f| {
                    let g = f.geometry();
                    rgb_image(f.samples(), g.width, g.height, g.bands)
                });
            downlink.detections(sequence, found.as_slice(), picture.as_ref());
        }
    })
}

/// Latencies kept for the health percentiles: the most recent frames', in a fixed window so
/// that a long flight's memory does not grow.
const LATENCY_WINDOW: usize = 4096;

/// What the run keeps of each outcome: recent latencies, and when health is next due.
pub struct Tally {
    latencies: Vec<u64>,
    next: usize,
    sorted: Vec<u64>,
    health_every: Duration,
    last_health: Instant,
}

impl Tally {
    pub fn new(health_every: Duration) -> Self {
        Self {
            latencies: Vec::with_capacity(LATENCY_WINDOW),
            next: 0,
            sorted: Vec::with_capacity(LATENCY_WINDOW),
            health_every,
            last_health: Instant::now(),
        }
    }

    /// Count `o`'s frame, ask for health when it is due, and hand back its result with the
    /// frame's own sequence number (the bench's, over a frame link), so that the ground can
    /// match results to the frames it sent.
    fn take<E: Display, T>(
        &mut self,
        downlink: &mut Downlink,
        o: Outcome<E, T>,
    ) -> Option<(u64, T)> {
        downlink.frame_in(o.frame_bytes);
        if !self.health_every.is_zero() && self.last_health.elapsed() >= self.health_every {
            downlink
                .controls()
                .health_now
                .store(true, Ordering::Relaxed);
            self.last_health = Instant::now();
        }
        match o.result {
            Ok(result) => {
                if self.latencies.len() < LATENCY_WINDOW {
                    self.latencies.push(o.latency_us);
                } else if let Some(slot) = self.latencies.get_mut(self.next) {
                    *slot = o.latency_us;
                }
                self.next = (self.next + 1) % LATENCY_WINDOW;
                Some((o.meta.map_or(o.sequence, |m| m.sequence), result))
            }
            Err(FrameFailure::Dropped) => None,
            Err(e) => {
                log::warn!("frame {}: {e}", o.sequence);
                None
            }
        }
    }

    /// The window's latencies, sorted.
    pub fn sorted_latencies(&mut self) -> &[u64] {
        self.sorted.clear();
        self.sorted.extend_from_slice(&self.latencies);
        self.sorted.sort_unstable();
        &self.sorted
    }
}
