//! Multi-stage training (reference `--model_previous_stage`): a frozen model from an earlier
//! stage guides the inter-view mean shift.
//!
//! The previous stage's teacher backbone, cut to its first `attention_level` blocks and without
//! the final LayerNorm (`make_vit_noclass(post_layernorm=False)`), runs on the crops *before*
//! the photometric augmentation. Its cross-attention from each student query to the teacher
//! view's tokens, sharpened (`utils.attention_map`: `sigmoid(sharpness * (a - mean a))`,
//! renormalised), is mixed into the inter-view attention,
//! `a = mix * a + (1 - mix) * a_prev` (renormalised), with `mix` following
//! `mixture_schedule` (cosine from 0 to `1 - mixture_bias`).
//!
//! The official `train_one_batch_multistage` cannot run as written (its caller passes the
//! arguments of `train_one_epoch` out of order and it reads an undefined `args` for
//! `prev_ca_temp` / `map_sharpness`); this follows its evident intent with the configured
//! `prev_ca_temp` and `map_sharpness`.

use std::path::Path;

use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};

use crate::checkpoint::{self, Part};
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::model::Vit;

/// The frozen previous-stage backbone and its attention-map settings.
#[derive(Debug, Clone)]
pub struct PreviousStage<B: Backend> {
    /// The previous stage's teacher backbone, first `attention_level` blocks only.
    pub vit: Vit<B>,
    /// Temperature of its cross-attention (`prev_ca_temp`, a multiplier).
    pub temp: f64,
    /// Sigmoid sharpness of its map (`map_sharpness`).
    pub sharpness: f64,
}

impl<B: Backend> PreviousStage<B> {
    /// Loads `cfg.model_previous_stage` (a checkpoint folder or run folder of ours, or the
    /// official code's `.pth`; the teacher is read, as the reference does).
    pub fn load(cfg: &TrainConfig, device: &B::Device) -> Result<Option<Self>> {
        let Some(path) = &cfg.model_previous_stage else { return Ok(None) };
        let vit_cfg = cfg.vit_config()?;
        if cfg.attention_level == 0 || cfg.attention_level > vit_cfg.depth {
            return Err(Error::Config {
                key: "attention_level".into(),
                reason: format!(
                    "{} is not in 1..={} (the backbone's blocks)",
                    cfg.attention_level, vit_cfg.depth
                ),
            });
        }
        let (file, _) = crate::checkpoint::resolve_checkpoint(Path::new(path), Part::Teacher)
            .map_err(|e| Error::Config {
                key: "model_previous_stage".into(),
                reason: format!("{}: {e}", path.display()),
            })?;
        let map = checkpoint::read_weights(&file, Part::Teacher)?;
        let mut vit = checkpoint::load_vit(vit_cfg.init::<B>(device), &map, &file)?;
        vit.blocks.truncate(cfg.attention_level);
        Ok(Some(Self { vit: vit.no_grad(), temp: cfg.prev_ca_temp, sharpness: cfg.map_sharpness }))
    }

    /// Token features after `attention_level` blocks, no final LayerNorm.
    ///
    /// # Shapes
    /// `[B, 3, H, W] -> [B, N, D]`.
    pub fn features(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let mut t = self.vit.prepare_tokens(x);
        for blk in &self.vit.blocks {
            t = blk.forward(t);
        }
        t
    }

    /// A copy on another device (data-parallel replicas).
    pub fn to_device(&self, device: &B::Device) -> Self {
        Self { vit: self.vit.clone().fork(device), temp: self.temp, sharpness: self.sharpness }
    }
}
