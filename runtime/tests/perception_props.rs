//! Property and behaviour tests of the no_std perception core (issue 6): NMS, detection
//! decoding, the tracker, connected components, clustering and mean shift.
//!
//! Needs no crate feature, so it also runs under `--no-default-features` (the core is the
//! same code with and without `std`).

use flsl_runtime::perception::cluster::{
    KMeansConfig, KMeansScratch, argmax_labels, kmeans_labels, prototype_labels,
};
use flsl_runtime::perception::decode::{HeadDims, decode};
use flsl_runtime::perception::meanshift::{MeanShiftConfig, MeanShiftScratch, refine};
use flsl_runtime::perception::nms::nms;
use flsl_runtime::perception::segments::{SegmentScratch, mean_features, segments};
use flsl_runtime::perception::{
    BoxMap, Detection, FrameInput, LabelSource, NO_LABEL, Perception, PerceptionConfig,
    PerceptionDims, PerceptionError, Segment, Tracker, TrackerConfig, iou,
};
use flsl_runtime::wire::{Frame, Object};
use proptest::prelude::*;

// ---------------------------------------------------------------- strategies

/// Any f32 with the special values over-represented.
fn wild_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        3 => 0.0f32..1.0,
        1 => Just(f32::NAN),
        1 => Just(f32::INFINITY),
        1 => Just(f32::NEG_INFINITY),
        1 => any::<u32>().prop_map(f32::from_bits),
        1 => -10.0f32..10.0,
    ]
}

/// Detections on a coarse grid (so that many overlap), some with special scores.
fn any_det() -> impl Strategy<Value = Detection> {
    let score = prop_oneof![
        6 => 0.0f32..1.0,
        1 => Just(f32::NAN),
        1 => Just(0.5f32),
        1 => any::<u32>().prop_map(f32::from_bits),
    ];
    (0u8..8, 0u8..8, 1u8..6, 1u8..6, score, 0u16..3).prop_map(|(x, y, w, h, score, class)| {
        let (x, y) = (f32::from(x) * 4.0, f32::from(y) * 4.0);
        Detection { bbox: [x, y, x + f32::from(w) * 4.0, y + f32::from(h) * 4.0], score, class }
    })
}

fn bits(d: &Detection) -> ([u32; 4], u32, u16) {
    (d.bbox.map(f32::to_bits), d.score.to_bits(), d.class)
}

// ---------------------------------------------------------------- NMS

proptest! {
    #[test]
    fn nms_properties(input in prop::collection::vec(any_det(), 0..40), thr in 0.0f32..=1.0) {
        let mut dets = input.clone();
        let kept = nms(&mut dets, thr);
        prop_assert!(kept <= input.len());
        let out = &dets[..kept];

        // A permutation of the input (so the kept ones are a subset of it).
        let mut a: Vec<_> = input.iter().map(bits).collect();
        let mut b: Vec<_> = dets.iter().map(bits).collect();
        a.sort_unstable();
        b.sort_unstable();
        prop_assert_eq!(a, b);

        // Sorted by descending score, no NaN kept.
        prop_assert!(out.iter().all(|d| !d.score.is_nan()));
        prop_assert!(out.windows(2).all(|w| w[0].score >= w[1].score));
        // No kept same-class pair above the threshold.
        for (i, p) in out.iter().enumerate() {
            for q in &out[i + 1..] {
                prop_assert!(p.class != q.class || iou(&p.bbox, &q.bbox) <= thr,
                    "kept {p:?} and {q:?} overlap");
            }
        }
        // Every dropped detection with a score was suppressed by a better kept one.
        for s in &dets[kept..] {
            if s.score.is_nan() { continue; }
            prop_assert!(out.iter().any(|k| k.class == s.class && k.score >= s.score
                && iou(&k.bbox, &s.bbox) > thr), "{s:?} dropped without a suppressor");
        }
        // Idempotent.
        let mut again = out.to_vec();
        let kept2 = nms(&mut again, thr);
        prop_assert_eq!(kept2, kept);
        prop_assert_eq!(again.iter().map(bits).collect::<Vec<_>>(), out.iter().map(bits).collect::<Vec<_>>());
    }

    #[test]
    fn nms_handles_any_values(
        input in prop::collection::vec(
            (any::<[u32; 4]>(), any::<u32>(), 0u16..2).prop_map(|(b, s, class)| Detection {
                bbox: b.map(f32::from_bits), score: f32::from_bits(s), class }),
            0..24),
        thr in any::<u32>().prop_map(f32::from_bits),
    ) {
        let mut dets = input.clone();
        let kept = nms(&mut dets, thr);
        prop_assert!(kept <= input.len());
        prop_assert!(dets[..kept].iter().all(|d| !d.score.is_nan()));
    }
}

#[test]
fn nms_suppresses_same_class_only() {
    let d =
        |x: f32, score: f32, class: u16| Detection { bbox: [x, 0.0, x + 10.0, 10.0], score, class };
    let mut dets = [d(1.0, 0.8, 0), d(0.0, 0.9, 0), d(0.0, 0.7, 1), d(50.0, f32::NAN, 0)];
    let kept = nms(&mut dets, 0.5);
    assert_eq!(kept, 2);
    assert_eq!(dets[0], d(0.0, 0.9, 0));
    assert_eq!(dets[1], d(0.0, 0.7, 1));
}

// ---------------------------------------------------------------- decoding

proptest! {
    #[test]
    fn decode_never_panics_and_boxes_are_finite(
        classes in 1usize..4, hs in 1usize..7, ws in 1usize..7,
        heat_extra in -2i32..3, box_extra in -2i32..3,
        values in prop::collection::vec(wild_f32(), 0..400),
        thr in prop_oneof![0.0f32..1.0, Just(f32::NAN), Just(-1.0f32)],
        cap in 0usize..10,
        stride in prop_oneof![Just(8.0f32), Just(0.0f32), Just(f32::INFINITY)],
    ) {
        let hlen = (classes * hs * ws) as i32 + heat_extra;
        let blen = (4 * hs * ws) as i32 + box_extra;
        prop_assume!(hlen >= 0 && blen >= 0);
        let at = |i: usize| values.get(i % values.len().max(1)).copied().unwrap_or(0.5);
        let heat: Vec<f32> = (0..hlen as usize).map(at).collect();
        let boxes: Vec<f32> = (0..blen as usize).map(|i| at(i + 7)).collect();
        let dims = HeadDims::new(classes, hs, ws, stride);
        let mut out = vec![Detection::EMPTY; cap];
        let r = decode(&heat, &boxes, &dims, thr, &mut out);
        let valid = heat_extra == 0 && box_extra == 0 && thr.is_finite() && stride == 8.0;
        prop_assert_eq!(r.is_ok(), valid, "{:?}", r);
        if let Ok(count) = r {
            prop_assert!(count.written == count.found.min(cap));
            let out = &out[..count.written];
            for d in out {
                prop_assert!(d.bbox.iter().all(|c| c.is_finite()), "{d:?}");
                prop_assert!(d.bbox[0] <= d.bbox[2] && d.bbox[1] <= d.bbox[3]);
                prop_assert!(d.score.is_finite() && d.score >= thr);
                prop_assert!((d.class as usize) < classes);
            }
            prop_assert!(out.windows(2).all(|w| w[0].score >= w[1].score));
        }
    }
}

#[test]
fn decode_follows_the_contract() {
    // 2 classes, 4x5 cells at stride 8.
    let (hs, ws, s) = (4, 5, 8.0);
    let plane = hs * ws;
    let mut heat = vec![0.0f32; 2 * plane];
    let mut boxes = vec![0.0f32; 4 * plane];
    heat[2 * ws + 3] = 0.9; // class 0 at (x 3, y 2)
    heat[2 * ws + 2] = 0.5; // its neighbour: not a peak
    heat[plane] = 0.6; // class 1 at (0, 0)
    heat[plane + ws + 4] = f32::NAN; // ignored
    let c = 2 * ws + 3;
    boxes[c] = 0.25; // dx
    boxes[plane + c] = 0.5; // dy
    boxes[2 * plane + c] = 2.0; // w (cells)
    boxes[3 * plane + c] = 1.0; // h
    boxes[2 * plane] = -1.0; // class 1 peak has a negative width: skipped
    let dims = HeadDims::new(2, hs, ws, s);
    let mut out = [Detection::EMPTY; 4];
    let count = decode(&heat, &boxes, &dims, 0.3, &mut out).unwrap();
    assert_eq!((count.written, count.found), (1, 1));
    let (cx, cy) = ((3.0 + 0.25) * s, (2.0 + 0.5) * s);
    assert_eq!(out[0].bbox, [cx - 8.0, cy - 4.0, cx + 8.0, cy + 4.0]);
    assert_eq!((out[0].score, out[0].class), (0.9, 0));

    // Capacity: three peaks, room for two -> the best two, found = 3.
    let mut heat = vec![0.0f32; plane];
    heat[0] = 0.4;
    heat[4] = 0.8;
    heat[3 * ws + 2] = 0.6;
    let boxes = vec![1.0f32; 4 * plane];
    let mut out = [Detection::EMPTY; 2];
    let count = decode(&heat, &boxes, &HeadDims::new(1, hs, ws, s), 0.3, &mut out).unwrap();
    assert_eq!((count.written, count.found), (2, 3));
    assert!(count.overflowed());
    assert_eq!((out[0].score, out[1].score), (0.8, 0.6));

    // Mapping to frame pixels: 224x224 input from a 640x480 frame.
    let map = BoxMap::stretch(224, 224, 640, 480);
    let m = out[0].mapped(&map);
    assert!((m.bbox[0] - out[0].bbox[0] * 640.0 / 224.0).abs() < 1e-4);
    assert!((m.bbox[3] - out[0].bbox[3] * 480.0 / 224.0).abs() < 1e-4);
}

// ---------------------------------------------------------------- tracker

/// Non-overlapping boxes: object `i` in its own 40-pixel column.
fn scene(n: usize, sizes: &[(f32, f32)]) -> Vec<Detection> {
    (0..n)
        .map(|i| {
            let (w, h) = sizes[i % sizes.len()];
            let x = i as f32 * 40.0;
            Detection {
                bbox: [x, 10.0, x + w, 10.0 + h],
                score: 0.5 + i as f32 * 0.01,
                class: (i % 2) as u16,
            }
        })
        .collect()
}

proptest! {
    #[test]
    fn tracker_ids_are_stable_on_a_static_scene(
        n in 1usize..8,
        sizes in prop::collection::vec((5.0f32..35.0, 5.0f32..60.0), 1..4),
        with_features in any::<bool>(),
    ) {
        let dets = scene(n, &sizes);
        let cfg = TrackerConfig::DEFAULT;
        let d = 6;
        let mut store = vec![0.0f32; 8 * d];
        let feats: Vec<f32> = (0..n * d).map(|i| ((i * 7919) % 13) as f32 - 6.0).collect();
        let mut tracker = if with_features {
            Tracker::<8>::with_features(cfg, d, &mut store).unwrap()
        } else {
            Tracker::<8>::new(cfg).unwrap()
        };
        let mut first: Option<Vec<u32>> = None;
        for frame in 0..50 {
            let up = tracker.update(&dets, with_features.then_some(&feats[..])).unwrap();
            prop_assert_eq!(up.dropped, 0);
            // Map each detection to the id of the track on its box.
            let ids: Vec<u32> = dets.iter().map(|det| {
                tracker.tracks().find(|t| t.bbox == det.bbox).map_or(u32::MAX, |t| t.id)
            }).collect();
            if frame + 1 < cfg.min_hits as usize {
                prop_assert!(ids.iter().all(|&id| id == Object::UNTRACKED));
                continue;
            }
            match &first {
                None => {
                    // Confirmed together: ids 1..=n, distinct.
                    let mut sorted = ids.clone();
                    sorted.sort_unstable();
                    prop_assert_eq!(sorted, (1..=n as u32).collect::<Vec<_>>());
                    first = Some(ids);
                }
                Some(f) => prop_assert_eq!(f, &ids, "frame {}", frame),
            }
            prop_assert_eq!(tracker.tracks().count(), n);
        }
    }

    #[test]
    fn tracker_follows_a_moving_object(
        w in 10.0f32..80.0, h in 10.0f32..80.0,
        steps in prop::collection::vec((-1.0f32..=1.0, -1.0f32..=1.0), 60),
    ) {
        let mut tracker = Tracker::<4>::new(TrackerConfig::DEFAULT).unwrap();
        let mut b = [100.0, 100.0, 100.0 + w, 100.0 + h];
        let mut id = None;
        for (i, (sx, sy)) in steps.iter().enumerate() {
            let next = {
                let (dx, dy) = (sx * w / 6.0, sy * h / 6.0);
                [b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy]
            };
            prop_assert!(iou(&b, &next) >= 0.5);
            b = next;
            let det = Detection { bbox: b, score: 0.9, class: 0 };
            tracker.update(&[det], None).unwrap();
            prop_assert_eq!(tracker.tracks().count(), 1);
            let t = *tracker.tracks().next().unwrap();
            if i + 1 >= TrackerConfig::DEFAULT.min_hits as usize {
                prop_assert!(t.is_confirmed());
                prop_assert_eq!(*id.get_or_insert(t.id), t.id);
            }
        }
        prop_assert_eq!(id, Some(1));
    }
}

#[test]
fn tracker_lifecycle_and_wire_frame() {
    let cfg = TrackerConfig { min_hits: 2, max_misses: 3, ..TrackerConfig::DEFAULT };
    let mut tracker = Tracker::<2>::new(cfg).unwrap();
    let a = Detection { bbox: [0.0, 0.0, 10.0, 10.0], score: 0.6, class: 0 };
    let b = Detection { bbox: [50.0, 0.0, 60.0, 10.0], score: 0.9, class: 1 };
    let c = Detection { bbox: [100.0, 0.0, 110.0, 10.0], score: 0.7, class: 0 };
    let up = tracker.update(&[a, b, c], None).unwrap();
    assert_eq!((up.created, up.dropped), (2, 1), "capacity 2");
    let up = tracker.update(&[a, b], None).unwrap();
    assert_eq!((up.matched, up.confirmed), (2, 2));
    let mut frame = Frame::new();
    let map = BoxMap::normalized(200, 100);
    assert_eq!(tracker.fill_frame(&map, &mut frame), 2);
    assert_eq!(frame.objects[0].score, 0.9, "by descending score");
    let want = [0.25, 0.0, 0.3, 0.1];
    assert!(frame.objects[0].bbox.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6));
    assert_eq!(frame.objects[0].track_id, 2);
    assert_eq!(frame.objects[1].track_id, 1);
    assert!(!frame.overflow);
    // `a` disappears: coasting for 2 frames, removed at the 3rd miss.
    for miss in 1..=3u32 {
        let up = tracker.update(&[b], None).unwrap();
        let alive = tracker.tracks().any(|t| t.id == 1);
        assert_eq!(alive, miss < 3, "miss {miss}");
        assert_eq!(up.removed, usize::from(miss == 3));
    }
    // A new object gets the next id, never a reused one.
    tracker.update(&[a, b], None).unwrap();
    tracker.update(&[a, b], None).unwrap();
    let ids: Vec<u32> = tracker.tracks().map(|t| t.id).collect();
    assert!(ids.contains(&3) && ids.contains(&2), "{ids:?}");
    // Errors, not panics.
    assert!(matches!(tracker.update(&[a], Some(&[1.0])), Err(PerceptionError::Param { .. })));
}

// ---------------------------------------------------------------- connected components

proptest! {
    #[test]
    fn components_partition_the_grid(
        gh in 1usize..12, gw in 1usize..12,
        raw in prop::collection::vec(0u32..4, 144),
        cap in 0usize..40,
    ) {
        let n = gh * gw;
        let labels: Vec<u32> = raw[..n].iter().map(|&l| if l == 3 { NO_LABEL } else { l }).collect();
        let mut seg_of = vec![0u32; n];
        let mut stack = vec![0u32; n];
        let mut out = vec![Segment::EMPTY; cap];
        let count = segments(&labels, gh, gw, 16.0,
            SegmentScratch { seg_of: &mut seg_of, stack: &mut stack }, &mut out).unwrap();
        prop_assert_eq!(count.written, count.found.min(cap));
        // Every patch is in exactly one segment, with an id below `found`.
        prop_assert!(seg_of.iter().all(|&s| (s as usize) < count.found));
        let mut areas = vec![0u32; count.found];
        for &s in &seg_of { areas[s as usize] += 1; }
        prop_assert!(areas.iter().all(|&a| a > 0));
        prop_assert_eq!(areas.iter().sum::<u32>() as usize, n);
        // 4-neighbours: same label <=> same segment.
        for y in 0..gh {
            for x in 0..gw {
                let i = y * gw + x;
                for j in [(x + 1 < gw).then_some(i + 1), (y + 1 < gh).then_some(i + gw)].into_iter().flatten() {
                    prop_assert_eq!(labels[i] == labels[j], seg_of[i] == seg_of[j]);
                }
            }
        }
        // Written segments: label, area and tight boxes agree with the id map.
        for (id, seg) in out[..count.written].iter().enumerate() {
            prop_assert_eq!(seg.area, areas[id]);
            let cells: Vec<(usize, usize)> = (0..n).filter(|&i| seg_of[i] as usize == id)
                .map(|i| (i % gw, i / gw)).collect();
            prop_assert!(cells.iter().all(|&(x, y)| labels[y * gw + x] == seg.label));
            let x0 = cells.iter().map(|c| c.0).min().unwrap() as u32;
            let x1 = cells.iter().map(|c| c.0).max().unwrap() as u32 + 1;
            let y0 = cells.iter().map(|c| c.1).min().unwrap() as u32;
            let y1 = cells.iter().map(|c| c.1).max().unwrap() as u32 + 1;
            prop_assert_eq!(seg.cells, [x0, y0, x1, y1]);
            prop_assert_eq!(seg.bbox, [x0, y0, x1, y1].map(|c| c as f32 * 16.0));
        }
        if cap >= count.found {
            prop_assert_eq!(out[..count.written].iter().map(|s| s.area).sum::<u32>() as usize, n);
        }
    }
}

#[test]
fn segments_report_shape_errors() {
    let mut seg_of = vec![0u32; 4];
    let mut stack = vec![0u32; 3];
    let r = segments(
        &[0; 4],
        2,
        2,
        16.0,
        SegmentScratch { seg_of: &mut seg_of, stack: &mut stack },
        &mut [],
    );
    assert_eq!(r, Err(PerceptionError::Shape { what: "scratch.stack", expected: 4, got: 3 }));
}

#[test]
fn segment_mean_features_skip_invalid_rows() {
    // 1x3 grid, labels 0 0 1; the second row of segment 0 is NaN.
    let feats = [1.0, 2.0, f32::NAN, 0.0, 5.0, 6.0];
    let seg_of = [0u32, 0, 1];
    let mut counts = [0u32; 2];
    let mut out = [9.0f32; 4];
    mean_features(&feats, 2, &seg_of, 2, &mut counts, &mut out).unwrap();
    assert_eq!(out, [1.0, 2.0, 5.0, 6.0]);
}

// ---------------------------------------------------------------- clustering

#[test]
fn argmax_labels_define_nan_rows() {
    let nan = f32::NAN;
    let logits = [
        0.1,
        0.5,
        0.5, // tie -> lowest index
        nan,
        nan,
        nan, // all NaN -> NO_LABEL
        nan,
        -1.0,
        -2.0, // NaN never wins
        0.0,
        f32::INFINITY,
        1.0, // inf wins
    ];
    let mut labels = [7u32; 4];
    argmax_labels(&logits, 4, 3, &mut labels).unwrap();
    assert_eq!(labels, [1, NO_LABEL, 1, 1]);
    assert!(matches!(
        argmax_labels(&logits, 4, 2, &mut labels),
        Err(PerceptionError::Shape { .. })
    ));
}

proptest! {
    #[test]
    fn clustering_never_panics(
        n in 1usize..20, d in 1usize..6, k in 1usize..5,
        values in prop::collection::vec(wild_f32(), 120),
        iters in 0usize..4,
    ) {
        let feats: Vec<f32> = (0..n * d).map(|i| values[i % values.len()]).collect();
        let protos: Vec<f32> = (0..k * d).map(|i| values[(i * 7 + 3) % values.len()]).collect();
        let mut labels = vec![0u32; n];
        let ok = |l: &[u32], k: usize| l.iter().all(|&l| l == NO_LABEL || (l as usize) < k);

        argmax_labels(&feats, n, d, &mut labels).unwrap();
        prop_assert!(ok(&labels, d));

        let mut proto_inv = vec![0.0; k];
        prototype_labels(&feats, &protos, n, d, k, &mut proto_inv, &mut labels).unwrap();
        prop_assert!(ok(&labels, k));

        let (mut c, mut cnt, mut rows) = (vec![0.0; k * d], vec![0u32; k], vec![0.0; 2 * n]);
        let used = kmeans_labels(&feats, n, d, &KMeansConfig::new(k, iters),
            KMeansScratch { centroids: &mut c, counts: &mut cnt, rows: &mut rows }, &mut labels).unwrap();
        prop_assert!(used <= k);
        prop_assert!(ok(&labels, used));
        prop_assert!(c.iter().all(|v| v.is_finite()));

        let mut out = vec![0.0; n * d];
        let (mut lg, mut inv) = (vec![0.0; 4 * n], vec![0.0; n]);
        refine(&feats, n, d, &MeanShiftConfig::new(10.0, 2),
            MeanShiftScratch { logits: &mut lg, inv_norms: &mut inv }, &mut out).unwrap();
        prop_assert!(out.iter().all(|v| v.is_finite()));
        for r in out.chunks(d) {
            let norm: f32 = r.iter().map(|v| v * v).sum();
            prop_assert!(norm == 0.0 || (norm - 1.0).abs() < 1e-4, "norm^2 {}", norm);
        }
    }
}

#[test]
fn kmeans_splits_two_groups_deterministically() {
    // Two directions with small perturbations, interleaved.
    let d = 4;
    let n = 12;
    let feats: Vec<f32> = (0..n)
        .flat_map(|i| {
            let e = i as f32 * 0.01;
            if i % 2 == 0 { [1.0, e, 0.0, 0.0] } else { [0.0, 0.0, 3.0, e] }
        })
        .collect();
    let mut labels = vec![0u32; n];
    let (mut c, mut cnt, mut rows) = (vec![0.0; 3 * d], vec![0u32; 3], vec![0.0; 2 * n]);
    let used = kmeans_labels(
        &feats,
        n,
        d,
        &KMeansConfig::new(2, 10),
        KMeansScratch { centroids: &mut c, counts: &mut cnt, rows: &mut rows },
        &mut labels,
    )
    .unwrap();
    assert_eq!(used, 2);
    let expect: Vec<u32> = (0..n as u32).map(|i| i % 2).collect();
    assert_eq!(labels, expect, "patch 0 seeds cluster 0");
}

// ---------------------------------------------------------------- mean shift

/// The operator in f64, straight from the formula.
fn refine_f64(x: &[f32], n: usize, d: usize, t: f64, iters: usize) -> Vec<f64> {
    let unit = |r: &[f64]| {
        let s = r.iter().map(|v| v * v).sum::<f64>().sqrt();
        r.iter().map(|v| v / s).collect::<Vec<f64>>()
    };
    let valid: Vec<bool> = x.chunks(d).map(|r| r.iter().all(|v| v.is_finite())).collect();
    let keys: Vec<Vec<f64>> = x
        .chunks(d)
        .zip(&valid)
        .filter(|(_, v)| **v)
        .map(|(r, _)| unit(&r.iter().map(|&v| f64::from(v)).collect::<Vec<_>>()))
        .collect();
    let mut y: Vec<Vec<f64>> = x
        .chunks(d)
        .zip(&valid)
        .map(|(r, v)| {
            if *v {
                unit(&r.iter().map(|&v| f64::from(v)).collect::<Vec<_>>())
            } else {
                vec![0.0; d]
            }
        })
        .collect();
    for _ in 0..iters {
        for yi in y.iter_mut().zip(&valid).filter(|(_, v)| **v).map(|(y, _)| y) {
            let logits: Vec<f64> = keys
                .iter()
                .map(|k| t * k.iter().zip(yi.iter()).map(|(a, b)| a * b).sum::<f64>())
                .collect();
            let m = logits.iter().cloned().fold(f64::MIN, f64::max);
            let w: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
            let z: f64 = w.iter().sum();
            let mut acc = vec![0.0; d];
            for (wj, k) in w.iter().zip(&keys) {
                for (a, kv) in acc.iter_mut().zip(k) {
                    *a += wj / z * kv;
                }
            }
            *yi = unit(&acc);
        }
    }
    let _ = n;
    y.concat()
}

fn run_refine(x: &[f32], n: usize, d: usize, t: f32, iters: usize) -> Vec<f32> {
    let mut out = vec![0.0; n * d];
    let (mut lg, mut inv) = (vec![0.0; 4 * n], vec![0.0; n]);
    refine(
        x,
        n,
        d,
        &MeanShiftConfig::new(t, iters),
        MeanShiftScratch { logits: &mut lg, inv_norms: &mut inv },
        &mut out,
    )
    .unwrap();
    out
}

#[test]
fn meanshift_matches_the_formula_and_multiplies_by_the_temperature() {
    let (n, d) = (12, 5);
    let x: Vec<f32> = (0..n * d)
        .map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.3 + if i % d == 0 { 2.0 } else { 0.0 })
        .collect();
    for (t, iters) in [(3.0, 1), (3.0, 3), (25.0, 2)] {
        let got = run_refine(&x, n, d, t, iters);
        let want = refine_f64(&x, n, d, f64::from(t), iters);
        for (g, w) in got.iter().zip(&want) {
            assert!((f64::from(*g) - w).abs() < 1e-5, "t {t}: {g} vs {w}");
        }
    }
    // Blocks of 4 queries plus a tail, D with a tail of lanes, an invalid row mid-block.
    let (n2, d2) = (11, 19);
    let mut x2: Vec<f32> = (0..n2 * d2).map(|i| ((i * 53 % 29) as f32 - 14.0) * 0.1).collect();
    x2[5 * d2 + 3] = f32::NAN;
    let got = run_refine(&x2, n2, d2, 6.0, 2);
    let want = refine_f64(&x2, n2, d2, 6.0, 2);
    assert!(got[5 * d2..6 * d2].iter().all(|&v| v == 0.0), "invalid row -> zeros");
    for (g, w) in got.iter().zip(&want) {
        assert!((f64::from(*g) - w).abs() < 1e-5, "{g} vs {w}");
    }

    // temperature 0: uniform weights, every row becomes the normalized mean of the unit rows
    // (a divided temperature would blow up here instead).
    let got = run_refine(&x, n, d, 0.0, 1);
    let want = refine_f64(&x, n, d, 0.0, 1);
    for r in got.chunks(d) {
        for (g, w) in r.iter().zip(&want[..d]) {
            assert!((f64::from(*g) - w).abs() < 1e-5);
        }
    }
    // A very large temperature keeps every patch at itself.
    let got = run_refine(&x, n, d, 1e4, 3);
    let unit = refine_f64(&x, n, d, 0.0, 0);
    for (g, w) in got.iter().zip(&unit) {
        assert!((f64::from(*g) - w).abs() < 1e-5);
    }
}

#[test]
fn meanshift_rejects_bad_parameters() {
    let x = [1.0f32; 6];
    let mut out = [0.0; 6];
    let (mut lg, mut inv) = ([0.0; 12], [0.0; 3]);
    for t in [f32::NAN, -1.0, f32::INFINITY] {
        let r = refine(
            &x,
            3,
            2,
            &MeanShiftConfig::new(t, 1),
            MeanShiftScratch { logits: &mut lg, inv_norms: &mut inv },
            &mut out,
        );
        assert!(matches!(r, Err(PerceptionError::Param { .. })));
    }
    let r = refine(
        &x,
        3,
        2,
        &MeanShiftConfig::DEFAULT,
        MeanShiftScratch { logits: &mut lg[..11], inv_norms: &mut inv },
        &mut out,
    );
    assert!(matches!(r, Err(PerceptionError::Shape { what: "scratch.logits", .. })));
}

// ---------------------------------------------------------------- the pipeline

#[test]
fn perception_pipeline_end_to_end() {
    let (gh, gw, d, k) = (6usize, 6usize, 8usize, 4usize);
    let n = gh * gw;
    // Left half direction 0, right half direction 1 (with noise), logits to match.
    let feats: Vec<f32> = (0..n)
        .flat_map(|i| {
            let right = i % gw >= gw / 2;
            (0..d).map(move |j| {
                let base = if (j == 0 && !right) || (j == 1 && right) { 3.0 } else { 0.0 };
                base + ((i * 31 + j * 7) % 11) as f32 * 0.02
            })
        })
        .collect();
    let logits: Vec<f32> = (0..n)
        .flat_map(|i| {
            let right = i % gw >= gw / 2;
            [0.0, if right { 0.0 } else { 5.0 }, if right { 5.0 } else { 0.0 }, 0.0]
        })
        .collect();
    let (hs, ws) = (12, 12);
    let mut heat = vec![0.0f32; hs * ws];
    heat[3 * ws + 3] = 0.9;
    heat[3 * ws + 5] = 0.85; // a duplicate two cells away (IoU 0.6): NMS removes it
    let mut boxes = vec![0.0f32; 4 * hs * ws];
    for c in [3 * ws + 3, 3 * ws + 5] {
        boxes[2 * hs * ws + c] = 8.0;
        boxes[3 * hs * ws + c] = 8.0;
    }
    let dims =
        PerceptionDims { gh, gw, d, k, patch_px: 16.0, head: Some(HeadDims::new(1, hs, ws, 8.0)) };
    let config = PerceptionConfig { kmeans: KMeansConfig::new(2, 10), ..PerceptionConfig::DEFAULT };
    let sizes = Perception::<8, 8, 4>::scratch_sizes(&dims, &config).unwrap();
    let mut f32s = vec![0.0; sizes.f32s];
    let mut u32s = vec![0; sizes.u32s];
    let mut p = Perception::<8, 8, 4>::new(dims, config, &mut f32s, &mut u32s).unwrap();
    let mut frame = Frame::new();
    for source in [
        LabelSource::Logits(&logits),
        LabelSource::KMeans,
        LabelSource::Prototypes(&[
            1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0,
        ]),
    ] {
        let input =
            FrameInput { features: &feats, labels: source, detections: Some((&heat, &boxes)) };
        let report = p.process_frame(&input).unwrap();
        assert_eq!(report.segments.found, 2, "{source:?}: two halves");
        assert_eq!(p.segments().iter().map(|s| s.area).sum::<u32>(), n as u32);
        assert_eq!(p.segments()[0].cells, [0, 0, 3, 6]);
        assert_eq!((report.decoded.found, report.detections), (2, 1));
        let f0 = p.segment_feature(0).unwrap();
        assert!(f0[0] > f0[1], "left segment points along axis 0");
    }
    // Confirmed after min_hits = 3 frames.
    let n_obj = p.fill_frame(&BoxMap::normalized(96, 96), &mut frame);
    assert_eq!(n_obj, 1);
    assert_eq!(frame.objects[0].track_id, 1);
    assert_eq!(frame.objects[0].class, 0);

    // Wrong shapes are errors, not panics.
    let bad = FrameInput { features: &feats[1..], labels: LabelSource::KMeans, detections: None };
    assert!(matches!(p.process_frame(&bad), Err(PerceptionError::Shape { what: "features", .. })));
    let bad = FrameInput {
        features: &feats,
        labels: LabelSource::Logits(&logits[1..]),
        detections: None,
    };
    assert!(p.process_frame(&bad).is_err());
    let bad = FrameInput {
        features: &feats,
        labels: LabelSource::KMeans,
        detections: Some((&heat[1..], &boxes)),
    };
    assert!(matches!(p.process_frame(&bad), Err(PerceptionError::Shape { what: "heatmap", .. })));
    // Short scratch.
    let mut small = vec![0.0; sizes.f32s - 1];
    let mut u = vec![0; sizes.u32s];
    assert!(matches!(
        Perception::<8, 8, 4>::new(dims, config, &mut small, &mut u),
        Err(PerceptionError::Shape { .. })
    ));
}
