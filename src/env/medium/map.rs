//! mmap and the file-system probes behind [`PosixPmem::open`]: shared mappings (with
//! `MAP_SYNC` for DAX), page size, tmpfs/ramfs detection, block reservation, and the
//! device-dax geometry from sysfs. Each call checks its result; nothing here keeps state.

use super::*;

/// Maps `len` bytes of `fd` shared, with `MAP_SYNC` if `sync`, and with every page
/// mapped in up front if `populate`: the I/O paths then never take a page fault (a
/// kernel entry, on an SPDK reactor too), which costs several microseconds each the
/// first time a RAM-backed medium is touched. Not for `File` mode: that would read a
/// whole disk file at startup.
///
/// A mapping of 2 MiB or more is placed at a 2 MiB-aligned address, so it can have
/// 2 MiB pages. No `MADV_HUGEPAGE`: a tmpfs medium's pages are allocated when its
/// blocks are reserved, before any mapping exists (tried on a tmpfs mounted
/// `huge=advise`: still 4 KiB pages). Huge pages come from the medium itself
/// (device-dax, a tmpfs mounted `huge=always`) or from a collapse afterwards
/// ([`huge::Collapse`]); `huge_bytes` reports what the mapping got.
pub(super) fn map(fd: i32, len: usize, sync: bool, populate: bool) -> io::Result<*mut u8> {
    let mut flags = if sync {
        libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC
    } else {
        libc::MAP_SHARED
    };
    if populate {
        flags |= libc::MAP_POPULATE;
    }
    if len >= huge::HUGE {
        return huge::map_aligned(fd, len, libc::PROT_READ | libc::PROT_WRITE, flags);
    }
    // SAFETY: a fresh mapping at an address of the kernel's choosing cannot alias any
    // existing Rust object; `fd` is open read/write, matching PROT_READ | PROT_WRITE.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// Bytes of the mapping at `base` that huge pages back, from /proc/self/smaps (the
/// transparent huge page counters, hugetlb, or a kernel page size above 4 KiB as on
/// device-dax); None when smaps cannot be read or lists no mapping at `base`.
pub(super) fn huge_bytes(base: *const u8) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let head = format!("{:x}-", base as usize);
    let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head));
    lines.next()?;
    let (mut rss, mut huge, mut page_kb) = (0u64, 0u64, 4u64);
    for l in lines {
        // The next mapping's header ("start-end perms ...") ends this one's fields.
        if l.split_whitespace().next().is_some_and(|t| t.contains('-')) {
            break;
        }
        let Some((key, rest)) = l.split_once(':') else {
            continue;
        };
        let kb = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        match key {
            "Rss" => rss = kb,
            "AnonHugePages" | "ShmemPmdMapped" | "FilePmdMapped" | "Shared_Hugetlb"
            | "Private_Hugetlb" => huge += kb,
            "KernelPageSize" => page_kb = kb,
            _ => {}
        }
    }
    if page_kb > 4 {
        huge = huge.max(rss);
    }
    Some(huge << 10)
}

/// Maps `len` bytes of `fd` (open read-only) shared and read-only, with `MAP_SYNC` if
/// `sync` (which only succeeds on DAX: how a read-only open tells `pmem` from `file`).
pub(super) fn map_ro(fd: i32, len: usize, sync: bool) -> io::Result<*mut u8> {
    let flags = if sync {
        libc::MAP_SHARED_VALIDATE | libc::MAP_SYNC
    } else {
        libc::MAP_SHARED
    };
    // SAFETY: a fresh mapping at an address of the kernel's choosing cannot alias any
    // existing Rust object; PROT_READ matches the read-only descriptor.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, flags, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

/// The system page size (4096 if sysconf does not give a power of two).
pub(super) fn page_size() -> usize {
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(page)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

/// `MAP_SYNC` was refused because the medium is not DAX (EOPNOTSUPP), or because the
/// kernel predates `MAP_SHARED_VALIDATE` (EINVAL).
pub(super) fn is_not_dax(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
    )
}

/// True if `path` lives on tmpfs or ramfs, i.e. cannot survive a reboot.
pub(super) fn is_ram_fs(path: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: `statfs` is plain old data, so all-zero bytes are a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid, writable statfs buffer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // `f_type` is i64 on x86_64 but i32 or u32 elsewhere; widen portably.
    #[allow(clippy::useless_conversion)]
    let t = i64::from(st.f_type);
    Ok(t == TMPFS_MAGIC || t == RAMFS_MAGIC)
}

/// Allocates the file's blocks up front so that a store into a hole can never hit
/// ENOSPC, which a mapping could only report as SIGBUS. File systems without
/// fallocate keep the old behaviour.
pub(super) fn reserve_blocks(file: &File, len: u64) -> io::Result<()> {
    let Ok(len) = libc::off_t::try_from(len) else {
        return Err(io::Error::from_raw_os_error(libc::EFBIG));
    };
    loop {
        // SAFETY: fallocate on an open descriptor has no memory effects.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len) };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => return Ok(()),
            _ => return Err(e),
        }
    }
}

pub(super) enum DaxProbe {
    NotDax,
    Io(String, io::Error),
}

/// Size and mapping alignment of a device-dax character device, from sysfs.
/// Probed from the path's metadata before opening, so that no other kind of character
/// device (a tty, say) is ever opened.
pub(super) fn devdax_geometry(meta: &std::fs::Metadata) -> Result<(u64, u64), DaxProbe> {
    use std::os::unix::fs::MetadataExt;
    let rdev = meta.rdev();
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    let dir = PathBuf::from(format!("/sys/dev/char/{maj}:{min}"));
    let read_u64 = |name: &str| -> Option<Result<u64, DaxProbe>> {
        let p = dir.join(name);
        let text = std::fs::read_to_string(&p).ok()?;
        Some(text.trim().parse::<u64>().map_err(|e| {
            DaxProbe::Io(
                format!("cannot parse {}", p.display()),
                io::Error::new(io::ErrorKind::InvalidData, e),
            )
        }))
    };
    let size = read_u64("size").ok_or(DaxProbe::NotDax)??;
    let align = match read_u64("align") {
        Some(a) => a?,
        None => DEVDAX_DEFAULT_ALIGN,
    };
    // Unknown or odd alignments fall back to the 2 MiB every device-dax mapping accepts.
    let align = if align.is_power_of_two() {
        align.max(DEVDAX_DEFAULT_ALIGN)
    } else {
        DEVDAX_DEFAULT_ALIGN
    };
    Ok((size, align))
}
