//! The int8 program as a [`Backend`] over an arena its caller owns: what a board without `std`
//! or a heap runs (a microcontroller, with the plan in flash and the arena in a static buffer).
//! [`crate::cpu::Int8Cpu`] is the same on a host, owning its plan copy and arena.

use kestrel_backend::{Backend, BackendError};
use kestrel_ops::{Kernels, Reference};

use crate::program::{Program, ProgramError};

/// A verified program, a caller's arena and the kernels to run it with.
///
/// ```
/// use kestrel_ops::Reference;
/// use kestrel_plan::program::Program;
/// use kestrel_plan::session::Session;
/// # fn demo(plan: &[u8], arena: &mut [i8], input: &[f32], output: &mut [f32])
/// #     -> Result<(), kestrel_plan::program::ProgramError> {
/// let program = Program::new(plan)?;
/// let mut session = Session::new(&program, arena, Reference)?;
/// session.infer(input, output)?;
/// # Ok(())
/// # }
/// ```
pub struct Session<'p, 'a, K = Reference> {
    program: &'p Program<'p>,
    arena: &'a mut [i8],
    kernels: K,
}

impl<'p, 'a, K: Kernels> Session<'p, 'a, K> {
    /// A session over `arena`, which must hold at least [`Program::arena_size`] bytes.
    pub fn new(
        program: &'p Program<'p>,
        arena: &'a mut [i8],
        kernels: K,
    ) -> Result<Self, ProgramError> {
        if arena.len() < program.arena_size() {
            return Err(ProgramError::Arena {
                needed: program.arena_size(),
                got: arena.len(),
            });
        }
        Ok(Self {
            program,
            arena,
            kernels,
        })
    }

    /// The program this session runs.
    pub fn program(&self) -> &'p Program<'p> {
        self.program
    }

    /// Quantise `input`, run the program, dequantise into `output`. Allocates nothing.
    pub fn infer(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), ProgramError> {
        self.program.quantize_input(input, self.arena)?;
        self.program.run(self.arena, &mut self.kernels)?;
        self.program.dequantize_output(self.arena, output)
    }

    /// The arena as the last [`Session::infer`] left it: every tensor's codes, the output's
    /// among them.
    pub fn arena(&self) -> &[i8] {
        self.arena
    }
}

impl<K: Kernels> Backend for Session<'_, '_, K> {
    fn name(&self) -> &'static str {
        "int8"
    }

    fn input_len(&self) -> usize {
        self.program.input_len()
    }

    fn output_len(&self) -> usize {
        self.program.output_len()
    }

    fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), BackendError> {
        self.check_lengths(input, output)?;
        self.infer(input, output)
            .map_err(|_| BackendError::Execution)
    }
}
