//! Cluster-map mIoU with Hungarian matching: hand-computed cases.

use flsl_runtime::eval::{ClusterEval, EvalError, cluster_miou, hungarian_match};

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-12
}

#[test]
fn permuted_perfect_clustering_scores_one() {
    // 3 classes, clusters are a permutation of the classes (class c -> cluster (c + 1) % 3).
    let gt1: Vec<u32> = vec![0, 0, 1, 1, 2, 2, 2, 0];
    let gt2: Vec<u32> = vec![2, 2, 1, 0];
    let perm = |g: &[u32]| g.iter().map(|&c| (c + 1) % 3).collect::<Vec<u32>>();
    let (p1, p2) = (perm(&gt1), perm(&gt2));
    let r = cluster_miou([(&p1[..], &gt1[..]), (&p2[..], &gt2[..])], 3, 3, None).unwrap();
    assert_eq!(r.miou, 1.0);
    assert_eq!(r.pixel_accuracy, 1.0);
    assert_eq!(r.per_image_miou, 1.0);
    assert_eq!(r.matching.cluster_to_class, vec![Some(2), Some(0), Some(1)]);
    assert_eq!(r.pixels, 12);
}

#[test]
fn constant_clustering() {
    // Classes with 6, 3, 1 pixels, every pixel in cluster 0 of 3: cluster 0 goes to class 0,
    // IoU_0 = 6/10, the other classes get zero-overlap clusters (dropped): IoU 0.
    // mIoU = 0.6 / 3 = 0.2, pixel accuracy 0.6.
    let gt: Vec<u32> = vec![0, 0, 0, 0, 0, 0, 1, 1, 1, 2];
    let pred = vec![0u32; gt.len()];
    let r = cluster_miou([(&pred[..], &gt[..])], 3, 3, None).unwrap();
    assert!(close(r.miou, 0.2), "{r}");
    assert!(close(r.pixel_accuracy, 0.6));
    assert_eq!(r.per_class_iou, vec![Some(0.6), Some(0.0), Some(0.0)]);
    assert_eq!(r.matching.cluster_to_class, vec![Some(0), None, None]);
}

#[test]
fn more_clusters_than_classes() {
    // 2 classes, 4 clusters. Class 0 = 6 pixels split 4/2 over clusters 0 and 1; class 1 =
    // 4 pixels split 3/1 over clusters 2 and 3. Matching: 0 -> class 0, 2 -> class 1; the
    // pixels of clusters 1 and 3 are errors.
    // IoU_0 = 4 / (4 + 6 - 4) = 4/6, IoU_1 = 3 / (3 + 4 - 3) = 3/4; accuracy 7/10.
    let gt: Vec<u32> = vec![0, 0, 0, 0, 0, 0, 1, 1, 1, 1];
    let pred: Vec<u32> = vec![0, 0, 0, 0, 1, 1, 2, 2, 2, 3];
    let r = cluster_miou([(&pred[..], &gt[..])], 4, 2, None).unwrap();
    assert!(close(r.miou, (4.0 / 6.0 + 0.75) / 2.0), "{r}");
    assert!(close(r.pixel_accuracy, 0.7));
    assert_eq!(r.matching.cluster_to_class, vec![Some(0), None, Some(1), None]);
    assert_eq!(r.matching.class_to_cluster, vec![Some(0), Some(2)]);
}

#[test]
fn fewer_clusters_than_classes() {
    // 3 classes (4, 3, 3 pixels), 2 clusters: cluster 0 = class 0 + one pixel of class 2,
    // cluster 1 = class 1 + two pixels of class 2. Matching 0 -> 0 (4), 1 -> 1 (3); class 2
    // is unmatched: IoU 0. IoU_0 = 4/5, IoU_1 = 3/5; mIoU = (0.8 + 0.6 + 0) / 3; acc 7/10.
    let gt: Vec<u32> = vec![0, 0, 0, 0, 1, 1, 1, 2, 2, 2];
    let pred: Vec<u32> = vec![0, 0, 0, 0, 1, 1, 1, 0, 1, 1];
    let r = cluster_miou([(&pred[..], &gt[..])], 2, 3, None).unwrap();
    assert!(close(r.miou, 1.4 / 3.0), "{r}");
    assert!(close(r.pixel_accuracy, 0.7));
    assert_eq!(r.matching.class_to_cluster, vec![Some(0), Some(1), None]);
    assert_eq!(r.per_class_iou[2], Some(0.0));
}

#[test]
fn hungarian_beats_greedy_majority_vote() {
    // Confusion (clusters x classes): [[5, 4], [4, 0]]. Greedy majority maps both clusters to
    // class 0; the one-to-one optimum is 0 -> 1, 1 -> 0 with 8 matched pixels (not 5).
    let m = hungarian_match(&[5, 4, 4, 0], 2, 2).unwrap();
    assert_eq!(m.cluster_to_class, vec![Some(1), Some(0)]);
    assert_eq!(m.matched_pixels, 8);
    // Rectangular both ways give the same pairs.
    let m = hungarian_match(&[5, 4, 4, 0, 1, 1], 3, 2).unwrap();
    assert_eq!(m.cluster_to_class, vec![Some(1), Some(0), None]);
    let m = hungarian_match(&[5, 4, 1, 4, 0, 1], 2, 3).unwrap();
    assert_eq!(m.cluster_to_class, vec![Some(1), Some(0)]);
    assert_eq!(m.class_to_cluster, vec![Some(1), Some(0), None]);
}

#[test]
fn per_image_matching_differs_from_dataset_matching() {
    // Image A: cluster 0 = class 0, cluster 1 = class 1. Image B: swapped. Dataset matching
    // can only get one image right (2 classes, 4 pixels each per image, equal totals):
    // confusion [[4, 4], [4, 4]] -> accuracy 1/2; per image, both are perfect.
    let gt: Vec<u32> = vec![0, 0, 0, 0, 1, 1, 1, 1];
    let a: Vec<u32> = vec![0, 0, 0, 0, 1, 1, 1, 1];
    let b: Vec<u32> = vec![1, 1, 1, 1, 0, 0, 0, 0];
    let r = cluster_miou([(&a[..], &gt[..]), (&b[..], &gt[..])], 2, 2, None).unwrap();
    assert!(close(r.pixel_accuracy, 0.5));
    // Each class: tp 4, |cluster| 8, |class| 8 -> IoU 4/12.
    assert!(close(r.miou, 1.0 / 3.0), "{r}");
    assert_eq!(r.per_image_miou, 1.0);
    assert_eq!(r.per_image_pixel_accuracy, 1.0);
    assert_eq!(r.scored_images, 2);
}

#[test]
fn ignore_label_and_absent_classes() {
    // Class 2 never occurs (IoU None, not in the mean); 255 pixels are left out whatever
    // their cluster.
    let gt: Vec<u32> = vec![0, 0, 255, 1, 1, 255];
    let pred: Vec<u32> = vec![1, 1, 2, 0, 0, 1];
    let r = cluster_miou([(&pred[..], &gt[..])], 3, 3, Some(255)).unwrap();
    assert_eq!(r.pixels, 4);
    assert_eq!(r.miou, 1.0);
    assert_eq!(r.per_class_iou, vec![Some(1.0), Some(1.0), None]);
    let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
    assert_eq!(json["mIoU"], 1.0);
    assert!(json["per_class_iou"][2].is_null());
}

#[test]
fn bad_inputs_are_errors() {
    let mut ev = ClusterEval::new(2, 2, None).unwrap();
    let e = ev.add_image(&[0, 1, 1], &[0, 1]).unwrap_err();
    assert!(
        matches!(e, EvalError::LengthMismatch { image: 0, predicted: 3, ground_truth: 2 }),
        "{e}"
    );
    ev.add_image(&[0, 1], &[0, 1]).unwrap();
    let e = ev.add_image(&[0, 2], &[0, 1]).unwrap_err();
    assert!(e.to_string().contains("image 1, pixel 1: cluster id 2"), "{e}");
    let e = ev.add_image(&[0, 1], &[5, 1]).unwrap_err();
    assert!(e.to_string().contains("class id 5"), "{e}");
    // Failed images added nothing.
    assert_eq!(ev.finish().unwrap().pixels, 2);

    assert!(ClusterEval::new(0, 3, None).is_err());
    let empty: Vec<u32> = vec![];
    assert!(cluster_miou([(&empty[..], &empty[..])], 2, 2, None).is_err(), "no labelled pixels");
    assert!(hungarian_match(&[1, 2, 3], 2, 2).is_err());
}
