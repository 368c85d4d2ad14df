//! Attention without the score matrix in memory: `softmax(Q Kᵀ) V` computed per block of
//! query rows, so each block's scores stay in cache.
//!
//! After [`substitute_gemm_matmuls`](super::substitute_gemm_matmuls), a ViT block's attention
//! is a [`GemmMatMul`] for the scores (with the softmax fused, `Post::Softmax`) whose output
//! only feeds the [`GemmMatMul`] of the context. With many tokens that intermediate is large
//! (the patch-8 demo backbone at 224: 4 heads x 784 x 784 floats, 9.8 MB per block) and
//! makes the pair memory-bound. [`fuse_attention`] replaces such a pair with one
//! [`FusedAttention`] op that, for each head and each block of query rows ([`BLOCK_BYTES`] of
//! scores), computes
//! the scores block (`gemm`), its softmax, and the context rows (`gemm`), reusing one
//! per-thread buffer. Heads (and row blocks) are split over the pool's threads.

// Raw-pointer gemm calls on blocks of the operands and a shared output written in disjoint
// blocks; every unsafe block states why it stays in bounds.
#![allow(unsafe_code)]

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

use super::gemm_matmul::{GemmMatMul, Geometry, Post};

/// Scores per block of query rows, in bytes: 512 KB (163 rows of 784 keys) stays within a
/// core's L2 next to the keys and values, while few blocks per head keep `gemm`'s repeated
/// packing of the keys small.
pub const BLOCK_BYTES: usize = 512 << 10;
/// Only score tensors at least this large are fused: smaller ones stay in cache anyway, and
/// there the unfused pair (one large product per head, split over threads) measured faster
/// at 2 threads (ViT-S/16: 6 x 196 x 196 floats, 0.9 MB, stays unfused; the patch-8 demo
/// backbone's 4 x 784 x 784, 9.8 MB, is fused).
pub const FUSE_MIN_SCORE_BYTES: usize = 4 << 20;

/// `softmax(A_s B_s) B_c` per batch block, from the scores' and the context's geometries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FusedAttention {
    scores: Geometry,
    context: Geometry,
    /// The scores' scale ([`GemmMatMul::scale`]) as bits.
    scale_bits: u32,
}

#[derive(Clone, Copy)]
struct Shared(*mut f32);
// Safety: threads write disjoint (batch, row-block) blocks of the output.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl FusedAttention {
    /// The fused op when `scores` (softmax over its `n`, after multiplying by `scale`) feeds
    /// `context` as its `A` exactly: same batch blocks, scores rows = context rows, scores
    /// columns = context's reduction.
    pub fn new(scores: &Geometry, context: &Geometry, scale: f32) -> Option<Self> {
        let (s, c) = (scores, context);
        let ok = s.kloop.is_empty()
            && c.kloop.is_empty()
            && s.c_cs == 1
            && (s.m == 1 || s.c_rs == s.n as isize)
            && c.a_cs == 1
            && (c.m == 1 || c.a_rs == s.n as isize)
            && c.m == s.m
            && c.k == s.n
            && s.batch.len() == c.batch.len()
            && s.batch.iter().zip(&c.batch).all(|(x, y)| x.0 == y.0 && x.3 == y.1);
        ok.then(|| Self {
            scores: scores.clone(),
            context: context.clone(),
            scale_bits: scale.to_bits(),
        })
    }

    /// Batch blocks `range` (flat indices), all rows.
    ///
    /// # Safety
    /// `q`, `k`, `v` are the inputs the geometries were derived from; `out` points to the
    /// context's output, of which this call writes the batch blocks `range` only.
    unsafe fn run_batches(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: Shared,
        range: std::ops::Range<usize>,
        buf: &mut Vec<f32>,
    ) {
        let (s, c) = (&self.scores, &self.context);
        let keys = s.n;
        let block = (BLOCK_BYTES / (4 * keys.max(1))).clamp(16, s.m.max(16));
        buf.resize(block * keys, 0.0);
        for flat in range {
            let (mut oq, mut ok, mut ov, mut oo) = (0isize, 0isize, 0isize, 0isize);
            let mut rest = flat;
            for (sb, cb) in s.batch.iter().zip(&c.batch).rev() {
                let ix = (rest % sb.0) as isize;
                rest /= sb.0;
                oq += ix * sb.1;
                ok += ix * sb.2;
                ov += ix * cb.2;
                oo += ix * cb.3;
            }
            let mut r0 = 0;
            while r0 < s.m {
                let rows = (s.m - r0).min(block);
                let scores = &mut buf[..rows * keys];
                // Safety: rows r0..r0+rows of this batch block exist in Q and in the output
                // (the geometries were derived from these shapes); the scores block is a
                // fresh row-major rows x keys buffer.
                unsafe {
                    gemm::gemm(
                        rows,
                        keys,
                        s.k,
                        scores.as_mut_ptr(),
                        1,
                        keys as isize,
                        false,
                        q.as_ptr().offset(oq + r0 as isize * s.a_rs),
                        s.a_cs,
                        s.a_rs,
                        k.as_ptr().offset(ok),
                        s.b_cs,
                        s.b_rs,
                        1.0,
                        f32::from_bits(self.scale_bits),
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                super::simd::softmax_rows_inplace(scores, keys);
                // Safety: as above; the output rows r0..r0+rows of this block are this
                // call's alone.
                unsafe {
                    gemm::gemm(
                        rows,
                        c.n,
                        keys,
                        out.0.offset(oo + r0 as isize * c.c_rs),
                        c.c_cs,
                        c.c_rs,
                        false,
                        scores.as_ptr(),
                        1,
                        keys as isize,
                        v.as_ptr().offset(ov),
                        c.b_cs,
                        c.b_rs,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                r0 += rows;
            }
        }
    }
}

impl Op for FusedAttention {
    fn name(&self) -> StaticName {
        "FusedAttention".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let (s, c) = (&self.scores, &self.context);
        Ok(vec![format!(
            "queries:{} keys:{} qk:{} v:{} batch:{:?} out:{:?}",
            s.m,
            s.n,
            s.k,
            c.n,
            s.batch.iter().map(|b| b.0).collect::<Vec<_>>(),
            c.out_shape
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for FusedAttention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let views: Vec<_> =
            inputs.iter().map(|t| t.to_plain_array_view::<f32>()).collect::<TractResult<_>>()?;
        let q = views[0].as_slice().context("FusedAttention: Q is not contiguous")?;
        let k = views[1].as_slice().context("FusedAttention: K is not contiguous")?;
        let v = views[2].as_slice().context("FusedAttention: V is not contiguous")?;
        let mut out = Tensor::zero::<f32>(&self.context.out_shape)?;
        {
            let mut view = out.to_plain_array_view_mut::<f32>()?;
            let o =
                view.as_slice_mut().context("FusedAttention: fresh output is not contiguous")?;
            let dst = Shared(o.as_mut_ptr());
            let batches: usize = self.scores.batch.iter().map(|b| b.0).product();
            let threads = super::pool_threads().min(batches);
            if threads <= 1 {
                // Safety: this call writes every batch block of `out`, exclusively borrowed.
                unsafe { self.run_batches(q, k, v, dst, 0..batches, &mut Vec::new()) };
            } else {
                let per = batches.div_ceil(threads);
                rayon::scope(|s| {
                    for t in 1..threads {
                        let range = (t * per).min(batches)..((t + 1) * per).min(batches);
                        s.spawn(move |_| {
                            let dst = dst;
                            // Safety: disjoint batch ranges write disjoint blocks of `out`.
                            unsafe { self.run_batches(q, k, v, dst, range, &mut Vec::new()) };
                        });
                    }
                    // Safety: as above.
                    unsafe { self.run_batches(q, k, v, dst, 0..per.min(batches), &mut Vec::new()) };
                });
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for FusedAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 3, "FusedAttention takes Q, K and V");
        for i in inputs {
            ensure!(i.datum_type == f32::datum_type(), "FusedAttention is f32 only");
        }
        Ok(tvec!(f32::fact(&*self.context.out_shape)))
    }

    as_op!();
}

/// Replaces each scores [`GemmMatMul`] (with its softmax, no bias, at least
/// [`FUSE_MIN_SCORE_BYTES`] of scores) whose output only feeds a context [`GemmMatMul`] as its
/// `A` with one [`FusedAttention`]. Run it after
/// [`substitute_gemm_matmuls`](super::substitute_gemm_matmuls). Returns the number fused.
pub fn fuse_attention(model: &mut TypedModel) -> TractResult<usize> {
    let mut fused = 0;
    let outputs = model.output_outlets()?.to_vec();
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(scores) = node.op_as::<GemmMatMul>() else { continue };
        if scores.post() != Post::Softmax || scores.has_bias() || node.inputs.len() != 2 {
            continue;
        }
        let out = OutletId::new(id, 0);
        let succ = &node.outputs[0].successors;
        if succ.len() != 1 || succ[0].slot != 0 || outputs.contains(&out) {
            continue;
        }
        let next = model.node(succ[0].node);
        let Some(context) = next.op_as::<GemmMatMul>() else { continue };
        if context.post() != Post::None || context.has_bias() || next.inputs.len() != 2 {
            continue;
        }
        let g = scores.geometry();
        let score_bytes = g.batch.iter().map(|b| b.0).product::<usize>() * g.m * g.n * 4;
        if score_bytes < FUSE_MIN_SCORE_BYTES {
            continue;
        }
        let Some(op) = FusedAttention::new(g, context.geometry(), scores.scale()) else {
            continue;
        };
        let (q, k, v) = (node.inputs[0], node.inputs[1], next.inputs[1]);
        let name = next.name.clone();
        let tail = OutletId::new(next.id, 0);
        let mut patch = TypedModelPatch::default();
        let taps =
            [patch.tap_model(model, q)?, patch.tap_model(model, k)?, patch.tap_model(model, v)?];
        let wire = patch.wire_node(format!("{name}.fused_attention"), op, &taps)?;
        patch.shunt_outside(model, tail, wire[0])?;
        patch.apply(model)?;
        fused += 1;
    }
    Ok(fused)
}
