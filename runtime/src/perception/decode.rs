//! Decoding of a CenterNet-style detection head.
//!
//! # Contract (the exported head matches it)
//!
//! The maps are at stride `s` input pixels (`s = 8` for patch 16 upsampled 2x) on an
//! `hs x ws` grid, channel-major planes as ONNX NCHW with the batch of 1 dropped:
//!
//! - `heatmap` `[C, hs, ws]`: per-class centre scores in `[0, 1]` (the graph applies the
//!   sigmoid);
//! - `boxes` `[4, hs, ws]`: channels `(dx, dy, w, h)`: the centre offset inside the cell in
//!   cells (`centre_x = (ix + dx) * s`, `centre_y = (iy + dy) * s`) and the box size in cells
//!   (`w_px = w * s`, `h_px = h * s`).
//!
//! A peak is a cell whose score is the maximum of its 3x3 neighbourhood in its class plane
//! (cells of a plateau are all peaks; NMS removes the duplicates) and at least the
//! threshold. Boxes come out in input pixels `[x0, y0, x1, y1]`.

use super::{BoxMap, Count, PerceptionError, check_len, mul, nonzero};

/// One detection: a box in model-input pixels, a class and a score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Detection {
    /// Box `[x0, y0, x1, y1]`, model-input pixels (after [`Detection::mapped`]: whatever the
    /// map produces).
    pub bbox: [f32; 4],
    /// Score (the heatmap value at the peak).
    pub score: f32,
    /// Class: the heatmap plane.
    pub class: u16,
}

impl Detection {
    /// A zero placeholder, for initializing output arrays.
    pub const EMPTY: Self = Self { bbox: [0.0; 4], score: 0.0, class: 0 };

    /// This detection with its box mapped by `map` (for example to frame pixels, see
    /// [`BoxMap::stretch`]).
    pub fn mapped(&self, map: &BoxMap) -> Self {
        Self { bbox: map.apply(self.bbox), ..*self }
    }
}

impl Default for Detection {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// The shape of a detection head's output maps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct HeadDims {
    /// Classes `C` (heatmap planes), `1..=65536`.
    pub classes: usize,
    /// Map height in cells.
    pub hs: usize,
    /// Map width in cells.
    pub ws: usize,
    /// Input pixels per cell (finite, `> 0`).
    pub stride: f32,
}

impl HeadDims {
    /// Dims from their parts.
    pub const fn new(classes: usize, hs: usize, ws: usize, stride: f32) -> Self {
        Self { classes, hs, ws, stride }
    }

    /// Checks the dims: `1..=65536` classes, non-zero sizes, a finite stride `> 0`, and no
    /// overflowing map lengths.
    pub fn validate(&self) -> Result<(), PerceptionError> {
        self.plane().map(|_| ())
    }

    /// Checks the dims and returns `hs * ws`.
    fn plane(&self) -> Result<usize, PerceptionError> {
        nonzero("head.classes", self.classes)?;
        if self.classes > usize::from(u16::MAX) + 1 {
            return Err(PerceptionError::Param { what: "head.classes" });
        }
        nonzero("head.hs", self.hs)?;
        nonzero("head.ws", self.ws)?;
        if !(self.stride.is_finite() && self.stride > 0.0) {
            return Err(PerceptionError::Param { what: "head.stride" });
        }
        let plane = mul("head.hs * head.ws", self.hs, self.ws)?;
        mul("head.classes * hs * ws", self.classes, plane)?;
        mul("4 * hs * ws", 4, plane)?;
        Ok(plane)
    }
}

/// Decodes the peaks of `heatmap` with their `boxes` into `out`, best first.
///
/// Keeps the `out.len()` best peaks by descending score (ties: class, then row-major cell
/// order); `Count::found` counts every valid peak. A peak is skipped when its score is not
/// finite, when any of its box values is NaN or infinite, when `w` or `h` is negative, or when
/// a resulting coordinate is not finite; neighbours that are NaN are ignored in the 3x3
/// maximum. Never panics.
///
/// Errors: bad [`HeadDims`], a NaN or infinite `threshold`, or `heatmap`/`boxes` lengths other
/// than `C * hs * ws` and `4 * hs * ws`.
pub fn decode(
    heatmap: &[f32],
    boxes: &[f32],
    dims: &HeadDims,
    threshold: f32,
    out: &mut [Detection],
) -> Result<Count, PerceptionError> {
    let plane = dims.plane()?;
    if !threshold.is_finite() {
        return Err(PerceptionError::Param { what: "score_threshold" });
    }
    check_len("heatmap", heatmap.len(), dims.classes * plane)?;
    check_len("boxes", boxes.len(), 4 * plane)?;
    let (hs, ws, s) = (dims.hs, dims.ws, dims.stride);
    let (bdx, rest) = boxes.split_at(plane);
    let (bdy, rest) = rest.split_at(plane);
    let (bw, bh) = rest.split_at(plane);

    let mut found = 0usize;
    let mut written = 0usize;
    for (class, heat) in heatmap.chunks_exact(plane).enumerate() {
        for (i, &v) in heat.iter().enumerate() {
            if !(v.is_finite() && v >= threshold) {
                continue;
            }
            let (ix, iy) = (i % ws, i / ws);
            if !is_peak(heat, ix, iy, hs, ws, v) {
                continue;
            }
            let get = |m: &[f32]| m.get(i).copied().unwrap_or(f32::NAN);
            let (dx, dy, w, h) = (get(bdx), get(bdy), get(bw), get(bh));
            if !(dx.is_finite() && dy.is_finite() && w.is_finite() && h.is_finite())
                || w < 0.0
                || h < 0.0
            {
                continue;
            }
            let cx = (ix as f32 + dx) * s;
            let cy = (iy as f32 + dy) * s;
            let (hw, hh) = (0.5 * w * s, 0.5 * h * s);
            let bbox = [cx - hw, cy - hh, cx + hw, cy + hh];
            if !bbox.iter().all(|c| c.is_finite()) {
                continue;
            }
            found += 1;
            let det = Detection { bbox, score: v, class: class as u16 };
            written = insert_top(out, written, det);
        }
    }
    Ok(Count { written, found })
}

/// Whether `v` at `(ix, iy)` is at least every non-NaN value of its 3x3 neighbourhood.
fn is_peak(heat: &[f32], ix: usize, iy: usize, hs: usize, ws: usize, v: f32) -> bool {
    let ys = iy.saturating_sub(1)..=(iy + 1).min(hs - 1);
    for y in ys {
        let row = y * ws;
        let xs =
            heat.get(row + ix.saturating_sub(1)..=row + (ix + 1).min(ws - 1)).unwrap_or_default();
        if xs.iter().any(|&u| u > v) {
            return false;
        }
    }
    true
}

/// Inserts `det` into the descending list `out[..len]` (after equal scores), dropping the
/// last entry when full; returns the new length.
fn insert_top(out: &mut [Detection], len: usize, det: Detection) -> usize {
    let cap = out.len();
    let head = out.get(..len).unwrap_or_default();
    let pos = head.iter().position(|o| o.score < det.score).unwrap_or(len);
    if pos >= cap {
        return len;
    }
    let new_len = (len + 1).min(cap);
    if let Some(tail) = out.get_mut(pos..new_len) {
        tail.rotate_right(1);
        if let Some(first) = tail.first_mut() {
            *first = det;
        }
    }
    new_len
}
