//! 8-bit dot products (`vpdpbusd`) for the layers the strips kernel runs, on CPUs with AVX-VNNI
//! or AVX-512 VNNI, bit-identical to the generic [`Conv`].
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, four to a 32-bit lane, and adds them to the
//! lane without saturation: four times the products of `vpmaddwd` per instruction, exactly. The
//! input codes `x` are made unsigned as `x + 128`; [`ByteQuads`] folds the correction that
//! needs into the biases.
//!
//! The strips of [`crate::strips`] are filled as for `vpmaddwd` and turned into rows of byte
//! quads once per tile, in the lane order [`BlockScales::codes`] reads.

use std::arch::x86_64::*;

use super::{BlockScales, Constants};
use crate::int8::Conv;
use crate::strips::{ByteQuads, Layer, Packed, Scratch, MR, NR};

/// Which VNNI encoding this CPU has for 256-bit vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vnni {
    /// AVX-VNNI (VEX-encoded; Alder Lake and later, Zen 5).
    Avx,
    /// AVX-512 VNNI with 256-bit vectors (EVEX-encoded; Ice Lake, Zen 4 and later).
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

    /// The byte-quad strip's size in i32 (kept in [`Scratch::products`]).
    pub(super) fn strip_len(&self) -> usize {
        self.packed.strip_len()
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

/// One group of a call: its input, packed weights, output channels and their requantisation.
struct Group<'g> {
    input: &'g [i8],
    weights: &'g [i32],
    count: usize,
    scales: &'g BlockScales<'g>,
}

/// A group's tiles in `vpdpbusd` encoding `$dp`, with `$kernel` (made by [`micro_kernel`] for
/// the same features, so that it is inlined and the sums stay in registers). A pointwise
/// layer's quads are made straight from its input codes (its column matrix is its input); any
/// other layer's from the 16-bit strip the `vpmaddwd` kernel fills.
macro_rules! group_tiles {
    ($name:ident, $features:literal, $kernel:ident) => {
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
            let Some(tile_quads) = products.get_mut(..quads.strip_len()) else {
                return;
            };
            // SAFETY (both kernels): `tile_quads` holds `quad_count` quads of NR words, and
            // the tiles hand `span` weights, `quad_count` rows of MR.
            if layer.is_pointwise() {
                let [_, h, w] = layer.geometry.input;
                let pixels = h * w;
                // Rows past the input's channels read as its zero point, as `to_quads` has them.
                let padding = (quads.packed.zero_point + 128) as u8;
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
                    |tile, tile_quads, first| {
                        scales.codes(first, unsafe { $kernel(tile, tile_quads, quad_count) })
                    },
                );
                return;
            }
            let unsigned = _mm256_set1_epi16((quads.packed.zero_point + 128) as i16);
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
                        // SAFETY: AVX2 is enabled here; the strip has 2 * row_pairs rows of NR.
                        unsafe { to_quads(strip, unsigned, tile_quads) };
                    }
                    scales.codes(first, unsafe { $kernel(tile, tile_quads, quad_count) })
                },
            );
        }
    };
}

/// The quads of pixels `p0..p0 + NR` of a pointwise layer's input (`channels` planes of
/// `pixels` codes), in [`to_quads`]' layout: each code as `x + 128` (its sign bit flipped),
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
    let row = |c: usize| {
        let start = c * pixels + p0;
        let codes = match input.get(start..start + NR) {
            // A whole vector's codes, loaded where they lie (a variable-length copy is a
            // call): past the plane's last pixel they are the next plane's, whose lanes (those
            // pixels' sums) are never stored.
            Some(whole) if c < channels => whole,
            _ => {
                let mut codes = [padding as i8 ^ i8::MIN; NR];
                if c < channels {
                    let n = NR.min(pixels - p0);
                    codes[..n].copy_from_slice(&input[start..start + n]);
                }
                // SAFETY: 16 bytes, unaligned.
                return _mm_xor_si128(unsafe { _mm_loadu_si128(codes.as_ptr().cast()) }, flip);
            }
        };
        // SAFETY: `codes` holds 16 bytes, unaligned.
        _mm_xor_si128(unsafe { _mm_loadu_si128(codes.as_ptr().cast()) }, flip)
    };
    for (q, dst) in quads.chunks_exact_mut(NR).enumerate() {
        let [r0, r1, r2, r3] = [0, 1, 2, 3].map(|i| row(4 * q + i));
        // Byte pairs of rows 0-1 and 2-3 for pixels 0-7 and 8-15, then quads of both.
        let (low01, high01) = (_mm_unpacklo_epi8(r0, r1), _mm_unpackhi_epi8(r0, r1));
        let (low23, high23) = (_mm_unpacklo_epi8(r2, r3), _mm_unpackhi_epi8(r2, r3));
        let words = [
            _mm_unpacklo_epi16(low01, low23),   // pixels 0-3
            _mm_unpacklo_epi16(high01, high23), // 8-11
            _mm_unpackhi_epi16(low01, low23),   // 4-7
            _mm_unpackhi_epi16(high01, high23), // 12-15
        ];
        for (part, quad) in dst.chunks_exact_mut(4).zip(words) {
            // SAFETY: `part` holds 4 i32, one vector.
            unsafe { _mm_storeu_si128(part.as_mut_ptr().cast(), quad) };
        }
    }
}

/// Turn a strip of 16-bit rows (input minus zero point) into byte quads of `x + 128`:
/// `quads[q]` is 16 words, pixels 0-3 and 8-11 then 4-7 and 12-15 (the order
/// `vpunpck*wd` leaves them in and [`BlockScales::codes`] reads), each word rows `4q` to
/// `4q + 3` from its low byte up. Rows past the strip's count as the zero point.
#[target_feature(enable = "avx2")]
unsafe fn to_quads(strip: &[i16], unsigned: __m256i, quads: &mut [i32]) {
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

/// Sums of [`MR`] channels by 16 pixels over `quads` byte quads, in `vpdpbusd` encoding `$dp`.
macro_rules! micro_kernel {
    ($name:ident, $features:literal, $dp:ident) => {
        #[inline]
        #[target_feature(enable = $features)]
        unsafe fn $name(tile: &[i32], strip: &[i32], quads: usize) -> [[__m256i; 2]; MR] {
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
                    sums[0] = $dp(sums[0], lo, weight);
                    sums[1] = $dp(sums[1], hi, weight);
                }
            }
            acc
        }
    };
}

micro_kernel!(micro_kernel_avx, "avx2,avxvnni", _mm256_dpbusd_avx_epi32);
micro_kernel!(
    micro_kernel_avx512,
    "avx2,avx512vnni,avx512vl",
    _mm256_dpbusd_epi32
);

group_tiles!(group_avx, "avx2,avxvnni", micro_kernel_avx);
group_tiles!(
    group_avx512,
    "avx2,avx512vnni,avx512vl",
    micro_kernel_avx512
);
