//! The embedded runtime's batch of direct writes: writes the cache policy sends to the
//! backing device (engine `policy.rs`: write-through, write-around, passthrough, the
//! sequential cutoff), held from `write` until the handle's group commit and then written
//! in one io_uring submission, so the queue depth of a reactor pass reaches the disk
//! instead of one write at a time.
//!
//! Each held write was started with `runtime::direct::start_write` and has its
//! placeholder in the index (reads of its range miss and fill nothing meanwhile); `run`
//! writes them all and ends them in the engine (write-throughs are cached there), with
//! no backing FLUSH: none of them is FUA, and the direct-write protocol leaves the
//! FLUSH to the client's FLUSH and the periodic one. The NBD reactor commits before it sends any
//! reply, so no write is answered before it is on the backing device; a failed batch
//! fails the commit, and the reactor disconnects those clients with the replies unsent.
//!
//! Invariants: held writes never overlap each other (the caller runs the batch before
//! accepting an overlapping one), so the order inside a submission does not matter; the
//! handle runs the batch before anything that must see these writes: a read or zeroing
//! of an overlapping range, a FLUSH, a FUA write, and its drop. The buffers are reused:
//! once warm nothing allocates.

use super::backing::{Op, Queue};
use crate::engine::{Channel, Engine};
use crate::env::medium::PosixPmem;
use crate::runtime::direct::DirectOp;
use std::io;

/// Most writes held at once: one ring submission per batch.
const MAX_ITEMS: usize = 64;
/// Most bytes held at once.
const MAX_BYTES: usize = 16 << 20;

struct Item {
    /// Where its data is in `data`.
    at: usize,
    op: DirectOp,
}

#[derive(Default)]
pub(super) struct DirectBatch {
    items: Vec<Item>,
    data: Vec<u8>,
}

impl DirectBatch {
    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether a held write overlaps `[off, off + len)`.
    pub(super) fn overlaps(&self, off: u64, len: u64) -> bool {
        self.items
            .iter()
            .any(|i| i.op.off < off + len && off < i.op.off + i.op.len)
    }

    /// Whether a write of `len` bytes no longer fits (run the batch first).
    pub(super) fn full_for(&self, len: usize) -> bool {
        self.items.len() == MAX_ITEMS || self.data.len() + len > MAX_BYTES
    }

    /// Holds a started direct write (not FUA) until `run`.
    pub(super) fn push(&mut self, data: &[u8], op: DirectOp) {
        debug_assert!(!op.fua && op.len == data.len() as u64);
        let at = self.data.len();
        self.data.extend_from_slice(data);
        self.items.push(Item { at, op });
    }

    /// Writes every held write to the backing device and ends them in the engine. The
    /// first error is returned; every write is ended either way (a failed one only
    /// withdraws its placeholder).
    pub(super) fn run(
        &mut self,
        e: &Engine<PosixPmem>,
        ch: &mut Channel,
        q: &mut Queue,
    ) -> io::Result<()> {
        if self.items.is_empty() {
            return Ok(());
        }
        const BATCH: usize = 16;
        let mut r = Ok(());
        for chunk in self.items.chunks(BATCH) {
            let mut ops: [Op<'_>; BATCH] = std::array::from_fn(|_| Op::Write { off: 0, buf: &[] });
            for (op, i) in ops.iter_mut().zip(chunk) {
                *op = Op::Write {
                    off: i.op.off,
                    buf: &self.data[i.at..i.at + i.op.len as usize],
                };
            }
            if let Err(x) = q.run(&mut ops[..chunk.len()]) {
                r = Err(x);
                break;
            }
        }
        let written = r.is_ok();
        for i in &self.items {
            let data = if i.op.wants_data(written) {
                &self.data[i.at..i.at + i.op.len as usize]
            } else {
                &[]
            };
            i.op.end(e, ch, data, written);
        }
        self.items.clear();
        self.data.clear();
        r
    }
}
