//! ONNX `LayerNormalization` as one op: mean, variance, normalization and the affine in one
//! pass per row, rows split over the pool's threads.
//!
//! tract 0.23 expands `LayerNormalization` into a chain of eight typed ops (a summing
//! `Reduce`, a scalar multiply, a subtraction, `RmsNorm`, a multiply-add chain, ...), each a
//! pass over the activations, the reductions on one thread. In an int8 ViT-Ti/16 those
//! passes took 2.7 ms of an 18.5 ms frame (`docs/PERFORMANCE.md`), more than all four
//! attention projections together. [`onnx_parser`] is tract's ONNX parser with
//! `LayerNormalization` (scale and bias, no optional outputs: what every exported ViT has)
//! parsed into [`FusedLayerNorm`]; other forms keep tract's own expansion. The file itself
//! is unchanged, so onnxruntime and TensorRT read the same model.

// An output tensor allocated without zeroing (every value is written).
#![allow(unsafe_code)]

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::NodeProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_hir::internal::{
    Expansion, InferenceOp, InferenceResult, Solver, TensorProxy, check_input_arity,
    check_output_arity, expand,
};

/// `y = (x - mean) / sqrt(var + eps) * scale + bias` over the trailing axes from `axis`
/// (ONNX `LayerNormalization`, biased variance), f32. Inputs: `x`, `scale`, `bias`, the
/// latter two with exactly as many values as one normalized row.
#[derive(Debug, Clone, PartialEq)]
pub struct FusedLayerNorm {
    /// First normalized axis (non-negative).
    pub axis: usize,
    /// Added to the variance.
    pub eps: f32,
}

// `eps` is finite (parsed from the file's attribute), so equality is reflexive.
impl Eq for FusedLayerNorm {}

impl FusedLayerNorm {
    fn row_len(&self, shape: &[usize]) -> usize {
        shape[self.axis.min(shape.len())..].iter().product()
    }
}

impl Op for FusedLayerNorm {
    fn name(&self) -> StaticName {
        "FusedLayerNorm".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!("axis: {} eps: {:e}", self.axis, self.eps)])
    }

    op_as_typed_op!();
}

impl EvalOp for FusedLayerNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 3, "FusedLayerNorm takes x, scale and bias");
        let x = inputs[0].to_plain_array_view::<f32>()?;
        let scale = inputs[1].to_plain_array_view::<f32>()?;
        let bias = inputs[2].to_plain_array_view::<f32>()?;
        let row = self.row_len(x.shape());
        ensure!(
            scale.len() == row && bias.len() == row,
            "FusedLayerNorm: scale has {} and bias {} values for rows of {row}",
            scale.len(),
            bias.len()
        );
        let x = x.as_slice().context("FusedLayerNorm: input is not contiguous")?;
        let (scale, bias) = (
            scale.as_slice().context("FusedLayerNorm: scale is not contiguous")?,
            bias.as_slice().context("FusedLayerNorm: bias is not contiguous")?,
        );
        // Safety: every value is written below (`simd::layer_norm_rows` writes all of `y`), and an
        // output with empty rows has no values.
        let mut out = unsafe { Tensor::uninitialized::<f32>(inputs[0].shape())? };
        if row > 0 {
            let mut view = out.to_plain_array_view_mut::<f32>()?;
            let y =
                view.as_slice_mut().context("FusedLayerNorm: fresh output is not contiguous")?;
            super::simd::layer_norm_rows(x, scale, bias, self.eps, y);
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for FusedLayerNorm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 3, "FusedLayerNorm takes x, scale and bias");
        for i in inputs {
            ensure!(i.datum_type == f32::datum_type(), "FusedLayerNorm is f32 only");
        }
        ensure!(
            self.axis <= inputs[0].rank(),
            "FusedLayerNorm: axis {} of a rank-{} input",
            self.axis,
            inputs[0].rank()
        );
        Ok(tvec!(inputs[0].without_value()))
    }

    as_op!();
}

/// The parse-time form: checks like tract's `LayerNorm` expansion, wires [`FusedLayerNorm`]
/// (with casts to and from f32 for other float types, as tract's `stash_type` f32 does).
#[derive(Debug, Clone)]
struct LayerNormExpansion {
    axis: isize,
    eps: f32,
}

impl Expansion for LayerNormExpansion {
    fn name(&self) -> StaticName {
        "LayerNorm".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 3)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &inputs[1].datum_type)?;
        s.equals(&inputs[0].datum_type, &inputs[2].datum_type)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        use tract_onnx::tract_core::ops::cast::cast;
        let fact = model.outlet_fact(inputs[0])?.clone();
        let rank = fact.rank() as isize;
        let axis = if self.axis < 0 { self.axis + rank } else { self.axis };
        ensure!(
            (0..=rank).contains(&axis),
            "{prefix}: LayerNormalization axis {} for a rank-{rank} input",
            self.axis
        );
        // Scale and bias broadcast to the normalized shape `x.shape[axis..]` (ONNX allows any
        // unidirectionally broadcastable shape; the op reads one value per row element).
        let normalized: TVec<TDim> = fact.shape.iter().skip(axis as usize).cloned().collect();
        let mut f32_inputs = tvec!();
        for (i, input) in inputs.iter().enumerate() {
            let dt = model.outlet_fact(*input)?.datum_type;
            let mut wire = if dt == f32::datum_type() {
                *input
            } else {
                model.wire_node(format!("{prefix}.cast_{i}"), cast(f32::datum_type()), &[*input])?
                    [0]
            };
            if i > 0 {
                wire = broadcast_to(
                    model,
                    &format!("{prefix}.{}", ["scale", "bias"][i - 1]),
                    wire,
                    &normalized,
                )?;
            }
            f32_inputs.push(wire);
        }
        let y = model.wire_node(
            prefix,
            FusedLayerNorm { axis: axis as usize, eps: self.eps },
            &f32_inputs,
        )?;
        if fact.datum_type == f32::datum_type() {
            Ok(y)
        } else {
            model.wire_node(format!("{prefix}.cast_y"), cast(fact.datum_type), &y)
        }
    }
}

/// `wire` broadcast (numpy rules) to exactly `shape`: leading unit axes dropped or added to
/// match the rank, then `MultiBroadcastTo` when a dimension still differs.
fn broadcast_to(
    model: &mut TypedModel,
    prefix: &str,
    mut wire: OutletId,
    shape: &[TDim],
) -> TractResult<OutletId> {
    use tract_onnx::tract_core::ops::array::MultiBroadcastTo;
    let mut rank = model.outlet_fact(wire)?.rank();
    let mut n = 0;
    while rank > shape.len() {
        ensure!(
            model.outlet_fact(wire)?.shape[0] == TDim::from(1),
            "{prefix}: shape {:?} does not broadcast to {shape:?}",
            model.outlet_fact(wire)?.shape
        );
        wire = model.wire_node(format!("{prefix}.rm{n}"), AxisOp::Rm(0), &[wire])?[0];
        (rank, n) = (rank - 1, n + 1);
    }
    while rank < shape.len() {
        wire = model.wire_node(format!("{prefix}.add{n}"), AxisOp::Add(0), &[wire])?[0];
        (rank, n) = (rank + 1, n + 1);
    }
    if model.outlet_fact(wire)?.shape.iter().zip(shape).any(|(a, b)| a != b) {
        wire = model.wire_node(
            format!("{prefix}.broadcast"),
            MultiBroadcastTo { shape: ShapeFact::from_dims(shape) },
            &[wire],
        )?[0];
    }
    Ok(wire)
}

/// tract's builder for the forms [`FusedLayerNorm`] does not take.
fn tract_layer_norm(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let builder = *tract_onnx::onnx()
        .op_register
        .0
        .get("LayerNormalization")
        .context("tract's ONNX parser has no LayerNormalization")?;
    builder(ctx, node)
}

fn parse_layer_norm(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let with_bias = node.input.len() == 3 && !node.input[2].is_empty();
    let one_output = node.output.iter().skip(1).all(|o| o.is_empty());
    let stash_f32 = node.get_attr_opt::<i64>("stash_type")?.is_none_or(|t| t == 1);
    if !(with_bias && one_output && stash_f32) {
        return tract_layer_norm(ctx, node);
    }
    let axis = node.get_attr_opt::<i64>("axis")?.unwrap_or(-1) as isize;
    let eps = node.get_attr_opt::<f32>("epsilon")?.unwrap_or(1e-5);
    Ok((expand(LayerNormExpansion { axis, eps }), vec![]))
}

/// tract's ONNX parser, with `LayerNormalization` parsed into [`FusedLayerNorm`].
pub fn onnx_parser() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    onnx.op_register.insert("LayerNormalization", parse_layer_norm);
    onnx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A LayerNormalization over the last two axes with scale / bias of the last one only
    /// (broadcast), and one over the last axis: our parser's plan equals tract's expansion.
    #[test]
    fn broadcast_scale_and_bias_match_tracts_expansion() {
        use prost::Message;
        use tract_onnx::pb::attribute_proto::AttributeType;
        use tract_onnx::pb::type_proto::{Tensor as TensorType, Value};
        use tract_onnx::pb::{
            AttributeProto, GraphProto, ModelProto, OperatorSetIdProto, TensorProto,
            ValueInfoProto, tensor_proto::DataType,
        };
        use tract_onnx::pb::{
            TensorShapeProto, TypeProto,
            tensor_shape_proto::{Dimension, dimension::Value as DimValue},
        };
        let f32s = |name: &str, dims: &[i64], v: Vec<f32>| TensorProto {
            name: name.into(),
            dims: dims.to_vec(),
            data_type: DataType::Float as i32,
            raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ..Default::default()
        };
        let shape = [2i64, 3, 5];
        let info = |name: &str| ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(Value::TensorType(TensorType {
                    elem_type: DataType::Float as i32,
                    shape: Some(TensorShapeProto {
                        dim: shape
                            .iter()
                            .map(|d| Dimension {
                                value: Some(DimValue::DimValue(*d)),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        };
        for axis in [-2i64, -1] {
            let graph = GraphProto {
                node: vec![tract_onnx::pb::NodeProto {
                    op_type: "LayerNormalization".into(),
                    name: "ln".into(),
                    input: vec!["x".into(), "scale".into(), "bias".into()],
                    output: vec!["y".into()],
                    attribute: vec![AttributeProto {
                        name: "axis".into(),
                        r#type: AttributeType::Int as i32,
                        i: axis,
                        ..Default::default()
                    }],
                    ..Default::default()
                }],
                initializer: vec![
                    f32s("scale", &[5], vec![0.5, 1.0, 1.5, 2.0, -1.0]),
                    f32s("bias", &[1, 5], vec![0.1, 0.2, 0.3, 0.4, 0.5]),
                ],
                input: vec![info("x")],
                output: vec![info("y")],
                ..Default::default()
            };
            let model = ModelProto {
                ir_version: 8,
                opset_import: vec![OperatorSetIdProto { domain: String::new(), version: 17 }],
                graph: Some(graph),
                ..Default::default()
            };
            let bytes = model.encode_to_vec();
            let x: Vec<f32> =
                (0..30).map(|i| ((i * 37) % 11) as f32 - 4.0 + i as f32 / 7.0).collect();
            let input = Tensor::from_shape(&[2, 3, 5], &x).unwrap();
            let run = |onnx: tract_onnx::Onnx| -> (Vec<f32>, Vec<String>) {
                let m = onnx.model_for_read(&mut &bytes[..]).unwrap().into_optimized().unwrap();
                let ops = m.nodes().iter().map(|n| n.op().name().to_string()).collect();
                let out =
                    m.into_runnable().unwrap().run(tvec!(input.clone().into_tvalue())).unwrap();
                (out[0].to_plain_array_view::<f32>().unwrap().iter().copied().collect(), ops)
            };
            let ((ours, ops), (theirs, _)) = (run(onnx_parser()), run(tract_onnx::onnx()));
            assert!(ops.iter().any(|o| o == "FusedLayerNorm"), "axis {axis}: {ops:?}");
            let worst = ours.iter().zip(&theirs).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5, "axis {axis}: worst {worst}");
        }
    }

    #[test]
    fn a_scale_of_the_wrong_length_is_an_error_naming_both_lengths() {
        let op = FusedLayerNorm { axis: 1, eps: 1e-6 };
        let x = Tensor::zero::<f32>(&[2, 4]).unwrap().into_tvalue();
        let s = Tensor::zero::<f32>(&[3]).unwrap().into_tvalue();
        let b = Tensor::zero::<f32>(&[4]).unwrap().into_tvalue();
        let err = op.eval_out_of_plan(tvec!(x, s, b)).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("scale has 3") && err.contains("rows of 4"), "{err}");
    }
}
