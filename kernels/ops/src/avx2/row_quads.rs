//! Depthwise convolutions (one input channel per group), and the stems of networks (a dense
//! layer over the 3 channels of an image, to few channels), on `vpdpbusd`, for CPUs with
//! AVX-VNNI or AVX-512 VNNI, bit-identical to the generic [`crate::int8::Conv`]. A stem's
//! channel sums the quads of every input plane.
//!
//! A channel's plane is padded as bytes `x + 128`, as the byte-quad kernels read their input
//! ([`crate::strips::ByteQuads`]: the correction that needs is folded into the biases, the
//! padding is the zero point's byte). Each window row's taps go four to a quad, `kx = 4q` to
//! `4q + 3` (weighted 0 past the row's end), so the 32-bit lane loaded at an output pixel's
//! window start holds that quad's four input bytes as they lie in the plane. Loads a byte
//! apart give each lane its own pixel: at stride 1 the loads at `x`, `x + 1`, `x + 2` and
//! `x + 3` hold pixels `x + 4j + r` in lane `j` (32 pixels in four vectors); at stride 2 the
//! loads at `2x` and `2x + 2` pixels `x + 2j + r` (16 pixels in two). One `vpdpbusd` per quad
//! and vector: a 3x3 window's products for 32 pixels in 12 instructions, where
//! [`super::depthwise`]'s `vpmaddwd` takes 36 for 16, and a byte plane to pad instead of a
//! 16-bit one. A byte shuffle puts the requantised codes back in pixel order.
//!
//! Rows of 5 to 16 output pixels would fill half of each vector or less. At stride 2 a block
//! takes two rows instead, two vectors each. At stride 1 the plane is laid out 16 bytes to a
//! row where its rows fit (a row's right padding then shares bytes with the next row's left
//! padding, both the zero point's): each 32-byte load then holds two rows' windows; rows of up
//! to 8 pixels that fit 8 bytes, four. Rows that fit neither (5x5 windows on 7x7 planes, 3x3
//! on 16x16) are laid out as narrow as their windows allow, on a CPU with AVX-512 VBMI2: a
//! block is then 32 consecutive positions of the plane, and `vpcompressb` keeps those that are
//! pixels.

use std::arch::x86_64::*;
use std::vec::Vec;

use super::depthwise::store_vector;
use super::vnni::{flip_signs, Vnni};
use super::{ChannelRequant, NarrowClamp, NarrowScale};
use crate::int8::{ChannelQuant, Conv, ConvGeometry};
use crate::strips::{corrected_bias, for_each_group, quad_word, Layer, Scratch, NR};

/// Most quads a window may have (rows times quads per row): 7x7 windows take 14.
const MAX_QUADS: usize = 16;

/// Output pixels of a block: four vectors of 8 lanes.
const BLOCK: usize = 32;

/// A layer's weights as byte quads along each window row, for `vpdpbusd`.
pub(super) struct RowQuads {
    vnni: Vnni,
    /// `[channel][ic][ky][q]`: input channel `ic`'s window row `ky`'s taps `4q..4q + 4` as a
    /// quad word.
    words: Vec<i32>,
    /// Per output channel: the bias minus `(zp + 128)·Σ w`.
    biases: Vec<i32>,
    /// The input zero point the biases were corrected for.
    zero_point: i32,
    layout: Layout,
    taps: Taps,
    /// Bytes from the plane's start to the end of the furthest load.
    reach: usize,
}

impl RowQuads {
    /// Pack `conv` for `vnni`, where this CPU has it and the layer is one this kernel takes:
    /// depthwise or a [`stem`], no dilation along rows, and a [`Layout`] for its stride and
    /// rows.
    pub(super) fn new(conv: &Conv<'_>, vnni: Vnni) -> Option<Self> {
        let g = conv.geometry;
        let [c, _, _] = g.input;
        let [oc, _, _] = g.output;
        let [kh, kw] = g.kernel;
        let group = g.group.max(1);
        let icg = c / group;
        let per_row = kw.div_ceil(4);
        let depthwise = group > 1 && icg == 1;
        let takes = vnni.available()
            && (depthwise || stem(&g))
            && c.is_multiple_of(group)
            && oc.is_multiple_of(group)
            && g.dilation[1] == 1
            && icg * kh * per_row <= MAX_QUADS
            && (-128..=127).contains(&conv.input_zero_point)
            && conv.weights.len() == oc * icg * kh * kw
            && conv.channels.fits(oc);
        let compress = vnni == Vnni::Avx512
            && std::arch::is_x86_feature_detected!("avx512vbmi2")
            && std::arch::is_x86_feature_detected!("avx512bw");
        let layout = Layout::of(&g, compress).filter(|_| takes)?;
        let offset = conv.input_zero_point + 128;
        let mut words = Vec::with_capacity(oc * icg * kh * per_row);
        let mut biases = Vec::with_capacity(oc);
        for (o, filter) in conv
            .weights
            .chunks_exact((icg * kh * kw).max(1))
            .enumerate()
        {
            for row in filter.chunks_exact(kw.max(1)) {
                words.extend(row.chunks(4).map(quad_word));
            }
            biases.push(corrected_bias(conv, o, filter, offset));
        }
        let taps = Taps::of(&g, &layout, per_row);
        Some(Self {
            vnni,
            words,
            biases,
            zero_point: conv.input_zero_point,
            layout,
            reach: layout.reach(&g, &taps),
            taps,
        })
    }

    /// The quads and corrected biases: what a scrub checksums.
    pub(super) fn blocks(&self) -> [&[i32]; 2] {
        [&self.words, &self.biases]
    }

    /// [`RowQuads::blocks`], for fault injection.
    pub(super) fn blocks_mut(&mut self) -> [&mut [i32]; 2] {
        [&mut self.words, &mut self.biases]
    }

    /// The padded-input scratch this layer needs, in 16-bit values.
    pub(super) fn padded_len(&self) -> usize {
        self.reach.div_ceil(2)
    }

    /// Whether a call of `conv` (which the strips kernel accepted) can take these quads with
    /// `scratch`.
    pub(super) fn accepts(&self, conv: &Conv<'_>, scratch: &Scratch) -> bool {
        self.zero_point == conv.input_zero_point
            && self.biases.len() == conv.channels.bias.len()
            && scratch.padded.len() >= self.padded_len()
    }

    /// Run an accepted call of `conv` (the strips kernel's `layer`) on `input` into `output`.
    #[target_feature(enable = "avx2")]
    pub(super) fn run(
        &self,
        conv: &Conv<'_>,
        layer: &Layer<'_>,
        input: &[i8],
        scratch: &mut Scratch,
        output: &mut [i8],
    ) {
        let channels = ChannelQuant {
            bias: &self.biases,
            ..conv.channels
        };
        let g = layer.geometry;
        let span = g.output[0] / g.group.max(1) * self.taps.count;
        let border = (self.zero_point + 128) as u8;
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut scratch.padded[..]);
        let mut border_filled = false;
        for_each_group(
            conv,
            &channels,
            &self.words,
            span,
            input,
            output,
            |input, words, channels, out| {
                // The border is the same byte for every group: one fill per call.
                self.layout.pad(g, input, border, bytes, border_filled);
                border_filled = true;
                let group = Group {
                    layer,
                    layout: &self.layout,
                    taps: &self.taps,
                    words,
                    channels,
                };
                // SAFETY: `new` checked the CPU has this encoding (and so AVX2); `accepts`
                // checked the scratch holds every load of the plane `pad` laid out.
                unsafe {
                    match self.vnni {
                        Vnni::Avx => group_avx(&group, bytes, out),
                        Vnni::Avx512 => group_avx512(&group, bytes, out),
                    }
                }
            },
        );
    }
}

/// Whether `g` is a network's stem this kernel takes: dense over 3 input channels or fewer
/// (their quads fit [`MAX_QUADS`]), windows of at least 3 taps a row (they fill most of
/// their quads), and at most 16 output channels. Each channel rereads the input planes, where
/// the strips' byte quads build each tile's once for all channels, so those win over more
/// channels: on 3x224x224 inputs, 3x3 stride 2 (`layer_speed`, alternating runs), 16 channels
/// took 0.87 of the quads' time here (MobileNetV3-small), 24 1.01 (ShuffleNetV2), 32 1.10
/// (MobileNetV2, EfficientNet-B0).
fn stem(g: &ConvGeometry) -> bool {
    g.group.max(1) == 1 && g.input[0] <= 3 && g.kernel[1] >= 3 && g.output[0] <= 16
}

/// Offset of each quad's first tap from a window's start in the byte planes, `[ic][ky][q]`.
#[derive(Clone, Copy)]
struct Taps {
    offsets: [usize; MAX_QUADS],
    count: usize,
}

impl Taps {
    fn of(g: &ConvGeometry, layout: &Layout, per_row: usize) -> Self {
        let kh = g.kernel[0].max(1);
        let icg = g.input[0] / g.group.max(1);
        let mut taps = Self {
            offsets: [0; MAX_QUADS],
            count: (icg * kh * per_row).min(MAX_QUADS),
        };
        for (i, offset) in taps.offsets.iter_mut().enumerate().take(taps.count) {
            let (row, q) = (i / per_row, i % per_row);
            let (ic, ky) = (row / kh, row % kh);
            *offset = ic * layout.plane() + ky * g.dilation[0] * layout.pitch + 4 * q;
        }
        taps
    }
}

/// How a layer's byte plane is laid out, and its output rows cut into blocks of four vectors.
#[derive(Clone, Copy)]
struct Layout {
    /// Bytes from one padded row to the next.
    pitch: usize,
    /// Padded rows laid out.
    rows: usize,
    /// Offset of each vector's loads from the block's first window, in bytes.
    vectors: [usize; 4],
    /// Pixels of a row a block computes.
    width: usize,
    /// Output rows a block computes: 1 (up to 32 pixels of a row), 2 (16 codes each) or 4
    /// (8 codes each); 0 for the flat layout, whose blocks are 32 consecutive positions of the
    /// plane, the valid ones compressed into the output ([`Flat`]).
    rows_per_block: usize,
    /// Which positions of a block hold output pixels, by the block's first position modulo
    /// the pitch (the flat layout).
    flat: Flat,
}

/// The flat layout's validity masks: position `p` of a plane laid out `pitch` bytes to a row
/// is output pixel `(p / pitch, p % pitch)` where `p % pitch` is below the output width.
#[derive(Clone, Copy)]
struct Flat {
    /// `masks[r]`: bit `i` set where position `r + i` (modulo the pitch) is a pixel.
    masks: [u32; MAX_FLAT_PITCH],
}

/// Widest pitch of the flat layout.
const MAX_FLAT_PITCH: usize = 32;

impl Flat {
    fn new(pitch: usize, ow: usize) -> Self {
        let mut masks = [0u32; MAX_FLAT_PITCH];
        for (r, mask) in masks.iter_mut().enumerate().take(pitch) {
            for i in 0..BLOCK {
                if (r + i) % pitch.max(1) < ow {
                    *mask |= 1 << i;
                }
            }
        }
        Self { masks }
    }
}

impl Layout {
    /// The layout for `g`'s stride and output rows; `None` for rows of 4 pixels or fewer,
    /// strides other than 1 and 2 along rows, and at stride 1 for rows of up to 16 pixels that
    /// do not fit 16 bytes (or, up to 8, 8 bytes). Where the CPU can `compress` bytes (AVX-512
    /// VBMI2), stride-1 rows of up to 16 pixels take the flat layout instead.
    fn of(g: &ConvGeometry, compress: bool) -> Option<Self> {
        let [hp, wp] = Layer::padded_dims(g);
        let [_, _, w] = g.input;
        let [_, _, ow] = g.output;
        let [sy, sx] = g.stride;
        let left = g.pad[1];
        let rows = |vectors, width, rows_per_block| Self {
            pitch: wp,
            rows: hp,
            vectors,
            width,
            rows_per_block,
            flat: Flat::new(0, 0),
        };
        // Rows of at least this many bytes, one after the other, leave every window's bytes
        // past its row's input in the row's right padding or the next row's left padding
        // (one row more for the last row's).
        let narrowest = (left + w).max((ow + g.kernel[1] - 1).saturating_sub(left));
        let packed = |pitch, width, rows_per_block, flat| {
            (sy == 1 && narrowest <= pitch).then_some(Self {
                pitch,
                rows: hp + 1,
                vectors: [0, 1, 2, 3],
                width,
                rows_per_block,
                flat,
            })
        };
        // Rows of 8 or 16 bytes, so that a block holds 4 or 2 whole rows.
        let stacked = |pitch: usize| packed(pitch, pitch, BLOCK / pitch, Flat::new(0, 0));
        // The narrowest rows, for rows that fit neither 8 nor 16 bytes: 7x7 planes with 5x5
        // windows fill 7 of every 9 positions (0.82 of the channel-lanes kernel's time), 16x16
        // ones with 3x3 windows 16 of 17. Where a stacked layout fits, it was the faster (5x5
        // windows on 14x14: flat took 1.05 times as long).
        let flat = || {
            (compress && narrowest <= MAX_FLAT_PITCH)
                .then(|| packed(narrowest, 1, 0, Flat::new(narrowest, ow)))
                .flatten()
        };
        match sx {
            1 if ow > NR => Some(rows([0, 1, 2, 3], BLOCK, 1)),
            2 if ow > NR => Some(rows([0, 2, 2 * NR, 2 * NR + 2], BLOCK, 1)),
            2 if ow > NR / 4 => Some(rows([0, 2, sy * wp, sy * wp + 2], NR, 2)),
            1 if ow > NR / 2 => stacked(NR).or_else(flat),
            // Rows of 5 to 8 pixels, four to a block (fewer fill too little of it; two rows
            // of 7 to a block, for 5x5 windows on 7x7 planes, took 1.14 times the channel-lanes
            // kernel's time).
            1 if ow > NR / 4 => stacked(NR / 2).or_else(flat),
            _ => None,
        }
    }

    /// Bytes from the plane's start to the end of the furthest load of a layer of geometry
    /// `g` whose quads are `taps`: its last row's last block, last quad, furthest vector.
    fn reach(&self, g: &ConvGeometry, taps: &Taps) -> usize {
        let [_, oh, ow] = g.output;
        let [sy, sx] = g.stride;
        let last_tap = taps.offsets[..taps.count]
            .iter()
            .max()
            .copied()
            .unwrap_or(0);
        let furthest_vector = self.vectors.iter().max().copied().unwrap_or(0);
        let last_block = (oh.max(1) - 1) * sy * self.pitch + ow.saturating_sub(self.width) * sx;
        let planes = g.input[0] / g.group.max(1);
        (last_block + last_tap + furthest_vector + BLOCK).max(planes * self.plane())
    }

    /// Bytes of one input channel's plane.
    fn plane(&self) -> usize {
        self.rows * self.pitch
    }

    /// A group's `input` planes as bytes `x + 128`, one after the other, row `y` from
    /// `(top + y) * pitch + left` of its plane, inside a border of `border` (left as it is
    /// where `border_filled`: an earlier group of the same call padded into the same scratch);
    /// nothing where `bytes` is too small.
    #[target_feature(enable = "avx2")]
    fn pad(
        &self,
        g: &ConvGeometry,
        input: &[i8],
        border: u8,
        bytes: &mut [u8],
        border_filled: bool,
    ) {
        let [c, h, w] = g.input;
        let [top, left] = g.pad;
        let plane = self.plane();
        let Some(planes) = bytes.get_mut(..c / g.group.max(1) * plane) else {
            return;
        };
        if !border_filled {
            planes.fill(border);
        }
        for (src, dst) in input
            .chunks_exact((h * w).max(1))
            .zip(planes.chunks_exact_mut(plane.max(1)))
        {
            for (y, src) in src.chunks_exact(w.max(1)).enumerate() {
                let at = (top + y) * self.pitch + left;
                if let Some(dst) = dst.get_mut(at..at + w) {
                    flip_signs(src, dst);
                }
            }
        }
    }
}

/// One group of a call: its output channels' quads and constants.
struct Group<'g> {
    layer: &'g Layer<'g>,
    layout: &'g Layout,
    taps: &'g Taps,
    words: &'g [i32],
    channels: &'g ChannelQuant<'g>,
}

/// The 32 codes of a block whose two pairs of vectors of sums requantised to `first` and
/// `second`, in pixel order (two rows' 16 in turn for blocks of two rows); `stride` is the
/// layer's along rows. The requantisation reads a pair as pixels 0-3 and 8-11, then 4-7 and
/// 12-15 (the order `vpunpck*wd` leaves): its bytes are lanes 0-3 of the first vector, 0-3 of
/// the second, 4-7 of the first, 4-7 of the second.
#[inline]
#[target_feature(enable = "avx2")]
fn in_pixel_order(first: __m128i, second: __m128i, stride: usize) -> [__m128i; 2] {
    if stride == 1 {
        // Vector r's lane j is pixel 4j + r: lanes 0-3 of the four vectors are a 4x4
        // transpose of pixels 0-15, lanes 4-7 of pixels 16-31.
        let transpose = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        return [
            _mm_shuffle_epi8(_mm_unpacklo_epi64(first, second), transpose),
            _mm_shuffle_epi8(_mm_unpackhi_epi64(first, second), transpose),
        ];
    }
    // Stride 2: each pair of vectors holds the even and the odd pixels of 16.
    let interleave = _mm_setr_epi8(0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15);
    [
        _mm_shuffle_epi8(first, interleave),
        _mm_shuffle_epi8(second, interleave),
    ]
}

/// Store the codes of a block of the flat layout whose positions `mask` says are pixels, at
/// `at` in `out`, one after the other: a whole 32-byte store where the plane has room (the
/// bytes past the block's pixels are the next block's to write).
///
/// # Safety
/// The CPU must have AVX-512 VBMI2, BW and VL.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vbmi2")]
unsafe fn store_compressed(out: &mut [i8], at: usize, mask: u32, [lo, hi]: [__m128i; 2]) {
    let codes = _mm256_maskz_compress_epi8(mask, _mm256_set_m128i(hi, lo));
    match out.get_mut(at..at + BLOCK) {
        // SAFETY: `dst` is 32 bytes, one 256-bit store.
        Some(dst) => unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), codes) },
        None => {
            let mut last = [0i8; BLOCK];
            // SAFETY: `last` holds 32 bytes, one 256-bit store.
            unsafe { _mm256_storeu_si256(last.as_mut_ptr().cast(), codes) };
            let n = mask.count_ones() as usize;
            if let Some(dst) = out.get_mut(at..at + n) {
                dst.copy_from_slice(&last[..n]);
            }
        }
    }
}

/// Store a block of `rows` output rows from `oy` on (those before the plane's `[oh, ow]` end),
/// whose 32 codes are `codes`: each row's are the next `32 / rows` of them.
#[inline]
#[target_feature(enable = "avx2")]
fn store_rows(out: &mut [i8], oy: usize, [oh, ow]: [usize; 2], rows: usize, codes: [__m128i; 2]) {
    if rows == 2 {
        store_vector(out, oy * ow, ow, codes[0]);
        if oy + 1 < oh {
            store_vector(out, (oy + 1) * ow, ow, codes[1]);
        }
        return;
    }
    // Four rows of up to 8 codes: each a 64-bit half. Stored as [`store_vector`] does, whole
    // where the plane has room.
    let halves = codes.map(|c| {
        // SAFETY: AVX2 is enabled here, and with it SSE4.1.
        let (low, high) = (_mm_cvtsi128_si64(c), _mm_extract_epi64::<1>(c));
        [low, high]
    });
    for (k, half) in halves
        .into_iter()
        .flatten()
        .enumerate()
        .take(oh.saturating_sub(oy))
    {
        let at = (oy + k) * ow;
        let bytes = half.to_le_bytes();
        match out.get_mut(at..at + 8) {
            Some(dst) => dst.copy_from_slice(&bytes.map(|b| b as i8)),
            None => {
                if let Some(dst) = out.get_mut(at..at + ow.min(8)) {
                    for (d, &b) in dst.iter_mut().zip(&bytes) {
                        *d = b as i8;
                    }
                }
            }
        }
    }
}

/// A group's output channels from its input plane, padded as bytes at the start of `plane`,
/// in `vpdpbusd` encoding `$dp`; `$sums` is made for the same features, so that it is inlined
/// and the sums stay in registers.
macro_rules! group_rows {
    ($name:ident, $channel:ident, $sums:ident, $features:literal, $dp:ident) => {
        /// The sums of one block from the window starting at `at`: `count` quads (`QUADS` where
        /// not 0, so that the loop unrolls with the weights in registers).
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $sums<const QUADS: usize>(
            plane: *const u8,
            at: usize,
            taps: &Taps,
            vectors: [usize; 4],
            words: &[i32; MAX_QUADS],
        ) -> [__m256i; 4] {
            let count = if QUADS > 0 { QUADS } else { taps.count };
            // Even quads into one set of sums, odd ones into another: a `vpdpbusd`'s sum is
            // ready for the next after 5 cycles, and a 5x5 window's 10 in a row held each
            // block up for 50 (two chains: 0.88 of the time on MobileNetV3-small-224's 5x5
            // layers).
            let mut even = [_mm256_setzero_si256(); 4];
            let mut odd = [_mm256_setzero_si256(); 4];
            let step = |i: usize, sums: &mut [__m256i; 4]| {
                let weight = _mm256_set1_epi32(words[i]);
                let offset = taps.offsets[i];
                for (sum, &vector) in sums.iter_mut().zip(&vectors) {
                    // SAFETY: the caller vouches for every load of the block.
                    let bytes =
                        unsafe { _mm256_loadu_si256(plane.add(at + offset + vector).cast()) };
                    *sum = $dp(*sum, bytes, weight);
                }
            };
            let count = count.min(MAX_QUADS);
            // A 3x3 window's 3 quads are one chain (two were no faster).
            let paired = if count >= 6 { count / 2 * 2 } else { 0 };
            for i in (0..paired).step_by(2) {
                step(i, &mut even);
                step(i + 1, &mut odd);
            }
            for i in paired..count {
                step(i, &mut even);
            }
            for (e, o) in even.iter_mut().zip(odd) {
                *e = _mm256_add_epi32(*e, o);
            }
            even
        }

        /// One output channel from its `words`, its sums' codes made by `codes` (the
        /// channel's requantisation, a closure so that it is inlined).
        ///
        /// # Safety
        /// As for the group's function.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $channel(
            group: &Group<'_>,
            plane: *const u8,
            words: &[i32; MAX_QUADS],
            out: &mut [i8],
            codes: impl Fn(__m256i, __m256i) -> __m128i,
        ) {
            let Group {
                layer,
                layout,
                taps,
                ..
            } = *group;
            let g = layer.geometry;
            let [_, oh, ow] = g.output;
            let [sy, sx] = g.stride;
            let block = |at: usize| {
                // SAFETY: as for this function.
                let [a, b, c, d] = unsafe {
                    match taps.count {
                        3 => $sums::<3>(plane, at, taps, layout.vectors, words),
                        9 => $sums::<9>(plane, at, taps, layout.vectors, words),
                        10 => $sums::<10>(plane, at, taps, layout.vectors, words),
                        _ => $sums::<0>(plane, at, taps, layout.vectors, words),
                    }
                };
                in_pixel_order(codes(a, b), codes(c, d), sx)
            };
            if layout.rows_per_block == 0 {
                // Blocks of 32 positions from the plane's start (a pixel's window starts at
                // its position), each block's pixels following the last block's in the output.
                let positions = (oh.max(1) - 1) * layout.pitch + ow;
                let (mut residue, mut at) = (0, 0);
                for first in (0..positions).step_by(BLOCK) {
                    let mut mask = layout.flat.masks[residue];
                    if positions - first < BLOCK {
                        mask &= (1 << (positions - first)) - 1;
                    }
                    let codes = block(first);
                    // SAFETY: the flat layout is made only where the CPU has AVX-512 VBMI2
                    // and BW (`RowQuads::new`).
                    unsafe { store_compressed(out, at, mask, codes) };
                    at += mask.count_ones() as usize;
                    residue += BLOCK;
                    while residue >= layout.pitch {
                        residue -= layout.pitch;
                    }
                }
                return;
            }
            if layout.rows_per_block > 1 {
                for oy in (0..oh).step_by(layout.rows_per_block) {
                    let codes = block(oy * sy * layout.pitch);
                    store_rows(out, oy, [oh, ow], layout.rows_per_block, codes);
                }
                return;
            }
            for oy in 0..oh {
                for v in 0..ow.div_ceil(BLOCK) {
                    // The last block of a row ends at its end, or starts there where the row
                    // is shorter than a block.
                    let x = (v * BLOCK).min(ow.saturating_sub(BLOCK));
                    let n = ow - x;
                    let [a, b] = block(oy * sy * layout.pitch + x * sx);
                    let at = oy * ow + x;
                    store_vector(out, at, n, a);
                    store_vector(out, at + NR, n.saturating_sub(NR), b);
                }
            }
        }

        /// # Safety
        /// The CPU must have the features; `plane` must hold every load [`RowQuads::reach`]
        /// counts.
        #[target_feature(enable = $features)]
        unsafe fn $name(group: &Group<'_>, plane: &[u8], out: &mut [i8]) {
            let Group {
                layer,
                taps,
                words,
                channels,
                ..
            } = *group;
            let [_, oh, ow] = layer.geometry.output;
            let clamp = NarrowClamp::new(layer.q);
            let plane = plane.as_ptr();
            for (r, out) in out.chunks_exact_mut((oh * ow).max(1)).enumerate() {
                let mut channel_words = [0; MAX_QUADS];
                let first = r * taps.count;
                for (w, &word) in channel_words
                    .iter_mut()
                    .zip(&words[first..first + taps.count])
                {
                    *w = word;
                }
                let words = &channel_words;
                let (bias, requant) = channels.get(r);
                // SAFETY: as for this function.
                unsafe {
                    match NarrowScale::new(bias, requant, layer.q) {
                        Some(narrow) => $channel(group, plane, words, out, |lo, hi| {
                            narrow.codes_vector([lo, hi], &clamp)
                        }),
                        None => {
                            let requant = ChannelRequant::new(bias, requant, layer.q);
                            $channel(group, plane, words, out, |lo, hi| {
                                requant.tile_vector(lo, hi)
                            })
                        }
                    }
                }
            }
        }
    };
}

group_rows!(
    group_avx,
    channel_avx,
    sums_avx,
    "avx2,avxvnni",
    _mm256_dpbusd_avx_epi32
);
group_rows!(
    group_avx512,
    channel_avx512,
    sums_avx512,
    "avx2,avx512vnni,avx512vl",
    _mm256_dpbusd_epi32
);
