//! Helpers the engine integration tests share (included with `mod common;`): an engine
//! on a simulated medium, and a writeback window applied to a byte image of the backing
//! device. No I/O, no timing: the tests drive the engine's calls themselves.

#![allow(dead_code)] // each test crate uses part of it

use pcache::engine::Pmem;
use pcache::engine::{BackingIdentity, Config, Engine, FormatOptions, WbBatch, WbKind, WbNext};
use pcache::env::sim::pmem::SimPmem;
use std::sync::Arc;

/// Formats an engine of `segs` segments of `seg` bytes over a backing device of `size`
/// bytes (512 B blocks), with `tweak` applied to the format options and a log reserve
/// of 2 segments.
pub fn sim_engine(
    segs: u64,
    seg: u32,
    size: u64,
    tweak: impl FnOnce(&mut FormatOptions),
) -> Engine<Arc<SimPmem>> {
    let pmem = Arc::new(SimPmem::new(
        pcache::engine::format::SEGMENTS_OFF + segs * seg as u64,
    ));
    let mut fo = FormatOptions::new(sim_id(size), 1);
    fo.seg_size = seg;
    tweak(&mut fo);
    Engine::format(pmem, &fo, &sim_config()).unwrap()
}

/// The backing device `sim_engine` formats for: `size` bytes of 512 B blocks.
pub fn sim_id(size: u64) -> BackingIdentity {
    BackingIdentity {
        size,
        block_size: 512,
        id: "disk-a".into(),
    }
}

/// The configuration `sim_engine` formats with (a log reserve of 2 segments).
pub fn sim_config() -> Config {
    Config {
        log_reserve: 2,
        ..Config::default()
    }
}

/// Writes window `wb`'s items into `disk`, a byte image of the backing device.
pub fn apply(e: &Engine<Arc<SimPmem>>, wb: &WbBatch, disk: &mut [u8]) {
    for it in &wb.items {
        let dst = &mut disk[it.off as usize..it.off as usize + it.len as usize];
        match it.kind {
            WbKind::Data { pmem_off } => e.pmem().read(pmem_off, dst),
            WbKind::Zero | WbKind::Discard => dst.fill(0),
        }
    }
}

/// One writeback window, if due: applied to `disk` and acknowledged. False when idle.
pub fn writeback_once(e: &Engine<Arc<SimPmem>>, wb: &mut WbBatch, disk: &mut [u8]) -> bool {
    if e.writeback_next(wb) != WbNext::Ready {
        return false;
    }
    apply(e, wb, disk);
    e.writeback_done(wb, true);
    true
}
