//! x86_64 flushes and non-temporal copies. clwb and clflushopt have no stable
//! intrinsics, so they are written as inline assembly.
use super::{FlushInsn, CACHE_LINE};
use core::arch::asm;
use core::arch::x86_64::{
    __m128i, __m256i, _mm256_loadu_si256, _mm256_stream_si256, _mm_loadu_si128, _mm_stream_si128,
};

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

/// Copies `len` bytes with non-temporal stores for the aligned body (32-byte AVX2
/// stores where the CPU has them, else 16-byte SSE2 ones) and normal stores for the
/// unaligned head and tail. Does not fence: Rust requires an sfence after
/// non-temporal stores before anything else touches the stored memory, so the caller
/// fences (`sfence`), possibly after more copies that one fence then covers.
///
/// The AVX2 form streams a 4 KiB block about 8% faster on this project's test machines
/// (a microbenchmark of 4 KiB copies to random offsets of a 512 MiB /dev/shm mapping:
/// 290 ns against 314 ns with one fence per 32 copies); the copy is a quarter of a
/// core in the SPDK module's random-write path.
///
/// # Safety
/// `src` must be readable and `dst` writable for `len` bytes; they must not overlap; the
/// caller fences before the destination is accessed again.
pub(super) unsafe fn copy_nt(dst: *mut u8, src: *const u8, len: usize) {
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (just checked); the caller's contract is passed on.
        unsafe { copy_nt_avx2(dst, src, len) }
    } else {
        // SAFETY: SSE2 is part of x86_64; the caller's contract is passed on.
        unsafe { copy_nt_sse2(dst, src, len) }
    }
}

/// `copy_nt` with 32-byte stores.
///
/// # Safety
/// As `copy_nt`, and the CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn copy_nt_avx2(dst: *mut u8, src: *const u8, len: usize) {
    let head = ((32 - (dst as usize & 31)) & 31).min(len);
    // SAFETY: caller guarantees both ranges; `head <= len`.
    unsafe { core::ptr::copy_nonoverlapping(src, dst, head) };
    let mut i = head;
    // SAFETY: `dst + i` is 32-byte aligned for every i in this block (it starts
    // aligned after the head and advances by multiples of 32), as
    // `_mm256_stream_si256` requires; `i + 32 * k <= len` keeps loads and stores within
    // the caller's ranges; the loads are unaligned loads, valid for any `src` alignment.
    unsafe {
        while i + 64 <= len {
            let s = src.add(i) as *const __m256i;
            let d = dst.add(i) as *mut __m256i;
            let a = _mm256_loadu_si256(s);
            let b = _mm256_loadu_si256(s.add(1));
            _mm256_stream_si256(d, a);
            _mm256_stream_si256(d.add(1), b);
            i += 64;
        }
        while i + 32 <= len {
            let v = _mm256_loadu_si256(src.add(i) as *const __m256i);
            _mm256_stream_si256(dst.add(i) as *mut __m256i, v);
            i += 32;
        }
        core::ptr::copy_nonoverlapping(src.add(i), dst.add(i), len - i);
    }
}

/// `copy_nt` with 16-byte stores.
///
/// # Safety
/// As `copy_nt`.
unsafe fn copy_nt_sse2(dst: *mut u8, src: *const u8, len: usize) {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Both store widths copy every length and alignment exactly, touching nothing
    /// around the destination (the medium tests reach only the form this CPU picks).
    #[test]
    fn both_copy_forms_match_a_plain_copy() {
        let src: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
        // SAFETY: a type only; each call below states its own contract.
        type Copy = unsafe fn(*mut u8, *const u8, usize);
        let forms: [(&str, Copy); 2] = [("sse2", copy_nt_sse2), ("avx2", copy_nt_avx2)];
        for (name, f) in forms {
            if name == "avx2" && !std::is_x86_feature_detected!("avx2") {
                continue;
            }
            for len in (0..300).chain([4095, 4096, 4097, 4999]) {
                for off in 0..40 {
                    let mut dst = vec![0xEEu8; len + off + 64];
                    // SAFETY: `dst` has room for `len` bytes at `off`, `src` holds at
                    // least `len`; the buffers are distinct; the fence below comes
                    // before the destination is read.
                    unsafe { f(dst.as_mut_ptr().add(off), src[1..].as_ptr(), len) };
                    sfence();
                    assert!(
                        dst[..off].iter().all(|&b| b == 0xEE),
                        "{name} head {len}@{off}"
                    );
                    assert_eq!(&dst[off..off + len], &src[1..1 + len], "{name} {len}@{off}");
                    assert!(
                        dst[off + len..].iter().all(|&b| b == 0xEE),
                        "{name} tail {len}@{off}"
                    );
                }
            }
        }
    }
}
