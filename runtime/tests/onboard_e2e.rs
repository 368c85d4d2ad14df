//! `flsl-onboard` end to end, as a user runs it: `write_bundle` (what `flsl bundle` calls) makes
//! a bundle of a micro model with a detection head, then the binary runs it on a folder of
//! frames and on raw frames piped into standard input, with JSON lines and a link recording out.
//! Malformed bundles, unreadable frames and truncated streams end in clear errors or counted
//! skips, never a panic.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::models::{frames, micro_model, tmp};
use flsl_runtime::detect::{DetectOptions, read_jsonl, run_detect};
use flsl_runtime::onboard::bundle::{BundleOptions, DetectionConfig, write_bundle};
use flsl_runtime::wire::{self, Body};

const BIN: &str = env!("CARGO_BIN_EXE_flsl-onboard");

fn bundle(dir: &Path) -> PathBuf {
    let model = micro_model(dir, true);
    let opts = BundleOptions {
        classes: vec!["tree".into(), "car".into()],
        detection: DetectionConfig { score_threshold: 0.0, ..DetectionConfig::default() },
        ..BundleOptions::default()
    };
    let out = dir.join("bundle");
    let b = write_bundle(&model, &out, &opts).unwrap();
    assert_eq!((b.config.input.height, b.config.input.width), (64, 96));
    assert_eq!(b.config.outputs, ["features", "prototype_logits", "det_heatmap", "det_boxes"]);
    out
}

fn onboard(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pipe = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        // A reader that stops early (an error) closes the pipe; that is not this test's failure.
        let _ = pipe.write_all(bytes);
    }
    drop(pipe);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "flsl-onboard panicked:\n{err}");
    out
}

/// The JSON lines without their timings.
fn strip_ms(lines: Vec<serde_json::Value>) -> Vec<serde_json::Value> {
    lines
        .into_iter()
        .map(|mut l| {
            l.as_object_mut().unwrap().remove("ms");
            l
        })
        .collect()
}

#[test]
fn onboard_on_a_frame_folder_equals_flsl_detect_and_records_the_link() {
    let dir = tmp("onboard-folder");
    let b = bundle(&dir);
    let input = frames(&dir, 5);
    let json = dir.join("out.jsonl");
    let link = dir.join("link.bin");
    let out = onboard(
        &[
            "--bundle",
            b.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
            "--link-file",
            link.to_str().unwrap(),
            "--stats-every",
            "2",
        ],
        None,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("bundle") && err.contains("verified"), "{err}");
    assert!(
        err.contains("skipped 1") && err.contains("broken.png"),
        "the unreadable frame is a counted skip:\n{err}"
    );
    assert_eq!(err.matches("stats: ").count(), 2, "{err}");
    let lines = strip_ms(read_jsonl(&json).unwrap());
    assert_eq!(lines.len(), 5);

    // Same frames through the host's `flsl detect` loop with the bundle's settings.
    let mut opts = DetectOptions::new(b.join("model.onnx"));
    opts.score_threshold = 0.0;
    let mut host = Vec::new();
    run_detect(&opts, &input, &mut host, |_| {}).unwrap();
    let host: Vec<serde_json::Value> = String::from_utf8(host)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines, strip_ms(host));

    // One wire frame per processed frame, in sequence, with the tracks' ids of the JSON lines.
    let mut bytes = std::fs::read(&link).unwrap();
    let chunks: Vec<&mut [u8]> = bytes.split_mut(|b| *b == 0).filter(|c| !c.is_empty()).collect();
    assert_eq!(chunks.len(), 5);
    for (i, chunk) in chunks.into_iter().enumerate() {
        let msg = wire::decode_chunk(chunk).unwrap();
        assert_eq!(msg.seq, i as u32);
        let Body::Frame(f) = msg.body else { panic!("{:?}", msg.body) };
        let confirmed: Vec<u64> = lines[i]["tracks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .filter(|&id| id != 0)
            .collect();
        let sent: Vec<u64> =
            f.objects.iter().map(|o| u64::from(o.track_id)).filter(|&id| id != 0).collect();
        assert_eq!(sent.len(), confirmed.len().min(wire::MAX_OBJECTS));
        assert!(sent.iter().all(|id| confirmed.contains(id)));
        assert!(f.objects.iter().all(|o| o.bbox.iter().all(|v| (0.0..=1.0).contains(v))));
    }
}

#[test]
fn onboard_reads_raw_frames_on_stdin_and_counts_a_truncated_tail() {
    let dir = tmp("onboard-stdin");
    let b = bundle(&dir);
    let (w, h) = (40usize, 30usize);
    let mut bytes: Vec<u8> = (0..3 * w * h * 3).map(|i| (i * 31 % 251) as u8).collect();
    bytes.extend_from_slice(&[7; 100]);
    let json = dir.join("stdin.jsonl");
    let out = onboard(
        &[
            "--bundle",
            b.to_str().unwrap(),
            "--input",
            "-",
            "--size",
            "40x30",
            "--frames",
            "all",
            "--json",
            json.to_str().unwrap(),
        ],
        Some(&bytes),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("ended inside frame 3 (100 of 3600 bytes"), "{err}");
    let lines = read_jsonl(&json).unwrap();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["source"], "stdin#000002");
    assert_eq!(lines[0]["size"], serde_json::json!([40, 30]));

    let out = onboard(&["--bundle", b.to_str().unwrap(), "--input", "-"], Some(&bytes));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--size"));
}

#[test]
fn malformed_bundles_are_refused_with_the_file_named() {
    let dir = tmp("onboard-bad");
    let b = bundle(&dir);
    let frames = frames(&dir, 1);
    let run = |bundle: &Path| {
        onboard(&["--bundle", bundle.to_str().unwrap(), "--input", frames.to_str().unwrap()], None)
    };

    let mut model = std::fs::read(b.join("model.onnx")).unwrap();
    let n = model.len();
    model[n / 2] ^= 0x55;
    std::fs::write(b.join("model.onnx"), &model).unwrap();
    let out = run(&b);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model.onnx does not match its SHA-256"), "{err}");

    // A model that passes its (recomputed) checksum but is not ONNX: tract's error, named.
    std::fs::write(b.join("model.onnx"), b"garbage").unwrap();
    let sums = std::fs::read_to_string(b.join("SHA256SUMS")).unwrap();
    let fixed: String = sums
        .lines()
        .map(|l| {
            if l.ends_with("model.onnx") {
                format!(
                    "{}  model.onnx\n",
                    flsl_runtime::onboard::bundle::sha256_file(&b.join("model.onnx")).unwrap()
                )
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(b.join("SHA256SUMS"), fixed).unwrap();
    let out = run(&b);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("model.onnx"));

    let out = run(&dir.join("no-bundle"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such folder"));
}
