//! The real persistent medium: a file or device-dax instance mapped shared into the
//! process, implementing the engine's [`Pmem`] contract with cache-line flushes. Shared by
//! both runtimes (the embedded one in `env::posix` and the SPDK module in `env::spdk`), so
//! neither imports the other. Files: this one (modes, open, mapping state), `access`
//! (the `Pmem` implementation: loads, stores, flushes), `map` (mmap and file-system
//! probes), `arch_*` (flush instructions and non-temporal copies).
//!
//! Three persistence modes, chosen once at [`PosixPmem::open`]:
//! * [`Persistence::Pmem`]: the mapping was accepted with `MAP_SYNC`, so the kernel
//!   guarantees that CPU caches are the only volatile layer (DAX file or device-dax).
//!   `flush` issues clwb / clflushopt / clflush per 64-byte line, `fence` an sfence.
//! * [`Persistence::File`]: an ordinary page-cache mapping. `flush` runs
//!   `msync(MS_SYNC)` on the covering pages, so data is on stable storage when it
//!   returns and `fence` only has to order stores. With group commit on
//!   ([`PosixPmem::set_group_commit`], which the NBD target turns on), `flush_data`
//!   (request data whose key is not in the log yet) only counts a postponed flush, and
//!   one `fdatasync` of the whole file ([`PosixPmem::commit`], at the end of a reactor
//!   pass, or `drain`) makes every postponed range durable at once: the runtime answers
//!   the writes of a pass only after it. Metadata (kset close, tails, generations,
//!   superblock) keeps its synchronous `msync`, and the engine drains before storing any
//!   key, so "data durable before its key is stored" still holds and nothing else is
//!   reordered: an `fdatasync` may also write back unflushed stores early, which the
//!   `Pmem` contract already allows (a CPU cache may evict any line at any time).
//! * [`Persistence::Volatile`]: nothing survives a power loss (tmpfs, or a test).
//!   Only ever used when explicitly asked for; `flush` does nothing.
//!
//! Invariants: `base..base + map_len` is a live shared mapping for the whole life of
//! the value (unmapped in `Drop`), and every access is bounds-checked against `size`
//! (`size <= map_len`) before any pointer arithmetic. Callers (the engine) never access
//! overlapping ranges concurrently; disjoint concurrent accesses are fine because we only
//! ever go through the raw base pointer, never through `&mut` slices of the mapping.
//! Non-temporal stores are always followed by an sfence before the stored bytes are
//! touched again, as Rust's memory model requires: before `write` returns, or at the
//! `fence_writes` that closes a run of `write_unordered`.
//!
//! Reads are plain copies: a media error under a DAX mapping raises SIGBUS and kills
//! the process. A SIGBUS-safe copy (`copy_mc`-style recovery) is future work. Likewise a
//! file truncated by someone else underneath the mapping would SIGBUS; an exclusive
//! `flock` on the medium keeps other pcache instances away.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::engine::Pmem;

/// `statfs.f_type` of ramfs; not exported by the libc crate.
const RAMFS_MAGIC: i64 = 0x8584_58f6;
/// `statfs.f_type` of tmpfs (and of devtmpfs, which is why device-dax is exempt).
const TMPFS_MAGIC: i64 = 0x0102_1994;
/// Copies at least this long use non-temporal stores: below it the head/tail handling
/// costs more than the cache pollution it avoids.
const NT_THRESHOLD: usize = 256;
/// Cache-line size of every x86_64 CPU with clwb/clflushopt.
#[cfg(target_arch = "x86_64")]
const CACHE_LINE: usize = 64;
/// Why `--persistence pmem` was refused on a medium without DAX.
const NOT_DAX_MSG: &str =
    "medium cannot be mapped with MAP_SYNC (not DAX): use --persistence file or volatile";
/// Default alignment of a device-dax instance when sysfs does not say.
const DEVDAX_DEFAULT_ALIGN: u64 = 2 << 20;

/// How durable the bytes of the medium are after `flush` + `fence`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Persistence {
    /// Real persistent memory mapped with `MAP_SYNC`: cache-line flushes make data durable.
    Pmem,
    /// A page-cache mapping of a file on a disk: `msync` makes data durable.
    File,
    /// Nothing is durable (RAM-backed, or the user said so).
    Volatile,
}

impl fmt::Display for Persistence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Persistence::Pmem => "pmem",
            Persistence::File => "file",
            Persistence::Volatile => "volatile",
        })
    }
}

/// A `--persistence` value that is not one of `pmem`, `file`, `volatile`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown persistence mode {0:?}: expected pmem, file or volatile")]
pub struct ParsePersistenceError(String);

impl FromStr for Persistence {
    type Err = ParsePersistenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "pmem" => Ok(Persistence::Pmem),
            "file" => Ok(Persistence::File),
            "volatile" => Ok(Persistence::Volatile),
            _ => Err(ParsePersistenceError(s.to_string())),
        }
    }
}

/// Why the medium could not be opened, or why a flush failed.
#[derive(Debug, thiserror::Error)]
pub enum PmemError {
    /// An OS call failed.
    #[error("{path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: String,
        #[source]
        source: io::Error,
    },
    /// The medium or the requested mode is unusable; the message says what to do.
    #[error("{path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    /// An earlier `msync` failed: data the engine believes durable may not be.
    #[error("{path}: flushing the medium failed, durability is lost: {msg}")]
    FlushFailed { path: PathBuf, msg: String },
}

/// What kind of object the medium is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    RegularFile,
    DevDax,
}

/// The cache-line write-back instruction the CPU offers, best first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
// Only the x86_64 back end constructs the instruction variants.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum FlushInsn {
    /// Writes the line back and may keep it cached.
    Clwb,
    /// Writes back and evicts; weakly ordered, so many can be in flight.
    Clflushopt,
    /// Writes back and evicts, serialised: slow but universal on x86_64.
    Clflush,
    /// No user-space cache-line flush (non-x86_64): only `msync` is available.
    None,
}

impl FlushInsn {
    fn name(self) -> &'static str {
        match self {
            FlushInsn::Clwb => "clwb",
            FlushInsn::Clflushopt => "clflushopt",
            FlushInsn::Clflush => "clflush",
            FlushInsn::None => "msync",
        }
    }
}

/// The best cache-line flush instruction of this CPU ("clwb", "clflushopt", "clflush"),
/// or "msync" where user space cannot flush cache lines (non-x86_64).
pub fn flush_instruction() -> &'static str {
    arch::detect().name()
}

/// A mapped medium. See the module documentation for modes and invariants.
pub struct PosixPmem {
    /// Start of the shared mapping; page aligned (2 MiB aligned for device-dax).
    base: *mut u8,
    /// Length passed to `mmap`/`munmap`.
    map_len: usize,
    /// Usable bytes, `<= map_len`.
    size: u64,
    mode: Persistence,
    kind: Kind,
    insn: FlushInsn,
    page_size: usize,
    path: PathBuf,
    /// Keeps the exclusive `flock` alive; group commit `fdatasync`s it.
    file: File,
    /// Set once an `msync` failed; `flush` cannot return errors, so they are sticky.
    flush_failed: AtomicBool,
    flush_error: Mutex<Option<String>>,
    /// File mode only: `flush_data` postpones durability to `commit`/`drain`.
    group: AtomicBool,
    /// Postponed `flush_data` calls so far (a sequence, never reset).
    deferred: AtomicU64,
    /// Every postponed flush up to this sequence is durable.
    durable: AtomicU64,
    /// One group sync at a time: a thread that finds one running waits for it and then
    /// usually has nothing left to sync (leader/follower group commit).
    sync_lock: Mutex<()>,
    /// Group syncs issued (`fdatasync` calls), for tests and status.
    syncs: AtomicU64,
    /// The background rebuild into 2 MiB pages, if one was started
    /// ([`PosixPmem::start_huge_pages`]); stopped before the mapping goes.
    collapse: Option<huge::Collapse>,
}

/// What an `open` path mapped, handed to `PosixPmem::assemble`.
struct Mapping {
    base: *mut u8,
    map_len: usize,
    size: u64,
    mode: Persistence,
    kind: Kind,
    insn: FlushInsn,
}

// SAFETY: `PosixPmem` owns its mapping (no other Rust value aliases it) and every access
// goes through raw pointers derived from `base`, copying bytes in or out; nothing hands
// out references into the mapping. Concurrent calls on disjoint ranges touch disjoint
// bytes, which the `Pmem` contract permits; the remaining fields are immutable after
// `open` or are themselves thread-safe (atomics, mutex).
unsafe impl Send for PosixPmem {}
// SAFETY: see `Send` above: `&self` methods only perform bounds-checked raw copies and
// cache-line flushes on the mapping, and synchronise their own mutable state.
unsafe impl Sync for PosixPmem {}

impl PosixPmem {
    /// Opens or creates the medium at `path` and maps it shared.
    ///
    /// A missing or empty regular file is created and sized to `create_size`; an existing
    /// non-empty file keeps its size (`create_size` is then ignored). A device-dax
    /// character device is used whole (rounded down to its alignment); `create_size`
    /// larger than it is an error. `want` forces a persistence mode; `None` picks `Pmem`
    /// if `MAP_SYNC` works, else `File`, and refuses RAM-backed files, which must be
    /// opened with `Some(Persistence::Volatile)`.
    pub fn open(
        path: &Path,
        create_size: Option<u64>,
        want: Option<Persistence>,
    ) -> Result<PosixPmem, PmemError> {
        let io_err = |what: &str, source: io::Error| PmemError::Io {
            path: path.to_path_buf(),
            what: what.to_string(),
            source,
        };
        let invalid = |msg: String| PmemError::Invalid {
            path: path.to_path_buf(),
            msg,
        };
        if create_size == Some(0) {
            return Err(invalid("cache size must be larger than zero".into()));
        }

        let meta = match std::fs::metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("cannot stat", e)),
        };
        let kind = match &meta {
            None => {
                if create_size.is_none() {
                    return Err(invalid(
                        "does not exist; give a cache size to create it".into(),
                    ));
                }
                Kind::RegularFile
            }
            Some(m) if m.file_type().is_file() => Kind::RegularFile,
            Some(m) if m.file_type().is_char_device() => Kind::DevDax,
            Some(m) if m.is_dir() => {
                return Err(invalid(
                    "is a directory; give a file, a file on a DAX file system, or a \
                     device-dax character device (/dev/daxX.Y)"
                        .into(),
                ))
            }
            Some(_) => {
                return Err(invalid(
                    "is neither a regular file nor a device-dax character device".into(),
                ))
            }
        };

        let dax = match (&meta, kind) {
            (Some(m), Kind::DevDax) => Some(devdax_geometry(m).map_err(|e| match e {
                DaxProbe::NotDax => invalid(
                    "character device is not a device-dax instance (no size in sysfs)".into(),
                ),
                DaxProbe::Io(what, e) => io_err(&what, e),
            })?),
            _ => None,
        };

        // Refuse RAM-backed files before creating or sizing anything: a missing file is
        // judged by the file system of its directory.
        let in_ram = kind == Kind::RegularFile && {
            let probe = match (&meta, path.parent()) {
                (Some(_), _) => path,
                (None, Some(dir)) if !dir.as_os_str().is_empty() => dir,
                (None, _) => Path::new("."),
            };
            is_ram_fs(probe).map_err(|e| io_err("cannot statfs", e))?
        };
        if in_ram && want != Some(Persistence::Volatile) {
            return Err(invalid(if want == Some(Persistence::Pmem) {
                NOT_DAX_MSG.into()
            } else {
                "lives in RAM (tmpfs): its contents do not survive a reboot; choose \
                 --persistence volatile explicitly"
                    .into()
            }));
        }
        if kind == Kind::DevDax && want == Some(Persistence::File) {
            // device-dax has no fsync, so msync(MS_SYNC) fails with EINVAL there.
            return Err(invalid(
                "device-dax supports only --persistence pmem or volatile".into(),
            ));
        }

        // A file we create is removed again if opening fails, so a refused open leaves
        // nothing behind. `create_new` makes sure it really is ours.
        let mut created = false;
        let r = Self::map_medium(
            path,
            kind,
            dax,
            meta.is_none(),
            &mut created,
            create_size,
            want,
        );
        if r.is_err() && created {
            let _ = std::fs::remove_file(path);
        }
        r
    }

    /// Opens an existing medium for reading only (`pcache status`, `pcache check`): no
    /// durability mode is needed to look at it, so none is asked for, and nothing can be
    /// written: the file is opened read-only and mapped `PROT_READ` (a store would fault,
    /// never reach the medium). The mode reported is what the medium is: `Volatile` on
    /// tmpfs/ramfs, `Pmem` where a `MAP_SYNC` mapping is accepted, else `File`. Takes the
    /// same exclusive `flock` as [`PosixPmem::open`], so it never reads a medium that a
    /// running instance is changing.
    pub fn open_read_only(path: &Path) -> Result<PosixPmem, PmemError> {
        let io_err = |what: &str, source: io::Error| PmemError::Io {
            path: path.to_path_buf(),
            what: what.to_string(),
            source,
        };
        let invalid = |msg: &str| PmemError::Invalid {
            path: path.to_path_buf(),
            msg: msg.to_string(),
        };
        let meta = std::fs::metadata(path).map_err(|e| io_err("cannot stat", e))?;
        let (kind, dax) = if meta.file_type().is_file() {
            (Kind::RegularFile, None)
        } else if meta.file_type().is_char_device() {
            let g = devdax_geometry(&meta).map_err(|e| match e {
                DaxProbe::NotDax => {
                    invalid("character device is not a device-dax instance (no size in sysfs)")
                }
                DaxProbe::Io(what, e) => io_err(&what, e),
            })?;
            (Kind::DevDax, Some(g))
        } else {
            return Err(invalid(
                "is neither a regular file nor a device-dax character device",
            ));
        };
        let in_ram =
            kind == Kind::RegularFile && is_ram_fs(path).map_err(|e| io_err("cannot statfs", e))?;
        let file = File::open(path).map_err(|e| io_err("cannot open", e))?;
        if let Err(e) = crate::env::flock_exclusive(file.as_raw_fd()) {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(invalid("is in use by another pcache instance (flock held)"));
            }
            return Err(io_err("cannot lock", e));
        }
        let size = match dax {
            Some((dev_size, align)) => dev_size - dev_size % align,
            None => file.metadata().map_err(|e| io_err("cannot stat", e))?.len(),
        };
        if size == 0 {
            return Err(invalid("is empty: not a pcache medium"));
        }
        let map_len = usize::try_from(size)
            .map_err(|_| invalid("its size does not fit the address space"))?;
        let fd = file.as_raw_fd();
        let insn = arch::detect();
        let synced = if in_ram || insn == FlushInsn::None {
            None
        } else {
            map_ro(fd, map_len, true).ok()
        };
        let (base, mode) = match synced {
            Some(b) => (b, Persistence::Pmem),
            None => (
                map_ro(fd, map_len, false).map_err(|e| io_err("cannot mmap", e))?,
                if in_ram {
                    Persistence::Volatile
                } else {
                    Persistence::File
                },
            ),
        };
        let m = Mapping {
            base,
            map_len,
            size,
            mode,
            kind,
            insn,
        };
        Ok(PosixPmem::assemble(m, path, file))
    }

    /// The part of `open` after all checks that need no descriptor. Sets `created` once
    /// it has created the file.
    fn map_medium(
        path: &Path,
        kind: Kind,
        dax: Option<(u64, u64)>,
        create: bool,
        created: &mut bool,
        create_size: Option<u64>,
        want: Option<Persistence>,
    ) -> Result<PosixPmem, PmemError> {
        let io_err = |what: &str, source: io::Error| PmemError::Io {
            path: path.to_path_buf(),
            what: what.to_string(),
            source,
        };
        let invalid = |msg: String| PmemError::Invalid {
            path: path.to_path_buf(),
            msg,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(create)
            .open(path)
            .map_err(|e| io_err("cannot open read/write", e))?;
        *created = create;
        let fd = file.as_raw_fd();

        if let Err(e) = crate::env::flock_exclusive(fd) {
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(invalid(
                    "is in use by another pcache instance (flock held)".into(),
                ));
            }
            return Err(io_err("cannot lock", e));
        }

        // `dax` is Some exactly for Kind::DevDax.
        let (size, map_len) = match dax {
            None => {
                let mut len = file.metadata().map_err(|e| io_err("cannot stat", e))?.len();
                if len == 0 {
                    let Some(want_len) = create_size else {
                        return Err(invalid(
                            "is empty; give a cache size to initialise it".into(),
                        ));
                    };
                    file.set_len(want_len)
                        .map_err(|e| io_err(&format!("cannot size to {want_len} bytes"), e))?;
                    len = want_len;
                }
                reserve_blocks(&file, len).map_err(|e| {
                    io_err(&format!("cannot allocate {len} bytes of backing space"), e)
                })?;
                let map_len = usize::try_from(len)
                    .map_err(|_| invalid(format!("size {len} does not fit the address space")))?;
                (len, map_len)
            }
            Some((dev_size, align)) => {
                let usable = dev_size - dev_size % align;
                if usable == 0 {
                    return Err(invalid(format!(
                        "device-dax size {dev_size} is smaller than its alignment {align}"
                    )));
                }
                if let Some(s) = create_size {
                    if s > usable {
                        return Err(invalid(format!(
                            "requested cache size {s} exceeds the device-dax size {usable}"
                        )));
                    }
                }
                let map_len = usize::try_from(usable).map_err(|_| {
                    invalid(format!("size {usable} does not fit the address space"))
                })?;
                (usable, map_len)
            }
        };

        let insn = arch::detect();

        let (base, mode) = match want {
            Some(Persistence::Volatile) => (
                map(fd, map_len, false, true).map_err(|e| io_err("cannot mmap", e))?,
                Persistence::Volatile,
            ),
            // RAM-backed files and device-dax were refused for this mode in `open`.
            Some(Persistence::File) => (
                map(fd, map_len, false, false).map_err(|e| io_err("cannot mmap", e))?,
                Persistence::File,
            ),
            Some(Persistence::Pmem) | None => {
                let sync = if insn == FlushInsn::None {
                    // Without user-space flushes MAP_SYNC buys nothing: fall back to msync.
                    Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
                } else {
                    map(fd, map_len, true, true)
                };
                match sync {
                    Ok(base) => (base, Persistence::Pmem),
                    Err(e) if !is_not_dax(&e) => {
                        return Err(io_err("cannot mmap with MAP_SYNC", e));
                    }
                    Err(_) if want == Some(Persistence::Pmem) => {
                        return Err(invalid(if insn == FlushInsn::None {
                            "cache-line flushes from user space are only implemented on \
                             x86_64: use --persistence file or volatile"
                                .into()
                        } else {
                            NOT_DAX_MSG.into()
                        }));
                    }
                    Err(e) if kind == Kind::DevDax => {
                        return Err(io_err("device-dax refused a MAP_SYNC mapping", e));
                    }
                    Err(_) => (
                        map(fd, map_len, false, false).map_err(|e| io_err("cannot mmap", e))?,
                        Persistence::File,
                    ),
                }
            }
        };

        let m = Mapping {
            base,
            map_len,
            size,
            mode,
            kind,
            insn,
        };
        Ok(PosixPmem::assemble(m, path, file))
    }

    /// The medium around a fresh mapping: both `open` paths (read-write and read-only)
    /// end here, with no flush error and no group-commit state yet.
    fn assemble(m: Mapping, path: &Path, file: File) -> PosixPmem {
        PosixPmem {
            base: m.base,
            map_len: m.map_len,
            size: m.size,
            mode: m.mode,
            kind: m.kind,
            insn: m.insn,
            page_size: page_size(),
            path: path.to_path_buf(),
            file,
            flush_failed: AtomicBool::new(false),
            flush_error: Mutex::new(None),
            group: AtomicBool::new(false),
            deferred: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            sync_lock: Mutex::new(()),
            syncs: AtomicU64::new(0),
            collapse: None,
        }
    }

    /// The persistence mode chosen at open.
    pub fn mode(&self) -> Persistence {
        self.mode
    }

    /// The path the medium was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What `flush` actually does in this mode: the CPU instruction in `Pmem` mode,
    /// "msync" in `File` mode, "none" in `Volatile` mode.
    pub fn flush_method(&self) -> &'static str {
        match self.mode {
            Persistence::Pmem => self.insn.name(),
            Persistence::File => "msync",
            Persistence::Volatile => "none",
        }
    }

    /// One line for status output: path, size, mode, kind and flush method.
    pub fn describe(&self) -> String {
        let kind = match (self.kind, self.mode) {
            (Kind::DevDax, _) => "device-dax",
            (Kind::RegularFile, Persistence::Pmem) => "file on a DAX file system",
            (Kind::RegularFile, Persistence::File) => "file in the page cache",
            (Kind::RegularFile, Persistence::Volatile) => "file, not persistent",
        };
        format!(
            "{}: {} bytes ({:.1} MiB), {}, persistence {}, flush {}{}",
            self.path.display(),
            self.size,
            self.size as f64 / (1u64 << 20) as f64,
            kind,
            self.mode,
            self.flush_method(),
            self.pages()
        )
    }

    /// Fails if any earlier `flush` could not write data back (`msync` error in `File`
    /// mode). `Pmem::flush` has no error channel, so callers should check this at
    /// durability points they report to clients (or periodically).
    pub fn check_error(&self) -> Result<(), PmemError> {
        if !self.flush_failed.load(Ordering::Acquire) {
            return Ok(());
        }
        let msg = match self.flush_error.lock() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        Err(PmemError::FlushFailed {
            path: self.path.clone(),
            msg: msg.unwrap_or_else(|| "msync failed".into()),
        })
    }

    /// Turns group commit on or off (File mode only; elsewhere `flush_data` has no
    /// syscall to save and stays immediate). While on, a `flush_data` range is durable
    /// only after the next [`PosixPmem::commit`] (or an engine `drain`): whoever turns it
    /// on must call `commit` before it reports a write complete. Turning it off commits
    /// what is pending.
    pub fn set_group_commit(&self, on: bool) {
        if self.mode != Persistence::File {
            return;
        }
        if !on {
            self.group.store(false, Ordering::Release);
        }
        self.sync_deferred();
        if on {
            self.group.store(true, Ordering::Release);
        }
    }

    /// Whether `flush_data` currently postpones durability to `commit`.
    pub fn group_commit(&self) -> bool {
        self.group.load(Ordering::Acquire)
    }

    /// Makes every `flush_data` range postponed so far durable, with one `fdatasync` for
    /// all of them (none when nothing is pending, or when a concurrent commit already
    /// covered them). Errors if this or any earlier flush failed: then no write may be
    /// reported complete any more.
    pub fn commit(&self) -> Result<(), PmemError> {
        self.sync_deferred();
        self.check_error()
    }

    /// Group syncs issued so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Whether some `flush_data` range is not durable yet.
    pub fn pending(&self) -> bool {
        self.durable.load(Ordering::Acquire) < self.deferred.load(Ordering::Acquire)
    }

    /// The group sync behind `commit` and `drain`.
    fn sync_deferred(&self) {
        let target = self.deferred.load(Ordering::Acquire);
        if self.durable.load(Ordering::Acquire) >= target {
            return;
        }
        let _leader = match self.sync_lock.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if self.durable.load(Ordering::Acquire) >= target {
            return; // the sync we waited for covered our ranges
        }
        // Every store of a flush counted up to here happened before this load, hence
        // before the fdatasync below, which writes back every dirty page of the file
        // (pages dirtied through the shared mapping included) and flushes the device.
        let upto = self.deferred.load(Ordering::Acquire);
        let fd = self.file.as_raw_fd();
        let rc = loop {
            // SAFETY: fdatasync on our open descriptor has no memory effects.
            let rc = unsafe { libc::fdatasync(fd) };
            if rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break rc;
            }
        };
        self.syncs.fetch_add(1, Ordering::Relaxed);
        if rc != 0 {
            let e = io::Error::last_os_error();
            self.record_error(format!("fdatasync of the medium failed: {e}"));
        }
        // Even after a failure: the error is sticky and `commit` reports it from now on.
        self.durable.fetch_max(upto, Ordering::AcqRel);
    }

    /// Asserts `[off, off + len)` lies inside the medium and returns `off` as usize.
    /// A failure is a bug in the caller (the engine bounds every access), not bad input.
    fn checked(&self, op: &str, off: u64, len: usize) -> usize {
        let end = off.checked_add(len as u64);
        assert!(
            matches!(end, Some(e) if e <= self.size),
            "PosixPmem::{op}: range [{off}, {off}+{len}) outside the medium of {} bytes",
            self.size
        );
        // Cannot truncate: off <= size <= map_len, which is a usize.
        off as usize
    }

    fn record_flush_error(&self, off: usize, len: usize, e: io::Error) {
        self.record_error(format!("msync of [{off}, {}) failed: {e}", off + len));
    }

    fn record_error(&self, msg: String) {
        if let Ok(mut g) = self.flush_error.lock() {
            if g.is_none() {
                eprintln!("pcache: {}: {msg}", self.path.display());
                *g = Some(msg);
            }
        }
        self.flush_failed.store(true, Ordering::Release);
    }
}

mod access;
pub mod huge;
mod map;
use map::*;
#[cfg(target_arch = "x86_64")]
#[path = "arch_x86.rs"]
mod arch;
#[cfg(not(target_arch = "x86_64"))]
#[path = "arch_other.rs"]
mod arch;

#[cfg(test)]
mod tests;
