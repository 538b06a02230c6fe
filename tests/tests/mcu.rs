//! The Cortex-M7 board example (`boards/mcu-m7`) under QEMU's system emulator gives the host
//! executor's bytes: the EuroSAT int8 plan on the same committed chip, the same class and the
//! same output codes (its logits are 16-bit).
//!
//! The test builds the example for `thumbv7em-none-eabihf` and boots it on `qemu-system-arm`'s
//! `mps2-an500`. `.ci/run` installs both; where either is missing the test says so and skips.

use std::path::Path;
use std::process::Command;

use kestrel_plan::cpu::Int8Cpu;
use kestrel_runtime::frame::FrameView;
use kestrel_runtime::health::Health;
use kestrel_runtime::step::ClassifierStep;
use kestrel_runtime::FrameGeometry;

/// What the board printed: the class index and the output codes.
fn parse(output: &str) -> (usize, Vec<i32>) {
    let line = |prefix: &str| {
        output
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no '{prefix}' line in:\n{output}"))
    };
    let class = line("class ").split(' ').next().unwrap().parse().unwrap();
    let codes = line("codes ")
        .split(' ')
        .map(|c| c.parse().unwrap())
        .collect();
    (class, codes)
}

#[test]
fn the_mcu_example_matches_the_host_executor_byte_for_byte() {
    let board = Path::new(env!("CARGO_MANIFEST_DIR")).join("../boards/mcu-m7");
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("thumbv7em-none-eabihf"));
    let qemu = Command::new("qemu-system-arm")
        .arg("--version")
        .output()
        .is_ok();
    if !installed || !qemu {
        eprintln!(
            "SKIPPED: needs the thumbv7em-none-eabihf target ({installed}) and qemu-system-arm \
             ({qemu}); bash .ci/run installs both"
        );
        return;
    }
    let run = Command::new(env!("CARGO"))
        .args(["run", "--release", "--quiet"])
        .current_dir(&board)
        .env("CARGO_TARGET_DIR", board.join("target"))
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the board failed:\n{printed}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let (class, codes) = parse(&printed);

    let entry = kestrel_zoo::EUROSAT_RGB;
    let mut host = Int8Cpu::from_bytes(entry.plan).unwrap();
    let spec = host.program().header().preprocess_spec().unwrap();
    let chip = std::fs::read(board.join("chip.rgb")).unwrap();
    let geometry = FrameGeometry {
        width: 64,
        height: 64,
        bands: 3,
    };
    let (mut input, mut output) = (vec![0.0; spec.input_len()], vec![0.0; 10]);
    let mut step = ClassifierStep::new(&mut host, spec, &mut input, &mut output).unwrap();
    let frame = FrameView::new(geometry, &chip).unwrap();
    let (on_host, _) = step
        .process(
            frame,
            &kestrel_host::HostClock::default(),
            &mut Health::default(),
        )
        .unwrap();
    let program = host.program();
    let range = program.tensor(program.header().output_tensor).unwrap();
    let bytes = &host.arena()[range];
    let width = program.output_width();
    let host_codes: Vec<i32> = (0..program.output_len())
        .map(|i| width.load(bytes, i))
        .collect();

    assert_eq!(class, usize::from(on_host.class()), "{printed}");
    assert_eq!(codes, host_codes, "output codes, board against host");
    assert_eq!(width, kestrel_ops::int16::Width::I16, "16-bit logits");
    assert_eq!(
        program.header().labels().nth(class),
        Some("River"),
        "the chip is River_105"
    );
}
