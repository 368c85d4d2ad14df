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
    /// Distillation only: the learned projection `P` of the student's features onto the
    /// teacher's width (feature-alignment term, `docs/DISTILL.md`). `None` otherwise, so a
    /// pretraining state dict has exactly the reference's names.
    pub distill_proj: Option<layers::Linear<B>>,
}

impl<B: Backend> FlslModel<B> {
    /// Builds both parts with random weights.
    pub fn init(vit: &VitConfig, head: &FlslHeadConfig, device: &B::Device) -> Self {
        Self { backbone: vit.init(device), head: head.init(device), distill_proj: None }
    }

    /// [`FlslModel::init`] plus a distillation projection from the backbone's width to
    /// `teacher_dim` (initialised after the backbone and head, so those draw the same weights
    /// as without it).
    pub fn init_with_projection(
        vit: &VitConfig,
        head: &FlslHeadConfig,
        teacher_dim: usize,
        device: &B::Device,
    ) -> Self {
        let mut m = Self::init(vit, head, device);
        m.distill_proj = Some(layers::Linear::new(vit.embed_dim, teacher_dim, true, device));
        m
    }

    /// Backbone features `[B, N, D]`.
    pub fn features(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        self.backbone.forward(x)
    }
}
