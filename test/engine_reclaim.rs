//! Reclaim under pressure (issue 18): a cache smaller than the working set keeps at least
//! 90% of its data area holding cached data, clean data that is read again survives GC
//! (moved to the log head), data read once is what goes, and a full cache promoting on
//! the second miss caches a block only when it misses again. Checked against the
//! engine's own invariants and a byte image of the backing device.

mod common;

use common::{sim_engine, writeback_once};
use pcache::engine::{Channel, Engine, Promotion, WbBatch};
use pcache::env::sim::pmem::SimPmem;
use std::sync::Arc;

const SEG: u32 = 64 << 10;
const SIZE: u64 = 32 << 20;
const BLOCK: usize = 4096;

/// An engine of `segs` segments that caches every read miss (the reclaim tests fill it
/// with reads).
fn engine(segs: u64) -> Engine<Arc<SimPmem>> {
    engine_promoting(segs, Promotion::Always)
}

fn engine_promoting(segs: u64, promotion: Promotion) -> Engine<Arc<SimPmem>> {
    sim_engine(segs, SEG, SIZE, |fo| {
        fo.policy.promotion = promotion;
        // The scans here are what reclaim must cope with; the sequential cutoff, which
        // keeps a stream out of a full cache, would keep them away (test/embedded.rs
        // and the simulator's policy family cover it).
        fo.policy.seq_cutoff_kib = 0;
    })
}

/// A byte image of the backing device whose block `b` holds `b`'s low byte + 1.
fn backing() -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    for (b, c) in v.chunks_mut(BLOCK).enumerate() {
        c.fill((b % 251) as u8 + 1);
    }
    v
}

/// Reads block `b`, serving misses from `disk`, and checks it against `disk` (no
/// writes) ; true when it was a hit.
fn read_block(e: &Engine<Arc<SimPmem>>, ch: &mut Channel, disk: &[u8], b: u64) -> bool {
    read_checked(e, ch, disk, disk, b)
}

/// As `read_block`, checked against `want` (what the device should read as).
fn read_checked(
    e: &Engine<Arc<SimPmem>>,
    ch: &mut Channel,
    disk: &[u8],
    want: &[u8],
    b: u64,
) -> bool {
    let off = b * BLOCK as u64;
    let mut buf = vec![0u8; BLOCK];
    e.read(ch, off, &mut buf).unwrap();
    let misses: Vec<_> = ch.misses().collect();
    let hit = misses.is_empty();
    for m in misses {
        let o = off as usize + m.at;
        buf[m.at..m.at + m.len].copy_from_slice(&disk[o..o + m.len]);
    }
    e.fill(ch, off, &buf, true);
    assert_eq!(buf, want[off as usize..off as usize + BLOCK], "block {b}");
    hit
}

/// What a runtime's background does between requests: age ksets, walk dirty_tail over
/// the (clean) log, reclaim.
fn background(e: &Engine<Arc<SimPmem>>, disk: &mut [u8], scratch: &mut Vec<u8>) {
    e.tick();
    e.tick();
    let mut wb = WbBatch::default();
    while writeback_once(e, &mut wb, disk) {}
    e.gc(scratch);
}

/// A hot set read over and over beside a scan of four times the cache, read once:
/// the hot set keeps hitting (GC moves it), the scan is what is dropped, and the data
/// area stays at least 90% full of cached data once the cache has filled.
#[test]
fn a_hot_set_survives_a_scan_and_the_medium_stays_full() {
    let segs = 128u64;
    let e = engine(segs);
    let mut disk = backing();
    let mut ch = Channel::default();
    let mut scratch = Vec::new();
    let capacity = e.stats().capacity_bytes;
    let hot = 64u64; // 256 KiB, 3% of the cache
    let scan_blocks = 4 * capacity / BLOCK as u64;
    let (mut hot_reads, mut hot_hits) = (0u64, 0u64);
    let mut fullest = 0u64;
    for i in 0..scan_blocks {
        let warm = i > 2 * hot;
        if read_block(&e, &mut ch, &disk, i % hot) && warm {
            hot_hits += 1;
        }
        hot_reads += warm as u64;
        read_block(&e, &mut ch, &disk, hot + i);
        if i % 16 == 0 {
            background(&e, &mut disk, &mut scratch);
            if i > scan_blocks / 2 {
                let st = e.stats();
                fullest = fullest.max(st.cached_bytes);
                assert!(
                    st.cached_bytes * 100 >= capacity * 85,
                    "block {i}: {} of {capacity} bytes cached",
                    st.cached_bytes
                );
            }
        }
    }
    e.check_invariants(&[&ch]).unwrap();
    let st = e.stats();
    assert!(st.relocated_bytes > 0, "GC moved nothing");
    assert!(
        hot_hits * 100 >= hot_reads * 99,
        "hot set: {hot_hits} hits of {hot_reads} reads"
    );
    assert!(
        fullest * 100 >= capacity * 90,
        "at most {fullest} of {capacity} bytes cached"
    );
    // Everything still reads back right, hit or not.
    for b in 0..(SIZE / BLOCK as u64) {
        read_block(&e, &mut ch, &disk, b);
    }
    e.check_invariants(&[&ch]).unwrap();
}

/// Data that is not read again goes in log order; moved data is not kept forever: once
/// no longer read, it is dropped at its next turn.
#[test]
fn moved_data_goes_once_it_is_no_longer_read() {
    let e = engine(64);
    let mut disk = backing();
    let mut ch = Channel::default();
    let mut scratch = Vec::new();
    let capacity = e.stats().capacity_bytes;
    let blocks = capacity / BLOCK as u64;
    // Read block 0 twice (cached, then marked), then scan 3x the cache.
    read_block(&e, &mut ch, &disk, 0);
    assert!(read_block(&e, &mut ch, &disk, 0));
    for i in 1..3 * blocks {
        read_block(&e, &mut ch, &disk, 1 + i);
        if i % 16 == 0 {
            background(&e, &mut disk, &mut scratch);
        }
    }
    e.check_invariants(&[&ch]).unwrap();
    assert!(e.stats().relocated_bytes >= BLOCK as u64);
    assert!(
        !read_block(&e, &mut ch, &disk, 0),
        "read once after its move: dropped"
    );
}

/// Data read more often outlasts data read once in a while: a block read twice since
/// it was cached (`F_REF2`) survives two turns at the log's tail unread, a block read
/// once since (`F_REF`) one. After a scan of two and a half caches, the first still
/// hits and the second is gone.
#[test]
fn data_read_twice_survives_one_more_turn() {
    let e = engine(64);
    let mut disk = backing();
    let mut ch = Channel::default();
    let mut scratch = Vec::new();
    let blocks = e.stats().capacity_bytes / BLOCK as u64;
    // Block 0: cached by its miss, then two hits. Block 1: cached, then one hit.
    for b in [0, 0, 0, 1, 1] {
        read_block(&e, &mut ch, &disk, b);
    }
    for i in 0..5 * blocks / 2 {
        read_block(&e, &mut ch, &disk, 2 + i);
        if i % 16 == 0 {
            background(&e, &mut disk, &mut scratch);
        }
    }
    e.check_invariants(&[&ch]).unwrap();
    assert!(e.stats().relocated_bytes >= 3 * BLOCK as u64);
    assert!(
        !read_block(&e, &mut ch, &disk, 1),
        "read once since cached: moved once, then dropped"
    );
    assert!(
        read_block(&e, &mut ch, &disk, 0),
        "read twice since cached: still there"
    );
}

/// A block's read count outlives an overwrite: a block read since it was cached and
/// then rewritten keeps its second chance (its new copy is moved at the log's tail),
/// a block rewritten without having been read has none. After a scan of one and a
/// half caches, the first still hits and the second is gone.
#[test]
fn a_rewrite_keeps_the_read_count() {
    let e = engine(64);
    let mut disk = backing();
    let mut ch = Channel::default();
    let mut scratch = Vec::new();
    let blocks = e.stats().capacity_bytes / BLOCK as u64;
    // Block 0: cached by its miss and hit once; block 1: cached by its miss only.
    for b in [0, 0, 1] {
        read_block(&e, &mut ch, &disk, b);
    }
    for b in [0u64, 1] {
        e.write(&mut ch, b * BLOCK as u64, &[7; BLOCK], false)
            .unwrap();
    }
    for i in 0..3 * blocks / 2 {
        read_block(&e, &mut ch, &disk, 2 + i);
        if i % 16 == 0 {
            background(&e, &mut disk, &mut scratch);
        }
    }
    e.check_invariants(&[&ch]).unwrap();
    assert!(
        !read_block(&e, &mut ch, &disk, 1),
        "rewritten, never read: dropped at the tail"
    );
    assert!(
        read_block(&e, &mut ch, &disk, 0),
        "read, then rewritten: moved at the tail, still there"
    );
}

/// `n` random 4 KiB requests over the first `set` blocks of `e`, `read_pct` percent of
/// them reads checked against what was written, with the background run every 16;
/// `on_read(i, hit)` sees each read. Checks the engine's invariants at the end.
fn random_rw(
    e: &Engine<Arc<SimPmem>>,
    set: u64,
    n: u64,
    read_pct: u64,
    seed: u64,
    mut on_read: impl FnMut(u64, bool),
) {
    let mut disk = backing();
    let mut ch = Channel::default();
    let mut scratch = Vec::new();
    let mut want = disk.clone();
    let mut x = seed;
    for i in 0..n {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let b = (x >> 33) % set;
        if (x >> 20) % 100 < read_pct {
            on_read(i, read_checked(e, &mut ch, &disk, &want, b));
        } else {
            let v = vec![(i % 250) as u8 + 1; BLOCK];
            e.write(&mut ch, b * BLOCK as u64, &v, false).unwrap();
            want[(b * BLOCK as u64) as usize..][..BLOCK].copy_from_slice(&v);
        }
        if i % 16 == 0 {
            background(e, &mut disk, &mut scratch);
        }
    }
    e.check_invariants(&[&ch]).unwrap();
}

/// A hot set under random reads and writes (70/30) beside nothing else: once warm,
/// reads keep hitting although overwrites keep the log turning over.
#[test]
fn a_hot_set_under_random_overwrites_keeps_hitting() {
    let e = engine(128);
    let hot = e.stats().capacity_bytes / 4 / BLOCK as u64;
    let (mut reads, mut hits) = (0u64, 0u64);
    let n = 40 * hot;
    random_rw(&e, hot, n, 70, 7, |i, h| {
        if i > n / 4 {
            reads += 1;
            hits += h as u64;
        }
    });
    let st = e.stats();
    assert!(
        hits * 1000 >= reads * 995,
        "{hits} hits of {reads} reads; relocated {} bytes",
        st.relocated_bytes
    );
}

/// Random overwrites of a set half the cache's size, with `read_pct` percent reads:
/// returns the bytes GC moved.
fn overwrite_moves(read_pct: u64) -> u64 {
    let e = engine(64);
    let set = e.stats().capacity_bytes / 2 / BLOCK as u64;
    random_rw(&e, set, 12 * set, read_pct, 11, |_, _| {});
    e.stats().relocated_bytes
}

/// GC moves unread data of a mostly superseded kset only where reads come: a
/// write-only workload would pay a copy per survivor and never collect a hit.
#[test]
fn cold_data_moves_only_when_reads_come() {
    assert_eq!(overwrite_moves(0), 0, "write-only: nothing was ever read");
    let moved = overwrite_moves(30);
    assert!(
        moved > 0,
        "with 30% reads GC keeps the survivors ({moved} bytes)"
    );
}

/// Once the cache is full, second-miss promotion caches a block only when it misses
/// again soon; a scan's blocks (read once) are declined, so what was cached stays. With
/// `always`, the scan replaces it. Either way every read returns the device's data.
#[test]
fn a_full_cache_promotes_on_the_second_miss() {
    for promotion in [Promotion::SecondMiss, Promotion::Always] {
        let e = engine_promoting(64, promotion);
        let disk = backing();
        let mut ch = Channel::default();
        let mut scratch = Vec::new();
        let mut img = disk.clone();
        let blocks = e.stats().capacity_bytes / BLOCK as u64;
        // Fill the cache with blocks read twice (hits on the second read), then a scan of
        // 3x the cache, read once each.
        for b in 0..blocks / 2 {
            read_block(&e, &mut ch, &disk, b);
            assert!(
                read_block(&e, &mut ch, &disk, b),
                "{promotion:?}: block {b}"
            );
        }
        let scan = blocks..4 * blocks;
        for b in scan.clone() {
            read_block(&e, &mut ch, &disk, b);
            if b % 16 == 0 {
                background(&e, &mut img, &mut scratch);
            }
        }
        let st = e.stats();
        let kept = (0..blocks / 2)
            .filter(|&b| read_block(&e, &mut ch, &disk, b))
            .count() as u64;
        match promotion {
            Promotion::SecondMiss => {
                assert!(st.fill_declined_bytes > 0, "nothing declined");
                assert!(kept * 10 >= blocks / 2 * 9, "kept {kept} of {}", blocks / 2);
                // A scan block missing again now is cached, and hits the time after.
                let b = scan.end - 1;
                assert!(!read_block(&e, &mut ch, &disk, b));
                assert!(read_block(&e, &mut ch, &disk, b), "second miss cached");
            }
            Promotion::Always => {
                assert_eq!(st.fill_declined_bytes, 0);
                assert!(kept * 10 < blocks / 2, "kept {kept} of {}", blocks / 2);
            }
        }
        e.check_invariants(&[&ch]).unwrap();
    }
}

/// GC's evictions count as misses for promotion: a block read once, cached while the
/// cache had room and then dropped by GC, is cached again on its first miss after.
#[test]
fn a_block_gc_dropped_comes_back_on_its_first_miss() {
    let e = engine_promoting(64, Promotion::SecondMiss);
    let disk = backing();
    let mut img = disk.clone();
    let mut ch = Channel::default();
    let mut scratch = Vec::new();
    let blocks = e.stats().capacity_bytes / BLOCK as u64;
    let reads = blocks / 4;
    for b in 0..reads {
        read_block(&e, &mut ch, &disk, b);
    }
    // Writes elsewhere fill the cache; GC drops the reads first (oldest, never hit),
    // and little else, so few later evictions overwrite their tags.
    let v = vec![9u8; BLOCK];
    for i in 0..blocks * 9 / 10 {
        e.write(&mut ch, (reads + i) * BLOCK as u64, &v, false)
            .unwrap();
        if i % 16 == 0 {
            background(&e, &mut img, &mut scratch);
        }
    }
    let (mut dropped, mut back) = (0, 0);
    for b in 0..reads {
        if !read_block(&e, &mut ch, &disk, b) {
            dropped += 1;
            back += read_block(&e, &mut ch, &disk, b) as u64;
        }
        // Room for the fills.
        background(&e, &mut img, &mut scratch);
    }
    assert!(dropped * 2 > reads, "GC dropped only {dropped} of {reads}");
    // Tags can be overwritten by later misses and evictions: most, not all, survive.
    assert!(
        back * 2 > dropped,
        "{back} of {dropped} came back on their first miss"
    );
    e.check_invariants(&[&ch]).unwrap();
}

/// A hot set overwritten over and over beside reads of a set twice the cache: segments
/// whose data was mostly superseded are reclaimed out of log order (compaction), every
/// read returns what was written, and after a FLUSH a replay of the medium agrees with
/// the device image block for block (a compacted segment's keys must hide older keys
/// of their ranges, not let them show through).
#[test]
fn mostly_superseded_segments_go_out_of_order_and_replay_agrees() {
    let e = engine(64);
    let mut disk = backing();
    let mut want = disk.clone();
    let mut ch = Channel::default();
    let mut scratch = Vec::new();
    let blocks = e.stats().capacity_bytes / BLOCK as u64;
    let (hot, set) = (blocks / 8, 2 * blocks);
    let mut x = 5u64;
    for i in 0..30 * blocks {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let b = if (x >> 40) % 10 < 8 {
            (x >> 33) % hot
        } else {
            (x >> 33) % set
        };
        if (x >> 20) % 100 < 60 {
            read_checked(&e, &mut ch, &disk, &want, b);
        } else {
            let v = vec![(i % 250) as u8 + 1; BLOCK];
            e.write(&mut ch, b * BLOCK as u64, &v, false).unwrap();
            want[(b * BLOCK as u64) as usize..][..BLOCK].copy_from_slice(&v);
        }
        if i % 16 == 0 {
            background(&e, &mut disk, &mut scratch);
        }
    }
    e.check_invariants(&[&ch]).unwrap();
    let st = e.stats();
    assert!(st.segments_compacted > 0, "nothing compacted: {st:?}");
    e.flush().unwrap();
    let pmem = Arc::new(SimPmem::from_image(e.pmem().durable_image()));
    let e2 = Engine::open(pmem, &common::sim_id(SIZE), false, &common::sim_config()).unwrap();
    let mut ch2 = Channel::default();
    for b in 0..set {
        read_checked(&e2, &mut ch2, &disk, &want, b);
    }
    e2.check_invariants(&[&ch2]).unwrap();
}
