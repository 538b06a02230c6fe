//! The compiler's view of a float ONNX model: a topologically ordered list of nodes over named
//! values with known shapes, weights as plain f32 arrays, and a float interpreter that the
//! quantiser calibrates with (it exposes every intermediate tensor) and that is checked
//! against tract.

use std::collections::HashMap;

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
    /// A node whose attributes, inputs or shapes make no sense.
    #[error("node '{node}': {reason}")]
    Malformed {
        /// Node name (or the graph input/output).
        node: String,
        /// What is wrong.
        reason: String,
    },
}

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
    /// Element-wise sum of two tensors of the same shape.
    Add,
    /// Mean over H and W, keeping `[N, C, 1, 1]`.
    GlobalAveragePool,
    /// Reshape to `[N, rest]`.
    Flatten,
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
    if t.data_type != DataType::Float as i32 {
        return Err(format!("initializer {} is not float32", t.name));
    }
    let values: Vec<f32> = if !t.raw_data.is_empty() {
        t.raw_data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        t.float_data.clone()
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

impl Graph {
    /// Import an ONNX model with one input of fixed shape and one output.
    pub fn from_onnx(bytes: &[u8]) -> Result<Self, ImportError> {
        let model = tract_onnx::onnx()
            .proto_model_for_read(&mut &bytes[..])
            .map_err(|e| ImportError::Decode(format!("{e:#}").replace('\n', " ")))?;
        let graph: pb::GraphProto = model
            .graph
            .ok_or_else(|| ImportError::Decode("no graph".into()))?;
        let mut constants: HashMap<&str, (Vec<usize>, Vec<f32>)> = HashMap::new();
        for t in &graph.initializer {
            let parsed = tensor_f32(t).map_err(|reason| malformed(&t.name, reason))?;
            constants.insert(t.name.as_str(), parsed);
        }
        let input = graph
            .input
            .iter()
            .find(|i| !constants.contains_key(i.name.as_str()))
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

        for node in &graph.node {
            let activations: Vec<usize> = node
                .input
                .iter()
                .filter_map(|name| ids.get(name).copied())
                .collect();
            let constant = |i: usize| node.input.get(i).and_then(|n| constants.get(n.as_str()));
            let shape_in = activations
                .first()
                .map(|&id| g.shapes[id].clone())
                .ok_or_else(|| malformed(&node.name, "reads no activation"))?;
            let (op, shape_out) = match node.op_type.as_str() {
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
                    let pads = match ints(node, "pads").as_deref() {
                        None => [0; 4],
                        Some(&[t, l, b, r]) if t >= 0 && l >= 0 && b >= 0 && r >= 0 => {
                            [t as usize, l as usize, b as usize, r as usize]
                        }
                        Some(other) => {
                            return Err(malformed(&node.name, format!("pads {other:?}")))
                        }
                    };
                    let group = int(node, "group").unwrap_or(1).max(1) as usize;
                    let stride = pair(node, "strides", 1)?;
                    let dilation = pair(node, "dilations", 1)?;
                    let [n, c, h, w]: [usize; 4] = shape_in
                        .clone()
                        .try_into()
                        .map_err(|_| malformed(&node.name, "input is not NCHW"))?;
                    if c != weight_shape[1] * group
                        || bias.len() != weight_shape[0]
                        || !weight_shape[0].is_multiple_of(group)
                    {
                        return Err(malformed(&node.name, format!("weights {weight_shape:?} and group {group} do not fit input {shape_in:?}")));
                    }
                    let out_dim = |size: usize, pad: usize, k: usize, s: usize, d: usize| {
                        (size + pad).checked_sub(d * (k - 1) + 1).map(|v| v / s + 1)
                    };
                    let oh = out_dim(
                        h,
                        pads[0] + pads[2],
                        weight_shape[2],
                        stride[0],
                        dilation[0],
                    );
                    let ow = out_dim(
                        w,
                        pads[1] + pads[3],
                        weight_shape[3],
                        stride[1],
                        dilation[1],
                    );
                    let (Some(oh), Some(ow)) = (oh, ow) else {
                        return Err(malformed(&node.name, "kernel larger than the padded input"));
                    };
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
                "Gemm" => {
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
                            "only Gemm with transA = 0, alpha = beta = 1 and 2-D weights",
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
                    let bias = constant(2)
                        .map(|(_, b)| b.clone())
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
                "Add" => {
                    if activations.len() != 2 || g.shapes[activations[1]] != shape_in {
                        return Err(malformed(
                            &node.name,
                            "Add needs two activations of the same shape",
                        ));
                    }
                    (Op::Add, shape_in)
                }
                "GlobalAveragePool" if shape_in.len() == 4 => {
                    (Op::GlobalAveragePool, vec![shape_in[0], shape_in[1], 1, 1])
                }
                "Flatten" if int(node, "axis").unwrap_or(1) == 1 => (
                    Op::Flatten,
                    vec![shape_in[0], shape_in[1..].iter().product()],
                ),
                op => {
                    return Err(ImportError::Unsupported {
                        node: node.name.clone(),
                        op: op.to_string(),
                    })
                }
            };
            let output_name = node
                .output
                .first()
                .ok_or_else(|| malformed(&node.name, "no output"))?;
            let id = g.shapes.len();
            g.shapes.push(shape_out);
            g.names.push(output_name.clone());
            ids.insert(output_name.clone(), id);
            g.nodes.push(Node {
                name: node.name.clone(),
                op,
                inputs: activations,
                output: id,
            });
        }
        let output = graph
            .output
            .first()
            .ok_or_else(|| malformed("graph", "no output"))?;
        g.output = *ids
            .get(&output.name)
            .ok_or_else(|| malformed(&output.name, "output is not computed by any node"))?;
        Ok(g)
    }

    /// Run the graph in f32 and return every value by id (the input first, the output last
    /// written). `input` must hold the product of the input shape.
    pub fn run_f32(&self, input: &[f32]) -> Vec<Vec<f32>> {
        let mut values: Vec<Vec<f32>> = vec![Vec::new(); self.shapes.len()];
        values[0] = input.to_vec();
        for node in &self.nodes {
            let x = &values[node.inputs[0]];
            let shape = &self.shapes[node.inputs[0]];
            let out_shape = &self.shapes[node.output];
            let y = match &node.op {
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
                Op::Add => x
                    .iter()
                    .zip(&values[node.inputs[1]])
                    .map(|(a, b)| a + b)
                    .collect(),
                Op::GlobalAveragePool => {
                    let plane = shape[2] * shape[3];
                    x.chunks_exact(plane)
                        .map(|c| c.iter().sum::<f32>() / plane as f32)
                        .collect()
                }
                Op::Flatten => x.clone(),
            };
            values[node.output] = y;
        }
        values
    }
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
    for n in 0..n_total {
        for oc in 0..oc_total {
            let g = oc / ocg;
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = bias[oc];
                    for ic in 0..icg {
                        let channel = g * icg + ic;
                        for ky in 0..kh {
                            let iy =
                                (oy * stride[0] + ky * dilation[0]) as isize - pads[0] as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix =
                                    (ox * stride[1] + kx * dilation[1]) as isize - pads[1] as isize;
                                if ix < 0 || ix >= w as isize {
                                    continue;
                                }
                                let xv = x[((n * c + channel) * h + iy as usize) * w + ix as usize];
                                acc += xv * weight[((oc * icg + ic) * kh + ky) * kw + kx];
                            }
                        }
                    }
                    y[((n * oc_total + oc) * oh + oy) * ow + ox] = acc;
                }
            }
        }
    }
    y
}
