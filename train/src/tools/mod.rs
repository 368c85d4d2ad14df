//! Tools around the training path (the training path imports only [`plot`], for the run's
//! `loss.png`):
//!
//! - [`export`]: checkpoints -> ONNX (through `flsl_runtime::export`, no burn involved).
//! - [`demo`]: `flsl demo`; [`cluster`]: cluster maps and their scores; [`plot`]: loss plots.
//! - [`clusters_eval`]: `flsl eval-clusters` (DAVIS masks, mIoU).
//! - [`reference`]: the golden-vector checker behind `flsl reference-check`.
//! - [`gpu_check`]: the same steps on the CPU and on CUDA, compared.

pub mod cluster;
pub mod clusters_eval;
pub mod demo;
pub mod export;
pub mod gpu_check;
pub mod plot;
pub mod reference;
