//! Custom tract ops and model patches that flsl-runtime substitutes into a loaded model.
//!
//! The ONNX file stays standard: these patches are applied to tract's typed model after
//! loading, so onnxruntime and TensorRT read the same file unchanged.

pub mod attention;
pub mod gemm_matmul;
pub mod int8_matmul;
pub mod layer_norm;
pub mod patch_embed;
pub mod qdq;
pub mod simd;

pub use attention::{FusedAttention, fuse_attention};
pub use gemm_matmul::{GemmMatMul, substitute_gemm_matmuls};
pub use int8_matmul::{Int8Layer, Int8MatMul};
pub use layer_norm::FusedLayerNorm;
pub use patch_embed::{PatchEmbed, substitute_patch_embeddings};
pub use qdq::{QdqLayer, lower_qdq_matmuls, substitute_int8_matmuls};

/// Threads of the rayon pool the caller runs in: `OnnxModel` runs each frame inside its
/// executor's pool when `threads > 1`, so our ops split their work over exactly those
/// threads; 1 on a plain thread (`threads = 1`).
pub(crate) fn pool_threads() -> usize {
    if rayon::current_thread_index().is_some() { rayon::current_num_threads() } else { 1 }
}
