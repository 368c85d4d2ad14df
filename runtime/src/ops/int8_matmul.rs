//! Integer matrix products with the activation quantization fused in: `y = dq(q(x)) · dq(Wq)`
//! computed as one op, with int8 weights packed once at load time.
//!
//! tract runs a QDQ `MatMul` (`DequantizeLinear(QuantizeLinear(x))` times
//! `DequantizeLinear(Wq)`) as fake quantization: a float product plus standalone quantize
//! ops that cost more than the products they feed (see `docs/PERFORMANCE.md` and
//! `../shared/anchors.md`). [`Int8MatMul`] replaces the whole pattern
//! ([`crate::ops::qdq`] finds it in the ONNX graph): it quantizes the f32 activation rows
//! into a `u8` buffer (one vectorized pass), multiplies them with the packed int8 weights
//! (AVX-512 VNNI `vpdpbusd` where the CPU has it, portable integer code otherwise), and
//! dequantizes the `i32` sums with the per-column scales and the bias in the same pass that
//! stores them. The integer sums are exact, so the result equals the QDQ graph's float
//! semantics up to the float rounding of the dequantization.

// The kernels read and write through raw pointers (SIMD loads, threads writing disjoint
// columns of one output); every unsafe block states why it stays in bounds.
#![allow(unsafe_code)]

use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

/// Columns per packed weight panel (two 16-lane vectors).
pub const NR: usize = 32;
/// Rows per kernel call.
const MR: usize = 12;
/// Products below this many multiply-adds run on one thread. ViT-Ti/16's 197 x 192 x 192
/// projections (7.3 M) are split: at 16 M they were not, and the int8 ViT-Ti/16 ran at
/// 13.3 ms per frame on 2 threads instead of 11.3-11.9 (`onnx_bench --threads 2`, A/B).
const PARALLEL_MIN_MACS: usize = 4 << 20;
/// Round-half-to-even by the float adder: exact for `|x| < 2^22`.
const MAGIC: f32 = 12_582_912.0;

/// Per-tensor activation quantization, ONNX `QuantizeLinear` semantics:
/// `q = saturate(round_half_even(x / scale) + zero_point)`, `x ~ (q - zero_point) * scale`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ActQuant {
    /// Scale (finite, > 0).
    pub scale: f32,
    /// Zero point, within the type's range.
    pub zero_point: i32,
    /// `int8` (range -128..=127) rather than `uint8` (0..=255).
    pub signed: bool,
}

impl ActQuant {
    /// The `u8` code stores `q + 128` for int8, `q` for uint8: the value is `u - offset`.
    fn offset(&self) -> i32 {
        self.zero_point + if self.signed { 128 } else { 0 }
    }

    fn shift(&self) -> f32 {
        if self.signed { 128.0 } else { 0.0 }
    }
}

/// Int8 weights `[K, N]` packed in panels of [`NR`] columns: for panel `p`, k-group `g`
/// (4 consecutive `k`), column `c` and `j < 4`, byte `((p * kg + g) * NR + c) * 4 + j` is
/// `W[4g + j, p * NR + c]` (0 beyond `K` or `N`): the layout `vpdpbusd` reads.
pub struct PackedWeights {
    k: usize,
    n: usize,
    kg: usize,
    panels: usize,
    data: Vec<i8>,
    /// `sum_k W[k, n]`, for the zero-point correction.
    colsum: Vec<i32>,
}

impl PackedWeights {
    /// Packs row-major `w` (`k * n` values).
    pub fn pack(w: &[i8], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "PackedWeights::pack: {} values for [{k}, {n}]", w.len());
        let kg = k.div_ceil(4);
        let panels = n.div_ceil(NR);
        let mut data = vec![0i8; panels * kg * NR * 4];
        let mut colsum = vec![0i32; panels * NR];
        for kk in 0..k {
            let (g, j) = (kk / 4, kk % 4);
            for (c, &v) in w[kk * n..(kk + 1) * n].iter().enumerate() {
                let (p, cc) = (c / NR, c % NR);
                data[((p * kg + g) * NR + cc) * 4 + j] = v;
                colsum[c] += i32::from(v);
            }
        }
        Self { k, n, kg, panels, data, colsum }
    }

    /// `K`.
    pub fn k(&self) -> usize {
        self.k
    }

    /// `N`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Bytes of one quantized activation row (`K` rounded up to 4).
    fn kp(&self) -> usize {
        self.kg * 4
    }
}

/// Quantizes row-major `x` (`rows * k`) into `u8` codes, rows of `kp >= k` bytes (the
/// padding bytes are left as they are: they meet the zero padding of the weights).
pub fn quantize_rows(x: &[f32], k: usize, kp: usize, q: ActQuant, out: &mut [u8]) {
    quantize_gather(x, &RowLayout::contiguous(x.len() / k.max(1), k), kp, q, out);
}

/// One activation code. Subnormal inputs (GELU's far negative tail) are flushed to 0 first:
/// they quantize to 0 at any realistic scale, and dividing them costs a microcode assist of
/// ~100 cycles each on Intel cores (measured: the fc2 input of ViT-S took 2.8 ms instead of
/// 0.3 ms per layer). The integer comes out of the float's bits (`MAGIC + j` has `j` in its
/// low mantissa bits), so the loop vectorizes without a float-to-int conversion.
#[inline(always)]
fn code(v: f32, scale: f32, off: f32) -> u8 {
    let v = if v.abs() < f32::MIN_POSITIVE { 0.0 } else { v };
    // round_half_even(x / scale) first (the zero point is added after rounding, as ONNX
    // does), then saturate; NaN ends at code 0 through `max`.
    let t = (v / scale).clamp(-512.0, 512.0);
    // max/min rather than clamp: clamp keeps a NaN, max turns it into the low bound.
    #[allow(clippy::manual_clamp)]
    let y = ((t + MAGIC) + off).max(MAGIC).min(MAGIC + 255.0);
    (y.to_bits() & 0xff) as u8
}

#[inline(always)]
fn quantize_slice(src: &[f32], dst: &mut [u8], scale: f32, off: f32) {
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = code(v, scale, off);
    }
}

/// Where the rows of a product's `A` operand are in its input tensor: `m` rows `row_stride`
/// apart, each row the `K` values enumerated by the k axes (outer to inner, `(size,
/// stride)`). A contiguous `[.., K]` input is `ks = [(K, 1)]`, `row_stride = K`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowLayout {
    /// Rows.
    pub m: usize,
    /// Element stride between rows.
    pub row_stride: isize,
    /// The k axes, outer to inner: size and element stride.
    pub ks: Vec<(usize, isize)>,
}

impl RowLayout {
    /// Contiguous rows of `k` values.
    pub fn contiguous(m: usize, k: usize) -> Self {
        Self { m, row_stride: k as isize, ks: vec![(k, 1)] }
    }

    /// The largest element offset read, plus one.
    fn span(&self) -> usize {
        let last = |size: usize, stride: isize| size.saturating_sub(1) as isize * stride;
        (last(self.m, self.row_stride)
            + self.ks.iter().map(|&(s, st)| last(s, st)).sum::<isize>()
            + 1)
        .max(0) as usize
    }
}

/// Quantizes the rows `layout` describes in `x` into `u8` codes, rows of `kp >= k` bytes
/// (the padding bytes are not written). Contiguous runs (a whole row, or one head's values in the two-k-axes case
/// of the attention projection) go through one vectorized loop.
fn quantize_gather(x: &[f32], layout: &RowLayout, kp: usize, q: ActQuant, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if super::isa::avx512f() {
        // Safety: the feature was detected (`isa::avx512f`).
        unsafe { quantize_gather_avx512(x, layout, kp, q, out) };
        return;
    }
    quantize_gather_body(x, layout, kp, q, out);
}

/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_gather_avx512(
    x: &[f32],
    layout: &RowLayout,
    kp: usize,
    q: ActQuant,
    out: &mut [u8],
) {
    quantize_gather_body(x, layout, kp, q, out);
}

#[inline(always)]
fn quantize_gather_body(x: &[f32], layout: &RowLayout, kp: usize, q: ActQuant, out: &mut [u8]) {
    let off = q.zero_point as f32 + q.shift();
    // The outer k axis (if any) and the inner one.
    let (outer, (k, sk)) = match layout.ks[..] {
        [inner] => ((1, 0), inner),
        [outer, inner] => (outer, inner),
        _ => unreachable!("RowLayout has one or two k axes (checked by Int8MatMul::new)"),
    };
    for (r, dst) in out.chunks_exact_mut(kp).take(layout.m).enumerate() {
        let base = r as isize * layout.row_stride;
        for a in 0..outer.0 {
            let start = base + a as isize * outer.1;
            let d = &mut dst[a * k..(a + 1) * k];
            if sk == 1 {
                // A contiguous run of k values (head_dim values of one head).
                quantize_slice(&x[start as usize..start as usize + k], d, q.scale, off);
            } else {
                for (i, c) in d.iter_mut().enumerate() {
                    *c = code(x[(start + i as isize * sk) as usize], q.scale, off);
                }
            }
        }
        dst[outer.0 * k..].fill(0);
    }
}

/// The activation quantization ONNX `DynamicQuantizeLinear` computes for the rows `layout`
/// describes in `x`: uint8, `scale = (max(x, 0) - min(x, 0)) / 255`, `zero_point =
/// saturate(round_half_even(-min(x, 0) / scale))` (a zero range gives scale 1: every code is
/// the zero point, as every value is 0).
fn dynamic_act(x: &[f32], layout: &RowLayout) -> ActQuant {
    let (lo, hi) = row_range(x, layout);
    let scale = (hi - lo) / 255.0;
    if !(scale.is_finite() && scale > 0.0) {
        return ActQuant { scale: 1.0, zero_point: 0, signed: false };
    }
    let zero_point = (-lo / scale).round_ties_even().clamp(0.0, 255.0) as i32;
    ActQuant { scale, zero_point, signed: false }
}

/// `(min(x, 0), max(x, 0))` over the rows `layout` describes, NaN ignored (as `f32::min`
/// does). Every dynamic product scans its whole input once per call: scalar, this was 8 % of
/// an onnxruntime-quantized ViT-Ti/16 frame (`perf`), so the contiguous runs take 16 lanes.
fn row_range(x: &[f32], layout: &RowLayout) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if super::isa::avx512f() {
        // Safety: the feature was detected (`isa::avx512f`).
        return unsafe { row_range_avx512(x, layout) };
    } else if super::isa::avx2() {
        // Safety: the feature was detected (`isa::avx2`).
        return unsafe { row_range_avx2(x, layout) };
    }
    row_range_body(x, layout)
}

/// # Safety
/// The CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_range_avx512(x: &[f32], layout: &RowLayout) -> (f32, f32) {
    row_range_body(x, layout)
}

/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_range_avx2(x: &[f32], layout: &RowLayout) -> (f32, f32) {
    row_range_body(x, layout)
}

#[inline(always)]
fn row_range_body(x: &[f32], layout: &RowLayout) -> (f32, f32) {
    // `if v < l { v } else { l }` is the vector min instruction's own semantics (a NaN `v`
    // keeps `l`), so the lanes below compile to one min and one max per 16 values.
    #[inline(always)]
    fn lower(l: f32, v: f32) -> f32 {
        if v < l { v } else { l }
    }
    #[inline(always)]
    fn upper(h: f32, v: f32) -> f32 {
        if v > h { v } else { h }
    }
    // Four independent 16-lane accumulators: one alone was latency-bound (each masked min
    // waits for the last, `perf annotate`).
    const LANES: usize = 16;
    const WAYS: usize = 4;
    let (mut lo, mut hi) = ([[0f32; LANES]; WAYS], [[0f32; LANES]; WAYS]);
    let (outer, (k, sk)) = match layout.ks[..] {
        [inner] => ((1, 0), inner),
        [outer, inner] => (outer, inner),
        _ => unreachable!("RowLayout has one or two k axes (checked by Int8MatMul::new)"),
    };
    let (mut l1, mut h1) = (0f32, 0f32);
    for r in 0..layout.m {
        let base = r as isize * layout.row_stride;
        for a in 0..outer.0 {
            let start = base + a as isize * outer.1;
            if sk == 1 {
                let run = &x[start as usize..start as usize + k];
                let mut wide = run.chunks_exact(LANES * WAYS);
                for c in &mut wide {
                    for (w, c) in c.chunks_exact(LANES).enumerate() {
                        for i in 0..LANES {
                            lo[w][i] = lower(lo[w][i], c[i]);
                            hi[w][i] = upper(hi[w][i], c[i]);
                        }
                    }
                }
                let mut chunks = wide.remainder().chunks_exact(LANES);
                for c in &mut chunks {
                    for i in 0..LANES {
                        lo[0][i] = lower(lo[0][i], c[i]);
                        hi[0][i] = upper(hi[0][i], c[i]);
                    }
                }
                for &v in chunks.remainder() {
                    (l1, h1) = (lower(l1, v), upper(h1, v));
                }
            } else {
                for i in 0..k {
                    let v = x[(start + i as isize * sk) as usize];
                    (l1, h1) = (lower(l1, v), upper(h1, v));
                }
            }
        }
    }
    (lo.into_iter().flatten().fold(l1, lower), hi.into_iter().flatten().fold(h1, upper))
}

/// What one product needs besides its operands.
struct Epilogue<'a> {
    /// `offset * colsum[n]`, subtracted from the raw sums.
    correction: &'a [i32],
    /// `x_scale * w_scale[n]`.
    scale: &'a [f32],
    /// Bias per column (zeros when none).
    bias: &'a [f32],
    /// Apply GELU (erf form) to the result.
    gelu: bool,
}

use super::isa;
use super::simd::gelu;

/// An integer product kernel. [`Kernel::selected`] is the best one this CPU runs, or the one
/// named by `FLSL_INT8_KERNEL` (`portable`, `avx512vnni`, `avxvnni`, `avx2`, `neon-dot`, `neon`) for
/// comparing CPU classes on one machine. Every kernel computes the same (exact) integer sums;
/// the outputs are bit-identical to the portable kernel's except the AVX-512 one's, whose
/// dequantization uses a fused multiply-add (one rounding fewer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Portable integer code (any CPU).
    Portable,
    /// AVX-512 VNNI `vpdpbusd` (Sapphire Rapids, Ice Lake servers).
    #[cfg(target_arch = "x86_64")]
    Avx512Vnni,
    /// AVX-VNNI, 256-bit `vpdpbusd` (Alder Lake and later client CPUs: NUCs, without AVX-512).
    #[cfg(target_arch = "x86_64")]
    AvxVnni,
    /// AVX2 `vpmaddwd` on widened operands (x86 without any VNNI: Haswell to Comet Lake, Zen 1-3).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// NEON with the dot-product extension, `sdot` (Cortex-A76/A78: Pi 5, Jetson Orin).
    #[cfg(target_arch = "aarch64")]
    NeonDot,
    /// NEON widening multiplies, `smull` + `sadalp` (Cortex-A57/A72: Jetson Nano, Pi 4).
    #[cfg(target_arch = "aarch64")]
    Neon,
}

impl Kernel {
    /// Every kernel this CPU runs, best first (less what `TRACT_CPU_ISA` removes: [`isa`]).
    pub fn available() -> Vec<Kernel> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if isa::avx512vnni() {
                v.push(Kernel::Avx512Vnni);
            }
            if isa::avxvnni() {
                v.push(Kernel::AvxVnni);
            }
            if isa::avx2() {
                v.push(Kernel::Avx2);
            }
        }
        #[cfg(target_arch = "aarch64")]
        {
            if isa::dotprod() {
                v.push(Kernel::NeonDot);
            }
            if std::arch::is_aarch64_feature_detected!("neon") {
                v.push(Kernel::Neon);
            }
        }
        v.push(Kernel::Portable);
        v
    }

    /// Its name (what `FLSL_INT8_KERNEL` takes).
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512Vnni => "avx512vnni",
            #[cfg(target_arch = "x86_64")]
            Kernel::AvxVnni => "avxvnni",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => "avx2",
            #[cfg(target_arch = "aarch64")]
            Kernel::NeonDot => "neon-dot",
            #[cfg(target_arch = "aarch64")]
            Kernel::Neon => "neon",
        }
    }

    /// The kernel in use: `FLSL_INT8_KERNEL` when it names one this CPU runs (a warning
    /// otherwise), else the best available. Decided once per process.
    pub fn selected() -> Kernel {
        static SELECTED: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *SELECTED.get_or_init(|| {
            let available = Kernel::available();
            match std::env::var("FLSL_INT8_KERNEL") {
                Ok(name) if !name.is_empty() => {
                    if let Some(k) = available.iter().find(|k| k.name() == name) {
                        *k
                    } else {
                        tracing::warn!(
                            "FLSL_INT8_KERNEL={name}: not a kernel this CPU runs ({}); using {}",
                            available.iter().map(|k| k.name()).collect::<Vec<_>>().join(", "),
                            available[0].name()
                        );
                        available[0]
                    }
                }
                _ => available[0],
            }
        })
    }
}

/// `out[m, n] = (sum_k a[m, k] * W[k, n] - correction[n]) * scale[n] + bias[n]` for the
/// panels `panels` (all rows), `a` quantized rows of `w.kp()` bytes, `out` row-major `[m, n]`.
///
/// # Safety
/// `out` must point to `m * w.n` writable floats that no one else writes in the columns of
/// `panels` during the call.
unsafe fn run_panels(
    a: &[u8],
    m: usize,
    w: &PackedWeights,
    epi: &Epilogue,
    out: *mut f32,
    panels: std::ops::Range<usize>,
) {
    // Safety: the caller's contract; `selected` only returns kernels this CPU runs.
    unsafe { run_panels_with(Kernel::selected(), a, m, w, epi, out, panels) }
}

/// [`run_panels`] with a given kernel.
///
/// # Safety
/// As [`run_panels`], and `kernel` is one of [`Kernel::available`].
unsafe fn run_panels_with(
    kernel: Kernel,
    a: &[u8],
    m: usize,
    w: &PackedWeights,
    epi: &Epilogue,
    out: *mut f32,
    panels: std::ops::Range<usize>,
) {
    // Safety (every arm): the kernel's features are present (caller), the bounds are the caller's.
    match kernel {
        Kernel::Portable => unsafe { portable_panels(a, m, w, epi, out, panels) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Vnni => unsafe { vnni::run_panels(a, m, w, epi, out, panels) },
        #[cfg(target_arch = "x86_64")]
        Kernel::AvxVnni => unsafe { avx2::run_panels_vnni(a, m, w, epi, out, panels) },
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => unsafe { avx2::run_panels(a, m, w, epi, out, panels) },
        #[cfg(target_arch = "aarch64")]
        Kernel::NeonDot => unsafe { arm::run_panels(true, a, m, w, epi, out, panels) },
        #[cfg(target_arch = "aarch64")]
        Kernel::Neon => unsafe { arm::run_panels(false, a, m, w, epi, out, panels) },
    }
}

/// Dequantizes `R` rows of integer sums of panel `p` into `out` (the scalar epilogue of the
/// kernels that produce an `i32` tile). `shift`: the sums were taken with activation codes
/// minus 128 (signed dot products), so `128 * colsum` is added back.
///
/// # Safety
/// Rows `r0..r0 + R` and the panel's columns are inside the caller's `m * n` output.
#[cfg(target_arch = "aarch64")]
unsafe fn store_tile<const R: usize>(
    acc: &[[i32; NR]; R],
    shift: bool,
    r0: usize,
    p: usize,
    w: &PackedWeights,
    epi: &Epilogue,
    out: *mut f32,
) {
    let cols = (w.n - p * NR).min(NR);
    for (i, row) in acc.iter().enumerate() {
        for (c, &v) in row.iter().enumerate().take(cols) {
            let col = p * NR + c;
            let v = if shift { v + 128 * w.colsum[col] } else { v };
            let y = (v - epi.correction[col]) as f32 * epi.scale[col] + epi.bias[col];
            let y = if epi.gelu { gelu(y) } else { y };
            // Safety: the caller's contract.
            unsafe { *out.add((r0 + i) * w.n + col) = y };
        }
    }
}

/// The kernels' outer loops: for each panel of `$panels` and each block of at most `$max`
/// rows, `$tile::<R>(a, r0, w, p, epi, out)` with `R` the block's row count (a const generic,
/// so each tile keeps its accumulators in registers). Expands inside an `unsafe fn` whose
/// caller guarantees the kernel's CPU features and [`run_panels`]'s bounds.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
macro_rules! for_tiles {
    ($panels:expr, $m:expr, $tile:ident($a:expr, $w:expr, $epi:expr, $out:expr); $max:literal $(, $n:literal)*) => {{
        for p in $panels {
            let mut r = 0;
            while r < $m {
                let rows = ($m - r).min($max);
                // Safety: rows r..r+rows exist; the panel exists; the caller's features and
                // output contract.
                unsafe {
                    match rows {
                        $max => $tile::<$max>($a, r, $w, p, $epi, $out),
                        $($n => $tile::<$n>($a, r, $w, p, $epi, $out),)*
                        _ => $tile::<1>($a, r, $w, p, $epi, $out),
                    }
                }
                r += rows;
            }
        }
    }};
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    //! AVX2 without VNNI: operands widened to 16 bits, then `vpmaddwd` (pairs of i16
    //! products into i32 lanes: exact, unlike `vpmaddubsw`'s saturating u8 x i8), pairs folded
    //! with `vphaddd` at the end. The activation rows are widened once per call into a
    //! per-thread buffer, so the inner loop broadcasts four i16 codes straight from memory
    //! (`vpbroadcastq`, a load) instead of a broadcast and a `vpmovzxbw` per row and column
    //! quarter (two shuffle-port operations per two `vpmaddwd`); the weights are widened
    //! (`vpmovsxbw`) once per k-group and quarter, shared by the tile's rows.

    use std::arch::x86_64::*;
    use std::cell::Cell;

    use super::{Epilogue, NR, PackedWeights};

    thread_local! {
        /// The widened activation rows of the current call (grown, never shrunk: no
        /// allocation per frame once the largest product has run on this thread).
        static WIDE: Cell<Vec<i16>> = const { Cell::new(Vec::new()) };
    }

    /// `dst[i] = src[i]` zero-extended (`dst.len() == src.len()`).
    #[target_feature(enable = "avx2")]
    fn widen(src: &[u8], dst: &mut [i16]) {
        let n = src.len().min(dst.len());
        let full = n / 16 * 16;
        for i in (0..full).step_by(16) {
            // Safety: i + 16 <= n on both sides.
            unsafe {
                let v = _mm256_cvtepu8_epi16(_mm_loadu_si128(src.as_ptr().add(i).cast()));
                _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), v);
            }
        }
        for (d, &s) in dst[full..n].iter_mut().zip(&src[full..n]) {
            *d = i16::from(s);
        }
    }

    /// # Safety
    /// The CPU has AVX2; [`super::run_panels`]'s contract.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn run_panels(
        a: &[u8],
        m: usize,
        w: &PackedWeights,
        epi: &Epilogue,
        out: *mut f32,
        panels: std::ops::Range<usize>,
    ) {
        let len = m * w.kp();
        let mut wide = WIDE.take();
        if wide.len() < len {
            wide.resize(len, 0);
        }
        widen(&a[..len], &mut wide[..len]);
        let a16 = &wide[..len];
        for_tiles!(panels, m, tile(a16, w, epi, out); 6, 5, 4, 3, 2);
        WIDE.set(wide);
    }

    #[target_feature(enable = "avx2")]
    unsafe fn tile<const R: usize>(
        a: &[i16],
        r0: usize,
        w: &PackedWeights,
        p: usize,
        epi: &Epilogue,
        out: *mut f32,
    ) {
        let kp = w.kp();
        let b = w.data[p * w.kg * NR * 4..].as_ptr();
        let a0 = a[r0 * kp..].as_ptr();
        let mut sums = [[0i32; NR]; R];
        // Eight columns (two vectors of four) at a time: 2 R accumulators + 2 weight vectors
        // + the broadcast activation fit the 16 registers for R <= 6.
        for q in 0..4 {
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            for g in 0..w.kg {
                // Safety: panel p holds kg groups of 128 bytes; rows hold kp = 4 kg widened codes.
                unsafe {
                    let bg = b.add(g * NR * 4 + q * 32);
                    let b0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(bg.cast()));
                    let b1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(bg.add(16).cast()));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        // The row's four widened codes of group g, in every 64-bit lane.
                        let a4 = a0.add(i * kp + g * 4).cast::<i64>().read_unaligned();
                        let av = _mm256_set1_epi64x(a4);
                        acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(b0, av));
                        acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(b1, av));
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                // [c0 c0 c1 c1 c2 c2 c3 c3] + [c4 ..] -> [c0 c1 c4 c5 | c2 c3 c6 c7] -> in order.
                let h = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[0], acc[1]), 0xD8);
                // Safety: 8 i32 into sums[i][8q..8q+8].
                unsafe { _mm256_storeu_si256(sums[i][q * 8..].as_mut_ptr().cast(), h) };
            }
        }
        // Safety: the caller's contract.
        unsafe { store8(&sums, r0, p, w, epi, out) };
    }

    /// The AVX-VNNI kernel: 256-bit `vpdpbusd` (u8 x i8, 4-way dot products into i32 lanes),
    /// half a panel (16 columns) at a time for up to 6 rows.
    ///
    /// # Safety
    /// The CPU has AVX2 and AVX-VNNI; [`super::run_panels`]'s contract.
    #[target_feature(enable = "avx2,avxvnni")]
    pub(super) unsafe fn run_panels_vnni(
        a: &[u8],
        m: usize,
        w: &PackedWeights,
        epi: &Epilogue,
        out: *mut f32,
        panels: std::ops::Range<usize>,
    ) {
        for_tiles!(panels, m, tile_vnni(a, w, epi, out); 6, 5, 4, 3, 2);
    }

    #[target_feature(enable = "avx2,avxvnni")]
    unsafe fn tile_vnni<const R: usize>(
        a: &[u8],
        r0: usize,
        w: &PackedWeights,
        p: usize,
        epi: &Epilogue,
        out: *mut f32,
    ) {
        let kp = w.kp();
        let b = w.data[p * w.kg * NR * 4..].as_ptr();
        let a0 = a[r0 * kp..].as_ptr();
        let mut sums = [[0i32; NR]; R];
        for h in 0..2 {
            let mut acc = [[_mm256_setzero_si256(); 2]; R];
            for g in 0..w.kg {
                // Safety: panel p holds kg groups of 128 bytes; rows hold kp >= 4 kg bytes.
                unsafe {
                    let bg = b.add(g * NR * 4 + h * 64);
                    let b0 = _mm256_loadu_si256(bg.cast());
                    let b1 = _mm256_loadu_si256(bg.add(32).cast());
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let a4 = a0.add(i * kp + g * 4).cast::<i32>().read_unaligned();
                        let av = _mm256_set1_epi32(a4);
                        acc[0] = _mm256_dpbusd_avx_epi32(acc[0], av, b0);
                        acc[1] = _mm256_dpbusd_avx_epi32(acc[1], av, b1);
                    }
                }
            }
            for (s, acc) in sums.iter_mut().zip(&acc) {
                // Safety: 2 x 8 i32 into s[16h..16h+16].
                unsafe {
                    _mm256_storeu_si256(s[h * 16..].as_mut_ptr().cast(), acc[0]);
                    _mm256_storeu_si256(s[h * 16 + 8..].as_mut_ptr().cast(), acc[1]);
                }
            }
        }
        // Safety: the caller's contract.
        unsafe { store8(&sums, r0, p, w, epi, out) };
    }

    /// [`super::store_tile`] on 8 lanes for whole groups of 8 columns (the rest through it): the
    /// same operations in the same order, without fused multiply-adds, so the results are
    /// bit-identical to the portable kernel's.
    ///
    /// # Safety
    /// As [`super::store_tile`]; the CPU has AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn store8<const R: usize>(
        acc: &[[i32; NR]; R],
        r0: usize,
        p: usize,
        w: &PackedWeights,
        epi: &Epilogue,
        out: *mut f32,
    ) {
        let col0 = p * NR;
        let cols = (w.n - col0).min(NR);
        let full = cols / 8 * 8;
        for (i, row) in acc.iter().enumerate() {
            for c in (0..full).step_by(8) {
                // Safety: columns col0+c..col0+c+8 < n: inside the per-column arrays and the
                // caller's output row.
                unsafe {
                    let s = _mm256_loadu_si256(row[c..].as_ptr().cast());
                    let corr = _mm256_loadu_si256(epi.correction.as_ptr().add(col0 + c).cast());
                    let v = _mm256_cvtepi32_ps(_mm256_sub_epi32(s, corr));
                    let scale = _mm256_loadu_ps(epi.scale.as_ptr().add(col0 + c));
                    let bias = _mm256_loadu_ps(epi.bias.as_ptr().add(col0 + c));
                    let mut y = _mm256_add_ps(_mm256_mul_ps(v, scale), bias);
                    if epi.gelu {
                        y = gelu8(y);
                    }
                    _mm256_storeu_ps(out.add((r0 + i) * w.n + col0 + c), y);
                }
            }
        }
        if full < cols {
            // The last columns, scalar (same formula).
            for (i, row) in acc.iter().enumerate() {
                for (c, &v) in row.iter().enumerate().take(cols).skip(full) {
                    let col = col0 + c;
                    let y = (v - epi.correction[col]) as f32 * epi.scale[col] + epi.bias[col];
                    let y = if epi.gelu { super::gelu(y) } else { y };
                    // Safety: the caller's contract.
                    unsafe { *out.add((r0 + i) * w.n + col) = y };
                }
            }
        }
    }

    /// [`super::gelu`] on 8 lanes, operation for operation.
    #[target_feature(enable = "avx2")]
    fn gelu8(x: __m256) -> __m256 {
        use super::super::simd::ERF_A;
        let c = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let sign = _mm256_set1_ps(-0.0);
        let abs = _mm256_andnot_ps(sign, c);
        let mut y = _mm256_mul_ps(_mm256_set1_ps(ERF_A[5]), abs);
        for a in ERF_A[..5].iter().rev() {
            y = _mm256_mul_ps(_mm256_add_ps(_mm256_set1_ps(*a), y), abs);
        }
        let q = _mm256_add_ps(y, _mm256_set1_ps(1.0));
        let q2 = _mm256_mul_ps(q, q);
        let q4 = _mm256_mul_ps(q2, q2);
        let q8 = _mm256_mul_ps(q4, q4);
        let q16 = _mm256_mul_ps(q8, q8);
        let one = _mm256_set1_ps(1.0);
        let e = _mm256_sub_ps(one, _mm256_div_ps(one, q16));
        // copysign(e, c): e's magnitude (e >= 0 here, but clear the bit anyway), c's sign.
        let erf = _mm256_or_ps(_mm256_andnot_ps(sign, e), _mm256_and_ps(sign, c));
        _mm256_mul_ps(_mm256_mul_ps(x, _mm256_set1_ps(0.5)), _mm256_add_ps(erf, one))
    }
}

#[cfg(target_arch = "aarch64")]
#[allow(unsafe_code)]
mod arm {
    //! aarch64: activation codes become signed (`u8 ^ 0x80` = code - 128, corrected by
    //! `128 * colsum` in the epilogue), then per 16-byte weight vector (4 columns x 4 k):
    //! with the dot-product extension one `sdot`; without it `smull`/`smull2` (i8 x i8 into
    //! i16, exact) and `sadalp` (pairs into i32), the pairs folded by `addp` at the end.

    use std::arch::aarch64::*;
    use std::arch::asm;

    use super::{Epilogue, NR, PackedWeights, store_tile};

    /// # Safety
    /// The CPU has NEON (and the dot-product extension when `dot`); [`super::run_panels`]'s
    /// contract.
    pub(super) unsafe fn run_panels(
        dot: bool,
        a: &[u8],
        m: usize,
        w: &PackedWeights,
        epi: &Epilogue,
        out: *mut f32,
        panels: std::ops::Range<usize>,
    ) {
        if dot {
            for_tiles!(panels, m, tile_dot(a, w, epi, out); 4, 3, 2);
        } else {
            for_tiles!(panels, m, tile_neon(a, w, epi, out); 4, 3, 2);
        }
    }

    /// `acc + dot4(b, a)` per 32-bit lane (`sdot`; the intrinsic is not stable yet).
    #[target_feature(enable = "neon,dotprod")]
    #[inline]
    unsafe fn sdot(acc: int32x4_t, b: int8x16_t, a: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // Safety: register-only instruction of a feature the caller enabled.
        unsafe {
            asm!("sdot {acc:v}.4s, {b:v}.16b, {a:v}.16b", acc = inout(vreg) acc, b = in(vreg) b, a = in(vreg) a, options(pure, nomem, nostack, preserves_flags));
        }
        acc
    }

    /// Four activation codes of row `i`, group `g`, as signed bytes repeated four times.
    #[inline(always)]
    unsafe fn act4(a0: *const u8, kp: usize, i: usize, g: usize) -> int8x16_t {
        // Safety: the caller's bounds (row i holds kp >= 4 kg bytes).
        let a4 = unsafe { a0.add(i * kp + g * 4).cast::<u32>().read_unaligned() } ^ 0x8080_8080;
        // Safety: NEON is baseline on aarch64.
        unsafe { vreinterpretq_s8_u32(vdupq_n_u32(a4)) }
    }

    #[target_feature(enable = "neon,dotprod")]
    unsafe fn tile_dot<const R: usize>(
        a: &[u8],
        r0: usize,
        w: &PackedWeights,
        p: usize,
        epi: &Epilogue,
        out: *mut f32,
    ) {
        let kp = w.kp();
        let b = w.data[p * w.kg * NR * 4..].as_ptr();
        let a0 = a[r0 * kp..].as_ptr();
        let mut acc = [[vdupq_n_s32(0); 8]; R];
        for g in 0..w.kg {
            // Safety: panel p holds kg groups of 128 bytes (8 vectors).
            unsafe {
                let bg = b.add(g * NR * 4);
                let bv: [int8x16_t; 8] = core::array::from_fn(|c| vld1q_s8(bg.add(16 * c)));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let av = act4(a0, kp, i, g);
                    for (c, acc) in acc.iter_mut().enumerate() {
                        *acc = sdot(*acc, bv[c], av);
                    }
                }
            }
        }
        let mut sums = [[0i32; NR]; R];
        for (s, acc) in sums.iter_mut().zip(&acc) {
            for (c, v) in acc.iter().enumerate() {
                // Safety: 4 i32 into s[4c..4c+4].
                unsafe { vst1q_s32(s[4 * c..].as_mut_ptr(), *v) };
            }
        }
        // Safety: the caller's contract.
        unsafe { store_tile(&sums, true, r0, p, w, epi, out) };
    }

    #[target_feature(enable = "neon")]
    unsafe fn tile_neon<const R: usize>(
        a: &[u8],
        r0: usize,
        w: &PackedWeights,
        p: usize,
        epi: &Epilogue,
        out: *mut f32,
    ) {
        let kp = w.kp();
        let b = w.data[p * w.kg * NR * 4..].as_ptr();
        let a0 = a[r0 * kp..].as_ptr();
        let mut sums = [[0i32; NR]; R];
        // Half a panel (16 columns) at a time: 8 R pair accumulators in registers.
        for h in 0..2 {
            let mut acc = [[vdupq_n_s32(0); 8]; R];
            for g in 0..w.kg {
                // Safety: panel p holds kg groups of 128 bytes.
                unsafe {
                    let bg = b.add(g * NR * 4 + h * 64);
                    let bv: [int8x16_t; 4] = core::array::from_fn(|c| vld1q_s8(bg.add(16 * c)));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let av = act4(a0, kp, i, g);
                        let al = vget_low_s8(av);
                        for (c, b) in bv.iter().enumerate() {
                            acc[2 * c] = vpadalq_s16(acc[2 * c], vmull_s8(vget_low_s8(*b), al));
                            acc[2 * c + 1] = vpadalq_s16(acc[2 * c + 1], vmull_high_s8(*b, av));
                        }
                    }
                }
            }
            for (s, acc) in sums.iter_mut().zip(&acc) {
                for c in 0..4 {
                    let v = vpaddq_s32(acc[2 * c], acc[2 * c + 1]);
                    // Safety: 4 i32 into s[16h + 4c..].
                    unsafe { vst1q_s32(s[h * 16 + 4 * c..].as_mut_ptr(), v) };
                }
            }
        }
        // Safety: the caller's contract.
        unsafe { store_tile(&sums, true, r0, p, w, epi, out) };
    }
}

/// The same product in portable integer code (any CPU).
///
/// # Safety
/// As [`run_panels`].
unsafe fn portable_panels(
    a: &[u8],
    m: usize,
    w: &PackedWeights,
    epi: &Epilogue,
    out: *mut f32,
    panels: std::ops::Range<usize>,
) {
    let kp = w.kp();
    for p in panels {
        let b = &w.data[p * w.kg * NR * 4..(p + 1) * w.kg * NR * 4];
        let cols = (w.n - p * NR).min(NR);
        for r in 0..m {
            let row = &a[r * kp..(r + 1) * kp];
            let mut acc = [0i32; NR];
            for (g, a4) in row.chunks_exact(4).enumerate() {
                let bg = &b[g * NR * 4..(g + 1) * NR * 4];
                for (c, b4) in bg.chunks_exact(4).enumerate() {
                    acc[c] += i32::from(a4[0]) * i32::from(b4[0])
                        + i32::from(a4[1]) * i32::from(b4[1])
                        + i32::from(a4[2]) * i32::from(b4[2])
                        + i32::from(a4[3]) * i32::from(b4[3]);
                }
            }
            for (c, &v) in acc.iter().enumerate().take(cols) {
                let col = p * NR + c;
                let y = (v - epi.correction[col]) as f32 * epi.scale[col] + epi.bias[col];
                let y = if epi.gelu { gelu(y) } else { y };
                // Safety: `r < m`, `col < n`: inside the caller's `m * n` output.
                #[allow(unsafe_code)]
                unsafe {
                    *out.add(r * w.n + col) = y;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod vnni {
    //! The AVX-512 VNNI kernel: `MR x 32` tiles, `vpdpbusd` (u8 x i8, 4-way dot products into
    //! i32 lanes), the dequantization fused into the store.

    use std::arch::x86_64::*;

    use super::super::simd::avx512::gelu16;
    use super::{Epilogue, NR, PackedWeights};

    /// # Safety
    /// The CPU has AVX-512 F/BW/VNNI; [`super::run_panels`]'s contract.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn run_panels(
        a: &[u8],
        m: usize,
        w: &PackedWeights,
        epi: &Epilogue,
        out: *mut f32,
        panels: std::ops::Range<usize>,
    ) {
        const _: () = assert!(super::MR == 12, "the row blocks below are MR rows");
        for_tiles!(panels, m, tile(a, w, epi, out); 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2);
    }

    /// Rows `r0..r0 + R` times panel `p`.
    ///
    /// # Safety
    /// As [`run_panels`], with `r0 + R <= m`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn tile<const R: usize>(
        a: &[u8],
        r0: usize,
        w: &PackedWeights,
        p: usize,
        epi: &Epilogue,
        out: *mut f32,
    ) {
        let kp = w.kp();
        let mut acc = [[_mm512_setzero_si512(); 2]; R];
        let b = w.data[p * w.kg * NR * 4..].as_ptr();
        let a0 = a[r0 * kp..].as_ptr();
        for g in 0..w.kg {
            // Safety: panel p holds kg groups of 128 bytes; rows r0..r0+R hold kp >= 4 kg bytes.
            unsafe {
                let b0 = _mm512_loadu_si512(b.add(g * NR * 4).cast());
                let b1 = _mm512_loadu_si512(b.add(g * NR * 4 + 64).cast());
                for (i, acc) in acc.iter_mut().enumerate() {
                    let a4 = a0.add(i * kp + g * 4).cast::<i32>().read_unaligned();
                    let av = _mm512_set1_epi32(a4);
                    acc[0] = _mm512_dpbusd_epi32(acc[0], av, b0);
                    acc[1] = _mm512_dpbusd_epi32(acc[1], av, b1);
                }
            }
        }
        let col0 = p * NR;
        let cols = (w.n - col0).min(NR);
        for half in 0..2 {
            let c = col0 + half * 16;
            let valid = cols.saturating_sub(half * 16).min(16);
            if valid == 0 {
                continue;
            }
            let mask: __mmask16 = if valid == 16 { 0xffff } else { (1u16 << valid) - 1 };
            // Safety: masked loads and stores touch only columns c..c+valid < n.
            unsafe {
                let corr = _mm512_maskz_loadu_epi32(mask, epi.correction.as_ptr().add(c).cast());
                let scale = _mm512_maskz_loadu_ps(mask, epi.scale.as_ptr().add(c));
                let bias = _mm512_maskz_loadu_ps(mask, epi.bias.as_ptr().add(c));
                for (i, acc) in acc.iter().enumerate() {
                    let v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[half], corr));
                    let mut y = _mm512_fmadd_ps(v, scale, bias);
                    if epi.gelu {
                        y = gelu16(y);
                    }
                    _mm512_mask_storeu_ps(out.add((r0 + i) * w.n + c), mask, y);
                }
            }
        }
    }
}

thread_local! {
    /// Per-thread buffer of quantized activation rows.
    static A_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A raw output pointer shared by the threads that write disjoint rows of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// Safety: every thread writes its own rows only (see `Int8Layer::run_layout`).
#[allow(unsafe_code)]
unsafe impl Send for SharedOut {}
#[allow(unsafe_code)]
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer. A closure calling this captures the whole (`Sync`) wrapper, where one
    /// reading the field would capture the raw pointer alone.
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

impl std::fmt::Debug for PackedWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedWeights {{ k: {}, n: {}, {} panels of {NR} }}",
            self.k, self.n, self.panels
        )
    }
}

/// One quantized linear layer: activation quantization, packed weights, scales, bias.
pub struct Int8Layer {
    act: ActQuant,
    weights: PackedWeights,
    correction: Vec<i32>,
    scale: Vec<f32>,
    bias: Vec<f32>,
    gelu: bool,
    /// The weights' scales; with `dynamic`, `scale` is derived from them at every call.
    w_scale: Vec<f32>,
    /// Quantize the activations with ranges measured at every call (onnxruntime's
    /// `DynamicQuantizeLinear`) instead of the calibrated `act`.
    dynamic: bool,
}

impl std::fmt::Debug for Int8Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let act = if self.dynamic { "dynamic u8".to_string() } else { format!("{:?}", self.act) };
        write!(f, "Int8Layer {{ {act}, {:?}, gelu {} }}", self.weights, self.gelu)
    }
}

impl Int8Layer {
    /// A layer for `y = dq(q(x, act)) · (w_q * w_scale[n]) (+ bias)`, `w_q` row-major `[k, n]`.
    pub fn new(
        act: ActQuant,
        w_q: &[i8],
        k: usize,
        n: usize,
        w_scale: &[f32],
        bias: Option<&[f32]>,
    ) -> Self {
        let weights = PackedWeights::pack(w_q, k, n);
        let correction = weights.colsum[..n].iter().map(|s| s * act.offset()).collect();
        let scale = w_scale.iter().map(|s| s * act.scale).collect();
        let bias = bias.map_or_else(|| vec![0.0; n], <[f32]>::to_vec);
        let w_scale = w_scale.to_vec();
        Self { act, weights, correction, scale, bias, gelu: false, w_scale, dynamic: false }
    }

    /// A layer whose activations are quantized per call from their own range, as ONNX
    /// `DynamicQuantizeLinear` does (uint8, see [`dynamic_act`]): onnxruntime's dynamic int8
    /// files. The weights are as in [`Self::new`].
    pub fn dynamic(w_q: &[i8], k: usize, n: usize, w_scale: &[f32], bias: Option<&[f32]>) -> Self {
        let act = ActQuant { scale: 1.0, zero_point: 0, signed: false };
        Self { dynamic: true, ..Self::new(act, w_q, k, n, w_scale, bias) }
    }

    /// Whether the activation ranges are measured per call.
    pub fn is_dynamic(&self) -> bool {
        self.dynamic
    }

    /// The same layer followed by GELU (erf form), applied as its outputs are stored.
    pub fn with_gelu(mut self) -> Self {
        self.gelu = true;
        self
    }

    /// `x` row-major `[m, k]` into `out` `[m, n]`, with `threads` threads from the current
    /// tract executor's pool (1: the calling thread).
    pub fn run(&self, x: &[f32], m: usize, out: &mut [f32]) {
        self.run_layout(x, &RowLayout::contiguous(m, self.weights.k), out);
    }

    /// [`Self::run`] with `A`'s rows read through `layout`.
    pub fn run_layout(&self, x: &[f32], layout: &RowLayout, out: &mut [f32]) {
        let w = &self.weights;
        let m = layout.m;
        assert!(
            layout.span() <= x.len()
                && layout.ks.iter().map(|a| a.0).product::<usize>() == w.k
                && out.len() == m * w.n,
            "Int8Layer::run: {layout:?} over {} values x [{}, {}] into {} floats",
            x.len(),
            w.k,
            w.n,
            out.len()
        );
        // Dynamic layers: this call's activation range, and the correction and scales of it
        // (N values each).
        let dynamic = self.dynamic.then(|| {
            let act = dynamic_act(x, layout);
            let correction: Vec<i32> = w.colsum[..w.n].iter().map(|s| s * act.offset()).collect();
            let scale: Vec<f32> = self.w_scale.iter().map(|s| s * act.scale).collect();
            (act, correction, scale)
        });
        let (act, correction, scale) = match &dynamic {
            Some((act, c, s)) => (*act, c.as_slice(), s.as_slice()),
            None => (self.act, self.correction.as_slice(), self.scale.as_slice()),
        };
        let epi = Epilogue { correction, scale, bias: &self.bias, gelu: self.gelu };
        let dst = SharedOut(out.as_mut_ptr());
        // Rows `r0..r1`: quantize them, multiply them with every weight panel.
        let rows_job = |range: std::ops::Range<usize>| {
            let (r0, rows) = (range.start, range.len());
            // The codes go to this thread's scratch buffer, reused from call to call (a fresh
            // zeroed vector per call showed as `memset`, 10-15 % of fc1's `perf` samples).
            A_SCRATCH.with_borrow_mut(|a| {
                // Grown when too short, never cleared: `quantize_gather` writes the K codes of
                // every row, and whatever the padding up to `kp` holds meets zero weights.
                if a.len() < rows * w.kp() {
                    a.resize(rows * w.kp(), 0);
                }
                let a = &mut a[..rows * w.kp()];
                let offset = (r0 as isize * layout.row_stride) as usize;
                let sub =
                    RowLayout { m: rows, row_stride: layout.row_stride, ks: layout.ks.clone() };
                quantize_gather(&x[offset..], &sub, w.kp(), act, a);
                // Safety: rows `range` of the m x n output are this job's alone.
                unsafe { run_panels(a, rows, w, &epi, dst.ptr().add(r0 * w.n), 0..w.panels) };
            });
        };
        // Inside a rayon pool (OnnxModel runs every frame inside its executor's pool when
        // threads > 1), split the rows over its threads (each quantizes its own rows); small
        // products stay on one thread, where waking the other costs more than it saves.
        let threads = super::pool_threads().min(m.div_ceil(MR));
        let threads = if m * w.k * w.n < PARALLEL_MIN_MACS { 1 } else { threads };
        super::split_rows(m, MR, threads, rows_job);
    }
}

/// The tract op: an [`Int8Layer`] applied to the last axis of an f32 input `[.., K]`.
#[derive(Debug, Clone)]
pub struct Int8MatMul {
    layer: Arc<Int8Layer>,
    /// Where A's rows are in the input.
    rows: RowLayout,
    /// Output shape: the input's with the last axis `N`.
    out_shape: TVec<usize>,
}

impl PartialEq for Int8MatMul {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.layer, &other.layer)
            && self.rows == other.rows
            && self.out_shape == other.out_shape
    }
}

impl Eq for Int8MatMul {}

impl Int8MatMul {
    /// Whether the GELU is fused after the product.
    pub(crate) fn has_gelu(&self) -> bool {
        self.layer.gelu
    }

    /// The op for `layer` reading A's rows through `rows` in inputs of shape `in_shape`,
    /// giving the row-major `out_shape` (`rows.m` rows of `N`).
    pub fn new(
        layer: Arc<Int8Layer>,
        rows: RowLayout,
        in_shape: &[usize],
        out_shape: &[usize],
    ) -> TractResult<Self> {
        let (k, n) = (layer.weights.k, layer.weights.n);
        ensure!(
            (1..=2).contains(&rows.ks.len())
                && rows.ks.iter().map(|a| a.0).product::<usize>() == k
                && rows.row_stride >= 0
                && rows.ks.iter().all(|a| a.1 >= 0)
                && rows.span() <= in_shape.iter().product::<usize>()
                && out_shape.last() == Some(&n)
                && out_shape.iter().product::<usize>() == rows.m * n,
            "Int8MatMul: {rows:?} in {in_shape:?} -> output {out_shape:?} for K = {k}, N = {n}"
        );
        Ok(Self { layer, rows, out_shape: out_shape.into() })
    }
}

impl Op for Int8MatMul {
    fn name(&self) -> StaticName {
        "Int8MatMul".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let (w, a) = (&self.layer.weights, &self.layer.act);
        let act = if self.layer.dynamic {
            "dynamic (u8, range per call)".to_string()
        } else {
            format!(
                "scale {} zero point {} ({})",
                a.scale,
                a.zero_point,
                if a.signed { "i8" } else { "u8" }
            )
        };
        Ok(vec![format!(
            "k:{} n:{} rows:{:?} act {act} gelu:{} out:{:?}",
            w.k, w.n, self.rows, self.layer.gelu, self.out_shape
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Int8MatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].to_plain_array_view::<f32>()?;
        let x = x.as_slice().context("Int8MatMul: input is not contiguous")?;
        let mut y = Tensor::zero::<f32>(&self.out_shape)?;
        {
            let mut view = y.to_plain_array_view_mut::<f32>()?;
            let out = view.as_slice_mut().context("Int8MatMul: fresh output is not contiguous")?;
            self.layer.run_layout(x, &self.rows, out);
        }
        Ok(tvec!(y.into_tvalue()))
    }
}

impl TypedOp for Int8MatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "Int8MatMul takes one input");
        ensure!(inputs[0].datum_type == f32::datum_type(), "Int8MatMul is f32 in, f32 out");
        Ok(tvec!(f32::fact(&*self.out_shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    // The reference takes every operand of the op it checks, one argument each.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        m: usize,
        k: usize,
        n: usize,
        act: ActQuant,
        w: &[i8],
        ws: &[f32],
        bias: &[f32],
    ) -> Vec<f32> {
        let q: Vec<i32> = x
            .iter()
            .map(|&v| {
                let (lo, hi) = if act.signed { (-128, 127) } else { (0, 255) };
                ((v / act.scale).round_ties_even() as i32 + act.zero_point).clamp(lo, hi)
                    - act.zero_point
            })
            .collect();
        let mut y = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                let s: i32 = (0..k).map(|kk| q[r * k + kk] * i32::from(w[kk * n + c])).sum();
                y[r * n + c] = s as f32 * (act.scale * ws[c]) + bias[c];
            }
        }
        y
    }

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    /// Odd sizes (K not a multiple of 4, N not of 32, M not of 12), both activation types:
    /// the kernel in use (VNNI here when the CPU has it) and the portable one equal the
    /// integer reference. The layers run one after another on this thread's scratch buffer,
    /// so the padding codes of the K = 3 layer are what the K = 64 layer left there.
    #[test]
    fn kernels_match_integer_reference() {
        let mut seed = 5u64;
        for &(m, k, n, signed, zp) in &[
            (13usize, 10usize, 37usize, true, 0i32),
            (25, 64, 64, false, 131),
            (1, 3, 1, true, -7),
            (30, 96, 70, false, 0),
            (9, 384, 64, true, 5),
        ] {
            let x: Vec<f32> =
                (0..m * k).map(|_| (lcg(&mut seed) % 2001) as f32 / 100.0 - 10.0).collect();
            let w: Vec<i8> = (0..k * n).map(|_| (lcg(&mut seed) % 256) as u8 as i8).collect();
            let ws: Vec<f32> = (0..n).map(|i| 0.01 + i as f32 * 1e-3).collect();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
            let act = ActQuant { scale: 0.08, zero_point: zp, signed };
            let expected = reference(&x, m, k, n, act, &w, &ws, &bias);
            let gelu_too = m % 2 == 1;
            let expected: Vec<f32> =
                if gelu_too { expected.iter().map(|&v| gelu(v)).collect() } else { expected };
            let layer = Int8Layer::new(act, &w, k, n, &ws, Some(&bias));
            let layer = if gelu_too { layer.with_gelu() } else { layer };
            let mut got = vec![f32::NAN; m * n];
            layer.run(&x, m, &mut got);
            let mut portable = vec![f32::NAN; m * n];
            let mut a = vec![0u8; m * layer.weights.kp()];
            quantize_rows(&x, k, layer.weights.kp(), act, &mut a);
            let epi = Epilogue {
                correction: &layer.correction,
                scale: &layer.scale,
                bias: &layer.bias,
                gelu: layer.gelu,
            };
            // Safety: `portable` holds m * n floats.
            #[allow(unsafe_code)]
            unsafe {
                portable_panels(
                    &a,
                    m,
                    &layer.weights,
                    &epi,
                    portable.as_mut_ptr(),
                    0..layer.weights.panels,
                )
            };
            for (i, ((g, p), e)) in got.iter().zip(&portable).zip(&expected).enumerate() {
                let tol = 1e-4 * e.abs().max(1.0);
                assert!(
                    (g - e).abs() <= tol,
                    "[{m},{k},{n}] element {i}: kernel {g} vs reference {e}"
                );
                assert!(
                    (p - e).abs() <= tol,
                    "[{m},{k},{n}] element {i}: portable {p} vs reference {e}"
                );
            }
            // Every kernel this CPU runs gives the portable result (the integer sums are exact;
            // the dequantization is the same code except the fused one).
            for kernel in Kernel::available() {
                let mut y = vec![f32::NAN; m * n];
                // Safety: `y` holds m * n floats; the kernel is available.
                #[allow(unsafe_code)]
                unsafe {
                    run_panels_with(
                        kernel,
                        &a,
                        m,
                        &layer.weights,
                        &epi,
                        y.as_mut_ptr(),
                        0..layer.weights.panels,
                    )
                };
                // The AVX-512 kernel dequantizes with a fused multiply-add and a vector GELU
                // (its accuracy against the reference is checked above): within 1e-5 relative.
                let fused = kernel.name() == "avx512vnni";
                let same = y.iter().zip(&portable).all(|(x, p)| {
                    if fused {
                        (x - p).abs() <= 1e-5 * p.abs().max(1.0)
                    } else {
                        x.to_bits() == p.to_bits()
                    }
                });
                assert!(
                    same,
                    "[{m},{k},{n}] kernel {} differs from the portable one",
                    kernel.name()
                );
            }
        }
        let available = Kernel::available();
        assert!(available.contains(&Kernel::selected()));
        assert_eq!(available.last(), Some(&Kernel::Portable));
        println!(
            "int8 kernels on this CPU: {:?}",
            available.iter().map(|k| k.name()).collect::<Vec<_>>()
        );
    }

    /// Saturation, ties to even and NaN in the activation quantization.
    /// Inside a 2-thread pool a large product splits its rows over both threads (each
    /// quantizing its own rows, one of them through the two-k-axes gather layout): the same
    /// result, bit for bit, as on one thread.
    #[test]
    fn threads_split_rows_without_changing_results() {
        let (m, heads, hd, n) = (101usize, 6usize, 67usize, 420usize);
        let k = heads * hd;
        assert!(m * k * n >= PARALLEL_MIN_MACS);
        let mut seed = 9u64;
        // x as [heads, m, hd]: row r is the concatenation over heads of x[h, r, :].
        let x: Vec<f32> =
            (0..heads * m * hd).map(|_| (lcg(&mut seed) % 2001) as f32 / 200.0 - 5.0).collect();
        let w: Vec<i8> = (0..k * n).map(|_| (lcg(&mut seed) % 256) as u8 as i8).collect();
        let act = ActQuant { scale: 0.05, zero_point: 3, signed: true };
        let layer = Int8Layer::new(act, &w, k, n, &vec![0.001; n], None).with_gelu();
        let layout =
            RowLayout { m, row_stride: hd as isize, ks: vec![(heads, (m * hd) as isize), (hd, 1)] };
        let mut one = vec![0f32; m * n];
        layer.run_layout(&x, &layout, &mut one);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let mut two = vec![0f32; m * n];
        pool.install(|| layer.run_layout(&x, &layout, &mut two));
        assert!(one.iter().zip(&two).all(|(a, b)| a.to_bits() == b.to_bits()));
        // And the gather equals quantizing the rearranged rows contiguously.
        let rows: Vec<f32> = (0..m)
            .flat_map(|r| (0..heads).flat_map(move |h| (0..hd).map(move |d| (h, r, d))))
            .map(|(h, r, d)| x[(h * m + r) * hd + d])
            .collect();
        let mut flat = vec![0f32; m * n];
        layer.run(&rows, m, &mut flat);
        assert!(one.iter().zip(&flat).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn quantize_rows_follows_onnx() {
        let act = ActQuant { scale: 0.5, zero_point: 0, signed: true };
        let x = [0.25f32, 0.75, -0.25, 1000.0, -1000.0, f32::NAN, 1.25, -63.75];
        let mut out = [0u8; 8];
        quantize_rows(&x, 8, 8, act, &mut out);
        // q + 128: round_half_even(0.5) = 0, (1.5) = 2, (-0.5) = 0, saturate, NaN -> -128, (2.5) = 2, (-127.5) = -128.
        assert_eq!(out, [128, 130, 128, 255, 0, 0, 130, 0]);
        let act = ActQuant { scale: 1.0, zero_point: 3, signed: false };
        let mut out = [9u8; 6];
        quantize_rows(&[0.5, 1.5, -10.0, 300.0], 4, 6, act, &mut out);
        assert_eq!(out, [3, 5, 0, 255, 0, 0]);
    }

    #[test]
    fn dynamic_range_matches_a_scalar_scan() {
        let mut seed = 7u64;
        // 3 rows of 2 x 37 values (a head split: two k axes, a ragged 37) inside a wider
        // tensor, with a NaN, the extremes in a lane remainder, and all-positive data.
        let (m, heads, hd, stride) = (3usize, 2usize, 37usize, 90isize);
        let mut x: Vec<f32> = (0..m * stride as usize)
            .map(|_| (lcg(&mut seed) % 2000) as f32 / 100.0 - 8.0)
            .collect();
        x[5] = f32::NAN;
        x[(2 * stride + 36) as usize] = -31.5; // last value of the last row's first head
        x[(stride + 40 + 36) as usize] = 44.25; // last value of row 1's second head
        let layouts = [
            RowLayout { m, row_stride: stride, ks: vec![(heads, 40), (hd, 1)] },
            RowLayout { m, row_stride: stride, ks: vec![(hd, 1)] },
            // Whole rows: one 64-value block, one 16-value chunk and 10 left.
            RowLayout::contiguous(m, stride as usize),
            RowLayout { m: 2, row_stride: 1, ks: vec![(hd, 2)] },
        ];
        for layout in &layouts {
            let (mut lo, mut hi) = (0f32, 0f32);
            for r in 0..layout.m {
                let outer = if layout.ks.len() == 2 { layout.ks[0] } else { (1, 0) };
                let (k, sk) = *layout.ks.last().unwrap();
                for a in 0..outer.0 {
                    for i in 0..k {
                        let at =
                            r as isize * layout.row_stride + a as isize * outer.1 + i as isize * sk;
                        (lo, hi) = (lo.min(x[at as usize]), hi.max(x[at as usize]));
                    }
                }
            }
            assert_eq!(row_range(&x, layout), (lo, hi), "{layout:?}");
            assert_eq!(row_range_body(&x, layout), (lo, hi), "{layout:?}");
            #[cfg(target_arch = "x86_64")]
            if super::super::isa::avx2() {
                // Safety: the feature was detected.
                assert_eq!(unsafe { row_range_avx2(&x, layout) }, (lo, hi), "{layout:?}");
            }
        }
        assert_eq!(row_range(&x, &layouts[0]), (-31.5, 44.25));
        let positive = vec![3.0f32; 40];
        assert_eq!(row_range(&positive, &RowLayout::contiguous(2, 20)), (0.0, 3.0));
    }
}
