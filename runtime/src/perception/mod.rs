//! Onboard perception: the per-frame post-processing that turns backbone and detector outputs
//! into segments, detections and tracks (issue 6).
//!
//! Everything here is `no_std`, never allocates and never panics on any input (NaN and
//! infinite values included): functions read `&[f32]` in the ONNX layouts, write into
//! caller-provided slices or fixed-capacity containers, check every slice length against the
//! declared shape ([`PerceptionError::Shape`]), and report capacity overflow with a
//! [`Count`] instead of truncating silently.
//!
//! # Stages
//!
//! 1. [`cluster`]: patch labels, from the FLSL head's `prototype_logits` `[N, K]`
//!    ([`cluster::argmax_labels`]), from cosine similarity to feature-space prototypes
//!    ([`cluster::prototype_labels`]), or by k-means for backbones without a head
//!    ([`cluster::kmeans_labels`]).
//! 2. [`meanshift`]: the paper's non-parametric mean-shift step on the patch features,
//!    iterated a few times ([`meanshift::refine`]).
//! 3. [`segments`]: 4-connected components of the label grid with boxes, areas and mean
//!    features ([`segments::segments`]).
//! 4. [`decode`]: peaks and boxes of a CenterNet-style detection head ([`decode::decode`]).
//! 5. [`nms`]: class-aware non-maximum suppression, in place ([`nms::nms`]).
//! 6. [`track`]: a fixed-capacity IoU (+ feature cosine) tracker ([`track::Tracker`]) whose
//!    tracks become [`wire::Object`](crate::wire::Object)s.
//! 7. [`pipeline`]: [`Perception`], all of the above behind one
//!    [`process_frame`](Perception::process_frame) over one pair of scratch buffers.
//!
//! # Conventions
//!
//! - Patch grids are `gh x gw`, row-major: patch `index = y * gw + x`.
//! - Feature maps are `[N, D]` row-major (`N = gh * gw` rows of `D` values); detection maps are
//!   channel-major planes `[C, hs, ws]` (ONNX NCHW with the batch of 1 dropped).
//! - Boxes are `[x0, y0, x1, y1]` in pixels of the model input (x right, y down), `x0 <= x1`,
//!   `y0 <= y1`, the top-left corner inclusive and the bottom-right exclusive for cell boxes.
//!   [`BoxMap`] maps them to frame pixels or to the wire's normalized coordinates.
//! - Labels are `u32`; [`NO_LABEL`] marks a patch with no usable scores or features.

// The core must never panic: no slice indexing, unwrap or explicit panics in this module.
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::unreachable,
    clippy::todo,
    clippy::unimplemented
)]

use core::fmt;

pub mod cluster;
pub mod decode;
pub mod meanshift;
pub mod nms;
pub mod pipeline;
pub mod segments;
pub mod track;

mod math;

pub use cluster::NO_LABEL;
pub use decode::Detection;
pub use pipeline::{
    FrameInput, FrameReport, LabelSource, Perception, PerceptionConfig, PerceptionDims,
    ScratchSizes,
};
pub use segments::Segment;
pub use track::{Track, TrackUpdate, Tracker, TrackerConfig};

/// An error of the perception core: bad shapes or parameters, or too little scratch space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PerceptionError {
    /// A slice does not have the length its declared shape needs.
    Shape {
        /// The slice (for example `"features"`, `"heatmap"`, `"scratch.logits"`).
        what: &'static str,
        /// The length the shape needs (at least this many for scratch buffers).
        expected: usize,
        /// The length given.
        got: usize,
    },
    /// A dimension or parameter is out of range (zero sizes, products overflowing `usize`,
    /// non-finite or negative thresholds, ...).
    Param {
        /// The parameter (for example `"d"`, `"temperature"`, `"iou_threshold"`).
        what: &'static str,
    },
}

impl fmt::Display for PerceptionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shape { what, expected, got } => {
                write!(f, "{what}: length {got}, the shape needs {expected}")
            }
            Self::Param { what } => write!(f, "{what}: value out of range"),
        }
    }
}

impl core::error::Error for PerceptionError {}

/// Result of a stage that fills a fixed-capacity output: how many items it wrote and how
/// many it found. `found > written` means the output was too small and the rest were
/// dropped (the kept ones are the best by the stage's order, see each stage).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Count {
    /// Items written to the output.
    pub written: usize,
    /// Items found (`>= written`).
    pub found: usize,
}

impl Count {
    /// Whether items were dropped for lack of capacity.
    pub const fn overflowed(&self) -> bool {
        self.found > self.written
    }
}

/// An affine map of boxes, per axis: `x' = x * scale_x + off_x`, `y' = y * scale_y + off_y`.
///
/// Detections and tracks live in model-input pixels; use this to go to frame pixels (undo
/// the preprocessing resize) or to the wire's normalized `[0, 1]` coordinates.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BoxMap {
    /// Horizontal scale.
    pub scale_x: f32,
    /// Vertical scale.
    pub scale_y: f32,
    /// Horizontal offset (after scaling).
    pub off_x: f32,
    /// Vertical offset (after scaling).
    pub off_y: f32,
}

impl Default for BoxMap {
    /// The identity.
    fn default() -> Self {
        Self::IDENTITY
    }
}

impl BoxMap {
    /// The identity map.
    pub const IDENTITY: Self = Self::new(1.0, 1.0, 0.0, 0.0);

    /// A map from its parts.
    pub const fn new(scale_x: f32, scale_y: f32, off_x: f32, off_y: f32) -> Self {
        Self { scale_x, scale_y, off_x, off_y }
    }

    /// Model-input pixels (`in_w x in_h`) to frame pixels (`frame_w x frame_h`) for the
    /// runtime's preprocessing policy: the whole frame resized to the input, no crop, so
    /// each axis scales on its own (see `preprocess`). A zero input size gives the identity.
    pub fn stretch(in_w: u32, in_h: u32, frame_w: u32, frame_h: u32) -> Self {
        if in_w == 0 || in_h == 0 {
            return Self::IDENTITY;
        }
        Self::new(frame_w as f32 / in_w as f32, frame_h as f32 / in_h as f32, 0.0, 0.0)
    }

    /// Model-input pixels (`in_w x in_h`) to the wire's normalized coordinates
    /// (`(0, 0)` top-left, `(1, 1)` bottom-right), for the same no-crop policy. A zero input
    /// size gives the identity.
    pub fn normalized(in_w: u32, in_h: u32) -> Self {
        Self::stretch(in_w, in_h, 1, 1)
    }

    /// Maps a box `[x0, y0, x1, y1]`.
    pub fn apply(&self, b: [f32; 4]) -> [f32; 4] {
        let [x0, y0, x1, y1] = b;
        [
            x0 * self.scale_x + self.off_x,
            y0 * self.scale_y + self.off_y,
            x1 * self.scale_x + self.off_x,
            y1 * self.scale_y + self.off_y,
        ]
    }
}

/// Checks `got == expected`.
pub(crate) fn check_len(
    what: &'static str,
    got: usize,
    expected: usize,
) -> Result<(), PerceptionError> {
    if got == expected { Ok(()) } else { Err(PerceptionError::Shape { what, expected, got }) }
}

/// Checks `got >= expected` (scratch buffers may be longer than needed).
pub(crate) fn check_min(
    what: &'static str,
    got: usize,
    expected: usize,
) -> Result<(), PerceptionError> {
    if got >= expected { Ok(()) } else { Err(PerceptionError::Shape { what, expected, got }) }
}

/// `a * b`, or a [`PerceptionError::Param`] naming `what` on overflow.
pub(crate) fn mul(what: &'static str, a: usize, b: usize) -> Result<usize, PerceptionError> {
    a.checked_mul(b).ok_or(PerceptionError::Param { what })
}

/// A non-zero dimension, or a [`PerceptionError::Param`] naming `what`.
pub(crate) fn nonzero(what: &'static str, v: usize) -> Result<usize, PerceptionError> {
    if v == 0 { Err(PerceptionError::Param { what }) } else { Ok(v) }
}

/// Intersection over union of two boxes `[x0, y0, x1, y1]`; inverted or empty boxes have
/// area 0, and the IoU of two empty boxes is 0. Symmetric in its arguments. A NaN or
/// infinite extent counts as empty (`f32::max` ignores NaN), so the result is in `[0, 1]`
/// up to rounding and never NaN.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}
