//! x86_64 flushes and non-temporal copies. clwb and clflushopt have no stable
//! intrinsics, so they are written as inline assembly.
use super::{FlushInsn, CACHE_LINE};
use core::arch::asm;
use core::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};

/// CPUID leaf 7 EBX bits for the flush instructions.
const CPUID7_EBX_CLFLUSHOPT: u32 = 1 << 23;
const CPUID7_EBX_CLWB: u32 = 1 << 24;

pub(super) fn detect() -> FlushInsn {
    // `is_x86_feature_detected!` does not know clwb/clflushopt, so ask CPUID. The
    // CPUID intrinsics were `unsafe fn`s before Rust 1.87 and are safe since, hence
    // the allow.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86_64 CPU and only reads identification data;
    // leaf 7 is queried only when leaf 0 says it exists.
    let ebx7 = unsafe {
        if core::arch::x86_64::__cpuid(0).eax >= 7 {
            core::arch::x86_64::__cpuid_count(7, 0).ebx
        } else {
            0
        }
    };
    if ebx7 & CPUID7_EBX_CLWB != 0 {
        FlushInsn::Clwb
    } else if ebx7 & CPUID7_EBX_CLFLUSHOPT != 0 {
        FlushInsn::Clflushopt
    } else {
        FlushInsn::Clflush
    }
}

/// Writes back every cache line overlapping `[p, p + len)`.
///
/// # Safety
/// The whole range must be mapped memory (a line-aligned start below `p` is in the
/// same page, hence mapped too).
pub(super) unsafe fn flush_lines(insn: FlushInsn, p: *mut u8, len: usize) {
    let end = p as usize + len;
    let mut line = p as usize & !(CACHE_LINE - 1);
    while line < end {
        let a = line as *const u8;
        match insn {
            // SAFETY: `a` is in a mapped page (caller contract); these instructions
            // only write the line back and cannot fault on mapped memory.
            FlushInsn::Clwb => unsafe {
                asm!("clwb [{}]", in(reg) a, options(nostack, preserves_flags))
            },
            // SAFETY: as above.
            FlushInsn::Clflushopt => unsafe {
                asm!("clflushopt [{}]", in(reg) a, options(nostack, preserves_flags))
            },
            // SAFETY: as above; `None` never reaches here on x86_64 but clflush is
            // a correct (slow) choice for it anyway.
            FlushInsn::Clflush | FlushInsn::None => unsafe {
                asm!("clflush [{}]", in(reg) a, options(nostack, preserves_flags))
            },
        }
        line += CACHE_LINE;
    }
}

/// Store fence: completes earlier clwb/clflushopt and non-temporal stores.
pub(super) fn sfence() {
    // SAFETY: sfence has no operands and no effect besides ordering stores.
    unsafe { asm!("sfence", options(nostack, preserves_flags)) }
}

/// Copies `len` bytes with non-temporal 16-byte stores for the 16-byte aligned body
/// and normal stores for the unaligned head and tail. Does not fence: Rust requires an
/// sfence after non-temporal stores before anything else touches the stored memory, so
/// the caller fences (`sfence`), possibly after more copies that one fence then covers.
///
/// # Safety
/// `src` must be readable and `dst` writable for `len` bytes; they must not overlap; the
/// caller fences before the destination is accessed again.
pub(super) unsafe fn copy_nt(dst: *mut u8, src: *const u8, len: usize) {
    let head = ((16 - (dst as usize & 15)) & 15).min(len);
    // SAFETY: caller guarantees both ranges; `head <= len`.
    unsafe { core::ptr::copy_nonoverlapping(src, dst, head) };
    let mut i = head;
    // SAFETY: `dst + i` is 16-byte aligned for every i in this block (it starts
    // aligned after the head and advances by multiples of 16), as `_mm_stream_si128`
    // requires; `i + 16 * k <= len` keeps loads and stores within the caller's ranges;
    // the loads are unaligned loads, valid for any `src` alignment.
    unsafe {
        while i + 64 <= len {
            let s = src.add(i) as *const __m128i;
            let d = dst.add(i) as *mut __m128i;
            let a = _mm_loadu_si128(s);
            let b = _mm_loadu_si128(s.add(1));
            let c = _mm_loadu_si128(s.add(2));
            let e = _mm_loadu_si128(s.add(3));
            _mm_stream_si128(d, a);
            _mm_stream_si128(d.add(1), b);
            _mm_stream_si128(d.add(2), c);
            _mm_stream_si128(d.add(3), e);
            i += 64;
        }
        while i + 16 <= len {
            let v = _mm_loadu_si128(src.add(i) as *const __m128i);
            _mm_stream_si128(dst.add(i) as *mut __m128i, v);
            i += 16;
        }
        core::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
    }
}
