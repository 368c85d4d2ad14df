//! [`Perception`]: the whole per-frame post-process behind one call, over caller scratch.
//!
//! ```text
//! features [N, D] --(mean shift, optional)--> refined [N, D]
//!   --(labels: prototype_logits argmax | feature-space prototypes | k-means)--> labels [N]
//!   --> segments (+ mean features)
//! heatmap [C, hs, ws], boxes [4, hs, ws] --> decode --> NMS --> tracker --> wire::Frame
//! ```
//!
//! # Scratch
//!
//! [`Perception::new`] borrows one `f32` and one `u32` buffer for its whole life and splits
//! them; [`Perception::scratch_sizes`] gives the lengths. With `N = gh * gw`, `D` features,
//! `K` = [`PerceptionDims::k`], `k` = k-means clusters, and the const capacities `S`
//! (segments), `M` (detections), `T` (tracks):
//!
//! ```text
//! f32s = [N*D + 5*N       if mean shift is on]  (refined, 4 logit rows, norms)
//!      + k*D + 2*N                      (k-means)
//!      + K                              (prototype norms)
//!      + S*D                            (segment mean features)
//!      + [M*D + T*D       if a head is given and tracker.feature_weight > 0]
//! u32s = 3*N + max(k, S)                (labels, segment ids, flood-fill stack, counts)
//! ```
//!
//! For a 14x14 grid, `D = 384`, `K = 64`, `k = 8`, `S = M = 64`, `T = 32` with everything on:
//! 75 264 + 980 + 3 072 + 392 + 64 + 24 576 + 24 576 + 12 288 = 141 212 `f32`s
//! (552 KiB) and 652 `u32`s.
//!
//! Nothing here allocates; `process_frame` never panics, and returns an error (with the
//! previous frame's outputs possibly partly overwritten) on inputs of the wrong shape.

use core::mem;

use super::cluster::{self, KMeansConfig, KMeansScratch};
use super::decode::{self, Detection, HeadDims};
use super::math::{axpy, inv_norm};
use super::meanshift::{self, MeanShiftConfig, MeanShiftScratch};
use super::nms::nms;
use super::segments::{self, Segment, SegmentScratch};
use super::track::{TrackUpdate, Tracker, TrackerConfig};
use super::{BoxMap, Count, PerceptionError, check_len, mul, nonzero};
use crate::wire::Frame;

/// The shapes of one model's outputs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PerceptionDims {
    /// Patch grid height.
    pub gh: usize,
    /// Patch grid width.
    pub gw: usize,
    /// Feature dimension `D`.
    pub d: usize,
    /// Prototypes `K` for [`LabelSource::Logits`] and [`LabelSource::Prototypes`] (`0` if the
    /// model has neither).
    pub k: usize,
    /// Input pixels per patch (16 for a /16 ViT), finite and `> 0`.
    pub patch_px: f32,
    /// The detection head's maps, if the model has one.
    pub head: Option<HeadDims>,
}

impl PerceptionDims {
    /// `N = gh * gw`.
    pub fn n(&self) -> usize {
        self.gh.saturating_mul(self.gw)
    }
}

/// Settings of every stage.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PerceptionConfig {
    /// Mean-shift refinement of the features before labelling and segment features
    /// (default on: [`MeanShiftConfig::DEFAULT`]).
    pub meanshift: Option<MeanShiftConfig>,
    /// k-means for [`LabelSource::KMeans`] (default [`KMeansConfig::DEFAULT`]).
    pub kmeans: KMeansConfig,
    /// Least heatmap score of a detection (default 0.3).
    pub score_threshold: f32,
    /// NMS IoU threshold (default 0.5).
    pub nms_iou: f32,
    /// Tracker settings (default [`TrackerConfig::DEFAULT`]).
    pub tracker: TrackerConfig,
}

impl PerceptionConfig {
    /// The defaults (see the field docs).
    pub const DEFAULT: Self = Self {
        meanshift: Some(MeanShiftConfig::DEFAULT),
        kmeans: KMeansConfig::DEFAULT,
        score_threshold: 0.3,
        nms_iou: 0.5,
        tracker: TrackerConfig::DEFAULT,
    };
}

impl Default for PerceptionConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Where the patch labels of a frame come from.
#[derive(Clone, Copy, Debug)]
pub enum LabelSource<'x> {
    /// Argmax of the FLSL head's `prototype_logits` `[N, K]` (the raw features' labels; mean
    /// shift then only refines the segment features).
    Logits(&'x [f32]),
    /// Cosine argmax of the (refined) features against feature-space prototypes `[K, D]`.
    Prototypes(&'x [f32]),
    /// k-means of the (refined) features ([`PerceptionConfig::kmeans`]).
    KMeans,
}

/// One frame of model outputs.
#[derive(Clone, Copy, Debug)]
pub struct FrameInput<'x> {
    /// Backbone features `[N, D]`.
    pub features: &'x [f32],
    /// Label source.
    pub labels: LabelSource<'x>,
    /// Detection maps `(heatmap [C, hs, ws], boxes [4, hs, ws])`, if the model has a head.
    pub detections: Option<(&'x [f32], &'x [f32])>,
}

/// What [`Perception::process_frame`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FrameReport {
    /// Clusters: `K` for logits and prototypes, the clusters used for k-means.
    pub clusters: usize,
    /// Segments written / found (capacity `S`).
    pub segments: Count,
    /// Decoded peaks written / found (capacity `M`), before NMS.
    pub decoded: Count,
    /// Detections kept by NMS.
    pub detections: usize,
    /// The tracker's update (all zero without detection maps).
    pub tracks: TrackUpdate,
}

/// Scratch lengths of a [`Perception`] (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScratchSizes {
    /// `f32` values.
    pub f32s: usize,
    /// `u32` values.
    pub u32s: usize,
}

/// The whole post-process with capacities `S` segments, `M` detections and `T` tracks.
#[derive(Debug)]
pub struct Perception<'a, const S: usize, const M: usize, const T: usize> {
    dims: PerceptionDims,
    config: PerceptionConfig,
    refined: &'a mut [f32],
    ms_logits: &'a mut [f32],
    ms_inv: &'a mut [f32],
    centroids: &'a mut [f32],
    km_rows: &'a mut [f32],
    proto_inv: &'a mut [f32],
    seg_features: &'a mut [f32],
    det_features: &'a mut [f32],
    labels: &'a mut [u32],
    seg_of: &'a mut [u32],
    stack: &'a mut [u32],
    counts: &'a mut [u32],
    segments: [Segment; S],
    n_segments: usize,
    dets: [Detection; M],
    n_dets: usize,
    tracker: Tracker<'a, T>,
}

/// The region lengths in split order: f32s then u32s.
struct Layout {
    f32s: [usize; 9],
    u32s: [usize; 4],
}

fn layout<const S: usize, const M: usize, const T: usize>(
    dims: &PerceptionDims,
    config: &PerceptionConfig,
) -> Result<Layout, PerceptionError> {
    let n = mul("gh * gw", nonzero("gh", dims.gh)?, nonzero("gw", dims.gw)?)?;
    let d = nonzero("d", dims.d)?;
    if !(dims.patch_px.is_finite() && dims.patch_px > 0.0) {
        return Err(PerceptionError::Param { what: "patch_px" });
    }
    let ms = config.meanshift.is_some();
    let feats = dims.head.is_some() && config.tracker.feature_weight > 0.0;
    let on = |b: bool, v: usize| if b { v } else { 0 };
    Ok(Layout {
        f32s: [
            on(ms, mul("n * d", n, d)?),
            on(ms, mul("BLOCK * n", meanshift::BLOCK, n)?),
            on(ms, n),
            mul("kmeans.k * d", config.kmeans.k, d)?,
            mul("2 * n", 2, n)?,
            dims.k,
            mul("S * d", S, d)?,
            on(feats, mul("M * d", M, d)?),
            on(feats, mul("T * d", T, d)?),
        ],
        u32s: [n, n, n, config.kmeans.k.max(S)],
    })
}

fn total(what: &'static str, parts: &[usize]) -> Result<usize, PerceptionError> {
    parts.iter().try_fold(0usize, |a, &b| a.checked_add(b)).ok_or(PerceptionError::Param { what })
}

/// Splits the next `len` values off `buf`.
fn take<'a, X>(buf: &mut &'a mut [X], len: usize) -> &'a mut [X] {
    let all = mem::take(buf);
    let (head, tail) = all.split_at_mut_checked(len).unwrap_or((&mut [], &mut []));
    *buf = tail;
    head
}

impl<'a, const S: usize, const M: usize, const T: usize> Perception<'a, S, M, T> {
    /// The scratch lengths [`new`](Self::new) needs for `dims` and `config`.
    pub fn scratch_sizes(
        dims: &PerceptionDims,
        config: &PerceptionConfig,
    ) -> Result<ScratchSizes, PerceptionError> {
        let l = layout::<S, M, T>(dims, config)?;
        Ok(ScratchSizes {
            f32s: total("scratch f32s", &l.f32s)?,
            u32s: total("scratch u32s", &l.u32s)?,
        })
    }

    /// A pipeline over `f32s` and `u32s` (at least [`scratch_sizes`](Self::scratch_sizes)
    /// long; longer is fine).
    ///
    /// Errors: zero or overflowing dims, a bad `patch_px`, head dims or thresholds, an invalid
    /// tracker or mean-shift configuration, or short scratch.
    pub fn new(
        dims: PerceptionDims,
        config: PerceptionConfig,
        f32s: &'a mut [f32],
        u32s: &'a mut [u32],
    ) -> Result<Self, PerceptionError> {
        let sizes = Self::scratch_sizes(&dims, &config)?;
        super::check_min("scratch f32s", f32s.len(), sizes.f32s)?;
        super::check_min("scratch u32s", u32s.len(), sizes.u32s)?;
        if let Some(ms) = &config.meanshift
            && !(ms.temperature.is_finite() && ms.temperature >= 0.0)
        {
            return Err(PerceptionError::Param { what: "meanshift.temperature" });
        }
        if !config.score_threshold.is_finite() {
            return Err(PerceptionError::Param { what: "score_threshold" });
        }
        if !(config.nms_iou.is_finite() && (0.0..=1.0).contains(&config.nms_iou)) {
            return Err(PerceptionError::Param { what: "nms_iou" });
        }
        if let Some(h) = &dims.head {
            h.validate()?;
        }
        let l = layout::<S, M, T>(&dims, &config)?;
        let [a, b, c, e, f, g, h, i, j] = l.f32s;
        let mut fb = f32s;
        let refined = take(&mut fb, a);
        let ms_logits = take(&mut fb, b);
        let ms_inv = take(&mut fb, c);
        let centroids = take(&mut fb, e);
        let km_rows = take(&mut fb, f);
        let proto_inv = take(&mut fb, g);
        let seg_features = take(&mut fb, h);
        let det_features = take(&mut fb, i);
        let store = take(&mut fb, j);
        let [p, q, r, s] = l.u32s;
        let mut ub = u32s;
        let labels = take(&mut ub, p);
        let seg_of = take(&mut ub, q);
        let stack = take(&mut ub, r);
        let counts = take(&mut ub, s);
        let tracker = if store.is_empty() {
            Tracker::<T>::new(config.tracker)?
        } else {
            Tracker::with_features(config.tracker, dims.d, store)?
        };
        Ok(Self {
            dims,
            config,
            refined,
            ms_logits,
            ms_inv,
            centroids,
            km_rows,
            proto_inv,
            seg_features,
            det_features,
            labels,
            seg_of,
            stack,
            counts,
            segments: [Segment::EMPTY; S],
            n_segments: 0,
            dets: [Detection::EMPTY; M],
            n_dets: 0,
            tracker,
        })
    }

    /// The shapes.
    pub fn dims(&self) -> &PerceptionDims {
        &self.dims
    }

    /// The settings.
    pub fn config(&self) -> &PerceptionConfig {
        &self.config
    }

    /// Runs every stage on one frame (see the [module docs](self)).
    ///
    /// Without detection maps (`input.detections` is `None`) the tracker is not advanced.
    ///
    /// Errors: a `features` length other than `N * D`, label or detection maps of the wrong
    /// shape, detection maps for a model without [`PerceptionDims::head`].
    pub fn process_frame(
        &mut self,
        input: &FrameInput<'_>,
    ) -> Result<FrameReport, PerceptionError> {
        let PerceptionDims { gh, gw, d, k, patch_px, head } = self.dims;
        let n = gh * gw;
        check_len("features", input.features.len(), n * d)?;
        let mut report = FrameReport::default();
        self.n_segments = 0;
        self.n_dets = 0;

        // 1. Mean shift.
        let feats: &[f32] = match &self.config.meanshift {
            Some(ms) => {
                meanshift::refine(
                    input.features,
                    n,
                    d,
                    ms,
                    MeanShiftScratch { logits: self.ms_logits, inv_norms: self.ms_inv },
                    self.refined,
                )?;
                &*self.refined
            }
            None => input.features,
        };

        // 2. Labels.
        report.clusters = match input.labels {
            LabelSource::Logits(logits) => {
                cluster::argmax_labels(logits, n, k, self.labels)?;
                k
            }
            LabelSource::Prototypes(p) => {
                cluster::prototype_labels(feats, p, n, d, k, self.proto_inv, self.labels)?;
                k
            }
            LabelSource::KMeans => cluster::kmeans_labels(
                feats,
                n,
                d,
                &self.config.kmeans,
                KMeansScratch {
                    centroids: self.centroids,
                    counts: self.counts,
                    rows: self.km_rows,
                },
                self.labels,
            )?,
        };

        // 3. Segments and their mean features.
        report.segments = segments::segments(
            self.labels,
            gh,
            gw,
            patch_px,
            SegmentScratch { seg_of: self.seg_of, stack: self.stack },
            &mut self.segments,
        )?;
        self.n_segments = report.segments.written;
        segments::mean_features(
            feats,
            d,
            self.seg_of,
            self.n_segments,
            self.counts,
            self.seg_features,
        )?;

        // 4. Detections, NMS, tracking.
        let Some((heatmap, boxes)) = input.detections else {
            return Ok(report);
        };
        let Some(head) = head else {
            return Err(PerceptionError::Param {
                what: "detection maps for a model without a head",
            });
        };
        report.decoded =
            decode::decode(heatmap, boxes, &head, self.config.score_threshold, &mut self.dets)?;
        let dets = self.dets.get_mut(..report.decoded.written).unwrap_or_default();
        let kept = nms(dets, self.config.nms_iou);
        self.n_dets = kept;
        report.detections = kept;
        let dets = self.dets.get(..kept).unwrap_or_default();
        report.tracks = if self.tracker.feature_dim() > 0 {
            let out = self.det_features.get_mut(..kept * d).unwrap_or_default();
            for (det, row) in dets.iter().zip(out.chunks_exact_mut(d)) {
                box_feature(feats, gh, gw, d, patch_px, &det.bbox, row);
            }
            self.tracker.update(dets, Some(out))?
        } else {
            self.tracker.update(dets, None)?
        };
        Ok(report)
    }

    /// Patch labels of the last frame (`N`).
    pub fn labels(&self) -> &[u32] {
        self.labels
    }

    /// Segments of the last frame.
    pub fn segments(&self) -> &[Segment] {
        self.segments.get(..self.n_segments).unwrap_or_default()
    }

    /// Mean (refined, when mean shift is on) feature of segment `i` of the last frame.
    pub fn segment_feature(&self, i: usize) -> Option<&[f32]> {
        let d = self.dims.d;
        if i >= self.n_segments {
            return None;
        }
        self.seg_features.get(i * d..(i + 1) * d)
    }

    /// Refined unit features `[N, D]` of the last frame (mean shift on).
    pub fn refined(&self) -> Option<&[f32]> {
        self.config.meanshift.map(|_| &*self.refined)
    }

    /// Detections of the last frame after NMS, by descending score (model-input pixels).
    pub fn detections(&self) -> &[Detection] {
        self.dets.get(..self.n_dets).unwrap_or_default()
    }

    /// The tracker.
    pub fn tracker(&self) -> &Tracker<'a, T> {
        &self.tracker
    }

    /// The tracker, mutably (for example to [`clear`](Tracker::clear) it).
    pub fn tracker_mut(&mut self) -> &mut Tracker<'a, T> {
        &mut self.tracker
    }

    /// Fills a wire frame with the confirmed tracks of the last frame (see
    /// [`Tracker::fill_frame`]); use [`BoxMap::normalized`] with the model input size.
    pub fn fill_frame(&self, map: &BoxMap, frame: &mut Frame) -> usize {
        self.tracker.fill_frame(map, frame)
    }
}

/// Sum of the valid feature rows of the patches whose centres lie in `bbox` (input pixels),
/// or of the patch under the box centre when none does; written to `out` (`D`).
fn box_feature(
    feats: &[f32],
    gh: usize,
    gw: usize,
    d: usize,
    patch_px: f32,
    bbox: &[f32; 4],
    out: &mut [f32],
) {
    out.iter_mut().for_each(|v| *v = 0.0);
    let cell = |v: f32, hi: usize| libm::ceilf(v / patch_px - 0.5).clamp(0.0, hi as f32) as usize;
    let (xa, xb) = (cell(bbox[0], gw), cell(bbox[2], gw));
    let (ya, yb) = (cell(bbox[1], gh), cell(bbox[3], gh));
    let (xa, xb, ya, yb) = if xa < xb && ya < yb {
        (xa, xb, ya, yb)
    } else {
        let c = |v: f32, hi: usize| {
            let i = libm::floorf(v / patch_px).clamp(0.0, (hi - 1) as f32) as usize;
            (i, i + 1)
        };
        let (xa, xb) = c(0.5 * (bbox[0] + bbox[2]), gw);
        let (ya, yb) = c(0.5 * (bbox[1] + bbox[3]), gh);
        (xa, xb, ya, yb)
    };
    for y in ya..yb {
        for x in xa..xb {
            let i = y * gw + x;
            if let Some(row) = feats.get(i * d..(i + 1) * d)
                && inv_norm(row) > 0.0
            {
                axpy(out, 1.0, row);
            }
        }
    }
}
