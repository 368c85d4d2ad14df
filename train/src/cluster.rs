//! Cluster maps of backbone features: prototype assignment and k-means, rendered as overlays,
//! and a box-based separation score for aerial images with tree-crown boxes.

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
pub fn image_features<B: Backend>(model: &FlslModel<B>, img: &RgbImage, side: u32, device: &B::Device) -> (Vec<f32>, usize, ClusterMap) {
    let resized = imageops::resize(img, side, side, imageops::FilterType::CatmullRom);
    let x = Tensor::<B, 4>::from_data(TensorData::new(normalize(&resized), [1, 3, side as usize, side as usize]), device);
    let feats = model.backbone.forward(x); // [1, N, D]
    let [_, n, d] = feats.dims();
    let logits = model.head.forward(feats.clone());
    let labels = logits.argmax(2).into_data().convert::<i64>().to_vec::<i64>().unwrap_or_default();
    let g = (n as f64).sqrt().round() as usize;
    let f = feats.into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
    (f, d, ClusterMap { gh: g, gw: n / g.max(1), labels: labels.into_iter().map(|v| v as u32).collect() })
}

/// Seeded k-means (Lloyd, cosine on L2-normalised rows, k-means++-like farthest init).
pub fn kmeans(feats: &[f32], d: usize, k: usize, iters: usize) -> Vec<u32> {
    let n = feats.len() / d.max(1);
    if n == 0 || k == 0 {
        return Vec::new();
    }
    let rows: Vec<Vec<f32>> = (0..n)
        .map(|i| {
            let r = &feats[i * d..(i + 1) * d];
            let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
            r.iter().map(|v| v / norm).collect()
        })
        .collect();
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let mut centers = vec![rows[0].clone()];
    while centers.len() < k.min(n) {
        // Farthest point from the current centers (deterministic).
        let far = (0..n)
            .max_by(|&a, &b| {
                let da = centers.iter().map(|c| dot(&rows[a], c)).fold(f32::MIN, f32::max);
                let db = centers.iter().map(|c| dot(&rows[b], c)).fold(f32::MIN, f32::max);
                db.total_cmp(&da)
            })
            .unwrap_or(0);
        centers.push(rows[far].clone());
    }
    let mut labels = vec![0u32; n];
    for _ in 0..iters {
        for (i, r) in rows.iter().enumerate() {
            labels[i] = (0..centers.len()).max_by(|&a, &b| dot(r, &centers[a]).total_cmp(&dot(r, &centers[b]))).unwrap_or(0) as u32;
        }
        for (c, center) in centers.iter_mut().enumerate() {
            let mut sum = vec![0f32; d];
            let mut cnt = 0;
            for (i, r) in rows.iter().enumerate() {
                if labels[i] as usize == c {
                    cnt += 1;
                    for (s, v) in sum.iter_mut().zip(r) {
                        *s += v;
                    }
                }
            }
            if cnt > 0 {
                let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                *center = sum.into_iter().map(|v| v / norm).collect();
            }
        }
    }
    labels
}

/// A distinct colour per label (golden-ratio hues).
pub fn palette(label: u32) -> Rgb<u8> {
    let h = (label as f32 * 0.618_034).fract();
    let (s, v) = (0.85f32, 0.95f32);
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match i as i32 % 6 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    Rgb([(r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8])
}

/// The image with each patch tinted by its label's colour (alpha 0.55).
pub fn overlay(img: &RgbImage, map: &ClusterMap) -> RgbImage {
    let mut out = img.clone();
    let (w, h) = (img.width() as usize, img.height() as usize);
    for (x, y, p) in out.enumerate_pixels_mut() {
        let gx = (x as usize * map.gw / w).min(map.gw - 1);
        let gy = (y as usize * map.gh / h).min(map.gh - 1);
        let c = palette(map.labels[gy * map.gw + gx]);
        for ch in 0..3 {
            p[ch] = (0.45 * f32::from(p[ch]) + 0.55 * f32::from(c[ch])) as u8;
        }
    }
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

/// How well a cluster map separates boxed objects (tree crowns) from the rest: clusters whose
/// patches lie mostly inside boxes form the "object" set; the score is the IoU of that set's
/// patches with the patches whose centre lies in a box (1 = perfect separation).
pub fn box_separation_iou(map: &ClusterMap, boxes: &[[f32; 4]], img_w: f32, img_h: f32) -> f64 {
    let inside: Vec<bool> = (0..map.gh * map.gw)
        .map(|i| {
            let (gy, gx) = (i / map.gw, i % map.gw);
            let cx = (gx as f32 + 0.5) / map.gw as f32 * img_w;
            let cy = (gy as f32 + 0.5) / map.gh as f32 * img_h;
            boxes.iter().any(|b| cx >= b[0] && cx <= b[2] && cy >= b[1] && cy <= b[3])
        })
        .collect();
    let max_label = map.labels.iter().copied().max().unwrap_or(0) as usize;
    let mut counts = vec![(0usize, 0usize); max_label + 1];
    for (l, &ins) in map.labels.iter().zip(&inside) {
        let c = &mut counts[*l as usize];
        if ins {
            c.0 += 1;
        } else {
            c.1 += 1;
        }
    }
    let object: Vec<bool> = counts.iter().map(|(i, o)| i > o).collect();
    let (mut inter, mut union) = (0usize, 0usize);
    for (l, &ins) in map.labels.iter().zip(&inside) {
        let pred = object[*l as usize];
        if pred && ins {
            inter += 1;
        }
        if pred || ins {
            union += 1;
        }
    }
    if union == 0 { 0.0 } else { inter as f64 / union as f64 }
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
        let l = kmeans(&f, 3, 2, 5);
        assert!(l[..10].iter().all(|&x| x == l[0]));
        assert!(l[10..].iter().all(|&x| x == l[10]));
        assert_ne!(l[0], l[10]);
    }

    #[test]
    fn separation_is_one_for_a_perfect_map_and_lower_otherwise() {
        // 4x4 grid on a 40x40 image; a box covers the left half.
        let boxes = [[0.0, 0.0, 19.9, 40.0]];
        let perfect = ClusterMap { gh: 4, gw: 4, labels: (0..16).map(|i| u32::from(i % 4 < 2)).collect() };
        assert!((box_separation_iou(&perfect, &boxes, 40.0, 40.0) - 1.0).abs() < 1e-12);
        let rows = ClusterMap { gh: 4, gw: 4, labels: (0..16).map(|i| u32::from(i / 4 < 2)).collect() };
        assert!(box_separation_iou(&rows, &boxes, 40.0, 40.0) < 0.6);
    }
}
