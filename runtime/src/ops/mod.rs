//! Custom tract ops and model patches that flsl-runtime substitutes into a loaded model.
//!
//! The ONNX file stays standard: these patches are applied to tract's typed model after
//! loading, so onnxruntime and TensorRT read the same file unchanged.

pub mod gemm_matmul;

pub use gemm_matmul::{GemmMatMul, substitute_gemm_matmuls};
