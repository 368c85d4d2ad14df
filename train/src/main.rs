//! The `flsl` command-line tool: clap parsing, logging, and calls into the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use flsl_train::backend::DeviceChoice;
use flsl_train::config::TrainConfig;
use flsl_train::demo::{DemoOptions, run_demo};
use flsl_train::trainer::{Run, TrainOptions, checkpoints_dir};

#[derive(Parser)]
#[command(name = "flsl", version, about = "FLSL: feature-level self-supervised ViTs, from training to drones")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pretrains a small FLSL ViT on the embedded aerial images (a few minutes on a CPU) and
    /// writes cluster maps of held-out images, the loss plot and a report.
    Demo {
        /// Output folder.
        #[arg(long, default_value = "out/demo")]
        out: PathBuf,
        /// Image folder (default: the repository's data/neon-aerial-trees/images).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Training steps.
        #[arg(long, default_value_t = 240)]
        steps: usize,
    },
    /// FLSL pretraining on a folder of images.
    Train {
        /// TOML configuration (defaults: the paper's ViT-S/16 recipe).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Start from a preset: `vit_small16` (paper), `vit_tiny16`, `tiny` (CPU).
        #[arg(long)]
        preset: Option<String>,
        /// Overrides `key=value` (TOML values; `augment.global_resize=128`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Image folder (overrides `data_path`).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Output folder (overrides `output_dir`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// `cpu`, `cuda`, `cuda:N`, or several for data-parallel training: `cuda:0,cuda:1` (overrides `device`).
        #[arg(long)]
        device: Option<String>,
        /// Stop after this many steps.
        #[arg(long)]
        max_steps: Option<usize>,
        /// Ignore an existing checkpoint in the output folder and start over.
        #[arg(long)]
        fresh: bool,
    },
    /// Runs the same training steps on the CPU and on a CUDA device (same weights, same batch)
    /// and compares the losses; prints each backend's images/s.
    GpuCheck {
        /// Preset of the model (`tiny`, `vit_tiny16`, `vit_small16`).
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Steps per backend.
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// Images per step.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        cuda: usize,
        /// Largest accepted relative difference of the first step's loss.
        #[arg(long, default_value_t = 1e-3)]
        tolerance: f64,
    },
    /// Exports a checkpoint's backbone (+ FLSL head) as an opset-17 ONNX file for tract,
    /// onnxruntime or TensorRT.
    Export {
        /// A checkpoint folder of ours (or a run's output folder), or a weights file
        /// (`.safetensors`, or the official code's `.pth`).
        #[arg(long)]
        checkpoint: PathBuf,
        /// Output ONNX file (written atomically).
        #[arg(long)]
        out: PathBuf,
        /// Input size `H` or `HxW` in pixels (multiples of the patch size).
        #[arg(long, default_value = "224")]
        size: String,
        /// Also export the FLSL head as the `prototype_logits` output.
        #[arg(long)]
        with_head: bool,
        /// Export the student instead of the EMA teacher.
        #[arg(long)]
        student: bool,
        /// Attention heads (only for a weights file without `config.json`; default `D/64`).
        #[arg(long)]
        heads: Option<usize>,
        /// Append the detection head of this `flsl train-detector` folder (`det_heatmap`,
        /// `det_boxes` outputs).
        #[arg(long)]
        detector: Option<PathBuf>,
    },
    /// Trains the CenterNet-style detection head on a frozen backbone from COCO JSON, VOC XML
    /// or VisDrone-DET boxes (default: the embedded NEON tree crowns, OSBS_029 held out) and
    /// reports COCO AP on the held-out images.
    TrainDetector {
        /// Backbone checkpoint (run folder, checkpoint folder or weights file).
        #[arg(long, default_value = "out/demo")]
        checkpoint: PathBuf,
        /// Annotation files or folders (repeat); default: the embedded NEON COCO files.
        #[arg(long = "annotations")]
        annotations: Vec<PathBuf>,
        /// Folder of the images named by VOC/VisDrone files.
        #[arg(long)]
        images: Option<PathBuf>,
        /// Held-out image file names (repeat); default OSBS_029.png.
        #[arg(long = "holdout")]
        holdout: Vec<String>,
        /// Keep the annotation classes instead of merging them into one.
        #[arg(long)]
        multi_class: bool,
        /// Output folder.
        #[arg(long, default_value = "out/detector")]
        out: PathBuf,
        /// Training steps.
        #[arg(long, default_value_t = 400)]
        steps: usize,
        /// Image scale before tiling (the demo backbone saw ~0.4x crops).
        #[arg(long, default_value_t = 0.5)]
        scale: f32,
        /// Tile side in pixels.
        #[arg(long, default_value_t = 128)]
        tile: usize,
        /// Also export backbone + FLSL head + detection head as ONNX at this size (`H` or `HxW`).
        #[arg(long, default_value = "224")]
        export_size: String,
    },
    /// Runs the ONNX model + the onboard post-process on a folder of frames or a video:
    /// JSON lines per frame, optional overlay PNGs, frames/s per stage.
    Detect {
        /// The ONNX model (`flsl export`, optionally with `--with-head` / `--detector`).
        #[arg(long)]
        model: PathBuf,
        /// A folder of .png/.jpg frames, or a video file (needs ffmpeg).
        #[arg(long)]
        input: PathBuf,
        /// JSON lines output (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write overlay PNGs (cluster map + boxes) into this folder.
        #[arg(long)]
        overlays: Option<PathBuf>,
        /// tract threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Least detection score.
        #[arg(long, default_value_t = 0.3)]
        score: f32,
        /// Refine the features by mean shift before clustering (3 iterations; ~8 ms per frame
        /// at 14x14 x 192 on one core, see docs/PERFORMANCE.md).
        #[arg(long)]
        meanshift: bool,
        /// Stop after this many frames.
        #[arg(long)]
        max_frames: Option<usize>,
    },
    /// Post-training int8 quantization with calibration images, and an accuracy + speed
    /// report (JSON + Markdown beside the output).
    Quantize {
        /// The fp32 ONNX model.
        model: PathBuf,
        /// Calibration images folder.
        #[arg(long)]
        calib: PathBuf,
        /// Output int8 ONNX (written only when everything succeeded).
        #[arg(long)]
        out: PathBuf,
        /// `qdq` (explicit QuantizeLinear/DequantizeLinear: our engine runs its linear layers as
        /// fused int8 matmuls, and TensorRT and onnxruntime read it) or `tract` (QLinearMatMul).
        #[arg(long, default_value = "qdq")]
        format: String,
        /// `minmax`, `percentile[=P]` (default 99.99) or `mse`.
        #[arg(long, default_value = "percentile")]
        calibration: String,
        /// Calibration images to use.
        #[arg(long, default_value_t = 64)]
        calib_images: usize,
        /// Held-out images for the accuracy report (not the calibration ones).
        #[arg(long)]
        heldout: Option<PathBuf>,
        /// Op types or node-name prefixes kept in float (comma-separated).
        #[arg(long, value_delimiter = ',')]
        float_ops: Vec<String>,
        /// Keep the patch-embedding Conv in float (quantized by default: it runs on the
        /// integer kernel, and its input is the 8-bit image).
        #[arg(long)]
        float_conv: bool,
        /// Quantize the FLSL head's output layers too (kept in float by default: int8 rounding
        /// flips prototype argmaxes there).
        #[arg(long)]
        quantize_head_output: bool,
        /// Thread counts for the latency report (empty: no latency report).
        #[arg(long, default_value = "1,2", value_delimiter = ',')]
        threads: Vec<usize>,
        /// COCO instances file of a labelled detection set: the report compares detection AP
        /// of fp32 and int8 on it (models with a detection head).
        #[arg(long, requires = "det_images")]
        det_gt: Option<PathBuf>,
        /// Folder of the images that `--det-gt` names.
        #[arg(long, requires = "det_gt")]
        det_images: Option<PathBuf>,
        /// Least detection score for the AP comparison.
        #[arg(long, default_value_t = 0.05)]
        det_score: f32,
    },
    /// COCO bbox evaluation (numerically the same as pycocotools).
    EvalDetections {
        /// COCO ground-truth file.
        #[arg(long)]
        gt: PathBuf,
        /// COCO results list.
        #[arg(long)]
        dt: PathBuf,
        /// Print one JSON object instead of the 12 summary lines.
        #[arg(long)]
        json: bool,
    },
    /// mIoU of unsupervised cluster maps against ground-truth masks (Hungarian matching over
    /// the dataset), for an ONNX backbone and a randomly initialised one of the same size.
    EvalClusters {
        /// The ONNX model to evaluate.
        #[arg(long)]
        model: PathBuf,
        /// Also evaluate this model (for example a random-init export) side by side.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// DAVIS-style root with JPEGImages/480p/<seq> and Annotations/480p/<seq>.
        #[arg(long, default_value = "../shared/data/davis2016-subset")]
        davis: PathBuf,
        /// Clusters per image (k-means on the patch features).
        #[arg(long, default_value_t = 2)]
        k: usize,
        /// Frames per sequence (evenly spaced).
        #[arg(long, default_value_t = 10)]
        frames: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Latency of an ONNX model in tract (median, p90, frames/s, peak memory) at each thread
    /// count; with `--vs-onnxruntime`, the same file in onnxruntime in the same run.
    Bench {
        /// The ONNX file.
        #[arg(long)]
        model: PathBuf,
        /// Thread counts, comma-separated.
        #[arg(long, default_value = "1,2", value_delimiter = ',')]
        threads: Vec<usize>,
        /// Timed runs per thread count.
        #[arg(long, default_value_t = 30)]
        iters: usize,
        /// Untimed warm-up runs.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Also time the file in Python onnxruntime (when importable) and print the ratio.
        #[arg(long)]
        vs_onnxruntime: bool,
        /// Write the report as JSON here too.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Runs one f32 `.npy` tensor (the model's input shape) through tract and writes the first
    /// output as `.npy` (further outputs as `OUT.<name>.npy`).
    Infer {
        /// The ONNX file.
        #[arg(long)]
        model: PathBuf,
        /// Input tensor.
        #[arg(long)]
        npy: PathBuf,
        /// Output `.npy`.
        #[arg(long)]
        out: PathBuf,
        /// Threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Checks our implementation against the golden tensors of the official PyTorch code.
    ReferenceCheck {
        /// Folder with `index.json` (e.g. `../shared/reference` or its `micro/`).
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Trains on `devices` (the first is rank 0; more than one: data-parallel replicas).
fn train_on<B: burn::tensor::backend::AutodiffBackend>(cfg: TrainConfig, devices: Vec<B::Device>, fresh: bool, max_steps: Option<usize>) -> anyhow::Result<()> {
    let mut devices = devices.into_iter();
    let device = devices.next().context("no device")?;
    let replicas: Vec<B::Device> = devices.collect();
    let latest = checkpoints_dir(&cfg.output_dir).join("latest");
    let run = if latest.exists() && !fresh {
        tracing::info!("resuming from {}", latest.display());
        let run = Run::<B>::load(&latest, device).with_context(|| format!("resuming from {}", latest.display()))?;
        if run.cfg != cfg {
            tracing::warn!("the configuration differs from the checkpoint's; continuing with the checkpoint's");
        }
        run
    } else {
        Run::<B>::new(cfg, device)?
    };
    let run = flsl_train::trainer::train_on_devices(run, replicas, &TrainOptions { max_steps, progress: true })?;
    println!("trained {} steps; checkpoints in {}", run.state.step, checkpoints_dir(&run.cfg.output_dir).display());
    Ok(())
}

/// `224` or `224x320` (height x width).
fn parse_size(s: &str) -> anyhow::Result<(usize, usize)> {
    let parse = |t: &str| t.trim().parse::<usize>().with_context(|| format!("--size `{s}`: `{t}` is not a number of pixels"));
    match s.split_once(['x', 'X']) {
        Some((h, w)) => Ok((parse(h)?, parse(w)?)),
        None => {
            let n = parse(s)?;
            Ok((n, n))
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::ReferenceCheck { dir } => {
            let results = flsl_train::reference::run_index(&dir)?;
            for r in &results {
                println!("{r}");
            }
            let (passed, failed) = flsl_train::reference::summarize(&results);
            println!("{passed} passed, {failed} failed");
            Ok(if failed == 0 && passed > 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Train { config, preset, set, data, out, device, max_steps, fresh } => {
            let mut cfg = match &preset {
                Some(p) => TrainConfig::preset(p)?,
                None => TrainConfig::default(),
            };
            if let Some(path) = &config {
                cfg = TrainConfig::from_toml_file(path, Some(cfg))?;
            }
            let mut set = set;
            if let Some(d) = data {
                set.push(format!("data_path={:?}", d.display().to_string()));
            }
            if let Some(o) = out {
                set.push(format!("output_dir={:?}", o.display().to_string()));
            }
            if let Some(d) = device {
                set.push(format!("device={d:?}"));
            }
            let cfg = cfg.with_overrides(&set)?;
            let devices = flsl_train::backend::parse_devices(&cfg.device).map_err(anyhow::Error::msg)?;
            let first = devices.first().copied().unwrap_or(DeviceChoice::Cpu);
            match first.check_available().map_err(anyhow::Error::msg)? {
                DeviceChoice::Cpu => {
                    #[cfg(feature = "ndarray")]
                    train_on::<flsl_train::backend::CpuTrain>(cfg, devices.iter().map(|_| flsl_train::backend::cpu_device()).collect(), fresh, max_steps)?;
                }
                DeviceChoice::Cuda(_) => {
                    #[cfg(feature = "cuda")]
                    train_on::<flsl_train::backend::GpuTrain>(
                        cfg,
                        devices.iter().map(|d| flsl_train::backend::cuda_device(match d { DeviceChoice::Cuda(n) => *n, DeviceChoice::Cpu => 0 })).collect(),
                        fresh,
                        max_steps,
                    )?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::GpuCheck { preset, steps, batch, cuda, tolerance } => {
            let cfg = TrainConfig::preset(&preset)?;
            let cpu = flsl_train::gpu_check::run_steps::<flsl_train::backend::CpuTrain>(&cfg, &flsl_train::backend::cpu_device(), steps, batch)?;
            println!("cpu : {:.2} images/s", cpu.images_per_s);
            #[cfg(feature = "cuda")]
            {
                let gpu = flsl_train::gpu_check::run_steps::<flsl_train::backend::GpuTrain>(&cfg, &flsl_train::backend::cuda_device(cuda), steps, batch)?;
                println!("cuda: {:.2} images/s ({:.1}x the CPU)", gpu.images_per_s, gpu.images_per_s / cpu.images_per_s);
                let mut worst_first = 0.0;
                for (i, (c, g)) in cpu.losses.iter().zip(&gpu.losses).enumerate() {
                    let rel = (c.total - g.total).abs() / c.total.abs().max(1e-12);
                    if i == 0 {
                        worst_first = rel;
                    }
                    println!("step {i}: cpu {c}  |  cuda {g}  |  rel diff {rel:.2e}");
                }
                if worst_first > tolerance {
                    println!("FAIL: first-step loss differs by {worst_first:.2e} > {tolerance:.0e}");
                    return Ok(ExitCode::FAILURE);
                }
                println!("PASS: first-step loss within {tolerance:.0e}");
                return Ok(ExitCode::SUCCESS);
            }
            #[cfg(not(feature = "cuda"))]
            {
                let _ = (cuda, tolerance);
                for (i, c) in cpu.losses.iter().enumerate() {
                    println!("step {i}: cpu {c}");
                }
                anyhow::bail!("this build has no CUDA backend: rebuild with `--features cuda` to compare");
            }
        }
        Command::Export { checkpoint, out, size, with_head, student, heads, detector } => {
            let size = parse_size(&size)?;
            let part = if student { flsl_train::checkpoint::Part::Student } else { flsl_train::checkpoint::Part::Teacher };
            let opts = flsl_train::export::ExportOptions { size, with_head, part, heads, detector };
            let src = flsl_train::export::export_checkpoint(&checkpoint, &out, &opts)?;
            let s = src.spec;
            let (gh, gw) = s.grid();
            println!(
                "wrote {} ({} bytes): ViT D={} depth={} heads={} patch={} MLP {}, input image[1,3,{},{}] -> features[1,{},{}]{}",
                out.display(),
                std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0),
                s.embed_dim, s.depth, s.num_heads, s.patch_size, s.mlp_hidden, s.img_h, s.img_w, gh * gw, s.embed_dim,
                if with_head { ", prototype_logits" } else { "" }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench { model, threads, iters, warmup, vs_onnxruntime, json } => {
            let report = flsl_runtime::bench::bench(&model, &threads, iters, warmup).with_context(|| format!("benchmarking {}", model.display()))?;
            let ort = if vs_onnxruntime {
                let r = flsl_runtime::bench::ort_bench(&model, &threads, iters, warmup)?;
                if r.is_none() {
                    eprintln!("note: python3 cannot import onnxruntime and numpy (pip install onnxruntime numpy): tract only");
                }
                r
            } else {
                None
            };
            let [_, c, h, w] = report.input_shape;
            println!("{} input [1,{c},{h},{w}], {iters} timed runs after {warmup} warm-up", model.display());
            println!("{:<12} {:>7} {:>10} {:>10} {:>9} {:>12}", "engine", "threads", "median ms", "p90 ms", "frames/s", "vs tract");
            for t in &report.timings {
                println!("{:<12} {:>7} {:>10.2} {:>10.2} {:>9.1} {:>12}", "tract", t.threads, t.median_ms, t.p90_ms, t.fps, "");
            }
            if let Some(o) = &ort {
                for t in &o.timings {
                    let tract = report.timings.iter().find(|x| x.threads == t.threads);
                    let ratio = tract.map(|x| format!("tract {:.2}x", x.median_ms / t.median_ms)).unwrap_or_default();
                    println!("{:<12} {:>7} {:>10.2} {:>10.2} {:>9.1} {:>12}", "onnxruntime", t.threads, t.median_ms, t.p90_ms, t.fps, ratio);
                }
                println!("(onnxruntime {}; 'tract N.NNx' = tract's median / onnxruntime's: above 1 means tract is slower)", o.onnxruntime_version);
            }
            if let Some(rss) = report.peak_rss_bytes {
                println!("peak memory (VmHWM of this process): {:.1} MB", rss as f64 / 1e6);
            }
            if let Some(path) = json {
                let v = serde_json::json!({
                    "model": model,
                    "input_shape": report.input_shape,
                    "tract": report.timings.iter().map(|t| serde_json::json!({"threads": t.threads, "iters": t.iters, "median_ms": t.median_ms, "p90_ms": t.p90_ms, "min_ms": t.min_ms, "fps": t.fps, "preprocess_ms": t.preprocess_ms})).collect::<Vec<_>>(),
                    "onnxruntime": ort.as_ref().map(|o| serde_json::json!({"version": o.onnxruntime_version, "timings": o.timings.iter().map(|t| serde_json::json!({"threads": t.threads, "median_ms": t.median_ms, "p90_ms": t.p90_ms, "fps": t.fps})).collect::<Vec<_>>()})),
                    "peak_rss_bytes": report.peak_rss_bytes,
                });
                flsl_train::tensors::write_atomic(&path, serde_json::to_string_pretty(&v)?.as_bytes())?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::TrainDetector { checkpoint, annotations, images, holdout, multi_class, out, steps, scale, tile, export_size } => {
            let mut opts = flsl_train::detector::DetectorOptions::neon(checkpoint.clone(), out.clone());
            if !annotations.is_empty() {
                opts.annotations = annotations;
                opts.holdout = Vec::new();
            }
            if !holdout.is_empty() {
                opts.holdout = holdout;
            }
            if multi_class {
                opts.single_class = None;
            }
            opts.images = images;
            opts.steps = steps;
            opts.scale = scale;
            opts.tile = tile;
            #[cfg(feature = "ndarray")]
            {
                let r = flsl_train::detector::train_detector::<flsl_train::backend::CpuTrain>(&opts, flsl_train::backend::cpu_device())?;
                println!(
                    "trained the detection head ({} classes, hidden {}) on {} tiles: loss {:.3} -> {:.3} (heat {:.3}, offset {:.3}, size {:.3}); features {:.0} s, training {:.0} s",
                    r.meta.head.classes, r.meta.head.hidden, r.tiles, r.loss_start.total, r.loss_end.total, r.loss_end.heat, r.loss_end.offset, r.loss_end.size, r.seconds.0, r.seconds.1
                );
                if let (Some(stats), Some((gt, dt))) = (&r.holdout_stats, &r.holdout_files) {
                    println!("held-out COCO stats (flsl eval-detections --gt {} --dt {}):\n{}", gt.display(), dt.display(), serde_json::to_string(stats)?);
                }
                let size = parse_size(&export_size)?;
                let onnx = out.join("model.onnx");
                let eopts = flsl_train::export::ExportOptions { size, with_head: true, detector: Some(out.clone()), ..Default::default() };
                flsl_train::export::export_checkpoint(&checkpoint, &onnx, &eopts)?;
                println!("wrote {} and {} (features, prototype_logits, det_heatmap, det_boxes)", out.join("det_head.safetensors").display(), onnx.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Detect { model, input, out, overlays, threads, score, meanshift, max_frames } => {
            let mut opts = flsl_runtime::detect::DetectOptions::new(model);
            opts.threads = threads;
            opts.score_threshold = score;
            opts.meanshift = meanshift;
            opts.overlays = overlays;
            opts.max_frames = max_frames;
            let mut sink: Box<dyn std::io::Write> = match &out {
                Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?)),
                None => Box::new(std::io::stdout().lock()),
            };
            let bar = indicatif::ProgressBar::new_spinner();
            if out.is_some() {
                bar.set_style(indicatif::ProgressStyle::with_template("{elapsed_precise} {pos} frames  {per_sec}").unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()));
            } else {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            let summary = flsl_runtime::detect::run_detect(&opts, &input, &mut sink, |n| bar.set_position(n as u64))
                .with_context(|| format!("detecting on {}", input.display()))?;
            sink.flush()?;
            bar.finish_and_clear();
            eprintln!("{}", summary.render());
            Ok(ExitCode::SUCCESS)
        }
        Command::Quantize { model, calib, out, format, calibration, calib_images, heldout, float_ops, float_conv, quantize_head_output, threads, det_gt, det_images, det_score } => {
            use flsl_runtime::quantize::{BenchOptions, Calibration, DetectionSet, QuantFormat, QuantizeOptions, quantize_file, report_markdown};
            let format = match format.as_str() {
                "tract" => QuantFormat::Tract,
                "qdq" => QuantFormat::Qdq,
                other => anyhow::bail!("--format `{other}`: expected `tract` or `qdq`"),
            };
            let calibration = match calibration.split_once('=') {
                None if calibration == "minmax" => Calibration::MinMax,
                None if calibration == "mse" => Calibration::Mse,
                None if calibration == "percentile" => Calibration::Percentile(99.99),
                Some(("percentile", p)) => Calibration::Percentile(p.parse().with_context(|| format!("--calibration percentile=`{p}` is not a number"))?),
                _ => anyhow::bail!("--calibration `{calibration}`: expected minmax, percentile[=P] or mse"),
            };
            let opts = QuantizeOptions {
                format,
                calibration,
                calib_images,
                heldout_dir: heldout,
                float_ops,
                quantize_conv: !float_conv,
                quantize_head_output,
                bench: (!threads.is_empty()).then(|| BenchOptions { threads, ..BenchOptions::default() }),
                detection: det_gt.zip(det_images).map(|(gt, images)| DetectionSet { gt, images, score_threshold: det_score }),
                ..QuantizeOptions::default()
            };
            let bar = indicatif::ProgressBar::new(0);
            if let Ok(style) = indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}") {
                bar.set_style(style.progress_chars("=> "));
            }
            let report = quantize_file(&model, &calib, &out, &opts, &mut |p| {
                bar.set_message(format!("{:?}", p.stage));
                bar.set_length(p.total as u64);
                bar.set_position(p.done as u64);
            })
            .with_context(|| format!("quantizing {}", model.display()))?;
            bar.finish_and_clear();
            println!("{}", report_markdown(&report));
            Ok(ExitCode::SUCCESS)
        }
        Command::EvalDetections { gt, dt, json } => {
            let stats = flsl_runtime::eval::evaluate_files(&gt, &dt).with_context(|| format!("evaluating {} against {}", dt.display(), gt.display()))?;
            if json {
                println!("{}", stats.to_json());
            } else {
                println!("{stats}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::EvalClusters { model, baseline, davis, k, frames, json } => {
            let mut rows = Vec::new();
            for m in std::iter::once(&model).chain(baseline.as_ref()) {
                let r = flsl_train::clusters_eval::eval_davis(m, &davis, k, frames)?;
                rows.push((m.clone(), r));
            }
            if json {
                let v: Vec<_> = rows.iter().map(|(m, r)| serde_json::json!({"model": m, "result": r})).collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<48} {:>8} {:>10} {:>12} {:>8}", "model", "mIoU", "pixel acc", "per-image mIoU", "images");
                for (m, r) in &rows {
                    println!("{:<48} {:>8.4} {:>10.4} {:>12.4} {:>8}", m.display(), r.miou, r.pixel_accuracy, r.per_image_miou, r.images);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Infer { model, npy, out, threads } => {
            let written = flsl_runtime::bench::infer_npy(&model, &npy, &out, threads)
                .with_context(|| format!("running {} on {}", model.display(), npy.display()))?;
            for p in written {
                println!("wrote {}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { out, data, steps } => {
            let opts = DemoOptions { out, steps, data: data.unwrap_or_else(flsl_train::demo::default_data), ..DemoOptions::default() };
            #[cfg(feature = "ndarray")]
            {
                let r = run_demo::<flsl_train::backend::CpuTrain>(&opts, flsl_train::backend::cpu_device())?;
                print!("{}", flsl_train::demo::render_markdown(&r));
                println!("\nwrote {}", opts.out.display());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
