//! The runtime's log shim on a host (`kestrel-runtime` feature `log`): the threaded pipeline
//! reports each frame its drop policy discards and each backend panic it contains, one record
//! per frame, as warnings and errors that name the frame. (Its own test binary: the logger is
//! global to the process.)

use std::sync::Mutex;

use kestrel_backend::{PreprocessSpec, ResizeRule};
use kestrel_host::HostClock;
use kestrel_runtime::step::ClassifierStep;
use kestrel_runtime::threaded::{run_pipeline, DropPolicy, FrameFailure, PipelineConfig};
use kestrel_tests::{slow, BurstSource, SlowBackend};

static RECORDS: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        let line = record.args().to_string();
        RECORDS.lock().unwrap().push((record.level(), line));
    }
    fn flush(&self) {}
}

#[test]
fn drops_and_contained_panics_are_logged_per_frame() {
    log::set_logger(&Capture).unwrap();
    log::set_max_level(log::LevelFilter::Trace);
    let spec = PreprocessSpec::new(2, 2, &[0.0], &[1.0], ResizeRule::Bilinear).unwrap();
    let (mut input, mut output) = (vec![0.0; 4], vec![0.0; 4]);
    let backend = SlowBackend {
        panic_on: Some(0),
        ..slow(20)
    };
    let step = ClassifierStep::new(backend, spec, &mut input, &mut output).unwrap();
    let source = BurstSource {
        next: 0,
        count: 12,
        corrupt: vec![],
        wrong_bands: vec![],
    };
    let config = PipelineConfig {
        queue_depth: 1,
        drop_policy: DropPolicy::DropNewest,
        max_frame_samples: 4,
        scrub_every: 0,
        monotonic_capture: false,
    };
    let mut dropped = Vec::new();
    let health = run_pipeline(source, step, &HostClock::default(), config, |o| {
        if matches!(o.result, Err(FrameFailure::Dropped)) {
            dropped.push(o.sequence);
        }
    });
    assert!(
        !dropped.is_empty(),
        "a 20 ms model under a burst drops frames"
    );

    let records = RECORDS.lock().unwrap();
    let warned: Vec<u64> = records
        .iter()
        .filter(|(level, _)| *level == log::Level::Warn)
        .map(|(_, line)| {
            let number = line
                .strip_prefix("frame ")
                .unwrap()
                .split(':')
                .next()
                .unwrap();
            number.parse().unwrap()
        })
        .collect();
    dropped.sort();
    let mut warned_sorted = warned.clone();
    warned_sorted.sort();
    assert_eq!(
        warned_sorted, dropped,
        "one warning per dropped frame: {records:?}"
    );
    assert_eq!(warned.len() as u64, health.frames_dropped);
    let errors: Vec<&String> = records
        .iter()
        .filter(|(level, _)| *level == log::Level::Error)
        .map(|(_, line)| line)
        .collect();
    assert_eq!(
        errors,
        ["frame 0: the backend panicked; counted as a backend error"]
    );
}
