//! f32 matrix products run by the [`gemm`] crate instead of tract's own matmul kernels.
//!
//! tract lowers every ONNX `MatMul` to an `EinSum` and then to its `OptMatMul` (an
//! activation-packing op plus a kernel from tract-linalg). On the ViT shapes (196 tokens,
//! widths 384 to 1536, per-head attention products of depth 64) the `gemm` crate's
//! AVX-512/FMA kernels, which pack both operands in cache-sized blocks themselves, ran
//! faster on the development machine (see `docs/PERFORMANCE.md`, "Inference").
//! [`substitute_gemm_matmuls`] replaces each f32 two-operand `EinSum` that is a (batched)
//! matrix product with a [`GemmMatMul`], folding a following bias `Add` of a constant
//! vector into it, before tract optimizes the rest of the model.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::logic::Iff;
use tract_onnx::tract_core::ops::math::{Add, IsNan, Mul};
use tract_onnx::tract_core::ops::nn::{GeluExact, Softmax, SoftmaxKind};

use super::f32_packed::{self, PackedF32};

/// Below this many multiply-adds a product runs on one thread (gemm's own default
/// threshold, `48 * 48 * 256`, applies on top).
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// Where `C = A B` finds its operands: sizes and element strides of the `m`, `k`, `n`
/// axes and of the batch axes, for contiguous row-major tensors.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Geometry {
    pub(crate) m: usize,
    pub(crate) k: usize,
    pub(crate) n: usize,
    /// Strides of `m` and `k` in A.
    pub(crate) a_rs: isize,
    pub(crate) a_cs: isize,
    /// Strides of `k` and `n` in B.
    pub(crate) b_rs: isize,
    pub(crate) b_cs: isize,
    /// Strides of `m` and `n` in C.
    pub(crate) c_rs: isize,
    pub(crate) c_cs: isize,
    /// Batch axes (in A, B and C): size and strides in A, B, C.
    pub(crate) batch: Vec<(usize, isize, isize, isize)>,
    /// Further reduction axes (in A and B, not in C): size and strides in A, B. The product
    /// loops over them, accumulating into C (the attention output projection reads the
    /// per-head context `[h, n, d]` against weights `[h, d, D]`: two reduction axes that no
    /// single stride describes).
    pub(crate) kloop: Vec<(usize, isize, isize)>,
    /// C's shape.
    pub(crate) out_shape: TVec<usize>,
    /// C's `n` axis, if `n > 1`.
    pub(crate) c_n_axis: Option<usize>,
}

fn strides(shape: &[usize]) -> TVec<isize> {
    let mut s: TVec<isize> = tvec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1] as isize;
    }
    s
}

impl Geometry {
    /// The geometry of `axes` (an einsum with inputs of shapes `a`, `b` and output `c`), or
    /// `None` when it is not a plain batched matrix product (diagonals, reductions over one
    /// operand, broadcast batch axes, several non-unit `m` or `n` axes). Of several reduction
    /// axes, the longest (then the one with the smallest stride in A) is gemm's `k`; the
    /// others are looped over.
    pub fn from_einsum(axes: &AxesMapping, a: &[usize], b: &[usize], c: &[usize]) -> Option<Self> {
        if axes.input_count() != 2 || axes.output_count() != 1 {
            return None;
        }
        let (sa, sb, sc) = (strides(a), strides(b), strides(c));
        let mut g = Geometry {
            m: 1,
            k: 1,
            n: 1,
            a_rs: 1,
            a_cs: 1,
            b_rs: 1,
            b_cs: 1,
            c_rs: 1,
            c_cs: 1,
            batch: Vec::new(),
            kloop: Vec::new(),
            out_shape: c.into(),
            c_n_axis: None,
        };
        let (mut has_m, mut has_n) = (false, false);
        let mut ks: Vec<(usize, isize, isize)> = Vec::new();
        for axis in axes.iter_all_axes() {
            let (ia, ib, ic) = (&axis.inputs[0], &axis.inputs[1], &axis.outputs[0]);
            if ia.len() > 1 || ib.len() > 1 || ic.len() > 1 {
                return None;
            }
            let (pa, pb, pc) = (ia.first().copied(), ib.first().copied(), ic.first().copied());
            let dims = [pa.map(|p| a[p]), pb.map(|p| b[p]), pc.map(|p| c[p])];
            let size = dims.iter().flatten().copied().max()?;
            if dims.iter().flatten().any(|&d| d != size) {
                return None;
            }
            if size == 1 {
                continue;
            }
            match (pa, pb, pc) {
                (Some(pa), Some(pb), Some(pc)) => g.batch.push((size, sa[pa], sb[pb], sc[pc])),
                (Some(pa), None, Some(pc)) if !has_m => {
                    has_m = true;
                    (g.m, g.a_rs, g.c_rs) = (size, sa[pa], sc[pc]);
                }
                (None, Some(pb), Some(pc)) if !has_n => {
                    has_n = true;
                    (g.n, g.b_cs, g.c_cs, g.c_n_axis) = (size, sb[pb], sc[pc], Some(pc));
                }
                (Some(pa), Some(pb), None) => ks.push((size, sa[pa], sb[pb])),
                _ => return None,
            }
        }
        // gemm's k: the longest reduction axis, then the one with the smallest stride in A.
        if let Some(best) =
            (0..ks.len()).min_by_key(|&i| (std::cmp::Reverse(ks[i].0), ks[i].1.abs()))
        {
            let (size, sa, sb) = ks.remove(best);
            (g.k, g.a_cs, g.b_rs) = (size, sa, sb);
            g.kloop = ks;
        }
        let batch: usize = g.batch.iter().map(|b| b.0).product();
        (batch * g.m * g.n == c.iter().product::<usize>()).then_some(g)
    }

    /// When this is `C[m, n] = A[m, K] W[K, n]` with `W` a row-major `[K, n]` matrix and `C`
    /// row-major, the rows of A as strides: `(m, row stride, k axes outer to inner as
    /// (size, stride))`, the k axes enumerating W's rows in order. The attention output
    /// projection reads A as `[heads, m, head_dim]` (two k axes); plain linears have one.
    // (rows, row stride, k axes): named where it is documented, used once.
    #[allow(clippy::type_complexity)]
    pub(crate) fn linear_rows(
        &self,
        k: usize,
        n: usize,
    ) -> Option<(usize, isize, Vec<(usize, isize)>)> {
        let row_major_c = self.c_cs == 1 && (self.m == 1 || self.c_rs == n as isize);
        if !self.batch.is_empty()
            || self.n != n
            || self.b_cs != 1
            || !row_major_c
            || self.kloop.len() > 1
        {
            return None;
        }
        let inner_ok = self.k == 1 || self.b_rs == n as isize;
        let mut ks = Vec::new();
        let mut total = self.k;
        if let Some(&(size, sa, sb)) = self.kloop.first() {
            if sb != (self.k * n) as isize {
                return None;
            }
            ks.push((size, sa));
            total *= size;
        }
        ks.push((self.k, self.a_cs));
        (inner_ok && total == k).then_some((self.m, self.a_rs, ks))
    }

    /// `B` (f32, the shape this geometry was made for) with its `n` axis scaled by `g` (`n`
    /// values): column `j` of every product multiplied by `g[j]`. `None` when `B` is not a
    /// plain f32 tensor or has no `n` axis.
    pub(crate) fn scale_columns(&self, b: &Tensor, g: &[f32]) -> Option<Tensor> {
        if b.datum_type() != f32::datum_type() || g.len() != self.n || self.n < 2 {
            return None;
        }
        let stride = usize::try_from(self.b_cs).ok().filter(|&s| s > 0)?;
        let mut out = b.clone();
        // Row-major B: the n coordinate of flat index i is (i / stride) % n.
        let mut view = out.to_plain_array_view_mut::<f32>().ok()?;
        for (i, v) in view.as_slice_mut()?.iter_mut().enumerate() {
            *v *= g[(i / stride) % self.n];
        }
        Some(out)
    }

    /// The bias vector (length `n`) of a constant added to C, when it only varies along
    /// C's `n` axis (or is a scalar).
    fn bias_vector(&self, bias: &Tensor) -> Option<Vec<f32>> {
        if bias.datum_type() != f32::datum_type() || bias.rank() > self.out_shape.len() {
            return None;
        }
        let offset = self.out_shape.len() - bias.rank();
        for (i, &d) in bias.shape().iter().enumerate() {
            if d != 1 && (Some(offset + i) != self.c_n_axis || d != self.n) {
                return None;
            }
        }
        let view = bias.to_plain_array_view::<f32>().ok()?;
        let values: Vec<f32> = view.iter().copied().collect();
        match values.len() {
            1 => Some(vec![values[0]; self.n]),
            l if l == self.n => Some(values),
            _ => None,
        }
    }
}

/// C's data pointer, shared by the threads that write disjoint batch blocks of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// Safety: the batch-parallel path hands each thread its own batch blocks of C.
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

/// A constant bias vector, compared bit for bit (so that the op can be `Eq`).
#[derive(Debug, Clone)]
struct Bias(Vec<f32>);

impl PartialEq for Bias {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self.0.iter().zip(&other.0).all(|(a, b)| a.to_bits() == b.to_bits())
    }
}

impl Eq for Bias {}

/// Element-wise work that runs on C right after the product, while it is in cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Post {
    /// Nothing.
    None,
    /// GELU (erf form; the MLP's fc1).
    Gelu,
    /// Softmax over C's last axis (the attention scores).
    Softmax,
    /// Softmax with the guard `Where(IsNaN(p), 0, p)` that the dynamo exporter writes after
    /// `scaled_dot_product_attention`'s softmax taken in: a row whose softmax is NaN (a NaN
    /// or +inf score, or only -inf ones) becomes zeros, so the attention stays one op.
    SoftmaxNanToZero,
}

/// `C = scale · A B (+ bias)` for f32 `A`, `B` (any contiguous layout the [`Geometry`]
/// describes), computed by [`gemm::gemm`] (the scale is its `beta`: foreign exporters write
/// the attention scale as a product with the scores, or with `q` and `k`). Multithreaded on the rayon pool the frame runs in
/// (`ops::pool_threads`), on the calling thread otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GemmMatMul {
    geometry: Geometry,
    /// `beta` of the product, as bits (so that the op can be `Eq`); 1.0 unless a scale was
    /// folded in.
    scale_bits: u32,
    bias: Option<Bias>,
    post: Post,
    /// The constant weights, packed at load ([`super::f32_packed`]): the op then takes A
    /// alone.
    packed: Option<Packed>,
}

/// Packed weights, compared by identity (so that the op can be `Eq`).
#[derive(Debug, Clone)]
struct Packed(Arc<PackedF32>);

impl PartialEq for Packed {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Packed {}

impl GemmMatMul {
    /// A product with the given geometry, scale 1 and no bias.
    pub fn new(geometry: Geometry) -> Self {
        Self { geometry, scale_bits: 1f32.to_bits(), bias: None, post: Post::None, packed: None }
    }

    /// Whether the weights were packed at load.
    pub(crate) fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// The factor applied to `A B` (1 unless a scale was folded in).
    pub fn scale(&self) -> f32 {
        f32::from_bits(self.scale_bits)
    }

    fn parallelism(&self) -> gemm::Parallelism {
        let g = &self.geometry;
        if g.m * g.n * g.k < PARALLEL_MIN_MACS {
            return gemm::Parallelism::None;
        }
        match super::pool_threads() {
            1 => gemm::Parallelism::None,
            n => gemm::Parallelism::Rayon(n),
        }
    }
}

impl GemmMatMul {
    /// The product's geometry.
    pub(crate) fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// The element-wise work fused after the product.
    pub(crate) fn post(&self) -> Post {
        self.post
    }

    /// Whether a bias vector is folded in.
    pub(crate) fn has_bias(&self) -> bool {
        self.bias.is_some()
    }
}

impl Op for GemmMatMul {
    fn name(&self) -> StaticName {
        "GemmMatMul".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let g = &self.geometry;
        Ok(vec![format!(
            "m:{} k:{} n:{} batch:{:?} k-loop:{:?} scale:{} bias:{} post:{:?} out:{:?}",
            g.m,
            g.k,
            g.n,
            g.batch.iter().map(|b| b.0).collect::<Vec<_>>(),
            g.kloop.iter().map(|k| k.0).collect::<Vec<_>>(),
            self.scale(),
            self.bias.is_some(),
            self.post,
            g.out_shape
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for GemmMatMul {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let g = &self.geometry;
        let a = inputs[0].to_plain_array_view::<f32>()?;
        let a = a.as_slice().context("GemmMatMul: A is not contiguous")?;
        // Every value of C is written: by the bias fill, or by the first reduction step of
        // its block (gemm does not read C then), so with a non-empty reduction C need not be
        // zeroed first (~15 us per fc1-sized output).
        let mut c = if g.k > 0 || self.bias.is_some() {
            // Safety: see above; f32 has no invalid bit patterns.
            #[allow(unsafe_code)]
            unsafe {
                Tensor::uninitialized::<f32>(&g.out_shape)?
            }
        } else {
            Tensor::zero::<f32>(&g.out_shape)?
        };
        {
            let mut view = c.to_plain_array_view_mut::<f32>()?;
            let out = view.as_slice_mut().context("GemmMatMul: fresh output is not contiguous")?;
            let read_dst = match &self.bias {
                Some(Bias(bias)) => {
                    // C starts as the bias broadcast along N: element `i` gets
                    // `bias[(i / c_cs) % n]`, written run by run (a division per element
                    // cost fc1 of ViT-Ti/16 1 ms per call, more than the product itself).
                    let stride = (g.c_cs as usize).max(1);
                    if stride == 1 {
                        for row in out.chunks_mut(g.n) {
                            row.copy_from_slice(&bias[..row.len()]);
                        }
                    } else {
                        for (run, value) in out.chunks_mut(stride).zip(bias.iter().cycle()) {
                            run.fill(*value);
                        }
                    }
                    true
                }
                None => false,
            };
            if let Some(Packed(w)) = &self.packed {
                run_packed(w, g, a, out, read_dst, self.scale());
            } else {
                let b = inputs[1].to_plain_array_view::<f32>()?;
                let b = b.as_slice().context("GemmMatMul: B is not contiguous")?;
                // Batch axes first, then the looped reduction axes (accumulating into C).
                let axes: Vec<(usize, isize, isize, isize)> = g
                    .batch
                    .iter()
                    .copied()
                    .chain(g.kloop.iter().map(|&(size, sa, sb)| (size, sa, sb, 0)))
                    .collect();
                let steps: usize = axes.iter().map(|a| a.0).product();
                let loop_len: usize = g.kloop.iter().map(|k| k.0).product();
                let dst = SharedOut(out.as_mut_ptr());
                let beta = self.scale();
                // Units `range`, one gemm call each: unit `u` is rows chunk `u % chunks` (of
                // `chunks` row chunks of `m`) of step `u / chunks` (a flat index over `axes`).
                let run_steps = |range: std::ops::Range<usize>,
                                 chunks: usize,
                                 parallelism: gemm::Parallelism| {
                    let rows_per = g.m.div_ceil(chunks);
                    for unit in range {
                        let (step, r0) = (unit / chunks, unit % chunks * rows_per);
                        if r0 >= g.m {
                            continue;
                        }
                        let rows = rows_per.min(g.m - r0);
                        let (mut oa, mut ob, mut oc) =
                            (r0 as isize * g.a_rs, 0isize, r0 as isize * g.c_rs);
                        let mut rest = step;
                        for &(size, sa, sb, sc) in axes.iter().rev() {
                            let ix = (rest % size) as isize;
                            rest /= size;
                            oa += ix * sa;
                            ob += ix * sb;
                            oc += ix * sc;
                        }
                        // The first reduction step of each output block writes C (or adds to
                        // the bias), the later ones accumulate.
                        let accumulate = read_dst || step % loop_len != 0;
                        let c_ptr = dst;
                        // Safety: the geometry was derived from these very shapes (checked by
                        // output_facts and the plan), so every offset stays inside the slices;
                        // concurrent calls (below) write disjoint blocks of C.
                        #[allow(unsafe_code)]
                        unsafe {
                            gemm::gemm(
                                rows,
                                g.n,
                                g.k,
                                c_ptr.0.offset(oc),
                                g.c_cs,
                                g.c_rs,
                                accumulate,
                                a.as_ptr().offset(oa),
                                g.a_cs,
                                g.a_rs,
                                b.as_ptr().offset(ob),
                                g.b_cs,
                                g.b_rs,
                                1.0,
                                beta,
                                false,
                                false,
                                false,
                                parallelism,
                            );
                        }
                    }
                };
                // Per-head products (a batch of independent blocks of C, no looped reduction):
                // inside a rayon pool, give each thread whole blocks rather than splitting every
                // small product across threads. When the heads do not divide evenly among the
                // threads (ViT-Ti's 3 heads on 2 threads: one thread did 2 of 3, 1.3x instead of
                // 2x), each head's rows are cut in `threads` chunks, which do.
                let threads = super::pool_threads();
                if threads > 1
                    && g.kloop.is_empty()
                    && steps >= threads
                    && g.m * g.n * g.k * steps >= PARALLEL_MIN_MACS
                {
                    let chunks = if steps.is_multiple_of(threads) { 1 } else { threads.min(g.m) };
                    let units = steps * chunks;
                    let per = units.div_ceil(threads);
                    rayon::scope(|s| {
                        for t in 1..threads {
                            let range = (t * per).min(units)..((t + 1) * per).min(units);
                            let run = &run_steps;
                            s.spawn(move |_| run(range, chunks, gemm::Parallelism::None));
                        }
                        run_steps(0..per.min(units), chunks, gemm::Parallelism::None);
                    });
                } else {
                    run_steps(0..steps, 1, self.parallelism());
                }
            }
            match self.post {
                Post::None => {}
                Post::Gelu => super::simd::gelu_inplace(out),
                Post::Softmax => {
                    let row = g.out_shape.last().copied().unwrap_or(1);
                    super::simd::softmax_rows_inplace(out, row);
                }
                Post::SoftmaxNanToZero => {
                    let row = g.out_shape.last().copied().unwrap_or(1).max(1);
                    super::simd::softmax_rows_inplace(out, row);
                    // Our softmax is ONNX's on NaN and infinities: a row is NaN in every
                    // position (a NaN or +inf score, or only -inf ones: a NaN sum) or in none,
                    // so its first value tells. The guard turns NaN into 0.
                    for r in out.chunks_mut(row) {
                        if r[0].is_nan() {
                            r.fill(0.0);
                        }
                    }
                }
            }
        }
        Ok(tvec!(c.into_tvalue()))
    }
}

/// `C = (read_dst ? C : 0) + beta A W` with packed weights, rows split over the current
/// rayon pool (whole tiles of [`f32_packed::MR`] rows per thread) when the product is large.
fn run_packed(w: &PackedF32, g: &Geometry, a: &[f32], out: &mut [f32], read_dst: bool, beta: f32) {
    let (m, a_rs, c_rs) = (g.m, g.a_rs as usize, g.c_rs as usize);
    assert!(
        g.a_cs == 1
            && g.c_cs == 1
            && w.k() == g.k
            && w.n() == g.n
            && (m == 0 || (m - 1) * a_rs + g.k <= a.len())
            && (m == 0 || (m - 1) * c_rs + g.n <= out.len()),
        "GemmMatMul (packed): {g:?} over {} and {} floats",
        a.len(),
        out.len()
    );
    let dst = SharedOut(out.as_mut_ptr());
    let job = |rows: std::ops::Range<usize>| {
        // Safety: packed ops exist only where `f32_packed::available()` (substitution);
        // A's and C's rows were bounds-checked above, and each job has its own rows.
        #[allow(unsafe_code)]
        unsafe {
            let io = f32_packed::RowsIo { a: a.as_ptr(), a_rs, c: dst.ptr(), c_rs };
            w.run_rows(io, rows, read_dst, beta)
        };
    };
    let threads = super::pool_threads().min(m.div_ceil(f32_packed::MR));
    let threads = if m * g.n * g.k < PARALLEL_MIN_MACS { 1 } else { threads };
    super::split_rows(m, f32_packed::MR, threads, job);
}

impl TypedOp for GemmMatMul {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let want = if self.packed.is_some() { 1 } else { 2 };
        ensure!(inputs.len() == want, "GemmMatMul takes {want} inputs");
        for i in inputs {
            ensure!(i.datum_type == f32::datum_type(), "GemmMatMul is f32 only");
        }
        Ok(tvec!(f32::fact(&*self.geometry.out_shape)))
    }

    as_op!();
}

/// The constant bias vector of an `Add` that alone reads product `id`'s output (of shape
/// `c`, not a model output), and that `Add`'s outlet.
pub(crate) fn following_bias(
    model: &TypedModel,
    id: usize,
    geometry: &Geometry,
    c: &[usize],
) -> TractResult<Option<(Vec<f32>, OutletId)>> {
    let node = model.node(id);
    let out = OutletId::new(id, 0);
    let successors = &node.outputs[0].successors;
    if successors.len() != 1 || model.output_outlets()?.contains(&out) {
        return Ok(None);
    }
    let next = model.node(successors[0].node);
    let is_add = next.op_as::<TypedBinOp>().is_some_and(|bin| bin.0.is::<Add>());
    if !is_add || next.inputs.len() != 2 {
        return Ok(None);
    }
    let other = next.inputs[1 - successors[0].slot];
    let next_fact = model.outlet_fact(OutletId::new(next.id, 0))?;
    let bias = model
        .outlet_fact(other)?
        .konst
        .as_ref()
        .filter(|_| next_fact.shape.as_concrete() == Some(c))
        .and_then(|k| geometry.bias_vector(k));
    Ok(bias.map(|b| (b, OutletId::new(next.id, 0))))
}

/// The value of a uniform f32 constant (a scalar, or a tensor of one repeated value).
fn uniform_f32(fact: &TypedFact) -> Option<f32> {
    let k = fact.uniform.as_ref().or(fact.konst.as_ref())?;
    if k.datum_type() != f32::datum_type() {
        return None;
    }
    let view = k.to_plain_array_view::<f32>().ok()?;
    let first = *view.iter().next()?;
    view.iter().all(|v| v.to_bits() == first.to_bits()).then_some(first)
}

/// A `Mul` by a uniform f32 constant that alone reads `outlet` (not a model output) and
/// keeps its shape (`c`): the factor and the `Mul`'s outlet.
pub(crate) fn following_scale(
    model: &TypedModel,
    outlet: OutletId,
    c: &[usize],
) -> TractResult<Option<(f32, OutletId)>> {
    let Some((factor, next_out)) = following_mul(model, outlet, c)? else { return Ok(None) };
    let factor = uniform_f32(model.outlet_fact(factor)?);
    Ok(factor.filter(|f| f.is_finite()).map(|f| (f, next_out)))
}

/// A `Mul` that alone reads `outlet` (not a model output) and keeps its shape (`c`): its
/// other operand and its outlet.
fn following_mul(
    model: &TypedModel,
    outlet: OutletId,
    c: &[usize],
) -> TractResult<Option<(OutletId, OutletId)>> {
    let succ = &model.node(outlet.node).outputs[outlet.slot].successors;
    if succ.len() != 1 || model.output_outlets()?.contains(&outlet) {
        return Ok(None);
    }
    let next = model.node(succ[0].node);
    let is_mul = next.op_as::<TypedBinOp>().is_some_and(|bin| bin.0.is::<Mul>());
    if !is_mul || next.inputs.len() != 2 {
        return Ok(None);
    }
    let next_out = OutletId::new(next.id, 0);
    if model.outlet_fact(next_out)?.shape.as_concrete() != Some(c) {
        return Ok(None);
    }
    Ok(Some((next.inputs[1 - succ[0].slot], next_out)))
}

/// A `Mul` by a constant that varies only along C's `n` axis (a vector of `n` values, not
/// all equal: those are [`following_scale`]'s), that alone reads `outlet` (not a model
/// output) and keeps its shape (`c`): the per-column factors and the `Mul`'s outlet.
pub(crate) fn following_column_scale(
    model: &TypedModel,
    outlet: OutletId,
    geometry: &Geometry,
    c: &[usize],
) -> TractResult<Option<(Vec<f32>, OutletId)>> {
    let Some((factor, next_out)) = following_mul(model, outlet, c)? else { return Ok(None) };
    let factors = model
        .outlet_fact(factor)?
        .konst
        .as_ref()
        .and_then(|k| geometry.bias_vector(k))
        .filter(|g| g.iter().all(|v| v.is_finite()));
    Ok(factors.map(|g| (g, next_out)))
}

/// When `input` is made by a `Mul` of another tensor by a uniform f32 constant, read by
/// nothing else (`scaled_dot_product_attention` exports scale `q` and `kᵀ` by `√scale` each
/// before the product): that tensor and the factor.
pub(crate) fn preceding_scale(
    model: &TypedModel,
    input: OutletId,
) -> TractResult<Option<(OutletId, f32)>> {
    let node = model.node(input.node);
    let is_mul = node.op_as::<TypedBinOp>().is_some_and(|bin| bin.0.is::<Mul>());
    if !is_mul
        || node.inputs.len() != 2
        || node.outputs[0].successors.len() != 1
        || model.output_outlets()?.contains(&input)
    {
        return Ok(None);
    }
    for (slot, other) in [(0, 1), (1, 0)] {
        let (x, k) = (node.inputs[slot], node.inputs[other]);
        let (xf, of) = (model.outlet_fact(x)?, model.outlet_fact(input)?);
        if xf.konst.is_some() || xf.shape != of.shape {
            continue;
        }
        if let Some(f) = uniform_f32(model.outlet_fact(k)?).filter(|f| f.is_finite()) {
            return Ok(Some((x, f)));
        }
    }
    Ok(None)
}

/// A GELU, or a softmax over C's last (contiguous) axis, that alone reads `outlet` (not a
/// model output), and its outlet.
pub(crate) fn following_post(
    model: &TypedModel,
    outlet: OutletId,
    geometry: &Geometry,
) -> TractResult<Option<(Post, OutletId)>> {
    let succ = &model.node(outlet.node).outputs[outlet.slot].successors;
    if succ.len() != 1 || model.output_outlets()?.contains(&outlet) {
        return Ok(None);
    }
    let next = model.node(succ[0].node);
    let next_out = OutletId::new(next.id, 0);
    if next.op_as::<ElementWiseOp>().is_some_and(|ew| ew.0.is::<GeluExact>() && ew.1.is_none()) {
        return Ok(Some((Post::Gelu, next_out)));
    }
    let rank = geometry.out_shape.len();
    let last_is_n = geometry.c_n_axis == Some(rank.saturating_sub(1)) && geometry.c_cs == 1;
    if let Some(sm) = next.op_as::<Softmax>()
        && sm.kind == SoftmaxKind::Softmax
        && sm.quant_output_dt.is_none()
        && sm.axes.as_slice() == [rank - 1]
        && last_is_n
        && model.outlet_fact(next_out)?.datum_type == f32::datum_type()
    {
        return Ok(Some(match nan_guard(model, next_out)? {
            Some(guarded) => (Post::SoftmaxNanToZero, guarded),
            None => (Post::Softmax, next_out),
        }));
    }
    Ok(None)
}

/// `Iff(IsNan(p), 0, p)` reading `p` (a softmax's outlet, read by exactly these two nodes,
/// not a model output): the `Iff`'s outlet.
fn nan_guard(model: &TypedModel, p: OutletId) -> TractResult<Option<OutletId>> {
    let succ = &model.node(p.node).outputs[p.slot].successors;
    if succ.len() != 2 || model.output_outlets()?.contains(&p) {
        return Ok(None);
    }
    let is_nan = |n: &TypedNode| {
        n.op_as::<ElementWiseOp>().is_some_and(|ew| ew.0.is::<IsNan>() && ew.1.is_none())
    };
    let (Some(test), Some(iff)) = (
        succ.iter().map(|s| model.node(s.node)).find(|n| is_nan(n)),
        succ.iter().map(|s| model.node(s.node)).find(|n| n.op_is::<Iff>()),
    ) else {
        return Ok(None);
    };
    let test_out = OutletId::new(test.id, 0);
    let guarded = iff.inputs.len() == 3
        && iff.inputs[0] == test_out
        && iff.inputs[2] == p
        && test.outputs[0].successors.len() == 1
        && !model.output_outlets()?.contains(&test_out)
        && uniform_f32(model.outlet_fact(iff.inputs[1])?).is_some_and(|z| z == 0.0);
    Ok(guarded.then(|| OutletId::new(iff.id, 0)))
}

/// Replaces every f32 `EinSum` of `model` that is a plain (batched) matrix product of two
/// fixed-shape operands with a [`GemmMatMul`], folding a following `Add` of a constant bias
/// vector into it. Run it on a decluttered model (`into_decluttered`), before
/// `into_optimized`. Returns the number of products replaced.
pub fn substitute_gemm_matmuls(model: &mut TypedModel) -> TractResult<(usize, usize)> {
    let (mut replaced, mut columns_scaled) = (0, 0);
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(einsum) = node.op_as::<EinSum>() else {
            continue;
        };
        if einsum.q_params.is_some()
            || einsum.operating_dt != f32::datum_type()
            || node.inputs.len() != 2
        {
            continue;
        }
        let facts: Vec<TypedFact> = model.node_input_facts(id)?.into_iter().cloned().collect();
        let out_fact = model.outlet_fact(OutletId::new(id, 0))?.clone();
        if facts.iter().chain(std::iter::once(&out_fact)).any(|f| f.datum_type != f32::datum_type())
        {
            continue;
        }
        let (Some(a), Some(b), Some(c)) = (
            facts[0].shape.as_concrete(),
            facts[1].shape.as_concrete(),
            out_fact.shape.as_concrete(),
        ) else {
            continue;
        };
        let Some(geometry) = Geometry::from_einsum(&einsum.axes, a, b, c) else {
            continue;
        };
        let mut op = GemmMatMul::new(geometry);
        let mut scale = 1f32;
        // Scaled operands (SDPA's q·√s and kᵀ·√s): the product reads the unscaled ones.
        let mut inputs = node.inputs.clone();
        for input in inputs.iter_mut() {
            if let Some((x, f)) = preceding_scale(model, *input)? {
                *input = x;
                scale *= f;
            }
        }
        // The node whose output the new op takes over: the einsum, its bias Add, its scale.
        let mut tail = OutletId::new(id, 0);
        if let Some((bias, add)) = following_bias(model, id, &op.geometry, c)? {
            op.bias = Some(Bias(bias));
            tail = add;
        }
        // (A B + b) s = s A B + s b.
        if let Some((f, mul)) = following_scale(model, tail, c)? {
            scale *= f;
            if let Some(Bias(b)) = &mut op.bias {
                b.iter_mut().for_each(|v| *v *= f);
            }
            tail = mul;
        }
        // A per-column scale with constant weights (DINOv2's layer scale after the attention
        // projection and fc2): (A W + b) diag(g) = A (W diag(g)) + b diag(g).
        let mut weights = None;
        if let Some((g, mul)) = following_column_scale(model, tail, &op.geometry, c)?
            && let Some(w) = model.outlet_fact(inputs[1])?.konst.as_ref()
            && let Some(w) = op.geometry.scale_columns(w, &g)
        {
            if let Some(Bias(b)) = &mut op.bias {
                b.iter_mut().zip(&g).for_each(|(v, g)| *v *= g);
            }
            weights = Some(w);
            tail = mul;
            columns_scaled += 1;
        }
        op.scale_bits = scale.to_bits();
        if let Some((post, outlet)) = following_post(model, tail, &op.geometry)? {
            op.post = post;
            tail = outlet;
        }
        let name = node.name.clone();
        let mut patch = TypedModelPatch::default();
        let a = patch.tap_model(model, inputs[0])?;
        // Constant weights of a plain product: packed once here, where the CPU has the
        // packed kernel; the op then reads A alone and tract drops the unpacked constant.
        let g = &op.geometry;
        let plain = g.batch.is_empty() && g.kloop.is_empty() && g.a_cs == 1 && g.c_cs == 1;
        let scaled = weights.map(Arc::new);
        let konst = match &scaled {
            Some(w) => Some(w.clone()),
            None => model.outlet_fact(inputs[1])?.konst.clone(),
        };
        let wire = match konst {
            Some(w) if plain && f32_packed::available() => {
                let view = w.to_plain_array_view::<f32>()?;
                let w = view.as_slice().context("constant weights are contiguous")?;
                op.packed = Some(Packed(Arc::new(PackedF32::pack(w, g.k, g.n, g.b_rs, g.b_cs))));
                patch.wire_node(format!("{name}.gemm"), op, &[a])?
            }
            _ => {
                let b = match scaled {
                    Some(w) => patch.add_const(format!("{name}.weights.column_scaled"), w)?,
                    None => patch.tap_model(model, inputs[1])?,
                };
                patch.wire_node(format!("{name}.gemm"), op, &[a, b])?
            }
        };
        patch.shunt_outside(model, tail, wire[0])?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok((replaced, columns_scaled))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::math::is_nan;

    fn run(m: &TypedModel, x: &[f32]) -> Vec<f32> {
        let plan = m.clone().into_runnable().unwrap();
        let input = Tensor::from_shape(&[3, 4], x).unwrap();
        let out = plan.run(tvec!(input.into_tvalue())).unwrap();
        out[0].to_plain_array_view::<f32>().unwrap().iter().copied().collect()
    }

    /// `softmax(x W) · g`, guarded (`Iff(IsNan(p), 0, p)`) after the softmax, then a
    /// per-column scale `g`: the guard becomes part of the product's softmax (a row of NaN
    /// scores gives zeros, as the guard does) and the scale of a product with constant
    /// weights and bias folds into them.
    #[test]
    fn nan_guard_and_column_scale_fold_into_the_product() {
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([3, 4])).unwrap();
        let w: Vec<f32> = (0..20).map(|i| (i as f32 * 0.37).sin()).collect();
        let w = m.add_const("w", Tensor::from_shape(&[4, 5], &w).unwrap()).unwrap();
        let axes: AxesMapping = "mk,kn->mn".parse().unwrap();
        let s = m.wire_node("scores", EinSum::new(axes.clone(), f32::datum_type()), &[x, w]);
        let softmax = Softmax::new(tvec![1], None, SoftmaxKind::Softmax);
        let p = m.wire_node("softmax", softmax, &s.unwrap()).unwrap()[0];
        let nan = m.wire_node("is_nan", is_nan(), &[p]).unwrap()[0];
        let zero = m.add_const("zero", tensor2(&[[0f32]])).unwrap();
        let guarded = m.wire_node("guard", Iff, &[nan, zero, p]).unwrap()[0];
        let v: Vec<f32> = (0..10).map(|i| i as f32 * 0.1 - 0.4).collect();
        let v = m.add_const("v", Tensor::from_shape(&[5, 2], &v).unwrap()).unwrap();
        let ctx = m.wire_node("context", EinSum::new(axes, f32::datum_type()), &[guarded, v]);
        let b = m.add_const("b", tensor2(&[[0.25f32, -1.0]])).unwrap();
        let biased = m.wire_node("bias", TypedBinOp(Box::new(Add), None), &[ctx.unwrap()[0], b]);
        let g = m.add_const("g", tensor2(&[[0.5f32, 3.0]])).unwrap();
        let mul = TypedBinOp(Box::new(Mul), None);
        let out = m.wire_node("layer_scale", mul, &[biased.unwrap()[0], g]).unwrap();
        m.select_output_outlets(&out).unwrap();

        let mut fused = m.clone();
        let (products, columns_scaled) = substitute_gemm_matmuls(&mut fused).unwrap();
        assert_eq!((products, columns_scaled), (2, 1));
        let ops: Vec<String> = fused.nodes().iter().map(|n| n.op().name().to_string()).collect();
        assert!(
            !ops.iter().any(|o| ["Iff", "IsNan", "Mul", "Softmax"].contains(&o.as_str())),
            "{ops:?}"
        );
        let posts: Vec<Post> = fused
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<GemmMatMul>())
            .map(|g| g.post())
            .collect();
        assert!(posts.contains(&Post::SoftmaxNanToZero), "{posts:?}");

        let mut x: Vec<f32> = (0..12).map(|i| (i as f32 * 0.9).cos() * 2.0).collect();
        x[5] = f32::NAN; // row 1's scores are all NaN: the guard zeroes them
        x[10] = f32::INFINITY; // row 2: an infinite score, a NaN softmax (inf - inf)
        let (a, f) = (run(&m, &x), run(&fused, &x));
        assert_eq!(&a[2..6], &[0.25 * 0.5, -3.0, 0.25 * 0.5, -3.0], "the reference guard");
        for (a, f) in a.iter().zip(&f) {
            assert!((a - f).abs() <= 1e-6 * a.abs().max(1.0), "{a:?} vs {f:?}");
        }
    }
}
