//! Direct writes in flight: a write the cache policy sends to the backing device
//! (write-around, passthrough, the sequential cutoff, write bypass), offered by a
//! reactor with `try_write`, goes on the reactor's ring like a read miss's base reads
//! and is answered when it completes (`reap`), instead of being held until the group
//! commit, which waited for the whole batch with every client of the reactor waiting
//! behind it (a hot set read beside a bypassed sequential stream saw p99 4-6 ms where
//! the bare disk gave 1.6 ms).
//!
//! Invariants: the write was started in the engine (`runtime::direct::start_write`:
//! its placeholder keeps reads of the range from filling) and is ended there exactly
//! once, when its completion is reaped or when the handle is dropped. Held writes that
//! overlap it were written first (`route_direct`). The reactor keeps a client's own
//! requests that overlap it, and its FLUSH, TRIM, write-zeroes and DISC, waiting until
//! it is answered; NBD orders nothing else among requests in flight. FUA writes, and
//! writes that find no free slot, go the old way (at once, or held).

use super::*;

/// A direct write whose backing write is in flight in a ring slot.
pub(super) struct InWrite {
    tag: u64,
    op: DirectOp,
    t0: Instant,
}

impl VolumeConn {
    /// Puts a routed direct write (not FUA) in flight: Err gives the op back when no
    /// slot is free (the caller holds it for the commit instead).
    pub(super) fn start_direct(
        &mut self,
        op: DirectOp,
        data: &[u8],
        tag: u64,
        t0: Instant,
    ) -> Result<(), DirectOp> {
        let Ok(Some((slot, buf))) = self.reads.begin(data.len()) else {
            return Err(op);
        };
        buf.copy_from_slice(data);
        if self.reads.add_write(slot, op.off, 0, data.len()).is_err() {
            self.reads.cancel(slot);
            return Err(op);
        }
        self.reads.submit(slot);
        self.writes[slot] = Some(InWrite { tag, op, t0 });
        self.pending += 1;
        Ok(())
    }

    /// Ends the direct write in slot `i` whose backing write completed (`err`: how it
    /// failed) and frees the slot; returns its tag and result, or None when slot `i`
    /// holds no write.
    pub(super) fn end_direct(
        &mut self,
        i: usize,
        err: Option<io::Error>,
    ) -> Option<(u64, io::Result<()>)> {
        let w = self.writes[i].take()?;
        self.pending -= 1;
        let ok = err.is_none();
        let len = w.op.len as usize;
        let data = if w.op.wants_data(ok) {
            &self.reads.data(i)[..len]
        } else {
            &[]
        };
        let off = w.op.off;
        w.op.end(&self.vol.engine, &mut self.ch, data, ok);
        self.reads.release(i);
        Some((
            w.tag,
            match err {
                None => {
                    self.lat.record(Class::Write, ns_since(w.t0));
                    Ok(())
                }
                Some(e) => {
                    self.vol.engine.io_error(format!(
                        "write of {len} bytes at offset {off} to the backing device failed: {e}"
                    ));
                    Err(e)
                }
            },
        ))
    }
}
