//! `flsl eval-clusters`: how well unsupervised cluster maps of a backbone separate objects,
//! measured on DAVIS frames with their foreground masks.
//!
//! Per frame: the ONNX backbone runs in tract on the frame resized to its input (no crop),
//! the patch features are clustered by k-means (cosine, `k` clusters, deterministic
//! farthest-point start: [`crate::cluster::kmeans`], the onboard runtime's clustering; a patch it
//! cannot cluster counts as one more cluster), the patch labels are upsampled to the
//! mask (nearest), and the cluster ids are matched to the mask's classes (background,
//! foreground) by the Hungarian algorithm (`flsl_runtime::eval`). Because k-means ids are
//! arbitrary per frame, the headline number is the **per-image** matching mIoU; the
//! dataset-level matching is reported too (meaningful only for labels that are consistent
//! across frames).

use std::path::{Path, PathBuf};

use flsl_runtime::eval::ClusterEval;
use flsl_runtime::onnx::{ModelOptions, OnnxModel};
use flsl_runtime::preprocess::Rgb8Frame;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The numbers of one model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterScores {
    /// mIoU over {background, foreground} with each frame's own Hungarian matching.
    pub per_image_miou: f64,
    /// Pixel accuracy with each frame's own matching.
    pub per_image_pixel_accuracy: f64,
    /// mIoU with one matching over the whole set.
    pub miou: f64,
    /// Pixel accuracy with the dataset matching.
    pub pixel_accuracy: f64,
    /// Frames evaluated.
    pub images: usize,
    /// Sequences evaluated.
    pub sequences: Vec<String>,
    /// Clusters per frame.
    pub k: usize,
}

fn sequences(root: &Path) -> Result<Vec<String>> {
    let list = root.join("ImageSets").join("sequences.txt");
    if let Ok(text) = std::fs::read_to_string(&list) {
        let v: Vec<String> =
            text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
        if !v.is_empty() {
            return Ok(v);
        }
    }
    let dir = root.join("JPEGImages").join("480p");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| Error::io("cannot list DAVIS sequences", &dir, e))?
        .filter_map(|e| {
            e.ok()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().to_string())
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Evaluates `model` on every sequence of the DAVIS-style `root`, `frames` evenly spaced
/// frames per sequence, `k` clusters per frame.
pub fn eval_davis(model: &Path, root: &Path, k: usize, frames: usize) -> Result<ClusterScores> {
    let mut m = OnnxModel::load(model, ModelOptions::new().with_threads(1))
        .map_err(|e| Error::runtime(format!("loading `{}`", model.display()), e))?;
    let [_, _, ih, iw] = m.input_shape();
    let seqs = sequences(root)?;
    if seqs.is_empty() {
        return Err(Error::Config {
            key: "davis".into(),
            reason: format!("no sequences under {}", root.display()),
        });
    }
    // k clusters and one for patches k-means cannot cluster (NO_LABEL: zero or non-finite rows).
    let mut ev = ClusterEval::new(k.max(1) + 1, 2, None)
        .map_err(|e| Error::Config { key: "k".into(), reason: e.to_string() })?;
    let mut images = 0;
    for seq in &seqs {
        let jdir = root.join("JPEGImages").join("480p").join(seq);
        let adir = root.join("Annotations").join("480p").join(seq);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&jdir)
            .map_err(|e| Error::io("cannot list frames", &jdir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
            .collect();
        files.sort();
        let step = (files.len() as f64 / frames.max(1) as f64).max(1.0);
        let picks: Vec<&PathBuf> =
            (0..frames.min(files.len())).map(|i| &files[(i as f64 * step) as usize]).collect();
        for f in picks {
            let mask_path = adir.join(f.file_stem().unwrap_or_default()).with_extension("png");
            let img = flsl_runtime::preprocess::decode_image_file(f)
                .map_err(|e| Error::malformed("image", f, e.to_string()))?
                .to_rgb8();
            let mask = flsl_runtime::preprocess::decode_image_file(&mask_path)
                .map_err(|e| Error::malformed("mask", &mask_path, e.to_string()))?
                .to_luma8();
            let frame = Rgb8Frame::new(img.as_raw(), img.width() as usize, img.height() as usize)
                .map_err(|e| Error::runtime(format!("frame `{}`", f.display()), e))?;
            let out = m
                .run_rgb8(&frame)
                .map_err(|e| Error::runtime(format!("running `{}`", model.display()), e))?;
            let (n, d) = (out.features.tokens(), out.features.channels());
            let patch = ((ih * iw) as f64 / n as f64).sqrt().round() as usize;
            let (gh, gw) = (ih / patch.max(1), iw / patch.max(1));
            let mut labels = crate::cluster::kmeans(out.features.as_slice(), d, k.max(1), 10)?;
            for l in labels.iter_mut().filter(|l| **l == flsl_runtime::perception::NO_LABEL) {
                *l = k.max(1) as u32;
            }
            let (mw, mh) = (mask.width() as usize, mask.height() as usize);
            let mut pred = vec![0u32; mw * mh];
            let mut gt = vec![0u32; mw * mh];
            for y in 0..mh {
                let gy = (y * gh / mh).min(gh - 1);
                for x in 0..mw {
                    let gx = (x * gw / mw).min(gw - 1);
                    pred[y * mw + x] = labels.get(gy * gw + gx).copied().unwrap_or(0);
                    gt[y * mw + x] = u32::from(mask.get_pixel(x as u32, y as u32)[0] > 127);
                }
            }
            ev.add_image(&pred, &gt).map_err(|e| Error::runtime("cluster evaluation", e))?;
            images += 1;
        }
    }
    let r = ev.finish().map_err(|e| Error::runtime("cluster evaluation", e))?;
    Ok(ClusterScores {
        per_image_miou: r.per_image_miou,
        per_image_pixel_accuracy: r.per_image_pixel_accuracy,
        miou: r.miou,
        pixel_accuracy: r.pixel_accuracy,
        images,
        sequences: seqs,
        k,
    })
}
