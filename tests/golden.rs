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

/// The checker is not a rubber stamp: a perturbed golden value makes its case fail.
#[test]
fn a_perturbed_golden_tensor_fails() {
    let dir = std::env::temp_dir().join(format!("flsl-golden-perturbed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["meanshift_intra_g6w2_fixed.json", "index.json"] {
        std::fs::copy(micro().join(f), dir.join(f)).unwrap();
    }
    let mut t = flsl_train::tensors::read_safetensors(
        &micro().join("meanshift_intra_g6w2_fixed.safetensors"),
    )
    .unwrap();
    if let Some(flsl_train::tensors::HostTensor {
        data: flsl_train::tensors::HostData::F32(v),
        ..
    }) = t.get_mut("mode")
    {
        v[3] += 1e-3;
    }
    flsl_train::tensors::write_safetensors(
        &dir.join("meanshift_intra_g6w2_fixed.safetensors"),
        &t,
        None,
    )
    .unwrap();
    let r = reference::run_case(&dir, "meanshift_intra_g6w2_fixed");
    std::fs::remove_dir_all(&dir).unwrap();
    let why = r.outcome.expect_err("a perturbed mode must fail");
    assert!(why.contains("mode[3]"), "{why}");
}
