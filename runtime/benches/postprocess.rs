//! The perception post-process per frame on a 14x14 patch grid (issue 6; target < 1 ms for the
//! whole post-process), and each stage on its own at D = 384.
//!
//! `cargo bench -p flsl-runtime --bench postprocess`
//! (or the built binary: `target/release/deps/postprocess-* --bench`).
//!
//! Frames are synthetic but shaped like a real one (`tests/perception_fixture`, shared with
//! the allocation test).

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use flsl_runtime::perception::cluster::{
    KMeansConfig, KMeansScratch, argmax_labels, kmeans_labels, prototype_labels,
};
use flsl_runtime::perception::decode::{HeadDims, decode};
use flsl_runtime::perception::meanshift::{MeanShiftConfig, MeanShiftScratch, refine};
use flsl_runtime::perception::nms::nms;
use flsl_runtime::perception::segments::{SegmentScratch, mean_features, segments};
use flsl_runtime::perception::{
    Detection, FrameInput, LabelSource, Perception, PerceptionConfig, PerceptionDims, Segment,
    Tracker, TrackerConfig,
};
use std::hint::black_box;

#[path = "../tests/perception_fixture/mod.rs"]
mod perception_fixture;
use perception_fixture::{GH, GW, HS, K, Lcg, N, Synthetic, WS};

/// The shared synthetic frame (frame 0) with `d`-wide features.
fn synthetic(d: usize) -> Synthetic {
    perception_fixture::synthetic(0, d)
}

fn dims(d: usize) -> PerceptionDims {
    PerceptionDims {
        gh: GH,
        gw: GW,
        d,
        k: K,
        patch_px: 16.0,
        head: Some(HeadDims::new(1, HS, WS, 8.0)),
    }
}

type P<'a> = Perception<'a, 64, 64, 32>;

/// The whole post-process (labels from `prototype_logits`, k-means or prototypes;
/// segments, mean features, decoding, NMS, tracking with features) per frame.
fn bench_full(c: &mut Criterion) {
    let mut group = c.benchmark_group("postprocess_14x14");
    for d in [192usize, 384] {
        let s = synthetic(d);
        for (name, ms) in [("meanshift3", Some(MeanShiftConfig::DEFAULT)), ("plain", None)] {
            for (lname, labels) in
                [("logits", LabelSource::Logits(&s.logits)), ("kmeans8", LabelSource::KMeans)]
            {
                let config = PerceptionConfig { meanshift: ms, ..PerceptionConfig::DEFAULT };
                let sizes = P::scratch_sizes(&dims(d), &config).expect("valid dims");
                let mut f32s = vec![0.0f32; sizes.f32s];
                let mut u32s = vec![0u32; sizes.u32s];
                let mut p = P::new(dims(d), config, &mut f32s, &mut u32s).expect("scratch");
                let input = FrameInput {
                    features: &s.features,
                    labels,
                    detections: Some((&s.heatmap, &s.boxes)),
                };
                group.bench_function(BenchmarkId::new(format!("d{d}_{name}"), lname), |b| {
                    b.iter(|| p.process_frame(black_box(&input)).expect("valid frame"))
                });
            }
        }
    }
    group.finish();
}

/// Each stage alone, D = 384 (and mean shift at D = 192 too).
fn bench_stages(c: &mut Criterion) {
    let mut group = c.benchmark_group("stages_14x14");
    for d in [192usize, 384] {
        let s = synthetic(d);
        let (mut lg, mut inv) = (vec![0.0; 4 * N], vec![0.0; N]);
        let mut refined = vec![0.0; N * d];
        for iters in [1usize, 3] {
            group.bench_function(format!("meanshift_d{d}_iters{iters}"), |b| {
                b.iter(|| {
                    refine(
                        black_box(&s.features),
                        N,
                        d,
                        &MeanShiftConfig::new(10.0, iters),
                        MeanShiftScratch { logits: &mut lg, inv_norms: &mut inv },
                        &mut refined,
                    )
                    .expect("shapes")
                })
            });
        }
        if d != 384 {
            continue;
        }
        let mut labels = vec![0u32; N];
        group.bench_function("argmax_labels_k64", |b| {
            b.iter(|| argmax_labels(black_box(&s.logits), N, K, &mut labels).expect("shapes"))
        });
        let mut proto_inv = vec![0.0; K];
        group.bench_function(format!("prototype_labels_d{d}_k64"), |b| {
            b.iter(|| {
                prototype_labels(
                    black_box(&s.features),
                    &s.prototypes,
                    N,
                    d,
                    K,
                    &mut proto_inv,
                    &mut labels,
                )
                .expect("shapes")
            })
        });
        let (mut cen, mut cnt, mut rows) = (vec![0.0; 8 * d], vec![0u32; 64], vec![0.0; 2 * N]);
        group.bench_function(format!("kmeans_d{d}_k8_iters10"), |b| {
            b.iter(|| {
                kmeans_labels(
                    black_box(&s.features),
                    N,
                    d,
                    &KMeansConfig::DEFAULT,
                    KMeansScratch { centroids: &mut cen, counts: &mut cnt, rows: &mut rows },
                    &mut labels,
                )
                .expect("shapes")
            })
        });
        argmax_labels(&s.logits, N, K, &mut labels).expect("shapes");
        let (mut seg_of, mut stack) = (vec![0u32; N], vec![0u32; N]);
        let mut segs = vec![Segment::EMPTY; 64];
        let mut seg_feats = vec![0.0; 64 * d];
        group.bench_function(format!("segments_and_mean_features_d{d}"), |b| {
            b.iter(|| {
                let count = segments(
                    black_box(&labels),
                    GH,
                    GW,
                    16.0,
                    SegmentScratch { seg_of: &mut seg_of, stack: &mut stack },
                    &mut segs,
                )
                .expect("shapes");
                mean_features(&s.features, d, &seg_of, count.written, &mut cnt, &mut seg_feats)
                    .expect("shapes")
            })
        });
        let head = HeadDims::new(1, HS, WS, 8.0);
        let mut dets = [Detection::EMPTY; 64];
        group.bench_function("decode_28x28_c1", |b| {
            b.iter(|| {
                decode(black_box(&s.heatmap), &s.boxes, &head, 0.3, &mut dets).expect("shapes")
            })
        });
        // NMS on 64 overlapping candidates.
        let mut rng = Lcg(7);
        let cands: Vec<Detection> = (0..64)
            .map(|_| {
                let (x, y) = (100.0 + 40.0 * rng.next(), 100.0 + 40.0 * rng.next());
                Detection { bbox: [x, y, x + 30.0, y + 30.0], score: rng.next().abs(), class: 0 }
            })
            .collect();
        group.bench_function("nms_64", |b| {
            b.iter(|| {
                let mut v = [Detection::EMPTY; 64];
                v.copy_from_slice(&cands);
                nms(black_box(&mut v), 0.5)
            })
        });
        let frame_dets = &cands[..8];
        let det_feats: Vec<f32> = s.features[..8 * d].to_vec();
        let mut store = vec![0.0; 32 * d];
        let mut tracker =
            Tracker::<32>::with_features(TrackerConfig::DEFAULT, d, &mut store).expect("store");
        group.bench_function(format!("tracker_8dets_d{d}"), |b| {
            b.iter(|| tracker.update(black_box(frame_dets), Some(&det_feats)).expect("shapes"))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_full, bench_stages);
criterion_main!(benches);
