//! x86-64 AVX2 convolution, bit-identical to the generic [`Conv`]:
//!
//! - im2col into 16-bit rows with the input zero point already subtracted (padding becomes 0);
//! - a micro-kernel of 4 output channels by 16 pixels that interleaves two rows and multiplies
//!   them with `vpmaddwd` into int32 sums. Products of 16-bit operands cannot saturate, unlike
//!   `vpmaddubsw`, so the sums are exact and, added modulo 2^32, equal the generic kernel's;
//! - the fixed-point requantisation of [`crate::quant::Requant`] eight lanes at a time.
//!
//! Layers it cannot take bit-exactly (a zero point outside int8) run the generic kernel.

use std::arch::x86_64::*;
use std::vec::Vec;

mod depthwise;
mod few;
mod lanes;
mod row_quads;
mod vnni;
pub(crate) mod wide;
mod winograd;
use few::FewPixels;
use lanes::ChannelLanes;
use row_quads::RowQuads;
use vnni::Quads;
pub use vnni::Vnni;
use winograd::Winograd;

use crate::strips::{
    flip_bit, max_pool_by_rows, prepare_convs, DepthwiseGroup, Layer, Packed, Scratch, MR, NR,
};

use crate::int8::{
    Add, ChannelQuant, Conv, Gemm, GlobalAveragePool, Lut, MaxPool, Mul, OutputQuant, Rescale,
    ShapeError, ADD_FRACTION_BITS,
};
use crate::quant::{requantize_i8, Requant};
use crate::table::{Entry, KernelTable};
use crate::Kernels;

/// One convolution ready for the AVX2 kernels.
struct Prepared {
    packed: Packed,
    /// The Winograd form, for the dense stride-1 3x3 layers it suits.
    winograd: Option<Winograd>,
    /// Byte quads for `vpdpbusd`, on a CPU with VNNI, for the layers the strips kernel runs.
    quads: Option<Quads>,
    /// Channels in the lanes, for layers of at most 4 output pixels.
    few: Option<FewPixels>,
    /// Channels in the lanes, for depthwise layers on small planes.
    lanes: Option<ChannelLanes>,
    /// Window rows as byte quads, for the other depthwise layers and small stems, on a CPU
    /// with VNNI.
    row_quads: Option<RowQuads>,
}

/// Products summed into each output below which a layer keeps the `vpmaddwd` strips on a VNNI
/// CPU: a pixel's byte quads cost about as much to build whatever the output channels, and
/// with fewer terms per output that cost is not won back. Measured on an AMD EPYC (Zen 4) with
/// AVX-512 VNNI, against the former threshold of 256 (fastest of 8 to 16 interleaved rounds,
/// `layer_speed --steps`, 2026-12-04): 1x1 layers over 24 to 960 input channels took 0.53 to
/// 0.86 of the strips' time, over 16 channels 0.84 to 1.06, the 27-term 3x3 stems 0.75 to
/// 0.78. (Before the quads' tiles took their requantisation constants once per call, as the
/// strips' do, layers under 256 terms were the slower on quads.)
pub const QUADS_MIN_TERMS: usize = 16;

/// Whether `conv`'s outputs sum enough products for byte quads to pay ([`QUADS_MIN_TERMS`]).
fn quads_pay(conv: &Conv<'_>) -> bool {
    let g = &conv.geometry;
    let terms = g.input[0] / g.group.max(1) * g.kernel[0] * g.kernel[1];
    terms >= QUADS_MIN_TERMS
}

/// Input channels up to which a 3x3 stride-1 layer whose byte quads pay runs faster on them than
/// on the (16-bit) Winograd kernel. Same machine and method as [`QUADS_MIN_TERMS`]: quads took
/// 0.6 to 0.9 of Winograd's time on layers over 32 to 64 channels (SqueezeNet's 27x27 and 13x13,
/// resnet18's 56x56 and 16x16 planes), Winograd 0.7 to 0.9 of theirs over 128 channels on 8x8
/// and 512 on 7x7, and the two were level over 128 and 256 channels on 28x28 and 14x14.
/// Rechecked once the quads' requantisation was hoisted (2026-12-04, quads for every layer up
/// to 512 channels): Winograd still took 0.75 to 0.93 of their time over 128 to 512 channels.
pub const QUADS_OVER_WINOGRAD_MAX_CHANNELS: usize = 64;

/// [`QUADS_OVER_WINOGRAD_MAX_CHANNELS`] for this CPU: on Intel's, byte quads at every channel
/// count, the opposite of the AMD Zen 4's order. Measured on a virtual Intel Xeon with AVX-512
/// VNNI and AVX-VNNI (reported as family 6 model 167; `layer_speed --steps`, the two choices'
/// binaries alternating, 2026-12-04): resnet18-224's 3x3 layers took 0.55 to 0.94 of
/// Winograd's time on quads (64 channels on 56x56 0.94, 128 on 28x28 0.72, 256 on 14x14 0.64,
/// 512 on 7x7 0.55), the whole run 20.0 -> 13.5 ms.
fn quads_over_winograd_max_channels() -> usize {
    if is_intel() {
        usize::MAX
    } else {
        QUADS_OVER_WINOGRAD_MAX_CHANNELS
    }
}

/// Whether this CPU's vendor string is Intel's.
fn is_intel() -> bool {
    let id = __cpuid(0);
    [id.ebx, id.edx, id.ecx] == [*b"Genu", *b"ineI", *b"ntel"].map(u32::from_le_bytes)
}

/// Output pixels up to which a layer the few-pixel kernel takes runs faster on it than on byte
/// quads, on a VNNI CPU (it takes up to [`crate::strips::FEW_PIXELS`]). Same machine and method
/// as [`QUADS_MIN_TERMS`]: on 2x2 planes quads took 1.1 to 1.7 times as long (MobileNetV2's,
/// resnet18's), on 3x3 planes 0.5 to 1.0 (SqueezeNet's, 9 pixels of a 16-pixel tile).
/// Rechecked once the few-pixel kernel took `vpdpbusd` too: on SqueezeNet-64's 3x3 planes it
/// was faster on the 3x3 windows (0.85) and slower on the 1x1 ones (1.7), level overall.
pub const FEW_PIXELS_OVER_QUADS_MAX: usize = 4;

impl Prepared {
    /// `testing`: every layer the byte quads suit takes them, whether or not they pay, and
    /// Winograd keeps every layer it suits (so tests reach each path on every shape).
    fn new(conv: &Conv<'_>, vnni: Option<Vnni>, testing: bool) -> Option<Self> {
        let mut packed = Packed::new(conv)?;
        let quads_first = vnni.is_some()
            && !testing
            && quads_pay(conv)
            && conv.geometry.input[0] <= quads_over_winograd_max_channels();
        let winograd = if quads_first {
            None
        } else {
            Winograd::new(conv)
        };
        let [_, oh, ow] = conv.geometry.output;
        let few = FewPixels::new(conv, vnni)
            .filter(|_| vnni.is_none() || oh * ow <= FEW_PIXELS_OVER_QUADS_MAX);
        if few.is_some() {
            // Its bytes are all that layer reads: the 16-bit packing would only take memory.
            packed.weights = Vec::new();
        }
        // A one-channel depthwise layer of a few pixels is also a few-pixel layer: that runs it.
        let row_quads = match vnni {
            Some(vnni) if winograd.is_none() && few.is_none() => RowQuads::new(conv, vnni),
            _ => None,
        };
        let quads = match vnni {
            Some(vnni)
                if winograd.is_none()
                    && few.is_none()
                    && row_quads.is_none()
                    && (testing || quads_pay(conv)) =>
            {
                Quads::new(conv, &packed, vnni)
            }
            _ => None,
        };
        let lanes = (few.is_none() && row_quads.is_none())
            .then(|| ChannelLanes::new(conv))
            .flatten();
        Some(Self {
            packed,
            winograd,
            quads,
            few,
            lanes,
            row_quads,
        })
    }

    /// Scratch needs: padded input, strip, and for Winograd the transformed input and products
    /// (or for VNNI the byte-quad strip, and for layers of a few pixels their sums, in the
    /// products' buffer).
    fn scratch_len(&self) -> [usize; 4] {
        let [padded, strip] = self.packed.scratch_len();
        let [transformed, products] = self.winograd.as_ref().map_or([0, 0], Winograd::scratch_len);
        let laid_out = (self.lanes.as_ref()).map_or(0, |l| l.input_len(&self.packed.geometry));
        let quads = self.quads.as_ref().map_or(0, Quads::strip_len);
        [
            (padded + depthwise::SLACK)
                .max(self.row_quads.as_ref().map_or(0, RowQuads::padded_len)),
            strip,
            transformed.max(laid_out),
            products
                .max(quads)
                .max(self.few.as_ref().map_or(0, FewPixels::sums_len))
                .max(self.lanes.as_ref().map_or(0, ChannelLanes::sums_len)),
        ]
    }
}

/// AVX2 convolutions for one program: packed weights per step and scratch buffers, allocated
/// at setup.
pub struct Avx2 {
    layers: Vec<Option<Prepared>>,
    scratch: Scratch,
    /// One group's requantisation constants, made once per call rather than once per tile
    /// (where they cost as much as a thin layer's arithmetic); room for the widest group is
    /// reserved at setup.
    requants: Vec<ChannelRequant>,
    /// The same constants in [`NarrowScale`]'s compact form, where every channel has one.
    narrow: Vec<NarrowScale>,
    vnni: Option<Vnni>,
}

impl Avx2 {
    /// Pack the convolutions of a program (`convs[step]`), for `vpdpbusd` where this CPU has
    /// VNNI and the layer sums enough products for it to pay ([`QUADS_MIN_TERMS`]); `None`
    /// when it lacks AVX2.
    pub fn new(convs: &[Option<Conv<'_>>]) -> Option<Self> {
        Self::prepare(convs, Vnni::detect(), false)
    }

    /// [`Avx2::new`] with VNNI's encoding chosen (`None`: `vpmaddwd` only), for tests and
    /// benchmarks of each path: with VNNI, every layer the byte quads suit takes them, even
    /// where they do not pay ([`QUADS_MIN_TERMS`]); an encoding this CPU lacks is not used.
    pub fn with_vnni(convs: &[Option<Conv<'_>>], vnni: Option<Vnni>) -> Option<Self> {
        Self::prepare(convs, vnni, true)
    }

    fn prepare(convs: &[Option<Conv<'_>>], vnni: Option<Vnni>, testing: bool) -> Option<Self> {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return None;
        }
        let vnni = vnni.filter(|v| v.available());
        let layers = prepare_convs(convs, |conv| Prepared::new(conv, vnni, testing));
        let scratch = Scratch::for_needs(layers.iter().flatten().map(Prepared::scratch_len));
        let widest = convs.iter().flatten().map(|c| c.geometry.output[0]).max();
        Some(Self {
            layers,
            scratch,
            requants: Vec::with_capacity(widest.unwrap_or(0)),
            narrow: Vec::with_capacity(widest.unwrap_or(0)),
            vnni,
        })
    }

    /// Pack one convolution (for tests and benchmarks of a single layer).
    pub fn for_conv(conv: &Conv<'_>, vnni: Option<Vnni>) -> Option<Self> {
        Self::with_vnni(&[Some(*conv)], vnni)
    }

    /// The kernel table's name for these convolutions.
    pub fn name(&self) -> &'static str {
        match self.vnni {
            None => "avx2",
            Some(Vnni::Avx) => "avx-vnni",
            Some(Vnni::Avx512) => "avx512-vnni",
        }
    }
}

/// The AVX2 plug-in for the kernel table: on a CPU with AVX2, its convolutions (packed for
/// `program`) and its Add.
pub(crate) fn plug(table: &mut KernelTable, convs: &[Option<Conv<'_>>]) {
    let Some(avx2) = Avx2::new(convs) else {
        return;
    };
    table.add = Entry {
        name: "avx2",
        kernel: add,
    };
    table.rescale = Entry {
        name: "avx2",
        kernel: rescale,
    };
    table.mul = Entry {
        name: "avx2",
        kernel: mul,
    };
    table.gemm = Entry {
        name: "avx2",
        kernel: gemm,
    };
    table.max_pool = Entry {
        name: "avx2",
        kernel: max_pool,
    };
    table.global_average_pool = Entry {
        name: "avx2",
        kernel: global_average_pool,
    };
    table.lut = if has_vbmi() {
        Entry {
            name: "avx512-vbmi",
            kernel: lut,
        }
    } else {
        Entry {
            name: "avx2",
            kernel: lut_avx2,
        }
    };
    table.conv = Entry::conv_of(avx2.name(), avx2);
}

/// Add eight lanes at a time where the sums fit 32-bit lanes exactly, else the generic kernel.
/// Reached only through [`Avx2`] or a table [`plug`] filled: both exist only once AVX2 was
/// detected.
fn add(add: &Add, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
    // Terms stay below 2^30 when each scale is below 2^6 and the zero points are int8
    // codes: then 32-bit lanes hold them and their sum exactly.
    let exact = add.requant.iter().all(|r| r.shift <= 6)
        && add.input_zero_points.iter().all(|&z| is_code(z));
    if !exact || a.len() != b.len() || output.len() != a.len() {
        return add.run(a, b, output);
    }
    if has_avx512bw() {
        // SAFETY: AVX-512 F and BW were detected.
        unsafe { add16(add, a, b, output) };
    } else {
        // SAFETY: AVX2 was detected before this function could be reached (see above).
        unsafe { add8(add, a, b, output) };
    }
    Ok(())
}

/// Whether a zero point is an int8 code: what keeps centred codes, and sums of them, inside
/// the 32-bit lanes the vector kernels compute in.
fn is_code(zero_point: i32) -> bool {
    (-128..=127).contains(&zero_point)
}

/// Rescale eight lanes at a time where the vector requantisation is exact (zero points that are
/// int8 codes, so centred codes and their scaled values fit 32 bits), else the generic kernel. Reached only through [`Avx2`] or
/// a table [`plug`] filled: both exist only once AVX2 was detected.
fn rescale(rescale: &Rescale, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
    // Centred codes are at most 255 in size: scaled by less than 2^23 they fit 32 bits.
    let exact = rescale.requant.shift <= 23
        && is_code(rescale.input_zero_point)
        && is_code(rescale.output_quant.zero_point);
    if input.len() >= RESCALE_TABLE_FROM && input.len() == output.len() {
        // A map of int8 codes to int8 codes is a 256-entry table, looked up 32 codes at a time;
        // made with the vector arithmetic where that is exact (an eighth of the generic's
        // cost, which was half of a small layer's), else the generic.
        let codes: [i8; 256] = std::array::from_fn(|i| i as u8 as i8);
        let mut table = [0i8; 256];
        if exact {
            // SAFETY: AVX2 was detected before this function could be reached (see above).
            unsafe { rescale8(rescale, &codes, &mut table) };
        } else {
            rescale.run(&codes, &mut table)?;
        }
        // SAFETY: as above.
        unsafe { lut32(&table, input, output) };
        return Ok(());
    }
    if !exact || input.len() != output.len() {
        return rescale.run(input, output);
    }
    // SAFETY: AVX2 was detected before this function could be reached (see above).
    unsafe { rescale8(rescale, input, output) };
    Ok(())
}

/// Codes from which a Rescale is a table lookup: below, making the table costs more than it
/// saves over [`rescale8`].
const RESCALE_TABLE_FROM: usize = 1024;

/// [`Rescale::run`] eight codes at a time: widen, centre, requantise and clamp as
/// [`requantize_i8`] does, narrow.
#[target_feature(enable = "avx2")]
fn rescale8(rescale: &Rescale, input: &[i8], output: &mut [i8]) {
    let lanes = Lanes::new(rescale.requant, rescale.output_quant);
    let zero = _mm256_set1_epi32(rescale.input_zero_point);
    let whole = input.len() / 8 * 8;
    for (src, dst) in input[..whole]
        .chunks_exact(8)
        .zip(output[..whole].chunks_exact_mut(8))
    {
        let codes = requantize8(_mm256_sub_epi32(load8(src), zero), &lanes);
        store8(codes, dst);
    }
    // The tail, and the generic kernel's exact arithmetic for it.
    let _ = rescale.run(&input[whole..], &mut output[whole..]);
}

/// Multiply eight lanes at a time where the vector requantisation is exact (zero points that
/// are int8 codes, products of centred codes, at most 2^16, scaled below 2^15), else the
/// generic kernel. Reached only through [`Avx2`] or a table [`plug`] filled: both exist only
/// once AVX2 was detected.
fn mul(mul: &Mul, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
    let [za, zb] = mul.input_zero_points;
    let exact = mul.requant.shift <= 15
        && is_code(za)
        && is_code(zb)
        && is_code(mul.output_quant.zero_point);
    // The shapes Mul::run takes: b as long as a, or one value per plane of a.
    let shapes = !b.is_empty() && a.len().is_multiple_of(b.len()) && output.len() == a.len();
    if !exact || !shapes {
        return mul.run(a, b, output);
    }
    // SAFETY: AVX2 was detected before this function could be reached (see above).
    unsafe { mul8(mul, a, b, output) };
    Ok(())
}

/// [`Mul::run`] eight codes at a time.
#[target_feature(enable = "avx2")]
fn mul8(mul: &Mul, a: &[i8], b: &[i8], output: &mut [i8]) {
    let lanes = Lanes::new(mul.requant, mul.output_quant);
    let [za, zb] = mul.input_zero_points;
    let (za, zb) = (_mm256_set1_epi32(za), _mm256_set1_epi32(zb));
    let plane = a.len() / b.len();
    if plane == 1 {
        let whole = a.len() / 8 * 8;
        let parts = a[..whole].chunks_exact(8).zip(b[..whole].chunks_exact(8));
        for ((x, y), dst) in parts.zip(output[..whole].chunks_exact_mut(8)) {
            let (x, y) = (
                _mm256_sub_epi32(load8(x), za),
                _mm256_sub_epi32(load8(y), zb),
            );
            store8(requantize8(_mm256_mullo_epi32(x, y), &lanes), dst);
        }
        let _ = mul.run(&a[whole..], &b[whole..], &mut output[whole..]);
        return;
    }
    if plane < 8 {
        // Planes smaller than a vector (squeeze-excite's gates on 2x2 and 4x4 maps): eight
        // codes of consecutive planes at a time, each lane with its own plane's factor.
        let whole = a.len() / 8 * 8;
        for (i, (x, dst)) in a[..whole]
            .chunks_exact(8)
            .zip(output[..whole].chunks_exact_mut(8))
            .enumerate()
        {
            let mut factors = [0i32; 8];
            for (k, f) in factors.iter_mut().enumerate() {
                *f = i32::from(b[(8 * i + k) / plane]) - mul.input_zero_points[1];
            }
            // SAFETY: `factors` is 32 bytes; the load is unaligned.
            let factors = unsafe { _mm256_loadu_si256(factors.as_ptr().cast()) };
            let x = _mm256_sub_epi32(load8(x), za);
            store8(requantize8(_mm256_mullo_epi32(x, factors), &lanes), dst);
        }
        // The generic kernel from the plane the last codes start in (it redoes a few codes
        // of that plane, to the same bytes).
        let first = whole / plane;
        let _ = mul.run(
            &a[first * plane..],
            &b[first..],
            &mut output[first * plane..],
        );
        return;
    }
    if plane >= NR {
        if let Some(narrow) = NarrowScale::new(0, mul.requant, mul.output_quant) {
            if plane >= 2 * NR && has_avx512bw() {
                // SAFETY: AVX-512 F and BW were detected.
                unsafe { mul_planes32(&narrow, mul, a, b, output) };
            } else {
                mul_planes16(&narrow, mul, a, b, output);
            }
            return;
        }
    }
    for ((xs, y), outs) in a
        .chunks_exact(plane)
        .zip(b)
        .zip(output.chunks_exact_mut(plane))
    {
        let scale = _mm256_set1_epi32(i32::from(*y) - mul.input_zero_points[1]);
        for start in vector_starts(plane, 8) {
            let x = _mm256_sub_epi32(load8(&xs[start..start + 8]), za);
            store8(
                requantize8(_mm256_mullo_epi32(x, scale), &lanes),
                &mut outs[start..start + 8],
            );
        }
    }
}

/// [`mul8`] for one factor per plane of at least 16 codes (squeeze-excite's gates), with a
/// [`NarrowScale`]: 16 codes at a time in 16-bit lanes. Centred codes are within ±255, so
/// `vpmullw` and `vpmulhw` give each product's two 16-bit halves exactly, and interleaved they
/// are the 32-bit products in the lane order [`NarrowScale::codes_vector`] reads.
#[target_feature(enable = "avx2")]
fn mul_planes16(narrow: &NarrowScale, mul: &Mul, a: &[i8], b: &[i8], output: &mut [i8]) {
    let clamp = NarrowClamp::new(mul.output_quant);
    let [za, zb] = mul.input_zero_points;
    let za = _mm256_set1_epi16(za as i16);
    let plane = a.len() / b.len().max(1);
    for ((xs, &y), outs) in a
        .chunks_exact(plane)
        .zip(b)
        .zip(output.chunks_exact_mut(plane))
    {
        let factor = _mm256_set1_epi16((i32::from(y) - zb) as i16);
        for start in vector_starts(plane, NR) {
            let (Some(x), Some(dst)) = (xs.get(start..start + NR), outs.get_mut(start..start + NR))
            else {
                return;
            };
            // SAFETY: `x` and `dst` are 16 bytes, one 128-bit load and store.
            unsafe {
                let x = _mm256_cvtepi8_epi16(_mm_loadu_si128(x.as_ptr().cast()));
                let x = _mm256_sub_epi16(x, za);
                let (low, high) = (_mm256_mullo_epi16(x, factor), _mm256_mulhi_epi16(x, factor));
                let products = [
                    _mm256_unpacklo_epi16(low, high),
                    _mm256_unpackhi_epi16(low, high),
                ];
                let codes = narrow.codes_vector(products, &clamp);
                _mm_storeu_si128(dst.as_mut_ptr().cast(), codes);
            }
        }
    }
}

/// [`mul_planes16`] 32 codes at a time in 512-bit vectors, for planes of at least 32 codes:
/// the products' halves interleaved within each 128-bit lane are codes `8l..8l + 3` and
/// `8l + 4..8l + 7` of lane `l`, so the packs leave the words in order, and `vpmovswb`
/// saturates them to bytes in order (the same codes as the two packs). MobileNetV3-small-224's
/// and EfficientNet-B0-224's squeeze-excite planes are 7x7 to 112x112.
#[target_feature(enable = "avx2,avx512f,avx512bw")]
fn mul_planes32(narrow: &NarrowScale, mul: &Mul, a: &[i8], b: &[i8], output: &mut [i8]) {
    let clamp = NarrowClamp::new(mul.output_quant);
    let [za, zb] = mul.input_zero_points;
    let za = _mm512_set1_epi16(za as i16);
    let plane = a.len() / b.len().max(1);
    let width = 2 * NR;
    for ((xs, &y), outs) in a
        .chunks_exact(plane)
        .zip(b)
        .zip(output.chunks_exact_mut(plane))
    {
        let factor = _mm512_set1_epi16((i32::from(y) - zb) as i16);
        for start in vector_starts(plane, width) {
            let (Some(x), Some(dst)) = (
                xs.get(start..start + width),
                outs.get_mut(start..start + width),
            ) else {
                return;
            };
            // SAFETY: `x` and `dst` are 32 bytes, one 256-bit load and store.
            unsafe {
                let x = _mm512_cvtepi8_epi16(_mm256_loadu_si256(x.as_ptr().cast()));
                let x = _mm512_sub_epi16(x, za);
                let (low, high) = (_mm512_mullo_epi16(x, factor), _mm512_mulhi_epi16(x, factor));
                let words = _mm512_packs_epi32(
                    narrow.values512(_mm512_unpacklo_epi16(low, high)),
                    narrow.values512(_mm512_unpackhi_epi16(low, high)),
                );
                let codes = clamp.bytes(_mm512_cvtsepi16_epi8(words));
                _mm256_storeu_si256(dst.as_mut_ptr().cast(), codes);
            }
        }
    }
}

/// Where a plane of `len` codes (at least `width`) is read `width` at a time: whole vectors
/// from the start, then the last `width` codes, overlapping the vector before (the same codes
/// again): no scalar tail per plane.
fn vector_starts(len: usize, width: usize) -> impl Iterator<Item = usize> {
    let last = len.saturating_sub(width);
    (0..len).step_by(width.max(1)).map(move |at| at.min(last))
}

/// Whether this CPU has AVX-512 F and BW (512-bit vectors of bytes and words).
pub(crate) fn has_avx512bw() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
}

/// Sixteen products at a time where centred inputs fit 16 bits (an int8 zero point), else the
/// generic kernel. Reached only through a table [`plug`] filled, which exists only once AVX2
/// was detected.
fn gemm(gemm: &Gemm<'_>, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
    let shapes = gemm.weights.len() == input.len() * output.len()
        && gemm.channels.fits(output.len())
        && !input.is_empty();
    if !is_code(gemm.input_zero_point) || !shapes {
        return gemm.run(input, output);
    }
    // SAFETY: AVX2 was detected before this function could be reached (see above).
    unsafe { gemm16(gemm, input, output) };
    Ok(())
}

/// [`Gemm::run`] with `vpmaddwd`: centred inputs (at most 255 in size) times weights, in
/// pairs, into 32-bit lanes. Each pair's sum is below 2^16, and the lanes add modulo 2^32 as
/// the generic kernel's `wrapping_add` does, so the sums are the same in any order.
#[target_feature(enable = "avx2")]
fn gemm16(gemm: &Gemm<'_>, input: &[i8], output: &mut [i8]) {
    let q = gemm.output_quant;
    let zero = _mm256_set1_epi16(gemm.input_zero_point as i16);
    let whole = input.len() / 16 * 16;
    for (o, (out, row)) in output
        .iter_mut()
        .zip(gemm.weights.chunks_exact(input.len()))
        .enumerate()
    {
        let mut sums = _mm256_setzero_si256();
        for (x, w) in input[..whole].chunks_exact(16).zip(row.chunks_exact(16)) {
            let x = _mm256_sub_epi16(load16(x), zero);
            sums = _mm256_add_epi32(sums, _mm256_madd_epi16(x, load16(w)));
        }
        let mut lanes = [0i32; 8];
        // SAFETY: `lanes` is 32 bytes; the store is unaligned.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), sums) };
        let (bias, requant) = gemm.channels.get(o);
        let acc = input[whole..]
            .iter()
            .zip(&row[whole..])
            .fold(bias, |acc, (&x, &w)| {
                acc.wrapping_add((i32::from(x) - gemm.input_zero_point) * i32::from(w))
            });
        let acc = lanes.iter().fold(acc, |acc, &l| acc.wrapping_add(l));
        *out = requantize_i8(acc, requant, q.zero_point, q.min, q.max);
    }
}

/// Whether this CPU has AVX-512 VBMI's byte permutes (with the AVX-512 they extend).
fn has_vbmi() -> bool {
    has_avx512bw() && std::arch::is_x86_feature_detected!("avx512vbmi")
}

/// Table lookups 64 codes at a time where the CPU has AVX-512 VBMI, else the generic kernel.
/// Reached only through a table [`plug`] filled, which sets it only once VBMI was detected.
fn lut(lut: &Lut<'_>, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
    match <&[i8; 256]>::try_from(lut.table) {
        Ok(table) if input.len() == output.len() => {
            // SAFETY: VBMI was detected before this function could be reached (see above).
            unsafe { lut64(table, input, output) };
            Ok(())
        }
        _ => lut.run(input, output),
    }
}

/// Table lookups 32 codes at a time with `vpshufb`. Reached only through a table [`plug`]
/// filled, which exists only once AVX2 was detected.
fn lut_avx2(lut: &Lut<'_>, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
    match <&[i8; 256]>::try_from(lut.table) {
        Ok(table) if input.len() == output.len() => {
            // SAFETY: AVX2 was detected before this function could be reached (see above).
            unsafe { lut32(table, input, output) };
            Ok(())
        }
        _ => lut.run(input, output),
    }
}

/// [`Lut::run`] with `vpshufb`: the table as two halves of 8 rows of 16 entries, `T[r]` and
/// `T[8 + r]`, looked up by the code's low seven bits `u`, the sign bit choosing the half. Step
/// `k` of a half uses `u - 16 k` (wrapping): `vpshufb` reads entry `(u - 16 k) & 15` of its row,
/// the code's low nibble, where that index is below 128 (`k <= u >> 4`; for larger `k` it is
/// negative, bit 7 set) and writes 0 elsewhere. The steps XOR together, so a half's row `k` is
/// stored as `T[k] ^ T[k - 1]` and the rows `0..=u >> 4` a code reads XOR to its own row. Five
/// instructions per two rows (the subtraction shared), not eight.
#[target_feature(enable = "avx2")]
fn lut32(table: &[i8; 256], input: &[i8], output: &mut [i8]) {
    // Row `k` of the half starting at row `first`, XORed with the row before it in the half.
    let stored = |first: usize, k: usize| {
        let entry = |r: usize, i: usize| table[16 * (first + r) + i] as u8;
        let bytes: [u8; 16] =
            core::array::from_fn(|i| entry(k, i) ^ if k > 0 { entry(k - 1, i) } else { 0 });
        // SAFETY: `bytes` holds 16 bytes.
        _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) })
    };
    // Filled by a loop: `array::from_fn` here cost more (MobileNetV3-small-224 57.3 -> 57.8 M).
    let mut low = [_mm256_setzero_si256(); 8];
    let mut high = [_mm256_setzero_si256(); 8];
    for k in 0..8 {
        low[k] = stored(0, k);
        high[k] = stored(8, k);
    }
    let (next_row, seven_bits) = (_mm256_set1_epi8(16), _mm256_set1_epi8(0x7f));
    // SAFETY (every load and store below): 32 bytes of a slice at least that long, unaligned.
    let whole = input.len() / 32 * 32;
    for (x, y) in input[..whole]
        .chunks_exact(32)
        .zip(output[..whole].chunks_exact_mut(32))
    {
        let codes = unsafe { _mm256_loadu_si256(x.as_ptr().cast()) };
        let mut index = _mm256_and_si256(codes, seven_bits);
        let mut from_low = _mm256_shuffle_epi8(low[0], index);
        let mut from_high = _mm256_shuffle_epi8(high[0], index);
        for k in 1..8 {
            index = _mm256_sub_epi8(index, next_row);
            from_low = _mm256_xor_si256(from_low, _mm256_shuffle_epi8(low[k], index));
            from_high = _mm256_xor_si256(from_high, _mm256_shuffle_epi8(high[k], index));
        }
        let looked_up = _mm256_blendv_epi8(from_low, from_high, codes);
        unsafe { _mm256_storeu_si256(y.as_mut_ptr().cast(), looked_up) };
    }
    for (y, &x) in output[whole..].iter_mut().zip(&input[whole..]) {
        *y = table[usize::from(x as u8)];
    }
}

/// [`Lut::run`] with `vpermi2b`: a code's low seven bits index 128 table entries held in two
/// registers, its sign bit chooses the upper or lower half of the table.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
fn lut64(table: &[i8; 256], input: &[i8], output: &mut [i8]) {
    // SAFETY (every load and store below): 64 bytes of a slice at least that long, unaligned.
    let quarter = |i: usize| unsafe { _mm512_loadu_si512(table[64 * i..].as_ptr().cast()) };
    let [first, second, third, fourth] = [0, 1, 2, 3].map(quarter);
    let whole = input.len() / 64 * 64;
    for (x, y) in input[..whole]
        .chunks_exact(64)
        .zip(output[..whole].chunks_exact_mut(64))
    {
        let codes = unsafe { _mm512_loadu_si512(x.as_ptr().cast()) };
        // Codes 0..=127 are entries 0..=127; codes -128..=-1 (bytes 128..=255) the rest.
        let low = _mm512_permutex2var_epi8(first, codes, second);
        let high = _mm512_permutex2var_epi8(third, codes, fourth);
        let looked_up = _mm512_mask_blend_epi8(_mm512_movepi8_mask(codes), low, high);
        unsafe { _mm512_storeu_si512(y.as_mut_ptr().cast(), looked_up) };
    }
    for (y, &x) in output[whole..].iter_mut().zip(&input[whole..]) {
        *y = table[usize::from(x as u8)];
    }
}

/// The generic [`GlobalAveragePool::run`] compiled with AVX2 (its sums widen codes 8 at a
/// time, not 4 as with SSE2). Reached only through a table [`plug`] filled.
fn global_average_pool(
    pool: &GlobalAveragePool,
    input: &[i8],
    output: &mut [i8],
) -> Result<(), ShapeError> {
    // SAFETY: AVX2 was detected before this function could be reached.
    unsafe { global_average_pool_avx2(pool, input, output) }
}

#[target_feature(enable = "avx2")]
fn global_average_pool_avx2(
    pool: &GlobalAveragePool,
    input: &[i8],
    output: &mut [i8],
) -> Result<(), ShapeError> {
    // Planes under a vector: the generic sum (compiled here with AVX2), which vectorises
    // across them better than `sum_codes`' scalar tail.
    if input.len() < 32 * pool.channels {
        return pool.run(input, output);
    }
    pool.run_summing(input, output, |plane| sum_codes(plane))
}

/// The sum of `codes` modulo 2^32, as the generic kernel's wrapping `i32` sum: 32 at a time by
/// `vpsadbw` against zero (each code made unsigned, `x + 128`, its sign bit flipped; the 128s
/// taken off at the end), exact in 64-bit lanes.
#[target_feature(enable = "avx2")]
fn sum_codes(codes: &[i8]) -> i32 {
    let flip = _mm256_set1_epi8(i8::MIN);
    let mut sums = _mm256_setzero_si256();
    let whole = codes.len() / 32 * 32;
    for chunk in codes[..whole].chunks_exact(32) {
        // SAFETY: 32 bytes, unaligned.
        let unsigned = _mm256_xor_si256(unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) }, flip);
        sums = _mm256_add_epi64(sums, _mm256_sad_epu8(unsigned, _mm256_setzero_si256()));
    }
    let mut lanes = [0i64; 4];
    // SAFETY: 4 i64, 32 bytes.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), sums) };
    let rest: i64 = codes[whole..].iter().map(|&x| i64::from(x)).sum();
    // Truncated to 32 bits: the same as the wrapping sum.
    (lanes.iter().sum::<i64>() - 128 * whole as i64 + rest) as i32
}

/// [`max_pool_by_rows`] compiled with AVX2. Reached only through a table [`plug`] filled,
/// which exists only once AVX2 was detected.
fn max_pool(pool: &MaxPool, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
    // SAFETY: AVX2 was detected before this function could be reached (see above).
    unsafe { max_pool_avx2(pool, input, output) }
}

#[target_feature(enable = "avx2")]
fn max_pool_avx2(pool: &MaxPool, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
    max_pool_by_rows(pool, input, output)
}

/// Sixteen codes widened to 16-bit lanes.
#[target_feature(enable = "avx2")]
fn load16(codes: &[i8]) -> __m256i {
    let mut sixteen = [0u8; 16];
    for (s, &c) in sixteen.iter_mut().zip(codes) {
        *s = c as u8;
    }
    // SAFETY: `sixteen` is 16 bytes; the load is unaligned.
    _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(sixteen.as_ptr().cast()) })
}

/// Eight codes widened to 32-bit lanes.
#[target_feature(enable = "avx2")]
fn load8(codes: &[i8]) -> __m256i {
    let mut eight = [0u8; 8];
    for (e, &c) in eight.iter_mut().zip(codes) {
        *e = c as u8;
    }
    _mm256_cvtepi8_epi32(_mm_cvtsi64_si128(i64::from_le_bytes(eight)))
}

/// Quantise float inputs to int8 codes eight at a time on a CPU with AVX2: `x * inverse`
/// rounded half away from zero, offset by `zero_point`, clamped to `[-128, 127]` (NaN to
/// `zero_point as i8`), the same arithmetic as the plan's scalar quantiser step for step, so
/// the same codes (its test compares the two on edge values and random floats). Returns how
/// many leading values it wrote (whole vectors; none without AVX2); the caller does the rest.
pub fn quantize_input(input: &[f32], codes: &mut [i8], inverse: f32, zero_point: i32) -> usize {
    if !std::arch::is_x86_feature_detected!("avx2") {
        return 0;
    }
    // SAFETY: this CPU has AVX2, the only feature the function is compiled for.
    unsafe { quantize8(input, codes, inverse, zero_point) }
}

#[target_feature(enable = "avx2")]
fn quantize8(input: &[f32], codes: &mut [i8], inverse: f32, zero_point: i32) -> usize {
    let whole = input.len().min(codes.len()) / 8 * 8;
    let inverse = _mm256_set1_ps(inverse);
    // From 2^23 in size every float is an integer: it is its own rounding.
    let exact = _mm256_set1_ps(8_388_608.0);
    let sign = _mm256_set1_ps(-0.0);
    let offset = _mm256_set1_ps(zero_point as f32);
    let (low, high) = (_mm256_set1_ps(-128.0), _mm256_set1_ps(127.0));
    let nan_code = _mm256_set1_epi32(i32::from(zero_point as i8));
    // Eight floats to eight codes in 32-bit lanes.
    let codes8 = |x: &[f32]| {
        // SAFETY: `x` holds 8 f32, 32 bytes.
        let q = _mm256_mul_ps(unsafe { _mm256_loadu_ps(x.as_ptr()) }, inverse);
        // Half away from zero: the whole part, plus the whole part of twice the fraction
        // (1 from a half up, -1 from a half down, else 0). Both steps are exact below 2^23:
        // the fraction of a float is a float, and doubling it only moves its exponent.
        let truncate = |v| _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
        let whole_part = truncate(q);
        let fraction = _mm256_sub_ps(q, whole_part);
        let rounded = _mm256_add_ps(whole_part, truncate(_mm256_add_ps(fraction, fraction)));
        // Small values rounded, the rest (huge, infinite, NaN) as they are.
        let small = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_andnot_ps(sign, q), exact);
        let code = _mm256_add_ps(_mm256_blendv_ps(q, rounded, small), offset);
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(code, code);
        let clamped = _mm256_min_ps(_mm256_max_ps(code, low), high);
        _mm256_blendv_epi8(
            _mm256_cvtps_epi32(clamped),
            nan_code,
            _mm256_castps_si256(nan),
        )
    };
    // 32 at a time, packed into one store (the codes are in range, so the saturating packs
    // keep them; the packs interleave the four vectors' halves, the permutation undoes it),
    // then 8 at a time: a store of 8 bytes per 8 floats was a third of the time.
    let blocks = whole / 32 * 32;
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (x, dst) in input[..blocks]
        .chunks_exact(32)
        .zip(codes[..blocks].chunks_exact_mut(32))
    {
        let [a, b, c, d] = [0, 8, 16, 24].map(|at| codes8(&x[at..at + 8]));
        let words = [_mm256_packs_epi32(a, b), _mm256_packs_epi32(c, d)];
        let bytes = _mm256_packs_epi16(words[0], words[1]);
        let bytes = _mm256_permutevar8x32_epi32(bytes, order);
        // SAFETY: `dst` holds 32 bytes, one 256-bit store.
        unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), bytes) };
    }
    for (x, dst) in input[blocks..whole]
        .chunks_exact(8)
        .zip(codes[blocks..whole].chunks_exact_mut(8))
    {
        store8(codes8(x), dst);
    }
    whole
}

/// Eight 32-bit lanes already clamped to int8 codes, narrowed into `dst`.
#[target_feature(enable = "avx2")]
fn store8(codes: __m256i, dst: &mut [i8]) {
    // The saturating packs keep codes in [-128, 127]; each 128-bit half then holds four of
    // them in its low bytes, which the permutation puts side by side.
    let words = _mm256_packs_epi32(codes, codes);
    let bytes = _mm256_packs_epi16(words, words);
    let low = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
    match <&mut [i8; 8]>::try_from(&mut *dst) {
        // SAFETY: `whole` is 8 bytes, one 64-bit store.
        Ok(whole) => unsafe {
            _mm_storel_epi64(whole.as_mut_ptr().cast(), _mm256_castsi256_si128(low))
        },
        Err(_) => {
            let mut eight = [0i8; 8];
            // SAFETY: `eight` is 8 bytes, one 64-bit store.
            unsafe { _mm_storel_epi64(eight.as_mut_ptr().cast(), _mm256_castsi256_si128(low)) };
            for (d, &b) in dst.iter_mut().zip(&eight) {
                *d = b;
            }
        }
    }
}

impl Kernels for Avx2 {
    fn prepared_weights(&self, visit: &mut dyn FnMut(&[i32])) {
        for prepared in self.layers.iter().flatten() {
            visit(&prepared.packed.weights);
            if let Some(w) = &prepared.winograd {
                visit(w.weights());
            }
            for block in prepared.quads.iter().flat_map(|q| q.packed.blocks()) {
                visit(block);
            }
            if let Some(few) = &prepared.few {
                visit(few.words());
            }
            if let Some(lanes) = &prepared.lanes {
                visit(lanes.words());
            }
            for block in prepared.row_quads.iter().flat_map(RowQuads::blocks) {
                visit(block);
            }
        }
    }

    fn flip_prepared_bit(&mut self, bit: u64) -> bool {
        let blocks = self
            .layers
            .iter_mut()
            .flatten()
            .flat_map(|p| {
                let winograd = p.winograd.as_mut().map(Winograd::weights_mut);
                let quads = p.quads.iter_mut().flat_map(|q| q.packed.blocks_mut());
                let row_quads = p.row_quads.iter_mut().flat_map(RowQuads::blocks_mut);
                let few = p.few.as_mut().map(FewPixels::words_mut);
                let lanes = p.lanes.as_mut().map(ChannelLanes::words_mut);
                [Some(p.packed.weights.as_mut_slice()), winograd, few, lanes]
                    .into_iter()
                    .flatten()
                    .chain(quads)
                    .chain(row_quads)
            })
            .collect();
        flip_bit(blocks, bit)
    }

    fn add(&mut self, add: &Add, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        self::add(add, a, b, output)
    }

    fn rescale(
        &mut self,
        rescale: &Rescale,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        self::rescale(rescale, input, output)
    }

    fn mul(&mut self, mul: &Mul, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        self::mul(mul, a, b, output)
    }

    fn conv(
        &mut self,
        step: usize,
        conv: &Conv<'_>,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        let Self {
            layers,
            scratch,
            requants,
            narrow,
            ..
        } = self;
        let Some(Some(prepared)) = layers.get(step) else {
            return conv.run(input, output);
        };
        let packed = &prepared.packed;
        let strided = conv.geometry.stride.iter().chain(&conv.geometry.dilation);
        if !packed.accepts(conv, input, output)
            || !scratch.fits(prepared.scratch_len())
            || !strided.into_iter().all(|&s| s > 0)
        {
            // The generic kernel reports what is wrong, or runs what this one cannot.
            return conv.run(input, output);
        }
        let layer = packed.layer(conv);
        if let Some(winograd) = &prepared.winograd {
            // SAFETY: AVX2 was detected in `new`; the buffers' sizes were checked above.
            unsafe {
                winograd.run(
                    &layer,
                    input,
                    &conv.channels,
                    conv.output_quant,
                    scratch,
                    output,
                )
            };
            return Ok(());
        }
        if let Some(few) = &prepared.few {
            // SAFETY: AVX2 was detected in `new`; the buffers' sizes were checked above.
            unsafe { few.run(&layer, input, &conv.channels, scratch, output) };
            return Ok(());
        }
        if let Some(lanes) = &prepared.lanes {
            let Scratch {
                transformed,
                products,
                ..
            } = scratch;
            // SAFETY: AVX2 was detected in `new`; the buffers' sizes were checked above.
            unsafe { lanes.run(&layer, input, &conv.channels, transformed, products, output) };
            return Ok(());
        }
        if let Some(row_quads) = prepared
            .row_quads
            .as_ref()
            .filter(|q| q.accepts(conv, scratch))
        {
            // SAFETY: AVX2 was detected in `new`; `accepts` checked the scratch.
            unsafe { row_quads.run(conv, &layer, input, scratch, output) };
            return Ok(());
        }
        if conv.geometry.group > 1 && depthwise::takes(&layer, scratch.padded.len()) {
            // Once per layer, not per channel: on planes of 2x2 to 8x8 the per-channel work is
            // what costs.
            let offsets = layer.tap_offsets();
            let row_pairs = depthwise::RowPairs::of(&layer);
            let mut border_zeroed = false;
            packed.for_each_group(conv, input, output, |input, weights, channels, output| {
                let group = DepthwiseGroup {
                    input,
                    weights,
                    channels,
                    border_zeroed,
                };
                let taps = (&offsets, row_pairs.as_ref());
                // SAFETY: AVX2 was detected in `new`; `takes` accepted the layer and scratch.
                unsafe { depthwise::run(&layer, taps, group, scratch, output) };
                border_zeroed = true;
            });
            return Ok(());
        }
        if let Some(quads) = prepared.quads.as_ref().filter(|q| q.accepts(conv, scratch)) {
            let constants = Constants { requants, narrow };
            quads.run(conv, &layer, input, scratch, constants, output);
            return Ok(());
        }
        packed.for_each_group(conv, input, output, |input, weights, channels, output| {
            // SAFETY: AVX2 was detected in `new`; the buffers' sizes were checked above.
            unsafe {
                let constants = Constants { requants, narrow };
                run_layer(&layer, input, weights, channels, constants, scratch, output)
            }
        });
        Ok(())
    }
}

/// The shared tile loop with the AVX2 micro-kernel and vector requantisation.
#[target_feature(enable = "avx2")]
fn run_layer(
    layer: &Layer<'_>,
    input: &[i8],
    weights: &[i32],
    channels: &ChannelQuant<'_>,
    constants: Constants<'_>,
    scratch: &mut Scratch,
    out: &mut [i8],
) {
    let count = channels.bias.len();
    let scales = BlockScales::prepare(channels, layer.q, constants);
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
        // The tile's strip, paired once for all its blocks.
        |strip| interleave_pairs(strip),
        |tile, pairs, first| scales.codes(first, micro_kernel(tile, pairs, layer.row_pairs)),
    );
}

/// One group's requantisation constants, made once per call: compact ([`NarrowScale`]) where
/// every channel has that form, else general.
enum BlockScales<'c> {
    Narrow(&'c [NarrowScale], NarrowClamp),
    General(&'c [ChannelRequant]),
}

impl<'c> BlockScales<'c> {
    #[target_feature(enable = "avx2")]
    fn prepare(channels: &ChannelQuant<'_>, q: OutputQuant, constants: Constants<'c>) -> Self {
        let count = channels.bias.len();
        let Constants { requants, narrow } = constants;
        narrow.clear();
        narrow.extend((0..count).map_while(|o| {
            let (bias, requant) = channels.get(o);
            NarrowScale::new(bias, requant, q)
        }));
        if narrow.len() == count {
            return Self::Narrow(narrow, NarrowClamp::new(q));
        }
        // The general constants only where some channel lacks the compact form.
        requants.clear();
        requants.extend((0..count).map(|o| {
            let (bias, requant) = channels.get(o);
            ChannelRequant::new(bias, requant, q)
        }));
        Self::General(requants)
    }

    /// The codes of channels `first..first + MR` (fewer past the group's last) from their sums.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn codes(&self, first: usize, acc: [[__m256i; 2]; MR]) -> [[i8; NR]; MR] {
        if let Self::Narrow(narrow, clamp) = self {
            let block = narrow.get(first..).unwrap_or_default();
            if let Some(Ok(block)) = block.get(..MR).map(<&[NarrowScale; MR]>::try_from) {
                // Unrolled, so the sums stay in registers; two channels' codes a vector.
                let [a, b, c, d] = acc;
                let halves = [
                    pair_codes([&block[0], &block[1]], [a, b], clamp),
                    pair_codes([&block[2], &block[3]], [c, d], clamp),
                ];
                let mut codes = [[0i8; NR]; MR];
                // SAFETY: `codes` is 64 bytes, two 256-bit stores.
                unsafe {
                    let at = codes.as_mut_ptr().cast::<__m256i>();
                    _mm256_storeu_si256(at, halves[0]);
                    _mm256_storeu_si256(at.add(1), halves[1]);
                }
                return codes;
            }
        }
        self.other_codes(first, acc)
    }

    /// [`BlockScales::codes`] from 512-bit sums (each channel's 16 in the lane order of its
    /// two 256-bit halves, low then high), for AVX-512's micro-kernel: four narrow channels'
    /// codes in 512-bit vectors, so that no 256-bit instruction takes the port the 512-bit
    /// `vpdpbusd` share; the rest as [`BlockScales::codes`] does.
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    fn codes512(&self, first: usize, acc: [__m512i; MR]) -> [[i8; NR]; MR] {
        if let Self::Narrow(narrow, clamp) = self {
            let block = narrow.get(first..).unwrap_or_default();
            if let Some(Ok(block)) = block.get(..MR).map(<&[NarrowScale; MR]>::try_from) {
                let [a, b, c, d] = acc;
                // Within each 128-bit lane (pixels 0-3, 8-11, 4-7, 12-15 in turn): the four
                // channels' four codes in turn, saturated to bytes.
                let ab = _mm512_packs_epi32(block[0].values512(a), block[1].values512(b));
                let cd = _mm512_packs_epi32(block[2].values512(c), block[3].values512(d));
                let bytes = _mm512_packs_epi16(ab, cd);
                // Channel k's pixels 4g..4g + 4 are word k of lane [0, 2, 1, 3][g].
                let order = _mm512_setr_epi32(0, 8, 4, 12, 1, 9, 5, 13, 2, 10, 6, 14, 3, 11, 7, 15);
                let codes = clamp.bytes512(_mm512_permutexvar_epi32(order, bytes));
                let mut out = [[0i8; NR]; MR];
                // SAFETY: `out` is 64 bytes, one 512-bit store.
                unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), codes) };
                return out;
            }
        }
        let halves = acc.map(|sums| {
            [
                _mm512_castsi512_si256(sums),
                _mm512_extracti64x4_epi64::<1>(sums),
            ]
        });
        self.other_codes(first, halves)
    }

    /// [`BlockScales::codes`] for general scales and a group's last channels: apart, so that
    /// the common case is small enough to inline into the micro-kernel's loop.
    #[inline(never)]
    #[target_feature(enable = "avx2")]
    fn other_codes(&self, first: usize, acc: [[__m256i; 2]; MR]) -> [[i8; NR]; MR] {
        let mut codes = [[0i8; NR]; MR];
        match self {
            Self::Narrow(narrow, clamp) => {
                let block = narrow.get(first..).unwrap_or_default();
                for ((scale, acc), row) in block.iter().zip(acc).zip(&mut codes) {
                    *row = scale.codes(acc, clamp);
                }
            }
            Self::General(requants) => {
                let requants = requants.get(first..).unwrap_or_default();
                for ((requant, [lo, hi]), row) in requants.iter().zip(acc).zip(&mut codes) {
                    *row = requant.tile(lo, hi);
                }
            }
        }
        codes
    }
}

/// Two channels' 16 codes each from their sums (in the lane order `vpunpck*wd` leaves), in
/// pixel order, the first channel's in the low 128 bits: one clamp for both.
#[inline]
#[target_feature(enable = "avx2")]
fn pair_codes(
    [x, y]: [&NarrowScale; 2],
    [[x_lo, x_hi], [y_lo, y_hi]]: [[__m256i; 2]; 2],
    clamp: &NarrowClamp,
) -> __m256i {
    // Each 128-bit half of the words holds 8 pixels in order.
    let x_words = _mm256_packs_epi32(x.values(x_lo), x.values(x_hi));
    let y_words = _mm256_packs_epi32(y.values(y_lo), y.values(y_hi));
    let bytes = clamp.bytes(_mm256_packs_epi16(x_words, y_words));
    _mm256_permute4x64_epi64::<0b11_01_10_00>(bytes)
}

/// The per-call requantisation scratch of [`BlockScales`].
struct Constants<'c> {
    requants: &'c mut Vec<ChannelRequant>,
    narrow: &'c mut Vec<NarrowScale>,
}

/// A channel's requantisation in the common case, compactly: a scale below 1/4 (a right shift
/// of at least 33) and an output zero point that is a code. With a shift of 32 + `s`, `s >= 1`,
/// the rounding half `2^(31 + s)` is a multiple of 2^32, so the rounded product shifted right
/// by 32 is the product's high half plus `2^(s - 1)` exactly (floor divisions compose); adding
/// the zero point times `2^s` there too adds it to the result exactly. What is left per value
/// is the high half of a 32x32-bit product, an add and a 32-bit shift, where
/// [`ChannelRequant`]'s vector path adds and shifts 64-bit products. The clamp is applied to
/// the codes' bytes ([`NarrowClamp`]): the packs saturate to `[-128, 127]`, which holds the
/// clamp's range, and saturation keeps order, so the codes are the same.
#[derive(Clone, Copy)]
struct NarrowScale {
    bias: i32,
    multiplier: i32,
    /// `(2·zp + 1)·2^(s - 1)`: the rounding half and the zero point, at the high half's scale.
    offset: i32,
    /// `s`: the right shift less 32.
    high_right: i64,
}

impl NarrowScale {
    fn new(bias: i32, requant: Requant, q: OutputQuant) -> Option<Self> {
        let right = 31 - i64::from(requant.shift.clamp(Requant::MIN_SHIFT, Requant::MAX_SHIFT));
        let s = right - 32;
        let offset = (2 * i64::from(q.zero_point) + 1) << (s - 1).max(0);
        // The high half of a product with a multiplier below 2^31 is within ±2^30; with an
        // offset within ±2^30 their sum fits 32 bits.
        (s >= 1 && is_code(q.zero_point) && offset.abs() < 1 << 30).then_some(Self {
            bias,
            multiplier: requant.multiplier,
            offset: offset as i32,
            high_right: s,
        })
    }

    /// `round(sums + bias, scaled) + zp` in 32-bit lanes, for every `i32` sum.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn values(&self, sums: __m256i) -> __m256i {
        let x = _mm256_add_epi32(sums, _mm256_set1_epi32(self.bias));
        let multiplier = _mm256_set1_epi32(self.multiplier);
        // `vpmuldq` multiplies the even lanes: the odd ones are moved down for a second.
        let even = _mm256_mul_epi32(x, multiplier);
        let odd = _mm256_mul_epi32(_mm256_shuffle_epi32::<0b11_11_01_01>(x), multiplier);
        let high =
            _mm256_blend_epi32::<0b1010_1010>(_mm256_shuffle_epi32::<0b11_11_01_01>(even), odd);
        let shifted = _mm256_add_epi32(high, _mm256_set1_epi32(self.offset));
        _mm256_sra_epi32(shifted, _mm_cvtsi64_si128(self.high_right))
    }

    /// [`NarrowScale::values`] for 16 lanes.
    #[inline]
    #[target_feature(enable = "avx2,avx512f")]
    fn values512(&self, sums: __m512i) -> __m512i {
        let x = _mm512_add_epi32(sums, _mm512_set1_epi32(self.bias));
        let multiplier = _mm512_set1_epi32(self.multiplier);
        let even = _mm512_mul_epi32(x, multiplier);
        let odd = _mm512_mul_epi32(_mm512_srli_epi64::<32>(x), multiplier);
        let high = _mm512_mask_blend_epi32(0xaaaa, _mm512_srli_epi64::<32>(even), odd);
        let shifted = _mm512_add_epi32(high, _mm512_set1_epi32(self.offset));
        _mm512_sra_epi32(shifted, _mm_cvtsi64_si128(self.high_right))
    }

    /// The codes of 16 sums in the lane order `vpunpck*wd` leaves them in, in pixel order.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn codes(&self, sums: [__m256i; 2], clamp: &NarrowClamp) -> [i8; NR] {
        let mut out = [0i8; NR];
        // SAFETY: `out` holds 16 bytes, one 128-bit store.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), self.codes_vector(sums, clamp)) };
        out
    }

    /// [`NarrowScale::codes`] in a register.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn codes_vector(&self, [lo, hi]: [__m256i; 2], clamp: &NarrowClamp) -> __m128i {
        let words = _mm256_packs_epi32(self.values(lo), self.values(hi));
        let bytes = clamp.bytes(_mm256_packs_epi16(words, words));
        _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b00_00_10_00>(bytes))
    }

    /// The codes of four vectors of sums `a`, `b`, `c`, `d` (one channel's), clamped once: lanes
    /// 0-3 of each in turn in the low 128 bits, lanes 4-7 in the high.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn codes32(&self, [a, b, c, d]: [__m256i; 4], clamp: &NarrowClamp) -> __m256i {
        let ab = _mm256_packs_epi32(self.values(a), self.values(b));
        let cd = _mm256_packs_epi32(self.values(c), self.values(d));
        clamp.bytes(_mm256_packs_epi16(ab, cd))
    }
}

/// A layer's output clamp in byte lanes, for [`NarrowScale`].
struct NarrowClamp {
    min: __m256i,
    max: __m256i,
}

impl NarrowClamp {
    #[target_feature(enable = "avx2")]
    fn new(q: OutputQuant) -> Self {
        Self {
            min: _mm256_set1_epi8(q.min),
            max: _mm256_set1_epi8(q.max),
        }
    }

    /// `bytes` clamped, `max` last as [`requantize_i8`] does.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn bytes(&self, bytes: __m256i) -> __m256i {
        _mm256_min_epi8(_mm256_max_epi8(bytes, self.min), self.max)
    }

    /// [`NarrowClamp::bytes`] for 64 bytes.
    #[inline]
    #[target_feature(enable = "avx2,avx512f,avx512bw")]
    fn bytes512(&self, bytes: __m512i) -> __m512i {
        let [min, max] = [self.min, self.max].map(|v| _mm512_broadcast_i64x4(v));
        _mm512_min_epi8(_mm512_max_epi8(bytes, min), max)
    }
}

/// Element-wise sums eight at a time, exactly as [`Add::run`]: each addend rescaled with
/// [`ADD_FRACTION_BITS`] extra bits, summed, rounded half up.
#[target_feature(enable = "avx2")]
fn add8(add: &Add, a: &[i8], b: &[i8], output: &mut [i8]) {
    let lanes = |i: usize| {
        let r = add.requant[i];
        let right = 31 - i64::from(r.shift.max(Requant::MIN_SHIFT));
        (
            _mm256_set1_epi32(add.input_zero_points[i]),
            Lanes {
                multiplier: _mm256_set1_epi32(r.multiplier),
                round: _mm256_set1_epi64x(1 << (right - 1)),
                right: _mm_cvtsi64_si128(right),
                // Unused: terms are rounded with `round_shift` and summed before the clamp.
                high_right: None,
                low: _mm256_setzero_si256(),
                high: _mm256_setzero_si256(),
                zero_point: _mm256_setzero_si256(),
            },
        )
    };
    let (zero_a, term_a) = lanes(0);
    let (zero_b, term_b) = lanes(1);
    let q = add.output_quant;
    let half = _mm256_set1_epi32(1 << (ADD_FRACTION_BITS - 1));
    let zero_point = _mm256_set1_epi32(q.zero_point);
    let (low, high) = (
        _mm256_set1_epi32(q.min.into()),
        _mm256_set1_epi32(q.max.into()),
    );
    let term = |codes: &[i8], zero: __m256i, l: &Lanes| {
        let centred =
            _mm256_slli_epi32::<{ ADD_FRACTION_BITS as i32 }>(_mm256_sub_epi32(load8(codes), zero));
        scale8(centred, l)
    };
    let whole = a.len() / 8 * 8;
    for ((x, y), out) in a[..whole]
        .chunks_exact(8)
        .zip(b[..whole].chunks_exact(8))
        .zip(output[..whole].chunks_exact_mut(8))
    {
        let sum = _mm256_add_epi32(
            _mm256_add_epi32(term(x, zero_a, &term_a), term(y, zero_b, &term_b)),
            half,
        );
        let code = _mm256_add_epi32(
            _mm256_srai_epi32::<{ ADD_FRACTION_BITS as i32 }>(sum),
            zero_point,
        );
        store8(_mm256_min_epi32(_mm256_max_epi32(code, low), high), out);
    }
    // The tail, and the generic kernel's exact arithmetic for it.
    let _ = add.run(&a[whole..], &b[whole..], &mut output[whole..]);
}

/// [`add8`] sixteen codes at a time in 512-bit vectors: the same terms, each product rounded
/// and shifted by `vpsraq` (AVX-512's 64-bit arithmetic shift, where AVX2 flips signs around a
/// logical one), the codes saturated to bytes by `vpmovsdb` after the clamp.
#[target_feature(enable = "avx2,avx512f,avx512bw")]
fn add16(add: &Add, a: &[i8], b: &[i8], output: &mut [i8]) {
    let term = |i: usize| {
        let r = add.requant[i];
        let right = 31 - i64::from(r.shift.max(Requant::MIN_SHIFT));
        (
            _mm512_set1_epi32(add.input_zero_points[i]),
            _mm512_set1_epi64(i64::from(r.multiplier)),
            _mm512_set1_epi64(1 << (right - 1)),
            _mm_cvtsi64_si128(right),
        )
    };
    let terms = [term(0), term(1)];
    let q = add.output_quant;
    let half = _mm512_set1_epi32(1 << (ADD_FRACTION_BITS - 1));
    let zero_point = _mm512_set1_epi32(q.zero_point);
    let (low, high) = (
        _mm512_set1_epi32(q.min.into()),
        _mm512_set1_epi32(q.max.into()),
    );
    // `round(centred * 2^F * m * 2^-right)` for 16 codes, as `scale8` for 8.
    let scaled =
        |codes: __m128i, (zero, multiplier, round, right): (__m512i, __m512i, __m512i, __m128i)| {
            let x = _mm512_slli_epi32::<{ ADD_FRACTION_BITS }>(_mm512_sub_epi32(
                _mm512_cvtepi8_epi32(codes),
                zero,
            ));
            let shift = |v: __m512i| {
                _mm512_sra_epi64(
                    _mm512_add_epi64(_mm512_mul_epi32(v, multiplier), round),
                    right,
                )
            };
            let (even, odd) = (shift(x), shift(_mm512_srli_epi64::<32>(x)));
            _mm512_mask_blend_epi32(0xaaaa, even, _mm512_slli_epi64::<32>(odd))
        };
    let whole = a.len() / 16 * 16;
    for ((x, y), out) in a[..whole]
        .chunks_exact(16)
        .zip(b[..whole].chunks_exact(16))
        .zip(output[..whole].chunks_exact_mut(16))
    {
        // SAFETY: 16 bytes each, unaligned.
        let (x, y) = unsafe {
            (
                _mm_loadu_si128(x.as_ptr().cast()),
                _mm_loadu_si128(y.as_ptr().cast()),
            )
        };
        let sum = _mm512_add_epi32(
            _mm512_add_epi32(scaled(x, terms[0]), scaled(y, terms[1])),
            half,
        );
        let code = _mm512_add_epi32(_mm512_srai_epi32::<{ ADD_FRACTION_BITS }>(sum), zero_point);
        let codes = _mm512_cvtsepi32_epi8(_mm512_min_epi32(_mm512_max_epi32(code, low), high));
        // SAFETY: 16 bytes.
        unsafe { _mm_storeu_si128(out.as_mut_ptr().cast(), codes) };
    }
    // The tail, and the generic kernel's exact arithmetic for it.
    let _ = add.run(&a[whole..], &b[whole..], &mut output[whole..]);
}

/// Rows `2k` and `2k + 1` of a strip (`[row][NR]`, an even number of rows) turned in place into
/// the pairs [`micro_kernel`] reads: `vpunpcklwd` of the two rows, then `vpunpckhwd`. Done once
/// per strip, not once per block of channels.
#[target_feature(enable = "avx2")]
fn interleave_pairs(strip: &mut [i16]) {
    for pair in strip.chunks_exact_mut(2 * NR) {
        let at = pair.as_mut_ptr();
        // SAFETY: `pair` holds 2 * NR values, two vectors, loaded before either is stored.
        unsafe {
            let (a, b) = (
                _mm256_loadu_si256(at.cast()),
                _mm256_loadu_si256(at.add(NR).cast()),
            );
            _mm256_storeu_si256(at.cast(), _mm256_unpacklo_epi16(a, b));
            _mm256_storeu_si256(at.add(NR).cast(), _mm256_unpackhi_epi16(a, b));
        }
    }
}

/// Sums of 4 channels by 16 pixels over `row_pairs` pairs of strip rows as
/// [`interleave_pairs`] leaves them: `[channel][lo, hi]`, where `lo` holds pixels 0-3 and
/// 8-11 and `hi` pixels 4-7 and 12-15.
#[target_feature(enable = "avx2")]
fn micro_kernel(tile: &[i32], pairs: &[i16], row_pairs: usize) -> [[__m256i; 2]; MR] {
    let mut acc = [[_mm256_setzero_si256(); 2]; MR];
    let tile = tile.get(..row_pairs * MR).unwrap_or(&[]);
    let pairs = pairs.get(..row_pairs * 2 * NR).unwrap_or(&[]);
    let mut step = |w: &[i32], pair: &[i16]| {
        // SAFETY: `pair` holds 2 * NR values, two vectors.
        let (lo, hi) = unsafe {
            (
                _mm256_loadu_si256(pair.as_ptr().cast()),
                _mm256_loadu_si256(pair.as_ptr().add(NR).cast()),
            )
        };
        for (sums, &w) in acc.iter_mut().zip(w) {
            let weight = _mm256_set1_epi32(w);
            sums[0] = _mm256_add_epi32(sums[0], _mm256_madd_epi16(weight, lo));
            sums[1] = _mm256_add_epi32(sums[1], _mm256_madd_epi16(weight, hi));
        }
    };
    // Two pairs per iteration: half the loop's own instructions.
    let (w2, p2) = (tile.chunks_exact(2 * MR), pairs.chunks_exact(4 * NR));
    let (w_rest, p_rest) = (w2.remainder(), p2.remainder());
    for (w, pair) in w2.zip(p2) {
        step(&w[..MR], &pair[..2 * NR]);
        step(&w[MR..], &pair[2 * NR..]);
    }
    if let (Some(w), Some(pair)) = (w_rest.get(..MR), p_rest.get(..2 * NR)) {
        step(w, pair);
    }
    acc
}

/// One output channel's bias and requantisation, broadcast once for all its tiles.
struct ChannelRequant {
    bias: i32,
    requant: Requant,
    q: OutputQuant,
    /// The broadcast bias and constants, where the vector path is exact.
    vector: Option<(__m256i, Lanes)>,
}

impl ChannelRequant {
    #[inline]
    #[target_feature(enable = "avx2")]
    fn new(bias: i32, requant: Requant, q: OutputQuant) -> Self {
        // Scales of 1 or more can exceed 32 bits before the clamp, and so can sums with a
        // zero point outside int8: the scalar path is exact for them.
        let vector = (requant.shift <= 0 && is_code(q.zero_point))
            .then(|| (_mm256_set1_epi32(bias), Lanes::new(requant, q)));
        Self {
            bias,
            requant,
            q,
            vector,
        }
    }

    /// Add the bias, requantise and clamp 16 sums; codes in pixel order.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn tile(&self, lo: __m256i, hi: __m256i) -> [i8; NR] {
        let mut codes = [0i8; NR];
        let Some((bias, lanes)) = &self.vector else {
            // SAFETY: `codes` holds 16 bytes, one 128-bit store.
            unsafe { _mm_storeu_si128(codes.as_mut_ptr().cast(), self.scalar(lo, hi)) };
            return codes;
        };
        // SAFETY: `codes` holds 16 bytes, one 128-bit store.
        unsafe {
            _mm_storeu_si128(
                codes.as_mut_ptr().cast(),
                vector_codes(lo, hi, *bias, lanes),
            )
        };
        codes
    }

    /// [`ChannelRequant::tile`] in a register.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn tile_vector(&self, lo: __m256i, hi: __m256i) -> __m128i {
        let Some((bias, lanes)) = &self.vector else {
            return self.scalar(lo, hi);
        };
        vector_codes(lo, hi, *bias, lanes)
    }

    /// [`ChannelRequant::tile_vector`] a lane at a time, exact where the vector path is not.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn scalar(&self, lo: __m256i, hi: __m256i) -> __m128i {
        let (mut l, mut h) = ([0i32; 8], [0i32; 8]);
        // SAFETY: each array holds 8 i32, one vector.
        unsafe {
            _mm256_storeu_si256(l.as_mut_ptr().cast(), lo);
            _mm256_storeu_si256(h.as_mut_ptr().cast(), hi);
        }
        let (requant, q) = (self.requant, self.q);
        let order = [0, 1, 2, 3, 8, 9, 10, 11];
        let mut codes = [0i8; NR];
        for i in 0..8 {
            let (l, h) = (l[i].wrapping_add(self.bias), h[i].wrapping_add(self.bias));
            codes[order[i]] = requantize_i8(l, requant, q.zero_point, q.min, q.max);
            codes[order[i] + 4] = requantize_i8(h, requant, q.zero_point, q.min, q.max);
        }
        // SAFETY: `codes` holds 16 bytes, one 128-bit load.
        unsafe { _mm_loadu_si128(codes.as_ptr().cast()) }
    }
}

/// Add `bias`, requantise and clamp 16 sums (in the lane order `vpunpck*wd` leaves) where the
/// vector path is exact: the codes in pixel order, in the low 128 bits. Its own function, so
/// that [`ChannelRequant::tile`] and [`ChannelRequant::tile_vector`] share it and both stay
/// small enough to inline.
#[inline]
#[target_feature(enable = "avx2")]
fn vector_codes(lo: __m256i, hi: __m256i, bias: __m256i, lanes: &Lanes) -> __m128i {
    let (lo, hi) = (_mm256_add_epi32(lo, bias), _mm256_add_epi32(hi, bias));
    let (lo, hi) = (requantize8(lo, lanes), requantize8(hi, lanes));
    // lo/hi interleave pixels in 4s; packing them back to back restores the order.
    let words = _mm256_packs_epi32(lo, hi);
    let bytes = _mm256_packs_epi16(words, words);
    _mm256_castsi256_si128(_mm256_permute4x64_epi64::<0b00_00_10_00>(bytes))
}

/// One channel's requantisation constants, broadcast.
struct Lanes {
    multiplier: __m256i,
    round: __m256i,
    right: __m128i,
    /// `right - 32`, when the shift is at least 32: then the rounded product's high half,
    /// shifted by this in 32-bit lanes, is the result.
    high_right: Option<__m128i>,
    low: __m256i,
    high: __m256i,
    zero_point: __m256i,
}

impl Lanes {
    /// Broadcast `requant` and the output's zero point and clamp. With a shift above 0 (a
    /// scale of 1 or more) [`requantize8`] is exact only for sums whose scaled value fits 32
    /// bits.
    #[target_feature(enable = "avx2")]
    fn new(requant: Requant, q: OutputQuant) -> Self {
        Self::with_range(requant, q.zero_point, i32::from(q.min), i32::from(q.max))
    }

    /// [`Lanes::new`] for an output clamped to `[min, max]` of any width.
    #[target_feature(enable = "avx2")]
    fn with_range(requant: Requant, zero_point: i32, min: i32, max: i32) -> Self {
        let shift = requant.shift.clamp(Requant::MIN_SHIFT, Requant::MAX_SHIFT);
        let right = 31 - i64::from(shift);
        Self {
            multiplier: _mm256_set1_epi32(requant.multiplier),
            round: _mm256_set1_epi64x(1 << (right - 1)),
            right: _mm_cvtsi64_si128(right),
            high_right: (right >= 32).then(|| _mm_cvtsi64_si128(right - 32)),
            low: _mm256_set1_epi32(min.saturating_sub(zero_point)),
            high: _mm256_set1_epi32(max.saturating_sub(zero_point)),
            zero_point: _mm256_set1_epi32(zero_point),
        }
    }
}

/// Add half and shift four 64-bit products right, rounding toward negative infinity: an
/// arithmetic shift made of a logical one (flip negatives, shift, flip back).
#[target_feature(enable = "avx2")]
fn round_shift(product: __m256i, l: &Lanes) -> __m256i {
    let v = _mm256_add_epi64(product, l.round);
    let sign = _mm256_cmpgt_epi64(_mm256_setzero_si256(), v);
    _mm256_xor_si256(_mm256_srl_epi64(_mm256_xor_si256(v, sign), l.right), sign)
}

/// `clamp(round(acc * m * 2^-right) + zero point)` for 8 lanes, as [`Requant::apply`] and
/// [`requantize_i8`] do it; valid where the rounded value fits 32 bits (always for `right >= 31`).
#[target_feature(enable = "avx2")]
fn requantize8(acc: __m256i, l: &Lanes) -> __m256i {
    let clamped = _mm256_min_epi32(_mm256_max_epi32(scale8(acc, l), l.low), l.high);
    _mm256_add_epi32(clamped, l.zero_point)
}

/// `round(acc * m * 2^-right)` for 8 lanes, as [`Requant::apply`] does it; valid where the
/// rounded value fits 32 bits.
#[target_feature(enable = "avx2")]
fn scale8(acc: __m256i, l: &Lanes) -> __m256i {
    if let Some(high_right) = l.high_right {
        scale_high(acc, l.multiplier, l.round, high_right)
    } else {
        let even = round_shift(_mm256_mul_epi32(acc, l.multiplier), l);
        let odd = round_shift(
            _mm256_mul_epi32(_mm256_srli_epi64::<32>(acc), l.multiplier),
            l,
        );
        _mm256_blend_epi32::<0b1010_1010>(even, _mm256_slli_epi64::<32>(odd))
    }
}

/// [`scale8`] with a right shift of 32 or more (`high_right` is the shift less 32): a floor
/// shift by 32 or more is one by 32, the high half, then one by the rest; the high half of
/// `acc * m + round` (at most 2^62 + 2^61) fits 32 bits, so a 32-bit arithmetic shift finishes
/// it exactly, without emulating a 64-bit one.
#[inline]
#[target_feature(enable = "avx2")]
fn scale_high(acc: __m256i, multiplier: __m256i, round: __m256i, high_right: __m128i) -> __m256i {
    let even = _mm256_add_epi64(_mm256_mul_epi32(acc, multiplier), round);
    let odd = _mm256_add_epi64(
        _mm256_mul_epi32(_mm256_srli_epi64::<32>(acc), multiplier),
        round,
    );
    let high = _mm256_blend_epi32::<0b1010_1010>(_mm256_srli_epi64::<32>(even), odd);
    _mm256_sra_epi32(high, high_right)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::int8::ConvGeometry;
    use crate::strips::check;
    use kestrel_testing::Rng;

    /// The paths a layer can take: `vpmaddwd` alone, then each VNNI encoding this CPU has; one
    /// it lacks is named in the output, not passed over silently.
    fn paths() -> Vec<Option<Vnni>> {
        let mut paths = vec![None];
        for vnni in [Vnni::Avx, Vnni::Avx512] {
            if vnni.available() {
                paths.push(Some(vnni));
            } else {
                eprintln!("not tested here: this CPU has no {vnni:?} VNNI");
            }
        }
        paths
    }

    /// A property test over shapes: every random convolution gives the generic kernel's bytes,
    /// on every path (with VNNI, most layers take `vpdpbusd`).
    #[test]
    fn matches_the_generic_kernel_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        for vnni in paths() {
            let mut quads = 0;
            check::random_layers(0x5eed_0fa5_2026, &mut |conv, input, output| {
                let mut fast = Avx2::for_conv(conv, vnni)?;
                quads += usize::from(fast.layers[0].as_ref()?.quads.is_some());
                Some(fast.conv(0, conv, input, output))
            });
            if vnni.is_some() {
                assert!(quads > 250, "{vnni:?}: only {quads} layers took vpdpbusd");
            }
        }
    }

    /// On a VNNI CPU, the table's kernels take byte quads only for layers that sum enough
    /// products per output ([`QUADS_MIN_TERMS`]), and over Winograd for 3x3 layers of few
    /// channels ([`QUADS_OVER_WINOGRAD_MAX_CHANNELS`], on CPUs other than Intel's); the tests'
    /// constructor takes quads
    /// wherever they suit and Winograd wherever it does.
    #[test]
    fn quads_only_where_they_pay() {
        if !std::arch::is_x86_feature_detected!("avx2") || Vnni::detect().is_none() {
            eprintln!("not tested here: this CPU has no VNNI");
            return;
        }
        let layer = |channels, kernel: usize| {
            check::Dirty::of(ConvGeometry {
                input: [channels, 8, 8],
                output: [32, 8, 8],
                kernel: [kernel, kernel],
                stride: [1, 1],
                pad: [kernel / 2, kernel / 2],
                dilation: [1, 1],
                group: 1,
            })
        };
        let layers = [
            layer(QUADS_MIN_TERMS / 2, 1),
            layer(QUADS_MIN_TERMS, 1),
            layer(QUADS_OVER_WINOGRAD_MAX_CHANNELS, 3),
            layer(QUADS_OVER_WINOGRAD_MAX_CHANNELS + 1, 3),
        ];
        let convs: Vec<_> = layers.iter().map(|l| Some(l.conv())).collect();
        let paths = |avx2: Avx2| -> Vec<&str> {
            let path = |l: &Prepared| match (&l.quads, &l.winograd) {
                (Some(_), _) => "quads",
                (None, Some(_)) => "winograd",
                (None, None) => "strips",
            };
            avx2.layers
                .iter()
                .map(|l| l.as_ref().map_or("none", path))
                .collect()
        };
        let table = Avx2::new(&convs).expect("AVX2");
        let above = if quads_over_winograd_max_channels() > QUADS_OVER_WINOGRAD_MAX_CHANNELS {
            "quads"
        } else {
            "winograd"
        };
        assert_eq!(paths(table), ["strips", "quads", "quads", above]);
        let tests = Avx2::with_vnni(&convs, Vnni::detect()).expect("AVX2");
        assert_eq!(paths(tests), ["quads", "quads", "winograd", "winograd"]);
    }

    /// Depthwise layers take their own kernel: every random one gives the generic bytes.
    #[test]
    fn small_plane_depthwise_matches_the_generic_kernel_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let mut lanes = 0;
        check::random_small_depthwise(0x1a9e_2026_1202, &mut |conv, input, output| {
            let mut fast = Avx2::for_conv(conv, None)?;
            let prepared = fast.layers.first().and_then(Option::as_ref);
            lanes += usize::from(prepared.is_some_and(|p| p.lanes.is_some()));
            Some(fast.conv(0, conv, input, output))
        });
        assert!(
            lanes > 100,
            "only {lanes} layers took the channel-lanes kernel"
        );
    }

    #[test]
    fn few_pixel_layers_match_the_generic_kernel_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        for vnni in paths() {
            check::random_few_pixels(0xf3a_2026_1202, &mut |conv, input, output| {
                Avx2::for_conv(conv, vnni).map(|mut fast| fast.conv(0, conv, input, output))
            });
        }
    }

    /// Every layer of `layers` (a property test's generator, from `seed`) gives the generic
    /// bytes on every path, and on each VNNI path more than `min` of them took the row quads.
    fn row_quads_match_the_generic_kernel(
        layers: fn(u64, &mut check::Fast<'_>),
        seed: u64,
        min: usize,
    ) {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        for vnni in paths() {
            let mut row_quads = 0;
            layers(seed, &mut |conv, input, output| {
                let mut fast = Avx2::for_conv(conv, vnni)?;
                row_quads += usize::from(fast.layers[0].as_ref()?.row_quads.is_some());
                Some(fast.conv(0, conv, input, output))
            });
            if vnni.is_some() {
                assert!(
                    row_quads > min,
                    "{vnni:?}: only {row_quads} layers took row quads"
                );
            }
        }
    }

    #[test]
    fn depthwise_matches_the_generic_kernel_bit_for_bit() {
        row_quads_match_the_generic_kernel(check::random_depthwise, 0xdee9_2026_1201, 100);
    }

    /// Small-plane depthwise layers with compact scales (the channels-in-lanes path where the
    /// CPU has AVX-512): every one gives the generic bytes.
    #[test]
    fn lane_depthwise_matches_the_generic_kernel_bit_for_bit() {
        row_quads_match_the_generic_kernel(check::random_lane_depthwise, 0x1a7e_2026_1204, 60);
    }

    /// Stems (dense over up to 3 channels, to up to 64) take row quads on a VNNI CPU: every
    /// random one gives the generic bytes.
    #[test]
    fn stems_match_the_generic_kernel_bit_for_bit() {
        row_quads_match_the_generic_kernel(check::random_stems, 0x57e3_2026_1204, 40);
    }

    /// A depthwise layer's row quads are prepared weights: the scrub visits them, and fault
    /// injection reaches them (the layer's last block) and changes what the layer computes.
    #[test]
    fn row_quads_are_scrubbed_and_upset() {
        let Some(vnni) = Vnni::detect().filter(|_| std::arch::is_x86_feature_detected!("avx2"))
        else {
            eprintln!("not tested here: this CPU has no VNNI");
            return;
        };
        let layer = check::Dirty::of(ConvGeometry {
            input: [8, 20, 20],
            output: [8, 20, 20],
            kernel: [3, 3],
            stride: [1, 1],
            pad: [1, 1],
            dilation: [1, 1],
            group: 8,
        });
        let conv = layer.conv();
        let mut fast = Avx2::with_vnni(&[Some(conv)], Some(vnni)).expect("AVX2");
        let prepared = fast.layers[0].as_ref().expect("a prepared layer");
        let [words, biases] = prepared.row_quads.as_ref().expect("row quads").blocks();
        let (words, biases) = (words.to_vec(), biases.to_vec());
        let mut visited = Vec::new();
        fast.prepared_weights(&mut |block| visited.push(block.to_vec()));
        assert!(visited.contains(&words) && visited.contains(&biases));
        let bits: u64 = visited.iter().map(|b| 32 * b.len() as u64).sum();
        let input: Vec<i8> = (0..8 * 20 * 20)
            .map(|i| (i * 37 % 256) as u8 as i8)
            .collect();
        let mut expected = vec![0i8; 8 * 20 * 20];
        conv.run(&input, &mut expected).unwrap();
        let mut got = vec![0i8; expected.len()];
        fast.conv(0, &conv, &input, &mut got).unwrap();
        assert_eq!(got, expected);
        // The last bit: the sign of the last channel's corrected bias.
        assert!(fast.flip_prepared_bit(bits - 1));
        fast.conv(0, &conv, &input, &mut got).unwrap();
        assert_eq!(got[..7 * 400], expected[..7 * 400]);
        assert_ne!(got[7 * 400..], expected[7 * 400..], "the upset shows");
    }

    /// Depthwise layers pad each channel (or lay out each block of channels) into the same
    /// scratch and zero its border once per call: after a larger layer left nonzero values
    /// there, every random one still gives the generic bytes.
    #[test]
    fn depthwise_after_a_larger_layer_matches_the_generic_kernel() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        for (dirty, vnni) in [check::Dirty::new(), check::Dirty::depthwise()]
            .iter()
            .flat_map(|dirty| paths().into_iter().map(move |vnni| (dirty, vnni)))
        {
            let mut run = |conv: &Conv<'_>, input: &[i8], output: &mut [i8]| {
                let mut fast = Avx2::with_vnni(&[Some(dirty.conv()), Some(*conv)], vnni)?;
                dirty.run(&mut fast, 0);
                Some(fast.conv(1, conv, input, output))
            };
            check::random_depthwise(0xd127_2026_1202, &mut run);
            check::random_small_depthwise(0xd128_2026_1202, &mut run);
        }
    }

    /// The dense stride-1 3x3 layers take the Winograd path: random ones of every size that
    /// has a full strip of tiles, odd sizes and channel counts included.
    #[test]
    fn winograd_matches_the_generic_kernel_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let mut rng = Rng(0x3a3a_2026_f233);
        let mut winograd = 0;
        for case in 0..150 {
            let (c, oc) = (1 + rng.below(40), 1 + rng.below(20));
            let pad = [rng.below(2), rng.below(2)];
            let (h, w) = (5 + rng.below(30), 5 + rng.below(30));
            let (oh, ow) = (h + 2 * pad[0] - 2, w + 2 * pad[1] - 2);
            let input: Vec<i8> = (0..c * h * w).map(|_| rng.draw() as i8).collect();
            let weights: Vec<i8> = (0..oc * c * 9).map(|_| rng.draw() as i8).collect();
            let bias: Vec<i32> = (0..oc)
                .map(|_| (rng.draw() % 200_001) as i32 - 100_000)
                .collect();
            let requant: Vec<Requant> = (0..oc)
                .map(|_| {
                    Requant::from_real(2f64.powf(-(rng.below(1800) as f64) / 100.0 + 1.0)).unwrap()
                })
                .collect();
            let multiplier: Vec<i32> = requant.iter().map(|r| r.multiplier).collect();
            let shift: Vec<i8> = requant.iter().map(|r| r.shift).collect();
            let zero_point = rng.below(256) as i32 - 128;
            let conv = Conv {
                geometry: ConvGeometry {
                    input: [c, h, w],
                    output: [oc, oh, ow],
                    kernel: [3, 3],
                    stride: [1, 1],
                    pad,
                    dilation: [1, 1],
                    group: 1,
                },
                weights: &weights,
                channels: ChannelQuant {
                    bias: &bias,
                    multiplier: &multiplier,
                    shift: &shift,
                },
                input_zero_point: rng.below(256) as i32 - 128,
                output_quant: OutputQuant {
                    zero_point,
                    min: if case % 3 == 0 {
                        zero_point as i8
                    } else {
                        -128
                    },
                    max: 127,
                },
            };
            let mut expected = vec![0i8; oc * oh * ow];
            conv.run(&input, &mut expected).unwrap();
            let mut fast = Avx2::for_conv(&conv, Vnni::detect()).unwrap();
            winograd += usize::from(fast.layers[0].as_ref().unwrap().winograd.is_some());
            let mut got = vec![0i8; oc * oh * ow];
            fast.conv(0, &conv, &input, &mut got).unwrap();
            assert_eq!(got, expected, "case {case}: {:?}", conv.geometry);
        }
        assert!(
            winograd > 100,
            "only {winograd} layers took the Winograd path"
        );
    }

    #[test]
    fn add_matches_the_generic_kernel_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let mut rng = Rng(0xadd5_2026_1126);
        for case in 0..500 {
            let len = rng.below(100);
            let a: Vec<i8> = (0..len).map(|_| rng.draw() as i8).collect();
            let b: Vec<i8> = (0..len).map(|_| rng.draw() as i8).collect();
            let mut scale = || {
                let real = 2f64.powf(rng.below(1600) as f64 / 100.0 - 8.0);
                Requant::from_real(real).unwrap()
            };
            let requant = [scale(), scale()];
            let zero_point = rng.below(256) as i32 - 128;
            let add = Add {
                input_zero_points: [rng.below(256) as i32 - 128, rng.below(256) as i32 - 128],
                requant,
                output_quant: OutputQuant {
                    zero_point,
                    min: if case % 2 == 0 {
                        zero_point as i8
                    } else {
                        -128
                    },
                    max: 127,
                },
            };
            let mut expected = vec![0i8; len];
            add.run(&a, &b, &mut expected).unwrap();
            let mut got = vec![0i8; len];
            let conv_free = Avx2 {
                layers: Vec::new(),
                scratch: Scratch::for_needs([]),
                requants: Vec::new(),
                narrow: Vec::new(),
                vnni: None,
            };
            let mut kernels = conv_free;
            kernels.add(&add, &a, &b, &mut got).unwrap();
            assert_eq!(got, expected, "case {case}: {add:?}");
        }
    }

    #[test]
    fn rescale_matches_the_generic_kernel_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let mut rng = Rng(0x5ca1_2026_1201);
        let mut vector = 0;
        for case in 0..500 {
            // Now and then long enough for the table path.
            let len = if case % 7 == 3 {
                RESCALE_TABLE_FROM + rng.below(100)
            } else {
                rng.below(100)
            };
            let input: Vec<i8> = (0..len).map(|_| rng.draw() as i8).collect();
            // Scales from 2^-12 to 2^30 (the vector path to 2^23, the generic one above), and
            // exactly 1 (a Concat part on its output's grid) one case in five.
            let real = if case % 5 == 0 {
                1.0
            } else {
                2f64.powf(rng.below(4200) as f64 / 100.0 - 12.0)
            };
            let zero_point = rng.below(256) as i32 - 128;
            let rescale = Rescale {
                input_zero_point: rng.below(256) as i32 - 128,
                requant: Requant::from_real(real).unwrap(),
                output_quant: OutputQuant {
                    zero_point,
                    // Now and then an inverted range, as a corrupt plan might hold.
                    min: [-128, zero_point as i8, 100][case % 3],
                    max: [127, 127, 50][case % 3],
                },
            };
            vector += usize::from(rescale.requant.shift <= 23 && len >= 8);
            let mut expected = vec![0i8; len];
            rescale.run(&input, &mut expected).unwrap();
            let mut got = vec![0i8; len];
            self::rescale(&rescale, &input, &mut got).unwrap();
            assert_eq!(got, expected, "case {case}: {rescale:?}");
        }
        assert!(vector > 250, "only {vector} cases took the vector path");
    }

    #[test]
    fn mul_matches_the_generic_kernel_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let mut rng = Rng(0x0a11_2026_1201);
        let (mut vector, mut sixteen, mut thirty_two) = (0, 0, 0);
        for case in 0..600 {
            // Element-wise, one value per plane (squeeze-excite), one value for all.
            let channels = 1 + rng.below(6);
            let plane = [1, 1 + rng.below(80)][case % 2];
            let a_len = channels * plane;
            let b_len = [a_len, channels, 1][case % 3].min(a_len);
            let a: Vec<i8> = (0..a_len).map(|_| rng.draw() as i8).collect();
            let b: Vec<i8> = (0..b_len).map(|_| rng.draw() as i8).collect();
            // Scales from 2^-20 to 2^20: the vector path to 2^15, the generic one above.
            let real = 2f64.powf(rng.below(4000) as f64 / 100.0 - 20.0);
            let zero_point = rng.below(256) as i32 - 128;
            let mul = Mul {
                input_zero_points: [rng.below(256) as i32 - 128, rng.below(256) as i32 - 128],
                requant: Requant::from_real(real).unwrap(),
                output_quant: OutputQuant {
                    zero_point,
                    min: [-128, zero_point as i8, 100][case % 3],
                    max: [127, 127, 50][case % 3],
                },
            };
            vector += usize::from(mul.requant.shift <= 15 && a_len / b_len >= 8);
            let narrow = NarrowScale::new(0, mul.requant, mul.output_quant).is_some();
            sixteen += usize::from(narrow && a_len / b_len >= NR);
            thirty_two += usize::from(narrow && a_len / b_len >= 2 * NR && has_avx512bw());
            let mut expected = vec![0i8; a_len];
            mul.run(&a, &b, &mut expected).unwrap();
            let mut got = vec![0i8; a_len];
            self::mul(&mul, &a, &b, &mut got).unwrap();
            assert_eq!(got, expected, "case {case}: {mul:?} a {a_len} b {b_len}");
        }
        assert!(
            vector > 100 && sixteen > 30,
            "only {vector} cases took the per-plane vector path, {sixteen} its 16-bit form"
        );
        if has_avx512bw() {
            assert!(
                thirty_two > 20,
                "only {thirty_two} cases took the 512-bit form"
            );
        } else {
            eprintln!("the 512-bit form untested: this CPU has no AVX-512 BW");
        }
        // Wrong buffers are the generic kernel's errors.
        let mul = Mul {
            input_zero_points: [0, 0],
            requant: Requant::from_real(0.5).unwrap(),
            output_quant: OutputQuant {
                zero_point: 0,
                min: -128,
                max: 127,
            },
        };
        for (a, b, out) in [(6, 4, 6), (6, 0, 6), (6, 3, 5)] {
            assert_eq!(
                self::mul(&mul, &vec![0; a], &vec![0; b], &mut vec![0; out]),
                mul.run(&vec![0; a], &vec![0; b], &mut vec![0; out])
            );
        }
    }

    #[test]
    fn global_average_pool_matches_the_generic_kernel_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        // The generic kernel's and this one's codes for `input`, `channels` planes of it.
        let both = |channels, input_zero_point, real, zero_point, input: &[i8]| {
            let pool = GlobalAveragePool {
                channels,
                input_zero_point,
                requant: Requant::from_real(real).unwrap(),
                output_quant: OutputQuant {
                    zero_point,
                    min: -128,
                    max: 127,
                },
            };
            let (mut expected, mut got) = (vec![0i8; channels], vec![1i8; channels]);
            pool.run(input, &mut expected).unwrap();
            global_average_pool(&pool, input, &mut got).unwrap();
            (expected, got)
        };
        let mut rng = Rng(0x9a70_2026_1204);
        for case in 0..300 {
            // Planes from 1 to 700 codes (whole vectors and a tail), to 96 channels.
            let (channels, plane) = (1 + rng.below(96), 1 + rng.below(700));
            let input: Vec<i8> = (0..channels * plane).map(|_| rng.draw() as i8).collect();
            let zero_point = rng.below(256) as i32 - 128;
            let input_zero_point = rng.below(256) as i32 - 128;
            let real = 2f64.powf(-(rng.below(1500) as f64) / 100.0);
            let (expected, got) = both(channels, input_zero_point, real, zero_point, &input);
            assert_eq!(got, expected, "case {case}: {channels} planes of {plane}");
        }
        // Codes of one sign only: the unsigned sums and their correction at the extremes.
        for code in [i8::MIN, i8::MAX] {
            let (expected, got) = both(1, 0, 1.0 / 1000.0, 0, &[code; 1000]);
            assert_eq!(got, expected, "1000 codes of {code}");
        }
    }

    #[test]
    fn gemm_matches_the_generic_kernel_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        let mut rng = Rng(0x9e33_2026_1201);
        for case in 0..300 {
            // Inputs shorter and longer than a 16-lane block, with and without a tail.
            let (inputs, outputs) = (1 + rng.below(300), 1 + rng.below(20));
            let input: Vec<i8> = (0..inputs).map(|_| rng.draw() as i8).collect();
            let weights: Vec<i8> = (0..inputs * outputs).map(|_| rng.draw() as i8).collect();
            // Biases near the ends of i32 in some cases, so the sums wrap as the generic's do.
            let bias: Vec<i32> = (0..outputs)
                .map(|_| match case % 4 {
                    0 => i32::MAX - rng.below(1000) as i32,
                    _ => rng.below(1 << 20) as i32 - (1 << 19),
                })
                .collect();
            let requants: Vec<Requant> = (0..outputs)
                .map(|_| {
                    Requant::from_real(2f64.powf(rng.below(3000) as f64 / 100.0 - 40.0)).unwrap()
                })
                .collect();
            let multiplier: Vec<i32> = requants.iter().map(|r| r.multiplier).collect();
            let shift: Vec<i8> = requants.iter().map(|r| r.shift).collect();
            let zero_point = rng.below(256) as i32 - 128;
            let gemm = Gemm {
                weights: &weights,
                channels: ChannelQuant {
                    bias: &bias,
                    multiplier: &multiplier,
                    shift: &shift,
                },
                input_zero_point: [rng.below(256) as i32 - 128, 300][usize::from(case == 7)],
                output_quant: OutputQuant {
                    zero_point,
                    min: [-128, zero_point as i8][case % 2],
                    max: 127,
                },
            };
            let mut expected = vec![0i8; outputs];
            gemm.run(&input, &mut expected).unwrap();
            let mut got = vec![0i8; outputs];
            self::gemm(&gemm, &input, &mut got).unwrap();
            assert_eq!(
                got, expected,
                "case {case}: {inputs} inputs, {outputs} outputs"
            );
        }
        // Wrong buffers are the generic kernel's errors.
        let gemm = Gemm {
            weights: &[1; 6],
            channels: ChannelQuant {
                bias: &[0; 2],
                multiplier: &[1 << 30; 2],
                shift: &[31; 2],
            },
            input_zero_point: 0,
            output_quant: OutputQuant {
                zero_point: 0,
                min: -128,
                max: 127,
            },
        };
        for (inputs, outputs) in [(3, 2), (2, 2), (3, 3), (0, 2)] {
            assert_eq!(
                self::gemm(&gemm, &vec![1; inputs], &mut vec![0; outputs]),
                gemm.run(&vec![1; inputs], &mut vec![0; outputs])
            );
        }
    }

    #[test]
    fn lut_matches_the_generic_kernel_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        check_lut(lut_avx2);
        if has_vbmi() {
            check_lut(lut);
        } else {
            eprintln!("the AVX-512 VBMI table kernel is not tested here: this CPU has no VBMI");
        }
    }

    fn check_lut(fast: crate::table::LutKernel) {
        let mut rng = Rng(0x007a_b1e5_2026);
        for case in 0..200 {
            let table: Vec<i8> = (0..256).map(|_| rng.draw() as i8).collect();
            let len = [rng.below(300), 64 * rng.below(5)][case % 2];
            let mut input: Vec<i8> = (0..len).map(|_| rng.draw() as i8).collect();
            // Every code, so every entry is looked up.
            input.extend((0..=255u8).map(|b| b as i8));
            let lut = Lut { table: &table };
            let mut expected = vec![0i8; input.len()];
            lut.run(&input, &mut expected).unwrap();
            let mut got = vec![0i8; input.len()];
            fast(&lut, &input, &mut got).unwrap();
            assert_eq!(got, expected, "case {case}");
        }
        // Wrong buffers and tables are the generic kernel's errors.
        let table = [3i8; 256];
        for (table, inputs, outputs) in [(&table[..], 64, 63), (&table[..255], 64, 64)] {
            let lut = Lut { table };
            assert_eq!(
                fast(&lut, &vec![1; inputs], &mut vec![0; outputs]),
                lut.run(&vec![1; inputs], &mut vec![0; outputs])
            );
        }
    }

    #[test]
    fn max_pool_matches_the_generic_kernel_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("skipped: this CPU has no AVX2");
            return;
        }
        check::max_pools(max_pool);
    }

    /// Geometry no real layer has, with buffers that match it: the fast path either declines
    /// (and the generic kernel answers) or gives the generic bytes; it never panics.
    #[test]
    fn odd_geometry_never_panics() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        for vnni in paths() {
            check::odd_geometry(0x00ba_d6e0_2026, &mut |conv, input, output| {
                Avx2::for_conv(conv, vnni).map(|mut fast| fast.conv(0, conv, input, output))
            });
        }
    }

    #[test]
    fn bad_buffers_are_the_generic_kernels_errors() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let conv = Conv {
            geometry: ConvGeometry {
                input: [1, 3, 3],
                output: [1, 3, 3],
                kernel: [3, 3],
                stride: [1, 1],
                pad: [1, 1],
                dilation: [1, 1],
                group: 1,
            },
            weights: &[1; 9],
            channels: ChannelQuant {
                bias: &[0],
                multiplier: &[1 << 30],
                shift: &[0],
            },
            input_zero_point: 0,
            output_quant: OutputQuant {
                zero_point: 0,
                min: -128,
                max: 127,
            },
        };
        let mut fast = Avx2::for_conv(&conv, Vnni::detect()).unwrap();
        assert_eq!(
            fast.conv(0, &conv, &[0; 8], &mut [0; 9]),
            Err(ShapeError { buffer: "input" })
        );
        assert_eq!(
            fast.conv(0, &conv, &[0; 9], &mut [0; 10]),
            Err(ShapeError { buffer: "output" })
        );
    }
}
