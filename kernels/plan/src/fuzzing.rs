//! The plan loader's fuzz harness, shared by the `cargo fuzz` target `plan_load` (`fuzz/` at the
//! repository root) and the bounded runs in `tests/tests/fuzz_corpus.rs`, so both check the same
//! things. It takes arbitrary bytes and panics only if an invariant breaks: loading and running
//! a plan must never panic, whatever the file or the memory an upset changed, only return typed
//! errors.

use kestrel_backend::{Backend, Landed, Scrub, Upset};
use kestrel_ops::table::KernelTable;
use kestrel_ops::Reference;

use crate::cpu::Int8Cpu;
use crate::program::{AlignedBytes, OwnedProgram, Program};

/// The largest arena the harness allocates and runs (a plan may ask for 4 GiB, which the loader
/// allocates fallibly; running it would only measure the machine). 256 KiB keeps each
/// execution in the fuzzer's time and memory limits.
pub const MAX_ARENA: usize = 1 << 18;

/// `bytes` as a plan file.
///
/// - A plan that loads also loads as an [`OwnedProgram`] whose scrub is clean; it runs on this
///   CPU's kernel table bit for bit as on the generic kernels, and once through [`Int8Cpu`] on a
///   zero input.
/// - A bit chosen by the input is flipped as an upset would ([`OwnedProgram::with_bit_flipped`]
///   and [`Backend::upset`]): the flipped program runs if it still parses, a scrub finds the
///   flip exactly when the CRCs cover it, and a restore brings back a clean plan.
/// - A file that fails its CRCs is also loaded past them ([`Program::new_unchecked_crcs`], the
///   view of memory an upset changed, and what a file with recomputed CRCs would reach) and run:
///   so the fuzzer explores the op list without having to forge CRCs.
pub fn plan_load(bytes: &[u8]) {
    let aligned = AlignedBytes::new(bytes);
    let checked = Program::new(aligned.as_bytes());
    let unchecked = Program::new_unchecked_crcs(aligned.as_bytes());
    assert!(
        checked.is_err() || unchecked.is_ok(),
        "a plan that loads must load without its CRC checks too"
    );
    match checked {
        Ok(program) => accepted(bytes, &program),
        Err(_) => {
            if let Ok(program) = unchecked {
                runs_alike(&program);
            }
        }
    }
}

/// The checks of [`plan_load`] on a plan that loaded.
fn accepted(bytes: &[u8], program: &Program<'_>) {
    let owned = OwnedProgram::new(bytes);
    assert!(
        matches!(owned.as_ref().map(OwnedProgram::scrub), Ok(Ok(()))),
        "a plan that loads must load owned and scrub clean"
    );
    let Ok(owned) = owned else {
        return;
    };
    runs_alike(program);

    // A bit of the plan copy (the CPU backend's model memory also holds its prepared weights,
    // which its own test covers).
    let bit = fnv1a(bytes) % (bytes.len() as u64 * 8).max(1);
    let (flipped, covered) = owned.with_bit_flipped(bit);
    match &flipped {
        Ok(flipped) => {
            assert!(
                flipped.scrub().is_err() == covered,
                "a scrub finds a flipped bit exactly when the CRCs cover it"
            );
            runs_alike(flipped.program());
        }
        Err(_) => assert!(
            covered,
            "a flip in padding nothing reads cannot break a plan"
        ),
    }

    if program.arena_size() > MAX_ARENA {
        return;
    }
    let cpu = Int8Cpu::from_bytes(bytes);
    assert!(
        cpu.is_ok(),
        "a plan that loads, with a small arena, loads on the CPU"
    );
    let Ok(mut cpu) = cpu else {
        return;
    };
    let input = vec![0.0f32; cpu.input_len()];
    let mut output = vec![0.0f32; cpu.output_len()];
    let _ = cpu.infer(&input, &mut output);
    assert!(
        cpu.scrub() == Scrub::Clean,
        "an inference changes no plan byte"
    );

    let landed = cpu.upset(Upset::Model { bit });
    assert!((landed == Landed::Checked) == covered);
    let _ = cpu.run(&input, &mut output);
    assert!(
        (cpu.scrub() == Scrub::Corrupt) == covered,
        "a scrub finds an upset exactly where the CRCs cover it"
    );
    assert!(cpu.restore().is_ok(), "the golden copy restores");
    assert!(cpu.scrub() == Scrub::Clean, "a restored plan scrubs clean");
    let _ = cpu.run(&input, &mut output);

    cpu.upset(Upset::Activations { bit });
    let _ = cpu.run(&input, &mut output);
    assert!(
        cpu.scrub() == Scrub::Clean,
        "an activation upset changes no plan byte"
    );
}

/// Run `program` on a zero input with this CPU's kernel table and with the generic kernels: no
/// panic, and the same result and every arena byte the same (the table's contract).
fn runs_alike(program: &Program<'_>) {
    let size = program.arena_size();
    if size > MAX_ARENA {
        return;
    }
    let input = vec![0.0f32; program.input_len()];
    let mut table = KernelTable::for_this_cpu(&program.convs(), &program.convs16());
    let mut arenas = [vec![0i8; size], vec![0i8; size]];
    let [fast, generic] = &mut arenas;
    let quantized = program.quantize_input(&input, fast);
    assert!(quantized.is_ok(), "a loaded program takes its own input");
    let _ = program.quantize_input(&input, generic);
    let results = [
        program.run(fast, &mut table),
        program.run(generic, &mut Reference),
    ];
    assert!(
        results[0] == results[1],
        "this CPU's kernels and the generic ones agree: {results:?}"
    );
    assert!(
        fast == generic,
        "this CPU's kernels write every arena byte as the generic ones do"
    );
    let mut output = vec![0.0f32; program.output_len()];
    let _ = program.dequantize_output(fast, &mut output);
}

/// FNV-1a 64 of `bytes`: where an input's upset lands.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
