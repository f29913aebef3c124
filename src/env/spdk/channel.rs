//! The per-thread context of a pcache io_channel: engine channels, the base bdev's
//! channel, bounce buffers and the FIFO of requests waiting for cache space.
//!
//! The engine keeps a read's plan in the engine `Channel` from `read` until `fill`, so a
//! read waiting for the base bdev needs a channel of its own, borrowed from `reading`.
//! Writes use `main`, and so does every read's fill (`Engine::fill_with`): one open
//! segment per thread however many reads are in flight, and every miss may be cached.
//!
//! Reads with a buffer are queued at submit (after a prefetch of their index line) and
//! served by `read_poll`, in batches, once per reactor iteration: the index lines of a
//! whole batch are then in cache, and the batch completes from poller context, without
//! the message hop SPDK needs for a completion inside `submit_request`.
//!
//! Invariants: the context lives inside SPDK's channel allocation from `create_cb` to
//! `destroy_cb` and is only touched on that channel's thread; every request that enters
//! `retry` or `reads` leaves it completed; `destroy_cb` runs when no request is in
//! flight. While a poller of ours holds the context (`in_poll`), completions are
//! collected in `deferred` and delivered after it let go of it (`deferring`):
//! a completion callback may submit a new request, which takes the context again.

use super::cache::{Shared, MAX_IO};
use super::direct::Flusher;
use super::ffi::{self, DmaBuf, Poller};
use super::io;
use crate::engine::latency::LatencySet;
use crate::engine::Channel;
use spdk_sys as sys;
use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::Arc;

/// Size SPDK allocates per channel for our context.
pub(super) const CTX_SIZE: u32 = std::mem::size_of::<ChannelCtx>() as u32;
/// How often queued requests are retried while the cache is full.
const RETRY_PERIOD_US: u64 = 50;
/// Room reserved for a reactor iteration's worth of reads and completions (more only
/// grows the vectors).
const BATCH_CAPACITY: usize = 256;

pub(super) struct ChannelCtx {
    pub shared: Arc<Shared>,
    pub base_ch: *mut sys::spdk_io_channel,
    /// Writes, flushes and zeroes.
    pub main: Channel,
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
    batch: Vec<*mut sys::spdk_bdev_io>,
    pub read_poller: Poller,
    /// Set while a poller holds the context: `io::finish` then defers the completion.
    pub in_poll: bool,
    pub deferred: Vec<(*mut sys::spdk_bdev_io, i32)>,
    /// Requests accepted and not completed yet.
    pub inflight: u64,
    /// This channel's latency histograms (only this thread records into them).
    pub lat: Arc<LatencySet>,
    /// Nanoseconds per SPDK tick, as a 32.32 fixed-point factor.
    ns_per_tick: u64,
    /// The group FLUSH of the base bdev for direct requests (direct.rs).
    pub flush: Flusher,
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

/// The context of an io_channel of ours.
///
/// # Safety
/// `ch` must be a live io_channel of a pcache io_device, used on its own thread, and no
/// other reference to its context may be alive.
pub(super) unsafe fn ctx_of<'a>(ch: *mut sys::spdk_io_channel) -> &'a mut ChannelCtx {
    // SAFETY: forwarded contract; create_cb initialised a ChannelCtx at this address.
    unsafe { &mut *(sys::spdk_sys_io_channel_get_ctx(ch) as *mut ChannelCtx) }
}

pub(super) extern "C" fn create_cb(io_device: *mut c_void, buf: *mut c_void) -> i32 {
    let p = io_device as *const Shared;
    // SAFETY: the io_device is an Arc'd Shared kept alive by its node; taking one more
    // strong reference for the channel keeps it alive until destroy_cb.
    let shared = unsafe {
        Arc::increment_strong_count(p);
        Arc::from_raw(p)
    };
    // SAFETY: the base descriptor stays open while our io_device is registered.
    let base_ch = unsafe { sys::spdk_bdev_get_io_channel(shared.base_desc.0) };
    if base_ch.is_null() {
        return -libc::ENOMEM;
    }
    let ctx = buf as *mut ChannelCtx;
    assert_eq!(
        ctx as usize % std::mem::align_of::<ChannelCtx>(),
        0,
        "SPDK channel context misaligned"
    );
    // SAFETY: SPDK allocated CTX_SIZE bytes for us at `buf` (alignment checked above);
    // they are uninitialised, so write without dropping.
    unsafe {
        ctx.write(ChannelCtx {
            base_ch,
            main: Channel::default(),
            reading: Vec::new(),
            gather: vec![0; MAX_IO as usize],
            bounces: Vec::new(),
            retry: VecDeque::new(),
            retry_poller: Poller::none(),
            reads: Vec::with_capacity(BATCH_CAPACITY),
            batch: Vec::with_capacity(BATCH_CAPACITY),
            read_poller: Poller::none(),
            in_poll: false,
            deferred: Vec::with_capacity(BATCH_CAPACITY),
            inflight: 0,
            lat: shared.engine.latency().register(),
            ns_per_tick: ((1_000_000_000u128 << 32) / ffi::ticks_hz() as u128) as u64,
            // SAFETY: getter on the open base bdev.
            flush: Flusher::new(sys::spdk_bdev_io_type_supported(
                shared.base_bdev,
                sys::SPDK_BDEV_IO_TYPE_FLUSH,
            )),
            shared,
        });
        (*ctx).retry_poller =
            Poller::start(retry_poll, ctx.cast(), RETRY_PERIOD_US, c"pcache_retry");
        (*ctx).read_poller = Poller::start(read_poll, ctx.cast(), 0, c"pcache_read");
    }
    0
}

pub(super) extern "C" fn destroy_cb(_io_device: *mut c_void, buf: *mut c_void) {
    let ctx = buf as *mut ChannelCtx;
    // SAFETY: create_cb initialised this context; destroy_cb runs once, on its thread,
    // after which SPDK frees the memory, so we move the value out to drop it.
    let mut c = unsafe { ctx.read() };
    c.retry_poller.stop();
    c.read_poller.stop();
    // As below for `retry`: nothing should be queued, but never leak a request.
    c.in_poll = true;
    for bio in std::mem::take(&mut c.reads) {
        // SAFETY: queued reads are live and uncompleted.
        unsafe { io::finish(&mut c, bio, ffi::STATUS_FAILED) };
    }
    // No request can be queued here (the channel is only released when idle); fail any
    // anyway rather than leak them.
    while let Some(bio) = c.retry.pop_front() {
        c.shared.engine.waiting_dec();
        // SAFETY: queued requests are live and uncompleted.
        unsafe { io::finish(&mut c, bio, ffi::STATUS_FAILED) };
    }
    let e = &c.shared.engine;
    e.latency().retire(&c.lat);
    e.release_channel(&mut c.main);
    // SAFETY: obtained in create_cb on this thread; put once.
    unsafe { sys::spdk_put_io_channel(c.base_ch) };
    for (bio, st) in std::mem::take(&mut c.deferred) {
        // SAFETY: finished (IoCtx dropped) but not yet completed, on this thread.
        unsafe { ffi::complete(bio, st) };
    }
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
        c.in_poll = true;
        let r = f(c);
        c.in_poll = false;
        (r, std::mem::take(&mut c.deferred))
    };
    for (bio, st) in done.drain(..) {
        // SAFETY: finished (IoCtx dropped) but not yet completed, on this thread.
        unsafe { ffi::complete(bio, st) };
    }
    // SAFETY: as above; the callbacks are done and no other reference is alive. They
    // ran with in_poll false, so nothing should have been deferred meanwhile; keep
    // whatever was anyway, in the larger allocation, for the next poll.
    let c = unsafe { &mut *(arg as *mut ChannelCtx) };
    done.append(&mut c.deferred);
    c.deferred = done;
    r
}

/// Serves the reads queued since the last call (see the module comment).
extern "C" fn read_poll(arg: *mut c_void) -> i32 {
    // SAFETY: `arg` is this thread's live channel context; this reference ends here.
    let c = unsafe { &*(arg as *const ChannelCtx) };
    if c.reads.is_empty() && c.deferred.is_empty() {
        return ffi::IDLE;
    }
    // SAFETY: as above, and no reference to the context is alive.
    unsafe {
        deferring(arg, |c| {
            let mut batch = std::mem::take(&mut c.batch);
            std::mem::swap(&mut batch, &mut c.reads);
            for bio in batch.drain(..) {
                // SAFETY: queued reads are live and uncompleted, on this thread.
                io::serve_read(c, bio);
            }
            c.batch = batch;
        })
    };
    ffi::BUSY
}

/// Retries the queued requests oldest first while they find space; fails them all once
/// the base bdev is gone.
extern "C" fn retry_poll(arg: *mut c_void) -> i32 {
    // SAFETY: `arg` is this thread's live channel context; this reference ends here.
    if unsafe { &*(arg as *const ChannelCtx) }.retry.is_empty() {
        return ffi::IDLE;
    }
    // SAFETY: as above, and no reference to the context is alive.
    let progressed = unsafe {
        deferring(arg, |c| {
            let mut progressed = false;
            while let Some(&bio) = c.retry.front() {
                // SAFETY: queued requests are live and uncompleted; the head is retried
                // in order.
                if !io::retry_ordered(c, bio) {
                    break;
                }
                c.retry.pop_front();
                c.shared.engine.waiting_dec();
                progressed = true;
            }
            progressed
        })
    };
    if progressed {
        ffi::BUSY
    } else {
        ffi::IDLE
    }
}
