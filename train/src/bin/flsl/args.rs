//! The command line: one `Args` struct per command (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "flsl",
    version,
    about = "FLSL: feature-level self-supervised ViTs, from training to drones"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Pretrains a small FLSL ViT on the embedded aerial images (a few minutes on a CPU) and
    /// writes cluster maps of held-out images, the loss plot and a report.
    Demo(DemoArgs),
    /// FLSL pretraining on a folder of images.
    Train(TrainArgs),
    /// Distils a frozen FLSL teacher (a run of ours or the official `.pth`) into a smaller
    /// student with FLSL's objective, then reports agreement, feature cosine, cluster-map mIoU
    /// and the 1-thread latency of both exports (report.md + report.json in the run folder).
    Distill(DistillArgs),
    /// Runs the same training steps on the CPU and on a CUDA device (same weights, same batch)
    /// and compares the losses; prints each backend's images/s.
    GpuCheck(GpuCheckArgs),
    /// Exports a checkpoint's backbone (+ FLSL head) as an opset-17 ONNX file for tract,
    /// onnxruntime or TensorRT.
    Export(ExportArgs),
    /// Trains the CenterNet-style detection head on a frozen backbone from COCO JSON, VOC XML
    /// or VisDrone-DET boxes (default: the embedded NEON tree crowns, OSBS_029 held out) and
    /// reports COCO AP on the held-out images.
    TrainDetector(TrainDetectorArgs),
    /// Runs the ONNX model + the onboard post-process on a folder of frames or a video:
    /// JSON lines per frame, optional overlay PNGs, frames/s per stage.
    Detect(DetectArgs),
    /// Post-training int8 quantization with calibration images, and an accuracy + speed
    /// report (JSON + Markdown beside the output).
    Quantize(QuantizeArgs),
    /// COCO bbox evaluation (numerically the same as pycocotools).
    EvalDetections(EvalDetectionsArgs),
    /// mIoU of unsupervised cluster maps against ground-truth masks (Hungarian matching over
    /// the dataset), for an ONNX backbone and a randomly initialised one of the same size.
    EvalClusters(EvalClustersArgs),
    /// Latency of an ONNX model in tract (median, p90, frames/s, peak memory) at each thread
    /// count; with `--vs-onnxruntime`, the same file in onnxruntime in the same run.
    Bench(BenchArgs),
    /// Runs one f32 `.npy` tensor (the model's input shape) through tract and writes the first
    /// output as `.npy` (further outputs as `OUT.<name>.npy`).
    Infer(InferArgs),
    /// Checks our implementation against the golden tensors of the official PyTorch code.
    ReferenceCheck(ReferenceCheckArgs),
    /// Writes a model bundle for `flsl-onboard`: the model, `onboard.toml` (input size,
    /// normalization, outputs, class names, thresholds, link settings) and `SHA256SUMS`.
    Bundle(BundleArgs),
}

/// `flsl demo`.
#[derive(Args)]
pub struct DemoArgs {
    /// Output folder.
    #[arg(long, default_value = "out/demo")]
    pub out: PathBuf,
    /// Image folder (default: the repository's data/neon-aerial-trees/images).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Training steps.
    #[arg(long, default_value_t = 240)]
    pub steps: usize,
}

/// `flsl train`.
#[derive(Args)]
pub struct TrainArgs {
    /// TOML configuration (defaults: the paper's ViT-S/16 recipe).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Start from a preset: `vit_small16` (paper), `vit_tiny16`, `tiny` (CPU).
    #[arg(long)]
    pub preset: Option<String>,
    /// Overrides `key=value` (TOML values; `augment.global_resize=128`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Image folder (overrides `data_path`).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Output folder (overrides `output_dir`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// `cpu`, `cuda`, `cuda:N`, or several for data-parallel training: `cuda:0,cuda:1` (overrides `device`).
    #[arg(long)]
    pub device: Option<String>,
    /// Stop after this many steps.
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Ignore an existing checkpoint in the output folder and start over.
    #[arg(long)]
    pub fresh: bool,
}

/// `flsl distill`.
#[derive(Args)]
pub struct DistillArgs {
    /// The teacher: a run or checkpoint folder of ours, or a weights file (`.safetensors`,
    /// the official `.pth`).
    #[arg(long)]
    pub teacher: PathBuf,
    /// Weight of the feature-alignment term (0: prototype and mean-shift terms only).
    #[arg(long, default_value_t = 1.0)]
    pub feature_weight: f64,
    /// Held-out images for the report: file names under the data folder, left out of training
    /// (repeat the flag).
    #[arg(long = "holdout", value_name = "NAME")]
    pub holdout: Vec<String>,
    /// Held-out images for the report from another folder (instead of `--holdout`).
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Side in pixels the report's images and exports use.
    #[arg(long, default_value_t = 224)]
    pub report_size: usize,
    /// Skip the exports and latency of the report.
    #[arg(long)]
    pub no_latency: bool,
    /// The student's configuration and the run (as `flsl train`).
    #[command(flatten)]
    pub train: TrainArgs,
}

/// `flsl gpu-check`.
#[derive(Args)]
pub struct GpuCheckArgs {
    /// Preset of the model (`tiny`, `vit_tiny16`, `vit_small16`).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Steps per backend.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Images per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub cuda: usize,
    /// Largest accepted difference of every loss term at every step, relative to the CPU's
    /// value (absolute below 1e-3).
    #[arg(long, default_value_t = 1e-3)]
    pub tolerance: f64,
    /// Largest accepted difference of every loss term at every step between CUDA in half
    /// precision (bfloat16 backbones, `use_fp16`) and CUDA in f32, relative to the f32 value.
    #[arg(long, default_value_t = 5e-2)]
    pub half_tolerance: f64,
    /// CUDA only (f32 vs half precision), without the CPU run: for batch sweeps at sizes
    /// the CPU would take minutes over.
    #[arg(long)]
    pub no_cpu: bool,
}

/// `flsl export`.
#[derive(Args)]
pub struct ExportArgs {
    /// A checkpoint folder of ours (or a run's output folder), or a weights file
    /// (`.safetensors`, or the official code's `.pth`).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output ONNX file (written atomically).
    #[arg(long)]
    pub out: PathBuf,
    /// Input size `H` or `HxW` in pixels (multiples of the patch size).
    #[arg(long, default_value = "224")]
    pub size: String,
    /// Also export the FLSL head as the `prototype_logits` output.
    #[arg(long)]
    pub with_head: bool,
    /// Export the student instead of the EMA teacher.
    #[arg(long)]
    pub student: bool,
    /// Attention heads (only for a weights file without `config.json`; default `D/64`).
    #[arg(long)]
    pub heads: Option<usize>,
    /// Append the detection head of this `flsl train-detector` folder (`det_heatmap`,
    /// `det_boxes` outputs).
    #[arg(long)]
    pub detector: Option<PathBuf>,
}

/// `flsl train-detector`.
#[derive(Args)]
pub struct TrainDetectorArgs {
    /// Backbone checkpoint (run folder, checkpoint folder or weights file).
    #[arg(long, default_value = "out/demo")]
    pub checkpoint: PathBuf,
    /// Annotation files or folders (repeat); default: the embedded NEON COCO files.
    #[arg(long = "annotations")]
    pub annotations: Vec<PathBuf>,
    /// Folder of the images named by VOC/VisDrone files.
    #[arg(long)]
    pub images: Option<PathBuf>,
    /// Held-out image file names (repeat); default OSBS_029.png.
    #[arg(long = "holdout")]
    pub holdout: Vec<String>,
    /// Keep the annotation classes instead of merging them into one.
    #[arg(long)]
    pub multi_class: bool,
    /// Output folder.
    #[arg(long, default_value = "out/detector")]
    pub out: PathBuf,
    /// Training steps.
    #[arg(long, default_value_t = 400)]
    pub steps: usize,
    /// Image scale before tiling (the demo backbone saw ~0.4x crops).
    #[arg(long, default_value_t = 0.5)]
    pub scale: f32,
    /// Tile side in pixels.
    #[arg(long, default_value_t = 128)]
    pub tile: usize,
    /// Also export backbone + FLSL head + detection head as ONNX at this size (`H` or `HxW`).
    #[arg(long, default_value = "224")]
    pub export_size: String,
}

/// `flsl detect`.
#[derive(Args)]
pub struct DetectArgs {
    /// The ONNX model (`flsl export`, optionally with `--with-head` / `--detector`).
    #[arg(long)]
    pub model: PathBuf,
    /// A folder of .png/.jpg frames, or a video file (needs ffmpeg).
    #[arg(long)]
    pub input: PathBuf,
    /// JSON lines output (default: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write overlay PNGs (cluster map + boxes) into this folder.
    #[arg(long)]
    pub overlays: Option<PathBuf>,
    /// tract threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Least detection score (also the least score of a track MAVLink locks on).
    #[arg(long, default_value_t = 0.3)]
    pub score: f32,
    /// Refine the features by mean shift before clustering (3 iterations; ~8 ms per frame
    /// at 14x14 x 192 on one core, see docs/PERFORMANCE.md).
    #[arg(long)]
    pub meanshift: bool,
    /// Stop after this many frames.
    #[arg(long)]
    pub max_frames: Option<usize>,
}

/// `flsl quantize`.
#[derive(Args)]
pub struct QuantizeArgs {
    /// The fp32 ONNX model.
    pub model: PathBuf,
    /// Calibration images folder.
    #[arg(long)]
    pub calib: PathBuf,
    /// Output int8 ONNX (written only when everything succeeded).
    #[arg(long)]
    pub out: PathBuf,
    /// `qdq` (explicit QuantizeLinear/DequantizeLinear; TensorRT and onnxruntime read it) or
    /// `tract` (QLinearMatMul). Our engine runs the linear layers of both as fused int8 matmuls.
    #[arg(long, default_value = "qdq")]
    pub format: String,
    /// `minmax`, `percentile[=P]` (default 99.99) or `mse`.
    #[arg(long, default_value = "percentile")]
    pub calibration: String,
    /// Calibration images to use.
    #[arg(long, default_value_t = 64)]
    pub calib_images: usize,
    /// Held-out images for the accuracy report (not the calibration ones).
    #[arg(long)]
    pub heldout: Option<PathBuf>,
    /// Op types or node-name prefixes kept in float (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub float_ops: Vec<String>,
    /// Keep the patch-embedding Conv in float (quantized by default: it runs on the
    /// integer kernel, and its input is the 8-bit image).
    #[arg(long)]
    pub float_conv: bool,
    /// Quantize the FLSL head's output layers too (kept in float by default: int8 rounding
    /// flips prototype argmaxes there).
    #[arg(long)]
    pub quantize_head_output: bool,
    /// Thread counts for the latency report.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// No latency report (quantize and check accuracy only).
    #[arg(long)]
    pub no_latency: bool,
    /// COCO instances file of a labelled detection set: the report compares detection AP
    /// of fp32 and int8 on it (models with a detection head).
    #[arg(long, requires = "det_images")]
    pub det_gt: Option<PathBuf>,
    /// Folder of the images that `--det-gt` names.
    #[arg(long, requires = "det_gt")]
    pub det_images: Option<PathBuf>,
    /// Least detection score for the AP comparison.
    #[arg(long, default_value_t = 0.05)]
    pub det_score: f32,
}

/// `flsl eval-detections`.
#[derive(Args)]
pub struct EvalDetectionsArgs {
    /// COCO ground-truth file.
    #[arg(long)]
    pub gt: PathBuf,
    /// COCO results list.
    #[arg(long)]
    pub dt: PathBuf,
    /// Print one JSON object instead of the 12 summary lines.
    #[arg(long)]
    pub json: bool,
}

/// `flsl eval-clusters`.
#[derive(Args)]
pub struct EvalClustersArgs {
    /// The ONNX model to evaluate.
    #[arg(long)]
    pub model: PathBuf,
    /// Also evaluate this model (for example a random-init export) side by side.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// DAVIS-style root with JPEGImages/480p/<seq> and Annotations/480p/<seq>.
    #[arg(long, default_value = "../shared/data/davis2016-subset")]
    pub davis: PathBuf,
    /// Clusters per image (k-means on the patch features).
    #[arg(long, default_value_t = 2)]
    pub k: usize,
    /// Frames per sequence (evenly spaced).
    #[arg(long, default_value_t = 10)]
    pub frames: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `flsl bench`.
#[derive(Args)]
pub struct BenchArgs {
    /// The ONNX file.
    #[arg(long)]
    pub model: PathBuf,
    /// Thread counts, comma-separated.
    #[arg(long, default_value = "1,2", value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Timed runs per thread count.
    #[arg(long, default_value_t = 30)]
    pub iters: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Also time the file in Python onnxruntime (when importable) and print the ratio.
    #[arg(long)]
    pub vs_onnxruntime: bool,
    /// Write the report as JSON here too.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// `flsl infer`.
#[derive(Args)]
pub struct InferArgs {
    /// The ONNX file.
    #[arg(long)]
    pub model: PathBuf,
    /// Input tensor.
    #[arg(long)]
    pub npy: PathBuf,
    /// Output `.npy`.
    #[arg(long)]
    pub out: PathBuf,
    /// Threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// `flsl reference-check`.
#[derive(Args)]
pub struct ReferenceCheckArgs {
    /// Folder with `index.json` (e.g. `../shared/reference` or its `micro/`).
    pub dir: PathBuf,
}

/// `flsl bundle`.
#[derive(Args)]
pub struct BundleArgs {
    /// The ONNX model (fp32 or int8 QDQ, from `flsl export` / `flsl quantize`).
    #[arg(long)]
    pub model: PathBuf,
    /// Output folder (replaced atomically when it holds a previous bundle).
    #[arg(long)]
    pub out: PathBuf,
    /// Class names of the detection head, comma-separated (default `class0,class1,...`).
    #[arg(long, value_delimiter = ',')]
    pub classes: Vec<String>,
    /// Least detection score (also the least score of a track MAVLink locks on).
    #[arg(long, default_value_t = 0.3)]
    pub score: f32,
    /// k-means clusters when the model has no prototype logits.
    #[arg(long, default_value_t = 8)]
    pub kmeans_k: usize,
    /// Refine the features by mean shift before clustering.
    #[arg(long)]
    pub meanshift: bool,
    /// tract threads on the companion computer.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Default serial device for the link wire frames.
    #[arg(long)]
    pub serial: Option<String>,
    /// Default baud rate of the serial device.
    #[arg(long)]
    pub baud: Option<u32>,
    /// Default UDP address `HOST:PORT` for the link wire frames.
    #[arg(long)]
    pub udp: Option<String>,
    /// Input size `H` or `HxW` for a model whose file leaves it symbolic.
    #[arg(long)]
    pub size: Option<String>,
    /// Default MAVLink target (`udpout:HOST:PORT` or `serial:DEVICE[:BAUD]`).
    #[arg(long)]
    pub mavlink: Option<String>,
    /// MAVLink system id (the vehicle's).
    #[arg(long, default_value_t = 1)]
    pub mavlink_system: u8,
    /// MAVLink component id (100: MAV_COMP_ID_CAMERA).
    #[arg(long, default_value_t = 100)]
    pub mavlink_component: u8,
    /// CAMERA_TRACKING_IMAGE_STATUS messages per second.
    #[arg(long, default_value_t = 10.0)]
    pub mavlink_rate: f32,
    /// Point a gimbal at the locked track (GIMBAL_MANAGER_SET_PITCHYAW, the firmware
    /// controller's default gains and limits; edit `[mavlink.gimbal]` to change them).
    #[arg(long)]
    pub gimbal: bool,
}
