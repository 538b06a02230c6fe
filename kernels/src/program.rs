//! The int8 program a plan carries, and the executor that runs it over a caller's arena with no
//! heap.
//!
//! - The [`SectionKind::Ops`] section is a sequence of postcard-encoded [`Step`]s in execution
//!   order.
//! - The [`SectionKind::Arena`] section has one little-endian `(offset: u32, len: u32)` record per
//!   tensor id: where the tensor lives in the arena. Tensor 0 is the program input; the header
//!   names the output.
//! - The [`SectionKind::Weights`] section holds every constant. A [`Blob`] points into it; blobs
//!   start on a 16-byte boundary so `i32` arrays are read in place.
//!
//! [`Program::new`] checks everything a step refers to once, so running cannot go out of bounds;
//! the kernels still check their buffers and report a [`ShapeError`] rather than panic.

use core::ops::Range;

use serde::{Deserialize, Serialize};

use crate::int8::{
    Add, AveragePool, ChannelQuant, Conv, ConvGeometry, Gemm, GlobalAveragePool, Lut, MaxPool, Mul,
    OutputQuant, Rescale, Resize, ShapeError,
};
use crate::plan::{Plan, PlanError, PlanHeader, SectionKind};

/// A span of the weights section.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blob {
    /// Byte offset from the start of the weights section (a multiple of 16).
    pub offset: u32,
    /// Bytes.
    pub len: u32,
}

/// Per-output-channel constants of a Conv or Gemm: `i32` biases, `i32` multipliers, `i8` shifts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelBlobs {
    /// `i32` per channel, in the accumulator's scale.
    pub bias: Blob,
    /// `i32` per channel: the requantisation multipliers.
    pub multiplier: Blob,
    /// `i8` per channel: the requantisation shifts.
    pub shift: Blob,
}

/// Index into the arena table.
pub type TensorId = u16;

/// One layer, with integer-only parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// 2-D convolution with a fused activation (the output clamp).
    Conv {
        /// Shapes and window.
        geometry: ConvGeometry,
        /// `i8` `[out, in / group, kh, kw]`.
        weights: Blob,
        /// Biases and requantisation.
        channels: ChannelBlobs,
        /// Zero point of the input.
        input_zero_point: i32,
        /// Output zero point and clamp.
        output_quant: OutputQuant,
    },
    /// Fully connected (Gemm or MatMul with constant weights).
    Gemm {
        /// `i8` `[out, in]`.
        weights: Blob,
        /// Biases and requantisation.
        channels: ChannelBlobs,
        /// Zero point of the input.
        input_zero_point: i32,
        /// Output zero point and clamp.
        output_quant: OutputQuant,
    },
    /// Element-wise sum of two tensors.
    Add(Add),
    /// Element-wise or per-channel product of two tensors.
    Mul(Mul),
    /// Channel means.
    GlobalAveragePool(GlobalAveragePool),
    /// Window maxima.
    MaxPool(MaxPool),
    /// Window means.
    AveragePool(AveragePool),
    /// Nearest or bilinear resampling.
    Resize(Resize),
    /// A 256-entry table: Sigmoid, SiLU, Clip, ReLU6, ReLU.
    Lut {
        /// `i8` table indexed by the input code as `u8`.
        table: Blob,
    },
    /// Requantise the input into the output starting at `offset`: one part of a Concat.
    Rescale {
        /// Zero points and scale.
        rescale: Rescale,
        /// First output element written.
        offset: u32,
    },
}

impl Op {
    /// How many input tensors the op reads.
    pub fn arity(&self) -> usize {
        match self {
            Self::Add(_) | Self::Mul(_) => 2,
            _ => 1,
        }
    }
}

/// One op and the tensors it reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// The layer.
    pub op: Op,
    /// Tensors read; only the first [`Op::arity`] are used.
    pub inputs: [TensorId; 2],
    /// Tensor written.
    pub output: TensorId,
}

/// Why a plan's program cannot be loaded or run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum ProgramError {
    /// The container itself is unusable.
    Plan(PlanError),
    /// The plan bytes do not start on a 16-byte boundary, so weights cannot be read in place.
    Misaligned,
    /// A step does not decode.
    Op {
        /// Step index.
        step: usize,
    },
    /// A step refers to a tensor the arena table lacks, or the table places it outside the arena.
    Tensor {
        /// Step index (`usize::MAX` for the header's output tensor).
        step: usize,
        /// Tensor id.
        id: TensorId,
    },
    /// A step's constant is outside the weights section or has the wrong size or alignment.
    Blob {
        /// Step index.
        step: usize,
    },
    /// A step's output overlaps one of its inputs in the arena.
    Aliasing {
        /// Step index.
        step: usize,
    },
    /// A kernel refused its buffers.
    Shape {
        /// Step index.
        step: usize,
        /// Which buffer.
        error: ShapeError,
    },
    /// The caller's arena is smaller than the plan needs.
    Arena {
        /// Bytes the plan needs.
        needed: usize,
        /// Bytes supplied.
        got: usize,
    },
    /// A float input or output buffer has the wrong length.
    Length {
        /// Values expected.
        expected: usize,
        /// Values supplied.
        got: usize,
    },
}

impl core::fmt::Display for ProgramError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Plan(e) => write!(f, "{e}"),
            Self::Misaligned => f.write_str("plan bytes must start on a 16-byte boundary"),
            Self::Op { step } => write!(f, "plan step {step} does not decode"),
            Self::Tensor { step, id } => {
                write!(
                    f,
                    "plan step {step} refers to tensor {id}, which has no valid place in the arena"
                )
            }
            Self::Blob { step } => write!(
                f,
                "plan step {step} has a constant outside the weights or of the wrong size"
            ),
            Self::Aliasing { step } => write!(f, "plan step {step} writes over its own input"),
            Self::Shape { step, error } => write!(f, "plan step {step}: {error}"),
            Self::Arena { needed, got } => {
                write!(f, "arena has {got} bytes, the plan needs {needed}")
            }
            Self::Length { expected, got } => {
                write!(f, "buffer has {got} values, the plan expects {expected}")
            }
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ProgramError {}

impl From<PlanError> for ProgramError {
    fn from(e: PlanError) -> Self {
        Self::Plan(e)
    }
}

/// Kernels for the ops that dominate run time: the generic ones, or faster ones that must give
/// the same bits. The executor hands every Conv and Add to one of these.
pub trait Kernels {
    /// Run `conv`, the layer of step `step`, on `input` into `output`.
    fn conv(
        &mut self,
        step: usize,
        conv: &Conv<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError>;

    /// Run `add` on `a` and `b` into `output`.
    fn add(&mut self, add: &Add, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        add.run(a, b, output)
    }
}

/// The generic kernels: the oracle, and the only choice without `std`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

impl Kernels for Reference {
    fn conv(
        &mut self,
        _step: usize,
        conv: &Conv<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        conv.run(input, output)
    }
}

/// A verified program borrowing its plan bytes.
#[derive(Clone, Debug)]
pub struct Program<'a> {
    plan: Plan<'a>,
    ops: &'a [u8],
    weights: &'a [u8],
    tensors: &'a [u8],
}

const TENSOR_RECORD: usize = 8;

impl<'a> Program<'a> {
    /// Parse `bytes` as a plan and check every step against the arena table and the weights.
    /// Never panics.
    pub fn new(bytes: &'a [u8]) -> Result<Self, ProgramError> {
        if !(bytes.as_ptr() as usize).is_multiple_of(16) {
            return Err(ProgramError::Misaligned);
        }
        let plan = Plan::parse(bytes)?;
        let section = |kind| {
            plan.section(kind)
                .ok_or(ProgramError::Plan(PlanError::MissingSection(kind)))
        };
        let program = Self {
            ops: section(SectionKind::Ops)?,
            weights: plan.section(SectionKind::Weights).unwrap_or(&[]),
            tensors: section(SectionKind::Arena)?,
            plan,
        };
        program.validate()?;
        Ok(program)
    }

    /// The plan's header.
    pub fn header(&self) -> &PlanHeader<'a> {
        self.plan.header()
    }

    /// Bytes of arena [`Program::run`] needs.
    pub fn arena_size(&self) -> usize {
        self.header().arena_size as usize
    }

    /// The steps in execution order, decoded one at a time.
    pub fn steps(&self) -> impl Iterator<Item = Result<Step, ProgramError>> + 'a {
        let mut rest = self.ops;
        let mut index = 0;
        core::iter::from_fn(move || {
            if rest.is_empty() {
                return None;
            }
            let step = match postcard::take_from_bytes::<Step>(rest) {
                Ok((step, tail)) => {
                    rest = tail;
                    Ok(step)
                }
                Err(_) => {
                    rest = &[];
                    Err(ProgramError::Op { step: index })
                }
            };
            index += 1;
            Some(step)
        })
    }

    /// Where tensor `id` lives in the arena.
    pub fn tensor(&self, id: TensorId) -> Option<Range<usize>> {
        let at = usize::from(id) * TENSOR_RECORD;
        let record = self.tensors.get(at..at + TENSOR_RECORD)?;
        let word = |i: usize| {
            let bytes: [u8; 4] = record.get(i..i + 4)?.try_into().ok()?;
            Some(u32::from_le_bytes(bytes) as usize)
        };
        let (offset, len) = (word(0)?, word(4)?);
        let end = offset.checked_add(len)?;
        (end <= self.arena_size()).then_some(offset..end)
    }

    fn output_tensor(&self) -> Result<Range<usize>, ProgramError> {
        let id = self.header().output_tensor;
        self.tensor(id).ok_or(ProgramError::Tensor {
            step: usize::MAX,
            id,
        })
    }

    fn blob(&self, blob: Blob) -> Option<&'a [u8]> {
        let start = blob.offset as usize;
        if !start.is_multiple_of(16) {
            return None;
        }
        self.weights
            .get(start..start.checked_add(blob.len as usize)?)
    }

    fn bytes_as_i8(&self, blob: Blob) -> Option<&'a [i8]> {
        self.blob(blob).map(bytemuck::cast_slice)
    }

    fn channels(&self, blobs: ChannelBlobs) -> Option<ChannelQuant<'a>> {
        let bias = bytemuck::try_cast_slice(self.blob(blobs.bias)?).ok()?;
        let multiplier = bytemuck::try_cast_slice(self.blob(blobs.multiplier)?).ok()?;
        let shift = self.bytes_as_i8(blobs.shift)?;
        (bias.len() == multiplier.len() && bias.len() == shift.len()).then_some(ChannelQuant {
            bias,
            multiplier,
            shift,
        })
    }

    /// The convolution `op` describes, constants borrowed from the plan; `None` for other ops.
    pub fn conv(&self, op: &Op) -> Option<Conv<'a>> {
        match *op {
            Op::Conv {
                geometry,
                weights,
                channels,
                input_zero_point,
                output_quant,
            } => Some(Conv {
                geometry,
                weights: self.bytes_as_i8(weights)?,
                channels: self.channels(channels)?,
                input_zero_point,
                output_quant,
            }),
            _ => None,
        }
    }

    fn validate(&self) -> Result<(), ProgramError> {
        if self.tensor(0).is_none() {
            return Err(ProgramError::Tensor { step: 0, id: 0 });
        }
        self.output_tensor()?;
        let input_len = self
            .header()
            .input_shape
            .iter()
            .map(|&d| d as usize)
            .product::<usize>();
        if self.tensor(0).map(|r| r.len()) != Some(input_len) {
            return Err(ProgramError::Tensor { step: 0, id: 0 });
        }
        for (index, step) in self.steps().enumerate() {
            let step = step?;
            let out = self.tensor(step.output).ok_or(ProgramError::Tensor {
                step: index,
                id: step.output,
            })?;
            for &id in &step.inputs[..step.op.arity()] {
                let input = self
                    .tensor(id)
                    .ok_or(ProgramError::Tensor { step: index, id })?;
                if input.start < out.end && out.start < input.end {
                    return Err(ProgramError::Aliasing { step: index });
                }
            }
            let blobs_ok = match step.op {
                Op::Conv {
                    weights, channels, ..
                }
                | Op::Gemm {
                    weights, channels, ..
                } => self.blob(weights).is_some() && self.channels(channels).is_some(),
                Op::Lut { table } => self.blob(table).is_some_and(|t| t.len() == 256),
                _ => true,
            };
            if !blobs_ok {
                return Err(ProgramError::Blob { step: index });
            }
        }
        Ok(())
    }

    /// Run every step over `arena`, whose input tensor the caller has filled
    /// ([`Program::quantize_input`]). Allocates nothing.
    pub fn run(&self, arena: &mut [i8], kernels: &mut impl Kernels) -> Result<(), ProgramError> {
        if arena.len() < self.arena_size() {
            return Err(ProgramError::Arena {
                needed: self.arena_size(),
                got: arena.len(),
            });
        }
        for (index, step) in self.steps().enumerate() {
            self.run_step(index, step?, arena, kernels)?;
        }
        Ok(())
    }

    fn run_step(
        &self,
        index: usize,
        step: Step,
        arena: &mut [i8],
        kernels: &mut impl Kernels,
    ) -> Result<(), ProgramError> {
        let tensor_error = |id| ProgramError::Tensor { step: index, id };
        let out = self.tensor(step.output).ok_or(tensor_error(step.output))?;
        let a = self
            .tensor(step.inputs[0])
            .ok_or(tensor_error(step.inputs[0]))?;
        // A second input is only looked up for ops that read one.
        let b = if step.op.arity() == 2 {
            self.tensor(step.inputs[1])
                .ok_or(tensor_error(step.inputs[1]))?
        } else {
            a.clone()
        };
        let (inputs, output) =
            split_arena(arena, [a, b], out).ok_or(ProgramError::Aliasing { step: index })?;
        let [x, y] = inputs;
        let blob_error = ProgramError::Blob { step: index };
        let result = match step.op {
            Op::Conv { .. } => {
                let conv = self.conv(&step.op).ok_or(blob_error)?;
                kernels.conv(index, &conv, x, output)
            }
            Op::Gemm {
                weights,
                channels,
                input_zero_point,
                output_quant,
            } => Gemm {
                weights: self.bytes_as_i8(weights).ok_or(blob_error)?,
                channels: self.channels(channels).ok_or(blob_error)?,
                input_zero_point,
                output_quant,
            }
            .run(x, output),
            Op::Add(add) => kernels.add(&add, x, y, output),
            Op::Mul(mul) => mul.run(x, y, output),
            Op::GlobalAveragePool(pool) => pool.run(x, output),
            Op::MaxPool(pool) => pool.run(x, output),
            Op::AveragePool(pool) => pool.run(x, output),
            Op::Resize(resize) => resize.run(x, output),
            Op::Lut { table } => Lut {
                table: self.bytes_as_i8(table).ok_or(blob_error)?,
            }
            .run(x, output),
            Op::Rescale { rescale, offset } => {
                let start = offset as usize;
                match output.get_mut(start..start.saturating_add(x.len())) {
                    Some(part) => rescale.run(x, part),
                    None => Err(ShapeError { buffer: "output" }),
                }
            }
        };
        result.map_err(|error| ProgramError::Shape { step: index, error })
    }

    /// Values in the float input.
    pub fn input_len(&self) -> usize {
        self.tensor(0).map_or(0, |r| r.len())
    }

    /// Values in the float output.
    pub fn output_len(&self) -> usize {
        self.output_tensor().map_or(0, |r| r.len())
    }

    /// Quantise a float input tensor into the arena's input tensor.
    pub fn quantize_input(&self, input: &[f32], arena: &mut [i8]) -> Result<(), ProgramError> {
        let range = self
            .tensor(0)
            .ok_or(ProgramError::Tensor { step: 0, id: 0 })?;
        let (got, arena_len) = (input.len(), arena.len());
        let codes = arena.get_mut(range.clone()).ok_or(ProgramError::Arena {
            needed: range.end,
            got: arena_len,
        })?;
        if got != codes.len() {
            return Err(ProgramError::Length {
                expected: codes.len(),
                got,
            });
        }
        let h = self.header();
        let inverse = 1.0 / h.input_scale;
        for (code, &x) in codes.iter_mut().zip(input) {
            // NaN becomes the zero point: a corrupt pixel must not poison the whole tensor.
            let q = libm::roundf(x * inverse) + h.input_zero_point as f32;
            *code = if q.is_nan() {
                h.input_zero_point as i8
            } else {
                q.clamp(-128.0, 127.0) as i8
            };
        }
        Ok(())
    }

    /// Dequantise the arena's output tensor into `output` (and apply the output Softmax when
    /// the model ends in one).
    pub fn dequantize_output(&self, arena: &[i8], output: &mut [f32]) -> Result<(), ProgramError> {
        let range = self.output_tensor()?;
        let codes = arena.get(range.clone()).ok_or(ProgramError::Arena {
            needed: range.end,
            got: arena.len(),
        })?;
        if output.len() != codes.len() {
            return Err(ProgramError::Length {
                expected: codes.len(),
                got: output.len(),
            });
        }
        let h = self.header();
        for (value, &code) in output.iter_mut().zip(codes) {
            *value = h.output_scale * (f32::from(code) - h.output_zero_point as f32);
        }
        if h.output_softmax {
            let max = output.iter().copied().fold(f32::MIN, f32::max);
            let mut sum = 0.0;
            for value in output.iter_mut() {
                *value = libm::expf(*value - max);
                sum += *value;
            }
            output.iter_mut().for_each(|v| *v /= sum);
        }
        Ok(())
    }
}

/// Borrow two input ranges and one output range of `arena` at once; `None` if the output
/// overlaps an input or a range is out of bounds.
fn split_arena(
    arena: &mut [i8],
    inputs: [Range<usize>; 2],
    out: Range<usize>,
) -> Option<([&[i8]; 2], &mut [i8])> {
    let (before, rest) = arena.split_at_mut_checked(out.start)?;
    let (output, after) = rest.split_at_mut_checked(out.end.checked_sub(out.start)?)?;
    let (before, after) = (&*before, &*after);
    let view = |r: Range<usize>| {
        if r.end <= out.start {
            before.get(r)
        } else if r.start >= out.end {
            after.get(r.start - out.end..r.end - out.end)
        } else {
            None
        }
    };
    let [a, b] = inputs;
    Some(([view(a)?, view(b)?], output))
}

/// Assembles the Ops, Weights and Arena sections of a plan: the compiler's side.
#[cfg(feature = "std")]
#[derive(Clone, Debug, Default)]
pub struct ProgramBuilder {
    ops: std::vec::Vec<u8>,
    weights: std::vec::Vec<u8>,
    tensors: std::vec::Vec<u8>,
}

#[cfg(feature = "std")]
impl ProgramBuilder {
    /// Append a constant to the weights section, 16-byte aligned.
    pub fn blob(&mut self, bytes: &[u8]) -> Blob {
        self.weights
            .resize(self.weights.len().next_multiple_of(16), 0);
        let offset = self.weights.len() as u32;
        self.weights.extend_from_slice(bytes);
        Blob {
            offset,
            len: bytes.len() as u32,
        }
    }

    /// Append `i8` values.
    pub fn i8_blob(&mut self, values: &[i8]) -> Blob {
        self.blob(bytemuck::cast_slice(values))
    }

    /// Append biases and requantisation of each output channel.
    pub fn channels(&mut self, bias: &[i32], requant: &[crate::quant::Requant]) -> ChannelBlobs {
        let bias = self.blob(
            &bias
                .iter()
                .flat_map(|b| b.to_le_bytes())
                .collect::<std::vec::Vec<_>>(),
        );
        let multiplier = self.blob(
            &requant
                .iter()
                .flat_map(|r| r.multiplier.to_le_bytes())
                .collect::<std::vec::Vec<_>>(),
        );
        let shifts: std::vec::Vec<i8> = requant.iter().map(|r| r.shift).collect();
        ChannelBlobs {
            bias,
            multiplier,
            shift: self.i8_blob(&shifts),
        }
    }

    /// Place tensor `id` (ids must be added in order 0, 1, 2, ...).
    pub fn tensor(&mut self, offset: usize, len: usize) -> TensorId {
        let id = (self.tensors.len() / TENSOR_RECORD) as TensorId;
        self.tensors
            .extend_from_slice(&(offset as u32).to_le_bytes());
        self.tensors.extend_from_slice(&(len as u32).to_le_bytes());
        id
    }

    /// Append a step.
    pub fn push(&mut self, step: Step) -> Result<(), postcard::Error> {
        self.ops.extend_from_slice(&postcard::to_allocvec(&step)?);
        Ok(())
    }

    /// The plan file.
    pub fn finish(self, header: &PlanHeader<'_>) -> Result<std::vec::Vec<u8>, postcard::Error> {
        crate::plan::write_plan(
            header,
            &[
                (SectionKind::Ops, &self.ops),
                (SectionKind::Weights, &self.weights),
                (SectionKind::Arena, &self.tensors),
            ],
        )
    }
}

/// Plan bytes copied to a 16-byte boundary, as [`Program::new`] requires.
#[cfg(feature = "std")]
#[derive(Clone, Debug)]
pub struct AlignedBytes {
    words: std::vec::Vec<u128>,
    len: usize,
}

#[cfg(feature = "std")]
impl AlignedBytes {
    /// Copy `bytes`.
    pub fn new(bytes: &[u8]) -> Self {
        let mut words = std::vec![0u128; bytes.len().div_ceil(16)];
        bytemuck::cast_slice_mut::<u128, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Self {
            words,
            len: bytes.len(),
        }
    }

    /// The bytes, starting on a 16-byte boundary.
    pub fn as_bytes(&self) -> &[u8] {
        &bytemuck::cast_slice::<u128, u8>(&self.words)[..self.len]
    }
}
