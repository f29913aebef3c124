//! One extent of the in-DRAM index: where a run of backing bytes lives in pmem, its
//! flags (dirty, zeros, placeholder, read-hit count, hole) and the write epoch of its
//! key, packed into 28 bytes so an index entry with its start takes 32 (two per cache
//! line). Trimming an extent keeps the bytes cut off each end, so a data CRC over the
//! whole original extent can still be verified.

use super::format::KeyRec;

/// The extent holds dirty data (not yet on the backing device).
pub const F_DIRTY: u8 = 1;
/// A placeholder for a read miss in flight; `gen` holds the miss token.
pub const F_EMPTY: u8 = 2;
/// The extent reads as zeros and has no pmem data (write-zeroes or discard).
pub const F_ZERO: u8 = 4;
/// `crc` is meaningful.
pub const F_CRC: u8 = 8;
/// Read since it was cached or last moved by GC (an overwrite keeps the count: a block
/// read often and rewritten now and then stays hot): GC keeps such clean data by moving
/// it to the log head instead of dropping it (a second chance, as SIEVE/CLOCK give).
pub const F_REF: u8 = 16;
/// Read again after `F_REF` was set: a piece GC moves keeps `F_REF`, so it survives one
/// more round unread (`gc::refs_kept`: a two-level count, as S3-FIFO's main queue keeps).
pub const F_REF2: u8 = 64;
/// A slot that maps nothing: the range reads as a gap. GC leaves one where it drops an
/// extent, so the next write of that range replaces it in place instead of the drop and
/// the write each shifting the rest of the shard's vector (up to 32 KiB apiece, 8% of
/// an in-cache random-write run). Holes only take room the vector already has: an
/// insert that finds it full drops them all first when they are an eighth of it or more
/// (`Shard::make_room`), so holes never grow the index. `iter` and walks skip them.
pub const F_HOLE: u8 = 32;

const FRONT_BITS: u32 = 22;
const FRONT_MASK: u32 = (1 << FRONT_BITS) - 1;
/// Bits of the write epoch an extent keeps: writeback compares epochs only within a
/// window of `1 << EPOCH_BITS` epochs, where these bits identify one exactly.
pub const EPOCH_BITS: u32 = 32 - FRONT_BITS;
const EPOCH_MASK: u32 = (1 << EPOCH_BITS) - 1;

/// One extent in DRAM: 28 bytes, 32 with its start (two entries per cache line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    pub seg: u32,
    pub seg_off: u32,
    /// Low 32 bits of the segment generation, or the miss token of a placeholder.
    pub gen: u32,
    pub crc: u32,
    /// Bytes trimmed off the front of the original extent since it was written (low 22
    /// bits: an extent is at most 4 MiB) and the low `EPOCH_BITS` bits of the epoch its
    /// key was written in (see `Engine::epoch`).
    front_epoch: u32,
    /// Bytes trimmed off the back (high 24 bits: an extent is at most 4 MiB) and the
    /// `F_*` flags (low 8 bits), packed to keep an entry at 32 bytes.
    back_flags: u32,
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
            front_epoch: 0,
            back_flags: flags as u32,
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
            front_epoch: 0,
            back_flags: flags as u32,
        }
    }

    pub fn is(&self, f: u8) -> bool {
        self.back_flags & f as u32 != 0
    }
    /// This extent with flags `f` set as well.
    pub fn with_flags(mut self, f: u8) -> Extent {
        self.back_flags |= f as u32;
        self
    }
    /// Clears flags `f`.
    pub fn clear(&mut self, f: u8) {
        self.back_flags &= !(f as u32);
    }
    /// All its `F_*` flags.
    pub fn flags(&self) -> u8 {
        self.back_flags as u8
    }
    pub fn has_data(&self) -> bool {
        !self.is(F_EMPTY | F_ZERO | F_HOLE)
    }
    /// Bytes trimmed off the back of the original extent since it was written.
    pub fn crc_back(&self) -> u32 {
        self.back_flags >> 8
    }
    /// Bytes trimmed off the front of the original extent since it was written.
    pub fn crc_front(&self) -> u32 {
        self.front_epoch & FRONT_MASK
    }
    /// The low `EPOCH_BITS` bits of the epoch the key was written in.
    pub fn epoch_bits(&self) -> u32 {
        self.front_epoch >> FRONT_BITS
    }
    pub fn set_epoch(&mut self, epoch: u64) {
        self.front_epoch = self.crc_front() | ((epoch as u32 & EPOCH_MASK) << FRONT_BITS);
    }
    pub(super) fn cut_front(&mut self, d: u32) {
        self.len -= d;
        if self.has_data() {
            self.seg_off += d;
            self.front_epoch += d;
        }
    }
    pub(super) fn cut_back(&mut self, d: u32) {
        self.len -= d;
        self.back_flags += d << 8;
    }
}
