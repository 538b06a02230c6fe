//! From a float graph and calibrated activation ranges to the int8 program a plan carries:
//! per-channel weights, int32 biases, fixed-point requantisation, activations fused into the
//! layer before them, element-wise functions as lookup tables.

use std::collections::BTreeSet;
use std::rc::Rc;

use kestrel_ops::int16::{self, build_function16, WideOutput, Width};
use kestrel_ops::int8::{
    self, build_lut, build_wide_table, ConvGeometry, OutputQuant, PoolGeometry, ResizeMode,
    WideTable,
};
use kestrel_ops::quant::Requant;
use kestrel_plan::plan::PlanHeader;
use kestrel_plan::program::{Op as PlanOp, ProgramBuilder, Step as PlanStep, TensorId};

use crate::arena::{lifetimes, plan, ArenaLayout, ALIGN};
use crate::calibrate::{quantize_weights_per_channel, ActivationQuant};
use crate::graph::{hard_sigmoid, hard_swish, sigmoid, Graph, ImportError, Node, Op};

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
        /// The input read through this table instead (a widened function's output).
        input_table: Option<Box<WideTable>>,
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
    /// Product; either input read through its table where it has one.
    Mul(int8::Mul, [Option<Box<WideTable>>; 2]),
    /// Channel means; the input read through the table where there is one.
    GlobalAveragePool(int8::GlobalAveragePool, Option<Box<WideTable>>),
    /// Window maxima.
    MaxPool(int8::MaxPool),
    /// Window means.
    AveragePool(int8::AveragePool),
    /// Resampling.
    Resize(int8::Resize),
    /// Element-wise function as a table.
    Lut(Vec<i8>),
    /// Channel concatenation: each input rescaled into its part of the output.
    Concat(Vec<int8::Rescale>),
    /// Planes copied in a new order (a channel Slice, Split or shuffle): the input plane of
    /// each output plane, and the values per plane.
    Gather(Vec<u32>, usize),
    /// Self-attention over pixels; the plan carries [`int8::Attention::exp_table`] with it.
    Attention(int8::Attention),
    /// A Conv (or a Gemm, as a 1x1 convolution of one pixel) with a 16-bit input, output or
    /// both.
    Conv16 {
        /// Shapes and window.
        geometry: ConvGeometry,
        /// `[out, in / group, kh, kw]`.
        weights: Vec<i8>,
        /// Per output channel.
        bias: Vec<i32>,
        /// Per output channel.
        requant: Vec<Requant>,
        /// Element type of the input.
        input_width: Width,
        /// Input zero point.
        input_zero_point: i32,
        /// The output.
        output: WideOutput,
    },
    /// Residual sum of 16-bit tensors.
    Add16(int16::Add16),
    /// Product of 16-bit tensors.
    Mul16(int16::Mul16),
    /// Channel means of a 16-bit tensor.
    GlobalAveragePool16(int16::GlobalAveragePool16),
    /// Element-wise function between 16-bit tensors: its interpolation table.
    Function16(Vec<i16>),
}

impl Layer {
    /// The operator's name, for reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Conv {
                input_table: Some(_),
                ..
            } => "Conv (16-bit input)",
            Self::Conv { geometry, .. } if geometry.group > 1 => "Conv (grouped)",
            Self::Conv { .. } => "Conv",
            Self::Gemm { .. } => "Gemm",
            Self::Add(_) => "Add",
            Self::Mul(_, [None, None]) => "Mul",
            Self::Mul(..) => "Mul (16-bit input)",
            Self::GlobalAveragePool(_, None) => "GlobalAveragePool",
            Self::GlobalAveragePool(..) => "GlobalAveragePool (16-bit input)",
            Self::MaxPool(_) => "MaxPool",
            Self::AveragePool(_) => "AveragePool",
            Self::Resize(_) => "Resize",
            Self::Lut(_) => "Lut",
            Self::Concat(_) => "Concat",
            Self::Gather(..) => "Gather",
            Self::Attention(_) => "Attention",
            Self::Conv16 { .. } => "Conv (16-bit)",
            Self::Add16(_) => "Add (16-bit)",
            Self::Mul16(_) => "Mul (16-bit)",
            Self::GlobalAveragePool16(_) => "GlobalAveragePool (16-bit)",
            Self::Function16(_) => "Lut (16-bit)",
        }
    }
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
    /// Bytes of every value by id: its elements times its width.
    pub sizes: Vec<usize>,
    /// Per value id: whether it is a 16-bit tensor (zero point 0).
    pub wide: Vec<bool>,
    /// Id of the output value (before a final Softmax).
    pub output: usize,
    /// The model ends in a Softmax, applied to the dequantised output.
    pub output_softmax: bool,
    /// Per value id: `Some((concat, offset))` where a Conv writes the value straight into its
    /// part of a Concat's output (bytes from `offset` on), on the Concat's grid, so the Concat
    /// copies nothing for it.
    pub in_place: Vec<Option<(usize, usize)>>,
}

fn requant(real: f64, node: &str) -> Result<Requant, ImportError> {
    Requant::from_real(real).ok_or_else(|| ImportError::Malformed {
        node: node.to_string(),
        reason: format!("requantisation scale {real} is outside the fixed-point range"),
    })
}

fn unsupported(node: &Node, what: &str) -> ImportError {
    ImportError::Unsupported {
        node: node.name.clone(),
        op: what.to_string(),
    }
}

/// A convolution that is a matrix-vector product: a 1x1 kernel over a one-pixel input into a
/// one-pixel output, one group, no padding.
fn is_one_pixel_pointwise(g: &ConvGeometry) -> bool {
    g.kernel == [1, 1]
        && g.group == 1
        && g.pad == [0, 0]
        && g.input[1..] == [1, 1]
        && g.output[1..] == [1, 1]
}

/// A function's output the compiler keeps at 16 bits: its readers read the function's input
/// codes through a [`WideTable`] each, and the function gets no step of its own.
#[derive(Clone)]
struct Widened {
    /// The value the function reads (whose codes the readers read).
    input: usize,
    /// The function.
    f: Rc<dyn Fn(f32) -> f32>,
}

/// Accumulator headroom a widened input's values may take: `2^30`, the other half of the
/// int32 accumulator left to the bias (as for int8 inputs).
const WIDE_ACCUMULATOR: f64 = (1u32 << 30) as f64;

impl Widened {
    /// The table of the function on the codes of its input (quantised by `input`), on the
    /// finest grid whose values, `terms` of them times a weight of at most 127 in magnitude
    /// (1 for a Mul or a pool), stay within [`WIDE_ACCUMULATOR`]; and that grid's scale.
    fn table(&self, input: ActivationQuant, terms: usize, weight: f64) -> (WideTable, f32) {
        let zero_point = i32::from(input.zero_point);
        let largest = (i8::MIN..=i8::MAX)
            .map(|q| (self.f)(input.scale * f32::from(i16::from(q) - input.zero_point as i16)))
            .filter(|v| v.is_finite())
            .fold(0.0f32, |m, v| m.max(v.abs()));
        let steps = (WIDE_ACCUMULATOR / (terms.max(1) as f64 * weight))
            .floor()
            .min(f64::from(i16::MAX));
        let scale = if largest > 0.0 {
            (f64::from(largest) / steps) as f32
        } else {
            1.0
        };
        (
            build_wide_table(input.scale, zero_point, scale, &*self.f),
            scale,
        )
    }
}

/// Accumulator headroom of a 16-bit input: its codes times a reader's weights stay within
/// `2^30`, the other half of the `i32` accumulator left to the bias (whose steps
/// `quantize_weights_per_channel` bounds by the same `2^30`).
const ACCUMULATOR_HALF: f64 = (1u32 << 30) as f64;

/// Which values a build makes 16-bit.
#[derive(Clone, Copy)]
enum Sixteen {
    /// Every value that can be ([`sixteen_bit_values`]).
    Activations { wide_output: bool },
    /// The logits ([`logit_values`]).
    Logits,
}

/// Nodes whose 16-bit kernel reads and writes one width.
fn is_elementwise(op: &Op) -> bool {
    matches!(
        op,
        Op::Add
            | Op::Mul
            | Op::GlobalAveragePool
            | Op::Sigmoid
            | Op::HardSigmoid { .. }
            | Op::HardSwish
            | Op::Relu
            | Op::Clip { .. }
    )
}

/// Which values can be 16-bit tensors: those every producer and reader of which has a 16-bit
/// kernel (Conv, Gemm, Add, Mul, GlobalAveragePool, element-wise functions; a Reshape passes
/// its input's width on), and where the element-wise ones (which read and write one width)
/// see only 16-bit neighbours. Never the graph's input; the plan's output ([`plan_output`])
/// only where `wide_output`. `alias` resolves Reshapes.
fn sixteen_bit_values(graph: &Graph, alias: &[usize], wide_output: bool) -> Vec<bool> {
    let takes_16 = |op: &Op| is_elementwise(op) || matches!(op, Op::Conv { .. } | Op::Gemm { .. });
    let mut wide = vec![true; graph.shapes.len()];
    wide[0] = false;
    if !wide_output {
        wide[plan_output(graph, alias)] = false;
    }
    let mut produced = vec![false; graph.shapes.len()];
    for node in &graph.nodes {
        // A view; a final Softmax is applied to the dequantised output.
        let softmax = matches!(node.op, Op::Softmax) && node.output == graph.output;
        if matches!(node.op, Op::Reshape) || softmax {
            continue;
        }
        produced[node.output] = true;
        if !takes_16(&node.op) {
            wide[node.output] = false;
            node.inputs.iter().for_each(|&i| wide[alias[i]] = false);
        }
    }
    for (value, made) in produced.iter().enumerate() {
        wide[value] &= *made;
    }
    // An element-wise node reads and writes one width: any int8 neighbour makes all int8.
    spread_over_elementwise(graph, alias, &mut wide, false);
    wide
}

/// The value a plan outputs: the graph's output, or the input of a final Softmax (applied to
/// the dequantised output), resolved through `alias`.
fn plan_output(graph: &Graph, alias: &[usize]) -> usize {
    let softmax = graph
        .nodes
        .iter()
        .find(|n| n.output == graph.output && matches!(n.op, Op::Softmax));
    alias[softmax.map_or(graph.output, |n| n.inputs[0])]
}

/// Makes every value of each element-wise node (which reads and writes one width) `width`
/// where any of its values is, until no more change.
fn spread_over_elementwise(graph: &Graph, alias: &[usize], wide: &mut [bool], width: bool) {
    loop {
        let mut changed = false;
        for node in graph.nodes.iter().filter(|n| is_elementwise(&n.op)) {
            let values: Vec<usize> = node
                .inputs
                .iter()
                .chain([&node.output])
                .map(|&i| alias[i])
                .collect();
            if values.iter().any(|&v| wide[v] == width) {
                for v in values {
                    changed |= wide[v] != width;
                    wide[v] = width;
                }
            }
        }
        if !changed {
            return;
        }
    }
}

/// The values an int8 plan makes 16-bit for 16-bit logits: the plan's output, where a Conv or
/// Gemm writes it (from int8 input), with the element-wise nodes between (a GlobalAveragePool
/// after the last Conv, say), which read and write one width. None where some writer or reader
/// of those values has no 16-bit kernel. `alias` resolves Reshapes.
fn logit_values(graph: &Graph, alias: &[usize]) -> Vec<bool> {
    let possible = sixteen_bit_values(graph, alias, true);
    let mut wide = vec![false; possible.len()];
    let output = plan_output(graph, alias);
    if possible[output] {
        wide[output] = true;
        // `possible` holds each element-wise node's values together: the set stays within it.
        spread_over_elementwise(graph, alias, &mut wide, true);
    }
    wide
}

/// The largest code a 16-bit value may take so that every reader's accumulator keeps within
/// [`ACCUMULATOR_HALF`]: a Conv or Gemm by its largest per-channel sum of weight magnitudes, a
/// pooling by its plane, the rest by the `i16` range.
fn code_limit(graph: &Graph, alias: &[usize], value: usize) -> i32 {
    let mut limit = f64::from(i16::MAX);
    for node in &graph.nodes {
        if !node.inputs.iter().any(|&i| alias[i] == value) {
            continue;
        }
        let terms = match &node.op {
            Op::Conv {
                weight,
                weight_shape,
                ..
            } => largest_weight_sum(weight, weight_shape[0]),
            Op::Gemm {
                weight,
                out_features,
                ..
            } => largest_weight_sum(weight, *out_features),
            Op::GlobalAveragePool => {
                graph.shapes[node.inputs[0]][2..].iter().product::<usize>() as f64
            }
            _ => 1.0,
        };
        limit = limit.min((ACCUMULATOR_HALF / terms.max(1.0)).floor());
    }
    limit.max(1.0) as i32
}

/// The largest sum of one output channel's int8 weight magnitudes (per-channel scales, as the
/// compiler quantises them when no bias forces a coarser scale).
fn largest_weight_sum(weight: &[f32], channels: usize) -> f64 {
    let q = quantize_weights_per_channel(weight, channels, &[], 1.0);
    q.values
        .chunks(q.values.len() / channels.max(1))
        .map(|c| c.iter().map(|&w| f64::from(w.unsigned_abs())).sum::<f64>())
        .fold(0.0, f64::max)
}

/// `graph` with each Conv's and Gemm's biases moved against the mean error its int8 weights
/// add to each output channel, so that on average the int8 layer's output is float's (bias
/// correction, as in Nagel et al., "Data-Free Quantization", 2019). For output channel `o` the
/// error is the sum over its taps of (int8 weight - float weight) times the mean of the input
/// channel the tap reads, each tap weighted by the share of output pixels where it reads the
/// input rather than padding. `means` are the float graph's channel means, by value id
/// ([`crate::calibrate::ChannelMeans`]).
pub fn bias_corrected(graph: &Graph, means: &[Vec<f64>], int8_means: &[Vec<f64>]) -> Graph {
    let mut corrected = graph.clone();
    for node in &mut corrected.nodes {
        let Some(&input) = node.inputs.first() else {
            continue;
        };
        let mean = |means: &[Vec<f64>], channel: usize| {
            means
                .get(input)
                .and_then(|m| m.get(channel))
                .copied()
                .unwrap_or(0.0)
        };
        let (weight, bias, out, group, shares) = match &mut node.op {
            Op::Conv {
                weight,
                weight_shape,
                bias,
                stride,
                pads,
                dilation,
                group,
            } => {
                let plane = |value: usize| match graph.shapes.get(value).map(Vec::as_slice) {
                    Some(&[_, _, h, w]) => Some([h, w]),
                    _ => None,
                };
                let (Some([h, w]), Some([oh, ow])) = (plane(input), plane(node.output)) else {
                    continue;
                };
                let [_, _, kh, kw] = *weight_shape;
                let rows = tap_shares(h, oh, kh, stride[0], pads[0], dilation[0]);
                let cols = tap_shares(w, ow, kw, stride[1], pads[1], dilation[1]);
                let shares: Vec<f64> = rows
                    .iter()
                    .flat_map(|r| cols.iter().map(move |c| r * c))
                    .collect();
                (weight, bias, weight_shape[0], (*group).max(1), shares)
            }
            Op::Gemm {
                weight,
                out_features,
                bias,
            } => (weight, bias, *out_features, 1, vec![1.0]),
            _ => continue,
        };
        let q = quantize_weights_per_channel(weight, out, &[], 1.0);
        let per_out = weight.len() / out.max(1);
        // A layer whose weights do not fit its shape is left for the quantiser to refuse.
        if shares.is_empty() || per_out == 0 || per_out % shares.len() != 0 || q.scales.len() != out
        {
            continue;
        }
        let inputs_per_group = per_out / shares.len();
        let outs_per_group = (out / group).max(1);
        bias.resize(out, 0.0);
        for ((o, b), &scale) in bias.iter_mut().enumerate().zip(&q.scales) {
            let first_input = (o / outs_per_group) * inputs_per_group;
            let scale = f64::from(scale);
            let error: f64 = (o * per_out..(o + 1) * per_out)
                .map(|at| {
                    let tap = at - o * per_out;
                    let channel = first_input + tap / shares.len();
                    (f64::from(q.values[at]) * scale * mean(int8_means, channel)
                        - f64::from(weight[at]) * mean(means, channel))
                        * shares[tap % shares.len()]
                })
                .sum();
            *b -= error as f32;
        }
    }
    corrected
}

/// For each of a window's `kernel` taps along one axis, the share of the `output` positions at
/// which it reads one of the `input` positions rather than padding.
fn tap_shares(
    input: usize,
    output: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    dilation: usize,
) -> Vec<f64> {
    (0..kernel)
        .map(|k| {
            let inside = (0..output)
                .filter(|o| {
                    let at = o * stride + k * dilation;
                    at >= pad && at - pad < input
                })
                .count();
            inside as f64 / output.max(1) as f64
        })
        .collect()
}

impl QuantizedGraph {
    /// [`QuantizedGraph::build_widened`] with every function's output int8 and int8 logits.
    pub fn build(graph: &Graph, params: &[ActivationQuant]) -> Result<Self, ImportError> {
        Self::build_widened(graph, params, &BTreeSet::new(), None)
    }

    /// Quantise `graph` with calibrated `params` (one per value id).
    ///
    /// - A Relu or Clip that is the only reader of a Conv, Gemm or Add becomes that layer's
    ///   output clamp.
    /// - `x * Sigmoid(x)` becomes one SiLU table and `x * HardSigmoid(x)` one HardSwish table;
    ///   other Sigmoid, HardSigmoid, HardSwish, Relu and Clip nodes are tables.
    /// - Reshape and Flatten share their input's bytes; MaxPool, Resize and Gather keep its
    ///   quantisation.
    /// - A Softmax must be the last node; it is applied to the dequantised output.
    /// - The function tables of the nodes named in `widen` whose every reader is a Conv, a
    ///   GlobalAveragePool or a Mul are not rounded to int8: each reader reads the function's
    ///   input codes through a 16-bit table of the function ([`WideTable`]). Others stay int8.
    /// - With `logits` (min-max ranges, one per value id), the output (before a final Softmax)
    ///   is 16-bit where a Conv or Gemm writes it, through any element-wise nodes after it (a
    ///   GlobalAveragePool), on the finest grid its min-max range allows: an int8 output's
    ///   steps round near-tied classes together. Otherwise, or where those nodes have no
    ///   16-bit kernel, it is int8.
    pub fn build_widened(
        graph: &Graph,
        params: &[ActivationQuant],
        widen: &BTreeSet<String>,
        logits: Option<&[ActivationQuant]>,
    ) -> Result<Self, ImportError> {
        Self::build_all(
            graph,
            params,
            widen,
            logits.map(|minmax| (minmax, Sixteen::Logits)),
        )
    }

    /// [`QuantizedGraph::build`] with 16-bit activations wherever every layer that writes and
    /// reads a value has a 16-bit kernel ([`kestrel_ops::int16`]; Conv, Gemm, Add, Mul,
    /// GlobalAveragePool and element-wise functions), zero point 0, the scale from the
    /// value's observed range (`minmax`, one per value id) over the largest code its readers'
    /// accumulators allow. Other values keep their int8 `params`; the graph's input is always
    /// int8, and its output too unless `wide_output` (a classifier's logits, whose int8 steps
    /// can round near-tied classes together; a detector's head stays int8, as the GPU's peak
    /// search reads its codes).
    pub fn build_16_bit(
        graph: &Graph,
        params: &[ActivationQuant],
        minmax: &[ActivationQuant],
        wide_output: bool,
    ) -> Result<Self, ImportError> {
        let which = Sixteen::Activations { wide_output };
        Self::build_all(graph, params, &BTreeSet::new(), Some((minmax, which)))
    }

    /// The build; `minmax` holds the ranges of the 16-bit values and says which those are.
    fn build_all(
        graph: &Graph,
        params: &[ActivationQuant],
        widen: &BTreeSet<String>,
        minmax: Option<(&[ActivationQuant], Sixteen)>,
    ) -> Result<Self, ImportError> {
        let mut params = params.to_vec();
        let readers = |id: usize| {
            graph
                .nodes
                .iter()
                .filter(|n| n.inputs.contains(&id))
                .count()
        };
        let reader = |id: usize| {
            graph
                .nodes
                .iter()
                .enumerate()
                .find(|(_, n)| n.inputs.contains(&id))
        };
        // Values that are views of another (Reshape): resolved to the value holding the bytes.
        let mut alias: Vec<usize> = (0..graph.shapes.len()).collect();
        let mut skip = vec![false; graph.nodes.len()];
        let mut steps = Vec::new();
        let mut output = graph.output;
        let mut output_softmax = false;
        let mut in_place = vec![None; graph.shapes.len()];
        let mut widened: Vec<Option<Widened>> = vec![None; graph.shapes.len()];
        // 16-bit values, their largest codes, and their scales on params.
        let mut is16 = vec![false; graph.shapes.len()];
        let mut limits = vec![i32::from(i16::MAX); graph.shapes.len()];
        if let Some((minmax, which)) = minmax {
            let mut views: Vec<usize> = (0..graph.shapes.len()).collect();
            for node in graph.nodes.iter().filter(|n| matches!(n.op, Op::Reshape)) {
                views[node.output] = views[node.inputs[0]];
            }
            is16 = match which {
                Sixteen::Activations { wide_output } => {
                    sixteen_bit_values(graph, &views, wide_output)
                }
                Sixteen::Logits => logit_values(graph, &views),
            };
            for value in (0..is16.len()).filter(|&v| is16[v]) {
                limits[value] = code_limit(graph, &views, value);
                let q = minmax[value];
                let largest = q.scale
                    * f32::from(i16::from(q.zero_point) + 128)
                        .max(f32::from(127 - i16::from(q.zero_point)));
                params[value] = ActivationQuant {
                    scale: largest.max(f32::MIN_POSITIVE) / limits[value] as f32,
                    zero_point: 0,
                };
            }
        }
        // Whether a function's output at `value` can be widened: every reader takes a table,
        // which the 16-bit kernels (a reader writing 16-bit logits) do not.
        let writes_16 = is16.clone();
        let widenable = |value: usize| {
            value != graph.output
                && readers(value) > 0
                && graph
                    .nodes
                    .iter()
                    .filter(|n| n.inputs.contains(&value))
                    .all(|n| {
                        matches!(n.op, Op::Conv { .. } | Op::GlobalAveragePool | Op::Mul)
                            && !writes_16[n.output]
                    })
        };
        for (index, node) in graph.nodes.iter().enumerate() {
            if skip[index] {
                continue;
            }
            // Values as the node names them (a widened function's output among them), and as
            // the step reads them (that function's input instead).
            let named: Vec<usize> = node.inputs.iter().map(|&i| alias[i]).collect();
            let inputs: Vec<usize> = named
                .iter()
                .map(|&i| widened[i].as_ref().map_or(i, |w| w.input))
                .collect();
            let input = inputs[0];
            // An element-wise function: one table, or none where it is widened.
            let function: Option<Rc<dyn Fn(f32) -> f32>> = match node.op {
                Op::Sigmoid => Some(Rc::new(sigmoid)),
                Op::HardSigmoid { alpha, beta } => {
                    Some(Rc::new(move |x: f32| hard_sigmoid(x, alpha, beta)))
                }
                Op::HardSwish => Some(Rc::new(hard_swish)),
                Op::Relu => Some(Rc::new(|x: f32| x.max(0.0))),
                Op::Clip { min, max } => Some(Rc::new(move |x: f32| x.clamp(min, max))),
                _ => None,
            };
            if let Some(f) = function {
                // x * gate(x) where the gate feeds only this Mul: SiLU, or HardSwish as PyTorch
                // exports it before opset 14: one table.
                let gated = reader(node.output).filter(|(_, next)| {
                    matches!(node.op, Op::Sigmoid | Op::HardSigmoid { .. })
                        && readers(node.output) == 1
                        && matches!(next.op, Op::Mul)
                        && next.inputs.contains(&node.inputs[0])
                        && next.inputs.contains(&node.output)
                });
                let (f, value): (Rc<dyn Fn(f32) -> f32>, usize) = match gated {
                    Some((i, mul)) => {
                        skip[i] = true;
                        (Rc::new(move |x: f32| x * f(x)), mul.output)
                    }
                    None => (f, node.output),
                };
                if widen.contains(&node.name) && widenable(value) {
                    widened[value] = Some(Widened { input, f });
                    continue;
                }
                if is16[input] {
                    // Both ends 16-bit (an element-wise node sees one width); the table's
                    // codes within the output's limit, so interpolated ones are too.
                    let limit = limits[value] as i16;
                    let mut table =
                        build_function16(params[input].scale, params[value].scale, &*f).to_vec();
                    table
                        .iter_mut()
                        .for_each(|t| *t = (*t).clamp(-limit, limit));
                    steps.push(Step {
                        name: node.name.clone(),
                        layer: Layer::Function16(table),
                        inputs: vec![input],
                        output: value,
                    });
                    continue;
                }
                let (q, out) = (params[input], params[value]);
                let table = build_lut(
                    q.scale,
                    i32::from(q.zero_point),
                    out.scale,
                    i32::from(out.zero_point),
                    &*f,
                );
                steps.push(Step {
                    name: node.name.clone(),
                    layer: Layer::Lut(table.to_vec()),
                    inputs: vec![input],
                    output: value,
                });
                continue;
            }
            // An activation that nothing else reads is folded into this layer's clamp.
            let fused = reader(node.output).filter(|(_, next)| {
                readers(node.output) == 1
                    && node.output != graph.output
                    && matches!(next.op, Op::Relu | Op::Clip { .. })
                    && matches!(node.op, Op::Conv { .. } | Op::Gemm { .. } | Op::Add)
            });
            let out_id = match fused {
                Some((i, next)) => {
                    skip[i] = true;
                    next.output
                }
                None => node.output,
            };
            // A Conv whose output only a channel Concat reads writes into the Concat's output,
            // on its grid: one rounding instead of two, and no copy. Only where its part starts
            // on an arena alignment boundary, as every tensor does.
            let concat = reader(out_id)
                .map(|(_, n)| n)
                .filter(|n| matches!(n.op, Op::Concat));
            if let (Op::Conv { .. }, Some(concat)) = (&node.op, concat) {
                let offset: usize = concat
                    .inputs
                    .iter()
                    .take_while(|&&i| i != out_id)
                    .map(|&i| graph.shapes[i].iter().product::<usize>())
                    .sum();
                if readers(out_id) == 1
                    && out_id != graph.output
                    && concat.inputs.iter().filter(|&&i| i == out_id).count() == 1
                    && offset.is_multiple_of(ALIGN)
                {
                    in_place[out_id] = Some((concat.output, offset));
                    params[out_id] = params[concat.output];
                }
            }
            let out = params[out_id];
            let (min, max) = match fused.map(|(_, n)| &n.op) {
                Some(Op::Relu) => (out.zero_point, 127),
                Some(Op::Clip { min, max }) => (out.code(*min), out.code(*max)),
                _ => (-128, 127),
            };
            let output_quant = OutputQuant {
                zero_point: i32::from(out.zero_point),
                min,
                max,
            };
            let output16 = if is16[out_id] {
                let limit = limits[out_id];
                let code16 = |real: f32| {
                    ((real / out.scale).round() as i64).clamp(-i64::from(limit), i64::from(limit))
                        as i32
                };
                let (min, max) = match fused.map(|(_, n)| &n.op) {
                    Some(Op::Relu) => (0, limit),
                    Some(Op::Clip { min, max }) => (code16(*min), code16(*max)),
                    _ => (-limit, limit),
                };
                WideOutput {
                    width: Width::I16,
                    zero_point: 0,
                    min,
                    max,
                }
            } else {
                WideOutput {
                    width: Width::I8,
                    zero_point: output_quant.zero_point,
                    min: i32::from(min),
                    max: i32::from(max),
                }
            };
            let input_width = if is16[input] { Width::I16 } else { Width::I8 };
            let sixteen = is16[input] || is16[out_id];
            let conv16 = |geometry, weights, bias, requant| Layer::Conv16 {
                geometry,
                weights,
                bias,
                requant,
                input_width,
                input_zero_point: i32::from(params[input].zero_point),
                output: output16,
            };
            let input_scale = f64::from(params[input].scale);
            let input_zero_point = i32::from(params[input].zero_point);
            let rescale = |from: usize| -> Result<int8::Rescale, ImportError> {
                Ok(int8::Rescale {
                    input_zero_point: i32::from(params[from].zero_point),
                    requant: requant(
                        f64::from(params[from].scale) / f64::from(out.scale),
                        &node.name,
                    )?,
                    output_quant,
                })
            };
            // Weights per output channel, biases in the accumulator scale, and the
            // accumulator-to-output requantisation of each channel.
            let quantize_layer = |weight: &[f32], channels: usize, bias: &[f32], scale: f32| {
                let q = quantize_weights_per_channel(weight, channels, bias, scale);
                let requant = q
                    .scales
                    .iter()
                    .map(|s| {
                        requant(
                            f64::from(scale) * f64::from(*s) / f64::from(out.scale),
                            &node.name,
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, ImportError>((q.values, q.bias, requant))
            };
            let shape = &graph.shapes[node.inputs[0]];
            let out_shape = &graph.shapes[node.output];
            let pool_geometry =
                |kernel: [usize; 2], stride: [usize; 2], pads: [usize; 4]| PoolGeometry {
                    channels: shape[1],
                    input: [shape[2], shape[3]],
                    output: [out_shape[2], out_shape[3]],
                    kernel,
                    stride,
                    pad: [pads[0], pads[1]],
                };
            // The table of a widened input, and its scale, for `terms` products with weights up
            // to `weight` in magnitude.
            let wide = |value: usize, terms: usize, weight: f64| {
                widened[value]
                    .as_ref()
                    .map(|w| w.table(params[w.input], terms, weight))
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
                    let terms = weight_shape[1] * weight_shape[2] * weight_shape[3];
                    let table = wide(named[0], terms, 127.0);
                    let scale = table.map_or(params[input].scale, |(_, scale)| scale);
                    let (weights, bias, requant) =
                        quantize_layer(weight, weight_shape[0], bias, scale)?;
                    let geometry = ConvGeometry {
                        input: [shape[1], shape[2], shape[3]],
                        output: [out_shape[1], out_shape[2], out_shape[3]],
                        kernel: [weight_shape[2], weight_shape[3]],
                        stride: *stride,
                        pad: [pads[0], pads[1]],
                        dilation: *dilation,
                        group: *group,
                    };
                    if sixteen {
                        conv16(geometry, weights, bias, requant)
                    } else {
                        Layer::Conv {
                            geometry,
                            weights,
                            bias,
                            requant,
                            input_zero_point,
                            output_quant,
                            input_table: table.map(|(table, _)| Box::new(table)),
                        }
                    }
                }
                Op::Gemm {
                    weight,
                    out_features,
                    bias,
                } => {
                    let (weights, bias, requant) =
                        quantize_layer(weight, *out_features, bias, params[input].scale)?;
                    if sixteen {
                        // A 1x1 convolution of one pixel: the same weights, `[out, in, 1, 1]`.
                        let geometry = ConvGeometry {
                            input: [shape[1], 1, 1],
                            output: [*out_features, 1, 1],
                            kernel: [1, 1],
                            stride: [1, 1],
                            pad: [0, 0],
                            dilation: [1, 1],
                            group: 1,
                        };
                        conv16(geometry, weights, bias, requant)
                    } else {
                        Layer::Gemm {
                            weights,
                            bias,
                            requant,
                            input_zero_point,
                            output_quant,
                        }
                    }
                }
                Op::Add if sixteen => {
                    let rescale = |from: usize| {
                        requant(
                            f64::from(params[from].scale) / f64::from(out.scale),
                            &node.name,
                        )
                    };
                    Layer::Add16(int16::Add16 {
                        requant: [rescale(inputs[0])?, rescale(inputs[1])?],
                        output: output16,
                    })
                }
                Op::Mul if sixteen => Layer::Mul16(int16::Mul16 {
                    requant: requant(
                        f64::from(params[inputs[0]].scale) * f64::from(params[inputs[1]].scale)
                            / f64::from(out.scale),
                        &node.name,
                    )?,
                    output: output16,
                }),
                Op::GlobalAveragePool if sixteen => {
                    let plane = shape[2] * shape[3];
                    Layer::GlobalAveragePool16(int16::GlobalAveragePool16 {
                        channels: shape[1],
                        requant: requant(
                            input_scale / (f64::from(out.scale) * plane as f64),
                            &node.name,
                        )?,
                        output: output16,
                    })
                }
                Op::Add => {
                    let [a, b] = [rescale(inputs[0])?, rescale(inputs[1])?];
                    Layer::Add(int8::Add {
                        input_zero_points: [a.input_zero_point, b.input_zero_point],
                        requant: [a.requant, b.requant],
                        output_quant,
                    })
                }
                Op::Mul => {
                    // x * Sigmoid(x) where the Sigmoid feeds only this Mul: SiLU, done above.
                    let tables = [wide(named[0], 1, 1.0), wide(named[1], 1, 1.0)];
                    let [a, b] = [0, 1].map(|i| {
                        tables[i].map_or(f64::from(params[inputs[i]].scale), |(_, scale)| {
                            f64::from(scale)
                        })
                    });
                    Layer::Mul(
                        int8::Mul {
                            input_zero_points: [0, 1]
                                .map(|i| i32::from(params[inputs[i]].zero_point)),
                            requant: requant(a * b / f64::from(out.scale), &node.name)?,
                            output_quant,
                        },
                        tables.map(|t| t.map(|(table, _)| Box::new(table))),
                    )
                }
                Op::Sigmoid
                | Op::HardSigmoid { .. }
                | Op::HardSwish
                | Op::Relu
                | Op::Clip { .. } => unreachable!("functions became tables above"),
                Op::Concat => Layer::Concat(
                    inputs
                        .iter()
                        .map(|&i| rescale(i))
                        .collect::<Result<_, _>>()?,
                ),
                Op::GlobalAveragePool => {
                    let plane = shape[2] * shape[3];
                    let table = wide(named[0], plane, 1.0);
                    let scale = table.map_or(input_scale, |(_, scale)| f64::from(scale));
                    Layer::GlobalAveragePool(
                        int8::GlobalAveragePool {
                            channels: shape[1],
                            input_zero_point,
                            requant: requant(
                                scale / (f64::from(out.scale) * plane as f64),
                                &node.name,
                            )?,
                            output_quant,
                        },
                        table.map(|(table, _)| Box::new(table)),
                    )
                }
                Op::MaxPool {
                    kernel,
                    stride,
                    pads,
                } => {
                    // Max commutes with quantisation: same codes, same grid.
                    params[out_id] = params[input];
                    Layer::MaxPool(int8::MaxPool {
                        geometry: pool_geometry(*kernel, *stride, *pads),
                    })
                }
                Op::AveragePool {
                    kernel,
                    stride,
                    pads,
                    count_include_pad,
                } => Layer::AveragePool(int8::AveragePool {
                    geometry: pool_geometry(*kernel, *stride, *pads),
                    count_include_pad: *count_include_pad,
                    input_zero_point,
                    requant: requant(input_scale / f64::from(out.scale), &node.name)?,
                    output_quant,
                }),
                Op::Resize { bilinear } => {
                    params[out_id] = params[input];
                    Layer::Resize(int8::Resize {
                        channels: shape[1],
                        input: [shape[2], shape[3]],
                        output: [out_shape[2], out_shape[3]],
                        mode: if *bilinear {
                            ResizeMode::Bilinear
                        } else {
                            ResizeMode::Nearest
                        },
                    })
                }
                Op::Gather { indices, plane } => {
                    // A copy: same codes, same grid.
                    params[out_id] = params[input];
                    let indices = indices
                        .iter()
                        .map(|&i| {
                            u32::try_from(i).map_err(|_| unsupported(node, "4 billion planes"))
                        })
                        .collect::<Result<_, _>>()?;
                    Layer::Gather(indices, *plane)
                }
                Op::Attention {
                    heads,
                    key_dim,
                    head_dim,
                    scale,
                } => {
                    let size = |v: usize| {
                        u32::try_from(v).map_err(|_| unsupported(node, "attention this large"))
                    };
                    Layer::Attention(int8::Attention {
                        heads: size(*heads)?,
                        key_dim: size(*key_dim)?,
                        head_dim: size(*head_dim)?,
                        plane: size(shape[3])?,
                        input_zero_point,
                        // A logit is scale * input_scale^2 * (code product sum).
                        logit_to_index: requant(
                            input_scale * input_scale * f64::from(*scale)
                                / int8::Attention::EXP_STEP,
                            &node.name,
                        )?,
                        // The weighted mean of value codes carries 16 fraction bits.
                        output_requant: requant(
                            input_scale
                                / f64::from(out.scale)
                                / f64::from(int8::Attention::MEAN_ONE),
                            &node.name,
                        )?,
                        output_quant,
                    })
                }
                Op::Softmax => {
                    if node.output != graph.output {
                        return Err(unsupported(node, "Softmax anywhere but at the output"));
                    }
                    output = input;
                    output_softmax = true;
                    continue;
                }
                Op::Reshape => {
                    alias[node.output] = input;
                    params[node.output] = params[input];
                    is16[node.output] = is16[input];
                    if node.output == graph.output {
                        output = input;
                    }
                    continue;
                }
            };
            steps.push(Step {
                name: node.name.clone(),
                layer,
                inputs,
                output: out_id,
            });
        }
        let sizes = graph
            .shapes
            .iter()
            .zip(&is16)
            .map(|(s, &wide)| s.iter().product::<usize>() * if wide { 2 } else { 1 })
            .collect();
        Ok(Self {
            steps,
            params,
            sizes,
            wide: is16,
            output: alias[output],
            output_softmax,
            in_place,
        })
    }

    /// Place every tensor in one arena; a Concat part written in place lies inside its Concat.
    pub fn arena(&self) -> ArenaLayout {
        let mut layout = plan(&lifetimes(self));
        for (id, part) in self.in_place.iter().enumerate() {
            if let Some((concat, offset)) = *part {
                layout.offsets[id] = layout.offsets[concat].map(|start| start + offset);
            }
        }
        layout
    }

    /// Encode the program as a plan file. `header` supplies the name, preprocessing and labels;
    /// shapes, quantisation and the arena come from the program.
    pub fn to_plan(&self, header: &PlanHeader<'_>) -> Result<Vec<u8>, ImportError> {
        let too_big = |what: &str| ImportError::Malformed {
            node: "plan".into(),
            reason: format!("{what} does not fit the plan format"),
        };
        let layout = self.arena();
        let mut builder = ProgramBuilder::default();
        // Tensor ids are value ids; values the program never touches get an empty slot.
        for (id, offset) in layout.offsets.iter().enumerate() {
            match offset {
                Some(offset) => builder.tensor(*offset, self.sizes[id]),
                None => builder.tensor(0, 0),
            };
        }
        let id = |value: usize| TensorId::try_from(value).map_err(|_| too_big("tensor count"));
        for step in &self.steps {
            let output = id(step.output)?;
            let first = id(step.inputs[0])?;
            let second = id(*step.inputs.get(1).unwrap_or(&step.inputs[0]))?;
            let op = match &step.layer {
                Layer::Conv {
                    geometry,
                    weights,
                    bias,
                    requant,
                    input_zero_point,
                    output_quant,
                    input_table,
                } => {
                    let (weights, channels) =
                        (builder.i8_blob(weights), builder.channels(bias, requant));
                    let (input_zero_point, output_quant) = (*input_zero_point, *output_quant);
                    if let Some(table) = input_table {
                        PlanOp::ConvWide {
                            geometry: *geometry,
                            weights,
                            channels,
                            table: builder.i16_blob(&table[..]),
                            output_quant,
                        }
                    } else if is_one_pixel_pointwise(geometry) {
                        // A 1x1 convolution of one pixel (squeeze-excite's, after the global
                        // pooling) is a matrix-vector product, and its weights `[out, in, 1, 1]`
                        // are the Gemm's `[out, in]`: the same bytes out, without a convolution
                        // kernel's 16-pixel tiles computing 15 pixels for nothing.
                        PlanOp::Gemm {
                            weights,
                            channels,
                            input_zero_point,
                            output_quant,
                        }
                    } else {
                        PlanOp::Conv {
                            geometry: *geometry,
                            weights,
                            channels,
                            input_zero_point,
                            output_quant,
                        }
                    }
                }
                Layer::Gemm {
                    weights,
                    bias,
                    requant,
                    input_zero_point,
                    output_quant,
                } => PlanOp::Gemm {
                    weights: builder.i8_blob(weights),
                    channels: builder.channels(bias, requant),
                    input_zero_point: *input_zero_point,
                    output_quant: *output_quant,
                },
                Layer::Add(add) => PlanOp::Add(*add),
                Layer::Mul(mul, [None, None]) => PlanOp::Mul(*mul),
                Layer::Mul(mul, tables) => PlanOp::MulWide {
                    mul: *mul,
                    tables: tables
                        .each_ref()
                        .map(|t| builder.i16_blob(t.as_deref().map_or(&[], |t| &t[..]))),
                },
                Layer::GlobalAveragePool(pool, None) => PlanOp::GlobalAveragePool(*pool),
                Layer::GlobalAveragePool(pool, Some(table)) => PlanOp::GlobalAveragePoolWide {
                    pool: *pool,
                    table: builder.i16_blob(&table[..]),
                },
                Layer::MaxPool(pool) => PlanOp::MaxPool(*pool),
                Layer::AveragePool(pool) => PlanOp::AveragePool(*pool),
                Layer::Resize(resize) => PlanOp::Resize(*resize),
                Layer::Lut(table) => PlanOp::Lut {
                    table: builder.i8_blob(table),
                },
                Layer::Gather(indices, plane) => PlanOp::Gather {
                    indices: builder.u32_blob(indices),
                    plane: u32::try_from(*plane).map_err(|_| too_big("gather"))?,
                },
                Layer::Conv16 {
                    geometry,
                    weights,
                    bias,
                    requant,
                    input_width,
                    input_zero_point,
                    output,
                } => PlanOp::Conv16 {
                    geometry: *geometry,
                    weights: builder.i8_blob(weights),
                    channels: builder.channels(bias, requant),
                    input_width: *input_width,
                    input_zero_point: *input_zero_point,
                    output: *output,
                },
                Layer::Add16(add) => PlanOp::Add16(*add),
                Layer::Mul16(mul) => PlanOp::Mul16(*mul),
                Layer::GlobalAveragePool16(pool) => PlanOp::GlobalAveragePool16(*pool),
                Layer::Function16(table) => PlanOp::Function16 {
                    table: builder.i16_blob(table),
                },
                Layer::Attention(attention) => PlanOp::Attention {
                    attention: *attention,
                    exp_table: builder.i32_blob(&int8::Attention::exp_table()),
                },
                Layer::Concat(parts) => {
                    let mut offset = 0usize;
                    for (&input, rescale) in step.inputs.iter().zip(parts) {
                        if self.in_place[input].is_some() {
                            offset += self.sizes[input];
                            continue;
                        }
                        let op = PlanOp::Rescale {
                            rescale: *rescale,
                            offset: u32::try_from(offset).map_err(|_| too_big("concat"))?,
                        };
                        let inputs = [id(input)?, id(input)?];
                        builder
                            .push(PlanStep { op, inputs, output })
                            .map_err(|e| too_big(&format!("step {} ({e})", step.name)))?;
                        offset += self.sizes[input];
                    }
                    continue;
                }
            };
            builder
                .push(PlanStep {
                    op,
                    inputs: [first, second],
                    output,
                })
                .map_err(|e| too_big(&format!("step {} ({e})", step.name)))?;
        }
        let (input, output) = (self.params[0], self.params[self.output]);
        let header = PlanHeader {
            arena_size: u32::try_from(layout.size).map_err(|_| too_big("arena"))?,
            output_tensor: id(self.output)?,
            output_len: u32::try_from(
                self.sizes[self.output] / if self.wide[self.output] { 2 } else { 1 },
            )
            .map_err(|_| too_big("output"))?,
            input_scale: input.scale,
            input_zero_point: i32::from(input.zero_point),
            output_scale: output.scale,
            output_zero_point: i32::from(output.zero_point),
            output_softmax: self.output_softmax,
            ..header.clone()
        };
        builder
            .finish(&header)
            .map_err(|e| too_big(&format!("header ({e})")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_node(op: Op, input: Vec<usize>, output: Vec<usize>) -> Graph {
        Graph {
            shapes: vec![input, output],
            names: vec!["x".into(), "y".into()],
            nodes: vec![Node {
                name: "layer".into(),
                op,
                inputs: vec![0],
                output: 1,
            }],
            output: 1,
        }
    }

    fn bias(graph: &Graph) -> Vec<f32> {
        match &graph.nodes[0].op {
            Op::Conv { bias, .. } | Op::Gemm { bias, .. } => bias.clone(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn taps_are_weighted_by_the_share_of_outputs_they_read_the_input_at() {
        // 3 taps, padding 1 on a 2-pixel axis: the outer taps read padding at one of 2 outputs.
        assert_eq!(tap_shares(2, 2, 3, 1, 1, 1), [0.5, 1.0, 0.5]);
        // Stride 2 over 4 pixels: only the first tap ever reads the padding (at output 0).
        assert_eq!(tap_shares(4, 2, 3, 2, 1, 1), [0.5, 1.0, 1.0]);
        // Dilation 2, no padding, 5 pixels to 1 output: every tap inside.
        assert_eq!(tap_shares(5, 1, 3, 1, 0, 2), [1.0, 1.0, 1.0]);
    }

    #[test]
    fn the_bias_takes_the_mean_error_of_the_int8_weights_and_inputs() {
        // Scale 1/127 (the largest weight, 1.0): 0.3 rounds to 38/127.
        let gemm = Op::Gemm {
            weight: vec![1.0, 0.3],
            out_features: 1,
            bias: vec![0.5],
        };
        let graph = one_node(gemm, vec![1, 2], vec![1, 1]);
        let rounding = 38.0 / 127.0 - 0.3;
        let means = vec![vec![2.0, 5.0], vec![0.0]];
        let corrected = bias(&bias_corrected(&graph, &means, &means));
        assert!((f64::from(corrected[0]) - (0.5 - rounding * 5.0)).abs() < 1e-6);
        // The int8 input carries 2.1 for the first feature's mean 2.0: 0.1 more, times 1.0.
        let int8 = vec![vec![2.1, 5.0], vec![0.0]];
        let corrected = bias(&bias_corrected(&graph, &means, &int8));
        let expected = 0.5 - (2.1 - 2.0) - (38.0 / 127.0 * 5.0 - 0.3 * 5.0);
        assert!((f64::from(corrected[0]) - expected).abs() < 1e-6);
    }

    #[test]
    fn a_depthwise_tap_that_reads_padding_half_the_time_counts_half() {
        // Depthwise 3x1 over a 2x1 plane, padding 1 above and below, two channels: channel 0's
        // top tap (0.2 -> 25/127 at scale 1/127) reads the input at one of the two outputs.
        let conv = Op::Conv {
            weight: vec![0.2, 1.0, 0.0, 0.0, 1.0, 0.0],
            weight_shape: [2, 1, 3, 1],
            bias: vec![],
            stride: [1, 1],
            pads: [1, 0, 1, 0],
            dilation: [1, 1],
            group: 2,
        };
        let graph = one_node(conv, vec![1, 2, 2, 1], vec![1, 2, 2, 1]);
        let means = vec![vec![3.0, 7.0], vec![0.0, 0.0]];
        let corrected = bias(&bias_corrected(&graph, &means, &means));
        let expected = -(25.0 / 127.0 - 0.2) * 3.0 * 0.5;
        assert!(
            (f64::from(corrected[0]) - expected).abs() < 1e-7,
            "{corrected:?}"
        );
        // Channel 1 reads only its own mean (7.0); its weights round exactly (to the f32
        // rounding of their scale).
        assert!(corrected[1].abs() < 1e-6, "{corrected:?}");
    }
}
