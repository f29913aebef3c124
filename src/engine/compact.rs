//! Compaction: reclaims data segments out of log order when what they hold is mostly
//! superseded, so the medium holds live data instead of dead copies waiting for their
//! kset to reach key_tail.
//!
//! GC frees space in log order, so data that later writes superseded keeps its segment
//! until the segment's last key is retired: on a workload that overwrites its hot set
//! the medium held only 35-72% live data. Compaction runs inside GC when GC is wanted
//! (at most every few calls: a pass walks the whole index and the dirty part of the
//! log) and takes segments whose live data is at most `LIVE_PCT` percent of their
//! size, fewest live bytes first, up to `PASS_SEGS` of them (more when GC wants more):
//!
//! 1. The index walk sums, per segment, the bytes extents of its current generation
//!    map. A segment qualifies only if it is *sealed* (no allocation head is in it and
//!    every allocation from it is in the index, `Segs::seal`), so no new extent can
//!    point into it, and holds no KEY_UNSYNCED data (replay drops such keys rather
//!    than letting them hide older ones, so they cannot go stale safely).
//! 2. Dirty data cannot move: writeback must find it in log order. When mostly
//!    superseded segments wait only for writeback to pass their live dirty data, and
//!    reads are a real share of the requests (hits are what compaction buys), writeback
//!    is asked to run (`compact_wants_wb`), in log order as always, while a pass finds
//!    fewer than `PASS_SEGS` segments it can take. (Asking only while a pass could not
//!    give GC what it wanted left dirty data at half the watermark over 60-100 of the
//!    zipf trace's 120 segments: read byte-hit 0.810. Asking whenever any candidate
//!    waits reached 0.825, but wrote back 2.1x the bytes, and the disk time it took
//!    cost the replay a quarter of its speed and raised the read p99.9 from 2.4 to
//!    3.6 ms. This rule: 0.818 at the old speed, 3 rounds each.)
//! 3. The log scan reads every kset from dirty_tail to the head. A dirty key naming a
//!    segment disqualifies it unless all its data is marked superseded by a newer key
//!    of the same epoch, in a kset whose epoch is known and recent enough for those
//!    marks to be exact (as writeback requires before skipping by them). A dirty key not yet in the log at the scan is
//!    either still live (the walk saw it) or was replaced within its epoch or in its
//!    own kset: a FLUSH closes every kset, and a writer to a region whose key waits in
//!    another channel's kset closes that first.
//! 4. The live clean pieces are moved to GC's head as GC moves read-hot data (while
//!    reads matter and space allows; otherwise dropped, clean data being on the backing
//!    device), and the segment is *held* (`Segs::hold`): its generation is bumped and
//!    persisted, so its remaining keys are stale everywhere (GC skips their references,
//!    writeback leaves them out, and replay treats them as tombstones, so no older key
//!    of their ranges shows through). It returns to the free list at once, or, while a
//!    writeback window built before the bump is in flight (it may have emitted
//!    superseded blocks: its epoch was not known exactly when built), once dirty_tail
//!    passes that window's end.

use super::format::{KeyRec, KsetCheck, LogPos, KEY_CLEAN, KEY_SIZE, KSET_HDR, SUBTREE_SIZE};
use super::index::{Extent, EPOCH_BITS, F_DIRTY};
use super::open::read_kset;
use super::segs::Use;
use super::sync::lock;
use super::{Engine, Pmem};
use std::sync::atomic::Ordering::{Acquire, Relaxed};

/// A segment is compacted when its live data is at most `LIVE_PCT` percent of its size.
const LIVE_PCT: u64 = 75;
/// Segments one pass reclaims even beyond what GC wants now: each one reclaimed here is
/// one the log's tail need not evict, and a pass costs a whole index walk.
const PASS_SEGS: usize = 16;
/// Most live bytes one pass moves (beyond its first segment): a pass runs inside one GC
/// call, which on SPDK runs on a reactor's thread. (Unbounded, 16 segments of a 1 GiB
/// medium's 8 MiB moved up to 96 MiB in one call: the SPDK overload tier's zipf jobs
/// stalled for up to 0.5 s and ran at a third of their speed.)
const PASS_BYTES: u64 = 8 << 20;
/// A pass walks the whole index (about 10 ns per extent), so the next one waits until
/// reclaim (of either kind) has freed 1/`PASS_EVERY` of the medium (and at least 4
/// segments) since: the walk then costs a few percent of what writing that much took.
/// (With passes bounded by `PASS_BYTES`, every eighth left the zipf trace's medium 59%
/// live and its read byte-hit at 0.813; every sixteenth: 78% and 0.824.)
const PASS_EVERY: u64 = 16;

/// Compaction's state, kept in GC's so passes allocate nothing once warm.
#[derive(Default)]
pub(super) struct CompactState {
    /// Per segment, this pass: bytes the index maps into it, whether it may go, and
    /// whether dirty data keeps it (a live dirty piece, or a dirty key in the log).
    pub(super) live: Vec<u64>,
    ok: Vec<bool>,
    dirty: Vec<bool>,
    uses: Vec<Use>,
    /// Data pieces of qualifying segments: (segment, backing offset, extent).
    pieces: Vec<(u32, u64, Extent)>,
    /// Candidates, fewest live bytes first.
    pub(super) order: Vec<u32>,
    /// Held segments and the log sequence dirty_tail must reach before their reuse.
    held: Vec<(u32, u64)>,
    /// (kset sequence, write epoch) of the ksets past dirty_tail, copied for a scan.
    epochs: Vec<(u64, u64)>,
    /// Segments reclaimed (by GC or compaction) when the last pass ran.
    last: u64,
}

impl<P: Pmem> Engine<P> {
    /// Returns held segments that writeback has passed to the free list; the number.
    pub(super) fn release_held(&self, c: &mut CompactState) -> u32 {
        if c.held.is_empty() {
            return 0;
        }
        let dirty = lock(&self.tails).dirty.seq;
        let mut n = 0;
        c.held.retain(|&(seg, seq)| {
            let keep = seq > dirty;
            if !keep {
                self.segs.release(seg);
                n += 1;
            }
            keep
        });
        n
    }

    /// Chooses the segments one compaction pass reclaims, if a pass is due: their
    /// numbers in `c.order` (fewest live bytes first), their live clean pieces in
    /// `c.pieces` (sorted by segment). False when nothing is to be reclaimed. `buf` is
    /// GC's kset buffer; `want` the segments GC wants; `reads_matter` whether moving
    /// live clean data (and writing dirty data back early) buys hits. GC then moves or
    /// drops each segment's pieces and calls `hold_compacted`.
    pub(super) fn compact_select(
        &self,
        c: &mut CompactState,
        buf: &mut [u8],
        want: u64,
        reads_matter: bool,
    ) -> bool {
        let reclaimed = self.counters.segs_reclaimed.get() + self.counters.segs_compacted.get();
        let every = (self.geo.n_segs as u64 / PASS_EVERY).max(4);
        if !reads_matter || reclaimed < c.last + every {
            if !reads_matter {
                self.compact_wants_wb.store(false, Relaxed);
            }
            return false;
        }
        c.last = reclaimed;
        c.order.clear();
        if self.walk_index(c) && self.scan_dirty(c, buf) {
            c.order.extend(
                (0..c.ok.len() as u32).filter(|&s| c.ok[s as usize] && !c.dirty[s as usize]),
            );
            let found = c.order.len();
            let live = &c.live;
            c.order.sort_unstable_by_key(|&s| live[s as usize]);
            c.order.truncate((want as usize).max(PASS_SEGS));
            // At most PASS_BYTES of live data per pass (at least one segment): the
            // moves run inside one GC call, on an SPDK reactor's thread.
            let mut bytes = 0;
            let keep = c
                .order
                .iter()
                .take_while(|&&s| {
                    bytes += live[s as usize];
                    bytes <= PASS_BYTES
                })
                .count();
            c.order.truncate(keep.max(1));
            c.pieces.sort_unstable_by_key(|p| p.0);
            // Segments that wait only for writeback: ask for it (see the module
            // documentation, step 2).
            let waiting = (0..c.ok.len()).any(|s| c.ok[s] && c.dirty[s]);
            self.compact_wants_wb
                .store(waiting && found < PASS_SEGS, Relaxed);
        }
        !c.order.is_empty()
    }

    /// Where in `c.pieces` the live clean pieces of segment `seg` (chosen by
    /// `compact_select`) are: read them with `compact_piece`.
    pub(super) fn compact_pieces(c: &CompactState, seg: u32) -> std::ops::Range<usize> {
        c.pieces.partition_point(|p| p.0 < seg)..c.pieces.partition_point(|p| p.0 <= seg)
    }

    /// Piece `i` of `c.pieces`: (backing offset, extent).
    pub(super) fn compact_piece(c: &CompactState, i: usize) -> (u64, Extent) {
        (c.pieces[i].1, c.pieces[i].2)
    }

    /// Step 1: live bytes and qualifying segments. False when none qualifies.
    fn walk_index(&self, c: &mut CompactState) -> bool {
        let n = self.geo.n_segs as usize;
        for v in [&mut c.ok, &mut c.dirty] {
            v.clear();
            v.resize(n, false);
        }
        c.live.clear();
        c.live.resize(n, 0);
        c.pieces.clear();
        self.segs.uses_into(&mut c.uses);
        for s in 0..n {
            c.ok[s] = c.uses[s] == Use::Data
                && self.segs.is_sealed(s as u32)
                && !self.segs.has_unsynced(s as u32);
        }
        // Then an empty shard can be passed without its lock: an extent inserted since
        // its count was published points into a segment not sealed when we looked.
        self.settle_all();
        for si in 0..self.shards.len() {
            if self.shard_is_empty(si) {
                continue;
            }
            let sh = self.shard(si);
            let base = si as u64 * SUBTREE_SIZE;
            for (ks, x) in sh.iter() {
                let seg = x.seg as usize;
                if !x.has_data() || self.segs.gen32(x.seg) != x.gen {
                    continue;
                }
                c.live[seg] += x.len as u64;
                if !c.ok[seg] {
                    continue;
                }
                if x.is(F_DIRTY) {
                    c.dirty[seg] = true;
                } else {
                    c.pieces.push((x.seg, base + ks as u64, *x));
                }
            }
        }
        let max_live = self.geo.seg_data_size * LIVE_PCT / 100;
        let mut any = false;
        for s in 0..n {
            c.ok[s] &= c.live[s] <= max_live;
            any |= c.ok[s];
        }
        any
    }

    /// Step 3: marks the qualifying segments that a dirty key in the log still needs.
    /// False when the log could not be read (no pass then).
    fn scan_dirty(&self, c: &mut CompactState, buf: &mut [u8]) -> bool {
        let (end, now) = {
            let h = lock(&self.head);
            c.epochs.clear();
            c.epochs.extend(h.epochs.iter().copied());
            (h.pos, self.epoch.load(Acquire))
        };
        let mut pos: LogPos = lock(&self.tails).dirty;
        while pos != end {
            let Ok(KsetCheck::Valid(hdr)) = read_kset(&self.pmem, &self.geo, pos, buf) else {
                return false; // GC or writeback will report it
            };
            if !hdr.is_last() {
                let i = c.epochs.partition_point(|&(s, _)| s < pos.seq);
                let exact = c
                    .epochs
                    .get(i)
                    .is_some_and(|&(s, e)| s == pos.seq && now.saturating_sub(e) < 1 << EPOCH_BITS);
                for i in 0..hdr.count as usize {
                    let o = KSET_HDR + i * KEY_SIZE;
                    let Ok(k) = KeyRec::decode(&buf[o..o + KEY_SIZE], &self.geo) else {
                        return false;
                    };
                    let seg = k.seg as usize;
                    if !k.has_data() || k.flags & KEY_CLEAN != 0 || !c.ok[seg] || c.dirty[seg] {
                        continue;
                    }
                    if self.segs.gens[seg].load(Acquire) != k.gen {
                        continue; // stale already: its segment was reclaimed
                    }
                    c.dirty[seg] |= !(exact
                        && self
                            .segs
                            .all_superseded(k.seg, k.seg_off, k.len, k.gen as u32));
                }
            }
            pos = pos.after(&hdr);
        }
        true
    }

    /// Step 4, after GC moved or dropped its pieces: reclaims segment `seg`. True when it
    /// is free at once (else `release_held` frees it later).
    pub(super) fn hold_compacted(&self, c: &mut CompactState, seg: u32) -> bool {
        self.segs.hold(&self.pmem, &self.geo, seg);
        // A window built from now on sees the new generation; one built before may
        // still read the segment until dirty_tail passes its end.
        self.counters.segs_compacted.inc();
        let t = lock(&self.tails);
        let later = t.wb_end > t.dirty.seq;
        if later {
            c.held.push((seg, t.wb_end));
        } else {
            self.segs.release(seg);
        }
        !later
    }
}
