use std::process::ExitCode;

use burn::tensor::backend::AutodiffBackend;
use flsl_train::backend::{BackendTask, DeviceChoice, run_on};
use flsl_train::config::TrainConfig;
use flsl_train::gpu_check::{BackendRun, run_steps};

use crate::args::GpuCheckArgs;

pub fn run(a: GpuCheckArgs) -> anyhow::Result<ExitCode> {
    let cfg = TrainConfig::preset(&a.preset)?;
    let steps = |device: DeviceChoice, half: bool| {
        run_on(&[device], Steps { cfg: &cfg, steps: a.steps, batch: a.batch, half })
    };
    let cpu = if a.no_cpu {
        None
    } else {
        let cpu = steps(DeviceChoice::Cpu, false)??;
        println!("cpu : {:.2} images/s", cpu.images_per_s);
        Some(cpu)
    };
    let gpu = steps(DeviceChoice::Cuda(a.cuda), false)??;
    match &cpu {
        Some(cpu) => println!(
            "cuda: {:.2} images/s ({:.1}x the CPU)",
            gpu.images_per_s,
            gpu.images_per_s / cpu.images_per_s
        ),
        None => println!("cuda: {:.2} images/s", gpu.images_per_s),
    }
    // Every term of every step: the same weights, batch and seeds on both backends, so the
    // differences are float rounding carried through the updates.
    let mut failed = match &cpu {
        Some(cpu) => compare(("cpu", cpu), ("cuda", &gpu), a.tolerance),
        None => Vec::new(),
    };
    let half = steps(DeviceChoice::Cuda(a.cuda), true)??;
    println!(
        "cuda, half precision (bfloat16 backbones): {:.2} images/s ({:.2}x CUDA f32)",
        half.images_per_s,
        half.images_per_s / gpu.images_per_s
    );
    failed.extend(compare(("cuda f32", &gpu), ("cuda half", &half), a.half_tolerance));
    if !failed.is_empty() {
        println!("FAIL: {} term(s) beyond their tolerance:", failed.len());
        for f in failed {
            println!("  {f}");
        }
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "PASS: every term of all {} steps within {:.0e} (CPU vs CUDA{}) and {:.0e} (f32 vs half)",
        gpu.losses.len(),
        a.tolerance,
        if cpu.is_none() { ", not run" } else { "" },
        a.half_tolerance
    );
    Ok(ExitCode::SUCCESS)
}

/// Every loss term of every step of `b` against `a`'s, relative to `a`'s (absolute below
/// 1e-3); prints one line per step and returns the terms beyond `tolerance`.
fn compare(
    (an, a): (&str, &BackendRun),
    (bn, b): (&str, &BackendRun),
    tolerance: f64,
) -> Vec<String> {
    let mut failed = Vec::new();
    if a.losses.len() != b.losses.len() {
        failed.push(format!("{bn} ran {} steps, {an} {}", b.losses.len(), a.losses.len()));
    }
    for (i, (x, y)) in a.losses.iter().zip(&b.losses).enumerate() {
        let terms = [
            ("total", x.total, y.total),
            ("mean_shift", x.mean_shift, y.mean_shift),
            ("kmeans", x.kmeans, y.kmeans),
            ("vmr", x.vmr, y.vmr),
        ];
        let mut worst = 0f64;
        for (name, xv, yv) in terms {
            let rel = (xv - yv).abs() / xv.abs().max(1e-3);
            // A NaN on either side fails: it is not within.
            let within = rel <= tolerance;
            if !within {
                failed.push(format!("step {i} {name}: {an} {xv:.6e} {bn} {yv:.6e} ({rel:.2e})"));
            }
            worst = worst.max(rel);
        }
        println!("step {i}: {an} {x}  |  {bn} {y}  |  worst rel diff {worst:.2e}");
    }
    failed
}

struct Steps<'a> {
    cfg: &'a TrainConfig,
    steps: usize,
    batch: usize,
    half: bool,
}

impl BackendTask for Steps<'_> {
    type Output = flsl_train::Result<BackendRun>;

    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Self::Output {
        let device = devices.into_iter().next().ok_or_else(|| flsl_train::Error::Device {
            device: String::new(),
            reason: "no device given".into(),
        })?;
        run_steps::<B>(self.cfg, &device, self.steps, self.batch, self.half)
    }
}
