//! Asynchronous I/O on a backing device: a ring of its own where a reactor starts the
//! base reads of its read misses and the direct writes of the cache policy, and goes on
//! serving other requests, reaping their completions later (its poll(2) watches the
//! ring's descriptor, readable while completions wait).
//!
//! Each request in flight owns a *slot*: a page-aligned buffer that only grows up to
//! [`KEEP_BYTES`] (so steady state allocates nothing and O_DIRECT never needs a bounce)
//! and the ranges to read into it or write from it. The caller takes a slot
//! ([`AsyncRing::begin`], for a read or a write), puts data of its own into the buffer (a
//! read's cache hits, a write's payload), adds the ranges ([`AsyncRing::add`]), submits
//! ([`AsyncRing::submit`]); [`AsyncRing::reap`] reports each slot whose ranges are all
//! done, and the caller gives the slot back with [`AsyncRing::release`] once done with its
//! data (a buffer grown past [`KEEP_BYTES`] is freed then, so a few huge requests do not
//! pin their memory).
//!
//! Soundness: the kernel writes into a slot's buffer while any of its entries is in
//! flight, so a slot with entries in flight is never reused or freed: `release` refuses
//! it, the buffers never move (a slot's buffer grows only in `begin`, when nothing of it
//! is in flight), and dropping the ring first waits for every entry in flight (aborting
//! the process if the ring itself breaks, rather than freeing memory the kernel holds).
//! Short transfers and EINTR/EAGAIN are resubmitted for the rest.

use super::*;

/// Slots (requests in flight at once); also the ring's depth.
pub const RING_SLOTS: usize = 64;
/// Largest slot buffer kept once its request is done.
pub const KEEP_BYTES: usize = 4 << 20;

/// One range of a slot: `left` bytes still to read at `off` into `buf[at..]`.
#[derive(Debug, Clone, Copy)]
struct Range {
    off: u64,
    at: usize,
    left: usize,
    orig_off: u64,
    orig_len: usize,
}

#[derive(Default)]
struct Slot {
    buf: Option<AlignedBuf>,
    /// Bytes of the buffer in use.
    len: usize,
    ranges: Vec<Range>,
    /// Entries of this slot in the kernel or waiting for room in the ring.
    outstanding: usize,
    /// Taken by `begin`, not yet released.
    busy: bool,
    /// Its ranges are written from the buffer (read into it otherwise).
    write: bool,
    /// Submitted and not yet reported by `reap`.
    submitted: bool,
    err: Option<io::Error>,
}

/// A backing device's ring for asynchronous reads and writes (see the module
/// documentation).
pub struct AsyncRing {
    dev: Arc<BackingFile>,
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// (slot, range) entries waiting for room in the ring.
    backlog: VecDeque<(usize, usize)>,
    /// Entries in the kernel.
    inflight: usize,
}

// SAFETY: the buffers are allocations owned by the ring; the kernel's pointers into them
// are only used through this ring, which moves with them. One thread uses it at a time.
unsafe impl Send for AsyncRing {}

impl BackingFile {
    /// A ring for asynchronous reads and writes (see `ring`).
    pub fn async_ring(self: &Arc<Self>) -> io::Result<AsyncRing> {
        let ring = IoUring::new(RING_SLOTS as u32).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot create an io_uring (is io_uring disabled?): {e}"),
            )
        })?;
        Ok(AsyncRing {
            dev: Arc::clone(self),
            ring,
            slots: (0..RING_SLOTS).map(|_| Slot::default()).collect(),
            free: (0..RING_SLOTS).rev().collect(),
            backlog: VecDeque::new(),
            inflight: 0,
        })
    }
}

impl AsyncRing {
    /// Whether a transfer at buffer position `at` may use a slot as it lies (O_DIRECT's
    /// memory alignment; slot buffers are page-aligned).
    pub fn aligned(&self, at: usize) -> bool {
        !self.dev.direct || at % self.dev.mem_align == 0
    }

    /// Takes a free slot with a buffer of `len` bytes (contents unspecified) for a read,
    /// or with `write` for a write of the buffer, or None when every slot is in use.
    pub fn begin(&mut self, len: usize, write: bool) -> io::Result<Option<(usize, &mut [u8])>> {
        let Some(&i) = self.free.last() else {
            return Ok(None);
        };
        let s = &mut self.slots[i];
        debug_assert!(!s.busy && s.outstanding == 0);
        let b = s.buf.get_or_insert_with(AlignedBuf::new);
        let ptr = b.ensure(len.max(1))?;
        self.free.pop();
        s.busy = true;
        s.write = write;
        s.len = len;
        s.ranges.clear();
        s.err = None;
        // SAFETY: `ensure` returned at least `len` bytes owned by this slot, with nothing
        // of it in flight (the slot was free); the borrow ends before any submission.
        Ok(Some((i, unsafe {
            std::slice::from_raw_parts_mut(ptr, len)
        })))
    }

    /// Adds a range of slot `i`: `len` bytes at device offset `off`, read into (or
    /// written from) `buf[at..at + len]`. Checked against the device and the buffer.
    pub fn add(&mut self, i: usize, off: u64, at: usize, len: usize) -> io::Result<()> {
        let s = &mut self.slots[i];
        self.dev.check(what(s.write), off, len as u64)?;
        if !s.busy || s.submitted || at.checked_add(len).is_none_or(|e| e > s.len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range outside its slot",
            ));
        }
        if !self.dev.direct || at % self.dev.mem_align == 0 {
            s.ranges.push(Range {
                off,
                at,
                left: len,
                orig_off: off,
                orig_len: len,
            });
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "range not aligned for O_DIRECT",
            ))
        }
    }

    /// Starts the transfers of slot `i` (without waiting for any).
    pub fn submit(&mut self, i: usize) {
        let s = &mut self.slots[i];
        s.submitted = true;
        for r in 0..s.ranges.len() {
            if s.ranges[r].left > 0 {
                s.outstanding += 1;
                self.backlog.push_back((i, r));
            }
        }
        self.push_backlog();
        self.enter();
    }

    /// Hands the ring's new entries to the kernel (a busy kernel takes them at the next
    /// call: `reap` calls it too).
    fn enter(&mut self) {
        if self.ring.submission().is_empty() {
            return;
        }
        if let Err(e) = self.ring.submit() {
            if !is_retryable(&e) && e.raw_os_error() != Some(libc::EBUSY) {
                self.broken(e);
            }
        }
    }

    /// Moves waiting entries into the ring while it has room.
    fn push_backlog(&mut self) {
        let fd = types::Fd(self.dev.file.as_raw_fd());
        while self.inflight < RING_SLOTS {
            let Some(&(i, r)) = self.backlog.front() else {
                break;
            };
            let rg = self.slots[i].ranges[r];
            let Some(b) = self.slots[i].buf.as_ref() else {
                break;
            };
            let n = rg.left.min(MAX_IO) as u32;
            // SAFETY: `rg.at + rg.left <= len <= cap` (checked in `add`; progress keeps
            // it), so the pointer and length lie inside the slot's buffer.
            let ptr = unsafe { b.ptr.add(rg.at) };
            let entry = if self.slots[i].write {
                opcode::Write::new(fd, ptr, n).offset(rg.off).build()
            } else {
                opcode::Read::new(fd, ptr, n).offset(rg.off).build()
            }
            .user_data(((i as u64) << 32) | r as u64);
            // SAFETY: the buffer stays valid and unmoved until the entry completes (the
            // slot is neither released nor resized while `outstanding > 0`, and the ring
            // waits for everything before it is dropped); room: `inflight < RING_SLOTS`.
            if unsafe { self.ring.submission().push(&entry) }.is_err() {
                break;
            }
            self.backlog.pop_front();
            self.inflight += 1;
        }
    }

    /// Requests in flight (slots submitted and not yet reported).
    pub fn busy(&self) -> bool {
        self.inflight > 0 || !self.backlog.is_empty()
    }

    /// Reaps the completions there are (without waiting) and calls `done(slot, result)`
    /// for each slot whose ranges are all back; its data is then [`AsyncRing::data`] until
    /// released.
    pub fn reap(&mut self, mut done: impl FnMut(usize, io::Result<()>)) {
        loop {
            let mut any = false;
            let mut cq = self.ring.completion();
            cq.sync();
            for cqe in &mut cq {
                any = true;
                self.inflight -= 1;
                let (i, r) = (
                    (cqe.user_data() >> 32) as usize,
                    cqe.user_data() as u32 as usize,
                );
                let res = cqe.result();
                let Some(s) = self.slots.get_mut(i) else {
                    continue;
                };
                let rg = &mut s.ranges[r];
                let err = if res < 0 {
                    let e = io::Error::from_raw_os_error(-res);
                    if is_retryable(&e) {
                        self.backlog.push_back((i, r));
                        continue;
                    }
                    Some(e)
                } else if res == 0 && s.write {
                    Some(io::Error::new(io::ErrorKind::WriteZero, "wrote nothing"))
                } else if res == 0 {
                    Some(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "end of file (did the backing file shrink?)",
                    ))
                } else {
                    let n = (res as usize).min(rg.left);
                    rg.left -= n;
                    rg.off += n as u64;
                    rg.at += n;
                    if rg.left > 0 {
                        self.backlog.push_back((i, r));
                        continue;
                    }
                    None
                };
                if let Some(e) = err {
                    let (o, l) = (rg.orig_off, rg.orig_len as u64);
                    let e = self.dev.context(what(s.write), o, l, e);
                    s.err.get_or_insert(e);
                }
                s.outstanding -= 1;
                if s.outstanding == 0 {
                    s.submitted = false;
                    done(i, s.err.take().map_or(Ok(()), Err));
                }
            }
            drop(cq);
            self.push_backlog();
            self.enter();
            if !any {
                return;
            }
        }
    }

    /// The data of slot `i` (after `reap` reported it).
    pub fn data(&self, i: usize) -> &[u8] {
        let s = &self.slots[i];
        match &s.buf {
            // SAFETY: nothing of the slot is in flight (reported by `reap`), and `len`
            // bytes of its buffer were handed out by `begin`.
            Some(b) if s.outstanding == 0 => unsafe { std::slice::from_raw_parts(b.ptr, s.len) },
            _ => &[],
        }
    }

    /// Gives slot `i` back (a slot still in flight is kept until it is not).
    pub fn release(&mut self, i: usize) {
        let s = &mut self.slots[i];
        if s.busy && s.outstanding == 0 {
            s.busy = false;
            s.submitted = false;
            if s.buf.as_ref().is_some_and(|b| b.cap > KEEP_BYTES) {
                s.buf = None;
            }
            self.free.push(i);
        }
    }

    /// Gives back a slot taken by `begin` that was never submitted.
    pub fn cancel(&mut self, i: usize) {
        let s = &mut self.slots[i];
        s.outstanding = 0;
        s.ranges.clear();
        self.release(i);
    }

    /// Waits for at least one completion if anything is in flight, then reaps; `done`
    /// as for `reap`.
    pub fn wait_one(&mut self, done: impl FnMut(usize, io::Result<()>)) {
        if self.inflight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if is_retryable(&e) || e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => self.broken(e),
            }
        }
        self.reap(done);
    }

    /// Waits until nothing is in flight; `done` as for `reap`.
    pub fn wait_all(&mut self, mut done: impl FnMut(usize, io::Result<()>)) {
        while self.busy() {
            if self.inflight > 0 {
                match self.ring.submit_and_wait(1) {
                    Ok(_) => {}
                    Err(e) if is_retryable(&e) || e.raw_os_error() == Some(libc::EBUSY) => {}
                    Err(e) => self.broken(e),
                }
            }
            self.reap(&mut done);
        }
    }

    /// The ring failed with buffers in the kernel's hands: not survivable.
    fn broken(&self, e: io::Error) -> ! {
        eprintln!(
            "pcache: {}: io_uring failed with {} requests in flight: {e}; aborting",
            self.dev.path.display(),
            self.inflight
        );
        std::process::abort();
    }
}

impl std::os::fd::AsFd for AsyncRing {
    /// Readable while completions wait to be reaped.
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the ring's descriptor stays open while the ring lives, and the borrow
        // cannot outlive `self`.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.ring.as_raw_fd()) }
    }
}

impl Drop for AsyncRing {
    fn drop(&mut self) {
        self.wait_all(|_, _| {});
    }
}

/// The operation's name in errors.
fn what(write: bool) -> &'static str {
    if write {
        "write"
    } else {
        "read"
    }
}
