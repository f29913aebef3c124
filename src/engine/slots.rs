//! Channel slots: what each channel owns of the engine's shared state, as dm-pcache keeps
//! it per CPU: its kset buffer (keys waiting for the log) and its request counters.
//!
//! A slot lives in a fixed table the engine shares with tick, flush and stats, so those
//! can close a channel's kset and read its counters; on a hit or a write only the owning
//! channel touches it (its own lock, uncontended, and plain loads and stores of its
//! counters). A `Channel` takes a free slot the first time it needs one and gives it
//! back when it is dropped (`SlotHandle`); tick then closes what the slot still buffers
//! and frees it. Counters are never reset, so a reused slot keeps adding to its totals
//! and totals never go backwards. Slot 0 (`COMMON`) is for requests that come without a
//! channel (write-zeroes, direct writes) and for channels that found the table full: it
//! has many writers, so its counters use atomic adds.
//!
//! Log order across slots: keys of one region may sit in different channels' ksets, but
//! replay rebuilds the index in log order, so overlapping keys must reach the log in the
//! order they entered the index. Each 1 MiB grain of backing address remembers (under
//! its region's shard lock) which slot's kset, and which batch of it, took its latest key
//! (`Engine::pend`); a channel about to append a key to a grain whose latest key waits in
//! another channel's still-open kset closes that kset first (`Engine::kset_for`). Only
//! writers of the same grain in the same kset window ever meet there.

use super::log::KsetBuf;
use super::sync::count;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Mutex};

/// Slots in a table: channels alive at once beyond this share `COMMON`.
pub const MAX_SLOTS: usize = 1024;
/// The slot of requests without a channel (and of channels that found no free slot).
pub const COMMON: u16 = 0;

/// Request counters of one slot (the I/O-path counters of `Stats`).
#[derive(Default)]
pub struct ChanCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub partial_hits: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub bytes_hit: AtomicU64,
    pub fills: AtomicU64,
    pub bypassed: AtomicU64,
    pub bypassed_bytes: AtomicU64,
    /// Missed bytes not cached because the doorkeeper had not seen them miss before.
    pub declined_bytes: AtomicU64,
    pub paced: AtomicU64,
}

/// One channel's slot, on cache lines of its own.
#[repr(align(128))]
pub struct Slot {
    /// Ksets closed from this slot: the open kset is batch number `closed`. Written under
    /// the kset lock after the kset is in the log.
    pub closed: AtomicU64,
    /// Dirty bytes the open kset references (a copy of `KsetBuf::dirty_bytes`, so
    /// `dirty_bytes()` reads it without the lock).
    pub dirty: AtomicU64,
    /// Taken by a channel (or `COMMON`, always).
    owned: AtomicBool,
    /// The owner went away: tick frees the slot once its kset is closed.
    orphan: AtomicBool,
    /// Several writers (`COMMON`): counters need atomic adds.
    shared: bool,
    pub kset: Mutex<KsetBuf>,
    pub c: ChanCounters,
}

impl Slot {
    fn new(shared: bool) -> Slot {
        Slot {
            closed: AtomicU64::new(0),
            dirty: AtomicU64::new(0),
            owned: AtomicBool::new(shared),
            orphan: AtomicBool::new(false),
            shared,
            kset: Mutex::new(KsetBuf::default()),
            c: ChanCounters::default(),
        }
    }

    /// Adds `n` to one of this slot's counters: a plain load and store when the slot has
    /// one writer (no lock prefix; readers see a value that may lag, never a torn one).
    pub fn add(&self, f: impl Fn(&ChanCounters) -> &AtomicU64, n: u64) {
        let a = f(&self.c);
        if self.shared {
            count::rmw();
            a.fetch_add(n, Relaxed);
        } else {
            a.store(a.load(Relaxed).wrapping_add(n), Relaxed);
        }
    }

    /// The owner is gone and nothing is buffered: the slot may be taken again. Called
    /// with its kset locked and empty.
    pub fn free_if_orphan(&self) {
        if self.orphan.load(Acquire) {
            self.orphan.store(false, Relaxed);
            self.owned.store(false, Release);
        }
    }
}

/// The table.
pub struct Slots {
    slots: Box<[Slot]>,
    /// One past the highest slot ever taken: loops over slots stop here.
    hi: AtomicUsize,
}

impl Default for Slots {
    fn default() -> Self {
        Slots {
            slots: (0..MAX_SLOTS).map(|i| Slot::new(i == 0)).collect(),
            hi: AtomicUsize::new(1),
        }
    }
}

impl Slots {
    pub fn get(&self, id: u16) -> &Slot {
        &self.slots[id as usize]
    }

    /// The slots ever taken (with their ids).
    pub fn used(&self) -> impl Iterator<Item = (u16, &Slot)> {
        let hi = self.hi.load(Acquire);
        self.slots[..hi]
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u16, s))
    }

    /// Takes a free slot for a channel (once per channel, not on the I/O path).
    fn take(&self) -> u16 {
        for (i, s) in self.slots.iter().enumerate().skip(1) {
            if !s.owned.load(Relaxed)
                && s.owned
                    .compare_exchange(false, true, Acquire, Relaxed)
                    .is_ok()
            {
                self.hi.fetch_max(i + 1, Release);
                return i as u16;
            }
        }
        COMMON
    }
}

/// A channel's hold on its slot; dropping it hands the slot back (tick frees it).
pub struct SlotHandle {
    table: Arc<Slots>,
    pub id: u16,
}

impl SlotHandle {
    pub fn take(table: &Arc<Slots>) -> SlotHandle {
        SlotHandle {
            table: Arc::clone(table),
            id: table.take(),
        }
    }

    /// Whether this handle is a slot of `table` (a channel used with another engine
    /// takes a new one).
    pub fn of(&self, table: &Arc<Slots>) -> bool {
        Arc::ptr_eq(&self.table, table)
    }
}

impl Drop for SlotHandle {
    fn drop(&mut self) {
        if self.id != COMMON {
            self.table.get(self.id).orphan.store(true, Release);
        }
    }
}
