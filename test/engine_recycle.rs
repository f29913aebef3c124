//! Writeback recycling (`Engine::recycle`): a hot set overwritten many times over a
//! cache several times its size is recycled by writeback instead of written back while
//! writes go on, always reads back its newest data, and a drain (recycling off) then
//! writes every block's newest data to the backing device. Checked against a byte
//! image of the backing device and the engine's own invariants.

use pcache::engine::{
    BackingIdentity, Channel, Config, Engine, FormatOptions, IoError, Pmem, WbBatch, WbKind, WbNext,
};
use pcache::env::sim::pmem::SimPmem;
use std::sync::Arc;

const SEG: u32 = 64 << 10;
const SIZE: u64 = 16 << 20;
const BLOCK: usize = 4096;
const HOT: u64 = 1600;

fn engine(segs: u64) -> Engine<Arc<SimPmem>> {
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

/// Block `b`'s content in round `r`.
fn content(b: u64, r: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    for (i, w) in v.chunks_mut(8).enumerate() {
        w.copy_from_slice(&(b << 40 | r << 16 | i as u64).to_le_bytes());
    }
    v
}

/// One writeback window, if due: written to `disk` and acknowledged. False when idle.
fn writeback_once(e: &Engine<Arc<SimPmem>>, wb: &mut WbBatch, disk: &mut [u8]) -> bool {
    if e.writeback_next(wb) != WbNext::Ready {
        return false;
    }
    for it in &wb.items {
        let dst = &mut disk[it.off as usize..it.off as usize + it.len as usize];
        match it.kind {
            WbKind::Data { pmem_off } => e.pmem().read(pmem_off, dst),
            WbKind::Zero | WbKind::Discard => dst.fill(0),
        }
    }
    e.writeback_done(wb, true);
    true
}

#[test]
fn recycled_data_reads_back_and_a_drain_writes_it_back() {
    let e = engine(256); // 16 MiB, the hot set 6.25 MiB
    let mut disk = vec![0u8; SIZE as usize];
    let mut ch = Channel::default();
    let mut wb = WbBatch::default();
    wb.set_recycle(true);
    let mut scratch = Vec::new();
    let mut newest = vec![0u64; HOT as usize];
    let mut seed = 1u64;
    for n in 1..40_000u64 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let b = (seed >> 33) % HOT;
        loop {
            match e.write(&mut ch, b * BLOCK as u64, &content(b, n), false) {
                Ok(()) => break,
                Err(IoError::Busy) => {
                    let _ = e.close_ksets();
                    writeback_once(&e, &mut wb, &mut disk);
                    e.gc(&mut scratch);
                }
                Err(x) => panic!("write: {x:?}"),
            }
        }
        newest[b as usize] = n;
        if n % 64 == 0 {
            // Writes keep coming between ticks: the cache is never idle here.
            e.tick();
            if e.writeback_wanted() {
                writeback_once(&e, &mut wb, &mut disk);
            }
            e.gc(&mut scratch);
        }
    }
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
