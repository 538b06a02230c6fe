//! AVX2 pieces of the 16-bit activation kernels ([`crate::int16::Conv16::run_rows`]): the
//! layer's values are `i16` (minus the input zero point) by then, so `vpmaddwd` multiplies them
//! by the widened int8 weights exactly, two products to an `i32` lane. Sums stay exact in `i32`
//! where each output channel's `|bias| + sum |w| * largest |x|` is under `2^31`
//! ([`crate::int16::sums_fit`], which `run_rows` checks first): every partial sum in a lane is
//! smaller.

use std::arch::x86_64::*;
use std::vec::Vec;

use super::{requantize8, Lanes, Vnni};
use crate::int16::{
    window_reach, Function16, GlobalAveragePool16, Mul16, WideOutput, Width, BLOCK_CHANNELS,
    BLOCK_PIXELS, DOT_LANES, DOT_PIXELS, FUNCTION16_SEGMENT,
};
use crate::int8::ConvGeometry;
use crate::int8::{ChannelQuant, ShapeError};
use crate::quant::Requant;

/// One block of a layer's output pixels as dot products: pixel `first_pixel + q` of output
/// channel `o` is row `q` of `columns` (the pixel's inputs, `stride` values, a multiple of
/// [`DOT_LANES`], zero past `terms`) times row `o` of `weights` (`terms` int8 weights per
/// channel), for `q` below `valid`. `columns` holds a multiple of [`DOT_PIXELS`] rows, those
/// from `valid` on zero.
pub(crate) struct DotProducts<'a> {
    pub(crate) columns: &'a [i16],
    pub(crate) stride: usize,
    pub(crate) weights: &'a [i8],
    pub(crate) terms: usize,
    pub(crate) out_plane: usize,
    pub(crate) first_pixel: usize,
    pub(crate) valid: usize,
}

impl DotProducts<'_> {
    /// Add each output's dot product to `sums` (`[channel][out_plane]`, one group's channels),
    /// with `tail` as scratch for rows that end too near the end of `weights` to be read a
    /// whole vector at a time. `false`, nothing added, where the buffers do not hold what they
    /// should; the caller then runs the generic kernel.
    ///
    /// Blocks of 2 channels by 4 pixels (4 channels of one pixel where there is one): per 16
    /// terms, a widened load of each channel's weights, a load of each pixel's columns and 8
    /// multiply-adds. With `vnni` (whose CPU must have it), each multiply-add is one
    /// `vpdpwssd`, and with AVX-512's 32 vector registers the blocks are 4 channels by 4
    /// pixels (on EfficientNet-B0-64's 4x4 and 2x2 pointwise layers, 0.80 of the `vpmaddwd`
    /// blocks' time, `layer_speed --steps` on an Intel Xeon with AVX-512 VNNI). A row's values past its terms meet the
    /// columns' zeros, so whole vectors are read even where they run into the next row.
    ///
    /// # Safety
    /// The CPU must have `vnni`'s encoding, where one is given.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn add_to(
        &self,
        vnni: Option<Vnni>,
        tail: &mut Vec<i8>,
        sums: &mut [i32],
    ) -> bool {
        let pixels = self.columns.len() / self.stride.max(1);
        let channels = sums.len() / self.out_plane.max(1);
        let holds = self.stride.is_multiple_of(DOT_LANES)
            && self.stride >= self.terms
            && pixels.is_multiple_of(DOT_PIXELS)
            && self.valid <= pixels
            && self.first_pixel + self.valid <= self.out_plane
            && self.weights.len() >= channels * self.terms;
        if !holds {
            return false;
        }
        // SAFETY (the VNNI forms): the caller found that this CPU has the encoding.
        match (self.valid, vnni) {
            (1, None) => blocks_avx2::<4, 1>(self, tail, sums),
            (_, None) => blocks_avx2::<2, DOT_PIXELS>(self, tail, sums),
            (1, Some(Vnni::Avx)) => unsafe { blocks_avx_vnni::<4, 1>(self, tail, sums) },
            (_, Some(Vnni::Avx)) => unsafe { blocks_avx_vnni::<2, DOT_PIXELS>(self, tail, sums) },
            (1, Some(Vnni::Avx512)) => unsafe { blocks_avx512_vnni::<4, 1>(self, tail, sums) },
            (_, Some(Vnni::Avx512)) => unsafe {
                blocks_avx512_vnni::<4, DOT_PIXELS>(self, tail, sums)
            },
        }
    }
}

/// A pointwise layer of one group on a plane of 4, 8, 12 or 16 pixels (`geometry`), 16 output
/// channels to a 512-bit vector and every pixel at once: per pair of input channels, each
/// pixel's two values broadcast as one word (`pairs`, laid out pair by pair), and one
/// `vpdpwssd` per pixel against 16 channels' weight pairs, widened from the bytes of `words`
/// (per vector of 16 output channels, the channels padded to whole vectors, per pair of input
/// channels, each channel's two weights: one stream per vector, as
/// [`crate::int16::Conv16Prepared`] lays them out). Each weight is read once
/// per layer (a small plane's layer is bound by reading its weights) and no sum is reduced
/// across lanes. Each sum is added to `sums` (`[channel][plane]`). `false`, nothing added,
/// where the buffers do not fit the geometry.
///
/// # Safety
/// The CPU must have AVX-512 VNNI and BW.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni")]
#[allow(clippy::indexing_slicing)]
pub(crate) unsafe fn pointwise_lanes(
    geometry: &ConvGeometry,
    values: &[i16],
    words: &[i32],
    pairs: &mut Vec<i32>,
    sums: &mut [i32],
) -> bool {
    let [icg, h, w] = geometry.input;
    let oc = geometry.output[0];
    let plane = h * w;
    let (pair_count, lanes) = (icg.div_ceil(2), oc.div_ceil(16) * 16);
    if values.len() != icg * plane
        || sums.len() != oc * plane
        || words.len() * 2 != pair_count * lanes
        || !matches!(plane, 4 | 8 | 12 | 16)
    {
        return false;
    }
    // Pair by pair of input channels, each pixel's two values as a word, the first in the
    // low half (a last channel without a partner beside a zero, which meets a zero weight):
    // broadcast straight from memory.
    pairs.clear();
    pairs.resize(pair_count * plane, 0);
    for (ic, channel) in values.chunks_exact(plane).enumerate() {
        let (row, shift) = ((ic / 2) * plane, 16 * (ic % 2));
        for (word, &x) in pairs[row..row + plane].iter_mut().zip(channel) {
            *word |= i32::from(x as u16) << shift;
        }
    }
    let layer = LanesLayer {
        pairs,
        pair_count,
        words,
        lanes,
        channels: oc,
    };
    // SAFETY (each arm): as the caller promises.
    unsafe {
        match plane {
            4 => lanes_blocks::<4, 4>(&layer, sums),
            8 => lanes_blocks::<2, 8>(&layer, sums),
            12 => lanes_blocks::<1, 12>(&layer, sums),
            _ => lanes_blocks::<1, 16>(&layer, sums),
        }
    }
    true
}

/// What [`lanes_block`] reads of a layer [`pointwise_lanes`] runs.
struct LanesLayer<'a> {
    /// Pair by pair of input channels, each pixel's two values as a word.
    pairs: &'a [i32],
    pair_count: usize,
    /// Per vector of 16 output channels, per pair of input channels, the 16 channels' two
    /// weights (bytes, four to a word).
    words: &'a [i32],
    lanes: usize,
    channels: usize,
}

/// Every output channel of [`pointwise_lanes`]' layer on a plane of `P` pixels: blocks of `V`
/// vectors of channels, then single vectors.
///
/// # Safety
/// The CPU must have AVX-512 VNNI and BW.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn lanes_blocks<const V: usize, const P: usize>(layer: &LanesLayer<'_>, sums: &mut [i32]) {
    let whole = layer.lanes / (16 * V) * (16 * V);
    for first in (0..whole).step_by(16 * V) {
        // SAFETY: as the caller promises.
        unsafe { lanes_block::<V, P>(layer, first, sums) };
    }
    for first in (whole..layer.lanes).step_by(16) {
        // SAFETY: as the caller promises.
        unsafe { lanes_block::<1, P>(layer, first, sums) };
    }
}

/// The sums of output channels `first..first + 16 * V` over a plane of `P` pixels, added to
/// `sums`; `V` and `P` constants (`V * P` at most 16) so that the accumulators stay in
/// registers.
///
/// # Safety
/// The CPU must have AVX-512 VNNI and BW.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni")]
#[inline]
#[allow(clippy::indexing_slicing)]
unsafe fn lanes_block<const V: usize, const P: usize>(
    layer: &LanesLayer<'_>,
    first: usize,
    sums: &mut [i32],
) {
    let mut acc = [[_mm512_setzero_si512(); P]; V];
    for j in 0..layer.pair_count {
        let pixels = &layer.pairs[j * P..][..P];
        let x: [__m512i; P] = core::array::from_fn(|q| _mm512_set1_epi32(pixels[q]));
        for (v, acc) in acc.iter_mut().enumerate() {
            // The vector's 16 channels' two weights for this pair: 32 bytes, 8 words.
            let row = &layer.words[((first / 16 + v) * layer.pair_count + j) * 8..][..8];
            // SAFETY: 8 i32 of `row`, 32 bytes, read unaligned.
            let bytes = unsafe { _mm256_loadu_si256(row.as_ptr().cast()) };
            let weights = _mm512_cvtepi8_epi16(bytes);
            for (acc, &x) in acc.iter_mut().zip(&x) {
                *acc = _mm512_dpwssd_epi32(*acc, x, weights);
            }
        }
    }
    for (v, acc) in acc.iter().enumerate() {
        for (q, &vector) in acc.iter().enumerate() {
            let mut lane_sums = [0i32; 16];
            // SAFETY: 16 i32, 64 bytes.
            unsafe { _mm512_storeu_si512(lane_sums.as_mut_ptr().cast(), vector) };
            let channels = (first + v * 16..layer.channels).take(16);
            for (o, &sum) in channels.zip(&lane_sums) {
                sums[o * P + q] += sum;
            }
        }
    }
}

/// Store the sums of the two halves `vpunpcklwd` and `vpunpckhwd` made (`low`: lanes 0-3 and
/// 8-11 of the 16 interleaved, `high`: 4-7 and 12-15) into `out`'s first 16 values, in order.
#[target_feature(enable = "avx2")]
#[inline]
fn store_unpacked(low: __m256i, high: __m256i, out: &mut [i32]) {
    if let Some(out) = out.get_mut(..16) {
        // SAFETY: 16 i32, two vectors of 32 bytes.
        unsafe {
            _mm256_storeu_si256(
                out.as_mut_ptr().cast(),
                _mm256_permute2x128_si256::<0x20>(low, high),
            );
            _mm256_storeu_si256(
                out.as_mut_ptr().add(8).cast(),
                _mm256_permute2x128_si256::<0x31>(low, high),
            );
        }
    }
}

/// `acc` plus `a` times `b`, 16-bit pairs multiplied and summed into 32-bit lanes
/// (`vpmaddwd`, then `vpaddd`); `vpdpwssd` does both in one instruction on a VNNI CPU.
#[target_feature(enable = "avx2")]
#[inline]
fn multiply_add(acc: __m256i, a: __m256i, b: __m256i) -> __m256i {
    _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
}

/// [`DotProducts::add_to`] in blocks of `C` channels by `P` pixels (`C * P` a multiple of 4:
/// the vectors summed, four at a time, at the end of a block), compiled for `$features` with `$dot` as the
/// multiply-add (every form is exact and wraps alike: the same sums).
macro_rules! dot_blocks {
    ($name:ident, $features:literal, $dot:path) => {
        #[target_feature(enable = $features)]
        fn $name<const C: usize, const P: usize>(
            layer: &DotProducts<'_>,
            tail: &mut Vec<i8>,
            sums: &mut [i32],
        ) -> bool {
            let (stride, terms) = (layer.stride, layer.terms);
            let weights = layer.weights;
            let channels = sums.len() / layer.out_plane.max(1);
            // Rows whose whole vectors would run past `weights` (`oc * terms + stride` past its
            // end): copied, zero-padded, into `tail`.
            let copied_from = match weights.len().checked_sub(stride) {
                Some(room) => room / terms.max(1) + 1,
                None => 0,
            };
            tail.clear();
            tail.resize(C * stride, 0);
            for o in (0..channels).step_by(C) {
                // A last block past the last channel repeats it (and adds nothing for it).
                let block: [usize; C] = core::array::from_fn(|k| (o + k).min(channels - 1));
                for (slot, &oc) in block.iter().enumerate() {
                    let row = &weights[oc * terms..][..terms];
                    if oc >= copied_from {
                        let dst = &mut tail[slot * stride..][..stride];
                        dst.fill(0);
                        dst[..terms].copy_from_slice(row);
                    }
                }
                let rows: [&[i8]; C] =
                    core::array::from_fn(|slot| match block[slot] >= copied_from {
                        true => &tail[slot * stride..][..stride],
                        false => &weights[block[slot] * terms..][..stride],
                    });
                for p in (0..layer.valid).step_by(P) {
                    let mut acc = [[_mm256_setzero_si256(); P]; C];
                    let pixels = &layer.columns[p * stride..][..P * stride];
                    for k in (0..stride).step_by(DOT_LANES) {
                        // SAFETY: each row holds `stride` values, each column row too, and
                        // `k + 16 <= stride`.
                        let w = rows.map(|row| unsafe {
                            _mm256_cvtepi8_epi16(_mm_loadu_si128(row.as_ptr().add(k).cast()))
                        });
                        for (q, column) in pixels.chunks_exact(stride).enumerate() {
                            // SAFETY: as above.
                            let x = unsafe { _mm256_loadu_si256(column.as_ptr().add(k).cast()) };
                            for (acc, &w) in acc.iter_mut().zip(&w) {
                                acc[q] = $dot(acc[q], w, x);
                            }
                        }
                    }
                    // The block's totals, channel by channel, pixel by pixel.
                    let mut totals = [[0i32; P]; C];
                    let flat = acc.as_flattened();
                    for (quad, out) in flat
                        .chunks_exact(4)
                        .zip(totals.as_flattened_mut().chunks_exact_mut(4))
                    {
                        if let (Ok(quad), Ok(out)) =
                            (quad.try_into(), <&mut [i32; 4]>::try_from(out))
                        {
                            *out = horizontal_sums(quad);
                        }
                    }
                    for (&oc, totals) in block.iter().zip(&totals).take(channels - o) {
                        let row =
                            &mut sums[oc * layer.out_plane + layer.first_pixel..][..layer.valid];
                        for (sum, &total) in row.iter_mut().skip(p).zip(totals) {
                            *sum += total;
                        }
                    }
                }
            }
            true
        }
    };
}

dot_blocks!(blocks_avx2, "avx2", multiply_add);
dot_blocks!(blocks_avx_vnni, "avx2,avxvnni", _mm256_dpwssd_avx_epi32);
dot_blocks!(
    blocks_avx512_vnni,
    "avx2,avx512vnni,avx512vl",
    _mm256_dpwssd_epi32
);

/// The sum of each of four vectors' lanes.
#[target_feature(enable = "avx2")]
fn horizontal_sums(vectors: &[__m256i; 4]) -> [i32; 4] {
    let [a, b, c, d] = *vectors;
    // Within each 128-bit half: a's, b's, c's and d's sums, in that order.
    let pairs = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    let sums = _mm_add_epi32(
        _mm256_castsi256_si128(pairs),
        _mm256_extracti128_si256::<1>(pairs),
    );
    let mut out = [0i32; 4];
    // SAFETY: 4 i32, 16 bytes.
    unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), sums) };
    out
}

/// Whether the vector requantisation by a scale of `shift` into `output` gives the scalar
/// codes exactly: a scale below 1 (so every product fits 32 bits) and a zero point small enough
/// that every clamped value and its offset stay inside 32 bits (the compiler's are 0 or int8
/// codes).
fn exact(output: &WideOutput, shift: i8) -> bool {
    shift <= 0 && output.zero_point.unsigned_abs() <= 1 << 16
}

/// The vector requantisation of `requant` into `output`, where it is [`exact`]. The width's
/// range is folded into the clamp: the same codes as clamping to both in turn.
#[target_feature(enable = "avx2")]
fn output_lanes(output: &WideOutput, requant: Requant) -> Option<Lanes> {
    if !exact(output, requant.shift) {
        return None;
    }
    let (lo, hi) = output.width.range();
    let (min, max) = (output.min.clamp(lo, hi), output.max.clamp(lo, hi));
    Some(Lanes::with_range(requant, output.zero_point, min, max))
}

/// Store 8 codes (each within `width`'s range) as the first 8 values of `dst`.
#[target_feature(enable = "avx2")]
fn store_codes(codes: __m256i, width: Width, dst: &mut [i8]) {
    if dst.len() < 8 * width.bytes() {
        return;
    }
    // Within each 128-bit half: the half's four codes twice, as `i16`; then the two halves'
    // first copies side by side.
    let packed = _mm256_packs_epi32(codes, codes);
    let words = _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b1000>(packed));
    // SAFETY: `dst` holds 8 values: 16 bytes, or 8 (the low half of the narrowed vector).
    unsafe {
        match width {
            Width::I16 => _mm_storeu_si128(dst.as_mut_ptr().cast(), words),
            Width::I8 => _mm_storel_epi64(dst.as_mut_ptr().cast(), _mm_packs_epi16(words, words)),
        }
    }
}

/// Eight 16-bit codes from the first 16 bytes of `bytes`, widened to `i32`.
#[target_feature(enable = "avx2")]
fn load_codes16(bytes: &[i8]) -> __m256i {
    match bytes.get(..16) {
        // SAFETY: 16 bytes.
        Some(bytes) => _mm256_cvtepi16_epi32(unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) }),
        None => _mm256_setzero_si256(),
    }
}

/// [`WideOutput::store_row`]'s work eight values at a time: each of `sums` requantised by
/// `requant` into `out` (their bytes at `output`'s width). `false`, nothing written, where the
/// vector requantisation is not exact ([`output_lanes`]) or `out` is not `sums`' size.
#[target_feature(enable = "avx2")]
pub(crate) fn store_row(
    output: &WideOutput,
    out: &mut [i8],
    sums: &[i32],
    requant: Requant,
) -> bool {
    let bytes = output.width.bytes();
    let Some(lanes) = output_lanes(output, requant).filter(|_| out.len() == sums.len() * bytes)
    else {
        return false;
    };
    let whole = sums.len() / 8 * 8;
    for (chunk, dst) in sums[..whole]
        .chunks_exact(8)
        .zip(out.chunks_exact_mut(8 * bytes))
    {
        // SAFETY: 8 i32, 32 bytes.
        let sums = unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) };
        store_codes(requantize8(sums, &lanes), output.width, dst);
    }
    for (i, &sum) in sums.iter().enumerate().skip(whole) {
        output.width.store(out, i, output.code(requant.apply(sum)));
    }
    true
}

/// Whether every channel's requantisation into `output` is [`exact`] in vectors: then
/// [`store_block`] may write a layer's blocks.
pub(crate) fn stores_exactly(output: &WideOutput, channels: &ChannelQuant<'_>) -> bool {
    channels.shift.iter().all(|&shift| exact(output, shift))
}

/// One block of a pointwise layer's sums (`acc`, channels `first..first + 4` by pixels
/// `p..p + 16`, without their bias) with each channel's bias added, requantised and stored
/// into `out` (the layer's output bytes, `plane` values per channel), skipping the round trip
/// through the sums' buffer. The caller checked [`stores_exactly`].
#[target_feature(enable = "avx2")]
pub(crate) fn store_block(
    output: &WideOutput,
    channels: &ChannelQuant<'_>,
    first: usize,
    acc: &[[i32; BLOCK_PIXELS]; BLOCK_CHANNELS],
    out: &mut [i8],
    plane: usize,
    p: usize,
) {
    let bytes = output.width.bytes();
    for (k, row) in acc.iter().enumerate() {
        let (bias, requant) = channels.get(first + k);
        let Some(lanes) = output_lanes(output, requant) else {
            return;
        };
        let bias = _mm256_set1_epi32(bias);
        let Some(dst) = out.get_mut(((first + k) * plane + p) * bytes..) else {
            return;
        };
        for (half, dst) in row.chunks_exact(8).zip(dst.chunks_exact_mut(8 * bytes)) {
            // SAFETY: 8 i32, 32 bytes.
            let sums = unsafe { _mm256_loadu_si256(half.as_ptr().cast()) };
            let codes = requantize8(_mm256_add_epi32(sums, bias), &lanes);
            store_codes(codes, output.width, dst);
        }
    }
}

/// Every channel's sums of a layer whose planes are smaller than a vector (`out_plane` below
/// 8) requantised into `out` eight values at a time across channels, each lane by its own
/// channel's multiplier and shift (read from the plan's slices eight channels at a time and
/// spread over the lanes by a permute). `false` where the buffers do not match (the caller
/// then writes every value itself); the caller checked [`stores_exactly`].
#[target_feature(enable = "avx2")]
pub(crate) fn store_small_planes(
    output: &WideOutput,
    out: &mut [i8],
    sums: &[i32],
    channels: &ChannelQuant<'_>,
    out_plane: usize,
) -> bool {
    let bytes = output.width.bytes();
    let unit = Requant {
        multiplier: 1 << 30,
        shift: 0,
    };
    let count = sums.len() / out_plane.max(1);
    let Some(lanes) = output_lanes(output, unit).filter(|_| {
        (1..8).contains(&out_plane)
            && out.len() == sums.len() * bytes
            && channels.fits(count)
            && sums.len() == count * out_plane
    }) else {
        return false;
    };
    // For a chunk starting `r` values into a channel's plane: each lane's channel, counted
    // from the chunk's first.
    let spread: [__m256i; 8] = core::array::from_fn(|r| {
        let lane = |j: i32| (r as i32 + j) / out_plane as i32;
        _mm256_setr_epi32(
            lane(0),
            lane(1),
            lane(2),
            lane(3),
            lane(4),
            lane(5),
            lane(6),
            lane(7),
        )
    });
    let (one, thirty_one) = (_mm256_set1_epi64x(1), _mm256_set1_epi32(31));
    // The chunks whose eight channels' constants are all there to load.
    let whole = (count.saturating_sub(8) * out_plane + 1).min(sums.len()) / 8 * 8;
    for (i, (chunk, dst)) in sums[..whole]
        .chunks_exact(8)
        .zip(out.chunks_exact_mut(8 * bytes))
        .enumerate()
    {
        let first = 8 * i;
        let channel = first / out_plane;
        let (Some(multipliers), Some(shifts)) = (
            channels.multiplier.get(channel..channel + 8),
            channels.shift.get(channel..channel + 8),
        ) else {
            return false;
        };
        let spread = spread[first % out_plane];
        // SAFETY: 8 i32 (32 bytes) each; 8 i8 (8 bytes).
        let (sums, multipliers, shifts) = unsafe {
            (
                _mm256_loadu_si256(chunk.as_ptr().cast()),
                _mm256_loadu_si256(multipliers.as_ptr().cast()),
                _mm256_cvtepi8_epi32(_mm_loadl_epi64(shifts.as_ptr().cast())),
            )
        };
        let multipliers = _mm256_permutevar8x32_epi32(multipliers, spread);
        // Right shifts of 31 to 62 (the caller checked shifts of 0 and below; clamped at the
        // smallest as `Requant::apply` does).
        let shifts = _mm256_max_epi32(shifts, _mm256_set1_epi32(i32::from(Requant::MIN_SHIFT)));
        let right = _mm256_sub_epi32(thirty_one, _mm256_permutevar8x32_epi32(shifts, spread));
        // `round(acc * m * 2^-right)`, rounding half up, as `Requant::apply`: exact in 64 bits,
        // within 32 bits for a right shift of 31 or more. Even lanes, then odd ones.
        let scale = |acc: __m256i, m: __m256i, right: __m256i| {
            let right = _mm256_and_si256(right, _mm256_set1_epi64x(0xff));
            let round = _mm256_sllv_epi64(one, _mm256_sub_epi64(right, one));
            let v = _mm256_add_epi64(_mm256_mul_epi32(acc, m), round);
            let sign = _mm256_cmpgt_epi64(_mm256_setzero_si256(), v);
            _mm256_xor_si256(_mm256_srlv_epi64(_mm256_xor_si256(v, sign), right), sign)
        };
        let even = scale(sums, multipliers, right);
        let odd = scale(
            _mm256_srli_epi64::<32>(sums),
            _mm256_srli_epi64::<32>(multipliers),
            _mm256_srli_epi64::<32>(right),
        );
        let scaled = _mm256_blend_epi32::<0b1010_1010>(even, _mm256_slli_epi64::<32>(odd));
        let codes = _mm256_add_epi32(
            _mm256_min_epi32(_mm256_max_epi32(scaled, lanes.low), lanes.high),
            lanes.zero_point,
        );
        store_codes(codes, output.width, dst);
    }
    for (i, &sum) in sums.iter().enumerate().skip(whole) {
        let requant = channels.get(i / out_plane).1;
        output.width.store(out, i, output.code(requant.apply(sum)));
    }
    true
}

/// [`GlobalAveragePool16::run`] with each channel's sum made sixteen values to a vector
/// (`vpmaddwd` by ones: pairs summed into `i32` lanes, exact for planes under 2^16 values; the
/// generic kernel for larger planes and those under 16 values), then requantised as the
/// generic kernel does.
#[target_feature(enable = "avx2")]
pub(crate) fn global_average_pool16(
    pool: &GlobalAveragePool16,
    input: &[i8],
    output: &mut [i8],
) -> Result<(), ShapeError> {
    let plane = pool.plane(input, output)?;
    // Planes under a vector: the generic sums (a vector's setup would cost more).
    if !(16..1 << 16).contains(&plane) {
        return pool.run(input, output);
    }
    let ones = _mm256_set1_epi16(1);
    let whole = plane / 16 * 16;
    for (c, channel) in input.chunks_exact(2 * plane).enumerate() {
        let mut sums = _mm256_setzero_si256();
        for values in channel[..2 * whole].chunks_exact(32) {
            // SAFETY: 16 values, 32 bytes.
            let values = unsafe { _mm256_loadu_si256(values.as_ptr().cast()) };
            sums = _mm256_add_epi32(sums, _mm256_madd_epi16(values, ones));
        }
        let mut lanes = [0i32; 8];
        // SAFETY: 8 i32, 32 bytes.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), sums) };
        let rest: i64 = (whole..plane)
            .map(|i| i64::from(Width::I16.load(channel, i)))
            .sum();
        let sum = lanes.iter().map(|&s| i64::from(s)).sum::<i64>() + rest;
        pool.output.write(output, c, sum, pool.requant);
    }
    Ok(())
}

/// [`Mul16::run`] eight values at a time where the vector requantisation is exact
/// ([`output_lanes`]; a product of two 16-bit codes fits 32 bits), else the generic kernel.
#[target_feature(enable = "avx2")]
pub(crate) fn mul16(mul: &Mul16, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
    let plane = mul.plane(a, b, output)?;
    let Some(lanes) = output_lanes(&mul.output, mul.requant) else {
        return mul.run(a, b, output);
    };
    let bytes = mul.output.width.bytes();
    let whole = plane / 8 * 8;
    for ((xs, y), out) in a
        .chunks_exact(2 * plane)
        .zip(b.chunks_exact(2))
        .zip(output.chunks_exact_mut(plane * bytes))
    {
        let y = match *y {
            [lo, hi] => i32::from(i16::from_le_bytes([lo as u8, hi as u8])),
            _ => 0,
        };
        let factor = _mm256_set1_epi32(y);
        for (x, dst) in xs[..2 * whole]
            .chunks_exact(16)
            .zip(out.chunks_exact_mut(8 * bytes))
        {
            let products = _mm256_mullo_epi32(load_codes16(x), factor);
            store_codes(requantize8(products, &lanes), mul.output.width, dst);
        }
        for i in whole..plane {
            let x = Width::I16.load(xs, i);
            mul.output
                .width
                .store(out, i, mul.output.code(mul.requant.apply(x * y)));
        }
    }
    Ok(())
}

/// [`Function16::run`] eight values at a time: one gather reads both table entries around each
/// value (its 32 bits at entry `k` are entries `k` and `k + 1`), then the same integer
/// interpolation.
#[target_feature(enable = "avx2")]
pub(crate) fn function16(
    function: &Function16<'_>,
    input: &[i8],
    output: &mut [i8],
) -> Result<(), ShapeError> {
    function.check(input, output)?;
    if super::has_avx512bw() {
        // SAFETY: the CPU has AVX-512 F and BW.
        unsafe { function16_avx512(function, input, output) };
        return Ok(());
    }
    let table = function.table;
    let whole = input.len() / 16 * 16;
    let bottom = _mm256_set1_epi32(-i32::from(i16::MIN));
    let (mask, half) = (
        _mm256_set1_epi32(FUNCTION16_SEGMENT - 1),
        _mm256_set1_epi32(FUNCTION16_SEGMENT / 2),
    );
    for (x, dst) in input[..whole]
        .chunks_exact(16)
        .zip(output.chunks_exact_mut(16))
    {
        let from_bottom = _mm256_add_epi32(load_codes16(x), bottom);
        // Segment `k` (0 to 1023 for codes of 16 bits) and the place in it.
        let k = _mm256_srli_epi32::<6>(from_bottom);
        let fraction = _mm256_and_si256(from_bottom, mask);
        // SAFETY: entry `k + 1` is at most 1024, the table's last (`check`): the 4 bytes read
        // at entry `k` are inside it.
        let pair = unsafe { _mm256_i32gather_epi32::<2>(table.as_ptr().cast(), k) };
        let low = _mm256_srai_epi32::<16>(_mm256_slli_epi32::<16>(pair));
        let high = _mm256_srai_epi32::<16>(pair);
        let step = _mm256_mullo_epi32(_mm256_sub_epi32(high, low), fraction);
        let codes = _mm256_add_epi32(low, _mm256_srai_epi32::<6>(_mm256_add_epi32(step, half)));
        store_codes(codes, Width::I16, dst);
    }
    for i in whole / 2..input.len() / 2 {
        Width::I16.store(output, i, function.code(Width::I16.load(input, i)));
    }
    Ok(())
}

/// [`function16`] sixteen values to a gather, in 512-bit vectors, for buffers it checked.
///
/// # Safety
/// The CPU must have AVX-512 F and BW.
#[target_feature(enable = "avx2,avx512f,avx512bw")]
unsafe fn function16_avx512(function: &Function16<'_>, input: &[i8], output: &mut [i8]) {
    let table = function.table;
    let whole = input.len() / 32 * 32;
    let bottom = _mm512_set1_epi32(-i32::from(i16::MIN));
    let (mask, half) = (
        _mm512_set1_epi32(FUNCTION16_SEGMENT - 1),
        _mm512_set1_epi32(FUNCTION16_SEGMENT / 2),
    );
    for (x, dst) in input[..whole]
        .chunks_exact(32)
        .zip(output.chunks_exact_mut(32))
    {
        // SAFETY: 16 codes, 32 bytes.
        let codes = _mm512_cvtepi16_epi32(unsafe { _mm256_loadu_si256(x.as_ptr().cast()) });
        let from_bottom = _mm512_add_epi32(codes, bottom);
        // Segment `k` (0 to 1023 for codes of 16 bits) and the place in it.
        let k = _mm512_srli_epi32::<6>(from_bottom);
        let fraction = _mm512_and_si512(from_bottom, mask);
        // SAFETY: entry `k + 1` is at most 1024, the table's last (`check`): the 4 bytes read
        // at entry `k` are inside it.
        let pair = unsafe { _mm512_i32gather_epi32::<2>(k, table.as_ptr().cast()) };
        let low = _mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(pair));
        let high = _mm512_srai_epi32::<16>(pair);
        let step = _mm512_mullo_epi32(_mm512_sub_epi32(high, low), fraction);
        let codes = _mm512_add_epi32(low, _mm512_srai_epi32::<6>(_mm512_add_epi32(step, half)));
        // Each code lies between two table entries: narrowing to 16 bits keeps it.
        // SAFETY: 16 codes of 16 bits, 32 bytes.
        unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), _mm512_cvtepi32_epi16(codes)) };
    }
    for i in whole / 2..input.len() / 2 {
        Width::I16.store(output, i, function.code(Width::I16.load(input, i)));
    }
}

/// One block of [`crate::int16::Conv16`]'s pointwise layers on large planes: the block's 4
/// output channels' sums over pixels `p..p + 16` of `inputs` (a group's input channels, `plane`
/// values each) into `acc`, two input channels per multiply-add (their values interleaved per
/// pixel, against `pairs`, each channel's weight pairs in turn), `vpdpwssd` with `vnni`.
///
/// # Safety
/// The CPU must have AVX2, and `vnni`'s encoding where one is given.
pub(crate) unsafe fn pointwise_block(
    vnni: Option<Vnni>,
    inputs: &[i16],
    pairs: &[i32],
    plane: usize,
    p: usize,
    acc: &mut [[i32; BLOCK_PIXELS]; BLOCK_CHANNELS],
) {
    // SAFETY: as the caller promises.
    unsafe {
        match vnni {
            None => pointwise_block_avx2(inputs, pairs, plane, p, acc),
            Some(Vnni::Avx) => pointwise_block_avx_vnni(inputs, pairs, plane, p, acc),
            Some(Vnni::Avx512) => pointwise_block_avx512_vnni(inputs, pairs, plane, p, acc),
        }
    }
}

/// [`pointwise_block`] compiled for `$features` with `$dot` as the multiply-add.
macro_rules! pointwise_block {
    ($name:ident, $features:literal, $dot:path) => {
        #[target_feature(enable = $features)]
        #[allow(clippy::indexing_slicing)]
        fn $name(
            inputs: &[i16],
            pairs: &[i32],
            plane: usize,
            p: usize,
            acc: &mut [[i32; BLOCK_PIXELS]; BLOCK_CHANNELS],
        ) {
            let icg = inputs.len() / plane.max(1);
            let pairs_per_channel = pairs.len() / BLOCK_CHANNELS;
            let load = |ic: usize| {
                let values = &inputs[ic * plane + p..ic * plane + p + BLOCK_PIXELS];
                // SAFETY: 16 values, 32 bytes, read unaligned.
                unsafe { _mm256_loadu_si256(values.as_ptr().cast()) }
            };
            let pair =
                |k: usize, ic: usize| _mm256_set1_epi32(pairs[k * pairs_per_channel + ic / 2]);
            let (mut low, mut high) = (
                [_mm256_setzero_si256(); BLOCK_CHANNELS],
                [_mm256_setzero_si256(); BLOCK_CHANNELS],
            );
            for ic in (0..icg).step_by(2) {
                let a = load(ic);
                // A last channel without a partner meets a zero weight (and zero values).
                let b = if ic + 1 < icg {
                    load(ic + 1)
                } else {
                    _mm256_setzero_si256()
                };
                // Within each 128-bit lane: pixels 0-3 (8-11) in `lo`, 4-7 (12-15) in `hi`.
                let (lo, hi) = (_mm256_unpacklo_epi16(a, b), _mm256_unpackhi_epi16(a, b));
                for k in 0..BLOCK_CHANNELS {
                    let w = pair(k, ic);
                    low[k] = $dot(low[k], lo, w);
                    high[k] = $dot(high[k], hi, w);
                }
            }
            for (k, row) in acc.iter_mut().enumerate() {
                store_unpacked(low[k], high[k], row);
            }
        }
    };
}

pointwise_block!(pointwise_block_avx2, "avx2", multiply_add);
pointwise_block!(
    pointwise_block_avx_vnni,
    "avx2,avxvnni",
    _mm256_dpwssd_avx_epi32
);
pointwise_block!(
    pointwise_block_avx512_vnni,
    "avx2,avx512vnni,avx512vl",
    _mm256_dpwssd_epi32
);

/// [`pointwise_block`] for two blocks of pixels at once (`p..p + 32`, into `accs[0]` and
/// `accs[1]`) in 512-bit vectors: each multiply-add covers 32 pixels' pairs where the 256-bit
/// form covers 16.
///
/// # Safety
/// The CPU must have AVX-512 VNNI and BW.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni")]
#[allow(clippy::indexing_slicing)]
pub(crate) unsafe fn pointwise_block_pair(
    inputs: &[i16],
    pairs: &[i32],
    plane: usize,
    p: usize,
    accs: &mut [[[i32; BLOCK_PIXELS]; BLOCK_CHANNELS]; 2],
) {
    let icg = inputs.len() / plane.max(1);
    let pairs_per_channel = pairs.len() / BLOCK_CHANNELS;
    let load = |ic: usize| {
        let values = &inputs[ic * plane + p..ic * plane + p + 2 * BLOCK_PIXELS];
        // SAFETY: 32 values, 64 bytes, read unaligned.
        unsafe { _mm512_loadu_si512(values.as_ptr().cast()) }
    };
    let (mut low, mut high) = (
        [_mm512_setzero_si512(); BLOCK_CHANNELS],
        [_mm512_setzero_si512(); BLOCK_CHANNELS],
    );
    for ic in (0..icg).step_by(2) {
        let a = load(ic);
        // A last channel without a partner meets a zero weight (and zero values).
        let b = if ic + 1 < icg {
            load(ic + 1)
        } else {
            _mm512_setzero_si512()
        };
        // Within each 128-bit lane `i`: pixels 8i to 8i + 3 in `lo`, 8i + 4 to 8i + 7 in `hi`.
        let (lo, hi) = (_mm512_unpacklo_epi16(a, b), _mm512_unpackhi_epi16(a, b));
        for k in 0..BLOCK_CHANNELS {
            let w = _mm512_set1_epi32(pairs[k * pairs_per_channel + ic / 2]);
            low[k] = _mm512_dpwssd_epi32(low[k], lo, w);
            high[k] = _mm512_dpwssd_epi32(high[k], hi, w);
        }
    }
    // Pixels in order: lanes 0 of `lo` and `hi`, then 1 of each (the first 16), then 2 and 3.
    let first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    let second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for k in 0..BLOCK_CHANNELS {
        for (acc, order) in accs.iter_mut().zip([first, second]) {
            let sums = _mm512_permutex2var_epi32(low[k], order, high[k]);
            // SAFETY: 16 i32, 64 bytes.
            unsafe { _mm512_storeu_si512(acc[k].as_mut_ptr().cast(), sums) };
        }
    }
}

/// Eight pixels (from `at` in each plane, `plane` values apart) of 16 channels (`planes`),
/// transposed into `out`: pixel by pixel, each pixel's 16 channels side by side. Nothing where
/// the buffers are too short.
#[target_feature(enable = "avx2")]
fn transpose_16x8(planes: &[i16], plane: usize, at: usize, out: &mut [i16]) {
    if planes.len() < 15 * plane + at + 8 || out.len() < 8 * 16 {
        return;
    }
    // Row `k`: channel `k`'s 8 values in the low half, channel `k + 8`'s in the high half; the
    // same unpacks on both halves then transpose two 8x8 blocks at once.
    let row = |k: usize| {
        // SAFETY: 8 values of each plane from `at` (checked above), 16 bytes each.
        unsafe {
            let low = _mm_loadu_si128(planes.as_ptr().add(k * plane + at).cast());
            let high = _mm_loadu_si128(planes.as_ptr().add((k + 8) * plane + at).cast());
            _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(low), high)
        }
    };
    let r: [__m256i; 8] = core::array::from_fn(row);
    // Pairs of channels, then quads, then all eight, per pixel: at each stage, the low and
    // high halves' interleaving of two vectors side by side.
    let t: [__m256i; 8] = core::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        match i % 2 {
            0 => _mm256_unpacklo_epi16(a, b),
            _ => _mm256_unpackhi_epi16(a, b),
        }
    });
    let u: [__m256i; 8] = core::array::from_fn(|i| {
        let (a, b) = (t[i / 4 * 4 + i % 4 / 2], t[i / 4 * 4 + i % 4 / 2 + 2]);
        match i % 2 {
            0 => _mm256_unpacklo_epi32(a, b),
            _ => _mm256_unpackhi_epi32(a, b),
        }
    });
    let pixels: [__m256i; 8] = core::array::from_fn(|i| {
        let (a, b) = (u[i / 2], u[i / 2 + 4]);
        match i % 2 {
            0 => _mm256_unpacklo_epi64(a, b),
            _ => _mm256_unpackhi_epi64(a, b),
        }
    });
    for (pixel, dst) in pixels.iter().zip(out.chunks_exact_mut(16)) {
        // SAFETY: 16 values, 32 bytes.
        unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), *pixel) };
    }
}

/// Channels per block of [`Depthwise::add_to`]: one 16-bit vector's lanes.
const CHANNEL_LANES: usize = 16;
/// Most taps a depthwise window may have for [`Depthwise::add_to`] (an 8x8 window).
const MAX_TAPS: usize = 64;

/// A depthwise layer (one input and one output channel per group) on 16-bit values: the
/// layer's geometry, its input values (`[channel][h][w]`, minus the zero point) and weights
/// (`[channel][kh][kw]`).
pub(crate) struct Depthwise<'a> {
    pub(crate) geometry: &'a ConvGeometry,
    pub(crate) values: &'a [i16],
    pub(crate) weights: &'a [i8],
    /// `vpdpwssd`'s encoding, where the CPU has one.
    pub(crate) vnni: Option<Vnni>,
}

impl Depthwise<'_> {
    /// Add each output's sum to `sums` (`[channel][oh][ow]`), 16 channels at a time in the
    /// lanes: a block's input laid out pixel by pixel inside a zero border (`laid_out`), each
    /// two taps' values interleaved for `vpmaddwd` against the two taps' weights (`words`, as
    /// [`crate::int16::Conv16Prepared`] orders them), every output pixel's 16 sums into
    /// `pixel_sums`, then added to their channels' planes. `false`, nothing added, where the
    /// buffers do not fit the geometry.
    ///
    /// # Safety
    /// The CPU must have [`Depthwise::vnni`]'s encoding, where one is given.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn add_to(
        &self,
        words: &[i32],
        laid_out: &mut Vec<i16>,
        pixel_sums: &mut Vec<i32>,
        sums: &mut [i32],
    ) -> bool {
        let g = self.geometry;
        let [c, h, w] = g.input;
        let [oc, oh, ow] = g.output;
        let [kh, kw] = g.kernel;
        let [sy, sx] = g.stride;
        let [dy, dx] = g.dilation;
        let (taps, out_plane) = (kh * kw, oh * ow);
        if oc != c
            || g.group.max(1) != c
            || self.values.len() != c * h * w
            || self.weights.len() != c * taps
            || sums.len() != c * out_plane
            || out_plane == 0
            || taps == 0
        {
            return false;
        }
        // The padded plane the windows reach (an odd geometry's, larger than the input and
        // its padding, runs the generic kernel).
        let [top, left] = g.pad;
        let Some([hp, wp]) = window_reach(g) else {
            return false;
        };
        // Each tap's offset, then each pair of taps' (a last tap without a partner read twice,
        // against a zero weight the second time): on the stack, as nothing here allocates per
        // call. Windows of more taps (no real layer's) run the generic kernel.
        if taps > MAX_TAPS {
            return false;
        }
        let pairs = taps.div_ceil(2);
        let offsets: [usize; MAX_TAPS] =
            core::array::from_fn(|t| (t / kw) * dy * wp + (t % kw) * dx);
        let offsets = &offsets[..taps];
        let tap_pairs: [(usize, usize); MAX_TAPS / 2] = core::array::from_fn(|pair| {
            let first = offsets.get(2 * pair).copied().unwrap_or(0);
            (first, offsets.get(2 * pair + 1).copied().unwrap_or(first))
        });
        let tap_pairs = &tap_pairs[..pairs];
        laid_out.clear();
        laid_out.resize(hp * wp * CHANNEL_LANES, 0);
        // The last window's last tap: inside the padded plane, so every tap of every window is
        // (the loads below rely on it).
        let last = (oh - 1) * sy * wp + (ow - 1) * sx + offsets.iter().max().copied().unwrap_or(0);
        if (last + 1) * CHANNEL_LANES > laid_out.len() {
            return false;
        }
        pixel_sums.clear();
        pixel_sums.resize(out_plane * CHANNEL_LANES, 0);
        if words.len() != c.div_ceil(CHANNEL_LANES) * pairs * CHANNEL_LANES {
            return false;
        }
        for first in (0..c).step_by(CHANNEL_LANES) {
            let count = CHANNEL_LANES.min(c - first);
            // The block's input, inside the border (which stays zero: every block writes the
            // same places, and a last block's unused lanes only feed sums never added). A whole
            // block's values 8 pixels at a time by transposes, whatever the rows; the rest
            // value by value.
            let planes = &self.values[first * h * w..][..count * h * w];
            let plane = h * w;
            let transposed = match count {
                CHANNEL_LANES => plane / 8 * 8,
                _ => 0,
            };
            // Where input pixel `(y, x)` goes, if inside the padded plane.
            let place = |y: usize, x: usize| {
                let (py, px) = (y + top, x + left);
                (py < hp && px < wp).then_some((py * wp + px) * CHANNEL_LANES)
            };
            let mut eight = [0i16; 8 * CHANNEL_LANES];
            let (mut y, mut x) = (0, 0);
            for at in (0..transposed).step_by(8) {
                transpose_16x8(planes, plane, at, &mut eight);
                for pixel in eight.chunks_exact(CHANNEL_LANES) {
                    if let Some(to) = place(y, x) {
                        laid_out[to..][..CHANNEL_LANES].copy_from_slice(pixel);
                    }
                    x += 1;
                    if x == w {
                        (y, x) = (y + 1, 0);
                    }
                }
            }
            for (lane, values) in planes.chunks_exact(plane.max(1)).enumerate() {
                // From where the transposes stopped, a row at a time (no division per value).
                let (mut y, mut x) = (transposed / w.max(1), transposed % w.max(1));
                for &value in values.iter().skip(transposed) {
                    if let Some(to) = place(y, x) {
                        laid_out[to + lane] = value;
                    }
                    x += 1;
                    if x == w {
                        (y, x) = (y + 1, 0);
                    }
                }
            }
            // The block's weight vectors, once (the low and high unpacks' channels).
            let block_words = &words[first * pairs..][..pairs * CHANNEL_LANES];
            let mut vectors = [[_mm256_setzero_si256(); 2]; MAX_TAPS / 2];
            for (vector, block) in vectors
                .iter_mut()
                .zip(block_words.chunks_exact(CHANNEL_LANES))
            {
                // SAFETY: 16 i32, two vectors of 32 bytes.
                *vector = unsafe {
                    [
                        _mm256_loadu_si256(block.as_ptr().cast()),
                        _mm256_loadu_si256(block.as_ptr().add(8).cast()),
                    ]
                };
            }
            let windows = Windows {
                laid_out,
                size: [oh, ow],
                steps: [sy * wp, sx],
                tap_pairs,
                vectors: &vectors[..pairs],
            };
            // SAFETY: every window's taps lie inside the padded plane (checked above); the
            // caller promised the encoding.
            unsafe {
                match self.vnni {
                    None => windows_avx2(&windows, pixel_sums),
                    Some(Vnni::Avx) => windows_avx_vnni(&windows, pixel_sums),
                    Some(Vnni::Avx512) => windows_avx512_vnni(&windows, pixel_sums),
                }
            }
            for lane in 0..count {
                let plane = &mut sums[(first + lane) * out_plane..][..out_plane];
                for (sum, pixel) in plane.iter_mut().zip(pixel_sums.chunks_exact(CHANNEL_LANES)) {
                    *sum += pixel[lane];
                }
            }
        }
        true
    }
}

/// One block of a depthwise layer's windows over its laid-out input (`laid_out`, 16 channels
/// per padded pixel): `size` output rows and columns, the padded pixels between windows' first
/// taps from row to row and column to column (`steps`), each pair of taps' offsets from the
/// first and their weight vectors.
struct Windows<'a> {
    laid_out: &'a [i16],
    size: [usize; 2],
    steps: [usize; 2],
    tap_pairs: &'a [(usize, usize)],
    vectors: &'a [[__m256i; 2]],
}

/// Each window's 16 sums of [`Windows`] into `pixel_sums` (16 per output pixel, channels in
/// order), compiled for `$features` with `$dot` as the multiply-add.
///
/// # Safety
/// The CPU must have `$features`, and every window's taps must lie inside `laid_out`.
macro_rules! windows {
    ($name:ident, $features:literal, $dot:path) => {
        #[target_feature(enable = $features)]
        unsafe fn $name(windows: &Windows<'_>, pixel_sums: &mut [i32]) {
            let base = windows.laid_out.as_ptr();
            // SAFETY: inside `laid_out` (the caller's promise), 16 values, 32 bytes, read
            // unaligned.
            let load =
                |at: usize| unsafe { _mm256_loadu_si256(base.add(at * CHANNEL_LANES).cast()) };
            let [oh, ow] = windows.size;
            let [row_step, column_step] = windows.steps;
            // Each output pixel's window's first tap, row by row (no division per pixel).
            let origins =
                (0..oh).flat_map(|oy| (0..ow).map(move |ox| oy * row_step + ox * column_step));
            for (origin, out) in origins.zip(pixel_sums.chunks_exact_mut(CHANNEL_LANES)) {
                let (mut low, mut high) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                for (&(first, second), [w_low, w_high]) in
                    windows.tap_pairs.iter().zip(windows.vectors)
                {
                    let (a, b) = (load(origin + first), load(origin + second));
                    low = $dot(low, _mm256_unpacklo_epi16(a, b), *w_low);
                    high = $dot(high, _mm256_unpackhi_epi16(a, b), *w_high);
                }
                // Channels 0-7, then 8-15.
                store_unpacked(low, high, out);
            }
        }
    };
}

windows!(windows_avx2, "avx2", multiply_add);
windows!(windows_avx_vnni, "avx2,avxvnni", _mm256_dpwssd_avx_epi32);
windows!(
    windows_avx512_vnni,
    "avx2,avx512vnni,avx512vl",
    _mm256_dpwssd_epi32
);
