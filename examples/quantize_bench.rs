//! Int8 quantization of ViT-Ti/16 and ViT-S/16 at 224: calibrates, writes the tract-form
//! and QDQ int8 files, and reports accuracy vs fp32 on held-out images plus tract fp32 vs
//! int8 latency (interleaved in one run) and onnxruntime's on the same files; with
//! `--ort-dynamic`, also onnxruntime's own `quantize_dynamic` file in both runtimes; with
//! `--float-conv`, the patch embedding kept in float; with `--profile`, tract's per-op
//! profile of the int8 model.
//!
//! ```text
//! cargo build --release -p flsl-examples --features onnx --example quantize_bench
//! target/release/examples/quantize_bench [--out DIR] [--models tiny,small|none] \
//!     [--onnx MODEL.onnx ...] [--calib DIR] [--heldout DIR] [--calib-images 64] \
//!     [--heldout-images 32] [--formats tract,qdq] [--calibration percentile|minmax|mse] \
//!     [--threads 1,2] [--iters 20] [--warmup 3] [--no-ort] [--ort-dynamic] [--float-conv] [--profile]
//! ```
//!
//! Without `--calib`, calibration uses 64 frames of the DAVIS 2016 `blackswan` and
//! `car-roundabout` sequences under `../shared/data` (or `$FLSL_SHARED_DATA`), and the
//! held-out set is other sequences (`dog`, `car-shadow`) plus the aerial tree images of
//! `data/neon-aerial-trees` and the natural images: never a calibration frame.
//! Random weights (`--models`) do not have trained activation ranges: use `--onnx` with
//! trained exports for accuracy figures.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Parser;
use flsl_runtime::bench::{bench, ort_bench};
use flsl_runtime::export::{VitSpec, export_vit, random_vit_weights};
use flsl_runtime::onnx::{ModelOptions, OnnxModel};
use flsl_runtime::quantize::{
    BenchOptions, Calibration, QuantFormat, QuantizeOptions, quantize_file, report_markdown,
};

/// Int8 quantization of ViT backbones: accuracy and latency against fp32.
#[derive(Parser)]
struct Args {
    /// Folder for the models, calibration copies and reports.
    #[arg(long, default_value_os_t = std::env::temp_dir().join("flsl-quantize-bench"))]
    out: PathBuf,
    /// Random-weight backbones to export (`tiny`, `small`); `none`: only the `--onnx` files.
    #[arg(long, value_delimiter = ',', default_value = "tiny,small")]
    models: Vec<String>,
    /// Further (trained) fp32 ONNX files.
    #[arg(long)]
    onnx: Vec<PathBuf>,
    /// Calibration images (default: DAVIS frames under ../shared/data).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Held-out images (default: the calibration folder with --calib, else other sequences).
    #[arg(long)]
    heldout: Option<PathBuf>,
    /// Calibration frames taken for the default folders.
    #[arg(long, default_value_t = 64)]
    calib_images: usize,
    /// Held-out frames taken for the default folders.
    #[arg(long, default_value_t = 32)]
    heldout_images: usize,
    /// Int8 file formats (`tract`, `qdq`).
    #[arg(long, value_delimiter = ',', default_value = "tract,qdq", value_parser = parse_format)]
    formats: Vec<QuantFormat>,
    /// `minmax`, `mse`, `percentile` or `percentile=P`.
    #[arg(long, default_value = "percentile", value_parser = parse_calibration)]
    calibration: Calibration,
    /// Thread counts.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    threads: Vec<usize>,
    /// Timed runs per measurement.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Skip onnxruntime.
    #[arg(long = "no-ort", action = clap::ArgAction::SetFalse)]
    ort: bool,
    /// Also onnxruntime's own `quantize_dynamic` file, in both runtimes.
    #[arg(long)]
    ort_dynamic: bool,
    /// Keep the patch embedding in float.
    #[arg(long)]
    float_conv: bool,
    /// tract's per-op profile of the int8 model.
    #[arg(long)]
    profile: bool,
}

fn parse_format(f: &str) -> Result<QuantFormat, String> {
    match f {
        "tract" => Ok(QuantFormat::Tract),
        "qdq" => Ok(QuantFormat::Qdq),
        other => Err(format!("unknown format {other} (tract, qdq)")),
    }
}

fn parse_calibration(c: &str) -> Result<Calibration, String> {
    match c {
        "minmax" => Ok(Calibration::MinMax),
        "mse" => Ok(Calibration::Mse),
        "percentile" => Ok(Calibration::Percentile(99.99)),
        other => match other.strip_prefix("percentile=") {
            Some(p) => p.parse().map(Calibration::Percentile).map_err(|e| format!("{other}: {e}")),
            None => Err(format!("unknown calibration {other} (minmax, mse, percentile[=P])")),
        },
    }
}

fn shared_data() -> PathBuf {
    std::env::var_os("FLSL_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data"))
}

fn images_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// A folder of symlinks to `files` (recreated).
fn link_folder(dir: &Path, files: &[PathBuf]) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    for (i, f) in files.iter().enumerate() {
        let ext = f.extension().and_then(|e| e.to_str()).unwrap_or("png");
        let link = dir.join(format!("{i:04}.{ext}"));
        let target = f.canonicalize().with_context(|| format!("resolving {}", f.display()))?;
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(())
}

/// The default calibration and held-out folders (disjoint sequences and sources).
fn default_folders(out: &Path, calib_n: usize, heldout_n: usize) -> Result<(PathBuf, PathBuf)> {
    let data = shared_data();
    let davis = data.join("davis2016-subset/JPEGImages/480p");
    let mut calib = Vec::new();
    for seq in ["blackswan", "car-roundabout"] {
        calib.extend(images_in(&davis.join(seq))?);
    }
    // Spread the calibration frames over both sequences.
    let step = (calib.len() / calib_n.max(1)).max(1);
    let calib: Vec<PathBuf> = calib.into_iter().step_by(step).take(calib_n).collect();
    let mut heldout = Vec::new();
    let aerial = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/neon-aerial-trees/images");
    heldout.extend(images_in(&aerial).unwrap_or_default());
    heldout.extend(images_in(&data.join("natural-images"))?);
    for seq in ["dog", "car-shadow"] {
        let frames = images_in(&davis.join(seq))?;
        heldout.extend(frames.into_iter().step_by(5));
    }
    heldout.truncate(heldout_n);
    let (c, h) = (out.join("calib"), out.join("heldout"));
    link_folder(&c, &calib)?;
    link_folder(&h, &heldout)?;
    eprintln!(
        "calibration: {} DAVIS frames (blackswan, car-roundabout) -> {}; held-out: {} images (aerial, natural, DAVIS dog/car-shadow) -> {}",
        calib.len(),
        c.display(),
        heldout.len(),
        h.display()
    );
    Ok((c, h))
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    args.models.retain(|m| !m.is_empty() && m != "none");
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let (calib, heldout) = match (&args.calib, &args.heldout) {
        (Some(c), h) => (c.clone(), h.clone().unwrap_or_else(|| c.clone())),
        (None, _) => default_folders(&args.out, args.calib_images, args.heldout_images)?,
    };

    let mut models = Vec::new();
    for m in &args.models {
        let Some(spec) = VitSpec::named(m, 224, 224) else {
            bail!("unknown model {m} (tiny, small)")
        };
        let path = args.out.join(format!("vit_{m}16_noclass_224_random.onnx"));
        let weights = random_vit_weights(&spec, 0);
        let bytes = export_vit(&weights, &spec, &weights["pos_embed"].1, None)?;
        std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
        models.push(path);
    }
    models.extend(args.onnx.iter().cloned());

    for fp32 in &models {
        let stem = fp32.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        for &format in &args.formats {
            let out = args.out.join(format!(
                "{stem}.int8-{}.onnx",
                match format {
                    QuantFormat::Tract => "tract",
                    QuantFormat::Qdq => "qdq",
                }
            ));
            let opts = QuantizeOptions {
                format,
                calibration: args.calibration,
                calib_images: args.calib_images,
                heldout_dir: Some(heldout.clone()),
                heldout_images: args.heldout_images,
                bench: Some(BenchOptions {
                    threads: args.threads.clone(),
                    iters: args.iters,
                    warmup: args.warmup,
                    onnxruntime: args.ort,
                }),
                quantize_conv: !args.float_conv,
                ..QuantizeOptions::default()
            };
            let mut last = None;
            let r = quantize_file(fp32, &calib, &out, &opts, &mut |p| {
                if last != Some(p.stage) {
                    eprintln!("  {stem} {format:?}: {:?} ({} items)", p.stage, p.total);
                    last = Some(p.stage);
                }
            })
            .with_context(|| format!("quantizing {}", fp32.display()))?;
            println!("{}", report_markdown(&r));
            println!("tract ops of the int8 plan: {:?}\n", r.tract_ops.ops);
            if args.ort {
                // onnxruntime must accept both forms: load, run, cosine vs fp32.
                run_script("ort_check_int8.py", fp32, &out)
                    .with_context(|| format!("onnxruntime rejected {}", out.display()))?;
            }
        }
        if args.ort_dynamic {
            ort_dynamic(fp32, &args)?;
        }
        if args.profile {
            for suffix in ["", ".int8-tract", ".int8-qdq"] {
                let path = if suffix.is_empty() {
                    fp32.clone()
                } else {
                    args.out.join(format!("{stem}{suffix}.onnx"))
                };
                if path.exists() {
                    profile(&path, args.iters)?;
                }
            }
        }
    }
    Ok(())
}

/// Runs `python3 scripts/<name> <a> <b>`; an error when it cannot start or fails.
fn run_script(name: &str, a: &Path, b: &Path) -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts").join(name);
    let status = std::process::Command::new("python3")
        .arg(&script)
        .arg(a)
        .arg(b)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed: {status}", script.display());
    }
    Ok(())
}

/// onnxruntime's own `quantize_dynamic` (u8 activations, per-channel s8 weights) on
/// `fp32`, timed in tract and onnxruntime.
fn ort_dynamic(fp32: &Path, args: &Args) -> Result<()> {
    let out = fp32.with_extension("ort-dynamic.onnx");
    run_script("ort_quantize_dynamic.py", fp32, &out)?;
    let name = out.file_name().unwrap_or_default().to_string_lossy().into_owned();
    let t = bench(&out, &args.threads, args.iters, args.warmup)?;
    for r in &t.timings {
        println!("| {name} | tract | {} | {:.1} | {:.1} |", r.threads, r.median_ms, r.min_ms);
    }
    if let Some(o) = ort_bench(&out, &args.threads, args.iters, args.warmup)? {
        for r in &o.timings {
            println!(
                "| {name} | onnxruntime {} | {} | {:.1} | {:.1} |",
                o.onnxruntime_version, r.threads, r.median_ms, r.min_ms
            );
        }
    }
    Ok(())
}

fn profile(path: &Path, iters: usize) -> Result<()> {
    let mut m = OnnxModel::load(path, ModelOptions::new())?;
    m.input_mut()?.iter_mut().enumerate().for_each(|(i, v)| *v = (i % 17) as f32 * 0.1 - 0.8);
    m.profile(2)?;
    let p = m.profile(iters)?;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    println!(
        "\n### tract per-op profile, {} (1 thread, {:.1} ms/frame)\n",
        path.display(),
        ms(p.total_per_frame)
    );
    println!("| op | nodes | ms/frame |");
    println!("|---|---|---|");
    for o in &p.by_op {
        println!("| {} | {} | {:.2} |", o.op, o.nodes, ms(o.per_frame));
    }
    println!("\n| node role (op), summed over blocks | ms/frame |\n|---|---|");
    for (role, t) in p.by_role().iter().take(24) {
        println!("| {role} | {:.2} |", ms(*t));
    }
    Ok(())
}
