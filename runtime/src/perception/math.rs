//! Small numeric kernels shared by the stages, written so that LLVM vectorizes them
//! (eight independent accumulators, no bounds checks).

/// `sum a[i] * b[i]` over the common length.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ac, ar) = a.as_chunks::<8>();
    let (bc, br) = b.as_chunks::<8>();
    let mut acc = [0.0f32; 8];
    for (x, y) in ac.iter().zip(bc) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    let mut tail = 0.0;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `y += a * x` over the common length.
#[inline]
pub(crate) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `1 / |x|`, or `0` when the row has a NaN or infinite value, is all zeros, or its squared
/// norm overflows `f32`: such a row is treated as "no feature" by every stage.
#[inline]
pub(crate) fn inv_norm(x: &[f32]) -> f32 {
    let s = dot(x, x);
    if s.is_finite() && s > 0.0 { 1.0 / libm::sqrtf(s) } else { 0.0 }
}

/// Scales `x` to unit length in place and returns whether it was valid (see [`inv_norm`]);
/// an invalid row is set to zeros.
#[inline]
pub(crate) fn normalize(x: &mut [f32]) -> bool {
    let inv = inv_norm(x);
    if inv > 0.0 {
        x.iter_mut().for_each(|v| *v *= inv);
        true
    } else {
        x.iter_mut().for_each(|v| *v = 0.0);
        false
    }
}

/// `e^x` (libm; `core` has no `exp` on stable).
#[inline]
pub(crate) fn exp(x: f32) -> f32 {
    libm::expf(x)
}
