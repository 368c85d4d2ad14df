//! Allocation audit of the perception post-process (issue 6): a counting global allocator
//! around 100 frames of clustering + mean-shift refinement + segments + decoding + NMS +
//! tracking + wire-frame filling on a 14x14 grid (N = 196, D = 192, K = 64, C = 1, 28x28
//! detection maps). Every frame after the first must make zero allocations.
//!
//! `cargo test --release -p flsl-runtime --test perception_alloc -- --nocapture`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use flsl_runtime::perception::decode::HeadDims;
use flsl_runtime::perception::{
    BoxMap, FrameInput, LabelSource, Perception, PerceptionConfig, PerceptionDims,
};
use flsl_runtime::wire::Frame;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Only the audited thread counts: libtest's own threads (its "has been running for over
    /// 60 seconds" notice under qemu, say) allocate too.
    static AUDITED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn count() {
    if AUDITED.try_with(std::cell::Cell::get).unwrap_or(false) {
        ALLOCS.fetch_add(1, Relaxed);
    }
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
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

const D: usize = 192;

mod perception_fixture;
use perception_fixture::{GH, GW, HS, K, Synthetic, WS};

fn synthetic(frame: usize) -> Synthetic {
    perception_fixture::synthetic(frame, D)
}

#[test]
fn post_process_allocates_nothing_after_the_first_frame() {
    AUDITED.with(|a| a.set(true));
    let dims = PerceptionDims {
        gh: GH,
        gw: GW,
        d: D,
        k: K,
        patch_px: 16.0,
        head: Some(HeadDims::new(1, HS, WS, 8.0)),
    };
    let config = PerceptionConfig::DEFAULT;
    type P<'a> = Perception<'a, 64, 64, 32>;
    let sizes = P::scratch_sizes(&dims, &config).unwrap();
    let mut f32s = vec![0.0f32; sizes.f32s];
    let mut u32s = vec![0u32; sizes.u32s];
    let frames: Vec<Synthetic> = (0..100).map(synthetic).collect();
    let mut p = P::new(dims, config, &mut f32s, &mut u32s).unwrap();
    let mut wire = Frame::new();
    let map = BoxMap::normalized(224, 224);

    let mut per_frame = Vec::with_capacity(frames.len());
    let mut objects = 0usize;
    let mut segments = 0usize;
    for (i, s) in frames.iter().enumerate() {
        let labels = match i % 3 {
            0 => LabelSource::Logits(&s.logits),
            1 => LabelSource::Prototypes(&s.prototypes),
            _ => LabelSource::KMeans,
        };
        let input =
            FrameInput { features: &s.features, labels, detections: Some((&s.heatmap, &s.boxes)) };
        let before = ALLOCS.load(Relaxed);
        let report = p.process_frame(&input);
        let n = p.fill_frame(&map, &mut wire);
        let after = ALLOCS.load(Relaxed);
        let report = report.unwrap();
        per_frame.push(after - before);
        assert_eq!(report.detections, 3, "frame {i}: three objects");
        segments += report.segments.found;
        objects += n;
    }
    println!(
        "perception alloc audit: 100 frames, {} allocations in frame 1, {} in frames 2..100; \
         {segments} segments, {objects} tracked objects sent",
        per_frame[0],
        per_frame[1..].iter().sum::<u64>()
    );
    assert!(per_frame[1..].iter().all(|&a| a == 0), "allocations per frame: {per_frame:?}");
    // The counter does see allocations (so the zeros above are real).
    let before = ALLOCS.load(Relaxed);
    let v = std::hint::black_box(vec![0u8; 64]);
    assert!(ALLOCS.load(Relaxed) > before && v.len() == 64);
    // The work was real: three confirmed tracks with stable ids 1..=3 by the end.
    let mut ids: Vec<u32> = wire.objects.iter().map(|o| o.track_id).collect();
    ids.sort_unstable();
    assert_eq!(ids, [1, 2, 3]);
    assert!(segments >= 100 * 4);
}
