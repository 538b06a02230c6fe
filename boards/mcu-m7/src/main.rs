//! Kestrel on a Cortex-M7: the built-in EuroSAT int8 plan, read in place from flash, classifies a
//! committed 64x64 chip through `ClassifierStep` and the `no_std` session (generic kernels, the
//! arena on the stack), with no heap. It prints over semihosting:
//!
//! ```text
//! kestrel-board-m7: eurosat-rgb, arena 73728 bytes
//! class 8 River
//! codes -4293 -3142 ...
//! ```
//!
//! `codes` are the plan's output codes (its 16-bit logits before dequantisation), which
//! `tests/tests/mcu.rs` checks byte for byte against the host executor on the same chip.
#![no_std]
#![no_main]

use core::fmt::Write as _;

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hio};
use kestrel_backend::Backend;
use kestrel_ops::Reference;
use kestrel_plan::program::Program;
use kestrel_plan::session::Session;
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::health::Health;
use kestrel_runtime::step::ClassifierStep;
use kestrel_runtime::{FrameGeometry, MonotonicClock};

/// `sim/sample/eurosat-rgb/River/River_105.jpg`, decoded to 64x64 RGB bytes (see the README).
static CHIP: &[u8; 64 * 64 * 3] = include_bytes!("../chip.rgb");
/// Room for the plan's arena, on the stack.
const ARENA_BYTES: usize = 96 * 1024;
/// Room for the model's input and output.
const INPUT_VALUES: usize = 3 * 64 * 64;
const OUTPUT_VALUES: usize = 16;

/// QEMU emulates no cycle counter, so latencies are not measured here: every reading is 0.
struct NoClock;

impl MonotonicClock for NoClock {
    fn now_us(&self) -> u64 {
        0
    }
}

#[entry]
fn main() -> ! {
    let mut out = match hio::hstdout() {
        Ok(out) => out,
        Err(()) => exit(false),
    };
    let ok = run(&mut out).map_err(|why| {
        let _ = writeln!(out, "error: {why}");
    });
    exit(ok.is_ok())
}

fn run(out: &mut impl core::fmt::Write) -> Result<(), &'static str> {
    let entry = kestrel_zoo::EUROSAT_RGB;
    let program = Program::new(entry.plan).map_err(|_| "the plan does not load")?;
    let header = program.header();
    let spec = header
        .preprocess_spec()
        .map_err(|_| "the plan's preprocessing is unusable")?;
    let _ = writeln!(
        out,
        "kestrel-board-m7: {}, arena {} bytes",
        header.name,
        program.arena_size()
    );
    let mut arena = [0i8; ARENA_BYTES];
    let mut session =
        Session::new(&program, &mut arena, Reference).map_err(|_| "the arena is too small")?;
    let outputs = session.output_len();
    let mut input = [0.0f32; INPUT_VALUES];
    let mut output = [0.0f32; OUTPUT_VALUES];
    let (input, output) = match (input.get_mut(..spec.input_len()), output.get_mut(..outputs)) {
        (Some(input), Some(output)) => (input, output),
        _ => return Err("the model's input or output is larger than this board's buffers"),
    };
    let mut step = ClassifierStep::new(&mut session, spec, input, output)
        .map_err(|_| "the step does not fit the model")?;
    let geometry = FrameGeometry {
        width: 64,
        height: 64,
        bands: 3,
    };
    let frame = FrameView::new(geometry, &CHIP[..]).map_err(|_| "the chip is not 64x64x3")?;
    let mut health = Health::default();
    let (classification, _) = step
        .process(frame, &NoClock, &mut health)
        .map_err(|_| "classification failed")?;
    let class = usize::from(classification.class());
    let label = header.labels().nth(class).unwrap_or("?");
    let _ = writeln!(out, "class {class} {label}");
    let codes = program
        .tensor(header.output_tensor)
        .and_then(|range| session.arena().get(range))
        .ok_or("the output tensor is outside the arena")?;
    let _ = write!(out, "codes");
    for i in 0..program.output_len() {
        let _ = write!(out, " {}", program.output_width().load(codes, i));
    }
    let _ = writeln!(out);
    Ok(())
}

fn exit(success: bool) -> ! {
    debug::exit(if success {
        debug::EXIT_SUCCESS
    } else {
        debug::EXIT_FAILURE
    });
    // Only reached when no debugger or emulator answers the exit call.
    loop {
        cortex_m::asm::wfi();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    if let Ok(mut out) = hio::hstdout() {
        let _ = writeln!(out, "panic: {info}");
    }
    exit(false)
}
