//! Malformed inputs give clear errors, never a panic.

use std::path::{Path, PathBuf};

use flsl_train::backend::{Cpu, cpu_device};
use flsl_train::checkpoint::{self, Part};
use flsl_train::model::VitConfig;
use flsl_train::reference;
use flsl_train::tensors::{self, HostTensor};

fn micro() -> PathBuf {
    std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("fixtures/reference/micro")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flsl-malformed-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn micro_config() -> VitConfig {
    VitConfig::new(64, 2, 2).with_img_size(64).with_mlp_ratio(2.0)
}

#[test]
fn the_micro_pth_loads_like_its_safetensors_twin() {
    let a =
        checkpoint::read_weights(&micro().join("vit_micro16_noclass_seed11.pth"), Part::Teacher)
            .unwrap();
    let b =
        tensors::read_safetensors(&micro().join("vit_micro16_noclass_seed11.safetensors")).unwrap();
    assert_eq!(a, b);
    let vit =
        checkpoint::load_vit(micro_config().init::<Cpu>(&cpu_device()), &a, Path::new("x.pth"));
    assert!(vit.is_ok());
}

#[test]
fn truncated_pth_is_a_clear_error() {
    let bytes = std::fs::read(micro().join("vit_micro16_noclass_seed11.pth")).unwrap();
    let d = tmp("pth");
    for cut in [10, bytes.len() / 2, bytes.len() - 30] {
        let p = d.join("cut.pth");
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let err =
            checkpoint::read_weights(&p, Part::Teacher).expect_err("truncated file must fail");
        let msg = err.to_string();
        assert!(msg.contains("cut.pth"), "error should name the file: {msg}");
    }
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let mut map =
        tensors::read_safetensors(&micro().join("vit_micro16_noclass_seed11.safetensors")).unwrap();
    map.remove("blocks.1.mlp.fc2.bias");
    let d = tmp("missing");
    let p = d.join("w.safetensors");
    tensors::write_safetensors(&p, &map, None).unwrap();
    let map = checkpoint::read_weights(&p, Part::Teacher).unwrap();
    let err = checkpoint::load_vit(micro_config().init::<Cpu>(&cpu_device()), &map, &p)
        .unwrap_err()
        .to_string();
    assert!(err.contains("blocks.1.mlp.fc2.bias") && err.contains("missing"), "{err}");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn wrongly_shaped_tensor_names_both_shapes() {
    let mut map =
        tensors::read_safetensors(&micro().join("vit_micro16_noclass_seed11.safetensors")).unwrap();
    map.insert(
        "blocks.0.attn.qkv.weight".into(),
        HostTensor::f32(vec![64, 64], vec![0.0; 64 * 64]),
    );
    let err = checkpoint::load_vit(
        micro_config().init::<Cpu>(&cpu_device()),
        &map,
        Path::new("w.safetensors"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("blocks.0.attn.qkv.weight"), "{err}");
    assert!(err.contains("[64, 64]") && err.contains("[192, 64]"), "{err}");
}

#[test]
fn garbage_weights_file_is_an_error() {
    let d = tmp("garbage");
    let p = d.join("g.safetensors");
    std::fs::write(&p, b"\xff\xff\xff\xff\xff\xff\xff\xffnot a header").unwrap();
    let err = checkpoint::read_weights(&p, Part::Teacher).unwrap_err().to_string();
    assert!(err.contains("g.safetensors"), "{err}");
    std::fs::write(&p, b"ab").unwrap();
    assert!(checkpoint::read_weights(&p, Part::Teacher).is_err());
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn unknown_case_kind_fails_the_check() {
    let d = tmp("kind");
    std::fs::write(d.join("index.json"), r#"{"cases": ["warp_drive_calibration"]}"#).unwrap();
    let results = reference::run_index(&d).unwrap();
    assert_eq!(results.len(), 1);
    let line = results[0].to_string();
    assert!(
        line.starts_with("FAIL warp_drive_calibration") && line.contains("unsupported case kind"),
        "{line}"
    );
    assert_eq!(reference::summarize(&results), (0, 1));
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn missing_index_is_an_error() {
    let d = tmp("noindex");
    let err = reference::run_index(&d).unwrap_err().to_string();
    assert!(err.contains("index.json"), "{err}");
    std::fs::remove_dir_all(d).unwrap();
}
