//! Heap accounting for `flsl-onboard`: a global allocator that forwards every call to the
//! system allocator and counts the bytes live and the allocations made.
//!
//! Resident memory (`VmRSS`) is what a companion computer runs out of, but it is a coarse leak
//! detector: glibc keeps freed memory in its arenas, raises its mmap threshold after a large
//! free, and the kernel may back the heap with 2 MB huge pages, so RSS can step up once without
//! any leak. The live-byte count here is exact: it returns to the same figure after every frame
//! when nothing leaks. The stats line prints both (`heap ... kB live, ... allocations/frame`),
//! and `scripts/soak.py` judges leaks on it.
//!
//! The binary installs it with `#[global_allocator]`; the cost is two relaxed atomic adds per
//! allocation. Where it is not installed, [`snapshot`] returns `None`.

// A `GlobalAlloc` implementation is unsafe by definition; each call only forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

static LIVE: AtomicU64 = AtomicU64::new(0);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

/// The counting allocator (see the module documentation).
pub struct CountingAlloc;

// SAFETY: every call forwards to `System` with the caller's arguments unchanged; the counters
// are side effects only.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as u64, Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // The old block is gone and the new one is live: one allocation, net size change.
            LIVE.fetch_add(new_size as u64, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size() as u64, Ordering::Relaxed);
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
}

/// The counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes allocated and not yet freed.
    pub live_bytes: u64,
    /// Allocations (and reallocations) since the process started.
    pub allocations: u64,
}

/// The counters now; `None` where [`CountingAlloc`] is not the global allocator (nothing has
/// gone through it, which no Rust program reaching its main loop manages).
pub fn snapshot() -> Option<HeapStats> {
    let allocations = ALLOCATIONS.load(Ordering::Relaxed);
    (allocations > 0).then(|| HeapStats { live_bytes: LIVE.load(Ordering::Relaxed), allocations })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The allocator itself, called directly (the test binary keeps the system allocator):
    /// an allocation, a growth and a free leave the live count where it started.
    #[test]
    fn counts_live_bytes_and_allocations() {
        let a = CountingAlloc;
        let before = (LIVE.load(Ordering::Relaxed), ALLOCATIONS.load(Ordering::Relaxed));
        let l = Layout::from_size_align(1000, 8).unwrap();
        // SAFETY: a non-zero layout; the pointer is freed with the layout it has.
        unsafe {
            let p = a.alloc(l);
            assert!(!p.is_null());
            assert_eq!(LIVE.load(Ordering::Relaxed), before.0 + 1000);
            let q = a.realloc(p, l, 5000);
            assert!(!q.is_null());
            assert_eq!(LIVE.load(Ordering::Relaxed), before.0 + 5000);
            a.dealloc(q, Layout::from_size_align(5000, 8).unwrap());
        }
        assert_eq!(LIVE.load(Ordering::Relaxed), before.0);
        assert_eq!(ALLOCATIONS.load(Ordering::Relaxed), before.1 + 2);
        assert!(snapshot().is_some());
    }
}
