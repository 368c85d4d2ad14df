use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::Module;
use burn::tensor::backend::{AutodiffBackend, Backend};
use flsl_train::backend::{BackendTask, run_on};
use flsl_train::config::{DistillConfig, TrainConfig};
use flsl_train::distill::report::{self, DistillReport};
use flsl_train::distill::{self, DistillTeacher};
use flsl_train::model::FlslModel;
use flsl_train::trainer::{Run, TrainOptions, checkpoints_dir};

use crate::args::DistillArgs;

pub fn run(a: DistillArgs) -> anyhow::Result<ExitCode> {
    let mut cfg = super::train::config_from_args(&a.train)?;
    if !a.holdout.is_empty() {
        cfg.holdout = a.holdout.clone();
    }
    cfg.distill = Some(DistillConfig {
        teacher: a.teacher.clone(),
        teacher_sha256: None,
        feature_weight: a.feature_weight,
    });
    cfg.validate()?;
    let eval_images: Vec<PathBuf> = match &a.eval {
        Some(dir) => flsl_runtime::quantize::list_images(dir)
            .with_context(|| format!("--eval {}", dir.display()))?,
        None => cfg.holdout.iter().map(|n| cfg.data_path.join(n)).collect(),
    };
    if eval_images.is_empty() {
        bail!(
            "the report needs held-out images: --holdout NAME (a file under --data, left out of training; repeat it) or --eval DIR"
        );
    }
    if let Some(missing) = eval_images.iter().find(|p| !p.is_file()) {
        bail!("held-out image {} does not exist", missing.display());
    }
    if a.report_size == 0 || !a.report_size.is_multiple_of(cfg.patch_size) {
        bail!(
            "--report-size {} is not a positive multiple of the student's patch size {}",
            a.report_size,
            cfg.patch_size
        );
    }
    let devices = flsl_train::backend::parse_devices(&cfg.device)?;
    run_on(
        &devices,
        Distill {
            cfg,
            fresh: a.train.fresh,
            max_steps: a.train.max_steps,
            eval_images,
            side: a.report_size,
            latency: !a.no_latency,
        },
    )?
}

struct Distill {
    cfg: TrainConfig,
    fresh: bool,
    max_steps: Option<usize>,
    eval_images: Vec<PathBuf>,
    side: usize,
    latency: bool,
}

fn arch(cfg: &TrainConfig) -> String {
    match cfg.vit_config() {
        Ok(v) => distill::describe(&v, cfg.out_dim),
        Err(e) => e.to_string(),
    }
}

fn parameters<B: Backend>(m: &FlslModel<B>) -> usize {
    m.backbone.num_params() + m.head.num_params()
}

impl BackendTask for Distill {
    type Output = anyhow::Result<ExitCode>;

    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Self::Output {
        let Self { cfg, fresh, max_steps, eval_images, side, latency } = self;
        let (run, replicas) = super::train::open_run::<B>(
            cfg,
            devices,
            fresh,
            |run, cfg| {
                let Some(d) = &run.cfg.distill else {
                    bail!(
                        "{} holds a pretraining run, not a distillation: choose another --out, or --fresh to start over there",
                        cfg.output_dir.display()
                    );
                };
                let asked = cfg.distill.as_ref().map(|a| (&a.teacher, a.feature_weight));
                if asked != Some((&d.teacher, d.feature_weight)) {
                    tracing::warn!(
                        "the teacher or feature weight differs from the checkpoint's ({}, {}); continuing with the checkpoint's",
                        d.teacher.display(),
                        d.feature_weight
                    );
                }
                Ok(())
            },
            |mut cfg, device| {
                let teacher = distill::prepare(&mut cfg)?;
                tracing::info!("{teacher}");
                Ok(Run::<B>::new(cfg, device)?)
            },
        )?;
        let (t0, steps_before) = (Instant::now(), run.state.step);
        let run = flsl_train::trainer::train_on_devices(
            run,
            replicas,
            &TrainOptions { max_steps, progress: crate::progress::bars() },
        )?;
        let train_seconds = t0.elapsed().as_secs_f64();
        let cfg = run.cfg.clone();
        let out = cfg.output_dir.clone();
        println!(
            "distilled {} steps; checkpoints in {}",
            run.state.step,
            checkpoints_dir(&out).display()
        );

        // The report: the EMA student (what `flsl export` writes) and its initialisation.
        let device = run.device.clone();
        let teacher = DistillTeacher::<B::InnerBackend>::load(&cfg, &device)?
            .context("the run has no [distill] table")?;
        let images = report::load_images(&eval_images)?;
        let distilled = report::compare(&run.teacher, &teacher, &images, side, &device)?;
        let untrained_student = Run::<B>::new(cfg.clone(), device.clone())?.teacher;
        let untrained = report::compare(&untrained_student, &teacher, &images, side, &device)?;
        let teacher_path = cfg.distill.as_ref().map(|d| d.teacher.clone()).unwrap_or_default();
        let latency = if latency {
            let dir = out.join("report");
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let calib = &cfg.data_path;
            Some(vec![
                report::model_cost(
                    "teacher",
                    &teacher_path,
                    calib,
                    &dir,
                    side,
                    parameters(&teacher.model),
                )?,
                report::model_cost(
                    "student",
                    &checkpoints_dir(&out).join("latest"),
                    calib,
                    &dir,
                    side,
                    parameters(&run.teacher),
                )?,
            ])
        } else {
            None
        };
        let r = DistillReport {
            teacher: teacher.file.clone(),
            teacher_arch: teacher.arch.clone(),
            student_arch: arch(&cfg),
            steps: run.state.step,
            steps_now: run.state.step - steps_before,
            train_seconds,
            images: eval_images,
            side,
            distilled,
            untrained,
            latency,
            machine: report::machine(),
        };
        flsl_train::tensors::write_atomic(
            &out.join("report.json"),
            &serde_json::to_vec_pretty(&r).context("serialising the report")?,
        )?;
        let md = report::render_markdown(&r);
        flsl_train::tensors::write_atomic(&out.join("report.md"), md.as_bytes())?;
        println!("{md}");
        println!("report: {}", out.join("report.md").display());
        Ok(ExitCode::SUCCESS)
    }
}
