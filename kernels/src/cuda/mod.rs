//! The CUDA executor: a plan's int8 program on an NVIDIA GPU, bit-identical to the CPU's.
//!
//! - The kernels are the `.cu` files beside this one, one NVRTC program ([`SOURCE`]), compiled
//!   at start-up for the GPU found and cached on disk (see [`CudaOptions::cache_dir`]).
//! - [`launch`] plans the launches on the host, without a driver; the GPU session and the CPU
//!   emulator ([`emulator`], feature `cuda-emulator`) run the same list.
//! - [`CudaBackend`] always exists. Without the `cuda` feature, or without a driver or a GPU,
//!   [`CudaBackend::new`] returns [`CudaError::NotAvailable`] and the caller runs the CPU.

pub mod conformance;
#[cfg(feature = "cuda")]
mod device;
#[cfg(feature = "cuda-emulator")]
pub mod emulator;
pub mod launch;

#[cfg(feature = "cuda")]
pub use device::compile_ptx;

use crate::program::ProgramError;

/// The kernels' source, every `.cu` file after the shared header: one NVRTC program.
pub const SOURCE: &str = concat!(
    include_str!("kestrel.cuh"),
    include_str!("conv.cu"),
    include_str!("elementwise.cu"),
    include_str!("pool.cu"),
    include_str!("resize.cu"),
    include_str!("preprocess.cu"),
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
    /// A driver call failed.
    Driver(String),
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

impl core::fmt::Display for CudaError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NotAvailable(why) => write!(f, "CUDA is not available: {why}"),
            Self::Plan(e) => write!(f, "the plan cannot run on CUDA: {e}"),
            Self::Compile(log) => write!(f, "NVRTC could not compile the kernels:\n{log}"),
            Self::Driver(e) => write!(f, "CUDA driver call failed: {e}"),
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
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            device: 0,
            max_batch: 1,
            cache_dir: None,
            graphs: true,
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
    /// (`batch * output_len`).
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
    /// (`origins.len() * output_len`).
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
}

impl crate::Backend for CudaBackend {
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
    fn run(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), crate::BackendError> {
        self.check_lengths(input, output)?;
        #[cfg(feature = "cuda")]
        return self
            .session
            .infer(input, output)
            .map_err(|_| crate::BackendError::Execution);
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
