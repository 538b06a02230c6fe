//! aarch64 NEON convolution (the Jetson's CPU), bit-identical to the generic [`Conv`]: the
//! strips of [`crate::strips`] and a micro-kernel of 4 output channels by 16 pixels made of
//! widening 16-bit multiply-accumulates (`smlal`). 16-bit products are exact and the int32 sums
//! wrap like the generic kernel's; requantisation is the generic [`requantize_i8`].
//!
//! The dot-product extension (`sdot`, four 8-bit products per lane) would be faster, but its
//! intrinsic is not stable in this toolchain (Rust 1.95), and `sdot` works on 8-bit operands
//! while `input - zero_point` needs 9 bits; this kernel needs only baseline NEON.

use std::arch::aarch64::*;
use std::vec::Vec;

use crate::int8::{ChannelQuant, Conv, ShapeError};
use crate::quant::requantize_i8;
use crate::strips::{flip_bit, prepare_convs, Layer, Packed, Scratch, MR, NR};
use crate::table::{Entry, KernelTable};
use crate::Kernels;

/// NEON convolutions for one program: packed weights per step and scratch buffers, allocated
/// at setup.
pub struct Neon {
    layers: Vec<Option<Packed>>,
    scratch: Scratch,
}

fn needs(packed: &Packed) -> [usize; 4] {
    let [padded, strip] = packed.scratch_len();
    [padded, strip, 0, 0]
}

impl Neon {
    /// Pack the convolutions of a program (`convs[step]`); `None` when this CPU lacks NEON.
    pub fn new(convs: &[Option<Conv<'_>>]) -> Option<Self> {
        if !std::arch::is_aarch64_feature_detected!("neon") {
            return None;
        }
        let layers = prepare_convs(convs, Packed::new);
        let scratch = Scratch::for_needs(layers.iter().flatten().map(needs));
        Some(Self { layers, scratch })
    }

    /// Pack one convolution (for tests of a single layer).
    pub fn for_conv(conv: &Conv<'_>) -> Option<Self> {
        if !std::arch::is_aarch64_feature_detected!("neon") {
            return None;
        }
        let packed = Packed::new(conv)?;
        Some(Self {
            scratch: Scratch::for_needs([needs(&packed)]),
            layers: std::vec![Some(packed)],
        })
    }
}

/// The NEON plug-in for the kernel table: on a CPU with NEON, its convolutions (packed for
/// `program`).
pub(crate) fn plug(table: &mut KernelTable, convs: &[Option<Conv<'_>>]) {
    let Some(neon) = Neon::new(convs) else {
        return;
    };
    table.conv = Entry::conv_of("neon", neon);
}

impl Kernels for Neon {
    fn prepared_weights(&self, visit: &mut dyn FnMut(&[i32])) {
        for packed in self.layers.iter().flatten() {
            visit(&packed.weights);
        }
    }

    fn flip_prepared_bit(&mut self, bit: u64) -> bool {
        let blocks = self
            .layers
            .iter_mut()
            .flatten()
            .map(|p| p.weights.as_mut_slice())
            .collect();
        flip_bit(blocks, bit)
    }

    fn conv(
        &mut self,
        step: usize,
        conv: &Conv<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        let Self { layers, scratch } = self;
        let Some(Some(packed)) = layers.get(step) else {
            return conv.run(input, output);
        };
        if !packed.accepts(conv, input, output) || !scratch.fits(needs(packed)) {
            // The generic kernel reports what is wrong, or runs what this one cannot.
            return conv.run(input, output);
        }
        let layer = packed.layer(conv);
        packed.for_each_group(conv, input, output, |input, weights, channels, output| {
            // SAFETY: NEON was detected in `new`; the buffers' sizes were checked above.
            unsafe { run_layer(&layer, input, weights, channels, scratch, output) }
        });
        Ok(())
    }
}

/// The shared tile loop with the NEON micro-kernel and the generic requantisation.
#[target_feature(enable = "neon")]
fn run_layer(
    layer: &Layer<'_>,
    input: &[i8],
    weights: &[i32],
    channels: &ChannelQuant<'_>,
    scratch: &mut Scratch,
    out: &mut [i8],
) {
    let count = channels.bias.len();
    let q = layer.q;
    let span = layer.row_pairs * MR;
    let Scratch { padded, strip, .. } = scratch;
    layer.run_tiles(
        input,
        weights,
        span,
        count,
        padded,
        strip,
        out,
        |tile, strip, first| {
            let sums = micro_kernel(tile, strip, layer.row_pairs);
            let mut codes = [[0i8; NR]; MR];
            for ((o, sums), row) in (first..count).zip(&sums).zip(&mut codes) {
                let (bias, requant) = channels.get(o);
                for (code, &sum) in row.iter_mut().zip(sums) {
                    *code =
                        requantize_i8(sum.wrapping_add(bias), requant, q.zero_point, q.min, q.max);
                }
            }
            codes
        },
    );
}

/// Sums of 4 output channels by 16 pixels over the strip's rows. The packed weights hold the
/// rows of a pair as two i16 in one i32, the first in the low half: read as i16 they are in
/// row order.
#[target_feature(enable = "neon")]
fn micro_kernel(tile: &[i32], strip: &[i16], row_pairs: usize) -> [[i32; NR]; MR] {
    let weights: &[i16] = bytemuck::cast_slice(tile);
    let mut acc = [[vdupq_n_s32(0); 4]; MR];
    for (k, row) in strip.chunks_exact(NR).take(2 * row_pairs).enumerate() {
        // SAFETY: `row` holds NR = 16 values: two loads of 8.
        let (x0, x1) = unsafe { (vld1q_s16(row.as_ptr()), vld1q_s16(row.as_ptr().add(8))) };
        let (pair, half) = (k / 2, k % 2);
        for (r, sums) in acc.iter_mut().enumerate() {
            let w = weights
                .get((pair * MR + r) * 2 + half)
                .copied()
                .unwrap_or(0);
            sums[0] = vmlal_n_s16(sums[0], vget_low_s16(x0), w);
            sums[1] = vmlal_high_n_s16(sums[1], x0, w);
            sums[2] = vmlal_n_s16(sums[2], vget_low_s16(x1), w);
            sums[3] = vmlal_high_n_s16(sums[3], x1, w);
        }
    }
    let mut sums = [[0i32; NR]; MR];
    for (dst, lanes) in sums.iter_mut().zip(acc) {
        for (quarter, v) in dst.chunks_exact_mut(4).zip(lanes) {
            // SAFETY: each quarter holds 4 i32, one vector.
            unsafe { vst1q_s32(quarter.as_mut_ptr(), v) };
        }
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strips::check;

    #[test]
    fn matches_the_generic_kernel_bit_for_bit() {
        check::random_layers(0x5eed_0fa5_2026, &mut |conv, input, output| {
            Neon::for_conv(conv).map(|mut fast| fast.conv(0, conv, input, output))
        });
    }

    #[test]
    fn odd_geometry_never_panics() {
        check::odd_geometry(0x00ba_d6e0_2026, &mut |conv, input, output| {
            Neon::for_conv(conv).map(|mut fast| fast.conv(0, conv, input, output))
        });
    }
}
