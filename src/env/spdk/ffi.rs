//! Small wrappers over the spdk-sys calls every part of the module makes: logging, C
//! strings, DMA buffers, pollers, thread identity and bdev_io field access.
//!
//! Invariants: each wrapper states what the SPDK call needs and checks what it can
//! (non-null results, lengths); pointers handed in are the ones SPDK gave us (a live
//! `spdk_bdev_io` between submit and complete, a live `spdk_io_channel` between its
//! create and destroy callbacks). Nothing here blocks or makes a syscall, so all of it is
//! usable on a reactor.

use spdk_sys as sys;
use std::ffi::{c_void, CString};
use std::ptr::NonNull;

/// SPDK's log levels used by the module.
#[derive(Clone, Copy)]
pub(super) enum Level {
    Error,
    Warn,
    Notice,
}

/// Logs through `spdk_log`, so messages go wherever SPDK's own log goes.
pub(super) fn log(level: Level, msg: &str) {
    let lvl = match level {
        Level::Error => sys::SPDK_LOG_ERROR,
        Level::Warn => sys::SPDK_LOG_WARN,
        Level::Notice => sys::SPDK_LOG_NOTICE,
    };
    let text = cstring(&format!("{msg}\n"));
    // SAFETY: every pointer is a NUL-terminated string alive for the call, and the format
    // "%s" consumes exactly the one string argument passed.
    unsafe {
        sys::spdk_log(
            lvl,
            c"pcache".as_ptr(),
            0,
            c"pcache".as_ptr(),
            c"%s".as_ptr(),
            text.as_ptr(),
        );
    }
}

macro_rules! errlog {
    ($($arg:tt)*) => { $crate::env::spdk::ffi::log($crate::env::spdk::ffi::Level::Error, &format!($($arg)*)) };
}
macro_rules! warnlog {
    ($($arg:tt)*) => { $crate::env::spdk::ffi::log($crate::env::spdk::ffi::Level::Warn, &format!($($arg)*)) };
}
macro_rules! noticelog {
    ($($arg:tt)*) => { $crate::env::spdk::ffi::log($crate::env::spdk::ffi::Level::Notice, &format!($($arg)*)) };
}
pub(super) use {errlog, noticelog, warnlog};

/// A C string from arbitrary text: interior NULs (impossible in names SPDK gave us, but
/// possible in user input) become '?', so this never fails.
pub(super) fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', "?")).unwrap_or_default()
}

/// Text of a C string SPDK owns (a bdev name), copied.
pub(super) fn from_c(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: SPDK hands out NUL-terminated strings that stay valid at least for the
    // duration of the callback we are in; we copy immediately.
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned()
}

/// A buffer from `spdk_dma_malloc`: usable for I/O by any bdev, including ones that DMA.
pub(super) struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
}

impl DmaBuf {
    /// `len` bytes aligned to 4 KiB, or None when SPDK's memory is exhausted.
    pub(super) fn new(len: usize) -> Option<DmaBuf> {
        // SAFETY: plain allocation; a null result is handled below. `unused` must be NULL.
        let p = unsafe { sys::spdk_dma_malloc(len.max(1), 4096, std::ptr::null_mut()) };
        NonNull::new(p.cast()).map(|ptr| DmaBuf { ptr, len })
    }
    pub(super) fn len(&self) -> usize {
        self.len
    }
    pub(super) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `len` bytes owned by self; `&mut self`
        // guarantees no other Rust reference to it exists.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        // SAFETY: the pointer came from spdk_dma_malloc and is freed exactly once.
        unsafe { sys::spdk_dma_free(self.ptr.as_ptr().cast()) }
    }
}

/// A registered SPDK poller; must be stopped on the thread that started it.
pub(super) struct Poller(*mut sys::spdk_poller);

impl Poller {
    /// Registers `f(arg)` every `period_us` (0: every reactor iteration) on the current
    /// SPDK thread.
    ///
    /// # Safety
    /// `arg` must stay valid until `stop` is called, and `f` must treat it accordingly.
    pub(super) unsafe fn start(
        f: extern "C" fn(*mut c_void) -> i32,
        arg: *mut c_void,
        period_us: u64,
        name: &std::ffi::CStr,
    ) -> Poller {
        // SAFETY: forwarded contract: `arg` outlives the poller; `name` is copied by SPDK.
        Poller(unsafe { sys::spdk_poller_register_named(Some(f), arg, period_us, name.as_ptr()) })
    }
    pub(super) fn none() -> Poller {
        Poller(std::ptr::null_mut())
    }
    /// Unregisters the poller (idempotent).
    pub(super) fn stop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the poller was registered on this thread (callers keep pollers on the
            // thread that created them) and is unregistered once; SPDK nulls the pointer.
            unsafe { sys::spdk_poller_unregister(&mut self.0) }
        }
    }
}

/// Poller return values.
pub(super) const BUSY: i32 = sys::SPDK_POLLER_BUSY as i32;
pub(super) const IDLE: i32 = sys::SPDK_POLLER_IDLE as i32;

/// Ticks per second and now, for timers that must not make syscalls.
pub(super) fn ticks() -> u64 {
    // SAFETY: reads the TSC; no preconditions.
    unsafe { sys::spdk_get_ticks() }
}
pub(super) fn ticks_hz() -> u64 {
    // SAFETY: no preconditions.
    unsafe { sys::spdk_get_ticks_hz() }.max(1)
}

/// The current SPDK thread (null outside SPDK threads).
pub(super) fn current_thread() -> *mut sys::spdk_thread {
    // SAFETY: no preconditions.
    unsafe { sys::spdk_get_thread() }
}

/// The bdev_io fields the request paths read, copied out of the C struct once.
#[derive(Clone, Copy)]
pub(super) struct IoDesc {
    pub ty: u32,
    pub offset_blocks: u64,
    pub num_blocks: u64,
    pub iovs: *mut libc::iovec,
    pub iovcnt: usize,
    /// The NVMe FUA bit (CDW12 bit 30), which NVMe-oF passes through.
    pub fua: bool,
}

/// Reads the request description of `io`.
///
/// # Safety
/// `io` must be a live bdev_io submitted to this module.
pub(super) unsafe fn io_desc(io: *mut sys::spdk_bdev_io) -> IoDesc {
    // SAFETY: caller guarantees `io` is live; `u.bdev` is the active union member for
    // block I/O types and harmless plain data for the others (RESET/FLUSH ignore it).
    unsafe {
        let b = &(*io).u.bdev;
        IoDesc {
            ty: (*io).type_ as u32,
            offset_blocks: b.offset_blocks,
            num_blocks: b.num_blocks,
            iovs: b.iovs.cast(),
            iovcnt: usize::try_from(b.iovcnt).unwrap_or(0),
            fua: b.nvme_cdw12.raw & (1 << 30) != 0,
        }
    }
}

/// The iovec array of a request as a slice.
///
/// # Safety
/// `d` must come from `io_desc` of a live bdev_io; the slice must not outlive it.
pub(super) unsafe fn iovs<'a>(d: &IoDesc) -> &'a [libc::iovec] {
    if d.iovs.is_null() || d.iovcnt == 0 {
        return &[];
    }
    // SAFETY: the bdev layer provides `iovcnt` valid iovecs at `iovs` for the I/O's life.
    unsafe { std::slice::from_raw_parts(d.iovs, d.iovcnt) }
}

/// Copies `src` into the iovecs, in order; returns the bytes copied.
///
/// # Safety
/// Every iovec must describe writable memory no Rust reference aliases.
pub(super) unsafe fn copy_to_iovs(iovs: &[libc::iovec], mut src: &[u8]) -> usize {
    let mut done = 0;
    for v in iovs {
        if src.is_empty() {
            break;
        }
        let n = v.iov_len.min(src.len());
        // SAFETY: caller guarantees the iovec memory is writable for iov_len >= n bytes
        // and disjoint from `src`, a Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), v.iov_base.cast::<u8>(), n) };
        src = &src[n..];
        done += n;
    }
    done
}

/// Gathers the iovecs into `dst`; returns the bytes copied.
///
/// # Safety
/// Every iovec must describe readable memory of at least `iov_len` bytes.
pub(super) unsafe fn copy_from_iovs(iovs: &[libc::iovec], dst: &mut [u8]) -> usize {
    let mut done = 0;
    for v in iovs {
        if done == dst.len() {
            break;
        }
        let n = v.iov_len.min(dst.len() - done);
        // SAFETY: caller guarantees the iovec is readable for `n <= iov_len` bytes; `dst`
        // is a distinct Rust buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), dst[done..].as_mut_ptr(), n)
        };
        done += n;
    }
    done
}

/// Completes a bdev_io with an SPDK status.
///
/// # Safety
/// `io` must be a live bdev_io submitted to this module, completed exactly once, on the
/// thread that submitted it.
pub(super) unsafe fn complete(io: *mut sys::spdk_bdev_io, status: i32) {
    // SAFETY: forwarded contract.
    unsafe { sys::spdk_bdev_io_complete(io, status) }
}

pub(super) const STATUS_SUCCESS: i32 = sys::SPDK_BDEV_IO_STATUS_SUCCESS;
pub(super) const STATUS_FAILED: i32 = sys::SPDK_BDEV_IO_STATUS_FAILED;
