//! # flsl-train
//!
//! FLSL (Feature-Level Self-supervised Learning, Su et al., NeurIPS 2023) in burn. Folders
//! follow the method and the pipeline:
//!
//! - [`model`]: the no-class ViT backbone, the FLSL head, reference-named parameters.
//! - [`method`]: mean shift, the loss, masks, schedules.
//! - [`pretrain`]: configuration, augmentation and data, the step, the trainer, data-parallel
//!   replicas, multi-stage training.
//! - [`distill`]: a frozen teacher of another size for `flsl distill`.
//! - [`io`]: host tensors, safetensors, PyTorch `.pth` import, checkpoints.
//! - [`detector`]: COCO/VOC/VisDrone boxes and the CenterNet-style head trained on a frozen
//!   backbone (`flsl train-detector`).
//! - [`tools`]: export to ONNX, the demo, cluster maps, plots, the golden checker, the GPU check.
//! - [`backend`]: the one module that names concrete backends; [`progress`]: the progress
//!   callback the library reports through.
//!
//! Each module is also re-exported at the crate root under its own name
//! (`flsl_train::trainer`, `flsl_train::loss`, ...), the paths the CLI and the tests use.
#![warn(missing_docs)]

pub mod backend;
pub mod detector;
pub mod distill;
pub mod error;
pub mod io;
pub mod method;
pub mod model;
pub mod pretrain;
pub mod progress;
pub mod tools;

pub use detector::annotations;
pub use io::{checkpoint, pth, tensors};
pub use method::{loss, masks, meanshift, schedule};
pub use pretrain::{augment, config, data, multistage, parallel, step, trainer};
pub use tools::{cluster, clusters_eval, demo, export, gpu_check, plot, reference};

pub use error::{Error, Result};
