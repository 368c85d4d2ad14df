//! The error type of the model-execution side (features `onboard` and `tools`).
//!
//! tract reports errors as `TractError` (an `anyhow::Error`); each variant keeps it as its
//! `#[source]` and says what was being done, with which file and which shape.

use std::path::PathBuf;

use tract_onnx::prelude::TractError;

/// Errors of [`OnnxModel`](crate::onnx::OnnxModel), the onboard engine, and (feature `tools`)
/// `npy` and `bench`.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// tract could not read or parse the ONNX file.
    #[error("loading ONNX model {model}")]
    Load {
        /// The file (or `<memory>` for bytes).
        model: String,
        /// tract's error.
        #[source]
        source: TractError,
    },
    /// tract could not type-check or optimize the graph for this input shape.
    #[error("optimizing ONNX model {model} for input shape {shape:?}")]
    Optimize {
        /// The file (or `<memory>`).
        model: String,
        /// The fixed input shape `[1, 3, H, W]`.
        shape: [usize; 4],
        /// tract's error.
        #[source]
        source: TractError,
    },
    /// tract could not build the execution plan or its state.
    #[error("building the execution plan of {model}")]
    Plan {
        /// The file (or `<memory>`).
        model: String,
        /// tract's error.
        #[source]
        source: TractError,
    },
    /// A run failed inside tract.
    #[error("running {model} on an input of shape {shape:?}")]
    Run {
        /// The file (or `<memory>`).
        model: String,
        /// The input shape.
        shape: [usize; 4],
        /// tract's error.
        #[source]
        source: TractError,
    },
    /// The model is not an image model this runtime can drive.
    #[error("model {model} is not supported: {reason}")]
    Unsupported {
        /// The file (or `<memory>`).
        model: String,
        /// What does not fit (input rank, dtype, dynamic dimensions, ...).
        reason: String,
    },
    /// Caller-provided data does not fit the model.
    #[error("{what}: expected {expected}, got {got}")]
    Mismatch {
        /// What was checked, for example `RGB8 frame buffer length`.
        what: &'static str,
        /// Expected value.
        expected: String,
        /// Value found.
        got: String,
    },
    /// File I/O failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done: `reading`, `writing`, ...
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A `.npy` file is malformed or of an unsupported dtype/order.
    #[error("npy file {path}: {reason}")]
    Npy {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Running a helper process (python3 with onnxruntime) failed.
    #[error("{action}")]
    Helper {
        /// What was being done.
        action: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// Content that does not meet its format or range: a header, a configuration field, a link
/// target. `reason` names the field (or the part of the header) and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Invalid {
    /// What is wrong, naming the field.
    pub reason: String,
}

impl From<String> for Invalid {
    fn from(reason: String) -> Self {
        Self { reason }
    }
}

impl From<&str> for Invalid {
    fn from(reason: &str) -> Self {
        Self { reason: reason.to_string() }
    }
}
