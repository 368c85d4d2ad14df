//! FLSL multi-crop augmentation (reference `main_flsl.DataAugmentationFLSL`).
//!
//! Per image: a teacher global crop (`RandomResizedCrop(global, scale_t)`), a student global
//! crop taken **from the teacher crop** (`scale_s`), `n` local crops from the teacher crop;
//! then on every crop: colour jitter (p 0.8, `color_jitter_p`; brightness 0.4, contrast 0.4,
//! saturation 0.2, hue 0.1 in `color_jitter`, random order), grayscale (p 0.2, `grayscale_p`), and either a Gaussian blur (p 0.5) or a weak
//! blur (p 0.1) followed by solarisation (p 0.2), chosen with p 0.5; ImageNet normalisation.
//! Student views get token sampling masks. The reference has no horizontal flip (its
//! `flip_and_color_jitter` only jitters); `flip_p` adds one for users who want it (default 0).
//!
//! Deviations that cannot be avoided: the random streams are ours (seeded, reproducible),
//! PIL's box-approximated Gaussian blur is a true Gaussian here, and resizing uses the `image`
//! crate's Catmull-Rom (bicubic, a = -0.5, antialiased like PIL's bicubic).

use image::{RgbImage, imageops};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::masks::sampling_mask;

pub use flsl_runtime::contract::{IMAGENET_MEAN, IMAGENET_STD};

/// Augmentation parameters (the reference's argument names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Teacher global crop scale range (area fraction).
    pub global_crops_scale_t: (f64, f64),
    /// Student global crop scale range, relative to the teacher crop.
    pub global_crops_scale_s: (f64, f64),
    /// Local crop scale range, relative to the teacher crop.
    pub local_crops_scale: (f64, f64),
    /// Number of local crops.
    pub local_crops_number: usize,
    /// Global crop side in pixels.
    pub global_resize: u32,
    /// Local crop side in pixels.
    pub local_resize: u32,
    /// Sampling window on the global token grid.
    pub sampling_window_size_g: usize,
    /// Sampling window on the local token grid.
    pub sampling_window_size_l: usize,
    /// Random in-window token choice (else the window's top-left token).
    pub random_sampling: bool,
    /// Horizontal flip probability (0 in the reference).
    pub flip_p: f64,
    /// Colour jitter probability per crop (0.8 in the reference). Colour jitter and grayscale
    /// teach invariance to colour, right for ImageNet-like data; for imagery where colour is the
    /// signal (vegetation) lower them, or the strengths in `color_jitter`.
    pub color_jitter_p: f64,
    /// Colour jitter strengths `[brightness, contrast, saturation, hue]` (torchvision's
    /// `ColorJitter` arguments; `[0.4, 0.4, 0.2, 0.1]` in the reference). Each factor is drawn
    /// whatever its strength, so changing one leaves the random stream of every later crop as it is.
    pub color_jitter: [f64; 4],
    /// Grayscale probability per crop (0.2 in the reference).
    pub grayscale_p: f64,
    /// Also keep each crop before the photometric transforms ([`AugView::crop`]); set by the
    /// trainer for multi-stage runs, never read from a configuration file.
    #[serde(skip)]
    pub keep_crops: bool,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            global_crops_scale_t: (0.8, 1.0),
            global_crops_scale_s: (0.5, 1.0),
            local_crops_scale: (0.1, 0.4),
            local_crops_number: 2,
            global_resize: 224,
            local_resize: 96,
            sampling_window_size_g: 3,
            sampling_window_size_l: 2,
            random_sampling: false,
            flip_p: 0.0,
            color_jitter_p: 0.8,
            color_jitter: [0.4, 0.4, 0.2, 0.1],
            grayscale_p: 0.2,
            keep_crops: false,
        }
    }
}

/// One augmented view: CHW normalised pixels and, for student views, the sampling mask.
#[derive(Debug, Clone)]
pub struct AugView {
    /// Side in pixels (square).
    pub size: u32,
    /// `[3, size, size]` normalised.
    pub pixels: Vec<f32>,
    /// `[grid*grid]` mask (1 = query), `None` for the teacher view.
    pub mask: Option<Vec<u8>>,
    /// With `keep_crops`: the crop normalised without colour jitter, blur or solarisation
    /// (the reference's `crops`, for the previous-stage model of multi-stage training).
    pub crop: Option<Vec<f32>>,
}

/// All views of one image, teacher first.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Teacher global, student global, locals.
    pub views: Vec<AugView>,
}

/// torchvision's `RandomResizedCrop.get_params` (ratio 3/4..4/3, 10 tries, centre fallback).
pub fn random_resized_crop_params(
    w: u32,
    h: u32,
    scale: (f64, f64),
    rng: &mut ChaCha8Rng,
) -> (u32, u32, u32, u32) {
    let area = f64::from(w) * f64::from(h);
    let (lr0, lr1) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let ratio = rng.random_range(lr0..=lr1).exp();
        let cw = (target * ratio).sqrt().round() as u32;
        let ch = (target / ratio).sqrt().round() as u32;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            let i = rng.random_range(0..=h - ch);
            let j = rng.random_range(0..=w - cw);
            return (j, i, cw, ch);
        }
    }
    // Fallback: whole image clamped to the ratio range, centred.
    let in_ratio = f64::from(w) / f64::from(h);
    let (cw, ch) = if in_ratio < 3.0 / 4.0 {
        (w, (f64::from(w) / (3.0 / 4.0)).round() as u32)
    } else if in_ratio > 4.0 / 3.0 {
        ((f64::from(h) * (4.0 / 3.0)).round() as u32, h)
    } else {
        (w, h)
    };
    let (cw, ch) = (cw.clamp(1, w), ch.clamp(1, h));
    ((w - cw) / 2, (h - ch) / 2, cw, ch)
}

fn random_resized_crop(
    img: &RgbImage,
    size: u32,
    scale: (f64, f64),
    rng: &mut ChaCha8Rng,
) -> RgbImage {
    let (x, y, cw, ch) = random_resized_crop_params(img.width(), img.height(), scale, rng);
    let crop = imageops::crop_imm(img, x, y, cw, ch).to_image();
    imageops::resize(&crop, size, size, imageops::FilterType::CatmullRom)
}

fn gray_u8(p: &image::Rgb<u8>) -> f32 {
    // PIL's "L" conversion (ITU-R 601-2 luma).
    (f32::from(p[0]) * 299.0 + f32::from(p[1]) * 587.0 + f32::from(p[2]) * 114.0) / 1000.0
}

fn blend(img: &mut RgbImage, other: impl Fn(&image::Rgb<u8>) -> [f32; 3], factor: f32) {
    for p in img.pixels_mut() {
        let o = other(p);
        for c in 0..3 {
            let v = o[c] + factor * (f32::from(p[c]) - o[c]);
            p[c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
}

fn adjust_hue(img: &mut RgbImage, shift: f32) {
    if shift == 0.0 {
        return;
    }
    for p in img.pixels_mut() {
        let [r, g, b] = [f32::from(p[0]) / 255.0, f32::from(p[1]) / 255.0, f32::from(p[2]) / 255.0];
        let max = r.max(g).max(b);
        let min = r.min(g).min(b);
        let d = max - min;
        let mut h = if d == 0.0 {
            0.0
        } else if max == r {
            ((g - b) / d).rem_euclid(6.0) / 6.0
        } else if max == g {
            ((b - r) / d + 2.0) / 6.0
        } else {
            ((r - g) / d + 4.0) / 6.0
        };
        let s = if max == 0.0 { 0.0 } else { d / max };
        let v = max;
        h = (h + shift).rem_euclid(1.0);
        let i = (h * 6.0).floor();
        let f = h * 6.0 - i;
        let (pp, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
        let (r, g, b) = match i as i32 % 6 {
            0 => (v, t, pp),
            1 => (q, v, pp),
            2 => (pp, v, t),
            3 => (pp, q, v),
            4 => (t, pp, v),
            _ => (v, pp, q),
        };
        *p = image::Rgb([
            (r * 255.0).round() as u8,
            (g * 255.0).round() as u8,
            (b * 255.0).round() as u8,
        ]);
    }
}

/// torchvision `ColorJitter(b, c, s, h)` (the reference: `(0.4, 0.4, 0.2, 0.1)`): the four
/// adjustments in random order.
fn color_jitter(img: &mut RgbImage, strength: [f64; 4], rng: &mut ChaCha8Rng) {
    let mut order = [0usize, 1, 2, 3];
    for i in (1..4).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    // One uniform draw per factor mapped onto its range, so that the stream does not depend on
    // the strengths (a zero strength gives the identity factor).
    let mut factor = |centre: f32, half: f64| {
        let u: f32 = rng.random_range(-1.0f32..=1.0);
        centre + u * half as f32
    };
    let b = factor(1.0, strength[0]);
    let c = factor(1.0, strength[1]);
    let s = factor(1.0, strength[2]);
    let h = factor(0.0, strength[3]);
    for op in order {
        match op {
            0 => blend(img, |_| [0.0; 3], b),
            1 => {
                let n = (img.width() * img.height()).max(1) as f32;
                let mean = img.pixels().map(gray_u8).sum::<f32>() / n;
                blend(img, |_| [mean; 3], c)
            }
            2 => blend(img, |p| [gray_u8(p); 3], s),
            _ => adjust_hue(img, h),
        }
    }
}

fn grayscale(img: &mut RgbImage) {
    for p in img.pixels_mut() {
        let l = gray_u8(p).round() as u8;
        *p = image::Rgb([l, l, l]);
    }
}

fn solarize(img: &mut RgbImage) {
    for p in img.pixels_mut() {
        for c in 0..3 {
            if p[c] >= 128 {
                p[c] = 255 - p[c];
            }
        }
    }
}

fn gaussian_blur(img: &RgbImage, p: f64, rng: &mut ChaCha8Rng) -> RgbImage {
    // utils.GaussianBlur: `random() <= p`, radius uniform in [0.1, 2].
    if rng.random::<f64>() <= p {
        let radius = rng.random_range(0.1f32..=2.0);
        imageops::blur(img, radius)
    } else {
        img.clone()
    }
}

/// The photometric part applied to every crop.
fn transformation(mut img: RgbImage, cfg: &AugmentConfig, rng: &mut ChaCha8Rng) -> RgbImage {
    if cfg.flip_p > 0.0 && rng.random::<f64>() < cfg.flip_p {
        img = imageops::flip_horizontal(&img);
    }
    // One draw each whatever the probability, so the random stream (and every later crop)
    // stays that of the reference when the defaults are used.
    if rng.random::<f64>() < cfg.color_jitter_p {
        color_jitter(&mut img, cfg.color_jitter, rng);
    }
    if rng.random::<f64>() < cfg.grayscale_p {
        grayscale(&mut img);
    }
    // utils.RandomSelect(GaussianBlur(0.5), [GaussianBlur(0.1), Solarization(0.2)], p=0.5)
    if rng.random::<f64>() < 0.5 {
        gaussian_blur(&img, 0.5, rng)
    } else {
        let mut out = gaussian_blur(&img, 0.1, rng);
        if rng.random::<f64>() < 0.2 {
            solarize(&mut out);
        }
        out
    }
}

/// `ToTensor` + `Normalize`: HWC u8 to CHW ImageNet-normalised f32.
pub fn normalize(img: &RgbImage) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = vec![0f32; 3 * w * h];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * w * h + i] = (f32::from(p[c]) / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
    out
}

/// Augments one image into the multi-crop sample.
pub fn augment(
    img: &RgbImage,
    cfg: &AugmentConfig,
    patch_size: usize,
    rng: &mut ChaCha8Rng,
) -> Sample {
    let teacher = random_resized_crop(img, cfg.global_resize, cfg.global_crops_scale_t, rng);
    let student = random_resized_crop(&teacher, cfg.global_resize, cfg.global_crops_scale_s, rng);
    let gfs = cfg.global_resize as usize / patch_size;
    let lfs = cfg.local_resize as usize / patch_size;
    let mut crops = vec![
        (teacher.clone(), None),
        (student, Some(sampling_mask(gfs, cfg.sampling_window_size_g, cfg.random_sampling, rng))),
    ];
    for _ in 0..cfg.local_crops_number {
        let local = random_resized_crop(&teacher, cfg.local_resize, cfg.local_crops_scale, rng);
        crops.push((
            local,
            Some(sampling_mask(lfs, cfg.sampling_window_size_l, cfg.random_sampling, rng)),
        ));
    }
    let views = crops
        .into_iter()
        .map(|(crop, mask)| {
            let size = crop.width();
            let plain = cfg.keep_crops.then(|| normalize(&crop));
            let img = transformation(crop, cfg, rng);
            AugView { size, pixels: normalize(&img), mask, crop: plain }
        })
        .collect();
    Sample { views }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn test_image() -> RgbImage {
        RgbImage::from_fn(120, 90, |x, y| {
            image::Rgb([(x * 2) as u8, (y * 2) as u8, ((x + y) % 255) as u8])
        })
    }

    #[test]
    fn views_have_the_configured_sizes_and_masks() {
        let cfg = AugmentConfig {
            global_resize: 64,
            local_resize: 32,
            sampling_window_size_g: 2,
            ..Default::default()
        };
        let s = augment(&test_image(), &cfg, 16, &mut ChaCha8Rng::seed_from_u64(1));
        assert_eq!(s.views.len(), 4);
        assert_eq!(s.views[0].size, 64);
        assert!(s.views[0].mask.is_none());
        assert_eq!(s.views[1].mask.as_ref().unwrap().len(), 16);
        assert_eq!(s.views[2].size, 32);
        assert_eq!(s.views[2].pixels.len(), 3 * 32 * 32);
        assert_eq!(s.views[3].mask.as_ref().unwrap().iter().filter(|&&m| m == 1).count(), 1);
    }

    #[test]
    fn seeded_augmentation_is_reproducible() {
        let cfg = AugmentConfig { global_resize: 64, local_resize: 32, ..Default::default() };
        let a = augment(&test_image(), &cfg, 16, &mut ChaCha8Rng::seed_from_u64(7));
        let b = augment(&test_image(), &cfg, 16, &mut ChaCha8Rng::seed_from_u64(7));
        let c = augment(&test_image(), &cfg, 16, &mut ChaCha8Rng::seed_from_u64(8));
        assert_eq!(a.views[1].pixels, b.views[1].pixels);
        assert_ne!(a.views[1].pixels, c.views[1].pixels);
    }

    /// `grayscale_p = 1` turns every view gray (equal channels before normalisation), and
    /// the default probabilities leave some views in colour.
    #[test]
    fn grayscale_and_jitter_follow_their_probabilities() {
        let gray_views = |cfg: &AugmentConfig, seed: u64| {
            let s = augment(&test_image(), cfg, 16, &mut ChaCha8Rng::seed_from_u64(seed));
            s.views
                .iter()
                .map(|v| {
                    let n = v.pixels.len() / 3;
                    let px = |c: usize, i: usize| {
                        v.pixels[c * n + i] * IMAGENET_STD[c] + IMAGENET_MEAN[c]
                    };
                    (0..n).all(|i| {
                        (px(0, i) - px(1, i)).abs() < 1e-4 && (px(1, i) - px(2, i)).abs() < 1e-4
                    })
                })
                .filter(|g| *g)
                .count()
        };
        let base = AugmentConfig { global_resize: 64, local_resize: 32, ..Default::default() };
        let all_gray = AugmentConfig { grayscale_p: 1.0, color_jitter_p: 0.0, ..base.clone() };
        let views = 2 + base.local_crops_number;
        for seed in 0..4 {
            assert_eq!(gray_views(&all_gray, seed), views, "seed {seed}");
        }
        let coloured: usize = (0..4).map(|seed| views - gray_views(&base, seed)).sum();
        assert!(coloured > 0, "the reference probabilities keep most views in colour");
    }

    /// Zero jitter strengths leave the pixels as they are, the reference strengths change them,
    /// and both consume the same random draws (later crops do not depend on the strengths).
    #[test]
    fn zero_jitter_strengths_are_the_identity_and_keep_the_stream() {
        let img = test_image();
        let (mut r0, mut r1) = (ChaCha8Rng::seed_from_u64(5), ChaCha8Rng::seed_from_u64(5));
        let (mut zero, mut full) = (img.clone(), img.clone());
        color_jitter(&mut zero, [0.0; 4], &mut r0);
        color_jitter(&mut full, AugmentConfig::default().color_jitter, &mut r1);
        assert_eq!(zero, img);
        assert_ne!(full, img);
        assert_eq!(r0.random::<u64>(), r1.random::<u64>());
    }

    #[test]
    fn crop_params_stay_inside_the_image() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..500 {
            let (x, y, w, h) = random_resized_crop_params(50, 200, (0.05, 1.0), &mut rng);
            assert!(w >= 1 && h >= 1 && x + w <= 50 && y + h <= 200);
        }
    }
}
