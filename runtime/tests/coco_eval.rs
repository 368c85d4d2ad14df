//! COCO bbox evaluation against numbers recorded from pycocotools (`scripts/coco_fixtures.py`
//! writes `tests/fixtures/coco/<case>.{gt,dt,expected}.json`), malformed inputs, and
//! sensitivity checks that show the comparison can fail.

use std::path::{Path, PathBuf};

use flsl_runtime::eval::{
    CocoDet, CocoGt, CocoGtAnn, CocoStats, EvalError, evaluate, evaluate_files,
};
use serde_json::Value;

/// `runtime/tests/fixtures/coco`, resolved at run time (a shared target dir must not bake in
/// another checkout's path). `FLSL_COCO_FIXTURES=DIR` points the pycocotools comparison at
/// other recorded cases instead, e.g. `python3 scripts/coco_fixtures.py --fuzz 300 --out DIR`.
fn fixture_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLSL_COCO_FIXTURES") {
        return PathBuf::from(dir);
    }
    recorded_dir()
}

/// The committed fixtures (the tests that name a case use these even under
/// `FLSL_COCO_FIXTURES`).
fn recorded_dir() -> PathBuf {
    PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("tests/fixtures/coco")
}

fn cases() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixture_dir())
        .expect("fixture dir should exist")
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(".expected.json").map(str::to_owned)
        })
        .collect();
    names.sort();
    names
}

fn expected(case: &str) -> (CocoStats, Vec<String>) {
    expected_in(&recorded_dir(), case)
}

fn expected_in(dir: &Path, case: &str) -> (CocoStats, Vec<String>) {
    let path = dir.join(format!("{case}.expected.json"));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut s = [0.0; 12];
    for (slot, name) in s.iter_mut().zip(CocoStats::NAMES) {
        *slot = v["stats"][name].as_f64().unwrap_or_else(|| panic!("{case}: stats.{name}"));
    }
    let lines =
        v["summary"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_owned()).collect();
    (CocoStats::from_array(s), lines)
}

fn paths(case: &str) -> (PathBuf, PathBuf) {
    paths_in(&recorded_dir(), case)
}

fn paths_in(d: &Path, case: &str) -> (PathBuf, PathBuf) {
    (d.join(format!("{case}.gt.json")), d.join(format!("{case}.dt.json")))
}

fn max_diff(a: &CocoStats, b: &CocoStats) -> f64 {
    a.to_array().iter().zip(b.to_array()).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

#[test]
fn every_fixture_matches_pycocotools() {
    let dir = fixture_dir();
    let names = cases();
    assert!(
        names.len() >= 5,
        "expected at least the 5 recorded cases in {}, found {names:?}",
        dir.display()
    );
    let mut worst = 0.0f64;
    for case in &names {
        let (gt, dt) = paths_in(&dir, case);
        let got = evaluate_files(&gt, &dt).unwrap_or_else(|e| panic!("{case}: {e}"));
        let (want, lines) = expected_in(&dir, case);
        let d = max_diff(&got, &want);
        worst = worst.max(d);
        if names.len() <= 20 || d > 0.0 {
            println!("{case}: max |stat - pycocotools| = {d:.3e}");
            if d > 0.0 {
                println!("  rust   {:?}\n  python {:?}", got.to_array(), want.to_array());
            }
        }
        for (i, name) in CocoStats::NAMES.iter().enumerate() {
            let (g, w) = (got.to_array()[i], want.to_array()[i]);
            assert!((g - w).abs() <= 1e-4, "{case}: {name} = {g}, pycocotools {w}");
        }
        // Display prints what summarize() printed, line for line.
        let shown = got.to_string();
        let shown: Vec<&str> = shown.lines().collect();
        assert_eq!(shown, lines, "{case}: summary lines");
    }
    println!(
        "{} cases from {}: max |stat - pycocotools| = {worst:.3e}",
        names.len(),
        dir.display()
    );
}

#[test]
fn fixtures_cover_the_tricky_cases() {
    // -1 stats, crowd regions, >100 detections per image: the recorded truth must contain them.
    let (undef, _) = expected("undefined_stats");
    assert_eq!(undef.ap_small, -1.0);
    assert_eq!(undef.ar_large, -1.0);
    let gt: Value =
        serde_json::from_str(&std::fs::read_to_string(paths("multi_category").0).unwrap()).unwrap();
    assert!(gt["annotations"].as_array().unwrap().iter().any(|a| a["iscrowd"] == 1));
    let dets = CocoDet::load_all(&paths("many_dets").1).unwrap();
    assert!(dets.iter().filter(|d| d.image_id == 7).count() > 100);
}

#[test]
fn to_json_is_one_object_with_the_twelve_keys() {
    let (gt, dt) = paths("multi_category");
    let s = evaluate_files(&gt, &dt).unwrap();
    let v: Value = serde_json::from_str(&s.to_json()).unwrap();
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 12);
    for (name, x) in CocoStats::NAMES.iter().zip(s.to_array()) {
        assert_eq!(obj[*name].as_f64(), Some(x), "{name}");
    }
    let (u, _) = expected("undefined_stats");
    assert!(u.to_json().contains("\"APs\":-1.0"), "{}", u.to_json());
}

#[test]
fn perturbing_one_detection_changes_the_stats() {
    let (gt_path, dt_path) = paths("neon_trees");
    let gt = CocoGt::load(&gt_path).unwrap();
    let mut dets = CocoDet::load_all(&dt_path).unwrap();
    let (want, _) = expected("neon_trees");
    let base = evaluate(&gt, &dets).unwrap();
    assert!(max_diff(&base, &want) <= 1e-4);
    // Move the highest-scoring detection far from every tree: one true positive becomes a
    // false positive at the top of the ranking.
    let top = (0..dets.len()).max_by(|&a, &b| dets[a].score.total_cmp(&dets[b].score)).unwrap();
    dets[top].bbox[0] += 5000.0;
    let moved = evaluate(&gt, &dets).unwrap();
    assert!(max_diff(&moved, &want) > 1e-4, "moving a detection should change a stat");
    assert!(moved.ap50 < base.ap50, "AP50 {} -> {}", base.ap50, moved.ap50);
    // Swap the score of a false positive with the best one: ranking changes AP.
    let mut dets = CocoDet::load_all(&dt_path).unwrap();
    let last = dets.len() - 1; // the generator appends false positives last
    dets[last].score = 1.5;
    let reranked = evaluate(&gt, &dets).unwrap();
    assert!(max_diff(&reranked, &want) > 1e-4);
}

fn one_image_gt(anns: Vec<CocoGtAnn>) -> CocoGt {
    CocoGt { images: vec![1], categories: vec![1], annotations: anns }
}

fn gt_box(id: i64, bbox: [f64; 4]) -> CocoGtAnn {
    CocoGtAnn {
        id,
        image_id: 1,
        category_id: 1,
        bbox,
        area: bbox[2] * bbox[3],
        iscrowd: false,
        ignore: false,
    }
}

#[test]
fn hand_computed_cases() {
    // One medium box found exactly: every defined stat is 1, small/large are undefined.
    let gt = one_image_gt(vec![gt_box(1, [10.0, 10.0, 50.0, 50.0])]);
    let det = CocoDet { image_id: 1, category_id: 1, bbox: [10.0, 10.0, 50.0, 50.0], score: 0.9 };
    let s = evaluate(&gt, &[det]).unwrap();
    // Precision is tp / (tp + fp + eps) as in pycocotools, so 1 - 1.1e-16 rather than 1.
    assert_close(&s, [1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0, -1.0]);

    // IoU = 2000/3000 (shifted by a third of the width): matched at thresholds .5-.65
    // (4 of 10), so AP = AR = 0.4 and AP50 = 1, AP75 = 0.
    let det = CocoDet { bbox: [10.0 + 50.0 / 5.0, 10.0, 50.0, 50.0], ..det };
    let iou = (40.0 * 50.0) / (2.0 * 2500.0 - 40.0 * 50.0);
    assert!((iou - 2.0 / 3.0_f64).abs() < 1e-12);
    let s = evaluate(&gt, &[det]).unwrap();
    assert!((s.ap - 0.4).abs() < 1e-12, "{s}");
    assert!((s.ap50 - 1.0).abs() < 1e-12 && s.ap75 == 0.0, "{s}");
    assert!((s.ar100 - 0.4).abs() < 1e-12);

    // A false positive ranked above the hit: precision at every recall threshold is 1/2.
    let fp = CocoDet { bbox: [300.0, 300.0, 50.0, 50.0], score: 0.95, ..det };
    let hit = CocoDet { bbox: [10.0, 10.0, 50.0, 50.0], ..det };
    let s = evaluate(&gt, &[fp, hit]).unwrap();
    assert!((s.ap - 0.5).abs() < 1e-12, "{s}");
    assert_eq!(s.ar1, 0.0, "the top-1 detection is the false positive");
    assert_eq!(s.ar10, 1.0);

    // No detections at all (pycocotools crashes here): defined stats are 0.
    let s = evaluate(&gt, &[]).unwrap();
    assert_eq!(s.to_array(), [0.0, 0.0, 0.0, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0]);
}

fn assert_close(s: &CocoStats, want: [f64; 12]) {
    for ((name, g), w) in CocoStats::NAMES.iter().zip(s.to_array()).zip(want) {
        assert!((g - w).abs() < 1e-12, "{name} = {g}, want {w}");
    }
}

#[test]
fn ignore_flag_has_no_effect_as_in_pycocotools_but_iscrowd_does() {
    let det = CocoDet { image_id: 1, category_id: 1, bbox: [10.0, 10.0, 50.0, 50.0], score: 0.9 };
    let mut ann = gt_box(1, [10.0, 10.0, 50.0, 50.0]);
    let plain = evaluate(&one_image_gt(vec![ann.clone()]), &[det]).unwrap();
    ann.ignore = true;
    assert_eq!(evaluate(&one_image_gt(vec![ann.clone()]), &[det]).unwrap(), plain);
    ann.ignore = false;
    ann.iscrowd = true;
    let crowd = evaluate(&one_image_gt(vec![ann]), &[det]).unwrap();
    assert_eq!(crowd.ap, -1.0, "a lone crowd region leaves nothing to evaluate");
}

fn scratch(name: &str, content: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flsl-coco-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

const GT: &str = r#"{"images":[{"id":1},{"id":2}],"categories":[{"id":1}],
 "annotations":[{"id":1,"image_id":1,"category_id":1,"bbox":[0,0,10,10],"area":100,"iscrowd":0}]}"#;

fn err_text(gt: &Path, dt: &Path) -> (EvalError, String) {
    let e = evaluate_files(gt, dt).expect_err("should fail");
    let s = e.to_string();
    (e, s)
}

#[test]
fn malformed_inputs_give_clear_errors() {
    let gt = scratch("gt.json", GT);
    let ok_dt =
        scratch("ok.json", r#"[{"image_id":1,"category_id":1,"bbox":[0,0,10,10],"score":0.5}]"#);
    assert!(evaluate_files(&gt, &ok_dt).is_ok());

    // Unreadable file.
    let missing = gt.with_file_name("nope.json");
    let (e, s) = err_text(&missing, &ok_dt);
    assert!(matches!(e, EvalError::Io { .. }) && s.contains("nope.json"), "{s}");

    // Not JSON.
    let bad = scratch("bad.json", "[{\"image_id\": 1,");
    let (e, s) = err_text(&gt, &bad);
    assert!(matches!(e, EvalError::Json { .. }) && s.contains("bad.json"), "{s}");

    // Negative width.
    let neg = scratch(
        "neg.json",
        r#"[{"image_id":1,"category_id":1,"bbox":[0,0,10,10],"score":0.5},
        {"image_id":1,"category_id":1,"bbox":[0,0,-3,10],"score":0.5}]"#,
    );
    let (_, s) = err_text(&gt, &neg);
    assert!(s.contains("neg.json") && s.contains("[1].bbox") && s.contains("negative"), "{s}");

    // Unknown image id.
    let unk =
        scratch("unk.json", r#"[{"image_id":7,"category_id":1,"bbox":[0,0,10,10],"score":0.5}]"#);
    let (e, s) = err_text(&gt, &unk);
    assert!(
        matches!(e, EvalError::UnknownImage { index: 0, image_id: 7, .. })
            && s.contains("unk.json"),
        "{s}"
    );

    // Wrong types / missing fields, named by their JSON path.
    for (name, text, field) in [
        (
            "score.json",
            r#"[{"image_id":1,"category_id":1,"bbox":[0,0,1,1],"score":"high"}]"#,
            "[0].score",
        ),
        ("nobox.json", r#"[{"image_id":1,"category_id":1,"score":0.1}]"#, "[0].bbox"),
        (
            "short.json",
            r#"[{"image_id":1,"category_id":1,"bbox":[0,0,1],"score":0.1}]"#,
            "[0].bbox",
        ),
        (
            "strid.json",
            r#"[{"image_id":"a","category_id":1,"bbox":[0,0,1,1],"score":0.1}]"#,
            "[0].image_id",
        ),
        ("object.json", GT, "expected a JSON array of detections"),
    ] {
        let p = scratch(name, text);
        let (_, s) = err_text(&gt, &p);
        assert!(s.contains(field) && s.contains(name), "{name}: {s}");
    }
    for (name, text, field) in [
        (
            "gt_noarea.json",
            r#"{"images":[{"id":1}],"categories":[{"id":1}],"annotations":[{"id":1,"image_id":1,"category_id":1,"bbox":[0,0,1,1]}]}"#,
            "annotations[0].area",
        ),
        ("gt_noimages.json", r#"{"categories":[{"id":1}],"annotations":[]}"#, "images"),
        (
            "gt_dup.json",
            r#"{"images":[{"id":1}],"categories":[{"id":1}],"annotations":[{"id":1,"image_id":1,"category_id":1,"bbox":[0,0,1,1],"area":1},{"id":1,"image_id":1,"category_id":1,"bbox":[0,0,1,1],"area":1}]}"#,
            "annotations[1].id",
        ),
        (
            "gt_badimg.json",
            r#"{"images":[{"id":1}],"categories":[{"id":1}],"annotations":[{"id":1,"image_id":2,"category_id":1,"bbox":[0,0,1,1],"area":1}]}"#,
            "annotations[0].image_id",
        ),
        ("gt_array.json", "[]", "expected a COCO object"),
    ] {
        let p = scratch(name, text);
        let (_, s) = err_text(&p, &ok_dt);
        assert!(s.contains(field) && s.contains(name), "{name}: {s}");
    }

    // In-code data: negative height and unknown image are errors too.
    let g = CocoGt::load(&gt).unwrap();
    let d = CocoDet { image_id: 1, category_id: 1, bbox: [0.0, 0.0, 1.0, -1.0], score: 0.1 };
    assert!(evaluate(&g, &[d]).unwrap_err().to_string().contains("negative"));
    let d = CocoDet { image_id: 3, bbox: [0.0, 0.0, 1.0, 1.0], ..d };
    assert!(matches!(evaluate(&g, &[d]), Err(EvalError::UnknownImage { image_id: 3, .. })));
    // Unknown categories are dropped (as pycocotools) but can be counted.
    let d = CocoDet { image_id: 1, category_id: 5, ..d };
    assert_eq!(g.unknown_category_count(&[d]), 1);
    assert!(evaluate(&g, &[d]).is_ok());
}
