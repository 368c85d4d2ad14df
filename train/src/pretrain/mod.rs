//! The pretraining pipeline, in the order a step runs it.
//!
//! - [`config`]: the run's configuration (the reference's arguments, presets, TOML).
//! - [`augment`], [`data`]: multi-crop augmentation and the threaded, order-stable loader
//!   (with the collation of a batch into views).
//! - [`step`]: one iteration (forward, loss, AdamW with per-parameter clipping, EMA).
//! - [`trainer`]: epochs, logs, checkpoints, exact resume.
//! - [`parallel`]: data-parallel replicas (burn-collective all-reduce).
//! - [`multistage`]: the previous-stage model of multi-stage training.

pub mod augment;
pub mod config;
pub mod data;
pub mod multistage;
pub mod parallel;
pub mod step;
pub mod trainer;
