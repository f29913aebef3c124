//! Writeback and admission pacing, driven by the environment (GC is in `gc`).
//!
//! Writeback walks the log from dirty_tail one window at a time: `writeback_next` hands
//! out the dirty extents of up to `WINDOW_KSETS` consecutive ksets of one write epoch
//! (overlaps resolved, newest wins; clean ones skipped; sorted by address); the caller
//! writes them to the backing device in any order, FLUSHes it, and calls
//! `writeback_done`, which only then persists the advanced dirty_tail. So the backing
//! device alone always holds the result of a prefix of the log plus, for the window in
//! flight, any subset of its writes: as no FLUSH or FUA lies inside a window, that is
//! what a disk with a volatile write cache may show between two FLUSHes. Above the GC
//! watermark, while closed dirty data exists, writes are admitted against
//! credit that writeback earns (`admit`), so they slow down evenly instead of stalling.

use super::format::{
    Geometry, KeyRec, KsetCheck, LogPos, KEY_CLEAN, KEY_DISCARD, KEY_SIZE, KSET_HDR,
};
use super::index;
use super::open::read_kset;
use super::segs::{Segs, MARK_BLOCK};
use super::sync::lock;
use super::{Engine, Pmem};
use std::sync::atomic::Ordering::{Acquire, Relaxed};

/// Free segments beyond the log reserve below which GC runs whatever the watermark.
const GC_FREE_FLOOR: u32 = 2;

/// How far under the watermark a GC round frees (see `gc_low_segs`): a ms or two of
/// writes at memory speed, so writers paced at the watermark do not wait for every
/// poll's single segment.
const GC_ROUND_BYTES: u64 = 4 << 20;

/// Most ksets one writeback window takes (one backing FLUSH for all of them).
pub const WINDOW_KSETS: usize = 8;
/// Ksets in a window that follows a sparse one (`WbBatch::set_small_windows`): a
/// random overwrite of a working set the cache holds leaves windows mostly superseded,
/// and over a base whose FLUSH is cheap, windows of 2 ksets instead of 8 gave the SPDK
/// in-cache random writes +12-16% on one core (a delay bdev over malloc, 25 us writes)
/// and +15% on two (over malloc); 1 kset lost the one-core gain.
pub const SMALL_WINDOW_KSETS: usize = 2;
/// A window is sparse when the data it writes back is at most 1/SPARSE of the data it
/// retires.
const SPARSE: u64 = 2;

/// What to write to the backing device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WbKind {
    /// Copy `len` bytes from the medium at `pmem_off`.
    Data {
        pmem_off: u64,
    },
    Zero,
    Discard,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WbItem {
    pub off: u64,
    pub len: u32,
    pub kind: WbKind,
}

/// One kset's worth of writeback; reuse it across calls (no allocation once warm).
#[derive(Default)]
pub struct WbBatch {
    pub items: Vec<WbItem>,
    pos: LogPos,
    next: LogPos,
    dirty_bytes: u64,
    /// Bytes of data the batch's keys point at (dirty or clean): what acknowledging it
    /// lets GC reclaim, and the admission credit it earns.
    retire_bytes: u64,
    /// Credit already earned through `writeback_progress`.
    credited: u64,
    /// Ksets in the window.
    ksets: u32,
    /// Most ksets a window may take (0: `WINDOW_KSETS`).
    window: u32,
    /// Whether a window after a sparse one takes `SMALL_WINDOW_KSETS` (runtime's
    /// choice), and whether the last one was sparse.
    small: bool,
    sparse: bool,
    /// Bytes of this kset's dirty data a newer key of the same epoch covers.
    skipped: u64,
    keys: Vec<KeyRec>,
    /// `build`'s scratch: key indices sorted by offset, and one group's union.
    order: Vec<u32>,
    covered: Vec<(u64, u64)>,
    buf: Vec<u8>,
    /// Whether live dirty data may be moved instead of written back (`recycle`), and
    /// the indices of the items `recycle` moved.
    pub(super) recycle: bool,
    pub(super) moved: Vec<u32>,
    /// Bytes `recycle` moved out of this window.
    pub(super) recycled: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WbNext {
    /// Nothing closed is dirty.
    Idle,
    /// `items` is ready: write them, flush the backing device, call `writeback_done`.
    Ready,
    /// Writeback stopped on corrupt metadata or data; the message says where.
    Stopped(String),
}

/// What one GC call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcResult {
    pub ksets: u32,
    pub segments_freed: u32,
}

impl WbBatch {
    /// A batch whose windows take at most `ksets` ksets (at least one). A runtime that
    /// blocks while a window is written keeps it small; one that keeps many requests in
    /// flight takes more per backing FLUSH.
    pub fn with_window(ksets: u32) -> WbBatch {
        WbBatch {
            window: ksets.max(1),
            ..Default::default()
        }
    }

    /// Lets windows move their live dirty data to the log head instead of writing it
    /// back where that pays (see `recycle`). Runtimes turn it on, and off during a
    /// drain: a drain must write everything back.
    pub fn set_recycle(&mut self, on: bool) {
        self.recycle = on;
    }

    /// Lets a window that follows a sparse one (at most half of what it retires written
    /// back) take `SMALL_WINDOW_KSETS` ksets. No effect on a batch whose window size is
    /// set (`with_window`). Runtimes turn it on where the base's FLUSH is cheap
    /// (`runtime::sched::set_window_rules`): each window pays one, and a mostly live
    /// window wants many requests in flight.
    pub fn set_small_windows(&mut self, on: bool) {
        self.small = on;
    }

    /// Ksets in the window.
    pub fn ksets(&self) -> u32 {
        self.ksets
    }

    /// Bytes of live dirty data this window moved to the log head instead of writing
    /// them back (a copy in the medium: a runtime bounds how many such windows it takes
    /// in one go).
    pub fn recycled(&self) -> u64 {
        self.recycled
    }

    /// Bytes of data the batch's keys point at (what acknowledging it lets GC reclaim).
    pub fn retire_bytes(&self) -> u64 {
        self.retire_bytes
    }

    /// Bytes this batch writes.
    pub fn bytes(&self) -> u64 {
        self.items.iter().map(|i| i.len as u64).sum()
    }

    /// Resolves overlaps inside the kset (later keys win) into `items`. With `marks`,
    /// whole blocks marked superseded are left out (and counted in `skipped`).
    ///
    /// Keys are sorted by offset and cut into groups that overlap nothing outside them
    /// (a random 4 KiB workload's groups are single keys); each group resolves its
    /// overlaps, newest first, against the union of its newer keys. Sorting
    /// keeps a window of thousands of scattered keys O(n log n): resolving all of them
    /// against one sorted union shifted that union on every insert.
    /// `segs` (None in unit tests) tells which keys' segments were reclaimed out of
    /// order (those keys are left out: see `compact`) and, with `marks`, which blocks
    /// were superseded.
    ///
    /// With `marks`, a dirty key whose data is superseded in full is counted as skipped
    /// before the sort and takes no part in resolving overlaps (a random overwrite's
    /// window is mostly such keys). An older key of the window it overlapped may then
    /// write back a part no mark covers (less than a block): bytes the client wrote in
    /// the same epoch (one window, one epoch), which a disk may show until the next
    /// FLUSH, as build already writes the part of a marked block that a newer key
    /// splits.
    fn build(&mut self, geo: &Geometry, segs: Option<&Segs>, marks: bool) {
        self.items.clear();
        self.skipped = 0;
        let keys = &self.keys;
        let order = &mut self.order;
        order.clear();
        match segs.filter(|_| marks) {
            Some(segs) => {
                for (i, k) in keys.iter().enumerate() {
                    if k.has_data()
                        && k.flags & KEY_CLEAN == 0
                        && segs.all_superseded(k.seg, k.seg_off, k.len, k.gen as u32)
                    {
                        self.skipped += k.len as u64;
                    } else {
                        order.push(i as u32);
                    }
                }
            }
            None => order.extend(0..keys.len() as u32),
        }
        order.sort_unstable_by_key(|&i| keys[i as usize].off);
        let mut out = Emit {
            items: &mut self.items,
            skipped: &mut self.skipped,
            geo,
            segs,
            marks,
        };
        let mut g = 0;
        while g < order.len() {
            // The group: keys from `g` on that start before the furthest end so far.
            let mut end = 0u64;
            let mut h = g;
            while h < order.len() && (h == g || keys[order[h] as usize].off < end) {
                let k = &keys[order[h] as usize];
                end = end.max(k.off + k.len as u64);
                h += 1;
            }
            // Newest first (log order is the keys' order); a lone key just emits.
            order[g..h].sort_unstable_by(|a, b| b.cmp(a));
            self.covered.clear();
            for &ki in &order[g..h] {
                resolve(&mut self.covered, &keys[ki as usize], &mut out);
            }
            g = h;
        }
        self.items.sort_unstable_by_key(|i| i.off);
    }
}

/// Emits the dirty parts of `k` outside `covered` (disjoint ranges sorted by start: the
/// union of the newer keys of its group) and adds `k` to the union.
fn resolve(covered: &mut Vec<(u64, u64)>, k: &KeyRec, out: &mut Emit<'_>) {
    let (ks, ke) = (k.off, k.off + k.len as u64);
    let dirty = k.flags & KEY_CLEAN == 0;
    let first = covered.partition_point(|&(_, ce)| ce <= ks);
    let (mut at, mut i) = (ks, first);
    while let Some(&(cs, ce)) = covered.get(i).filter(|r| r.0 < ke) {
        if cs > at && dirty {
            out.key_part(k, at, cs);
        }
        at = at.max(ce);
        i += 1;
    }
    if at < ke && dirty {
        out.key_part(k, at, ke);
    }
    // Merge [ks, ke) with the ranges it overlaps, covered[first..i].
    if first == i {
        covered.insert(first, (ks, ke));
    } else {
        let merged = (ks.min(covered[first].0), ke.max(covered[i - 1].1));
        covered[first] = merged;
        covered.drain(first + 1..i);
    }
}

/// Where `build` puts the parts of keys it writes back.
struct Emit<'a> {
    items: &'a mut Vec<WbItem>,
    skipped: &'a mut u64,
    geo: &'a Geometry,
    segs: Option<&'a Segs>,
    marks: bool,
}

impl Emit<'_> {
    /// Emits `[s, e)` of dirty key `k`, less the blocks marked superseded.
    fn key_part(&mut self, k: &KeyRec, s: u64, e: u64) {
        let Some(segs) = self.segs.filter(|_| k.has_data()) else {
            self.items.push(item(self.geo, k, s, e));
            return;
        };
        // Its segment was reclaimed out of order: compaction found all of its data
        // superseded within its epoch (or the key was not yet in the log, so no FLUSH
        // came between it and what replaced it), as a mark would say.
        if segs.gens[k.seg as usize].load(Acquire) != k.gen {
            *self.skipped += e - s;
            return;
        }
        if !self.marks {
            self.items.push(item(self.geo, k, s, e));
            return;
        }
        let mb = MARK_BLOCK as u64;
        let (mut at, mut run) = (s, s);
        while at < e {
            let so = k.seg_off as u64 + (at - k.off);
            let next = e.min(at + (mb - so % mb));
            if so % mb == 0 && next - at == mb && segs.superseded(k.seg, so as u32, k.gen as u32) {
                if run < at {
                    self.items.push(item(self.geo, k, run, at));
                }
                *self.skipped += mb;
                run = next;
            }
            at = next;
        }
        if run < e {
            self.items.push(item(self.geo, k, run, e));
        }
    }
}

fn item(geo: &Geometry, k: &KeyRec, s: u64, e: u64) -> WbItem {
    let kind = if k.has_data() {
        WbKind::Data {
            pmem_off: geo.data_off(k.seg, k.seg_off as u64 + (s - k.off)),
        }
    } else if k.flags & KEY_DISCARD != 0 {
        WbKind::Discard
    } else {
        WbKind::Zero
    };
    WbItem {
        off: s,
        len: (e - s) as u32,
        kind,
    }
}

impl<P: Pmem> Engine<P> {
    fn stop_writeback(&self, msg: String) -> WbNext {
        self.note_writeback_error(format!("writeback stopped: {msg}"));
        lock(&self.errors).writeback = Some(msg.clone());
        WbNext::Stopped(msg)
    }

    /// Prepares the next writeback window: from dirty_tail, up to `WINDOW_KSETS`
    /// consecutive ksets of one known write epoch (a single kset when its epoch is
    /// unknown). No FLUSH or FUA lies between them, so their writes may reach the backing
    /// device in any order, like a disk's write cache between two FLUSHes: `build`
    /// resolves overlaps (newest wins) and sorts the window by address, and one backing
    /// FLUSH then covers all of it before dirty_tail moves past it.
    pub fn writeback_next(&self, b: &mut WbBatch) -> WbNext {
        if let Some(m) = &lock(&self.errors).writeback {
            return WbNext::Stopped(m.clone());
        }
        b.buf.resize(self.geo.kset_max_size(), 0);
        b.keys.clear();
        b.dirty_bytes = 0;
        b.retire_bytes = 0;
        b.credited = 0;
        b.recycled = 0;
        let mut t = lock(&self.tails);
        let mut pos = t.dirty;
        let mut n = 0usize;
        let mut epoch = None;
        loop {
            if pos == lock(&self.head).pos {
                break;
            }
            let hdr = match read_kset(&self.pmem, &self.geo, pos, &mut b.buf) {
                Ok(KsetCheck::Valid(h)) => h,
                _ if n > 0 => break, // the next call meets it at dirty_tail
                Ok(KsetCheck::End) => {
                    return self.stop_writeback(format!(
                        "kset {} at {}:{} (dirty_tail) is unreadable",
                        pos.seq, pos.seg, pos.off
                    ))
                }
                Err(e) => return self.stop_writeback(e.to_string()),
            };
            if hdr.is_last() {
                if n > 0 {
                    break;
                }
                t.dirty = pos.after(&hdr);
                self.persist_dirty_tail(&mut t);
                pos = t.dirty;
                continue;
            }
            let e = self.kset_epoch(pos.seq);
            if n > 0 && (e.is_none() || e != epoch) {
                break;
            }
            for i in 0..hdr.count as usize {
                let o = KSET_HDR + i * KEY_SIZE;
                match KeyRec::decode(&b.buf[o..o + KEY_SIZE], &self.geo) {
                    Ok(k) => {
                        if k.flags & KEY_CLEAN == 0 {
                            b.dirty_bytes += k.len as u64;
                        }
                        if k.has_data() {
                            b.retire_bytes += k.len as u64;
                        }
                        b.keys.push(k)
                    }
                    Err(e) => return self.stop_writeback(format!("kset {}: {e}", pos.seq)),
                }
            }
            epoch = e;
            n += 1;
            pos = pos.after(&hdr);
            let max = match b.window {
                0 if b.small && b.sparse => SMALL_WINDOW_KSETS,
                0 => WINDOW_KSETS,
                w => w as usize,
            };
            if e.is_none() || n >= max || b.retire_bytes >= self.window_bytes_max() {
                break;
            }
        }
        if n == 0 {
            return WbNext::Idle;
        }
        if self.data_crc {
            if let Err(m) = self.verify_keys(b) {
                self.counters.crc_errors_dirty.inc();
                return self.stop_writeback(m);
            }
        }
        b.pos = t.dirty;
        b.next = pos;
        b.ksets = n as u32;
        t.wb_end = t.wb_end.max(pos.seq);
        drop(t);
        // Marks name data a newer key of the *same* epoch replaced; the window's
        // epoch must be known and still identified exactly by an extent's epoch
        // bits (see `Segs::mark_superseded` and `io::insert_key`).
        let now = self.epoch.load(Acquire);
        let marks = epoch.is_some_and(|e| now - e < 1 << index::EPOCH_BITS);
        b.build(&self.geo, Some(&self.segs), marks);
        if marks {
            self.recycle(b, epoch);
        }
        b.sparse = b.bytes() * SPARSE <= b.retire_bytes;
        WbNext::Ready
    }

    /// The write epoch shared by every dirty key of the kset at `seq`, if known (it is
    /// not for ksets replayed at open, nor for ksets that straddle a barrier).
    fn kset_epoch(&self, seq: u64) -> Option<u64> {
        let mut head = lock(&self.head);
        while head.epochs.front().is_some_and(|&(s, _)| s < seq) {
            head.epochs.pop_front();
        }
        match head.epochs.front() {
            Some(&(s, e)) if s == seq => Some(e),
            _ => None,
        }
    }

    /// Never write corrupt data to the backing device: check every dirty key's CRC.
    fn verify_keys(&self, b: &mut WbBatch) -> Result<(), String> {
        let mut data = std::mem::take(&mut b.buf);
        let mut res = Ok(());
        for k in b
            .keys
            .iter()
            .filter(|k| k.has_data() && k.flags & KEY_CLEAN == 0)
            // A key of a segment compaction reclaimed is left out (see `build`).
            .filter(|k| self.segs.gens[k.seg as usize].load(Acquire) == k.gen)
        {
            data.resize(data.len().max(k.len as usize), 0);
            let d = &mut data[..k.len as usize];
            self.pmem
                .read(self.geo.data_off(k.seg, k.seg_off as u64), d);
            if super::format::crc(d) != k.data_crc {
                res = Err(format!(
                    "dirty data at backing offset {} (segment {} offset {}) fails its CRC",
                    k.off, k.seg, k.seg_off
                ));
                break;
            }
        }
        b.buf = data;
        res
    }

    /// Acknowledges a batch. `ok` means every item was written and the backing device
    /// was flushed afterwards. A failure is counted: say why with `writeback_failed`.
    pub fn writeback_done(&self, b: &WbBatch, ok: bool) {
        if !ok {
            self.writeback_failed(b, "the backing device failed a write or flush");
            return;
        }
        let mut t = lock(&self.tails);
        if t.dirty != b.pos {
            return;
        }
        t.dirty = b.next;
        self.persist_dirty_tail(&mut t);
        drop(t);
        lock(&self.head).closed_dirty -= b.dirty_bytes;
        self.earn(b.retire_bytes - b.credited.min(b.retire_bytes));
        self.counters.wb_ksets.add(b.ksets as u64);
        self.counters.wb_bytes.add(b.bytes());
        self.counters.wb_skipped_bytes.add(b.skipped);
        self.mark_written_back(&b.items);
    }

    /// A batch failed (`why`: what the backing device did): counted, remembered with
    /// the time as the last writeback error. The data stays dirty, to be written again.
    pub fn writeback_failed(&self, b: &WbBatch, why: &str) {
        self.counters.wb_errors.inc();
        self.note_writeback_error(format!(
            "writeback of kset {} ({} bytes) failed: {why}",
            b.pos.seq,
            b.bytes()
        ));
    }

    /// Whether writeback should run now (runtimes ask before `writeback_next`; a
    /// drain ignores it). Writing back lazily lets overwrites supersede older dirty
    /// data first, which writeback then skips (see `Segs::mark_superseded`): it runs when
    /// closed dirty data passes fifteen sixteenths of the GC watermark, when GC is wanted
    /// but finds nothing clean to reclaim, when writes are paced (`admit`), when
    /// compaction waits for dirty data to be written (`compact`), or when no write
    /// arrived for a whole tick.
    pub fn writeback_wanted(&self) -> bool {
        let (closed, head) = {
            let h = lock(&self.head);
            (h.closed_dirty, h.pos)
        };
        let (key, dirty) = {
            let t = lock(&self.tails);
            (t.key, t.dirty)
        };
        if dirty == head {
            return false; // nothing closed past dirty_tail
        }
        if self.compact_wants_wb.load(Relaxed) {
            return true; // compaction waits for dirty data in log order (see `compact`)
        }
        if self.gc_wanted() && key == dirty {
            return true; // GC is starved (even clean ksets need dirty_tail past them)
        }
        if self.pace.load(Relaxed) && closed >= self.pace_floor() {
            return true; // writers are paced by writeback's progress
        }
        if self.mode() != super::CacheMode::WriteBack {
            return true; // draining after a switch away from write-back
        }
        let capacity = self.geo.n_segs as u64 * self.geo.seg_data_size;
        // Fifteen sixteenths: the later writeback starts, the more of a hot working set's
        // dirty data is superseded (and skipped) first; the last sixteenth below the
        // watermark is headroom for writeback to get going before writes are paced.
        // (Seven eighths wrote back 20.6% of an in-cache random-write run's bytes, where
        // this writes back 18.3%: +6% IOPS in the SPDK bench, whose writeback shares the
        // core; the overload tiers' tails did not move.)
        closed == 0 || closed * 1600 >= capacity * 15 * self.gc_percent() as u64 || self.idle()
    }

    /// True when GC should run: usage at or above gc_percent, or a request found the
    /// cache full. Also turns admission pacing on or off (runtimes ask every poll): on
    /// while usage is over the watermark and closed dirty data exists. (Pacing only
    /// once GC had reached dirty_tail let writers run into a full cache again and again
    /// while GC reclaimed clean data a segment at a time: 320 cache-full events in 7 s
    /// of the SPDK tier's recovery case, where pacing keeps it under 3.)
    pub fn gc_wanted(&self) -> bool {
        let over = self.update_pace(self.segs.used() as u64);
        self.cache_full() || over
    }

    /// Turns pacing on or off for `used` segments in use; true when that is at or over
    /// the watermark. Called by every GC poll and whenever a writer opens a segment:
    /// between two polls (1 ms) writers at memory speed open a few segments, and with
    /// a stale flag they ran into a full cache instead of being paced.
    pub(super) fn update_pace(&self, used: u64) -> bool {
        let over = used >= self.watermark_segs();
        // Full for admission from where a GC round stops: in steady state usage moves
        // between that and the watermark, and every fill evicts.
        let full = used >= self.gc_low_segs();
        if self.over.load(Relaxed) != full {
            self.over.store(full, Relaxed);
        }
        let pace = over && lock(&self.head).closed_dirty > 0;
        if self.pace.load(Relaxed) != pace {
            self.pace.store(pace, Relaxed);
        }
        over
    }

    /// Most data bytes one writeback window retires: half the headroom between the GC
    /// watermark and a full cache. Writers above the watermark are admitted against the
    /// credit a window earns as its requests complete, but the window's space comes back
    /// only after its FLUSH and GC: a window as large as the headroom (8 ksets of 512 KiB
    /// against 4 MiB on a 128 MiB cache) let writers fill the cache while it was in
    /// flight. Caches of a few GiB and up have headroom for many windows.
    fn window_bytes_max(&self) -> u64 {
        let usable = (self.geo.n_segs - self.segs.reserve) as u64;
        let headroom = usable.saturating_sub(self.watermark_segs());
        (headroom * self.geo.seg_data_size / 2).max(1)
    }

    /// Closed dirty bytes below which pacing does not make writeback run: half the
    /// watermark. Up to that, dirty data waits for overwrites to supersede it (paced
    /// writers get in as GC reclaims the clean rest and usage drops under the
    /// watermark). Credit follows writeback and is capped, so writeback run for every
    /// paced write drained dirty data to a MiB or two in a steady random-write run:
    /// writeback then had only tiny windows (each paying a FLUSH), writers waited on that
    /// latency-bound loop, and overwrites had nothing left to supersede.
    fn pace_floor(&self) -> u64 {
        (self.watermark_segs() * self.geo.seg_data_size / 2).max(1)
    }

    /// Segments in use at which a GC round that started at the watermark stops: up to
    /// `GC_ROUND_BYTES` under it, in whole segments, and no more than the headroom
    /// between the watermark and full (so small caches keep most of their data).
    pub(super) fn gc_low_segs(&self) -> u64 {
        let wm = self.watermark_segs();
        let usable = (self.geo.n_segs - self.segs.reserve) as u64;
        let headroom = usable.saturating_sub(wm).max(1);
        let k = (GC_ROUND_BYTES / self.geo.seg_data_size).clamp(1, headroom);
        wm.saturating_sub(k)
    }

    /// Segments in use at which GC starts: `gc_percent` of them (rounded up), or fewer
    /// when that would leave less than `GC_FREE_FLOOR` beyond the log reserve (a small
    /// medium, where the watermark's share is only a few segments).
    pub(super) fn watermark_segs(&self) -> u64 {
        let n = self.geo.n_segs as u64;
        let floor = n.saturating_sub((self.segs.reserve + GC_FREE_FLOOR) as u64);
        (n * self.gc_percent() as u64).div_ceil(100).min(floor)
    }

    /// Admission pacing: above the GC watermark a write is admitted only against the
    /// credit writeback earns, so writers slow down evenly to writeback's pace instead
    /// of filling the cache at memory speed and then all waiting (60-150 ms) until GC
    /// frees a whole segment. Below the watermark, or with nothing closed to write back,
    /// every write is admitted. A write may overdraw positive credit (a request larger
    /// than the credit never starves); `Busy` otherwise, with nothing done.
    pub(super) fn admit(&self, len: u64) -> Result<(), super::IoError> {
        if !self.pace.load(Relaxed) {
            return Ok(());
        }
        super::sync::count::rmw();
        if self.credit.fetch_sub(len as i64, Relaxed) > 0 {
            return Ok(());
        }
        self.credit.fetch_add(len as i64, Relaxed);
        Err(super::IoError::Busy)
    }

    /// Lets a paced write that has waited too long (the runtime decides: a few ms) in
    /// without credit, while the cache is less than halfway from the GC watermark to
    /// full: a pause in writeback (a slow base request at the end of a window, a FLUSH)
    /// then costs headroom, not a stall of every writer. Adds enough credit for the
    /// write's retry to take (positive credit admits one write of any size); true when it
    /// did. Past halfway, writes wait for writeback again, so the headroom is never spent
    /// entirely.
    pub fn overdraw(&self) -> bool {
        if !self.pace.load(Relaxed) {
            return true; // no longer paced: the retry gets in anyway
        }
        let used = self.segs.used() as u64;
        let usable = (self.geo.n_segs - self.segs.reserve) as u64;
        if used * 2 >= self.watermark_segs() + usable {
            return false;
        }
        if self.credit.fetch_max(1, Relaxed) < 1 {
            self.counters.overdrawn.inc();
        }
        true
    }

    /// True while writers depend on writeback's progress: admission is paced, a request
    /// waits for space, or one found the cache full. Runtimes then give writeback its
    /// full depth even while read misses wait for the base: the misses' priority was
    /// paid for by every paced writer (a mixed read/write trace at a quarter of its
    /// footprint ran at 0.78x the bare disk with writeback held to 2 writes in flight).
    pub fn writers_wait_on_writeback(&self) -> bool {
        self.pace.load(Relaxed) || self.waiting.load(Relaxed) > 0 || self.cache_full()
    }

    /// Adds admission credit, capped at one segment so a pause in writes cannot bank
    /// a long burst.
    fn earn(&self, bytes: u64) {
        let cap = self.geo.seg_data_size as i64;
        // A plain load first: while writers are not paced the credit sits at its cap,
        // and a locked update per writeback request waited for the base copy's stores
        // to drain (4.8% of a core in the SPDK module's random-write profile).
        if bytes == 0 || self.credit.load(Relaxed) >= cap {
            return;
        }
        let _ = self.credit.fetch_update(Relaxed, Relaxed, |c| {
            Some(c.saturating_add(bytes as i64).min(cap))
        });
    }

    /// Reports that `bytes` of batch `b`'s writes reached the backing device (before its
    /// FLUSH): admission credit follows writeback I/O by I/O rather than in whole
    /// batches. Optional; `writeback_done` credits whatever was not reported.
    pub fn writeback_progress(&self, b: &mut WbBatch, bytes: u64) {
        let n = bytes.min(b.retire_bytes.saturating_sub(b.credited));
        b.credited += n;
        self.earn(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::sim::{rng::Rng, tiny};

    /// Per byte of `[0, n)`, the medium offset `b`'s window writes it from (each byte
    /// at most once: checked).
    fn written(b: &WbBatch, n: usize) -> Vec<Option<u64>> {
        let mut got = vec![None; n];
        for it in &b.items {
            let WbKind::Data { pmem_off } = it.kind else {
                panic!("data keys only")
            };
            for d in 0..it.len as u64 {
                assert!(got[(it.off + d) as usize].is_none(), "byte written twice");
                got[(it.off + d) as usize] = Some(pmem_off + d);
            }
        }
        got
    }

    /// `build` writes back, for every byte, the newest dirty key of the kset covering
    /// it (and nothing a clean key or a newer key covers), compared with a byte model
    /// over random overlapping keys.
    #[test]
    fn build_matches_a_byte_model() {
        let geo = tiny::geometry(1);
        let mut rng = Rng::new(7);
        let mut b = WbBatch::default();
        for _ in 0..500 {
            b.keys.clear();
            let mut owner: Vec<Option<(usize, bool)>> = vec![None; 64];
            for i in 0..1 + rng.below(24) as usize {
                let off = rng.below(60);
                let len = 1 + rng.below(64 - off).min(12);
                let clean = rng.below(4) == 0;
                b.keys.push(KeyRec {
                    off,
                    len: len as u32,
                    flags: if clean { KEY_CLEAN } else { 0 },
                    seg: 0,
                    seg_off: (i * 64) as u32,
                    ..Default::default()
                });
                for o in off..off + len {
                    owner[o as usize] = Some((i, clean));
                }
            }
            b.build(&geo, None, false);
            let got = written(&b, 64);
            assert!(b.items.windows(2).all(|w| w[0].off < w[1].off), "sorted");
            for (o, own) in owner.iter().enumerate() {
                let want = match *own {
                    Some((i, false)) => {
                        let k = &b.keys[i];
                        Some(geo.data_off(0, k.seg_off as u64 + (o as u64 - k.off)))
                    }
                    _ => None,
                };
                assert_eq!(got[o], want, "byte {o} of keys {:?}", b.keys);
            }
        }
    }

    /// With marks: every byte whose newest key is dirty and unmarked is written from
    /// it, a key's whole marked blocks are never written, and a byte whose newest key
    /// is marked at most from a key covering it (a version written in the same epoch).
    #[test]
    fn marked_blocks_stay_out_of_the_window() {
        use super::super::segs::{Use, MARK_BLOCK};
        // Segments of 1 MiB: room for every key's data in one.
        let mut geo = tiny::geometry(1);
        geo.seg_size = 1 << 20;
        geo.seg_data_size = geo.seg_size - 4096;
        let n = geo.n_segs as usize;
        let mut rng = Rng::new(11);
        let blk = MARK_BLOCK as u64;
        let mut b = WbBatch::default();
        for _ in 0..300 {
            let segs = Segs::new(
                vec![Use::Free; n],
                vec![0; n],
                vec![0; n],
                0,
                geo.seg_data_size,
            );
            let seg = segs.take_data(0).unwrap();
            let gen = segs.gen32(seg);
            b.keys.clear();
            let span = 16 * blk;
            let mut marked = Vec::new();
            for i in 0..1 + rng.below(16) as usize {
                // Whole blocks mostly, some 512 B pieces.
                let (off, len) = if rng.below(3) == 0 {
                    let o = rng.below(span / 512 - 1) * 512;
                    (o, 512 * (1 + rng.below(3)))
                } else {
                    (rng.below(15) * blk, blk * (1 + rng.below(2)))
                };
                let k = KeyRec {
                    off,
                    len: len as u32,
                    seg,
                    seg_off: (i as u64 * 2 * blk) as u32,
                    gen: gen as u64,
                    ..Default::default()
                };
                let full = len % blk == 0 && rng.below(2) == 0;
                if full {
                    segs.mark_superseded(seg, k.seg_off, k.len, gen);
                }
                marked.push(full);
                b.keys.push(k);
            }
            b.build(&geo, Some(&segs), true);
            let got = written(&b, (span + blk) as usize);
            let at = |k: &KeyRec, o: u64| geo.data_off(seg, k.seg_off as u64 + (o - k.off));
            for (k, _) in b.keys.iter().zip(&marked).filter(|(_, &m)| m) {
                for blk_at in (k.off..k.off + k.len as u64).step_by(blk as usize) {
                    let p = at(k, blk_at);
                    assert!(
                        !b.items.iter().any(|it| matches!(it.kind,
                            WbKind::Data { pmem_off } if pmem_off <= p
                                && p + blk <= pmem_off + it.len as u64)),
                        "a whole marked block at {blk_at} written back"
                    );
                }
            }
            for (o, g) in got.iter().enumerate() {
                let o = o as u64;
                let covering: Vec<usize> = (0..b.keys.len())
                    .filter(|&i| (b.keys[i].off..b.keys[i].off + b.keys[i].len as u64).contains(&o))
                    .collect();
                let Some(&newest) = covering.last() else {
                    assert!(g.is_none(), "byte {o} has no key");
                    continue;
                };
                if !marked[newest] {
                    assert_eq!(*g, Some(at(&b.keys[newest], o)), "byte {o}");
                } else if let Some(g) = *g {
                    // Part of a marked block that a newer key of the window split
                    // (only whole blocks are skipped): a version of this epoch.
                    assert!(
                        covering.iter().any(|&i| at(&b.keys[i], o) == g),
                        "byte {o} written from a key not covering it"
                    );
                }
            }
        }
    }
}
