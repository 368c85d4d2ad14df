//! Distillation: a frozen FLSL teacher (any size and patch) teaches a smaller student with
//! FLSL's own objective (`flsl distill`; the objective term by term is in `docs/DISTILL.md`).
//!
//! Per student view (every global and local crop of the multi-crop), the teacher sees **the
//! same crop**, so each student token has a teacher region by position:
//! - **grid alignment**: with student patch `p_s` and teacher patch `p_t`, the factor is
//!   `f = max(1, round(p_s / p_t))`; the teacher gets the crop resized (bilinear) to
//!   `f * p_t` pixels per student token (no resize when `p_s = f * p_t`, e.g. 16 -> 8 or equal
//!   patches), so its grid is exactly `f` times the student's, and its per-token outputs are
//!   averaged over the `f x f` teacher tokens under each student token;
//! - **k-means term**: the teacher's prototype logits of the region, from its head on its own
//!   intra-view mean-shift modes (as FLSL's teacher head always sees modes), with the run's
//!   centering and teacher-temperature schedule, against the student head's logits on the
//!   student's modes (the pretraining cross-entropy, same code);
//! - **mean-shift term**: the student's own intra-view mean shift, unchanged, so its features
//!   keep clustering;
//! - **feature term** (weight `feature_weight`, 0 turns it off): `1 - cos(P x_s, x_t)`, `P` a
//!   learned linear projection of the student's selected tokens onto the teacher's width, `x_t`
//!   the teacher's region features (pooled like the logits);
//! - the volume-maximisation regulariser stays as in pretraining.
//!
//! The EMA of the student (the run's `teacher` slot in checkpoints) is kept as in pretraining,
//! so `flsl export`/`quantize`/`detect` take a distillation run folder like any other; the
//! frozen teacher is read from its own file at start and resume (its SHA-256 is recorded in the
//! run's configuration and checked).

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Tensor, backend::Backend};

use crate::checkpoint::{self, Part};
use crate::config::TrainConfig;
use crate::error::{Error, Result};
use crate::meanshift::attention;
use crate::model::{FlslHeadConfig, FlslModel, VitConfig};
use crate::tensors::TensorMap;

pub mod report;

/// The frozen teacher of a distillation run.
#[derive(Debug, Clone)]
pub struct DistillTeacher<B: Backend> {
    /// Backbone and head, no gradients.
    pub model: FlslModel<B>,
    /// The teacher's intra-view mean-shift temperature (a multiplier; its own configuration's,
    /// else the reference's default `0.1 / sqrt(384)`).
    pub sa_temp: f64,
    /// Weight of the feature-alignment term.
    pub feature_weight: f64,
    /// The weights file it was read from.
    pub file: PathBuf,
    /// Its architecture in one line ([`describe`]).
    pub arch: String,
}

/// What the teacher's head is applied to in [`DistillTeacher::targets`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadInput {
    /// Its own intra-view mean-shift modes (training targets: FLSL's head sees modes).
    Modes,
    /// Its features (what an exported model's `prototype_logits` output is: the report).
    Features,
}

/// A teacher's weights and architecture, read from a run, checkpoint or weights file.
#[derive(Debug, Clone)]
pub struct TeacherSource {
    /// The weights file.
    pub file: PathBuf,
    /// Reference-named tensors (`backbone.*`, `head.*`).
    pub weights: TensorMap,
    /// Backbone architecture.
    pub vit: VitConfig,
    /// Head architecture.
    pub head: FlslHeadConfig,
    /// Intra-view mean-shift temperature.
    pub sa_temp: f64,
}

/// Reads a teacher: a run or checkpoint folder of ours (`config.json` gives the architecture)
/// or a weights file (ours or the official code's `.pth`; architecture from the tensor shapes,
/// heads `D / 64` where no `config.json` is beside it). The teacher network of a checkpoint is
/// read (the EMA teacher, what the reference evaluates).
pub fn teacher_source(path: &Path) -> Result<TeacherSource> {
    let (file, cfg_path) = crate::checkpoint::resolve_checkpoint(path, Part::Teacher)?;
    let weights = checkpoint::read_weights(&file, Part::Teacher)?;
    if let Some(c) = cfg_path {
        let text = std::fs::read_to_string(&c).map_err(|e| Error::io("cannot read", &c, e))?;
        let cfg: TrainConfig =
            serde_json::from_str(&text).map_err(|e| Error::malformed("json", &c, e.to_string()))?;
        return Ok(TeacherSource {
            file,
            weights,
            vit: cfg.vit_config()?.with_drop_path_rate(0.0),
            head: cfg.head_config(),
            sa_temp: cfg.meanshift_sa_temp,
        });
    }
    let (vit, head) = architecture_from_shapes(&weights, &file)?;
    // The reference's default (`0.1 / sqrt(384)`, whatever the width).
    let sa_temp = TrainConfig::default().meanshift_sa_temp;
    Ok(TeacherSource { file, weights, vit, head, sa_temp })
}

/// Backbone and head architecture from tensor shapes (no `config.json`): the backbone's
/// ([`checkpoint::backbone_shape`], heads `D / 64`, the position table's grid as the image
/// size) and the head's ([`checkpoint::head_config`]).
fn architecture_from_shapes(map: &TensorMap, file: &Path) -> Result<(VitConfig, FlslHeadConfig)> {
    let prefix = if map.keys().any(|k| k.starts_with("backbone.")) { "backbone." } else { "" };
    let b = checkpoint::backbone_shape(map, prefix, file)?;
    let vit = VitConfig::new(b.dim, b.depth, (b.dim / 64).max(1))
        .with_patch_size(b.patch)
        .with_img_size(b.grid * b.patch)
        .with_mlp_ratio(b.mlp_hidden as f64 / b.dim as f64)
        .with_drop_path_rate(0.0);
    let head = checkpoint::head_config(map, "head.", true, file)?;
    Ok((vit, head))
}

/// SHA-256 of the teacher's weights file (the bundles' hash, `flsl_runtime::onboard::bundle`).
pub fn sha256_file(path: &Path) -> Result<String> {
    flsl_runtime::onboard::bundle::sha256_file(path).map_err(|e| match e {
        flsl_runtime::onboard::OnboardError::Io { source, .. } => {
            Error::io("cannot read", path, source)
        }
        other => Error::malformed("weights", path, other.to_string()),
    })
}

/// One line for logs and reports: `ViT D=.. depth=.. heads=.. patch=.., K prototypes`.
pub fn describe(vit: &VitConfig, prototypes: usize) -> String {
    format!(
        "ViT D={} depth={} heads={} patch={}, {prototypes} prototypes",
        vit.embed_dim, vit.depth, vit.num_heads, vit.patch_size
    )
}

/// Prepares a distillation configuration before a fresh run: the student's prototype count
/// becomes the teacher's (the k-means term compares the two heads prototype by prototype) and
/// the teacher file's SHA-256 is recorded. Returns the teacher's description for the log.
pub fn prepare(cfg: &mut TrainConfig) -> Result<String> {
    let Some(d) = cfg.distill.as_mut() else {
        return Err(Error::Config { key: "distill".into(), reason: "no [distill] table".into() });
    };
    let src = teacher_source(&d.teacher)?;
    d.teacher_sha256 = Some(sha256_file(&src.file)?);
    cfg.out_dim = src.head.out_dim;
    Ok(format!("teacher {}: {}", src.file.display(), describe(&src.vit, src.head.out_dim)))
}

/// Grid factor between student and teacher patches: `max(1, round(p_s / p_t))`.
pub fn grid_factor(student_patch: usize, teacher_patch: usize) -> usize {
    ((student_patch as f64 / teacher_patch.max(1) as f64).round() as usize).max(1)
}

/// What the teacher says about each student token of a batch of views.
#[derive(Debug, Clone)]
pub struct DistillTargets<B: Backend> {
    /// Prototype logits of each student token's region `[n, Ns, K]`.
    pub logits: Tensor<B, 3>,
    /// Teacher features of each student token's region `[n, Ns, D_t]`.
    pub features: Tensor<B, 3>,
}

impl<B: Backend> DistillTeacher<B> {
    /// Loads `cfg.distill`'s teacher (`None` when the run does not distil), checks its
    /// SHA-256 against the recorded one, and that its prototype count is the student's.
    pub fn load(cfg: &TrainConfig, device: &B::Device) -> Result<Option<Self>> {
        let Some(d) = &cfg.distill else { return Ok(None) };
        let src = teacher_source(&d.teacher).map_err(|e| Error::Config {
            key: "distill.teacher".into(),
            reason: format!("{}: {e}", d.teacher.display()),
        })?;
        if let Some(want) = &d.teacher_sha256 {
            let got = sha256_file(&src.file)?;
            if &got != want {
                return Err(Error::Config {
                    key: "distill.teacher_sha256".into(),
                    reason: format!(
                        "{} has SHA-256 {got}, the run was started with {want}: the teacher changed, so the run cannot resume exactly (start a new run, or restore the teacher)",
                        src.file.display()
                    ),
                });
            }
        }
        if src.head.out_dim != cfg.out_dim {
            return Err(Error::Config {
                key: "out_dim".into(),
                reason: format!(
                    "the student has {} prototypes, the teacher {} ({}): they must match (flsl distill sets it)",
                    cfg.out_dim,
                    src.head.out_dim,
                    src.file.display()
                ),
            });
        }
        let model = FlslModel::<B>::init(&src.vit, &src.head, device);
        let backbone = checkpoint::load_vit(model.backbone, &src.weights, &src.file)?;
        let head = checkpoint::load_head(model.head, &src.weights, &src.file)?;
        let model = FlslModel { backbone, head, distill_proj: None }.no_grad();
        Ok(Some(Self {
            model,
            sa_temp: src.sa_temp,
            feature_weight: d.feature_weight,
            arch: describe(&src.vit, src.head.out_dim),
            file: src.file,
        }))
    }

    /// Teacher width `D_t`.
    pub fn embed_dim(&self) -> usize {
        self.model.backbone.embed_dim()
    }

    /// A copy on another device (data-parallel replicas).
    pub fn to_device(&self, device: &B::Device) -> Self {
        Self { model: self.model.clone().fork(device), ..self.clone() }
    }

    /// The teacher's logits and features for every token of student views `images`
    /// (`[n, 3, H, W]`, the student's patch `student_patch`), aligned to the student's grid.
    pub fn targets(
        &self,
        images: Tensor<B, 4>,
        student_patch: usize,
        head_input: HeadInput,
    ) -> Result<DistillTargets<B>> {
        let [n, _, h, w] = images.dims();
        let pt = self.model.backbone.patch_size();
        if student_patch == 0 || h % student_patch != 0 || w % student_patch != 0 {
            return Err(Error::Shape {
                op: "distill",
                reason: format!(
                    "a {h}x{w} view is not a multiple of the student patch {student_patch}"
                ),
            });
        }
        let (gh, gw) = (h / student_patch, w / student_patch);
        let f = grid_factor(student_patch, pt);
        let (th, tw) = (gh * f * pt, gw * f * pt);
        let input = if (th, tw) == (h, w) {
            images
        } else {
            burn::tensor::module::interpolate(
                images,
                [th, tw],
                InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false),
            )
        };
        let feats = self.model.backbone.forward(input); // [n, gh*f*gw*f, D_t]
        let logits = match head_input {
            // The teacher's own modes (every token a query over all of its tokens), then its head.
            HeadInput::Modes => self.model.head.forward(
                attention(feats.clone(), feats.clone(), self.sa_temp).matmul(feats.clone()),
            ),
            HeadInput::Features => self.model.head.forward(feats.clone()),
        };
        Ok(DistillTargets {
            logits: pool(logits, n, gh, gw, f),
            features: pool(feats, n, gh, gw, f),
        })
    }
}

/// Averages `[n, (gh f) * (gw f), C]` row-major token maps over `f x f` blocks:
/// `[n, gh * gw, C]`.
fn pool<B: Backend>(x: Tensor<B, 3>, n: usize, gh: usize, gw: usize, f: usize) -> Tensor<B, 3> {
    if f == 1 {
        return x;
    }
    let c = x.dims()[2];
    x.reshape([n, gh, f, gw, f * c]) // token (i f + a, j f + b) -> [i, a, j, b * c ...]
        .mean_dim(2)
        .reshape([n, gh, gw, f, c])
        .mean_dim(3)
        .reshape([n, gh * gw, c])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use burn::tensor::TensorData;

    #[test]
    fn grid_factor_rounds_the_patch_ratio() {
        assert_eq!(grid_factor(16, 8), 2);
        assert_eq!(grid_factor(16, 16), 1);
        assert_eq!(grid_factor(8, 16), 1);
        assert_eq!(grid_factor(16, 14), 1);
        assert_eq!(grid_factor(14, 8), 2);
    }

    /// Pooling averages exactly the `f x f` teacher tokens under each student token.
    #[test]
    fn pool_averages_the_blocks_under_each_student_token() {
        let d = crate::backend::cpu_device();
        // Teacher grid 4x4 (f = 2 over a 2x2 student grid), 2 channels: value = token index,
        // and 100 * token index.
        let vals: Vec<f32> = (0..16).flat_map(|t| [t as f32, 100.0 * t as f32]).collect();
        let x = Tensor::<Cpu, 3>::from_data(TensorData::new(vals, [1, 16, 2]), &d);
        let y = pool(x, 1, 2, 2, 2).into_data().to_vec::<f32>().unwrap();
        // Student token (0, 0) covers teacher tokens 0, 1, 4, 5: mean 2.5.
        let want = [2.5, 250.0, 4.5, 450.0, 10.5, 1050.0, 12.5, 1250.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{y:?}");
        }
    }
}
