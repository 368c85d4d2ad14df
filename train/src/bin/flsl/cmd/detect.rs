use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;

use crate::args::DetectArgs;

pub fn run(a: DetectArgs) -> anyhow::Result<ExitCode> {
    let mut opts = flsl_runtime::detect::DetectOptions::new(a.model);
    opts.threads = a.threads;
    opts.score_threshold = a.score;
    opts.meanshift = a.meanshift;
    opts.overlays = a.overlays;
    opts.max_frames = a.max_frames;
    let mut sink: Box<dyn std::io::Write> = match &a.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let bar = indicatif::ProgressBar::new_spinner();
    if a.out.is_some() {
        bar.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} {pos} frames  {per_sec}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let summary = flsl_runtime::detect::run_detect(&opts, &a.input, &mut sink, |n| {
        bar.set_position(n as u64)
    })
    .with_context(|| format!("detecting on {}", a.input.display()))?;
    sink.flush()?;
    bar.finish_and_clear();
    eprintln!("{}", summary.render());
    Ok(ExitCode::SUCCESS)
}
