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
//! - [`contract`]: the ONNX input/output names, detection-map layout and normalization that
//!   the host tools and the onboard engine share.
//!
//! With the `onboard` feature (std, tract; never burn, never host tooling) — what the
//! `flsl-onboard` binary on the companion computer is made of:
//!
//! - `onnx`: `OnnxModel`, an optimized tract plan with a reused state, preallocated
//!   input and borrowed output views; per-op profiling; `ops`: our fused ops substituted into
//!   tract's plan (f32 `gemm` products, int8 QDQ products, LayerNorm, attention, patch embedding).
//! - `preprocess`: RGB8 frame -> normalized input tensor, without allocating.
//! - `detect`: `Detector`, the per-frame pipeline (preprocess -> model -> perception core),
//!   and the JSON-lines record of a frame.
//! - `onboard`: bundles (`onboard.toml` + checksums, verified before loading), frame sources
//!   (image folders, video through ffmpeg, raw RGB on standard input, V4L2 cameras with the
//!   `v4l2` feature), outputs (JSON lines, link wire frames to a serial device or UDP), and the
//!   real-time loop (stale frames dropped, clean stop on SIGINT/SIGTERM, stats lines).
//! - `error`: `ModelError`, the error type of all of the above.
//!
//! With the `tools` feature (host only; implies `onboard` and `eval`):
//!
//! - `export`: ONNX export of a no-class ViT backbone (+ FLSL head) from plain host
//!   tensors named by the reference state-dict keys; `export_det`: the detection head.
//! - `quantize`: int8 calibration and QDQ / QLinearMatMul rewriting with a report.
//! - `bench`: latency benchmarks (tract, and onnxruntime through python3) and
//!   `.npy` -> model -> `.npy` inference; `npy`: f32 `.npy` reading and writing.
//! - `onboard::bundle::write_bundle`: `flsl bundle`.
//!
//! With the `eval` feature (std, no tract):
//!
//! - `eval`: COCO bbox evaluation numerically identical to pycocotools' `COCOeval`, and the
//!   cluster-map mIoU with Hungarian matching for unsupervised segmentation.
//!
//! # Features
//!
//! - `std`: std-only parts; without it the crate is `#![no_std]`.
//! - `onboard`: the onboard engine and the `flsl-onboard` binary (implies `std`).
//! - `v4l2`: V4L2 camera frames for `flsl-onboard` (implies `onboard`).
//! - `tools` (default): host tooling (implies `onboard` and `eval`).
//! - `eval`: offline evaluation metrics (implies `std`).
//! - `defmt`: `defmt::Format` for the core's error types (firmware logging only).
//!
//! Invariant: the onboard build (`--no-default-features --features onboard`) never compiles a
//! host-tooling module; `.ci/run` checks its dependency tree for burn, plotters and python.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod contract;
pub mod perception;
pub mod rng;
pub mod wire;

/// Offline evaluation: COCO bbox metrics (pycocotools-exact) and cluster-map mIoU.
#[cfg(feature = "eval")]
pub mod eval;

#[cfg(feature = "onboard")]
pub mod detect;
#[cfg(feature = "onboard")]
pub mod error;
#[cfg(feature = "std")]
pub mod fsio;
#[cfg(feature = "onboard")]
pub mod onboard;
#[cfg(feature = "onboard")]
pub mod onnx;
#[cfg(feature = "onboard")]
pub mod ops;
#[cfg(feature = "onboard")]
pub mod preprocess;

#[cfg(feature = "tools")]
pub mod bench;
#[cfg(feature = "tools")]
pub mod export;
#[cfg(feature = "tools")]
pub mod export_det;
#[cfg(feature = "tools")]
pub mod npy;
#[cfg(feature = "tools")]
pub mod quantize;

#[cfg(feature = "onboard")]
pub use error::ModelError;
