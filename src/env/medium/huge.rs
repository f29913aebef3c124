//! 2 MiB pages for a medium in RAM: a 2 MiB-aligned mapping, and a background thread
//! that asks the kernel to rebuild a tmpfs medium's 4 KiB pages into 2 MiB ones
//! (`MADV_COLLAPSE`, Linux 6.1+).
//!
//! Why: every random hit on a medium mapped with 4 KiB pages walks the page tables
//! (a TLB miss per 4 KiB block of a medium larger than the TLB's reach). SPDK read hits
//! on 2 MiB pages ran 1.18-1.24x faster (session 23) and 1.2x (session 24) than on 4 KiB
//! pages, and a tmpfs mounted `huge=always` is not what `/dev/shm` is. The kernel's own
//! khugepaged does the same rebuild for tmpfs only when tmpfs huge pages are enabled;
//! `MADV_COLLAPSE` does it on request whatever `shmem_enabled` says (seen on kernel
//! 6.18 with `shmem_enabled=never`: 512 MiB in about 1.3 s).
//!
//! Invariants: the collapse changes which physical pages hold the bytes, never the bytes
//! (the kernel locks and copies each 4 KiB page, and a store racing it waits on the page
//! lock), so the I/O paths keep running meanwhile. The thread only passes addresses to
//! `madvise`, never dereferences them, and `Collapse::drop` stops and joins it before
//! the mapping can be unmapped. Failures (an old kernel, no free 2 MiB of RAM) only leave
//! 4 KiB pages, as before; `describe` reports what the mapping got.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The PMD page size of x86_64 and arm64 (4 KiB base pages): what a collapse builds.
pub const HUGE: usize = 2 << 20;

/// Maps `len` bytes of `fd` shared with `flags` (beyond `MAP_SHARED*`) at an address
/// aligned to `HUGE`, so that the kernel can back it with 2 MiB pages (a mapping at a
/// misaligned address can only ever get 4 KiB ones). Reserves `len + HUGE` bytes of
/// address space, maps the file over its aligned part and returns the rest.
pub(super) fn map_aligned(fd: i32, len: usize, prot: i32, flags: i32) -> io::Result<*mut u8> {
    let Some(span) = len.checked_add(HUGE) else {
        return Err(io::Error::from_raw_os_error(libc::ENOMEM));
    };
    // SAFETY: a fresh inaccessible anonymous reservation at an address of the kernel's
    // choosing aliases nothing.
    let r = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if r == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = r as usize;
    let at = start.next_multiple_of(HUGE);
    // SAFETY: `[at, at + len)` lies inside the reservation made above (at - start <
    // HUGE), which only this function knows of, so MAP_FIXED replaces nothing else.
    let p = unsafe { libc::mmap(at as *mut _, len, prot, flags | libc::MAP_FIXED, fd, 0) };
    if p == libc::MAP_FAILED {
        let e = io::Error::last_os_error();
        // SAFETY: unmaps exactly the reservation made above.
        unsafe { libc::munmap(r, span) };
        return Err(e);
    }
    // SAFETY: the head `[start, at)` and the tail `[at + len, start + span)` are the
    // unused parts of the reservation; the file mapping in between stays.
    unsafe {
        if at > start {
            libc::munmap(r, at - start);
        }
        let end = at + len;
        if start + span > end {
            libc::munmap(end as *mut _, start + span - end);
        }
    }
    Ok(p.cast())
}

/// The address of a mapping, handed to the collapse thread.
struct Addr(usize);

/// A running (or finished) background collapse of a mapping into 2 MiB pages.
pub struct Collapse {
    stop: Arc<AtomicBool>,
    /// Bytes collapsed so far, and bytes the kernel refused (no free 2 MiB page).
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Collapse {
    /// Starts collapsing the 2 MiB-aligned part of `[base, base + len)` on a thread of
    /// its own, lowest address first. The caller must keep the mapping alive until this
    /// value is dropped (dropping it stops and joins the thread).
    pub(super) fn start(base: *mut u8, len: usize) -> io::Result<Collapse> {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, d, f) = (stop.clone(), done.clone(), failed.clone());
        let addr = Addr(base as usize);
        let handle = std::thread::Builder::new()
            .name("pcache-hugepages".into())
            .spawn(move || run(addr, len, &s, &d, &f))?;
        Ok(Collapse {
            stop,
            done,
            failed,
            handle: Some(handle),
        })
    }

    /// Bytes collapsed into 2 MiB pages so far, bytes the kernel refused, and whether
    /// the thread still runs.
    pub fn progress(&self) -> (u64, u64, bool) {
        (
            self.done.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.handle.as_ref().is_some_and(|h| !h.is_finished()),
        )
    }
}

/// The thread: one `madvise` per 2 MiB, so a stop waits for one collapse (a few ms).
fn run(addr: Addr, len: usize, stop: &AtomicBool, done: &AtomicU64, failed: &AtomicU64) {
    let first = addr.0.next_multiple_of(HUGE);
    let end = addr.0 + len;
    let mut at = first;
    while at + HUGE <= end && !stop.load(Ordering::Relaxed) {
        // SAFETY: `[at, at + HUGE)` lies inside the caller's live mapping (it outlives
        // this thread: `Collapse::drop` joins it first). MADV_COLLAPSE keeps the bytes;
        // it only changes the pages under them.
        let rc = unsafe { libc::madvise(at as *mut _, HUGE, libc::MADV_COLLAPSE) };
        if rc == 0 {
            done.fetch_add(HUGE as u64, Ordering::Relaxed);
        } else {
            match io::Error::last_os_error().raw_os_error() {
                // Not supported here (kernel before 6.1, or a mapping it cannot
                // collapse): the rest would fail alike.
                Some(libc::EINVAL) | Some(libc::ENOSYS) if at == first => return,
                Some(libc::EINTR) => continue,
                _ => {
                    failed.fetch_add(HUGE as u64, Ordering::Relaxed);
                }
            }
        }
        at += HUGE;
    }
}

impl Drop for Collapse {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
