//! Inference speed of the deployment path: exports random-weight no-class ViT-Ti/16 and
//! ViT-S/16 backbones at 224x224 with flsl-runtime's ONNX exporter, then times them in
//! tract (1 and 2 threads) and, when `python3` can import onnxruntime, in onnxruntime on
//! the very same files. Prints a Markdown table and tract's per-op profile.
//!
//! ```text
//! cargo run --release -p flsl-examples --features onnx --example onnx_bench -- \
//!     [--out DIR] [--models tiny,small|none] [--threads 1,2] [--iters 30] [--warmup 5] \
//!     [--profile] [--no-ort] [--onnx EXTRA.onnx ...]
//! ```
//!
//! Random weights are fine for speed: the work per frame does not depend on the values.
//! Use `RUSTFLAGS="-C target-cpu=x86-64-v3"` (or the board's CPU) for deployment builds.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use flsl_runtime::bench::{bench, ort_bench, peak_rss_bytes};
use flsl_runtime::export::{VitSpec, export_vit, random_vit_weights};
use flsl_runtime::onnx::{ModelOptions, OnnxModel};

struct Args {
    out: PathBuf,
    models: Vec<String>,
    threads: Vec<usize>,
    iters: usize,
    warmup: usize,
    profile: bool,
    ort: bool,
    extra: Vec<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        out: std::env::temp_dir().join("flsl-onnx-bench"),
        models: vec!["tiny".into(), "small".into()],
        threads: vec![1, 2],
        iters: 30,
        warmup: 5,
        profile: false,
        ort: true,
        extra: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--out" => a.out = value()?.into(),
            "--models" => {
                // `none`: only the files given with --onnx.
                a.models = value()?
                    .split(',')
                    .filter(|m| !m.is_empty() && *m != "none")
                    .map(str::to_string)
                    .collect()
            }
            "--threads" => {
                a.threads = value()?
                    .split(',')
                    .map(|t| t.parse().context("--threads"))
                    .collect::<Result<_>>()?
            }
            "--iters" => a.iters = value()?.parse().context("--iters")?,
            "--warmup" => a.warmup = value()?.parse().context("--warmup")?,
            "--profile" => a.profile = true,
            "--no-ort" => a.ort = false,
            "--onnx" => a.extra.push(value()?.into()),
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn main() -> Result<()> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut files = Vec::new();
    for m in &args.models {
        let spec = match m.as_str() {
            "tiny" => VitSpec::vit_tiny_p16(224, 224),
            "small" => VitSpec::vit_small_p16(224, 224),
            other => bail!("unknown model {other} (tiny, small)"),
        };
        let path = args.out.join(format!("vit_{m}16_noclass_224_random.onnx"));
        let t = Instant::now();
        let weights = random_vit_weights(&spec, 0);
        let bytes = export_vit(&weights, &spec, &weights["pos_embed"].1, None)?;
        std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        eprintln!(
            "exported {} ({:.1} MB) in {:.2?}",
            path.display(),
            bytes.len() as f64 / 1e6,
            t.elapsed()
        );
        files.push(path);
    }
    files.extend(args.extra.iter().cloned());

    println!("| model | runtime | threads | median ms | p90 ms | min ms | frames/s |");
    println!("|---|---|---|---|---|---|---|");
    for path in &files {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let t = bench(path, &args.threads, args.iters, args.warmup)?;
        for r in &t.timings {
            println!(
                "| {name} | tract | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                r.threads, r.median_ms, r.p90_ms, r.min_ms, r.fps
            );
        }
        if args.ort {
            match ort_bench(path, &args.threads, args.iters, args.warmup)? {
                Some(o) => {
                    for r in &o.timings {
                        println!(
                            "| {name} | onnxruntime {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |",
                            o.onnxruntime_version,
                            r.threads,
                            r.median_ms,
                            r.p90_ms,
                            r.min_ms,
                            r.fps
                        );
                    }
                }
                None => eprintln!("onnxruntime not importable by python3: skipped"),
            }
        }
        eprintln!(
            "{name}: preprocessing (RGB8 224x224 -> tensor) {:.3} ms; peak RSS so far {:.0} MB",
            t.timings.first().map_or(0.0, |r| r.preprocess_ms),
            peak_rss_bytes().unwrap_or(0) as f64 / 1e6
        );
    }

    if args.profile {
        for path in &files {
            let mut m = OnnxModel::load(path, ModelOptions::new())?;
            m.input_mut()?
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = (i % 17) as f32 * 0.1 - 0.8);
            m.profile(args.warmup.max(1))?;
            let p = m.profile(args.iters)?;
            println!(
                "\n### tract per-op profile, {} (1 thread, {:.1} ms/frame)\n",
                path.display(),
                ms(p.total_per_frame)
            );
            println!("| op | nodes | ms/frame | share |");
            println!("|---|---|---|---|");
            let total: f64 = p.by_op.iter().map(|o| ms(o.per_frame)).sum();
            for o in &p.by_op {
                let t = ms(o.per_frame);
                println!(
                    "| {} | {} | {:.2} | {:.1} % |",
                    o.op,
                    o.nodes,
                    t,
                    100.0 * t / total
                );
            }
            // Per role inside a block: node names are `blocks.{i}.<role>` or `blocks.{i}/<role>`
            // (tract keeps the exporter's names and suffixes the ops it fuses or splits).
            let mut roles: Vec<(String, f64)> = Vec::new();
            for n in &p.by_node {
                let role = match n.node.strip_prefix("blocks.") {
                    Some(rest) => rest
                        .trim_start_matches(|c: char| c.is_ascii_digit())
                        .trim_start_matches(['.', '/']),
                    None => n.node.as_str(),
                };
                let role = format!("{role} ({})", n.op);
                match roles.iter_mut().find(|r| r.0 == role) {
                    Some(r) => r.1 += ms(n.per_frame),
                    None => roles.push((role, ms(n.per_frame))),
                }
            }
            roles.sort_by(|a, b| b.1.total_cmp(&a.1));
            println!("\nby node role, summed over blocks:\n");
            println!("| node role (op) | ms/frame |");
            println!("|---|---|");
            for (role, t) in roles.iter().take(16) {
                println!("| {role} | {t:.2} |");
            }
            println!("\nslowest nodes:\n");
            for n in p.by_node.iter().take(12) {
                println!("- {} ({}): {:.2} ms", n.node, n.op, ms(n.per_frame));
            }
        }
    }
    Ok(())
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
