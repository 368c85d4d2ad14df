//! Class-aware non-maximum suppression, in place and without allocation.

use core::cmp::Ordering;

use super::decode::Detection;
use super::iou;

/// The order of [`nms`]: descending score, NaN scores last, ties broken by class and then by
/// the box coordinates (`f32::total_cmp`), so equal keys mean equal detections and the result
/// does not depend on the input order.
pub fn by_score_desc(a: &Detection, b: &Detection) -> Ordering {
    a.score
        .is_nan()
        .cmp(&b.score.is_nan())
        .then_with(|| b.score.total_cmp(&a.score))
        .then_with(|| a.class.cmp(&b.class))
        .then_with(|| {
            a.bbox
                .iter()
                .zip(b.bbox.iter())
                .map(|(x, y)| x.total_cmp(y))
                .find(|o| o.is_ne())
                .unwrap_or(Ordering::Equal)
        })
}

/// Sorts `dets` by [`by_score_desc`] and suppresses every detection whose IoU with a kept,
/// higher-ranked detection of the same class is greater than `iou_threshold`.
///
/// Returns the number `kept`: `dets[..kept]` are the kept detections in descending score,
/// `dets[kept..]` the suppressed and dropped ones (the slice stays a permutation of the input).
/// Detections with a NaN score are dropped. A NaN `iou_threshold` suppresses nothing; boxes
/// with NaN or infinite extents have IoU 0 with everything (see [`iou`]). `O(n log n + n *
/// kept)`; uses `sort_unstable_by` (in core, no allocation).
pub fn nms(dets: &mut [Detection], iou_threshold: f32) -> usize {
    dets.sort_unstable_by(by_score_desc);
    let mut kept = 0usize;
    for i in 0..dets.len() {
        let Some(&cand) = dets.get(i) else { break };
        if cand.score.is_nan() {
            break;
        }
        let head = dets.get(..kept).unwrap_or_default();
        let suppressed =
            head.iter().any(|k| k.class == cand.class && iou(&k.bbox, &cand.bbox) > iou_threshold);
        if !suppressed {
            dets.swap(kept, i);
            kept += 1;
        }
    }
    kept
}
