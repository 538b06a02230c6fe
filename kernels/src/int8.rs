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
    /// Which buffer: `"input"`, `"weights"`, `"bias"`, `"requant"`, `"output"` or `"geometry"`.
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

fn check(ok: bool, buffer: &'static str) -> Result<(), ShapeError> {
    if ok {
        Ok(())
    } else {
        Err(ShapeError { buffer })
    }
}

/// Output activation: zero point and the clamp range (a fused ReLU or ReLU6 narrows it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutputQuant {
    /// Zero point of the output tensor.
    pub zero_point: i32,
    /// Smallest code written.
    pub min: i8,
    /// Largest code written.
    pub max: i8,
}

/// Shapes and window of a 2-D convolution (grouped, depthwise, strided, padded, dilated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// A 2-D convolution layer.
#[derive(Clone, Copy, Debug)]
pub struct Conv<'a> {
    /// Shapes and window.
    pub geometry: ConvGeometry,
    /// `[out, in / group, kh, kw]`.
    pub weights: &'a [i8],
    /// One per output channel.
    pub bias: &'a [i32],
    /// Accumulator to output scale, one per output channel.
    pub requant: &'a [Requant],
    /// Zero point of the input tensor.
    pub input_zero_point: i32,
    /// Output zero point and clamp.
    pub output_quant: OutputQuant,
}

impl Conv<'_> {
    /// Run the layer on `input` (`C*H*W` codes) into `output`.
    pub fn run(&self, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
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
        let (icg, ocg) = (c / group, oc_total / group);
        check(input.len() == c * h * w, "input")?;
        check(self.weights.len() == oc_total * icg * kh * kw, "weights")?;
        check(self.bias.len() == oc_total, "bias")?;
        check(self.requant.len() == oc_total, "requant")?;
        check(output.len() == oc_total * oh * ow, "output")?;
        let q = self.output_quant;
        for oc in 0..oc_total {
            let first_channel = (oc / ocg) * icg;
            let filter = &self.weights[oc * icg * kh * kw..(oc + 1) * icg * kh * kw];
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = self.bias[oc];
                    for ic in 0..icg {
                        let plane =
                            &input[(first_channel + ic) * h * w..(first_channel + ic + 1) * h * w];
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
                                let x = i32::from(plane[iy * w + ix]) - self.input_zero_point;
                                acc = acc
                                    .wrapping_add(x * i32::from(filter[(ic * kh + ky) * kw + kx]));
                            }
                        }
                    }
                    output[(oc * oh + oy) * ow + ox] =
                        requantize_i8(acc, self.requant[oc], q.zero_point, q.min, q.max);
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
    /// One per output.
    pub bias: &'a [i32],
    /// One per output.
    pub requant: &'a [Requant],
    /// Zero point of the input.
    pub input_zero_point: i32,
    /// Output zero point and clamp.
    pub output_quant: OutputQuant,
}

impl Gemm<'_> {
    /// Run the layer on `input` into `output`.
    pub fn run(&self, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        check(self.weights.len() == input.len() * output.len(), "weights")?;
        check(self.bias.len() == output.len(), "bias")?;
        check(self.requant.len() == output.len(), "requant")?;
        let q = self.output_quant;
        for (o, (out, row)) in output
            .iter_mut()
            .zip(self.weights.chunks_exact(input.len().max(1)))
            .enumerate()
        {
            let acc = input.iter().zip(row).fold(self.bias[o], |acc, (&x, &w)| {
                acc.wrapping_add((i32::from(x) - self.input_zero_point) * i32::from(w))
            });
            *out = requantize_i8(acc, self.requant[o], q.zero_point, q.min, q.max);
        }
        Ok(())
    }
}

/// Fractional bits kept while two rescaled addends are summed.
pub const ADD_FRACTION_BITS: u32 = 16;

/// Element-wise sum of two tensors with their own scales: each addend is rescaled to the output
/// scale with [`ADD_FRACTION_BITS`] extra bits, summed, then rounded (ties toward +inf).
#[derive(Clone, Copy, Debug)]
pub struct Add {
    /// Zero points of the two inputs.
    pub input_zero_points: [i32; 2],
    /// `input scale / output scale` for each input.
    pub requant: [Requant; 2],
    /// Output zero point and clamp.
    pub output_quant: OutputQuant,
}

impl Add {
    /// `output = a + b` in real terms.
    pub fn run(&self, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
        check(a.len() == b.len(), "input")?;
        check(output.len() == a.len(), "output")?;
        let q = self.output_quant;
        let half = 1i64 << (ADD_FRACTION_BITS - 1);
        for ((out, &x), &y) in output.iter_mut().zip(a).zip(b) {
            let term = |v: i8, i: usize| {
                let centred = (i32::from(v) - self.input_zero_points[i]) << ADD_FRACTION_BITS;
                i64::from(self.requant[i].apply(centred))
            };
            let sum = (term(x, 0) + term(y, 1) + half) >> ADD_FRACTION_BITS;
            let code = (sum + i64::from(q.zero_point)).clamp(i64::from(q.min), i64::from(q.max));
            *out = code as i8;
        }
        Ok(())
    }
}

/// Mean over each channel's plane: `requant` is `input scale / (output scale * H * W)`.
#[derive(Clone, Copy, Debug)]
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
    pub fn run(&self, input: &[i8], output: &mut [i8]) -> Result<(), ShapeError> {
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
            let sum = plane.iter().fold(0i32, |s, &x| {
                s.wrapping_add(i32::from(x) - self.input_zero_point)
            });
            *out = requantize_i8(sum, self.requant, q.zero_point, q.min, q.max);
        }
        Ok(())
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn code(&mut self) -> i8 {
            self.next() as i8
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
            let bias: Vec<i32> = (0..oc).map(|_| (rng.next() % 2001) as i32 - 1000).collect();
            let (sx, zx, sy) = (0.02, -5, 0.9);
            let sw: Vec<f64> = (0..oc)
                .map(|_| 0.001 + (rng.below(100) as f64) * 1e-4)
                .collect();
            let requant: Vec<Requant> = sw
                .iter()
                .map(|s| Requant::from_real(sx * s / sy).unwrap())
                .collect();
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
                bias: &bias,
                requant: &requant,
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
        let gemm = Gemm {
            weights: &weights,
            bias: &bias,
            requant: &requant,
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
        let conv = Conv {
            geometry,
            weights: &[1; 9],
            bias: &[0],
            requant: &requant,
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
}
