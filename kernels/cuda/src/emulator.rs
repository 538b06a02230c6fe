//! The CUDA kernels compiled as C++ (`emulator.cpp`) and run one thread after another on the
//! CPU, over the very launches [`DeviceProgram`] plans for the GPU. Tests use it to check the
//! kernels and their planning bit for bit against the generic executor on machines without a
//! GPU. It says nothing about speed, data races or the driver.

use super::launch::{chunks, Args, Bases, DeviceProgram, Launch, BLOCK, MAX_BATCH};
use super::{decoded_tiles, CudaError, DecodedTile, PeakSearch};
use kestrel_plan::program::{AlignedBytes, Program};

use super::launch::{
    AttentionArgs, ConvArgs, DecodeArgs, ElementwiseArgs, PoolArgs, PreprocessArgs, ResizeArgs,
};

extern "C" {
    fn kestrel_conv_emulated(grid_x: u32, grid_y: u32, block: u32, args: *const ConvArgs);
    fn kestrel_conv_dp4a_emulated(grid_x: u32, grid_y: u32, block: u32, args: *const ConvArgs);
    fn kestrel_decode_emulated(grid_x: u32, grid_y: u32, block: u32, args: *const DecodeArgs);
    fn kestrel_attention_emulated(grid_x: u32, grid_y: u32, block: u32, args: *const AttentionArgs);
    fn kestrel_add_emulated(grid_x: u32, grid_y: u32, block: u32, args: *const ElementwiseArgs);
    fn kestrel_mul_emulated(grid_x: u32, grid_y: u32, block: u32, args: *const ElementwiseArgs);
    fn kestrel_rescale_emulated(grid_x: u32, grid_y: u32, block: u32, args: *const ElementwiseArgs);
    fn kestrel_lut_emulated(grid_x: u32, grid_y: u32, block: u32, args: *const ElementwiseArgs);
    fn kestrel_gather_emulated(grid_x: u32, grid_y: u32, block: u32, args: *const ElementwiseArgs);
    fn kestrel_max_pool_emulated(grid_x: u32, grid_y: u32, block: u32, args: *const PoolArgs);
    fn kestrel_average_pool_emulated(grid_x: u32, grid_y: u32, block: u32, args: *const PoolArgs);
    fn kestrel_global_average_pool_emulated(
        grid_x: u32,
        grid_y: u32,
        block: u32,
        args: *const PoolArgs,
    );
    fn kestrel_resize_emulated(grid_x: u32, grid_y: u32, block: u32, args: *const ResizeArgs);
    fn kestrel_preprocess_emulated(
        grid_x: u32,
        grid_y: u32,
        block: u32,
        args: *const PreprocessArgs,
    );
    fn kestrel_conv16_emulated(grid_x: u32, grid_y: u32, block: u32, args: *const ConvArgs);
    fn kestrel_add16_emulated(grid_x: u32, grid_y: u32, block: u32, args: *const ElementwiseArgs);
    fn kestrel_mul16_emulated(grid_x: u32, grid_y: u32, block: u32, args: *const ElementwiseArgs);
    fn kestrel_global_average_pool16_emulated(
        grid_x: u32,
        grid_y: u32,
        block: u32,
        args: *const PoolArgs,
    );
    fn kestrel_function16_emulated(
        grid_x: u32,
        grid_y: u32,
        block: u32,
        args: *const ElementwiseArgs,
    );
    fn kestrel_args_sizes(which: u32) -> core::ffi::c_ulong;
}

/// Sizes of `ConvArgs`, `ElementwiseArgs`, `PoolArgs`, `ResizeArgs`, `PreprocessArgs`,
/// `DecodeArgs` and `AttentionArgs` as the C++ compiler lays them out, to check against the Rust mirrors.
pub fn c_struct_sizes() -> [usize; 7] {
    // SAFETY: a pure function of its argument.
    core::array::from_fn(|i| unsafe { kestrel_args_sizes(i as u32) } as usize)
}

/// A plan's launches and a copy of its weights, run on the CPU.
pub struct Emulator {
    program: DeviceProgram,
    weights: AlignedBytes,
}

impl Emulator {
    /// Plan `program`'s launches, as the GPU session does.
    pub fn new(program: &Program<'_>) -> Result<Self, CudaError> {
        Ok(Self {
            program: DeviceProgram::new(program)?,
            weights: AlignedBytes::new(program.weights()),
        })
    }

    /// The planned launches.
    pub fn device_program(&self) -> &DeviceProgram {
        &self.program
    }

    /// Every step on each of the arenas `arenas` holds back to back (inputs filled in).
    pub fn run_arenas(&self, arenas: &mut [i8]) -> Result<(), CudaError> {
        self.run_chunks(arenas, MAX_BATCH)
    }

    /// As [`Emulator::run_arenas`], in chunks of `chunk` arenas as the GPU session runs a
    /// larger batch.
    pub fn run_chunks(&self, arenas: &mut [i8], chunk: u32) -> Result<(), CudaError> {
        let batch = self.batch(arenas)?;
        for items in chunks(batch, chunk) {
            for launch in &self.program.launches {
                self.launch_items(launch, arenas, items.clone());
            }
        }
        Ok(())
    }

    /// Fill each arena's input tensor from `frame` (u8 HWC) at `origins` with `preprocess`
    /// (from [`DeviceProgram::preprocess`]); one origin per arena.
    pub fn preprocess(
        &self,
        preprocess: &Launch,
        frame: &[u8],
        origins: &[(u32, u32)],
        arenas: &mut [i8],
    ) -> Result<(), CudaError> {
        let batch = self.batch(arenas)?;
        let Args::Preprocess(args) = preprocess.args else {
            return Err(CudaError::driver("not a preprocessing launch"));
        };
        let expected = usize::try_from(args.frame_width).unwrap_or(0)
            * usize::try_from(args.frame_height).unwrap_or(0)
            * usize::try_from(args.bands).unwrap_or(0);
        if frame.len() != expected {
            return Err(CudaError::Length {
                expected,
                got: frame.len(),
            });
        }
        if origins.len() != batch as usize {
            return Err(CudaError::Length {
                expected: batch as usize,
                got: origins.len(),
            });
        }
        let flat: Vec<i32> = origins
            .iter()
            .flat_map(|&(x, y)| [x as i32, y as i32])
            .collect();
        let mut launch = *preprocess;
        launch.args = Args::Preprocess(PreprocessArgs {
            frame: frame.as_ptr() as u64,
            origins: flat.as_ptr() as u64,
            ..args
        });
        self.launch(&launch, arenas, batch);
        Ok(())
    }

    /// Decode each arena's output, a detector head, as `search` says and the GPU session does.
    pub fn decode(&self, arenas: &[i8], search: PeakSearch) -> Result<Vec<DecodedTile>, CudaError> {
        let batch = self.batch(arenas)? as usize;
        let capacity = search.capacity;
        let launch = self.program.decode(search)?;
        let Args::Decode(args) = launch.args else {
            return Err(CudaError::driver("not a decoding launch"));
        };
        let mut counts = vec![0i32; batch];
        let mut words = vec![0i32; batch * capacity as usize * 3];
        let mut launch = launch;
        launch.args = Args::Decode(DecodeArgs {
            candidates: words.as_mut_ptr() as u64,
            counts: counts.as_mut_ptr() as u64,
            ..args
        });
        // The kernel only reads the arenas; `launch` takes them mutably for the other kernels.
        let mut arenas = arenas.to_vec();
        self.launch(&launch, &mut arenas, batch as u32);
        let heads: Vec<i8> = arenas
            .chunks_exact(self.program.arena_size)
            .flat_map(|arena| arena[self.program.output.clone()].iter().copied())
            .collect();
        decoded_tiles(&counts, &words, capacity as usize, Some(&heads))
    }

    fn batch(&self, arenas: &[i8]) -> Result<u32, CudaError> {
        super::batch_of(arenas.len(), self.program.arena_size, MAX_BATCH)
    }

    fn launch(&self, launch: &Launch, arenas: &mut [i8], batch: u32) {
        self.launch_items(launch, arenas, 0..batch);
    }

    /// `launch` on arenas `items` only.
    fn launch_items(&self, launch: &Launch, arenas: &mut [i8], items: core::ops::Range<u32>) {
        let bases = Bases {
            arena: arenas.as_mut_ptr() as u64,
            weights: self.weights.as_bytes().as_ptr() as u64,
            packed: self.program.packed.as_ptr() as u64,
            arena_stride: self.program.arena_size as u64,
        }
        .from_item(items.start);
        let (grid_x, grid_y, _) = launch.grid(items.len() as u32);
        // SAFETY: the planner's dry run proved every step's tensors and constants lie inside
        // one arena and the weights, and `batch` arenas are there; the kernels' indices stay
        // within the shapes it checked.
        unsafe {
            match launch.bind(bases) {
                Args::Conv(a) => kestrel_conv_emulated(grid_x, grid_y, BLOCK, &a),
                Args::ConvDp4a(a) => kestrel_conv_dp4a_emulated(grid_x, grid_y, BLOCK, &a),
                Args::Add(a) => kestrel_add_emulated(grid_x, grid_y, BLOCK, &a),
                Args::Mul(a) => kestrel_mul_emulated(grid_x, grid_y, BLOCK, &a),
                Args::Rescale(a) => kestrel_rescale_emulated(grid_x, grid_y, BLOCK, &a),
                Args::Lut(a) => kestrel_lut_emulated(grid_x, grid_y, BLOCK, &a),
                Args::Gather(a) => kestrel_gather_emulated(grid_x, grid_y, BLOCK, &a),
                Args::MaxPool(a) => kestrel_max_pool_emulated(grid_x, grid_y, BLOCK, &a),
                Args::AveragePool(a) => kestrel_average_pool_emulated(grid_x, grid_y, BLOCK, &a),
                Args::GlobalAveragePool(a) => {
                    kestrel_global_average_pool_emulated(grid_x, grid_y, BLOCK, &a)
                }
                Args::Resize(a) => kestrel_resize_emulated(grid_x, grid_y, BLOCK, &a),
                Args::Preprocess(a) => kestrel_preprocess_emulated(grid_x, grid_y, BLOCK, &a),
                Args::Decode(a) => kestrel_decode_emulated(grid_x, grid_y, BLOCK, &a),
                Args::Attention(a) => kestrel_attention_emulated(grid_x, grid_y, BLOCK, &a),
                Args::Conv16(a) => kestrel_conv16_emulated(grid_x, grid_y, BLOCK, &a),
                Args::Add16(a) => kestrel_add16_emulated(grid_x, grid_y, BLOCK, &a),
                Args::Mul16(a) => kestrel_mul16_emulated(grid_x, grid_y, BLOCK, &a),
                Args::GlobalAveragePool16(a) => {
                    kestrel_global_average_pool16_emulated(grid_x, grid_y, BLOCK, &a)
                }
                Args::Function16(a) => kestrel_function16_emulated(grid_x, grid_y, BLOCK, &a),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::{
        AttentionArgs, ConvArgs, DecodeArgs, ElementwiseArgs, PoolArgs, PreprocessArgs, ResizeArgs,
    };
    use core::mem::size_of;
    use kestrel_testing::conformance::random_cases;

    #[test]
    fn the_rust_argument_structs_match_the_cuda_header() {
        assert_eq!(
            c_struct_sizes(),
            [
                size_of::<ConvArgs>(),
                size_of::<ElementwiseArgs>(),
                size_of::<PoolArgs>(),
                size_of::<ResizeArgs>(),
                size_of::<PreprocessArgs>(),
                size_of::<DecodeArgs>(),
                size_of::<AttentionArgs>(),
            ]
        );
    }

    /// Every op, 1,100 random shapes and quantisations: the emulated kernels leave the arena
    /// byte for byte as the generic executor does (outputs, and every byte they must not touch).
    #[test]
    fn random_plans_match_the_generic_executor_bit_for_bit() {
        for case in random_cases(0xc0da_2026_1127, 1_100).unwrap() {
            let expected = case.expected().unwrap();
            let emulator = Emulator::new(&case.program().unwrap()).unwrap();
            let mut arena = case.arena.clone();
            emulator.run_arenas(&mut arena).unwrap();
            assert_eq!(arena, expected, "{}", case.name);
        }
    }

    /// Three arenas in one batch each get their own result.
    #[test]
    fn batch_items_are_independent() {
        for case in random_cases(0xba7c_0004, 44).unwrap() {
            let program = case.program().unwrap();
            let emulator = Emulator::new(&program).unwrap();
            let mut arenas = Vec::new();
            let mut expected = Vec::new();
            for item in 0..3i8 {
                let arena: Vec<i8> = case
                    .arena
                    .iter()
                    .map(|v| v.wrapping_mul(item + 1))
                    .collect();
                let mut done = arena.clone();
                program.run(&mut done, &mut kestrel_ops::Reference).unwrap();
                arenas.extend(arena);
                expected.extend(done);
            }
            let start = arenas.clone();
            emulator.run_arenas(&mut arenas).unwrap();
            assert_eq!(arenas, expected, "{}", case.name);
            assert!(emulator.run_arenas(&mut arenas[1..]).is_err());
            // In chunks of two, as the GPU session splits a batch between its streams.
            let mut chunked = start;
            emulator.run_chunks(&mut chunked, 2).unwrap();
            assert_eq!(chunked, expected, "{} in chunks", case.name);
        }
    }
}
