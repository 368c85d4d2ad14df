//! Unsupervised-segmentation scoring: mIoU of cluster maps against class maps after a
//! one-to-one Hungarian matching of clusters to classes.
//!
//! Protocol (as STEGO's `UnsupervisedMetrics` and PiCIE's evaluation):
//!
//! 1. Accumulate one confusion matrix over the whole dataset: `confusion[k][c]` = number of
//!    pixels predicted as cluster `k` whose ground-truth class is `c` (pixels whose class is the
//!    ignore label are left out).
//! 2. Match clusters to classes one-to-one with the Hungarian algorithm (Kuhn-Munkres),
//!    **maximising the total number of matched pixels** `sum confusion[k][match(k)]`, which is
//!    the same as maximising pixel accuracy (STEGO: `linear_sum_assignment(stats,
//!    maximize=True)`; PiCIE: `linear_assignment(hist.max() - hist)`). The matching is
//!    computed on the dataset matrix, once.
//! 3. With `K` clusters and `C` classes, `min(K, C)` pairs are matched. A pair with zero
//!    overlap is then dropped (it adds nothing to the objective, and keeping it would make the
//!    result depend on how ties among zero weights are broken). Pixels of an unmatched cluster
//!    are predicted as no class: they are errors (false negatives of their true class).
//! 4. For class `c` matched to cluster `k`: `IoU_c = n[k][c] / (|cluster k| + |class c| -
//!    n[k][c])`; an unmatched class has `IoU_c = 0` if it has pixels. `mIoU` is the mean over
//!    classes whose union is non-empty, which (after step 3) are exactly the classes present in
//!    the ground truth. Pixel accuracy is the matched pixel count over all labelled pixels.
//!
//! As a second number, [`ClusterMiou::per_image_miou`] repeats steps 2-4 with each image's
//! own confusion matrix and averages over images (images without labelled pixels are skipped);
//! this is the more lenient per-image protocol and is always >= what one global matching
//! allows on the same image.
//!
//! The assignment uses `pathfinding::kuhn_munkres` on integer weights: confusion counts are
//! integers, so the maximisation is exact (no float cost tolerance), and the crate is a
//! long-maintained, widely used graph-algorithms library.

use pathfinding::kuhn_munkres::kuhn_munkres;
use pathfinding::matrix::Matrix;
use serde_json::json;

use super::EvalError;

/// A one-to-one matching between clusters and classes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matching {
    /// For each cluster, the class it is matched to (None: unmatched).
    pub cluster_to_class: Vec<Option<usize>>,
    /// For each class, the cluster matched to it (None: unmatched).
    pub class_to_cluster: Vec<Option<usize>>,
    /// Total overlap of the matched pairs (the maximised objective), in pixels.
    pub matched_pixels: u64,
}

/// Maximum-overlap one-to-one matching of a `clusters x classes` confusion matrix
/// (row-major: `confusion[k * classes + c]`). Pairs with zero overlap are left unmatched.
pub fn hungarian_match(
    confusion: &[u64],
    clusters: usize,
    classes: usize,
) -> Result<Matching, EvalError> {
    if clusters == 0 || classes == 0 {
        return Err(EvalError::Config(format!(
            "need at least one cluster and one class, got {clusters} clusters and {classes} classes"
        )));
    }
    if confusion.len() != clusters * classes {
        return Err(EvalError::Config(format!(
            "confusion matrix has {} entries, expected {clusters} x {classes}",
            confusion.len()
        )));
    }
    let total: u64 = confusion
        .iter()
        .try_fold(0u64, |acc, &v| acc.checked_add(v))
        .ok_or_else(|| EvalError::Config("confusion matrix total overflows u64".to_owned()))?;
    if i64::try_from(total).is_err() {
        return Err(EvalError::Config(format!(
            "{total} pixels exceed the i64 range of the matcher"
        )));
    }
    let at = |k: usize, c: usize| confusion[k * classes + c];
    // kuhn_munkres needs rows <= columns: put the smaller side on the rows.
    let mut cluster_to_class = vec![None; clusters];
    let mut class_to_cluster = vec![None; classes];
    if clusters <= classes {
        let w = Matrix::from_fn(clusters, classes, |(k, c)| at(k, c) as i64);
        let (_, assign) = kuhn_munkres(&w);
        for (k, &c) in assign.iter().enumerate() {
            cluster_to_class[k] = Some(c);
        }
    } else {
        let w = Matrix::from_fn(classes, clusters, |(c, k)| at(k, c) as i64);
        let (_, assign) = kuhn_munkres(&w);
        for (c, &k) in assign.iter().enumerate() {
            cluster_to_class[k] = Some(c);
        }
    }
    let mut matched_pixels = 0;
    for (k, slot) in cluster_to_class.iter_mut().enumerate() {
        match *slot {
            Some(c) if at(k, c) > 0 => {
                class_to_cluster[c] = Some(k);
                matched_pixels += at(k, c);
            }
            _ => *slot = None,
        }
    }
    Ok(Matching { cluster_to_class, class_to_cluster, matched_pixels })
}

/// Per-class IoU (None where the union is empty), mIoU and pixel accuracy of a matching.
fn scores(
    confusion: &[u64],
    clusters: usize,
    classes: usize,
    m: &Matching,
) -> (Vec<Option<f64>>, f64, f64) {
    let at = |k: usize, c: usize| confusion[k * classes + c];
    let total: u64 = confusion.iter().sum();
    let per_class: Vec<Option<f64>> = (0..classes)
        .map(|c| {
            let gt: u64 = (0..clusters).map(|k| at(k, c)).sum();
            let (tp, pred) = match m.class_to_cluster[c] {
                Some(k) => (at(k, c), (0..classes).map(|cc| at(k, cc)).sum::<u64>()),
                None => (0, 0),
            };
            let union = gt + pred - tp;
            (union > 0).then(|| tp as f64 / union as f64)
        })
        .collect();
    let present: Vec<f64> = per_class.iter().flatten().copied().collect();
    let miou = if present.is_empty() {
        f64::NAN
    } else {
        present.iter().sum::<f64>() / present.len() as f64
    };
    let acc = if total == 0 { f64::NAN } else { m.matched_pixels as f64 / total as f64 };
    (per_class, miou, acc)
}

/// The result of [`ClusterEval::finish`] / [`cluster_miou`].
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterMiou {
    /// Mean IoU over the classes present in the ground truth, with the dataset matching.
    pub miou: f64,
    /// IoU of each class with the dataset matching; None for a class with no pixels.
    pub per_class_iou: Vec<Option<f64>>,
    /// Fraction of labelled pixels whose cluster is matched to their class (dataset matching).
    pub pixel_accuracy: f64,
    /// The dataset matching.
    pub matching: Matching,
    /// Mean over images of the mIoU with each image's own matching.
    pub per_image_miou: f64,
    /// Mean over images of the pixel accuracy with each image's own matching.
    pub per_image_pixel_accuracy: f64,
    /// The dataset confusion matrix, `confusion[k * classes + c]`.
    pub confusion: Vec<u64>,
    /// Number of clusters `K`.
    pub clusters: usize,
    /// Number of classes `C`.
    pub classes: usize,
    /// Images added.
    pub images: usize,
    /// Images with at least one labelled pixel (those the per-image means average over).
    pub scored_images: usize,
    /// Labelled pixels (ignore label excluded).
    pub pixels: u64,
}

impl ClusterMiou {
    /// One JSON object: `mIoU`, `pixel_accuracy`, `per_image_mIoU`,
    /// `per_image_pixel_accuracy`, `per_class_iou` (null for absent classes),
    /// `cluster_to_class` (null for unmatched clusters), `clusters`, `classes`, `images`,
    /// `scored_images`, `pixels`, `objective`.
    pub fn to_json(&self) -> String {
        json!({
            "mIoU": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "per_image_mIoU": self.per_image_miou,
            "per_image_pixel_accuracy": self.per_image_pixel_accuracy,
            "per_class_iou": self.per_class_iou,
            "cluster_to_class": self.matching.cluster_to_class,
            "clusters": self.clusters,
            "classes": self.classes,
            "images": self.images,
            "scored_images": self.scored_images,
            "pixels": self.pixels,
            "objective": "one-to-one Hungarian matching on the dataset confusion matrix, maximising matched pixels",
        })
        .to_string()
    }
}

impl std::fmt::Display for ClusterMiou {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "mIoU {:.4}  pixel accuracy {:.4}  (dataset Hungarian matching, {} clusters -> {} classes, {} images, {} pixels)",
            self.miou, self.pixel_accuracy, self.clusters, self.classes, self.images, self.pixels
        )?;
        writeln!(
            f,
            "per-image matching: mIoU {:.4}  pixel accuracy {:.4}  ({} images scored)",
            self.per_image_miou, self.per_image_pixel_accuracy, self.scored_images
        )?;
        for (c, iou) in self.per_class_iou.iter().enumerate() {
            let cluster = self.matching.class_to_cluster[c]
                .map_or_else(|| "none".to_owned(), |k| k.to_string());
            match iou {
                Some(v) => writeln!(f, "  class {c:>3}: IoU {v:.4}  (cluster {cluster})")?,
                None => writeln!(f, "  class {c:>3}: absent")?,
            }
        }
        Ok(())
    }
}

/// Incremental cluster-map evaluation: add images one by one, then [`finish`](Self::finish).
#[derive(Debug, Clone)]
pub struct ClusterEval {
    clusters: usize,
    classes: usize,
    ignore: Option<u32>,
    confusion: Vec<u64>,
    image_confusion: Vec<u64>,
    images: usize,
    scored_images: usize,
    per_image_miou_sum: f64,
    per_image_acc_sum: f64,
}

impl ClusterEval {
    /// An evaluator for cluster ids `0..clusters` and class ids `0..classes`; class pixels
    /// equal to `ignore` (e.g. 255) are left out.
    pub fn new(clusters: usize, classes: usize, ignore: Option<u32>) -> Result<Self, EvalError> {
        if clusters == 0 || classes == 0 {
            return Err(EvalError::Config(format!(
                "need at least one cluster and one class, got {clusters} clusters and {classes} classes"
            )));
        }
        let n = clusters.checked_mul(classes).filter(|&n| n <= 1 << 26).ok_or_else(|| {
            EvalError::Config(format!(
                "{clusters} clusters x {classes} classes is too large a confusion matrix"
            ))
        })?;
        Ok(Self {
            clusters,
            classes,
            ignore,
            confusion: vec![0; n],
            image_confusion: vec![0; n],
            images: 0,
            scored_images: 0,
            per_image_miou_sum: 0.0,
            per_image_acc_sum: 0.0,
        })
    }

    /// Adds one image: `predicted[i]` is the cluster of pixel `i`, `ground_truth[i]` its
    /// class. On error nothing is added.
    pub fn add_image(&mut self, predicted: &[u32], ground_truth: &[u32]) -> Result<(), EvalError> {
        let image = self.images;
        if predicted.len() != ground_truth.len() {
            return Err(EvalError::LengthMismatch {
                image,
                predicted: predicted.len(),
                ground_truth: ground_truth.len(),
            });
        }
        self.image_confusion.iter_mut().for_each(|v| *v = 0);
        for (pixel, (&k, &c)) in predicted.iter().zip(ground_truth).enumerate() {
            if (k as usize) >= self.clusters {
                return Err(EvalError::LabelOutOfRange {
                    image,
                    pixel,
                    kind: "cluster",
                    value: k,
                    count: self.clusters,
                });
            }
            if Some(c) == self.ignore {
                continue;
            }
            if (c as usize) >= self.classes {
                return Err(EvalError::LabelOutOfRange {
                    image,
                    pixel,
                    kind: "class",
                    value: c,
                    count: self.classes,
                });
            }
            self.image_confusion[k as usize * self.classes + c as usize] += 1;
        }
        self.images += 1;
        let pixels: u64 = self.image_confusion.iter().sum();
        if pixels > 0 {
            let m = hungarian_match(&self.image_confusion, self.clusters, self.classes)?;
            let (_, miou, acc) = scores(&self.image_confusion, self.clusters, self.classes, &m);
            self.scored_images += 1;
            self.per_image_miou_sum += miou;
            self.per_image_acc_sum += acc;
        }
        for (total, v) in self.confusion.iter_mut().zip(&self.image_confusion) {
            *total += v;
        }
        Ok(())
    }

    /// Matches on the dataset confusion matrix and computes the scores. Fails when no
    /// labelled pixel was added.
    pub fn finish(&self) -> Result<ClusterMiou, EvalError> {
        let pixels: u64 = self.confusion.iter().sum();
        if pixels == 0 {
            return Err(EvalError::Config(format!(
                "no labelled pixels in {} images (every class pixel was the ignore label, or no image was added)",
                self.images
            )));
        }
        let matching = hungarian_match(&self.confusion, self.clusters, self.classes)?;
        let (per_class_iou, miou, pixel_accuracy) =
            scores(&self.confusion, self.clusters, self.classes, &matching);
        let n = self.scored_images as f64;
        Ok(ClusterMiou {
            miou,
            per_class_iou,
            pixel_accuracy,
            matching,
            per_image_miou: self.per_image_miou_sum / n,
            per_image_pixel_accuracy: self.per_image_acc_sum / n,
            confusion: self.confusion.clone(),
            clusters: self.clusters,
            classes: self.classes,
            images: self.images,
            scored_images: self.scored_images,
            pixels,
        })
    }
}

/// Scores `(predicted cluster map, ground-truth class map)` pairs, each flattened to one id
/// per pixel, with `clusters` cluster ids and `classes` class ids; class pixels equal to
/// `ignore` are left out. See the [module docs](self) for the protocol.
pub fn cluster_miou<'a, I>(
    pairs: I,
    clusters: usize,
    classes: usize,
    ignore: Option<u32>,
) -> Result<ClusterMiou, EvalError>
where
    I: IntoIterator<Item = (&'a [u32], &'a [u32])>,
{
    let mut ev = ClusterEval::new(clusters, classes, ignore)?;
    for (p, g) in pairs {
        ev.add_image(p, g)?;
    }
    ev.finish()
}
