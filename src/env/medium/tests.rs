//! Unit tests of the mapped medium (kept apart so pmem.rs stays readable): modes,
//! bounds, flush paths, group commit and the read-only open.
use super::*;
use std::sync::atomic::AtomicU32;

/// A fresh, unique directory under `base` that is removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new_in(base: &Path) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = base.join(format!(
            "pcache-pmem-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn new() -> TempDir {
        TempDir::new_in(&std::env::temp_dir())
    }
    /// One in /dev/shm (tmpfs), or None with a note where there is none.
    fn in_shm() -> Option<TempDir> {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            eprintln!("no /dev/shm, skipping");
            return None;
        }
        Some(TempDir::new_in(shm))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 131 + seed * 7 + 3) % 251) as u8)
        .collect()
}

#[test]
fn persistence_parse_and_display() {
    for p in [Persistence::Pmem, Persistence::File, Persistence::Volatile] {
        assert_eq!(p.to_string().parse::<Persistence>().unwrap(), p);
    }
    assert_eq!(
        "VOLATILE".parse::<Persistence>().unwrap(),
        Persistence::Volatile
    );
    let e = "disk".parse::<Persistence>().unwrap_err();
    assert!(e.to_string().contains("expected pmem, file or volatile"));
}

#[test]
fn creates_regular_file_in_file_mode() {
    let d = TempDir::new();
    let p = d.0.join("cache");
    let m = PosixPmem::open(&p, Some(1 << 20), None).unwrap();
    assert_eq!(m.size(), 1 << 20);
    assert_eq!(m.mode(), Persistence::File);
    assert_eq!(m.flush_method(), "msync");
    assert_eq!(m.path(), p.as_path());
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 1 << 20);
    assert!(
        m.describe().contains("persistence file"),
        "{}",
        m.describe()
    );
    m.persist(4093, b"hello");
    m.check_error().unwrap();
    drop(m);
    // Reopen: existing size wins, contents survive.
    let m = PosixPmem::open(&p, None, None).unwrap();
    assert_eq!(m.size(), 1 << 20);
    let mut b = [0u8; 5];
    m.read(4093, &mut b);
    assert_eq!(&b, b"hello");
}

#[test]
fn explicit_modes_on_regular_file() {
    let d = TempDir::new();
    let p = d.0.join("cache");
    let e = PosixPmem::open(&p, Some(1 << 16), Some(Persistence::Pmem)).unwrap_err();
    assert!(e.to_string().contains("MAP_SYNC"), "{e}");
    assert!(
        !p.exists(),
        "a refused open must not leave a new file behind"
    );
    let m = PosixPmem::open(&p, Some(1 << 16), Some(Persistence::Volatile)).unwrap();
    assert_eq!(m.mode(), Persistence::Volatile);
    assert_eq!(m.flush_method(), "none");
    drop(m);
    let m = PosixPmem::open(&p, None, Some(Persistence::File)).unwrap();
    assert_eq!(m.mode(), Persistence::File);
}

#[test]
fn tmpfs_needs_explicit_volatile() {
    let Some(d) = TempDir::in_shm() else {
        return;
    };
    let p = d.0.join("cache");
    let e = PosixPmem::open(&p, Some(1 << 16), None).unwrap_err();
    assert!(e.to_string().contains("lives in RAM (tmpfs)"), "{e}");
    let e = PosixPmem::open(&p, Some(1 << 16), Some(Persistence::File)).unwrap_err();
    assert!(e.to_string().contains("lives in RAM (tmpfs)"), "{e}");
    let e = PosixPmem::open(&p, Some(1 << 16), Some(Persistence::Pmem)).unwrap_err();
    assert!(e.to_string().contains("MAP_SYNC"), "{e}");
    assert!(!p.exists(), "a refused open must not create the file");
    let m = PosixPmem::open(&p, Some(1 << 16), Some(Persistence::Volatile)).unwrap();
    assert_eq!(m.mode(), Persistence::Volatile);
    drop(m);
    // An existing tmpfs file is refused just the same.
    let e = PosixPmem::open(&p, None, None).unwrap_err();
    assert!(e.to_string().contains("lives in RAM (tmpfs)"), "{e}");
    assert!(p.exists());
    let m = PosixPmem::open(&p, None, Some(Persistence::Volatile)).unwrap();
    m.persist(0, &[7; 300]);
    let mut b = [0u8; 300];
    m.read(0, &mut b);
    assert_eq!(b, [7; 300]);
}

/// A medium in memory reports the pages that back it (read from /proc/self/smaps for
/// this very mapping): a share in [0, 1], named in `describe`.
#[test]
fn a_medium_in_memory_reports_its_pages() {
    let Some(d) = TempDir::in_shm() else {
        return;
    };
    let m = PosixPmem::open(
        &d.0.join("cache"),
        Some(4 << 20),
        Some(Persistence::Volatile),
    )
    .unwrap();
    let share = m.huge_page_share().expect("the mapping is listed in smaps");
    assert!((0.0..=1.0).contains(&share), "{share}");
    let text = m.describe();
    assert!(text.contains("pages"), "{text}");
    // A file in the page cache says nothing about pages.
    let d2 = TempDir::new();
    let f = PosixPmem::open(&d2.0.join("cache"), Some(1 << 16), Some(Persistence::File)).unwrap();
    assert!(!f.describe().contains("pages"), "{}", f.describe());
}

/// A medium in RAM is mapped 2 MiB-aligned and rebuilt into 2 MiB pages, partly in the
/// background, without a byte changing, while it is being written; a medium on a disk
/// file is never touched. Where the kernel cannot collapse (before 6.1, THP off), the
/// rebuild ends at once and the pages stay as they were.
#[test]
fn a_medium_in_ram_is_rebuilt_into_huge_pages_keeping_its_bytes() {
    let Some(d) = TempDir::in_shm() else {
        return;
    };
    let len = 8usize << 20;
    let mut m = PosixPmem::open(
        &d.0.join("cache"),
        Some(len as u64),
        Some(Persistence::Volatile),
    )
    .unwrap();
    assert_eq!(m.base as usize % huge::HUGE, 0, "2 MiB-aligned mapping");
    for i in 0..len / 4096 {
        m.write(i as u64 * 4096, &pattern(i, 4096));
    }
    // The first 2 MiB at once, the rest in the background.
    assert!(m.start_huge_pages_after(huge::HUGE), "{}", m.describe());
    assert!(!m.start_huge_pages(), "one rebuild at a time");
    // Rewrite the first half while the rebuild runs: both must land.
    for i in 0..len / 8192 {
        m.write(i as u64 * 4096, &pattern(i + 1000, 4096));
    }
    let t0 = std::time::Instant::now();
    while m.huge_pages_progress().is_some_and(|p| p.2) {
        assert!(t0.elapsed().as_secs() < 60, "the rebuild never ends");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let mut b = vec![0u8; 4096];
    for i in 0..len / 4096 {
        m.read(i as u64 * 4096, &mut b);
        let seed = if i < len / 8192 { i + 1000 } else { i };
        assert!(b == pattern(seed, 4096), "block {i} changed");
    }
    let (done, refused, _) = m.huge_pages_progress().unwrap();
    assert!(done + refused <= len as u64);
    if done > 0 {
        let share = m.huge_page_share().unwrap();
        assert!(share > 0.0, "collapsed {done} bytes but smaps shows none");
        assert!(m.describe().contains("pages"), "{}", m.describe());
    } else {
        eprintln!("this kernel did not collapse the medium: {}", m.describe());
    }
    drop(m);
    // A file medium on a disk is left alone.
    let d2 = TempDir::new();
    if !is_ram_fs(&d2.0).unwrap() {
        let mut f =
            PosixPmem::open(&d2.0.join("c"), Some(4 << 20), Some(Persistence::File)).unwrap();
        assert!(!f.start_huge_pages());
        assert!(f.huge_pages_progress().is_none());
    }
}

/// The 2 MiB-aligned mapping gives back the unused parts of its reservation, also
/// behind an odd-sized file (whose last page is partial): no inaccessible range is
/// left right after the medium.
#[test]
fn an_odd_sized_medium_leaves_no_reservation_behind() {
    let Some(d) = TempDir::in_shm() else {
        return;
    };
    let m = PosixPmem::open(
        &d.0.join("cache"),
        Some((4 << 20) + 100),
        Some(Persistence::Volatile),
    )
    .unwrap();
    let end = (m.base as usize + m.map_len).next_multiple_of(page_size());
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let after = maps.lines().find(|l| l.starts_with(&format!("{end:x}-")));
    assert!(
        after.is_none_or(|l| l.split_whitespace().nth(1) != Some("---p")),
        "reservation tail left: {after:?}"
    );
}

#[test]
fn rejects_bad_paths() {
    let d = TempDir::new();
    let e = PosixPmem::open(&d.0, Some(4096), None).unwrap_err();
    assert!(e.to_string().contains("is a directory"), "{e}");
    let missing = d.0.join("missing");
    let e = PosixPmem::open(&missing, None, None).unwrap_err();
    assert!(e.to_string().contains("does not exist"), "{e}");
    assert!(!missing.exists());
    let empty = d.0.join("empty");
    File::create(&empty).unwrap();
    let e = PosixPmem::open(&empty, None, None).unwrap_err();
    assert!(e.to_string().contains("is empty"), "{e}");
    let e = PosixPmem::open(&empty, Some(0), None).unwrap_err();
    assert!(e.to_string().contains("larger than zero"), "{e}");
    // An empty file is initialised to the requested size.
    let m = PosixPmem::open(&empty, Some(8192), None).unwrap();
    assert_eq!(m.size(), 8192);
    let e = PosixPmem::open(Path::new("/dev/null"), None, None).unwrap_err();
    assert!(e.to_string().contains("not a device-dax"), "{e}");
}

#[test]
fn second_open_is_refused_while_locked() {
    let d = TempDir::new();
    let p = d.0.join("cache");
    let _m = PosixPmem::open(&p, Some(1 << 16), None).unwrap();
    let e = PosixPmem::open(&p, None, None).unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
}

#[test]
fn round_trip_all_alignments() {
    let d = TempDir::new();
    let p = d.0.join("cache");
    let m = PosixPmem::open(&p, Some(64 << 10), Some(Persistence::Volatile)).unwrap();
    let sizes: Vec<usize> = (1..=300)
        .chain((301..5000).step_by(97))
        .chain([4999, 5000])
        .collect();
    let mut back = vec![0u8; 5000 + 260];
    for &len in &sizes {
        for off in 0..130usize {
            let base = 1000u64; // keep guard bytes on both sides
            let at = base + off as u64;
            // Guard: fill the neighbourhood with a known byte.
            m.write(base - 64, &vec![0xEE; len + off + 128]);
            let data = pattern(len + off, len);
            m.write(at, &data);
            m.flush(at, len as u64);
            m.fence();
            let view = &mut back[..len + off + 128];
            m.read(base - 64, view);
            assert!(
                view[..64 + off].iter().all(|&b| b == 0xEE),
                "head guard {len}@{off}"
            );
            assert_eq!(
                &view[64 + off..64 + off + len],
                &data[..],
                "data {len}@{off}"
            );
            assert!(
                view[64 + off + len..].iter().all(|&b| b == 0xEE),
                "tail guard {len}@{off}"
            );
        }
    }
}

#[test]
fn file_mode_flush_reaches_the_file() {
    use std::io::{Read, Seek, SeekFrom};
    let d = TempDir::new();
    let p = d.0.join("cache");
    let m = PosixPmem::open(&p, Some(1 << 20), None).unwrap();
    let data = pattern(9, 3000);
    m.persist(12345, &data);
    m.flush(m.size() - 1, 1);
    m.flush(0, m.size());
    m.fence();
    let mut f = File::open(&p).unwrap();
    f.seek(SeekFrom::Start(12345)).unwrap();
    let mut b = vec![0u8; 3000];
    f.read_exact(&mut b).unwrap();
    assert_eq!(b, data);
}

#[test]
fn group_commit_syncs_once_for_many_data_flushes() {
    use std::io::{Read, Seek, SeekFrom};
    let d = TempDir::new();
    let p = d.0.join("cache");
    let m = PosixPmem::open(&p, Some(1 << 20), None).unwrap();
    assert_eq!(m.mode(), Persistence::File);
    // Off by default: flush_data is an immediate msync and leaves nothing pending.
    m.write(0, &[1; 4096]);
    m.flush_data(0, 4096);
    assert!(!m.pending());
    m.set_group_commit(true);
    assert!(m.group_commit());
    for i in 0..32u64 {
        m.write(i * 4096, &pattern(i as usize, 4096));
        m.flush_data(i * 4096, 4096);
        m.fence();
    }
    assert!(m.pending(), "32 data flushes postponed");
    assert_eq!(m.syncs(), 0, "no sync before the commit");
    m.commit().unwrap();
    assert_eq!(m.syncs(), 1, "one sync for the whole group");
    assert!(!m.pending());
    m.commit().unwrap();
    m.drain();
    assert_eq!(m.syncs(), 1, "nothing pending: no sync");
    // The data reached the file through the mapping.
    let mut f = File::open(&p).unwrap();
    f.seek(SeekFrom::Start(31 * 4096)).unwrap();
    let mut b = vec![0u8; 4096];
    f.read_exact(&mut b).unwrap();
    assert_eq!(b, pattern(31, 4096));
    // drain (the engine's, before a kset close) syncs too; turning group commit off
    // commits what is pending.
    m.flush_data(0, 4096);
    m.drain();
    assert_eq!(m.syncs(), 2);
    m.flush_data(4096, 4096);
    m.set_group_commit(false);
    assert_eq!(m.syncs(), 3);
    assert!(!m.pending() && !m.group_commit());
}

#[test]
fn group_commit_from_many_threads_covers_every_flush() {
    let d = TempDir::new();
    let p = d.0.join("cache");
    let m = std::sync::Arc::new(PosixPmem::open(&p, Some(1 << 20), None).unwrap());
    m.set_group_commit(true);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let m = m.clone();
            std::thread::spawn(move || {
                for i in 0..50u64 {
                    let off = (t * 50 + i) * 4096;
                    m.write(off, &[t as u8; 4096]);
                    m.flush_data(off, 4096);
                    let mine = m.deferred.load(Ordering::Acquire);
                    m.commit().unwrap();
                    // Our own flush is covered once our commit returns, whoever synced.
                    assert!(m.durable.load(Ordering::Acquire) >= mine);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(!m.pending());
    assert!(m.syncs() <= 200, "{}", m.syncs());
}

#[test]
fn group_commit_is_file_mode_only() {
    let d = TempDir::new();
    let m = PosixPmem::open(&d.0.join("c"), Some(1 << 16), Some(Persistence::Volatile)).unwrap();
    m.set_group_commit(true);
    assert!(!m.group_commit());
    m.flush_data(0, 4096);
    assert!(!m.pending());
    m.commit().unwrap();
    assert_eq!(m.syncs(), 0);
}

#[test]
fn read_only_open_detects_the_mode_and_needs_none() {
    let d = TempDir::new();
    let p = d.0.join("cache");
    let m = PosixPmem::open(&p, Some(1 << 16), None).unwrap();
    m.persist(100, b"kept");
    drop(m);
    let r = PosixPmem::open_read_only(&p).unwrap();
    assert_eq!((r.mode(), r.size()), (Persistence::File, 1 << 16));
    let mut b = [0u8; 4];
    r.read(100, &mut b);
    assert_eq!(&b, b"kept");
    // Exclusive like a writer: a second look waits for the first to end.
    let e = PosixPmem::open(&p, None, None).unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
    drop(r);
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let d = TempDir::new_in(shm);
        let p = d.0.join("cache");
        drop(PosixPmem::open(&p, Some(1 << 16), Some(Persistence::Volatile)).unwrap());
        let r = PosixPmem::open_read_only(&p).unwrap();
        assert_eq!(r.mode(), Persistence::Volatile);
    }
    let e = PosixPmem::open_read_only(&d.0.join("missing")).unwrap_err();
    assert!(e.to_string().contains("cannot stat"), "{e}");
}

#[test]
fn concurrent_disjoint_writes() {
    let d = TempDir::new();
    let p = d.0.join("cache");
    let m = std::sync::Arc::new(
        PosixPmem::open(&p, Some(1 << 20), Some(Persistence::Volatile)).unwrap(),
    );
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let m = m.clone();
            std::thread::spawn(move || {
                for i in 0..64 {
                    let off = (t * 64 + i) as u64 * 4096 + 3;
                    m.persist(off, &pattern(t * 1000 + i, 4000));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut b = vec![0u8; 4000];
    for t in 0..4 {
        for i in 0..64 {
            m.read((t * 64 + i) as u64 * 4096 + 3, &mut b);
            assert_eq!(b, pattern(t * 1000 + i, 4000));
        }
    }
}

#[test]
#[should_panic(expected = "outside the medium")]
fn out_of_range_is_a_clear_assertion() {
    let d = TempDir::new();
    let m = PosixPmem::open(&d.0.join("c"), Some(4096), Some(Persistence::Volatile)).unwrap();
    m.write(4090, &[0; 7]);
}

#[test]
fn flush_instruction_is_known() {
    let i = flush_instruction();
    assert!(
        ["clwb", "clflushopt", "clflush", "msync"].contains(&i),
        "{i}"
    );
    // Exercise the real flush path on ordinary memory-mapped pages too.
    #[cfg(target_arch = "x86_64")]
    {
        let mut buf = vec![1u8; 1000];
        // SAFETY: `buf` is a live allocation of 1000 bytes.
        unsafe { arch::flush_lines(arch::detect(), buf.as_mut_ptr().add(3), 990) };
        arch::sfence();
        assert!(buf.iter().all(|&b| b == 1));
    }
}
