//! Shared helpers of the runtime's integration tests: the micro reference fixtures.
#![allow(dead_code)]

use std::path::PathBuf;

pub mod models;

use flsl_runtime::export::{HostTensors, host_tensors_from_safetensors};

/// `tests/fixtures/reference/micro` of the workspace (copied from the reference set).
pub fn micro_dir() -> PathBuf {
    std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../tests/fixtures/reference/micro")
}

/// Every F32 tensor of a safetensors file under `micro/`, keys prefixed with `prefix`.
pub fn load_safetensors(file: &str, prefix: &str) -> HostTensors {
    let path = micro_dir().join(file);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    host_tensors_from_safetensors(&bytes, prefix).expect("fixture should be valid safetensors")
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// A process-unique scratch directory under the system temp dir.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flsl-runtime-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir should be creatable");
    dir
}
