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
//! the message hop SPDK needs for a completion inside `submit_request`. Plain cache
//! writes are queued the same way and written first, as one `Engine::write_many`: their
//! data streams into the medium with one store fence for the batch.
//!
//! Invariants: the context lives inside SPDK's channel allocation from `create_cb` to
//! `destroy_cb` and is only touched on that channel's thread; every request that enters
//! `retry` or `reads` leaves it completed; `destroy_cb` runs when no request is in
//! flight. While a poller of ours holds the context (`in_poll`), completions are
//! collected in `deferred` and delivered after it let go of it (`deferring`):
//! a completion callback may submit a new request, which takes the context again.
//! Requests that `submit_request` finishes at once (writes into the cache) are deferred
//! the same way and delivered by the next `read_poll`, instead of by the thread message
//! the bdev layer sends for a completion inside its submit call.

use super::ctx::{deferring, finish, take_deferred, ChannelCtx, Flusher, Shared, MAX_IO};
use super::ffi::{self, Poller};
use super::io;
use crate::engine::Channel;
use spdk_sys as sys;
use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::Arc;

/// How often queued requests are retried while the cache is full.
const RETRY_PERIOD_US: u64 = 50;
/// Room reserved for a reactor iteration's worth of reads and completions (more only
/// grows the vectors).
const BATCH_CAPACITY: usize = 256;

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
            read: Channel::default(),
            reading: Vec::new(),
            gather: vec![0; MAX_IO as usize],
            bounces: Vec::new(),
            retry: VecDeque::new(),
            retry_poller: Poller::none(),
            reads: Vec::with_capacity(BATCH_CAPACITY),
            batch: Vec::with_capacity(BATCH_CAPACITY),
            writes: Vec::with_capacity(io::WRITE_BATCH),
            write_out: Vec::with_capacity(io::WRITE_BATCH),
            write_batch: Vec::with_capacity(io::WRITE_BATCH),
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
            streamed: Default::default(),
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
    for bio in std::mem::take(&mut c.writes) {
        // SAFETY: queued writes are live and uncompleted.
        unsafe { finish(&mut c, bio, ffi::STATUS_FAILED) };
    }
    for bio in std::mem::take(&mut c.reads) {
        // SAFETY: queued reads are live and uncompleted.
        unsafe { finish(&mut c, bio, ffi::STATUS_FAILED) };
    }
    // No request can be queued here (the channel is only released when idle); fail any
    // anyway rather than leak them.
    while let Some(bio) = c.retry.pop_front() {
        c.shared.engine.waiting_dec();
        // SAFETY: queued requests are live and uncompleted.
        unsafe { finish(&mut c, bio, ffi::STATUS_FAILED) };
    }
    let e = &c.shared.engine;
    e.latency().retire(&c.lat);
    e.release_channel(&mut c.main);
    e.release_channel(&mut c.read);
    for mut r in std::mem::take(&mut c.reading) {
        e.release_channel(&mut r);
    }
    // SAFETY: obtained in create_cb on this thread; put once.
    unsafe { sys::spdk_put_io_channel(c.base_ch) };
    for d in take_deferred(&mut c) {
        // SAFETY: finished (IoCtx dropped) but not yet completed, on this thread.
        unsafe { ffi::complete(d.bio, d.status) };
    }
}

/// Serves the writes and reads queued since the last call (see the module comment).
extern "C" fn read_poll(arg: *mut c_void) -> i32 {
    // SAFETY: `arg` is this thread's live channel context; this reference ends here.
    let c = unsafe { &*(arg as *const ChannelCtx) };
    if c.reads.is_empty() && c.deferred.is_empty() && c.writes.is_empty() {
        return ffi::IDLE;
    }
    // SAFETY: as above, and no reference to the context is alive.
    unsafe {
        deferring(arg, |c| {
            io::serve_writes(c);
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
