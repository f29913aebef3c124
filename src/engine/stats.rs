//! Statistics: relaxed atomic counters bumped on the I/O path, and a snapshot type that
//! status, the control socket and JSON-RPC print.
//!
//! Every counted error also leaves its text and time in a last-error slot (a short lock:
//! errors are rare), so a non-zero error count always comes with its explanation.

use super::latency::LatencySnapshot;
use super::sync::lock;
use super::{Engine, Pmem};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        super::sync::count::rmw();
        self.0.fetch_add(1, Relaxed);
    }
    pub fn add(&self, n: u64) {
        super::sync::count::rmw();
        self.0.fetch_add(n, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Counters of the rarer events, shared by every channel (the per-request ones live in
/// each channel's slot, `slots::ChanCounters`).
#[derive(Default)]
pub struct Counters {
    pub flushes: Counter,
    pub zeroes: Counter,
    pub discards: Counter,
    pub wb_ksets: Counter,
    pub wb_bytes: Counter,
    pub wb_skipped_bytes: Counter,
    pub wb_errors: Counter,
    pub gc_ksets: Counter,
    pub segs_reclaimed: Counter,
    pub crc_errors_clean: Counter,
    pub crc_errors_dirty: Counter,
    pub io_errors: Counter,
    /// Paced writes let in without credit after waiting too long (`Engine::overdraw`).
    pub overdrawn: Counter,
    /// Direct writes or mode switches that dropped cached clean data.
    pub invalidations: Counter,
    /// Ksets closed early because another channel appended to a region whose latest
    /// key they held (`Engine::kset_for`).
    pub ordering_closes: Counter,
    /// Bytes of read-hot clean data GC moved to the log head instead of dropping.
    pub relocated_bytes: Counter,
    /// Data segments compaction reclaimed out of log order (`compact`).
    pub segs_compacted: Counter,
    /// Bytes of live dirty data writeback moved to the log head instead of writing it
    /// back (`recycle`).
    pub recycled_bytes: Counter,
}

/// An error that was counted: what happened, and when (milliseconds since the Unix
/// epoch, from the environment's wall clock; 0 where it has none).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ErrorEvent {
    pub message: String,
    pub unix_ms: u64,
}

/// A point-in-time view of the cache.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Stats {
    pub mode: &'static str,
    pub data_crc: bool,
    pub gc_percent: u32,
    pub segment_size: u64,
    pub segments_total: u32,
    pub segments_used: u32,
    pub backing_size: u64,
    pub dirty_bytes: u64,
    /// Index entries: extents, placeholders and the holes GC leaves for the next write
    /// of a range (what the index's memory holds; see `index::F_HOLE`).
    pub cached_extents: u64,
    /// Bytes of cached data the index maps (dirty and clean), and the data area they
    /// share with the log and the free reserve: how much of the medium holds data.
    pub cached_bytes: u64,
    pub capacity_bytes: u64,
    pub key_head: String,
    pub dirty_tail: String,
    pub key_tail: String,
    pub reads: u64,
    pub writes: u64,
    pub hits: u64,
    pub misses: u64,
    pub partial_hits: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub bytes_hit: u64,
    pub fills: u64,
    pub flushes: u64,
    pub write_zeroes: u64,
    pub discards: u64,
    /// Times the cache became full (allocation failed after space was available).
    pub cache_full_events: u64,
    /// Requests waiting for cache space right now.
    pub waiting_requests: u64,
    /// Write attempts held back by admission pacing above the GC watermark (retried).
    pub paced_writes: u64,
    /// Paced writes let in without credit after waiting too long, while the cache had
    /// headroom (`Engine::overdraw`).
    pub overdrawn_writes: u64,
    pub writeback_ksets: u64,
    pub writeback_bytes: u64,
    /// Dirty bytes writeback left out because a newer write of the same epoch, already
    /// in the log, covers them (written back later instead).
    pub writeback_skipped_bytes: u64,
    pub writeback_errors: u64,
    pub gc_ksets: u64,
    /// Bytes of clean data that was read since written which GC kept by moving it.
    pub relocated_bytes: u64,
    /// Bytes of live dirty data of the current write epoch that writeback moved to the
    /// log head instead of writing them back (mostly superseded windows, writes going on).
    pub recycled_bytes: u64,
    pub segments_reclaimed: u64,
    /// Besides those, segments reclaimed out of log order because what they held was
    /// mostly superseded (compaction; their live clean data moved or dropped).
    pub segments_compacted: u64,
    pub crc_errors_clean: u64,
    pub crc_errors_dirty: u64,
    /// Requests that failed (backing-device reads, corrupt dirty data, ...).
    pub io_errors: u64,
    /// The last counted I/O error (CRC errors included).
    pub last_io_error: Option<ErrorEvent>,
    /// The last writeback error (a failed batch, or why writeback stopped).
    pub last_writeback_error: Option<ErrorEvent>,
    pub writeback_stopped: Option<String>,
    pub gc_stopped: Option<String>,
    /// Latency histograms merged over every channel, cumulative since open.
    pub latency: LatencySnapshot,
    pub seq_cutoff_kib: u32,
    pub seq_cutoff_policy: &'static str,
    /// Write-bypass threshold (`Policy::write_bypass_kib`; 0 = off).
    pub write_bypass_kib: u32,
    /// `Policy::promotion`'s name.
    pub promotion: &'static str,
    pub bypassed_requests: u64,
    pub bypassed_bytes: u64,
    /// Read-miss bytes not cached once the cache was full because they had not missed
    /// recently before (the doorkeeper: a block is cached on its second miss).
    pub fill_declined_bytes: u64,
    pub invalidations: u64,
    /// Ksets closed before they were full or aged because another channel wrote to a
    /// region whose latest key they held (keys of a region reach the log in order).
    pub kset_ordering_closes: u64,
}

fn pos(p: super::LogPos) -> String {
    format!("{}:{}#{}", p.seg, p.off, p.seq)
}

impl<P: Pmem> Engine<P> {
    /// Dirty bytes: in closed ksets past dirty_tail plus those still buffered.
    /// Cheap enough to poll: one log head lock, no kset or shard lock.
    pub fn dirty_bytes(&self) -> u64 {
        let buffered: u64 = self.slots.used().map(|(_, s)| s.dirty.load(Relaxed)).sum();
        lock(&self.head).closed_dirty + buffered
    }

    /// Why writeback stopped, if it did (what a drain polls, instead of `stats`).
    pub fn writeback_stopped(&self) -> Option<String> {
        lock(&self.errors).writeback.clone()
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let (kt, dt) = {
            let t = lock(&self.tails);
            (t.key, t.dirty)
        };
        let kh = lock(&self.head).pos;
        // Cloned out at once: the index and log locks below are never taken under it.
        let (wb_stopped, gc_stopped, last_io, last_wb) = {
            let e = lock(&self.errors);
            let e = &*e;
            (
                e.writeback.clone(),
                e.gc.clone(),
                e.last_io.clone(),
                e.last_writeback.clone(),
            )
        };
        Stats {
            mode: self.policy().mode.name(),
            data_crc: self.data_crc,
            gc_percent: self.gc_percent(),
            segment_size: self.geo.seg_size,
            segments_total: self.geo.n_segs,
            segments_used: self.segs.used(),
            backing_size: self.geo.backing_size,
            dirty_bytes: self.dirty_bytes(),
            // Settles every replayed shard (once), as an access would; then only reads
            // the counts the shards published, locking none.
            cached_extents: {
                self.settle_all();
                self.aux.iter().map(|a| a.len.load(Relaxed) as u64).sum()
            },
            cached_bytes: self.aux.iter().map(|a| a.data.load(Relaxed)).sum(),
            capacity_bytes: self.geo.n_segs as u64 * self.geo.seg_data_size,
            key_head: pos(kh),
            dirty_tail: pos(dt),
            key_tail: pos(kt),
            reads: self.slot_sum(|s| &s.reads),
            writes: self.slot_sum(|s| &s.writes),
            hits: self.slot_sum(|s| &s.hits),
            misses: self.slot_sum(|s| &s.misses),
            partial_hits: self.slot_sum(|s| &s.partial_hits),
            bytes_read: self.slot_sum(|s| &s.bytes_read),
            bytes_written: self.slot_sum(|s| &s.bytes_written),
            bytes_hit: self.slot_sum(|s| &s.bytes_hit),
            fills: self.slot_sum(|s| &s.fills),
            flushes: c.flushes.get(),
            write_zeroes: c.zeroes.get(),
            discards: c.discards.get(),
            cache_full_events: self.segs.full_events.load(Relaxed),
            waiting_requests: self.waiting.load(Relaxed),
            paced_writes: self.slot_sum(|s| &s.paced),
            overdrawn_writes: c.overdrawn.get(),
            writeback_ksets: c.wb_ksets.get(),
            writeback_bytes: c.wb_bytes.get(),
            writeback_skipped_bytes: c.wb_skipped_bytes.get(),
            writeback_errors: c.wb_errors.get(),
            gc_ksets: c.gc_ksets.get(),
            relocated_bytes: c.relocated_bytes.get(),
            recycled_bytes: c.recycled_bytes.get(),
            segments_reclaimed: c.segs_reclaimed.get(),
            segments_compacted: c.segs_compacted.get(),
            crc_errors_clean: c.crc_errors_clean.get(),
            crc_errors_dirty: c.crc_errors_dirty.get(),
            io_errors: c.io_errors.get(),
            last_io_error: last_io,
            last_writeback_error: last_wb,
            writeback_stopped: wb_stopped,
            gc_stopped,
            latency: self.latency.snapshot(),
            seq_cutoff_kib: self.policy().seq_cutoff_kib,
            seq_cutoff_policy: self.policy().seq_policy.name(),
            write_bypass_kib: self.policy().write_bypass_kib,
            promotion: self.policy().promotion.name(),
            bypassed_requests: self.slot_sum(|s| &s.bypassed),
            bypassed_bytes: self.slot_sum(|s| &s.bypassed_bytes),
            fill_declined_bytes: self.slot_sum(|s| &s.declined_bytes),
            invalidations: c.invalidations.get(),
            kset_ordering_closes: c.ordering_closes.get(),
        }
    }
}
