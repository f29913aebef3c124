//! Simulated backing block device with a volatile write cache and fault injection.
//!
//! [`SimDisk`] holds a `durable` image (the medium) and a volatile cache of whole
//! blocks written since the last flush. Reads see the cache over the medium; writes,
//! write-zeroes and discards (which read back as zeros here) land in the cache; `flush`
//! moves the whole cache to the medium. A power loss ([`SimDisk::crash`]) lets each
//! cached block independently reach the medium or not, so the only writes guaranteed
//! to survive are those completed before a completed flush.
//!
//! Operations run either synchronously (`read`, `write`, ...) or through a submission
//! queue (`submit` + `poll`) that completes them in random order, each applied at its
//! completion, to exercise the engine's asynchronous paths. A queued `Flush` is a
//! completion barrier: it completes (and applies) only after every write-like op
//! (`Write`, `WriteZeroes`, `Discard`) submitted before it has completed, like a
//! `REQ_PREFLUSH` on an empty bio. Ops submitted after a flush may complete before it.
//!
//! Faults: [`SimDisk::fail_nth`] and [`SimDisk::set_error_rate`] make chosen
//! operations fail with [`SimIoError`]; a failed operation has no effect at all. The
//! fault decision is taken when the op is issued (call or submission), so it depends
//! only on issue order, never on completion order. Everything is deterministic given
//! the seed ([`SimDisk::set_seed`]) and the rngs passed in.
//!
//! This is a test double: out-of-range requests panic (they are engine bugs).

use std::collections::BTreeMap;

use super::rng::Rng;

/// The kinds of disk operation, for counters and fault targeting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    Read,
    Write,
    Flush,
    WriteZeroes,
    Discard,
}

impl OpKind {
    /// Every kind, in counter order.
    pub const ALL: [OpKind; 5] = [
        OpKind::Read,
        OpKind::Write,
        OpKind::Flush,
        OpKind::WriteZeroes,
        OpKind::Discard,
    ];

    fn index(self) -> usize {
        self as usize
    }
}

/// An injected I/O failure: which op failed, and its 1-based ordinal among the ops of
/// its kind issued by this disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimIoError {
    pub kind: OpKind,
    pub seq: u64,
}

impl std::fmt::Display for SimIoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "simulated I/O error on {:?} #{}", self.kind, self.seq)
    }
}

impl std::error::Error for SimIoError {}

/// A request for the submission queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskOp {
    Read { off: u64, len: u64 },
    Write { off: u64, data: Vec<u8> },
    Flush,
    WriteZeroes { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
}

impl DiskOp {
    /// The op's kind.
    pub fn kind(&self) -> OpKind {
        match self {
            DiskOp::Read { .. } => OpKind::Read,
            DiskOp::Write { .. } => OpKind::Write,
            DiskOp::Flush => OpKind::Flush,
            DiskOp::WriteZeroes { .. } => OpKind::WriteZeroes,
            DiskOp::Discard { .. } => OpKind::Discard,
        }
    }

    /// Whether the op changes data (and so is ordered before a later flush).
    fn is_write_like(&self) -> bool {
        matches!(
            self,
            DiskOp::Write { .. } | DiskOp::WriteZeroes { .. } | DiskOp::Discard { .. }
        )
    }

    /// The byte range the op touches (`None` for a flush).
    fn range(&self) -> Option<(u64, u64)> {
        match self {
            DiskOp::Read { off, len }
            | DiskOp::WriteZeroes { off, len }
            | DiskOp::Discard { off, len } => Some((*off, *len)),
            DiskOp::Write { off, data } => Some((*off, data.len() as u64)),
            DiskOp::Flush => None,
        }
    }
}

/// The result of a completed op: a read's data, or an empty vector for other kinds.
pub type Completion = Result<Vec<u8>, SimIoError>;

/// Per-kind counters. `issued` counts every op issued, failed ones included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskStats {
    /// Ops issued per kind, indexed in [`OpKind::ALL`] order; see [`DiskStats::count`].
    pub issued: [u64; 5],
    /// Ops that failed by injection.
    pub failed: u64,
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// Bytes stored by successful writes (not write-zeroes or discards).
    pub bytes_written: u64,
}

impl DiskStats {
    /// Ops of `kind` issued so far (failed ones included).
    pub fn count(&self, kind: OpKind) -> u64 {
        self.issued[kind.index()]
    }

    /// Ops of any kind issued so far.
    pub fn total(&self) -> u64 {
        self.issued.iter().sum()
    }
}

/// A queued op, with its fault decision already taken at submission.
#[derive(Clone, Debug)]
struct Queued {
    tag: u64,
    op: DiskOp,
    fail: Option<SimIoError>,
}

/// Simulated block device; see the module documentation.
#[derive(Clone, Debug)]
pub struct SimDisk {
    block_size: u32,
    /// The medium: what survives a crash.
    durable: Vec<u8>,
    /// Volatile write cache: block index to the block's newest content; an empty vector
    /// stands for a block of zeros (so discarding a large range stays cheap).
    cache: BTreeMap<u64, Vec<u8>>,
    /// Submitted, not yet completed ops, in submission order.
    queue: Vec<Queued>,
    stats: DiskStats,
    /// Armed one-shot failures: (kind or any, absolute ordinal of the op to fail).
    fail_points: Vec<(Option<OpKind>, u64)>,
    error_rate: (u32, u32),
    /// Draws for random failures; independent of the rngs callers pass in.
    rng: Rng,
}

impl SimDisk {
    /// A zero-filled disk of `size` bytes. Panics unless `block_size > 0` and divides
    /// `size`.
    pub fn new(size: u64, block_size: u32) -> SimDisk {
        SimDisk::from_image(vec![0; size as usize], block_size)
    }

    /// A disk whose medium holds `image` (nothing cached). Same panics as `new`.
    pub fn from_image(image: Vec<u8>, block_size: u32) -> SimDisk {
        assert!(block_size > 0, "SimDisk: zero block size");
        assert!(
            image.len() % block_size as usize == 0,
            "SimDisk: size {} not a multiple of block size {block_size}",
            image.len()
        );
        SimDisk {
            block_size,
            durable: image,
            cache: BTreeMap::new(),
            queue: Vec::new(),
            stats: DiskStats::default(),
            fail_points: Vec::new(),
            error_rate: (0, 1),
            rng: Rng::new(0),
        }
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.durable.len() as u64
    }

    /// Block size in bytes: the unit of crash atomicity.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Counters so far.
    pub fn stats(&self) -> DiskStats {
        self.stats
    }

    /// Ops of `kind` issued so far.
    pub fn count(&self, kind: OpKind) -> u64 {
        self.stats.count(kind)
    }

    /// Number of blocks in the volatile cache (written since the last flush).
    pub fn cached_blocks(&self) -> usize {
        self.cache.len()
    }

    /// Number of submitted ops not yet completed.
    pub fn pending_ops(&self) -> usize {
        self.queue.len()
    }

    /// A copy of the medium: what a crash that loses the whole cache leaves.
    pub fn durable_image(&self) -> Vec<u8> {
        self.durable.clone()
    }

    /// A copy of what reads see now (the cache over the medium).
    pub fn image(&self) -> Vec<u8> {
        let mut out = self.durable.clone();
        let bs = self.block_size as usize;
        for (&blk, data) in &self.cache {
            let dst = &mut out[blk as usize * bs..(blk as usize + 1) * bs];
            if data.is_empty() {
                dst.fill(0);
            } else {
                dst.copy_from_slice(data);
            }
        }
        out
    }

    // ---- fault injection ----

    /// Arms a one-shot failure of the `n`-th op (1 = the next one) of `kind`, or of any
    /// kind if `None`, counting from this call. Several can be armed at once.
    pub fn fail_nth(&mut self, kind: Option<OpKind>, n: u64) {
        assert!(n > 0, "SimDisk::fail_nth: n is 1-based");
        let base = match kind {
            Some(k) => self.stats.count(k),
            None => self.stats.total(),
        };
        self.fail_points.push((kind, base + n));
    }

    /// Makes every op fail with probability `num / den` (0 disables).
    pub fn set_error_rate(&mut self, num: u32, den: u32) {
        assert!(den > 0, "SimDisk::set_error_rate: zero denominator");
        self.error_rate = (num, den);
    }

    /// Reseeds the rng behind random failures.
    pub fn set_seed(&mut self, seed: u64) {
        self.rng = Rng::new(seed);
    }

    /// Disarms every `fail_nth` and sets the error rate to 0.
    pub fn clear_faults(&mut self) {
        self.fail_points.clear();
        self.error_rate = (0, 1);
    }

    /// Counts an issued op and decides whether it fails.
    fn issue(&mut self, kind: OpKind) -> Option<SimIoError> {
        self.stats.issued[kind.index()] += 1;
        let seq = self.stats.count(kind);
        let total = self.stats.total();
        let before = self.fail_points.len();
        self.fail_points.retain(|&(k, at)| match k {
            Some(k) => !(k == kind && at == seq),
            None => at != total,
        });
        let mut fail = self.fail_points.len() != before;
        let (num, den) = self.error_rate;
        if num > 0 && self.rng.chance(num, den) {
            fail = true;
        }
        if fail {
            self.stats.failed += 1;
            Some(SimIoError { kind, seq })
        } else {
            None
        }
    }

    fn check(&self, off: u64, len: u64, what: &str) {
        assert!(
            off.checked_add(len).is_some_and(|e| e <= self.size()),
            "SimDisk::{what}: range {off}+{len} out of bounds (size {})",
            self.size()
        );
    }

    // ---- data path ----

    /// Blocks overlapping `[off, off + len)`.
    fn blocks(&self, off: u64, len: u64) -> std::ops::Range<u64> {
        let bs = u64::from(self.block_size);
        if len == 0 {
            return 0..0;
        }
        off / bs..(off + len).div_ceil(bs)
    }

    /// Copies the newest content of `[off, off + dst.len())` into `dst`.
    fn do_read(&mut self, off: u64, dst: &mut [u8]) {
        let bs = u64::from(self.block_size);
        for blk in self.blocks(off, dst.len() as u64) {
            let bstart = blk * bs;
            let lo = off.max(bstart);
            let hi = (off + dst.len() as u64).min(bstart + bs);
            let d = &mut dst[(lo - off) as usize..(hi - off) as usize];
            match self.cache.get(&blk) {
                Some(b) if b.is_empty() => d.fill(0),
                Some(b) => d.copy_from_slice(&b[(lo - bstart) as usize..(hi - bstart) as usize]),
                None => d.copy_from_slice(&self.durable[lo as usize..hi as usize]),
            }
        }
        self.stats.bytes_read += dst.len() as u64;
    }

    /// Stores `src` (or zeros, if `None`) over `[off, off + len)` in the cache.
    fn do_write(&mut self, off: u64, len: u64, src: Option<&[u8]>) {
        let bs = u64::from(self.block_size);
        for blk in self.blocks(off, len) {
            let bstart = blk * bs;
            let lo = off.max(bstart);
            let hi = (off + len).min(bstart + bs);
            let s = src.map(|s| &s[(lo - off) as usize..(hi - off) as usize]);
            if hi - lo == bs {
                // Whole block: no need to read the old content.
                self.cache
                    .insert(blk, s.map_or_else(Vec::new, <[u8]>::to_vec));
                continue;
            }
            let durable = &self.durable;
            let b = self
                .cache
                .entry(blk)
                .or_insert_with(|| durable[bstart as usize..(bstart + bs) as usize].to_vec());
            if b.is_empty() {
                b.resize(bs as usize, 0);
            }
            let d = &mut b[(lo - bstart) as usize..(hi - bstart) as usize];
            match s {
                Some(s) => d.copy_from_slice(s),
                None => d.fill(0),
            }
        }
        if let Some(s) = src {
            self.stats.bytes_written += s.len() as u64;
        }
    }

    /// Moves one cached block to the medium.
    fn persist_block(durable: &mut [u8], bs: usize, blk: u64, data: &[u8]) {
        let dst = &mut durable[blk as usize * bs..(blk as usize + 1) * bs];
        if data.is_empty() {
            dst.fill(0);
        } else {
            dst.copy_from_slice(data);
        }
    }

    fn do_flush(&mut self) {
        let bs = self.block_size as usize;
        for (blk, data) in std::mem::take(&mut self.cache) {
            SimDisk::persist_block(&mut self.durable, bs, blk, &data);
        }
    }

    /// Applies a (non-failing) op; returns a read's data.
    fn apply(&mut self, op: DiskOp) -> Vec<u8> {
        match op {
            DiskOp::Read { off, len } => {
                let mut buf = vec![0; len as usize];
                self.do_read(off, &mut buf);
                buf
            }
            DiskOp::Write { off, data } => {
                self.do_write(off, data.len() as u64, Some(&data));
                Vec::new()
            }
            DiskOp::WriteZeroes { off, len } | DiskOp::Discard { off, len } => {
                self.do_write(off, len, None);
                Vec::new()
            }
            DiskOp::Flush => {
                self.do_flush();
                Vec::new()
            }
        }
    }

    // ---- synchronous API ----

    /// Reads the newest data at `off` into `buf`. On failure `buf` is untouched.
    pub fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<(), SimIoError> {
        self.check(off, buf.len() as u64, "read");
        match self.issue(OpKind::Read) {
            Some(e) => Err(e),
            None => {
                self.do_read(off, buf);
                Ok(())
            }
        }
    }

    /// Writes `data` at `off` into the volatile cache.
    pub fn write(&mut self, off: u64, data: &[u8]) -> Result<(), SimIoError> {
        self.check(off, data.len() as u64, "write");
        match self.issue(OpKind::Write) {
            Some(e) => Err(e),
            None => {
                self.do_write(off, data.len() as u64, Some(data));
                Ok(())
            }
        }
    }

    /// Makes every cached write durable.
    pub fn flush(&mut self) -> Result<(), SimIoError> {
        match self.issue(OpKind::Flush) {
            Some(e) => Err(e),
            None => {
                self.do_flush();
                Ok(())
            }
        }
    }

    /// Writes zeros over `[off, off + len)` (through the cache, like a write).
    pub fn write_zeroes(&mut self, off: u64, len: u64) -> Result<(), SimIoError> {
        self.check(off, len, "write_zeroes");
        match self.issue(OpKind::WriteZeroes) {
            Some(e) => Err(e),
            None => {
                self.do_write(off, len, None);
                Ok(())
            }
        }
    }

    /// Discards `[off, off + len)`; in this simulator discarded ranges read back as
    /// zeros, and the discard is volatile until flushed, like a write of zeros.
    pub fn discard(&mut self, off: u64, len: u64) -> Result<(), SimIoError> {
        self.check(off, len, "discard");
        match self.issue(OpKind::Discard) {
            Some(e) => Err(e),
            None => {
                self.do_write(off, len, None);
                Ok(())
            }
        }
    }

    // ---- asynchronous API ----

    /// Queues `op` under `tag` (tags are the caller's; they need not be unique). The
    /// fault decision is taken now; the effect happens when `poll` completes it.
    pub fn submit(&mut self, tag: u64, op: DiskOp) {
        if let Some((off, len)) = op.range() {
            self.check(off, len, "submit");
        }
        let fail = self.issue(op.kind());
        self.queue.push(Queued { tag, op, fail });
    }

    /// Completes one queued op chosen at random with `rng` among those allowed to
    /// complete, applies it, and returns its tag and result; `None` if the queue is
    /// empty. A `Flush` is allowed only once no write-like op submitted before it is
    /// still queued (so a completing flush always covers them); everything else may
    /// complete at any time.
    pub fn poll(&mut self, rng: &mut Rng) -> Option<(u64, Completion)> {
        if self.queue.is_empty() {
            return None;
        }
        let mut eligible = Vec::with_capacity(self.queue.len());
        let mut writes_before = false;
        for (i, q) in self.queue.iter().enumerate() {
            if q.op != DiskOp::Flush || !writes_before {
                eligible.push(i);
            }
            writes_before |= q.op.is_write_like();
        }
        // The first queued op is always eligible, so `eligible` is never empty.
        let i = eligible[rng.index(eligible.len())];
        let q = self.queue.remove(i);
        let result = match q.fail {
            Some(e) => Err(e),
            None => Ok(self.apply(q.op)),
        };
        Some((q.tag, result))
    }

    /// Completes every queued op (in random order, honouring flush barriers).
    pub fn complete_all(&mut self, rng: &mut Rng) -> Vec<(u64, Completion)> {
        let mut out = Vec::with_capacity(self.queue.len());
        while let Some(c) = self.poll(rng) {
            out.push(c);
        }
        out
    }

    // ---- power loss ----

    /// Power loss: each queued (in-flight) write-like op that would not fail reached
    /// the cache or not, at random and in random order; then each cached block
    /// independently reached the medium or not. Afterwards the cache and the queue
    /// are empty (in-flight ops never complete) and reads see the medium. Counters and
    /// armed faults are kept.
    pub fn crash(&mut self, rng: &mut Rng) {
        let mut inflight: Vec<DiskOp> = std::mem::take(&mut self.queue)
            .into_iter()
            .filter(|q| q.fail.is_none() && q.op.is_write_like())
            .map(|q| q.op)
            .collect();
        rng.shuffle(&mut inflight);
        // Applying them may touch the byte counters; the crash is not real traffic.
        let stats = self.stats;
        for op in inflight {
            if rng.chance(1, 2) {
                self.apply(op);
            }
        }
        self.stats = stats;
        let bs = self.block_size as usize;
        for (blk, data) in std::mem::take(&mut self.cache) {
            if rng.chance(1, 2) {
                SimDisk::persist_block(&mut self.durable, bs, blk, &data);
            }
        }
    }

    /// Power loss losing every cached and in-flight write (the most pessimistic).
    pub fn crash_drop_all(&mut self) {
        self.queue.clear();
        self.cache.clear();
    }

    /// Power loss where every cached write reached the medium; in-flight ops are lost.
    pub fn crash_keep_all(&mut self) {
        self.queue.clear();
        self.do_flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: u32 = 512;

    fn read_vec(d: &mut SimDisk, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        d.read(off, &mut v).unwrap();
        v
    }

    #[test]
    fn reads_see_cache_over_medium() {
        let mut d = SimDisk::new(8 * 512, BS);
        d.write(100, &[7; 1000]).unwrap(); // unaligned, spans 3 blocks
        assert_eq!(read_vec(&mut d, 100, 1000), vec![7; 1000]);
        assert_eq!(read_vec(&mut d, 0, 100), vec![0; 100]);
        assert_eq!(d.durable_image(), vec![0; 8 * 512]);
        assert_eq!(d.cached_blocks(), 3);
        let img = d.image();
        assert_eq!(img[100..1100], [7; 1000]);
        d.flush().unwrap();
        assert_eq!(d.durable_image(), img);
        assert_eq!(d.cached_blocks(), 0);
    }

    #[test]
    fn crash_keeps_only_flushed_writes() {
        let mut d = SimDisk::new(16 * 512, BS);
        d.write(0, &[1; 512]).unwrap();
        d.flush().unwrap();
        d.write(512, &[2; 512]).unwrap();
        d.write(0, &[3; 512]).unwrap(); // overwrite of flushed data, unflushed
        d.crash_drop_all();
        assert_eq!(read_vec(&mut d, 0, 512), vec![1; 512]);
        assert_eq!(read_vec(&mut d, 512, 512), vec![0; 512]);
        assert_eq!(d.image(), d.durable_image());
    }

    #[test]
    fn random_crash_blocks_are_old_or_new() {
        let n = 64;
        let (mut kept, mut lost) = (0, 0);
        for seed in 0..10 {
            let mut d = SimDisk::new(n * 512, BS);
            d.write(0, &vec![9; (n * 512) as usize]).unwrap();
            d.crash(&mut Rng::new(seed));
            for blk in d.durable_image().chunks(512) {
                assert!(blk.iter().all(|&b| b == blk[0]), "block is atomic");
                match blk[0] {
                    9 => kept += 1,
                    0 => lost += 1,
                    v => panic!("unexpected byte {v}"),
                }
            }
        }
        assert!(kept > 0 && lost > 0);
    }

    #[test]
    fn zeroes_and_discard_read_back_zero_and_are_volatile() {
        let mut d = SimDisk::from_image(vec![5; 4 * 512], BS);
        d.write_zeroes(0, 512).unwrap();
        d.discard(600, 100).unwrap(); // partial block
        assert_eq!(read_vec(&mut d, 0, 512), vec![0; 512]);
        assert_eq!(read_vec(&mut d, 512, 88), vec![5; 88]);
        assert_eq!(read_vec(&mut d, 600, 100), vec![0; 100]);
        assert_eq!(read_vec(&mut d, 700, 10), vec![5; 10]);
        let mut c = d.clone();
        c.crash_drop_all();
        assert_eq!(c.durable_image(), vec![5; 4 * 512]);
        d.crash_keep_all();
        let img = d.durable_image();
        assert_eq!(img[..512], [0; 512]);
        assert_eq!(img[600..700], [0; 100]);
        assert_eq!(img[700..], vec![5; 4 * 512 - 700][..]);
    }

    #[test]
    fn fail_nth_fails_exactly_that_op_without_effect() {
        let mut d = SimDisk::new(4 * 512, BS);
        d.fail_nth(Some(OpKind::Write), 2);
        d.write(0, &[1; 4]).unwrap();
        let e = d.write(0, &[2; 4]).unwrap_err();
        assert_eq!(
            e,
            SimIoError {
                kind: OpKind::Write,
                seq: 2
            }
        );
        assert_eq!(read_vec(&mut d, 0, 4), vec![1; 4]);
        d.write(0, &[3; 4]).unwrap(); // one-shot
                                      // Any-kind failure: the next op, whatever it is.
        d.fail_nth(None, 1);
        assert!(d.flush().is_err());
        assert_eq!(d.cached_blocks(), 1, "failed flush has no effect");
        d.flush().unwrap();
        assert_eq!(d.durable_image()[..4], [3; 4]);
        let s = d.stats();
        assert_eq!(s.count(OpKind::Write), 3);
        assert_eq!(s.count(OpKind::Flush), 2);
        assert_eq!(s.failed, 2);
        assert_eq!(e.to_string(), "simulated I/O error on Write #2");
    }

    #[test]
    fn failed_read_leaves_buffer() {
        let mut d = SimDisk::from_image(vec![4; 512], BS);
        d.fail_nth(Some(OpKind::Read), 1);
        let mut buf = [9u8; 8];
        assert!(d.read(0, &mut buf).is_err());
        assert_eq!(buf, [9; 8]);
    }

    #[test]
    fn error_rate_is_seeded_and_roughly_right() {
        let run = |seed| {
            let mut d = SimDisk::new(512, BS);
            d.set_seed(seed);
            d.set_error_rate(1, 4);
            (0..1000)
                .map(|_| d.write(0, &[1]).is_err())
                .collect::<Vec<_>>()
        };
        let a = run(3);
        assert_eq!(a, run(3));
        let fails = a.iter().filter(|&&f| f).count();
        assert!((180..320).contains(&fails), "{fails}");
        let mut d = SimDisk::new(512, BS);
        d.set_error_rate(1, 1);
        assert!(d.write(0, &[1]).is_err());
        d.clear_faults();
        assert!(d.write(0, &[1]).is_ok());
    }

    #[test]
    fn async_completes_all_in_random_order_and_reads_return_data() {
        let mut orders = std::collections::HashSet::new();
        for seed in 0..20 {
            let mut d = SimDisk::from_image(vec![6; 8 * 512], BS);
            for t in 0..5 {
                d.submit(
                    t,
                    DiskOp::Read {
                        off: t * 512,
                        len: 16,
                    },
                );
            }
            let done = d.complete_all(&mut Rng::new(seed));
            assert_eq!(done.len(), 5);
            for (_, r) in &done {
                assert_eq!(r.as_ref().unwrap(), &vec![6; 16]);
            }
            orders.insert(done.iter().map(|(t, _)| *t).collect::<Vec<_>>());
            assert_eq!(d.pending_ops(), 0);
        }
        assert!(orders.len() > 1, "completion order varies with the rng");
    }

    #[test]
    fn flush_is_a_completion_barrier() {
        for seed in 0..200 {
            let mut d = SimDisk::new(8 * 512, BS);
            d.submit(
                1,
                DiskOp::Write {
                    off: 0,
                    data: vec![1; 512],
                },
            );
            d.submit(2, DiskOp::WriteZeroes { off: 512, len: 512 });
            d.submit(3, DiskOp::Flush);
            d.submit(
                4,
                DiskOp::Write {
                    off: 1024,
                    data: vec![4; 512],
                },
            );
            d.submit(5, DiskOp::Read { off: 0, len: 4 });
            let mut rng = Rng::new(seed);
            let mut done = Vec::new();
            while let Some((tag, r)) = d.poll(&mut rng) {
                r.unwrap();
                if tag == 3 {
                    assert!(done.contains(&1) && done.contains(&2), "seed {seed}");
                    // At completion the flush made the earlier writes durable.
                    assert_eq!(d.durable_image()[..512], [1; 512]);
                }
                done.push(tag);
            }
            assert_eq!(done.len(), 5);
        }
    }

    #[test]
    fn async_failure_decided_at_submit_and_has_no_effect() {
        let mut d = SimDisk::new(4 * 512, BS);
        d.fail_nth(Some(OpKind::Write), 1);
        d.submit(
            10,
            DiskOp::Write {
                off: 0,
                data: vec![1; 512],
            },
        );
        d.submit(
            11,
            DiskOp::Write {
                off: 0,
                data: vec![2; 512],
            },
        );
        let mut rng = Rng::new(0);
        let mut res: Vec<_> = d.complete_all(&mut rng);
        res.sort_by_key(|(t, _)| *t);
        assert!(res[0].1.is_err() && res[1].1.is_ok());
        assert_eq!(d.image()[..512], [2; 512]);
    }

    #[test]
    fn crash_with_inflight_ops_empties_queue() {
        let mut d = SimDisk::new(4 * 512, BS);
        d.submit(
            1,
            DiskOp::Write {
                off: 0,
                data: vec![1; 512],
            },
        );
        d.submit(2, DiskOp::Flush);
        d.crash(&mut Rng::new(1));
        assert_eq!(d.pending_ops(), 0);
        assert_eq!(d.cached_blocks(), 0);
        let blk = &d.durable_image()[..512];
        assert!(blk == [0; 512] || blk == [1; 512]);
        assert!(d.poll(&mut Rng::new(0)).is_none());
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn out_of_range_panics() {
        let mut d = SimDisk::new(512, BS);
        let _ = d.write(510, &[0; 4]);
    }
}
