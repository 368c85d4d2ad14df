//! `flsl detect`'s loop end to end on a micro model with the FLSL head and a detection head:
//! frames from a folder, JSON lines with detections / tracks / segments, overlays, timings.

use std::path::PathBuf;

use flsl_runtime::detect::{DetectOptions, read_jsonl, run_detect};
use flsl_runtime::export::{HeadSpec, HostTensors, VitSpec, random_vit_weights, vit_model_proto};
use flsl_runtime::export_det::append_det_head;
use prost::Message;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flsl-detect-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Seeded pseudo-random weights for the detection head (`det.*`).
fn det_weights(d: usize, hidden: usize, classes: usize) -> HostTensors {
    let mut w = HostTensors::new();
    let mut s = 12345u64;
    let mut put = |name: &str, shape: Vec<usize>, scale: f32| {
        let n = shape.iter().product();
        let v = (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect();
        w.insert(name.to_string(), (shape, v));
    };
    put("det.up.weight", vec![d, hidden, 2, 2], 0.3);
    put("det.up.bias", vec![hidden], 0.1);
    put("det.conv.weight", vec![hidden, hidden, 3, 3], 0.3);
    put("det.conv.bias", vec![hidden], 0.1);
    put("det.heat.weight", vec![classes, hidden, 1, 1], 1.0);
    put("det.heat.bias", vec![classes], 0.5);
    put("det.offset.weight", vec![2, hidden, 1, 1], 0.3);
    put("det.offset.bias", vec![2], 0.0);
    put("det.size.weight", vec![2, hidden, 1, 1], 0.3);
    put("det.size.bias", vec![2], 0.5);
    w
}

fn micro_model(dir: &std::path::Path, with_det: bool) -> PathBuf {
    let spec = VitSpec::new(32, 1, 2, 16, 64, 1e-6, 64, 96);
    let mut w = random_vit_weights(&spec, 1);
    // A small FLSL head: 32 -> 48 -> 48 -> 16, then 24 prototypes.
    let mut put = |k: &str, shape: Vec<usize>| {
        let n: usize = shape.iter().product();
        w.insert(k.to_string(), (shape, (0..n).map(|i| ((i * 7919 % 997) as f32 / 997.0 - 0.5) * 0.2).collect()));
    };
    put("head.mlp.0.weight", vec![48, 32]);
    put("head.mlp.0.bias", vec![48]);
    put("head.mlp.2.weight", vec![48, 48]);
    put("head.mlp.2.bias", vec![48]);
    put("head.mlp.4.weight", vec![16, 48]);
    put("head.mlp.4.bias", vec![16]);
    put("head.last_layer.weight", vec![24, 16]);
    let (gh, gw) = spec.grid();
    let pos = vec![0.01; gh * gw * 32];
    let mut proto = vit_model_proto(&w, &spec, &pos, Some(&HeadSpec::default())).unwrap();
    if with_det {
        append_det_head(&mut proto, &spec, &det_weights(32, 8, 2)).unwrap();
    }
    let path = dir.join(if with_det { "det.onnx" } else { "plain.onnx" });
    std::fs::write(&path, proto.encode_to_vec()).unwrap();
    path
}

fn frames(dir: &std::path::Path, n: usize) -> PathBuf {
    let f = dir.join("frames");
    std::fs::create_dir_all(&f).unwrap();
    for i in 0..n {
        let img = image::RgbImage::from_fn(120, 80, |x, y| {
            let inside = (x as i64 - 40 - 4 * i as i64).abs() < 15 && (y as i64 - 40).abs() < 12;
            image::Rgb(if inside { [220, 40, 30] } else { [30, (x % 200) as u8, 90] })
        });
        img.save(f.join(format!("{i:04}.png"))).unwrap();
    }
    std::fs::write(f.join("broken.png"), b"not a png").unwrap();
    f
}

#[test]
fn detect_writes_one_json_line_per_frame_with_tracks_segments_and_timings() {
    let dir = tmp("e2e");
    let model = micro_model(&dir, true);
    let input = frames(&dir, 6);
    let mut opts = DetectOptions::new(model);
    opts.score_threshold = 0.0; // every peak of the random head is a detection
    opts.overlays = Some(dir.join("overlays"));
    let out_path = dir.join("out.jsonl");
    let mut out = std::fs::File::create(&out_path).unwrap();
    let mut seen = 0;
    let s = run_detect(&opts, &input, &mut out, |n| seen = n).unwrap();
    drop(out);
    assert_eq!(s.frames, 6, "the unreadable frame is skipped, the 6 good ones are processed");
    assert_eq!(seen, 6);
    assert_eq!(s.input_shape, [1, 3, 64, 96]);
    assert_eq!(s.outputs, ["features", "prototype_logits", "det_heatmap", "det_boxes"]);
    assert!(s.detections > 0);
    assert!(s.tracks > 0, "a detector firing on the same peaks confirms tracks after min_hits frames");
    let lines = read_jsonl(&out_path).unwrap();
    assert_eq!(lines.len(), 6);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["frame"], i);
        assert_eq!(l["size"], serde_json::json!([120, 80]));
        let segs = l["segments"].as_array().unwrap();
        let area: u64 = segs.iter().map(|s| s["area_patches"].as_u64().unwrap()).sum();
        assert_eq!(area, 4 * 6, "segments tile the 4x6 patch grid");
        for d in l["detections"].as_array().unwrap() {
            let b: Vec<f64> = d["bbox"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert!(b.iter().all(|v| v.is_finite()) && b[2] >= b[0] && b[3] >= b[1]);
        }
        for k in ["decode", "preprocess", "model", "postprocess"] {
            assert!(l["ms"][k].as_f64().unwrap() >= 0.0);
        }
    }
    // Track ids, once given, stay the same for the static part of the scene.
    let ids = |l: &serde_json::Value| -> Vec<u64> { l["tracks"].as_array().unwrap().iter().map(|t| t["id"].as_u64().unwrap()).filter(|&i| i > 0).collect() };
    let (a, b) = (ids(&lines[4]), ids(&lines[5]));
    assert!(!a.is_empty() && a.iter().any(|i| b.contains(i)), "{a:?} vs {b:?}");
    assert_eq!(std::fs::read_dir(dir.join("overlays")).unwrap().count(), 6);
    assert!(s.render().contains("frames/s"));
}

#[test]
fn a_model_without_a_detection_head_still_clusters_and_segments() {
    let dir = tmp("plain");
    let model = micro_model(&dir, false);
    let input = frames(&dir, 2);
    let mut out = Vec::new();
    let s = run_detect(&DetectOptions::new(model), &input, &mut out, |_| {}).unwrap();
    assert_eq!((s.frames, s.detections, s.tracks), (2, 0, 0));
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(text.contains("\"segments\":[{"));
}

#[test]
fn missing_inputs_and_tools_are_named() {
    let dir = tmp("errors");
    let model = micro_model(&dir, false);
    let e = run_detect(&DetectOptions::new(model.clone()), &dir.join("nope"), &mut Vec::new(), |_| {}).unwrap_err();
    assert!(format!("{e:#}").contains("nope"), "{e:#}");
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let e = run_detect(&DetectOptions::new(model.clone()), &dir.join("empty"), &mut Vec::new(), |_| {}).unwrap_err();
    assert!(format!("{e:#}").contains("no .png/.jpg frames"), "{e:#}");
    // A "video": without ffmpeg the error names the tool; with it, ffprobe rejects the file.
    let fake = dir.join("clip.avi");
    std::fs::write(&fake, b"not a video").unwrap();
    let e = format!("{:#}", run_detect(&DetectOptions::new(model), &fake, &mut Vec::new(), |_| {}).unwrap_err());
    assert!(e.contains("ffprobe") || e.contains("ffmpeg"), "{e}");
    assert!(e.contains("clip.avi"), "{e}");
}
