//! Weights in and out: host tensors and safetensors ([`tensors`]), the `torch.save` reader
//! ([`pth`]), and checkpoints under the reference's names ([`checkpoint`]).

pub mod checkpoint;
pub mod pth;
pub mod tensors;
