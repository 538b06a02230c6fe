//! Convolutions with at most [`PIXELS`] output pixels on NEON (a network's last stages at
//! 64x64: 3x3 and 2x2 planes, and the 1x1 ones), bit-identical to the generic
//! [`crate::int8::Conv`], as [`crate::avx2`]'s kernel of the same name does it on x86-64.
//!
//! The strips kernel puts 16 pixels in its vector lanes and would fill a quarter to a half of
//! them here; this one puts 8 output channels in the lanes instead: each column-matrix row's
//! weights of 8 channels times one pixel's value of that row (`smlal`, `smlal2` by a scalar),
//! for up to 4 pixels at a time (the weights are read again for each 4). Such layers have many
//! channels and few pixels, so reading their weights is most of their time: they are kept as
//! bytes, widened as they are loaded. The sums are exact (16-bit products into 32-bit lanes,
//! added modulo 2^32 as the generic kernel adds them) and requantised 8 channels at a time with
//! each lane's own constants ([`LaneRequant`]).

use std::arch::aarch64::*;
use std::vec::Vec;

use super::lanes::LaneRequant;
use crate::int8::{ChannelQuant, Conv};
use crate::strips::{suits_few_pixels, Layer, Scratch, FEW_PIXELS as PIXELS, NR};

/// Pixels summed at once: two accumulators each.
const PIXELS_AT_ONCE: usize = 4;
/// Output channels per vector.
const LANES: usize = 8;

/// One layer's weights for this kernel: `[8 channels][column-matrix row][channel]` bytes, held
/// as 32-bit words (four bytes each, in memory order) so that the scrub checksums them with the
/// other packings.
pub(super) struct FewPixels {
    words: Vec<i32>,
    /// Rows of the column matrix: input channels times taps.
    rows: usize,
    /// Output channels, rounded up to [`LANES`].
    channels: usize,
}

impl FewPixels {
    /// The packing for `conv` where this kernel takes it ([`suits_few_pixels`]).
    pub(super) fn new(conv: &Conv<'_>) -> Option<Self> {
        let g = conv.geometry;
        let rows = g.input[0] * g.kernel[0] * g.kernel[1];
        if !suits_few_pixels(conv, rows) {
            return None;
        }
        let oc = g.output[0];
        let channels = oc.div_ceil(LANES) * LANES;
        // `channels * rows` is a multiple of 8: the bytes fill whole words.
        let mut words = std::vec![0i32; channels * rows / 4];
        let bytes: &mut [i8] = bytemuck::cast_slice_mut(&mut words);
        for (o, filter) in conv.weights.chunks_exact(rows).enumerate() {
            let (group, lane) = (o / LANES, o % LANES);
            for (k, &w) in filter.iter().enumerate() {
                if let Some(byte) = bytes.get_mut((group * rows + k) * LANES + lane) {
                    *byte = w;
                }
            }
        }
        Some(Self {
            words,
            rows,
            channels,
        })
    }

    /// The packed weights, for the scrub's checksum and fault injection.
    pub(super) fn words(&self) -> &[i32] {
        &self.words
    }

    pub(super) fn words_mut(&mut self) -> &mut [i32] {
        &mut self.words
    }

    /// Run `layer` (the strips view of the convolution this was packed from, whose buffers and
    /// scratch the caller checked) on `input` into `out`.
    #[target_feature(enable = "neon")]
    pub(super) fn run(
        &self,
        layer: &Layer<'_>,
        input: &[i8],
        channels: &ChannelQuant<'_>,
        scratch: &mut Scratch,
        out: &mut [i8],
    ) {
        let [_, oh, ow] = layer.geometry.output;
        let pixels = oh * ow;
        let count = channels.bias.len();
        let Scratch { padded, strip, .. } = scratch;
        // Every read of the sums is inside these, checked once: the strip's rows of 16 pixels,
        // and 8 bytes per row and group of channels.
        let Some(strip) = strip.get_mut(..2 * layer.row_pairs * NR) else {
            return;
        };
        if pixels > PIXELS
            || strip.len() < self.rows * NR
            || self.words.len() * 4 < self.channels * self.rows
            || count > self.channels
        {
            return;
        }
        // Every pixel in one strip (the tile from pixel 0).
        layer.strip_filler(input, padded)(strip, 0);
        for group in 0..count.div_ceil(LANES) {
            let first_channel = group * LANES;
            let lanes = LANES.min(count - first_channel);
            let requant = LaneRequant::new(channels, first_channel, lanes, layer.q);
            for first in (0..pixels).step_by(PIXELS_AT_ONCE) {
                let mut codes = [[0i8; LANES]; PIXELS_AT_ONCE];
                // SAFETY: the lengths checked above; `first + P <= pixels <= 12 < NR`.
                unsafe {
                    match pixels - first {
                        1 => self.codes::<1>(strip, group, first, &requant, &mut codes),
                        2 => self.codes::<2>(strip, group, first, &requant, &mut codes),
                        3 => self.codes::<3>(strip, group, first, &requant, &mut codes),
                        _ => {
                            self.codes::<PIXELS_AT_ONCE>(strip, group, first, &requant, &mut codes)
                        }
                    }
                }
                let n = PIXELS_AT_ONCE.min(pixels - first);
                for (p, codes) in codes.iter().enumerate().take(n) {
                    for (lane, &code) in codes.iter().enumerate().take(lanes) {
                        if let Some(out) = out.get_mut((first_channel + lane) * pixels + first + p)
                        {
                            *out = code;
                        }
                    }
                }
            }
        }
    }

    /// The codes of channels `8 * group..` at pixels `first..first + P` into `codes[..P]`.
    ///
    /// # Safety
    /// `strip` must hold `rows` rows of [`NR`] values, the weights `channels * rows` bytes,
    /// `group < channels / 8` and `first + P <= NR`.
    #[inline]
    #[target_feature(enable = "neon")]
    unsafe fn codes<const P: usize>(
        &self,
        strip: &[i16],
        group: usize,
        first: usize,
        requant: &LaneRequant,
        codes: &mut [[i8; LANES]; PIXELS_AT_ONCE],
    ) {
        let mut acc = [[vdupq_n_s32(0); 2]; P];
        // SAFETY: the caller vouches for every read.
        unsafe {
            let bytes = self
                .words
                .as_ptr()
                .cast::<i8>()
                .add(group * self.rows * LANES);
            let values = strip.as_ptr().add(first);
            for k in 0..self.rows {
                let w = vmovl_s8(vld1_s8(bytes.add(k * LANES)));
                let row = values.add(k * NR);
                for (p, acc) in acc.iter_mut().enumerate() {
                    let x = *row.add(p);
                    acc[0] = vmlal_n_s16(acc[0], vget_low_s16(w), x);
                    acc[1] = vmlal_high_n_s16(acc[1], w, x);
                }
            }
        }
        for (codes, [low, high]) in codes.iter_mut().zip(acc) {
            // SAFETY: `codes` holds 8 bytes, one vector.
            unsafe { vst1_s8(codes.as_mut_ptr(), requant.codes8(low, high)) };
        }
    }
}
