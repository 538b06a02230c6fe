//! Depthwise convolutions on small planes with the channels in the vector lanes, on NEON;
//! bit-identical to the generic [`crate::int8::Conv`]. The AVX2 kernel of the same name
//! ([`crate::avx2`]'s `lanes`) explains why: on a 4x4 plane a channel's own setup costs more
//! than its arithmetic. A block of 8 channels is laid out pixel by pixel (16-bit, minus the zero
//! point, inside a zero border); each output pixel is then one widening multiply-accumulate
//! (`smlal`, `smlal2`) per tap for all 8 channels, and the sums are requantised 8 channels at a
//! time with each lane's own constants. Unlike `vpmaddwd`, `smlal` takes one tap at a time, so
//! neither the taps nor the channels are reordered.

use std::arch::aarch64::*;
use std::vec::Vec;

use crate::int8::{ChannelQuant, Conv, ConvGeometry, OutputQuant};
use crate::quant::Requant;
use crate::strips::{
    suits_channel_lanes, Layer, CHANNEL_LANES_PIXELS as PIXELS, MAX_DEPTHWISE_TAPS,
};

/// Channels per vector of 16-bit values.
const LANES: usize = 8;

/// One depthwise layer's weights for this kernel: `[tap][channel]` in 16 bits, the channels
/// rounded up to [`LANES`] (zeros past the last), held as 32-bit words (two weights each, in
/// memory order) so that the scrub checksums them with the other packings.
pub(super) struct ChannelLanes {
    words: Vec<i32>,
    /// Channels, rounded up to [`LANES`].
    channels: usize,
    taps: usize,
}

impl ChannelLanes {
    /// The packing for `conv` where this kernel takes it ([`suits_channel_lanes`]).
    pub(super) fn new(conv: &Conv<'_>) -> Option<Self> {
        if !suits_channel_lanes(conv) {
            return None;
        }
        let g = conv.geometry;
        let c = g.input[0];
        let taps = g.kernel[0] * g.kernel[1];
        let channels = c.div_ceil(LANES) * LANES;
        // `channels` is a multiple of 8: the 16-bit weights fill whole words.
        let mut words = std::vec![0i32; taps * channels / 2];
        let weights: &mut [i16] = bytemuck::cast_slice_mut(&mut words);
        for (ch, filter) in conv.weights.chunks_exact(taps).enumerate() {
            for (t, &w) in filter.iter().enumerate() {
                if let Some(word) = weights.get_mut(t * channels + ch) {
                    *word = i16::from(w);
                }
            }
        }
        Some(Self {
            words,
            channels,
            taps,
        })
    }

    /// The packed weights, for the scrub's checksum and fault injection.
    pub(super) fn words(&self) -> &[i32] {
        &self.words
    }

    pub(super) fn words_mut(&mut self) -> &mut [i32] {
        &mut self.words
    }

    /// Scratch for one block of 8 channels of the laid-out input, for a layer of geometry `g`.
    pub(super) fn input_len(g: &ConvGeometry) -> usize {
        let [hp, wp] = Layer::padded_dims(g);
        hp * wp * LANES
    }

    /// Run `layer` (the strips view of the convolution this was packed from, whose buffers the
    /// caller checked) on `input` into `out`, with `laid_out` for the input pixel by pixel
    /// ([`ChannelLanes::input_len`]). A block of 8 channels at a time from its input to its
    /// codes, so what it lays out stays in L1 however many channels the layer has.
    #[target_feature(enable = "neon")]
    pub(super) fn run(
        &self,
        layer: &Layer<'_>,
        input: &[i8],
        channels: &ChannelQuant<'_>,
        laid_out: &mut [i16],
        out: &mut [i8],
    ) {
        let g = layer.geometry;
        let [c, h, w] = g.input;
        let [_, oh, ow] = g.output;
        let [hp, wp] = Layer::padded_dims(g);
        let [sy, sx] = g.stride;
        let pixels = oh * ow;
        let (Some(laid_out), Some(offsets)) =
            (laid_out.get_mut(..hp * wp * LANES), layer.lanes_taps(input))
        else {
            return;
        };
        if pixels > PIXELS
            || g.kernel[0] * g.kernel[1] != self.taps
            || self.words.len() * 2 < self.taps * self.channels
            || c > self.channels
        {
            return;
        }
        let weights: &[i16] = bytemuck::cast_slice(&self.words);
        // The border once per call: every block writes the same inside positions (a last block
        // of fewer than 8 channels leaves the lanes past them as the block before had them;
        // their codes are never output).
        laid_out.fill(0);
        for block in 0..c.div_ceil(LANES) {
            let first = block * LANES;
            let count = LANES.min(c - first);
            let planes = input.get(first * h * w..).unwrap_or_default();
            let Some(outputs) = out.get_mut(first * pixels..(first + count) * pixels) else {
                return;
            };
            layer.lay_out_channels(planes, count, LANES, laid_out);
            let requant = LaneRequant::new(channels, first, count, layer.q);
            let mut codes = [[0i8; LANES]; PIXELS];
            for (p, codes) in codes.iter_mut().enumerate().take(pixels) {
                let origin = (p / ow) * sy * wp + (p % ow) * sx;
                // SAFETY: every tap of this pixel is inside `laid_out` (checked above); the
                // weights hold `taps * channels` values, block `block` being below
                // `channels / 8`.
                let [lo, hi] = unsafe { self.sums(laid_out, weights, origin, first, &offsets) };
                // SAFETY: `codes` holds 8 bytes, one vector.
                unsafe { vst1_s8(codes.as_mut_ptr(), requant.codes8(lo, hi)) };
            }
            for (lane, plane) in outputs.chunks_exact_mut(pixels.max(1)).enumerate() {
                for (out, codes) in plane.iter_mut().zip(&codes) {
                    *out = codes.get(lane).copied().unwrap_or(0);
                }
            }
        }
    }

    /// The sums of channels `first..first + 8` (laid out in `laid_out`) at the output pixel
    /// whose window starts at pixel `origin` of the padded plane: channels 0-3 and 4-7.
    ///
    /// # Safety
    /// Every tap of the window must be inside `laid_out` (`(origin + offset + 1) * 8` values),
    /// and `weights` must hold `taps * channels` values, with `first + 8 <= channels`.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn sums(
        &self,
        laid_out: &[i16],
        weights: &[i16],
        origin: usize,
        first: usize,
        offsets: &[usize; MAX_DEPTHWISE_TAPS + 1],
    ) -> [int32x4_t; 2] {
        let (mut lo, mut hi) = (vdupq_n_s32(0), vdupq_n_s32(0));
        // SAFETY: the caller vouches for every load.
        unsafe {
            let values = laid_out.as_ptr();
            let weights = weights.as_ptr().add(first);
            for (t, &offset) in offsets.iter().enumerate().take(self.taps) {
                let x = vld1q_s16(values.add((origin + offset) * LANES));
                let w = vld1q_s16(weights.add(t * self.channels));
                lo = vmlal_s16(lo, vget_low_s16(x), vget_low_s16(w));
                hi = vmlal_high_s16(hi, x, w);
            }
        }
        [lo, hi]
    }
}

/// The requantisation of 8 channels, one per lane: [`super::VectorRequant`] with each lane's
/// own bias, multiplier and shift (the product in 64 bits, `srshl` by minus the right shift,
/// a saturating narrow, the zero point added saturating, then the clamp), exactly as
/// [`crate::quant::requantize_i8`] for every scale.
pub(super) struct LaneRequant {
    bias: [int32x4_t; 2],
    multiplier: [int32x4_t; 2],
    /// `shift - 31` per lane, for lanes 0-1, 2-3, 4-5 and 6-7.
    right: [int64x2_t; 4],
    zero_point: int32x4_t,
    min: int32x4_t,
    max: int32x4_t,
}

impl LaneRequant {
    /// The constants of channels `first..first + count` (lanes from `count` on: 0).
    #[target_feature(enable = "neon")]
    pub(super) fn new(
        channels: &ChannelQuant<'_>,
        first: usize,
        count: usize,
        q: OutputQuant,
    ) -> Self {
        let (mut bias, mut multiplier, mut right) = ([0i32; LANES], [0i32; LANES], [0i64; LANES]);
        for lane in 0..count.min(LANES) {
            let (b, r) = channels.get(first + lane);
            let shift = r.shift.clamp(Requant::MIN_SHIFT, Requant::MAX_SHIFT);
            (bias[lane], multiplier[lane], right[lane]) = (b, r.multiplier, i64::from(shift) - 31);
        }
        // SAFETY: each load reads 4 i32 or 2 i64 inside an 8-value array.
        unsafe {
            let words = |v: &[i32; LANES]| [vld1q_s32(v.as_ptr()), vld1q_s32(v.as_ptr().add(4))];
            Self {
                bias: words(&bias),
                multiplier: words(&multiplier),
                right: [0, 2, 4, 6].map(|at| vld1q_s64(right.as_ptr().add(at))),
                zero_point: vdupq_n_s32(q.zero_point),
                min: vdupq_n_s32(i32::from(q.min)),
                max: vdupq_n_s32(i32::from(q.max)),
            }
        }
    }

    /// The codes of four lanes' sums with their bias, multiplier and `shift - 31` (lanes 0-1,
    /// 2-3), in 32-bit lanes.
    #[inline]
    #[target_feature(enable = "neon")]
    fn codes4(
        &self,
        sums: int32x4_t,
        bias: int32x4_t,
        m: int32x4_t,
        [right_low, right_high]: [int64x2_t; 2],
    ) -> int32x4_t {
        let acc = vaddq_s32(sums, bias);
        let low = vrshlq_s64(vmull_s32(vget_low_s32(acc), vget_low_s32(m)), right_low);
        let high = vrshlq_s64(vmull_high_s32(acc, m), right_high);
        let scaled = vqmovn_high_s64(vqmovn_s64(low), high);
        let shifted = vqaddq_s32(scaled, self.zero_point);
        vminq_s32(vmaxq_s32(shifted, self.min), self.max)
    }

    /// The codes of 8 lanes' sums (lanes 0-3, 4-7).
    #[inline]
    #[target_feature(enable = "neon")]
    pub(super) fn codes8(&self, low: int32x4_t, high: int32x4_t) -> int8x8_t {
        // Codes are inside [-128, 127] already: the saturating narrows change nothing.
        let [r0, r1, r2, r3] = self.right;
        let low = self.codes4(low, self.bias[0], self.multiplier[0], [r0, r1]);
        let high = self.codes4(high, self.bias[1], self.multiplier[1], [r2, r3]);
        let words = vqmovn_high_s32(vqmovn_s32(low), high);
        vqmovn_s16(words)
    }
}
