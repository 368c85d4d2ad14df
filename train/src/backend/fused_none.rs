//! The fused ops of `fused_flex.rs` in a build without burn-flex: each declines, handing its
//! inputs back, so the callers run the composed forms.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;

pub(crate) use super::AdamwScalars;

/// Never: no fused ops in this build.
pub(crate) fn enabled<B: Backend>() -> bool {
    false
}

pub(crate) fn gelu<B: Backend, const D: usize>(
    x: Tensor<B, D>,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    Err(x)
}

pub(crate) fn softmax_last<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    _scale: f32,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    Err(x)
}

#[allow(clippy::type_complexity)]
pub(crate) fn layer_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    bias: Tensor<B, 1>,
    _eps: f64,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, 1>, Tensor<B, 1>)> {
    Err((x, weight, bias))
}

pub(crate) fn attention<B: Backend>(
    qkv: Tensor<B, 3>,
    _heads: usize,
    _scale: f32,
) -> Result<Tensor<B, 3>, Tensor<B, 3>> {
    Err(qkv)
}

#[allow(clippy::type_complexity)]
pub(crate) fn linear<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Tensor<B, 1>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, 2>, Tensor<B, 1>)> {
    Err((x, weight, bias))
}

#[allow(clippy::type_complexity)]
pub(crate) fn adamw<B: Backend>(
    p: Tensor<B, 1>,
    g: Tensor<B, 1>,
    m: Tensor<B, 1>,
    v: Tensor<B, 1>,
    _s: &AdamwScalars,
) -> Result<
    (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>),
    (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>),
> {
    Err((p, g, m, v))
}
