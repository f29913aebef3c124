//! The in-DRAM index: one shard per 4 MiB of backing address (the lock unit), each a
//! sorted vector of (offset inside the shard, extent) saying where those bytes live,
//! cut into 16 runs of 256 KiB ("buckets") by a small table beside the lock.
//!
//! Why a vector and not a tree: a 4 KiB hit touches the lock's cache line and one
//! interpolated probe into a short run (usually one more line, see `lower_bound`)
//! instead of a walk down tree nodes; an exact overwrite replaces its entry in place; nothing allocates once the
//! vector has grown. The price is that an insert that adds an entry shifts the ones
//! after it (at most 1024 entries of 4 KiB; a shard of 512 B extents is the worst
//! case, 8192).
//!
//! Invariants: extents in a shard never overlap, and none crosses a bucket boundary
//! (an insert splits at boundaries; the pieces keep the original extent's bounds in
//! `crc_front`/`crc_back`, so a data CRC over the whole original extent can still be
//! verified). An insert resolves every overlap case (the new extent covers an old one's
//! head, tail, all of it, or sits inside it) by trimming or splitting the old extents, so
//! "later inserted wins", exactly as replay needs. Staleness is not known here: the
//! engine passes a predicate over (segment, generation).

pub use super::extent::*;

const EMPTY: Extent = Extent::without_data(0, 0, 0);

/// Reports the part of extent `k` (at `ks`) inside `[s, e)`.
fn clip(ks: u32, k: Extent, s: u32, e: u32) -> (u32, Extent) {
    let mut c = k;
    let cs = ks.max(s);
    if cs > ks {
        c.cut_front(cs - ks);
    }
    let ce = (ks + k.len).min(e);
    if ks + k.len > ce {
        c.cut_back(ks + k.len - ce);
    }
    (cs, c)
}

const BUCKET_SHIFT: u32 = 18;
const BUCKET: u32 = 1 << BUCKET_SHIFT;
const N_BUCKETS: usize = (super::format::SUBTREE_SIZE >> BUCKET_SHIFT) as usize;

/// An extent and its start; 32-byte aligned so a lookup never straddles lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, align(32))]
struct Entry(u32, Extent);

/// The entries that replace extent `k` (at `ks`) when its part `[cs, ce)` becomes
/// `mid` (None: nothing): the front and back pieces of `k` around it, and `mid`.
fn around(ks: u32, k: Extent, cs: u32, ce: u32, mid: Option<Entry>) -> ([Entry; 3], usize) {
    let ke = ks + k.len;
    let mut new = [Entry(0, EMPTY); 3];
    let mut n = 0;
    if cs > ks {
        let mut front = k;
        front.cut_back(ke - cs);
        new[n] = Entry(ks, front);
        n += 1;
    }
    if let Some(m) = mid {
        new[n] = m;
        n += 1;
    }
    if ke > ce {
        let mut back = k;
        back.cut_front(ce - ks);
        new[n] = Entry(ce, back);
        n += 1;
    }
    (new, n)
}

/// Calls `f(bucket, start, end)` for each bucket-sized piece of `[s, e)`.
fn pieces(s: u32, e: u32, mut f: impl FnMut(usize, u32, u32)) {
    let mut at = s;
    while at < e {
        let b = (at >> BUCKET_SHIFT) as usize;
        let end = e.min((at | (BUCKET - 1)).saturating_add(1));
        f(b, at, end);
        at = end;
    }
}

/// Index of the first entry of `v` (the run of bucket `b`) starting at or after `s`.
/// The search starts at the position `s` would have if the run's entries were spread
/// evenly over the bucket, then gallops: a dense run (a block device written in whole
/// blocks) is hit at the first probe, a sparse random one within a few neighbours, so
/// a lookup touches one or two cache lines instead of a binary search's six.
fn lower_bound(v: &[Entry], b: usize, s: u32) -> usize {
    let n = v.len();
    if n == 0 {
        return 0;
    }
    let g = guess(n, b, s);
    if v[g].0 == s {
        // Starts are strictly increasing: the guess is the answer, and looking at the
        // entry before it (maybe another cache line) is not needed.
        return g;
    }
    let (lo, hi) = if v[g].0 < s {
        // The answer is in (g, n]: widen forward until an entry reaches `s`.
        let (mut lo, mut step) = (g + 1, 1);
        while lo + step <= n && v[lo + step - 1].0 < s {
            lo += step;
            step *= 2;
        }
        (lo, (lo + step - 1).min(n))
    } else {
        // The answer is in [0, g]: widen backward while entries still reach `s`.
        let (mut hi, mut step) = (g, 1);
        while hi >= step && v[hi - step].0 >= s {
            hi -= step;
            step *= 2;
        }
        (if hi >= step { hi - step + 1 } else { 0 }, hi)
    };
    lo + v[lo..hi].partition_point(|x| x.0 < s)
}

/// Where `s` would sit in a run of `n > 0` entries spread evenly over bucket `b`.
fn guess(n: usize, b: usize, s: u32) -> usize {
    let rel = s.saturating_sub(b as u32 * BUCKET) as u64;
    ((rel * n as u64) >> BUCKET_SHIFT).min(n as u64 - 1) as usize
}

/// Index of the first entry of `v` (the run of bucket `b`) that ends after `s` (the
/// first one that can overlap `[s, ..)`).
fn first_overlap(v: &[Entry], b: usize, s: u32) -> usize {
    let i = lower_bound(v, b, s);
    // An entry starting at `s` has no overlapping predecessor (extents never overlap),
    // so the common exact hit touches only its own line.
    if i > 0 && v.get(i).is_none_or(|x| x.0 != s) && v[i - 1].0 + v[i - 1].1.len > s {
        i - 1
    } else {
        i
    }
}

/// One 4 MiB shard: all its extents in one sorted vector, cut into `N_BUCKETS` runs
/// (one per 256 KiB) by `ends`, so a lookup searches one short run. The lock, the
/// vector's header and `ends` share one cache line (see `ShardLock`): a 4 KiB hit
/// touches that line and the one or two lines of its run. Offsets are relative to the
/// shard's base.
#[derive(Debug, Default)]
pub struct Shard {
    v: Vec<Entry>,
    /// `ends[b]`: index in `v` one past bucket `b`'s last entry (the last bucket ends
    /// at `v.len()`). At most 8192 entries fit a shard (512 B each), so u16 suffices.
    ends: [u16; N_BUCKETS - 1],
    /// Bytes of pmem data the shard's extents map, in 512 B units (at most 8192: the
    /// shard covers 4 MiB), and in the top bit whether its replayed extents still wait
    /// in `Replayed` (see there). One u16 so lock and header keep to one cache line.
    meta: u16,
}

const META_REPLAYED: u16 = 1 << 15;
/// The unit of `Shard::meta`'s byte count: every extent is a multiple of it.
const META_UNIT: u32 = 512;

/// A shard behind its lock, aligned so lock and shard header share one cache line.
#[repr(align(64))]
#[derive(Debug, Default)]
pub struct ShardLock(pub std::sync::Mutex<Shard>);

impl std::ops::Deref for ShardLock {
    type Target = std::sync::Mutex<Shard>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

const NONE: u32 = u32::MAX;

/// The extents replay found, in log order, chained per shard. Replay only appends here
/// (sequential writes instead of an insert, or even a push, per key); each shard
/// inserts its chain on first access, with the same overlap resolution, so the result
/// is identical (see `Engine::shard`).
#[derive(Debug)]
pub struct Replayed {
    entries: Vec<Entry>,
    next: Vec<u32>,
    heads: Vec<u32>,
    tails: Vec<u32>,
    /// The shards holding replayed extents, in the order replay first reached them.
    pub order: Vec<u32>,
}

impl Replayed {
    pub fn new(n_shards: usize) -> Replayed {
        Replayed {
            entries: Vec::new(),
            next: Vec::new(),
            heads: vec![NONE; n_shards],
            tails: vec![NONE; n_shards],
            order: Vec::new(),
        }
    }

    /// Appends an extent of shard `si`; false when the chain indexes (u32) are full.
    pub fn push(&mut self, si: usize, s: u32, x: Extent) -> bool {
        let Ok(i) = u32::try_from(self.entries.len()) else {
            return false;
        };
        if i == NONE {
            return false;
        }
        self.entries.push(Entry(s, x));
        self.next.push(NONE);
        match self.tails[si] {
            NONE => {
                self.heads[si] = i;
                self.order.push(si as u32);
            }
            t => self.next[t as usize] = i,
        }
        self.tails[si] = i;
        true
    }

    /// True when shard `si` has replayed extents.
    pub fn has(&self, si: usize) -> bool {
        self.heads[si] != NONE
    }
}

impl Shard {
    /// Marks the shard as owing the insert of its replayed chain.
    pub fn set_replayed(&mut self) {
        self.meta |= META_REPLAYED;
    }

    /// True until `settle` ran.
    pub fn replayed(&self) -> bool {
        self.meta & META_REPLAYED != 0
    }

    /// Bytes of pmem data the extents map (stale ones included until a walk drops them).
    pub fn data_bytes(&self) -> u64 {
        (self.meta & !META_REPLAYED) as u64 * META_UNIT as u64
    }

    /// Inserts shard `si`'s replayed chain from `r`, in log order.
    pub fn settle(&mut self, r: Option<&Replayed>, si: usize) {
        self.meta &= !META_REPLAYED;
        let Some(r) = r else { return };
        let mut i = r.heads[si];
        while i != NONE {
            let Entry(s, x) = r.entries[i as usize];
            if x.is(F_EMPTY) {
                // A tombstone key (no placeholder is ever replayed): uncache the range.
                self.punch(s, s + x.len);
            } else {
                self.insert(s, x);
            }
            i = r.next[i as usize];
        }
    }

    /// Bounds of bucket `b` in `v`.
    fn run(&self, b: usize) -> (usize, usize) {
        let lo = if b == 0 { 0 } else { self.ends[b - 1] as usize };
        let hi = if b == N_BUCKETS - 1 {
            self.v.len()
        } else {
            self.ends[b] as usize
        };
        (lo, hi)
    }

    /// Replaces `v[i..j]` (inside bucket `b`) with `new` (at most three entries).
    fn replace(&mut self, b: usize, i: usize, j: usize, new: &[Entry]) {
        let units = |es: &[Entry]| -> u32 {
            es.iter()
                .filter(|x| x.1.has_data())
                .map(|x| x.1.len / META_UNIT)
                .sum()
        };
        let (gone, came) = (units(&self.v[i..j]), units(new));
        if gone != came {
            // Never negative: `gone` only counts extents that `came` counted before.
            self.meta = (self.meta + came as u16) - gone as u16;
        }
        let old = j - i;
        let common = old.min(new.len());
        self.v[i..i + common].copy_from_slice(&new[..common]);
        if old > common {
            self.v.drain(i + common..j);
            for e in &mut self.ends[b..] {
                *e -= (old - common) as u16;
            }
        } else if new.len() > common {
            let add = &new[common..];
            self.v.splice(i + common..i + common, add.iter().copied());
            for e in &mut self.ends[b..] {
                *e += add.len() as u16;
            }
        }
    }

    /// Turns entry `i` of bucket `b` into a hole in place (nothing shifts).
    fn make_hole(&mut self, b: usize, i: usize) {
        let Entry(ks, k) = self.v[i];
        let hole = Extent::without_data(k.len, F_HOLE, 0);
        self.replace(b, i, i + 1, &[Entry(ks, hole)]);
    }

    /// Before an insert that may add `add` entries: when the vector has no room for
    /// them and holes fill at least an eighth of it, drops every hole (one pass), so
    /// the vector grows only for extents. With fewer holes it grows as usual, so a
    /// pass frees at least an eighth of the vector and runs at most once per that
    /// many inserts. Without enough holes it reserves the room itself: an insert that
    /// replaces in place leaves the length at the capacity, and a full shard of 4 KiB
    /// extents (1024 of them, a power of two) would otherwise count its holes on every
    /// write (10% of a reactor in a two-core SPDK randwrite profile).
    fn make_room(&mut self, add: usize) {
        let n = self.v.len();
        if n + add <= self.v.capacity() {
            return;
        }
        let holes = self.v.iter().filter(|x| x.1.is(F_HOLE)).count();
        if holes == 0 || holes * 8 < n {
            self.v.reserve(add);
            return;
        }
        let mut w = 0;
        let mut b = 0;
        for r in 0..n {
            // Bucket ends move down by the holes dropped before them.
            while b < N_BUCKETS - 1 && self.ends[b] as usize == r {
                self.ends[b] = w as u16;
                b += 1;
            }
            if !self.v[r].1.is(F_HOLE) {
                self.v[w] = self.v[r];
                w += 1;
            }
        }
        for e in &mut self.ends[b..] {
            *e = w as u16;
        }
        self.v.truncate(w);
    }

    /// Removes whatever overlaps `[s, e)` inside bucket `b`, keeping the parts of old
    /// extents outside it, and puts `x` (if any) at `s` in their place. `gone` sees each
    /// removed part (clipped to `[s, e)`).
    fn punch_insert(
        &mut self,
        b: usize,
        s: u32,
        e: u32,
        x: Option<Extent>,
        gone: &mut impl FnMut(u32, Extent),
    ) {
        self.make_room(2);
        let (lo, hi) = self.run(b);
        let i = lo + first_overlap(&self.v[lo..hi], b, s);
        let mut new = [Entry(0, EMPTY); 3];
        let mut n = 0;
        let mut j = i;
        let mut x = x;
        while j < hi && self.v[j].0 < e {
            let Entry(ks, k) = self.v[j];
            let ke = ks + k.len;
            let (cs, c) = clip(ks, k, s, e);
            if !k.is(F_HOLE) {
                gone(cs, c);
                // A block's read count outlives an overwrite: data read often and
                // rewritten now and then is still hot when GC judges the new copy.
                if let Some(nx) = x.as_mut().filter(|nx| nx.has_data() && k.has_data()) {
                    *nx = nx.with_flags(k.flags() & (F_REF | F_REF2));
                }
            }
            if ks < s {
                let mut front = k;
                front.cut_back(ke - s);
                new[n] = Entry(ks, front);
                n += 1;
            }
            if ke > e {
                let mut back = k;
                back.cut_front(e - ks);
                // The back piece sorts after `x`: place `x` first.
                if let Some(x) = x {
                    new[n] = Entry(s, x);
                    n += 1;
                }
                new[n] = Entry(e, back);
                n += 1;
                self.replace(b, i, j + 1, &new[..n]);
                return;
            }
            j += 1;
            // It ends exactly at `e`: the last overlap (entries never overlap), so the
            // next entry, often on another cache line, need not be loaded.
            if ke == e {
                break;
            }
        }
        if let Some(x) = x {
            new[n] = Entry(s, x);
            n += 1;
        }
        self.replace(b, i, j, &new[..n]);
    }

    /// Where a lookup of `s` will start reading (the interpolated guess of
    /// `lower_bound`), for a caller that wants that line fetched early; None when the
    /// run is empty or the shard still owes its replayed chain.
    pub fn probe_addr(&self, s: u32) -> Option<*const u8> {
        if self.replayed() {
            return None;
        }
        let b = (s >> BUCKET_SHIFT) as usize;
        let (lo, hi) = self.run(b);
        if hi == lo {
            return None;
        }
        Some(&self.v[lo + guess(hi - lo, b, s)] as *const Entry as *const u8)
    }

    /// The address of the entries (0 while there are none or replay is unsettled),
    /// published for lock-free prefetch hints (`Engine::probe_addr`).
    pub fn entries_addr(&self) -> usize {
        if self.replayed() || self.v.is_empty() {
            0
        } else {
            self.v.as_ptr() as usize
        }
    }

    /// The byte offset in the entries of the one a lookup of `s` probes first in a
    /// shard of `n` entries spread evenly (`lower_bound`'s guess when the shard is
    /// written in whole blocks).
    pub fn probe_offset(n: usize, s: u32) -> usize {
        let i = ((s as u64 * n as u64) >> super::format::SUBTREE_SHIFT) as usize;
        i.min(n.saturating_sub(1)) * std::mem::size_of::<Entry>()
    }

    /// Entries, holes included (what the shard's vector holds).
    pub fn len(&self) -> usize {
        debug_assert!(!self.replayed());
        self.v.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The extents in address order (holes left out).
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Extent)> {
        debug_assert!(!self.replayed());
        self.v
            .iter()
            .filter(|x| !x.1.is(F_HOLE))
            .map(|x| (x.0, &x.1))
    }

    /// Removes whatever overlaps `[s, e)`, keeping the parts of old extents outside it.
    pub fn punch(&mut self, s: u32, e: u32) {
        debug_assert!(!self.replayed());
        pieces(s, e, |b, ps, pe| {
            self.punch_insert(b, ps, pe, None, &mut |_, _| {})
        });
    }

    /// Inserts an extent at `s`, trimming everything it overlaps (later wins).
    pub fn insert(&mut self, s: u32, x: Extent) {
        self.insert_reporting(s, x, |_, _| {});
    }

    /// `insert`, calling `gone(start, extent)` for each part of an old extent the new one
    /// replaces (clipped to the new extent's range, in address order).
    pub fn insert_reporting(&mut self, s: u32, x: Extent, mut gone: impl FnMut(u32, Extent)) {
        debug_assert!(x.len > 0);
        debug_assert!(!self.replayed());
        pieces(s, s + x.len, |b, ps, pe| {
            let (_, piece) = clip(s, x, ps, pe);
            self.punch_insert(b, ps, pe, Some(piece), &mut gone);
        });
    }

    /// Visits the extents overlapping `[s, e)` in order, clipped to the range, as
    /// (start, extent with start-relative fields adjusted). Stale extents (per the
    /// predicate) are removed first, so the walk sees them as gaps.
    pub fn walk(
        &mut self,
        s: u32,
        e: u32,
        stale: impl Fn(&Extent) -> bool,
        f: impl FnMut(u32, Extent),
    ) {
        self.walk_marking(s, e, stale, false, f)
    }

    /// `walk`, also counting a read hit (`F_REF`, then `F_REF2`) on each data extent it
    /// visits when `mark` is set; the line is written only when a flag was not set yet.
    pub fn walk_marking(
        &mut self,
        s: u32,
        e: u32,
        stale: impl Fn(&Extent) -> bool,
        mark: bool,
        mut f: impl FnMut(u32, Extent),
    ) {
        debug_assert!(!self.replayed());
        pieces(s, e, |b, ps, pe| {
            let (lo, hi) = self.run(b);
            let mut i = lo + first_overlap(&self.v[lo..hi], b, ps);
            while i < hi && self.v[i].0 < pe {
                let Entry(ks, k) = self.v[i];
                if k.is(F_HOLE) {
                    // Nothing to visit.
                } else if k.has_data() && stale(&k) {
                    self.make_hole(b, i);
                } else {
                    if mark && k.has_data() && !k.is(F_REF2) {
                        let f = if k.is(F_REF) { F_REF2 } else { F_REF };
                        self.v[i].1 = k.with_flags(f);
                    }
                    let (cs, c) = clip(ks, k, ps, pe);
                    f(cs, c);
                }
                i += 1;
                // Entries never overlap, so one reaching `pe` is the last: stop without
                // loading the next, often on another cache line (a miss on most 4 KiB
                // hits: 60% of this walk's time in an SPDK randread profile).
                if ks + k.len >= pe {
                    break;
                }
            }
        });
    }

    /// Clears `F_DIRTY` on (with `remove`: removes) the dirty extents lying wholly
    /// inside `[s, e)` for which `pred(start, extent)` holds: writeback made them clean.
    /// Extents reaching outside the range stay dirty (the conservative answer).
    pub fn clean_matching(
        &mut self,
        s: u32,
        e: u32,
        remove: bool,
        pred: impl Fn(u32, &Extent) -> bool,
    ) {
        debug_assert!(!self.replayed());
        pieces(s, e, |b, ps, pe| {
            let (lo, mut hi) = self.run(b);
            let mut i = lo + first_overlap(&self.v[lo..hi], b, ps);
            while i < hi && self.v[i].0 < pe {
                let Entry(ks, k) = self.v[i];
                if ks >= s && ks + k.len <= e && k.is(F_DIRTY) && pred(ks, &k) {
                    if remove {
                        self.replace(b, i, i + 1, &[]);
                        hi -= 1;
                        continue;
                    }
                    self.v[i].1.clear(F_DIRTY);
                }
                i += 1;
            }
        });
    }

    /// Replaces the placeholder fragments carrying `token` inside `[s, e)` using `f`,
    /// which maps (fragment start, fragment) to its replacement or None to drop it.
    /// Fragments are visited in address order.
    pub fn resolve_placeholders(
        &mut self,
        s: u32,
        e: u32,
        token: u32,
        mut f: impl FnMut(u32, &Extent) -> Option<Extent>,
    ) {
        debug_assert!(!self.replayed());
        pieces(s, e, |b, ps, pe| {
            let (lo, hi) = self.run(b);
            let mut i = lo + first_overlap(&self.v[lo..hi], b, ps);
            while i < self.run(b).1 && self.v[i].0 < pe {
                let Entry(ks, k) = self.v[i];
                if !(k.is(F_EMPTY) && k.gen == token) {
                    i += 1;
                    continue;
                }
                let (cs, c) = clip(ks, k, ps, pe);
                let ce = cs + c.len;
                let x = f(cs, &c).map(|x| Entry(cs, x));
                let (new, n) = around(ks, k, cs, ce, x);
                self.replace(b, i, i + 1, &new[..n]);
                i += n;
            }
        });
    }

    /// Visits the parts inside `[s, e)` of the data extents that still map the bytes a
    /// key wrote there: segment `seg` in generation `gen`, at `seg_off_s + (start - s)`
    /// (a data location is written once per generation, so this names exactly that
    /// key's surviving pieces). `f(start, part)` returns the part's replacement (same
    /// length), or None to remove it; the rest of a clipped extent stays as it was. GC
    /// uses it to drop or move the keys it retires.
    #[allow(clippy::too_many_arguments)]
    pub fn retire_matching(
        &mut self,
        s: u32,
        e: u32,
        seg: u32,
        gen: u32,
        seg_off_s: u32,
        mut f: impl FnMut(u32, &Extent) -> Option<Extent>,
    ) {
        debug_assert!(!self.replayed());
        // The key's data offset minus its backing offset, as i64 (pieces may start
        // before `s` when clipped).
        let shift = seg_off_s as i64 - s as i64;
        pieces(s, e, |b, ps, pe| {
            let (lo, _) = self.run(b);
            let mut i = lo + first_overlap(&self.v[lo..self.run(b).1], b, ps);
            while i < self.run(b).1 && self.v[i].0 < pe {
                let Entry(ks, k) = self.v[i];
                let mine = k.has_data()
                    && k.seg == seg
                    && k.gen == gen
                    && k.seg_off as i64 - ks as i64 == shift;
                if !mine {
                    i += 1;
                    continue;
                }
                let (cs, c) = clip(ks, k, ps, pe);
                let ce = cs + c.len;
                let x = f(cs, &c);
                if x.is_none() && cs == ks && ce == ks + k.len {
                    // All of it goes: leave a hole for the next write here.
                    self.make_hole(b, i);
                    i += 1;
                    continue;
                }
                debug_assert!(x.is_none_or(|x| x.len == c.len));
                let (new, n) = around(ks, k, cs, ce, x.map(|x| Entry(cs, x)));
                self.replace(b, i, i + 1, &new[..n]);
                i += n;
            }
        });
    }

    /// Bytes inside `[s, e)` still mapped to a key's data, named as in `retire_matching`;
    /// changes nothing. GC sizes a kset's live data with it before retiring the kset.
    pub fn live_matching(&self, s: u32, e: u32, seg: u32, gen: u32, seg_off_s: u32) -> u64 {
        debug_assert!(!self.replayed());
        let shift = seg_off_s as i64 - s as i64;
        let mut live = 0u64;
        pieces(s, e, |b, ps, pe| {
            let (lo, hi) = self.run(b);
            let mut i = lo + first_overlap(&self.v[lo..hi], b, ps);
            while i < hi && self.v[i].0 < pe {
                let Entry(ks, k) = self.v[i];
                if k.has_data()
                    && k.seg == seg
                    && k.gen == gen
                    && k.seg_off as i64 - ks as i64 == shift
                {
                    live += clip(ks, k, ps, pe).1.len as u64;
                }
                i += 1;
                if ks + k.len >= pe {
                    break; // the last overlap, as in `walk_marking`
                }
            }
        });
        live
    }

    /// Checks the invariants: sorted, non-empty, non-overlapping, inside their bucket.
    pub fn check(&self) -> Result<(), String> {
        debug_assert!(!self.replayed());
        for b in 0..N_BUCKETS {
            let (lo, hi) = self.run(b);
            if lo > hi || hi > self.v.len() {
                return Err(format!("bucket {b} bounds {lo}..{hi} of {}", self.v.len()));
            }
            let base = b as u32 * BUCKET;
            let mut end = base;
            for &Entry(ks, k) in &self.v[lo..hi] {
                if k.len == 0 || ks < end || ks + k.len > base + BUCKET {
                    return Err(format!(
                        "extent at {ks} len {} overlaps, is empty or leaves bucket {b}",
                        k.len
                    ));
                }
                end = ks + k.len;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(len: u32, seg_off: u32) -> Extent {
        let mut x = Extent::without_data(len, F_DIRTY, 0);
        x.seg = 1;
        x.seg_off = seg_off;
        x
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

    /// GC's drop leaves a hole in place (no shift), neighbouring holes merge, and the
    /// next write over the range replaces the hole in place.
    #[test]
    fn a_dropped_extent_leaves_a_hole_the_next_write_reuses() {
        const B: u32 = 4096;
        let mut sh = Shard::default();
        for i in 0..8u32 {
            sh.insert(i * B, ext(B, i * B));
        }
        let n = sh.len();
        sh.retire_matching(3 * B, 4 * B, 1, 0, 3 * B, |_, _| None);
        assert_eq!((sh.len(), sh.iter().count()), (n, n - 1));
        assert_eq!(sh.data_bytes(), 7 * B as u64);
        let mut seen = vec![];
        sh.walk(0, 8 * B, |_| false, |s, _| seen.push(s));
        assert_eq!(seen, [0, 1, 2, 4, 5, 6, 7].map(|i| i * B));
        // A write of exactly that range takes the hole's place.
        sh.insert(3 * B, ext(B, 100 * B));
        assert_eq!((sh.len(), sh.iter().count()), (n, n));
        assert_eq!(sh.data_bytes(), 8 * B as u64);
        sh.check().unwrap();
        // A stale extent found by a walk becomes a hole as well.
        sh.walk(0, 8 * B, |x| x.seg_off == 100 * B, |_, _| {});
        assert_eq!((sh.len(), sh.iter().count()), (n, n - 1));
        sh.check().unwrap();
    }

    /// Holes never make the vector grow: an insert into a full vector drops them first
    /// when they are an eighth of it or more (bucket bounds kept, extents unchanged);
    /// with fewer, the vector grows and the holes stay.
    #[test]
    fn holes_are_dropped_before_the_vector_grows() {
        const B: u32 = 4096;
        for every in [2u32, 16] {
            let mut sh = Shard::default();
            // Two buckets' worth of blocks (the vector exactly full), some dropped by GC.
            let blocks = 2 * (BUCKET / B);
            for i in 0..blocks {
                sh.insert(i * B, ext(B, i * B));
            }
            for i in (0..blocks).step_by(every as usize) {
                sh.retire_matching(i * B, (i + 1) * B, 1, 0, i * B, |_, _| None);
            }
            sh.check().unwrap();
            sh.v.shrink_to_fit();
            let (cap, n) = (sh.v.capacity(), sh.v.len());
            assert_eq!(n, cap, "the test needs a full vector");
            let mut want: Vec<_> = sh.iter().map(|(s, x)| (s, *x)).collect();
            let at = 3 * BUCKET;
            sh.insert(at, ext(B, at));
            want.push((at, ext(B, at)));
            let holes = sh.v.iter().filter(|x| x.1.is(F_HOLE)).count();
            if every == 2 {
                assert_eq!(
                    (sh.v.capacity(), holes),
                    (cap, 0),
                    "grew instead of dropping holes"
                );
            } else {
                assert!(sh.v.capacity() > cap, "few holes: grows");
                assert_eq!(holes, (blocks / every) as usize);
            }
            sh.check().unwrap();
            let got: Vec<_> = sh.iter().map(|(s, x)| (s, *x)).collect();
            assert_eq!(got, want);
            for i in 0..N_BUCKETS {
                let (lo, hi) = sh.run(i);
                assert!(sh.v[lo..hi]
                    .iter()
                    .all(|x| (x.0 >> BUCKET_SHIFT) as usize == i));
            }
        }
    }

    /// A full vector without holes gets room on the first insert even when that insert
    /// only replaces an extent in place, so later inserts find room without counting
    /// holes over the whole vector again.
    #[test]
    fn a_full_vector_gets_room_even_when_an_insert_replaces_in_place() {
        const B: u32 = 4096;
        let mut sh = Shard::default();
        let blocks = 2 * (BUCKET / B);
        for i in 0..blocks {
            sh.insert(i * B, ext(B, i * B));
        }
        sh.v.shrink_to_fit();
        let (cap, n) = (sh.v.capacity(), sh.v.len());
        assert_eq!(n, cap, "the test needs a full vector");
        sh.insert(5 * B, ext(B, 77 * B));
        assert_eq!(sh.v.len(), n, "replaced in place");
        assert!(sh.v.capacity() > n, "room reserved");
        sh.check().unwrap();
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

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Cell {
        Data(u32),
        Hole(u32),
    }

    /// Random inserts, punches, placeholders and their resolution over `[base, base +
    /// n * unit)`, checked against a model with one cell per `unit` bytes after every
    /// step: contents, walk output, and that every piece still knows its original
    /// extent's bounds (`crc` holds the insert number, `orig` its (seg_off, len)).
    fn model_run(base: u32, unit: u32, n: u32, max_len: u32, steps: u32) {
        let mut sh = Shard::default();
        let mut m: Vec<Option<Cell>> = vec![None; n as usize];
        let mut orig = vec![];
        // Inserted keys: (start, len, seg_off), for `retire_matching`.
        let mut keys: Vec<(u32, u32, u32)> = vec![];
        let mut x = 12345u64 ^ base as u64 ^ unit as u64;
        let mut rnd = |k: u32| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) as u32) % k
        };
        for step in 0..steps {
            let s = rnd(n);
            let len = 1 + rnd((n - s).min(max_len));
            let (bs, blen) = (base + s * unit, len * unit);
            match rnd(5) {
                4 if !keys.is_empty() => {
                    // GC retires part of a key: its surviving pieces there go (or, for
                    // odd steps, stay: a replacement by an identical extent).
                    let (ks, kl, ko) = keys[rnd(keys.len() as u32) as usize];
                    let a = rnd(kl / unit);
                    let b = a + 1 + rnd(kl / unit - a);
                    let keep = step % 2 == 1;
                    sh.retire_matching(
                        ks + a * unit,
                        ks + b * unit,
                        1,
                        0,
                        ko + a * unit,
                        |_, x| keep.then_some(*x),
                    );
                    if !keep {
                        for c in m.iter_mut() {
                            if let Some(Cell::Data(v)) = *c {
                                if v >= ko + a * unit && v < ko + b * unit {
                                    *c = None;
                                }
                            }
                        }
                    }
                }
                0 | 1 | 4 => {
                    let mut e = ext(blen, step * 1_000_000);
                    e.crc = orig.len() as u32;
                    orig.push((e.seg_off, blen));
                    keys.push((bs, blen, e.seg_off));
                    sh.insert(bs, e);
                    for j in 0..len {
                        m[(s + j) as usize] = Some(Cell::Data(step * 1_000_000 + j * unit));
                    }
                }
                2 => {
                    sh.punch(bs, bs + blen);
                    m[s as usize..(s + len) as usize].fill(None);
                }
                _ => {
                    // A placeholder, then half of it resolved into data, half dropped.
                    sh.insert(bs, Extent::without_data(blen, F_EMPTY, step));
                    m[s as usize..(s + len) as usize].fill(Some(Cell::Hole(step)));
                    let keep = rnd(2) == 0;
                    let (rs, rl) = (s + rnd(len), 1 + rnd(len));
                    let rl = rl.min(s + len - rs);
                    let id = orig.len() as u32;
                    let mut seen = vec![];
                    sh.resolve_placeholders(
                        base + rs * unit,
                        base + (rs + rl) * unit,
                        step,
                        |fs, f| {
                            seen.push((fs, f.len));
                            keep.then(|| {
                                let mut e = ext(f.len, 7_000_000 + fs);
                                e.crc = id + seen.len() as u32 - 1;
                                e
                            })
                        },
                    );
                    for w in seen.windows(2) {
                        assert!(w[0].0 + w[0].1 <= w[1].0, "fragments out of order");
                    }
                    for &(fs, fl) in &seen {
                        orig.push((7_000_000 + fs, fl));
                        for j in 0..fl / unit {
                            m[((fs - base) / unit + j) as usize] =
                                keep.then_some(Cell::Data(7_000_000 + fs + j * unit));
                        }
                    }
                    if !keep {
                        orig.push((0, 0));
                    }
                }
            }
            sh.check().unwrap();
            if unit % 512 == 0 {
                let data: u64 = sh
                    .iter()
                    .filter(|(_, k)| k.has_data())
                    .map(|(_, k)| k.len as u64)
                    .sum();
                assert_eq!(sh.data_bytes(), data, "step {step}");
            }
            let mut got: Vec<Option<Cell>> = vec![None; n as usize];
            let mut walked = vec![];
            sh.walk(
                base,
                base + n * unit,
                |_| false,
                |ks, k| walked.push((ks, k)),
            );
            let listed: Vec<_> = sh.iter().map(|(ks, k)| (ks, *k)).collect();
            assert_eq!(walked, listed, "walk over everything lists everything");
            for (ks, k) in listed {
                assert!(ks >= base && ks + k.len <= base + n * unit);
                if k.is(F_EMPTY) {
                    for j in 0..k.len / unit {
                        got[((ks - base) / unit + j) as usize] = Some(Cell::Hole(k.gen));
                    }
                    continue;
                }
                let (os, ol) = orig[k.crc as usize];
                assert_eq!(k.crc_front() + k.len + k.crc_back(), ol, "step {step}");
                assert_eq!(k.seg_off - k.crc_front(), os, "step {step}");
                for j in 0..k.len / unit {
                    got[((ks - base) / unit + j) as usize] = Some(Cell::Data(k.seg_off + j * unit));
                }
            }
            assert_eq!(got, m, "after step {step}");
        }
    }

    #[test]
    fn lower_bound_matches_a_binary_search() {
        let mut x = 99u64;
        for n in 0..80usize {
            for trial in 0..20 {
                // Sorted distinct starts inside bucket 3: dense, clustered or spread.
                let base = 3 * BUCKET;
                let mut starts: Vec<u32> = (0..n as u32)
                    .map(|i| match trial % 3 {
                        0 => base + i * 4096,
                        1 => base + BUCKET - 4096 * (n as u32 - i),
                        _ => {
                            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                            base + ((x >> 33) as u32 % BUCKET)
                        }
                    })
                    .collect();
                starts.sort_unstable();
                starts.dedup();
                let v: Vec<Entry> = starts.iter().map(|&s| Entry(s, EMPTY)).collect();
                for probe in [base, base + 1, base + BUCKET - 1, base + BUCKET / 2]
                    .into_iter()
                    .chain(starts.iter().flat_map(|&s| [s - 1, s, s + 1]))
                {
                    let want = v.partition_point(|e| e.0 < probe);
                    assert_eq!(lower_bound(&v, 3, probe), want, "n {n} probe {probe}");
                }
            }
        }
    }

    #[test]
    fn a_shard_and_its_lock_fill_one_cache_line() {
        assert_eq!(std::mem::size_of::<ShardLock>(), 64);
    }

    #[test]
    fn model_at_a_bucket_boundary() {
        model_run(BUCKET - 128, 1, 256, 40, 3000);
    }

    #[test]
    fn model_across_a_whole_shard() {
        model_run(0, 4096, 1024, 200, 3000);
        model_run(0, 512, 8192, 1200, 400);
    }

    /// On a dense run the probe is the entry a lookup lands on, and insert_reporting
    /// reports exactly the replaced pieces.
    #[test]
    fn probe_and_reported_pieces() {
        let mut sh = Shard::default();
        assert_eq!(sh.probe_addr(0), None);
        for i in 0..64u32 {
            sh.insert(BUCKET + i * 4096, ext(4096, i * 4096));
        }
        for i in [0u32, 1, 31, 63] {
            let s = BUCKET + i * 4096;
            let (lo, hi) = sh.run(1);
            let at = lo + first_overlap(&sh.v[lo..hi], 1, s);
            assert_eq!(sh.v[at].0, s);
            assert_eq!(
                sh.probe_addr(s),
                Some(&sh.v[at] as *const Entry as *const u8)
            );
        }
        let mut gone = Vec::new();
        sh.insert_reporting(BUCKET + 2048, ext(8192, 1 << 20), |s, x| {
            gone.push((s, x.len, x.seg_off))
        });
        assert_eq!(
            gone,
            vec![
                (BUCKET + 2048, 2048, 2048),
                (BUCKET + 4096, 4096, 4096),
                (BUCKET + 8192, 2048, 8192)
            ]
        );
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
            .map(|(s, k)| (s, k.len, k.seg_off, k.crc_front(), k.crc_back()))
            .collect();
        assert_eq!(v, vec![(10, 5, 100, 0, 15), (20, 10, 110, 10, 0)]);
    }
}
