//! Data-parallel training on several devices through burn's own collective operations.
//!
//! Each device holds a replica (student, teacher, AdamW moments); every step each replica runs
//! forward and backward on its share of the batch, then [`burn::collective::all_reduce`]
//! averages every gradient across replicas before clipping (as PyTorch's DDP does before the
//! reference's `clip_gradients`), so all replicas apply the same update and stay identical.
//! The loss terms are averaged the same way, so a non-finite loss stops every replica at the
//! same step; the VMR's mean assignment is the replicas' mean (the reference's `AllReduce`),
//! and the teacher center (when enabled) is averaged as the reference's
//! `dist.all_reduce(batch_center)`. No all-reduce of ours: burn-collective does the
//! communication (a tree over the devices of this process).

use burn::collective::{CollectiveConfig, PeerId, ReduceOperation};
use burn::tensor::{Tensor, TensorData, TensorPrimitive, backend::Backend};

use crate::error::{Error, Result};

/// One replica's place in a data-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Rank, `0..world`; rank 0 logs and writes checkpoints.
    pub rank: u32,
    /// Number of replicas.
    pub world: u32,
}

impl Peer {
    /// burn-collective's id of this replica.
    pub fn id(self) -> PeerId {
        PeerId(self.rank)
    }
}

fn collective_err(
    op: &'static str,
    peer: Peer,
) -> impl FnOnce(burn::collective::CollectiveError) -> Error {
    move |e| Error::Collective { op, peer: peer.rank, reason: format!("{e:?}") }
}

/// Joins the group (blocks until every replica has registered). `B` is the inner (non-autodiff)
/// backend, as burn-collective requires.
pub fn register<B: Backend>(peer: Peer, device: &B::Device) -> Result<()> {
    let config = CollectiveConfig::default().with_num_devices(peer.world as usize);
    burn::collective::register::<B>(peer.id(), device.clone(), config)
        .map_err(collective_err("register", peer))
}

/// Leaves the group.
pub fn finish<B: Backend>(peer: Peer) -> Result<()> {
    burn::collective::finish_collective::<B>(peer.id()).map_err(collective_err("finish", peer))
}

/// Forgets every registration and pending operation (after a failure, so that a later run in
/// the same process can form a new group).
pub fn reset<B: Backend>() {
    burn::collective::reset_collective::<B>();
}

/// The mean of `tensor` over all replicas (every replica calls this with the same shape, in the
/// same order).
pub fn all_reduce_mean<B: Backend, const D: usize>(
    peer: Peer,
    tensor: Tensor<B, D>,
) -> Result<Tensor<B, D>> {
    let out = burn::collective::all_reduce::<B>(
        peer.id(),
        tensor.into_primitive().tensor(),
        ReduceOperation::Mean,
    )
    .map_err(collective_err("all-reduce", peer))?;
    Ok(Tensor::from_primitive(TensorPrimitive::Float(out)))
}

/// The mean of a host vector over all replicas.
pub fn all_reduce_mean_host<B: Backend>(
    peer: Peer,
    values: &[f64],
    device: &B::Device,
) -> Result<Vec<f64>> {
    let t = Tensor::<B, 1>::from_data(
        TensorData::new(values.iter().map(|&v| v as f32).collect::<Vec<f32>>(), [values.len()]),
        device,
    );
    let data = all_reduce_mean(peer, t)?.into_data().convert::<f32>();
    let v = data.to_vec::<f32>().map_err(|e| Error::Collective {
        op: "all-reduce",
        peer: peer.rank,
        reason: format!("{e:?}"),
    })?;
    Ok(v.into_iter().map(f64::from).collect())
}
