//! The int8 CPU backend: a plan's program, its arena and the kernel table for this CPU, all
//! allocated once at load so that an inference allocates nothing.

use kestrel_backend::{Backend, BackendError, Landed, Scrub, Upset};
use kestrel_ops::table::KernelTable;
use kestrel_ops::Kernels;

use crate::program::{AlignedBytes, OwnedProgram, Program, ProgramError};
use crate::session::Session;

/// Runs a plan on the CPU.
pub struct Int8Cpu {
    owned: OwnedProgram,
    arena: std::vec::Vec<i8>,
    kernels: KernelTable,
    /// The plan as loaded, verified: what a failed scrub restores from.
    golden: AlignedBytes,
    generic: bool,
    /// Why the program in memory cannot run, after an upset broke its structure.
    broken: Option<ProgramError>,
    /// Injected activation upsets waiting for the next inference.
    activation_upsets: std::vec::Vec<u64>,
    /// CRC-32 of the weights the kernels prepared at load (packed for SIMD, transformed for
    /// Winograd): a second copy of the weights in memory, which the plan's CRCs do not cover.
    prepared_crc: u32,
}

/// CRC-32 of the weights `kernels` prepared, in their little-endian bytes.
fn prepared_crc(kernels: &KernelTable) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    let mut bytes = [0u8; 4096];
    kernels.prepared_weights(&mut |block| {
        for words in block.chunks(bytes.len() / 4) {
            for (to, word) in bytes.chunks_exact_mut(4).zip(words) {
                to.copy_from_slice(&word.to_le_bytes());
            }
            hasher.update(bytes.get(..words.len() * 4).unwrap_or_default());
        }
    });
    hasher.finalize()
}

/// Bits of the weights `kernels` prepared.
fn prepared_bits(kernels: &KernelTable) -> u64 {
    let mut bits = 0;
    kernels.prepared_weights(&mut |block| bits += block.len() as u64 * 32);
    bits
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
        let golden = AlignedBytes::new(bytes);
        let program = owned.program();
        // A corrupt or hostile plan may ask for gigabytes: a typed error, not an abort.
        let needed = program.arena_size();
        let mut arena = std::vec::Vec::new();
        arena
            .try_reserve_exact(needed)
            .map_err(|_| ProgramError::Arena { needed, got: 0 })?;
        arena.resize(needed, 0);
        let kernels = if generic {
            KernelTable::generic()
        } else {
            KernelTable::for_this_cpu(&program.convs(), &program.convs16())
        };
        Ok(Self {
            arena,
            prepared_crc: prepared_crc(&kernels),
            kernels,
            owned,
            golden,
            generic,
            broken: None,
            activation_upsets: std::vec::Vec::new(),
        })
    }

    /// The verified program.
    pub fn program(&self) -> &Program<'_> {
        self.owned.program()
    }

    /// Quantise `input`, run the program, dequantise into `output`: a [`Session`] over this
    /// backend's program, arena and kernels.
    pub fn infer(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), ProgramError> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        if self.activation_upsets.is_empty() {
            return Session::new(self.owned.program(), &mut self.arena, &mut self.kernels)?
                .infer(input, output);
        }
        // Injected upsets: each flips one bit of one layer's output before the next layer
        // reads it.
        let upsets = std::mem::take(&mut self.activation_upsets);
        let program = self.owned.program();
        let layers = program.step_count().max(1) as u64;
        program.quantize_input(input, &mut self.arena)?;
        program.run_observed(&mut self.arena, &mut self.kernels, |index, out| {
            let len = out.len() as u64 * 8;
            for bit in upsets.iter().filter(|&&b| (b % layers) as usize == index) {
                let at = (bit / layers) % len.max(1);
                if let Some(code) = out.get_mut((at / 8) as usize) {
                    *code ^= 1 << (at % 8);
                }
            }
        })?;
        program.dequantize_output(&self.arena, output)
    }

    /// The arena as the last [`Int8Cpu::infer`] left it: every tensor's codes, the output's
    /// among them (at `program().tensor(program().header().output_tensor)`).
    pub fn arena(&self) -> &[i8] {
        &self.arena
    }

    /// Which convolution kernels run (the op that dominates run time): `"generic"`, `"avx2"`
    /// (`"avx-vnni"` or `"avx512-vnni"` where the CPU has 8-bit dot products), `"neon"`
    /// (`"neon-dotprod"` with `sdot`, `"neon-i8mm"` with `smmla`).
    pub fn kernel_name(&self) -> &'static str {
        self.kernels.conv.name
    }

    /// Which kernels run each op.
    pub fn kernel_names(&self) -> std::vec::Vec<(&'static str, &'static str)> {
        self.kernels.names()
    }
}

/// Scrubbing and upsets: the plan copy in memory is checked against its own CRCs, and restored
/// from the golden copy kept at load (itself checked as it is parsed again).
impl Int8Cpu {
    fn scrub_plan(&self) -> Scrub {
        let prepared_clean = prepared_crc(&self.kernels) == self.prepared_crc;
        match (self.broken, self.owned.scrub()) {
            (None, Ok(())) if prepared_clean => Scrub::Clean,
            _ => Scrub::Corrupt,
        }
    }

    fn restore_plan(&mut self) -> Result<(), ProgramError> {
        *self = Self::load(self.golden.as_bytes(), self.generic)?;
        Ok(())
    }

    /// Flip bit `bit` of the model in memory: the plan copy, or the weights the kernels
    /// prepared from it, taken as one run of bits.
    fn flip_model_bit(&mut self, bit: u64) -> Landed {
        let plan_bits = self.owned.bytes().len() as u64 * 8;
        let total = plan_bits + prepared_bits(&self.kernels);
        let bit = bit % total.max(1);
        if bit >= plan_bits {
            // Every prepared word is under the prepared CRC.
            return if self.kernels.flip_prepared_bit(bit - plan_bits) {
                Landed::Checked
            } else {
                Landed::Missed
            };
        }
        let (flipped, covered) = self.owned.with_bit_flipped(bit);
        match flipped {
            Ok(owned) => self.owned = owned,
            // The damage breaks the op list or the tables (covered bytes): nothing runs, and
            // the scrub reports it, until a restore.
            Err(e) => self.broken = Some(e),
        }
        if covered {
            Landed::Checked
        } else {
            Landed::Unchecked
        }
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

    fn scrub(&mut self) -> Scrub {
        self.scrub_plan()
    }

    fn restore(&mut self) -> Result<(), BackendError> {
        self.restore_plan().map_err(|_| BackendError::Execution)
    }

    fn upset(&mut self, upset: Upset) -> Landed {
        match upset {
            Upset::Model { bit } => self.flip_model_bit(bit),
            Upset::Activations { bit } => {
                self.activation_upsets.push(bit);
                Landed::Unchecked
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use kestrel_ops::Reference;

    use super::*;
    use crate::program::AlignedBytes;

    fn eurosat() -> AlignedBytes {
        AlignedBytes::new(include_bytes!("../../../models/zoo/eurosat-rgb/model.plan"))
    }

    #[test]
    fn plug_ins_replace_only_what_this_cpu_runs_faster() {
        let bytes = eurosat();
        let program = Program::new(bytes.as_bytes()).unwrap();
        assert!(KernelTable::generic()
            .names()
            .iter()
            .all(|&(_, name)| name == "generic"));
        let table = KernelTable::for_this_cpu(&program.convs(), &program.convs16());
        let names = table.names();
        let plugged: Vec<_> = names.iter().filter(|(_, n)| *n != "generic").collect();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let conv = kestrel_ops::avx2::Avx2::new(&[]).unwrap().name();
            let lut = if std::arch::is_x86_feature_detected!("avx512vbmi") {
                "avx512-vbmi"
            } else {
                println!("this CPU has no AVX-512 VBMI: Lut runs on AVX2");
                "avx2"
            };
            let expected = [
                ("conv", conv),
                ("gemm", "avx2"),
                ("add", "avx2"),
                ("mul", "avx2"),
                ("global_average_pool", "avx2"),
                ("max_pool", "avx2"),
                ("lut", lut),
                ("rescale", "avx2"),
                ("conv16", conv),
                ("elementwise16", "avx2"),
            ];
            assert_eq!(plugged, expected.iter().collect::<Vec<_>>());
        } else {
            println!("this CPU has no AVX2: the table stays generic but for 16-bit rows");
            assert_eq!(plugged, [&("conv16", "rows")]);
        }
        #[cfg(target_arch = "aarch64")]
        {
            let conv = kestrel_ops::neon::Neon::new(&[]).unwrap().name();
            let expected = [("conv", conv), ("max_pool", "neon"), ("conv16", "rows")];
            assert_eq!(plugged, expected.iter().collect::<Vec<_>>());
        }
        #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
        assert_eq!(plugged, [&("conv16", "rows")]);
    }

    #[test]
    fn the_table_runs_a_real_plan_to_the_generic_bits() {
        let bytes = eurosat();
        let program = Program::new(bytes.as_bytes()).unwrap();
        let input: Vec<f32> = (0..program.input_len())
            .map(|i| ((i * 37) % 255) as f32 / 64.0 - 2.0)
            .collect();
        let mut arenas = [
            vec![0i8; program.arena_size()],
            vec![0i8; program.arena_size()],
        ];
        program.quantize_input(&input, &mut arenas[0]).unwrap();
        program.quantize_input(&input, &mut arenas[1]).unwrap();
        program.run(&mut arenas[0], &mut Reference).unwrap();
        let mut table = KernelTable::for_this_cpu(&program.convs(), &program.convs16());
        program.run(&mut arenas[1], &mut table).unwrap();
        assert!(
            arenas[0] == arenas[1],
            "every arena byte, intermediates included"
        );
    }

    #[test]
    fn every_upset_in_checked_memory_is_found_and_a_restore_heals_it() {
        let bytes = eurosat();
        let mut cpu = Int8Cpu::from_bytes(bytes.as_bytes()).unwrap();
        let input: Vec<f32> = (0..cpu.input_len())
            .map(|i| (i % 7) as f32 / 3.0 - 1.0)
            .collect();
        let mut clean = vec![0.0; cpu.output_len()];
        cpu.run(&input, &mut clean).unwrap();
        assert_eq!(cpu.scrub(), Scrub::Clean);
        let plan_bits = bytes.as_bytes().len() as u64 * 8;
        let bits = plan_bits + prepared_bits(&cpu.kernels);
        let (mut checked, mut unchecked, mut prepared) = (0, 0, 0);
        // About 500 bits spread over the whole plan (the preamble, table, every section and
        // padding), then over the weights the SIMD kernels packed from it; each restore packs
        // again, which under qemu is what the test's time goes on: CI runs the aarch64 build
        // there, so it samples 150.
        let samples: u32 = if cfg!(target_arch = "aarch64") {
            150
        } else {
            500
        };
        for bit in (0..bits).step_by((bits / u64::from(samples)).max(1) as usize) {
            match cpu.upset(Upset::Model { bit }) {
                Landed::Checked => {
                    checked += 1;
                    prepared += u32::from(bit >= plan_bits);
                    assert_eq!(cpu.scrub(), Scrub::Corrupt, "bit {bit} in checked memory");
                }
                Landed::Unchecked => {
                    unchecked += 1;
                    assert_eq!(cpu.scrub(), Scrub::Clean, "bit {bit} is padding");
                }
                Landed::Missed => panic!("the plan is this backend's memory"),
            }
            // Never a panic, whatever the damage: a result or a typed error.
            let mut output = vec![0.0; cpu.output_len()];
            let _ = cpu.run(&input, &mut output);
            cpu.restore().unwrap();
            assert_eq!(cpu.scrub(), Scrub::Clean);
            cpu.run(&input, &mut output).unwrap();
            assert_eq!(output, clean, "bit {bit}: restored bit for bit");
        }
        assert!(
            checked > samples * 4 / 5,
            "{checked} checked, {unchecked} unchecked"
        );
        if cpu.kernel_name() == "generic" {
            println!("this CPU runs the generic kernels: no prepared weights to upset");
        } else {
            assert!(prepared > samples / 10, "{prepared} in the packed weights");
        }
        // An activation upset changes one inference, and only that one.
        let mut output = vec![0.0; cpu.output_len()];
        for bit in 0..50 {
            assert_eq!(
                cpu.upset(Upset::Activations { bit: bit * 7_919 }),
                Landed::Unchecked
            );
        }
        cpu.run(&input, &mut output).unwrap();
        assert_ne!(
            output, clean,
            "50 flipped activation bits show in the output"
        );
        cpu.run(&input, &mut output).unwrap();
        assert_eq!(output, clean);
        assert_eq!(
            cpu.scrub(),
            Scrub::Clean,
            "activations are not the scrub's to see"
        );
    }

    #[test]
    fn a_16_bit_layer_s_prepared_weights_are_scrubbed() {
        let bytes = AlignedBytes::new(include_bytes!(
            "../../../fuzz/corpus/plan_load/sixteen-bit-classifier.plan"
        ));
        let mut cpu = Int8Cpu::from_bytes(bytes.as_bytes()).unwrap();
        let program = Program::new(bytes.as_bytes()).unwrap();
        let channels: usize = (program.convs16().iter().flatten())
            .map(|conv| conv.geometry.output[0])
            .sum();
        assert!(channels > 0, "a plan with 16-bit convolutions");
        let input: Vec<f32> = (0..cpu.input_len())
            .map(|i| (i % 5) as f32 / 2.0 - 1.0)
            .collect();
        let mut clean = vec![0.0; cpu.output_len()];
        cpu.run(&input, &mut clean).unwrap();
        assert_eq!(cpu.scrub(), Scrub::Clean);
        // At least a magnitude per output channel; the 16-bit layers' words are visited last.
        let plan_bits = bytes.as_bytes().len() as u64 * 8;
        let prepared = prepared_bits(&cpu.kernels);
        assert!(prepared >= 32 * channels as u64, "{prepared} prepared bits");
        for back in [1, 32 * channels as u64 / 2, 32 * channels as u64] {
            let bit = plan_bits + prepared - back;
            assert_eq!(cpu.upset(Upset::Model { bit }), Landed::Checked);
            assert_eq!(cpu.scrub(), Scrub::Corrupt, "{back} bits from the end");
            cpu.restore().unwrap();
            assert_eq!(cpu.scrub(), Scrub::Clean);
            let mut output = vec![0.0; cpu.output_len()];
            cpu.run(&input, &mut output).unwrap();
            assert_eq!(output, clean, "restored bit for bit");
        }
    }
}
