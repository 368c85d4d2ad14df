//! The training configuration: every hyper-parameter of the reference's argument parser
//! (same names), its defaults being the paper's ViT-S/16 recipe, plus presets.
//!
//! Files are TOML; unknown keys and wrong types are errors naming the key.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::augment::AugmentConfig;
use crate::error::{Error, Result};
use crate::model::{FlslHeadConfig, VitConfig};

fn merge(into: &mut toml::Table, from: toml::Table) {
    for (k, v) in from {
        match (into.get_mut(&k), v) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
            (_, v) => {
                into.insert(k, v);
            }
        }
    }
}

/// Distillation from a frozen teacher (`flsl distill`; `docs/DISTILL.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// The teacher: a run or checkpoint folder of ours (its `config.json` gives the
    /// architecture) or a weights file beside such a `config.json`.
    pub teacher: PathBuf,
    /// SHA-256 of the teacher's weights file, recorded when the run starts and checked on
    /// resume (a changed teacher cannot resume exactly).
    #[serde(default)]
    pub teacher_sha256: Option<String>,
    /// Weight of the feature-alignment term `1 - cos(P x_s, x_t)` (0: no projection `P`,
    /// prototype and mean-shift terms only).
    #[serde(default = "default_feature_weight")]
    pub feature_weight: f64,
}

fn default_feature_weight() -> f64 {
    1.0
}

/// The full training configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    // Model.
    /// `vit_tiny`, `vit_small`, `vit_base`, or `custom` (then `embed_dim`, `depth`, `num_heads`).
    pub arch: String,
    /// Patch side in pixels.
    pub patch_size: usize,
    /// Width for `arch = "custom"`.
    pub embed_dim: usize,
    /// Blocks for `arch = "custom"`.
    pub depth: usize,
    /// Heads for `arch = "custom"`.
    pub num_heads: usize,
    /// MLP ratio for `arch = "custom"` (presets use 4).
    pub mlp_ratio: f64,
    /// Number of prototypes `K` (the head's output width).
    pub out_dim: usize,
    /// Head MLP hidden width.
    pub head_hidden_dim: usize,
    /// Head bottleneck width.
    pub head_bottleneck_dim: usize,
    /// Fix the prototype norms at 1.
    pub norm_last_layer: bool,
    /// Base EMA momentum of the teacher (cosine to 1).
    pub momentum_teacher: f64,
    /// DINO-style teacher centering.
    pub teacher_centering: bool,
    /// The volume-maximisation regulariser.
    pub volume_maximization: bool,
    /// Final LayerNorm on the backbone output.
    pub post_layernorm: bool,
    /// LayerNorm on the modes (not supported: must stay false).
    pub layernorm_on_mode: bool,
    // Temperatures.
    /// Student temperature.
    pub student_temp: f64,
    /// Teacher temperature after warm-up.
    pub teacher_temp: f64,
    /// Teacher temperature at epoch 0.
    pub warmup_teacher_temp: f64,
    /// Epochs of teacher-temperature warm-up.
    pub warmup_teacher_temp_epochs: usize,
    /// Intra-view mean-shift temperature (multiplier), default `0.1/sqrt(384)`.
    pub meanshift_sa_temp: f64,
    /// Inter-view mean-shift temperature (multiplier), default `0.2/sqrt(384)`.
    pub meanshift_ca_temp: f64,
    /// Start of the intra-view temperature cosine schedule (default: constant).
    pub meanshift_sa_temp_start: Option<f64>,
    /// Start of the inter-view temperature cosine schedule (default: constant).
    pub meanshift_ca_temp_start: Option<f64>,
    // Optimisation.
    /// Half precision: the backbones run in bfloat16 with f32 master weights, optimizer and
    /// loss (`StepOptions::half`; the reference's flag, whose fp16 + loss scaling this maps
    /// to bfloat16, which needs no scaling).
    pub use_fp16: bool,
    /// Weight decay at the start (cosine).
    pub weight_decay: f64,
    /// Weight decay at the end.
    pub weight_decay_end: f64,
    /// Per-parameter gradient clipping threshold (0 disables).
    pub clip_grad: f64,
    /// Images per step.
    pub batch_size_per_gpu: usize,
    /// Epochs.
    pub epochs: usize,
    /// Epochs with a frozen prototype layer.
    pub freeze_last_layer: usize,
    /// Peak learning rate for a batch of 256 (linear scaling rule).
    pub lr: f64,
    /// Fraction of the epochs used for linear warm-up.
    pub warmup_epochs: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Stochastic depth rate.
    pub drop_path_rate: f64,
    // Multi-crop and sampling.
    /// Augmentation (the `[augment]` table).
    pub augment: AugmentConfig,
    // Loss.
    /// `(ups, eta, gam)`.
    pub loss_coefficients: [f64; 3],
    /// Start of the intra-view coefficient cosine schedule (default: constant).
    pub start_intraview: Option<f64>,
    // Multi-stage training (reference `--model_previous_stage`).
    /// Checkpoint of the previous stage (its teacher guides the inter-view mean shift).
    pub model_previous_stage: Option<PathBuf>,
    /// Blocks of the previous-stage model used for its attention map.
    pub attention_level: usize,
    /// Temperature of the previous-stage cross-attention.
    pub prev_ca_temp: f64,
    /// Mixture bias of the previous-stage map.
    pub mixture_bias: f64,
    /// Sharpness of the previous-stage map.
    pub map_sharpness: f64,
    /// Fixed sin-cos position table (reference default); `false`: a learnable one.
    pub sin_cos_pos_emb: bool,
    // Distillation (`flsl distill`).
    /// A frozen teacher whose prototype assignments (and features) the student learns
    /// (the `[distill]` table; see `docs/DISTILL.md`). `None`: self-supervised pretraining.
    pub distill: Option<DistillConfig>,
    // Data and run.
    /// Image folder (recursive).
    pub data_path: PathBuf,
    /// File names under `data_path` left out of training (held-out images).
    pub holdout: Vec<String>,
    /// Cut images larger than 1.5 tiles into tiles of about this size (aerial orthophotos).
    pub tile_size: Option<u32>,
    /// Samples per epoch (default: the dataset size).
    pub epoch_len: Option<usize>,
    /// Output folder (logs, checkpoints, plots).
    pub output_dir: PathBuf,
    /// Keep a checkpoint every this many epochs (besides the rolling latest).
    pub saveckp_freq: usize,
    /// Also save the rolling latest every this many steps (0: only at epoch ends).
    pub checkpoint_every_steps: usize,
    /// Seed of everything random.
    pub seed: u64,
    /// Data-loading threads.
    pub num_workers: usize,
    /// `cpu`, `cuda` or `cuda:N`; several comma-separated devices (`cuda:0,cuda:1`) train
    /// data-parallel, `batch_size_per_gpu` samples on each (burn-collective all-reduce).
    pub device: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            arch: "vit_small".into(),
            patch_size: 16,
            embed_dim: 384,
            depth: 12,
            num_heads: 6,
            mlp_ratio: 4.0,
            out_dim: 8192,
            head_hidden_dim: 2048,
            head_bottleneck_dim: 256,
            norm_last_layer: true,
            momentum_teacher: 0.996,
            teacher_centering: false,
            volume_maximization: true,
            post_layernorm: true,
            layernorm_on_mode: false,
            student_temp: 0.1,
            teacher_temp: 0.04,
            warmup_teacher_temp: 0.04,
            warmup_teacher_temp_epochs: 0,
            meanshift_sa_temp: 0.1 / 384f64.sqrt(),
            meanshift_ca_temp: 0.2 / 384f64.sqrt(),
            meanshift_sa_temp_start: None,
            meanshift_ca_temp_start: None,
            use_fp16: false,
            weight_decay: 0.04,
            weight_decay_end: 0.4,
            clip_grad: 3.0,
            batch_size_per_gpu: 64,
            epochs: 100,
            freeze_last_layer: 1,
            lr: 5e-4,
            warmup_epochs: 0.1,
            min_lr: 1e-6,
            drop_path_rate: 0.1,
            augment: AugmentConfig::default(),
            loss_coefficients: [0.03, 1.0, 5.0],
            start_intraview: None,
            model_previous_stage: None,
            attention_level: 11,
            prev_ca_temp: 0.2 / 384f64.sqrt(),
            mixture_bias: 1.0,
            map_sharpness: 1e4,
            sin_cos_pos_emb: true,
            distill: None,
            data_path: PathBuf::from("data"),
            holdout: Vec::new(),
            tile_size: None,
            epoch_len: None,
            output_dir: PathBuf::from("runs/flsl"),
            saveckp_freq: 20,
            checkpoint_every_steps: 0,
            seed: 0,
            num_workers: 2,
            device: "cpu".into(),
        }
    }
}

impl TrainConfig {
    /// A preset by name: `vit_small16` (the paper's recipe) or `tiny` (a small CPU run).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "vit_small16" | "paper" => Ok(Self::default()),
            "vit_tiny16" => Ok(Self { arch: "vit_tiny".into(), ..Self::default() }),
            "tiny" => Ok(Self::tiny()),
            other => Err(Error::Config {
                key: "preset".into(),
                reason: format!("unknown preset `{other}` (vit_small16, vit_tiny16, tiny)"),
            }),
        }
    }

    /// A small configuration that trains in minutes on a 2-core CPU: a 4-block, 128-wide ViT
    /// with 8-pixel patches on 96-pixel global and 48-pixel local crops.
    pub fn tiny() -> Self {
        Self {
            arch: "custom".into(),
            patch_size: 8,
            embed_dim: 128,
            depth: 4,
            num_heads: 4,
            mlp_ratio: 2.0,
            out_dim: 64,
            head_hidden_dim: 256,
            head_bottleneck_dim: 64,
            batch_size_per_gpu: 16,
            epochs: 10,
            lr: 5e-4 * 4.0,
            warmup_epochs: 0.1,
            drop_path_rate: 0.0,
            clip_grad: 3.0,
            momentum_teacher: 0.99,
            augment: AugmentConfig {
                global_resize: 96,
                local_resize: 48,
                sampling_window_size_g: 3,
                sampling_window_size_l: 2,
                local_crops_scale: (0.1, 0.4),
                ..AugmentConfig::default()
            },
            ..Self::default()
        }
    }

    /// Reads a TOML file on top of the defaults (or of `base`).
    pub fn from_toml_file(path: &Path, base: Option<Self>) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io("cannot read config", path, e))?;
        Self::from_toml_str(&text, base).map_err(|e| match e {
            Error::Config { key, reason } => {
                Error::Config { key, reason: format!("{reason} (in {})", path.display()) }
            }
            other => other,
        })
    }

    /// Parses TOML on top of `base` (defaults when `None`).
    pub fn from_toml_str(text: &str, base: Option<Self>) -> Result<Self> {
        let overlay: toml::Table = text
            .parse::<toml::Table>()
            .map_err(|e| Error::Config { key: "<toml>".into(), reason: e.to_string() })?;
        let mut merged = toml::Table::try_from(base.unwrap_or_default())
            .map_err(|e| Error::Config { key: "<toml>".into(), reason: e.to_string() })?;
        merge(&mut merged, overlay);
        // Deserialise from text so that errors carry a span: the key is read from its line.
        let doc = toml::to_string(&merged)
            .map_err(|e| Error::Config { key: "<toml>".into(), reason: e.to_string() })?;
        let cfg: Self = toml::from_str(&doc).map_err(|e: toml::de::Error| {
            let msg = e.message().to_string();
            let key = msg
                .split('`')
                .nth(1)
                .map(str::to_string)
                .or_else(|| {
                    let span = e.span()?;
                    let start = doc[..span.start].rfind('\n').map_or(0, |i| i + 1);
                    let line = doc[start..].lines().next()?;
                    let table = doc[..start]
                        .lines()
                        .rev()
                        .find(|l| l.starts_with('['))
                        .map(|t| t.trim_matches(['[', ']']).to_string());
                    let k = line.split('=').next()?.trim().to_string();
                    Some(match table {
                        Some(t) => format!("{t}.{k}"),
                        None => k,
                    })
                })
                .unwrap_or_else(|| "<toml>".into());
            Error::Config { key, reason: msg }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Applies `key=value` overrides (TOML values: `lr=1e-3`, `arch="vit_tiny"`).
    pub fn with_overrides(self, overrides: &[String]) -> Result<Self> {
        let mut text = String::new();
        for o in overrides {
            let (k, v) = o.split_once('=').ok_or_else(|| Error::Config {
                key: o.clone(),
                reason: "expected key=value".into(),
            })?;
            let v = v.trim();
            // Bare words become strings: `device=cpu`.
            let needs_quotes = v.parse::<toml::Value>().is_err()
                && !v.starts_with(['[', '"', '\'', '{'])
                && v.parse::<f64>().is_err()
                && v != "true"
                && v != "false";
            let v = if needs_quotes { format!("{v:?}") } else { v.to_string() };
            text.push_str(&format!("{} = {}\n", k.trim(), v));
        }
        Self::from_toml_str(&text, Some(self))
    }

    /// Number of data-parallel replicas (devices listed in `device`; 1 when it does not parse,
    /// which [`TrainConfig::validate`] reports).
    pub fn world_size(&self) -> usize {
        crate::backend::parse_devices(&self.device).map_or(1, |d| d.len().max(1))
    }

    /// Checks values; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: String| Err(Error::Config { key: key.into(), reason });
        if self.batch_size_per_gpu == 0 {
            return bad("batch_size_per_gpu", "must be at least 1".into());
        }
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", format!("{} must be a positive number", self.lr));
        }
        if !(0.0..1.0).contains(&self.warmup_epochs) {
            return bad(
                "warmup_epochs",
                format!("{} is a fraction of the epochs, in [0, 1)", self.warmup_epochs),
            );
        }
        if !(0.0..=1.0).contains(&self.momentum_teacher) {
            return bad("momentum_teacher", format!("{} must be in [0, 1]", self.momentum_teacher));
        }
        if self.student_temp <= 0.0 || self.teacher_temp <= 0.0 || self.warmup_teacher_temp <= 0.0 {
            return bad("teacher_temp", "temperatures must be positive".into());
        }
        if self.layernorm_on_mode {
            return bad("layernorm_on_mode", "not supported; set it to false".into());
        }
        if !self.post_layernorm {
            return bad(
                "post_layernorm",
                "only the post-LayerNorm backbone is supported; set it to true".into(),
            );
        }
        if self.model_previous_stage.is_some() {
            if !(0.0..=1.0).contains(&self.mixture_bias) {
                return bad("mixture_bias", format!("{} must be in [0, 1]", self.mixture_bias));
            }
            if !(self.map_sharpness > 0.0 && self.map_sharpness.is_finite()) {
                return bad(
                    "map_sharpness",
                    format!("{} must be a positive number", self.map_sharpness),
                );
            }
            if self.attention_level == 0 {
                return bad("attention_level", "must be at least 1".into());
            }
        }
        if let Some(d) = &self.distill {
            if !(d.feature_weight >= 0.0 && d.feature_weight.is_finite()) {
                return bad(
                    "distill.feature_weight",
                    format!("{} must be a finite number >= 0", d.feature_weight),
                );
            }
            if self.model_previous_stage.is_some() {
                return bad(
                    "distill",
                    "distillation and multi-stage training (model_previous_stage) do not combine"
                        .into(),
                );
            }
        }
        let a = &self.augment;
        for (key, (lo, hi)) in [
            ("global_crops_scale_t", a.global_crops_scale_t),
            ("global_crops_scale_s", a.global_crops_scale_s),
            ("local_crops_scale", a.local_crops_scale),
        ] {
            if !(0.0 < lo && lo <= hi && hi <= 1.0) {
                return bad(key, format!("({lo}, {hi}) must satisfy 0 < min <= max <= 1"));
            }
        }
        for (key, p) in [
            ("flip_p", a.flip_p),
            ("color_jitter_p", a.color_jitter_p),
            ("grayscale_p", a.grayscale_p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(key, format!("{p} must be a probability in [0, 1]"));
            }
        }
        let [b, c, sat, hue] = a.color_jitter;
        if !([b, c, sat].iter().all(|v| (0.0..=1.0).contains(v)) && (0.0..=0.5).contains(&hue)) {
            return bad(
                "color_jitter",
                format!(
                    "{:?} must be [brightness, contrast, saturation] in [0, 1] and hue in [0, 0.5]",
                    a.color_jitter
                ),
            );
        }
        if !(a.global_resize as usize).is_multiple_of(self.patch_size)
            || !(a.local_resize as usize).is_multiple_of(self.patch_size)
        {
            return bad(
                "global_resize",
                format!(
                    "crop sizes {} / {} must be multiples of patch_size {}",
                    a.global_resize, a.local_resize, self.patch_size
                ),
            );
        }
        let (gfs, lfs) =
            (a.global_resize as usize / self.patch_size, a.local_resize as usize / self.patch_size);
        if a.sampling_window_size_g == 0 || a.sampling_window_size_g > gfs {
            return bad(
                "sampling_window_size_g",
                format!("{} must be in 1..={gfs}", a.sampling_window_size_g),
            );
        }
        if a.local_crops_number > 0
            && (a.sampling_window_size_l == 0 || a.sampling_window_size_l > lfs)
        {
            return bad(
                "sampling_window_size_l",
                format!("{} must be in 1..={lfs}", a.sampling_window_size_l),
            );
        }
        // The device list parses (an error names the list and what is wrong with it).
        crate::backend::parse_devices(&self.device)?;
        self.vit_config()?.validate()?;
        self.head_config().validate()
    }

    /// The backbone configuration.
    pub fn vit_config(&self) -> Result<VitConfig> {
        let base = match self.arch.as_str() {
            "custom" => VitConfig::new(self.embed_dim, self.depth, self.num_heads)
                .with_mlp_ratio(self.mlp_ratio),
            a => VitConfig::preset(a).ok_or_else(|| Error::Config {
                key: "arch".into(),
                reason: format!(
                    "unknown architecture `{a}` (vit_tiny, vit_small, vit_base, custom)"
                ),
            })?,
        };
        Ok(base
            .with_patch_size(self.patch_size)
            .with_img_size(self.augment.global_resize as usize)
            .with_drop_path_rate(self.drop_path_rate)
            .with_sincos_pos(self.sin_cos_pos_emb))
    }

    /// The head configuration.
    pub fn head_config(&self) -> FlslHeadConfig {
        let d = self.vit_config().map(|c| c.embed_dim).unwrap_or(self.embed_dim);
        FlslHeadConfig::new(d, self.out_dim)
            .with_hidden_dim(self.head_hidden_dim)
            .with_bottleneck_dim(self.head_bottleneck_dim)
            .with_norm_last_layer(self.norm_last_layer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_paper_recipe() {
        let c = TrainConfig::default();
        assert_eq!((c.arch.as_str(), c.patch_size, c.out_dim), ("vit_small", 16, 8192));
        assert_eq!(c.loss_coefficients, [0.03, 1.0, 5.0]);
        assert!((c.meanshift_sa_temp - 0.005103103630798288).abs() < 1e-15);
        c.validate().unwrap();
        TrainConfig::tiny().validate().unwrap();
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = TrainConfig::from_toml_str("lr = -1.0", None).unwrap_err().to_string();
        assert!(e.contains("`lr`"), "{e}");
        let e = TrainConfig::from_toml_str("lr = \"fast\"", None).unwrap_err().to_string();
        assert!(e.contains("lr"), "{e}");
        let e = TrainConfig::from_toml_str("learning_rate = 0.1", None).unwrap_err().to_string();
        assert!(e.contains("learning_rate"), "{e}");
        let e = TrainConfig::default()
            .with_overrides(&["augment.sampling_window_size_g=99".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("sampling_window_size_g"), "{e}");
        let e = TrainConfig::default()
            .with_overrides(&["augment.color_jitter_p=1.5".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("color_jitter_p") && e.contains("probability"), "{e}");
        let e = TrainConfig::default()
            .with_overrides(&["augment.color_jitter=[0.4, 0.4, 0.2, 0.7]".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("color_jitter") && e.contains("hue"), "{e}");
        let e =
            TrainConfig::default().with_overrides(&["device=tpu".into()]).unwrap_err().to_string();
        assert!(e.contains("device"), "{e}");
        let e = TrainConfig::default()
            .with_overrides(&["device=\"cuda:0,cpu\"".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("device") && e.contains("mixes"), "{e}");
        let e = TrainConfig::default()
            .with_overrides(&["device=\"cuda:1,cuda:1\"".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("device") && e.contains("twice"), "{e}");
    }

    #[test]
    fn device_lists_give_the_replica_count() {
        use crate::backend::{DeviceChoice, parse_devices};
        assert_eq!(
            parse_devices("cuda:0,cuda:1").unwrap(),
            vec![DeviceChoice::Cuda(0), DeviceChoice::Cuda(1)]
        );
        assert_eq!(
            parse_devices("cuda:2,3").unwrap(),
            vec![DeviceChoice::Cuda(2), DeviceChoice::Cuda(3)]
        );
        assert_eq!(parse_devices("cpu, cpu").unwrap(), vec![DeviceChoice::Cpu, DeviceChoice::Cpu]);
        let c = TrainConfig::default()
            .with_overrides(&["device=\"cuda:0,cuda:1,cuda:2\"".into()])
            .unwrap();
        assert_eq!(c.world_size(), 3);
        assert_eq!(TrainConfig::default().world_size(), 1);
    }

    #[test]
    fn overrides_and_round_trip() {
        let c = TrainConfig::tiny()
            .with_overrides(&[
                "epochs=3".into(),
                "arch=vit_tiny".into(),
                "augment.local_crops_scale=[0.2, 0.5]".into(),
            ])
            .unwrap();
        assert_eq!(c.epochs, 3);
        assert_eq!(c.arch, "vit_tiny");
        assert_eq!(c.augment.local_crops_scale, (0.2, 0.5));
        let text = toml::to_string(&c).unwrap();
        assert_eq!(TrainConfig::from_toml_str(&text, None).unwrap(), c);
    }
}
