//! Recycling at the dirty tail: live dirty data of the current write epoch that a
//! mostly superseded writeback window still holds is moved to GC's head as dirty data,
//! instead of being written back, when writes keep coming.
//!
//! A window of a hot working set smaller than the cache is mostly dead by the time
//! writeback reaches it (a 256 MiB random overwrite in a 512 MiB log: about a sixth of
//! its bytes live); writing that sixth back costs a backing write and a FLUSH each lap,
//! and the data is overwritten soon after anyway. Moving it costs a copy in the medium.
//!
//! Why it keeps the backing device crash-consistent: the window's ksets and the moved
//! data are all of the current write epoch (no FLUSH or FUA began since they were
//! written), so the backing device showing the window without the moved data is what a
//! disk may show before the next FLUSH. The moved keys are pushed under the kset lock
//! with the epoch read there (as `io::insert_key` does), so a FLUSH that begins
//! meanwhile either sees them in a kset it closes or stops the move; what did not move
//! is written back as before.
//!
//! Why it loses nothing: the moved keys' kset is closed (persistent) before
//! `writeback_next` returns the window, so before dirty_tail can pass the old keys; if
//! that close fails, every item is written back as well (the old copies hold the same
//! bytes until GC passes the old keys, which needs dirty_tail past them first). A piece
//! is replaced in the index only if it still names the old location, so a write that
//! raced the copy wins; a piece that failed to move keeps its whole item in the window.
//!
//! Bounded: only windows whose live dirty data is at most `LIVE_PCT` percent of the
//! data they retire (`LIVE_PCT_READS` while reads come), only while free segments
//! remain above the log reserve's margin, never in a drain (`WbBatch::set_recycle`) or
//! outside write-back, and never while the cache is idle: data stops cycling and is
//! written back as soon as writes pause for a tick, or a FLUSH ends its epoch. The
//! runtimes turn it on only where the base's FLUSH is slow
//! (`runtime::sched::set_window_rules`): over a fast base the copies cost more than the
//! writeback they save.

use super::format::{self, KeyRec};
use super::index::{F_CRC, F_DIRTY};
use super::sync::lock;
use super::writeback::{WbBatch, WbKind};
use super::{CacheMode, Engine, Pmem};
use std::sync::atomic::Ordering::Acquire;

/// A window is recycled only if its live dirty data is at most LIVE_PCT percent of the
/// data its keys point at (what acknowledging it lets GC reclaim): half, so each
/// recycled window frees at least as much as it copies, when the workload only writes.
/// (A hot set beside a stream over bdev_aio, SPDK policy tier: 1/3 gave 607K IOPS, 1/2
/// 896K, against 459-498K without recycling.)
const LIVE_PCT: u64 = 50;
/// The bound while reads are a real share of the requests (GC's `reads_matter`): what
/// writeback would leave clean GC then evicts as cold, and the next read of it misses,
/// so moving it buys hits as well; each recycled window still frees an eighth of what
/// it retires. (The mixed trace at a 1 GiB cache, one round each: 50% gave read
/// byte-hit 0.772 and 2.7x qemu-storage-daemon's speed, 75% 0.779, 90% 0.816 and 4.1x;
/// the hot set beside a stream 750K IOPS at 50%, 1.09M when every window moved.)
const LIVE_PCT_READS: u64 = 87;
/// Free segments beyond the log reserve that recycling leaves: the one writers leave
/// (`Segs::writer_keep`), for GC's moves of read-hot data.
const MARGIN: u32 = 1;

impl<P: Pmem> Engine<P> {
    /// After `build`, for a window of one write epoch `epoch`: moves its live dirty data
    /// to GC's head when that pays (see the module documentation) and leaves the moved
    /// items out of `b.items`.
    pub(super) fn recycle(&self, b: &mut WbBatch, epoch: Option<u64>) {
        let now = self.epoch.load(Acquire);
        let live: u64 = b.items.iter().map(|i| i.len as u64).sum();
        let over = |pct: u64| live * 100 > b.retire_bytes() * pct;
        // The larger bound first: a window over it needs no look at GC's state.
        if !b.recycle
            || live == 0
            || epoch != Some(now)
            || self.mode() != CacheMode::WriteBack
            || self.idle()
            || over(LIVE_PCT_READS)
            || b.items
                .iter()
                .any(|i| !matches!(i.kind, WbKind::Data { .. }))
        {
            return;
        }
        let mut st = lock(&self.gc_state);
        let st = &mut *st;
        if !Self::reads_mattered(st) && over(LIVE_PCT) {
            return;
        }
        b.moved.clear();
        for i in 0..b.items.len() {
            if self.segs.free() <= self.segs.reserve + MARGIN {
                break;
            }
            let it = b.items[i];
            let WbKind::Data { pmem_off } = it.kind else {
                continue;
            };
            if self.move_dirty(st, it.off, it.len, pmem_off, now) {
                b.moved.push(i as u32);
            }
        }
        if b.moved.is_empty() {
            return;
        }
        // The moved keys reach the log before dirty_tail may pass the old ones.
        let slot = self.slots.get(self.slot_id(&mut st.ch));
        let mut g = super::KsetGuard {
            slot,
            kb: lock(&slot.kset),
        };
        if self.close_kset(&mut g).is_err() {
            return; // written back as well: the old copies are still there
        }
        drop(g);
        // `moved` is ascending: each item is checked against its next entry.
        let (mut moved, mut i) = (0u64, 0u32);
        let mut next = b.moved.iter().copied().peekable();
        b.items.retain(|it| {
            let gone = next.next_if_eq(&i).is_some();
            moved += if gone { it.len as u64 } else { 0 };
            i += 1;
            !gone
        });
        b.recycled = moved;
        self.counters.recycled_bytes.add(moved);
    }

    /// Moves the dirty data `[off, off + len)` found at `pmem_off` to GC's head, piece
    /// by piece, where the index still maps it there. True when none of it is left at
    /// the old location (moved, or replaced by newer writes).
    fn move_dirty(
        &self,
        st: &mut super::gc::GcState,
        off: u64,
        len: u32,
        pmem_off: u64,
        epoch: u64,
    ) -> bool {
        let (seg, seg_off) = self.geo.locate(pmem_off);
        let gen = self.segs.gen32(seg);
        let len = len as usize;
        st.copy.resize(len, 0);
        self.pmem.read(pmem_off, &mut st.copy[..len]);
        let mut done = 0usize;
        while done < len {
            let Ok(a) = self.alloc_keyed(&mut st.ch, (len - done) as u64) else {
                return false;
            };
            let src = &st.copy[done..done + a.len as usize];
            self.put_copy(&a, src);
            let id = self.slot_id(&mut st.ch);
            let o = off + done as u64;
            let s = (o % format::SUBTREE_SIZE) as u32;
            let e = s + a.len as u32;
            let mut referenced = false;
            let mut stopped = false;
            {
                let mut sh = self.shard(self.shard_of(o));
                let Ok(mut kb) = self.kset_for(o, a.len, id) else {
                    drop(sh);
                    self.segs.put(&self.pmem, &self.geo, a.seg);
                    return false;
                };
                // Under the kset lock, as `insert_key` reads it: a FLUSH that began
                // since the window was taken ends the epoch, and with it the move.
                if self.epoch.load(Acquire) != epoch {
                    stopped = true;
                } else {
                    let so = seg_off + done as u32;
                    sh.retire_matching(s, e, seg, gen, so, |fs, frag| {
                        // Dirty: a piece that cannot be keyed stays where it is (and
                        // its item is written back), never dropped.
                        if kb.kb.count >= self.geo.kset_keys && self.close_kset(&mut kb).is_err() {
                            return Some(*frag);
                        }
                        let d = (fs - s) as usize;
                        let bytes = &src[d..d + frag.len as usize];
                        let (nk, mut x) = self.data_key(
                            o - s as u64 + fs as u64,
                            a.seg,
                            a.off as u32 + d as u32,
                            a.gen,
                            bytes,
                        );
                        if referenced {
                            self.segs.get(a.seg);
                        }
                        referenced = true;
                        // Not GC's judgement: the copy keeps its read-hit count.
                        x = x.with_flags(super::gc::refs_kept(frag, false));
                        x.set_epoch(epoch);
                        kb.kb.note_epoch(epoch);
                        kb.push(&nk, true);
                        debug_assert!(x.is(F_DIRTY) && (self.data_crc == x.is(F_CRC)));
                        Some(x)
                    });
                }
            }
            if !referenced {
                self.segs.put(&self.pmem, &self.geo, a.seg);
            }
            if stopped {
                return false;
            }
            done += a.len as usize;
        }
        // Whatever still maps the old location did not move (its kset could not close).
        let old = KeyRec {
            off,
            len: len as u32,
            flags: 0,
            seg,
            seg_off,
            gen: gen as u64,
            data_crc: 0,
        };
        self.live_bytes(&old) == 0
    }
}
