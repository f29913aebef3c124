//! The cache engine: dm-pcache's write-back cache as a deterministic sans-I/O library.
//!
//! One `Engine` serves one cache medium and is shared by every thread that does I/O;
//! each such thread owns a `Channel`: its allocation head, scratch space, and a slot
//! (`slots`) holding its kset buffer and request counters. The engine
//! never performs backing-device I/O itself: a read returns the ranges it could not
//! serve from pmem (the caller reads them from the backing device, then calls `fill`),
//! and writeback hands out batches that the caller writes, flushes and acknowledges.
//! Time enters only through `tick`. Shared state is the sharded index, the log head,
//! the tails and the segment table, each behind its own short lock; a channel's kset is
//! behind a lock of its own that only tick, flush and a writer ordering a key after it
//! (`kset_for`) take besides the owner. The lock order is shard -> kset -> log head ->
//! segment allocator (a writer holds at most one kset lock at a time), shard ->
//! replayed extents, and tails -> log head. No lock is held across a data copy.
//! Replay leaves each shard's extents in a log-ordered chain; the shard inserts them
//! the first time it is locked (`Engine::shard`) or when `tick` gets to it.
#![forbid(unsafe_code)]

mod batch;
mod check;
mod compact;
mod doorkeeper;
mod extent;
pub mod format;
mod gc;
pub mod index;
mod io;
pub mod latency;
pub mod log;
pub mod modes;
mod open;
pub mod pmem;
pub mod policy;
mod recycle;
pub mod segs;
mod slots;
mod stats;
mod streams;
pub mod sync;
mod writeback;

pub use check::LogSummary;
pub use format::{BackingIdentity, LogPos};
pub use io::{Channel, Miss};
pub use open::{probe, Probe};
pub use pmem::Pmem;
pub use policy::{CacheMode, Direct, FlushMark, Policy, Promotion, Route, SeqPolicy};
pub use stats::{ErrorEvent, Stats};
pub use writeback::{GcResult, WbBatch, WbItem, WbKind, WbNext, SMALL_WINDOW_KSETS, WINDOW_KSETS};

use format::{
    CacheInfo, Geometry, Superblock, DIRTY_TAIL_OFF, INFO_OFF, KEY_TAIL_OFF, KIND_DIRTY_TAIL,
    KIND_KEY_TAIL,
};
use index::{Replayed, Shard, ShardLock};
use log::{KsetBuf, LogFull, LogHead};
use segs::Segs;
use slots::{Slot, Slots, COMMON};
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex, MutexGuard};
use sync::lock;
use thiserror::Error;

/// Parameters fixed when a medium is formatted.
#[derive(Debug, Clone)]
pub struct FormatOptions {
    /// Segment size in bytes; 0 (the default) picks one for the medium's size
    /// (`format::auto_seg_size`). Small values let simulations run GC.
    pub seg_size: u32,
    /// Keys per kset (128 by default).
    pub kset_keys: u32,
    pub data_crc: bool,
    pub gc_percent: u32,
    /// Cache mode and sequential cutoff (changeable later with `set_policy`).
    pub policy: Policy,
    /// A random id distinguishing this format from earlier ones on the same medium.
    pub format_id: u64,
    pub backing: BackingIdentity,
}

impl FormatOptions {
    pub fn new(backing: BackingIdentity, format_id: u64) -> Self {
        FormatOptions {
            seg_size: 0,
            kset_keys: 128,
            data_crc: false,
            gc_percent: 95,
            policy: Policy::new_default(),
            format_id,
            backing,
        }
    }
}

/// Run-time parameters (not persisted).
#[derive(Debug, Clone)]
pub struct Config {
    /// Segments kept back from data allocation for the log.
    pub log_reserve: u32,
    /// The wall clock, in milliseconds since the Unix epoch, read only to date an error
    /// (the engine has no clock of its own; the default dates nothing: 0).
    pub wall_clock_ms: fn() -> u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            log_reserve: 2,
            wall_clock_ms: || 0,
        }
    }
}

/// Why a medium could not be formatted or attached.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OpenError {
    #[error("the medium holds no pcache metadata (blank): format it first")]
    Blank,
    #[error("the medium holds data that is not pcache metadata; refusing to touch it (format with --force to overwrite)")]
    Foreign,
    #[error("corrupt cache metadata: {0}")]
    Corrupt(String),
    /// The message names the identity recorded at format time and the device given;
    /// front ends add the ways out, non-destructive ones first.
    #[error("this cache belongs to another backing device: {0}")]
    WrongBacking(String),
    #[error("invalid option: {0}")]
    Invalid(String),
}

/// Why a request failed.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum IoError {
    /// No free space: defer the request and retry it after writeback and GC ran.
    #[error("cache full, retry later")]
    Busy,
    #[error("request beyond the end of the device")]
    OutOfRange,
    #[error("request not aligned to the block size")]
    Unaligned,
    /// Dirty cached data failed its CRC: it cannot be recovered from anywhere.
    #[error("cached dirty data is corrupt")]
    Corrupt,
}

/// Replica bookkeeping of a two-slot metadata object.
#[derive(Debug, Clone, Copy)]
struct Replica {
    slot: usize,
    seq: u64,
}

impl Replica {
    /// Advances to the other slot and returns (slot, seq) to write.
    fn advance(&mut self) -> (usize, u64) {
        self.slot ^= 1;
        self.seq += 1;
        (self.slot, self.seq)
    }
}

struct Tails {
    key: LogPos,
    key_r: Replica,
    dirty: LogPos,
    dirty_r: Replica,
    /// Log sequence where the last writeback window built ends (DRAM only): ksets
    /// before it may be in flight until dirty_tail passes it (see `compact`).
    wb_end: u64,
}

struct InfoState {
    info: CacheInfo,
    r: Replica,
}

/// Latched background errors, and the last error of each kind that was counted.
#[derive(Default)]
struct Errors {
    writeback: Option<String>,
    gc: Option<String>,
    last_io: Option<ErrorEvent>,
    last_writeback: Option<ErrorEvent>,
}

/// `Engine::pend`: nothing appended for the grain since open.
const PEND_NONE: u64 = u64::MAX;
/// `Engine::pend` tracks 1 MiB grains: 32 bytes per 4 MiB region (8 MiB per TiB of
/// backing device), and a quarter of the cross-channel closes per-region tracking needs
/// for random writes.
const PEND_GRAIN_SHIFT: u32 = 20;
/// `pend` words per region.
const PEND_PER_SHARD: usize = (format::SUBTREE_SIZE >> PEND_GRAIN_SHIFT) as usize;
/// `Engine::pend` holds the slot id above this bit and the kset batch's low bits below.
const PEND_SHIFT: u32 = 48;
const PEND_BATCH: u64 = (1 << PEND_SHIFT) - 1;

/// What the engine keeps per shard outside the shard's lock line.
pub(super) struct ShardAux {
    /// The shard's extent count as of its last unlock, so `stats` need not lock every
    /// shard (stored only when it changed).
    len: AtomicU32,
    /// Likewise, the bytes of pmem data its extents map (`cached_bytes`).
    data: AtomicU64,
    /// The address of the shard's entries as of its last unlock (0: none yet), for
    /// `probe_addr`'s prefetch hint (stored only when it changed).
    entries: AtomicUsize,
}

impl ShardAux {
    pub(super) fn new() -> ShardAux {
        ShardAux {
            len: AtomicU32::new(0),
            data: AtomicU64::new(0),
            entries: AtomicUsize::new(0),
        }
    }
}

/// A locked shard; on unlock its extent count and data bytes are published to
/// `ShardAux` if they changed (a hit changes neither, so it stores nothing).
pub(super) struct ShardGuard<'a> {
    g: MutexGuard<'a, Shard>,
    len0: usize,
    data0: u64,
    entries0: usize,
    aux: &'a ShardAux,
}

impl std::ops::Deref for ShardGuard<'_> {
    type Target = Shard;
    fn deref(&self) -> &Shard {
        &self.g
    }
}

impl std::ops::DerefMut for ShardGuard<'_> {
    fn deref_mut(&mut self) -> &mut Shard {
        &mut self.g
    }
}

impl Drop for ShardGuard<'_> {
    fn drop(&mut self) {
        let n = self.g.len();
        if n != self.len0 {
            self.aux.len.store(n as u32, Relaxed);
        }
        let d = self.g.data_bytes();
        if d != self.data0 {
            self.aux.data.store(d, Relaxed);
        }
        let at = self.g.entries_addr();
        if at != self.entries0 {
            self.aux.entries.store(at, Relaxed);
        }
    }
}

/// A slot's kset, locked.
pub(super) struct KsetGuard<'a> {
    pub slot: &'a Slot,
    pub kb: MutexGuard<'a, KsetBuf>,
}

impl KsetGuard<'_> {
    /// Buffers a key (room guaranteed by `kset_for`).
    pub fn push(&mut self, k: &format::KeyRec, dirty: bool) {
        self.kb.push(k, dirty);
        if dirty {
            self.slot.dirty.store(self.kb.dirty_bytes, Relaxed);
        }
    }
}

/// Replayed shards `tick` settles per call: small, because tick runs on a reactor.
const SETTLE_PER_TICK: usize = 4;

/// A cache engine over one medium.
pub struct Engine<P: Pmem> {
    pmem: P,
    sb: Superblock,
    geo: Geometry,
    data_crc: bool,
    align: u32,
    shards: Box<[ShardLock]>,
    /// Replayed extents not yet inserted into their shards; dropped once all are.
    replayed: Mutex<Option<Arc<Replayed>>>,
    /// Shards still owing their replayed chain, and how far `tick` got settling them.
    unsettled: AtomicUsize,
    settle_cursor: AtomicUsize,
    /// Every channel's kset buffer and counters.
    slots: Arc<Slots>,
    /// Per shard, beside the index: its extent count.
    aux: Box<[ShardAux]>,
    /// Per `PEND_GRAIN` of backing address, written under its shard's lock: the slot and
    /// kset batch holding the latest key touching it (`PEND_NONE` if none was appended
    /// since open); see `kset_for`.
    pend: Box<[AtomicU64]>,
    head: Mutex<LogHead>,
    /// The write epoch: every FLUSH and FUA write starts a new one, before it closes
    /// ksets. Writeback may skip dirty data only when a newer key from the same epoch,
    /// already in the log, replaced it (marked by `insert_key` and `log::close`, see
    /// `Segs::mark_superseded`).
    epoch: AtomicU64,
    /// Write count at the last tick, and whether none arrived between the last two.
    writes_at_tick: AtomicU64,
    idle: AtomicBool,
    /// Admission pacing (see `Engine::admit`): on while usage is at or above the GC
    /// watermark and writeback has closed dirty data to work on; then every write takes
    /// its bytes from `credit`, which writeback refills with the bytes it retires.
    pace: AtomicBool,
    credit: AtomicI64,
    /// Usage is at or over the GC watermark (as `update_pace` last saw it): fills then
    /// evict, and read misses pass the doorkeeper first.
    over: AtomicBool,
    door: doorkeeper::Doorkeeper,
    tails: Mutex<Tails>,
    info: Mutex<InfoState>,
    segs: Segs,
    counters: stats::Counters,
    next_token: AtomicU32,
    errors: Mutex<Errors>,
    wall_clock_ms: fn() -> u64,
    /// Requests the environment holds back because the cache was full (a gauge it keeps).
    waiting: AtomicU64,
    /// Every channel's latency histograms (recorded by the environment, which has the clock).
    latency: latency::Registry,
    /// The GC watermark, read by every background round without the info lock; `info`
    /// holds the persisted copy (written under it).
    gc_pct: AtomicU32,
    /// The policy's mode and cutoff (kib << 8 | policy code), read per request without
    /// the info lock; `info` holds the persisted copy.
    mode_code: AtomicU32,
    seq_code: AtomicU64,
    /// Direct writes completed, and how many of them a backing FLUSH covered.
    direct_done: AtomicU64,
    direct_flushed: AtomicU64,
    /// Ranges of the latest direct writes, for `fills_allowed`.
    unflushed: Mutex<policy::Unflushed>,
    /// GC's channel and buffers (only GC takes it).
    gc_state: Mutex<gc::GcState>,
    /// Set while compaction found mostly superseded segments that wait only for
    /// writeback to pass their dirty data: writeback then runs (see `compact`).
    compact_wants_wb: AtomicBool,
    /// Sequence number of the last closed kset, and of the last one holding a
    /// KEY_UNSYNCED key (`direct_mark`, `direct_flush_needed`).
    closed_seq: AtomicU64,
    unsynced_seq: AtomicU64,
    /// The flush record as persisted (`through` mirrored in `flushed_through` for
    /// lock-free reads), with the drop range the next update will persist.
    flush_rec: Mutex<FlushRecState>,
    flushed_through: AtomicU64,
    /// Unsynced keys the replay at open dropped (no completed backing FLUSH covered them).
    replay_unsynced_dropped: u64,
    /// The flush record replay used, and the last kset it read (`replay_kept`).
    replay_rec: format::FlushRec,
    replay_last: u64,
    /// Ksets below this sequence number may hold clean keys the index dropped with no
    /// record in the log (`invalidate_clean`, a clean extent failing its CRC), which a
    /// replay would bring back; 0: none, `HIDDEN_UNKNOWN`: not known where they end.
    /// While nonzero, direct writes log a tombstone even where nothing is cached
    /// (`begin_direct`); GC clears it once key_tail passes it.
    hidden_below: AtomicU64,
    /// Held by `invalidate_clean` (rare: mode switches), so two never race on the mark.
    invalidating: Mutex<()>,
}

/// `hidden_below` when the ksets that may hold hidden keys are not known.
const HIDDEN_UNKNOWN: u64 = u64::MAX;

struct FlushRecState {
    rec: format::FlushRec,
    r: Replica,
}

impl<P: Pmem> Engine<P> {
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }
    pub fn pmem(&self) -> &P {
        &self.pmem
    }
    pub fn data_crc(&self) -> bool {
        self.data_crc
    }
    /// Block size every request must be aligned to.
    pub fn block_size(&self) -> u32 {
        self.align
    }
    /// Size of the cached device.
    pub fn size(&self) -> u64 {
        self.geo.backing_size
    }
    pub fn gc_percent(&self) -> u32 {
        self.gc_pct.load(Relaxed)
    }

    /// Changes the GC watermark (0..=`GC_PERCENT_MAX`) and persists it.
    pub fn set_gc_percent(&self, pct: u32) -> Result<(), OpenError> {
        if pct > format::GC_PERCENT_MAX {
            return Err(OpenError::Invalid(format!(
                "gc_percent {pct} is out of range 0..={}",
                format::GC_PERCENT_MAX
            )));
        }
        let mut st = lock(&self.info);
        st.info.gc_percent = pct;
        self.gc_pct.store(pct, Relaxed);
        let (slot, seq) = st.r.advance();
        self.pmem.persist(INFO_OFF[slot], &st.info.encode(seq));
        Ok(())
    }

    fn persist_key_tail(&self, t: &mut Tails) {
        let (slot, seq) = t.key_r.advance();
        self.pmem
            .persist(KEY_TAIL_OFF[slot], &t.key.encode(KIND_KEY_TAIL, seq));
    }

    fn persist_dirty_tail(&self, t: &mut Tails) {
        let (slot, seq) = t.dirty_r.advance();
        self.pmem
            .persist(DIRTY_TAIL_OFF[slot], &t.dirty.encode(KIND_DIRTY_TAIL, seq));
    }

    /// Locks shard `si`, first inserting its replayed extents if it still owes them.
    fn shard(&self, si: usize) -> ShardGuard<'_> {
        let mut g = lock(&self.shards[si]);
        // A replayed shard's count is unknown until it settles: nothing was published.
        let (len0, data0) = if g.replayed() {
            (0, 0)
        } else {
            (g.len(), g.data_bytes())
        };
        if g.replayed() {
            let r = lock(&self.replayed).clone();
            g.settle(r.as_deref(), si);
            if self.unsettled.fetch_sub(1, Relaxed) == 1 {
                *lock(&self.replayed) = None;
            }
        }
        ShardGuard {
            entries0: if len0 == 0 { 0 } else { g.entries_addr() },
            g,
            len0,
            data0,
            aux: &self.aux[si],
        }
    }

    /// Whether shard `si` had no extents at its last unlock and owes no replayed ones.
    fn shard_is_empty(&self, si: usize) -> bool {
        self.unsettled.load(Acquire) == 0 && self.aux[si].len.load(Acquire) == 0
    }

    /// Settles every replayed shard still owing its chain (`stats`, which reports exact
    /// extent counts; after the first call, or once tick got through, it costs nothing).
    fn settle_all(&self) {
        if self.unsettled.load(Relaxed) == 0 {
            return;
        }
        let Some(r) = lock(&self.replayed).clone() else {
            return;
        };
        for &si in &r.order {
            drop(self.shard(si as usize));
        }
    }

    /// Settles up to `n` more replayed shards (from `tick`), so the replayed extents'
    /// memory is released and first accesses stay cheap.
    fn settle_some(&self, n: usize) {
        if self.unsettled.load(Relaxed) == 0 {
            return;
        }
        let Some(r) = lock(&self.replayed).clone() else {
            return;
        };
        for _ in 0..n {
            let i = self.settle_cursor.fetch_add(1, Relaxed);
            let Some(&si) = r.order.get(i) else { return };
            drop(self.shard(si as usize));
        }
    }

    fn shard_of(&self, off: u64) -> usize {
        (off >> format::SUBTREE_SHIFT) as usize
    }

    /// With the shard of `[off, off + len)` locked: makes sure every key already
    /// appended for the range's grains is in the log or in slot `id`'s open kset, then
    /// locks that kset with room for one more key and records it as holding the grains'
    /// latest key. So overlapping keys reach the log in index order (see `slots`).
    ///
    /// Tracked per 1 MiB grain (`PEND_GRAIN_SHIFT`) rather than per region: overlapping
    /// keys share a grain, which is all the order needs, and channels writing different
    /// parts of a region close each other's ksets less often.
    pub(super) fn kset_for(&self, off: u64, len: u64, id: u16) -> Result<KsetGuard<'_>, LogFull> {
        let pend = self.pend_of(off, len);
        for p in pend {
            let p = p.load(Relaxed);
            if p != PEND_NONE && (p >> PEND_SHIFT) as u16 != id {
                self.order_after(p)?;
            }
        }
        let slot = self.slots.get(id);
        let kb = if id == COMMON {
            lock(&slot.kset)
        } else {
            sync::lock_own(&slot.kset)
        };
        let mut g = KsetGuard { slot, kb };
        if g.kb.count >= self.geo.kset_keys {
            self.close_kset(&mut g)?;
        }
        let mine = (id as u64) << PEND_SHIFT | (slot.closed.load(Relaxed) & PEND_BATCH);
        for p in pend {
            if p.load(Relaxed) != mine {
                p.store(mine, Relaxed);
            }
        }
        Ok(g)
    }

    /// The `pend` words of `[off, off + len)` (inside one region).
    fn pend_of(&self, off: u64, len: u64) -> &[AtomicU64] {
        let first = (off >> PEND_GRAIN_SHIFT) as usize;
        let last = ((off + len.max(1) - 1) >> PEND_GRAIN_SHIFT) as usize;
        &self.pend[first..=last]
    }

    /// Another channel's kset (`p`, a `pend` word) took the latest key of a grain: if
    /// that kset is still open, it goes to the log before ours can.
    fn order_after(&self, p: u64) -> Result<(), LogFull> {
        let batch = p & PEND_BATCH;
        let o = self.slots.get((p >> PEND_SHIFT) as u16);
        if o.closed.load(Acquire) & PEND_BATCH != batch {
            return Ok(());
        }
        let mut g = KsetGuard {
            slot: o,
            kb: lock(&o.kset),
        };
        if o.closed.load(Relaxed) & PEND_BATCH == batch && g.kb.count > 0 {
            self.close_kset(&mut g)?;
            self.counters.ordering_closes.inc();
        }
        Ok(())
    }

    /// Writes a slot's kset to the log (taking the log head once for the whole kset).
    pub(super) fn close_kset(&self, g: &mut KsetGuard<'_>) -> Result<(), LogFull> {
        if g.kb.count == 0 {
            return Ok(());
        }
        let unsynced = g.kb.unsynced;
        let mut head = lock(&self.head);
        log::close(&self.pmem, &self.geo, &self.segs, &mut head, &mut g.kb)?;
        // Under the head lock, so both only grow; `direct_mark` reads them without it.
        let seq = head.pos.seq - 1;
        if unsynced {
            self.unsynced_seq.store(seq, Release);
        }
        self.closed_seq.store(seq, Release);
        drop(head);
        // Under the kset lock (one writer); after the kset is in the log, so a writer
        // that sees the new batch orders its own close after this one.
        let c = g.slot.closed.load(Relaxed);
        g.slot.closed.store(c + 1, Release);
        g.slot.dirty.store(0, Relaxed);
        Ok(())
    }

    /// Closes every kset: after this returns Ok, every write completed before the call
    /// survives a crash (the FLUSH of the durability contract).
    pub fn flush(&self) -> Result<(), IoError> {
        self.counters.flushes.inc();
        self.new_epoch();
        self.close_ksets()
    }

    /// Closes every kset without starting a write epoch (a FLUSH is this after one):
    /// what a runtime does for writers waiting for space, whose keys writeback and GC
    /// can reach only in the log. No barrier, so writeback may still leave out data
    /// that later writes of the same epoch supersede, and recycle within it (`recycle`).
    pub fn close_ksets(&self) -> Result<(), IoError> {
        // Even with every kset empty, data flushed with `flush_data` becomes durable here.
        self.pmem.drain();
        let mut res = Ok(());
        for (_, slot) in self.slots.used() {
            let mut g = KsetGuard {
                slot,
                kb: lock(&slot.kset),
            };
            if self.close_kset(&mut g).is_err() {
                res = Err(IoError::Busy);
            }
        }
        res
    }

    /// Time passes: ksets that held keys at the previous tick are closed, so an
    /// unflushed write's key reaches the log within two tick periods.
    pub fn tick(&self) {
        self.settle_some(SETTLE_PER_TICK);
        let c = &self.counters;
        let writes = self.slot_sum(|s| &s.writes) + c.zeroes.get() + c.discards.get();
        let before = self.writes_at_tick.swap(writes, Relaxed);
        self.idle.store(writes == before, Relaxed);
        for (_, slot) in self.slots.used() {
            let mut g = KsetGuard {
                slot,
                kb: lock(&slot.kset),
            };
            if g.kb.count > 0 && g.kb.aged {
                let _ = self.close_kset(&mut g);
            } else if g.kb.count > 0 {
                g.kb.aged = true;
            }
            if g.kb.count == 0 {
                slot.free_if_orphan();
            }
        }
    }

    /// Starts a new write epoch (FLUSH and FUA are barriers): writeback never skips
    /// data across one. Called before the barrier closes any kset.
    fn new_epoch(&self) {
        sync::count::rmw();
        self.epoch.fetch_add(1, AcqRel);
    }

    /// True when no write arrived between the last two ticks.
    pub fn idle(&self) -> bool {
        self.idle.load(Relaxed)
    }

    /// True when a request failed with `Busy` since the last reclaim.
    pub fn cache_full(&self) -> bool {
        self.segs.full.load(Relaxed)
    }

    /// The latency histograms: environments register one set per channel and record
    /// into it; `stats` merges them.
    pub fn latency(&self) -> &latency::Registry {
        &self.latency
    }

    /// A request starts waiting for cache space (the environment's FIFO).
    pub fn waiting_inc(&self) {
        self.waiting.fetch_add(1, Relaxed);
    }

    /// A waiting request left the FIFO.
    pub fn waiting_dec(&self) {
        self.waiting.fetch_sub(1, Relaxed);
    }

    fn event(&self, message: String) -> ErrorEvent {
        ErrorEvent {
            message,
            unix_ms: (self.wall_clock_ms)(),
        }
    }

    /// Counts a failed request (a backing-device read that failed, a request that could
    /// not be served) and remembers it, with the time, as the last I/O error.
    pub fn io_error(&self, message: String) {
        self.counters.io_errors.inc();
        self.note_io_error(message);
    }

    /// Remembers the last I/O error (the caller counted it).
    fn note_io_error(&self, message: String) {
        let ev = self.event(message);
        lock(&self.errors).last_io = Some(ev);
    }

    /// Remembers the last writeback error (the caller counted it).
    fn note_writeback_error(&self, message: String) {
        let ev = self.event(message);
        lock(&self.errors).last_writeback = Some(ev);
    }

    /// Releases a channel's allocation head and closes its kset (the channel goes
    /// away). A channel dropped without this keeps its head's segment referenced; its
    /// kset is closed by the next flush or by tick, which then frees its slot.
    pub fn release_channel(&self, ch: &mut Channel) {
        self.seal_left(ch);
        if let Some(h) = ch.take_head() {
            // No call of this channel follows: what it allocated is keyed.
            self.segs.seal(h.seg, self.segs.gen32(h.seg));
            self.segs.put_n(&self.pmem, &self.geo, h.seg, 1 + h.spare);
        }
        if let Some(s) = ch.slot.take().filter(|s| s.of(&self.slots)) {
            let slot = self.slots.get(s.id);
            let mut g = KsetGuard {
                slot,
                kb: lock(&slot.kset),
            };
            // On a full log the keys stay buffered: tick and flush close them later.
            let _ = self.close_kset(&mut g);
            drop(s);
            if g.kb.count == 0 {
                slot.free_if_orphan();
            }
        }
    }

    /// The slot of channel `ch`, taken on its first use.
    pub(super) fn slot_id(&self, ch: &mut Channel) -> u16 {
        match &ch.slot {
            Some(s) if s.of(&self.slots) => s.id,
            _ => {
                let s = slots::SlotHandle::take(&self.slots);
                let id = s.id;
                ch.slot = Some(s);
                id
            }
        }
    }

    /// A per-channel counter summed over every slot.
    pub(super) fn slot_sum(&self, f: impl Fn(&slots::ChanCounters) -> &AtomicU64) -> u64 {
        self.slots.used().map(|(_, s)| f(&s.c).load(Relaxed)).sum()
    }

    /// A clean shutdown: close all ksets. Dirty data stays cached.
    pub fn shutdown(&self) -> Result<(), IoError> {
        self.flush()
    }
}
