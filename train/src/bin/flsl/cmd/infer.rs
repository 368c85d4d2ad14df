use std::process::ExitCode;

use anyhow::Context;

use crate::args::InferArgs;

pub fn run(a: InferArgs) -> anyhow::Result<ExitCode> {
    let written = flsl_runtime::bench::infer_npy(&a.model, &a.npy, &a.out, a.threads)
        .with_context(|| format!("running {} on {}", a.model.display(), a.npy.display()))?;
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(ExitCode::SUCCESS)
}
