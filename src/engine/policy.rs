//! Cache policy: the cache mode and the sequential cutoff, and the routing of requests
//! that do not go through the write-back path (bcache's and OCF's modes).
//!
//! A write is routed either through the cache (today's write-back path) or *direct*:
//! the caller writes it to the backing device between `begin_direct` and `end_direct`.
//! `begin_direct` covers the range with a placeholder under the shard lock, so reads
//! during the backing write go to the backing device and fill nothing, and the clean
//! data it replaced is invalidated (with a tombstone key, persistent before it
//! returns); `end_direct` then either caches the data as clean (write-through) or drops
//! the placeholder (write-around, passthrough, cutoff). Invariant: a direct write never
//! starts over dirty data whose key is past dirty_tail, because writeback would later
//! put that older data over the newer backing data; such a request is routed through
//! the cache instead (`begin_direct` returns None). Writeback clears the dirty flag of
//! the extents it wrote back (`mark_written_back`), so once the log is drained direct
//! writes are possible everywhere.
//!
//! A write-through is cached once its backing write completed, with no backing FLUSH:
//! its key is KEY_UNSYNCED, and so is a miss fill that may have read a direct write not
//! yet flushed (`fills_allowed`). Direct writes are made durable by the caller's
//! backing FLUSH (`direct_flush_needed`, `direct_mark`, `direct_flushed`), which also
//! persists the flush record: the newest kset closed before a completed backing FLUSH
//! was issued. Replay keeps an unsynced key only in a kset the record covers, so after
//! a power loss no block reads newer data from pmem and later, once evicted, older data
//! from the backing device (the write it showed was lost from the backing device's
//! volatile cache).

use super::format::{
    FlushRec, KeyRec, KEY_CLEAN, KEY_INVALID, KEY_UNSYNCED, KEY_ZERO, SUBTREE_SIZE,
};
use super::index::{Extent, F_DIRTY, F_EMPTY};
use super::io::Channel;
pub use super::modes::{
    CacheMode, Policy, Promotion, SeqPolicy, SEQ_CUTOFF_DEFAULT_KIB, SEQ_CUTOFF_MAX_KIB,
};
pub use super::streams::STREAMS;
use super::sync::lock;
use super::{Engine, IoError, OpenError, Pmem};
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};

/// The write bypass's bits in the packed policy code (`load_policy_codes`), and the
/// bit above them saying promotion is on the second miss.
const BYPASS_MASK: u64 = (1 << 23) - 1;
const PROMOTE_BIT: u32 = 63;

/// How many unflushed direct writes are remembered by range (`fills_allowed`).
const UNFLUSHED_RANGES: usize = 64;

/// The ranges of the latest direct writes: (start, end, completion number).
pub(super) struct Unflushed {
    ring: [(u64, u64, u64); UNFLUSHED_RANGES],
    /// Direct writes up to this number left the ring before a FLUSH covered them.
    lost: u64,
}

impl Default for Unflushed {
    fn default() -> Self {
        Unflushed {
            ring: [(0, 0, 0); UNFLUSHED_RANGES],
            lost: 0,
        }
    }
}

/// Where a write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Through the cache (write-back path): `Engine::write`.
    Cache,
    /// To the backing device: `begin_direct`, the backing write, `end_direct`.
    /// `through` caches the data as clean afterwards.
    Direct { through: bool },
}

/// What a backing FLUSH issued now covers (`Engine::direct_mark`): the direct writes
/// completed so far and the ksets closed so far. Pass it to `Engine::direct_flushed`
/// once that FLUSH completed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushMark {
    direct: u64,
    kset: u64,
}

impl FlushMark {
    /// The sequence number of the last kset closed when the mark was taken.
    pub fn kset(&self) -> u64 {
        self.kset
    }
}

/// A direct write in progress (from `begin_direct`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Direct {
    token: u32,
    pub through: bool,
}

impl<P: Pmem> Engine<P> {
    pub fn policy(&self) -> Policy {
        lock(&self.info).info.policy
    }

    /// Changes mode and cutoff, persisted. Switching to passthrough invalidates the
    /// clean cached data; dirty data is written back by the background writeback
    /// (`writeback_wanted` asks for it while the mode is not write-back).
    pub fn set_policy(&self, p: Policy) -> Result<(), OpenError> {
        p.validate().map_err(OpenError::Invalid)?;
        {
            let mut st = lock(&self.info);
            st.info.policy = p;
            let (slot, seq) = st.r.advance();
            self.pmem
                .persist(super::format::INFO_OFF[slot], &st.info.encode(seq));
        }
        // All the codes: the cutoff and the write bypass change online too.
        self.load_policy_codes(p);
        if p.mode == CacheMode::PassThrough {
            self.invalidate_clean();
        }
        Ok(())
    }

    /// The cache mode in effect (one atomic load).
    pub fn mode(&self) -> CacheMode {
        CacheMode::from_code(self.mode_code.load(Relaxed) as u8).unwrap_or_default()
    }

    /// Drops every clean extent from the index, as if evicted (their keys stay in the
    /// log until GC); later reads of those ranges go to the backing device.
    ///
    /// The dropped keys are still in the log, so until GC retires them direct writes
    /// log tombstones everywhere (`hidden_below`): the mark is set before anything is
    /// dropped, and narrowed to the log head once every kset that may hold a dropped
    /// key is closed.
    pub fn invalidate_clean(&self) {
        let _one = lock(&self.invalidating);
        self.hidden_below.store(super::HIDDEN_UNKNOWN, SeqCst);
        let mut clean = Vec::new();
        for si in 0..self.shards.len() {
            let mut sh = self.shard(si);
            clean.clear();
            clean.extend(
                sh.iter()
                    .filter(|(_, x)| !x.is(F_DIRTY) && !x.is(F_EMPTY))
                    .map(|(s, x)| (s, s + x.len)),
            );
            for &(s, e) in &clean {
                sh.punch(s, e);
            }
            self.counters.invalidations.add(clean.len() as u64);
        }
        drop(clean);
        // Keys still buffered in open ksets go to the log with sequence numbers past
        // the head: close them first (a full log leaves the mark unknown, which only
        // costs tombstones until the next open).
        self.pmem.drain();
        let mut closed = true;
        for (_, slot) in self.slots.used() {
            let mut g = super::KsetGuard {
                slot,
                kb: lock(&slot.kset),
            };
            closed &= self.close_kset(&mut g).is_ok();
        }
        if closed {
            let head = lock(&self.head).pos.seq;
            self.hidden_below.store(head, SeqCst);
        }
    }

    /// A clean extent left the index with no record in the log (it failed its CRC):
    /// direct writes log tombstones until the next open (see `hidden_below`).
    pub(super) fn hid_clean_key(&self) {
        self.hidden_below.store(super::HIDDEN_UNKNOWN, SeqCst);
    }

    /// GC moved key_tail to `key_seq`: once past the mark, no kset in the log holds a
    /// key the index dropped without a record.
    pub(super) fn key_tail_moved(&self, key_seq: u64) {
        let h = self.hidden_below.load(Acquire);
        if h != 0 && h != super::HIDDEN_UNKNOWN && key_seq >= h {
            let _ = self.hidden_below.compare_exchange(h, 0, AcqRel, Relaxed);
        }
    }

    /// Whether the sequential cutoff sends this request around the cache.
    fn cutoff(&self, ch: &mut Channel, off: u64, len: u64, write: bool) -> bool {
        let p = self.policy_cached();
        let stream = ch.streams.note(off, len, write);
        if p.seq_cutoff_kib == 0 || stream < (p.seq_cutoff_kib as u64) << 10 {
            return false;
        }
        self.cuts(p.seq_policy)
    }

    /// Whether the cutoff's policy cuts a stream past its threshold now.
    fn cuts(&self, policy: SeqPolicy) -> bool {
        match policy {
            SeqPolicy::Never => false,
            SeqPolicy::Always => true,
            // Full as admission and promotion see it: from where a GC round stops, so
            // in steady state every stream past the threshold bypasses. (At 95% of the
            // segments, the very top of GC's range, most of a stream went through the
            // cache and was paced there: the scan_hot trace wrote back 4.6 of its 6.5 GB
            // of stream writes, and its write p99 was 9.5 ms against the disk's 3.2.)
            SeqPolicy::Full => self.cache_full() || self.over.load(Relaxed),
        }
    }

    /// The policy without taking the info lock on every request.
    fn policy_cached(&self) -> Policy {
        let v = self.seq_code.load(Relaxed);
        Policy {
            mode: self.mode(),
            seq_cutoff_kib: (v >> 8) as u32,
            seq_policy: SeqPolicy::from_code(v as u8).unwrap_or_default(),
            write_bypass_kib: ((v >> 40) & BYPASS_MASK) as u32,
            promotion: if v >> PROMOTE_BIT != 0 {
                Promotion::SecondMiss
            } else {
                Promotion::Always
            },
        }
    }

    pub(super) fn load_policy_codes(&self, p: Policy) {
        self.mode_code.store(p.mode.code() as u32, Relaxed);
        // Bits 0..8 the cutoff's policy, 8..40 its threshold, 40..63 the write bypass's
        // (at most WRITE_BYPASS_MAX_KIB, 23 bits), 63 promotion on the second miss.
        let twice = (p.promotion == Promotion::SecondMiss) as u64;
        self.seq_code.store(
            (twice << PROMOTE_BIT)
                | ((p.write_bypass_kib as u64) << 40)
                | ((p.seq_cutoff_kib as u64) << 8)
                | p.seq_policy.code() as u64,
            Relaxed,
        );
    }

    /// Decides where a write of `len` bytes at `off` goes (and tracks its stream).
    pub fn route_write(&self, ch: &mut Channel, off: u64, len: u64) -> Route {
        let cut = self.cutoff(ch, off, len, true);
        match self.mode() {
            CacheMode::WriteBack if !cut && self.bypasses(len) => Route::Direct { through: false },
            CacheMode::WriteBack if !cut => Route::Cache,
            CacheMode::WriteThrough if !cut => Route::Direct { through: true },
            _ => Route::Direct { through: false },
        }
    }

    /// Routes again a write that `route_write` sent to the cache and that has waited
    /// since (paced, or the cache was full): it goes to the backing device after all
    /// when it ended a stream the cutoff now cuts, or is large enough to bypass a cache
    /// that is reclaiming now. The stream tracker is consulted, not fed (the write was
    /// counted when first routed). A write-back cache only: other modes route writes to
    /// the cache only when dirty data overlaps, which waiting does not change.
    pub fn reroute_write(&self, ch: &Channel, off: u64, len: u64) -> Route {
        let p = self.policy_cached();
        if p.mode != CacheMode::WriteBack {
            return Route::Cache;
        }
        let streamed = p.seq_cutoff_kib > 0
            && ch.streams.ending_at(off + len, true) >= (p.seq_cutoff_kib as u64) << 10;
        if (streamed && self.cuts(p.seq_policy)) || self.bypasses(len) {
            Route::Direct { through: false }
        } else {
            Route::Cache
        }
    }

    /// Whether a write-back write of `len` bytes goes around the cache as a large write
    /// (`Policy::write_bypass_kib`): only while the cache is reclaiming, so a cache with
    /// room still absorbs bursts. Coherent as every direct write: `begin_direct` sends
    /// it through the cache after all when dirty data overlaps it, and invalidates the
    /// clean data it covers.
    fn bypasses(&self, len: u64) -> bool {
        let kib = self.policy_cached().write_bypass_kib as u64;
        kib > 0 && len >= kib << 10 && self.gc_wanted()
    }

    /// Whether a read miss at `off`, read from the backing device, is to be cached now:
    /// always while the cache has room; once full, under `Promotion::SecondMiss`, only
    /// when the same block missed recently (the doorkeeper records this miss).
    pub(super) fn promote(&self, off: u64) -> bool {
        !self.over.load(Relaxed)
            || self.seq_code.load(Relaxed) >> PROMOTE_BIT == 0
            || self.door.second_miss(off)
    }

    /// Whether a read's misses should be cached (tracks the read's stream).
    pub(super) fn read_fills(&self, ch: &mut Channel, off: u64, len: u64) -> bool {
        let cut = self.cutoff(ch, off, len, false);
        !cut && self.mode() != CacheMode::PassThrough
    }

    /// Starts a direct write of `[off, off + len)`: invalidates the cached clean data
    /// there and covers it with a placeholder. None: dirty data overlaps, route the
    /// write through the cache (`write`) instead.
    ///
    /// Each region with clean data cached also gets a tombstone key, persistent before
    /// this returns, so a replay after a crash never brings back clean data the backing
    /// write made stale (the backing device may keep the write even when it was never
    /// flushed).
    pub fn begin_direct(
        &self,
        off: u64,
        len: u64,
        through: bool,
    ) -> Result<Option<Direct>, IoError> {
        self.check_range(off, len)?;
        super::sync::count::rmw();
        let token = self.next_token.fetch_add(1, Relaxed);
        let mut pos = 0u64;
        while pos < len {
            let o = off + pos;
            let n = (len - pos).min(SUBTREE_SIZE - o % SUBTREE_SIZE);
            let s = (o % SUBTREE_SIZE) as u32;
            let mut sh = self.shard(self.shard_of(o));
            let mut dirty = false;
            let mut cached = false;
            let segs = &self.segs;
            sh.walk(
                s,
                s + n as u32,
                |x| segs.gen32(x.seg) != x.gen,
                |_, x| {
                    dirty |= x.is(F_DIRTY);
                    cached |= !x.is(F_EMPTY);
                },
            );
            if dirty {
                drop(sh);
                // Withdraw the placeholders already placed in earlier regions.
                self.end_pieces(off, pos, token);
                return Ok(None);
            }
            // Read under the shard lock, after the walk: an `invalidate_clean` whose
            // removal the walk saw set the mark before it.
            if !cached && self.hidden_below.load(SeqCst) == 0 {
                // Nothing cached here, and the index is what replay rebuilds from the
                // log (a retired key leaves the log before its pieces leave the index;
                // keys replay dropped stay dropped; `hidden_below` covers the rest), so
                // no key in the log can bring older data back over this range after a
                // crash. A tombstone would only cost a kset of its own: one per write
                // of a sequential stream past the cutoff, each also ending a writeback
                // window. The placeholder alone keeps out fills that read the old data
                // until the write is over.
                sh.insert(s, Extent::without_data(n as u32, F_EMPTY, token));
                pos += n;
                continue;
            }
            let tomb = KeyRec {
                off: o,
                len: n as u32,
                flags: KEY_INVALID | KEY_CLEAN | KEY_ZERO,
                ..Default::default()
            };
            // No channel here: the common slot's kset (closed at once, below).
            let logged = match self.kset_for(o, n, super::slots::COMMON) {
                Ok(mut kb) => {
                    sh.insert(s, Extent::without_data(n as u32, F_EMPTY, token));
                    self.append(&mut kb, &tomb, true).is_ok()
                }
                Err(_) => false,
            };
            if !logged {
                // No room in the log: go through the cache, which waits for room.
                drop(sh);
                self.end_pieces(off, pos + n, token);
                return Ok(None);
            }
            self.counters.invalidations.inc();
            pos += n;
        }
        Ok(Some(Direct { token, through }))
    }

    fn end_pieces(&self, off: u64, len: u64, token: u32) {
        let mut pos = 0u64;
        while pos < len {
            let o = off + pos;
            let n = (len - pos).min(SUBTREE_SIZE - o % SUBTREE_SIZE);
            self.drop_placeholders(o, n, token);
            pos += n;
        }
    }

    /// Completes a direct write. `ok`: the backing device completed the write of `data`
    /// (no backing FLUSH needed). A write-through then caches it as clean where no newer
    /// write replaced the placeholder, with KEY_UNSYNCED keys (replay keeps them only
    /// once a backing FLUSH covers their kset); everything else just drops the
    /// placeholder, so later reads miss and fetch the new data.
    pub fn end_direct(&self, ch: &mut Channel, off: u64, data: &[u8], d: Direct, ok: bool) {
        let len = data.len() as u64;
        // Counted first: a FLUSH that sees it flushes the backing device, and a miss
        // that reads the range before that caches it as unsynced (`fills_allowed`).
        self.count_direct(off, len, d, ok);
        if !(ok && d.through) {
            self.end_pieces(off, len, d.token);
            return;
        }
        self.seal_left(ch);
        let mut done = 0u64;
        while done < len {
            let o = off + done;
            let rest = (len - done).min(SUBTREE_SIZE - o % SUBTREE_SIZE);
            let Ok(a) = self.alloc_keyed(ch, rest) else {
                self.end_pieces(o, len - done, d.token);
                break;
            };
            let src = &data[done as usize..(done + a.len) as usize];
            let at = self.geo.data_off(a.seg, a.off);
            self.pmem.write(at, src);
            self.pmem.flush(at, a.len);
            self.pmem.fence();
            let id = self.slot_id(ch);
            self.fill_chunk(id, o, &a, src, d.token, KEY_UNSYNCED);
            done += a.len;
        }
    }

    /// `end_direct` for a direct write that caches nothing (not a write-through, or
    /// it failed): only its length matters, so a runtime need not gather its data.
    pub fn end_direct_uncached(&self, off: u64, len: u64, d: Direct, ok: bool) {
        debug_assert!(
            !(ok && d.through),
            "a completed write-through caches its data"
        );
        // Noted before the placeholder goes: no read can fill the range in between.
        self.count_direct(off, len, d, ok);
        self.end_pieces(off, len, d.token);
    }

    fn count_direct(&self, off: u64, len: u64, d: Direct, ok: bool) {
        if ok {
            // No channel here: the common slot's counters.
            let c = self.slots.get(super::slots::COMMON);
            c.add(|c| &c.writes, 1);
            c.add(|c| &c.bytes_written, len);
            if !d.through {
                c.add(|c| &c.bypassed, 1);
                c.add(|c| &c.bypassed_bytes, len);
            }
            // Counted after the backing write: a FLUSH that sees it flushes the backing,
            // and until then a miss over it is cached as unsynced (`fills_allowed`).
            self.note_direct(off, len);
        }
    }

    /// Counts a completed direct write not yet covered by a backing FLUSH and remembers
    /// its range (`fills_allowed`). The only place `direct_done` grows.
    fn note_direct(&self, off: u64, len: u64) {
        let mut u = lock(&self.unflushed);
        let seq = self.direct_done.load(Acquire) + 1;
        let slot = &mut u.ring[seq as usize % UNFLUSHED_RANGES];
        let forgotten = slot.2;
        *slot = (off, off + len, seq);
        if forgotten > self.direct_flushed.load(Acquire) {
            u.lost = u.lost.max(forgotten);
        }
        self.direct_done.store(seq, Release);
    }

    /// Whether a write-zeroes or discard goes to the backing device (`begin_direct`
    /// with `through` false, the backing WRITE_ZEROES or discard, `end_direct_zeroes`)
    /// instead of becoming a dirty zero extent. Outside write-back nothing new may stay
    /// dirty, so only write-back keeps them; the sequential cutoff does not apply
    /// (they move no data through pmem).
    pub fn zeroes_direct(&self) -> bool {
        self.mode() != CacheMode::WriteBack
    }

    /// Completes a direct write-zeroes or discard of `[off, off + len)`: drops the
    /// placeholder, so later reads miss and read the zeroes from the backing device,
    /// and counts it. `ok`: the backing device did it.
    pub fn end_direct_zeroes(&self, off: u64, len: u64, d: Direct, ok: bool, discard: bool) {
        if ok {
            let c = &self.counters;
            if discard {
                c.discards.inc();
            } else {
                c.zeroes.inc();
            }
            let common = self.slots.get(super::slots::COMMON);
            common.add(|c| &c.bypassed, 1);
            common.add(|c| &c.bypassed_bytes, len);
            // As for a direct write: until a FLUSH covers it, no miss of it fills.
            self.note_direct(off, len);
        }
        self.end_pieces(off, len, d.token);
    }

    /// For a FLUSH: Some(mark) when a backing FLUSH is owed: direct writes completed
    /// since the backing device was last flushed for them, or a closed kset holds
    /// unsynced keys no completed backing FLUSH covers yet. The caller flushes the
    /// backing device, then calls `direct_flushed(mark)`.
    pub fn direct_flush_needed(&self) -> Option<FlushMark> {
        let n = self.direct_done.load(Acquire);
        let owed = self.direct_flushed.load(Acquire) < n
            || self.unsynced_seq.load(Acquire) > self.flushed_through.load(Acquire);
        owed.then(|| self.direct_mark())
    }

    /// After a backing FLUSH issued with `m` completed: the direct writes it counts are
    /// durable, and so are the backing writes behind the unsynced keys of every kset it
    /// counts. Persists the flush record when that covers a kset with unsynced keys the
    /// record did not (one small metadata update, at most once per backing FLUSH).
    pub fn direct_flushed(&self, m: FlushMark) {
        self.direct_flushed.fetch_max(m.direct, AcqRel);
        let through = self.flushed_through.load(Acquire);
        if m.kset <= through || self.unsynced_seq.load(Acquire) <= through {
            return;
        }
        let mut st = lock(&self.flush_rec);
        if m.kset <= st.rec.through {
            return;
        }
        st.rec.through = m.kset;
        let (slot, seq) = st.r.advance();
        self.pmem
            .persist(super::format::FLUSH_REC_OFF[slot], &st.rec.encode(seq));
        self.flushed_through.store(m.kset, Release);
    }

    /// The mark to pass to `direct_flushed` after a backing FLUSH issued now (taken
    /// before the FLUSH is issued; also for runtimes that flush the backing device for
    /// other reasons, e.g. writeback). Ksets still open are not counted: their keys
    /// wait for a later FLUSH.
    pub fn direct_mark(&self) -> FlushMark {
        FlushMark {
            direct: self.direct_done.load(Acquire),
            kset: self.closed_seq.load(Acquire),
        }
    }

    /// Unsynced keys the replay at open dropped: their ksets were not covered by a
    /// completed backing FLUSH (for tests and status).
    pub fn replay_unsynced_dropped(&self) -> u64 {
        self.replay_unsynced_dropped
    }

    /// Whether the replay at open kept key `k` of kset `seq` (it drops the unsynced
    /// keys no completed backing FLUSH covered; keys closed since are all live).
    pub(super) fn replay_kept(&self, k: &KeyRec, seq: u64) -> bool {
        k.flags & KEY_UNSYNCED == 0 || seq > self.replay_last || self.replay_rec.covers(seq)
    }

    /// The flush record as this engine will next persist it (for tests and `check`).
    pub fn flush_record(&self) -> FlushRec {
        lock(&self.flush_rec).rec
    }

    /// Whether a read miss of `[off, off + len)` may be cached as plainly clean. Not
    /// while a direct write over it is not yet flushed: the miss may have read it from
    /// the backing device's volatile cache, and a clean key over data the backing device
    /// can still lose would, after a power loss, show data the backing device no longer
    /// has; such a fill is cached KEY_UNSYNCED instead. The last UNFLUSHED_RANGES direct
    /// writes are known by range, so a stream bypassing the cache leaves the rest of the
    /// device's fills plain; when more went unflushed, every fill is unsynced until a
    /// FLUSH covers them.
    pub(super) fn fills_allowed(&self, off: u64, len: u64) -> bool {
        let flushed = self.direct_flushed.load(Acquire);
        if flushed >= self.direct_done.load(Acquire) {
            return true;
        }
        let u = lock(&self.unflushed);
        if u.lost > flushed {
            return false;
        }
        let end = off + len;
        !u.ring
            .iter()
            .any(|&(s, e, seq)| seq > flushed && s < end && off < e)
    }

    /// After a writeback batch is durable: its extents are no longer dirty (unless a
    /// newer write replaced them, which the segment position tells). In passthrough
    /// they are dropped instead: nothing stays cached.
    pub(super) fn mark_written_back(&self, items: &[super::WbItem]) {
        let drop_all = self.mode() == CacheMode::PassThrough;
        for it in items {
            let super::WbKind::Data { pmem_off } = it.kind else {
                continue;
            };
            let (seg, seg_off) = self.geo.locate(pmem_off);
            let mut pos = 0u64;
            let len = it.len as u64;
            while pos < len {
                let o = it.off + pos;
                let n = (len - pos).min(SUBTREE_SIZE - o % SUBTREE_SIZE);
                let s = (o % SUBTREE_SIZE) as u32;
                let want = seg_off + pos as u32;
                let mut sh = self.shard(self.shard_of(o));
                sh.clean_matching(s, s + n as u32, drop_all, |ks, x| {
                    x.has_data() && x.seg == seg && x.seg_off == want + (ks - s)
                });
                pos += n;
            }
        }
    }
}
