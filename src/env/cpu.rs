//! CPU helpers the runtimes use around engine calls: a cache prefetch hint.
//!
//! The engine has no `unsafe`, so it hands out addresses (`Engine::probe_addr`) and
//! the runtime issues the prefetch. A prefetch never faults and changes no memory, so
//! any address, even a dangling one, is harmless.

/// Asks the CPU to bring the cache line at `p` into all cache levels.
#[inline(always)]
pub fn prefetch(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it does not fault on any address and has no
    // architectural effect; SSE is part of the x86_64 baseline.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}
