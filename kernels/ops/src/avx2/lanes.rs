//! Depthwise convolutions on small planes (at most [`PIXELS`] input and output pixels: 8x8 and
//! below), with the channels in the vector lanes; bit-identical to the generic
//! [`crate::int8::Conv`].
//!
//! The depthwise kernel computes a channel at a time with its pixels in the lanes: a 2x2 plane
//! fills 4 of 16, and a channel's setup (its padded plane, its constants) costs more than its
//! arithmetic. Here a block of 16 channels at a time is laid out pixel by pixel, the channels
//! of a pixel side by side (16-bit, minus the zero point, inside a zero border); then each
//! output pixel is 16 channels per pair of vectors: two taps' values interleaved for
//! `vpmaddwd` against the two taps' weights of the same 16 channels, prepared at load in the
//! same lane order. The sums are exact; they are requantised 16 channels to a vector.

use std::arch::x86_64::*;
use std::vec::Vec;

use super::is_code;
// `ORDER`: the channel order within 16 that `vpunpcklwd` / `vpunpckhwd` leave in their
// 32-bit lanes (the 16-bit layers' depthwise kernel packs its words the same way).
use crate::int16::{pair_word, UNPACK_ORDER as ORDER};
use crate::int8::{ChannelQuant, Conv, ConvGeometry, OutputQuant};
use crate::quant::{requantize_i8, Requant};
use crate::strips::{
    suits_channel_lanes, Layer, CHANNEL_LANES_PIXELS as PIXELS, MAX_DEPTHWISE_TAPS,
};

/// Channels per pair of vectors.
const LANES: usize = 16;

/// One depthwise layer's weights for this kernel: `[tap pair][16 channels][lane]`, each word
/// the two taps' weights of one channel (the even tap in the low half), in [`ORDER`].
pub(super) struct ChannelLanes {
    words: Vec<i32>,
    /// Channels, rounded up to [`LANES`].
    channels: usize,
    pairs: usize,
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
        let (pairs, channels) = (taps.div_ceil(2), c.div_ceil(LANES) * LANES);
        let mut words = std::vec![0i32; pairs * channels];
        for (ch, filter) in conv.weights.chunks_exact(taps).enumerate() {
            let (block, lane) = (ch / LANES, ORDER.iter().position(|&o| o == ch % LANES)?);
            for (pair, w) in filter.chunks(2).enumerate() {
                if let Some(word) = words.get_mut((pair * channels / LANES + block) * LANES + lane)
                {
                    *word = pair_word(w.first(), w.get(1));
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

    /// Scratch for one block of 16 channels of the laid-out input (in the transformed input's
    /// buffer) of a layer of geometry `g`.
    pub(super) fn input_len(&self, g: &ConvGeometry) -> usize {
        let [hp, wp] = Layer::padded_dims(g);
        hp * wp * LANES
    }

    /// Scratch for one block's sums (in the products' buffer).
    pub(super) fn sums_len(&self) -> usize {
        PIXELS * LANES
    }

    /// Run `layer` (the strips view of the convolution this was packed from, whose buffers the
    /// caller checked) on `input` into `out`, with `laid_out` for the input pixel by pixel and
    /// `sums` for the sums. A block of 16 channels at a time from its input to its codes, so
    /// that what it lays out and sums stays in L1 however many channels the layer has.
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
        let [sy, sx] = g.stride;
        let pixels = oh * ow;
        let (Some(laid_out), Some(sums), Some(offsets)) = (
            laid_out.get_mut(..hp * wp * LANES),
            sums.get_mut(..pixels * LANES),
            layer.lanes_taps(input),
        ) else {
            return;
        };
        if self.words.len() < self.pairs * self.channels {
            return;
        }
        let q = layer.q;
        let vector = BlockRequant::exact(channels, q);
        // The border once per call: every block writes the same inside positions (a last block
        // of fewer than 16 channels leaves the lanes past them as the block before had them;
        // their sums are never output).
        laid_out.fill(0);
        for block in 0..c.div_ceil(LANES) {
            let first = block * LANES;
            let count = LANES.min(c - first);
            let planes = input.get(first * h * w..).unwrap_or_default();
            let Some(outputs) = out.get_mut(first * pixels..(first + count) * pixels) else {
                return;
            };
            lay_out(layer, planes, count, laid_out);
            for (p, sums) in sums.chunks_exact_mut(LANES).enumerate() {
                let origin = (p / ow) * sy * wp + (p % ow) * sx;
                // SAFETY: checked above.
                unsafe { self.sums(laid_out, origin, block, &offsets, sums) };
            }
            if vector {
                let constants = BlockRequant::new(channels, block, c, q, &ORDER);
                // Each pixel's 16 codes in lane order, then each channel's plane from its lane
                // (a lane holds channel `ORDER[lane]`, and `ORDER` is its own inverse).
                let mut codes = [[0i8; LANES]; PIXELS];
                for (row, sums) in codes.iter_mut().zip(sums.chunks_exact(LANES)) {
                    for (code, value) in row.iter_mut().zip(constants.codes(sums)) {
                        *code = value as i8;
                    }
                }
                for (plane, &lane) in outputs.chunks_exact_mut(pixels.max(1)).zip(&ORDER) {
                    for (out, row) in plane.iter_mut().zip(&codes) {
                        *out = row.get(lane).copied().unwrap_or(0);
                    }
                }
                continue;
            }
            for (o, codes) in outputs.chunks_exact_mut(pixels.max(1)).enumerate() {
                let (bias, requant) = channels.get(first + o);
                let lane = ORDER.iter().position(|&l| l == o).unwrap_or(0);
                for (code, sums) in codes.iter_mut().zip(sums.chunks_exact(LANES)) {
                    let sum = sums.get(lane).copied().unwrap_or(0).wrapping_add(bias);
                    *code = requantize_i8(sum, requant, q.zero_point, q.min, q.max);
                }
            }
        }
    }

    /// Into `sums`, in [`ORDER`]: the sums of channels `16 * block..` (laid out in `laid_out`)
    /// at the output pixel whose window starts at pixel `origin` of the padded plane.
    ///
    /// # Safety
    /// Every tap of the window must be inside `laid_out` (`(origin + offset + 1) * 16`
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
            let values = laid_out.as_ptr();
            let words = self.words.as_ptr().add(block * LANES);
            let load = |tap: usize| _mm256_loadu_si256(values.add((origin + tap) * LANES).cast());
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

/// [`Layer::lay_out_channels`] for 16 lanes, 16 pixels at a time: a byte of each of the 16
/// channels' planes (loaded 16 at a time) transposed into each pixel's 16 channels, widened,
/// centred and stored whole. One store per value, 32 bytes apart, was the most of this
/// kernel's time on 4x4 and 2x2 planes: each 32-byte load of a pixel's channels then waited
/// for 16 small stores to retire instead of taking one store's bytes. Lanes past `count` and
/// pixels past the plane hold what the loads read (other channels' codes, or 0): their sums
/// are never output. Where a load would leave `planes`, the scalar layout.
#[target_feature(enable = "avx2")]
fn lay_out(layer: &Layer<'_>, planes: &[i8], count: usize, laid_out: &mut [i16]) {
    let g = layer.geometry;
    let [_, h, w] = g.input;
    let [hp, wp] = Layer::padded_dims(g);
    let [top, left] = g.pad;
    let pixels = h * w;
    let count = count.min(LANES);
    let last_chunk = pixels.saturating_sub(1) / LANES * LANES;
    let fits = laid_out.len() >= hp * wp * LANES && (top + h) * wp <= hp * wp && left + w <= wp;
    if !fits || count == 0 || (count - 1) * pixels + last_chunk + LANES > planes.len() {
        layer.lay_out_channels(planes, count, LANES, laid_out);
        return;
    }
    let zero_point = _mm256_set1_epi16(layer.zero_point);
    let (mut y, mut x) = (0, 0);
    for first in (0..pixels).step_by(LANES) {
        // Row k holds channel `BIT_REVERSED[k]`: after the four interleaving rounds vector
        // `i` holds pixel `BIT_REVERSED[i]`'s 16 channels, in channel order.
        let mut rows = BIT_REVERSED.map(|c| {
            if c < count {
                // SAFETY: `(c * pixels + first) + 16 <= planes.len()`, checked above.
                unsafe { _mm_loadu_si128(planes.as_ptr().add(c * pixels + first).cast()) }
            } else {
                _mm_setzero_si128()
            }
        });
        for _ in 0..4 {
            let mut next = rows;
            for i in 0..8 {
                next[i] = _mm_unpacklo_epi8(rows[2 * i], rows[2 * i + 1]);
                next[i + 8] = _mm_unpackhi_epi8(rows[2 * i], rows[2 * i + 1]);
            }
            rows = next;
        }
        for j in 0..LANES.min(pixels - first) {
            let channels = rows[BIT_REVERSED[j]];
            let values = _mm256_sub_epi16(_mm256_cvtepi8_epi16(channels), zero_point);
            let at = ((y + top) * wp + x + left) * LANES;
            // SAFETY: pixel `(y + top, x + left)` is inside the padded plane (checked above),
            // 16 values from `at`.
            unsafe { _mm256_storeu_si256(laid_out.as_mut_ptr().add(at).cast(), values) };
            x += 1;
            if x == w {
                (y, x) = (y + 1, 0);
            }
        }
    }
}

/// `BIT_REVERSED[i]` is `i` with its four bits in reverse order.
const BIT_REVERSED: [usize; 16] = [0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15];

/// The requantisation of 16 channels, one per lane in a given order ([`Requant::apply`] with
/// a shift of at most 0, then the zero point and clamp, as [`requantize_i8`] does it).
pub(super) struct BlockRequant {
    /// `[lo, hi]` vectors: bias, multiplier, and the right shift (`31 - shift`) as 64-bit
    /// counts for the even and the odd 32-bit lanes.
    bias: [__m256i; 2],
    multiplier: [__m256i; 2],
    right_even: [__m256i; 2],
    right_odd: [__m256i; 2],
    low: __m256i,
    high: __m256i,
    zero_point: __m256i,
}

impl BlockRequant {
    /// Whether it is exact for `channels` into `q`: scales below 1 and a zero point that is a
    /// code.
    pub(super) fn exact(channels: &ChannelQuant<'_>, q: OutputQuant) -> bool {
        is_code(q.zero_point) && channels.shift.iter().all(|&s| s <= 0)
    }

    /// The constants of channels `16 * block..`, lane `i` channel `16 * block + order[i]`
    /// (those from `count` on are padding: 0).
    #[target_feature(enable = "avx2")]
    pub(super) fn new(
        channels: &ChannelQuant<'_>,
        block: usize,
        count: usize,
        q: OutputQuant,
        order: &[usize; LANES],
    ) -> Self {
        let (mut bias, mut multiplier, mut right) = ([0i32; LANES], [0i32; LANES], [31i32; LANES]);
        for (lane, &o) in order.iter().enumerate() {
            let ch = block * LANES + o;
            if ch < count {
                let (b, r) = channels.get(ch);
                let shift = r.shift.clamp(Requant::MIN_SHIFT, Requant::MAX_SHIFT);
                (bias[lane], multiplier[lane], right[lane]) =
                    (b, r.multiplier, 31 - i32::from(shift));
            }
        }
        // SAFETY (the loads): 8 i32 of a 16-value array, one vector.
        let halves = |v: &[i32; LANES]| unsafe {
            [
                _mm256_loadu_si256(v.as_ptr().cast()),
                _mm256_loadu_si256(v.as_ptr().add(8).cast()),
            ]
        };
        let right = halves(&right);
        let low_words = _mm256_set1_epi64x(0xffff_ffff);
        Self {
            bias: halves(&bias),
            multiplier: halves(&multiplier),
            right_even: right.map(|r| _mm256_and_si256(r, low_words)),
            right_odd: right.map(|r| _mm256_srli_epi64::<32>(r)),
            low: _mm256_set1_epi32(i32::from(q.min) - q.zero_point),
            high: _mm256_set1_epi32(i32::from(q.max) - q.zero_point),
            zero_point: _mm256_set1_epi32(q.zero_point),
        }
    }

    /// The codes of 16 sums (in the lane order), as 32-bit values.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) fn codes(&self, sums: &[i32]) -> [i32; LANES] {
        let mut codes = [0i32; LANES];
        if sums.len() < LANES {
            return codes;
        }
        for half in 0..2 {
            // SAFETY: 8 i32 of 16, one vector.
            let acc = unsafe { _mm256_loadu_si256(sums.as_ptr().add(8 * half).cast()) };
            let acc = _mm256_add_epi32(acc, self.bias[half]);
            let m = self.multiplier[half];
            let even = self.round_shift(_mm256_mul_epi32(acc, m), self.right_even[half]);
            let odd = self.round_shift(
                _mm256_mul_epi32(_mm256_srli_epi64::<32>(acc), _mm256_srli_epi64::<32>(m)),
                self.right_odd[half],
            );
            // Every lane's value fits 32 bits (a shift of at most 0 scales by less than 1).
            let scaled = _mm256_blend_epi32::<0b1010_1010>(even, _mm256_slli_epi64::<32>(odd));
            let clamped = _mm256_min_epi32(_mm256_max_epi32(scaled, self.low), self.high);
            let code = _mm256_add_epi32(clamped, self.zero_point);
            // SAFETY: 8 i32 of 16, one vector.
            unsafe { _mm256_storeu_si256(codes.as_mut_ptr().add(8 * half).cast(), code) };
        }
        codes
    }

    /// `(product + 2^(right - 1)) >> right` in four 64-bit lanes, rounding toward negative
    /// infinity (an arithmetic shift made of a logical one: flip negatives, shift, flip back).
    #[inline]
    #[target_feature(enable = "avx2")]
    fn round_shift(&self, product: __m256i, right: __m256i) -> __m256i {
        let one = _mm256_set1_epi64x(1);
        let half = _mm256_sllv_epi64(one, _mm256_sub_epi64(right, one));
        let v = _mm256_add_epi64(product, half);
        let sign = _mm256_cmpgt_epi64(_mm256_setzero_si256(), v);
        _mm256_xor_si256(_mm256_srlv_epi64(_mm256_xor_si256(v, sign), right), sign)
    }
}
