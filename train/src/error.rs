//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong in flsl-train, with the context a user needs to act on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing a file failed.
    #[error("{what} `{path}`: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is not what it should be.
    #[error("malformed {format} file `{path}`: {reason}")]
    Malformed {
        /// The file format (safetensors, pth, json, ...).
        format: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A tensor the model needs is absent from a checkpoint.
    #[error("tensor `{name}` is missing from `{path}`")]
    MissingTensor {
        /// Reference parameter name.
        name: String,
        /// The checkpoint.
        path: PathBuf,
    },
    /// A checkpoint tensor has the wrong shape.
    #[error("tensor `{name}` in `{path}` has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        /// Reference parameter name.
        name: String,
        /// The checkpoint.
        path: PathBuf,
        /// The model's shape.
        expected: Vec<usize>,
        /// The file's shape.
        found: Vec<usize>,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration `{key}`: {reason}")]
    Config {
        /// The configuration key.
        key: String,
        /// Why it is invalid.
        reason: String,
    },
    /// Tensor shapes given to an operator do not fit together.
    #[error("{op}: {reason}")]
    Shape {
        /// The operator.
        op: &'static str,
        /// What does not fit.
        reason: String,
    },
    /// A device list that does not parse, names a backend this build does not have, or is
    /// empty.
    #[error("device `{device}`: {reason}")]
    Device {
        /// The device as given (`cpu`, `cuda:1`).
        device: String,
        /// What is wrong, with the rebuild hint.
        reason: String,
    },
    /// Training produced a non-finite loss.
    #[error("non-finite loss at step {step}: {terms}")]
    NonFinite {
        /// Global iteration.
        step: usize,
        /// All loss terms, formatted.
        terms: String,
    },
    /// An operation of flsl-runtime (ONNX model, export, evaluation, clustering) failed; its
    /// error is kept as the source.
    #[error("{what}: {source}")]
    Runtime {
        /// What was being done.
        what: String,
        /// flsl-runtime's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// A data-parallel collective operation failed (burn-collective).
    #[error("data-parallel {op} on replica {peer}: {reason}")]
    Collective {
        /// The operation (`register`, `all-reduce`, ...).
        op: &'static str,
        /// The replica's rank.
        peer: u32,
        /// burn-collective's error.
        reason: String,
    },
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { what, path: path.into(), source }
    }

    /// An flsl-runtime error `source` met while doing `what`.
    pub fn runtime(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self::Runtime { what: what.into(), source: Box::new(source) }
    }

    pub(crate) fn malformed(
        format: &'static str,
        path: impl Into<PathBuf>,
        reason: impl Into<String>,
    ) -> Self {
        Self::Malformed { format, path: path.into(), reason: reason.into() }
    }
}
