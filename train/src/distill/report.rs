//! The report of a distillation run (`report.md` + `report.json` in the run folder): how much
//! of the teacher the student kept on held-out images, and what it costs to run each.
//!
//! - **prototype agreement**: the share of student tokens whose prototype (argmax of the
//!   head on the features, the exported model's `prototype_logits`) is the teacher's for the
//!   same region (the teacher's logits averaged over the region's tokens, as in training);
//! - **cluster-map mIoU**: the prototype maps of student and teacher against each other,
//!   intersection over union per prototype summed over all images, averaged over the
//!   prototypes either map uses;
//! - **feature cosine**: mean `cos(P x_s, x_t)` with the learned projection `P` (only when the
//!   run has the feature term);
//! - each for the distilled student and for the same student untrained (its initialisation
//!   under the run's seed): the baseline that says what the distillation added;
//! - **latency**: both exports (`flsl export` with the head) in tract at 1 thread, fp32 and
//!   int8 (`flsl quantize`, QDQ, calibrated on the training images), timed interleaved.

use std::path::{Path, PathBuf};

use burn::tensor::{Tensor, TensorData, backend::Backend};
use image::{RgbImage, imageops};
use serde::Serialize;

use super::{DistillTeacher, HeadInput};
use crate::augment::normalize;
use crate::error::{Error, Result};
use crate::model::FlslModel;
use crate::model::layers::l2_normalize;

/// Student against teacher on a set of images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Agreement {
    /// Student tokens compared.
    pub tokens: usize,
    /// Share of tokens with the teacher's prototype.
    pub agreement: f64,
    /// Mean IoU of the two prototype maps over the prototypes either uses.
    pub miou: f64,
    /// Prototypes the student's maps use.
    pub student_prototypes: usize,
    /// Prototypes the teacher's maps use.
    pub teacher_prototypes: usize,
    /// Mean cosine of the projected student features and the teacher's (`None`: no
    /// projection).
    pub feature_cosine: Option<f64>,
}

/// Decodes `paths` (an unreadable file is an error naming it).
pub fn load_images(paths: &[PathBuf]) -> Result<Vec<RgbImage>> {
    paths
        .iter()
        .map(|p| {
            flsl_runtime::preprocess::decode_image_file(p)
                .map(|i| i.to_rgb8())
                .map_err(|e| Error::malformed("image", p, e.to_string()))
        })
        .collect()
}

/// Compares `student` with `teacher` on `images`, each resized to `side x side` (a multiple of
/// the student's patch).
pub fn compare<B: Backend>(
    student: &FlslModel<B>,
    teacher: &DistillTeacher<B>,
    images: &[RgbImage],
    side: usize,
    device: &B::Device,
) -> Result<Agreement> {
    let k = teacher.model.head.out_dim();
    let (mut inter, mut union) = (vec![0u64; k], vec![0u64; k]);
    let (mut used_s, mut used_t) = (vec![false; k], vec![false; k]);
    let (mut same, mut tokens, mut cos_sum) = (0usize, 0usize, 0f64);
    for img in images {
        let resized =
            imageops::resize(img, side as u32, side as u32, imageops::FilterType::Triangle);
        let x = Tensor::<B, 4>::from_data(
            TensorData::new(normalize(&resized), [1, 3, side, side]),
            device,
        );
        let t = teacher.targets(x.clone(), student.backbone.patch_size(), HeadInput::Features)?;
        let feats = student.backbone.forward(x); // [1, N, D_s]
        let labels = |logits: Tensor<B, 3>| -> Vec<usize> {
            logits
                .argmax(2)
                .into_data()
                .convert::<i64>()
                .to_vec::<i64>()
                .unwrap_or_default()
                .into_iter()
                .map(|v| (v.max(0) as usize).min(k - 1))
                .collect()
        };
        let ls = labels(student.head.forward(feats.clone()));
        let lt = labels(t.logits);
        if ls.len() != lt.len() {
            return Err(Error::Shape {
                op: "distill report",
                reason: format!("student {} tokens, teacher's aligned map {}", ls.len(), lt.len()),
            });
        }
        for (&s, &t) in ls.iter().zip(&lt) {
            used_s[s] = true;
            used_t[t] = true;
            if s == t {
                same += 1;
                inter[s] += 1;
                union[s] += 1;
            } else {
                union[s] += 1;
                union[t] += 1;
            }
        }
        tokens += ls.len();
        if let Some(proj) = &student.distill_proj {
            let cos = (l2_normalize(proj.forward(feats), 1e-12) * l2_normalize(t.features, 1e-12))
                .sum_dim(2)
                .sum()
                .into_scalar();
            cos_sum += burn::tensor::ElementConversion::elem::<f64>(cos);
        }
    }
    let ious: Vec<f64> =
        (0..k).filter(|&p| union[p] > 0).map(|p| inter[p] as f64 / union[p] as f64).collect();
    Ok(Agreement {
        tokens,
        agreement: same as f64 / tokens.max(1) as f64,
        miou: ious.iter().sum::<f64>() / ious.len().max(1) as f64,
        student_prototypes: used_s.iter().filter(|u| **u).count(),
        teacher_prototypes: used_t.iter().filter(|u| **u).count(),
        feature_cosine: student.distill_proj.as_ref().map(|_| cos_sum / tokens.max(1) as f64),
    })
}

/// One model's latency at 1 thread.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCost {
    /// `teacher` or `student`.
    pub model: String,
    /// Parameters of the backbone and head.
    pub parameters: usize,
    /// fp32 median ms per frame at 1 thread (tract).
    pub fp32_ms: f64,
    /// int8 median ms per frame at 1 thread (tract, QDQ).
    pub int8_ms: f64,
    /// The exported fp32 file.
    pub onnx: PathBuf,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct DistillReport {
    /// The teacher's weights file.
    pub teacher: PathBuf,
    /// One line each: architecture of teacher and student.
    pub teacher_arch: String,
    /// Architecture of the student.
    pub student_arch: String,
    /// Steps the run has done in all.
    pub steps: usize,
    /// Steps this invocation trained (fewer than `steps` after a resume).
    pub steps_now: usize,
    /// Training wall time of this invocation, seconds.
    pub train_seconds: f64,
    /// Held-out images compared.
    pub images: Vec<PathBuf>,
    /// Side the images were resized to.
    pub side: usize,
    /// The distilled student (the EMA student that `flsl export` writes).
    pub distilled: Agreement,
    /// The same student at its initialisation.
    pub untrained: Agreement,
    /// Latency of both exports (`None`: skipped).
    pub latency: Option<Vec<ModelCost>>,
    /// The machine (CPU model), for the latency figures.
    pub machine: String,
}

/// The CPU model name (`/proc/cpuinfo`), for the report's latency figures.
pub fn machine() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
        + &format!(", {} logical CPUs", std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Exports `checkpoint` with its head at `side x side`, quantizes it (QDQ, calibrated on
/// `calib`), and times fp32 and int8 at 1 thread.
pub fn model_cost(
    name: &str,
    checkpoint: &Path,
    calib: &Path,
    out_dir: &Path,
    side: usize,
    parameters: usize,
) -> Result<ModelCost> {
    use flsl_runtime::quantize::{BenchOptions, QuantizeOptions, quantize_file};
    let onnx = out_dir.join(format!("{name}.onnx"));
    let opts =
        crate::export::ExportOptions { size: (side, side), with_head: true, ..Default::default() };
    crate::export::export_checkpoint(checkpoint, &onnx, &opts)?;
    let int8 = out_dir.join(format!("{name}.int8.onnx"));
    let q = QuantizeOptions {
        calib_images: 16,
        heldout_images: 0,
        bench: Some(BenchOptions { threads: vec![1], iters: 20, warmup: 3, onnxruntime: false }),
        ..QuantizeOptions::default()
    };
    let report = quantize_file(&onnx, calib, &int8, &q, &mut |_| {})
        .map_err(|e| Error::runtime(format!("quantizing `{}`", onnx.display()), e))?;
    let ms = |model: &str| {
        report
            .latency
            .iter()
            .find(|l| l.model == model && l.threads == 1 && l.runtime == "tract")
            .map_or(f64::NAN, |l| l.median_ms)
    };
    Ok(ModelCost { model: name.into(), parameters, fp32_ms: ms("fp32"), int8_ms: ms("int8"), onnx })
}

/// The Markdown form.
pub fn render_markdown(r: &DistillReport) -> String {
    let pct = |v: f64| format!("{:.1} %", 100.0 * v);
    let cos = |a: &Agreement| a.feature_cosine.map_or("-".into(), |c| format!("{c:.3}"));
    let mut s = format!(
        "# Distillation report\n\nTeacher `{}`: {}.\nStudent: {}.\n{} steps ({} in this invocation, {:.0} s).\n\n\
         ## Student against teacher on {} held-out images ({}x{} pixels, {} student tokens)\n\n\
         | | prototype agreement | cluster-map mIoU | feature cosine (projected) | prototypes used (student / teacher) |\n|---|---|---|---|---|\n",
        r.teacher.display(),
        r.teacher_arch,
        r.student_arch,
        r.steps,
        r.steps_now,
        r.train_seconds,
        r.images.len(),
        r.side,
        r.side,
        r.distilled.tokens,
    );
    for (name, a) in
        [("distilled student", &r.distilled), ("same student, untrained", &r.untrained)]
    {
        s += &format!(
            "| {name} | {} | {} | {} | {} / {} |\n",
            pct(a.agreement),
            pct(a.miou),
            cos(a),
            a.student_prototypes,
            a.teacher_prototypes
        );
    }
    s += "\nAgreement: the share of student tokens whose prototype (argmax of `prototype_logits`) \
          is the teacher's for the same image region. mIoU: the two prototype maps against each \
          other, per prototype over all images.\n";
    if let Some(lat) = &r.latency {
        s += &format!(
            "\n## Cost at 1 thread (tract, {}x{} input, median of 20 runs)\n\nMachine: {}.\n\n\
             | model | parameters | fp32 ms | int8 ms |\n|---|---|---|---|\n",
            r.side, r.side, r.machine
        );
        for c in lat {
            s += &format!(
                "| {} | {:.2} M | {:.2} | {:.2} |\n",
                c.model,
                c.parameters as f64 / 1e6,
                c.fp32_ms,
                c.int8_ms
            );
        }
    }
    s
}
