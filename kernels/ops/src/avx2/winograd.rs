//! Winograd F(2x2, 3x3) for dense stride-1 3x3 convolutions, in exact integers: 16 multiplies per
//! 2x2 outputs and input channel instead of 36.
//!
//! With `G' = 2G` the identity `4Y = Aᵀ[(G' g G'ᵀ) ⊙ (Bᵀ d B)]A` holds in integers. Transformed
//! weights stay within ±1152 and transformed inputs within ±1020, so their products fit the
//! micro-kernel's 16-bit multiplies exactly. Every sum is taken modulo 2^32 (as the generic
//! kernel's are); because |Y| < 2^29 is required up front, `4Y` modulo 2^32 is `4Y` itself and
//! `Y = 4Y >> 2` equals the generic kernel's sum bit for bit.

use std::arch::x86_64::*;
use std::vec::Vec;

use super::{micro_kernel, requantize8, Lanes};
use crate::int8::{ChannelQuant, Conv, ConvGeometry, OutputQuant};
use crate::quant::requantize_i8;
use crate::strips::{Layer, Scratch, MR, NR};

/// Points of a transformed 4x4 tile.
const POINTS: usize = 16;

/// A convolution's transformed weights in the micro-kernel's order.
pub(super) struct Winograd {
    /// `[point][channel block][input-channel pair][MR]`: two i16 weights per i32.
    weights: Vec<i32>,
    /// Input channels rounded up to even, halved.
    row_pairs: usize,
    /// Blocks of [`MR`] output channels.
    blocks: usize,
    /// Output tiles of 2x2: rows, columns.
    tiles: [usize; 2],
}

impl Winograd {
    /// The transformed weights, for a scrub's checksum and fault injection.
    pub(super) fn weights_mut(&mut self) -> &mut [i32] {
        &mut self.weights
    }

    /// The transformed weights.
    pub(super) fn weights(&self) -> &[i32] {
        &self.weights
    }
}

/// `G' g G'ᵀ` for one 3x3 filter, `G' = [[2,0,0],[1,1,1],[1,-1,1],[0,0,2]]`.
fn transform_filter(g: &[i8]) -> [i16; POINTS] {
    let g = |r: usize, c: usize| i32::from(g[r * 3 + c]);
    let column = |c: usize| {
        [
            2 * g(0, c),
            g(0, c) + g(1, c) + g(2, c),
            g(0, c) - g(1, c) + g(2, c),
            2 * g(2, c),
        ]
    };
    let columns = [column(0), column(1), column(2)];
    let t: [[i32; 3]; 4] = core::array::from_fn(|r| core::array::from_fn(|c| columns[c][r]));
    let mut u = [0i16; POINTS];
    for (r, row) in t.iter().enumerate() {
        let values = [
            2 * row[0],
            row[0] + row[1] + row[2],
            row[0] - row[1] + row[2],
            2 * row[2],
        ];
        for (c, v) in values.into_iter().enumerate() {
            // |v| <= 9 * 128: fits.
            u[r * 4 + c] = v as i16;
        }
    }
    u
}

impl Winograd {
    /// The transform of `conv` when it is a dense stride-1, dilation-1 3x3 convolution with at
    /// least one full strip of output tiles, and few enough input channels that |Y| < 2^29.
    pub(super) fn new(conv: &Conv<'_>) -> Option<Self> {
        let g = conv.geometry;
        let [c, _, _] = g.input;
        let [oc, oh, ow] = g.output;
        let shape = g.kernel == [3, 3] && g.stride == [1, 1] && g.dilation == [1, 1];
        let tiles = [oh.div_ceil(2), ow.div_ceil(2)];
        let bounded = c * 9 * 255 * 128 < 1 << 29;
        if !shape || g.group > 1 || !bounded || tiles[0] * tiles[1] < NR {
            return None;
        }
        if conv.weights.len() != oc * c * 9 {
            return None;
        }
        let (row_pairs, blocks) = (c.div_ceil(2), oc.div_ceil(MR));
        let mut weights = std::vec![0u32; POINTS * blocks * row_pairs * MR];
        for o in 0..oc {
            for ic in 0..c {
                let u = transform_filter(&conv.weights[(o * c + ic) * 9..(o * c + ic + 1) * 9]);
                for (point, v) in u.into_iter().enumerate() {
                    let at = ((point * blocks + o / MR) * row_pairs + ic / 2) * MR + o % MR;
                    weights[at] |= u32::from(v as u16) << (16 * (ic % 2));
                }
            }
        }
        Some(Self {
            weights: weights.into_iter().map(|w| w as i32).collect(),
            row_pairs,
            blocks,
            tiles,
        })
    }

    fn strips(&self) -> usize {
        (self.tiles[0] * self.tiles[1]).div_ceil(NR)
    }

    /// Scratch for the transformed input (i16) and the products (i32).
    pub(super) fn scratch_len(&self) -> [usize; 2] {
        let strips = self.strips();
        [
            POINTS * strips * 2 * self.row_pairs * NR,
            POINTS * self.blocks * MR * strips * NR,
        ]
    }

    /// Input transform, 16 GEMMs with the micro-kernel, output transform and requantisation.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2")]
    pub(super) fn run(
        &self,
        layer: &Layer<'_>,
        input: &[i8],
        channels: &ChannelQuant<'_>,
        q: OutputQuant,
        scratch: &mut Scratch,
        out: &mut [i8],
    ) {
        let g = layer.geometry;
        let [c, _, _] = g.input;
        let [hp, wp] = Layer::padded_dims(g);
        let padded = layer.pad_input(input, &mut scratch.padded);
        let strips = self.strips();
        let rows = 2 * self.row_pairs;
        let [v_len, m_len] = self.scratch_len();
        let transformed = &mut scratch.transformed[..v_len];
        self.transform_input(padded, c, [hp, wp], transformed);
        // Every strip has an even number of rows: pair them once for the 16 GEMMs' blocks.
        super::interleave_pairs(transformed);

        let products = &mut scratch.products[..m_len];
        let channels_padded = self.blocks * MR;
        let span = self.blocks * self.row_pairs * MR;
        for point in 0..POINTS {
            let weights = &self.weights[point * span..(point + 1) * span];
            for s in 0..strips {
                let strip = &transformed[((point * strips + s) * rows) * NR..][..rows * NR];
                for block in 0..self.blocks {
                    let tile = &weights[block * self.row_pairs * MR..][..self.row_pairs * MR];
                    let acc = micro_kernel(tile, strip, self.row_pairs);
                    for (r, [lo, hi]) in acc.into_iter().enumerate() {
                        let o = block * MR + r;
                        let at = ((point * channels_padded + o) * strips + s) * NR;
                        // Back to tile order: lo holds tiles 0-3 and 8-11, hi 4-7 and 12-15.
                        let first = _mm256_permute2x128_si256::<0x20>(lo, hi);
                        let second = _mm256_permute2x128_si256::<0x31>(lo, hi);
                        let dst = &mut products[at..at + NR];
                        // SAFETY: `dst` holds 16 i32, two vectors.
                        unsafe {
                            _mm256_storeu_si256(dst.as_mut_ptr().cast(), first);
                            _mm256_storeu_si256(dst.as_mut_ptr().add(8).cast(), second);
                        }
                    }
                }
            }
        }
        self.transform_output(g, products, channels, q, out);
    }

    /// `Bᵀ d B` of every 4x4 input tile (origin `(2ty, 2tx)` in the padded plane), laid out
    /// `[point][strip][channel][NR]` for the micro-kernel; channels past `c` are zero.
    #[target_feature(enable = "avx2")]
    fn transform_input(&self, padded: &[i16], c: usize, [hp, wp]: [usize; 2], v: &mut [i16]) {
        let total = self.tiles[0] * self.tiles[1];
        let strips = self.strips();
        let rows = 2 * self.row_pairs;
        for s in 0..strips {
            let mut origin = [None; NR];
            for (lane, o) in origin.iter_mut().enumerate() {
                let t = s * NR + lane;
                if t < total {
                    let (ty, tx) = (t / self.tiles[1], t % self.tiles[1]);
                    *o = Some(2 * ty * wp + 2 * tx);
                }
            }
            for ch in 0..rows {
                let mut d = [[[0i16; NR]; 4]; 4];
                // Sixteen neighbouring tiles of one tile row: four rows of 34 samples, read
                // with stride 2 (vectorised as shuffles).
                let (first_row, first_column) = (s * NR / self.tiles[1], s * NR % self.tiles[1]);
                if ch < c && first_column + NR <= self.tiles[1] {
                    let plane = &padded[ch * hp * wp..(ch + 1) * hp * wp];
                    for (i, row) in d.iter_mut().enumerate() {
                        let start = (2 * first_row + i) * wp + 2 * first_column;
                        let samples = &plane[start..start + 2 * NR + 2];
                        for (j, values) in row.iter_mut().enumerate() {
                            for (lane, v) in values.iter_mut().enumerate() {
                                *v = samples[2 * lane + j];
                            }
                        }
                    }
                } else if ch < c {
                    let plane = &padded[ch * hp * wp..(ch + 1) * hp * wp];
                    for (lane, o) in origin.iter().enumerate() {
                        let Some(o) = *o else { continue };
                        for (i, row) in d.iter_mut().enumerate() {
                            for (j, values) in row.iter_mut().enumerate() {
                                values[lane] = plane[o + i * wp + j];
                            }
                        }
                    }
                }
                // Bᵀ d: combine rows; then (Bᵀ d) B: combine columns.
                let combine = |a: &[i16; NR], b: &[i16; NR], sign: i16| {
                    let mut r = [0i16; NR];
                    for k in 0..NR {
                        r[k] = a[k] + sign * b[k];
                    }
                    r
                };
                let mut t = [[[0i16; NR]; 4]; 4];
                for j in 0..4 {
                    t[0][j] = combine(&d[0][j], &d[2][j], -1);
                    t[1][j] = combine(&d[1][j], &d[2][j], 1);
                    t[2][j] = combine(&d[2][j], &d[1][j], -1);
                    t[3][j] = combine(&d[1][j], &d[3][j], -1);
                }
                for (i, row) in t.iter().enumerate() {
                    let values = [
                        combine(&row[0], &row[2], -1),
                        combine(&row[1], &row[2], 1),
                        combine(&row[2], &row[1], -1),
                        combine(&row[1], &row[3], -1),
                    ];
                    for (j, lanes) in values.iter().enumerate() {
                        let at = (((i * 4 + j) * strips + s) * rows + ch) * NR;
                        v[at..at + NR].copy_from_slice(lanes);
                    }
                }
            }
        }
    }

    /// `Aᵀ M A / 4` for every tile and output channel, plus the bias, requantised and written
    /// to the output pixels inside the image.
    #[target_feature(enable = "avx2")]
    fn transform_output(
        &self,
        g: &ConvGeometry,
        m: &[i32],
        channels: &ChannelQuant<'_>,
        q: OutputQuant,
        out: &mut [i8],
    ) {
        let [oc, oh, ow] = g.output;
        let total = self.tiles[0] * self.tiles[1];
        let strips = self.strips();
        let channels_padded = self.blocks * MR;
        // The 16 points' rows of every channel, `strips * NR` values each (at least the tiles
        // rounded up to 8): every load below is inside, checked once here.
        if m.len() < 16 * channels_padded * strips * NR || oc > channels_padded {
            return;
        }
        let products = m.as_ptr();
        for o in 0..oc.min(channels.bias.len()) {
            let (bias, requant) = channels.get(o);
            let vector = requant.shift <= 0 && (-128..=127).contains(&q.zero_point);
            let lanes = Lanes::new(requant, q);
            let plane = &mut out[o * oh * ow..(o + 1) * oh * ow];
            for t0 in (0..total).step_by(8) {
                let load = |point: usize| {
                    let at = (point * channels_padded + o) * strips * NR + t0;
                    // SAFETY: `point < 16`, `o < channels_padded`, and rows hold strips * NR
                    // >= t0 + 8 values: inside `m` (checked above).
                    unsafe { _mm256_loadu_si256(products.add(at).cast()) }
                };
                let add = |a, b| _mm256_add_epi32(a, b);
                let sub = |a, b| _mm256_sub_epi32(a, b);
                // Aᵀ M: rows 0 and 1 of the 2x4 intermediate.
                let mut top = [_mm256_setzero_si256(); 4];
                let mut bottom = [_mm256_setzero_si256(); 4];
                for j in 0..4 {
                    let (m0, m1, m2, m3) = (load(j), load(4 + j), load(8 + j), load(12 + j));
                    top[j] = add(add(m0, m1), m2);
                    bottom[j] = sub(sub(m1, m2), m3);
                }
                let bias_lanes = _mm256_set1_epi32(bias);
                let finish = |r: &[__m256i; 4], second: bool| {
                    let four_y = if second {
                        sub(sub(r[1], r[2]), r[3])
                    } else {
                        add(add(r[0], r[1]), r[2])
                    };
                    add(_mm256_srai_epi32::<2>(four_y), bias_lanes)
                };
                let sums = [
                    finish(&top, false),
                    finish(&top, true),
                    finish(&bottom, false),
                    finish(&bottom, true),
                ];
                let (ty, tx) = (t0 / self.tiles[1], t0 % self.tiles[1]);
                let count = 8.min(total - t0);
                if vector {
                    // The eight tiles' two output rows, each pixel pair's codes interleaved in
                    // 16-bit lanes, then copied out a run of tiles within a tile row at a time.
                    // Called one by one, not through a closure (which is not compiled with AVX2 and so would
                    // call it rather than inline it).
                    let [s0, s1, s2, s3] = sums;
                    let (r0, r1) = (requantize8(s0, &lanes), requantize8(s1, &lanes));
                    let (r2, r3) = (requantize8(s2, &lanes), requantize8(s3, &lanes));
                    let byte = _mm256_set1_epi32(0xff);
                    let pair = |a, b| {
                        let high = _mm256_slli_epi32::<8>(_mm256_and_si256(b, byte));
                        _mm256_or_si256(_mm256_and_si256(a, byte), high)
                    };
                    // The words are at most 0xffff: the unsigned pack keeps them.
                    let packed = _mm256_packus_epi32(pair(r0, r1), pair(r2, r3));
                    let rows = _mm256_permute4x64_epi64::<0b11_01_10_00>(packed);
                    let mut bytes = [0i8; 32];
                    // SAFETY: `bytes` holds 32 bytes, one vector.
                    unsafe { _mm256_storeu_si256(bytes.as_mut_ptr().cast(), rows) };
                    let (mut ty, mut tx, mut lane) = (ty, tx, 0);
                    while lane < count {
                        let run = (self.tiles[1] - tx).min(count - lane);
                        let x = 2 * tx;
                        // An odd width's last tile has one column inside the image.
                        let width = (2 * run).min(ow.saturating_sub(x));
                        for dy in 0..2 {
                            let y = 2 * ty + dy;
                            let src = bytes.get(16 * dy + 2 * lane..16 * dy + 2 * lane + width);
                            let dst = plane.get_mut(y * ow + x..y * ow + x + width);
                            if let (true, Some(src), Some(dst)) = (y < oh, src, dst) {
                                dst.copy_from_slice(src);
                            }
                        }
                        (ty, tx, lane) = (ty + 1, 0, lane + run);
                    }
                    continue;
                }
                let mut codes = [[0i32; 8]; 4];
                for (dst, sum) in codes.iter_mut().zip(sums) {
                    // SAFETY: `dst` holds 8 i32, one vector.
                    unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), sum) };
                    for v in dst.iter_mut() {
                        *v = i32::from(requantize_i8(*v, requant, q.zero_point, q.min, q.max));
                    }
                }
                // Tile by tile, the tile's place stepped along rather than divided out.
                let (mut ty, mut tx) = (ty, tx);
                for lane in 0..count {
                    let lane_codes = codes.map(|c| c[lane]);
                    for (k, (dy, dx)) in [(0, 0), (0, 1), (1, 0), (1, 1)].into_iter().enumerate() {
                        let (y, x) = (2 * ty + dy, 2 * tx + dx);
                        if y < oh && x < ow {
                            plane[y * ow + x] = lane_codes[k] as i8;
                        }
                    }
                    tx += 1;
                    if tx == self.tiles[1] {
                        (ty, tx) = (ty + 1, 0);
                    }
                }
            }
        }
    }
}
