use std::process::ExitCode;

use burn::tensor::backend::AutodiffBackend;
use flsl_train::backend::{BackendTask, run_on};
use flsl_train::demo::{DemoOptions, render_markdown, run_demo};

use crate::args::DemoArgs;

pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let opts = DemoOptions {
        out: a.out,
        steps: a.steps,
        data: a.data.unwrap_or_else(flsl_train::demo::default_data),
        progress: crate::progress::bars(),
        ..DemoOptions::default()
    };
    run_on(&super::cpu(), Demo(opts))?
}

struct Demo(DemoOptions);

impl BackendTask for Demo {
    type Output = anyhow::Result<ExitCode>;

    fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>) -> Self::Output {
        let device = devices.into_iter().next().ok_or_else(|| anyhow::anyhow!("no device"))?;
        let r = run_demo::<B>(&self.0, device)?;
        print!("{}", render_markdown(&r));
        println!("\nwrote {}", self.0.out.display());
        Ok(ExitCode::SUCCESS)
    }
}
