//! Allocation audit of the per-frame path (issue 4): a counting global allocator around
//! 100 frames through the micro model.
//!
//! Our preprocessing and output handling must not allocate at all; tract's run is counted
//! separately and reported (it allocates every node's output tensor on every run).
//! Run with `--nocapture` to see the report:
//! `cargo test -p flsl-runtime --test alloc_audit -- --nocapture`
//! (`FLSL_ALLOC_AUDIT_ONNX=model.onnx` adds an audit of that file).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use common::load_safetensors;
use flsl_runtime::export::{VitSpec, export_vit};
use flsl_runtime::onnx::{ModelOptions, NodePhase, OnnxModel};
use flsl_runtime::preprocess::{Rgb8Frame, preprocess_rgb8};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(new_size as u64, Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations and bytes made while `f` runs (other test threads may add to it, so this
/// binary holds a single test).
fn count<R>(f: impl FnOnce() -> R) -> (R, u64, u64) {
    let (a0, b0) = (ALLOCS.load(Relaxed), BYTES.load(Relaxed));
    let r = f();
    (r, ALLOCS.load(Relaxed) - a0, BYTES.load(Relaxed) - b0)
}

/// Per-frame allocation counts of one model: `(ours, ours_bytes, tract, tract_bytes)`
/// averaged over `frames`, plus a per-op breakdown of one more observed run.
fn audit(model: &mut OnnxModel, label: &str, frames: u64) -> (u64, u64, u64, u64) {
    let [_, _, mh, mw] = model.input_shape();
    // A camera-sized frame, resized to the model's input by the preprocessing.
    let (w, h) = (320, 240);
    let pixels: Vec<u8> = (0..w * h * 3).map(|i| (i * 31 % 256) as u8).collect();
    let frame = Rgb8Frame::new(&pixels, w, h).unwrap();
    let norm = model.options().normalization;
    // Warm-up: the first run creates tract's lazily built state (scratch spaces, caches).
    model.run_rgb8(&frame).unwrap();

    let (mut ours, mut ours_bytes, mut tract, mut tract_bytes) = (0, 0, 0, 0);
    let mut checksum = 0.0f32;
    for _ in 0..frames {
        let (r, a, b) = count(|| {
            let input = model.input_mut()?;
            preprocess_rgb8(&frame, &norm, input, mh, mw)
        });
        r.unwrap();
        (ours, ours_bytes) = (ours + a, ours_bytes + b);

        let (r, a, b) = count(|| model.run());
        r.unwrap();
        (tract, tract_bytes) = (tract + a, tract_bytes + b);

        let (s, a, b) = count(|| {
            let out = model.outputs().expect("outputs after a run");
            out.features.rows().map(|r| r[0]).sum::<f32>()
        });
        checksum += s;
        (ours, ours_bytes) = (ours + a, ours_bytes + b);
    }
    assert!(checksum.is_finite());
    println!(
        "alloc audit, {label}, {frames} frames of {w}x{h} RGB8 -> {mh}x{mw}:\n  \
         preprocessing + output views: {} allocations, {} bytes per frame\n  \
         tract run (reused plan, state and input tensor): {} allocations, {} bytes per frame",
        ours / frames,
        ours_bytes / frames,
        tract / frames,
        tract_bytes / frames,
    );

    // Where tract's allocations come from: one observed run, attributed per op kind.
    let mut by_op: Vec<(String, u64, u64)> = Vec::with_capacity(64);
    let mut at = (0, 0);
    let (r, total, total_bytes) = count(|| {
        model.run_observed(|phase, _, _, op| match phase {
            NodePhase::Before => at = (ALLOCS.load(Relaxed), BYTES.load(Relaxed)),
            NodePhase::After => {
                let (a, b) = (ALLOCS.load(Relaxed) - at.0, BYTES.load(Relaxed) - at.1);
                match by_op.iter_mut().find(|e| e.0 == op) {
                    Some(e) => (e.1, e.2) = (e.1 + a, e.2 + b),
                    None => by_op.push((op.to_string(), a, b)),
                }
            }
        })
    });
    r.unwrap();
    by_op.sort_by_key(|e| std::cmp::Reverse(e.2));
    println!(
        "  one observed run: {total} allocations, {total_bytes} bytes (hook bookkeeping included); by op:"
    );
    for (op, a, b) in &by_op {
        println!("    {op:<28} {a:>5} allocations {b:>10} bytes");
    }
    (ours, ours_bytes, tract, tract_bytes)
}

#[test]
fn per_frame_allocations() {
    let weights = load_safetensors("vit_micro16_noclass_seed11.safetensors", "");
    let bytes = export_vit(&weights, &VitSpec::micro(), &weights["pos_embed"].1, None).unwrap();
    let mut model = OnnxModel::from_bytes(&bytes, ModelOptions::new()).unwrap();
    let (ours, ours_bytes, tract, _) = audit(&mut model, "micro ViT (64x64, 2 blocks)", 100);
    assert_eq!((ours, ours_bytes), (0, 0), "preprocessing or output handling allocated");
    assert!(tract > 0, "the counter should see tract's allocations");

    // Optional, slow: the same audit on any ONNX image model, for example a ViT-S/16
    // export: FLSL_ALLOC_AUDIT_ONNX=/path/model.onnx.
    if let Some(path) = std::env::var_os("FLSL_ALLOC_AUDIT_ONNX") {
        let path = std::path::PathBuf::from(path);
        let mut model = OnnxModel::load(&path, ModelOptions::new()).unwrap();
        let (ours, ours_bytes, _, _) = audit(&mut model, &path.display().to_string(), 5);
        assert_eq!((ours, ours_bytes), (0, 0), "preprocessing or output handling allocated");
    }
}
