//! A simulated world: one engine on simulated pmem over a simulated disk, driven by a
//! seeded workload through several channels, with the background work (tick,
//! writeback with asynchronous reordered disk I/O, GC) interleaved deterministically,
//! and an oracle that checks the durability contract of ARCHITECTURE.md.
//!
//! Every written block carries a recognisable pattern (write id and block number in
//! every word), so any block read back can be traced to the write it came from, and
//! garbage or another block's data is caught. The oracle keeps, per block, the ordered
//! history of completed writes and the index of the newest one that is durable (a
//! later FLUSH or its own FUA completed). Checks:
//! - live reads return exactly the newest completed write (or, for a read that raced a
//!   write, one of the two);
//! - after a crash and replay every block reads as its durable write or a later one;
//! - the backing device alone, after a power loss, is what a disk with a volatile
//!   write cache may show: if any write issued after the k-th FLUSH is on it, every
//!   block holds at least its last write from before that FLUSH;
//! - the engine's own invariants hold after every step.

mod check;

use super::disk::{DiskOp, SimDisk};
use super::pmem::{CrashMode, SimPmem};
use super::rng::Rng;
use crate::engine::{
    BackingIdentity, CacheMode, Channel, Config, Engine, FlushMark, FormatOptions, IoError, Pmem,
    Policy, Route, WbBatch, WbKind, WbNext,
};
use std::sync::Arc;

const BS: usize = 512;

/// The workload shapes the crash enumeration runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Small writes over a hot region, reads, occasional flushes.
    Overwrite,
    /// Many FUA writes and FLUSHes.
    FuaFlush,
    /// More data than the cache holds: writeback and GC must run, writers get Busy.
    CacheFull,
    /// Writes mixed with write-zeroes and discards.
    ZeroDiscard,
    /// All of the above with misses racing writes.
    Mixed,
    /// Small writes overwriting a region much smaller than the cache, rare FLUSHes and
    /// no FUA: writeback finds its windows mostly superseded, within the current epoch,
    /// and recycles their live data (`Engine::recycle`). Not in `ALL`: its own family.
    Hot,
}

impl Workload {
    pub const ALL: [Workload; 5] = [
        Workload::Overwrite,
        Workload::FuaFlush,
        Workload::CacheFull,
        Workload::ZeroDiscard,
        Workload::Mixed,
    ];
}

#[derive(Debug, Clone)]
pub struct WorldCfg {
    pub seed: u64,
    pub workload: Workload,
    pub ops: usize,
    pub channels: usize,
    pub data_crc: bool,
    pub seg_size: u32,
    pub n_segs: u64,
    pub kset_keys: u32,
    /// Blocks (512 B) the workload touches; the backing device has 4x as many.
    pub region_blocks: u64,
    /// Cache mode and sequential cutoff the cache is formatted with.
    pub policy: Policy,
    /// Switch to this mode after this many operations (a mode switch under load).
    pub switch: Option<(usize, CacheMode)>,
    /// Percent of writes and reads that continue their channel's previous request,
    /// forming sequential streams for the cutoff.
    pub seq_percent: u32,
}

impl WorldCfg {
    pub fn new(seed: u64, workload: Workload) -> Self {
        let region_blocks = match workload {
            Workload::CacheFull => 4096,
            Workload::Mixed => 2048,
            Workload::Hot => 64,
            _ => 256,
        };
        WorldCfg {
            seed,
            workload,
            ops: 150,
            channels: 3,
            data_crc: seed % 2 == 0,
            seg_size: 24 << 10,
            n_segs: 12,
            kset_keys: 8,
            region_blocks,
            policy: Policy::default(),
            switch: None,
            seq_percent: 0,
        }
    }
}

#[derive(Default, Clone)]
struct Block {
    /// Content ids of completed writes, oldest first; 0 = zeros (initial content).
    hist: Vec<u64>,
    /// Index in `hist` of the newest durable content.
    floor: usize,
}

/// An in-flight writeback batch.
struct Inflight {
    pending: usize,
    failed: bool,
    flush_sent: bool,
    /// `direct_mark` when its FLUSH was submitted (reported when it completed).
    mark: FlushMark,
}

pub struct World {
    pub cfg: WorldCfg,
    /// Byte offset of block 0 of the workload's region on the device.
    base: u64,
    rng: Rng,
    pub pmem: Arc<SimPmem>,
    pub disk: SimDisk,
    pub engine: Engine<Arc<SimPmem>>,
    chans: Vec<Channel>,
    blocks: Vec<Block>,
    /// Epoch (number of completed FLUSHes) at which each write id was issued.
    write_epoch: Vec<u64>,
    /// Per flush epoch k: for each block, the last content before the k-th flush.
    flush_snap: Vec<Vec<u64>>,
    /// Content ids of the operation in flight when a crash hit.
    inflight_ids: Vec<(u64, u64)>,
    wb: WbBatch,
    wb_inflight: Option<Inflight>,
    pub crashes: u64,
    /// Unsynced keys the replays so far dropped (their ksets were not covered by a
    /// completed backing FLUSH).
    pub unsynced_dropped: u64,
    /// Write ids that went to the backing device directly (policy.rs), which the
    /// backing-alone check does not order against the log.
    direct: Vec<bool>,
    /// Where each channel's last request ended (for sequential streams), in blocks.
    last_end: Vec<u64>,
    ops_done: usize,
}

fn identity(size: u64) -> BackingIdentity {
    BackingIdentity {
        size,
        block_size: BS as u32,
        id: "sim-disk".into(),
    }
}

fn pattern(id: u64, blk: u64, buf: &mut [u8]) {
    let w = if id == 0 {
        0
    } else {
        (id << 24) | (blk & 0xff_ffff)
    };
    for c in buf.chunks_exact_mut(8) {
        c.copy_from_slice(&w.to_le_bytes());
    }
}

/// Which write a block's content came from; Err for garbage.
fn decode(blk: u64, b: &[u8]) -> Result<u64, String> {
    let w = u64::from_le_bytes(b[..8].try_into().unwrap());
    if b.chunks_exact(8).any(|c| c != w.to_le_bytes()) {
        return Err(format!("block {blk}: torn or garbage content"));
    }
    if w == 0 {
        return Ok(0);
    }
    if w & 0xff_ffff != blk & 0xff_ffff {
        return Err(format!("block {blk}: holds block {}'s data", w & 0xff_ffff));
    }
    Ok(w >> 24)
}

impl World {
    pub fn new(cfg: WorldCfg) -> Result<Self, String> {
        let mut rng = Rng::new(cfg.seed);
        let size = crate::engine::format::SEGMENTS_OFF + cfg.n_segs * cfg.seg_size as u64;
        let pmem = Arc::new(SimPmem::new(size));
        // The region straddles the 4 MiB boundary between two index shards, so
        // requests are split into pieces that go through different ksets.
        let base = (4 << 20) - cfg.region_blocks * BS as u64 / 2;
        let backing = base + cfg.region_blocks * 4 * BS as u64;
        let mut disk = SimDisk::new(backing, BS as u32);
        disk.set_seed(rng.next_u64());
        let mut fo = FormatOptions::new(identity(backing), rng.next_u64());
        fo.seg_size = cfg.seg_size;
        fo.kset_keys = cfg.kset_keys;
        fo.data_crc = cfg.data_crc;
        fo.gc_percent = (rng.below(4) * 20) as u32;
        if cfg.workload == Workload::Hot {
            // Lazy writeback: windows are mostly superseded when it reaches them.
            fo.gc_percent = 70 + fo.gc_percent / 4;
        }
        // Writeback windows of 1 to 8 ksets: one FLUSH after several ksets' writes,
        // which the disk completes and persists in any order.
        let window = 1 + rng.below(8) as u32;
        fo.policy = cfg.policy;
        let engine =
            Engine::format(pmem.clone(), &fo, &Self::config(&cfg)).map_err(|e| e.to_string())?;
        let n = cfg.region_blocks as usize;
        Ok(World {
            base,
            chans: (0..cfg.channels).map(|_| Channel::default()).collect(),
            blocks: vec![
                Block {
                    hist: vec![0],
                    floor: 0
                };
                n
            ],
            write_epoch: vec![0],
            flush_snap: vec![],
            inflight_ids: vec![],
            // As the runtimes outside a drain: windows may recycle live dirty data.
            wb: {
                let mut b = WbBatch::with_window(window);
                b.set_recycle(true);
                b
            },
            wb_inflight: None,
            crashes: 0,
            unsynced_dropped: 0,
            direct: vec![false],
            last_end: vec![0; cfg.channels],
            ops_done: 0,
            cfg,
            rng,
            pmem,
            disk,
            engine,
        })
    }

    fn config(_cfg: &WorldCfg) -> Config {
        Config {
            log_reserve: 2,
            ..Config::default()
        }
    }

    /// Fences executed so far (crash points).
    pub fn fences(&self) -> u64 {
        self.pmem.persistence_points()
    }

    /// Runs the workload. Stops early (Ok) when the pmem crashed under a fence limit.
    pub fn run(&mut self) -> Result<(), String> {
        for _ in 0..self.cfg.ops {
            if let Some((at, mode)) = self.cfg.switch {
                if self.ops_done == at && self.engine.policy().mode != mode {
                    self.trace(format_args!("switch to {}", mode.name()));
                    let p = Policy {
                        mode,
                        ..self.engine.policy()
                    };
                    self.engine.set_policy(p).map_err(|e| e.to_string())?;
                }
            }
            self.ops_done += 1;
            self.step()?;
            if self.pmem.crashed() {
                return Ok(());
            }
            let refs: Vec<&Channel> = self.chans.iter().collect();
            self.engine
                .check_invariants(&refs)
                .map_err(|e| format!("invariant: {e}"))?;
        }
        Ok(())
    }

    fn step(&mut self) -> Result<(), String> {
        let w = self.cfg.workload;
        let r = self.rng.below(100);
        let (p_read, p_fua, p_flush, p_zero, p_bg) = match w {
            Workload::Overwrite => (25, 3, 4, 0, 25),
            Workload::FuaFlush => (15, 35, 15, 0, 20),
            Workload::CacheFull => (15, 3, 3, 0, 15),
            Workload::ZeroDiscard => (20, 5, 5, 25, 20),
            Workload::Mixed => (30, 8, 5, 10, 20),
            Workload::Hot => (20, 0, 0, 0, 25),
        };
        if r < p_bg {
            return self.background();
        }
        if w == Workload::Hot && self.rng.chance(1, 150) {
            return self.flush(); // rare: epochs long enough to recycle in
        }
        let r = self.rng.below(100);
        let ch = self.rng.index(self.chans.len());
        if r < p_read {
            return self.read(ch);
        }
        if r < p_read + p_flush {
            return self.flush();
        }
        let (off, n) = self.range_on(ch);
        if r < p_read + p_flush + p_zero {
            let discard = self.rng.chance(1, 2);
            let fua = self.rng.chance(p_fua as u32, 100);
            return self.zeroes(off, n, discard, fua);
        }
        let fua = self.rng.chance(p_fua as u32 * 2, 100);
        self.write(ch, off, n, fua)
    }

    fn range(&mut self) -> (u64, u64) {
        let max = match self.cfg.workload {
            Workload::CacheFull => 64,
            Workload::Hot => 8,
            _ => 16,
        };
        if self.cfg.workload == Workload::Hot {
            // Whole 4 KiB blocks, as superseded marks count them.
            let n = 8 * (1 + self.rng.below(max / 8));
            return (8 * self.rng.below((self.cfg.region_blocks - n) / 8 + 1), n);
        }
        let n = 1 + self.rng.below(max);
        let off = self.rng.below(self.cfg.region_blocks - n + 1);
        (off, n)
    }

    /// A range that continues channel `ch`'s last request `seq_percent` of the time.
    fn range_on(&mut self, ch: usize) -> (u64, u64) {
        let (off, n) = self.range();
        let end = self.last_end[ch];
        let (off, n) = if self.rng.chance(self.cfg.seq_percent, 100) && end < self.cfg.region_blocks
        {
            (end, n.min(self.cfg.region_blocks - end))
        } else {
            (off, n)
        };
        self.last_end[ch] = off + n;
        (off, n)
    }

    fn new_write(&mut self, zero: bool) -> u64 {
        if zero {
            return 0;
        }
        self.direct.push(false);
        self.write_epoch.push(self.flush_snap.len() as u64);
        self.write_epoch.len() as u64 - 1
    }

    fn complete(&mut self, off: u64, n: u64, id: u64, fua: bool) {
        for b in off..off + n {
            let blk = &mut self.blocks[b as usize];
            blk.hist.push(id);
            if fua {
                blk.floor = blk.hist.len() - 1;
            }
        }
    }

    fn write(&mut self, ch: usize, off: u64, n: u64, fua: bool) -> Result<(), String> {
        let id = self.new_write(false);
        self.trace(format_args!(
            "write id {id} blocks {off}+{n} fua {fua} ch {ch}"
        ));
        let mut data = vec![0u8; n as usize * BS];
        for i in 0..n {
            pattern(
                id,
                off + i,
                &mut data[i as usize * BS..(i as usize + 1) * BS],
            );
        }
        self.inflight_ids = (off..off + n).map(|b| (b, id)).collect();
        let o = self.base + off * BS as u64;
        if let Route::Direct { through } =
            self.engine
                .route_write(&mut self.chans[ch], o, n * BS as u64)
        {
            let d = self
                .engine
                .begin_direct(o, n * BS as u64, through)
                .map_err(|e| format!("begin_direct {off}+{n}: {e}"))?;
            if let Some(d) = d {
                self.trace(format_args!("  direct (through {through})"));
                if self.pmem.crashed() {
                    return Ok(()); // no power: nothing reaches the disk
                }
                self.direct[id as usize] = true;
                // The direct-write protocol (runtime::direct): the backing write, its end
                // in the engine (a write-through is cached there, unsynced, with no
                // FLUSH), then for FUA a backing FLUSH with the mark taken after the end.
                let r = self.disk.write(o, &data);
                self.engine
                    .end_direct(&mut self.chans[ch], o, &data, d, r.is_ok());
                r.map_err(|e| format!("direct write {off}+{n}: {e:?}"))?;
                if self.pmem.crashed() {
                    return Ok(());
                }
                if fua {
                    let mark = self.engine.direct_mark();
                    self.disk
                        .flush()
                        .map_err(|e| format!("FUA flush {off}+{n}: {e:?}"))?;
                    self.engine.direct_flushed(mark);
                    if self.pmem.crashed() {
                        return Ok(());
                    }
                }
                self.inflight_ids.clear();
                self.complete(off, n, id, fua);
                return Ok(());
            }
        }
        // Half the plain writes go through `write_many` (a batch of one), the path the
        // SPDK module takes, so crash points cover its copy, fence and key order.
        let batched = !fua && (off + n) % 2 == 0;
        let mut out = Vec::with_capacity(1);
        for attempt in 0.. {
            let r = if batched {
                let e = &self.engine;
                e.write_many(&mut self.chans[ch], 1, |_| (o, &data[..]), &mut out);
                out.pop().expect("one outcome per request")
            } else {
                self.engine.write(&mut self.chans[ch], o, &data, fua)
            };
            match r {
                Ok(()) => break,
                Err(IoError::Busy) if attempt < 200 => self.make_room()?,
                Err(e) => return Err(format!("write {off}+{n}: {e} (attempt {attempt})")),
            }
            if self.pmem.crashed() {
                return Ok(());
            }
        }
        if self.pmem.crashed() {
            return Ok(()); // the power failed during the write: it never completed
        }
        self.inflight_ids.clear();
        self.complete(off, n, id, fua);
        Ok(())
    }

    fn zeroes(&mut self, off: u64, n: u64, discard: bool, fua: bool) -> Result<(), String> {
        self.trace(format_args!(
            "zeroes blocks {off}+{n} discard {discard} fua {fua}"
        ));
        self.inflight_ids = (off..off + n).map(|b| (b, 0)).collect();
        let (o, len) = (self.base + off * BS as u64, n * BS as u64);
        if self.engine.zeroes_direct() {
            let d = self
                .engine
                .begin_direct(o, len, false)
                .map_err(|e| format!("begin_direct zeroes {off}+{n}: {e}"))?;
            if let Some(d) = d {
                self.trace(format_args!("  direct zeroes"));
                if self.pmem.crashed() {
                    return Ok(()); // no power: nothing reaches the disk
                }
                let r = if discard {
                    self.disk.discard(o, len)
                } else {
                    self.disk.write_zeroes(o, len)
                };
                self.engine.end_direct_zeroes(o, len, d, r.is_ok(), discard);
                r.map_err(|e| format!("direct zeroes {off}+{n}: {e:?}"))?;
                if self.pmem.crashed() {
                    return Ok(());
                }
                if fua {
                    let mark = self.engine.direct_mark();
                    self.disk
                        .flush()
                        .map_err(|e| format!("FUA flush {off}+{n}: {e:?}"))?;
                    self.engine.direct_flushed(mark);
                    if self.pmem.crashed() {
                        return Ok(());
                    }
                }
                self.inflight_ids.clear();
                self.complete(off, n, 0, fua);
                return Ok(());
            }
        }
        for attempt in 0.. {
            match self
                .engine
                .write_zeroes(self.base + off * BS as u64, n * BS as u64, discard, fua)
            {
                Ok(()) => break,
                Err(IoError::Busy) if attempt < 200 => self.make_room()?,
                Err(e) => return Err(format!("write_zeroes {off}+{n}: {e}")),
            }
            if self.pmem.crashed() {
                return Ok(());
            }
        }
        if self.pmem.crashed() {
            return Ok(());
        }
        self.inflight_ids.clear();
        self.complete(off, n, 0, fua);
        Ok(())
    }

    /// What the environment does for a deferred request: close ksets, write back, GC.
    fn make_room(&mut self) -> Result<(), String> {
        let _ = self.engine.close_ksets();
        for _ in 0..1000 {
            if !self.writeback_step()? {
                break;
            }
        }
        self.engine.gc(&mut Vec::new());
        Ok(())
    }

    /// Writes back everything (as a drain after a mode switch does, with no new
    /// writes) and returns the dirty bytes left: 0 unless writeback is stuck.
    pub fn drain(&mut self) -> Result<u64, String> {
        self.make_room()?;
        while self.writeback_step()? {}
        Ok(self.engine.dirty_bytes())
    }

    fn trace(&self, a: std::fmt::Arguments) {
        if std::env::var_os("PCACHE_TRACE").is_some() {
            eprintln!("[fence {}] {a}", self.pmem.persistence_points());
        }
    }

    fn flush(&mut self) -> Result<(), String> {
        self.trace(format_args!("flush"));
        for attempt in 0.. {
            match self.engine.flush() {
                Ok(()) => break,
                Err(_) if attempt < 200 => self.make_room()?,
                Err(e) => return Err(format!("flush: {e}")),
            }
            if self.pmem.crashed() {
                return Ok(());
            }
        }
        if self.pmem.crashed() {
            return Ok(());
        }
        // Writes that went around the cache are made durable by the disk's FLUSH.
        if let Some(n) = self.engine.direct_flush_needed() {
            self.disk
                .flush()
                .map_err(|e| format!("flush of direct writes: {e:?}"))?;
            self.engine.direct_flushed(n);
        }
        let snap: Vec<u64> = self
            .blocks
            .iter()
            .map(|b| *b.hist.last().unwrap())
            .collect();
        self.flush_snap.push(snap);
        for b in &mut self.blocks {
            b.floor = b.hist.len() - 1;
        }
        Ok(())
    }

    fn read(&mut self, ch: usize) -> Result<(), String> {
        let (off, n) = self.range_on(ch);
        let mut buf = vec![0u8; n as usize * BS];
        let o = self.base + off * BS as u64;
        let missed = match self.engine.read(&mut self.chans[ch], o, &mut buf) {
            Ok(m) => m,
            Err(e) => return Err(format!("read {off}+{n}: {e}")),
        };
        // Sometimes let another channel write into the range while the miss is out.
        let before: Vec<u64> = (off..off + n)
            .map(|b| *self.blocks[b as usize].hist.last().unwrap())
            .collect();
        if missed > 0 && self.cfg.workload == Workload::Mixed && self.rng.chance(1, 3) {
            let other = (ch + 1) % self.chans.len();
            let (wo, wn) = (off + self.rng.below(n), 1);
            self.write(other, wo, wn, false)?;
            if self.pmem.crashed() {
                self.engine.fill(&mut self.chans[ch], o, &buf, false);
                return Ok(());
            }
        }
        let misses: Vec<_> = self.chans[ch].misses().collect();
        let mut ok = true;
        for m in misses {
            if self
                .disk
                .read(o + m.at as u64, &mut buf[m.at..m.at + m.len])
                .is_err()
            {
                ok = false;
            }
        }
        self.engine.fill(&mut self.chans[ch], o, &buf, ok);
        if !ok {
            return Ok(());
        }
        for (i, b) in (off..off + n).enumerate() {
            let got = decode(b, &buf[i * BS..(i + 1) * BS])?;
            let now = *self.blocks[b as usize].hist.last().unwrap();
            if got != now && got != before[i] {
                return Err(format!(
                    "read of block {b} returned write {got}, expected {now} (seed {})",
                    self.cfg.seed
                ));
            }
        }
        Ok(())
    }

    fn background(&mut self) -> Result<(), String> {
        match self.rng.below(4) {
            0 => {
                self.engine.tick();
                // Time passed: the runtimes' periodic backing FLUSH for direct writes
                // and unsynced keys (`runtime::sched::direct_flush_due`).
                if let Some(mark) = self.engine.direct_flush_needed() {
                    if !self.pmem.crashed() {
                        self.trace(format_args!("periodic direct flush"));
                        self.disk
                            .flush()
                            .map_err(|e| format!("periodic direct flush: {e:?}"))?;
                        self.engine.direct_flushed(mark);
                    }
                }
            }
            1 => {
                self.engine.gc(&mut Vec::new());
            }
            _ => {
                self.writeback_step()?;
            }
        }
        Ok(())
    }

    /// Advances writeback by one event. Returns false when there is nothing to do.
    fn writeback_step(&mut self) -> Result<bool, String> {
        if self.pmem.crashed() {
            // The power is gone: nothing more reaches the disk.
            return Ok(false);
        }
        let Some(inf) = &mut self.wb_inflight else {
            match self.engine.writeback_next(&mut self.wb) {
                WbNext::Idle => return Ok(false),
                WbNext::Stopped(m) => return Err(format!("writeback stopped: {m}")),
                WbNext::Ready => {}
            }
            for (tag, it) in self.wb.items.iter().enumerate() {
                let op = match it.kind {
                    WbKind::Data { pmem_off } => {
                        let mut d = vec![0u8; it.len as usize];
                        self.pmem.read(pmem_off, &mut d);
                        DiskOp::Write {
                            off: it.off,
                            data: d,
                        }
                    }
                    WbKind::Zero => DiskOp::WriteZeroes {
                        off: it.off,
                        len: it.len as u64,
                    },
                    WbKind::Discard => DiskOp::Discard {
                        off: it.off,
                        len: it.len as u64,
                    },
                };
                self.disk.submit(tag as u64, op);
            }
            self.trace(format_args!("writeback batch {:?}", self.wb.items));
            self.wb_inflight = Some(Inflight {
                pending: self.wb.items.len(),
                failed: false,
                flush_sent: false,
                mark: FlushMark::default(),
            });
            return Ok(true);
        };
        if inf.pending == 0 && !inf.flush_sent {
            inf.flush_sent = true;
            // As the runtimes do: the FLUSH covers the direct writes and ksets before it.
            inf.mark = self.engine.direct_mark();
            self.disk.submit(u64::MAX, DiskOp::Flush);
            return Ok(true);
        }
        let Some((tag, c)) = self.disk.poll(&mut self.rng) else {
            return Ok(true);
        };
        let failed = c.is_err();
        inf.failed |= failed;
        if tag == u64::MAX {
            let ok = !inf.failed;
            let mark = inf.mark;
            self.trace(format_args!("writeback done ok {ok}"));
            self.wb_inflight = None;
            if c.is_ok() {
                self.engine.direct_flushed(mark);
                if self.pmem.crashed() {
                    return Ok(false);
                }
            }
            self.engine.writeback_done(&self.wb, ok);
        } else {
            inf.pending -= 1;
            if !failed {
                let len = self.wb.items.get(tag as usize).map_or(0, |i| i.len as u64);
                self.engine.writeback_progress(&mut self.wb, len);
            }
        }
        Ok(true)
    }
}
