use std::process::ExitCode;

use anyhow::Context;

use crate::args::BenchArgs;

pub fn run(a: BenchArgs) -> anyhow::Result<ExitCode> {
    let report = flsl_runtime::bench::bench(&a.model, &a.threads, a.iters, a.warmup)
        .with_context(|| format!("benchmarking {}", a.model.display()))?;
    let ort = if a.vs_onnxruntime {
        let r = flsl_runtime::bench::ort_bench(&a.model, &a.threads, a.iters, a.warmup)?;
        if r.is_none() {
            eprintln!(
                "note: python3 cannot import onnxruntime and numpy (pip install onnxruntime numpy): tract only"
            );
        }
        r
    } else {
        None
    };
    let [_, c, h, w] = report.input_shape;
    let kernels = flsl_runtime::ops::isa::kernels_line();
    println!(
        "{} input [1,{c},{h},{w}], {} timed runs after {} warm-up",
        a.model.display(),
        a.iters,
        a.warmup
    );
    println!("{kernels}");
    println!(
        "{:<12} {:>7} {:>10} {:>10} {:>9} {:>12}",
        "engine", "threads", "median ms", "p90 ms", "frames/s", "vs tract"
    );
    for t in &report.timings {
        println!(
            "{:<12} {:>7} {:>10.2} {:>10.2} {:>9.1} {:>12}",
            "tract", t.threads, t.median_ms, t.p90_ms, t.fps, ""
        );
    }
    if let Some(o) = &ort {
        for t in &o.timings {
            let tract = report.timings.iter().find(|x| x.threads == t.threads);
            let ratio = tract
                .map(|x| format!("tract {:.2}x", x.median_ms / t.median_ms))
                .unwrap_or_default();
            println!(
                "{:<12} {:>7} {:>10.2} {:>10.2} {:>9.1} {:>12}",
                "onnxruntime", t.threads, t.median_ms, t.p90_ms, t.fps, ratio
            );
        }
        println!(
            "(onnxruntime {}; 'tract N.NNx' = tract's median / onnxruntime's: above 1 means tract is slower)",
            o.onnxruntime_version
        );
    }
    if let Some(f) = &report.fusion {
        println!("fused paths: {f}");
    }
    if let Some(rss) = report.peak_rss_bytes {
        println!("peak memory (VmHWM of this process): {:.1} MB", rss as f64 / 1e6);
    }
    if let Some(path) = a.json {
        let v = serde_json::json!({
            "model": a.model,
            "input_shape": report.input_shape,
            "tract": report.timings.iter().map(|t| serde_json::json!({"threads": t.threads, "iters": t.iters, "median_ms": t.median_ms, "p90_ms": t.p90_ms, "min_ms": t.min_ms, "fps": t.fps, "preprocess_ms": t.preprocess_ms})).collect::<Vec<_>>(),
            "onnxruntime": ort.as_ref().map(|o| serde_json::json!({"version": o.onnxruntime_version, "timings": o.timings.iter().map(|t| serde_json::json!({"threads": t.threads, "median_ms": t.median_ms, "p90_ms": t.p90_ms, "fps": t.fps})).collect::<Vec<_>>()})),
            "peak_rss_bytes": report.peak_rss_bytes,
            "fusion": report.fusion,
            "kernels": kernels,
        });
        flsl_train::tensors::write_atomic(&path, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    Ok(ExitCode::SUCCESS)
}
