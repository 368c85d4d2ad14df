//! The FLSL projection head (`vision_transformer.FLSLhead`, DINO-style).
//!
//! `mlp` (Linear-GELU-...-Linear to the bottleneck), L2 normalisation, then a weight-normalised
//! linear layer without bias: `W[i,:] = g[i] * v[i,:] / |v[i,:]|`. With `norm_last_layer` the
//! gains `g` are fixed at 1 (not trained), so every prototype row has unit norm.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Tensor, backend::Backend};

use super::layers::{Linear, gelu, l2_normalize, trunc_normal};
use crate::error::Error;

/// Head hyper-parameters (the reference's `FLSLhead` arguments).
#[derive(Config, Debug, PartialEq)]
pub struct FlslHeadConfig {
    /// Input width (the backbone's `D`).
    pub in_dim: usize,
    /// Number of prototypes `K`.
    pub out_dim: usize,
    /// MLP hidden width.
    #[config(default = 2048)]
    pub hidden_dim: usize,
    /// Bottleneck width (input of the prototype layer).
    #[config(default = 256)]
    pub bottleneck_dim: usize,
    /// Number of MLP layers (at least 2 here).
    #[config(default = 3)]
    pub nlayers: usize,
    /// Freeze the weight-norm gains at 1.
    #[config(default = true)]
    pub norm_last_layer: bool,
}

impl FlslHeadConfig {
    /// Checks the configuration; the error names the offending key.
    pub fn validate(&self) -> crate::error::Result<()> {
        if self.nlayers < 2 {
            return Err(Error::Config {
                key: "nlayers".into(),
                reason: format!("{} < 2 is not supported", self.nlayers),
            });
        }
        for (key, v) in [
            ("in_dim", self.in_dim),
            ("out_dim", self.out_dim),
            ("hidden_dim", self.hidden_dim),
            ("bottleneck_dim", self.bottleneck_dim),
        ] {
            if v == 0 {
                return Err(Error::Config { key: key.into(), reason: "must be positive".into() });
            }
        }
        Ok(())
    }

    /// Builds the head with random weights.
    pub fn init<B: Backend>(&self, device: &B::Device) -> FlslHead<B> {
        let mut mlp = vec![Linear::new(self.in_dim, self.hidden_dim, true, device)];
        for _ in 0..self.nlayers.saturating_sub(2) {
            mlp.push(Linear::new(self.hidden_dim, self.hidden_dim, true, device));
        }
        mlp.push(Linear::new(self.hidden_dim, self.bottleneck_dim, true, device));
        // nn.Linear's default init for weight_v; its scale does not matter after normalisation.
        let v = trunc_normal::<B, 2>(
            [self.out_dim, self.bottleneck_dim],
            1.0 / (self.bottleneck_dim as f64).sqrt(),
            device,
        );
        FlslHead {
            mlp,
            last_layer: WeightNormLinear {
                weight_g: Param::from_tensor(Tensor::ones([self.out_dim, 1], device))
                    .set_require_grad(!self.norm_last_layer),
                weight_v: Param::from_tensor(v),
            },
        }
    }
}

/// Weight-normalised linear layer without bias (`nn.utils.weight_norm(nn.Linear(.., bias=False))`).
#[derive(Module, Debug)]
pub struct WeightNormLinear<B: Backend> {
    /// Gains `[out, 1]`.
    pub weight_g: Param<Tensor<B, 2>>,
    /// Directions `[out, in]`.
    pub weight_v: Param<Tensor<B, 2>>,
}

impl<B: Backend> WeightNormLinear<B> {
    /// The effective weight `g * v / |v|` (row norms), as `torch._weight_norm(v, g, 0)`.
    pub fn effective_weight(&self) -> Tensor<B, 2> {
        let v = self.weight_v.val();
        let norm = v.clone().powi_scalar(2).sum_dim(1).sqrt(); // [out, 1]
        v * (self.weight_g.val() / norm)
    }
}

/// The FLSL head.
#[derive(Module, Debug)]
pub struct FlslHead<B: Backend> {
    /// Linear layers (GELU between them). Reference keys `mlp.0`, `mlp.2`, ... (the GELUs take
    /// the odd indices of the reference's `nn.Sequential`).
    pub mlp: Vec<Linear<B>>,
    /// Prototype layer.
    pub last_layer: WeightNormLinear<B>,
}

impl<B: Backend> FlslHead<B> {
    /// Number of prototypes.
    pub fn out_dim(&self) -> usize {
        self.last_layer.weight_v.dims()[0]
    }

    /// The bottleneck embedding after L2 normalisation.
    pub fn embed<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let last = self.mlp.len() - 1;
        let mut h = x;
        for (i, layer) in self.mlp.iter().enumerate() {
            h = layer.forward(h);
            if i < last {
                h = gelu(h);
            }
        }
        l2_normalize(h, 1e-12)
    }

    /// Prototype logits (cosines, since both sides are unit vectors when `g = 1`).
    ///
    /// # Shapes
    /// `[..., in_dim] -> [..., out_dim]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let z = self.embed(x);
        let dims = z.dims();
        let k = self.out_dim();
        let rows: usize = dims[..D - 1].iter().product();
        let bottleneck = dims[D - 1];
        let out =
            z.reshape([rows, bottleneck]).matmul(self.last_layer.effective_weight().transpose());
        let mut shape = dims;
        shape[D - 1] = k;
        out.reshape(shape)
    }
}
