//! Segment bookkeeping: free list, reference counts and generations.
//!
//! A data segment's reference count is, for each channel whose allocation head sits in
//! it, 1 plus the head's spare references (taken at once when the head entered the
//! segment and handed to its keys one by one, so a write does no atomic add here), plus
//! 1 for each key pointing into it that lives in the log region
//! `[key_tail, key_head)` or waits in a kset buffer. When it drops to zero the segment is
//! reclaimed: its generation is bumped and persisted *before* the segment returns to the
//! free list, so any index extent still pointing at it reads as stale from then on. Log
//! segments are not counted; the log frees them explicitly when key_tail leaves them.
//! `reserve` segments are kept back from data allocation so the log can always grow
//! enough to close the ksets that writeback needs in order to make progress.
//!
//! Superseded marks (DRAM only, one byte per 4 KiB of data): `mark_superseded` records
//! that a block's dirty data was replaced by a newer key of the same write epoch that is
//! now in the log, so writeback may leave the block out (see `Engine::writeback_next`).
//! A mark carries the low bits of the segment generation it was set under and counts
//! only while the segment is still in that generation; a segment's marks are cleared
//! when it is taken for data again, so a mark never speaks for reused space.

use super::format::{decode_gen, encode_gen, pick_replica, Geometry, GEN_OFF, GEN_SIZE};
use super::pmem::Pmem;
use super::sync::lock;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::*};
use std::sync::Mutex;

/// What a segment is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Free,
    Data,
    Log,
    /// Reclaimed out of log order by compaction (its generation already bumped), held
    /// back from reuse until writeback has passed every kset that could still read it
    /// (see `compact`).
    Held,
}

pub struct Segs {
    pub refs: Box<[AtomicU32]>,
    pub gens: Box<[AtomicU64]>,
    alloc: Mutex<Alloc>,
    /// Set when an allocation failed; cleared by a reclaim.
    pub full: AtomicBool,
    /// Times the cache ran out of space after having had headroom: an episode starts
    /// when an allocation fails and ends only once reclaim has given back
    /// `headroom()` free segments, so a GC that frees clean segments one at a time
    /// while writeback is stuck (a failing base) counts as one episode, not one per
    /// freed segment.
    pub full_events: AtomicU64,
    /// Inside a full episode (see `full_events`); changed under the allocator lock.
    episode: AtomicBool,
    pub reserve: u32,
    /// Superseded marks, `blocks_per_seg` per segment (see the module comment).
    marks: Box<[AtomicU8]>,
    blocks_per_seg: usize,
    /// Per segment: 1 + the generation in which no allocation head is in it any more
    /// and every allocation made from it is in the index (stored by the channel that
    /// left it, at its next call: `Engine::seal_left`), 0 when not sealed. Holding the
    /// generation makes a late seal of a segment since reclaimed and taken again a
    /// no-op (it can only hide a real seal, never fake one).
    sealed: Box<[AtomicU64]>,
    /// Per segment: it holds KEY_UNSYNCED data (compaction leaves such a segment alone).
    unsynced: Box<[AtomicBool]>,
}

/// The granularity of superseded marks.
pub const MARK_BLOCK: u32 = 4096;

/// A mark's value for generation `gen`: never 0 (the cleared state).
fn mark_tag(gen: u32) -> u8 {
    0x80 | (gen & 0x7f) as u8
}

struct Alloc {
    free: VecDeque<u32>,
    uses: Vec<Use>,
}

impl Segs {
    /// Builds the table from per-segment uses and generations (after format or replay).
    pub fn new(
        uses: Vec<Use>,
        gens: Vec<u64>,
        refs: Vec<u32>,
        reserve: u32,
        seg_data_size: u64,
    ) -> Self {
        let free = (0..uses.len() as u32)
            .filter(|&i| uses[i as usize] == Use::Free)
            .collect();
        let blocks_per_seg = seg_data_size.div_ceil(MARK_BLOCK as u64) as usize;
        Segs {
            // Nothing allocates before the engine opens: every data segment is sealed.
            sealed: (uses.iter().zip(&gens))
                .map(|(u, g)| AtomicU64::new(if *u == Use::Data { g + 1 } else { 0 }))
                .collect(),
            unsynced: uses
                .iter()
                .map(|u| AtomicBool::new(*u == Use::Data))
                .collect(),
            marks: (0..uses.len() * blocks_per_seg)
                .map(|_| AtomicU8::new(0))
                .collect(),
            blocks_per_seg,
            refs: refs.into_iter().map(AtomicU32::new).collect(),
            gens: gens.into_iter().map(AtomicU64::new).collect(),
            alloc: Mutex::new(Alloc { free, uses }),
            full: AtomicBool::new(false),
            full_events: AtomicU64::new(0),
            episode: AtomicBool::new(false),
            reserve,
        }
    }

    pub fn n(&self) -> u32 {
        self.gens.len() as u32
    }

    /// Segments in use (data or log).
    pub fn used(&self) -> u32 {
        let a = lock(&self.alloc);
        self.n() - a.free.len() as u32
    }

    /// Free segments.
    pub fn free(&self) -> u32 {
        lock(&self.alloc).free.len() as u32
    }

    /// Copies every segment's use into `out` (one lock for all).
    pub fn uses_into(&self, out: &mut Vec<Use>) {
        let a = lock(&self.alloc);
        out.clear();
        out.extend_from_slice(&a.uses);
    }

    pub fn use_of(&self, seg: u32) -> Use {
        lock(&self.alloc).uses[seg as usize]
    }

    /// Takes a free segment for data, leaving `keep` beyond the reserve; it comes with
    /// one reference (the taker's head).
    pub fn take_data(&self, keep: u32) -> Option<u32> {
        let mut a = lock(&self.alloc);
        if a.free.len() as u32 <= self.reserve + keep {
            self.became_full();
            return None;
        }
        let s = a.free.pop_front()?;
        a.uses[s as usize] = Use::Data;
        self.refs[s as usize].store(1, Relaxed);
        self.sealed[s as usize].store(0, Relaxed);
        self.unsynced[s as usize].store(false, Relaxed);
        for m in self.seg_marks(s) {
            m.store(0, Relaxed);
        }
        Some(s)
    }

    /// Takes a free segment for the log (may use the reserve).
    pub fn take_log(&self) -> Option<u32> {
        let mut a = lock(&self.alloc);
        let Some(s) = a.free.pop_front() else {
            self.became_full();
            return None;
        };
        a.uses[s as usize] = Use::Log;
        Some(s)
    }

    /// An allocation failed: the cache is full. Counts the transition, not every failed
    /// retry of a waiting request (called under the allocator lock, so a reclaim's clear
    /// cannot interleave).
    fn became_full(&self) {
        self.full.store(true, Relaxed);
        if !self.episode.swap(true, Relaxed) {
            self.full_events.fetch_add(1, Relaxed);
        }
    }

    /// Free segments beyond the reserve that writers and fills leave to GC's own
    /// channel (`Channel::background`): its moves of read-hot data at the log's tail
    /// need room exactly when writers have taken the rest (see `gc::RELOCATE_MARGIN`).
    /// One, on a medium of 32 segments or more; none on a smaller one, whose every
    /// segment is wanted for writers' heads and the log (the simulator's 8-segment
    /// media stalled).
    pub fn writer_keep(&self) -> u32 {
        (self.n() >= 32) as u32
    }

    /// Free segments beyond the reserve that end a full episode: 1/32 of the cache, at
    /// least 2 (below the GC free target, which keeps 5% free at gc_percent 95).
    fn headroom(&self) -> u32 {
        self.reserve + (self.n() / 32).max(2)
    }

    /// A segment went back on the free list (allocator lock held): requests may retry,
    /// and the full episode ends once there is headroom again.
    fn freed(&self, free: usize) {
        self.full.store(false, Relaxed);
        if free as u32 >= self.headroom() {
            self.episode.store(false, Relaxed);
        }
    }

    /// Returns a log segment that key_tail has left.
    pub fn free_log(&self, seg: u32) {
        let mut a = lock(&self.alloc);
        debug_assert_eq!(a.uses[seg as usize], Use::Log);
        a.uses[seg as usize] = Use::Free;
        a.free.push_back(seg);
        self.freed(a.free.len());
    }

    pub fn get(&self, seg: u32) {
        super::sync::count::rmw();
        let prev = self.refs[seg as usize].fetch_add(1, AcqRel);
        debug_assert!(prev > 0, "reference taken on unreferenced segment {seg}");
    }

    /// Takes `n` more references at once (an allocation head's spares).
    pub fn get_n(&self, seg: u32, n: u32) {
        super::sync::count::rmw();
        let prev = self.refs[seg as usize].fetch_add(n, AcqRel);
        debug_assert!(prev > 0, "references taken on unreferenced segment {seg}");
    }

    /// Drops a reference; reclaims the segment when it was the last one.
    pub fn put<P: Pmem>(&self, pmem: &P, geo: &Geometry, seg: u32) -> bool {
        self.put_n(pmem, geo, seg, 1)
    }

    /// Drops `n` references; reclaims the segment when they were the last ones.
    pub fn put_n<P: Pmem>(&self, pmem: &P, geo: &Geometry, seg: u32, n: u32) -> bool {
        if n == 0 {
            return false;
        }
        super::sync::count::rmw();
        let prev = self.refs[seg as usize].fetch_sub(n, AcqRel);
        assert!(prev >= n, "segment {seg} reference count underflow");
        if prev != n {
            return false;
        }
        self.bump_gen(pmem, geo, seg);
        let mut a = lock(&self.alloc);
        a.uses[seg as usize] = Use::Free;
        a.free.push_back(seg);
        self.freed(a.free.len());
        true
    }

    /// Persists the segment's next generation, then publishes it: from then on every
    /// key and extent naming the old one reads as stale.
    fn bump_gen<P: Pmem>(&self, pmem: &P, geo: &Geometry, seg: u32) {
        let gen = self.gens[seg as usize].load(Acquire) + 1;
        // Persist the new generation in the slot that does not hold the current one:
        // the slot is gen % 2 and the sequence is the generation itself.
        let rec = encode_gen(seg, gen, gen);
        pmem.persist(geo.seg_base(seg) + GEN_OFF[(gen % 2) as usize], &rec);
        self.gens[seg as usize].store(gen, SeqCst);
    }

    /// Marks a data segment, if still in generation `gen` (low 32 bits), as having all
    /// its allocations keyed (see `sealed`).
    pub fn seal(&self, seg: u32, gen: u32) {
        let g = self.gens[seg as usize].load(Acquire);
        if g as u32 == gen {
            self.sealed[seg as usize].store(g + 1, Release);
        }
    }

    pub fn is_sealed(&self, seg: u32) -> bool {
        self.sealed[seg as usize].load(Acquire) == self.gens[seg as usize].load(Acquire) + 1
    }

    /// Notes that `seg` holds KEY_UNSYNCED data.
    pub fn note_unsynced(&self, seg: u32) {
        let u = &self.unsynced[seg as usize];
        if !u.load(Relaxed) {
            u.store(true, Relaxed);
        }
    }

    pub fn has_unsynced(&self, seg: u32) -> bool {
        self.unsynced[seg as usize].load(Relaxed)
    }

    /// Reclaims data segment `seg` out of log order, whatever keys still name it: bumps
    /// its generation (so they, and any extent left, read as stale: GC skips their
    /// references, writeback leaves them out, replay takes them for tombstones) and
    /// holds it back from reuse until `release`.
    /// The caller holds GC's state lock, the only place keys drop references.
    pub fn hold<P: Pmem>(&self, pmem: &P, geo: &Geometry, seg: u32) {
        self.bump_gen(pmem, geo, seg);
        self.refs[seg as usize].store(0, Release);
        let mut a = lock(&self.alloc);
        debug_assert_eq!(a.uses[seg as usize], Use::Data);
        a.uses[seg as usize] = Use::Held;
    }

    /// Returns a held segment to the free list.
    pub fn release(&self, seg: u32) {
        let mut a = lock(&self.alloc);
        debug_assert_eq!(a.uses[seg as usize], Use::Held);
        a.uses[seg as usize] = Use::Free;
        a.free.push_back(seg);
        self.freed(a.free.len());
    }

    fn seg_marks(&self, seg: u32) -> &[AtomicU8] {
        let b = seg as usize * self.blocks_per_seg;
        &self.marks[b..b + self.blocks_per_seg]
    }

    /// Marks the whole `MARK_BLOCK`s inside `[seg_off, seg_off + len)` of `seg` as
    /// superseded, if the segment is still in generation `gen` (low 32 bits).
    pub fn mark_superseded(&self, seg: u32, seg_off: u32, len: u32, gen: u32) {
        if self.gen32(seg) != gen {
            return; // reclaimed since: the data is gone, there is nothing to skip
        }
        let first = seg_off.div_ceil(MARK_BLOCK) as usize;
        let end = ((seg_off + len) / MARK_BLOCK) as usize;
        let tag = mark_tag(gen);
        if let Some(ms) = self.seg_marks(seg).get(first..end) {
            for m in ms {
                m.store(tag, Release);
            }
        }
    }

    /// Whether the `MARK_BLOCK` at `seg_off` (a multiple of it) of `seg` holds data of
    /// generation `gen` that a newer key of its epoch superseded.
    pub fn superseded(&self, seg: u32, seg_off: u32, gen: u32) -> bool {
        self.seg_marks(seg)
            .get((seg_off / MARK_BLOCK) as usize)
            .is_some_and(|m| m.load(Acquire) == mark_tag(gen))
    }

    /// Whether every byte of `[seg_off, seg_off + len)` of `seg` lies in `MARK_BLOCK`s
    /// that a newer key superseded in generation `gen`: then the index maps none of it.
    /// False for a range that does not cover whole blocks.
    pub fn all_superseded(&self, seg: u32, seg_off: u32, len: u32, gen: u32) -> bool {
        if len == 0 || seg_off % MARK_BLOCK != 0 || len % MARK_BLOCK != 0 {
            return false;
        }
        let first = (seg_off / MARK_BLOCK) as usize;
        let end = first + (len / MARK_BLOCK) as usize;
        let tag = mark_tag(gen);
        self.seg_marks(seg)
            .get(first..end)
            .is_some_and(|ms| ms.iter().all(|m| m.load(Acquire) == tag))
    }

    /// Current generation, as the index stores it (low 32 bits).
    pub fn gen32(&self, seg: u32) -> u32 {
        self.gens[seg as usize].load(Acquire) as u32
    }
}

/// Reads a segment's generation from its two replicas.
pub fn load_gen<P: Pmem>(pmem: &P, geo: &Geometry, seg: u32) -> Result<u64, String> {
    let mut b = [[0u8; GEN_SIZE]; 2];
    for (i, buf) in b.iter_mut().enumerate() {
        pmem.read(geo.seg_base(seg) + GEN_OFF[i], buf);
    }
    pick_replica([decode_gen(&b[0], seg), decode_gen(&b[1], seg)])
        .map(|(_, _, g)| g)
        .map_err(|e| format!("segment {seg}: {e}"))
}

/// Writes generation 0 to both replicas of a segment (format time).
pub fn format_gen<P: Pmem>(pmem: &P, geo: &Geometry, seg: u32) {
    let rec = encode_gen(seg, 0, 0);
    for off in GEN_OFF {
        pmem.write(geo.seg_base(seg) + off, &rec);
        pmem.flush(geo.seg_base(seg) + off, GEN_SIZE as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::sim::{pmem::SimPmem, tiny};

    /// A mark counts only for the generation it was set under, and never survives the
    /// segment being taken for data again.
    #[test]
    fn marks_follow_generations_and_reuse() {
        let geo = tiny::geometry(1);
        let pmem = SimPmem::new(geo.seg_base(geo.n_segs - 1) + geo.seg_size);
        let n = geo.n_segs as usize;
        let segs = Segs::new(
            vec![Use::Free; n],
            vec![0; n],
            vec![0; n],
            0,
            geo.seg_data_size,
        );
        let s = segs.take_data(0).unwrap();
        let b = MARK_BLOCK;
        // Only whole blocks inside the range are marked.
        segs.mark_superseded(s, b / 2, 2 * b, 0);
        assert!(!segs.superseded(s, 0, 0));
        assert!(segs.superseded(s, b, 0));
        assert!(!segs.superseded(s, 2 * b, 0));
        assert!(!segs.superseded(s, b, 1), "another generation");
        // Reclaimed: a late mark for the old generation is dropped...
        assert!(segs.put(&pmem, &geo, s));
        segs.mark_superseded(s, 0, b, 0);
        assert!(!segs.superseded(s, 0, 0) && !segs.superseded(s, 0, 1));
        // ...and taking the segment again clears what the old generation left.
        let mut again = segs.take_data(0);
        while again != Some(s) {
            again = segs.take_data(0);
        }
        assert!(!segs.superseded(s, b, 1) && !segs.superseded(s, b, 0));
        segs.mark_superseded(s, b, b, 1);
        assert!(segs.superseded(s, b, 1));
        // Out-of-range blocks are simply not marked.
        segs.mark_superseded(s, geo.seg_data_size as u32, b, 1);
        assert!(!segs.superseded(s, geo.seg_data_size as u32, 1));
    }

    /// A full episode counts once, however many single segments reclaim hands back
    /// while writers keep taking them, and ends only with headroom free again.
    #[test]
    fn full_events_count_episodes() {
        let geo = tiny::geometry(1);
        let pmem = SimPmem::new(geo.seg_base(geo.n_segs - 1) + geo.seg_size);
        let n = geo.n_segs as usize;
        let segs = Segs::new(
            vec![Use::Free; n],
            vec![0; n],
            vec![0; n],
            1,
            geo.seg_data_size,
        );
        let mut taken = Vec::new();
        while let Some(s) = segs.take_data(0) {
            taken.push(s);
        }
        assert_eq!(segs.full_events.load(Relaxed), 1);
        // One segment back, taken again, full again: the same episode.
        for _ in 0..5 {
            let s = taken.pop().unwrap();
            assert!(segs.put(&pmem, &geo, s));
            assert!(!segs.full.load(Relaxed), "a reclaim lets requests retry");
            taken.push(segs.take_data(0).unwrap());
            assert!(segs.take_data(0).is_none());
        }
        assert_eq!(segs.full_events.load(Relaxed), 1);
        // Headroom back: the next failure is a new episode.
        while (segs.free() as u32) < segs.headroom() {
            assert!(segs.put(&pmem, &geo, taken.pop().unwrap()));
        }
        while segs.take_data(0).is_some() {}
        assert_eq!(segs.full_events.load(Relaxed), 2);
    }

    /// Writers stop `writer_keep` segments before the reserve; GC's channel takes those.
    #[test]
    fn writers_leave_gc_its_segments() {
        let n = 64;
        let segs = Segs::new(vec![Use::Free; n], vec![0; n], vec![0; n], 2, 1 << 20);
        let keep = segs.writer_keep();
        assert_eq!(keep, 1);
        while segs.take_data(keep).is_some() {}
        assert_eq!(segs.free() as u32, 2 + keep);
        for _ in 0..keep {
            assert!(segs.take_data(0).is_some(), "GC's moves find room");
        }
        assert!(segs.take_data(0).is_none(), "the log's reserve stays");
        assert!(segs.take_log().is_some());
    }
}
