//! Several writes of one channel at once, with one store fence for all their data.
//!
//! Why: the medium takes request data with non-temporal stores, and the first fence or
//! locked instruction after them (an sfence, the index shard's lock) waits until every
//! one of them reached memory. One write at a time, each 4 KiB copy is followed at once
//! by that wait, so the copy costs its full memory latency; measured on the SPDK
//! bdevperf randwrite path, that wait was about 40% of a write's time. A batch copies
//! all its requests' data first (`Pmem::write_unordered`), fences once
//! (`Pmem::fence_writes`), and only then inserts the keys, so the copies stream.
//!
//! Semantics are those of calling [`Engine::write`] (without FUA) for each request in
//! order: admission and space are taken in order, and the first request that finds the
//! cache full (`Busy`) ends the batch: it and every later one report `Busy` without
//! having changed anything but what `write` would also leave (pieces of a request split
//! across segments that were already inserted stay, as with `write`, since rewriting is
//! idempotent). So a runtime that queues `Busy` requests in order keeps their order.
//!
//! Invariants: no key is inserted before the fence that follows every data copy of the
//! batch; a staged piece either gets its key or gives back its segment reference; the
//! scratch list lives in the channel, so a batch allocates nothing once warm.

use super::format::SUBTREE_SIZE;
use super::io::{Channel, Staged};
use super::{Engine, IoError, Pmem};

impl<P: Pmem> Engine<P> {
    /// Writes `n` requests, `req(i)` giving request `i`'s offset and data, as `write`
    /// without FUA would one after another (see the module documentation), and puts
    /// each one's outcome in `out` (cleared first; `out[i]` for request `i`).
    pub fn write_many<'a>(
        &self,
        ch: &mut Channel,
        n: usize,
        req: impl Fn(usize) -> (u64, &'a [u8]),
        out: &mut Vec<Result<(), IoError>>,
    ) {
        out.clear();
        self.seal_left(ch);
        let id = self.slot_id(ch);
        let slot = self.slots.get(id);
        let mut staged = std::mem::take(&mut ch.staged);
        staged.clear();
        // Admission and space, in order, up to the first request that finds none.
        let mut ended = false;
        for i in 0..n {
            if ended {
                out.push(Err(IoError::Busy));
                continue;
            }
            let (off, data) = req(i);
            if let Err(e) = self.check_range(off, data.len() as u64) {
                out.push(Err(e));
                continue;
            }
            if let Err(e) = self.admit(data.len() as u64) {
                slot.add(|c| &c.paced, 1);
                out.push(Err(e));
                ended = true;
                continue;
            }
            let mut pos = 0usize;
            let mut r = Ok(());
            while pos < data.len() {
                let o = off + pos as u64;
                let to_boundary = SUBTREE_SIZE - o % SUBTREE_SIZE;
                let want = (data.len() - pos).min(to_boundary as usize) as u64;
                match self.alloc(ch, want) {
                    Ok(a) => {
                        staged.push(Staged {
                            req: i as u32,
                            pos: pos as u32,
                            off: o,
                            len: a.len as u32,
                            seg: a.seg,
                            seg_off: a.off as u32,
                            gen: a.gen,
                        });
                        pos += a.len as usize;
                    }
                    Err(e) => {
                        r = Err(e);
                        break;
                    }
                }
            }
            ended = r.is_err();
            out.push(r);
        }
        // The data of every piece, then one fence for all of it. The keys below go to
        // DRAM ksets; `log::close` drains before storing them.
        for s in &staged {
            let at = self.geo.data_off(s.seg, s.seg_off as u64);
            self.pmem.write_unordered(at, piece(&req, s));
            self.pmem.flush_data(at, s.len as u64);
        }
        if !staged.is_empty() {
            self.pmem.fence_writes();
            self.pmem.fence();
        }
        // The keys, in order; a full log ends the batch as `write` would.
        let mut full_from = None;
        for (k_i, s) in staged.iter().enumerate() {
            let (k, x) = self.data_key(s.off, s.seg, s.seg_off, s.gen, piece(&req, s));
            if let Err(e) = self.insert_key(id, &k, x, false) {
                // insert_key gave this piece's reference back.
                out[s.req as usize] = Err(e);
                full_from = Some(k_i + 1);
                break;
            }
        }
        if let Some(from) = full_from {
            let first = staged[from - 1].req as usize;
            for s in &staged[from..] {
                self.segs.put(&self.pmem, &self.geo, s.seg);
            }
            for r in &mut out[first + 1..] {
                *r = Err(IoError::Busy);
            }
        }
        // The segments this batch filled and left: its pieces are all keyed (or given
        // back) now, so they are sealed here. `ch.left` remembers only the last one,
        // and a batch larger than a segment leaves several.
        if staged.first().map(|s| s.seg) != staged.last().map(|s| s.seg) {
            let open = ch.head().map(|h| h.seg);
            for s in staged.iter().filter(|s| Some(s.seg) != open) {
                self.segs.seal(s.seg, s.gen as u32);
            }
        }
        for (i, r) in out.iter().enumerate() {
            if r.is_ok() {
                slot.add(|c| &c.writes, 1);
                slot.add(|c| &c.bytes_written, req(i).1.len() as u64);
            }
        }
        ch.staged = staged;
    }
}

/// The bytes of staged piece `s` in its request's data.
fn piece<'a>(req: &impl Fn(usize) -> (u64, &'a [u8]), s: &Staged) -> &'a [u8] {
    let (_, data) = req(s.req as usize);
    &data[s.pos as usize..s.pos as usize + s.len as usize]
}
