use std::process::ExitCode;

use anyhow::Context;
use burn::tensor::backend::AutodiffBackend;
use flsl_train::backend::{BackendTask, run_on};
use flsl_train::config::TrainConfig;
use flsl_train::trainer::{Run, TrainOptions, checkpoints_dir};

use crate::args::TrainArgs;

pub fn run(a: TrainArgs) -> anyhow::Result<ExitCode> {
    let cfg = config_from_args(&a)?;
    let devices = flsl_train::backend::parse_devices(&cfg.device)?;
    run_on(&devices, Train { cfg, fresh: a.fresh, max_steps: a.max_steps })?
}

/// The configuration `flsl train`'s (and `flsl distill`'s) arguments describe: preset, then
/// `--config`, then `--set`, `--data`, `--out`, `--device`.
pub fn config_from_args(a: &TrainArgs) -> anyhow::Result<TrainConfig> {
    let mut cfg = match &a.preset {
        Some(p) => TrainConfig::preset(p)?,
        None => TrainConfig::default(),
    };
    if let Some(path) = &a.config {
        cfg = TrainConfig::from_toml_file(path, Some(cfg))?;
    }
    let mut set = a.set.clone();
    if let Some(d) = &a.data {
        set.push(format!("data_path={:?}", d.display().to_string()));
    }
    if let Some(o) = &a.out {
        set.push(format!("output_dir={:?}", o.display().to_string()));
    }
    if let Some(d) = &a.device {
        set.push(format!("device={d:?}"));
    }
    Ok(cfg.with_overrides(&set)?)
}

/// Trains on the given devices (the first is rank 0; more than one: data-parallel replicas).
struct Train {
    cfg: TrainConfig,
    fresh: bool,
    max_steps: Option<usize>,
}

impl BackendTask for Train {
    type Output = anyhow::Result<ExitCode>;

    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Self::Output {
        let Self { cfg, fresh, max_steps } = self;
        let (run, replicas) = open_run::<B>(
            cfg,
            devices,
            fresh,
            |run, cfg| {
                if run.cfg != *cfg {
                    tracing::warn!(
                        "the configuration differs from the checkpoint's; continuing with the checkpoint's"
                    );
                }
                Ok(())
            },
            |cfg, device| Ok(Run::<B>::new(cfg, device)?),
        )?;
        let run = flsl_train::trainer::train_on_devices(
            run,
            replicas,
            &TrainOptions { max_steps, progress: crate::progress::bars() },
        )?;
        println!(
            "trained {} steps; checkpoints in {}",
            run.state.step,
            checkpoints_dir(&run.cfg.output_dir).display()
        );
        Ok(ExitCode::SUCCESS)
    }
}

/// Rank 0's run and the replicas' devices (the first device is rank 0's): resumed from the
/// output folder's `checkpoints/latest` unless `fresh` (then `on_resume` sees the checkpoint's
/// run and the configuration asked for), else made by `new`.
pub fn open_run<B: AutodiffBackend>(
    cfg: TrainConfig,
    devices: Vec<B::Device>,
    fresh: bool,
    on_resume: impl FnOnce(&Run<B>, &TrainConfig) -> anyhow::Result<()>,
    new: impl FnOnce(TrainConfig, B::Device) -> anyhow::Result<Run<B>>,
) -> anyhow::Result<(Run<B>, Vec<B::Device>)> {
    let mut devices = devices.into_iter();
    let device = devices.next().context("no device")?;
    let replicas: Vec<B::Device> = devices.collect();
    let latest = checkpoints_dir(&cfg.output_dir).join("latest");
    let run = if latest.exists() && !fresh {
        tracing::info!("resuming from {}", latest.display());
        let run = Run::<B>::load(&latest, device)
            .with_context(|| format!("resuming from {}", latest.display()))?;
        on_resume(&run, &cfg)?;
        run
    } else {
        new(cfg, device)?
    };
    Ok((run, replicas))
}
