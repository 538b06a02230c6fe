//! The flight loop's steady state allocates nothing, on any of its threads: a counting global
//! allocator sees no allocation while frames 100 to 400 of a real chip go through the
//! classifier and out as CCSDS and MAVLink telemetry (health every frame among them), nor
//! while the detector runs frames in which it finds nothing; the backend runs on its supervised
//! worker as in kestrel-flight, and plan scrubbing and the capture-time check are on. Products (PNG crops) allocate
//! and are not on this path. One test in its own binary, so that no other test's
//! allocations are counted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kestrel_backend::{Backend, BackendError};
use kestrel_hal::{Frame, FrameGeometry, FrameMeta, FrameSource};
use kestrel_host::{decode_image, HostClock};
use kestrel_jetson::flight::{self, Stages, Tally};
use kestrel_payload::downlink::{Downlink, DownlinkArgs, FramingArg};
use kestrel_runtime::step::{ClassifierStep, DetectorStep};
use kestrel_runtime::supervise::preferred;
use kestrel_runtime::threaded::{DropPolicy, PipelineConfig};
use models::ZooModel;

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// `frames` copies of one frame; the allocation count is read when frame `from` and frame
/// `to` are asked for.
struct Repeat {
    geometry: FrameGeometry,
    samples: Vec<u8>,
    next: u64,
    frames: u64,
    window: (u64, u64),
    counts: Arc<[AtomicU64; 2]>,
}

impl FrameSource<u8> for Repeat {
    type Error = String;

    fn next_frame(&mut self, buffer: &mut [u8]) -> Result<Option<Frame>, String> {
        let sequence = self.next;
        if sequence == self.window.0 {
            self.counts[0].store(ALLOCATIONS.load(Ordering::SeqCst), Ordering::SeqCst);
        }
        if sequence == self.window.1 {
            self.counts[1].store(ALLOCATIONS.load(Ordering::SeqCst), Ordering::SeqCst);
        }
        if sequence == self.frames {
            return Ok(None);
        }
        self.next += 1;
        let target = buffer
            .get_mut(..self.samples.len())
            .ok_or("frame buffer too small")?;
        target.copy_from_slice(&self.samples);
        Ok(Some(Frame {
            geometry: self.geometry,
            meta: FrameMeta {
                sequence,
                capture_us: 1_000 * (sequence + 1),
                ..FrameMeta::default()
            },
        }))
    }
}

fn repeat(geometry: FrameGeometry, samples: Vec<u8>, frames: u64, window: (u64, u64)) -> Repeat {
    Repeat {
        geometry,
        samples,
        next: 0,
        frames,
        window,
        counts: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]),
    }
}

fn downlink(framing: FramingArg, labels: &[String]) -> Downlink {
    let args = DownlinkArgs {
        telemetry: framing,
        link: Some("file:/dev/null".into()),
        ..DownlinkArgs::default()
    };
    Downlink::new(&args, labels).unwrap()
}

fn pipeline(max_frame_samples: usize, scrub_every: u32) -> PipelineConfig {
    PipelineConfig {
        queue_depth: 4,
        drop_policy: DropPolicy::Block,
        max_frame_samples,
        // Scrubbing on, as kestrel-flight runs it, and the capture-time check. The copies
        // scrubbing holds of the frames since the last scrub are made once each, before the
        // windows measured.
        scrub_every,
        monotonic_capture: true,
    }
}

#[test]
fn the_flight_loop_allocates_nothing_per_frame() {
    // The downlink queue (2 MB of slots, no_std-shaped) is built on the stack in a debug build
    // before it is boxed: run as kestrel-flight's main thread does, with 8 MB.
    std::thread::Builder::new()
        .stack_size(8 << 20)
        .spawn(flight_loop)
        .unwrap()
        .join()
        .unwrap();
}

/// `backend` on a supervised worker, as kestrel-flight runs its preferred backend (a restart
/// is not expected here: its factory only says so).
fn supervised(backend: Box<dyn Backend + Send>) -> Box<dyn Backend + Send> {
    let (supervised, _) = preferred(
        backend,
        Arc::new(|| Err(BackendError::NotAvailable)),
        None,
        None,
        Some(Duration::from_secs(10)),
        Box::new(|_| {}),
    )
    .unwrap();
    supervised
}

fn flight_loop() {
    let clock = HostClock::default();

    // The classifier on a real chip, both framings, health every frame.
    let model = ZooModel::load(models::DEFAULT_MODEL).unwrap();
    let chip = decode_image(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../sim/sample/eurosat-rgb/River/River_105.jpg"),
    )
    .unwrap();
    for framing in [FramingArg::Ccsds, FramingArg::Mavlink] {
        let spec = model.preprocess_spec().unwrap();
        let backend = supervised(Box::new(model.int8_backend().unwrap().unwrap()));
        let (mut input, mut output) =
            (vec![0.0; spec.input_len()], vec![0.0; backend.output_len()]);
        let step = ClassifierStep::new(backend, spec, &mut input, &mut output).unwrap();
        let source = repeat(chip.geometry, chip.samples.clone(), 500, (100, 400));
        let counts = Arc::clone(&source.counts);
        let mut downlink = downlink(framing, &model.manifest.labels);
        let mut tally = Tally::new(Duration::from_nanos(1));
        let health = flight::classify(
            source,
            step,
            &clock,
            pipeline(chip.samples.len(), 32),
            &mut downlink,
            &mut tally,
            &Stages::default(),
        );
        assert_eq!(health.frames_done, 500);
        let report = downlink.finish(Default::default());
        assert!(report.sent_bytes > 500 * 20, "{framing:?}: {report:?}");
        let [from, to] = [0, 1].map(|i| counts[i].load(Ordering::SeqCst));
        assert_eq!(to - from, 0, "{framing:?}: frames 100 to 400 allocated");
    }

    // The detector, one 512-pixel tile per frame, finding nothing in a flat grey frame.
    let model = ZooModel::load(models::DEFAULT_DETECTOR).unwrap();
    let detector = model.detector_config().unwrap();
    let spec = model.preprocess_spec().unwrap();
    let backend = supervised(Box::new(model.int8_backend().unwrap().unwrap()));
    let (mut input, mut output) = (vec![0.0; spec.input_len()], vec![0.0; backend.output_len()]);
    let step = DetectorStep::new(backend, spec, detector, &mut input, &mut output).unwrap();
    let geometry = FrameGeometry {
        width: 512,
        height: 512,
        bands: 3,
    };
    // Ingest runs up to 8 frames ahead of inference: the window opens once inference has
    // made its first held copy.
    let source = repeat(geometry, vec![110; 512 * 512 * 3], 16, (10, 15));
    let counts = Arc::clone(&source.counts);
    let mut downlink = downlink(FramingArg::Ccsds, &model.manifest.labels);
    let mut tally = Tally::new(Duration::from_nanos(1));
    let health = flight::detect(
        source,
        step,
        &clock,
        pipeline(512 * 512 * 3, 1),
        &mut downlink,
        &mut tally,
        &Stages::default(),
    );
    assert_eq!(health.frames_done, 16);
    let report = downlink.finish(Default::default());
    assert_eq!(report.products, 0, "nothing found, nothing cut");
    let [from, to] = [0, 1].map(|i| counts[i].load(Ordering::SeqCst));
    assert_eq!(to - from, 0, "detector frames 10 to 15 allocated");

    // A plan with 16-bit activations (the fuzz corpus's, every 16-bit op, depthwise and
    // pointwise layers among them) on the host's kernels: once warm, its runs allocate nothing.
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus/plan_load/sixteen-bit-classifier.plan"),
    )
    .unwrap();
    let mut cpu = kestrel_plan::cpu::Int8Cpu::from_bytes(&bytes).unwrap();
    let input: Vec<f32> = (0..cpu.input_len())
        .map(|i| (i % 11) as f32 / 4.0 - 1.0)
        .collect();
    let mut output = vec![0.0; cpu.output_len()];
    for _ in 0..2 {
        cpu.run(&input, &mut output).unwrap();
    }
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    for _ in 0..20 {
        cpu.run(&input, &mut output).unwrap();
    }
    let allocated = ALLOCATIONS.load(Ordering::SeqCst) - before;
    assert_eq!(allocated, 0, "20 runs of a 16-bit plan allocated");
}
