//! Generic int8 kernels: the reference every faster executor is checked against bit for bit.
//!
//! Batch 1, NCHW. Activations are asymmetric int8 (`real = scale * (q - zero_point)`), weights
//! symmetric int8 per output channel, biases int32 in the accumulator's scale. Accumulation is
//! int32; every requantisation goes through [`Requant`], so results are exact integers.

use crate::quant::{requantize_i8, Requant};

/// Why a kernel refused its arguments: a buffer does not match the shapes it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ShapeError {
    /// Which buffer: `"input"`, `"weights"`, `"bias"`, `"requant"`, `"table"`, `"output"` or
    /// `"geometry"`.
    pub buffer: &'static str,
}

impl core::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "int8 kernel: {} does not match the layer's shape",
            self.buffer
        )
    }
}

#[cfg(feature = "std")]
impl std::error::Error for ShapeError {}

pub(crate) fn check(ok: bool, buffer: &'static str) -> Result<(), ShapeError> {
    if ok {
        Ok(())
    } else {
        Err(ShapeError { buffer })
    }
}

/// Output activation: zero point and the clamp range (a fused ReLU or ReLU6 narrows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutputQuant {
    /// Zero point of the output tensor.
    pub zero_point: i32,
    /// Smallest code written.
    pub min: i8,
    /// Largest code written.
    pub max: i8,
}

/// Entries of a wide input table: one per int8 code.
pub const WIDE_TABLE_LEN: usize = 256;

/// A layer input read through a table of 16-bit values rather than minus a zero point: the
/// output of a function (Sigmoid, SiLU, HardSwish...) that the compiler widened. The input
/// tensor holds the function's int8 *input* codes; entry `code as u8` holds the function's value
/// at that code on a 16-bit grid, so the layer multiplies values up to 256 times finer than an
/// int8 output of the function would give it, and the tensor still takes one byte per value.
pub type WideTable = [i16; WIDE_TABLE_LEN];

/// The value of `code` in a [`WideTable`].
#[inline]
pub fn wide_value(table: &WideTable, code: i8) -> i32 {
    // 256 entries: every u8 index is there (as in `Lut::run`).
    i32::from(
        table
            .get(usize::from(code as u8))
            .copied()
            .unwrap_or_default(),
    )
}

/// Shapes and window of a 2-D convolution (grouped, depthwise, strided, padded, dilated).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConvGeometry {
    /// Input channels, height, width.
    pub input: [usize; 3],
    /// Output channels, height, width.
    pub output: [usize; 3],
    /// Kernel height, width.
    pub kernel: [usize; 2],
    /// Vertical, horizontal.
    pub stride: [usize; 2],
    /// Top and left padding (bottom and right follow from the output size).
    pub pad: [usize; 2],
    /// Vertical, horizontal.
    pub dilation: [usize; 2],
    /// Channel groups.
    pub group: usize,
}

impl ConvGeometry {
    /// A 1x1 window of stride 1 without padding over the same plane: a matrix product of the
    /// weights and the input, whose channel planes are already the column matrix's rows.
    pub fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1]
            && self.stride == [1, 1]
            && self.pad == [0, 0]
            && self.input[1..] == self.output[1..]
    }
}

/// Per-output-channel bias and requantisation, borrowed from a plan's weights in place.
#[derive(Clone, Copy, Debug)]
pub struct ChannelQuant<'a> {
    /// Bias in the accumulator's scale.
    pub bias: &'a [i32],
    /// [`Requant::multiplier`] of each channel.
    pub multiplier: &'a [i32],
    /// [`Requant::shift`] of each channel.
    pub shift: &'a [i8],
}

impl<'a> ChannelQuant<'a> {
    /// Channels `range` of these (a group's, a chunk's), or `None` where some list is shorter.
    pub fn range(&self, range: core::ops::Range<usize>) -> Option<ChannelQuant<'a>> {
        Some(ChannelQuant {
            bias: self.bias.get(range.clone())?,
            multiplier: self.multiplier.get(range.clone())?,
            shift: self.shift.get(range)?,
        })
    }

    /// Whether there are exactly `channels` of each.
    pub fn fits(&self, channels: usize) -> bool {
        self.bias.len() == channels
            && self.multiplier.len() == channels
            && self.shift.len() == channels
    }

    /// Bias and requantisation of channel `c`; callers check [`ChannelQuant::fits`] first.
    #[inline]
    pub fn get(&self, c: usize) -> (i32, Requant) {
        let bias = self.bias.get(c).copied().unwrap_or(0);
        let multiplier = self.multiplier.get(c).copied().unwrap_or(0);
        let shift = self.shift.get(c).copied().unwrap_or(0);
        (bias, Requant { multiplier, shift })
    }
}

/// A 2-D convolution layer.
#[derive(Clone, Copy, Debug)]
pub struct Conv<'a> {
    /// Shapes and window.
    pub geometry: ConvGeometry,
    /// `[out, in / group, kh, kw]`.
    pub weights: &'a [i8],
    /// Bias and requantisation of each output channel.
    pub channels: ChannelQuant<'a>,
    /// Zero point of the input tensor.
    pub input_zero_point: i32,
    /// Output zero point and clamp.
    pub output_quant: OutputQuant,
}

impl Conv<'_> {
    /// Check the geometry, the constants and buffers of `input_len` and `output_len` codes:
    /// everything [`Conv::run`] checks, for executors that cannot check as they go.
    pub fn check(&self, input_len: usize, output_len: usize) -> Result<(), ShapeError> {
        let g = self.geometry;
        let [c, h, w] = g.input;
        let [oc_total, oh, ow] = g.output;
        let [kh, kw] = g.kernel;
        let group = g.group.max(1);
        check(
            c.is_multiple_of(group) && oc_total.is_multiple_of(group) && kh > 0 && kw > 0,
            "geometry",
        )?;
        check(
            g.stride.iter().chain(&g.dilation).all(|&s| s > 0),
            "geometry",
        )?;
        let product = |values: &[usize]| values.iter().try_fold(1usize, |p, &v| p.checked_mul(v));
        check(product(&[c, h, w]) == Some(input_len), "input")?;
        check(
            product(&[oc_total, c / group, kh, kw]) == Some(self.weights.len()),
            "weights",
        )?;
        check(self.channels.fits(oc_total), "bias")?;
        check(product(&[oc_total, oh, ow]) == Some(output_len), "output")
    }

    /// Run the layer on `input` (`C*H*W` codes) into `output`.
    pub fn run(&self, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        let zero_point = self.input_zero_point;
        self.run_with(input, output, |x| i32::from(x).wrapping_sub(zero_point))
    }

    /// Run the layer on `input` read through `table` (see [`WideTable`]; the input zero point
    /// is not used) into `output`.
    pub fn run_wide(
        &self,
        table: &WideTable,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        self.run_with(input, output, |x| wide_value(table, x))
    }

    /// The layer with `value` turning each input code into the integer it multiplies.
    fn run_with(
        &self,
        input: &[i8],
        output: &mut [i8],
        value: impl Fn(i8) -> i32,
    ) -> Result<(), ShapeError> {
        self.check(input.len(), output.len())?;
        let g = self.geometry;
        let [c, h, w] = g.input;
        let [oc_total, oh, ow] = g.output;
        let [kh, kw] = g.kernel;
        let group = g.group.max(1);
        let (icg, ocg) = (c / group, oc_total / group);
        let q = self.output_quant;
        // `check` proved every access below in bounds; a miss would be a bug, reported as the
        // buffer it concerns rather than a panic.
        let missing = |buffer| ShapeError { buffer };
        for oc in 0..oc_total {
            let (bias, requant) = self.channels.get(oc);
            let first_channel = (oc / ocg) * icg;
            let filter = self
                .weights
                .get(oc * icg * kh * kw..(oc + 1) * icg * kh * kw)
                .ok_or(missing("weights"))?;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = bias;
                    for ic in 0..icg {
                        let plane = input
                            .get((first_channel + ic) * h * w..(first_channel + ic + 1) * h * w)
                            .ok_or(missing("input"))?;
                        for ky in 0..kh {
                            let Some(iy) =
                                (oy * g.stride[0] + ky * g.dilation[0]).checked_sub(g.pad[0])
                            else {
                                continue;
                            };
                            if iy >= h {
                                continue;
                            }
                            for kx in 0..kw {
                                let Some(ix) =
                                    (ox * g.stride[1] + kx * g.dilation[1]).checked_sub(g.pad[1])
                                else {
                                    continue;
                                };
                                if ix >= w {
                                    continue;
                                }
                                let x = plane.get(iy * w + ix).ok_or(missing("input"))?;
                                let weight = filter
                                    .get((ic * kh + ky) * kw + kx)
                                    .ok_or(missing("weights"))?;
                                acc = acc.wrapping_add(value(*x).wrapping_mul(i32::from(*weight)));
                            }
                        }
                    }
                    *output
                        .get_mut((oc * oh + oy) * ow + ox)
                        .ok_or(missing("output"))? =
                        requantize_i8(acc, requant, q.zero_point, q.min, q.max);
                }
            }
        }
        Ok(())
    }
}

/// Fully connected layer: `[in]` to `[out]`, weights `[out, in]`.
#[derive(Clone, Copy, Debug)]
pub struct Gemm<'a> {
    /// `[out, in]`.
    pub weights: &'a [i8],
    /// Bias and requantisation of each output.
    pub channels: ChannelQuant<'a>,
    /// Zero point of the input.
    pub input_zero_point: i32,
    /// Output zero point and clamp.
    pub output_quant: OutputQuant,
}

impl Gemm<'_> {
    /// Run the layer on `input` into `output`.
    pub fn run(&self, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        check(self.weights.len() == input.len() * output.len(), "weights")?;
        check(self.channels.fits(output.len()), "bias")?;
        let q = self.output_quant;
        for (o, (out, row)) in output
            .iter_mut()
            .zip(self.weights.chunks_exact(input.len().max(1)))
            .enumerate()
        {
            let (bias, requant) = self.channels.get(o);
            let acc = input.iter().zip(row).fold(bias, |acc, (&x, &w)| {
                acc.wrapping_add((i32::from(x) - self.input_zero_point) * i32::from(w))
            });
            *out = requantize_i8(acc, requant, q.zero_point, q.min, q.max);
        }
        Ok(())
    }
}

/// Fractional bits kept while two rescaled addends are summed.
pub const ADD_FRACTION_BITS: u32 = 16;

/// Element-wise sum of two tensors with their own scales: each addend is rescaled to the output
/// scale with [`ADD_FRACTION_BITS`] extra bits, summed, then rounded (ties toward +inf).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Add {
    /// Zero points of the two inputs.
    pub input_zero_points: [i32; 2],
    /// `input scale / output scale` for each input.
    pub requant: [Requant; 2],
    /// Output zero point and clamp.
    pub output_quant: OutputQuant,
}

impl Add {
    /// Check buffers of `a_len`, `b_len` and `output_len` codes, as [`Add::run`] does.
    pub fn check(&self, a_len: usize, b_len: usize, output_len: usize) -> Result<(), ShapeError> {
        check(a_len == b_len, "input")?;
        check(output_len == a_len, "output")
    }

    /// `output = a + b` in real terms.
    pub fn run(&self, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        self.check(a.len(), b.len(), output.len())?;
        let q = self.output_quant;
        let half = 1i64 << (ADD_FRACTION_BITS - 1);
        let [zero_a, zero_b] = self.input_zero_points;
        let [requant_a, requant_b] = self.requant;
        let term = |v: i8, zero_point: i32, requant: Requant| {
            i64::from(requant.apply((i32::from(v) - zero_point) << ADD_FRACTION_BITS))
        };
        for ((out, &x), &y) in output.iter_mut().zip(a).zip(b) {
            let sum = (term(x, zero_a, requant_a) + term(y, zero_b, requant_b) + half)
                >> ADD_FRACTION_BITS;
            // `max` then `min` as in `requantize_i8`: no panic on an inverted range.
            let code = (sum + i64::from(q.zero_point))
                .max(i64::from(q.min))
                .min(i64::from(q.max));
            *out = code as i8;
        }
        Ok(())
    }
}

/// Mean over each channel's plane: `requant` is `input scale / (output scale * H * W)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GlobalAveragePool {
    /// Channels.
    pub channels: usize,
    /// Zero point of the input.
    pub input_zero_point: i32,
    /// Sum to output scale.
    pub requant: Requant,
    /// Output zero point and clamp.
    pub output_quant: OutputQuant,
}

impl GlobalAveragePool {
    /// `output[c] = mean(input[c, :, :])` in real terms.
    #[inline]
    pub fn run(&self, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        self.run_summing(input, output, |plane| {
            plane
                .iter()
                .fold(0i32, |s, &x| s.wrapping_add(i32::from(x)))
        })
    }

    /// [`GlobalAveragePool::run`] with `codes` summing a plane's codes (modulo 2^32): Σ(x − zp)
    /// as Σx − n·zp, a plain sum of codes, which vectorises.
    #[inline]
    pub(crate) fn run_summing(
        &self,
        input: &[i8],
        output: &mut [i8],
        codes: impl Fn(&[i8]) -> i32,
    ) -> Result<(), ShapeError> {
        self.run_with(input, output, |plane| {
            let count = plane.len() as i32;
            codes(plane).wrapping_sub(count.wrapping_mul(self.input_zero_point))
        })
    }

    /// [`GlobalAveragePool::run`] on `input` read through `table` (see [`WideTable`]; the
    /// input zero point is not used).
    pub fn run_wide(
        &self,
        table: &WideTable,
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        self.run_with(input, output, |plane| {
            plane
                .iter()
                .fold(0i32, |s, &x| s.wrapping_add(wide_value(table, x)))
        })
    }

    /// The layer with `sum` adding up one channel's plane.
    #[inline]
    fn run_with(
        &self,
        input: &[i8],
        output: &mut [i8],
        sum: impl Fn(&[i8]) -> i32,
    ) -> Result<(), ShapeError> {
        check(
            self.channels > 0 && !input.is_empty() && input.len().is_multiple_of(self.channels),
            "input",
        )?;
        check(output.len() == self.channels, "output")?;
        let q = self.output_quant;
        for (out, plane) in output
            .iter_mut()
            .zip(input.chunks_exact(input.len() / self.channels))
        {
            *out = requantize_i8(sum(plane), self.requant, q.zero_point, q.min, q.max);
        }
        Ok(())
    }
}

/// Shapes and window of a 2-D pooling layer (max or average), one window per channel plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolGeometry {
    /// Channels (the same in and out).
    pub channels: usize,
    /// Input height, width.
    pub input: [usize; 2],
    /// Output height, width.
    pub output: [usize; 2],
    /// Kernel height, width.
    pub kernel: [usize; 2],
    /// Vertical, horizontal.
    pub stride: [usize; 2],
    /// Top and left padding (bottom and right follow from the output size).
    pub pad: [usize; 2],
}

impl PoolGeometry {
    /// Check the geometry and both buffers; the input and output plane sizes.
    ///
    /// Every window must hold at least one input position: the first one reaches past the top
    /// (left) padding because `pad < kernel`, and the last one starts before the input ends.
    /// Windows in between start between those two, so they overlap the input too. The checks
    /// also bound `o * stride + kernel` and `size + pad`, so [`pool_window`] cannot overflow.
    pub(crate) fn check(&self, input: &[i8], output: &[i8]) -> Result<(usize, usize), ShapeError> {
        let sizes = [self.input, self.output, self.kernel, self.stride];
        check(
            self.channels > 0 && sizes.as_flattened().iter().all(|&v| v > 0),
            "geometry",
        )?;
        let axes = (self.output.iter().zip(&self.stride).zip(&self.kernel))
            .zip(self.input.iter().zip(&self.pad));
        for (((&output, &stride), &kernel), (&input, &pad)) in axes {
            // `output` is at least 1 (checked above).
            let last_start = (output - 1).checked_mul(stride);
            let last_end = last_start.and_then(|s| s.checked_add(kernel));
            let padded_end = input.checked_add(pad);
            let ok = match (last_start, last_end, padded_end) {
                (Some(start), Some(_), Some(end)) => pad < kernel && start < end,
                _ => false,
            };
            check(ok, "geometry")?;
        }
        let [h, w] = self.input;
        let [oh, ow] = self.output;
        let in_plane = h.checked_mul(w);
        let out_plane = oh.checked_mul(ow);
        let (Some(in_plane), Some(out_plane)) = (in_plane, out_plane) else {
            return Err(ShapeError { buffer: "geometry" });
        };
        let in_len = in_plane.checked_mul(self.channels);
        let out_len = out_plane.checked_mul(self.channels);
        check(in_len == Some(input.len()), "input")?;
        check(out_len == Some(output.len()), "output")?;
        Ok((in_plane, out_plane))
    }
}

/// Input positions `[lo, hi)` covered by window `o` along one axis; never empty once
/// [`PoolGeometry::check`] has passed, which also rules out overflow here.
pub(crate) fn pool_window(
    o: usize,
    stride: usize,
    pad: usize,
    kernel: usize,
    size: usize,
) -> (usize, usize) {
    let start = o * stride;
    (start.max(pad) - pad, (start + kernel).min(size + pad) - pad)
}

/// The codes of one pooling window of `plane` (`w` wide), rows `ys` and columns `xs`.
fn window_codes(
    plane: &[i8],
    w: usize,
    (y0, y1): (usize, usize),
    (x0, x1): (usize, usize),
) -> impl Iterator<Item = i8> + '_ {
    // Rows sliced directly: walking the plane's rows from the top for every window made
    // pooling cost grow with the plane's height.
    (y0..y1)
        .flat_map(move |y| plane.get(y * w + x0..y * w + x1).unwrap_or(&[]))
        .copied()
}

/// Max pooling. Input and output share their quantisation: the scale is positive, so the largest
/// code is the code of the largest value. Padded positions are ignored (ONNX semantics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MaxPool {
    /// Shapes and window.
    pub geometry: PoolGeometry,
}

impl MaxPool {
    /// Run the layer on `input` (`C*H*W` codes) into `output` (`C*OH*OW` codes).
    pub fn run(&self, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        let g = self.geometry;
        let (in_plane, out_plane) = g.check(input, output)?;
        let ([h, w], [_, ow]) = (g.input, g.output);
        for (src, dst) in input
            .chunks_exact(in_plane)
            .zip(output.chunks_exact_mut(out_plane))
        {
            for (oy, row) in dst.chunks_exact_mut(ow).enumerate() {
                let (y0, y1) = pool_window(oy, g.stride[0], g.pad[0], g.kernel[0], h);
                let rows = src.get(y0 * w..y1 * w).unwrap_or(&[]);
                for (ox, out) in row.iter_mut().enumerate() {
                    let (x0, x1) = pool_window(ox, g.stride[1], g.pad[1], g.kernel[1], w);
                    let mut largest = i8::MIN;
                    for line in rows.chunks_exact(w) {
                        for &code in line.get(x0..x1).unwrap_or(&[]) {
                            largest = largest.max(code);
                        }
                    }
                    *out = largest;
                }
            }
        }
        Ok(())
    }
}

/// Largest pooling window [`AveragePool`] takes: `255 * 4096 << 8` still fits an `i32`.
pub const MAX_AVERAGE_POOL_AREA: usize = 4096;

/// Average pooling, exact in integers: the window sum is scaled with 8 extra fraction bits, then
/// divided by the window count rounding half up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AveragePool {
    /// Shapes and window; the kernel area is at most [`MAX_AVERAGE_POOL_AREA`].
    pub geometry: PoolGeometry,
    /// Divide by the whole kernel area, padded positions counting as real zero; otherwise divide
    /// by the number of input positions in the window.
    pub count_include_pad: bool,
    /// Zero point of the input.
    pub input_zero_point: i32,
    /// `input scale / output scale`.
    pub requant: Requant,
    /// Output zero point and clamp.
    pub output_quant: OutputQuant,
}

impl AveragePool {
    /// Run the layer on `input` (`C*H*W` codes) into `output` (`C*OH*OW` codes).
    pub fn run(&self, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        let g = self.geometry;
        let area = g.kernel[0].checked_mul(g.kernel[1]);
        check(area.is_some_and(|a| a <= MAX_AVERAGE_POOL_AREA), "geometry")?;
        let (in_plane, out_plane) = g.check(input, output)?;
        let ([h, w], [_, ow]) = (g.input, g.output);
        let area = (g.kernel[0] * g.kernel[1]) as i64;
        let q = self.output_quant;
        for (src, dst) in input
            .chunks_exact(in_plane)
            .zip(output.chunks_exact_mut(out_plane))
        {
            for (oy, row) in dst.chunks_exact_mut(ow).enumerate() {
                let ys = pool_window(oy, g.stride[0], g.pad[0], g.kernel[0], h);
                for (ox, out) in row.iter_mut().enumerate() {
                    let xs = pool_window(ox, g.stride[1], g.pad[1], g.kernel[1], w);
                    // Wrapping only matters for a zero point outside the int8 range.
                    let (sum, valid) =
                        window_codes(src, w, ys, xs).fold((0i32, 0i64), |(s, n), x| {
                            (
                                s.wrapping_add(i32::from(x).wrapping_sub(self.input_zero_point)),
                                n + 1,
                            )
                        });
                    let count = if self.count_include_pad { area } else { valid };
                    // 8 extra bits keep the division's rounding from compounding apply's.
                    let scaled = i64::from(self.requant.apply(sum.wrapping_shl(8)));
                    let divisor = count.max(1) * 256;
                    let mean = (scaled + divisor / 2).div_euclid(divisor);
                    // `max` then `min` as in `requantize_i8`: no panic on an inverted range.
                    *out = (mean + i64::from(q.zero_point))
                        .max(i64::from(q.min))
                        .min(i64::from(q.max)) as i8;
                }
            }
        }
        Ok(())
    }
}

/// Element-wise requantisation from one scale and zero point to another: a Concat part copied
/// into its slice of the output, or a plain change of quantisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rescale {
    /// Zero point of the input.
    pub input_zero_point: i32,
    /// `input scale / output scale`.
    pub requant: Requant,
    /// Output zero point and clamp.
    pub output_quant: OutputQuant,
}

impl Rescale {
    /// `output = input` in real terms; both buffers have the same length.
    pub fn run(&self, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        check(output.len() == input.len(), "output")?;
        let q = self.output_quant;
        for (out, &x) in output.iter_mut().zip(input) {
            let centred = i32::from(x).wrapping_sub(self.input_zero_point);
            *out = requantize_i8(centred, self.requant, q.zero_point, q.min, q.max);
        }
        Ok(())
    }
}

/// Planes picked from the input: output plane `i` is input plane `indices[i]`, `plane` values
/// each, quantised as the input. A channel Slice or Split, or a channel shuffle (ShuffleNet's
/// Reshape-Transpose-Reshape).
#[derive(Clone, Copy, Debug)]
pub struct Gather<'a> {
    /// Input plane of each output plane.
    pub indices: &'a [u32],
    /// Values per plane.
    pub plane: usize,
}

impl Gather<'_> {
    /// Check the buffers of `input_len` and `output_len` codes and every index: everything
    /// [`Gather::run`] checks, for executors that cannot check as they go.
    pub fn check(&self, input_len: usize, output_len: usize) -> Result<(), ShapeError> {
        let planes = input_len.checked_div(self.plane).unwrap_or(0);
        check(
            self.indices.len().checked_mul(self.plane) == Some(output_len),
            "output",
        )?;
        check(
            self.indices.iter().all(|&i| (i as usize) < planes),
            "indices",
        )
    }

    /// Copy the planes `indices` names from `input` into `output`, in order.
    pub fn run(&self, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        self.check(input.len(), output.len())?;
        let plane = self.plane;
        for (out, &i) in output.chunks_exact_mut(plane.max(1)).zip(self.indices) {
            let start = i as usize * plane;
            let source = input
                .get(start..start + plane)
                .ok_or(ShapeError { buffer: "indices" })?;
            out.copy_from_slice(source);
        }
        Ok(())
    }
}

/// Most values per head an [`Attention`] step mixes: each pixel's weighted sums live on the stack.
pub const MAX_HEAD_DIM: usize = 256;

/// Most query and key planes per head: each pixel's query lives on the stack.
pub const MAX_KEY_DIM: usize = 256;

/// Most pixels an [`Attention`] step attends over: keeps the weighted sums, with their 16
/// fraction bits, inside an `i64`.
pub const MAX_ATTENTION_PLANE: usize = 1 << 22;

/// `exp(0)` in an attention's exponential table; every entry lies in `0..=EXP_ONE`.
pub const EXP_ONE: i32 = 1 << 16;

/// Buffers [`Attention::run_rows`] reuses from call to call.
#[cfg(feature = "std")]
#[derive(Default)]
pub struct AttentionScratch {
    codes: std::vec::Vec<i32>,
    logits: std::vec::Vec<i32>,
    weights: std::vec::Vec<i32>,
}

/// Multi-head self-attention over the pixels of one tensor (ultralytics' C2PSA block):
/// `softmax(scale * q^T k) v` per head, in integers only.
///
/// The input holds, per head, `key_dim` query planes, `key_dim` key planes and `head_dim` value
/// planes of `plane` pixels each, all on one grid; the output holds each head's `head_dim`
/// value planes. For output pixel `n`, the logit of pixel `m` is the exact integer dot product
/// of the query and key codes (zero point removed); its distance below the row's largest,
/// scaled by `logit_to_index`, indexes a table of `exp(-index * step) * EXP_ONE` (the compiler
/// folds the grid's scale, the model's `scale` and the table's step into that requantisation).
/// The weighted mean of the value codes, with 16 fraction bits (truncated toward zero), is
/// requantised to the output grid by `output_requant`. No float at run time, so every
/// executor gives the same bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attention {
    /// Heads.
    pub heads: u32,
    /// Query (and key) planes per head.
    pub key_dim: u32,
    /// Value (and output) planes per head.
    pub head_dim: u32,
    /// Pixels per plane.
    pub plane: u32,
    /// Zero point of the input grid (queries, keys and values alike).
    pub input_zero_point: i32,
    /// From a logit's distance below its row's largest to an index into the table.
    pub logit_to_index: Requant,
    /// From the weighted mean of value codes (16 fraction bits) to output codes.
    pub output_requant: Requant,
    /// Output zero point and clamp.
    pub output_quant: OutputQuant,
}

impl Attention {
    /// The distance, in real logit units, between neighbouring entries of the exponential
    /// table: a weight is off by at most half a step, `exp(1/128)`, 0.8%.
    pub const EXP_STEP: f64 = 1.0 / 64.0;

    /// 1 in the weighted mean that `output_requant` scales: 16 fraction bits.
    pub const MEAN_ONE: i32 = 1 << 16;

    /// Check the buffers of `input_len` and `output_len` codes and the table: everything
    /// [`Attention::run`] relies on, for executors that cannot check as they go.
    pub fn check(
        &self,
        exp_table: &[i32],
        input_len: usize,
        output_len: usize,
    ) -> Result<(), ShapeError> {
        let [heads, key_dim, head_dim, plane] =
            [self.heads, self.key_dim, self.head_dim, self.plane].map(|v| v as usize);
        check(
            heads > 0
                && (-128..=127).contains(&self.input_zero_point)
                && (1..=MAX_KEY_DIM).contains(&key_dim)
                && (1..=MAX_HEAD_DIM).contains(&head_dim)
                && (1..=MAX_ATTENTION_PLANE).contains(&plane),
            "geometry",
        )?;
        let per_head = (2 * key_dim + head_dim).checked_mul(plane);
        check(
            per_head.and_then(|p| p.checked_mul(heads)) == Some(input_len),
            "input",
        )?;
        check(
            (head_dim * plane).checked_mul(heads) == Some(output_len),
            "output",
        )?;
        // A positive first entry (the row's largest logit) keeps every row's sum above zero.
        check(
            exp_table.first().is_some_and(|&e| e > 0)
                && exp_table.iter().all(|e| (0..=EXP_ONE).contains(e)),
            "table",
        )
    }

    /// Attend: `input` as described on [`Attention`], `exp_table` from
    /// `Attention::exp_table` (with `std`). Allocates nothing.
    pub fn run(
        &self,
        exp_table: &[i32],
        input: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        self.check(exp_table, input.len(), output.len())?;
        let [key_dim, head_dim, plane] =
            [self.key_dim, self.head_dim, self.plane].map(|v| v as usize);
        let per_head = (2 * key_dim + head_dim) * plane;
        let zero = self.input_zero_point;
        let code = |x: Option<&i8>| x.map_or(0, |&x| i32::from(x).wrapping_sub(zero));
        for (head, out) in input
            .chunks_exact(per_head)
            .zip(output.chunks_exact_mut(head_dim * plane))
        {
            let (queries, rest) = head.split_at(key_dim * plane);
            let (keys, values) = rest.split_at(key_dim * plane);
            for n in 0..plane {
                let mut query = [0i32; MAX_KEY_DIM];
                for (q, plane) in query.iter_mut().zip(queries.chunks_exact(plane)) {
                    *q = code(plane.get(n));
                }
                // Exact: |logit| <= MAX_KEY_DIM * 255^2.
                let logit = |m: usize| -> i32 {
                    query
                        .iter()
                        .zip(keys.chunks_exact(plane))
                        .fold(0, |sum, (&q, keys)| sum + q * code(keys.get(m)))
                };
                let largest = (0..plane).map(logit).max().unwrap_or(0);
                let mut sums = [0i64; MAX_HEAD_DIM];
                // At least the largest logit's weight, EXP_ONE: never zero.
                let mut total = 0i64;
                for m in 0..plane {
                    let weight = i64::from(self.weight(exp_table, largest - logit(m)));
                    total += weight;
                    for (sum, values) in sums.iter_mut().zip(values.chunks_exact(plane)) {
                        *sum += i64::from(code(values.get(m))) * weight;
                    }
                }
                for (&sum, out) in sums.iter().zip(out.chunks_exact_mut(plane)) {
                    if let Some(out) = out.get_mut(n) {
                        *out = self.output_code(sum, total);
                    }
                }
            }
        }
        Ok(())
    }

    /// The weight of a logit `distance` below its row's largest: its table entry, zero past
    /// the table's end (where the weight rounds to zero).
    fn weight(&self, exp_table: &[i32], distance: i32) -> i32 {
        let index = self.logit_to_index.apply(distance);
        usize::try_from(index)
            .ok()
            .and_then(|i| exp_table.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// The output code of the value sum `sum` weighted by `total`: the mean with
    /// [`Attention::MEAN_ONE`]'s fraction bits (|mean| <= 255 * 2^16, an i32; the division
    /// truncates toward zero), requantised.
    fn output_code(&self, sum: i64, total: i64) -> i8 {
        let mean = (sum * i64::from(Self::MEAN_ONE))
            .checked_div(total)
            .unwrap_or(0) as i32;
        let q = self.output_quant;
        requantize_i8(mean, self.output_requant, q.zero_point, q.min, q.max)
    }

    /// [`Attention::run`]'s result, a pixel's whole row of logits and weights at a time in
    /// `scratch` (grown on first use), so that the inner loops run over contiguous planes and
    /// compute each logit once: the host's kernel, about 4x faster. Integer sums in another
    /// order, so the same bytes.
    #[cfg(feature = "std")]
    pub fn run_rows(
        &self,
        exp_table: &[i32],
        input: &[i8],
        output: &mut [i8],
        scratch: &mut AttentionScratch,
    ) -> Result<(), ShapeError> {
        self.check(exp_table, input.len(), output.len())?;
        let [key_dim, head_dim, plane] =
            [self.key_dim, self.head_dim, self.plane].map(|v| v as usize);
        let AttentionScratch {
            codes,
            logits,
            weights,
        } = scratch;
        codes.clear();
        codes.extend(input.iter().map(|&x| i32::from(x) - self.input_zero_point));
        logits.resize(plane, 0);
        weights.resize(plane, 0);
        for (head, out) in codes
            .chunks_exact((2 * key_dim + head_dim) * plane)
            .zip(output.chunks_exact_mut(head_dim * plane))
        {
            let (queries, rest) = head.split_at(key_dim * plane);
            let (keys, values) = rest.split_at(key_dim * plane);
            for n in 0..plane {
                logits.fill(0);
                for (queries, keys) in queries.chunks_exact(plane).zip(keys.chunks_exact(plane)) {
                    let query = queries.get(n).copied().unwrap_or(0);
                    for (logit, &key) in logits.iter_mut().zip(keys) {
                        *logit += query * key;
                    }
                }
                let largest = logits.iter().copied().max().unwrap_or(0);
                let mut total = 0i64;
                for (weight, &logit) in weights.iter_mut().zip(logits.iter()) {
                    *weight = self.weight(exp_table, largest - logit);
                    total += i64::from(*weight);
                }
                for (values, out) in values.chunks_exact(plane).zip(out.chunks_exact_mut(plane)) {
                    // Each product is at most 255 * EXP_ONE, and 128 of them fit an i32.
                    let sum: i64 = values
                        .chunks(128)
                        .zip(weights.chunks(128))
                        .map(|(v, w)| i64::from(v.iter().zip(w).map(|(&v, &w)| v * w).sum::<i32>()))
                        .sum();
                    if let Some(out) = out.get_mut(n) {
                        *out = self.output_code(sum, total);
                    }
                }
            }
        }
        Ok(())
    }

    /// The exponential table for distances in steps of [`Attention::EXP_STEP`] (real logit
    /// units): entry `i` is `round(exp(-i * EXP_STEP) * EXP_ONE)`, while that is above zero.
    #[cfg(feature = "std")]
    pub fn exp_table() -> std::vec::Vec<i32> {
        (0..)
            .map(|i| (f64::exp(-f64::from(i) * Self::EXP_STEP) * f64::from(EXP_ONE)).round() as i32)
            .take_while(|&e| e > 0)
            .collect()
    }
}

/// Element-wise product of two tensors, `b` optionally broadcast: one value for all of `a`, or
/// one per channel over each channel's plane (squeeze-excitation: `[C,H,W] * [C,1,1]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mul {
    /// Zero points of the two inputs.
    pub input_zero_points: [i32; 2],
    /// `a scale * b scale / output scale`.
    pub requant: Requant,
    /// Output zero point and clamp.
    pub output_quant: OutputQuant,
}

impl Mul {
    /// `output = a * b` in real terms. `b` has `a`'s length, length 1, or one value per
    /// channel (`a.len()` a multiple of `b.len()`: `a[c*plane..(c+1)*plane]` times `b[c]`).
    pub fn run(&self, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        self.run_wide([None, None], a, b, output)
    }

    /// [`Mul::run`] with either input read through its table where it has one (see
    /// [`WideTable`]; that input's zero point is not used).
    pub fn run_wide(
        &self,
        tables: [Option<&WideTable>; 2],
        a: &[i8],
        b: &[i8],
        output: &mut [i8],
    ) -> Result<(), ShapeError> {
        // All three forms are the per-channel one, with a plane of 1 or of all of `a`.
        check(
            !b.is_empty() && b.len() <= a.len() && a.len().is_multiple_of(b.len()),
            "input",
        )?;
        check(output.len() == a.len(), "output")?;
        let plane = a.len() / b.len();
        let [za, zb] = self.input_zero_points;
        let value = |table: Option<&WideTable>, zero_point: i32, code: i8| match table {
            Some(table) => wide_value(table, code),
            None => i32::from(code).wrapping_sub(zero_point),
        };
        let q = self.output_quant;
        for ((outs, xs), &y) in output
            .chunks_exact_mut(plane)
            .zip(a.chunks_exact(plane))
            .zip(b)
        {
            let y = value(tables[1], zb, y);
            for (out, &x) in outs.iter_mut().zip(xs) {
                let product = value(tables[0], za, x).wrapping_mul(y);
                *out = requantize_i8(product, self.requant, q.zero_point, q.min, q.max);
            }
        }
        Ok(())
    }
}

/// A 256-entry lookup table from input code to output code: any element-wise function (Sigmoid,
/// SiLU, Clip, ReLU6, ReLU) between fixed quantisations. Build it with [`build_lut`].
#[derive(Clone, Copy, Debug)]
pub struct Lut<'a> {
    /// Output code for each input code, indexed by the code's bits (`q as u8`).
    pub table: &'a [i8],
}

impl Lut<'_> {
    /// `output[i] = table[input[i] as u8]`; both buffers have the same length.
    pub fn run(&self, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        let Ok(table) = <&[i8; 256]>::try_from(self.table) else {
            return Err(ShapeError { buffer: "table" });
        };
        check(output.len() == input.len(), "output")?;
        for (out, &x) in output.iter_mut().zip(input) {
            // 256 entries: every u8 index is there.
            *out = table.get(usize::from(x as u8)).copied().unwrap_or_default();
        }
        Ok(())
    }
}

/// The [`Lut`] table of `f` from one quantisation to another: entry `q as u8` holds
/// `round(f(in_scale * (q - in_zp)) / out_scale) + out_zp` (half away from zero), clamped to int8.
/// Float, for the compiler and tests; a NaN from `f` maps to the output zero point.
pub fn build_lut(
    input_scale: f32,
    input_zero_point: i32,
    output_scale: f32,
    output_zero_point: i32,
    f: impl Fn(f32) -> f32,
) -> [i8; 256] {
    let mut table = [0i8; 256];
    for (slot, index) in table.iter_mut().zip(0..=u8::MAX) {
        let steps = rounded_steps(index as i8, input_scale, input_zero_point, output_scale, &f);
        let code = steps.saturating_add(i64::from(output_zero_point));
        *slot = code.clamp(i64::from(i8::MIN), i64::from(i8::MAX)) as i8;
    }
    table
}

/// The [`WideTable`] of `f` read from codes of one quantisation: entry `q as u8` holds
/// `round(f(in_scale * (q - in_zp)) / value_scale)` (half away from zero), clamped to
/// ±[`i16::MAX`]. Float, for the compiler and tests; a NaN from `f` maps to 0.
pub fn build_wide_table(
    input_scale: f32,
    input_zero_point: i32,
    value_scale: f32,
    f: impl Fn(f32) -> f32,
) -> WideTable {
    let mut table = [0i16; WIDE_TABLE_LEN];
    for (slot, index) in table.iter_mut().zip(0..=u8::MAX) {
        let steps = rounded_steps(index as i8, input_scale, input_zero_point, value_scale, &f);
        let limit = i64::from(i16::MAX);
        *slot = steps.clamp(-limit, limit) as i16;
    }
    table
}

/// `f` at code `q` in steps of `output_scale`, rounded half away from zero.
fn rounded_steps(
    q: i8,
    input_scale: f32,
    input_zero_point: i32,
    output_scale: f32,
    f: impl Fn(f32) -> f32,
) -> i64 {
    let x = input_scale * (i64::from(q) - i64::from(input_zero_point)) as f32;
    let steps = f64::from(f(x)) / f64::from(output_scale);
    // By hand because core has no f64::round; `as` truncates and saturates (NaN to 0).
    if steps >= 0.0 {
        (steps + 0.5) as i64
    } else {
        (steps - 0.5) as i64
    }
}

/// How [`Resize`] picks its source positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ResizeMode {
    /// ONNX `asymmetric` with `nearest_mode=floor` (PyTorch `Upsample(mode="nearest")`):
    /// `src = floor(dst * in / out)`.
    Nearest,
    /// ONNX `half_pixel` (PyTorch `align_corners=False`): `src = (dst + 0.5) * in / out - 0.5`,
    /// clamped at 0, interpolating between `floor(src)` and the next position (or the last).
    Bilinear,
}

/// Fractional bits of [`Resize`]'s bilinear source positions and weights.
pub const RESIZE_FRACTION_BITS: u32 = 10;

/// Spatial resize of each channel plane; the same quantisation in and out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Resize {
    /// Channels.
    pub channels: usize,
    /// Input height, width.
    pub input: [usize; 2],
    /// Output height, width.
    pub output: [usize; 2],
    /// Nearest or bilinear.
    pub mode: ResizeMode,
}

/// Source positions `i0`, `i1` and the weight of `i1` (of `2^F`) for output position `dst`
/// along one axis; `Resize::run` has checked that `2 * out * in << F` fits a `u64`.
fn resize_source(
    mode: ResizeMode,
    dst: usize,
    size_in: usize,
    size_out: usize,
) -> (usize, usize, i64) {
    const F: u32 = RESIZE_FRACTION_BITS;
    let (dst, n_in, n_out) = (dst as u64, size_in as u64, size_out as u64);
    match mode {
        ResizeMode::Nearest => {
            let i0 = (dst * n_in / n_out) as usize;
            (i0, i0, 0)
        }
        ResizeMode::Bilinear => {
            // (dst + 1/2) * in / out - 1/2 with F fraction bits, clamped at 0.
            let src = (((2 * dst + 1) * n_in) << F) / (2 * n_out);
            let src = src.saturating_sub(1 << (F - 1));
            let i0 = ((src >> F) as usize).min(size_in - 1);
            let i1 = (i0 + 1).min(size_in - 1);
            (i0, i1, (src & ((1 << F) - 1)) as i64)
        }
    }
}

impl Resize {
    /// Run the layer on `input` (`C*H*W` codes) into `output` (`C*OH*OW` codes).
    pub fn run(&self, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        const F: u32 = RESIZE_FRACTION_BITS;
        let sizes = [self.input, self.output];
        check(
            self.channels > 0 && sizes.as_flattened().iter().all(|&v| v > 0),
            "geometry",
        )?;
        // Bounds the fixed-point source positions in `resize_source`.
        for (&input, &output) in self.input.iter().zip(&self.output) {
            let span = (input as u64)
                .checked_mul(output as u64)
                .and_then(|v| v.checked_mul(2 << F));
            check(span.is_some(), "geometry")?;
        }
        let [h, w] = self.input;
        let [oh, ow] = self.output;
        let in_plane = h.checked_mul(w);
        let out_plane = oh.checked_mul(ow);
        let (Some(in_plane), Some(out_plane)) = (in_plane, out_plane) else {
            return Err(ShapeError { buffer: "geometry" });
        };
        check(
            in_plane.checked_mul(self.channels) == Some(input.len()),
            "input",
        )?;
        check(
            out_plane.checked_mul(self.channels) == Some(output.len()),
            "output",
        )?;
        let one = 1i64 << F;
        let half = 1i64 << (2 * F - 1);
        for (src, dst) in input
            .chunks_exact(in_plane)
            .zip(output.chunks_exact_mut(out_plane))
        {
            let at = |y: usize, x: usize| src.get(y * w + x).map_or(0, |&v| i64::from(v));
            for (oy, row) in dst.chunks_exact_mut(ow).enumerate() {
                let (y0, y1, fy) = resize_source(self.mode, oy, h, oh);
                for (ox, out) in row.iter_mut().enumerate() {
                    let (x0, x1, fx) = resize_source(self.mode, ox, w, ow);
                    // Nearest has zero fractions, so this returns its one source code exactly.
                    let top = at(y0, x0) * (one - fx) + at(y0, x1) * fx;
                    let bottom = at(y1, x0) * (one - fx) + at(y1, x1) * fx;
                    let acc = top * (one - fy) + bottom * fy;
                    *out = ((acc + half) >> (2 * F)).clamp(-128, 127) as i8;
                }
            }
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use kestrel_testing::Rng;

    /// Per-channel constants in the split form a plan stores them in.
    pub(crate) struct OwnedChannels {
        bias: Vec<i32>,
        multiplier: Vec<i32>,
        shift: Vec<i8>,
    }

    impl OwnedChannels {
        pub(crate) fn view(&self) -> ChannelQuant<'_> {
            ChannelQuant {
                bias: &self.bias,
                multiplier: &self.multiplier,
                shift: &self.shift,
            }
        }
    }

    pub(crate) fn channels(bias: &[i32], requant: &[Requant]) -> OwnedChannels {
        OwnedChannels {
            bias: bias.to_vec(),
            multiplier: requant.iter().map(|r| r.multiplier).collect(),
            shift: requant.iter().map(|r| r.shift).collect(),
        }
    }

    const FULL: OutputQuant = OutputQuant {
        zero_point: 3,
        min: -128,
        max: 127,
    };

    /// The float result quantised to the output grid, the way an exact computation would land.
    fn expected_code(real: f64, scale: f64, q: OutputQuant) -> i32 {
        ((real / scale).round() as i32 + q.zero_point).clamp(i32::from(q.min), i32::from(q.max))
    }

    #[test]
    fn conv_matches_float_within_one_step_over_random_shapes() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for case in 0..300 {
            let group = [1, 2, 3][rng.below(3)];
            let depthwise = case % 5 == 0;
            let icg = if depthwise { 1 } else { 1 + rng.below(3) };
            let c = icg * group;
            let oc = if depthwise {
                c
            } else {
                group * (1 + rng.below(3))
            };
            let (kh, kw) = (1 + rng.below(3), 1 + rng.below(3));
            let (h, w) = (kh + rng.below(6), kw + rng.below(6));
            let stride = [1 + rng.below(2), 1 + rng.below(2)];
            let dilation = [1 + rng.below(2), 1];
            let pad = [rng.below(2), rng.below(2)];
            let span = |size: usize, k: usize, s: usize, d: usize, p: usize| {
                (size + 2 * p)
                    .checked_sub(d * (k - 1) + 1)
                    .map(|v| v / s + 1)
            };
            let (Some(oh), Some(ow)) = (
                span(h, kh, stride[0], dilation[0], pad[0]),
                span(w, kw, stride[1], 1, pad[1]),
            ) else {
                continue;
            };
            let input: Vec<i8> = (0..c * h * w).map(|_| rng.code()).collect();
            let weights: Vec<i8> = (0..oc * icg * kh * kw)
                .map(|_| rng.code().max(-127))
                .collect();
            let bias: Vec<i32> = (0..oc).map(|_| (rng.draw() % 2001) as i32 - 1000).collect();
            let (sx, zx, sy) = (0.02, -5, 0.9);
            let sw: Vec<f64> = (0..oc)
                .map(|_| 0.001 + (rng.below(100) as f64) * 1e-4)
                .collect();
            let requant: Vec<Requant> = sw
                .iter()
                .map(|s| Requant::from_real(sx * s / sy).unwrap())
                .collect();
            let owned = channels(&bias, &requant);
            let conv = Conv {
                geometry: ConvGeometry {
                    input: [c, h, w],
                    output: [oc, oh, ow],
                    kernel: [kh, kw],
                    stride,
                    pad,
                    dilation,
                    group,
                },
                weights: &weights,
                channels: owned.view(),
                input_zero_point: zx,
                output_quant: FULL,
            };
            let mut output = vec![0i8; oc * oh * ow];
            conv.run(&input, &mut output).unwrap();
            let ocg = oc / group;
            for o in 0..oc {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut real = f64::from(bias[o]) * sx * sw[o];
                        for ic in 0..icg {
                            let ch = (o / ocg) * icg + ic;
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let iy = (oy * stride[0] + ky * dilation[0]) as isize
                                        - pad[0] as isize;
                                    let ix = (ox * stride[1] + kx) as isize - pad[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                        continue;
                                    }
                                    let x = sx
                                        * f64::from(
                                            i32::from(
                                                input[(ch * h + iy as usize) * w + ix as usize],
                                            ) - zx,
                                        );
                                    real += x
                                        * sw[o]
                                        * f64::from(weights[((o * icg + ic) * kh + ky) * kw + kx]);
                                }
                            }
                        }
                        let got = i32::from(output[(o * oh + oy) * ow + ox]);
                        let want = expected_code(real, sy, FULL);
                        assert!(
                            (got - want).abs() <= 1,
                            "case {case}: out {o},{oy},{ox}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn add_gemm_and_pool_match_float() {
        let mut rng = Rng(99);
        let a: Vec<i8> = (0..500).map(|_| rng.code()).collect();
        let b: Vec<i8> = (0..500).map(|_| rng.code()).collect();
        let (sa, za, sb, zb, so) = (0.05, 7, 0.02, -20, 0.06);
        let add = Add {
            input_zero_points: [za, zb],
            requant: [
                Requant::from_real(sa / so).unwrap(),
                Requant::from_real(sb / so).unwrap(),
            ],
            output_quant: FULL,
        };
        let mut out = vec![0i8; 500];
        add.run(&a, &b, &mut out).unwrap();
        for i in 0..500 {
            let real = sa * f64::from(i32::from(a[i]) - za) + sb * f64::from(i32::from(b[i]) - zb);
            assert!(
                (i32::from(out[i]) - expected_code(real, so, FULL)).abs() <= 1,
                "add {i}"
            );
        }

        let relu = OutputQuant {
            zero_point: -128,
            min: -128,
            max: 127,
        };
        let pool = GlobalAveragePool {
            channels: 5,
            input_zero_point: za,
            requant: Requant::from_real(sa / (so * 100.0)).unwrap(),
            output_quant: relu,
        };
        let mut pooled = [0i8; 5];
        pool.run(&a, &mut pooled).unwrap();
        for ch in 0..5 {
            let mean = a[ch * 100..(ch + 1) * 100]
                .iter()
                .map(|&x| sa * f64::from(i32::from(x) - za))
                .sum::<f64>()
                / 100.0;
            assert!(
                (i32::from(pooled[ch]) - expected_code(mean, so, relu)).abs() <= 1,
                "pool {ch}"
            );
        }

        let weights: Vec<i8> = (0..50 * 10).map(|_| rng.code().max(-127)).collect();
        let bias: Vec<i32> = (0..10).map(|i| i * 100 - 500).collect();
        let requant = vec![Requant::from_real(sa * 0.01 / so).unwrap(); 10];
        let owned = channels(&bias, &requant);
        let gemm = Gemm {
            weights: &weights,
            channels: owned.view(),
            input_zero_point: za,
            output_quant: FULL,
        };
        let mut logits = [0i8; 10];
        gemm.run(&a[..50], &mut logits).unwrap();
        for o in 0..10 {
            let real = f64::from(bias[o]) * sa * 0.01
                + (0..50)
                    .map(|i| {
                        sa * f64::from(i32::from(a[i]) - za) * 0.01 * f64::from(weights[o * 50 + i])
                    })
                    .sum::<f64>();
            assert!(
                (i32::from(logits[o]) - expected_code(real, so, FULL)).abs() <= 1,
                "gemm {o}"
            );
        }
    }

    #[test]
    fn wrong_buffers_are_errors_not_panics() {
        let requant = [Requant::from_real(0.5).unwrap()];
        let geometry = ConvGeometry {
            input: [1, 3, 3],
            output: [1, 3, 3],
            kernel: [3, 3],
            stride: [1, 1],
            pad: [1, 1],
            dilation: [1, 1],
            group: 1,
        };
        let owned = channels(&[0], &requant);
        let conv = Conv {
            geometry,
            weights: &[1; 9],
            channels: owned.view(),
            input_zero_point: 0,
            output_quant: FULL,
        };
        assert_eq!(
            conv.run(&[0; 8], &mut [0; 9]),
            Err(ShapeError { buffer: "input" })
        );
        assert_eq!(
            conv.run(&[0; 9], &mut [0; 4]),
            Err(ShapeError { buffer: "output" })
        );
        assert_eq!(
            Conv {
                geometry: ConvGeometry {
                    group: 2,
                    ..geometry
                },
                ..conv
            }
            .run(&[0; 9], &mut [0; 9]),
            Err(ShapeError { buffer: "geometry" })
        );
        assert_eq!(
            Conv {
                geometry: ConvGeometry {
                    stride: [0, 1],
                    ..geometry
                },
                ..conv
            }
            .run(&[0; 9], &mut [0; 9]),
            Err(ShapeError { buffer: "geometry" })
        );
        let pool = GlobalAveragePool {
            channels: 2,
            input_zero_point: 0,
            requant: requant[0],
            output_quant: FULL,
        };
        assert_eq!(
            pool.run(&[], &mut [0; 2]),
            Err(ShapeError { buffer: "input" })
        );
        assert_eq!(
            pool.run(&[0; 5], &mut [0; 2]),
            Err(ShapeError { buffer: "input" })
        );
        let add = Add {
            input_zero_points: [0, 0],
            requant: [requant[0]; 2],
            output_quant: FULL,
        };
        assert_eq!(
            add.run(&[0; 3], &[0; 2], &mut [0; 3]),
            Err(ShapeError { buffer: "input" })
        );
    }

    /// A random pool geometry over small planes: some with bottom/right overhang (ceil mode),
    /// some with a window entirely in the padding, which the kernels must refuse.
    fn random_pool_geometry(rng: &mut Rng) -> PoolGeometry {
        let kernel = [1 + rng.below(3), 1 + rng.below(3)];
        let stride = [1 + rng.below(2), 1 + rng.below(3)];
        let pad = [rng.below(kernel[0]), rng.below(kernel[1])];
        let input = [1 + rng.below(6), 1 + rng.below(6)];
        let output = [0, 1].map(|a| {
            let floor = (input[a] + 2 * pad[a]).saturating_sub(kernel[a]) / stride[a] + 1;
            floor + usize::from(rng.below(4) == 0)
        });
        PoolGeometry {
            channels: 1 + rng.below(3),
            input,
            output,
            kernel,
            stride,
            pad,
        }
    }

    /// Input positions of window `(oy, ox)`, clipped to the input (the float references' view).
    fn window_positions(g: &PoolGeometry, oy: usize, ox: usize) -> Vec<(usize, usize)> {
        let mut positions = Vec::new();
        for ky in 0..g.kernel[0] {
            for kx in 0..g.kernel[1] {
                let iy = (oy * g.stride[0] + ky) as isize - g.pad[0] as isize;
                let ix = (ox * g.stride[1] + kx) as isize - g.pad[1] as isize;
                if iy >= 0 && ix >= 0 && (iy as usize) < g.input[0] && (ix as usize) < g.input[1] {
                    positions.push((iy as usize, ix as usize));
                }
            }
        }
        positions
    }

    fn has_empty_window(g: &PoolGeometry) -> bool {
        (0..g.output[0]).any(|oy| (0..g.output[1]).any(|ox| window_positions(g, oy, ox).is_empty()))
    }

    /// The pooled code is the requantised `Σ(x − zp)` exactly (not only near the float mean),
    /// for any zero point and plane size.
    #[test]
    fn global_average_pool_sums_exactly() {
        let mut rng = Rng(0x6a9_2026_1202);
        for _ in 0..200 {
            let (channels, plane) = (1 + rng.below(8), 1 + rng.below(3000));
            let input: Vec<i8> = (0..channels * plane).map(|_| rng.draw() as i8).collect();
            let pool = GlobalAveragePool {
                channels,
                input_zero_point: rng.below(256) as i32 - 128,
                requant: Requant::from_real(2f64.powf(-(rng.below(1600) as f64) / 100.0)).unwrap(),
                output_quant: FULL,
            };
            let mut output = vec![0i8; channels];
            pool.run(&input, &mut output).unwrap();
            for (code, values) in output.iter().zip(input.chunks_exact(plane)) {
                let sum: i64 = values
                    .iter()
                    .map(|&x| i64::from(x) - i64::from(pool.input_zero_point))
                    .sum();
                let q = pool.output_quant;
                let expected = requantize_i8(sum as i32, pool.requant, q.zero_point, q.min, q.max);
                assert_eq!(*code, expected, "{pool:?} plane {plane}");
            }
        }
    }

    #[test]
    fn max_pool_matches_float_exactly_over_random_shapes() {
        let mut rng = Rng(0x0bad_cafe_f00d_0001);
        let (mut checked, mut rejected) = (0, 0);
        for case in 0..400 {
            let g = random_pool_geometry(&mut rng);
            let [h, w] = g.input;
            let [oh, ow] = g.output;
            let input: Vec<i8> = (0..g.channels * h * w).map(|_| rng.code()).collect();
            let mut output = vec![0i8; g.channels * oh * ow];
            let result = MaxPool { geometry: g }.run(&input, &mut output);
            if has_empty_window(&g) {
                assert_eq!(
                    result,
                    Err(ShapeError { buffer: "geometry" }),
                    "case {case}"
                );
                rejected += 1;
                continue;
            }
            assert_eq!(result, Ok(()), "case {case}: {g:?}");
            checked += 1;
            for c in 0..g.channels {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let want = window_positions(&g, oy, ox)
                            .iter()
                            .map(|&(iy, ix)| input[(c * h + iy) * w + ix])
                            .max()
                            .unwrap();
                        assert_eq!(output[(c * oh + oy) * ow + ox], want, "case {case}");
                    }
                }
            }
        }
        assert!(
            checked > 200 && rejected > 10,
            "{checked} valid, {rejected} refused geometries"
        );
    }

    #[test]
    fn average_pool_matches_float_within_one_step_with_and_without_pad_counting() {
        let mut rng = Rng(0x5eed_0000_0000_a7e1);
        let mut padded = [0usize; 2];
        for case in 0..400 {
            let g = random_pool_geometry(&mut rng);
            if has_empty_window(&g) {
                continue;
            }
            let [h, w] = g.input;
            let [oh, ow] = g.output;
            let input: Vec<i8> = (0..g.channels * h * w).map(|_| rng.code()).collect();
            let (sx, zx) = (0.01 + rng.below(100) as f64 * 1e-3, rng.code() as i32);
            let so = sx * (0.3 + rng.below(100) as f64 * 0.01);
            let q = if case % 3 == 0 {
                OutputQuant {
                    zero_point: -100,
                    min: -100,
                    max: 127,
                }
            } else {
                FULL
            };
            for count_include_pad in [false, true] {
                let pool = AveragePool {
                    geometry: g,
                    count_include_pad,
                    input_zero_point: zx,
                    requant: Requant::from_real(sx / so).unwrap(),
                    output_quant: q,
                };
                let mut output = vec![0i8; g.channels * oh * ow];
                pool.run(&input, &mut output).unwrap();
                for c in 0..g.channels {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let positions = window_positions(&g, oy, ox);
                            let sum: f64 = positions
                                .iter()
                                .map(|&(iy, ix)| {
                                    sx * f64::from(i32::from(input[(c * h + iy) * w + ix]) - zx)
                                })
                                .sum();
                            let area = g.kernel[0] * g.kernel[1];
                            if positions.len() < area {
                                padded[usize::from(count_include_pad)] += 1;
                            }
                            let count = if count_include_pad {
                                area
                            } else {
                                positions.len()
                            };
                            let got = i32::from(output[(c * oh + oy) * ow + ox]);
                            let want = expected_code(sum / count as f64, so, q);
                            assert!(
                                (got - want).abs() <= 1,
                                "case {case} ({count_include_pad}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
        assert!(
            padded.iter().all(|&n| n > 100),
            "padding exercised: {padded:?}"
        );
    }

    #[test]
    fn average_pool_rounds_the_mean_half_up() {
        // Scale 1: the mean of 1 and 2 is 1.5, of -1 and -2 is -1.5; half up gives 2 and -1.
        let pool = AveragePool {
            geometry: PoolGeometry {
                channels: 2,
                input: [1, 2],
                output: [1, 1],
                kernel: [1, 2],
                stride: [1, 1],
                pad: [0, 0],
            },
            count_include_pad: false,
            input_zero_point: 0,
            requant: Requant::from_real(1.0).unwrap(),
            output_quant: OutputQuant {
                zero_point: 0,
                min: -128,
                max: 127,
            },
        };
        let mut out = [0i8; 2];
        pool.run(&[1, 2, -1, -2], &mut out).unwrap();
        assert_eq!(out, [2, -1]);
    }

    #[test]
    fn rescale_matches_float_within_one_step() {
        let mut rng = Rng(0x7e5c_a1e0_0000_0003);
        for case in 0..300 {
            let input: Vec<i8> = (0..1 + rng.below(64)).map(|_| rng.code()).collect();
            let (sx, zx) = (0.001 + rng.below(1000) as f64 * 1e-4, rng.code() as i32);
            let so = 0.001 + rng.below(1000) as f64 * 1e-4;
            let q = OutputQuant {
                zero_point: rng.code() as i32,
                min: -128,
                max: 127,
            };
            let rescale = Rescale {
                input_zero_point: zx,
                requant: Requant::from_real(sx / so).unwrap(),
                output_quant: q,
            };
            let mut output = vec![0i8; input.len()];
            rescale.run(&input, &mut output).unwrap();
            for (i, (&x, &y)) in input.iter().zip(&output).enumerate() {
                let want = expected_code(sx * f64::from(i32::from(x) - zx), so, q);
                assert!((i32::from(y) - want).abs() <= 1, "case {case}: {i}");
            }
        }
    }

    #[test]
    fn mul_matches_float_within_one_step_in_every_broadcast_form() {
        let mut rng = Rng(0x0123_4567_89ab_cdef);
        let mut forms = [0usize; 3];
        for case in 0..300 {
            let (c, plane) = (1 + rng.below(5), 1 + rng.below(20));
            let a: Vec<i8> = (0..c * plane).map(|_| rng.code()).collect();
            let form = case % 3;
            let b_len = [c * plane, 1, c][form];
            forms[form] += 1;
            let b: Vec<i8> = (0..b_len).map(|_| rng.code()).collect();
            let (sa, za) = (0.01 + rng.below(100) as f64 * 1e-3, rng.code() as i32);
            let (sb, zb) = (0.001 + rng.below(100) as f64 * 1e-4, rng.code() as i32);
            let so = sa * sb * (10.0 + rng.below(200) as f64);
            let mul = Mul {
                input_zero_points: [za, zb],
                requant: Requant::from_real(sa * sb / so).unwrap(),
                output_quant: FULL,
            };
            let mut output = vec![0i8; a.len()];
            mul.run(&a, &b, &mut output).unwrap();
            for i in 0..a.len() {
                let y = match form {
                    0 => b[i],
                    1 => b[0],
                    _ => b[i / plane],
                };
                let real = sa * f64::from(i32::from(a[i]) - za) * sb * f64::from(i32::from(y) - zb);
                let want = expected_code(real, so, FULL);
                assert!(
                    (i32::from(output[i]) - want).abs() <= 1,
                    "case {case} form {form}: {i}"
                );
            }
        }
        // Squeeze-excitation shape by hand: [2, 1, 3] * [2, 1, 1], every scale 1.
        let mul = Mul {
            input_zero_points: [0, 0],
            requant: Requant::from_real(1.0).unwrap(),
            output_quant: OutputQuant {
                zero_point: 0,
                min: -128,
                max: 127,
            },
        };
        let mut out = [0i8; 6];
        mul.run(&[1, 2, 3, 4, 5, 6], &[2, -3], &mut out).unwrap();
        assert_eq!(out, [2, 4, 6, -12, -15, -18]);
    }

    #[test]
    fn lut_matches_build_lut_and_float_functions() {
        let (sx, zx, sy, zy) = (0.05f32, -10, 1.0f32 / 256.0, -128);
        let sigmoid = build_lut(sx, zx, sy, zy, |x| 1.0 / (1.0 + (-x).exp()));
        for q in i8::MIN..=i8::MAX {
            let x = f64::from(sx) * f64::from(i32::from(q) - zx);
            let want = expected_code(
                1.0 / (1.0 + (-x).exp()),
                f64::from(sy),
                OutputQuant {
                    zero_point: zy,
                    min: -128,
                    max: 127,
                },
            );
            let got = i32::from(sigmoid[usize::from(q as u8)]);
            assert!((got - want).abs() <= 1, "sigmoid({x}): {got} vs {want}");
        }

        // ReLU6 in one shared quantisation is exact: clamp the code to [zp, zp + 6 / scale].
        let (s, z) = (0.05f32, -20);
        let relu6 = build_lut(s, z, s, z, |x| x.clamp(0.0, 6.0));
        for q in i8::MIN..=i8::MAX {
            let want = i32::from(q).clamp(z, z + 120).clamp(-128, 127);
            assert_eq!(i32::from(relu6[usize::from(q as u8)]), want, "relu6({q})");
        }

        let mut rng = Rng(0x1007_0000_0000_0005);
        for (i, table) in [sigmoid, relu6].iter().enumerate() {
            let input: Vec<i8> = (0..1000).map(|_| rng.code()).collect();
            let mut output = vec![0i8; input.len()];
            Lut { table }.run(&input, &mut output).unwrap();
            for (&x, &y) in input.iter().zip(&output) {
                let f: fn(f32) -> f32 = if i == 0 {
                    |x| 1.0 / (1.0 + (-x).exp())
                } else {
                    |x| x.clamp(0.0, 6.0)
                };
                let (out_scale, out_zp) = if i == 0 { (sy, zy) } else { (s, z) };
                let (in_scale, in_zp) = if i == 0 { (sx, zx) } else { (s, z) };
                let one = build_lut(in_scale, in_zp, out_scale, out_zp, f);
                assert_eq!(y, one[usize::from(x as u8)], "lut {i} at {x}");
            }
        }

        // Hand-made ends: NaN goes to the zero point, infinities saturate.
        let odd = build_lut(1.0, 0, 1.0, 5, |x| match x as i32 {
            0 => f32::NAN,
            1 => f32::INFINITY,
            2 => f32::NEG_INFINITY,
            _ => x,
        });
        assert_eq!(&odd[..3], &[5, 127, -128]);
    }

    /// Resize with floats: the positions and weights ONNX (and PyTorch) define.
    fn resize_reference(
        mode: ResizeMode,
        plane: &[i8],
        [h, w]: [usize; 2],
        [oh, ow]: [usize; 2],
        oy: usize,
        ox: usize,
    ) -> f64 {
        let source = |dst: usize, n_in: usize, n_out: usize| -> (usize, usize, f64) {
            match mode {
                ResizeMode::Nearest => {
                    let i = (dst as f64 * n_in as f64 / n_out as f64).floor() as usize;
                    (i, i, 0.0)
                }
                ResizeMode::Bilinear => {
                    let src = ((dst as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5).max(0.0);
                    let i0 = src.floor() as usize;
                    (i0, (i0 + 1).min(n_in - 1), src - i0 as f64)
                }
            }
        };
        let (y0, y1, fy) = source(oy, h, oh);
        let (x0, x1, fx) = source(ox, w, ow);
        let at = |y: usize, x: usize| f64::from(plane[y * w + x]);
        let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
        let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
        top * (1.0 - fy) + bottom * fy
    }

    #[test]
    fn resize_matches_float_nearest_exactly_and_bilinear_within_one_step() {
        let mut rng = Rng(0x4e51_2e00_0000_0007);
        for case in 0..400 {
            let mode = if case % 2 == 0 {
                ResizeMode::Nearest
            } else {
                ResizeMode::Bilinear
            };
            let input_size = [1 + rng.below(7), 1 + rng.below(7)];
            // Integer upsampling, downsampling and odd ratios.
            let output_size = [0, 1].map(|a| match rng.below(3) {
                0 => input_size[a] * (1 + rng.below(3)),
                _ => 1 + rng.below(15),
            });
            let resize = Resize {
                channels: 1 + rng.below(3),
                input: input_size,
                output: output_size,
                mode,
            };
            let [h, w] = input_size;
            let [oh, ow] = output_size;
            let input: Vec<i8> = (0..resize.channels * h * w).map(|_| rng.code()).collect();
            let mut output = vec![0i8; resize.channels * oh * ow];
            resize.run(&input, &mut output).unwrap();
            for c in 0..resize.channels {
                let plane = &input[c * h * w..(c + 1) * h * w];
                for oy in 0..oh {
                    for ox in 0..ow {
                        let real = resize_reference(mode, plane, [h, w], [oh, ow], oy, ox);
                        let got = f64::from(output[(c * oh + oy) * ow + ox]);
                        match mode {
                            ResizeMode::Nearest => assert_eq!(got, real, "case {case}"),
                            ResizeMode::Bilinear => assert!(
                                (got - real.round()).abs() <= 1.0,
                                "case {case}: {got} vs {real}"
                            ),
                        }
                    }
                }
            }
        }
        // PyTorch's 2x upsampling of [0, 100] along one axis.
        let mut out = [0i8; 4];
        let row = |mode| Resize {
            channels: 1,
            input: [1, 2],
            output: [1, 4],
            mode,
        };
        row(ResizeMode::Bilinear).run(&[0, 100], &mut out).unwrap();
        assert_eq!(out, [0, 25, 75, 100]);
        row(ResizeMode::Nearest).run(&[0, 100], &mut out).unwrap();
        assert_eq!(out, [0, 0, 100, 100]);
    }

    #[test]
    fn pools_refuse_wrong_buffers_and_bad_geometry() {
        let geometry = PoolGeometry {
            channels: 2,
            input: [4, 4],
            output: [2, 2],
            kernel: [2, 2],
            stride: [2, 2],
            pad: [0, 0],
        };
        let max = MaxPool { geometry };
        let avg = AveragePool {
            geometry,
            count_include_pad: false,
            input_zero_point: 0,
            requant: Requant::from_real(1.0).unwrap(),
            output_quant: FULL,
        };
        let err = |buffer| Err(ShapeError { buffer });
        let run_both = |g: PoolGeometry, input: &[i8], output: &mut [i8]| {
            let a = MaxPool { geometry: g }.run(input, output);
            let b = AveragePool { geometry: g, ..avg }.run(input, output);
            assert_eq!(a, b, "{g:?}");
            a
        };
        assert_eq!(max.run(&[0; 32], &mut [0; 8]), Ok(()));
        assert_eq!(avg.run(&[0; 32], &mut [0; 8]), Ok(()));
        assert_eq!(run_both(geometry, &[0; 31], &mut [0; 8]), err("input"));
        assert_eq!(run_both(geometry, &[0; 32], &mut [0; 9]), err("output"));
        let bad = [
            PoolGeometry {
                pad: [2, 0],
                ..geometry
            },
            PoolGeometry {
                output: [3, 2],
                ..geometry
            },
            PoolGeometry {
                stride: [0, 2],
                ..geometry
            },
            PoolGeometry {
                kernel: [2, 0],
                ..geometry
            },
            PoolGeometry {
                channels: 0,
                ..geometry
            },
            PoolGeometry {
                input: [0, 4],
                ..geometry
            },
            PoolGeometry {
                output: [2, 0],
                ..geometry
            },
            PoolGeometry {
                output: [usize::MAX, 2],
                ..geometry
            },
            PoolGeometry {
                input: [usize::MAX, 4],
                ..geometry
            },
            PoolGeometry {
                kernel: [usize::MAX, 2],
                pad: [usize::MAX - 1, 0],
                ..geometry
            },
        ];
        for g in bad {
            assert_eq!(run_both(g, &[0; 32], &mut [0; 8]), err("geometry"), "{g:?}");
        }
        // Only average pooling limits the kernel area.
        let wide = PoolGeometry {
            input: [65, 65],
            output: [1, 1],
            kernel: [65, 65],
            stride: [1, 1],
            channels: 1,
            pad: [0, 0],
        };
        let input = vec![0i8; 65 * 65];
        assert_eq!(MaxPool { geometry: wide }.run(&input, &mut [0]), Ok(()));
        assert_eq!(
            AveragePool {
                geometry: wide,
                ..avg
            }
            .run(&input, &mut [0]),
            err("geometry")
        );
    }

    /// Real softmax attention over the same codes, rounded to the output grid: the integer
    /// kernel lands within a code, and mostly on it.
    #[test]
    fn attention_matches_float_softmax_attention() {
        let (heads, key_dim, head_dim, plane) = (2usize, 4usize, 3usize, 30usize);
        let (scale, zero, model_scale) = (0.06f64, 5i32, 1.0 / (key_dim as f64).sqrt());
        let (out_scale, out_q) = (0.02f64, FULL);
        let attention = Attention {
            heads: heads as u32,
            key_dim: key_dim as u32,
            head_dim: head_dim as u32,
            plane: plane as u32,
            input_zero_point: zero,
            logit_to_index: Requant::from_real(scale * scale * model_scale / Attention::EXP_STEP)
                .unwrap(),
            output_requant: Requant::from_real(scale / out_scale / f64::from(Attention::MEAN_ONE))
                .unwrap(),
            output_quant: out_q,
        };
        let table = Attention::exp_table();
        assert_eq!(table[0], EXP_ONE);
        let mut rng = Rng(0xa77e);
        let input: Vec<i8> = (0..heads * (2 * key_dim + head_dim) * plane)
            .map(|_| rng.code())
            .collect();
        let mut output = vec![0i8; heads * head_dim * plane];
        attention.run(&table, &input, &mut output).unwrap();
        let real = |i: usize| scale * f64::from(i32::from(input[i]) - zero);
        let (mut exact, mut within_one) = (0, 0);
        for h in 0..heads {
            let base = h * (2 * key_dim + head_dim) * plane;
            let [q, k, v] = [0, key_dim, 2 * key_dim].map(|p| base + p * plane);
            for n in 0..plane {
                let logits: Vec<f64> = (0..plane)
                    .map(|m| {
                        model_scale
                            * (0..key_dim)
                                .map(|c| real(q + c * plane + n) * real(k + c * plane + m))
                                .sum::<f64>()
                    })
                    .collect();
                let top = logits.iter().cloned().fold(f64::MIN, f64::max);
                let weights: Vec<f64> = logits.iter().map(|l| (l - top).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..head_dim {
                    let mean: f64 = (0..plane)
                        .map(|m| weights[m] * real(v + d * plane + m))
                        .sum::<f64>()
                        / total;
                    let expected = expected_code(mean, out_scale, out_q);
                    let got = i32::from(output[(h * head_dim + d) * plane + n]);
                    assert!(
                        (got - expected).abs() <= 1,
                        "head {h} pixel {n} plane {d}: {got} vs {expected}"
                    );
                    exact += usize::from(got == expected);
                    within_one += 1;
                }
            }
        }
        assert!(
            exact * 10 >= within_one * 8,
            "{exact} of {within_one} exact"
        );
    }

    /// The host's row kernel gives the generic kernel's bytes, on random geometry, codes and
    /// scales, with one scratch reused across all of them.
    #[test]
    fn attention_rows_match_the_generic_kernel_bit_for_bit() {
        let mut rng = Rng(0x5c0f);
        let table = Attention::exp_table();
        let mut scratch = AttentionScratch::default();
        for _ in 0..200 {
            let [heads, key_dim, head_dim, plane] = [
                1 + rng.below(3),
                1 + rng.below(40),
                1 + rng.below(70),
                1 + rng.below(90),
            ];
            let scale = |rng: &mut Rng, lowest: f64, octaves: usize| {
                Requant::from_real(2f64.powf(lowest + rng.below(octaves * 100) as f64 / 100.0))
                    .unwrap()
            };
            let attention = Attention {
                heads: heads as u32,
                key_dim: key_dim as u32,
                head_dim: head_dim as u32,
                plane: plane as u32,
                input_zero_point: rng.below(256) as i32 - 128,
                logit_to_index: scale(&mut rng, -14.0, 14),
                output_requant: scale(&mut rng, -22.0, 10),
                output_quant: FULL,
            };
            let input: Vec<i8> = (0..heads * (2 * key_dim + head_dim) * plane)
                .map(|_| rng.code())
                .collect();
            let mut want = vec![0i8; heads * head_dim * plane];
            let mut got = want.clone();
            attention.run(&table, &input, &mut want).unwrap();
            attention
                .run_rows(&table, &input, &mut got, &mut scratch)
                .unwrap();
            assert_eq!(got, want, "{attention:?}");
        }
        let wrong = Attention::exp_table()[..0].to_vec();
        assert!(Attention {
            heads: 1,
            key_dim: 1,
            head_dim: 1,
            plane: 1,
            input_zero_point: 0,
            logit_to_index: Requant::from_real(1.0).unwrap(),
            output_requant: Requant::from_real(1.0).unwrap(),
            output_quant: FULL,
        }
        .run_rows(&wrong, &[0; 3], &mut [0], &mut scratch)
        .is_err());
    }

    #[test]
    fn attention_refuses_what_it_cannot_run() {
        let attention = Attention {
            heads: 1,
            key_dim: 2,
            head_dim: 1,
            plane: 3,
            input_zero_point: 0,
            logit_to_index: Requant::from_real(1.0).unwrap(),
            output_requant: Requant::from_real(1.0 / f64::from(Attention::MEAN_ONE)).unwrap(),
            output_quant: FULL,
        };
        let table = Attention::exp_table();
        let input = [1i8; 15];
        let mut output = [0i8; 3];
        assert_eq!(attention.run(&table, &input, &mut output), Ok(()));
        // Equal logits: each pixel the mean of equal values, 1, plus the zero point.
        assert_eq!(output, [4; 3]);
        let err = |buffer| Err(ShapeError { buffer });
        assert_eq!(
            attention.run(&table, &input[1..], &mut output),
            err("input")
        );
        assert_eq!(attention.run(&table, &input, &mut [0; 4]), err("output"));
        assert_eq!(attention.run(&[0, 1], &input, &mut output), err("table"));
        assert_eq!(attention.run(&[], &input, &mut output), err("table"));
        assert_eq!(
            attention.run(&[EXP_ONE + 1], &input, &mut output),
            err("table")
        );
        for bad in [
            Attention {
                heads: 0,
                ..attention
            },
            Attention {
                input_zero_point: 128,
                ..attention
            },
            Attention {
                key_dim: MAX_KEY_DIM as u32 + 1,
                ..attention
            },
            Attention {
                head_dim: 0,
                ..attention
            },
        ] {
            assert!(bad.run(&table, &input, &mut output).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn gather_copies_the_planes_it_names_and_refuses_others() {
        let input: Vec<i8> = (0..12).collect();
        // Three planes of 4: a shuffle of the last two, the first one twice.
        let gather = Gather {
            indices: &[2, 1, 0, 0],
            plane: 4,
        };
        let mut output = [0i8; 16];
        gather.run(&input, &mut output).unwrap();
        assert_eq!(output, [8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3, 0, 1, 2, 3]);
        let err = |buffer| Err(ShapeError { buffer });
        assert_eq!(gather.run(&input, &mut [0; 12]), err("output"));
        assert_eq!(gather.run(&input[..8], &mut output), err("indices"));
        let past = Gather {
            indices: &[3],
            plane: 4,
        };
        assert_eq!(past.run(&input, &mut [0; 4]), err("indices"));
        let empty = Gather {
            indices: &[0],
            plane: 0,
        };
        assert_eq!(empty.run(&input, &mut []), err("indices"));
    }

    #[test]
    fn element_wise_kernels_refuse_wrong_buffers() {
        let err = |buffer| Err(ShapeError { buffer });
        let requant = Requant::from_real(0.5).unwrap();
        let rescale = Rescale {
            input_zero_point: 0,
            requant,
            output_quant: FULL,
        };
        assert_eq!(rescale.run(&[0; 3], &mut [0; 2]), err("output"));
        assert_eq!(rescale.run(&[], &mut []), Ok(()));

        let mul = Mul {
            input_zero_points: [i32::MIN, i32::MAX],
            requant,
            output_quant: FULL,
        };
        assert_eq!(mul.run(&[0; 6], &[0; 4], &mut [0; 6]), err("input"));
        assert_eq!(mul.run(&[0; 6], &[], &mut [0; 6]), err("input"));
        assert_eq!(mul.run(&[0; 2], &[0; 4], &mut [0; 2]), err("input"));
        assert_eq!(mul.run(&[], &[0; 1], &mut []), err("input"));
        assert_eq!(mul.run(&[0; 6], &[0; 3], &mut [0; 5]), err("output"));
        assert_eq!(
            mul.run(&[0; 6], &[0; 3], &mut [0; 6]),
            Ok(()),
            "extreme zero points"
        );

        let table = [0i8; 256];
        assert_eq!(
            Lut {
                table: &table[..255]
            }
            .run(&[0], &mut [0]),
            err("table")
        );
        assert_eq!(Lut { table: &[0; 257] }.run(&[0], &mut [0]), err("table"));
        assert_eq!(Lut { table: &table }.run(&[0; 2], &mut [0]), err("output"));
    }

    #[test]
    fn resize_refuses_wrong_buffers_and_bad_geometry() {
        let err = |buffer| Err(ShapeError { buffer });
        let resize = Resize {
            channels: 2,
            input: [2, 3],
            output: [4, 6],
            mode: ResizeMode::Bilinear,
        };
        assert_eq!(resize.run(&[0; 12], &mut [0; 48]), Ok(()));
        assert_eq!(resize.run(&[0; 11], &mut [0; 48]), err("input"));
        assert_eq!(resize.run(&[0; 12], &mut [0; 47]), err("output"));
        let bad = [
            Resize {
                channels: 0,
                ..resize
            },
            Resize {
                input: [0, 3],
                ..resize
            },
            Resize {
                output: [4, 0],
                ..resize
            },
            Resize {
                input: [1, usize::MAX],
                ..resize
            },
            Resize {
                output: [usize::MAX / 2, 6],
                ..resize
            },
        ];
        for r in bad {
            for mode in [ResizeMode::Nearest, ResizeMode::Bilinear] {
                let r = Resize { mode, ..r };
                assert_eq!(r.run(&[0; 12], &mut [0; 48]), err("geometry"), "{r:?}");
            }
        }
    }

    /// The table of `code - zero_point`: reading an input through it is reading it minus its
    /// zero point.
    fn identity_table(zero_point: i32) -> WideTable {
        core::array::from_fn(|i| (i32::from(i as u8 as i8) - zero_point) as i16)
    }

    #[test]
    fn wide_inputs_through_an_identity_table_are_the_int8_layers() {
        let mut rng = Rng(0x16b1_7ab1_e000_0001);
        for case in 0..200 {
            let zero_point = rng.below(256) as i32 - 128;
            let table = identity_table(zero_point);
            let group = [1, 2, 4][case % 3];
            let (c, oc) = (4, 4 * (1 + rng.below(2)));
            let (kh, kw) = (1 + rng.below(3), 1 + rng.below(3));
            let (h, w) = (kh + rng.below(5), kw + rng.below(5));
            let input: Vec<i8> = (0..c * h * w).map(|_| rng.code()).collect();
            let weights: Vec<i8> = (0..oc * (c / group) * kh * kw)
                .map(|_| rng.code())
                .collect();
            let bias: Vec<i32> = (0..oc).map(|_| (rng.draw() % 2001) as i32 - 1000).collect();
            let requant = vec![Requant::from_real(0.003).unwrap(); oc];
            let owned = channels(&bias, &requant);
            let conv = Conv {
                geometry: ConvGeometry {
                    input: [c, h, w],
                    output: [oc, h - kh + 1, w - kw + 1],
                    kernel: [kh, kw],
                    stride: [1, 1],
                    pad: [0, 0],
                    dilation: [1, 1],
                    group,
                },
                weights: &weights,
                channels: owned.view(),
                input_zero_point: zero_point,
                output_quant: FULL,
            };
            let n = oc * (h - kh + 1) * (w - kw + 1);
            let (mut int8, mut wide) = (vec![0i8; n], vec![0i8; n]);
            conv.run(&input, &mut int8).unwrap();
            conv.run_wide(&table, &input, &mut wide).unwrap();
            assert_eq!(int8, wide, "conv {case}");

            let pool = GlobalAveragePool {
                channels: c,
                input_zero_point: zero_point,
                requant: Requant::from_real(0.1).unwrap(),
                output_quant: FULL,
            };
            let (mut int8, mut wide) = (vec![0i8; c], vec![0i8; c]);
            pool.run(&input, &mut int8).unwrap();
            pool.run_wide(&table, &input, &mut wide).unwrap();
            assert_eq!(int8, wide, "pool {case}");

            let other = rng.below(256) as i32 - 128;
            let mul = Mul {
                input_zero_points: [zero_point, other],
                requant: Requant::from_real(0.01).unwrap(),
                output_quant: FULL,
            };
            let b: Vec<i8> = (0..c).map(|_| rng.code()).collect();
            let (mut int8, mut wide) = (vec![0i8; input.len()], vec![0i8; input.len()]);
            mul.run(&input, &b, &mut int8).unwrap();
            let tables = [
                [Some(&table), None],
                [Some(&table), Some(&identity_table(other))],
            ];
            for tables in tables {
                mul.run_wide(tables, &input, &b, &mut wide).unwrap();
                assert_eq!(int8, wide, "mul {case}");
            }
        }
    }

    #[test]
    fn a_wide_table_holds_the_function_sixteen_bits_fine() {
        // SiLU from codes of scale 0.05 (zero point -20), on a grid of 1/4096: every entry
        // within half a step of the function, ±32767 at most, far finer than an int8 output.
        let silu = |x: f32| x / (1.0 + (-x).exp());
        let table = build_wide_table(0.05, -20, 1.0 / 4096.0, silu);
        for q in i8::MIN..=i8::MAX {
            let real = f64::from(silu(0.05 * f32::from(i16::from(q) + 20)));
            let value = f64::from(wide_value(&table, q)) / 4096.0;
            assert!(
                (value - real).abs() <= 0.5 / 4096.0 + 1e-6,
                "{q}: {value} {real}"
            );
        }
        let clamped = build_wide_table(1.0, 0, 1e-3, |x| x);
        assert_eq!(wide_value(&clamped, 127), 32767);
        assert_eq!(wide_value(&clamped, -128), -32767);
    }
}
