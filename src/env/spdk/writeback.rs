//! Background work of a cache, as pollers on the app thread: the 100 ms engine tick,
//! writeback of dirty ksets to the base bdev, and GC.
//!
//! Writeback runs when the engine wants it (`writeback_wanted`: lazily, so overwrites
//! can supersede older dirty data first) or a drain asks for everything. It takes one
//! window of up to [`WINDOW_KSETS`](crate::engine::WINDOW_KSETS) ksets at a time
//! (`writeback_next`, sorted by address, one base FLUSH for all; two ksets after a
//! mostly superseded window where the base's FLUSH is cheap, `sched::set_window_rules`)
//! and writes its dirty extents to the base bdev
//! straight from the mapped medium (`WbMap`) or, when the mapping is not usable for
//! DMA, through a DMA bounce in waves of at most `WB_BOUNCE` bytes. Extents
//! that continue each other on the base (and, when written straight from the medium, in
//! the medium too) go out as one request of up to `MAX_IO` bytes; zero and discard
//! extents become WRITE_ZEROES, so the base reads back zeros whatever its unmap
//! semantics. Then it FLUSHes the base, and only then acknowledges the kset
//! (`writeback_done`), which lets the engine persist the advanced dirty_tail. The next
//! kset starts from the completion callback, so a backlog drains at the base's speed,
//! not the poller's period. GC runs from the same poller and after every batch, with a
//! scratch buffer kept here (nothing allocates once started). Errors back off
//! exponentially (10 ms .. 5 s) and never lose data: it stays dirty in pmem and is
//! written again.
//!
//! Every completed request earns admission credit (`writeback_progress`), which paces
//! writers above the GC watermark.
//!
//! Invariants: everything here runs on the app thread; at most one window is in flight;
//! stopping waits for the base I/O in flight before the continuation (teardown) runs.

use super::ctx::{AttachError, DrainWaiter, Node, Phase, MAX_IO, WB_BUSY_INFLIGHT, WB_INFLIGHT};
use super::ffi::{self, errlog, noticelog, DmaBuf, Poller};
use super::wbmap::WbMap;
use crate::engine::{Pmem, WbKind, WbNext};
use crate::runtime::sched::{self, TICK_PERIOD_US};
use spdk_sys as sys;
use std::ffi::c_void;

/// Bytes of dirty data in flight per wave.
const WB_BOUNCE: usize = 8 << 20;
/// Period of the writeback poller when idle (work in progress chains itself).
const WB_PERIOD_US: u64 = 1000;
/// Most windows without data acknowledged in one `start_batch` (poller budget).
const EMPTY_WINDOWS: usize = 64;
/// Most bytes recycled (moved in the medium instead of written back) in one
/// `start_batch`: about a quarter of a millisecond of copying.
const RECYCLE_PER_CALL: u64 = 2 << 20;

/// Microseconds of the SPDK tick counter: the clock the runtime rules are given.
fn now_us() -> u64 {
    ffi::ticks() / (ffi::ticks_hz() / 1_000_000).max(1)
}

fn node<'a>(p: *mut c_void) -> &'a mut Node {
    // SAFETY: every callback here gets the node pointer, alive until teardown, which
    // waits for the background to stop; app thread only, one reference at a time.
    unsafe { &mut *(p as *mut Node) }
}

/// Starts the pollers (app thread).
pub(super) fn start(n: *mut Node) -> Result<(), AttachError> {
    // SAFETY: app thread; the node was just created.
    let nd = unsafe { &mut *n };
    // SAFETY: the base descriptor is open.
    let ch = unsafe { sys::spdk_bdev_get_io_channel(nd.base_desc) };
    if ch.is_null() {
        return Err((
            -libc::ENOMEM,
            "cannot get an I/O channel of the base bdev".into(),
        ));
    }
    let bg = &mut nd.bg;
    bg.base_ch = ch;
    bg.bounce = DmaBuf::new(WB_BOUNCE);
    if bg.bounce.is_none() {
        bg.stop_now();
        return Err((
            -libc::ENOMEM,
            format!("cannot allocate a {} MiB writeback buffer", WB_BOUNCE >> 20),
        ));
    }
    let pm = nd.shared.engine.pmem();
    bg.map = WbMap::new(&nd.shared.name, pm.path(), pm.size());
    bg.gc_buf = vec![0; nd.shared.engine.geometry().kset_max_size()];
    bg.lat = Some(nd.shared.engine.latency().register());
    bg.ns_per_tick = ((1_000_000_000u128 << 32) / ffi::ticks_hz() as u128) as u64;
    // SAFETY: getter on an open bdev.
    bg.base_flush =
        unsafe { sys::spdk_bdev_io_type_supported(nd.base_bdev, sys::SPDK_BDEV_IO_TYPE_FLUSH) };
    // SAFETY: the node outlives the pollers (stopped in stop/stop_now before it is freed).
    unsafe {
        bg.wb_poller = Poller::start(wb_poll, n.cast(), WB_PERIOD_US, c"pcache_writeback");
        bg.tick_poller = Poller::start(tick_poll, n.cast(), TICK_PERIOD_US, c"pcache_tick");
    }
    Ok(())
}

/// Stops the background and runs `then` once no base I/O is in flight.
pub(super) fn stop(n: *mut Node, then: Box<dyn FnOnce()>) {
    let bg = &mut node(n.cast()).bg;
    bg.stopping = true;
    bg.wb_poller.stop();
    bg.tick_poller.stop();
    for w in bg.drain.waiters.drain(..) {
        w(Err("the cache is going away".into()));
    }
    bg.drain.active = false;
    if bg.pending == 0 && !bg.waiting && !bg.chained {
        bg.phase = Phase::Idle;
        then();
    } else {
        bg.on_stop = Some(then);
    }
}

/// Runs the stop continuation once the last I/O came back.
fn stopped(n: *mut Node) -> bool {
    let bg = &mut node(n.cast()).bg;
    if !bg.stopping {
        return false;
    }
    if bg.pending == 0 && !bg.waiting && !bg.chained {
        bg.phase = Phase::Idle;
        if let Some(f) = bg.on_stop.take() {
            f();
        }
    }
    true
}

/// Starts writing back everything dirty now (`bdev_pcache_flush`).
pub(super) fn start_drain(n: *mut Node, waiter: Option<DrainWaiter>) {
    let nd = node(n.cast());
    let e = &nd.shared.engine;
    let _ = e.flush();
    let bg = &mut nd.bg;
    if !bg.drain.active {
        bg.drain.active = true;
        bg.drain.total_bytes = e.dirty_bytes();
    }
    // A drain is what the user waits for: it writes back even while backing off
    // (`sched::writeback_due`).
    if let Some(w) = waiter {
        bg.drain.waiters.push(w);
    }
    check_drain(n);
}

fn check_drain(n: *mut Node) {
    let nd = node(n.cast());
    let bg = &mut nd.bg;
    if !bg.drain.active {
        return;
    }
    let e = &nd.shared.engine;
    let result = if let Some(m) = e.writeback_stopped() {
        Some(Err(format!("writeback stopped: {m}")))
    } else if bg.phase == Phase::Idle && e.dirty_bytes() == 0 {
        Some(Ok(()))
    } else {
        None
    };
    if let Some(r) = result {
        bg.drain.active = false;
        if r.is_ok() {
            bg.drain.completed += 1;
            noticelog!("{}: flush complete, no dirty data left", nd.shared.name);
        }
        for w in bg.drain.waiters.drain(..) {
            w(r.clone());
        }
    }
}

extern "C" fn tick_poll(arg: *mut c_void) -> i32 {
    node(arg).shared.engine.tick();
    ffi::BUSY
}

extern "C" fn wb_poll(arg: *mut c_void) -> i32 {
    let n = arg as *mut Node;
    let nd = node(arg);
    if nd.bg.stopping {
        return ffi::IDLE;
    }
    let e = &nd.shared.engine;
    sched::before_round(e);
    let mut worked = false;
    // The clock is read only while backing off.
    if nd.bg.phase == Phase::Idle
        && sched::writeback_due(e, nd.bg.drain.active, &nd.bg.backoff, now_us)
    {
        worked |= start_batch(n);
    }
    if nd.bg.phase == Phase::Idle && e.direct_flush_needed().is_some() {
        worked |= flush_for_direct(n);
    }
    worked |= gc(n);
    check_drain(n);
    if worked {
        ffi::BUSY
    } else {
        ffi::IDLE
    }
}

/// Direct writes (cache modes, cutoff) and unsynced keys (write-throughs) not yet
/// covered by a base FLUSH: flush the base for them, at the period `sched::FlushPacer`
/// sets from what FLUSHes cost (5 ms to 2 s), while no writeback window is in flight
/// (its own FLUSHes cover them too; a write-through stream's windows are empty and
/// acknowledged at once). A base without a volatile cache has them durable already.
fn flush_for_direct(n: *mut Node) -> bool {
    let nd = node(n.cast());
    let e = &nd.shared.engine;
    let bg = &mut nd.bg;
    if !bg.base_flush {
        e.direct_flushed(e.direct_mark());
        return false;
    }
    if sched::direct_flush_due(e, &mut bg.direct_flush, now_us()).is_none() {
        return false;
    }
    let rc = submit_base_flush(n, direct_flush_done);
    if rc != 0 {
        node(n.cast()).bg.phase = Phase::Idle;
    }
    rc == 0
}

extern "C" fn direct_flush_done(child: *mut sys::spdk_bdev_io, ok: bool, arg: *mut c_void) {
    // SAFETY: the base bdev_io is ours to free in its completion callback.
    unsafe { sys::spdk_bdev_free_io(child) };
    let n = arg as *mut Node;
    let bg = &mut node(arg).bg;
    let started = bg.pop_start();
    bg.pending -= 1;
    bg.phase = Phase::Idle;
    let mark = bg.direct_mark;
    if ok {
        bg.record_flush(started);
        node(arg).shared.engine.direct_flushed(mark);
    }
    stopped(n);
}

fn gc(n: *mut Node) -> bool {
    let nd = node(n.cast());
    let e = &nd.shared.engine;
    e.gc_wanted() && e.gc(&mut nd.bg.gc_buf).ksets > 0
}

/// Takes the next dirty kset, if any and if writeback is due, and starts writing it.
///
/// A window that writes nothing (its ksets hold only clean keys and the tombstones of
/// direct writes) has nothing to make durable: it is acknowledged at once, without a
/// base FLUSH, and the next one taken, up to EMPTY_WINDOWS per call, or until windows
/// recycled RECYCLE_PER_CALL bytes (copies in the medium); after recycled ones the next
/// call comes in a message (`chain`), not at the next poll. In a loop, not through
/// batch_done: with no I/O to complete, that would recurse once per window.
fn start_batch(n: *mut Node) -> bool {
    let mut recycled = 0;
    for _ in 0..EMPTY_WINDOWS {
        let nd = node(n.cast());
        if !nd.bg.drain.active && !nd.shared.engine.writeback_wanted() {
            return false;
        }
        let bg = &mut nd.bg;
        // Recycling over a slow FLUSH (never in a drain), small windows after sparse
        // ones over a cheap one.
        sched::set_window_rules(&mut bg.batch, bg.drain.active, &bg.direct_flush);
        let next = nd.shared.engine.writeback_next(&mut bg.batch);
        if next == WbNext::Ready && bg.batch.items.is_empty() {
            nd.shared.engine.writeback_done(&bg.batch, true);
            bg.batches += 1;
            recycled += bg.batch.recycled();
            if recycled >= RECYCLE_PER_CALL {
                chain(n);
                return true;
            }
            continue;
        }
        return start_window(n, next);
    }
    if recycled > 0 {
        chain(n);
    }
    true // more may be due: the next poll goes on
}

/// Goes on taking windows in a message to this thread, soon after the current poll
/// rather than at the next one: windows that recycled their live data have no I/O whose
/// completion would take the next one, and writers may be paced by their progress.
fn chain(n: *mut Node) {
    let bg = &mut node(n.cast()).bg;
    if bg.chained {
        return;
    }
    // SAFETY: the message runs on this thread; the node outlives it (`stop` and
    // `stopped` wait for `chained` to clear before teardown goes on).
    let rc = unsafe { sys::spdk_thread_send_msg(ffi::current_thread(), Some(chained), n.cast()) };
    // No message (its pool is empty): the next poll goes on instead.
    bg.chained = rc == 0;
}

extern "C" fn chained(arg: *mut c_void) {
    let n = arg as *mut Node;
    node(arg).bg.chained = false;
    if stopped(n) {
        return;
    }
    if node(arg).bg.phase == Phase::Idle {
        start_batch(n);
    }
}

/// Starts writing the window `writeback_next` just returned (`next`).
fn start_window(n: *mut Node, next: WbNext) -> bool {
    let nd = node(n.cast());
    let bg = &mut nd.bg;
    match next {
        WbNext::Ready => {
            bg.phase = Phase::Writing;
            bg.item = 0;
            bg.item_off = 0;
            bg.failed = false;
            bg.why = "";
            bg.bounce_used = 0;
            submit_wave(n);
            true
        }
        WbNext::Idle => false,
        WbNext::Stopped(m) => {
            if bg.last_error.as_deref() != Some(m.as_str()) {
                errlog!("{}: writeback stopped: {m}", nd.shared.name);
                bg.last_error = Some(m);
            }
            false
        }
    }
}

/// Submits the batch's next items until the bounce is full or all are out.
fn submit_wave(n: *mut Node) {
    let nd = node(n.cast());
    let (shared, bg) = (&nd.shared, &mut nd.bg);
    let bs = shared.block_size as u64;
    let desc = nd.base_desc;
    bg.waiting = false;
    if bg.pending == 0 {
        bg.bounce_used = 0;
    }
    let now = ffi::ticks();
    // Read misses at the base go first: few writes in flight while there are any,
    // unless writers wait on writeback (`sched::writeback_depth`).
    let fg = shared.fg_reads.load(std::sync::atomic::Ordering::Relaxed);
    let cap = sched::writeback_depth(
        &shared.engine,
        fg,
        WB_BUSY_INFLIGHT as usize,
        WB_INFLIGHT as usize,
    ) as u32;
    while bg.item < bg.batch.items.len() && bg.pending < cap {
        let it = bg.batch.items[bg.item];
        let rest = it.len as u64 - bg.item_off;
        let at = it.off + bg.item_off;
        let (rc, len, used) = match it.kind {
            WbKind::Data { pmem_off } if bg.map.is_some() => {
                // A whole item starts the request: the ones continuing it ride along.
                let len = if bg.item_off == 0 && rest <= MAX_IO as u64 {
                    sched::coalesce(&bg.batch.items, bg.item, MAX_IO as u64, true)
                } else {
                    rest.min(MAX_IO as u64)
                };
                let src = bg
                    .map
                    .as_ref()
                    .and_then(|m| m.ptr(pmem_off + bg.item_off, len));
                let Some(src) = src else {
                    bg.why = "the medium range is not mapped for DMA";
                    bg.failed = true;
                    break;
                };
                // SAFETY: `src..src + len` is medium data of this batch, which the engine
                // keeps unchanged until the batch is acknowledged; the base only reads it.
                let rc = unsafe {
                    sys::spdk_bdev_write_blocks(
                        desc,
                        bg.base_ch,
                        src.cast(),
                        at / bs,
                        len / bs,
                        Some(wb_io_done),
                        n.cast(),
                    )
                };
                (rc, len, 0)
            }
            WbKind::Data { pmem_off } => {
                let Some(buf) = bg.bounce.as_mut() else {
                    bg.failed = true;
                    break;
                };
                let room = (buf.len() - bg.bounce_used) as u64;
                let max = room.min(MAX_IO as u64);
                let len = if bg.item_off == 0 && rest <= max {
                    sched::coalesce(&bg.batch.items, bg.item, max, false)
                } else {
                    rest.min(max)
                };
                if len == 0 {
                    break;
                }
                let dst = &mut buf.as_mut_slice()[bg.bounce_used..bg.bounce_used + len as usize];
                if bg.item_off == 0 && rest <= max {
                    // Gather the coalesced items (base-contiguous, `len` bytes in all).
                    let mut done = 0usize;
                    for x in &bg.batch.items[bg.item..] {
                        if done == len as usize {
                            break;
                        }
                        let WbKind::Data { pmem_off } = x.kind else {
                            break;
                        };
                        let l = x.len as usize;
                        shared
                            .engine
                            .pmem()
                            .read(pmem_off, &mut dst[done..done + l]);
                        done += l;
                    }
                } else {
                    shared.engine.pmem().read(pmem_off + bg.item_off, dst);
                }
                // SAFETY: the bounce region stays untouched until this write completes (the
                // wave only moves forward in the bounce); channel of this thread.
                let rc = unsafe {
                    sys::spdk_bdev_write_blocks(
                        desc,
                        bg.base_ch,
                        dst.as_mut_ptr().cast(),
                        at / bs,
                        len / bs,
                        Some(wb_io_done),
                        n.cast(),
                    )
                };
                (rc, len, len as usize)
            }
            WbKind::Zero | WbKind::Discard => {
                // Zero extents are never split: the range is the item and any zero items
                // continuing it.
                let len = if bg.item_off == 0 {
                    sched::coalesce(&bg.batch.items, bg.item, u64::MAX, false)
                } else {
                    rest
                };
                // SAFETY: plain block-range request on our base channel.
                let rc = unsafe {
                    sys::spdk_bdev_write_zeroes_blocks(
                        desc,
                        bg.base_ch,
                        at / bs,
                        len / bs,
                        Some(wb_io_done),
                        n.cast(),
                    )
                };
                (rc, len, 0)
            }
        };
        if rc == -libc::ENOMEM {
            bg.waiting = true;
            bg.wait.bdev = nd.base_bdev;
            bg.wait.cb_fn = Some(wb_retry);
            bg.wait.cb_arg = n.cast();
            // SAFETY: the entry lives in the node until it fires (stop waits for it).
            unsafe { sys::spdk_bdev_queue_io_wait(nd.base_bdev, bg.base_ch, &mut bg.wait) };
            return;
        }
        if rc != 0 {
            bg.why = "could not submit a write to the base bdev";
            bg.failed = true;
            break;
        }
        bg.push_start(now);
        bg.pending += 1;
        bg.bounce_used += used;
        // Step over every item the request covered (one, part of one, or coalesced ones).
        bg.item_off += len;
        while bg.item < bg.batch.items.len() && bg.item_off >= bg.batch.items[bg.item].len as u64 {
            bg.item_off -= bg.batch.items[bg.item].len as u64;
            bg.item += 1;
        }
    }
    if bg.pending == 0 {
        wave_done(n);
    }
}

extern "C" fn wb_retry(arg: *mut c_void) {
    let n = arg as *mut Node;
    node(arg).bg.waiting = false;
    if stopped(n) {
        return;
    }
    submit_wave(n);
}

extern "C" fn wb_io_done(child: *mut sys::spdk_bdev_io, ok: bool, arg: *mut c_void) {
    // SAFETY: the base bdev_io is ours to free in its completion callback.
    unsafe { sys::spdk_bdev_free_io(child) };
    let n = arg as *mut Node;
    let nd = node(arg);
    let bg = &mut nd.bg;
    bg.pending -= 1;
    bg.failed |= !ok;
    let started = bg.pop_start();
    if ok {
        bg.record_io(started);
        // Writers above the GC watermark are admitted against this credit: earn it per
        // request, not per window, so they move on evenly.
        let step = bg.batch.retire_bytes() / bg.batch.items.len().max(1) as u64;
        nd.shared.engine.writeback_progress(&mut bg.batch, step);
    } else {
        bg.why = "the base bdev failed a write";
    }
    if bg.pending == 0 && !bg.waiting {
        if stopped(n) {
            return;
        }
        wave_done(n);
    } else if !bg.waiting && !bg.failed && !bg.stopping && bg.map.is_some() {
        // Straight from the medium there is no bounce to recycle: keep the window's
        // requests flowing, up to WB_INFLIGHT.
        if bg.item < bg.batch.items.len() {
            submit_wave(n);
        }
    }
}

/// Every request of a wave came back: next wave, or flush the base, or give up.
fn wave_done(n: *mut Node) {
    let nd = node(n.cast());
    let bg = &mut nd.bg;
    if bg.failed {
        batch_done(n, false);
        return;
    }
    if bg.item < bg.batch.items.len() {
        submit_wave(n);
        return;
    }
    if !bg.base_flush {
        batch_done(n, true);
        return;
    }
    if submit_base_flush(n, wb_flush_done) != 0 {
        node(n.cast()).bg.why = "could not submit a FLUSH to the base bdev";
        batch_done(n, false);
    }
}

/// Flushes the whole base on the writeback channel (phase Flushing, counted in
/// `pending`), completing in `done` with the node; takes `direct_mark` first: direct
/// writes completed before this FLUSH are durable after it too. Returns the submit
/// status.
fn submit_base_flush(
    n: *mut Node,
    done: extern "C" fn(*mut sys::spdk_bdev_io, bool, *mut c_void),
) -> i32 {
    let nd = node(n.cast());
    let bg = &mut nd.bg;
    bg.phase = Phase::Flushing;
    bg.direct_mark = nd.shared.engine.direct_mark();
    let now = ffi::ticks();
    // SAFETY: FLUSH of the whole base on our channel; completion comes back to `done`.
    let rc = unsafe {
        sys::spdk_bdev_flush_blocks(
            nd.base_desc,
            bg.base_ch,
            0,
            sys::spdk_bdev_get_num_blocks(nd.base_bdev),
            Some(done),
            n.cast(),
        )
    };
    if rc == 0 {
        bg.push_start(now);
        bg.pending += 1;
    }
    rc
}

extern "C" fn wb_flush_done(child: *mut sys::spdk_bdev_io, ok: bool, arg: *mut c_void) {
    // SAFETY: the base bdev_io is ours to free in its completion callback.
    unsafe { sys::spdk_bdev_free_io(child) };
    let n = arg as *mut Node;
    let bg = &mut node(arg).bg;
    let started = bg.pop_start();
    bg.pending -= 1;
    if ok {
        bg.record_flush(started);
        let mark = bg.direct_mark;
        node(arg).shared.engine.direct_flushed(mark);
    } else {
        bg.why = "the base bdev failed a FLUSH";
    }
    batch_done(n, ok);
}

/// The kset is on the base and flushed (or failed): acknowledge, then go on.
fn batch_done(n: *mut Node, ok: bool) {
    let nd = node(n.cast());
    let e = &nd.shared.engine;
    let bg = &mut nd.bg;
    if ok {
        e.writeback_done(&bg.batch, true);
    } else {
        let backoff = bg.backoff.failed(now_us());
        let why = if bg.why.is_empty() {
            "the base bdev failed a request"
        } else {
            bg.why
        };
        e.writeback_failed(
            &bg.batch,
            &format!(
                "{why} (base bdev {}); retrying in {backoff} ms, the data stays dirty",
                nd.base_name
            ),
        );
    }
    bg.phase = Phase::Idle;
    if ok {
        bg.batches += 1;
        if bg.backoff.succeeded() {
            noticelog!("{}: writeback recovered", nd.shared.name);
        }
    } else {
        errlog!(
            "{}: writeback to base bdev {} failed; retrying in {} ms (the data stays dirty in pmem)",
            nd.shared.name,
            nd.base_name,
            bg.backoff.ms()
        );
    }
    if stopped(n) {
        return;
    }
    gc(n);
    check_drain(n);
    if ok {
        start_batch(n);
    }
}
