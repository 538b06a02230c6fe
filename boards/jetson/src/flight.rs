//! The flight loop: frames from a source through the pipeline, each result down the downlink
//! as telemetry (with crops of what a detector found), health when it is due. `kestrel-flight`
//! runs it; the allocation test runs it too, to show that its steady state allocates nothing.

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kestrel_backend::Backend;
use kestrel_hal::{FrameSource, MonotonicClock};
use kestrel_payload::downlink::{rgb_image, Downlink};
use kestrel_runtime::detect::Detections;
use kestrel_runtime::frame::{FrameView, Sample};
use kestrel_runtime::health::Health;
use kestrel_runtime::step::{ClassifierStep, DetectorStep, FrameStep, StepError};
use kestrel_runtime::threaded::{
    run_pipeline, run_pipeline_with_frames, FrameFailure, Outcome, PipelineConfig,
};

/// Detections kept per tile, and per frame after merging.
pub const TILE_CAP: usize = 128;
/// Detections kept per frame after merging.
pub const FRAME_CAP: usize = 1024;

/// The stages of the pipeline, each checking in while it works on a frame: a stage busy on one
/// frame for longer than the stall limit is stalled (a hung backend the supervisor could not
/// restart, a link that takes no bytes, a sensor driver stuck in a call), and the watchdogs
/// are then no longer fed. Waiting for work is not a stall: the inference and output stages
/// wait on queues outside their watch, and ingest may wait up to the source's own timeout for a
/// sensor with nothing to send (`ingest_wait`) on top of the limit; a spool's wait for files
/// is outside the watch.
#[derive(Debug)]
pub struct Stages {
    started: Instant,
    /// When each stage took its current frame, microseconds after `started` plus 1; 0 idle.
    busy_since: [AtomicU64; 3],
    ingest_wait: Duration,
}

/// The stages [`Stages`] watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Preprocessing, the model, postprocessing.
    Inference = 0,
    /// Telemetry: the downlink queue and the link.
    Output = 1,
    /// Taking the next frame from the source (a camera, a frame link, a spool's file).
    Ingest = 2,
}

impl Stage {
    /// Its name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Inference => "inference",
            Self::Output => "output",
            Self::Ingest => "ingest",
        }
    }
}

impl Default for Stages {
    fn default() -> Self {
        Self::new(Duration::ZERO)
    }
}

impl Stages {
    /// Stages whose ingest may wait `ingest_wait` for a quiet sensor beyond the stall limit.
    pub fn new(ingest_wait: Duration) -> Self {
        Self {
            started: Instant::now(),
            busy_since: [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)],
            ingest_wait,
        }
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_micros() as u64 + 1
    }

    /// Run `work` as `stage` busy on a frame.
    pub fn busy<R>(&self, stage: Stage, work: impl FnOnce() -> R) -> R {
        let slot = &self.busy_since[stage as usize];
        slot.store(self.now(), Ordering::Relaxed);
        let result = work();
        slot.store(0, Ordering::Relaxed);
        result
    }

    /// The first stage busy on one frame for longer than `limit` (ingest: `limit` and its
    /// wait), and for how long.
    pub fn stalled(&self, limit: Duration) -> Option<(Stage, Duration)> {
        let now = self.now();
        [Stage::Inference, Stage::Output, Stage::Ingest]
            .into_iter()
            .find_map(|stage| {
                let since = self.busy_since[stage as usize].load(Ordering::Relaxed);
                let busy = Duration::from_micros(now.saturating_sub(since));
                let limit = match stage {
                    Stage::Ingest => limit + self.ingest_wait,
                    Stage::Inference | Stage::Output => limit,
                };
                (since != 0 && busy > limit).then_some((stage, busy))
            })
    }
}

/// A step whose frames are watched as the inference stage.
pub struct Watched<'s, St> {
    step: St,
    stages: &'s Stages,
}

impl<'s, St> Watched<'s, St> {
    /// `step`, checking in with `stages`.
    pub fn new(step: St, stages: &'s Stages) -> Self {
        Self { step, stages }
    }
}

impl<Out, St: FrameStep<Out>> FrameStep<Out> for Watched<'_, St> {
    fn process_frame<S: Sample>(
        &mut self,
        frame: FrameView<'_, S>,
        clock: &impl MonotonicClock,
        health: &mut Health,
    ) -> Result<(Out, u64), StepError> {
        let step = &mut self.step;
        self.stages.busy(Stage::Inference, || {
            step.process_frame(frame, clock, health)
        })
    }

    fn backend(&mut self) -> Option<&mut dyn kestrel_backend::Backend> {
        self.step.backend()
    }
}

/// Classify every frame of `source`, sending each result down `downlink`; the pipeline's
/// health when the source ends. Inference and output check in with `stages`.
pub fn classify<Src, B>(
    source: Src,
    step: ClassifierStep<'_, B>,
    clock: &(impl MonotonicClock + Sync),
    pipeline: PipelineConfig,
    downlink: &mut Downlink,
    tally: &mut Tally,
    stages: &Stages,
) -> Health
where
    Src: FrameSource<u8> + Send,
    Src::Error: Display + Send,
    B: Backend + Send,
{
    let step = Watched::new(step, stages);
    run_pipeline(source, step, clock, pipeline, |o| {
        stages.busy(Stage::Output, || match tally.take(downlink, o) {
            Some((sequence, c, false)) => downlink.classification(sequence, 0, &c),
            // Run again after a scrub restored the model: sent again, not a new result.
            Some((sequence, c, true)) => downlink.correction(sequence, &c),
            None => {}
        })
    })
}

/// Detect in every frame of `source`, sending each frame's boxes down `downlink` with a crop
/// of each cut from the frame (products allocate; a frame with nothing found does not); the
/// pipeline's health when the source ends. Inference and output check in with `stages`.
pub fn detect<Src, B>(
    source: Src,
    step: DetectorStep<'_, B, TILE_CAP>,
    clock: &(impl MonotonicClock + Sync),
    pipeline: PipelineConfig,
    downlink: &mut Downlink,
    tally: &mut Tally,
    stages: &Stages,
) -> Health
where
    Src: FrameSource<u8> + Send,
    Src::Error: Display + Send,
    B: Backend + Send,
{
    let step = Watched::new(step, stages);
    run_pipeline_with_frames(source, step, clock, pipeline, |o, frame| {
        stages.busy(Stage::Output, || {
            let Some((sequence, found, rerun)) = tally.take(downlink, o) else {
                return;
            };
            let found: Detections<FRAME_CAP> = found;
            if rerun {
                downlink.detections_correction(sequence, found.as_slice());
                return;
            }
            let picture = frame
                .filter(|_| !found.as_slice().is_empty() && !downlink.args().no_products)
                .map(|f| {
                    let g = f.geometry();
                    rgb_image(f.samples(), g.width, g.height, g.bands)
                });
            downlink.detections(sequence, found.as_slice(), picture.as_ref());
        })
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
    /// match results to the frames it sent, and whether it is a re-run's (a correction).
    fn take<E: Display, T>(
        &mut self,
        downlink: &mut Downlink,
        o: Outcome<E, T>,
    ) -> Option<(u64, T, bool)> {
        let sequence = o.meta.map_or(o.sequence, |m| m.sequence);
        if o.rerun {
            return o.result.ok().map(|result| (sequence, result, true));
        }
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
                Some((sequence, result, false))
            }
            Err(e) => {
                downlink.frame_failed(&e);
                if !matches!(e, FrameFailure::Dropped) {
                    log::warn!("frame {}: {e}", o.sequence);
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use kestrel_hal::FrameGeometry;

    /// A step that takes `each` per frame.
    struct Slow {
        each: Duration,
    }

    impl FrameStep<()> for Slow {
        fn process_frame<S: Sample>(
            &mut self,
            _frame: FrameView<'_, S>,
            _clock: &impl MonotonicClock,
            _health: &mut Health,
        ) -> Result<((), u64), StepError> {
            std::thread::sleep(self.each);
            Ok(((), 0))
        }
    }

    #[test]
    fn a_stage_stuck_on_a_frame_is_stalled_and_an_idle_one_is_not() {
        let stages = Stages::default();
        assert_eq!(stages.stalled(Duration::ZERO), None, "idle");
        let geometry = FrameGeometry {
            width: 1,
            height: 1,
            bands: 1,
        };
        let samples = [0u8];
        let frame = FrameView::new(geometry, &samples).unwrap();
        let mut step = Watched::new(
            Slow {
                each: Duration::from_millis(300),
            },
            &stages,
        );
        std::thread::scope(|scope| {
            let watcher = scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(150));
                stages.stalled(Duration::from_millis(100))
            });
            let clock = kestrel_host::HostClock::default();
            step.process_frame(frame, &clock, &mut Health::default())
                .unwrap();
            let (stage, busy) = watcher.join().unwrap().expect("stalled mid-frame");
            assert_eq!(stage, Stage::Inference);
            assert!(busy >= Duration::from_millis(100), "{busy:?}");
        });
        assert_eq!(stages.stalled(Duration::ZERO), None, "done with the frame");
        let output = stages.busy(Stage::Output, || {
            std::thread::sleep(Duration::from_millis(20));
            stages.stalled(Duration::from_millis(10)).map(|(s, _)| s)
        });
        assert_eq!(output, Some(Stage::Output));

        // Ingest is allowed the sensor's own wait on top of the limit.
        let stages = Stages::new(Duration::from_millis(50));
        let ingest = |limit| {
            stages.busy(Stage::Ingest, || {
                std::thread::sleep(Duration::from_millis(30));
                stages.stalled(limit).map(|(s, _)| s)
            })
        };
        assert_eq!(ingest(Duration::from_millis(10)), None, "within its wait");
        assert_eq!(ingest(Duration::ZERO), None, "within its wait");
        let stages = Stages::new(Duration::from_millis(10));
        let stuck = stages.busy(Stage::Ingest, || {
            std::thread::sleep(Duration::from_millis(30));
            stages.stalled(Duration::from_millis(5)).map(|(s, _)| s)
        });
        assert_eq!(stuck, Some(Stage::Ingest));
    }
}
