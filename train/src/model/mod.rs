//! Models: the no-class ViT backbone, the FLSL head, and the two together.

pub mod head;
pub mod layers;
pub mod named;
pub mod vit;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Tensor, backend::Backend};

pub use head::{FlslHead, FlslHeadConfig};
pub use vit::{Vit, VitConfig};

/// `module` with every float parameter cast to `dtype` by burn's differentiable `cast`: on an
/// autodiff backend the gradients of the copy's parameters reach the originals (in their own
/// dtype), so an f32 module keeps f32 master weights while the copy computes in half
/// precision (`StepOptions::half`).
pub fn cast_params<B: Backend, M: Module<B>>(module: M, dtype: DType) -> M {
    struct CastParams(DType);
    impl<B: Backend> ModuleMapper<B> for CastParams {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            let tensor = if tensor.dtype() == self.0 { tensor } else { tensor.cast(self.0) };
            Param::from_mapped_value(id, tensor, mapper)
        }
    }
    module.map(&mut CastParams(dtype))
}

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
