//! The request paths of a pcache bdev, run on the submitting thread.
//!
//! * READ: the engine copies hits from pmem straight into the request's buffer (a
//!   bounce only when it has several iovecs); misses are read from the base bdev into the
//!   same buffer, then `Engine::fill` caches them (when the read channel may).
//! * WRITE / FLUSH / UNMAP / WRITE_ZEROES are *ordered*: while any of them waits for
//!   cache space (`IoError::Busy`), later ones queue behind it in the channel's FIFO,
//!   retried oldest first by the channel's poller, so a retry never reorders writes.
//!   A write completes once `Engine::write` has made it durable in pmem; FUA (CDW12 bit
//!   30 from NVMe-oF) also persists its key.
//! * Reads with a buffer wait for the channel's read poller (see `channel`), which
//!   serves them in batches.
//! * Outside write-back (or past the sequential cutoff) WRITE, WRITE_ZEROES and UNMAP
//!   may go to the base bdev instead (`direct.rs`), and a FLUSH then also flushes it.
//! * RESET completes once no request is in flight on any channel of the cache.
//! * A base bdev out of request objects (-ENOMEM) is waited for with
//!   `spdk_bdev_queue_io_wait`.
//!
//! Invariants: `IoCtx` lives in the bdev_io's driver_ctx from `submit_request` until
//! `finish`, which drops it and completes the bdev_io exactly once, on its thread; a
//! read's engine channel is returned to the pool before the request completes.

use super::ctx::{chan_of, ctx_of, engine_why, fail_why, finish, io_ctx, ChannelCtx, IoCtx};
use super::direct;
use super::ffi::{self, DmaBuf, IoDesc};
use crate::engine::latency::Class;
use crate::engine::IoError;
use crate::runtime::sched;
use spdk_sys as sys;
use std::ffi::c_void;
use std::sync::atomic::Ordering::Relaxed;

fn status(r: Result<(), IoError>) -> i32 {
    match r {
        Ok(()) => ffi::STATUS_SUCCESS,
        Err(_) => ffi::STATUS_FAILED,
    }
}

pub(super) extern "C" fn submit_request(
    ch: *mut sys::spdk_io_channel,
    bio: *mut sys::spdk_bdev_io,
) {
    // SAFETY: SPDK submits on one of our live channels, on its thread.
    let c = unsafe { ctx_of(ch) };
    // SAFETY: driver_ctx has room for an IoCtx (get_ctx_size) and is uninitialised here.
    unsafe { ((*bio).driver_ctx.as_mut_ptr() as *mut IoCtx).write(IoCtx::new()) };
    c.inflight += 1;
    // Whatever completes inside this call is delivered by the read poller (see
    // `ChannelCtx::in_poll`). No poller holds the context here: SPDK calls us from
    // its submit path, never from inside one of our pollers' work.
    let was = std::mem::replace(&mut c.in_poll, true);
    dispatch(c, bio);
    c.in_poll = was;
}

fn dispatch(c: &mut ChannelCtx, bio: *mut sys::spdk_bdev_io) {
    // SAFETY: `bio` is live and ours until completed.
    let d = unsafe { ffi::io_desc(bio) };
    if c.shared.removed.load(Relaxed) {
        fail_why(bio, "the base bdev was removed");
        // SAFETY: live, uncompleted request.
        unsafe { finish(c, bio, ffi::STATUS_FAILED) };
        return;
    }
    match d.ty {
        sys::SPDK_BDEV_IO_TYPE_READ => read(c, bio, &d),
        sys::SPDK_BDEV_IO_TYPE_WRITE
        | sys::SPDK_BDEV_IO_TYPE_FLUSH
        | sys::SPDK_BDEV_IO_TYPE_UNMAP
        | sys::SPDK_BDEV_IO_TYPE_WRITE_ZEROES => {
            io_ctx(bio).class = match d.ty {
                sys::SPDK_BDEV_IO_TYPE_WRITE => Some(Class::Write),
                sys::SPDK_BDEV_IO_TYPE_FLUSH => Some(Class::Flush),
                _ => None,
            };
            if !c.retry.is_empty() {
                queue(c, bio);
            } else if !direct::try_start(c, bio, &d, false) {
                let batched = batchable(c, &d);
                if !batched || c.writes.len() >= WRITE_BATCH {
                    // Anything else runs after the writes queued before it.
                    serve_writes(c);
                }
                if !c.retry.is_empty() {
                    queue(c, bio); // behind writes the batch found no room for
                } else if batched {
                    prefetch_index(c, d.offset_blocks * c.shared.block_size as u64);
                    c.writes.push(bio);
                } else {
                    match ordered(c, &d) {
                        Err(IoError::Busy) => queue(c, bio),
                        // SAFETY: live, uncompleted request.
                        r => unsafe { finish_ordered(c, bio, r) },
                    }
                }
            }
        }
        sys::SPDK_BDEV_IO_TYPE_RESET => reset(bio),
        _ => {
            fail_why(bio, "unsupported request type");
            // SAFETY: live, uncompleted request; io_type_supported excludes anything else.
            unsafe { finish(c, bio, ffi::STATUS_FAILED) }
        }
    }
}

/// Completes an ordered request with the engine's result.
///
/// # Safety
/// As `finish`.
unsafe fn finish_ordered(c: &mut ChannelCtx, bio: *mut sys::spdk_bdev_io, r: Result<(), IoError>) {
    if let Err(e) = r {
        fail_why(bio, engine_why(e));
    } else if io_ctx(bio).class == Some(Class::Flush) && direct::flush_owed(c, bio) {
        return; // completes after the base FLUSH that direct writes need
    }
    // SAFETY: forwarded contract.
    unsafe { finish(c, bio, status(r)) };
}

fn queue(c: &mut ChannelCtx, bio: *mut sys::spdk_bdev_io) {
    c.retry.push_back(bio);
    c.shared.engine.waiting_inc();
}

/// Retries the queued request `bio` (the head of the FIFO). True when it completed.
///
/// # Safety
/// `bio` must be a live, queued request of this channel.
pub(super) unsafe fn retry_ordered(c: &mut ChannelCtx, bio: *mut sys::spdk_bdev_io) -> bool {
    if c.shared.removed.load(Relaxed) {
        fail_why(bio, "the base bdev was removed");
        // SAFETY: forwarded contract.
        unsafe { finish(c, bio, ffi::STATUS_FAILED) };
        return true;
    }
    // SAFETY: forwarded contract.
    let d = unsafe { ffi::io_desc(bio) };
    // A request queued behind others was never routed: its first try routes it.
    if direct::try_start(c, bio, &d, io_ctx(bio).routed) {
        return true; // left the queue for the base bdev
    }
    if d.ty == sys::SPDK_BDEV_IO_TYPE_WRITE {
        // Waited long for pacing credit: let it in on the cache's headroom if there is
        // some (a no-op when it waits for space, not credit). Ticks are read only for
        // the head of a queue that already waits, and converted with the channel's
        // factor (a multiply, as the latency path does).
        // SAFETY: live request; a getter.
        let start = unsafe { sys::spdk_bdev_io_get_submit_tsc(bio) };
        let waited_ns = c.ticks_to_ns(ffi::ticks().wrapping_sub(start));
        sched::may_overdraw(&c.shared.engine, waited_ns / 1000);
    }
    match ordered(c, &d) {
        Err(IoError::Busy) => false,
        r => {
            // SAFETY: forwarded contract.
            unsafe { finish_ordered(c, bio, r) };
            true
        }
    }
}

/// Most queued writes per `Engine::write_many` (a reactor iteration's worth at QD64).
pub(super) const WRITE_BATCH: usize = 64;

/// A WRITE that can wait in `ChannelCtx::writes`: not FUA, and its data in one iovec
/// (`write_many` takes each request's data as one slice).
fn batchable(c: &ChannelCtx, d: &IoDesc) -> bool {
    if d.ty != sys::SPDK_BDEV_IO_TYPE_WRITE || d.fua {
        return false;
    }
    // SAFETY: the request's iovecs are valid for its lifetime.
    let iovs = unsafe { ffi::iovs(d) };
    iovs.len() == 1 && iovs[0].iov_len as u64 >= d.num_blocks * c.shared.block_size as u64
}

/// Writes the queued writes (`ChannelCtx::writes`) into the cache with one
/// `Engine::write_many` and completes them; those that find the cache full go to
/// `retry`, in order.
pub(super) fn serve_writes(c: &mut ChannelCtx) {
    if c.writes.is_empty() {
        return;
    }
    let mut batch = std::mem::take(&mut c.write_batch);
    std::mem::swap(&mut batch, &mut c.writes);
    let mut out = std::mem::take(&mut c.write_out);
    let bs = c.shared.block_size as u64;
    c.shared.engine.write_many(
        &mut c.main,
        batch.len(),
        |i| {
            // SAFETY: queued writes are live; `batchable` checked that one iovec holds
            // the whole request, which nothing else writes while the request is ours.
            unsafe {
                let d = ffi::io_desc(batch[i]);
                let iov = ffi::iovs(&d)[0];
                let n = (d.num_blocks * bs) as usize;
                (
                    d.offset_blocks * bs,
                    std::slice::from_raw_parts(iov.iov_base as *const u8, n),
                )
            }
        },
        &mut out,
    );
    for (bio, r) in batch.drain(..).zip(out.drain(..)) {
        match r {
            Err(IoError::Busy) => queue(c, bio),
            // SAFETY: live, uncompleted request.
            r => unsafe { finish_ordered(c, bio, r) },
        }
    }
    c.write_batch = batch;
    c.write_out = out;
}

/// Runs one ordered request against the engine.
fn ordered(c: &mut ChannelCtx, d: &IoDesc) -> Result<(), IoError> {
    let e = &c.shared.engine;
    let bs = c.shared.block_size as u64;
    let off = d.offset_blocks * bs;
    let len = d.num_blocks * bs;
    match d.ty {
        sys::SPDK_BDEV_IO_TYPE_WRITE => {
            // The index lookup after the data copy then finds its line in cache.
            prefetch_index(c, off);
            // SAFETY: the request's iovecs are valid for its lifetime.
            let iovs = unsafe { ffi::iovs(d) };
            let n = len as usize;
            if iovs.len() == 1 && iovs[0].iov_len >= n {
                // SAFETY: a single iovec of at least `n` readable bytes that nothing else
                // writes while the request is ours.
                let data = unsafe { std::slice::from_raw_parts(iovs[0].iov_base as *const u8, n) };
                e.write(&mut c.main, off, data, d.fua)
            } else {
                if n > c.gather.len() {
                    return Err(IoError::OutOfRange);
                }
                // SAFETY: the iovecs are readable for their lengths; `gather` is ours.
                let got = unsafe { ffi::copy_from_iovs(iovs, &mut c.gather[..n]) };
                if got != n {
                    return Err(IoError::OutOfRange);
                }
                e.write(&mut c.main, off, &c.gather[..n], d.fua)
            }
        }
        sys::SPDK_BDEV_IO_TYPE_FLUSH => e.flush(),
        sys::SPDK_BDEV_IO_TYPE_UNMAP => e.write_zeroes(off, len, true, false),
        // CDW12 is only meaningful for WRITE (the bdev layer does not set it otherwise).
        sys::SPDK_BDEV_IO_TYPE_WRITE_ZEROES => e.write_zeroes(off, len, false, false),
        _ => Err(IoError::OutOfRange),
    }
}

fn read(c: &mut ChannelCtx, bio: *mut sys::spdk_bdev_io, d: &IoDesc) {
    // SAFETY: the request's iovecs are valid for its lifetime.
    let iovs = unsafe { ffi::iovs(d) };
    if iovs.is_empty() || iovs[0].iov_base.is_null() {
        let len = d.num_blocks * c.shared.block_size as u64;
        // SAFETY: a live READ without a buffer: the bdev layer allocates one and calls
        // back on this thread.
        unsafe { sys::spdk_bdev_io_get_buf(bio, Some(read_get_buf_cb), len) };
        return;
    }
    // Served by the channel's read poller, later this reactor iteration; by then the
    // index line it looks up first has arrived.
    prefetch_index(c, d.offset_blocks * c.shared.block_size as u64);
    c.reads.push(bio);
}

/// Starts fetching the index line a request at backing offset `off` will look up.
fn prefetch_index(c: &ChannelCtx, off: u64) {
    let (lock, probe) = c.shared.engine.probe_addr(off);
    for p in [lock, probe].into_iter().flatten() {
        crate::env::cpu::prefetch(p);
    }
}

/// Serves a read queued by `read` (from the channel's read poller).
///
/// # Safety
/// `bio` must be a live, queued read of this channel, on its thread.
pub(super) unsafe fn serve_read(c: &mut ChannelCtx, bio: *mut sys::spdk_bdev_io) {
    if c.shared.removed.load(Relaxed) {
        fail_why(bio, "the base bdev was removed");
        // SAFETY: forwarded contract.
        unsafe { finish(c, bio, ffi::STATUS_FAILED) };
        return;
    }
    // SAFETY: forwarded contract.
    let d = unsafe { ffi::io_desc(bio) };
    read_with_buf(c, bio, &d);
}

extern "C" fn read_get_buf_cb(
    ch: *mut sys::spdk_io_channel,
    bio: *mut sys::spdk_bdev_io,
    success: bool,
) {
    // SAFETY: called on the request's thread with our live channel.
    let c = unsafe { ctx_of(ch) };
    if !success {
        fail_why(bio, "no buffer could be allocated for the read");
        // SAFETY: live, uncompleted request.
        unsafe { finish(c, bio, ffi::STATUS_FAILED) };
        return;
    }
    // SAFETY: live request, now with its buffer.
    let d = unsafe { ffi::io_desc(bio) };
    read_with_buf(c, bio, &d);
}

/// The buffer a read fills: the single iovec, or a DMA bounce.
fn read_buf<'a>(d: &IoDesc, bounce: &'a mut Option<DmaBuf>, len: usize) -> &'a mut [u8] {
    match bounce {
        Some(b) => &mut b.as_mut_slice()[..len],
        None => {
            // SAFETY: read_with_buf checked that the single iovec holds `len` writable
            // bytes owned by this request.
            unsafe {
                let iovs = ffi::iovs(d);
                std::slice::from_raw_parts_mut(iovs[0].iov_base as *mut u8, len)
            }
        }
    }
}

fn read_with_buf(c: &mut ChannelCtx, bio: *mut sys::spdk_bdev_io, d: &IoDesc) {
    let bs = c.shared.block_size as u64;
    let off = d.offset_blocks * bs;
    let len = (d.num_blocks * bs) as usize;
    // SAFETY: the request's iovecs are valid for its lifetime.
    let iovs = unsafe { ffi::iovs(d) };
    let single = iovs.len() == 1 && iovs[0].iov_len >= len;
    let mut bounce = None;
    if !single {
        match c.take_bounce(len) {
            Some(b) => bounce = Some(b),
            None => {
                // SAFETY: live, uncompleted request; NOMEM makes the bdev layer retry.
                unsafe { finish(c, bio, sys::SPDK_BDEV_IO_STATUS_NOMEM) };
                return;
            }
        }
    }
    // Reads run on `c.read`; only one with misses takes it along (and leaves an idle
    // one in its place), so a hit moves no channel.
    let r = c
        .shared
        .engine
        .read(&mut c.read, off, read_buf(d, &mut bounce, len));
    match r {
        Ok(0) => {
            io_ctx(bio).class = Some(Class::ReadHit);
            complete_read(c, bio, d, bounce, true);
        }
        Ok(_) => {
            let idle = c.take_read_channel();
            let rch = std::mem::replace(&mut c.read, idle);
            let n_misses = rch.misses().count();
            // Counted until `finish_read`: writeback holds back while misses wait.
            c.shared.fg_reads.fetch_add(1, Relaxed);
            let x = io_ctx(bio);
            x.class = Some(Class::ReadMiss);
            x.rch = Some(rch);
            x.bounce = bounce;
            x.n_misses = n_misses;
            submit_misses(c, bio);
        }
        Err(e) => {
            fail_why(bio, engine_why(e));
            complete_read(c, bio, d, bounce, false);
        }
    }
}

/// Copies a bounce out to the iovecs (if any), recycles it and completes the read.
fn complete_read(
    c: &mut ChannelCtx,
    bio: *mut sys::spdk_bdev_io,
    d: &IoDesc,
    bounce: Option<DmaBuf>,
    ok: bool,
) {
    if let Some(mut b) = bounce {
        if ok {
            let len = (d.num_blocks * c.shared.block_size as u64) as usize;
            // SAFETY: the iovecs are writable request memory, disjoint from the bounce.
            unsafe { ffi::copy_to_iovs(ffi::iovs(d), &b.as_mut_slice()[..len]) };
        }
        c.give_bounce(b);
    }
    let st = if ok {
        ffi::STATUS_SUCCESS
    } else {
        ffi::STATUS_FAILED
    };
    // SAFETY: live, uncompleted request.
    unsafe { finish(c, bio, st) };
}

/// Submits the read's remaining misses to the base bdev.
fn submit_misses(c: &mut ChannelCtx, bio: *mut sys::spdk_bdev_io) {
    // SAFETY: live request.
    let d = unsafe { ffi::io_desc(bio) };
    let bs = c.shared.block_size as u64;
    let off = d.offset_blocks * bs;
    let desc = c.shared.base_desc.0;
    let x = io_ctx(bio);
    x.waiting = false;
    let base: *mut u8 = match x.bounce.as_mut() {
        Some(b) => b.as_mut_ptr(),
        // SAFETY: single-iovec read (else it would have a bounce).
        None => unsafe { ffi::iovs(&d)[0].iov_base as *mut u8 },
    };
    while x.next_miss < x.n_misses {
        let Some(m) = x.rch.as_ref().and_then(|r| r.misses().nth(x.next_miss)) else {
            x.failed = true;
            x.next_miss = x.n_misses;
            break;
        };
        if m.at as u64 % bs != 0 || m.len as u64 % bs != 0 {
            x.why = "a miss not aligned to the block size";
            x.failed = true;
            x.next_miss = x.n_misses;
            break;
        }
        // SAFETY: `base + m.at .. + m.len` lies inside the request's buffer (the engine's
        // misses are within the read); the base channel belongs to this thread.
        let rc = unsafe {
            sys::spdk_bdev_read_blocks(
                desc,
                c.base_ch,
                base.add(m.at).cast(),
                (off + m.at as u64) / bs,
                m.len as u64 / bs,
                Some(miss_done),
                bio.cast(),
            )
        };
        if rc == -libc::ENOMEM {
            x.waiting = true;
            x.wait.bdev = c.shared.base_bdev;
            x.wait.cb_fn = Some(miss_retry);
            x.wait.cb_arg = bio.cast();
            // SAFETY: the wait entry lives in the request's driver_ctx until it fires.
            unsafe { sys::spdk_bdev_queue_io_wait(c.shared.base_bdev, c.base_ch, &mut x.wait) };
            return;
        }
        if rc != 0 {
            x.why = "could not submit a read to the base bdev";
            x.failed = true;
            x.next_miss = x.n_misses;
            break;
        }
        x.pending += 1;
        x.next_miss += 1;
    }
    if x.pending == 0 {
        finish_read(c, bio);
    }
}

extern "C" fn miss_retry(arg: *mut c_void) {
    let bio = arg as *mut sys::spdk_bdev_io;
    submit_misses(chan_of(bio), bio);
}

extern "C" fn miss_done(child: *mut sys::spdk_bdev_io, success: bool, arg: *mut c_void) {
    // SAFETY: the base bdev_io is ours to free once its completion callback runs.
    unsafe { sys::spdk_bdev_free_io(child) };
    let bio = arg as *mut sys::spdk_bdev_io;
    let x = io_ctx(bio);
    x.pending -= 1;
    if !success {
        x.why = "a read from the base bdev failed";
        x.failed = true;
    }
    if x.pending == 0 && !x.waiting && x.next_miss >= x.n_misses {
        finish_read(chan_of(bio), bio);
    }
}

/// All misses are back: cache them (or withdraw the placeholders) and complete. A read
/// through a bounce (ours) completes first and fills after; one straight into the
/// request's buffer fills before it gives the buffer back.
fn finish_read(c: &mut ChannelCtx, bio: *mut sys::spdk_bdev_io) {
    // SAFETY: live request.
    let d = unsafe { ffi::io_desc(bio) };
    let bs = c.shared.block_size as u64;
    let len = (d.num_blocks * bs) as usize;
    c.shared.fg_reads.fetch_sub(1, Relaxed);
    let x = io_ctx(bio);
    let ok = !x.failed;
    match (x.bounce.take(), x.rch.take()) {
        (Some(mut b), Some(mut rch)) => {
            if ok {
                // SAFETY: the iovecs are writable request memory, disjoint from the bounce.
                unsafe { ffi::copy_to_iovs(ffi::iovs(&d), &b.as_mut_slice()[..len]) };
            }
            let st = if ok {
                ffi::STATUS_SUCCESS
            } else {
                ffi::STATUS_FAILED
            };
            // SAFETY: live, uncompleted request; nothing below touches it.
            unsafe { finish(c, bio, st) };
            let off = d.offset_blocks * bs;
            let data = &b.as_mut_slice()[..len];
            c.shared
                .engine
                .fill_with(&mut rch, &mut c.main, off, data, ok);
            c.give_read_channel(rch);
            c.give_bounce(b);
        }
        (mut bounce, rch) => {
            if let Some(mut rch) = rch {
                let buf = read_buf(&d, &mut bounce, len);
                c.shared
                    .engine
                    .fill_with(&mut rch, &mut c.main, d.offset_blocks * bs, buf, ok);
                c.give_read_channel(rch);
            }
            complete_read(c, bio, &d, bounce, ok);
        }
    }
}

/// RESET: complete once nothing is in flight on any channel but the reset itself.
fn reset(bio: *mut sys::spdk_bdev_io) {
    let c = chan_of(bio);
    // SAFETY: our io_device is the Shared the channel points at; the iteration context
    // (the reset bdev_io) stays live until reset_done completes it.
    unsafe {
        sys::spdk_for_each_channel(
            std::sync::Arc::as_ptr(&c.shared) as *mut c_void,
            Some(reset_count),
            bio.cast(),
            Some(reset_done),
        )
    };
}

extern "C" fn reset_count(i: *mut sys::spdk_io_channel_iter) {
    // SAFETY: the iterator hands us each live channel of our io_device on its thread;
    // the reference is dropped before this function returns.
    let c = unsafe { ctx_of(sys::spdk_io_channel_iter_get_channel(i)) };
    // SAFETY: the context is the reset bdev_io; only its channel counts it as in flight.
    let bio = unsafe { sys::spdk_io_channel_iter_get_ctx(i) } as *mut sys::spdk_bdev_io;
    // SAFETY: `bio` and the iterator are live.
    let mine = unsafe {
        sys::spdk_bdev_io_get_io_channel(bio) == sys::spdk_io_channel_iter_get_channel(i)
    };
    let busy = c.inflight > u64::from(mine);
    // SAFETY: continue the iteration exactly once per channel.
    unsafe { sys::spdk_for_each_channel_continue(i, if busy { -libc::EAGAIN } else { 0 }) };
}

extern "C" fn reset_done(i: *mut sys::spdk_io_channel_iter, status: i32) {
    // SAFETY: the iteration context is the reset bdev_io, live until completed here.
    let bio = unsafe { sys::spdk_io_channel_iter_get_ctx(i) } as *mut sys::spdk_bdev_io;
    if status == 0 {
        // SAFETY: live, uncompleted request, on its thread (the iteration completes on
        // the thread that started it).
        unsafe { finish(chan_of(bio), bio, ffi::STATUS_SUCCESS) };
    } else {
        // Something is still in flight: look again shortly.
        // SAFETY: the message runs on this thread with the still-live request.
        unsafe { sys::spdk_thread_send_msg(ffi::current_thread(), Some(reset_again), bio.cast()) };
    }
}

extern "C" fn reset_again(arg: *mut c_void) {
    reset(arg as *mut sys::spdk_bdev_io);
}
