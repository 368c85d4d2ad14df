//! The FLSL training loop: schedules, data, steps, logs, checkpoints and exact resume.
//!
//! Port of `main_flsl.train_flsl` / `train_one_epoch` (single process). A run folder holds
//! `config.json`, `log.jsonl` (one line per step and per epoch), `checkpoints/` (one folder
//! per saved state, `latest` a symlink to the newest), and at the end `loss.png`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::tensor::{Tensor, TensorData, backend::AutodiffBackend, backend::Backend};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::data::{Batch, ImageFolder, Loader};
use crate::error::{Error, Result};
use crate::loss::{Centering, FlslLoss, LossTerms, VmrPrior};
use crate::meanshift::TokenSelection;
use crate::model::FlslModel;
use crate::model::named::{self, Missing};
use crate::schedule::{cosine_scheduler, temp_scheduler};
use crate::step::{AdamState, StepHyper, StepOptions, View, train_step};
use crate::tensors::{self, TensorMap};

/// All schedules of a run, indexed by global iteration (the teacher temperature by epoch).
#[derive(Debug, Clone)]
pub struct Schedules {
    /// Learning rate.
    pub lr: Vec<f64>,
    /// Weight decay of the regularised group.
    pub wd: Vec<f64>,
    /// Teacher EMA momentum.
    pub momentum: Vec<f64>,
    /// Intra-view coefficient.
    pub ups: Vec<f64>,
    /// Intra-view mean-shift temperature.
    pub sa_temp: Vec<f64>,
    /// Inter-view mean-shift temperature.
    pub ca_temp: Vec<f64>,
    /// Teacher temperature per epoch.
    pub teacher_temp: Vec<f64>,
}

impl Schedules {
    /// As the reference builds them (`lr * batch / 256` peak, warm-up `int(warmup_epochs * epochs)`).
    pub fn new(cfg: &TrainConfig, niter_per_ep: usize) -> Self {
        let e = cfg.epochs;
        let n = niter_per_ep;
        let base_lr = cfg.lr * cfg.batch_size_per_gpu as f64 / 256.0;
        let warmup = (cfg.warmup_epochs * e as f64) as usize;
        let c0 = cfg.loss_coefficients[0];
        Self {
            lr: cosine_scheduler(base_lr, cfg.min_lr, e, n, warmup, 0.0),
            wd: cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, e, n, 0, 0.0),
            momentum: cosine_scheduler(cfg.momentum_teacher, 1.0, e, n, 0, 0.0),
            ups: cosine_scheduler(cfg.start_intraview.unwrap_or(c0), c0, e, n, 0, 0.0),
            sa_temp: cosine_scheduler(cfg.meanshift_sa_temp_start.unwrap_or(cfg.meanshift_sa_temp), cfg.meanshift_sa_temp, e, n, 0, 0.0),
            ca_temp: cosine_scheduler(cfg.meanshift_ca_temp_start.unwrap_or(cfg.meanshift_ca_temp), cfg.meanshift_ca_temp, e, n, 0, 0.0),
            teacher_temp: temp_scheduler(cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs, e),
        }
    }
}

/// Training progress saved with each checkpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunState {
    /// Global iterations done.
    pub step: usize,
    /// Current epoch.
    pub epoch: usize,
    /// Batches done in the current epoch.
    pub batch_in_epoch: usize,
    /// Teacher centering state.
    pub center: Option<Vec<f32>>,
    /// Per-step loss history (for the plot).
    pub history: Vec<(usize, LossTerms)>,
    /// Per-epoch prototype usage.
    pub epochs: Vec<EpochSummary>,
}

/// What an epoch measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EpochSummary {
    /// Epoch index.
    pub epoch: usize,
    /// Mean loss terms.
    pub loss: Option<LossTerms>,
    /// Prototypes the teacher assigned at least one token to.
    pub prototypes_used: usize,
    /// Normalised entropy of the assignment histogram (1 = uniform, 0 = collapse).
    pub assignment_entropy: f64,
    /// Images per second.
    pub images_per_s: f64,
    /// Unreadable images skipped.
    pub skipped_images: usize,
}

/// The state of a run in memory.
pub struct Run<B: AutodiffBackend> {
    /// Configuration.
    pub cfg: TrainConfig,
    /// Student.
    pub student: FlslModel<B>,
    /// EMA teacher.
    pub teacher: FlslModel<B::InnerBackend>,
    /// AdamW moments.
    pub adam: AdamState<B::InnerBackend>,
    /// Progress.
    pub state: RunState,
    /// Device.
    pub device: B::Device,
}

/// Where a run's checkpoints live.
pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Stacks one view of every sample into device tensors.
pub fn batch_views<B: Backend>(batch: &Batch, device: &B::Device) -> Result<Vec<View<B>>> {
    let first = batch.samples.first().ok_or(Error::Shape { op: "batch", reason: "empty batch".into() })?;
    let n_views = first.views.len();
    let bt = batch.samples.len();
    (0..n_views)
        .map(|v| {
            let size = first.views[v].size as usize;
            let mut pixels = Vec::with_capacity(bt * 3 * size * size);
            let mut masks = Vec::new();
            for s in &batch.samples {
                pixels.extend_from_slice(&s.views[v].pixels);
                if let Some(m) = &s.views[v].mask {
                    masks.extend_from_slice(m);
                }
            }
            let images = Tensor::from_data(TensorData::new(pixels, [bt, 3, size, size]), device);
            let mask = if masks.is_empty() { None } else { Some(TokenSelection::from_mask(&masks, bt, masks.len() / bt)?) };
            Ok(View { images, mask })
        })
        .collect()
}

impl<B: AutodiffBackend> Run<B> {
    /// A fresh run (seeded initialisation, teacher = student).
    pub fn new(cfg: TrainConfig, device: B::Device) -> Result<Self> {
        cfg.validate()?;
        let (vit, head) = (cfg.vit_config()?, cfg.head_config());
        let student = crate::model::layers::with_seed(cfg.seed, || FlslModel::<B>::init(&vit, &head, &device));
        let teacher = student.valid();
        let center = cfg.teacher_centering.then(|| vec![0.0; cfg.out_dim]);
        Ok(Self { cfg, student, teacher, adam: AdamState::default(), state: RunState { center, ..Default::default() }, device })
    }

    /// Resumes from a checkpoint folder written by [`Run::save`].
    pub fn load(dir: &Path, device: B::Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io("cannot read", &cfg_path, e))?;
        let cfg: TrainConfig = serde_json::from_str(&text).map_err(|e| Error::malformed("json", &cfg_path, e.to_string()))?;
        let mut run = Self::new(cfg, device.clone())?;
        let sp = dir.join("student.safetensors");
        run.student = named::load_state_dict(run.student, &tensors::read_safetensors(&sp)?, "", &sp, Missing::Error)?;
        let tp = dir.join("teacher.safetensors");
        run.teacher = named::load_state_dict(run.teacher, &tensors::read_safetensors(&tp)?, "", &tp, Missing::Error)?;
        run.adam = AdamState::from_host(&tensors::read_safetensors(&dir.join("optimizer.safetensors"))?, &device)?;
        let st = dir.join("state.json");
        let text = std::fs::read_to_string(&st).map_err(|e| Error::io("cannot read", &st, e))?;
        run.state = serde_json::from_str(&text).map_err(|e| Error::malformed("json", &st, e.to_string()))?;
        Ok(run)
    }

    /// Writes a checkpoint folder atomically: everything goes to a temporary folder that is
    /// renamed into place, then `latest` is re-pointed with an atomic symlink swap.
    pub fn save(&self, keep: bool) -> Result<PathBuf> {
        let root = checkpoints_dir(&self.cfg.output_dir);
        std::fs::create_dir_all(&root).map_err(|e| Error::io("cannot create", &root, e))?;
        let name = if keep { format!("epoch-{:04}", self.state.epoch) } else { format!("step-{:08}", self.state.step) };
        let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp); // A leftover from a crash is garbage.
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;
        let meta = |what: &str| Some([("format".to_string(), "pt".to_string()), ("flsl".to_string(), what.to_string())].into());
        tensors::write_safetensors(&tmp.join("student.safetensors"), &named::state_dict::<B, _>(&self.student), meta("student"))?;
        tensors::write_safetensors(&tmp.join("teacher.safetensors"), &named::state_dict::<B::InnerBackend, _>(&self.teacher), meta("teacher"))?;
        tensors::write_safetensors(&tmp.join("optimizer.safetensors"), &self.adam.to_host(), None)?;
        let cfg = serde_json::to_vec_pretty(&self.cfg).expect("config serialises");
        tensors::write_atomic(&tmp.join("config.json"), &cfg)?;
        let st = serde_json::to_vec(&self.state).expect("state serialises");
        tensors::write_atomic(&tmp.join("state.json"), &st)?;
        let dst = root.join(&name);
        if dst.exists() {
            std::fs::remove_dir_all(&dst).map_err(|e| Error::io("cannot replace", &dst, e))?;
        }
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io("cannot move checkpoint into place", &dst, e))?;
        let previous = std::fs::read_link(root.join("latest")).ok();
        let link_tmp = root.join(format!(".latest-{}", std::process::id()));
        let _ = std::fs::remove_file(&link_tmp);
        std::os::unix::fs::symlink(&name, &link_tmp).map_err(|e| Error::io("cannot link", &link_tmp, e))?;
        std::fs::rename(&link_tmp, root.join("latest")).map_err(|e| Error::io("cannot update", root.join("latest"), e))?;
        // The previous rolling checkpoint is no longer needed (kept epochs stay).
        if let Some(prev) = previous {
            let prev_name = prev.to_string_lossy();
            if prev_name.starts_with("step-") && *prev_name != name {
                let _ = std::fs::remove_dir_all(root.join(&prev));
            }
        }
        Ok(dst)
    }
}

fn log_line(log: &mut std::fs::File, value: serde_json::Value) -> Result<()> {
    writeln!(log, "{value}").map_err(|e| Error::io("cannot write log", "log.jsonl", e))
}

/// Normalised entropy and count of used prototypes of an assignment histogram.
pub fn assignment_stats(hist: &[u64]) -> (usize, f64) {
    let total: u64 = hist.iter().sum();
    if total == 0 || hist.len() < 2 {
        return (0, 0.0);
    }
    let used = hist.iter().filter(|&&c| c > 0).count();
    let h: f64 = hist.iter().filter(|&&c| c > 0).map(|&c| {
        let p = c as f64 / total as f64;
        -p * p.ln()
    }).sum();
    (used, h / (hist.len() as f64).ln())
}

/// Options of [`train`].
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Stop after this many global steps (tests and time-boxed demos).
    pub max_steps: Option<usize>,
    /// Show a progress bar.
    pub progress: bool,
}

/// Trains (or resumes `run`) to the end of the configuration or `max_steps`.
pub fn train<B: AutodiffBackend>(mut run: Run<B>, opts: &TrainOptions) -> Result<Run<B>> {
    let cfg = run.cfg.clone();
    let dataset = Arc::new(ImageFolder::scan_excluding(&cfg.data_path, cfg.tile_size, &cfg.holdout)?);
    if dataset.is_empty() {
        return Err(Error::Config { key: "data_path".into(), reason: format!("no readable JPEG/PNG image under {}", cfg.data_path.display()) });
    }
    let epoch_len = cfg.epoch_len.unwrap_or(dataset.len());
    let niter = epoch_len / cfg.batch_size_per_gpu;
    if niter == 0 {
        return Err(Error::Config {
            key: "batch_size_per_gpu".into(),
            reason: format!("{} is larger than an epoch ({epoch_len} samples)", cfg.batch_size_per_gpu),
        });
    }
    std::fs::create_dir_all(&cfg.output_dir).map_err(|e| Error::io("cannot create", &cfg.output_dir, e))?;
    tensors::write_atomic(&cfg.output_dir.join("config.json"), &serde_json::to_vec_pretty(&cfg).expect("config serialises"))?;
    let log_path = cfg.output_dir.join("log.jsonl");
    let mut log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(|e| Error::io("cannot open", &log_path, e))?;
    let sched = Schedules::new(&cfg, niter);
    let mut loss_fn = FlslLoss {
        student_temp: cfg.student_temp,
        teacher_temp_schedule: sched.teacher_temp.clone(),
        coefficients: cfg.loss_coefficients,
        vmr: cfg.volume_maximization.then_some(VmrPrior::Uniform),
        centering: run.state.center.clone().map(|center| Centering { center, momentum: 0.9 }),
    };
    tracing::info!(images = dataset.len(), skipped = dataset.skipped.len(), steps_per_epoch = niter, "dataset ready");
    let total_steps = opts.max_steps.unwrap_or(cfg.epochs * niter).min(cfg.epochs * niter);
    let bar = if opts.progress {
        let b = indicatif::ProgressBar::new(total_steps as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} step  {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        b.set_position(run.state.step as u64);
        Some(b)
    } else {
        None
    };
    'epochs: while run.state.epoch < cfg.epochs {
        let epoch = run.state.epoch;
        let loader = Loader::new(
            dataset.clone(),
            cfg.augment.clone(),
            cfg.patch_size,
            cfg.batch_size_per_gpu,
            epoch_len,
            cfg.seed,
            epoch,
            cfg.num_workers,
            run.state.batch_in_epoch,
        );
        let mut hist = vec![0u64; cfg.out_dim];
        let mut sums = LossTerms { total: 0.0, mean_shift: 0.0, kmeans: 0.0, vmr: 0.0 };
        let mut n_batches = 0usize;
        let epoch_start = Instant::now();
        let mut loader = loader;
        let mut exhausted = false;
        while run.state.batch_in_epoch < niter {
            if run.state.step >= total_steps {
                break 'epochs;
            }
            let t0 = Instant::now();
            let Some(batch) = loader.next() else {
                // Unreadable images made the epoch shorter than planned: it ends here.
                exhausted = true;
                break;
            };
            let it = epoch * niter + run.state.batch_in_epoch;
            let views = batch_views::<B>(&batch, &run.device)?;
            let hyper = StepHyper {
                iteration: it,
                epoch,
                lr: sched.lr[it],
                weight_decay: sched.wd[it],
                momentum: sched.momentum[it],
                sa_temp: sched.sa_temp[it],
                ca_temp: sched.ca_temp[it],
                ups: sched.ups[it],
                clip_grad: (cfg.clip_grad > 0.0).then_some(cfg.clip_grad),
                freeze_last_layer: cfg.freeze_last_layer,
                betas: (0.9, 0.999),
                eps: 1e-8,
            };
            // Drop path draws from a stream seeded per step, so a resumed run matches.
            let step_seed = cfg.seed.wrapping_mul(1_000_003).wrapping_add(it as u64);
            let student = run.student.clone();
            let result = crate::model::layers::with_seed(step_seed, || {
                train_step(student, &mut run.teacher, &mut loss_fn, &mut run.adam, &views, &hyper, StepOptions::default())
            });
            let (student, report) = match result {
                Ok(r) => r,
                Err(e) => {
                    if let Some(b) = &bar {
                        b.abandon();
                    }
                    return Err(e);
                }
            };
            run.student = student;
            for a in &report.teacher_assign {
                if let Some(h) = hist.get_mut(*a as usize) {
                    *h += 1;
                }
            }
            let l = report.loss;
            sums.total += l.total;
            sums.mean_shift += l.mean_shift;
            sums.kmeans += l.kmeans;
            sums.vmr += l.vmr;
            n_batches += 1;
            run.state.step += 1;
            run.state.batch_in_epoch += 1;
            run.state.history.push((it, l));
            run.state.center = loss_fn.centering.as_ref().map(|c| c.center.clone());
            let ips = cfg.batch_size_per_gpu as f64 / t0.elapsed().as_secs_f64();
            log_line(&mut log, serde_json::json!({
                "step": it, "epoch": epoch, "loss": l.total, "mean_shift": l.mean_shift, "kmeans": l.kmeans, "vmr": l.vmr,
                "lr": hyper.lr, "wd": hyper.weight_decay, "momentum": hyper.momentum, "images_per_s": ips,
            }))?;
            if let Some(b) = &bar {
                b.set_message(format!("loss {:.4} (ms {:.3} km {:.3} vmr {:.3})  lr {:.2e}  {:.1} img/s", l.total, l.mean_shift, l.kmeans, l.vmr, hyper.lr, ips));
                b.inc(1);
            }
            if cfg.checkpoint_every_steps > 0 && run.state.step % cfg.checkpoint_every_steps == 0 {
                run.save(false)?;
            }
        }
        let skipped = loader.stats.skipped.len();
        drop(loader);
        if run.state.batch_in_epoch < niter && !exhausted {
            break; // max_steps reached inside the epoch
        }
        let (used, entropy) = assignment_stats(&hist);
        let n = n_batches.max(1) as f64;
        let summary = EpochSummary {
            epoch,
            loss: (n_batches > 0).then(|| LossTerms { total: sums.total / n, mean_shift: sums.mean_shift / n, kmeans: sums.kmeans / n, vmr: sums.vmr / n }),
            prototypes_used: used,
            assignment_entropy: entropy,
            images_per_s: (n_batches * cfg.batch_size_per_gpu) as f64 / epoch_start.elapsed().as_secs_f64(),
            skipped_images: skipped + dataset.skipped.len(),
        };
        tracing::info!(
            "epoch {epoch}: loss {:.4}, prototypes used {used}/{} (entropy {:.3}), {:.1} img/s, {} images skipped",
            summary.loss.map_or(f64::NAN, |l| l.total),
            cfg.out_dim,
            entropy,
            summary.images_per_s,
            summary.skipped_images
        );
        log_line(&mut log, serde_json::json!({ "epoch_summary": summary }))?;
        run.state.epochs.push(summary);
        run.state.epoch += 1;
        run.state.batch_in_epoch = 0;
        let keep = cfg.saveckp_freq > 0 && run.state.epoch % cfg.saveckp_freq == 0;
        run.save(false)?;
        if keep {
            run.save(true)?;
        }
    }
    if let Some(b) = &bar {
        b.finish();
    }
    if run.state.batch_in_epoch > 0 {
        run.save(false)?;
    }
    crate::plot::loss_plot(&cfg.output_dir.join("loss.png"), &run.state.history)?;
    Ok(run)
}

/// The reference-named state dict of a model wrapper (`backbone.*`, `head.*`).
pub fn model_state<B: Backend>(m: &FlslModel<B>) -> TensorMap {
    named::state_dict::<B, _>(m)
}
