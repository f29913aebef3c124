//! The state the module's layers share, at the bottom of `env/spdk` (above only `ffi`,
//! `json`, `params`, `wbmap`): a cache's `Shared` part (every thread) and its app-thread
//! `Node` with the background (writeback/GC) state, a channel's context, a request's
//! context in its bdev_io, the direct paths' counters and group FLUSH, and the helpers
//! that reach and complete them. The request paths (`direct`, `io`), the channels
//! (`channel`), the background (`writeback`) and the bdev/module/RPC layer (`cache`,
//! `registry`, `module`, `rpc`) build on these and never on each other backwards.
//!
//! Invariants: a `Node` is created, used and freed only on the app thread; a channel's
//! context only on its thread; an `IoCtx` lives in its bdev_io's driver_ctx from
//! `submit_request` until `finish`, which drops it and completes the bdev_io exactly once.

use super::ffi::{self, DmaBuf, Poller};
use super::wbmap::WbMap;
use crate::engine::latency::{Class, LatencySet};
use crate::engine::{BackingIdentity, Channel, Engine, FlushMark, IoError, WbBatch};
use crate::env::medium::PosixPmem;
use crate::runtime::sched::{Backoff, FlushPacer};
use spdk_sys as sys;
use std::collections::VecDeque;
use std::ffi::{c_void, CString};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// Most writeback requests in flight to the base. A window may hold a thousand; more
/// requests than the base device's queue holds make a kernel-backed base (bdev_uring,
/// bdev_aio) block the reactor in submission, and every foreground I/O with it. 96 stays
/// under a common 128-entry device queue and leaves room for foreground misses at QD32.
pub(super) const WB_INFLIGHT: u32 = 96;
/// Writeback's writes in flight while read misses wait for the base bdev: foreground
/// reads go first.
pub(super) const WB_BUSY_INFLIGHT: u32 = 4;
/// Slots for the start times of the requests in flight: a window's writes, or its FLUSH.
pub(super) const START_SLOTS: usize = WB_INFLIGHT as usize + 1;

/// Largest READ/WRITE handed to the module (the bdev layer splits bigger ones), which
/// bounds every bounce buffer.
pub(super) const MAX_IO: u32 = 1 << 20;
/// A base descriptor, usable from any thread for getting channels.
#[derive(Clone, Copy)]
pub(super) struct Desc(pub *mut sys::spdk_bdev_desc);
// SAFETY: SPDK descriptors may be used from any thread to get I/O channels and submit
// I/O on them; only open/close are tied to the opening (app) thread, which we respect.
unsafe impl Send for Desc {}
// SAFETY: as for Send: the shared uses (get channel, submit) are thread-safe in SPDK.
unsafe impl Sync for Desc {}

/// The part of a cache every thread may use.
pub(super) struct Shared {
    pub engine: Engine<PosixPmem>,
    pub name: String,
    pub base_desc: Desc,
    pub base_bdev: *mut sys::spdk_bdev,
    pub block_size: u32,
    /// The base bdev is gone: queued and new I/O fail.
    pub removed: AtomicBool,
    /// The app-thread node; only dereferenced on the app thread.
    pub node: AtomicPtr<Node>,
    /// Counters of the requests the cache policy sent to the base bdev.
    pub direct: DirectStats,
    /// Reads whose misses are at the base bdev (all channels): while there are any,
    /// writeback keeps at most `WB_BUSY_INFLIGHT` writes in flight.
    pub fg_reads: std::sync::atomic::AtomicUsize,
}

// SAFETY: `base_bdev` is only passed back to SPDK calls that are thread-safe
// (spdk_bdev_queue_io_wait from the submitting thread); everything else is Sync.
unsafe impl Send for Shared {}
// SAFETY: see Send; the engine is Sync and the rest are atomics or immutable.
unsafe impl Sync for Shared {}

impl Shared {
    pub(super) fn as_io_device(self: &Arc<Self>) -> *mut c_void {
        Arc::as_ptr(self) as *mut c_void
    }
}

/// The app-thread side of a cache.
pub(super) struct Node {
    pub bdev: sys::spdk_bdev,
    pub name_c: CString,
    pub shared: Arc<Shared>,
    pub base_desc: *mut sys::spdk_bdev_desc,
    pub base_bdev: *mut sys::spdk_bdev,
    pub base_name: String,
    pub bg: Background,
}

/// An error for the RPC client: an errno-style code and a message.
pub(super) type AttachError = (i32, String);

pub(super) fn identity(base: *mut sys::spdk_bdev) -> BackingIdentity {
    // SAFETY: `base` is an open bdev (we hold a descriptor); these getters only read it.
    unsafe {
        let bs = sys::spdk_bdev_get_block_size(base);
        let n = sys::spdk_bdev_get_num_blocks(base);
        let uuid = sys::spdk_bdev_get_uuid(base);
        let id = if !uuid.is_null() && !sys::spdk_uuid_is_null(uuid) {
            let mut buf = [0 as std::ffi::c_char; 40];
            sys::spdk_uuid_fmt_lower(buf.as_mut_ptr(), buf.len(), uuid);
            ffi::from_c(buf.as_ptr())
        } else {
            ffi::from_c(sys::spdk_bdev_get_name(base))
        };
        BackingIdentity {
            size: n * bs as u64,
            block_size: bs,
            id,
        }
    }
}

/// Size SPDK allocates per channel for our context.
pub(super) const CTX_SIZE: u32 = std::mem::size_of::<ChannelCtx>() as u32;
pub(super) struct ChannelCtx {
    pub shared: Arc<Shared>,
    pub base_ch: *mut sys::spdk_io_channel,
    /// Writes, flushes and zeroes.
    pub main: Channel,
    /// Where reads run; a read with misses takes it and leaves one from `reading`.
    pub read: Channel,
    /// Idle channels for reads (each holds one read's plan while its misses are out).
    pub reading: Vec<Channel>,
    /// Gathers a multi-iovec write into one slice for `Engine::write`.
    pub gather: Vec<u8>,
    /// DMA-able bounces for multi-iovec reads (the base reads into them).
    pub bounces: Vec<DmaBuf>,
    /// Ordered requests (writes, flushes, zeroes) waiting for cache space, oldest first.
    pub retry: VecDeque<*mut sys::spdk_bdev_io>,
    pub retry_poller: Poller,
    /// Reads waiting for `read_poll`, and the batch it works on (swapped, so neither
    /// allocates once warm).
    pub reads: Vec<*mut sys::spdk_bdev_io>,
    pub(super) batch: Vec<*mut sys::spdk_bdev_io>,
    /// Cache writes waiting for `read_poll`, which writes them with one store fence
    /// (`Engine::write_many`), their outcomes, and the swapped batch. Invariant: only
    /// while `retry` is empty are there any (`io::serve_writes`).
    pub writes: Vec<*mut sys::spdk_bdev_io>,
    pub(super) write_out: Vec<Result<(), crate::engine::IoError>>,
    pub(super) write_batch: Vec<*mut sys::spdk_bdev_io>,
    pub read_poller: Poller,
    /// Set while a poller or `submit_request` holds the context: `finish` then defers
    /// the completion to `deferred`, which the read poller delivers. A completion
    /// inside `submit_request` would otherwise cost the bdev layer a thread message
    /// (its `in_submit_request` deferral) per request.
    pub in_poll: bool,
    pub deferred: Vec<Done>,
    /// Requests accepted and not completed yet.
    pub inflight: u64,
    /// This channel's latency histograms (only this thread records into them).
    pub lat: Arc<LatencySet>,
    /// Nanoseconds per SPDK tick, as a 32.32 fixed-point factor.
    pub(super) ns_per_tick: u64,
    /// The group FLUSH of the base bdev for direct requests (direct.rs).
    pub flush: Flusher,
    /// Large direct writes at the base and waiting for it (direct.rs).
    pub(super) streamed: Streamed,
}

/// Large direct writes (a stream past the sequential cutoff, writes that bypass the
/// cache): the bytes the base has of them, and those waiting for their turn
/// (`direct::STREAM_INFLIGHT`).
#[derive(Default)]
pub(super) struct Streamed {
    pub(super) bytes: u64,
    pub(super) waiting: IoList,
}

/// Requests waiting on a channel, oldest first, linked through `IoCtx::next` (so a
/// queue allocates nothing). A request is in at most one list at a time.
pub(super) struct IoList {
    head: *mut sys::spdk_bdev_io,
    tail: *mut sys::spdk_bdev_io,
}

impl Default for IoList {
    fn default() -> Self {
        IoList {
            head: null_mut(),
            tail: null_mut(),
        }
    }
}

impl IoList {
    pub(super) fn is_empty(&self) -> bool {
        self.head.is_null()
    }
    /// The oldest request (null when empty), left in the list.
    pub(super) fn first(&self) -> *mut sys::spdk_bdev_io {
        self.head
    }
    /// Appends live request `bio`, which is in no list.
    pub(super) fn push(&mut self, bio: *mut sys::spdk_bdev_io) {
        io_ctx(bio).next = null_mut();
        match self.tail.is_null() {
            true => self.head = bio,
            false => io_ctx(self.tail).next = bio,
        }
        self.tail = bio;
    }
    /// Removes and returns the oldest request (null when empty).
    pub(super) fn pop(&mut self) -> *mut sys::spdk_bdev_io {
        let bio = self.head;
        if !bio.is_null() {
            self.head = std::mem::replace(&mut io_ctx(bio).next, null_mut());
            if self.head.is_null() {
                self.tail = null_mut();
            }
        }
        bio
    }
    /// Empties the list, returning its chain (oldest first, linked through
    /// `IoCtx::next`, null-terminated).
    pub(super) fn take(&mut self) -> *mut sys::spdk_bdev_io {
        self.tail = null_mut();
        std::mem::replace(&mut self.head, null_mut())
    }
}

impl ChannelCtx {
    /// A tick count as nanoseconds: one multiply, no division on the I/O path.
    pub(super) fn ticks_to_ns(&self, ticks: u64) -> u64 {
        ((ticks as u128 * self.ns_per_tick as u128) >> 32) as u64
    }

    /// An engine channel for a read (it never allocates: fills use `main`).
    pub(super) fn take_read_channel(&mut self) -> Channel {
        self.reading.pop().unwrap_or_default()
    }

    pub(super) fn give_read_channel(&mut self, c: Channel) {
        self.reading.push(c);
    }

    /// A DMA bounce of at least `len` bytes (len <= MAX_IO), or None if SPDK's memory is
    /// exhausted.
    pub(super) fn take_bounce(&mut self, len: usize) -> Option<DmaBuf> {
        debug_assert!(len <= MAX_IO as usize);
        self.bounces.pop().or_else(|| DmaBuf::new(MAX_IO as usize))
    }

    pub(super) fn give_bounce(&mut self, b: DmaBuf) {
        self.bounces.push(b);
    }
}

/// A finished request waiting for its completion to be delivered (`deliver`), with the
/// latency class it is recorded as (None: not recorded).
pub(super) struct Done {
    pub bio: *mut sys::spdk_bdev_io,
    pub status: i32,
    pub class: Option<Class>,
}

impl Done {
    /// Records its latency (from the bdev layer's submit time, which it read anyway)
    /// as ending at `now`.
    fn record(&self, c: &ChannelCtx, now: u64) {
        if let Some(class) = self.class {
            // SAFETY: a finished, not yet completed bdev_io; a getter.
            let start = unsafe { sys::spdk_bdev_io_get_submit_tsc(self.bio) };
            c.lat.record(class, c.ticks_to_ns(now.wrapping_sub(start)));
        }
    }
}

/// Records the latencies of finished requests about to complete: one clock read for all
/// (they complete now, together).
fn record_all(c: &ChannelCtx, done: &[Done]) {
    if done.iter().any(|d| d.class.is_some()) {
        let now = ffi::ticks();
        for d in done {
            d.record(c, now);
        }
    }
}

/// Records the latencies of `c.deferred` and takes them for delivery.
pub(super) fn take_deferred(c: &mut ChannelCtx) -> Vec<Done> {
    record_all(c, &c.deferred);
    std::mem::take(&mut c.deferred)
}

/// The context of an io_channel of ours.
///
/// # Safety
/// `ch` must be a live io_channel of a pcache io_device, used on its own thread, and no
/// other reference to its context may be alive.
pub(super) unsafe fn ctx_of<'a>(ch: *mut sys::spdk_io_channel) -> &'a mut ChannelCtx {
    // SAFETY: forwarded contract; create_cb initialised a ChannelCtx at this address.
    unsafe { &mut *(sys::spdk_sys_io_channel_get_ctx(ch) as *mut ChannelCtx) }
}

/// Runs `f` on the channel context with completions deferred (`in_poll`), then, once
/// that reference has ended, delivers them: each completion callback may submit a new
/// request on this channel, which takes the context again.
///
/// # Safety
/// `arg` is this thread's live channel context (a poller stops before destroy_cb drops
/// it) and no reference to it is alive.
pub(super) unsafe fn deferring<R>(arg: *mut c_void, f: impl FnOnce(&mut ChannelCtx) -> R) -> R {
    let (r, mut done) = {
        // SAFETY: forwarded contract; this reference ends before the callbacks run.
        let c = unsafe { &mut *(arg as *mut ChannelCtx) };
        if c.in_poll {
            // Nested in a holder of the context (submit_request): it delivers.
            return f(c);
        }
        c.in_poll = true;
        let r = f(c);
        c.in_poll = false;
        (r, take_deferred(c))
    };
    for d in done.drain(..) {
        // SAFETY: finished (IoCtx dropped) but not yet completed, on this thread.
        unsafe { ffi::complete(d.bio, d.status) };
    }
    // SAFETY: as above; the callbacks are done and no other reference is alive. What
    // the requests they submitted finished at once waits for the next poll (in the
    // larger allocation).
    let c = unsafe { &mut *(arg as *mut ChannelCtx) };
    done.append(&mut c.deferred);
    c.deferred = done;
    r
}

/// Per-request state, in the bdev_io's driver_ctx.
pub(super) struct IoCtx {
    /// The engine channel holding this read's plan, while misses are outstanding.
    pub(super) rch: Option<Channel>,
    /// DMA bounce of a multi-iovec read.
    pub(super) bounce: Option<DmaBuf>,
    /// Base reads outstanding.
    pub(super) pending: u32,
    /// Index of the next miss to submit.
    pub(super) next_miss: usize,
    pub(super) n_misses: usize,
    pub(super) failed: bool,
    /// Waiting for the base bdev to have request objects again.
    pub(super) waiting: bool,
    /// Routed by the cache policy already (`direct::try_start`): a retry routes it
    /// again without feeding the stream detector.
    pub(super) routed: bool,
    pub(super) wait: sys::spdk_bdev_io_wait_entry,
    /// What its latency counts as once it succeeds (measured from the bdev layer's
    /// submit time, `spdk_bdev_io_get_submit_tsc`).
    pub(super) class: Option<Class>,
    /// Why it failed, for the last I/O error (set where the failure is found).
    pub(super) why: &'static str,
    /// A request the cache policy sent to the base bdev (direct.rs): its placeholder,
    /// what it is, and the next request waiting for the same base FLUSH.
    pub(super) direct: Option<crate::runtime::direct::DirectOp>,
    pub(super) dkind: u8,
    pub(super) next: *mut sys::spdk_bdev_io,
    /// Bytes of a large direct write counted in `ChannelCtx::streamed` while the base
    /// has it (0 otherwise).
    pub(super) streamed: u32,
}

impl IoCtx {
    pub(super) fn new() -> IoCtx {
        IoCtx {
            rch: None,
            bounce: None,
            pending: 0,
            next_miss: 0,
            n_misses: 0,
            failed: false,
            waiting: false,
            routed: false,
            wait: sys::spdk_bdev_io_wait_entry::default(),
            class: None,
            why: "the request failed",
            direct: None,
            dkind: 0,
            next: std::ptr::null_mut(),
            streamed: 0,
        }
    }
}

/// Records why `bio` is about to fail.
pub(super) fn fail_why(bio: *mut sys::spdk_bdev_io, why: &'static str) {
    io_ctx(bio).why = why;
}

/// What an engine error means, for the last I/O error.
pub(super) fn engine_why(e: IoError) -> &'static str {
    match e {
        IoError::Busy => "the cache is full",
        IoError::OutOfRange => "beyond the end of the device, or larger than a request may be",
        IoError::Unaligned => "not aligned to the block size",
        IoError::Corrupt => "cached dirty data is corrupt (fails its CRC)",
    }
}

pub(super) fn io_ctx<'a>(bio: *mut sys::spdk_bdev_io) -> &'a mut IoCtx {
    // SAFETY: driver_ctx is cache-line aligned, get_ctx_size reserved size_of::<IoCtx>()
    // bytes, and submit_request initialised it; it is used only on the I/O's thread and
    // every caller holds at most one reference at a time.
    unsafe { &mut *((*bio).driver_ctx.as_mut_ptr() as *mut IoCtx) }
}

pub(super) fn chan_of<'a>(bio: *mut sys::spdk_bdev_io) -> &'a mut ChannelCtx {
    // SAFETY: the bdev_io was submitted on one of our channels, on this thread, and the
    // channel lives until all its requests completed.
    unsafe { ctx_of(sys::spdk_bdev_io_get_io_channel(bio)) }
}

/// Completes `bio`: drops its IoCtx, then reports `status` to the bdev layer.
///
/// # Safety
/// `bio` must be live and not yet completed, with an initialised IoCtx, on its thread.
pub(super) unsafe fn finish(c: &mut ChannelCtx, bio: *mut sys::spdk_bdev_io, status: i32) {
    let x = io_ctx(bio);
    let class = if status == ffi::STATUS_SUCCESS {
        x.class
    } else {
        None
    };
    if status == ffi::STATUS_FAILED {
        // NOMEM is not an error: the bdev layer resubmits.
        let why = x.why;
        // SAFETY: live request (caller contract).
        let d = unsafe { ffi::io_desc(bio) };
        let what = match d.ty {
            sys::SPDK_BDEV_IO_TYPE_READ => "read",
            sys::SPDK_BDEV_IO_TYPE_WRITE => "write",
            sys::SPDK_BDEV_IO_TYPE_FLUSH => "flush",
            sys::SPDK_BDEV_IO_TYPE_UNMAP => "unmap",
            sys::SPDK_BDEV_IO_TYPE_WRITE_ZEROES => "write_zeroes",
            _ => "request",
        };
        c.shared.engine.io_error(format!(
            "{what} of {} blocks at block {} failed: {why}",
            d.num_blocks, d.offset_blocks
        ));
    }
    c.inflight -= 1;
    // SAFETY: the IoCtx was initialised at submit and is dropped exactly once, here,
    // right before the bdev_io goes back to the bdev layer.
    unsafe { std::ptr::drop_in_place((*bio).driver_ctx.as_mut_ptr() as *mut IoCtx) };
    let d = Done { bio, status, class };
    if c.in_poll {
        // A poller or submit_request holds the channel: the request completes once it
        // let go (the read poller delivers what submit_request finished).
        c.deferred.push(d);
    } else {
        d.record(c, ffi::ticks());
        // SAFETY: live, uncompleted request on its thread (caller contract).
        unsafe { ffi::complete(bio, status) };
    }
}

/// `IoCtx::dkind` of a client FLUSH waiting for a base FLUSH owed to direct writes; a
/// direct request itself has its `DirectOp` in `IoCtx::direct`.
pub(super) const DK_FLUSH: u8 = 4;

/// Counters of the direct paths (`direct` in get_stats).
#[derive(Default)]
pub(super) struct DirectStats {
    pub writes: AtomicU64,
    pub writethrough: AtomicU64,
    pub zeroes: AtomicU64,
    pub base_flushes: AtomicU64,
    pub errors: AtomicU64,
    /// Large direct writes that waited for their turn at the base (`direct.rs`,
    /// STREAM_INFLIGHT: past its cap while read misses wait, or behind writes
    /// already waiting).
    pub held: AtomicU64,
}

impl DirectStats {
    pub(super) fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "writes": self.writes.load(Relaxed),
            "writethrough": self.writethrough.load(Relaxed),
            "zeroes": self.zeroes.load(Relaxed),
            "base_flushes": self.base_flushes.load(Relaxed),
            "errors": self.errors.load(Relaxed),
            "held_for_misses": self.held.load(Relaxed),
        })
    }
}

/// A channel's group FLUSH of the base bdev.
pub(super) struct Flusher {
    /// Requests waiting for the next FLUSH.
    pub(super) waiting: IoList,
    /// The requests the FLUSH in flight covers.
    pub(super) batch: *mut sys::spdk_bdev_io,
    pub(super) busy: bool,
    /// `direct_mark` when the FLUSH in flight was issued.
    pub(super) mark: FlushMark,
    pub(super) wait: sys::spdk_bdev_io_wait_entry,
    /// The base bdev has a volatile cache to flush.
    pub needed: bool,
}

impl Flusher {
    pub(super) fn new(needed: bool) -> Flusher {
        Flusher {
            waiting: IoList::default(),
            batch: null_mut(),
            busy: false,
            mark: FlushMark::default(),
            wait: sys::spdk_bdev_io_wait_entry::default(),
            needed,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Phase {
    Idle,
    Writing,
    Flushing,
}

/// Told when a drain ends: Ok, or why writeback stopped.
pub(super) type DrainWaiter = Box<dyn FnOnce(Result<(), String>)>;

/// Progress of a `bdev_pcache_flush` (or of a delete with flush).
#[derive(Default)]
pub(super) struct Drain {
    pub active: bool,
    pub total_bytes: u64,
    pub completed: u64,
    pub waiters: Vec<DrainWaiter>,
}

pub(super) struct Background {
    pub(super) base_ch: *mut sys::spdk_io_channel,
    pub(super) wb_poller: Poller,
    pub(super) tick_poller: Poller,
    pub(super) batch: WbBatch,
    pub(super) phase: Phase,
    pub(super) item: usize,
    pub(super) item_off: u64,
    pub(super) pending: u32,
    pub(super) failed: bool,
    pub(super) waiting: bool,
    /// A message to this thread that goes on taking windows is on its way (`chain`).
    pub(super) chained: bool,
    pub(super) bounce: Option<DmaBuf>,
    pub(super) bounce_used: usize,
    /// Direct access to the medium for writes to the base, when usable.
    pub(super) map: Option<WbMap>,
    /// Scratch for `Engine::gc` (one kset), allocated in `start`.
    pub(super) gc_buf: Vec<u8>,
    pub(super) wait: sys::spdk_bdev_io_wait_entry,
    pub(super) base_flush: bool,
    /// `direct_mark` when the FLUSH in flight was issued (for `direct_flushed`).
    pub(super) direct_mark: FlushMark,
    /// The period of the FLUSH for direct writes alone, from what base FLUSHes cost.
    pub(super) direct_flush: FlushPacer,
    /// Writeback's backoff after failures (runtime::sched).
    pub(super) backoff: Backoff,
    pub(super) on_stop: Option<Box<dyn FnOnce()>>,
    pub(super) stopping: bool,
    pub drain: Drain,
    /// Why writeback stopped, as last logged (logged once per reason).
    pub last_error: Option<String>,
    pub batches: u64,
    /// Latency of the base requests of writeback (this thread records).
    pub(super) lat: Option<Arc<LatencySet>>,
    /// When the requests in flight were submitted (SPDK ticks), oldest at `io_head`, in
    /// submission order: the window keeps topping up while requests complete, so one
    /// start per wave would not do. A completion is charged to the oldest start, exact
    /// while the base completes in order and an upper bound otherwise.
    pub(super) io_starts: [u64; START_SLOTS],
    pub(super) io_head: usize,
    /// ns per SPDK tick (32.32 fixed point).
    pub(super) ns_per_tick: u64,
    /// Why the batch in progress failed.
    pub(super) why: &'static str,
}

impl Background {
    pub(super) fn new() -> Background {
        Background {
            base_ch: std::ptr::null_mut(),
            wb_poller: Poller::none(),
            tick_poller: Poller::none(),
            batch: WbBatch::default(),
            phase: Phase::Idle,
            item: 0,
            item_off: 0,
            pending: 0,
            failed: false,
            waiting: false,
            chained: false,
            bounce: None,
            bounce_used: 0,
            map: None,
            gc_buf: Vec::new(),
            wait: sys::spdk_bdev_io_wait_entry::default(),
            base_flush: false,
            direct_mark: FlushMark::default(),
            direct_flush: FlushPacer::default(),
            backoff: Backoff::default(),
            on_stop: None,
            stopping: false,
            drain: Drain::default(),
            last_error: None,
            batches: 0,
            lat: None,
            io_starts: [0; START_SLOTS],
            io_head: 0,
            ns_per_tick: 0,
            why: "",
        }
    }

    /// Notes the submission time of the request about to be counted in `pending`.
    pub(super) fn push_start(&mut self, now: u64) {
        self.io_starts[(self.io_head + self.pending as usize) % START_SLOTS] = now;
    }

    /// The submission time of the oldest request in flight, which is retired; called
    /// once per completion, before `pending` drops.
    pub(super) fn pop_start(&mut self) -> u64 {
        let t = self.io_starts[self.io_head];
        self.io_head = (self.io_head + 1) % START_SLOTS;
        t
    }

    /// Records the latency of a base request submitted at `started`.
    pub(super) fn record_io(&self, started: u64) {
        if let Some(l) = &self.lat {
            l.record(Class::Writeback, self.ns_since(started));
        }
    }

    /// A base FLUSH submitted at `started` completed: recorded as a writeback request,
    /// and its duration paces the periodic FLUSH (`sched::FlushPacer`).
    pub(super) fn record_flush(&mut self, started: u64) {
        self.record_io(started);
        self.direct_flush.flushed(self.ns_since(started) / 1000);
    }

    fn ns_since(&self, started: u64) -> u64 {
        let dt = ffi::ticks().wrapping_sub(started);
        ((dt as u128 * self.ns_per_tick as u128) >> 32) as u64
    }

    /// "idle", "writing", "flushing" or "backoff".
    pub(super) fn state(&self) -> &'static str {
        match self.phase {
            Phase::Idle if self.backoff.ms() > 0 => "backoff",
            Phase::Idle => "idle",
            Phase::Writing => "writing",
            Phase::Flushing => "flushing",
        }
    }

    pub(super) fn backoff_ms(&self) -> u64 {
        self.backoff.ms()
    }

    /// Stops the pollers and gives back the base channel (teardown; idempotent).
    pub(super) fn stop_now(&mut self) {
        self.wb_poller.stop();
        self.tick_poller.stop();
        if !self.base_ch.is_null() {
            // SAFETY: obtained in `start` on this (app) thread; put once.
            unsafe { sys::spdk_put_io_channel(self.base_ch) };
            self.base_ch = std::ptr::null_mut();
        }
        self.bounce = None;
        self.map = None;
    }

    /// Whether writeback reads straight from the medium (else through a bounce).
    pub(super) fn direct(&self) -> bool {
        self.map.is_some()
    }
}
