//! Garbage collection: reclaims written-back ksets from key_tail, and gives clean data
//! that was read since it was cached a second chance by moving it to the log head.
//!
//! GC walks from key_tail, never past dirty_tail, so every key it retires has its data
//! on the backing device behind a FLUSH. For each kset it persists the advanced key_tail
//! *first* and only then touches the keys' segment references, so a crash in between can
//! never resurrect keys into reused space.
//!
//! Retiring a key also settles its surviving pieces in the index at once (a piece is
//! an extent still naming the key's own data location: segment, generation and offset):
//! a cold piece is removed, so the index never maps data that is about to be reclaimed
//! and `cached_bytes` stays exact (and the doorkeeper remembers it, so it is promoted
//! on its next miss); a piece marked `F_REF` (read since cached; a rewrite keeps the
//! mark) is copied to GC's own allocation head and re-keyed as clean data in a newer
//! kset, as a fill would be, with the copy made outside the shard lock and the index
//! switched over only if the piece is still there (a write meanwhile wins). Relocation
//! is a FIFO with reinsertion (SIEVE/CLOCK-like) and a two-level read count, as
//! S3-FIFO's main queue keeps: a piece read twice since it was cached or last moved
//! (`F_REF2`) moves with `F_REF` still set, one read once starts unmarked, so it
//! survives the next round only if read again. (Zipf and mixed replays at a quarter of their footprint: +0.003 and
//! +0.006 read byte-hit; a third level gave nothing more.) Compaction's moves and
//! writeback's recycling are not a turn at the tail: their copies keep the count.
//! A kset whose live pieces are at most half of its bytes (most of it was superseded by
//! later writes) moves all of them, read or not: keeping them costs little and the
//! medium holds more of the working set (a log cleaner's cheap case; a stream's ksets
//! are all live and never qualify, so a scan cannot flood the cache this way), as long
//! as reads are at least an eighth of recent requests: a write-only workload would
//! never collect on the copies. To guarantee progress, GC moves at most half the bytes
//! it retires, and only while free segments remain above the log reserve's margin.

use super::format::{
    self, KeyRec, KsetCheck, KEY_CLEAN, KEY_SIZE, KEY_UNSYNCED, KSET_HDR, SUBTREE_SIZE,
};
use super::index::{Extent, F_CRC, F_DIRTY, F_REF, F_REF2};
use super::io::Channel;
use super::open::read_kset;
use super::sync::lock;
use super::writeback::GcResult;
use super::{CacheMode, Engine, Pmem};
use std::sync::atomic::Ordering::{Acquire, Relaxed};

/// Free segments beyond the log reserve that compaction's moves leave. GC's second
/// chances at the log's tail leave none: writers leave it `Segs::writer_keep`, since
/// read-hot data comes to the tail exactly when writers have taken the rest (the mixed
/// trace at a quarter of its footprint: 380 of 1,400 MiB of read data GC judged hot
/// was dropped for want of room; read byte-hit 0.507-0.513 -> 0.521-0.526). A
/// compaction move, which may move unread data, still leaves one.
const RELOCATE_MARGIN: u32 = 1;

/// GC's own state, kept across calls so GC allocates nothing once warm.
pub(super) struct GcState {
    /// GC's channel: the allocation head and kset slot relocated data goes to.
    pub(super) ch: Channel,
    /// Pieces of the key being retired that are to be moved: (backing offset, extent).
    hot: Vec<(u64, Extent)>,
    /// A piece's data on its way to its new place.
    pub(super) copy: Vec<u8>,
    /// The keys of the kset being retired, decoded once.
    keys: Vec<KeyRec>,
    /// Read and write requests counted at the last call, and their decayed sums since
    /// (`reads_matter`).
    seen: (u64, u64),
    recent: (u64, u64),
    /// Compaction's state (see `compact`).
    pub(super) compact: super::compact::CompactState,
}

/// Cold relocation pays off only where reads come: it needs read requests at least
/// 1/`READ_SHARE` of write requests lately.
const READ_SHARE: u64 = 8;

/// The read-hit count (`F_REF`, `F_REF2`) a copy of piece `x` starts with: the same
/// where it moves without GC judging it (compaction, recycling), one level less where
/// GC gives it its second chance at the log's tail.
pub(super) fn refs_kept(x: &Extent, judged: bool) -> u8 {
    let (r1, r2) = (x.is(F_REF), x.is(F_REF2));
    match judged {
        false => (if r1 { F_REF } else { 0 }) | (if r2 { F_REF2 } else { 0 }),
        true if r2 => F_REF,
        true => 0,
    }
}

impl Default for GcState {
    /// GC's state, its channel marked as the one that may use the segments writers
    /// leave (`Segs::writer_keep`).
    fn default() -> GcState {
        let mut ch = Channel::default();
        ch.background = true;
        GcState {
            ch,
            hot: Vec::new(),
            copy: Vec::new(),
            keys: Vec::new(),
            seen: (0, 0),
            recent: (0, 0),
            compact: Default::default(),
        }
    }
}

impl GcState {
    /// GC's channel (its allocation head holds segment references).
    pub(super) fn channel(&self) -> &Channel {
        &self.ch
    }
}

impl<P: Pmem> Engine<P> {
    /// Reclaims written-back ksets from key_tail while GC is wanted.
    ///
    /// `scratch` is the caller's reusable buffer for reading ksets: it only ever grows
    /// (to one kset's maximum size), so a caller that keeps it across calls makes GC
    /// allocation-free once warm. Its contents are overwritten; its length never shrinks.
    pub fn gc(&self, scratch: &mut Vec<u8>) -> GcResult {
        let mut r = GcResult::default();
        if lock(&self.errors).gc.is_some() {
            return r;
        }
        let need = self.geo.kset_max_size();
        if scratch.len() < need {
            scratch.resize(need, 0);
        }
        let buf = &mut scratch[..need];
        let mut st = lock(&self.gc_state);
        let st = &mut *st;
        let reads_matter = self.reads_matter(st);
        // Bytes GC may still move in this call: half of what it retired.
        let mut budget = 0u64;
        // Once started, a round frees down to `gc_low_segs`, a little under the watermark:
        // stopping right at it freed one segment per poll, and writers paced at the
        // watermark got one segment (1 MiB on a 128 MiB cache) per 1 ms poll.
        let low = self.gc_low_segs();
        // GC's own head is sealed when it moves on, as a channel's is.
        self.seal_left(&mut st.ch);
        r.segments_freed += self.release_held(&mut st.compact);
        let started = self.gc_wanted();
        if started {
            // Mostly superseded segments go first: what the log's tail would free next
            // may be live data still being read.
            let want = (self.segs.used() as u64).saturating_sub(low);
            r.segments_freed += self.compact(st, buf, want, reads_matter);
        } else {
            self.compact_wants_wb.store(false, Relaxed);
        }
        while started && (self.gc_wanted() || self.segs.used() as u64 >= low) {
            let mut t = lock(&self.tails);
            let pos = t.key;
            if pos == t.dirty {
                break;
            }
            let hdr = match read_kset(&self.pmem, &self.geo, pos, buf) {
                Ok(KsetCheck::Valid(h)) => h,
                other => {
                    let why = match other {
                        Err(e) => e.to_string(),
                        _ => "unreadable".into(),
                    };
                    lock(&self.errors).gc = Some(format!(
                        "kset {} at {}:{} (key_tail): {why}",
                        pos.seq, pos.seg, pos.off
                    ));
                    break;
                }
            };
            r.ksets += 1;
            self.counters.gc_ksets.inc();
            if hdr.is_last() {
                t.key = pos.after(&hdr);
                self.persist_key_tail(&mut t);
                self.key_tail_moved(t.key.seq);
                drop(t);
                self.segs.free_log(pos.seg);
                r.segments_freed += 1;
                continue;
            }
            t.key = pos.after(&hdr);
            self.persist_key_tail(&mut t);
            self.key_tail_moved(t.key.seq);
            drop(t);
            // Half of what the kset retires may move (counted up front, so the kset's
            // first keys can move too). A kset whose live data is within that half
            // moves all of it, read or not: a log cleaner's cheap case.
            let (mut retired, mut live) = (0u64, 0u64);
            let mut keys = std::mem::take(&mut st.keys);
            keys.clear();
            for i in 0..hdr.count as usize {
                let o = KSET_HDR + i * KEY_SIZE;
                // The kset was valid when written back; a decode failure now means the
                // medium changed under us. Its references are then leaked, not misused.
                if let Ok(k) = KeyRec::decode(&buf[o..o + KEY_SIZE], &self.geo) {
                    if k.has_data() {
                        retired += k.len as u64;
                        if reads_matter
                            && !self
                                .segs
                                .all_superseded(k.seg, k.seg_off, k.len, k.gen as u32)
                        {
                            live += self.live_bytes(&k);
                        }
                    }
                    keys.push(k);
                }
            }
            budget += retired / 2;
            let cold_too = reads_matter && live * 2 <= retired;
            // References are dropped per run of keys in one segment (a kset's keys
            // mostly come from one allocation head): one atomic update a run, not a key.
            let mut run = (0u32, 0u32);
            for k in &keys {
                // A key the replay at open dropped holds no reference either.
                if !k.has_data()
                    || self.segs.gens[k.seg as usize].load(Acquire) != k.gen
                    || !self.replay_kept(k, pos.seq)
                {
                    continue;
                }
                // An unsynced copy no completed backing FLUSH covers yet is not moved
                // (its move would be a synced key): it is dropped like cold data.
                let synced =
                    k.flags & KEY_UNSYNCED == 0 || self.flushed_through.load(Acquire) >= pos.seq;
                // Superseded in full, the key has nothing in the index: no lookup.
                if !self
                    .segs
                    .all_superseded(k.seg, k.seg_off, k.len, k.gen as u32)
                {
                    // What retire_key does may depend on free space (relocation keeps
                    // a margin): the references of the keys before it go first, as
                    // one by one.
                    self.put_run(&mut run, &mut r);
                    self.retire_key(st, k, synced, cold_too, true, &mut budget);
                }
                if run.0 != k.seg {
                    self.put_run(&mut run, &mut r);
                }
                run = (k.seg, run.1 + 1);
            }
            self.put_run(&mut run, &mut r);
            st.keys = keys;
        }
        r
    }

    /// Drops the references of `run`, `(segment, count)`, and empties it; counts the
    /// segment when that freed it.
    fn put_run(&self, run: &mut (u32, u32), r: &mut GcResult) {
        let (seg, n) = std::mem::take(run);
        if self.segs.put_n(&self.pmem, &self.geo, seg, n) {
            r.segments_freed += 1;
            self.counters.segs_reclaimed.inc();
        }
    }

    /// One compaction pass (see `compact`): moves or drops the live clean pieces of the
    /// segments it chose, as GC retires a mostly superseded kset's, and reclaims them.
    /// Returns the segments freed at once (held ones count when `release_held` frees
    /// them).
    fn compact(&self, st: &mut GcState, buf: &mut [u8], want: u64, reads_matter: bool) -> u32 {
        if !self.compact_select(&mut st.compact, buf, want, reads_matter) {
            return 0;
        }
        let mut freed = 0;
        for i in 0..st.compact.order.len() {
            let seg = st.compact.order[i];
            let gen = self.segs.gens[seg as usize].load(Acquire);
            let mut budget = st.compact.live[seg as usize];
            for j in Self::compact_pieces(&st.compact, seg) {
                let (at, x) = Self::compact_piece(&st.compact, j);
                let k = KeyRec {
                    off: at,
                    len: x.len,
                    flags: KEY_CLEAN,
                    seg,
                    seg_off: x.seg_off,
                    gen,
                    data_crc: 0,
                };
                self.retire_key(st, &k, reads_matter, true, false, &mut budget);
            }
            freed += self.hold_compacted(&mut st.compact, seg) as u32;
        }
        freed
    }

    /// Whether reads have been a real share of the requests lately (decayed by half
    /// every call). Moving unread data is an investment in hits that a write-only
    /// workload never collects: there it would only double the medium's copy traffic
    /// (a 4 KiB random overwrite, all in cache, relocated 27% of what it wrote).
    fn reads_matter(&self, st: &mut GcState) -> bool {
        let now = (self.slot_sum(|c| &c.reads), self.slot_sum(|c| &c.writes));
        let (dr, dw) = (
            now.0.saturating_sub(st.seen.0),
            now.1.saturating_sub(st.seen.1),
        );
        st.seen = now;
        st.recent = (st.recent.0 / 2 + dr, st.recent.1 / 2 + dw);
        Self::reads_mattered(st)
    }

    /// What `reads_matter` found at GC's last call, without counting anew.
    pub(super) fn reads_mattered(st: &GcState) -> bool {
        st.recent.0 * READ_SHARE >= st.recent.1
    }

    /// Bytes of key `k`'s data the index still maps (its surviving pieces).
    pub(super) fn live_bytes(&self, k: &KeyRec) -> u64 {
        let end = k.off + k.len as u64;
        let (mut o, mut live) = (k.off, 0);
        while o < end {
            let n = (end - o).min(SUBTREE_SIZE - o % SUBTREE_SIZE);
            let s = (o % SUBTREE_SIZE) as u32;
            let seg_off_s = k.seg_off + (o - k.off) as u32;
            let sh = self.shard(self.shard_of(o));
            live += sh.live_matching(s, s + n as u32, k.seg, k.gen as u32, seg_off_s);
            o += n;
        }
        live
    }

    /// Settles the index pieces of key `k` (retired, its segment reference still held):
    /// cold ones are removed, referenced clean ones within `budget` are moved, and with
    /// `cold_too` (its kset is mostly superseded) unreferenced clean ones as well.
    /// `judged`: the move is the piece's second chance at the log's tail, which spends
    /// one of its read-hit counts (`refs_kept`); compaction's moves keep them.
    fn retire_key(
        &self,
        st: &mut GcState,
        k: &KeyRec,
        synced: bool,
        cold_too: bool,
        judged: bool,
        budget: &mut u64,
    ) {
        let relocate = synced
            && self.mode() != CacheMode::PassThrough
            && self.segs.free() > self.segs.reserve + if judged { 0 } else { RELOCATE_MARGIN };
        let end = k.off + k.len as u64;
        let mut o = k.off;
        while o < end {
            let n = (end - o).min(SUBTREE_SIZE - o % SUBTREE_SIZE);
            let s = (o % SUBTREE_SIZE) as u32;
            let base = o - s as u64;
            let seg_off_s = k.seg_off + (o - k.off) as u32;
            st.hot.clear();
            {
                let mut sh = self.shard(self.shard_of(o));
                sh.retire_matching(s, s + n as u32, k.seg, k.gen as u32, seg_off_s, |ks, x| {
                    let hot = relocate
                        && (cold_too || x.is(F_REF))
                        && !x.is(F_DIRTY)
                        && *budget >= x.len as u64
                        // A trimmed piece's CRC covers bytes it no longer has: not
                        // verifiable here, so it is not moved.
                        && !(x.is(F_CRC) && (x.crc_front() != 0 || x.crc_back() != 0));
                    if !hot {
                        // Read again soon, it is cached on its first miss.
                        self.door.evicted(base + ks as u64);
                        return None;
                    }
                    *budget -= x.len as u64;
                    st.hot.push((base + ks as u64, *x));
                    Some(*x)
                });
            }
            for i in 0..st.hot.len() {
                let (at, x) = st.hot[i];
                self.relocate(st, k, at, &x, refs_kept(&x, judged));
            }
            o += n;
        }
    }

    /// Writes a piece's copy `src` at its new place `a`, persistent before any key names
    /// it (GC's moves and writeback's recycling).
    pub(super) fn put_copy(&self, a: &super::io::Alloc, src: &[u8]) {
        let dst = self.geo.data_off(a.seg, a.off);
        self.pmem.write(dst, src);
        self.pmem.flush_data(dst, a.len);
        self.pmem.fence();
    }

    /// Moves piece `x` at backing offset `at` (of key `k`) to GC's head, if it is still
    /// mapped when the copy is done; otherwise drops it. The copy starts with read-hit
    /// flags `refs`.
    fn relocate(&self, st: &mut GcState, k: &KeyRec, at: u64, x: &Extent, refs: u8) {
        let len = x.len as usize;
        st.copy.resize(len, 0);
        self.pmem.read(
            self.geo.data_off(x.seg, x.seg_off as u64),
            &mut st.copy[..len],
        );
        let intact = !self.data_crc || !x.is(F_CRC) || format::crc(&st.copy[..len]) == x.crc;
        let s0 = (at % SUBTREE_SIZE) as u32;
        let mut done = 0usize;
        while done < len {
            let a = match intact {
                true => self.alloc_keyed(&mut st.ch, (len - done) as u64).ok(),
                false => None,
            };
            let Some(a) = a else {
                // No room (or bad data): the rest of the piece is dropped instead.
                let mut sh = self.shard(self.shard_of(at));
                let s = s0 + done as u32;
                let so = x.seg_off + done as u32;
                sh.retire_matching(s, s0 + len as u32, k.seg, k.gen as u32, so, |_, _| None);
                return;
            };
            let src = &st.copy[done..done + a.len as usize];
            self.put_copy(&a, src);
            let id = self.slot_id(&mut st.ch);
            let o = at + done as u64;
            let s = s0 + done as u32;
            let mut referenced = false;
            {
                let mut sh = self.shard(self.shard_of(o));
                let mut kb = self.kset_for(o, a.len, id).ok();
                let so = x.seg_off + done as u32;
                let e = s + a.len as u32;
                // As `fill_chunk`: what is left of the piece (a write may have cut it
                // meanwhile) is keyed fragment by fragment, each taking a reference.
                sh.retire_matching(s, e, k.seg, k.gen as u32, so, |fs, frag| {
                    let kb = kb.as_mut()?;
                    if kb.kb.count >= self.geo.kset_keys {
                        self.close_kset(kb).ok()?;
                    }
                    let d = (fs - s) as usize;
                    let bytes = &src[d..d + frag.len as usize];
                    let nk = KeyRec {
                        off: at - s0 as u64 + fs as u64,
                        len: frag.len,
                        flags: KEY_CLEAN,
                        seg: a.seg,
                        seg_off: a.off as u32 + d as u32,
                        gen: a.gen,
                        data_crc: if self.data_crc { format::crc(bytes) } else { 0 },
                    };
                    if referenced {
                        self.segs.get(a.seg);
                    }
                    referenced = true;
                    kb.push(&nk, false);
                    self.counters.relocated_bytes.add(frag.len as u64);
                    let crc = if self.data_crc { F_CRC } else { 0 };
                    Some(Extent::of_key(&nk, crc | refs))
                });
            }
            if !referenced {
                self.segs.put(&self.pmem, &self.geo, a.seg);
            }
            done += a.len as usize;
        }
    }
}
