//!
//! Two metrics, both std-only and independent of tract:
//!
//! - [`coco`](crate::eval::coco): COCO bounding-box detection metrics, numerically identical to pycocotools'
//!   `COCOeval(iouType="bbox")` (`evaluate()`, `accumulate()`, `summarize()`): the 12 stats
//!   AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl. Entry points:
//!   [`evaluate_files`](crate::eval::evaluate_files) (GT json + results json) and
//!   [`evaluate`](crate::eval::evaluate) (parsed data).
//! - [`cluster`](crate::eval::cluster): unsupervised-segmentation scoring of cluster maps against class maps:
//!   dataset confusion matrix, one-to-one Hungarian matching that maximises the matched pixel
//!   count, mIoU, per-class IoU and pixel accuracy, plus the same with per-image matching.
//!   Entry points: [`cluster_miou`](crate::eval::cluster_miou) and the incremental
//!   [`ClusterEval`](crate::eval::ClusterEval).
//!
//! Every failure is an [`EvalError`](crate::eval::EvalError) naming the file, the JSON field or the image and pixel
//! at fault; no input makes these functions panic.

pub mod cluster;
pub mod coco;
mod error;

pub use cluster::{ClusterEval, ClusterMiou, Matching, cluster_miou, hungarian_match};
pub use coco::{CocoDet, CocoGt, CocoGtAnn, CocoStats, evaluate, evaluate_files};
pub use error::EvalError;
