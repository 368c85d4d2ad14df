//! Offline post-training int8 quantization of ONNX image backbones (the library side of
//! `flsl quantize`), with an accuracy and speed report.
//!
//! [`quantize_file`] reads an fp32 ONNX model, calibrates activation ranges on a folder
//! of images (preprocessed exactly as [`OnnxModel::run_rgb8`](crate::onnx::OnnxModel::run_rgb8)
//! does), rewrites every `MatMul` with a constant weight (and optionally the patch-embedding
//! `Conv`) to int8, writes the model atomically (temporary file, then rename), then measures
//! the int8 model against the fp32 one on held-out images and times both.
//!
//! # What is quantized
//!
//! - Weights: per-output-channel symmetric int8 (`[-127, 127]`, one scale per column of a
//!   `MatMul` weight `[K, N]` / per output channel of a `Conv`).
//! - Activations: one scale per tensor from the calibration ([`Calibration`]).
//! - Kept in float: everything that is not a weight layer (LayerNorm, Softmax, GELU,
//!   residual adds, the attention's activation x activation matmuls), the patch-embedding
//!   `Conv` when [`QuantizeOptions::quantize_conv`] is off, the FLSL head's output layers unless
//!   [`QuantizeOptions::quantize_head_output`], and any node selected by
//!   [`QuantizeOptions::float_ops`].
//!
//! # Formats
//!
//! - [`QuantFormat::Qdq`] (the default): explicit `QuantizeLinear -> DequantizeLinear` pairs
//!   on the activations (symmetric, zero point 0) and `DequantizeLinear` on the int8 weights
//!   (per-axis), in front of the unchanged float `MatMul`: the form TensorRT reads and
//!   onnxruntime fuses. tract alone runs it as fake quantization (float matmuls plus
//!   standalone quantize ops, slower than fp32); [`OnnxModel`]'s default engine instead
//!   lowers each such linear layer to one [`Int8MatMul`](crate::ops::Int8MatMul)
//!   (`crate::ops::qdq`): activation quantization fused into the op, AVX-512 VNNI integer
//!   kernel, dequantization, bias and a following GELU fused into its store.
//! - [`QuantFormat::Tract`]: `QuantizeLinear -> QLinearMatMul -> DequantizeLinear` with
//!   int8 activations (asymmetric, zero point in i8) and int8 outputs. tract lowers
//!   `QLinearMatMul` to one integer matmul whose zero-point compensation, requantization,
//!   clamping and int8 store are fused into the kernel; one `QuantizeLinear` feeds the q, k
//!   and v matmuls together. i8 rather than u8 activations: tract converts u8 operands to
//!   i8 in a separate pass before its integer kernels.
//!   Its standalone quantize and requantize ops make it slower than the QDQ form in our
//!   engine (docs/PERFORMANCE.md).

mod calib;
mod graph;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use prost::Message;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::TractError;

pub use calib::{list_images, load_image};
pub use graph::{QParams, quantize_per_column, quantize_per_row};

use crate::error::ModelError;
use crate::export::{FEATURES_NAME, LOGITS_NAME};
use crate::onnx::{ModelOptions, OnnxModel};
use crate::preprocess::Normalization;

/// Errors of [`quantize_file`] and its parts.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    /// File I/O failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The input is not a readable ONNX protobuf.
    #[error("{path} is not a valid ONNX model")]
    Decode {
        /// The file.
        path: PathBuf,
        /// prost's error.
        #[source]
        source: prost::DecodeError,
    },
    /// A node the quantizer cannot handle.
    #[error("node `{node}` ({op}): {reason}")]
    Unsupported {
        /// Node name (its output name when unnamed).
        node: String,
        /// Its op type.
        op: String,
        /// What is wrong.
        reason: String,
    },
    /// The calibration (or held-out) images cannot be used.
    #[error("calibration images in {dir}: {reason}")]
    Calibration {
        /// The folder.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An image could not be decoded.
    #[error("decoding image {path}")]
    Image {
        /// The file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },
    /// tract failed on the calibration or the quantized model.
    #[error("{what}")]
    Tract {
        /// What was being done.
        what: String,
        /// tract's error.
        #[source]
        source: TractError,
    },
    /// Loading or running a model for the report failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// The int8 graph form to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantFormat {
    /// `QLinearMatMul` with int8 activations: tract's own integer kernels.
    Tract,
    /// Explicit `QuantizeLinear`/`DequantizeLinear` around float matmuls (default): our
    /// engine's fused `Int8MatMul`, TensorRT, onnxruntime.
    Qdq,
}

/// How activation ranges are derived from the calibration statistics.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Calibration {
    /// The observed minimum and maximum.
    MinMax,
    /// Clip both tails at this percentile (e.g. `99.99`: the 0.01 % and 99.99 % values).
    Percentile(f32),
    /// The clipping range minimizing the expected squared quantization error over the
    /// observed histogram (candidates: tail quantiles and shrunk min/max ranges).
    Mse,
}

/// Latency measurement settings of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOptions {
    /// Thread counts to time.
    pub threads: Vec<usize>,
    /// Timed runs per model and thread count.
    pub iters: usize,
    /// Untimed warm-up runs.
    pub warmup: usize,
    /// Also time the files in onnxruntime (python3) when it is importable.
    pub onnxruntime: bool,
}

impl Default for BenchOptions {
    /// 1 and 2 threads, 20 runs after 3 warm-up runs, onnxruntime on.
    fn default() -> Self {
        Self { threads: vec![1, 2], iters: 20, warmup: 3, onnxruntime: true }
    }
}

/// Options of [`quantize_file`].
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeOptions {
    /// Output form.
    pub format: QuantFormat,
    /// Activation range method.
    pub calibration: Calibration,
    /// Calibration images: the first this many (sorted by name) of the calibration folder.
    pub calib_images: usize,
    /// Held-out images for the report; `None` takes the calibration folder's images after
    /// the first `calib_images`.
    pub heldout_dir: Option<PathBuf>,
    /// At most this many held-out images (0: no accuracy report).
    pub heldout_images: usize,
    /// Nodes kept in float: each entry is an op type (`Conv`, `MatMul`) or a node-name
    /// prefix (`head`, `blocks.11.mlp`).
    pub float_ops: Vec<String>,
    /// Quantize weight `Conv`s (the patch embedding); on by default: our engine runs a QDQ
    /// patch embedding on the integer kernel (ViT-S/16 int8 45.2 -> 42.5 ms at 1 thread in
    /// two `quantize_bench` runs), and its input is the 8-bit image (feature cosine 0.99988
    /// instead of 0.99990, prototype agreement 95.38 % instead of 95.46 % on the
    /// short-trained ViT-S/16; `docs/PERFORMANCE.md`).
    pub quantize_conv: bool,
    /// Quantize the FLSL head's output layers too (its last MLP linear, `head.mlp.<last>`, and
    /// the prototype layer `head/last_layer`); off by default: with many barely separated
    /// prototypes their rounding flips the argmax of `prototype_logits` (short-trained ViT-S/16:
    /// 94.16 % agreement with them in int8, 95.46 % with them in float, for ~3 % more latency).
    pub quantize_head_output: bool,
    /// Model input size `(H, W)`; `None` takes the file's.
    pub input_size: Option<(usize, usize)>,
    /// Image normalization (ImageNet for every FLSL backbone).
    pub normalization: Normalization,
    /// Latency measurement; `None` skips it.
    pub bench: Option<BenchOptions>,
    /// A labelled detection set: when given (and the model has a detection head), the
    /// report compares COCO AP of fp32 and int8 on it. Needs the `eval` feature.
    pub detection: Option<DetectionSet>,
}

/// A labelled set for the detection-AP comparison: a COCO instances file and the folder of
/// its images (`images[].file_name` under it, or its base name there); the detector's class
/// `c` is the file's `c`-th category.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectionSet {
    /// COCO instances JSON.
    pub gt: PathBuf,
    /// Folder of the images it names.
    pub images: PathBuf,
    /// Least detection score kept (low, so that AP sees the whole precision-recall curve).
    pub score_threshold: f32,
}

/// Detection AP of fp32 and int8 on a [`DetectionSet`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DetectionDelta {
    /// Images evaluated.
    pub images: usize,
    /// COCO summary (AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl), fp32.
    pub fp32: [f64; 12],
    /// The same for int8.
    pub int8: [f64; 12],
}

impl Default for QuantizeOptions {
    /// QDQ form, percentile 99.99, 64 calibration images, 32 held-out, the patch-embedding
    /// Conv quantized, the FLSL head's output layers in float, default benchmark.
    fn default() -> Self {
        Self {
            format: QuantFormat::Qdq,
            calibration: Calibration::Percentile(99.99),
            calib_images: 64,
            heldout_dir: None,
            heldout_images: 32,
            float_ops: Vec::new(),
            quantize_conv: true,
            quantize_head_output: false,
            input_size: None,
            normalization: Normalization::IMAGENET,
            bench: Some(BenchOptions::default()),
            detection: None,
        }
    }
}

/// Pipeline stage reported to the progress callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Calibration pass 1: activation min/max.
    CalibrationRanges,
    /// Calibration pass 2: histograms (percentile / MSE only).
    CalibrationHistograms,
    /// Held-out accuracy: fp32 vs int8.
    Evaluation,
    /// Latency measurement (`done` counts thread counts).
    Benchmark,
}

/// One progress update: `done` of `total` items of `stage` finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The stage.
    pub stage: Stage,
    /// Items finished.
    pub done: usize,
    /// Items in the stage.
    pub total: usize,
}

/// Accuracy of the int8 model vs fp32 on held-out images.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Accuracy {
    /// Held-out images used.
    pub images: usize,
    /// Mean over all patch tokens of all images of the cosine between the fp32 and int8
    /// feature vectors.
    pub mean_token_cosine: f64,
    /// The worst token's cosine.
    pub worst_token_cosine: f64,
    /// Mean over images of the cosine of the whole flattened feature map.
    pub mean_image_cosine: f64,
    /// The worst image's cosine.
    pub worst_image_cosine: f64,
    /// Fraction of tokens whose prototype assignment (argmax of `prototype_logits`) is the
    /// same in int8 as in fp32; `None` without a logits output.
    pub assignment_agreement: Option<f64>,
}

/// One latency measurement.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Latency {
    /// `tract` or `onnxruntime <version>`.
    pub runtime: String,
    /// `fp32` or `int8`.
    pub model: String,
    /// Threads.
    pub threads: usize,
    /// Median per frame, milliseconds.
    pub median_ms: f64,
    /// Fastest run, milliseconds.
    pub min_ms: f64,
}

/// What tract made of the int8 model: op kinds of the optimized plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TractOps {
    /// `(op name, node count)` of the optimized plan, most frequent first.
    pub ops: Vec<(String, usize)>,
    /// Matmul nodes running an integer kernel (i8 x i8 -> i32).
    pub integer_matmuls: usize,
    /// Matmul nodes running a float kernel.
    pub float_matmuls: usize,
}

/// The result of [`quantize_file`], also written beside the model as JSON and Markdown.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct QuantReport {
    /// The fp32 input model.
    pub model_fp32: PathBuf,
    /// The int8 model written.
    pub model_int8: PathBuf,
    /// Its form.
    pub format: QuantFormat,
    /// Range method.
    pub calibration: Calibration,
    /// Calibration images used.
    pub calib_images: usize,
    /// Weight layers quantized.
    pub quantized_layers: usize,
    /// Weight layers kept in float (by name).
    pub float_layers: Vec<String>,
    /// File sizes in bytes.
    pub size_fp32_bytes: u64,
    /// File sizes in bytes.
    pub size_int8_bytes: u64,
    /// Held-out accuracy (`None` when no held-out images).
    pub accuracy: Option<Accuracy>,
    /// Latencies (fp32 and int8 timed interleaved in one run per thread count).
    pub latency: Vec<Latency>,
    /// tract's optimized int8 plan.
    pub tract_ops: TractOps,
    /// What our load-time rewrites matched in the fp32 model.
    pub fusion_fp32: Option<crate::ops::FusionReport>,
    /// ... and in the int8 model.
    pub fusion_int8: Option<crate::ops::FusionReport>,
    /// Detection AP fp32 vs int8 (a detection head and [`QuantizeOptions::detection`]).
    pub detection: Option<DetectionDelta>,
    /// Wall time of calibration + rewrite, seconds.
    pub quantize_seconds: f64,
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> QuantizeError {
    let path = path.to_path_buf();
    move |source| QuantizeError::Io { action, path, source }
}

/// Reads and decodes an ONNX file.
pub fn read_model(path: &Path) -> Result<ModelProto, QuantizeError> {
    let bytes = std::fs::read(path).map_err(io("reading", path))?;
    let mut model = ModelProto::decode(&bytes[..])
        .map_err(|source| QuantizeError::Decode { path: path.to_path_buf(), source })?;
    // Weights kept beside the file (`*.onnx.data`): read in, the int8 file holds them all.
    crate::onnx::inline_external_data(&mut model, path.parent().unwrap_or(Path::new(".")))
        .map_err(|e| QuantizeError::Unsupported {
            node: path.display().to_string(),
            op: "external data".into(),
            reason: e.reason,
        })?;
    Ok(model)
}

/// The model's input shape `[1, 3, H, W]`: `size` or the file's declared one.
fn input_shape(
    model: &ModelProto,
    size: Option<(usize, usize)>,
) -> Result<[usize; 4], QuantizeError> {
    if let Some((h, w)) = size {
        return Ok([1, 3, h, w]);
    }
    use tract_onnx::pb::{tensor_shape_proto::dimension::Value, type_proto};
    let graph = model.graph.as_ref();
    let inits: Vec<&str> =
        graph.map(|g| g.initializer.iter().map(|t| t.name.as_str()).collect()).unwrap_or_default();
    let input = graph.and_then(|g| g.input.iter().find(|i| !inits.contains(&i.name.as_str())));
    let dims: Option<Vec<usize>> = input
        .and_then(|i| i.r#type.as_ref())
        .and_then(|t| match &t.value {
            Some(type_proto::Value::TensorType(t)) => t.shape.as_ref(),
            _ => None,
        })
        .and_then(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(Value::DimValue(v)) if v > 0 => Some(v as usize),
                    _ => None,
                })
                .collect()
        });
    match dims.as_deref() {
        Some([1, 3, h, w]) => Ok([1, 3, *h, *w]),
        other => Err(QuantizeError::Unsupported {
            node: input.map_or("<input>".into(), |i| i.name.clone()),
            op: "<graph input>".into(),
            reason: format!(
                "input shape {other:?} is not a fixed [1, 3, H, W]; pass an input size"
            ),
        }),
    }
}

/// Quantizes an in-memory fp32 model: calibrates on `calib` (already-listed images) and
/// rewrites it. Returns the int8 model, the layers quantized and those kept in float.
pub fn quantize_model(
    model: &ModelProto,
    calib: &[PathBuf],
    options: &QuantizeOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<(ModelProto, usize, Vec<String>), QuantizeError> {
    let graph = graph::check_model(model)?;
    let shape = input_shape(model, options.input_size)?;
    let layers = graph::find_layers(graph, options)?;
    let names = graph::calibration_tensors(&layers, options.format);
    let (probe_model, outputs) = graph::with_extra_outputs(model, &names);
    let probe = calib::Probe::new(&probe_model, shape)?;
    let ranges = calib::calibrate(
        &probe,
        &outputs,
        calib,
        &options.normalization,
        options.calibration,
        progress,
    )?;
    let ranges: graph::Ranges = names.iter().cloned().zip(ranges).collect();
    let (int8, n) = graph::rewrite(model, &layers, &ranges, options.format)?;
    let kept =
        layers.iter().filter(|l| !l.quantize).map(|l| format!("{} ({})", l.name, l.op)).collect();
    Ok((int8, n, kept))
}

/// Writes `bytes` to `path` atomically ([`crate::fsio::write_atomic`]).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), QuantizeError> {
    crate::fsio::write_atomic(path, bytes).map_err(io("writing", path))
}

/// Quantizes the fp32 ONNX file `input` with calibration images from `calib_dir` and
/// writes the int8 model to `out` (only once everything, including a tract load and run
/// of the int8 model, succeeded), then its report as `<out stem>.quant.json` and
/// `<out stem>.quant.md` beside it.
pub fn quantize_file(
    input: &Path,
    calib_dir: &Path,
    out: &Path,
    options: &QuantizeOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<QuantReport, QuantizeError> {
    let _span = tracing::info_span!("quantize", model = %input.display()).entered();
    let started = Instant::now();
    let model = read_model(input)?;
    let shape = input_shape(&model, options.input_size)?;
    let all = list_images(calib_dir)?;
    let n_calib = options.calib_images.max(1).min(all.len());
    let calib = &all[..n_calib];
    let heldout: Vec<PathBuf> = match &options.heldout_dir {
        Some(dir) => list_images(dir)?,
        None => all[n_calib..].to_vec(),
    }
    .into_iter()
    .filter(|p| !calib.contains(p))
    .take(options.heldout_images)
    .collect();
    let (int8, quantized_layers, float_layers) = quantize_model(&model, calib, options, progress)?;
    let bytes = int8.encode_to_vec();
    // The int8 model must load and run in tract before anything is written.
    let model_options = ModelOptions::new().with_input_size(shape[2], shape[3]);
    let mut check = OnnxModel::from_bytes(&bytes, model_options)?;
    check.run()?;
    let fusion_int8 = check.fusion().cloned();
    drop(check);
    let fusion_fp32 = OnnxModel::load(input, model_options)?.fusion().cloned();
    let tract_ops = tract_ops(&bytes, shape)?;
    write_atomic(out, &bytes)?;
    let quantize_seconds = started.elapsed().as_secs_f64();
    tracing::info!(out = %out.display(), quantize_seconds, "int8 model written");

    let accuracy = if heldout.is_empty() {
        None
    } else {
        Some(compare(input, out, &heldout, options, progress)?)
    };
    let latency = match &options.bench {
        Some(b) => latency(input, out, shape, b, progress)?,
        None => Vec::new(),
    };
    let detection = match &options.detection {
        Some(set) => detection_delta(input, out, set)?,
        None => None,
    };
    let report = QuantReport {
        detection,
        model_fp32: input.to_path_buf(),
        model_int8: out.to_path_buf(),
        format: options.format,
        calibration: options.calibration,
        calib_images: calib.len(),
        quantized_layers,
        float_layers,
        size_fp32_bytes: std::fs::metadata(input).map_err(io("reading", input))?.len(),
        size_int8_bytes: bytes.len() as u64,
        accuracy,
        latency,
        tract_ops,
        fusion_fp32,
        fusion_int8,
        quantize_seconds,
    };
    let json = serde_json::to_vec_pretty(&report).expect("the report serializes");
    write_atomic(&out.with_extension("quant.json"), &json)?;
    write_atomic(&out.with_extension("quant.md"), report_markdown(&report).as_bytes())?;
    Ok(report)
}

/// COCO AP of `fp32` and `int8` on `set`; `None` when the model has no detection head.
#[cfg(feature = "eval")]
fn detection_delta(
    fp32: &Path,
    int8: &Path,
    set: &DetectionSet,
) -> Result<Option<DetectionDelta>, QuantizeError> {
    use crate::detect::{DetectOptions, Detector, DetectorScratch};
    use crate::eval::{CocoDet, CocoGt, evaluate};
    let bad = |reason: String| QuantizeError::Calibration { dir: set.gt.clone(), reason };
    let text = std::fs::read_to_string(&set.gt).map_err(io("reading", &set.gt))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let gt = CocoGt::from_value(&doc, Some(&set.gt)).map_err(|e| bad(e.to_string()))?;
    let files: Vec<(i64, PathBuf)> = doc["images"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| {
                    // `file_name` under the folder, or its base name there (files often
                    // carry a directory prefix such as `images/`).
                    let name = Path::new(i["file_name"].as_str()?);
                    let direct = set.images.join(name);
                    let path =
                        if direct.is_file() { direct } else { set.images.join(name.file_name()?) };
                    Some((i["id"].as_i64()?, path))
                })
                .filter(|(_, p)| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    if files.is_empty() {
        return Err(bad(format!("none of its images is in {}", set.images.display())));
    }
    let mut stats = Vec::new();
    for model in [fp32, int8] {
        let mut opts = DetectOptions::new(model.to_path_buf());
        opts.score_threshold = set.score_threshold;
        let mut scratch = DetectorScratch::default();
        let mut detector = Detector::new(&opts, &mut scratch)?;
        if !detector.has_head() {
            return Ok(None);
        }
        let mut dets = Vec::new();
        for (id, path) in &files {
            let img = crate::preprocess::decode_image_file(path)
                .map_err(|source| QuantizeError::Image { path: path.clone(), source })?
                .to_rgb8();
            for d in detector.process(&img)?.detections {
                let Some(&category_id) = gt.categories.get(usize::from(d.class)) else { continue };
                let [x0, y0, x1, y1] = d.bbox.map(f64::from);
                dets.push(CocoDet {
                    image_id: *id,
                    category_id,
                    bbox: [x0, y0, x1 - x0, y1 - y0],
                    score: f64::from(d.score),
                });
            }
        }
        stats.push(evaluate(&gt, &dets).map_err(|e| bad(e.to_string()))?.to_array());
    }
    Ok(Some(DetectionDelta { images: files.len(), fp32: stats[0], int8: stats[1] }))
}

#[cfg(not(feature = "eval"))]
fn detection_delta(
    _: &Path,
    _: &Path,
    set: &DetectionSet,
) -> Result<Option<DetectionDelta>, QuantizeError> {
    Err(QuantizeError::Calibration {
        dir: set.gt.clone(),
        reason: "the detection AP comparison needs flsl-runtime's `eval` feature".into(),
    })
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        let (x, y) = (f64::from(*x), f64::from(*y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 && bb == 0.0 { 1.0 } else { ab / (aa.sqrt() * bb.sqrt()).max(1e-30) }
}

fn argmax(v: &[f32]) -> usize {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}

/// Feature cosine and prototype agreement of `int8` vs `fp32` on `images` (tract, 1 thread).
pub fn compare(
    fp32: &Path,
    int8: &Path,
    images: &[PathBuf],
    options: &QuantizeOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Accuracy, QuantizeError> {
    let mut mo = ModelOptions::new();
    mo.normalization = options.normalization;
    if let Some((h, w)) = options.input_size {
        mo = mo.with_input_size(h, w);
    }
    let mut a = OnnxModel::load(fp32, mo)?;
    let mut b = OnnxModel::load(int8, mo)?;
    let [_, _, h, w] = a.input_shape();
    let (mut tok_sum, mut tok_n, mut tok_worst) = (0.0, 0usize, f64::INFINITY);
    let (mut img_sum, mut img_worst) = (0.0, f64::INFINITY);
    let (mut agree, mut assigned) = (0usize, 0usize);
    for (i, path) in images.iter().enumerate() {
        progress(Progress { stage: Stage::Evaluation, done: i, total: images.len() });
        let x = load_image(path, h, w, &options.normalization)?;
        a.run_tensor(&x)?;
        let fa = a.outputs().expect("outputs after a run");
        let feats_a = fa.features.as_slice().to_vec();
        let logits_a = fa.logits.map(|l| (l.as_slice().to_vec(), l.channels()));
        let d = fa.features.channels();
        b.run_tensor(&x)?;
        let fb = b.outputs().expect("outputs after a run");
        if fb.features.as_slice().len() != feats_a.len() {
            return Err(QuantizeError::Model(ModelError::Mismatch {
                what: "int8 features length",
                expected: feats_a.len().to_string(),
                got: fb.features.as_slice().len().to_string(),
            }));
        }
        for (ra, rb) in feats_a.chunks_exact(d).zip(fb.features.rows()) {
            let c = cosine(ra, rb);
            tok_sum += c;
            tok_n += 1;
            tok_worst = tok_worst.min(c);
        }
        let c = cosine(&feats_a, fb.features.as_slice());
        img_sum += c;
        img_worst = img_worst.min(c);
        if let (Some((la, k)), Some(lb)) = (logits_a, fb.logits) {
            for (ra, rb) in la.chunks_exact(k).zip(lb.rows()) {
                agree += usize::from(argmax(ra) == argmax(rb));
                assigned += 1;
            }
        }
    }
    Ok(Accuracy {
        images: images.len(),
        mean_token_cosine: tok_sum / tok_n.max(1) as f64,
        worst_token_cosine: tok_worst,
        mean_image_cosine: img_sum / images.len().max(1) as f64,
        worst_image_cosine: img_worst,
        assignment_agreement: (assigned > 0).then(|| agree as f64 / assigned as f64),
    })
}

/// tract latency of `fp32` and `int8`, interleaved run by run at each thread count, then
/// onnxruntime's on both files when `b.onnxruntime` and python3 can import it.
pub fn latency(
    fp32: &Path,
    int8: &Path,
    shape: [usize; 4],
    b: &BenchOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<Latency>, QuantizeError> {
    let mut rows = Vec::new();
    let input: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|i| f32::from(crate::bench::synthetic_byte(i)) / 64.0 - 2.0)
        .collect();
    for (ti, &t) in b.threads.iter().enumerate() {
        progress(Progress { stage: Stage::Benchmark, done: ti, total: b.threads.len() });
        let mo = ModelOptions::new().with_threads(t).with_input_size(shape[2], shape[3]);
        let mut models = [OnnxModel::load(fp32, mo)?, OnnxModel::load(int8, mo)?];
        for m in &mut models {
            m.input_mut()?.copy_from_slice(&input);
            for _ in 0..b.warmup {
                m.run()?;
            }
        }
        let mut times = [Vec::new(), Vec::new()];
        for _ in 0..b.iters.max(1) {
            for (m, t) in models.iter_mut().zip(&mut times) {
                let t0 = Instant::now();
                m.run()?;
                t.push(t0.elapsed());
            }
        }
        for (name, t_) in ["fp32", "int8"].iter().zip(&mut times) {
            use crate::bench::{ms, percentile};
            let (median_ms, min_ms) = (ms(percentile(t_, 0.5)), ms(percentile(t_, 0.0)));
            rows.push(Latency {
                runtime: "tract".into(),
                model: (*name).into(),
                threads: t,
                median_ms,
                min_ms,
            });
        }
    }
    if b.onnxruntime {
        for (name, path) in [("fp32", fp32), ("int8", int8)] {
            if let Some(r) = crate::bench::ort_bench(path, &b.threads, b.iters, b.warmup)? {
                for t in r.timings {
                    rows.push(Latency {
                        runtime: format!("onnxruntime {}", r.onnxruntime_version),
                        model: name.into(),
                        threads: t.threads,
                        median_ms: t.median_ms,
                        min_ms: t.min_ms,
                    });
                }
            }
        }
    }
    Ok(rows)
}

/// The op kinds of the optimized plan our engine ([`OnnxModel`], default matmul engine)
/// builds for ONNX `bytes` at input `shape`, and how many of its matmuls run integer kernels:
/// [`Int8MatMul`](crate::ops::Int8MatMul) (the QDQ linear layers, lowered), an int8
/// [`PatchEmbed`](crate::ops::PatchEmbed) (a QDQ patch-embedding `Conv`) and tract's own
/// `OptMatMul` with an `i32` kernel (the `QLinearMatMul` form).
pub fn tract_ops(bytes: &[u8], shape: [usize; 4]) -> Result<TractOps, QuantizeError> {
    let model =
        OnnxModel::from_bytes(bytes, ModelOptions::new().with_input_size(shape[2], shape[3]))?;
    let mut ops: Vec<(String, usize)> = Vec::new();
    let (mut integer, mut float) = (0, 0);
    for (_, name, info) in model.plan_info() {
        let int8_patches = name == "PatchEmbed" && info.iter().any(|i| i.ends_with("int8"));
        if name == "Int8MatMul" || int8_patches {
            integer += 1;
        } else if name == "PatchEmbed" {
            float += 1;
        } else if name.contains("MatMul") && !name.contains("Pack") {
            if info.join(" ").contains("i32") {
                integer += 1;
            } else {
                float += 1;
            }
        }
        match ops.iter_mut().find(|o| o.0 == name) {
            Some(o) => o.1 += 1,
            None => ops.push((name, 1)),
        }
    }
    ops.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(TractOps { ops, integer_matmuls: integer, float_matmuls: float })
}

/// The report as Markdown (what `flsl quantize` prints and writes beside the model).
pub fn report_markdown(r: &QuantReport) -> String {
    let mut s = String::new();
    let mb = |b: u64| b as f64 / 1e6;
    let _ = writeln!(s, "# int8 quantization of {}\n", r.model_fp32.display());
    let _ = writeln!(
        s,
        "- output: {} (format `{:?}`, calibration {:?} on {} images, {:.1} s)",
        r.model_int8.display(),
        r.format,
        r.calibration,
        r.calib_images,
        r.quantize_seconds
    );
    let _ = writeln!(
        s,
        "- size: {:.1} MB fp32 -> {:.1} MB int8 ({:.2}x smaller)",
        mb(r.size_fp32_bytes),
        mb(r.size_int8_bytes),
        r.size_fp32_bytes as f64 / r.size_int8_bytes.max(1) as f64
    );
    let _ = writeln!(
        s,
        "- layers: {} quantized, {} kept in float{}",
        r.quantized_layers,
        r.float_layers.len(),
        if r.float_layers.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.float_layers.join(", "))
        }
    );
    let _ = writeln!(
        s,
        "- tract plan: {} integer matmuls, {} float matmuls",
        r.tract_ops.integer_matmuls, r.tract_ops.float_matmuls
    );
    for (name, f) in [("fp32", &r.fusion_fp32), ("int8", &r.fusion_int8)] {
        if let Some(f) = f {
            let _ = writeln!(s, "- {name} model, fused paths: {f}");
        }
    }
    match &r.accuracy {
        Some(a) => {
            let _ = writeln!(
                s,
                "- held-out ({} images): {FEATURES_NAME} cosine vs fp32 mean {:.5} / worst token {:.5}; per image mean {:.5} / worst {:.5}",
                a.images,
                a.mean_token_cosine,
                a.worst_token_cosine,
                a.mean_image_cosine,
                a.worst_image_cosine
            );
            if let Some(ag) = a.assignment_agreement {
                let _ = writeln!(
                    s,
                    "- prototype assignment (argmax of {LOGITS_NAME}) agreement: {:.2} %",
                    100.0 * ag
                );
            }
        }
        None => {
            let _ = writeln!(s, "- held-out accuracy: not measured (no held-out images)");
        }
    }
    if let Some(d) = &r.detection {
        let _ = writeln!(
            s,
            "- detection ({} labelled images): AP50 {:.4} fp32 -> {:.4} int8, AP {:.4} -> {:.4}, AR100 {:.4} -> {:.4}",
            d.images, d.fp32[1], d.int8[1], d.fp32[0], d.int8[0], d.fp32[8], d.int8[8]
        );
    }
    if !r.latency.is_empty() {
        let _ = writeln!(s, "\n| runtime | model | threads | median ms | min ms |");
        let _ = writeln!(s, "|---|---|---|---|---|");
        for l in &r.latency {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {:.1} |",
                l.runtime, l.model, l.threads, l.median_ms, l.min_ms
            );
        }
        for l in r.latency.iter().filter(|l| l.runtime == "tract" && l.model == "int8") {
            if let Some(f) = r
                .latency
                .iter()
                .find(|f| f.runtime == "tract" && f.model == "fp32" && f.threads == l.threads)
            {
                let _ = writeln!(
                    s,
                    "\ntract int8 vs fp32 at {} thread(s): {:.2}x faster",
                    l.threads,
                    f.median_ms / l.median_ms
                );
            }
        }
    }
    s
}
