//! `flsl detect`'s loop end to end on a micro model with the FLSL head and a detection head:
//! frames from a folder, JSON lines with detections / tracks / segments, overlays, timings.

mod common;

use common::models::{frames, micro_model, tmp};
use flsl_runtime::detect::{DetectOptions, read_jsonl, run_detect};

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
    assert!(
        s.tracks > 0,
        "a detector firing on the same peaks confirms tracks after min_hits frames"
    );
    let lines = read_jsonl(&out_path).unwrap();
    assert_eq!(lines.len(), 6);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["frame"], i);
        assert_eq!(l["size"], serde_json::json!([120, 80]));
        let segs = l["segments"].as_array().unwrap();
        let area: u64 = segs.iter().map(|s| s["area_patches"].as_u64().unwrap()).sum();
        assert_eq!(area, 4 * 6, "segments tile the 4x6 patch grid");
        for d in l["detections"].as_array().unwrap() {
            let b: Vec<f64> =
                d["bbox"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            assert!(b.iter().all(|v| v.is_finite()) && b[2] >= b[0] && b[3] >= b[1]);
        }
        for k in ["decode", "preprocess", "model", "postprocess"] {
            assert!(l["ms"][k].as_f64().unwrap() >= 0.0);
        }
    }
    // Track ids, once given, stay the same for the static part of the scene.
    let ids = |l: &serde_json::Value| -> Vec<u64> {
        l["tracks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .filter(|&i| i > 0)
            .collect()
    };
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
    let e =
        run_detect(&DetectOptions::new(model.clone()), &dir.join("nope"), &mut Vec::new(), |_| {})
            .unwrap_err();
    assert!(format!("{e:#}").contains("nope"), "{e:#}");
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let e =
        run_detect(&DetectOptions::new(model.clone()), &dir.join("empty"), &mut Vec::new(), |_| {})
            .unwrap_err();
    assert!(format!("{e:#}").contains("no .png/.jpg frames"), "{e:#}");
    // A "video": without ffmpeg the error names the tool; with it, ffprobe rejects the file.
    let fake = dir.join("clip.avi");
    std::fs::write(&fake, b"not a video").unwrap();
    let e = format!(
        "{:#}",
        run_detect(&DetectOptions::new(model), &fake, &mut Vec::new(), |_| {}).unwrap_err()
    );
    assert!(e.contains("ffprobe") || e.contains("ffmpeg"), "{e}");
    assert!(e.contains("clip.avi"), "{e}");
}
