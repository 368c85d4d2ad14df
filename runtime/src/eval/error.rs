//! The error type of the evaluation module.

use std::fmt;
use std::path::PathBuf;

/// Why an evaluation could not run. Every variant names what is at fault (file, JSON
/// field, image, pixel) so that a command-line tool can print it as is.
#[derive(Debug)]
#[non_exhaustive]
pub enum EvalError {
    /// A file could not be read.
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file is not valid JSON.
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error (with line and column).
        source: serde_json::Error,
    },
    /// A JSON value is missing or has the wrong type or an invalid value.
    Field {
        /// The file, or `None` for data that did not come from a file.
        path: Option<PathBuf>,
        /// The JSON path of the field, e.g. `annotations[3].bbox`.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A detection refers to an image that the ground truth does not have (pycocotools
    /// asserts "Results do not correspond to current coco set").
    UnknownImage {
        /// The detections file, or `None` for data that did not come from a file.
        path: Option<PathBuf>,
        /// Index of the detection in the results array.
        index: usize,
        /// Its `image_id`.
        image_id: i64,
    },
    /// A predicted map and a ground-truth map of one image have different pixel counts.
    LengthMismatch {
        /// Index of the image (0-based, in the order the images were added).
        image: usize,
        /// Pixels in the predicted cluster map.
        predicted: usize,
        /// Pixels in the ground-truth class map.
        ground_truth: usize,
    },
    /// A cluster id or class id outside the declared range.
    LabelOutOfRange {
        /// Index of the image (0-based).
        image: usize,
        /// Index of the pixel in the flattened map.
        pixel: usize,
        /// `"cluster"` or `"class"`.
        kind: &'static str,
        /// The label found.
        value: u32,
        /// The number of clusters or classes declared (valid labels are `0..count`).
        count: usize,
    },
    /// Invalid evaluation settings (e.g. zero clusters).
    Config(String),
}

impl fmt::Display for EvalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            Self::Json { path, source } => {
                write!(f, "{} is not valid JSON: {source}", path.display())
            }
            Self::Field { path, field, problem } => match path {
                Some(path) => write!(f, "{}: field `{field}`: {problem}", path.display()),
                None => write!(f, "field `{field}`: {problem}"),
            },
            Self::UnknownImage { path, index, image_id } => {
                let file = path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default();
                write!(
                    f,
                    "{file}detection [{index}] has image_id {image_id}, which is not an image of the \
                     ground truth (results must only cover ground-truth images)"
                )
            }
            Self::LengthMismatch { image, predicted, ground_truth } => write!(
                f,
                "image {image}: the cluster map has {predicted} pixels but the class map has \
                 {ground_truth}"
            ),
            Self::LabelOutOfRange { image, pixel, kind, value, count } => write!(
                f,
                "image {image}, pixel {pixel}: {kind} id {value} is out of range (expected 0..{count})"
            ),
            Self::Config(msg) => write!(f, "invalid evaluation settings: {msg}"),
        }
    }
}

impl std::error::Error for EvalError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            Self::Json { source, .. } => Some(source),
            _ => None,
        }
    }
}
