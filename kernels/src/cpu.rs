//! The int8 CPU backend: a plan's program, its arena and the fastest convolution kernels this CPU
//! has, all allocated once at load so that an inference allocates nothing.

use crate::program::{AlignedBytes, Program, ProgramError, Reference};
use crate::{Backend, BackendError};

/// Runs a plan on the CPU.
pub struct Int8Cpu {
    // Borrows `bytes`' heap buffer, which never moves or changes while `self` lives; declared
    // first so it is dropped first.
    program: Program<'static>,
    arena: std::vec::Vec<i8>,
    kernels: Reference,
    _bytes: AlignedBytes,
}

impl Int8Cpu {
    /// Copy, parse and verify a plan, and allocate its arena.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProgramError> {
        let bytes = AlignedBytes::new(bytes);
        // SAFETY: the slice points into `bytes`' heap allocation, which is owned by the returned
        // value, never mutated, never reallocated, and outlives `program` (field order).
        let stable: &'static [u8] = unsafe {
            core::slice::from_raw_parts(bytes.as_bytes().as_ptr(), bytes.as_bytes().len())
        };
        let program = Program::new(stable)?;
        Ok(Self {
            arena: std::vec![0; program.arena_size()],
            kernels: Reference,
            program,
            _bytes: bytes,
        })
    }

    /// The verified program.
    pub fn program(&self) -> &Program<'static> {
        &self.program
    }

    /// Quantise `input`, run the program, dequantise into `output`.
    pub fn infer(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), ProgramError> {
        self.program.quantize_input(input, &mut self.arena)?;
        self.program.run(&mut self.arena, &mut self.kernels)?;
        self.program.dequantize_output(&self.arena, output)
    }

    /// Which convolution kernels run: `"generic"`, `"avx2"`, ...
    pub fn kernel_name(&self) -> &'static str {
        "generic"
    }
}

impl Backend for Int8Cpu {
    fn name(&self) -> &'static str {
        "int8-cpu"
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
