//! Small layers with the reference's parameter names and layouts.
//!
//! burn-nn's `Linear` stores `[in, out]` and its `LayerNorm` names its parameters
//! `gamma`/`beta`, and burn 0.21's fused `gelu` differentiates the tanh approximation.
//! These layers store PyTorch's layouts under PyTorch's names, so reference checkpoints load
//! without remapping, and they build GELU from `erf` so that its gradient is exact.

use crate::backend::fused;
use burn::module::{Module, Param};
use burn::tensor::{Distribution, Tensor, backend::Backend};

/// `y = x W^T + b` with `W: [out, in]` (PyTorch layout).
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[out, in]`.
    pub weight: Param<Tensor<B, 2>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    /// Truncated-normal (std 0.02) weights and zero bias, as the reference's `_init_weights`.
    pub fn new(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Self {
        let weight = trunc_normal::<B, 2>([d_out, d_in], 0.02, device);
        Self {
            weight: Param::from_tensor(weight),
            bias: bias.then(|| Param::from_tensor(Tensor::zeros([d_out], device))),
        }
    }

    /// Output width.
    pub fn d_out(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Applies the layer over the last dimension of `x`.
    ///
    /// # Shapes
    /// `[..., in] -> [..., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = match &self.bias {
            Some(b) => match fused::linear(x, self.weight.val(), b.val()) {
                Ok(y) => return y,
                Err((x, _, _)) => x,
            },
            None => x,
        };
        self.forward_composed(x)
    }

    /// [`Linear::forward`] from burn's tensor ops (every backend but burn-flex, and layers
    /// without bias; the reference of the fused one's tests).
    pub fn forward_composed<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let [d_out, d_in] = self.weight.dims();
        let rows: usize = dims[..D - 1].iter().product();
        let y = x.reshape([rows, d_in]).matmul(self.weight.val().transpose());
        let y = match &self.bias {
            Some(b) => y + b.val().unsqueeze_dim(0),
            None => y,
        };
        let mut out = dims;
        out[D - 1] = d_out;
        y.reshape(out)
    }
}

/// Layer normalisation over the last dimension (biased variance, as PyTorch).
#[derive(Module, Debug)]
pub struct LayerNorm<B: Backend> {
    /// Scale `[d]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Shift `[d]`.
    pub bias: Param<Tensor<B, 1>>,
    /// Added to the variance.
    pub eps: f64,
}

impl<B: Backend> LayerNorm<B> {
    /// Ones and zeros.
    pub fn new(d: usize, eps: f64, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([d], device)),
            bias: Param::from_tensor(Tensor::zeros([d], device)),
            eps,
        }
    }

    /// # Shapes
    /// `[..., d] -> [..., d]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let x = match fused::layer_norm(x, self.weight.val(), self.bias.val(), self.eps) {
            Ok(y) => return y,
            Err((x, _, _)) => x,
        };
        self.forward_composed(x)
    }

    /// [`LayerNorm::forward`] from burn's tensor ops (the form every backend but burn-flex
    /// takes; the reference of the fused one's tests).
    pub fn forward_composed<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mean = x.clone().mean_dim(D - 1);
        let centered = x - mean;
        let var = centered.clone().powi_scalar(2).mean_dim(D - 1);
        let normed = centered / (var + self.eps).sqrt();
        let shape = {
            let mut s = [1usize; D];
            s[D - 1] = self.weight.dims()[0];
            s
        };
        normed * self.weight.val().reshape(shape) + self.bias.val().reshape(shape)
    }
}

/// Exact GELU, `x * (1 + erf(x / sqrt 2)) / 2`, with its exact gradient (one fused op with
/// its own backward on burn-flex, [`gelu_composed`] elsewhere).
pub fn gelu<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let x = match fused::gelu(x) {
        Ok(y) => return y,
        Err(x) => x,
    };
    gelu_composed(x)
}

/// [`gelu`] from burn's tensor ops, differentiated through `erf`.
pub fn gelu_composed<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    (x.clone() * ((x / core::f64::consts::SQRT_2).erf() + 1.0)) * 0.5
}

/// Softmax over `dim`, `exp(x - max) / sum`, as PyTorch computes it.
pub fn softmax<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    let x = if dim + 1 == D {
        match fused::softmax_last(x, 1.0) {
            Ok(y) => return y,
            Err(x) => x,
        }
    } else {
        x
    };
    burn::tensor::activation::softmax(x, dim)
}

/// `softmax(x * scale)` over `dim` (attention scores times their temperature; the scale
/// multiplies, as in the reference). On burn-flex, over the last axis, one fused op whose
/// backward applies the scale; elsewhere [`softmax_scaled_composed`].
pub fn softmax_scaled<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    scale: f64,
    dim: usize,
) -> Tensor<B, D> {
    let x = if dim + 1 == D {
        match fused::softmax_last(x, scale as f32) {
            Ok(y) => return y,
            Err(x) => x,
        }
    } else {
        x
    };
    softmax_scaled_composed(x, scale, dim)
}

/// [`softmax_scaled`] from burn's tensor ops.
pub fn softmax_scaled_composed<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    scale: f64,
    dim: usize,
) -> Tensor<B, D> {
    burn::tensor::activation::softmax(x * scale, dim)
}

/// L2 normalisation over the last dimension, `v / max(|v|, eps)` (`F.normalize`).
pub fn l2_normalize<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let norm = x.clone().powi_scalar(2).sum_dim(D - 1).sqrt().clamp_min(eps);
    x / norm
}

thread_local! {
    static HOST_RNG: std::cell::RefCell<Option<rand_chacha::ChaCha8Rng>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with a seeded random stream of this thread's own for initialisation and drop
/// path, instead of the backend's global RNG (which other threads share, so results would
/// depend on what else runs in the process).
pub fn with_seed<R>(seed: u64, f: impl FnOnce() -> R) -> R {
    use rand::SeedableRng;
    let previous = HOST_RNG.with(|r| r.replace(Some(rand_chacha::ChaCha8Rng::seed_from_u64(seed))));
    let out = f();
    HOST_RNG.with(|r| *r.borrow_mut() = previous);
    out
}

/// `n` draws from the thread's seeded stream, if [`with_seed`] is active.
fn host_draws(
    n: usize,
    mut f: impl FnMut(&mut rand_chacha::ChaCha8Rng) -> f32,
) -> Option<Vec<f32>> {
    HOST_RNG.with(|r| r.borrow_mut().as_mut().map(|rng| (0..n).map(|_| f(rng)).collect()))
}

fn normal(rng: &mut rand_chacha::ChaCha8Rng) -> f32 {
    use rand::Rng;
    // Box-Muller.
    let u1: f64 = rng.random::<f64>().max(1e-300);
    let u2: f64 = rng.random();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Truncated normal in `[-2 std, 2 std]` (timm's `trunc_normal_` with its default bounds).
pub fn trunc_normal<B: Backend, const D: usize>(
    shape: [usize; D],
    std: f64,
    device: &B::Device,
) -> Tensor<B, D> {
    // Draw N(0, std) and clamp to the bounds. The initial values only matter statistically
    // (the reference's RNG stream cannot be reproduced anyway).
    let n: usize = shape.iter().product();
    match host_draws(n, normal) {
        Some(v) => Tensor::<B, D>::from_data(burn::tensor::TensorData::new(v, shape), device)
            .mul_scalar(std),
        None => Tensor::random(shape, Distribution::Normal(0.0, std), device),
    }
    .clamp(-2.0 * std, 2.0 * std)
}

/// Drop path (stochastic depth) for a residual branch, as the reference's `drop_path`:
/// each sample's branch is zeroed with probability `p` and the survivors are scaled by `1/(1-p)`.
/// Active only on an autodiff backend (training), like burn's dropout.
pub fn drop_path<B: Backend>(x: Tensor<B, 3>, p: f64) -> Tensor<B, 3> {
    if p <= 0.0 || !B::ad_enabled(&x.device()) {
        return x;
    }
    let keep = 1.0 - p;
    let [b, _, _] = x.dims();
    let device = x.device();
    let uniform = match host_draws(b, rand::Rng::random::<f32>) {
        Some(v) => Tensor::<B, 3>::from_data(burn::tensor::TensorData::new(v, [b, 1, 1]), &device),
        None => Tensor::<B, 3>::random([b, 1, 1], Distribution::Uniform(0.0, 1.0), &device),
    };
    let mask = (uniform + keep).floor();
    let mask = if mask.dtype() == x.dtype() { mask } else { mask.cast(x.dtype()) };
    x / keep * mask
}
