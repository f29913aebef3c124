//! The direct writes of a reactor's handle (`runtime::direct`): a write the cache policy
//! sends to the backing device goes in flight on the handle's ring (`start_direct`) and
//! is ended in the engine as soon as the ring gives it back (`end_writes`), then reported
//! by `reap`; a FUA write, a write through `BlockConn::write`, and one that finds the
//! ring full are written at once. Write-zeroes and trims outside write-back also go
//! straight to the backing device here.
//!
//! Invariants: at most `W_SLOTS` writes and `W_BYTES` bytes in flight (the rest of the
//! ring serves read misses); two direct writes never overlap in flight, and nothing that
//! must see one runs before it completed (`settle`, `settle_all`); every started write is
//! ended exactly once, failed or not.

use super::*;

/// Most direct writes in flight at once (the rest of the ring is for read misses), and
/// most bytes: past either, a direct write is written at once.
pub(super) const W_SLOTS: usize = RING_SLOTS / 2;
const W_BYTES: usize = 16 << 20;

/// A direct write in flight (`VolumeConn::start_direct`).
pub(super) struct InWrite {
    tag: u64,
    op: DirectOp,
    t0: Instant,
}

impl VolumeConn {
    /// A write as the policy routes it when it goes around the cache
    /// (`write_direct`), counted as written since `t0` (when it ran); None when the cache
    /// takes it.
    pub(super) fn write_routed(
        &mut self,
        off: u64,
        data: &[u8],
        fua: bool,
        t0: Instant,
        tag: Option<u64>,
        again: bool,
    ) -> Option<Tried> {
        self.uncommitted = true;
        let t = self.write_direct(off, data, fua, tag, t0, again)?;
        if let Tried::Done(r) = &t {
            self.written(r, t0.elapsed());
        }
        Some(t)
    }

    /// A write ran (through the cache or around it) and took `took`: the next commit
    /// covers it, and a success counts in the write latency.
    pub(super) fn written(&mut self, r: &io::Result<()>, took: Duration) {
        self.uncommitted = true;
        if r.is_ok() {
            self.lat.record(Class::Write, ns(took));
        }
    }

    /// Reaps the ring without waiting: read misses wait in `completed` for `reap`, direct
    /// writes are ended at once (`end_writes`).
    pub(super) fn poll_ring(&mut self) {
        let completed = &mut self.completed;
        self.ring.reap(|i, r| completed.push((i, r.err())));
        self.end_writes();
    }

    /// Waits for at least one completion on the ring (something is in flight), then
    /// as `poll_ring`.
    pub(super) fn wait_ring(&mut self) {
        let completed = &mut self.completed;
        self.ring.wait_one(|i, r| completed.push((i, r.err())));
        self.end_writes();
    }

    /// Ends the direct writes among the completions reaped: in the engine (a
    /// write-through is cached there), counted, and left in `w_done` for `reap`.
    pub(super) fn end_writes(&mut self) {
        let mut k = 0;
        while k < self.completed.len() {
            let i = self.completed[k].0;
            let Some(w) = self.writes[i].take() else {
                k += 1;
                continue;
            };
            let (_, err) = self.completed.swap_remove(k);
            let ok = err.is_none();
            let len = w.op.len as usize;
            let data = if w.op.wants_data(ok) {
                &self.ring.data(i)[..len]
            } else {
                &[]
            };
            w.op.end(&self.vol.engine, &mut self.ch, data, ok);
            self.ring.release(i);
            self.w_inflight -= 1;
            self.w_bytes -= len;
            // A write-through's cached copy is part of what the reply promises.
            self.uncommitted = true;
            match &err {
                None => self.lat.record(Class::Write, ns_since(w.t0)),
                Some(e) => self.vol.engine.io_error(format!(
                    "write of {len} bytes at offset {} to the backing device failed: {e}",
                    w.op.off
                )),
            }
            self.w_done.push((w.tag, err));
        }
    }

    /// Waits for the direct writes in flight that overlap `[off, off + len)`.
    pub(super) fn settle(&mut self, off: u64, len: u64) {
        while self.w_inflight > 0
            && self
                .writes
                .iter()
                .flatten()
                .any(|w| w.op.off < off + len && off < w.op.off + w.op.len)
        {
            self.wait_ring();
        }
    }

    /// Waits for every direct write in flight.
    pub(super) fn settle_all(&mut self) {
        while self.w_inflight > 0 {
            self.wait_ring();
        }
    }

    /// A write the policy sends to the backing device (`runtime::direct`): None when it
    /// goes through the cache after all. `again`: the cache took it first and it has
    /// waited since; it goes around only if the policy would now cut it
    /// (`restart_write`). With a `tag` it goes in flight on the ring (`reap` reports
    /// it); a FUA write, one without a tag, or one that finds no room in flight is
    /// written at once.
    pub(super) fn write_direct(
        &mut self,
        off: u64,
        data: &[u8],
        fua: bool,
        tag: Option<u64>,
        t0: Instant,
        again: bool,
    ) -> Option<Tried> {
        let len = data.len() as u64;
        let (e, ch) = (&self.vol.engine, &mut self.ch);
        let started = if again {
            dproto::restart_write(e, ch, off, len, fua)
        } else {
            dproto::start_write(e, ch, off, len, fua)
        };
        let op = match started {
            Ok(Some(op)) => op,
            Ok(None) => return None,
            Err(x) => return Some(Tried::Done(Err(to_io(x)))),
        };
        if let (Some(tag), false) = (tag, fua) {
            match self.start_direct(op, data, tag, t0) {
                Ok(true) => return Some(Tried::Started),
                Ok(false) => {}
                Err(x) => {
                    op.end(&self.vol.engine, &mut self.ch, &[], false);
                    return Some(Tried::Done(Err(x)));
                }
            }
        }
        let r = self.q.write(off, data);
        Some(Tried::Done(self.finish_direct(op, data, r)))
    }

    /// Puts a started direct write in flight on the ring; false when it has no room
    /// (`W_SLOTS`, `W_BYTES`, or no slot free).
    pub(super) fn start_direct(
        &mut self,
        op: DirectOp,
        data: &[u8],
        tag: u64,
        t0: Instant,
    ) -> io::Result<bool> {
        if self.w_inflight == W_SLOTS || self.w_bytes + data.len() > W_BYTES {
            return Ok(false);
        }
        let Some((slot, b)) = self.ring.begin(data.len(), true)? else {
            return Ok(false);
        };
        b.copy_from_slice(data);
        if let Err(e) = self.ring.add(slot, op.off, 0, data.len()) {
            self.ring.cancel(slot);
            return Err(e);
        }
        self.ring.submit(slot);
        self.writes[slot] = Some(InWrite { tag, op, t0 });
        self.w_inflight += 1;
        self.w_bytes += data.len();
        Ok(true)
    }

    /// A write-zeroes or trim outside write-back (`runtime::direct::start_zeroes`): done
    /// on the backing device, the cached copy invalidated. None: write-back, or dirty
    /// data overlaps; it goes through the cache as a zero extent.
    pub(super) fn zeroes_direct(
        &mut self,
        off: u64,
        len: u64,
        discard: bool,
        fua: bool,
    ) -> Option<io::Result<()>> {
        let op = match dproto::start_zeroes(&self.vol.engine, off, len, discard, fua) {
            Ok(Some(op)) => op,
            Ok(None) => return None,
            Err(x) => return Some(Err(to_io(x))),
        };
        let r = if discard {
            self.q.discard(off, len)
        } else {
            self.q.write_zeroes(off, len)
        };
        Some(self.finish_direct(op, &[], r))
    }

    /// The rest of the direct-write protocol after the backing command returned `r`: its
    /// end in the engine (a write-through is cached there), then the backing FLUSH a FUA
    /// request owes.
    pub(super) fn finish_direct(
        &mut self,
        op: DirectOp,
        data: &[u8],
        r: io::Result<()>,
    ) -> io::Result<()> {
        op.end(&self.vol.engine, &mut self.ch, data, r.is_ok());
        if r.is_err() || !op.needs_flush() {
            return r;
        }
        self.flush_direct()
    }

    /// After a FLUSH: the writes that went around the cache must be durable too.
    pub(super) fn flush_direct(&mut self) -> io::Result<()> {
        if let Some(mark) = dproto::flush_owed(&self.vol.engine) {
            self.q.flush()?;
            self.vol.engine.direct_flushed(mark);
        }
        Ok(())
    }
}
