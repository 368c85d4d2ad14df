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
    // Transposes (`MoveAxis`) are copies the exporters place differently; they are listed in
    // the report but not held against the file here.
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
    assert_fused("dynamo_opset17", &f, &[]);
}

#[test]
fn torchscript_opset17_runs_fused() {
    let (worst, f, _) = run("torchscript_opset17");
    assert!(worst < 1e-4, "{worst}");
    assert_eq!(f.scales_folded, DEPTH, "{f}");
    assert_fused("torchscript_opset17", &f, &[]);
}

#[test]
fn torchscript_opset14_decomposed_layer_norm_and_class_token() {
    let (worst, f, m) = run("torchscript_opset14_cls");
    assert!(worst < 1e-4, "{worst}");
    assert_eq!(f.layer_norms_rewritten, 2 * DEPTH + 1, "{f}");
    assert_eq!(m.prefix_tokens(), 0, "the file slices the class token off itself");
    assert_fused("torchscript_opset14_cls", &f, &[]);
}

#[test]
fn torch_dynamo_sdpa_with_external_weights() {
    // Native Gelu (opset 20), SDPA's sqrt(scale) on q and on k, weights in a .onnx.data file.
    let (worst, f, _) = run("dynamo_opset20_sdpa_external");
    assert!(worst < 1e-4, "{worst}");
    assert_eq!(f.scales_folded, DEPTH, "{f}");
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
    // Recognised, not all fused: the layer scale stays a Mul after attention and MLP, and the
    // dynamo export's NaN guard after each softmax (`Where(IsNaN(p), 0, p)`) stays.
    assert_fused("dinov2_registers", &f, &[("Mul", 2 * DEPTH), ("Iff", DEPTH), ("IsNan", DEPTH)]);
}

