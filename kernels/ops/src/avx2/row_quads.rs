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
use std::mem::MaybeUninit;
use std::vec::Vec;

use super::depthwise::store_vector;
use super::vnni::{flip_signs, Vnni};
use super::{ChannelRequant, NarrowClamp, NarrowScale};
use crate::int8::OutputQuant;
use crate::int8::{ChannelQuant, Conv, ConvGeometry};
use crate::quant::Requant;
use crate::strips::{corrected_bias, quad_word, Layer, Scratch, NR};

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
    /// Groups padded and computed together: a depthwise layer's channels go through the
    /// kernel [`CHUNK_BYTES`] of planes at a time, a stem is one group.
    chunk: usize,
    /// Bytes from the first plane's start to the end of the furthest load of a chunk.
    reach: usize,
}

/// Bytes of padded planes a depthwise chunk lays out at once: few enough to stay in L1 while
/// they are read. Padding and computing a channel at a time, each channel's setup (the
/// group's slices, its constants) cost more than its arithmetic on 7x7 planes.
const CHUNK_BYTES: usize = 16 * 1024;

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
        let chunk = if depthwise {
            (CHUNK_BYTES / layout.plane().max(1)).clamp(1, group)
        } else {
            1
        };
        Some(Self {
            vnni,
            words,
            biases,
            zero_point: conv.input_zero_point,
            layout,
            reach: (chunk - 1) * layout.plane() + layout.reach(&g, &taps),
            chunk,
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
        let g = layer.geometry;
        let [c, h, w] = g.input;
        let [oc, oh, ow] = g.output;
        let group = g.group.max(1);
        let (icg, ocg) = (c / group, oc / group);
        let border = (self.zero_point + 128) as u8;
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut scratch.padded[..]);
        let chunk = self.chunk.max(1);
        let inputs = input.chunks((chunk * icg * h * w).max(1));
        let outputs = output.chunks_mut((chunk * ocg * oh * ow).max(1));
        let words = self.words.chunks((chunk * ocg * self.taps.count).max(1));
        let per_chunk = chunk * ocg;
        let all = ChannelQuant {
            bias: &self.biases,
            ..conv.channels
        };
        for (i, ((input, out), words)) in inputs.zip(outputs).zip(words).enumerate() {
            let Some(channels) = all.range(i * per_chunk..((i + 1) * per_chunk).min(oc)) else {
                return;
            };
            // The border is the same byte for every chunk: one fill per call.
            self.layout.pad(g, input, border, bytes, i > 0);
            let group = Group {
                layer,
                layout: &self.layout,
                taps: &self.taps,
                words,
                channels: &channels,
                ocg,
            };
            // SAFETY: `new` checked the CPU has this encoding (and so AVX2); `accepts`
            // checked the scratch holds every load of the planes `pad` laid out.
            unsafe {
                match self.vnni {
                    Vnni::Avx => group_avx(&group, bytes, out),
                    Vnni::Avx512 => group_avx512(&group, bytes, out),
                }
            }
        }
    }
}

/// Whether `g` is a network's stem this kernel takes: dense over 3 input channels or fewer
/// (their quads fit [`MAX_QUADS`]), windows of at least 3 taps a row (they fill most of
/// their quads), and at most 64 output channels. Where its blocks are rows, channels share
/// each block's loads four at a time (two with AVX-VNNI's 16 registers). On 3x224x224 inputs,
/// 3x3 stride 2, against the strips' byte quads (alternating runs, AVX-512 VNNI): 16 channels
/// 0.74 of their time (MobileNetV3-small), 24 0.72 (ShuffleNetV2), 32 0.82 (MobileNetV2,
/// EfficientNet-B0), 64 0.92 (SqueezeNet); with AVX-VNNI's two at a time, 32 channels 0.99.
/// With AVX-512, sixteen channels at a time go in the lanes instead ([`stem_lanes_avx512`]).
fn stem(g: &ConvGeometry) -> bool {
    g.group.max(1) == 1 && g.input[0] <= 3 && g.kernel[1] >= 3 && g.output[0] <= 64
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

    /// The `input` planes (a group's, or a depthwise chunk's) as bytes `x + 128`, one after
    /// the other, row `y` from `(top + y) * pitch + left` of its plane, inside a border of
    /// `border` (left as it is where `border_filled`: an earlier chunk of the same call, as
    /// large or larger, padded into the same scratch); nothing where `bytes` is too small.
    #[target_feature(enable = "avx2")]
    fn pad(
        &self,
        g: &ConvGeometry,
        input: &[i8],
        border: u8,
        bytes: &mut [u8],
        border_filled: bool,
    ) {
        let [_, h, w] = g.input;
        let [top, left] = g.pad;
        let plane = self.plane();
        let Some(planes) = bytes.get_mut(..input.len() / (h * w).max(1) * plane) else {
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

/// A channel's requantisation of a block's four vectors of sums, into codes in the order
/// [`in_pixel_order`] reads.
// Made per channel on the stack, where a box for the general form would allocate per call.
#[allow(clippy::large_enum_variant)]
enum BlockRequant {
    Narrow(NarrowScale),
    General(ChannelRequant),
}

impl BlockRequant {
    #[target_feature(enable = "avx2")]
    fn new(bias: i32, requant: Requant, q: OutputQuant) -> Self {
        match NarrowScale::new(bias, requant, q) {
            Some(narrow) => Self::Narrow(narrow),
            None => Self::General(ChannelRequant::new(bias, requant, q)),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn codes(&self, [a, b, c, d]: [__m256i; 4], clamp: &NarrowClamp) -> __m256i {
        match self {
            Self::Narrow(narrow) => narrow.codes32([a, b, c, d], clamp),
            Self::General(requant) => {
                // Each pair's codes are lanes 0-3 of both vectors, then 4-7.
                let (first, second) = (requant.tile_vector(a, b), requant.tile_vector(c, d));
                _mm256_set_m128i(
                    _mm_unpackhi_epi64(first, second),
                    _mm_unpacklo_epi64(first, second),
                )
            }
        }
    }
}

/// One group of a call, or a chunk of a depthwise layer's: its output channels' quads and
/// constants.
struct Group<'g> {
    layer: &'g Layer<'g>,
    layout: &'g Layout,
    taps: &'g Taps,
    words: &'g [i32],
    channels: &'g ChannelQuant<'g>,
    /// Output channels per group: those reading each laid-out plane (a stem's read them all).
    ocg: usize,
}

/// The 32 codes of a block in pixel order (two rows' 16 in turn for blocks of two rows), from
/// its four vectors' codes as [`NarrowScale::codes32`] leaves them (lanes 0-3 of each vector
/// in turn, then lanes 4-7); `stride` is the layer's along rows.
#[inline]
#[target_feature(enable = "avx2")]
fn in_pixel_order(codes: __m256i, stride: usize) -> __m256i {
    if stride == 1 {
        // Vector r's lane j is pixel 4j + r: each half is a 4x4 transpose of 16 pixels.
        let transpose = _mm256_setr_epi8(
            0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, //
            0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
        );
        return _mm256_shuffle_epi8(codes, transpose);
    }
    // Stride 2: vectors 0 and 1 hold the even and the odd of pixels 0-15, 2 and 3 of 16-31;
    // their lanes 0-3 and 4-7 are gathered into each half, then interleaved.
    let halves = _mm256_permute4x64_epi64::<0b11_01_10_00>(codes);
    let interleave = _mm256_setr_epi8(
        0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15, //
        0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15,
    );
    _mm256_shuffle_epi8(halves, interleave)
}

/// A block's 32 codes as two halves of 16.
#[inline]
#[target_feature(enable = "avx2")]
fn halves(codes: __m256i) -> [__m128i; 2] {
    [
        _mm256_castsi256_si128(codes),
        _mm256_extracti128_si256::<1>(codes),
    ]
}

/// Store the codes of a block of the flat layout whose positions `mask` says are pixels, at
/// `at` in `out`, one after the other: a whole 32-byte store where the plane has room (the
/// bytes past the block's pixels are the next block's to write).
///
/// # Safety
/// The CPU must have AVX-512 VBMI2, BW and VL.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vbmi2")]
unsafe fn store_compressed(out: &mut [i8], at: usize, mask: u32, codes: __m256i) {
    let codes = _mm256_maskz_compress_epi8(mask, codes);
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
fn store_rows(out: &mut [i8], oy: usize, [oh, ow]: [usize; 2], rows: usize, codes: __m256i) {
    let codes = halves(codes);
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
    (
        $name:ident,
        $channel:ident,
        $stem_rows:ident,
        $sums:ident,
        $stem_channels:literal,
        $features:literal,
        $dp:ident,
        $stem_lanes:ident,
        $depthwise_lanes:ident
    ) => {
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

        /// One output channel from its `words`, a block's sums' codes made by `codes` (the
        /// channel's requantisation, a closure so that it is inlined) in the order
        /// [`in_pixel_order`] reads.
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
            codes: impl Fn([__m256i; 4]) -> __m256i,
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
            // A macro, not a closure: the closure was not inlined (a call per block, its
            // captures reloaded each time).
            macro_rules! block {
                ($at:expr) => {{
                    let at = $at;
                    // SAFETY: as for this function.
                    let sums = unsafe {
                        match taps.count {
                            3 => $sums::<3>(plane, at, taps, layout.vectors, words),
                            9 => $sums::<9>(plane, at, taps, layout.vectors, words),
                            10 => $sums::<10>(plane, at, taps, layout.vectors, words),
                            _ => $sums::<0>(plane, at, taps, layout.vectors, words),
                        }
                    };
                    in_pixel_order(codes(sums), sx)
                }};
            }
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
                    let codes = block!(first);
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
                    let codes = block!(oy * sy * layout.pitch);
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
                    let [a, b] = halves(block!(oy * sy * layout.pitch + x * sx));
                    let at = oy * ow + x;
                    store_vector(out, at, n, a);
                    store_vector(out, at + NR, n.saturating_sub(NR), b);
                }
            }
        }

        /// `CB` output channels of a stem whose blocks are rows of 32 pixels (or fewer), their
        /// quads `words[j]` and requantisations `requants[j]`, into the first `CB` planes of
        /// `out`: each block's loads are shared by the channels, where a channel at a time
        /// loads each input byte again for every channel.
        ///
        /// # Safety
        /// As for the group's function.
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $stem_rows<const CB: usize>(
            group: &Group<'_>,
            plane: *const u8,
            words: &[[i32; MAX_QUADS]; CB],
            requants: &[BlockRequant; CB],
            clamp: &NarrowClamp,
            out: &mut [i8],
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
            let plane_len = (oh * ow).max(1);
            let count = taps.count.min(MAX_QUADS);
            for oy in 0..oh {
                for v in 0..ow.div_ceil(BLOCK) {
                    // As in the one-channel kernel: the last block of a row ends at its end.
                    let x = (v * BLOCK).min(ow.saturating_sub(BLOCK));
                    let n = ow - x;
                    let start = oy * sy * layout.pitch + x * sx;
                    let mut sums = [[_mm256_setzero_si256(); 4]; CB];
                    for i in 0..count {
                        let offset = taps.offsets[i];
                        // SAFETY: the caller vouches for every load of the block.
                        let bytes = layout.vectors.map(|vector| unsafe {
                            _mm256_loadu_si256(plane.add(start + offset + vector).cast())
                        });
                        for (sums, words) in sums.iter_mut().zip(words) {
                            let weight = _mm256_set1_epi32(words[i]);
                            for (sum, &bytes) in sums.iter_mut().zip(&bytes) {
                                *sum = $dp(*sum, bytes, weight);
                            }
                        }
                    }
                    let at = oy * ow + x;
                    for (j, (sums, requant)) in sums.into_iter().zip(requants).enumerate() {
                        let [a, b] = halves(in_pixel_order(requant.codes(sums, clamp), sx));
                        // Within the channel's plane but for the last channel's: a store
                        // past a plane's end would land on the next one's codes, written
                        // already.
                        let end = if j + 1 < CB {
                            (j + 1) * plane_len
                        } else {
                            out.len()
                        };
                        if let Some(plane_out) = out.get_mut(j * plane_len..end) {
                            store_vector(plane_out, at, n, a);
                            store_vector(plane_out, at + NR, n.saturating_sub(NR), b);
                        }
                    }
                }
            }
        }

        /// # Safety
        /// The CPU must have the features; `plane` must hold every load [`RowQuads::reach`]
        /// counts.
        #[target_feature(enable = $features)]
        unsafe fn $name(group: &Group<'_>, planes: &[u8], out: &mut [i8]) {
            let Group {
                layer,
                layout,
                taps,
                words,
                channels,
                ocg,
            } = *group;
            let [_, oh, ow] = layer.geometry.output;
            let clamp = NarrowClamp::new(layer.q);
            let plane_len = (oh * ow).max(1);
            let channel = |r: usize| {
                let mut channel_words = [0; MAX_QUADS];
                let first = r * taps.count;
                if let Some(words) = words.get(first..first + taps.count) {
                    for (w, &word) in channel_words.iter_mut().zip(words) {
                        *w = word;
                    }
                }
                let (bias, requant) = channels.get(r);
                (channel_words, BlockRequant::new(bias, requant, layer.q))
            };
            let channels_out = out.len() / plane_len;
            let mut r = 0;
            // A stem's channels `$stem_channels` at a time where its blocks are rows, or
            // sixteen at a time in the lanes where `$stem_lanes` takes them.
            if layer.geometry.group.max(1) == 1 && layout.rows_per_block == 1 {
                while r + LANES <= channels_out {
                    let Some(out) = out.get_mut(r * plane_len..) else {
                        break;
                    };
                    // SAFETY: as for this function; a stem's channels read the same planes.
                    if !unsafe { $stem_lanes(group, planes, r, &clamp, out) } {
                        break;
                    }
                    r += LANES;
                }
                while r + $stem_channels <= channels_out {
                    let mut words = [[0; MAX_QUADS]; $stem_channels];
                    let requants: [_; $stem_channels] = core::array::from_fn(|j| {
                        let (channel_words, requant) = channel(r + j);
                        words[j] = channel_words;
                        requant
                    });
                    if let Some(out) = out.get_mut(r * plane_len..) {
                        // SAFETY: as for this function; a stem's channels read the same
                        // planes, from the first.
                        unsafe {
                            $stem_rows(group, planes.as_ptr(), &words, &requants, &clamp, out)
                        };
                    }
                    r += $stem_channels;
                }
            }
            // A depthwise chunk's channels sixteen at a time in the lanes where
            // `$depthwise_lanes` takes them.
            if ocg == 1 && layer.geometry.group.max(1) > 1 {
                while r + LANES <= channels_out {
                    // SAFETY: as for this function: the chunk's planes, one after the other.
                    if !unsafe { $depthwise_lanes(group, planes, r, &clamp, out) } {
                        break;
                    }
                    r += LANES;
                }
            }
            for r in r..channels_out {
                // The channel's plane and the later channels': a block's whole-vector store
                // past the plane's end lands on the next plane's first codes, written after
                // it, where a store cut at the plane's end went through the stack.
                let Some(out) = out.get_mut(r * plane_len..) else {
                    break;
                };
                // A group's channels read its planes; a depthwise chunk's groups have one each,
                // one after the other.
                let index = if ocg == 1 { r } else { r / ocg.max(1) };
                let plane = planes.as_ptr().wrapping_add(index * layout.plane());
                let (words, requant) = channel(r);
                // SAFETY: as for this function.
                unsafe {
                    match requant {
                        BlockRequant::Narrow(narrow) => {
                            $channel(group, plane, &words, out, |sums| {
                                narrow.codes32(sums, &clamp)
                            })
                        }
                        general => $channel(group, plane, &words, out, |sums| {
                            general.codes(sums, &clamp)
                        }),
                    }
                }
            }
        }
    };
}

/// Channels the lanes kernels ([`stem_lanes_avx512`], [`depthwise_lanes_avx512`]) compute at
/// a time, one to each 32-bit lane of a 512-bit vector; also the pixels of the tiles
/// [`store_channel_rows`] transposes.
const LANES: usize = 16;

/// The lanes kernels with AVX-VNNI: none (16 registers of 8 lanes).
#[inline(always)]
unsafe fn no_lanes(
    _group: &Group<'_>,
    _planes: &[u8],
    _first: usize,
    _clamp: &NarrowClamp,
    _out: &mut [i8],
) -> bool {
    false
}

/// Output channels `first..first + 16` of a stem whose blocks are rows, with the channels in
/// the lanes of 512-bit vectors, into the first 16 planes of `out`; `false`, nothing written,
/// where a channel's scale lacks [`NarrowScale`]'s form or the rows are under 16 pixels.
///
/// Each output pixel's quads are one 32-bit load each from the padded planes (the quad's
/// bytes as they lie, as [`RowQuads`]' lanes hold them), broadcast, and one `vpdpbusd`
/// against the 16 channels' words of that quad: 9 for a 3x3 window over 3 planes, where the
/// row blocks took 9 loads of 256-bit vectors and 36 `vpdpbusd` for 32 pixels of 4 channels.
/// The codes are made 16 channels to a vector (each lane its channel's constants), saturated
/// to bytes, and 16 pixels' codes transposed into 16 channels' rows. `layer_speed --steps`,
/// alternating runs on this session's Intel Xeon, 3x224x224 3x3 stride 2 stems, against the
/// four-channel row blocks: 16 channels (MobileNetV3-small) 105 -> 79 us, 24 (ShuffleNetV2;
/// its last 8 on the row blocks) 151 -> 125, 32 (MobileNetV2, EfficientNet-B0) 202 -> 149,
/// 64 (SqueezeNet) 380 -> 282.
///
/// # Safety
/// The CPU must have AVX-512 VNNI and BW; `planes` must hold every load [`RowQuads::reach`]
/// counts (each pixel's quads lie inside its row block's loads).
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni,avx512vl")]
unsafe fn stem_lanes_avx512(
    group: &Group<'_>,
    planes: &[u8],
    first: usize,
    clamp: &NarrowClamp,
    out: &mut [i8],
) -> bool {
    let Group {
        layer,
        layout,
        taps,
        ..
    } = *group;
    let g = layer.geometry;
    let [_, oh, ow] = g.output;
    let [sy, sx] = g.stride;
    let plane_len = oh * ow;
    let count = taps.count.min(MAX_QUADS);
    if ow < LANES || out.len() < LANES * plane_len {
        return false;
    }
    let Some(lanes) = LaneConstants::new(group, first, clamp) else {
        return false;
    };
    for oy in 0..oh {
        let row_start = oy * sy * layout.pitch;
        for v in 0..ow.div_ceil(LANES) {
            // The last 16 pixels of a row end at its end.
            let x = (v * LANES).min(ow - LANES);
            let mut pixels = [_mm_setzero_si128(); LANES];
            // Eight pixels at a time, eight chains of sums (four were slower: a `vpdpbusd`'s
            // sum is ready for the next after 5 cycles; sixteen spilled registers).
            for (half, pixels) in pixels.chunks_exact_mut(8).enumerate() {
                let window = row_start + (x + 8 * half) * sx;
                let mut sums = [_mm512_setzero_si512(); 8];
                for (&words, &offset) in lanes.words.iter().zip(&taps.offsets).take(count) {
                    for (p, sum) in sums.iter_mut().enumerate() {
                        // SAFETY: the quad's 4 bytes lie inside the loads the row blocks make.
                        let quad = unsafe {
                            planes
                                .as_ptr()
                                .add(window + p * sx + offset)
                                .cast::<i32>()
                                .read_unaligned()
                        };
                        *sum = _mm512_dpbusd_epi32(*sum, _mm512_set1_epi32(quad), words);
                    }
                }
                for (pixel, sums) in pixels.iter_mut().zip(sums) {
                    *pixel = lanes.codes(sums);
                }
            }
            store_channel_rows(pixels, out, plane_len, oy * ow + x);
        }
    }
    true
}

/// Most rows and quad positions of a row [`depthwise_lanes_avx512`] lays out (25.6 KB of
/// vectors, inside L1): 16x16 outputs with 5x5 windows at stride 1, 8x8 at stride 2. With 32
/// (the 28x28 -> 14x14 stride-2 layers: 61 KB) those layers took 1.4 times as long as on the
/// row blocks.
const LANES_ROWS: usize = 20;
const LANES_COLUMNS: usize = 20;

/// Channels `first..first + 16` of a depthwise chunk, 3x3 or 5x5 windows, at stride 1 on
/// planes of at most 16 pixels a side or stride 2 to outputs of 8x8 (7x7 and 14x14 planes: a
/// row block would hold a fraction of a plane), with the channels in the lanes of 512-bit
/// vectors; `false`, nothing written, where the layer is another, a channel's scale lacks
/// [`NarrowScale`]'s form, or a plane has fewer than 32 pixels (on 4x4 planes the row blocks
/// were slightly faster).
///
/// Each padded row's quads at every window column are gathered once, 16 channels to a vector
/// (`vpgatherdd` of the 32-bit word at that column of each channel's plane: the quad's bytes
/// as they lie, as the row blocks load them); then each output pixel is one `vpdpbusd` per
/// quad of its window against the 16 channels' words, where a window row is reused by every
/// pixel below it. The codes are made 16 channels to a vector with each lane's constants, and
/// 16 pixels' codes transposed into 16 channels' rows.
///
/// # Safety
/// The CPU must have AVX-512 VNNI and BW; `planes` holds the chunk's padded planes
/// ([`Layout::plane`] bytes each, one after the other).
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vnni,avx512vl")]
unsafe fn depthwise_lanes_avx512(
    group: &Group<'_>,
    planes: &[u8],
    first: usize,
    clamp: &NarrowClamp,
    out: &mut [i8],
) -> bool {
    let Group {
        layer,
        layout,
        taps,
        ..
    } = *group;
    let g = layer.geometry;
    let [_, oh, ow] = g.output;
    let [kh, kw] = g.kernel;
    let per_row = kw.div_ceil(4);
    let plane_len = oh * ow;
    let count = taps.count.min(MAX_QUADS);
    let s = g.stride[0];
    let (rows, columns) = (s * (oh - 1) + kh, s * (ow - 1) + 4 * (per_row - 1) + 1);
    let pitch = layout.pitch;
    // Each gathered word's bytes lie in the chunk's planes: a word starts inside a row the
    // windows read and runs at most 3 bytes past it (bytes weighted 0), into the next row, the
    // next channel's plane, or the 4 bytes past the last plane asked for here.
    let fits = matches!(g.stride, [1, 1] | [2, 2])
        && g.dilation == [1, 1]
        && matches!((kh, per_row), (3, 1) | (5, 2))
        && layout.rows_per_block != 1
        && layout.rows >= rows
        && rows <= LANES_ROWS
        && columns <= LANES_COLUMNS
        && (2 * LANES..=LANES * LANES).contains(&plane_len)
        && count == kh * per_row
        && out.len() >= (first + LANES) * plane_len
        && planes.len() >= (first + LANES) * layout.plane() + 4
        && i32::try_from(LANES * layout.plane()).is_ok();
    if !fits {
        return false;
    }
    let Some(lanes) = LaneConstants::new(group, first, clamp) else {
        return false;
    };
    // Every padded row's words at every window column, 16 channels to a vector; written
    // before any is read (`rows` by `columns` of them), so not cleared.
    let plane = layout.plane() as i32;
    let planes_apart = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(plane),
    );
    let base = planes.as_ptr().wrapping_add(first * layout.plane());
    let mut quads = [MaybeUninit::<__m512i>::uninit(); LANES_ROWS * LANES_COLUMNS];
    for y in 0..rows {
        for (x, slot) in quads[y * LANES_COLUMNS..][..columns].iter_mut().enumerate() {
            // SAFETY: each lane's word lies inside its plane (`fits`).
            slot.write(unsafe {
                _mm512_i32gather_epi32::<1>(planes_apart, base.add(y * pitch + x).cast())
            });
        }
    }
    // One pixel's codes, its window's quads summed in two chains (quads 0 and 1 of each row),
    // `$kh` rows of `$per_row` quads, constants so that the loops unroll.
    macro_rules! pixel {
        ($oy:expr, $ox:expr, $kh:literal, $per_row:literal, $s:literal) => {{
            let (mut even, mut odd) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for ky in 0..$kh {
                for q in 0..$per_row {
                    let at = ($s * $oy + ky) * LANES_COLUMNS + $s * $ox + 4 * q;
                    // SAFETY: `oy + ky < rows` and `ox + 4q < columns`: written above.
                    let v = unsafe { quads.get_unchecked(at).assume_init() };
                    let words = lanes.words[ky * $per_row + q];
                    if q == 0 {
                        even = _mm512_dpbusd_epi32(even, v, words);
                    } else {
                        odd = _mm512_dpbusd_epi32(odd, v, words);
                    }
                }
            }
            lanes.codes(_mm512_add_epi32(even, odd))
        }};
    }
    // 16 pixels at a time into the 16 channels' planes, the last 16 ending at the plane's end.
    for start in (0..plane_len).step_by(LANES) {
        let start = start.min(plane_len - LANES);
        let (mut oy, mut ox) = (start / ow, start % ow);
        let mut tile = [_mm_setzero_si128(); LANES];
        for codes in &mut tile {
            *codes = match (kh, per_row, s) {
                (3, 1, 1) => pixel!(oy, ox, 3, 1, 1),
                (5, 2, 1) => pixel!(oy, ox, 5, 2, 1),
                (3, 1, _) => pixel!(oy, ox, 3, 1, 2),
                _ => pixel!(oy, ox, 5, 2, 2),
            };
            ox += 1;
            if ox == ow {
                (oy, ox) = (oy + 1, 0);
            }
        }
        if let Some(out) = out.get_mut(first * plane_len..) {
            store_channel_rows(tile, out, plane_len, start);
        }
    }
    true
}

/// Sixteen channels of a group, one to a lane of 512-bit vectors, for the lanes kernels: their
/// quads' words and their compact scales' constants ([`NarrowScale`]).
struct LaneConstants {
    /// Quad `i`'s words of the 16 channels.
    words: [__m512i; MAX_QUADS],
    bias: __m512i,
    multiplier: __m512i,
    /// The multipliers moved to the odd lanes' low halves, for their products.
    odd_multiplier: __m512i,
    offset: __m512i,
    right: __m512i,
    min: __m128i,
    max: __m128i,
}

impl LaneConstants {
    /// Channels `first..first + 16` of `group`; `None` where one's scale lacks the compact form
    /// or its words are not there.
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    fn new(group: &Group<'_>, first: usize, clamp: &NarrowClamp) -> Option<Self> {
        let Group {
            layer,
            taps,
            words,
            channels,
            ..
        } = *group;
        let mut lane_words = [[0i32; LANES]; MAX_QUADS];
        let mut constants = [[0i32; LANES]; 4];
        for j in 0..LANES {
            let r = first + j;
            let (bias, requant) = channels.get(r);
            let scale = NarrowScale::new(bias, requant, layer.q)?;
            let channel_words = words.get(r * taps.count..(r + 1) * taps.count)?;
            for (lane, &word) in lane_words.iter_mut().zip(channel_words) {
                lane[j] = word;
            }
            constants[0][j] = scale.bias;
            constants[1][j] = scale.multiplier;
            constants[2][j] = scale.offset;
            constants[3][j] = scale.high_right as i32;
        }
        // SAFETY: 16 i32 each, 64 bytes.
        let load = |lanes: &[i32; LANES]| unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) };
        let [bias, multiplier, offset, right] = constants.each_ref().map(load);
        Some(Self {
            words: lane_words.each_ref().map(load),
            bias,
            multiplier,
            odd_multiplier: _mm512_srli_epi64::<32>(multiplier),
            offset,
            right,
            min: _mm256_castsi256_si128(clamp.min),
            max: _mm256_castsi256_si128(clamp.max),
        })
    }

    /// The 16 channels' codes from their sums, as `NarrowScale::values` and the packs make
    /// them, each lane with its own channel's constants; clamped after the saturation, `max`
    /// last.
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    fn codes(&self, sums: __m512i) -> __m128i {
        let x = _mm512_add_epi32(sums, self.bias);
        let even = _mm512_mul_epi32(x, self.multiplier);
        let odd = _mm512_mul_epi32(_mm512_srli_epi64::<32>(x), self.odd_multiplier);
        let high = _mm512_mask_blend_epi32(0xaaaa, _mm512_srli_epi64::<32>(even), odd);
        let values = _mm512_srav_epi32(_mm512_add_epi32(high, self.offset), self.right);
        _mm_min_epi8(
            _mm_max_epi8(_mm512_cvtsepi32_epi8(values), self.min),
            self.max,
        )
    }
}

/// Sixteen pixels' codes, 16 channels each, into the first 16 planes (`plane_len` codes each)
/// of `out` at positions `at..at + 16`: transposed into the channels' rows.
#[inline]
#[target_feature(enable = "avx2")]
fn store_channel_rows(pixels: [__m128i; LANES], out: &mut [i8], plane_len: usize, at: usize) {
    for (j, channel) in transpose_16x16(pixels).into_iter().enumerate() {
        let at = j * plane_len + at;
        if let Some(dst) = out.get_mut(at..at + LANES) {
            // SAFETY: 16 bytes.
            unsafe { _mm_storeu_si128(dst.as_mut_ptr().cast(), channel) };
        }
    }
}

/// The first of the two rows `d` apart that slot `k` of a transpose stage interleaves (slots
/// `2m` and `2m + 1` take pair `m`'s low and high halves).
#[inline]
fn first_of_pair(k: usize, d: usize) -> usize {
    let pair = k / 2;
    pair % d + pair / d * 2 * d
}

/// The 16x16 byte matrix `rows` transposed: byte `j` of row `p` becomes byte `p` of row `j`.
/// Four stages interleave rows `d` apart (1, 2, 4 and 8) at 1, 2, 4 and 8 bytes, low halves
/// into even slots and high halves into odd ones.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose_16x16(rows: [__m128i; 16]) -> [__m128i; 16] {
    macro_rules! stage {
        ($src:expr, $d:expr, $low:ident, $high:ident) => {{
            let src: [__m128i; 16] = $src;
            core::array::from_fn(|k| {
                let i = first_of_pair(k, $d);
                let (x, y) = (src[i], src[i + $d]);
                if k % 2 == 0 {
                    $low(x, y)
                } else {
                    $high(x, y)
                }
            })
        }};
    }
    let pairs = stage!(rows, 1, _mm_unpacklo_epi8, _mm_unpackhi_epi8);
    let quads = stage!(pairs, 2, _mm_unpacklo_epi16, _mm_unpackhi_epi16);
    let octets = stage!(quads, 4, _mm_unpacklo_epi32, _mm_unpackhi_epi32);
    stage!(octets, 8, _mm_unpacklo_epi64, _mm_unpackhi_epi64)
}

group_rows!(
    group_avx,
    channel_avx,
    stem_rows_avx,
    sums_avx,
    2,
    "avx2,avxvnni",
    _mm256_dpbusd_avx_epi32,
    no_lanes,
    no_lanes
);
group_rows!(
    group_avx512,
    channel_avx512,
    stem_rows_avx512,
    sums_avx512,
    4,
    "avx2,avx512f,avx512bw,avx512vnni,avx512vl",
    _mm256_dpbusd_epi32,
    stem_lanes_avx512,
    depthwise_lanes_avx512
);
