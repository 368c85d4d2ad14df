//! The model's hot ops on burn-flex as single parallel passes, each one autodiff node with
//! a hand-written backward: linear layers, LayerNorm, exact GELU, softmax of scaled scores,
//! the heads' attention, and the AdamW update.
//!
//! Composed from burn's tensor ops (the `*_composed` forms in `model/layers.rs` and
//! `model/vit.rs`), a LayerNorm records 8 autodiff nodes, GELU 5 and a softmax 5 (burn's
//! softmax is itself composed under `Autodiff`); the attention slices the q/k/v weight and
//! copies strided views in the backward pass; a linear layer adds and sums its bias on the
//! calling thread; AdamW is about 15 passes per parameter. Each of those passes runs on the
//! calling thread while the pool waits (docs/PERFORMANCE.md, "CPU training backends", has
//! the profile). Here each op is one pass forward and one backward, split over rayon's pool
//! in chunks of a fixed size, with partial sums added in chunk order, so results do not
//! depend on the number of threads (bit-exact resume and the data-parallel equality rely
//! on that; tested).
//!
//! Taken when the backend is burn-flex (`Flex` for inference, `Autodiff<Flex>` for training)
//! and the tensors are f32 (see [`on_flex`]); every other backend and dtype takes the composed
//! ops, which the tests here use as the reference. `FLSL_COMPOSED_OPS=1` in the environment
//! turns the fused ops off (for A/B measurements in one binary, and to rule them out when
//! debugging a training run).

use std::any::Any;

use burn::backend::Autodiff;
use burn::tensor::{DType, Shape, Tensor, TensorData, TensorMetadata, TensorPrimitive};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn_flex::{Flex, FlexTensor};
use rayon::prelude::*;

pub(crate) use super::AdamwScalars;

type AdFlex = Autodiff<Flex>;
/// burn-autodiff's tensor over burn-flex (its type is public only by this name).
type AutodiffTensor = burn::tensor::ops::FloatTensor<AdFlex>;

/// Elements per parallel chunk (whole rows; at least one row).
const CHUNK: usize = 1 << 14;

/// `a` as a `T` when `A` is `T`, else `a` back.
fn cast<A: 'static, T: 'static>(a: A) -> Result<T, A> {
    let mut slot = Some(a);
    let mut out: Option<T> = None;
    if let Some(s) = (&mut slot as &mut dyn Any).downcast_mut::<Option<T>>() {
        out = s.take();
    }
    match (out, slot) {
        (Some(t), _) => Ok(t),
        (None, Some(a)) => Err(a),
        // `slot` is emptied only by a successful downcast, which fills `out`.
        (None, None) => unreachable!("cast emptied its slot without a value"),
    }
}

/// `t` as an `A`, where `A` is `T` (known from an earlier [`cast`] of a value of type `A`).
fn same<T: 'static, A: 'static>(t: T) -> A {
    match cast::<T, A>(t) {
        Ok(a) => a,
        Err(_) => unreachable!("same(): the types were checked equal by an earlier cast"),
    }
}

/// Whether the fused ops run on backend `B` (burn-flex, with or without autodiff, unless
/// `FLSL_COMPOSED_OPS=1`); f32 is checked per tensor.
pub(crate) fn enabled<B: burn::tensor::backend::Backend>() -> bool {
    use std::any::TypeId;
    static COMPOSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let flex =
        TypeId::of::<B>() == TypeId::of::<AdFlex>() || TypeId::of::<B>() == TypeId::of::<Flex>();
    flex && !*COMPOSED
        .get_or_init(|| std::env::var_os("FLSL_COMPOSED_OPS").is_some_and(|v| v == "1"))
}

/// The backend a tensor was found on.
pub(crate) enum OnFlex {
    /// Training: burn-flex under burn-autodiff.
    Train(AutodiffTensor),
    /// Inference: plain burn-flex.
    Plain(FlexTensor),
}

/// The tensor's primitive when `B` is burn-flex (with or without autodiff) and it holds f32.
pub(crate) fn on_flex<B: burn::tensor::backend::Backend, const D: usize>(
    x: Tensor<B, D>,
) -> Result<OnFlex, Tensor<B, D>> {
    if !enabled::<B>() {
        return Err(x);
    }
    let x = match cast::<Tensor<B, D>, Tensor<AdFlex, D>>(x) {
        Ok(t) if t.dtype() == DType::F32 => {
            return Ok(OnFlex::Train(t.into_primitive().tensor()));
        }
        Ok(t) => return Err(same(t)),
        Err(x) => x,
    };
    match cast::<Tensor<B, D>, Tensor<Flex, D>>(x) {
        Ok(t) if t.dtype() == DType::F32 => Ok(OnFlex::Plain(t.into_primitive().tensor())),
        Ok(t) => Err(same(t)),
        Err(x) => Err(x),
    }
}

/// Back from a primitive of the backend `B` was found to be.
fn train_tensor<B: burn::tensor::backend::Backend, const D: usize>(
    t: AutodiffTensor,
) -> Tensor<B, D> {
    same(Tensor::<AdFlex, D>::from_primitive(TensorPrimitive::Float(t)))
}

fn plain_tensor<B: burn::tensor::backend::Backend, const D: usize>(t: FlexTensor) -> Tensor<B, D> {
    same(Tensor::<Flex, D>::from_primitive(TensorPrimitive::Float(t)))
}

fn slice(t: &FlexTensor) -> &[f32] {
    // Only called on `to_contiguous` results of f32 tensors (dtype checked in `on_flex`).
    t.as_slice::<f32>().unwrap_or(&[])
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Rows per parallel chunk for rows of `d` elements.
fn rows_per_chunk(d: usize) -> usize {
    (CHUNK / d.max(1)).max(1)
}

/// Sum of `v` in 8 lanes (vectorises; the order is fixed).
#[inline]
fn sum8(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &x in chunks.remainder() {
        s += x;
    }
    s
}

/// Dot product of `a` and `b` in 8 lanes.
#[inline]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

/// Maximum of `v` in 8 lanes (`-inf` for an empty slice; a NaN is not propagated, as
/// `f32::max`).
#[inline]
fn max8(v: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut chunks = v.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let mut m = acc.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for &x in chunks.remainder() {
        m = m.max(x);
    }
    m
}

/// `e^x` in f32, branch-free so that loops over it vectorise: `2^k e^r` with `k` the nearest
/// integer to `x / ln 2` and Cephes' degree-6 polynomial for `e^r` (about 1 ulp). Below
/// -87.33 it returns at most 1.2e-38 (where `expf` underflows to subnormals or zero).
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = core::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer (SSE2, no `round`).
    const MAGIC: f32 = 12_582_912.0;
    // Selects rather than `clamp`/`max`: they vectorise and let a NaN through.
    let x = if x < -87.33 { -87.33 } else { x };
    let x = if x > 88.7 { 88.7 } else { x };
    let kf = x * LOG2E + MAGIC;
    let k = kf - MAGIC;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    // `k` is also the difference of the bit patterns of `kf` and `MAGIC` (integer ops only,
    // which vectorise, where a float-to-int conversion would not).
    let biased = (kf.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32).wrapping_add(127);
    e * f32::from_bits((biased as u32) << 23)
}

/// `erf(x)` in f32 by Abramowitz & Stegun 7.1.26, branch-free: the formula PyTorch's
/// vectorised CPU `erf` (and so its GELU) uses. Absolute error below 1.5e-7 for the formula,
/// below 6e-7 evaluated in f32 (the cancellation in `1 - poly e^(-x^2)` near 0); GELU needs
/// only absolute accuracy there (`x (1 + erf) / 2`).
#[inline(always)]
fn erf_f32(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_74) * t
        + 0.254_829_6)
        * t;
    let y = 1.0 - poly * exp_f32(-a * a);
    y.copysign(x)
}

/// Defines `fn $name(...)` whose body runs compiled for AVX2 + FMA when the CPU has them (its
/// loops then vectorise 8 wide) and for the baseline target otherwise. The results are the
/// same either way: no operation is fused or reordered (no FMA contraction in Rust).
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($a: $t),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp($($a: $t),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($a: $t),*) {
                    imp($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `avx2` is compiled for.
                    return unsafe { avx2($($a),*) };
                }
            }
            imp($($a),*)
        }
    };
}

multiversion! {
    /// `y = gelu(x)`.
    fn gelu_rows(y: &mut [f32], x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * (erf_f32(x * FRAC_1_SQRT_2) + 1.0) * 0.5;
        }
    }
}

multiversion! {
    /// `dx = g (Phi(x) + x phi(x))`.
    fn gelu_grad_rows(dx: &mut [f32], x: &[f32], g: &[f32]) {
        for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
            let cdf = (erf_f32(x * FRAC_1_SQRT_2) + 1.0) * 0.5;
            let pdf = exp_f32(-0.5 * x * x) * FRAC_1_SQRT_2PI;
            *dx = g * (cdf + x * pdf);
        }
    }
}

multiversion! {
    /// Softmax of `scale * row` in place, for each `d`-wide row of `p`.
    fn softmax_rows(p: &mut [f32], d: usize, scale: f32) {
        for row in p.chunks_exact_mut(d) {
            for v in row.iter_mut() {
                *v *= scale;
            }
            let max = max8(row);
            for v in row.iter_mut() {
                *v = exp_f32(*v - max);
            }
            let inv = 1.0 / sum8(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

multiversion! {
    /// Softmax backward in place: `gd` holds the output's gradient and becomes the input's,
    /// `scale * y * (g - sum(g * y))` per `d`-wide row.
    fn softmax_grad_rows(gd: &mut [f32], y: &[f32], d: usize, scale: f32) {
        for (g, y) in gd.chunks_exact_mut(d).zip(y.chunks_exact(d)) {
            let t = dot8(g, y);
            for (g, &y) in g.iter_mut().zip(y) {
                *g = scale * y * (*g - t);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GELU

const FRAC_1_SQRT_2: f32 = core::f32::consts::FRAC_1_SQRT_2;
/// `1 / sqrt(2 pi)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

fn gelu_forward(x: &FlexTensor) -> FlexTensor {
    let x = FlexTensor::to_contiguous(x);
    let xs = slice(&x);
    let mut y = vec![0f32; xs.len()];
    y.par_chunks_mut(CHUNK).zip(xs.par_chunks(CHUNK)).for_each(|(y, x)| gelu_rows(y, x));
    tensor(y, x.shape())
}

/// `dL/dx = g (Phi(x) + x phi(x))`.
fn gelu_backward(x: &FlexTensor, g: &FlexTensor) -> FlexTensor {
    let g = FlexTensor::to_contiguous(g);
    let (xs, gs) = (slice(x), slice(&g));
    let mut dx = vec![0f32; xs.len()];
    dx.par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK).zip(gs.par_chunks(CHUNK)))
        .for_each(|(dx, (x, g))| gelu_grad_rows(dx, x, g));
    tensor(dx, x.shape())
}

#[derive(Debug)]
struct GeluBackward;

impl Backward<Flex, 1> for GeluBackward {
    /// The (contiguous) input.
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let x = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| gelu_backward(&x, &g));
    }
}

/// Exact GELU on burn-flex; `Err(x)` on other backends.
pub(crate) fn gelu<B: burn::tensor::backend::Backend, const D: usize>(
    x: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    Ok(match on_flex(x)? {
        OnFlex::Plain(x) => plain_tensor(gelu_forward(&x)),
        OnFlex::Train(x) => {
            let input = FlexTensor::to_contiguous(&x.primitive);
            let y = gelu_forward(&input);
            let out = match GeluBackward
                .prepare::<NoCheckpointing>([x.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(input, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            train_tensor(out)
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Softmax over the last axis, of `scale * x`

fn softmax_forward(x: &FlexTensor, scale: f32) -> FlexTensor {
    let x = FlexTensor::to_contiguous(x);
    let shape = x.shape();
    let d = shape.as_slice().last().copied().unwrap_or(1).max(1);
    let mut y = slice(&x).to_vec();
    y.par_chunks_mut(rows_per_chunk(d) * d).for_each(|y| softmax_rows(y, d, scale));
    tensor(y, shape)
}

/// `dL/dx = scale * y * (g - sum(g * y))` per row.
fn softmax_backward(y: &FlexTensor, g: &FlexTensor, scale: f32) -> FlexTensor {
    let g = FlexTensor::to_contiguous(g);
    let shape = y.shape();
    let d = shape.as_slice().last().copied().unwrap_or(1).max(1);
    let mut dx = slice(&g).to_vec();
    let step = rows_per_chunk(d) * d;
    dx.par_chunks_mut(step)
        .zip(slice(y).par_chunks(step))
        .for_each(|(dx, y)| softmax_grad_rows(dx, y, d, scale));
    tensor(dx, shape)
}

#[derive(Debug)]
struct SoftmaxBackward;

impl Backward<Flex, 1> for SoftmaxBackward {
    /// The output and the scale.
    type State = (FlexTensor, f32);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (y, scale) = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| softmax_backward(&y, &g, scale));
    }
}

/// `softmax(scale * x)` over the last axis on burn-flex; `Err(x)` on other backends.
pub(crate) fn softmax_last<B: burn::tensor::backend::Backend, const D: usize>(
    x: Tensor<B, D>,
    scale: f32,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    Ok(match on_flex(x)? {
        OnFlex::Plain(x) => plain_tensor(softmax_forward(&x, scale)),
        OnFlex::Train(x) => {
            let y = softmax_forward(&x.primitive, scale);
            let out = match SoftmaxBackward
                .prepare::<NoCheckpointing>([x.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish((y.clone(), scale), y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            train_tensor(out)
        }
    })
}

// ---------------------------------------------------------------------------------------------
// LayerNorm over the last axis

multiversion! {
    /// LayerNorm of each `d`-wide row of `x` into `y`, with each row's mean and
    /// `1 / sqrt(var + eps)` (biased variance, two passes, as PyTorch).
    fn layer_norm_rows(
        y: &mut [f32],
        mean: &mut [f32],
        rstd: &mut [f32],
        x: &[f32],
        w: &[f32],
        b: &[f32],
        eps: f32,
    ) {
        let d = w.len();
        for (((y, x), m), r) in
            y.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(mean.iter_mut()).zip(rstd.iter_mut())
        {
            let mu = sum8(x) / d as f32;
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x - mu;
            }
            let var = dot8(y, y) / d as f32;
            let rs = 1.0 / (var + eps).sqrt();
            for ((y, &w), &b) in y.iter_mut().zip(w).zip(b) {
                *y = *y * rs * w + b;
            }
            *m = mu;
            *r = rs;
        }
    }
}

fn layer_norm_forward(
    x: &FlexTensor,
    w: &[f32],
    b: &[f32],
    eps: f32,
) -> (FlexTensor, Vec<f32>, Vec<f32>) {
    let shape = x.shape();
    let d = w.len();
    let xs = slice(x);
    let rows = xs.len() / d;
    let (mut mean, mut rstd) = (vec![0f32; rows], vec![0f32; rows]);
    let mut y = vec![0f32; xs.len()];
    let rc = rows_per_chunk(d);
    y.par_chunks_mut(rc * d)
        .zip(xs.par_chunks(rc * d))
        .zip(mean.par_chunks_mut(rc).zip(rstd.par_chunks_mut(rc)))
        .for_each(|((y, x), (mean, rstd))| layer_norm_rows(y, mean, rstd, x, w, b, eps));
    (tensor(y, shape), mean, rstd)
}

/// What the LayerNorm backward keeps: the input, its row statistics and the scale.
#[derive(Debug, Clone)]
struct LnState {
    x: FlexTensor,
    mean: std::sync::Arc<Vec<f32>>,
    rstd: std::sync::Arc<Vec<f32>>,
    w: FlexTensor,
}

multiversion! {
    /// LayerNorm backward over the `d`-wide rows of one chunk: `dx`, and the chunk's sums
    /// for the scale (`dw`) and the shift (`db`) added to theirs. `xhat` and `dxhat` are
    /// `d`-wide scratch rows.
    fn layer_norm_grad_rows(
        dx: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
        xhat: &mut [f32],
        dxhat: &mut [f32],
        x: &[f32],
        g: &[f32],
        mean: &[f32],
        rstd: &[f32],
        w: &[f32],
    ) {
        let d = w.len();
        for ((((dx, x), g), &mu), &r) in dx
            .chunks_exact_mut(d)
            .zip(x.chunks_exact(d))
            .zip(g.chunks_exact(d))
            .zip(mean)
            .zip(rstd)
        {
            for j in 0..d {
                let xh = (x[j] - mu) * r;
                xhat[j] = xh;
                dxhat[j] = g[j] * w[j];
                dw[j] += g[j] * xh;
                db[j] += g[j];
            }
            let m1 = sum8(dxhat) / d as f32;
            let m2 = dot8(dxhat, xhat) / d as f32;
            for j in 0..d {
                dx[j] = r * (dxhat[j] - m1 - xhat[j] * m2);
            }
        }
    }
}

/// Gradients of `x`, the scale and the shift.
fn layer_norm_backward(s: &LnState, g: &FlexTensor) -> (FlexTensor, FlexTensor, FlexTensor) {
    let g = FlexTensor::to_contiguous(g);
    let (xs, gs, w) = (slice(&s.x), slice(&g), slice(&s.w));
    let d = w.len();
    let rc = rows_per_chunk(d);
    let mut dx = vec![0f32; xs.len()];
    // Per-chunk sums for the scale and the shift, added in chunk order below.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(rc * d)
        .zip(xs.par_chunks(rc * d).zip(gs.par_chunks(rc * d)))
        .zip(s.mean.par_chunks(rc).zip(s.rstd.par_chunks(rc)))
        .map(|((dx, (x, g)), (mean, rstd))| {
            let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
            let (mut xhat, mut dxhat) = (vec![0f32; d], vec![0f32; d]);
            layer_norm_grad_rows(dx, &mut dw, &mut db, &mut xhat, &mut dxhat, x, g, mean, rstd, w);
            (dw, db)
        })
        .collect();
    let mut dw = vec![0f32; d];
    let mut db = vec![0f32; d];
    for (pw, pb) in &partials {
        for j in 0..d {
            dw[j] += pw[j];
            db[j] += pb[j];
        }
    }
    (tensor(dx, s.x.shape()), tensor(dw, Shape::new([d])), tensor(db, Shape::new([d])))
}

#[derive(Debug)]
struct LayerNormBackward;

impl Backward<Flex, 3> for LayerNormBackward {
    type State = LnState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<Flex>(&ops.node);
        let [px, pw, pb] = ops.parents;
        let (dx, dw, db) = layer_norm_backward(&ops.state, &g);
        if let Some(node) = px {
            grads.register::<Flex>(node.id, dx);
        }
        if let Some(node) = pw {
            grads.register::<Flex>(node.id, dw);
        }
        if let Some(node) = pb {
            grads.register::<Flex>(node.id, db);
        }
    }
}

/// LayerNorm over the last axis (`weight`, `bias`: `[d]`) on burn-flex; `Err` with the inputs
/// back on other backends.
#[allow(clippy::type_complexity)]
pub(crate) fn layer_norm<B: burn::tensor::backend::Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    bias: Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, 1>, Tensor<B, 1>)> {
    let d = weight.dims()[0];
    let f32s = weight.dtype() == DType::F32 && bias.dtype() == DType::F32;
    if x.dims()[D - 1] != d || bias.dims()[0] != d || d == 0 || !f32s {
        return Err((x, weight, bias));
    }
    let x = match on_flex(x) {
        Ok(x) => x,
        Err(x) => return Err((x, weight, bias)),
    };
    // `weight` and `bias` are on the same backend as `x`, so these casts succeed.
    Ok(match x {
        OnFlex::Plain(x) => {
            let w: FlexTensor = same::<_, Tensor<Flex, 1>>(weight).into_primitive().tensor();
            let b: FlexTensor = same::<_, Tensor<Flex, 1>>(bias).into_primitive().tensor();
            let (w, b, x) = (
                FlexTensor::to_contiguous(&w),
                FlexTensor::to_contiguous(&b),
                FlexTensor::to_contiguous(&x),
            );
            plain_tensor(layer_norm_forward(&x, slice(&w), slice(&b), eps as f32).0)
        }
        OnFlex::Train(x) => {
            let w: AutodiffTensor = same::<_, Tensor<AdFlex, 1>>(weight).into_primitive().tensor();
            let b: AutodiffTensor = same::<_, Tensor<AdFlex, 1>>(bias).into_primitive().tensor();
            let (xc, wc, bc) = (
                FlexTensor::to_contiguous(&x.primitive),
                FlexTensor::to_contiguous(&w.primitive),
                FlexTensor::to_contiguous(&b.primitive),
            );
            let (y, mean, rstd) = layer_norm_forward(&xc, slice(&wc), slice(&bc), eps as f32);
            let out = match LayerNormBackward
                .prepare::<NoCheckpointing>([x.node.clone(), w.node.clone(), b.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(
                    LnState {
                        x: xc,
                        mean: std::sync::Arc::new(mean),
                        rstd: std::sync::Arc::new(rstd),
                        w: wc,
                    },
                    y,
                ),
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            train_tensor(out)
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Multi-head attention core: `softmax(scale q k^T) v` per head

/// Geometry of one attention call: `qkv: [b, n, 3 d]` holds q, k and v (each `heads x hd`,
/// the reference's `(3, heads, hd)` split of the last axis); the output is `[b, n, d]`.
#[derive(Debug, Clone, Copy)]
struct AttnShape {
    b: usize,
    n: usize,
    heads: usize,
    hd: usize,
}

impl AttnShape {
    fn d(&self) -> usize {
        self.heads * self.hd
    }
}

/// A raw pointer that rayon tasks may share: each task writes a disjoint set of elements
/// (its batch item's rows, its head's columns).
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: used only for disjoint writes from the tasks of one parallel loop, which the
// caller's exclusive borrow of the buffer outlives.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// `dst[m, n] = lhs[m, k] rhs[k, n]` with element strides (row, column) for each operand;
/// `parallelism` is gemm's own split of the product over rayon's pool (`None` where the
/// callers already parallelise, over heads).
///
/// # Safety
/// Every pointer must address the whole strided matrix it describes.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_with(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs,
            false,
            lhs,
            lhs_cs,
            lhs_rs,
            rhs,
            rhs_cs,
            rhs_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Forward: the output `[b, n, d]` and, when `keep`, the probabilities `[b, heads, n, n]`.
fn attention_forward(qkv: &[f32], s: AttnShape, scale: f32, keep: bool) -> (Vec<f32>, Vec<f32>) {
    let AttnShape { b, n, heads, hd } = s;
    let d = s.d();
    let (row3, nn) = (3 * d, n * n);
    let mut out = vec![0f32; b * n * d];
    let mut probs = if keep { vec![0f32; b * heads * nn] } else { Vec::new() };
    let out_ptr = SharedMut(out.as_mut_ptr());
    let task = |bh: usize, p: &mut [f32]| {
        let (bi, h) = (bh / heads, bh % heads);
        let base = bi * n * row3 + h * hd;
        let (q, k, v) =
            (qkv[base..].as_ptr(), qkv[base + d..].as_ptr(), qkv[base + 2 * d..].as_ptr());
        let o = out_ptr;
        // SAFETY: q, k, v are `n x hd` blocks of rows `3d` apart inside `qkv`; `p` is `n x n`;
        // the output block (rows of batch item `bi`, columns of head `h`) is written by this
        // task only, and `out` outlives the loop.
        unsafe {
            gemm_with(
                n,
                n,
                hd,
                p.as_mut_ptr(),
                n as isize,
                q,
                row3 as isize,
                1,
                k,
                1,
                row3 as isize,
                gemm::Parallelism::None,
            );
            softmax_rows(p, n, scale);
            let dst = o.0.add(bi * n * d + h * hd);
            gemm_with(
                n,
                hd,
                n,
                dst,
                d as isize,
                p.as_ptr(),
                n as isize,
                1,
                v,
                row3 as isize,
                1,
                gemm::Parallelism::None,
            );
        }
    };
    if keep {
        probs.par_chunks_mut(nn).enumerate().for_each(|(bh, p)| task(bh, p));
    } else {
        (0..b * heads).into_par_iter().for_each_init(|| vec![0f32; nn], |p, bh| task(bh, p));
    }
    (out, probs)
}

/// Backward: `d qkv` `[b, n, 3d]` from the output's gradient `g` `[b, n, d]`.
fn attention_backward(qkv: &[f32], probs: &[f32], g: &[f32], s: AttnShape, scale: f32) -> Vec<f32> {
    let AttnShape { b, n, heads, hd } = s;
    let d = s.d();
    let (row3, nn) = (3 * d, n * n);
    let mut dqkv = vec![0f32; b * n * row3];
    let dst = SharedMut(dqkv.as_mut_ptr());
    (0..b * heads).into_par_iter().for_each_init(
        || vec![0f32; nn],
        |ds, bh| {
            let (bi, h) = (bh / heads, bh % heads);
            let base = bi * n * row3 + h * hd;
            let (q, k, v) =
                (qkv[base..].as_ptr(), qkv[base + d..].as_ptr(), qkv[base + 2 * d..].as_ptr());
            let p = &probs[bh * nn..(bh + 1) * nn];
            let go = g[bi * n * d + h * hd..].as_ptr();
            let out = dst;
            // SAFETY: as in the forward; this task writes the q, k and v columns of head `h`
            // in the rows of batch item `bi` of `dqkv`, and nothing else.
            unsafe {
                let dv = out.0.add(base + 2 * d);
                // dV = P^T dO
                gemm_with(
                    n,
                    hd,
                    n,
                    dv,
                    row3 as isize,
                    p.as_ptr(),
                    1,
                    n as isize,
                    go,
                    d as isize,
                    1,
                    gemm::Parallelism::None,
                );
                // dP = dO V^T
                gemm_with(
                    n,
                    n,
                    hd,
                    ds.as_mut_ptr(),
                    n as isize,
                    go,
                    d as isize,
                    1,
                    v,
                    1,
                    row3 as isize,
                    gemm::Parallelism::None,
                );
            }
            // dS = scale * P * (dP - rowsum(dP * P))
            softmax_grad_rows(ds, p, n, scale);
            // SAFETY: as above.
            unsafe {
                let (dq, dk) = (out.0.add(base), out.0.add(base + d));
                // dQ = dS K, dK = dS^T Q
                gemm_with(
                    n,
                    hd,
                    n,
                    dq,
                    row3 as isize,
                    ds.as_ptr(),
                    n as isize,
                    1,
                    k,
                    row3 as isize,
                    1,
                    gemm::Parallelism::None,
                );
                gemm_with(
                    n,
                    hd,
                    n,
                    dk,
                    row3 as isize,
                    ds.as_ptr(),
                    1,
                    n as isize,
                    q,
                    row3 as isize,
                    1,
                    gemm::Parallelism::None,
                );
            }
        },
    );
    dqkv
}

/// What the attention backward keeps.
#[derive(Debug, Clone)]
struct AttnState {
    qkv: FlexTensor,
    probs: std::sync::Arc<Vec<f32>>,
    shape: AttnShape,
    scale: f32,
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Flex, 1> for AttentionBackward {
    type State = AttnState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let st = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
            let g = FlexTensor::to_contiguous(&g);
            let d = attention_backward(slice(&st.qkv), &st.probs, slice(&g), st.shape, st.scale);
            tensor(d, st.qkv.shape())
        });
    }
}

/// `softmax(scale q k^T) v` per head on burn-flex, from one `[B, N, 3D]` projection (q, k, v
/// blocks of `heads` heads each) to `[B, N, D]` with the heads' outputs side by side; `Err`
/// with the input back on other backends. No copy of q, k or v is made, forward or backward:
/// each head's products read the projection in place.
pub(crate) fn attention<B: burn::tensor::backend::Backend>(
    qkv: Tensor<B, 3>,
    heads: usize,
    scale: f32,
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    let [b, n, d3] = qkv.dims();
    if heads == 0 || d3 % (3 * heads) != 0 {
        return Err(qkv);
    }
    let s = AttnShape { b, n, heads, hd: d3 / (3 * heads) };
    let out_shape = Shape::new([b, n, s.d()]);
    Ok(match on_flex(qkv)? {
        OnFlex::Plain(x) => {
            let x = FlexTensor::to_contiguous(&x);
            let (out, _) = attention_forward(slice(&x), s, scale, false);
            plain_tensor(tensor(out, out_shape))
        }
        OnFlex::Train(x) => {
            let xc = FlexTensor::to_contiguous(&x.primitive);
            let tracked = AttentionBackward
                .prepare::<NoCheckpointing>([x.node.clone()])
                .compute_bound()
                .stateful();
            let keep = matches!(tracked, OpsKind::Tracked(_));
            let (out, probs) = attention_forward(slice(&xc), s, scale, keep);
            let out = tensor(out, out_shape);
            let out = match tracked {
                OpsKind::Tracked(prep) => prep.finish(
                    AttnState { qkv: xc, probs: std::sync::Arc::new(probs), shape: s, scale },
                    out,
                ),
                OpsKind::UnTracked(prep) => prep.finish(out),
            };
            train_tensor(out)
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Linear layer `y = x W^T + b`

/// gemm's own split of an `m x k` by `k x n` product over rayon's pool, as burn-flex's own
/// products take it (`Parallelism::Rayon(0)`), for all but small products.
fn pool_split(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    if m * n * k >= 1 << 18 && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    }
}

multiversion! {
    /// `y[r, :] += b` for each row of one chunk.
    fn add_bias_rows(y: &mut [f32], b: &[f32]) {
        for row in y.chunks_exact_mut(b.len()) {
            for (y, &b) in row.iter_mut().zip(b) {
                *y += b;
            }
        }
    }
}

multiversion! {
    /// Column sums of one chunk of `g`'s rows, added to `acc` (`acc.len()` wide).
    fn column_sums(acc: &mut [f32], g: &[f32]) {
        for row in g.chunks_exact(acc.len()) {
            for (a, &g) in acc.iter_mut().zip(row) {
                *a += g;
            }
        }
    }
}

/// `x [rows, k] W^T + b` with `W: [n, k]`: the output `[rows, n]`.
fn linear_forward(x: &[f32], w: &[f32], b: &[f32], rows: usize, k: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0f32; rows * n];
    // SAFETY: `x` is `rows x k`, `w` is `n x k` (read transposed), `y` is `rows x n`.
    unsafe {
        gemm_with(
            rows,
            n,
            k,
            y.as_mut_ptr(),
            n as isize,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            pool_split(rows, n, k),
        );
    }
    y.par_chunks_mut(rows_per_chunk(n) * n).for_each(|y| add_bias_rows(y, b));
    y
}

/// Gradients of `x`, `W` and `b` from the output's gradient `g [rows, n]`.
fn linear_backward(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    rows: usize,
    k: usize,
    n: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut dx = vec![0f32; rows * k];
    let mut dw = vec![0f32; n * k];
    // SAFETY: `g` is `rows x n`, `w` is `n x k`, `x` is `rows x k`; `dx` is `rows x k`, `dw` is
    // `n x k` (`g` read transposed).
    unsafe {
        gemm_with(
            rows,
            k,
            n,
            dx.as_mut_ptr(),
            k as isize,
            g.as_ptr(),
            n as isize,
            1,
            w.as_ptr(),
            k as isize,
            1,
            pool_split(rows, k, n),
        );
        gemm_with(
            n,
            k,
            rows,
            dw.as_mut_ptr(),
            k as isize,
            g.as_ptr(),
            1,
            n as isize,
            x.as_ptr(),
            k as isize,
            1,
            pool_split(n, k, rows),
        );
    }
    // Per-chunk column sums, added in chunk order (independent of the thread count).
    let partials: Vec<Vec<f32>> = g
        .par_chunks(rows_per_chunk(n) * n)
        .map(|g| {
            let mut acc = vec![0f32; n];
            column_sums(&mut acc, g);
            acc
        })
        .collect();
    let mut db = vec![0f32; n];
    for p in &partials {
        for (d, &v) in db.iter_mut().zip(p) {
            *d += v;
        }
    }
    (dx, dw, db)
}

/// What the linear layer's backward keeps: the (contiguous) input and weight.
#[derive(Debug, Clone)]
struct LinearState {
    x: FlexTensor,
    w: FlexTensor,
}

#[derive(Debug)]
struct LinearBackward;

impl Backward<Flex, 3> for LinearBackward {
    type State = LinearState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = FlexTensor::to_contiguous(&grads.consume::<Flex>(&ops.node));
        let [px, pw, pb] = ops.parents;
        let st = ops.state;
        let wshape = st.w.shape();
        let (n, k) = (wshape[0], wshape[1]);
        let rows = st.x.shape().num_elements() / k.max(1);
        let (dx, dw, db) = linear_backward(slice(&st.x), slice(&st.w), slice(&g), rows, k, n);
        if let Some(node) = px {
            grads.register::<Flex>(node.id, tensor(dx, st.x.shape()));
        }
        if let Some(node) = pw {
            grads.register::<Flex>(node.id, tensor(dw, wshape));
        }
        if let Some(node) = pb {
            grads.register::<Flex>(node.id, tensor(db, Shape::new([n])));
        }
    }
}

/// `x W^T + b` over the last axis of `x` (`W: [n, k]`, PyTorch's layout; `b: [n]`) on
/// burn-flex: one product split over the pool, the bias added in parallel, and one autodiff
/// node whose backward makes the three gradients with two products and a parallel column sum
/// (burn's composed form adds the bias, reshapes and sums its gradient on the calling
/// thread). `Err` with the inputs back on other backends.
#[allow(clippy::type_complexity)]
pub(crate) fn linear<B: burn::tensor::backend::Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Tensor<B, 1>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, 2>, Tensor<B, 1>)> {
    let [n, k] = weight.dims();
    let f32s = weight.dtype() == DType::F32 && bias.dtype() == DType::F32;
    if x.dims()[D - 1] != k || bias.dims()[0] != n || n == 0 || k == 0 || !f32s {
        return Err((x, weight, bias));
    }
    let mut out_dims = x.dims();
    out_dims[D - 1] = n;
    let out_shape = Shape::new(out_dims);
    let rows = out_shape.num_elements() / n;
    let x = match on_flex(x) {
        Ok(x) => x,
        Err(x) => return Err((x, weight, bias)),
    };
    // `weight` and `bias` are on the same backend as `x`, so these casts succeed.
    Ok(match x {
        OnFlex::Plain(x) => {
            let w: FlexTensor = same::<_, Tensor<Flex, 2>>(weight).into_primitive().tensor();
            let b: FlexTensor = same::<_, Tensor<Flex, 1>>(bias).into_primitive().tensor();
            let (x, w, b) = (
                FlexTensor::to_contiguous(&x),
                FlexTensor::to_contiguous(&w),
                FlexTensor::to_contiguous(&b),
            );
            let y = linear_forward(slice(&x), slice(&w), slice(&b), rows, k, n);
            plain_tensor(tensor(y, out_shape))
        }
        OnFlex::Train(x) => {
            let w: AutodiffTensor = same::<_, Tensor<AdFlex, 2>>(weight).into_primitive().tensor();
            let b: AutodiffTensor = same::<_, Tensor<AdFlex, 1>>(bias).into_primitive().tensor();
            let (xc, wc, bc) = (
                FlexTensor::to_contiguous(&x.primitive),
                FlexTensor::to_contiguous(&w.primitive),
                FlexTensor::to_contiguous(&b.primitive),
            );
            let y =
                tensor(linear_forward(slice(&xc), slice(&wc), slice(&bc), rows, k, n), out_shape);
            let out = match LinearBackward
                .prepare::<NoCheckpointing>([x.node.clone(), w.node.clone(), b.node.clone()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(LinearState { x: xc, w: wc }, y),
                OpsKind::UnTracked(prep) => prep.finish(y),
            };
            train_tensor(out)
        }
    })
}

// ---------------------------------------------------------------------------------------------
// AdamW

multiversion! {
    /// PyTorch's AdamW (single tensor, not fused) on one chunk, in its order of operations.
    fn adamw_rows(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: &AdamwScalars) {
        let gs = s.grad_scale.unwrap_or(1.0);
        let scaled = s.grad_scale.is_some();
        for (((p, m), v), &g) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            let g = if scaled { g * gs } else { g };
            let p1 = *p * s.decay;
            let m1 = *m + (g - *m) * s.one_minus_b1;
            let v1 = *v * s.b2 + g * g * s.one_minus_b2;
            let denom = v1.sqrt() / s.sqrt_bc2 + s.eps;
            *p = p1 - (m1 / denom) * s.step_size;
            *m = m1;
            *v = v1;
        }
    }
}

/// One AdamW update `(param, exp_avg, exp_avg_sq)` from the gradient, in one parallel pass
/// on burn-flex (the composed form is about 15 passes, each on the calling thread); `Err`
/// with the inputs back on other backends. The results are those of the composed form, bit
/// for bit (the same f32 operations in the same order; tested).
#[allow(clippy::type_complexity)]
pub(crate) fn adamw<B: burn::tensor::backend::Backend>(
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
    s: &AdamwScalars,
) -> Result<
    (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>),
    (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>),
> {
    let n = p.dims()[0];
    let f32s = [&g, &m, &v].iter().all(|t| t.dtype() == DType::F32);
    if !f32s || [g.dims()[0], m.dims()[0], v.dims()[0]] != [n, n, n] {
        return Err((p, g, m, v));
    }
    let p = match on_flex(p) {
        Ok(OnFlex::Plain(p)) => p,
        Ok(OnFlex::Train(p)) => {
            // Parameters are updated on the inner backend; an autodiff tensor is handed back.
            return Err((train_tensor(p), g, m, v));
        }
        Err(p) => return Err((p, g, m, v)),
    };
    let prim = |t: Tensor<B, 1>| -> FlexTensor {
        FlexTensor::to_contiguous(&same::<_, Tensor<Flex, 1>>(t).into_primitive().tensor())
    };
    let (g, m, v) = (prim(g), prim(m), prim(v));
    let mut pv = slice(&FlexTensor::to_contiguous(&p)).to_vec();
    let mut mv = slice(&m).to_vec();
    let mut vv = slice(&v).to_vec();
    pv.par_chunks_mut(CHUNK)
        .zip(mv.par_chunks_mut(CHUNK).zip(vv.par_chunks_mut(CHUNK)))
        .zip(slice(&g).par_chunks(CHUNK))
        .for_each(|((p, (m, v)), g)| adamw_rows(p, m, v, g, s));
    let shape = Shape::new([n]);
    Ok((
        plain_tensor(tensor(pv, shape.clone())),
        plain_tensor(tensor(mv, shape.clone())),
        plain_tensor(tensor(vv, shape)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers::{
        LayerNorm, gelu, gelu_composed, softmax_scaled, softmax_scaled_composed,
    };
    use burn::module::{AutodiffModule, Param};
    use burn::tensor::{Distribution, Tolerance};

    type B = AdFlex;

    fn input(shape: [usize; 3], seed: u64) -> Tensor<B, 3> {
        let n: usize = shape.iter().product();
        let mut s = seed;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0
            })
            .collect();
        Tensor::from_data(TensorData::new(v, shape), &Default::default()).require_grad()
    }

    fn close<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) {
        a.into_data().assert_approx_eq::<f32>(&b.into_data(), Tolerance::absolute(2e-6));
    }

    fn close_inner<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) {
        a.into_data().assert_approx_eq::<f32>(&b.into_data(), Tolerance::absolute(2e-6));
    }

    #[test]
    fn exp_and_erf_are_within_their_stated_error() {
        let mut worst_exp = 0f64;
        let mut worst_erf = 0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 * 4.3e-4; // [-86, 86]
            let e = f64::from(x).exp();
            worst_exp = worst_exp.max((f64::from(exp_f32(x)) - e).abs() / e);
            let y = i as f32 * 3e-5; // [-6, 6]
            worst_erf = worst_erf.max((f64::from(erf_f32(y)) - libm::erf(f64::from(y))).abs());
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp:e}");
        assert!(worst_erf < 6e-7, "erf absolute error {worst_erf:e}");
        assert!(exp_f32(-100.0) < 1.2e-38 && exp_f32(f32::NEG_INFINITY) < 1.2e-38);
        assert!(erf_f32(0.0).abs() < 1e-7 && erf_f32(-3.0) < -0.99997);
        assert!(exp_f32(f32::NAN).is_nan() && erf_f32(f32::NAN).is_nan());
    }

    #[test]
    fn dispatch_finds_flex_with_and_without_autodiff() {
        let x = input([2, 3, 4], 1);
        assert!(matches!(on_flex(x.clone()), Ok(OnFlex::Train(_))));
        assert!(matches!(on_flex(x.inner()), Ok(OnFlex::Plain(_))));
        let ints = Tensor::<B, 1, burn::tensor::Int>::arange(0..4, &Default::default());
        let half = ints.float().cast(burn::tensor::DType::F16);
        assert!(on_flex(half).is_err(), "an f16 tensor takes the composed ops");
    }

    #[test]
    fn gelu_matches_the_composed_form_forward_and_backward() {
        let x = input([3, 17, 40], 2);
        let w = input([3, 17, 40], 3).detach(); // an arbitrary upstream gradient
        let y = gelu(x.clone());
        let y0 = gelu_composed(x.clone());
        close(y.clone(), y0.clone());
        let g = (y * w.clone()).sum().backward();
        let g0 = (y0 * w).sum().backward();
        close_inner(x.grad(&g).unwrap(), x.grad(&g0).unwrap());
        close_inner(gelu(x.clone().inner()), gelu_composed(x.inner()));
    }

    #[test]
    fn scaled_softmax_matches_the_composed_form_forward_and_backward() {
        // Rows of 37 (not a multiple of 8) and of 196 (the attention's), scale as attention's.
        for (shape, scale) in [([4, 5, 37], 0.125), ([2, 3, 196], 1.0), ([1, 1, 1], 3.0)] {
            let x = input(shape, 4);
            let w = input(shape, 5).detach();
            let y = softmax_scaled(x.clone(), scale, 2);
            let y0 = softmax_scaled_composed(x.clone(), scale, 2);
            close(y.clone(), y0.clone());
            let g = (y * w.clone()).sum().backward();
            let g0 = (y0 * w).sum().backward();
            close_inner(x.grad(&g).unwrap(), x.grad(&g0).unwrap());
        }
    }

    #[test]
    fn layer_norm_matches_the_composed_form_forward_and_backward() {
        let device = Default::default();
        let d = 44;
        let ln = LayerNorm::<B> {
            weight: Param::from_tensor(Tensor::random(
                [d],
                Distribution::Normal(1.0, 0.3),
                &device,
            )),
            bias: Param::from_tensor(Tensor::random([d], Distribution::Normal(0.0, 0.3), &device)),
            eps: 1e-6,
        };
        // 2 x 300 rows: more than one parallel chunk.
        let x = input([2, 300, d], 6);
        let w = input([2, 300, d], 7).detach();
        let y = ln.forward(x.clone());
        let y0 = ln.forward_composed(x.clone());
        close(y.clone(), y0.clone());
        let g = (y * w.clone()).sum().backward();
        let g0 = (y0 * w).sum().backward();
        close_inner(x.grad(&g).unwrap(), x.grad(&g0).unwrap());
        let (gw, gw0) = (ln.weight.grad(&g).unwrap(), ln.weight.grad(&g0).unwrap());
        gw.into_data().assert_approx_eq::<f32>(&gw0.into_data(), Tolerance::absolute(5e-4));
        let (gb, gb0) = (ln.bias.grad(&g).unwrap(), ln.bias.grad(&g0).unwrap());
        gb.into_data().assert_approx_eq::<f32>(&gb0.into_data(), Tolerance::absolute(5e-4));
        let inner = ln.valid();
        close_inner(inner.forward(x.clone().inner()), inner.forward_composed(x.inner()));
    }

    #[test]
    fn attention_matches_the_composed_form_forward_and_backward() {
        use crate::model::layers::Linear;
        use crate::model::vit::Attention;
        let device = Default::default();
        // 3 heads of 8, 2 items of 13 tokens (odd sizes: strides, not shapes, carry the heads).
        let (heads, hd, b, n) = (3, 8, 2, 13);
        let d = heads * hd;
        let att = Attention::<B> {
            qkv: Linear::new(d, 3 * d, true, &device),
            proj: Linear::new(d, d, true, &device),
            num_heads: heads,
        };
        let qkv = input([b, n, 3 * d], 9);
        let w = input([b, n, d], 10).detach();
        let scale = (hd as f32).powf(-0.5);
        let y = attention(qkv.clone(), heads, scale).ok().unwrap();
        let y0 = att.attention_composed(qkv.clone());
        close(y.clone(), y0.clone());
        let g = (y * w.clone()).sum().backward();
        let g0 = (y0 * w).sum().backward();
        close_inner(qkv.grad(&g).unwrap(), qkv.grad(&g0).unwrap());
        let plain = attention(qkv.clone().inner(), heads, scale).ok().unwrap();
        close_inner(plain, att.valid().attention_composed(qkv.inner()));
        // The whole layer (projection, attention, output projection) against the map-returning
        // composed form, which the attention-map tools use.
        let x = input([b, n, d], 11);
        close(att.forward(x.clone()), att.forward_with_attn(x).0);
    }

    #[test]
    fn linear_matches_the_composed_form_forward_and_backward() {
        use crate::model::layers::Linear;
        let device = Default::default();
        // 2 x 300 rows (more than one chunk of the bias sums), 40 -> 70.
        let lin = Linear::<B>::new(40, 70, true, &device);
        let x = input([2, 300, 40], 16);
        let w = input([2, 300, 70], 17).detach();
        let y = lin.forward(x.clone());
        let y0 = lin.forward_composed(x.clone());
        close(y.clone(), y0.clone());
        let g = (y * w.clone()).sum().backward();
        let g0 = (y0 * w).sum().backward();
        close_inner(x.grad(&g).unwrap(), x.grad(&g0).unwrap());
        let tol = Tolerance::absolute(2e-4);
        let (gw, gw0) = (lin.weight.grad(&g).unwrap(), lin.weight.grad(&g0).unwrap());
        gw.into_data().assert_approx_eq::<f32>(&gw0.into_data(), tol);
        let b = lin.bias.as_ref().unwrap();
        let (gb, gb0) = (b.grad(&g).unwrap(), b.grad(&g0).unwrap());
        gb.into_data().assert_approx_eq::<f32>(&gb0.into_data(), tol);
        let inner = lin.valid();
        close_inner(inner.forward(x.clone().inner()), inner.forward_composed(x.inner()));
    }

    #[test]
    fn adamw_is_the_composed_update_bit_for_bit() {
        let n = 40_000; // more than two parallel chunks
        let flat = |seed| input([1, 1, n], seed).inner().reshape([n]);
        let (p, g) = (flat(12), flat(13));
        let m = flat(14) * 0.1;
        let v = flat(15).powi_scalar(2) * 0.01;
        let (lr, wd, b1, b2, eps, step) = (5e-4f64, 0.04f64, 0.9f64, 0.999f64, 1e-8f64, 3);
        let (bc1, bc2) = (1.0 - b1.powi(step), 1.0 - b2.powi(step));
        for clip in [None, Some(0.37f32)] {
            let s = AdamwScalars {
                grad_scale: clip,
                decay: (1.0 - lr * wd) as f32,
                one_minus_b1: (1.0 - b1) as f32,
                b2: b2 as f32,
                one_minus_b2: (1.0 - b2) as f32,
                sqrt_bc2: bc2.sqrt() as f32,
                eps: eps as f32,
                step_size: (lr / bc1) as f32,
            };
            let (p1, m1, v1) = adamw(p.clone(), g.clone(), m.clone(), v.clone(), &s).ok().unwrap();
            // The composed form of pretrain/step.rs.
            let g = match clip {
                Some(c) => g.clone() * c,
                None => g.clone(),
            };
            let p0 = p.clone() * (1.0 - lr * wd);
            let m0 = m.clone() + (g.clone() - m.clone()) * (1.0 - b1);
            let v0 = v.clone() * b2 + g.clone() * g * (1.0 - b2);
            let denom = v0.clone().sqrt() / bc2.sqrt() + eps;
            let p0 = p0 - (m0.clone() / denom) * (lr / bc1);
            assert_eq!(p1.into_data(), p0.into_data());
            assert_eq!(m1.into_data(), m0.into_data());
            assert_eq!(v1.into_data(), v0.into_data());
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let d = 64;
        let x = input([4, 700, d], 8);
        let ln = LayerNorm::<B>::new(d, 1e-6, &Default::default());
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let y = softmax_scaled(gelu(ln.forward(x.clone())), 0.3, 2);
                let g = y.clone().powi_scalar(2).sum().backward();
                (
                    y.inner().into_data(),
                    x.grad(&g).unwrap().into_data(),
                    ln.weight.grad(&g).unwrap().into_data(),
                )
            })
        };
        assert_eq!(run(1), run(3));
    }
}
