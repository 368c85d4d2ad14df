//! A fixed-capacity multi-object tracker: IoU matching with an optional feature-cosine term.
//!
//! # Algorithm
//!
//! Per frame ([`Tracker::update`]), detections are taken in the order given (pass the
//! output of [`nms`](super::nms::nms), which is sorted by descending score); each one is
//! matched greedily to the free live track of the same class with the highest similarity
//!
//! ```text
//! similarity = IoU(track, detection) + feature_weight * cos(track feature, detection feature)
//! ```
//!
//! among the tracks with `IoU >= iou_threshold` (the cosine term only when both have a valid
//! feature; ties: lowest slot). There is no motion model: a matched track takes the
//! detection's box, class and score, so an object must overlap its previous box by at least
//! `iou_threshold` from frame to frame. A track's feature is an exponential moving average
//! of its detections' unit features (momentum [`TrackerConfig::feature_momentum`]).
//!
//! # Lifecycle
//!
//! - An unmatched detection starts a *tentative* track (id [`Object::UNTRACKED`], `hits = 1`);
//!   with no free slot it is dropped and counted ([`TrackUpdate::dropped`]).
//! - A track is *confirmed* when its hits reach `min_hits` (default 3; `0` or `1` confirm at
//!   once) and then receives the next id: ids increase from 1 in confirmation order and are
//!   never reused (after `u32::MAX` they wrap to 1).
//! - A tentative track that misses a frame is removed. A confirmed track that misses a frame
//!   keeps its last box (`misses > 0`) and is removed in the frame where its consecutive
//!   misses reach `max_misses` (default 5; `0` behaves as `1`).

use super::decode::Detection;
use super::math::{dot, inv_norm, normalize};
use super::{BoxMap, PerceptionError, check_len, check_min, iou, mul};
use crate::wire::{Frame, Object};

/// Tracker settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrackerConfig {
    /// Least IoU between a track's box and a detection to match them. Default 0.3.
    pub iou_threshold: f32,
    /// Weight of the feature cosine in the similarity (`0` = IoU only). Default 0.5.
    pub feature_weight: f32,
    /// Weight of the old feature in the moving average, in `[0, 1]`. Default 0.8.
    pub feature_momentum: f32,
    /// Hits that confirm a track (it then gets an id). Default 3.
    pub min_hits: u32,
    /// Consecutive misses that remove a confirmed track. Default 5.
    pub max_misses: u32,
}

impl TrackerConfig {
    /// The defaults (see the field docs).
    pub const DEFAULT: Self = Self {
        iou_threshold: 0.3,
        feature_weight: 0.5,
        feature_momentum: 0.8,
        min_hits: 3,
        max_misses: 5,
    };

    fn check(&self) -> Result<(), PerceptionError> {
        let ok = |v: f32, lo: f32, hi: f32| v.is_finite() && v >= lo && v <= hi;
        if !ok(self.iou_threshold, 0.0, 1.0) {
            return Err(PerceptionError::Param { what: "tracker.iou_threshold" });
        }
        if !ok(self.feature_weight, 0.0, f32::MAX) {
            return Err(PerceptionError::Param { what: "tracker.feature_weight" });
        }
        if !ok(self.feature_momentum, 0.0, 1.0) {
            return Err(PerceptionError::Param { what: "tracker.feature_momentum" });
        }
        Ok(())
    }
}

impl Default for TrackerConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// One track.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Track {
    /// Identity (`>= 1`) once confirmed; [`Object::UNTRACKED`] while tentative.
    pub id: u32,
    /// Last matched box (model-input pixels, as the detections).
    pub bbox: [f32; 4],
    /// Class of the last matched detection.
    pub class: u16,
    /// Score of the last matched detection.
    pub score: f32,
    /// Frames with a matched detection.
    pub hits: u32,
    /// Consecutive frames without one (0: updated this frame).
    pub misses: u32,
    /// Frames since the track started.
    pub age: u32,
    /// Whether the tracker's feature store holds a valid feature for this track.
    pub has_feature: bool,
}

impl Track {
    /// Whether the track is confirmed (has an id).
    pub const fn is_confirmed(&self) -> bool {
        self.id != Object::UNTRACKED
    }

    /// The wire object of this track, its box mapped by `map` (use
    /// [`BoxMap::normalized`] for the wire's normalized coordinates).
    pub fn to_object(&self, map: &BoxMap) -> Object {
        Object {
            bbox: map.apply(self.bbox),
            class: self.class,
            score: self.score,
            track_id: self.id,
        }
    }
}

/// What one [`Tracker::update`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TrackUpdate {
    /// Detections matched to an existing track.
    pub matched: usize,
    /// New tentative tracks.
    pub created: usize,
    /// Tracks confirmed this frame (given an id).
    pub confirmed: usize,
    /// Tracks removed this frame.
    pub removed: usize,
    /// Detections left untracked because all `T` slots were taken.
    pub dropped: usize,
    /// Detections skipped because their box had a NaN or infinite coordinate.
    pub invalid: usize,
}

/// A tracker of at most `T` tracks, with an optional caller-provided feature store.
#[derive(Debug)]
pub struct Tracker<'a, const T: usize> {
    config: TrackerConfig,
    slots: [Option<Track>; T],
    next_id: u32,
    /// `T * d` values: the feature of the track in slot `s` at `s * d`.
    features: &'a mut [f32],
    d: usize,
}

impl<const T: usize> Tracker<'static, T> {
    /// A tracker matching by IoU only (`feature_weight` is ignored).
    pub fn new(config: TrackerConfig) -> Result<Self, PerceptionError> {
        config.check()?;
        Ok(Self { config, slots: [None; T], next_id: 1, features: &mut [], d: 0 })
    }
}

impl<'a, const T: usize> Tracker<'a, T> {
    /// A tracker that also compares `d`-dimensional features; `store` holds at least `T * d`
    /// values.
    pub fn with_features(
        config: TrackerConfig,
        d: usize,
        store: &'a mut [f32],
    ) -> Result<Self, PerceptionError> {
        config.check()?;
        super::nonzero("tracker.d", d)?;
        check_min("tracker.store", store.len(), mul("T * d", T, d)?)?;
        Ok(Self { config, slots: [None; T], next_id: 1, features: store, d })
    }

    /// The settings.
    pub fn config(&self) -> &TrackerConfig {
        &self.config
    }

    /// Feature dimension (`0` without a feature store).
    pub fn feature_dim(&self) -> usize {
        self.d
    }

    /// Removes every track (ids keep increasing).
    pub fn clear(&mut self) {
        self.slots = [None; T];
    }

    /// The live tracks, tentative and confirmed, in slot order.
    pub fn tracks(&self) -> impl Iterator<Item = &Track> + '_ {
        self.slots.iter().flatten()
    }

    /// Advances one frame with `dets` (see the [module docs](self)). `det_features`, when
    /// given, holds one feature row per detection (`dets.len() * d` values, any scale) and
    /// needs a tracker built [`with_features`](Self::with_features).
    ///
    /// Errors (the tracker is unchanged): features given to a tracker without a store, or a
    /// `det_features` length other than `dets.len() * d`.
    pub fn update(
        &mut self,
        dets: &[Detection],
        det_features: Option<&[f32]>,
    ) -> Result<TrackUpdate, PerceptionError> {
        let d = self.d;
        if let Some(f) = det_features {
            if d == 0 {
                return Err(PerceptionError::Param { what: "tracker has no feature store" });
            }
            check_len("det_features", f.len(), mul("dets * d", dets.len(), d)?)?;
        }
        let cfg = self.config;
        let mut up = TrackUpdate::default();
        let mut seen = [false; T];
        for (k, det) in dets.iter().enumerate() {
            if !det.bbox.iter().all(|c| c.is_finite()) {
                up.invalid += 1;
                continue;
            }
            let feat =
                det_features.and_then(|f| f.get(k * d..(k + 1) * d)).filter(|x| inv_norm(x) > 0.0);
            // Best free track of the same class.
            let mut best: Option<(usize, f32)> = None;
            for (s, (slot, &taken)) in self.slots.iter().zip(seen.iter()).enumerate() {
                let Some(t) = slot else { continue };
                if taken || t.class != det.class {
                    continue;
                }
                let o = iou(&t.bbox, &det.bbox);
                if o < cfg.iou_threshold {
                    continue;
                }
                let mut sim = o;
                if let (Some(x), true) = (feat, t.has_feature && cfg.feature_weight > 0.0)
                    && let Some(f) = self.features.get(s * d..(s + 1) * d)
                {
                    let c = dot(f, x) * inv_norm(x);
                    if c.is_finite() {
                        sim += cfg.feature_weight * c;
                    }
                }
                if best.is_none_or(|(_, b)| sim > b) {
                    best = Some((s, sim));
                }
            }
            let s = match best {
                Some((s, _)) => {
                    up.matched += 1;
                    s
                }
                None => match self.slots.iter().position(Option::is_none) {
                    Some(s) => {
                        up.created += 1;
                        s
                    }
                    None => {
                        up.dropped += 1;
                        continue;
                    }
                },
            };
            if let Some(seen) = seen.get_mut(s) {
                *seen = true;
            }
            let mut t = match self.slots.get(s).copied().flatten() {
                Some(mut t) => {
                    t.hits = t.hits.saturating_add(1);
                    t.misses = 0;
                    t.age = t.age.saturating_add(1);
                    t
                }
                None => Track {
                    id: Object::UNTRACKED,
                    bbox: det.bbox,
                    class: det.class,
                    score: det.score,
                    hits: 1,
                    misses: 0,
                    age: 1,
                    has_feature: false,
                },
            };
            t.bbox = det.bbox;
            t.class = det.class;
            t.score = det.score;
            if !t.is_confirmed() && t.hits >= cfg.min_hits {
                t.id = self.next_id;
                self.next_id = self.next_id.checked_add(1).unwrap_or(1);
                up.confirmed += 1;
            }
            // Feature moving average (unit length).
            if let (Some(x), Some(f)) = (feat, self.features.get_mut(s * d..(s + 1) * d)) {
                let xs = inv_norm(x);
                let m = if t.has_feature { cfg.feature_momentum } else { 0.0 };
                for (f, &x) in f.iter_mut().zip(x) {
                    *f = m * *f + (1.0 - m) * x * xs;
                }
                t.has_feature = normalize(f);
            }
            if let Some(slot) = self.slots.get_mut(s) {
                *slot = Some(t);
            }
        }
        // Unmatched tracks age; tentative ones and the long-missing go.
        for (slot, &taken) in self.slots.iter_mut().zip(seen.iter()) {
            let Some(t) = slot else { continue };
            if taken {
                continue;
            }
            t.misses = t.misses.saturating_add(1);
            t.age = t.age.saturating_add(1);
            if !t.is_confirmed() || t.misses >= cfg.max_misses.max(1) {
                *slot = None;
                up.removed += 1;
            }
        }
        Ok(up)
    }

    /// Fills `frame` with the confirmed tracks matched in the last update (`misses == 0`),
    /// boxes mapped by `map`, by descending score (ties: ascending id). Clears `frame` first;
    /// sets [`Frame::overflow`] when more than [`MAX_OBJECTS`](crate::wire::MAX_OBJECTS) qualify (the best are kept).
    /// Returns the number of qualifying tracks.
    pub fn fill_frame(&self, map: &BoxMap, frame: &mut Frame) -> usize {
        frame.objects.clear();
        frame.overflow = false;
        let mut order = [0usize; T];
        let mut n = 0usize;
        for (s, slot) in self.slots.iter().enumerate() {
            if slot.is_some_and(|t| t.is_confirmed() && t.misses == 0)
                && let Some(o) = order.get_mut(n)
            {
                *o = s;
                n += 1;
            }
        }
        let order = order.get_mut(..n).unwrap_or_default();
        let track = |s: usize| self.slots.get(s).copied().flatten();
        order.sort_unstable_by(|&a, &b| match (track(a), track(b)) {
            (Some(a), Some(b)) => a
                .score
                .is_nan()
                .cmp(&b.score.is_nan())
                .then_with(|| b.score.total_cmp(&a.score))
                .then_with(|| a.id.cmp(&b.id)),
            _ => a.cmp(&b),
        });
        for &s in order.iter() {
            if let Some(t) = track(s)
                && frame.push(t.to_object(map)).is_err()
            {
                break;
            }
        }
        n
    }
}
