//! Depthwise convolutions on small planes (at most [`PIXELS`] output pixels: 4x4 and below),
//! with the channels in the vector lanes; bit-identical to the generic [`crate::int8::Conv`].
//!
//! The depthwise kernel computes a channel at a time with its pixels in the lanes: a 2x2 plane
//! fills 4 of 16, and a channel's setup (its padded plane, its constants) costs more than its
//! arithmetic. Here the layer's input is laid out once pixel by pixel, the channels of a pixel
//! side by side (16-bit, minus the zero point, inside a zero border); then each output pixel is
//! 16 channels per pair of vectors: two taps' values interleaved for `vpmaddwd` against the
//! two taps' weights of the same 16 channels, prepared at load in the same lane order. The sums
//! are exact and are requantised one value at a time.

use std::arch::x86_64::*;
use std::vec::Vec;

use crate::int8::{ChannelQuant, Conv, ConvGeometry};
use crate::quant::requantize_i8;
use crate::strips::{Layer, MAX_DEPTHWISE_TAPS};

/// Most output pixels a layer may have for this kernel.
pub(super) const PIXELS: usize = 16;
/// Channels per pair of vectors.
const LANES: usize = 16;
/// The channel order within 16 that `vpunpcklwd` / `vpunpckhwd` leave in their 32-bit lanes:
/// the low vector holds channels 0-3 and 8-11, the high one 4-7 and 12-15.
const ORDER: [usize; 16] = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15];

/// One depthwise layer's weights for this kernel: `[tap pair][16 channels][lane]`, each word
/// the two taps' weights of one channel (the even tap in the low half), in [`ORDER`].
pub(super) struct ChannelLanes {
    words: Vec<i32>,
    /// Channels, rounded up to [`LANES`].
    channels: usize,
    pairs: usize,
}

impl ChannelLanes {
    /// The packing for `conv` where this kernel takes it: one input and one output channel per
    /// group, at most [`MAX_DEPTHWISE_TAPS`] taps and [`PIXELS`] output pixels.
    pub(super) fn new(conv: &Conv<'_>) -> Option<Self> {
        let g = conv.geometry;
        let [c, _, _] = g.input;
        let [oc, oh, ow] = g.output;
        let taps = g.kernel[0] * g.kernel[1];
        if g.group != c || oc != c || oh * ow > PIXELS || taps > MAX_DEPTHWISE_TAPS {
            return None;
        }
        if conv.weights.len() != c * taps {
            return None;
        }
        let (pairs, channels) = (taps.div_ceil(2), c.div_ceil(LANES) * LANES);
        let mut words = std::vec![0i32; pairs * channels];
        for (ch, filter) in conv.weights.chunks_exact(taps).enumerate() {
            let (block, lane) = (ch / LANES, ORDER.iter().position(|&o| o == ch % LANES)?);
            for (pair, w) in filter.chunks(2).enumerate() {
                let half = |i: usize| w.get(i).map_or(0, |&v| i16::from(v) as u16 as u32);
                if let Some(word) = words.get_mut((pair * channels / LANES + block) * LANES + lane)
                {
                    *word = (half(0) | half(1) << 16) as i32;
                }
            }
        }
        Some(Self {
            words,
            channels,
            pairs,
        })
    }

    /// The packed weights, for the scrub's checksum and fault injection.
    pub(super) fn words(&self) -> &[i32] {
        &self.words
    }

    pub(super) fn words_mut(&mut self) -> &mut [i32] {
        &mut self.words
    }

    /// Scratch for the laid-out input (in the transformed input's buffer) of a layer of
    /// geometry `g`.
    pub(super) fn input_len(&self, g: &ConvGeometry) -> usize {
        let [hp, wp] = Layer::padded_dims(g);
        hp * wp * self.channels
    }

    /// Scratch for the sums (in the products' buffer).
    pub(super) fn sums_len(&self) -> usize {
        PIXELS * self.channels
    }

    /// Run `layer` (the strips view of the convolution this was packed from, whose buffers the
    /// caller checked) on `input` into `out`, with `laid_out` for the input pixel by pixel and
    /// `sums` for the sums.
    #[target_feature(enable = "avx2")]
    pub(super) fn run(
        &self,
        layer: &Layer<'_>,
        input: &[i8],
        channels: &ChannelQuant<'_>,
        laid_out: &mut [i16],
        sums: &mut [i32],
        out: &mut [i8],
    ) {
        let g = layer.geometry;
        let [c, h, w] = g.input;
        let [_, oh, ow] = g.output;
        let [hp, wp] = Layer::padded_dims(g);
        let [top, left] = g.pad;
        let lanes = self.channels;
        let pixels = oh * ow;
        let (Some(laid_out), Some(sums)) = (
            laid_out.get_mut(..hp * wp * lanes),
            sums.get_mut(..pixels * lanes),
        ) else {
            return;
        };
        laid_out.fill(0);
        for (ch, plane) in input.chunks_exact((h * w).max(1)).enumerate().take(c) {
            for (y, row) in plane.chunks_exact(w.max(1)).enumerate() {
                let first = ((y + top) * wp + left) * lanes + ch;
                let slots = laid_out.get_mut(first..).unwrap_or_default();
                for (slot, &v) in slots.iter_mut().step_by(lanes).zip(row) {
                    *slot = i16::from(v) - layer.zero_point;
                }
            }
        }
        let offsets = layer.tap_offsets();
        let [sy, sx] = g.stride;
        // Every tap of every output pixel inside the padded plane: the loads below need no
        // other check.
        let last = (oh.max(1) - 1) * sy * wp + (ow.max(1) - 1) * sx;
        let reach = offsets.iter().max().copied().unwrap_or(0);
        if last + reach >= hp * wp || self.words.len() < self.pairs * lanes {
            return;
        }
        for (p, sums) in sums.chunks_exact_mut(lanes).enumerate() {
            let origin = (p / ow) * sy * wp + (p % ow) * sx;
            for (block, sums) in sums.chunks_exact_mut(LANES).enumerate() {
                // SAFETY: checked above.
                unsafe { self.sums(laid_out, origin, block, &offsets, sums) };
            }
        }
        let q = layer.q;
        for (ch, codes) in out.chunks_exact_mut(pixels.max(1)).enumerate().take(c) {
            let (bias, requant) = channels.get(ch);
            let lane = (ch / LANES) * LANES + ORDER[ch % LANES];
            for (code, sums) in codes.iter_mut().zip(sums.chunks_exact(lanes)) {
                let sum = sums.get(lane).copied().unwrap_or(0).wrapping_add(bias);
                *code = requantize_i8(sum, requant, q.zero_point, q.min, q.max);
            }
        }
    }

    /// Into `sums`, in [`ORDER`]: the sums of channels `16 * block..` at the output pixel whose
    /// window starts at pixel `origin` of the padded plane.
    ///
    /// # Safety
    /// Every tap of the window must be inside `laid_out` (`(origin + offset + 1) * channels`
    /// values), and the weights must hold `pairs * channels` words.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn sums(
        &self,
        laid_out: &[i16],
        origin: usize,
        block: usize,
        offsets: &[usize; MAX_DEPTHWISE_TAPS + 1],
        sums: &mut [i32],
    ) {
        let lanes = self.channels;
        let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        // SAFETY: the caller vouches for every load; the stores are 16 values of `sums`.
        unsafe {
            let values = laid_out.as_ptr().add(block * LANES);
            let words = self.words.as_ptr().add(block * LANES);
            let load = |tap: usize| _mm256_loadu_si256(values.add((origin + tap) * lanes).cast());
            for pair in 0..self.pairs {
                // The tap past an odd count reads offset 0 and is weighted 0.
                let (a, b) = (load(offsets[2 * pair]), load(offsets[2 * pair + 1]));
                let (pl, ph) = (_mm256_unpacklo_epi16(a, b), _mm256_unpackhi_epi16(a, b));
                let w = words.add(pair * lanes);
                let (wl, wh) = (
                    _mm256_loadu_si256(w.cast()),
                    _mm256_loadu_si256(w.add(8).cast()),
                );
                lo = _mm256_add_epi32(lo, _mm256_madd_epi16(pl, wl));
                hi = _mm256_add_epi32(hi, _mm256_madd_epi16(ph, wh));
            }
            if let Some(sums) = sums.get_mut(..LANES) {
                _mm256_storeu_si256(sums.as_mut_ptr().cast(), lo);
                _mm256_storeu_si256(sums.as_mut_ptr().add(8).cast(), hi);
            }
        }
    }
}
