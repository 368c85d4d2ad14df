//! Calibration: image folders, a tract run that exposes the tensors to measure, and range
//! statistics (min/max, percentile, MSE-optimal clipping).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use prost::Message;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::SimplePlan;
use tract_onnx::tract_hir::internal::InferenceModelExt;

use super::{Calibration, QuantizeError};
use crate::preprocess::{Normalization, Rgb8Frame, preprocess_rgb8};

/// Histogram bins per tensor for percentile and MSE calibration.
const BINS: usize = 2048;

/// Image files (png, jpg, jpeg; any case) directly in `dir`, sorted by name.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>, QuantizeError> {
    let entries = std::fs::read_dir(dir).map_err(|source| QuantizeError::Io {
        action: "reading the image folder",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files = Vec::new();
    for e in entries {
        let e = e.map_err(|source| QuantizeError::Io {
            action: "listing the image folder",
            path: dir.to_path_buf(),
            source,
        })?;
        let p = e.path();
        let ext = p.extension().and_then(|x| x.to_str()).map(str::to_ascii_lowercase);
        if matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(QuantizeError::Calibration {
            dir: dir.to_path_buf(),
            reason: "no .png/.jpg/.jpeg images in the folder".into(),
        });
    }
    Ok(files)
}

/// Decodes `path` and preprocesses it exactly as [`OnnxModel::run_rgb8`]
/// (crate::onnx::OnnxModel::run_rgb8) does, into a `[3, h, w]` buffer.
pub fn load_image(
    path: &Path,
    h: usize,
    w: usize,
    norm: &Normalization,
) -> Result<Vec<f32>, QuantizeError> {
    let img = crate::preprocess::decode_image_file(path)
        .map_err(|source| QuantizeError::Image { path: path.to_path_buf(), source })?
        .to_rgb8();
    let (iw, ih) = img.dimensions();
    let frame = Rgb8Frame::new(img.as_raw(), iw as usize, ih as usize)?;
    let mut out = vec![0.0; 3 * h * w];
    preprocess_rgb8(&frame, norm, &mut out, h, w)?;
    Ok(out)
}

/// The fp32 model with the calibrated tensors as extra outputs, optimized in tract.
pub(crate) struct Probe {
    plan: Arc<TypedSimplePlan>,
    shape: [usize; 4],
}

impl Probe {
    pub fn new(model: &ModelProto, shape: [usize; 4]) -> Result<Self, QuantizeError> {
        let tract_err = |what: &str| {
            let what = what.to_string();
            move |source| QuantizeError::Tract { what, source }
        };
        let bytes = model.encode_to_vec();
        let mut m = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .map_err(tract_err("loading the calibration model"))?;
        m.set_input_fact(0, f32::fact(shape).into())
            .map_err(tract_err("fixing the calibration model's input"))?;
        let typed = m.into_optimized().map_err(tract_err("optimizing the calibration model"))?;
        let plan = SimplePlan::new(typed).map_err(tract_err("planning the calibration model"))?;
        Ok(Self { plan, shape })
    }

    /// Runs one preprocessed image; calls `f(i, values)` for the i-th graph output.
    pub fn run(
        &self,
        input: Vec<f32>,
        mut f: impl FnMut(usize, &[f32]),
    ) -> Result<(), QuantizeError> {
        let t = Tensor::from_shape(&self.shape, &input).map_err(|source| QuantizeError::Tract {
            what: "building the calibration input".into(),
            source,
        })?;
        let outs = self.plan.run(tvec!(t.into_tvalue())).map_err(|source| {
            QuantizeError::Tract { what: "running the calibration model".into(), source }
        })?;
        for (i, o) in outs.iter().enumerate() {
            let v = o.as_plain_ram().and_then(|t| t.as_slice::<f32>().ok()).ok_or_else(|| {
                QuantizeError::Tract {
                    what: format!("reading calibration output #{i}"),
                    source: TractError::msg("not a plain f32 tensor"),
                }
            })?;
            f(i, v);
        }
        Ok(())
    }
}

/// Range statistics of one tensor.
#[derive(Debug, Clone)]
pub(crate) struct Stats {
    pub min: f32,
    pub max: f32,
    hist: Vec<u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Self { min: f32::INFINITY, max: f32::NEG_INFINITY, hist: Vec::new() }
    }
}

impl Stats {
    pub fn observe_range(&mut self, v: &[f32]) {
        for x in v.iter().filter(|x| x.is_finite()) {
            self.min = self.min.min(*x);
            self.max = self.max.max(*x);
        }
    }

    fn bin_width(&self) -> f32 {
        ((self.max - self.min) / BINS as f32).max(f32::MIN_POSITIVE)
    }

    pub fn observe_hist(&mut self, v: &[f32]) {
        if self.hist.is_empty() {
            self.hist = vec![0; BINS];
        }
        let w = self.bin_width();
        for x in v.iter().filter(|x| x.is_finite()) {
            let b = (((x - self.min) / w) as usize).min(BINS - 1);
            self.hist[b] += 1;
        }
    }

    /// The value below which a fraction `q` of the observed values lie (bin edge).
    fn quantile(&self, q: f64) -> f32 {
        let total: u64 = self.hist.iter().sum();
        let target = (q * total as f64).ceil() as u64;
        let mut acc = 0;
        for (i, c) in self.hist.iter().enumerate() {
            acc += c;
            if acc >= target.max(1) {
                return self.min + (i + 1) as f32 * self.bin_width();
            }
        }
        self.max
    }

    fn quantile_low(&self, q: f64) -> f32 {
        let total: u64 = self.hist.iter().sum();
        let target = (q * total as f64).floor() as u64;
        let mut acc = 0;
        for (i, c) in self.hist.iter().enumerate() {
            if acc + c > target {
                return self.min + i as f32 * self.bin_width();
            }
            acc += c;
        }
        self.min
    }

    /// Expected squared error of 8-bit quantization clipped to `[lo, hi]` over the histogram.
    fn mse(&self, lo: f32, hi: f32) -> f64 {
        let step = f64::from((hi - lo) / 255.0);
        let round = step * step / 12.0;
        let w = self.bin_width();
        self.hist
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let x = self.min + (i as f32 + 0.5) * w;
                let e = if x < lo {
                    f64::from(lo - x).powi(2)
                } else if x > hi {
                    f64::from(x - hi).powi(2)
                } else {
                    round
                };
                e * *c as f64
            })
            .sum()
    }

    /// The range to quantize to under `method` (histogram filled unless min/max).
    pub fn range(&self, method: Calibration) -> (f32, f32) {
        if !self.min.is_finite() || !self.max.is_finite() {
            return (0.0, 0.0);
        }
        match method {
            Calibration::MinMax => (self.min, self.max),
            Calibration::Percentile(p) => {
                let q = f64::from(p.clamp(50.0, 100.0)) / 100.0;
                (self.quantile_low(1.0 - q), self.quantile(q))
            }
            Calibration::Mse => {
                let mut best = (self.mse(self.min, self.max), self.min, self.max);
                // Clip both tails at matching quantiles, and shrink the range towards 0.
                for q in [1e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2] {
                    let (lo, hi) = (self.quantile_low(q), self.quantile(1.0 - q));
                    let e = self.mse(lo, hi);
                    if e < best.0 {
                        best = (e, lo, hi);
                    }
                }
                for k in 1..=40 {
                    let f = 1.0 - k as f32 * 0.02;
                    let (lo, hi) = (self.min * f, self.max * f);
                    let e = self.mse(lo, hi);
                    if e < best.0 {
                        best = (e, lo, hi);
                    }
                }
                (best.1, best.2)
            }
        }
    }
}

/// Measured ranges of `names` over `images` (preprocessed for `shape`).
/// `outputs[i]` is the graph-output index of tensor `i`.
pub(crate) fn calibrate(
    probe: &Probe,
    outputs: &[usize],
    images: &[PathBuf],
    norm: &Normalization,
    method: Calibration,
    progress: &mut dyn FnMut(super::Progress),
) -> Result<Vec<(f32, f32)>, QuantizeError> {
    let [_, _, h, w] = probe.shape;
    let mut stats = vec![Stats::default(); outputs.len()];
    let passes = if method == Calibration::MinMax { 1 } else { 2 };
    for pass in 0..passes {
        for (i, path) in images.iter().enumerate() {
            progress(super::Progress {
                stage: if pass == 0 {
                    super::Stage::CalibrationRanges
                } else {
                    super::Stage::CalibrationHistograms
                },
                done: i,
                total: images.len(),
            });
            let x = load_image(path, h, w, norm)?;
            probe.run(x, |o, v| {
                for (s, _) in stats.iter_mut().zip(outputs).filter(|(_, ix)| **ix == o) {
                    if pass == 0 {
                        s.observe_range(v);
                    } else {
                        s.observe_hist(v);
                    }
                }
            })?;
        }
    }
    Ok(stats.iter().map(|s| s.range(method)).collect())
}
