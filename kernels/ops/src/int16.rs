//! Layers on 16-bit activations: where int8 activations lose too much through a whole network
//! (EfficientNet's squeeze-excite blocks and SiLU), the compiler keeps its activations as `i16`
//! codes with zero point 0, weights still int8. A 16-bit tensor is stored as little-endian
//! `i16` pairs in the same byte arena as int8 ones, so these kernels take byte slices and read
//! each tensor at its [`Width`].
//!
//! Every accumulator is summed in `i64` (exact in any order) and saturated to `i32` before the
//! usual requantisation; the compiler bounds each 16-bit tensor's codes so that no real sum
//! saturates (see `models::quantize`). These are the generic kernels (the oracle);
//! [`Conv16::run_rows`] is the host kernel table's faster convolution.

use serde::{Deserialize, Serialize};

use crate::int8::{check, ChannelQuant, Conv, ConvGeometry, OutputQuant, ShapeError};
use crate::quant::Requant;

/// The element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Width {
    /// `i8` codes.
    I8,
    /// Little-endian `i16` codes.
    I16,
}

impl Width {
    /// Bytes per value.
    pub fn bytes(self) -> usize {
        match self {
            Self::I8 => 1,
            Self::I16 => 2,
        }
    }

    /// The code of value `i` in `bytes` (0 past the end: callers check lengths first).
    #[inline]
    pub fn load(self, bytes: &[i8], i: usize) -> i32 {
        match self {
            Self::I8 => bytes.get(i).map_or(0, |&b| i32::from(b)),
            Self::I16 => match (bytes.get(2 * i), bytes.get(2 * i + 1)) {
                (Some(&lo), Some(&hi)) => i32::from(i16::from_le_bytes([lo as u8, hi as u8])),
                _ => 0,
            },
        }
    }

    /// Store `code` (already clamped to the width's range by the caller) as value `i`.
    #[inline]
    pub(crate) fn store(self, bytes: &mut [i8], i: usize, code: i32) {
        match self {
            Self::I8 => {
                if let Some(b) = bytes.get_mut(i) {
                    *b = code as i8;
                }
            }
            Self::I16 => {
                let [lo, hi] = (code as i16).to_le_bytes();
                if let Some(pair) = bytes.get_mut(2 * i..2 * i + 2) {
                    pair.copy_from_slice(&[lo as i8, hi as i8]);
                }
            }
        }
    }

    /// The widest clamp range of the width.
    pub fn range(self) -> (i32, i32) {
        match self {
            Self::I8 => (i32::from(i8::MIN), i32::from(i8::MAX)),
            Self::I16 => (-i32::from(i16::MAX), i32::from(i16::MAX)),
        }
    }
}

/// The values of a 16-bit tensor's bytes, in order.
#[inline(always)]
fn codes16(bytes: &[i8]) -> impl Iterator<Item = i32> + '_ {
    bytes.chunks_exact(2).map(|pair| match *pair {
        [lo, hi] => i32::from(i16::from_le_bytes([lo as u8, hi as u8])),
        _ => 0,
    })
}

/// Where a layer's output goes: its width, zero point and clamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct WideOutput {
    /// Element type written.
    pub width: Width,
    /// Zero point (0 for 16-bit tensors).
    pub zero_point: i32,
    /// Smallest code written.
    pub min: i32,
    /// Largest code written.
    pub max: i32,
}

impl WideOutput {
    /// `acc` requantised, offset and clamped to this output, stored as value `i`.
    #[inline]
    pub(crate) fn write(&self, output: &mut [i8], i: usize, acc: i64, requant: Requant) {
        let acc = acc.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32;
        self.store(output, i, requant.apply(acc));
    }

    /// `steps` (in output steps, before the zero point) offset, clamped and stored as value `i`.
    #[inline]
    fn store(&self, output: &mut [i8], i: usize, steps: i32) {
        self.width.store(output, i, self.code(steps));
    }

    /// Each of `steps` (in output steps, before the zero point) offset, clamped and stored in
    /// turn from value 0 of `output`.
    #[inline(always)]
    fn store_all(&self, output: &mut [i8], steps: impl Iterator<Item = i32>) {
        match self.width {
            Width::I8 => {
                for (out, steps) in output.iter_mut().zip(steps) {
                    *out = self.code(steps) as i8;
                }
            }
            Width::I16 => {
                for (pair, steps) in output.chunks_exact_mut(2).zip(steps) {
                    let [lo, hi] = (self.code(steps) as i16).to_le_bytes();
                    pair.copy_from_slice(&[lo as i8, hi as i8]);
                }
            }
        }
    }

    /// The code of `steps`: offset by the zero point, clamped.
    #[inline(always)]
    pub(crate) fn code(&self, steps: i32) -> i32 {
        // `max` then `min`, as `requantize_i8`: an inverted range gives `max`, no panic; the
        // width's own range bounds what a corrupt plan could ask for.
        let (lo, hi) = self.width.range();
        steps
            .saturating_add(self.zero_point)
            .max(self.min)
            .min(self.max)
            .clamp(lo, hi)
    }

    /// [`WideOutput::write`] of each of `sums` in turn into `output` (a row of their values).
    #[cfg(feature = "std")]
    #[inline(always)]
    fn store_row(&self, output: &mut [i8], sums: &[i32], requant: Requant) {
        self.store_all(output, sums.iter().map(|&sum| requant.apply(sum)));
    }

    fn bytes(&self, values: usize) -> Option<usize> {
        values.checked_mul(self.width.bytes())
    }
}

/// A convolution (or, with a 1x1 geometry over one pixel, a fully connected layer) whose input
/// or output or both are 16-bit. Weights int8 `[out, in / group, kh, kw]`.
#[derive(Clone, Copy, Debug)]
pub struct Conv16<'a> {
    /// Shapes and window.
    pub geometry: ConvGeometry,
    /// `[out, in / group, kh, kw]`.
    pub weights: &'a [i8],
    /// Bias and requantisation per output channel.
    pub channels: ChannelQuant<'a>,
    /// Element type of the input.
    pub input_width: Width,
    /// Zero point of the input.
    pub input_zero_point: i32,
    /// The output.
    pub output: WideOutput,
}

impl Conv16<'_> {
    /// Check the geometry and buffer sizes (bytes): [`Conv::check`] on the values.
    pub fn check(&self, input_len: usize, output_len: usize) -> Result<(), ShapeError> {
        let (input_bytes, output_bytes) = (self.input_width.bytes(), self.output.width.bytes());
        check(input_len.is_multiple_of(input_bytes), "input")?;
        check(output_len.is_multiple_of(output_bytes), "output")?;
        let values = Conv {
            geometry: self.geometry,
            weights: self.weights,
            channels: self.channels,
            input_zero_point: self.input_zero_point,
            output_quant: OutputQuant {
                zero_point: 0,
                min: i8::MIN,
                max: i8::MAX,
            },
        };
        values.check(input_len / input_bytes, output_len / output_bytes)
    }

    /// Run the layer on `input` into `output` (bytes of their widths).
    pub fn run(&self, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        self.check(input.len(), output.len())?;
        let g = self.geometry;
        let [c, h, w] = g.input;
        let [oc_total, oh, ow] = g.output;
        let [kh, kw] = g.kernel;
        let group = g.group.max(1);
        let (icg, ocg) = (c / group, oc_total / group);
        let filter_len = icg * kh * kw;
        for oc in 0..oc_total {
            let (bias, requant) = self.channels.get(oc);
            let first_channel = (oc / ocg) * icg;
            let filter = self
                .weights
                .get(oc * filter_len..(oc + 1) * filter_len)
                .ok_or(ShapeError { buffer: "weights" })?;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = i64::from(bias);
                    for (tap, &weight) in filter.iter().enumerate() {
                        let (ic, ky, kx) = (tap / (kh * kw), tap / kw % kh, tap % kw);
                        let iy = (oy * g.stride[0] + ky * g.dilation[0]).checked_sub(g.pad[0]);
                        let ix = (ox * g.stride[1] + kx * g.dilation[1]).checked_sub(g.pad[1]);
                        let (Some(iy), Some(ix)) = (iy, ix) else {
                            continue;
                        };
                        if iy >= h || ix >= w {
                            continue;
                        }
                        let at = ((first_channel + ic) * h + iy) * w + ix;
                        let x = self.input_width.load(input, at) - self.input_zero_point;
                        acc += i64::from(x) * i64::from(weight);
                    }
                    self.output
                        .write(output, (oc * oh + oy) * ow + ox, acc, requant);
                }
            }
        }
        Ok(())
    }
}

/// Whether every partial sum of an output channel with `bias` and weights of absolute sum
/// `weights` stays inside `i32` for inputs up to `largest` in size: `|bias| + weights * largest`
/// under `2^31`. Where it does, the fast kernels' `i32` sums are the generic kernel's.
#[cfg(feature = "std")]
pub(crate) fn sums_fit(weights: u64, bias: i32, largest: u16) -> bool {
    weights
        .checked_mul(u64::from(largest))
        .and_then(|s| s.checked_add(u64::from(bias.unsigned_abs())))
        .is_some_and(|bound| bound < 1 << 31)
}

/// What [`Conv16::run_rows`] needs from a layer's weights besides the weights: each output
/// channel's sum of weight magnitudes (for the `i32` bound, [`sums_fit`]) and the weights in the
/// order its vector kernel reads them (a depthwise layer's tap pairs, a pointwise layer's
/// input-channel pairs, two `i16` to a word). Made once where the kernel table is made for a
/// program ([`crate::table::KernelTable::for_this_cpu`]), its words then under the scrub's
/// checksum of prepared weights; else per call.
#[cfg(feature = "std")]
#[derive(Clone, Debug, Default)]
pub struct Conv16Prepared {
    /// Per output channel, the sum of its weights' magnitudes (saturated).
    magnitudes: std::vec::Vec<i32>,
    /// The weights as the layer's vector kernel reads them (none for other layers).
    words: std::vec::Vec<i32>,
}

/// The lane order `vpunpcklwd` / `vpunpckhwd` leave 16 channels in, in their 32-bit lanes: the
/// low vector holds channels 0-3 and 8-11, the high one 4-7 and 12-15 (its own inverse).
#[cfg(feature = "std")]
pub(crate) const UNPACK_ORDER: [usize; 16] = [0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15];

/// Two weights as one word for `vpmaddwd`, the first in the low half (a missing one is 0).
#[cfg(feature = "std")]
pub(crate) fn pair_word(first: Option<&i8>, second: Option<&i8>) -> i32 {
    let half = |w: Option<&i8>| i32::from(w.map_or(0, |&w| i16::from(w)) as u16);
    half(first) | half(second) << 16
}

#[cfg(feature = "std")]
impl Conv16Prepared {
    /// The words, for the scrub's checksum (the magnitudes only choose a path: a flipped one
    /// is caught by the same checksum).
    pub fn blocks(&self) -> [&[i32]; 2] {
        [&self.magnitudes, &self.words]
    }

    /// The same, to flip a bit of (fault injection).
    pub fn blocks_mut(&mut self) -> [&mut [i32]; 2] {
        [&mut self.magnitudes, &mut self.words]
    }

    /// Whether this was prepared from a layer of `conv`'s shape.
    fn suits(&self, conv: &Conv16<'_>) -> bool {
        self.magnitudes.len() == conv.geometry.output[0] && self.words.len() == conv.words_len()
    }
}

#[cfg(feature = "std")]
impl Conv16<'_> {
    /// A depthwise layer (one input and one output channel per group).
    fn is_depthwise(&self) -> bool {
        let g = &self.geometry;
        let group = g.group.max(1);
        g.input[0] == group && g.output[0] == group
    }

    /// Whether each output is summed as one dot product of its inputs, gathered per pixel:
    /// long enough to vectorise, the gather shared by enough channels, and for a pointwise
    /// layer, a small plane.
    fn takes_dot_products(&self) -> bool {
        let g = &self.geometry;
        let group = g.group.max(1);
        let terms = g.input[0] / group * g.kernel[0] * g.kernel[1];
        terms >= DOT_MIN_TERMS
            && g.output[0] / group >= DOT_MIN_CHANNELS
            && !(g.is_pointwise() && g.output[1] * g.output[2] > DOT_MAX_PLANE)
    }

    /// A pointwise layer [`Conv16::pointwise_blocks`] takes: a whole block of pixels and of
    /// output channels per group, and no dot products.
    fn has_pointwise_blocks(&self) -> bool {
        let g = &self.geometry;
        g.is_pointwise()
            && !self.takes_dot_products()
            && g.output[1] * g.output[2] >= BLOCK_PIXELS
            && g.output[0] / g.group.max(1) >= BLOCK_CHANNELS
    }

    /// A pointwise layer of one group on a plane of 4, 8, 12 or 16 pixels that takes dot
    /// products, on a CPU with AVX-512 VNNI: its output channels in the lanes instead
    /// ([`crate::avx2::wide::pointwise_lanes`]; other CPUs keep no weights for it).
    fn has_pointwise_lanes(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        let cpu = crate::avx2::Vnni::Avx512.available();
        #[cfg(not(target_arch = "x86_64"))]
        let cpu = false;
        let g = &self.geometry;
        cpu && g.is_pointwise()
            && g.group.max(1) == 1
            && self.takes_dot_products()
            && matches!(g.output[1] * g.output[2], 4 | 8 | 12 | 16)
    }

    /// How many words [`Conv16Prepared`] holds for this layer.
    fn words_len(&self) -> usize {
        let g = &self.geometry;
        let icg = g.input[0] / g.group.max(1);
        let taps = g.kernel[0] * g.kernel[1];
        if self.is_depthwise() {
            g.input[0].div_ceil(16) * taps.div_ceil(2) * 16
        } else if self.has_pointwise_lanes() {
            // Two bytes per pair of input channels and output channel, four to a word.
            icg.div_ceil(2) * g.output[0].div_ceil(16) * 8
        } else if self.has_pointwise_blocks() {
            g.output[0] * icg.div_ceil(2)
        } else {
            0
        }
    }

    /// Prepare what [`Conv16::run_rows`] needs from the weights ([`Conv16Prepared`]).
    pub fn prepare(&self) -> Conv16Prepared {
        let oc = self.geometry.output[0];
        let terms = self.weights.len() / oc.max(1);
        let magnitudes = self
            .weights
            .chunks_exact(terms.max(1))
            .take(oc)
            .map(|filter| {
                filter.iter().fold(0i32, |sum, &w| {
                    sum.saturating_add(i32::from(w.unsigned_abs()))
                })
            })
            .collect();
        let mut words = std::vec![0i32; self.words_len()];
        let g = &self.geometry;
        let taps = g.kernel[0] * g.kernel[1];
        if self.is_depthwise() && taps > 0 {
            // Per block of 16 channels, per pair of taps, the channels' words in unpack order.
            let pairs = taps.div_ceil(2);
            let lanes = UNPACK_ORDER.iter().cycle();
            for ((ch, filter), &lane) in self.weights.chunks_exact(taps).enumerate().zip(lanes) {
                let block = ch / 16;
                for (pair, two) in filter.chunks(2).enumerate() {
                    if let Some(word) = words.get_mut((block * pairs + pair) * 16 + lane) {
                        *word = pair_word(two.first(), two.get(1));
                    }
                }
            }
        } else if self.has_pointwise_lanes() {
            // Per vector of 16 output channels (the last padded with zeros), per pair of input
            // channels, each channel's two weights as two bytes (a missing one 0): each
            // vector's weights one stream. Four bytes to a word, the first in the low byte.
            let (icg, oc) = (g.input[0], g.output[0]);
            let pairs = icg.div_ceil(2);
            let mut bytes = std::vec![0u8; words.len() * 4];
            for (o, filter) in self.weights.chunks_exact(icg.max(1)).enumerate().take(oc) {
                for (pair, two) in filter.chunks(2).enumerate() {
                    for (k, &weight) in two.iter().enumerate() {
                        let at = ((o / 16 * pairs + pair) * 16 + o % 16) * 2 + k;
                        if let Some(byte) = bytes.get_mut(at) {
                            *byte = weight as u8;
                        }
                    }
                }
            }
            for (word, four) in words.iter_mut().zip(bytes.chunks_exact(4)) {
                if let Ok(four) = four.try_into() {
                    *word = i32::from_le_bytes(four);
                }
            }
        } else if self.has_pointwise_blocks() {
            // Per output channel, its input channels' weights two to a word.
            let icg = g.input[0] / g.group.max(1);
            let per_channel = icg.div_ceil(2);
            for (filter, out) in self
                .weights
                .chunks_exact(icg.max(1))
                .zip(words.chunks_exact_mut(per_channel.max(1)))
            {
                for (word, two) in out.iter_mut().zip(filter.chunks(2)) {
                    *word = pair_word(two.first(), two.get(1));
                }
            }
        }
        Conv16Prepared { magnitudes, words }
    }
}

/// The multiply-add encoding of the x86-64 16-bit kernels (`None`: `vpmaddwd`); nothing on
/// other CPUs.
#[cfg(all(feature = "std", target_arch = "x86_64"))]
type Encoding = Option<crate::avx2::Vnni>;
#[cfg(all(feature = "std", not(target_arch = "x86_64")))]
type Encoding = NoEncoding;

/// Other CPUs' encoding: the one their portable loops have.
#[cfg(all(feature = "std", not(target_arch = "x86_64")))]
#[derive(Clone, Copy, Debug, Default)]
pub struct NoEncoding;

/// Buffers [`Conv16::run_rows`] reuses from call to call, and the multiply-add encoding its
/// x86-64 dot products use.
#[cfg(feature = "std")]
#[derive(Clone, Debug)]
pub struct Conv16Scratch {
    /// The multiply-adds' encoding: `vpdpwssd` (VNNI) where the CPU has it, found once.
    vnni: Encoding,
    /// The input's values minus its zero point (16-bit: the multiply-adds SSE2 has).
    input: std::vec::Vec<i16>,
    /// Every output's sum, channel by channel.
    sums: std::vec::Vec<i32>,
    /// A depthwise layer's weights, widened, channels last.
    filter: std::vec::Vec<i16>,
    /// A block of output pixels' inputs, a row per pixel of a group's channels by taps (0
    /// where a tap is padding), or a depthwise layer's input channels last.
    column: std::vec::Vec<i16>,
    /// A depthwise layer's sums at one pixel, channels in a row.
    pixel: std::vec::Vec<i32>,
    /// A small-plane pointwise layer's input, two channels' values to a word.
    pairs: std::vec::Vec<i32>,
    /// The last rows of a dot-product layer's weights, padded to whole vectors.
    tail: std::vec::Vec<i8>,
    /// A group's input inside a border of zeros.
    padded: std::vec::Vec<i16>,
    /// Each of a window's terms' offset in `padded` from the window's first.
    term_offsets: std::vec::Vec<usize>,
}

#[cfg(feature = "std")]
// Derivable only where there is no encoding to detect (not x86-64).
#[allow(clippy::derivable_impls)]
impl Default for Conv16Scratch {
    fn default() -> Self {
        Self {
            #[cfg(target_arch = "x86_64")]
            vnni: crate::avx2::Vnni::detect(),
            #[cfg(not(target_arch = "x86_64"))]
            vnni: NoEncoding,
            input: std::vec::Vec::new(),
            sums: std::vec::Vec::new(),
            filter: std::vec::Vec::new(),
            column: std::vec::Vec::new(),
            pixel: std::vec::Vec::new(),
            pairs: std::vec::Vec::new(),
            tail: std::vec::Vec::new(),
            padded: std::vec::Vec::new(),
            term_offsets: std::vec::Vec::new(),
        }
    }
}

#[cfg(feature = "std")]
impl Conv16Scratch {
    /// The name of the convolution kernels [`Conv16::run_rows`] runs with this scratch: the
    /// multiply-add encoding on an x86-64 CPU with AVX2 (`avx2`, `avx-vnni`, `avx512-vnni`),
    /// else `rows` (portable loops).
    pub fn kernel_name(&self) -> &'static str {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            use crate::avx2::Vnni;
            return match self.vnni {
                None => "avx2",
                Some(Vnni::Avx) => "avx-vnni",
                Some(Vnni::Avx512) => "avx512-vnni",
            };
        }
        "rows"
    }
}

#[cfg(all(feature = "std", target_arch = "x86_64"))]
impl Conv16Scratch {
    /// Scratch whose dot products use `vnni`'s encoding (`None`: `vpmaddwd`), for tests of
    /// each; one this CPU lacks is not used.
    pub fn with_vnni(vnni: Option<crate::avx2::Vnni>) -> Self {
        Self {
            vnni: vnni.filter(|v| v.available()),
            ..Self::default()
        }
    }
}

/// Products per output value from which [`Conv16::run_rows`] sums each output as one dot
/// product of its inputs (gathered per pixel) rather than a tap at a time over rows: the dot
/// product's loop is long enough to vectorise, and the gather is shared by a group's channels.
#[cfg(feature = "std")]
const DOT_MIN_TERMS: usize = 16;
/// Output rows from which a stride-1 depthwise layer runs a tap at a time over whole rows
/// (which vectorise) rather than with the channels in the lanes.
#[cfg(feature = "std")]
const LANES_MAX_WIDTH: usize = 16;
/// Output channels per group from which the gather pays (not depthwise layers).
#[cfg(feature = "std")]
const DOT_MIN_CHANNELS: usize = 4;
/// Output pixels up to which a pointwise layer sums dot products; on larger planes, blocks of
/// pixels for blocks of output channels ([`Conv16::pointwise_blocks`]). With AVX2 on an Intel
/// Xeon (AVX-512 VNNI), EfficientNet-B0-64's 4x4 layers took 0.69 of the blocks' time as dot products,
/// its 8x8 layers 1.7 times as long (`layer_speed --steps`, 2026-12-04).
#[cfg(feature = "std")]
const DOT_MAX_PLANE: usize = 16;

#[cfg(feature = "std")]
impl Conv16<'_> {
    /// [`Conv16::run`] with `i32` sums: on x86-64 with AVX2 the kernels of
    /// `crate::avx2::wide` (depthwise layers 16 channels to a vector, dot products of gathered
    /// inputs for small pointwise planes and dense windows, blocks for larger pointwise planes),
    /// elsewhere a tap at a time over whole output rows in loops a compiler vectorises. The same
    /// bytes, since every partial sum of a channel is bounded by `|bias| + sum |w| * largest
    /// |x - zero point|`, checked below to stay under `2^31` (the compiler bounds its 16-bit
    /// codes so that it does). A layer where it would not runs [`Conv16::run`]. `prepared`:
    /// what [`Conv16::prepare`] made for this layer at load (else it is made per call).
    // Every index is into a buffer sized above from the geometry `check` proved, within the
    // output range computed per tap; the property test against `run` covers odd geometries.
    pub fn run_rows(
        &self,
        input: &[i8],
        output: &mut [i8],
        scratch: &mut Conv16Scratch,
        prepared: Option<&Conv16Prepared>,
    ) -> Result<(), ShapeError> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: this CPU has AVX2, the only feature the function is compiled for.
            return unsafe { self.run_rows_avx2(input, output, scratch, prepared) };
        }
        self.rows::<false>(input, output, scratch, prepared)
    }

    /// [`Conv16::rows`] compiled for AVX2: the same loops on 256-bit vectors.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn run_rows_avx2(
        &self,
        input: &[i8],
        output: &mut [i8],
        scratch: &mut Conv16Scratch,
        prepared: Option<&Conv16Prepared>,
    ) -> Result<(), ShapeError> {
        self.rows::<true>(input, output, scratch, prepared)
    }

    /// The body of [`Conv16::run_rows`]; `AVX2`: the caller is compiled for AVX2 and the CPU
    /// has it.
    #[allow(clippy::indexing_slicing)]
    // The x86-64 kernels' arguments and scratch are unused elsewhere.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    #[inline(always)]
    fn rows<const AVX2: bool>(
        &self,
        input: &[i8],
        output: &mut [i8],
        scratch: &mut Conv16Scratch,
        prepared: Option<&Conv16Prepared>,
    ) -> Result<(), ShapeError> {
        self.check(input.len(), output.len())?;
        let g = self.geometry;
        let [c, h, w] = g.input;
        let [oc_total, oh, ow] = g.output;
        let [kh, kw] = g.kernel;
        let group = g.group.max(1);
        let (icg, ocg) = (c / group, oc_total / group);
        let (plane, out_plane, terms) = (h * w, oh * ow, icg * kh * kw);
        let Conv16Scratch {
            vnni,
            input: values,
            sums,
            filter,
            column,
            pixel,
            pairs,
            tail,
            padded,
            term_offsets,
        } = scratch;
        // The input less its zero point, as 16-bit values: every one fits for an int8 input
        // (whose zero point is an int8 code) and a 16-bit one with zero point 0, as the
        // compiler makes them. Another runs the generic kernel.
        let zero_point = self.input_zero_point;
        values.clear();
        values.resize(c * h * w, 0);
        match self.input_width {
            Width::I8 if i8::try_from(zero_point).is_ok() => {
                for (value, &code) in values.iter_mut().zip(input) {
                    *value = i16::from(code) - zero_point as i16;
                }
            }
            Width::I16 if zero_point == 0 => {
                for (value, pair) in values.iter_mut().zip(input.chunks_exact(2)) {
                    if let [lo, hi] = *pair {
                        *value = i16::from_le_bytes([lo as u8, hi as u8]);
                    }
                }
            }
            _ => return self.run(input, output),
        }
        let largest = values.iter().fold(0u16, |m, v| m.max(v.unsigned_abs()));
        let (pointwise, dot) = (g.is_pointwise(), self.takes_dot_products());
        let built;
        let prepared = match prepared.filter(|p| p.suits(self)) {
            Some(prepared) => prepared,
            None => {
                built = self.prepare();
                &built
            }
        };
        let fits = (prepared.magnitudes.iter().enumerate())
            .all(|(oc, &m)| sums_fit(m.unsigned_abs().into(), self.channels.get(oc).0, largest));
        if !fits {
            return self.run(input, output);
        }
        // A pointwise layer on rows: its whole blocks of output channels and pixels first, sums
        // in registers, requantised straight into the output where that is exact, else
        // written to `sums` with their bias; and whether they were stored already.
        sums.resize(oc_total * out_plane, 0);
        let (mut blocked, mut stored) = (0, false);
        if pointwise && !dot && !(icg == 1 && ocg == 1) {
            let words = &prepared.words;
            let blocks = self.pointwise_blocks::<AVX2>(*vnni, values, sums, words, output);
            (blocked, stored) = (blocks.pixels, blocks.stored);
        }
        // The pixels of channel `oc` the blocks covered (from 0); no division per channel
        // where there were none.
        let covered =
            |oc: usize| match blocked > 0 && oc % ocg < ocg / BLOCK_CHANNELS * BLOCK_CHANNELS {
                true => blocked,
                false => 0,
            };
        // Every other output's sum, channel by channel, the bias first.
        for (oc, channel) in sums.chunks_exact_mut(out_plane.max(1)).enumerate() {
            channel[covered(oc)..].fill(self.channels.get(oc).0);
        }
        // The input value under tap (ky, kx) of output (oy, ox), if not padding.
        let at = |oy: usize, ox: usize, ky: usize, kx: usize| {
            let iy = (oy * g.stride[0] + ky * g.dilation[0]).checked_sub(g.pad[0])?;
            let ix = (ox * g.stride[1] + kx * g.dilation[1]).checked_sub(g.pad[1])?;
            (iy < h && ix < w).then_some(iy * w + ix)
        };
        // A small-plane pointwise layer with its output channels in 512-bit lanes.
        #[cfg(target_arch = "x86_64")]
        let lanes = AVX2 && *vnni == Some(crate::avx2::Vnni::Avx512) && self.has_pointwise_lanes();
        #[cfg(not(target_arch = "x86_64"))]
        let lanes = false;
        if icg == 1 && ocg == 1 && AVX2 && cfg!(target_arch = "x86_64") {
            #[cfg(target_arch = "x86_64")]
            {
                let layer = crate::avx2::wide::Depthwise {
                    geometry: &g,
                    values,
                    weights: self.weights,
                    vnni: *vnni,
                };
                // SAFETY: AVX2 is true only where the CPU has AVX2; the scratch's encoding is
                // one it has (`Conv16Scratch::with_vnni`).
                if !unsafe { layer.add_to(&prepared.words, column, pixel, sums) } {
                    return self.run(input, output);
                }
            }
        } else if icg == 1 && ocg == 1 && (g.stride[1] > 1 || ow < LANES_MAX_WIDTH) {
            // Depthwise: channels in the vectors' lanes (planes are often a few pixels wide),
            // the input and the filter laid out channels last.
            let taps = kh * kw;
            column.resize(plane * c, 0);
            filter.resize(taps * c, 0);
            for ch in 0..c {
                for (p, &x) in values[ch * plane..][..plane].iter().enumerate() {
                    column[p * c + ch] = x;
                }
                for (t, &weight) in self.weights[ch * taps..][..taps].iter().enumerate() {
                    filter[t * c + ch] = i16::from(weight);
                }
            }
            for oy in 0..oh {
                for ox in 0..ow {
                    pixel.clear();
                    pixel.resize(c, 0);
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let Some(i) = at(oy, ox, ky, kx) else {
                                continue;
                            };
                            let inputs = &column[i * c..][..c];
                            let weights = &filter[(ky * kw + kx) * c..][..c];
                            for ((sum, &x), &weight) in pixel.iter_mut().zip(inputs).zip(weights) {
                                *sum += i32::from(weight) * i32::from(x);
                            }
                        }
                    }
                    for (ch, &sum) in pixel.iter().enumerate() {
                        sums[ch * out_plane + oy * ow + ox] += sum;
                    }
                }
            }
        } else if dot && lanes {
            #[cfg(target_arch = "x86_64")]
            {
                // SAFETY: the scratch's encoding is one the CPU has (`with_vnni`): AVX-512 VNNI
                // and BW.
                if !unsafe {
                    crate::avx2::wide::pointwise_lanes(&g, values, &prepared.words, pairs, sums)
                } {
                    return self.run(input, output);
                }
            }
        } else if dot {
            // Each output a dot product of its filter and its inputs, gathered a block of
            // pixels at a time, each pixel's as a row (the input channels last).
            let stride = terms.next_multiple_of(DOT_LANES);
            for group in 0..group {
                // A window's group input padded with zeros on every side it reaches, and each
                // term's offset in it from the window's first: then gathering needs no bounds
                // logic. (Planes larger than the input and its padding, odd geometries only,
                // gather tap by tap instead.)
                let inputs = &values[group * icg * plane..][..icg * plane];
                let padded_width = match pointwise {
                    true => None,
                    false => self.pad_group(inputs, padded, term_offsets),
                };
                let weights = &self.weights[group * ocg * terms..][..ocg * terms];
                let group_sums = &mut sums[group * ocg * out_plane..][..ocg * out_plane];
                for first in (0..out_plane).step_by(DOT_BLOCK) {
                    let valid = DOT_BLOCK.min(out_plane - first);
                    column.clear();
                    column.resize(valid.next_multiple_of(DOT_PIXELS) * stride, 0);
                    match padded_width {
                        // The block's pixels of each input channel, transposed.
                        _ if pointwise => {
                            for (ic, channel) in inputs.chunks_exact(plane.max(1)).enumerate() {
                                let pixels = &channel[first..first + valid];
                                for (row, &x) in column.chunks_exact_mut(stride).zip(pixels) {
                                    row[ic] = x;
                                }
                            }
                        }
                        // Each pixel's taps from the padded input: one index each.
                        Some(wp) => {
                            let (mut oy, mut ox) = (first / ow, first % ow);
                            for row in column.chunks_exact_mut(stride).take(valid) {
                                let origin = oy * g.stride[0] * wp + ox * g.stride[1];
                                ox += 1;
                                if ox == ow {
                                    (oy, ox) = (oy + 1, 0);
                                }
                                for (slot, &offset) in row.iter_mut().zip(term_offsets.iter()) {
                                    *slot = padded[origin + offset];
                                }
                            }
                        }
                        // Tap by tap, padding as 0.
                        None => {
                            let rows = column.chunks_exact_mut(stride).take(valid);
                            for (q, row) in rows.enumerate() {
                                let (oy, ox) = ((first + q) / ow, (first + q) % ow);
                                let mut slots = row.iter_mut();
                                for channel in inputs.chunks_exact(plane.max(1)) {
                                    for ky in 0..kh {
                                        for kx in 0..kw {
                                            if let Some(slot) = slots.next() {
                                                *slot =
                                                    at(oy, ox, ky, kx).map_or(0, |i| channel[i]);
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    #[cfg(target_arch = "x86_64")]
                    if AVX2 {
                        // SAFETY: AVX2 is true only where the CPU has AVX2.
                        let block = crate::avx2::wide::DotProducts {
                            columns: column,
                            stride,
                            weights,
                            terms,
                            out_plane,
                            first_pixel: first,
                            valid,
                        };
                        // SAFETY: AVX2 is true only where the CPU has AVX2; the scratch's
                        // encoding is one it has (`Conv16Scratch::with_vnni`).
                        if !unsafe { block.add_to(*vnni, tail, group_sums) } {
                            return self.run(input, output);
                        }
                        continue;
                    }
                    for (filter, channel_sums) in weights
                        .chunks_exact(terms)
                        .zip(group_sums.chunks_exact_mut(out_plane))
                    {
                        let block = &mut channel_sums[first..first + valid];
                        for (sum, row) in block.iter_mut().zip(column.chunks_exact(stride)) {
                            *sum += filter
                                .iter()
                                .zip(row)
                                .map(|(&w, &x)| i32::from(w) * i32::from(x))
                                .sum::<i32>();
                        }
                    }
                }
            }
        } else {
            // A tap at a time over whole output rows (a pointwise layer's row: the plane).
            // The output columns whose input column for tap `kx` lies inside the row.
            let columns = |kx: usize| {
                let offset = kx * g.dilation[1];
                let first = g.pad[1].saturating_sub(offset).div_ceil(g.stride[1]);
                let last = (w + g.pad[1])
                    .saturating_sub(offset)
                    .div_ceil(g.stride[1])
                    .min(ow);
                (first, last.max(first), offset)
            };
            // A pointwise layer's whole blocks of output channels and pixels, sums in registers.
            for oc in 0..oc_total {
                let first_channel = (oc / ocg) * icg;
                let filter = &self.weights[oc * terms..(oc + 1) * terms];
                let out_sums = &mut sums[oc * out_plane..][..out_plane];
                // A pointwise layer's pixels past the blocks (all of them for channels past the
                // blocks); none left: nothing to do for this channel.
                let from = covered(oc);
                if pointwise && from == out_plane {
                    continue;
                }
                for ic in 0..icg {
                    let channel = &values[(first_channel + ic) * plane..][..plane];
                    if pointwise {
                        let weight = i32::from(filter[ic]);
                        for (sum, &x) in out_sums[from..].iter_mut().zip(&channel[from..]) {
                            *sum += weight * i32::from(x);
                        }
                        continue;
                    }
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let weight = i32::from(filter[(ic * kh + ky) * kw + kx]);
                            let (first, last, offset) = columns(kx);
                            if weight == 0 || first == last {
                                continue;
                            }
                            for oy in 0..oh {
                                let Some(iy) = (oy * g.stride[0] + ky * g.dilation[0])
                                    .checked_sub(g.pad[0])
                                    .filter(|&iy| iy < h)
                                else {
                                    continue;
                                };
                                let row = &channel[iy * w..(iy + 1) * w];
                                let out = &mut out_sums[oy * ow + first..oy * ow + last];
                                // Input column of output column `first`.
                                let start = first * g.stride[1] + offset - g.pad[1];
                                if g.stride[1] == 1 {
                                    let inputs = &row[start..start + out.len()];
                                    for (sum, &x) in out.iter_mut().zip(inputs) {
                                        *sum += weight * i32::from(x);
                                    }
                                } else {
                                    let inputs = row[start..].iter().step_by(g.stride[1]);
                                    for (sum, &x) in out.iter_mut().zip(inputs) {
                                        *sum += weight * i32::from(x);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        // Planes smaller than a vector: requantised across channels where that is exact.
        #[cfg(target_arch = "x86_64")]
        if AVX2
            && out_plane < 8
            && crate::avx2::wide::stores_exactly(&self.output, &self.channels)
            // SAFETY: AVX2 is true only where the CPU has AVX2.
            && unsafe {
                crate::avx2::wide::store_small_planes(
                    &self.output,
                    output,
                    sums,
                    &self.channels,
                    out_plane,
                )
            }
        {
            return Ok(());
        }
        let bytes = self.output.width.bytes();
        for (oc, sums) in sums.chunks_exact(out_plane.max(1)).enumerate() {
            let requant = self.channels.get(oc).1;
            let out = &mut output[oc * out_plane * bytes..][..out_plane * bytes];
            // A pointwise layer's blocks stored already: the pixels past them.
            let done = match stored {
                true => covered(oc),
                false => 0,
            };
            let (out, sums) = (&mut out[done * bytes..], &sums[done..]);
            // Rows of a whole vector and more in vectors (a vector's constants cost more than a
            // few values' scalar arithmetic).
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 is true only where the CPU has AVX2.
            if AVX2
                && out_plane >= 8
                && unsafe { crate::avx2::wide::store_row(&self.output, out, sums, requant) }
            {
                continue;
            }
            self.output.store_row(out, sums, requant);
        }
        Ok(())
    }
}

/// Output channels and pixels of one block of [`Conv16::pointwise_blocks`].
#[cfg(feature = "std")]
pub(crate) const BLOCK_CHANNELS: usize = 4;
#[cfg(feature = "std")]
pub(crate) const BLOCK_PIXELS: usize = 16;
/// Values per `vpmaddwd`: the rows of a dot-product layer's columns are padded to a multiple.
#[cfg(feature = "std")]
pub(crate) const DOT_LANES: usize = 16;
/// Output pixels per block of the dot-product kernel: a block of columns holds a multiple.
#[cfg(feature = "std")]
pub(crate) const DOT_PIXELS: usize = 4;
/// Output pixels whose columns a dot-product layer gathers at a time (a stem's 64 rows of 32
/// values: 4 KiB, in L1 while every output channel reads them).
#[cfg(feature = "std")]
const DOT_BLOCK: usize = 64;

#[cfg(feature = "std")]
impl Conv16<'_> {
    /// A pointwise layer's sums for each block of [`BLOCK_CHANNELS`] output channels of a group
    /// and [`BLOCK_PIXELS`] pixels, the block's sums kept in registers while every input
    /// channel passes (each input value read once per four channels): requantised into
    /// `output` where that is exact, else written to `sums` with their bias. Returns the pixels
    /// covered (from 0, in every channel of a whole block).
    #[allow(clippy::indexing_slicing)]
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    #[inline(always)]
    fn pointwise_blocks<const AVX2: bool>(
        &self,
        encoding: Encoding,
        values: &[i16],
        sums: &mut [i32],
        pairs: &[i32],
        output: &mut [i8],
    ) -> Blocks {
        let groups = self.geometry.group.max(1);
        let [c, h, w] = self.geometry.input;
        let (plane, icg, ocg) = (h * w, c / groups, self.geometry.output[0] / groups);
        let pixels = plane / BLOCK_PIXELS * BLOCK_PIXELS;
        let pairs_per_channel = icg.div_ceil(2);
        if ocg < BLOCK_CHANNELS
            || pixels == 0
            || (AVX2 && pairs.len() < groups * ocg * pairs_per_channel)
        {
            // No whole block (or no weight pairs for one): the caller sums every pixel.
            return Blocks {
                pixels: 0,
                stored: false,
            };
        }
        // With AVX2, blocks are requantised straight into the output where that is exact.
        #[cfg(target_arch = "x86_64")]
        let stored = AVX2 && crate::avx2::wide::stores_exactly(&self.output, &self.channels);
        #[cfg(not(target_arch = "x86_64"))]
        let stored = false;
        // With AVX-512 VNNI, two blocks of pixels at a time in 512-bit vectors.
        #[cfg(target_arch = "x86_64")]
        let wide = AVX2 && encoding == Some(crate::avx2::Vnni::Avx512);
        #[cfg(not(target_arch = "x86_64"))]
        let wide = false;
        for group in 0..groups {
            for block in 0..ocg / BLOCK_CHANNELS {
                let first = group * ocg + block * BLOCK_CHANNELS;
                let mut p = 0;
                while p < pixels {
                    let span = match wide && p + 2 * BLOCK_PIXELS <= pixels {
                        true => 2,
                        false => 1,
                    };
                    let mut accs = [[[0i32; BLOCK_PIXELS]; BLOCK_CHANNELS]; 2];
                    #[cfg(target_arch = "x86_64")]
                    if AVX2 {
                        let weights = &pairs[first * pairs_per_channel..]
                            [..BLOCK_CHANNELS * pairs_per_channel];
                        let inputs = &values[group * icg * plane..(group + 1) * icg * plane];
                        // SAFETY: AVX2 is true only where the CPU has AVX2; the encoding is
                        // one it has (`Conv16Scratch::with_vnni`): AVX-512 VNNI where `wide`.
                        unsafe {
                            match span {
                                2 => crate::avx2::wide::pointwise_block_pair(
                                    inputs, weights, plane, p, &mut accs,
                                ),
                                _ => crate::avx2::wide::pointwise_block(
                                    encoding,
                                    inputs,
                                    weights,
                                    plane,
                                    p,
                                    &mut accs[0],
                                ),
                            }
                        };
                    }
                    for ic in (0..icg).filter(|_| !(AVX2 && cfg!(target_arch = "x86_64"))) {
                        let channel = (group * icg + ic) * plane + p;
                        let xs: &[i16; BLOCK_PIXELS] = values[channel..channel + BLOCK_PIXELS]
                            .try_into()
                            .unwrap_or(&[0; BLOCK_PIXELS]);
                        for (k, row) in accs[0].iter_mut().enumerate() {
                            let weight = i32::from(self.weights[(first + k) * icg + ic]);
                            for (sum, &x) in row.iter_mut().zip(xs) {
                                *sum += weight * i32::from(x);
                            }
                        }
                    }
                    for (half, acc) in accs.iter().enumerate().take(span) {
                        let p = p + half * BLOCK_PIXELS;
                        #[cfg(target_arch = "x86_64")]
                        if stored {
                            // SAFETY: `stored` only where AVX2 is true: the CPU has AVX2.
                            unsafe {
                                crate::avx2::wide::store_block(
                                    &self.output,
                                    &self.channels,
                                    first,
                                    acc,
                                    output,
                                    plane,
                                    p,
                                )
                            };
                            continue;
                        }
                        for (k, row) in acc.iter().enumerate() {
                            let bias = self.channels.get(first + k).0;
                            let out = &mut sums[(first + k) * plane + p..][..BLOCK_PIXELS];
                            for (sum, &add) in out.iter_mut().zip(row) {
                                *sum = bias + add;
                            }
                        }
                    }
                    p += span * BLOCK_PIXELS;
                }
            }
        }
        Blocks { pixels, stored }
    }
}

/// The padded plane a layer's windows reach, rows and columns: from the first window's first
/// tap to the last window's last. `None` where that is larger than the input and its padding
/// on both sides (no real layer's: an odd geometry's), or there is no window.
#[cfg(feature = "std")]
pub(crate) fn window_reach(g: &ConvGeometry) -> Option<[usize; 2]> {
    let reach = |out: usize, s: usize, k: usize, d: usize, size: usize, pad: usize| {
        let span = (out.checked_sub(1)?)
            .checked_mul(s)?
            .checked_add((k.checked_sub(1)?).checked_mul(d)?)?
            + 1;
        (span <= size.checked_add(pad.checked_mul(2)?)?).then_some(span)
    };
    let ([_, h, w], [_, oh, ow]) = (g.input, g.output);
    Some([
        reach(oh, g.stride[0], g.kernel[0], g.dilation[0], h, g.pad[0])?,
        reach(ow, g.stride[1], g.kernel[1], g.dilation[1], w, g.pad[1])?,
    ])
}

#[cfg(feature = "std")]
impl Conv16<'_> {
    /// One group's input values (`icg` planes) padded into `padded` with zeros on every side
    /// the layer's windows reach, and each of a window's terms (channel, row, column) as an
    /// offset from its first in the padded planes into `offsets`; the padded width. `None`
    /// where the reach is larger than the input and its padding (no real layer's).
    fn pad_group(
        &self,
        values: &[i16],
        padded: &mut std::vec::Vec<i16>,
        offsets: &mut std::vec::Vec<usize>,
    ) -> Option<usize> {
        let g = &self.geometry;
        let [c, h, w] = g.input;
        let [kh, kw] = g.kernel;
        let [top, left] = g.pad;
        let icg = c / g.group.max(1);
        let [hp, wp] = window_reach(g)?;
        padded.clear();
        padded.resize(icg * hp * wp, 0);
        for (src, dst) in values
            .chunks_exact((h * w).max(1))
            .zip(padded.chunks_exact_mut(hp * wp))
        {
            for (y, row) in src
                .chunks_exact(w.max(1))
                .enumerate()
                .take(hp.saturating_sub(top))
            {
                let columns = w.min(wp.saturating_sub(left));
                let at = (y + top) * wp + left;
                if let (Some(dst), Some(row)) = (dst.get_mut(at..at + columns), row.get(..columns))
                {
                    dst.copy_from_slice(row);
                }
            }
        }
        offsets.clear();
        for ic in 0..icg {
            for ky in 0..kh {
                for kx in 0..kw {
                    offsets.push(ic * hp * wp + ky * g.dilation[0] * wp + kx * g.dilation[1]);
                }
            }
        }
        Some(wp)
    }
}

/// What [`Conv16::pointwise_blocks`] covered: pixels `0..pixels` of every channel of a whole
/// block, added to the sums, or requantised into the output already (`stored`).
#[cfg(feature = "std")]
struct Blocks {
    pixels: usize,
    stored: bool,
}

/// The element-wise 16-bit kernels for the host's kernel table: the generic code, compiled for
/// AVX2 where the CPU has it (a third of the generic build's time on EfficientNet-B0's layers).
#[cfg(feature = "std")]
pub mod host {
    use super::{Add16, Function16, GlobalAveragePool16, Mul16};
    use crate::int8::ShapeError;

    /// `$name` runs `$avx2_body` (the generic kernel inlined, or an AVX2 one) compiled for AVX2
    /// on a CPU that has it, `$body` (the generic kernel) elsewhere.
    macro_rules! twins {
        ($(#[$doc:meta] $name:ident, $avx2:ident, ($($arg:ident: $ty:ty),*)
            => $body:expr, $avx2_body:expr;)*) => {$(
            #[$doc]
            pub fn $name($($arg: $ty),*) -> Result<(), ShapeError> {
                #[cfg(target_arch = "x86_64")]
                if std::is_x86_feature_detected!("avx2") {
                    // SAFETY: this CPU has AVX2, the only feature the twin is compiled for.
                    return unsafe { $avx2($($arg),*) };
                }
                $body
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            unsafe fn $avx2($($arg: $ty),*) -> Result<(), ShapeError> {
                $avx2_body
            }
        )*};
    }

    /// The name of the kernels these run on this CPU: `avx2` where it has AVX2, else `generic`.
    pub fn name() -> &'static str {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
        "generic"
    }

    twins! {
        /// [`Add16::run`].
        add16, add16_avx2, (add: &Add16, a: &[i8], b: &[i8], output: &mut [i8])
            => add.run(a, b, output), add.run(a, b, output);
        /// [`Mul16::run`] (with AVX2, eight values to a vector).
        mul16, mul16_avx2, (mul: &Mul16, a: &[i8], b: &[i8], output: &mut [i8])
            => mul.run(a, b, output), crate::avx2::wide::mul16(mul, a, b, output);
        /// [`GlobalAveragePool16::run`] (with AVX2, sums sixteen values to a vector).
        global_average_pool16, global_average_pool16_avx2,
            (pool: &GlobalAveragePool16, input: &[i8], output: &mut [i8])
            => pool.run(input, output),
            crate::avx2::wide::global_average_pool16(pool, input, output);
        /// [`Function16::run`] (with AVX2, eight values to a gather).
        function16, function16_avx2, (function: &Function16<'_>, input: &[i8], output: &mut [i8])
            => function.run(input, output), crate::avx2::wide::function16(function, input, output);
    }
}

/// Fractional bits kept while two rescaled 16-bit addends are summed: a code of up to 2^15
/// shifted by them stays within `i32` before the requantisation.
pub const ADD16_FRACTION_BITS: u32 = 15;

/// Element-wise sum of two 16-bit tensors (zero points 0) into a 16-bit tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Add16 {
    /// `input scale / output scale` of each input.
    pub requant: [Requant; 2],
    /// The output (16-bit).
    pub output: WideOutput,
}

impl Add16 {
    /// `output = a + b` in real terms (bytes of 16-bit tensors of one length).
    #[inline(always)]
    pub fn run(&self, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        check(a.len() == b.len() && a.len().is_multiple_of(2), "input")?;
        check(
            self.output.bytes(a.len() / 2) == Some(output.len()),
            "output",
        )?;
        let [requant_a, requant_b] = self.requant;
        let term = |x: i32, requant: Requant| i64::from(requant.apply(x << ADD16_FRACTION_BITS));
        let half = 1i64 << (ADD16_FRACTION_BITS - 1);
        let sums = codes16(a).zip(codes16(b)).map(|(x, y)| {
            // Two terms of at most 2^31 each, shifted back: within i32.
            ((term(x, requant_a) + term(y, requant_b) + half) >> ADD16_FRACTION_BITS) as i32
        });
        self.output.store_all(output, sums);
        Ok(())
    }
}

/// Element-wise product of two 16-bit tensors (zero points 0), `b` broadcast as in
/// [`crate::int8::Mul`]: `a`'s length, one value, or one per channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mul16 {
    /// `a scale * b scale / output scale`.
    pub requant: Requant,
    /// The output (16-bit).
    pub output: WideOutput,
}

impl Mul16 {
    /// Check the buffers' sizes (bytes): `b` one value per plane of `a`, `output` `a`'s values
    /// at the output's width. The plane's values.
    pub(crate) fn plane(&self, a: &[i8], b: &[i8], output: &[i8]) -> Result<usize, ShapeError> {
        let (a_len, b_len) = (a.len() / 2, b.len() / 2);
        check(
            a.len().is_multiple_of(2)
                && b.len().is_multiple_of(2)
                && b_len > 0
                && b_len <= a_len
                && a_len.is_multiple_of(b_len),
            "input",
        )?;
        check(self.output.bytes(a_len) == Some(output.len()), "output")?;
        Ok(a_len / b_len)
    }

    /// `output = a * b` in real terms.
    #[inline(always)]
    pub fn run(&self, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        let plane = self.plane(a, b, output)?;
        let out_plane = plane * self.output.width.bytes();
        for ((xs, y), out) in a
            .chunks_exact(2 * plane)
            .zip(codes16(b))
            .zip(output.chunks_exact_mut(out_plane))
        {
            // Codes of at most 2^15 in magnitude: the product is within i32.
            let products = codes16(xs).map(|x| self.requant.apply(x * y));
            self.output.store_all(out, products);
        }
        Ok(())
    }
}

/// Channel means of a 16-bit tensor (zero point 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalAveragePool16 {
    /// Channels.
    pub channels: usize,
    /// `input scale / (output scale * plane)`.
    pub requant: Requant,
    /// The output.
    pub output: WideOutput,
}

impl GlobalAveragePool16 {
    /// Check the buffers' sizes (bytes): a plane of values per channel in, a value per channel
    /// out. The plane's values.
    pub(crate) fn plane(&self, input: &[i8], output: &[i8]) -> Result<usize, ShapeError> {
        let values = input.len() / 2;
        check(
            self.channels > 0 && input.len().is_multiple_of(2) && values > 0,
            "input",
        )?;
        check(values.is_multiple_of(self.channels), "input")?;
        check(
            self.output.bytes(self.channels) == Some(output.len()),
            "output",
        )?;
        Ok(values / self.channels)
    }

    /// Mean of each channel's plane of `input` into `output`.
    #[inline(always)]
    pub fn run(&self, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        let plane = self.plane(input, output)?;
        for (c, channel) in input.chunks_exact(2 * plane).enumerate() {
            let sum: i64 = codes16(channel).map(i64::from).sum();
            self.output.write(output, c, sum, self.requant);
        }
        Ok(())
    }
}

/// Input codes per segment of a [`Function16`] table.
pub const FUNCTION16_SEGMENT: i32 = 64;
/// Entries of a [`Function16`] table: the function at `-32768 + 64 k`, `k` in `0..=1024`.
pub const FUNCTION16_ENTRIES: usize = 1025;

/// An element-wise function (SiLU, Sigmoid, HardSwish...) from 16-bit codes to 16-bit codes
/// (zero points 0), by linear interpolation in a table of its value every
/// [`FUNCTION16_SEGMENT`] input codes. Build the table with [`build_function16`].
#[derive(Clone, Copy, Debug)]
pub struct Function16<'a> {
    /// [`FUNCTION16_ENTRIES`] output codes.
    pub table: &'a [i16],
}

impl Function16<'_> {
    /// The output code of input code `x`.
    #[inline(always)]
    pub fn code(&self, x: i32) -> i32 {
        let from_bottom = x.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) - i32::from(i16::MIN);
        let (k, fraction) = (
            (from_bottom / FUNCTION16_SEGMENT) as usize,
            from_bottom % FUNCTION16_SEGMENT,
        );
        let at = |k: usize| i32::from(self.table.get(k).copied().unwrap_or_default());
        let (low, high) = (at(k), at(k + 1));
        // Rounded half up; an arithmetic shift floors negative steps the same way everywhere.
        low + (((high - low) * fraction + FUNCTION16_SEGMENT / 2) >> FUNCTION16_SEGMENT.ilog2())
    }

    /// Check the table and the buffers' sizes (bytes).
    pub(crate) fn check(&self, input: &[i8], output: &[i8]) -> Result<(), ShapeError> {
        check(self.table.len() == FUNCTION16_ENTRIES, "table")?;
        check(input.len().is_multiple_of(2), "input")?;
        check(output.len() == input.len(), "output")
    }

    /// Apply the function to every value of `input` (16-bit) into `output` (16-bit).
    #[inline(always)]
    pub fn run(&self, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        self.check(input, output)?;
        let (min, max) = Width::I16.range();
        let output_codes = WideOutput {
            width: Width::I16,
            zero_point: 0,
            min,
            max,
        };
        output_codes.store_all(output, codes16(input).map(|x| self.code(x)));
        Ok(())
    }
}

/// The [`Function16`] table of `f` between two 16-bit grids (zero points 0): entry `k` holds
/// `round(f(input_scale * (-32768 + 64 k)) / output_scale)`, clamped to ±[`i16::MAX`] (a NaN
/// to 0). Float, for the compiler and tests.
pub fn build_function16(
    input_scale: f32,
    output_scale: f32,
    f: impl Fn(f32) -> f32,
) -> [i16; FUNCTION16_ENTRIES] {
    let mut table = [0i16; FUNCTION16_ENTRIES];
    for (k, slot) in table.iter_mut().enumerate() {
        let x = input_scale * (i32::from(i16::MIN) + FUNCTION16_SEGMENT * k as i32) as f32;
        let steps = f64::from(f(x)) / f64::from(output_scale);
        // By hand because core has no f64::round; `as` saturates (NaN to 0).
        let rounded = if steps >= 0.0 {
            steps + 0.5
        } else {
            steps - 0.5
        } as i64;
        let limit = i64::from(i16::MAX);
        *slot = rounded.clamp(-limit, limit) as i16;
    }
    table
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    fn wide(values: &[i16]) -> Vec<i8> {
        values
            .iter()
            .flat_map(|v| v.to_le_bytes().map(|b| b as i8))
            .collect()
    }

    fn narrow(bytes: &[i8]) -> Vec<i16> {
        (0..bytes.len() / 2)
            .map(|i| Width::I16.load(bytes, i) as i16)
            .collect()
    }

    const FULL: WideOutput = WideOutput {
        width: Width::I16,
        zero_point: 0,
        min: -32767,
        max: 32767,
    };

    #[test]
    fn function_table_interpolates_silu_within_a_code() {
        let (input_scale, output_scale) = (10.0 / 32767.0, 10.0 / 32767.0);
        let silu = |x: f32| x / (1.0 + (-x).exp());
        let table = build_function16(input_scale, output_scale, silu);
        let f = Function16 { table: &table };
        for x in (-32768..=32767).step_by(7) {
            let exact = silu(input_scale * x as f32) / output_scale;
            let got = f.code(x);
            assert!(
                (got as f32 - exact).abs() <= 1.5,
                "x {x}: {got} against {exact}"
            );
        }
        // The table's own points come back exactly.
        assert_eq!(f.code(-32768), i32::from(table[0]));
        assert_eq!(f.code(-32768 + 64 * 700), i32::from(table[700]));
    }

    #[test]
    fn conv_reads_and_writes_both_widths() {
        // One output channel, 2x2 input, 1x1 kernel, weight 3, bias 5; unit requantisation.
        let one = Requant::from_real(1.0).unwrap();
        let geometry = ConvGeometry {
            input: [1, 2, 2],
            output: [1, 2, 2],
            kernel: [1, 1],
            stride: [1, 1],
            pad: [0, 0],
            dilation: [1, 1],
            group: 1,
        };
        let (bias, multiplier, shift) = ([5], [one.multiplier], [one.shift]);
        let channels = ChannelQuant {
            bias: &bias,
            multiplier: &multiplier,
            shift: &shift,
        };
        let conv = Conv16 {
            geometry,
            weights: &[3],
            channels,
            input_width: Width::I16,
            input_zero_point: 0,
            output: FULL,
        };
        let input = wide(&[1000, -1000, 20000, -3]);
        let mut output = vec![0i8; 8];
        conv.run(&input, &mut output).unwrap();
        // 3 * 20000 + 5 clamps to 32767.
        assert_eq!(narrow(&output), [3005, -2995, 32767, -4]);
        let to_int8 = Conv16 {
            input_width: Width::I8,
            input_zero_point: 1,
            output: WideOutput {
                width: Width::I8,
                zero_point: -2,
                min: -128,
                max: 127,
            },
            ..conv
        };
        let mut output = vec![0i8; 4];
        to_int8.run(&[1, 2, 50, -100], &mut output).unwrap();
        assert_eq!(output, [3, 6, 127, -128]);
        assert!(to_int8.run(&[1, 2, 50], &mut output).is_err());
    }

    #[test]
    fn rows_kernel_writes_the_generic_bytes_on_random_layers() {
        #[cfg(target_arch = "x86_64")]
        {
            use crate::avx2::Vnni;
            for vnni in [None, Some(Vnni::Avx), Some(Vnni::Avx512)] {
                if vnni.is_some_and(|v| !v.available()) {
                    println!("this CPU lacks {vnni:?}: its 16-bit dot products are not tested");
                    continue;
                }
                rows_match_generic(Conv16Scratch::with_vnni(vnni));
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        rows_match_generic(Conv16Scratch::default());
    }

    fn rows_match_generic(mut scratch: Conv16Scratch) {
        use kestrel_testing::Rng;
        let mut rng = Rng(0x16b1_7c0d_e5ee_d001);
        for case in 0..600 {
            let pick = |rng: &mut Rng, n: usize| rng.below(n);
            let mut group = [1, 1, 2, 4][pick(&mut rng, 4)];
            // Now and then enough input channels for the dot products' whole vectors.
            let mut icg = 1 + pick(&mut rng, if case % 7 == 3 { 40 } else { 4 });
            let mut ocg = 1 + pick(&mut rng, 9);
            // Depthwise layers over blocks of 16 channels and a last partial one.
            if case % 6 == 5 {
                (group, icg, ocg) = (1 + pick(&mut rng, 40), 1, 1);
            }
            // Pointwise layers on small planes with many output channels: the channel lanes'
            // whole and partial blocks of vectors.
            let lanes = case % 13 == 6;
            if lanes {
                (group, icg, ocg) = (1, 16 + pick(&mut rng, 70), 16 + pick(&mut rng, 90));
            }
            let (c, oc) = (icg * group, ocg * group);
            let (mut h, mut w) = (1 + pick(&mut rng, 12), 1 + pick(&mut rng, 12));
            if lanes {
                (h, w) = [(2, 2), (4, 4), (2, 4), (3, 4), (2, 8), (1, 1)][pick(&mut rng, 6)];
            }
            let mut kernel = [1 + pick(&mut rng, 5), 1 + pick(&mut rng, 5)];
            let mut stride = [1 + pick(&mut rng, 3), 1 + pick(&mut rng, 3)];
            let dilation = [1 + pick(&mut rng, 2), 1 + pick(&mut rng, 2)];
            let mut pad = [pick(&mut rng, 3), pick(&mut rng, 3)];
            // Pointwise layers (every third case), whose planes of 64 pixels and more and
            // blocks of channels take paths of their own.
            if case % 3 == 0 || lanes {
                (kernel, stride, pad) = ([1, 1], [1, 1], [0, 0]);
            }
            let extent = |i: usize| (kernel[i] - 1) * dilation[i] + 1;
            let (Some(hh), Some(ww)) = (
                (h + 2 * pad[0]).checked_sub(extent(0)),
                (w + 2 * pad[1]).checked_sub(extent(1)),
            ) else {
                continue;
            };
            let output = [oc, hh / stride[0] + 1, ww / stride[1] + 1];
            let widths = [Width::I8, Width::I16];
            let (input_width, output_width) =
                (widths[pick(&mut rng, 2)], widths[pick(&mut rng, 2)]);
            let weights: Vec<i8> = (0..oc * icg * kernel[0] * kernel[1])
                .map(|_| rng.code())
                .collect();
            // Near the bound now and then, so that both paths run.
            let big = case % 5 == 0;
            let bias: Vec<i32> = (0..oc)
                .map(|_| {
                    if big {
                        i32::MAX - rng.below(1000) as i32
                    } else {
                        rng.below(200_000) as i32 - 100_000
                    }
                })
                .collect();
            let multiplier: Vec<i32> = (0..oc)
                .map(|_| (1 << 30) + rng.below(1 << 30) as i32)
                .collect();
            // Scales of 1 and more now and then: the vector requantisation declines them.
            let shift: Vec<i8> = (0..oc)
                .map(|_| match case % 11 {
                    0 => rng.below(3) as i8,
                    _ => -(rng.below(12) as i8),
                })
                .collect();
            let values = c * h * w;
            let input: Vec<i8> = (0..values * input_width.bytes())
                .map(|_| rng.code())
                .collect();
            let (lo, hi) = output_width.range();
            let conv = Conv16 {
                geometry: ConvGeometry {
                    input: [c, h, w],
                    output,
                    kernel,
                    stride,
                    pad,
                    dilation,
                    group,
                },
                weights: &weights,
                channels: ChannelQuant {
                    bias: &bias,
                    multiplier: &multiplier,
                    shift: &shift,
                },
                input_width,
                // 16-bit inputs have zero point 0 as the compiler makes them, mostly.
                input_zero_point: match input_width {
                    Width::I16 if case % 4 != 1 => 0,
                    _ => rng.below(9) as i32 - 4,
                },
                output: WideOutput {
                    width: output_width,
                    zero_point: rng.below(9) as i32 - 4,
                    min: lo / 2,
                    max: hi,
                },
            };
            let len = output.iter().product::<usize>() * output_width.bytes();
            let (mut expected, mut got) = (vec![0i8; len], vec![1i8; len]);
            conv.run(&input, &mut expected).unwrap();
            // Prepared once (as at load) or per call.
            let prepared = conv.prepare();
            let prepared = (case % 2 == 0).then_some(&prepared);
            conv.run_rows(&input, &mut got, &mut scratch, prepared)
                .unwrap();
            assert_eq!(got, expected, "case {case}: {:?}", conv.geometry);
        }
    }

    #[test]
    fn odd_geometry_never_panics() {
        // Geometry no real layer has, with buffers that match it: both kernels answer alike
        // (a result or the same error), and neither panics.
        let mut scratch = Conv16Scratch::default();
        let mut ran = 0;
        let odd = crate::strips::check::odd_geometries(0x0dd_9e0_16b, 1 << 14);
        for (geometry, [input_len, output_len, weights_len]) in odd {
            let oc = geometry.output[0];
            let (bias, multiplier, shift) = (vec![0; oc], vec![1 << 30; oc], vec![0i8; oc]);
            let weights = vec![1i8; weights_len];
            let conv = Conv16 {
                geometry,
                weights: &weights,
                channels: ChannelQuant {
                    bias: &bias,
                    multiplier: &multiplier,
                    shift: &shift,
                },
                input_width: Width::I16,
                input_zero_point: 0,
                output: FULL,
            };
            let input = vec![1i8; 2 * input_len];
            let (mut expected, mut got) = (vec![0i8; 2 * output_len], vec![0i8; 2 * output_len]);
            let reference = conv.run(&input, &mut expected);
            let result = conv.run_rows(&input, &mut got, &mut scratch, None);
            assert_eq!(result, reference, "{geometry:?}");
            assert_eq!(got, expected, "{geometry:?}");
            ran += usize::from(result.is_ok());
        }
        assert!(ran > 50, "only {ran} geometries ran");
    }

    #[test]
    fn host_element_wise_kernels_write_the_generic_bytes() {
        use kestrel_testing::Rng;
        let mut rng = Rng(0x16b1_e1e3_e575_0001);
        for case in 0..300 {
            let (channels, plane) = (1 + rng.below(20), 1 + rng.below(40));
            let bytes =
                |rng: &mut Rng, n: usize| -> Vec<i8> { (0..n).map(|_| rng.code()).collect() };
            let (a, b) = (
                bytes(&mut rng, 2 * channels * plane),
                bytes(&mut rng, 2 * channels),
            );
            let width = [Width::I8, Width::I16][case % 2];
            let (lo, hi) = width.range();
            let mul = Mul16 {
                // Scales of 1 and more now and then: the vector requantisation declines them.
                requant: Requant {
                    multiplier: (1 << 30) + rng.below(1 << 30) as i32,
                    shift: rng.below(20) as i8 - 17,
                },
                output: WideOutput {
                    width,
                    zero_point: rng.below(9) as i32 - 4,
                    min: lo + rng.below(50) as i32,
                    max: hi - rng.below(50) as i32,
                },
            };
            let len = channels * plane * width.bytes();
            let (mut expected, mut got) = (vec![0i8; len], vec![1i8; len]);
            mul.run(&a, &b, &mut expected).unwrap();
            host::mul16(&mul, &a, &b, &mut got).unwrap();
            assert_eq!(got, expected, "case {case}: {mul:?}");

            let pool = GlobalAveragePool16 {
                channels,
                requant: mul.requant,
                output: mul.output,
            };
            let (mut expected, mut got) = (
                vec![0i8; channels * width.bytes()],
                vec![1i8; channels * width.bytes()],
            );
            pool.run(&a, &mut expected).unwrap();
            host::global_average_pool16(&pool, &a, &mut got).unwrap();
            assert_eq!(got, expected, "case {case}: {pool:?}");

            let table: Vec<i16> = (0..FUNCTION16_ENTRIES)
                .map(|_| (rng.below(65535) as i32 - 32767) as i16)
                .collect();
            let function = Function16 { table: &table };
            let (mut expected, mut got) = (vec![0i8; a.len()], vec![1i8; a.len()]);
            function.run(&a, &mut expected).unwrap();
            host::function16(&function, &a, &mut got).unwrap();
            assert_eq!(got, expected, "case {case}");
        }
        // Either kernel refuses what the other does.
        let mul = Mul16 {
            requant: Requant::from_real(0.5).unwrap(),
            output: FULL,
        };
        assert!(host::mul16(&mul, &[0; 6], &[0; 4], &mut [0; 6]).is_err());
        let table = vec![0i16; FUNCTION16_ENTRIES - 1];
        let function = Function16 { table: &table };
        assert!(host::function16(&function, &[0; 4], &mut [0; 4]).is_err());
    }

    #[test]
    fn add_mul_and_pool_on_16_bit_codes() {
        let half = Requant::from_real(0.5).unwrap();
        let one = Requant::from_real(1.0).unwrap();
        let add = Add16 {
            requant: [half, one],
            output: FULL,
        };
        let mut out = vec![0i8; 4];
        add.run(&wide(&[1001, -30000]), &wide(&[7, -20000]), &mut out)
            .unwrap();
        assert_eq!(narrow(&out), [508, -32767]);

        let mul = Mul16 {
            requant: Requant::from_real(1.0 / 1024.0).unwrap(),
            output: FULL,
        };
        let mut out = vec![0i8; 8];
        // Per channel: two channels of two values.
        mul.run(&wide(&[1024, 2048, -512, 100]), &wide(&[3, -4]), &mut out)
            .unwrap();
        assert_eq!(narrow(&out), [3, 6, 2, 0]);

        let pool = GlobalAveragePool16 {
            channels: 2,
            requant: Requant::from_real(0.5).unwrap(),
            output: FULL,
        };
        let mut out = vec![0i8; 4];
        pool.run(&wide(&[100, 301, -7, -9]), &mut out).unwrap();
        assert_eq!(narrow(&out), [201, -8]);
        assert!(pool.run(&wide(&[1, 2, 3]), &mut out).is_err());
    }
}
