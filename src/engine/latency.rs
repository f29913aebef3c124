//! Latency histograms: one set per I/O channel (SPDK channel, NBD reactor, writeback
//! runner), recorded without a lock or an allocation, merged on demand into a snapshot.
//!
//! The engine has no clock: the environment measures a request and calls
//! `LatencySet::record` with nanoseconds. A histogram is a fixed log-linear bucket array
//! (HDR-like): values below 2^SUB_BITS nanoseconds have a bucket each; above, every
//! power of two is split into 2^SUB_BITS equal buckets, so a bucket is at most 1/64 of
//! its values wide and a quantile read back from it (the bucket's midpoint) is within
//! 1/128 (0.8 %) of the true value. Values are capped at `MAX_NS` (about 137 s).
//!
//! Invariants: each `LatencySet` has ONE writer (the channel that owns it); recording is
//! a relaxed load and store per word (no lock prefix, no read-modify-write), and readers
//! on other threads see counts that may lag by a request, never torn ones (each word is
//! an atomic). A second writer would only lose counts, never corrupt memory. A set
//! retired from its `Registry` leaves its counts behind, so cumulative counts never go
//! backwards.

use serde::{Serialize, Serializer};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Linear sub-buckets per power of two, as a power of two.
pub const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
/// Largest recorded value, in nanoseconds (larger values count as this).
pub const MAX_NS: u64 = (1 << 37) - 1;
/// Number of buckets: the linear range, then SUB per power of two up to 2^37.
pub const BUCKETS: usize = SUB + (37 - SUB_BITS as usize) * SUB;

/// What a latency was measured for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A read served entirely from the cache.
    ReadHit = 0,
    /// A read that needed the backing device for some of its range.
    ReadMiss = 1,
    Write = 2,
    Flush = 3,
    /// One backing-device request of writeback (a write, or the FLUSH after a kset).
    Writeback = 4,
}

/// Stable names of the classes, in `Class` order (JSON and metric labels).
pub const CLASS_NAMES: [&str; 5] = ["read_hit", "read_miss", "write", "flush", "writeback"];

/// The bucket of a value in nanoseconds.
pub fn bucket_of(ns: u64) -> usize {
    let v = ns.min(MAX_NS);
    if v < SUB as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // floor(log2 v) >= SUB_BITS
    let m = (v >> (e - SUB_BITS)) as usize & (SUB - 1);
    SUB + (e - SUB_BITS) as usize * SUB + m
}

/// The values `[lo, hi]` a bucket holds.
pub fn bucket_range(i: usize) -> (u64, u64) {
    if i < SUB {
        return (i as u64, i as u64);
    }
    let e = ((i - SUB) / SUB) as u32 + SUB_BITS;
    let m = ((i - SUB) % SUB) as u64;
    let w = 1u64 << (e - SUB_BITS);
    let lo = (1u64 << e) + m * w;
    (lo, lo + w - 1)
}

/// One channel's histogram of one class.
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
    max_ns: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
            max_ns: AtomicU64::new(0),
        }
    }
}

/// Single-writer increment: a plain load and store (see the module invariants).
fn bump(a: &AtomicU64, by: u64) {
    a.store(a.load(Relaxed).wrapping_add(by), Relaxed);
}

impl Histogram {
    /// Records one value (owner thread only).
    pub fn record(&self, ns: u64) {
        bump(&self.buckets[bucket_of(ns)], 1);
        bump(&self.sum_ns, ns);
        if ns > self.max_ns.load(Relaxed) {
            self.max_ns.store(ns, Relaxed);
        }
    }

    fn add_to(&self, s: &mut HistSnapshot) {
        for (d, b) in s.buckets.iter_mut().zip(self.buckets.iter()) {
            *d += b.load(Relaxed);
        }
        s.sum_ns += self.sum_ns.load(Relaxed);
        s.max_ns = s.max_ns.max(self.max_ns.load(Relaxed));
    }
}

/// The histograms of one channel, one per class.
#[derive(Default)]
pub struct LatencySet {
    h: [Histogram; 5],
}

impl LatencySet {
    /// Records a latency of `class` (owner thread only; no lock, no allocation).
    pub fn record(&self, class: Class, ns: u64) {
        self.h[class as usize].record(ns);
    }
}

/// Every channel's set, for merging. Channels register when they are created and retire
/// when they end (neither on the I/O path); a retired set's counts are folded into the
/// registry, so totals never go backwards and channels that come and go leave no memory.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Sets>,
}

#[derive(Default)]
struct Sets {
    live: Vec<Arc<LatencySet>>,
    retired: LatencySnapshot,
}

impl Registry {
    /// A new set for a channel, included in every later snapshot.
    pub fn register(&self) -> Arc<LatencySet> {
        let s = Arc::new(LatencySet::default());
        self.inner.lock().unwrap().live.push(Arc::clone(&s));
        s
    }

    /// The channel of `set` ended (its owner records no more): keep its counts, drop it.
    pub fn retire(&self, set: &Arc<LatencySet>) {
        let mut g = self.inner.lock().unwrap();
        if let Some(i) = g.live.iter().position(|s| Arc::ptr_eq(s, set)) {
            let s = g.live.swap_remove(i);
            for (h, r) in s.h.iter().zip(g.retired.classes.iter_mut()) {
                h.add_to(r);
            }
        }
    }

    /// Merges every channel's histograms (and the retired ones).
    pub fn snapshot(&self) -> LatencySnapshot {
        let g = self.inner.lock().unwrap();
        let mut out = g.retired.clone();
        for set in &g.live {
            for (h, s) in set.h.iter().zip(out.classes.iter_mut()) {
                h.add_to(s);
            }
        }
        out
    }
}

/// A merged histogram: cumulative since the cache was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistSnapshot {
    pub buckets: Vec<u64>,
    pub sum_ns: u64,
    pub max_ns: u64,
}

impl Default for HistSnapshot {
    fn default() -> Self {
        HistSnapshot {
            buckets: vec![0; BUCKETS],
            sum_ns: 0,
            max_ns: 0,
        }
    }
}

impl HistSnapshot {
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// The value at quantile `q` (0..=1) in nanoseconds, within 1/128 of a recorded value
    /// of that rank; the exact maximum for q = 1; 0 when empty.
    pub fn quantile(&self, q: f64) -> u64 {
        let n = self.count();
        if n == 0 {
            return 0;
        }
        if q >= 1.0 {
            return self.max_ns;
        }
        // The rank (1-based) of the value asked for: the smallest with at least q*n at or
        // below it.
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).clamp(1, n);
        let mut seen = 0;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                if seen == n && self.max_ns > 0 {
                    // The last bucket holds the maximum: never report beyond it.
                    let (lo, hi) = bucket_range(i);
                    return (lo + (hi - lo) / 2).min(self.max_ns);
                }
                let (lo, hi) = bucket_range(i);
                return lo + (hi - lo) / 2;
            }
        }
        self.max_ns
    }

    /// Values recorded since `earlier` (a previous snapshot of the same channels). The
    /// maximum stays the all-time one: it cannot be taken apart.
    pub fn since(&self, earlier: &HistSnapshot) -> HistSnapshot {
        HistSnapshot {
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            sum_ns: self.sum_ns.saturating_sub(earlier.sum_ns),
            max_ns: self.max_ns,
        }
    }

    /// Count, mean and quantiles in microseconds.
    pub fn summary(&self) -> LatencySummary {
        let n = self.count();
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySummary {
            count: n,
            mean_us: if n == 0 {
                0.0
            } else {
                self.sum_ns as f64 / n as f64 / 1000.0
            },
            p50_us: us(self.quantile(0.5)),
            p99_us: us(self.quantile(0.99)),
            p999_us: us(self.quantile(0.999)),
            max_us: us(self.max_ns),
        }
    }

    /// Non-empty buckets as (index, count), for carrying a histogram in JSON.
    pub fn sparse(&self) -> Vec<(u32, u64)> {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, &c)| c > 0)
            .map(|(i, &c)| (i as u32, c))
            .collect()
    }

    /// The inverse of `sparse`; out-of-range indices are an error.
    pub fn from_sparse(
        pairs: &[(u32, u64)],
        sum_ns: u64,
        max_ns: u64,
    ) -> Result<HistSnapshot, String> {
        let mut s = HistSnapshot {
            sum_ns,
            max_ns,
            ..HistSnapshot::default()
        };
        for &(i, c) in pairs {
            let b = s
                .buckets
                .get_mut(i as usize)
                .ok_or_else(|| format!("histogram bucket {i} out of range"))?;
            *b += c;
        }
        Ok(s)
    }
}

/// What status and the RPC print per class.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Every class, merged over all channels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencySnapshot {
    pub classes: [HistSnapshot; 5],
}

impl LatencySnapshot {
    pub fn class(&self, c: Class) -> &HistSnapshot {
        &self.classes[c as usize]
    }
}

/// One class in JSON: the summary, plus what a client needs to rebuild the histogram.
#[derive(Serialize)]
struct ClassJson {
    #[serde(flatten)]
    summary: LatencySummary,
    sum_ns: u64,
    max_ns: u64,
    buckets: Vec<(u32, u64)>,
}

/// JSON: `{"read_hit": {"count":..,"p50_us":..,..,"sum_ns":..,"max_ns":..,"buckets":[[i,n],..]}, ..}`
/// (the buckets let a client compute per-interval figures from two snapshots).
impl Serialize for LatencySnapshot {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(CLASS_NAMES.len()))?;
        for (name, h) in CLASS_NAMES.iter().zip(&self.classes) {
            let c = ClassJson {
                summary: h.summary(),
                sum_ns: h.sum_ns,
                max_ns: h.max_ns,
                buckets: h.sparse(),
            };
            m.serialize_entry(name, &c)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn buckets_tile_the_range() {
        let mut next = 0;
        for i in 0..BUCKETS {
            let (lo, hi) = bucket_range(i);
            assert_eq!(lo, next, "bucket {i}");
            assert_eq!(bucket_of(lo), i);
            assert_eq!(bucket_of(hi), i);
            assert!(hi - lo <= lo / SUB as u64, "bucket {i} too wide");
            next = hi + 1;
        }
        assert_eq!(next, MAX_NS + 1);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    fn oracle(sorted: &[u64], q: f64) -> u64 {
        let n = sorted.len() as u64;
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        sorted[rank as usize - 1]
    }

    proptest! {
        /// Quantiles against a sorted-vector oracle: within 1/128 of the true value
        /// (plus one nanosecond of rounding in the linear range).
        #[test]
        fn quantiles_within_stated_error(
            vals in prop::collection::vec(
                prop_oneof![0u64..200, 200u64..100_000, 100_000u64..MAX_NS], 1..2000),
            q in prop::sample::select(vec![0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0]),
            channels in 1usize..4,
        ) {
            let reg = Registry::default();
            let sets: Vec<_> = (0..channels).map(|_| reg.register()).collect();
            for (i, &v) in vals.iter().enumerate() {
                sets[i % channels].record(Class::Write, v);
            }
            let snap = reg.snapshot();
            let h = snap.class(Class::Write);
            prop_assert_eq!(h.count(), vals.len() as u64);
            prop_assert_eq!(snap.class(Class::ReadHit).count(), 0);
            let mut sorted = vals.clone();
            sorted.sort_unstable();
            prop_assert_eq!(h.max_ns, *sorted.last().unwrap());
            prop_assert_eq!(h.sum_ns, vals.iter().sum::<u64>());
            let want = oracle(&sorted, q);
            let got = h.quantile(q);
            let tol = want / 128 + 1;
            prop_assert!(got.abs_diff(want) <= tol, "q {} got {} want {}", q, got, want);
        }

        #[test]
        fn sparse_round_trips_and_deltas_subtract(
            a in prop::collection::vec(0u64..10_000_000, 0..300),
            b in prop::collection::vec(0u64..10_000_000, 0..300),
        ) {
            let reg = Registry::default();
            let s = reg.register();
            for &v in &a { s.record(Class::Flush, v); }
            let first = reg.snapshot();
            // A channel that ends keeps its counts in the registry.
            reg.retire(&s);
            prop_assert_eq!(&reg.snapshot(), &first);
            let s = reg.register();
            for &v in &b { s.record(Class::Flush, v); }
            let second = reg.snapshot();
            let h = second.class(Class::Flush);
            let back = HistSnapshot::from_sparse(&h.sparse(), h.sum_ns, h.max_ns).unwrap();
            prop_assert_eq!(&back, h);
            let d = h.since(first.class(Class::Flush));
            prop_assert_eq!(d.count(), b.len() as u64);
            prop_assert_eq!(d.sum_ns, b.iter().sum::<u64>());
        }
    }

    #[test]
    fn bad_sparse_input_is_an_error() {
        assert!(HistSnapshot::from_sparse(&[(BUCKETS as u32, 1)], 0, 0).is_err());
    }

    #[test]
    fn empty_histogram_reports_zero() {
        let s = HistSnapshot::default().summary();
        assert_eq!((s.count, s.p50_us, s.max_us), (0, 0.0, 0.0));
    }
}
