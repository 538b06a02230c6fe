//! Zero heap allocations per inference after setup, proven with a counting global allocator:
//! for the plan executor over a caller's arena, for the int8 CPU backend (a 16-bit plan too),
//! and for the runtime's pipeline step (preprocess, model, postprocess) on a real chip, and for
//! telemetry and commands.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};

use kestrel_backend::Backend;
use kestrel_host::{decode_image, HostClock};
use kestrel_ops::Reference;
use kestrel_plan::cpu::Int8Cpu;
use kestrel_plan::program::{AlignedBytes, Program};
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::health::Health;
use kestrel_runtime::preprocess::{prepare_input, Region};
use kestrel_runtime::step::ClassifierStep;
use kestrel_runtime::waits::{prime_thread, primed_channel};
use models::ZooModel;

/// Counts the allocations made by the current thread (tests run on several threads).
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_during(f: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

fn chip() -> kestrel_host::DecodedImage {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../sim/sample/eurosat-rgb/River/River_105.jpg");
    decode_image(&path).unwrap()
}

fn model_input(model: &ZooModel) -> Vec<f32> {
    let spec = model.preprocess_spec().unwrap();
    let image = chip();
    let view = FrameView::new(image.geometry, &image.samples).unwrap();
    let mut input = vec![0.0; spec.input_len()];
    prepare_input(view, Region::whole(64, 64), &spec, &mut input).unwrap();
    input
}

#[test]
fn the_counter_sees_allocations() {
    assert!(allocations_during(|| drop(std::hint::black_box(vec![1u8; 64]))) >= 1);
}

#[test]
fn the_executor_allocates_nothing_per_inference() {
    let model = ZooModel::load(models::DEFAULT_MODEL).unwrap();
    let input = model_input(&model);
    let bytes = AlignedBytes::new(include_bytes!("../../models/zoo/eurosat-rgb/model.plan"));
    let program = Program::new(bytes.as_bytes()).unwrap();
    let mut arena = vec![0i8; program.arena_size()];
    let mut logits = [0.0f32; 10];
    let count = allocations_during(|| {
        for _ in 0..3 {
            program.quantize_input(&input, &mut arena).unwrap();
            program.run(&mut arena, &mut Reference).unwrap();
            program.dequantize_output(&arena, &mut logits).unwrap();
        }
    });
    assert_eq!(count, 0, "generic executor");

    let mut backend = Int8Cpu::from_bytes(bytes.as_bytes()).unwrap();
    let mut output = vec![0.0; backend.output_len()];
    let count = allocations_during(|| {
        for _ in 0..10 {
            backend.run(&input, &mut output).unwrap();
        }
    });
    assert_eq!(
        count,
        0,
        "int8 CPU backend ({} kernels)",
        backend.kernel_name()
    );
    assert_eq!(output, logits, "fast and generic kernels agree");
}

#[test]
fn a_16_bit_plan_allocates_nothing_per_inference() {
    // The small EfficientNet of MBConv blocks compiles to 16-bit activations by default (see
    // edge_ops): the 16-bit convolutions' scratch is sized when the backend is made, not on
    // its first inference.
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = ZooModel::load(here.join("data/mbconv").to_str().unwrap()).unwrap();
    let options = models::compile::Options {
        max_images: 100,
        ..Default::default()
    };
    let sample = here.join("../sim/sample/eurosat-rgb");
    let (plan, report) = models::compile::compile(&model, &sample, &options, &mut |_| {}).unwrap();
    assert!(
        report.int16.is_some_and(|trial| trial.kept),
        "a 16-bit plan"
    );
    let input = model_input(&model);
    let mut backend = Int8Cpu::from_bytes(&plan).unwrap();
    let mut output = vec![0.0; backend.output_len()];
    let count = allocations_during(|| {
        for _ in 0..3 {
            backend.run(&input, &mut output).unwrap();
        }
    });
    assert_eq!(count, 0, "{} kernels", backend.kernel_name());
}

#[test]
fn the_pipeline_step_allocates_nothing_per_frame() {
    let model = ZooModel::load(models::DEFAULT_MODEL).unwrap();
    let spec = model.preprocess_spec().unwrap();
    let backend = model.int8_backend().unwrap().unwrap();
    let (mut input, mut output) = (vec![0.0; spec.input_len()], vec![0.0; backend.output_len()]);
    let mut step = ClassifierStep::new(backend, spec, &mut input, &mut output).unwrap();
    let image = chip();
    let clock = HostClock::default();
    let mut health = Health::default();
    let river = model
        .manifest
        .labels
        .iter()
        .position(|l| l == "River")
        .unwrap();
    let count = allocations_during(|| {
        for _ in 0..10 {
            let frame = FrameView::new(image.geometry, &image.samples).unwrap();
            let (classification, _) = step.process(frame, &clock, &mut health).unwrap();
            assert_eq!(usize::from(classification.class()), river);
        }
    });
    assert_eq!(count, 0);
    assert_eq!(health.frames_done, 10);
}

#[test]
fn detector_postprocessing_allocates_nothing() {
    use kestrel_runtime::detect::{decode, Detections, HeadLayout};
    let layout = HeadLayout {
        classes: 10,
        height: 32,
        width: 32,
        stride: 4.0,
        wh_scale: 128.0,
    };
    // A busy head: a peak every few cells in every class.
    let head: Vec<f32> = (0..layout.len())
        .map(|i| {
            if i % 7 == 0 {
                0.2 + (i % 13) as f32 / 20.0
            } else {
                0.05
            }
        })
        .collect();
    let mut found = Detections::<64>::new();
    let count = allocations_during(|| {
        for _ in 0..3 {
            decode(&head, &layout, 0.3, &mut found).unwrap();
            found.suppress(0.5);
        }
    });
    assert_eq!(count, 0);
    assert!(
        found.overflow() > 0,
        "the busy head overflowed the 64 slots"
    );
    assert!(!found.as_slice().is_empty());
}

/// The whole detector step on a real scene, through the built-in int8 detector: tiling,
/// preprocessing, the plan, decoding, suppression and seam merging allocate nothing per frame.
#[test]
fn the_detector_step_allocates_nothing_per_frame() {
    use kestrel_runtime::detect::Detections;
    use kestrel_runtime::step::DetectorStep;
    let model = ZooModel::load(models::DEFAULT_DETECTOR).unwrap();
    let spec = model.preprocess_spec().unwrap();
    let config = model.detector_config().unwrap();
    let backend = model.int8_backend().unwrap().unwrap();
    let (mut input, mut output) = (vec![0.0; spec.input_len()], vec![0.0; backend.output_len()]);
    let mut step =
        DetectorStep::<_, 128>::new(backend, spec, config, &mut input, &mut output).unwrap();
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../sim/sample/nwpu-vhr10/images/017.jpg");
    let image = decode_image(&path).unwrap();
    let clock = HostClock::default();
    let mut health = Health::default();
    let mut found = Detections::<1024>::new();
    let count = allocations_during(|| {
        for _ in 0..2 {
            let frame = FrameView::new(image.geometry, &image.samples).unwrap();
            step.process(frame, &clock, &mut health, &mut found)
                .unwrap();
        }
    });
    assert_eq!(count, 0);
    assert_eq!(health.frames_done, 2);
    assert!(
        found.as_slice().len() >= 5,
        "the airport scene has 21 objects: {:?}",
        found.as_slice()
    );
}

/// The `no_std` path: the plan's program over a caller's arena ([`Session`], generic kernels)
/// behind the same `Backend` contract drives `ClassifierStep` with no allocation per frame and
/// the scores `Int8Cpu` gives, and `DetectorStep` to the boxes `Int8Cpu` finds.
#[test]
fn the_session_backend_drives_both_steps() {
    use kestrel_plan::program::ProgramError;
    use kestrel_plan::session::Session;
    use kestrel_runtime::detect::Detections;
    use kestrel_runtime::step::DetectorStep;

    let model = ZooModel::load(models::DEFAULT_MODEL).unwrap();
    let spec = model.preprocess_spec().unwrap();
    let bytes = AlignedBytes::new(model.plan_bytes().unwrap().unwrap());
    let program = Program::new(bytes.as_bytes()).unwrap();
    let mut arena = vec![0i8; program.arena_size()];
    assert_eq!(
        Session::new(&program, &mut arena[1..], Reference).err(),
        Some(ProgramError::Arena {
            needed: program.arena_size(),
            got: program.arena_size() - 1
        })
    );
    let session = Session::new(&program, &mut arena, Reference).unwrap();
    let (mut input, mut scores) = (vec![0.0; spec.input_len()], vec![0.0; 10]);
    let mut step = ClassifierStep::new(session, spec, &mut input, &mut scores).unwrap();
    let image = chip();
    let (clock, mut health) = (HostClock::default(), Health::default());
    let mut classified = Vec::with_capacity(3);
    let count = allocations_during(|| {
        for _ in 0..3 {
            let frame = FrameView::new(image.geometry, &image.samples).unwrap();
            classified.push(step.process(frame, &clock, &mut health).unwrap().0);
        }
    });
    assert_eq!(count, 0, "ClassifierStep over a Session");
    let host = model.int8_backend().unwrap().unwrap();
    let (mut input, mut host_scores) = (vec![0.0; spec.input_len()], vec![0.0; 10]);
    let mut step = ClassifierStep::new(host, spec, &mut input, &mut host_scores).unwrap();
    let frame = FrameView::new(image.geometry, &image.samples).unwrap();
    let on_host = step.process(frame, &clock, &mut health).unwrap().0;
    assert_eq!(
        classified,
        vec![on_host; 3],
        "Session and Int8Cpu classifications"
    );
    assert_eq!(scores, host_scores, "Session and Int8Cpu scores");

    // The detector on one 512x512 tile of a real scene (the generic kernels are slow).
    let model = ZooModel::load(models::DEFAULT_DETECTOR).unwrap();
    let (spec, config) = (
        model.preprocess_spec().unwrap(),
        model.detector_config().unwrap(),
    );
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../sim/sample/nwpu-vhr10/images/017.jpg");
    let scene = decode_image(&path).unwrap();
    let width = scene.geometry.width as usize;
    let tile: Vec<u8> = (0..512)
        .flat_map(|row| &scene.samples[row * width * 3..][..512 * 3])
        .copied()
        .collect();
    let geometry = kestrel_runtime::FrameGeometry {
        width: 512,
        height: 512,
        bands: 3,
    };
    let frame = FrameView::new(geometry, &tile).unwrap();
    let bytes = AlignedBytes::new(model.plan_bytes().unwrap().unwrap());
    let program = Program::new(bytes.as_bytes()).unwrap();
    let mut arena = vec![0i8; program.arena_size()];
    let mut boxes = Vec::new();
    for backend in [
        Box::new(Session::new(&program, &mut arena, Reference).unwrap()) as Box<dyn Backend + '_>,
        Box::new(model.int8_backend().unwrap().unwrap()),
    ] {
        let (mut input, mut head) = (vec![0.0; spec.input_len()], vec![0.0; config.head.len()]);
        let mut step =
            DetectorStep::<_, 128>::new(backend, spec, config, &mut input, &mut head).unwrap();
        let mut found = Detections::<256>::new();
        step.detect(frame, &mut found).unwrap();
        boxes.push(found);
    }
    assert!(boxes[0].as_slice().len() >= 3, "{:?}", boxes[0].as_slice());
    assert!(boxes[0] == boxes[1], "Session and Int8Cpu boxes");
}

/// Telemetry on the flight side allocates nothing: building, encoding and framing messages as
/// CCSDS packets and as MAVLink 2, splitting a product into parts, queueing and sending items
/// under the downlink budget, and accepting a command from either framing.
#[test]
fn telemetry_and_commands_allocate_nothing() {
    use kestrel_wire::ccsds::{Decoder, Framer};
    use kestrel_wire::downlink::{DownlinkQueue, ItemWriter};
    use kestrel_wire::mavlink::{Incoming, MavlinkDecoder, MavlinkFramer, COMPONENT_ID};
    use kestrel_wire::message::{
        Detections, Event, ProductKind, Severity, Telemetry, WireBox, MAX_BOXES,
    };
    use kestrel_wire::{product, Command, CommandGate};

    let mut detections = Detections {
        frame: 1,
        capture_us: 2,
        boxes: heapless::Vec::new(),
        left_out: 0,
    };
    for i in 0..MAX_BOXES {
        let b = WireBox {
            x: i as f32,
            y: 0.0,
            w: 4.0,
            h: 4.0,
            class: 1,
            score: 0.5,
        };
        detections.boxes.push(b).unwrap();
    }
    let png: Vec<u8> = (0..3_000).map(|i| i as u8).collect();
    let (mut framer, mut gate, mut decoder) = (Framer::new(), CommandGate::new(), Decoder::new());
    let mut mav = MavlinkFramer::new(1, COMPONENT_ID);
    let mut ground = MavlinkFramer::new(255, 190);
    let mut mav_decoder: Box<MavlinkDecoder<256>> = Box::new(MavlinkDecoder::new());
    let mut queue: Box<DownlinkQueue<4, 8192>> = Box::new(DownlinkQueue::new(1 << 20, 1_000_000));
    let mut item = vec![0u8; 8192];
    let mut sent = vec![0u8; 16384];
    let mut scratch = [0u8; 2048];
    let mut command = [0u8; 300];
    let count = allocations_during(|| {
        for sequence in 1..=10u16 {
            let mut writer = ItemWriter::new(&mut item);
            writer
                .push(&Telemetry::Detections(detections.clone()))
                .unwrap();
            for part in product::split(7, 1, ProductKind::DetectionCrop, 1, &png).unwrap() {
                writer.push(&Telemetry::ProductPart(part)).unwrap();
            }
            queue.offer(writer.bytes(), 0.9);
            let now = u64::from(sequence);
            let len = if sequence % 2 == 0 {
                queue.send(now, &mut framer, &mut sent).unwrap()
            } else {
                queue.send(now, &mut mav, &mut sent).unwrap()
            };
            assert!(len > MAX_BOXES * 20 + png.len());
            let event = Telemetry::Event(Event {
                id: 1,
                severity: Severity::Info,
                args: [0; 3],
            });
            framer.frame(&event, &mut scratch).unwrap();
            mav.frame(&event, &mut scratch, &mut sent).unwrap();
            mav.heartbeat(&mut sent).unwrap();
            let packet = framer
                .frame_command(&Command::ReportHealth, 2 * sequence, &mut command)
                .unwrap();
            let (data, _) = decoder.next_command(packet).unwrap();
            gate.accept(data).unwrap();
            let len = ground
                .frame_command(
                    &Command::Pause,
                    2 * sequence + 1,
                    (1, COMPONENT_ID),
                    &mut command,
                )
                .unwrap();
            let (frame, _) = mav_decoder.next(&command[..len]).unwrap();
            let Incoming::Command { bytes, .. } = frame.incoming else {
                panic!("not a command: {frame:?}");
            };
            gate.accept(&bytes).unwrap();
        }
    });
    assert_eq!(count, 0);
}

/// A wait that blocks: the receive times out on an empty channel, the send on a full one,
/// each after crossbeam's spinning (well within the timeout), so each registers as a waiter.
fn wait_on(sender: &Sender<u32>, receiver: &Receiver<u32>) {
    let wait = Duration::from_millis(200);
    assert!(
        receiver.recv_timeout(wait).is_err(),
        "the channel starts empty"
    );
    while sender.try_send(7).is_ok() {}
    assert!(sender.send_timeout(8, wait).is_err(), "the channel is full");
    while receiver.try_recv().is_ok() {}
}

#[test]
fn a_first_wait_on_a_channel_allocates_unless_primed() {
    // Each case on a fresh thread: crossbeam's wait context is per thread.
    let first_wait = std::thread::spawn(|| {
        let (sender, receiver) = bounded::<u32>(2);
        allocations_during(|| wait_on(&sender, &receiver))
    });
    assert!(
        first_wait.join().unwrap() > 0,
        "crossbeam allocates on a first wait"
    );

    let primed = std::thread::spawn(|| {
        prime_thread();
        let (sender, receiver) = primed_channel::<u32>(2, Some(&|| 0));
        let during = allocations_during(|| wait_on(&sender, &receiver));
        (during, receiver.is_empty())
    });
    assert_eq!(
        primed.join().unwrap(),
        (0, true),
        "no allocation once primed, and the channel left empty"
    );

    // Without a filler only the receivers' waits are made: a first wait to send allocates.
    let receivers_only = std::thread::spawn(|| {
        prime_thread();
        let (sender, receiver) = primed_channel::<u32>(2, None);
        let wait = Duration::from_millis(200);
        let receive = allocations_during(|| assert!(receiver.recv_timeout(wait).is_err()));
        while sender.try_send(7).is_ok() {}
        let send = allocations_during(|| assert!(sender.send_timeout(8, wait).is_err()));
        (receive, send)
    });
    let (receive, send) = receivers_only.join().unwrap();
    assert_eq!(receive, 0, "the receivers' waits were made");
    assert!(send > 0, "the senders' were not");
}
