//! Patch labels: FLSL prototype argmax, cosine to feature-space prototypes, or k-means.
//!
//! All three write one `u32` label per patch into a caller slice of length `N`; a patch
//! without usable scores or features gets [`NO_LABEL`].

use super::math::{axpy, dot, inv_norm};
use super::{PerceptionError, check_len, check_min, mul, nonzero};

/// The label of a patch that has no usable scores or features: a logits row that is all
/// NaN, or a feature row that is all zeros or holds a NaN or infinite value.
pub const NO_LABEL: u32 = u32::MAX;

/// Per-patch argmax over the FLSL head's `prototype_logits` `[N, K]` (row-major).
///
/// NaN entries never win; `+inf` wins like any larger value; ties go to the lowest prototype
/// index. A row whose entries are all NaN gets [`NO_LABEL`].
///
/// Errors: `n` or `k` zero, `k >= u32::MAX`, `logits.len() != n * k`, `labels.len() != n`.
pub fn argmax_labels(
    logits: &[f32],
    n: usize,
    k: usize,
    labels: &mut [u32],
) -> Result<(), PerceptionError> {
    nonzero("n", n)?;
    check_k(k)?;
    check_len("prototype_logits", logits.len(), mul("n * k", n, k)?)?;
    check_len("labels", labels.len(), n)?;
    for (row, label) in logits.chunks_exact(k).zip(labels.iter_mut()) {
        let mut best: Option<(usize, f32)> = None;
        for (j, &v) in row.iter().enumerate() {
            if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
                best = Some((j, v));
            }
        }
        *label = best.map_or(NO_LABEL, |(j, _)| j as u32);
    }
    Ok(())
}

/// Per-patch argmax of the cosine similarity between the features `[N, D]` and
/// feature-space prototypes `[K, D]` (any scale: both are normalized here).
///
/// `proto_inv` is scratch of at least `K` values (the prototypes' inverse norms). Invalid
/// feature rows get [`NO_LABEL`]; invalid prototypes (zero, NaN or infinite) never win; ties
/// go to the lowest prototype index.
///
/// The FLSL head's own prototypes live in its bottleneck space, not in the backbone's: use
/// [`argmax_labels`] on `prototype_logits` for them, and this function for prototypes in
/// backbone feature space (for example cluster centres of training features).
#[allow(clippy::too_many_arguments)]
pub fn prototype_labels(
    features: &[f32],
    prototypes: &[f32],
    n: usize,
    d: usize,
    k: usize,
    proto_inv: &mut [f32],
    labels: &mut [u32],
) -> Result<(), PerceptionError> {
    nonzero("n", n)?;
    nonzero("d", d)?;
    check_k(k)?;
    check_len("features", features.len(), mul("n * d", n, d)?)?;
    check_len("prototypes", prototypes.len(), mul("k * d", k, d)?)?;
    check_min("scratch.proto_inv", proto_inv.len(), k)?;
    check_len("labels", labels.len(), n)?;
    for (p, inv) in prototypes.chunks_exact(d).zip(proto_inv.iter_mut()) {
        *inv = inv_norm(p);
    }
    for (x, label) in features.chunks_exact(d).zip(labels.iter_mut()) {
        *label = NO_LABEL;
        if inv_norm(x) == 0.0 {
            continue;
        }
        let mut best = f32::NEG_INFINITY;
        for (j, (p, &inv)) in prototypes.chunks_exact(d).zip(proto_inv.iter()).enumerate() {
            if inv == 0.0 {
                continue;
            }
            let s = dot(x, p) * inv;
            if s > best || *label == NO_LABEL {
                best = s;
                *label = j as u32;
            }
        }
    }
    Ok(())
}

/// k-means settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KMeansConfig {
    /// Clusters (`k >= 1`). Default 8.
    pub k: usize,
    /// Lloyd iterations after the initial assignment (stops early when no label changes).
    /// Default 10.
    pub iters: usize,
}

impl KMeansConfig {
    /// The defaults: `k = 8`, `iters = 10`.
    pub const DEFAULT: Self = Self::new(8, 10);

    /// A configuration from its parts.
    pub const fn new(k: usize, iters: usize) -> Self {
        Self { k, iters }
    }
}

impl Default for KMeansConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Caller-provided scratch of [`kmeans_labels`].
#[derive(Debug)]
pub struct KMeansScratch<'s> {
    /// Unit-length centroids, at least `k * D` values.
    pub centroids: &'s mut [f32],
    /// Members per cluster, at least `k` values.
    pub counts: &'s mut [u32],
    /// Per-patch values, at least `2 * N`: inverse feature norms and the farthest-point
    /// similarities of the initialization.
    pub rows: &'s mut [f32],
}

/// Cosine k-means (spherical Lloyd) on the L2-normalized features `[N, D]`; returns the number
/// of clusters used (`<= k`; fewer when the frame has fewer distinct valid rows).
///
/// - Initialization (deterministic): farthest-point traversal. The first centre is the first
///   valid patch (patch 0 unless it is invalid); each next centre is the valid patch whose
///   highest cosine similarity to the chosen centres is lowest (ties: lowest index). It stops
///   early when every remaining patch duplicates a centre (similarity `>= 1 - 1e-4`).
/// - Then `iters` rounds of: assign each patch to its most similar centroid (cosine; ties to
///   the lowest cluster), stop if no label changed, recompute each centroid as the
///   normalized sum of its members (an empty cluster keeps its centroid).
///   The labels returned are those of the last assignment; cluster ids follow the
///   initialization order.
/// - Invalid rows (all zeros, NaN or infinite values) get [`NO_LABEL`] and are ignored.
pub fn kmeans_labels(
    features: &[f32],
    n: usize,
    d: usize,
    config: &KMeansConfig,
    scratch: KMeansScratch<'_>,
    labels: &mut [u32],
) -> Result<usize, PerceptionError> {
    nonzero("n", n)?;
    nonzero("d", d)?;
    let k = config.k;
    check_k(k)?;
    check_len("features", features.len(), mul("n * d", n, d)?)?;
    check_min("scratch.centroids", scratch.centroids.len(), mul("k * d", k, d)?)?;
    check_min("scratch.counts", scratch.counts.len(), k)?;
    check_min("scratch.rows", scratch.rows.len(), mul("2 * n", 2, n)?)?;
    check_len("labels", labels.len(), n)?;
    let (inv, sim) = scratch.rows.split_at_mut(n);
    let centroids = scratch.centroids.get_mut(..k * d).unwrap_or_default();
    let counts = scratch.counts.get_mut(..k).unwrap_or_default();

    for (x, v) in features.chunks_exact(d).zip(inv.iter_mut()) {
        *v = inv_norm(x);
    }
    // Farthest-point initialization.
    let mut used = 0usize;
    let mut next = inv.iter().position(|&v| v > 0.0);
    sim.iter_mut().for_each(|s| *s = f32::NEG_INFINITY);
    for c in centroids.chunks_exact_mut(d) {
        let Some(i) = next else { break };
        let x = features.get(i * d..i * d + d).unwrap_or_default();
        let s = inv.get(i).copied().unwrap_or(0.0);
        for (c, x) in c.iter_mut().zip(x) {
            *c = x * s;
        }
        used += 1;
        // Update the similarities and pick the farthest remaining patch.
        next = None;
        let mut lowest = 1.0 - 1e-4;
        for (j, ((x, &s), best)) in
            features.chunks_exact(d).zip(inv.iter()).zip(sim.iter_mut()).enumerate()
        {
            if s == 0.0 {
                continue;
            }
            *best = best.max(dot(x, c) * s);
            if *best < lowest {
                lowest = *best;
                next = Some(j);
            }
        }
    }
    if used == 0 {
        labels.iter_mut().for_each(|l| *l = NO_LABEL);
        return Ok(0);
    }
    let centroids = centroids.get_mut(..used * d).unwrap_or_default();
    let counts = counts.get_mut(..used).unwrap_or_default();

    labels.iter_mut().for_each(|l| *l = NO_LABEL);
    for round in 0..=config.iters {
        // Assignment.
        let mut changed = false;
        for ((x, &s), label) in features.chunks_exact(d).zip(inv.iter()).zip(labels.iter_mut()) {
            if s == 0.0 {
                continue;
            }
            let mut best = (0u32, f32::NEG_INFINITY);
            for (j, c) in centroids.chunks_exact(d).enumerate() {
                let v = dot(x, c);
                if v > best.1 {
                    best = (j as u32, v);
                }
            }
            changed |= *label != best.0;
            *label = best.0;
        }
        if !changed || round == config.iters {
            break;
        }
        // Update: normalized sum of the members.
        counts.iter_mut().for_each(|c| *c = 0);
        for ((x, &s), &label) in features.chunks_exact(d).zip(inv.iter()).zip(labels.iter()) {
            if s == 0.0 {
                continue;
            }
            let l = label as usize;
            if let (Some(cnt), Some(c)) = (counts.get_mut(l), centroids.get_mut(l * d..l * d + d)) {
                if *cnt == 0 {
                    c.iter_mut().for_each(|v| *v = 0.0);
                }
                *cnt += 1;
                axpy(c, s, x);
            }
        }
        for (c, &cnt) in centroids.chunks_exact_mut(d).zip(counts.iter()) {
            if cnt > 0 {
                let inv = inv_norm(c);
                c.iter_mut().for_each(|v| *v *= inv);
            }
        }
    }
    Ok(used)
}

fn check_k(k: usize) -> Result<(), PerceptionError> {
    nonzero("k", k)?;
    if k >= NO_LABEL as usize {
        return Err(PerceptionError::Param { what: "k" });
    }
    Ok(())
}
