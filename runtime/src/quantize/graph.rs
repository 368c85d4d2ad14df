//! ONNX graph analysis and the two int8 rewrites (tract's integer form and explicit QDQ).
//!
//! Works on the `tract_onnx::pb` prost types, so a model is decoded, rewritten and encoded
//! without any other ONNX library.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, TypeProto, ValueInfoProto,
    attribute_proto::AttributeType, tensor_proto::DataType, type_proto,
};

use super::{QuantFormat, QuantizeError, QuantizeOptions};

/// Ops that mark a model as already quantized: quantizing it again is refused.
const QUANTIZED_OPS: &[&str] = &[
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearMatMul",
    "QLinearConv",
    "MatMulInteger",
    "ConvInteger",
];

/// Smallest scale used for a degenerate (all-equal) range, so that no scale is ever 0.
const MIN_SCALE: f32 = 1e-8;

/// Affine int8 quantization parameters: `x ~ scale * (q - zero_point)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QParams {
    /// Step between two consecutive int8 values, > 0.
    pub scale: f32,
    /// The int8 value that represents 0.0.
    pub zero_point: i8,
}

impl QParams {
    /// Asymmetric int8 parameters covering `[lo, hi]` (extended to contain 0, so that zero
    /// padding and ReLU zeros are exact).
    pub fn asymmetric(lo: f32, hi: f32) -> Self {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let scale = ((hi - lo) / 255.0).max(MIN_SCALE);
        let zp = (-128.0 - lo / scale).round_ties_even().clamp(-128.0, 127.0);
        Self { scale, zero_point: zp as i8 }
    }

    /// Symmetric int8 parameters (zero point 0) covering `[-max(|lo|,|hi|), +..]`, the
    /// form TensorRT requires.
    pub fn symmetric(lo: f32, hi: f32) -> Self {
        let amax = lo.abs().max(hi.abs());
        Self { scale: (amax / 127.0).max(MIN_SCALE), zero_point: 0 }
    }

    /// ONNX `QuantizeLinear`: `saturate(round_half_to_even(x / scale) + zero_point)`.
    pub fn quantize(&self, x: f32) -> i8 {
        let q = (x / self.scale).round_ties_even() + f32::from(self.zero_point);
        q.clamp(-128.0, 127.0) as i8
    }

    /// ONNX `DequantizeLinear`: `(q - zero_point) * scale`.
    pub fn dequantize(&self, q: i8) -> f32 {
        (f32::from(q) - f32::from(self.zero_point)) * self.scale
    }
}

/// Per-output-channel symmetric int8 quantization of a row-major `[rows, cols]` matrix
/// along `cols` (channel `c` is column `c`, the layout of a `MatMul` weight `[K, N]`).
/// Returns the int8 values (in `[-127, 127]`) and one scale per column.
pub fn quantize_per_column(w: &[f32], rows: usize, cols: usize) -> (Vec<i8>, Vec<f32>) {
    let mut amax = vec![0.0f32; cols];
    for row in w.chunks_exact(cols).take(rows) {
        for (a, v) in amax.iter_mut().zip(row) {
            *a = a.max(v.abs());
        }
    }
    let scales: Vec<f32> = amax.iter().map(|a| if *a > 0.0 { a / 127.0 } else { 1.0 }).collect();
    let q = w
        .chunks_exact(cols)
        .take(rows)
        .flat_map(|row| {
            row.iter()
                .zip(&scales)
                .map(|(v, s)| (v / s).round_ties_even().clamp(-127.0, 127.0) as i8)
        })
        .collect();
    (q, scales)
}

/// Per-output-channel symmetric quantization of a `[C, ...]` tensor along axis 0 (a `Conv`
/// weight): int8 values and one scale per output channel.
pub fn quantize_per_row(w: &[f32], rows: usize) -> (Vec<i8>, Vec<f32>) {
    let per = w.len() / rows.max(1);
    let mut q = Vec::with_capacity(w.len());
    let mut scales = Vec::with_capacity(rows);
    for row in w.chunks_exact(per.max(1)).take(rows) {
        let amax = row.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
        q.extend(row.iter().map(|v| (v / s).round_ties_even().clamp(-127.0, 127.0) as i8));
        scales.push(s);
    }
    (q, scales)
}

/// A weight layer found in the graph.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Layer {
    /// Index of the `MatMul` / `Conv` node in `graph.node`.
    pub node_ix: usize,
    /// Node name (or its output name when unnamed).
    pub name: String,
    /// `MatMul` or `Conv`.
    pub op: &'static str,
    /// The activation input tensor.
    pub input: String,
    /// The weight initializer.
    pub weight: String,
    /// Weight shape (`[K, N]` for MatMul, `[C_out, C_in, kh, kw]` for Conv).
    pub weight_dims: Vec<usize>,
    /// Conv bias initializer (MatMul biases are a separate `Add`, left alone).
    pub conv_bias: Option<String>,
    /// The node's output tensor.
    pub output: String,
    /// Quantized (true) or kept in float by the options (false).
    pub quantize: bool,
}

/// The tensors whose ranges the calibration must measure.
pub(crate) fn calibration_tensors(layers: &[Layer], format: QuantFormat) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut push = |n: &str| {
        if !names.iter().any(|x| x == n) {
            names.push(n.to_string());
        }
    };
    for l in layers.iter().filter(|l| l.quantize) {
        push(&l.input);
        if format == QuantFormat::Tract {
            push(&l.output);
        }
    }
    names
}

fn node_label(n: &NodeProto) -> String {
    if n.name.is_empty() { n.output.first().cloned().unwrap_or_default() } else { n.name.clone() }
}

fn unsupported(n: &NodeProto, reason: impl Into<String>) -> QuantizeError {
    QuantizeError::Unsupported { node: node_label(n), op: n.op_type.clone(), reason: reason.into() }
}

/// Checks that every node is an op tract can load and that the model is not already
/// quantized; returns the graph.
pub(crate) fn check_model(model: &ModelProto) -> Result<&GraphProto, QuantizeError> {
    let graph = model.graph.as_ref().ok_or_else(|| QuantizeError::Unsupported {
        node: "<model>".into(),
        op: "<none>".into(),
        reason: "the model has no graph".into(),
    })?;
    let register = tract_onnx::onnx().op_register;
    for n in &graph.node {
        if !(n.domain.is_empty() || n.domain == "ai.onnx") {
            return Err(unsupported(
                n,
                format!("custom-domain op `{}` (only standard ONNX ops are quantized)", n.domain),
            ));
        }
        if QUANTIZED_OPS.contains(&n.op_type.as_str()) {
            return Err(unsupported(n, "the model is already quantized"));
        }
        if !register.0.contains_key(&n.op_type) {
            return Err(unsupported(n, "operator not supported by tract"));
        }
    }
    let inits: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    let real_inputs = graph.input.iter().filter(|i| !inits.contains(i.name.as_str())).count();
    if real_inputs != 1 {
        return Err(QuantizeError::Unsupported {
            node: "<graph inputs>".into(),
            op: "<none>".into(),
            reason: format!("{real_inputs} graph inputs, expected one image input"),
        });
    }
    Ok(graph)
}

/// Whether `pattern` (an op type, or a node-name prefix) selects node `n`.
fn matches(pattern: &str, n: &NodeProto) -> bool {
    pattern == n.op_type || (!pattern.is_empty() && node_label(n).starts_with(pattern))
}

/// Index `i` of a node named `head.mlp.<i>/...` (our export's FLSL head MLP).
fn head_mlp_index(n: &NodeProto) -> Option<usize> {
    n.name.strip_prefix("head.mlp.")?.split('/').next()?.parse().ok()
}

/// The FLSL head's output layers in our export: the prototype layer `head/last_layer` and
/// the head MLP's last linear (`head.mlp.<last_mlp>`, the bottleneck before the L2 norm).
fn is_head_output(n: &NodeProto, last_mlp: Option<usize>) -> bool {
    n.op_type == "MatMul"
        && (n.name.starts_with("head/last_layer")
            || (head_mlp_index(n).is_some() && head_mlp_index(n) == last_mlp))
}

/// Finds every MatMul with a constant rank-2 weight and every Conv with a constant weight;
/// marks which the options quantize.
pub(crate) fn find_layers(
    graph: &GraphProto,
    options: &QuantizeOptions,
) -> Result<Vec<Layer>, QuantizeError> {
    let inits: HashMap<&str, &TensorProto> =
        graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut layers = Vec::new();
    let last_head_mlp =
        graph.node.iter().filter(|m| m.op_type == "MatMul").filter_map(head_mlp_index).max();
    for (ix, n) in graph.node.iter().enumerate() {
        let op: &'static str = match n.op_type.as_str() {
            "MatMul" => "MatMul",
            "Conv" => "Conv",
            _ => continue,
        };
        let (Some(input), Some(w)) = (n.input.first(), n.input.get(1)) else {
            return Err(unsupported(n, "fewer than two inputs"));
        };
        let Some(t) = inits.get(w.as_str()) else {
            // activation x activation (attention): stays in float.
            continue;
        };
        if t.data_type != DataType::Float as i32 {
            return Err(unsupported(
                n,
                format!(
                    "weight `{w}` has ONNX data type {}, only f32 weights are quantized",
                    t.data_type
                ),
            ));
        }
        let dims: Vec<usize> = t.dims.iter().map(|d| (*d).max(0) as usize).collect();
        let want_rank = if op == "MatMul" { 2 } else { 4 };
        if dims.len() != want_rank {
            return Err(unsupported(
                n,
                format!("weight `{w}` has shape {dims:?}, expected rank {want_rank}"),
            ));
        }
        let data_len = f32_data(t).map(|d| d.len());
        if data_len != Some(dims.iter().product()) {
            return Err(unsupported(
                n,
                format!(
                    "weight `{w}` holds {:?} f32 values for shape {dims:?} (external data is not supported)",
                    data_len
                ),
            ));
        }
        let conv_bias = if op == "Conv" {
            if n.attribute.iter().any(|a| a.name == "group" && a.i != 1) {
                return Err(unsupported(n, "grouped convolution"));
            }
            match n.input.get(2) {
                Some(b) if !b.is_empty() => {
                    if !inits.contains_key(b.as_str()) {
                        return Err(unsupported(n, format!("bias `{b}` is not a constant")));
                    }
                    Some(b.clone())
                }
                _ => None,
            }
        } else {
            None
        };
        let kept = options.float_ops.iter().any(|p| matches(p, n))
            || (op == "Conv" && !options.quantize_conv)
            || (!options.quantize_head_output && is_head_output(n, last_head_mlp));
        layers.push(Layer {
            node_ix: ix,
            name: node_label(n),
            op,
            input: input.clone(),
            weight: w.clone(),
            weight_dims: dims,
            conv_bias,
            output: n.output.first().cloned().unwrap_or_default(),
            quantize: !kept,
        });
    }
    Ok(layers)
}

/// The f32 values of an initializer (raw_data or float_data); `None` for other encodings.
pub(crate) fn f32_data(t: &TensorProto) -> Option<Vec<f32>> {
    if !t.raw_data.is_empty() {
        if !t.raw_data.len().is_multiple_of(4) {
            return None;
        }
        return Some(
            t.raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        );
    }
    if t.data_location == Some(1) {
        return None;
    }
    Some(t.float_data.clone())
}

/// A copy of `model` whose graph also outputs `names` (float tensors), for calibration,
/// and the graph-output index of each name (a name that already is an output keeps its own).
pub(crate) fn with_extra_outputs(model: &ModelProto, names: &[String]) -> (ModelProto, Vec<usize>) {
    let mut m = model.clone();
    let g = m.graph.as_mut().expect("checked by check_model");
    let mut index = Vec::with_capacity(names.len());
    for name in names {
        if let Some(ix) = g.output.iter().position(|o| &o.name == name) {
            index.push(ix);
            continue;
        }
        index.push(g.output.len());
        g.output.push(ValueInfoProto {
            name: name.clone(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: DataType::Float as i32,
                    shape: None,
                })),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    (m, index)
}

fn tensor_i8(name: &str, dims: &[usize], v: &[i8]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|d| *d as i64).collect(),
        data_type: DataType::Int8 as i32,
        raw_data: v.iter().map(|x| *x as u8).collect(),
        ..Default::default()
    }
}

fn tensor_f32(name: &str, dims: &[usize], v: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|d| *d as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn tensor_i32(name: &str, dims: &[usize], v: &[i32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|d| *d as i64).collect(),
        data_type: DataType::Int32 as i32,
        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    output: &str,
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| (*s).to_string()).collect(),
        output: vec![output.into()],
        attribute: attrs,
        ..Default::default()
    }
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

/// Activation quantization parameters per calibrated tensor.
pub(crate) type Ranges = HashMap<String, (f32, f32)>;

/// Rewrites `model` into the int8 form `format`, with activation ranges `ranges` (every
/// name of [`calibration_tensors`]). Returns the new model and the number of quantized layers.
pub(crate) fn rewrite(
    model: &ModelProto,
    layers: &[Layer],
    ranges: &Ranges,
    format: QuantFormat,
) -> Result<(ModelProto, usize), QuantizeError> {
    let mut m = model.clone();
    let g = m.graph.as_mut().expect("checked by check_model");
    if format == QuantFormat::Qdq {
        let opset = m
            .opset_import
            .iter()
            .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
            .map_or(0, |o| o.version);
        if opset < 13 {
            return Err(QuantizeError::Unsupported {
                node: "<model>".into(),
                op: "<opset>".into(),
                reason: format!(
                    "opset {opset}: per-channel DequantizeLinear (--format qdq) needs opset >= 13"
                ),
            });
        }
    }
    let inits: HashMap<String, TensorProto> =
        g.initializer.iter().map(|t| (t.name.clone(), t.clone())).collect();
    let range = |name: &str| -> Result<(f32, f32), QuantizeError> {
        ranges.get(name).copied().ok_or_else(|| QuantizeError::Calibration {
            dir: Default::default(),
            reason: format!("no calibration range for tensor `{name}`"),
        })
    };
    let act_params = |lo: f32, hi: f32| match format {
        // i8 activations: tract converts u8 operands to i8 before its integer matmul, so
        // i8 saves that pass; asymmetric keeps GELU's one-sided range at full resolution.
        QuantFormat::Tract => QParams::asymmetric(lo, hi),
        QuantFormat::Qdq => QParams::symmetric(lo, hi),
    };

    let by_node: HashMap<usize, &Layer> =
        layers.iter().filter(|l| l.quantize).map(|l| (l.node_ix, l)).collect();
    let mut new_nodes = Vec::with_capacity(g.node.len() + 3 * by_node.len());
    let mut new_inits: Vec<TensorProto> = Vec::new();
    // Activation tensor -> its quantized (tract) or fake-quantized (qdq) name, emitted once.
    let mut quantized_inputs: HashMap<String, String> = HashMap::new();
    let mut replaced_weights: HashSet<String> = HashSet::new();
    for (ix, n) in g.node.iter().enumerate() {
        let Some(layer) = by_node.get(&ix) else {
            new_nodes.push(n.clone());
            continue;
        };
        let w = &inits[&layer.weight];
        let wdata = f32_data(w).expect("checked by find_layers");
        let x = &layer.input;
        let (lo, hi) = range(x)?;
        let xp = act_params(lo, hi);
        let xs = format!("{x}/quant.scale");
        let xz = format!("{x}/quant.zero_point");
        let xq = quantized_inputs
            .entry(x.clone())
            .or_insert_with(|| {
                new_inits.push(tensor_f32(&xs, &[], &[xp.scale]));
                new_inits.push(tensor_i8(&xz, &[], &[xp.zero_point]));
                let q = format!("{x}/quant");
                new_nodes.push(node("QuantizeLinear", &q, &[x, &xs, &xz], &q, vec![]));
                match format {
                    QuantFormat::Tract => q,
                    QuantFormat::Qdq => {
                        let dq = format!("{x}/dequant");
                        new_nodes.push(node("DequantizeLinear", &dq, &[&q, &xs, &xz], &dq, vec![]));
                        dq
                    }
                }
            })
            .clone();
        let wname = &layer.weight;
        replaced_weights.insert(wname.clone());
        let wq = format!("{wname}/int8");
        let ws = format!("{wname}/int8.scale");
        let wz = format!("{wname}/int8.zero_point");
        let (q, scales) = match layer.op {
            "MatMul" => quantize_per_column(&wdata, layer.weight_dims[0], layer.weight_dims[1]),
            _ => quantize_per_row(&wdata, layer.weight_dims[0]),
        };
        let channels = scales.len();
        new_inits.push(tensor_i8(&wq, &layer.weight_dims, &q));
        new_inits.push(tensor_f32(&ws, &[channels], &scales));
        new_inits.push(tensor_i8(&wz, &[channels], &vec![0; channels]));
        let out = &layer.output;
        match format {
            QuantFormat::Tract => {
                let (olo, ohi) = range(out)?;
                let yp = QParams::asymmetric(olo, ohi);
                let ys = format!("{out}/int8.scale");
                let yz = format!("{out}/int8.zero_point");
                new_inits.push(tensor_f32(&ys, &[], &[yp.scale]));
                new_inits.push(tensor_i8(&yz, &[], &[yp.zero_point]));
                let yq = format!("{out}/int8");
                let mut inputs: Vec<&str> = vec![&xq, &xs, &xz, &wq, &ws, &wz, &ys, &yz];
                let (op, bias_name);
                if layer.op == "MatMul" {
                    op = "QLinearMatMul";
                } else {
                    op = "QLinearConv";
                    if let Some(b) = &layer.conv_bias {
                        let bias = f32_data(&inits[b])
                            .ok_or_else(|| unsupported(n, format!("bias `{b}` is not f32 data")))?;
                        let qb: Vec<i32> = bias
                            .iter()
                            .zip(&scales)
                            .map(|(b, s)| (b / (xp.scale * s)).round_ties_even() as i32)
                            .collect();
                        bias_name = format!("{b}/int32");
                        new_inits.push(tensor_i32(&bias_name, &[channels], &qb));
                        inputs.push(&bias_name);
                    }
                }
                let mut qn = node(op, &format!("{}/int8", layer.name), &inputs, &yq, vec![]);
                if layer.op == "Conv" {
                    qn.attribute = n.attribute.clone();
                }
                new_nodes.push(qn);
                new_nodes.push(node(
                    "DequantizeLinear",
                    &format!("{}/dequant", layer.name),
                    &[&yq, &ys, &yz],
                    out,
                    vec![],
                ));
            }
            QuantFormat::Qdq => {
                let axis = if layer.op == "MatMul" { 1 } else { 0 };
                let wdq = format!("{wname}/dequant");
                new_nodes.push(node(
                    "DequantizeLinear",
                    &wdq,
                    &[&wq, &ws, &wz],
                    &wdq,
                    vec![attr_int("axis", axis)],
                ));
                let mut mm = n.clone();
                mm.input[0] = xq.clone();
                mm.input[1] = wdq;
                new_nodes.push(mm);
            }
        }
    }
    // Drop float weights nothing reads any more.
    let still_used: HashSet<&str> =
        new_nodes.iter().flat_map(|n| n.input.iter().map(String::as_str)).collect();
    g.initializer
        .retain(|t| !replaced_weights.contains(&t.name) || still_used.contains(t.name.as_str()));
    g.input.retain(|i| !replaced_weights.contains(&i.name) || still_used.contains(i.name.as_str()));
    g.initializer.extend(new_inits);
    g.node = new_nodes;
    m.producer_name = format!("{} + flsl quantize", m.producer_name);
    m.metadata_props.push(tract_onnx::pb::StringStringEntryProto {
        key: "flsl.quantization".into(),
        value: match format {
            QuantFormat::Tract => {
                "int8 QLinearMatMul, per-channel symmetric weights, asymmetric i8 activations"
                    .into()
            }
            QuantFormat::Qdq => {
                "int8 QDQ, per-channel symmetric weights, symmetric i8 activations".into()
            }
        },
    });
    Ok((m, by_node.len()))
}
