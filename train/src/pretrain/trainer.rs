//! The FLSL training loop: schedules, data, steps, logs, checkpoints and exact resume.
//!
//! Port of `main_flsl.train_flsl` / `train_one_epoch`. One process drives one device, or
//! several data-parallel replicas ([`train_on_devices`], one thread per extra device, gradients
//! averaged by burn-collective: see [`crate::parallel`]). A run folder holds
//! `config.json`, `log.jsonl` (one line per step and per epoch), `checkpoints/` (one folder
//! per saved state, `latest` a symlink to the newest), and at the end `loss.png`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::tensor::{backend::AutodiffBackend, backend::Backend};
use serde::{Deserialize, Serialize};

use crate::augment::AugmentConfig;
use crate::config::TrainConfig;
use crate::data::{Batch, ImageFolder, Loader, batch_views};
use crate::distill::DistillTeacher;
use crate::error::{Error, Result};
use crate::loss::{Centering, FlslLoss, LossTerms, VmrPrior};
use crate::model::FlslModel;
use crate::model::named::{self, Missing};
use crate::multistage::PreviousStage;
use crate::parallel::{self, Peer};
use crate::schedule::{cosine_scheduler, temp_scheduler};
use crate::step::{AdamState, StepHyper, StepOptions, StepReport, train_step};
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
    /// Weight of the current attention against the previous stage's map (1: single stage).
    pub mixture: Vec<f64>,
    /// Teacher temperature per epoch.
    pub teacher_temp: Vec<f64>,
}

impl Schedules {
    /// As the reference builds them (`lr * batch / 256` peak, warm-up `int(warmup_epochs * epochs)`).
    pub fn new(cfg: &TrainConfig, niter_per_ep: usize) -> Self {
        let e = cfg.epochs;
        let n = niter_per_ep;
        // Linear scaling rule on the total batch (`batch_size_per_gpu * world_size / 256`).
        let base_lr = cfg.lr * (cfg.batch_size_per_gpu * cfg.world_size()) as f64 / 256.0;
        let warmup = (cfg.warmup_epochs * e as f64) as usize;
        let c0 = cfg.loss_coefficients[0];
        Self {
            lr: cosine_scheduler(base_lr, cfg.min_lr, e, n, warmup, 0.0),
            wd: cosine_scheduler(cfg.weight_decay, cfg.weight_decay_end, e, n, 0, 0.0),
            momentum: cosine_scheduler(cfg.momentum_teacher, 1.0, e, n, 0, 0.0),
            ups: cosine_scheduler(cfg.start_intraview.unwrap_or(c0), c0, e, n, 0, 0.0),
            // Multi-stage attention mixture (`mixture_schedule`): cosine from 0 to 1 - bias.
            mixture: if cfg.model_previous_stage.is_some() {
                cosine_scheduler(0.0, 1.0 - cfg.mixture_bias, e, n, 0, 0.0)
            } else {
                vec![1.0; e * n]
            },
            sa_temp: cosine_scheduler(
                cfg.meanshift_sa_temp_start.unwrap_or(cfg.meanshift_sa_temp),
                cfg.meanshift_sa_temp,
                e,
                n,
                0,
                0.0,
            ),
            ca_temp: cosine_scheduler(
                cfg.meanshift_ca_temp_start.unwrap_or(cfg.meanshift_ca_temp),
                cfg.meanshift_ca_temp,
                e,
                n,
                0,
                0.0,
            ),
            teacher_temp: temp_scheduler(
                cfg.warmup_teacher_temp,
                cfg.teacher_temp,
                cfg.warmup_teacher_temp_epochs,
                e,
            ),
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
    /// What the current epoch has measured so far, so that an epoch resumed in the middle
    /// reports all of its batches (absent in checkpoints written before it existed: zero).
    #[serde(default)]
    pub epoch_progress: EpochProgress,
}

/// The running sums of the current epoch (the inputs of its [`EpochSummary`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EpochProgress {
    /// Batches done.
    pub batches: usize,
    /// Summed loss terms.
    pub sums: LossTerms,
    /// Teacher assignments per prototype.
    pub hist: Vec<u64>,
    /// Unreadable images the loader skipped.
    pub skipped: usize,
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

impl<B: AutodiffBackend> Run<B> {
    /// A fresh run (seeded initialisation, teacher = student).
    pub fn new(cfg: TrainConfig, device: B::Device) -> Result<Self> {
        cfg.validate()?;
        let (vit, head) = (cfg.vit_config()?, cfg.head_config());
        // Distillation with the feature term: the student also has the projection onto the
        // frozen teacher's width.
        let teacher_dim = match &cfg.distill {
            Some(d) if d.feature_weight > 0.0 => {
                Some(crate::distill::teacher_source(&d.teacher)?.vit.embed_dim)
            }
            _ => None,
        };
        let student = crate::model::layers::with_seed(cfg.seed, || match teacher_dim {
            Some(dt) => FlslModel::<B>::init_with_projection(&vit, &head, dt, &device),
            None => FlslModel::<B>::init(&vit, &head, &device),
        });
        let teacher = student.valid();
        let center = cfg.teacher_centering.then(|| vec![0.0; cfg.out_dim]);
        Ok(Self {
            cfg,
            student,
            teacher,
            adam: AdamState::default(),
            state: RunState { center, ..Default::default() },
            device,
        })
    }

    /// Resumes from a checkpoint folder written by [`Run::save`].
    pub fn load(dir: &Path, device: B::Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .map_err(|e| Error::io("cannot read", &cfg_path, e))?;
        let cfg: TrainConfig = serde_json::from_str(&text)
            .map_err(|e| Error::malformed("json", &cfg_path, e.to_string()))?;
        let mut run = Self::new(cfg, device.clone())?;
        let sp = dir.join("student.safetensors");
        run.student = named::load_state_dict(
            run.student,
            &tensors::read_safetensors(&sp)?,
            "",
            &sp,
            Missing::Error,
        )?;
        let tp = dir.join("teacher.safetensors");
        run.teacher = named::load_state_dict(
            run.teacher,
            &tensors::read_safetensors(&tp)?,
            "",
            &tp,
            Missing::Error,
        )?;
        run.adam = AdamState::from_host(
            &tensors::read_safetensors(&dir.join("optimizer.safetensors"))?,
            &device,
        )?;
        let st = dir.join("state.json");
        let text = std::fs::read_to_string(&st).map_err(|e| Error::io("cannot read", &st, e))?;
        run.state = serde_json::from_str(&text)
            .map_err(|e| Error::malformed("json", &st, e.to_string()))?;
        Ok(run)
    }

    /// Writes a checkpoint folder atomically: everything goes to a temporary folder (each file
    /// and the folder flushed) that is swapped into place in one step ([`tensors::replace_dir`]),
    /// then `latest` is re-pointed with an atomic symlink swap and the folder flushed. A kill at
    /// any moment leaves `latest` on a complete checkpoint; what a kill leaves half-written is
    /// named `.tmp-*`, `.latest-*` or `.trash-*` and removed by the next save
    /// ([`clean_checkpoints`]).
    pub fn save(&self, keep: bool) -> Result<PathBuf> {
        let root = checkpoints_dir(&self.cfg.output_dir);
        std::fs::create_dir_all(&root).map_err(|e| Error::io("cannot create", &root, e))?;
        clean_checkpoints(&root)?;
        let name = if keep {
            format!("epoch-{:04}", self.state.epoch)
        } else {
            format!("step-{:08}", self.state.step)
        };
        let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io("cannot create", &tmp, e))?;
        let meta = |what: &str| {
            Some(
                [("format".to_string(), "pt".to_string()), ("flsl".to_string(), what.to_string())]
                    .into(),
            )
        };
        tensors::write_safetensors(
            &tmp.join("student.safetensors"),
            &named::state_dict::<B, _>(&self.student),
            meta("student"),
        )?;
        tensors::write_safetensors(
            &tmp.join("teacher.safetensors"),
            &named::state_dict::<B::InnerBackend, _>(&self.teacher),
            meta("teacher"),
        )?;
        tensors::write_safetensors(&tmp.join("optimizer.safetensors"), &self.adam.to_host(), None)?;
        let json = |what: &str, v: serde_json::Result<Vec<u8>>| {
            v.map_err(|e| Error::malformed("json", tmp.join(what), e.to_string()))
        };
        let cfg = json("config.json", serde_json::to_vec_pretty(&self.cfg))?;
        tensors::write_atomic(&tmp.join("config.json"), &cfg)?;
        let st = json("state.json", serde_json::to_vec(&self.state))?;
        tensors::write_atomic(&tmp.join("state.json"), &st)?;
        let dst = root.join(&name);
        tensors::replace_dir(&tmp, &dst)?;
        let previous = std::fs::read_link(root.join("latest")).ok();
        let link_tmp = root.join(format!(".latest-{}", std::process::id()));
        let _ = std::fs::remove_file(&link_tmp);
        std::os::unix::fs::symlink(&name, &link_tmp)
            .map_err(|e| Error::io("cannot link", &link_tmp, e))?;
        std::fs::rename(&link_tmp, root.join("latest"))
            .map_err(|e| Error::io("cannot update", root.join("latest"), e))?;
        tensors::sync_dir(&root)?;
        // The previous rolling checkpoint is no longer needed (kept epochs stay).
        if let Some(prev) = previous {
            let prev_name = prev.to_string_lossy();
            if prev_name.starts_with("step-") && *prev_name != name {
                discard(&root, &prev_name)?;
            }
        }
        Ok(dst)
    }
}

/// Removes what an interrupted [`Run::save`] leaves in a checkpoints folder: temporary folders
/// and links (`.tmp-*`, `.latest-*`), folders being deleted (`.trash-*`), and rolling `step-*`
/// checkpoints that `latest` no longer names. Kept `epoch-*` checkpoints and `latest`'s target
/// are never touched.
pub fn clean_checkpoints(root: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(root) else { return Ok(()) };
    let latest = std::fs::read_link(root.join("latest")).ok();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = name.starts_with(".tmp-")
            || name.starts_with(".latest-")
            || name.starts_with(".trash-")
            || (name.starts_with("step-") && latest.as_deref() != Some(Path::new(&name)));
        if !stale {
            continue;
        }
        let path = e.path();
        let r = if path.is_dir() && !path.is_symlink() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        r.map_err(|err| Error::io("cannot remove a leftover of an interrupted save", &path, err))?;
    }
    Ok(())
}

/// Deletes a checkpoint folder so that a kill mid-way leaves no half-deleted checkpoint under
/// its name: rename it to `.trash-*` first (atomic), then remove.
fn discard(root: &Path, name: &str) -> Result<()> {
    let trash = root.join(format!(".trash-{name}-{}", std::process::id()));
    std::fs::rename(root.join(name), &trash)
        .map_err(|e| Error::io("cannot move aside", root.join(name), e))?;
    std::fs::remove_dir_all(&trash).map_err(|e| Error::io("cannot remove", &trash, e))
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
    let h: f64 = hist
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            -p * p.ln()
        })
        .sum();
    (used, h / (hist.len() as f64).ln())
}

/// Options of [`train`].
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    /// Stop after this many global steps (tests and time-boxed demos).
    pub max_steps: Option<usize>,
    /// Where step progress goes (nowhere by default; the CLI draws a bar).
    pub progress: crate::progress::Reporter,
}

/// Trains (or resumes `run`) to the end of the configuration or `max_steps` on `run.device`.
pub fn train<B: AutodiffBackend>(run: Run<B>, opts: &TrainOptions) -> Result<Run<B>> {
    train_on_devices(run, Vec::new(), opts)
}

/// A step's work for a replica thread.
enum Job {
    Step {
        batch: Batch,
        hyper: StepHyper,
        seed: u64,
        /// Half precision (`use_fp16`).
        half: bool,
    },
    /// Training is over: send back the weights (the consistency check) and leave the group.
    Finish,
}

/// What a replica thread answers.
enum Reply {
    Step(Result<()>),
    Finished(Result<TensorMap>),
}

/// One step of one replica (rank 0 or a worker): views on the replica's device, the training
/// step (gradients averaged over replicas when `peer` is set), the teacher center averaged.
#[allow(clippy::too_many_arguments)]
fn replica_step<B: AutodiffBackend>(
    student: FlslModel<B>,
    teacher: &mut FlslModel<B::InnerBackend>,
    prev: Option<&PreviousStage<B::InnerBackend>>,
    distill: Option<&DistillTeacher<B::InnerBackend>>,
    adam: &mut AdamState<B::InnerBackend>,
    loss_fn: &mut FlslLoss,
    device: &B::Device,
    batch: &Batch,
    hyper: &StepHyper,
    seed: u64,
    peer: Option<Peer>,
    half: bool,
) -> Result<(FlslModel<B>, StepReport)> {
    let views = batch_views::<B>(batch, device)?;
    // Drop path draws from a stream seeded per step (and per replica), so a resumed run matches.
    let seed = seed.wrapping_add(u64::from(peer.map_or(0, |p| p.rank)).wrapping_mul(0x9E37_79B9));
    let out = crate::model::layers::with_seed(seed, || {
        train_step(
            student,
            teacher,
            prev,
            distill,
            loss_fn,
            adam,
            &views,
            hyper,
            StepOptions { peer, half, ..Default::default() },
        )
    })?;
    if let (Some(p), Some(c)) = (peer, loss_fn.centering.as_mut()) {
        // The reference all-reduces the batch center; the EMA is linear, so averaging the
        // updated centers is the same.
        let local: Vec<f64> = c.center.iter().map(|&v| f64::from(v)).collect();
        let mean = parallel::all_reduce_mean_host::<B::InnerBackend>(p, &local, device)?;
        c.center = mean.into_iter().map(|v| v as f32).collect();
    }
    Ok(out)
}

/// A data-parallel replica on its own device, driven by [`Job`]s from rank 0.
// Everything a replica thread owns, moved in at spawn.
#[allow(clippy::too_many_arguments)]
fn replica_worker<B: AutodiffBackend>(
    mut student: FlslModel<B>,
    mut teacher: FlslModel<B::InnerBackend>,
    prev: Option<PreviousStage<B::InnerBackend>>,
    distill: Option<DistillTeacher<B::InnerBackend>>,
    mut adam: AdamState<B::InnerBackend>,
    mut loss_fn: FlslLoss,
    device: B::Device,
    peer: Peer,
    jobs: std::sync::mpsc::Receiver<Job>,
    replies: std::sync::mpsc::Sender<Reply>,
) {
    if let Err(e) = parallel::register::<B::InnerBackend>(peer, &device) {
        let _ = replies.send(Reply::Step(Err(e)));
        return;
    }
    while let Ok(job) = jobs.recv() {
        match job {
            Job::Step { batch, hyper, seed, half } => {
                let r = replica_step(
                    student.clone(),
                    &mut teacher,
                    prev.as_ref(),
                    distill.as_ref(),
                    &mut adam,
                    &mut loss_fn,
                    &device,
                    &batch,
                    &hyper,
                    seed,
                    Some(peer),
                    half,
                );
                let r = r.map(|(s, _)| student = s);
                let failed = r.is_err();
                if replies.send(Reply::Step(r)).is_err() || failed {
                    break;
                }
            }
            Job::Finish => {
                let state = parallel::finish::<B::InnerBackend>(peer)
                    .map(|()| model_state(&student.valid()));
                let _ = replies.send(Reply::Finished(state));
                return;
            }
        }
    }
}

/// Largest absolute difference between two state dicts with the same names.
fn max_divergence(a: &TensorMap, b: &TensorMap) -> (f64, String) {
    let mut worst = (0.0f64, String::new());
    for (name, ta) in a {
        let d = match b.get(name).map(|tb| (ta.to_f32(), tb.to_f32())) {
            Some((x, y)) if x.len() == y.len() => x
                .iter()
                .zip(y)
                .map(|(p, q)| f64::from((p - q).abs()))
                .fold(0.0, |m: f64, v| if v.is_nan() { f64::INFINITY } else { m.max(v) }),
            _ => f64::INFINITY,
        };
        if d > worst.0 {
            worst = (d, name.clone());
        }
    }
    worst
}

/// [`train`] with data-parallel replicas: `run` is rank 0 on `run.device`, and one replica per
/// entry of `replica_devices` (ranks 1..) runs in its own thread. Each step the loader's batch of
/// `batch_size_per_gpu * world` samples is split into one share per replica; gradients and
/// loss terms are averaged with burn-collective, so every replica applies the same update.
/// Rank 0 logs, shows progress and writes checkpoints; the replicas' weights are compared
/// with rank 0's at the end (an error names the tensor if they diverged).
pub fn train_on_devices<B: AutodiffBackend>(
    mut run: Run<B>,
    replica_devices: Vec<B::Device>,
    opts: &TrainOptions,
) -> Result<Run<B>> {
    let cfg = run.cfg.clone();
    let world = 1 + replica_devices.len();
    if world != cfg.world_size() {
        return Err(Error::Config {
            key: "device".into(),
            reason: format!(
                "`{}` lists {} devices but the run was given {world}",
                cfg.device,
                cfg.world_size()
            ),
        });
    }
    let dataset =
        Arc::new(ImageFolder::scan_excluding(&cfg.data_path, cfg.tile_size, &cfg.holdout)?);
    if dataset.is_empty() {
        return Err(Error::Config {
            key: "data_path".into(),
            reason: format!("no readable JPEG/PNG image under {}", cfg.data_path.display()),
        });
    }
    let epoch_len = cfg.epoch_len.unwrap_or(dataset.len());
    let global_batch = cfg.batch_size_per_gpu * world;
    let niter = epoch_len / global_batch;
    if niter == 0 {
        return Err(Error::Config {
            key: "batch_size_per_gpu".into(),
            reason: format!(
                "{} x {world} device(s) is larger than an epoch ({epoch_len} samples)",
                cfg.batch_size_per_gpu
            ),
        });
    }
    std::fs::create_dir_all(&cfg.output_dir)
        .map_err(|e| Error::io("cannot create", &cfg.output_dir, e))?;
    // What a killed run left half-done goes now, not at the next save: a run resumed at its
    // end saves nothing.
    clean_checkpoints(&checkpoints_dir(&cfg.output_dir))?;
    // Temporary files of a run killed while writing config.json, the log or loss.png.
    flsl_runtime::fsio::remove_stale_temps(&cfg.output_dir).map_err(|e| {
        Error::io("cannot remove a leftover of an interrupted write in", &cfg.output_dir, e)
    })?;
    tensors::write_atomic(
        &cfg.output_dir.join("config.json"),
        &serde_json::to_vec_pretty(&cfg).expect("config serialises"),
    )?;
    let log_path = cfg.output_dir.join("log.jsonl");
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| Error::io("cannot open", &log_path, e))?;
    let sched = Schedules::new(&cfg, niter);
    let mut loss_fn = FlslLoss {
        student_temp: cfg.student_temp,
        teacher_temp_schedule: sched.teacher_temp.clone(),
        coefficients: cfg.loss_coefficients,
        vmr: cfg.volume_maximization.then_some(VmrPrior::Uniform),
        centering: run.state.center.clone().map(|center| Centering { center, momentum: 0.9 }),
    };
    tracing::info!(
        images = dataset.len(),
        skipped = dataset.skipped.len(),
        steps_per_epoch = niter,
        replicas = world,
        "dataset ready"
    );
    let total_steps = opts.max_steps.unwrap_or(cfg.epochs * niter).min(cfg.epochs * niter);
    let peer0 = (world > 1).then_some(Peer { rank: 0, world: world as u32 });
    let prev = PreviousStage::<B::InnerBackend>::load(&cfg, &run.device)?;
    if let Some(p) = &prev {
        tracing::info!(blocks = p.vit.blocks.len(), "previous stage loaded: multi-stage training");
    }
    let distill = DistillTeacher::<B::InnerBackend>::load(&cfg, &run.device)?;
    if let Some(d) = &distill {
        tracing::info!(
            width = d.embed_dim(),
            patch = d.model.backbone.patch_size(),
            blocks = d.model.backbone.blocks.len(),
            "frozen teacher loaded: distillation"
        );
    }

    std::thread::scope(|scope| -> Result<Run<B>> {
        // Replicas start as copies of rank 0 (fresh or resumed), each on its own device.
        let mut workers = Vec::new();
        for (i, device) in replica_devices.iter().enumerate() {
            let peer = Peer { rank: i as u32 + 1, world: world as u32 };
            let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
            let (reply_tx, reply_rx) = std::sync::mpsc::channel::<Reply>();
            let student = run.student.clone().fork(device);
            let teacher = run.teacher.clone().fork(device);
            let adam = run.adam.to_device(device);
            let replica_prev = prev.as_ref().map(|p| p.to_device(device));
            let replica_distill = distill.as_ref().map(|d| d.to_device(device));
            let (loss, device) = (loss_fn.clone(), device.clone());
            scope.spawn(move || {
                replica_worker::<B>(
                    student,
                    teacher,
                    replica_prev,
                    replica_distill,
                    adam,
                    loss,
                    device,
                    peer,
                    job_rx,
                    reply_tx,
                )
            });
            workers.push((job_tx, reply_rx));
        }
        if let Some(p) = peer0 {
            parallel::register::<B::InnerBackend>(p, &run.device)?;
        }
        let result = train_loop(
            &mut run,
            prev.as_ref(),
            distill.as_ref(),
            &cfg,
            &dataset,
            &sched,
            &mut loss_fn,
            &mut log,
            &workers,
            peer0,
            niter,
            epoch_len,
            total_steps,
            opts,
        );
        // Leave the group (and check that the replicas stayed identical) or, after a failure,
        // release the replicas: dropping the job channels ends their loops.
        match (result, peer0) {
            (Ok(()), Some(p)) => {
                for (tx, _) in &workers {
                    let _ = tx.send(Job::Finish);
                }
                parallel::finish::<B::InnerBackend>(p)?;
                let reference = model_state(&run.student.valid());
                for (i, (_, rx)) in workers.iter().enumerate() {
                    let state = loop {
                        match rx.recv() {
                            Ok(Reply::Finished(s)) => break s?,
                            Ok(Reply::Step(_)) => continue,
                            Err(_) => {
                                return Err(Error::Collective {
                                    op: "finish",
                                    peer: i as u32 + 1,
                                    reason: "the replica stopped".into(),
                                });
                            }
                        }
                    };
                    let (d, name) = max_divergence(&reference, &state);
                    if d > 1e-6 {
                        return Err(Error::Collective {
                            op: "consistency check",
                            peer: i as u32 + 1,
                            reason: format!(
                                "the replica's `{name}` differs from rank 0's by {d:e}"
                            ),
                        });
                    }
                }
                Ok(run)
            }
            (Ok(()), None) => Ok(run),
            (Err(e), p) => {
                drop(workers);
                if p.is_some() {
                    parallel::reset::<B::InnerBackend>();
                }
                Err(e)
            }
        }
    })
}

type Workers = [(std::sync::mpsc::Sender<Job>, std::sync::mpsc::Receiver<Reply>)];

/// The epochs of [`train_on_devices`] on rank 0.
#[allow(clippy::too_many_arguments)]
fn train_loop<B: AutodiffBackend>(
    run: &mut Run<B>,
    prev: Option<&PreviousStage<B::InnerBackend>>,
    distill: Option<&DistillTeacher<B::InnerBackend>>,
    cfg: &TrainConfig,
    dataset: &Arc<ImageFolder>,
    sched: &Schedules,
    loss_fn: &mut FlslLoss,
    log: &mut std::fs::File,
    workers: &Workers,
    peer0: Option<Peer>,
    niter: usize,
    epoch_len: usize,
    total_steps: usize,
    opts: &TrainOptions,
) -> Result<()> {
    let world = workers.len() + 1;
    let progress = &opts.progress;
    progress.report("step", run.state.step as u64, total_steps as u64, String::new);
    'epochs: while run.state.epoch < cfg.epochs {
        let epoch = run.state.epoch;
        // Multi-stage: the previous stage sees each crop before the photometric transforms.
        let augment = AugmentConfig { keep_crops: prev.is_some(), ..cfg.augment.clone() };
        let mut loader = Loader::new(
            dataset.clone(),
            augment,
            cfg.patch_size,
            cfg.batch_size_per_gpu * world,
            epoch_len,
            cfg.seed,
            epoch,
            cfg.num_workers,
            run.state.batch_in_epoch,
        );
        // The epoch's sums live in the run state (carried over when this epoch is resumed in
        // the middle, saved with every checkpoint).
        run.state.epoch_progress.hist.resize(cfg.out_dim, 0);
        let (batches_before, skipped_before) =
            (run.state.epoch_progress.batches, run.state.epoch_progress.skipped);
        let epoch_start = Instant::now();
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
            let hyper = StepHyper {
                iteration: it,
                epoch,
                lr: sched.lr[it],
                weight_decay: sched.wd[it],
                momentum: sched.momentum[it],
                sa_temp: sched.sa_temp[it],
                ca_temp: sched.ca_temp[it],
                ups: sched.ups[it],
                mixture: sched.mixture[it],
                clip_grad: (cfg.clip_grad > 0.0).then_some(cfg.clip_grad),
                freeze_last_layer: cfg.freeze_last_layer,
                betas: (0.9, 0.999),
                eps: 1e-8,
            };
            let step_seed = cfg.seed.wrapping_mul(1_000_003).wrapping_add(it as u64);
            // One share of the batch per replica; rank 0 keeps the first.
            let mut shares = split_batch(batch, world);
            let own = shares.remove(0);
            for ((tx, _), share) in workers.iter().zip(shares) {
                tx.send(Job::Step { batch: share, hyper, seed: step_seed, half: cfg.use_fp16 })
                    .map_err(|_| Error::Collective {
                        op: "step",
                        peer: 0,
                        reason: "a replica stopped".into(),
                    })?;
            }
            let result = replica_step(
                run.student.clone(),
                &mut run.teacher,
                prev,
                distill,
                &mut run.adam,
                loss_fn,
                &run.device,
                &own,
                &hyper,
                step_seed,
                peer0,
                cfg.use_fp16,
            );
            let mut replica_error = None;
            for (i, (_, rx)) in workers.iter().enumerate() {
                match rx.recv() {
                    Ok(Reply::Step(Ok(()))) => {}
                    Ok(Reply::Step(Err(e))) => replica_error = replica_error.or(Some(e)),
                    _ => {
                        replica_error = replica_error.or(Some(Error::Collective {
                            op: "step",
                            peer: i as u32 + 1,
                            reason: "the replica stopped".into(),
                        }))
                    }
                }
            }
            let (student, report) = result?;
            if let Some(e) = replica_error {
                return Err(e);
            }
            run.student = student;
            let l = report.loss;
            let p = &mut run.state.epoch_progress;
            for a in &report.teacher_assign {
                if let Some(h) = p.hist.get_mut(*a as usize) {
                    *h += 1;
                }
            }
            p.sums.total += l.total;
            p.sums.mean_shift += l.mean_shift;
            p.sums.kmeans += l.kmeans;
            p.sums.vmr += l.vmr;
            p.sums.feature += l.feature;
            p.batches += 1;
            p.skipped = skipped_before + loader.stats.skipped.len();
            run.state.step += 1;
            run.state.batch_in_epoch += 1;
            run.state.history.push((it, l));
            run.state.center = loss_fn.centering.as_ref().map(|c| c.center.clone());
            let ips = (cfg.batch_size_per_gpu * world) as f64 / t0.elapsed().as_secs_f64();
            log_line(
                log,
                serde_json::json!({
                    "step": it, "epoch": epoch, "loss": l.total, "mean_shift": l.mean_shift, "kmeans": l.kmeans, "vmr": l.vmr,
                    "lr": hyper.lr, "wd": hyper.weight_decay, "momentum": hyper.momentum, "images_per_s": ips,
                }),
            )?;
            progress.report("step", run.state.step as u64, total_steps as u64, || {
                format!(
                    "loss {:.4} (ms {:.3} km {:.3} vmr {:.3})  lr {:.2e}  {:.1} img/s",
                    l.total, l.mean_shift, l.kmeans, l.vmr, hyper.lr, ips
                )
            });
            if cfg.checkpoint_every_steps > 0
                && run.state.step.is_multiple_of(cfg.checkpoint_every_steps)
            {
                run.save(false)?;
            }
        }
        let skipped = skipped_before + loader.stats.skipped.len();
        drop(loader);
        if run.state.batch_in_epoch < niter && !exhausted {
            break; // max_steps reached inside the epoch
        }
        let EpochProgress { batches: n_batches, sums, hist, .. } =
            std::mem::take(&mut run.state.epoch_progress);
        let (used, entropy) = assignment_stats(&hist);
        let n = n_batches.max(1) as f64;
        let summary = EpochSummary {
            epoch,
            loss: (n_batches > 0).then(|| LossTerms {
                total: sums.total / n,
                mean_shift: sums.mean_shift / n,
                kmeans: sums.kmeans / n,
                vmr: sums.vmr / n,
                feature: sums.feature / n,
            }),
            prototypes_used: used,
            assignment_entropy: entropy,
            images_per_s: ((n_batches - batches_before) * cfg.batch_size_per_gpu * world) as f64
                / epoch_start.elapsed().as_secs_f64(),
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
        log_line(log, serde_json::json!({ "epoch_summary": summary }))?;
        run.state.epochs.push(summary);
        run.state.epoch += 1;
        run.state.batch_in_epoch = 0;
        // One save: a kept epoch checkpoint becomes `latest` itself. (Two saves, rolling then
        // kept, lose the kept one to a kill between them: the resumed run starts after it.)
        let keep = cfg.saveckp_freq > 0 && run.state.epoch.is_multiple_of(cfg.saveckp_freq);
        run.save(keep)?;
    }
    progress.report("step", total_steps as u64, total_steps as u64, String::new);
    if run.state.batch_in_epoch > 0 {
        run.save(false)?;
    }
    crate::plot::loss_plot(&cfg.output_dir.join("loss.png"), &run.state.history)?;
    Ok(())
}

/// Splits a batch into `n` consecutive shares of equal size (the loader's batch is a multiple).
fn split_batch(batch: Batch, n: usize) -> Vec<Batch> {
    let per = batch.samples.len() / n.max(1);
    let mut samples = batch.samples.into_iter();
    let mut indices = batch.indices.into_iter();
    (0..n.max(1))
        .map(|_| Batch {
            samples: samples.by_ref().take(per).collect(),
            indices: indices.by_ref().take(per).collect(),
        })
        .collect()
}

/// The reference-named state dict of a model wrapper (`backbone.*`, `head.*`).
pub fn model_state<B: Backend>(m: &FlslModel<B>) -> TensorMap {
    named::state_dict::<B, _>(m)
}
