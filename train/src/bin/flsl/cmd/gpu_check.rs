use std::process::ExitCode;

use burn::tensor::backend::AutodiffBackend;
use flsl_train::backend::{BackendTask, DeviceChoice, run_on};
use flsl_train::config::TrainConfig;
use flsl_train::gpu_check::{BackendRun, run_steps};

use crate::args::GpuCheckArgs;

pub fn run(a: GpuCheckArgs) -> anyhow::Result<ExitCode> {
    let cfg = TrainConfig::preset(&a.preset)?;
    let steps = |device: DeviceChoice| {
        run_on(&[device], Steps { cfg: &cfg, steps: a.steps, batch: a.batch })
    };
    let cpu = steps(DeviceChoice::Cpu)??;
    println!("cpu : {:.2} images/s", cpu.images_per_s);
    for (i, c) in cpu.losses.iter().enumerate() {
        println!("step {i}: cpu {c}");
    }
    let gpu = steps(DeviceChoice::Cuda(a.cuda))??;
    println!(
        "cuda: {:.2} images/s ({:.1}x the CPU)",
        gpu.images_per_s,
        gpu.images_per_s / cpu.images_per_s
    );
    // Every term of every step: the same weights, batch and seeds on both backends, so the
    // differences are float rounding carried through the updates.
    if gpu.losses.len() != cpu.losses.len() {
        println!("FAIL: cuda ran {} steps, cpu {}", gpu.losses.len(), cpu.losses.len());
        return Ok(ExitCode::FAILURE);
    }
    let mut failed = Vec::new();
    for (i, (c, g)) in cpu.losses.iter().zip(&gpu.losses).enumerate() {
        let terms = [
            ("total", c.total, g.total),
            ("mean_shift", c.mean_shift, g.mean_shift),
            ("kmeans", c.kmeans, g.kmeans),
            ("vmr", c.vmr, g.vmr),
        ];
        let mut worst = 0f64;
        for (name, cv, gv) in terms {
            let rel = (cv - gv).abs() / cv.abs().max(1e-3);
            // A NaN on either side fails: it is not within.
            let within = rel <= a.tolerance;
            if !within {
                failed.push(format!("step {i} {name}: cpu {cv:.6e} cuda {gv:.6e} ({rel:.2e})"));
            }
            worst = worst.max(rel);
        }
        println!("step {i}: cpu {c}  |  cuda {g}  |  worst rel diff {worst:.2e}");
    }
    if !failed.is_empty() {
        println!("FAIL: {} term(s) beyond {:.0e}:", failed.len(), a.tolerance);
        for f in failed {
            println!("  {f}");
        }
        return Ok(ExitCode::FAILURE);
    }
    println!("PASS: every term of all {} steps within {:.0e}", cpu.losses.len(), a.tolerance);
    Ok(ExitCode::SUCCESS)
}

struct Steps<'a> {
    cfg: &'a TrainConfig,
    steps: usize,
    batch: usize,
}

impl BackendTask for Steps<'_> {
    type Output = flsl_train::Result<BackendRun>;

    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Self::Output {
        let device = devices.into_iter().next().ok_or_else(|| flsl_train::Error::Device {
            device: String::new(),
            reason: "no device given".into(),
        })?;
        run_steps::<B>(self.cfg, &device, self.steps, self.batch)
    }
}
