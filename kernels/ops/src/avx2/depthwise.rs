//! Depthwise convolutions (one input channel per group) on AVX2, bit-identical to the generic
//! [`crate::int8::Conv`].
//!
//! The strips kernel would fill a quarter of its 4-channel tile and spend most of its time
//! building strips, so a depthwise channel is computed straight from its padded plane instead:
//! 16 pixels of an output row per vector, two taps at a time interleaved for `vpmaddwd`, the
//! weights broadcast from the strips packing (so the scrub's checksums still cover them). Rows
//! of more than 8 pixels at stride 1 or 2 pair a window row's neighbouring taps instead
//! ([`RowPairs`]), which needs no interleaving at all. The
//! activations stay NCHW like every other kernel's: a channel's plane is contiguous, so a row
//! of pixels fills the vector lanes without converting layouts at the layer's boundaries.

use std::arch::x86_64::*;

use super::{ChannelRequant, NarrowClamp, NarrowScale};
use crate::strips::{store_codes, DepthwiseGroup, Layer, Scratch, MAX_DEPTHWISE_TAPS, MR, NR};

/// Values past the padded plane that the tap loads may read (a stride-2 load takes `2 * NR`);
/// they only reach lanes past the row's end, which are not written.
pub(super) const SLACK: usize = 2 * NR;

/// Whether `layer` is one this kernel takes, with a padded-input scratch of `padded` values.
pub(super) fn takes(layer: &Layer<'_>, padded: usize) -> bool {
    layer.depthwise_fits(padded, SLACK)
}

/// Run one group of an accepted depthwise layer whose [`Layer::tap_offsets`] are `offsets`
/// and whose [`RowPairs::of`] is `row_pairs` into `out`, its channels' outputs.
///
/// # Safety
/// AVX2 must be available, and [`takes`] must have accepted `layer` with `scratch.padded`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn run(
    layer: &Layer<'_>,
    (offsets, row_pairs): (&[usize; MAX_DEPTHWISE_TAPS + 1], Option<&RowPairs>),
    group: DepthwiseGroup<'_>,
    scratch: &mut Scratch,
    out: &mut [i8],
) {
    let DepthwiseGroup {
        input,
        weights,
        channels,
        border_zeroed,
    } = group;
    let g = layer.geometry;
    let [_, oh, ow] = g.output;
    let taps = g.kernel[0] * g.kernel[1];
    layer.pad_input_within(input, &mut scratch.padded, border_zeroed);
    let plane = scratch.padded.as_ptr();
    let mut row_weights = [0i32; MAX_DEPTHWISE_TAPS];
    let clamp = NarrowClamp::new(layer.q);
    for (r, out) in out.chunks_exact_mut((oh * ow).max(1)).enumerate() {
        let block = (r / MR) * layer.row_pairs * MR + r % MR;
        // Broadcast where they are used: an array of 32 broadcast vectors was a 1 KB memset
        // per channel, more than a 2x2 plane's arithmetic.
        let mut pairs = [0i32; MAX_DEPTHWISE_TAPS.div_ceil(2)];
        for (pair, w) in pairs.iter_mut().enumerate().take(layer.row_pairs) {
            *w = weights.get(block + pair * MR).copied().unwrap_or(0);
        }
        let (bias, requant) = channels.get(r);
        let channel = Channel {
            layer,
            offsets,
            pairs: &pairs,
            requant: ChannelRequant::new(bias, requant, layer.q),
            narrow: NarrowScale::new(bias, requant, layer.q).map(|n| (n, &clamp)),
        };
        if let Some(rows) = row_pairs {
            rows.weights(layer, &pairs, &mut row_weights);
            let weights = &row_weights;
            // SAFETY: as for this function.
            unsafe {
                // 3x3 and 5x5 windows with their pair count fixed, as below.
                match (rows.count, g.stride[1]) {
                    (6, 1) => channel.rows(out, |at, _| rows.sums::<6, 1>(plane, at, weights)),
                    (6, _) => channel.rows(out, |at, _| rows.sums::<6, 2>(plane, at, weights)),
                    (15, 1) => channel.rows(out, |at, _| rows.sums::<15, 1>(plane, at, weights)),
                    (15, _) => channel.rows(out, |at, _| rows.sums::<15, 2>(plane, at, weights)),
                    (_, 1) => channel.rows(out, |at, _| rows.sums::<0, 1>(plane, at, weights)),
                    _ => channel.rows(out, |at, _| rows.sums::<0, 2>(plane, at, weights)),
                }
            }
            continue;
        }
        // SAFETY: as for this function.
        unsafe {
            // The common windows with their tap count fixed, so the loop over taps unrolls
            // with the weights in registers.
            match (taps, layer.row_pairs) {
                (9, 5) => channel.run::<5>(plane, out),
                (25, 13) => channel.run::<13>(plane, out),
                _ => channel.run::<0>(plane, out),
            }
        }
    }
}

/// A window's taps paired along its rows, `kx` with `kx + 1` (the second weighted 0 past the
/// row's end), for rows of more than 8 output pixels at stride 1 or 2, undilated along x. The
/// pair's two values for an output pixel are neighbours in the padded plane, one 32-bit lane:
/// at stride 1 a load gives the even pixels' pairs and a load one value on the odd pixels';
/// at stride 2 two loads give 8 pixels' pairs each. `vpmaddwd` takes them as loaded: no
/// interleaving of two taps' loads (two instructions a pair), no gathering of a stride-2
/// tap's even values (six a tap). 3x3 and 5x5 windows have one pair more than by taps in
/// order (6, 15), but each costs 6 instructions instead of 8 at stride 1 and 18 at stride 2.
pub(super) struct RowPairs {
    /// Offset of each pair's first tap in the padded plane, row-major.
    offsets: [usize; MAX_DEPTHWISE_TAPS],
    count: usize,
}

impl RowPairs {
    /// The pairs of `layer`'s window, where its rows take them.
    pub(super) fn of(layer: &Layer<'_>) -> Option<Self> {
        let g = layer.geometry;
        let [kh, kw] = g.kernel;
        let [_, wp] = Layer::padded_dims(g);
        if g.output[2] <= NR / 2 || g.dilation[1] != 1 || !matches!(g.stride[1], 1 | 2) {
            return None;
        }
        let mut pairs = Self {
            offsets: [0; MAX_DEPTHWISE_TAPS],
            count: kh * kw.div_ceil(2),
        };
        // At most one pair per tap: the count fits.
        for (i, offset) in pairs.offsets.iter_mut().enumerate().take(pairs.count) {
            let (ky, kx) = Self::first_tap(i, kw);
            *offset = ky * g.dilation[0] * wp + kx;
        }
        Some(pairs)
    }

    /// Row and column in the window of pair `i`'s first tap.
    fn first_tap(i: usize, kw: usize) -> (usize, usize) {
        let per_row = kw.div_ceil(2);
        (i / per_row, 2 * (i % per_row))
    }

    /// Each pair's two weights as one `i32` (the first in the low half) into `weights`, from
    /// the channel's weights in tap order (`pairs`: taps `2k` and `2k + 1`, as
    /// [`Channel::pairs`]).
    fn weights(&self, layer: &Layer<'_>, pairs: &[i32], weights: &mut [i32; MAX_DEPTHWISE_TAPS]) {
        let kw = layer.geometry.kernel[1];
        let tap = |t: usize| {
            let pair = pairs.get(t / 2).copied().unwrap_or(0);
            (pair >> (16 * (t % 2))) & 0xffff
        };
        for (i, w) in weights.iter_mut().enumerate().take(self.count) {
            let (ky, kx) = Self::first_tap(i, kw);
            let second = if kx + 1 < kw {
                tap(ky * kw + kx + 1)
            } else {
                0
            };
            *w = tap(ky * kw + kx) | second << 16;
        }
    }

    /// The sums of 16 output pixels from `at` on (`N` pairs: 0, the layer's count, not fixed
    /// at compile time; `STRIDE` 1 or 2), in the lane order `vpunpck*wd` leaves them in.
    ///
    /// # Safety
    /// `plane[at + offset..at + offset + 2 * NR]` must be readable for every pair's offset.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn sums<const N: usize, const STRIDE: usize>(
        &self,
        plane: *const i16,
        at: usize,
        weights: &[i32; MAX_DEPTHWISE_TAPS],
    ) -> (__m256i, __m256i) {
        let count = if N > 0 { N } else { self.count };
        let (mut a, mut b) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for (&offset, &weight) in self.offsets.iter().zip(weights).take(count) {
            let weight = _mm256_set1_epi32(weight);
            // SAFETY: the caller vouches for the reads.
            let (x, y) = unsafe {
                let p = plane.add(at + offset);
                // Stride 1: even pixels, and odd ones a value on; stride 2: pixels 0-7, 8-15.
                let second = if STRIDE == 1 { p.add(1) } else { p.add(NR) };
                (
                    _mm256_loadu_si256(p.cast()),
                    _mm256_loadu_si256(second.cast()),
                )
            };
            a = _mm256_add_epi32(a, _mm256_madd_epi16(x, weight));
            b = _mm256_add_epi32(b, _mm256_madd_epi16(y, weight));
        }
        if STRIDE == 1 {
            // Even and odd pixels' sums, interleaved: pixels 0-3 and 8-11, then 4-7 and 12-15.
            (_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b))
        } else {
            (
                _mm256_permute2x128_si256::<0x20>(a, b),
                _mm256_permute2x128_si256::<0x31>(a, b),
            )
        }
    }
}

/// One output channel of a depthwise layer.
struct Channel<'c> {
    layer: &'c Layer<'c>,
    /// Each tap's offset in the padded plane; one past the last tap is 0 (its weight is 0).
    offsets: &'c [usize; MAX_DEPTHWISE_TAPS + 1],
    /// Weights of taps `2k` and `2k + 1`, two i16 in one i32 (the first in the low half).
    pairs: &'c [i32; MAX_DEPTHWISE_TAPS.div_ceil(2)],
    /// Its bias and requantisation, broadcast once for all its vectors.
    requant: ChannelRequant,
    /// The same in the compact form, where the channel has it (a scale below 1/2), with the
    /// layer's clamp: the rows of more than 8 pixels use it.
    narrow: Option<(NarrowScale, &'c NarrowClamp)>,
}

impl Channel<'_> {
    /// Compute the channel from its padded `plane` into `out`, `PAIRS` tap pairs (0: the
    /// layer's count, not fixed at compile time). Rows of 8 pixels or fewer go two to a vector.
    ///
    /// # Safety
    /// AVX2 must be available; `plane` must hold the padded plane and [`SLACK`] more.
    #[target_feature(enable = "avx2")]
    unsafe fn run<const PAIRS: usize>(&self, plane: *const i16, out: &mut [i8]) {
        let g = self.layer.geometry;
        let [_, oh, ow] = g.output;
        let [sy, sx] = g.stride;
        let [_, wp] = Layer::padded_dims(g);
        if ow > NR / 2 {
            // SAFETY: as for this function.
            unsafe {
                match sx {
                    1 => self.rows(out, |at, n| {
                        self.sums::<PAIRS>(|o| load_taps(plane, at + o, 1, n))
                    }),
                    2 => self.rows(out, |at, n| {
                        self.sums::<PAIRS>(|o| load_taps(plane, at + o, 2, n))
                    }),
                    _ => self.rows(out, |at, n| {
                        self.sums::<PAIRS>(|o| load_taps(plane, at + o, sx, n))
                    }),
                }
            }
            return;
        }
        for oy in (0..oh).step_by(2) {
            // An odd last row computes its neighbour twice and keeps one.
            let second = (oy + 1).min(oh - 1);
            let at = [oy * sy * wp, second * sy * wp];
            // SAFETY: as above, for both rows.
            let codes = unsafe {
                self.vector::<PAIRS>(|o| {
                    let (a, b) = (
                        load_taps(plane, at[0] + o, sx, ow),
                        load_taps(plane, at[1] + o, sx, ow),
                    );
                    _mm256_permute2x128_si256::<0x20>(a, b)
                })
            };
            let rows = [&codes[..ow], &codes[NR / 2..NR / 2 + ow]];
            for (y, row) in (oy..oh.min(oy + 2)).zip(rows) {
                if let Some(dst) = out.get_mut(y * ow..(y + 1) * ow) {
                    dst.copy_from_slice(row);
                }
            }
        }
    }

    /// Rows of more than 8 output pixels, 16 at a time: `sums(at, n)` gives the sums of the
    /// vector of pixels whose first window starts at `at` in `plane`, `n` of them wanted.
    ///
    /// # Safety
    /// As [`Channel::run`].
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn rows(&self, out: &mut [i8], sums: impl Fn(usize, usize) -> (__m256i, __m256i)) {
        let g = self.layer.geometry;
        let [_, oh, ow] = g.output;
        let [sy, sx] = g.stride;
        let [_, wp] = Layer::padded_dims(g);
        for oy in 0..oh {
            let first = oy * sy * wp;
            for v in 0..ow.div_ceil(NR) {
                // The last vector of a row ends at its end, or starts there where the row
                // has fewer than 16 pixels.
                let x = (v * NR).min(ow.saturating_sub(NR));
                let n = NR.min(ow - x);
                let (lo, hi) = sums(first + x * sx, n);
                let codes = match &self.narrow {
                    Some((scale, clamp)) => scale.codes_vector([lo, hi], clamp),
                    None => self.requant.tile_vector(lo, hi),
                };
                store_vector(out, oy * ow + x, n, codes);
            }
        }
    }

    /// The 16 codes of one vector of output pixels whose tap values `load(offset)` gives.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn vector<const PAIRS: usize>(&self, load: impl Fn(usize) -> __m256i) -> [i8; NR] {
        let (lo, hi) = self.sums::<PAIRS>(load);
        self.requant.tile(lo, hi)
    }

    /// The sums of one vector of output pixels whose tap values `load(offset)` gives, in the
    /// lane order `vpunpck*wd` leaves them in.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn sums<const PAIRS: usize>(&self, load: impl Fn(usize) -> __m256i) -> (__m256i, __m256i) {
        let pairs = if PAIRS > 0 {
            PAIRS
        } else {
            self.layer.row_pairs
        };
        let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for (pair, &weight) in self.pairs.iter().enumerate().take(pairs) {
            let weight = _mm256_set1_epi32(weight);
            // The tap past an odd count reads at offset 0 and is weighted 0.
            let (a, b) = (
                load(self.offsets[2 * pair]),
                load(self.offsets[2 * pair + 1]),
            );
            let (pl, ph) = (_mm256_unpacklo_epi16(a, b), _mm256_unpackhi_epi16(a, b));
            lo = _mm256_add_epi32(lo, _mm256_madd_epi16(pl, weight));
            hi = _mm256_add_epi32(hi, _mm256_madd_epi16(ph, weight));
        }
        (lo, hi)
    }
}

/// Store `codes`, 16 of a row, at `at` in `out`, `n` of them: a whole 16-byte store where the
/// plane has room (codes past the row's end land on the next row's first pixels, which are
/// written after them).
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn store_vector(out: &mut [i8], at: usize, n: usize, codes: __m128i) {
    match out.get_mut(at..at + NR) {
        // SAFETY: `dst` is 16 bytes, one 128-bit store.
        Some(dst) => unsafe { _mm_storeu_si128(dst.as_mut_ptr().cast(), codes) },
        None => {
            let mut last = [0i8; NR];
            // SAFETY: `last` holds 16 bytes, one 128-bit store.
            unsafe { _mm_storeu_si128(last.as_mut_ptr().cast(), codes) };
            if let Some(dst) = out.get_mut(at..at + n.min(NR)) {
                store_codes(dst, &last);
            }
        }
    }
}

/// One tap's values for 16 output pixels in a row: `plane[at + stride * i]`; lanes from `n` on
/// are left to whatever the loads read (stride 1 or 2) or 0.
///
/// # Safety
/// `plane[at..at + stride * NR]` must be readable for strides 1 and 2, `plane[at + stride * i]`
/// for `i < n` otherwise.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load_taps(plane: *const i16, at: usize, stride: usize, n: usize) -> __m256i {
    // SAFETY: the caller vouches for the reads described above.
    unsafe {
        let p = plane.add(at);
        match stride {
            1 => _mm256_loadu_si256(p.cast()),
            2 => {
                // The even values of 32: each the low half of a 32-bit lane, zero-extended (the
                // odd half blended to 0), packed back to 16 bits unsigned (the bits unchanged,
                // whatever the sign), then the packing's interleave of the two 128-bit halves
                // undone.
                let a = _mm256_loadu_si256(p.cast());
                let b = _mm256_loadu_si256(p.add(NR).cast());
                let zero = _mm256_setzero_si256();
                let even = |v| _mm256_blend_epi16::<0b0101_0101>(zero, v);
                let packed = _mm256_packus_epi32(even(a), even(b));
                _mm256_permute4x64_epi64::<0b11_01_10_00>(packed)
            }
            _ => {
                let mut lanes = [0i16; NR];
                for (i, lane) in lanes.iter_mut().enumerate().take(n) {
                    *lane = *p.add(i * stride);
                }
                _mm256_loadu_si256(lanes.as_ptr().cast())
            }
        }
    }
}
