//! x86-64 AVX2 convolution, bit-identical to the generic [`Conv`]:
//!
//! - im2col into 16-bit rows with the input zero point already subtracted (padding becomes 0);
//! - a micro-kernel of 4 output channels by 16 pixels that interleaves two rows and multiplies
//!   them with `vpmaddwd` into int32 sums. Products of 16-bit operands cannot saturate, unlike
//!   `vpmaddubsw`, so the sums are exact and, added modulo 2^32, equal the generic kernel's;
//! - the fixed-point requantisation of [`crate::quant::Requant`] eight lanes at a time.
//!
//! Layers it cannot take bit-exactly (a zero point outside int8) run the generic kernel.

use std::arch::x86_64::*;
use std::vec::Vec;

use crate::int8::{ChannelQuant, Conv, ConvGeometry, OutputQuant, ShapeError};
use crate::program::{ConvKernels, Program};
use crate::quant::{requantize_i8, Requant};

/// Output channels per micro-tile.
const MR: usize = 4;
/// Pixels per micro-tile.
const NR: usize = 16;

/// One convolution's weights in the micro-kernel's order.
struct Packed {
    geometry: ConvGeometry,
    /// `[group][channel block][row pair][MR]`: two i16 weights (rows `2k`, `2k+1`) per i32.
    weights: Vec<i32>,
    /// Column-matrix rows (`in / group * kh * kw`), rounded up to even, halved.
    row_pairs: usize,
    /// Blocks of [`MR`] output channels per group.
    blocks: usize,
}

impl Packed {
    fn new(conv: &Conv<'_>) -> Option<Self> {
        let g = conv.geometry;
        let group = g.group.max(1);
        let [c, _, _] = g.input;
        let [oc, _, _] = g.output;
        let [kh, kw] = g.kernel;
        if !c.is_multiple_of(group) || !oc.is_multiple_of(group) {
            return None;
        }
        let (icg, ocg) = (c / group, oc / group);
        let rows = icg * kh * kw;
        if conv.weights.len() != oc * rows {
            return None;
        }
        let (row_pairs, blocks) = (rows.div_ceil(2), ocg.div_ceil(MR));
        let mut weights = std::vec![0i32; group * blocks * row_pairs * MR];
        for (i, packed) in weights.iter_mut().enumerate() {
            let r = i % MR;
            let pair = (i / MR) % row_pairs;
            let block = (i / MR / row_pairs) % blocks;
            let gi = i / MR / row_pairs / blocks;
            let o = block * MR + r;
            if o >= ocg {
                continue;
            }
            let filter = &conv.weights[(gi * ocg + o) * rows..(gi * ocg + o + 1) * rows];
            let w = |k: usize| filter.get(k).map_or(0, |&v| i16::from(v) as u16 as u32);
            *packed = (w(2 * pair) | (w(2 * pair + 1) << 16)) as i32;
        }
        Some(Self {
            geometry: g,
            weights,
            row_pairs,
            blocks,
        })
    }

    /// i16 values of the column matrix of one group.
    fn columns_len(&self) -> usize {
        2 * self.row_pairs * self.row_len()
    }

    /// Output pixels rounded up to whole tiles.
    fn row_len(&self) -> usize {
        let [_, oh, ow] = self.geometry.output;
        (oh * ow).next_multiple_of(NR)
    }
}

/// AVX2 convolutions for one program: packed weights per step and an im2col scratch, allocated
/// at setup.
pub struct Avx2Conv {
    layers: Vec<Option<Packed>>,
    /// The column matrix in tiles: `[pixel tile][row][NR]`, so the micro-kernel reads it
    /// sequentially (row-major, rows a power-of-two apart alias in the L1 cache).
    columns: Vec<i16>,
    /// One row of the column matrix, built contiguously before it is spread over the tiles.
    row: Vec<i16>,
}

impl Avx2Conv {
    /// Pack every convolution of `program`; `None` when this CPU lacks AVX2.
    pub fn new(program: &Program<'_>) -> Option<Self> {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return None;
        }
        let layers: Vec<Option<Packed>> = program
            .steps()
            .map(|step| {
                step.ok()
                    .and_then(|s| program.conv(&s.op))
                    .and_then(|c| Packed::new(&c))
            })
            .collect();
        let columns = layers.iter().flatten().map(Packed::columns_len).max();
        let row = layers.iter().flatten().map(Packed::row_len).max();
        Some(Self {
            columns: std::vec![0; columns.unwrap_or(0)],
            row: std::vec![0; row.unwrap_or(0)],
            layers,
        })
    }

    /// Pack one convolution (for tests and benchmarks of a single layer).
    pub fn for_conv(conv: &Conv<'_>) -> Option<Self> {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return None;
        }
        let packed = Packed::new(conv)?;
        Some(Self {
            columns: std::vec![0; packed.columns_len()],
            row: std::vec![0; packed.row_len()],
            layers: std::vec![Some(packed)],
        })
    }
}

impl ConvKernels for Avx2Conv {
    fn conv(
        &mut self,
        step: usize,
        conv: &Conv<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        let Some(Some(packed)) = self.layers.get(step) else {
            return conv.run(input, output);
        };
        let g = conv.geometry;
        let [c, h, w] = g.input;
        let [oc, oh, ow] = g.output;
        let zero_point_fits = (-128..=127).contains(&conv.input_zero_point);
        let fits = packed.geometry == g
            && zero_point_fits
            && input.len() == c * h * w
            && output.len() == oc * oh * ow
            && conv.channels.fits(oc)
            && self.columns.len() >= packed.columns_len()
            && self.row.len() >= packed.row_len()
            && g.stride.iter().chain(&g.dilation).all(|&s| s > 0);
        if !fits {
            // The generic kernel reports what is wrong, or runs what this one cannot.
            return conv.run(input, output);
        }
        let group = g.group.max(1);
        let (icg, ocg) = (c / group, oc / group);
        let pixels = oh * ow;
        let padded = pixels.next_multiple_of(NR);
        let rows = 2 * packed.row_pairs;
        let columns = &mut self.columns[..rows * padded];
        for gi in 0..group {
            im2col(
                &g,
                &input[gi * icg * h * w..(gi + 1) * icg * h * w],
                icg,
                conv.input_zero_point as i16,
                &mut self.row[..padded],
                columns,
            );
            let weights = &packed.weights[gi * packed.blocks * packed.row_pairs * MR..]
                [..packed.blocks * packed.row_pairs * MR];
            let out = &mut output[gi * ocg * pixels..(gi + 1) * ocg * pixels];
            let channels = ChannelQuant {
                bias: &conv.channels.bias[gi * ocg..(gi + 1) * ocg],
                multiplier: &conv.channels.multiplier[gi * ocg..(gi + 1) * ocg],
                shift: &conv.channels.shift[gi * ocg..(gi + 1) * ocg],
            };
            // SAFETY: AVX2 was detected in `new`; `columns` holds `rows * padded` values,
            // `weights` `blocks * row_pairs * MR`, `out` `ocg * pixels`, as checked above.
            unsafe {
                gemm(
                    weights,
                    packed.row_pairs,
                    packed.blocks,
                    columns,
                    padded,
                    pixels,
                    &channels,
                    conv.output_quant,
                    out,
                );
            }
        }
        Ok(())
    }
}

/// The column matrix, in tiles of [`NR`] pixels: row `(ic, ky, kx)` holds the input under that
/// kernel tap for every output pixel, minus the zero point, 0 where the tap is in the padding.
fn im2col(
    g: &ConvGeometry,
    input: &[i8],
    icg: usize,
    zero_point: i16,
    row: &mut [i16],
    columns: &mut [i16],
) {
    let [_, h, w] = g.input;
    let [_, oh, ow] = g.output;
    let [kh, kw] = g.kernel;
    let [sy, sx] = g.stride;
    let [dy, dx] = g.dilation;
    let [pad_top, pad_left] = g.pad;
    let rows = columns.len() / row.len().max(1);
    let mut index = 0;
    for plane in input.chunks_exact(h * w).take(icg) {
        for ky in 0..kh {
            for kx in 0..kw {
                // Output columns whose tap lands inside the row: ix = ox*sx + kx*dx - pad_left.
                let offset = kx * dx;
                let first = pad_left.saturating_sub(offset).div_ceil(sx).min(ow);
                let last = (w + pad_left)
                    .checked_sub(offset + 1)
                    .map_or(0, |v| (v / sx + 1).min(ow))
                    .max(first);
                row[oh * ow..].fill(0);
                for (oy, dst) in row[..oh * ow].chunks_exact_mut(ow).enumerate() {
                    let iy = (oy * sy + ky * dy)
                        .checked_sub(pad_top)
                        .filter(|&iy| iy < h);
                    let Some(iy) = iy else {
                        dst.fill(0);
                        continue;
                    };
                    let src = &plane[iy * w..(iy + 1) * w];
                    dst[..first].fill(0);
                    dst[last..].fill(0);
                    let start = first * sx + offset - pad_left;
                    if sx == 1 {
                        for (d, &s) in dst[first..last].iter_mut().zip(&src[start..]) {
                            *d = i16::from(s) - zero_point;
                        }
                    } else {
                        let taps = src[start..].iter().step_by(sx);
                        for (d, &s) in dst[first..last].iter_mut().zip(taps) {
                            *d = i16::from(s) - zero_point;
                        }
                    }
                }
                spread(row, index, rows, columns);
                index += 1;
            }
        }
    }
    // The odd row that pads the last pair.
    if index < rows {
        row.fill(0);
        spread(row, index, rows, columns);
    }
}

/// Copy a contiguous row into its place in every tile.
fn spread(row: &[i16], index: usize, rows: usize, columns: &mut [i16]) {
    for (tile, chunk) in columns
        .chunks_exact_mut(rows * NR)
        .zip(row.chunks_exact(NR))
    {
        tile[index * NR..(index + 1) * NR].copy_from_slice(chunk);
    }
}

/// Output = requant(bias + weights x columns) for one group, tile by tile.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2")]
unsafe fn gemm(
    weights: &[i32],
    row_pairs: usize,
    blocks: usize,
    columns: &[i16],
    padded: usize,
    pixels: usize,
    channels: &ChannelQuant<'_>,
    q: OutputQuant,
    out: &mut [i8],
) {
    let ocg = channels.bias.len();
    let tiles = columns.chunks_exact(2 * row_pairs * NR).take(padded / NR);
    for (p0, strip) in (0..pixels).step_by(NR).zip(tiles) {
        for block in 0..blocks {
            let tile = &weights[block * row_pairs * MR..(block + 1) * row_pairs * MR];
            // SAFETY: `strip` holds 2 * row_pairs rows of NR values; `tile` row_pairs * MR.
            let acc = unsafe { micro_kernel(tile, strip, row_pairs) };
            for (r, [lo, hi]) in acc.into_iter().enumerate() {
                let o = block * MR + r;
                if o >= ocg {
                    break;
                }
                let (bias, requant) = channels.get(o);
                let codes = requantize_tile(lo, hi, bias, requant, q);
                let n = NR.min(pixels - p0);
                out[o * pixels + p0..o * pixels + p0 + n].copy_from_slice(&codes[..n]);
            }
        }
    }
}

/// Sums of 4 channels by 16 pixels: `[channel][lo, hi]`, where `lo` holds pixels
/// 0-3 and 8-11 and `hi` pixels 4-7 and 12-15 (the order `vpunpck*wd` leaves them in).
#[target_feature(enable = "avx2")]
unsafe fn micro_kernel(tile: &[i32], strip: &[i16], row_pairs: usize) -> [[__m256i; 2]; MR] {
    let mut acc = [[_mm256_setzero_si256(); 2]; MR];
    let base = strip.as_ptr();
    for pair in 0..row_pairs {
        // SAFETY: the strip holds rows 2*pair and 2*pair+1, NR values each.
        let (a, b) = unsafe {
            (
                _mm256_loadu_si256(base.add(2 * pair * NR).cast()),
                _mm256_loadu_si256(base.add((2 * pair + 1) * NR).cast()),
            )
        };
        let lo = _mm256_unpacklo_epi16(a, b);
        let hi = _mm256_unpackhi_epi16(a, b);
        let w = &tile[pair * MR..pair * MR + MR];
        for (r, sums) in acc.iter_mut().enumerate() {
            let weight = _mm256_set1_epi32(w[r]);
            sums[0] = _mm256_add_epi32(sums[0], _mm256_madd_epi16(weight, lo));
            sums[1] = _mm256_add_epi32(sums[1], _mm256_madd_epi16(weight, hi));
        }
    }
    acc
}

/// Add the bias, requantise and clamp 16 sums; codes in pixel order.
#[target_feature(enable = "avx2")]
fn requantize_tile(
    lo: __m256i,
    hi: __m256i,
    bias: i32,
    requant: Requant,
    q: OutputQuant,
) -> [i8; NR] {
    let bias = _mm256_set1_epi32(bias);
    let (lo, hi) = (_mm256_add_epi32(lo, bias), _mm256_add_epi32(hi, bias));
    let mut codes = [0i8; NR];
    if requant.shift > 0 || !(-128..=127).contains(&q.zero_point) {
        // Scales of 1 or more can exceed 32 bits before the clamp, and so can sums with a
        // zero point outside int8: the scalar path is exact for them.
        let (mut l, mut h) = ([0i32; 8], [0i32; 8]);
        // SAFETY: each array holds 8 i32, one vector.
        unsafe {
            _mm256_storeu_si256(l.as_mut_ptr().cast(), lo);
            _mm256_storeu_si256(h.as_mut_ptr().cast(), hi);
        }
        let order = [0, 1, 2, 3, 8, 9, 10, 11];
        for i in 0..8 {
            codes[order[i]] = requantize_i8(l[i], requant, q.zero_point, q.min, q.max);
            codes[order[i] + 4] = requantize_i8(h[i], requant, q.zero_point, q.min, q.max);
        }
        return codes;
    }
    let right = 31 - i64::from(requant.shift.max(Requant::MIN_SHIFT));
    let lanes = Lanes {
        multiplier: _mm256_set1_epi32(requant.multiplier),
        round: _mm256_set1_epi64x(1 << (right - 1)),
        right: _mm_cvtsi64_si128(right),
        low: _mm256_set1_epi32(i32::from(q.min).saturating_sub(q.zero_point)),
        high: _mm256_set1_epi32(i32::from(q.max).saturating_sub(q.zero_point)),
        zero_point: _mm256_set1_epi32(q.zero_point),
    };
    let (lo, hi) = (requantize8(lo, &lanes), requantize8(hi, &lanes));
    // lo/hi interleave pixels in 4s; packing them back to back restores the order.
    let words = _mm256_packs_epi32(lo, hi);
    let bytes = _mm256_packs_epi16(words, words);
    let ordered = _mm256_permute4x64_epi64::<0b00_00_10_00>(bytes);
    // SAFETY: `codes` holds 16 bytes, one 128-bit store.
    unsafe { _mm_storeu_si128(codes.as_mut_ptr().cast(), _mm256_castsi256_si128(ordered)) };
    codes
}

/// One channel's requantisation constants, broadcast.
struct Lanes {
    multiplier: __m256i,
    round: __m256i,
    right: __m128i,
    low: __m256i,
    high: __m256i,
    zero_point: __m256i,
}

/// Add half and shift four 64-bit products right, rounding toward negative infinity: an
/// arithmetic shift made of a logical one (flip negatives, shift, flip back).
#[target_feature(enable = "avx2")]
fn round_shift(product: __m256i, l: &Lanes) -> __m256i {
    let v = _mm256_add_epi64(product, l.round);
    let sign = _mm256_cmpgt_epi64(_mm256_setzero_si256(), v);
    _mm256_xor_si256(_mm256_srl_epi64(_mm256_xor_si256(v, sign), l.right), sign)
}

/// `clamp(round(acc * m * 2^-right) + zero point)` for 8 lanes, as [`Requant::apply`] and
/// [`requantize_i8`] do it; valid for `right >= 31`, where the rounded value fits 32 bits.
#[target_feature(enable = "avx2")]
fn requantize8(acc: __m256i, l: &Lanes) -> __m256i {
    let even = round_shift(_mm256_mul_epi32(acc, l.multiplier), l);
    let odd = round_shift(
        _mm256_mul_epi32(_mm256_srli_epi64::<32>(acc), l.multiplier),
        l,
    );
    let value = _mm256_blend_epi32::<0b1010_1010>(even, _mm256_slli_epi64::<32>(odd));
    let clamped = _mm256_min_epi32(_mm256_max_epi32(value, l.low), l.high);
    _mm256_add_epi32(clamped, l.zero_point)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// A property test over shapes: every random convolution gives the generic kernel's bytes.
    #[test]
    fn matches_the_generic_kernel_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let mut rng = Rng(0x5eed_0fa5_2026);
        let mut checked = 0;
        for case in 0..400 {
            let group = if case % 7 == 0 { 1 + rng.below(4) } else { 1 };
            let depthwise = case % 11 == 0;
            let icg = if depthwise { 1 } else { 1 + rng.below(9) };
            let c = icg * group;
            let oc = if depthwise {
                c
            } else {
                group * (1 + rng.below(10))
            };
            let (kh, kw) = (1 + rng.below(3), 1 + rng.below(3));
            let (h, w) = (kh + rng.below(20), kw + rng.below(20));
            let stride = [1 + rng.below(2), 1 + rng.below(2)];
            let dilation = [1 + rng.below(2), 1 + rng.below(2)];
            let pad = [rng.below(kh), rng.below(kw)];
            let span = |size: usize, k: usize, s: usize, d: usize, p: usize| {
                (size + 2 * p)
                    .checked_sub(d * (k - 1) + 1)
                    .map(|v| v / s + 1)
            };
            let (Some(oh), Some(ow)) = (
                span(h, kh, stride[0], dilation[0], pad[0]),
                span(w, kw, stride[1], dilation[1], pad[1]),
            ) else {
                continue;
            };
            let input: Vec<i8> = (0..c * h * w).map(|_| rng.next() as i8).collect();
            let weights: Vec<i8> = (0..oc * icg * kh * kw).map(|_| rng.next() as i8).collect();
            let bias: Vec<i32> = (0..oc)
                .map(|_| (rng.next() % 20001) as i32 - 10000)
                .collect();
            // Mostly scales below 1 (the vector path), some at or above 1 (the scalar path).
            let requant: Vec<Requant> = (0..oc)
                .map(|_| {
                    let real = 2f64.powf(-(rng.below(1400) as f64) / 100.0 + 1.5);
                    Requant::from_real(real).unwrap()
                })
                .collect();
            let multiplier: Vec<i32> = requant.iter().map(|r| r.multiplier).collect();
            let shift: Vec<i8> = requant.iter().map(|r| r.shift).collect();
            let zero_point = rng.below(256) as i32 - 128;
            let relu = rng.below(2) == 0;
            let conv = Conv {
                geometry: ConvGeometry {
                    input: [c, h, w],
                    output: [oc, oh, ow],
                    kernel: [kh, kw],
                    stride,
                    pad,
                    dilation,
                    group,
                },
                weights: &weights,
                channels: ChannelQuant {
                    bias: &bias,
                    multiplier: &multiplier,
                    shift: &shift,
                },
                input_zero_point: rng.below(256) as i32 - 128,
                output_quant: OutputQuant {
                    zero_point,
                    min: if relu { zero_point as i8 } else { -128 },
                    max: 127,
                },
            };
            let mut expected = vec![0i8; oc * oh * ow];
            conv.run(&input, &mut expected).unwrap();
            let mut fast = Avx2Conv::for_conv(&conv).unwrap();
            let mut got = vec![0i8; oc * oh * ow];
            fast.conv(0, &conv, &input, &mut got).unwrap();
            assert_eq!(got, expected, "case {case}: {:?}", conv.geometry);
            checked += 1;
        }
        assert!(checked > 300, "only {checked} shapes were valid");
    }

    #[test]
    fn bad_buffers_are_the_generic_kernels_errors() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let conv = Conv {
            geometry: ConvGeometry {
                input: [1, 3, 3],
                output: [1, 3, 3],
                kernel: [3, 3],
                stride: [1, 1],
                pad: [1, 1],
                dilation: [1, 1],
                group: 1,
            },
            weights: &[1; 9],
            channels: ChannelQuant {
                bias: &[0],
                multiplier: &[1 << 30],
                shift: &[0],
            },
            input_zero_point: 0,
            output_quant: OutputQuant {
                zero_point: 0,
                min: -128,
                max: 127,
            },
        };
        let mut fast = Avx2Conv::for_conv(&conv).unwrap();
        assert_eq!(
            fast.conv(0, &conv, &[0; 8], &mut [0; 9]),
            Err(ShapeError { buffer: "input" })
        );
        assert_eq!(
            fast.conv(0, &conv, &[0; 9], &mut [0; 10]),
            Err(ShapeError { buffer: "output" })
        );
    }
}
