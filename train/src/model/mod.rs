//! Models: the no-class ViT backbone, the FLSL head, and the two together.

pub mod head;
pub mod layers;
pub mod named;
pub mod vit;

use burn::module::Module;
use burn::tensor::{Tensor, backend::Backend};

pub use head::{FlslHead, FlslHeadConfig};
pub use vit::{Vit, VitConfig};

/// Backbone + head, as the reference's `utils.ModelWrapper`: parameter names are
/// `backbone.<vit key>` and `head.<head key>`.
#[derive(Module, Debug)]
pub struct FlslModel<B: Backend> {
    /// The ViT.
    pub backbone: Vit<B>,
    /// The projection head.
    pub head: FlslHead<B>,
}

impl<B: Backend> FlslModel<B> {
    /// Builds both parts with random weights.
    pub fn init(vit: &VitConfig, head: &FlslHeadConfig, device: &B::Device) -> Self {
        Self { backbone: vit.init(device), head: head.init(device) }
    }

    /// Backbone features `[B, N, D]`.
    pub fn features(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        self.backbone.forward(x)
    }
}
