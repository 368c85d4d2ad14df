use std::process::ExitCode;

use anyhow::Context;

use crate::args::EvalDetectionsArgs;

pub fn run(a: EvalDetectionsArgs) -> anyhow::Result<ExitCode> {
    let stats = flsl_runtime::eval::evaluate_files(&a.gt, &a.dt)
        .with_context(|| format!("evaluating {} against {}", a.dt.display(), a.gt.display()))?;
    if a.json {
        println!("{}", stats.to_json());
    } else {
        println!("{stats}");
    }
    Ok(ExitCode::SUCCESS)
}
