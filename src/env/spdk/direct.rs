//! Requests the cache policy sends to the base bdev instead of the cache (engine
//! `policy.rs`): writes outside write-back or past the sequential cutoff, write-zeroes
//! and unmaps outside write-back, and the base FLUSH that makes them durable.
//!
//! * A direct write: `begin_direct` (placeholder and tombstone, invalidating cached
//!   clean data), `spdk_bdev_writev_blocks` on the request's own iovecs, then
//!   `end_direct` in the completion, which caches a write-through as unsynced clean
//!   data (`runtime::direct`): no base FLUSH per write. Only a FUA write waits for a
//!   base FLUSH, after its end.
//! * WRITE_ZEROES and UNMAP become a base WRITE_ZEROES (an unmap must read back as
//!   zeros, which a base unmap does not promise), then `end_direct_zeroes`.
//! * A client FLUSH owes a base FLUSH when direct writes completed since the last one,
//!   or closed ksets hold unsynced keys no base FLUSH covers (`direct_flush_needed`).
//! * Base FLUSHes are grouped per channel: requests that need one queue on `Flusher`;
//!   one FLUSH is in flight at a time and covers every request queued before it was
//!   issued, so a stream of FUA requests costs one FLUSH per round trip, not one each.
//!   `direct_flushed` gets the mark taken when the FLUSH was issued.
//!
//! Invariants: a request here lives in its bdev_io (IoCtx) until `io::finish`; the
//! waiting list is intrusive (IoCtx::next), so nothing allocates on these paths; a
//! base without FLUSH support (no volatile cache) counts as flushed at once.

use super::ctx::{chan_of, deferring, engine_why, fail_why, finish, io_ctx, ChannelCtx, DK_FLUSH};
use super::ffi::{self, IoDesc};
use crate::runtime::direct::{self as dproto, DirectKind};
use spdk_sys as sys;
use std::ffi::c_void;
use std::ptr::null_mut;
use std::sync::atomic::Ordering::Relaxed;

/// Starts WRITE, WRITE_ZEROES or UNMAP `bio` on the base bdev when the policy routes it
/// there. False: it goes through the cache (`io::ordered`) instead. `again`: a retry of
/// a request the cache took and that waited (a WRITE is routed again without feeding
/// the stream detector a second time, `dproto::restart_write`).
pub(super) fn try_start(
    c: &mut ChannelCtx,
    bio: *mut sys::spdk_bdev_io,
    d: &IoDesc,
    again: bool,
) -> bool {
    io_ctx(bio).routed = true;
    let e = &c.shared.engine;
    let bs = c.shared.block_size as u64;
    let (off, len) = (d.offset_blocks * bs, d.num_blocks * bs);
    let started = match d.ty {
        sys::SPDK_BDEV_IO_TYPE_WRITE if again => {
            dproto::restart_write(e, &mut c.main, off, len, d.fua)
        }
        sys::SPDK_BDEV_IO_TYPE_WRITE => dproto::start_write(e, &mut c.main, off, len, d.fua),
        sys::SPDK_BDEV_IO_TYPE_WRITE_ZEROES => dproto::start_zeroes(e, off, len, false, d.fua),
        sys::SPDK_BDEV_IO_TYPE_UNMAP => dproto::start_zeroes(e, off, len, true, d.fua),
        _ => return false,
    };
    match started {
        // Write-back, or dirty data overlaps (or the log is full): through the cache.
        Ok(None) => false,
        Err(x) => {
            fail_why(bio, engine_why(x));
            c.shared.direct.errors.fetch_add(1, Relaxed);
            // SAFETY: live, uncompleted request.
            unsafe { finish(c, bio, ffi::STATUS_FAILED) };
            true
        }
        Ok(Some(op)) => {
            io_ctx(bio).direct = Some(op);
            submit(c, bio);
            true
        }
    }
}

/// Direct writes of at least STREAM_MIN bytes have at most STREAM_INFLIGHT bytes at the
/// base per channel (at least one write) while read misses wait for the base
/// (`Shared::fg_reads`), STREAM_INFLIGHT_FREE otherwise; the rest wait here in order.
/// A stream's writes queued in the base's own queues delay the read misses behind them:
/// beside a stream of bypassed 1 MiB writes at 2.6 GB/s, hot-set misses waited 4-5 ms at
/// a VM's disk (iostat's r_await; the kernel had merged the stream into 800 KiB requests
/// and kept a dozen queued), and the hot set took longer than the 10 s warm-up to be
/// cached (bdev_ocf, which keeps a stream's pass-through writes to about 3 MiB at the
/// disk, warmed in one or two seconds). With 2 MiB the misses waited 0.7-1 ms and the
/// hot set was cached within two seconds; with 4 MiB they waited 4.5 ms again. Without
/// misses the stream's own speed is what counts (at 2 MiB it wrote 0.9x what it wrote
/// alone).
const STREAM_MIN: u64 = 64 << 10;
const STREAM_INFLIGHT: u64 = 2 << 20;
const STREAM_INFLIGHT_FREE: u64 = 32 << 20;

/// The bytes of large direct writes the base may have now (see STREAM_INFLIGHT).
fn stream_cap(c: &ChannelCtx) -> u64 {
    match c.shared.fg_reads.load(Relaxed) {
        0 => STREAM_INFLIGHT_FREE,
        _ => STREAM_INFLIGHT,
    }
}

/// Submits the base command of a started direct request (or queues a large write
/// behind others, see STREAM_INFLIGHT).
fn submit(c: &mut ChannelCtx, bio: *mut sys::spdk_bdev_io) {
    // SAFETY: live request.
    let d = unsafe { ffi::io_desc(bio) };
    let desc = c.shared.base_desc.0;
    let x = io_ctx(bio);
    x.waiting = false;
    let len = d.num_blocks * c.shared.block_size as u64;
    let write = x.direct.is_some_and(|op| op.kind == DirectKind::Write);
    if write && len >= STREAM_MIN && x.streamed == 0 {
        let cap = stream_cap(c);
        let st = &mut c.streamed;
        // In order: behind writes already waiting, or past the cap.
        if !st.waiting.is_empty() || (st.bytes > 0 && st.bytes + len > cap) {
            st.waiting.push(bio);
            c.shared.direct.held.fetch_add(1, Relaxed);
            return;
        }
        st.bytes += len;
        x.streamed = len as u32;
    }
    // SAFETY: the request's iovecs stay valid until it completes, which is after the
    // base command's completion (libc's and SPDK's iovec are the same C struct); the
    // base channel belongs to this thread.
    let rc = unsafe {
        if x.direct.is_some_and(|op| op.kind == DirectKind::Write) {
            sys::spdk_bdev_writev_blocks(
                desc,
                c.base_ch,
                d.iovs.cast(),
                d.iovcnt as i32,
                d.offset_blocks,
                d.num_blocks,
                Some(base_done),
                bio.cast(),
            )
        } else {
            sys::spdk_bdev_write_zeroes_blocks(
                desc,
                c.base_ch,
                d.offset_blocks,
                d.num_blocks,
                Some(base_done),
                bio.cast(),
            )
        }
    };
    if rc == -libc::ENOMEM {
        x.waiting = true;
        x.wait.bdev = c.shared.base_bdev;
        x.wait.cb_fn = Some(submit_again);
        x.wait.cb_arg = bio.cast();
        // SAFETY: the wait entry lives in the request's driver_ctx until it fires.
        unsafe { sys::spdk_bdev_queue_io_wait(c.shared.base_bdev, c.base_ch, &mut x.wait) };
    } else if rc != 0 {
        x.why = "could not submit a request to the base bdev";
        unstream(c, bio);
        written(c, bio, false);
    }
}

/// The base is done with `bio`: its bytes no longer count against STREAM_INFLIGHT.
fn unstream(c: &mut ChannelCtx, bio: *mut sys::spdk_bdev_io) {
    let x = io_ctx(bio);
    c.streamed.bytes -= x.streamed as u64;
    x.streamed = 0;
}

/// Submits the large direct writes that fit now, oldest first. A submission failing at
/// once inside the loop lowers the bytes at the base, and the loop goes on.
fn next_streamed(c: &mut ChannelCtx) {
    let bs = c.shared.block_size as u64;
    while !c.streamed.waiting.is_empty() {
        let bio = c.streamed.waiting.first();
        // SAFETY: a live request waiting in the list.
        let len = unsafe { ffi::io_desc(bio) }.num_blocks * bs;
        if c.streamed.bytes > 0 && c.streamed.bytes + len > stream_cap(c) {
            return;
        }
        c.streamed.waiting.pop();
        // Counted here, so `submit` sends it rather than queueing it again.
        c.streamed.bytes += len;
        io_ctx(bio).streamed = len as u32;
        submit(c, bio);
    }
}

/// A request retried once the base had request objects again. Its failure there may
/// leave large writes waiting with none at the base to complete and move them on (a
/// fresh request fails at once only with none waiting: it would have queued).
extern "C" fn submit_again(arg: *mut c_void) {
    let bio = arg as *mut sys::spdk_bdev_io;
    let c = chan_of(bio);
    submit(c, bio);
    next_streamed(c);
}

extern "C" fn base_done(child: *mut sys::spdk_bdev_io, ok: bool, arg: *mut c_void) {
    // SAFETY: the base bdev_io is ours to free once its completion callback runs.
    unsafe { sys::spdk_bdev_free_io(child) };
    let bio = arg as *mut sys::spdk_bdev_io;
    if !ok {
        io_ctx(bio).why = "the base bdev failed a write the cache policy sent it";
    }
    let c = chan_of(bio);
    unstream(c, bio);
    written(c, bio, ok);
    next_streamed(c);
}

/// The base command of `bio` completed: finish it, or wait for a base FLUSH first.
fn written(c: &mut ChannelCtx, bio: *mut sys::spdk_bdev_io, ok: bool) {
    let x = io_ctx(bio);
    if x.direct.is_some_and(|op| ok && op.needs_flush()) {
        // Ended (a write-through cached) before the FLUSH is issued, so it covers it.
        end(c, bio, true);
        queue_flush(c, bio);
        return;
    }
    end_and_finish(c, bio, ok);
}

/// Ends the direct request `bio` in the engine and completes it. `bio` must be live and
/// not yet completed, on this thread.
fn end_and_finish(c: &mut ChannelCtx, bio: *mut sys::spdk_bdev_io, ok: bool) {
    end(c, bio, ok);
    let st = if ok {
        ffi::STATUS_SUCCESS
    } else {
        ffi::STATUS_FAILED
    };
    // SAFETY: live, uncompleted request on this thread (the callers' contract).
    unsafe { finish(c, bio, st) };
}

/// Tells the engine the direct request is over (`ok`: the base completed it) and counts
/// it.
fn end(c: &mut ChannelCtx, bio: *mut sys::spdk_bdev_io, ok: bool) {
    let Some(op) = io_ctx(bio).direct.take() else {
        return;
    };
    let st = &c.shared.direct;
    if !ok {
        st.errors.fetch_add(1, Relaxed);
    }
    let e = &c.shared.engine;
    if op.kind != DirectKind::Write {
        op.end(e, &mut c.main, &[], ok);
        st.zeroes.fetch_add(ok as u64, Relaxed);
        return;
    }
    st.writes.fetch_add(ok as u64, Relaxed);
    st.writethrough
        .fetch_add((ok && op.through()) as u64, Relaxed);
    if !op.wants_data(ok) {
        op.end(e, &mut c.main, &[], ok);
        return;
    }
    // Only a write-through reads the data (to cache it).
    // SAFETY: live request; its iovecs are valid for its lifetime.
    let d = unsafe { ffi::io_desc(bio) };
    // SAFETY: as above.
    let iovs = unsafe { ffi::iovs(&d) };
    let n = op.len as usize;
    if iovs.len() == 1 && iovs[0].iov_len >= n {
        // SAFETY: a single iovec of at least `n` bytes, not written while the request
        // is ours.
        let data = unsafe { std::slice::from_raw_parts(iovs[0].iov_base as *const u8, n) };
        op.end(e, &mut c.main, data, ok);
    } else {
        // SAFETY: the iovecs are readable for their lengths; `gather` is ours.
        let got = unsafe { ffi::copy_from_iovs(iovs, &mut c.gather[..n]) };
        op.end(e, &mut c.main, &c.gather[..got], ok && got == n);
    }
}

/// A client FLUSH that found the cache durable: does it owe a base FLUSH for direct
/// writes? Then it waits for one (true).
pub(super) fn flush_owed(c: &mut ChannelCtx, bio: *mut sys::spdk_bdev_io) -> bool {
    if c.shared.engine.direct_flush_needed().is_none() {
        return false;
    }
    io_ctx(bio).dkind = DK_FLUSH;
    queue_flush(c, bio);
    true
}

fn queue_flush(c: &mut ChannelCtx, bio: *mut sys::spdk_bdev_io) {
    let f = &mut c.flush;
    f.waiting.push(bio);
    if !f.busy {
        issue_flush(c);
    }
}

/// Issues one base FLUSH for every request waiting now.
fn issue_flush(c: &mut ChannelCtx) {
    let f = &mut c.flush;
    debug_assert!(!f.busy && !f.waiting.is_empty());
    f.batch = f.waiting.take();
    f.busy = true;
    f.mark = c.shared.engine.direct_mark();
    if !f.needed {
        flushed(c, true);
        return;
    }
    submit_flush(c);
}

fn submit_flush(c: &mut ChannelCtx) {
    let arg: *mut ChannelCtx = c;
    // SAFETY: FLUSH of the whole base on this thread's channel; the channel context
    // outlives it (requests are in flight, so the channel is not destroyed).
    let rc = unsafe {
        sys::spdk_bdev_flush_blocks(
            c.shared.base_desc.0,
            c.base_ch,
            0,
            sys::spdk_bdev_get_num_blocks(c.shared.base_bdev),
            Some(flush_done),
            arg.cast(),
        )
    };
    if rc == -libc::ENOMEM {
        let f = &mut c.flush;
        f.wait.bdev = c.shared.base_bdev;
        f.wait.cb_fn = Some(flush_again);
        f.wait.cb_arg = arg.cast();
        // SAFETY: the wait entry lives in the channel context until it fires.
        unsafe { sys::spdk_bdev_queue_io_wait(c.shared.base_bdev, c.base_ch, &mut f.wait) };
    } else if rc != 0 {
        flushed(c, false);
    }
}

extern "C" fn flush_again(arg: *mut c_void) {
    // SAFETY: `arg` is this thread's live channel context; no other reference is alive.
    submit_flush(unsafe { &mut *(arg as *mut ChannelCtx) });
}

extern "C" fn flush_done(child: *mut sys::spdk_bdev_io, ok: bool, arg: *mut c_void) {
    // SAFETY: the base bdev_io is ours to free once its completion callback runs.
    unsafe { sys::spdk_bdev_free_io(child) };
    // SAFETY: `arg` is this thread's live channel context (requests are in flight); the
    // completions are delivered after this reference ended.
    unsafe { deferring(arg, |c| flushed(c, ok)) };
}

/// The FLUSH in flight is done: finish its requests, then flush for the next ones.
fn flushed(c: &mut ChannelCtx, ok: bool) {
    let f = &mut c.flush;
    let mut bio = std::mem::replace(&mut f.batch, null_mut());
    f.busy = false;
    let e = &c.shared.engine;
    if ok {
        if f.needed {
            c.shared.direct.base_flushes.fetch_add(1, Relaxed);
        }
        e.direct_flushed(f.mark);
    }
    while !bio.is_null() {
        let x = io_ctx(bio);
        let next = x.next;
        if !ok {
            x.why = "the base bdev failed a FLUSH";
        }
        // Ended before the FLUSH already (a client FLUSH has nothing to end).
        end_and_finish(c, bio, ok);
        bio = next;
    }
    if !c.flush.waiting.is_empty() {
        issue_flush(c);
    }
}
