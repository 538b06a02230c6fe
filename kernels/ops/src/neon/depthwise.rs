//! Depthwise convolutions (one input channel per group) on NEON, bit-identical to the generic
//! [`crate::int8::Conv`], as [`crate::avx2`]'s depthwise kernel does it on x86-64: each channel
//! straight from its padded plane, 8 pixels of an output row per vector (stride 2 split by a
//! de-interleaving load), one widening multiply-accumulate (`smlal`) per tap, the weights read
//! from the strips packing (which the scrub covers), requantised 8 lanes at a time.

use std::arch::aarch64::*;

use super::VectorRequant;
use crate::strips::{DepthwiseGroup, Layer, Scratch, MAX_DEPTHWISE_TAPS, MR};

/// Pixels per vector.
const LANES: usize = 8;

/// Values past the padded plane that the tap loads may read (a stride-2 load takes
/// `2 * LANES`); they only reach lanes past the row's end, which are not written.
pub(super) const SLACK: usize = 2 * LANES;

/// Whether `layer` is one this kernel takes, with a padded-input scratch of `padded` values.
pub(super) fn takes(layer: &Layer<'_>, padded: usize) -> bool {
    layer.depthwise_fits(padded, SLACK)
}

/// Run one group of an accepted depthwise layer whose [`Layer::tap_offsets`] are `offsets`
/// into `out`, its channels' outputs.
///
/// # Safety
/// NEON must be available, and [`takes`] must have accepted `layer` with `scratch.padded`.
#[target_feature(enable = "neon")]
pub(super) unsafe fn run(
    layer: &Layer<'_>,
    offsets: &[usize; MAX_DEPTHWISE_TAPS + 1],
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
    let [sy, sx] = g.stride;
    let [_, wp] = Layer::padded_dims(g);
    let q = layer.q;
    let taps = g.kernel[0] * g.kernel[1];
    layer.pad_input_within(input, &mut scratch.padded, border_zeroed);
    let plane = scratch.padded.as_ptr();
    // The packing holds taps 2k and 2k + 1 as two i16 in one i32, the first in the low half.
    let packed: &[i16] = bytemuck::cast_slice(weights);
    for (r, out) in out.chunks_exact_mut((oh * ow).max(1)).enumerate() {
        let block = (r / MR) * layer.row_pairs;
        let mut tap_weights = [0i16; MAX_DEPTHWISE_TAPS];
        for (t, w) in tap_weights.iter_mut().enumerate().take(taps) {
            let at = ((block + t / 2) * MR + r % MR) * 2 + t % 2;
            *w = packed.get(at).copied().unwrap_or(0);
        }
        let (bias, requant) = channels.get(r);
        let requant = VectorRequant::new(bias, requant, q);
        for oy in 0..oh {
            for ox0 in (0..ow).step_by(LANES) {
                let n = LANES.min(ow - ox0);
                let at = oy * sy * wp + ox0 * sx;
                let (mut lo, mut hi) = (vdupq_n_s32(0), vdupq_n_s32(0));
                for (&offset, &w) in offsets.iter().zip(&tap_weights).take(taps) {
                    // SAFETY: `takes` checked the plane and its slack hold every tap's load.
                    let x = unsafe { load_taps(plane, at + offset, sx, n) };
                    lo = vmlal_n_s16(lo, vget_low_s16(x), w);
                    hi = vmlal_high_n_s16(hi, x, w);
                }
                let mut codes = [0i8; LANES];
                // SAFETY: `codes` holds 8 bytes, one vector.
                unsafe { vst1_s8(codes.as_mut_ptr(), requant.codes8(lo, hi)) };
                let Some(dst) = out.get_mut(oy * ow + ox0..oy * ow + ox0 + n) else {
                    continue;
                };
                dst.copy_from_slice(&codes[..n]);
            }
        }
    }
}

/// One tap's values for 8 output pixels in a row: `plane[at + stride * i]`; lanes from `n` on
/// are left to whatever the loads read (stride 1 or 2) or 0.
///
/// # Safety
/// `plane[at..at + stride * LANES]` must be readable for strides 1 and 2,
/// `plane[at + stride * i]` for `i < n` otherwise.
#[target_feature(enable = "neon")]
unsafe fn load_taps(plane: *const i16, at: usize, stride: usize, n: usize) -> int16x8_t {
    // SAFETY: the caller vouches for the reads described above.
    unsafe {
        let p = plane.add(at);
        match stride {
            1 => vld1q_s16(p),
            2 => vld2q_s16(p).0,
            _ => {
                let mut lanes = [0i16; LANES];
                for (i, lane) in lanes.iter_mut().enumerate().take(n) {
                    *lane = *p.add(i * stride);
                }
                vld1q_s16(lanes.as_ptr())
            }
        }
    }
}
