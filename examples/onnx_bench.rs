//! Inference speed of the deployment path: exports random-weight no-class ViT-Ti/16 and
//! ViT-S/16 backbones at 224x224 with flsl-runtime's ONNX exporter, then times them in
//! tract (1 and 2 threads) and, when `python3` can import onnxruntime, in onnxruntime on
//! the very same files. Prints a Markdown table and tract's per-op profile.
//!
//! ```text
//! cargo run --release -p flsl-examples --features onnx --example onnx_bench -- \
//!     [--out DIR] [--models tiny,small|none] [--threads 1,2] [--iters 30] [--warmup 5] \
//!     [--profile] [--plan] [--no-ort] [--engines gemm,tract] [--blocks 1] [--onnx EXTRA.onnx ...]
//! ```
//!
//! `--engines` picks which matmul engines of [`OnnxModel`] are timed (`gemm`: the default,
//! `tract`: tract's own kernels); `--blocks B` repeats the whole set of measurements B
//! times, interleaved, and reports the median and the best of the per-block medians.
//! `--plan` prints tract's optimized plan (op per node and the kernel each matmul uses).
//! `--profile` times every node of each engine's plan at each `--threads` count; `--plan` shows the first engine's.
//!
//! Random weights are fine for speed: the work per frame does not depend on the values.
//! Use `RUSTFLAGS="-C target-cpu=x86-64-v3"` (or the board's CPU) for deployment builds.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use flsl_runtime::bench::{bench_with, ort_bench, peak_rss_bytes};
use flsl_runtime::export::{VitSpec, export_vit, random_vit_weights};
use flsl_runtime::onnx::{MatMulEngine, ModelOptions, OnnxModel};

/// Times random-weight ViT exports (and any `--onnx` files) in tract and onnxruntime.
#[derive(Parser)]
struct Args {
    /// Folder for the exported models.
    #[arg(long, default_value_os_t = std::env::temp_dir().join("flsl-onnx-bench"))]
    out: PathBuf,
    /// Random-weight backbones to export (`tiny`, `small`); `none`: only the `--onnx` files.
    #[arg(long, value_delimiter = ',', default_value = "tiny,small")]
    models: Vec<String>,
    /// Thread counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Timed runs per measurement.
    #[arg(long, default_value_t = 30)]
    iters: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Time every node of each engine's plan, at each `--threads` count.
    #[arg(long)]
    profile: bool,
    /// Print tract's optimized plan of the first engine.
    #[arg(long)]
    plan: bool,
    /// Skip onnxruntime.
    #[arg(long = "no-ort", action = clap::ArgAction::SetFalse)]
    ort: bool,
    /// Matmul engines to time (`gemm`, `tract`).
    #[arg(long, value_delimiter = ',', default_value = "gemm,tract", value_parser = parse_engine)]
    engines: Vec<MatMulEngine>,
    /// Repeat the whole set of measurements this many times, interleaved.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    blocks: u64,
    /// Further ONNX files to time.
    #[arg(long = "onnx")]
    extra: Vec<PathBuf>,
}

fn parse_engine(e: &str) -> Result<MatMulEngine, String> {
    match e {
        "gemm" => Ok(MatMulEngine::Gemm),
        "tract" => Ok(MatMulEngine::Tract),
        other => Err(format!("unknown engine {other} (gemm, tract)")),
    }
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    args.models.retain(|m| !m.is_empty() && m != "none");
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut files = Vec::new();
    for m in &args.models {
        let Some(spec) = VitSpec::named(m, 224, 224) else {
            bail!("unknown model {m} (tiny, small)")
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

    // Every block times each (model, engine, threads) in tract and then onnxruntime, so
    // both see the same machine load; the table gives the median and the best of the
    // per-block medians.
    let mut cells: Vec<(String, String, usize, Vec<f64>)> = Vec::new();
    let mut record = |model: &str, runtime: String, threads: usize, ms: f64| match cells
        .iter_mut()
        .find(|c| c.0 == model && c.1 == runtime && c.2 == threads)
    {
        Some(c) => c.3.push(ms),
        None => cells.push((model.to_string(), runtime, threads, vec![ms])),
    };
    for block in 0..args.blocks {
        for path in &files {
            let name =
                path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            for &engine in &args.engines {
                let options = ModelOptions::new().with_matmul(engine);
                let t = bench_with(path, options, &args.threads, args.iters, args.warmup)?;
                for r in &t.timings {
                    record(&name, format!("tract ({engine:?})"), r.threads, r.median_ms);
                }
                if block == 0 {
                    eprintln!(
                        "{name} ({engine:?}): preprocessing (RGB8 224x224 -> tensor) {:.3} ms; peak RSS so far {:.0} MB",
                        t.timings.first().map_or(0.0, |r| r.preprocess_ms),
                        peak_rss_bytes().unwrap_or(0) as f64 / 1e6
                    );
                }
            }
            if args.ort {
                match ort_bench(path, &args.threads, args.iters, args.warmup)? {
                    Some(o) => {
                        for r in &o.timings {
                            let rt = format!("onnxruntime {}", o.onnxruntime_version);
                            record(&name, rt, r.threads, r.median_ms);
                        }
                    }
                    None => eprintln!("onnxruntime not importable by python3: skipped"),
                }
            }
        }
        eprintln!("block {} of {} done", block + 1, args.blocks);
    }
    let stat = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0])
    };
    println!(
        "| model | runtime | threads | ms/frame, median of {} block medians | best block | vs onnxruntime (median, best) |",
        args.blocks
    );
    println!("|---|---|---|---|---|---|");
    for (model, runtime, threads, v) in &cells {
        let (med, best) = stat(v);
        let ort = cells
            .iter()
            .find(|c| &c.0 == model && c.1.starts_with("onnxruntime") && c.2 == *threads)
            .map(|c| stat(&c.3));
        let ratio = match ort {
            Some((om, ob)) if !runtime.starts_with("onnxruntime") => {
                format!("{:.2}x, {:.2}x", med / om, best / ob)
            }
            _ => "-".into(),
        };
        println!("| {model} | {runtime} | {threads} | {med:.1} | {best:.1} | {ratio} |");
    }

    if args.plan {
        for path in &files {
            let m = OnnxModel::load(path, ModelOptions::new().with_matmul(args.engines[0]))?;
            println!(
                "\n### optimized plan of {} ({:?} matmuls)\n",
                path.display(),
                args.engines[0]
            );
            for (node, op, info) in m.plan_info() {
                println!("- {node} ({op})");
                for line in info {
                    println!("    {line}");
                }
            }
        }
    }

    if args.profile {
        let runs = files.iter().flat_map(|p| args.engines.iter().map(move |e| (p, e)));
        for ((path, &engine), &threads) in
            runs.flat_map(|r| args.threads.iter().map(move |t| (r, t)))
        {
            let opts = ModelOptions::new().with_matmul(engine).with_threads(threads);
            let mut m = OnnxModel::load(path, opts)?;
            m.input_mut()?
                .iter_mut()
                .enumerate()
                .for_each(|(i, v)| *v = (i % 17) as f32 * 0.1 - 0.8);
            m.profile(args.warmup.max(1))?;
            let p = m.profile(args.iters)?;
            println!(
                "\n### tract per-op profile, {} ({engine:?} matmuls, {threads} thread(s), {:.1} ms/frame)\n",
                path.display(),
                ms(p.total_per_frame)
            );
            println!("| op | nodes | ms/frame | share |");
            println!("|---|---|---|---|");
            let total: f64 = p.by_op.iter().map(|o| ms(o.per_frame)).sum();
            for o in &p.by_op {
                let t = ms(o.per_frame);
                println!("| {} | {} | {:.2} | {:.1} % |", o.op, o.nodes, t, 100.0 * t / total);
            }
            println!("\nby node role, summed over blocks:\n");
            println!("| node role (op) | ms/frame |");
            println!("|---|---|");
            for (role, t) in p.by_role().iter().take(16) {
                println!("| {role} | {:.2} |", ms(*t));
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
