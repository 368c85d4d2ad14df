//! Every file reader of flsl as `fn(&[u8]) -> Result<(), String>`, shared by the bounded
//! in-CI run (`tests/readers_fuzz.rs`) and the cargo-fuzz targets (`fuzz/fuzz_targets/`).
//! `Ok` means the input was accepted; a reader must never panic, abort or allocate beyond the
//! bound [`Reader::bound`] states.

#![allow(dead_code)] // each fuzz target uses one reader

use std::path::{Path, PathBuf};

/// One reader: its entry point and its allocation bound.
pub struct Reader {
    /// Name (also the fuzz target's).
    pub name: &'static str,
    /// Parses the bytes.
    pub read: fn(&[u8]) -> Result<(), String>,
    /// Most bytes live at once while reading an input of `len` bytes, as the reader's docs
    /// state it: `per_byte * len + extra`.
    pub per_byte: u64,
    /// See `per_byte`.
    pub extra: u64,
}

impl Reader {
    /// The allocation bound for an input of `len` bytes.
    pub fn bound(&self, len: usize) -> u64 {
        self.per_byte.saturating_mul(len as u64).saturating_add(self.extra)
    }
}

const MIB: u64 = 1 << 20;

/// All readers.
pub fn all() -> Vec<Reader> {
    vec![
        // 16x the file for names + tensors (pth.rs OUTPUT_PER_INPUT_BYTE), the archive entries
        // (<= the file) and the view's index list (8 bytes per element).
        Reader { name: "pth", read: pth, per_byte: 64, extra: 8 * MIB },
        Reader { name: "safetensors", read: safetensors, per_byte: 8, extra: MIB },
        Reader { name: "npy_train", read: npy_train, per_byte: 4, extra: MIB },
        Reader { name: "npy_runtime", read: npy_runtime, per_byte: 4, extra: MIB },
        // prost's decoded message and tract's graph, plus tract's operator registry.
        Reader { name: "onnx", read: onnx, per_byte: 32, extra: 32 * MIB },
        // The decoder's cap (preprocess::image_limits: 1100 bytes per byte of the file + 1 MiB,
        // at most 512 MiB) plus the decoder's own working memory.
        Reader { name: "image", read: image, per_byte: 1100, extra: 8 * MIB },
        Reader { name: "coco", read: coco, per_byte: 64, extra: MIB },
        Reader { name: "coco_eval", read: coco_eval, per_byte: 64, extra: MIB },
        Reader { name: "voc", read: voc, per_byte: 16, extra: MIB },
        Reader { name: "visdrone", read: visdrone, per_byte: 16, extra: MIB },
        Reader { name: "train_config", read: train_config, per_byte: 64, extra: 4 * MIB },
        Reader { name: "bundle_config", read: bundle_config, per_byte: 64, extra: MIB },
        Reader { name: "bundle_sums", read: bundle_sums, per_byte: 8, extra: MIB },
    ]
}

fn text(b: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(b).map_err(|e| e.to_string())
}

/// The repository root (the annotation readers look for images next to the annotations).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn trees() -> PathBuf {
    repo().join("data/neon-aerial-trees")
}

pub fn pth(b: &[u8]) -> Result<(), String> {
    flsl_train::pth::parse_pth_bytes(b, Path::new("fuzz.pth")).map(drop).map_err(|e| e.to_string())
}

pub fn safetensors(b: &[u8]) -> Result<(), String> {
    flsl_train::tensors::parse_safetensors(b, Path::new("fuzz.safetensors"))
        .map(drop)
        .map_err(|e| e.to_string())
}

pub fn npy_train(b: &[u8]) -> Result<(), String> {
    flsl_train::tensors::parse_npy(b, Path::new("fuzz.npy")).map(drop).map_err(|e| e.to_string())
}

pub fn npy_runtime(b: &[u8]) -> Result<(), String> {
    flsl_runtime::npy::parse_npy(b).map(drop).map_err(|e| e.reason)
}

pub fn onnx(b: &[u8]) -> Result<(), String> {
    flsl_runtime::onnx::read_graph(b).map(drop).map_err(|e| e.to_string())
}

pub fn image(b: &[u8]) -> Result<(), String> {
    flsl_runtime::preprocess::decode_image_bytes(b).map(drop).map_err(|e| e.to_string())
}

pub fn coco(b: &[u8]) -> Result<(), String> {
    let anchor = trees().join("trees.coco.json");
    flsl_train::annotations::parse_coco(text(b)?, &anchor, Some(&trees().join("images")))
        .map(drop)
        .map_err(|e| e.to_string())
}

pub fn coco_eval(b: &[u8]) -> Result<(), String> {
    let v: serde_json::Value = serde_json::from_slice(b).map_err(|e| e.to_string())?;
    let gt = flsl_runtime::eval::coco::CocoGt::from_value(&v, None).map_err(|e| e.to_string())?;
    gt.validate().map_err(|e| e.to_string())
}

pub fn voc(b: &[u8]) -> Result<(), String> {
    let anchor = trees().join("annotations_voc/OSBS_029.xml");
    flsl_train::annotations::parse_voc(text(b)?, &anchor, Some(&trees().join("images")))
        .map(drop)
        .map_err(|e| e.to_string())
}

pub fn visdrone(b: &[u8]) -> Result<(), String> {
    let anchor = trees().join("annotations_visdrone_det/OSBS_029.txt");
    flsl_train::annotations::parse_visdrone(text(b)?, &anchor, Some(&trees().join("images")))
        .map(drop)
        .map_err(|e| e.to_string())
}

pub fn train_config(b: &[u8]) -> Result<(), String> {
    let cfg = flsl_train::config::TrainConfig::from_toml_str(text(b)?, None)
        .map_err(|e| e.to_string())?;
    cfg.validate().map_err(|e| e.to_string())
}

pub fn bundle_config(b: &[u8]) -> Result<(), String> {
    flsl_runtime::onboard::bundle::BundleConfig::parse(text(b)?).map(drop).map_err(|e| e.reason)
}

pub fn bundle_sums(b: &[u8]) -> Result<(), String> {
    flsl_runtime::onboard::bundle::parse_sums(text(b)?).map(drop)
}
