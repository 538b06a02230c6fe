//! The GPU session (feature `cuda`): a cudarc context and stream, the kernels compiled by NVRTC
//! (or read from the disk cache), the weights and `max_batch` arenas in device memory, pinned
//! host staging, and batch-1 inference captured as one CUDA graph.
//!
//! The driver and NVRTC are loaded at run time, so every call that could find them missing is
//! preceded by a presence check: cudarc panics where a library is absent.

use std::sync::Arc;

use cudarc::driver::{
    result as driver, sys, CudaContext, CudaFunction, CudaGraph, CudaSlice, CudaStream, DevicePtr,
    DeviceRepr, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use cudarc::nvrtc;

use super::launch::{
    chunks, Args, AttentionArgs, Bases, ConvArgs, DecodeArgs, DeviceProgram, ElementwiseArgs,
    Kernel, Launch, PoolArgs, PreprocessArgs, ResizeArgs, BLOCK, MAX_BATCH,
};
use super::{
    batch_of, cache_key, decoded_tiles, CudaError, CudaOptions, DecodedTile, DeviceFault,
    DeviceInfo, PeakSearch, NVRTC_OPTIONS, SOURCE,
};
use kestrel_plan::program::{OwnedProgram, Program};

// SAFETY: plain `#[repr(C)]` structs of integers, floats and device addresses, laid out as the
// kernels' parameters (checked against the C++ compiler's layout by the emulator's tests).
unsafe impl DeviceRepr for ConvArgs {}
unsafe impl DeviceRepr for ElementwiseArgs {}
unsafe impl DeviceRepr for PoolArgs {}
unsafe impl DeviceRepr for ResizeArgs {}
unsafe impl DeviceRepr for PreprocessArgs {}
unsafe impl DeviceRepr for DecodeArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for AttentionArgs {}

fn driver_error(e: driver::DriverError) -> CudaError {
    CudaError::Driver {
        fault: fault_of(e.0),
        detail: format!("{e:?}"),
    }
}

/// What a driver error code means for the device. Sticky errors (the context cannot be used
/// again until the process resets the device) and a missing device are a lost device.
pub fn fault_of(code: sys::CUresult) -> DeviceFault {
    use sys::CUresult as R;
    match code {
        R::CUDA_ERROR_OUT_OF_MEMORY => DeviceFault::OutOfMemory,
        R::CUDA_ERROR_LAUNCH_FAILED
        | R::CUDA_ERROR_LAUNCH_TIMEOUT
        | R::CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES => DeviceFault::LaunchFailed,
        R::CUDA_ERROR_ILLEGAL_ADDRESS
        | R::CUDA_ERROR_ILLEGAL_INSTRUCTION
        | R::CUDA_ERROR_MISALIGNED_ADDRESS
        | R::CUDA_ERROR_INVALID_PC
        | R::CUDA_ERROR_HARDWARE_STACK_ERROR
        | R::CUDA_ERROR_ECC_UNCORRECTABLE
        | R::CUDA_ERROR_NO_DEVICE
        | R::CUDA_ERROR_DEINITIALIZED
        | R::CUDA_ERROR_CONTEXT_IS_DESTROYED => DeviceFault::DeviceLost,
        _ => DeviceFault::Other,
    }
}

/// One plan on one GPU.
pub(super) struct Session {
    owned: OwnedProgram,
    device: DeviceProgram,
    info: DeviceInfo,
    max_batch: u32,
    chunk: u32,
    /// Runs everything but the odd chunks of a batch; graphs are captured on it.
    stream: Arc<CudaStream>,
    /// Runs the odd chunks, so that their copies overlap the even chunks' kernels.
    second: Arc<CudaStream>,
    functions: Vec<CudaFunction>,
    _weights: CudaSlice<u8>,
    _packed: CudaSlice<i32>,
    arenas: CudaSlice<i8>,
    bases: Bases,
    input_staging: PinnedHostSlice<i8>,
    output_staging: PinnedHostSlice<i8>,
    origins_staging: PinnedHostSlice<i32>,
    origins: CudaSlice<i32>,
    frame: Option<CudaSlice<u8>>,
    /// Peak lists and counts for `kestrel_decode`, made on first use.
    peaks: Option<PeakLists>,
    graph: Option<Graph>,
}

/// `max_batch` lists of `slots` peaks (three words each) and their counts, on the device.
struct PeakLists {
    slots: u32,
    words: CudaSlice<i32>,
    counts: CudaSlice<i32>,
}

/// A captured graph that may move to another thread with its session.
struct Graph(CudaGraph);

// SAFETY: a graph exec is a driver handle valid in its context from any thread; cudarc binds the
// context to the calling thread before each launch, and the session (`&mut self`) is used by one
// thread at a time.
unsafe impl Send for Graph {}

/// Whether the driver is there and has GPU `ordinal`; the reason when not.
fn check_available(ordinal: usize) -> Result<(), CudaError> {
    let missing = |what: &str| CudaError::NotAvailable(format!("{what} not found"));
    // SAFETY: only tries to load the library.
    if !unsafe { sys::is_culib_present() } {
        return Err(missing("the CUDA driver library (libcuda)"));
    }
    // SAFETY: as above.
    if !unsafe { nvrtc::sys::is_culib_present() } {
        return Err(missing(
            "NVRTC (libnvrtc; its folder must be on LD_LIBRARY_PATH)",
        ));
    }
    driver::init().map_err(|e| CudaError::NotAvailable(format!("cuInit failed: {e:?}")))?;
    let count = driver::device::get_count().map_err(driver_error)?;
    if ordinal >= count.max(0) as usize {
        return Err(CudaError::NotAvailable(format!(
            "GPU {ordinal} asked for, {count} present"
        )));
    }
    Ok(())
}

impl Session {
    pub(super) fn new(plan: &[u8], options: &CudaOptions) -> Result<Self, CudaError> {
        let owned = OwnedProgram::new(plan)?;
        let device = DeviceProgram::new(owned.program())?;
        let max_batch = options.max_batch.clamp(1, MAX_BATCH);
        check_available(options.device)?;

        let ctx = CudaContext::new(options.device).map_err(driver_error)?;
        // One stream and raw addresses in the kernel arguments: cudarc's per-buffer events
        // would only add work (and do not mix with graph capture).
        // SAFETY: every buffer is used on `stream` alone.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(driver_error)?;
        let second = ctx.new_stream().map_err(driver_error)?;
        let (functions, info) = kernels(&ctx, options)?;

        let program = owned.program();
        // A zero-length allocation is an error in CUDA: keep every buffer at least 16 bytes.
        let mut weights_host = program.weights().to_vec();
        weights_host.resize(weights_host.len().max(16), 0);
        let weights = stream.clone_htod(&weights_host).map_err(driver_error)?;
        let mut packed_host = device.packed.clone();
        packed_host.resize(packed_host.len().max(4), 0);
        let packed = stream.clone_htod(&packed_host).map_err(driver_error)?;
        let batch = max_batch as usize;
        let arenas = stream
            .alloc_zeros::<i8>((device.arena_size * batch).max(16))
            .map_err(driver_error)?;
        let origins = stream.alloc_zeros::<i32>(2 * batch).map_err(driver_error)?;
        // SAFETY: the staging buffers are written before they are read. Flags 0, not
        // write-combined: the host reads outputs back from them.
        let pinned = |len: usize| unsafe { ctx.alloc_pinned_with_flags::<i8>(len.max(16), 0) };
        let input_staging = pinned(program.input_len() * batch).map_err(driver_error)?;
        let output_staging = pinned(program.output_bytes() * batch).map_err(driver_error)?;
        // SAFETY: as above.
        let origins_staging =
            unsafe { ctx.alloc_pinned_with_flags::<i32>(2 * batch, 0) }.map_err(driver_error)?;
        let bases = Bases {
            arena: arenas.device_ptr(&stream).0,
            weights: weights.device_ptr(&stream).0,
            packed: packed.device_ptr(&stream).0,
            arena_stride: device.arena_size as u64,
        };
        let mut session = Self {
            owned,
            device,
            info,
            max_batch,
            chunk: options.chunk.max(1),
            stream,
            second,
            functions,
            _weights: weights,
            _packed: packed,
            arenas,
            bases,
            input_staging,
            output_staging,
            origins_staging,
            origins,
            frame: None,
            peaks: None,
            graph: None,
        };
        // The uploads above are on the first stream; the second must not run before them.
        session.stream.synchronize().map_err(driver_error)?;
        if options.graphs {
            session.graph = session.capture()?;
        }
        Ok(session)
    }

    pub(super) fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub(super) fn program(&self) -> &Program<'_> {
        self.owned.program()
    }

    /// The batch-1 steps, recorded once into a graph that replays them with one launch.
    fn capture(&self) -> Result<Option<Graph>, CudaError> {
        self.stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver_error)?;
        let recorded = self.run_steps(&self.stream, 0..1);
        let graph = self
            .stream
            .end_capture(sys::CUgraphInstantiate_flags(0))
            .map_err(driver_error)?;
        recorded?;
        Ok(graph.map(Graph))
    }

    /// Launch `launch` with `args` (bound) for `batch` items on `stream`.
    fn launch(
        &self,
        stream: &Arc<CudaStream>,
        launch: &Launch,
        args: Args,
        batch: u32,
    ) -> Result<(), CudaError> {
        if launch.threads == 0 {
            return Ok(());
        }
        let kernel = args.kernel();
        let position = Kernel::ALL.iter().position(|&k| k == kernel).unwrap_or(0);
        let Some(function) = self.functions.get(position) else {
            return Err(CudaError::driver(format!("{} not loaded", kernel.name())));
        };
        let config = LaunchConfig {
            grid_dim: launch.grid(batch),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = stream.launch_builder(function);
        match &args {
            Args::Conv(a) | Args::ConvDp4a(a) | Args::Conv16(a) => builder.arg(a),
            Args::Add(a)
            | Args::Mul(a)
            | Args::Rescale(a)
            | Args::Lut(a)
            | Args::Gather(a)
            | Args::Add16(a)
            | Args::Mul16(a)
            | Args::Function16(a) => builder.arg(a),
            Args::MaxPool(a)
            | Args::AveragePool(a)
            | Args::GlobalAveragePool(a)
            | Args::GlobalAveragePool16(a) => builder.arg(a),
            Args::Resize(a) => builder.arg(a),
            Args::Preprocess(a) => builder.arg(a),
            Args::Decode(a) => builder.arg(a),
            Args::Attention(a) => builder.arg(a),
        };
        // SAFETY: the planner proved every address the arguments hold, for `batch` arenas of
        // the session (at most `max_batch`, checked by the callers), lies in its buffers.
        unsafe { builder.launch(config) }.map_err(driver_error)?;
        Ok(())
    }

    /// Every step for batch items `items`, on `stream`.
    fn run_steps(
        &self,
        stream: &Arc<CudaStream>,
        items: core::ops::Range<u32>,
    ) -> Result<(), CudaError> {
        let bases = self.bases.from_item(items.start);
        for launch in &self.device.launches {
            self.launch(stream, launch, launch.bind(bases), items.len() as u32)?;
        }
        Ok(())
    }

    /// The stream chunk `k` of a batch runs on.
    fn stream_for(&self, k: usize) -> &Arc<CudaStream> {
        if k.is_multiple_of(2) {
            &self.stream
        } else {
            &self.second
        }
    }

    /// Copy `rows` runs of `width` bytes between host and device on `stream`, `pitch` bytes
    /// apart on the device side (one tensor of each arena) and packed on the host side.
    fn copy_rows(
        &self,
        stream: &CudaStream,
        host: *mut core::ffi::c_void,
        device: u64,
        to_device: bool,
        width: usize,
        rows: usize,
    ) -> Result<(), CudaError> {
        if width == 0 || rows == 0 {
            return Ok(());
        }
        let pitch = self.device.arena_size;
        // SAFETY: an all-zero CUDA_MEMCPY2D is a valid starting point (null pointers, zero sizes).
        let mut copy: sys::CUDA_MEMCPY2D = unsafe { core::mem::zeroed() };
        copy.WidthInBytes = width;
        copy.Height = rows;
        if to_device {
            copy.srcMemoryType = sys::CUmemorytype::CU_MEMORYTYPE_HOST;
            copy.srcHost = host;
            copy.srcPitch = width;
            copy.dstMemoryType = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE;
            copy.dstDevice = device;
            copy.dstPitch = pitch;
        } else {
            copy.srcMemoryType = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE;
            copy.srcDevice = device;
            copy.srcPitch = pitch;
            copy.dstMemoryType = sys::CUmemorytype::CU_MEMORYTYPE_HOST;
            copy.dstHost = host;
            copy.dstPitch = width;
        }
        // SAFETY: the callers pass pinned staging of `width * rows` bytes and a tensor of the
        // session's arenas, of which there are at least `rows`.
        unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream.cu_stream()).result() }.map_err(driver_error)
    }

    /// Send staged inputs `items` to their arenas' input tensors, on `stream`.
    fn upload_staged(
        &mut self,
        stream: &CudaStream,
        items: core::ops::Range<u32>,
    ) -> Result<(), CudaError> {
        let width = self.device.input.len();
        let first = items.start as usize;
        let host = self.input_staging.as_mut_ptr().map_err(driver_error)?;
        // SAFETY: the staging holds `max_batch` inputs and `items` lies within the batch.
        let host = unsafe { host.add(first * width) }.cast();
        let device = self.bases.from_item(items.start).arena + self.device.input.start as u64;
        self.copy_rows(stream, host, device, true, width, items.len())
    }

    /// Fetch outputs `items` from their arenas into the output staging, on `stream`.
    fn download_staged(
        &mut self,
        stream: &CudaStream,
        items: core::ops::Range<u32>,
    ) -> Result<(), CudaError> {
        let width = self.device.output.len();
        let first = items.start as usize;
        let host = self.output_staging.as_mut_ptr().map_err(driver_error)?;
        // SAFETY: as in `upload_staged`.
        let host = unsafe { host.add(first * width) }.cast();
        let device = self.bases.from_item(items.start).arena + self.device.output.start as u64;
        self.copy_rows(stream, host, device, false, width, items.len())
    }

    /// Wait for both streams; the first `batch` outputs in the output staging.
    fn staged_outputs(&self, batch: u32) -> Result<&[i8], CudaError> {
        self.stream.synchronize().map_err(driver_error)?;
        self.second.synchronize().map_err(driver_error)?;
        let staged = self.output_staging.as_slice().map_err(driver_error)?;
        let n = self.device.output.len() * batch as usize;
        staged.get(..n).ok_or(CudaError::Length {
            expected: n,
            got: staged.len(),
        })
    }

    /// Copy the first `batch` staged outputs into `outputs` (after the streams finish).
    fn fetch_outputs(&mut self, batch: u32, outputs: &mut [i8]) -> Result<(), CudaError> {
        let staged = self.staged_outputs(batch)?;
        if outputs.len() != staged.len() {
            return Err(CudaError::Length {
                expected: staged.len(),
                got: outputs.len(),
            });
        }
        outputs.copy_from_slice(staged);
        Ok(())
    }

    pub(super) fn run_arenas(&mut self, arenas: &mut [i8]) -> Result<(), CudaError> {
        let batch = batch_of(arenas.len(), self.device.arena_size, self.max_batch)?;
        let mut view = self.arenas.slice_mut(..arenas.len());
        self.stream
            .memcpy_htod(&*arenas, &mut view)
            .map_err(driver_error)?;
        self.run_steps(&self.stream, 0..batch)?;
        let view = self.arenas.slice(..arenas.len());
        self.stream
            .memcpy_dtoh(&view, arenas)
            .map_err(driver_error)?;
        self.stream.synchronize().map_err(driver_error)
    }

    pub(super) fn run_codes(&mut self, inputs: &[i8], outputs: &mut [i8]) -> Result<(), CudaError> {
        let batch = batch_of(inputs.len(), self.device.input.len(), self.max_batch)?;
        let expected = batch as usize * self.device.output.len();
        if outputs.len() != expected {
            return Err(CudaError::Length {
                expected,
                got: outputs.len(),
            });
        }
        let staged = self.input_staging.as_mut_slice().map_err(driver_error)?;
        staged[..inputs.len()].copy_from_slice(inputs);
        if batch == 1 {
            self.upload_staged(&self.stream.clone(), 0..1)?;
            self.run_program()?;
            self.download_staged(&self.stream.clone(), 0..1)?;
        } else {
            // Chunks alternate between the streams: one's copies overlap the other's kernels.
            for (k, items) in chunks(batch, self.chunk).enumerate() {
                let stream = self.stream_for(k).clone();
                self.upload_staged(&stream, items.clone())?;
                self.run_steps(&stream, items.clone())?;
                self.download_staged(&stream, items)?;
            }
        }
        self.fetch_outputs(batch, outputs)
    }

    /// One item's steps on the first stream: the captured graph, or launches.
    fn run_program(&self) -> Result<(), CudaError> {
        match &self.graph {
            Some(graph) => graph.0.launch().map_err(driver_error),
            None => self.run_steps(&self.stream, 0..1),
        }
    }

    pub(super) fn infer(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CudaError> {
        let program = self.owned.program();
        let input_len = program.input_len();
        // Quantised on the host by the CPU executor's own code, so the codes are its codes.
        let staged = self.input_staging.as_mut_slice().map_err(driver_error)?;
        program.quantize_codes(input, staged.get_mut(..input_len).unwrap_or(&mut []))?;
        let stream = self.stream.clone();
        self.upload_staged(&stream, 0..1)?;
        self.run_program()?;
        self.download_staged(&stream, 0..1)?;
        let outputs = self.staged_outputs(1)?;
        self.owned.program().dequantize_codes(outputs, output)?;
        Ok(())
    }

    pub(super) fn run_tiles(
        &mut self,
        frame: &[u8],
        width: u32,
        height: u32,
        origins: &[(u32, u32)],
        outputs: &mut [i8],
    ) -> Result<(), CudaError> {
        let batch = batch_of(origins.len(), 1, self.max_batch)?;
        let wanted = batch as usize * self.device.output.len();
        if outputs.len() != wanted {
            return Err(CudaError::Length {
                expected: wanted,
                got: outputs.len(),
            });
        }
        let preprocess = self.stage_frame(frame, width, height, origins)?;
        for (k, items) in chunks(batch, self.chunk).enumerate() {
            let stream = self.stream_for(k).clone();
            self.run_tiles_chunk(&stream, &preprocess, items.clone())?;
            self.download_staged(&stream, items)?;
        }
        self.fetch_outputs(batch, outputs)
    }

    /// As `run_tiles`, then each tile's head decoded on the GPU as `search` says.
    pub(super) fn detect_tiles(
        &mut self,
        frame: &[u8],
        width: u32,
        height: u32,
        origins: &[(u32, u32)],
        search: PeakSearch,
    ) -> Result<Vec<DecodedTile>, CudaError> {
        let batch = batch_of(origins.len(), 1, self.max_batch)?;
        let decode = self.device.decode(search)?;
        let capacity = search.capacity;
        // Lists of no peaks are allowed (every tile with a peak comes back whole), but a CUDA
        // allocation of no bytes is an error: allocate at least one slot.
        let slots = capacity.max(1);
        if self.peaks.as_ref().is_none_or(|p| p.slots != slots) {
            let items = self.max_batch as usize;
            let words = self.stream.alloc_zeros::<i32>(items * slots as usize * 3);
            let counts = self.stream.alloc_zeros::<i32>(items);
            self.peaks = Some(PeakLists {
                slots,
                words: words.map_err(driver_error)?,
                counts: counts.map_err(driver_error)?,
            });
        }
        let Some(peaks) = self.peaks.as_mut() else {
            return Err(CudaError::driver("no peak lists"));
        };
        self.stream
            .memset_zeros(&mut peaks.counts)
            .map_err(driver_error)?;
        let (words, counts) = (
            peaks.words.device_ptr(&self.stream).0,
            peaks.counts.device_ptr(&self.stream).0,
        );
        let preprocess = self.stage_frame(frame, width, height, origins)?;
        for (k, items) in chunks(batch, self.chunk).enumerate() {
            let stream = self.stream_for(k).clone();
            self.run_tiles_chunk(&stream, &preprocess, items.clone())?;
            let first = u64::from(items.start);
            let args = match decode.bind(self.bases.from_item(items.start)) {
                Args::Decode(a) => Args::Decode(DecodeArgs {
                    candidates: words + first * u64::from(capacity) * 12,
                    counts: counts + first * 4,
                    ..a
                }),
                other => other,
            };
            self.launch(&stream, &decode, args, items.len() as u32)?;
        }
        self.second.synchronize().map_err(driver_error)?;
        let n = batch as usize;
        let Some(peaks) = self.peaks.as_ref() else {
            return Err(CudaError::driver("no peak lists"));
        };
        let mut found = vec![0i32; n];
        let mut lists = vec![0i32; n * capacity as usize * 3];
        self.stream
            .memcpy_dtoh(&peaks.counts.slice(..n), &mut found)
            .map_err(driver_error)?;
        if !lists.is_empty() {
            self.stream
                .memcpy_dtoh(&peaks.words.slice(..lists.len()), &mut lists)
                .map_err(driver_error)?;
        }
        self.stream.synchronize().map_err(driver_error)?;
        // A tile with more peaks than its list holds is decoded on the host from its head.
        let heads = if found.iter().any(|&c| c > capacity as i32) {
            let stream = self.stream.clone();
            self.download_staged(&stream, 0..batch)?;
            Some(self.staged_outputs(batch)?.to_vec())
        } else {
            None
        };
        decoded_tiles(&found, &lists, capacity as usize, heads.as_deref())
    }

    /// Copy `frame` and the tiles' `origins` to the device (on the first stream, which the
    /// second then waits for); the preprocessing launch for them.
    fn stage_frame(
        &mut self,
        frame: &[u8],
        width: u32,
        height: u32,
        origins: &[(u32, u32)],
    ) -> Result<Launch, CudaError> {
        let program = self.owned.program();
        let header = program.header();
        let spec = header
            .preprocess_spec()
            .map_err(|e| CudaError::driver(format!("the plan's preprocessing: {e}")))?;
        let expected = width as usize * height as usize * spec.bands();
        if frame.len() != expected {
            return Err(CudaError::Length {
                expected,
                got: frame.len(),
            });
        }
        batch_of(origins.len(), 1, self.max_batch)?;
        let Some(preprocess) = self.device.preprocess(
            &spec,
            header.input_scale,
            header.input_zero_point,
            width,
            height,
        ) else {
            return Err(CudaError::Length {
                expected: i32::MAX as usize,
                got: frame.len(),
            });
        };
        // The frame buffer grows to the largest frame seen and is then reused.
        if self.frame.as_ref().is_none_or(|f| f.len() < frame.len()) {
            self.frame = Some(
                self.stream
                    .alloc_zeros::<u8>(frame.len())
                    .map_err(driver_error)?,
            );
        }
        let Some(device_frame) = self.frame.as_mut() else {
            return Err(CudaError::driver("no frame buffer"));
        };
        let mut view = device_frame.slice_mut(..frame.len());
        self.stream
            .memcpy_htod(frame, &mut view)
            .map_err(driver_error)?;
        let frame_address = device_frame.device_ptr(&self.stream).0;
        let staged = self.origins_staging.as_mut_slice().map_err(driver_error)?;
        for (pair, &(x, y)) in staged.chunks_exact_mut(2).zip(origins) {
            pair[0] = i32::try_from(x).unwrap_or(i32::MAX);
            pair[1] = i32::try_from(y).unwrap_or(i32::MAX);
        }
        let mut view = self.origins.slice_mut(..2 * origins.len());
        self.stream
            .memcpy_htod(&staged[..2 * origins.len()], &mut view)
            .map_err(driver_error)?;
        self.second.join(&self.stream).map_err(driver_error)?;
        Ok(match preprocess.args {
            Args::Preprocess(a) => Launch {
                args: Args::Preprocess(PreprocessArgs {
                    frame: frame_address,
                    origins: self.origins.device_ptr(&self.stream).0,
                    ..a
                }),
                ..preprocess
            },
            _ => preprocess,
        })
    }

    /// Preprocess and run tiles `items` of the staged frame, on `stream`.
    fn run_tiles_chunk(
        &self,
        stream: &Arc<CudaStream>,
        preprocess: &Launch,
        items: core::ops::Range<u32>,
    ) -> Result<(), CudaError> {
        let args = match preprocess.bind(self.bases.from_item(items.start)) {
            Args::Preprocess(a) => Args::Preprocess(PreprocessArgs {
                // Each item reads its own (x, y) pair: start at the chunk's first.
                origins: a.origins + u64::from(items.start) * 8,
                ..a
            }),
            other => other,
        };
        self.launch(stream, preprocess, args, items.len() as u32)?;
        self.run_steps(stream, items)
    }
}

/// The kernels loaded on one GPU, shared by every session on it in this process: compiling and
/// loading them once is what makes a second plan load in milliseconds.
type LoadedKernels = (usize, Vec<CudaFunction>, DeviceInfo);
static LOADED: std::sync::Mutex<Vec<LoadedKernels>> = std::sync::Mutex::new(Vec::new());

fn kernels(
    ctx: &Arc<CudaContext>,
    options: &CudaOptions,
) -> Result<(Vec<CudaFunction>, DeviceInfo), CudaError> {
    let mut loaded = LOADED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, functions, info)) = loaded.iter().find(|(d, ..)| *d == options.device) {
        return Ok((functions.clone(), info.clone()));
    }
    let (ptx, info) = compile(ctx, options)?;
    let module = ctx.load_module(ptx).map_err(driver_error)?;
    let functions = Kernel::ALL
        .iter()
        .map(|k| module.load_function(k.name()).map_err(driver_error))
        .collect::<Result<Vec<_>, _>>()?;
    loaded.push((options.device, functions.clone(), info.clone()));
    Ok((functions, info))
}

/// The kernels compiled by NVRTC to PTX for `arch` (e.g. `"sm_87"`, Jetson Orin; `"sm_90"`,
/// H100). Needs NVRTC only, no driver or GPU.
pub fn compile_ptx(arch: &str) -> Result<String, CudaError> {
    // SAFETY: only tries to load the library.
    if !unsafe { nvrtc::sys::is_culib_present() } {
        return Err(CudaError::NotAvailable(
            "NVRTC (libnvrtc) not found; its folder must be on LD_LIBRARY_PATH".into(),
        ));
    }
    let mut options: Vec<String> = NVRTC_OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    let compile_options = nvrtc::CompileOptions {
        options,
        ..Default::default()
    };
    let ptx = nvrtc::compile_ptx_with_opts(SOURCE, compile_options).map_err(|e| match e {
        nvrtc::CompileError::CompileError { log, .. } => {
            CudaError::Compile(log.to_string_lossy().into_owned())
        }
        other => CudaError::Compile(format!("{other:?}")),
    })?;
    Ok(ptx.to_src())
}

/// The PTX for this GPU: from the cache when a valid entry is there, else from NVRTC (then
/// cached). A cache that cannot be read or written only costs a compile.
fn compile(
    ctx: &Arc<CudaContext>,
    options: &CudaOptions,
) -> Result<(nvrtc::Ptx, DeviceInfo), CudaError> {
    let (major, minor) = ctx.compute_capability().map_err(driver_error)?;
    let name = ctx.name().map_err(driver_error)?;
    let mut driver_version = 0;
    // SAFETY: the driver library is loaded (checked) and the pointer is valid.
    unsafe { sys::cuDriverGetVersion(&mut driver_version).result() }.map_err(driver_error)?;
    let (mut nvrtc_major, mut nvrtc_minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked) and the pointers are valid.
    unsafe { nvrtc::sys::nvrtcVersion(&mut nvrtc_major, &mut nvrtc_minor).result() }
        .map_err(|e| CudaError::driver(format!("{e:?}")))?;
    let key = cache_key(&[
        SOURCE.as_bytes(),
        NVRTC_OPTIONS.join(" ").as_bytes(),
        format!("sm_{major}{minor}").as_bytes(),
        driver_version.to_string().as_bytes(),
        format!("{nvrtc_major}.{nvrtc_minor}").as_bytes(),
    ]);
    let cache_file = options
        .resolved_cache_dir()
        .map(|dir| dir.join(format!("kestrel-{key:016x}.ptx")));
    let mut info = DeviceInfo {
        name,
        compute_capability: (major, minor),
        driver_version,
        nvrtc_version: (nvrtc_major, nvrtc_minor),
        cache_file: None,
        cache_hit: false,
    };
    if let Some(path) = &cache_file {
        if let Ok(ptx) = std::fs::read_to_string(path) {
            if ptx.contains(".entry kestrel_conv") {
                info.cache_file = Some(path.clone());
                info.cache_hit = true;
                return Ok((nvrtc::Ptx::from_src(ptx), info));
            }
        }
    }
    let ptx = compile_ptx(&format!("sm_{major}{minor}"))?;
    if let Some(path) = &cache_file {
        // Written aside, then renamed: a crash never leaves half a file under the key.
        let partial = path.with_extension(format!("ptx.{}", std::process::id()));
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&partial, &ptx))
            .and_then(|()| std::fs::rename(&partial, path));
        if written.is_ok() {
            info.cache_file = Some(path.clone());
        }
    }
    Ok((nvrtc::Ptx::from_src(ptx), info))
}
