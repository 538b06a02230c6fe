//! The threaded pipeline: ingest, inference (any [`FrameStep`]: a classifier or a detector) and
//! output on their own threads, joined by bounded crossbeam channels.
//!
//! Frame buffers are allocated once at start-up and recycled, so the steady state allocates
//! nothing in the runtime. When the inference queue is full the [`DropPolicy`] decides which
//! frame is lost; every dropped frame is counted and reported as an [`Outcome`], so each frame
//! that entered is accounted for.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use kestrel_backend::{BackendError, Scrub};

use crate::classify::Classification;
use crate::frame::{FrameError, FrameView, Sample};
use crate::health::{ErrorKind, Health};
use crate::ledger::{DropReason, Ledger, RejectReason};
use crate::preprocess::PreprocessError;
use crate::step::{FrameStep, StepError};
use crate::waits::{prime_thread, primed_channel};
use crate::{Frame, FrameGeometry, FrameMeta, FrameSource, MonotonicClock};

/// What the ingest thread does with a new frame when the inference queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropPolicy {
    /// Wait for room: nothing is dropped and the source is slowed down (offline replay).
    Block,
    /// Drop the new frame and keep the queued ones.
    DropNewest,
    /// Drop the oldest queued frame to make room: the freshest data wins (live sensors).
    DropOldest,
}

/// Sizes and policy of a threaded pipeline.
#[derive(Clone, Copy, Debug)]
pub struct PipelineConfig {
    /// Frames that may wait for inference (at least 1).
    pub queue_depth: usize,
    /// What happens when that queue is full.
    pub drop_policy: DropPolicy,
    /// Samples in the largest frame the source may deliver.
    pub max_frame_samples: usize,
    /// Scrub the loaded model every this many frames (0: never), or sooner when the frames
    /// held since the last scrub reach 64 MB. A corrupt one is restored from its golden copy
    /// and the frames since the last clean scrub run again, their outcomes sent a second time
    /// marked [`Outcome::rerun`].
    pub scrub_every: u32,
    /// Reject a frame whose capture time is not after the previous accepted frame's.
    pub monotonic_capture: bool,
}

/// Why a frame produced no classification.
#[derive(Debug)]
pub enum FrameFailure<E> {
    /// The source could not deliver it.
    Source(E),
    /// The source reported a geometry its samples do not fill.
    Frame(FrameError),
    /// Preprocessing, the backend or postprocessing failed.
    Step(StepError),
    /// The drop policy discarded it.
    Dropped,
    /// Its capture time repeats or precedes the previous frame's.
    Timestamp {
        /// The previous accepted frame's capture time, microseconds.
        previous_us: u64,
        /// This frame's.
        capture_us: u64,
    },
}

impl<E: core::fmt::Display> core::fmt::Display for FrameFailure<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Source(e) => write!(f, "{e}"),
            Self::Frame(e) => write!(f, "{e}"),
            Self::Step(e) => write!(f, "{e}"),
            Self::Dropped => f.write_str("dropped: the inference queue was full"),
            Self::Timestamp {
                previous_us,
                capture_us,
            } => write!(
                f,
                "capture time {capture_us} us is not after the previous frame's ({previous_us} us)"
            ),
        }
    }
}

impl<E> FrameFailure<E> {
    /// Count how this failure ends its frame in `ledger`: rejected as invalid, or dropped.
    pub fn settle(&self, ledger: &mut Ledger) {
        match self {
            Self::Source(_) => ledger.reject(RejectReason::Source),
            Self::Frame(_) => ledger.reject(RejectReason::Frame),
            Self::Timestamp { .. } => ledger.reject(RejectReason::Timestamp),
            Self::Dropped => ledger.drop(DropReason::QueueFull),
            Self::Step(StepError::Preprocess(PreprocessError::NotFinite)) => {
                ledger.reject(RejectReason::NotFinite)
            }
            Self::Step(StepError::Preprocess(_) | StepError::Tiles(_)) => {
                ledger.reject(RejectReason::Frame)
            }
            Self::Step(StepError::Backend(_)) => ledger.drop(DropReason::Backend),
            Self::Step(StepError::Postprocess(_) | StepError::Detect(_)) => {
                ledger.reject(RejectReason::Output)
            }
        }
    }
}

/// What became of one frame; frames are numbered from 0 in the order the source delivered them.
/// `T` is the step's result: a [`Classification`], or a detector's `Detections`.
#[derive(Debug)]
pub struct Outcome<E, T = Classification> {
    /// Position of the frame in the source's stream.
    pub sequence: u64,
    /// Processing time of a completed frame (preprocess, model, postprocess), else 0.
    pub latency_us: u64,
    /// Bytes of the frame as the sensor delivered it (samples times their size); 0 when the
    /// source failed to deliver it. The denominator of the downlink's data reduction.
    pub frame_bytes: u64,
    /// What the source said of the frame (its own sequence, capture time, pose); `None` when
    /// the source failed to deliver it.
    pub meta: Option<FrameMeta>,
    /// The step's result, or why there is none.
    pub result: Result<T, FrameFailure<E>>,
    /// A second outcome for a frame already reported: it ran again after a scrub found the
    /// model corrupt, and this result replaces the first.
    pub rerun: bool,
}

struct Job<S> {
    sequence: u64,
    geometry: FrameGeometry,
    meta: FrameMeta,
    samples: Vec<S>,
}

/// Run every frame of `source` through `step` (a classifier, a detector: any [`FrameStep`]),
/// calling `on_outcome` (on the calling thread) once per frame, and return the merged health
/// counters when the source is exhausted.
pub fn run_pipeline<S, Src, St, T, C, F>(
    source: Src,
    step: St,
    clock: &C,
    config: PipelineConfig,
    mut on_outcome: F,
) -> Health
where
    S: Sample,
    Src: FrameSource<S> + Send,
    Src::Error: Send,
    St: FrameStep<T> + Send,
    T: Send,
    C: MonotonicClock + Sync,
    F: FnMut(Outcome<Src::Error, T>),
{
    run_pipeline_with_frames(source, step, clock, config, |outcome, _| {
        on_outcome(outcome)
    })
}

/// [`run_pipeline`], handing `on_outcome` each processed frame's samples as well (to cut
/// products from: detection crops, thumbnails). The frame's buffer goes back to the pool when
/// `on_outcome` returns; dropped frames and ones the source failed to deliver come without.
pub fn run_pipeline_with_frames<S, Src, St, T, C, F>(
    mut source: Src,
    mut step: St,
    clock: &C,
    config: PipelineConfig,
    mut on_outcome: F,
) -> Health
where
    S: Sample,
    Src: FrameSource<S> + Send,
    Src::Error: Send,
    St: FrameStep<T> + Send,
    T: Send,
    C: MonotonicClock + Sync,
    F: FnMut(Outcome<Src::Error, T>, Option<FrameView<'_, S>>),
{
    let depth = config.queue_depth.max(1);
    // One buffer per queue slot, one being filled, one being classified, one with the output
    // callback and one on its way there: never short in the steady state.
    let buffers = depth + 4;
    // The steady state's waits made once here (`waits`): ingest's on free buffers and on a
    // full queue (`DropPolicy::Block`), inference's on the queue, the output's on both of its
    // channels. Processed frames cannot fill theirs (a slot per buffer); outcomes without a
    // frame fill theirs only if the output falls 2 x depth + 4 behind, a wait not primed.
    let (free_tx, free_rx) = primed_channel::<Vec<S>>(buffers, None);
    for _ in 0..buffers {
        // Cannot fail: the channel has room for exactly this many.
        let _ = free_tx.send(vec![S::ZERO; config.max_frame_samples]);
    }
    let empty_job = || Job {
        sequence: 0,
        geometry: FrameGeometry {
            width: 0,
            height: 0,
            bands: 0,
        },
        meta: FrameMeta::default(),
        samples: Vec::new(),
    };
    let (work_tx, work_rx) = primed_channel::<Job<S>>(depth, Some(&empty_job));
    let (outcome_tx, outcome_rx) = primed_channel::<Outcome<Src::Error, T>>(2 * depth + 4, None);
    // Processed frames reach the output with their samples, which it returns to the pool.
    let (processed_tx, processed_rx) =
        primed_channel::<(Outcome<Src::Error, T>, Job<S>)>(buffers, None);

    std::thread::scope(|scope| {
        let ingest = {
            let (free_tx, oldest) = (free_tx.clone(), work_rx.clone());
            // Ingest and inference hold the senders of outcomes without a frame: the channel
            // closes with both.
            let outcome_tx = outcome_tx.clone();
            scope.spawn(move || {
                prime_thread();
                let queue = Queue {
                    work: work_tx,
                    oldest,
                    free: free_tx,
                    outcomes: outcome_tx,
                };
                ingest(&mut source, &free_rx, &queue, config)
            })
        };
        let reruns = outcome_tx;
        let inference = scope.spawn(move || {
            prime_thread();
            let mut health = Health::default();
            let mut scrubber = Scrubber::new(config.scrub_every);
            for job in work_rx {
                let outcome = process(&mut step, &job, clock, &mut health, false);
                scrubber.hold(&job);
                if processed_tx.send((outcome, job)).is_err() {
                    break;
                }
                if scrubber.due() {
                    scrubber.scrub(&mut step, clock, &mut health, &reruns);
                }
            }
            scrubber.scrub(&mut step, clock, &mut health, &reruns);
            health
        });
        // Outcomes from both threads, in the order they come; each processed frame's buffer
        // back to the pool once its outcome is handled.
        loop {
            crossbeam_channel::select! {
                recv(outcome_rx) -> message => match message {
                    Ok(outcome) => on_outcome(outcome, None),
                    Err(_) => break,
                },
                recv(processed_rx) -> message => match message {
                    Ok((outcome, job)) => {
                        on_outcome(outcome, FrameView::new(job.geometry, &job.samples).ok());
                        let _ = free_tx.send(job.samples);
                    }
                    Err(_) => break,
                },
            }
        }
        // One of the two has closed; take the other's rest.
        for outcome in outcome_rx.try_iter() {
            on_outcome(outcome, None);
        }
        for (outcome, job) in processed_rx.iter() {
            on_outcome(outcome, FrameView::new(job.geometry, &job.samples).ok());
            let _ = free_tx.send(job.samples);
        }
        for outcome in outcome_rx.iter() {
            on_outcome(outcome, None);
        }
        // A panic in the source is a bug in the board: surface it rather than lose counts.
        let mut health = ingest
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        health.merge(
            &inference
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p)),
        );
        health
    })
}

/// Run one frame through `step`; a panic in the backend costs that frame, not the pipeline.
fn process<S: Sample, E, T, St: FrameStep<T>, C: MonotonicClock>(
    step: &mut St,
    job: &Job<S>,
    clock: &C,
    health: &mut Health,
    rerun: bool,
) -> Outcome<E, T> {
    // Ingest validated the geometry; checked again rather than trusted.
    let processed = match FrameView::new(job.geometry, &job.samples) {
        // A panicking backend (a driver bug, a dead device) costs one frame, not the
        // pipeline: it is counted as a backend error and the next frame runs.
        Ok(view) => catch_unwind(AssertUnwindSafe(|| step.process_frame(view, clock, health)))
            .unwrap_or_else(|_| {
                error!(
                    "frame {}: the backend panicked; counted as a backend error",
                    job.sequence
                );
                health.record_error(ErrorKind::Backend);
                Err(StepError::Backend(BackendError::Execution))
            })
            .map_err(FrameFailure::Step),
        Err(e) => {
            health.record_error(ErrorKind::Frame);
            Err(FrameFailure::Frame(e))
        }
    };
    let (latency_us, result) = match processed {
        Ok((output, latency_us)) => (latency_us, Ok(output)),
        Err(failure) => (0, Err(failure)),
    };
    Outcome {
        sequence: job.sequence,
        latency_us,
        frame_bytes: frame_bytes::<S>(&job.geometry),
        meta: Some(job.meta),
        result,
        rerun,
    }
}

/// Scrubs in a row at one check: a re-run that meets a new upset is run once more.
const RESCRUBS: usize = 3;

/// Bytes of frames held for a re-run at most: with large frames the scrub comes sooner, so
/// that a camera's 25 MB frames do not hold 32 copies.
const HOLD_BYTES: usize = 64 << 20;

/// Copies of the frames processed since the last clean scrub, to run again if the next scrub
/// finds the model corrupt. Each copy's buffer is kept and reused: after the first frames of
/// the largest size, holding allocates nothing.
struct Scrubber<S> {
    every: usize,
    held: Vec<Job<S>>,
    count: usize,
    held_bytes: usize,
}

impl<S: Sample> Scrubber<S> {
    fn new(every: u32) -> Self {
        Self {
            every: every as usize,
            held: Vec::new(),
            count: 0,
            held_bytes: 0,
        }
    }

    fn hold(&mut self, job: &Job<S>) {
        if self.every == 0 {
            return;
        }
        if self.held.len() <= self.count {
            self.held.push(Job {
                sequence: 0,
                geometry: job.geometry,
                meta: job.meta,
                samples: Vec::new(),
            });
        }
        if let Some(copy) = self.held.get_mut(self.count) {
            copy.sequence = job.sequence;
            copy.geometry = job.geometry;
            copy.meta = job.meta;
            copy.samples.clear();
            let used = FrameView::new(job.geometry, &job.samples).map_or(0, |v| v.samples().len());
            copy.samples
                .extend_from_slice(job.samples.get(..used).unwrap_or_default());
            self.count += 1;
            self.held_bytes += used * core::mem::size_of::<S>();
        }
    }

    fn due(&self) -> bool {
        self.every > 0 && (self.count >= self.every || self.held_bytes >= HOLD_BYTES)
    }

    /// Check the model; if it is corrupt, restore it and run the held frames again, their
    /// outcomes sent to `reruns`.
    fn scrub<E, T, St: FrameStep<T>, C: MonotonicClock>(
        &mut self,
        step: &mut St,
        clock: &C,
        health: &mut Health,
        reruns: &Sender<Outcome<E, T>>,
    ) {
        if self.every == 0 || self.count == 0 {
            return;
        }
        // A re-run may itself meet a new upset: scrub again after it, a few times at most; the
        // last restore runs nothing again, so that the model is left clean.
        for attempt in 0..=RESCRUBS {
            let started = clock.now_us();
            let found = step.backend().map_or(Scrub::Uncovered, |b| b.scrub());
            let took = clock.now_us().saturating_sub(started);
            let stats = &mut health.scrub;
            stats.scrubs += 1;
            stats.scrub_us += took;
            stats.max_scrub_us = stats.max_scrub_us.max(took);
            if found != Scrub::Corrupt {
                break;
            }
            stats.corrupt += 1;
            let restored = step
                .backend()
                .map_or(Err(BackendError::NotAvailable), |b| b.restore());
            if let Err(e) = restored {
                stats.restore_failures += 1;
                error!(
                    "scrub: the loaded model is corrupt and cannot be restored: {}",
                    e
                );
                break;
            }
            stats.restored += 1;
            if attempt == RESCRUBS {
                warn!("scrub: the loaded model was corrupt again after its re-runs; restored");
                break;
            }
            warn!(
                "scrub: the loaded model was corrupt; restored from its golden copy, {} frames run again",
                self.count
            );
            for job in self.held.iter().take(self.count) {
                let mut rerun_health = Health::default();
                let outcome = process(step, job, clock, &mut rerun_health, true);
                health.scrub.reruns += 1;
                let _ = reruns.send(outcome);
            }
        }
        self.count = 0;
        self.held_bytes = 0;
    }
}

/// The ingest thread's ends of the channels.
struct Queue<S, E, T> {
    work: Sender<Job<S>>,
    /// A receiver on the work queue, for evicting the oldest frame.
    oldest: Receiver<Job<S>>,
    free: Sender<Vec<S>>,
    outcomes: Sender<Outcome<E, T>>,
}

impl<S, E, T> Queue<S, E, T> {
    fn report(
        &self,
        sequence: u64,
        frame: Option<(&FrameGeometry, FrameMeta)>,
        failure: FrameFailure<E>,
    ) {
        let _ = self.outcomes.send(Outcome {
            sequence,
            latency_us: 0,
            frame_bytes: frame.map_or(0, |(g, _)| frame_bytes::<S>(g)),
            meta: frame.map(|(_, meta)| meta),
            result: Err(failure),
            rerun: false,
        });
    }

    /// Queue `job` under `policy`; returns false once inference has stopped.
    fn enqueue(&self, mut job: Job<S>, policy: DropPolicy, health: &mut Health) -> bool {
        if policy == DropPolicy::Block {
            return self.work.send(job).is_ok();
        }
        loop {
            match self.work.try_send(job) {
                Ok(()) => return true,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(rejected)) => {
                    if policy == DropPolicy::DropNewest {
                        self.drop_frame(rejected, health);
                        return true;
                    }
                    // Evict the head of the queue, unless inference has just taken it; retry.
                    if let Ok(oldest) = self.oldest.try_recv() {
                        self.drop_frame(oldest, health);
                    }
                    job = rejected;
                }
            }
        }
    }

    fn drop_frame(&self, job: Job<S>, health: &mut Health) {
        warn!(
            "frame {}: dropped, the inference queue is full",
            job.sequence
        );
        health.frames_dropped += 1;
        self.report(
            job.sequence,
            Some((&job.geometry, job.meta)),
            FrameFailure::Dropped,
        );
        let _ = self.free.send(job.samples);
    }
}

/// Bytes of a frame of `geometry`, as the sensor delivered it.
fn frame_bytes<S>(geometry: &FrameGeometry) -> u64 {
    u64::from(geometry.width)
        .saturating_mul(u64::from(geometry.height))
        .saturating_mul(u64::from(geometry.bands))
        .saturating_mul(core::mem::size_of::<S>() as u64)
}

fn ingest<S: Sample, Src: FrameSource<S>, T>(
    source: &mut Src,
    free: &Receiver<Vec<S>>,
    queue: &Queue<S, Src::Error, T>,
    config: PipelineConfig,
) -> Health {
    let mut health = Health::default();
    let mut sequence = 0;
    let mut previous_capture_us: Option<u64> = None;
    // Buffers always come back: inference returns each one after use.
    while let Ok(mut samples) = free.recv() {
        let Frame { geometry, meta } = match source.next_frame(&mut samples) {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                health.frames_in += 1;
                health.record_error(ErrorKind::Source);
                queue.report(sequence, None, FrameFailure::Source(e));
                sequence += 1;
                let _ = queue.free.send(samples);
                continue;
            }
        };
        health.frames_in += 1;
        if let Err(e) = FrameView::new(geometry, &samples) {
            health.record_error(ErrorKind::Frame);
            queue.report(sequence, Some((&geometry, meta)), FrameFailure::Frame(e));
            sequence += 1;
            let _ = queue.free.send(samples);
            continue;
        }
        if let Some(previous_us) =
            previous_capture_us.filter(|&p| config.monotonic_capture && meta.capture_us <= p)
        {
            health.record_error(ErrorKind::Timestamp);
            let failure = FrameFailure::Timestamp {
                previous_us,
                capture_us: meta.capture_us,
            };
            queue.report(sequence, Some((&geometry, meta)), failure);
            sequence += 1;
            let _ = queue.free.send(samples);
            continue;
        }
        previous_capture_us = Some(meta.capture_us);
        let job = Job {
            sequence,
            geometry,
            meta,
            samples,
        };
        sequence += 1;
        if !queue.enqueue(job, config.drop_policy, &mut health) {
            break;
        }
    }
    health
}
