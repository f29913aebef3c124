//! The kset log: kset buffers in DRAM (one per channel slot, see `slots`) and the append
//! point in pmem.
//!
//! A key is appended while its region's shard lock is held, and a channel appending to
//! a region whose previous key still waits in another channel's open kset closes that
//! kset first (`Engine::kset_for`), so the log order of the keys of any region equals
//! their index insertion order; replay therefore rebuilds the same index. A close writes
//! a 32-byte zero terminator after the kset, then the kset, then fences; it always
//! leaves room for a LAST kset, which links a full log segment to the next one. Every
//! kset carries the next 64-bit log sequence number, so the end of the log is the first
//! position whose kset is missing, torn, or from an older lap. A close first drains
//! postponed data flushes (`Pmem::drain`): data before its key.

use super::format::{
    seal_kset, Geometry, KeyRec, KsetHdr, LogPos, KEY_SIZE, KSET_HDR, KSET_LAST, KSET_SIZE_MAX,
};
use super::pmem::Pmem;
use super::segs::Segs;

/// A kset being filled in DRAM.
pub struct KsetBuf {
    /// Empty until the first key: a slot that only ever reads holds no buffer.
    pub buf: Vec<u8>,
    pub count: u32,
    /// Bytes of dirty data referenced by the buffered keys.
    pub dirty_bytes: u64,
    /// Set by a tick while the buffer holds keys; a second tick closes it.
    pub aged: bool,
    /// Whether a buffered key is KEY_UNSYNCED (its kset needs a backing FLUSH after
    /// its close before replay keeps those keys: `Engine::direct_flush_needed`).
    pub unsynced: bool,
    /// Lowest and highest write epoch of the buffered dirty keys.
    epochs: (u64, u64),
    /// Dirty data the buffered keys replaced within its own write epoch; marked
    /// superseded (`Segs::mark_superseded`) once those keys are in the log.
    superseded: Vec<Superseded>,
}

/// Old dirty data a buffered key replaced: `len` bytes at `seg_off` of `seg`, generation
/// `gen`.
#[derive(Debug, Clone, Copy)]
pub struct Superseded {
    pub seg: u32,
    pub seg_off: u32,
    pub len: u32,
    pub gen: u32,
}

impl Default for KsetBuf {
    fn default() -> Self {
        KsetBuf {
            buf: Vec::new(),
            count: 0,
            dirty_bytes: 0,
            aged: false,
            unsynced: false,
            epochs: NO_EPOCHS,
            // Grows to about one per key (a 4 KiB overwrite replaces one 4 KiB extent)
            // and is reused from then on.
            superseded: Vec::new(),
        }
    }
}

const NO_EPOCHS: (u64, u64) = (u64::MAX, 0);

impl KsetBuf {
    /// Notes the write epoch of a dirty key being pushed.
    pub fn note_epoch(&mut self, epoch: u64) {
        self.epochs = (self.epochs.0.min(epoch), self.epochs.1.max(epoch));
    }

    /// Notes old dirty data of the same epoch that a key being pushed replaces.
    pub fn note_superseded(&mut self, s: Superseded) {
        self.superseded.push(s);
    }

    pub fn push(&mut self, k: &KeyRec, dirty: bool) {
        if self.buf.is_empty() {
            self.buf.resize(KSET_SIZE_MAX, 0);
        }
        let o = KSET_HDR + KEY_SIZE * self.count as usize;
        k.encode(&mut self.buf[o..o + KEY_SIZE]);
        self.count += 1;
        self.unsynced |= k.flags & super::format::KEY_UNSYNCED != 0;
        if dirty {
            self.dirty_bytes += k.len as u64;
        }
    }

    /// Iterates the buffered keys (for invariant checks).
    pub fn keys(&self, geo: &Geometry) -> impl Iterator<Item = KeyRec> + '_ {
        let g = *geo;
        (0..self.count as usize).map(move |i| {
            let o = KSET_HDR + KEY_SIZE * i;
            KeyRec::decode(&self.buf[o..o + KEY_SIZE], &g).expect("buffered key is valid")
        })
    }
}

/// The log's append point.
pub struct LogHead {
    pub pos: LogPos,
    /// Dirty bytes in closed ksets past dirty_tail (moved here by close).
    pub closed_dirty: u64,
    /// (log sequence, epoch) of the closed ksets whose dirty keys all share one write
    /// epoch, oldest first (writeback drops what it passed). DRAM only: ksets replayed
    /// at open are not here, so writeback never skips their keys.
    pub epochs: std::collections::VecDeque<(u64, u64)>,
}

/// The log has no free segment to grow into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogFull;

/// Writes the kset in `kb` at the head, rolling to a new log segment if needed.
pub fn close<P: Pmem>(
    pmem: &P,
    geo: &Geometry,
    segs: &Segs,
    head: &mut LogHead,
    kb: &mut KsetBuf,
) -> Result<(), LogFull> {
    if kb.count == 0 {
        return Ok(());
    }
    // The buffered keys may point at data whose durability the environment postponed
    // (group commit): it must be durable before any byte of the kset can reach the medium.
    pmem.drain();
    let size = KSET_HDR + KEY_SIZE * kb.count as usize;
    // Room for this kset, a LAST link after it, and the terminator after that.
    if head.pos.off as u64 + (size + 2 * KSET_HDR) as u64 > geo.seg_data_size {
        let next = segs.take_log().ok_or(LogFull)?;
        // The new segment must not start with anything that could pass for a kset:
        // zero its first header before linking to it.
        let zero = [0u8; KSET_HDR];
        pmem.persist(geo.data_off(next, 0), &zero);
        let mut last = [0u8; KSET_HDR];
        seal_kset(
            &mut last,
            geo.format_id,
            KsetHdr {
                seq: head.pos.seq,
                flags: KSET_LAST,
                count: next,
            },
        );
        pmem.persist(geo.data_off(head.pos.seg, head.pos.off as u64), &last);
        head.pos = LogPos {
            seq: head.pos.seq + 1,
            seg: next,
            off: 0,
        };
    }
    seal_kset(
        &mut kb.buf[..size],
        geo.format_id,
        KsetHdr {
            seq: head.pos.seq,
            flags: 0,
            count: kb.count,
        },
    );
    let at = geo.data_off(head.pos.seg, head.pos.off as u64);
    let zero = [0u8; KSET_HDR];
    pmem.write(at + size as u64, &zero);
    pmem.write(at, &kb.buf[..size]);
    pmem.flush(at, (size + KSET_HDR) as u64);
    pmem.fence();
    head.pos = LogPos {
        seq: head.pos.seq + 1,
        seg: head.pos.seg,
        off: head.pos.off + size as u32,
    };
    // The replacing keys are in the log now: writeback may leave the old data out.
    for s in kb.superseded.drain(..) {
        segs.mark_superseded(s.seg, s.seg_off, s.len, s.gen);
    }
    head.closed_dirty += kb.dirty_bytes;
    if kb.dirty_bytes > 0 && kb.epochs.0 == kb.epochs.1 {
        head.epochs.push_back((head.pos.seq - 1, kb.epochs.0));
    }
    kb.count = 0;
    kb.dirty_bytes = 0;
    kb.aged = false;
    kb.unsynced = false;
    kb.epochs = NO_EPOCHS;
    Ok(())
}
