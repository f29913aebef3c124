//! Read-miss admission once the cache is full: a miss is cached only on its second
//! miss within a recent window (OCF's NHIT promotion with N = 2, or the "doorkeeper"
//! of TinyLFU). Below the GC watermark every miss is cached, so an empty cache warms at
//! once; at the watermark every fill evicts something, and a block read once and never
//! again (the long tail of a zipf set, a random scan bigger than the cache) would
//! otherwise push out data that is read again.
//!
//! The window is a table of one tag per slot, about one slot per 4 KiB block of the
//! medium, indexed by a hash of the miss's 4 KiB block: a first miss writes its tag, a
//! second miss finds it and is admitted. Newer misses overwrite older tags, so a block
//! must miss again within roughly a medium's worth of other misses. Tags are relaxed
//! atomics: a race between two channels at most admits or declines one fill wrongly,
//! which only changes what is cached, never what is read. Writes are never filtered (a
//! write-back write must be cached). GC records the clean data it drops as if it had
//! missed (`evicted`), so a block read again soon after its eviction comes back on its
//! first miss, as a ghost entry of ARC's lists brings it back.

use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// The granularity of the window: misses are remembered per 4 KiB block.
const BLOCK_SHIFT: u32 = 12;
/// The table never takes more than 4M slots (16 MiB), whatever the medium's size.
const MAX_SLOTS_LOG2: u32 = 22;

pub(super) struct Doorkeeper {
    tags: Box<[AtomicU32]>,
    bits: u32,
}

impl Doorkeeper {
    /// A window of about one slot per 4 KiB block of `capacity` bytes.
    pub(super) fn new(capacity: u64) -> Doorkeeper {
        let blocks = (capacity >> BLOCK_SHIFT).max(1024);
        let bits = (64 - (blocks - 1).leading_zeros()).min(MAX_SLOTS_LOG2);
        Doorkeeper {
            tags: (0..1usize << bits).map(|_| AtomicU32::new(0)).collect(),
            bits,
        }
    }

    /// Records that the data at backing offset `off` was dropped from the cache: its
    /// next miss counts as a second one.
    pub(super) fn evicted(&self, off: u64) {
        let (slot, tag) = self.slot(off);
        slot.store(tag, Relaxed);
    }

    /// The slot of the block at `off`, and its tag there (never 0, the empty value).
    fn slot(&self, off: u64) -> (&AtomicU32, u32) {
        let h = (off >> BLOCK_SHIFT).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (&self.tags[(h >> (64 - self.bits)) as usize], (h as u32) | 1)
    }

    /// Records a miss at backing offset `off` and says whether it is to be cached: true
    /// when the same block missed recently.
    pub(super) fn second_miss(&self, off: u64) -> bool {
        let (slot, tag) = self.slot(off);
        if slot.load(Relaxed) == tag {
            // Forget it: a block evicted again later must earn its place again.
            slot.store(0, Relaxed);
            true
        } else {
            slot.store(tag, Relaxed);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_miss_is_admitted_and_first_is_not() {
        let d = Doorkeeper::new(64 << 20);
        assert!(!d.second_miss(4096 * 7));
        // Same block, another offset inside it.
        assert!(d.second_miss(4096 * 7 + 512));
        // Admission consumed the tag.
        assert!(!d.second_miss(4096 * 7));
    }

    #[test]
    fn an_evicted_block_comes_back_on_its_first_miss() {
        let d = Doorkeeper::new(64 << 20);
        d.evicted(4096 * 9);
        assert!(d.second_miss(4096 * 9));
        assert!(!d.second_miss(4096 * 10));
    }

    #[test]
    fn old_misses_leave_the_window() {
        let d = Doorkeeper::new(4 << 20); // 1024 slots
        assert!(!d.second_miss(0));
        // Far more distinct blocks than slots overwrite the first tag.
        for b in 1..100_000u64 {
            d.second_miss(b << 12);
        }
        assert!(!d.second_miss(0));
    }
}
