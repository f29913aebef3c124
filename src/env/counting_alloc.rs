//! A global allocator that forwards to the system allocator and counts live heap
//! bytes, so benchmarks can measure DRAM cost (e.g. bytes per cached extent) exactly.
//! Install it with `#[global_allocator]` in a benchmark binary; never in the product.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering::Relaxed};

static LIVE: AtomicIsize = AtomicIsize::new(0);

/// The counting allocator.
pub struct CountingAlloc;

/// Heap bytes allocated and not yet freed (through `CountingAlloc`).
pub fn live_bytes() -> isize {
    LIVE.load(Relaxed)
}

// SAFETY: every call forwards to the system allocator with the caller's arguments
// unchanged; the only addition is a relaxed counter update.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Relaxed);
        // SAFETY: `p` was allocated by `System.alloc` with `l` (through `alloc` above).
        unsafe { System.dealloc(p, l) }
    }
}
