//! Benchmarks and one-shot inference on files: the library side of `flsl bench` and
//! `flsl infer`.
//!
//! [`bench()`] times tract on a model at several thread counts; [`ort_bench`] times the same
//! file in onnxruntime through `python3` (the `scripts/ort_bench.py` script, embedded in
//! this crate), so both can be reported side by side from one process on one machine.
//! [`infer_npy`] runs one `.npy` input through a model and writes its outputs as `.npy`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::error::ModelError;
use crate::export::LOGITS_NAME;
use crate::npy::{read_npy, write_npy};
use crate::onnx::{ModelOptions, OnnxModel};
use crate::preprocess::Rgb8Frame;

/// Latency statistics of one thread count.
#[derive(Debug, Clone, PartialEq)]
pub struct ThreadTiming {
    /// Executor threads.
    pub threads: usize,
    /// Timed iterations.
    pub iters: usize,
    /// Median model-run latency, milliseconds.
    pub median_ms: f64,
    /// 90th-percentile model-run latency, milliseconds.
    pub p90_ms: f64,
    /// Fastest run, milliseconds.
    pub min_ms: f64,
    /// Frames per second at the median latency (`1000 / median_ms`).
    pub fps: f64,
    /// Median preprocessing time of an RGB8 frame of the model's input size, milliseconds
    /// (not included in the latencies above, which cover the model run only, like
    /// onnxruntime's `session.run`).
    pub preprocess_ms: f64,
}

/// The result of [`bench()`].
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// The model file.
    pub model: PathBuf,
    /// Its fixed input shape.
    pub input_shape: [usize; 4],
    /// One entry per requested thread count, in order.
    pub timings: Vec<ThreadTiming>,
    /// Peak resident set size of this process (`VmHWM` of `/proc/self/status`), in bytes;
    /// `None` where that file does not exist.
    pub peak_rss_bytes: Option<u64>,
    /// What our load-time rewrites matched in the model (our fused ops, and the compute
    /// nodes left on tract's generic path).
    pub fusion: Option<crate::ops::FusionReport>,
}

/// onnxruntime timings of one thread count, parsed from `scripts/ort_bench.py`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct OrtTiming {
    /// `intra_op_num_threads`.
    pub threads: usize,
    /// Timed iterations.
    pub iters: usize,
    /// Median latency, milliseconds.
    pub median_ms: f64,
    /// 90th-percentile latency, milliseconds.
    pub p90_ms: f64,
    /// Fastest run, milliseconds.
    pub min_ms: f64,
    /// Frames per second at the median.
    pub fps: f64,
}

/// The result of [`ort_bench`].
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct OrtReport {
    /// onnxruntime's version.
    pub onnxruntime_version: String,
    /// One entry per thread count.
    pub timings: Vec<OrtTiming>,
}

/// The onnxruntime timing script, also at `scripts/ort_bench.py`.
pub const ORT_BENCH_PY: &str = include_str!("../../scripts/ort_bench.py");

/// Times `model` in tract at each of `threads`: `warmup` untimed runs, then `iters`
/// timed runs on a fixed synthetic input.
/// Each thread count gets its own freshly loaded model (own plan, state and pool).
pub fn bench(
    model: &Path,
    threads: &[usize],
    iters: usize,
    warmup: usize,
) -> Result<BenchReport, ModelError> {
    bench_with(model, ModelOptions::new(), threads, iters, warmup)
}

/// [`bench`] with the given load options (their thread count is replaced by each of
/// `threads`), for example to compare [`MatMulEngine`](crate::onnx::MatMulEngine)s.
pub fn bench_with(
    model: &Path,
    options: ModelOptions,
    threads: &[usize],
    iters: usize,
    warmup: usize,
) -> Result<BenchReport, ModelError> {
    let iters = iters.max(1);
    let mut timings = Vec::with_capacity(threads.len());
    let mut input_shape = [0; 4];
    let mut fusion = None;
    for &t in threads {
        let _span = tracing::info_span!("bench", threads = t).entered();
        let mut m = OnnxModel::load(model, options.with_threads(t))?;
        input_shape = m.input_shape();
        fusion = m.fusion().cloned();
        let [_, _, h, w] = input_shape;
        // A fixed, non-constant frame of the model's size.
        let frame: Vec<u8> = (0..h * w * 3).map(synthetic_byte).collect();
        let frame = Rgb8Frame::new(&frame, w, h)?;
        let norm = m.options().normalization;
        let mut pre = Vec::with_capacity(iters);
        let mut run = Vec::with_capacity(iters);
        for i in 0..warmup + iters {
            let t0 = Instant::now();
            let input = m.input_mut()?;
            crate::preprocess::preprocess_rgb8(&frame, &norm, input, h, w)?;
            let t1 = Instant::now();
            m.run()?;
            let t2 = Instant::now();
            if i >= warmup {
                pre.push(t1 - t0);
                run.push(t2 - t1);
            }
        }
        let median_ms = ms(percentile(&mut run, 0.5));
        timings.push(ThreadTiming {
            threads: t,
            iters,
            median_ms,
            p90_ms: ms(percentile(&mut run, 0.9)),
            min_ms: ms(percentile(&mut run, 0.0)),
            fps: 1000.0 / median_ms,
            preprocess_ms: ms(percentile(&mut pre, 0.5)),
        });
        tracing::info!(threads = t, median_ms, "tract timing");
    }
    Ok(BenchReport {
        model: model.into(),
        input_shape,
        timings,
        peak_rss_bytes: peak_rss_bytes(),
        fusion,
    })
}

/// Times `model` in onnxruntime at each of `threads` by running the embedded
/// `scripts/ort_bench.py` with `python3`.
///
/// Returns `Ok(None)` when `python3` is missing or cannot import `onnxruntime` and
/// `numpy`; an error when the script itself fails on the model.
pub fn ort_bench(
    model: &Path,
    threads: &[usize],
    iters: usize,
    warmup: usize,
) -> Result<Option<OrtReport>, ModelError> {
    let probe = Command::new("python3")
        .args(["-c", "import onnxruntime, numpy"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match probe {
        Ok(s) if s.success() => {}
        _ => return Ok(None),
    }
    let threads_arg = threads.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(",");
    let helper = |action: String| move |source| ModelError::Helper { action, source };
    let mut child = Command::new("python3")
        .arg("-")
        .arg(model)
        .args([
            "--threads",
            &threads_arg,
            "--iters",
            &iters.to_string(),
            "--warmup",
            &warmup.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(helper("starting python3 for the onnxruntime benchmark".into()))?;
    child
        .stdin
        .take()
        .expect("stdin was piped")
        .write_all(ORT_BENCH_PY.as_bytes())
        .map_err(helper("sending ort_bench.py to python3".into()))?;
    let out =
        child.wait_with_output().map_err(helper("waiting for the onnxruntime benchmark".into()))?;
    if !out.status.success() {
        return Err(ModelError::Helper {
            action: format!("onnxruntime benchmark of {}", model.display()),
            source: std::io::Error::other(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        });
    }
    let report = serde_json::from_slice(&out.stdout).map_err(|e| ModelError::Helper {
        action: format!("parsing the onnxruntime benchmark output of {}", model.display()),
        source: std::io::Error::other(e),
    })?;
    Ok(Some(report))
}

/// Runs `in_npy` (f32 `[1, 3, H, W]`, already normalized) through `model` and writes the
/// features to `out_npy` (shape as the model outputs it, for example `[1, N, D]`).
/// A prototype-logits output, if the model has one, goes next to it as
/// `<out stem>.prototype_logits.npy` (the naming of `scripts/onnx_parity.py`). Returns the
/// files written.
pub fn infer_npy(
    model: &Path,
    in_npy: &Path,
    out_npy: &Path,
    threads: usize,
) -> Result<Vec<PathBuf>, ModelError> {
    let input = read_npy(in_npy)?;
    let (h, w) = match input.shape.as_slice() {
        [1, 3, h, w] => (*h, *w),
        other => {
            return Err(ModelError::Mismatch {
                what: "input .npy shape",
                expected: "[1, 3, H, W]".into(),
                got: format!("{other:?}"),
            });
        }
    };
    let mut m =
        OnnxModel::load(model, ModelOptions::new().with_threads(threads).with_input_size(h, w))?;
    let out = m.run_tensor(&input.data)?;
    let mut written = Vec::new();
    write_npy(
        out_npy,
        &[1, out.features.tokens(), out.features.channels()],
        out.features.as_slice(),
    )?;
    written.push(out_npy.to_path_buf());
    if let Some(logits) = out.logits {
        let path = out_npy.with_extension(format!("{LOGITS_NAME}.npy"));
        write_npy(&path, &[1, logits.tokens(), logits.channels()], logits.as_slice())?;
        written.push(path);
    }
    Ok(written)
}

/// `VmHWM` of `/proc/self/status` in bytes (Linux); `None` elsewhere.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Byte `i` of the fixed, non-constant synthetic input every timing here uses.
pub(crate) fn synthetic_byte(i: usize) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank percentile (`q` in `[0, 1]`) of a non-empty sample; sorts it in place.
pub(crate) fn percentile(samples: &mut [Duration], q: f64) -> Duration {
    samples.sort_unstable();
    let ix = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[ix.min(samples.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut s: Vec<Duration> =
            [5, 1, 4, 2, 3].iter().map(|&v| Duration::from_millis(v)).collect();
        assert_eq!(percentile(&mut s, 0.5), Duration::from_millis(3));
        assert_eq!(percentile(&mut s, 0.0), Duration::from_millis(1));
        assert_eq!(percentile(&mut s, 0.9), Duration::from_millis(5));
    }

    #[test]
    fn peak_rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().is_some_and(|b| b > 0));
        }
    }
}
