//! The request paths: write, read (hits and misses), miss fill, write-zeroes/discard.
//!
//! Write: allocate pmem space from the channel's head (taking a segment reference for
//! the key), copy and persist the data with no lock held, then under the region's shard
//! lock insert the extent and append its key to the channel's own kset (`kset_for`). The
//! kset is made to have room *before* the index changes, so a full log never leaves the
//! index without the old extents (dm-pcache's hazard). Request counters go to the
//! channel's slot. Read: under the shard lock, plan hits, zero
//! ranges and misses (placing placeholders over gaps so concurrent misses fetch a range
//! once); copy hits after unlocking and re-check the segment generation afterwards, so a
//! segment reclaimed during the copy turns the hit into a miss instead of garbage.

use super::format::{self, KeyRec, KEY_CLEAN, KEY_DISCARD, KEY_ZERO, SUBTREE_SIZE};
use super::index::{Extent, Shard, F_CRC, F_DIRTY, F_EMPTY, F_ZERO};
use super::log::{LogFull, Superseded};
use super::slots::{SlotHandle, COMMON};
use super::{Engine, IoError, KsetGuard, Pmem};
use std::sync::atomic::Ordering::{Acquire, Relaxed};

/// A channel: per-thread state. Create with `Channel::default()`; give it back with
/// `Engine::release_channel`.
pub struct Channel {
    /// The allocation head (`Head::NONE` when the channel holds no segment: an Option
    /// would cost 8 bytes, and a read's channel travels in every SPDK request context).
    head: Head,
    /// Its kset and counters (taken on first use; given back when dropped).
    pub(super) slot: Option<SlotHandle>,
    plan: Vec<Piece>,
    scratch: Vec<u8>,
    /// Sequential streams seen (for the cutoff), and whether the last read's misses
    /// are to be cached.
    pub(super) streams: super::streams::Streams,
    no_fill: bool,
    /// `write_many`'s pieces between their copy and their key (empty between calls).
    pub(super) staged: Vec<Staged>,
    /// The segment (and low bits of its generation) the head last left, sealed at the
    /// channel's next call (`Engine::seal_left`), when its allocations are all keyed.
    /// One only: a call that leaves two segments (larger than a segment) leaves the
    /// first unsealed, which only keeps compaction away from it.
    left: (u32, u32),
    /// GC's own channel: its moves may take the free segments writers leave it.
    pub(super) background: bool,
}

/// One piece of a `write_many` request's data (batch.rs), placed on the medium but not
/// yet in the index.
#[derive(Debug, Clone, Copy)]
pub(super) struct Staged {
    pub(super) req: u32,
    /// Offset of the piece in its request's data.
    pub(super) pos: u32,
    pub(super) off: u64,
    pub(super) len: u32,
    pub(super) seg: u32,
    pub(super) seg_off: u32,
    pub(super) gen: u64,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Head {
    pub seg: u32,
    pub off: u64,
    /// Segment references the head holds beyond its own, taken in one go when it
    /// entered the segment (`alloc`): each allocation hands one to its key, so a write
    /// does no atomic add on the segment's shared count.
    pub spare: u32,
}

#[derive(Debug, Clone, Copy)]
enum Piece {
    Hit {
        at: usize,
        x: Extent,
    },
    Zero {
        at: usize,
        len: usize,
    },
    /// `token` is Some when this read placed the placeholder and may fill.
    Miss {
        at: usize,
        len: usize,
        token: Option<u32>,
    },
}

/// A range the caller must read from the backing device into `buf[at..at + len]`
/// (backing offset = request offset + at).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Miss {
    pub at: usize,
    pub len: usize,
}

impl Default for Channel {
    fn default() -> Self {
        Channel {
            head: Head::NONE,
            slot: None,
            plan: Vec::new(),
            scratch: Vec::new(),
            streams: Default::default(),
            no_fill: false,
            staged: Vec::new(),
            left: (NO_SEG, 0),
            background: false,
        }
    }
}

/// No segment (`Head::NONE`, an empty `Channel::left`).
const NO_SEG: u32 = u32::MAX;

impl Head {
    const NONE: Head = Head {
        seg: NO_SEG,
        off: 0,
        spare: 0,
    };
}

impl Channel {
    /// The allocation head, if the channel holds a segment.
    pub(super) fn head(&self) -> Option<Head> {
        (self.head.seg != NO_SEG).then_some(self.head)
    }

    pub(super) fn take_head(&mut self) -> Option<Head> {
        let h = self.head();
        self.head = Head::NONE;
        h
    }

    fn note_left(&mut self, seg: u32, gen: u64) {
        self.left = (seg, gen as u32);
    }

    /// The misses of the last `read`.
    pub fn misses(&self) -> impl Iterator<Item = Miss> + '_ {
        self.plan.iter().filter_map(|p| match *p {
            Piece::Miss { at, len, .. } => Some(Miss { at, len }),
            _ => None,
        })
    }

    /// Exchanges the sequential-stream state with `other`: a runtime that gives each
    /// read in flight a channel of its own lends it the stream state of the channel
    /// its requests come through, so the cutoff sees their streams whole.
    pub fn swap_streams(&mut self, other: &mut Channel) {
        std::mem::swap(&mut self.streams, &mut other.streams);
    }
}

pub(super) struct Alloc {
    pub(super) seg: u32,
    pub(super) off: u64,
    pub(super) len: u64,
    pub(super) gen: u64,
}

impl<P: Pmem> Engine<P> {
    pub(super) fn check_range(&self, off: u64, len: u64) -> Result<(), IoError> {
        if off
            .checked_add(len)
            .is_none_or(|e| e > self.geo.backing_size)
        {
            return Err(IoError::OutOfRange);
        }
        let a = self.align as u64;
        if off % a != 0 || len % a != 0 {
            return Err(IoError::Unaligned);
        }
        Ok(())
    }

    /// Seals the segment `ch`'s head left in its previous call: called at the start of
    /// every call that allocates, when that call's allocations are all in the index.
    pub(super) fn seal_left(&self, ch: &mut Channel) {
        if ch.left.0 != NO_SEG {
            self.segs.seal(ch.left.0, ch.left.1);
            ch.left.0 = NO_SEG;
        }
    }

    /// `alloc` for a call that keys each allocation before it makes the next: the
    /// segment an earlier allocation of the same call left is sealed first. (Sealing
    /// only at the start of a call left all but the last segment a long call filled
    /// unsealed, and so out of compaction's reach until the log's tail reclaimed it:
    /// GC's relocation fills several segments in one call.)
    pub(super) fn alloc_keyed(&self, ch: &mut Channel, want: u64) -> Result<Alloc, IoError> {
        self.seal_left(ch);
        self.alloc(ch, want)
    }

    /// Carves up to `want` bytes from the channel's head; the result holds one segment
    /// reference for the key that will point at it.
    pub(super) fn alloc(&self, ch: &mut Channel, want: u64) -> Result<Alloc, IoError> {
        let data = self.geo.seg_data_size;
        let a = self.align as u64;
        loop {
            let h = match ch.head() {
                Some(h) => h,
                None => {
                    let keep = if ch.background {
                        0
                    } else {
                        self.segs.writer_keep()
                    };
                    let seg = self.segs.take_data(keep).ok_or(IoError::Busy)?;
                    self.update_pace(self.segs.used() as u64);
                    // Every allocation takes at least one block: this many references
                    // cover all the keys the segment can get from this head.
                    let spare = (data / a) as u32;
                    self.segs.get_n(seg, spare);
                    let h = Head { seg, off: 0, spare };
                    ch.head = h;
                    h
                }
            };
            let avail = (data - h.off) / a * a;
            let gen = self.segs.gens[h.seg as usize].load(Relaxed);
            if avail == 0 || h.spare == 0 {
                ch.head = Head::NONE;
                ch.note_left(h.seg, gen);
                self.segs.put_n(&self.pmem, &self.geo, h.seg, 1 + h.spare);
                continue;
            }
            let len = want.min(avail);
            let r = Alloc {
                seg: h.seg,
                off: h.off,
                len,
                gen,
            };
            // One spare reference goes to the key.
            if len < avail {
                ch.head = Head {
                    seg: h.seg,
                    off: h.off + len,
                    spare: h.spare - 1,
                };
            } else {
                ch.head = Head::NONE;
                ch.note_left(h.seg, gen);
                self.segs.put_n(&self.pmem, &self.geo, h.seg, h.spare);
            }
            return Ok(r);
        }
    }

    /// Appends a key (room guaranteed) and closes the kset if full or forced.
    pub(super) fn append(
        &self,
        g: &mut KsetGuard<'_>,
        k: &KeyRec,
        force: bool,
    ) -> Result<(), IoError> {
        g.push(k, k.flags & KEY_CLEAN == 0);
        if force || g.kb.count >= self.geo.kset_keys {
            let closed = self.close_kset(g);
            // A full kset that cannot close yet stays buffered (the next key's
            // `kset_for` retries); a forced close must succeed.
            if closed.is_err() && force {
                return Err(IoError::Busy);
            }
        }
        Ok(())
    }

    /// The DRAM lines a write or read of `off` will touch first in the index: the
    /// shard's lock and (if the shard has entries) the entry its lookup probes first,
    /// as of the shard's last unlock. An environment may prefetch them before copying
    /// data, so the lookup after the copy does not wait for memory. A hint only (the
    /// entry may have moved since): no lock, no shared write; it never blocks.
    pub fn probe_addr(&self, off: u64) -> (Option<*const u8>, Option<*const u8>) {
        let si = self.shard_of(off);
        let (Some(lock), Some(aux)) = (self.shards.get(si), self.aux.get(si)) else {
            return (None, None);
        };
        let lock = Some(lock as *const _ as *const u8);
        let at = aux.entries.load(Relaxed);
        let n = aux.len.load(Relaxed) as usize;
        if at == 0 || n == 0 {
            return (lock, None);
        }
        let probe = at.wrapping_add(Shard::probe_offset(n, (off % SUBTREE_SIZE) as u32));
        (lock, Some(probe as *const u8))
    }

    /// Writes `data` at backing offset `off`. Completes only once the data is
    /// persistent in pmem (after the environment's group commit, if its `flush_data`
    /// postpones durability); with `fua` its key and data are persistent on return. `Busy` means the cache
    /// is full: retry the whole request later (rewriting is idempotent).
    pub fn write(&self, ch: &mut Channel, off: u64, data: &[u8], fua: bool) -> Result<(), IoError> {
        self.check_range(off, data.len() as u64)?;
        self.seal_left(ch);
        let id = self.slot_id(ch);
        let slot = self.slots.get(id);
        self.admit(data.len() as u64)
            .inspect_err(|_| slot.add(|c| &c.paced, 1))?;
        if fua {
            self.new_epoch();
        }
        let mut pos = 0usize;
        while pos < data.len() {
            let o = off + pos as u64;
            let to_boundary = SUBTREE_SIZE - o % SUBTREE_SIZE;
            let want = (data.len() - pos).min(to_boundary as usize) as u64;
            let a = self.alloc_keyed(ch, want)?;
            let src = &data[pos..pos + a.len as usize];
            let at = self.geo.data_off(a.seg, a.off);
            self.pmem.write(at, src);
            // The key below goes to a DRAM kset; `log::close` drains before storing it.
            self.pmem.flush_data(at, a.len);
            self.pmem.fence();
            let (k, x) = self.data_key(o, a.seg, a.off as u32, a.gen, src);
            // FUA closes the kset of *every* piece: pieces of one request in different
            // regions go through different ksets.
            self.insert_key(id, &k, x, fua)?;
            pos += a.len as usize;
        }
        slot.add(|c| &c.writes, 1);
        slot.add(|c| &c.bytes_written, data.len() as u64);
        Ok(())
    }

    /// The key and dirty index extent of request data `src` for backing offset `off`,
    /// stored at `seg_off` of segment `seg` (generation `gen`), with its CRC if the
    /// cache keeps data CRCs.
    pub(super) fn data_key(
        &self,
        off: u64,
        seg: u32,
        seg_off: u32,
        gen: u64,
        src: &[u8],
    ) -> (KeyRec, Extent) {
        let k = KeyRec {
            off,
            len: src.len() as u32,
            flags: 0,
            seg,
            seg_off,
            gen,
            data_crc: if self.data_crc { format::crc(src) } else { 0 },
        };
        let flags = if self.data_crc {
            F_DIRTY | F_CRC
        } else {
            F_DIRTY
        };
        (k, Extent::of_key(&k, flags))
    }

    /// Inserts an extent and appends its key, atomically with respect to the region.
    /// On `Busy` before the insert the key's segment reference is dropped.
    pub(super) fn insert_key(
        &self,
        id: u16,
        k: &KeyRec,
        mut x: Extent,
        force: bool,
    ) -> Result<(), IoError> {
        let si = self.shard_of(k.off);
        let mut shard = self.shard(si);
        let mut kb = match self.kset_for(k.off, k.len as u64, id) {
            Ok(kb) => kb,
            Err(LogFull) => {
                drop(shard);
                if k.has_data() {
                    self.segs.put(&self.pmem, &self.geo, k.seg);
                }
                return Err(IoError::Busy);
            }
        };
        // Read under the kset lock: a FLUSH advances the epoch before it closes ksets,
        // so a key that missed its close carries the new epoch.
        let epoch = self.epoch.load(Acquire);
        x.set_epoch(epoch);
        kb.kb.note_epoch(epoch);
        let bits = x.epoch_bits();
        shard.insert_reporting((k.off % SUBTREE_SIZE) as u32, x, |_, y| {
            // Old dirty data of this epoch: writeback may skip it once this key is in
            // the log (no barrier lies between the two writes).
            if y.is(F_DIRTY) && y.has_data() && y.epoch_bits() == bits {
                kb.kb.note_superseded(Superseded {
                    seg: y.seg,
                    seg_off: y.seg_off,
                    len: y.len,
                    gen: y.gen,
                });
            }
        });
        self.append(&mut kb, k, force)
    }

    /// Makes `[off, off + len)` read as zeros. `discard` lets writeback unmap the range
    /// on the backing device instead of writing zeros.
    pub fn write_zeroes(
        &self,
        off: u64,
        len: u64,
        discard: bool,
        fua: bool,
    ) -> Result<(), IoError> {
        self.check_range(off, len)?;
        if discard {
            self.counters.discards.inc();
        } else {
            self.counters.zeroes.inc();
        }
        if fua {
            self.new_epoch();
        }
        let mut pos = 0u64;
        while pos < len {
            let o = off + pos;
            let n = (len - pos).min(SUBTREE_SIZE - o % SUBTREE_SIZE);
            let flags = KEY_ZERO | if discard { KEY_DISCARD } else { 0 };
            let k = KeyRec {
                off: o,
                len: n as u32,
                flags,
                ..Default::default()
            };
            let x = Extent::without_data(n as u32, F_ZERO | F_DIRTY, 0);
            // No channel here: the common slot's kset.
            self.insert_key(COMMON, &k, x, fua)?;
            pos += n;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `off`. Hits and zero ranges are filled in; the ranges
    /// left to read from the backing device are in `ch.misses()`. When there are any,
    /// the caller reads them and then calls `fill` (with the read's outcome) before
    /// using the channel for anything else.
    pub fn read(&self, ch: &mut Channel, off: u64, buf: &mut [u8]) -> Result<usize, IoError> {
        self.check_range(off, buf.len() as u64)?;
        let slot = self.slots.get(self.slot_id(ch));
        slot.add(|c| &c.reads, 1);
        ch.no_fill = !self.read_fills(ch, off, buf.len() as u64);
        ch.plan.clear();
        let (mut pos, mut declined) = (0usize, 0u64);
        while pos < buf.len() {
            let o = off + pos as u64;
            let n = (buf.len() - pos).min((SUBTREE_SIZE - o % SUBTREE_SIZE) as usize);
            declined += self.plan_piece(ch, o, pos, n);
            pos += n;
        }
        let (mut hit, mut missed) = (0usize, 0usize);
        for i in 0..ch.plan.len() {
            match ch.plan[i] {
                Piece::Zero { at, len } => {
                    buf[at..at + len].fill(0);
                    hit += len;
                }
                Piece::Miss { len, .. } => missed += len,
                Piece::Hit { at, x } => {
                    let len = x.len as usize;
                    let dst = &mut buf[at..at + len];
                    self.pmem
                        .read(self.geo.data_off(x.seg, x.seg_off as u64), dst);
                    // A reclaim during the copy bumped the generation first: the bytes
                    // may be torn, but the range is on the backing device by then.
                    let good = self.segs.gen32(x.seg) == x.gen
                        && match self.verify_hit(ch, off + at as u64, at, &x, buf) {
                            Ok(g) => g,
                            Err(e) => {
                                // Withdraw this read's placeholders before failing it.
                                self.fill(ch, off, buf, false);
                                return Err(e);
                            }
                        };
                    if !good {
                        ch.plan[i] = Piece::Miss {
                            at,
                            len,
                            token: None,
                        };
                        missed += len;
                    } else {
                        hit += len;
                    }
                }
            }
        }
        slot.add(|c| &c.bytes_read, buf.len() as u64);
        slot.add(|c| &c.bytes_hit, hit as u64);
        if ch.no_fill && missed > 0 {
            slot.add(|c| &c.bypassed, 1);
            slot.add(|c| &c.bypassed_bytes, missed as u64);
        }
        if declined > 0 {
            slot.add(|c| &c.declined_bytes, declined);
        }
        match (hit > 0, missed > 0) {
            (_, false) => slot.add(|c| &c.hits, 1),
            (false, true) => slot.add(|c| &c.misses, 1),
            (true, true) => slot.add(|c| &c.partial_hits, 1),
        }
        Ok(missed)
    }

    /// Plans one piece inside a single region. Returns the missed bytes a full cache
    /// declined to cache (not seen missing before: `promote`).
    fn plan_piece(&self, ch: &mut Channel, o: u64, at: usize, n: usize) -> u64 {
        let si = self.shard_of(o);
        let s = (o % SUBTREE_SIZE) as u32;
        let e = s + n as u32;
        let mut shard = self.shard(si);
        let first = ch.plan.len();
        let fill = !ch.no_fill;
        let mut cursor = s;
        let plan = &mut ch.plan;
        let segs = &self.segs;
        let to_at = |x: u32| at + (x - s) as usize;
        // A hit counts itself on what it reads (`F_REF`, then `F_REF2`): GC keeps such
        // data when it reclaims.
        shard.walk_marking(
            s,
            e,
            |x| segs.gen32(x.seg) != x.gen,
            true,
            |ks, x| {
                if ks > cursor {
                    plan.push(Piece::Miss {
                        at: to_at(cursor),
                        len: (ks - cursor) as usize,
                        token: Some(0),
                    });
                }
                let len = x.len as usize;
                plan.push(if x.is(F_EMPTY) {
                    Piece::Miss {
                        at: to_at(ks),
                        len,
                        token: None,
                    }
                } else if x.is(F_ZERO) {
                    Piece::Zero { at: to_at(ks), len }
                } else {
                    Piece::Hit { at: to_at(ks), x }
                });
                cursor = ks + x.len;
            },
        );
        if cursor < e {
            plan.push(Piece::Miss {
                at: to_at(cursor),
                len: (e - cursor) as usize,
                token: Some(0),
            });
        }
        // Gaps get placeholders so a concurrent read of the same range does not fill it
        // a second time, and a concurrent write cancels our fill. A gap this read will
        // not cache (the cutoff, passthrough, or a full cache declining a first miss)
        // gets none: it is only read from the backing device, so there is nothing to
        // protect and nothing to withdraw afterwards.
        let mut declined = 0u64;
        for p in &mut plan[first..] {
            let Piece::Miss {
                at: pat,
                len,
                token: token @ Some(_),
            } = p
            else {
                continue;
            };
            if !fill {
                *token = None;
                continue;
            }
            if !self.promote(o + (*pat - at) as u64) {
                declined += *len as u64;
                *token = None;
                continue;
            }
            super::sync::count::rmw();
            let t = self.next_token.fetch_add(1, Relaxed);
            *token = Some(t);
            shard.insert(
                s + (*pat - at) as u32,
                Extent::without_data(*len as u32, F_EMPTY, t),
            );
        }
        declined
    }

    /// Verifies a hit's data CRC. Ok(false): bad clean data, dropped, read it from the
    /// backing device instead. Err: bad dirty data.
    fn verify_hit(
        &self,
        ch: &mut Channel,
        o: u64,
        at: usize,
        x: &Extent,
        buf: &[u8],
    ) -> Result<bool, IoError> {
        if !self.data_crc || !x.is(F_CRC) {
            return Ok(true);
        }
        let got = if x.crc_front() == 0 && x.crc_back() == 0 {
            format::crc(&buf[at..at + x.len as usize])
        } else {
            let n = (x.crc_front() + x.len + x.crc_back()) as usize;
            ch.scratch.resize(n, 0);
            let start = self.geo.data_off(x.seg, (x.seg_off - x.crc_front()) as u64);
            self.pmem.read(start, &mut ch.scratch);
            format::crc(&ch.scratch)
        };
        if got == x.crc {
            return Ok(true);
        }
        if x.is(F_DIRTY) {
            // The read fails: an I/O error too.
            self.counters.crc_errors_dirty.inc();
            self.counters.io_errors.inc();
            self.note_io_error(format!(
                "dirty data at backing offset {o} fails its CRC: read failed (it cannot be recovered)"
            ));
            return Err(IoError::Corrupt);
        }
        self.counters.crc_errors_clean.inc();
        self.note_io_error(format!(
            "clean data at backing offset {o} fails its CRC: dropped, read from the backing device"
        ));
        // Drop the bad extent unless a write replaced it meanwhile.
        let mut shard = self.shard(self.shard_of(o));
        let (s, e) = ((o % SUBTREE_SIZE) as u32, (o % SUBTREE_SIZE) as u32 + x.len);
        let mut same = true;
        shard.walk(
            s,
            e,
            |_| false,
            |_, y| same &= y.seg == x.seg && y.gen == x.gen && y.has_data(),
        );
        if same {
            self.hid_clean_key();
            shard.punch(s, e);
        }
        Ok(false)
    }

    /// Completes the misses of the last `read` of `[off, off + buf.len())`. With `ok`,
    /// `buf` holds the backing device's data and the ranges this read placed
    /// placeholders on are cached as clean data, unless a write replaced them since.
    pub fn fill(&self, ch: &mut Channel, off: u64, buf: &[u8], ok: bool) {
        self.seal_left(ch);
        // Moved out and back (no allocation): `ch` is also the allocation head.
        let plan = std::mem::take(&mut ch.plan);
        let no_fill = ch.no_fill;
        self.fill_plan(&plan, no_fill, ch, off, buf, ok);
        ch.plan = plan;
        ch.plan.clear();
    }

    /// As `fill`, but the cached data is allocated from `head`'s open segment, so many
    /// reads in flight on one thread (each holding its plan in its own channel) share
    /// one allocation head instead of each keeping a segment open. `head` must be used
    /// by this thread only, like any channel.
    pub fn fill_with(&self, ch: &mut Channel, head: &mut Channel, off: u64, buf: &[u8], ok: bool) {
        self.seal_left(head);
        self.fill_plan(&ch.plan, ch.no_fill, head, off, buf, ok);
        ch.plan.clear();
    }

    fn fill_plan(
        &self,
        plan: &[Piece],
        no_fill: bool,
        head: &mut Channel,
        off: u64,
        buf: &[u8],
        ok: bool,
    ) {
        // Cutoff or passthrough: nothing is cached (such a read placed no placeholders).
        let ok = ok && !no_fill;
        // A miss that may have read an unflushed direct write is cached as unsynced.
        let flag = if ok && !self.fills_allowed(off, buf.len() as u64) {
            format::KEY_UNSYNCED
        } else {
            0
        };
        for p in plan {
            let Piece::Miss {
                at,
                len,
                token: Some(t),
            } = *p
            else {
                continue;
            };
            // Admitted when planned (`plan_piece`): only admitted gaps have a token.
            let admit = ok;
            let mut done = 0usize;
            while done < len {
                let o = off + (at + done) as u64;
                let rest = (len - done) as u64;
                let a = if admit {
                    self.alloc_keyed(head, rest).ok()
                } else {
                    None
                };
                let Some(a) = a else {
                    self.drop_placeholders(o, rest, t);
                    break;
                };
                let src = &buf[at + done..at + done + a.len as usize];
                let dst = self.geo.data_off(a.seg, a.off);
                self.pmem.write(dst, src);
                self.pmem.flush_data(dst, a.len);
                self.pmem.fence();
                let id = self.slot_id(head);
                self.fill_chunk(id, o, &a, src, t, flag);
                done += a.len as usize;
            }
        }
    }

    pub(super) fn drop_placeholders(&self, o: u64, len: u64, t: u32) {
        let mut shard = self.shard(self.shard_of(o));
        let s = (o % SUBTREE_SIZE) as u32;
        shard.resolve_placeholders(s, s + len as u32, t, |_, _| None);
    }

    /// Turns the surviving placeholder fragments over `[o, o + a.len)` into clean
    /// extents pointing at the freshly written copy in `a`.
    /// The keys go to slot `id`'s kset (the channel that allocated `a`), with `flag`
    /// (0 or KEY_UNSYNCED) besides KEY_CLEAN.
    pub(super) fn fill_chunk(&self, id: u16, o: u64, a: &Alloc, src: &[u8], t: u32, flag: u32) {
        let si = self.shard_of(o);
        let mut shard = self.shard(si);
        let s = (o % SUBTREE_SIZE) as u32;
        let mut kb = self.kset_for(o, a.len, id).ok();
        let whole_crc = if self.data_crc { format::crc(src) } else { 0 };
        let mut referenced = false;
        shard.resolve_placeholders(s, s + a.len as u32, t, |fs, frag| {
            let kb = kb.as_mut()?;
            if kb.kb.count >= self.geo.kset_keys {
                self.close_kset(kb).ok()?;
            }
            let d = fs - s;
            let crc = if !self.data_crc {
                0
            } else if frag.len == a.len as u32 {
                whole_crc
            } else {
                format::crc(&src[d as usize..(d + frag.len) as usize])
            };
            if flag != 0 {
                self.segs.note_unsynced(a.seg);
            }
            let k = KeyRec {
                off: o - s as u64 + fs as u64,
                len: frag.len,
                flags: KEY_CLEAN | flag,
                seg: a.seg,
                seg_off: a.off as u32 + d,
                gen: a.gen,
                data_crc: crc,
            };
            if referenced {
                self.segs.get(a.seg);
            }
            referenced = true;
            kb.push(&k, false);
            kb.slot.add(|c| &c.fills, 1);
            Some(Extent::of_key(&k, if self.data_crc { F_CRC } else { 0 }))
        });
        drop(kb);
        drop(shard);
        if !referenced {
            self.segs.put(&self.pmem, &self.geo, a.seg);
        }
    }
}

#[cfg(test)]
mod tests {
    /// A read's channel travels inside every SPDK request context (`IoCtx`), which is
    /// written whole at each submission: a fifth cache line cost 4% of in-cache reads.
    #[test]
    fn a_channel_stays_within_four_cache_lines() {
        assert!(std::mem::size_of::<super::Channel>() <= 256);
    }

    /// A call that fills several segments seals every one it left once its keys are in
    /// (`alloc_keyed`; `write_many` at its end), so compaction can reach them; only
    /// the segment a head is still open in stays unsealed.
    #[test]
    fn long_calls_seal_every_segment_they_leave() {
        use crate::engine::{BackingIdentity, Channel, Config, Engine, FormatOptions};
        use crate::env::sim::pmem::SimPmem;
        use std::sync::Arc;
        const SEG: u32 = 64 << 10;
        let pmem = Arc::new(SimPmem::new(
            crate::engine::format::SEGMENTS_OFF + 128 * SEG as u64,
        ));
        let id = BackingIdentity {
            size: 8 << 20,
            block_size: 512,
            id: "disk-a".into(),
        };
        let mut fo = FormatOptions::new(id, 1);
        fo.seg_size = SEG;
        let e = Engine::format(pmem, &fo, &Config::default()).unwrap();
        let unsealed = |e: &Engine<Arc<SimPmem>>| {
            let mut uses = Vec::new();
            e.segs.uses_into(&mut uses);
            (0..e.geo.n_segs)
                .filter(|&s| uses[s as usize] == super::super::segs::Use::Data)
                .filter(|&s| !e.segs.is_sealed(s))
                .count()
        };
        let mut ch = Channel::default();
        // One write over four segments' worth, then 32 segments' worth of 64 KiB writes
        // in one batch.
        e.write(&mut ch, 0, &vec![7u8; 4 * SEG as usize], false)
            .unwrap();
        assert_eq!(unsealed(&e), 1, "only the open head's segment");
        let data = vec![9u8; 2 << 20];
        let mut out = Vec::new();
        e.write_many(
            &mut ch,
            32,
            |i| ((i as u64) << 16, &data[i << 16..(i + 1) << 16]),
            &mut out,
        );
        assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
        assert_eq!(unsealed(&e), 1, "only the open head's segment");
        e.release_channel(&mut ch);
    }
}
