//! The contract between the host tools (exporter, quantizer, `flsl bundle`) and the onboard
//! engine, defined once and compiled by every build of this crate, `no_std` included: the ONNX
//! input and output names, the detection maps' layout, and the input normalization.
//!
//! - Input [`INPUT_NAME`]: f32 `[1, 3, H, W]`, RGB, each value `(v / 255 - mean[c]) / std[c]`
//!   with [`IMAGENET_MEAN`] / [`IMAGENET_STD`] (the statistics every FLSL backbone trains with).
//! - Output [`FEATURES_NAME`]: `[1, N, D]`, one row per patch, row-major over the patch grid.
//! - Output [`LOGITS_NAME`] (optional): `[1, N, K]` prototype logits of the FLSL head.
//! - Outputs [`HEATMAP_NAME`] `[1, C, h, w]` (after sigmoid) and [`BOXES_NAME`] `[1, 4, h, w]`
//!   (`dx, dy` offset in the cell, `w, h` size in cells), both optional and together: the
//!   CenterNet-style detection maps decoded by [`perception::decode`](crate::perception::decode).

/// Name of the graph input, f32 `[1, 3, H, W]`.
pub const INPUT_NAME: &str = "image";
/// Name of the backbone output, `[1, N, D]`.
pub const FEATURES_NAME: &str = "features";
/// Name of the FLSL head output, `[1, N, K]`.
pub const LOGITS_NAME: &str = "prototype_logits";
/// Name of the heatmap output `[1, C, h, w]` (sigmoid applied).
pub const HEATMAP_NAME: &str = "det_heatmap";
/// Name of the box output `[1, 4, h, w]`: `(dx, dy, w, h)` in cells.
pub const BOXES_NAME: &str = "det_boxes";
/// ImageNet channel means (R, G, B) in `[0, 1]` units.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (R, G, B) in `[0, 1]` units.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];
