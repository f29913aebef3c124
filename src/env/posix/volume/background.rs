//! The background runner of a volume: the engine tick, writeback windows streamed to
//! the backing device at a bounded depth, GC, and the idle FLUSH for direct writes, by
//! the rules of `runtime::sched`; on its own thread (`start_background`) or, without
//! one, on NBD reactor 0. A panic there fails the volume instead of hanging writers.

use super::*;

impl Volume {
    /// Starts a background thread (tick every 100 ms, writeback, GC) for embedders without
    /// NBD reactors; from then on reactors leave that work to it. Ends on `shutdown`.
    /// A panic there stops the volume ([`Volume::fail`]) rather than leaving writers
    /// waiting for space that nobody frees.
    pub fn start_background(self: &Arc<Self>) -> io::Result<JoinHandle<()>> {
        let v = Arc::clone(self);
        let mut q = self.backing.queue()?;
        self.bg_thread.store(true, Release);
        std::thread::Builder::new()
            .name("pcache-bg".into())
            .spawn(move || {
                let r =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| v.background(&mut q)));
                if let Err(p) = r {
                    v.fail(format!("background thread panicked: {}", panic_text(&*p)));
                }
            })
    }

    /// Stops the volume because something it depends on died: records why (the first
    /// reason wins), stops the background work and wakes every waiter, which then
    /// returns an error. `serve` sees it ([`Volume::failure`]) and exits non-zero.
    pub fn fail(&self, why: String) {
        eprintln!("pcache: {why}");
        self.fatal.lock().unwrap().get_or_insert(why);
        self.stop.store(true, Release);
        self.kick();
        self.gate_cv.notify_all();
    }

    /// Why the volume failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.fatal.lock().unwrap().clone()
    }

    fn background(&self, q: &mut Queue) {
        let mut st = Background::default();
        while !self.stop.load(Acquire) {
            let seen = self.progress_seen();
            if !self.background_step(q, &mut st) && !self.stop.load(Acquire) {
                self.wait_progress(seen, BACKGROUND_IDLE);
            }
        }
    }

    /// The engine's tick when due, then one round of background work. Returns true if it
    /// did something.
    pub fn background_step(&self, q: &mut Queue, st: &mut Background) -> bool {
        if st.tick.due(self.now_us(), sched::TICK_PERIOD_US) {
            self.engine.tick();
        }
        self.background_once(q, st)
    }

    /// Microseconds since the volume opened: the clock the runtime rules are given.
    fn now_us(&self) -> u64 {
        self.t0.elapsed().as_micros() as u64
    }

    /// A backing FLUSH started at `t0` completed: its duration paces the periodic one.
    fn flush_took(&self, t0: Instant) {
        let us = t0.elapsed().as_micros() as u64;
        self.direct_flush.lock().unwrap().flushed(us);
    }

    /// One round of background work (the rules are `runtime::sched`'s). Returns true if
    /// it did something.
    pub fn background_once(&self, q: &mut Queue, st: &mut Background) -> bool {
        let (wb, buf) = (&mut st.wb, &mut st.buf);
        let e = &self.engine;
        sched::before_round(e);
        let mut worked = false;
        let drain = self.drain.load(Relaxed);
        let due = {
            let b = self.backoff.lock().unwrap();
            sched::writeback_due(e, drain, &b, || self.now_us())
        };
        if due {
            // Live dirty data of a mostly superseded window may move instead of being
            // written back, unless draining or the FLUSH is cheap.
            sched::set_window_rules(wb, drain, &self.direct_flush.lock().unwrap());
            match e.writeback_next(wb) {
                WbNext::Ready => {
                    worked = true;
                    match self.write_batch(q, wb, &mut st.reqs) {
                        Ok(()) => {
                            e.writeback_done(wb, true);
                            if self.backoff.lock().unwrap().succeeded() {
                                eprintln!("pcache: writeback recovered");
                            }
                        }
                        Err(err) => {
                            let b = self.backoff.lock().unwrap().failed(self.now_us());
                            e.writeback_failed(
                                wb,
                                &format!("{err}; retrying in {b} ms, the data stays dirty"),
                            );
                            eprintln!("pcache: writeback failed ({err}); retrying in {b} ms");
                        }
                    }
                }
                WbNext::Idle => {
                    if self.drain.load(Relaxed) && e.dirty_bytes() == 0 {
                        self.drain.store(false, Relaxed);
                    }
                }
                WbNext::Stopped(_) => {}
            }
        }
        if e.gc_wanted() && e.gc(buf).ksets > 0 {
            worked = true;
        }
        // Also while writeback works: a write-through stream's windows are empty and
        // flush nothing, and its keys stay unsynced until a backing FLUSH covers them.
        let due = sched::direct_flush_due(e, &mut self.direct_flush.lock().unwrap(), self.now_us());
        if let Some(mark) = due {
            let t0 = Instant::now();
            if q.flush().is_ok() {
                e.direct_flushed(mark);
                self.flush_took(t0);
            }
        }
        if worked {
            self.progressed();
        }
        worked
    }

    /// Writes a window's items to the backing device, then one FLUSH for all. Data
    /// extents that continue each other on the backing device go as one write
    /// (`runtime::sched::coalesce`, as in SPDK) of at most WB_MAX_IO bytes, streamed
    /// (`Queue::write_stream`): each copied from the medium into a slot of the queue's
    /// aligned buffer just before it is submitted, with `sched::writeback_depth` writes
    /// in flight (few while read misses wait for the base), so copies overlap the
    /// writes and the depth holds. Zero and discard extents become write-zeroes
    /// (discards when the whole run is discards). `reqs` is scratch (it only grows).
    fn write_batch(&self, q: &mut Queue, wb: &WbBatch, reqs: &mut Vec<WbReq>) -> io::Result<()> {
        let items = &wb.items;
        if items.is_empty() {
            // Only clean keys and tombstones: nothing written, nothing to make durable.
            return Ok(());
        }
        reqs.clear();
        let mut i = 0;
        while i < items.len() {
            let len = sched::coalesce(items, i, WB_MAX_IO, false);
            let n = sched::items_in(items, i, len);
            if matches!(items[i].kind, WbKind::Data { .. }) {
                // A single item may be longer than a slot: it goes in slot-sized parts
                // (each remembers how far into the run it starts).
                let mut at = 0;
                while at < len {
                    let part = (len - at).min(WB_MAX_IO);
                    reqs.push(WbReq {
                        off: items[i].off + at,
                        len: part as usize,
                        first: i,
                        skip: at as usize,
                    });
                    at += part;
                }
                i += n;
                continue;
            }
            let t0 = Instant::now();
            if items[i..i + n]
                .iter()
                .all(|it| matches!(it.kind, WbKind::Discard))
            {
                q.discard(items[i].off, len)?;
            } else {
                q.write_zeroes(items[i].off, len)?;
            }
            self.wb_lat.record(Class::Writeback, ns_since(t0));
            i += n;
        }
        let reqs: &[WbReq] = reqs;
        // The window is sorted by address with overlaps resolved, so its writes may
        // complete in any order: the FLUSH below covers them all.
        q.write_stream(
            reqs.len(),
            |k| (reqs[k].off, reqs[k].len),
            WB_MAX_IO as usize,
            || {
                let fg = self.fg_reads.load(Relaxed);
                sched::writeback_depth(&self.engine, fg, WB_BUSY_OPS, STREAM_SLOTS)
            },
            |k, slot| {
                let WbReq {
                    len,
                    first,
                    mut skip,
                    ..
                } = reqs[k];
                let mut at = 0;
                for it in &items[first..] {
                    let WbKind::Data { pmem_off } = it.kind else {
                        break;
                    };
                    if at == len {
                        break;
                    }
                    let l = it.len as usize;
                    if skip >= l {
                        skip -= l;
                        continue;
                    }
                    let n = (l - skip).min(len - at);
                    let src = pmem_off + skip as u64;
                    self.engine.pmem().read(src, &mut slot[at..at + n]);
                    at += n;
                    skip = 0;
                }
            },
            |lat| self.wb_lat.record(Class::Writeback, ns(lat)),
        )?;
        let t0 = Instant::now();
        // Direct writes completed before this FLUSH are durable after it too.
        let mark = self.engine.direct_mark();
        q.flush()?;
        self.engine.direct_flushed(mark);
        self.wb_lat.record(Class::Writeback, ns_since(t0));
        self.flush_took(t0);
        Ok(())
    }

    /// Writes back every dirty byte from the calling thread (offline `pcache flush`).
    /// `progress(done, total)` is called after each kset.
    pub fn writeback_all(&self, mut progress: impl FnMut(u64, u64)) -> io::Result<()> {
        self.engine
            .flush()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let total = self.engine.dirty_bytes();
        let mut q = self.backing.queue()?;
        let (mut wb, mut reqs) = (WbBatch::default(), Vec::new());
        loop {
            match self.engine.writeback_next(&mut wb) {
                WbNext::Idle => break,
                WbNext::Stopped(m) => {
                    return Err(io::Error::other(format!("writeback stopped: {m}")))
                }
                WbNext::Ready => {
                    self.write_batch(&mut q, &wb, &mut reqs)?;
                    self.engine.writeback_done(&wb, true);
                    progress(total - self.engine.dirty_bytes().min(total), total);
                }
            }
        }
        Ok(())
    }
}
