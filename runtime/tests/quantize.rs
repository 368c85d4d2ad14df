//! Int8 quantization: parameter round trips, the micro ViT + head quantized in both formats
//! and run in tract against its fp32 outputs, and the error paths (corrupt or unsupported
//! models, empty or missing calibration folders, nothing written on failure).

mod common;

use std::path::{Path, PathBuf};

use common::load_safetensors;
use flsl_runtime::export::{HeadSpec, VitSpec, export_vit};
use flsl_runtime::onnx::{MatMulEngine, ModelOptions, OnnxModel};
use flsl_runtime::quantize::{
    Calibration, DetectionSet, QParams, QuantFormat, QuantizeError, QuantizeOptions, quantize_file,
    quantize_per_column,
};
use proptest::prelude::*;
use prost::Message;

/// Cosine the micro model's int8 features must reach vs fp32 (per token, mean over the
/// held-out images; the micro ViT has 2 blocks, 4 quantized matmuls each plus 3 in the head).
const MICRO_MIN_MEAN_COSINE: f64 = 0.99;
/// Worst single token.
const MICRO_MIN_WORST_COSINE: f64 = 0.95;

proptest! {
    #[test]
    fn asymmetric_round_trip_within_one_step(
        lo in -100.0f32..0.0,
        width in 1e-3f32..200.0,
        t in 0.0f32..=1.0,
    ) {
        let hi = lo + width;
        let p = QParams::asymmetric(lo, hi);
        let x = lo + t * (hi - lo);
        let err = (p.dequantize(p.quantize(x)) - x).abs();
        prop_assert!(err <= p.scale * 1.0001, "x {x} err {err} scale {}", p.scale);
    }

    #[test]
    fn symmetric_round_trip_within_half_a_step(
        amax in 1e-3f32..100.0,
        t in -1.0f32..=1.0,
    ) {
        let p = QParams::symmetric(-amax * 0.3, amax);
        prop_assert_eq!(p.zero_point, 0);
        let x = t * amax;
        let err = (p.dequantize(p.quantize(x)) - x).abs();
        prop_assert!(err <= p.scale * 0.5001, "x {x} err {err} scale {}", p.scale);
    }

    #[test]
    fn per_column_weights_round_trip_within_half_a_step(
        w in proptest::collection::vec(-3.0f32..3.0, 12),
    ) {
        let (q, s) = quantize_per_column(&w, 4, 3);
        prop_assert_eq!(s.len(), 3);
        for (i, (v, q)) in w.iter().zip(&q).enumerate() {
            let err = (f32::from(*q) * s[i % 3] - v).abs();
            prop_assert!(err <= s[i % 3] * 0.5001, "w {v} q {q} scale {}", s[i % 3]);
            prop_assert!(*q >= -127);
        }
    }
}

#[test]
fn out_of_range_values_saturate() {
    let p = QParams::asymmetric(-1.0, 1.0);
    assert_eq!(p.quantize(1e6), 127);
    assert_eq!(p.quantize(-1e6), -128);
    assert_eq!(p.quantize(0.0), p.zero_point);
}

/// A fresh, empty scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flsl-quantize-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("creating a scratch folder");
    d
}

/// The reference micro ViT (64x64) + FLSL head, as ONNX bytes.
fn micro_model() -> Vec<u8> {
    let mut w = load_safetensors("vit_micro16_noclass_seed11.safetensors", "");
    w.extend(load_safetensors("flsl_head_64_128_seed12.safetensors", "head."));
    let pos = w["pos_embed"].1.clone();
    export_vit(&w, &VitSpec::micro(), &pos, Some(&HeadSpec::default())).expect("micro export")
}

/// `n` smooth synthetic RGB images (gradients, blobs, noise) of varying sizes.
fn write_images(dir: &Path, n: usize, seed: u32) {
    for i in 0..n {
        let (w, h) = (48 + 16 * (i as u32 % 3), 40 + 24 * (i as u32 % 2));
        let s = seed.wrapping_mul(7919).wrapping_add(i as u32 * 104_729);
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let noise = |k: u32| {
                ((x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663) ^ s.wrapping_add(k))
                    .wrapping_mul(2_654_435_761)
                    >> 27) as u8
            };
            let cx = (x as f32 - w as f32 * (0.3 + 0.05 * (i % 5) as f32)).powi(2);
            let cy = (y as f32 - h as f32 * 0.5).powi(2);
            let blob = (200.0 * (-(cx + cy) / 300.0).exp()) as u8;
            image::Rgb([
                (x * 255 / w) as u8 / 2 + blob / 2 + noise(1),
                (y * 255 / h) as u8 / 2 + noise(2),
                ((s >> 3) as u8 % 128) + blob / 3 + noise(3),
            ])
        });
        img.save(dir.join(format!("img{i:03}.png"))).expect("writing a synthetic image");
    }
}

fn options(format: QuantFormat, heldout: &Path) -> QuantizeOptions {
    QuantizeOptions {
        format,
        calib_images: 16,
        heldout_dir: Some(heldout.to_path_buf()),
        heldout_images: 6,
        bench: None,
        quantize_head_output: true,
        // The counts below are of the linear layers; the Conv cases set it.
        quantize_conv: false,
        ..QuantizeOptions::default()
    }
}

/// Our engine's run of the QDQ file at `out` (integer ops) has the semantics of tract's own
/// run of the same graph (fake quantization: float products of the dequantized values), up
/// to float rounding; `what` names the integer op in the message.
fn assert_matches_fake_quantization(out: &Path, what: &str) {
    let input: Vec<f32> =
        (0..3 * 64 * 64).map(|i| ((i * 7919) % 1000) as f32 / 400.0 - 1.2).collect();
    let run = |engine| {
        let mut m = OnnxModel::load(out, ModelOptions::new().with_matmul(engine)).unwrap();
        m.run_tensor(&input).unwrap().features.as_slice().to_vec()
    };
    let (int8, fake) = (run(MatMulEngine::Gemm), run(MatMulEngine::Tract));
    let scale = fake.iter().fold(0f32, |a, v| a.max(v.abs()));
    let diff = int8.iter().zip(&fake).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
    assert!(
        diff <= 1e-3 * scale.max(1.0),
        "{what} vs tract's QDQ run: max abs diff {diff} (scale {scale})"
    );
}

#[test]
fn micro_model_quantized_runs_in_tract_close_to_fp32() {
    // `.ci/run` repeats this test per CPU class (FLSL_INT8_KERNEL=avx2, portable): the kernel
    // asked for must be the one that runs, not a silent fallback.
    if let Ok(k) = std::env::var("FLSL_INT8_KERNEL") {
        assert_eq!(flsl_runtime::ops::int8_matmul::Kernel::selected().name(), k);
    }
    let dir = scratch("micro");
    let (calib, heldout) = (dir.join("calib"), dir.join("heldout"));
    std::fs::create_dir_all(&calib).unwrap();
    std::fs::create_dir_all(&heldout).unwrap();
    write_images(&calib, 16, 1);
    write_images(&heldout, 6, 2);
    let fp32 = dir.join("micro.onnx");
    std::fs::write(&fp32, micro_model()).unwrap();
    // 2 blocks x (q, k, v, proj, fc1, fc2) + head (3 mlp linears + last layer).
    let weight_matmuls = 2 * 6 + 4;

    for (format, calibration) in [
        (QuantFormat::Tract, Calibration::Percentile(99.99)),
        (QuantFormat::Tract, Calibration::MinMax),
        (QuantFormat::Tract, Calibration::Mse),
        (QuantFormat::Qdq, Calibration::Percentile(99.99)),
    ] {
        let out = dir.join(format!("micro.{format:?}.{calibration:?}.onnx"));
        let opts = QuantizeOptions { calibration, ..options(format, &heldout) };
        let r = quantize_file(&fp32, &calib, &out, &opts, &mut |_| {})
            .unwrap_or_else(|e| panic!("{format:?} {calibration:?}: {e:#?}"));
        assert!(out.is_file());
        assert!(out.with_extension("quant.json").is_file());
        assert!(out.with_extension("quant.md").is_file());
        assert_eq!(r.quantized_layers, weight_matmuls, "{format:?}");
        assert_eq!(r.float_layers.len(), 1, "the patch-embedding Conv stays in float");
        let a = r.accuracy.as_ref().expect("held-out images were given");
        assert_eq!(a.images, 6);
        assert!(
            a.mean_token_cosine >= MICRO_MIN_MEAN_COSINE
                && a.worst_token_cosine >= MICRO_MIN_WORST_COSINE,
            "{format:?} {calibration:?}: {a:?}"
        );
        let agreement = a.assignment_agreement.expect("the micro model has a head");
        assert!(agreement >= 0.8, "{format:?} {calibration:?}: agreement {agreement}");
        match format {
            // Every weight matmul on an integer kernel; the attention's 2 per block in float.
            QuantFormat::Tract => {
                assert!(r.tract_ops.integer_matmuls >= weight_matmuls, "{:?}", r.tract_ops);
            }
            // QDQ: our engine lowers every weight matmul to the fused Int8MatMul.
            QuantFormat::Qdq => {
                let int8 = r.tract_ops.ops.iter().find(|o| o.0 == "Int8MatMul").map_or(0, |o| o.1);
                assert_eq!(int8, weight_matmuls, "{:?}", r.tract_ops);
                assert_eq!(r.tract_ops.integer_matmuls, weight_matmuls, "{:?}", r.tract_ops);
                assert_matches_fake_quantization(&out, "Int8MatMul");
            }
        }
        let model = flsl_runtime::quantize::read_model(&out).unwrap();
        let ops: Vec<&str> =
            model.graph.as_ref().unwrap().node.iter().map(|n| n.op_type.as_str()).collect();
        let count = |op: &str| ops.iter().filter(|o| **o == op).count();
        match format {
            QuantFormat::Tract => assert_eq!(count("QLinearMatMul"), weight_matmuls),
            QuantFormat::Qdq => {
                assert_eq!(count("QLinearMatMul"), 0);
                assert_eq!(count("MatMul"), weight_matmuls + 4);
                // one Q per distinct activation input, a DQ for it and one per weight
                assert!(count("DequantizeLinear") > weight_matmuls);
            }
        }
        assert!(r.size_int8_bytes * 2 < r.size_fp32_bytes, "{r:?}");
    }

    // The patch embedding can be quantized too.
    let out = dir.join("micro.conv.onnx");
    let opts = QuantizeOptions { quantize_conv: true, ..options(QuantFormat::Tract, &heldout) };
    let r = quantize_file(&fp32, &calib, &out, &opts, &mut |_| {}).expect("conv quantization");
    assert_eq!(r.quantized_layers, weight_matmuls + 1);
    assert!(r.float_layers.is_empty());
    let a = r.accuracy.unwrap();
    assert!(a.mean_token_cosine >= MICRO_MIN_MEAN_COSINE, "{a:?}");

    // QDQ with the patch embedding quantized: our engine runs it as an int8 PatchEmbed
    // (gather, quantize, integer product), equal to tract's fake-quantized QDQ run.
    let out = dir.join("micro.conv.qdq.onnx");
    let opts = QuantizeOptions { quantize_conv: true, ..options(QuantFormat::Qdq, &heldout) };
    let r = quantize_file(&fp32, &calib, &out, &opts, &mut |_| {}).expect("QDQ conv quantization");
    assert_eq!(r.quantized_layers, weight_matmuls + 1);
    assert_eq!(r.tract_ops.integer_matmuls, weight_matmuls + 1, "{:?}", r.tract_ops);
    assert!(r.tract_ops.ops.iter().any(|o| o.0 == "PatchEmbed"), "{:?}", r.tract_ops);
    assert_matches_fake_quantization(&out, "int8 PatchEmbed");

    // --float-ops: keep the head in float by node-name prefix.
    let opts =
        QuantizeOptions { float_ops: vec!["head".into()], ..options(QuantFormat::Tract, &heldout) };
    let r = quantize_file(&fp32, &calib, &dir.join("micro.nohead.onnx"), &opts, &mut |_| {})
        .expect("float head");
    assert_eq!(r.quantized_layers, 2 * 6);

    // The defaults keep the head's output layers (its last MLP linear and the prototypes) in
    // float and quantize its other two linears.
    let opts =
        QuantizeOptions { quantize_head_output: false, ..options(QuantFormat::Qdq, &heldout) };
    let r = quantize_file(&fp32, &calib, &dir.join("micro.default.onnx"), &opts, &mut |_| {})
        .expect("default head");
    assert_eq!(r.quantized_layers, 2 * 6 + 2);
    let kept = r.float_layers.join(" | ");
    assert!(
        kept.contains("head.mlp.4")
            && kept.contains("head/last_layer")
            && !kept.contains("head.mlp.2"),
        "{kept}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_and_unsupported_models_are_clear_errors() {
    let dir = scratch("bad-models");
    let calib = dir.join("calib");
    std::fs::create_dir_all(&calib).unwrap();
    write_images(&calib, 2, 3);
    let opts = QuantizeOptions { heldout_images: 0, bench: None, ..QuantizeOptions::default() };

    let corrupt = dir.join("corrupt.onnx");
    std::fs::write(&corrupt, b"\x08\x07this is not protobuf\xff\xff\xff").unwrap();
    let out = dir.join("corrupt.int8.onnx");
    let e = quantize_file(&corrupt, &calib, &out, &opts, &mut |_| {}).unwrap_err();
    assert!(matches!(e, QuantizeError::Decode { .. }), "{e:?}");
    assert!(e.to_string().contains("corrupt.onnx"), "{e}");
    assert!(!out.exists());

    // An op tract does not know, in the middle of the micro model.
    let mut m = tract_onnx::pb::ModelProto::decode(&micro_model()[..]).unwrap();
    let g = m.graph.as_mut().unwrap();
    let ix = g.node.iter().position(|n| n.op_type == "Softmax").unwrap();
    g.node[ix].op_type = "FancySoftmax".into();
    let name = g.node[ix].name.clone();
    let path = dir.join("unsupported.onnx");
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    let e = quantize_file(&path, &calib, &out, &opts, &mut |_| {}).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, QuantizeError::Unsupported { .. }), "{e:?}");
    assert!(msg.contains(&name) && msg.contains("FancySoftmax"), "{msg}");
    assert!(!out.exists());

    // An already-quantized model is refused, naming the node.
    let int8 = dir.join("int8.onnx");
    quantize_file(
        &{
            let p = dir.join("micro.onnx");
            std::fs::write(&p, micro_model()).unwrap();
            p
        },
        &calib,
        &int8,
        &opts,
        &mut |_| {},
    )
    .unwrap();
    let e = quantize_file(&int8, &calib, &out, &opts, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains("already quantized"), "{e}");
    assert!(e.to_string().contains("QuantizeLinear"), "{e}");

    // A weight MatMul with a float16 weight.
    let mut m = tract_onnx::pb::ModelProto::decode(&micro_model()[..]).unwrap();
    let g = m.graph.as_mut().unwrap();
    let mm =
        g.node.iter().find(|n| n.op_type == "MatMul" && n.name.contains("fc1")).unwrap().clone();
    let w = g.initializer.iter_mut().find(|t| t.name == mm.input[1]).unwrap();
    w.data_type = 10; // FLOAT16
    let path = dir.join("f16.onnx");
    std::fs::write(&path, m.encode_to_vec()).unwrap();
    let e = quantize_file(&path, &calib, &out, &opts, &mut |_| {}).unwrap_err();
    assert!(e.to_string().contains(&mm.name) && e.to_string().contains("MatMul"), "{e}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn empty_or_missing_calibration_folder_is_a_clear_error_and_writes_nothing() {
    let dir = scratch("calib-errors");
    let fp32 = dir.join("micro.onnx");
    std::fs::write(&fp32, micro_model()).unwrap();
    let out = dir.join("out.onnx");
    std::fs::write(&out, b"previous content").unwrap();
    let opts = QuantizeOptions { bench: None, ..QuantizeOptions::default() };

    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), b"not an image").unwrap();
    let e = quantize_file(&fp32, &empty, &out, &opts, &mut |_| {}).unwrap_err();
    assert!(matches!(e, QuantizeError::Calibration { .. }), "{e:?}");
    assert!(e.to_string().contains("empty") && e.to_string().contains("no .png"), "{e}");

    let missing = dir.join("does-not-exist");
    let e = quantize_file(&fp32, &missing, &out, &opts, &mut |_| {}).unwrap_err();
    assert!(matches!(e, QuantizeError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("does-not-exist"), "{e}");

    // An undecodable image fails calibration, naming the file.
    let broken = dir.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("a.png"), b"\x89PNG\r\n\x1a\nnope").unwrap();
    let e = quantize_file(&fp32, &broken, &out, &opts, &mut |_| {}).unwrap_err();
    assert!(matches!(e, QuantizeError::Image { .. }), "{e:?}");
    assert!(e.to_string().contains("a.png"), "{e}");

    assert_eq!(std::fs::read(&out).unwrap(), b"previous content");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A model with a detection head (the bundled tree detector): the report compares COCO AP of
/// fp32 and int8 on the labelled NEON images, and the int8 detector stays close.
#[test]
fn detection_head_gets_an_ap_comparison() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = root.join("examples/data/tree_detector.onnx");
    let images = root.join("data/neon-aerial-trees/images");
    let dir = scratch("det");
    let calib = dir.join("calib");
    std::fs::create_dir_all(&calib).unwrap();
    for f in ["SOAP_031.png", "SOAP_061.png", "AWPE_Pigeon_Lake_2020_DJI_0005.JPG"] {
        std::fs::copy(images.join(f), calib.join(f)).unwrap();
    }
    let out = dir.join("det.int8.onnx");
    let opts = QuantizeOptions {
        calib_images: 3,
        heldout_images: 0,
        bench: None,
        detection: Some(DetectionSet {
            gt: root.join("data/neon-aerial-trees/trees.coco.json"),
            images: images.clone(),
            score_threshold: 0.05,
        }),
        ..QuantizeOptions::default()
    };
    let r = quantize_file(&model, &calib, &out, &opts, &mut |_| {}).unwrap();
    let d = r.detection.clone().expect("the tree detector has a detection head");
    assert_eq!(d.images, 2, "OSBS_029 and the YELL crop are labelled");
    // fp32 finds crowns (AP50 > 0 on its training image and the held-out one), and int8
    // loses at most a tenth of it (absolute 0.02 for tiny APs).
    assert!(d.fp32[1] > 0.0, "{d:?}");
    assert!(d.int8[1] >= d.fp32[1] - (0.1 * d.fp32[1]).max(0.02), "{d:?}");
    assert!(flsl_runtime::quantize::report_markdown(&r).contains("detection (2 labelled images)"));
    let _ = std::fs::remove_dir_all(&dir);
}
