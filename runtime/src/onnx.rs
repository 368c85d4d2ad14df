//! Onboard model execution with tract: load an ONNX image model, fix its input shape,
//! optimize it once, then run frame after frame through one reused plan and state.
//!
//! Works on our exported backbones (input `image`, outputs `features` and optionally
//! `prototype_logits`, see [`export`](crate::export)) and on third-party ONNX files whose
//! single input is an f32 `[1, 3, H, W]` image (for example the reference's PyTorch export,
//! input `input`). The features output is the one named `features`, else the first
//! output; the logits output is the one named `prototype_logits`, if any.
//!
//! # Per-frame work and allocation
//!
//! [`OnnxModel::run_rgb8`] preprocesses into a preallocated input tensor (see
//! [`preprocess`](crate::preprocess) for the resize policy), runs the plan, keeps the
//! output tensors and hands out borrowed [`TokenMap`] views of them.
//! Preprocessing and output handling never allocate.
//! tract's run itself allocates every intermediate tensor of every node on every run
//! (its `SimpleState` keeps no arena): `tests/alloc_audit.rs` reports the count.
//!
//! # Threads
//!
//! [`ModelOptions::threads`] selects tract's matmul executor.
//! `1` (or `0`) runs everything on the calling thread ([`Executor::SingleThread`]).
//! `n > 1` builds a private `n`-thread rayon pool, hands it to the plan as
//! [`Executor::MultiThread`] (tract then splits large matmuls, activation packing,
//! element-wise ops, softmax and reductions above its size thresholds across it) and runs
//! every frame *inside* the pool (`pool.install`), so the ops tract runs serially execute on
//! a pool thread too: `n` busy threads in all, not `n` workers plus a calling thread
//! competing for the same cores (on the 2-core machine this measured slightly faster,
//! see `docs/PERFORMANCE.md`).
//!
//! With [`MatMulEngine::Gemm`] (the default) the matrix products that moved to the `gemm`
//! crate ([`crate::ops::gemm_matmul`]) split their work over the same pool (gemm's rayon
//! path runs on the pool the frame runs in), above `2^20` multiply-adds.
//!
//! Pitfalls of tract 0.23's executor, read from `tract-linalg/src/multithread.rs` and
//! `frame/mmm/mod.rs`:
//! - A *one*-thread pool is not single-threaded: the matmul dispatcher treats a pool of
//!   `<= 1` thread as "use rayon's global pool", which has one thread per core. Hence
//!   `threads = 1` maps to `SingleThread`, never to `Executor::multithread(1)`.
//! - tract-core does not enable `tract-linalg/multithread-mm` by itself; without it
//!   `Executor::MultiThread` does not exist. This crate turns it on.
//! - Without an executor in the plan's `RunOptions`, tract falls back to a process-wide
//!   default (`set_default_executor`, single-threaded unless someone changed it), so two
//!   models in one process could silently share one setting. Every plan here carries its own.
//! - Work below tract's thresholds (64 matmul panels, 2^21 multiply-adds, 32768 elements;
//!   `tract_linalg::multithread::set_threading_*`) stays on one thread.

use crate::error::Invalid;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::{self, SimplePlan};
use tract_onnx::tract_hir::internal::InferenceModelExt;

use crate::contract::{FEATURES_NAME, LOGITS_NAME};
use crate::error::ModelError;
use crate::preprocess::{Normalization, Rgb8Frame, preprocess_rgb8};

pub use tract_onnx::prelude::tract_linalg::multithread::Executor;

/// How to load and run a model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelOptions {
    /// Threads for tract's matmul executor (`0` and `1` both mean the calling thread only).
    pub threads: usize,
    /// Input size `(H, W)` in pixels to fix the input to `[1, 3, H, W]`; `None` takes the
    /// size the ONNX file declares (an error if it is symbolic).
    pub input_size: Option<(usize, usize)>,
    /// Normalization applied by [`OnnxModel::run_rgb8`].
    pub normalization: Normalization,
    /// Which code runs the f32 matrix products.
    pub matmul: MatMulEngine,
}

/// Which code runs a model's f32 matrix products (ONNX `MatMul`, after tract's lowering to
/// `EinSum`). The ONNX file is the same either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatMulEngine {
    /// tract's own `OptMatMul` (tract-linalg kernels, activations packed per product).
    Tract,
    /// The `gemm` crate, substituted into the plan after loading
    /// ([`crate::ops::substitute_gemm_matmuls`]); faster on the ViT shapes measured in
    /// `docs/PERFORMANCE.md`. Products it cannot express stay with tract.
    #[default]
    Gemm,
}

impl ModelOptions {
    /// One thread, the file's input size, ImageNet normalization.
    pub const fn new() -> Self {
        Self {
            threads: 1,
            input_size: None,
            normalization: Normalization::IMAGENET,
            matmul: MatMulEngine::Gemm,
        }
    }

    /// With the given matmul engine.
    pub const fn with_matmul(self, matmul: MatMulEngine) -> Self {
        Self { matmul, ..self }
    }

    /// With `threads` executor threads.
    pub const fn with_threads(self, threads: usize) -> Self {
        Self { threads, ..self }
    }

    /// With a fixed input size `(H, W)`.
    pub const fn with_input_size(self, h: usize, w: usize) -> Self {
        Self { input_size: Some((h, w)), ..self }
    }
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// A borrowed `[tokens, channels]` row-major view of one output (batch 1 dropped).
#[derive(Debug, Clone, Copy)]
pub struct TokenMap<'a> {
    data: &'a [f32],
    tokens: usize,
    channels: usize,
}

impl<'a> TokenMap<'a> {
    /// The map without its first `n` tokens.
    fn skip(self, n: usize) -> Self {
        let n = n.min(self.tokens);
        let data = self.data.get(n * self.channels..).unwrap_or_default();
        Self { data, tokens: self.tokens - n, channels: self.channels }
    }

    /// All values, token-major.
    pub fn as_slice(&self) -> &'a [f32] {
        self.data
    }

    /// Number of tokens `N` (rows).
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Channels per token (`D` for features, `K` for logits).
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Token `i`'s channels; `None` past the end.
    pub fn row(&self, i: usize) -> Option<&'a [f32]> {
        self.data.get(i * self.channels..(i + 1) * self.channels)
    }

    /// Iterates over the tokens' rows.
    pub fn rows(&self) -> std::slice::ChunksExact<'a, f32> {
        self.data.chunks_exact(self.channels.max(1))
    }
}

/// The outputs of the last run, borrowed from the model.
#[derive(Debug, Clone, Copy)]
pub struct Outputs<'a> {
    /// Backbone features `[N, D]`.
    pub features: TokenMap<'a>,
    /// Prototype logits `[N, K]`, when the model has a head output.
    pub logits: Option<TokenMap<'a>>,
}

/// Which side of a node's evaluation an [`OnnxModel::run_observed`] hook is called on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodePhase {
    /// Just before the node is evaluated.
    Before,
    /// Just after (also when it failed).
    After,
}

/// Time spent in one kind of op during [`OnnxModel::profile`].
#[derive(Debug, Clone, PartialEq)]
pub struct OpTime {
    /// tract's op name (after optimization), for example `OptMatMul`.
    pub op: String,
    /// Number of nodes of this kind in the plan.
    pub nodes: usize,
    /// Mean time per frame over the profiled runs.
    pub per_frame: Duration,
}

/// Time spent in one node during [`OnnxModel::profile`].
#[derive(Debug, Clone, PartialEq)]
pub struct NodeTime {
    /// Node name.
    pub node: String,
    /// tract's op name.
    pub op: String,
    /// Mean time per frame.
    pub per_frame: Duration,
}

/// A per-op breakdown of a run (see [`OnnxModel::profile`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// Mean wall time per frame of the profiled runs.
    pub total_per_frame: Duration,
    /// Op kinds, slowest first.
    pub by_op: Vec<OpTime>,
    /// Nodes, slowest first.
    pub by_node: Vec<NodeTime>,
}

impl Profile {
    /// Node times summed by role inside a transformer block, slowest first: node names are
    /// `blocks.{i}.<role>` or `blocks.{i}/<role>` (tract keeps the exporter's names and
    /// suffixes the ops it fuses or splits); a role is reported as `<role> (<op>)`, and a node
    /// outside the blocks keeps its own name.
    pub fn by_role(&self) -> Vec<(String, Duration)> {
        let mut roles: Vec<(String, Duration)> = Vec::new();
        for n in &self.by_node {
            let role = match n.node.strip_prefix("blocks.") {
                Some(rest) => rest
                    .trim_start_matches(|c: char| c.is_ascii_digit())
                    .trim_start_matches(['.', '/']),
                None => n.node.as_str(),
            };
            let role = format!("{role} ({})", n.op);
            match roles.iter_mut().find(|r| r.0 == role) {
                Some(r) => r.1 += n.per_frame,
                None => roles.push((role, n.per_frame)),
            }
        }
        roles.sort_by_key(|r| std::cmp::Reverse(r.1));
        roles
    }
}

/// An optimized ONNX image model with its reused run state and buffers.
#[derive(Debug)]
pub struct OnnxModel {
    name: String,
    state: TypedSimpleState,
    /// The executor's pool (`threads > 1`); every run executes inside it.
    pool: Option<Arc<rayon::ThreadPool>>,
    input: Arc<Tensor>,
    input_shape: [usize; 4],
    outputs: TVec<TValue>,
    features_ix: usize,
    logits_ix: Option<usize>,
    options: ModelOptions,
    /// Output names, in the plan's output order.
    output_names: Vec<String>,
    /// What the load-time rewrites matched (gemm engine only).
    fusion: Option<crate::ops::FusionReport>,
    /// Class/register tokens ahead of the patch tokens in the features output.
    prefix_tokens: usize,
}

impl OnnxModel {
    /// Loads, shape-fixes and optimizes the ONNX file at `path`.
    pub fn load(path: &Path, options: ModelOptions) -> Result<Self, ModelError> {
        let name = path.display().to_string();
        let _span = tracing::info_span!("onnx_load", model = %name).entered();
        let load = |source| ModelError::Load { model: name.clone(), source };
        let onnx = tract_onnx::onnx();
        let mut proto = onnx.proto_model_for_path(path).map_err(load)?;
        let dir = path.parent().and_then(Path::to_str);
        // Weights kept beside the file: read into the model, so that the int8 lowering sees them.
        let folder = path.parent().unwrap_or(Path::new("."));
        inline_external_data(&mut proto, folder).map_err(|e| load(TractError::new(e)))?;
        Self::from_proto(proto, dir, name.clone(), options)
    }

    /// Loads a model from ONNX bytes (for example straight from
    /// `export::export_vit`, feature `tools`).
    pub fn from_bytes(bytes: &[u8], options: ModelOptions) -> Result<Self, ModelError> {
        let name = String::from("<memory>");
        let load = |source| ModelError::Load { model: name.clone(), source };
        let proto = tract_onnx::onnx().proto_model_for_read(&mut &bytes[..]).map_err(load)?;
        Self::from_proto(proto, None, name.clone(), options)
    }

    /// Lowers the QDQ linear layers for the integer op and parses LayerNormalization into one
    /// op (gemm engine only), then parses.
    fn from_proto(
        proto: tract_onnx::pb::ModelProto,
        dir: Option<&str>,
        name: String,
        options: ModelOptions,
    ) -> Result<Self, ModelError> {
        if let Err(reason) = check_proto(&proto) {
            return Err(ModelError::Load { model: name, source: TractError::msg(reason) });
        }
        // tract's analysis of an inconsistent graph can panic (an index out of range in a
        // shape rule): a malformed file is an error of its own, not the end of the process.
        let what = name.clone();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            Self::from_checked_proto(proto, dir, name, options)
        }))
        .unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(ModelError::Load {
                model: what,
                source: TractError::msg(format!("the graph is inconsistent (tract: {msg})")),
            })
        })
    }

    fn from_checked_proto(
        mut proto: tract_onnx::pb::ModelProto,
        dir: Option<&str>,
        name: String,
        options: ModelOptions,
    ) -> Result<Self, ModelError> {
        let (int8, fake_quant) = match options.matmul {
            MatMulEngine::Gemm => {
                let int8 = crate::ops::lower_qdq_matmuls(&mut proto);
                let bypassed = if int8.is_empty() {
                    0
                } else {
                    crate::ops::bypass_fake_quant_pairs(&mut proto)
                };
                (int8, bypassed)
            }
            MatMulEngine::Tract => Default::default(),
        };
        let load = |source| ModelError::Load { model: name.clone(), source };
        let parser = match options.matmul {
            MatMulEngine::Gemm => crate::ops::layer_norm::onnx_parser(),
            MatMulEngine::Tract => tract_onnx::onnx(),
        };
        let parsed = parser.parse(&proto, dir).map_err(load)?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(load(TractError::msg(format!(
                "unresolved inputs: {:?}",
                parsed.unresolved_inputs
            ))));
        }
        drop(proto);
        Self::from_inference_model(parsed.model, name, options, &int8, fake_quant)
    }

    fn from_inference_model(
        mut model: InferenceModel,
        name: String,
        options: ModelOptions,
        int8: &std::collections::HashMap<String, crate::ops::QdqLayer>,
        fake_quant_bypassed: usize,
    ) -> Result<Self, ModelError> {
        let unsupported = |reason: String| ModelError::Unsupported { model: name.clone(), reason };
        let n_inputs = model.inputs.len();
        if n_inputs != 1 {
            return Err(unsupported(format!("{n_inputs} inputs, expected one image input")));
        }
        let (h, w) = match options.input_size {
            Some(hw) => hw,
            None => {
                let fact = model
                    .input_fact(0)
                    .map_err(|source| ModelError::Load { model: name.clone(), source })?;
                let shape = fact.shape.as_concrete_finite().ok().flatten().ok_or_else(|| {
                    unsupported(format!(
                        "input shape {:?} is not fixed; pass an input size",
                        fact.shape
                    ))
                })?;
                match shape.as_slice() {
                    [1, 3, h, w] => (*h, *w),
                    other => {
                        return Err(unsupported(format!(
                            "input shape {other:?}, expected [1, 3, H, W]"
                        )));
                    }
                }
            }
        };
        if h == 0 || w == 0 || h > MAX_INPUT_SIDE || w > MAX_INPUT_SIDE {
            return Err(unsupported(format!(
                "input {h}x{w}: expected 1..={MAX_INPUT_SIDE} pixels per side"
            )));
        }
        let shape = [1, 3, h, w];
        let optimize = |source| ModelError::Optimize { model: name.clone(), shape, source };
        model.set_input_fact(0, f32::fact(shape).into()).map_err(optimize)?;
        let mut fusion = None;
        let typed = match options.matmul {
            MatMulEngine::Tract => model.into_optimized(),
            MatMulEngine::Gemm => model
                .into_typed()
                .and_then(|t| t.into_decluttered())
                .and_then(|mut t| {
                    // Foreign exporters' spellings first, so that the substitutions see ours.
                    let gelu = crate::ops::fuse_erf_gelu(&mut t)?;
                    let norms = crate::ops::fuse_decomposed_layer_norm(&mut t)?;
                    let int8_layers = int8.len();
                    let mut int8 = int8.clone();
                    let qkv = crate::ops::split_fused_qkv(&mut t, &mut int8)?;
                    if qkv > 0 {
                        // The new per-part transposes fold into the attention products.
                        t.declutter()?;
                    }
                    let int8 = &int8;
                    let q = crate::ops::substitute_int8_matmuls(&mut t, int8)?;
                    let (patches, q_patches) = crate::ops::substitute_patch_embeddings(&mut t, int8)?;
                    if q + q_patches != int8.len() {
                        tracing::warn!(model = %name, found = int8.len(), substituted = q + q_patches, "some QDQ layers stay as float products");
                    }
                    let (n, columns_scaled) = crate::ops::substitute_gemm_matmuls(&mut t)?;
                    let attn = crate::ops::fuse_attention(&mut t)?;
                    tracing::debug!(model = %name, products = n, int8 = q, attention = attn, patch_embeddings = patches, gelu_rewritten = gelu, "matmuls moved to gemm / int8, attention fused");
                    let pre = crate::ops::FusionReport {
                        qdq_layers: int8_layers,
                        qkv_split: qkv,
                        fake_quant_bypassed,
                        gelu_rewritten: gelu,
                        layer_norms_rewritten: norms,
                        columns_scaled,
                        ..Default::default()
                    };
                    let report = crate::ops::FusionReport::of(&t, pre)?;
                    tracing::info!(model = %name, "fusion: {report}");
                    fusion = Some(report);
                    t.into_optimized()
                }),
        }
        .map_err(optimize)?;

        let outlets = typed.output_outlets().map_err(optimize)?.to_vec();
        let labels: Vec<String> = outlets
            .iter()
            .map(|o| {
                typed
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| typed.node(o.node).name.clone())
            })
            .collect();
        let features_ix = labels.iter().position(|l| l == FEATURES_NAME).unwrap_or(0);
        let logits_ix = labels.iter().position(|l| l == LOGITS_NAME);
        for ix in std::iter::once(features_ix).chain(logits_ix) {
            let fact = typed.outlet_fact(outlets[ix]).map_err(optimize)?;
            if fact.datum_type != f32::datum_type()
                || fact.shape.as_concrete().is_none()
                || fact.rank() < 1
            {
                return Err(unsupported(format!(
                    "output {} is {fact:?}, expected a fixed-shape f32 tensor",
                    labels[ix]
                )));
            }
        }

        // Class and register tokens ahead of the patch tokens (DINO, timm, DINOv2 exports):
        // the features output has the patch grid's tokens plus a few, the grid being known
        // from the patch embedding.
        let prefix_tokens = match (
            fusion.as_ref().and_then(|f| f.patch),
            typed
                .outlet_fact(outlets[features_ix])
                .ok()
                .and_then(|f| f.shape.as_concrete().map(|s| s.to_vec())),
        ) {
            (Some((ph, pw)), Some(s)) if s.len() == 3 && ph > 0 && pw > 0 => {
                let grid = (h / ph) * (w / pw);
                let t = s[1];
                if t > grid && t - grid <= MAX_PREFIX_TOKENS { t - grid } else { 0 }
            }
            _ => 0,
        };
        if prefix_tokens > 0 {
            tracing::info!(model = %name, prefix_tokens, "features: the first {prefix_tokens} token(s) are class/register tokens, skipped in the patch features");
        }

        let pool = if options.threads <= 1 {
            None
        } else {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(options.threads)
                .thread_name(|i| format!("flsl-tract-{i}"))
                .build()
                .map_err(|e| ModelError::Plan {
                    model: name.clone(),
                    source: TractError::new(e),
                })?;
            Some(Arc::new(pool))
        };
        let executor = match &pool {
            None => Executor::SingleThread,
            Some(pool) => Executor::MultiThread(Arc::clone(pool)),
        };
        let run_options = RunOptions { executor: Some(executor), ..Default::default() };
        let plan = SimplePlan::new_with_options(typed, &run_options)
            .map_err(|source| ModelError::Plan { model: name.clone(), source })?;
        let state =
            plan.spawn().map_err(|source| ModelError::Plan { model: name.clone(), source })?;
        let input = Arc::new(
            Tensor::zero::<f32>(&shape)
                .map_err(|source| ModelError::Plan { model: name.clone(), source })?,
        );
        tracing::debug!(model = %name, ?shape, outputs = ?labels, threads = options.threads, "model ready");
        Ok(Self {
            name,
            state,
            pool,
            input,
            input_shape: shape,
            outputs: tvec!(),
            features_ix,
            logits_ix,
            options,
            output_names: labels,
            fusion,
            prefix_tokens,
        })
    }

    /// The fixed input shape `[1, 3, H, W]`.
    pub fn input_shape(&self) -> [usize; 4] {
        self.input_shape
    }

    /// The options the model was loaded with.
    pub fn options(&self) -> &ModelOptions {
        &self.options
    }

    /// The model's name in errors (its path, or `<memory>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the model has a `prototype_logits` output.
    pub fn has_logits(&self) -> bool {
        self.logits_ix.is_some()
    }

    /// The preallocated input tensor's data, `[1, 3, H, W]` row-major, to fill directly
    /// before [`run`](Self::run) (already-normalized data).
    pub fn input_mut(&mut self) -> Result<&mut [f32], ModelError> {
        if Arc::get_mut(&mut self.input).is_none() {
            // tract still holds the previous input (it never does after a completed run);
            // fall back to a fresh tensor rather than failing.
            self.input = Arc::new(
                Tensor::zero::<f32>(&self.input_shape).map_err(|source| self.run_error(source))?,
            );
        }
        let (name, shape) = (&self.name, self.input_shape);
        let t = Arc::get_mut(&mut self.input)
            .expect("input tensor should be exclusive after replacement");
        let view = t.to_plain_array_view_mut::<f32>().map_err(|source| ModelError::Run {
            model: name.clone(),
            shape,
            source,
        })?;
        Ok(view.into_slice().expect("a freshly created tensor is contiguous"))
    }

    /// Preprocesses `frame` into the input (see [`preprocess`](crate::preprocess)), runs the
    /// model and returns views of its outputs.
    pub fn run_rgb8(&mut self, frame: &Rgb8Frame<'_>) -> Result<Outputs<'_>, ModelError> {
        let [_, _, h, w] = self.input_shape;
        let norm = self.options.normalization;
        preprocess_rgb8(frame, &norm, self.input_mut()?, h, w)?;
        self.run()?;
        Ok(self.outputs().expect("outputs exist after a successful run"))
    }

    /// Copies an already-normalized `[1, 3, H, W]` tensor into the input and runs.
    pub fn run_tensor(&mut self, data: &[f32]) -> Result<Outputs<'_>, ModelError> {
        let input = self.input_mut()?;
        if data.len() != input.len() {
            return Err(ModelError::Mismatch {
                what: "input tensor length",
                expected: format!("{} ({:?})", input.len(), self.input_shape),
                got: data.len().to_string(),
            });
        }
        input.copy_from_slice(data);
        self.run()?;
        Ok(self.outputs().expect("outputs exist after a successful run"))
    }

    /// Runs the model on the current input (see [`input_mut`](Self::input_mut)).
    pub fn run(&mut self) -> Result<(), ModelError> {
        let _span = tracing::trace_span!("onnx_run").entered();
        // Drop the previous outputs first, so that their memory is free for this run.
        self.outputs.clear();
        let input = TValue::from_const(Arc::clone(&self.input));
        let state = &mut self.state;
        let result = match &self.pool {
            Some(pool) => pool.install(|| state.run(tvec!(input))),
            None => state.run(tvec!(input)),
        };
        self.outputs = result.map_err(|source| self.run_error(source))?;
        Ok(())
    }

    /// What the load-time rewrites matched: our fused ops and the compute nodes left on
    /// tract's generic path (`None` with [`MatMulEngine::Tract`], which rewrites nothing).
    pub fn fusion(&self) -> Option<&crate::ops::FusionReport> {
        self.fusion.as_ref()
    }

    /// The model's output names, in order (for example `features`, `prototype_logits`,
    /// `det_heatmap`, `det_boxes`).
    pub fn output_names(&self) -> &[String] {
        &self.output_names
    }

    /// The last run's output `name` as `(shape, row-major f32 data)`, borrowed; `None` before
    /// the first run, for an unknown name, or for a non-f32 output.
    pub fn output_f32(&self, name: &str) -> Option<(&[usize], &[f32])> {
        let ix = self.output_names.iter().position(|n| n == name)?;
        let t = self.outputs.get(ix)?;
        Some((t.shape(), t.as_plain_ram()?.as_slice::<f32>().ok()?))
    }

    /// Views of the last run's outputs; `None` before the first successful run.
    pub fn outputs(&self) -> Option<Outputs<'_>> {
        let all = token_map(self.outputs.get(self.features_ix)?)?;
        let features = all.skip(self.prefix_tokens);
        let logits = self.logits_ix.and_then(|ix| {
            let l = token_map(self.outputs.get(ix)?)?;
            Some(if l.tokens == all.tokens { l.skip(self.prefix_tokens) } else { l })
        });
        Some(Outputs { features, logits })
    }

    /// Class and register tokens ahead of the patch tokens in the features output (0 for
    /// FLSL's no-class backbones): [`outputs`](Self::outputs) skips them, the raw
    /// [`output_f32`](Self::output_f32) keeps them. Found at load when the output has the
    /// patch embedding's grid plus at most 16 tokens.
    pub fn prefix_tokens(&self) -> usize {
        self.prefix_tokens
    }

    /// Runs the model on the current input like [`run`](Self::run), calling `hook` just
    /// before and just after each node is evaluated (diagnostics: timing, allocation
    /// counting). The hook gets the phase, the node id, its name and its op name.
    pub fn run_observed(
        &mut self,
        mut hook: impl FnMut(NodePhase, usize, &str, &str) + Send,
    ) -> Result<(), ModelError> {
        self.outputs.clear();
        let input = TValue::from_const(Arc::clone(&self.input));
        let state = &mut self.state;
        let run = || {
            state.run_plan_with_eval(tvec!(input), |ctx, op_state, node, inputs| {
                let op = node.op().name();
                hook(NodePhase::Before, node.id, &node.name, &op);
                let r = plan::eval(ctx, op_state, node, inputs);
                hook(NodePhase::After, node.id, &node.name, &op);
                r
            })
        };
        let result = match &self.pool {
            Some(pool) => pool.install(run),
            None => run(),
        };
        self.outputs = result.map_err(|source| self.run_error(source))?;
        Ok(())
    }

    /// Runs `iters` times on the current input, timing every node, and returns the mean
    /// per-frame time by op kind and by node (diagnostics; allocates).
    pub fn profile(&mut self, iters: usize) -> Result<Profile, ModelError> {
        let iters = iters.max(1);
        let n_nodes = self.state.model().nodes().len();
        let mut times = vec![Duration::ZERO; n_nodes];
        let mut started = Instant::now();
        let start = Instant::now();
        for _ in 0..iters {
            self.run_observed(|phase, id, _, _| match phase {
                NodePhase::Before => started = Instant::now(),
                NodePhase::After => times[id] += started.elapsed(),
            })?;
        }
        let total_per_frame = start.elapsed() / iters as u32;
        let model = self.state.model();
        let mut by_node: Vec<NodeTime> = model
            .nodes()
            .iter()
            .filter(|n| !times[n.id].is_zero())
            .map(|n| NodeTime {
                node: n.name.clone(),
                op: n.op().name().to_string(),
                per_frame: times[n.id] / iters as u32,
            })
            .collect();
        by_node.sort_by_key(|n| std::cmp::Reverse(n.per_frame));
        let mut by_op: Vec<OpTime> = Vec::new();
        for n in &by_node {
            match by_op.iter_mut().find(|o| o.op == n.op) {
                Some(o) => {
                    o.nodes += 1;
                    o.per_frame += n.per_frame;
                }
                None => by_op.push(OpTime { op: n.op.clone(), nodes: 1, per_frame: n.per_frame }),
            }
        }
        by_op.sort_by_key(|o| std::cmp::Reverse(o.per_frame));
        Ok(Profile { total_per_frame, by_op, by_node })
    }

    /// The optimized plan's nodes in evaluation order: `(node name, op name, op info)`,
    /// where the info lines are tract's own description of the op (for matmuls: the shapes
    /// and the kernel it picked). Diagnostics; allocates.
    pub fn plan_info(&self) -> Vec<(String, String, Vec<String>)> {
        let model = self.state.model();
        model
            .eval_order()
            .unwrap_or_else(|_| (0..model.nodes().len()).collect())
            .into_iter()
            .map(|id| {
                let node = model.node(id);
                (
                    node.name.clone(),
                    node.op().name().to_string(),
                    node.op().info().unwrap_or_default(),
                )
            })
            .collect()
    }

    fn run_error(&self, source: TractError) -> ModelError {
        ModelError::Run { model: self.name.clone(), shape: self.input_shape, source }
    }
}

/// Class/register tokens a features output may carry ahead of its patch tokens (DINOv2 with
/// registers: 1 + 4).
pub const MAX_PREFIX_TOKENS: usize = 16;

/// `[1, .., C]` -> `[tokens, C]` view (`tokens` = product of the middle dims).
fn token_map(t: &TValue) -> Option<TokenMap<'_>> {
    let data = t.as_plain_ram()?.as_slice::<f32>().ok()?;
    let channels = *t.shape().last()?;
    let tokens = data.len().checked_div(channels).unwrap_or(0);
    Some(TokenMap { data, tokens, channels })
}

/// The reader stage of [`OnnxModel::from_bytes`] on its own: decodes the protobuf, checks it
/// ([`check_proto`]) and builds tract's graph, without shape analysis or optimisation; returns
/// the node count. For validation and fuzzing (`tests/readers_fuzz.rs`).
pub fn read_graph(bytes: &[u8]) -> Result<usize, ModelError> {
    let load = |source| ModelError::Load { model: "<memory>".into(), source };
    let proto = tract_onnx::onnx().proto_model_for_read(&mut &bytes[..]).map_err(load)?;
    check_proto(&proto).map_err(|r| load(TractError::msg(r)))?;
    let parsed = std::panic::catch_unwind(|| tract_onnx::onnx().parse(&proto, None))
        .map_err(|_| load(TractError::msg("the graph is inconsistent (tract panicked)")))?
        .map_err(load)?;
    Ok(parsed.model.nodes.len())
}

/// Reads the weights a file keeps outside itself (ONNX external data: `*.onnx.data` beside
/// the model, the dynamo exporter's default for its weights) into the tensors' `raw_data`, so
/// that rewrites that read weights (the int8 lowering, `flsl quantize`) see them. Each
/// location must be a relative path inside `dir`; each range must lie inside its file and
/// hold exactly what the tensor's dimensions declare. Returns the number of tensors read.
pub fn inline_external_data(
    proto: &mut tract_onnx::pb::ModelProto,
    dir: &Path,
) -> Result<usize, Invalid> {
    use std::io::{Read, Seek, SeekFrom};
    let Some(g) = proto.graph.as_mut() else { return Ok(0) };
    let mut files: std::collections::HashMap<String, std::fs::File> = Default::default();
    let mut read = 0;
    for t in g.initializer.iter_mut().filter(|t| t.data_location == Some(1)) {
        let what = |r: String| Invalid::from(format!("external data of tensor `{}`: {r}", t.name));
        let get =
            |key: &str| t.external_data.iter().find(|e| e.key == key).map(|e| e.value.clone());
        let location = get("location").ok_or_else(|| what("no location".into()))?;
        let rel = Path::new(&location);
        if rel
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir))
        {
            return Err(what(format!(
                "location `{location}` is not a relative path inside the model's folder"
            )));
        }
        let number = |key: &str| -> Result<Option<u64>, Invalid> {
            get(key)
                .map(|v| v.parse::<u64>().map_err(|_| what(format!("{key} `{v}` is not a number"))))
                .transpose()
        };
        let (offset, length) = (number("offset")?.unwrap_or(0), number("length")?);
        let elem = match tract_onnx::pb::tensor_proto::DataType::try_from(t.data_type) {
            Ok(tract_onnx::pb::tensor_proto::DataType::Float) => 4,
            Ok(
                tract_onnx::pb::tensor_proto::DataType::Int8
                | tract_onnx::pb::tensor_proto::DataType::Uint8,
            ) => 1,
            Ok(
                tract_onnx::pb::tensor_proto::DataType::Int64
                | tract_onnx::pb::tensor_proto::DataType::Double,
            ) => 8,
            Ok(tract_onnx::pb::tensor_proto::DataType::Int32) => 4,
            Ok(
                tract_onnx::pb::tensor_proto::DataType::Float16
                | tract_onnx::pb::tensor_proto::DataType::Bfloat16,
            ) => 2,
            _ => {
                return Err(what(format!(
                    "data type {} is not supported in external data",
                    t.data_type
                )));
            }
        };
        let count = t
            .dims
            .iter()
            .try_fold(1u64, |a, &d| u64::try_from(d).ok().and_then(|d| a.checked_mul(d)));
        let bytes = count
            .and_then(|c| c.checked_mul(elem))
            .ok_or_else(|| what(format!("dimensions {:?} overflow", t.dims)))?;
        if length.is_some_and(|l| l != bytes) {
            return Err(what(format!(
                "length {length:?} bytes, the dimensions {:?} need {bytes}",
                t.dims
            )));
        }
        let path = dir.join(rel);
        if !files.contains_key(&location) {
            let f = std::fs::File::open(&path)
                .map_err(|e| what(format!("opening {}: {e}", path.display())))?;
            files.insert(location.clone(), f);
        }
        let f = files.get_mut(&location).ok_or_else(|| what("file not opened".into()))?;
        let size = f.metadata().map_err(|e| what(format!("{}: {e}", path.display())))?.len();
        if offset.checked_add(bytes).is_none_or(|end| end > size) {
            return Err(what(format!(
                "bytes {offset}..{} are past the end of {} ({size} bytes)",
                offset.saturating_add(bytes),
                path.display()
            )));
        }
        let mut buf = vec![0u8; bytes as usize];
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| what(format!("reading {}: {e}", path.display())))?;
        t.raw_data = buf;
        t.external_data.clear();
        t.data_location = None;
        read += 1;
    }
    Ok(read)
}

/// The largest input side a model may declare (the onboard bundle's limit too).
pub const MAX_INPUT_SIDE: usize = 8192;
/// The most elements a stored tensor may declare (2^31: 8 GiB of f32, beyond any backbone).
pub const MAX_TENSOR_ELEMENTS: u64 = 1 << 31;

/// Size sanity of a decoded ONNX file before tract sees it: every stored tensor (initializers,
/// `Constant` attributes, subgraphs) declares dimensions >= 0 whose product fits
/// [`MAX_TENSOR_ELEMENTS`] and, unless its data is external, holds exactly that many elements,
/// so tract never allocates for data the file does not contain.
pub fn check_proto(proto: &tract_onnx::pb::ModelProto) -> Result<(), Invalid> {
    match &proto.graph {
        Some(g) => Ok(check_graph(g, 0, &std::collections::HashSet::new())?),
        None => Err(Invalid::from("the file has no graph")),
    }
}

fn check_graph(
    g: &tract_onnx::pb::GraphProto,
    depth: usize,
    outer: &std::collections::HashSet<&str>,
) -> Result<(), String> {
    if depth > 8 {
        return Err("subgraphs nest deeper than 8".into());
    }
    // Every graph output is made by something (tract indexes its name table without a check).
    let mut known: std::collections::HashSet<&str> = outer.clone();
    known.extend(g.input.iter().map(|i| i.name.as_str()));
    known.extend(g.initializer.iter().map(|t| t.name.as_str()));
    known.extend(g.node.iter().flat_map(|n| n.output.iter().map(String::as_str)));
    if let Some(o) = g.output.iter().find(|o| !known.contains(o.name.as_str())) {
        return Err(format!("graph output `{}` is made by no node, input or initializer", o.name));
    }
    for t in &g.initializer {
        check_tensor(t).map_err(|e| format!("initializer `{}`: {e}", t.name))?;
    }
    for n in &g.node {
        for a in &n.attribute {
            let at = |e: String| {
                format!("node `{}` ({}), attribute `{}`: {e}", n.name, n.op_type, a.name)
            };
            for t in a.t.iter().chain(&a.tensors) {
                check_tensor(t).map_err(at)?;
            }
            for sub in a.g.iter().chain(&a.graphs) {
                check_graph(sub, depth + 1, &known).map_err(at)?;
            }
        }
    }
    Ok(())
}

fn check_tensor(t: &tract_onnx::pb::TensorProto) -> Result<(), String> {
    use tract_onnx::pb::tensor_proto::DataType as D;
    let mut numel: u64 = 1;
    for &d in &t.dims {
        let d = u64::try_from(d).map_err(|_| format!("negative dimension in {:?}", t.dims))?;
        numel = numel.checked_mul(d).filter(|&n| n <= MAX_TENSOR_ELEMENTS).ok_or_else(|| {
            format!("dimensions {:?} exceed {MAX_TENSOR_ELEMENTS} elements", t.dims)
        })?;
    }
    if t.data_location == Some(1) || !t.external_data.is_empty() {
        return Ok(()); // external data: tract reads and checks the side file
    }
    let elem: u64 = match D::try_from(t.data_type) {
        Ok(D::Float | D::Int32 | D::Uint32) => 4,
        Ok(D::Double | D::Int64 | D::Uint64 | D::Complex64) => 8,
        Ok(D::Uint8 | D::Int8 | D::Bool) => 1,
        Ok(D::Uint16 | D::Int16 | D::Float16 | D::Bfloat16) => 2,
        Ok(D::Complex128) => 16,
        _ => 0, // strings and the rest: no fixed size, tract decides
    };
    let held = if !t.raw_data.is_empty() {
        if elem == 0 {
            return Ok(());
        }
        t.raw_data.len() as u64 / elem
    } else {
        [
            t.float_data.len(),
            t.int32_data.len(),
            t.string_data.len(),
            t.int64_data.len(),
            t.double_data.len(),
            t.uint64_data.len(),
        ]
        .into_iter()
        .max()
        .unwrap_or(0) as u64
    };
    // Complex values take two entries of the typed fields.
    let held = if matches!(D::try_from(t.data_type), Ok(D::Complex64 | D::Complex128))
        && t.raw_data.is_empty()
    {
        held / 2
    } else {
        held
    };
    if held != numel {
        return Err(format!("dimensions {:?} say {numel} elements, the file holds {held}", t.dims));
    }
    Ok(())
}
