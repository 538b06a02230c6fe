//! aarch64 NEON convolution (the Jetson's CPU), bit-identical to the generic [`Conv`]: the
//! strips of [`crate::strips`] and a micro-kernel of 4 output channels by 16 pixels made of
//! widening 16-bit multiply-accumulates (`smlal`). 16-bit products are exact and the int32 sums
//! wrap like the generic kernel's; requantisation is [`requantize_i8`]'s, four lanes at a time
//! ([`VectorRequant`]).
//!
//! On CPUs with the dot-product extension (FEAT_DotProd: the Jetson Orin's Cortex-A78AE),
//! `sdot` multiplies four input bytes by four weights per 32-bit lane: the strips become byte
//! quads of the raw codes, and [`ByteQuads`] folds the zero point's correction into the biases.
//! On CPUs with the 8-bit matrix multiply (FEAT_I8MM, Armv8.6: not the Orin, but Neoverse V1
//! and later), `smmla` multiplies 2 channels by 2 pixels over 8 bytes each, twice `sdot`'s
//! products per instruction, from byte octets. Neither intrinsic is stable in this toolchain
//! (Rust 1.95), so each instruction is written as inline assembly.

use std::arch::aarch64::*;
use std::vec::Vec;

mod depthwise;
mod few;
mod lanes;

use few::FewPixels;
use lanes::ChannelLanes;

use crate::int8::{ChannelQuant, Conv, OutputQuant, ShapeError};
use crate::quant::Requant;
use crate::strips::{
    flip_bit, max_pool_by_rows, prepare_convs, ByteQuads, DepthwiseGroup, Layer, Packed, Scratch,
    MR, NR,
};
use crate::table::{Entry, KernelTable};
use crate::Kernels;

/// The instruction a NEON convolution's dot products take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dot {
    /// Widening 16-bit multiply-accumulates (`smlal`): every NEON CPU.
    Smlal,
    /// `sdot`, 4 byte products per lane (FEAT_DotProd).
    Sdot,
    /// `smmla`, a 2x8 by 8x2 byte matrix product per instruction (FEAT_I8MM).
    Smmla,
}

impl Dot {
    /// The fastest this CPU has.
    pub fn detect() -> Self {
        [Self::Smmla, Self::Sdot]
            .into_iter()
            .find(|dot| dot.available())
            .unwrap_or(Self::Smlal)
    }

    /// Whether this CPU has the instruction.
    pub fn available(self) -> bool {
        match self {
            Self::Smlal => std::arch::is_aarch64_feature_detected!("neon"),
            Self::Sdot => std::arch::is_aarch64_feature_detected!("dotprod"),
            Self::Smmla => std::arch::is_aarch64_feature_detected!("i8mm"),
        }
    }

    /// Quads per channel side by side in the packed weights ([`ByteQuads::new`]).
    fn quads_per_step(self) -> usize {
        match self {
            Self::Smmla => 2,
            _ => 1,
        }
    }
}

/// One convolution ready for the NEON kernels.
struct Prepared {
    packed: Packed,
    /// Byte quads for `sdot` or octets for `smmla`, on a CPU with either.
    quads: Option<ByteQuads>,
    /// Channels in the lanes, for layers of at most 12 output pixels.
    few: Option<FewPixels>,
    /// Channels in the lanes, for depthwise layers on small planes.
    lanes: Option<ChannelLanes>,
}

impl Prepared {
    fn new(conv: &Conv<'_>, dot: Dot) -> Option<Self> {
        let mut packed = Packed::new(conv)?;
        let few = FewPixels::new(conv);
        if few.is_some() {
            // Its bytes are all that layer reads: the 16-bit packing would only take memory.
            packed.weights = Vec::new();
        }
        let quads = (dot != Dot::Smlal && few.is_none())
            .then(|| ByteQuads::new(conv, &packed, 0, dot.quads_per_step()))
            .flatten();
        // A one-channel depthwise layer of a few pixels is also a few-pixel layer: that runs it.
        let lanes = few.is_none().then(|| ChannelLanes::new(conv)).flatten();
        Some(Self {
            packed,
            quads,
            few,
            lanes,
        })
    }

    /// Scratch needs: padded input, strip, the channel-lanes layout (in the transformed
    /// input's buffer, which NEON has no other use for) and the byte-quad strip (in the
    /// products' buffer).
    fn needs(&self) -> [usize; 4] {
        let [padded, strip] = self.packed.scratch_len();
        let laid_out =
            (self.lanes.as_ref()).map_or(0, |_| ChannelLanes::input_len(&self.packed.geometry));
        let quads = self.quads.as_ref().map_or(0, ByteQuads::strip_len);
        [padded + depthwise::SLACK, strip, laid_out, quads]
    }
}

/// NEON convolutions for one program: packed weights per step and scratch buffers, allocated
/// at setup.
pub struct Neon {
    layers: Vec<Option<Prepared>>,
    scratch: Scratch,
    dot: Dot,
}

impl Neon {
    /// Pack the convolutions of a program (`convs[step]`) for the fastest dot product this CPU
    /// has; `None` when it lacks NEON.
    pub fn new(convs: &[Option<Conv<'_>>]) -> Option<Self> {
        Self::with_dot(convs, Dot::detect())
    }

    /// [`Neon::new`] with the dot product chosen (for tests and benchmarks of each path); one
    /// this CPU lacks falls back to `smlal`.
    pub fn with_dot(convs: &[Option<Conv<'_>>], dot: Dot) -> Option<Self> {
        if !Dot::Smlal.available() {
            return None;
        }
        let dot = if dot.available() { dot } else { Dot::Smlal };
        let layers = prepare_convs(convs, |conv| Prepared::new(conv, dot));
        let scratch = Scratch::for_needs(layers.iter().flatten().map(Prepared::needs));
        Some(Self {
            layers,
            scratch,
            dot,
        })
    }

    /// Pack one convolution (for tests of a single layer).
    pub fn for_conv(conv: &Conv<'_>, dot: Dot) -> Option<Self> {
        Self::with_dot(&[Some(*conv)], dot)
    }

    /// The kernel table's name for these convolutions.
    pub fn name(&self) -> &'static str {
        match self.dot {
            Dot::Smlal => "neon",
            Dot::Sdot => "neon-dotprod",
            Dot::Smmla => "neon-i8mm",
        }
    }
}

/// The NEON plug-in for the kernel table: on a CPU with NEON, its convolutions (packed for
/// `program`).
pub(crate) fn plug(table: &mut KernelTable, convs: &[Option<Conv<'_>>]) {
    let Some(neon) = Neon::new(convs) else {
        return;
    };
    // NEON is always there on aarch64: the portable loops vectorise with it.
    table.max_pool = Entry {
        name: "neon",
        kernel: max_pool_by_rows,
    };
    table.conv = Entry::conv_of(neon.name(), neon);
}

impl Kernels for Neon {
    fn prepared_weights(&self, visit: &mut dyn FnMut(&[i32])) {
        for prepared in self.layers.iter().flatten() {
            visit(&prepared.packed.weights);
            for block in prepared.quads.iter().flat_map(ByteQuads::blocks) {
                visit(block);
            }
            if let Some(few) = &prepared.few {
                visit(few.words());
            }
            if let Some(lanes) = &prepared.lanes {
                visit(lanes.words());
            }
        }
    }

    fn flip_prepared_bit(&mut self, bit: u64) -> bool {
        let blocks = self
            .layers
            .iter_mut()
            .flatten()
            .flat_map(|p| {
                let quads = p.quads.iter_mut().flat_map(ByteQuads::blocks_mut);
                let few = p.few.as_mut().map(FewPixels::words_mut);
                let lanes = p.lanes.as_mut().map(ChannelLanes::words_mut);
                std::iter::once(p.packed.weights.as_mut_slice())
                    .chain(quads)
                    .chain(few)
                    .chain(lanes)
            })
            .collect();
        flip_bit(blocks, bit)
    }

    fn conv(
        &mut self,
        step: usize,
        conv: &Conv<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        let Self {
            layers,
            scratch,
            dot,
        } = self;
        let Some(Some(prepared)) = layers.get(step) else {
            return conv.run(input, output);
        };
        let packed = &prepared.packed;
        if !packed.accepts(conv, input, output) || !scratch.fits(prepared.needs()) {
            // The generic kernel reports what is wrong, or runs what this one cannot.
            return conv.run(input, output);
        }
        let layer = packed.layer(conv);
        if let Some(few) = &prepared.few {
            // SAFETY: NEON was detected in `new`; the buffers' sizes were checked above.
            unsafe { few.run(&layer, input, &conv.channels, scratch, output) };
            return Ok(());
        }
        if let Some(lanes) = &prepared.lanes {
            // SAFETY: NEON was detected in `new`; the buffers' sizes were checked above.
            unsafe {
                lanes.run(
                    &layer,
                    input,
                    &conv.channels,
                    &mut scratch.transformed,
                    output,
                )
            };
            return Ok(());
        }
        if conv.geometry.group > 1 && depthwise::takes(&layer, scratch.padded.len()) {
            // Once per layer, not per channel.
            let offsets = layer.tap_offsets();
            let mut border_zeroed = false;
            packed.for_each_group(conv, input, output, |input, weights, channels, output| {
                let group = DepthwiseGroup {
                    input,
                    weights,
                    channels,
                    border_zeroed,
                };
                // SAFETY: NEON was detected in `new`; `takes` accepted the layer and scratch.
                unsafe { depthwise::run(&layer, &offsets, group, scratch, output) };
                border_zeroed = true;
            });
            return Ok(());
        }
        if let Some(quads) = prepared.quads.as_ref().filter(|q| q.accepts(conv)) {
            let octets = *dot == Dot::Smmla;
            quads.for_each_group(
                conv,
                &layer,
                input,
                output,
                |input, weights, channels, out| {
                    // SAFETY: `with_dot` detected the instruction these quads were packed for;
                    // the scratch fits this layer's needs (checked above).
                    unsafe {
                        if octets {
                            run_octets(&layer, quads, input, weights, channels, scratch, out)
                        } else {
                            run_quads(&layer, quads, input, weights, channels, scratch, out)
                        }
                    }
                },
            );
            return Ok(());
        }
        packed.for_each_group(conv, input, output, |input, weights, channels, output| {
            // SAFETY: NEON was detected in `new`; the buffers' sizes were checked above.
            unsafe { run_layer(&layer, input, weights, channels, scratch, output) }
        });
        Ok(())
    }
}

/// Requantise the sums of a tile's channels from `first` (up to the group's `channels`) into
/// codes.
#[target_feature(enable = "neon")]
fn requantize_sums(
    sums: &[[i32; NR]; MR],
    channels: &ChannelQuant<'_>,
    first: usize,
    layer: &Layer<'_>,
) -> [[i8; NR]; MR] {
    let mut codes = [[0i8; NR]; MR];
    for ((o, sums), row) in (first..channels.bias.len()).zip(sums).zip(&mut codes) {
        let (bias, requant) = channels.get(o);
        *row = VectorRequant::new(bias, requant, layer.q).codes16(sums);
    }
    codes
}

/// One output channel's bias and requantisation, four lanes at a time and exactly as
/// [`crate::quant::requantize_i8`]: the bias added (wrapping), the product with the
/// multiplier in 64 bits (`smull`), a rounding shift right (`srshl` by minus the shift adds
/// half and shifts, as [`Requant::apply`], without overflow), a saturating narrow to 32 bits
/// (its clamp), a saturating add of the zero point, then the clamp, `max` before `min`.
pub(crate) struct VectorRequant {
    bias: int32x4_t,
    multiplier: i32,
    right: int64x2_t,
    zero_point: int32x4_t,
    min: int32x4_t,
    max: int32x4_t,
}

impl VectorRequant {
    #[target_feature(enable = "neon")]
    pub(crate) fn new(bias: i32, requant: Requant, q: OutputQuant) -> Self {
        let shift = requant.shift.clamp(Requant::MIN_SHIFT, Requant::MAX_SHIFT);
        Self {
            bias: vdupq_n_s32(bias),
            multiplier: requant.multiplier,
            right: vdupq_n_s64(i64::from(shift) - 31),
            zero_point: vdupq_n_s32(q.zero_point),
            min: vdupq_n_s32(i32::from(q.min)),
            max: vdupq_n_s32(i32::from(q.max)),
        }
    }

    /// The codes of four sums, in 32-bit lanes.
    #[target_feature(enable = "neon")]
    pub(crate) fn codes4(&self, sums: int32x4_t) -> int32x4_t {
        let acc = vaddq_s32(sums, self.bias);
        let low = vrshlq_s64(vmull_n_s32(vget_low_s32(acc), self.multiplier), self.right);
        let high = vrshlq_s64(vmull_high_n_s32(acc, self.multiplier), self.right);
        let scaled = vqmovn_high_s64(vqmovn_s64(low), high);
        let shifted = vqaddq_s32(scaled, self.zero_point);
        vminq_s32(vmaxq_s32(shifted, self.min), self.max)
    }

    /// The codes of eight sums (two vectors of four).
    #[target_feature(enable = "neon")]
    pub(crate) fn codes8(&self, low: int32x4_t, high: int32x4_t) -> int8x8_t {
        // Codes are inside [-128, 127] already: the saturating narrows change nothing.
        let words = vqmovn_high_s32(vqmovn_s32(self.codes4(low)), self.codes4(high));
        vqmovn_s16(words)
    }

    /// The codes of 16 sums.
    #[target_feature(enable = "neon")]
    fn codes16(&self, sums: &[i32; NR]) -> [i8; NR] {
        let mut codes = [0i8; NR];
        // SAFETY: `sums` holds 16 i32, four loads of four; `codes` 16 bytes, one store.
        unsafe {
            let load = |at: usize| vld1q_s32(sums.as_ptr().add(at));
            let first = self.codes8(load(0), load(4));
            let second = self.codes8(load(8), load(12));
            vst1q_s8(codes.as_mut_ptr(), vcombine_s8(first, second));
        }
        codes
    }
}

/// The shared tile loop of the byte kernels: each tile's strip turned into bytes by
/// `to_bytes` once, before its first block, and each block's sums made by `kernel`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn run_bytes(
    layer: &Layer<'_>,
    packed: &ByteQuads,
    input: &[i8],
    weights: &[i32],
    channels: &ChannelQuant<'_>,
    scratch: &mut Scratch,
    out: &mut [i8],
    to_bytes: impl Fn(&[i16], i16, &mut [i32]),
    kernel: impl Fn(&[i32], &[i32], usize) -> [[i32; NR]; MR],
) {
    let count = channels.bias.len();
    let quad_count = packed.quads;
    let zero_point = packed.zero_point as i16;
    let Scratch {
        padded,
        strip,
        products,
        ..
    } = scratch;
    let Some(bytes) = products.get_mut(..packed.strip_len()) else {
        return;
    };
    layer.run_tiles(
        input,
        weights,
        quad_count * MR,
        count,
        padded,
        strip,
        out,
        |_| {},
        |tile, strip, first| {
            if first == 0 {
                to_bytes(strip, zero_point, bytes);
            }
            let sums = kernel(tile, bytes, quad_count);
            // SAFETY: NEON was detected before any byte kernel could be reached.
            unsafe { requantize_sums(&sums, channels, first, layer) }
        },
    );
}

/// The tile loop with the `sdot` micro-kernel.
#[target_feature(enable = "neon,dotprod")]
fn run_quads(
    layer: &Layer<'_>,
    packed: &ByteQuads,
    input: &[i8],
    weights: &[i32],
    channels: &ChannelQuant<'_>,
    scratch: &mut Scratch,
    out: &mut [i8],
) {
    let (to_bytes, kernel) = (
        |s: &_, z, b: &mut _| to_quads(s, z, b),
        |t: &_, s: &_, q| dot_kernel(t, s, q),
    );
    run_bytes(
        layer, packed, input, weights, channels, scratch, out, to_bytes, kernel,
    );
}

/// The tile loop with the `smmla` micro-kernel.
#[target_feature(enable = "neon,i8mm")]
fn run_octets(
    layer: &Layer<'_>,
    packed: &ByteQuads,
    input: &[i8],
    weights: &[i32],
    channels: &ChannelQuant<'_>,
    scratch: &mut Scratch,
    out: &mut [i8],
) {
    let (to_bytes, kernel) = (
        |s: &_, z, b: &mut _| to_octets(s, z, b),
        |t: &_, s: &_, q| mmla_kernel(t, s, q),
    );
    run_bytes(
        layer, packed, input, weights, channels, scratch, out, to_bytes, kernel,
    );
}

/// Row `r` of a strip of 16-bit rows (input minus zero point) as the 16 input codes; rows past
/// the strip's `rows` count as the zero point (their weights are 0).
#[inline]
#[target_feature(enable = "neon")]
fn strip_row(strip: &[i16], rows: usize, r: usize, zero_point: i16) -> int8x16_t {
    match strip.get(r * NR..(r + 1) * NR) {
        // SAFETY: the row holds NR = 16 values, two vectors; x - zp + zp = x fits a byte.
        Some(values) if r < rows => unsafe {
            let zp = vdupq_n_s16(zero_point);
            let p = values.as_ptr();
            let low = vmovn_s16(vaddq_s16(vld1q_s16(p), zp));
            let high = vmovn_s16(vaddq_s16(vld1q_s16(p.add(8)), zp));
            vcombine_s8(low, high)
        },
        _ => vdupq_n_s8(zero_point as i8),
    }
}

/// Turn a strip of 16-bit rows (input minus zero point) back into the input codes, as byte
/// quads: `quads[q]` is 16 words, one per pixel, each rows `4q` to `4q + 3` from its low byte
/// up.
#[target_feature(enable = "neon")]
fn to_quads(strip: &[i16], zero_point: i16, quads: &mut [i32]) {
    let rows = strip.len() / NR;
    for (q, dst) in quads.chunks_exact_mut(NR).enumerate() {
        let row = |i| strip_row(strip, rows, 4 * q + i, zero_point);
        let rows = int8x16x4_t(row(0), row(1), row(2), row(3));
        // SAFETY: `dst` holds 16 words, 64 bytes: what one interleaving store of four
        // 16-byte rows writes (pixel p's four bytes at 4p).
        unsafe { vst4q_s8(dst.as_mut_ptr().cast(), rows) };
    }
}

/// [`to_quads`] in octets for `smmla`: each 32 words hold rows `8o` to `8o + 7` of the 16
/// pixels, pixel p's eight bytes at `8p`, so that a 16-byte load is two pixels' octets.
#[target_feature(enable = "neon")]
fn to_octets(strip: &[i16], zero_point: i16, octets: &mut [i32]) {
    let rows = strip.len() / NR;
    for (o, dst) in octets.chunks_exact_mut(2 * NR).enumerate() {
        let r: [int8x16_t; 8] =
            std::array::from_fn(|i| strip_row(strip, rows, 8 * o + i, zero_point));
        // Byte pairs of rows (0, 1), (2, 3), ... per pixel as 16-bit lanes; an interleaving
        // store of the four then writes each pixel's eight bytes in row order.
        let pairs = |zip: fn(int8x16_t, int8x16_t) -> int8x16_t| {
            let pair = |i: usize| vreinterpretq_s16_s8(zip(r[i], r[i + 1]));
            int16x8x4_t(pair(0), pair(2), pair(4), pair(6))
        };
        // SAFETY: `dst` holds 32 words, 128 bytes: two interleaving stores of four 8-lane
        // 16-bit vectors, 64 bytes each (pixels 0-7, then 8-15).
        unsafe {
            vst4q_s16(dst.as_mut_ptr().cast(), pairs(|a, b| vzip1q_s8(a, b)));
            vst4q_s16(
                dst.as_mut_ptr().add(NR).cast(),
                pairs(|a, b| vzip2q_s8(a, b)),
            );
        }
    }
}

/// `acc + a · b` in four 32-bit lanes, each the sum of four byte products.
#[inline]
#[target_feature(enable = "neon,dotprod")]
fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: one register-only instruction of an extension this function requires.
    unsafe {
        std::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// Sums of [`MR`] channels by 16 pixels over `quads` byte quads.
#[target_feature(enable = "neon,dotprod")]
fn dot_kernel(tile: &[i32], strip: &[i32], quads: usize) -> [[i32; NR]; MR] {
    let mut acc = [[vdupq_n_s32(0); 4]; MR];
    for (q, pixels) in strip.chunks_exact(NR).take(quads).enumerate() {
        // SAFETY: `pixels` holds 16 words: four loads of 16 bytes.
        let x = unsafe {
            let p = pixels.as_ptr().cast::<i8>();
            [
                vld1q_s8(p),
                vld1q_s8(p.add(16)),
                vld1q_s8(p.add(32)),
                vld1q_s8(p.add(48)),
            ]
        };
        for (r, sums) in acc.iter_mut().enumerate() {
            let w = tile.get(q * MR + r).copied().unwrap_or(0);
            let w = vreinterpretq_s8_s32(vdupq_n_s32(w));
            for (sum, &x) in sums.iter_mut().zip(&x) {
                *sum = sdot(*sum, x, w);
            }
        }
    }
    let mut sums = [[0i32; NR]; MR];
    for (dst, lanes) in sums.iter_mut().zip(acc) {
        for (quarter, v) in dst.chunks_exact_mut(4).zip(lanes) {
            // SAFETY: each quarter holds 4 i32, one vector.
            unsafe { vst1q_s32(quarter.as_mut_ptr(), v) };
        }
    }
    sums
}

/// `acc + a · bᵀ` where `a` and `b` are 2x8 byte matrices (rows of 8 bytes) and `acc` the
/// 2x2 i32 result, row-major: lane `2i + j` sums row i of `a` times row j of `b`.
#[inline]
#[target_feature(enable = "neon,i8mm")]
fn smmla(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: one register-only instruction of an extension this function requires.
    unsafe {
        std::arch::asm!(
            "smmla {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// Sums of [`MR`] channels by 16 pixels over `quads` byte quads (in octets, [`to_octets`]):
/// each `smmla` takes a pair of channels by a pair of pixels.
#[target_feature(enable = "neon,i8mm")]
fn mmla_kernel(tile: &[i32], strip: &[i32], quads: usize) -> [[i32; NR]; MR] {
    let mut acc = [[vdupq_n_s32(0); NR / 2]; MR / 2];
    for (o, pixels) in strip.chunks_exact(2 * NR).take(quads / 2).enumerate() {
        // SAFETY: `pixels` holds 32 words: eight loads of 16 bytes (pixel pairs).
        let x: [int8x16_t; NR / 2] =
            std::array::from_fn(|j| unsafe { vld1q_s8(pixels.as_ptr().cast::<i8>().add(16 * j)) });
        for (pair, sums) in acc.iter_mut().enumerate() {
            // Channels 2·pair and 2·pair + 1: two words each.
            let first = (o * MR + 2 * pair) * 2;
            let w = match tile.get(first..first + 4) {
                // SAFETY: four words, one 16-byte load.
                Some(words) => unsafe { vld1q_s8(words.as_ptr().cast()) },
                None => vdupq_n_s8(0),
            };
            for (sum, &x) in sums.iter_mut().zip(&x) {
                *sum = smmla(*sum, w, x);
            }
        }
    }
    // acc[pair][j] holds channels (2·pair, 2·pair + 1) by pixels (2j, 2j + 1); as 64-bit
    // lanes, two neighbours zip into one channel's four pixels.
    let mut sums = [[0i32; NR]; MR];
    for (pair, lanes) in acc.iter().enumerate() {
        for (j, two) in lanes.chunks_exact(2).enumerate() {
            let (a, b) = (vreinterpretq_s64_s32(two[0]), vreinterpretq_s64_s32(two[1]));
            let rows = [vzip1q_s64(a, b), vzip2q_s64(a, b)];
            for (row, v) in sums[2 * pair..].iter_mut().zip(rows) {
                // SAFETY: four i32 of the row from pixel 4j, one vector.
                unsafe { vst1q_s32(row[4 * j..].as_mut_ptr(), vreinterpretq_s32_s64(v)) };
            }
        }
    }
    sums
}

/// The shared tile loop with the NEON micro-kernel and the generic requantisation.
#[target_feature(enable = "neon")]
fn run_layer(
    layer: &Layer<'_>,
    input: &[i8],
    weights: &[i32],
    channels: &ChannelQuant<'_>,
    scratch: &mut Scratch,
    out: &mut [i8],
) {
    let count = channels.bias.len();
    let span = layer.row_pairs * MR;
    let Scratch { padded, strip, .. } = scratch;
    layer.run_tiles(
        input,
        weights,
        span,
        count,
        padded,
        strip,
        out,
        |_| {},
        |tile, strip, first| {
            let sums = micro_kernel(tile, strip, layer.row_pairs);
            requantize_sums(&sums, channels, first, layer)
        },
    );
}

/// Sums of 4 output channels by 16 pixels over the strip's rows. The packed weights hold the
/// rows of a pair as two i16 in one i32, the first in the low half: read as i16 they are in
/// row order.
#[target_feature(enable = "neon")]
fn micro_kernel(tile: &[i32], strip: &[i16], row_pairs: usize) -> [[i32; NR]; MR] {
    let weights: &[i16] = bytemuck::cast_slice(tile);
    let mut acc = [[vdupq_n_s32(0); 4]; MR];
    for (k, row) in strip.chunks_exact(NR).take(2 * row_pairs).enumerate() {
        // SAFETY: `row` holds NR = 16 values: two loads of 8.
        let (x0, x1) = unsafe { (vld1q_s16(row.as_ptr()), vld1q_s16(row.as_ptr().add(8))) };
        let (pair, half) = (k / 2, k % 2);
        for (r, sums) in acc.iter_mut().enumerate() {
            let w = weights
                .get((pair * MR + r) * 2 + half)
                .copied()
                .unwrap_or(0);
            sums[0] = vmlal_n_s16(sums[0], vget_low_s16(x0), w);
            sums[1] = vmlal_high_n_s16(sums[1], x0, w);
            sums[2] = vmlal_n_s16(sums[2], vget_low_s16(x1), w);
            sums[3] = vmlal_high_n_s16(sums[3], x1, w);
        }
    }
    let mut sums = [[0i32; NR]; MR];
    for (dst, lanes) in sums.iter_mut().zip(acc) {
        for (quarter, v) in dst.chunks_exact_mut(4).zip(lanes) {
            // SAFETY: each quarter holds 4 i32, one vector.
            unsafe { vst1q_s32(quarter.as_mut_ptr(), v) };
        }
    }
    sums
}

/// Quantise float inputs to int8 codes four at a time with NEON: `x * inverse` rounded half away
/// from zero, offset by `zero_point`, clamped to `[-128, 127]` (NaN to `zero_point as i8`), the
/// same arithmetic as the plan's scalar quantiser step for step, so the same codes. Returns how
/// many leading values it wrote (whole vectors); the caller does the rest.
pub fn quantize_input(input: &[f32], codes: &mut [i8], inverse: f32, zero_point: i32) -> usize {
    if !std::arch::is_aarch64_feature_detected!("neon") {
        return 0;
    }
    // SAFETY: this CPU has NEON, the only feature the function is compiled for.
    unsafe { quantize4(input, codes, inverse, zero_point) }
}

#[target_feature(enable = "neon")]
fn quantize4(input: &[f32], codes: &mut [i8], inverse: f32, zero_point: i32) -> usize {
    let whole = input.len().min(codes.len()) / 4 * 4;
    let inverse = vdupq_n_f32(inverse);
    let (half, one, zero) = (vdupq_n_f32(0.5), vdupq_n_f32(1.0), vdupq_n_f32(0.0));
    // From 2^23 in size every float is an integer: it is its own rounding.
    let exact = vdupq_n_f32(8_388_608.0);
    let offset = vdupq_n_f32(zero_point as f32);
    let (low, high) = (vdupq_n_f32(-128.0), vdupq_n_f32(127.0));
    let nan_code = vdupq_n_s32(i32::from(zero_point as i8));
    for (x, dst) in input[..whole]
        .chunks_exact(4)
        .zip(codes[..whole].chunks_exact_mut(4))
    {
        // SAFETY: 4 f32, 16 bytes.
        let q = vmulq_f32(unsafe { vld1q_f32(x.as_ptr()) }, inverse);
        let whole_part = vrndq_f32(q);
        let fraction = vsubq_f32(q, whole_part);
        let up = vbslq_f32(vcgeq_f32(fraction, half), one, zero);
        let down = vbslq_f32(vcleq_f32(fraction, vnegq_f32(half)), one, zero);
        let rounded = vsubq_f32(vaddq_f32(whole_part, up), down);
        // Small values rounded, the rest (huge, infinite, NaN) as they are.
        let small = vcltq_f32(vabsq_f32(q), exact);
        let code = vaddq_f32(vbslq_f32(small, rounded, q), offset);
        let number = vceqq_f32(code, code);
        let clamped = vminq_f32(vmaxq_f32(code, low), high);
        let ints = vbslq_s32(number, vcvtq_s32_f32(clamped), nan_code);
        let narrow = vqmovn_s16(vcombine_s16(vqmovn_s32(ints), vqmovn_s32(ints)));
        let mut eight = [0i8; 8];
        // SAFETY: 8 bytes.
        unsafe { vst1_s8(eight.as_mut_ptr(), narrow) };
        dst.copy_from_slice(&eight[..4]);
    }
    whole
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strips::check;

    /// Four lanes at a time, the same codes as the generic requantisation, at the extremes
    /// random layers do not reach: sums at the ends of `i32`, every shift, zero points and
    /// clamps at the ends of the code range, an inverted clamp.
    #[test]
    fn vector_requantisation_matches_the_generic_one_at_the_extremes() {
        use crate::quant::requantize_i8;
        let sums = [
            i32::MIN,
            i32::MIN + 1,
            -65_537,
            -1,
            0,
            1,
            65_535,
            i32::MAX - 1,
            i32::MAX,
        ];
        let mut checked = 0;
        for shift in Requant::MIN_SHIFT..=Requant::MAX_SHIFT {
            for multiplier in [1 << 30, 1_518_500_250, i32::MAX] {
                let requant = Requant { multiplier, shift };
                for (zero_point, min, max) in [
                    (0, -128, 127),
                    (-128, -128, 127),
                    (127, 127, 127),
                    (5, 5, 127),
                    (-3, -128, 20),
                    (0, 100, -100),
                ] {
                    let q = OutputQuant {
                        zero_point,
                        min,
                        max,
                    };
                    for bias in [0, 1000, -1000, i32::MAX] {
                        // SAFETY: NEON is always there on aarch64.
                        let vector = unsafe { VectorRequant::new(bias, requant, q) };
                        for chunk in sums.chunks(4) {
                            let mut lanes = [0i32; 4];
                            lanes[..chunk.len()].copy_from_slice(chunk);
                            let mut codes = [0i32; 4];
                            // SAFETY: NEON is always there on aarch64; four i32 each way.
                            unsafe {
                                let codes4 = vector.codes4(vld1q_s32(lanes.as_ptr()));
                                vst1q_s32(codes.as_mut_ptr(), codes4);
                            }
                            for (&sum, &code) in chunk.iter().zip(&codes) {
                                let expected = requantize_i8(
                                    sum.wrapping_add(bias),
                                    requant,
                                    zero_point,
                                    min,
                                    max,
                                );
                                assert_eq!(
                                    code,
                                    i32::from(expected),
                                    "{sum} {bias} {requant:?} {q:?}"
                                );
                                checked += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 62 * 3 * 6 * 4 * sums.len());
    }

    /// The paths a layer can take: `smlal`, then `sdot` and `smmla` where this CPU has them
    /// (said in the output where it does not, not passed over silently).
    fn paths() -> Vec<Dot> {
        let (present, missing): (Vec<Dot>, Vec<Dot>) = [Dot::Smlal, Dot::Sdot, Dot::Smmla]
            .into_iter()
            .partition(|dot| dot.available());
        for dot in missing {
            std::eprintln!("not tested here: this CPU lacks {dot:?} (FEAT_DotProd / FEAT_I8MM)");
        }
        present
    }

    /// Every random convolution gives the generic kernel's bytes, on every path (with `sdot`
    /// or `smmla`, most layers take it).
    #[test]
    fn matches_the_generic_kernel_bit_for_bit() {
        for dot in paths() {
            let mut quads = 0;
            check::random_layers(0x5eed_0fa5_2026, &mut |conv, input, output| {
                let mut fast = Neon::for_conv(conv, dot)?;
                quads += usize::from(fast.layers[0].as_ref()?.quads.is_some());
                Some(fast.conv(0, conv, input, output))
            });
            if dot != Dot::Smlal {
                assert!(quads > 250, "only {quads} layers took {dot:?}");
            }
        }
    }

    /// Networks' stems (dense over an image's few channels) on every path.
    #[test]
    fn stems_match_the_generic_kernel_bit_for_bit() {
        for dot in paths() {
            check::random_stems(0x57e3_2026_1204, &mut |conv, input, output| {
                Neon::for_conv(conv, dot).map(|mut fast| fast.conv(0, conv, input, output))
            });
        }
    }

    #[test]
    fn max_pool_matches_the_generic_kernel_bit_for_bit() {
        check::max_pools(max_pool_by_rows);
    }

    /// Depthwise layers take their own kernel: every random one gives the generic bytes.
    #[test]
    fn depthwise_matches_the_generic_kernel_bit_for_bit() {
        for dot in paths() {
            check::random_depthwise(0xdee9_2026_1201, &mut |conv, input, output| {
                Neon::for_conv(conv, dot).map(|mut fast| fast.conv(0, conv, input, output))
            });
        }
    }

    /// The small planes of a network's last stages: depthwise ones of up to 8x8, and dense and
    /// pointwise ones of up to 12 output pixels, where tiles are mostly empty lanes.
    #[test]
    fn small_plane_layers_match_the_generic_kernel_bit_for_bit() {
        for dot in paths() {
            let (mut lanes, mut few) = (0, 0);
            let mut run = |conv: &Conv<'_>, input: &[i8], output: &mut [i8]| {
                let mut fast = Neon::for_conv(conv, dot)?;
                let prepared = fast.layers.first().and_then(Option::as_ref);
                lanes += usize::from(prepared.is_some_and(|p| p.lanes.is_some()));
                few += usize::from(prepared.is_some_and(|p| p.few.is_some()));
                Some(fast.conv(0, conv, input, output))
            };
            check::random_small_depthwise(0x1a9e_2026_1202, &mut run);
            check::random_few_pixels(0xf3a_2026_1202, &mut run);
            assert!(
                lanes > 100,
                "{dot:?}: only {lanes} layers took the channel-lanes kernel"
            );
            assert!(
                few > 100,
                "{dot:?}: only {few} layers took the few-pixel kernel"
            );
        }
    }

    /// Depthwise layers pad each channel (or lay out each block of channels) into the same
    /// scratch and zero its border once per call: after a larger layer left nonzero values
    /// there (a dense one in the padded input, a depthwise one in the channel-lanes layout),
    /// every random one still gives the generic bytes.
    #[test]
    fn depthwise_after_a_larger_layer_matches_the_generic_kernel() {
        for dirty in [check::Dirty::new(), check::Dirty::depthwise()] {
            let mut run = |conv: &Conv<'_>, input: &[i8], output: &mut [i8]| {
                let mut fast = Neon::with_dot(&[Some(dirty.conv()), Some(*conv)], Dot::Smlal)?;
                dirty.run(&mut fast, 0);
                Some(fast.conv(1, conv, input, output))
            };
            check::random_depthwise(0xd127_2026_1202, &mut run);
            check::random_small_depthwise(0xd128_2026_1202, &mut run);
        }
    }

    #[test]
    fn odd_geometry_never_panics() {
        for dot in paths() {
            check::odd_geometry(0x00ba_d6e0_2026, &mut |conv, input, output| {
                Neon::for_conv(conv, dot).map(|mut fast| fast.conv(0, conv, input, output))
            });
        }
    }
}
