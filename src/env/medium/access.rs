//! The engine's [`Pmem`] contract on the mapping: bounds-checked loads and stores
//! (non-temporal for bulk data), flushes by persistence mode, and unmapping on drop.
//! Invariant: every access is checked against `size` before any pointer arithmetic.

use super::*;

impl Pmem for PosixPmem {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, off: u64, dst: &mut [u8]) {
        let off = self.checked("read", off, dst.len());
        // SAFETY: `off + dst.len() <= size <= map_len` was just checked, so the source is
        // inside the live mapping; `dst` is a distinct Rust buffer (the mapping is never
        // exposed as a slice), so the ranges cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(off), dst.as_mut_ptr(), dst.len());
        }
    }

    fn write(&self, off: u64, src: &[u8]) {
        self.write_unordered(off, src);
        if src.len() >= NT_THRESHOLD {
            // Non-temporal stores: fenced before anything touches them (Rust's rule).
            arch::sfence();
        }
    }

    fn write_unordered(&self, off: u64, src: &[u8]) {
        let off = self.checked("write", off, src.len());
        // SAFETY: bounds checked above, so `base + off .. + src.len()` is inside the live
        // writable mapping and cannot overlap `src`, a Rust buffer outside the mapping.
        // Non-temporal stores stay unfenced here: `write` fences them at once, and a
        // `write_unordered` caller touches the range only after `fence_writes` (the
        // `Pmem` contract).
        unsafe {
            let dst = self.base.add(off);
            if src.len() >= NT_THRESHOLD {
                arch::copy_nt(dst, src.as_ptr(), src.len());
            } else {
                std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len());
            }
        }
    }

    fn fence_writes(&self) {
        arch::sfence();
    }

    fn flush(&self, off: u64, len: u64) {
        let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
        let off = self.checked("flush", off, len_usize);
        if len == 0 {
            return;
        }
        match self.mode {
            Persistence::Volatile => {}
            Persistence::Pmem => {
                // SAFETY: the range is inside the mapping (checked above), so every line
                // address computed by `flush_lines` lies in mapped memory.
                unsafe { arch::flush_lines(self.insn, self.base.add(off), len_usize) }
            }
            Persistence::File => {
                // msync wants a page-aligned start; widening to whole pages is harmless.
                let start = off & !(self.page_size - 1);
                let span = off + len_usize - start;
                // SAFETY: `[start, start + span)` lies within the page-aligned mapping
                // (start <= off, end unchanged); msync does not touch our memory safety.
                let rc = unsafe { libc::msync(self.base.add(start).cast(), span, libc::MS_SYNC) };
                if rc != 0 {
                    self.record_flush_error(start, span, io::Error::last_os_error());
                }
            }
        }
    }

    fn fence(&self) {
        // Only pmem mode issues non-temporal stores and cache-line flushes, the only
        // stores an sfence orders beyond x86's own store order. Volatile and file media
        // are ordinary memory (a file's durability is msync's, a syscall): a fence there
        // would only stall on the store buffer.
        if self.mode == Persistence::Pmem {
            arch::sfence();
        }
    }

    fn flush_data(&self, off: u64, len: u64) {
        if self.mode == Persistence::File && self.group.load(Ordering::Acquire) {
            let len_usize = usize::try_from(len).unwrap_or(usize::MAX);
            self.checked("flush_data", off, len_usize);
            // Release: the data stores are visible to whoever syncs up to this count.
            self.deferred.fetch_add(1, Ordering::Release);
        } else {
            self.flush(off, len);
        }
    }

    fn drain(&self) {
        self.sync_deferred();
    }
}

impl Drop for PosixPmem {
    fn drop(&mut self) {
        // The collapse thread passes addresses of the mapping to madvise: stop it first.
        drop(self.collapse.take());
        // SAFETY: `base`/`map_len` describe the mapping created in `open`, which nothing
        // else references: no slices into it ever escape `&self` methods.
        unsafe {
            libc::munmap(self.base.cast(), self.map_len);
        }
    }
}

impl fmt::Debug for PosixPmem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}
