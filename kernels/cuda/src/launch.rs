//! The host side of the CUDA executor, with no driver involved: which kernel each step of a plan
//! launches, with which arguments, on how many threads. The GPU and the CPU emulator of the
//! kernels run the same list, so the emulator's bit-exactness tests cover this planning too.
//!
//! Pointers in the argument structs start as byte offsets: arena offsets for activations,
//! weights-section offsets for constants. [`Launch::bind`] adds the base addresses of one
//! session's buffers. Each struct mirrors, field for field, the one of the same name in
//! `kestrel.cuh`.

use kestrel_backend::{PreprocessSpec, MAX_BANDS};
use kestrel_ops::int8::{Add, Conv, ConvGeometry, ShapeError};
use kestrel_ops::Kernels;
use kestrel_plan::program::{Blob, ChannelBlobs, Op, Program, ProgramError, Step};

use super::{HeadCodes, PeakSearch};

/// Threads per block of every kernel.
pub const BLOCK: u32 = 256;

/// Largest batch one launch runs: the grid's second dimension.
pub const MAX_BATCH: u32 = 65_535;

/// The kernels of the `.cu` sources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `kestrel_conv`: grouped and depthwise Conv.
    Conv,
    /// `kestrel_conv_dp4a`: dense Conv and Gemm, four input channels per instruction.
    ConvDp4a,
    /// `kestrel_add`.
    Add,
    /// `kestrel_mul`.
    Mul,
    /// `kestrel_rescale`.
    Rescale,
    /// `kestrel_lut`.
    Lut,
    /// `kestrel_gather`.
    Gather,
    /// `kestrel_max_pool`.
    MaxPool,
    /// `kestrel_average_pool`.
    AveragePool,
    /// `kestrel_global_average_pool`.
    GlobalAveragePool,
    /// `kestrel_resize`.
    Resize,
    /// `kestrel_preprocess`.
    Preprocess,
    /// `kestrel_decode`: a detector head's peaks.
    Decode,
    /// `kestrel_attention`.
    Attention,
    /// `kestrel_conv16`: Conv and Gemm with 16-bit activations.
    Conv16,
    /// `kestrel_add16`.
    Add16,
    /// `kestrel_mul16`.
    Mul16,
    /// `kestrel_global_average_pool16`.
    GlobalAveragePool16,
    /// `kestrel_function16`.
    Function16,
}

impl Kernel {
    /// Every kernel, for loading them all from a module.
    pub const ALL: [Kernel; 19] = [
        Self::Conv,
        Self::ConvDp4a,
        Self::Add,
        Self::Mul,
        Self::Rescale,
        Self::Lut,
        Self::Gather,
        Self::MaxPool,
        Self::AveragePool,
        Self::GlobalAveragePool,
        Self::Resize,
        Self::Preprocess,
        Self::Decode,
        Self::Attention,
        Self::Conv16,
        Self::Add16,
        Self::Mul16,
        Self::GlobalAveragePool16,
        Self::Function16,
    ];

    /// The entry point's name in the module.
    pub fn name(self) -> &'static str {
        match self {
            Self::Conv => "kestrel_conv",
            Self::ConvDp4a => "kestrel_conv_dp4a",
            Self::Add => "kestrel_add",
            Self::Mul => "kestrel_mul",
            Self::Rescale => "kestrel_rescale",
            Self::Lut => "kestrel_lut",
            Self::Gather => "kestrel_gather",
            Self::MaxPool => "kestrel_max_pool",
            Self::AveragePool => "kestrel_average_pool",
            Self::GlobalAveragePool => "kestrel_global_average_pool",
            Self::Resize => "kestrel_resize",
            Self::Preprocess => "kestrel_preprocess",
            Self::Decode => "kestrel_decode",
            Self::Attention => "kestrel_attention",
            Self::Conv16 => "kestrel_conv16",
            Self::Add16 => "kestrel_add16",
            Self::Mul16 => "kestrel_mul16",
            Self::GlobalAveragePool16 => "kestrel_global_average_pool16",
            Self::Function16 => "kestrel_function16",
        }
    }
}

/// `ConvArgs` of `kestrel.cuh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct ConvArgs {
    pub input: u64,
    pub output: u64,
    pub weights: u64,
    pub bias: u64,
    pub multiplier: u64,
    pub shift: u64,
    pub packed: u64,
    pub packed_bias: u64,
    pub wide: u64,
    pub batch_stride: i64,
    pub count: i32,
    pub channels: i32,
    pub height: i32,
    pub width: i32,
    pub out_channels: i32,
    pub out_height: i32,
    pub out_width: i32,
    pub kernel_h: i32,
    pub kernel_w: i32,
    pub stride_y: i32,
    pub stride_x: i32,
    pub pad_y: i32,
    pub pad_x: i32,
    pub dilation_y: i32,
    pub dilation_x: i32,
    pub group: i32,
    pub input_zero_point: i32,
    pub output_zero_point: i32,
    pub min: i32,
    pub max: i32,
    pub wide_input: i32,
    pub input_bytes: i32,
    pub output_bytes: i32,
}

/// `ElementwiseArgs` of `kestrel.cuh`: Add, Mul, Rescale, Lut, Gather.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct ElementwiseArgs {
    pub a: u64,
    pub b: u64,
    pub output: u64,
    pub table: u64,
    pub wide_a: u64,
    pub wide_b: u64,
    pub batch_stride: i64,
    pub count: i32,
    pub plane: i32,
    pub zero_a: i32,
    pub zero_b: i32,
    pub multiplier_a: i32,
    pub shift_a: i32,
    pub multiplier_b: i32,
    pub shift_b: i32,
    pub output_zero_point: i32,
    pub min: i32,
    pub max: i32,
    pub wide_inputs: i32,
    pub output_bytes: i32,
}

/// `PoolArgs` of `kestrel.cuh`: MaxPool, AveragePool, GlobalAveragePool.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct PoolArgs {
    pub input: u64,
    pub output: u64,
    pub wide: u64,
    pub batch_stride: i64,
    pub count: i32,
    pub channels: i32,
    pub height: i32,
    pub width: i32,
    pub out_height: i32,
    pub out_width: i32,
    pub kernel_h: i32,
    pub kernel_w: i32,
    pub stride_y: i32,
    pub stride_x: i32,
    pub pad_y: i32,
    pub pad_x: i32,
    pub count_include_pad: i32,
    pub input_zero_point: i32,
    pub multiplier: i32,
    pub shift: i32,
    pub output_zero_point: i32,
    pub min: i32,
    pub max: i32,
    pub wide_input: i32,
    pub output_bytes: i32,
}

/// `ResizeArgs` of `kestrel.cuh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct ResizeArgs {
    pub input: u64,
    pub output: u64,
    pub batch_stride: i64,
    pub count: i32,
    pub channels: i32,
    pub height: i32,
    pub width: i32,
    pub out_height: i32,
    pub out_width: i32,
    pub bilinear: i32,
}

/// `PreprocessArgs` of `kestrel.cuh`: a u8 frame to a batch of int8 model inputs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[allow(missing_docs)]
pub struct PreprocessArgs {
    pub frame: u64,
    pub origins: u64,
    pub output: u64,
    pub batch_stride: i64,
    pub count: i32,
    pub frame_width: i32,
    pub frame_height: i32,
    pub bands: i32,
    pub width: i32,
    pub height: i32,
    pub mean: [f32; MAX_BANDS],
    pub std_dev: [f32; MAX_BANDS],
    pub inverse_scale: f32,
    pub zero_point: i32,
}

/// `DecodeArgs` of `kestrel.cuh`: a detector head's peaks into a list per batch item.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct DecodeArgs {
    pub head: u64,
    pub candidates: u64,
    pub counts: u64,
    pub batch_stride: i64,
    pub count: i32,
    pub classes: i32,
    pub height: i32,
    pub width: i32,
    pub threshold: i32,
    pub capacity: i32,
}

/// `AttentionArgs` of `kestrel.cuh`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)]
pub struct AttentionArgs {
    pub input: u64,
    pub output: u64,
    pub exp_table: u64,
    pub batch_stride: i64,
    pub count: i32,
    pub key_dim: i32,
    pub head_dim: i32,
    pub plane: i32,
    pub table_len: i32,
    pub input_zero_point: i32,
    pub index_multiplier: i32,
    pub index_shift: i32,
    pub output_multiplier: i32,
    pub output_shift: i32,
    pub output_zero_point: i32,
    pub min: i32,
    pub max: i32,
}

/// One kernel and its arguments.
#[derive(Clone, Copy, Debug, PartialEq)]
#[allow(missing_docs)]
pub enum Args {
    Conv(ConvArgs),
    ConvDp4a(ConvArgs),
    Add(ElementwiseArgs),
    Mul(ElementwiseArgs),
    Rescale(ElementwiseArgs),
    Lut(ElementwiseArgs),
    Gather(ElementwiseArgs),
    MaxPool(PoolArgs),
    AveragePool(PoolArgs),
    GlobalAveragePool(PoolArgs),
    Resize(ResizeArgs),
    Preprocess(PreprocessArgs),
    Decode(DecodeArgs),
    Attention(AttentionArgs),
    Conv16(ConvArgs),
    Add16(ElementwiseArgs),
    Mul16(ElementwiseArgs),
    GlobalAveragePool16(PoolArgs),
    Function16(ElementwiseArgs),
}

impl Args {
    /// The kernel these arguments are for.
    pub fn kernel(&self) -> Kernel {
        match self {
            Self::Conv(_) => Kernel::Conv,
            Self::ConvDp4a(_) => Kernel::ConvDp4a,
            Self::Add(_) => Kernel::Add,
            Self::Mul(_) => Kernel::Mul,
            Self::Rescale(_) => Kernel::Rescale,
            Self::Lut(_) => Kernel::Lut,
            Self::Gather(_) => Kernel::Gather,
            Self::MaxPool(_) => Kernel::MaxPool,
            Self::AveragePool(_) => Kernel::AveragePool,
            Self::GlobalAveragePool(_) => Kernel::GlobalAveragePool,
            Self::Resize(_) => Kernel::Resize,
            Self::Preprocess(_) => Kernel::Preprocess,
            Self::Decode(_) => Kernel::Decode,
            Self::Attention(_) => Kernel::Attention,
            Self::Conv16(_) => Kernel::Conv16,
            Self::Add16(_) => Kernel::Add16,
            Self::Mul16(_) => Kernel::Mul16,
            Self::GlobalAveragePool16(_) => Kernel::GlobalAveragePool16,
            Self::Function16(_) => Kernel::Function16,
        }
    }
}

/// One kernel launch: `threads` per batch item, in blocks of [`BLOCK`], one grid row per item.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Launch {
    /// Threads (output values) per batch item.
    pub threads: u32,
    /// The kernel and its arguments, pointers as offsets until [`Launch::bind`].
    pub args: Args,
}

/// Base addresses of one session's device (or emulated) buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bases {
    /// First byte of batch item 0's arena.
    pub arena: u64,
    /// First byte of the plan's weights section.
    pub weights: u64,
    /// First byte of [`DeviceProgram::packed`].
    pub packed: u64,
    /// Bytes from one batch item's arena to the next.
    pub arena_stride: u64,
}

impl Bases {
    /// The bases of batch item `first` on: where a chunk of a batch starts.
    pub fn from_item(self, first: u32) -> Self {
        Self {
            arena: self.arena + u64::from(first) * self.arena_stride,
            ..self
        }
    }
}

/// The chunks of `chunk` items (the last may be shorter) a batch of `batch` runs as, so that
/// one chunk's copies overlap another's kernels on a second stream.
pub fn chunks(batch: u32, chunk: u32) -> impl Iterator<Item = core::ops::Range<u32>> {
    let chunk = chunk.max(1);
    (0..batch.div_ceil(chunk)).map(move |k| k * chunk..(k * chunk + chunk).min(batch))
}

impl ConvArgs {
    fn bind(self, b: Bases) -> Self {
        Self {
            input: b.arena + self.input,
            output: b.arena + self.output,
            weights: b.weights + self.weights,
            bias: b.weights + self.bias,
            multiplier: b.weights + self.multiplier,
            shift: b.weights + self.shift,
            packed: b.packed + self.packed,
            packed_bias: b.packed + self.packed_bias,
            wide: b.weights + self.wide,
            batch_stride: b.arena_stride as i64,
            ..self
        }
    }
}

impl ElementwiseArgs {
    fn bind(self, b: Bases) -> Self {
        Self {
            a: b.arena + self.a,
            b: b.arena + self.b,
            output: b.arena + self.output,
            table: b.weights + self.table,
            wide_a: b.weights + self.wide_a,
            wide_b: b.weights + self.wide_b,
            batch_stride: b.arena_stride as i64,
            ..self
        }
    }
}

impl PoolArgs {
    fn bind(self, b: Bases) -> Self {
        Self {
            input: b.arena + self.input,
            output: b.arena + self.output,
            wide: b.weights + self.wide,
            batch_stride: b.arena_stride as i64,
            ..self
        }
    }
}

impl ResizeArgs {
    fn bind(self, b: Bases) -> Self {
        Self {
            input: b.arena + self.input,
            output: b.arena + self.output,
            batch_stride: b.arena_stride as i64,
            ..self
        }
    }
}

impl PreprocessArgs {
    /// Its frame and origins are not in the plan's buffers: the session sets them.
    fn bind(self, b: Bases) -> Self {
        Self {
            output: b.arena + self.output,
            batch_stride: b.arena_stride as i64,
            ..self
        }
    }
}

impl DecodeArgs {
    /// Its lists are not in the plan's buffers: the session sets them.
    fn bind(self, b: Bases) -> Self {
        Self {
            head: b.arena + self.head,
            batch_stride: b.arena_stride as i64,
            ..self
        }
    }
}

impl AttentionArgs {
    fn bind(self, b: Bases) -> Self {
        Self {
            input: b.arena + self.input,
            output: b.arena + self.output,
            exp_table: b.weights + self.exp_table,
            batch_stride: b.arena_stride as i64,
            ..self
        }
    }
}

impl Launch {
    /// Grid dimensions for `batch` items.
    pub fn grid(&self, batch: u32) -> (u32, u32, u32) {
        (self.threads.div_ceil(BLOCK), batch, 1)
    }

    /// The arguments with every offset turned into an address in `bases`' buffers.
    pub fn bind(&self, bases: Bases) -> Args {
        match self.args {
            Args::Conv(a) => Args::Conv(a.bind(bases)),
            Args::ConvDp4a(a) => Args::ConvDp4a(a.bind(bases)),
            Args::Add(a) => Args::Add(a.bind(bases)),
            Args::Mul(a) => Args::Mul(a.bind(bases)),
            Args::Rescale(a) => Args::Rescale(a.bind(bases)),
            Args::Lut(a) => Args::Lut(a.bind(bases)),
            Args::Gather(a) => Args::Gather(a.bind(bases)),
            Args::MaxPool(a) => Args::MaxPool(a.bind(bases)),
            Args::AveragePool(a) => Args::AveragePool(a.bind(bases)),
            Args::GlobalAveragePool(a) => Args::GlobalAveragePool(a.bind(bases)),
            Args::Resize(a) => Args::Resize(a.bind(bases)),
            Args::Preprocess(a) => Args::Preprocess(a.bind(bases)),
            Args::Decode(a) => Args::Decode(a.bind(bases)),
            Args::Attention(a) => Args::Attention(a.bind(bases)),
            Args::Conv16(a) => Args::Conv16(a.bind(bases)),
            Args::Add16(a) => Args::Add16(a.bind(bases)),
            Args::Mul16(a) => Args::Mul16(a.bind(bases)),
            Args::GlobalAveragePool16(a) => Args::GlobalAveragePool16(a.bind(bases)),
            Args::Function16(a) => Args::Function16(a.bind(bases)),
        }
    }
}

/// Why a plan cannot run on the CUDA executor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanningError {
    /// The plan fails the CPU executor's own checks.
    Program(ProgramError),
    /// A size does not fit the kernels' 32-bit indices.
    TooLarge {
        /// Step index.
        step: usize,
    },
    /// The plan's output codes do not order as their values (a softmax output, 16-bit codes,
    /// or values not finite and strictly increasing), so peaks cannot be found on int8 codes.
    UnorderedCodes,
    /// A detector head's shape does not match the plan's output tensor.
    HeadShape {
        /// Values the head shape needs.
        expected: usize,
        /// Values in the plan's output.
        got: usize,
    },
}

impl core::fmt::Display for PlanningError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Program(e) => write!(f, "{e}"),
            Self::TooLarge { step } => {
                write!(f, "plan step {step} is too large for 32-bit GPU indices")
            }
            Self::UnorderedCodes => {
                f.write_str("the plan's output codes do not order as their values do")
            }
            Self::HeadShape { expected, got } => write!(
                f,
                "the detector head needs {expected} values, the plan's output has {got}"
            ),
        }
    }
}

impl std::error::Error for PlanningError {}

impl From<ProgramError> for PlanningError {
    fn from(e: ProgramError) -> Self {
        Self::Program(e)
    }
}

/// Checks every Conv's (16-bit input, 16-bit activations or neither) and Add's buffers without
/// computing anything, so that a dry run of the program proves every step's shapes at the cost
/// of its cheap steps only.
struct ShapesOnly;

impl Kernels for ShapesOnly {
    fn conv(
        &mut self,
        _step: usize,
        conv: &Conv<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        conv.check(input.len(), output.len())
    }

    fn conv_wide(
        &mut self,
        conv: &Conv<'_>,
        _table: &kestrel_ops::int8::WideTable,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        conv.check(input.len(), output.len())
    }

    fn add(&mut self, add: &Add, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        add.check(a.len(), b.len(), output.len())
    }

    fn conv16(
        &mut self,
        _step: usize,
        conv: &kestrel_ops::int16::Conv16<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        conv.check(input.len(), output.len())
    }

    fn attention(
        &mut self,
        attention: &kestrel_ops::int8::Attention,
        exp_table: &[i32],
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        attention.check(exp_table, input.len(), output.len())
    }
}

/// The launches that run a plan, in order: the plan's steps, after the input is in the arena.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceProgram {
    /// One per step.
    pub launches: std::vec::Vec<Launch>,
    /// Bytes of one batch item's arena.
    pub arena_size: usize,
    /// The input tensor's place in the arena.
    pub input: core::ops::Range<usize>,
    /// The output tensor's place in the arena.
    pub output: core::ops::Range<usize>,
    /// Constants the GPU needs in another layout than the plan's: the dense convolutions'
    /// filters and biases packed for `kestrel_conv_dp4a` ([`pack_dp4a`]).
    pub packed: std::vec::Vec<i32>,
    /// The output codes' values, when peaks can be found on codes ([`DeviceProgram::decode`]).
    pub codes: Option<HeadCodes>,
}

impl DeviceProgram {
    /// Plan every step of `program`. Its shapes are first checked by a dry run of the CPU
    /// executor, so the kernels, which cannot check their buffers, never leave them.
    pub fn new(program: &Program<'_>) -> Result<Self, PlanningError> {
        let mut arena = std::vec::Vec::new();
        arena
            .try_reserve_exact(program.arena_size())
            .map_err(|_| ProgramError::Arena {
                needed: program.arena_size(),
                got: 0,
            })?;
        arena.resize(program.arena_size(), 0);
        program.run(&mut arena, &mut ShapesOnly)?;

        let mut launches = std::vec::Vec::new();
        let mut packed = std::vec::Vec::new();
        for (index, step) in program.steps().enumerate() {
            launches.push(plan_step(program, index, step?, &mut packed)?);
        }
        let tensor = |id| {
            program
                .tensor(id)
                .ok_or(ProgramError::Tensor { step: 0, id })
        };
        Ok(Self {
            launches,
            arena_size: program.arena_size(),
            input: tensor(0)?,
            output: tensor(program.header().output_tensor)?,
            packed,
            codes: HeadCodes::new(program).ok(),
        })
    }

    /// The preprocessing launch that fills the input tensor of each batch item from a u8 HWC
    /// frame of `frame_width` x `frame_height` x `spec.bands()`, at origins the session supplies.
    /// `None` when a size does not fit the kernel's 32-bit indices.
    pub fn preprocess(
        &self,
        spec: &PreprocessSpec,
        input_scale: f32,
        input_zero_point: i32,
        frame_width: u32,
        frame_height: u32,
    ) -> Option<Launch> {
        let threads = u32::try_from(spec.input_len()).ok()?;
        let mut args = PreprocessArgs {
            output: self.input.start as u64,
            count: i32::try_from(threads).ok()?,
            frame_width: i32::try_from(frame_width).ok()?,
            frame_height: i32::try_from(frame_height).ok()?,
            bands: i32::try_from(spec.bands()).ok()?,
            width: i32::try_from(spec.width()).ok()?,
            height: i32::try_from(spec.height()).ok()?,
            inverse_scale: 1.0 / input_scale,
            zero_point: input_zero_point,
            ..PreprocessArgs::default()
        };
        for band in 0..spec.bands() {
            args.mean[band] = spec.mean(band);
            args.std_dev[band] = spec.std(band);
        }
        Some(Launch {
            threads,
            args: Args::Preprocess(args),
        })
    }
}

/// What `kestrel_decode` needs to know of a detector head `[classes + 4, height, width]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeadShape {
    /// Class heatmaps.
    pub classes: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

impl DeviceProgram {
    /// The decoding launch over each batch item's output tensor, a detector head, as `search`
    /// says; the session supplies the lists' addresses.
    pub fn decode(&self, search: PeakSearch) -> Result<Launch, PlanningError> {
        let codes = self.codes.as_ref().ok_or(PlanningError::UnorderedCodes)?;
        let PeakSearch {
            shape,
            threshold,
            capacity,
        } = search;
        let too_large = PlanningError::TooLarge { step: usize::MAX };
        let cells = shape.classes * shape.height * shape.width;
        let expected = cells + 4 * shape.height * shape.width;
        if expected != self.output.len() {
            return Err(PlanningError::HeadShape {
                expected,
                got: self.output.len(),
            });
        }
        let int = |v: usize| i32::try_from(v).map_err(|_| too_large);
        Ok(Launch {
            threads: u32::try_from(cells).map_err(|_| too_large)?,
            args: Args::Decode(DecodeArgs {
                head: self.output.start as u64,
                count: int(cells)?,
                classes: int(shape.classes)?,
                height: int(shape.height)?,
                width: int(shape.width)?,
                threshold: codes.threshold_code(threshold),
                capacity: int(capacity as usize)?,
                ..DecodeArgs::default()
            }),
        })
    }
}

/// Largest window size, stride, padding, dilation or plane side the kernels take: small enough
/// that `o * stride + k * dilation` cannot overflow their 32-bit arithmetic.
const MAX_AXIS: usize = 1 << 14;

fn plan_step(
    program: &Program<'_>,
    index: usize,
    step: Step,
    packed: &mut std::vec::Vec<i32>,
) -> Result<Launch, PlanningError> {
    let too_large = PlanningError::TooLarge { step: index };
    let int = |v: usize| i32::try_from(v).map_err(|_| too_large);
    let axis = |v: usize| {
        if v <= MAX_AXIS {
            int(v)
        } else {
            Err(too_large)
        }
    };
    let tensor = |id| {
        program
            .tensor(id)
            .ok_or(ProgramError::Tensor { step: index, id })
    };
    let out = tensor(step.output)?;
    let a = tensor(step.inputs[0])?;
    let b = if step.op.arity() == 2 {
        tensor(step.inputs[1])?
    } else {
        a.clone()
    };
    let (a_at, b_at, out_at) = (a.start as u64, b.start as u64, out.start as u64);
    let count = int(out.len())?;
    let blob = |blob: Blob| u64::from(blob.offset);
    let channels = |c: ChannelBlobs| (blob(c.bias), blob(c.multiplier), blob(c.shift));
    let elementwise = ElementwiseArgs {
        a: a_at,
        b: b_at,
        output: out_at,
        count,
        plane: 1,
        ..ElementwiseArgs::default()
    };
    // A convolution's tensors, constants and geometry.
    let conv_args = |g: &ConvGeometry, weights: Blob, c: ChannelBlobs| {
        // Index arithmetic in the kernel multiplies these: keep every product in range.
        let input_len = g.input.iter().try_fold(1usize, |p, &v| p.checked_mul(v));
        let weights_len = [g.output[0], g.kernel[0], g.kernel[1]]
            .iter()
            .try_fold(g.input[0], |p, &v| p.checked_mul(v));
        int(input_len.ok_or(too_large)?)?;
        int(weights_len.ok_or(too_large)?)?;
        let (bias, multiplier, shift) = channels(c);
        Ok::<_, PlanningError>(ConvArgs {
            input: a_at,
            output: out_at,
            weights: blob(weights),
            bias,
            multiplier,
            shift,
            channels: int(g.input[0])?,
            height: axis(g.input[1])?,
            width: axis(g.input[2])?,
            out_channels: int(g.output[0])?,
            out_height: axis(g.output[1])?,
            out_width: axis(g.output[2])?,
            kernel_h: axis(g.kernel[0])?,
            kernel_w: axis(g.kernel[1])?,
            stride_y: axis(g.stride[0])?,
            stride_x: axis(g.stride[1])?,
            pad_y: axis(g.pad[0])?,
            pad_x: axis(g.pad[1])?,
            dilation_y: axis(g.dilation[0])?,
            dilation_x: axis(g.dilation[1])?,
            group: int(g.group.max(1))?,
            ..ConvArgs::default()
        })
    };
    let args = match step.op {
        Op::Conv16 {
            geometry: g,
            weights,
            channels: c,
            input_width,
            input_zero_point,
            output: o,
        } => Args::Conv16(ConvArgs {
            count: int(out.len() / o.width.bytes())?,
            input_zero_point,
            output_zero_point: o.zero_point,
            min: o.min,
            max: o.max,
            input_bytes: int(input_width.bytes())?,
            output_bytes: int(o.width.bytes())?,
            ..conv_args(&g, weights, c)?
        }),
        Op::Add16(add) => Args::Add16(ElementwiseArgs {
            count: int(out.len() / add.output.width.bytes())?,
            multiplier_a: add.requant[0].multiplier,
            shift_a: add.requant[0].shift.into(),
            multiplier_b: add.requant[1].multiplier,
            shift_b: add.requant[1].shift.into(),
            output_zero_point: add.output.zero_point,
            min: add.output.min,
            max: add.output.max,
            output_bytes: int(add.output.width.bytes())?,
            ..elementwise
        }),
        Op::Mul16(mul) => Args::Mul16(ElementwiseArgs {
            count: int(out.len() / mul.output.width.bytes())?,
            plane: int(a.len() / b.len().max(1))?,
            multiplier_a: mul.requant.multiplier,
            shift_a: mul.requant.shift.into(),
            output_zero_point: mul.output.zero_point,
            min: mul.output.min,
            max: mul.output.max,
            output_bytes: int(mul.output.width.bytes())?,
            ..elementwise
        }),
        Op::GlobalAveragePool16(pool) => Args::GlobalAveragePool16(PoolArgs {
            input: a_at,
            output: out_at,
            count: int(pool.channels)?,
            channels: int(pool.channels)?,
            // The whole plane is one window, summed by one thread.
            height: int(a.len() / 2 / pool.channels.max(1))?,
            multiplier: pool.requant.multiplier,
            shift: pool.requant.shift.into(),
            output_zero_point: pool.output.zero_point,
            min: pool.output.min,
            max: pool.output.max,
            output_bytes: int(pool.output.width.bytes())?,
            ..PoolArgs::default()
        }),
        Op::Function16 { table } => Args::Function16(ElementwiseArgs {
            count: int(out.len() / 2)?,
            table: blob(table),
            output_bytes: 2,
            ..elementwise
        }),
        Op::Conv {
            geometry: g,
            weights,
            channels: c,
            output_quant: q,
            ..
        }
        | Op::ConvWide {
            geometry: g,
            weights,
            channels: c,
            output_quant: q,
            ..
        } => {
            // A 16-bit input (read through its table) takes `kestrel_conv`, not the DP4A kernel.
            let (input_zero_point, wide) = match step.op {
                Op::Conv {
                    input_zero_point, ..
                } => (input_zero_point, None),
                Op::ConvWide { table, .. } => (0, Some(blob(table))),
                _ => (0, None),
            };
            let conv = ConvArgs {
                count,
                input_zero_point,
                output_zero_point: q.zero_point,
                min: q.min.into(),
                max: q.max.into(),
                wide: wide.unwrap_or(0),
                wide_input: wide.is_some().into(),
                ..conv_args(&g, weights, c)?
            };
            if g.group <= 1 && wide.is_none() {
                dense(program, &step.op, conv, packed).ok_or(too_large)?
            } else {
                Args::Conv(conv)
            }
        }
        Op::Gemm {
            weights,
            channels: c,
            input_zero_point,
            output_quant: q,
        } => {
            let (bias, multiplier, shift) = channels(c);
            let one = 1;
            let conv = ConvArgs {
                input: a_at,
                output: out_at,
                weights: blob(weights),
                bias,
                multiplier,
                shift,
                count,
                channels: int(a.len())?,
                height: one,
                width: one,
                out_channels: count,
                out_height: one,
                out_width: one,
                kernel_h: one,
                kernel_w: one,
                stride_y: one,
                stride_x: one,
                pad_y: 0,
                pad_x: 0,
                dilation_y: one,
                dilation_x: one,
                group: one,
                input_zero_point,
                output_zero_point: q.zero_point,
                min: q.min.into(),
                max: q.max.into(),
                ..ConvArgs::default()
            };
            int(a.len().checked_mul(out.len()).ok_or(too_large)?)?;
            dense(program, &step.op, conv, packed).ok_or(too_large)?
        }
        Op::Add(add) => {
            let q = add.output_quant;
            let args = ElementwiseArgs {
                zero_a: add.input_zero_points[0],
                zero_b: add.input_zero_points[1],
                multiplier_a: add.requant[0].multiplier,
                shift_a: add.requant[0].shift.into(),
                multiplier_b: add.requant[1].multiplier,
                shift_b: add.requant[1].shift.into(),
                output_zero_point: q.zero_point,
                min: q.min.into(),
                max: q.max.into(),
                ..elementwise
            };
            Args::Add(args)
        }
        Op::Mul(mul) | Op::MulWide { mul, .. } => {
            let q = mul.output_quant;
            // An empty blob: that input has no table.
            let [wide_a, wide_b] = match step.op {
                Op::MulWide { tables, .. } => tables,
                _ => [Blob { offset: 0, len: 0 }; 2],
            };
            let args = ElementwiseArgs {
                wide_a: blob(wide_a),
                wide_b: blob(wide_b),
                wide_inputs: i32::from(wide_a.len > 0) | i32::from(wide_b.len > 0) << 1,
                plane: int(a.len() / b.len().max(1))?,
                zero_a: mul.input_zero_points[0],
                zero_b: mul.input_zero_points[1],
                multiplier_a: mul.requant.multiplier,
                shift_a: mul.requant.shift.into(),
                output_zero_point: q.zero_point,
                min: q.min.into(),
                max: q.max.into(),
                ..elementwise
            };
            Args::Mul(args)
        }
        Op::Rescale { rescale, offset } => {
            let q = rescale.output_quant;
            let args = ElementwiseArgs {
                // A Concat part: its own length, written from `offset` on.
                count: int(a.len())?,
                output: out_at + u64::from(offset),
                zero_a: rescale.input_zero_point,
                multiplier_a: rescale.requant.multiplier,
                shift_a: rescale.requant.shift.into(),
                output_zero_point: q.zero_point,
                min: q.min.into(),
                max: q.max.into(),
                ..elementwise
            };
            Args::Rescale(args)
        }
        Op::Lut { table } => Args::Lut(ElementwiseArgs {
            table: blob(table),
            ..elementwise
        }),
        // The indices (checked against the input when the program loaded) in the table's place.
        Op::Gather { indices, plane } => Args::Gather(ElementwiseArgs {
            table: blob(indices),
            plane: int(plane as usize)?,
            ..elementwise
        }),
        Op::Attention {
            attention: t,
            exp_table,
        } => {
            let q = t.output_quant;
            Args::Attention(AttentionArgs {
                input: a_at,
                output: out_at,
                exp_table: blob(exp_table),
                // One thread per head and pixel.
                count: int((t.heads as usize)
                    .checked_mul(t.plane as usize)
                    .ok_or(too_large)?)?,
                key_dim: int(t.key_dim as usize)?,
                head_dim: int(t.head_dim as usize)?,
                plane: int(t.plane as usize)?,
                table_len: int(exp_table.len as usize / 4)?,
                input_zero_point: t.input_zero_point,
                index_multiplier: t.logit_to_index.multiplier,
                index_shift: t.logit_to_index.shift.into(),
                output_multiplier: t.output_requant.multiplier,
                output_shift: t.output_requant.shift.into(),
                output_zero_point: q.zero_point,
                min: q.min.into(),
                max: q.max.into(),
                batch_stride: 0,
            })
        }
        Op::MaxPool(pool) => Args::MaxPool(pool_args(&pool.geometry, a_at, out_at, count, axis)?),
        Op::AveragePool(pool) => {
            let q = pool.output_quant;
            let args = PoolArgs {
                count_include_pad: pool.count_include_pad.into(),
                input_zero_point: pool.input_zero_point,
                multiplier: pool.requant.multiplier,
                shift: pool.requant.shift.into(),
                output_zero_point: q.zero_point,
                min: q.min.into(),
                max: q.max.into(),
                ..pool_args(&pool.geometry, a_at, out_at, count, axis)?
            };
            Args::AveragePool(args)
        }
        Op::GlobalAveragePool(pool) | Op::GlobalAveragePoolWide { pool, .. } => {
            let q = pool.output_quant;
            let wide = match step.op {
                Op::GlobalAveragePoolWide { table, .. } => Some(blob(table)),
                _ => None,
            };
            let args = PoolArgs {
                wide: wide.unwrap_or(0),
                wide_input: wide.is_some().into(),
                input: a_at,
                output: out_at,
                count,
                channels: count,
                // The whole plane is one window, summed by one thread.
                height: int(a.len() / pool.channels.max(1))?,
                input_zero_point: pool.input_zero_point,
                multiplier: pool.requant.multiplier,
                shift: pool.requant.shift.into(),
                output_zero_point: q.zero_point,
                min: q.min.into(),
                max: q.max.into(),
                ..PoolArgs::default()
            };
            Args::GlobalAveragePool(args)
        }
        Op::Resize(resize) => {
            let args = ResizeArgs {
                input: a_at,
                output: out_at,
                count,
                channels: int(resize.channels)?,
                height: axis(resize.input[0])?,
                width: axis(resize.input[1])?,
                out_height: axis(resize.output[0])?,
                out_width: axis(resize.output[1])?,
                bilinear: (resize.mode == kestrel_ops::int8::ResizeMode::Bilinear).into(),
                batch_stride: 0,
            };
            Args::Resize(args)
        }
    };
    let threads = match args {
        Args::Conv(a) | Args::ConvDp4a(a) | Args::Conv16(a) => a.count,
        Args::Add(a)
        | Args::Mul(a)
        | Args::Rescale(a)
        | Args::Lut(a)
        | Args::Gather(a)
        | Args::Add16(a)
        | Args::Mul16(a)
        | Args::Function16(a) => a.count,
        Args::MaxPool(a)
        | Args::AveragePool(a)
        | Args::GlobalAveragePool(a)
        | Args::GlobalAveragePool16(a) => a.count,
        Args::Resize(a) => a.count,
        Args::Preprocess(a) => a.count,
        Args::Decode(a) => a.count,
        Args::Attention(a) => a.count,
    };
    // Every count came from an i32 that fits a tensor length: never negative.
    Ok(Launch {
        threads: threads.unsigned_abs(),
        args,
    })
}

fn pool_args(
    g: &kestrel_ops::int8::PoolGeometry,
    input: u64,
    output: u64,
    count: i32,
    axis: impl Fn(usize) -> Result<i32, PlanningError>,
) -> Result<PoolArgs, PlanningError> {
    Ok(PoolArgs {
        input,
        output,
        count,
        // At most the output's length, which fits an i32.
        channels: i32::try_from(g.channels).unwrap_or(i32::MAX),
        height: axis(g.input[0])?,
        width: axis(g.input[1])?,
        out_height: axis(g.output[0])?,
        out_width: axis(g.output[1])?,
        kernel_h: axis(g.kernel[0])?,
        kernel_w: axis(g.kernel[1])?,
        stride_y: axis(g.stride[0])?,
        stride_x: axis(g.stride[1])?,
        pad_y: axis(g.pad[0])?,
        pad_x: axis(g.pad[1])?,
        ..PoolArgs::default()
    })
}

/// Output channels one thread of `kestrel_conv_dp4a` computes (`KESTREL_CONV_TILE`).
pub const CONV_TILE: usize = 8;

/// A dense (group 1) Conv or Gemm as a `kestrel_conv_dp4a` launch: its filter and bias packed
/// onto the end of `packed`, one thread per output position and tile of output channels.
/// `None` when the plan's blobs are missing (the dry run has ruled that out) or a size overflows.
fn dense(
    program: &Program<'_>,
    op: &Op,
    conv: ConvArgs,
    packed: &mut std::vec::Vec<i32>,
) -> Option<Args> {
    let (filter, bias) = program.filter_and_bias(op)?;
    let out_channels = usize::try_from(conv.out_channels).ok()?;
    let channels = usize::try_from(conv.channels).ok()?;
    let taps = usize::try_from(conv.kernel_h * conv.kernel_w).ok()?;
    let (words, biases) = pack_dp4a(
        filter,
        bias,
        out_channels,
        channels,
        taps,
        conv.input_zero_point,
    )?;
    let at = |index: usize| u64::try_from(index * 4).ok();
    let (packed_at, bias_at) = (at(packed.len())?, at(packed.len() + words.len())?);
    packed.extend(words);
    packed.extend(biases);
    i32::try_from(packed.len().checked_mul(4)?).ok()?;
    let positions = usize::try_from(conv.out_height * conv.out_width).ok()?;
    let threads = out_channels.div_ceil(CONV_TILE).checked_mul(positions)?;
    Some(Args::ConvDp4a(ConvArgs {
        packed: packed_at,
        packed_bias: bias_at,
        count: i32::try_from(threads).ok()?,
        ..conv
    }))
}

/// The words `kestrel_conv_dp4a` reads for a filter of `out_channels` x `channels` x `taps`:
/// per tile of [`CONV_TILE`] output channels, per quad of input channels, per tap, one word
/// per channel of the tile holding its four weights (little-endian, zero past the last input
/// or output channel); and per output channel (padded to whole tiles)
/// `bias - input_zero_point * sum(filter)`, wrapping as the executor's accumulator does.
pub fn pack_dp4a(
    filter: &[i8],
    bias: &[i32],
    out_channels: usize,
    channels: usize,
    taps: usize,
    input_zero_point: i32,
) -> Option<(std::vec::Vec<i32>, std::vec::Vec<i32>)> {
    let per_output = channels.checked_mul(taps)?;
    if filter.len() != out_channels.checked_mul(per_output)? || bias.len() != out_channels {
        return None;
    }
    let tiles = out_channels.div_ceil(CONV_TILE);
    let quads = channels.div_ceil(4);
    let weight = |oc: usize, c: usize, tap: usize| {
        if oc < out_channels && c < channels {
            filter[(oc * channels + c) * taps + tap]
        } else {
            0
        }
    };
    let mut words = std::vec::Vec::new();
    words
        .try_reserve_exact(tiles.checked_mul(quads)?.checked_mul(taps)? * CONV_TILE)
        .ok()?;
    for tile in 0..tiles {
        for quad in 0..quads {
            for tap in 0..taps {
                for lane in 0..CONV_TILE {
                    let oc = tile * CONV_TILE + lane;
                    let bytes: [i8; 4] = core::array::from_fn(|k| weight(oc, quad * 4 + k, tap));
                    words.push(i32::from_le_bytes(bytes.map(|b| b as u8)));
                }
            }
        }
    }
    let biases = (0..tiles * CONV_TILE)
        .map(|oc| match bias.get(oc) {
            Some(&b) => {
                let sum = filter[oc * per_output..(oc + 1) * per_output]
                    .iter()
                    .fold(0i32, |s, &w| s.wrapping_add(w.into()));
                b.wrapping_sub(input_zero_point.wrapping_mul(sum))
            }
            None => 0,
        })
        .collect();
    Some((words, biases))
}
