//! ONNX files written by other tools (issue 23): `torch.onnx` (TorchScript and dynamo), timm,
//! transformers' DINOv2 with registers, onnxruntime's quantizers. Each runs in our engine
//! against the output PyTorch (or onnxruntime, for its int8 files) recorded, and each must
//! reach the fused paths our own export reaches: a rewrite that stops matching fails here,
//! not silently on a user's drone.
//!
//! The fixtures and their recorded outputs are made by `scripts/foreign_onnx_fixtures.py`
//! (small random-weight models: 64x64 input, patch 16, width 32, 2 heads, depth 2).

use std::path::PathBuf;

use flsl_runtime::npy::read_npy;
use flsl_runtime::onnx::{ModelOptions, OnnxModel};
use flsl_runtime::ops::FusionReport;

const DEPTH: usize = 2;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/foreign")
}

/// Loads fixture `name`, runs it on the recorded input, and returns the largest absolute
/// difference to the recorded output (raw output, every token) with the fusion report and
/// the model.
fn run(name: &str) -> (f32, FusionReport, OnnxModel) {
    let input = read_npy(&dir().join("input.npy")).unwrap();
    let reference = read_npy(&dir().join(format!("{name}.ref.npy"))).unwrap();
    let mut m =
        OnnxModel::load(&dir().join(format!("{name}.onnx")), ModelOptions::new().with_threads(1))
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
    m.run_tensor(&input.data).unwrap();
    let (shape, got) = m.output_f32("features").expect("a features output");
    assert_eq!(shape, reference.shape.as_slice(), "{name}: output shape");
    let worst = got.iter().zip(&reference.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let fusion = m.fusion().expect("the gemm engine reports its rewrites").clone();
    eprintln!("{name}: max abs {worst:.2e}; {fusion}");
    (worst, fusion, m)
}

/// Every block on our fused paths: the GELU in fc1, the softmax in the scores product, both
/// LayerNorms (and the final one) fused, the patch embedding ours, nothing left on tract's
/// generic path but `extra` (op name, count).
fn assert_fused(name: &str, f: &FusionReport, extra: &[(&str, usize)]) {
    assert_eq!(f.gelu_fused, DEPTH, "{name}: GELU fused into fc1 of every block: {f}");
    assert_eq!(f.softmax_fused, DEPTH, "{name}: softmax fused into the scores: {f}");
    assert_eq!(f.layer_norms, 2 * DEPTH + 1, "{name}: every LayerNorm fused: {f}");
    assert_eq!(f.patch_embeddings, 1, "{name}: patch embedding: {f}");
    // One transpose (`MoveAxis`) stays, as in our own export: the patch embedding's output
    // to tokens-major.
    let moves = f.generic.iter().find(|g| g.0 == "MoveAxis").map_or(0, |g| g.1);
    assert!(moves <= 1, "{name}: transposes left: {f}");
    let generic: Vec<(&str, usize)> =
        f.generic.iter().filter(|g| g.0 != "MoveAxis").map(|(n, c)| (n.as_str(), *c)).collect();
    assert_eq!(generic, extra, "{name}: nodes left on tract's generic path: {f}");
}

#[test]
fn torch_dynamo_opset17_gelu_and_scale_are_canonicalised() {
    // GELU as x*(0.5*(1+erf(x/sqrt2))) and the attention scale as a Mul after the scores.
    let (worst, f, _) = run("dynamo_opset17");
    assert!(worst < 1e-4, "{worst}");
    assert_eq!(f.gelu_rewritten, DEPTH, "{f}");
    assert_eq!(f.scales_folded, DEPTH, "{f}");
    assert_eq!(f.qkv_split, DEPTH, "one q/k/v product, Gather'ed: {f}");
    assert_fused("dynamo_opset17", &f, &[]);
}

#[test]
fn torchscript_opset17_runs_fused() {
    let (worst, f, _) = run("torchscript_opset17");
    assert!(worst < 1e-4, "{worst}");
    assert_eq!((f.scales_folded, f.qkv_split), (DEPTH, DEPTH), "{f}");
    assert_fused("torchscript_opset17", &f, &[]);
}

#[test]
fn torchscript_opset14_decomposed_layer_norm_and_class_token() {
    let (worst, f, m) = run("torchscript_opset14_cls");
    assert!(worst < 1e-4, "{worst}");
    assert_eq!((f.layer_norms_rewritten, f.qkv_split), (2 * DEPTH + 1, DEPTH), "{f}");
    assert_eq!(m.prefix_tokens(), 0, "the file slices the class token off itself");
    assert_fused("torchscript_opset14_cls", &f, &[]);
}

#[test]
fn torch_dynamo_sdpa_with_external_weights() {
    // Native Gelu (opset 20), SDPA's sqrt(scale) on q and on k, weights in a .onnx.data file.
    let (worst, f, _) = run("dynamo_opset20_sdpa_external");
    assert!(worst < 1e-4, "{worst}");
    assert_eq!(f.scales_folded, DEPTH, "{f}");
    // unbind(0) of the q/k/v product, written as Slice + Squeeze: split like the Gathers.
    assert_eq!(f.qkv_split, DEPTH, "{f}");
    assert_fused("dynamo_opset20_sdpa_external", &f, &[]);
}

#[test]
fn timm_class_token_is_recognised_and_skipped_in_the_patch_features() {
    let (worst, f, mut m) = run("timm_vit_cls");
    assert!(worst < 1e-4, "{worst}");
    assert_eq!(m.prefix_tokens(), 1);
    let input = read_npy(&dir().join("input.npy")).unwrap();
    let reference = read_npy(&dir().join("timm_vit_cls.ref.npy")).unwrap();
    let out = m.run_tensor(&input.data).unwrap();
    assert_eq!((out.features.tokens(), out.features.channels()), (16, 32));
    let worst =
        out.features.as_slice().iter().zip(&reference.data[32..]).map(|(a, b)| (a - b).abs());
    let worst = worst.fold(0f32, f32::max);
    assert!(worst < 1e-4, "the patch tokens, after the class token: {worst}");
    assert_fused("timm_vit_cls", &f, &[]);
}

#[test]
fn dinov2_with_registers_and_layer_scale() {
    let (worst, f, m) = run("dinov2_registers");
    assert!(worst < 1e-4, "{worst}");
    assert_eq!(m.prefix_tokens(), 5, "class token + 4 registers");
    // The layer scale after the attention projection and after fc2 is folded into their
    // weights, and the dynamo export's NaN guard after each softmax (`Where(IsNaN(p), 0, p)`)
    // into the scores product: every block fused.
    assert_eq!(f.columns_scaled, 2 * DEPTH, "{f}");
    assert_fused("dinov2_registers", &f, &[]);
}

/// The worst cosine between matching tokens (rows of `d` values) of `a` and `b`.
fn worst_token_cosine(a: &[f32], b: &[f32], d: usize) -> f64 {
    a.chunks_exact(d)
        .zip(b.chunks_exact(d))
        .map(|(x, y)| {
            let dot: f64 = x.iter().zip(y).map(|(p, q)| f64::from(*p) * f64::from(*q)).sum();
            let nx: f64 = x.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            let ny: f64 = y.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>().sqrt();
            dot / (nx * ny).max(1e-30)
        })
        .fold(1.0, f64::min)
}

#[test]
fn onnxruntime_dynamic_int8_runs_on_our_integer_kernels() {
    for name in ["ort_dynamic_int8", "ort_dynamic_int8_per_channel"] {
        // DynamicQuantizeLinear + MatMulInteger + Cast + Mul: the activation range is measured
        // per call as onnxruntime does, so the result is onnxruntime's up to float rounding.
        let (worst, f, _) = run(name);
        assert!(worst < 1e-3, "{name}: {worst}");
        // q/k/v as one layer in the file, three products here.
        assert_eq!((f.qdq_layers, f.int8_products), (4 * DEPTH, 6 * DEPTH), "{name}: {f}");
        assert_eq!(f.qkv_split, DEPTH, "{name}: {f}");
        assert_eq!(f.fake_quant_bypassed, 0, "{name}: {f}");
        assert_fused(name, &f, &[]);
    }
}

#[test]
fn onnxruntime_static_qdq_and_qoperator_run_on_our_integer_kernels() {
    // Linear layers (QDQ, or QLinearMatMul / QLinearConv) on the integer kernels; the file's
    // other quantized operations (product outputs, attention operands and products, softmax)
    // run in float: closer to the float model, within quantization noise of onnxruntime's own
    // int8 run.
    for name in ["ort_static_qdq", "ort_static_qoperator"] {
        let (_, f, mut m) = run(name);
        assert_eq!((f.int8_products, f.qkv_split), (6 * DEPTH, DEPTH), "{name}: {f}");
        assert_eq!(f.qdq_layers, 4 * DEPTH + 1, "{name}: the linears and the patch embedding: {f}");
        assert!(f.fake_quant_bypassed > 0, "{name}: {f}");
        assert_fused(name, &f, &[]);
        let input = read_npy(&dir().join("input.npy")).unwrap();
        let ours = m.run_tensor(&input.data).unwrap().features.as_slice().to_vec();
        let onnxruntime = read_npy(&dir().join(format!("{name}.ref.npy"))).unwrap().data;
        let float = read_npy(&dir().join("torchscript_opset17.ref.npy")).unwrap().data;
        let (vs_ort, vs_float) =
            (worst_token_cosine(&ours, &onnxruntime, 32), worst_token_cosine(&ours, &float, 32));
        let ort_vs_float = worst_token_cosine(&onnxruntime, &float, 32);
        eprintln!(
            "{name}: worst token cosine: ours vs onnxruntime {vs_ort:.5}, ours vs float {vs_float:.5}, onnxruntime vs float {ort_vs_float:.5}"
        );
        assert!(vs_ort >= 0.999, "{name}: {vs_ort}");
        assert!(
            vs_float >= ort_vs_float,
            "{name}: ours {vs_float} vs onnxruntime's {ort_vs_float}"
        );
    }
}

#[test]
fn external_weights_are_read_within_their_file_and_folder_only() {
    use flsl_runtime::onnx::inline_external_data;
    use prost::Message;
    let bytes = std::fs::read(dir().join("dynamo_opset20_sdpa_external.onnx")).unwrap();
    let proto = tract_onnx::pb::ModelProto::decode(&bytes[..]).unwrap();
    let external = |p: &tract_onnx::pb::ModelProto| {
        p.graph.as_ref().unwrap().initializer.iter().filter(|t| t.data_location == Some(1)).count()
    };
    assert!(external(&proto) > 0);
    let mut ok = proto.clone();
    let n = inline_external_data(&mut ok, &dir()).unwrap();
    assert_eq!((n, external(&ok)), (external(&proto), 0));
    // A location outside the model's folder, and a range past the end of the file.
    let edit = |key: &str, value: &str| {
        let mut p = proto.clone();
        let t = p
            .graph
            .as_mut()
            .unwrap()
            .initializer
            .iter_mut()
            .find(|t| t.data_location == Some(1))
            .unwrap();
        t.external_data.iter_mut().find(|e| e.key == key).unwrap().value = value.into();
        p
    };
    let err = inline_external_data(&mut edit("location", "../foreign/x.data"), &dir()).unwrap_err();
    assert!(err.reason.contains("relative path inside"), "{err}");
    let err = inline_external_data(&mut edit("offset", "999999999"), &dir()).unwrap_err();
    assert!(err.reason.contains("past the end"), "{err}");
}
