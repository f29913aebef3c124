//! The reactors' handles to a volume: one `VolumeConn` per NBD reactor (an engine
//! channel and an io_uring queue), the `BlockTarget` the NBD server exports, the FIFO
//! deferral gate for requests that find the cache full or paced (a reactor's writes
//! try it and are handed back to wait, `try_write`, when a background thread makes the
//! progress they wait for), and the direct writes of the cache policy
//! (`runtime::direct`), which a reactor's write puts in flight on the handle's ring.
//!
//! Direct writes in flight: the reactor goes on serving other requests and answers the
//! write when `reap` reports it (it was ended in the engine at once, when the ring gave
//! it back). Two direct writes never overlap in flight, and nothing that must see one
//! runs before it completed (`settle`): a read, write, zeroing or trim of an overlapping
//! range waits for it, a FLUSH for all of them. So a cache write never lands over a
//! direct write still on its way to the disk, whose late arrival could undo the cache
//! data's writeback.

use super::*;

mod direct;
use direct::{InWrite, W_SLOTS};

impl Volume {
    /// Runs `op` through the deferral gate: while it returns Busy, wait for background
    /// progress; while others wait, queue behind them. With `bg` (the caller is the reactor
    /// that runs the background work) it makes that progress itself while it waits.
    fn gated(
        &self,
        mut op: impl FnMut() -> Result<(), IoError>,
        mut bg: Option<(&mut Queue, &mut Background)>,
    ) -> io::Result<()> {
        {
            let g = self.gate.lock().unwrap();
            if g.next == g.serving {
                drop(g);
                match op() {
                    Err(IoError::Busy) => {}
                    r => return r.map_err(to_io),
                }
            }
        }
        // Only a request that waits reads the clock.
        let since = Instant::now();
        let mut g = self.gate.lock().unwrap();
        let ticket = g.next;
        g.next += 1;
        self.engine.waiting_inc();
        while g.serving != ticket {
            match bg.as_mut() {
                Some((q, st)) => {
                    drop(g);
                    let worked = self.background_step(q, st);
                    g = self.gate.lock().unwrap();
                    if !worked && g.serving != ticket {
                        g = self.gate_cv.wait_timeout(g, INLINE_WAIT).unwrap().0;
                    }
                }
                None => g = self.gate_cv.wait(g).unwrap(),
            }
        }
        drop(g);
        let r = loop {
            if self.stop.load(Acquire) {
                break Err(io::Error::other("shutting down"));
            }
            let seen = self.progress_seen();
            match self.op_or_overdraw(&mut op, since.elapsed()) {
                Err(IoError::Busy) => {
                    match bg.as_mut() {
                        Some((q, st)) => {
                            if !self.background_step(q, st) {
                                self.wait_progress(seen, INLINE_WAIT);
                            }
                        }
                        None => {
                            // Wake the runner, then wait for its next progress (the kick
                            // itself counts as progress: waiting from `seen` would spin),
                            // or until the request is due to overdraw.
                            if self.progress_seen() == seen {
                                self.kick();
                                let kicked = self.progress_seen();
                                let due = Duration::from_micros(sched::PACE_WAIT_MAX_US)
                                    .saturating_sub(since.elapsed());
                                let wait = if due.is_zero() {
                                    Duration::from_millis(50)
                                } else {
                                    due
                                };
                                self.wait_progress(kicked, wait);
                            }
                        }
                    }
                }
                r => break r.map_err(to_io),
            }
        };
        self.engine.waiting_dec();
        let mut g = self.gate.lock().unwrap();
        g.serving += 1;
        self.gate_cv.notify_all();
        r
    }
}

impl Volume {
    /// Runs `op`; when it found no pacing credit after waiting `waited`, long enough to
    /// overdraw, it comes in on the cache's headroom if there is some
    /// (`sched::may_overdraw`) and runs once more. (Once per try: overdrawing does not
    /// help a request waiting for space.)
    fn op_or_overdraw(
        &self,
        op: &mut impl FnMut() -> Result<(), IoError>,
        waited: Duration,
    ) -> Result<(), IoError> {
        match op() {
            Err(IoError::Busy) if sched::may_overdraw(&self.engine, waited.as_micros() as u64) => {
                op()
            }
            r => r,
        }
    }

    /// One try of `op` for a request its reactor keeps while it waits (`try_write`):
    /// Some when it ran, None when it must wait (Busy, or others queue at the gate: it
    /// goes after them). `waited` is how long the request has been trying; past
    /// `PACE_WAIT_MAX_US` it may overdraw, as in `gated`. A None wakes the background
    /// runner, which makes the progress the retry needs.
    fn try_gated(
        &self,
        mut op: impl FnMut() -> Result<(), IoError>,
        waited: Duration,
    ) -> Option<io::Result<()>> {
        let queued = {
            let g = self.gate.lock().unwrap();
            g.next != g.serving
        };
        if !queued {
            match self.op_or_overdraw(&mut op, waited) {
                Err(IoError::Busy) => {}
                r => return Some(r.map_err(to_io)),
            }
        }
        if self.stop.load(Acquire) {
            return Some(Err(io::Error::other("shutting down")));
        }
        self.kick();
        None
    }
}

/// A reactor's handle (shared by its clients): an engine channel, an io_uring queue, and
/// on the reactor that runs it, the background work's state.
pub struct VolumeConn {
    vol: Arc<Volume>,
    ch: Channel,
    q: Queue,
    bg: Option<Box<Background>>,
    /// A write-type request ran since the last commit. Read misses also postpone their
    /// fill's data sync, but no reply waits for it (a kset close drains it before the
    /// key), so reads alone never cost a sync.
    uncommitted: bool,
    /// This reactor's latency histograms (only this reactor records into them).
    lat: Arc<LatencySet>,
    /// Base reads of read misses (`start_read`) and direct writes (`try_write`) in
    /// flight, by ring slot.
    ring: AsyncRing,
    inflight: Vec<Option<InRead>>,
    writes: Vec<Option<InWrite>>,
    /// Reads started and not yet reaped.
    pending: usize,
    /// Direct writes in flight, and their bytes.
    w_inflight: usize,
    w_bytes: usize,
    /// Direct writes back and ended in the engine, not yet reported by `reap`: (tag,
    /// error).
    w_done: Vec<(u64, Option<io::Error>)>,
    /// Slots reaped and answered, whose data is cached by `after_replies`.
    answered: Vec<usize>,
    /// Scratch of `reap`: (slot, error) of the slots just completed.
    completed: Vec<(usize, Option<io::Error>)>,
    /// Engine channels of reads in flight (each holds its read's plan), reused.
    spare_chs: Vec<Channel>,
}

/// A read miss whose base reads are in flight.
struct InRead {
    tag: u64,
    /// The read's own channel (its plan and placeholders until `fill_with`).
    rch: Channel,
    off: u64,
    len: usize,
    t0: Instant,
    ok: bool,
}

impl Drop for VolumeConn {
    fn drop(&mut self) {
        // Never leave placeholders behind (nobody waits for a reply).
        self.settle_all();
        // Reads in flight, or back and not yet reported: wait for them (the kernel
        // writes their buffers), then fill, so no placeholder is left behind.
        let mut done: Vec<(usize, bool)> = self
            .completed
            .drain(..)
            .map(|(i, e)| (i, e.is_none()))
            .collect();
        self.ring.wait_all(|i, r| done.push((i, r.is_ok())));
        for (i, ok) in done {
            if let Some(x) = self.inflight[i].as_mut() {
                x.ok = ok;
                self.vol.fg_reads.fetch_sub(1, Relaxed);
                self.answered.push(i);
            }
        }
        self.after_replies();
        for c in &mut self.spare_chs {
            self.vol.engine.release_channel(c);
        }
        self.vol.engine.latency().retire(&self.lat);
        self.vol.engine.release_channel(&mut self.ch);
    }
}

/// The NBD target: a shared volume.
pub struct Target(pub Arc<Volume>);

impl BlockTarget for Target {
    type Conn = VolumeConn;
    fn size(&self) -> u64 {
        self.0.engine.size()
    }
    fn block_size(&self) -> u32 {
        self.0.engine.block_size()
    }
    /// A handle holds an engine channel and an io_uring queue, per-thread resources with no
    /// per-client state: one per NBD reactor serves all of that reactor's clients.
    fn share_conns(&self) -> bool {
        true
    }
    /// Also turns on group commit of a `file` medium: the reactors answer a write only
    /// after [`BlockConn::commit`], one `fdatasync` per reactor pass.
    fn connect(&self) -> io::Result<VolumeConn> {
        self.0.engine.pmem().set_group_commit(true);
        Ok(VolumeConn {
            vol: Arc::clone(&self.0),
            ch: Channel::default(),
            q: self.0.backing.queue()?,
            bg: None,
            uncommitted: false,
            lat: self.0.engine.latency().register(),
            ring: self.0.backing.async_ring()?,
            inflight: (0..RING_SLOTS).map(|_| None).collect(),
            writes: (0..RING_SLOTS).map(|_| None).collect(),
            pending: 0,
            w_inflight: 0,
            w_bytes: 0,
            w_done: Vec::with_capacity(W_SLOTS),
            answered: Vec::with_capacity(RING_SLOTS),
            completed: Vec::with_capacity(RING_SLOTS),
            spare_chs: Vec::new(),
        })
    }
    fn background(&self, conn: &mut VolumeConn, wake: &Arc<Waker>) -> Option<Duration> {
        let v = &self.0;
        if v.bg_thread.load(Acquire) {
            return None;
        }
        let _ = v.bg_waker.set(Arc::clone(wake));
        let st = conn.bg.get_or_insert_with(Box::default);
        Some(if v.background_step(&mut conn.q, st) {
            Duration::ZERO
        } else {
            BACKGROUND_IDLE
        })
    }
}

/// Reads the misses of the last read on `ch` (of `[off, off + buf.len())`) from the
/// backing device, waiting for them: one miss straight into `buf`, several in batches of
/// up to `BATCH` per ring submission, from a stack array: nothing allocates.
fn read_misses(q: &mut Queue, ch: &Channel, off: u64, buf: &mut [u8]) -> io::Result<()> {
    const BATCH: usize = 8;
    let mut misses = ch.misses();
    let first = misses.next().expect("missed > 0 means a miss");
    if misses.next().is_none() {
        return q.read(
            off + first.at as u64,
            &mut buf[first.at..first.at + first.len],
        );
    }
    let mut ops: [Op<'_>; BATCH] = std::array::from_fn(|_| Op::Read {
        off: 0,
        buf: &mut [],
    });
    let mut n = 0;
    let mut rest: &mut [u8] = buf;
    let mut base = 0usize;
    for m in ch.misses() {
        let (_, tail) = rest.split_at_mut(m.at - base);
        let (mid, tail) = tail.split_at_mut(m.len);
        ops[n] = Op::Read {
            off: off + m.at as u64,
            buf: mid,
        };
        n += 1;
        if n == BATCH {
            q.run(&mut ops[..n])?;
            n = 0;
        }
        rest = tail;
        base = m.at + m.len;
    }
    if n == 0 {
        return Ok(());
    }
    q.run(&mut ops[..n])
}

impl VolumeConn {
    /// Starts the base reads of the misses `rch` planned for `[off, off + buf.len())`
    /// without waiting: a ring slot gets the read's hits (copied from `buf`, the gaps
    /// between misses) and the misses are read into it. None: no slot free, or a miss
    /// O_DIRECT cannot read into the slot as it lies; the caller reads synchronously.
    fn begin_async(&mut self, rch: &Channel, off: u64, buf: &[u8]) -> io::Result<Option<usize>> {
        if rch.misses().any(|m| !self.ring.aligned(m.at)) {
            return Ok(None);
        }
        let Some((slot, b)) = self.ring.begin(buf.len(), false)? else {
            return Ok(None);
        };
        let mut pos = 0;
        for m in rch.misses() {
            b[pos..m.at].copy_from_slice(&buf[pos..m.at]);
            pos = m.at + m.len;
        }
        b[pos..].copy_from_slice(&buf[pos..]);
        for m in rch.misses() {
            if let Err(e) = self.ring.add(slot, off + m.at as u64, m.at, m.len) {
                self.ring.cancel(slot);
                return Err(e);
            }
        }
        self.ring.submit(slot);
        Ok(Some(slot))
    }

    /// A read in flight whose base reads are back (`err`: how they failed): counted,
    /// answered through `reply` (given its data, or the error), and left for
    /// `after_replies` to cache.
    fn complete(
        &mut self,
        i: usize,
        err: Option<io::Error>,
        reply: impl FnOnce(io::Result<&[u8]>) -> io::Result<()>,
    ) -> io::Result<()> {
        let Some(x) = self.inflight[i].as_mut() else {
            return Err(io::Error::other("no read in flight in this slot"));
        };
        self.pending -= 1;
        self.vol.fg_reads.fetch_sub(1, Relaxed);
        self.answered.push(i);
        x.ok = err.is_none();
        match err {
            None => {
                self.lat.record(Class::ReadMiss, ns_since(x.t0));
                reply(Ok(&self.ring.data(i)[..x.len]))
            }
            Some(e) => {
                self.vol.engine.io_error(format!(
                    "read of {} bytes at offset {} from the backing device failed: {e}",
                    x.len, x.off
                ));
                let r = io::Error::new(e.kind(), e.to_string());
                reply(Err(e))?;
                Err(r)
            }
        }
    }

    /// The end of a read miss read synchronously: cache the data, count, report.
    fn finish_sync(
        &mut self,
        rch: &mut Channel,
        off: u64,
        buf: &[u8],
        r: &io::Result<()>,
        t0: Instant,
    ) {
        let e = &self.vol.engine;
        e.fill_with(rch, &mut self.ch, off, buf, r.is_ok());
        match r {
            Ok(()) => self.lat.record(Class::ReadMiss, ns_since(t0)),
            Err(x) => e.io_error(format!(
                "read of {} bytes at offset {off} from the backing device failed: {x}",
                buf.len()
            )),
        }
    }
}

impl BlockConn for VolumeConn {
    fn read(&mut self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let t0 = Instant::now();
        self.settle(off, buf.len() as u64);
        let missed = self
            .vol
            .engine
            .read(&mut self.ch, off, buf)
            .map_err(to_io)?;
        if missed == 0 {
            self.lat.record(Class::ReadHit, ns_since(t0));
            return Ok(());
        }
        let r = read_misses(&mut self.q, &self.ch, off, buf);
        self.vol.engine.fill(&mut self.ch, off, buf, r.is_ok());
        match &r {
            Ok(()) => self.lat.record(Class::ReadMiss, ns_since(t0)),
            Err(e) => self.vol.engine.io_error(format!(
                "read of {} bytes at offset {off} from the backing device failed: {e}",
                buf.len()
            )),
        }
        r
    }

    /// A hit completes at once. A miss's base reads go to the read ring and the reactor
    /// serves other requests meanwhile; the reply leaves as soon as they are back
    /// (`reap`), and their data is cached only after that (`after_replies`): the read
    /// keeps its own engine channel, whose placeholders keep the fill coherent with
    /// whatever ran in between (a write over the range cancels it).
    fn start_read(&mut self, off: u64, buf: &mut [u8], tag: u64) -> Option<io::Result<Filled>> {
        let t0 = Instant::now();
        self.settle(off, buf.len() as u64);
        let mut rch = self.spare_chs.pop().unwrap_or_default();
        // The cutoff sees this reactor's streams whole, whichever channel reads.
        rch.swap_streams(&mut self.ch);
        let r = self.vol.engine.read(&mut rch, off, buf);
        rch.swap_streams(&mut self.ch);
        let missed = match r {
            Ok(m) => m,
            Err(e) => {
                self.spare_chs.push(rch);
                return Some(Err(to_io(e)));
            }
        };
        if missed == 0 {
            self.spare_chs.push(rch);
            self.lat.record(Class::ReadHit, ns_since(t0));
            return Some(Ok(Filled::Data));
        }
        match self.begin_async(&rch, off, buf) {
            Ok(Some(slot)) => {
                self.vol.fg_reads.fetch_add(1, Relaxed);
                self.pending += 1;
                self.inflight[slot] = Some(InRead {
                    tag,
                    rch,
                    off,
                    len: buf.len(),
                    t0,
                    ok: false,
                });
                // Reads the kernel completed during the submission (a file's holes, the
                // page cache) are answered at once, without a trip through poll(2);
                // others completed meanwhile wait in `completed` for `reap`.
                self.poll_ring();
                let k = self.completed.iter().position(|c| c.0 == slot)?;
                let (_, err) = self.completed.swap_remove(k);
                // All-zero data (a never-written range of a sparse base, typically) is
                // not copied: the front end says so instead (an NBD hole chunk).
                let mut zero = false;
                let r = self.complete(slot, err, |data| {
                    let data = data?;
                    zero = is_zero(data);
                    if !zero {
                        buf.copy_from_slice(data);
                    }
                    Ok(())
                });
                Some(r.map(|()| if zero { Filled::Zero } else { Filled::Data }))
            }
            Ok(None) => {
                let r = read_misses(&mut self.q, &rch, off, buf);
                self.finish_sync(&mut rch, off, buf, &r, t0);
                self.spare_chs.push(rch);
                Some(r.map(|()| Filled::Data))
            }
            Err(e) => {
                self.vol
                    .engine
                    .fill_with(&mut rch, &mut self.ch, off, buf, false);
                self.spare_chs.push(rch);
                Some(Err(e))
            }
        }
    }

    fn reap(&mut self, done: &mut dyn FnMut(u64, io::Result<&[u8]>)) {
        if self.in_flight() == 0 {
            return;
        }
        self.poll_ring();
        for (tag, err) in self.w_done.drain(..) {
            done(tag, err.map_or(Ok(&[][..]), Err));
        }
        let mut list = std::mem::take(&mut self.completed);
        for (i, err) in list.drain(..) {
            let Some(tag) = self.inflight[i].as_ref().map(|x| x.tag) else {
                continue;
            };
            let _ = self.complete(i, err, |data| {
                done(tag, data);
                Ok(())
            });
        }
        self.completed = list;
    }

    fn in_flight(&self) -> usize {
        self.pending + self.w_inflight + self.w_done.len()
    }

    fn completions_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        Some(self.ring.as_fd())
    }

    fn completions_ready(&self) -> bool {
        !self.completed.is_empty() || !self.w_done.is_empty()
    }

    /// Caches the data of the read misses answered (or withdraws their placeholders).
    fn after_replies(&mut self) {
        for i in self.answered.drain(..) {
            let Some(mut x) = self.inflight[i].take() else {
                continue;
            };
            let data = &self.ring.data(i)[..x.len];
            self.vol
                .engine
                .fill_with(&mut x.rch, &mut self.ch, x.off, data, x.ok);
            self.ring.release(i);
            self.spare_chs.push(x.rch);
        }
    }

    fn write(&mut self, off: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let t0 = Instant::now();
        self.settle(off, data.len() as u64);
        match self.write_routed(off, data, fua, t0, None, false) {
            Some(Tried::Done(r)) => return r,
            Some(_) => unreachable!("a direct write without a tag runs at once"),
            None => {}
        }
        let (vol, ch) = (&self.vol, &mut self.ch);
        let bg = self.bg.as_deref_mut().map(|b| (&mut self.q, b));
        let r = vol.gated(|| vol.engine.write(ch, off, data, fua), bg);
        self.written(&r, t0.elapsed());
        r
    }

    /// Without a background thread this reactor makes the progress itself, so it waits
    /// in `write` (doing that work); with one, a write that must wait is handed back. A
    /// write that goes around the cache goes in flight.
    fn try_write(
        &mut self,
        off: u64,
        data: &[u8],
        fua: bool,
        waited: Option<Duration>,
        tag: u64,
    ) -> Tried {
        if self.bg.is_some() {
            return Tried::Done(self.write(off, data, fua));
        }
        let t0 = Instant::now();
        self.settle(off, data.len() as u64);
        // Routed on the first try (routing feeds the stream detector). A write the
        // cache took and that waits may go around it after all when the policy now
        // cuts it (a stream, once the cache is full): it then waits no longer.
        let again = waited.is_some();
        let waited = waited.unwrap_or_default();
        let since = t0.checked_sub(waited).unwrap_or(t0);
        if let Some(t) = self.write_routed(off, data, fua, since, Some(tag), again) {
            return t;
        }
        let (vol, ch) = (&self.vol, &mut self.ch);
        let Some(r) = vol.try_gated(|| vol.engine.write(ch, off, data, fua), waited) else {
            return Tried::Wait;
        };
        // The time it was kept waiting counts: it is what the client saw.
        self.written(&r, waited + t0.elapsed());
        Tried::Done(r)
    }

    fn wants_commit(&self) -> bool {
        self.uncommitted && self.vol.engine.pmem().pending()
    }

    fn commit(&mut self) -> io::Result<()> {
        if !std::mem::take(&mut self.uncommitted) {
            return Ok(());
        }
        self.vol
            .engine
            .pmem()
            .commit()
            .map_err(|e| io::Error::other(e.to_string()))
    }

    fn flush(&mut self) -> io::Result<()> {
        let t0 = Instant::now();
        self.settle_all();
        let vol = &self.vol;
        let bg = self.bg.as_deref_mut().map(|b| (&mut self.q, b));
        let r = vol
            .gated(|| vol.engine.flush(), bg)
            .and_then(|()| self.flush_direct());
        if r.is_ok() {
            self.lat.record(Class::Flush, ns_since(t0));
        }
        r
    }

    fn trim(&mut self, off: u64, len: u64, fua: bool) -> io::Result<()> {
        self.settle(off, len);
        self.uncommitted = true;
        if let Some(r) = self.zeroes_direct(off, len, true, fua) {
            return r;
        }
        let vol = &self.vol;
        let bg = self.bg.as_deref_mut().map(|b| (&mut self.q, b));
        vol.gated(|| vol.engine.write_zeroes(off, len, true, fua), bg)
    }

    fn write_zeroes(&mut self, off: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.settle(off, len);
        self.uncommitted = true;
        // Kept allocated (ZERO_RANGE), as a write-zeroes asks, even when it may trim.
        if let Some(r) = self.zeroes_direct(off, len, false, fua) {
            return r;
        }
        let vol = &self.vol;
        let bg = self.bg.as_deref_mut().map(|b| (&mut self.q, b));
        vol.gated(|| vol.engine.write_zeroes(off, len, may_trim, fua), bg)
    }
}
