//! Unit tests of the io_uring backing device (kept apart so backing.rs stays readable).
use super::*;
use std::sync::atomic::AtomicU32;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "pcache-backing-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn file(&self, name: &str, len: u64) -> PathBuf {
        let p = self.0.join(name);
        File::create(&p).unwrap().set_len(len).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A 4 KiB-aligned owned buffer, so tests can exercise the no-bounce path.
struct Aligned(AlignedBuf, usize);

impl Aligned {
    fn new(len: usize) -> Aligned {
        let mut b = AlignedBuf::new();
        let p = b.ensure(len).unwrap();
        // SAFETY: fresh allocation of at least `len` bytes.
        unsafe { std::ptr::write_bytes(p, 0, len) };
        Aligned(b, len)
    }
    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: the allocation holds `self.1` initialised bytes and is borrowed
        // mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.0.ptr, self.1) }
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn open_reports_geometry() {
    let d = TempDir::new();
    let p = d.file("disk", (1 << 20) + 100);
    let b = BackingFile::open(&p).unwrap();
    assert!(!b.is_block_device());
    assert!(b.block_size().is_power_of_two() && b.block_size() >= 512);
    assert_eq!(b.size() % u64::from(b.block_size()), 0);
    assert_eq!(b.size(), 1 << 20);
    assert_eq!(
        b.identity(),
        std::fs::canonicalize(&p).unwrap().to_str().unwrap()
    );
    assert!(b.describe().contains("file"), "{}", b.describe());
    eprintln!("{} (mem align {})", b.describe(), b.mem_align);
    // A second opener is refused while the first holds the lock.
    let e = BackingFile::open(&p).unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
}

#[test]
fn open_rejects_bad_paths() {
    let d = TempDir::new();
    let e = BackingFile::open(&d.0).unwrap_err();
    assert!(e.to_string().contains("is a directory"), "{e}");
    let e = BackingFile::open(&d.0.join("missing")).unwrap_err();
    assert!(e.to_string().contains("cannot stat"), "{e}");
    let e = BackingFile::open(&d.file("empty", 0)).unwrap_err();
    assert!(e.to_string().contains("is empty"), "{e}");
    let e = BackingFile::open(Path::new("/dev/null")).unwrap_err();
    assert!(e.to_string().contains("neither"), "{e}");
}

#[test]
fn round_trip() {
    let d = TempDir::new();
    let b = BackingFile::open(&d.file("disk", 1 << 20)).unwrap();
    let mut q = b.queue().unwrap();
    let mut w = Aligned::new(64 << 10);
    w.slice().copy_from_slice(&pattern(1, 64 << 10));
    q.write(8192, w.slice()).unwrap();
    q.flush().unwrap();
    let mut r = Aligned::new(64 << 10);
    q.read(8192, r.slice()).unwrap();
    assert_eq!(r.slice(), &pattern(1, 64 << 10)[..]);
    // Untouched space reads as zeros.
    let mut z = Aligned::new(4096);
    q.read(0, z.slice()).unwrap();
    assert!(z.slice().iter().all(|&x| x == 0));
    // Data is really in the file.
    let data = std::fs::read(b.path()).unwrap();
    assert_eq!(&data[8192..8192 + (64 << 10)], &pattern(1, 64 << 10)[..]);
}

#[test]
fn batch_of_random_writes() {
    let d = TempDir::new();
    let blocks = 512u64;
    let b = BackingFile::open(&d.file("disk", blocks * 4096)).unwrap();
    let mut q = b.queue().unwrap();
    // 100 distinct random blocks (more than the ring holds at once).
    let mut seen = std::collections::BTreeSet::new();
    let mut x = 12345u64;
    while seen.len() < 100 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seen.insert((x >> 33) % blocks);
    }
    let blks: Vec<u64> = seen.into_iter().collect();
    let datas: Vec<Vec<u8>> = blks.iter().map(|&k| pattern(k + 7, 4096)).collect();
    let mut ops: Vec<Op<'_>> = blks
        .iter()
        .zip(&datas)
        .map(|(&k, d)| Op::Write {
            off: k * 4096,
            buf: d,
        })
        .collect();
    q.run(&mut ops).unwrap();
    q.flush().unwrap();
    let mut outs: Vec<Vec<u8>> = vec![vec![0u8; 4096]; blks.len()];
    let mut ops: Vec<Op<'_>> = blks
        .iter()
        .zip(outs.iter_mut())
        .map(|(&k, buf)| Op::Read { off: k * 4096, buf })
        .collect();
    q.run(&mut ops).unwrap();
    drop(ops);
    assert_eq!(outs, datas);
}

#[test]
fn unaligned_buffers_bounce() {
    let d = TempDir::new();
    let b = BackingFile::open(&d.file("disk", 1 << 20)).unwrap();
    let mut q = b.queue().unwrap();
    let bs = b.block_size() as usize;
    for shift in [1usize, 3, 17, 511] {
        let mut backing = vec![0u8; 3 * bs + 1024];
        let data = pattern(shift as u64, 3 * bs);
        backing[shift..shift + 3 * bs].copy_from_slice(&data);
        let off = (shift * bs) as u64;
        q.write(off, &backing[shift..shift + 3 * bs]).unwrap();
        let mut out = vec![0u8; 3 * bs + 1024];
        q.read(off, &mut out[shift..shift + 3 * bs]).unwrap();
        assert_eq!(&out[shift..shift + 3 * bs], &data[..]);
        assert!(out[..shift].iter().all(|&x| x == 0));
        assert!(out[shift + 3 * bs..].iter().all(|&x| x == 0));
    }
    // Mixed batch: aligned and unaligned reads and writes together.
    let a = pattern(100, bs);
    let mut big = vec![0u8; 2 * bs + 5];
    big[5..5 + 2 * bs].copy_from_slice(&pattern(101, 2 * bs));
    q.run(&mut [
        Op::Write { off: 0, buf: &a },
        Op::Write {
            off: bs as u64,
            buf: &big[5..5 + 2 * bs],
        },
    ])
    .unwrap();
    let mut r1 = vec![0u8; bs + 1];
    let mut r2 = Aligned::new(2 * bs);
    q.run(&mut [
        Op::Read {
            off: 0,
            buf: &mut r1[1..],
        },
        Op::Read {
            off: bs as u64,
            buf: r2.slice(),
        },
    ])
    .unwrap();
    assert_eq!(&r1[1..], &a[..]);
    assert_eq!(r2.slice(), &pattern(101, 2 * bs)[..]);
}

#[test]
fn zeroes_and_discard_read_back_zero() {
    let d = TempDir::new();
    let b = BackingFile::open(&d.file("disk", 1 << 20)).unwrap();
    let mut q = b.queue().unwrap();
    let all = pattern(9, 1 << 20);
    q.write(0, &all).unwrap();
    q.write_zeroes(4096, 8192).unwrap();
    q.discard(65536, 65536).unwrap();
    let mut r = vec![0u8; 1 << 20];
    q.read(0, &mut r).unwrap();
    assert_eq!(&r[..4096], &all[..4096]);
    assert!(r[4096..12288].iter().all(|&x| x == 0));
    assert_eq!(&r[12288..65536], &all[12288..65536]);
    assert!(r[65536..131072].iter().all(|&x| x == 0));
    assert_eq!(&r[131072..], &all[131072..]);
    // The zero-writing fallback gives the same result.
    q.write(0, &all).unwrap();
    q.write_zero_blocks(0, 3 << 20 >> 2).unwrap();
    q.read(0, &mut r).unwrap();
    assert!(r[..3 << 20 >> 2].iter().all(|&x| x == 0));
    assert_eq!(&r[3 << 20 >> 2..], &all[3 << 20 >> 2..]);
}

#[test]
fn bad_requests_are_rejected() {
    let d = TempDir::new();
    let b = BackingFile::open(&d.file("disk", 1 << 20)).unwrap();
    let mut q = b.queue().unwrap();
    let bs = b.block_size() as u64;
    let mut buf = vec![0u8; 8192];
    let e = q.read(1 << 20, &mut buf[..bs as usize]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("beyond the device size"), "{e}");
    let e = q
        .write((1 << 20) - bs, &buf[..2 * bs as usize])
        .unwrap_err();
    assert!(e.to_string().contains("beyond the device size"), "{e}");
    let e = q
        .read(u64::MAX - bs + 1, &mut buf[..bs as usize])
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    let e = q.read(1, &mut buf[..bs as usize]).unwrap_err();
    assert!(e.to_string().contains("not aligned"), "{e}");
    let e = q.write(0, &buf[..100]).unwrap_err();
    assert!(e.to_string().contains("not aligned"), "{e}");
    let e = q.write_zeroes(0, 7).unwrap_err();
    assert!(e.to_string().contains("not aligned"), "{e}");
    let e = q.discard(1 << 20, bs).unwrap_err();
    assert!(e.to_string().contains("beyond"), "{e}");
    // A rejected batch submits nothing: the valid first op did not happen.
    let data = vec![0xAB; bs as usize];
    let e = q
        .run(&mut [
            Op::Write { off: 0, buf: &data },
            Op::Write { off: 3, buf: &data },
        ])
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    q.read(0, &mut buf[..bs as usize]).unwrap();
    assert!(buf[..bs as usize].iter().all(|&x| x == 0));
    // Empty requests are fine.
    q.read(0, &mut []).unwrap();
    q.run(&mut []).unwrap();
}

#[test]
fn works_on_tmpfs() {
    // tmpfs may or may not accept O_DIRECT depending on the kernel; either way the
    // device must work, and lack zero-range fallocate must fall back cleanly.
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        return;
    }
    let p = shm.join(format!("pcache-backing-test-{}-shm", std::process::id()));
    File::create(&p).unwrap().set_len(1 << 20).unwrap();
    let b = BackingFile::open(&p).unwrap();
    eprintln!("{}", b.describe());
    let mut q = b.queue().unwrap();
    let all = pattern(3, 1 << 20);
    q.write(0, &all).unwrap();
    q.write_zeroes(0, 8192).unwrap();
    q.discard(8192, 8192).unwrap();
    q.flush().unwrap();
    let mut r = vec![0u8; 1 << 20];
    q.read(0, &mut r[..]).unwrap();
    assert!(r[..16384].iter().all(|&x| x == 0));
    assert_eq!(&r[16384..], &all[16384..]);
    drop(q);
    drop(b);
    let _ = std::fs::remove_file(&p);
}

#[test]
fn buffered_fallback_works() {
    let d = TempDir::new();
    let b = BackingFile::open_with(&d.file("disk", 1 << 20), false).unwrap();
    assert!(!b.is_direct());
    assert_eq!(b.block_size(), 512);
    assert!(b.describe().contains("buffered"), "{}", b.describe());
    let mut q = b.queue().unwrap();
    let data = pattern(5, 4096 + 512);
    q.write(512, &data).unwrap();
    q.flush().unwrap();
    let mut r = vec![0u8; 4096 + 513];
    q.read(512, &mut r[1..]).unwrap();
    assert_eq!(&r[1..], &data[..]);
    let e = q.read(100, &mut r[..512]).unwrap_err();
    assert!(e.to_string().contains("not aligned"), "{e}");
}

/// Destroys the contents of the block device named by
/// PCACHE_TEST_SCRATCH_BLOCKDEV (e.g. a loop device); skipped when unset.
#[test]
fn scratch_block_device() {
    let Some(dev) = std::env::var_os("PCACHE_TEST_SCRATCH_BLOCKDEV") else {
        return;
    };
    let b = BackingFile::open(Path::new(&dev)).unwrap();
    eprintln!("{}", b.describe());
    assert!(b.is_block_device());
    let e = BackingFile::open(Path::new(&dev)).unwrap_err();
    assert!(e.to_string().contains("in use"), "{e}");
    let mut q = b.queue().unwrap();
    let len = (1usize << 20).min(b.size() as usize);
    let all = pattern(11, len);
    q.write(0, &all).unwrap();
    q.flush().unwrap();
    let mut r = vec![0u8; len];
    q.read(0, &mut r).unwrap();
    assert_eq!(r, all);
    q.write_zeroes(0, 65536).unwrap();
    q.discard(65536, 65536).unwrap();
    q.read(0, &mut r).unwrap();
    assert!(r[..131072].iter().all(|&x| x == 0));
    assert_eq!(&r[131072..], &all[131072..]);
    let last = b.size() - u64::from(b.block_size());
    q.write(last, &all[..b.block_size() as usize]).unwrap();
    let e = q
        .write(b.size(), &all[..b.block_size() as usize])
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn queues_on_many_threads() {
    let d = TempDir::new();
    let b = BackingFile::open(&d.file("disk", 4 << 20)).unwrap();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let b = Arc::clone(&b);
            std::thread::spawn(move || {
                let mut q = b.queue().unwrap();
                for i in 0..32u64 {
                    let off = (t * 32 + i) * 8192;
                    q.write(off, &pattern(t * 100 + i, 8192)).unwrap();
                }
                q.flush().unwrap();
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut q = b.queue().unwrap();
    let mut r = vec![0u8; 8192];
    for t in 0..4u64 {
        for i in 0..32u64 {
            q.read((t * 32 + i) * 8192, &mut r).unwrap();
            assert_eq!(r, pattern(t * 100 + i, 8192));
        }
    }
}

/// Streamed writes: many requests of assorted sizes through fewer slots than requests,
/// the depth changing as they go; each lands where it should with its own data, every
/// completion is reported, and bad requests are refused with nothing written.
#[test]
fn streamed_writes_land_in_place_through_reused_slots() {
    let d = TempDir::new();
    let b = BackingFile::open(&d.file("disk", 16 << 20)).unwrap();
    let mut q = b.queue().unwrap();
    // 100 requests of 4-64 KiB, spread (not in address order) over 16 MiB.
    let reqs: Vec<(u64, usize)> = (0..100u64)
        .map(|i| {
            (
                ((i * 37) % 100) * (128 << 10),
                (1 + (i as usize * 7) % 16) * 4096,
            )
        })
        .collect();
    let (mut calls, mut done) = (0usize, 0usize);
    q.write_stream(
        reqs.len(),
        |i| reqs[i],
        64 << 10,
        || {
            calls += 1;
            1 + calls % 7
        },
        |i, slot| slot.copy_from_slice(&pattern(i as u64, slot.len())),
        |_| done += 1,
    )
    .unwrap();
    assert_eq!(done, reqs.len());
    let data = std::fs::read(b.path()).unwrap();
    for (i, &(off, len)) in reqs.iter().enumerate() {
        let o = off as usize;
        assert_eq!(
            &data[o..o + len],
            &pattern(i as u64, len)[..],
            "request {i}"
        );
    }
    // Out of range, misaligned or over the slot: refused before anything is written.
    for bad in [(16 << 20, 4096), (4097, 4096), (0, 128 << 10)] {
        let e = q
            .write_stream(
                2,
                |i| [(0, 4096), bad][i],
                64 << 10,
                || 4,
                |_, s| s.fill(0xEE),
                |_| {},
            )
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}: {e}");
    }
    assert_eq!(
        &std::fs::read(b.path()).unwrap()[..4096],
        &pattern(reqs.iter().position(|r| r.0 == 0).unwrap() as u64, 4096)[..]
    );
}
