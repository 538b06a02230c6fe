//! Depthwise convolutions (one input channel per group) on AVX2, bit-identical to the generic
//! [`crate::int8::Conv`].
//!
//! The strips kernel would fill a quarter of its 4-channel tile and spend most of its time
//! building strips, so a depthwise channel is computed straight from its padded plane instead:
//! 16 pixels of an output row per vector, two taps at a time interleaved for `vpmaddwd`, the
//! weights broadcast from the strips packing (so the scrub's checksums still cover them). The
//! activations stay NCHW like every other kernel's: a channel's plane is contiguous, so a row
//! of pixels fills the vector lanes without converting layouts at the layer's boundaries.

use std::arch::x86_64::*;

use super::requantize_tile;
use crate::int8::ChannelQuant;
use crate::strips::{Layer, Scratch, MR, NR};

/// Values past the padded plane that the tap loads may read (a stride-2 load takes `2 * NR`);
/// they only reach lanes past the row's end, which are not written.
pub(super) const SLACK: usize = 2 * NR;

/// Most taps (`kh * kw`) this kernel takes; larger windows run on the strips kernel.
const MAX_TAPS: usize = 64;

/// Whether `layer` is one this kernel takes, with a padded-input scratch of `padded` values.
pub(super) fn takes(layer: &Layer<'_>, padded: usize) -> bool {
    let g = layer.geometry;
    let [hp, wp] = Layer::padded_dims(g);
    layer.icg == 1 && g.kernel[0] * g.kernel[1] <= MAX_TAPS && padded >= hp * wp + SLACK
}

/// Run one group of an accepted depthwise layer: `input` its one channel, `weights` its packed
/// weights, `out` its channels' outputs.
///
/// # Safety
/// AVX2 must be available, and [`takes`] must have accepted `layer` with `scratch.padded`.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn run(
    layer: &Layer<'_>,
    input: &[i8],
    weights: &[i32],
    channels: &ChannelQuant<'_>,
    scratch: &mut Scratch,
    out: &mut [i8],
) {
    let g = layer.geometry;
    let [_, oh, ow] = g.output;
    let [kh, kw] = g.kernel;
    let [sy, sx] = g.stride;
    let [dy, dx] = g.dilation;
    let [_, wp] = Layer::padded_dims(g);
    let taps = kh * kw;
    let mut offsets = [0usize; MAX_TAPS];
    for (t, offset) in offsets.iter_mut().enumerate().take(taps) {
        *offset = (t / kw) * dy * wp + (t % kw) * dx;
    }
    layer.pad_input(input, &mut scratch.padded);
    let plane = scratch.padded.as_ptr();
    let zero = _mm256_setzero_si256();
    for (r, out) in out.chunks_exact_mut((oh * ow).max(1)).enumerate() {
        let (bias, requant) = channels.get(r);
        let block = (r / MR) * layer.row_pairs * MR + r % MR;
        for oy in 0..oh {
            for ox0 in (0..ow).step_by(NR) {
                let n = NR.min(ow - ox0);
                let at = oy * sy * wp + ox0 * sx;
                let (mut lo, mut hi) = (zero, zero);
                for pair in 0..layer.row_pairs {
                    let weight = weights.get(block + pair * MR).copied().unwrap_or(0);
                    // SAFETY: `takes` checked the plane and its slack hold every tap's load.
                    let (a, b) = unsafe {
                        (
                            load_taps(plane, at + offsets[2 * pair], sx, n),
                            if 2 * pair + 1 < taps {
                                load_taps(plane, at + offsets[2 * pair + 1], sx, n)
                            } else {
                                zero
                            },
                        )
                    };
                    let weight = _mm256_set1_epi32(weight);
                    let (pl, ph) = (_mm256_unpacklo_epi16(a, b), _mm256_unpackhi_epi16(a, b));
                    lo = _mm256_add_epi32(lo, _mm256_madd_epi16(pl, weight));
                    hi = _mm256_add_epi32(hi, _mm256_madd_epi16(ph, weight));
                }
                let codes = requantize_tile(lo, hi, bias, requant, layer.q);
                if let Some(dst) = out.get_mut(oy * ow + ox0..oy * ow + ox0 + n) {
                    dst.copy_from_slice(&codes[..n]);
                }
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
#[target_feature(enable = "avx2")]
unsafe fn load_taps(plane: *const i16, at: usize, stride: usize, n: usize) -> __m256i {
    // SAFETY: the caller vouches for the reads described above.
    unsafe {
        let p = plane.add(at);
        match stride {
            1 => _mm256_loadu_si256(p.cast()),
            2 => {
                // The even values of 32: sign-extend them in 32-bit lanes, pack back to 16 bits
                // (exact), then undo the packing's interleave of the two 128-bit halves.
                let a = _mm256_loadu_si256(p.cast());
                let b = _mm256_loadu_si256(p.add(NR).cast());
                let even = |v| _mm256_srai_epi32::<16>(_mm256_slli_epi32::<16>(v));
                let packed = _mm256_packs_epi32(even(a), even(b));
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
