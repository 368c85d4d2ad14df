//! Parity of the deployment path (issue 4) on the micro reference fixtures:
//! our ONNX export run in tract vs the reference PyTorch forward, and tract on the
//! reference's own PyTorch-exported ONNX file vs the PyTorch output.

mod common;

use common::{load_safetensors, max_abs_diff, micro_dir, scratch_dir};
use flsl_runtime::ModelError;
use flsl_runtime::bench::infer_npy;
use flsl_runtime::export::random_vit_weights;
use flsl_runtime::export::{HeadSpec, HostTensors, VitSpec, export_vit};
use flsl_runtime::npy::{read_npy, write_npy};
use flsl_runtime::onnx::{MatMulEngine, ModelOptions, OnnxModel};
use flsl_runtime::preprocess::{Normalization, Rgb8Frame, preprocess_rgb8};

/// The golden `vit_forward` case: inputs `x [2,3,64,64]`, outputs `features [2,16,64]`.
fn golden() -> (HostTensors, Vec<f32>, Vec<f32>) {
    let case = load_safetensors("vit_forward.safetensors", "");
    let x = case["x"].1.clone();
    let features = case["features"].1.clone();
    (load_safetensors("vit_micro16_noclass_seed11.safetensors", ""), x, features)
}

fn micro_export(weights: &HostTensors, head: Option<&HeadSpec>) -> Vec<u8> {
    let pos = &weights["pos_embed"].1; // [1, 16, 64]: the 64x64 input's own table
    export_vit(weights, &VitSpec::micro(), pos, head).expect("micro weights should export")
}

/// Exported micro ViT in tract vs the reference forward.
/// Tolerance 1e-4 (the bound); the reference's own f32-vs-f64 gap is ~3e-6.
#[test]
fn exported_micro_vit_matches_reference_features() {
    let (weights, x, features) = golden();
    let bytes = micro_export(&weights, None);
    let mut model = OnnxModel::from_bytes(&bytes, ModelOptions::new()).unwrap();
    assert_eq!(model.input_shape(), [1, 3, 64, 64]);
    assert!(!model.has_logits());
    let per_image = 3 * 64 * 64;
    let per_out = 16 * 64;
    for b in 0..2 {
        let out = model.run_tensor(&x[b * per_image..(b + 1) * per_image]).unwrap();
        assert_eq!((out.features.tokens(), out.features.channels()), (16, 64));
        let diff = max_abs_diff(out.features.as_slice(), &features[b * per_out..(b + 1) * per_out]);
        assert!(diff <= 1e-4, "image {b}: max abs diff {diff}");
    }
}

/// The same with two executor threads: tract splits work on row boundaries, so the result
/// stays within float rounding of the one-thread run.
#[test]
fn two_threads_match_one_thread() {
    let (weights, x, features) = golden();
    let bytes = micro_export(&weights, None);
    let mut model = OnnxModel::from_bytes(&bytes, ModelOptions::new().with_threads(2)).unwrap();
    let out = model.run_tensor(&x[..3 * 64 * 64]).unwrap();
    let diff = max_abs_diff(out.features.as_slice(), &features[..16 * 64]);
    assert!(diff <= 1e-4, "max abs diff {diff}");
}

/// Both matmul engines match the reference, and the default one really moved the
/// products to `gemm` (so that the parity above is the gemm path's parity).
#[test]
fn both_matmul_engines_match_reference() {
    let (weights, x, features) = golden();
    let bytes = micro_export(&weights, None);
    for engine in [MatMulEngine::Gemm, MatMulEngine::Tract] {
        let mut model =
            OnnxModel::from_bytes(&bytes, ModelOptions::new().with_matmul(engine)).unwrap();
        let ops: Vec<String> = model.plan_info().into_iter().map(|n| n.1).collect();
        let gemm_nodes = ops.iter().filter(|o| *o == "GemmMatMul").count();
        let tract_nodes = ops.iter().filter(|o| *o == "OptMatMul").count();
        let patch_nodes = ops.iter().filter(|o| *o == "PatchEmbed").count();
        match engine {
            // 2 blocks x (q, k, v, scores, context, projection, fc1, fc2), and the
            // patch-embedding Conv as one gather + gemm: nothing left for tract's matmul.
            MatMulEngine::Gemm => {
                assert!(gemm_nodes == 16 && tract_nodes == 0 && patch_nodes == 1, "{ops:?}")
            }
            MatMulEngine::Tract => assert_eq!(gemm_nodes, 0, "{ops:?}"),
        }
        let out = model.run_tensor(&x[..3 * 64 * 64]).unwrap();
        let diff = max_abs_diff(out.features.as_slice(), &features[..16 * 64]);
        assert!(diff <= 1e-4, "{engine:?}: max abs diff {diff}");
    }
}

/// ViT-Ti/16 at 224 (random weights): the gemm engine at 2 threads (its multithreaded
/// path: the products are above its threading threshold there), with the fused
/// LayerNorms, against tract's own kernels and LayerNorm expansion at 1 thread.
#[test]
fn gemm_engine_matches_tract_on_vit_tiny() {
    let spec = VitSpec::vit_tiny_p16(224, 224);
    let mut weights = random_vit_weights(&spec, 3);
    // Trained-like biases and LayerNorm affines (the random ones are 0 / 1, which tract
    // folds away): every linear layer then carries a bias into `GemmMatMul`.
    for (name, (_, values)) in weights.iter_mut() {
        if name.ends_with(".bias") || name.contains("norm") {
            for (i, v) in values.iter_mut().enumerate() {
                *v += ((i * 2654435761usize % 1000) as f32 / 1000.0 - 0.5) * 0.2;
            }
        }
    }
    let bytes = export_vit(&weights, &spec, &weights["pos_embed"].1, None).unwrap();
    let input: Vec<f32> =
        (0..3 * 224 * 224).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let mut reference =
        OnnxModel::from_bytes(&bytes, ModelOptions::new().with_matmul(MatMulEngine::Tract))
            .unwrap();
    let expected = reference.run_tensor(&input).unwrap().features.as_slice().to_vec();
    let mut model = OnnxModel::from_bytes(&bytes, ModelOptions::new().with_threads(2)).unwrap();
    // Every LayerNormalization (2 per block + the final one) runs as one fused op.
    let norms = model.plan_info().iter().filter(|n| n.1 == "FusedLayerNorm").count();
    assert_eq!(norms, 2 * 12 + 1);
    let got = model.run_tensor(&input).unwrap().features;
    assert_eq!((got.tokens(), got.channels()), (196, 192));
    let diff = max_abs_diff(got.as_slice(), &expected);
    assert!(diff <= 1e-4, "max abs diff {diff}");
}

/// Many tokens (a patch-8 ViT-Ti at 224: 784 tokens, 3 heads, 7.4 MB of scores per block):
/// the attention of every block runs as one `FusedAttention` (scores, softmax and context
/// per block of query rows) and matches tract's own kernels, on 1 and 2 threads.
#[test]
fn fused_attention_matches_tract_on_many_tokens() {
    let mut spec = VitSpec::vit_tiny_p16(224, 224);
    spec.patch_size = 8;
    spec.depth = 2;
    let weights = random_vit_weights(&spec, 5);
    let bytes = export_vit(&weights, &spec, &weights["pos_embed"].1, None).unwrap();
    let input: Vec<f32> =
        (0..3 * 224 * 224).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let mut reference =
        OnnxModel::from_bytes(&bytes, ModelOptions::new().with_matmul(MatMulEngine::Tract))
            .unwrap();
    let expected = reference.run_tensor(&input).unwrap().features.as_slice().to_vec();
    for threads in [1, 2] {
        let mut model =
            OnnxModel::from_bytes(&bytes, ModelOptions::new().with_threads(threads)).unwrap();
        let fused = model.plan_info().iter().filter(|n| n.1 == "FusedAttention").count();
        assert_eq!(fused, 2, "one fused attention per block");
        let got = model.run_tensor(&input).unwrap().features;
        assert_eq!((got.tokens(), got.channels()), (784, 192));
        let diff = max_abs_diff(got.as_slice(), &expected);
        assert!(diff <= 1e-4, "{threads} threads: max abs diff {diff}");
    }
}

fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x / std::f32::consts::SQRT_2))
}

/// Plain-Rust FLSL head (reference `FLSLhead`), on `[rows, in]` data.
fn naive_head(w: &HostTensors, pre: &str, x: &[f32], in_dim: usize) -> Vec<f32> {
    let linear = |x: &[f32], name: &str, din: usize| -> (Vec<f32>, usize) {
        let (shape, weight) = &w[&format!("{pre}{name}.weight")];
        let bias = &w[&format!("{pre}{name}.bias")].1;
        let dout = shape[0];
        let mut y = Vec::new();
        for row in x.chunks_exact(din) {
            for o in 0..dout {
                let wr = &weight[o * din..(o + 1) * din];
                y.push(row.iter().zip(wr).map(|(a, b)| a * b).sum::<f32>() + bias[o]);
            }
        }
        (y, dout)
    };
    let (h, d1) = linear(x, "mlp.0", in_dim);
    let h: Vec<f32> = h.into_iter().map(gelu).collect();
    let (h, d2) = linear(&h, "mlp.2", d1);
    let h: Vec<f32> = h.into_iter().map(gelu).collect();
    let (h, bn) = linear(&h, "mlp.4", d2);
    let (vshape, v) = &w[&format!("{pre}last_layer.weight_v")];
    let g = &w[&format!("{pre}last_layer.weight_g")].1;
    let k = vshape[0];
    let mut out = Vec::new();
    for row in h.chunks_exact(bn) {
        let n = row.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
        for i in 0..k {
            let vr = &v[i * bn..(i + 1) * bn];
            let vn = vr.iter().map(|a| a * a).sum::<f32>().sqrt();
            out.push(g[i] / vn * row.iter().zip(vr).map(|(a, b)| a / n * b).sum::<f32>());
        }
    }
    out
}

/// The plain-Rust head used below agrees with the reference `flsl_head` case.
#[test]
fn naive_head_matches_reference_head() {
    let w = load_safetensors("flsl_head_64_128_seed12.safetensors", "");
    let case = load_safetensors("flsl_head.safetensors", "");
    let out = naive_head(&w, "", &case["x"].1, 64);
    let diff = max_abs_diff(&out, &case["out"].1);
    assert!(diff <= 1e-5, "max abs diff {diff}");
}

/// Backbone + FLSL head exported together: `features` unchanged, `prototype_logits` equal
/// to the reference head applied to the features (atol 1e-4: two chained f32 paths).
#[test]
fn exported_head_gives_prototype_logits() {
    let (mut weights, x, features) = golden();
    weights.extend(load_safetensors("flsl_head_64_128_seed12.safetensors", "head."));
    let bytes = micro_export(&weights, Some(&HeadSpec::default()));
    let mut model = OnnxModel::from_bytes(&bytes, ModelOptions::new()).unwrap();
    assert!(model.has_logits());
    let out = model.run_tensor(&x[..3 * 64 * 64]).unwrap();
    let diff = max_abs_diff(out.features.as_slice(), &features[..16 * 64]);
    assert!(diff <= 1e-4, "features: max abs diff {diff}");
    let logits = out.logits.expect("head output");
    assert_eq!((logits.tokens(), logits.channels()), (16, 128));
    let want = naive_head(&weights, "head.", out.features.as_slice(), 64);
    let diff = max_abs_diff(logits.as_slice(), &want);
    assert!(diff <= 1e-4, "logits: max abs diff {diff}");
}

/// tract on the reference's PyTorch-exported micro ONNX file (input named `input`) vs the
/// recorded PyTorch output; atol 1e-5 (onnxruntime itself differs by 2.4e-6).
#[test]
fn tract_runs_pytorch_exported_micro_onnx() {
    let dir = micro_dir().join("onnx");
    let mut model =
        OnnxModel::load(&dir.join("vit_micro16_noclass_64.onnx"), ModelOptions::new()).unwrap();
    assert_eq!(model.input_shape(), [1, 3, 64, 64]);
    let input = read_npy(&dir.join("vit_micro16_noclass_64.input.npy")).unwrap();
    let want = read_npy(&dir.join("vit_micro16_noclass_64.torch_out.npy")).unwrap();
    assert_eq!(want.shape, [1, 16, 64]);
    let out = model.run_tensor(&input.data).unwrap();
    let diff = max_abs_diff(out.features.as_slice(), &want.data);
    assert!(diff <= 1e-5, "max abs diff {diff}");
}

/// `infer_npy` on an exported file: what CI then compares against onnxruntime
/// (`scripts/onnx_parity.py`).
#[test]
fn infer_npy_round_trip() {
    let (mut weights, x, features) = golden();
    weights.extend(load_safetensors("flsl_head_64_128_seed12.safetensors", "head."));
    let dir = scratch_dir("infer");
    let model = dir.join("micro_head.onnx");
    std::fs::write(&model, micro_export(&weights, Some(&HeadSpec::default()))).unwrap();
    let input = dir.join("x.npy");
    write_npy(&input, &[1, 3, 64, 64], &x[..3 * 64 * 64]).unwrap();
    let out = dir.join("features.npy");
    let written = infer_npy(&model, &input, &out, 1).unwrap();
    assert_eq!(written, [out.clone(), dir.join("features.prototype_logits.npy")]);
    let got = read_npy(&out).unwrap();
    assert_eq!(got.shape, [1, 16, 64]);
    assert!(max_abs_diff(&got.data, &features[..16 * 64]) <= 1e-4);
    assert_eq!(read_npy(&written[1]).unwrap().shape, [1, 16, 128]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `run_rgb8` equals preprocessing by hand and running the tensor.
#[test]
fn rgb8_frames_of_any_size_run() {
    let (weights, _, _) = golden();
    let bytes = micro_export(&weights, None);
    let mut model = OnnxModel::from_bytes(&bytes, ModelOptions::new()).unwrap();
    for (w, h) in [(64, 64), (100, 75), (33, 40)] {
        let frame: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
        let frame = Rgb8Frame::new(&frame, w, h).unwrap();
        let mut tensor = vec![0.0; 3 * 64 * 64];
        preprocess_rgb8(&frame, &Normalization::IMAGENET, &mut tensor, 64, 64).unwrap();
        let want = model.run_tensor(&tensor).unwrap().features.as_slice().to_vec();
        let got = model.run_rgb8(&frame).unwrap();
        assert_eq!(got.features.as_slice(), want.as_slice(), "{w}x{h}");
    }
}

/// Errors say what was being done, with the file, and keep tract's error as the source.
#[test]
fn errors_carry_context() {
    let missing = micro_dir().join("no_such_model.onnx");
    let err = OnnxModel::load(&missing, ModelOptions::new()).unwrap_err();
    assert!(matches!(err, ModelError::Load { .. }));
    assert!(err.to_string().contains("no_such_model.onnx"), "{err}");
    assert!(std::error::Error::source(&err).is_some());

    let err = OnnxModel::from_bytes(b"not an onnx file", ModelOptions::new()).unwrap_err();
    assert!(matches!(err, ModelError::Load { .. }), "{err}");

    let (weights, _, _) = golden();
    let bytes = micro_export(&weights, None);
    // The exported graph has a fixed 64x64 input; asking for 48x48 cannot type-check.
    let err =
        OnnxModel::from_bytes(&bytes, ModelOptions::new().with_input_size(48, 48)).unwrap_err();
    assert!(matches!(err, ModelError::Optimize { shape: [1, 3, 48, 48], .. }), "{err}");

    let mut model = OnnxModel::from_bytes(&bytes, ModelOptions::new()).unwrap();
    assert!(model.outputs().is_none());
    assert!(matches!(model.run_tensor(&[0.0; 7]), Err(ModelError::Mismatch { .. })));
}
