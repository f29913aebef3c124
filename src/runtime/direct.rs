//! The direct-write protocol, shared by both runtimes: requests the cache policy sends
//! to the backing device instead of through the cache (write-through, write-around,
//! passthrough, the sequential cutoff, and write-zeroes/discard outside write-back).
//!
//! A runtime asks [`start_write`] or [`start_zeroes`]; `None` means the request goes
//! through the cache after all (write-back, or dirty data overlaps). Otherwise it sends
//! the backing command and, when it completes, ends the request in the engine with
//! [`DirectOp::end`] (a write-through is cached there, as unsynced clean data). Only
//! when [`DirectOp::needs_flush`] (FUA) does a backing FLUSH follow, issued after the
//! end with the mark [`Engine::direct_mark`] gives then, and the request completes once
//! that FLUSH did (then [`Engine::direct_flushed`]). So a write-through completes when
//! the backing write and the pmem copy did, at the backing device's speed.
//!
//! Durability: a client FLUSH owes a backing FLUSH when direct writes (write-through
//! included) completed since the last one, or closed ksets hold unsynced keys no
//! completed backing FLUSH covers ([`flush_owed`]); runtimes also flush an idle backing
//! device for them (`sched::direct_flush_due`), and every backing FLUSH they issue for
//! any reason (writeback) reports its mark. Replay drops the unsynced keys of ksets no
//! completed backing FLUSH covered, so after a power loss no block reads a write-through
//! from pmem that the backing device lost.
//!
//! Invariants: every started request is ended exactly once, failed or not (a failed one
//! only withdraws its placeholder), or its range stays uncacheable; a backing FLUSH's
//! mark is taken before it is issued and reported only after it completed.

use crate::engine::{Channel, Direct, Engine, FlushMark, IoError, Pmem, Route};

/// The backing command of a direct request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectKind {
    Write,
    /// Write-zeroes, kept allocated on the backing device.
    Zeroes,
    /// Discard (trim/unmap); reads back as zeroes through the cache's tombstone rules.
    Discard,
}

/// A started direct request (its placeholder is in the index until `end`).
#[derive(Debug, Clone, Copy)]
pub struct DirectOp {
    pub off: u64,
    pub len: u64,
    pub kind: DirectKind,
    pub fua: bool,
    d: Direct,
}

/// Routes a write of `len` bytes at `off`: `Some` when it goes to the backing device.
pub fn start_write<P: Pmem>(
    e: &Engine<P>,
    ch: &mut Channel,
    off: u64,
    len: u64,
    fua: bool,
) -> Result<Option<DirectOp>, IoError> {
    let Route::Direct { through } = e.route_write(ch, off, len) else {
        return Ok(None);
    };
    Ok(e.begin_direct(off, len, through)?.map(|d| DirectOp {
        off,
        len,
        kind: DirectKind::Write,
        fua,
        d,
    }))
}

/// As [`start_write`] for a write the cache took first and that waited since (paced or
/// full): `Some` when it now goes to the backing device (`Engine::reroute_write`).
pub fn restart_write<P: Pmem>(
    e: &Engine<P>,
    ch: &mut Channel,
    off: u64,
    len: u64,
    fua: bool,
) -> Result<Option<DirectOp>, IoError> {
    let Route::Direct { through } = e.reroute_write(ch, off, len) else {
        return Ok(None);
    };
    Ok(e.begin_direct(off, len, through)?.map(|d| DirectOp {
        off,
        len,
        kind: DirectKind::Write,
        fua,
        d,
    }))
}

/// Routes a write-zeroes (`discard` false) or discard: `Some` outside write-back, when
/// no dirty data overlaps.
pub fn start_zeroes<P: Pmem>(
    e: &Engine<P>,
    off: u64,
    len: u64,
    discard: bool,
    fua: bool,
) -> Result<Option<DirectOp>, IoError> {
    if !e.zeroes_direct() {
        return Ok(None);
    }
    let kind = if discard {
        DirectKind::Discard
    } else {
        DirectKind::Zeroes
    };
    Ok(e.begin_direct(off, len, false)?.map(|d| DirectOp {
        off,
        len,
        kind,
        fua,
        d,
    }))
}

/// A client FLUSH (after `Engine::flush`): `Some(mark)` when it owes a backing FLUSH
/// for direct writes or unsynced keys (flush the backing device, then
/// `Engine::direct_flushed(mark)`).
pub fn flush_owed<P: Pmem>(e: &Engine<P>) -> Option<FlushMark> {
    e.direct_flush_needed()
}

impl DirectOp {
    /// A write-through: cached as (unsynced) clean data when it ends.
    pub fn through(&self) -> bool {
        self.d.through
    }
    /// Whether a backing FLUSH must follow before the request completes: only FUA asks
    /// for it. The request is ended in the engine first, so that FLUSH's mark covers it.
    pub fn needs_flush(&self) -> bool {
        self.fua
    }
    /// Whether [`DirectOp::end`] reads the data (only a successful write-through caches
    /// it); otherwise any slice, even empty, will do.
    pub fn wants_data(&self, ok: bool) -> bool {
        ok && self.kind == DirectKind::Write && self.d.through
    }
    /// Ends the request in the engine, as soon as its backing command completed: `ok`
    /// when it succeeded. `data` is the written data when [`DirectOp::wants_data`].
    pub fn end<P: Pmem>(self, e: &Engine<P>, ch: &mut Channel, data: &[u8], ok: bool) {
        match self.kind {
            DirectKind::Write if self.wants_data(ok) => {
                e.end_direct(ch, self.off, data, self.d, ok)
            }
            DirectKind::Write => e.end_direct_uncached(self.off, self.len, self.d, ok),
            DirectKind::Zeroes | DirectKind::Discard => e.end_direct_zeroes(
                self.off,
                self.len,
                self.d,
                ok,
                self.kind == DirectKind::Discard,
            ),
        }
    }
}
