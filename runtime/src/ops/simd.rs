//! Element-wise work fused into our ops: GELU (with tract's erf, so results match its
//! `GeluExact`), row softmax and layer normalization, on 16 AVX-512 lanes, on 8 AVX2 + FMA
//! lanes (x86 without AVX-512), in plain Rust otherwise ([`FloatPath`]). Rows are split over
//! the threads of the current rayon pool when the caller runs inside one (as `OnnxModel`
//! does with more than one thread).

// The AVX-512 and AVX2 paths use intrinsics on raw lane loads and stores, each bounded by the slice
// it reads; every unsafe block states why it stays in bounds.
#![allow(unsafe_code)]

/// tract's erf (Abramowitz & Stegun 7.1.28, |error| < 3e-7; `tract-linalg`'s
/// `generic/erf.rs`), so that a fused GELU gives what tract's `GeluExact` gives.
#[allow(clippy::excessive_precision)]
pub(crate) const ERF_A: [f32; 6] =
    [0.0705230784, 0.0422820123, 0.0092705272, 0.0001520143, 0.0002765672, 0.0000430638];

/// Below this many elements the work stays on the calling thread.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

/// `0.5 x (1 + erf(x / sqrt 2))` with tract's erf.
pub(crate) fn gelu(x: f32) -> f32 {
    let c = x * std::f32::consts::FRAC_1_SQRT_2;
    let abs = c.abs();
    let mut y = ERF_A[5] * abs;
    for a in ERF_A[..5].iter().rev() {
        y = (a + y) * abs;
    }
    let q = y + 1.0;
    let q2 = q * q;
    let q4 = q2 * q2;
    let q8 = q4 * q4;
    let q16 = q8 * q8;
    let erf = (1.0 - q16.recip()).copysign(c);
    (x * 0.5) * (erf + 1.0)
}

fn softmax_row_scalar(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = sum.recip();
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// Values per chunk when `len` values in rows of `row` are split over the current rayon
/// pool's threads; `None` keeps the work on the calling thread (no pool, too little work,
/// or a single row).
fn chunk_len(len: usize, row: usize) -> Option<usize> {
    let threads = super::pool_threads();
    let rows = len / row;
    (threads > 1 && len >= PARALLEL_MIN_ELEMENTS && rows >= 2).then(|| rows.div_ceil(threads) * row)
}

/// Runs `f` on every part, the first on the calling thread, the others spawned in a scope.
fn run_parts<T: Send>(mut parts: impl Iterator<Item = T> + Send, f: impl Fn(T) + Sync) {
    rayon::scope(|s| {
        let first = parts.next();
        for part in parts {
            let f = &f;
            s.spawn(move |_| f(part));
        }
        if let Some(p) = first {
            f(p);
        }
    });
}

/// Runs `f` on chunks of whole rows of `x` (rows of `row` values), on the threads of the
/// current rayon pool when inside one and the work is large enough.
fn for_row_chunks(x: &mut [f32], row: usize, f: impl Fn(&mut [f32]) + Sync) {
    match chunk_len(x.len(), row.max(1)) {
        Some(per) => run_parts(x.chunks_mut(per), f),
        None => f(x),
    }
}

/// The code the float ops here run: 16 AVX-512 lanes, 8 AVX2 + FMA lanes (x86 without
/// AVX-512: the NUC class), or plain Rust (aarch64 autovectorizes it to NEON). Chosen once
/// per process from the CPU, less what `TRACT_CPU_ISA` removes ([`super::isa`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatPath {
    /// AVX-512F.
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    /// Portable.
    Scalar,
}

impl FloatPath {
    /// Every path this CPU runs, best first.
    pub fn available() -> Vec<FloatPath> {
        let mut v = Vec::new();
        if super::isa::avx512f() {
            v.push(FloatPath::Avx512);
        }
        if super::isa::avx2_fma() {
            v.push(FloatPath::Avx2);
        }
        v.push(FloatPath::Scalar);
        v
    }

    /// The best available path (decided once).
    pub fn selected() -> FloatPath {
        static SELECTED: std::sync::OnceLock<FloatPath> = std::sync::OnceLock::new();
        *SELECTED.get_or_init(|| FloatPath::available()[0])
    }

    /// Its name, as `kernels_line` prints it.
    pub fn name(self) -> &'static str {
        match self {
            FloatPath::Avx512 => "avx512",
            FloatPath::Avx2 => "avx2+fma",
            FloatPath::Scalar => "scalar",
        }
    }
}

/// GELU on every value of `x`, in place.
pub fn gelu_inplace(x: &mut [f32]) {
    gelu_inplace_with(FloatPath::selected(), x)
}

fn gelu_inplace_with(path: FloatPath, x: &mut [f32]) {
    for_row_chunks(x, 1024, |chunk| match path {
        // Safety (both arms): `path` is one of `FloatPath::available()`.
        #[cfg(target_arch = "x86_64")]
        FloatPath::Avx512 => unsafe { avx512::gelu_slice(chunk) },
        #[cfg(target_arch = "x86_64")]
        FloatPath::Avx2 => unsafe { avx2::gelu_slice(chunk) },
        _ => chunk.iter_mut().for_each(|v| *v = gelu(*v)),
    });
}

/// Softmax over each row of `row` values of `x`, in place (`x.len()` a multiple of `row`).
pub fn softmax_rows_inplace(x: &mut [f32], row: usize) {
    softmax_rows_inplace_with(FloatPath::selected(), x, row)
}

fn softmax_rows_inplace_with(path: FloatPath, x: &mut [f32], row: usize) {
    for_row_chunks(x, row, |chunk| {
        for r in chunk.chunks_exact_mut(row) {
            match path {
                // Safety (both arms): `path` is one of `FloatPath::available()`.
                #[cfg(target_arch = "x86_64")]
                FloatPath::Avx512 => unsafe { avx512::softmax_row(r) },
                #[cfg(target_arch = "x86_64")]
                FloatPath::Avx2 => unsafe { avx2::softmax_row(r) },
                _ => softmax_row_scalar(r),
            }
        }
    });
}

/// One row, the portable form of [`avx512::layer_norm_row`]: both sums of `x - x[0]` in
/// one pass (the shift keeps `E[d^2] - E[d]^2` from cancelling when the mean is large against
/// the spread), then `((x - x[0]) - E[d]) * inv * scale + bias`.
fn layer_norm_row(x: &[f32], scale: &[f32], bias: &[f32], eps: f32, y: &mut [f32]) {
    let shift = x.first().copied().unwrap_or(0.0);
    let (mut s1, mut s2) = ([0f32; 16], [0f32; 16]);
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for ((a, b), v) in s1.iter_mut().zip(&mut s2).zip(c) {
            let d = v - shift;
            *a += d;
            *b += d * d;
        }
    }
    let inv_n = 1.0 / x.len() as f32;
    let m1 = (s1.iter().sum::<f32>() + tail.iter().map(|v| v - shift).sum::<f32>()) * inv_n;
    let m2 = (s2.iter().sum::<f32>() + tail.iter().map(|v| (v - shift) * (v - shift)).sum::<f32>())
        * inv_n;
    let inv = 1.0 / ((m2 - m1 * m1).max(0.0) + eps).sqrt();
    for (((o, v), s), b) in y.iter_mut().zip(x).zip(scale).zip(bias) {
        *o = ((v - shift) - m1) * (inv * s) + b;
    }
}

/// Layer normalization of every `scale.len()` values of `x` into `y` (`FusedLayerNorm`),
/// rows split over the pool like the other kernels here.
pub fn layer_norm_rows(x: &[f32], scale: &[f32], bias: &[f32], eps: f32, y: &mut [f32]) {
    layer_norm_rows_with(FloatPath::selected(), x, scale, bias, eps, y)
}

fn layer_norm_rows_with(
    path: FloatPath,
    x: &[f32],
    scale: &[f32],
    bias: &[f32],
    eps: f32,
    y: &mut [f32],
) {
    let row = scale.len().max(1);
    debug_assert!(bias.len() == row && x.len() == y.len() && x.len().is_multiple_of(row));
    let run = |(x, y): (&[f32], &mut [f32])| {
        for (xr, yr) in x.chunks_exact(row).zip(y.chunks_exact_mut(row)) {
            match path {
                // Safety (both arms): `path` is one of `FloatPath::available()`; all four
                // slices have `row` values.
                #[cfg(target_arch = "x86_64")]
                FloatPath::Avx512 => unsafe { avx512::layer_norm_row(xr, scale, bias, eps, yr) },
                #[cfg(target_arch = "x86_64")]
                FloatPath::Avx2 => unsafe { avx2::layer_norm_row(xr, scale, bias, eps, yr) },
                _ => layer_norm_row(xr, scale, bias, eps, yr),
            }
        }
    };
    match chunk_len(x.len(), row) {
        Some(per) => run_parts(x.chunks(per).zip(y.chunks_mut(per)), run),
        None => run((x, y)),
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    //! 16-lane GELU, exp and row softmax.

    use std::arch::x86_64::*;

    use super::ERF_A;

    /// [`super::gelu`] on 16 lanes.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) fn gelu16(x: __m512) -> __m512 {
        let c = _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        // |c| <= 10 keeps q16 finite for the reciprocal below (erf is 1 in f32 from ~4 on).
        let abs = _mm512_min_ps(_mm512_abs_ps(c), _mm512_set1_ps(10.0));
        // tract's (a + y) * abs recurrence in Horner form: fused multiply-adds.
        let mut t = _mm512_set1_ps(ERF_A[5]);
        for a in ERF_A[..5].iter().rev() {
            t = _mm512_fmadd_ps(t, abs, _mm512_set1_ps(*a));
        }
        let q = _mm512_fmadd_ps(t, abs, _mm512_set1_ps(1.0));
        let q2 = _mm512_mul_ps(q, q);
        let q4 = _mm512_mul_ps(q2, q2);
        let q8 = _mm512_mul_ps(q4, q4);
        let q16 = _mm512_mul_ps(q8, q8);
        // 1 / q16 by `vrcp14ps` and one Newton step (~1 ulp) instead of `vdivps`, whose
        // 16-lane throughput (~10 cycles) is more than the rest of the polynomial.
        let r = _mm512_rcp14_ps(q16);
        let r = _mm512_fmadd_ps(r, _mm512_fnmadd_ps(q16, r, _mm512_set1_ps(1.0)), r);
        let e = _mm512_sub_ps(_mm512_set1_ps(1.0), r);
        // copysign(e, c): e >= 0, so OR in c's sign bit.
        let sign = _mm512_and_si512(_mm512_castps_si512(c), _mm512_set1_epi32(i32::MIN));
        let erf = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(e), sign));
        _mm512_mul_ps(
            _mm512_mul_ps(x, _mm512_set1_ps(0.5)),
            _mm512_add_ps(erf, _mm512_set1_ps(1.0)),
        )
    }

    /// `e^x` on 16 lanes: `x = n ln 2 + r`, a degree-6 polynomial for `e^r` on
    /// `|r| <= ln 2 / 2` (relative error ~2e-7), `2^n` by `vscalefps`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub(crate) fn exp16(x: __m512) -> __m512 {
        // The input second in both: `vmaxps`/`vminps` return their second operand when either
        // is NaN, so a NaN goes through (a NaN score makes its softmax row NaN, as ONNX's).
        let x = _mm512_min_ps(_mm512_set1_ps(88.0), _mm512_max_ps(_mm512_set1_ps(-87.0), x));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        _mm512_scalef_ps(p, n)
    }

    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn gelu_slice(x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(16);
        for c in &mut chunks {
            // Safety: `c` holds 16 floats.
            unsafe {
                let v = _mm512_loadu_ps(c.as_ptr());
                _mm512_storeu_ps(c.as_mut_ptr(), gelu16(v));
            }
        }
        chunks.into_remainder().iter_mut().for_each(|v| *v = super::gelu(*v));
    }

    /// Layer normalization of one row into `y` (`x`, `y`, `scale`, `bias` of one length):
    /// mean and variance in one pass, then `(x - mean) * inv * scale + bias`. A ViT row
    /// (192 or 384 values) is so short that the chain reduce -> divide -> reduce -> sqrt
    /// dominates, hence one pass and two independent sums.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the four slices have the same length.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn layer_norm_row(
        x: &[f32],
        scale: &[f32],
        bias: &[f32],
        eps: f32,
        y: &mut [f32],
    ) {
        let n = x.len();
        let full = n / 16 * 16;
        let (px, ps, pb, py) = (x.as_ptr(), scale.as_ptr(), bias.as_ptr(), y.as_mut_ptr());
        let tail = tail_mask(n - full);
        // Safety (all blocks): unmasked loads and stores touch i..i+16 <= full <= n, masked
        // ones full..n; every slice has n values.
        // No closures here: they would not inherit this function's target feature, and
        // every intrinsic in them would become a call.
        // One pass for both sums, of `x - x[0]` (the shift keeps `E[d^2] - E[d]^2` from
        // cancelling when the row's mean is large against its spread).
        let shift = _mm512_set1_ps(x.first().copied().unwrap_or(0.0));
        let mut s1 = [_mm512_setzero_ps(); 2];
        let mut s2 = [_mm512_setzero_ps(); 2];
        let mut i = 0;
        while i + 32 <= full {
            for j in 0..2 {
                let d = _mm512_sub_ps(unsafe { _mm512_loadu_ps(px.add(i + 16 * j)) }, shift);
                s1[j] = _mm512_add_ps(s1[j], d);
                s2[j] = _mm512_fmadd_ps(d, d, s2[j]);
            }
            i += 32;
        }
        while i < full {
            let d = _mm512_sub_ps(unsafe { _mm512_loadu_ps(px.add(i)) }, shift);
            s1[0] = _mm512_add_ps(s1[0], d);
            s2[0] = _mm512_fmadd_ps(d, d, s2[0]);
            i += 16;
        }
        let d =
            _mm512_maskz_sub_ps(tail, unsafe { _mm512_maskz_loadu_ps(tail, px.add(full)) }, shift);
        s1[1] = _mm512_add_ps(s1[1], d);
        s2[1] = _mm512_fmadd_ps(d, d, s2[1]);
        let inv_n = 1.0 / n as f32;
        let m1 = _mm512_reduce_add_ps(_mm512_add_ps(s1[0], s1[1])) * inv_n;
        let m2 = _mm512_reduce_add_ps(_mm512_add_ps(s2[0], s2[1])) * inv_n;
        let var = (m2 - m1 * m1).max(0.0);
        // `x - mean` as `(x - x[0]) - m1`: the first difference is exact for values near
        // x[0], so the mean's rounding to f32 does not enter.
        let vm1 = _mm512_set1_ps(m1);
        let inv = _mm512_set1_ps(1.0 / (var + eps).sqrt());
        let mut i = 0;
        while i < full {
            unsafe {
                let d = _mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(px.add(i)), shift), vm1);
                let s = _mm512_mul_ps(_mm512_loadu_ps(ps.add(i)), inv);
                _mm512_storeu_ps(py.add(i), _mm512_fmadd_ps(d, s, _mm512_loadu_ps(pb.add(i))));
            }
            i += 16;
        }
        if full < n {
            unsafe {
                let d = _mm512_sub_ps(
                    _mm512_sub_ps(_mm512_maskz_loadu_ps(tail, px.add(full)), shift),
                    vm1,
                );
                let s = _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, ps.add(full)), inv);
                _mm512_mask_storeu_ps(
                    py.add(full),
                    tail,
                    _mm512_fmadd_ps(d, s, _mm512_maskz_loadu_ps(tail, pb.add(full))),
                );
            }
        }
    }

    #[inline]
    fn tail_mask(len: usize) -> __mmask16 {
        if len >= 16 { 0xffff } else { (1u16 << len) - 1 }
    }

    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn softmax_row(row: &mut [f32]) {
        // Full vectors unmasked and unrolled with independent accumulators (a 197-value
        // attention row is 12 vectors and a tail: one accumulator chain per pass made the
        // row latency-bound, ~2.3 cycles per value), the tail masked.
        let n = row.len();
        let full = n / 16 * 16;
        let tail = tail_mask(n - full);
        let p = row.as_mut_ptr();
        // Safety (all blocks): unmasked loads and stores touch i..i+16 <= full <= n, masked
        // ones full..n.
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut m = [ninf; 4];
        let mut i = 0;
        while i + 64 <= full {
            for (j, a) in m.iter_mut().enumerate() {
                *a = _mm512_max_ps(*a, unsafe { _mm512_loadu_ps(p.add(i + 16 * j)) });
            }
            i += 64;
        }
        while i < full {
            m[0] = _mm512_max_ps(m[0], unsafe { _mm512_loadu_ps(p.add(i)) });
            i += 16;
        }
        m[1] = _mm512_max_ps(m[1], unsafe { _mm512_mask_loadu_ps(ninf, tail, p.add(full)) });
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(
            _mm512_max_ps(m[0], m[1]),
            _mm512_max_ps(m[2], m[3]),
        )));
        let mut s = [_mm512_setzero_ps(); 2];
        let mut i = 0;
        while i + 32 <= full {
            for (j, a) in s.iter_mut().enumerate() {
                unsafe {
                    let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i + 16 * j)), max));
                    *a = _mm512_add_ps(*a, e);
                    _mm512_storeu_ps(p.add(i + 16 * j), e);
                }
            }
            i += 32;
        }
        while i < full {
            unsafe {
                let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), max));
                s[0] = _mm512_add_ps(s[0], e);
                _mm512_storeu_ps(p.add(i), e);
            }
            i += 16;
        }
        if full < n {
            unsafe {
                let v = _mm512_maskz_loadu_ps(tail, p.add(full));
                let e = _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(v, max)));
                s[1] = _mm512_add_ps(s[1], e);
                _mm512_mask_storeu_ps(p.add(full), tail, e);
            }
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(_mm512_add_ps(s[0], s[1])));
        let mut i = 0;
        while i < full {
            unsafe { _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv)) };
            i += 16;
        }
        if full < n {
            unsafe {
                _mm512_mask_storeu_ps(
                    p.add(full),
                    tail,
                    _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, p.add(full)), inv),
                )
            };
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    //! 8-lane (AVX2 + FMA) GELU, exp, row softmax and layer normalization, for x86 without
    //! AVX-512: the same formulas as the AVX-512 module, tails in plain Rust.

    use std::arch::x86_64::*;

    use super::ERF_A;

    /// [`super::gelu`] on 8 lanes (fused multiply-adds, reciprocal by `vrcpps` and one Newton
    /// step).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn gelu8(x: __m256) -> __m256 {
        let c = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let sign_bit = _mm256_set1_ps(-0.0);
        // |c| <= 10 keeps q16 finite for the reciprocal below (erf is 1 in f32 from ~4 on).
        let abs = _mm256_min_ps(_mm256_andnot_ps(sign_bit, c), _mm256_set1_ps(10.0));
        let mut t = _mm256_set1_ps(ERF_A[5]);
        for a in ERF_A[..5].iter().rev() {
            t = _mm256_fmadd_ps(t, abs, _mm256_set1_ps(*a));
        }
        let q = _mm256_fmadd_ps(t, abs, _mm256_set1_ps(1.0));
        let q2 = _mm256_mul_ps(q, q);
        let q4 = _mm256_mul_ps(q2, q2);
        let q8 = _mm256_mul_ps(q4, q4);
        let q16 = _mm256_mul_ps(q8, q8);
        let r = _mm256_rcp_ps(q16);
        let r = _mm256_fmadd_ps(r, _mm256_fnmadd_ps(q16, r, _mm256_set1_ps(1.0)), r);
        let e = _mm256_sub_ps(_mm256_set1_ps(1.0), r);
        let erf = _mm256_or_ps(_mm256_andnot_ps(sign_bit, e), _mm256_and_ps(sign_bit, c));
        _mm256_mul_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(0.5)),
            _mm256_add_ps(erf, _mm256_set1_ps(1.0)),
        )
    }

    /// `e^x` on 8 lanes: `x = n ln 2 + r`, the AVX-512 module's degree-6 polynomial for
    /// `e^r`, `2^n` built in the exponent bits (`n` in [-126, 127] after the clamp).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn exp8(x: __m256) -> __m256 {
        // NaN goes through, as in `exp16`.
        let x = _mm256_min_ps(_mm256_set1_ps(88.0), _mm256_max_ps(_mm256_set1_ps(-87.0), x));
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(p, _mm256_castsi256_ps(pow2))
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn hmax(v: __m256) -> f32 {
        let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)))
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn gelu_slice(x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(8);
        for c in &mut chunks {
            // Safety: `c` holds 8 floats.
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), gelu8(_mm256_loadu_ps(c.as_ptr()))) };
        }
        chunks.into_remainder().iter_mut().for_each(|v| *v = super::gelu(*v));
    }

    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn softmax_row(row: &mut [f32]) {
        let n = row.len();
        let full = n / 8 * 8;
        let p = row.as_mut_ptr();
        // Safety (all blocks): loads and stores touch i..i+8 <= full <= n.
        let mut m = [_mm256_set1_ps(f32::NEG_INFINITY); 2];
        let mut i = 0;
        while i + 16 <= full {
            for (j, a) in m.iter_mut().enumerate() {
                *a = _mm256_max_ps(*a, unsafe { _mm256_loadu_ps(p.add(i + 8 * j)) });
            }
            i += 16;
        }
        while i < full {
            m[0] = _mm256_max_ps(m[0], unsafe { _mm256_loadu_ps(p.add(i)) });
            i += 8;
        }
        let max = row[full..].iter().copied().fold(hmax(_mm256_max_ps(m[0], m[1])), f32::max);
        let vmax = _mm256_set1_ps(max);
        let mut s = [_mm256_setzero_ps(); 2];
        let mut i = 0;
        while i + 16 <= full {
            for (j, a) in s.iter_mut().enumerate() {
                unsafe {
                    let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i + 8 * j)), vmax));
                    *a = _mm256_add_ps(*a, e);
                    _mm256_storeu_ps(p.add(i + 8 * j), e);
                }
            }
            i += 16;
        }
        while i < full {
            unsafe {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vmax));
                s[0] = _mm256_add_ps(s[0], e);
                _mm256_storeu_ps(p.add(i), e);
            }
            i += 8;
        }
        let mut sum = hsum(_mm256_add_ps(s[0], s[1]));
        for v in &mut row[full..] {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        let vinv = _mm256_set1_ps(inv);
        let mut i = 0;
        while i < full {
            unsafe { _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), vinv)) };
            i += 8;
        }
        row[full..].iter_mut().for_each(|v| *v *= inv);
    }

    /// The AVX-512 module's one-pass layer normalization on 8 lanes.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the four slices have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn layer_norm_row(
        x: &[f32],
        scale: &[f32],
        bias: &[f32],
        eps: f32,
        y: &mut [f32],
    ) {
        let n = x.len();
        let full = n / 8 * 8;
        let (px, ps, pb, py) = (x.as_ptr(), scale.as_ptr(), bias.as_ptr(), y.as_mut_ptr());
        // Safety (all blocks): loads and stores touch i..i+8 <= full <= n; every slice has n
        // values.
        let shift0 = x.first().copied().unwrap_or(0.0);
        let shift = _mm256_set1_ps(shift0);
        let mut s1 = [_mm256_setzero_ps(); 2];
        let mut s2 = [_mm256_setzero_ps(); 2];
        let mut i = 0;
        while i + 16 <= full {
            for j in 0..2 {
                let d = _mm256_sub_ps(unsafe { _mm256_loadu_ps(px.add(i + 8 * j)) }, shift);
                s1[j] = _mm256_add_ps(s1[j], d);
                s2[j] = _mm256_fmadd_ps(d, d, s2[j]);
            }
            i += 16;
        }
        while i < full {
            let d = _mm256_sub_ps(unsafe { _mm256_loadu_ps(px.add(i)) }, shift);
            s1[0] = _mm256_add_ps(s1[0], d);
            s2[0] = _mm256_fmadd_ps(d, d, s2[0]);
            i += 8;
        }
        let (mut t1, mut t2) =
            (hsum(_mm256_add_ps(s1[0], s1[1])), hsum(_mm256_add_ps(s2[0], s2[1])));
        for v in &x[full..] {
            let d = v - shift0;
            t1 += d;
            t2 += d * d;
        }
        let inv_n = 1.0 / n as f32;
        let (m1, m2) = (t1 * inv_n, t2 * inv_n);
        let inv = 1.0 / ((m2 - m1 * m1).max(0.0) + eps).sqrt();
        let (vm1, vinv) = (_mm256_set1_ps(m1), _mm256_set1_ps(inv));
        let mut i = 0;
        while i < full {
            unsafe {
                let d = _mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(px.add(i)), shift), vm1);
                let s = _mm256_mul_ps(_mm256_loadu_ps(ps.add(i)), vinv);
                _mm256_storeu_ps(py.add(i), _mm256_fmadd_ps(d, s, _mm256_loadu_ps(pb.add(i))));
            }
            i += 8;
        }
        for i in full..n {
            y[i] = ((x[i] - shift0) - m1) * (inv * scale[i]) + bias[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer_norm_reference(x: &[f32], scale: &[f32], bias: &[f32], eps: f32) -> Vec<f32> {
        let n = scale.len();
        let mut out = Vec::new();
        for row in x.chunks_exact(n) {
            let mean = row.iter().map(|v| *v as f64).sum::<f64>() / n as f64;
            let var = row.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            out.extend(
                row.iter()
                    .zip(scale)
                    .zip(bias)
                    .map(|((v, s), b)| ((*v as f64 - mean) * inv * *s as f64 + *b as f64) as f32),
            );
        }
        out
    }

    #[test]
    fn layer_norm_rows_match_f64_on_every_path_and_thread_count() {
        // 197 x 192 (ViT-Ti/16), 2 x 37 (a row length that is not a multiple of 16), rows
        // whose mean grows to 400 against a spread of ~3, and rows at 1000 +- 0.05 (a mean
        // 10^4 times the spread: the one-pass variance must not cancel).
        for (rows, n, offset, spread) in [
            (197usize, 192usize, 0.0, 1.0),
            (2, 37, 0.0, 1.0),
            (400, 200, 1.0, 1.0),
            (3, 64, 1000.0, 0.01),
        ] {
            let x: Vec<f32> = (0..rows * n)
                .map(|i| {
                    (((i * 7919) % 1000) as f32 / 100.0 - 5.0) * spread
                        + offset * (1 + i / n) as f32
                })
                .collect();
            let scale: Vec<f32> = (0..n).map(|i| 0.5 + (i % 7) as f32 / 7.0).collect();
            let bias: Vec<f32> = (0..n).map(|i| (i % 5) as f32 / 5.0 - 0.4).collect();
            let expected = layer_norm_reference(&x, &scale, &bias, 1e-6);
            let mut portable = vec![f32::NAN; x.len()];
            for (xr, yr) in x.chunks_exact(n).zip(portable.chunks_exact_mut(n)) {
                layer_norm_row(xr, &scale, &bias, 1e-6, yr);
            }
            let worst =
                portable.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 2e-5, "{rows}x{n}, portable row kernel: worst {worst}");
            for (path, threads) in FloatPath::available().into_iter().flat_map(|p| [(p, 1), (p, 2)])
            {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut y = vec![f32::NAN; x.len()];
                pool.install(|| layer_norm_rows_with(path, &x, &scale, &bias, 1e-6, &mut y));
                let worst =
                    y.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst < 2e-5, "{rows}x{n}, {path:?}, {threads} threads: worst {worst}");
            }
        }
    }

    #[test]
    fn gelu_matches_erf_form() {
        for i in -400..=400 {
            let x = i as f32 / 50.0;
            let exact = 0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2));
            assert!(
                (gelu(x) - exact).abs() <= 2e-6 * x.abs().max(1.0),
                "x {x}: {} vs {exact}",
                gelu(x)
            );
        }
        // Every path this CPU runs (the vector ones on whole vectors and a tail).
        for path in FloatPath::available() {
            let mut v: Vec<f32> = (-400..=400).map(|i| i as f32 / 37.0).collect();
            let expected: Vec<f32> = v.iter().map(|&x| gelu(x)).collect();
            gelu_inplace_with(path, &mut v);
            for (g, e) in v.iter().zip(&expected) {
                assert!((g - e).abs() <= 1e-6 * e.abs().max(1.0), "{path:?}: {g} vs {e}");
            }
            // Far tails (q16 overflows to infinity on the vector paths): x itself, or 0.
            let mut far = vec![300.0f32, -300.0, 1e30, -1e30, 9.0, -9.0, 0.0];
            far.resize(32, 0.0);
            gelu_inplace_with(path, &mut far);
            assert_eq!(&far[..7], &[300.0, 0.0, 1e30, 0.0, 9.0, 0.0, 0.0], "{path:?}");
        }
    }

    /// Rows of odd lengths (masked tails), large and tiny values, inside a 2-thread pool and
    /// not: within 1e-6 of the f64 softmax, rows summing to 1.
    #[test]
    fn softmax_rows_match_f64() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for &(rows, row) in &[(3usize, 1usize), (7, 17), (400, 196), (5, 50)] {
            let x: Vec<f32> =
                (0..rows * row).map(|i| ((i * 7919) % 2003) as f32 / 40.0 - 25.0).collect();
            for (path, threaded) in
                FloatPath::available().into_iter().flat_map(|p| [(p, false), (p, true)])
            {
                let mut got = x.clone();
                if threaded {
                    pool.install(|| softmax_rows_inplace_with(path, &mut got, row));
                } else {
                    softmax_rows_inplace_with(path, &mut got, row);
                }
                for (r, (xs, gs)) in x.chunks(row).zip(got.chunks(row)).enumerate() {
                    let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
                    let sum: f64 = xs.iter().map(|&v| (v as f64 - max).exp()).sum();
                    for (&v, &g) in xs.iter().zip(gs) {
                        let e = (v as f64 - max).exp() / sum;
                        assert!(
                            (g as f64 - e).abs() <= 1e-6,
                            "[{rows}x{row}] {path:?} row {r}: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    /// ONNX's softmax of a row with a NaN score, a +inf score or only -inf scores is NaN in
    /// every position (the sum, or `inf - inf`, is NaN); every path must say so rather than
    /// give a finite row (dynamo's NaN guard after an SDPA softmax relies on it).
    #[test]
    fn softmax_rows_with_nan_or_inf_are_nan() {
        for &row in &[5usize, 17, 40, 197] {
            let normal: Vec<f32> = (0..row).map(|i| i as f32 / 7.0 - 1.0).collect();
            let bad = |at: usize, v: f32| {
                let mut r = normal.clone();
                r[at] = v;
                r
            };
            let all_ninf = vec![f32::NEG_INFINITY; row];
            let cases = [bad(0, f32::NAN), bad(row - 1, f32::NAN), bad(row / 2, f32::INFINITY)];
            for path in FloatPath::available() {
                for (c, case) in cases.iter().chain([&all_ninf]).enumerate() {
                    let mut x = normal.clone();
                    x.extend_from_slice(case);
                    x.extend_from_slice(&normal);
                    softmax_rows_inplace_with(path, &mut x, row);
                    assert!(
                        x[row..2 * row].iter().all(|v| v.is_nan()),
                        "{path:?} row {row} case {c}"
                    );
                    let sum: f32 = x[..row].iter().sum();
                    assert!(x[..row].iter().all(|v| v.is_finite()) && (sum - 1.0).abs() < 1e-5);
                    assert_eq!(x[..row], x[2 * row..], "{path:?}: the rows around stay finite");
                }
            }
        }
    }
}
