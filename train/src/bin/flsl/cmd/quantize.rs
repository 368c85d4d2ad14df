use std::process::ExitCode;

use anyhow::Context;

use crate::args::QuantizeArgs;

pub fn run(a: QuantizeArgs) -> anyhow::Result<ExitCode> {
    use flsl_runtime::quantize::{
        BenchOptions, Calibration, DetectionSet, QuantFormat, QuantizeOptions, quantize_file,
        report_markdown,
    };
    let format = match a.format.as_str() {
        "tract" => QuantFormat::Tract,
        "qdq" => QuantFormat::Qdq,
        other => anyhow::bail!("--format `{other}`: expected `tract` or `qdq`"),
    };
    let calibration = match a.calibration.split_once('=') {
        None if a.calibration == "minmax" => Calibration::MinMax,
        None if a.calibration == "mse" => Calibration::Mse,
        None if a.calibration == "percentile" => Calibration::Percentile(99.99),
        Some(("percentile", p)) => Calibration::Percentile(
            p.parse().with_context(|| format!("--calibration percentile=`{p}` is not a number"))?,
        ),
        _ => anyhow::bail!(
            "--calibration `{}`: expected minmax, percentile[=P] or mse",
            a.calibration
        ),
    };
    let opts = QuantizeOptions {
        format,
        calibration,
        calib_images: a.calib_images,
        heldout_dir: a.heldout,
        float_ops: a.float_ops,
        quantize_conv: !a.float_conv,
        quantize_head_output: a.quantize_head_output,
        bench: (!a.no_latency && !a.threads.is_empty())
            .then(|| BenchOptions { threads: a.threads, ..BenchOptions::default() }),
        detection: a.det_gt.zip(a.det_images).map(|(gt, images)| DetectionSet {
            gt,
            images,
            score_threshold: a.det_score,
        }),
        ..QuantizeOptions::default()
    };
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    let report = quantize_file(&a.model, &a.calib, &a.out, &opts, &mut |p| {
        bar.set_message(format!("{:?}", p.stage));
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
    })
    .with_context(|| format!("quantizing {}", a.model.display()))?;
    bar.finish_and_clear();
    println!("{}", report_markdown(&report));
    Ok(ExitCode::SUCCESS)
}
