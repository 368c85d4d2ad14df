//! Custom tract ops and model patches that flsl-runtime substitutes into a loaded model.
//!
//! The ONNX file stays standard: these patches are applied to tract's typed model after
//! loading, so onnxruntime and TensorRT read the same file unchanged.

use tract_onnx::prelude::*;

pub mod attention;
pub mod canon;
pub mod f32_packed;
pub mod gemm_matmul;
pub mod int8_matmul;
pub mod isa;
pub mod layer_norm;
pub mod patch_embed;
pub mod qdq;
pub mod simd;

pub use attention::{FusedAttention, fuse_attention};
pub use canon::{fuse_decomposed_layer_norm, fuse_erf_gelu, split_fused_qkv};
pub use gemm_matmul::{GemmMatMul, substitute_gemm_matmuls};
pub use int8_matmul::{Int8Layer, Int8MatMul};
pub use layer_norm::FusedLayerNorm;
pub use patch_embed::{PatchEmbed, substitute_patch_embeddings};
pub use qdq::{QdqLayer, bypass_fake_quant_pairs, lower_qdq_matmuls, substitute_int8_matmuls};

/// Threads of the rayon pool the caller runs in: `OnnxModel` runs each frame inside its
/// executor's pool when `threads > 1`, so our ops split their work over exactly those
/// threads; 1 on a plain thread (`threads = 1`).
pub(crate) fn pool_threads() -> usize {
    if rayon::current_thread_index().is_some() { rayon::current_num_threads() } else { 1 }
}

/// Runs `job` over the rows `0..m`: on the calling thread when `threads <= 1`, else split
/// among `threads` threads of the current rayon pool in parts of whole tiles of `tile` rows,
/// each the nearest whole number of tiles to an even share (not rounded up: 196 rows on 2
/// threads were 108 + 88, 1.8x at best; now 96 + 100), the last thread taking the rest and
/// the calling thread the first part.
pub(crate) fn split_rows(
    m: usize,
    tile: usize,
    threads: usize,
    job: impl Fn(std::ops::Range<usize>) + Sync,
) {
    if threads <= 1 {
        job(0..m);
        return;
    }
    let per = ((m as f64 / threads as f64 / tile as f64).round() as usize).max(1) * tile;
    let job = &job;
    rayon::scope(|s| {
        for t in 1..threads {
            let r0 = (t * per).min(m);
            let r1 = if t + 1 == threads { m } else { ((t + 1) * per).min(m) };
            if r0 < r1 {
                s.spawn(move |_| job(r0..r1));
            }
        }
        job(0..per.min(m));
    });
}

/// What the load-time rewrites made of a model, counted on its typed graph just before
/// tract's own optimisation: which of our fused ops it runs, and which compute nodes stayed
/// on tract's generic path (so that a user sees why a file is slow).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FusionReport {
    /// Int8 linear layers of the file, QDQ or onnxruntime-dynamic ([`lower_qdq_matmuls`]).
    pub qdq_layers: usize,
    /// Other activation quantize/dequantize pairs run in float ([`bypass_fake_quant_pairs`]).
    pub fake_quant_bypassed: usize,
    /// Erf-GELU chains in a foreign order rewritten to the exact GELU ([`fuse_erf_gelu`]).
    pub gelu_rewritten: usize,
    /// LayerNorms written out op by op, rewritten to one ([`fuse_decomposed_layer_norm`]).
    pub layer_norms_rewritten: usize,
    /// Fused q/k/v products split in three ([`split_fused_qkv`]).
    pub qkv_split: usize,
    /// f32 products on [`GemmMatMul`].
    pub products: usize,
    /// Of those, products whose constant weights were packed at load ([`f32_packed`]).
    pub products_packed: usize,
    /// Integer products ([`Int8MatMul`]).
    pub int8_products: usize,
    /// Products (f32 or int8) with the GELU fused after them.
    pub gelu_fused: usize,
    /// Products with the softmax fused after them (attention scores).
    pub softmax_fused: usize,
    /// Products with a scale folded in (the attention scale of foreign exports).
    pub scales_folded: usize,
    /// Per-column scales (DINOv2's layer scale) folded into a product's constant weights.
    pub columns_scaled: usize,
    /// Score/context pairs run as one [`FusedAttention`].
    pub attention_fused: usize,
    /// LayerNorms run as [`FusedLayerNorm`].
    pub layer_norms: usize,
    /// Patch embeddings run as [`PatchEmbed`].
    pub patch_embeddings: usize,
    /// The (first) patch embedding's patch size, height x width.
    pub patch: Option<(usize, usize)>,
    /// Compute nodes left on tract's generic path, by op name, most first: products,
    /// softmaxes, element-wise and reduction ops that no rewrite took (residual `Add`s and
    /// shape plumbing are not counted).
    pub generic: Vec<(String, usize)>,
}

impl FusionReport {
    /// Counts the ops of `model` (decluttered, substituted, not yet optimised) into `pre`,
    /// which holds the counts of the rewrites made before (on the file, at declutter).
    pub(crate) fn of(model: &TypedModel, pre: Self) -> TractResult<Self> {
        let mut r = pre;
        let mut generic = std::collections::BTreeMap::<String, usize>::new();
        for id in model.eval_order()? {
            let node = model.node(id);
            if let Some(g) = node.op_as::<GemmMatMul>() {
                r.products += 1;
                r.products_packed += usize::from(g.is_packed());
                r.gelu_fused += usize::from(g.post() == gemm_matmul::Post::Gelu);
                r.softmax_fused += usize::from(matches!(
                    g.post(),
                    gemm_matmul::Post::Softmax | gemm_matmul::Post::SoftmaxNanToZero
                ));
                r.scales_folded += usize::from(g.scale() != 1.0);
            } else if let Some(q) = node.op_as::<Int8MatMul>() {
                r.int8_products += 1;
                r.gelu_fused += usize::from(q.has_gelu());
            } else if node.op_is::<FusedAttention>() {
                r.attention_fused += 1;
                r.softmax_fused += 1;
            } else if node.op_is::<FusedLayerNorm>() {
                r.layer_norms += 1;
            } else if let Some(p) = node.op_as::<PatchEmbed>() {
                r.patch_embeddings += 1;
                r.patch.get_or_insert(p.kernel());
            } else {
                let name = node.op().name().to_string();
                if !PLUMBING.contains(&name.as_str()) {
                    *generic.entry(name).or_default() += 1;
                }
            }
        }
        r.generic = generic.into_iter().collect();
        r.generic.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Ok(r)
    }

    /// Nodes left on tract's generic path, all kinds together.
    pub fn generic_nodes(&self) -> usize {
        self.generic.iter().map(|g| g.1).sum()
    }
}

/// Ops that move or re-label data, or add the residual: no rewrite is missing when they stay.
const PLUMBING: &[&str] = &[
    "Source",
    "Const",
    "AxisOp",
    "Reshape",
    "AddAxis",
    "RmAxis",
    "Add",
    "Slice",
    "TypedConcat",
    "Concat",
    "Gather",
    "MultiBroadcastTo",
];

impl std::fmt::Display for FusionReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} f32 + {} int8 products (GELU fused into {}, softmax into {}, scale folded into {}), {} LayerNorms, {} patch embeddings, {} fused attentions",
            self.products,
            self.int8_products,
            self.gelu_fused,
            self.softmax_fused,
            self.scales_folded,
            self.layer_norms,
            self.patch_embeddings,
            self.attention_fused
        )?;
        if self.products_packed > 0 {
            write!(f, "; {} f32 products with weights packed at load", self.products_packed)?;
        }
        if self.gelu_rewritten > 0 {
            write!(f, "; {} foreign GELU chains rewritten", self.gelu_rewritten)?;
        }
        if self.qkv_split > 0 {
            write!(f, "; {} fused q/k/v products split", self.qkv_split)?;
        }
        if self.columns_scaled > 0 {
            write!(f, "; {} layer scales folded into the weights", self.columns_scaled)?;
        }
        if self.layer_norms_rewritten > 0 {
            write!(f, "; {} decomposed LayerNorms rewritten", self.layer_norms_rewritten)?;
        }
        if self.qdq_layers > 0 {
            write!(f, "; {} int8 layers in the file", self.qdq_layers)?;
        }
        if self.fake_quant_bypassed > 0 {
            write!(
                f,
                " ({} other quantize/dequantize pairs run in float)",
                self.fake_quant_bypassed
            )?;
        }
        if self.generic.is_empty() {
            write!(f, "; no compute node left on tract's generic path")
        } else {
            let list: Vec<String> = self.generic.iter().map(|(n, c)| format!("{c} {n}")).collect();
            write!(f, "; left on tract's generic path: {}", list.join(", "))
        }
    }
}
