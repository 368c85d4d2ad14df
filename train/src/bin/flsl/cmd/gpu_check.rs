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
    let mut worst_first = 0.0;
    for (i, (c, g)) in cpu.losses.iter().zip(&gpu.losses).enumerate() {
        let rel = (c.total - g.total).abs() / c.total.abs().max(1e-12);
        if i == 0 {
            worst_first = rel;
        }
        println!("step {i}: cpu {c}  |  cuda {g}  |  rel diff {rel:.2e}");
    }
    if worst_first > a.tolerance {
        println!("FAIL: first-step loss differs by {worst_first:.2e} > {:.0e}", a.tolerance);
        return Ok(ExitCode::FAILURE);
    }
    println!("PASS: first-step loss within {:.0e}", a.tolerance);
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
