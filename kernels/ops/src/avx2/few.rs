//! Convolutions with at most [`PIXELS`] output pixels (a network's last stages at 64x64: 3x3
//! and 2x2 planes, and the 1x1 ones), bit-identical to the generic [`crate::int8::Conv`].
//!
//! The strips kernel puts 16 pixels in its vector lanes and would fill a quarter to a half of
//! them here; this one puts output channels in the lanes instead: the weights of 8 channels
//! against one pixel's pair of column-matrix values, broadcast, with `vpmaddwd`, for up to 4
//! pixels at a time (the weights are read again for each 4). Such layers have many
//! channels and few pixels, so reading their weights is most of their time: they are kept as
//! bytes (widened as they are loaded), half the strips packing's 16 bits. The sums are exact
//! (16-bit products into 32-bit lanes, added modulo 2^32 as the generic kernel adds them); they
//! are requantised 16 channels to a vector where that is exact (scales below 1, a zero point
//! that is a code), else one value at a time.
//!
//! On a CPU with VNNI the weights are byte quads instead and each pixel's quad of four
//! column-matrix rows (as `x + 128`) is broadcast against 8 channels' quads with `vpdpbusd`:
//! twice the products per instruction, without widening the weights (2x2 planes of MobileNetV2
//! and resnet18 at 64: 0.58 to 0.79 of the time).

use std::arch::x86_64::*;
use std::vec::Vec;

use super::interleave_pairs;
use super::lanes::BlockRequant;
use super::vnni::{to_quads, Vnni};
use crate::int8::{ChannelQuant, Conv, ConvGeometry};
use crate::quant::requantize_i8;
use crate::strips::{quad_word, suits_few_pixels, Layer, Scratch, FEW_PIXELS as PIXELS, NR};

/// Pixels summed at once: two accumulators each, 8 of the 16 vector registers.
const PIXELS_AT_ONCE: usize = 4;
/// Output channels per vector.
const LANES: usize = 8;

/// One layer's weights for this kernel: `[8 channels][row pair][channel][2]` bytes (the pair's
/// two weights, rows `2k` and `2k + 1`, side by side), four bytes to a word.
pub(super) struct FewPixels {
    words: Vec<i32>,
    row_pairs: usize,
    /// Output channels, rounded up to [`LANES`].
    channels: usize,
    /// Where a channel's input plane fits one 16-byte vector: how each tap picks its row of
    /// the strip from it.
    taps: Option<Vec<Tap>>,
    /// With VNNI: `words` holds byte quads for `vpdpbusd` instead, `[8 channels][quad][channel]`
    /// (column-matrix rows `4k..4k + 4` of a channel, the first in the low byte), `quads` per
    /// channel, then each output channel's bias less `(zp + 128) Σ w` (the input is read as
    /// `x + 128`), so that the scrub's checksum covers both.
    vnni: Option<(Vnni, usize)>,
}

/// One tap of the window over an input plane of at most 16 values: for each output pixel,
/// the plane's byte it reads (`0x80`, a zero byte, for the padding and past the last pixel),
/// and whether that value is kept (`-1`) or is padding (`0`).
#[derive(Clone, Copy)]
struct Tap {
    index: [u8; 16],
    keep: [i16; 16],
}

/// The taps of `g`'s window, in the strip's row order, where its input plane has at most 16
/// values and its output at most 16 pixels; `None` elsewhere.
fn plane_taps(g: &ConvGeometry) -> Option<Vec<Tap>> {
    let [_, h, w] = g.input;
    let [_, oh, ow] = g.output;
    if h * w > 16 || oh * ow > NR {
        return None;
    }
    let mut taps = Vec::with_capacity(g.kernel[0] * g.kernel[1]);
    for ky in 0..g.kernel[0] {
        for kx in 0..g.kernel[1] {
            let mut tap = Tap {
                index: [0x80; 16],
                keep: [0; 16],
            };
            for p in 0..oh * ow {
                // Rows and columns of the padded plane, less the padding before it.
                let y = ((p / ow) * g.stride[0] + ky * g.dilation[0]).checked_sub(g.pad[0]);
                let x = ((p % ow) * g.stride[1] + kx * g.dilation[1]).checked_sub(g.pad[1]);
                if let (Some(y), Some(x)) = (y.filter(|&y| y < h), x.filter(|&x| x < w)) {
                    tap.index[p] = (y * w + x) as u8;
                    tap.keep[p] = -1;
                }
            }
            taps.push(tap);
        }
    }
    Some(taps)
}

impl FewPixels {
    /// The packing for `conv` where this kernel takes it ([`suits_few_pixels`]).
    pub(super) fn new(conv: &Conv<'_>, vnni: Option<Vnni>) -> Option<Self> {
        let g = conv.geometry;
        let rows = g.input[0] * g.kernel[0] * g.kernel[1];
        if !suits_few_pixels(conv, rows) {
            return None;
        }
        let oc = g.output[0];
        let (row_pairs, channels) = (rows.div_ceil(2), oc.div_ceil(LANES) * LANES);
        let zero_point = conv.input_zero_point;
        let vnni = vnni.filter(|v| v.available() && (-128..=127).contains(&zero_point));
        let filters = conv.weights.chunks_exact(rows).enumerate();
        let (words, vnni) = match vnni {
            Some(vnni) => {
                let quads = rows.div_ceil(4);
                let mut words = std::vec![0i32; channels * quads + oc];
                for (o, filter) in filters {
                    let (group, lane) = (o / LANES, o % LANES);
                    for (k, taps) in filter.chunks(4).enumerate() {
                        words[(group * quads + k) * LANES + lane] = quad_word(taps);
                    }
                    let sum: i32 = filter.iter().map(|&w| i32::from(w)).sum();
                    let (bias, _) = conv.channels.get(o);
                    words[channels * quads + o] =
                        bias.wrapping_sub((zero_point + 128).wrapping_mul(sum));
                }
                (words, Some((vnni, quads)))
            }
            None => {
                let mut bytes = std::vec![0u8; channels * row_pairs * 2];
                for (o, filter) in filters {
                    let (group, lane) = (o / LANES, o % LANES);
                    for (k, pair) in filter.chunks(2).enumerate() {
                        let at = ((group * row_pairs + k) * LANES + lane) * 2;
                        for (i, &w) in pair.iter().enumerate() {
                            bytes[at + i] = w as u8;
                        }
                    }
                }
                let words = bytes
                    .chunks_exact(4)
                    .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                (words, None)
            }
        };
        Some(Self {
            words,
            row_pairs,
            channels,
            taps: plane_taps(&g),
            vnni,
        })
    }

    /// The packed weights, for the scrub's checksum and fault injection.
    pub(super) fn words(&self) -> &[i32] {
        &self.words
    }

    pub(super) fn words_mut(&mut self) -> &mut [i32] {
        &mut self.words
    }

    /// The sums' scratch (in the products' buffer), with room for the last pixel's last
    /// vector of 16 channels past its 8-channel rounding.
    pub(super) fn sums_len(&self) -> usize {
        PIXELS * self.channels + 8 + self.vnni.map_or(0, |(_, quads)| quads * NR)
    }

    /// Run `layer` (the strips view of the convolution this was packed from, whose buffers and
    /// scratch the caller checked) on `input` into `out`.
    #[target_feature(enable = "avx2")]
    pub(super) fn run(
        &self,
        layer: &Layer<'_>,
        input: &[i8],
        channels: &ChannelQuant<'_>,
        scratch: &mut Scratch,
        out: &mut [i8],
    ) {
        let ConvGeometry { output, .. } = *layer.geometry;
        let pixels = (output[1] * output[2]).max(1);
        let Scratch {
            padded,
            strip,
            products,
            ..
        } = scratch;
        let (Some(strip), Some(products)) = (
            strip.get_mut(..2 * self.row_pairs * NR),
            products.get_mut(..self.sums_len()),
        ) else {
            return;
        };
        let (quad_strip, sums) = products.split_at_mut(self.vnni.map_or(0, |(_, q)| q * NR));
        // Every pixel in one strip, its rows paired as the strips kernel pairs them (or, for
        // the byte quads, in order).
        let paired = self.vnni.is_none();
        match &self.taps {
            Some(taps) => gather_strip(taps, input, layer, paired, strip),
            None => {
                layer.strip_filler(input, padded)(strip, 0);
                if paired {
                    interleave_pairs(strip);
                }
            }
        }
        let biases;
        let channels = match self.vnni {
            Some((vnni, quads)) => {
                let unsigned = _mm256_set1_epi16(layer.zero_point + 128);
                // SAFETY: AVX2 is enabled here; `quad_strip` holds `quads` quads of 16 words.
                unsafe { to_quads(strip, unsigned, quad_strip) };
                self.quad_sums(vnni, quad_strip, pixels, sums);
                biases = ChannelQuant {
                    bias: self.words.get(self.channels * quads..).unwrap_or_default(),
                    ..*channels
                };
                &biases
            }
            None => {
                self.sums(strip, pixels, sums);
                channels
            }
        };
        let q = layer.q;
        let count = out.len() / pixels;
        if BlockRequant::exact(channels, q) {
            // Each pixel's sums are its channels in order: 16 to a vector.
            const IN_ORDER: [usize; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
            for block in 0..count.div_ceil(16) {
                let constants = BlockRequant::new(channels, block, count, q, &IN_ORDER);
                for p in 0..pixels {
                    let at = p * self.channels + 16 * block;
                    let Some(block_sums) = sums.get(at..at + 16) else {
                        continue;
                    };
                    let codes = constants.codes(block_sums);
                    for (o, &code) in (16 * block..count).zip(&codes) {
                        if let Some(out) = out.get_mut(o * pixels + p) {
                            *out = code as i8;
                        }
                    }
                }
            }
            return;
        }
        for (o, codes) in out.chunks_exact_mut(pixels).enumerate() {
            let (bias, requant) = channels.get(o);
            for (p, code) in codes.iter_mut().enumerate().take(PIXELS) {
                let sum = sums.get(p * self.channels + o).copied().unwrap_or(0);
                *code = requantize_i8(sum.wrapping_add(bias), requant, q.zero_point, q.min, q.max);
            }
        }
    }

    /// [`FewPixels::sums`] from byte quads (`quads`, as [`to_quads`] leaves them) with
    /// `vpdpbusd` in encoding `vnni`.
    #[target_feature(enable = "avx2")]
    fn quad_sums(&self, vnni: Vnni, quads: &[i32], pixels: usize, sums: &mut [i32]) {
        sums.fill(0);
        let Some((_, quad_count)) = self.vnni else {
            return;
        };
        if self.words.len() < self.channels * quad_count
            || quads.len() < quad_count * NR
            || sums.len() < PIXELS * self.channels
            || pixels > PIXELS
        {
            return;
        }
        let groups = self.channels / LANES;
        for g0 in (0..groups).step_by(2) {
            for first in (0..pixels).step_by(PIXELS_AT_ONCE) {
                let at = (g0, first, quad_count);
                // SAFETY: the reads and writes are inside the lengths checked above; the
                // encoding was detected at packing.
                unsafe {
                    match (vnni, pixels - first) {
                        (Vnni::Avx, 1) => quad_group_avx::<1>(self, quads, at, sums),
                        (Vnni::Avx, 2) => quad_group_avx::<2>(self, quads, at, sums),
                        (Vnni::Avx, 3) => quad_group_avx::<3>(self, quads, at, sums),
                        (Vnni::Avx, _) => quad_group_avx::<PIXELS_AT_ONCE>(self, quads, at, sums),
                        (Vnni::Avx512, 1) => quad_group_avx512::<1>(self, quads, at, sums),
                        (Vnni::Avx512, 2) => quad_group_avx512::<2>(self, quads, at, sums),
                        (Vnni::Avx512, 3) => quad_group_avx512::<3>(self, quads, at, sums),
                        (Vnni::Avx512, _) => {
                            quad_group_avx512::<PIXELS_AT_ONCE>(self, quads, at, sums)
                        }
                    }
                }
            }
        }
    }

    /// `sums[p * channels + o]`: the sum of channel `o` at pixel `p < pixels` (at most
    /// [`PIXELS`]), from the paired strip (`pairs`, as [`interleave_pairs`] leaves it: the
    /// values of rows `2k` and `2k + 1` of pixels 0-3 are its 32-bit words `16k..16k + 4`, of
    /// pixels 4-7 words `16k + 8..`, of pixels 8-11 words `16k + 4..`).
    #[target_feature(enable = "avx2")]
    fn sums(&self, pairs: &[i16], pixels: usize, sums: &mut [i32]) {
        sums.fill(0);
        // Every read below is inside these, checked once: 16 bytes per group of channels and
        // pair, 16 words per pair of strip rows.
        if self.words.len() < self.channels * self.row_pairs / 2
            || pairs.len() < self.row_pairs * 2 * NR
            || sums.len() < PIXELS * self.channels
            || pixels > PIXELS
        {
            return;
        }
        let groups = self.channels / LANES;
        // Two groups (16 channels) at a time, the last alone when their count is odd.
        for g0 in (0..groups).step_by(2) {
            for first in (0..pixels).step_by(PIXELS_AT_ONCE) {
                // SAFETY: the reads and writes are inside the lengths checked above.
                unsafe {
                    match pixels - first {
                        1 => self.group_sums::<1>(pairs, g0, first, sums),
                        2 => self.group_sums::<2>(pairs, g0, first, sums),
                        3 => self.group_sums::<3>(pairs, g0, first, sums),
                        _ => self.group_sums::<PIXELS_AT_ONCE>(pairs, g0, first, sums),
                    }
                }
            }
        }
    }

    /// The sums of channel groups `g0` and `g0 + 1` (if there is one) at pixels `first..first
    /// + P`, into `sums`.
    ///
    /// # Safety
    /// The lengths [`FewPixels::sums`] checks, `first` a multiple of 4 and `first + P <=
    /// PIXELS`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn group_sums<const P: usize>(
        &self,
        pairs: &[i16],
        g0: usize,
        first: usize,
        sums: &mut [i32],
    ) {
        let row_pairs = self.row_pairs;
        // The words of pixels `first..first + 4` (`vpunpck*wd` leave them in this order).
        let from = [0, 8, 4, 12][first / PIXELS_AT_ONCE % 4];
        let words = pairs.as_ptr().cast::<i32>();
        let bytes = self.words.as_ptr().cast::<i8>();
        let second = g0 + 1 < self.channels / LANES;
        let mut acc = [[_mm256_setzero_si256(); 2]; P];
        for k in 0..row_pairs {
            // SAFETY: the reads are inside the lengths the caller checked.
            unsafe {
                let weights = |g: usize| {
                    let at = bytes.add((g * row_pairs + k) * 2 * LANES);
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(at.cast()))
                };
                let w = [
                    weights(g0),
                    if second {
                        weights(g0 + 1)
                    } else {
                        _mm256_setzero_si256()
                    },
                ];
                for (p, acc) in acc.iter_mut().enumerate() {
                    let x = _mm256_set1_epi32(words.add(16 * k + from + p).read_unaligned());
                    acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(w[0], x));
                    acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(w[1], x));
                }
            }
        }
        // SAFETY: as the caller vouches.
        unsafe { self.store_sums(&acc, g0, first, sums) };
    }

    /// The sums `acc` of channel groups `g0` and `g0 + 1` (if there is one) at pixels `first..`
    /// into `sums`.
    ///
    /// # Safety
    /// The lengths [`FewPixels::sums`] checks, and `first + acc.len() <= PIXELS`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn store_sums(&self, acc: &[[__m256i; 2]], g0: usize, first: usize, sums: &mut [i32]) {
        let second = g0 + 1 < self.channels / LANES;
        for (p, acc) in acc.iter().enumerate() {
            let at = (first + p) * self.channels + g0 * LANES;
            let vectors = if second { 2 } else { 1 };
            for (v, acc) in acc.iter().enumerate().take(vectors) {
                // SAFETY: `at + 8 * v + 8 <= (first + p + 1) * channels <= sums.len()`, as
                // the caller checked.
                unsafe { _mm256_storeu_si256(sums.as_mut_ptr().add(at + LANES * v).cast(), *acc) };
            }
        }
    }
}

/// The strip [`Layer::strip_filler`] and [`interleave_pairs`] make, for a layer whose input
/// planes have at most 16 values, straight from the input codes: per channel one vector load,
/// per tap a byte shuffle, a widening, the zero point's subtraction and the padding's mask,
/// per pair of rows an interleaving (element by element, a 3x3 plane's strip was a quarter of
/// the kernel's instructions).
#[target_feature(enable = "avx2")]
fn gather_strip(taps: &[Tap], input: &[i8], layer: &Layer<'_>, paired: bool, strip: &mut [i16]) {
    let [_, h, w] = layer.geometry.input;
    let plane = h * w;
    let zero_point = _mm256_set1_epi16(layer.zero_point);
    let (paired_strip, row_strip) = if paired {
        (strip, &mut [][..])
    } else {
        (&mut [][..], strip)
    };
    let mut pairs = paired_strip.chunks_exact_mut(2 * NR);
    let mut rows = row_strip.chunks_exact_mut(NR);
    let mut pending = None;
    for channel in 0..layer.icg {
        let at = channel * plane;
        // The plane and whatever follows it (masked off), or a copy near the input's end.
        let mut tail = [0i8; 16];
        let bytes = match input.get(at..at + 16) {
            Some(bytes) => bytes,
            None => {
                let rest = input.get(at..).unwrap_or_default();
                let n = rest.len().min(16);
                tail[..n].copy_from_slice(&rest[..n]);
                &tail
            }
        };
        // SAFETY: `bytes` holds 16 bytes; `Tap`'s arrays 16 bytes and 16 values.
        let codes = unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) };
        for tap in taps {
            let row = unsafe {
                let picked = _mm_shuffle_epi8(codes, _mm_loadu_si128(tap.index.as_ptr().cast()));
                let values = _mm256_sub_epi16(_mm256_cvtepi8_epi16(picked), zero_point);
                _mm256_and_si256(values, _mm256_loadu_si256(tap.keep.as_ptr().cast()))
            };
            if !paired {
                if let Some(dst) = rows.next() {
                    // SAFETY: `dst` holds NR = 16 values, one vector.
                    unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), row) };
                }
                continue;
            }
            match pending.take() {
                None => pending = Some(row),
                Some(first) => store_pair(pairs.next(), first, row),
            }
        }
    }
    // An odd row count: the last pair's second row is zeros.
    if let Some(first) = pending {
        store_pair(pairs.next(), first, _mm256_setzero_si256());
    }
}

/// Rows `first` and `second` of the strip into `pair`, interleaved as [`interleave_pairs`]
/// leaves them.
#[inline]
#[target_feature(enable = "avx2")]
fn store_pair(pair: Option<&mut [i16]>, first: __m256i, second: __m256i) {
    if let Some(pair) = pair.filter(|pair| pair.len() >= 2 * NR) {
        // SAFETY: `pair` holds 2 * NR = 32 values, two vectors.
        unsafe {
            let at = pair.as_mut_ptr();
            _mm256_storeu_si256(at.cast(), _mm256_unpacklo_epi16(first, second));
            _mm256_storeu_si256(at.add(NR).cast(), _mm256_unpackhi_epi16(first, second));
        }
    }
}

/// The sums of channel groups `g0` and `g0 + 1` (if there is one) at pixels `first..first +
/// P` (`at`: `(g0, first, quads)`) from byte quads, into `sums`, with `vpdpbusd` in encoding
/// `$dp`: a pixel's quad of four input rows broadcast against 8 channels' quads of weights.
macro_rules! quad_group {
    ($name:ident, $features:literal, $dp:ident) => {
        /// # Safety
        /// The lengths [`FewPixels::quad_sums`] checks, `first` a multiple of 4 and `first +
        /// P <= PIXELS`; the CPU has the encoding.
        #[target_feature(enable = $features)]
        unsafe fn $name<const P: usize>(
            few: &FewPixels,
            quads: &[i32],
            (g0, first, quad_count): (usize, usize, usize),
            sums: &mut [i32],
        ) {
            // The words of pixels `first..first + 4` (`to_quads` leaves them in this order).
            let from = [0, 8, 4, 12][first / PIXELS_AT_ONCE % 4];
            let words = few.words.as_ptr();
            let second = g0 + 1 < few.channels / LANES;
            let mut acc = [[_mm256_setzero_si256(); 2]; P];
            for k in 0..quad_count {
                // SAFETY: the reads are inside the lengths the caller checked.
                unsafe {
                    let weights = |g: usize| {
                        _mm256_loadu_si256(words.add((g * quad_count + k) * LANES).cast())
                    };
                    let w = [
                        weights(g0),
                        if second {
                            weights(g0 + 1)
                        } else {
                            _mm256_setzero_si256()
                        },
                    ];
                    for (p, acc) in acc.iter_mut().enumerate() {
                        let x = _mm256_set1_epi32(*quads.get_unchecked(NR * k + from + p));
                        acc[0] = $dp(acc[0], x, w[0]);
                        acc[1] = $dp(acc[1], x, w[1]);
                    }
                }
            }
            // SAFETY: as the caller vouches.
            unsafe { few.store_sums(&acc, g0, first, sums) };
        }
    };
}

quad_group!(quad_group_avx, "avx2,avxvnni", _mm256_dpbusd_avx_epi32);
quad_group!(
    quad_group_avx512,
    "avx2,avx512vnni,avx512vl",
    _mm256_dpbusd_epi32
);
