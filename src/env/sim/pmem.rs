//! Simulated persistent memory that knows which bytes would survive a power loss.
//!
//! [`SimPmem`] implements the engine's [`Pmem`] trait over two byte images: `current`,
//! what reads see, and `durable`, what the medium is guaranteed to hold after a crash.
//! Persistence is tracked per 64-byte cache line, like the hardware:
//!
//! * `write` updates `current` and marks the touched lines *dirty*;
//! * `flush` snapshots each dirty line in its range (the content `clwb` writes back)
//!   and marks it *pending*;
//! * `fence` copies every pending snapshot into `durable` and forgets it.
//!
//! Invariants: a line with state 0 (clean) has `current == durable`; every pending line
//! has exactly one snapshot in `pending`, found through `slot`; a line rewritten after
//! its flush stays dirty (it needs another flush) while its earlier snapshot still
//! becomes durable at the next fence, as on real hardware. `fence` costs O(pending
//! lines), `write` O(bytes + lines), and only `crash` scans the whole line table.
//!
//! [`SimPmem::crash`] produces the medium after a power loss: durable content is kept,
//! and every dirty or pending line is dropped, kept, or torn at 8-byte words as the
//! [`CrashMode`] and the seeded [`Rng`] decide. Crash points are enumerated without
//! unwinding the engine: [`SimPmem::set_fence_limit`] makes the medium "lose power"
//! right after the n-th fence; later calls still run but change nothing durable.
//!
//! This is a test double: out-of-range accesses panic with a message instead of
//! returning errors, because they are engine bugs.

use std::sync::{Mutex, MutexGuard};

use super::rng::Rng;
use crate::engine::Pmem;

/// Cache-line size: the unit of flush and of crash atomicity decisions.
pub const LINE: u64 = 64;
/// Power-fail atomicity unit: a torn line mixes old and new content at this grain.
pub const WORD: usize = 8;

/// Line state bit: written since its last flush.
const DIRTY: u8 = 1;
/// Line state bit: flushed, waiting for a fence; its snapshot lives in `pending`.
const PENDING: u8 = 2;
/// `slot` value of a line with no pending snapshot.
const NO_SLOT: u32 = u32::MAX;

/// What happens at a crash to lines whose latest content is not yet durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CrashMode {
    /// Every unpersisted line reverts to its durable content (the most pessimistic).
    DropAll,
    /// Every unpersisted line keeps its latest content (as if power held out).
    KeepAll,
    /// Per line, chosen with the rng: keep, drop, or tear (each 8-byte word taken
    /// independently from the latest or the durable content).
    Random,
}

/// Operation counters of a [`SimPmem`]. Calls ignored after the simulated power loss
/// are counted only in `ignored`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PmemStats {
    /// `write` calls.
    pub writes: u64,
    /// Bytes stored by `write`.
    pub bytes_written: u64,
    /// `flush` calls.
    pub flushes: u64,
    /// `fence` calls (the persistence points).
    pub fences: u64,
    /// `write`/`flush`/`fence` calls made after the fence limit was reached.
    pub ignored: u64,
}

#[derive(Clone)]
struct Inner {
    /// What reads see.
    current: Vec<u8>,
    /// What survives any crash.
    durable: Vec<u8>,
    /// Per line: `DIRTY | PENDING` bits; 0 means clean (`current == durable`).
    state: Vec<u8>,
    /// Per line: index into `pending`, or `NO_SLOT`.
    slot: Vec<u32>,
    /// Flushed-but-unfenced lines with the content the flush captured.
    pending: Vec<(u32, [u8; LINE as usize])>,
    /// The reads view at the moment of the simulated power loss, saved lazily by the
    /// first write after it; `None` while `current` is still that view.
    frozen: Option<Vec<u8>>,
    stats: PmemStats,
    fence_limit: Option<u64>,
    crashed: bool,
}

impl Inner {
    fn size(&self) -> u64 {
        self.current.len() as u64
    }

    fn check(&self, off: u64, len: u64, what: &str) {
        let end = off.checked_add(len);
        assert!(
            end.is_some_and(|e| e <= self.size()),
            "SimPmem::{what}: range {off}+{len} out of bounds (size {})",
            self.size()
        );
    }

    /// Byte range of line `line`, clipped to the image (the last line may be short).
    fn line_bytes(&self, line: usize) -> std::ops::Range<usize> {
        let start = line * LINE as usize;
        start..(start + LINE as usize).min(self.current.len())
    }

    /// Lines overlapping `[off, off + len)`; empty for `len == 0`.
    fn lines(off: u64, len: u64) -> std::ops::Range<usize> {
        if len == 0 {
            return 0..0;
        }
        (off / LINE) as usize..(off + len).div_ceil(LINE) as usize
    }

    /// Enters the crashed state if the fence counter reached the limit.
    fn check_limit(&mut self) {
        if let Some(limit) = self.fence_limit {
            if self.stats.fences >= limit {
                self.crashed = true;
            }
        }
    }

    /// The content that was current when power was lost (or now, if not crashed).
    fn crash_view(&self) -> &[u8] {
        self.frozen.as_deref().unwrap_or(&self.current)
    }
}

/// Simulated persistent memory; see the module documentation. All methods take
/// `&self` (the [`Pmem`] contract); the state sits behind one mutex, which also makes
/// concurrent calls trivially safe.
pub struct SimPmem {
    inner: Mutex<Inner>,
}

impl SimPmem {
    /// A zero-filled medium of `size` bytes, entirely durable.
    pub fn new(size: u64) -> SimPmem {
        SimPmem::from_image(vec![0; size as usize])
    }

    /// A medium whose current and durable content is `image` (e.g. a post-crash image,
    /// to "reboot" on). Panics if it has `u32::MAX` lines or more (256 GiB).
    pub fn from_image(image: Vec<u8>) -> SimPmem {
        let lines = (image.len() as u64).div_ceil(LINE);
        assert!(lines < u64::from(NO_SLOT), "SimPmem too large");
        let lines = lines as usize;
        SimPmem {
            inner: Mutex::new(Inner {
                durable: image.clone(),
                current: image,
                state: vec![0; lines],
                slot: vec![NO_SLOT; lines],
                pending: Vec::new(),
                frozen: None,
                stats: PmemStats::default(),
                fence_limit: None,
                crashed: false,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not hide the state from the post-mortem.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of what reads currently see.
    pub fn image(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// A copy of the content guaranteed to survive a crash.
    pub fn durable_image(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// Operation counters so far.
    pub fn stats(&self) -> PmemStats {
        self.lock().stats
    }

    /// Number of effective `fence` calls so far: the crash enumerator runs a workload
    /// once, reads this, then replays it with each limit in `0..=points`.
    pub fn persistence_points(&self) -> u64 {
        self.lock().stats.fences
    }

    /// Number of lines whose latest content is not yet durable (dirty or pending).
    pub fn unpersisted_lines(&self) -> usize {
        self.lock().state.iter().filter(|&&s| s != 0).count()
    }

    /// Simulates a power loss right after the `limit`-th fence: once the fence counter
    /// reaches `limit` (at once, if it already has), the medium is *crashed*. Later
    /// `write`/`flush`/`fence` calls change nothing that [`crash`](Self::crash) or
    /// [`durable_image`](Self::durable_image) can see, so the engine keeps running
    /// undisturbed while nothing after the crash point persists. Writes after the
    /// crash still show in reads, so the engine stays self-consistent until the harness
    /// takes the crash image. `None` removes the limit (but does not undo a crash).
    pub fn set_fence_limit(&self, limit: Option<u64>) {
        let mut g = self.lock();
        g.fence_limit = limit;
        g.check_limit();
    }

    /// Whether the fence limit has been reached.
    pub fn crashed(&self) -> bool {
        self.lock().crashed
    }

    /// The medium after a power loss now (or at the fence-limit crash point): durable
    /// content everywhere, and each unpersisted line resolved per `mode`. Deterministic
    /// for a given rng state; the simulator itself is left unchanged.
    pub fn crash(&self, rng: &mut Rng, mode: CrashMode) -> Vec<u8> {
        let g = self.lock();
        let mut out = g.durable.clone();
        if mode == CrashMode::DropAll {
            return out;
        }
        let latest = g.crash_view();
        for (line, &state) in g.state.iter().enumerate() {
            if state == 0 {
                continue;
            }
            let bytes = g.line_bytes(line);
            if mode == CrashMode::KeepAll {
                out[bytes.clone()].copy_from_slice(&latest[bytes]);
                continue;
            }
            // The newest content the line may have reached the medium with: the
            // latest bytes or, for a line rewritten after its flush, possibly the
            // flushed snapshot.
            let newest: &[u8] = if state == DIRTY | PENDING && rng.chance(1, 2) {
                &g.pending[g.slot[line] as usize].1[..bytes.len()]
            } else {
                &latest[bytes.clone()]
            };
            match rng.below(3) {
                0 => {} // dropped: the durable content stays
                1 => out[bytes].copy_from_slice(newest),
                _ => {
                    // Torn: each 8-byte word independently old or new.
                    for (d, s) in out[bytes].chunks_mut(WORD).zip(newest.chunks(WORD)) {
                        if rng.chance(1, 2) {
                            d.copy_from_slice(s);
                        }
                    }
                }
            }
        }
        out
    }

    /// [`crash`](Self::crash), then a fresh medium over the resulting image: the
    /// "reboot" the recovery code runs on.
    pub fn crash_to_pmem(&self, rng: &mut Rng, mode: CrashMode) -> SimPmem {
        SimPmem::from_image(self.crash(rng, mode))
    }
}

impl Clone for SimPmem {
    /// A full copy of the simulator state (images, line states, counters, limit), e.g.
    /// to branch several crash outcomes from one point.
    fn clone(&self) -> SimPmem {
        SimPmem {
            inner: Mutex::new(self.lock().clone()),
        }
    }
}

impl std::fmt::Debug for SimPmem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let g = self.lock();
        f.debug_struct("SimPmem")
            .field("size", &g.size())
            .field("pending", &g.pending.len())
            .field("stats", &g.stats)
            .field("crashed", &g.crashed)
            .finish()
    }
}

impl Pmem for SimPmem {
    fn size(&self) -> u64 {
        self.lock().size()
    }

    /// Panics if the range is out of bounds.
    fn read(&self, off: u64, dst: &mut [u8]) {
        let g = self.lock();
        g.check(off, dst.len() as u64, "read");
        let off = off as usize;
        dst.copy_from_slice(&g.current[off..off + dst.len()]);
    }

    /// Panics if the range is out of bounds.
    fn write(&self, off: u64, src: &[u8]) {
        let mut g = self.lock();
        g.check(off, src.len() as u64, "write");
        if g.crashed {
            // Keep the crash-time view for `crash`, then let reads see the write.
            if g.frozen.is_none() {
                g.frozen = Some(g.current.clone());
            }
            g.stats.ignored += 1;
        } else {
            g.stats.writes += 1;
            g.stats.bytes_written += src.len() as u64;
            for line in Inner::lines(off, src.len() as u64) {
                g.state[line] |= DIRTY;
            }
        }
        let o = off as usize;
        g.current[o..o + src.len()].copy_from_slice(src);
    }

    /// Panics if the range is out of bounds.
    fn flush(&self, off: u64, len: u64) {
        let mut g = self.lock();
        g.check(off, len, "flush");
        if g.crashed {
            g.stats.ignored += 1;
            return;
        }
        g.stats.flushes += 1;
        let g = &mut *g;
        for line in Inner::lines(off, len) {
            if g.state[line] & DIRTY == 0 {
                continue;
            }
            let bytes = g.line_bytes(line);
            let mut snap = [0u8; LINE as usize];
            snap[..bytes.len()].copy_from_slice(&g.current[bytes]);
            if g.slot[line] == NO_SLOT {
                g.slot[line] = g.pending.len() as u32;
                g.pending.push((line as u32, snap));
            } else {
                // Flushed again before the fence: the newer content is what goes out.
                g.pending[g.slot[line] as usize].1 = snap;
            }
            g.state[line] = PENDING;
        }
    }

    fn fence(&self) {
        let mut g = self.lock();
        if g.crashed {
            g.stats.ignored += 1;
            return;
        }
        g.stats.fences += 1;
        let g = &mut *g;
        for (line, snap) in g.pending.drain(..) {
            let line = line as usize;
            let start = line * LINE as usize;
            let end = (start + LINE as usize).min(g.durable.len());
            g.durable[start..end].copy_from_slice(&snap[..end - start]);
            g.slot[line] = NO_SLOT;
            // A line rewritten after its flush stays dirty; otherwise it is now clean.
            g.state[line] &= !PENDING;
        }
        g.check_limit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(len: usize, v: u8) -> Vec<u8> {
        vec![v; len]
    }

    #[test]
    fn unfenced_lines_lost_under_drop_all() {
        let p = SimPmem::new(4096);
        p.write(0, &filled(128, 0xaa));
        p.flush(0, 64); // line 0 flushed but never fenced, line 1 only dirty
        let mut rng = Rng::new(1);
        let img = p.crash(&mut rng, CrashMode::DropAll);
        assert!(img.iter().all(|&b| b == 0));
        // Reads still see the writes.
        let mut buf = [0u8; 128];
        p.read(0, &mut buf);
        assert!(buf.iter().all(|&b| b == 0xaa));
        assert_eq!(p.unpersisted_lines(), 2);
    }

    #[test]
    fn keep_all_keeps_latest() {
        let p = SimPmem::new(1024);
        p.write(10, &filled(100, 7));
        let img = p.crash(&mut Rng::new(0), CrashMode::KeepAll);
        assert_eq!(img, p.image());
    }

    #[test]
    fn fenced_lines_always_survive() {
        let p = SimPmem::new(8192);
        p.persist(64, &filled(200, 0x11));
        // Later unfenced writes to other lines do not disturb them.
        p.write(1024, &filled(300, 0x22));
        for seed in 0..50 {
            for mode in [CrashMode::DropAll, CrashMode::KeepAll, CrashMode::Random] {
                let img = p.crash(&mut Rng::new(seed), mode);
                assert!(img[64..264].iter().all(|&b| b == 0x11));
            }
        }
        assert_eq!(p.durable_image()[64..264], filled(200, 0x11)[..]);
        assert_eq!(p.persistence_points(), 1);
    }

    #[test]
    fn flush_without_fence_and_fence_without_flush_do_not_persist() {
        let p = SimPmem::new(256);
        p.write(0, &[1; 8]);
        p.fence(); // no flush
        assert_eq!(p.durable_image()[..8], [0; 8]);
        p.flush(0, 8);
        assert_eq!(p.durable_image()[..8], [0; 8]);
        p.fence();
        assert_eq!(p.durable_image()[..8], [1; 8]);
        assert_eq!(p.unpersisted_lines(), 0);
    }

    #[test]
    fn flush_covers_only_touched_lines() {
        let p = SimPmem::new(256);
        p.write(60, &[9; 8]); // straddles lines 0 and 1
        p.flush(0, 1); // line 0 only
        p.fence();
        let d = p.durable_image();
        assert_eq!(d[60..64], [9; 4]);
        assert_eq!(d[64..68], [0; 4]);
        p.flush(63, 2); // covers line 1 too
        p.fence();
        assert_eq!(p.durable_image()[64..68], [9; 4]);
    }

    #[test]
    fn rewrite_after_flush_persists_the_flushed_snapshot() {
        let p = SimPmem::new(128);
        p.write(0, &[1; 8]);
        p.flush(0, 8);
        p.write(8, &[2; 8]); // same line, after the flush
        p.fence();
        let d = p.durable_image();
        assert_eq!(d[..8], [1; 8], "flushed content is durable");
        assert_eq!(d[8..16], [0; 8], "later store needs another flush");
        assert_eq!(p.unpersisted_lines(), 1);
        let img = p.crash(&mut Rng::new(3), CrashMode::DropAll);
        assert_eq!(img[..8], [1; 8]);
    }

    #[test]
    fn torn_words_come_from_either_image() {
        let size = 64 * 64;
        let p = SimPmem::from_image(filled(size, 0x01));
        p.persist(0, &filled(size, 0x02));
        p.write(0, &filled(size, 0x03)); // every line dirty again
        let (mut saw_old, mut saw_new, mut saw_torn) = (false, false, false);
        let mut rng = Rng::new(99);
        for _ in 0..20 {
            let img = p.crash(&mut rng, CrashMode::Random);
            for line in img.chunks(64) {
                for word in line.chunks(WORD) {
                    // A word is never mixed inside, and comes from durable or current.
                    assert!(word.iter().all(|&b| b == word[0]));
                    assert!(word[0] == 0x02 || word[0] == 0x03, "{:?}", word);
                }
                let new = line.iter().filter(|&&b| b == 0x03).count();
                match new {
                    0 => saw_old = true,
                    64 => saw_new = true,
                    _ => saw_torn = true,
                }
            }
        }
        assert!(saw_old && saw_new && saw_torn);
    }

    #[test]
    fn crash_is_deterministic_per_seed() {
        let p = SimPmem::new(64 * 100);
        let mut fill = vec![0u8; 64 * 100];
        Rng::new(4).fill(&mut fill);
        p.write(0, &fill);
        let a = p.crash(&mut Rng::new(8), CrashMode::Random);
        let b = p.crash(&mut Rng::new(8), CrashMode::Random);
        assert_eq!(a, b);
    }

    #[test]
    fn fence_limit_freezes_persistence() {
        let p = SimPmem::new(1024);
        p.set_fence_limit(Some(2));
        p.persist(0, &[1; 8]);
        assert!(!p.crashed());
        p.write(64, &[2; 8]);
        p.flush(64, 8);
        p.fence(); // the 2nd fence: persists, then power is lost
        assert!(p.crashed());
        p.write(128, &[3; 8]);
        p.flush(128, 8);
        p.fence();
        p.write(0, &[4; 8]); // overwrite of a durable line after the crash
        assert_eq!(p.persistence_points(), 2);
        assert_eq!(p.stats().ignored, 4);
        // Reads still see post-crash writes, so the engine keeps running coherently.
        let mut buf = [0u8; 8];
        p.read(128, &mut buf);
        assert_eq!(buf, [3; 8]);
        // But no crash outcome contains them.
        for mode in [CrashMode::DropAll, CrashMode::KeepAll, CrashMode::Random] {
            let img = p.crash(&mut Rng::new(5), mode);
            assert_eq!(img[..8], [1; 8]);
            assert_eq!(img[64..72], [2; 8]);
            assert_eq!(img[128..136], [0; 8]);
        }
        let d = p.durable_image();
        assert_eq!(d[128..136], [0; 8]);
    }

    #[test]
    fn fence_limit_keep_all_includes_unfenced_precrash_writes() {
        let p = SimPmem::new(256);
        p.set_fence_limit(Some(0));
        assert!(p.crashed());
        let p = SimPmem::new(256);
        p.set_fence_limit(Some(1));
        p.write(0, &[5; 8]);
        p.fence(); // crash point; line 0 stays dirty (never flushed)
        p.write(0, &[6; 8]);
        let img = p.crash(&mut Rng::new(0), CrashMode::KeepAll);
        assert_eq!(img[..8], [5; 8]);
        let img = p.crash(&mut Rng::new(0), CrashMode::DropAll);
        assert_eq!(img[..8], [0; 8]);
    }

    #[test]
    fn stats_and_reboot() {
        let p = SimPmem::new(512);
        p.write(0, &[1; 100]);
        p.flush(0, 100);
        p.fence();
        let s = p.stats();
        assert_eq!(
            (s.writes, s.bytes_written, s.flushes, s.fences),
            (1, 100, 1, 1)
        );
        let q = p.crash_to_pmem(&mut Rng::new(0), CrashMode::DropAll);
        assert_eq!(q.image(), p.durable_image());
        assert_eq!(q.stats(), PmemStats::default());
        let c = p.clone();
        assert_eq!(c.image(), p.image());
    }

    #[test]
    fn short_last_line() {
        let p = SimPmem::new(100); // line 1 is 36 bytes
        p.persist(90, &[7; 10]);
        p.write(64, &[8; 4]);
        assert_eq!(p.durable_image()[90..], [7; 10]);
        let img = p.crash(&mut Rng::new(2), CrashMode::Random);
        assert_eq!(img.len(), 100);
        assert_eq!(img[90..], [7; 10]);
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn out_of_range_panics() {
        SimPmem::new(64).write(60, &[0; 8]);
    }
}
