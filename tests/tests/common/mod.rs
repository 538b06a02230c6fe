//! Helpers shared by integration tests that cannot live in the `kestrel-tests` library (they
//! need its dev-dependencies, such as the CUDA emulator).

use kestrel_cuda::emulator::Emulator;
use kestrel_ops::Reference;
use kestrel_plan::program::OwnedProgram;

/// The CUDA kernels, on their CPU emulator, run `plan` on `input` to the generic executor's
/// arena, byte for byte.
pub fn assert_cuda_emulator_matches_the_generic_executor(plan: &[u8], input: &[f32]) {
    let owned = OwnedProgram::new(plan).unwrap();
    let program = owned.program();
    let mut expected = vec![0i8; program.arena_size()];
    program.quantize_input(input, &mut expected).unwrap();
    let mut arena = expected.clone();
    program.run(&mut expected, &mut Reference).unwrap();
    Emulator::new(program)
        .unwrap()
        .run_arenas(&mut arena)
        .unwrap();
    assert!(
        arena == expected,
        "the CUDA emulator's arena differs from the generic executor's"
    );
}
