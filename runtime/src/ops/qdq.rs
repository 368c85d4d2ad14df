//! Finds the quantized linear layers of a QDQ ONNX graph and lowers them for
//! [`Int8MatMul`](super::Int8MatMul).
//!
//! The pattern (what `flsl quantize --format qdq` writes, and onnxruntime's static QDQ
//! quantizer too):
//!
//! ```text
//! x -> QuantizeLinear(xs, xz) -> DequantizeLinear(xs, xz) --\
//!                                                            MatMul -> [Add(bias)]
//! W_q (int8 [K, N]) -> DequantizeLinear(ws [N] or scalar, 0) -/
//! ```
//!
//! [`lower_qdq_matmuls`] records each such `MatMul` (activation scale and zero point, the
//! int8 weights and their scales) under the `MatMul` node's name, and rewrites the graph so
//! that tract sees a plain float `MatMul` of `x` and the dequantized weights (the Q/DQ pair
//! on `x` disappears when nothing else reads it). [`substitute_int8_matmuls`] then swaps
//! those products in tract's typed model for the integer op. A QDQ `Conv` that is a patch
//! embedding (stride = kernel, no padding; weights `[D, C, kh, kw]` per output channel) is
//! lowered the same way and becomes an int8 [`super::PatchEmbed`]. Anything that does not match
//! exactly (another axis, a non-zero weight zero point, a shared weight, a non-constant
//! scale) is left as it was, so the graph always keeps its meaning.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tract_onnx::pb::{ModelProto, NodeProto, TensorProto, tensor_proto::DataType};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

use super::gemm_matmul::{Geometry, Post, following_bias, following_post};
use super::int8_matmul::{ActQuant, Int8Layer, Int8MatMul, RowLayout};

/// What [`lower_qdq_matmuls`] found for one `MatMul`.
#[derive(Debug, Clone)]
pub struct QdqLayer {
    /// Activation quantization.
    pub act: ActQuant,
    /// Int8 weights, row-major `[K, N]`.
    pub w_q: Vec<i8>,
    /// `K`, `N`.
    pub k: usize,
    /// `N`.
    pub n: usize,
    /// Per-column weight scales (`N` values).
    pub w_scale: Vec<f32>,
    /// `Some((kh, kw))` for a patch-embedding `Conv` (stride = kernel, no padding): `w_q` is
    /// then its `[D, C, kh, kw]` weights as `[C kh kw, D]`, for [`super::PatchEmbed`].
    pub patch_kernel: Option<(usize, usize)>,
    /// The activation is quantized per call from its own range (onnxruntime's dynamic
    /// quantization, `DynamicQuantizeLinear`); `act` is then unused.
    pub dynamic: bool,
}

fn ints_attr(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    n.attribute.iter().find(|a| a.name == name).map(|a| a.ints.clone())
}

/// The kernel `(kh, kw)` of a `Conv` that is a patch embedding for weights of `dims`
/// `[D, C, kh, kw]`: strides equal to the kernel, no padding or dilation, one group.
fn patch_conv_kernel(n: &NodeProto, dims: &[usize]) -> Option<(usize, usize)> {
    let [_, _, kh, kw] = *dims else { return None };
    let attr_ok = n.attribute.iter().all(|a| match a.name.as_str() {
        "kernel_shape" => a.ints == [kh as i64, kw as i64],
        "strides" => a.ints == [kh as i64, kw as i64],
        "pads" => a.ints.iter().all(|&p| p == 0),
        "dilations" => a.ints.iter().all(|&d| d == 1),
        "group" => a.i == 1,
        "auto_pad" => matches!(a.s.as_slice(), b"NOTSET" | b"VALID" | b""),
        _ => false,
    });
    (attr_ok && ints_attr(n, "strides").is_some()).then_some((kh, kw))
}

fn raw_or<T: Copy>(
    t: &TensorProto,
    width: usize,
    from: impl Fn(&[u8]) -> T,
    typed: impl Fn() -> Vec<T>,
) -> Option<Vec<T>> {
    if t.data_location == Some(1) {
        return None;
    }
    if !t.raw_data.is_empty() {
        if !t.raw_data.len().is_multiple_of(width) {
            return None;
        }
        return Some(t.raw_data.chunks_exact(width).map(from).collect());
    }
    Some(typed())
}

fn f32s(t: &TensorProto) -> Option<Vec<f32>> {
    if t.data_type != DataType::Float as i32 {
        return None;
    }
    raw_or(t, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]), || t.float_data.clone())
}

fn i32s(t: &TensorProto) -> Option<Vec<i32>> {
    if t.data_type != DataType::Int32 as i32 {
        return None;
    }
    raw_or(t, 4, |b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]), || t.int32_data.clone())
}

/// int8 or uint8 values as i32, and whether they were signed.
fn int8s(t: &TensorProto) -> Option<(Vec<i32>, bool)> {
    let signed = if t.data_type == DataType::Int8 as i32 {
        true
    } else if t.data_type == DataType::Uint8 as i32 {
        false
    } else {
        return None;
    };
    let v = raw_or(
        t,
        1,
        |b| if signed { i32::from(b[0] as i8) } else { i32::from(b[0]) },
        || t.int32_data.clone(),
    )?;
    Some((v, signed))
}

/// An f32 initializer `name` of shape `dims` holding `values` (little-endian raw data).
fn f32_tensor(name: String, dims: Vec<i64>, values: &[f32]) -> TensorProto {
    TensorProto {
        name,
        dims,
        data_type: DataType::Float as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn dims(t: &TensorProto) -> Vec<usize> {
    t.dims.iter().map(|&d| d.max(0) as usize).collect()
}

fn axis_attr(n: &NodeProto) -> i64 {
    n.attribute.iter().find(|a| a.name == "axis").map_or(1, |a| a.i)
}

/// Records and lowers the quantized `MatMul`s of `model` (see the module docs). Returns the
/// layers by `MatMul` node name; an empty map leaves `model` untouched.
pub fn lower_qdq_matmuls(model: &mut ModelProto) -> HashMap<String, QdqLayer> {
    let mut found = HashMap::new();
    let Some(g) = model.graph.as_mut() else { return found };
    let inits: HashMap<String, usize> =
        g.initializer.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
    let producer: HashMap<String, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i)))
        .collect();
    let mut readers: HashMap<String, usize> = HashMap::new();
    for n in &g.node {
        for i in &n.input {
            *readers.entry(i.clone()).or_default() += 1;
        }
    }
    let init = |name: &str| inits.get(name).map(|&i| &g.initializer[i]);
    // Scalar scale and zero point of a Q or DQ node.
    let scalar_params = |n: &NodeProto| -> Option<(f32, i32, bool)> {
        let s = f32s(init(n.input.get(1)?)?)?;
        let (z, signed) = match n.input.get(2).filter(|z| !z.is_empty()) {
            Some(z) => int8s(init(z)?)?,
            None => (vec![0], false),
        };
        (s.len() == 1 && z.len() == 1 && s[0].is_finite() && s[0] > 0.0)
            .then(|| (s[0], z[0], signed))
    };

    let mut rewrites: Vec<(usize, String, String, TensorProto)> = Vec::new();
    for (ix, n) in g.node.iter().enumerate() {
        let conv = n.op_type == "Conv" && (n.input.len() == 2 || n.input.len() == 3);
        if !(n.op_type == "MatMul" && n.input.len() == 2 || conv)
            || !n.domain.is_empty() && n.domain != "ai.onnx"
        {
            continue;
        }
        // The weight side: DequantizeLinear of an int8 initializer [K, N], per column or
        // per tensor, zero point 0, read by this MatMul only.
        let Some(&wdq_ix) = producer.get(&n.input[1]) else { continue };
        let wdq = &g.node[wdq_ix];
        if wdq.op_type != "DequantizeLinear" || readers.get(&wdq.output[0]) != Some(&1) {
            continue;
        }
        let Some(wt) = wdq.input.first().and_then(|w| init(w)) else { continue };
        let Some((wq, true)) = int8s(wt) else { continue };
        let wd = dims(wt);
        // MatMul: [K, N]. Conv: [D, C, kh, kw], as the product [C kh kw, D].
        let patch_kernel = if conv { patch_conv_kernel(n, &wd) } else { None };
        let (k, nn) = match (&wd[..], patch_kernel) {
            ([k, nn], None) if !conv => (*k, *nn),
            ([d, c, kh, kw], Some(_)) => (c * kh * kw, *d),
            _ => continue,
        };
        let Some(ws) = wdq.input.get(1).and_then(|s| init(s)).and_then(f32s) else { continue };
        let wz_ok = match wdq.input.get(2).filter(|z| !z.is_empty()) {
            Some(z) => init(z).and_then(int8s).is_some_and(|(z, _)| z.iter().all(|&v| v == 0)),
            None => true,
        };
        let per_column = ws.len() == nn
            && if conv { axis_attr(wdq) == 0 } else { axis_attr(wdq) == 1 || axis_attr(wdq) == -1 };
        if !wz_ok || !(per_column || ws.len() == 1) || ws.iter().any(|s| !s.is_finite()) {
            continue;
        }
        let w_scale = if ws.len() == 1 { vec![ws[0]; nn] } else { ws };
        // The activation side: DequantizeLinear(QuantizeLinear(x)) with equal scalar params.
        let Some(&adq_ix) = producer.get(&n.input[0]) else { continue };
        let adq = &g.node[adq_ix];
        let Some(&aq_ix) = adq.input.first().and_then(|i| producer.get(i)) else { continue };
        let aq = &g.node[aq_ix];
        if adq.op_type != "DequantizeLinear" || aq.op_type != "QuantizeLinear" {
            continue;
        }
        let (Some(p_dq), Some(p_q)) = (scalar_params(adq), scalar_params(aq)) else { continue };
        if p_dq.0.to_bits() != p_q.0.to_bits() || p_dq.1 != p_q.1 {
            continue;
        }
        let (scale, zero_point, signed) = p_q;
        let w_file: Vec<i8> = wq.iter().map(|&v| v as i8).collect();
        // The float weights tract parses, in the file's layout (the dequantized values, so
        // that a layer left unsubstituted still computes the QDQ graph's product).
        let dequantized: Vec<f32> = if conv {
            w_file.iter().enumerate().map(|(i, &q)| f32::from(q) * w_scale[i / k]).collect()
        } else {
            w_file.iter().enumerate().map(|(i, &q)| f32::from(q) * w_scale[i % nn]).collect()
        };
        // Int8MatMul's [K, N]: the Conv's [D, K] transposed.
        let w_q = if conv {
            (0..k * nn).map(|i| w_file[(i % nn) * k + i / nn]).collect()
        } else {
            w_file
        };
        let wname = format!("{}/int8_lowered", n.name);
        let tensor =
            f32_tensor(wname.clone(), wd.iter().map(|&d| d as i64).collect(), &dequantized);
        rewrites.push((ix, aq.input[0].clone(), wname, tensor));
        found.insert(
            n.name.clone(),
            QdqLayer {
                act: ActQuant { scale, zero_point, signed },
                w_q,
                k,
                n: nn,
                w_scale,
                patch_kernel,
                dynamic: false,
            },
        );
    }
    if found.len() != rewrites.len() {
        // Unnamed or duplicate MatMul names: matching by name would be ambiguous.
        found.clear();
        rewrites.clear();
    }
    for other in [lower_dynamic_matmuls(g), lower_qlinear_matmuls(g)] {
        if found.keys().any(|k| other.contains_key(k)) {
            tracing::warn!(
                "a node name names two int8 layers: the file's int8 layers are not lowered"
            );
            found.clear();
            return found;
        }
        found.extend(other);
    }
    if found.is_empty() {
        return found;
    }
    for (ix, x, wname, tensor) in rewrites {
        // A Conv keeps its bias input.
        g.node[ix].input[0] = x;
        g.node[ix].input[1] = wname;
        g.initializer.push(tensor);
    }
    sweep_dead_quant_nodes(g);
    found
}

/// Drops the nodes nothing reads any more (bypassed Q/DQ pairs, weight DQs, dynamic
/// quantizers), then the initializers only they read.
fn sweep_dead_quant_nodes(g: &mut tract_onnx::pb::GraphProto) {
    let outputs: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    loop {
        let read: HashSet<&String> = g.node.iter().flat_map(|n| n.input.iter()).collect();
        let dead: Vec<usize> = g
            .node
            .iter()
            .enumerate()
            .filter(|(_, n)| {
                matches!(
                    n.op_type.as_str(),
                    "QuantizeLinear" | "DequantizeLinear" | "DynamicQuantizeLinear"
                ) && n.output.iter().all(|o| !read.contains(o) && !outputs.contains(o))
            })
            .map(|(i, _)| i)
            .collect();
        if dead.is_empty() {
            break;
        }
        for i in dead.into_iter().rev() {
            g.node.remove(i);
        }
    }
    let read: HashSet<String> = g.node.iter().flat_map(|n| n.input.iter().cloned()).collect();
    g.initializer.retain(|t| read.contains(&t.name) || outputs.contains(&t.name));
}

/// In a file whose linear layers [`lower_qdq_matmuls`] lowered, the other activation
/// fake-quantization pairs `DequantizeLinear(QuantizeLinear(x))` (equal scalar scale and zero
/// point: onnxruntime's static quantizer puts them on product outputs, attention operands,
/// softmax outputs) are bypassed: their readers read `x`, in float. Our engine runs the linear
/// layers on its integer kernels and everything else in float, where those pairs only add
/// rounding (and block the bias, GELU and softmax fusions); onnxruntime itself runs them as
/// int8 operators. The result is closer to the float model than onnxruntime's, and differs
/// from onnxruntime's by that rounding. Returns the number of pairs bypassed (0 for a file
/// with no lowered layer: its Q/DQ semantics are kept exactly).
pub fn bypass_fake_quant_pairs(model: &mut ModelProto) -> usize {
    let Some(g) = model.graph.as_mut() else { return 0 };
    let inits: HashMap<String, TensorProto> =
        g.initializer.iter().map(|t| (t.name.clone(), t.clone())).collect();
    let params = |n: &NodeProto| -> Option<(u32, i32)> {
        let s = f32s(inits.get(n.input.get(1)?)?)?;
        let z = match n.input.get(2).filter(|z| !z.is_empty()) {
            Some(z) => int8s(inits.get(z)?)?.0,
            None => vec![0],
        };
        (s.len() == 1 && z.len() == 1).then(|| (s[0].to_bits(), z[0]))
    };
    let producer: HashMap<String, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i)))
        .collect();
    let outputs: HashSet<String> = g.output.iter().map(|o| o.name.clone()).collect();
    // Activation x activation `QLinearMatMul` (attention in onnxruntime's QOperator files):
    // `DequantizeLinear(QLinearMatMul(Q(a), Q(b)))` -> `MatMul(a, b)`, in float.
    let mut readers: HashMap<String, usize> = HashMap::new();
    for n in &g.node {
        for i in &n.input {
            *readers.entry(i.clone()).or_default() += 1;
        }
    }
    let consumer: HashMap<String, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.input.iter().map(move |x| (x.clone(), i)))
        .collect();
    let mut products = Vec::new();
    for (ix, n) in g.node.iter().enumerate() {
        let [aq, a_s, a_z, bq, b_s, b_z, y_s, y_z] = &n.input[..] else { continue };
        if n.op_type != "QLinearMatMul" || inits.contains_key(bq) || inits.contains_key(aq) {
            continue;
        }
        let quantized_from = |xq: &String, s: &String, z: &String| -> Option<String> {
            let q = &g.node[*producer.get(xq)?];
            let mine = (f32s(inits.get(s)?)?, int8s(inits.get(z)?)?.0);
            let (a, b) = (params(q)?, (mine.0.first()?.to_bits(), *mine.1.first()?));
            (q.op_type == "QuantizeLinear" && a == b && mine.0.len() == 1)
                .then(|| q.input[0].clone())
        };
        let (Some(a), Some(b)) = (quantized_from(aq, a_s, a_z), quantized_from(bq, b_s, b_z))
        else {
            continue;
        };
        if readers.get(&n.output[0]) != Some(&1) || outputs.contains(&n.output[0]) {
            continue;
        }
        let Some(&d_ix) = consumer.get(&n.output[0]) else { continue };
        let d = &g.node[d_ix];
        let same = |i: usize, x: &String| d.input.get(i).is_some_and(|v| v == x);
        if d.op_type != "DequantizeLinear" || !same(1, y_s) || !same(2, y_z) {
            continue;
        }
        products.push((ix, a, b, d.output[0].clone(), d_ix));
    }
    let mut dead = Vec::new();
    for (ix, a, b, y, d_ix) in &products {
        let node = &mut g.node[*ix];
        node.op_type = "MatMul".into();
        node.input = vec![a.clone(), b.clone()];
        node.output = vec![y.clone()];
        node.attribute.clear();
        dead.push(*d_ix);
    }
    dead.sort_unstable();
    for i in dead.into_iter().rev() {
        g.node.remove(i);
    }
    let producer: HashMap<String, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i)))
        .collect();
    let mut bypass: HashMap<String, String> = HashMap::new();
    for dq in &g.node {
        if dq.op_type != "DequantizeLinear"
            || dq.output.len() != 1
            || outputs.contains(&dq.output[0])
        {
            continue;
        }
        let Some(q) = dq.input.first().and_then(|i| producer.get(i)).map(|&i| &g.node[i]) else {
            continue;
        };
        if q.op_type != "QuantizeLinear" || inits.contains_key(&q.input[0]) {
            continue;
        }
        if let (Some(a), Some(b)) = (params(q), params(dq))
            && a == b
        {
            bypass.insert(dq.output[0].clone(), q.input[0].clone());
        }
    }
    for n in &mut g.node {
        for i in &mut n.input {
            if let Some(x) = bypass.get(i) {
                *i = x.clone();
            }
        }
    }
    sweep_dead_quant_nodes(g);
    bypass.len() + products.len()
}

/// Lookups over an ONNX graph the lowering passes share: initializers by name, the node that
/// produces each value, the nodes that read it, the graph's outputs.
struct GraphIndex<'g> {
    graph: &'g tract_onnx::pb::GraphProto,
    inits: HashMap<&'g str, usize>,
    producer: HashMap<&'g str, usize>,
    readers: HashMap<&'g str, Vec<usize>>,
    outputs: HashSet<&'g str>,
}

impl<'g> GraphIndex<'g> {
    fn new(graph: &'g tract_onnx::pb::GraphProto) -> Self {
        let inits =
            graph.initializer.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
        let producer = graph
            .node
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
            .collect();
        let mut readers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in graph.node.iter().enumerate() {
            for input in &n.input {
                readers.entry(input.as_str()).or_default().push(i);
            }
        }
        let outputs = graph.output.iter().map(|o| o.name.as_str()).collect();
        Self { graph, inits, producer, readers, outputs }
    }

    /// The initializer called `name`.
    fn init(&self, name: &str) -> Option<&'g TensorProto> {
        self.inits.get(name).map(|&i| &self.graph.initializer[i])
    }

    /// The one node reading `name`, when exactly one does and it is not a graph output.
    fn sole_reader(&self, name: &str) -> Option<usize> {
        match self.readers.get(name).map(Vec::as_slice) {
            Some([r]) if !self.outputs.contains(name) => Some(*r),
            _ => None,
        }
    }
}

/// `QLinearMatMul` layers (onnxruntime's static quantizer in `QOperator` format, `flsl quantize
/// --format tract`):
///
/// ```text
/// xq = QuantizeLinear(x, xs, xz)
/// yq = QLinearMatMul(xq, xs, xz, W_q int8 [K, N], ws [N] or scalar, [0], ys, yz)
/// y  = DequantizeLinear(yq, ys, yz)
/// ```
///
/// Each becomes `y = MatMul(x, dequantized W)` named after the `QLinearMatMul`, recorded with
/// the activation quantization `(xs, xz)`. The requantization of the output to 8 bits is not
/// kept: the integer kernel's float result goes on (closer to the float model; the file asked
/// for one more rounding). A layer whose output is read by anything but that one
/// `DequantizeLinear`, or whose weights do not match [`lower_qdq_matmuls`]'s rules, stays.
fn lower_qlinear_matmuls(g: &mut tract_onnx::pb::GraphProto) -> HashMap<String, QdqLayer> {
    let mut found = HashMap::new();
    let index = GraphIndex::new(g);
    let (init, producer) = (|name: &str| index.init(name), &index.producer);
    // Scalar (scale, zero point, signed) of a tensor pair given by name.
    let params = |s: &str, z: Option<&String>| -> Option<(f32, i32, bool)> {
        let s = f32s(init(s)?)?;
        let (z, signed) = match z.filter(|z| !z.is_empty()) {
            Some(z) => int8s(init(z)?)?,
            None => (vec![0], false),
        };
        (s.len() == 1 && z.len() == 1 && s[0].is_finite() && s[0] > 0.0)
            .then(|| (s[0], z[0], signed))
    };
    // (QLinear node, x, y, weights, Conv bias, the DequantizeLinear to delete)
    #[allow(clippy::type_complexity)]
    let mut rewrites: Vec<(usize, String, String, TensorProto, Option<TensorProto>, usize)> =
        Vec::new();
    for (ix, n) in g.node.iter().enumerate() {
        let conv = n.op_type == "QLinearConv";
        if !(n.op_type == "QLinearMatMul" || conv)
            || !(n.domain.is_empty() || n.domain == "ai.onnx")
        {
            continue;
        }
        let (aq, a_s, a_z, bq, b_s, b_z, y_s, y_z) = match &n.input[..] {
            [a, b, c, d, e, f, g, h] | [a, b, c, d, e, f, g, h, _] => (a, b, c, d, e, f, g, h),
            _ => continue,
        };
        // The activation: QuantizeLinear(x) with the product's own (xs, xz).
        let Some(&q_ix) = producer.get(aq.as_str()) else { continue };
        let q = &g.node[q_ix];
        if q.op_type != "QuantizeLinear" || q.input.len() < 2 {
            continue;
        }
        let (Some(act), Some(q_act)) =
            (params(a_s, Some(a_z)), params(&q.input[1], q.input.get(2)))
        else {
            continue;
        };
        if act.0.to_bits() != q_act.0.to_bits() || act.1 != q_act.1 || act.2 != q_act.2 {
            continue;
        }
        // The weights: int8 [K, N], scales per column or one, zero points 0.
        let Some(wt) = init(bq) else { continue };
        let Some((wq, true)) = int8s(wt) else { continue };
        let wd = dims(wt);
        // MatMul: [K, N]. Conv: a patch embedding's [D, C, kh, kw], as the product [C kh kw, D].
        let patch_kernel = if conv { patch_conv_kernel(n, &wd) } else { None };
        let (k, nn) = match (&wd[..], patch_kernel) {
            ([k, nn], None) if !conv => (*k, *nn),
            ([d, c, kh, kw], Some(_)) => (c * kh * kw, *d),
            _ => continue,
        };
        let Some(ws) = init(b_s).and_then(f32s) else { continue };
        let wz_ok = init(b_z).and_then(int8s).is_some_and(|(z, _)| z.iter().all(|&v| v == 0));
        if !wz_ok || !(ws.len() == 1 || ws.len() == nn) || ws.iter().any(|s| !s.is_finite()) {
            continue;
        }
        // A Conv's int32 bias, in units of xs * ws[c].
        let bias = match (conv, n.input.get(8).filter(|b| !b.is_empty())) {
            (true, Some(b)) => match init(b).and_then(i32s) {
                Some(b) if b.len() == nn => Some(b),
                _ => continue,
            },
            _ => None,
        };
        // The output: one DequantizeLinear with the product's (ys, yz).
        let Some(d_ix) = index.sole_reader(&n.output[0]) else { continue };
        let d = &g.node[d_ix];
        let (Some(y), Some(d_y)) = (
            params(y_s, Some(y_z)),
            params(d.input.get(1).map_or("", String::as_str), d.input.get(2)),
        ) else {
            continue;
        };
        if d.op_type != "DequantizeLinear" || y.0.to_bits() != d_y.0.to_bits() || y.1 != d_y.1 {
            continue;
        }
        let w_scale = if ws.len() == 1 { vec![ws[0]; nn] } else { ws };
        let w_file: Vec<i8> = wq.iter().map(|&v| v as i8).collect();
        let dequantized: Vec<f32> = if conv {
            w_file.iter().enumerate().map(|(i, &v)| f32::from(v) * w_scale[i / k]).collect()
        } else {
            w_file.iter().enumerate().map(|(i, &v)| f32::from(v) * w_scale[i % nn]).collect()
        };
        // Int8MatMul's [K, N]: the Conv's [D, K] transposed.
        let w_q: Vec<i8> = if conv {
            (0..k * nn).map(|i| w_file[(i % nn) * k + i / nn]).collect()
        } else {
            w_file
        };
        let wname = format!("{}/int8_lowered", n.name);
        let tensor =
            f32_tensor(wname.clone(), wd.iter().map(|&d| d as i64).collect(), &dequantized);
        let bias = bias.map(|b| {
            let values: Vec<f32> =
                b.iter().zip(&w_scale).map(|(&b, &s)| b as f32 * (act.0 * s)).collect();
            f32_tensor(format!("{}/bias_lowered", n.name), vec![nn as i64], &values)
        });
        rewrites.push((ix, q.input[0].clone(), d.output[0].clone(), tensor, bias, d_ix));
        let (scale, zero_point, signed) = act;
        found.insert(
            n.name.clone(),
            QdqLayer {
                act: ActQuant { scale, zero_point, signed },
                w_q,
                k,
                n: nn,
                w_scale,
                patch_kernel,
                dynamic: false,
            },
        );
    }
    if found.len() != rewrites.len() {
        return HashMap::new();
    }
    let mut dead = Vec::new();
    for (ix, x, y, tensor, bias, d_ix) in rewrites {
        let node = &mut g.node[ix];
        node.input = vec![x, tensor.name.clone()];
        if node.op_type == "QLinearConv" {
            // Conv keeps its attributes (kernel, strides, pads).
            node.op_type = "Conv".into();
            if let Some(b) = &bias {
                node.input.push(b.name.clone());
            }
        } else {
            node.op_type = "MatMul".into();
            node.attribute.clear();
        }
        node.output = vec![y];
        g.initializer.push(tensor);
        g.initializer.extend(bias);
        dead.push(d_ix);
    }
    dead.sort_unstable();
    for i in dead.into_iter().rev() {
        g.node.remove(i);
    }
    found
}

/// onnxruntime's dynamic int8 linear layers (`quantize_dynamic` with int8 weights):
///
/// ```text
/// (xq, xs, xz) = DynamicQuantizeLinear(x)
/// acc = MatMulInteger(xq, W_q int8 [K, N], xz, [W_zp = 0])
/// y   = Mul(Cast(acc, float), Mul(xs, W_scale [N] or scalar))   (either operand order)
/// ```
///
/// Each becomes `y = MatMul(x, dequantized W)` named after the `MatMulInteger` (a following
/// bias `Add` stays, for [`substitute_int8_matmuls`] to fold), recorded as a dynamic
/// [`QdqLayer`]. The `Cast` and both `Mul`s are removed; a `DynamicQuantizeLinear` nothing
/// reads any more goes with the dead-node sweep. A layer with a non-zero weight zero point,
/// uint8 weights, a shared intermediate or unnamed/duplicate names is left as it was.
fn lower_dynamic_matmuls(g: &mut tract_onnx::pb::GraphProto) -> HashMap<String, QdqLayer> {
    let mut found = HashMap::new();
    let index = GraphIndex::new(g);
    let (init, producer) = (|name: &str| index.init(name), &index.producer);
    let sole_reader = |name: &str| index.sole_reader(name);
    let plain = |n: &NodeProto| n.domain.is_empty() || n.domain == "ai.onnx";
    // (MatMulInteger index, x, new output, weight tensor, nodes to delete)
    let mut rewrites: Vec<(usize, String, String, TensorProto, [usize; 3])> = Vec::new();
    for (ix, n) in g.node.iter().enumerate() {
        if n.op_type != "MatMulInteger" || !plain(n) || !(3..=4).contains(&n.input.len()) {
            continue;
        }
        let Some(&dq_ix) = producer.get(n.input[0].as_str()) else { continue };
        let dq = &g.node[dq_ix];
        if dq.op_type != "DynamicQuantizeLinear"
            || !plain(dq)
            || dq.output.len() != 3
            || dq.output[0] != n.input[0]
            || dq.output[2] != n.input[2]
        {
            continue;
        }
        let Some(wt) = init(&n.input[1]) else { continue };
        let Some((wq, true)) = int8s(wt) else { continue };
        let [k, nn] = dims(wt)[..] else { continue };
        let wz_ok = match n.input.get(3).filter(|z| !z.is_empty()) {
            Some(z) => init(z).and_then(int8s).is_some_and(|(z, _)| z.iter().all(|&v| v == 0)),
            None => true,
        };
        if !wz_ok {
            continue;
        }
        // Cast(acc, float) -> Mul(., s), s = Mul(xs, W_scale).
        let Some(cast_ix) = sole_reader(&n.output[0]) else { continue };
        let cast = &g.node[cast_ix];
        let to_float =
            cast.attribute.iter().any(|a| a.name == "to" && a.i == DataType::Float as i64);
        if cast.op_type != "Cast" || !to_float {
            continue;
        }
        let Some(mul_ix) = sole_reader(&cast.output[0]) else { continue };
        let mul = &g.node[mul_ix];
        if mul.op_type != "Mul" || mul.input.len() != 2 {
            continue;
        }
        let s_name = if mul.input[0] == cast.output[0] { &mul.input[1] } else { &mul.input[0] };
        let Some(&smul_ix) = producer.get(s_name.as_str()) else { continue };
        let smul = &g.node[smul_ix];
        if smul.op_type != "Mul" || smul.input.len() != 2 || sole_reader(s_name) != Some(mul_ix) {
            continue;
        }
        let ws_name = match (&smul.input[0], &smul.input[1]) {
            (a, b) if *a == dq.output[1] => b,
            (a, b) if *b == dq.output[1] => a,
            _ => continue,
        };
        let Some(ws) = init(ws_name).and_then(f32s) else { continue };
        if !(ws.len() == 1 || ws.len() == nn) || ws.iter().any(|s| !s.is_finite()) {
            continue;
        }
        let w_scale = if ws.len() == 1 { vec![ws[0]; nn] } else { ws };
        let w_q: Vec<i8> = wq.iter().map(|&v| v as i8).collect();
        let dequantized: Vec<f32> =
            w_q.iter().enumerate().map(|(i, &q)| f32::from(q) * w_scale[i % nn]).collect();
        let wname = format!("{}/int8_lowered", n.name);
        let tensor = f32_tensor(wname.clone(), vec![k as i64, nn as i64], &dequantized);
        rewrites.push((
            ix,
            dq.input[0].clone(),
            mul.output[0].clone(),
            tensor,
            [cast_ix, mul_ix, smul_ix],
        ));
        let act = ActQuant { scale: 1.0, zero_point: 0, signed: false };
        found.insert(
            n.name.clone(),
            QdqLayer { act, w_q, k, n: nn, w_scale, patch_kernel: None, dynamic: true },
        );
    }
    if found.len() != rewrites.len() {
        // Unnamed or duplicate names: matching by name would be ambiguous.
        return HashMap::new();
    }
    let mut dead = Vec::new();
    for (ix, x, y, tensor, remove) in rewrites {
        let node = &mut g.node[ix];
        node.op_type = "MatMul".into();
        node.input = vec![x, tensor.name.clone()];
        node.output = vec![y];
        node.attribute.clear();
        g.initializer.push(tensor);
        dead.extend(remove);
    }
    dead.sort_unstable();
    dead.dedup();
    for i in dead.into_iter().rev() {
        g.node.remove(i);
    }
    found
}

/// The layer `name` belongs to: the layer of that name, or the one whose name `name` extends
/// with a `.` suffix (tract renames a product it splits, for example when it moves a model's
/// output slice up through the last block: `/blocks.11/fc1/MatMul.split-over-1.1..197`).
fn layer_of<'l>(
    name: &str,
    layers: &'l HashMap<String, QdqLayer>,
) -> Option<(&'l str, &'l QdqLayer)> {
    let matches =
        |k: &str| name == k || name.strip_prefix(k).is_some_and(|rest| rest.starts_with('.'));
    layers
        .iter()
        .filter(|(k, l)| l.patch_kernel.is_none() && matches(k))
        .max_by_key(|(k, _)| k.len())
        .map(|(k, l)| (k.as_str(), l))
}

/// Replaces each `EinSum` of `model` named like a layer of `layers` (a product of an f32
/// activation `[.., K]` and the constant `[K, N]` weights) with an [`Int8MatMul`], folding a
/// following bias `Add`. Run it on the decluttered model. Returns how many it replaced.
pub fn substitute_int8_matmuls(
    model: &mut TypedModel,
    layers: &HashMap<String, QdqLayer>,
) -> TractResult<usize> {
    let mut replaced = 0;
    let mut done = HashSet::new();
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some((layer_name, layer)) = layer_of(&node.name, layers) else { continue };
        let Some(einsum) = node.op_as::<EinSum>() else { continue };
        if node.inputs.len() != 2 || einsum.q_params.is_some() {
            continue;
        }
        let facts: Vec<TypedFact> = model.node_input_facts(id)?.into_iter().cloned().collect();
        let out_fact = model.outlet_fact(OutletId::new(id, 0))?.clone();
        let (Some(a), Some(b), Some(c)) = (
            facts[0].shape.as_concrete(),
            facts[1].shape.as_concrete(),
            out_fact.shape.as_concrete(),
        ) else {
            continue;
        };
        // `A [m, K] x W [K, N]`, A's rows read through strides, B the constant weights.
        let Some(geometry) = Geometry::from_einsum(&einsum.axes, a, b, c) else { continue };
        if facts[1].konst.is_none() {
            continue;
        }
        let Some((m, row_stride, ks)) = geometry.linear_rows(layer.k, layer.n) else { continue };
        let (bias, tail) = match following_bias(model, id, &geometry, c)? {
            Some((bias, tail)) => (Some(bias), tail),
            None => (None, OutletId::new(id, 0)),
        };
        let mut int8 = if layer.dynamic {
            Int8Layer::dynamic(&layer.w_q, layer.k, layer.n, &layer.w_scale, bias.as_deref())
        } else {
            Int8Layer::new(layer.act, &layer.w_q, layer.k, layer.n, &layer.w_scale, bias.as_deref())
        };
        // A GELU that alone reads the result runs in the op's store (MLP fc1).
        let mut tail = tail;
        if let Some((Post::Gelu, gelu)) = following_post(model, tail, &geometry)? {
            int8 = int8.with_gelu();
            tail = gelu;
        }
        let op = Int8MatMul::new(Arc::new(int8), RowLayout { m, row_stride, ks }, a, c)?;
        let name = node.name.clone();
        let input = node.inputs[0];
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, input)?;
        let wire = patch.wire_node(format!("{name}.int8"), op, &[x])?;
        patch.shunt_outside(model, tail, wire[0])?;
        patch.apply(model)?;
        replaced += 1;
        done.insert(layer_name.to_string());
    }
    for name in layers
        .iter()
        .filter(|(n, l)| l.patch_kernel.is_none() && !done.contains(*n))
        .map(|(n, _)| n)
    {
        tracing::warn!(layer = %name, "QDQ layer not lowered to Int8MatMul (its product is not a plain [.., K] x [K, N] in tract's graph): it runs as a float product");
    }
    Ok(replaced)
}
