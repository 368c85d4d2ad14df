//! Helpers shared by the end-to-end test files (each includes this folder with `mod common;`).

// Each test binary compiles this module on its own and uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use flsl_train::config::TrainConfig;

/// A temporary folder `flsl-<suite>-<pid>-<name>`, removed first if a previous run left it
/// (not created).
pub fn tmp(suite: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flsl-{suite}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A micro model on the `tiny` preset: `width` wide, `depth` blocks of `heads` heads, 8-pixel
/// patches, `k` prototypes, a head `head_hidden` wide with a 16-wide bottleneck, global crops of `global`
/// pixels and local crops of half that, sampling windows 2 (global) and 1 (local), 4 images per
/// step, reading `data` and writing `out`.
#[allow(clippy::too_many_arguments)]
pub fn micro_config(
    data: &Path,
    out: &Path,
    width: usize,
    depth: usize,
    heads: usize,
    k: usize,
    head_hidden: usize,
    global: u32,
) -> TrainConfig {
    let mut c = TrainConfig::tiny();
    c.embed_dim = width;
    c.depth = depth;
    c.num_heads = heads;
    c.patch_size = 8;
    c.out_dim = k;
    c.head_hidden_dim = head_hidden;
    c.head_bottleneck_dim = 16;
    c.batch_size_per_gpu = 4;
    c.augment.global_resize = global;
    c.augment.local_resize = global / 2;
    c.augment.sampling_window_size_g = 2;
    c.augment.sampling_window_size_l = 1;
    c.num_workers = 2;
    c.data_path = data.to_path_buf();
    c.output_dir = out.to_path_buf();
    c
}
