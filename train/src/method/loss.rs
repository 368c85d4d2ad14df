//! The FLSL loss (reference `main_flsl.FLSLLoss`, `utils.NonEmptyPriorKL`, `utils.Centering`).
//!
//! `total = ups * ms + eta * kmeans + gam * vmr` with
//! `ms = 2 - 2 mean cos(x, mode)` (first-level clustering, intra-view mean shift),
//! `kmeans = mean_rows H(softmax(p_t / T_t), softmax(p_s / T_s))` (second-level clustering;
//! the teacher side is detached), and the volume-maximisation regulariser
//! `vmr = KL(mean_rows softmax(p_s / T_s) || prior)`.

use burn::tensor::{Tensor, TensorData, backend::Backend};

use crate::model::layers::{l2_normalize, softmax};

/// The prior of the volume-maximisation regulariser.
#[derive(Debug, Clone, PartialEq)]
pub enum VmrPrior {
    /// Uniform over the `K` prototypes: `sum xbar log xbar + log K`.
    Uniform,
    /// An explicit prior `[K]` (positive): `sum xbar log xbar - sum xbar log prior`.
    Given(Vec<f32>),
}

/// Every term of the loss.
#[derive(Debug, Clone)]
pub struct FlslLossOutput<B: Backend> {
    /// Weighted total.
    pub total: Tensor<B, 1>,
    /// Intra-view mean-shift term (unweighted).
    pub mean_shift: Tensor<B, 1>,
    /// k-means cross-entropy (unweighted).
    pub kmeans: Tensor<B, 1>,
    /// Volume-maximisation KL (unweighted; zero when disabled).
    pub vmr: Tensor<B, 1>,
    /// Distillation feature alignment (unweighted; `None` outside distillation), added by
    /// [`FlslLossOutput::add_feature_alignment`].
    pub feature: Option<Tensor<B, 1>>,
}

/// The scalar values of a loss evaluation, for logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossTerms {
    /// Weighted total.
    pub total: f64,
    /// Mean-shift term.
    pub mean_shift: f64,
    /// k-means term.
    pub kmeans: f64,
    /// VMR term.
    pub vmr: f64,
    /// Distillation feature-alignment term `1 - mean cos` (unweighted; 0 when not
    /// distilling, and in logs written before it existed).
    #[serde(default)]
    pub feature: f64,
}

impl LossTerms {
    /// Whether every term is finite.
    pub fn is_finite(&self) -> bool {
        self.total.is_finite()
            && self.mean_shift.is_finite()
            && self.kmeans.is_finite()
            && self.vmr.is_finite()
            && self.feature.is_finite()
    }
}

impl std::fmt::Display for LossTerms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "total={:.6} mean_shift={:.6} kmeans={:.6} vmr={:.6}",
            self.total, self.mean_shift, self.kmeans, self.vmr
        )?;
        if self.feature != 0.0 {
            write!(f, " feature={:.6}", self.feature)?;
        }
        Ok(())
    }
}

impl<B: Backend> FlslLossOutput<B> {
    /// Reads the scalars back to the host.
    pub fn terms(&self) -> LossTerms {
        let s = |t: &Tensor<B, 1>| t.clone().into_scalar().elem::<f64>();
        LossTerms {
            total: s(&self.total),
            mean_shift: s(&self.mean_shift),
            kmeans: s(&self.kmeans),
            vmr: s(&self.vmr),
            feature: self.feature.as_ref().map_or(0.0, s),
        }
    }

    /// Adds distillation's feature term `weight * (1 - mean_rows cos(projected, target))`
    /// (`[M, D_t]` each; the target, the frozen teacher's features, is a constant).
    pub fn add_feature_alignment(
        &mut self,
        projected: Tensor<B, 2>,
        target: Tensor<B, 2>,
        weight: f64,
    ) {
        let cos =
            (l2_normalize(projected, 1e-12) * l2_normalize(target.detach(), 1e-12)).sum_dim(1);
        let term = (cos.mean() * -1.0) + 1.0;
        self.total = self.total.clone() + term.clone() * weight;
        self.feature = Some(term);
    }
}

use burn::tensor::ElementConversion;

/// DINO-style teacher centering (`utils.Centering`): subtract a running mean of the teacher
/// predictions, updated with momentum after each use.
#[derive(Debug, Clone)]
pub struct Centering {
    /// The running center `[K]`.
    pub center: Vec<f32>,
    /// EMA momentum of the center.
    pub momentum: f64,
}

/// The loss configuration.
#[derive(Debug, Clone)]
pub struct FlslLoss {
    /// Student temperature `T_s` (divides the student logits).
    pub student_temp: f64,
    /// Teacher temperature per epoch `T_t[epoch]`.
    pub teacher_temp_schedule: Vec<f64>,
    /// `(ups, eta, gam)`.
    pub coefficients: [f64; 3],
    /// Volume-maximisation prior, or `None` to disable the regulariser.
    pub vmr: Option<VmrPrior>,
    /// Optional teacher centering.
    pub centering: Option<Centering>,
}

impl FlslLoss {
    /// The teacher temperature of an epoch (the last value past the schedule's end).
    pub fn teacher_temp(&self, epoch: usize) -> f64 {
        self.teacher_temp_schedule
            .get(epoch)
            .or(self.teacher_temp_schedule.last())
            .copied()
            .unwrap_or(0.04)
    }

    /// Evaluates the loss. `replica_mean`, for data-parallel replicas, is the VMR's mean
    /// assignment `x̄ [1, K]` over all replicas: the reference's `utils.AllReduce` (forward: the
    /// mean over replicas; backward: identity), so that after the gradient average the update
    /// equals one device on the whole batch. `None` on one device.
    ///
    /// # Shapes
    /// `x, mode: [M, C]`, `student_pred, teacher_pred: [M, K]`.
    pub fn forward<B: Backend>(
        &mut self,
        x: Tensor<B, 2>,
        mode: Tensor<B, 2>,
        student_pred: Tensor<B, 2>,
        teacher_pred: Tensor<B, 2>,
        epoch: usize,
        replica_mean: Option<Tensor<B, 2>>,
    ) -> FlslLossOutput<B> {
        let device = x.device();
        let [m, k] = student_pred.dims();
        // First-level clustering: 2 - 2 * mean cosine.
        let cos = (l2_normalize(x, 1e-12) * l2_normalize(mode, 1e-12)).sum_dim(1); // [M, 1]
        let mean_shift = (cos.mean() * -2.0) + 2.0;

        // Second-level clustering.
        let s = softmax(student_pred / self.student_temp, 1);
        let mut teacher_pred = teacher_pred.detach();
        if let Some(c) = &mut self.centering {
            let center =
                Tensor::<B, 2>::from_data(TensorData::new(c.center.clone(), [1, k]), &device);
            let batch_center = teacher_pred.clone().sum_dim(0) / m as f64;
            teacher_pred = teacher_pred - center;
            let bc = batch_center.into_data().convert::<f32>().to_vec::<f32>().expect("f32 data");
            for (ci, b) in c.center.iter_mut().zip(bc) {
                *ci = (f64::from(*ci) * c.momentum + f64::from(b) * (1.0 - c.momentum)) as f32;
            }
        }
        let t = softmax(teacher_pred / self.teacher_temp(epoch), 1).detach();
        let kmeans = (t * s.clone().log()).sum_dim(1).mean().neg();

        // Volume maximisation.
        let vmr = match &self.vmr {
            None => Tensor::<B, 1>::zeros([1], &device),
            Some(prior) => {
                let mut xbar = s.mean_dim(0); // [1, K]
                if let Some(global) = replica_mean {
                    // Value of the replicas' mean, gradient of the local mean.
                    xbar = xbar.clone() + (global - xbar.detach()).detach();
                }
                let ne = (xbar.clone() * xbar.clone().log()).sum();
                match prior {
                    VmrPrior::Uniform => ne + (k as f64).ln(),
                    VmrPrior::Given(p) => {
                        let logp: Vec<f32> = p.iter().map(|v| v.ln()).collect();
                        let logp =
                            Tensor::<B, 2>::from_data(TensorData::new(logp, [1, k]), &device);
                        ne - (xbar * logp).sum()
                    }
                }
            }
        };
        let [ups, eta, gam] = self.coefficients;
        let total = mean_shift.clone() * ups + kmeans.clone() * eta + vmr.clone() * gam;
        FlslLossOutput { total, mean_shift, kmeans, vmr, feature: None }
    }
}

/// The VMR alone on row-stochastic `s [M, K]` (`utils.NonEmptyPriorKL(K, prior)(s)`).
pub fn vmr<B: Backend>(s: Tensor<B, 2>, prior: &VmrPrior) -> Tensor<B, 1> {
    let [_, k] = s.dims();
    let device = s.device();
    let xbar = s.mean_dim(0);
    let ne = (xbar.clone() * xbar.clone().log()).sum();
    match prior {
        VmrPrior::Uniform => ne + (k as f64).ln(),
        VmrPrior::Given(p) => {
            let logp: Vec<f32> = p.iter().map(|v| v.ln()).collect();
            let logp = Tensor::<B, 2>::from_data(TensorData::new(logp, [1, k]), &device);
            ne - (xbar * logp).sum()
        }
    }
}
