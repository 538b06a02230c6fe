//! The compiler's view of a float ONNX model: a topologically ordered list of nodes over named
//! values with known shapes, weights as plain f32 arrays, and a float interpreter that the
//! quantiser calibrates with (it exposes every intermediate tensor) and that is checked
//! against tract.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{self, tensor_proto::DataType, NodeProto, TensorProto};
use tract_onnx::prelude::Framework;

/// Why an ONNX model cannot be imported. Messages name the node.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Not an ONNX protobuf.
    #[error("not an ONNX model: {0}")]
    Decode(String),
    /// An operator the int8 compiler does not support (yet).
    #[error("node '{node}': operator {op} is not supported by the Kestrel compiler")]
    Unsupported {
        /// Node name.
        node: String,
        /// ONNX operator.
        op: String,
    },
    /// Operators the int8 compiler does not support (yet), every node that uses one, in graph
    /// order: a user learns of them all in one run.
    #[error("{}", describe_unsupported(nodes))]
    UnsupportedOps {
        /// (node name, ONNX operator) of each.
        nodes: Vec<(String, String)>,
    },
    /// A node whose attributes, inputs or shapes make no sense.
    #[error("node '{node}': {reason}")]
    Malformed {
        /// Node name (or the graph input/output).
        node: String,
        /// What is wrong.
        reason: String,
    },
}

/// The nodes that compute `outputs` (every node when none are named), in graph order.
fn needed_nodes<'g>(
    graph: &'g pb::GraphProto,
    outputs: &[String],
) -> Result<Vec<&'g NodeProto>, ImportError> {
    if outputs.is_empty() {
        return Ok(graph.node.iter().collect());
    }
    let producer: HashMap<&str, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
        .collect();
    let mut needed = vec![false; graph.node.len()];
    let mut wanted: Vec<&str> = Vec::new();
    for name in outputs {
        if !producer.contains_key(name.as_str()) {
            return Err(malformed(name, "no node computes it"));
        }
        wanted.push(name);
    }
    while let Some(name) = wanted.pop() {
        if let Some(&i) = producer.get(name) {
            if !needed[i] {
                needed[i] = true;
                wanted.extend(graph.node[i].input.iter().map(String::as_str));
            }
        }
    }
    Ok(graph
        .node
        .iter()
        .zip(needed)
        .filter_map(|(n, keep)| keep.then_some(n))
        .collect())
}

/// "N nodes use operators ...: Op (node names), ..." grouped by operator in first-seen order.
fn describe_unsupported(nodes: &[(String, String)]) -> String {
    let mut ops: Vec<(&str, Vec<&str>)> = Vec::new();
    for (node, op) in nodes {
        match ops.iter_mut().find(|(o, _)| o == op) {
            Some((_, names)) => names.push(node),
            None => ops.push((op, vec![node])),
        }
    }
    let listed: Vec<String> = ops
        .iter()
        .map(|(op, names)| {
            let shown: Vec<String> = names.iter().take(3).map(|n| format!("'{n}'")).collect();
            let more = names.len().saturating_sub(3);
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            format!("{op} ({}{more})", shown.join(", "))
        })
        .collect();
    format!(
        "{} node{} use{} operators the Kestrel compiler does not support: {}",
        nodes.len(),
        if nodes.len() == 1 { "" } else { "s" },
        if nodes.len() == 1 { "s" } else { "" },
        listed.join("; ")
    )
}

/// Every ONNX operator the importer takes (Constant nodes are folded as they are read).
pub const SUPPORTED_OPS: &[&str] = &[
    "Constant",
    "Identity",
    "Dropout",
    "BatchNormalization",
    "Conv",
    "Gemm",
    "MatMul",
    "Relu",
    "Sigmoid",
    "HardSigmoid",
    "HardSwish",
    "Clip",
    "Add",
    "Mul",
    "Concat",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Resize",
    "Upsample",
    "Softmax",
    "Flatten",
    "Reshape",
    "Slice",
    "Split",
    "Transpose",
    "ReduceMean",
    // Shape arithmetic, folded at compile time: only on constants and static shapes.
    "Shape",
    "Gather",
    "Sub",
    "Div",
    "Cast",
    "Unsqueeze",
    "Squeeze",
];

/// An operation with its constant parameters folded in.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// 2-D convolution, NCHW, weights `[out, in / group, kh, kw]`.
    Conv {
        /// Weights, row-major.
        weight: Vec<f32>,
        /// `[out, in / group, kh, kw]`.
        weight_shape: [usize; 4],
        /// One per output channel (zeros when the model has none).
        bias: Vec<f32>,
        /// Vertical, horizontal.
        stride: [usize; 2],
        /// Top, left, bottom, right.
        pads: [usize; 4],
        /// Vertical, horizontal.
        dilation: [usize; 2],
        /// Groups (1 = dense, channels = depthwise).
        group: usize,
    },
    /// `y = x W^T + b`, weights `[out, in]`.
    Gemm {
        /// Weights, row-major `[out, in]`.
        weight: Vec<f32>,
        /// Output features.
        out_features: usize,
        /// One per output feature.
        bias: Vec<f32>,
    },
    /// max(x, 0).
    Relu,
    /// Clamp to `[min, max]` (ReLU6 is `[0, 6]`).
    Clip {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
    /// Logistic function.
    Sigmoid,
    /// `clamp(alpha * x + beta, 0, 1)`.
    HardSigmoid {
        /// Slope (ONNX's default 0.2; PyTorch exports 1/6).
        alpha: f32,
        /// Offset (0.5).
        beta: f32,
    },
    /// `x * clamp(x / 6 + 1/2, 0, 1)` (opset 14 and later).
    HardSwish,
    /// Element-wise sum of two tensors of the same shape.
    Add,
    /// Product of two tensors: same shape, one value per channel (`[N, C, 1, 1]`) or a scalar.
    Mul,
    /// Join tensors along the channel axis.
    Concat,
    /// Window maximum; padded positions are ignored.
    MaxPool {
        /// Window height, width.
        kernel: [usize; 2],
        /// Vertical, horizontal.
        stride: [usize; 2],
        /// Top, left, bottom, right.
        pads: [usize; 4],
    },
    /// Window mean.
    AveragePool {
        /// Window height, width.
        kernel: [usize; 2],
        /// Vertical, horizontal.
        stride: [usize; 2],
        /// Top, left, bottom, right.
        pads: [usize; 4],
        /// Padded positions count as zeros in the mean.
        count_include_pad: bool,
    },
    /// Mean over H and W, keeping `[N, C, 1, 1]`.
    GlobalAveragePool,
    /// Resample H and W to the output shape.
    Resize {
        /// Bilinear (`half_pixel`) rather than nearest (`asymmetric`, `floor`).
        bilinear: bool,
    },
    /// Softmax over the last axis.
    Softmax,
    /// Same values in a new shape (Flatten, Reshape).
    Reshape,
    /// Multi-head self-attention over pixels, ultralytics' C2PSA block: the input
    /// `[1, heads, 2 * key_dim + head_dim, pixels]` holds each head's queries, keys and values;
    /// the output `[1, heads, head_dim, pixels]` is `v softmax(scale * q^T k)^T` per head.
    Attention {
        /// Heads.
        heads: usize,
        /// Query and key planes per head.
        key_dim: usize,
        /// Value planes per head.
        head_dim: usize,
        /// Factor on the logits (`key_dim^-0.5`).
        scale: f32,
    },
    /// Planes copied in a new order: output plane `i` is input plane `indices[i]`. A channel
    /// Slice or Split, or a Transpose that keeps the batch and trailing axes (ShuffleNet's
    /// channel shuffle).
    Gather {
        /// Input plane of each output plane.
        indices: Vec<usize>,
        /// Values per plane.
        plane: usize,
    },
}

/// One node: an op reading value ids and writing one value id.
#[derive(Clone, Debug)]
pub struct Node {
    /// ONNX node name.
    pub name: String,
    /// The operation.
    pub op: Op,
    /// Ids of the values read (activations only; constants live in the op).
    pub inputs: Vec<usize>,
    /// Id of the value written.
    pub output: usize,
}

/// A float model in topological order.
#[derive(Clone, Debug)]
pub struct Graph {
    /// Shape of every value, by id; value 0 is the graph input.
    pub shapes: Vec<Vec<usize>>,
    /// ONNX names of the values, by id.
    pub names: Vec<String>,
    /// Nodes in execution order.
    pub nodes: Vec<Node>,
    /// Id of the graph output.
    pub output: usize,
}

fn malformed(node: &str, reason: impl Into<String>) -> ImportError {
    ImportError::Malformed {
        node: node.to_string(),
        reason: reason.into(),
    }
}

fn tensor_f32(t: &TensorProto) -> Result<(Vec<usize>, Vec<f32>), String> {
    let dims: Vec<usize> = t
        .dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| "negative dimension".to_string()))
        .collect::<Result<_, _>>()?;
    // int64 constants (shapes, sizes) are small integers: exact as f32.
    let values: Vec<f32> = if t.data_type == DataType::Float as i32 {
        if t.raw_data.is_empty() {
            t.float_data.clone()
        } else {
            t.raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        }
    } else if t.data_type == DataType::Int64 as i32 {
        if t.raw_data.is_empty() {
            t.int64_data.iter().map(|&v| v as f32).collect()
        } else {
            t.raw_data
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()) as f32)
                .collect()
        }
    } else {
        return Err(format!("constant {} is neither float32 nor int64", t.name));
    };
    if values.len() != dims.iter().product::<usize>() {
        return Err(format!(
            "initializer {} has {} values for shape {dims:?}",
            t.name,
            values.len()
        ));
    }
    Ok((dims, values))
}

fn ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.ints.clone())
}

fn int(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

fn pair(node: &NodeProto, name: &str, default: usize) -> Result<[usize; 2], ImportError> {
    match ints(node, name).as_deref() {
        None => Ok([default; 2]),
        Some(&[a, b]) if a > 0 && b > 0 => Ok([a as usize, b as usize]),
        Some(other) => Err(malformed(
            &node.name,
            format!("{name} {other:?} is not two positive integers"),
        )),
    }
}

fn decode_graph(bytes: &[u8]) -> Result<pb::GraphProto, ImportError> {
    let model = tract_onnx::onnx()
        .proto_model_for_read(&mut &bytes[..])
        .map_err(|e| ImportError::Decode(format!("{e:#}").replace('\n', " ")))?;
    model
        .graph
        .ok_or_else(|| ImportError::Decode("no graph".into()))
}

/// The tensors of an ultralytics YOLO export's raw head, in the order Kestrel's YOLO head lays
/// them out (`kestrel_runtime::detect::YoloLayout`): per scale, the box distributions, then the
/// class logits (one tensor per scale where the export joins them).
///
/// ultralytics' `Detect` head reshapes each scale's `[1, C, H, W]` output to `[1, C, H * W]`
/// and joins the scales along the last axis: one such Concat for the boxes and one for the class
/// scores, which a Sigmoid reads (YOLOv8 and YOLO11 exports), or one for both (older exports).
/// What follows (the distribution decoding, anchors and sigmoid) is left to the runtime's
/// decoder, in float: an int8 tensor holding pixel coordinates and 0..1 scores on one scale
/// would lose the scores.
pub fn yolo_head_outputs(bytes: &[u8]) -> Result<Vec<String>, ImportError> {
    let graph = decode_graph(bytes)?;
    let producer = |name: &str| {
        graph
            .node
            .iter()
            .find(|n| n.output.iter().any(|o| o == name))
    };
    let reshaped_scales = |concat: &NodeProto| -> Option<Vec<String>> {
        let axis = int(concat, "axis")?;
        if !(axis == -1 || axis == 2) {
            return None;
        }
        concat
            .input
            .iter()
            .map(|i| {
                let reshape = producer(i).filter(|n| n.op_type == "Reshape")?;
                reshape.input.first().cloned()
            })
            .collect()
    };
    let joins: Vec<(&NodeProto, Vec<String>)> = graph
        .node
        .iter()
        .filter(|n| n.op_type == "Concat")
        .filter_map(|n| Some((n, reshaped_scales(n)?)))
        .collect();
    let read_by_sigmoid = |concat: &NodeProto| {
        graph
            .node
            .iter()
            .any(|n| n.op_type == "Sigmoid" && n.input.iter().any(|i| concat.output.contains(i)))
    };
    let not_found = |reason: &str| ImportError::Malformed {
        node: "graph".into(),
        reason: format!(
            "no ultralytics YOLO head: {reason} (ultralytics' Detect head joins each scale's \
             reshaped output along the last axis, once for boxes and once for class scores)"
        ),
    };
    match &joins[..] {
        [(_, both)] => Ok(both.clone()),
        [(a, a_scales), (b, b_scales)] => {
            let (boxes, scores) = match (read_by_sigmoid(a), read_by_sigmoid(b)) {
                (false, true) => (a_scales, b_scales),
                (true, false) => (b_scales, a_scales),
                _ => return Err(not_found("cannot tell the box join from the score join")),
            };
            if boxes.len() != scores.len() {
                return Err(not_found("the box and score joins have different scales"));
            }
            Ok(boxes
                .iter()
                .zip(scores)
                .flat_map(|(b, s)| [b.clone(), s.clone()])
                .collect())
        }
        [] => Err(not_found(
            "no Concat of reshaped tensors along the last axis",
        )),
        _ => Err(not_found(
            "more than two Concats of reshaped tensors along the last axis",
        )),
    }
}

impl Graph {
    /// Import an ONNX model with one input of fixed shape and one output. BatchNormalization
    /// after a Conv is folded into it; Identity and Dropout vanish.
    pub fn from_onnx(bytes: &[u8]) -> Result<Self, ImportError> {
        Self::import(bytes, &[])
    }

    /// Import what computes the values named `outputs` (ONNX tensor names) and nothing after
    /// them: the graph's output is those values flattened and joined in that order. A YOLO
    /// model is compiled up to its raw head ([`yolo_head_outputs`]) so.
    pub fn from_onnx_up_to(bytes: &[u8], outputs: &[String]) -> Result<Self, ImportError> {
        Self::import(bytes, outputs)
    }

    fn import(bytes: &[u8], outputs: &[String]) -> Result<Self, ImportError> {
        let graph = decode_graph(bytes)?;
        let nodes = needed_nodes(&graph, outputs)?;
        let mut constants: HashMap<String, (Vec<usize>, Vec<f32>)> = HashMap::new();
        // Constants of an integer type: their division truncates.
        let mut integers: HashSet<String> = HashSet::new();
        for t in &graph.initializer {
            let parsed = tensor_f32(t).map_err(|reason| malformed(&t.name, reason))?;
            constants.insert(t.name.clone(), parsed);
            if t.data_type != DataType::Float as i32 {
                integers.insert(t.name.clone());
            }
        }
        let input = graph
            .input
            .iter()
            .find(|i| !constants.contains_key(&i.name))
            .ok_or_else(|| malformed("graph", "no input"))?;
        let input_shape =
            value_shape(input).ok_or_else(|| malformed(&input.name, "input shape is not fixed"))?;
        let mut g = Graph {
            shapes: vec![input_shape],
            names: vec![input.name.clone()],
            nodes: Vec::new(),
            output: 0,
        };
        let mut ids: HashMap<String, usize> = HashMap::from([(input.name.clone(), 0)]);
        // Outputs of nodes an attention block took in whole (see `attention`).
        let mut absorbed: HashSet<String> = HashSet::new();
        let readers = |name: &str| {
            graph
                .node
                .iter()
                .flat_map(|n| &n.input)
                .filter(|i| *i == name)
                .count()
                + graph.output.iter().filter(|o| o.name == name).count()
        };

        let unsupported: Vec<(String, String)> = nodes
            .iter()
            .filter(|n| !SUPPORTED_OPS.contains(&n.op_type.as_str()))
            .map(|n| (n.name.clone(), n.op_type.clone()))
            .collect();
        if !unsupported.is_empty() {
            return Err(ImportError::UnsupportedOps { nodes: unsupported });
        }
        for &node in &nodes {
            let output_name = node
                .output
                .first()
                .ok_or_else(|| malformed(&node.name, "no output"))?;
            if node.op_type == "Constant" {
                let value = node
                    .attribute
                    .iter()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.as_ref())
                    .ok_or_else(|| malformed(&node.name, "Constant without a tensor value"))?;
                let parsed = tensor_f32(value).map_err(|reason| malformed(&node.name, reason))?;
                constants.insert(output_name.clone(), parsed);
                if value.data_type != DataType::Float as i32 {
                    integers.insert(output_name.clone());
                }
                continue;
            }
            // Shape arithmetic on constants and static shapes: folded now, nothing at run time.
            let static_shape = |name: &str| ids.get(name).map(|&id| g.shapes[id].clone());
            if let Some((value, integer)) = fold(node, &constants, &integers, static_shape)? {
                constants.insert(output_name.clone(), value);
                if integer {
                    integers.insert(output_name.clone());
                }
                continue;
            }
            if absorbed.contains(output_name) {
                continue;
            }
            if node.op_type == "Split" && int(node, "axis").is_some_and(|a| a == 2 || a == -2) {
                absorbed.extend(attention(node, &graph, &mut ids, &constants, &mut g)?);
                continue;
            }
            if node.op_type == "Split" {
                split(node, &mut ids, &constants, &mut g)?;
                continue;
            }
            // PyTorch passes shared constants (equal BatchNorm statistics) through Identity.
            if matches!(node.op_type.as_str(), "Identity" | "Dropout") {
                let value = node.input.first().and_then(|n| constants.get(n)).cloned();
                if let Some(value) = value {
                    constants.insert(output_name.clone(), value);
                    continue;
                }
            }
            let mut activations: Vec<usize> = node
                .input
                .iter()
                .filter_map(|name| ids.get(name).copied())
                .collect();
            let constant = |i: usize| node.input.get(i).and_then(|n| constants.get(n.as_str()));
            let first = *activations
                .first()
                .ok_or_else(|| malformed(&node.name, "reads no activation"))?;
            let shape_in = g.shapes[first].clone();
            let nchw = || -> Result<[usize; 4], ImportError> {
                shape_in
                    .clone()
                    .try_into()
                    .map_err(|_| malformed(&node.name, "input is not NCHW"))
            };
            let (op, shape_out) = match node.op_type.as_str() {
                "Identity" | "Dropout" => {
                    ids.insert(output_name.clone(), first);
                    continue;
                }
                "BatchNormalization" => {
                    fold_batch_norm(&mut g, node, first, &constants, readers(&node.input[0]))?;
                    ids.insert(output_name.clone(), first);
                    continue;
                }
                "Conv" => {
                    let (w_shape, weight) = constant(1)
                        .cloned()
                        .ok_or_else(|| malformed(&node.name, "weights are not a constant"))?;
                    let weight_shape: [usize; 4] = w_shape
                        .clone()
                        .try_into()
                        .map_err(|_| malformed(&node.name, "weights are not 4-D"))?;
                    let bias = constant(2)
                        .map(|(_, b)| b.clone())
                        .unwrap_or_else(|| vec![0.0; weight_shape[0]]);
                    let pads = pads(node)?;
                    let group = int(node, "group").unwrap_or(1).max(1) as usize;
                    let stride = pair(node, "strides", 1)?;
                    let dilation = pair(node, "dilations", 1)?;
                    let [n, c, h, w] = nchw()?;
                    if c != weight_shape[1] * group
                        || bias.len() != weight_shape[0]
                        || !weight_shape[0].is_multiple_of(group)
                    {
                        return Err(malformed(&node.name, format!("weights {weight_shape:?} and group {group} do not fit input {shape_in:?}")));
                    }
                    let window = [
                        dilation[0] * (weight_shape[2] - 1) + 1,
                        dilation[1] * (weight_shape[3] - 1) + 1,
                    ];
                    let [oh, ow] = window_output(&node.name, [h, w], window, stride, pads)?;
                    (
                        Op::Conv {
                            weight,
                            weight_shape,
                            bias,
                            stride,
                            pads,
                            dilation,
                            group,
                        },
                        vec![n, weight_shape[0], oh, ow],
                    )
                }
                "Gemm" | "MatMul" => {
                    let (w_shape, w) = constant(1)
                        .cloned()
                        .ok_or_else(|| malformed(&node.name, "weights are not a constant"))?;
                    let trans_b = int(node, "transB").unwrap_or(0) == 1;
                    let alpha_beta_default = node
                        .attribute
                        .iter()
                        .all(|a| !(a.name == "alpha" || a.name == "beta") || a.f == 1.0);
                    if int(node, "transA").unwrap_or(0) != 0
                        || !alpha_beta_default
                        || w_shape.len() != 2
                    {
                        return Err(malformed(
                            &node.name,
                            "only Gemm with transA = 0, alpha = beta = 1 and 2-D constant weights",
                        ));
                    }
                    let (out_features, in_features) = if trans_b {
                        (w_shape[0], w_shape[1])
                    } else {
                        (w_shape[1], w_shape[0])
                    };
                    let weight = if trans_b {
                        w
                    } else {
                        (0..out_features)
                            .flat_map(|o| (0..in_features).map(move |i| (o, i)))
                            .map(|(o, i)| w[i * out_features + o])
                            .collect()
                    };
                    let bias = (node.op_type == "Gemm")
                        .then(|| constant(2).map(|(_, b)| b.clone()))
                        .flatten()
                        .unwrap_or_else(|| vec![0.0; out_features]);
                    if shape_in.len() != 2
                        || shape_in[1] != in_features
                        || bias.len() != out_features
                    {
                        return Err(malformed(
                            &node.name,
                            format!("weights {w_shape:?} do not fit input {shape_in:?}"),
                        ));
                    }
                    (
                        Op::Gemm {
                            weight,
                            out_features,
                            bias,
                        },
                        vec![shape_in[0], out_features],
                    )
                }
                "Relu" => (Op::Relu, shape_in),
                "Sigmoid" => (Op::Sigmoid, shape_in),
                "HardSigmoid" => {
                    let attr = |name: &str, default: f32| {
                        node.attribute
                            .iter()
                            .find(|a| a.name == name)
                            .map_or(default, |a| a.f)
                    };
                    let (alpha, beta) = (attr("alpha", 0.2), attr("beta", 0.5));
                    (Op::HardSigmoid { alpha, beta }, shape_in)
                }
                "HardSwish" => (Op::HardSwish, shape_in),
                "Clip" => {
                    // Bounds are attributes before opset 11 and constant inputs after.
                    let bound = |index: usize, attr: &str, default: f32| {
                        constant(index)
                            .and_then(|(_, v)| v.first().copied())
                            .or_else(|| node.attribute.iter().find(|a| a.name == attr).map(|a| a.f))
                            .unwrap_or(default)
                    };
                    let (min, max) = (bound(1, "min", f32::MIN), bound(2, "max", f32::MAX));
                    if min >= max {
                        return Err(malformed(
                            &node.name,
                            format!("Clip [{min}, {max}] is empty"),
                        ));
                    }
                    (Op::Clip { min, max }, shape_in)
                }
                "Add" => {
                    if activations.len() != 2 || g.shapes[activations[1]] != shape_in {
                        return Err(malformed(
                            &node.name,
                            "Add needs two activations of the same shape",
                        ));
                    }
                    (Op::Add, shape_in)
                }
                "Mul" => {
                    // The broadcast operand second, whichever order the model wrote them in
                    // (torchvision's squeeze-excite writes `scale * x`).
                    if let [a, b] = activations[..] {
                        let size = |id: usize| g.shapes[id].iter().product::<usize>();
                        if size(a) < size(b) {
                            activations.swap(0, 1);
                        }
                    }
                    let shape_in = g.shapes[activations[0]].clone();
                    let other = activations.get(1).map(|&id| &g.shapes[id]);
                    let per_channel =
                        shape_in.len() == 4 && other == Some(&vec![shape_in[0], shape_in[1], 1, 1]);
                    let scalar = other.is_some_and(|s| s.iter().product::<usize>() == 1);
                    if !(other == Some(&shape_in) || per_channel || scalar) {
                        return Err(malformed(
                            &node.name,
                            "Mul needs two activations: the same shape, [N, C, 1, 1] or a scalar",
                        ));
                    }
                    (Op::Mul, shape_in)
                }
                "Concat" => {
                    let axis = int(node, "axis").unwrap_or(1);
                    let rank = shape_in.len() as i64;
                    let same_but_channels = activations.iter().all(|&id| {
                        let s = &g.shapes[id];
                        s.len() == shape_in.len()
                            && s.iter()
                                .zip(&shape_in)
                                .enumerate()
                                .all(|(i, (a, b))| i == 1 || a == b)
                    });
                    if shape_in.first() != Some(&1)
                        || !(axis == 1 || axis == 1 - rank)
                        || activations.len() != node.input.len()
                        || !same_but_channels
                    {
                        return Err(malformed(
                            &node.name,
                            "only Concat of activations along the channel axis, batch 1",
                        ));
                    }
                    let mut shape = shape_in.clone();
                    shape[1] = activations.iter().map(|&id| g.shapes[id][1]).sum();
                    (Op::Concat, shape)
                }
                "MaxPool" | "AveragePool" => {
                    let [n, c, h, w] = nchw()?;
                    let kernel = pair(node, "kernel_shape", 0)?;
                    let stride = pair(node, "strides", 1)?;
                    let mut pads = pads(node)?;
                    let refuse = |why: String| Err(malformed(&node.name, why));
                    if pair(node, "dilations", 1)? != [1, 1] {
                        return refuse(
                            "pooling with dilations other than 1 is not supported".into(),
                        );
                    }
                    if let Some(auto) = node
                        .attribute
                        .iter()
                        .find(|a| a.name == "auto_pad" && a.s != b"NOTSET")
                    {
                        return refuse(format!(
                            "pooling with auto_pad {} is not supported: export with explicit pads",
                            String::from_utf8_lossy(&auto.s)
                        ));
                    }
                    if pads[0] >= kernel[0] || pads[1] >= kernel[1] {
                        return refuse(format!(
                            "pooling pads {:?} must be smaller than the window {kernel:?}",
                            [pads[0], pads[1]]
                        ));
                    }
                    let include_pad = int(node, "count_include_pad").unwrap_or(0) == 1;
                    if int(node, "ceil_mode").unwrap_or(0) == 1 {
                        // ONNX's ceil mode: one more window where the last would start inside
                        // the input or its leading pad, its overhang past the trailing pad
                        // padding no position counts in.
                        let extra = ceil_extra([h, w], kernel, stride, pads);
                        if node.op_type == "AveragePool" && include_pad && extra != [0, 0] {
                            return refuse(
                                "AveragePool with ceil_mode 1 and count_include_pad 1 whose last window overhangs the padding is not supported".into(),
                            );
                        }
                        pads[2] += extra[0];
                        pads[3] += extra[1];
                    }
                    let [oh, ow] = window_output(&node.name, [h, w], kernel, stride, pads)?;
                    let op = if node.op_type == "MaxPool" {
                        Op::MaxPool {
                            kernel,
                            stride,
                            pads,
                        }
                    } else {
                        Op::AveragePool {
                            kernel,
                            stride,
                            pads,
                            count_include_pad: include_pad,
                        }
                    };
                    (op, vec![n, c, oh, ow])
                }
                "GlobalAveragePool" => {
                    let [n, c, _, _] = nchw()?;
                    (Op::GlobalAveragePool, vec![n, c, 1, 1])
                }
                "Resize" | "Upsample" => {
                    let [n, c, h, w] = nchw()?;
                    let text = |name: &str, default: &str| {
                        node.attribute
                            .iter()
                            .find(|a| a.name == name)
                            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
                            .unwrap_or_else(|| default.to_string())
                    };
                    let mode = text("mode", "nearest");
                    let transform = text("coordinate_transformation_mode", "half_pixel");
                    let bilinear = match (mode.as_str(), transform.as_str()) {
                        ("nearest", "asymmetric") if text("nearest_mode", "round_prefer_floor") == "floor" => false,
                        ("linear" | "bilinear", "half_pixel" | "pytorch_half_pixel") => true,
                        _ => {
                            return Err(malformed(
                                &node.name,
                                format!("Resize mode {mode} with {transform} coordinates is not supported (nearest/asymmetric/floor or linear/half_pixel)"),
                            ))
                        }
                    };
                    // Output size from `sizes` (input 3) if given, else from `scales` (input 2,
                    // or 1 before opset 11).
                    let four = |i: usize| constant(i).map(|(_, v)| v).filter(|v| v.len() == 4);
                    let scales_input = if node.input.len() == 2 { 1 } else { 2 };
                    let [oh, ow] = match (four(3), four(scales_input)) {
                        (Some(sizes), _) if sizes[..2] == [n as f32, c as f32] => {
                            [sizes[2] as usize, sizes[3] as usize]
                        }
                        (None, Some(scales)) if scales[..2] == [1.0, 1.0] => [
                            (h as f32 * scales[2]).floor() as usize,
                            (w as f32 * scales[3]).floor() as usize,
                        ],
                        _ => {
                            return Err(malformed(
                                &node.name,
                                "Resize needs constant scales or sizes that keep N and C",
                            ))
                        }
                    };
                    if oh == 0 || ow == 0 {
                        return Err(malformed(&node.name, "Resize to an empty image"));
                    }
                    (Op::Resize { bilinear }, vec![n, c, oh, ow])
                }
                "Softmax" => {
                    let axis = int(node, "axis").unwrap_or(-1);
                    if shape_in.len() != 2 || !(axis == -1 || axis == 1) {
                        return Err(malformed(
                            &node.name,
                            "only Softmax over the last axis of a 2-D tensor",
                        ));
                    }
                    (Op::Softmax, shape_in)
                }
                "Flatten" if int(node, "axis").unwrap_or(1) == 1 => (
                    Op::Reshape,
                    vec![shape_in[0], shape_in[1..].iter().product()],
                ),
                "Reshape" => {
                    let (_, target) = constant(1)
                        .ok_or_else(|| malformed(&node.name, "Reshape needs a constant shape"))?;
                    let total: usize = shape_in.iter().product();
                    let mut shape: Vec<usize> = target
                        .iter()
                        .enumerate()
                        .map(|(i, &d)| {
                            if d == 0.0 {
                                shape_in.get(i).copied().unwrap_or(0)
                            } else {
                                d.max(0.0) as usize
                            }
                        })
                        .collect();
                    if let Some(free) = target.iter().position(|&d| d == -1.0) {
                        shape[free] = 1;
                        let known: usize = shape.iter().product();
                        shape[free] = total / known.max(1);
                    }
                    if shape.iter().product::<usize>() != total {
                        return Err(malformed(
                            &node.name,
                            format!("cannot reshape {shape_in:?} to {target:?}"),
                        ));
                    }
                    (Op::Reshape, shape)
                }
                "Slice" => {
                    let [n, c, h, w] = nchw()?;
                    let list = |i: usize, attribute: &str| -> Option<Vec<i64>> {
                        match constant(i) {
                            Some((_, values)) => Some(values.iter().map(|&v| v as i64).collect()),
                            None => ints(node, attribute),
                        }
                    };
                    let (Some(starts), Some(ends)) = (list(1, "starts"), list(2, "ends")) else {
                        return Err(malformed(&node.name, "Slice needs constant starts and ends"));
                    };
                    let axes = list(3, "axes").unwrap_or_else(|| (0..starts.len() as i64).collect());
                    let steps = list(4, "steps").unwrap_or_else(|| vec![1; starts.len()]);
                    let dims = [n, c, h, w];
                    let mut channels: Vec<usize> = (0..c).collect();
                    for (((&axis, &start), &end), &step) in
                        axes.iter().zip(&starts).zip(&ends).zip(&steps)
                    {
                        let axis = from_end(axis, 4);
                        let picked = slice_range(dims.get(axis as usize).copied().unwrap_or(0), start, end, step);
                        if axis == 1 {
                            channels = picked;
                        } else if picked.len() != dims.get(axis as usize).copied().unwrap_or(0)
                            || step != 1
                        {
                            return Err(malformed(
                                &node.name,
                                "only Slice along the channel axis (NCHW, batch 1)",
                            ));
                        }
                    }
                    if n != 1 {
                        return Err(malformed(&node.name, "Slice needs batch 1"));
                    }
                    let shape = vec![1, channels.len(), h, w];
                    (
                        Op::Gather {
                            indices: channels,
                            plane: h * w,
                        },
                        shape,
                    )
                }
                "Transpose" => {
                    let rank = shape_in.len();
                    let perm: Vec<usize> = match ints(node, "perm") {
                        Some(perm) => perm.iter().map(|&p| p.max(0) as usize).collect(),
                        None => (0..rank).rev().collect(),
                    };
                    let mut sorted = perm.clone();
                    sorted.sort_unstable();
                    if sorted != (0..rank).collect::<Vec<_>>() {
                        return Err(malformed(&node.name, format!("perm {perm:?}")));
                    }
                    if shape_in.first() != Some(&1) || perm.first() != Some(&0) {
                        return Err(malformed(
                            &node.name,
                            "only Transpose that keeps the batch axis first, batch 1",
                        ));
                    }
                    transpose(&shape_in, &perm)
                }
                "ReduceMean" => {
                    let [n, c, _, _] = nchw()?;
                    let axes = match constant(1) {
                        Some((_, values)) => values.iter().map(|&v| v as i64).collect(),
                        None => ints(node, "axes").unwrap_or_default(),
                    };
                    let mut axes: Vec<i64> =
                        axes.iter().map(|&a| from_end(a, 4)).collect();
                    axes.sort_unstable();
                    if axes != [2, 3] {
                        return Err(malformed(
                            &node.name,
                            "only ReduceMean over height and width (a global average pool)",
                        ));
                    }
                    let shape = if int(node, "keepdims").unwrap_or(1) == 0 {
                        vec![n, c]
                    } else {
                        vec![n, c, 1, 1]
                    };
                    (Op::GlobalAveragePool, shape)
                }
                op if FOLDED_ONLY.contains(&op) => {
                    return Err(malformed(
                        &node.name,
                        format!("{op} of an activation: only shape arithmetic on constants is supported (folded at compile time)"),
                    ))
                }
                op => {
                    return Err(ImportError::Unsupported {
                        node: node.name.clone(),
                        op: op.to_string(),
                    })
                }
            };
            let id = g.push(&node.name, output_name, op, activations, shape_out);
            ids.insert(output_name.clone(), id);
        }
        if outputs.is_empty() {
            let output = graph
                .output
                .first()
                .ok_or_else(|| malformed("graph", "no output"))?;
            g.output = *ids
                .get(&output.name)
                .ok_or_else(|| malformed(&output.name, "output is not computed by any node"))?;
            return Ok(g);
        }
        // Each chosen value flattened to `[1, values, 1, 1]`, then joined along the channels.
        let mut parts = Vec::new();
        for name in outputs {
            let &id = ids
                .get(name)
                .ok_or_else(|| malformed(name, "not an activation of the graph"))?;
            let len = g.shapes[id].iter().product();
            let flat = format!("{name} (flattened)");
            parts.push(g.push(&flat, &flat, Op::Reshape, vec![id], vec![1, len, 1, 1]));
        }
        let total = parts.iter().map(|&id| g.shapes[id][1]).sum();
        let joined = "head (joined)";
        g.output = g.push(joined, joined, Op::Concat, parts, vec![1, total, 1, 1]);
        Ok(g)
    }

    /// Append node `name` writing a new value `value` of `shape`; the value's id.
    fn push(
        &mut self,
        name: &str,
        value: &str,
        op: Op,
        inputs: Vec<usize>,
        shape: Vec<usize>,
    ) -> usize {
        let id = self.shapes.len();
        self.shapes.push(shape);
        self.names.push(value.to_string());
        self.nodes.push(Node {
            name: name.to_string(),
            op,
            inputs,
            output: id,
        });
        id
    }

    /// Run the graph in f32 and return every value by id (the input first, the output last
    /// written). `input` must hold the product of the input shape.
    pub fn run_f32(&self, input: &[f32]) -> Vec<Vec<f32>> {
        self.run_f32_with(input, |_, _| {})
    }

    /// [`Graph::run_f32`], handing each node's output to `after` (node index, values) before
    /// later nodes read it.
    pub fn run_f32_with(
        &self,
        input: &[f32],
        mut after: impl FnMut(usize, &mut [f32]),
    ) -> Vec<Vec<f32>> {
        let mut values: Vec<Vec<f32>> = vec![Vec::new(); self.shapes.len()];
        values[0] = input.to_vec();
        for (index, node) in self.nodes.iter().enumerate() {
            let x = &values[node.inputs[0]];
            let shape = &self.shapes[node.inputs[0]];
            let out_shape = &self.shapes[node.output];
            let mut y = match &node.op {
                Op::Conv {
                    weight,
                    weight_shape,
                    bias,
                    stride,
                    pads,
                    dilation,
                    group,
                } => conv_f32(
                    x,
                    shape,
                    weight,
                    *weight_shape,
                    bias,
                    *stride,
                    *pads,
                    *dilation,
                    *group,
                    out_shape,
                ),
                Op::Gemm {
                    weight,
                    out_features,
                    bias,
                } => {
                    let in_features = shape[1];
                    (0..shape[0] * out_features)
                        .map(|i| {
                            let (n, o) = (i / out_features, i % out_features);
                            let row = &weight[o * in_features..(o + 1) * in_features];
                            bias[o]
                                + row
                                    .iter()
                                    .zip(&x[n * in_features..(n + 1) * in_features])
                                    .map(|(w, v)| w * v)
                                    .sum::<f32>()
                        })
                        .collect()
                }
                Op::Relu => x.iter().map(|v| v.max(0.0)).collect(),
                Op::Clip { min, max } => x.iter().map(|v| v.clamp(*min, *max)).collect(),
                Op::Sigmoid => x.iter().map(|&v| sigmoid(v)).collect(),
                Op::HardSigmoid { alpha, beta } => {
                    x.iter().map(|&v| hard_sigmoid(v, *alpha, *beta)).collect()
                }
                Op::HardSwish => x.iter().map(|&v| hard_swish(v)).collect(),
                Op::Add => x
                    .iter()
                    .zip(&values[node.inputs[1]])
                    .map(|(a, b)| a + b)
                    .collect(),
                Op::Mul => {
                    let other = &values[node.inputs[1]];
                    let plane = x.len() / other.len().max(1);
                    x.iter()
                        .enumerate()
                        .map(|(i, a)| a * other[i / plane])
                        .collect()
                }
                Op::Concat => node
                    .inputs
                    .iter()
                    .flat_map(|&id| values[id].iter().copied())
                    .collect(),
                Op::MaxPool {
                    kernel,
                    stride,
                    pads,
                } => pool_f32(x, shape, out_shape, *kernel, *stride, *pads, |window, _| {
                    window.iter().copied().fold(f32::MIN, f32::max)
                }),
                Op::AveragePool {
                    kernel,
                    stride,
                    pads,
                    count_include_pad,
                } => pool_f32(
                    x,
                    shape,
                    out_shape,
                    *kernel,
                    *stride,
                    *pads,
                    |window, area| {
                        let count = if *count_include_pad {
                            area
                        } else {
                            window.len()
                        };
                        window.iter().sum::<f32>() / count as f32
                    },
                ),
                Op::GlobalAveragePool => {
                    let plane = shape[2] * shape[3];
                    x.chunks_exact(plane)
                        .map(|c| c.iter().sum::<f32>() / plane as f32)
                        .collect()
                }
                Op::Resize { bilinear } => resize_f32(x, shape, out_shape, *bilinear),
                Op::Softmax => x
                    .chunks_exact(shape[1])
                    .flat_map(|row| {
                        let max = row.iter().copied().fold(f32::MIN, f32::max);
                        let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
                        row.iter().map(move |v| (v - max).exp() / sum)
                    })
                    .collect(),
                Op::Reshape => x.clone(),
                Op::Attention {
                    heads,
                    key_dim,
                    head_dim,
                    scale,
                } => attention_f32(x, *heads, *key_dim, *head_dim, *scale, shape[3]),
                Op::Gather { indices, plane } => indices
                    .iter()
                    .flat_map(|&i| x[i * plane..(i + 1) * plane].iter().copied())
                    .collect(),
            };
            after(index, &mut y);
            values[node.output] = y;
        }
        values
    }
}

/// Operators the importer takes only as shape arithmetic on constants.
const FOLDED_ONLY: &[&str] = &[
    "Shape",
    "Gather",
    "Sub",
    "Div",
    "Cast",
    "Unsqueeze",
    "Squeeze",
];

/// A constant: shape and values.
type Constant = (Vec<usize>, Vec<f32>);

/// The value of a shape-arithmetic node whose inputs are all constants (Shape: of any value
/// whose shape `static_shape` knows), and whether it is an integer; `None` for a node that
/// reads an activation, left to the graph.
fn fold(
    node: &NodeProto,
    constants: &HashMap<String, Constant>,
    integers: &HashSet<String>,
    static_shape: impl Fn(&str) -> Option<Vec<usize>>,
) -> Result<Option<(Constant, bool)>, ImportError> {
    let op = node.op_type.as_str();
    let name = |i: usize| node.input.get(i).map(String::as_str).unwrap_or("");
    if op == "Shape" {
        let shape = static_shape(name(0)).or_else(|| constants.get(name(0)).map(|c| c.0.clone()));
        let Some(shape) = shape else {
            return Err(malformed(
                &node.name,
                "Shape of a value whose shape is not known",
            ));
        };
        let rank = shape.len() as i64;
        let at = |a: i64| from_end(a, rank).clamp(0, rank) as usize;
        let start = at(int(node, "start").unwrap_or(0));
        let end = at(int(node, "end").unwrap_or(rank));
        let dims: Vec<f32> = shape[start..end.max(start)]
            .iter()
            .map(|&d| d as f32)
            .collect();
        return Ok(Some(((vec![dims.len()], dims), true)));
    }
    let folds = matches!(
        op,
        "Gather"
            | "Add"
            | "Sub"
            | "Mul"
            | "Div"
            | "Cast"
            | "Unsqueeze"
            | "Squeeze"
            | "Concat"
            | "Slice"
    );
    let inputs: Option<Vec<&Constant>> = node
        .input
        .iter()
        .filter(|n| !n.is_empty())
        .map(|n| constants.get(n))
        .collect();
    let (true, Some(inputs)) = (folds, inputs) else {
        return Ok(None);
    };
    let integer = node
        .input
        .iter()
        .filter(|n| !n.is_empty())
        .all(|n| integers.contains(n));
    let bad = |reason: &str| Err(malformed(&node.name, reason.to_string()));
    let value = match (op, &inputs[..]) {
        ("Gather", [(data_shape, data), (index_shape, indices)]) => {
            if data_shape.len() > 1 || int(node, "axis").unwrap_or(0) != 0 {
                return bad("Gather on a constant of more than one axis");
            }
            let values: Option<Vec<f32>> = indices
                .iter()
                .map(|&i| {
                    let i = if i < 0.0 { i + data.len() as f32 } else { i };
                    data.get(i as usize).copied()
                })
                .collect();
            let Some(values) = values else {
                return bad("Gather index out of range");
            };
            (index_shape.clone(), values)
        }
        ("Add" | "Sub" | "Mul" | "Div", [(a_shape, a), (b_shape, b)]) => {
            let (shape, len) = if a.len() >= b.len() {
                (a_shape.clone(), a.len())
            } else {
                (b_shape.clone(), b.len())
            };
            if !(a.len() == len || a.len() == 1) || !(b.len() == len || b.len() == 1) {
                return bad("arithmetic on constants of different sizes");
            }
            let at = |v: &[f32], i: usize| v[if v.len() == 1 { 0 } else { i }];
            let values = (0..len)
                .map(|i| {
                    let (x, y) = (at(a, i), at(b, i));
                    match op {
                        "Add" => x + y,
                        "Sub" => x - y,
                        "Mul" => x * y,
                        _ if integer => (x / y).trunc(),
                        _ => x / y,
                    }
                })
                .collect();
            (shape, values)
        }
        ("Cast", [(shape, values)]) => {
            // ONNX's integer and boolean types: every type but the floats (1, 10, 11, 16).
            let to_integer = !matches!(int(node, "to"), Some(1 | 10 | 11 | 16));
            let values = if to_integer {
                values.iter().map(|v| v.trunc()).collect()
            } else {
                values.clone()
            };
            return Ok(Some(((shape.clone(), values), to_integer)));
        }
        ("Unsqueeze" | "Squeeze", [(shape, values), rest @ ..]) => {
            let axes: Vec<i64> = match rest.first() {
                Some((_, axes)) => axes.iter().map(|&a| a as i64).collect(),
                None => ints(node, "axes").unwrap_or_default(),
            };
            let mut shape = shape.clone();
            if op == "Unsqueeze" {
                let rank = (shape.len() + axes.len()) as i64;
                let mut axes: Vec<usize> =
                    axes.iter().map(|&a| from_end(a, rank) as usize).collect();
                axes.sort_unstable();
                for a in axes {
                    shape.insert(a.min(shape.len()), 1);
                }
            } else {
                let rank = shape.len() as i64;
                let axes: Vec<usize> = axes.iter().map(|&a| from_end(a, rank) as usize).collect();
                shape = shape
                    .iter()
                    .enumerate()
                    .filter(|&(i, &d)| !(d == 1 && (axes.is_empty() || axes.contains(&i))))
                    .map(|(_, &d)| d)
                    .collect();
            }
            (shape, values.clone())
        }
        ("Concat", parts) => {
            if parts.iter().any(|(shape, _)| shape.len() > 1) {
                return bad("Concat of constants of more than one axis");
            }
            let values: Vec<f32> = parts.iter().flat_map(|(_, v)| v.iter().copied()).collect();
            (vec![values.len()], values)
        }
        ("Slice", [(shape, values), (_, starts), (_, ends), rest @ ..]) => {
            if shape.len() != 1 || starts.len() != 1 || ends.len() != 1 {
                return bad("Slice of a constant of more than one axis");
            }
            let step = rest
                .get(1)
                .and_then(|(_, s)| s.first())
                .map_or(1, |&s| s as i64);
            let picked: Vec<f32> =
                slice_range(values.len(), starts[0] as i64, ends[0] as i64, step)
                    .into_iter()
                    .map(|i| values[i])
                    .collect();
            (vec![picked.len()], picked)
        }
        _ => return bad("inputs of an unexpected count"),
    };
    Ok(Some((value, integer)))
}

/// An ONNX index or axis, where a negative one counts from the end of `size`.
fn from_end(index: i64, size: i64) -> i64 {
    if index < 0 {
        index.saturating_add(size)
    } else {
        index
    }
}

/// The indices ONNX's Slice picks from an axis of `dim` values: `start` to `end` (negative
/// from the end, clamped) by `step`, which may be negative; none for a step of 0.
fn slice_range(dim: usize, start: i64, end: i64, step: i64) -> Vec<usize> {
    let dim = dim as i64;
    let wrap = |v: i64| from_end(v, dim);
    if step > 0 {
        let (start, end) = (wrap(start).clamp(0, dim), wrap(end).clamp(0, dim));
        (start..end)
            .step_by(step as usize)
            .map(|i| i as usize)
            .collect()
    } else if step < 0 {
        let (start, end) = (wrap(start).clamp(-1, dim - 1), wrap(end).clamp(-1, dim - 1));
        let mut picked = Vec::new();
        let mut i = start;
        while i > end {
            picked.push(i as usize);
            i += step;
        }
        picked
    } else {
        Vec::new()
    }
}

/// A Transpose of `shape` by `perm` (batch first, batch 1) as planes copied in a new order:
/// the axes from the first that `perm` leaves in place on are the plane, the others are
/// reordered. The op, and the output shape.
fn transpose(shape: &[usize], perm: &[usize]) -> (Op, Vec<usize>) {
    let rank = shape.len();
    let kept = (1..=rank)
        .rev()
        .take_while(|&t| t == rank || perm[t] == t)
        .last()
        .unwrap_or(rank);
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    if kept <= 1 {
        return (Op::Reshape, out_shape);
    }
    let plane: usize = shape[kept..].iter().product();
    let blocks: usize = shape[1..kept].iter().product();
    let indices = (0..blocks)
        .map(|block| {
            // The output's coordinates over axes 1..kept, row-major; each is the input's
            // coordinate on axis perm[axis].
            let mut input = vec![0usize; kept];
            let mut rest = block;
            for axis in (1..kept).rev() {
                input[perm[axis]] = rest % out_shape[axis];
                rest /= out_shape[axis];
            }
            (1..kept).fold(0, |at, axis| at * shape[axis] + input[axis])
        })
        .collect();
    (Op::Gather { indices, plane }, out_shape)
}

/// Import a Split along the channel axis (batch 1) as one Gather per output, recording each
/// output's value id in `ids`.
fn split(
    node: &NodeProto,
    ids: &mut HashMap<String, usize>,
    constants: &HashMap<String, Constant>,
    g: &mut Graph,
) -> Result<(), ImportError> {
    let input = node
        .input
        .first()
        .and_then(|n| ids.get(n))
        .copied()
        .ok_or_else(|| malformed(&node.name, "Split of a constant"))?;
    let shape = g.shapes[input].clone();
    let [1, c, h, w] = shape[..] else {
        return Err(malformed(
            &node.name,
            "only Split of an NCHW activation, batch 1",
        ));
    };
    let axis = int(node, "axis").unwrap_or(0);
    if !(axis == 1 || axis == -3) {
        return Err(malformed(&node.name, "only Split along the channel axis"));
    }
    let sizes = split_sizes(node, constants, c)?;
    let mut first = 0;
    for (name, size) in node.output.iter().zip(sizes) {
        let id = g.shapes.len();
        g.shapes.push(vec![1, size, h, w]);
        g.names.push(name.clone());
        g.nodes.push(Node {
            name: node.name.clone(),
            op: Op::Gather {
                indices: (first..first + size).collect(),
                plane: h * w,
            },
            inputs: vec![input],
            output: id,
        });
        ids.insert(name.clone(), id);
        first += size;
    }
    Ok(())
}

/// Split sizes: the constant second input, the `split` attribute, or equal parts (the last
/// smaller when they do not divide, as opset 18 says) of `length`.
fn split_sizes(
    node: &NodeProto,
    constants: &HashMap<String, Constant>,
    length: usize,
) -> Result<Vec<usize>, ImportError> {
    let parts = node.output.len();
    let sizes: Vec<usize> = match node.input.get(1).and_then(|n| constants.get(n)) {
        Some((_, sizes)) => sizes.iter().map(|&v| v.max(0.0) as usize).collect(),
        None => match ints(node, "split") {
            Some(sizes) => sizes.iter().map(|&v| v.max(0) as usize).collect(),
            None => {
                let each = length.div_ceil(parts.max(1));
                (0..parts)
                    .map(|i| each.min(length.saturating_sub(i * each)))
                    .collect()
            }
        },
    };
    if sizes.len() != parts || sizes.iter().sum::<usize>() != length {
        return Err(malformed(
            &node.name,
            format!("split sizes {sizes:?} do not cover {length} in {parts} parts"),
        ));
    }
    Ok(sizes)
}

/// ultralytics' attention block, from the Split of `[1, heads, 2 * key_dim + head_dim, pixels]`
/// into queries, keys and values: `softmax(q^T k * scale)` (the scale a Mul by a constant on
/// the queries or on the logits), transposed, multiplied into the values. It becomes one
/// [`Op::Attention`] writing the second MatMul's output, and a [`Op::Gather`] of the values
/// (which the block's positional convolution also reads). Returns the outputs of the nodes
/// taken in, for the importer to skip.
fn attention(
    split: &NodeProto,
    graph: &pb::GraphProto,
    ids: &mut HashMap<String, usize>,
    constants: &HashMap<String, Constant>,
    g: &mut Graph,
) -> Result<Vec<String>, ImportError> {
    let refuse = |node: &NodeProto, why: &str| {
        Err(malformed(
            &node.name,
            format!("Split along the third axis is only supported as the start of an attention block (softmax(q^T k) v, as ultralytics' C2PSA): {why}"),
        ))
    };
    let input = split
        .input
        .first()
        .and_then(|n| ids.get(n))
        .copied()
        .ok_or_else(|| malformed(&split.name, "Split of a constant"))?;
    let [1, heads, dims, pixels] = g.shapes[input][..] else {
        return refuse(split, "the input is not [1, heads, channels, pixels]");
    };
    let sizes = split_sizes(split, constants, dims)?;
    let [key_dim, key_dim_again, head_dim] = sizes[..] else {
        return refuse(split, "not three parts");
    };
    if key_dim != key_dim_again {
        return refuse(split, "queries and keys differ in size");
    }
    let [q, k, v] = [0, 1, 2].map(|i| split.output[i].as_str());
    // The one node reading `name`; an attention block's inner values have no other reader.
    let only_reader = |name: &str| -> Result<&NodeProto, ImportError> {
        let mut readers = graph
            .node
            .iter()
            .filter(|n| n.input.iter().any(|i| i == name));
        match (readers.next(), readers.next()) {
            (Some(node), None) if !graph.output.iter().any(|o| o.name == name) => Ok(node),
            _ => Err(malformed(
                &split.name,
                format!("attention block: {name} must have exactly one reader"),
            )),
        }
    };
    // A Mul of `value` by a scalar constant: the scalar.
    let scalar_factor = |node: &NodeProto, value: &str| -> Option<f32> {
        if node.op_type != "Mul" {
            return None;
        }
        let other = node.input.iter().find(|i| *i != value)?;
        // The Constant node may come after the Split: exporters order nodes loosely.
        let later = || {
            let producer = graph
                .node
                .iter()
                .find(|n| n.output.first() == Some(other))?;
            let tensor = producer
                .attribute
                .iter()
                .find(|a| a.name == "value")?
                .t
                .as_ref()?;
            (producer.op_type == "Constant").then(|| tensor_f32(tensor).ok())?
        };
        match constants.get(other).cloned().or_else(later) {
            Some((_, v)) if v.len() == 1 => Some(v[0]),
            _ => None,
        }
    };
    let swaps_last_two = |node: &NodeProto| {
        node.op_type == "Transpose" && ints(node, "perm").as_deref() == Some(&[0, 1, 3, 2][..])
    };
    let mut absorbed = Vec::new();
    let mut scale = 1.0f32;
    let mut next = only_reader(q)?;
    if let Some(factor) = scalar_factor(next, q) {
        scale *= factor;
        absorbed.push(next.output[0].clone());
        next = only_reader(&next.output[0])?;
    }
    if !swaps_last_two(next) {
        return refuse(next, "the queries are not transposed (perm [0, 1, 3, 2])");
    }
    absorbed.push(next.output[0].clone());
    let logits = only_reader(&next.output[0])?;
    if logits.op_type != "MatMul" || logits.input != [next.output[0].as_str(), k] {
        return refuse(logits, "not MatMul(q^T, k)");
    }
    if only_reader(k)?.name != logits.name {
        return refuse(logits, "the keys are read elsewhere");
    }
    absorbed.push(logits.output[0].clone());
    next = only_reader(&logits.output[0])?;
    if let Some(factor) = scalar_factor(next, &logits.output[0]) {
        scale *= factor;
        absorbed.push(next.output[0].clone());
        next = only_reader(&next.output[0])?;
    }
    if next.op_type != "Softmax" || !matches!(int(next, "axis").unwrap_or(-1), -1 | 3) {
        return refuse(next, "no Softmax over the last axis after q^T k");
    }
    absorbed.push(next.output[0].clone());
    let transposed = only_reader(&next.output[0])?;
    if !swaps_last_two(transposed) {
        return refuse(transposed, "the attention matrix is not transposed");
    }
    absorbed.push(transposed.output[0].clone());
    let mixed = only_reader(&transposed.output[0])?;
    if mixed.op_type != "MatMul" || mixed.input != [v, transposed.output[0].as_str()] {
        return refuse(mixed, "not MatMul(v, attention^T)");
    }
    absorbed.push(mixed.output[0].clone());
    let values = (0..heads)
        .flat_map(|h| (0..head_dim).map(move |d| h * dims + 2 * key_dim + d))
        .collect();
    let values = g.push(
        &split.name,
        v,
        Op::Gather {
            indices: values,
            plane: pixels,
        },
        vec![input],
        vec![1, heads, head_dim, pixels],
    );
    ids.insert(v.to_string(), values);
    let output = g.push(
        &mixed.name,
        &mixed.output[0],
        Op::Attention {
            heads,
            key_dim,
            head_dim,
            scale,
        },
        vec![input],
        vec![1, heads, head_dim, pixels],
    );
    ids.insert(mixed.output[0].clone(), output);
    Ok(absorbed)
}

/// [`Op::Attention`] in f32 over `x` (`[1, heads, 2 * key_dim + head_dim, pixels]`).
fn attention_f32(
    x: &[f32],
    heads: usize,
    key_dim: usize,
    head_dim: usize,
    scale: f32,
    pixels: usize,
) -> Vec<f32> {
    let per_head = (2 * key_dim + head_dim) * pixels;
    let mut out = vec![0.0; heads * head_dim * pixels];
    for (head, out) in x
        .chunks_exact(per_head)
        .zip(out.chunks_exact_mut(head_dim * pixels))
    {
        let (q, rest) = head.split_at(key_dim * pixels);
        let (k, v) = rest.split_at(key_dim * pixels);
        for n in 0..pixels {
            let logits: Vec<f32> = (0..pixels)
                .map(|m| {
                    scale
                        * (0..key_dim)
                            .map(|c| q[c * pixels + n] * k[c * pixels + m])
                            .sum::<f32>()
                })
                .collect();
            let top = logits.iter().copied().fold(f32::MIN, f32::max);
            let weights: Vec<f32> = logits.iter().map(|l| (l - top).exp()).collect();
            let total: f32 = weights.iter().sum();
            for d in 0..head_dim {
                out[d * pixels + n] = (0..pixels)
                    .map(|m| v[d * pixels + m] * weights[m])
                    .sum::<f32>()
                    / total;
            }
        }
    }
    out
}

fn pads(node: &NodeProto) -> Result<[usize; 4], ImportError> {
    match ints(node, "pads").as_deref() {
        None => Ok([0; 4]),
        Some(&[t, l, b, r]) if t >= 0 && l >= 0 && b >= 0 && r >= 0 => {
            Ok([t as usize, l as usize, b as usize, r as usize])
        }
        Some(other) => Err(malformed(&node.name, format!("pads {other:?}"))),
    }
}

/// Output height and width of a sliding window (ONNX floor rounding).
fn window_output(
    node: &str,
    input: [usize; 2],
    window: [usize; 2],
    stride: [usize; 2],
    pads: [usize; 4],
) -> Result<[usize; 2], ImportError> {
    let out = |axis: usize| {
        (input[axis] + pads[axis] + pads[axis + 2])
            .checked_sub(window[axis])
            .map(|v| v / stride[axis] + 1)
    };
    match (out(0), out(1)) {
        (Some(h), Some(w)) if window[0] > 0 && window[1] > 0 => Ok([h, w]),
        _ => Err(malformed(node, "window larger than the padded input")),
    }
}

/// The logistic function, ONNX's Sigmoid.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `clamp(alpha * x + beta, 0, 1)`, ONNX's HardSigmoid.
pub fn hard_sigmoid(x: f32, alpha: f32, beta: f32) -> f32 {
    (alpha * x + beta).clamp(0.0, 1.0)
}

/// `x * clamp(x / 6 + 1/2, 0, 1)`, ONNX's HardSwish.
pub fn hard_swish(x: f32) -> f32 {
    x * (x / 6.0 + 0.5).clamp(0.0, 1.0)
}

/// The trailing padding ONNX's `ceil_mode = 1` adds on each axis: the output is
/// `ceil((in + pads - window) / stride) + 1` windows, less one if the last would start past the
/// input and its leading pad.
fn ceil_extra(
    input: [usize; 2],
    window: [usize; 2],
    stride: [usize; 2],
    pads: [usize; 4],
) -> [usize; 2] {
    let axis = |a: usize| {
        let padded = input[a] + pads[a] + pads[a + 2];
        let (span, step) = (padded.saturating_sub(window[a]), stride[a].max(1));
        let mut out = span.div_ceil(step) + 1;
        if (out - 1) * step >= input[a] + pads[a] {
            out -= 1;
        }
        ((out - 1) * step + window[a]).saturating_sub(padded)
    };
    [axis(0), axis(1)]
}

/// Fold `BatchNormalization(x)` into the Conv that wrote `x`, which nothing else may read.
fn fold_batch_norm(
    g: &mut Graph,
    node: &NodeProto,
    input: usize,
    constants: &HashMap<String, (Vec<usize>, Vec<f32>)>,
    readers: usize,
) -> Result<(), ImportError> {
    let param = |i: usize| {
        node.input
            .get(i)
            .and_then(|n| constants.get(n.as_str()))
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                malformed(
                    &node.name,
                    "BatchNormalization parameters are not constants",
                )
            })
    };
    let (scale, shift, mean, var) = (param(1)?, param(2)?, param(3)?, param(4)?);
    let epsilon = node
        .attribute
        .iter()
        .find(|a| a.name == "epsilon")
        .map_or(1e-5, |a| a.f);
    let conv = g
        .nodes
        .iter_mut()
        .find(|n| n.output == input)
        .filter(|_| readers == 1);
    let Some(Node {
        op:
            Op::Conv {
                weight,
                weight_shape,
                bias,
                ..
            },
        ..
    }) = conv
    else {
        return Err(ImportError::Unsupported {
            node: node.name.clone(),
            op: "BatchNormalization (only directly after a Conv that nothing else reads)".into(),
        });
    };
    let channels = weight_shape[0];
    if [&scale, &shift, &mean, &var]
        .iter()
        .any(|p| p.len() != channels)
    {
        return Err(malformed(
            &node.name,
            "BatchNormalization parameters do not match the Conv's channels",
        ));
    }
    let per_channel = weight.len() / channels;
    for c in 0..channels {
        let factor = scale[c] / (var[c] + epsilon).sqrt();
        weight[c * per_channel..(c + 1) * per_channel]
            .iter_mut()
            .for_each(|w| *w *= factor);
        bias[c] = (bias[c] - mean[c]) * factor + shift[c];
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn pool_f32(
    x: &[f32],
    shape: &[usize],
    out_shape: &[usize],
    kernel: [usize; 2],
    stride: [usize; 2],
    pads: [usize; 4],
    reduce: impl Fn(&[f32], usize) -> f32,
) -> Vec<f32> {
    let (c, h, w) = (shape[1], shape[2], shape[3]);
    let (oh, ow) = (out_shape[2], out_shape[3]);
    let mut y = Vec::with_capacity(c * oh * ow);
    let mut window = Vec::new();
    for ch in 0..c {
        for oy in 0..oh {
            for ox in 0..ow {
                window.clear();
                for ky in 0..kernel[0] {
                    for kx in 0..kernel[1] {
                        let iy = (oy * stride[0] + ky).checked_sub(pads[0]);
                        let ix = (ox * stride[1] + kx).checked_sub(pads[1]);
                        if let (Some(iy), Some(ix)) = (iy, ix) {
                            if iy < h && ix < w {
                                window.push(x[(ch * h + iy) * w + ix]);
                            }
                        }
                    }
                }
                y.push(reduce(&window, kernel[0] * kernel[1]));
            }
        }
    }
    y
}

fn resize_f32(x: &[f32], shape: &[usize], out_shape: &[usize], bilinear: bool) -> Vec<f32> {
    let (c, h, w) = (shape[1], shape[2], shape[3]);
    let (oh, ow) = (out_shape[2], out_shape[3]);
    // Source index pairs and the weight of the second, per output row or column.
    let axis = |input: usize, output: usize| -> Vec<(usize, usize, f32)> {
        (0..output)
            .map(|d| {
                if bilinear {
                    let src = ((d as f32 + 0.5) * input as f32 / output as f32 - 0.5).max(0.0);
                    let i0 = (src.floor() as usize).min(input - 1);
                    ((i0), (i0 + 1).min(input - 1), src - i0 as f32)
                } else {
                    let i = (d * input / output).min(input - 1);
                    (i, i, 0.0)
                }
            })
            .collect()
    };
    let (rows, cols) = (axis(h, oh), axis(w, ow));
    let mut y = Vec::with_capacity(c * oh * ow);
    for ch in 0..c {
        let plane = &x[ch * h * w..(ch + 1) * h * w];
        for &(y0, y1, fy) in &rows {
            for &(x0, x1, fx) in &cols {
                let top = plane[y0 * w + x0] * (1.0 - fx) + plane[y0 * w + x1] * fx;
                let bottom = plane[y1 * w + x0] * (1.0 - fx) + plane[y1 * w + x1] * fx;
                y.push(top * (1.0 - fy) + bottom * fy);
            }
        }
    }
    y
}

fn value_shape(v: &pb::ValueInfoProto) -> Option<Vec<usize>> {
    use pb::tensor_shape_proto::dimension::Value;
    use pb::type_proto::Value as TypeValue;
    let Some(TypeValue::TensorType(t)) = v.r#type.as_ref()?.value.as_ref() else {
        return None;
    };
    t.shape
        .as_ref()?
        .dim
        .iter()
        .map(|d| match d.value {
            Some(Value::DimValue(n)) => usize::try_from(n).ok(),
            _ => None,
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn conv_f32(
    x: &[f32],
    shape: &[usize],
    weight: &[f32],
    [oc_total, icg, kh, kw]: [usize; 4],
    bias: &[f32],
    stride: [usize; 2],
    pads: [usize; 4],
    dilation: [usize; 2],
    group: usize,
    out_shape: &[usize],
) -> Vec<f32> {
    let (n_total, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    let (oh, ow) = (out_shape[2], out_shape[3]);
    let ocg = oc_total / group;
    let mut y = vec![0.0; n_total * oc_total * oh * ow];
    // One weight at a time over whole output rows: the inner loop runs along a row of the
    // input (contiguous at stride 1), which the compiler vectorises.
    for n in 0..n_total {
        for oc in 0..oc_total {
            let g = oc / ocg;
            let out = &mut y[(n * oc_total + oc) * oh * ow..][..oh * ow];
            out.fill(bias[oc]);
            for ic in 0..icg {
                let plane = &x[(n * c + g * icg + ic) * h * w..][..h * w];
                for ky in 0..kh {
                    for kx in 0..kw {
                        let wv = weight[((oc * icg + ic) * kh + ky) * kw + kx];
                        let shift = (kx * dilation[1]) as isize - pads[1] as isize;
                        // Output columns whose input column ox * stride + shift is inside.
                        let first = (0..ow)
                            .find(|&ox| (ox * stride[1]) as isize + shift >= 0)
                            .unwrap_or(ow);
                        let end = (first..ow)
                            .find(|&ox| (ox * stride[1]) as isize + shift >= w as isize)
                            .unwrap_or(ow);
                        for oy in 0..oh {
                            let iy =
                                (oy * stride[0] + ky * dilation[0]) as isize - pads[0] as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            let row = &plane[iy as usize * w..][..w];
                            let out_row = &mut out[oy * ow..][..ow];
                            if stride[1] == 1 {
                                let start = (first as isize + shift) as usize;
                                let inputs = &row[start..start + (end - first)];
                                for (o, v) in out_row[first..end].iter_mut().zip(inputs) {
                                    *o += wv * v;
                                }
                            } else {
                                for (ox, o) in out_row.iter_mut().enumerate().take(end).skip(first)
                                {
                                    *o += wv * row[((ox * stride[1]) as isize + shift) as usize];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    y
}
