//! Writeback recycling (`Engine::recycle`): a hot set overwritten many times over a
//! cache several times its size is recycled by writeback instead of written back while
//! writes go on, always reads back its newest data, and a drain (recycling off) then
//! writes every block's newest data to the backing device. Windows more than half live
//! are recycled only while reads come (they buy hits). Checked against a byte image of
//! the backing device and the engine's own invariants.

mod common;

use common::{sim_engine, writeback_once};
use pcache::engine::{Channel, Engine, IoError, WbBatch, SMALL_WINDOW_KSETS};
use pcache::env::sim::pmem::SimPmem;
use std::sync::Arc;

const SEG: u32 = 64 << 10;
const SIZE: u64 = 64 << 20;
const BLOCK: usize = 4096;
const HOT: u64 = 1600;

fn engine(segs: u64) -> Engine<Arc<SimPmem>> {
    sim_engine(segs, SEG, SIZE, |_| {})
}

/// Block `b`'s content in round `r`.
fn content(b: u64, r: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    for (i, w) in v.chunks_mut(8).enumerate() {
        w.copy_from_slice(&(b << 40 | r << 16 | i as u64).to_le_bytes());
    }
    v
}

/// Reads block `b` into `buf`, its misses from `disk` (and filled into the cache).
fn read_block(e: &Engine<Arc<SimPmem>>, ch: &mut Channel, disk: &[u8], b: u64, buf: &mut [u8]) {
    let off = b * BLOCK as u64;
    e.read(ch, off, buf).unwrap();
    let misses: Vec<_> = ch.misses().collect();
    if misses.is_empty() {
        return;
    }
    for m in misses {
        let o = off as usize + m.at;
        buf[m.at..m.at + m.len].copy_from_slice(&disk[o..o + m.len]);
    }
    e.fill(ch, off, buf, true);
}

/// What `overwrite` leaves: the engine, its channel, the backing image, the writeback
/// batch, each block's newest round and the ksets of every window written back.
struct Run {
    e: Engine<Arc<SimPmem>>,
    ch: Channel,
    disk: Vec<u8>,
    wb: WbBatch,
    newest: Vec<u64>,
    windows: Vec<u32>,
}

/// A writeback batch that recycles.
fn recycling() -> WbBatch {
    let mut wb = WbBatch::default();
    wb.set_recycle(true);
    wb
}

/// Overwrites `hot` blocks at random `ops` times in a cache of `segs` 64 KiB segments,
/// with writeback batch `wb`, reading a block after every `read_every` writes (0:
/// never); writeback runs as writes need room and every 64 writes.
fn overwrite(segs: u64, hot: u64, ops: u64, read_every: u64, mut wb: WbBatch) -> Run {
    let e = engine(segs);
    let mut disk = vec![0u8; SIZE as usize];
    let mut ch = Channel::default();
    let mut windows = Vec::new();
    let mut scratch = Vec::new();
    let mut newest = vec![0u64; hot as usize];
    let mut buf = vec![0u8; BLOCK];
    let mut seed = 1u64;
    for n in 1..ops {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let b = (seed >> 33) % hot;
        loop {
            match e.write(&mut ch, b * BLOCK as u64, &content(b, n), false) {
                Ok(()) => break,
                Err(IoError::Busy) => {
                    let _ = e.close_ksets();
                    if writeback_once(&e, &mut wb, &mut disk) {
                        windows.push(wb.ksets());
                    }
                    e.gc(&mut scratch);
                }
                Err(x) => panic!("write: {x:?}"),
            }
        }
        newest[b as usize] = n;
        if read_every > 0 && n % read_every == 0 {
            let r = (seed >> 13) % hot;
            read_block(&e, &mut ch, &disk, r, &mut buf);
            if newest[r as usize] > 0 {
                let want = content(r, newest[r as usize]);
                assert!(
                    buf == want,
                    "block {r} does not read its newest data at {n}"
                );
            }
        }
        if n % 64 == 0 {
            // Writes keep coming between ticks: the cache is never idle here.
            e.tick();
            if e.writeback_wanted() && writeback_once(&e, &mut wb, &mut disk) {
                windows.push(wb.ksets());
            }
            e.gc(&mut scratch);
        }
    }
    Run {
        e,
        ch,
        disk,
        wb,
        newest,
        windows,
    }
}

#[test]
fn recycled_data_reads_back_and_a_drain_writes_it_back() {
    // 16 MiB, the hot set 6.25 MiB.
    let Run {
        e,
        mut ch,
        mut disk,
        mut wb,
        newest,
        ..
    } = overwrite(256, HOT, 40_000, 0, recycling());
    let st = e.stats();
    let (rec, wrote) = (st.recycled_bytes, st.writeback_bytes);
    assert!(
        rec > 0 && rec > wrote / 2,
        "recycled {rec}, written back {wrote}"
    );
    let mut buf = vec![0u8; BLOCK];
    for b in 0..HOT {
        e.read(&mut ch, b * BLOCK as u64, &mut buf).unwrap();
        assert!(ch.misses().next().is_none(), "block {b} left the cache");
        assert_eq!(buf, content(b, newest[b as usize]), "block {b}");
    }
    // A drain: no recycling, everything reaches the backing device.
    e.flush().unwrap();
    wb.set_recycle(false);
    let before = e.stats().recycled_bytes;
    while writeback_once(&e, &mut wb, &mut disk) {}
    assert_eq!(e.dirty_bytes(), 0);
    assert_eq!(e.stats().recycled_bytes, before, "a drain recycles nothing");
    for b in 0..HOT {
        let o = (b * BLOCK as u64) as usize;
        assert_eq!(
            disk[o..o + BLOCK],
            content(b, newest[b as usize]),
            "block {b} on the backing device"
        );
    }
    e.check_invariants(&[&ch]).unwrap();
}

/// A hot set larger than the cache leaves writeback windows more than half live:
/// recycled only while reads are a real share of the requests, and what was recycled
/// still reads back as its newest data.
#[test]
fn windows_more_than_half_live_recycle_only_while_reads_come() {
    // 25 MiB over a 16 MiB cache: writeback windows about 60% live (writes alone
    // recycled 0.8 MB here, with reads 209 MB).
    let hot = 6500;
    let quiet = overwrite(256, hot, 40_000, 0, recycling()).e;
    let Run {
        e,
        mut ch,
        disk,
        newest,
        ..
    } = overwrite(256, hot, 40_000, 4, recycling());
    let (without, with) = (quiet.stats().recycled_bytes, e.stats().recycled_bytes);
    eprintln!("recycled: writes only {without}, with reads {with}");
    assert!(
        with > 16 * without && with > 64 << 20,
        "recycled: writes only {without}, with reads {with}"
    );
    let mut buf = vec![0u8; BLOCK];
    for b in 0..hot {
        read_block(&e, &mut ch, &disk, b, &mut buf);
        let want = match newest[b as usize] {
            0 => vec![0u8; BLOCK], // never written
            n => content(b, n),
        };
        assert!(buf == want, "block {b} does not read its newest data");
    }
    e.check_invariants(&[&ch]).unwrap();
}

/// Over a base whose FLUSH is cheap the runtimes allow small windows: once a window
/// writes back at most half of what it retires (a hot set's overwrites supersede most
/// of it), the next takes `SMALL_WINDOW_KSETS` ksets; without the allowance windows
/// stay larger (up to `WINDOW_KSETS`). The data reads back either way.
#[test]
fn sparse_windows_shrink_where_small_windows_are_allowed() {
    for small in [false, true] {
        let mut wb = WbBatch::default();
        wb.set_small_windows(small);
        // 64 MiB: windows of 8 ksets fit under the window's byte bound.
        let Run {
            e,
            mut ch,
            disk,
            newest,
            windows,
            ..
        } = overwrite(1024, HOT, 30_000, 0, wb);
        assert!(
            windows.len() > 20,
            "small={small}: {} windows",
            windows.len()
        );
        // The first windows may come before any was seen sparse.
        let largest = windows[4..].iter().copied().max().unwrap_or(0);
        if small {
            assert_eq!(largest, SMALL_WINDOW_KSETS as u32, "small windows");
        } else {
            assert!(
                largest > SMALL_WINDOW_KSETS as u32,
                "full windows: {largest}"
            );
        }
        let mut buf = vec![0u8; BLOCK];
        for b in 0..HOT {
            read_block(&e, &mut ch, &disk, b, &mut buf);
            if newest[b as usize] > 0 {
                assert!(buf == content(b, newest[b as usize]), "block {b}");
            }
        }
        e.check_invariants(&[&ch]).unwrap();
    }
}
