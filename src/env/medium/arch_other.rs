//! Portable fallback: no user-space cache-line flushes, so `Pmem` mode is never
//! chosen and durability comes from `msync` (File mode).
use super::FlushInsn;

pub(super) fn detect() -> FlushInsn {
    FlushInsn::None
}

/// Never called: `Pmem` mode is refused without a flush instruction.
///
/// # Safety
/// None required; present for signature parity with the x86_64 version.
pub(super) unsafe fn flush_lines(_insn: FlushInsn, _p: *mut u8, _len: usize) {}

pub(super) fn sfence() {
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
}

/// Plain copy: no portable non-temporal stores.
///
/// # Safety
/// `src` must be readable and `dst` writable for `len` bytes; they must not overlap.
pub(super) unsafe fn copy_nt(dst: *mut u8, src: *const u8, len: usize) {
    // SAFETY: forwarded caller contract.
    unsafe { core::ptr::copy_nonoverlapping(src, dst, len) }
}
