//! Background scheduling rules shared by both runtimes: how often the engine ticks, how
//! writeback backs off after failures, when writeback runs, when an idle cache flushes
//! the backing device for direct writes, when a paced write may overdraw, and how a
//! writeback window's items become backing requests (coalesced, at a bounded depth).
//!
//! Sans-I/O: every function takes "now" in microseconds of the caller's monotonic clock
//! (`Instant` in the embedded runtime, SPDK ticks converted), and none reads one itself,
//! so a runtime reads its clock only where a rule needs it.

use crate::engine::{CacheMode, Engine, FlushMark, Pmem, WbBatch, WbItem, WbKind};

/// Period of the engine's tick (ages kset buffers: those older than two ticks close).
pub const TICK_PERIOD_US: u64 = 100_000;
/// Shortest period of the backing FLUSH for direct writes and unsynced keys
/// (`Engine::direct_flush_needed`): until one covers them, misses over direct writes are
/// cached as unsynced and write-throughs stay unsynced (dropped by a replay after a
/// crash, not moved by GC), so the runtimes flush the backing device for them
/// (`FlushPacer`): at this period where a FLUSH is cheap, further apart where it is not.
pub const DIRECT_FLUSH_PERIOD_US: u64 = 5_000;
/// Longest period of that FLUSH: how long a write-through copy may stay unsynced at most
/// (plus one FLUSH) where flushes are slow.
pub const DIRECT_FLUSH_MAX_US: u64 = 2_000_000;
/// The periodic FLUSH may take at most 1/FLUSH_COST_SHARE of the time: its period is at
/// least this many times what a FLUSH has been taking. A FLUSH of a file on a VM's disk
/// (bdev_aio: a synchronous fsync on the reactor) took 2-5 ms, and a 5 ms period held
/// random writes that bypass the cache to 0.62-0.75x the bare base's.
pub const FLUSH_COST_SHARE: u64 = 50;
/// A base FLUSH slower than this makes writeback recycle (`set_window_rules`). Over an
/// emulated base (a delay bdev over malloc, FLUSH about 5 us) recycling cost the SPDK
/// in-cache random writes 6-25% of their IOPS (moving a sixth to a third of the bytes
/// writeback would write); over bdev_aio on a VM's disk (FLUSH 2-5 ms, a synchronous
/// fsync on the reactor) writeback's FLUSHes and writes kept the reactor off the CPU
/// most of the time.
pub const RECYCLE_FLUSH_US: u64 = 100;
/// Longest a paced write waits for admission credit before it may overdraw it
/// (`Engine::overdraw`): a pause of writeback then costs cache headroom, not latency.
pub const PACE_WAIT_MAX_US: u64 = 2_000;
/// First and longest pause of writeback after a failure (doubling in between).
pub const BACKOFF_MIN_MS: u64 = 10;
pub const BACKOFF_MAX_MS: u64 = 5_000;

/// Exponential backoff of writeback after failures. The data stays dirty in pmem and is
/// written again; the runner skips writeback until the retry time rather than sleeping
/// through it (it may be a reactor that also serves clients).
#[derive(Debug, Default, Clone, Copy)]
pub struct Backoff {
    ms: u64,
    /// No writeback before this time (us); 0 = not backing off.
    retry_at_us: u64,
}

impl Backoff {
    /// A failure at `now_us`: returns the new pause in ms (10 ms doubling to 5 s).
    pub fn failed(&mut self, now_us: u64) -> u64 {
        self.ms = (self.ms * 2).clamp(BACKOFF_MIN_MS, BACKOFF_MAX_MS);
        self.retry_at_us = now_us.saturating_add(self.ms * 1000).max(1);
        self.ms
    }
    /// A success: returns true when it ends a backoff ("writeback recovered").
    pub fn succeeded(&mut self) -> bool {
        let was = self.ms > 0;
        *self = Backoff::default();
        was
    }
    /// Whether writeback may run now. `now_us` is only called while backing off, so the
    /// common case reads no clock.
    pub fn allows(&self, now_us: impl FnOnce() -> u64) -> bool {
        self.retry_at_us == 0 || now_us() >= self.retry_at_us
    }
    /// The current pause (0 when not backing off).
    pub fn ms(&self) -> u64 {
        self.ms
    }
}

/// A period timer (the tick).
#[derive(Debug, Default, Clone, Copy)]
pub struct Every {
    last_us: u64,
}

impl Every {
    /// True (and restarted) when `period_us` has passed since the last time it fired.
    pub fn due(&mut self, now_us: u64, period_us: u64) -> bool {
        if now_us.wrapping_sub(self.last_us) >= period_us {
            self.last_us = now_us;
            return true;
        }
        false
    }
}

/// The pacing of the periodic backing FLUSH for direct writes and unsynced keys
/// (`direct_flush_due`): its period follows what the base's FLUSHes cost, as a moving
/// average of their durations (`flushed`), so that they take at most
/// 1/FLUSH_COST_SHARE of the time, between DIRECT_FLUSH_PERIOD_US and
/// DIRECT_FLUSH_MAX_US apart.
#[derive(Debug, Default, Clone, Copy)]
pub struct FlushPacer {
    timer: Every,
    /// Moving average of a FLUSH's duration (us), 1/4 weight to the newest.
    cost_us: u64,
}

impl FlushPacer {
    /// The current period (us).
    pub fn period_us(&self) -> u64 {
        (self.cost_us.saturating_mul(FLUSH_COST_SHARE))
            .clamp(DIRECT_FLUSH_PERIOD_US, DIRECT_FLUSH_MAX_US)
    }
    /// A backing FLUSH that took `took_us` completed (any FLUSH: each measures the base).
    pub fn flushed(&mut self, took_us: u64) {
        self.cost_us = if self.cost_us == 0 {
            took_us
        } else {
            (self.cost_us * 3 + took_us) / 4
        };
    }
    /// The moving average of a FLUSH's duration (us), for status.
    pub fn cost_us(&self) -> u64 {
        self.cost_us
    }
}

/// Sets how writeback's next window treats a mostly superseded predecessor, from what
/// the base's FLUSH costs (RECYCLE_FLUSH_US divides cheap from slow):
/// * recycling (`WbBatch::set_recycle`), never in a drain and only over a slow FLUSH:
///   it saves a window's backing writes and FLUSH at the price of copies in the
///   medium, which pays only where those are expensive;
/// * small windows after sparse ones (`WbBatch::set_small_windows`), only over a cheap
///   FLUSH, since every window pays one.
pub fn set_window_rules(wb: &mut WbBatch, drain: bool, pacer: &FlushPacer) {
    let slow = pacer.cost_us() >= RECYCLE_FLUSH_US;
    wb.set_recycle(!drain && slow);
    wb.set_small_windows(!slow);
}

/// What the background runner does before a round: writers waiting for space need the
/// buffered keys in the log, where writeback and GC can reach them.
pub fn before_round<P: Pmem>(e: &Engine<P>) {
    if e.cache_full() {
        let _ = e.close_ksets();
    }
}

/// Whether writeback should take a window now: a drain wants everything (even while
/// backing off: the user asked), otherwise the engine decides (lazily, so overwrites
/// supersede older dirty data first) unless writeback is backing off.
pub fn writeback_due<P: Pmem>(
    e: &Engine<P>,
    drain: bool,
    backoff: &Backoff,
    now_us: impl FnOnce() -> u64,
) -> bool {
    drain || (e.writeback_wanted() && backoff.allows(now_us))
}

/// The periodic backing FLUSH for direct writes and unsynced keys: `Some(mark)` when
/// one is owed and the pacer's period has passed (the runtime flushes, then calls
/// `Engine::direct_flushed(mark)` and `FlushPacer::flushed` with how long it took).
/// Writeback's own FLUSHes report their marks too, so while they run this is rarely
/// owed; a write-through stream (whose writeback windows are empty and flush nothing)
/// gets one FLUSH per period, not one per write.
///
/// Never in passthrough: the flush exists so read misses can be cached again soon after
/// direct writes and write-through copies become synced, and passthrough caches
/// neither; a client FLUSH still flushes the backing device for its writes. (On a
/// bdev_aio base, whose FLUSH is a synchronous fsync, the 5 ms flush held passthrough
/// random writes to 0.62-0.75x the bare base's IOPS on one machine.)
pub fn direct_flush_due<P: Pmem>(
    e: &Engine<P>,
    pacer: &mut FlushPacer,
    now_us: u64,
) -> Option<FlushMark> {
    if e.mode() == CacheMode::PassThrough {
        return None;
    }
    let mark = e.direct_flush_needed()?;
    let period = pacer.period_us();
    pacer.timer.due(now_us, period).then_some(mark)
}

/// A paced write that has waited `waited_us` for admission credit: may it overdraw now?
/// (Only after PACE_WAIT_MAX_US, and only while the engine has headroom.)
pub fn may_overdraw<P: Pmem>(e: &Engine<P>, waited_us: u64) -> bool {
    waited_us >= PACE_WAIT_MAX_US && e.overdraw()
}

/// Writeback's requests in flight at most: `busy` while foreground read misses wait for
/// the base (they go first) and no writer waits on writeback, `full` otherwise (paced
/// writers are foreground work too, and writeback's depth is their speed).
pub fn writeback_depth<P: Pmem>(e: &Engine<P>, fg_reads: usize, busy: usize, full: usize) -> usize {
    if fg_reads > 0 && !e.writers_wait_on_writeback() {
        busy.min(full)
    } else {
        full
    }
}

/// The length of one backing request made of the whole item `items[i]` and the whole
/// items after it that continue it on the backing device (and, with `same_src`, in the
/// medium too, for a request written straight from the mapping), at most `max` bytes in
/// all. Zero and discard extents join each other (both become write-zeroes). `items[i]`
/// itself must fit in `max`, or the request is that item alone.
pub fn coalesce(items: &[WbItem], i: usize, max: u64, same_src: bool) -> u64 {
    let first = items[i];
    let mut len = first.len as u64;
    for next in &items[i + 1..] {
        let joins = next.off == first.off + len
            && match (first.kind, next.kind) {
                (WbKind::Data { pmem_off: a }, WbKind::Data { pmem_off: b }) => {
                    !same_src || b == a + len
                }
                (WbKind::Zero | WbKind::Discard, WbKind::Zero | WbKind::Discard) => true,
                _ => false,
            };
        if !joins || len + next.len as u64 > max {
            break;
        }
        len += next.len as u64;
    }
    len
}

/// Number of whole items covered by a request of `len` bytes starting at item `i`
/// (after `coalesce`, which only joins whole items).
pub fn items_in(items: &[WbItem], i: usize, len: u64) -> usize {
    let mut n = 0;
    let mut got = 0u64;
    while i + n < items.len() && got < len {
        got += items[i + n].len as u64;
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_limit_and_resets() {
        let mut b = Backoff::default();
        assert!(b.allows(|| unreachable!("no clock read while not backing off")));
        assert_eq!(b.failed(1_000), 10);
        assert!(!b.allows(|| 5_000));
        assert!(b.allows(|| 11_000));
        let ms: Vec<u64> = (0..12).map(|_| b.failed(0)).collect();
        assert_eq!(&ms[..4], &[20, 40, 80, 160]);
        assert_eq!(*ms.last().unwrap(), BACKOFF_MAX_MS);
        assert!(b.succeeded());
        assert!(!b.succeeded());
        assert_eq!(b.ms(), 0);
    }

    #[test]
    fn period_timer_fires_once_per_period() {
        let mut t = Every::default();
        assert!(t.due(10_000, 5_000));
        assert!(!t.due(12_000, 5_000));
        assert!(t.due(15_000, 5_000));
    }

    #[test]
    fn flush_period_follows_the_cost_of_a_flush() {
        let mut p = FlushPacer::default();
        assert_eq!(p.period_us(), DIRECT_FLUSH_PERIOD_US);
        p.flushed(20);
        assert_eq!(
            p.period_us(),
            DIRECT_FLUSH_PERIOD_US,
            "cheap: the shortest period"
        );
        for _ in 0..20 {
            p.flushed(10_000);
        }
        assert!(p.cost_us() > 9_000);
        assert!(
            (450_000..=500_000).contains(&p.period_us()),
            "{}",
            p.period_us()
        );
        p.flushed(10_000_000);
        assert_eq!(p.period_us(), DIRECT_FLUSH_MAX_US);
        for _ in 0..40 {
            p.flushed(50);
        }
        assert_eq!(
            p.period_us(),
            DIRECT_FLUSH_PERIOD_US,
            "cheap again: short again"
        );
    }

    #[test]
    fn coalesce_joins_only_continuing_items() {
        let d = |off, len, p| WbItem {
            off,
            len,
            kind: WbKind::Data { pmem_off: p },
        };
        let z = |off, len| WbItem {
            off,
            len,
            kind: WbKind::Zero,
        };
        let items = [
            d(0, 4096, 100_000),
            d(4096, 4096, 200_000),
            d(8192, 4096, 204_096),
            z(12288, 4096),
            z(16384, 512),
            d(65536, 4096, 0),
        ];
        assert_eq!(coalesce(&items, 0, u64::MAX, false), 12288);
        assert_eq!(coalesce(&items, 0, u64::MAX, true), 4096);
        assert_eq!(coalesce(&items, 1, u64::MAX, true), 8192);
        assert_eq!(coalesce(&items, 0, 8192, false), 8192);
        assert_eq!(coalesce(&items, 3, u64::MAX, false), 4608);
        assert_eq!(coalesce(&items, 5, u64::MAX, false), 4096);
        assert_eq!(items_in(&items, 0, 12288), 3);
        assert_eq!(items_in(&items, 3, 4608), 2);
    }
}
