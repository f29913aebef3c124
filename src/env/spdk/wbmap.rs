//! A second, read-only mapping of the cache medium for writeback, so dirty data goes to
//! the base bdev straight from pmem instead of through a copy into a bounce buffer.
//!
//! The engine's own mapping (`PosixPmem`) exposes no pointers; this one maps the same
//! file shared and read-only, so it sees exactly the bytes the engine persisted (same
//! page cache or DAX pages). It is placed at a 2 MiB-aligned address and registered with
//! `spdk_mem_register`, which makes it usable for DMA where SPDK can translate it (IOMMU,
//! or DAX pages that are physically contiguous). Where registration fails it is still
//! used when SPDK itself runs without hugepages (`--no-huge`): no PCIe device can DMA
//! from SPDK's own buffers then either, so no base bdev can require registered memory.
//! Otherwise writeback falls back to copying through a DMA bounce.
//!
//! Invariants: the mapping lives from `new` to drop (unregistered before unmapped); it is
//! only read, by the base bdev, for ranges the engine handed out in a writeback batch,
//! which the engine keeps stable until the batch is acknowledged (GC never passes
//! dirty_tail); only offsets below the medium's size are translated.

use super::ffi::noticelog;
use spdk_sys as sys;
use std::ffi::c_void;
use std::os::fd::AsRawFd;
use std::path::Path;

const ALIGN: usize = 2 << 20;

extern "C" {
    /// DPDK: non-zero when the EAL runs on hugepages (SPDK without `--no-huge`).
    fn rte_eal_has_hugepages() -> i32;
}

pub(super) struct WbMap {
    base: *mut u8,
    /// Bytes of the medium (readable).
    size: usize,
    /// Bytes registered with SPDK (a 2 MiB multiple, <= size), 0 when not registered.
    registered: usize,
    /// The whole reservation, unmapped on drop.
    map_len: usize,
}

impl WbMap {
    /// Maps `path` (the medium, `size` bytes); None when writeback must bounce.
    pub(super) fn new(name: &str, path: &Path, size: u64) -> Option<WbMap> {
        let size = usize::try_from(size).ok()?;
        let file = std::fs::File::open(path).ok()?;
        let map_len = size.div_ceil(ALIGN) * ALIGN + ALIGN;
        // SAFETY: reserving address space only (PROT_NONE, anonymous): no memory effects
        // on anything else; failure is checked.
        let res = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if res == libc::MAP_FAILED {
            return None;
        }
        let aligned = (res as usize).div_ceil(ALIGN) * ALIGN;
        // SAFETY: [aligned, aligned + size) lies inside the reservation just made (the
        // reservation has ALIGN bytes of slack), so MAP_FIXED replaces only our own
        // PROT_NONE pages; the file is opened read-only and mapped read-only.
        let p = unsafe {
            libc::mmap(
                aligned as *mut c_void,
                size,
                libc::PROT_READ,
                // Populated: writeback then never faults on the reactor.
                libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        let mut m = WbMap {
            base: res.cast(),
            size: 0,
            registered: 0,
            map_len,
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        m.base = aligned as *mut u8;
        m.size = size;
        // The reservation's start, for unmapping: keep the offset.
        let head = aligned - res as usize;
        m.map_len = map_len - head;
        if head > 0 {
            // SAFETY: [res, aligned) is the unused head of our own reservation.
            unsafe { libc::munmap(res, head) };
        }
        let reg = size / ALIGN * ALIGN;
        // SAFETY: [base, base + reg) is our live, 2 MiB-aligned mapping.
        if reg > 0 && unsafe { sys::spdk_mem_register(m.base.cast(), reg) } == 0 {
            m.registered = reg;
        }
        // spdk_mem_register succeeds even when no translation could be set up: ask.
        // (SPDK_VTOPHYS_ERROR is all ones; bindgen narrows the macro to an i32.)
        let mut len = reg as u64;
        // SAFETY: a lookup in SPDK's translation map; `len` is an in/out parameter.
        let dma =
            m.registered > 0 && unsafe { sys::spdk_vtophys(m.base.cast(), &mut len) } != u64::MAX;
        // SAFETY: plain query of the EAL's configuration.
        let hugepages = unsafe { rte_eal_has_hugepages() } != 0;
        if dma || !hugepages {
            noticelog!(
                "{name}: writeback goes straight from pmem ({})",
                if dma {
                    "mapping registered for DMA"
                } else {
                    "SPDK runs without hugepages, so no base bdev needs DMA-able memory"
                }
            );
            return Some(m);
        }
        noticelog!(
            "{name}: the pmem mapping cannot be translated for DMA; writeback copies through \
             a bounce buffer"
        );
        None
    }

    /// The address of medium bytes `[off, off + len)`, if inside the medium.
    pub(super) fn ptr(&self, off: u64, len: u64) -> Option<*mut u8> {
        let end = off.checked_add(len)?;
        if end > self.size as u64 {
            return None;
        }
        // SAFETY: `off + len <= size`: inside the live mapping.
        Some(unsafe { self.base.add(off as usize) })
    }
}

impl Drop for WbMap {
    fn drop(&mut self) {
        // SAFETY: undoes `new` exactly once: the registered prefix first, then the whole
        // remaining reservation (which contains the file mapping).
        unsafe {
            if self.registered > 0 {
                sys::spdk_mem_unregister(self.base.cast(), self.registered);
            }
            libc::munmap(self.base.cast(), self.map_len);
        }
    }
}
