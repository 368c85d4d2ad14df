//! A light CenterNet-style detection head on a frozen FLSL backbone: `flsl train-detector`.
//!
//! The patch features `[N, D]` of the backbone (the EMA teacher of a checkpoint) are laid out
//! on their `gh x gw` grid, upsampled 2x by a transposed convolution (stride `patch / 2`
//! input pixels: 1/8 for patch 16, 1/4 for patch 8, for small aerial objects), then one 3x3
//! convolution and three 1x1 outputs: a per-class centre heatmap, the centre offset inside
//! the cell, and the log box size in cells. The exported graph applies sigmoid / sigmoid /
//! exp, matching the decoding contract of `flsl_runtime::perception::decode`.
//!
//! Training (backbone frozen): tiles of the training images in the 8 dihedral orientations
//! (aerial views have no "up") go through the backbone once; their features are cached and
//! the head is trained on them with Adam (burn's optimizer) on CenterNet's losses: the
//! penalty-reduced focal loss on Gaussian centre targets, L1 on the offsets and on the log
//! sizes at the centres. Held-out images are detected whole and scored with the COCO
//! evaluator (`flsl_runtime::eval`), the same code as `flsl eval-detections`.

pub mod annotations;

use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module, Param};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::activation::{log_sigmoid, relu, sigmoid};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use flsl_runtime::perception::Detection;
use flsl_runtime::perception::decode::{HeadDims, decode};
use flsl_runtime::perception::nms::nms;
use image::{RgbImage, imageops};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::annotations::{Annotated, Dataset};
use crate::augment::normalize;
use crate::checkpoint::{self, Part};
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::model::Vit;
use crate::tensors::{HostTensor, TensorMap};

/// Shape of the detection head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetHeadConfig {
    /// Backbone width `D`.
    pub in_dim: usize,
    /// Hidden channels.
    pub hidden: usize,
    /// Classes.
    pub classes: usize,
}

/// The head's layers; parameter names `det.{up,conv,heat,offset,size}.{weight,bias}`.
#[derive(Module, Debug)]
pub struct DetHead<B: Backend> {
    /// 2x upsampling, `[D, hidden, 2, 2]`.
    pub up: ConvTranspose2d<B>,
    /// 3x3 convolution, `[hidden, hidden, 3, 3]`.
    pub conv: Conv2d<B>,
    /// Heatmap logits, `[C, hidden, 1, 1]`.
    pub heat: Conv2d<B>,
    /// Offset logits, `[2, hidden, 1, 1]`.
    pub offset: Conv2d<B>,
    /// Log sizes in cells, `[2, hidden, 1, 1]`.
    pub size: Conv2d<B>,
}

/// Raw head outputs (before the graph's sigmoid / exp).
pub struct DetMaps<B: Backend> {
    /// `[B, C, 2gh, 2gw]` heatmap logits.
    pub heat: Tensor<B, 4>,
    /// `[B, 2, 2gh, 2gw]` offset logits.
    pub offset: Tensor<B, 4>,
    /// `[B, 2, 2gh, 2gw]` log box size in cells.
    pub log_size: Tensor<B, 4>,
}

impl DetHeadConfig {
    /// A head with seeded random weights; the heatmap bias starts at the CenterNet prior
    /// (`sigmoid(-2.19) = 0.1`).
    pub fn init<B: Backend>(&self, device: &B::Device, seed: u64) -> DetHead<B> {
        B::seed(device, seed);
        let (d, h, c) = (self.in_dim, self.hidden, self.classes);
        let one = |o: usize| Conv2dConfig::new([h, o], [1, 1]).init(device);
        let mut heat = one(c);
        heat.bias = Some(Param::from_tensor(Tensor::full([c], -2.19, device)));
        DetHead {
            up: ConvTranspose2dConfig::new([d, h], [2, 2]).with_stride([2, 2]).init(device),
            conv: Conv2dConfig::new([h, h], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device),
            heat,
            offset: one(2),
            size: one(2),
        }
    }
}

impl<B: Backend> DetHead<B> {
    /// `[B, N, D]` features on a `gh x gw` grid -> raw maps at twice the grid resolution.
    pub fn forward(&self, feats: Tensor<B, 3>, gh: usize, gw: usize) -> DetMaps<B> {
        let [b, _, d] = feats.dims();
        // The k = s = 2 transposed convolution has non-overlapping taps: it is one matmul with
        // the weight viewed as [D, hidden*2*2] and a pixel shuffle (burn-ndarray's direct
        // conv_transpose2d is ~100x slower). The exported graph uses ONNX ConvTranspose.
        let [_, hidden, _, _] = self.up.weight.val().dims();
        let w = self.up.weight.val().reshape([1, d, hidden * 4]);
        let x = feats
            .matmul(w)
            .reshape([b, gh, gw, hidden, 2, 2])
            .permute([0, 3, 1, 4, 2, 5])
            .reshape([b, hidden, 2 * gh, 2 * gw]);
        let x = match &self.up.bias {
            Some(bias) => x + bias.val().reshape([1, hidden, 1, 1]),
            None => x,
        };
        let x = relu(x);
        let x = relu(self.conv.forward(x));
        DetMaps {
            heat: self.heat.forward(x.clone()),
            offset: self.offset.forward(x.clone()),
            log_size: self.size.forward(x),
        }
    }

    /// Host tensors under the exported names.
    pub fn state_dict(&self) -> TensorMap {
        let mut m = TensorMap::new();
        let mut put = |name: &str, w: Tensor<B, 4>, b: Option<Tensor<B, 1>>| {
            m.insert(format!("det.{name}.weight"), HostTensor::from_tensor(w));
            if let Some(b) = b {
                m.insert(format!("det.{name}.bias"), HostTensor::from_tensor(b));
            }
        };
        put("up", self.up.weight.val(), self.up.bias.as_ref().map(|b| b.val()));
        for (name, c) in [
            ("conv", &self.conv),
            ("heat", &self.heat),
            ("offset", &self.offset),
            ("size", &self.size),
        ] {
            put(name, c.weight.val(), c.bias.as_ref().map(|b| b.val()));
        }
        m
    }

    /// Loads weights written by [`DetHead::state_dict`].
    pub fn load(mut self, map: &TensorMap, path: &Path, device: &B::Device) -> Result<Self> {
        let get4 = |name: &str, like: &Tensor<B, 4>| -> Result<Tensor<B, 4>> {
            let t = map
                .get(name)
                .ok_or_else(|| Error::MissingTensor { name: name.into(), path: path.into() })?;
            if t.shape != like.dims() {
                return Err(Error::ShapeMismatch {
                    name: name.into(),
                    path: path.into(),
                    expected: like.dims().to_vec(),
                    found: t.shape.clone(),
                });
            }
            Ok(t.to_device::<B, 4>(device))
        };
        let get1 = |name: &str, n: usize| -> Result<Tensor<B, 1>> {
            let t = map
                .get(name)
                .ok_or_else(|| Error::MissingTensor { name: name.into(), path: path.into() })?;
            if t.shape != [n] {
                return Err(Error::ShapeMismatch {
                    name: name.into(),
                    path: path.into(),
                    expected: vec![n],
                    found: t.shape.clone(),
                });
            }
            Ok(t.to_device::<B, 1>(device))
        };
        let w = get4("det.up.weight", &self.up.weight.val())?;
        let n = w.dims()[1];
        self.up.weight = Param::from_tensor(w);
        self.up.bias = Some(Param::from_tensor(get1("det.up.bias", n)?));
        for (name, c) in [
            ("conv", &mut self.conv),
            ("heat", &mut self.heat),
            ("offset", &mut self.offset),
            ("size", &mut self.size),
        ] {
            let w = get4(&format!("det.{name}.weight"), &c.weight.val())?;
            let n = w.dims()[0];
            c.weight = Param::from_tensor(w);
            c.bias = Some(Param::from_tensor(get1(&format!("det.{name}.bias"), n)?));
        }
        Ok(self)
    }
}

/// Dense CenterNet targets of one tile on an `h x w` map.
#[derive(Debug, Clone, PartialEq)]
pub struct Targets {
    /// `[C, h, w]` Gaussian centre targets (1 exactly at centres).
    pub heat: Vec<f32>,
    /// `[h, w]` 1 at centres.
    pub mask: Vec<f32>,
    /// `[2, h, w]` centre offsets in the cell.
    pub offset: Vec<f32>,
    /// `[2, h, w]` log box size in cells.
    pub log_size: Vec<f32>,
    /// Number of centres.
    pub num_pos: usize,
}

/// Targets for boxes `(xyxy in pixels, class)` on a map of `h x w` cells of `stride` pixels.
/// Gaussian per box with `sigma = size / 6` on each axis (at least half a cell).
pub fn make_targets(
    boxes: &[([f32; 4], usize)],
    classes: usize,
    h: usize,
    w: usize,
    stride: f32,
) -> Targets {
    let plane = h * w;
    let mut t = Targets {
        heat: vec![0.0; classes * plane],
        mask: vec![0.0; plane],
        offset: vec![0.0; 2 * plane],
        log_size: vec![0.0; 2 * plane],
        num_pos: 0,
    };
    for &(b, c) in boxes {
        let (bw, bh) = ((b[2] - b[0]) / stride, (b[3] - b[1]) / stride);
        if !(bw > 0.0 && bh > 0.0) || c >= classes {
            continue;
        }
        let (cx, cy) = ((b[0] + b[2]) / 2.0 / stride, (b[1] + b[3]) / 2.0 / stride);
        let (ix, iy) = (cx.floor(), cy.floor());
        if ix < 0.0 || iy < 0.0 || ix >= w as f32 || iy >= h as f32 {
            continue;
        }
        let (ix, iy) = (ix as usize, iy as usize);
        let (sx, sy) = ((bw / 6.0).max(0.5), (bh / 6.0).max(0.5));
        let (rx, ry) = ((3.0 * sx).ceil() as i64, (3.0 * sy).ceil() as i64);
        for y in (iy as i64 - ry).max(0)..=(iy as i64 + ry).min(h as i64 - 1) {
            for x in (ix as i64 - rx).max(0)..=(ix as i64 + rx).min(w as i64 - 1) {
                let (dx, dy) = (x as f32 - ix as f32, y as f32 - iy as f32);
                let g = (-(dx * dx) / (2.0 * sx * sx) - (dy * dy) / (2.0 * sy * sy)).exp();
                let v = &mut t.heat[c * plane + y as usize * w + x as usize];
                *v = v.max(g);
            }
        }
        let i = iy * w + ix;
        t.heat[c * plane + i] = 1.0;
        if t.mask[i] == 0.0 {
            t.num_pos += 1;
        }
        t.mask[i] = 1.0;
        t.offset[i] = cx - ix as f32;
        t.offset[plane + i] = cy - iy as f32;
        t.log_size[i] = bw.ln();
        t.log_size[plane + i] = bh.ln();
    }
    t
}

/// The loss terms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DetLoss {
    /// Total.
    pub total: f64,
    /// Focal heatmap loss.
    pub heat: f64,
    /// L1 offset loss.
    pub offset: f64,
    /// L1 log-size loss.
    pub size: f64,
}

/// CenterNet's losses on a batch; returns the differentiable total and the terms' tensors.
pub fn det_loss<B: Backend>(
    maps: &DetMaps<B>,
    heat_t: Tensor<B, 4>,
    mask: Tensor<B, 4>,
    offset_t: Tensor<B, 4>,
    log_size_t: Tensor<B, 4>,
    num_pos: usize,
) -> [Tensor<B, 1>; 4] {
    let n = num_pos.max(1) as f64;
    let x = maps.heat.clone();
    let p = sigmoid(x.clone());
    let pos = heat_t.clone().equal_elem(1.0).float();
    let neg_w = (heat_t.neg() + 1.0).powf_scalar(4.0) * (pos.clone().neg() + 1.0);
    let pos_term = pos * (p.clone().neg() + 1.0).powf_scalar(2.0) * log_sigmoid(x.clone());
    let neg_term = neg_w * p.powf_scalar(2.0) * log_sigmoid(x.neg());
    let heat = (pos_term + neg_term).sum().neg() / n;
    let offset = ((sigmoid(maps.offset.clone()) - offset_t).abs() * mask.clone()).sum() / n;
    let size = ((maps.log_size.clone() - log_size_t).abs() * mask).sum() / n;
    let total = heat.clone() + offset.clone() + size.clone();
    [total, heat, offset, size]
}

/// `flsl train-detector` options.
#[derive(Debug, Clone)]
pub struct DetectorOptions {
    /// Backbone checkpoint (a run folder, checkpoint folder or weights file).
    pub checkpoint: PathBuf,
    /// Annotation sources (COCO JSON, VOC XML, VisDrone txt, or folders of them).
    pub annotations: Vec<PathBuf>,
    /// Folder of the images named by VOC/VisDrone files.
    pub images: Option<PathBuf>,
    /// Images (file names) held out for evaluation.
    pub holdout: Vec<String>,
    /// Merge every class into this one.
    pub single_class: Option<String>,
    /// Output folder.
    pub out: PathBuf,
    /// Training steps.
    pub steps: usize,
    /// Tiles per step.
    pub batch: usize,
    /// Tile side in pixels (rounded down to a multiple of the patch size).
    pub tile: usize,
    /// Image scale applied before tiling (1 = native resolution).
    pub scale: f32,
    /// Hidden channels of the head.
    pub hidden: usize,
    /// Peak learning rate (Adam).
    pub lr: f64,
    /// Seed.
    pub seed: u64,
    /// Score threshold for the evaluation detections.
    pub score_threshold: f32,
    /// Where progress goes (nowhere by default; the CLI draws bars).
    pub progress: crate::progress::Reporter,
}

impl DetectorOptions {
    /// The defaults for `checkpoint` and `out`: the embedded NEON tree crowns, OSBS_029 held out.
    pub fn neon(checkpoint: PathBuf, out: PathBuf) -> Self {
        let data = crate::data::default_data().parent().map(Path::to_path_buf).unwrap_or_default();
        Self {
            checkpoint,
            annotations: vec![
                data.join("trees.coco.json"),
                data.join("soap061_alive_dead.coco.json"),
            ],
            images: None,
            holdout: vec!["OSBS_029.png".into()],
            single_class: Some("tree".into()),
            out,
            steps: 400,
            batch: 8,
            tile: 128,
            scale: 0.5,
            hidden: 64,
            lr: 2e-3,
            seed: 0,
            score_threshold: 0.05,
            progress: Default::default(),
        }
    }
}

/// What `detector.json` records next to `det_head.safetensors`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetectorMeta {
    /// Head shape.
    pub head: DetHeadConfig,
    /// Class names by id.
    pub classes: Vec<String>,
    /// Backbone weights used.
    pub backbone: PathBuf,
    /// Patch size of the backbone.
    pub patch_size: usize,
    /// Input pixels per map cell.
    pub stride: f32,
    /// Image scale used in training (apply it at inference).
    pub scale: f32,
    /// Training tile side in pixels.
    pub tile: usize,
}

/// What training reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetectorReport {
    /// Metadata written beside the weights.
    pub meta: DetectorMeta,
    /// Training tiles (after the 8 orientations).
    pub tiles: usize,
    /// Loss at the first and last 20 steps (means).
    pub loss_start: DetLoss,
    /// Loss over the last 20 steps.
    pub loss_end: DetLoss,
    /// COCO statistics on the held-out images (our evaluator), when any.
    pub holdout_stats: Option<serde_json::Value>,
    /// Held-out ground truth and detections as COCO files (for pycocotools).
    pub holdout_files: Option<(PathBuf, PathBuf)>,
    /// Seconds spent caching backbone features and training.
    pub seconds: (f64, f64),
}

/// Loads the backbone (teacher) of a checkpoint for inference.
pub fn load_backbone<B: Backend>(
    checkpoint: &Path,
    device: &B::Device,
) -> Result<(Vit<B>, PathBuf)> {
    let (file, cfg) = crate::checkpoint::resolve_checkpoint(checkpoint, Part::Teacher)?;
    let map = checkpoint::read_weights(&file, Part::Teacher)?;
    let vit_cfg = match cfg {
        Some(c) => {
            let text = std::fs::read_to_string(&c).map_err(|e| Error::io("cannot read", &c, e))?;
            let cfg: TrainConfig = serde_json::from_str(&text)
                .map_err(|e| Error::malformed("json", &c, e.to_string()))?;
            cfg.vit_config()?
        }
        None => {
            let src =
                crate::export::load_source(checkpoint, &crate::export::ExportOptions::default())?;
            let s = src.spec;
            let rows = map
                .get("backbone.pos_embed")
                .or_else(|| map.get("pos_embed"))
                .map_or(0, |t| t.numel() / s.embed_dim.max(1));
            let g = (rows as f64).sqrt().floor() as usize;
            crate::model::VitConfig::new(s.embed_dim, s.depth, s.num_heads)
                .with_patch_size(s.patch_size)
                .with_img_size(g * s.patch_size)
                .with_mlp_ratio(s.mlp_hidden as f64 / s.embed_dim as f64)
        }
    };
    let vit = checkpoint::load_vit(vit_cfg.init::<B>(device), &map, &file)?;
    Ok((vit, file))
}

/// The 8 dihedral transforms of a square tile and its boxes.
fn dihedral(
    img: &RgbImage,
    boxes: &[([f32; 4], usize)],
    k: usize,
) -> (RgbImage, Vec<([f32; 4], usize)>) {
    let s = img.width() as f32;
    let mut im = img.clone();
    let mut bx: Vec<([f32; 4], usize)> = boxes.to_vec();
    for _ in 0..(k % 4) {
        im = imageops::rotate90(&im); // clockwise: (x, y) -> (s - y, x)
        for (b, _) in &mut bx {
            *b = [s - b[3], b[0], s - b[1], b[2]];
        }
    }
    if k >= 4 {
        im = imageops::flip_horizontal(&im);
        for (b, _) in &mut bx {
            *b = [s - b[2], b[1], s - b[0], b[3]];
        }
    }
    (im, bx)
}

/// A training tile and its boxes (`[x0, y0, x1, y1]` pixels, class).
type Tile = (RgbImage, Vec<([f32; 4], usize)>);

/// Tiles of `img` (side `t`, stride `t/2`, the last one flush with the border) with the boxes
/// that keep at least half their area inside, clipped.
fn tiles(img: &RgbImage, boxes: &[([f32; 4], usize)], t: u32) -> Vec<Tile> {
    let starts = |len: u32| -> Vec<u32> {
        if len <= t {
            return vec![0];
        }
        let mut v: Vec<u32> = (0..).map(|i| i * (t / 2)).take_while(|&s| s + t <= len).collect();
        if v.last().is_some_and(|&l| l + t < len) {
            v.push(len - t);
        }
        v
    };
    let mut out = Vec::new();
    for y in starts(img.height()) {
        for x in starts(img.width()) {
            let mut tile = RgbImage::new(t, t);
            imageops::overlay(&mut tile, &imageops::crop_imm(img, x, y, t, t).to_image(), 0, 0);
            let (fx, fy) = (x as f32, y as f32);
            let kept = boxes
                .iter()
                .filter_map(|&(b, c)| {
                    let cl = [
                        (b[0] - fx).max(0.0),
                        (b[1] - fy).max(0.0),
                        (b[2] - fx).min(t as f32),
                        (b[3] - fy).min(t as f32),
                    ];
                    let area = |b: &[f32; 4]| (b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0);
                    (area(&cl) >= 0.5 * area(&b) && area(&cl) > 0.0).then_some((cl, c))
                })
                .collect();
            out.push((tile, kept));
        }
    }
    out
}

fn scaled(img: &RgbImage, scale: f32) -> RgbImage {
    if (scale - 1.0).abs() < 1e-6 {
        return img.clone();
    }
    let (w, h) = (
        ((img.width() as f32 * scale).round() as u32).max(1),
        ((img.height() as f32 * scale).round() as u32).max(1),
    );
    imageops::resize(img, w, h, imageops::FilterType::CatmullRom)
}

fn open_rgb(path: &Path) -> Result<RgbImage> {
    Ok(flsl_runtime::preprocess::decode_image_file(path)
        .map_err(|e| Error::malformed("image", path, e.to_string()))?
        .to_rgb8())
}

/// Backbone features of one normalised image `[3, h, w]` -> `[N * D]` host.
fn features<B: Backend>(vit: &Vit<B>, imgs: &[&RgbImage], device: &B::Device) -> Vec<f32> {
    let (w, h) = (imgs[0].width() as usize, imgs[0].height() as usize);
    let data: Vec<f32> = imgs.iter().flat_map(|i| normalize(i)).collect();
    let x = Tensor::<B, 4>::from_data(TensorData::new(data, [imgs.len(), 3, h, w]), device);
    vit.forward(x).into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default()
}

/// Detections of a trained head on a whole image (cropped to a multiple of the patch size),
/// in the image's own pixels.
pub fn detect_image<B: Backend>(
    vit: &Vit<B>,
    head: &DetHead<B>,
    meta: &DetectorMeta,
    img: &RgbImage,
    threshold: f32,
    device: &B::Device,
) -> Result<Vec<Detection>> {
    let im = scaled(img, meta.scale);
    let p = meta.patch_size as u32;
    let (w, h) = (im.width() / p * p, im.height() / p * p);
    if w == 0 || h == 0 {
        return Err(Error::Shape {
            op: "detect",
            reason: format!("image {}x{} is smaller than one patch", img.width(), img.height()),
        });
    }
    let im = imageops::crop_imm(&im, 0, 0, w, h).to_image();
    let (gh, gw) = ((h / p) as usize, (w / p) as usize);
    let f = features(vit, &[&im], device);
    let d = f.len() / (gh * gw);
    let feats = Tensor::<B, 3>::from_data(TensorData::new(f, [1, gh * gw, d]), device);
    let maps = head.forward(feats, gh, gw);
    let heat = sigmoid(maps.heat).into_data().convert::<f32>().to_vec::<f32>().unwrap_or_default();
    let boxes = Tensor::cat(vec![sigmoid(maps.offset), maps.log_size.exp()], 1)
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default();
    let dims = HeadDims::new(meta.head.classes, 2 * gh, 2 * gw, meta.stride);
    let mut out = vec![Detection::EMPTY; 300];
    let count = decode(&heat, &boxes, &dims, threshold, &mut out)
        .map_err(|e| Error::runtime("decoding the detection head", e))?;
    out.truncate(count.written);
    let kept = nms(&mut out, 0.5);
    out.truncate(kept);
    let inv = 1.0 / meta.scale;
    Ok(out.into_iter().map(|d| Detection { bbox: d.bbox.map(|v| v * inv), ..d }).collect())
}

/// COCO ground truth + results for `images` (file names as given), written to `dir`.
fn write_coco(
    dir: &Path,
    classes: &[String],
    gt: &[(&Annotated, (u32, u32))],
    dets: &[Vec<Detection>],
) -> Result<(PathBuf, PathBuf)> {
    let mut images = Vec::new();
    let mut anns = Vec::new();
    let mut results = Vec::new();
    for (i, ((a, (w, h)), ds)) in gt.iter().zip(dets).enumerate() {
        let id = i + 1;
        images.push(serde_json::json!({"id": id, "file_name": a.image.file_name().map(|f| f.to_string_lossy().to_string()), "width": w, "height": h}));
        for b in &a.boxes {
            let [x0, y0, x1, y1] = b.xyxy;
            let c = classes.iter().position(|c| *c == b.class).unwrap_or(0) + 1;
            anns.push(serde_json::json!({"id": anns.len() + 1, "image_id": id, "category_id": c, "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}));
        }
        for d in ds {
            let [x0, y0, x1, y1] = d.bbox;
            results.push(serde_json::json!({"image_id": id, "category_id": d.class as usize + 1, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": d.score}));
        }
    }
    let cats: Vec<_> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| serde_json::json!({"id": i + 1, "name": c}))
        .collect();
    let gt_path = dir.join("holdout.gt.json");
    let dt_path = dir.join("holdout.dt.json");
    let gtv = serde_json::json!({"images": images, "annotations": anns, "categories": cats});
    write_json(&gt_path, &gtv, false)?;
    write_json(&dt_path, &results, false)?;
    Ok((gt_path, dt_path))
}

/// Trains the head on a frozen backbone, evaluates it on the held-out images, writes
/// `det_head.safetensors`, `detector.json`, `report.json` and the held-out COCO files to
/// `opts.out`.
pub fn train_detector<B: AutodiffBackend>(
    opts: &DetectorOptions,
    device: B::Device,
) -> Result<DetectorReport> {
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io("cannot create", &opts.out, e))?;
    let inner = device.clone();
    let (vit, backbone_file) = load_backbone::<B::InnerBackend>(&opts.checkpoint, &inner)?;
    let p = vit.patch_size();
    let d = vit.embed_dim();
    let tile = (opts.tile / p * p).max(p);
    let ds =
        Dataset::load(&opts.annotations, opts.images.as_deref(), opts.single_class.as_deref())?;
    if ds.classes.is_empty() {
        return Err(Error::Config {
            key: "annotations".into(),
            reason: "no boxes in the annotation files".into(),
        });
    }
    let is_holdout = |a: &Annotated| {
        a.image.file_name().is_some_and(|f| opts.holdout.iter().any(|h| f.to_string_lossy() == *h))
    };
    let (held, train_imgs): (Vec<&Annotated>, Vec<&Annotated>) =
        ds.images.iter().partition(|a| is_holdout(a));
    if train_imgs.is_empty() {
        return Err(Error::Config {
            key: "holdout".into(),
            reason: "every annotated image is held out: nothing to train on".into(),
        });
    }
    let classes = ds.classes.len();
    let head_cfg = DetHeadConfig { in_dim: d, hidden: opts.hidden, classes };
    let stride = p as f32 / 2.0;
    let meta = DetectorMeta {
        head: head_cfg,
        classes: ds.classes.clone(),
        backbone: backbone_file,
        patch_size: p,
        stride,
        scale: opts.scale,
        tile,
    };

    // Cache the frozen backbone's features of every tile in the 8 orientations.
    let t0 = std::time::Instant::now();
    let mut samples: Vec<Tile> = Vec::new();
    for a in &train_imgs {
        let img = scaled(&open_rgb(&a.image)?, opts.scale);
        let boxes: Vec<([f32; 4], usize)> = a
            .boxes
            .iter()
            .map(|b| (b.xyxy.map(|v| v * opts.scale), ds.class_id(&b.class).unwrap_or(0)))
            .collect();
        for (t, b) in tiles(&img, &boxes, tile as u32) {
            for k in 0..8 {
                samples.push(dihedral(&t, &b, k));
            }
        }
    }
    let g = tile / p;
    let (hs, ws) = (2 * g, 2 * g);
    let n_samples = samples.len() as u64;
    let mut cached = 0u64;
    opts.progress.report("backbone features", 0, n_samples, String::new);
    let mut cache: Vec<(Vec<f32>, Targets)> = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(8) {
        let imgs: Vec<&RgbImage> = chunk.iter().map(|(i, _)| i).collect();
        let f = features(&vit, &imgs, &inner);
        for (j, (_, b)) in chunk.iter().enumerate() {
            cache.push((
                f[j * g * g * d..(j + 1) * g * g * d].to_vec(),
                make_targets(b, classes, hs, ws, stride),
            ));
        }
        cached += chunk.len() as u64;
        opts.progress.report("backbone features", cached, n_samples, String::new);
    }
    let cache_s = t0.elapsed().as_secs_f64();
    tracing::info!(tiles = cache.len(), seconds = cache_s, "backbone features cached");

    // Train the head.
    let t1 = std::time::Instant::now();
    let mut head: DetHead<B> = head_cfg.init(&device, opts.seed);
    let mut optim = AdamConfig::new().init::<B, DetHead<B>>();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let n_steps = opts.steps as u64;
    opts.progress.report("detector", 0, n_steps, String::new);
    let mut losses: Vec<DetLoss> = Vec::with_capacity(opts.steps);
    for step in 0..opts.steps {
        let idx: Vec<usize> = (0..opts.batch).map(|_| rng.random_range(0..cache.len())).collect();
        let bsz = idx.len();
        let mut f = Vec::with_capacity(bsz * g * g * d);
        let (mut ht, mut mt, mut ot, mut st) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut num_pos = 0;
        for &i in &idx {
            let (feat, t) = &cache[i];
            f.extend_from_slice(feat);
            ht.extend_from_slice(&t.heat);
            for _ in 0..2 {
                mt.extend_from_slice(&t.mask);
            }
            ot.extend_from_slice(&t.offset);
            st.extend_from_slice(&t.log_size);
            num_pos += t.num_pos;
        }
        let t4 = |v: Vec<f32>, c: usize| {
            Tensor::<B, 4>::from_data(TensorData::new(v, [bsz, c, hs, ws]), &device)
        };
        let feats = Tensor::<B, 3>::from_data(TensorData::new(f, [bsz, g * g, d]), &device);
        let maps = head.forward(feats, g, g);
        let [total, lh, lo, ls] =
            det_loss(&maps, t4(ht, classes), t4(mt, 2), t4(ot, 2), t4(st, 2), num_pos);
        let scalar = |t: &Tensor<B, 1>| {
            t.clone()
                .into_data()
                .convert::<f64>()
                .to_vec::<f64>()
                .ok()
                .and_then(|v| v.first().copied())
                .unwrap_or(f64::NAN)
        };
        let l = DetLoss {
            total: scalar(&total),
            heat: scalar(&lh),
            offset: scalar(&lo),
            size: scalar(&ls),
        };
        if !l.total.is_finite() {
            return Err(Error::NonFinite { step, terms: format!("{l:?}") });
        }
        losses.push(l);
        let grads = GradientsParams::from_grads(total.backward(), &head);
        let warm = 20.0f64;
        let lr = if (step as f64) < warm {
            opts.lr * (step as f64 + 1.0) / warm
        } else {
            let t = (step as f64 - warm) / (opts.steps as f64 - warm).max(1.0);
            opts.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()) + 1e-6
        };
        head = optim.step(lr, head, grads);
        opts.progress
            .report("detector", step as u64 + 1, n_steps, || format!("loss {:.3}", l.total));
        if step % 50 == 0 || step + 1 == opts.steps {
            tracing::info!(
                step,
                loss = l.total,
                heat = l.heat,
                offset = l.offset,
                size = l.size,
                "detector training"
            );
        }
    }
    let train_s = t1.elapsed().as_secs_f64();
    let mean = |ls: &[DetLoss]| {
        let n = ls.len().max(1) as f64;
        DetLoss {
            total: ls.iter().map(|l| l.total).sum::<f64>() / n,
            heat: ls.iter().map(|l| l.heat).sum::<f64>() / n,
            offset: ls.iter().map(|l| l.offset).sum::<f64>() / n,
            size: ls.iter().map(|l| l.size).sum::<f64>() / n,
        }
    };
    let k = losses.len().min(20);
    let (loss_start, loss_end) = (mean(&losses[..k]), mean(&losses[losses.len() - k..]));

    let head = head.valid();
    crate::tensors::write_safetensors(
        &opts.out.join("det_head.safetensors"),
        &head.state_dict(),
        None,
    )?;
    write_json(&opts.out.join("detector.json"), &meta, true)?;

    // Evaluate on the held-out images.
    let (mut holdout_stats, mut holdout_files) = (None, None);
    if !held.is_empty() {
        let mut gt = Vec::new();
        let mut dets = Vec::new();
        for a in &held {
            let img = open_rgb(&a.image)?;
            dets.push(detect_image(&vit, &head, &meta, &img, opts.score_threshold, &inner)?);
            gt.push((*a, (img.width(), img.height())));
        }
        let (g, dt) = write_coco(&opts.out, &ds.classes, &gt, &dets)?;
        let stats = flsl_runtime::eval::evaluate_files(&g, &dt)
            .map_err(|e| Error::runtime("coco evaluation", e))?;
        holdout_stats = serde_json::from_str(&stats.to_json()).ok();
        holdout_files = Some((g, dt));
    }
    let report = DetectorReport {
        meta,
        tiles: cache.len(),
        loss_start,
        loss_end,
        holdout_stats,
        holdout_files,
        seconds: (cache_s, train_s),
    };
    write_json(&opts.out.join("report.json"), &report, true)?;
    Ok(report)
}

/// Serialises `v` and writes it atomically; a value that does not serialise (a non-finite
/// float in a map key, say) is an error naming the file, never an empty file.
fn write_json(path: &Path, v: &impl Serialize, pretty: bool) -> Result<()> {
    let text = if pretty { serde_json::to_vec_pretty(v) } else { serde_json::to_vec(v) }
        .map_err(|e| Error::malformed("json", path, format!("cannot serialise: {e}")))?;
    crate::tensors::write_atomic(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_put_one_at_each_centre_with_offsets_and_log_sizes() {
        // A 16x8 box centred at (20, 12) on a 4-px map of 10x10 cells.
        let t = make_targets(&[([12.0, 8.0, 28.0, 16.0], 0)], 1, 10, 10, 4.0);
        assert_eq!(t.num_pos, 1);
        let i = 3 * 10 + 5; // cell (5, 3): 20/4 = 5.0, 12/4 = 3.0
        assert_eq!(t.heat[i], 1.0);
        assert_eq!(t.mask[i], 1.0);
        assert!((t.offset[i] - 0.0).abs() < 1e-6 && (t.offset[100 + i] - 0.0).abs() < 1e-6);
        assert!(
            (t.log_size[i] - 4f32.ln()).abs() < 1e-6
                && (t.log_size[100 + i] - 2f32.ln()).abs() < 1e-6
        );
        assert!(t.heat.iter().filter(|&&v| v == 1.0).count() == 1);
        assert!(t.heat[i + 1] > 0.0 && t.heat[i + 1] < 1.0);
    }

    #[test]
    fn dihedral_transforms_keep_boxes_on_the_same_pixels() {
        let mut img = RgbImage::new(8, 8);
        for y in 1..3 {
            for x in 4..7 {
                img.put_pixel(x, y, image::Rgb([255, 0, 0]));
            }
        }
        let b = [([4.0, 1.0, 7.0, 3.0], 0usize)];
        for k in 0..8 {
            let (im, bx) = dihedral(&img, &b, k);
            let [x0, y0, x1, y1] = bx[0].0;
            for y in 0..8u32 {
                for x in 0..8u32 {
                    let inside =
                        (x as f32) >= x0 && (x as f32) < x1 && (y as f32) >= y0 && (y as f32) < y1;
                    assert_eq!(
                        im.get_pixel(x, y)[0] == 255,
                        inside,
                        "k={k} ({x},{y}) box {:?}",
                        bx[0].0
                    );
                }
            }
        }
    }
}
