//! The `flsl` command-line tool: clap parsing, logging, and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flsl_train::backend::DeviceChoice;
use flsl_train::config::TrainConfig;
use flsl_train::demo::{DemoOptions, run_demo};
use flsl_train::trainer::{Run, TrainOptions, checkpoints_dir, train};

#[derive(Parser)]
#[command(name = "flsl", version, about = "FLSL: feature-level self-supervised ViTs, from training to drones")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pretrains a small FLSL ViT on the embedded aerial images (a few minutes on a CPU) and
    /// writes cluster maps of held-out images, the loss plot and a report.
    Demo {
        /// Output folder.
        #[arg(long, default_value = "out/demo")]
        out: PathBuf,
        /// Image folder (default: the repository's data/neon-aerial-trees/images).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Training steps.
        #[arg(long, default_value_t = 240)]
        steps: usize,
    },
    /// FLSL pretraining on a folder of images.
    Train {
        /// TOML configuration (defaults: the paper's ViT-S/16 recipe).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Start from a preset: `vit_small16` (paper), `vit_tiny16`, `tiny` (CPU).
        #[arg(long)]
        preset: Option<String>,
        /// Overrides `key=value` (TOML values; `augment.global_resize=128`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Image folder (overrides `data_path`).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Output folder (overrides `output_dir`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// `cpu`, `cuda` or `cuda:N` (overrides `device`).
        #[arg(long)]
        device: Option<String>,
        /// Stop after this many steps.
        #[arg(long)]
        max_steps: Option<usize>,
        /// Ignore an existing checkpoint in the output folder and start over.
        #[arg(long)]
        fresh: bool,
    },
    /// Runs the same training steps on the CPU and on a CUDA device (same weights, same batch)
    /// and compares the losses; prints each backend's images/s.
    GpuCheck {
        /// Preset of the model (`tiny`, `vit_tiny16`, `vit_small16`).
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Steps per backend.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Images per step.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        cuda: usize,
        /// Largest accepted relative difference of the first step's loss.
        #[arg(long, default_value_t = 1e-3)]
        tolerance: f64,
    },
    /// Checks our implementation against the golden tensors of the official PyTorch code.
    ReferenceCheck {
        /// Folder with `index.json` (e.g. `../shared/reference` or its `micro/`).
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn train_on<B: burn::tensor::backend::AutodiffBackend>(cfg: TrainConfig, device: B::Device, fresh: bool, max_steps: Option<usize>) -> anyhow::Result<()> {
    let latest = checkpoints_dir(&cfg.output_dir).join("latest");
    let run = if latest.exists() && !fresh {
        tracing::info!("resuming from {}", latest.display());
        let run = Run::<B>::load(&latest, device).with_context(|| format!("resuming from {}", latest.display()))?;
        if run.cfg != cfg {
            tracing::warn!("the configuration differs from the checkpoint's; continuing with the checkpoint's");
        }
        run
    } else {
        Run::<B>::new(cfg, device)?
    };
    let run = train(run, &TrainOptions { max_steps, progress: true })?;
    println!("trained {} steps; checkpoints in {}", run.state.step, checkpoints_dir(&run.cfg.output_dir).display());
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::ReferenceCheck { dir } => {
            let results = flsl_train::reference::run_index(&dir)?;
            for r in &results {
                println!("{r}");
            }
            let (passed, failed) = flsl_train::reference::summarize(&results);
            println!("{passed} passed, {failed} failed");
            Ok(if failed == 0 && passed > 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Train { config, preset, set, data, out, device, max_steps, fresh } => {
            let mut cfg = match &preset {
                Some(p) => TrainConfig::preset(p)?,
                None => TrainConfig::default(),
            };
            if let Some(path) = &config {
                cfg = TrainConfig::from_toml_file(path, Some(cfg))?;
            }
            let mut set = set;
            if let Some(d) = data {
                set.push(format!("data_path={:?}", d.display().to_string()));
            }
            if let Some(o) = out {
                set.push(format!("output_dir={:?}", o.display().to_string()));
            }
            if let Some(d) = device {
                set.push(format!("device={d:?}"));
            }
            let cfg = cfg.with_overrides(&set)?;
            let choice: DeviceChoice = cfg.device.parse().map_err(anyhow::Error::msg)?;
            match choice.check_available().map_err(anyhow::Error::msg)? {
                DeviceChoice::Cpu => {
                    #[cfg(feature = "ndarray")]
                    train_on::<flsl_train::backend::CpuTrain>(cfg, flsl_train::backend::cpu_device(), fresh, max_steps)?;
                }
                DeviceChoice::Cuda(_n) => {
                    #[cfg(feature = "cuda")]
                    train_on::<flsl_train::backend::GpuTrain>(cfg, flsl_train::backend::cuda_device(_n), fresh, max_steps)?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::GpuCheck { preset, steps, batch, cuda, tolerance } => {
            let cfg = TrainConfig::preset(&preset)?;
            let cpu = flsl_train::gpu_check::run_steps::<flsl_train::backend::CpuTrain>(&cfg, &flsl_train::backend::cpu_device(), steps, batch)?;
            println!("cpu : {:.2} images/s", cpu.images_per_s);
            #[cfg(feature = "cuda")]
            {
                let gpu = flsl_train::gpu_check::run_steps::<flsl_train::backend::GpuTrain>(&cfg, &flsl_train::backend::cuda_device(cuda), steps, batch)?;
                println!("cuda: {:.2} images/s ({:.1}x the CPU)", gpu.images_per_s, gpu.images_per_s / cpu.images_per_s);
                let mut worst_first = 0.0;
                for (i, (c, g)) in cpu.losses.iter().zip(&gpu.losses).enumerate() {
                    let rel = (c.total - g.total).abs() / c.total.abs().max(1e-12);
                    if i == 0 {
                        worst_first = rel;
                    }
                    println!("step {i}: cpu {c}  |  cuda {g}  |  rel diff {rel:.2e}");
                }
                if worst_first > tolerance {
                    println!("FAIL: first-step loss differs by {worst_first:.2e} > {tolerance:.0e}");
                    return Ok(ExitCode::FAILURE);
                }
                println!("PASS: first-step loss within {tolerance:.0e}");
                return Ok(ExitCode::SUCCESS);
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = (cuda, tolerance);
                for (i, c) in cpu.losses.iter().enumerate() {
                    println!("step {i}: cpu {c}");
                }
                anyhow::bail!("this build has no CUDA backend: rebuild with `--features cuda` to compare");
            }
        }
        Command::Demo { out, data, steps } => {
            let opts = DemoOptions { out, steps, data: data.unwrap_or_else(flsl_train::demo::default_data), ..DemoOptions::default() };
            #[cfg(feature = "ndarray")]
            {
                let r = run_demo::<flsl_train::backend::CpuTrain>(&opts, flsl_train::backend::cpu_device())?;
                print!("{}", flsl_train::demo::render_markdown(&r));
                println!("\nwrote {}", opts.out.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
