//! Segment bookkeeping: free list, reference counts and generations.
//!
//! A data segment's reference count is 1 for each channel whose allocation head sits in
//! it, plus 1 for each key pointing into it that lives in the log region
//! `[key_tail, key_head)` or waits in a kset buffer. When it drops to zero the segment is
//! reclaimed: its generation is bumped and persisted *before* the segment returns to the
//! free list, so any index extent still pointing at it reads as stale from then on. Log
//! segments are not counted; the log frees them explicitly when key_tail leaves them.
//! `reserve` segments are kept back from data allocation so the log can always grow
//! enough to close the ksets that writeback needs in order to make progress.

use super::format::{decode_gen, encode_gen, pick_replica, Geometry, GEN_OFF, GEN_SIZE};
use super::pmem::Pmem;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::*};
use std::sync::Mutex;

/// What a segment is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    Free,
    Data,
    Log,
}

pub struct Segs {
    pub refs: Box<[AtomicU32]>,
    pub gens: Box<[AtomicU64]>,
    alloc: Mutex<Alloc>,
    /// Set when an allocation failed; cleared by a reclaim.
    pub full: AtomicBool,
    pub reserve: u32,
}

struct Alloc {
    free: VecDeque<u32>,
    uses: Vec<Use>,
}

impl Segs {
    /// Builds the table from per-segment uses and generations (after format or replay).
    pub fn new(uses: Vec<Use>, gens: Vec<u64>, refs: Vec<u32>, reserve: u32) -> Self {
        let free = (0..uses.len() as u32)
            .filter(|&i| uses[i as usize] == Use::Free)
            .collect();
        Segs {
            refs: refs.into_iter().map(AtomicU32::new).collect(),
            gens: gens.into_iter().map(AtomicU64::new).collect(),
            alloc: Mutex::new(Alloc { free, uses }),
            full: AtomicBool::new(false),
            reserve,
        }
    }

    pub fn n(&self) -> u32 {
        self.gens.len() as u32
    }

    /// Segments in use (data or log).
    pub fn used(&self) -> u32 {
        let a = self.alloc.lock().unwrap();
        self.n() - a.free.len() as u32
    }

    pub fn use_of(&self, seg: u32) -> Use {
        self.alloc.lock().unwrap().uses[seg as usize]
    }

    /// Takes a free segment for data; it comes with one reference (the taker's head).
    pub fn take_data(&self) -> Option<u32> {
        let mut a = self.alloc.lock().unwrap();
        if a.free.len() as u32 <= self.reserve {
            self.full.store(true, Relaxed);
            return None;
        }
        let s = a.free.pop_front()?;
        a.uses[s as usize] = Use::Data;
        self.refs[s as usize].store(1, Relaxed);
        Some(s)
    }

    /// Takes a free segment for the log (may use the reserve).
    pub fn take_log(&self) -> Option<u32> {
        let mut a = self.alloc.lock().unwrap();
        let Some(s) = a.free.pop_front() else {
            self.full.store(true, Relaxed);
            return None;
        };
        a.uses[s as usize] = Use::Log;
        Some(s)
    }

    /// Returns a log segment that key_tail has left.
    pub fn free_log(&self, seg: u32) {
        let mut a = self.alloc.lock().unwrap();
        debug_assert_eq!(a.uses[seg as usize], Use::Log);
        a.uses[seg as usize] = Use::Free;
        a.free.push_back(seg);
        self.full.store(false, Relaxed);
    }

    pub fn get(&self, seg: u32) {
        let prev = self.refs[seg as usize].fetch_add(1, AcqRel);
        debug_assert!(prev > 0, "reference taken on unreferenced segment {seg}");
    }

    /// Drops a reference; reclaims the segment when it was the last one.
    pub fn put<P: Pmem>(&self, pmem: &P, geo: &Geometry, seg: u32) -> bool {
        let prev = self.refs[seg as usize].fetch_sub(1, AcqRel);
        assert!(prev > 0, "segment {seg} reference count underflow");
        if prev != 1 {
            return false;
        }
        let gen = self.gens[seg as usize].load(Acquire) + 1;
        // Persist the new generation in the slot that does not hold the current one:
        // the slot is gen % 2 and the sequence is the generation itself.
        let rec = encode_gen(seg, gen, gen);
        pmem.persist(geo.seg_base(seg) + GEN_OFF[(gen % 2) as usize], &rec);
        self.gens[seg as usize].store(gen, SeqCst);
        let mut a = self.alloc.lock().unwrap();
        a.uses[seg as usize] = Use::Free;
        a.free.push_back(seg);
        self.full.store(false, Relaxed);
        true
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
