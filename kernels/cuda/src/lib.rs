//! The CUDA executor: a plan's int8 program on an NVIDIA GPU, bit-identical to the CPU's.
//!
//! - The kernels are the `.cu` files beside this one, one NVRTC program ([`SOURCE`]), compiled
//!   at start-up for the GPU found and cached on disk (see [`CudaOptions::cache_dir`]).
//! - [`launch`] plans the launches on the host, without a driver; the GPU session and the CPU
//!   emulator (module `emulator`, feature `cuda-emulator`) run the same list. Dense convolutions
//!   and Gemm run with DP4A on filters repacked at planning time; a larger batch runs in chunks
//!   alternating between two streams.
//! - [`CudaBackend::detect_tiles`] finds a detector head's peaks on the GPU, so that only the
//!   peaks come back to the host ([`DecodedTile`]), where `runtime::detect::decode_peaks`
//!   makes the boxes `runtime::detect::decode` would.
//! - [`CudaBackend`] always exists. Without the `cuda` feature, or without a driver or a GPU,
//!   [`CudaBackend::new`] returns [`CudaError::NotAvailable`] and the caller runs the CPU.
#![deny(missing_docs)]

#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda-emulator")]
pub mod emulator;
pub mod launch;

#[cfg(feature = "cuda")]
pub use cudarc::driver::sys::CUresult;
#[cfg(feature = "cuda")]
pub use device::{compile_ptx, fault_of};

use kestrel_plan::program::ProgramError;

/// The kernels' source, every `.cu` file after the shared header: one NVRTC program.
pub const SOURCE: &str = concat!(
    include_str!("kestrel.cuh"),
    include_str!("conv.cu"),
    include_str!("elementwise.cu"),
    include_str!("pool.cu"),
    include_str!("resize.cu"),
    include_str!("preprocess.cu"),
    include_str!("decode.cu"),
    include_str!("attention.cu"),
);

/// NVRTC options besides the GPU architecture. `--fmad=false` keeps the preprocessing's float
/// steps rounding as the CPU's do.
pub const NVRTC_OPTIONS: [&str; 2] = ["--fmad=false", "--std=c++14"];

/// Why the CUDA executor cannot start or run.
#[derive(Debug)]
pub enum CudaError {
    /// No CUDA here: the feature is off, or the driver, NVRTC or a GPU is missing. The
    /// reason is for the operator; the caller falls back to the CPU.
    NotAvailable(String),
    /// The plan cannot run (its own checks, or sizes the kernels cannot index).
    Plan(launch::PlanningError),
    /// NVRTC rejected the kernels: the compiler's log.
    Compile(String),
    /// A driver call failed, and what that means for the device.
    Driver {
        /// Out of memory, a failed launch, a lost device, or another failure.
        fault: DeviceFault,
        /// The driver's error, for the operator.
        detail: String,
    },
    /// A buffer passed to a session has the wrong length.
    Length {
        /// Values expected.
        expected: usize,
        /// Values supplied.
        got: usize,
    },
    /// More batch items than the session was made for.
    Batch {
        /// The session's largest batch.
        max: u32,
        /// Items asked for.
        got: usize,
    },
}

/// What a failed driver call means for the device: the caller's failover tells a device worth
/// retrying from one that is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceFault {
    /// The device ran out of memory.
    OutOfMemory,
    /// A launch failed, timed out or lacked resources; the context may still work.
    LaunchFailed,
    /// The context is unusable until the device is reset (an illegal address or instruction,
    /// an uncorrectable ECC error, a hardware stack error), or there is no device.
    DeviceLost,
    /// Anything else the driver or this executor reported.
    Other,
}

impl CudaError {
    /// A failure with no driver code behind it (a missing kernel, malformed output).
    pub fn driver(detail: impl Into<String>) -> Self {
        Self::Driver {
            fault: DeviceFault::Other,
            detail: detail.into(),
        }
    }

    /// The backend contract's error for this failure: what failover decides on.
    pub fn backend_error(&self) -> kestrel_backend::BackendError {
        use kestrel_backend::BackendError;
        match self {
            Self::NotAvailable(_) => BackendError::NotAvailable,
            Self::Driver {
                fault: DeviceFault::OutOfMemory,
                ..
            } => BackendError::OutOfMemory,
            Self::Driver {
                fault: DeviceFault::LaunchFailed,
                ..
            } => BackendError::LaunchFailed,
            Self::Driver {
                fault: DeviceFault::DeviceLost,
                ..
            } => BackendError::DeviceLost,
            Self::Length { expected, got } => BackendError::InputLength {
                expected: *expected,
                got: *got,
            },
            Self::Driver { .. } | Self::Plan(_) | Self::Compile(_) | Self::Batch { .. } => {
                BackendError::Execution
            }
        }
    }
}

impl core::fmt::Display for CudaError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotAvailable(why) => write!(f, "CUDA is not available: {why}"),
            Self::Plan(e) => write!(f, "the plan cannot run on CUDA: {e}"),
            Self::Compile(log) => write!(f, "NVRTC could not compile the kernels:\n{log}"),
            Self::Driver { fault, detail } => {
                write!(f, "CUDA driver call failed ({fault:?}): {detail}")
            }
            Self::Length { expected, got } => {
                write!(f, "buffer has {got} values, the session expects {expected}")
            }
            Self::Batch { max, got } => {
                write!(
                    f,
                    "{got} batch items asked for, the session takes at most {max}"
                )
            }
        }
    }
}

impl std::error::Error for CudaError {}

impl From<launch::PlanningError> for CudaError {
    fn from(e: launch::PlanningError) -> Self {
        Self::Plan(e)
    }
}

impl From<ProgramError> for CudaError {
    fn from(e: ProgramError) -> Self {
        Self::Plan(launch::PlanningError::Program(e))
    }
}

/// How a CUDA session is set up.
#[derive(Clone, Debug)]
pub struct CudaOptions {
    /// Which GPU (CUDA device ordinal).
    pub device: usize,
    /// Largest batch [`CudaBackend::run_codes`] and [`CudaBackend::run_tiles`] take: the
    /// device arena holds this many copies of the plan's arena.
    pub max_batch: u32,
    /// Where compiled kernels are cached, keyed by source, GPU architecture, driver and NVRTC
    /// versions. `None`: `$KESTREL_CUDA_CACHE`, else `$XDG_CACHE_HOME/kestrel/cuda`, else
    /// `$HOME/.cache/kestrel/cuda`; no cache when none is set.
    pub cache_dir: Option<std::path::PathBuf>,
    /// Replay a batch-1 inference as one CUDA graph instead of one launch per step.
    pub graphs: bool,
    /// Items per chunk of a larger batch. Chunks alternate between two streams, so one
    /// chunk's copies overlap another's kernels.
    pub chunk: u32,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            device: 0,
            max_batch: 1,
            cache_dir: None,
            graphs: true,
            chunk: 64,
        }
    }
}

impl CudaOptions {
    /// The cache folder these options name, if any.
    pub fn resolved_cache_dir(&self) -> Option<std::path::PathBuf> {
        use std::path::PathBuf;
        let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        self.cache_dir
            .clone()
            .or_else(|| var("KESTREL_CUDA_CACHE").map(PathBuf::from))
            .or_else(|| var("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("kestrel/cuda")))
            .or_else(|| var("HOME").map(|d| PathBuf::from(d).join(".cache/kestrel/cuda")))
    }
}

/// What the session found and how its kernels were obtained.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// GPU name, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability, e.g. (9, 0).
    pub compute_capability: (i32, i32),
    /// Driver version as CUDA reports it, e.g. 13000.
    pub driver_version: i32,
    /// NVRTC version, e.g. (13, 0).
    pub nvrtc_version: (i32, i32),
    /// The cached PTX file, when a cache folder is set.
    pub cache_file: Option<std::path::PathBuf>,
    /// Whether the kernels came from the cache rather than from NVRTC.
    pub cache_hit: bool,
}

/// How many items of `per_item` values `len` values hold: a whole number from 1 to `max`.
#[cfg(any(feature = "cuda", feature = "cuda-emulator", test))]
pub(crate) fn batch_of(len: usize, per_item: usize, max: u32) -> Result<u32, CudaError> {
    let batch = len / per_item.max(1);
    if batch == 0 || len != batch * per_item {
        return Err(CudaError::Length {
            expected: per_item,
            got: len,
        });
    }
    if batch > max as usize {
        return Err(CudaError::Batch { max, got: batch });
    }
    Ok(batch as u32)
}

/// A peak `kestrel_decode` found: its index into the class heatmaps (`class * height * width +
/// y * width + x`), its score code and the head's four box codes at that cell (width,
/// height, dx, dy).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Candidate {
    /// Index into the class heatmaps.
    pub index: u32,
    /// The score's code.
    pub score: i8,
    /// The box's codes.
    pub boxes: [i8; 4],
}

impl Candidate {
    /// The kernel's triple (index, score code, box codes little-endian), if well formed.
    pub fn from_words(words: [i32; 3]) -> Option<Self> {
        Some(Self {
            index: u32::try_from(words[0]).ok()?,
            score: i8::try_from(words[1]).ok()?,
            boxes: words[2].to_le_bytes().map(|b| b as i8),
        })
    }

    /// Index, score and box values through `values` ([`HeadCodes::values`]), as
    /// `runtime::detect::decode_peaks` takes them.
    pub fn values(&self, values: &[f32; 256]) -> (usize, f32, [f32; 4]) {
        let value = |code: i8| values[(i32::from(code) + 128) as usize];
        (
            self.index as usize,
            value(self.score),
            self.boxes.map(value),
        )
    }
}

/// How to decode a detector head on the GPU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PeakSearch {
    /// The head's shape.
    pub shape: launch::HeadShape,
    /// The lowest score kept.
    pub threshold: f32,
    /// Peaks one tile's list holds; a tile with more comes back as its whole head.
    pub capacity: u32,
}

/// One tile's detector head after decoding on the GPU: its peaks in heatmap order, or, when
/// more peaks were found than the list holds, the whole head's codes to decode on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodedTile {
    /// Every peak at or above the threshold, sorted by index.
    Peaks(Vec<Candidate>),
    /// The head's codes (the list overflowed).
    Codes(Vec<i8>),
}

/// How a plan's output codes map to values, for deciding peaks on codes.
#[derive(Clone, Debug, PartialEq)]
pub struct HeadCodes {
    /// The value of every code, `-128` first.
    pub values: [f32; 256],
}

impl HeadCodes {
    /// The output codes' values. An error when comparing codes would not decide as comparing
    /// values does: a softmax output, 16-bit codes, or values not finite and strictly
    /// increasing.
    pub fn new(
        program: &kestrel_plan::program::Program<'_>,
    ) -> Result<Self, launch::PlanningError> {
        let values: [f32; 256] =
            core::array::from_fn(|i| program.dequantize_code((i as i32 - 128) as i8));
        let increasing = values.windows(2).all(|w| w[0] < w[1]);
        let int8 = program.output_width() == kestrel_ops::int16::Width::I8;
        if program.header().output_softmax
            || !int8
            || !increasing
            || !values.iter().all(|v| v.is_finite())
        {
            return Err(launch::PlanningError::UnorderedCodes);
        }
        Ok(Self { values })
    }

    /// The smallest code `decode` keeps for `threshold` (it skips `score < threshold`); 128
    /// when it keeps none.
    pub fn threshold_code(&self, threshold: f32) -> i32 {
        self.values
            .iter()
            // `decode` skips `score < threshold`, which no score is when `threshold` is NaN.
            .position(|&v| v >= threshold || threshold.is_nan())
            .map_or(128, |i| i as i32 - 128)
    }
}

/// The tiles a decoding launch leaves: `counts[item]` peaks found by batch item `item`, the
/// first `capacity` of them as triples in `words` (the item's list starts at
/// `item * capacity * 3`). An item that found more than its list holds gets its head's codes
/// from `heads` (each item's output, back to back) instead.
#[cfg(any(feature = "cuda", feature = "cuda-emulator", test))]
pub(crate) fn decoded_tiles(
    counts: &[i32],
    words: &[i32],
    capacity: usize,
    heads: Option<&[i8]>,
) -> Result<Vec<DecodedTile>, CudaError> {
    let malformed = |what: &str| CudaError::driver(format!("the decoding kernel left {what}"));
    let mut tiles = Vec::with_capacity(counts.len());
    for (item, &count) in counts.iter().enumerate() {
        let found = usize::try_from(count).map_err(|_| malformed("a negative count"))?;
        if found > capacity {
            let heads = heads.ok_or_else(|| malformed("a full list and no head"))?;
            let len = heads.len() / counts.len().max(1);
            let head = heads.get(item * len..(item + 1) * len).unwrap_or(&[]);
            tiles.push(DecodedTile::Codes(head.to_vec()));
            continue;
        }
        let list = words
            .get(item * capacity * 3..)
            .and_then(|w| w.get(..found * 3))
            .ok_or_else(|| malformed("a list past its buffer"))?;
        let mut peaks = list
            .chunks_exact(3)
            .map(|t| Candidate::from_words([t[0], t[1], t[2]]))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| malformed("a malformed peak"))?;
        peaks.sort_unstable_by_key(|p| p.index);
        tiles.push(DecodedTile::Peaks(peaks));
    }
    Ok(tiles)
}

/// FNV-1a over the parts that decide the compiled kernels: the cache key.
pub fn cache_key(parts: &[&[u8]]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &byte in part.iter().chain(&[0xff]) {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// Runs plans on a GPU. See the module documentation.
pub struct CudaBackend {
    #[cfg(feature = "cuda")]
    session: device::Session,
    #[cfg(not(feature = "cuda"))]
    never: core::convert::Infallible,
}

impl CudaBackend {
    /// Load `plan` onto the GPU `options` names: plan the launches, compile (or fetch from
    /// the cache) the kernels, upload the weights, allocate the arenas and staging buffers.
    pub fn new(plan: &[u8], options: &CudaOptions) -> Result<Self, CudaError> {
        #[cfg(feature = "cuda")]
        {
            Ok(Self {
                session: device::Session::new(plan, options)?,
            })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (plan, options);
            Err(CudaError::NotAvailable(
                "Kestrel was built without the `cuda` feature".into(),
            ))
        }
    }

    /// The GPU, its driver and where the kernels came from.
    pub fn info(&self) -> &DeviceInfo {
        #[cfg(feature = "cuda")]
        return self.session.info();
        #[cfg(not(feature = "cuda"))]
        match self.never {}
    }

    /// Run the program on whole arenas: `arenas` holds `batch` copies of the plan's arena,
    /// inputs filled in; every step runs on each. For conformance tests against the CPU.
    pub fn run_arenas(&mut self, arenas: &mut [i8]) -> Result<(), CudaError> {
        #[cfg(feature = "cuda")]
        return self.session.run_arenas(arenas);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = arenas;
            match self.never {}
        }
    }

    /// Run a batch of quantised inputs (`batch * input_len` codes) into output codes
    /// (`batch * output_bytes`: each output tensor's bytes, 16-bit codes as two).
    pub fn run_codes(&mut self, inputs: &[i8], outputs: &mut [i8]) -> Result<(), CudaError> {
        #[cfg(feature = "cuda")]
        return self.session.run_codes(inputs, outputs);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (inputs, outputs);
            match self.never {}
        }
    }

    /// Preprocess model-sized tiles of a u8 HWC frame on the GPU, at `origins` (x, y; pixels
    /// past the frame edge take the band mean), and run them as one batch into output codes
    /// (`origins.len() * output_bytes`).
    pub fn run_tiles(
        &mut self,
        frame: &[u8],
        width: u32,
        height: u32,
        origins: &[(u32, u32)],
        outputs: &mut [i8],
    ) -> Result<(), CudaError> {
        #[cfg(feature = "cuda")]
        return self
            .session
            .run_tiles(frame, width, height, origins, outputs);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (frame, width, height, origins, outputs);
            match self.never {}
        }
    }

    /// As [`CudaBackend::run_tiles`], then each tile's head decoded on the GPU as `search`
    /// says: its peaks, sorted, for `runtime::detect::decode_peaks` with
    /// [`HeadCodes::values`]; a tile with more peaks than its list holds comes back whole.
    pub fn detect_tiles(
        &mut self,
        frame: &[u8],
        width: u32,
        height: u32,
        origins: &[(u32, u32)],
        search: PeakSearch,
    ) -> Result<Vec<DecodedTile>, CudaError> {
        #[cfg(feature = "cuda")]
        return self
            .session
            .detect_tiles(frame, width, height, origins, search);
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (frame, width, height, origins, search);
            match self.never {}
        }
    }
}

impl kestrel_backend::Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn input_len(&self) -> usize {
        #[cfg(feature = "cuda")]
        return self.session.program().input_len();
        #[cfg(not(feature = "cuda"))]
        match self.never {}
    }

    fn output_len(&self) -> usize {
        #[cfg(feature = "cuda")]
        return self.session.program().output_len();
        #[cfg(not(feature = "cuda"))]
        match self.never {}
    }

    /// Quantise on the host, run one inference on the GPU, dequantise on the host: the same
    /// float steps as the CPU executor, so outputs are bit-identical.
    fn run(
        &mut self,
        input: &[f32],
        output: &mut [f32],
    ) -> Result<(), kestrel_backend::BackendError> {
        self.check_lengths(input, output)?;
        #[cfg(feature = "cuda")]
        return self
            .session
            .infer(input, output)
            .map_err(|e| e.backend_error());
        #[cfg(not(feature = "cuda"))]
        match self.never {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_change_with_every_part() {
        let base = cache_key(&[SOURCE.as_bytes(), b"sm_90", b"13000"]);
        assert_eq!(base, cache_key(&[SOURCE.as_bytes(), b"sm_90", b"13000"]));
        assert_ne!(base, cache_key(&[SOURCE.as_bytes(), b"sm_87", b"13000"]));
        assert_ne!(base, cache_key(&[SOURCE.as_bytes(), b"sm_90", b"12060"]));
        // Parts are delimited: moving a byte between them changes the key.
        assert_ne!(cache_key(&[b"ab", b"c"]), cache_key(&[b"a", b"bc"]));
    }

    #[test]
    fn every_kernel_is_in_the_source() {
        for kernel in launch::Kernel::ALL {
            let entry = format!("extern \"C\" __global__ void {}(", kernel.name());
            assert_eq!(SOURCE.matches(&entry).count(), 1, "{entry}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_feature_the_backend_says_so() {
        let error = CudaBackend::new(&[], &CudaOptions::default())
            .err()
            .expect("no CUDA without the feature");
        assert!(
            matches!(&error, CudaError::NotAvailable(why) if why.contains("`cuda` feature")),
            "{error}"
        );
    }
}
