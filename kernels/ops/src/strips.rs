//! The portable half of the fast convolutions (AVX2, NEON): weights packed in pairs of
//! column-matrix rows, the input widened to 16 bits inside a zero border, and strips of the
//! column matrix for 16 output pixels at a time. Each architecture brings its micro-kernel and
//! requantisation, and must give the generic kernel's bytes.

use std::vec::Vec;

use crate::int8::{
    pool_window, ChannelQuant, Conv, ConvGeometry, MaxPool, OutputQuant, ShapeError,
};

/// Prepare every convolution of a program (`convs[step]`) with `prepare`, by step index: `None`
/// for other ops and for layers it declines.
pub(crate) fn prepare_convs<T>(
    convs: &[Option<Conv<'_>>],
    prepare: impl Fn(&Conv<'_>) -> Option<T>,
) -> Vec<Option<T>> {
    convs
        .iter()
        .map(|conv| conv.as_ref().and_then(&prepare))
        .collect()
}

/// Flip bit `bit` (modulo their size in bits) of `blocks` taken as one run of words; whether
/// they held any. Fault injection only.
pub(crate) fn flip_bit(blocks: Vec<&mut [i32]>, bit: u64) -> bool {
    let total: u64 = blocks.iter().map(|b| b.len() as u64 * 32).sum();
    if total == 0 {
        return false;
    }
    let mut at = bit % total;
    for block in blocks {
        let bits = block.len() as u64 * 32;
        if at < bits {
            if let Some(word) = block.get_mut((at / 32) as usize) {
                *word ^= 1 << (at % 32);
            }
            return true;
        }
        at -= bits;
    }
    false
}

/// Output channels per micro-tile.
pub(crate) const MR: usize = 4;
/// Most taps (`kh * kw`) the depthwise kernels take; larger windows run on the strips kernel.
pub(crate) const MAX_DEPTHWISE_TAPS: usize = 64;
/// Pixels per micro-tile.
pub(crate) const NR: usize = 16;
/// Most output pixels a layer may have for the few-pixel kernels, which put output channels in
/// the vector lanes. Per pair of rows and 16 channels the AVX2 strips kernel takes 88
/// instructions for up to 16 pixels, its few-pixel kernel 4 + 20 per 4 pixels: 57 for a 3x3
/// plane, 72 for 12 pixels, 96 for 16. Not yet measured on an Arm core.
pub(crate) const FEW_PIXELS: usize = 12;

/// Whether the few-pixel kernels take `conv`: one group, at most [`FEW_PIXELS`] output pixels,
/// and weights of that shape (`rows` per output channel: input channels times taps).
pub(crate) fn suits_few_pixels(conv: &Conv<'_>, rows: usize) -> bool {
    let g = conv.geometry;
    let [oc, oh, ow] = g.output;
    g.group == 1 && oh * ow <= FEW_PIXELS && conv.weights.len() == oc * rows
}

/// Most input and output pixels a depthwise layer may have for the channel-lanes kernels
/// (inputs of up to 4 times as many for 25-tap windows). Laying the input out and the codes
/// back costs per pixel what the per-channel kernel saves on small planes: on AVX2 at 8x8 the
/// lanes are about 12% faster (MobileNetV2 at 64), at 7x7 35% (at 224); with a 16x16 input
/// (stride 2 to 8x8) 17% slower, at 14x14 30% slower (20% with 25 taps). Not yet measured on
/// an Arm core.
pub(crate) const CHANNEL_LANES_PIXELS: usize = 64;

/// Whether the channel-lanes kernels take `conv`: one input and one output channel per group,
/// at most [`MAX_DEPTHWISE_TAPS`] taps, [`CHANNEL_LANES_PIXELS`] output pixels and as many
/// input pixels (4 times as many with 25 taps: such windows do enough arithmetic per output to
/// carry a larger input's layout, a stride-2 layer from 14x14 to 7x7 20% faster on AVX2, 17%
/// slower with 9 taps), and weights of that shape.
pub(crate) fn suits_channel_lanes(conv: &Conv<'_>) -> bool {
    let g = conv.geometry;
    let [c, h, w] = g.input;
    let [oc, oh, ow] = g.output;
    let taps = g.kernel[0] * g.kernel[1];
    let inputs = if taps >= 25 { 4 } else { 1 } * CHANNEL_LANES_PIXELS;
    g.group == c
        && oc == c
        && oh * ow <= CHANNEL_LANES_PIXELS
        && h * w <= inputs
        && taps <= MAX_DEPTHWISE_TAPS
        && conv.weights.len() == c * taps
}

/// One convolution's weights in the micro-kernel's order.
pub(crate) struct Packed {
    pub(crate) geometry: ConvGeometry,
    /// `[group][channel block][row pair][MR]`: two i16 weights (rows `2k`, `2k+1`) per i32,
    /// the first in the low half (so read as i16 they are in row order).
    pub(crate) weights: Vec<i32>,
    /// Column-matrix rows (`in / group * kh * kw`), rounded up to even, halved.
    pub(crate) row_pairs: usize,
    /// Blocks of [`MR`] output channels per group.
    pub(crate) blocks: usize,
}

impl Packed {
    pub(crate) fn new(conv: &Conv<'_>) -> Option<Self> {
        let g = conv.geometry;
        let group = g.group.max(1);
        let [c, _, _] = g.input;
        let [oc, _, _] = g.output;
        let [kh, kw] = g.kernel;
        if !c.is_multiple_of(group) || !oc.is_multiple_of(group) || !Self::sane(&g) {
            return None;
        }
        let (icg, ocg) = (c / group, oc / group);
        let rows = icg * kh * kw;
        if conv.weights.len() != oc * rows {
            return None;
        }
        let (row_pairs, blocks) = (rows.div_ceil(2), ocg.div_ceil(MR));
        let mut weights = std::vec![0i32; group * blocks * row_pairs * MR];
        let tiles = weights.chunks_exact_mut(row_pairs * MR);
        for (tile, (gi, block)) in
            tiles.zip((0..group).flat_map(|gi| (0..blocks).map(move |b| (gi, b))))
        {
            for r in 0..MR.min(ocg - block * MR) {
                let o = gi * ocg + block * MR + r;
                let filter = &conv.weights[o * rows..(o + 1) * rows];
                for (pair, taps) in filter.chunks(2).enumerate() {
                    let w = |k: usize| taps.get(k).map_or(0, |&v| i16::from(v) as u16 as u32);
                    tile[pair * MR + r] = (w(0) | (w(1) << 16)) as i32;
                }
            }
        }
        Some(Self {
            geometry: g,
            weights,
            row_pairs,
            blocks,
        })
    }

    /// Geometry a plan may claim but no real layer has (zero or huge sizes, padding wider than
    /// the kernel) runs on the generic kernel: sizes here stay far from overflow and the
    /// scratch below a few MiB per layer.
    fn sane(g: &ConvGeometry) -> bool {
        const LIMIT: usize = 1 << 12;
        let sizes = g
            .input
            .iter()
            .chain(&g.output)
            .chain(&g.kernel)
            .chain(&g.stride);
        let in_range = sizes.chain(&g.dilation).all(|&v| (1..=LIMIT).contains(&v));
        let padding = || (0..2).all(|i| g.pad[i] < g.kernel[i] * g.dilation[i]);
        let small = || {
            let [hp, wp] = Layer::padded_dims(g);
            g.input[0] * hp * wp <= 1 << 22
        };
        in_range && padding() && small()
    }

    /// Scratch this layer needs: the padded input of a group and one strip.
    pub(crate) fn scratch_len(&self) -> [usize; 2] {
        let [hp, wp] = Layer::padded_dims(&self.geometry);
        let group = self.geometry.group.max(1);
        [
            self.geometry.input[0] / group * hp * wp,
            2 * self.row_pairs * NR,
        ]
    }

    /// Whether `conv` is the layer this was packed from and its buffers fit; otherwise the
    /// generic kernel runs it (and reports what is wrong).
    pub(crate) fn accepts(&self, conv: &Conv<'_>, input: &[i8], output: &[i8]) -> bool {
        let g = conv.geometry;
        let [c, h, w] = g.input;
        let [oc, oh, ow] = g.output;
        self.geometry == g
            && (-128..=127).contains(&conv.input_zero_point)
            && input.len() == c * h * w
            && output.len() == oc * oh * ow
            && conv.channels.fits(oc)
    }

    /// The tile loop's view of `conv` (one group).
    pub(crate) fn layer<'g>(&self, conv: &'g Conv<'_>) -> Layer<'g> {
        let g = &conv.geometry;
        Layer {
            geometry: g,
            icg: g.input[0] / g.group.max(1),
            zero_point: conv.input_zero_point as i16,
            row_pairs: self.row_pairs,
            blocks: self.blocks,
            q: conv.output_quant,
        }
    }

    /// Hand each group of an accepted call to `run` with its input, packed weights, channel
    /// constants and output.
    pub(crate) fn for_each_group(
        &self,
        conv: &Conv<'_>,
        input: &[i8],
        output: &mut [i8],
        run: impl FnMut(&[i8], &[i32], &ChannelQuant<'_>, &mut [i8]),
    ) {
        let span = self.blocks * self.row_pairs * MR;
        for_each_group(
            conv,
            &conv.channels,
            &self.weights,
            span,
            input,
            output,
            run,
        );
    }
}

/// Hand each group of an accepted call of `conv` to `run` with its input, its `span` values of
/// `weights`, its part of `channels` and its output.
pub(crate) fn for_each_group(
    conv: &Conv<'_>,
    channels: &ChannelQuant<'_>,
    weights: &[i32],
    span: usize,
    input: &[i8],
    output: &mut [i8],
    mut run: impl FnMut(&[i8], &[i32], &ChannelQuant<'_>, &mut [i8]),
) {
    let g = conv.geometry;
    let group = g.group.max(1);
    let [c, h, w] = g.input;
    let [oc, oh, ow] = g.output;
    let (icg, ocg) = (c / group, oc / group);
    let parts = input
        .chunks_exact((icg * h * w).max(1))
        .zip(output.chunks_exact_mut((ocg * oh * ow).max(1)))
        .zip(weights.chunks_exact(span.max(1)));
    for (gi, ((input, output), weights)) in parts.enumerate().take(group) {
        let Some(channels) = channels.range(gi * ocg..(gi + 1) * ocg) else {
            return;
        };
        run(input, weights, &channels, output);
    }
}

/// One convolution's weights as byte quads, for 8-bit dot-product instructions (x86 VNNI's
/// `vpdpbusd`, Arm's `sdot`) that multiply four input bytes by four weights and add the
/// products to a 32-bit lane, exactly.
///
/// The instructions read the input as bytes `x + k` (`k` = 128 for `vpdpbusd`'s unsigned
/// operand, 0 for `sdot`), so a channel sums `Σ w·(x + k)`; the generic kernel's `Σ w·(x − zp)`
/// is that minus `(zp + k)·Σ w`, a constant of the channel, folded into its bias here. Padding
/// becomes `zp + k`, which the correction turns back into 0. The sums agree with the generic
/// kernel's modulo 2^32, as its own wrapping sums do.
///
/// Arm's `smmla` (i8mm) multiplies 2 rows of 8 bytes by 2 columns of 8: for it each channel's
/// quads come in pairs (`per_step` 2), 8 consecutive weights side by side.
pub(crate) struct ByteQuads {
    /// `[group][block][step][MR][per_step]`: four weights (column-matrix rows `4k..4k + 4`) per
    /// i32, the first in the low byte; a step is `per_step` quads of each of the [`MR`]
    /// channels.
    pub(crate) weights: Vec<i32>,
    /// Per output channel: the bias minus `(zp + k)·Σ w`.
    pub(crate) biases: Vec<i32>,
    /// Column-matrix rows rounded up to a multiple of `4 · per_step`, quartered.
    pub(crate) quads: usize,
    /// The input zero point the biases were corrected for.
    pub(crate) zero_point: i32,
}

impl ByteQuads {
    /// Pack `conv`, which the strips kernel packed as `packed`, for instructions that read the
    /// input as `x + k` in quads (`per_step` 1) or octets (2) per channel; `None` for depthwise
    /// layers (they have their own kernels) and input zero points outside int8.
    pub(crate) fn new(conv: &Conv<'_>, packed: &Packed, k: i32, per_step: usize) -> Option<Self> {
        let g = conv.geometry;
        let depthwise = g.group > 1 && g.input[0] == g.group;
        if depthwise || !(-128..=127).contains(&conv.input_zero_point) {
            return None;
        }
        let group = g.group.max(1);
        let [oc, _, _] = g.output;
        let rows = g.input[0] / group * g.kernel[0] * g.kernel[1];
        let per_step = per_step.max(1);
        let quads = rows.div_ceil(4 * per_step) * per_step;
        let (ocg, blocks) = (oc / group, packed.blocks);
        let mut weights = std::vec![0i32; group * blocks * quads * MR];
        let mut biases = Vec::with_capacity(oc);
        let offset = conv.input_zero_point + k;
        for (o, filter) in conv.weights.chunks_exact(rows.max(1)).enumerate().take(oc) {
            let (gi, r) = (o / ocg, o % ocg);
            let tile = (gi * blocks + r / MR) * quads * MR;
            for (q, taps) in filter.chunks(4).enumerate() {
                let (step, part) = (q / per_step, q % per_step);
                weights[tile + (step * MR + r % MR) * per_step + part] = quad_word(taps);
            }
            biases.push(corrected_bias(conv, o, filter, offset));
        }
        Some(Self {
            weights,
            biases,
            quads,
            zero_point: conv.input_zero_point,
        })
    }

    /// The packed weights and corrected biases: what a scrub checksums.
    pub(crate) fn blocks(&self) -> [&[i32]; 2] {
        [&self.weights, &self.biases]
    }

    /// [`ByteQuads::blocks`], for fault injection.
    pub(crate) fn blocks_mut(&mut self) -> [&mut [i32]; 2] {
        [&mut self.weights, &mut self.biases]
    }

    /// A tile's byte-quad strip, in i32: 4 bytes by [`NR`] pixels per quad.
    pub(crate) fn strip_len(&self) -> usize {
        self.quads * NR
    }

    /// Whether a call of `conv` (which the strips kernel accepted) can take these quads.
    pub(crate) fn accepts(&self, conv: &Conv<'_>) -> bool {
        self.zero_point == conv.input_zero_point && self.biases.len() == conv.channels.bias.len()
    }

    /// Hand each group of an accepted call of `conv` (the strips kernel's `layer`) to `run`
    /// with its input, its quads, its channel constants (the corrected biases) and its output.
    pub(crate) fn for_each_group(
        &self,
        conv: &Conv<'_>,
        layer: &Layer<'_>,
        input: &[i8],
        output: &mut [i8],
        run: impl FnMut(&[i8], &[i32], &ChannelQuant<'_>, &mut [i8]),
    ) {
        let channels = ChannelQuant {
            bias: &self.biases,
            ..conv.channels
        };
        let span = self.quads * MR * layer.blocks;
        for_each_group(conv, &channels, &self.weights, span, input, output, run);
    }
}

/// Output channel `o`'s bias for instructions that read the input as `x + k`, its `filter`
/// summing `Σ w·(x + k)`: the bias minus `offset·Σ w`, `offset` being `zp + k`
/// ([`ByteQuads`]).
pub(crate) fn corrected_bias(conv: &Conv<'_>, o: usize, filter: &[i8], offset: i32) -> i32 {
    let sum: i32 = filter.iter().map(|&w| i32::from(w)).sum();
    let (bias, _) = conv.channels.get(o);
    bias.wrapping_sub(offset.wrapping_mul(sum))
}

/// Up to four weights as one word of bytes, the first in the low byte (0 past the last): a
/// byte quad as `vpdpbusd` and `sdot` read it.
pub(crate) fn quad_word(weights: &[i8]) -> i32 {
    weights
        .iter()
        .take(4)
        .enumerate()
        .fold(0u32, |word, (i, &w)| word | (u32::from(w as u8) << (8 * i))) as i32
}

/// One group of a convolution, as the tile loop sees it.
pub(crate) struct Layer<'g> {
    pub(crate) geometry: &'g ConvGeometry,
    /// Input channels per group.
    pub(crate) icg: usize,
    pub(crate) zero_point: i16,
    pub(crate) row_pairs: usize,
    pub(crate) blocks: usize,
    pub(crate) q: OutputQuant,
}

impl Layer<'_> {
    /// Height and width of the input once padded on every side the kernel reaches.
    pub(crate) fn padded_dims(g: &ConvGeometry) -> [usize; 2] {
        let [_, h, w] = g.input;
        let [_, oh, ow] = g.output;
        let reach = |out: usize, s: usize, k: usize, d: usize| {
            (out.max(1) - 1) * s + (k.max(1) - 1) * d + 1
        };
        // Winograd reads 4x4 tiles every 2 pixels: up to 2 * ceil(out / 2) + 2.
        let tiles = |out: usize| 2 * out.div_ceil(2) + 2;
        [
            (h + g.pad[0])
                .max(reach(oh, g.stride[0], g.kernel[0], g.dilation[0]))
                .max(tiles(oh)),
            (w + g.pad[1])
                .max(reach(ow, g.stride[1], g.kernel[1], g.dilation[1]))
                .max(tiles(ow)),
        ]
    }

    /// The tile loop every fast kernel shares: for each tile of [`NR`] output pixels fill its
    /// strip of the column matrix (in `strip`, with `padded` for the padded input), let
    /// `arrange` put it in the order the kernel reads (AVX2 pairs its rows; others leave it),
    /// then let `block` make each block's codes from it, as [`Layer::for_each_tile`] does.
    ///
    /// This and the strip fillers are inlined always: then they are compiled inside the
    /// plug-in's kernel, with its vector extension (AVX2), not for the baseline CPU.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_tiles(
        &self,
        input: &[i8],
        weights: &[i32],
        span: usize,
        channels: usize,
        padded: &mut [i16],
        strip: &mut [i16],
        out: &mut [i8],
        arrange: impl Fn(&mut [i16]),
        block: impl FnMut(&[i32], &[i16], usize) -> [[i8; NR]; MR],
    ) {
        let fill_strip = self.strip_filler(input, padded);
        // The scratch strip is sized for the program's largest layer: this layer's rows only,
        // or every tile would clear the rest of it.
        let Some(strip) = strip.get_mut(..2 * self.row_pairs * NR) else {
            return;
        };
        let fill = |strip: &mut [i16], p0| {
            fill_strip(strip, p0);
            arrange(strip);
        };
        self.for_each_tile(weights, span, channels, strip, out, fill, block);
    }

    /// What fills the strip of the tile from output pixel `p0` on, for this layer's `input`:
    /// a pointwise layer's column matrix is its input (no padded copy to make); any other
    /// layer's input is padded into `padded` once, here.
    #[inline(always)]
    pub(crate) fn strip_filler<'s>(
        &'s self,
        input: &'s [i8],
        padded: &'s mut [i16],
    ) -> impl Fn(&mut [i16], usize) + 's {
        let pointwise = self.is_pointwise();
        let padded: &[i16] = if pointwise {
            &[]
        } else {
            self.pad_input(input, padded)
        };
        move |strip: &mut [i16], p0| {
            if pointwise {
                self.fill_pointwise_strip(input, p0, strip);
            } else {
                self.fill_strip(padded, p0, strip);
            }
        }
    }

    /// For each tile of [`NR`] output pixels, `fill` the tile's input form (`tile_input`) for
    /// pixels from `p0` on, then for each block of [`MR`] output channels, in order, let
    /// `block` turn the block's packed weights (`span` values from `weights`), the tile's input
    /// and the block's first channel into codes, `[channel][pixel]`, while the input is in L1.
    /// Codes of channels past the group's last (`channels`) and of pixels past the last are
    /// not written.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn for_each_tile<T: ?Sized>(
        &self,
        weights: &[i32],
        span: usize,
        channels: usize,
        tile_input: &mut T,
        out: &mut [i8],
        mut fill: impl FnMut(&mut T, usize),
        mut block: impl FnMut(&[i32], &T, usize) -> [[i8; NR]; MR],
    ) {
        let [_, oh, ow] = self.geometry.output;
        let pixels = oh * ow;
        for p0 in (0..pixels).step_by(NR) {
            fill(tile_input, p0);
            for b in 0..self.blocks {
                let Some(tile) = weights.get(b * span..(b + 1) * span) else {
                    return;
                };
                let codes = block(tile, tile_input, b * MR);
                let n = NR.min(pixels - p0);
                for (o, row) in (b * MR..channels).zip(&codes) {
                    store_codes(&mut out[o * pixels + p0..o * pixels + p0 + n], row);
                }
            }
        }
    }

    /// The group's input as 16-bit values minus the zero point, inside a border of zeros
    /// wide enough for every tap, so that filling a strip needs no bounds logic.
    #[inline(always)]
    pub(crate) fn pad_input<'s>(&self, input: &[i8], scratch: &'s mut [i16]) -> &'s [i16] {
        self.pad_input_within(input, scratch, false)
    }

    /// [`Layer::pad_input`], the border left as it is where it is zero already
    /// (`border_zeroed`: this layer's previous group padded into the same scratch).
    #[inline(always)]
    pub(crate) fn pad_input_within<'s>(
        &self,
        input: &[i8],
        scratch: &'s mut [i16],
        border_zeroed: bool,
    ) -> &'s [i16] {
        let g = self.geometry;
        let [_, h, w] = g.input;
        let [hp, wp] = Self::padded_dims(g);
        let padded = &mut scratch[..self.icg * hp * wp];
        let [top, left] = g.pad;
        // One fill for the whole border, once per call: zeroing it row by row was two
        // `memset` calls per row, more than the copy itself on the small planes of depthwise
        // layers, and each of a depthwise layer's channels zeroing its whole plane was a
        // fifth of the instructions of its large-plane layers.
        if !border_zeroed {
            padded.fill(0);
        }
        for (plane, dst) in input
            .chunks_exact(h * w)
            .zip(padded.chunks_exact_mut(hp * wp))
        {
            for (row, src) in dst[top * wp..(top + h) * wp]
                .chunks_exact_mut(wp)
                .zip(plane.chunks_exact(w))
            {
                centre_row(&mut row[left..left + w], src, self.zero_point);
            }
        }
        padded
    }

    /// Whether a depthwise kernel takes this layer (one input channel per group, at most
    /// [`MAX_DEPTHWISE_TAPS`] taps) with a padded-input scratch of `padded` values, of which
    /// its loads may read `slack` past the plane.
    pub(crate) fn depthwise_fits(&self, padded: usize, slack: usize) -> bool {
        let g = self.geometry;
        let [hp, wp] = Self::padded_dims(g);
        self.icg == 1
            && g.kernel[0] * g.kernel[1] <= MAX_DEPTHWISE_TAPS
            && padded >= hp * wp + slack
    }

    /// For the channel-lanes kernels, where `input` holds every channel and every tap of every
    /// output pixel lies inside the padded plane (so their loads need no other check): each
    /// tap's offset ([`Layer::tap_offsets`]).
    pub(crate) fn lanes_taps(&self, input: &[i8]) -> Option<[usize; MAX_DEPTHWISE_TAPS + 1]> {
        let g = self.geometry;
        let [c, h, w] = g.input;
        let [_, oh, ow] = g.output;
        let [hp, wp] = Self::padded_dims(g);
        let [sy, sx] = g.stride;
        let offsets = self.tap_offsets();
        let last = (oh.max(1) - 1) * sy * wp + (ow.max(1) - 1) * sx;
        let reach = offsets.iter().max().copied().unwrap_or(0);
        (input.len() >= c * h * w && last + reach < hp * wp).then_some(offsets)
    }

    /// Lay out `count` channel planes of `planes` pixel by pixel into `laid_out`, `lanes`
    /// values to a padded pixel (16-bit, minus the zero point), channel `i` in lane `i`, inside
    /// the border, which is left as it is. Nothing where `laid_out` is not the padded plane's
    /// size.
    #[inline(always)]
    pub(crate) fn lay_out_channels(
        &self,
        planes: &[i8],
        count: usize,
        lanes: usize,
        laid_out: &mut [i16],
    ) {
        let g = self.geometry;
        let [_, h, w] = g.input;
        let [hp, wp] = Self::padded_dims(g);
        let [top, left] = g.pad;
        // The input inside the border: rows `top..top + h`, columns `left..left + w`, all of
        // them inside the padded plane (its dimensions reach past both).
        if laid_out.len() < hp * wp * lanes || (top + h) * wp > hp * wp || left + w > wp {
            return;
        }
        let lanes_used = count.min(lanes);
        for (lane, plane) in planes
            .chunks_exact((h * w).max(1))
            .take(lanes_used)
            .enumerate()
        {
            for (y, row) in plane.chunks_exact(w.max(1)).enumerate() {
                let at = ((y + top) * wp + left) * lanes + lane;
                // SAFETY: pixel `(y + top, x + left)` is inside `laid_out` (checked above) and
                // `lane < lanes`; one store per value, `lanes` apart.
                unsafe {
                    let dst = laid_out.as_mut_ptr().add(at);
                    for (x, &v) in row.iter().enumerate() {
                        *dst.add(x * lanes) = i16::from(v) - self.zero_point;
                    }
                }
            }
        }
    }

    /// Each tap's offset in the padded plane, row-major; entries past the last tap are 0.
    pub(crate) fn tap_offsets(&self) -> [usize; MAX_DEPTHWISE_TAPS + 1] {
        let g = self.geometry;
        let [_, wp] = Self::padded_dims(g);
        let [kh, kw] = g.kernel;
        let mut offsets = [0usize; MAX_DEPTHWISE_TAPS + 1];
        for (t, offset) in offsets.iter_mut().enumerate().take(kh * kw) {
            *offset = (t / kw) * g.dilation[0] * wp + (t % kw) * g.dilation[1];
        }
        offsets
    }

    /// [`ConvGeometry::is_pointwise`] of this layer.
    pub(crate) fn is_pointwise(&self) -> bool {
        self.geometry.is_pointwise()
    }

    /// A pointwise layer's strip for output pixels `p0..p0 + NR`: each input channel's codes
    /// at those pixels, widened, minus the zero point; 0 past the last pixel and in the odd
    /// row that completes the last pair.
    #[inline(always)]
    pub(crate) fn fill_pointwise_strip(&self, input: &[i8], p0: usize, strip: &mut [i16]) {
        let [_, h, w] = self.geometry.input;
        let pixels = h * w;
        let n = NR.min(pixels.saturating_sub(p0));
        let mut rows = strip.chunks_exact_mut(NR);
        for plane in input.chunks_exact(pixels.max(1)).take(self.icg) {
            let Some(dst) = rows.next() else { return };
            for (d, &s) in dst[..n].iter_mut().zip(&plane[p0..p0 + n]) {
                *d = i16::from(s) - self.zero_point;
            }
            // Only the last tile has pixels to clear: an empty `fill` is still a `memset` call.
            if n < NR {
                dst[n..].fill(0);
            }
        }
        for dst in rows {
            dst.fill(0);
        }
    }

    /// The tile of output pixels from `p0` on as runs within output rows, into `runs`: `(first
    /// pixel in the tile, offset of its window's first tap in the padded plane, length)`. How
    /// many runs, and how many of the tile's pixels are output pixels (fewer than [`NR`] only in
    /// the last tile). Filled in place: returning the runs cost the stem of MobileNetV3-small-224
    /// a quarter of its time (they are made once per tile).
    #[inline(always)]
    pub(crate) fn tile_runs(
        &self,
        p0: usize,
        runs: &mut [(usize, usize, usize); NR],
    ) -> (usize, usize) {
        let g = self.geometry;
        let [_, oh, ow] = g.output;
        let [sy, sx] = g.stride;
        let [_, wp] = Self::padded_dims(g);
        let mut count = 0;
        let (mut oy, mut ox, mut i) = (p0 / ow.max(1), p0 % ow.max(1), 0);
        while i < NR && oy < oh {
            let n = (ow - ox).min(NR - i);
            runs[count] = (i, oy * sy * wp + ox * sx, n);
            count += 1;
            i += n;
            (oy, ox) = (oy + 1, 0);
        }
        (count, i)
    }

    /// Rows `(ic, ky, kx)` of the column matrix for output pixels `p0..p0 + NR`, copied from
    /// the padded input; 0 past the last pixel and in the odd row that completes the last pair.
    #[inline(always)]
    pub(crate) fn fill_strip(&self, padded: &[i16], p0: usize, strip: &mut [i16]) {
        let g = self.geometry;
        let [kh, kw] = g.kernel;
        let sx = g.stride[1];
        let [dy, dx] = g.dilation;
        let [hp, wp] = Self::padded_dims(g);
        let mut runs = [(0, 0, 0); NR];
        let (count, covered) = self.tile_runs(p0, &mut runs);
        let mut rows = strip.chunks_exact_mut(NR);
        if count == 1 && covered == NR {
            // The tile within one output row (every tile of a row of 16 or more but its
            // last): each row of the strip is one run from one place, and the loop needs
            // none of the runs' bookkeeping (a stem's 27 rows per tile cost more in it than
            // in the copies). Kept apart from the loop below: the same test inside it cost
            // more instructions on MobileNetV3-small-224 (57.3 -> 61.1 M).
            let offset = runs[0].1;
            for plane in padded.chunks_exact(hp * wp).take(self.icg) {
                for ky in 0..kh {
                    let line = ky * dy * wp + offset;
                    for kx in 0..kw {
                        let Some(dst) = rows.next() else { return };
                        copy_run(plane.get(line + kx * dx..).unwrap_or_default(), sx, dst);
                    }
                }
            }
            for dst in rows {
                dst.fill(0);
            }
            return;
        }
        // A tile over several output rows: each run is copied as a whole vector's worth where
        // the plane has the values, into a row with room past its end, each later run
        // overwriting what the one before copied past its own end. Copied value by value (a
        // loop per run, as for a last run of a few pixels) these were most of the time of
        // 3x3 layers on planes of 28x28 and less.
        let mut row = [0i16; 2 * NR];
        for plane in padded.chunks_exact(hp * wp).take(self.icg) {
            for ky in 0..kh {
                for kx in 0..kw {
                    let Some(dst) = rows.next() else { return };
                    let tap = &plane[ky * dy * wp + kx * dx..];
                    for &(at, offset, n) in &runs[..count] {
                        let src = &tap[offset..];
                        match whole_run(src, sx) {
                            Some(values) => row[at..at + NR].copy_from_slice(&values),
                            None => copy_run(src, sx, &mut row[at..at + n]),
                        }
                    }
                    row[covered..NR].fill(0);
                    dst.copy_from_slice(&row[..NR]);
                }
            }
        }
        for dst in rows {
            dst.fill(0);
        }
    }
}

/// `dst[k] = src[k] - zero_point`, 16 values at a time where the row has 16 (else 8): the last
/// vector ends at the row's end, overlapping values already written (the same values), rather
/// than finishing value by value (a 14-value row was 8 at once and 6 one by one).
#[inline(always)]
fn centre_row(dst: &mut [i16], src: &[i8], zero_point: i16) {
    let w = dst.len().min(src.len());
    match w {
        16.. => centre_in_vectors::<16>(&mut dst[..w], &src[..w], zero_point),
        8.. => centre_in_vectors::<8>(&mut dst[..w], &src[..w], zero_point),
        _ => {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = i16::from(s) - zero_point;
            }
        }
    }
}

/// [`centre_row`] `N` values at a time, on a row of at least `N`.
#[inline(always)]
fn centre_in_vectors<const N: usize>(dst: &mut [i16], src: &[i8], zero_point: i16) {
    let w = dst.len();
    let mut at = 0;
    while at < w {
        let from = at.min(w.saturating_sub(N));
        if let (Some(Ok(d)), Some(Ok(s))) = (
            dst.get_mut(from..from + N).map(<&mut [i16; N]>::try_from),
            src.get(from..from + N).map(<&[i8; N]>::try_from),
        ) {
            *d = core::array::from_fn(|k| i16::from(s[k]).wrapping_sub(zero_point));
        }
        at += N;
    }
}

/// `dst[k] = src[stride * k]`: one run of a strip row. A whole row at stride 1 or 2 is one
/// vector copy or [`every_second_value`]; anything else value by value.
#[inline(always)]
fn copy_run(src: &[i16], stride: usize, dst: &mut [i16]) {
    if let Ok(dst) = <&mut [i16; NR]>::try_from(&mut *dst) {
        if let Some(values) = whole_run(src, stride) {
            *dst = values;
            return;
        }
    }
    for (d, s) in dst.iter_mut().zip(src.iter().step_by(stride)) {
        *d = *s;
    }
}

/// `src[stride * k]` for a whole vector's worth, `k < NR`, at stride 1 or 2 where `src` holds
/// them.
#[inline(always)]
fn whole_run(src: &[i16], stride: usize) -> Option<[i16; NR]> {
    match stride {
        1 => src.get(..NR)?.try_into().ok(),
        2 => {
            let samples = <&[i16; 2 * NR]>::try_from(src.get(..2 * NR)?).ok()?;
            let mut values = [0i16; NR];
            every_second_value(samples, &mut values);
            Some(values)
        }
        _ => None,
    }
}

/// `dst[k] = samples[2 * k]`: the low halves of 16 words, which compiles to a blend and a
/// pack (the values taken one by one compile to 16 inserts).
#[inline(always)]
fn every_second_value(samples: &[i16; 2 * NR], dst: &mut [i16]) {
    let words: [u32; NR] = core::array::from_fn(|k| {
        u32::from(samples[2 * k] as u16) | u32::from(samples[2 * k + 1] as u16) << 16
    });
    for (d, w) in dst.iter_mut().zip(words) {
        *d = (w & 0xffff) as u16 as i16;
    }
}

/// One group of a depthwise layer, as the depthwise kernels take it.
pub(crate) struct DepthwiseGroup<'g> {
    /// Its one input channel.
    pub(crate) input: &'g [i8],
    /// Its packed weights.
    pub(crate) weights: &'g [i32],
    /// Its output channels' constants.
    pub(crate) channels: &'g ChannelQuant<'g>,
    /// Whether an earlier group of the same call padded its input in the scratch already:
    /// the border is then zero still (each group writes only the inside).
    pub(crate) border_zeroed: bool,
}

/// The widest input row [`max_pool_by_rows`] takes (its rows of maxima live on the stack);
/// wider ones run the generic kernel.
pub(crate) const MAX_POOL_ROW: usize = 4096;

/// Room past a row of maxima for one whole vector of 32 codes: rows shorter than a vector are
/// taken in whole vectors too, the codes past the row being scratch.
const POOL_SLACK: usize = 32;

/// MaxPool with each window's rows reduced column by column first, then whole windows over
/// those column maxima, both loops over contiguous codes that the compiler vectorises (each
/// plug-in calls this from a function with its vector extension enabled; NEON is always on);
/// windows the padding cuts take their columns one by one. Layers with every window inside the
/// input go to [`max_pool_unpadded`] instead. The same bytes as the generic kernel: a maximum
/// does not depend on the order it is taken in.
#[inline(always)]
pub(crate) fn max_pool_by_rows(
    pool: &MaxPool,
    input: &[i8],
    output: &mut [i8],
) -> Result<(), ShapeError> {
    let g = pool.geometry;
    let (in_plane, out_plane) = g.check(input, output)?;
    let ([h, w], [oh, ow], kw) = (g.input, g.output, g.kernel[1]);
    let unpadded = g.pad == [0, 0]
        && (oh - 1) * g.stride[0] + g.kernel[0] <= h
        && (ow - 1) * g.stride[1] + kw <= w;
    if unpadded {
        max_pool_unpadded(pool, input, output);
        return Ok(());
    }
    if w > MAX_POOL_ROW {
        return pool.run(input, output);
    }
    // The column maxima of a window's rows, and the maximum of the `kw` columns from each
    // column on; both with room for whole vectors past the row.
    let mut columns = [i8::MIN; MAX_POOL_ROW + POOL_SLACK];
    let mut windows = [i8::MIN; MAX_POOL_ROW + POOL_SLACK];
    let whole_windows = (w + 1).saturating_sub(kw);
    // Outputs `first..last` have whole windows inside the row; the rest are cut by padding.
    let sx = g.stride[1];
    let whole = |ox: usize| {
        let (x0, x1) = pool_window(ox, sx, g.pad[1], kw, w);
        x1 - x0 == kw && x1 <= w
    };
    let first = (0..ow).find(|&ox| whole(ox)).unwrap_or(ow);
    let last = (first..ow)
        .rev()
        .find(|&ox| whole(ox))
        .map_or(first, |ox| ox + 1);
    for (channel, dst) in output.chunks_exact_mut(out_plane).enumerate() {
        for (oy, row) in dst.chunks_exact_mut(ow).enumerate() {
            let (y0, y1) = pool_window(oy, g.stride[0], g.pad[0], g.kernel[0], h);
            columns.get_mut(..w).unwrap_or_default().fill(i8::MIN);
            for y in y0..y1 {
                // The row and whatever follows it in the input: a short row's vector may
                // read on into the next (the codes past `w` are not used).
                let line = input
                    .get((channel * in_plane + y * w)..)
                    .unwrap_or_default();
                max_into(&mut columns, line, w);
            }
            windows
                .get_mut(..whole_windows)
                .unwrap_or_default()
                .fill(i8::MIN);
            for offset in 0..kw {
                let shifted = columns.get(offset..).unwrap_or_default();
                max_into(&mut windows, shifted, whole_windows);
            }
            // Windows the padding cuts (at the row's ends): their columns one by one.
            for ox in (0..first).chain(last..ow) {
                let (x0, x1) = pool_window(ox, sx, g.pad[1], kw, w);
                if let Some(out) = row.get_mut(ox) {
                    *out = columns
                        .get(x0..x1)
                        .unwrap_or(&[])
                        .iter()
                        .fold(i8::MIN, |m, &c| m.max(c));
                }
            }
            // Whole windows: every `sx`-th maximum from the first one's start.
            let start = (first * sx).saturating_sub(g.pad[1]);
            let maxima = windows.get(start..).unwrap_or(&[]);
            let inner = row.get_mut(first..last).unwrap_or(&mut []);
            store_every(sx, inner, maxima);
        }
    }
    Ok(())
}

/// [`max_pool_by_rows`] where every window lies inside the input (no padding): each run of up
/// to 32 window maxima along an output row comes straight from the `kh * kw` shifted input
/// vectors that cover it, in registers, and every `sx`-th of them is stored. Short rows cost a
/// few vectors each, with no rows of maxima stored and read back. A run's codes past its row
/// land on outputs that later runs write (the output is written in order), so every run is a
/// whole vector store except the very last. The caller checked the buffers and geometry.
#[inline(always)]
fn max_pool_unpadded(pool: &MaxPool, input: &[i8], output: &mut [i8]) {
    let g = pool.geometry;
    let ([h, w], [oh, ow], [kh, kw], [sy, sx]) = (g.input, g.output, g.kernel, g.stride);
    // Outputs one run of 32 maxima gives.
    let per_run = 31 / sx + 1;
    for channel in 0..g.channels {
        for oy in 0..oh {
            let row_start = (channel * h + oy * sy) * w;
            let out_start = (channel * oh + oy) * ow;
            let mut first = 0;
            while first < ow {
                // The last run overlaps the one before rather than running short.
                let at = first.min(ow.saturating_sub(per_run));
                let take = per_run.min(ow - at);
                let start = row_start + at * sx;
                match window_maxima(input, start, w, [kh, kw]) {
                    Some(maxima) => {
                        let picked = pick_every(sx, &maxima);
                        let out = output.get_mut(out_start + at..).unwrap_or_default();
                        match out.get_mut(..32) {
                            Some(whole) => whole.copy_from_slice(&picked),
                            None => {
                                for (o, &p) in out.iter_mut().zip(&picked).take(take) {
                                    *o = p;
                                }
                            }
                        }
                    }
                    // Too near the end of the input for whole vectors: window by window.
                    None => {
                        for k in 0..take {
                            let out = output.get_mut(out_start + at + k);
                            let corner = start + k * sx;
                            let window = (0..kh).flat_map(|dy| {
                                let row = corner + dy * w;
                                input.get(row..row + kw).unwrap_or_default()
                            });
                            if let Some(out) = out {
                                *out = window.fold(i8::MIN, |m, &c| m.max(c));
                            }
                        }
                    }
                }
                first = at + per_run;
            }
        }
    }
}

/// The maxima of the 32 windows whose top left corners are `start..start + 32` (rows `w` apart),
/// or `None` where a vector would run past the input's end. The common 3x3 and 2x2 windows
/// have their loads unrolled.
#[inline(always)]
fn window_maxima(input: &[i8], start: usize, w: usize, kernel: [usize; 2]) -> Option<[i8; 32]> {
    match kernel {
        // Constant windows, so that the loops over taps unroll.
        [3, 3] => window_maxima_over(input, start, w, 3, 3),
        [2, 2] => window_maxima_over(input, start, w, 2, 2),
        [kh, kw] => window_maxima_over(input, start, w, kh, kw),
    }
}

/// [`window_maxima`] for a `kh` x `kw` window.
#[inline(always)]
fn window_maxima_over(
    input: &[i8],
    start: usize,
    w: usize,
    kh: usize,
    kw: usize,
) -> Option<[i8; 32]> {
    let span = input.get(start..start + (kh - 1) * w + kw - 1 + 32)?;
    let mut maxima = [i8::MIN; 32];
    for dy in 0..kh {
        for dx in 0..kw {
            max_of_32(&mut maxima, span, dy * w + dx);
        }
    }
    Some(maxima)
}

/// `maxima[i] = max(maxima[i], span[from + i])`; `span` holds them (checked by the caller).
#[inline(always)]
fn max_of_32(maxima: &mut [i8; 32], span: &[i8], from: usize) {
    if let Some(Ok(codes)) = span.get(from..from + 32).map(<&[i8; 32]>::try_from) {
        for (m, &c) in maxima.iter_mut().zip(codes) {
            *m = (*m).max(c);
        }
    }
}

/// `out[k] = maxima[stride * k]`, a run of 32 maxima at a time where `maxima` has them.
#[inline(always)]
fn store_every(stride: usize, out: &mut [i8], maxima: &[i8]) {
    let per_run = 31 / stride + 1;
    for (k, run) in out.chunks_mut(per_run).enumerate() {
        let from = k * per_run * stride;
        match maxima.get(from..from + 32).map(<&[i8; 32]>::try_from) {
            Some(Ok(whole)) => run.copy_from_slice(&pick_every(stride, whole)[..run.len()]),
            _ => {
                let rest = maxima.get(from..).unwrap_or_default();
                for (o, &m) in run.iter_mut().zip(rest.iter().step_by(stride)) {
                    *o = m;
                }
            }
        }
    }
}

/// `maxima[stride * k]` for each `k` (the first `31 / stride + 1` lanes mean anything).
#[inline(always)]
fn pick_every(stride: usize, maxima: &[i8; 32]) -> [i8; 32] {
    match stride {
        1 => *maxima,
        // The even bytes of 16 words: a mask and a pack, not 16 byte moves.
        2 => {
            let words: [u16; 16] = core::array::from_fn(|k| {
                u16::from_le_bytes([maxima[2 * k] as u8, maxima[2 * k + 1] as u8])
            });
            let mut picked = [i8::MIN; 32];
            for (p, w) in picked.iter_mut().zip(words) {
                *p = (w & 0xff) as u8 as i8;
            }
            picked
        }
        _ => core::array::from_fn(|k| maxima.get(k * stride).copied().unwrap_or(i8::MIN)),
    }
}

/// `dst[i] = max(dst[i], src[i])` for `i < n`, in whole vectors of 32 or 16 codes: the fixed
/// width is what makes the compiler use whole vectors (left to itself it took 8 bytes at a time
/// with a scalar tail of up to 31). A row shorter than 16 is one vector of 16 where both sides
/// have room (the codes past `n` in `dst` are scratch), else a code at a time.
#[inline(always)]
fn max_into(dst: &mut [i8], src: &[i8], n: usize) {
    let n = n.min(dst.len()).min(src.len());
    if n >= 32 {
        max_overlapping::<32>(&mut dst[..n], &src[..n]);
    } else if n >= 16 {
        max_overlapping::<16>(&mut dst[..n], &src[..n]);
    } else if dst.len() >= 16 && src.len() >= 16 {
        max_overlapping::<16>(&mut dst[..16], &src[..16]);
    } else {
        for (d, &s) in dst.iter_mut().zip(src).take(n) {
            *d = (*d).max(s);
        }
    }
}

/// [`max_into`] for rows of at least `W` codes: whole chunks of `W` from the start, then the
/// last `W` codes, overlapping the chunk before (a maximum taken twice is the same maximum),
/// so there is no scalar tail.
#[inline(always)]
fn max_overlapping<const W: usize>(dst: &mut [i8], src: &[i8]) {
    let n = dst.len().min(src.len());
    let mut start = 0;
    while start < n {
        let at = start.min(n.saturating_sub(W));
        if let (Ok(d), Ok(s)) = (
            <&mut [i8; W]>::try_from(dst.get_mut(at..at + W).unwrap_or_default()),
            <&[i8; W]>::try_from(src.get(at..at + W).unwrap_or_default()),
        ) {
            for (d, &s) in d.iter_mut().zip(s) {
                *d = (*d).max(s);
            }
        }
        start = at + W;
    }
}

/// Copy the first `dst.len()` of 16 codes into `dst`: a whole tile as one fixed-size move,
/// which a variable-length copy (a call to `memcpy` per tile) is not.
#[inline]
pub(crate) fn store_codes(dst: &mut [i8], codes: &[i8; NR]) {
    match <&mut [i8; NR]>::try_from(&mut *dst) {
        Ok(whole) => *whole = *codes,
        Err(_) => dst.copy_from_slice(&codes[..dst.len()]),
    }
}

impl Scratch {
    /// Buffers for the largest need of each kind: padded input, strip, transformed input,
    /// products.
    pub(crate) fn for_needs(needs: impl IntoIterator<Item = [usize; 4]>) -> Self {
        let [padded, strip, transformed, products] =
            needs.into_iter().fold([0; 4], |most, need| {
                [0, 1, 2, 3].map(|i| most[i].max(need[i]))
            });
        Self {
            padded: std::vec![0; padded],
            strip: std::vec![0; strip],
            transformed: std::vec![0; transformed],
            products: std::vec![0; products],
        }
    }

    pub(crate) fn fits(&self, [padded, strip, transformed, products]: [usize; 4]) -> bool {
        self.padded.len() >= padded
            && self.strip.len() >= strip
            && self.transformed.len() >= transformed
            && self.products.len() >= products
    }
}

/// Per-call buffers, sized at setup for the largest layer.
pub(crate) struct Scratch {
    /// The padded 16-bit input of one group.
    pub(crate) padded: Vec<i16>,
    /// One strip of the column matrix, `[row][NR]`, read sequentially by the micro-kernel.
    pub(crate) strip: Vec<i16>,
    /// Winograd-transformed input, `[point][strip][channel][NR]`.
    pub(crate) transformed: Vec<i16>,
    /// Winograd products, `[point][channel][tile]`.
    pub(crate) products: Vec<i32>,
}

/// Property tests every fast kernel must pass: the same bytes as the generic kernel.
#[cfg(test)]
pub(crate) mod check {
    use std::vec;
    use std::vec::Vec;

    use super::MAX_POOL_ROW;
    use crate::int8::{
        ChannelQuant, Conv, ConvGeometry, MaxPool, OutputQuant, PoolGeometry, ShapeError,
    };
    use crate::quant::Requant;
    use crate::table::UnaryKernel;
    use kestrel_testing::Rng;

    /// Random pooling geometries (ceil-mode sizes, rows wider than [`MAX_POOL_ROW`], invalid
    /// ones): `fast` must give the generic MaxPool's bytes, and its errors.
    pub(crate) fn max_pools(fast: UnaryKernel<MaxPool>) {
        let mut rng = Rng(0x3a9_2026_1201);
        let mut checked = 0;
        for case in 0..2000 {
            let kernel = [1 + rng.below(4), 1 + rng.below(4)];
            let stride = [1 + rng.below(3), 1 + rng.below(3)];
            let pad = [rng.below(kernel[0]), rng.below(kernel[1])];
            // Wider than the stack row now and then: those take the generic kernel.
            let width =
                [1 + rng.below(70), MAX_POOL_ROW + 1 + rng.below(3)][usize::from(case % 97 == 0)];
            let input = [1 + rng.below(40), width];
            // Floor or ceiling output sizes (ceil_mode), and a window past the input's end
            // (refused alike by both kernels).
            let output = [0, 1].map(|a| {
                let span = input[a] + 2 * pad[a];
                (span.saturating_sub(kernel[a]) + stride[a] * rng.below(2)) / stride[a] + 1
            });
            let geometry = PoolGeometry {
                channels: 1 + rng.below(4),
                input,
                output,
                kernel,
                stride,
                pad,
            };
            let codes: Vec<i8> = (0..geometry.channels * input[0] * input[1])
                .map(|_| rng.draw() as i8)
                .collect();
            let pool = MaxPool { geometry };
            let mut expected = vec![0i8; geometry.channels * output[0] * output[1]];
            let generic = pool.run(&codes, &mut expected);
            let mut got = vec![0i8; expected.len()];
            assert_eq!(fast(&pool, &codes, &mut got), generic, "case {case}");
            assert_eq!(got, expected, "case {case}: {geometry:?}");
            checked += usize::from(generic.is_ok() && width <= MAX_POOL_ROW);
        }
        assert!(
            checked > 800,
            "only {checked} geometries ran the vector kernel"
        );
        // Wrong buffers are the generic kernel's errors.
        let pool = MaxPool {
            geometry: PoolGeometry {
                channels: 2,
                input: [4, 4],
                output: [2, 2],
                kernel: [2, 2],
                stride: [2, 2],
                pad: [0, 0],
            },
        };
        for (inputs, outputs) in [(32, 8), (31, 8), (32, 7), (0, 0)] {
            assert_eq!(
                fast(&pool, &vec![1; inputs], &mut vec![0; outputs]),
                pool.run(&vec![1; inputs], &mut vec![0; outputs])
            );
        }
    }

    /// A fast kernel under test: run `conv` on the buffers, or `None` when it declines.
    pub(crate) type Fast<'f> =
        dyn FnMut(&Conv<'_>, &[i8], &mut [i8]) -> Option<Result<(), ShapeError>> + 'f;

    /// Random real layers (grouped, depthwise, strided, dilated, padded; scales above and
    /// below 1; with and without a fused ReLU): every output byte equals the generic kernel's.
    pub(crate) fn random_layers(seed: u64, fast: &mut Fast<'_>) {
        let mut rng = Rng(seed);
        let mut checked = 0;
        for case in 0..400 {
            if case % 13 == 5 {
                // Pointwise layers over one pixel: the compiler makes them Gemm steps, but a
                // plan may still hold them as convolutions.
                let (c, oc) = (1 + rng.below(300), 1 + rng.below(40));
                let geometry = ConvGeometry {
                    input: [c, 1, 1],
                    output: [oc, 1, 1],
                    kernel: [1, 1],
                    stride: [1, 1],
                    pad: [0, 0],
                    dilation: [1, 1],
                    group: 1,
                };
                compare(&mut rng, geometry, case, fast);
                checked += 1;
                continue;
            }
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
            // Wide enough rows that strided runs fill whole tiles of 16.
            let (h, w) = (kh + rng.below(20), kw + rng.below(44));
            let stride = [1 + rng.below(2), 1 + rng.below(2)];
            let dilation = [1 + rng.below(2), 1 + rng.below(2)];
            let pad = [rng.below(kh), rng.below(kw)];
            let (Some(oh), Some(ow)) = (
                span(h, kh, stride[0], dilation[0], pad[0]),
                span(w, kw, stride[1], dilation[1], pad[1]),
            ) else {
                continue;
            };
            let geometry = ConvGeometry {
                input: [c, h, w],
                output: [oc, oh, ow],
                kernel: [kh, kw],
                stride,
                pad,
                dilation,
                group,
            };
            compare(&mut rng, geometry, case, fast);
            checked += 1;
        }
        assert!(checked > 300, "only {checked} shapes were valid");
    }

    /// Output size of a window `k` with stride `s`, dilation `d` and padding `p` on both sides
    /// over `size` inputs; `None` when the window does not fit.
    fn span(size: usize, k: usize, s: usize, d: usize, p: usize) -> Option<usize> {
        (size + 2 * p)
            .checked_sub(d * (k - 1) + 1)
            .map(|v| v / s + 1)
    }

    /// A random layer of `geometry` (weights, bias, scales above and below 1, zero points,
    /// with or without a fused ReLU) on a random input: `fast` must give the generic kernel's
    /// bytes.
    fn compare(rng: &mut Rng, geometry: ConvGeometry, case: usize, fast: &mut Fast<'_>) {
        compare_scales(rng, geometry, case, case % 4 == 1, fast);
    }

    /// [`compare`], every scale below 1/4 where `narrow`.
    fn compare_scales(
        rng: &mut Rng,
        geometry: ConvGeometry,
        case: usize,
        narrow: bool,
        fast: &mut Fast<'_>,
    ) {
        let [c, h, w] = geometry.input;
        let [oc, oh, ow] = geometry.output;
        let [kh, kw] = geometry.kernel;
        let icg = c / geometry.group;
        let input: Vec<i8> = (0..c * h * w).map(|_| rng.draw() as i8).collect();
        let weights: Vec<i8> = (0..oc * icg * kh * kw).map(|_| rng.draw() as i8).collect();
        let bias: Vec<i32> = (0..oc)
            .map(|_| (rng.draw() % 20001) as i32 - 10000)
            .collect();
        // Mostly scales below 1 (the vector path), some at or above 1 (the scalar path), one
        // in sixteen from 2^-12 down past the smallest, 2^-32 (right shifts up to 62). Every
        // fourth layer (`compare`) all below 1/4, as a trained network's nearly all are: the
        // kernels' compact forms for whole blocks of channels take only those.
        let requant: Vec<Requant> = (0..oc)
            .map(|_| {
                // From 2^-2.5 to 2^-18.5: random layers' sums (tens of thousands) saturate
                // the codes at the larger scales; the smaller ones leave them inside.
                let real = if narrow {
                    2f64.powf(-(rng.below(1600) as f64) / 100.0 - 2.5)
                } else if rng.below(16) == 0 {
                    2f64.powf(-(rng.below(2200) as f64) / 100.0 - 12.0)
                } else {
                    2f64.powf(-(rng.below(1400) as f64) / 100.0 + 1.5)
                };
                Requant::from_real(real).unwrap()
            })
            .collect();
        let multiplier: Vec<i32> = requant.iter().map(|r| r.multiplier).collect();
        let shift: Vec<i8> = requant.iter().map(|r| r.shift).collect();
        let zero_point = rng.below(256) as i32 - 128;
        let relu = rng.below(2) == 0;
        let conv = Conv {
            geometry,
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
        let mut got = vec![0i8; oc * oh * ow];
        fast(&conv, &input, &mut got)
            .expect("the fast kernels take every real layer")
            .unwrap();
        assert_eq!(got, expected, "case {case}: {:?}", conv.geometry);
    }

    /// Networks' stems: dense layers over an image's 3 channels (or 1 or 2) to up to 64 output
    /// channels, 3x3 and 5x5 windows at strides 1 and 2, on planes up to 70 pixels wide.
    pub(crate) fn random_stems(seed: u64, fast: &mut Fast<'_>) {
        let mut rng = Rng(seed);
        for case in 0..120 {
            let k = [[3, 3], [5, 5], [3, 3], [7, 7]][case % 4];
            let stride = [1 + rng.below(2), 1 + rng.below(2)];
            let pad = [k[0] / 2, k[1] / 2];
            let (h, w) = (1 + rng.below(40), 1 + rng.below(70));
            let (Some(oh), Some(ow)) = (
                span(h, k[0], stride[0], 1, pad[0]),
                span(w, k[1], stride[1], 1, pad[1]),
            ) else {
                continue;
            };
            let geometry = ConvGeometry {
                input: [1 + rng.below(3), h, w],
                // Mostly up to 16 (some not a multiple of the 2 or 4 channels the x86 kernels
                // take at once), some up to 64.
                output: [1 + rng.below(if case % 3 == 0 { 64 } else { 16 }), oh, ow],
                kernel: k,
                stride,
                pad,
                dilation: [1, 1],
                group: 1,
            };
            compare(&mut rng, geometry, case, fast);
        }
    }

    /// Random depthwise layers as MobileNets and EfficientNets have them (3x3 and 5x5, strides
    /// 1 and 2, "same" padding) and odder ones (channel multipliers, strides to 3, dilation,
    /// 1x7 windows), rows from 1 to 70 pixels wide: every output byte equals the generic
    /// kernel's.
    pub(crate) fn random_depthwise(seed: u64, fast: &mut Fast<'_>) {
        random_depthwise_planes(seed, [30, 70], fast);
    }

    /// [`random_depthwise`] on planes of at most 16x16 inputs (mostly 8x8) and more channels:
    /// the small planes of a network's last stages.
    pub(crate) fn random_small_depthwise(seed: u64, fast: &mut Fast<'_>) {
        random_depthwise_planes(seed, [8, 8], fast);
        random_depthwise_planes(seed ^ 0x5eed, [16, 16], fast);
    }

    /// Depthwise layers of 16 to 75 channels, 3x3 and 5x5 windows, stride 1 on planes of 6x6 to
    /// 16x16 and stride 2 on planes of 12x12 to 32x32, every scale below 1/4: the small planes
    /// of trained networks' last stages, as the channels-in-lanes kernels take them.
    pub(crate) fn random_lane_depthwise(seed: u64, fast: &mut Fast<'_>) {
        let mut rng = Rng(seed);
        for case in 0..180 {
            let group = 16 + rng.below(60);
            let k = [[3, 3], [5, 5]][case % 2];
            let pad = [k[0] / 2, k[1] / 2];
            let s = 1 + case % 3 / 2;
            let (h, w) = (s * (6 + rng.below(11)), s * (6 + rng.below(11)));
            let (Some(oh), Some(ow)) = (span(h, k[0], s, 1, pad[0]), span(w, k[1], s, 1, pad[1]))
            else {
                continue;
            };
            let geometry = ConvGeometry {
                input: [group, h, w],
                output: [group, oh, ow],
                kernel: k,
                stride: [s, s],
                pad,
                dilation: [1, 1],
                group,
            };
            compare_scales(&mut rng, geometry, case, true, fast);
        }
    }

    /// Depthwise layers on planes of up to `max` input pixels (height, width).
    fn random_depthwise_planes(seed: u64, max: [usize; 2], fast: &mut Fast<'_>) {
        let mut rng = Rng(seed);
        for case in 0..300 {
            let group = 1 + rng.below(if max[0] > 16 { 24 } else { 70 });
            let multiplier = if case % 5 == 0 { 2 } else { 1 };
            let k = [[3, 3], [5, 5], [3, 3], [1, 7], [7, 7]][case % 5];
            let stride = [1 + rng.below(2), 1 + rng.below(2 + case % 2)];
            // Dilated both ways, or only down the columns (the row-quad kernels take that).
            let dilation = match case % 9 {
                0 => [2, 2],
                4 => [2, 1],
                _ => [1, 1],
            };
            let pad = [(k[0] - 1) * dilation[0] / 2, (k[1] - 1) * dilation[1] / 2];
            let (h, w) = (1 + rng.below(max[0]), 1 + rng.below(max[1]));
            let (Some(oh), Some(ow)) = (
                span(h, k[0], stride[0], dilation[0], pad[0]),
                span(w, k[1], stride[1], dilation[1], pad[1]),
            ) else {
                continue;
            };
            let geometry = ConvGeometry {
                input: [group, h, w],
                output: [group * multiplier, oh, ow],
                kernel: k,
                stride,
                pad,
                dilation,
                group,
            };
            compare(&mut rng, geometry, case, fast);
        }
    }

    /// A dense 3x3 layer (4 channels of 40x40, padding 1: the Winograd kernel's, on AVX2) whose
    /// padded and transformed inputs, nonzero, cover the border any smaller layer pads in the
    /// same scratch: run it first, and a later layer reading anything but zeros outside its
    /// input shows.
    pub(crate) struct Dirty {
        geometry: ConvGeometry,
        input: Vec<i8>,
        weights: Vec<i8>,
        bias: Vec<i32>,
        multiplier: Vec<i32>,
        shift: Vec<i8>,
    }

    impl Dirty {
        pub(crate) fn new() -> Self {
            Self::of(ConvGeometry {
                input: [4, 40, 40],
                output: [4, 40, 40],
                kernel: [3, 3],
                stride: [1, 1],
                pad: [1, 1],
                dilation: [1, 1],
                group: 1,
            })
        }

        /// A depthwise 3x3 layer on 16 channels of 8x8 without padding: on the channel-lanes
        /// kernels its laid-out input, nonzero, covers the border any smaller plane lays out in
        /// the same scratch.
        pub(crate) fn depthwise() -> Self {
            Self::of(ConvGeometry {
                input: [16, 8, 8],
                output: [16, 6, 6],
                kernel: [3, 3],
                stride: [1, 1],
                pad: [0, 0],
                dilation: [1, 1],
                group: 16,
            })
        }

        pub(crate) fn of(geometry: ConvGeometry) -> Self {
            let [c, h, w] = geometry.input;
            let oc = geometry.output[0];
            let taps = geometry.kernel[0] * geometry.kernel[1];
            Self {
                geometry,
                input: vec![77; c * h * w],
                weights: vec![1; oc * c / geometry.group * taps],
                bias: vec![0; oc],
                multiplier: vec![1 << 30; oc],
                shift: vec![-6; oc],
            }
        }

        pub(crate) fn conv(&self) -> Conv<'_> {
            Conv {
                geometry: self.geometry,
                weights: &self.weights,
                channels: ChannelQuant {
                    bias: &self.bias,
                    multiplier: &self.multiplier,
                    shift: &self.shift,
                },
                input_zero_point: -100,
                output_quant: OutputQuant {
                    zero_point: 0,
                    min: -128,
                    max: 127,
                },
            }
        }

        /// Run the layer through `kernels` as step `step`.
        pub(crate) fn run(&self, kernels: &mut dyn crate::Kernels, step: usize) {
            let [oc, oh, ow] = self.geometry.output;
            let mut output = vec![0i8; oc * oh * ow];
            let result = kernels.conv(step, &self.conv(), &self.input, &mut output);
            assert_eq!(result, Ok(()));
        }
    }

    /// Random dense and pointwise layers whose output has at most 12 pixels (a network's last
    /// stages at 64x64), with channel counts that leave partial blocks: every output byte equals
    /// the generic kernel's.
    pub(crate) fn random_few_pixels(seed: u64, fast: &mut Fast<'_>) {
        let mut rng = Rng(seed);
        let (mut checked, mut small_planes) = (0, 0);
        for case in 0..300 {
            let k = [1, 3][case % 2];
            let stride = 1 + rng.below(2);
            // Some 3x3 windows dilated: the small-plane gather reads its taps from the geometry.
            let dilation = if k == 3 && case % 5 == 0 { 2 } else { 1 };
            let reach = (k - 1) * dilation + 1;
            let pad = rng.below(k);
            // Output 1x1 to 3x3, and rows or columns of up to 12.
            let sizes = [
                (1, 1),
                (1, 2),
                (2, 1),
                (2, 2),
                (1, 4),
                (4, 1),
                (3, 3),
                (2, 3),
                (3, 4),
            ];
            let (oh, ow) =
                [sizes[rng.below(9)], (1, 1 + rng.below(12))][usize::from(case % 7 == 0)];
            let (h, w) = (
                (oh - 1) * stride + reach - 2 * pad.min((k - 1) / 2),
                (ow - 1) * stride + reach - 2 * pad.min((k - 1) / 2),
            );
            let pad = pad.min((k - 1) / 2);
            let (c, oc) = (1 + rng.below(70), 1 + rng.below(70));
            let (Some(sh), Some(sw)) = (
                span(h, k, stride, dilation, pad),
                span(w, k, stride, dilation, pad),
            ) else {
                continue;
            };
            let geometry = ConvGeometry {
                input: [c, h, w],
                output: [oc, sh, sw],
                kernel: [k, k],
                stride: [stride, stride],
                pad: [pad, pad],
                dilation: [dilation, dilation],
                group: 1,
            };
            compare(&mut rng, geometry, case, fast);
            checked += usize::from(sh * sw <= 12);
            small_planes += usize::from(sh * sw <= 12 && h * w <= 16);
        }
        assert!(checked > 250, "only {checked} layers of at most 12 pixels");
        assert!(
            small_planes > 100,
            "only {small_planes} of them on planes of 16 values"
        );
    }

    /// Geometry no real layer has, drawn 20,000 times from `seed` (mostly small sizes, zero
    /// among them, one draw in ten from the extremes as well), with the input, output and
    /// weight lengths it needs where each is at most `max_len`.
    pub(crate) fn odd_geometries(
        seed: u64,
        max_len: usize,
    ) -> impl Iterator<Item = (ConvGeometry, [usize; 3])> {
        let mut rng = Rng(seed);
        (0..20_000).filter_map(move |case| {
            let extremes = if case % 10 == 0 { 2 } else { 0 };
            let mut pick =
                |n: usize| [1, 2, 3, 7, 0, 5000, usize::MAX / 3][rng.below(n + extremes)];
            let geometry = ConvGeometry {
                input: [pick(4), pick(4), pick(4)],
                output: [pick(4), pick(4), pick(4)],
                kernel: [pick(4), pick(4)],
                stride: [pick(4), pick(4)],
                pad: [pick(5), pick(5)],
                dilation: [pick(4), pick(4)],
                group: pick(5),
            };
            let len = |d: &[usize]| d.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
            let icg = geometry.input[0] / geometry.group.max(1);
            let lengths = [
                len(&geometry.input)?,
                len(&geometry.output)?,
                len(&[
                    geometry.output[0],
                    icg,
                    geometry.kernel[0],
                    geometry.kernel[1],
                ])?,
            ];
            lengths
                .iter()
                .all(|&n| n <= max_len)
                .then_some((geometry, lengths))
        })
    }

    /// Geometry no real layer has, with buffers that match it: the fast path either declines
    /// or answers exactly as the generic kernel does (result and bytes), and never panics.
    pub(crate) fn odd_geometry(seed: u64, fast: &mut Fast<'_>) {
        let mut compared = 0;
        for (geometry, [input_len, output_len, weights_len]) in odd_geometries(seed, 1 << 16) {
            let oc = geometry.output[0];
            let (bias, multiplier, shift) = (vec![0; oc], vec![1 << 30; oc], vec![0; oc]);
            let weights = vec![1i8; weights_len];
            let conv = Conv {
                geometry,
                weights: &weights,
                channels: ChannelQuant {
                    bias: &bias,
                    multiplier: &multiplier,
                    shift: &shift,
                },
                input_zero_point: 0,
                output_quant: OutputQuant {
                    zero_point: 0,
                    min: -128,
                    max: 127,
                },
            };
            let input = vec![1i8; input_len];
            let (mut expected, mut got) = (vec![0i8; output_len], vec![0i8; output_len]);
            let reference = conv.run(&input, &mut expected);
            let Some(result) = fast(&conv, &input, &mut got) else {
                continue;
            };
            assert_eq!(result, reference, "{geometry:?}");
            assert_eq!(got, expected, "{geometry:?}");
            compared += 1;
        }
        assert!(
            compared > 50,
            "only {compared} geometries reached the fast path"
        );
    }
}
