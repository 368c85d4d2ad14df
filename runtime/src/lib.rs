//! flsl onboard runtime.
//!
//! The core of this crate is `no_std` and never allocates: it works on caller-provided
//! slices and fixed-capacity containers, returns counts or capacity errors, and never
//! panics on any input.
//! The companion computer (std) and the microcontroller firmware (`flsl-firmware`, no_std)
//! both compile it, so everything they exchange is defined here exactly once.
//!
//! # Modules
//!
//! - [`wire`]: the versioned link wire format between the companion computer and the
//!   firmware (messages, COBS framing, CRC-32, and a resynchronizing
//!   [`Accumulator`](wire::Accumulator)).
//! - [`perception`]: per-frame post-processing of the model outputs: patch clustering
//!   (prototype argmax, k-means), mean-shift refinement, segments, CenterNet-style detection
//!   decoding, class-aware NMS, a fixed-capacity tracker, and [`Perception`](perception::Perception)
//!   bundling them over caller scratch.
//!
//! With the `onnx` feature (std, tract; never burn):
//!
//! - `export`: ONNX export of a no-class ViT backbone (+ FLSL head) from plain host
//!   tensors named by the reference state-dict keys.
//! - `detect`: `flsl detect`'s loop: frames (folder or ffmpeg video) -> tract -> perception
//!   core -> JSON lines, overlays and per-stage timings.
//! - `export_det`: appends the CenterNet-style detection head (`det_heatmap`, `det_boxes`)
//!   to an exported backbone graph.
//! - `onnx`: `OnnxModel`, an optimized tract plan with a reused state, preallocated
//!   input and borrowed output views; per-op profiling.
//! - `preprocess`: RGB8 frame -> normalized input tensor, without allocating.
//! - `bench`: latency benchmarks (tract, and onnxruntime through python3) and
//!   `.npy` -> model -> `.npy` inference.
//! - `npy`: minimal f32 `.npy` reading and writing.
//! - `error`: `ModelError`, the error type of all of the above.
//!
//! With the `eval` feature (std, no tract):
//!
//! - `eval`: COCO bbox evaluation numerically identical to pycocotools' `COCOeval`, and the
//!   cluster-map mIoU with Hungarian matching for unsupervised segmentation.
//!
//! # Features
//!
//! - `std` (default): std-only parts; without it the crate is `#![no_std]`.
//! - `onnx` (default): model export and execution with tract (implies `std`).
//! - `eval` (default): offline evaluation metrics (implies `std`).
//! - `defmt`: `defmt::Format` for the core's error types (firmware logging only).
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod perception;
pub mod wire;

/// Offline evaluation: COCO bbox metrics (pycocotools-exact) and cluster-map mIoU.
#[cfg(feature = "eval")]
pub mod eval;
#[cfg(feature = "onnx")]
pub mod bench;
#[cfg(feature = "onnx")]
pub mod error;
#[cfg(feature = "onnx")]
pub mod export;
#[cfg(feature = "onnx")]
pub mod detect;
#[cfg(feature = "onnx")]
pub mod export_det;
#[cfg(feature = "onnx")]
pub mod npy;
#[cfg(feature = "onnx")]
pub mod onnx;
#[cfg(feature = "onnx")]
pub mod ops;
#[cfg(feature = "onnx")]
pub mod preprocess;
#[cfg(feature = "onnx")]
pub mod quantize;

#[cfg(feature = "onnx")]
pub use error::ModelError;
