//! Every case of the micro golden set (copied from `../shared/reference/micro`) as a test.
//!
//! The fixtures were produced by calling the official FLSL PyTorch code; see
//! `fixtures/reference/micro/README.md`. Tolerances are the manifests' suggested ones.

use std::path::PathBuf;

use flsl_train::reference;

fn micro() -> PathBuf {
    std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("fixtures/reference/micro")
}

fn run(case: &str) {
    let r = reference::run_case(&micro(), case);
    assert!(r.outcome.is_ok(), "{r}");
}

macro_rules! golden {
    ($($name:ident),* $(,)?) => {
        $( #[test] fn $name() { run(stringify!($name)); } )*
        const CASES: &[&str] = &[$(stringify!($name)),*];
    };
}

golden!(
    flsl_head,
    flsl_loss_default,
    flsl_loss_no_vmr,
    flsl_loss_warmup_epoch7,
    meanshift_inter_g7w3_fixed,
    meanshift_inter_l6w2_random,
    meanshift_intra_g6w2_fixed,
    meanshift_intra_l7w3_random,
    pth_probe,
    sampling_masks,
    schedules,
    sincos_pos_embed,
    train_step_epoch0,
    vit_forward,
    vmr_prior,
    vmr_uniform,
);

/// No case of the index is left without a test, and the whole index passes.
#[test]
fn every_indexed_case_has_a_test_and_passes() {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(micro().join("index.json")).unwrap())
            .unwrap();
    let listed: Vec<&str> =
        index["cases"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    for c in &listed {
        assert!(CASES.contains(c), "case `{c}` of index.json has no test");
    }
    let results = reference::run_index(&micro()).unwrap();
    let (passed, failed) = reference::summarize(&results);
    assert_eq!((passed, failed), (listed.len(), 0));
}

/// Runs the micro case `meanshift_intra_g6w2_fixed` with its tensors edited by `edit`.
fn edited_meanshift_case(
    tag: &str,
    edit: impl FnOnce(&mut flsl_train::tensors::TensorMap),
) -> reference::CaseResult {
    let case = "meanshift_intra_g6w2_fixed";
    let dir = std::env::temp_dir().join(format!("flsl-golden-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in [format!("{case}.json"), "index.json".into()] {
        std::fs::copy(micro().join(&f), dir.join(&f)).unwrap();
    }
    let file = format!("{case}.safetensors");
    let mut t = flsl_train::tensors::read_safetensors(&micro().join(&file)).unwrap();
    edit(&mut t);
    flsl_train::tensors::write_safetensors(&dir.join(&file), &t, None).unwrap();
    let r = reference::run_case(&dir, case);
    std::fs::remove_dir_all(&dir).unwrap();
    r
}

/// Adds `delta` to element 3 of tensor `name` (f32 or f64).
fn nudge(t: &mut flsl_train::tensors::TensorMap, name: &str, delta: f64) {
    use flsl_train::tensors::HostData;
    match t.get_mut(name).map(|t| &mut t.data) {
        Some(HostData::F32(v)) => v[3] += delta as f32,
        Some(HostData::F64(v)) => v[3] += delta,
        _ => panic!("no float tensor `{name}`"),
    }
}

/// The checker is not a rubber stamp: a perturbed golden value makes its case fail. The
/// float32 reference and its float64 twin are perturbed alike: a wrong reference. (The float32
/// value alone perturbed passes: we are then within tolerance of the float64 result, which the
/// checker trusts over PyTorch's float32 rounding; see the next test.)
#[test]
fn a_perturbed_golden_tensor_fails() {
    let r = edited_meanshift_case("perturbed", |t| {
        nudge(t, "mode", 1e-3);
        nudge(t, "mode_f64", 1e-3);
    });
    let why = r.outcome.expect_err("a perturbed mode must fail");
    assert!(why.contains("mode[3]"), "{why}");
}

/// Where a case has a float64 twin, a float32 reference value that is off (PyTorch's rounding,
/// or here a perturbation) while ours matches the float64 result passes, and is counted.
#[test]
fn a_float32_reference_off_the_float64_result_is_judged_by_the_float64_one() {
    let r = edited_meanshift_case("f64", |t| nudge(t, "mode", 1e-3));
    let e = r.outcome.expect("ours matches the float64 result");
    assert_eq!(e.judged_by_f64, 1, "{e:?}");
    assert!(e.max_abs_f64 < 1e-6, "{e:?}");
}
