//! One FLSL training iteration (reference `main_flsl.train_one_batch` + the update of
//! `train_one_epoch`): teacher forward, student forward per group of equal-size views,
//! intra/inter mean shift, heads, loss, backward, per-parameter gradient clipping,
//! last-layer freeze, AdamW with the reference parameter groups, EMA teacher update.

use std::collections::BTreeMap;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{DType, ElementConversion, Tensor, backend::AutodiffBackend, backend::Backend};

use crate::distill::{DistillTeacher, HeadInput};
use crate::error::{Error, Result};
use crate::loss::{FlslLoss, LossTerms};
use crate::meanshift::{
    TokenSelection, meanshift, meanshift_mixed, repeat_views, select_tokens,
    sharpened_attention_map,
};
use crate::model::named::reference_name;
use crate::model::{FlslModel, Vit, cast_params};
use crate::multistage::PreviousStage;
use crate::parallel::{self, Peer};
use crate::tensors::{HostData, HostTensor, TensorMap};

/// One augmented view of a batch: `[bt, 3, H, W]` images and, for student views, the query
/// tokens of each image.
#[derive(Debug, Clone)]
pub struct View<B: Backend> {
    /// Images.
    pub images: Tensor<B, 4>,
    /// Query selection (`None` for the teacher view).
    pub mask: Option<TokenSelection>,
    /// The same crops before colour jitter, blur and solarisation (normalised only): the
    /// reference's `crops`, input of the previous-stage model in multi-stage training.
    pub crops: Option<Tensor<B, 4>>,
}

/// The per-iteration values of every schedule, plus the fixed optimiser settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepHyper {
    /// Global iteration (for error messages and logs).
    pub iteration: usize,
    /// Epoch (drives the teacher temperature and the last-layer freeze).
    pub epoch: usize,
    /// Learning rate at this iteration.
    pub lr: f64,
    /// Weight decay of the regularised group at this iteration.
    pub weight_decay: f64,
    /// EMA momentum of the teacher at this iteration.
    pub momentum: f64,
    /// Intra-view mean-shift temperature (a multiplier).
    pub sa_temp: f64,
    /// Inter-view mean-shift temperature (a multiplier).
    pub ca_temp: f64,
    /// Intra-view coefficient `ups` (overwrites `coefficients[0]`).
    pub ups: f64,
    /// Multi-stage: weight of the current attention against the previous-stage map in the
    /// inter-view mean shift (`mixture_schedule[it]`; 1 without a previous stage).
    pub mixture: f64,
    /// Per-parameter gradient clipping threshold (`None`/0 disables).
    pub clip_grad: Option<f64>,
    /// Epochs during which `last_layer` gets no update.
    pub freeze_last_layer: usize,
    /// Adam betas.
    pub betas: (f64, f64),
    /// Adam epsilon (PyTorch's 1e-8, not burn's 1e-5).
    pub eps: f64,
}

/// AdamW state by reference parameter name (flattened moments and the step count).
#[derive(Debug, Clone)]
pub struct AdamState<B: Backend> {
    /// `name -> (step, exp_avg, exp_avg_sq)`.
    pub slots: BTreeMap<String, (u64, Tensor<B, 1>, Tensor<B, 1>)>,
}

impl<B: Backend> Default for AdamState<B> {
    fn default() -> Self {
        Self { slots: BTreeMap::new() }
    }
}

impl<B: Backend> AdamState<B> {
    /// A copy on another device (data-parallel replicas).
    pub fn to_device(&self, device: &B::Device) -> Self {
        Self {
            slots: self
                .slots
                .iter()
                .map(|(k, (s, m, v))| {
                    (k.clone(), (*s, m.clone().to_device(device), v.clone().to_device(device)))
                })
                .collect(),
        }
    }

    /// To host tensors: `exp_avg.<name>`, `exp_avg_sq.<name>`, `step.<name>`.
    pub fn to_host(&self) -> TensorMap {
        let mut out = TensorMap::new();
        for (name, (step, m, v)) in &self.slots {
            out.insert(format!("exp_avg.{name}"), HostTensor::from_tensor(m.clone()));
            out.insert(format!("exp_avg_sq.{name}"), HostTensor::from_tensor(v.clone()));
            out.insert(
                format!("step.{name}"),
                HostTensor { shape: vec![1], data: HostData::I64(vec![*step as i64]) },
            );
        }
        out
    }

    /// From host tensors written by [`AdamState::to_host`].
    pub fn from_host(map: &TensorMap, device: &B::Device) -> Result<Self> {
        let mut slots = BTreeMap::new();
        for (k, step) in map {
            let Some(name) = k.strip_prefix("step.") else { continue };
            let get = |prefix: &str| {
                map.get(&format!("{prefix}.{name}")).ok_or_else(|| Error::MissingTensor {
                    name: format!("{prefix}.{name}"),
                    path: "optimizer state".into(),
                })
            };
            let m = get("exp_avg")?;
            let v = get("exp_avg_sq")?;
            let step = step.to_i64().first().copied().unwrap_or(0).max(0) as u64;
            slots.insert(
                name.to_string(),
                (step, m.to_device::<B, 1>(device), v.to_device::<B, 1>(device)),
            );
        }
        Ok(Self { slots })
    }
}

/// What one iteration measured.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// Loss terms before the update.
    pub loss: LossTerms,
    /// Gradient L2 norm of every parameter that had a gradient (before clipping), float32.
    pub grad_norms: Vec<(String, f64)>,
    /// Parameters whose gradient was scaled down.
    pub clipped: Vec<String>,
    /// The teacher's prototype assignment (argmax) of every loss row.
    pub teacher_assign: Vec<u32>,
}

/// Receives a step's intermediate tensors: the loss inputs (`loss_in_x`, `loss_in_mode`,
/// `loss_in_student_pred`, `loss_in_teacher_pred`, `enc_t`) and every gradient before clipping
/// (`grad_preclip.<reference name>`), as host tensors. Training passes none; the golden
/// checker (`flsl reference-check`) records them to compare with the reference.
pub trait StepTap {
    /// One named tensor.
    fn tensor(&mut self, name: &str, value: HostTensor);
}

impl StepTap for TensorMap {
    fn tensor(&mut self, name: &str, value: HostTensor) {
        self.insert(name.to_string(), value);
    }
}

/// Options of a step.
#[derive(Default)]
pub struct StepOptions<'t> {
    /// Where the intermediate tensors go, if anywhere (golden checks).
    pub tap: Option<&'t mut dyn StepTap>,
    /// Data-parallel replica: gradients and loss terms are averaged over all replicas
    /// ([`crate::parallel`]) before clipping and the update.
    pub peer: Option<Peer>,
    /// Half precision (the config's `use_fp16`): the student's and the EMA teacher's backbones
    /// run forward and backward in bfloat16 on copies of their parameters made by a
    /// differentiable cast ([`crate::model::cast_params`]); the parameters, their gradients,
    /// AdamW's state, the mean shift, the heads and the loss stay f32. bfloat16 has f32's
    /// exponent range, so no loss scaling is needed.
    pub half: bool,
}

/// The backbone's features `[B, N, C]` in f32: computed in bfloat16 when `half`.
fn backbone_features<B: Backend>(vit: &Vit<B>, images: Tensor<B, 4>, half: bool) -> Tensor<B, 3> {
    if !half {
        return vit.forward(images);
    }
    let vit = cast_params(vit.clone(), DType::BF16);
    vit.forward(images.cast(DType::BF16)).cast(DType::F32)
}

/// Splits student views into groups of consecutive equal widths (`unique_consecutive`).
pub fn view_groups(widths: &[usize]) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..=widths.len() {
        if i == widths.len() || widths[i] != widths[start] {
            out.push(start..i);
            start = i;
        }
    }
    out
}

/// Forward pass of one iteration up to the loss (shared by training and evaluation).
pub struct Forward<B: Backend> {
    /// Selected student tokens `[M, C]`.
    pub x: Tensor<B, 2>,
    /// Intra-view modes `[M, C]`.
    pub mode: Tensor<B, 2>,
    /// Student head on the intra-view modes `[M, K]`.
    pub student_pred: Tensor<B, 2>,
    /// Teacher head on the inter-view modes `[M, K]` (constant).
    pub teacher_pred: Tensor<B, 2>,
    /// Teacher features of the teacher view (`None` when distilling: the frozen teacher sees
    /// the student views instead).
    pub enc_t: Option<Tensor<B, 3>>,
    /// Distillation feature term inputs: the projected student tokens `P x` and the teacher's
    /// region features, both `[M, D_t]` (the latter constant). `None` without a projection.
    pub feature: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
}

fn plain_crops<B: AutodiffBackend>(views: &[View<B>]) -> Result<Tensor<B::InnerBackend, 4>> {
    let crops = views
        .iter()
        .map(|v| {
            v.crops.clone().ok_or(Error::Shape {
                op: "train_step",
                reason: "multi-stage training needs the views' plain crops (keep_crops)".into(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(crops, 0).inner())
}

/// The source of an iteration's k-means targets.
enum TeacherSide<'a, B: Backend> {
    /// The EMA teacher's features of the teacher view (pretraining).
    Ema(Tensor<B, 3>),
    /// A frozen teacher that sees each student view (distillation).
    Frozen(&'a DistillTeacher<B>),
}

/// Runs the teacher and the student on the views (`views[0]` is the teacher's); `prev` is the
/// previous-stage model and this iteration's attention mixture in multi-stage training
/// ([`crate::multistage`]), `None` otherwise. With `distill`, the frozen teacher gives the
/// targets of each student view itself ([`crate::distill`]) and `teacher` is not used.
#[allow(clippy::too_many_arguments)]
pub fn forward<B: AutodiffBackend>(
    student: &FlslModel<B>,
    teacher: &FlslModel<B::InnerBackend>,
    views: &[View<B>],
    sa_temp: f64,
    ca_temp: f64,
    prev: Option<(&PreviousStage<B::InnerBackend>, f64)>,
    distill: Option<&DistillTeacher<B::InnerBackend>>,
    half: bool,
) -> Result<Forward<B>> {
    let (teacher_view, student_views) =
        views.split_first().ok_or(Error::Shape { op: "train_step", reason: "no views".into() })?;
    if student_views.is_empty() {
        return Err(Error::Shape { op: "train_step", reason: "no student views".into() });
    }
    // Where the k-means targets come from: the EMA teacher's features of the teacher view
    // (`[bt, Nt, C]`, inter-view mean shift), or the frozen teacher on each student view.
    let side = match distill {
        Some(d) => TeacherSide::Frozen(d),
        None => TeacherSide::Ema(backbone_features(
            &teacher.backbone,
            teacher_view.images.clone().inner(),
            half,
        )),
    };
    // Previous stage: its features of the teacher's plain crop are the keys of its map.
    let prev_k = match prev {
        Some((p, _)) => Some(p.features(plain_crops(std::slice::from_ref(teacher_view))?)),
        None => None,
    };
    let widths: Vec<usize> = student_views.iter().map(|v| v.images.dims()[3]).collect();
    let (mut xs, mut modes, mut ps, mut pts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut projected, mut feat_targets) = (Vec::new(), Vec::new());
    for group in view_groups(&widths) {
        let vs = &student_views[group];
        let b = vs.len();
        let sels: Vec<&TokenSelection> = vs
            .iter()
            .map(|v| {
                v.mask.as_ref().ok_or(Error::Shape {
                    op: "train_step",
                    reason: "a student view has no mask".into(),
                })
            })
            .collect::<Result<_>>()?;
        let sel = TokenSelection::concat(&sels)?;
        let images = Tensor::cat(vs.iter().map(|v| v.images.clone()).collect(), 0);
        let plain_images = images.clone().inner();
        let enc_s = backbone_features(&student.backbone, images, half); // [b*bt, Ns, C]
        let [rows, ns, c] = enc_s.dims();
        if sel.batch() != rows || sel.tokens != ns {
            return Err(Error::Shape {
                op: "train_step",
                reason: format!(
                    "masks are [{}, {}] for features [{rows}, {ns}, {c}]",
                    sel.batch(),
                    sel.tokens
                ),
            });
        }
        let (x_sel, mode_s) = meanshift(enc_s.clone(), enc_s.clone(), &sel, sa_temp);
        let (pred_t, targets) = match &side {
            TeacherSide::Frozen(d) => {
                let t = d.targets(plain_images, student.backbone.patch_size(), HeadInput::Modes)?;
                if t.logits.dims()[1] != ns {
                    return Err(Error::Shape {
                        op: "distill",
                        reason: format!(
                            "the teacher's aligned grid has {} tokens, the student's {ns}",
                            t.logits.dims()[1]
                        ),
                    });
                }
                (select_tokens(t.logits.clone(), &sel), Some(t))
            }
            TeacherSide::Ema(enc_t) => {
                let tgt = repeat_views(enc_t.clone(), b);
                let mode_t = match (prev, &prev_k) {
                    (Some((p, mix)), Some(keys)) => {
                        let q = p.features(plain_crops(vs)?);
                        let a_prev = sharpened_attention_map(
                            q,
                            repeat_views(keys.clone(), b),
                            &sel,
                            p.temp,
                            p.sharpness,
                        );
                        meanshift_mixed(enc_s.inner(), tgt, &sel, ca_temp, a_prev, mix).1
                    }
                    _ => meanshift(enc_s.inner(), tgt, &sel, ca_temp).1,
                };
                (teacher.head.forward(mode_t), None)
            }
        };
        let m = sel.batch() * sel.per_row();
        if let (Some(t), Some(proj)) = (&targets, &student.distill_proj) {
            let dt = t.features.dims()[2];
            projected.push(proj.forward(x_sel.clone()).reshape([m, dt]));
            feat_targets.push(select_tokens(t.features.clone(), &sel).reshape([m, dt]));
        }
        let pred_s = student.head.forward(mode_s.clone());
        let k = pred_s.dims()[2];
        xs.push(x_sel.reshape([m, c]));
        modes.push(mode_s.reshape([m, c]));
        ps.push(pred_s.reshape([m, k]));
        pts.push(pred_t.reshape([m, k]));
    }
    Ok(Forward {
        x: Tensor::cat(xs, 0),
        mode: Tensor::cat(modes, 0),
        student_pred: Tensor::cat(ps, 0),
        teacher_pred: Tensor::from_inner(Tensor::cat(pts, 0)),
        enc_t: match side {
            TeacherSide::Ema(enc_t) => Some(Tensor::from_inner(enc_t)),
            TeacherSide::Frozen(_) => None,
        },
        feature: (!projected.is_empty())
            .then(|| (Tensor::cat(projected, 0), Tensor::from_inner(Tensor::cat(feat_targets, 0)))),
    })
}

/// One complete iteration. Returns the updated student; the teacher and the optimiser state
/// are updated in place. `prev`: the previous-stage model of multi-stage training (its
/// mixture weight is `hyper.mixture`), `None` otherwise.
#[allow(clippy::too_many_arguments)]
pub fn train_step<B: AutodiffBackend>(
    student: FlslModel<B>,
    teacher: &mut FlslModel<B::InnerBackend>,
    prev: Option<&PreviousStage<B::InnerBackend>>,
    distill: Option<&DistillTeacher<B::InnerBackend>>,
    loss_fn: &mut FlslLoss,
    adam: &mut AdamState<B::InnerBackend>,
    views: &[View<B>],
    hyper: &StepHyper,
    mut opts: StepOptions<'_>,
) -> Result<(FlslModel<B>, StepReport)> {
    let fwd = forward(
        &student,
        teacher,
        views,
        hyper.sa_temp,
        hyper.ca_temp,
        prev.map(|p| (p, hyper.mixture)),
        distill,
        opts.half,
    )?;
    if let Some(tap) = opts.tap.as_deref_mut() {
        tap.tensor("loss_in_x", HostTensor::from_tensor(fwd.x.clone()));
        tap.tensor("loss_in_mode", HostTensor::from_tensor(fwd.mode.clone()));
        tap.tensor("loss_in_student_pred", HostTensor::from_tensor(fwd.student_pred.clone()));
        tap.tensor("loss_in_teacher_pred", HostTensor::from_tensor(fwd.teacher_pred.clone()));
        if let Some(enc_t) = &fwd.enc_t {
            tap.tensor("enc_t", HostTensor::from_tensor(enc_t.clone()));
        }
    }
    let assign = fwd.teacher_pred.clone().argmax(1).into_data().convert::<i64>();
    let teacher_assign: Vec<u32> =
        assign.to_vec::<i64>().unwrap_or_default().into_iter().map(|v| v as u32).collect();
    loss_fn.coefficients[0] = hyper.ups;
    // Data-parallel: the VMR sees the mean assignment of all replicas (reference `AllReduce`).
    let replica_mean = match (opts.peer, &loss_fn.vmr) {
        (Some(peer), Some(_)) => {
            let s = burn::tensor::activation::softmax(
                fwd.student_pred.clone().inner() / loss_fn.student_temp,
                1,
            )
            .mean_dim(0);
            Some(Tensor::from_inner(parallel::all_reduce_mean(peer, s)?))
        }
        _ => None,
    };
    let mut out = loss_fn.forward(
        fwd.x,
        fwd.mode,
        fwd.student_pred,
        fwd.teacher_pred,
        hyper.epoch,
        replica_mean,
    );
    if let (Some((projected, target)), Some(d)) = (fwd.feature, distill) {
        out.add_feature_alignment(projected, target, d.feature_weight);
    }
    let mut terms = out.terms();
    if let Some(peer) = opts.peer {
        // Every replica sees the same (mean) terms, so a non-finite loss anywhere stops all.
        let local = [terms.total, terms.mean_shift, terms.kmeans, terms.vmr, terms.feature];
        let mean =
            parallel::all_reduce_mean_host::<B::InnerBackend>(peer, &local, &out.total.device())?;
        terms = LossTerms {
            total: mean[0],
            mean_shift: mean[1],
            kmeans: mean[2],
            vmr: mean[3],
            feature: mean[4],
        };
    }
    if !terms.is_finite() {
        // Nothing is updated: the caller keeps its last good state.
        return Err(Error::NonFinite { step: hyper.iteration, terms: terms.to_string() });
    }
    let grads = out.total.backward();

    let report =
        StepReport { loss: terms, grad_norms: Vec::new(), clipped: Vec::new(), teacher_assign };
    // (A reborrow: the tap's own lifetime may be longer than the optimiser's borrows.)
    let tap = opts.tap.map(|t| t as &mut dyn StepTap);
    let (student, report) =
        apply_adamw_parallel(student, grads, adam, hyper, tap, opts.peer, report)?;

    // EMA over every parameter pair, frozen ones included.
    ema_update(teacher, &student.valid(), hyper.momentum);
    Ok((student, report))
}

/// Per-parameter clipping, last-layer freeze and the AdamW update of every parameter of
/// `module` that has a gradient in `grads` (the update half of a training iteration).
pub fn apply_adamw<'a, B: AutodiffBackend, M: AutodiffModule<B>>(
    module: M,
    grads: B::Gradients,
    adam: &'a mut AdamState<B::InnerBackend>,
    hyper: &'a StepHyper,
    tap: Option<&'a mut dyn StepTap>,
    report: StepReport,
) -> (M, StepReport) {
    let mut opt = Optimizer::<B> {
        path: Vec::new(),
        grads,
        adam,
        hyper,
        tap,
        report,
        peer: None,
        error: None,
    };
    let module = module.map(&mut opt);
    (module, opt.report)
}

/// [`apply_adamw`] on a data-parallel replica: each gradient is first averaged over all
/// replicas (every replica visits the parameters in the same order).
pub fn apply_adamw_parallel<'a, B: AutodiffBackend, M: AutodiffModule<B>>(
    module: M,
    grads: B::Gradients,
    adam: &'a mut AdamState<B::InnerBackend>,
    hyper: &'a StepHyper,
    tap: Option<&'a mut dyn StepTap>,
    peer: Option<Peer>,
    report: StepReport,
) -> Result<(M, StepReport)> {
    let mut opt =
        Optimizer::<B> { path: Vec::new(), grads, adam, hyper, tap, report, peer, error: None };
    let module = module.map(&mut opt);
    match opt.error {
        Some(e) => Err(e),
        None => Ok((module, opt.report)),
    }
}

struct Optimizer<'a, B: AutodiffBackend> {
    path: Vec<String>,
    grads: B::Gradients,
    adam: &'a mut AdamState<B::InnerBackend>,
    hyper: &'a StepHyper,
    tap: Option<&'a mut dyn StepTap>,
    report: StepReport,
    peer: Option<Peer>,
    /// The first collective failure (the mapper cannot return it).
    error: Option<Error>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Optimizer<'_, B> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let name = reference_name(&self.path);
        let Some(mut grad) = tensor.grad(&self.grads) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        if let Some(peer) = self.peer {
            if self.error.is_some() {
                return Param::from_mapped_value(id, tensor, mapper);
            }
            match parallel::all_reduce_mean(peer, grad) {
                Ok(g) => grad = g,
                Err(e) => {
                    self.error = Some(e);
                    return Param::from_mapped_value(id, tensor, mapper);
                }
            }
        }
        let h = self.hyper;
        let dims = tensor.dims();
        let numel: usize = dims.iter().product();
        let g = grad.reshape([numel]);
        if let Some(tap) = self.tap.as_deref_mut() {
            tap.tensor(
                &format!("grad_preclip.{name}"),
                HostTensor::from_tensor(g.clone().reshape(dims)),
            );
        }
        // utils.clip_gradients: each parameter separately, coef = clip / (|g| + 1e-6) if < 1.
        let norm = g.clone().powi_scalar(2).sum().sqrt(); // [1], float32 as the reference
        let norm_host: f64 = norm.clone().into_scalar().elem();
        self.report.grad_norms.push((name.clone(), norm_host));
        let (g, grad_scale) = match h.clip_grad.filter(|c| *c > 0.0) {
            Some(clip) => {
                let coef = (norm + 1e-6).recip() * clip;
                let coef_host: f64 = coef.into_scalar().elem();
                if coef_host < 1.0 {
                    self.report.clipped.push(name.clone());
                    // Applied by the update (`adamw_update`), fused or composed: the same f32
                    // product as `g * coef`.
                    (g, Some(coef_host as f32))
                } else {
                    (g, None)
                }
            }
            None => (g, None),
        };
        // utils.cancel_gradients_last_layer: after clipping, the gradient is dropped.
        if h.epoch < h.freeze_last_layer && name.contains("last_layer") {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let decay = if name.ends_with(".bias") || D == 1 { 0.0 } else { h.weight_decay };
        let require_grad = tensor.is_require_grad();
        let p = tensor.inner().reshape([numel]);
        let device = p.device();
        let (step, m, v) = self.adam.slots.remove(&name).unwrap_or_else(|| {
            (0, Tensor::zeros([numel], &device), Tensor::zeros([numel], &device))
        });
        let step = step + 1;
        let (b1, b2) = h.betas;
        let bc1 = 1.0 - b1.powi(step as i32);
        let bc2 = 1.0 - b2.powi(step as i32);
        let step_size = h.lr / bc1;
        let (p, m, v) = adamw_update(p, g, m, v, grad_scale, h, decay, bc2, step_size);
        self.adam.slots.insert(name, (step, m, v));
        let mut new = Tensor::<B, D>::from_inner(p.reshape(dims));
        if require_grad {
            new = new.require_grad();
        }
        Param::from_mapped_value(id, new, mapper)
    }
}

/// torch.optim.AdamW (single tensor, non-fused) on one flattened parameter, in its order of
/// operations; one parallel pass on burn-flex (`model::fused`), burn's tensor ops elsewhere.
/// `grad_scale`: the clipping coefficient not yet applied to `g`.
#[allow(clippy::too_many_arguments)]
fn adamw_update<B: Backend>(
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
    grad_scale: Option<f32>,
    h: &StepHyper,
    decay: f64,
    bc2: f64,
    step_size: f64,
) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let (b1, b2) = h.betas;
    let (p, g, m, v) = {
        let s = crate::backend::fused::AdamwScalars {
            grad_scale,
            decay: (1.0 - h.lr * decay) as f32,
            one_minus_b1: (1.0 - b1) as f32,
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
            sqrt_bc2: bc2.sqrt() as f32,
            eps: h.eps as f32,
            step_size: step_size as f32,
        };
        match crate::backend::fused::adamw(p, g, m, v, &s) {
            Ok(out) => return out,
            Err(inputs) => inputs,
        }
    };
    let g = match grad_scale {
        Some(c) => g * c,
        None => g,
    };
    let p = p * (1.0 - h.lr * decay);
    let m = m.clone() + (g.clone() - m) * (1.0 - b1); // exp_avg.lerp_(grad, 1 - beta1)
    let v = v * b2 + g.clone() * g * (1.0 - b2); // exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
    let denom = v.clone().sqrt() / bc2.sqrt() + h.eps;
    let p = p - (m.clone() / denom) * step_size;
    (p, m, v)
}

/// `t = t*m + (1-m)*s` for every parameter pair, matched by reference name.
pub fn ema_update<B: Backend>(teacher: &mut FlslModel<B>, student: &FlslModel<B>, momentum: f64) {
    struct Gather<B: Backend> {
        path: Vec<String>,
        out: BTreeMap<String, Tensor<B, 1>>,
    }
    impl<B: Backend> ModuleVisitor<B> for Gather<B> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let t = param.val();
            let n: usize = t.dims().iter().product();
            self.out.insert(reference_name(&self.path), t.reshape([n]));
        }
    }
    struct Ema<B: Backend> {
        path: Vec<String>,
        src: BTreeMap<String, Tensor<B, 1>>,
        m: f64,
    }
    impl<B: Backend> ModuleMapper<B> for Ema<B> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, t, mapper) = param.consume();
            let name = reference_name(&self.path);
            let t = match self.src.remove(&name) {
                Some(s) => {
                    let dims = t.dims();
                    // param_k.mul_(m).add_((1 - m) * param_q), all in float32.
                    t * (self.m as f32) + s.reshape(dims) * ((1.0 - self.m) as f32)
                }
                None => t,
            };
            Param::from_mapped_value(id, t, mapper)
        }
    }
    let mut g = Gather { path: Vec::new(), out: BTreeMap::new() };
    student.visit(&mut g);
    let mut e = Ema { path: Vec::new(), src: g.out, m: momentum };
    let t = std::mem::replace(teacher, teacher.clone());
    *teacher = t.map(&mut e);
}
