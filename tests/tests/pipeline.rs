//! The threaded pipeline under overload: each drop policy drops what it says, every frame is
//! accounted for exactly once, and failures are counted by kind without stopping the run.

use std::collections::BTreeSet;

use kestrel_backend::{BackendError, PreprocessSpec, ResizeRule};
use kestrel_host::HostClock;
use kestrel_runtime::health::{ErrorKind, Health};
use kestrel_runtime::step::{ClassifierStep, StepError};
use kestrel_runtime::threaded::{run_pipeline, DropPolicy, FrameFailure, Outcome, PipelineConfig};
use kestrel_tests::{slow, BurstSource, SlowBackend};

fn run(
    policy: DropPolicy,
    count: u64,
    backend: SlowBackend,
    corrupt: Vec<u64>,
    wrong_bands: Vec<u64>,
) -> (Health, Vec<Outcome<String>>) {
    let spec = PreprocessSpec::new(2, 2, &[0.0], &[1.0], ResizeRule::Bilinear).unwrap();
    let (mut input, mut output) = (vec![0.0; 4], vec![0.0; 4]);
    let step = ClassifierStep::new(backend, spec, &mut input, &mut output).unwrap();
    let source = BurstSource {
        next: 0,
        count,
        corrupt,
        wrong_bands,
    };
    let config = PipelineConfig {
        queue_depth: 2,
        drop_policy: policy,
        max_frame_samples: 12,
        scrub_every: 0,
        monotonic_capture: false,
    };
    let mut outcomes = Vec::new();
    let health = run_pipeline(source, step, &HostClock::default(), config, |o| {
        outcomes.push(o)
    });
    (health, outcomes)
}

/// Every frame has exactly one outcome and the counters agree with the outcomes.
fn check_accounting(health: &Health, outcomes: &[Outcome<String>], count: u64, model_ms: u64) {
    let sequences: BTreeSet<u64> = outcomes.iter().map(|o| o.sequence).collect();
    assert_eq!(sequences.len() as u64, count, "one outcome per frame");
    assert_eq!(outcomes.len() as u64, count, "no frame reported twice");
    assert_eq!(health.frames_in, count);
    assert_eq!(health.unaccounted(), 0, "{health:?}");
    let dropped = outcomes
        .iter()
        .filter(|o| matches!(o.result, Err(FrameFailure::Dropped)))
        .count();
    let done = outcomes.iter().filter(|o| o.result.is_ok()).count();
    assert_eq!(health.frames_dropped, dropped as u64);
    assert_eq!(health.frames_done, done as u64);
    for o in outcomes.iter().filter(|o| o.result.is_ok()) {
        let class = o.result.as_ref().unwrap().class();
        assert_eq!(
            u64::from(class),
            o.sequence % 4,
            "frame {} classified from its own samples",
            o.sequence
        );
        assert!(
            o.latency_us >= model_ms * 1000,
            "a {model_ms} ms model finished in {} us",
            o.latency_us
        );
    }
    // The source's metadata reaches every frame it delivered, dropped ones included.
    for o in outcomes {
        match (&o.result, o.meta) {
            (Err(FrameFailure::Source(_)), meta) => assert_eq!(meta, None),
            (_, Some(meta)) => {
                assert_eq!(
                    (meta.sequence, meta.capture_us),
                    (o.sequence, 1_000 * o.sequence)
                );
            }
            (_, None) => panic!("frame {} lost its metadata", o.sequence),
        }
    }
}

#[test]
fn drop_newest_keeps_the_queue_and_drops_arrivals() {
    let (health, outcomes) = run(DropPolicy::DropNewest, 40, slow(2), vec![], vec![]);
    check_accounting(&health, &outcomes, 40, 2);
    assert!(
        health.frames_dropped >= 20,
        "a burst of 40 into a 2-deep queue must drop: {health:?}"
    );
    // The first frames reach the model; it is the late arrivals that are lost.
    let first = outcomes.iter().find(|o| o.sequence == 0).unwrap();
    assert!(first.result.is_ok());
    let last = outcomes.iter().find(|o| o.sequence == 39).unwrap();
    assert!(
        matches!(last.result, Err(FrameFailure::Dropped)),
        "the newest frame is dropped under DropNewest"
    );
}

#[test]
fn drop_oldest_always_delivers_the_freshest_frame() {
    let (health, outcomes) = run(DropPolicy::DropOldest, 40, slow(2), vec![], vec![]);
    check_accounting(&health, &outcomes, 40, 2);
    assert!(health.frames_dropped >= 20, "{health:?}");
    let last = outcomes.iter().find(|o| o.sequence == 39).unwrap();
    assert!(
        last.result.is_ok(),
        "the freshest frame survives DropOldest"
    );
}

#[test]
fn block_loses_nothing() {
    let (health, outcomes) = run(DropPolicy::Block, 20, slow(1), vec![], vec![]);
    check_accounting(&health, &outcomes, 20, 1);
    assert_eq!((health.frames_dropped, health.frames_done), (0, 20));
}

#[test]
fn failed_frames_are_counted_and_the_run_goes_on() {
    // Frame 13 makes the backend fail and frame 17 makes it panic.
    let backend = SlowBackend {
        fail_on: Some(13),
        panic_on: Some(17),
        ..slow(0)
    };
    let (health, outcomes) = run(DropPolicy::Block, 20, backend, vec![3, 7], vec![5]);
    check_accounting(&health, &outcomes, 20, 0);
    assert_eq!(health.errors(ErrorKind::Source), 2);
    assert_eq!(health.errors(ErrorKind::Frame), 1);
    assert_eq!(health.errors(ErrorKind::Backend), 2);
    assert_eq!(health.frames_done, 15);
    for sequence in [13, 17] {
        let o = outcomes.iter().find(|o| o.sequence == sequence).unwrap();
        let backend_failed = matches!(
            o.result,
            Err(FrameFailure::Step(StepError::Backend(
                BackendError::Execution
            )))
        );
        assert!(backend_failed, "frame {sequence}: {:?}", o.result);
    }
    let after = outcomes.iter().find(|o| o.sequence == 18).unwrap();
    assert!(
        after.result.is_ok(),
        "the pipeline outlives a backend panic"
    );
    let o = outcomes.iter().find(|o| o.sequence == 7).unwrap();
    assert!(matches!(&o.result, Err(FrameFailure::Source(m)) if m == "frame 7: corrupt"));
    let o = outcomes.iter().find(|o| o.sequence == 5).unwrap();
    assert_eq!(
        o.result.as_ref().unwrap_err().to_string(),
        "image has 3 band(s), the model takes 1"
    );
}
