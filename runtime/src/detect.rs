//! `flsl detect`: frames in (a folder of images, or a video through `ffmpeg`), per frame the
//! ONNX model in tract and the no-alloc perception core (clusters, segments, detections,
//! tracks) out, as JSON lines, optional overlay PNGs, and a timing summary split into
//! decode / preprocess / model / post-process.
//!
//! The model is whatever [`OnnxModel`] loads: `features` is required; `prototype_logits`
//! gives the cluster labels (else k-means on the features), `det_heatmap` + `det_boxes`
//! (see [`contract`](crate::contract)) give detections and tracks. The frame is resized
//! to the model input without cropping ([`preprocess`](crate::preprocess)), so boxes map back
//! to frame pixels with [`BoxMap::stretch`].

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};

use crate::contract::{BOXES_NAME, HEATMAP_NAME};
use crate::error::ModelError;
use crate::onboard::OnboardError;
use crate::onboard::output::frame_record;
use crate::onboard::run::{FramePolicy, LoopOptions, run_loop};
use crate::onboard::source;
use crate::onnx::{ModelOptions, OnnxModel};
use crate::perception::decode::HeadDims;
use crate::perception::{
    BoxMap, LabelSource, Perception, PerceptionConfig, PerceptionDims, Segment,
};
use crate::preprocess::{Normalization, Rgb8Frame, preprocess_rgb8};

/// Capacities of the post-process: segments, detections, tracks.
const SEGMENTS: usize = 128;
const DETECTIONS: usize = 100;
const TRACKS: usize = 64;

/// `flsl detect` settings.
#[derive(Debug, Clone)]
pub struct DetectOptions {
    /// The ONNX model.
    pub model: PathBuf,
    /// tract threads.
    pub threads: usize,
    /// Least detection score.
    pub score_threshold: f32,
    /// Mean-shift refinement of the features before clustering (default off: it costs
    /// ~8 ms per 14x14 frame on one core, the rest of the post-process ~0.05-0.5 ms).
    pub meanshift: bool,
    /// k-means clusters when the model has no `prototype_logits`.
    pub kmeans_k: usize,
    /// Write an overlay PNG per frame here.
    pub overlays: Option<PathBuf>,
    /// Stop after this many frames.
    pub max_frames: Option<usize>,
    /// Input pixels per map cell of the detection head (default `patch / 2`).
    pub det_stride: Option<f32>,
    /// Input size `(H, W)` for a model whose file leaves it symbolic.
    pub input_size: Option<(usize, usize)>,
    /// Input normalization.
    pub normalization: Normalization,
}

impl DetectOptions {
    /// Defaults for `model`.
    pub fn new(model: PathBuf) -> Self {
        Self {
            model,
            threads: 1,
            score_threshold: 0.3,
            meanshift: false,
            kmeans_k: 8,
            overlays: None,
            max_frames: None,
            det_stride: None,
            input_size: None,
            normalization: Normalization::IMAGENET,
        }
    }
}

/// Per-stage time totals.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimes {
    /// Reading and decoding frames.
    pub decode: Duration,
    /// RGB8 -> normalized input tensor.
    pub preprocess: Duration,
    /// The model in tract.
    pub model: Duration,
    /// Clustering, segments, decoding, NMS, tracking.
    pub postprocess: Duration,
    /// JSON lines, link frames and overlays.
    pub output: Duration,
}

impl StageTimes {
    /// Adds `other` stage by stage.
    pub fn add(&mut self, other: &Self) {
        self.decode += other.decode;
        self.preprocess += other.preprocess;
        self.model += other.model;
        self.postprocess += other.postprocess;
        self.output += other.output;
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DetectSummary {
    /// Frames processed.
    pub frames: usize,
    /// Time per stage, summed over frames.
    pub times: StageTimes,
    /// Wall time of the whole loop.
    pub wall: Duration,
    /// Detections after NMS, summed over frames.
    pub detections: usize,
    /// Distinct confirmed track ids seen.
    pub tracks: usize,
    /// Segments, summed over frames.
    pub segments: usize,
    /// Frames the source could not read.
    pub skipped: usize,
    /// Model input `[1, 3, H, W]`.
    pub input_shape: [usize; 4],
    /// Model outputs.
    pub outputs: Vec<String>,
}

impl DetectSummary {
    /// A human summary with frames/s overall and per stage (ms per frame).
    pub fn render(&self) -> String {
        let n = self.frames.max(1) as f64;
        let ms = |d: Duration| d.as_secs_f64() * 1e3 / n;
        let fps = self.frames as f64 / self.wall.as_secs_f64().max(1e-9);
        format!(
            "{} frames in {:.2} s ({} unreadable, skipped): {:.1} frames/s end to end\n  per frame: decode {:.2} ms, preprocess {:.2} ms, model {:.2} ms, post-process {:.3} ms, output {:.2} ms\n  {} detections, {} confirmed tracks, {} segments (mean {:.1}/frame); model input {:?}, outputs {:?}",
            self.frames,
            self.wall.as_secs_f64(),
            self.skipped,
            fps,
            ms(self.times.decode),
            ms(self.times.preprocess),
            ms(self.times.model),
            ms(self.times.postprocess),
            ms(self.times.output),
            self.detections,
            self.tracks,
            self.segments,
            self.segments as f64 / n,
            self.input_shape,
            self.outputs
        )
    }
}

/// The colour of label `label` (a cluster or a track): golden-ratio hues at saturation 0.85
/// and value 0.95, so that neighbouring ids get distant colours.
pub fn palette(label: u32) -> [u8; 3] {
    let h = (label as f32 * 0.618_034).fract();
    let (s, v) = (0.85f32, 0.95f32);
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    let (r, g, b) = match i as i32 % 6 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    };
    [(r * 255.0) as u8, (g * 255.0) as u8, (b * 255.0) as u8]
}

/// Blends each pixel with the [`palette`] colour of its patch's label (`alpha` of the colour):
/// the `gh x gw` label grid (row-major) stretched over the image, nearest patch.
pub fn tint_labels(img: &mut RgbImage, labels: &[u32], gh: usize, gw: usize, alpha: f32) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if gh == 0 || gw == 0 {
        return;
    }
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (gx, gy) =
            ((x as usize * gw / w.max(1)).min(gw - 1), (y as usize * gh / h.max(1)).min(gh - 1));
        let c = palette(labels.get(gy * gw + gx).copied().unwrap_or(0));
        for k in 0..3 {
            p[k] = (f32::from(p[k]) * (1.0 - alpha) + f32::from(c[k]) * alpha) as u8;
        }
    }
}

fn draw_rect(img: &mut RgbImage, b: [f32; 4], color: [u8; 3]) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let c = |v: f32, hi: i64| (v.round() as i64).clamp(0, hi - 1);
    let (x0, y0, x1, y1) = (c(b[0], w), c(b[1], h), c(b[2], w), c(b[3], h));
    for t in 0..2 {
        for x in x0..=x1 {
            for y in [(y0 + t).min(h - 1), (y1 - t).max(0)] {
                img.put_pixel(x as u32, y as u32, Rgb(color));
            }
        }
        for y in y0..=y1 {
            for x in [(x0 + t).min(w - 1), (x1 - t).max(0)] {
                img.put_pixel(x as u32, y as u32, Rgb(color));
            }
        }
    }
}

/// Frame with the cluster map blended in (45 %) and the tracked boxes drawn.
fn overlay(
    frame: &RgbImage,
    labels: &[u32],
    gh: usize,
    gw: usize,
    boxes: &[([f32; 4], u32)],
) -> RgbImage {
    let mut img = frame.clone();
    tint_labels(&mut img, labels, gh, gw, 0.45);
    for &(b, id) in boxes {
        draw_rect(&mut img, b, if id == 0 { [255, 255, 0] } else { palette(id ^ 0x5555) });
    }
    img
}

/// A box in frame pixels: a detection (`track_id` 0) or a confirmed track.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FrameBox {
    /// `[x0, y0, x1, y1]` in frame pixels.
    pub bbox: [f32; 4],
    /// Class index of the detection head.
    pub class: u16,
    /// Detection score (tracks: the score of their last detection).
    pub score: f32,
    /// Track id, 0 for an untracked detection.
    pub track_id: u32,
}

/// What [`Detector::process`] found in one frame, in frame pixels.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FrameResult {
    /// Frame `[width, height]`.
    pub size: [u32; 2],
    /// Detections after NMS (empty without a detection head).
    pub detections: Vec<FrameBox>,
    /// Tracks updated by this frame (confirmed ones have a non-zero id).
    pub tracks: Vec<FrameBox>,
    /// Connected regions of one cluster label; `bbox` mapped to frame pixels.
    pub segments: Vec<Segment>,
    /// Clusters used for the labels.
    pub clusters: usize,
    /// More segments than the capacity: the list is incomplete.
    pub segments_overflowed: bool,
    /// RGB8 -> input tensor.
    pub preprocess: Duration,
    /// The model in tract.
    pub model: Duration,
    /// Clustering, segments, decoding, NMS, tracking.
    pub postprocess: Duration,
}

/// Scratch memory of a [`Detector`]'s post-process, sized from the model when it loads
/// (the post-process itself never allocates).
#[derive(Debug, Default)]
pub struct DetectorScratch {
    f32s: Vec<f32>,
    u32s: Vec<u32>,
}

/// The companion computer's per-frame pipeline as a library: an RGB frame of any size in;
/// detections, tracks, segments and the cluster map out. One reused tract plan and one
/// post-process state (the tracker) across frames. [`run_detect`] is this plus frame
/// reading, JSON lines and overlays.
///
/// ```no_run
/// # use flsl_runtime::detect::{DetectOptions, Detector, DetectorScratch};
/// let mut scratch = DetectorScratch::default();
/// let mut detector = Detector::new(&DetectOptions::new("model.onnx".into()), &mut scratch)?;
/// let frame = image::open("frame.png").unwrap().to_rgb8();
/// for t in detector.process(&frame)?.tracks {
///     println!("track {} at {:?}", t.track_id, t.bbox);
/// }
/// # Ok::<(), flsl_runtime::ModelError>(())
/// ```
pub struct Detector<'s> {
    model: OnnxModel,
    post: Perception<'s, SEGMENTS, DETECTIONS, TRACKS>,
    head: Option<HeadDims>,
    input: [usize; 2],
    grid: [usize; 2],
    outputs: Vec<String>,
}

fn no_outputs() -> ModelError {
    ModelError::Mismatch { what: "model outputs", expected: "features".into(), got: "none".into() }
}

impl<'s> Detector<'s> {
    /// Loads `opts.model`, probes its outputs (features, optional prototype logits and
    /// detection head) and sizes the post-process for them in `scratch`.
    pub fn new(opts: &DetectOptions, scratch: &'s mut DetectorScratch) -> Result<Self, ModelError> {
        let mut mopts = ModelOptions { normalization: opts.normalization, ..ModelOptions::new() }
            .with_threads(opts.threads);
        if let Some((h, w)) = opts.input_size {
            mopts = mopts.with_input_size(h, w);
        }
        let mut model = OnnxModel::load(&opts.model, mopts)?;
        let [_, _, ih, iw] = model.input_shape();
        let outputs = model.output_names().to_vec();
        // One dry run gives the output shapes.
        model.input_mut()?.fill(0.0);
        model.run()?;
        let o = model.outputs().ok_or_else(no_outputs)?;
        let (n, d) = (o.features.tokens(), o.features.channels());
        let k = o.logits.map_or(0, |l| l.channels());
        // The patch grid: the aspect of the input decides gh x gw.
        let patch = ((ih * iw) as f64 / n.max(1) as f64).sqrt().round().max(1.0) as usize;
        let (gh, gw) = (ih / patch, iw / patch);
        if gh * gw != n {
            return Err(ModelError::Mismatch {
                what: "token grid",
                expected: format!("{n} tokens for a {ih}x{iw} input"),
                got: format!("{gh}x{gw} patches of {patch} px"),
            });
        }
        let head = match (model.output_f32(HEATMAP_NAME), model.output_f32(BOXES_NAME)) {
            (Some((hs, _)), Some(_)) if hs.len() == 4 => {
                let stride = opts.det_stride.unwrap_or(ih as f32 / hs[2] as f32);
                Some(HeadDims::new(hs[1], hs[2], hs[3], stride))
            }
            _ => None,
        };
        let dims = PerceptionDims { gh, gw, d, k, patch_px: patch as f32, head };
        let mut config =
            PerceptionConfig { score_threshold: opts.score_threshold, ..PerceptionConfig::DEFAULT };
        if !opts.meanshift {
            config.meanshift = None;
        }
        config.kmeans.k = opts.kmeans_k.max(1);
        let sizes = Perception::<SEGMENTS, DETECTIONS, TRACKS>::scratch_sizes(&dims, &config)
            .map_err(|e| ModelError::Mismatch {
                what: "post-process dims",
                expected: "valid".into(),
                got: format!("{e:?}"),
            })?;
        let DetectorScratch { f32s, u32s } = scratch;
        f32s.clear();
        f32s.resize(sizes.f32s, 0.0);
        u32s.clear();
        u32s.resize(sizes.u32s, 0);
        let post = Perception::<SEGMENTS, DETECTIONS, TRACKS>::new(dims, config, f32s, u32s)
            .map_err(|e| ModelError::Mismatch {
                what: "post-process",
                expected: "valid settings".into(),
                got: format!("{e:?}"),
            })?;
        Ok(Self { model, post, head, input: [ih, iw], grid: [gh, gw], outputs })
    }

    /// Runs one frame: preprocess (resize without cropping), model, post-process.
    pub fn process(&mut self, img: &RgbImage) -> Result<FrameResult, ModelError> {
        self.process_rgb8(img.as_raw(), img.width(), img.height())
    }

    /// [`Self::process`] on packed RGB8 pixels (`width * height * 3` bytes).
    pub fn process_rgb8(
        &mut self,
        rgb: &[u8],
        width: u32,
        height: u32,
    ) -> Result<FrameResult, ModelError> {
        let [ih, iw] = self.input;
        let t1 = Instant::now();
        let frame = Rgb8Frame::new(rgb, width as usize, height as usize)?;
        let norm = self.model.options().normalization;
        preprocess_rgb8(&frame, &norm, self.model.input_mut()?, ih, iw)?;
        let t2 = Instant::now();
        self.model.run()?;
        let t3 = Instant::now();
        let o = self.model.outputs().ok_or_else(no_outputs)?;
        let labels = match o.logits {
            Some(l) => LabelSource::Logits(l.as_slice()),
            None => LabelSource::KMeans,
        };
        let det = match (
            self.head,
            self.model.output_f32(HEATMAP_NAME),
            self.model.output_f32(BOXES_NAME),
        ) {
            (Some(_), Some((_, h)), Some((_, b))) => Some((h, b)),
            _ => None,
        };
        let report = self
            .post
            .process_frame(&crate::perception::FrameInput {
                features: o.features.as_slice(),
                labels,
                detections: det,
            })
            .map_err(|e| ModelError::Mismatch {
                what: "post-process",
                expected: "model outputs of the probed shapes".into(),
                got: format!("{e:?}"),
            })?;
        let t4 = Instant::now();

        let map = BoxMap::stretch(iw as u32, ih as u32, width, height);
        let tracks = self
            .post
            .tracker()
            .tracks()
            .filter(|t| t.misses == 0)
            .map(|t| FrameBox {
                bbox: map.apply(t.bbox),
                class: t.class,
                score: t.score,
                track_id: t.id,
            })
            .collect();
        let detections = self
            .post
            .detections()
            .iter()
            .map(|d| FrameBox {
                bbox: map.apply(d.bbox),
                class: d.class,
                score: d.score,
                track_id: 0,
            })
            .collect();
        let segments = self
            .post
            .segments()
            .iter()
            .map(|s| Segment { bbox: map.apply(s.bbox), ..*s })
            .collect();
        Ok(FrameResult {
            size: [width, height],
            detections,
            tracks,
            segments,
            clusters: report.clusters,
            segments_overflowed: report.segments.overflowed(),
            preprocess: t2 - t1,
            model: t3 - t2,
            postprocess: t4 - t3,
        })
    }

    /// The cluster label of each patch of the last frame, row-major over [`Self::grid`].
    pub fn labels(&self) -> &[u32] {
        self.post.labels()
    }

    /// The patch grid `[rows, columns]`.
    pub fn grid(&self) -> [usize; 2] {
        self.grid
    }

    /// Whether the model has a detection head (`det_heatmap` + `det_boxes`).
    pub fn has_head(&self) -> bool {
        self.head.is_some()
    }

    /// The model input `[1, 3, H, W]`.
    pub fn input_shape(&self) -> [usize; 4] {
        self.model.input_shape()
    }

    /// The model's output names.
    pub fn output_names(&self) -> &[String] {
        &self.outputs
    }
}

/// Runs detection on every frame of `input` (a folder of images or a video file), writing one
/// JSON object per frame to `out` ([`frame_record`]) and optional overlays: the onboard frame
/// loop ([`run_loop`]) with every frame processed. Unreadable frames are skipped, counted and
/// logged.
pub fn run_detect(
    opts: &DetectOptions,
    input: &Path,
    out: &mut dyn Write,
    mut on_frame: impl FnMut(usize),
) -> Result<DetectSummary, OnboardError> {
    let mut scratch = DetectorScratch::default();
    let mut detector = Detector::new(opts, &mut scratch)?;
    if let Some(dir) = &opts.overlays {
        std::fs::create_dir_all(dir).map_err(|e| OnboardError::Io {
            action: "creating",
            path: dir.clone(),
            source: e,
        })?;
    }
    let input_name = input.display().to_string();
    let src = source::open(&input_name, None)?;
    let mut summary = DetectSummary {
        input_shape: detector.input_shape(),
        outputs: detector.output_names().to_vec(),
        ..Default::default()
    };
    let mut ids = std::collections::BTreeSet::new();
    let lopts = LoopOptions {
        policy: FramePolicy::All,
        max_frames: opts.max_frames.map(|m| m as u64),
        stats_every: 0,
    };
    let looped = run_loop(
        src,
        &lopts,
        &AtomicBool::new(false),
        |frame| {
            let r = detector.process_rgb8(&frame.data, frame.width, frame.height)?;
            let t4 = Instant::now();
            ids.extend(r.tracks.iter().filter(|t| t.track_id != 0).map(|t| t.track_id));
            let line = frame_record(summary.frames as u64, &frame.name, &r, frame.decode);
            writeln!(out, "{line}")
                .map_err(|e| OnboardError::Output { what: "JSON lines".into(), source: e })?;
            if let Some(dir) = &opts.overlays {
                let boxes: Vec<([f32; 4], u32)> = if detector.has_head() {
                    if r.tracks.is_empty() {
                        r.detections.iter().map(|d| (d.bbox, 0)).collect()
                    } else {
                        r.tracks.iter().map(|t| (t.bbox, t.track_id)).collect()
                    }
                } else {
                    Vec::new()
                };
                let [gh, gw] = detector.grid();
                let file = dir.join(format!("{:06}.png", summary.frames));
                let img = frame.to_image().ok_or_else(|| OnboardError::Source {
                    input: frame.name.clone(),
                    reason: "frame buffer size does not match its dimensions".into(),
                })?;
                overlay(&img, detector.labels(), gh, gw, &boxes).save(&file).map_err(|e| {
                    OnboardError::Output {
                        what: format!("overlay {}", file.display()),
                        source: std::io::Error::other(e),
                    }
                })?;
            }
            summary.detections += r.detections.len();
            summary.segments += r.segments.len();
            summary.frames += 1;
            on_frame(summary.frames);
            Ok(StageTimes {
                decode: Duration::ZERO,
                preprocess: r.preprocess,
                model: r.model,
                postprocess: r.postprocess,
                output: t4.elapsed(),
            })
        },
        |_| {},
    )?;
    for reason in &looped.skip_reasons {
        tracing::warn!("skipped: {reason}");
    }
    summary.times = looped.times;
    summary.wall = looped.wall;
    summary.skipped = looped.skipped as usize;
    summary.tracks = ids.len();
    if summary.frames == 0 {
        return Err(OnboardError::Source {
            input: input_name,
            reason: format!("no frame could be read ({} skipped)", looped.skipped),
        });
    }
    Ok(summary)
}

fn helper_err(action: String, e: std::io::Error) -> ModelError {
    ModelError::Helper { action, source: e }
}

/// Reads JSON lines written by [`run_detect`] (for tests and tools).
pub fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>, ModelError> {
    let f = std::fs::File::open(path)
        .map_err(|e| helper_err(format!("opening {}", path.display()), e))?;
    std::io::BufReader::new(f)
        .lines()
        .map(|l| {
            let l = l.map_err(|e| helper_err(format!("reading {}", path.display()), e))?;
            serde_json::from_str(&l).map_err(|e| {
                helper_err(format!("parsing {}", path.display()), std::io::Error::other(e))
            })
        })
        .collect()
}
