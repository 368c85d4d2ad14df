//! f32 products against constant weights packed once, at load (AVX-512).
//!
//! The `gemm` crate packs its operands at every call. For a [`GemmMatMul`](super::GemmMatMul)
//! with constant weights that means re-packing every weight matrix every frame: `perf` put
//! `gemm_common::pack_operands::pack_lhs` at 8 % of a ViT-S/16 fp32 frame (1 thread, Zen 4),
//! the share onnxruntime avoids by packing its weights at load (MLAS `MlasGemmPackB`). Here
//! the weights are laid out once in panels of [`NR`] columns, `k`-major (the order the
//! micro-kernel reads them), and each tile of [`MR`] rows x [`NR`] columns is one pass over
//! a [`KC`]-deep block: 24 accumulators, 4 weight loads and 6 broadcasts per `k`.
//!
//! Only where AVX-512F is present (and not removed by `TRACT_CPU_ISA`); elsewhere the
//! weights stay unpacked and the `gemm` crate runs the product.

// SIMD intrinsics and raw-pointer tiles; every block says why it stays in bounds.
#![allow(unsafe_code)]

/// Columns per weight panel: 4 vectors of 16.
pub const NR: usize = 64;
/// Rows per tile.
pub const MR: usize = 6;
/// Depth of one pass: a block of A (`m x KC`) stays in L2 while the panels go by.
pub const KC: usize = 512;

/// `B [k, n]` in panels of [`NR`] columns (the last one zero-padded), each `k x NR`,
/// row-major within the panel.
pub struct PackedF32 {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl std::fmt::Debug for PackedF32 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedF32 {{ k: {}, n: {} }}", self.k, self.n)
    }
}

/// Whether this CPU runs packed products (AVX-512F, not removed by `TRACT_CPU_ISA`).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::isa::avx512f()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl PackedF32 {
    /// Packs `B` (`k x n`, element `(i, j)` at `i * rs + j * cs` of `b`).
    pub fn pack(b: &[f32], k: usize, n: usize, rs: isize, cs: isize) -> Self {
        let panels = n.div_ceil(NR);
        let mut data = vec![0f32; panels * k * NR];
        for p in 0..panels {
            let panel = &mut data[p * k * NR..(p + 1) * k * NR];
            for i in 0..k {
                for j in 0..NR.min(n - p * NR) {
                    panel[i * NR + j] = b[(i as isize * rs + (p * NR + j) as isize * cs) as usize];
                }
            }
        }
        Self { k, n, data }
    }

    /// Depth.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// `C = (accumulate ? C : 0) + beta * A B` for rows `rows` of A (`a` row-major with row
    /// stride `a_rs`, `k` contiguous) into C (row stride `c_rs`, `n` contiguous).
    ///
    /// # Safety
    /// [`available`] is true; `a` holds rows `rows` of `k` values at stride `a_rs`, `c` rows
    /// `rows` of `n` values at stride `c_rs`, and no other thread touches those rows of C.
    pub unsafe fn run_rows(
        &self,
        io: RowsIo,
        rows: std::ops::Range<usize>,
        accumulate: bool,
        beta: f32,
    ) {
        #[cfg(target_arch = "x86_64")]
        // Safety: forwarded from the caller.
        unsafe {
            avx512::run_rows(self, io, rows, accumulate, beta)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (io, rows, accumulate, beta);
            unreachable!("PackedF32::run_rows without AVX-512 (`available` is false)")
        }
    }
}

/// Where [`PackedF32::run_rows`] reads A and writes C: base pointers and row strides.
#[derive(Clone, Copy)]
pub struct RowsIo {
    /// A, row-major, `k` contiguous.
    pub a: *const f32,
    /// A's row stride.
    pub a_rs: usize,
    /// C, row-major, `n` contiguous.
    pub c: *mut f32,
    /// C's row stride.
    pub c_rs: usize,
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{KC, MR, NR, PackedF32, RowsIo};

    /// # Safety
    /// As [`PackedF32::run_rows`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn run_rows(
        w: &PackedF32,
        io: RowsIo,
        rows: std::ops::Range<usize>,
        accumulate: bool,
        beta: f32,
    ) {
        let RowsIo { a, a_rs, c, c_rs } = io;
        let (k, n) = (w.k, w.n);
        let panels = n.div_ceil(NR);
        // Depth blocks of KC; one empty block when k = 0 (C is then its start value).
        let mut k0 = 0;
        loop {
            let kc = KC.min(k - k0);
            let load = accumulate || k0 > 0;
            for p in 0..panels {
                let cols = NR.min(n - p * NR);
                // Safety: panel p's rows k0..k0 + kc lie inside `data` (pack).
                let b = unsafe { w.data.as_ptr().add(p * k * NR + k0 * NR) };
                let mut r = rows.start;
                while r < rows.end {
                    let h = MR.min(rows.end - r);
                    // Safety: rows r..r + h of A and C are the caller's (see run_rows), and
                    // columns p·NR..p·NR + cols of C exist.
                    unsafe {
                        let at = a.add(r * a_rs + k0);
                        let ct = c.add(r * c_rs + p * NR);
                        match h {
                            6 => tile::<6>(at, a_rs, b, kc, ct, c_rs, cols, load, beta),
                            5 => tile::<5>(at, a_rs, b, kc, ct, c_rs, cols, load, beta),
                            4 => tile::<4>(at, a_rs, b, kc, ct, c_rs, cols, load, beta),
                            3 => tile::<3>(at, a_rs, b, kc, ct, c_rs, cols, load, beta),
                            2 => tile::<2>(at, a_rs, b, kc, ct, c_rs, cols, load, beta),
                            _ => tile::<1>(at, a_rs, b, kc, ct, c_rs, cols, load, beta),
                        }
                    }
                    r += h;
                }
            }
            k0 += kc;
            if k0 >= k {
                break;
            }
        }
    }

    /// One `R x NR` tile of C over `kc` steps: `C = (load ? C : 0) + beta * A B`, the
    /// columns past `cols` neither read nor written.
    ///
    /// # Safety
    /// AVX-512F; `a` has `R` rows of `kc` values at stride `a_rs`, `b` `kc` rows of `NR`,
    /// `c` `R` rows of `cols` values at stride `c_rs`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    // The tile's operands, one argument each.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize>(
        a: *const f32,
        a_rs: usize,
        b: *const f32,
        kc: usize,
        c: *mut f32,
        c_rs: usize,
        cols: usize,
        load: bool,
        beta: f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for i in 0..kc {
            // Safety: row i of the panel block holds NR floats; A's rows hold kc values.
            unsafe {
                let bp = b.add(i * NR);
                let bv = [
                    _mm512_loadu_ps(bp),
                    _mm512_loadu_ps(bp.add(16)),
                    _mm512_loadu_ps(bp.add(32)),
                    _mm512_loadu_ps(bp.add(48)),
                ];
                for (r, acc) in acc.iter_mut().enumerate() {
                    let av = _mm512_set1_ps(*a.add(r * a_rs + i));
                    for (x, bj) in acc.iter_mut().zip(bv) {
                        *x = _mm512_fmadd_ps(av, bj, *x);
                    }
                }
            }
        }
        let vbeta = _mm512_set1_ps(beta);
        for (r, acc) in acc.iter().enumerate() {
            for (j, x) in acc.iter().enumerate() {
                let left = cols.saturating_sub(j * 16).min(16);
                if left == 0 {
                    break;
                }
                let mask: __mmask16 = if left == 16 { 0xffff } else { (1u16 << left) - 1 };
                // Safety: the mask keeps the lanes inside C's `cols` columns of row r.
                unsafe {
                    let p = c.add(r * c_rs + j * 16);
                    let y = if load {
                        _mm512_fmadd_ps(*x, vbeta, _mm512_maskz_loadu_ps(mask, p))
                    } else {
                        _mm512_mul_ps(*x, vbeta)
                    };
                    _mm512_mask_storeu_ps(p, mask, y);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The panel layout, on every CPU: `k`-major panels of `NR` columns read through `B`'s
    /// strides, the last panel zero-padded.
    #[test]
    fn packing_lays_out_k_major_panels() {
        let (k, n) = (3usize, 70usize);
        // B stored transposed: element (i, j) at j * k + i.
        let bt: Vec<f32> = (0..n * k).map(|v| v as f32).collect();
        let w = PackedF32::pack(&bt, k, n, 1, k as isize);
        assert_eq!((w.k(), w.n(), w.data.len()), (k, n, 2 * k * NR));
        for (p, i, j) in [(0, 0, 0), (0, 2, 63), (1, 1, 0), (1, 2, 5)] {
            assert_eq!(w.data[p * k * NR + i * NR + j], bt[(p * NR + j) * k + i]);
        }
        assert!(w.data[k * NR + 6..k * NR + NR].iter().all(|v| *v == 0.0), "padding");
    }

    /// Every tile height and column remainder, one and several depth blocks, scaled and
    /// accumulating, against an f64 product. Runs where the kernel does (AVX-512F); other
    /// CPUs never substitute it (`available`), which the `kernels:` line says.
    #[test]
    fn packed_products_match_f64() {
        if !available() {
            eprintln!("no AVX-512F here: the packed kernel is not used on this CPU");
            return;
        }
        let mut seed = 1u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for &(m, k, n) in &[(1, 1, 1), (7, 5, 70), (13, 600, 64), (196, 64, 130), (6, 1100, 17)] {
            let a: Vec<f32> = (0..m * k).map(|_| next()).collect();
            // B stored transposed ([n, k]) to exercise the strides of `pack`.
            let bt: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| next()).collect();
            let w = PackedF32::pack(&bt, k, n, 1, k as isize);
            for (accumulate, beta) in [(false, 1.0f32), (true, 0.125)] {
                let mut c = c0.clone();
                // Safety: AVX-512F checked; the slices hold m rows of k and of n.
                let io = RowsIo { a: a.as_ptr(), a_rs: k, c: c.as_mut_ptr(), c_rs: n };
                unsafe { w.run_rows(io, 0..m, accumulate, beta) };
                for i in 0..m {
                    for j in 0..n {
                        let dot: f64 =
                            (0..k).map(|l| a[i * k + l] as f64 * bt[j * k + l] as f64).sum();
                        let want =
                            if accumulate { c0[i * n + j] as f64 } else { 0.0 } + beta as f64 * dot;
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()) * (k as f64).sqrt(),
                            "[{m}x{k}x{n}] acc {accumulate} ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
