//! Targeted engine scenarios, one behaviour each: data CRC on read hits (clean data falls
//! back to the backing device, dirty data is an error), attach refusals (blank, foreign,
//! corrupt, wrong backing device), persisted gc_percent, clean data surviving a restart,
//! writeback errors, a full cache recovering through writeback and GC, zero/discard
//! ranges (also routed to the backing device outside write-back), and write batches
//! (`Engine::write_many`) against an oracle.

mod common;

use pcache::engine::{
    BackingIdentity, Channel, Config, Engine, FormatOptions, IoError, OpenError, Pmem, WbBatch,
    WbKind, WbNext,
};
use pcache::env::sim::pmem::SimPmem;
use pcache::env::sim::rng::Rng;
use pcache::runtime::sched;
use std::sync::Arc;

const SEG: u32 = 64 << 10;
const SIZE: u64 = 8 << 20;

fn id() -> BackingIdentity {
    BackingIdentity {
        size: SIZE,
        block_size: 512,
        id: "disk-a".into(),
    }
}

fn cfg() -> Config {
    Config {
        log_reserve: 2,
        ..Config::default()
    }
}

fn new_engine(segs: u64, data_crc: bool) -> (Arc<SimPmem>, Engine<Arc<SimPmem>>) {
    let pmem = Arc::new(SimPmem::new(
        pcache::engine::format::SEGMENTS_OFF + segs * SEG as u64,
    ));
    let mut fo = FormatOptions::new(id(), 1);
    fo.seg_size = SEG;
    fo.data_crc = data_crc;
    let e = Engine::format(pmem.clone(), &fo, &cfg()).unwrap();
    (pmem, e)
}

fn reopen(pmem: &SimPmem) -> Engine<Arc<SimPmem>> {
    Engine::open(
        Arc::new(SimPmem::from_image(pmem.image())),
        &id(),
        false,
        &cfg(),
    )
    .unwrap()
}

/// Reads with misses served from `backing` (a byte image of the device).
fn read(
    e: &Engine<Arc<SimPmem>>,
    ch: &mut Channel,
    backing: &[u8],
    off: u64,
    len: usize,
) -> Result<Vec<u8>, IoError> {
    let mut buf = vec![0u8; len];
    e.read(ch, off, &mut buf)?;
    let misses: Vec<_> = ch.misses().collect();
    for m in misses {
        let o = off as usize + m.at;
        buf[m.at..m.at + m.len].copy_from_slice(&backing[o..o + m.len]);
    }
    e.fill(ch, off, &buf, true);
    Ok(buf)
}

/// The medium offset of the data of the extent cached at `off` (via writeback items).
fn flip_cached_byte(pmem: &SimPmem, e: &Engine<Arc<SimPmem>>, off: u64) {
    let mut found = None;
    e.walk_log(|k, _| {
        if k.off == off && k.has_data() {
            found = Some(e.geometry().data_off(k.seg, k.seg_off as u64));
        }
    })
    .unwrap();
    let at = found.expect("key in the log");
    let mut b = [0u8; 1];
    pmem.read(at + 7, &mut b);
    b[0] ^= 0xff;
    pmem.write(at + 7, &b);
}

#[test]
fn crc_failure_on_clean_hit_falls_back_to_backing() {
    let (pmem, e) = new_engine(12, true);
    let backing = vec![0x33u8; SIZE as usize];
    let mut ch = Channel::default();
    assert_eq!(
        read(&e, &mut ch, &backing, 4096, 4096).unwrap(),
        vec![0x33; 4096]
    );
    e.flush().unwrap();
    assert_eq!(e.stats().fills, 1);
    flip_cached_byte(&pmem, &e, 4096);
    assert_eq!(
        read(&e, &mut ch, &backing, 4096, 4096).unwrap(),
        vec![0x33; 4096]
    );
    assert_eq!(e.stats().crc_errors_clean, 1);
    e.check_invariants(&[&ch]).unwrap();
}

#[test]
fn crc_failure_on_dirty_hit_is_an_error_and_leaks_nothing() {
    let (pmem, e) = new_engine(12, true);
    let backing = vec![0u8; SIZE as usize];
    let mut ch = Channel::default();
    e.write(&mut ch, 8192, &[0x44; 4096], false).unwrap();
    e.flush().unwrap();
    flip_cached_byte(&pmem, &e, 8192);
    // The read spans a gap (a miss with a placeholder) and the corrupt extent.
    assert_eq!(
        read(&e, &mut ch, &backing, 4096, 8192),
        Err(IoError::Corrupt)
    );
    assert_eq!(e.stats().crc_errors_dirty, 1);
    // The gap's placeholder was withdrawn: a new read of it fills normally.
    assert_eq!(
        read(&e, &mut ch, &backing, 4096, 4096).unwrap(),
        vec![0; 4096]
    );
    assert_eq!(e.stats().fills, 1);
}

#[test]
fn attach_refusals() {
    let blank = Arc::new(SimPmem::new(4 << 20));
    assert_eq!(
        Engine::open(blank, &id(), false, &cfg()).err(),
        Some(OpenError::Blank)
    );
    let foreign = SimPmem::new(4 << 20);
    foreign.write(100, b"not a cache");
    assert_eq!(
        Engine::open(Arc::new(foreign), &id(), false, &cfg()).err(),
        Some(OpenError::Foreign)
    );

    let (pmem, _e) = new_engine(12, false);
    let other = BackingIdentity {
        id: "disk-b".into(),
        ..id()
    };
    let img = || Arc::new(SimPmem::from_image(pmem.image()));
    assert!(matches!(
        Engine::open(img(), &other, false, &cfg()),
        Err(OpenError::WrongBacking(_))
    ));
    assert!(
        Engine::open(img(), &other, true, &cfg()).is_ok(),
        "--force attaches"
    );
    let bigger = BackingIdentity {
        size: SIZE * 2,
        ..id()
    };
    assert!(matches!(
        Engine::open(img(), &bigger, true, &cfg()),
        Err(OpenError::WrongBacking(_))
    ));

    // Both superblock replicas corrupt: an error, never a blank cache.
    let bad = pmem.image();
    let mut bad = bad;
    bad[40] ^= 1;
    bad[4096 + 40] ^= 1;
    let r = Engine::open(Arc::new(SimPmem::from_image(bad)), &id(), false, &cfg());
    assert!(matches!(r, Err(OpenError::Corrupt(_))), "{:?}", r.err());
    // One replica corrupt: still opens.
    let mut one = pmem.image();
    one[40] ^= 1;
    assert!(Engine::open(Arc::new(SimPmem::from_image(one)), &id(), false, &cfg()).is_ok());
}

#[test]
fn gc_percent_and_clean_data_survive_restart() {
    let (pmem, e) = new_engine(12, false);
    e.set_gc_percent(35).unwrap();
    assert!(e.set_gc_percent(96).is_err());
    let backing = vec![0x5au8; SIZE as usize];
    let mut ch = Channel::default();
    read(&e, &mut ch, &backing, 0, 65536).unwrap();
    e.release_channel(&mut ch);
    e.flush().unwrap();
    let e2 = reopen(&pmem);
    assert_eq!(e2.gc_percent(), 35);
    let mut ch = Channel::default();
    let mut buf = vec![0u8; 65536];
    assert_eq!(
        e2.read(&mut ch, 0, &mut buf).unwrap(),
        0,
        "clean data is a hit after restart"
    );
    assert_eq!(buf, vec![0x5a; 65536]);
}

fn drain(e: &Engine<Arc<SimPmem>>, backing: &mut [u8], fail: bool) -> usize {
    let mut wb = WbBatch::default();
    let mut n = 0;
    while e.writeback_next(&mut wb) == WbNext::Ready {
        if fail {
            e.writeback_done(&wb, false);
            return n;
        }
        common::apply(e, &wb, backing);
        e.writeback_done(&wb, true);
        n += 1;
    }
    n
}

#[test]
fn writeback_errors_keep_data_dirty_then_retry() {
    let (_pmem, e) = new_engine(12, false);
    let mut backing = vec![0u8; SIZE as usize];
    let mut ch = Channel::default();
    e.write(&mut ch, 0, &[9; 8192], false).unwrap();
    e.flush().unwrap();
    drain(&e, &mut backing, true);
    assert_eq!(e.stats().writeback_errors, 1);
    assert_eq!(e.dirty_bytes(), 8192);
    assert!(drain(&e, &mut backing, false) > 0);
    assert_eq!(e.dirty_bytes(), 0);
    assert_eq!(&backing[..8192], &[9; 8192][..]);
}

#[test]
fn full_cache_recovers_through_writeback_and_gc() {
    let (_pmem, e) = new_engine(8, false);
    let mut backing = vec![0u8; SIZE as usize];
    let mut ch = Channel::default();
    let block = vec![7u8; 16384];
    let mut busy = 0;
    for i in 0..200u64 {
        let off = (i * 16384) % SIZE;
        loop {
            match e.write(&mut ch, off, &block, false) {
                Ok(()) => break,
                Err(IoError::Busy) => {
                    busy += 1;
                    assert!(busy < 10_000, "no progress");
                    let _ = e.flush();
                    drain(&e, &mut backing, false);
                    e.gc(&mut Vec::new());
                }
                Err(x) => panic!("{x}"),
            }
        }
    }
    assert!(busy > 0, "the cache must have filled up");
    assert!(e.stats().segments_reclaimed > 0);
    e.check_invariants(&[&ch]).unwrap();
}

#[test]
fn zeroes_and_discards_read_as_zero_and_write_back() {
    let (pmem, e) = new_engine(12, false);
    let mut backing = vec![0xeeu8; SIZE as usize];
    let mut ch = Channel::default();
    e.write(&mut ch, 0, &[1; 16384], false).unwrap();
    e.write_zeroes(4096, 4096, false, false).unwrap();
    e.write_zeroes(12288, 1 << 20, true, true).unwrap(); // crosses nothing, FUA
    assert!(e.write_zeroes(SIZE - 512, 1024, false, false) == Err(IoError::OutOfRange));
    assert!(e.write_zeroes(100, 512, false, false) == Err(IoError::Unaligned));
    let got = read(&e, &mut ch, &backing, 0, 16384).unwrap();
    assert_eq!(&got[..4096], &[1; 4096][..]);
    assert_eq!(&got[4096..8192], &[0; 4096][..]);
    assert_eq!(&got[12288..], &[0; 4096][..]);
    e.flush().unwrap();
    let e2 = reopen(&pmem);
    let mut ch2 = Channel::default();
    let got = read(&e2, &mut ch2, &backing, 4096, 4096).unwrap();
    assert_eq!(got, vec![0; 4096], "zeroes survive replay");
    drain(&e, &mut backing, false);
    assert_eq!(&backing[4096..8192], &[0; 4096][..]);
    assert_eq!(&backing[12288..12288 + (1 << 20)], &vec![0u8; 1 << 20][..]);
    assert_eq!(
        &backing[(1 << 20) + 12288..(1 << 20) + 12288 + 16],
        &[0xee; 16][..]
    );
}

/// Writeback leaves out dirty data that a newer write of the same epoch covers once
/// that newer key is in the log; never while the newer key is still buffered, never
/// across a FLUSH or a FUA write, and the backing device ends up with the newest data.
#[test]
fn writeback_skips_superseded_data_only_within_an_epoch() {
    let pmem = Arc::new(SimPmem::new(
        pcache::engine::format::SEGMENTS_OFF + 16 * SEG as u64,
    ));
    let mut fo = FormatOptions::new(id(), 1);
    fo.seg_size = SEG;
    fo.kset_keys = 4; // a kset closes after four keys
    let e = Engine::format(pmem, &fo, &cfg()).unwrap();
    let mut ch = Channel::default();
    let mut backing = vec![0u8; SIZE as usize];
    // All in the first 4 MiB region: one kset buffer, so keys close in write order.
    let w = |ch: &mut Channel, blk: u64, v: u8, fua: bool| {
        e.write(ch, blk * 4096, &[v; 4096], fua).unwrap()
    };
    // Writes back the next kset; returns the blocks it wrote.
    let next = |backing: &mut [u8]| -> Vec<u64> {
        let mut wb = WbBatch::with_window(1);
        assert_eq!(e.writeback_next(&mut wb), WbNext::Ready);
        for it in &wb.items {
            let dst = &mut backing[it.off as usize..it.off as usize + it.len as usize];
            if let WbKind::Data { pmem_off } = it.kind {
                e.pmem().read(pmem_off, dst);
            }
        }
        e.writeback_done(&wb, true);
        wb.items.iter().map(|i| i.off / 4096).collect()
    };

    // Kset 1: block 0 (v1), 1, 2, 3. Block 0 rewritten (v2) into the open buffer.
    for b in 0..4 {
        w(&mut ch, b, 1, false);
    }
    w(&mut ch, 0, 2, false);
    assert_eq!(
        next(&mut backing),
        vec![0, 1, 2, 3],
        "newer key still buffered"
    );

    // Kset 2: block 0 (v2), 4, 5, 6; kset 3: block 4 (v2), 7, 8, 9. Kset 3 is in the
    // log, same epoch: block 4's older copy is left out.
    for b in 4..7 {
        w(&mut ch, b, 1, false);
    }
    w(&mut ch, 4, 2, false);
    for b in 7..10 {
        w(&mut ch, b, 1, false);
    }
    assert_eq!(next(&mut backing), vec![0, 5, 6]);
    assert_eq!(e.stats().writeback_skipped_bytes, 4096);
    assert_eq!(next(&mut backing), vec![4, 7, 8, 9]);

    // A FLUSH between two writes of block 10, then a FUA between two of block 20:
    // both older copies are written back.
    for b in 10..14 {
        w(&mut ch, b, 1, false);
    }
    e.flush().unwrap();
    w(&mut ch, 10, 2, false);
    for b in 20..23 {
        w(&mut ch, b, 1, false);
    }
    w(&mut ch, 30, 1, true); // FUA: closes kset 5 and starts a new epoch
    w(&mut ch, 20, 2, false);
    for b in 31..34 {
        w(&mut ch, b, 1, false);
    }
    assert_eq!(next(&mut backing), vec![10, 11, 12, 13]);
    assert_eq!(next(&mut backing), vec![10, 20, 21, 22]);
    assert_eq!(next(&mut backing), vec![30]);
    assert_eq!(next(&mut backing), vec![20, 31, 32, 33]);
    assert_eq!(e.stats().writeback_skipped_bytes, 4096);
    assert_eq!(e.dirty_bytes(), 0);
    for (b, v) in [(0, 2), (4, 2), (10, 2), (20, 2), (1, 1), (33, 1)] {
        assert_eq!(backing[b * 4096], v, "block {b}");
    }
}

/// Writeback waits while little dirty data is closed and writes keep coming (so
/// overwrites can supersede it), and runs once writes stop for a tick, once dirty data
/// passes seven eighths of the GC watermark, or when GC finds nothing clean.
#[test]
fn writeback_waits_for_pressure_or_idleness() {
    let (_pmem, e) = new_engine(16, false);
    e.set_gc_percent(70).unwrap(); // 7/8 of 95% would not fit beside the reserve
    let mut ch = Channel::default();
    assert!(!e.writeback_wanted(), "nothing closed");
    e.write(&mut ch, 0, &[1; 4096], false).unwrap();
    e.flush().unwrap();
    e.tick(); // a write since the previous tick: busy
    assert!(!e.writeback_wanted(), "a little dirty data while busy");
    e.tick(); // no write in this period: idle
    assert!(e.writeback_wanted(), "idle");
    let mut backing = vec![0u8; SIZE as usize];
    drain(&e, &mut backing, false);
    assert!(!e.writeback_wanted(), "all written back");

    // Busy again, with closed dirty data past 7/8 of gc_percent of the capacity.
    let cap = 16 * (SEG as u64 - 4096);
    let gc = e.gc_percent() as u64;
    let mut off = 0;
    while off * 800 < cap * 7 * gc {
        e.write(&mut ch, off, &[2; 65536], false).unwrap();
        off += 65536;
        e.tick();
        if off * 800 < cap * 7 * gc - 65536 * 800 {
            e.flush().unwrap();
            assert!(!e.writeback_wanted(), "{off} dirty bytes while busy");
        }
    }
    e.flush().unwrap();
    assert!(e.writeback_wanted(), "{off} dirty bytes");
}

/// A writeback window takes consecutive ksets of one epoch (newest data wins, sorted by
/// address, at most the window's size) and never reaches across a FLUSH.
#[test]
fn writeback_windows_stay_inside_an_epoch() {
    let pmem = Arc::new(SimPmem::new(
        pcache::engine::format::SEGMENTS_OFF + 16 * SEG as u64,
    ));
    let mut fo = FormatOptions::new(id(), 1);
    fo.seg_size = SEG;
    fo.kset_keys = 4;
    let e = Engine::format(pmem, &fo, &cfg()).unwrap();
    let mut ch = Channel::default();
    let w = |ch: &mut Channel, blk: u64, v: u8| e.write(ch, blk * 4096, &[v; 4096], false).unwrap();
    // Epoch 1: ksets [9 8 7 6] [5 4 3 9'] [2 1]; FLUSH; epoch 2: [11 10].
    for b in [9, 8, 7, 6, 5, 4, 3] {
        w(&mut ch, b, 1);
    }
    w(&mut ch, 9, 2);
    w(&mut ch, 2, 1);
    w(&mut ch, 1, 1);
    e.flush().unwrap();
    w(&mut ch, 11, 1);
    w(&mut ch, 10, 1);
    e.flush().unwrap();
    let mut wb = WbBatch::with_window(2);
    let mut backing = vec![0u8; SIZE as usize];
    let mut batch = |wb: &mut WbBatch| -> Vec<(u64, u8)> {
        assert_eq!(e.writeback_next(wb), WbNext::Ready);
        let got = wb
            .items
            .iter()
            .map(|it| {
                let dst = &mut backing[it.off as usize..it.off as usize + it.len as usize];
                if let WbKind::Data { pmem_off } = it.kind {
                    e.pmem().read(pmem_off, dst);
                }
                (it.off / 4096, dst[0])
            })
            .collect();
        e.writeback_done(wb, true);
        got
    };
    // Two ksets, block 9 once with its newer data, in address order.
    assert_eq!(
        batch(&mut wb),
        vec![(3, 1), (4, 1), (5, 1), (6, 1), (7, 1), (8, 1), (9, 2)]
    );
    // The rest of epoch 1 alone: the FLUSH ends the window.
    assert_eq!(batch(&mut wb), vec![(1, 1), (2, 1)]);
    assert_eq!(batch(&mut wb), vec![(10, 1), (11, 1)]);
    assert_eq!(e.writeback_next(&mut wb), WbNext::Idle);
    assert_eq!(e.dirty_bytes(), 0);
}

/// Outside write-back, write-zeroes and discards go to the backing device: the cached
/// copy is invalidated (reads miss while the backing command runs and after it), the
/// zeroes are counted as bypassed, nothing dirty is left, and a read miss over it
/// before a FLUSH covers the backing command is cached unsynced (a replay keeps it only
/// once a backing FLUSH covered its kset).
#[test]
fn zeroes_bypass_the_cache_outside_writeback() {
    let (pmem, e) = new_engine(12, false);
    let mut backing = vec![0u8; SIZE as usize];
    let mut ch = Channel::default();
    e.write(&mut ch, 0, &[3; 16384], false).unwrap();
    e.flush().unwrap();
    drain(&e, &mut backing, false);
    assert!(!e.zeroes_direct(), "write-back keeps zeroes in the cache");
    let p = e
        .policy()
        .with(Some(pcache::engine::CacheMode::WriteAround), None, None);
    e.set_policy(p).unwrap();
    assert!(e.zeroes_direct());
    let d = e
        .begin_direct(4096, 8192, false)
        .unwrap()
        .expect("clean data only");
    // While the backing command runs, reads of the range miss (the old data is gone).
    let mut buf = vec![0u8; 16384];
    e.read(&mut ch, 0, &mut buf).unwrap();
    let misses: Vec<_> = ch.misses().map(|m| (m.at, m.len)).collect();
    assert_eq!(misses, vec![(4096, 8192)]);
    backing[4096..12288].fill(0);
    e.end_direct_zeroes(4096, 8192, d, true, false);
    let s = e.stats();
    assert_eq!((s.write_zeroes, s.bypassed_requests), (1, 1));
    assert_eq!(e.dirty_bytes(), 0);
    let got = read(&e, &mut ch, &backing, 0, 16384).unwrap();
    assert_eq!(&got[..4096], &[3; 4096][..]);
    assert_eq!(&got[4096..12288], &[0; 8192][..]);
    assert_eq!(&got[12288..], &[3; 4096][..]);
    // Not yet flushed: misses are cached, but one over the zeroed range only as
    // unsynced (a restart before a backing FLUSH covers it drops it), one elsewhere
    // plainly.
    read(&e, &mut ch, &backing, 1 << 20, 4096).unwrap();
    read(&e, &mut ch, &backing, 4096, 4096).unwrap();
    assert!(hits(&e, &mut ch, 1 << 20) && hits(&e, &mut ch, 4096));
    e.flush().unwrap();
    let e2 = reopen(&pmem);
    let mut ch2 = Channel::default();
    assert!(
        hits(&e2, &mut ch2, 1 << 20),
        "a range no direct write touched"
    );
    assert!(
        !hits(&e2, &mut ch2, 4096),
        "unsynced and not covered: dropped"
    );
    let m = e.direct_flush_needed().expect("a flush is owed");
    e.direct_flushed(m);
    assert_eq!(e.direct_flush_needed(), None);
    let e2 = reopen(&pmem);
    assert!(
        hits(&e2, &mut ch2, 4096),
        "covered by the backing FLUSH: kept"
    );
    // A failed backing command changes nothing but drops the placeholder.
    let d = e.begin_direct(0, 4096, false).unwrap().unwrap();
    e.end_direct_zeroes(0, 4096, d, false, true);
    assert_eq!(e.stats().discards, 0);
    e.check_invariants(&[&ch]).unwrap();
}

/// Whether a read of the 4 KiB at `off` hits (nothing to read from the backing device).
fn hits(e: &Engine<Arc<SimPmem>>, ch: &mut Channel, off: u64) -> bool {
    let mut buf = vec![0u8; 4096];
    let missed = e.read(ch, off, &mut buf).unwrap();
    if missed > 0 {
        e.fill(ch, off, &buf, false);
    }
    missed == 0
}

/// Only the latest unflushed direct writes are known by range: past that many, every
/// miss is cached unsynced until a FLUSH covers them all.
#[test]
fn too_many_unflushed_direct_writes_make_every_fill_unsynced() {
    let (pmem, e) = new_engine(12, false);
    let backing = vec![0u8; SIZE as usize];
    let mut ch = Channel::default();
    let p = e
        .policy()
        .with(Some(pcache::engine::CacheMode::WriteAround), None, None);
    e.set_policy(p).unwrap();
    for i in 0..100u64 {
        let d = e.begin_direct(i * 4096, 4096, false).unwrap().unwrap();
        e.end_direct_uncached(i * 4096, 4096, d, true);
    }
    let far = 4 << 20;
    read(&e, &mut ch, &backing, far, 4096).unwrap();
    assert!(hits(&e, &mut ch, far), "cached");
    e.flush().unwrap();
    assert!(
        !hits(&reopen(&pmem), &mut Channel::default(), far),
        "forgotten unflushed ranges: the fill is unsynced"
    );
    e.direct_flushed(e.direct_mark());
    let far2 = far + 8192;
    read(&e, &mut ch, &backing, far2, 4096).unwrap();
    e.flush().unwrap();
    let e2 = reopen(&pmem);
    let mut ch2 = Channel::default();
    assert!(hits(&e2, &mut ch2, far), "covered by the FLUSH");
    assert!(hits(&e2, &mut ch2, far2), "plain after the FLUSH");
    e.check_invariants(&[&ch]).unwrap();
}

/// A write-through completes without a backing FLUSH: it is cached at once (reads hit),
/// a FLUSH is owed for it, and a replay keeps its clean copy only once a backing FLUSH
/// issued after its kset closed has completed. The drop survives a later FLUSH: the
/// flush record keeps the dropped ksets, so a second restart does not bring them back.
#[test]
fn write_through_is_cached_unsynced_until_a_backing_flush_covers_it() {
    let (pmem, e) = new_engine(12, false);
    let mut ch = Channel::default();
    let p = e
        .policy()
        .with(Some(pcache::engine::CacheMode::WriteThrough), None, None);
    e.set_policy(p).unwrap();
    let wt = |e: &Engine<Arc<SimPmem>>, ch: &mut Channel, off: u64, v: u8| {
        let d = e.begin_direct(off, 4096, true).unwrap().unwrap();
        e.end_direct(ch, off, &[v; 4096], d, true);
    };
    wt(&e, &mut ch, 0, 1);
    assert!(hits(&e, &mut ch, 0), "cached without a backing FLUSH");
    assert!(e.direct_flush_needed().is_some(), "a FLUSH is owed");
    // A backing FLUSH issued while its kset is still open covers the write, not the key.
    let early = e.direct_mark();
    e.direct_flushed(early);
    e.flush().unwrap();
    assert!(
        e.direct_flush_needed().is_some(),
        "the closed kset's unsynced key still owes one"
    );
    assert!(!hits(&reopen(&pmem), &mut Channel::default(), 0));
    let m = e.direct_flush_needed().unwrap();
    e.direct_flushed(m);
    assert_eq!(e.direct_flush_needed(), None);
    assert!(hits(&reopen(&pmem), &mut Channel::default(), 0), "covered");
    // A crash before a FLUSH: dropped at replay, and still dropped after the replayed
    // cache flushes the backing device for newer ksets.
    wt(&e, &mut ch, 8192, 2);
    e.flush().unwrap();
    let img = pmem.image();
    let p2 = Arc::new(SimPmem::from_image(img));
    let e2 = Engine::open(p2.clone(), &id(), false, &cfg()).unwrap();
    assert_eq!(e2.replay_unsynced_dropped(), 1);
    let mut ch2 = Channel::default();
    assert!(hits(&e2, &mut ch2, 0) && !hits(&e2, &mut ch2, 8192));
    wt(&e2, &mut ch2, 16384, 3);
    e2.flush().unwrap();
    let m = e2.direct_flush_needed().unwrap();
    e2.direct_flushed(m);
    let r = e2.flush_record();
    assert!(r.drop_lo > 0 && r.drop_hi >= r.drop_lo && r.through > r.drop_hi);
    let e3 = Engine::open(
        Arc::new(SimPmem::from_image(p2.image())),
        &id(),
        false,
        &cfg(),
    )
    .unwrap();
    let mut ch3 = Channel::default();
    assert!(hits(&e3, &mut ch3, 16384), "covered");
    assert!(!hits(&e3, &mut ch3, 8192), "stays dropped");
    e3.check_invariants(&[&ch3]).unwrap();
    e.check_invariants(&[&ch]).unwrap();
}

#[test]
fn paced_writes_overdraw_only_below_halfway_to_full() {
    // 40 segments, GC watermark 70%: pacing from 28 used, overdraw up to 33, halfway to
    // the 38 that the log reserve leaves.
    let (_pmem, e) = new_engine(40, false);
    e.set_gc_percent(70).unwrap();
    let mut backing = vec![0u8; SIZE as usize];
    let mut ch = Channel::default();
    let block = vec![5u8; 4096];
    let used = |e: &Engine<Arc<SimPmem>>| e.stats().segments_used as u64;
    let (mut off, mut paced) = (0u64, false);
    // Fill until pacing refuses a write (the runtime asks gc_wanted every poll).
    while !paced {
        e.gc_wanted();
        match e.write(&mut ch, off, &block, false) {
            Ok(()) => off = (off + 4096) % SIZE,
            Err(IoError::Busy) => paced = true,
            Err(x) => panic!("{x}"),
        }
        assert!(off != 0, "pacing never began");
    }
    assert!(used(&e) * 100 >= 40 * 70, "paced below the watermark");
    assert_eq!(e.stats().paced_writes, 1);
    // Paced writers wait on writeback: it keeps its full depth even beside read misses.
    assert!(e.writers_wait_on_writeback());
    assert_eq!(sched::writeback_depth(&e, 3, 2, 16), 16);
    // Overdrawing lets one write in at a time while the cache has headroom.
    let mut overdrawn = 0;
    while e.overdraw() {
        e.gc_wanted();
        e.write(&mut ch, off, &block, false).unwrap();
        off = (off + 4096) % SIZE;
        overdrawn += 1;
        assert!(overdrawn < 100_000, "overdraw never stopped");
    }
    assert!(overdrawn > 0);
    assert_eq!(e.stats().overdrawn_writes, overdrawn);
    assert!(used(&e) * 2 >= 28 + 38, "overdraw stopped early");
    assert!(used(&e) < 40, "overdraw filled the cache");
    assert_eq!(
        e.write(&mut ch, off, &block, false),
        Err(IoError::Busy),
        "past halfway a write waits for writeback"
    );
    // Writeback earns credit again.
    e.flush().unwrap();
    drain(&e, &mut backing, false);
    e.gc(&mut Vec::new());
    e.gc_wanted();
    // Nobody waits on writeback any more: read misses go first again.
    assert!(!e.writers_wait_on_writeback());
    assert_eq!(sched::writeback_depth(&e, 3, 2, 16), 2);
    assert_eq!(sched::writeback_depth(&e, 0, 2, 16), 16);
    e.write(&mut ch, off, &block, false).unwrap();
    e.check_invariants(&[&ch]).unwrap();
}

#[test]
fn pacing_starts_when_a_writer_opens_a_segment_not_at_the_next_poll() {
    // No runtime poll at all: the writer's own segment opens switch pacing on, before
    // the cache can run full.
    let (_pmem, e) = new_engine(40, false);
    e.set_gc_percent(70).unwrap();
    let mut ch = Channel::default();
    let block = vec![5u8; 4096];
    let mut off = 0u64;
    loop {
        match e.write(&mut ch, off, &block, false) {
            Ok(()) => off += 4096,
            Err(IoError::Busy) => break,
            Err(x) => panic!("{x}"),
        }
        assert!(off < SIZE, "pacing never began");
    }
    let s = e.stats();
    assert_eq!((s.paced_writes, s.cache_full_events), (1, 0));
    assert!(
        s.segments_used as u64 * 100 >= 40 * 70,
        "paced below the watermark"
    );
    e.check_invariants(&[&ch]).unwrap();
}

#[test]
fn pacing_runs_writeback_only_from_the_dirty_floor() {
    // Written back entirely, a cache at its watermark is clean: writers get in as GC
    // reclaims, and pacing does not make writeback run until dirty data reaches the
    // floor (half the watermark), so dirty data is kept for overwrites to supersede.
    // Small ksets: closed dirty data from the first writes on.
    let pmem = Arc::new(SimPmem::new(
        pcache::engine::format::SEGMENTS_OFF + 40 * SEG as u64,
    ));
    let mut fo = FormatOptions::new(id(), 1);
    fo.seg_size = SEG;
    fo.kset_keys = 4;
    let e = Engine::format(pmem, &fo, &cfg()).unwrap();
    e.set_gc_percent(70).unwrap();
    let mut backing = vec![0u8; SIZE as usize];
    let mut ch = Channel::default();
    let block = vec![6u8; 4096];
    let mut off = 0u64;
    while e.stats().segments_used < 27 {
        e.write(&mut ch, off, &block, false).unwrap();
        off = (off + 4096) % SIZE;
    }
    e.flush().unwrap();
    drain(&e, &mut backing, false);
    let floor = 28 * (SEG as u64 - 4096) / 2;
    let (mut paced, mut over, mut wanted_below) = (0, 0, 0);
    while e.stats().dirty_bytes < floor {
        e.gc(&mut Vec::new());
        match e.write(&mut ch, off, &block, false) {
            Ok(()) => off = (off + 4096) % SIZE,
            Err(IoError::Busy) => paced += 1,
            Err(x) => panic!("{x}"),
        }
        e.tick(); // writes keep coming: not idle
                  // Only over the watermark, where writers are paced, and with closed dirty data
                  // (below, windows of ksets with no dirty data run whenever there are some).
        let st = e.stats();
        if st.segments_used >= 28 && (4 * 4096..floor).contains(&st.dirty_bytes) {
            over += 1;
            wanted_below += e.writeback_wanted() as u32;
        }
        assert!(paced < 10_000, "paced writers never got in");
    }
    assert_eq!(wanted_below, 0, "writeback ran below the floor");
    assert!(over > 0, "never over the watermark");
    // Past the floor, a paced writer makes writeback run.
    e.flush().unwrap();
    while e.write(&mut ch, off, &block, false).is_ok() {
        off = (off + 4096) % SIZE;
    }
    assert!(e.writeback_wanted());
    assert_eq!(e.stats().cache_full_events, 0);
    e.check_invariants(&[&ch]).unwrap();
}

#[test]
fn segment_size_follows_the_medium_when_not_given() {
    use pcache::engine::format::auto_seg_size;
    assert_eq!(auto_seg_size(256 << 20), 2 << 20);
    assert_eq!(auto_seg_size(1 << 30), 8 << 20);
    assert_eq!(auto_seg_size(2 << 30), 16 << 20);
    assert_eq!(auto_seg_size(1 << 40), 16 << 20);
    assert_eq!(auto_seg_size(16 << 20), 1 << 20);
    assert_eq!(auto_seg_size(0), 1 << 20);
    // FormatOptions::new leaves it to the format: an 8 MiB medium gets 1 MiB segments.
    let pmem = Arc::new(SimPmem::new(8 << 20));
    let e = Engine::format(pmem, &FormatOptions::new(id(), 1), &cfg()).unwrap();
    assert_eq!(e.geometry().seg_size, 1 << 20);
}

/// A direct write over a range with nothing cached logs no tombstone (a stream past the
/// cutoff used to close a kset per write); over cached data, or while the log may still
/// hold clean keys `invalidate_clean` dropped, it does, so a replay never shows older data.
#[test]
fn direct_writes_log_a_tombstone_only_where_replay_could_show_older_data() {
    let (pmem, e) = new_engine(12, false);
    let mut ch = Channel::default();
    let disk = vec![1u8; SIZE as usize];
    for off in [0, 16384] {
        read(&e, &mut ch, &disk, off, 4096).unwrap();
    }
    e.flush().unwrap();
    let p = e
        .policy()
        .with(Some(pcache::engine::CacheMode::WriteAround), None, None);
    e.set_policy(p).unwrap();
    let closed = |e: &Engine<Arc<SimPmem>>| e.direct_mark().kset();
    let direct = |e: &Engine<Arc<SimPmem>>, off: u64| {
        let d = e.begin_direct(off, 4096, false).unwrap().unwrap();
        e.end_direct(&mut Channel::default(), off, &[2; 4096], d, true);
    };
    let k0 = closed(&e);
    direct(&e, 8192);
    assert_eq!(closed(&e), k0, "nothing cached: no tombstone");
    direct(&e, 0);
    assert_eq!(closed(&e), k0 + 1, "cached clean data: a tombstone");
    assert!(!hits(&reopen(&pmem), &mut Channel::default(), 0));
    e.invalidate_clean();
    let k1 = closed(&e);
    direct(&e, 16384);
    assert_eq!(
        closed(&e),
        k1 + 1,
        "dropped clean keys still in the log: a tombstone"
    );
    assert!(!hits(&reopen(&pmem), &mut Channel::default(), 16384));
    e.check_invariants(&[&ch]).unwrap();
}

/// `Engine::write_many` (several writes, one store fence) against an oracle: requests
/// written a batch at a time read back as if written one by one; a full cache ends a
/// batch at its first `Busy` (every later request reports `Busy` and changes nothing);
/// retrying that suffix in order after writeback and GC loses nothing, across 4 MiB
/// region boundaries and overlapping requests.
#[test]
fn write_batches_read_back_as_single_writes_and_end_at_the_first_busy() {
    // 10 segments of 64 KiB: a few batches fill it, so Busy comes often.
    let (_pmem, e) = new_engine(10, false);
    let mut backing = vec![0u8; SIZE as usize];
    let mut oracle = vec![0u8; SIZE as usize];
    let (mut ch, mut rch) = (Channel::default(), Channel::default());
    let mut rng = Rng::new(7);
    let mut out = Vec::new();
    let (mut busy_batches, mut crossing) = (0, 0);
    for round in 0..300u64 {
        // Up to 12 requests of 512 B .. 32 KiB, often near the 4 MiB region boundary
        // and overlapping one another.
        let n = 1 + rng.index(12);
        let mut reqs: Vec<(u64, Vec<u8>)> = (0..n)
            .map(|i| {
                let len = 512 * rng.range(1, 65);
                let near = if rng.chance(1, 3) {
                    (4 << 20) - 16384
                } else {
                    0
                };
                let off = (near + 512 * rng.below(64)) % (SIZE - len);
                if off / (4 << 20) != (off + len - 1) / (4 << 20) {
                    crossing += 1;
                }
                (off, vec![(round * 13 + i as u64) as u8 | 1; len as usize])
            })
            .collect();
        let mut tries = 0;
        while !reqs.is_empty() {
            e.write_many(
                &mut ch,
                reqs.len(),
                |i| (reqs[i].0, &reqs[i].1[..]),
                &mut out,
            );
            assert_eq!(out.len(), reqs.len());
            let done = out
                .iter()
                .position(|r| matches!(r, Err(IoError::Busy)))
                .unwrap_or(reqs.len());
            for r in &out[..done] {
                r.as_ref().unwrap();
            }
            for r in &out[done..] {
                assert!(
                    matches!(r, Err(IoError::Busy)),
                    "after a Busy every request is Busy: {out:?}"
                );
            }
            for (off, data) in reqs.drain(..done) {
                oracle[off as usize..off as usize + data.len()].copy_from_slice(&data);
            }
            if !reqs.is_empty() {
                busy_batches += 1;
                tries += 1;
                assert!(tries < 100, "no progress");
                let _ = e.flush();
                drain(&e, &mut backing, false);
                e.gc(&mut Vec::new());
            }
        }
        if round % 25 == 24 {
            e.check_invariants(&[&ch]).unwrap();
            for off in (0..SIZE).step_by(1 << 20) {
                let got = read(&e, &mut rch, &backing, off, 1 << 20).unwrap();
                assert!(
                    got == oracle[off as usize..off as usize + (1 << 20)],
                    "round {round} at {off}"
                );
            }
        }
    }
    assert!(busy_batches > 0, "the cache must have filled up");
    assert!(crossing > 0, "some requests must cross a region boundary");
    let _ = e.flush();
    drain(&e, &mut backing, false);
    assert_eq!(e.dirty_bytes(), 0);
    assert!(backing == oracle, "written back as the oracle says");
}

#[test]
fn a_write_batch_reports_out_of_range_for_its_request_only() {
    let (_pmem, e) = new_engine(10, false);
    let mut ch = Channel::default();
    let mut out = Vec::new();
    let reqs = [
        (0u64, vec![1u8; 4096]),
        (SIZE, vec![2u8; 4096]),
        (8192, vec![3u8; 4096]),
    ];
    e.write_many(
        &mut ch,
        reqs.len(),
        |i| (reqs[i].0, &reqs[i].1[..]),
        &mut out,
    );
    assert!(out[0].is_ok() && out[2].is_ok(), "{out:?}");
    assert!(matches!(out[1], Err(IoError::OutOfRange)), "{out:?}");
    assert_eq!(e.stats().writes, 2);
    e.check_invariants(&[&ch]).unwrap();
}

/// The periodic backing FLUSH for direct writes (`sched::direct_flush_due`) is owed in
/// the caching modes but never in passthrough, which caches nothing it would let it keep;
/// the engine still reports the flush as owed, for a client FLUSH.
#[test]
fn passthrough_owes_no_periodic_flush() {
    use pcache::engine::CacheMode;
    let (_pmem, e) = new_engine(12, false);
    let mut timer = sched::FlushPacer::default();
    for (mode, periodic) in [
        (CacheMode::PassThrough, false),
        (CacheMode::WriteAround, true),
    ] {
        e.set_policy(e.policy().with(Some(mode), None, None))
            .unwrap();
        let d = e
            .begin_direct(0, 4096, false)
            .unwrap()
            .expect("nothing cached");
        e.end_direct_uncached(0, 4096, d, true);
        assert!(
            e.direct_flush_needed().is_some(),
            "{mode:?}: owed to a client FLUSH"
        );
        let due = sched::direct_flush_due(&e, &mut timer, 1_000_000);
        assert_eq!(due.is_some(), periodic, "{mode:?}");
    }
}
