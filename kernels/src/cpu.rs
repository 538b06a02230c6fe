//! The int8 CPU backend: a plan's program, its arena and the fastest convolution kernels this CPU
//! has, all allocated once at load so that an inference allocates nothing.

use crate::int8::{Add, Conv, ShapeError};
use crate::program::{Kernels, OwnedProgram, Program, ProgramError, Reference};
use crate::session::Session;
use crate::{Backend, BackendError};

/// The convolution kernels chosen for this CPU at load.
enum Chosen {
    Generic(Reference),
    #[cfg(target_arch = "x86_64")]
    Avx2(crate::avx2::Avx2),
    #[cfg(target_arch = "aarch64")]
    Neon(crate::neon::Neon),
}

impl Chosen {
    /// The fastest kernels this CPU runs, unless `generic` is asked for.
    fn detect(program: &Program<'_>, generic: bool) -> Self {
        #[cfg(target_arch = "x86_64")]
        if !generic {
            if let Some(avx2) = crate::avx2::Avx2::new(program) {
                return Self::Avx2(avx2);
            }
        }
        #[cfg(target_arch = "aarch64")]
        if !generic {
            if let Some(neon) = crate::neon::Neon::new(program) {
                return Self::Neon(neon);
            }
        }
        let _ = (program, generic);
        Self::Generic(Reference)
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Generic(_) => "generic",
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(_) => "avx2",
            #[cfg(target_arch = "aarch64")]
            Self::Neon(_) => "neon",
        }
    }
}

impl Kernels for Chosen {
    fn conv(
        &mut self,
        step: usize,
        conv: &Conv<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        match self {
            Self::Generic(k) => k.conv(step, conv, input, output),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(k) => k.conv(step, conv, input, output),
            #[cfg(target_arch = "aarch64")]
            Self::Neon(k) => k.conv(step, conv, input, output),
        }
    }

    fn add(&mut self, add: &Add, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        match self {
            Self::Generic(k) => k.add(add, a, b, output),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(k) => k.add(add, a, b, output),
            #[cfg(target_arch = "aarch64")]
            Self::Neon(k) => k.add(add, a, b, output),
        }
    }
}

/// Runs a plan on the CPU.
pub struct Int8Cpu {
    owned: OwnedProgram,
    arena: std::vec::Vec<i8>,
    kernels: Chosen,
}

impl Int8Cpu {
    /// Copy, parse and verify a plan, allocate its arena and prepare the fastest kernels this
    /// CPU has.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ProgramError> {
        Self::load(bytes, false)
    }

    /// As [`Int8Cpu::from_bytes`], with the generic kernels only: the reference to check
    /// faster ones against.
    pub fn generic(bytes: &[u8]) -> Result<Self, ProgramError> {
        Self::load(bytes, true)
    }

    fn load(bytes: &[u8], generic: bool) -> Result<Self, ProgramError> {
        let owned = OwnedProgram::new(bytes)?;
        let program = owned.program();
        // A corrupt or hostile plan may ask for gigabytes: a typed error, not an abort.
        let needed = program.arena_size();
        let mut arena = std::vec::Vec::new();
        arena
            .try_reserve_exact(needed)
            .map_err(|_| ProgramError::Arena { needed, got: 0 })?;
        arena.resize(needed, 0);
        Ok(Self {
            arena,
            kernels: Chosen::detect(program, generic),
            owned,
        })
    }

    /// The verified program.
    pub fn program(&self) -> &Program<'_> {
        self.owned.program()
    }

    /// Quantise `input`, run the program, dequantise into `output`: a [`Session`] over this
    /// backend's program, arena and kernels.
    pub fn infer(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), ProgramError> {
        Session::new(self.owned.program(), &mut self.arena, &mut self.kernels)?.infer(input, output)
    }

    /// The arena as the last [`Int8Cpu::infer`] left it: every tensor's codes, the output's
    /// among them (at `program().tensor(program().header().output_tensor)`).
    pub fn arena(&self) -> &[i8] {
        &self.arena
    }

    /// Which convolution kernels run: `"generic"`, `"avx2"`, ...
    pub fn kernel_name(&self) -> &'static str {
        self.kernels.name()
    }
}

impl Backend for Int8Cpu {
    fn name(&self) -> &'static str {
        "int8-cpu"
    }

    fn input_len(&self) -> usize {
        self.program().input_len()
    }

    fn output_len(&self) -> usize {
        self.program().output_len()
    }

    fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), BackendError> {
        self.check_lengths(input, output)?;
        self.infer(input, output)
            .map_err(|_| BackendError::Execution)
    }
}
