//! Volume tests against real files: group commit through the target, write-zeroes and
//! trims outside write-back, direct writes in flight on the ring.

use super::*;

/// A 64 MiB file medium over a 64 MiB backing file in a fresh directory, formatted
/// (in `mode`, if given): (directory, backing path, volume).
fn test_volume(tag: &str, mode: Option<CacheMode>) -> (PathBuf, PathBuf, Arc<Volume>) {
    let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let backing = dir.join("backing");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut o = VolumeOptions::new(dir.join("cache"), backing.clone());
    o.pmem_size = Some(64 << 20);
    o.seg_size = 1 << 20;
    o.cache_mode = mode;
    (dir, backing, Volume::format(&o).unwrap())
}

/// Group commit on a `file` medium through the NBD handle: writes postpone their data
/// sync to `commit`, one sync covers them all, and FUA, FLUSH and kset closes (the
/// engine's `drain`) never leave postponed data behind a key.
#[test]
fn file_medium_group_commit_through_the_target() {
    let (dir, _, vol) = test_volume("pcache-vol-gc", None);
    let pm = vol.engine.pmem();
    assert_eq!(pm.mode(), Persistence::File);
    let t = Target(Arc::clone(&vol));
    let mut c = t.connect().unwrap();
    assert!(pm.group_commit());

    let syncs = pm.syncs();
    for i in 0..32u64 {
        c.write(i * 4096, &[i as u8; 4096], false).unwrap();
    }
    assert!(pm.pending(), "data syncs postponed to the commit");
    assert_eq!(pm.syncs(), syncs, "no sync per write");
    c.commit().unwrap();
    assert!(!pm.pending());
    assert_eq!(pm.syncs(), syncs + 1, "32 writes, one sync");

    // FLUSH drains before it closes the ksets.
    c.write(0, &[9; 4096], false).unwrap();
    assert!(pm.pending());
    c.flush().unwrap();
    assert!(!pm.pending());
    // FUA closes the write's kset, which drains first: durable on return.
    c.write(8192, &[7; 4096], true).unwrap();
    assert!(!pm.pending());
    // A kset closed by ticks (two of them) drains too.
    c.write(4096, &[5; 4096], false).unwrap();
    assert!(pm.pending());
    vol.engine.tick();
    vol.engine.tick();
    assert!(!pm.pending());
    let mut b = vec![0; 4096];
    c.read(4096, &mut b).unwrap();
    assert_eq!(b, vec![5; 4096]);
    // A read miss fills the cache without asking its reply to wait for a sync.
    c.commit().unwrap();
    let before = pm.syncs();
    c.read(32 << 20, &mut b).unwrap();
    c.commit().unwrap();
    assert_eq!(pm.syncs(), before, "reads alone never sync");
    assert!(pm.pending(), "the fill's data waits for the next drain");
    c.flush().unwrap();
    assert!(!pm.pending());
    drop(c);
    drop(t);
    drop(vol);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Outside write-back, write-zeroes and trims go to the backing file: they read
/// back as zeros, the file has the zeros, nothing is left dirty, and they count as
/// bypassed. Data cached clean (written in write-through) is invalidated.
#[test]
fn zeroes_and_trims_bypass_the_cache_outside_writeback() {
    let (dir, backing, vol) = test_volume("pcache-vol-zero", Some(CacheMode::WriteThrough));
    let t = Target(Arc::clone(&vol));
    let mut c = t.connect().unwrap();
    let mb = 1u64 << 20;
    for (i, mode) in [
        CacheMode::WriteThrough,
        CacheMode::WriteAround,
        CacheMode::PassThrough,
    ]
    .into_iter()
    .enumerate()
    {
        let p = vol.engine.policy().with(Some(mode), None, None);
        vol.engine.set_policy(p).unwrap();
        let base = i as u64 * 4 * mb;
        c.write(base, &vec![0xab; 4 * mb as usize], false).unwrap();
        let hits = vol.engine.stats().hits;
        let mut b = vec![0u8; 4096];
        c.read(base, &mut b).unwrap();
        let before = vol.engine.stats();
        c.write_zeroes(base + mb, mb, true, false).unwrap();
        c.trim(base + 2 * mb, mb, true).unwrap();
        let st = vol.engine.stats();
        assert_eq!(
            st.bypassed_requests,
            before.bypassed_requests + 2,
            "{mode:?}"
        );
        assert_eq!(st.write_zeroes, before.write_zeroes + 1);
        assert_eq!(st.discards, before.discards + 1);
        assert_eq!(vol.engine.dirty_bytes(), 0, "{mode:?} left dirty data");
        c.flush().unwrap();
        let mut got = vec![0u8; 4 * mb as usize];
        c.read(base, &mut got).unwrap();
        let file = std::fs::read(&backing).unwrap();
        let file = &file[base as usize..(base + 4 * mb) as usize];
        for (what, data) in [("read", &got[..]), ("backing file", file)] {
            let m = mb as usize;
            assert!(data[..m].iter().all(|&x| x == 0xab), "{mode:?} {what}");
            assert!(data[m..3 * m].iter().all(|&x| x == 0), "{mode:?} {what}");
            assert!(data[3 * m..].iter().all(|&x| x == 0xab), "{mode:?} {what}");
        }
        if mode == CacheMode::WriteThrough {
            assert!(
                hits < vol.engine.stats().hits,
                "write-through cached the data"
            );
        }
    }
    drop(c);
    drop(t);
    drop(vol);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reaps `c` until the requests `tags` were all reported; returns their results.
fn reap_all(c: &mut VolumeConn, tags: &[u64]) -> Vec<(u64, bool)> {
    let mut got = Vec::new();
    let t0 = std::time::Instant::now();
    while got.len() < tags.len() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "not reported: {got:?}"
        );
        c.reap(&mut |tag, r| got.push((tag, r.is_ok())));
    }
    got.sort();
    got
}

/// Direct writes go in flight from `try_write` and are reported by `reap`, ended in the
/// engine; a read, write or zeroing of their range, or a FLUSH, first waits for them,
/// so the handle always reads what it wrote and the newest write wins.
#[test]
fn direct_writes_go_in_flight_and_what_overlaps_them_waits() {
    let (dir, backing, vol) = test_volume("pcache-vol-held", Some(CacheMode::WriteAround));
    let t = Target(Arc::clone(&vol));
    let mut c = t.connect().unwrap();
    let on_disk = |off: usize| std::fs::read(&backing).unwrap()[off];
    let tags: Vec<u64> = (0..8).collect();
    for &i in &tags {
        match c.try_write(i * 65536, &[i as u8 + 1; 65536], false, None, i) {
            Tried::Started => {}
            t => panic!("write {i}: {t:?}"),
        }
    }
    assert_eq!(c.in_flight(), 8);
    let got = reap_all(&mut c, &tags);
    assert_eq!(got, tags.iter().map(|&t| (t, true)).collect::<Vec<_>>());
    assert_eq!(c.in_flight(), 0);
    assert_eq!(on_disk(7 * 65536), 8, "on the disk once reported");
    // Overlapping writes: the newer one wins on the disk and in reads.
    assert!(matches!(
        c.try_write(0, &[0x11; 8192], false, None, 20),
        Tried::Started
    ));
    assert!(matches!(
        c.try_write(4096, &[0x22; 4096], false, None, 21),
        Tried::Started
    ));
    let mut b = vec![0u8; 8192];
    c.read(0, &mut b).unwrap();
    assert_eq!((b[0], b[4096]), (0x11, 0x22), "reads see writes in flight");
    assert!(matches!(
        c.try_write(65536, &[0x33; 4096], false, None, 22),
        Tried::Started
    ));
    c.flush().unwrap();
    assert_eq!(
        on_disk(65536),
        0x33,
        "FLUSH waited for the writes in flight"
    );
    assert_eq!((on_disk(0), on_disk(4096)), (0x11, 0x22));
    assert_eq!(
        reap_all(&mut c, &[20, 21, 22]).len(),
        3,
        "all reported after"
    );
    assert!(matches!(
        c.try_write(131072, &[0x44; 4096], false, None, 23),
        Tried::Started
    ));
    c.write_zeroes(131072, 4096, false, false).unwrap();
    c.read(131072, &mut b[..4096]).unwrap();
    assert_eq!(
        b[..4096],
        [0u8; 4096][..],
        "zeroes after the write in flight"
    );
    // A FUA write and one through `write` run at once.
    assert!(matches!(
        c.try_write(196608, &[0x55; 4096], true, None, 24),
        Tried::Done(Ok(()))
    ));
    c.write(262144, &[0x66; 4096], false).unwrap();
    assert_eq!((on_disk(196608), on_disk(262144)), (0x55, 0x66));
    assert_eq!(reap_all(&mut c, &[23]).len(), 1);
    assert_eq!(vol.engine.dirty_bytes(), 0);
    let st = vol.engine.stats();
    assert!(st.bypassed_requests >= 14, "{}", st.bypassed_requests);
    // Left in flight at the drop: waited for, placeholder withdrawn.
    assert!(matches!(
        c.try_write(327680, &[0x77; 4096], false, None, 25),
        Tried::Started
    ));
    drop(c);
    assert_eq!(on_disk(327680), 0x77);
    let mut c = t.connect().unwrap();
    c.read(327680, &mut b[..4096]).unwrap();
    assert_eq!(b[..4096], [0x77; 4096][..]);
    drop(c);
    drop(t);
    drop(vol);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A read miss started by the reactor (`start_read`) is answered with the base's data
/// before its fill runs (`after_replies`, after the pass's replies are sent), and the
/// late fill stays coherent: a write over part of the range in between wins, the rest
/// is cached.
#[test]
fn read_miss_is_answered_before_its_fill() {
    use std::os::unix::fs::FileExt;
    let (dir, backing, vol) = test_volume("pcache-vol-async", None);
    let off = 8u64 << 20;
    let old = vec![0x5au8; 65536];
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&backing)
        .unwrap();
    f.write_all_at(&old, off).unwrap();
    f.sync_all().unwrap();
    let t = Target(Arc::clone(&vol));
    let mut c = t.connect().unwrap();
    let fills = vol.engine.stats().fills;
    let mut buf = vec![0u8; 65536];
    match c.start_read(off, &mut buf, 7) {
        Some(r) => assert_eq!(r.unwrap(), Filled::Data),
        None => {
            // In flight: reap until it is back.
            let mut got = None;
            while got.is_none() {
                c.reap(&mut |tag, r| {
                    assert_eq!(tag, 7);
                    got = Some(r.unwrap().to_vec());
                });
            }
            buf = got.unwrap();
        }
    }
    assert_eq!(buf, old, "the reply has the base's data");
    assert_eq!(c.in_flight(), 0);
    assert_eq!(vol.engine.stats().fills, fills, "answered before the fill");
    // A write lands between the reply and the fill.
    c.write(off, &[0xee; 4096], false).unwrap();
    c.after_replies();
    let st = vol.engine.stats();
    assert!(st.fills > fills, "the rest of the miss is cached");
    let hits = st.hits;
    let mut b = vec![0u8; 65536];
    c.read(off, &mut b).unwrap();
    assert_eq!(
        b[..4096],
        [0xee; 4096][..],
        "the newer write wins over the fill"
    );
    assert_eq!(b[4096..], old[4096..]);
    assert_eq!(
        vol.engine.stats().hits,
        hits + 1,
        "all of it from the cache now"
    );
    drop(c);
    drop(t);
    drop(vol);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A read miss of never-written space on a sparse base reads as zeros whichever way it
/// completes: at once as `Filled::Zero` with the buffer left alone (the front end sends a
/// hole, or zeros), at once as data, or later through `reap` (which of these depends on
/// the kernel and file system, so all three are accepted); a later read (a hit, once
/// cached) gives zeros too.
#[test]
fn a_read_of_a_hole_reads_as_zeros_however_it_completes() {
    let (dir, _backing, vol) = test_volume("pcache-vol-hole", None);
    let t = Target(Arc::clone(&vol));
    let mut c = t.connect().unwrap();
    let off = 16u64 << 20;
    let mut buf = vec![0xa5u8; 65536];
    let data = match c.start_read(off, &mut buf, 9) {
        Some(r) => match r.unwrap() {
            Filled::Zero => {
                assert!(buf.iter().all(|&b| b == 0xa5), "left alone");
                vec![0u8; 65536]
            }
            Filled::Data => buf.clone(),
        },
        None => {
            let mut got = None;
            while got.is_none() {
                c.reap(&mut |_, r| got = Some(r.unwrap().to_vec()));
            }
            got.unwrap()
        }
    };
    assert!(data.iter().all(|&b| b == 0), "a hole reads as zeros");
    c.after_replies();
    // Cached or not, another read of it through the engine gives zeros too.
    let mut again = vec![0xa5u8; 65536];
    c.read(off, &mut again).unwrap();
    assert!(again.iter().all(|&b| b == 0));
    drop(c);
    drop(t);
    drop(vol);
    let _ = std::fs::remove_dir_all(&dir);
}

/// With the write bypass on and the cache reclaiming (a low GC watermark), large
/// writes go to the backing file while small ones stay in the cache; whatever the mix
/// of overlaps, every read returns the newest data (checked against an oracle), and
/// nothing stays dirty that a bypassing write replaced.
#[test]
fn large_writes_bypass_a_reclaiming_cache_coherently() {
    let (dir, _, vol) = test_volume("pcache-vol-bypass", None);
    vol.engine.set_gc_percent(5).unwrap();
    let p = vol.engine.policy().with_write_bypass(Some(64));
    vol.engine.set_policy(p).unwrap();
    let bg = vol.start_background().unwrap();
    let t = Target(Arc::clone(&vol));
    let mut c = t.connect().unwrap();
    let span = 48usize << 20;
    let mut oracle = vec![0u8; span];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let sizes = [4096usize, 16384, 65536, 131072, 262144];
    let mut b = vec![0u8; 262144];
    for i in 0..3000u32 {
        let len = sizes[rnd(sizes.len() as u64) as usize];
        let off = rnd(((span - len) / 4096) as u64) as usize * 4096;
        if rnd(3) == 0 {
            let got = &mut b[..len];
            c.read(off as u64, got).unwrap();
            assert!(got[..] == oracle[off..off + len], "read {i} at {off}+{len}");
        } else {
            let v = (i % 251) as u8 + 1;
            oracle[off..off + len].fill(v);
            c.write(off as u64, &oracle[off..off + len], false).unwrap();
        }
        if rnd(8) == 0 {
            c.commit().unwrap();
        }
        if rnd(64) == 0 {
            c.flush().unwrap();
        }
    }
    c.commit().unwrap();
    let st = vol.engine.stats();
    assert!(st.bypassed_requests > 0, "large writes bypassed the cache");
    assert!(st.writes > st.bypassed_requests, "small writes were cached");
    let mut all = vec![0u8; 1 << 20];
    for mb in 0..span >> 20 {
        c.read((mb << 20) as u64, &mut all).unwrap();
        assert!(all[..] == oracle[mb << 20..(mb + 1) << 20], "MiB {mb}");
    }
    drop(c);
    drop(t);
    vol.shutdown().unwrap();
    bg.join().unwrap();
    drop(vol);
    let _ = std::fs::remove_dir_all(&dir);
}
