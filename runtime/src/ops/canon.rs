//! Canonicalisation of foreign exporters' spellings, on tract's decluttered typed model,
//! before our ops are substituted: the same ViT written by `torch.onnx` (dynamo or
//! TorchScript), timm or our own exporter should reach the same fused products.
//!
//! tract's own declutter already rewrites `Div` by a constant into `Mul` by its reciprocal,
//! folds `Constant` / `Identity` chains into constants, and recognises the exact GELU in
//! two of its three usual association orders (`(0.5·x)·(1+erf(x/√2))` and
//! `(x·(1+erf(x/√2)))·0.5`). What remains for us:
//!
//! - [`fuse_erf_gelu`]: the third order, `x·(0.5·(1+erf(x/√2)))`, which the dynamo exporter
//!   writes at opset 17 (and `x·((1+erf(x/√2))·0.5)`), becomes tract's `GeluExact`, which
//!   our products fuse. Multiplying by 0.5 is exact, so every order computes the same
//!   value.
//! - [`fuse_decomposed_layer_norm`]: a LayerNorm written out as `ReduceMean`, `Sub`, `Pow`,
//!   `ReduceMean`, `Add`, `Sqrt`, `Div`, `Mul`, `Add` (the TorchScript exporter below opset
//!   17), which declutter turns into a mean, a subtraction, tract's `RmsNorm` and the affine,
//!   becomes one [`FusedLayerNorm`](super::FusedLayerNorm), as the opset-17 op does.
//! - [`split_fused_qkv`]: timm's (and the paper's) attention computes `q`, `k`, `v` with one
//!   product, reshapes it to `[.., 3, heads, head_dim]`, transposes the `3` first and gathers
//!   `q`, `k`, `v` out of it (`Gather`, or dynamo's `unbind`: `Slice` or `Split`, then
//!   `Squeeze`): two full copies of the product per block that tract cannot fold away.
//!   The product becomes three (one per gathered slice of its weights and bias), each
//!   reshaped and transposed on its own, which tract's declutter then folds into the
//!   attention products, as in our own export. An int8 layer is split with it.
//! - the attention scale: folded into the score product by
//!   [`substitute_gemm_matmuls`](super::substitute_gemm_matmuls) itself (a product's `beta`).

use std::collections::HashMap;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::model::TypedModelHelpers;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::math::{Add, Erf, Mul, Sub};
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, RmsNorm};

use tract_onnx::tract_core::ops::array::{Gather, Slice};
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::einsum::EinSum;

use super::FusedLayerNorm;
use super::qdq::QdqLayer;
use tract_onnx::tract_core::ops::nn::gelu_exact::gelu_exact;

/// Rewrites every `x·(0.5·(1+erf(x·(1/√2))))` (either operand order in each product, and
/// `(1+erf)·0.5` for the inner factor) of f32 `x` into one `GeluExact(x)`. Returns the
/// number rewritten. Run it on a decluttered model, before the product substitutions.
pub fn fuse_erf_gelu(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    for id in model.eval_order()? {
        // An earlier patch of this loop may have removed the node.
        if id >= model.nodes().len() {
            continue;
        }
        let Some(patch) = half_inside_gelu(model, model.node(id))? else { continue };
        patch.apply(model)?;
        fused += 1;
    }
    Ok(fused)
}

fn is_mul(node: &TypedNode) -> bool {
    node.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<Mul>())
}

fn is_bin<B: tract_onnx::tract_core::ops::binary::BinMiniOp>(node: &TypedNode) -> bool {
    node.op_as::<TypedBinOp>().is_some_and(|b| b.0.is::<B>()) && node.inputs.len() == 2
}

/// Rewrites every `(x - mean(x)) / sqrt(mean((x - mean(x))²) + eps) [· γ] [+ β]` over the
/// last axis of f32 `x`, as tract's declutter leaves it (`Reduce<Sum>`, `Mul` by `1/D`,
/// `Sub`, `RmsNorm`, then an optional `Mul` by a constant `γ` and `Add` of a constant `β`,
/// each of `D` values), into one [`FusedLayerNorm`]. Returns the number rewritten.
pub fn fuse_decomposed_layer_norm(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    for id in model.eval_order()? {
        let Some(patch) = decomposed_layer_norm(model, model.node(id))? else { continue };
        patch.apply(model)?;
        fused += 1;
    }
    Ok(fused)
}

/// The `D` values of a constant input of the binary `node` (the other input being `from`),
/// when it only varies along the last axis.
fn affine_const(model: &TypedModel, node: &TypedNode, from: OutletId, d: usize) -> Option<Tensor> {
    let other = *node.inputs.iter().find(|i| **i != from)?;
    let k = model.outlet_fact(other).ok()?.konst.clone()?;
    if k.datum_type() != f32::datum_type() || k.len() != d || k.shape().last() != Some(&d) {
        return None;
    }
    (*k).clone().into_shape(&[d]).ok()
}

fn decomposed_layer_norm(
    model: &TypedModel,
    rms: &TypedNode,
) -> TractResult<Option<TypedModelPatch>> {
    let Some(op) = rms.op_as::<RmsNorm>() else { return Ok(None) };
    let fact = model.outlet_fact(OutletId::new(rms.id, 0))?;
    let Some(shape) = fact.shape.as_concrete().map(<[usize]>::to_vec) else { return Ok(None) };
    if fact.datum_type != f32::datum_type() || op.axis + 1 != shape.len() || op.eps.len() != 1 {
        return Ok(None);
    }
    let d = shape[op.axis];
    let eps = op.eps.cast_to_scalar::<f32>()?;
    // x - mean(x), read by the RmsNorm alone.
    let sub = model.node(rms.inputs[0].node);
    if !is_bin::<Sub>(sub) || sub.outputs[0].successors.len() != 1 {
        return Ok(None);
    }
    let (x, mean) = (sub.inputs[0], model.node(sub.inputs[1].node));
    // mean(x) = Reduce<Sum>(x) over the same axis, times 1/D.
    if !is_mul(mean) || !model.matches_single_input_const(mean, 1.0 / d as f32) {
        return Ok(None);
    }
    let Some(sum) = mean.inputs.iter().map(|i| model.node(i.node)).find(|n| n.op_is::<Reduce>())
    else {
        return Ok(None);
    };
    let reduce = sum.op_as::<Reduce>().filter(|r| r.reducer == Reducer::Sum);
    if reduce.is_none_or(|r| r.axes.as_slice() != [op.axis]) || sum.inputs != [x] {
        return Ok(None);
    }
    // The affine: · γ, then + β, each optional (an identity affine is decluttered away).
    let mut tail = OutletId::new(rms.id, 0);
    let (mut gamma, mut beta) = (None, None);
    if let Some(next) = model.single_succ(tail.node)?
        && is_bin::<Mul>(next)
        && let Some(g) = affine_const(model, next, tail, d)
        && model.outlet_fact(OutletId::new(next.id, 0))?.shape == fact.shape
    {
        gamma = Some(g);
        tail = OutletId::new(next.id, 0);
    }
    if let Some(next) = model.single_succ(tail.node)?
        && is_bin::<Add>(next)
        && let Some(b) = affine_const(model, next, tail, d)
        && model.outlet_fact(OutletId::new(next.id, 0))?.shape == fact.shape
    {
        beta = Some(b);
        tail = OutletId::new(next.id, 0);
    }
    let gamma = gamma.unwrap_or_else(|| tensor1(&vec![1f32; d]));
    let beta = beta.unwrap_or_else(|| tensor1(&vec![0f32; d]));
    let mut patch = TypedModelPatch::default();
    let xt = patch.tap_model(model, x)?;
    let g = patch.add_const(format!("{}.layer_norm.scale", rms.name), gamma)?;
    let b = patch.add_const(format!("{}.layer_norm.bias", rms.name), beta)?;
    let wired = patch.wire_node(
        format!("{}.layer_norm", rms.name),
        FusedLayerNorm { axis: op.axis, eps },
        &[xt, g, b],
    )?;
    patch.shunt_outside(model, tail, wired[0])?;
    Ok(Some(patch))
}

/// The patch for the chain anchored on `erf_node`, when it has the `x·(0.5·(1+erf))` shape.
fn half_inside_gelu(
    model: &TypedModel,
    erf_node: &TypedNode,
) -> TractResult<Option<TypedModelPatch>> {
    let is_erf = erf_node.op_as::<ElementWiseOp>().is_some_and(|e| e.0.is::<Erf>());
    if !is_erf || erf_node.inputs.len() != 1 {
        return Ok(None);
    }
    if model.node_input_facts(erf_node.id)?[0].datum_type != f32::datum_type() {
        return Ok(None);
    }
    // x / sqrt(2), as declutter leaves it: a product with the constant 1/sqrt(2).
    let scale = model.node(erf_node.inputs[0].node);
    if !is_mul(scale) || !model.matches_single_input_const(scale, std::f32::consts::FRAC_1_SQRT_2) {
        return Ok(None);
    }
    let Some(x) = scale
        .inputs
        .iter()
        .find(|o| model.outlet_fact(**o).is_ok_and(|f| f.konst.is_none()))
        .copied()
    else {
        return Ok(None);
    };
    if scale.outputs[0].successors.len() != 1 {
        return Ok(None);
    }
    // 1 + erf(.)
    let Some(one_plus) = model.find_succ_bin_with_const::<Add>(erf_node, 1.0) else {
        return Ok(None);
    };
    // 0.5 * (1 + erf(.)), then x * that.
    let Some(half) = model.find_succ_bin_with_const::<Mul>(one_plus, 0.5) else {
        return Ok(None);
    };
    let Some(out) = model.single_succ(half.id)? else { return Ok(None) };
    let other = out.inputs.iter().find(|i| i.node != half.id);
    if !is_mul(out) || out.inputs.len() != 2 || other != Some(&x) {
        return Ok(None);
    }
    // Same shape as x: no broadcast hides in the last product.
    if model.outlet_fact(OutletId::new(out.id, 0))?.shape != model.outlet_fact(x)?.shape {
        return Ok(None);
    }
    let mut patch = TypedModelPatch::default();
    let tap = patch.tap_model(model, x)?;
    let wired = patch.wire_node(format!("{}.gelu_exact", erf_node.name), gelu_exact(), &[tap])?;
    patch.shunt_outside(model, OutletId::new(out.id, 0), wired[0])?;
    Ok(Some(patch))
}

/// Splits each fused q/k/v product (see the module docs) into three. `int8` holds the
/// file's int8 layers by node name: a split layer is replaced by its three parts, named
/// `{name}.qkv{i}`. Returns the number of products split; run tract's declutter afterwards
/// so that the new transposes fold into their consumers.
pub fn split_fused_qkv(
    model: &mut TypedModel,
    int8: &mut HashMap<String, QdqLayer>,
) -> TractResult<usize> {
    let mut split = 0;
    for id in model.eval_order()? {
        let Some(plan) = QkvSplit::find(model, id)? else { continue };
        plan.apply(model, int8)?;
        split += 1;
    }
    Ok(split)
}

/// One fused q/k/v product and what reads it.
struct QkvSplit {
    product: usize,
    /// The bias `Add` and its constant, if any.
    bias: Option<(usize, Arc<Tensor>)>,
    /// The axis of the `3` after the reshape `[.., 3D] -> [.., 3, H, hd]`.
    three_axis: usize,
    /// The transposes between the reshape and the gathers, in order.
    moves: Vec<(usize, usize)>,
    /// The reads of the `3` axis, by index (0: q, 1: k, 2: v): the outlet holding the part,
    /// and whether it keeps the `3` axis as a unit axis (a `Slice` that nothing squeezes).
    gathers: [(OutletId, bool); 3],
    /// `D`, `heads`, `head_dim`.
    d: usize,
    shape: Vec<usize>,
}

impl QkvSplit {
    fn find(model: &TypedModel, id: usize) -> TractResult<Option<Self>> {
        let node = model.node(id);
        let Some(einsum) = node.op_as::<EinSum>() else { return Ok(None) };
        if einsum.q_params.is_some() || node.inputs.len() != 2 {
            return Ok(None);
        }
        let w = model.outlet_fact(node.inputs[1])?;
        let out = model.outlet_fact(OutletId::new(id, 0))?;
        let (Some(k), Some(ws), Some(os)) =
            (w.konst.as_ref(), w.shape.as_concrete(), out.shape.as_concrete())
        else {
            return Ok(None);
        };
        let [_, n3] = ws[..] else { return Ok(None) };
        if k.datum_type() != f32::datum_type() || os.last() != Some(&n3) || n3 % 3 != 0 {
            return Ok(None);
        }
        let d = n3 / 3;
        // [+ bias] -> reshape to [.., 3, H, hd]
        let mut tail = id;
        let mut bias = None;
        let Some(next) = model.single_succ(tail)? else { return Ok(None) };
        if is_bin::<Add>(next) {
            let other = *next.inputs.iter().find(|i| i.node != tail).unwrap_or(&next.inputs[0]);
            let Some(b) = model.outlet_fact(other)?.konst.clone() else { return Ok(None) };
            if b.len() != n3 || b.shape().last() != Some(&n3) || b.datum_type() != f32::datum_type()
            {
                return Ok(None);
            }
            bias = Some((next.id, b));
            tail = next.id;
        }
        let Some(reshape) = model.single_succ(tail)? else { return Ok(None) };
        if !matches!(reshape.op_as::<AxisOp>(), Some(AxisOp::Reshape(..))) {
            return Ok(None);
        }
        let rs = model.outlet_fact(OutletId::new(reshape.id, 0))?;
        let Some(rs) = rs.shape.as_concrete() else { return Ok(None) };
        let lead = &os[..os.len() - 1];
        if rs.len() != os.len() + 2 || &rs[..lead.len()] != lead || rs[lead.len()] != 3 {
            return Ok(None);
        }
        let three_axis = lead.len();
        // Transposes, then the three gathers of the `3` axis.
        let mut axes: Vec<usize> = (0..rs.len()).collect();
        let mut moves = Vec::new();
        let mut cur = reshape;
        loop {
            let succ = &cur.outputs[0].successors;
            if succ.len() == 1
                && let Some(AxisOp::Move(from, to)) = model.node(succ[0].node).op_as::<AxisOp>()
            {
                let a = axes.remove(*from);
                axes.insert(*to, a);
                moves.push((*from, *to));
                cur = model.node(succ[0].node);
                continue;
            }
            break;
        }
        let p = axes.iter().position(|&a| a == three_axis).unwrap_or(usize::MAX);
        let succ = &cur.outputs[0].successors;
        if succ.len() != 3 || model.output_outlets()?.contains(&OutletId::new(cur.id, 0)) {
            return Ok(None);
        }
        let mut gathers = [None; 3];
        for s in succ.iter() {
            let Some((i, outlet, keep)) = Self::pick(model, s, p)? else { return Ok(None) };
            let i = if i < 0 { i + 3 } else { i };
            match gathers.get_mut(i as usize) {
                Some(slot @ None) => *slot = Some((outlet, keep)),
                _ => return Ok(None),
            }
        }
        let [Some(q), Some(k), Some(v)] = gathers else { return Ok(None) };
        Ok(Some(Self {
            product: id,
            bias,
            three_axis,
            moves,
            gathers: [q, k, v],
            d,
            shape: rs.to_vec(),
        }))
    }

    /// One of the three reads of the `3` axis (axis `p`): `Gather` of a scalar index (the
    /// TorchScript exporter, dynamo at opset 17), or a one-wide `Slice` (dynamo's `unbind`:
    /// `Slice` or `Split`, then `Squeeze`), with or without the removal of that axis after it
    /// (declutter often folds the squeeze into the consumers, keeping a unit axis). Returns
    /// the index, the outlet that holds the part and whether it keeps the unit axis.
    fn pick(
        model: &TypedModel,
        s: &InletId,
        p: usize,
    ) -> TractResult<Option<(i64, OutletId, bool)>> {
        let g = model.node(s.node);
        if s.slot != 0 {
            return Ok(None);
        }
        if let Some(op) = g.op_as::<Gather>() {
            if op.axis != p || g.inputs.len() != 2 {
                return Ok(None);
            }
            let ix = model.outlet_fact(g.inputs[1])?.konst.clone();
            let i = ix.filter(|t| t.rank() == 0).and_then(|t| t.cast_to_scalar::<i64>().ok());
            return Ok(i.map(|i| (i, OutletId::new(g.id, 0), false)));
        }
        if let Some(op) = g.op_as::<Slice>() {
            let (Ok(start), Ok(end)) = (op.start.to_i64(), op.end.to_i64()) else {
                return Ok(None);
            };
            if op.axis != p || end != start + 1 {
                return Ok(None);
            }
            if let Some(rm) = model.single_succ(g.id)?
                && rm.op_as::<AxisOp>() == Some(&AxisOp::Rm(p))
            {
                return Ok(Some((start, OutletId::new(rm.id, 0), false)));
            }
            return Ok(Some((start, OutletId::new(g.id, 0), true)));
        }
        Ok(None)
    }

    fn apply(
        &self,
        model: &mut TypedModel,
        int8: &mut HashMap<String, QdqLayer>,
    ) -> TractResult<()> {
        let node = model.node(self.product);
        let name = node.name.clone();
        let einsum = node.op_as::<EinSum>().context("a product")?.clone();
        let (x, w) =
            (node.inputs[0], model.outlet_fact(node.inputs[1])?.konst.clone().context("weights")?);
        let w_axis = w.rank() - 1;
        let bias_op = self.bias.as_ref().map(|(id, b)| (model.node(*id).op.clone(), b.clone()));
        // The permutation the transposes apply, without the `3` axis.
        let mut axes: Vec<usize> = (0..self.shape.len()).collect();
        for &(from, to) in &self.moves {
            let a = axes.remove(from);
            axes.insert(to, a);
        }
        let target: Vec<usize> = axes
            .into_iter()
            .filter(|&a| a != self.three_axis)
            .map(|a| if a > self.three_axis { a - 1 } else { a })
            .collect();
        let mut part_shape = self.shape.clone();
        part_shape.remove(self.three_axis);
        let layer = int8.remove(&name);
        let mut patch = TypedModelPatch::default();
        let xt = patch.tap_model(model, x)?;
        for (i, &(gather, keep)) in self.gathers.iter().enumerate() {
            let part = format!("{name}.qkv{i}");
            let wi = w.slice(w_axis, i * self.d, (i + 1) * self.d)?;
            let wc = patch.add_const(format!("{part}.weights"), wi)?;
            let mut wire = patch.wire_node(&part, einsum.clone(), &[xt, wc])?[0];
            if let Some((op, b)) = &bias_op {
                let last = b.rank() - 1;
                let bi = patch.add_const(
                    format!("{part}.bias"),
                    b.slice(last, i * self.d, (i + 1) * self.d)?,
                )?;
                wire = patch.wire_node(format!("{part}.add_bias"), op.clone(), &[wire, bi])?[0];
            }
            // [.., D] -> [.., H, hd], or [.., 1, H, hd] when the part keeps the `3` axis as a
            // unit axis; then the file's own transposes (which move that unit axis where the
            // `3` axis went), or their permutation without it.
            let at = self.three_axis;
            let to: TVec<TDim> = keep
                .then_some(1)
                .into_iter()
                .chain(part_shape[at..].iter().copied())
                .map(|v| v.to_dim())
                .collect();
            let reshape = AxisOp::Reshape(at, tvec![self.d.to_dim()], to);
            wire = patch.wire_node(format!("{part}.reshape"), reshape, &[wire])?[0];
            let moves: Vec<(usize, usize)> = if keep {
                self.moves.clone()
            } else {
                let mut moves = Vec::new();
                let mut cur: Vec<usize> = (0..target.len()).collect();
                for (j, &a) in target.iter().enumerate() {
                    let pos = cur.iter().position(|&c| c == a).context("axis")?;
                    if pos != j {
                        moves.push((pos, j));
                        let moved = cur.remove(pos);
                        cur.insert(j, moved);
                    }
                }
                moves
            };
            for (j, &(from, to)) in moves.iter().enumerate() {
                let mv = AxisOp::Move(from, to);
                wire = patch.wire_node(format!("{part}.move{j}"), mv, &[wire])?[0];
            }
            patch.shunt_outside(model, gather, wire)?;
            if let Some(l) = &layer {
                let d = self.d;
                let w_q: Vec<i8> = l
                    .w_q
                    .chunks_exact(l.n)
                    .flat_map(|row| row[i * d..(i + 1) * d].iter().copied())
                    .collect();
                let w_scale = l.w_scale[i * d..(i + 1) * d].to_vec();
                int8.insert(part, QdqLayer { w_q, n: d, w_scale, ..l.clone() });
            }
        }
        patch.apply(model)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::math::{add, erf, mul};
    use tract_onnx::tract_core::ops::nn::GeluExact;

    /// `x·(0.5·(1+erf(x/√2)))` with the operands of each product in the given order.
    fn chain(swap_inner: bool, swap_outer: bool) -> TractResult<TypedModel> {
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([2, 5]))?;
        let c = m.add_const("c", tensor2(&[[std::f32::consts::FRAC_1_SQRT_2]]))?;
        let scaled = m.wire_node("scale", mul(), &[x, c])?[0];
        let e = m.wire_node("erf", erf(), &[scaled])?[0];
        let one = m.add_const("one", tensor2(&[[1f32]]))?;
        let ope = m.wire_node("add_one", add(), &[e, one])?[0];
        let h = m.add_const("half_c", tensor2(&[[0.5f32]]))?;
        let inner = if swap_inner { [h, ope] } else { [ope, h] };
        let half = m.wire_node("half", mul(), &inner)?[0];
        let outer = if swap_outer { [half, x] } else { [x, half] };
        let out = m.wire_node("out", mul(), &outer)?;
        m.select_output_outlets(&out)?;
        Ok(m)
    }

    fn run(m: &TypedModel, x: &[f32]) -> Vec<f32> {
        let plan = TypedSimplePlan::new(m.clone()).unwrap();
        let input = Tensor::from_shape(&[2, 5], x).unwrap();
        let out = plan.run(tvec!(input.into_tvalue())).unwrap();
        out[0].to_plain_array_view::<f32>().unwrap().iter().copied().collect()
    }

    #[test]
    fn every_order_of_the_half_inside_form_becomes_one_exact_gelu_with_the_same_values() {
        let x: Vec<f32> = (0..10).map(|i| (i as f32 - 4.5) * 0.77).collect();
        for (si, so) in [(false, false), (true, false), (false, true), (true, true)] {
            let original = chain(si, so).unwrap();
            let mut m = original.clone().into_decluttered().unwrap();
            let n = fuse_erf_gelu(&mut m).unwrap();
            assert_eq!(n, 1, "order {si} {so}");
            let gelus = m
                .nodes()
                .iter()
                .filter(|n| n.op_as::<ElementWiseOp>().is_some_and(|e| e.0.is::<GeluExact>()))
                .count();
            assert_eq!(gelus, 1);
            assert!(
                !m.nodes()
                    .iter()
                    .any(|n| n.op_as::<ElementWiseOp>().is_some_and(|e| e.0.is::<Erf>()))
            );
            let (a, b) = (run(&original, &x), run(&m, &x));
            for (a, b) in a.iter().zip(&b) {
                assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn a_chain_with_another_constant_is_left_alone() {
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([4])).unwrap();
        let c = m.add_const("c", tensor1(&[0.6f32])).unwrap();
        let scaled = m.wire_node("scale", mul(), &[x, c]).unwrap()[0];
        let e = m.wire_node("erf", erf(), &[scaled]).unwrap()[0];
        let one = m.add_const("one", tensor1(&[1f32])).unwrap();
        let ope = m.wire_node("add_one", add(), &[e, one]).unwrap()[0];
        let h = m.add_const("half_c", tensor1(&[0.5f32])).unwrap();
        let half = m.wire_node("half", mul(), &[ope, h]).unwrap()[0];
        let out = m.wire_node("out", mul(), &[x, half]).unwrap();
        m.select_output_outlets(&out).unwrap();
        let mut m = m.into_decluttered().unwrap();
        assert_eq!(fuse_erf_gelu(&mut m).unwrap(), 0);
    }
}
