//! `flsl demo`: pretrain a small FLSL ViT on the embedded aerial images, then show how its
//! patch features cluster on held-out images.
//!
//! Writes to the output folder: `cluster_<image>.png` (image | prototype assignment | k-means
//! of the features, for the trained and for a randomly initialised backbone | k-means of plain
//! patch colour, the baseline to beat), `loss.png`, `report.md` and `report.json`, with the
//! crown/ground separation of each map where the image has crown boxes.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::Serialize;

use crate::cluster::{self, ClusterMap};
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::model::FlslModel;
use crate::trainer::{Run, TrainOptions, train};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Image folder (default: the repository's `data/neon-aerial-trees/images`).
    pub data: PathBuf,
    /// Output folder.
    pub out: PathBuf,
    /// Training steps.
    pub steps: usize,
    /// Held-out images (file names in `data`).
    pub held_out: Vec<String>,
    /// Where training progress goes (nowhere by default; the CLI draws a bar).
    pub progress: crate::progress::Reporter,
}

pub use crate::data::default_data;

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            data: default_data(),
            out: PathBuf::from("out/demo"),
            steps: 240,
            held_out: vec!["OSBS_029.png".into(), "SOAP_031.png".into()],
            progress: Default::default(),
        }
    }
}

/// Per held-out image.
#[derive(Debug, Clone, Serialize)]
pub struct HeldOut {
    /// File name.
    pub image: String,
    /// Overlay PNG.
    pub overlay: PathBuf,
    /// Distinct prototypes on the image (trained model).
    pub prototypes_on_image: usize,
    /// Crown/ground separation ([`cluster::crown_separation`]) of the k-means maps (when the
    /// image has crown boxes).
    pub crown_separation: Scores,
    /// Linear decodability of crown vs ground from the features, whatever the clustering
    /// ([`cluster::crown_probe_auc`], ROC AUC; 0.5 = none).
    pub crown_probe: Scores,
}

/// One score for each of the three feature sets the demo compares (`None` without crown boxes).
#[derive(Debug, Clone, Serialize)]
pub struct Scores {
    /// The trained backbone's features.
    pub trained: Option<f64>,
    /// The same backbone at its initialisation, before training (same seed as the trainer).
    pub random: Option<f64>,
    /// Plain patch colour ([`cluster::patch_colour_features`]).
    pub colour: Option<f64>,
}

/// The demo's summary.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// Training configuration.
    pub config: TrainConfig,
    /// Steps run.
    pub steps: usize,
    /// Wall-clock training seconds.
    pub train_seconds: f64,
    /// Loss at the first step.
    pub loss_start: f64,
    /// Mean loss over the last 10 steps.
    pub loss_end: f64,
    /// Prototypes used by the teacher in the last epoch, of `out_dim`.
    pub prototypes_used: usize,
    /// Normalised assignment entropy in the last epoch.
    pub assignment_entropy: f64,
    /// Held-out images.
    pub held_out: Vec<HeldOut>,
}

fn voc_for(data: &Path, image: &str) -> Option<PathBuf> {
    let stem = Path::new(image).file_stem()?.to_string_lossy().into_owned();
    let p = data.parent()?.join("annotations_voc").join(format!("{stem}.xml"));
    p.exists().then_some(p)
}

/// Side the held-out images are resized to before the backbone.
const MAP_SIDE: u32 = 256;
/// Clusters in the k-means maps: enough for crown, sunlit ground and shadow to each get one.
pub const MAP_CLUSTERS: usize = 4;

/// The prototype map, the k-means map and the features (with their width) of one image.
fn maps<B: Backend>(
    model: &FlslModel<B>,
    img: &image::RgbImage,
    device: &B::Device,
) -> Result<(ClusterMap, ClusterMap, Vec<f32>, usize)> {
    let (feats, d, proto) = cluster::image_features(model, img, MAP_SIDE, device);
    let km = ClusterMap {
        gh: proto.gh,
        gw: proto.gw,
        labels: cluster::kmeans(&feats, d, MAP_CLUSTERS, 20)?,
    };
    Ok((proto, km, feats, d))
}

/// Runs the demo.
pub fn run_demo<B: AutodiffBackend>(opts: &DemoOptions, device: B::Device) -> Result<DemoReport> {
    if !opts.data.is_dir() {
        return Err(Error::Config {
            key: "data".into(),
            reason: format!("{} is not a folder of images", opts.data.display()),
        });
    }
    let steps_per_epoch = 4;
    let mut cfg = TrainConfig::tiny();
    cfg.data_path = opts.data.clone();
    cfg.output_dir = opts.out.clone();
    cfg.holdout = opts.held_out.clone();
    cfg.tile_size = Some(256);
    cfg.epoch_len = Some(steps_per_epoch * cfg.batch_size_per_gpu);
    cfg.epochs = opts.steps.div_ceil(steps_per_epoch).max(1);
    cfg.saveckp_freq = 0;
    // A learnable position table (the reference's `--sin_cos_pos_emb false`): the fixed sin-cos
    // table (RMS 1/sqrt(2) ~ 0.71, against ~0.02 * sqrt(3 * 8 * 8) ~ 0.28 for the initial patch
    // embedding of unit-variance pixels) dominated the features after a few CPU minutes (the
    // k-means split was left/right, not crowns/ground).
    cfg.sin_cos_pos_emb = false;
    // A learning rate for a run of a few hundred steps: the tiny preset's 2e-3 per 256 images is
    // 1.25e-4 at batch 16, with which 240 steps moved the weights by about 2 % of their initial
    // RMS (the features stayed those of the random initialisation). 1.6e-2 per 256 (1e-3 here).
    cfg.lr = 0.016;
    // Mean-shift inverse temperatures for 128-wide features: the reference's 0.1/sqrt(384) and
    // 0.2/sqrt(384) multiply dot products of LayerNorm-ed tokens, which grow with the width, and
    // at width 128 give almost uniform attention (every token's mode is the view's mean; the
    // reference README says the same of its width-32 cases). Measured over 240 demo steps
    // (docs/DEMO.md): reference values 11 of 64 prototypes in use, x3 (width-scaled) 20, these 38.
    cfg.meanshift_sa_temp = 0.05;
    cfg.meanshift_ca_temp = 0.1;
    cfg.validate()?;
    // A fresh demo each time: an old run folder would be resumed otherwise.
    let ckpt = crate::trainer::checkpoints_dir(&cfg.output_dir);
    if ckpt.exists() {
        std::fs::remove_dir_all(&ckpt).map_err(|e| Error::io("cannot clear", &ckpt, e))?;
    }
    let log = cfg.output_dir.join("log.jsonl");
    if log.exists() {
        std::fs::remove_file(&log).map_err(|e| Error::io("cannot clear", &log, e))?;
    }
    // The trained model's own starting point (the trainer initialises the student under the
    // same seed), so that the "random init" panel and scores are reproducible and compare the
    // training with where it began.
    let (vit, head) = (cfg.vit_config()?, cfg.head_config());
    let random_model = crate::model::layers::with_seed(cfg.seed, || {
        FlslModel::<B::InnerBackend>::init(&vit, &head, &device)
    });
    let t0 = Instant::now();
    let run = train(
        Run::<B>::new(cfg.clone(), device.clone())?,
        &TrainOptions { max_steps: Some(opts.steps), progress: opts.progress.clone() },
    )?;
    let train_seconds = t0.elapsed().as_secs_f64();
    let hist = &run.state.history;
    let loss_start = hist.first().map_or(f64::NAN, |h| h.1.total);
    let tail: Vec<f64> = hist.iter().rev().take(10).map(|h| h.1.total).collect();
    let loss_end = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
    let last = run.state.epochs.last();

    let teacher = run.student.valid(); // the student is what was optimised; see report
    let teacher = if run.state.step > 0 { run.teacher.clone() } else { teacher };
    let mut held = Vec::new();
    for name in &opts.held_out {
        let path = opts.data.join(name);
        let img = flsl_runtime::preprocess::decode_image_file(&path)
            .map_err(|e| Error::malformed("image", &path, e.to_string()))?
            .to_rgb8();
        let (proto, km, feats, d_feat) = maps(&teacher, &img, &device)?;
        let (_, km_rand, feats_rand, _) = maps(&random_model, &img, &device)?;
        let boxes = voc_for(&opts.data, name).map(|p| cluster::read_voc_boxes(&p)).transpose()?;
        let (w, h) = (img.width() as f32, img.height() as f32);
        let sep =
            |m: &ClusterMap| boxes.as_ref().and_then(|b| cluster::crown_separation(m, b, w, h));
        let probe = |f: &[f32], d: usize| {
            boxes.as_ref().and_then(|b| cluster::crown_probe_auc(f, d, km.gh, km.gw, b, w, h))
        };
        let (colour, d) = cluster::patch_colour_features(&img, MAP_SIDE, cfg.patch_size as u32);
        let km_colour = ClusterMap {
            gh: km.gh,
            gw: km.gw,
            labels: cluster::kmeans(&colour, d, MAP_CLUSTERS, 20)?,
        };
        let show = image::imageops::resize(
            &img,
            384,
            384 * img.height() / img.width().max(1),
            image::imageops::FilterType::Triangle,
        );
        let out = opts.out.join(format!(
            "cluster_{}.png",
            Path::new(name).file_stem().map_or("img".into(), |s| s.to_string_lossy())
        ));
        cluster::save_panels(
            &out,
            &[
                show.clone(),
                cluster::overlay(&show, &proto),
                cluster::overlay(&show, &km),
                cluster::overlay(&show, &km_rand),
                cluster::overlay(&show, &km_colour),
            ],
        )?;
        let mut protos = proto.labels.clone();
        protos.sort_unstable();
        protos.dedup();
        held.push(HeldOut {
            image: name.clone(),
            overlay: out,
            prototypes_on_image: protos.len(),
            crown_separation: Scores {
                trained: sep(&km),
                random: sep(&km_rand),
                colour: sep(&km_colour),
            },
            crown_probe: Scores {
                trained: probe(&feats, d_feat),
                random: probe(&feats_rand, d_feat),
                colour: probe(&colour, d),
            },
        });
    }
    let report = DemoReport {
        config: cfg.clone(),
        steps: run.state.step,
        train_seconds,
        loss_start,
        loss_end,
        prototypes_used: last.map_or(0, |e| e.prototypes_used),
        assignment_entropy: last.map_or(0.0, |e| e.assignment_entropy),
        held_out: held,
    };
    crate::tensors::write_atomic(
        &opts.out.join("report.json"),
        &serde_json::to_vec_pretty(&report).expect("report serialises"),
    )?;
    crate::tensors::write_atomic(&opts.out.join("report.md"), render_markdown(&report).as_bytes())?;
    Ok(report)
}

/// The human-readable report.
pub fn render_markdown(r: &DemoReport) -> String {
    let c = &r.config;
    let mut s = String::new();
    s.push_str("# flsl demo report\n\n");
    s.push_str(&format!(
        "Model: ViT {}x{} (patch {}, {} heads), head {} -> {} prototypes. Crops {} px global, {} px local ({} locals), batch {}.\n\n",
        c.embed_dim, c.depth, c.patch_size, c.num_heads, c.head_hidden_dim, c.out_dim, c.augment.global_resize, c.augment.local_resize,
        c.augment.local_crops_number, c.batch_size_per_gpu
    ));
    s.push_str(&format!(
        "Training: {} steps in {:.0} s ({:.2} s/step) on the CPU backend ({}).\n\n",
        r.steps,
        r.train_seconds,
        r.train_seconds / r.steps.max(1) as f64,
        crate::backend::CPU_BACKEND
    ));
    s.push_str(&format!(
        "Loss: {:.4} at the first step, {:.4} over the last 10 steps.\n\n",
        r.loss_start, r.loss_end
    ));
    s.push_str(&format!(
        "Collapse monitor: the teacher used {} of {} prototypes in the last epoch (normalised assignment entropy {:.3}; 0 would be collapse).\n\n",
        r.prototypes_used, c.out_dim, r.assignment_entropy
    ));
    s.push_str(&format!(
        "| held-out image | prototypes on it | crown separation J, k-means k={MAP_CLUSTERS}: trained | random init | colour only | crown probe AUC: trained | random init | colour only |\n|---|---|---|---|---|---|---|---|\n"
    ));
    for h in &r.held_out {
        let f = |v: Option<f64>| v.map_or("n/a (no boxes)".to_string(), |v| format!("{v:.3}"));
        let cells = |c: &Scores| format!("{} | {} | {}", f(c.trained), f(c.random), f(c.colour));
        s.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            h.image,
            h.prototypes_on_image,
            cells(&h.crown_separation),
            cells(&h.crown_probe)
        ));
    }
    s.push_str(&format!("\nPanels in `cluster_*.png`: image | prototype assignment (trained teacher) | k-means k={MAP_CLUSTERS} of the trained features | of a randomly initialised backbone's | of plain patch colour (mean and spread of R, G, B per patch).\n"));
    s.push_str(&format!("Crown separation J: crown patches = centre in the central {:.0} % of a tree-crown box, ground patches = outside every box; J = recall on crown minus false-positive rate on ground for the best set of clusters called crown (0 = none, 1 = perfect).\n", cluster::CROWN_CORE * 100.0));
    s.push_str("Crown probe AUC: a ridge classifier of crown vs ground patches fitted on one half of the image and tested on the other (both ways), how much crown information the features hold whatever the clustering (0.5 = none, 1 = linearly separable).\n");
    s
}
