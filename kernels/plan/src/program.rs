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

use crate::plan::{Plan, PlanError, PlanHeader, SectionKind};
use kestrel_ops::int16::{
    Add16, Conv16, Function16, GlobalAveragePool16, Mul16, WideOutput, Width,
};
use kestrel_ops::int8::{
    Add, Attention, AveragePool, ChannelQuant, Conv, ConvGeometry, Gather, Gemm, GlobalAveragePool,
    Lut, MaxPool, Mul, OutputQuant, Rescale, Resize, ShapeError, WideTable,
};
use kestrel_ops::Kernels;

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
    /// Copy input planes in the order `indices` gives: a channel Slice, Split or shuffle.
    Gather {
        /// `u32` per output plane: the input plane it copies.
        indices: Blob,
        /// Values per plane.
        plane: u32,
    },
    /// Multi-head self-attention over pixels (ultralytics' C2PSA).
    Attention {
        /// Heads, planes and requantisation.
        attention: Attention,
        /// `i32` exponential table ([`Attention::exp_table`]).
        exp_table: Blob,
    },
    /// A [`Op::Conv`] whose input is read through a 16-bit table ([`WideTable`]): the output
    /// of a function (Sigmoid, SiLU, HardSwish...) the compiler kept at 16 bits rather than
    /// round to int8.
    ConvWide {
        /// Shapes and window.
        geometry: ConvGeometry,
        /// `i8` `[out, in / group, kh, kw]`.
        weights: Blob,
        /// Biases and requantisation.
        channels: ChannelBlobs,
        /// `i16` [`WideTable`] of the input.
        table: Blob,
        /// Output zero point and clamp.
        output_quant: OutputQuant,
    },
    /// A [`Op::GlobalAveragePool`] whose input is read through a 16-bit table.
    GlobalAveragePoolWide {
        /// Channels and requantisation (its input zero point is not used).
        pool: GlobalAveragePool,
        /// `i16` [`WideTable`] of the input.
        table: Blob,
    },
    /// A [`Op::Mul`] whose inputs are read through 16-bit tables where they have one.
    MulWide {
        /// Zero points (of inputs without a table) and requantisation.
        mul: Mul,
        /// `i16` [`WideTable`] of each input; an empty blob where that input has none.
        tables: [Blob; 2],
    },
    /// A convolution, or with a 1x1 geometry over one pixel a fully connected layer, whose
    /// input, output or both are 16-bit tensors ([`kestrel_ops::int16`]).
    Conv16 {
        /// Shapes and window.
        geometry: ConvGeometry,
        /// `i8` `[out, in / group, kh, kw]`.
        weights: Blob,
        /// Biases and requantisation.
        channels: ChannelBlobs,
        /// Element type of the input.
        input_width: Width,
        /// Zero point of the input.
        input_zero_point: i32,
        /// Width, zero point and clamp of the output.
        output: WideOutput,
    },
    /// Element-wise sum of two 16-bit tensors.
    Add16(Add16),
    /// Element-wise or per-channel product of two 16-bit tensors.
    Mul16(Mul16),
    /// Channel means of a 16-bit tensor.
    GlobalAveragePool16(GlobalAveragePool16),
    /// An element-wise function between 16-bit tensors: `i16` [`Function16`] table.
    Function16 {
        /// `i16` table of [`kestrel_ops::int16::FUNCTION16_ENTRIES`] codes.
        table: Blob,
    },
}

impl Op {
    /// The width of the codes the op writes.
    pub fn output_width(&self) -> Width {
        match self {
            Self::Conv16 { output, .. } => output.width,
            Self::Add16(add) => add.output.width,
            Self::Mul16(mul) => mul.output.width,
            Self::GlobalAveragePool16(pool) => pool.output.width,
            Self::Function16 { .. } => Width::I16,
            _ => Width::I8,
        }
    }

    /// How many input tensors the op reads.
    pub fn arity(&self) -> usize {
        match self {
            Self::Add(_)
            | Self::Mul(_)
            | Self::MulWide { .. }
            | Self::Add16(_)
            | Self::Mul16(_) => 2,
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

/// A verified program borrowing its plan bytes.
#[derive(Clone, Debug)]
pub struct Program<'a> {
    plan: Plan<'a>,
    ops: &'a [u8],
    weights: &'a [u8],
    tensors: &'a [u8],
    /// The width of the output tensor's codes: what its last writer writes.
    output_width: Width,
}

const TENSOR_RECORD: usize = 8;

impl<'a> Program<'a> {
    /// Parse `bytes` as a plan and check every step against the arena table and the weights.
    /// Never panics.
    pub fn new(bytes: &'a [u8]) -> Result<Self, ProgramError> {
        Self::from_plan(bytes, Plan::parse)
    }

    /// As [`Program::new`] over memory an injected upset changed: CRC mismatches are let
    /// through ([`Plan::parse_unchecked_crcs`]), every other check still holds.
    pub fn new_unchecked_crcs(bytes: &'a [u8]) -> Result<Self, ProgramError> {
        Self::from_plan(bytes, Plan::parse_unchecked_crcs)
    }

    fn from_plan(
        bytes: &'a [u8],
        parse: impl FnOnce(&'a [u8]) -> Result<Plan<'a>, PlanError>,
    ) -> Result<Self, ProgramError> {
        if !(bytes.as_ptr() as usize).is_multiple_of(16) {
            return Err(ProgramError::Misaligned);
        }
        let plan = parse(bytes)?;
        let section = |kind| {
            plan.section(kind)
                .ok_or(ProgramError::Plan(PlanError::MissingSection(kind)))
        };
        let mut program = Self {
            ops: section(SectionKind::Ops)?,
            weights: plan.section(SectionKind::Weights).unwrap_or(&[]),
            tensors: section(SectionKind::Arena)?,
            output_width: Width::I8,
            plan,
        };
        program.output_width = program.validate()?;
        Ok(program)
    }

    /// The plan's header.
    pub fn header(&self) -> &PlanHeader<'a> {
        self.plan.header()
    }

    /// The weights section: every constant a step's [`Blob`] points into.
    pub fn weights(&self) -> &'a [u8] {
        self.weights
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

    /// A Gather step's indices, borrowed from the plan; `None` when the blob is outside the
    /// weights section or not whole `u32`s.
    pub fn gather(&self, indices: Blob, plane: u32) -> Option<Gather<'a>> {
        Some(Gather {
            indices: bytemuck::try_cast_slice(self.blob(indices)?).ok()?,
            plane: plane as usize,
        })
    }

    /// An Attention step's exponential table, borrowed from the plan; `None` when the blob is
    /// outside the weights section or not whole `i32`s.
    pub fn exp_table(&self, table: Blob) -> Option<&'a [i32]> {
        bytemuck::try_cast_slice(self.blob(table)?).ok()
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

    /// The filter (`[out, in / group, kh, kw]`, or `[out, in]`) and biases of a Conv or Gemm,
    /// borrowed from the plan; `None` for other ops or blobs outside the weights section.
    pub fn filter_and_bias(&self, op: &Op) -> Option<(&'a [i8], &'a [i32])> {
        match *op {
            Op::Conv {
                weights, channels, ..
            }
            | Op::ConvWide {
                weights, channels, ..
            }
            | Op::Gemm {
                weights, channels, ..
            }
            | Op::Conv16 {
                weights, channels, ..
            } => Some((self.bytes_as_i8(weights)?, self.channels(channels)?.bias)),
            _ => None,
        }
    }

    /// Every step's convolution by step index (`None` for other ops and undecodable steps):
    /// what the kernel table's plug-ins pack at load.
    #[cfg(feature = "alloc")]
    pub fn convs(&self) -> alloc::vec::Vec<Option<Conv<'a>>> {
        self.steps()
            .map(|step| step.ok().and_then(|s| self.conv(&s.op)))
            .collect()
    }

    /// Every step's 16-bit convolution (`None` for other ops), for kernels to prepare.
    #[cfg(feature = "alloc")]
    pub fn convs16(&self) -> alloc::vec::Vec<Option<Conv16<'a>>> {
        self.steps()
            .map(|step| step.ok().and_then(|s| self.conv16(&s.op)))
            .collect()
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

    /// The convolution of an [`Op::ConvWide`] and its input's table; `None` for other ops.
    pub fn conv_wide(&self, op: &Op) -> Option<(Conv<'a>, &'a WideTable)> {
        match *op {
            Op::ConvWide {
                geometry,
                weights,
                channels,
                table,
                output_quant,
            } => Some((
                Conv {
                    geometry,
                    weights: self.bytes_as_i8(weights)?,
                    channels: self.channels(channels)?,
                    input_zero_point: 0,
                    output_quant,
                },
                self.wide_table(table)?,
            )),
            _ => None,
        }
    }

    /// The [`Conv16`] of a [`Op::Conv16`] step.
    pub fn conv16(&self, op: &Op) -> Option<Conv16<'a>> {
        match *op {
            Op::Conv16 {
                geometry,
                weights,
                channels,
                input_width,
                input_zero_point,
                output,
            } => Some(Conv16 {
                geometry,
                weights: self.bytes_as_i8(weights)?,
                channels: self.channels(channels)?,
                input_width,
                input_zero_point,
                output,
            }),
            _ => None,
        }
    }

    /// The [`Function16`] table at `table`, if it has the right length.
    pub fn function16(&self, table: Blob) -> Option<Function16<'a>> {
        let table: &[i16] = bytemuck::try_cast_slice(self.blob(table)?).ok()?;
        (table.len() == kestrel_ops::int16::FUNCTION16_ENTRIES).then_some(Function16 { table })
    }

    /// A [`WideTable`] borrowed from the plan; `None` if the blob is not one.
    pub fn wide_table(&self, table: Blob) -> Option<&'a WideTable> {
        let values: &[i16] = bytemuck::try_cast_slice(self.blob(table)?).ok()?;
        values.try_into().ok()
    }

    /// The tables of an [`Op::MulWide`]'s inputs (an empty blob: none); `None` if a blob is
    /// neither empty nor a table.
    fn mul_tables(&self, tables: [Blob; 2]) -> Option<[Option<&'a WideTable>; 2]> {
        let table = |blob: Blob| match blob.len {
            0 => Some(None),
            _ => self.wide_table(blob).map(Some),
        };
        Some([table(tables[0])?, table(tables[1])?])
    }

    /// Check every step; the width of the output tensor's codes.
    fn validate(&self) -> Result<Width, ProgramError> {
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
        let mut output_width = Width::I8;
        for (index, step) in self.steps().enumerate() {
            let step = step?;
            if step.output == self.header().output_tensor {
                output_width = step.op.output_width();
            }
            let out = self.tensor(step.output).ok_or(ProgramError::Tensor {
                step: index,
                id: step.output,
            })?;
            for &id in step.inputs.iter().take(step.op.arity()) {
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
                Op::ConvWide { .. } => self.conv_wide(&step.op).is_some(),
                Op::GlobalAveragePoolWide { table, .. } => self.wide_table(table).is_some(),
                Op::MulWide { tables, .. } => self.mul_tables(tables).is_some(),
                Op::Conv16 { .. } => self.conv16(&step.op).is_some(),
                Op::Function16 { table } => self.function16(table).is_some(),
                Op::Gather { indices, plane } => {
                    let input = self.tensor(step.inputs[0]).map_or(0, |r| r.len());
                    self.gather(indices, plane)
                        .is_some_and(|g| g.check(input, out.len()).is_ok())
                }
                Op::Attention {
                    attention,
                    exp_table,
                } => {
                    let input = self.tensor(step.inputs[0]).map_or(0, |r| r.len());
                    self.exp_table(exp_table)
                        .is_some_and(|t| attention.check(t, input, out.len()).is_ok())
                }
                _ => true,
            };
            if !blobs_ok {
                return Err(ProgramError::Blob { step: index });
            }
        }
        let output = self.output_tensor()?;
        if !output.len().is_multiple_of(output_width.bytes()) {
            return Err(ProgramError::Tensor {
                step: usize::MAX,
                id: self.header().output_tensor,
            });
        }
        Ok(output_width)
    }

    /// Run every step over `arena`, whose input tensor the caller has filled
    /// ([`Program::quantize_input`]). Allocates nothing.
    pub fn run(&self, arena: &mut [i8], kernels: &mut impl Kernels) -> Result<(), ProgramError> {
        self.run_observed(arena, kernels, |_, _| {})
    }

    /// [`Program::run`], handing `after_step` each step's index and output tensor once it is
    /// written: where fault injection flips activations between layers.
    pub fn run_observed(
        &self,
        arena: &mut [i8],
        kernels: &mut impl Kernels,
        mut after_step: impl FnMut(usize, &mut [i8]),
    ) -> Result<(), ProgramError> {
        if arena.len() < self.arena_size() {
            return Err(ProgramError::Arena {
                needed: self.arena_size(),
                got: arena.len(),
            });
        }
        for (index, step) in self.steps().enumerate() {
            let step = step?;
            self.run_step(index, step, arena, kernels)?;
            if let Some(output) = self.tensor(step.output).and_then(|r| arena.get_mut(r)) {
                after_step(index, output);
            }
        }
        Ok(())
    }

    /// Steps in the op list.
    pub fn step_count(&self) -> usize {
        self.steps().count()
    }

    /// The plan this program was parsed from.
    pub fn plan(&self) -> &Plan<'a> {
        &self.plan
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
            } => {
                let gemm = Gemm {
                    weights: self.bytes_as_i8(weights).ok_or(blob_error)?,
                    channels: self.channels(channels).ok_or(blob_error)?,
                    input_zero_point,
                    output_quant,
                };
                kernels.gemm(&gemm, x, output)
            }
            Op::ConvWide { .. } => {
                let (conv, table) = self.conv_wide(&step.op).ok_or(blob_error)?;
                kernels.conv_wide(&conv, table, x, output)
            }
            Op::Add(add) => kernels.add(&add, x, y, output),
            Op::Mul(mul) => kernels.mul(&mul, x, y, output),
            Op::MulWide { mul, tables } => {
                let tables = self.mul_tables(tables).ok_or(blob_error)?;
                kernels.mul_wide(&mul, tables, x, y, output)
            }
            Op::GlobalAveragePool(pool) => kernels.global_average_pool(&pool, x, output),
            Op::Conv16 { .. } => {
                let conv = self.conv16(&step.op).ok_or(blob_error)?;
                kernels.conv16(index, &conv, x, output)
            }
            Op::Add16(add) => kernels.add16(&add, x, y, output),
            Op::Mul16(mul) => kernels.mul16(&mul, x, y, output),
            Op::GlobalAveragePool16(pool) => kernels.global_average_pool16(&pool, x, output),
            Op::Function16 { table } => {
                let function = self.function16(table).ok_or(blob_error)?;
                kernels.function16(&function, x, output)
            }
            Op::GlobalAveragePoolWide { pool, table } => {
                let table = self.wide_table(table).ok_or(blob_error)?;
                kernels.global_average_pool_wide(&pool, table, x, output)
            }
            Op::MaxPool(pool) => kernels.max_pool(&pool, x, output),
            Op::AveragePool(pool) => kernels.average_pool(&pool, x, output),
            Op::Resize(resize) => kernels.resize(&resize, x, output),
            Op::Lut { table } => {
                let lut = Lut {
                    table: self.bytes_as_i8(table).ok_or(blob_error)?,
                };
                kernels.lut(&lut, x, output)
            }
            Op::Gather { indices, plane } => {
                let gather = self.gather(indices, plane).ok_or(blob_error)?;
                kernels.gather(&gather, x, output)
            }
            Op::Attention {
                attention,
                exp_table,
            } => {
                let table = self.exp_table(exp_table).ok_or(blob_error)?;
                kernels.attention(&attention, table, x, output)
            }
            Op::Rescale { rescale, offset } => {
                let start = offset as usize;
                match output.get_mut(start..start.saturating_add(x.len())) {
                    Some(part) => kernels.rescale(&rescale, x, part),
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
        self.output_bytes() / self.output_width.bytes()
    }

    /// Bytes of the output tensor's codes in the arena ([`Program::output_width`] each).
    pub fn output_bytes(&self) -> usize {
        self.output_tensor().map_or(0, |r| r.len())
    }

    /// The width of the output's codes: 16 bits where the step writing it is a 16-bit one
    /// (a classifier's logits, whose int8 steps can round near-tied classes together).
    pub fn output_width(&self) -> Width {
        self.output_width
    }

    /// Quantise a float input tensor into the arena's input tensor.
    pub fn quantize_input(&self, input: &[f32], arena: &mut [i8]) -> Result<(), ProgramError> {
        let range = self
            .tensor(0)
            .ok_or(ProgramError::Tensor { step: 0, id: 0 })?;
        let arena_len = arena.len();
        let codes = arena.get_mut(range.clone()).ok_or(ProgramError::Arena {
            needed: range.end,
            got: arena_len,
        })?;
        self.quantize_codes(input, codes)
    }

    /// Quantise a float input tensor into `codes` (staging for a GPU's arena), as
    /// [`Program::quantize_input`] does.
    pub fn quantize_codes(&self, input: &[f32], codes: &mut [i8]) -> Result<(), ProgramError> {
        if codes.len() != self.input_len() {
            return Err(ProgramError::Length {
                expected: self.input_len(),
                got: codes.len(),
            });
        }
        if input.len() != codes.len() {
            return Err(ProgramError::Length {
                expected: codes.len(),
                got: input.len(),
            });
        }
        let h = self.header();
        let inverse = 1.0 / h.input_scale;
        // In vectors where the host has them (value by value, a 224x224 input was about a
        // sixth of a small model's time), the same codes; the rest value by value.
        #[cfg(feature = "std")]
        let done = kestrel_ops::quantize_input(input, codes, inverse, h.input_zero_point);
        #[cfg(not(feature = "std"))]
        let done = 0;
        for (code, &x) in codes.iter_mut().zip(input).skip(done) {
            *code = input_code(x * inverse, h.input_zero_point);
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
        self.dequantize_codes(codes, output)
    }

    /// The value of one output code, before any softmax.
    pub fn dequantize_code(&self, code: i8) -> f32 {
        self.dequantize_wide_code(code.into())
    }

    /// The value of one output code of either width, before any softmax.
    fn dequantize_wide_code(&self, code: i32) -> f32 {
        let h = self.header();
        h.output_scale * (code as f32 - h.output_zero_point as f32)
    }

    /// Dequantise the output tensor's bytes fetched from elsewhere (a GPU's arena,
    /// [`Program::output_bytes`] of them) into `output`, as [`Program::dequantize_output`] does.
    pub fn dequantize_codes(&self, codes: &[i8], output: &mut [f32]) -> Result<(), ProgramError> {
        if codes.len() != self.output_bytes() {
            return Err(ProgramError::Length {
                expected: self.output_bytes(),
                got: codes.len(),
            });
        }
        if output.len() != self.output_len() {
            return Err(ProgramError::Length {
                expected: self.output_len(),
                got: output.len(),
            });
        }
        for (i, value) in output.iter_mut().enumerate() {
            *value = self.dequantize_wide_code(self.output_width.load(codes, i));
        }
        let h = self.header();
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
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Default)]
pub struct ProgramBuilder {
    ops: alloc::vec::Vec<u8>,
    weights: alloc::vec::Vec<u8>,
    tensors: alloc::vec::Vec<u8>,
}

#[cfg(feature = "alloc")]
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

    /// Append `i32` values, little-endian.
    pub fn i32_blob(&mut self, values: &[i32]) -> Blob {
        let bytes: alloc::vec::Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.blob(&bytes)
    }

    /// Append `i16` values, little-endian.
    pub fn i16_blob(&mut self, values: &[i16]) -> Blob {
        let bytes: alloc::vec::Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.blob(&bytes)
    }

    /// Append `u32` values, little-endian.
    pub fn u32_blob(&mut self, values: &[u32]) -> Blob {
        let bytes: alloc::vec::Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.blob(&bytes)
    }

    /// Append biases and requantisation of each output channel.
    pub fn channels(
        &mut self,
        bias: &[i32],
        requant: &[kestrel_ops::quant::Requant],
    ) -> ChannelBlobs {
        let bias = self.i32_blob(bias);
        let multipliers: alloc::vec::Vec<i32> = requant.iter().map(|r| r.multiplier).collect();
        let multiplier = self.i32_blob(&multipliers);
        let shifts: alloc::vec::Vec<i8> = requant.iter().map(|r| r.shift).collect();
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
    pub fn finish(self, header: &PlanHeader<'_>) -> Result<alloc::vec::Vec<u8>, postcard::Error> {
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

/// A verified program that owns an aligned copy of its plan bytes: what a backend keeps.
#[cfg(feature = "alloc")]
pub struct OwnedProgram {
    // Borrows `bytes`' heap buffer, which never moves or changes while `self` lives; declared
    // first so it is dropped first. Never handed out as `'static`: `program()` ties it to `self`.
    program: Program<'static>,
    _bytes: AlignedBytes,
}

#[cfg(feature = "alloc")]
impl OwnedProgram {
    /// Copy, parse and verify a plan.
    pub fn new(bytes: &[u8]) -> Result<Self, ProgramError> {
        let bytes = AlignedBytes::new(bytes);
        // SAFETY: the slice points into `bytes`' heap allocation, which is owned by the returned
        // value, never mutated, never reallocated, and outlives `program` (field order).
        let stable: &'static [u8] = unsafe {
            core::slice::from_raw_parts(bytes.as_bytes().as_ptr(), bytes.as_bytes().len())
        };
        Ok(Self {
            program: Program::new(stable)?,
            _bytes: bytes,
        })
    }

    /// The verified program, borrowed from `self`: neither it nor anything taken from it (a
    /// clone, the header, a weight slice) can outlive the owner, whose buffer it reads.
    ///
    /// ```compile_fail
    /// use kestrel_plan::program::{OwnedProgram, Program};
    ///
    /// // Keeping the program past its owner's drop would read freed memory: it must not compile.
    /// fn outlive(plan: &[u8]) -> Program<'static> {
    ///     let owned = OwnedProgram::new(plan).unwrap();
    ///     owned.program().clone()
    /// }
    /// ```
    pub fn program(&self) -> &Program<'_> {
        &self.program
    }

    /// The plan bytes as they are in memory now.
    pub fn bytes(&self) -> &[u8] {
        self._bytes.as_bytes()
    }

    /// Whether every CRC of the plan in memory still holds: a scrub.
    pub fn scrub(&self) -> Result<(), PlanError> {
        Plan::parse(self.bytes()).map(|_| ())
    }

    /// A copy with bit `bit` (modulo the plan's bits) flipped, parsed without its CRCs, as an
    /// upset would leave it; and whether the CRCs cover that bit. An error when the damage
    /// breaks the plan's structure (the executor could not run it at all).
    pub fn with_bit_flipped(&self, bit: u64) -> (Result<Self, ProgramError>, bool) {
        let covered = self.bytes().len() as u64 * 8;
        let bit = if covered == 0 { 0 } else { bit % covered };
        let byte = (bit / 8) as usize;
        let is_covered = self
            .program
            .plan()
            .covered_bytes(self.bytes())
            .any(|r| r.contains(&byte));
        let mut bytes = self._bytes.clone();
        bytes.flip_bit(bit);
        // SAFETY: as in `new`: the slice points into `bytes`' heap allocation, which moves into
        // the returned value, is never mutated or reallocated, and outlives `program`.
        let stable: &'static [u8] = unsafe {
            core::slice::from_raw_parts(bytes.as_bytes().as_ptr(), bytes.as_bytes().len())
        };
        let program = Program::new_unchecked_crcs(stable).map(|program| Self {
            program,
            _bytes: bytes,
        });
        (program, is_covered)
    }
}

/// Plan bytes copied to a 16-byte boundary, as [`Program::new`] requires.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug)]
pub struct AlignedBytes {
    words: alloc::vec::Vec<u128>,
    len: usize,
}

#[cfg(feature = "alloc")]
impl AlignedBytes {
    /// Copy `bytes`.
    pub fn new(bytes: &[u8]) -> Self {
        let mut words = alloc::vec![0u128; bytes.len().div_ceil(16)];
        // `words` holds at least `bytes.len()` bytes.
        let room = bytemuck::cast_slice_mut::<u128, u8>(&mut words).iter_mut();
        for (slot, &byte) in room.zip(bytes) {
            *slot = byte;
        }
        Self {
            words,
            len: bytes.len(),
        }
    }

    /// Flip bit `bit` (counted from the first byte's lowest); nothing past the end.
    pub fn flip_bit(&mut self, bit: u64) {
        let byte = (bit / 8) as usize;
        if byte < self.len {
            let bytes = bytemuck::cast_slice_mut::<u128, u8>(&mut self.words);
            if let Some(b) = bytes.get_mut(byte) {
                *b ^= 1 << (bit % 8);
            }
        }
    }

    /// The bytes, starting on a 16-byte boundary.
    pub fn as_bytes(&self) -> &[u8] {
        let all = bytemuck::cast_slice::<u128, u8>(&self.words);
        all.get(..self.len).unwrap_or(all)
    }
}

/// `clamp(round(q) + zero_point)` to int8, rounding half away from zero as `roundf` does, and
/// NaN to the zero point (a corrupt pixel must not poison the whole tensor). The rounding is
/// written with casts rather than a call to `roundf` per value, so that it vectorises.
#[inline]
fn input_code(q: f32, zero_point: i32) -> i8 {
    // Below 2^23 in size `as` truncates exactly and the remainder is exact; from 2^23 on
    // every float is an integer already (and infinities and NaN pass through unchanged).
    let rounded = if q.abs() < 8_388_608.0 {
        let whole = (q as i32) as f32;
        let fraction = q - whole;
        whole + f32::from(u8::from(fraction >= 0.5)) - f32::from(u8::from(fraction <= -0.5))
    } else {
        q
    };
    let code = rounded + zero_point as f32;
    if code.is_nan() {
        zero_point as i8
    } else {
        code.clamp(-128.0, 127.0) as i8
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::write_plan;
    use kestrel_backend::MAX_BANDS;
    use kestrel_ops::int8::{ConvGeometry, GlobalAveragePool};
    use kestrel_ops::quant::Requant;
    use kestrel_ops::Reference;

    /// The input quantisation as it was written first, with `roundf`: the reference.
    fn input_code_by_roundf(q: f32, zero_point: i32) -> i8 {
        let q = libm::roundf(q) + zero_point as f32;
        if q.is_nan() {
            zero_point as i8
        } else {
            q.clamp(-128.0, 127.0) as i8
        }
    }

    #[test]
    fn input_codes_round_as_roundf() {
        let mut edges = vec![
            0.5,
            -0.5,
            1.5,
            -2.5,
            0.499_999_97,
            -0.499_999_97,
            127.5,
            -128.5,
            255.9,
            -256.5,
            1e9,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MIN_POSITIVE,
            -0.0,
        ];
        // Every half step from -300 to 300 and its neighbouring floats.
        for half in -600..=600 {
            let x = half as f32 / 2.0;
            edges.extend([x, x.next_up(), x.next_down()]);
        }
        let mut state = 0x1234_5678u32;
        for _ in 0..100_000 {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            edges.push((state >> 8) as f32 / (1u32 << 24) as f32 * 700.0 - 350.0);
        }
        for zero_point in [-128, -3, 0, 5, 127, 1000, i32::MIN, i32::MAX] {
            for &q in &edges {
                assert_eq!(
                    input_code(q, zero_point),
                    input_code_by_roundf(q, zero_point),
                    "{q} with zero point {zero_point}"
                );
            }
            // The host's vector quantiser writes the same codes.
            #[cfg(feature = "std")]
            for inverse in [1.0f32, 0.37, 13.3] {
                let mut codes = vec![0i8; edges.len()];
                let done = kestrel_ops::quantize_input(&edges, &mut codes, inverse, zero_point);
                if done == 0 {
                    println!("this CPU has no vector quantiser: value by value only");
                } else {
                    assert!(done + 8 > edges.len(), "{done} of {}", edges.len());
                }
                for (i, (&code, &x)) in codes.iter().zip(&edges).enumerate().take(done) {
                    let expected = input_code(x * inverse, zero_point);
                    assert_eq!(
                        code, expected,
                        "{x} * {inverse} with zero point {zero_point} ({i})"
                    );
                }
            }
        }
    }

    fn header(arena_size: u32, output_tensor: u16) -> PlanHeader<'static> {
        PlanHeader {
            name: "tiny",
            onnx_sha256: "00",
            input_shape: [1, 2, 4, 4],
            output_len: 3,
            bands: 2,
            mean: [0.0; MAX_BANDS],
            std: [1.0; MAX_BANDS],
            resize: 1,
            labels: "a\nb\nc",
            arena_size,
            output_tensor,
            input_scale: 0.05,
            input_zero_point: -3,
            output_scale: 0.1,
            output_zero_point: 2,
            output_softmax: false,
            detector: None,
        }
    }

    const FULL: OutputQuant = OutputQuant {
        zero_point: 1,
        min: -128,
        max: 127,
    };

    /// Conv (t0 -> t1), residual Add (t0 + t1 -> t2), GlobalAveragePool (t2 -> t3), Gemm
    /// (t3 -> t4), placed by hand in a 128-byte arena.
    fn tiny_plan() -> Vec<u8> {
        let mut b = ProgramBuilder::default();
        for (offset, len) in [(0, 32), (32, 32), (64, 32), (96, 2), (112, 3)] {
            b.tensor(offset, len);
        }
        let half = Requant::from_real(0.5).unwrap();
        let conv_weights: Vec<i8> = (0..2 * 2 * 9).map(|i| (i * 7 % 23) as i8 - 11).collect();
        let step = |op, inputs, output| Step { op, inputs, output };
        let conv = Op::Conv {
            geometry: ConvGeometry {
                input: [2, 4, 4],
                output: [2, 4, 4],
                kernel: [3, 3],
                stride: [1, 1],
                pad: [1, 1],
                dilation: [1, 1],
                group: 1,
            },
            weights: b.i8_blob(&conv_weights),
            channels: b.channels(&[10, -10], &[Requant::from_real(0.01).unwrap(); 2]),
            input_zero_point: -3,
            output_quant: FULL,
        };
        b.push(step(conv, [0, 0], 1)).unwrap();
        let add = Op::Add(Add {
            input_zero_points: [-3, 1],
            requant: [half, half],
            output_quant: FULL,
        });
        b.push(step(add, [0, 1], 2)).unwrap();
        let pool = Op::GlobalAveragePool(GlobalAveragePool {
            channels: 2,
            input_zero_point: 1,
            requant: Requant::from_real(1.0 / 16.0).unwrap(),
            output_quant: FULL,
        });
        b.push(step(pool, [2, 2], 3)).unwrap();
        let gemm = Op::Gemm {
            weights: b.i8_blob(&[5, -3, 2, 7, -1, 4]),
            channels: b.channels(&[0, 5, -5], &[Requant::from_real(0.3).unwrap(); 3]),
            input_zero_point: 1,
            output_quant: FULL,
        };
        b.push(step(gemm, [3, 3], 4)).unwrap();
        b.finish(&header(128, 4)).unwrap()
    }

    fn input() -> Vec<f32> {
        (0..32).map(|i| (i as f32 - 12.0) * 0.13).collect()
    }

    #[test]
    fn runs_the_steps_in_order_through_the_arena() {
        let bytes = AlignedBytes::new(&tiny_plan());
        let program = Program::new(bytes.as_bytes()).unwrap();
        assert_eq!((program.input_len(), program.output_len()), (32, 3));
        let mut arena = vec![0i8; program.arena_size()];
        program.quantize_input(&input(), &mut arena).unwrap();
        program.run(&mut arena, &mut Reference).unwrap();
        let mut out = [0.0f32; 3];
        program.dequantize_output(&arena, &mut out).unwrap();

        // The same layers by hand, each kernel on its own buffers.
        let x: Vec<i8> = arena[..32].to_vec();
        let mut steps = program.steps().map(Result::unwrap);
        let conv = program.conv(&steps.next().unwrap().op).unwrap();
        let mut y = vec![0i8; 32];
        conv.run(&x, &mut y).unwrap();
        let Op::Add(add) = steps.next().unwrap().op else {
            panic!("step 1 is the Add")
        };
        let mut sum = vec![0i8; 32];
        add.run(&x, &y, &mut sum).unwrap();
        assert_eq!(
            &arena[64..96],
            &sum[..],
            "the Add's output sits at its arena offset"
        );
        assert!(out.iter().any(|v| *v != 0.0), "{out:?}");
    }

    #[test]
    fn bad_calls_are_typed_errors() {
        let bytes = AlignedBytes::new(&tiny_plan());
        let program = Program::new(bytes.as_bytes()).unwrap();
        let mut small = vec![0i8; 100];
        assert_eq!(
            program.run(&mut small, &mut Reference),
            Err(ProgramError::Arena {
                needed: 128,
                got: 100
            })
        );
        let mut arena = vec![0i8; 128];
        assert_eq!(
            program.quantize_input(&[0.0; 31], &mut arena),
            Err(ProgramError::Length {
                expected: 32,
                got: 31
            })
        );
        assert_eq!(
            program.dequantize_output(&arena, &mut [0.0; 4]),
            Err(ProgramError::Length {
                expected: 3,
                got: 4
            })
        );
        // A NaN pixel becomes the zero point instead of poisoning the tensor.
        let mut nan = input();
        nan[5] = f32::NAN;
        program.quantize_input(&nan, &mut arena).unwrap();
        assert_eq!(arena[5], -3);

        let plan = tiny_plan();
        let mut shifted = vec![0u8; plan.len() + 1];
        shifted[1..].copy_from_slice(&plan);
        let unaligned = AlignedBytes::new(&shifted);
        assert_eq!(
            Program::new(&unaligned.as_bytes()[1..]).unwrap_err(),
            ProgramError::Misaligned
        );
    }

    #[test]
    fn references_outside_the_arena_or_weights_are_rejected() {
        let rebuild = |edit: &dyn Fn(&mut ProgramBuilder)| {
            let mut b = ProgramBuilder::default();
            b.tensor(0, 32);
            b.tensor(32, 32);
            edit(&mut b);
            AlignedBytes::new(&b.finish(&header(64, 1)).unwrap())
        };
        let table = |b: &mut ProgramBuilder| b.blob(&[0; 256]);
        // Output overlapping the input.
        let bytes = rebuild(&|b| {
            let table = table(b);
            b.push(Step {
                op: Op::Lut { table },
                inputs: [0, 0],
                output: 0,
            })
            .unwrap();
        });
        assert_eq!(
            Program::new(bytes.as_bytes()).unwrap_err(),
            ProgramError::Aliasing { step: 0 }
        );
        // A tensor id the table lacks.
        let bytes = rebuild(&|b| {
            let table = table(b);
            b.push(Step {
                op: Op::Lut { table },
                inputs: [7, 0],
                output: 1,
            })
            .unwrap();
        });
        assert_eq!(
            Program::new(bytes.as_bytes()).unwrap_err(),
            ProgramError::Tensor { step: 0, id: 7 }
        );
        // A table that is not 256 entries, and one past the weights.
        for table in [
            Blob {
                offset: 0,
                len: 255,
            },
            Blob {
                offset: 4096,
                len: 256,
            },
        ] {
            let bytes = rebuild(&|b| {
                b.blob(&[0; 256]);
                b.push(Step {
                    op: Op::Lut { table },
                    inputs: [0, 0],
                    output: 1,
                })
                .unwrap();
            });
            assert_eq!(
                Program::new(bytes.as_bytes()).unwrap_err(),
                ProgramError::Blob { step: 0 }
            );
        }
        // 16-bit input tables of 255 entries (a byte short, and a value short), and one past
        // the weights; an empty one is a Mul input without a table.
        let mul = Mul {
            input_zero_points: [0, 0],
            requant: kestrel_ops::quant::Requant {
                multiplier: 1 << 30,
                shift: 0,
            },
            output_quant: OutputQuant {
                zero_point: 0,
                min: -128,
                max: 127,
            },
        };
        for (table, valid) in [(511, false), (510, false), (512, true), (0, true)] {
            for offset in [0, 4096] {
                let bytes = rebuild(&|b| {
                    b.blob(&[0; 512]);
                    let blob = Blob { offset, len: table };
                    let op = Op::MulWide {
                        mul,
                        tables: [blob, Blob { offset: 0, len: 0 }],
                    };
                    b.push(Step {
                        op,
                        inputs: [0, 0],
                        output: 1,
                    })
                    .unwrap();
                });
                let loaded = Program::new(bytes.as_bytes()).map(|_| ());
                let expected = if valid && (offset == 0 || table == 0) {
                    Ok(())
                } else {
                    Err(ProgramError::Blob { step: 0 })
                };
                assert_eq!(loaded, expected, "{table} bytes at {offset}");
            }
        }
    }

    /// A short fuzz run kept in the suite: valid containers (CRCs recomputed) around mutated op,
    /// arena and weight sections, and raw noise. Loading never panics, and whatever loads runs
    /// without panicking.
    #[test]
    fn mutated_programs_never_panic() {
        let bytes = AlignedBytes::new(&tiny_plan());
        let original = Program::new(bytes.as_bytes()).unwrap();
        let sections = [SectionKind::Ops, SectionKind::Arena, SectionKind::Weights]
            .map(|k| original.plan.section(k).unwrap().to_vec());
        let header = original.header().clone();
        let mut state = 0x0ddc_0ffe_e15b_ad5eu64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut loaded, mut ran) = (0, 0);
        for _ in 0..5_000 {
            let mut mutated = sections.clone();
            let section = &mut mutated[(next() % 3) as usize];
            for _ in 0..1 + next() % 3 {
                if !section.is_empty() {
                    let at = (next() as usize) % section.len();
                    section[at] = next() as u8;
                }
            }
            if next() % 8 == 0 {
                let keep = (next() as usize) % (section.len() + 1);
                section.truncate(keep);
            }
            let mut header = header.clone();
            header.arena_size = [128, 64, 0, u32::MAX][(next() % 4) as usize];
            let plan = write_plan(
                &header,
                &[
                    (SectionKind::Ops, &mutated[0]),
                    (SectionKind::Arena, &mutated[1]),
                    (SectionKind::Weights, &mutated[2]),
                ],
            )
            .unwrap();
            let aligned = AlignedBytes::new(&plan);
            let Ok(program) = Program::new(aligned.as_bytes()) else {
                continue;
            };
            loaded += 1;
            if program.arena_size() > 1 << 20 {
                continue;
            }
            let mut arena = vec![0i8; program.arena_size()];
            let _ = program.quantize_input(&input(), &mut arena);
            if program.run(&mut arena, &mut Reference).is_ok() {
                ran += 1;
            }
        }
        assert!(loaded > 100 && ran > 50, "loaded {loaded}, ran {ran}");
    }
}
