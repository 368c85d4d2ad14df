//! Segments: 4-connected components of the patch label grid.
//!
//! The flood fill is iterative over a caller-provided stack (no recursion) and visits every
//! patch once: `O(N)` time, no allocation.

use super::math::{axpy, inv_norm};
use super::{Count, PerceptionError, check_len, check_min, mul, nonzero};

/// Segment id of a patch that belongs to no segment (never left after [`segments`]).
pub const NO_SEGMENT: u32 = u32::MAX;

/// One connected region of equal labels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Segment {
    /// The patches' label (possibly [`NO_LABEL`](super::NO_LABEL)).
    pub label: u32,
    /// Area in patches.
    pub area: u32,
    /// Bounding box in patch cells `[x0, y0, x1, y1]`, `x1` and `y1` exclusive.
    pub cells: [u32; 4],
    /// Bounding box in model-input pixels: `cells * patch_px` (map it to the frame with a
    /// [`BoxMap`](super::BoxMap)).
    pub bbox: [f32; 4],
}

impl Segment {
    /// An empty placeholder (area 0), for initializing output arrays.
    pub const EMPTY: Self = Self { label: 0, area: 0, cells: [0; 4], bbox: [0.0; 4] };
}

impl Default for Segment {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// Caller-provided buffers of [`segments`].
#[derive(Debug)]
pub struct SegmentScratch<'s> {
    /// Output: the segment id of every patch, exactly `N` values. Ids number the segments in
    /// row-major order of their first patch; ids `>= out.len()` belong to segments that did
    /// not fit in the output.
    pub seg_of: &'s mut [u32],
    /// Flood-fill stack, at least `N` values.
    pub stack: &'s mut [u32],
}

/// Finds the 4-connected components of equal labels on the `gh x gw` grid (`labels` row-major,
/// exactly `gh * gw` values) and writes them to `out` in row-major order of their first patch.
///
/// Every patch belongs to exactly one segment (`scratch.seg_of`). Returns how many segments
/// were written and how many exist; when `found > written` the first `out.len()` are kept and
/// the rest exist only as ids in `seg_of`.
///
/// Errors: zero grid sizes, `gh * gw >= u32::MAX`, a non-finite or negative `patch_px`, wrong
/// `labels`/`seg_of` lengths or a short stack.
pub fn segments(
    labels: &[u32],
    gh: usize,
    gw: usize,
    patch_px: f32,
    scratch: SegmentScratch<'_>,
    out: &mut [Segment],
) -> Result<Count, PerceptionError> {
    nonzero("gh", gh)?;
    nonzero("gw", gw)?;
    let n = mul("gh * gw", gh, gw)?;
    if n >= NO_SEGMENT as usize {
        return Err(PerceptionError::Param { what: "gh * gw" });
    }
    if !(patch_px.is_finite() && patch_px >= 0.0) {
        return Err(PerceptionError::Param { what: "patch_px" });
    }
    check_len("labels", labels.len(), n)?;
    check_len("seg_of", scratch.seg_of.len(), n)?;
    check_min("scratch.stack", scratch.stack.len(), n)?;
    let seg_of = scratch.seg_of;
    let stack = scratch.stack;
    seg_of.iter_mut().for_each(|s| *s = NO_SEGMENT);

    let mut found = 0usize;
    for start in 0..n {
        if seg_of.get(start).is_none_or(|&s| s != NO_SEGMENT) {
            continue;
        }
        let label = labels.get(start).copied().unwrap_or(NO_SEGMENT);
        let id = found as u32;
        let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0u32, 0u32);
        let mut area = 0u32;
        if let (Some(s), Some(top)) = (seg_of.get_mut(start), stack.first_mut()) {
            *s = id;
            *top = start as u32;
        }
        let mut len = 1usize;
        while len > 0 {
            len -= 1;
            let Some(&i) = stack.get(len) else { break };
            let i = i as usize;
            let (x, y) = (i % gw, i / gw);
            area += 1;
            x0 = x0.min(x as u32);
            y0 = y0.min(y as u32);
            x1 = x1.max(x as u32 + 1);
            y1 = y1.max(y as u32 + 1);
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < gw).then_some(i + 1),
                (y > 0).then(|| i - gw),
                (y + 1 < gh).then_some(i + gw),
            ];
            for j in neighbours.into_iter().flatten() {
                if labels.get(j) != Some(&label) {
                    continue;
                }
                if let Some(s) = seg_of.get_mut(j)
                    && *s == NO_SEGMENT
                {
                    *s = id;
                    if let Some(slot) = stack.get_mut(len) {
                        *slot = j as u32;
                        len += 1;
                    }
                }
            }
        }
        if let Some(seg) = out.get_mut(found) {
            let cells = [x0, y0, x1, y1];
            *seg = Segment { label, area, cells, bbox: cells.map(|c| c as f32 * patch_px) };
        }
        found += 1;
    }
    Ok(Count { written: found.min(out.len()), found })
}

/// Mean feature of each of the first `m` segments: for every patch `i` with
/// `seg_of[i] < m`, its feature row `features[i]` (`[N, D]`) is averaged into row `seg_of[i]`
/// of `out` (`m * D` values, at least).
///
/// Invalid feature rows (NaN or infinite values, all zeros, squared norm overflowing f32) are
/// left out of the mean; a segment without valid rows gets zeros. `counts` is scratch of at
/// least `m` values.
pub fn mean_features(
    features: &[f32],
    d: usize,
    seg_of: &[u32],
    m: usize,
    counts: &mut [u32],
    out: &mut [f32],
) -> Result<(), PerceptionError> {
    nonzero("d", d)?;
    let n = seg_of.len();
    check_len("features", features.len(), mul("n * d", n, d)?)?;
    let md = mul("m * d", m, d)?;
    check_min("segment_features", out.len(), md)?;
    check_min("scratch.counts", counts.len(), m)?;
    let out = out.get_mut(..md).unwrap_or_default();
    let counts = counts.get_mut(..m).unwrap_or_default();
    out.iter_mut().for_each(|v| *v = 0.0);
    counts.iter_mut().for_each(|c| *c = 0);
    for (x, &s) in features.chunks_exact(d).zip(seg_of) {
        let s = s as usize;
        if s >= m || inv_norm(x) == 0.0 {
            continue;
        }
        if let (Some(row), Some(c)) = (out.get_mut(s * d..s * d + d), counts.get_mut(s)) {
            axpy(row, 1.0, x);
            *c += 1;
        }
    }
    for (row, &c) in out.chunks_exact_mut(d).zip(counts.iter()) {
        if c > 0 {
            let inv = 1.0 / c as f32;
            row.iter_mut().for_each(|v| *v *= inv);
        }
    }
    Ok(())
}
