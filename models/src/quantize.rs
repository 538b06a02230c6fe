//! From a float graph and calibrated activation ranges to int8 layers run by the generic
//! kernels: per-channel weights, int32 biases, fixed-point requantisation, ReLU fused into the
//! layer before it. This is the integer program a plan will carry.

use kestrel_kernels::int8::{self, ConvGeometry, OutputQuant};
use kestrel_kernels::quant::Requant;

use crate::calibrate::{quantize_bias, quantize_weights_per_channel, ActivationQuant};
use crate::graph::{Graph, ImportError, Op};

/// One int8 layer with owned parameters.
#[derive(Clone, Debug)]
pub enum Layer {
    /// Convolution.
    Conv {
        /// Shapes and window.
        geometry: ConvGeometry,
        /// `[out, in / group, kh, kw]`.
        weights: Vec<i8>,
        /// Per output channel.
        bias: Vec<i32>,
        /// Per output channel.
        requant: Vec<Requant>,
        /// Input zero point.
        input_zero_point: i32,
        /// Output zero point and clamp.
        output_quant: OutputQuant,
    },
    /// Fully connected.
    Gemm {
        /// `[out, in]`.
        weights: Vec<i8>,
        /// Per output.
        bias: Vec<i32>,
        /// Per output.
        requant: Vec<Requant>,
        /// Input zero point.
        input_zero_point: i32,
        /// Output zero point and clamp.
        output_quant: OutputQuant,
    },
    /// Residual sum.
    Add(int8::Add),
    /// Channel means.
    GlobalAveragePool(int8::GlobalAveragePool),
    /// Same codes, new shape.
    Flatten,
}

/// An int8 layer reading and writing tensors by value id.
#[derive(Clone, Debug)]
pub struct Step {
    /// Name of the ONNX node (of the first node when fused).
    pub name: String,
    /// The layer.
    pub layer: Layer,
    /// Value ids read.
    pub inputs: Vec<usize>,
    /// Value id written.
    pub output: usize,
}

/// The integer program of a model.
#[derive(Clone, Debug)]
pub struct QuantizedGraph {
    /// Layers in execution order.
    pub steps: Vec<Step>,
    /// Quantisation of every value by id.
    pub params: Vec<ActivationQuant>,
    /// Elements of every value by id.
    pub sizes: Vec<usize>,
    /// Id of the output value.
    pub output: usize,
}

fn requant(real: f64, node: &str) -> Result<Requant, ImportError> {
    Requant::from_real(real).ok_or_else(|| ImportError::Malformed {
        node: node.to_string(),
        reason: format!("requantisation scale {real} is outside the fixed-point range"),
    })
}

impl QuantizedGraph {
    /// Quantise `graph` with calibrated `params` (one per value id). A ReLU that directly
    /// follows a Conv, Gemm or Add whose result nothing else reads is fused into it.
    pub fn build(graph: &Graph, params: &[ActivationQuant]) -> Result<Self, ImportError> {
        let mut params = params.to_vec();
        let readers = |id: usize| {
            graph
                .nodes
                .iter()
                .filter(|n| n.inputs.contains(&id))
                .count()
        };
        let mut steps = Vec::new();
        let mut fused_relus = Vec::new();
        for (index, node) in graph.nodes.iter().enumerate() {
            if fused_relus.contains(&index) {
                continue;
            }
            // Fuse a following ReLU: its output (and range) becomes this layer's output.
            let relu = graph.nodes.iter().enumerate().find(|(_, n)| {
                matches!(n.op, Op::Relu) && n.inputs == [node.output] && readers(node.output) == 1
            });
            let fusable = matches!(node.op, Op::Conv { .. } | Op::Gemm { .. } | Op::Add);
            let (output, relu_fused) = match relu {
                Some((relu_index, relu)) if fusable => {
                    fused_relus.push(relu_index);
                    (relu.output, true)
                }
                _ => (node.output, false),
            };
            let out = params[output];
            let output_quant = OutputQuant {
                zero_point: i32::from(out.zero_point),
                min: if relu_fused { out.zero_point } else { -128 },
                max: 127,
            };
            let input = node.inputs[0];
            let input_scale = f64::from(params[input].scale);
            let input_zero_point = i32::from(params[input].zero_point);
            // Weights per output channel, biases in the accumulator scale, and the
            // accumulator-to-output requantisation of each channel.
            let quantize_layer = |weight: &[f32], channels: usize, bias: &[f32]| {
                let q = quantize_weights_per_channel(weight, channels);
                let bias = quantize_bias(bias, params[input].scale, &q.scales);
                let requant = q
                    .scales
                    .iter()
                    .map(|s| {
                        requant(
                            input_scale * f64::from(*s) / f64::from(out.scale),
                            &node.name,
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, ImportError>((q.values, bias, requant))
            };
            let layer = match &node.op {
                Op::Conv {
                    weight,
                    weight_shape,
                    bias,
                    stride,
                    pads,
                    dilation,
                    group,
                } => {
                    let (weights, bias, requant) = quantize_layer(weight, weight_shape[0], bias)?;
                    let shape = |id: usize| -> [usize; 3] {
                        let s = &graph.shapes[id];
                        [s[1], s[2], s[3]]
                    };
                    Layer::Conv {
                        geometry: ConvGeometry {
                            input: shape(input),
                            output: shape(node.output),
                            kernel: [weight_shape[2], weight_shape[3]],
                            stride: *stride,
                            pad: [pads[0], pads[1]],
                            dilation: *dilation,
                            group: *group,
                        },
                        weights,
                        bias,
                        requant,
                        input_zero_point,
                        output_quant,
                    }
                }
                Op::Gemm {
                    weight,
                    out_features,
                    bias,
                } => {
                    let (weights, bias, requant) = quantize_layer(weight, *out_features, bias)?;
                    Layer::Gemm {
                        weights,
                        bias,
                        requant,
                        input_zero_point,
                        output_quant,
                    }
                }
                Op::Add => {
                    let other = node.inputs[1];
                    Layer::Add(int8::Add {
                        input_zero_points: [input_zero_point, i32::from(params[other].zero_point)],
                        requant: [
                            requant(input_scale / f64::from(out.scale), &node.name)?,
                            requant(
                                f64::from(params[other].scale) / f64::from(out.scale),
                                &node.name,
                            )?,
                        ],
                        output_quant,
                    })
                }
                Op::GlobalAveragePool => {
                    let s = &graph.shapes[input];
                    let plane = (s[2] * s[3]) as f64;
                    Layer::GlobalAveragePool(int8::GlobalAveragePool {
                        channels: s[1],
                        input_zero_point,
                        requant: requant(input_scale / (f64::from(out.scale) * plane), &node.name)?,
                        output_quant,
                    })
                }
                Op::Flatten => {
                    // Same codes: the output must share the input's quantisation.
                    params[output] = params[input];
                    Layer::Flatten
                }
                Op::Relu => return Err(ImportError::Malformed {
                    node: node.name.clone(),
                    reason:
                        "a ReLU that cannot be fused into the layer before it is not supported yet"
                            .into(),
                }),
            };
            steps.push(Step {
                name: node.name.clone(),
                layer,
                inputs: node.inputs.clone(),
                output,
            });
        }
        let sizes = graph.shapes.iter().map(|s| s.iter().product()).collect();
        let output = graph.output;
        Ok(Self {
            steps,
            params,
            sizes,
            output,
        })
    }

    /// Quantise a float input tensor with the input's parameters.
    pub fn quantize_input(&self, input: &[f32]) -> Vec<i8> {
        let q = self.params[0];
        input
            .iter()
            .map(|x| ((x / q.scale).round() + f32::from(q.zero_point)).clamp(-128.0, 127.0) as i8)
            .collect()
    }

    /// Run the integer program and return the output codes.
    pub fn run(&self, input: &[i8]) -> Result<Vec<i8>, int8::ShapeError> {
        let mut values: Vec<Vec<i8>> = self.sizes.iter().map(|&n| vec![0; n]).collect();
        values[0] = input.to_vec();
        for step in &self.steps {
            let mut out = std::mem::take(&mut values[step.output]);
            let x = &values[step.inputs[0]];
            match &step.layer {
                Layer::Conv {
                    geometry,
                    weights,
                    bias,
                    requant,
                    input_zero_point,
                    output_quant,
                } => int8::Conv {
                    geometry: *geometry,
                    weights,
                    bias,
                    requant,
                    input_zero_point: *input_zero_point,
                    output_quant: *output_quant,
                }
                .run(x, &mut out)?,
                Layer::Gemm {
                    weights,
                    bias,
                    requant,
                    input_zero_point,
                    output_quant,
                } => int8::Gemm {
                    weights,
                    bias,
                    requant,
                    input_zero_point: *input_zero_point,
                    output_quant: *output_quant,
                }
                .run(x, &mut out)?,
                Layer::Add(add) => add.run(x, &values[step.inputs[1]], &mut out)?,
                Layer::GlobalAveragePool(pool) => pool.run(x, &mut out)?,
                Layer::Flatten => out.copy_from_slice(x),
            }
            values[step.output] = out;
        }
        Ok(std::mem::take(&mut values[self.output]))
    }

    /// Real values of the output codes.
    pub fn dequantize_output(&self, codes: &[i8]) -> Vec<f32> {
        let q = self.params[self.output];
        codes
            .iter()
            .map(|&c| q.scale * (f32::from(c) - f32::from(q.zero_point)))
            .collect()
    }
}
