//! # flsl-train
//!
//! FLSL (Feature-Level Self-supervised Learning, Su et al., NeurIPS 2023) in burn.
//!
//! - [`model`]: the no-class ViT backbone, the FLSL head, reference-named parameters.
//! - [`meanshift`]: the mean-shift operator (intra- and inter-view).
//! - [`loss`]: the FLSL loss with every term.
//! - [`masks`]: token sampling masks.
//! - [`schedule`]: cosine and temperature schedules.
//! - [`step`]: one training iteration (AdamW, per-parameter clipping, EMA teacher).
//! - [`tensors`], [`pth`], [`checkpoint`]: host tensors, safetensors, PyTorch `.pth` import.
//! - [`reference`]: the golden-vector checker behind `flsl reference-check`.
//! - [`augment`], [`data`], [`config`], [`trainer`], [`plot`]: the pretraining pipeline.
//! - [`export`]: checkpoints -> ONNX (through `flsl_runtime::export`, no burn involved).
//! - [`annotations`], [`detector`]: COCO/VOC/VisDrone boxes and the CenterNet-style head
//!   trained on a frozen backbone (`flsl train-detector`).
//! - [`multistage`]: the previous-stage model of multi-stage training.
//! - [`distill`]: a frozen teacher of another size for `flsl distill` (grid alignment, targets).
//! - [`parallel`]: data-parallel replicas (burn-collective all-reduce of gradients).
//! - [`backend`]: the one module that names concrete backends.
#![warn(missing_docs)]

pub mod annotations;
pub mod augment;
pub mod backend;
pub mod checkpoint;
pub mod cluster;
pub mod clusters_eval;
pub mod config;
pub mod data;
pub mod demo;
pub mod detector;
pub mod distill;
pub mod error;
pub mod export;
pub mod gpu_check;
pub mod loss;
pub mod masks;
pub mod meanshift;
pub mod model;
pub mod multistage;
pub mod parallel;
pub mod plot;
pub mod progress;
pub mod pth;
pub mod reference;
pub mod schedule;
pub mod step;
pub mod tensors;
pub mod trainer;

pub use error::{Error, Result};
