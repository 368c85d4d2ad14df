//! The no-class-token Vision Transformer of FLSL.
//!
//! Port of `vision_transformer.VisionTransformer` + `make_vit_noclass` of the official code
//! (QingSuML/FLSL): patch embedding, a fixed 2-D sin-cos position table (bicubically resized
//! for other input sizes exactly as `interpolate_pos_encoding_no_class`), pre-norm blocks,
//! final LayerNorm over all tokens. Parameter names equal the reference state-dict keys.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Tensor, TensorData, backend::Backend};

use super::layers::{LayerNorm, Linear, drop_path, gelu, softmax_scaled};
use crate::error::Error;

/// ViT hyper-parameters.
#[derive(Config, Debug, PartialEq)]
pub struct VitConfig {
    /// Token width `D`.
    pub embed_dim: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Patch side in pixels.
    #[config(default = 16)]
    pub patch_size: usize,
    /// Training input side; the stored position table has `(img_size / patch_size)^2` rows.
    #[config(default = 224)]
    pub img_size: usize,
    /// MLP hidden width is `int(embed_dim * mlp_ratio)`.
    #[config(default = 4.0)]
    pub mlp_ratio: f64,
    /// Bias in the qkv projection.
    #[config(default = true)]
    pub qkv_bias: bool,
    /// Fixed 2-D sin-cos position table (the reference's default `--sin_cos_pos_emb true`);
    /// `false`: a learnable table initialised with a truncated normal of std 0.02.
    #[config(default = true)]
    pub sincos_pos: bool,
    /// LayerNorm epsilon.
    #[config(default = 1e-6)]
    pub layer_norm_eps: f64,
    /// Stochastic depth at the last block (linearly increasing from 0 over depth).
    #[config(default = 0.0)]
    pub drop_path_rate: f64,
    /// Input channels.
    #[config(default = 3)]
    pub in_chans: usize,
}

impl VitConfig {
    /// ViT-Tiny (192 wide, 12 blocks, 3 heads).
    pub fn vit_tiny(patch_size: usize) -> Self {
        Self::new(192, 12, 3).with_patch_size(patch_size)
    }

    /// ViT-Small (384 wide, 12 blocks, 6 heads), FLSL's main backbone.
    pub fn vit_small(patch_size: usize) -> Self {
        Self::new(384, 12, 6).with_patch_size(patch_size)
    }

    /// ViT-Base (768 wide, 12 blocks, 12 heads).
    pub fn vit_base(patch_size: usize) -> Self {
        Self::new(768, 12, 12).with_patch_size(patch_size)
    }

    /// A preset by name: `vit_tiny`, `vit_small`, `vit_base`, optionally suffixed with the patch
    /// size (`vit_small16`, `vit_tiny8`).
    pub fn preset(name: &str) -> Option<Self> {
        let (base, patch) = match name.trim_end_matches(|c: char| c.is_ascii_digit()) {
            b if b.len() < name.len() => (b, name[b.len()..].parse().ok()?),
            b => (b, 16),
        };
        match base {
            "vit_tiny" => Some(Self::vit_tiny(patch)),
            "vit_small" => Some(Self::vit_small(patch)),
            "vit_base" => Some(Self::vit_base(patch)),
            _ => None,
        }
    }

    /// MLP hidden width.
    pub fn mlp_hidden(&self) -> usize {
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// Side of the stored position grid.
    pub fn grid_size(&self) -> usize {
        self.img_size / self.patch_size
    }

    /// Checks the configuration; the error names the offending key.
    pub fn validate(&self) -> crate::error::Result<()> {
        let bad = |key: &str, reason: String| Err(Error::Config { key: key.into(), reason });
        if self.embed_dim == 0 || !self.embed_dim.is_multiple_of(4) {
            return bad(
                "embed_dim",
                format!("{} must be a positive multiple of 4 (2-D sin-cos table)", self.embed_dim),
            );
        }
        if self.num_heads == 0 || !self.embed_dim.is_multiple_of(self.num_heads) {
            return bad(
                "num_heads",
                format!("{} must divide embed_dim {}", self.num_heads, self.embed_dim),
            );
        }
        if self.patch_size == 0 || self.img_size < self.patch_size {
            return bad(
                "patch_size",
                format!("{} must be in 1..=img_size ({})", self.patch_size, self.img_size),
            );
        }
        if self.depth == 0 {
            return bad("depth", "must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.drop_path_rate) {
            return bad("drop_path_rate", format!("{} must be in [0, 1)", self.drop_path_rate));
        }
        Ok(())
    }

    /// Builds the model with timm-style random weights and the fixed sin-cos table.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Vit<B> {
        let d = self.embed_dim;
        let g = self.grid_size();
        let p = self.patch_size;
        let pos_embed = if self.sincos_pos {
            let pe = sincos_pos_embed_2d(d, g);
            let pe: Vec<f32> = pe.into_iter().map(|x| x as f32).collect();
            Tensor::<B, 3>::from_data(TensorData::new(pe, [1, g * g, d]), device)
        } else {
            super::layers::trunc_normal::<B, 3>([1, g * g, d], 0.02, device)
        };
        let conv_w = super::layers::trunc_normal::<B, 2>([d, self.in_chans * p * p], 0.02, device)
            .reshape([d, self.in_chans, p, p]);
        let blocks = (0..self.depth)
            .map(|i| {
                let dpr = if self.depth > 1 {
                    self.drop_path_rate * i as f64 / (self.depth - 1) as f64
                } else {
                    0.0
                };
                Block {
                    norm1: LayerNorm::new(d, self.layer_norm_eps, device),
                    attn: Attention {
                        qkv: Linear::new(d, 3 * d, self.qkv_bias, device),
                        proj: Linear::new(d, d, true, device),
                        num_heads: self.num_heads,
                    },
                    norm2: LayerNorm::new(d, self.layer_norm_eps, device),
                    mlp: Mlp {
                        fc1: Linear::new(d, self.mlp_hidden(), true, device),
                        fc2: Linear::new(self.mlp_hidden(), d, true, device),
                    },
                    drop_path: dpr,
                }
            })
            .collect();
        Vit {
            cls_token: Param::from_tensor(Tensor::zeros([1, 1, d], device)).set_require_grad(false),
            pos_embed: Param::from_tensor(pos_embed).set_require_grad(!self.sincos_pos),
            patch_embed: PatchEmbed {
                proj: Conv {
                    weight: Param::from_tensor(conv_w),
                    bias: Param::from_tensor(Tensor::zeros([d], device)),
                },
                patch_size: p,
            },
            blocks,
            norm: LayerNorm::new(d, self.layer_norm_eps, device),
        }
    }
}

/// Patchify convolution weights (`Conv2d` with kernel = stride = patch).
#[derive(Module, Debug)]
pub struct Conv<B: Backend> {
    /// `[D, C, p, p]`.
    pub weight: Param<Tensor<B, 4>>,
    /// `[D]`.
    pub bias: Param<Tensor<B, 1>>,
}

/// Patch embedding.
#[derive(Module, Debug)]
pub struct PatchEmbed<B: Backend> {
    /// The reference's `patch_embed.proj`.
    pub proj: Conv<B>,
    /// Patch side.
    pub patch_size: usize,
}

impl<B: Backend> PatchEmbed<B> {
    /// Kernel = stride = `p` convolution written as patchify + matmul (exact, and faster than
    /// a general convolution on the CPU backend). Trailing pixels that do not fill a patch are
    /// dropped, as the convolution does.
    ///
    /// # Shapes
    /// `[B, C, H, W] -> [B, (H/p)*(W/p), D]`, token `n = row * (W/p) + col`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let p = self.patch_size;
        let [b, c, h, w] = x.dims();
        let (gh, gw) = (h / p, w / p);
        let x = if gh * p != h || gw * p != w {
            x.slice([0..b, 0..c, 0..gh * p, 0..gw * p])
        } else {
            x
        };
        let patches = x
            .reshape([b, c, gh, p, gw, p])
            .permute([0, 2, 4, 1, 3, 5]) // [B, gh, gw, C, p, p]
            .reshape([b * gh * gw, c * p * p]);
        let [d, _, _, _] = self.proj.weight.dims();
        let wmat = self.proj.weight.val().reshape([d, c * p * p]);
        let y = patches.matmul(wmat.transpose()) + self.proj.bias.val().unsqueeze_dim(0);
        y.reshape([b, gh * gw, d])
    }
}

/// Multi-head self-attention.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `D -> 3D`, split as `(3, heads, D/heads)` (q/k/v outer).
    pub qkv: Linear<B>,
    /// Output projection.
    pub proj: Linear<B>,
    /// Heads.
    pub num_heads: usize,
}

impl<B: Backend> Attention<B> {
    /// # Shapes
    /// `[B, N, D] -> [B, N, D]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        if crate::backend::fused::enabled::<B>() {
            // On burn-flex: one q/k/v product, then the heads' attention in one fused op that
            // reads q, k and v in place (no slices of the weight, no copies of q/k/v).
            let [_, _, d] = x.dims();
            let scale = ((d / self.num_heads) as f64).powf(-0.5) as f32;
            return match crate::backend::fused::attention(
                self.qkv.forward(x),
                self.num_heads,
                scale,
            ) {
                Ok(out) => self.proj.forward(out),
                // Not f32: the composed form, from the projection already made.
                Err(qkv) => self.proj.forward(self.attention_composed(qkv)),
            };
        }
        self.forward_with_attn(x).0
    }

    /// The heads' attention, `softmax(q k^T / sqrt(hd)) v`, from a `[B, N, 3D]` q/k/v
    /// projection, in burn's tensor ops (the form the fused one is tested against).
    ///
    /// # Shapes
    /// `[B, N, 3D] -> [B, N, D]` (before the output projection).
    pub fn attention_composed(&self, qkv: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, n, d3] = qkv.dims();
        let (h, d) = (self.num_heads, d3 / 3);
        let hd = d / h;
        let part = |i: usize| {
            let cols = i * d..(i + 1) * d;
            qkv.clone().slice([0..b, 0..n, cols]).reshape([b, n, h, hd]).swap_dims(1, 2)
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let attn = softmax_scaled(q.matmul(k.swap_dims(2, 3)), (hd as f64).powf(-0.5), 3);
        attn.matmul(v).swap_dims(1, 2).reshape([b, n, d])
    }

    /// Returns the output and the attention map `[B, heads, N, N]`.
    pub fn forward_with_attn(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 4>) {
        let [b, n, d] = x.dims();
        let h = self.num_heads;
        let hd = d / h;
        // q, k and v as three products with row blocks of the `qkv` weight (views, no copy),
        // heads as a batch axis by a strided view: the backend's products take strided
        // operands, so no permuted copy of q/k/v is made, forward or backward (the single
        // product + permute + slices this replaces copied each of them twice). The dot
        // products are the reference's one product's, element by element.
        let x2 = x.reshape([b * n, d]);
        let w = self.qkv.weight.val(); // [3D, D]
        let bias = self.qkv.bias.as_ref().map(|p| p.val()); // [3D]
        let part = |i: usize| {
            let rows = i * d..(i + 1) * d;
            #[allow(clippy::single_range_in_vec_init)] // one range: a row block of a matrix
            let y = x2.clone().matmul(w.clone().slice([rows.clone()]).transpose());
            #[allow(clippy::single_range_in_vec_init)] // one range: a block of a vector
            let y = match &bias {
                Some(bv) => y + bv.clone().slice([rows]).unsqueeze_dim(0),
                None => y,
            };
            y.reshape([b, n, h, hd]).swap_dims(1, 2) // [B, H, N, hd], strided
        };
        let (q, k, v) = (part(0), part(1), part(2));
        let scale = (hd as f64).powf(-0.5);
        let attn = softmax_scaled(q.matmul(k.swap_dims(2, 3)), scale, 3); // [B, H, N, N]
        let out = attn.clone().matmul(v).swap_dims(1, 2).reshape([b, n, d]);
        (self.proj.forward(out), attn)
    }
}

/// Transformer MLP.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// `D -> hidden`.
    pub fc1: Linear<B>,
    /// `hidden -> D`.
    pub fc2: Linear<B>,
}

/// Pre-norm transformer block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// Before attention.
    pub norm1: LayerNorm<B>,
    /// Attention.
    pub attn: Attention<B>,
    /// Before the MLP.
    pub norm2: LayerNorm<B>,
    /// MLP.
    pub mlp: Mlp<B>,
    /// Stochastic-depth probability of this block.
    pub drop_path: f64,
}

impl<B: Backend> Block<B> {
    /// # Shapes
    /// `[B, N, D] -> [B, N, D]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let a = self.attn.forward(self.norm1.forward(x.clone()));
        let x = x + drop_path(a, self.drop_path);
        let m = self.mlp.fc2.forward(gelu(self.mlp.fc1.forward(self.norm2.forward(x.clone()))));
        x + drop_path(m, self.drop_path)
    }

    /// The block output and its attention map.
    pub fn forward_with_attn(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 4>) {
        let (a, attn) = self.attn.forward_with_attn(self.norm1.forward(x.clone()));
        let x = x + drop_path(a, self.drop_path);
        let m = self.mlp.fc2.forward(gelu(self.mlp.fc1.forward(self.norm2.forward(x.clone()))));
        (x + drop_path(m, self.drop_path), attn)
    }
}

/// The no-class ViT backbone.
#[derive(Module, Debug)]
pub struct Vit<B: Backend> {
    /// Kept for state-dict compatibility with the reference; never used.
    pub cls_token: Param<Tensor<B, 3>>,
    /// Fixed sin-cos table `[1, G*G, D]` (not trained).
    pub pos_embed: Param<Tensor<B, 3>>,
    /// Patch embedding.
    pub patch_embed: PatchEmbed<B>,
    /// Blocks.
    pub blocks: Vec<Block<B>>,
    /// Final LayerNorm.
    pub norm: LayerNorm<B>,
}

impl<B: Backend> Vit<B> {
    /// Token width.
    pub fn embed_dim(&self) -> usize {
        self.pos_embed.dims()[2]
    }

    /// Patch side.
    pub fn patch_size(&self) -> usize {
        self.patch_embed.patch_size
    }

    /// Patch embedding plus positions.
    ///
    /// # Shapes
    /// `[B, 3, H, W] -> [B, (H/p)*(W/p), D]`.
    pub fn prepare_tokens(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let [_, _, h, w] = x.dims();
        let p = self.patch_size();
        let tokens = self.patch_embed.forward(x);
        let pos = self.pos_embed_for(h / p, w / p);
        // A resized table is made on the host in f32; a half-precision copy's tokens are not.
        let pos = if pos.dtype() == tokens.dtype() { pos } else { pos.cast(tokens.dtype()) };
        tokens + pos
    }

    /// The position table for a `gh x gw` token grid: the stored table when the token count
    /// matches, else its bicubic resize (`interpolate_pos_encoding_no_class`).
    pub fn pos_embed_for(&self, gh: usize, gw: usize) -> Tensor<B, 3> {
        let [_, n, d] = self.pos_embed.dims();
        let g = (n as f64).sqrt().round() as usize;
        // As the reference (`npatch == N and w == h`): the same token count on another grid
        // (7x28 for a 14x14 table) is still resized.
        if gh == g && gw == g {
            return self.pos_embed.val();
        }
        let device = self.pos_embed.device();
        if self.pos_embed.is_require_grad() {
            // A learnable table: the same bicubic resize as a product with its (linear)
            // interpolation matrix, so that the gradient reaches the table from every crop size.
            let identity: Vec<f32> =
                (0..n * n).map(|i| if i / n == i % n { 1.0 } else { 0.0 }).collect();
            let m = interpolate_pos_embed(&identity, g, n, gh, gw); // [gh*gw, n]
            let m = Tensor::<B, 2>::from_data(TensorData::new(m, [gh * gw, n]), &device);
            let dtype = self.pos_embed.val().dtype();
            let m = if m.dtype() == dtype { m } else { m.cast(dtype) };
            return m.matmul(self.pos_embed.val().reshape([n, d])).reshape([1, gh * gw, d]);
        }
        let table = self.pos_embed.val().into_data().convert::<f32>();
        let table = table.to_vec::<f32>().expect("position table converted to f32");
        let out = interpolate_pos_embed(&table, g, d, gh, gw);
        Tensor::from_data(TensorData::new(out, [1, gh * gw, d]), &device)
    }

    /// Features after the final LayerNorm.
    ///
    /// # Shapes
    /// `[B, 3, H, W] -> [B, N, D]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let mut t = self.prepare_tokens(x);
        for blk in &self.blocks {
            t = blk.forward(t);
        }
        self.norm.forward(t)
    }

    /// Outputs of the last `n` blocks (before the final LayerNorm), oldest first.
    pub fn intermediate_layers(&self, x: Tensor<B, 4>, n: usize) -> Vec<Tensor<B, 3>> {
        let mut t = self.prepare_tokens(x);
        let depth = self.blocks.len();
        let mut out = Vec::new();
        for (i, blk) in self.blocks.iter().enumerate() {
            t = blk.forward(t);
            if i + n >= depth {
                out.push(t.clone());
            }
        }
        out
    }

    /// The last block's attention map `[B, heads, N, N]` (for visualisation).
    pub fn last_self_attention(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut t = self.prepare_tokens(x);
        let last = self.blocks.len() - 1;
        for blk in &self.blocks[..last] {
            t = blk.forward(t);
        }
        self.blocks[last].forward_with_attn(t).1
    }
}

/// The reference's `get_2d_sincos_pos_embed(D, G)` in float64, `[G*G * D]` row-major.
///
/// Row `n = i*G + j`; columns `[0, D/2)` encode the column `j`, `[D/2, D)` the row `i`; each
/// half is `[sin(p w_k)..., cos(p w_k)...]` with `w_k = 1 / 10000^(k / (D/4))`.
pub fn sincos_pos_embed_2d(d: usize, g: usize) -> Vec<f64> {
    let quarter = d / 4;
    let omega: Vec<f64> =
        (0..quarter).map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64)).collect();
    let mut out = vec![0.0; g * g * d];
    for i in 0..g {
        for j in 0..g {
            let row = &mut out[(i * g + j) * d..(i * g + j + 1) * d];
            for (half, pos) in [(0, j), (1, i)] {
                let base = half * d / 2;
                for (k, w) in omega.iter().enumerate() {
                    let a = pos as f64 * w;
                    row[base + k] = a.sin();
                    row[base + quarter + k] = a.cos();
                }
            }
        }
    }
    out
}

/// PyTorch's cubic convolution coefficients (`A = -0.75`) for fraction `t`, in float32, with
/// the fused multiply-adds its compiled kernel uses for `cubic_convolution2`
/// (`((A x - 5A) x + 8A) x - 4A`: the first two steps fused, the last not). Without them the
/// resized table is up to 2.5e-6 from PyTorch's (float32 noise, but beyond the 2e-6 tolerance);
/// with them 616 of 616 interior weights equal PyTorch's bit for bit
/// (scripts/torch_crosscheck.py).
fn cubic_coeffs(t: f32) -> [f32; 4] {
    const A: f32 = -0.75;
    let c1 = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let c2 = |x: f32| A.mul_add(x, -5.0 * A).mul_add(x, 8.0 * A) * x - 4.0 * A;
    [c2(t + 1.0), c1(t), c1(1.0 - t), c2(1.0 - t + 1.0)]
}

/// Bicubic resize of a `[g*g, d]` position table to `[gh*gw, d]`, exactly as
/// `F.interpolate(scale_factor=((gh+0.1)/g, (gw+0.1)/g), mode='bicubic', align_corners=False)`:
/// source coordinate `(dst + 0.5) * g/(g_out + 0.1) - 0.5` with the ratio rounded to float32,
/// taps clamped to the border, y outer and x inner.
pub fn interpolate_pos_embed(table: &[f32], g: usize, d: usize, gh: usize, gw: usize) -> Vec<f32> {
    let axis = |g_out: usize| -> Vec<([usize; 4], [f32; 4])> {
        let scale_factor = (g_out as f64 + 0.1) / g as f64;
        let ratio = (1.0 / scale_factor) as f32;
        (0..g_out)
            .map(|dst| {
                // Fused like PyTorch's area_pixel_compute_source_index.
                let src = ratio.mul_add(dst as f32 + 0.5, -0.5);
                // PyTorch's guard_index_and_lambda: index capped at the last input, lambda in [0, 1].
                let i0 = (src.floor() as i64).min(g as i64 - 1);
                let t = (src - i0 as f32).clamp(0.0, 1.0);
                let idx = [0, 1, 2, 3].map(|k| (i0 - 1 + k as i64).clamp(0, g as i64 - 1) as usize);
                (idx, cubic_coeffs(t))
            })
            .collect()
    };
    let ys = axis(gh);
    let xs = axis(gw);
    let mut out = vec![0f32; gh * gw * d];
    for (oy, (yi, yw)) in ys.iter().enumerate() {
        for (ox, (xi, xw)) in xs.iter().enumerate() {
            let o = &mut out[(oy * gw + ox) * d..(oy * gw + ox + 1) * d];
            for c in 0..d {
                let row = |y: usize| -> f32 {
                    let at = |x: usize| table[(y * g + x) * d + c];
                    at(xi[0]) * xw[0] + at(xi[1]) * xw[1] + at(xi[2]) * xw[2] + at(xi[3]) * xw[3]
                };
                o[c] = row(yi[0]) * yw[0]
                    + row(yi[1]) * yw[1]
                    + row(yi[2]) * yw[2]
                    + row(yi[3]) * yw[3];
            }
        }
    }
    out
}
