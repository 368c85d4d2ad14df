//! A ViT's patch embedding (a `Conv` whose stride equals its kernel, no padding) as one
//! patch gather plus one `gemm` product.
//!
//! tract lowers that convolution to an im2col and its own f32 matmul: 0.99 ms of an int8
//! ViT-Ti/16 frame at 1 thread (`docs/PERFORMANCE.md`), about 29 G multiply-adds/s, where
//! the `gemm` crate runs the same product's shape at about twice that. Non-overlapping
//! patches make the im2col a plain copy of `kernel_w`-float runs, so
//! [`substitute_patch_embeddings`] replaces such a `Conv` with [`PatchEmbed`]: copy the
//! patches into `[tokens, C kh kw]`, multiply by the transposed `[C kh kw, D]` weights with
//! the bias as the product's initial value, and write the result NCHW as the `Conv` did.

// One gemm call on owned buffers and an output allocated without zeroing; each unsafe
// block states why it is sound.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::{Int8Layer, QdqLayer};

/// Below this many multiply-adds the product stays on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// `[N, C, H, W]` -> `[N, D, H / kh, W / kw]`: a convolution with stride = kernel, no
/// padding, no dilation, one group, f32.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    /// Kernel height and width (= the strides).
    kernel: (usize, usize),
    /// Output channels.
    d: usize,
    /// Values per patch, `C * kh * kw`.
    k: usize,
    /// Int8 weights (a QDQ `Conv` lowered by [`super::lower_qdq_matmuls`]): the patches are
    /// quantized and multiplied on the integer kernel, bias included; `weight_t` is then
    /// empty.
    int8: Option<Arc<Int8Layer>>,
    /// `[C * kh * kw, D]` row-major: the ONNX `OIHW` weights flattened and transposed, so
    /// that the product is row-major throughout (the fastest of the layouts measured for
    /// ViT-Ti/16's 196 x 768 x 192: 0.47 ms against 0.68-0.81 ms with a transposed operand).
    weight_t: Arc<Vec<f32>>,
    /// `[D]`.
    bias: Arc<Vec<f32>>,
}

impl PartialEq for PatchEmbed {
    fn eq(&self, other: &Self) -> bool {
        self.kernel == other.kernel
            && Arc::ptr_eq(&self.weight_t, &other.weight_t)
            && Arc::ptr_eq(&self.bias, &other.bias)
            && match (&self.int8, &other.int8) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (a, b) => a.is_none() && b.is_none(),
            }
    }
}
impl Eq for PatchEmbed {}

impl PatchEmbed {
    /// Kernel height and width (= the strides): the patch size.
    pub fn kernel(&self) -> (usize, usize) {
        self.kernel
    }
}

impl PatchEmbed {
    /// The op for `weight` `[D, C, kh, kw]` (row-major) and `bias` `[D]`.
    pub fn new(weight: &[f32], bias: Vec<f32>, d: usize, kernel: (usize, usize)) -> Self {
        let k = weight.len() / d.max(1);
        let weight_t = (0..k * d).map(|i| weight[(i % d) * k + i / d]).collect();
        Self { kernel, d, k, int8: None, weight_t: Arc::new(weight_t), bias: Arc::new(bias) }
    }

    /// The op on int8 weights (`layer`: `[C kh kw, D]` with the bias folded in).
    pub fn int8(layer: Int8Layer, k: usize, d: usize, kernel: (usize, usize)) -> Self {
        Self {
            kernel,
            d,
            k,
            int8: Some(Arc::new(layer)),
            weight_t: Arc::default(),
            bias: Arc::default(),
        }
    }

    fn k(&self) -> usize {
        self.k
    }

    fn out_shape(&self, input: &[usize]) -> TractResult<[usize; 4]> {
        let [n, c, h, w] = *input else {
            bail!("PatchEmbed: input of rank {}, expected [N, C, H, W]", input.len())
        };
        let (kh, kw) = self.kernel;
        ensure!(
            c * kh * kw == self.k(),
            "PatchEmbed: {c} input channels for {}x{kh}x{kw} weights",
            self.k()
        );
        ensure!(h >= kh && w >= kw, "PatchEmbed: input {h}x{w} smaller than the {kh}x{kw} kernel");
        Ok([n, self.d, h / kh, w / kw])
    }

    /// `rows [T, D] = patches [T, K] · W + bias`: on the integer kernel for int8 weights,
    /// else one row-major `gemm` product with the bias as its initial value.
    fn product(&self, patches: &[f32], tokens: usize, rows: &mut [f32]) {
        if let Some(layer) = &self.int8 {
            layer.run(patches, tokens, rows);
            return;
        }
        let (k, d) = (self.k(), self.d);
        for row in rows.chunks_exact_mut(d) {
            row.copy_from_slice(&self.bias);
        }
        let parallelism = match super::pool_threads() {
            t if t > 1 && d * tokens * k >= PARALLEL_MIN_MACS => gemm::Parallelism::Rayon(t),
            _ => gemm::Parallelism::None,
        };
        // Safety: `rows` holds tokens x d floats, `patches` tokens x k, `weight_t` k x d:
        // exactly the extents the strides below address.
        unsafe {
            gemm::gemm(
                tokens,
                d,
                k,
                rows.as_mut_ptr(),
                1,
                d as isize,
                true,
                patches.as_ptr(),
                1,
                k as isize,
                self.weight_t.as_ptr(),
                1,
                d as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }

    /// Patches of one image `[C, H, W]` (`chw`) into `patches` `[gh * gw, C * kh * kw]`.
    fn gather(
        &self,
        x: &[f32],
        (c, h, w): (usize, usize, usize),
        (gh, gw): (usize, usize),
        patches: &mut [f32],
    ) {
        let (kh, kw) = self.kernel;
        let k = c * kh * kw;
        for i in 0..gh {
            for j in 0..gw {
                let dst = &mut patches[(i * gw + j) * k..][..k];
                for ch in 0..c {
                    for r in 0..kh {
                        let src = ch * h * w + (i * kh + r) * w + j * kw;
                        dst[(ch * kh + r) * kw..][..kw].copy_from_slice(&x[src..src + kw]);
                    }
                }
            }
        }
    }
}

thread_local! {
    /// Patches `[tokens, K]` and product rows `[tokens, D]` of the current thread.
    static SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `rows` `[tokens, d]` into `out` `[d, tokens]` (NCHW, as the `Conv` wrote it).
fn to_channel_major(rows: &[f32], d: usize, tokens: usize, out: &mut [f32]) {
    for (t, row) in rows.chunks_exact(d).enumerate() {
        for (ch, v) in row.iter().enumerate() {
            out[ch * tokens + t] = *v;
        }
    }
}

impl Op for PatchEmbed {
    fn name(&self) -> StaticName {
        "PatchEmbed".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "kernel {:?} -> {} channels, k {}, {}",
            self.kernel,
            self.d,
            self.k(),
            if self.int8.is_some() { "int8" } else { "f32" }
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for PatchEmbed {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(inputs.len() == 1, "PatchEmbed takes one input");
        let x = inputs[0].to_plain_array_view::<f32>()?;
        let shape = self.out_shape(x.shape())?;
        let [_, d, gh, gw] = shape;
        let (c, h, w) = (x.shape()[1], x.shape()[2], x.shape()[3]);
        let x = x.as_slice().context("PatchEmbed: input is not contiguous")?;
        let (k, tokens) = (self.k(), gh * gw);
        // Safety: `to_channel_major` writes every value of every image's block.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        {
            let mut view = out.to_plain_array_view_mut::<f32>()?;
            let out = view.as_slice_mut().context("PatchEmbed: fresh output is not contiguous")?;
            // Per-thread scratch, reused from frame to frame (ViT-Ti/16: 0.6 MB of patches).
            SCRATCH.with_borrow_mut(|(patches, rows)| {
                patches.resize(tokens * k, 0.0);
                rows.resize(tokens * d, 0.0);
                let (patches, rows) = (&mut patches[..tokens * k], &mut rows[..tokens * d]);
                for (img, o) in x.chunks_exact(c * h * w).zip(out.chunks_exact_mut(d * tokens)) {
                    self.gather(img, (c, h, w), (gh, gw), patches);
                    self.product(patches, tokens, rows);
                    to_channel_major(rows, d, tokens, o);
                }
            });
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for PatchEmbed {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.len() == 1 && inputs[0].datum_type == f32::datum_type(),
            "PatchEmbed takes one f32 input"
        );
        let shape =
            inputs[0].shape.as_concrete().context("PatchEmbed needs a fixed input shape")?;
        Ok(tvec!(f32::fact(self.out_shape(shape)?)))
    }

    as_op!();
}

/// The [`PatchEmbed`] for `conv` at node `id` when it is one: f32, NCHW, 2-D kernel equal
/// to the strides, no padding or dilation, one group, constant weights and bias.
fn patch_embed_for(
    model: &TypedModel,
    id: usize,
    conv: &Conv,
    int8: Option<&QdqLayer>,
) -> TractResult<Option<PatchEmbed>> {
    let node = model.node(id);
    let spec = &conv.pool_spec;
    let kernel = match spec.kernel_shape.as_slice() {
        [kh, kw] => (*kh, *kw),
        _ => return Ok(None),
    };
    let strides_match = spec.strides.as_ref().is_some_and(|s| s.as_slice() == [kernel.0, kernel.1]);
    let no_dilation = spec.dilations.as_ref().is_none_or(|d| d.iter().all(|v| *v == 1));
    let no_padding = match &spec.padding {
        PaddingSpec::Valid => true,
        PaddingSpec::Explicit(a, b) => a.iter().chain(b).all(|v| *v == 0),
        _ => false,
    };
    if conv.q_params.is_some()
        || conv.group != 1
        || conv.kernel_fmt != KernelFormat::OIHW
        || spec.data_format != DataFormat::NCHW
        || !(strides_match && no_dilation && no_padding)
        || node.inputs.len() != 3
    {
        return Ok(None);
    }
    let facts = model.node_input_facts(id)?;
    if facts.iter().any(|f| f.datum_type != f32::datum_type())
        || facts[0].shape.as_concrete().is_none()
    {
        return Ok(None);
    }
    let (Some(w), Some(b)) = (facts[1].konst.as_ref(), facts[2].konst.as_ref()) else {
        return Ok(None);
    };
    let d = spec.output_channels;
    if w.shape().first() != Some(&d) || w.len() != d * spec.input_channels * kernel.0 * kernel.1 {
        return Ok(None);
    }
    let bias: Vec<f32> = match b.len() {
        1 => vec![b.cast_to_scalar::<f32>()?; d],
        n if n == d => b.to_plain_array_view::<f32>()?.iter().copied().collect(),
        _ => return Ok(None),
    };
    if let Some(l) = int8 {
        if l.patch_kernel != Some(kernel) || l.n != d || l.k != w.len() / d {
            return Ok(None);
        }
        let layer = Int8Layer::new(l.act, &l.w_q, l.k, l.n, &l.w_scale, Some(&bias));
        return Ok(Some(PatchEmbed::int8(layer, l.k, d, kernel)));
    }
    let weight: Vec<f32> = w.to_plain_array_view::<f32>()?.iter().copied().collect();
    Ok(Some(PatchEmbed::new(&weight, bias, d, kernel)))
}

/// Replaces every patch-embedding `Conv` of a decluttered model with [`PatchEmbed`] (on
/// int8 weights for the ones `layers` recorded from a QDQ file); returns how many, and how
/// many of them are int8.
pub fn substitute_patch_embeddings(
    model: &mut TypedModel,
    layers: &HashMap<String, QdqLayer>,
) -> TractResult<(usize, usize)> {
    let (mut replaced, mut int8) = (0, 0);
    for id in model.eval_order()? {
        let Some(conv) = model.node(id).op_as::<Conv>() else {
            continue;
        };
        let layer = layers.get(&model.node(id).name).filter(|l| l.patch_kernel.is_some());
        let Some(op) = patch_embed_for(model, id, conv, layer)? else {
            if let Some(l) = layer {
                tracing::warn!(layer = %model.node(id).name, kernel = ?l.patch_kernel, "QDQ Conv not lowered to an int8 patch embedding: it runs as a float convolution");
            }
            continue;
        };
        int8 += usize::from(op.int8.is_some());
        let node = model.node(id);
        let (name, input) = (node.name.clone(), node.inputs[0]);
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, input)?;
        let wire = patch.wire_node(format!("{name}.patch_embed"), op, &[x])?;
        patch.shunt_outside(model, OutletId::new(id, 0), wire[0])?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok((replaced, int8))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct convolution with stride = kernel, for comparison.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        x: &[f32],
        c: usize,
        h: usize,
        w: usize,
        weight: &[f32],
        bias: &[f32],
        d: usize,
        (kh, kw): (usize, usize),
    ) -> Vec<f32> {
        let (gh, gw) = (h / kh, w / kw);
        let mut out = vec![0f32; d * gh * gw];
        for o in 0..d {
            for i in 0..gh {
                for j in 0..gw {
                    let mut s = bias[o] as f64;
                    for ch in 0..c {
                        for r in 0..kh {
                            for q in 0..kw {
                                s += weight[((o * c + ch) * kh + r) * kw + q] as f64
                                    * x[(ch * h + i * kh + r) * w + j * kw + q] as f64;
                            }
                        }
                    }
                    out[(o * gh + i) * gw + j] = s as f32;
                }
            }
        }
        out
    }

    #[test]
    fn matches_a_direct_convolution_on_one_and_two_threads_with_ragged_edges() {
        // 3 x 35 x 50 input, 8 x 4 kernel: 4 x 12 patches, the last 3 rows and 2 columns unused.
        let (c, h, w, d, kernel) = (3usize, 35usize, 50usize, 40usize, (8usize, 4usize));
        let x: Vec<f32> =
            (0..c * h * w).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        let weight: Vec<f32> = (0..d * c * kernel.0 * kernel.1)
            .map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5)
            .collect();
        let bias: Vec<f32> = (0..d).map(|i| i as f32 / 10.0).collect();
        let expected = naive(&x, c, h, w, &weight, &bias, d, kernel);
        let op = PatchEmbed::new(&weight, bias, d, kernel);
        let input = Tensor::from_shape(&[1, c, h, w], &x).unwrap().into_tvalue();
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let out = pool.install(|| op.eval_out_of_plan(tvec!(input.clone()))).unwrap().unwrap();
            assert_eq!(out[0].shape(), &[1, d, 4, 12]);
            let got =
                out[0].to_plain_array_view::<f32>().unwrap().iter().copied().collect::<Vec<_>>();
            let worst = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "{threads} threads: worst {worst}");
        }
    }

    #[test]
    fn a_wrong_channel_count_is_an_error_naming_it() {
        let op = PatchEmbed::new(&[0.0; 2 * 3 * 4 * 4], vec![0.0; 2], 2, (4, 4));
        let input = Tensor::zero::<f32>(&[1, 1, 8, 8]).unwrap().into_tvalue();
        let err = op.eval_out_of_plan(tvec!(input)).unwrap_err().to_string();
        assert!(err.contains("1 input channels"), "{err}");
    }
}
