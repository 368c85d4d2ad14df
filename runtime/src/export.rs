//! ONNX export of the no-class ViT backbone (and optionally the FLSL projection head).
//!
//! Ports the forward pass of the reference `vision_transformer.VisionTransformer` as
//! turned into a no-class model by `make_vit_noclass(.., post_layernorm=True)`
//! (QingSuML/FLSL, paper section 3), and `FLSLhead` from `main_flsl.py`, into an opset-17
//! ONNX graph made of standard operators only, so that tract, onnxruntime and TensorRT all
//! read it: `Conv`, `Reshape`, `Transpose`, `Add`, `LayerNormalization`, `MatMul`,
//! `Softmax`, `Mul`, `Erf`, `ReduceL2`, `Max`, `Div`.
//!
//! The exporter takes plain host tensors named by the reference state-dict keys, never
//! burn types: the training crate converts its model to a [`HostTensors`] map and calls
//! [`export_vit`], so the runtime never depends on a training framework.
//!
//! # Graph
//!
//! ```text
//! image [1,3,H,W] (ImageNet-normalized)
//!   Conv(k = s = p) -> Reshape [1,D,N] -> Transpose [1,N,D] -> Add pos [1,N,D]
//!   per block:  x += proj(attn(LayerNorm1 x)),  x += fc2(GELU(fc1(LayerNorm2 x)))
//!   LayerNorm -> features [1,N,D]                                (token n = row * gw + col)
//!   with a head: Linear-GELU-Linear-GELU-Linear -> x / max(|x|, 1e-12) -> x W^T
//!     -> prototype_logits [1,N,K]
//! ```
//!
//! Attention splits `qkv.weight` (`[3D, D]`, PyTorch `[out, in]`) into its q, k and v rows
//! (the reference reshapes the `3D` outputs as `(3, heads, D/heads)`, q/k/v outermost), and
//! runs one `MatMul` each; the scale `(D/heads)^-0.5` is folded into the q weights and
//! bias. GELU is the exact erf form written as `(x * 0.5) * (1 + erf(x * (1/sqrt 2)))`,
//! the chain tract fuses into one `gelu_exact` op.
//! The weight-normalised last layer is exported as its effective weight
//! `W[i,:] = g[i] * v[i,:] / |v[i,:]|` (reference README fact 11).
//!
//! Metadata properties `flsl.*` record the patch size, the token grid, the width and the
//! expected normalization, so a runtime can map tokens back to image cells.

use std::collections::BTreeMap;

use prost::Message;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType,
    tensor_proto::DataType, tensor_shape_proto, type_proto,
};

/// Host tensors by reference state-dict key: `(shape, row-major data)`.
pub type HostTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// The ONNX opset the exporter writes.
pub const OPSET: i64 = 17;
/// The ONNX IR version matching [`OPSET`] (ONNX 1.12+).
pub const IR_VERSION: i64 = 8;
pub use crate::contract::{FEATURES_NAME, INPUT_NAME, LOGITS_NAME};

/// Architecture of a no-class ViT and the fixed input size of the exported graph.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VitSpec {
    /// Token width `D`.
    pub embed_dim: usize,
    /// Number of transformer blocks.
    pub depth: usize,
    /// Attention heads; must divide `embed_dim`.
    pub num_heads: usize,
    /// Patch side `p` in pixels (conv kernel = stride).
    pub patch_size: usize,
    /// Hidden width of each block's MLP (`mlp_ratio * D`).
    pub mlp_hidden: usize,
    /// LayerNorm epsilon (the reference uses `1e-6` everywhere).
    pub layer_norm_eps: f32,
    /// Input height in pixels, a multiple of `patch_size`.
    pub img_h: usize,
    /// Input width in pixels, a multiple of `patch_size`.
    pub img_w: usize,
}

impl VitSpec {
    /// A spec from its parts.
    #[allow(clippy::too_many_arguments)]
    pub const fn new(
        embed_dim: usize,
        depth: usize,
        num_heads: usize,
        patch_size: usize,
        mlp_hidden: usize,
        layer_norm_eps: f32,
        img_h: usize,
        img_w: usize,
    ) -> Self {
        Self { embed_dim, depth, num_heads, patch_size, mlp_hidden, layer_norm_eps, img_h, img_w }
    }

    /// ViT-Tiny/16 (`D = 192`, 12 blocks, 3 heads, MLP 768) at `img_h x img_w`.
    pub const fn vit_tiny_p16(img_h: usize, img_w: usize) -> Self {
        Self::new(192, 12, 3, 16, 768, 1e-6, img_h, img_w)
    }

    /// ViT-Small/16 (`D = 384`, 12 blocks, 6 heads, MLP 1536) at `img_h x img_w`.
    pub const fn vit_small_p16(img_h: usize, img_w: usize) -> Self {
        Self::new(384, 12, 6, 16, 1536, 1e-6, img_h, img_w)
    }

    /// The benchmark models by name (`tiny`: [`Self::vit_tiny_p16`], `small`:
    /// [`Self::vit_small_p16`]) at `img_h x img_w`; `None` for another name.
    pub fn named(name: &str, img_h: usize, img_w: usize) -> Option<Self> {
        match name {
            "tiny" => Some(Self::vit_tiny_p16(img_h, img_w)),
            "small" => Some(Self::vit_small_p16(img_h, img_w)),
            _ => None,
        }
    }

    /// The micro ViT of the reference test set (`D = 64`, 2 blocks, 2 heads, patch 16,
    /// MLP 128) at 64 x 64.
    pub const fn micro() -> Self {
        Self::new(64, 2, 2, 16, 128, 1e-6, 64, 64)
    }

    /// Token grid `(rows, cols)` of the fixed input size.
    pub const fn grid(&self) -> (usize, usize) {
        (self.img_h / self.patch_size, self.img_w / self.patch_size)
    }

    /// Number of tokens `N = rows * cols`.
    pub const fn num_tokens(&self) -> usize {
        let (gh, gw) = self.grid();
        gh * gw
    }
}

impl Default for VitSpec {
    /// ViT-Small/16 at 224 x 224.
    fn default() -> Self {
        Self::vit_small_p16(224, 224)
    }
}

/// Where the FLSL head's tensors sit in the weight map.
///
/// The head's keys are `{prefix}mlp.{0,2,4,..}.{weight,bias}` (Linear layers with GELU in
/// between; their count is read from the map) and either
/// `{prefix}last_layer.weight_g [K,1]` + `{prefix}last_layer.weight_v [K,bottleneck]`
/// (weight normalisation) or an already effective `{prefix}last_layer.weight [K,bottleneck]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadSpec {
    /// Key prefix, for example `"head."` (checkpoint layout) or `""` (a bare head).
    pub prefix: String,
}

impl HeadSpec {
    /// A head whose keys start with `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }
}

impl Default for HeadSpec {
    /// The checkpoint layout: keys under `head.`.
    fn default() -> Self {
        Self::new("head.")
    }
}

/// Why an export failed: the weights do not match the spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    /// A tensor the spec needs is not in the map.
    #[error("tensor `{name}` is missing from the weights")]
    MissingTensor {
        /// State-dict key.
        name: String,
    },
    /// A tensor has another shape than the spec implies.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        /// State-dict key (or `pos_embed_for_grid` for the position table argument).
        name: String,
        /// Shape the spec implies.
        expected: Vec<usize>,
        /// Shape found (for data-length errors: `[len]`).
        got: Vec<usize>,
    },
    /// The spec itself is inconsistent.
    #[error("invalid ViT spec: {reason}")]
    Spec {
        /// What is wrong.
        reason: String,
    },
}

/// Exports a no-class ViT (and optionally its FLSL head) as opset-17 ONNX bytes.
///
/// - `weights`: reference state-dict keys (`patch_embed.proj.weight [D,3,p,p]`,
///   `blocks.{i}.attn.qkv.weight [3D,D]`, ...; `pos_embed` and `cls_token` are ignored).
/// - `spec`: architecture and the fixed input size `img_h x img_w`.
/// - `pos_embed_for_grid`: the `[gh*gw, D]` position table for that input size, already
///   resized by the caller exactly as training does (the bicubic `(g+0.1)/14` rule), so
///   the exported graph holds it as a constant.
/// - `head`: also export the FLSL head as a second output `prototype_logits`.
///
/// # Shapes
///
/// Graph input `image [1,3,img_h,img_w]` f32; outputs `features [1,N,D]` and, with a
/// head, `prototype_logits [1,N,K]`, where `N = (img_h/p) * (img_w/p)`.
pub fn export_vit(
    weights: &HostTensors,
    spec: &VitSpec,
    pos_embed_for_grid: &[f32],
    head: Option<&HeadSpec>,
) -> Result<Vec<u8>, ExportError> {
    Ok(vit_model_proto(weights, spec, pos_embed_for_grid, head)?.encode_to_vec())
}

/// The same graph as [`export_vit`], as the ONNX protobuf message.
pub fn vit_model_proto(
    weights: &HostTensors,
    spec: &VitSpec,
    pos_embed_for_grid: &[f32],
    head: Option<&HeadSpec>,
) -> Result<ModelProto, ExportError> {
    check_spec(spec)?;
    let d = spec.embed_dim;
    let p = spec.patch_size;
    let (gh, gw) = spec.grid();
    let n = gh * gw;
    let heads = spec.num_heads;
    let hd = d / heads;
    let w = Weights(weights);
    let mut g = GraphBuilder::default();

    // Patch embedding: conv k = s = p, flatten the grid row-major, add positions.
    let conv_w = w.get("patch_embed.proj.weight", &[d, 3, p, p])?;
    let conv_b = w.get("patch_embed.proj.bias", &[d])?;
    let conv_w = g.init("patch_embed.proj.weight", &[d, 3, p, p], conv_w.to_vec());
    let conv_b = g.init("patch_embed.proj.bias", &[d], conv_b.to_vec());
    let k = [p as i64, p as i64];
    let x = g.node(
        "Conv",
        "patch_embed/conv",
        &[INPUT_NAME, &conv_w, &conv_b],
        vec![attr_ints("kernel_shape", &k), attr_ints("strides", &k)],
    ); // [1, D, gh, gw]
    let shape_dn = g.shape("patch_embed/shape", &[1, d as i64, n as i64]);
    let x = g.node("Reshape", "patch_embed/flatten", &[&x, &shape_dn], vec![]); // [1, D, N]
    let x = g.node("Transpose", "patch_embed/tokens", &[&x], vec![attr_ints("perm", &[0, 2, 1])]); // [1, N, D]
    if pos_embed_for_grid.len() != n * d {
        return Err(ExportError::Shape {
            name: "pos_embed_for_grid".into(),
            expected: vec![n, d],
            got: vec![pos_embed_for_grid.len()],
        });
    }
    let pos = g.init("pos_embed", &[1, n, d], pos_embed_for_grid.to_vec());
    let mut x = g.node("Add", "pos_add", &[&x, &pos], vec![]); // [1, N, D]

    let shape_nhd = g.shape("attn/shape_heads", &[1, n as i64, heads as i64, hd as i64]);
    let shape_nd = g.shape("attn/shape_tokens", &[1, n as i64, d as i64]);
    let scale = (hd as f32).powf(-0.5);
    for i in 0..spec.depth {
        let b = format!("blocks.{i}");
        // x += proj(attn(norm1(x)))
        let h = g.layer_norm(&w, &format!("{b}.norm1"), d, spec.layer_norm_eps, &x)?;
        let qkv_w = w.get(&format!("{b}.attn.qkv.weight"), &[3 * d, d])?;
        let qkv_b = w.get(&format!("{b}.attn.qkv.bias"), &[3 * d])?;
        let mut proj = |which: usize, tag: &str, factor: f32| -> String {
            let rows = &qkv_w[which * d * d..(which + 1) * d * d];
            let wt = transpose(rows, d, d).into_iter().map(|v| v * factor).collect();
            let bias = qkv_b[which * d..(which + 1) * d].iter().map(|v| v * factor).collect();
            g.linear_from(&format!("{b}.attn.{tag}"), d, d, wt, bias, &h)
        };
        let q = proj(0, "q", scale); // [1, N, D], pre-scaled
        let kk = proj(1, "k", 1.0);
        let v = proj(2, "v", 1.0);
        let q = g.node("Reshape", &format!("{b}.attn.q/heads"), &[&q, &shape_nhd], vec![]);
        let q = g.node(
            "Transpose",
            &format!("{b}.attn.q/t"),
            &[&q],
            vec![attr_ints("perm", &[0, 2, 1, 3])],
        ); // [1, H, N, hd]
        let kk = g.node("Reshape", &format!("{b}.attn.k/heads"), &[&kk, &shape_nhd], vec![]);
        let kk = g.node(
            "Transpose",
            &format!("{b}.attn.k/t"),
            &[&kk],
            vec![attr_ints("perm", &[0, 2, 3, 1])],
        ); // [1, H, hd, N]
        let v = g.node("Reshape", &format!("{b}.attn.v/heads"), &[&v, &shape_nhd], vec![]);
        let v = g.node(
            "Transpose",
            &format!("{b}.attn.v/t"),
            &[&v],
            vec![attr_ints("perm", &[0, 2, 1, 3])],
        ); // [1, H, N, hd]
        let s = g.node("MatMul", &format!("{b}.attn/scores"), &[&q, &kk], vec![]); // [1, H, N, N]
        let a = g.node("Softmax", &format!("{b}.attn/softmax"), &[&s], vec![attr_int("axis", -1)]);
        let o = g.node("MatMul", &format!("{b}.attn/context"), &[&a, &v], vec![]); // [1, H, N, hd]
        let o = g.node(
            "Transpose",
            &format!("{b}.attn/merge_t"),
            &[&o],
            vec![attr_ints("perm", &[0, 2, 1, 3])],
        ); // [1, N, H, hd]
        let o = g.node("Reshape", &format!("{b}.attn/merge"), &[&o, &shape_nd], vec![]); // [1, N, D]
        let o = g.linear(&w, &format!("{b}.attn.proj"), d, d, &o)?;
        x = g.node("Add", &format!("{b}/residual1"), &[&x, &o], vec![]);
        // x += fc2(gelu(fc1(norm2(x))))
        let h = g.layer_norm(&w, &format!("{b}.norm2"), d, spec.layer_norm_eps, &x)?;
        let h = g.linear(&w, &format!("{b}.mlp.fc1"), d, spec.mlp_hidden, &h)?;
        let h = g.gelu(&format!("{b}.mlp.act"), &h);
        let h = g.linear(&w, &format!("{b}.mlp.fc2"), spec.mlp_hidden, d, &h)?;
        x = g.node("Add", &format!("{b}/residual2"), &[&x, &h], vec![]);
    }
    let features = g.layer_norm_named(&w, "norm", d, spec.layer_norm_eps, &x, FEATURES_NAME)?;
    let mut outputs = vec![value_info(FEATURES_NAME, &[1, n, d])];

    if let Some(head) = head {
        let k = head_graph(&mut g, &w, head, d, &features)?;
        outputs.push(value_info(LOGITS_NAME, &[1, n, k]));
    }

    let mut meta = vec![
        ("flsl.patch_size", p.to_string()),
        ("flsl.grid", format!("{gh}x{gw}")),
        ("flsl.embed_dim", d.to_string()),
        ("flsl.normalization", "imagenet mean [0.485,0.456,0.406] std [0.229,0.224,0.225]".into()),
    ];
    if head.is_some() {
        meta.push(("flsl.head", "FLSLhead".into()));
    }
    let graph = GraphProto {
        name: "flsl_vit_noclass".into(),
        node: g.nodes,
        initializer: g.inits,
        input: vec![value_info(INPUT_NAME, &[1, 3, spec.img_h, spec.img_w])],
        output: outputs,
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
        producer_name: "flsl".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: meta
            .into_iter()
            .map(|(key, value)| StringStringEntryProto { key: key.into(), value })
            .collect(),
        ..Default::default()
    })
}

/// Appends the FLSL head to `g`, reading `features [1,N,D]`; returns `K`.
fn head_graph(
    g: &mut GraphBuilder,
    w: &Weights<'_>,
    head: &HeadSpec,
    d: usize,
    features: &str,
) -> Result<usize, ExportError> {
    let pre = &head.prefix;
    // Linear layers sit at the even indices of the reference `nn.Sequential`, GELU between.
    let mut layers = Vec::new();
    let mut in_dim = d;
    for j in (0..).step_by(2) {
        let name = format!("{pre}mlp.{j}.weight");
        let Some((shape, _)) = w.0.get(&name) else {
            break;
        };
        if shape.len() != 2 || shape[1] != in_dim {
            return Err(ExportError::Shape {
                name,
                expected: vec![shape.first().copied().unwrap_or(0), in_dim],
                got: shape.clone(),
            });
        }
        layers.push((format!("{pre}mlp.{j}"), in_dim, shape[0]));
        in_dim = shape[0];
    }
    if layers.is_empty() {
        return Err(ExportError::MissingTensor { name: format!("{pre}mlp.0.weight") });
    }
    let bottleneck = in_dim;
    let mut h = features.to_string();
    let last = layers.len() - 1;
    for (ix, (name, din, dout)) in layers.iter().enumerate() {
        h = g.linear(w, name, *din, *dout, &h)?;
        if ix != last {
            h = g.gelu(&format!("{name}.act"), &h);
        }
    }
    // z / max(|z|, 1e-12), as torch.nn.functional.normalize(dim=-1).
    let norm = g.node(
        "ReduceL2",
        "head/l2",
        &[&h],
        vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)],
    );
    let eps = g.scalar("head/eps", 1e-12);
    let norm = g.node("Max", "head/l2_clamped", &[&norm, &eps], vec![]);
    let z = g.node("Div", "head/normalized", &[&h, &norm], vec![]);
    // Effective last-layer weight, [K, bottleneck].
    let (k, eff) = last_layer_weight(w, pre, bottleneck)?;
    let wt = g.init(
        &format!("{pre}last_layer.weight_t"),
        &[bottleneck, k],
        transpose(&eff, k, bottleneck),
    );
    g.node_named("MatMul", "head/last_layer", &[&z, &wt], vec![], LOGITS_NAME);
    Ok(k)
}

/// `W[i,:] = g[i] * v[i,:] / |v[i,:]|`, or `{pre}last_layer.weight` when stored directly.
fn last_layer_weight(
    w: &Weights<'_>,
    pre: &str,
    bottleneck: usize,
) -> Result<(usize, Vec<f32>), ExportError> {
    let direct = format!("{pre}last_layer.weight");
    if let Some((shape, data)) = w.0.get(&direct) {
        if shape.len() != 2 || shape[1] != bottleneck {
            return Err(ExportError::Shape {
                name: direct,
                expected: vec![shape.first().copied().unwrap_or(0), bottleneck],
                got: shape.clone(),
            });
        }
        return Ok((shape[0], data.clone()));
    }
    let vname = format!("{pre}last_layer.weight_v");
    let Some((vshape, _)) = w.0.get(&vname) else {
        return Err(ExportError::MissingTensor { name: vname });
    };
    let k = vshape.first().copied().unwrap_or(0);
    let v = w.get(&vname, &[k, bottleneck])?;
    let gain = w.get(&format!("{pre}last_layer.weight_g"), &[k, 1])?;
    let mut eff = Vec::with_capacity(k * bottleneck);
    for (row, g) in v.chunks_exact(bottleneck).zip(gain) {
        // f64 accumulation: the norm of a row is one number per prototype, cheap to get right.
        let norm = row.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
        let f = f64::from(*g) / norm;
        eff.extend(row.iter().map(|x| (f64::from(*x) * f) as f32));
    }
    Ok((k, eff))
}

/// Every F32 tensor of a safetensors file's `bytes` as [`HostTensors`], keys prefixed with
/// `prefix` (tensors of other dtypes are skipped: a checkpoint's step counters, for example).
pub fn host_tensors_from_safetensors(
    bytes: &[u8],
    prefix: &str,
) -> Result<HostTensors, safetensors::SafeTensorError> {
    let st = safetensors::SafeTensors::deserialize(bytes)?;
    let mut out = HostTensors::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            continue;
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.insert(format!("{prefix}{name}"), (view.shape().to_vec(), data));
    }
    Ok(out)
}

/// Seeded random weights for `spec` under the reference keys (for speed benchmarks and
/// tests that need no trained model): linear and conv weights uniform with the reference
/// init's standard deviation 0.02, biases 0, LayerNorms identity, and a `pos_embed
/// [1, N, D]` of the same distribution for the spec's grid.
pub fn random_vit_weights(spec: &VitSpec, seed: u64) -> HostTensors {
    let d = spec.embed_dim;
    let p = spec.patch_size;
    let mut rng = crate::rng::SplitMix64(seed);
    let mut w = HostTensors::new();
    let mut rand = |w: &mut HostTensors, name: String, shape: Vec<usize>| {
        let len = shape.iter().product();
        // Uniform on [-a, a] with a = 0.02 * sqrt(3): standard deviation 0.02.
        let data = (0..len).map(|_| (rng.next_f32() * 2.0 - 1.0) * 0.034_641).collect();
        w.insert(name, (shape, data));
    };
    let fill = |w: &mut HostTensors, name: String, len: usize, value: f32| {
        w.insert(name, (vec![len], vec![value; len]));
    };
    rand(&mut w, "patch_embed.proj.weight".into(), vec![d, 3, p, p]);
    fill(&mut w, "patch_embed.proj.bias".into(), d, 0.0);
    rand(&mut w, "pos_embed".into(), vec![1, spec.num_tokens(), d]);
    for i in 0..spec.depth {
        let b = format!("blocks.{i}");
        for n in ["norm1", "norm2"] {
            fill(&mut w, format!("{b}.{n}.weight"), d, 1.0);
            fill(&mut w, format!("{b}.{n}.bias"), d, 0.0);
        }
        rand(&mut w, format!("{b}.attn.qkv.weight"), vec![3 * d, d]);
        fill(&mut w, format!("{b}.attn.qkv.bias"), 3 * d, 0.0);
        rand(&mut w, format!("{b}.attn.proj.weight"), vec![d, d]);
        fill(&mut w, format!("{b}.attn.proj.bias"), d, 0.0);
        rand(&mut w, format!("{b}.mlp.fc1.weight"), vec![spec.mlp_hidden, d]);
        fill(&mut w, format!("{b}.mlp.fc1.bias"), spec.mlp_hidden, 0.0);
        rand(&mut w, format!("{b}.mlp.fc2.weight"), vec![d, spec.mlp_hidden]);
        fill(&mut w, format!("{b}.mlp.fc2.bias"), d, 0.0);
    }
    fill(&mut w, "norm.weight".into(), d, 1.0);
    fill(&mut w, "norm.bias".into(), d, 0.0);
    w
}

fn check_spec(spec: &VitSpec) -> Result<(), ExportError> {
    let bad = |reason: String| Err(ExportError::Spec { reason });
    if spec.embed_dim == 0 || spec.num_heads == 0 || spec.patch_size == 0 || spec.mlp_hidden == 0 {
        return bad(format!("zero-sized dimension in {spec:?}"));
    }
    if !spec.embed_dim.is_multiple_of(spec.num_heads) {
        return bad(format!("{} heads do not divide embed_dim {}", spec.num_heads, spec.embed_dim));
    }
    if spec.img_h == 0
        || spec.img_w == 0
        || !spec.img_h.is_multiple_of(spec.patch_size)
        || !spec.img_w.is_multiple_of(spec.patch_size)
    {
        return bad(format!(
            "input {}x{} is not a positive multiple of the patch size {}",
            spec.img_h, spec.img_w, spec.patch_size
        ));
    }
    Ok(())
}

/// Row-major `[rows, cols]` -> `[cols, rows]` (PyTorch `[out, in]` -> MatMul `[in, out]`).
fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

struct Weights<'a>(&'a HostTensors);

impl Weights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<&[f32], ExportError> {
        let (s, data) =
            self.0.get(name).ok_or_else(|| ExportError::MissingTensor { name: name.into() })?;
        if s.as_slice() != shape {
            return Err(ExportError::Shape {
                name: name.into(),
                expected: shape.to_vec(),
                got: s.clone(),
            });
        }
        let len: usize = shape.iter().product();
        if data.len() != len {
            return Err(ExportError::Shape {
                name: name.into(),
                expected: shape.to_vec(),
                got: vec![data.len()],
            });
        }
        Ok(data)
    }
}

/// Accumulates nodes and initializers; every node's single output is named after it.
#[derive(Default)]
struct GraphBuilder {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    scalars: BTreeMap<u32, String>,
}

impl GraphBuilder {
    fn init(&mut self, name: &str, dims: &[usize], data: Vec<f32>) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len());
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.inits.push(TensorProto {
            name: name.into(),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            raw_data: raw,
            ..Default::default()
        });
        name.into()
    }

    /// An int64 shape constant for `Reshape`.
    fn shape(&mut self, name: &str, dims: &[i64]) -> String {
        self.inits.push(TensorProto {
            name: name.into(),
            dims: vec![dims.len() as i64],
            data_type: DataType::Int64 as i32,
            raw_data: dims.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ..Default::default()
        });
        name.into()
    }

    /// A rank-0 f32 constant, shared by value.
    fn scalar(&mut self, name: &str, value: f32) -> String {
        if let Some(existing) = self.scalars.get(&value.to_bits()) {
            return existing.clone();
        }
        self.inits.push(TensorProto {
            name: name.into(),
            dims: vec![],
            data_type: DataType::Float as i32,
            raw_data: value.to_le_bytes().to_vec(),
            ..Default::default()
        });
        self.scalars.insert(value.to_bits(), name.into());
        name.into()
    }

    fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
    ) -> String {
        self.node_named(op, name, inputs, attribute, name)
    }

    fn node_named(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&str],
        attribute: Vec<AttributeProto>,
        output: &str,
    ) -> String {
        self.nodes.push(NodeProto {
            op_type: op.into(),
            name: name.into(),
            input: inputs.iter().map(|s| (*s).to_string()).collect(),
            output: vec![output.into()],
            attribute,
            ..Default::default()
        });
        output.into()
    }

    /// `x W^T + b` for the reference `Linear` `{prefix}.weight [dout,din]`, `{prefix}.bias`.
    fn linear(
        &mut self,
        w: &Weights<'_>,
        prefix: &str,
        din: usize,
        dout: usize,
        x: &str,
    ) -> Result<String, ExportError> {
        let weight = w.get(&format!("{prefix}.weight"), &[dout, din])?;
        let bias = w.get(&format!("{prefix}.bias"), &[dout])?.to_vec();
        Ok(self.linear_from(prefix, din, dout, transpose(weight, dout, din), bias, x))
    }

    /// `x Wt + b` with `Wt [din, dout]` already transposed.
    fn linear_from(
        &mut self,
        prefix: &str,
        din: usize,
        dout: usize,
        wt: Vec<f32>,
        bias: Vec<f32>,
        x: &str,
    ) -> String {
        let wt = self.init(&format!("{prefix}.weight_t"), &[din, dout], wt);
        let b = self.init(&format!("{prefix}.bias"), &[dout], bias);
        let y = self.node("MatMul", &format!("{prefix}/matmul"), &[x, &wt], vec![]);
        self.node("Add", &format!("{prefix}/bias"), &[&y, &b], vec![])
    }

    fn layer_norm(
        &mut self,
        w: &Weights<'_>,
        prefix: &str,
        d: usize,
        eps: f32,
        x: &str,
    ) -> Result<String, ExportError> {
        let out = format!("{prefix}/ln");
        self.layer_norm_named(w, prefix, d, eps, x, &out)
    }

    fn layer_norm_named(
        &mut self,
        w: &Weights<'_>,
        prefix: &str,
        d: usize,
        eps: f32,
        x: &str,
        output: &str,
    ) -> Result<String, ExportError> {
        let gamma = w.get(&format!("{prefix}.weight"), &[d])?.to_vec();
        let beta = w.get(&format!("{prefix}.bias"), &[d])?.to_vec();
        let gamma = self.init(&format!("{prefix}.weight"), &[d], gamma);
        let beta = self.init(&format!("{prefix}.bias"), &[d], beta);
        Ok(self.node_named(
            "LayerNormalization",
            &format!("{prefix}/ln"),
            &[x, &gamma, &beta],
            vec![attr_int("axis", -1), attr_float("epsilon", eps)],
            output,
        ))
    }

    /// Exact GELU, `(x * 0.5) * (1 + erf(x * (1/sqrt 2)))`.
    fn gelu(&mut self, prefix: &str, x: &str) -> String {
        let inv_sqrt2 = self.scalar("const/inv_sqrt2", std::f32::consts::FRAC_1_SQRT_2);
        let one = self.scalar("const/one", 1.0);
        let half = self.scalar("const/half", 0.5);
        let s = self.node("Mul", &format!("{prefix}/scale"), &[x, &inv_sqrt2], vec![]);
        let e = self.node("Erf", &format!("{prefix}/erf"), &[&s], vec![]);
        let e = self.node("Add", &format!("{prefix}/one_plus"), &[&e, &one], vec![]);
        let hx = self.node("Mul", &format!("{prefix}/half_x"), &[x, &half], vec![]);
        self.node("Mul", &format!("{prefix}/gelu"), &[&hx, &e], vec![])
    }
}

pub(crate) fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

pub(crate) fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: v,
        ..Default::default()
    }
}

pub(crate) fn value_info(name: &str, dims: &[usize]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|&d| tensor_shape_proto::Dimension {
            value: Some(tensor_shape_proto::dimension::Value::DimValue(d as i64)),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_weights(spec: &VitSpec) -> HostTensors {
        let d = spec.embed_dim;
        let p = spec.patch_size;
        let mut w = HostTensors::new();
        let mut put = |name: String, shape: Vec<usize>| {
            let len = shape.iter().product();
            w.insert(name, (shape, vec![0.01; len]));
        };
        put("patch_embed.proj.weight".into(), vec![d, 3, p, p]);
        put("patch_embed.proj.bias".into(), vec![d]);
        for i in 0..spec.depth {
            for n in ["norm1", "norm2"] {
                put(format!("blocks.{i}.{n}.weight"), vec![d]);
                put(format!("blocks.{i}.{n}.bias"), vec![d]);
            }
            put(format!("blocks.{i}.attn.qkv.weight"), vec![3 * d, d]);
            put(format!("blocks.{i}.attn.qkv.bias"), vec![3 * d]);
            put(format!("blocks.{i}.attn.proj.weight"), vec![d, d]);
            put(format!("blocks.{i}.attn.proj.bias"), vec![d]);
            put(format!("blocks.{i}.mlp.fc1.weight"), vec![spec.mlp_hidden, d]);
            put(format!("blocks.{i}.mlp.fc1.bias"), vec![spec.mlp_hidden]);
            put(format!("blocks.{i}.mlp.fc2.weight"), vec![d, spec.mlp_hidden]);
            put(format!("blocks.{i}.mlp.fc2.bias"), vec![d]);
        }
        put("norm.weight".into(), vec![d]);
        put("norm.bias".into(), vec![d]);
        w
    }

    #[test]
    fn graph_uses_only_standard_ops_and_names_its_io() {
        let spec = VitSpec::new(8, 1, 2, 4, 16, 1e-6, 8, 12);
        let w = tiny_weights(&spec);
        let pos = vec![0.0; spec.num_tokens() * 8];
        let m = vit_model_proto(&w, &spec, &pos, None).unwrap();
        let g = m.graph.unwrap();
        assert_eq!(g.input[0].name, INPUT_NAME);
        assert_eq!(g.output.len(), 1);
        assert_eq!(g.output[0].name, FEATURES_NAME);
        let allowed = [
            "Conv",
            "Reshape",
            "Transpose",
            "Add",
            "LayerNormalization",
            "MatMul",
            "Softmax",
            "Mul",
            "Erf",
        ];
        assert!(g.node.iter().all(|n| allowed.contains(&n.op_type.as_str())));
        assert_eq!(m.opset_import[0].version, 17);
    }

    #[test]
    fn missing_and_misshaped_tensors_are_errors() {
        let spec = VitSpec::new(8, 1, 2, 4, 16, 1e-6, 8, 8);
        let mut w = tiny_weights(&spec);
        let pos = vec![0.0; spec.num_tokens() * 8];
        w.insert("blocks.0.attn.qkv.weight".into(), (vec![8, 8], vec![0.0; 64]));
        assert!(matches!(export_vit(&w, &spec, &pos, None), Err(ExportError::Shape { .. })));
        w.remove("blocks.0.attn.qkv.weight");
        assert_eq!(
            export_vit(&w, &spec, &pos, None),
            Err(ExportError::MissingTensor { name: "blocks.0.attn.qkv.weight".into() })
        );
        let w = tiny_weights(&spec);
        assert!(matches!(export_vit(&w, &spec, &pos[1..], None), Err(ExportError::Shape { .. })));
        let bad = VitSpec { img_h: 9, ..spec };
        assert!(matches!(export_vit(&w, &bad, &pos, None), Err(ExportError::Spec { .. })));
        assert!(matches!(
            export_vit(&w, &spec, &pos, Some(&HeadSpec::default())),
            Err(ExportError::MissingTensor { .. })
        ));
    }
}
