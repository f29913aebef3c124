//! Streamed writes on a [`Queue`]: a list of writes kept at a given depth, each one's
//! data copied into a slot of the queue's own aligned buffer just before it is
//! submitted, the slot reused as soon as its write completes.
//!
//! Writeback used to go in waves: copy a wave's data, submit it, wait for all of it,
//! copy the next. A wave lasts as long as its slowest write and the copy overlaps no
//! I/O, so the device saw about half the depth asked for. Streaming keeps the depth
//! and overlaps each copy with the writes in flight; the data also lands in aligned
//! memory at once, where a wave's plain `Vec` had to be bounced (a second copy).
//!
//! Soundness: a slot's memory is handed to the kernel while its write is in flight and
//! never touched by `fill` or reused until that write completed; the call returns only
//! when nothing is in flight (and aborts the process if the ring breaks with writes in
//! flight, as `drive` does, rather than free memory the kernel may still write from).

use super::queue::{Outcome, Pending};
use super::*;
use std::time::{Duration, Instant};

/// Slots at most (writes in flight at once).
pub const STREAM_SLOTS: usize = 32;

impl Queue {
    /// Writes `n` requests (`req(i)` gives the i-th one's offset and length, at most
    /// `slot_len` bytes) with at most `depth()` in flight (asked before each
    /// submission, capped at STREAM_SLOTS): for each, `fill(i, slot)` puts its bytes
    /// into a slot just before it is submitted;
    /// `done(latency)` reports each write that completed. Waits for all of them;
    /// returns the first error, after which nothing new is submitted. Nothing is
    /// submitted if any request is out of range or misaligned for the device.
    pub fn write_stream(
        &mut self,
        n: usize,
        req: impl Fn(usize) -> (u64, usize),
        slot_len: usize,
        mut depth: impl FnMut() -> usize,
        mut fill: impl FnMut(usize, &mut [u8]),
        mut done: impl FnMut(Duration),
    ) -> io::Result<()> {
        let dev = Arc::clone(&self.dev);
        for i in 0..n {
            let (off, len) = req(i);
            dev.check("write", off, len as u64)?;
            if len > slot_len {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("streamed write of {len} bytes over its {slot_len}-byte slot"),
                ));
            }
        }
        if n == 0 {
            return Ok(());
        }
        let stride = round_up(slot_len.max(1), BOUNCE_ALIGN);
        let slots = STREAM_SLOTS.min(n).min(RING_ENTRIES as usize);
        let base = self.bounce.ensure(stride * slots)?;
        let fd = types::Fd(dev.file.as_raw_fd());
        // Each slot's write, and when it was first submitted (its latency).
        let mut table: [Pending; STREAM_SLOTS] =
            std::array::from_fn(|_| Pending::new(std::ptr::null_mut(), 0, 0, true));
        let mut since: [Option<Instant>; STREAM_SLOTS] = [None; STREAM_SLOTS];
        // Free slots (`self.ready` holds those whose write, or its rest, waits to be
        // submitted).
        let mut free: [usize; STREAM_SLOTS] = std::array::from_fn(|i| i);
        let mut n_free = slots;
        self.ready.clear();
        let (mut next, mut inflight) = (0usize, 0usize);
        let mut first_err: Option<io::Error> = None;
        loop {
            // Refill: a new request into a free slot, while the depth allows.
            while first_err.is_none()
                && next < n
                && n_free > 0
                && inflight + self.ready.len() < depth().clamp(1, slots)
            {
                n_free -= 1;
                let s = free[n_free];
                let (off, len) = req(next);
                // SAFETY: slot `s < slots` lies inside the `stride * slots` bytes
                // `ensure` returned; it is free, so no write of it is in flight and
                // nothing else refers to it.
                let slot = unsafe {
                    let p = base.add(s * stride);
                    std::slice::from_raw_parts_mut(p, len)
                };
                fill(next, slot);
                table[s] = Pending::new(slot.as_mut_ptr(), off, len, true);
                since[s] = None;
                self.ready.push_back(s);
                next += 1;
            }
            // Submit what is ready (new requests and the rest of short writes).
            while first_err.is_none() && inflight < RING_ENTRIES as usize {
                let Some(s) = self.ready.pop_front() else {
                    break;
                };
                let entry = table[s].entry(fd, s as u64);
                // SAFETY: the entry's range lies in slot `s` (see above) and stays
                // valid and untouched until this entry completes: the slot is not
                // freed before, and this function does not return while `inflight > 0`.
                // `inflight < RING_ENTRIES` leaves room in the submission queue.
                if unsafe { self.ring.submission().push(&entry) }.is_err() {
                    self.ready.push_front(s);
                    break;
                }
                since[s].get_or_insert_with(Instant::now);
                inflight += 1;
            }
            if inflight == 0 {
                if first_err.is_none() && (next < n || !self.ready.is_empty()) {
                    // Unreachable with an empty ring; never report writes that did not
                    // run as done.
                    first_err = Some(io::Error::other(
                        "io_uring submission queue full with nothing in flight",
                    ));
                }
                break;
            }
            if let Err(e) = self.wait_for(1) {
                eprintln!(
                    "pcache: {}: io_uring failed with {inflight} writes in flight: {e}; aborting",
                    dev.path.display()
                );
                std::process::abort();
            }
            for cqe in self.ring.completion() {
                let (s, res) = (cqe.user_data() as usize, cqe.result());
                inflight -= 1;
                let Some(t) = table.get_mut(s) else {
                    continue;
                };
                match t.complete(res, &dev) {
                    Outcome::Again => {
                        self.ready.push_back(s);
                        continue;
                    }
                    Outcome::Done => done(since[s].map_or(Duration::ZERO, |t| t.elapsed())),
                    Outcome::Failed(e) => {
                        first_err.get_or_insert(e);
                    }
                }
                free[n_free] = s;
                n_free += 1;
            }
        }
        self.ready.clear();
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
