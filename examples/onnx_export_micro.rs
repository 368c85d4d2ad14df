//! Exports the reference micro ViT (+ its FLSL head) from the golden fixtures to ONNX, runs
//! it in tract and writes everything CI needs to check the same file in onnxruntime:
//!
//! ```text
//! cargo run --release -p flsl-examples --features onnx --example onnx_export_micro -- DIR
//! pip install onnxruntime numpy
//! python3 scripts/onnx_parity.py DIR/vit_micro_head.onnx DIR/input.npy DIR/ort.npy \
//!     --compare DIR/tract.npy --atol 1e-4          # onnxruntime vs tract, same file
//! python3 scripts/onnx_parity.py DIR/vit_micro_head.onnx DIR/input.npy DIR/ort.npy \
//!     --compare DIR/golden.npy --atol 1e-4         # onnxruntime vs the PyTorch reference
//! ```
//!
//! Files written to `DIR`: `vit_micro_head.onnx` (input `image [1,3,64,64]`, outputs
//! `features [1,16,64]` and `prototype_logits [1,16,128]`), `input.npy` (the golden
//! `vit_forward` case's first image), `golden.npy` (the reference features of that image),
//! `tract.npy` and `tract.prototype_logits.npy` (tract's outputs).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use flsl_runtime::bench::infer_npy;
use flsl_runtime::export::{
    HeadSpec, HostTensors, VitSpec, export_vit, host_tensors_from_safetensors,
};
use flsl_runtime::npy::{read_npy, write_npy};

fn micro_dir() -> PathBuf {
    std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../tests/fixtures/reference/micro")
}

/// Every F32 tensor of a safetensors file, keys prefixed with `prefix`.
fn load(path: &Path, prefix: &str) -> Result<HostTensors> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    host_tensors_from_safetensors(&bytes, prefix)
        .with_context(|| format!("parsing {}", path.display()))
}

fn main() -> Result<()> {
    let Some(dir) = std::env::args().nth(1).map(PathBuf::from) else {
        bail!("usage: onnx_export_micro DIR");
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let fixtures = micro_dir();
    let mut weights = load(&fixtures.join("vit_micro16_noclass_seed11.safetensors"), "")?;
    weights.extend(load(&fixtures.join("flsl_head_64_128_seed12.safetensors"), "head.")?);
    let case = load(&fixtures.join("vit_forward.safetensors"), "")?;

    let pos = weights["pos_embed"].1.clone();
    let bytes = export_vit(&weights, &VitSpec::micro(), &pos, Some(&HeadSpec::default()))?;
    let model = dir.join("vit_micro_head.onnx");
    std::fs::write(&model, bytes).with_context(|| format!("writing {}", model.display()))?;

    let input = dir.join("input.npy");
    write_npy(&input, &[1, 3, 64, 64], &case["x"].1[..3 * 64 * 64])?;
    write_npy(&dir.join("golden.npy"), &[1, 16, 64], &case["features"].1[..16 * 64])?;
    let written = infer_npy(&model, &input, &dir.join("tract.npy"), 1)?;

    let tract = read_npy(&written[0])?;
    let diff = tract
        .data
        .iter()
        .zip(&case["features"].1)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    println!("wrote {} and {} .npy files to {}", model.display(), written.len() + 2, dir.display());
    println!("tract vs PyTorch reference features: max abs diff {diff:.3e}");
    if diff > 1e-4 {
        bail!("tract's features differ from the reference by {diff} (> 1e-4)");
    }
    Ok(())
}
