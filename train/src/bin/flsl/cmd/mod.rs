//! One function per command.

use std::process::ExitCode;

use anyhow::Context;

use crate::args::Command;

mod bench;
mod bundle;
mod demo;
mod detect;
mod distill;
mod eval_clusters;
mod eval_detections;
mod export;
mod gpu_check;
mod infer;
mod quantize;
mod reference_check;
mod train;
mod train_detector;

/// Runs one command.
pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Demo(a) => demo::run(a),
        Command::Train(a) => train::run(a),
        Command::Distill(a) => distill::run(a),
        Command::GpuCheck(a) => gpu_check::run(a),
        Command::Export(a) => export::run(a),
        Command::TrainDetector(a) => train_detector::run(a),
        Command::Detect(a) => detect::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::EvalDetections(a) => eval_detections::run(a),
        Command::EvalClusters(a) => eval_clusters::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Infer(a) => infer::run(a),
        Command::ReferenceCheck(a) => reference_check::run(a),
        Command::Bundle(a) => bundle::run(a),
    }
}

/// `224` or `224x320` (height x width).
pub fn parse_size(s: &str) -> anyhow::Result<(usize, usize)> {
    let parse = |t: &str| {
        t.trim()
            .parse::<usize>()
            .with_context(|| format!("--size `{s}`: `{t}` is not a number of pixels"))
    };
    match s.split_once(['x', 'X']) {
        Some((h, w)) => Ok((parse(h)?, parse(w)?)),
        None => {
            let n = parse(s)?;
            Ok((n, n))
        }
    }
}

/// The CPU device list (the commands that train on the host only).
pub fn cpu() -> Vec<flsl_train::backend::DeviceChoice> {
    vec![flsl_train::backend::DeviceChoice::Cpu]
}
