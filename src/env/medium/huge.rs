//! 2 MiB pages for a medium in RAM: a 2 MiB-aligned mapping, and a rebuild of a tmpfs
//! medium's 4 KiB pages into 2 MiB ones by the kernel (`MADV_COLLAPSE`, Linux 6.1+):
//! before the medium serves I/O, and for a large medium's rest on a thread of its own.
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

use super::{is_ram_fs, map, Kind, Persistence, PosixPmem};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The PMD page size of x86_64 and arm64 (4 KiB base pages): what a collapse builds.
pub const HUGE: usize = 2 << 20;

/// How much of a medium is collapsed before it serves I/O (see `Collapse::start`):
/// about 5 s here; the rest of a larger medium follows in the background.
pub const SYNC_BYTES: usize = 2 << 30;

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
    // SAFETY: the head `[start, at)` and the tail `[end, start + span)` are the unused
    // parts of the reservation; the file mapping in between stays. `end` is rounded to
    // a page (the mapping covers the last partial page of an odd-sized file), since
    // munmap refuses an unaligned address and would leave the tail reserved.
    unsafe {
        if at > start {
            libc::munmap(r, at - start);
        }
        let end = at + len.next_multiple_of(super::page_size());
        if start + span > end {
            libc::munmap(end as *mut _, start + span - end);
        }
    }
    Ok(p.cast())
}

/// A running (or finished) background collapse of a mapping into 2 MiB pages.
pub struct Collapse {
    stop: Arc<AtomicBool>,
    /// Bytes collapsed so far, and bytes the kernel refused (no free 2 MiB page).
    done: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl Collapse {
    /// Collapses the 2 MiB-aligned part of `[base, base + len)`, lowest address first:
    /// its first `sync_bytes` at once on the calling thread, before the medium serves
    /// any I/O, the rest on a thread of its own. The caller must keep the mapping alive
    /// until this value is dropped (dropping it stops and joins the thread).
    ///
    /// Why at once: each collapse unmaps 512 small pages, and the TLB shootdowns reach
    /// every core running the process; under I/O, an SPDK reactor lost about 1.5 ms per
    /// 2 MiB collapsed beside it (cold reads over a 512 MiB medium: 0.71x for the 5 s
    /// after creation, 0.92x with the thread moved off the reactor's core). Before any
    /// I/O it costs only the time (about 2.5 ms per 2 MiB here).
    pub(super) fn start(base: *mut u8, len: usize, sync_bytes: usize) -> io::Result<Collapse> {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let first = (base as usize).next_multiple_of(HUGE);
        let end = base as usize + len;
        let mid = first.saturating_add(sync_bytes).min(end);
        let mut handle = None;
        if run(first, mid, &stop, &done, &failed) && mid + HUGE <= end {
            let (s, d, f) = (stop.clone(), done.clone(), failed.clone());
            handle = Some(
                std::thread::Builder::new()
                    .name("pcache-hugepages".into())
                    .spawn(move || {
                        step_aside();
                        run(mid, end, &s, &d, &f);
                    })?,
            );
        }
        Ok(Collapse {
            stop,
            done,
            failed,
            handle,
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

/// Moves the calling thread out of the way of the threads that serve I/O: to the
/// CPUs its parent was not pinned to, if any (an SPDK reactor creates the cache, and a
/// thread inherits its creator's pinning: sharing the reactor's core halved its
/// writes while the rebuild ran), at the lowest priority.
fn step_aside() {
    // SAFETY: all-zero bytes are a valid (empty) cpu_set_t.
    let mut mine: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `mine` is a writable cpu_set_t of `size` bytes; pid 0 is this thread.
    if unsafe { libc::sched_getaffinity(0, size, &mut mine) } == 0 {
        // SAFETY: sysconf has no memory effects.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
        // SAFETY: as for `mine`.
        let mut other: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let mut any = false;
        for c in 0..online.min(libc::CPU_SETSIZE as usize) {
            // SAFETY: `c` is below CPU_SETSIZE, inside both sets.
            unsafe {
                if !libc::CPU_ISSET(c, &mine) {
                    libc::CPU_SET(c, &mut other);
                    any = true;
                }
            }
        }
        if any {
            // SAFETY: `other` is a valid cpu_set_t of `size` bytes; a failure only
            // leaves the inherited affinity.
            unsafe { libc::sched_setaffinity(0, size, &other) };
        }
    }
    // SAFETY: setpriority on this thread's id changes only its scheduling priority.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
}

/// Collapses `[from, end)` (`from` 2 MiB-aligned), one `madvise` per 2 MiB so a stop
/// waits for one collapse (a few ms). False if the kernel cannot collapse at all.
fn run(from: usize, end: usize, stop: &AtomicBool, done: &AtomicU64, failed: &AtomicU64) -> bool {
    let mut at = from;
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
                Some(libc::EINVAL) | Some(libc::ENOSYS) if done.load(Ordering::Relaxed) == 0 => {
                    return false
                }
                Some(libc::EINTR) => continue,
                _ => {
                    failed.fetch_add(HUGE as u64, Ordering::Relaxed);
                }
            }
        }
        at += HUGE;
    }
    true
}

impl Drop for Collapse {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl PosixPmem {
    /// Rebuilds a medium in RAM into 2 MiB pages (see the module documentation): the first
    /// `SYNC_BYTES` now, the rest in the background. Only a tmpfs or ramfs file in
    /// volatile mode whose mapping is not mostly huge already (device-dax and a tmpfs
    /// mounted `huge=always` are). Returns whether a rebuild started; where it cannot,
    /// the medium keeps 4 KiB pages.
    pub fn start_huge_pages(&mut self) -> bool {
        self.start_huge_pages_after(SYNC_BYTES)
    }

    pub(super) fn start_huge_pages_after(&mut self, sync_bytes: usize) -> bool {
        let eligible = self.mode == Persistence::Volatile
            && self.kind == Kind::RegularFile
            && self.collapse.is_none()
            && self.map_len >= HUGE
            && (self.base as usize) % HUGE == 0
            && is_ram_fs(&self.path).unwrap_or(false)
            && self.huge_page_share().is_none_or(|s| s < 0.5);
        if !eligible {
            return false;
        }
        self.collapse = Collapse::start(self.base, self.map_len, sync_bytes).ok();
        self.collapse.is_some()
    }

    /// Bytes a background rebuild ([`PosixPmem::start_huge_pages`]) has put in 2 MiB
    /// pages so far, bytes the kernel refused, and whether it still runs; None if none
    /// was started.
    pub fn huge_pages_progress(&self) -> Option<(u64, u64, bool)> {
        self.collapse.as_ref().map(|c| c.progress())
    }

    /// Share of the mapping that huge pages back, from /proc/self/smaps (None where it
    /// cannot be read). A medium in RAM with 4 KiB pages makes every random hit walk the
    /// page tables (SPDK read hits 1.18-1.24x faster with 2 MiB pages); device-dax, a
    /// tmpfs mounted with `huge=always` and a rebuilt medium map 2 MiB pages.
    pub fn huge_page_share(&self) -> Option<f64> {
        let huge = map::huge_bytes(self.base)?;
        Some((huge as f64 / self.map_len as f64).min(1.0))
    }

    /// The page-size part of `describe`: only for media in memory (a file in the page
    /// cache is written back by msync, where the page size does not show).
    pub(super) fn pages(&self) -> String {
        if self.mode == Persistence::File {
            return String::new();
        }
        let share = self.huge_page_share();
        let full = share.is_some_and(|s| s >= 0.99);
        // A rebuild still going says so; one that ended short says why.
        let rebuild = match self.huge_pages_progress() {
            None => String::new(),
            Some(_) if full => String::new(),
            Some((done, _, true)) => {
                format!(
                    " (building 2 MiB pages in the background: {} MiB done)",
                    done >> 20
                )
            }
            Some((_, refused, _)) if refused > 0 => format!(
                " (the kernel had no free 2 MiB pages for {} MiB of it)",
                refused >> 20
            ),
            Some(_) => String::new(),
        };
        let what = match share {
            Some(_) if full => ", 2 MiB pages".into(),
            Some(s) if s > 0.0 => format!(", {:.0}% in huge pages", s * 100.0),
            Some(_) if !rebuild.is_empty() => ", 4 KiB pages".into(),
            Some(_) => ", 4 KiB pages (slower random hits: use device-dax, a tmpfs \
                        mounted with huge=always, or leave huge pages on for a medium \
                        in RAM)"
                .into(),
            None => String::new(),
        };
        what + &rebuild
    }
}
