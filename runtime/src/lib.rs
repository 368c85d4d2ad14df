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
//!
//! With the `onnx` feature (std, tract; never burn):
//!
//! - `export`: ONNX export of a no-class ViT backbone (+ FLSL head) from plain host
//!   tensors named by the reference state-dict keys.
//! - `onnx`: `OnnxModel`, an optimized tract plan with a reused state, preallocated
//!   input and borrowed output views; per-op profiling.
//! - `preprocess`: RGB8 frame -> normalized input tensor, without allocating.
//! - `bench`: latency benchmarks (tract, and onnxruntime through python3) and
//!   `.npy` -> model -> `.npy` inference.
//! - `npy`: minimal f32 `.npy` reading and writing.
//! - `error`: `ModelError`, the error type of all of the above.
//!
//! # Features
//!
//! - `std` (default): std-only parts; without it the crate is `#![no_std]`.
//! - `onnx` (default): model export and execution with tract (implies `std`).
//! - `defmt`: `defmt::Format` for the core's error types (firmware logging only).
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]
#![deny(rustdoc::broken_intra_doc_links)]

pub mod wire;

#[cfg(feature = "onnx")]
pub mod bench;
#[cfg(feature = "onnx")]
pub mod error;
#[cfg(feature = "onnx")]
pub mod export;
#[cfg(feature = "onnx")]
pub mod npy;
#[cfg(feature = "onnx")]
pub mod onnx;
#[cfg(feature = "onnx")]
pub mod preprocess;

#[cfg(feature = "onnx")]
pub use error::ModelError;
