//! Mean-shift refinement of the patch features: the paper's non-parametric clustering step,
//! run on the drone without a head.
//!
//! With `X` the L2-normalized features of one frame, one iteration maps every query
//!
//! ```text
//! y_i <- normalize( sum_j softmax_j(temperature * y_i . x_j) x_j )
//! ```
//!
//! The temperature **multiplies** the dot products (it is an inverse temperature), exactly as
//! in the training operator (`train/src/meanshift.rs`, reference `utils.flsl_meanshift`:
//! `softmax((Q T^T) * temp) T`). The queries start at `y_i = x_i`; the keys and values stay
//! the frame's original normalized features in every iteration, so the iterations climb the
//! modes of one kernel density (mode seeking) rather than blurring the set into its mean.
//! The first iteration is the training operator on normalized features with every patch as a
//! query.
//!
//! # Temperature
//!
//! Training applies `tau_sa = 0.1 / sqrt(384) ~ 0.0051` to *raw* features; on unit features
//! the same sharpness needs `temperature = tau * |x|^2`, about 10 for feature norms around
//! 44. The default is [`MeanShiftConfig::DEFAULT`]: temperature 10, 3 iterations.
//! `temperature = 0` maps every patch to the normalized mean of the frame.
//!
//! # Cost
//!
//! `2 * iters * N^2 * D` multiply-adds plus `iters * N^2` exponentials: for a 14x14 grid at
//! `D = 384` and 3 iterations, 88 M multiply-adds. Queries are shifted in blocks of
//! [`BLOCK`] that share every key load (a register-blocked matrix product, 1.8x faster than
//! row by row). Measured (`benches/postprocess.rs`, one core of the 2.5 GHz Xeon
//! development machine, default x86-64 target, SSE2): about 2.6 ms per iteration at
//! `D = 192` and 5.1 ms at `D = 384`, so the default 3 iterations do not fit a 1 ms frame
//! budget on that CPU; use 1 iteration, or none, where the budget is tight.
//! Weights below `2^-40` of the row's largest are skipped in the weighted sum; together they
//! change a unit-length result by less than `N * 2^-40`, far below f32 resolution for any
//! realistic `N`.

use super::math::{exp, inv_norm, normalize};
use super::{PerceptionError, check_len, check_min, mul, nonzero};

/// Mean-shift settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MeanShiftConfig {
    /// Inverse temperature multiplying the cosine similarities; finite and `>= 0`. Default 10.
    pub temperature: f32,
    /// Iterations. Default 3.
    pub iters: usize,
}

impl MeanShiftConfig {
    /// Temperature 10, 3 iterations (see the [module docs](self)).
    pub const DEFAULT: Self = Self::new(10.0, 3);

    /// A configuration from its parts.
    pub const fn new(temperature: f32, iters: usize) -> Self {
        Self { temperature, iters }
    }
}

impl Default for MeanShiftConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Caller-provided scratch of [`refine`].
#[derive(Debug)]
pub struct MeanShiftScratch<'s> {
    /// Logits of a block of queries, at least [`BLOCK`]` * N` values.
    pub logits: &'s mut [f32],
    /// Inverse feature norms, at least `N` values.
    pub inv_norms: &'s mut [f32],
}

/// Queries shifted together: they share every key load (a register-blocked matrix product),
/// which is what makes the step fast on plain SSE.
pub const BLOCK: usize = 4;

/// Lanes of the inner kernels.
const LANES: usize = 8;

/// Weights below this fraction of the row's largest are skipped.
const SKIP: f32 = 1.0 / (1u64 << 40) as f32;

/// Writes the mean-shift refined, unit-length features `[N, D]` of `features` `[N, D]` into
/// `out` (see the [module docs](self)).
///
/// A feature row with a NaN or infinite value, all zeros, or a squared norm overflowing f32 is
/// invalid: it is neither a key nor a query, and its output row is all zeros. Without any
/// valid row the output is all zeros.
///
/// Errors: `n` or `d` zero, a non-finite or negative temperature, wrong lengths of
/// `features` or `out`, or short scratch buffers.
pub fn refine(
    features: &[f32],
    n: usize,
    d: usize,
    config: &MeanShiftConfig,
    scratch: MeanShiftScratch<'_>,
    out: &mut [f32],
) -> Result<(), PerceptionError> {
    nonzero("n", n)?;
    nonzero("d", d)?;
    let t = config.temperature;
    if !(t.is_finite() && t >= 0.0) {
        return Err(PerceptionError::Param { what: "meanshift.temperature" });
    }
    let nd = mul("n * d", n, d)?;
    check_len("features", features.len(), nd)?;
    check_len("refined", out.len(), nd)?;
    check_min("scratch.logits", scratch.logits.len(), mul("BLOCK * n", BLOCK, n)?)?;
    check_min("scratch.inv_norms", scratch.inv_norms.len(), n)?;
    let logits = scratch.logits.get_mut(..BLOCK * n).unwrap_or_default();
    let inv = scratch.inv_norms.get_mut(..n).unwrap_or_default();

    for ((x, y), s) in features.chunks_exact(d).zip(out.chunks_exact_mut(d)).zip(inv.iter_mut()) {
        *s = inv_norm(x);
        for (y, x) in y.iter_mut().zip(x) {
            // An invalid row (s = 0) may hold NaN or inf: write zeros, not x * 0.
            *y = if *s == 0.0 { 0.0 } else { x * *s };
        }
    }
    let inv: &[f32] = inv;
    for _ in 0..config.iters {
        let mut rows =
            out.chunks_exact_mut(d).zip(inv.iter()).filter(|(_, s)| **s != 0.0).map(|(y, _)| y);
        loop {
            let mut block: [&mut [f32]; BLOCK] = Default::default();
            let mut len = 0;
            for slot in block.iter_mut() {
                match rows.next() {
                    Some(y) => {
                        *slot = y;
                        len += 1;
                    }
                    None => break,
                }
            }
            if len == BLOCK {
                shift(&mut block, features, inv, d, t, logits);
                continue;
            }
            for y in block.iter_mut().take(len) {
                shift(core::array::from_mut(y), features, inv, d, t, logits);
            }
            break;
        }
    }
    Ok(())
}

/// One mean-shift step of the `R` unit query rows `qs` against the keys `features` (unit after
/// scaling by `inv`), in place; `logits` holds at least `R * N` values (key-major).
fn shift<const R: usize>(
    qs: &mut [&mut [f32]; R],
    features: &[f32],
    inv: &[f32],
    d: usize,
    t: f32,
    logits: &mut [f32],
) {
    let n = inv.len();
    let logits = logits.get_mut(..R * n).unwrap_or_default();
    // Logits, key-major: logits[j * R + r] = t * (q_r . x_j) / |x_j|; invalid keys -inf.
    {
        let q = qs.each_ref().map(|y| y.as_chunks::<LANES>());
        for ((x, &s), l) in features.chunks_exact(d).zip(inv).zip(logits.chunks_exact_mut(R)) {
            if s == 0.0 {
                l.iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
                continue;
            }
            let dots = dot_block(&q, x);
            for (l, dt) in l.iter_mut().zip(dots) {
                *l = t * (dt * s);
            }
        }
    }
    // Weights exp(l - max) / |x_j| (the softmax normalization cancels in the renormalization).
    let mut max = [f32::NEG_INFINITY; R];
    for l in logits.chunks_exact(R) {
        for (m, &v) in max.iter_mut().zip(l) {
            *m = m.max(v);
        }
    }
    for (l, &s) in logits.chunks_exact_mut(R).zip(inv) {
        for (v, m) in l.iter_mut().zip(max) {
            let w = exp(*v - m);
            *v = if w > SKIP { w * s } else { 0.0 };
        }
    }
    // Weighted sums, LANES output values at a time kept in registers, written over the queries.
    let full = d / LANES;
    for c in 0..full {
        let mut acc = [[0.0f32; LANES]; R];
        for (x, w) in features.chunks_exact(d).zip(logits.chunks_exact(R)) {
            let Some(xv) = x.as_chunks::<LANES>().0.get(c) else {
                continue;
            };
            for (a, &w) in acc.iter_mut().zip(w) {
                if w != 0.0 {
                    for (a, x) in a.iter_mut().zip(xv) {
                        *a += w * x;
                    }
                }
            }
        }
        for (y, a) in qs.iter_mut().zip(acc.iter()) {
            if let Some(yv) = y.as_chunks_mut::<LANES>().0.get_mut(c) {
                *yv = *a;
            }
        }
    }
    for k in full * LANES..d {
        let mut acc = [0.0f32; R];
        for (x, w) in features.chunks_exact(d).zip(logits.chunks_exact(R)) {
            let xk = x.get(k).copied().unwrap_or(0.0);
            for (a, &w) in acc.iter_mut().zip(w) {
                *a += w * xk;
            }
        }
        for (y, a) in qs.iter_mut().zip(acc) {
            if let Some(v) = y.get_mut(k) {
                *v = a;
            }
        }
    }
    for y in qs.iter_mut() {
        normalize(y);
    }
}

/// Dot products of `R` rows (split into LANES-chunks and a tail) with `x`.
#[inline]
fn dot_block<const R: usize>(q: &[(&[[f32; LANES]], &[f32]); R], x: &[f32]) -> [f32; R] {
    let (xc, xr) = x.as_chunks::<LANES>();
    let mut acc = [[0.0f32; LANES]; R];
    for (c, xv) in xc.iter().enumerate() {
        for (a, (qc, _)) in acc.iter_mut().zip(q.iter()) {
            if let Some(qv) = qc.get(c) {
                for ((a, q), x) in a.iter_mut().zip(qv).zip(xv) {
                    *a += q * x;
                }
            }
        }
    }
    let mut out = [0.0f32; R];
    for ((o, a), (_, qr)) in out.iter_mut().zip(acc.iter()).zip(q.iter()) {
        let tail: f32 = qr.iter().zip(xr).map(|(q, x)| q * x).sum();
        *o = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])) + tail;
    }
    out
}
