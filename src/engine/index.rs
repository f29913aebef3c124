//! The in-DRAM index: one shard per 4 MiB of backing address, each an ordered map from
//! the extent's offset inside the shard to where its bytes live.
//!
//! Invariant: extents in a shard never overlap. An insert resolves every overlap case
//! (the new extent covers an old one's head, tail, all of it, or sits inside it) by
//! trimming or splitting the old extents, so "later inserted wins", exactly as replay
//! needs. Trimming keeps the original extent's bounds (`crc_front`/`crc_back`) so a data
//! CRC computed over the whole original extent can still be verified. Staleness is not
//! known here: the engine passes a predicate over (segment, generation).

use super::format::KeyRec;
use std::collections::BTreeMap;

/// The extent holds dirty data (not yet on the backing device).
pub const F_DIRTY: u8 = 1;
/// A placeholder for a read miss in flight; `gen` holds the miss token.
pub const F_EMPTY: u8 = 2;
/// The extent reads as zeros and has no pmem data (write-zeroes or discard).
pub const F_ZERO: u8 = 4;
/// `crc` is meaningful.
pub const F_CRC: u8 = 8;

/// One extent in DRAM; 32 bytes plus the 4-byte map key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    pub seg: u32,
    pub seg_off: u32,
    /// Low 32 bits of the segment generation, or the miss token of a placeholder.
    pub gen: u32,
    pub crc: u32,
    /// Bytes trimmed off the front / back of the original extent since it was written.
    pub crc_front: u32,
    pub crc_back: u32,
    pub flags: u8,
}

impl Extent {
    /// The extent of a key as written (nothing trimmed yet).
    pub fn of_key(k: &KeyRec, flags: u8) -> Extent {
        Extent {
            len: k.len,
            seg: k.seg,
            seg_off: k.seg_off,
            gen: k.gen as u32,
            crc: k.data_crc,
            crc_front: 0,
            crc_back: 0,
            flags,
        }
    }

    /// A range without pmem data: zeros, or a placeholder whose `gen` is a miss token.
    pub const fn without_data(len: u32, flags: u8, token: u32) -> Extent {
        Extent {
            len,
            seg: 0,
            seg_off: 0,
            gen: token,
            crc: 0,
            crc_front: 0,
            crc_back: 0,
            flags,
        }
    }

    pub fn is(&self, f: u8) -> bool {
        self.flags & f != 0
    }
    pub fn has_data(&self) -> bool {
        self.flags & (F_EMPTY | F_ZERO) == 0
    }
    fn cut_front(&mut self, d: u32) {
        self.len -= d;
        if self.has_data() {
            self.seg_off += d;
            self.crc_front += d;
        }
    }
    fn cut_back(&mut self, d: u32) {
        self.len -= d;
        self.crc_back += d;
    }
}

const EMPTY: Extent = Extent::without_data(0, 0, 0);

/// Reports the part of extent `k` (at `ks`) inside `[s, e)`.
fn clip_report(ks: u32, k: Extent, s: u32, e: u32, f: &mut impl FnMut(u32, Extent)) {
    let mut c = k;
    let cs = ks.max(s);
    if cs > ks {
        c.cut_front(cs - ks);
    }
    let ce = (ks + k.len).min(e);
    if ks + k.len > ce {
        c.cut_back(ks + k.len - ce);
    }
    f(cs, c);
}

/// One 4 MiB shard. Offsets are relative to the shard's base.
#[derive(Debug, Default)]
pub struct Shard {
    map: BTreeMap<u32, Extent>,
    /// Extents replayed but not yet inserted, in log order. Replay only appends here
    /// (one cache miss per key instead of a tree insert); the first access to the shard
    /// inserts them, with the same overlap resolution, so the result is identical.
    pending: Vec<(u32, Extent)>,
    /// Longest extent ever inserted here: no extent starting before `s - max_len` can
    /// reach `s`, so lookups bound their range on both sides and descend the tree once.
    max_len: u32,
}

impl Shard {
    /// Queues a replayed extent (see `pending`).
    pub fn push_replayed(&mut self, s: u32, x: Extent) {
        self.pending.push((s, x));
    }

    fn settle(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut p = std::mem::take(&mut self.pending);
        for (s, x) in p.drain(..) {
            self.insert(s, x);
        }
        self.pending = p; // keeps the capacity only if a caller pushes again
        self.pending.shrink_to_fit();
    }

    pub fn len(&mut self) -> usize {
        self.settle();
        self.map.len()
    }
    pub fn is_empty(&mut self) -> bool {
        self.len() == 0
    }
    pub fn iter(&mut self) -> impl Iterator<Item = (u32, &Extent)> {
        self.settle();
        self.map.iter().map(|(k, v)| (*k, v))
    }

    /// Removes whatever overlaps `[s, e)`, keeping the parts of old extents outside it.
    pub fn punch(&mut self, s: u32, e: u32) {
        self.settle();
        if let Some((&ks, k)) = self.map.range(..s).next_back() {
            let ke = ks + k.len;
            if ke > s {
                let mut front = *k;
                front.cut_back(ke - s);
                if ke > e {
                    let mut back = *k;
                    back.cut_front(e - ks);
                    self.map.insert(e, back);
                }
                self.map.insert(ks, front);
            }
        }
        while let Some((&ks, k)) = self.map.range(s..e).next() {
            let k = *k;
            self.map.remove(&ks);
            let ke = ks + k.len;
            if ke > e {
                let mut back = k;
                back.cut_front(e - ks);
                self.map.insert(e, back);
            }
        }
    }

    /// Inserts an extent at `s`, trimming everything it overlaps (later wins).
    pub fn insert(&mut self, s: u32, x: Extent) {
        debug_assert!(x.len > 0);
        self.punch(s, s + x.len);
        self.max_len = self.max_len.max(x.len);
        self.map.insert(s, x);
    }

    /// Removes the extent starting at `s` if it is still exactly `x` (a racing insert
    /// may have trimmed or replaced it, in which case nothing happens).
    pub fn remove_if_same(&mut self, s: u32, x: &Extent) -> bool {
        self.settle();
        if self.map.get(&s) == Some(x) {
            self.map.remove(&s);
            true
        } else {
            false
        }
    }

    /// Visits the extents overlapping `[s, e)` in order, clipped to the range, as
    /// (start, extent with start-relative fields adjusted). Stale extents (per the
    /// predicate) are removed first, so the walk sees them as gaps.
    pub fn walk(
        &mut self,
        s: u32,
        e: u32,
        stale: impl Fn(&Extent) -> bool,
        mut f: impl FnMut(u32, Extent),
    ) {
        self.settle();
        // One tree descent in the common case: collect the (few) overlapping extents
        // walking backwards from `e`, purge stale ones (rare: only after a reclaim),
        // then report them in address order.
        const N: usize = 8;
        let mut buf = [(0u32, EMPTY); N];
        loop {
            let mut n = 0;
            let mut stale_at = None;
            let mut overflow = false;
            let lo = s.saturating_sub(self.max_len);
            for (&ks, k) in self.map.range(lo..e).rev() {
                if ks + k.len <= s {
                    break;
                }
                if k.has_data() && stale(k) {
                    stale_at = Some(ks);
                    break;
                }
                if n == N {
                    overflow = true;
                    continue;
                }
                buf[n] = (ks, *k);
                n += 1;
            }
            if let Some(ks) = stale_at {
                self.map.remove(&ks);
                continue;
            }
            if overflow {
                // Many small extents: walk forward without the buffer.
                let v: Vec<(u32, Extent)> = self.overlapping(s, e).map(|(a, b)| (a, *b)).collect();
                for (ks, k) in v {
                    clip_report(ks, k, s, e, &mut f);
                }
                return;
            }
            for &(ks, k) in buf[..n].iter().rev() {
                clip_report(ks, k, s, e, &mut f);
            }
            return;
        }
    }

    fn overlapping(&self, s: u32, e: u32) -> impl Iterator<Item = (u32, &Extent)> {
        let before = self
            .map
            .range(..s)
            .next_back()
            .filter(|(ks, k)| **ks + k.len > s)
            .map(|(k, v)| (*k, v));
        before
            .into_iter()
            .chain(self.map.range(s..e).map(|(k, v)| (*k, v)))
    }

    /// Replaces the placeholder fragments carrying `token` inside `[s, e)` using `f`,
    /// which maps (fragment start, fragment) to its replacement or None to drop it.
    pub fn resolve_placeholders(
        &mut self,
        s: u32,
        e: u32,
        token: u32,
        mut f: impl FnMut(u32, &Extent) -> Option<Extent>,
    ) {
        self.settle();
        let mut at = s;
        loop {
            let found = self
                .overlapping(at, e)
                .find(|(_, k)| k.is(F_EMPTY) && k.gen == token)
                .map(|(ks, k)| (ks, *k));
            let Some((ks, k)) = found else { break };
            self.map.remove(&ks);
            let ke = ks + k.len;
            let mut c = k;
            if ks < s {
                let mut front = k;
                front.cut_back(ke - s);
                self.map.insert(ks, front);
                c.cut_front(s - ks);
            }
            if ke > e {
                let mut back = k;
                back.cut_front(e - ks);
                self.map.insert(e, back);
                c.cut_back(ke - e);
            }
            let cs = ks.max(s);
            if let Some(x) = f(cs, &c) {
                self.map.insert(cs, x);
            }
            at = ke;
            if at >= e {
                break;
            }
        }
    }

    /// Checks the no-overlap invariant.
    pub fn check(&mut self) -> Result<(), String> {
        self.settle();
        let mut end = 0u32;
        for (&ks, k) in &self.map {
            if k.len == 0 || ks < end {
                return Err(format!("extent at {ks} len {} overlaps or is empty", k.len));
            }
            end = ks + k.len;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(len: u32, seg_off: u32) -> Extent {
        Extent {
            len,
            seg: 1,
            seg_off,
            gen: 0,
            crc: 0,
            crc_front: 0,
            crc_back: 0,
            flags: F_DIRTY,
        }
    }

    /// Byte-level model: which seg_off each byte maps to.
    fn model(sh: &mut Shard, n: u32) -> Vec<Option<u32>> {
        let mut v = vec![None; n as usize];
        for (ks, k) in sh.iter() {
            for i in 0..k.len {
                v[(ks + i) as usize] = Some(k.seg_off + i);
            }
        }
        v
    }

    #[test]
    fn all_overlap_cases_match_byte_model() {
        // Random inserts compared against a byte-granular model.
        let mut sh = Shard::default();
        let n = 256u32;
        let mut m = vec![None; n as usize];
        let mut x = 12345u64;
        for i in 0..2000u32 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let s = ((x >> 33) as u32) % n;
            let len = 1 + ((x >> 13) as u32) % (n - s).min(40);
            let base = i * 1000;
            sh.insert(s, ext(len, base));
            for j in 0..len {
                m[(s + j) as usize] = Some(base + j);
            }
            sh.check().unwrap();
            assert_eq!(model(&mut sh, n), m, "after insert {i}");
        }
    }

    #[test]
    fn walk_clips_and_punch_keeps_outside() {
        let mut sh = Shard::default();
        sh.insert(10, ext(20, 100));
        let mut seen = vec![];
        sh.walk(15, 20, |_| false, |s, k| seen.push((s, k.len, k.seg_off)));
        assert_eq!(seen, vec![(15, 5, 105)]);
        sh.punch(15, 20);
        let v: Vec<_> = sh
            .iter()
            .map(|(s, k)| (s, k.len, k.seg_off, k.crc_front, k.crc_back))
            .collect();
        assert_eq!(v, vec![(10, 5, 100, 0, 15), (20, 10, 110, 10, 0)]);
    }
}
