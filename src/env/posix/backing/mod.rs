//! The backing device of the embedded runtime: a regular file or block device opened
//! with O_DIRECT and driven through one io_uring per thread.
//!
//! [`BackingFile`] is the shared, immutable description of the device (size, logical
//! block size, identity) plus the descriptor; [`Queue`] is a per-thread ring with its own
//! aligned bounce buffer. Every request must be aligned to [`BackingFile::block_size`] in
//! offset and length and lie inside [`BackingFile::size`]; violations are returned as
//! `InvalidInput` errors, never executed. Buffers at addresses O_DIRECT cannot use are
//! copied through the bounce buffer, so callers may pass any slice.
//!
//! Soundness invariant of the ring: the kernel holds raw pointers into caller buffers
//! (or the bounce buffer) while a request is in flight, so no method returns before
//! every request it submitted has completed; if the ring itself breaks with requests in
//! flight the process aborts rather than hand the buffers back. Short transfers and
//! EINTR/EAGAIN are resubmitted; every other failure is reported with path, operation,
//! offset and length.
//!
//! Files: this one (opening, identity, alignment probes), `queue` (the per-thread
//! io_uring queue and its aligned bounce buffer).
//!
//! `discard` guarantees that the range reads back as zeros afterwards (hole punching,
//! which on block devices means "unmap with guaranteed zeroes"), falling back to
//! writing zeros where the device cannot promise that. Plain BLKDISCARD is not used
//! because it leaves the contents undefined.

use std::alloc::{alloc, dealloc, Layout};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};

/// Submission-queue depth of each [`Queue`]; also the most requests in flight at once.
const RING_ENTRIES: u32 = 64;
/// Largest transfer per submission entry; longer requests continue as short transfers.
/// A power of two, so it keeps any block alignment.
const MAX_IO: usize = 1 << 30;
/// Alignment of the bounce buffer: a page satisfies every O_DIRECT memory alignment.
const BOUNCE_ALIGN: usize = 4096;
/// Chunk size of the zero-writing fallback of `write_zeroes`.
const ZERO_CHUNK: usize = 1 << 20;

/// `_IOR(0x12, 114, size_t)`: size of a block device in bytes (as a u64).
const BLKGETSIZE64: libc::Ioctl = ior(0x12, 114, std::mem::size_of::<usize>());

/// Linux `_IOR(ty, nr, size)`; the direction bits differ per architecture.
const fn ior(ty: u32, nr: u32, size: usize) -> libc::Ioctl {
    #[cfg(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    ))]
    const READ: u32 = 2 << 29;
    #[cfg(not(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    )))]
    const READ: u32 = 2 << 30;
    (READ | ((size as u32) << 16) | (ty << 8) | nr) as libc::Ioctl
}

/// Why the backing device could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    /// An OS call failed.
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: String,
        #[source]
        source: io::Error,
    },
    /// The path is not usable as a backing device.
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

/// An open backing device. Shared between threads through `Arc`; each thread does I/O
/// through its own [`Queue`].
#[derive(Debug)]
pub struct BackingFile {
    file: File,
    path: PathBuf,
    /// Usable bytes: the device or file length rounded down to `block_size`.
    size: u64,
    /// Offset and length granularity of every request (a power of two).
    block_size: u32,
    /// Buffer address alignment O_DIRECT needs (a power of two, <= BOUNCE_ALIGN).
    mem_align: usize,
    direct: bool,
    is_block: bool,
    identity: String,
    /// Learned at run time: fallocate modes the device or file system lacks.
    no_zero_range: AtomicBool,
    no_punch_hole: AtomicBool,
}

impl BackingFile {
    /// Opens a regular file or block device read/write with O_DIRECT (buffered if the
    /// file system rejects O_DIRECT). Block devices are opened exclusively (O_EXCL), so
    /// a mounted or otherwise claimed device is refused.
    pub fn open(path: &Path) -> Result<Arc<BackingFile>, BackingError> {
        Self::open_with(path, true)
    }

    /// `open`, optionally without even trying O_DIRECT (tests use this to exercise the
    /// buffered fallback, which tmpfs no longer needs since Linux 6.6).
    fn open_with(path: &Path, try_direct: bool) -> Result<Arc<BackingFile>, BackingError> {
        let io_err = |what: &str, source: io::Error| BackingError::Io {
            path: path.to_path_buf(),
            what: what.to_string(),
            source,
        };
        let invalid = |msg: &str| BackingError::Invalid {
            path: path.to_path_buf(),
            msg: msg.to_string(),
        };

        let meta = std::fs::metadata(path).map_err(|e| io_err("cannot stat", e))?;
        let is_block = meta.file_type().is_block_device();
        if meta.is_dir() {
            return Err(invalid(
                "is a directory; the backing device must be a block device or a regular file",
            ));
        }
        if !is_block && !meta.file_type().is_file() {
            return Err(invalid("is neither a block device nor a regular file"));
        }

        let open = |direct: bool| {
            let mut flags = 0;
            if direct {
                flags |= libc::O_DIRECT;
            }
            if is_block {
                // O_EXCL on a block device claims it: EBUSY if mounted or held.
                flags |= libc::O_EXCL;
            }
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(flags)
                .open(path)
        };
        let (file, direct) = match open(try_direct) {
            Ok(f) => (f, try_direct),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => (
                open(false).map_err(|e| io_err("cannot open read/write", e))?,
                false,
            ),
            Err(e) if is_block && e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(invalid(
                    "block device is in use (mounted, or opened exclusively by another process)",
                ))
            }
            Err(e) => return Err(io_err("cannot open read/write with O_DIRECT", e)),
        };
        let fd = file.as_raw_fd();

        if !is_block {
            // Two caches over one file would corrupt each other: hold an exclusive lock
            // (block devices get the same protection from O_EXCL).
            if let Err(e) = crate::env::flock_exclusive(fd) {
                if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    return Err(invalid("is in use by another pcache instance (flock held)"));
                }
                return Err(io_err("cannot lock", e));
            }
        }

        let (raw_size, mut block_size, mut mem_align) = if is_block {
            let mut bytes: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a
            // live, writable u64.
            if unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut bytes as *mut u64) } != 0 {
                return Err(io_err("BLKGETSIZE64 failed", io::Error::last_os_error()));
            }
            let mut ssz: libc::c_int = 0;
            // SAFETY: BLKSSZGET writes one int through the pointer, which points to a
            // live, writable c_int.
            if unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut ssz as *mut libc::c_int) } != 0 {
                return Err(io_err("BLKSSZGET failed", io::Error::last_os_error()));
            }
            let ssz = u32::try_from(ssz).unwrap_or(512);
            (bytes, ssz, ssz as usize)
        } else {
            (meta.len(), 512, 512)
        };
        if direct {
            if let Some((offset_align, buf_align)) = dio_alignment(&file) {
                if !is_block {
                    block_size = offset_align;
                }
                mem_align = buf_align as usize;
            }
        }
        if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
            return Err(invalid(&format!(
                "unsupported logical block size {block_size}"
            )));
        }
        if !mem_align.is_power_of_two() || mem_align > BOUNCE_ALIGN {
            mem_align = BOUNCE_ALIGN;
        }
        let size = raw_size - raw_size % u64::from(block_size);
        if size == 0 {
            return Err(invalid(&format!(
                "is empty (length {raw_size} is less than one {block_size}-byte block)"
            )));
        }

        let identity = if is_block {
            block_identity(meta.rdev())
        } else {
            std::fs::canonicalize(path)
                .map_err(|e| io_err("cannot resolve path", e))?
                .display()
                .to_string()
        };

        Ok(Arc::new(BackingFile {
            file,
            path: path.to_path_buf(),
            size,
            block_size,
            mem_align,
            direct,
            is_block,
            identity,
            no_zero_range: AtomicBool::new(false),
            no_punch_hole: AtomicBool::new(false),
        }))
    }

    /// Usable size in bytes (a multiple of `block_size`).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Granularity of request offsets and lengths.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// A stable name of the device, recorded by the cache to refuse attaching to the
    /// wrong backing device: for block devices a dm uuid, wwid or serial from sysfs (with
    /// the partition number), a loop device's backing file, or "dev MAJ:MIN" as a last
    /// resort; for files the canonical path.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// True for a block device, false for a regular file.
    pub fn is_block_device(&self) -> bool {
        self.is_block
    }

    /// True if requests bypass the page cache (O_DIRECT).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The path the device was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One line for status output.
    pub fn describe(&self) -> String {
        format!(
            "{}: {} {} bytes ({:.1} MiB), block {} B, {}, id {}",
            self.path.display(),
            if self.is_block {
                "block device"
            } else {
                "file"
            },
            self.size,
            self.size as f64 / (1u64 << 20) as f64,
            self.block_size,
            if self.direct {
                "O_DIRECT"
            } else {
                "buffered I/O (O_DIRECT rejected by the file system)"
            },
            self.identity
        )
    }

    /// A new io_uring queue for the calling thread.
    pub fn queue(self: &Arc<Self>) -> io::Result<Queue> {
        let ring = IoUring::new(RING_ENTRIES).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create an io_uring (is io_uring disabled?): {e}"),
            )
        })?;
        Ok(Queue {
            dev: Arc::clone(self),
            ring,
            bounce: AlignedBuf::new(),
            pending: Vec::new(),
            ready: VecDeque::new(),
        })
    }

    /// Checks alignment and bounds of a request; the error names the violation.
    fn check(&self, what: &str, off: u64, len: u64) -> io::Result<()> {
        let bs = u64::from(self.block_size);
        if off % bs != 0 || len % bs != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: {what} at offset {off} length {len} is not aligned to the {bs}-byte block size",
                    self.path.display()
                ),
            ));
        }
        if !matches!(off.checked_add(len), Some(end) if end <= self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: {what} at offset {off} length {len} is beyond the device size {}",
                    self.path.display(),
                    self.size
                ),
            ));
        }
        Ok(())
    }

    fn context(&self, what: &str, off: u64, len: u64, e: io::Error) -> io::Error {
        io::Error::new(
            e.kind(),
            format!(
                "{}: {what} at offset {off} length {len}: {e}",
                self.path.display()
            ),
        )
    }

    /// fallocate(mode) with EINTR retry. `Ok(false)` if the device does not support
    /// the mode, remembered in `unsupported` so later calls skip the syscall; errors
    /// carry `what` and the range.
    fn fallocate(
        &self,
        what: &str,
        unsupported: &AtomicBool,
        mode: libc::c_int,
        off: u64,
        len: u64,
    ) -> io::Result<bool> {
        if unsupported.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            let e = io::Error::from_raw_os_error(libc::EFBIG);
            return Err(self.context(what, off, len, e));
        };
        loop {
            // SAFETY: fallocate on an open descriptor has no memory effects.
            if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, o, l) } == 0 {
                return Ok(true);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                    unsupported.store(true, Ordering::Relaxed);
                    return Ok(false);
                }
                _ => return Err(self.context(what, off, len, e)),
            }
        }
    }
}

/// (offset alignment, memory alignment) for O_DIRECT from statx, if the kernel and file
/// system report it.
fn dio_alignment(file: &File) -> Option<(u32, u32)> {
    // SAFETY: `statx` is plain old data, so all-zero bytes are a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: empty path + AT_EMPTY_PATH makes statx describe the open fd; `stx` is a
    // valid writable buffer of the right type.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((stx.stx_dio_offset_align, stx.stx_dio_mem_align.max(1)))
}

/// A stable identity of a block device from sysfs; see [`BackingFile::identity`].
fn block_identity(rdev: u64) -> String {
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    let fallback = format!("dev {maj}:{min}");
    let Ok(dir) = std::fs::canonicalize(format!("/sys/dev/block/{maj}:{min}")) else {
        return fallback;
    };
    let read = |p: PathBuf| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let disk_id = |d: &Path| -> Option<String> {
        if let Some(u) = read(d.join("dm/uuid")) {
            return Some(format!("dm-uuid:{u}"));
        }
        for name in ["wwid", "device/wwid"] {
            if let Some(w) = read(d.join(name)) {
                return Some(format!("wwid:{w}"));
            }
        }
        for name in ["serial", "device/serial"] {
            if let Some(s) = read(d.join(name)) {
                return Some(format!("serial:{s}"));
            }
        }
        if let Some(f) = read(d.join("loop/backing_file")) {
            let offset = read(d.join("loop/offset")).unwrap_or_else(|| "0".into());
            return Some(format!("loop:{f}@{offset}"));
        }
        None
    };
    match read(dir.join("partition")) {
        Some(part) => dir
            .parent()
            .and_then(disk_id)
            .map(|id| format!("{id}-part{part}"))
            .unwrap_or(fallback),
        None => disk_id(&dir).unwrap_or(fallback),
    }
}

mod queue;
mod ring;
mod stream;
use queue::{is_retryable, round_up, AlignedBuf};
pub use queue::{Op, Queue};
pub use ring::{AsyncRing, RING_SLOTS};
pub use stream::STREAM_SLOTS;

#[cfg(test)]
mod tests;
