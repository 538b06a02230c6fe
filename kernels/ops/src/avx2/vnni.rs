//! 8-bit dot products (`vpdpbusd`) for the layers the strips kernel runs, on CPUs with AVX-VNNI
//! or AVX-512 VNNI, bit-identical to the generic [`Conv`].
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, four to a 32-bit lane, and adds them to the
//! lane without saturation: four times the products of `vpmaddwd` per instruction, exactly. The
//! input codes `x` are made unsigned as `x + 128`; [`ByteQuads`] folds the correction that
//! needs into the biases.
//!
//! A tile's byte quads are made once, in the lane order [`BlockScales::codes`] reads: for a
//! pointwise layer from its input codes; where every tile lies within one output row from the
//! strip [`crate::strips`] fills for `vpmaddwd`; elsewhere from the input padded as bytes.

use std::arch::x86_64::*;

use super::{BlockScales, Constants};
use crate::int8::Conv;
use crate::strips::{ByteQuads, Layer, Packed, Scratch, MR, NR};

/// Which VNNI encoding this CPU has for 256-bit vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vnni {
    /// AVX-VNNI (VEX-encoded; Alder Lake and later, Zen 5).
    Avx,
    /// AVX-512 VNNI (EVEX-encoded; Ice Lake, Zen 4 and later): 256-bit vectors, and 512-bit
    /// ones in the byte quads' micro-kernel.
    Avx512,
}

impl Vnni {
    /// The encoding this CPU has, AVX-512's first; `None` without either.
    pub fn detect() -> Option<Self> {
        [Self::Avx512, Self::Avx]
            .into_iter()
            .find(|v| v.available())
    }

    /// Whether this CPU has the encoding.
    pub fn available(self) -> bool {
        match self {
            Self::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512vnni")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512bw")
            }
            Self::Avx => std::arch::is_x86_feature_detected!("avxvnni"),
        }
    }
}

/// One layer's weights as byte quads for `vpdpbusd`, which reads the input as `x + 128`.
pub(super) struct Quads {
    vnni: Vnni,
    pub(super) packed: ByteQuads,
}

impl Quads {
    /// Pack `conv` (packed for the strips kernel as `packed`) for `vnni`, when this CPU has it.
    pub(super) fn new(conv: &Conv<'_>, packed: &Packed, vnni: Vnni) -> Option<Self> {
        if !vnni.available() {
            return None;
        }
        Some(Self {
            vnni,
            packed: ByteQuads::new(conv, packed, 128, 1)?,
        })
    }

    /// The byte-quad strip's size in i32 (kept in [`Scratch::products`]), with room to start
    /// it on a 64-byte boundary.
    pub(super) fn strip_len(&self) -> usize {
        self.packed.strip_len() + ALIGN_SLACK
    }

    /// Whether a call of `conv` can take these quads (the strips kernel accepted it already).
    pub(super) fn accepts(&self, conv: &Conv<'_>, scratch: &Scratch) -> bool {
        self.packed.accepts(conv) && scratch.products.len() >= self.strip_len()
    }

    /// Run an accepted call of `conv` (the strips kernel's `layer`) on `input` into `output`.
    pub(super) fn run(
        &self,
        conv: &Conv<'_>,
        layer: &Layer<'_>,
        input: &[i8],
        scratch: &mut Scratch,
        constants: Constants<'_>,
        output: &mut [i8],
    ) {
        let Constants { requants, narrow } = constants;
        self.packed.for_each_group(
            conv,
            layer,
            input,
            output,
            |input, weights, channels, out| {
                let constants = Constants {
                    requants: &mut *requants,
                    narrow: &mut *narrow,
                };
                // SAFETY: `available` checked the CPU has this encoding (and so AVX2) at packing.
                unsafe {
                    let scales = BlockScales::prepare(channels, layer.q, constants);
                    let group = Group {
                        input,
                        weights,
                        count: channels.bias.len(),
                        scales: &scales,
                    };
                    match self.vnni {
                        Vnni::Avx => group_avx(self, layer, group, scratch, out),
                        Vnni::Avx512 => group_avx512(self, layer, group, scratch, out),
                    }
                }
            },
        );
    }
}

/// Words a strip may start past the scratch's start, to start on a 64-byte boundary.
const ALIGN_SLACK: usize = 15;

/// One group of a call: its input, packed weights, output channels and their requantisation.
struct Group<'g> {
    input: &'g [i8],
    weights: &'g [i32],
    count: usize,
    scales: &'g BlockScales<'g>,
}

/// A group's tiles with micro-kernel `$kernel` ([`micro_kernel_avx`] or
/// [`micro_kernel_avx512`], compiled for the same features so that it is inlined and the sums
/// stay in registers). A pointwise
/// layer's quads are made straight from its input codes (its column matrix is its input); any
/// other layer's from the 16-bit strip the `vpmaddwd` kernel fills.
macro_rules! group_tiles {
    ($name:ident, $features:literal, $kernel:ident, $codes:ident) => {
        #[target_feature(enable = $features)]
        fn $name(
            quads: &Quads,
            layer: &Layer<'_>,
            group: Group<'_>,
            scratch: &mut Scratch,
            out: &mut [i8],
        ) {
            let Group {
                input,
                weights,
                count,
                scales,
            } = group;
            let quad_count = quads.packed.quads;
            let span = quad_count * MR;
            let Scratch {
                padded,
                strip,
                products,
                ..
            } = scratch;
            // The strip from a 64-byte boundary: a 512-bit load across two cache lines costs
            // two.
            let start = products.as_ptr().align_offset(64).min(ALIGN_SLACK);
            let Some(tile_quads) = products.get_mut(start..start + quads.packed.strip_len()) else {
                return;
            };
            // The input's zero point as `vpdpbusd` reads it (x + 128): the value of padding
            // and of rows past the input's channels.
            let unsigned_zero = quads.packed.zero_point + 128;
            // A tile's codes from its quads and a block's weights.
            // SAFETY: `tile_quads` holds `quad_count` quads of NR words, and the tiles hand
            // `span` weights, `quad_count` rows of MR.
            let block = |tile: &[i32], tile_quads: &[i32], first| {
                scales.$codes(first, unsafe { $kernel(tile, tile_quads, quad_count) })
            };
            if layer.is_pointwise() {
                let [_, h, w] = layer.geometry.input;
                let pixels = h * w;
                let padding = unsigned_zero as u8;
                layer.for_each_tile(
                    weights,
                    span,
                    count,
                    tile_quads,
                    out,
                    |tile_quads, p0| {
                        // SAFETY: AVX2 is enabled here; `tile_quads` holds a quad per four
                        // input channels.
                        unsafe {
                            pointwise_quads(input, pixels, p0, layer.icg, padding, tile_quads)
                        }
                    },
                    block,
                );
                return;
            }
            if layer.geometry.output[2] % NR == 0 {
                // Every tile within one output row: the 16-bit strip's rows are whole-vector
                // copies, and turning them into quads was faster than building the quads from
                // bytes (resnet18's 16x16 and 32x32 planes, MobileNetV3's 112x112 stem: the
                // byte quads took 1.1 to 1.3 times as long).
                let unsigned = _mm256_set1_epi16(unsigned_zero as i16);
                layer.run_tiles(
                    input,
                    weights,
                    span,
                    count,
                    padded,
                    strip,
                    out,
                    |_| {},
                    |tile, strip, first| {
                        if first == 0 {
                            // SAFETY: AVX2 is enabled here; the strip has 2 * row_pairs rows.
                            unsafe { to_quads(strip, unsigned, tile_quads) };
                        }
                        block(tile, tile_quads, first)
                    },
                );
                return;
            }
            // Tiles across output rows: quads from the input padded as bytes `x + 128`, inside
            // a border of its zero point's byte, each row of a tile a load per run (0.7 to 0.9
            // of the time of the strips' copies on 15x15 to 3x3 planes).
            let border = unsigned_zero as u8;
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut padded[..]);
            if !pad_bytes(layer, input, border, bytes) {
                return;
            }
            let bytes: &[u8] = bytes;
            layer.for_each_tile(
                weights,
                span,
                count,
                tile_quads,
                out,
                |tile_quads, p0| {
                    // SAFETY: AVX2 is enabled here; `tile_quads` holds `quad_count` quads.
                    unsafe { tile_byte_quads(layer, bytes, p0, border, tile_quads) }
                },
                block,
            );
        }
    };
}

/// The quads of pixels `p0..p0 + NR` of a pointwise layer's input (`channels` planes of
/// `pixels` codes), in [`store_quad`]'s layout: each code as `x + 128` (its sign bit flipped),
/// four channels to a word; `padding` past the last channel and pixel.
#[target_feature(enable = "avx2")]
unsafe fn pointwise_quads(
    input: &[i8],
    pixels: usize,
    p0: usize,
    channels: usize,
    padding: u8,
    quads: &mut [i32],
) {
    let flip = _mm_set1_epi8(i8::MIN);
    // A macro, not a closure: the closure was not inlined (a call per row of 16 codes).
    macro_rules! row {
        ($c:expr) => {{
            let c = $c;
            let start = c * pixels + p0;
            match input.get(start..start + NR) {
                // A whole vector's codes, loaded where they lie (a variable-length copy is a
                // call): past the plane's last pixel they are the next plane's, whose lanes
                // (those pixels' sums) are never stored.
                // SAFETY: 16 bytes, unaligned.
                Some(whole) if c < channels => {
                    _mm_xor_si128(unsafe { _mm_loadu_si128(whole.as_ptr().cast()) }, flip)
                }
                _ => {
                    let mut codes = [padding as i8 ^ i8::MIN; NR];
                    if c < channels {
                        let n = NR.min(pixels - p0);
                        codes[..n].copy_from_slice(&input[start..start + n]);
                    }
                    // SAFETY: 16 bytes, unaligned.
                    _mm_xor_si128(unsafe { _mm_loadu_si128(codes.as_ptr().cast()) }, flip)
                }
            }
        }};
    }
    for (q, dst) in quads.chunks_exact_mut(NR).enumerate() {
        let c = 4 * q;
        store_quad([row!(c), row!(c + 1), row!(c + 2), row!(c + 3)], dst);
    }
}

/// Four rows of 16 pixels' bytes (column-matrix rows `4q` to `4q + 3`) as one quad into `dst`:
/// 16 words, pixels 0-3 and 8-11 then 4-7 and 12-15 (the order `vpunpck*wd` leaves them in
/// and [`BlockScales::codes`] reads), each word the four rows' bytes from its low byte up.
#[inline]
#[target_feature(enable = "avx2")]
fn store_quad([r0, r1, r2, r3]: [__m128i; 4], dst: &mut [i32]) {
    // Byte pairs of rows 0-1 and 2-3 for pixels 0-7 and 8-15, then quads of both.
    let (low01, high01) = (_mm_unpacklo_epi8(r0, r1), _mm_unpackhi_epi8(r0, r1));
    let (low23, high23) = (_mm_unpacklo_epi8(r2, r3), _mm_unpackhi_epi8(r2, r3));
    let halves = [
        // Pixels 0-3 and 8-11, then 4-7 and 12-15.
        _mm256_set_m128i(
            _mm_unpacklo_epi16(high01, high23),
            _mm_unpacklo_epi16(low01, low23),
        ),
        _mm256_set_m128i(
            _mm_unpackhi_epi16(high01, high23),
            _mm_unpackhi_epi16(low01, low23),
        ),
    ];
    // Stored as the kernel loads them, a 256-bit vector each: a load that spans two smaller
    // stores still in flight waits for them to retire rather than taking their bytes.
    for (part, half) in dst.chunks_exact_mut(8).zip(halves) {
        // SAFETY: `part` holds 8 i32, one 256-bit vector.
        unsafe { _mm256_storeu_si256(part.as_mut_ptr().cast(), half) };
    }
}

/// A group's input planes padded as bytes `x + 128` (the code's sign bit flipped) inside a
/// border of `border`, into the start of `scratch`; false where `scratch` is too small.
#[target_feature(enable = "avx2")]
fn pad_bytes(layer: &Layer<'_>, input: &[i8], border: u8, scratch: &mut [u8]) -> bool {
    let g = layer.geometry;
    let [_, h, w] = g.input;
    let [hp, wp] = Layer::padded_dims(g);
    let [top, left] = g.pad;
    let fits = (top + h) * wp <= hp * wp && left + w <= wp;
    let Some(padded) = scratch.get_mut(..layer.icg * hp * wp).filter(|_| fits) else {
        return false;
    };
    padded.fill(border);
    for (plane, dst) in input
        .chunks_exact((h * w).max(1))
        .zip(padded.chunks_exact_mut((hp * wp).max(1)))
    {
        for (row, src) in dst[top * wp..(top + h) * wp]
            .chunks_exact_mut(wp.max(1))
            .zip(plane.chunks_exact(w.max(1)))
        {
            flip_signs(src, &mut row[left..left + w]);
        }
    }
    true
}

/// `dst[i] = src[i] + 128` as bytes (the sign bit flipped), for the first `min(len)` of
/// each: 16 at a time, the last 16 (or 8, in rows of 8 to 15) overlapping the ones before
/// rather than a byte at a time (rows are often 14 or 28 bytes, too short for the compiler's
/// vector loop).
#[target_feature(enable = "avx2")]
pub(super) fn flip_signs(src: &[i8], dst: &mut [u8]) {
    let n = src.len().min(dst.len());
    let (src, dst) = (src.as_ptr(), dst.as_mut_ptr());
    let flip = _mm_set1_epi8(i8::MIN);
    // SAFETY: every access below is of `n` bytes or fewer from the start of both.
    unsafe {
        let flip16 = |at: usize| {
            let v = _mm_xor_si128(_mm_loadu_si128(src.add(at).cast()), flip);
            _mm_storeu_si128(dst.add(at).cast(), v);
        };
        let flip8 = |at: usize| {
            let v = src.add(at).cast::<u64>().read_unaligned() ^ 0x8080_8080_8080_8080;
            dst.add(at).cast::<u64>().write_unaligned(v);
        };
        match n {
            16.. => {
                for at in (0..n - 16).step_by(16) {
                    flip16(at);
                }
                flip16(n - 16);
            }
            8.. => {
                flip8(0);
                flip8(n - 8);
            }
            // 7x7 planes' rows: a byte at a time, padding was 0.4 of a 5x5 layer's time.
            4.. => {
                let flip4 = |at: usize| {
                    let v = src.add(at).cast::<u32>().read_unaligned() ^ 0x8080_8080;
                    dst.add(at).cast::<u32>().write_unaligned(v);
                };
                flip4(0);
                flip4(n - 4);
            }
            _ => {
                for i in 0..n {
                    *dst.add(i) = *src.add(i) as u8 ^ 0x80;
                }
            }
        }
    }
}

/// The quads of the tile of output pixels from `p0` on of a layer whose input `pad_bytes` laid
/// out at the start of `bytes`: column-matrix rows `(ic, ky, kx)` in order, four to a quad,
/// rows past the last (weighted 0) as `border`. A row's 16 bytes are a load per run of the tile (taking
/// every second byte at stride 2) blended into place; where a load would leave `bytes` or
/// the stride is another, they are gathered one by one. Bytes of pixels past the tile's last
/// output pixel are whatever was read: their sums are never stored.
///
/// # Safety
/// AVX2 must be available; `quads` holds the layer's quads, 16 words each.
#[target_feature(enable = "avx2")]
unsafe fn tile_byte_quads(
    layer: &Layer<'_>,
    bytes: &[u8],
    p0: usize,
    border: u8,
    quads: &mut [i32],
) {
    let g = layer.geometry;
    let [kh, kw] = g.kernel;
    let sx = g.stride[1];
    let [dy, dx] = g.dilation;
    let [hp, wp] = Layer::padded_dims(g);
    let mut runs = [(0, 0, 0); NR];
    let (count, _) = layer.tile_runs(p0, &mut runs);
    let runs = &runs[..count.min(NR)];
    let last_tap =
        (layer.icg.max(1) - 1) * hp * wp + (kh.max(1) - 1) * dy * wp + (kw.max(1) - 1) * dx;
    // Each run's load starts `at` pixels before its first value, so that lane `at` is it.
    let vector = matches!(sx, 1 | 2)
        && runs.iter().all(|&(at, offset, _)| {
            offset >= at * sx && offset - at * sx + last_tap + sx * NR <= bytes.len()
        });
    let lanes = _mm_setr_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut from = [(0usize, _mm_setzero_si128()); NR];
    for (slot, &(at, offset, _)) in from.iter_mut().zip(runs) {
        // Lanes from `at` on.
        *slot = (
            offset.wrapping_sub(at * sx),
            _mm_cmpgt_epi8(lanes, _mm_set1_epi8(at as i8 - 1)),
        );
    }
    let from = &from[..runs.len()];
    // Every second byte of 32: the even bytes of each 128-bit half, then the halves' low
    // words side by side.
    let evens = _mm256_setr_epi8(
        0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1, 0, 2, 4, 6, 8, 10, 12, 14, -1,
        -1, -1, -1, -1, -1, -1, -1,
    );
    let load = |at: usize| -> __m128i {
        // SAFETY: `vector` checked that `at + sx * NR <= bytes.len()` for every tap.
        unsafe {
            let p = bytes.as_ptr().add(at);
            if sx == 1 {
                _mm_loadu_si128(p.cast())
            } else {
                let even = _mm256_shuffle_epi8(_mm256_loadu_si256(p.cast()), evens);
                _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b00_00_10_00>(even))
            }
        }
    };
    let row = |tap: usize| -> __m128i {
        if vector {
            let mut values = load(tap + from[0].0);
            for &(start, mask) in &from[1..] {
                values = _mm_blendv_epi8(values, load(tap + start), mask);
            }
            return values;
        }
        let mut values = [border; NR];
        for &(at, offset, n) in runs {
            for (k, value) in values[at..at + n].iter_mut().enumerate() {
                *value = bytes.get(offset + tap + k * sx).copied().unwrap_or(border);
            }
        }
        // SAFETY: 16 bytes, unaligned.
        unsafe { _mm_loadu_si128(values.as_ptr().cast()) }
    };
    // Rows in order, four to a quad; those past the last weigh 0 (the padding's value).
    let mut rows = [_mm_set1_epi8(border as i8); 4];
    let mut filled = 0;
    let mut dsts = quads.chunks_exact_mut(NR);
    for c in 0..layer.icg {
        for ky in 0..kh {
            let line = c * hp * wp + ky * dy * wp;
            for kx in 0..kw {
                rows[filled] = row(line + kx * dx);
                filled += 1;
                if filled == 4 {
                    let Some(dst) = dsts.next() else { return };
                    store_quad(rows, dst);
                    filled = 0;
                }
            }
        }
    }
    if filled > 0 {
        let padding = _mm_set1_epi8(border as i8);
        rows[filled..].fill(padding);
        if let Some(dst) = dsts.next() {
            store_quad(rows, dst);
        }
    }
}

/// Turn a strip of 16-bit rows (input minus zero point) into byte quads of `x + 128`:
/// `quads[q]` is 16 words, pixels 0-3 and 8-11 then 4-7 and 12-15 (the order
/// `vpunpck*wd` leaves them in and [`BlockScales::codes`] reads), each word rows `4q` to
/// `4q + 3` from its low byte up. Rows past the strip's count as the zero point.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn to_quads(strip: &[i16], unsigned: __m256i, quads: &mut [i32]) {
    let rows = strip.len() / NR;
    let row = |r: usize| {
        if r < rows {
            // SAFETY: row r of NR values is inside the strip.
            let v = unsafe { _mm256_loadu_si256(strip.as_ptr().add(r * NR).cast()) };
            // x - zp + (zp + 128) = x + 128, in 0..=255.
            _mm256_add_epi16(v, unsigned)
        } else {
            unsigned
        }
    };
    for (q, dst) in quads.chunks_exact_mut(NR).enumerate() {
        let r = 4 * q;
        let low = _mm256_or_si256(row(r), _mm256_slli_epi16::<8>(row(r + 1)));
        let high = _mm256_or_si256(row(r + 2), _mm256_slli_epi16::<8>(row(r + 3)));
        // SAFETY: `dst` holds 16 i32, two vectors.
        unsafe {
            _mm256_storeu_si256(dst.as_mut_ptr().cast(), _mm256_unpacklo_epi16(low, high));
            _mm256_storeu_si256(
                dst.as_mut_ptr().add(8).cast(),
                _mm256_unpackhi_epi16(low, high),
            );
        }
    }
}

/// Sums of [`MR`] channels by 16 pixels over `quads` byte quads, with AVX-VNNI's 256-bit
/// `vpdpbusd` (its 16 registers hold one chain of sums per channel and half).
#[inline]
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn micro_kernel_avx(tile: &[i32], strip: &[i32], quads: usize) -> [[__m256i; 2]; MR] {
    let mut acc = [[_mm256_setzero_si256(); 2]; MR];
    let base = strip.as_ptr();
    for q in 0..quads {
        // SAFETY: the strip holds `quads` quads of 16 words.
        let (lo, hi) = unsafe {
            (
                _mm256_loadu_si256(base.add(q * NR).cast()),
                _mm256_loadu_si256(base.add(q * NR + 8).cast()),
            )
        };
        let w = &tile[q * MR..q * MR + MR];
        for (r, sums) in acc.iter_mut().enumerate() {
            let weight = _mm256_set1_epi32(w[r]);
            sums[0] = _mm256_dpbusd_avx_epi32(sums[0], lo, weight);
            sums[1] = _mm256_dpbusd_avx_epi32(sums[1], hi, weight);
        }
    }
    acc
}

/// [`micro_kernel_avx`] with AVX-512 VNNI in 512-bit vectors: a quad's 16 words are one
/// load and each channel's products one `vpdpbusd`, half the instructions of the 256-bit form
/// (this session's Intel Xeon issues two of either width a cycle: 7.1 G/s 256-bit, 6.7 G/s
/// 512-bit in a loop of independent ones), the same sums lane for lane (each channel's 16
/// in the order of the 256-bit pair: [`BlockScales::codes512`] reads them). Each sum in two
/// chains (even and odd quads) added at the end: a `vpdpbusd` takes 5 cycles before its sum
/// is ready for the next, so 4 chains would issue under one a cycle. `layer_speed`, whole runs, three alternating
/// rounds against the 256-bit form (two chains): MobileNetV2-224 4.56 -> 4.21 ms,
/// MobileNetV3-small-224 1.20 -> 1.13, resnet18-224 13.07 -> 12.4.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512vnni,avx512vl")]
unsafe fn micro_kernel_avx512(tile: &[i32], strip: &[i32], quads: usize) -> [__m512i; MR] {
    let mut even = [_mm512_setzero_si512(); MR];
    let mut odd = [_mm512_setzero_si512(); MR];
    let base = strip.as_ptr();
    let step = |q: usize, acc: &mut [__m512i; MR]| {
        // SAFETY: the strip holds `quads` quads of 16 words.
        let bytes = unsafe { _mm512_loadu_si512(base.add(q * NR).cast()) };
        let w = &tile[q * MR..q * MR + MR];
        for (r, sums) in acc.iter_mut().enumerate() {
            *sums = _mm512_dpbusd_epi32(*sums, bytes, _mm512_set1_epi32(w[r]));
        }
    };
    let paired = quads / 2 * 2;
    for q in (0..paired).step_by(2) {
        step(q, &mut even);
        step(q + 1, &mut odd);
    }
    for q in paired..quads {
        step(q, &mut even);
    }
    core::array::from_fn(|r| _mm512_add_epi32(even[r], odd[r]))
}

group_tiles!(group_avx, "avx2,avxvnni", micro_kernel_avx, codes);
group_tiles!(
    group_avx512,
    "avx2,avx512f,avx512bw,avx512vnni,avx512vl",
    micro_kernel_avx512,
    codes512
);
