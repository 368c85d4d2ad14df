//! Cluster maps of backbone features: prototype assignment and k-means, rendered as overlays,
//! a colour-only baseline, and a box-based crown/ground separation score for aerial images with
//! tree-crown boxes.

use std::path::Path;

use burn::tensor::{Tensor, TensorData, backend::Backend};
use image::{Rgb, RgbImage, imageops};

use crate::augment::normalize;
use crate::error::{Error, Result};
use crate::model::FlslModel;

/// Per-patch labels on a `gh x gw` grid.
#[derive(Debug, Clone)]
pub struct ClusterMap {
    /// Grid height.
    pub gh: usize,
    /// Grid width.
    pub gw: usize,
    /// Label per patch, row-major.
    pub labels: Vec<u32>,
}

/// Features and prototype assignment of one image resized to `side x side`.
pub fn image_features<B: Backend>(
    model: &FlslModel<B>,
    img: &RgbImage,
    side: u32,
    device: &B::Device,
) -> (Vec<f32>, usize, ClusterMap) {
    let resized = imageops::resize(img, side, side, imageops::FilterType::CatmullRom);
    let x = Tensor::<B, 4>::from_data(
        TensorData::new(normalize(&resized), [1, 3, side as usize, side as usize]),
        device,
    );
    let feats = model.backbone.forward(x); // [1, N, D]
    let [_, n, d] = feats.dims();
    let logits = model.head.forward(feats.clone());
    let labels = logits.argmax(2).into_data().convert::<i64>().to_vec::<i64>().unwrap_or_default();
    let g = (n as f64).sqrt().round() as usize;
    let f = feats.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
    (
        f,
        d,
        ClusterMap {
            gh: g,
            gw: n / g.max(1),
            labels: labels.into_iter().map(|v| v as u32).collect(),
        },
    )
}

/// Cosine k-means of the rows of `feats` (`d` values each): the onboard clustering
/// ([`flsl_runtime::perception::cluster::kmeans_labels`], deterministic farthest-point start,
/// spherical Lloyd), so that maps and scores made here are the ones the drone computes.
///
/// Rows the onboard code cannot cluster (all zeros, NaN or infinite values) get
/// [`flsl_runtime::perception::NO_LABEL`]. An error only for `d == 0` or `k == 0`.
pub fn kmeans(feats: &[f32], d: usize, k: usize, iters: usize) -> Result<Vec<u32>> {
    use flsl_runtime::perception::cluster::{KMeansConfig, KMeansScratch, kmeans_labels};
    let n = feats.len() / d.max(1);
    if n == 0 {
        return Ok(Vec::new());
    }
    let (mut centroids, mut counts, mut rows) =
        (vec![0f32; k * d], vec![0u32; k], vec![0f32; 2 * n]);
    let mut labels = vec![0u32; n];
    let scratch = KMeansScratch { centroids: &mut centroids, counts: &mut counts, rows: &mut rows };
    kmeans_labels(&feats[..n * d], n, d, &KMeansConfig::new(k, iters), scratch, &mut labels)
        .map_err(|e| Error::runtime("k-means", e))?;
    Ok(labels)
}

/// A distinct colour per label: the onboard runtime's palette ([`flsl_runtime::detect::palette`]).
pub fn palette(label: u32) -> Rgb<u8> {
    Rgb(flsl_runtime::detect::palette(label))
}

/// The image with each patch tinted by its label's colour (alpha 0.55).
pub fn overlay(img: &RgbImage, map: &ClusterMap) -> RgbImage {
    let mut out = img.clone();
    flsl_runtime::detect::tint_labels(&mut out, &map.labels, map.gh, map.gw, 0.55);
    out
}

/// Side-by-side panels into one PNG (atomic write).
pub fn save_panels(path: &Path, panels: &[RgbImage]) -> Result<()> {
    let w: u32 = panels.iter().map(|p| p.width() + 8).sum();
    let h = panels.iter().map(RgbImage::height).max().unwrap_or(1);
    let mut canvas = RgbImage::from_pixel(w.max(1), h, Rgb([255, 255, 255]));
    let mut x = 0;
    for p in panels {
        imageops::overlay(&mut canvas, p, i64::from(x), 0);
        x += p.width() + 8;
    }
    let mut bytes = Vec::new();
    canvas
        .write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| Error::malformed("png", path, e.to_string()))?;
    crate::tensors::write_atomic(path, &bytes)
}

/// Central fraction (per side) of a crown box whose patches count as crown in [`crown_separation`].
pub const CROWN_CORE: f32 = 0.6;

/// How well a cluster map separates tree crowns from ground, scored against crown boxes.
///
/// Crown patches: those whose centre lies in the central [`CROWN_CORE`] (per side) of a box.
/// Ground patches: those outside every box. The rest of each box (its corners are often ground,
/// its rim often shadow) is not scored. The score is Youden's J of the best union of clusters
/// called "crown": recall on crown patches minus the false-positive rate on ground patches.
/// J is additive over clusters, so the best union takes every cluster whose share of the crown
/// patches exceeds its share of the ground patches: `J = sum_c max(0, crown_c / crown - ground_c / ground)`.
/// 0: no cluster tells crowns from ground; 1: some clusters hold every crown patch and no ground
/// patch. Finer maps can only score higher, so compare maps with the same number of clusters.
/// `None` when the boxes leave no crown or no ground patch.
pub fn crown_separation(
    map: &ClusterMap,
    boxes: &[[f32; 4]],
    img_w: f32,
    img_h: f32,
) -> Option<f64> {
    let n_labels = map.labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let (mut crown, mut ground) = (vec![0usize; n_labels], vec![0usize; n_labels]);
    let kinds = patch_kinds(map.gh, map.gw, boxes, img_w, img_h);
    for (&l, kind) in map.labels.iter().zip(&kinds) {
        match kind {
            Some(true) => crown[l as usize] += 1,
            Some(false) => ground[l as usize] += 1,
            None => {}
        }
    }
    let (nc, ng) = (crown.iter().sum::<usize>(), ground.iter().sum::<usize>());
    if nc == 0 || ng == 0 {
        return None;
    }
    Some(
        crown
            .iter()
            .zip(&ground)
            .map(|(&c, &g)| (c as f64 / nc as f64 - g as f64 / ng as f64).max(0.0))
            .sum(),
    )
}

/// Per patch of a `gh x gw` grid over an `img_w x img_h` image: `Some(true)` crown (centre in
/// the central [`CROWN_CORE`] of a box), `Some(false)` ground (outside every box), `None` not
/// scored (the rest of a box). Row-major.
fn patch_kinds(
    gh: usize,
    gw: usize,
    boxes: &[[f32; 4]],
    img_w: f32,
    img_h: f32,
) -> Vec<Option<bool>> {
    (0..gh * gw)
        .map(|i| {
            let (gy, gx) = (i / gw.max(1), i % gw.max(1));
            let cx = (gx as f32 + 0.5) / gw as f32 * img_w;
            let cy = (gy as f32 + 0.5) / gh as f32 * img_h;
            let inside = |b: &[f32; 4], f: f32| {
                let (hw, hh) = (0.5 * f * (b[2] - b[0]), 0.5 * f * (b[3] - b[1]));
                let (mx, my) = (0.5 * (b[0] + b[2]), 0.5 * (b[1] + b[3]));
                (cx - mx).abs() <= hw && (cy - my).abs() <= hh
            };
            if boxes.iter().any(|b| inside(b, CROWN_CORE)) {
                Some(true)
            } else if boxes.iter().any(|b| inside(b, 1.0)) {
                None
            } else {
                Some(false)
            }
        })
        .collect()
}

/// Ridge penalty of [`crown_probe_auc`] (on standardised features, bias included).
pub const PROBE_RIDGE: f64 = 10.0;

/// How linearly decodable "crown" is from per-patch features, whatever the clustering.
///
/// Patches are labelled as in [`crown_separation`] (crown core, ground, rest not scored). Each
/// feature is standardised over the grid; a ridge classifier (targets +1 crown / -1 ground,
/// penalty [`PROBE_RIDGE`] on every weight and the bias) is fitted on the left half of the grid
/// and scored on the right half, then the other way round. Returns the mean ROC AUC of the two
/// (0.5: no linear information; 1: a linear function of the features separates them; ties count
/// half). `scripts/crown_probe.py` is the same probe in numpy (on its own resize of the image,
/// so its figures differ in the third decimal). `None` when a half lacks crown or ground
/// patches, or the features are not finite.
pub fn crown_probe_auc(
    feats: &[f32],
    d: usize,
    gh: usize,
    gw: usize,
    boxes: &[[f32; 4]],
    img_w: f32,
    img_h: f32,
) -> Option<f64> {
    let n = gh * gw;
    if d == 0 || feats.len() != n * d || feats.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let kinds = patch_kinds(gh, gw, boxes, img_w, img_h);
    // Standardised features plus a constant column, f64.
    let cols = d + 1;
    let mut x = vec![1.0f64; n * cols];
    for j in 0..d {
        let mean = (0..n).map(|i| f64::from(feats[i * d + j])).sum::<f64>() / n as f64;
        let var =
            (0..n).map(|i| (f64::from(feats[i * d + j]) - mean).powi(2)).sum::<f64>() / n as f64;
        let scale = 1.0 / (var.sqrt() + 1e-6);
        for i in 0..n {
            x[i * cols + j] = (f64::from(feats[i * d + j]) - mean) * scale;
        }
    }
    let left = |i: usize| i % gw.max(1) < gw / 2;
    let mut aucs = [0.0; 2];
    for (split, auc) in aucs.iter_mut().enumerate() {
        let in_train = |i: usize| left(i) == (split == 0);
        // Normal equations (X^T X + ridge I) w = X^T t over the training half.
        let (mut a, mut b) = (vec![0.0f64; cols * cols], vec![0.0f64; cols]);
        let mut seen = [false; 2]; // [ground, crown] in the training half
        for i in (0..n).filter(|&i| in_train(i)) {
            let Some(crown) = kinds[i] else { continue };
            seen[usize::from(crown)] = true;
            let row = &x[i * cols..(i + 1) * cols];
            let t = if crown { 1.0 } else { -1.0 };
            for (r, &xr) in row.iter().enumerate() {
                b[r] += xr * t;
                for (c, &xc) in row.iter().enumerate().skip(r) {
                    a[r * cols + c] += xr * xc;
                }
            }
        }
        for r in 0..cols {
            a[r * cols + r] += PROBE_RIDGE;
            for c in 0..r {
                a[r * cols + c] = a[c * cols + r];
            }
        }
        if seen != [true; 2] {
            return None;
        }
        let w = solve_spd(a, b, cols)?;
        let score =
            |i: usize| x[i * cols..(i + 1) * cols].iter().zip(&w).map(|(v, w)| v * w).sum::<f64>();
        let test = |want: bool| {
            (0..n)
                .filter(|&i| !in_train(i) && kinds[i] == Some(want))
                .map(score)
                .collect::<Vec<_>>()
        };
        let (pos, neg) = (test(true), test(false));
        if pos.is_empty() || neg.is_empty() {
            return None;
        }
        let wins: f64 = pos
            .iter()
            .map(|p| {
                neg.iter()
                    .map(|q| {
                        if p > q {
                            1.0
                        } else if p == q {
                            0.5
                        } else {
                            0.0
                        }
                    })
                    .sum::<f64>()
            })
            .sum();
        *auc = wins / (pos.len() * neg.len()) as f64;
    }
    Some(0.5 * (aucs[0] + aucs[1]))
}

/// Solves `a w = b` for a symmetric positive definite `n x n` matrix (row-major) by Cholesky;
/// `None` if `a` is not positive definite (or not finite).
fn solve_spd(mut a: Vec<f64>, mut b: Vec<f64>, n: usize) -> Option<Vec<f64>> {
    for j in 0..n {
        let diag = a[j * n + j] - (0..j).map(|k| a[j * n + k] * a[j * n + k]).sum::<f64>();
        if !diag.is_finite() || diag <= 0.0 {
            return None;
        }
        let l = diag.sqrt();
        a[j * n + j] = l;
        for i in j + 1..n {
            a[i * n + j] =
                (a[i * n + j] - (0..j).map(|k| a[i * n + k] * a[j * n + k]).sum::<f64>()) / l;
        }
    }
    for i in 0..n {
        b[i] = (b[i] - (0..i).map(|k| a[i * n + k] * b[k]).sum::<f64>()) / a[i * n + i];
    }
    for i in (0..n).rev() {
        b[i] = (b[i] - (i + 1..n).map(|k| a[k * n + i] * b[k]).sum::<f64>()) / a[i * n + i];
    }
    Some(b)
}

/// A colour-only baseline for the cluster maps: per `patch x patch` cell of the image resized to
/// `side x side`, the mean and standard deviation of R, G and B (in [0, 1]), each of the six
/// standardised over the image. Clustered like the backbone features, it shows how much of a
/// separation plain colour already gives. Returns `(features, 6)`, row-major over the grid.
pub fn patch_colour_features(img: &RgbImage, side: u32, patch: u32) -> (Vec<f32>, usize) {
    let patch = patch.max(1);
    let resized = imageops::resize(img, side, side, imageops::FilterType::CatmullRom);
    let g = (side / patch) as usize;
    let mut f = Vec::with_capacity(g * g * 6);
    for gy in 0..g {
        for gx in 0..g {
            let (mut sum, mut sq) = ([0f64; 3], [0f64; 3]);
            for y in 0..patch {
                for x in 0..patch {
                    let p = resized.get_pixel(gx as u32 * patch + x, gy as u32 * patch + y);
                    for c in 0..3 {
                        let v = f64::from(p[c]) / 255.0;
                        sum[c] += v;
                        sq[c] += v * v;
                    }
                }
            }
            let n = f64::from(patch * patch);
            let mean = sum.map(|s| s / n);
            f.extend(mean.iter().map(|&m| m as f32));
            f.extend((0..3).map(|c| (sq[c] / n - mean[c] * mean[c]).max(0.0).sqrt() as f32));
        }
    }
    let rows = g * g;
    for c in 0..6 {
        let m = (0..rows).map(|r| f[r * 6 + c]).sum::<f32>() / rows.max(1) as f32;
        let sd = ((0..rows).map(|r| (f[r * 6 + c] - m).powi(2)).sum::<f32>() / rows.max(1) as f32)
            .sqrt()
            .max(1e-6);
        for r in 0..rows {
            f[r * 6 + c] = (f[r * 6 + c] - m) / sd;
        }
    }
    (f, 6)
}

/// Reads Pascal VOC boxes (`xmin ymin xmax ymax`) from an XML file.
pub fn read_voc_boxes(path: &Path) -> Result<Vec<[f32; 4]>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("cannot read", path, e))?;
    let tag = |s: &str, t: &str| -> Option<f32> {
        let a = s.find(&format!("<{t}>"))? + t.len() + 2;
        let b = s[a..].find(&format!("</{t}>"))? + a;
        s[a..b].trim().parse().ok()
    };
    let mut out = Vec::new();
    for obj in text.split("<bndbox>").skip(1) {
        let end = obj.find("</bndbox>").unwrap_or(obj.len());
        let b = &obj[..end];
        match (tag(b, "xmin"), tag(b, "ymin"), tag(b, "xmax"), tag(b, "ymax")) {
            (Some(x0), Some(y0), Some(x1), Some(y1)) => out.push([x0, y0, x1, y1]),
            _ => return Err(Error::malformed("voc", path, "a <bndbox> lacks xmin/ymin/xmax/ymax")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmeans_splits_two_obvious_groups() {
        let mut f = Vec::new();
        for i in 0..10 {
            f.extend_from_slice(&[1.0, 0.01 * i as f32, 0.0]);
        }
        for i in 0..10 {
            f.extend_from_slice(&[0.0, 0.01 * i as f32, 1.0]);
        }
        let l = kmeans(&f, 3, 2, 5).unwrap();
        assert!(l[..10].iter().all(|&x| x == l[0]));
        assert!(l[10..].iter().all(|&x| x == l[10]));
        assert_ne!(l[0], l[10]);
    }

    #[test]
    fn crown_separation_is_one_for_a_perfect_map_zero_for_an_unrelated_one() {
        // 8x8 grid on an 80x80 image; one box covers the left half (its core: columns 1 and 2).
        let boxes = [[0.0, 0.0, 40.0, 80.0]];
        let by =
            |f: fn(usize) -> u32| ClusterMap { gh: 8, gw: 8, labels: (0..64).map(f).collect() };
        let perfect = by(|i| u32::from(i % 8 < 4));
        assert_eq!(crown_separation(&perfect, &boxes, 80.0, 80.0), Some(1.0));
        // Top half vs bottom half: each cluster holds half the crown and half the ground patches.
        let rows = by(|i| u32::from(i / 8 < 4));
        assert_eq!(crown_separation(&rows, &boxes, 80.0, 80.0), Some(0.0));
        // One cluster = columns 1-2 and 4 (all crown, a quarter of the ground): J = 1 - 1/4.
        let partial = by(|i| u32::from(matches!(i % 8, 1 | 2 | 4)));
        assert_eq!(crown_separation(&partial, &boxes, 80.0, 80.0), Some(0.75));
        // Box rim patches (columns 0 and 3) are not scored: labelling them anything changes nothing.
        let rim = by(|i| u32::from(matches!(i % 8, 0..=3)) + u32::from(matches!(i % 8, 0 | 3)));
        assert_eq!(crown_separation(&rim, &boxes, 80.0, 80.0), Some(1.0));
        assert_eq!(crown_separation(&perfect, &[], 80.0, 80.0), None);
    }

    #[test]
    fn crown_probe_reads_a_linear_crown_signal_in_either_sign_and_nothing_from_an_unrelated_one() {
        // 8x8 grid on an 80x80 image; one box covers the top half and overhangs the sides so
        // that its core spans every column: crown core = rows 1-2, ground = rows 4-7, the same
        // mix in every column.
        let boxes = [[-40.0, 0.0, 120.0, 40.0]];
        let feats = |f: fn(usize, usize) -> [f32; 2]| {
            (0..64).flat_map(|i| f(i / 8, i % 8)).collect::<Vec<f32>>()
        };
        // Feature 0 = "in the box", feature 1 = constant: perfectly decodable.
        let boxed = feats(|y, _| [f32::from(u8::from(y < 4)), 1.0]);
        assert_eq!(crown_probe_auc(&boxed, 2, 8, 8, &boxes, 80.0, 80.0), Some(1.0));
        // The row index runs the other way (crown rows are the small ones): the probe learns the sign.
        let rows = feats(|y, _| [y as f32, 0.5]);
        assert_eq!(crown_probe_auc(&rows, 2, 8, 8, &boxes, 80.0, 80.0), Some(1.0));
        // The column index carries nothing: every column holds the same crown/ground mix.
        let cols = feats(|_, x| [x as f32, (x * x) as f32]);
        let auc = crown_probe_auc(&cols, 2, 8, 8, &boxes, 80.0, 80.0)
            .expect("both halves have crown and ground");
        assert!((auc - 0.5).abs() < 1e-9, "column features: AUC {auc}");
        // No boxes, a box over the left half only (the right half has no crown), bad shapes, NaN.
        assert_eq!(crown_probe_auc(&boxed, 2, 8, 8, &[], 80.0, 80.0), None);
        assert_eq!(crown_probe_auc(&boxed, 2, 8, 8, &[[0.0, 0.0, 40.0, 80.0]], 80.0, 80.0), None);
        assert_eq!(crown_probe_auc(&boxed[..10], 2, 8, 8, &boxes, 80.0, 80.0), None);
        let mut nan = boxed.clone();
        nan[3] = f32::NAN;
        assert_eq!(crown_probe_auc(&nan, 2, 8, 8, &boxes, 80.0, 80.0), None);
    }

    #[test]
    fn solve_spd_solves_and_refuses_an_indefinite_matrix() {
        // [[4, 2], [2, 3]] w = [2, 1] -> w = [0.5, 0].
        let w = solve_spd(vec![4.0, 2.0, 2.0, 3.0], vec![2.0, 1.0], 2).expect("positive definite");
        assert!((w[0] - 0.5).abs() < 1e-12 && w[1].abs() < 1e-12, "{w:?}");
        assert_eq!(solve_spd(vec![1.0, 2.0, 2.0, 1.0], vec![1.0, 1.0], 2), None);
    }

    #[test]
    fn colour_features_are_standardised_and_tell_green_from_sand() {
        // Left half green, right half sand; 4x4 cells of 8 px.
        let img = RgbImage::from_fn(32, 32, |x, _| {
            if x < 16 { Rgb([40, 120, 40]) } else { Rgb([220, 200, 160]) }
        });
        let (f, d) = patch_colour_features(&img, 32, 8);
        assert_eq!((f.len(), d), (16 * 6, 6));
        for c in 0..3 {
            let col: Vec<f32> = (0..16).map(|r| f[r * 6 + c]).collect();
            let mean = col.iter().sum::<f32>() / 16.0;
            let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 16.0;
            assert!(
                mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4,
                "channel {c}: mean {mean} var {var}"
            );
        }
        let labels = kmeans(&f, d, 2, 10).unwrap();
        assert!((0..16).all(|i| (labels[i] == labels[0]) == (i % 4 < 2)), "{labels:?}");
    }
}
