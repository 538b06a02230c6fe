//! Conformance cases for the CUDA executor, shared by the tests that run them on the CPU
//! emulator and on a GPU: random one-step plans of every op the kernels implement, over random
//! arenas, to compare with the generic CPU executor byte for byte.

use kestrel_backend::MAX_BANDS;
use kestrel_ops::int8::{
    Add, Attention, AveragePool, ConvGeometry, GlobalAveragePool, MaxPool, Mul, OutputQuant,
    PoolGeometry, Rescale, Resize, ResizeMode,
};
use kestrel_ops::quant::Requant;
use kestrel_ops::Reference;
use kestrel_plan::plan::PlanHeader;
use kestrel_plan::program::{AlignedBytes, Op, Program, ProgramBuilder, ProgramError, Step};

use crate::Rng;

/// One random plan and a random arena to run it on (its inputs and every other byte).
pub struct Case {
    /// What the case is, for failure messages.
    pub name: String,
    /// The plan file.
    pub plan: AlignedBytes,
    /// A whole arena of random codes.
    pub arena: std::vec::Vec<i8>,
}

impl Case {
    /// The plan's program.
    pub fn program(&self) -> Result<Program<'_>, ProgramError> {
        Program::new(self.plan.as_bytes())
    }

    /// The arena after the generic executor ran every step on it.
    pub fn expected(&self) -> Result<std::vec::Vec<i8>, ProgramError> {
        let mut arena = self.arena.clone();
        self.program()?.run(&mut arena, &mut Reference)?;
        Ok(arena)
    }
}

/// `count` random one-step plans, cycling through every op, reproducible from `seed`.
pub fn random_cases(seed: u64, count: usize) -> Result<std::vec::Vec<Case>, postcard::Error> {
    let mut rng = Rng(seed | 1);
    (0..count).map(|i| random_case(&mut rng, i % 12)).collect()
}

fn requant(rng: &mut Rng) -> Requant {
    // 2^-20 .. 2^4: small layer scales and the large ones of Add and Rescale; one in eight
    // from 2^-33 .. 2^-20, down to the right shift of 62 and below the range's floor.
    if rng.below(8) == 0 {
        requant_in(rng, -33, 13)
    } else {
        requant_in(rng, -20, 24)
    }
}

/// A scale between `2^lowest` and `2^(lowest + octaves)`.
fn requant_in(rng: &mut Rng, lowest: i32, octaves: usize) -> Requant {
    let real = 2f64.powf(rng.below(octaves * 100) as f64 / 100.0 + f64::from(lowest));
    Requant::from_real(real).unwrap_or(Requant {
        multiplier: 1 << 30,
        shift: 0,
    })
}

fn output_quant(rng: &mut Rng) -> OutputQuant {
    let zero_point = rng.below(256) as i32 - 128;
    // A third are a fused ReLU: clamped at the zero point.
    let min = if rng.below(3) == 0 {
        zero_point as i8
    } else {
        -128
    };
    OutputQuant {
        zero_point,
        min,
        max: 127,
    }
}

fn zero_point(rng: &mut Rng) -> i32 {
    rng.below(256) as i32 - 128
}

fn codes(rng: &mut Rng, n: usize) -> std::vec::Vec<i8> {
    (0..n).map(|_| rng.code()).collect()
}

/// A random [`kestrel_ops::int8::WideTable`]: full-range values, so accumulators wrap too.
fn wide_table(rng: &mut Rng) -> std::vec::Vec<i16> {
    (0..kestrel_ops::int8::WIDE_TABLE_LEN)
        .map(|_| rng.draw() as i16)
        .collect()
}

fn random_case(rng: &mut Rng, kind: usize) -> Result<Case, postcard::Error> {
    let mut b = ProgramBuilder::default();
    let (name, op, lens) = match kind {
        0 | 1 => {
            // Convolutions: dense, grouped and depthwise; strided, padded, dilated.
            let group = [1, 2, 3][rng.below(3)];
            let depthwise = kind == 1;
            // Up to 11 input channels per group, so dense convolutions span several quads
            // of `kestrel_conv_dp4a`, and up to 20 outputs per group, several of its tiles.
            let icg = if depthwise { 1 } else { 1 + rng.below(11) };
            let c = icg * group;
            let oc = if depthwise {
                c
            } else {
                group * (1 + rng.below(20))
            };
            let kernel = [1 + rng.below(3), [1, 2, 3, 5][rng.below(4)]];
            let stride = [1 + rng.below(2), 1 + rng.below(2)];
            let dilation = [1 + rng.below(2), 1 + rng.below(2)];
            let pad = [rng.below(3), rng.below(3)];
            let mut size = |k: usize, d: usize| d * (k - 1) + 1 + rng.below(9);
            let (h, w) = (size(kernel[0], dilation[0]), size(kernel[1], dilation[1]));
            let out = |n: usize, k: usize, s: usize, d: usize, p: usize| {
                (n + 2 * p - d * (k - 1) - 1) / s + 1
            };
            let geometry = ConvGeometry {
                input: [c, h, w],
                output: [
                    oc,
                    out(h, kernel[0], stride[0], dilation[0], pad[0]),
                    out(w, kernel[1], stride[1], dilation[1], pad[1]),
                ],
                kernel,
                stride,
                pad,
                dilation,
                group,
            };
            let weights = codes(rng, oc * icg * kernel[0] * kernel[1]);
            let bias: std::vec::Vec<i32> = (0..oc)
                .map(|_| (rng.draw() % 40_001) as i32 - 20_000)
                .collect();
            let requants: std::vec::Vec<Requant> = (0..oc).map(|_| requant(rng)).collect();
            let (weights, channels) = (b.i8_blob(&weights), b.channels(&bias, &requants));
            // Half of them read their input through a 16-bit table.
            let op = if rng.below(2) == 0 {
                Op::ConvWide {
                    geometry,
                    weights,
                    channels,
                    table: b.i16_blob(&wide_table(rng)),
                    output_quant: output_quant(rng),
                }
            } else {
                Op::Conv {
                    geometry,
                    weights,
                    channels,
                    input_zero_point: zero_point(rng),
                    output_quant: output_quant(rng),
                }
            };
            let out_len = geometry.output.iter().product();
            let wide = if matches!(op, Op::ConvWide { .. }) {
                " (16-bit input)"
            } else {
                ""
            };
            (
                format!("conv{wide} {geometry:?}"),
                op,
                [c * h * w, 1, out_len],
            )
        }
        2 => {
            let (n_in, n_out) = (1 + rng.below(80), 1 + rng.below(20));
            let weights = codes(rng, n_in * n_out);
            let bias: std::vec::Vec<i32> = (0..n_out)
                .map(|_| (rng.draw() % 40_001) as i32 - 20_000)
                .collect();
            let requants: std::vec::Vec<Requant> = (0..n_out).map(|_| requant(rng)).collect();
            let op = Op::Gemm {
                weights: b.i8_blob(&weights),
                channels: b.channels(&bias, &requants),
                input_zero_point: zero_point(rng),
                output_quant: output_quant(rng),
            };
            (format!("gemm {n_in} to {n_out}"), op, [n_in, 1, n_out])
        }
        3 => {
            let len = 1 + rng.below(700);
            let op = Op::Add(Add {
                input_zero_points: [zero_point(rng), zero_point(rng)],
                requant: [requant(rng), requant(rng)],
                output_quant: output_quant(rng),
            });
            (format!("add of {len}"), op, [len, len, len])
        }
        4 => {
            // b the same length as a, one value, or one per channel.
            let (channels, plane) = (1 + rng.below(8), 1 + rng.below(40));
            let b_len = [channels * plane, 1, channels][rng.below(3)];
            let mul = Mul {
                input_zero_points: [zero_point(rng), zero_point(rng)],
                requant: requant(rng),
                output_quant: output_quant(rng),
            };
            // Either input, both or neither read through a 16-bit table.
            let wide = rng.below(4);
            let op = if wide == 0 {
                Op::Mul(mul)
            } else {
                let mut table = |bit: usize| match wide & bit {
                    0 => b.i16_blob(&[]),
                    _ => b.i16_blob(&wide_table(rng)),
                };
                Op::MulWide {
                    mul,
                    tables: [table(1), table(2)],
                }
            };
            let len = channels * plane;
            (
                format!("mul of {len} by {b_len}, 16-bit inputs {wide:02b}"),
                op,
                [len, b_len, len],
            )
        }
        5 => {
            let (channels, plane) = (1 + rng.below(16), 1 + rng.below(300));
            let pool = GlobalAveragePool {
                channels,
                input_zero_point: zero_point(rng),
                requant: requant(rng),
                output_quant: output_quant(rng),
            };
            let op = if rng.below(2) == 0 {
                Op::GlobalAveragePoolWide {
                    pool,
                    table: b.i16_blob(&wide_table(rng)),
                }
            } else {
                Op::GlobalAveragePool(pool)
            };
            let wide = if matches!(op, Op::GlobalAveragePool(_)) {
                ""
            } else {
                " (16-bit input)"
            };
            (
                format!("global average pool{wide} {channels}x{plane}"),
                op,
                [channels * plane, 1, channels],
            )
        }
        6 | 7 => {
            let geometry = pool_geometry(rng);
            let op = if kind == 6 {
                Op::MaxPool(MaxPool { geometry })
            } else {
                Op::AveragePool(AveragePool {
                    geometry,
                    count_include_pad: rng.below(2) == 0,
                    input_zero_point: zero_point(rng),
                    requant: requant(rng),
                    output_quant: output_quant(rng),
                })
            };
            let g = geometry;
            let lens = [
                g.channels * g.input[0] * g.input[1],
                1,
                g.channels * g.output[0] * g.output[1],
            ];
            (
                format!("{} {g:?}", ["max pool", "average pool"][kind - 6]),
                op,
                lens,
            )
        }
        8 => {
            let channels = 1 + rng.below(4);
            let mut side = || 1 + rng.below(20);
            let (input, output) = ([side(), side()], [side(), side()]);
            let mode = [ResizeMode::Nearest, ResizeMode::Bilinear][rng.below(2)];
            let op = Op::Resize(Resize {
                channels,
                input,
                output,
                mode,
            });
            (
                format!("resize {mode:?} {input:?} to {output:?}"),
                op,
                [
                    channels * input[0] * input[1],
                    1,
                    channels * output[0] * output[1],
                ],
            )
        }
        9 => {
            let len = 1 + rng.below(600);
            let table = codes(rng, 256);
            let op = Op::Lut {
                table: b.i8_blob(&table),
            };
            (format!("lut of {len}"), op, [len, 1, len])
        }
        10 => {
            let heads = 1 + rng.below(3);
            let (key_dim, head_dim, plane) =
                (1 + rng.below(9), 1 + rng.below(10), 1 + rng.below(40));
            // Index steps from a hundredth of a logit unit to several units; outputs from the
            // mean's 16 fraction bits to about a code per value.
            let logit_to_index = requant_in(rng, -12, 14);
            let output_requant = requant_in(rng, -20, 8);
            let attention = Attention {
                heads: heads as u32,
                key_dim: key_dim as u32,
                head_dim: head_dim as u32,
                plane: plane as u32,
                input_zero_point: zero_point(rng),
                logit_to_index,
                output_requant,
                output_quant: output_quant(rng),
            };
            let op = Op::Attention {
                attention,
                exp_table: b.i32_blob(&Attention::exp_table()),
            };
            (
                format!(
                    "attention {heads} heads of {key_dim}+{key_dim}+{head_dim} planes of {plane}"
                ),
                op,
                [
                    heads * (2 * key_dim + head_dim) * plane,
                    1,
                    heads * head_dim * plane,
                ],
            )
        }
        _ => {
            // One part of a Concat: written into a longer output from an offset.
            let len = 1 + rng.below(300);
            let offset = rng.below(200);
            let op = Op::Rescale {
                rescale: Rescale {
                    input_zero_point: zero_point(rng),
                    requant: requant(rng),
                    output_quant: output_quant(rng),
                },
                offset: offset as u32,
            };
            (
                format!("rescale of {len} at {offset}"),
                op,
                [len, 1, offset + len + rng.below(50)],
            )
        }
    };
    // Tensors 0 and 1 are the inputs, 2 the output, back to back with odd gaps.
    let mut at = 0;
    for len in lens {
        b.tensor(at, len);
        at += len + rng.below(5);
    }
    let step = Step {
        op,
        inputs: [0, 1],
        output: 2,
    };
    b.push(step)?;
    let header = PlanHeader {
        name: "conformance",
        onnx_sha256: "00",
        input_shape: [1, 1, 1, lens[0] as u32],
        output_len: lens[2] as u32,
        bands: 1,
        mean: [0.0; MAX_BANDS],
        std: [1.0; MAX_BANDS],
        resize: 1,
        labels: "",
        arena_size: at as u32,
        output_tensor: 2,
        input_scale: 0.05,
        input_zero_point: 0,
        output_scale: 0.1,
        output_zero_point: 0,
        output_softmax: false,
        detector: None,
    };
    let plan = b.finish(&header)?;
    Ok(Case {
        name,
        plan: AlignedBytes::new(&plan),
        arena: codes(rng, at),
    })
}

/// A pooling window that fits the generic kernels' checks: padding below the kernel, every
/// window overlapping the input.
fn pool_geometry(rng: &mut Rng) -> PoolGeometry {
    let kernel = [1 + rng.below(4), 1 + rng.below(4)];
    let stride = [1 + rng.below(3), 1 + rng.below(3)];
    let pad = [rng.below(kernel[0]), rng.below(kernel[1])];
    let input = [kernel[0] + rng.below(12), kernel[1] + rng.below(12)];
    let out = |axis: usize| (input[axis] + 2 * pad[axis] - kernel[axis]) / stride[axis] + 1;
    PoolGeometry {
        channels: 1 + rng.below(5),
        input,
        output: [out(0), out(1)],
        kernel,
        stride,
        pad,
    }
}
