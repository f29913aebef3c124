//! `Engine::write_many` (several writes, one store fence) against an oracle: the same
//! requests written one batch at a time read back as if written one by one, a full
//! cache ends a batch at its first `Busy` (every later request reports `Busy` and
//! changes nothing), and retrying that suffix in order after writeback and GC loses
//! nothing, across 4 MiB region boundaries and overlapping requests.

use pcache::engine::{
    BackingIdentity, Channel, Config, Engine, FormatOptions, IoError, Pmem, WbBatch, WbKind, WbNext,
};
use pcache::env::sim::pmem::SimPmem;
use std::sync::Arc;

const SEG: u32 = 64 << 10;
const SIZE: u64 = 8 << 20;

fn new_engine(segs: u64) -> Engine<Arc<SimPmem>> {
    let pmem = Arc::new(SimPmem::new(
        pcache::engine::format::SEGMENTS_OFF + segs * SEG as u64,
    ));
    let id = BackingIdentity {
        size: SIZE,
        block_size: 512,
        id: "disk-a".into(),
    };
    let mut fo = FormatOptions::new(id, 1);
    fo.seg_size = SEG;
    let cfg = Config {
        log_reserve: 2,
        ..Config::default()
    };
    Engine::format(pmem, &fo, &cfg).unwrap()
}

/// Writes back everything dirty into `backing`.
fn drain(e: &Engine<Arc<SimPmem>>, backing: &mut [u8]) {
    let _ = e.flush();
    let mut wb = WbBatch::default();
    while e.writeback_next(&mut wb) == WbNext::Ready {
        for it in &wb.items {
            let dst = &mut backing[it.off as usize..it.off as usize + it.len as usize];
            match it.kind {
                WbKind::Data { pmem_off } => e.pmem().read(pmem_off, dst),
                WbKind::Zero | WbKind::Discard => dst.fill(0),
            }
        }
        e.writeback_done(&wb, true);
    }
}

/// Reads `len` bytes at `off`, misses from `backing`.
fn read(
    e: &Engine<Arc<SimPmem>>,
    ch: &mut Channel,
    backing: &[u8],
    off: u64,
    len: usize,
) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    e.read(ch, off, &mut buf).unwrap();
    let misses: Vec<_> = ch.misses().collect();
    for m in misses {
        let o = off as usize + m.at;
        buf[m.at..m.at + m.len].copy_from_slice(&backing[o..o + m.len]);
    }
    e.fill(ch, off, &buf, true);
    buf
}

/// A small deterministic generator (no dependency on the simulator's).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn batches_read_back_as_single_writes_and_end_at_the_first_busy() {
    // 10 segments of 64 KiB: a few batches fill it, so Busy comes often.
    let e = new_engine(10);
    let mut backing = vec![0u8; SIZE as usize];
    let mut oracle = vec![0u8; SIZE as usize];
    let mut ch = Channel::default();
    let mut rch = Channel::default();
    let mut rng = Lcg(7);
    let mut out = Vec::new();
    let (mut busy_batches, mut crossing) = (0, 0);
    for round in 0..300u64 {
        // Up to 12 requests of 512 B .. 32 KiB, often near the 4 MiB region boundary
        // and overlapping one another.
        let n = 1 + rng.next() as usize % 12;
        let mut reqs: Vec<(u64, Vec<u8>)> = (0..n)
            .map(|i| {
                let len = 512 * (1 + rng.next() % 64);
                let near = if rng.next() % 3 == 0 {
                    (4 << 20) - 16384
                } else {
                    0
                };
                let off = (near + 512 * (rng.next() % 64)) % (SIZE - len);
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
            let first_busy = out.iter().position(|r| matches!(r, Err(IoError::Busy)));
            let done = first_busy.unwrap_or(reqs.len());
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
                drain(&e, &mut backing);
                e.gc(&mut Vec::new());
            }
        }
        if round % 25 == 24 {
            e.check_invariants(&[&ch]).unwrap();
            for off in (0..SIZE).step_by(1 << 20) {
                let got = read(&e, &mut rch, &backing, off, 1 << 20);
                assert!(
                    got == oracle[off as usize..off as usize + (1 << 20)],
                    "round {round} at {off}"
                );
            }
        }
    }
    assert!(busy_batches > 0, "the cache must have filled up");
    assert!(crossing > 0, "some requests must cross a region boundary");
    drain(&e, &mut backing);
    assert_eq!(e.dirty_bytes(), 0);
    assert!(backing == oracle, "written back as the oracle says");
}

#[test]
fn a_batch_reports_out_of_range_for_its_request_only() {
    let e = new_engine(10);
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
