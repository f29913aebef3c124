//! One io_uring queue on a backing file or device: submitting reads, writes, FLUSH,
//! write-zeroes and discards with O_DIRECT (through aligned bounce buffers where the
//! caller's are not aligned), waiting for their completions, retrying what the kernel
//! asks to retry. One thread uses a queue at a time.

use super::*;

/// One request of a [`Queue::run`] batch.
#[derive(Debug)]
pub enum Op<'a> {
    /// Fill `buf` from the device at `off`.
    Read { off: u64, buf: &'a mut [u8] },
    /// Store `buf` to the device at `off`.
    Write { off: u64, buf: &'a [u8] },
}

/// A request as the ring sees it: raw pointer, progress so far.
pub(super) struct Pending {
    ptr: *mut u8,
    off: u64,
    /// Bytes still to transfer.
    left: usize,
    write: bool,
    /// Original request, for error messages.
    orig_off: u64,
    orig_len: usize,
    /// For a bounced read: (bounce slot, caller buffer) to copy after completion.
    copy_back: Option<(*mut u8, *mut u8)>,
}

/// What a completion did to a [`Pending`] transfer.
pub(super) enum Outcome {
    /// Submit it again: the rest of a short transfer, or a retry (EINTR, EAGAIN).
    Again,
    Done,
    /// It failed; the error names the request.
    Failed(io::Error),
}

impl Pending {
    /// A transfer of `len` bytes at device offset `off` from (or into) `ptr`.
    pub(super) fn new(ptr: *mut u8, off: u64, len: usize, write: bool) -> Pending {
        Pending {
            ptr,
            off,
            left: len,
            write,
            orig_off: off,
            orig_len: len,
            copy_back: None,
        }
    }

    /// The ring entry for what is left of it (at most MAX_IO bytes), tagged `user_data`.
    /// Pushing it is the caller's `unsafe`: `ptr` must stay valid until it completes.
    pub(super) fn entry(&self, fd: types::Fd, user_data: u64) -> io_uring::squeue::Entry {
        let n = self.left.min(MAX_IO) as u32;
        if self.write {
            opcode::Write::new(fd, self.ptr, n).offset(self.off).build()
        } else {
            opcode::Read::new(fd, self.ptr, n).offset(self.off).build()
        }
        .user_data(user_data)
    }

    /// Applies a completion's result (bytes moved, or -errno) to it.
    pub(super) fn complete(&mut self, res: i32, dev: &BackingFile) -> Outcome {
        let e = if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            if is_retryable(&e) {
                return Outcome::Again;
            }
            e
        } else if res == 0 && self.write {
            io::Error::new(io::ErrorKind::WriteZero, "device accepted no bytes")
        } else if res == 0 {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "end of file (did the backing file shrink?)",
            )
        } else {
            let n = (res as usize).min(self.left);
            self.left -= n;
            self.off += n as u64;
            // SAFETY: `n <= left`, so the pointer stays within the buffer.
            self.ptr = unsafe { self.ptr.add(n) };
            return if self.left > 0 {
                Outcome::Again
            } else {
                Outcome::Done
            };
        };
        let what = if self.write { "write" } else { "read" };
        Outcome::Failed(dev.context(what, self.orig_off, self.orig_len as u64, e))
    }
}

/// A per-thread io_uring on a [`BackingFile`]. Methods block until all their requests
/// have completed.
pub struct Queue {
    pub(super) dev: Arc<BackingFile>,
    pub(super) ring: IoUring,
    pub(super) bounce: AlignedBuf,
    /// Scratch, reused across calls to avoid allocations on the I/O path.
    pub(super) pending: Vec<Pending>,
    pub(super) ready: VecDeque<usize>,
}

// SAFETY: the raw pointers in `pending` only live during one `&mut self` call (the
// vector is cleared before returning), and `bounce` is an allocation owned exclusively
// by this queue; the ring is `Send`. Moving the queue to another thread therefore moves
// no shared state.
unsafe impl Send for Queue {}

impl Queue {
    /// The device this queue submits to.
    pub fn device(&self) -> &Arc<BackingFile> {
        &self.dev
    }

    /// Reads `buf.len()` bytes at `off`.
    pub fn read(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        self.run(&mut [Op::Read { off, buf }])
    }

    /// Writes `buf` at `off`.
    pub fn write(&mut self, off: u64, buf: &[u8]) -> io::Result<()> {
        self.run(&mut [Op::Write { off, buf }])
    }

    /// Submits every op at once (as many as the ring holds at a time) and waits for all
    /// of them. Ops of one batch run concurrently: overlapping ranges where one is a
    /// write have no defined order. Returns the first error; on error the other ops
    /// may or may not have been performed. Nothing is submitted if any op is misaligned
    /// or out of range.
    pub fn run(&mut self, ops: &mut [Op<'_>]) -> io::Result<()> {
        let dev = Arc::clone(&self.dev);
        let mut bounce_total = 0usize;
        for op in ops.iter() {
            let (what, off, addr, len) = match op {
                Op::Read { off, buf } => ("read", *off, buf.as_ptr() as usize, buf.len()),
                Op::Write { off, buf } => ("write", *off, buf.as_ptr() as usize, buf.len()),
            };
            dev.check(what, off, len as u64)?;
            if dev.direct && len > 0 && addr % dev.mem_align != 0 {
                bounce_total = bounce_total
                    .checked_add(round_up(len, BOUNCE_ALIGN))
                    .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
            }
        }
        let bounce_base = if bounce_total > 0 {
            self.bounce.ensure(bounce_total)?
        } else {
            std::ptr::null_mut()
        };

        // Resolve each op to the pointer the kernel will use, staging writes into the
        // bounce buffer.
        self.pending.clear();
        let mut used = 0usize;
        for op in ops.iter_mut() {
            let (off, ptr, len, write) = match op {
                Op::Read { off, buf } => (*off, buf.as_mut_ptr(), buf.len(), false),
                Op::Write { off, buf } => (*off, buf.as_ptr() as *mut u8, buf.len(), true),
            };
            if len == 0 {
                continue;
            }
            let mut copy_back = None;
            let kernel_ptr = if dev.direct && ptr as usize % dev.mem_align != 0 {
                // SAFETY: `used + len <= bounce_total <= capacity` by construction of
                // `bounce_total` above, so the slot is inside the bounce allocation.
                let slot = unsafe { bounce_base.add(used) };
                used += round_up(len, BOUNCE_ALIGN);
                if write {
                    // SAFETY: `ptr` is the caller's live slice of `len` bytes and `slot`
                    // has room for `len`; the bounce buffer never overlaps caller memory.
                    unsafe { std::ptr::copy_nonoverlapping(ptr, slot, len) };
                } else {
                    copy_back = Some((slot, ptr));
                }
                slot
            } else {
                ptr
            };
            self.pending.push(Pending {
                copy_back,
                ..Pending::new(kernel_ptr, off, len, write)
            });
        }

        let result = self.drive();

        // Copy bounced reads back out. On error the contents are unspecified anyway.
        for p in &self.pending {
            if let Some((slot, user)) = p.copy_back {
                // SAFETY: every request has completed, so the kernel no longer writes
                // the bounce slot; `user` is the caller's `&mut` slice of `orig_len`
                // bytes, still borrowed through `ops`, and cannot overlap the slot.
                unsafe { std::ptr::copy_nonoverlapping(slot, user, p.orig_len) };
            }
        }
        self.pending.clear();
        result
    }

    /// Makes every completed write durable (fdatasync through the ring).
    pub fn flush(&mut self) -> io::Result<()> {
        let fd = types::Fd(self.dev.file.as_raw_fd());
        let entry = opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(u64::MAX);
        loop {
            // SAFETY: fsync references no memory; the ring is empty (every method waits
            // for its requests), so there is room for one entry.
            unsafe {
                self.ring
                    .submission()
                    .push(&entry)
                    .map_err(|_| io::Error::other("io_uring submission queue unexpectedly full"))?;
            }
            self.wait_for(1)?;
            let res = self
                .ring
                .completion()
                .next()
                .map(|c| c.result())
                .ok_or_else(|| io::Error::other("io_uring returned no completion for fsync"))?;
            if res >= 0 {
                return Ok(());
            }
            let e = io::Error::from_raw_os_error(-res);
            if !is_retryable(&e) {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{}: fdatasync: {e}", self.dev.path.display()),
                ));
            }
        }
    }

    /// Makes `[off, off + len)` read as zeros: ZERO_RANGE fallocate (a cheap
    /// write-zeroes on block devices), or plain zero writes where unsupported.
    pub fn write_zeroes(&mut self, off: u64, len: u64) -> io::Result<()> {
        let dev = Arc::clone(&self.dev);
        dev.check("write_zeroes", off, len)?;
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        if dev.fallocate(
            "write_zeroes (fallocate)",
            &dev.no_zero_range,
            mode,
            off,
            len,
        )? {
            return Ok(());
        }
        self.write_zero_blocks(off, len)
    }

    /// Deallocates `[off, off + len)`; afterwards it reads as zeros. Hole punching on
    /// files, "unmap with guaranteed zeroes" on block devices; where the device cannot
    /// guarantee zeroes, the range is zeroed with [`Queue::write_zeroes`].
    pub fn discard(&mut self, off: u64, len: u64) -> io::Result<()> {
        let dev = Arc::clone(&self.dev);
        dev.check("discard", off, len)?;
        if len == 0 {
            return Ok(());
        }
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if dev.fallocate("discard (fallocate)", &dev.no_punch_hole, mode, off, len)? {
            return Ok(());
        }
        self.write_zeroes(off, len)
    }

    /// Writes zeros from the bounce buffer, a ring's worth of chunks at a time.
    pub(super) fn write_zero_blocks(&mut self, off: u64, len: u64) -> io::Result<()> {
        let chunk = ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK));
        let zeros = self.bounce.ensure(chunk)?;
        // SAFETY: `ensure` returned at least `chunk` writable bytes owned by the queue.
        unsafe { std::ptr::write_bytes(zeros, 0, chunk) };
        // Bounded batches keep the scratch vector small for huge ranges.
        const CHUNKS_PER_BATCH: usize = 4 * RING_ENTRIES as usize;
        let mut at = off;
        let end = off + len;
        while at < end {
            self.pending.clear();
            while at < end && self.pending.len() < CHUNKS_PER_BATCH {
                // `chunk` is a multiple of the block size unless it equals `len`, so
                // every piece stays aligned.
                let n = (end - at).min(chunk as u64) as usize;
                self.pending.push(Pending::new(zeros, at, n, true));
                at += n as u64;
            }
            let r = self.drive();
            self.pending.clear();
            r?;
        }
        Ok(())
    }

    /// Runs every entry of `self.pending` to completion; returns the first error.
    fn drive(&mut self) -> io::Result<()> {
        let fd = types::Fd(self.dev.file.as_raw_fd());
        self.ready.clear();
        self.ready.extend(0..self.pending.len());
        let mut inflight = 0usize;
        let mut first_err: Option<io::Error> = None;

        loop {
            // Stop feeding new work after an error, but always drain what is in flight.
            while first_err.is_none() && inflight < RING_ENTRIES as usize {
                let Some(i) = self.ready.pop_front() else {
                    break;
                };
                let p = &self.pending[i];
                let entry = p.entry(fd, i as u64);
                // SAFETY: the entry covers `p.ptr .. p.ptr + min(left, MAX_IO)`, valid for
                // the transfer (a caller slice or bounce slot of at least `left` bytes)
                // until this entry completes: `drive` does not return while
                // `inflight > 0`. Room: `inflight < RING_ENTRIES`.
                if unsafe { self.ring.submission().push(&entry) }.is_err() {
                    self.ready.push_front(i);
                    break;
                }
                inflight += 1;
            }
            if inflight == 0 {
                if first_err.is_none() && !self.ready.is_empty() {
                    // Unreachable while the ring is empty between calls; never report
                    // success for requests that did not run.
                    first_err = Some(io::Error::other(
                        "io_uring submission queue full with nothing in flight",
                    ));
                }
                break;
            }
            if let Err(e) = self.wait_for(1) {
                // The kernel may still own buffers we would hand back: not survivable.
                eprintln!(
                    "pcache: {}: io_uring failed with {inflight} requests in flight: {e}; aborting",
                    self.dev.path.display()
                );
                std::process::abort();
            }
            // Fields are borrowed separately: the completion queue borrows `ring` while
            // the loop updates `pending` and `ready`.
            for cqe in self.ring.completion() {
                let (i, res) = (cqe.user_data() as usize, cqe.result());
                inflight -= 1;
                let Some(p) = self.pending.get_mut(i) else {
                    continue;
                };
                match p.complete(res, &self.dev) {
                    Outcome::Again => self.ready.push_back(i),
                    Outcome::Done => {}
                    Outcome::Failed(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Submits queued entries and waits for at least `want` completions, retrying on
    /// interruption and transient ring pressure.
    pub(super) fn wait_for(&mut self, want: usize) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if is_retryable(&e) || e.raw_os_error() == Some(libc::EBUSY) => {
                    // EBUSY: completions must be reaped first; if some are ready, the
                    // caller will reap them.
                    if self.ring.completion().len() >= want {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("device", &self.dev.path)
            .field("bounce_capacity", &self.bounce.cap)
            .finish()
    }
}

pub(super) fn is_retryable(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN))
}

pub(super) fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// A page-aligned heap buffer that only grows; contents are scratch.
pub(super) struct AlignedBuf {
    pub(super) ptr: *mut u8,
    pub(super) cap: usize,
}

impl AlignedBuf {
    pub(super) fn new() -> AlignedBuf {
        AlignedBuf {
            ptr: std::ptr::null_mut(),
            cap: 0,
        }
    }

    /// Returns a buffer of at least `n > 0` bytes (old contents are not preserved).
    pub(super) fn ensure(&mut self, n: usize) -> io::Result<*mut u8> {
        if n <= self.cap {
            return Ok(self.ptr);
        }
        let cap = n.checked_next_power_of_two().unwrap_or(n).max(BOUNCE_ALIGN);
        let layout = Layout::from_size_align(cap, BOUNCE_ALIGN)
            .map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))?;
        self.release();
        // SAFETY: `layout` has a non-zero size (at least BOUNCE_ALIGN).
        let ptr = unsafe { alloc(layout) };
        if ptr.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("cannot allocate a {cap}-byte bounce buffer"),
            ));
        }
        self.ptr = ptr;
        self.cap = cap;
        Ok(ptr)
    }

    pub(super) fn release(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: `ptr` came from `alloc` with exactly this layout (validated when
            // it was allocated) and is not in use: no request is in flight between calls.
            unsafe {
                dealloc(
                    self.ptr,
                    Layout::from_size_align_unchecked(self.cap, BOUNCE_ALIGN),
                )
            };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        self.release();
    }
}
