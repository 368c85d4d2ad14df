use std::process::ExitCode;

use crate::args::ReferenceCheckArgs;

pub fn run(a: ReferenceCheckArgs) -> anyhow::Result<ExitCode> {
    let results = flsl_train::reference::run_index(&a.dir)?;
    for r in &results {
        println!("{r}");
    }
    let (passed, failed) = flsl_train::reference::summarize(&results);
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 && passed > 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
