//! Appends the CenterNet-style detection head to an exported backbone graph, so one ONNX file
//! gives `features`, `prototype_logits` and the detection maps the perception core decodes.
//!
//! # Graph (appended after `features [1, N, D]`)
//!
//! ```text
//! features -> Transpose [1,D,N] -> Reshape [1,D,gh,gw]
//!   ConvTranspose(k = s = 2) -> Relu -> Conv 3x3 (pad 1) -> Relu       [1,hidden,2gh,2gw]
//!   Conv 1x1 -> Sigmoid                                      det_heatmap [1,C,2gh,2gw]
//!   Conv 1x1 -> Sigmoid  (dx, dy: centre offset in the cell, in cells)
//!   Conv 1x1 -> Exp      (w, h: box size in cells)
//!   Concat(axis 1)                                           det_boxes   [1,4,2gh,2gw]
//! ```
//!
//! One cell of the maps is `patch / 2` input pixels (the stride `s` of the decoding contract
//! in `perception`): centre `((ix + dx) * s, (iy + dy) * s)`, size `(w * s, h * s)`.
//! Only standard operators (Transpose, Reshape, ConvTranspose, Conv, Relu, Sigmoid, Exp,
//! Concat), so tract, onnxruntime and TensorRT read it.

use tract_onnx::pb::{AttributeProto, ModelProto, NodeProto, TensorProto, tensor_proto::DataType};

use crate::export::{
    ExportError, FEATURES_NAME, HostTensors, VitSpec, attr_int, attr_ints, value_info,
};

pub use crate::contract::{BOXES_NAME, HEATMAP_NAME};

/// Shapes of the detection head, read from its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetHeadShape {
    /// Backbone width `D`.
    pub in_dim: usize,
    /// Hidden channels.
    pub hidden: usize,
    /// Classes `C`.
    pub classes: usize,
}

/// Reads the head's shapes from `weights` (keys `det.up.weight [D,hidden,2,2]`,
/// `det.conv.weight [hidden,hidden,3,3]`, `det.heat.weight [C,hidden,1,1]`,
/// `det.offset.weight [2,hidden,1,1]`, `det.size.weight [2,hidden,1,1]` and their biases).
pub fn det_head_shape(weights: &HostTensors) -> Result<DetHeadShape, ExportError> {
    let up = shape(weights, "det.up.weight")?;
    let heat = shape(weights, "det.heat.weight")?;
    match (up, heat) {
        ([d, h, 2, 2], [c, h2, 1, 1]) if h == h2 => {
            Ok(DetHeadShape { in_dim: *d, hidden: *h, classes: *c })
        }
        _ => Err(ExportError::Shape {
            name: "det.up.weight / det.heat.weight".into(),
            expected: vec![0, 0, 2, 2],
            got: up.to_vec(),
        }),
    }
}

fn shape<'a>(weights: &'a HostTensors, name: &str) -> Result<&'a [usize], ExportError> {
    weights
        .get(name)
        .map(|(s, _)| s.as_slice())
        .ok_or_else(|| ExportError::MissingTensor { name: name.into() })
}

fn get<'a>(
    weights: &'a HostTensors,
    name: &str,
    expected: &[usize],
) -> Result<&'a [f32], ExportError> {
    let (s, data) =
        weights.get(name).ok_or_else(|| ExportError::MissingTensor { name: name.into() })?;
    if s.as_slice() != expected || data.len() != expected.iter().product::<usize>() {
        return Err(ExportError::Shape {
            name: name.into(),
            expected: expected.to_vec(),
            got: s.clone(),
        });
    }
    Ok(data)
}

fn init(model: &mut Vec<TensorProto>, name: &str, dims: &[usize], data: &[f32]) -> String {
    model.push(TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    });
    name.into()
}

fn node(
    nodes: &mut Vec<NodeProto>,
    op: &str,
    name: &str,
    inputs: &[&str],
    attribute: Vec<AttributeProto>,
) -> String {
    nodes.push(NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| (*s).to_string()).collect(),
        output: vec![name.into()],
        attribute,
        ..Default::default()
    });
    name.into()
}

/// Appends the detection head (weights under `det.*`) to `model`, an exported backbone of
/// `spec` whose graph has the `features` output. Adds the outputs `det_heatmap` and
/// `det_boxes` and the metadata `flsl.det_stride` / `flsl.det_classes`.
pub fn append_det_head(
    model: &mut ModelProto,
    spec: &VitSpec,
    weights: &HostTensors,
) -> Result<DetHeadShape, ExportError> {
    let hs = det_head_shape(weights)?;
    let (d, hid, c) = (hs.in_dim, hs.hidden, hs.classes);
    if d != spec.embed_dim {
        return Err(ExportError::Shape {
            name: "det.up.weight".into(),
            expected: vec![spec.embed_dim, hid, 2, 2],
            got: vec![d, hid, 2, 2],
        });
    }
    let (gh, gw) = spec.grid();
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| ExportError::Spec { reason: "the model has no graph".into() })?;
    if !graph.output.iter().any(|o| o.name == FEATURES_NAME) {
        return Err(ExportError::Spec {
            reason: format!(
                "the graph has no `{FEATURES_NAME}` output to attach the detection head to"
            ),
        });
    }
    let (mut nodes, mut inits) = (Vec::new(), Vec::new());
    let i = &mut inits;
    let up_w =
        init(i, "det.up.weight", &[d, hid, 2, 2], get(weights, "det.up.weight", &[d, hid, 2, 2])?);
    let up_b = init(i, "det.up.bias", &[hid], get(weights, "det.up.bias", &[hid])?);
    let conv_w = init(
        i,
        "det.conv.weight",
        &[hid, hid, 3, 3],
        get(weights, "det.conv.weight", &[hid, hid, 3, 3])?,
    );
    let conv_b = init(i, "det.conv.bias", &[hid], get(weights, "det.conv.bias", &[hid])?);
    let heat_w = init(
        i,
        "det.heat.weight",
        &[c, hid, 1, 1],
        get(weights, "det.heat.weight", &[c, hid, 1, 1])?,
    );
    let heat_b = init(i, "det.heat.bias", &[c], get(weights, "det.heat.bias", &[c])?);
    let off_w = init(
        i,
        "det.offset.weight",
        &[2, hid, 1, 1],
        get(weights, "det.offset.weight", &[2, hid, 1, 1])?,
    );
    let off_b = init(i, "det.offset.bias", &[2], get(weights, "det.offset.bias", &[2])?);
    let size_w = init(
        i,
        "det.size.weight",
        &[2, hid, 1, 1],
        get(weights, "det.size.weight", &[2, hid, 1, 1])?,
    );
    let size_b = init(i, "det.size.bias", &[2], get(weights, "det.size.bias", &[2])?);
    inits.push(TensorProto {
        name: "det/grid_shape".into(),
        dims: vec![4],
        data_type: DataType::Int64 as i32,
        int64_data: vec![1, d as i64, gh as i64, gw as i64],
        ..Default::default()
    });

    let n = &mut nodes;
    let x = node(
        n,
        "Transpose",
        "det/channels_first",
        &[FEATURES_NAME],
        vec![attr_ints("perm", &[0, 2, 1])],
    );
    let x = node(n, "Reshape", "det/grid", &[&x, "det/grid_shape"], vec![]);
    let x = node(
        n,
        "ConvTranspose",
        "det/up",
        &[&x, &up_w, &up_b],
        vec![attr_ints("kernel_shape", &[2, 2]), attr_ints("strides", &[2, 2])],
    );
    let x = node(n, "Relu", "det/up_relu", &[&x], vec![]);
    let x = node(
        n,
        "Conv",
        "det/conv",
        &[&x, &conv_w, &conv_b],
        vec![attr_ints("kernel_shape", &[3, 3]), attr_ints("pads", &[1, 1, 1, 1])],
    );
    let x = node(n, "Relu", "det/conv_relu", &[&x], vec![]);
    let heat = node(
        n,
        "Conv",
        "det/heat",
        &[&x, &heat_w, &heat_b],
        vec![attr_ints("kernel_shape", &[1, 1])],
    );
    nodes_push_named(n, "Sigmoid", "det/heat_sigmoid", &[&heat], HEATMAP_NAME);
    let off = node(
        n,
        "Conv",
        "det/offset",
        &[&x, &off_w, &off_b],
        vec![attr_ints("kernel_shape", &[1, 1])],
    );
    let off = node(n, "Sigmoid", "det/offset_sigmoid", &[&off], vec![]);
    let size = node(
        n,
        "Conv",
        "det/size",
        &[&x, &size_w, &size_b],
        vec![attr_ints("kernel_shape", &[1, 1])],
    );
    let size = node(n, "Exp", "det/size_exp", &[&size], vec![]);
    n.push(NodeProto {
        op_type: "Concat".into(),
        name: "det/boxes".into(),
        input: vec![off, size],
        output: vec![BOXES_NAME.into()],
        attribute: vec![attr_int("axis", 1)],
        ..Default::default()
    });

    graph.node.extend(nodes);
    graph.initializer.extend(inits);
    graph.output.push(value_info(HEATMAP_NAME, &[1, c, 2 * gh, 2 * gw]));
    graph.output.push(value_info(BOXES_NAME, &[1, 4, 2 * gh, 2 * gw]));
    let stride = spec.patch_size as f32 / 2.0;
    for (key, value) in
        [("flsl.det_stride", stride.to_string()), ("flsl.det_classes", c.to_string())]
    {
        model.metadata_props.retain(|p| p.key != key);
        model
            .metadata_props
            .push(tract_onnx::pb::StringStringEntryProto { key: key.into(), value });
    }
    Ok(hs)
}

fn nodes_push_named(n: &mut Vec<NodeProto>, op: &str, name: &str, inputs: &[&str], output: &str) {
    n.push(NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| (*s).to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    });
}
