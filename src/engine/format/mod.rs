//! The on-media format: byte layout, encoding and validation of every persistent object.
//!
//! Everything is explicit little-endian and CRC32C-protected. Small metadata objects
//! (superblock, cache_info, the two tails, per-segment generations) are stored as two
//! replicas with a 64-bit sequence number; an update always writes the slot that does
//! *not* hold the newest valid copy, so a torn update leaves the previous copy intact.
//! The kset log lives in ordinary segments: each kset carries the format id and a
//! 64-bit sequence number that must follow its predecessor's, so a stale kset left over
//! from an earlier lap of the log (or an earlier format of the medium) is never taken
//! for a live one. Decoders never trust a field: every id, offset, length and count is
//! checked against the geometry before it is used.
//!
//! Compatibility within version 1: fields added later read as their old meaning when
//! zero (cache_info's policy bytes: write-back; the flush record's replicas: never
//! written, which is right for media from before it, as they hold no KEY_UNSYNCED key).
//! A build from before KEY_UNSYNCED refuses a medium holding one (an unknown key flag is
//! corruption to it) rather than replaying it without the flush record's rule.

use super::modes::SEQ_CUTOFF_MAX_KIB;
pub use super::modes::{CacheMode, Policy, Promotion, SeqPolicy};
use thiserror::Error;

mod kset;
pub use kset::*;

/// Version of the on-media format written by this build.
pub const FORMAT_VERSION: u16 = 1;
/// Superblock magic: "PCACHE" + format family, little-endian u64.
pub const SB_MAGIC: u64 = u64::from_le_bytes(*b"PCACHEv1");
/// Magic of a kset header ("KSET").
pub const KSET_MAGIC: u32 = u32::from_le_bytes(*b"KSET");

/// Size of one replica slot of the fixed metadata objects.
pub const SLOT: u64 = 4096;
/// Superblock replicas.
pub const SB_OFF: [u64; 2] = [0, SLOT];
/// cache_info replicas.
pub const INFO_OFF: [u64; 2] = [2 * SLOT, 3 * SLOT];
/// key_tail replicas (each on its own cache line).
pub const KEY_TAIL_OFF: [u64; 2] = [4 * SLOT, 4 * SLOT + 64];
/// dirty_tail replicas.
pub const DIRTY_TAIL_OFF: [u64; 2] = [4 * SLOT + 128, 4 * SLOT + 192];
/// Flush record replicas ([`FlushRec`]; all-zero on media from before it existed).
pub const FLUSH_REC_OFF: [u64; 2] = [4 * SLOT + 256, 4 * SLOT + 320];
/// First segment; the area before it is reserved for metadata.
pub const SEGMENTS_OFF: u64 = 16 * SLOT;
/// Per-segment header (generation replicas) before the segment's data area.
pub const SEG_HDR: u64 = SLOT;
/// Offsets of the two generation replicas inside a segment header.
pub const GEN_OFF: [u64; 2] = [0, 64];

pub const SB_SIZE: usize = 256;
pub const INFO_SIZE: usize = 64;
pub const TAIL_SIZE: usize = 32;
pub const GEN_SIZE: usize = 32;
pub const FLUSH_REC_SIZE: usize = 64;
/// Kset header and key sizes.
pub const KSET_HDR: usize = 32;
pub const KEY_SIZE: usize = 40;
/// Upper bound for keys per kset (a format parameter below this).
pub const KSET_KEYS_MAX: u32 = 128;
pub const KSET_SIZE_MAX: usize = KSET_HDR + KEY_SIZE * KSET_KEYS_MAX as usize;
/// Longest backing identity string stored in the superblock.
pub const BACKING_ID_MAX: usize = 128;
/// Bound on every persisted sequence number and generation: a value read from the
/// medium at or above it is corruption. Counting up from it could never wrap in
/// practice (2^62 updates), so the engine's `+ 1`s need no overflow handling.
pub const SEQ_LIMIT: u64 = 1 << 62;

/// The part of a backing identity the superblock keeps: at most 128 bytes, cut at a
/// character boundary. Identities are always compared in this form.
pub fn clip_id(id: &str) -> &str {
    let mut n = id.len().min(BACKING_ID_MAX);
    while !id.is_char_boundary(n) {
        n -= 1;
    }
    &id[..n]
}

const KIND_SB: u16 = 1;
const KIND_INFO: u16 = 2;
pub const KIND_KEY_TAIL: u16 = 3;
pub const KIND_DIRTY_TAIL: u16 = 4;
const KIND_GEN: u16 = 5;
const KIND_FLUSH_REC: u16 = 6;

/// cache_info flags.
pub const INFO_DATA_CRC: u32 = 1;
pub const INFO_INIT_DONE: u32 = 2;

/// Kset flags.
pub const KSET_LAST: u32 = 1;

/// Key flags.
pub const KEY_CLEAN: u32 = 1 << 1;
pub const KEY_ZERO: u32 = 1 << 2;
pub const KEY_DISCARD: u32 = 1 << 3;
/// A tombstone: the range is no longer cached (a write went to the backing device
/// around the cache). Always with KEY_CLEAN | KEY_ZERO: it has no data and nothing to
/// write back; replay drops older extents of the range.
pub const KEY_INVALID: u32 = 1 << 4;
/// Clean data whose backing copy may not be durable yet: a write-through (its backing
/// write completes without a backing FLUSH), or a miss that may have read a direct
/// write the backing device had not flushed. Always with KEY_CLEAN and data. Replay
/// keeps such a key only when its kset is covered by a completed backing FLUSH (the
/// [`FlushRec`]), so after a power loss no block reads newer data from pmem and later
/// (after eviction) older data from the backing device. A build from before this flag
/// refuses such a key (unknown flag) instead of replaying it unchecked.
pub const KEY_UNSYNCED: u32 = 1 << 5;
const KEY_FLAGS_KNOWN: u32 = KEY_CLEAN | KEY_ZERO | KEY_DISCARD | KEY_INVALID | KEY_UNSYNCED;

/// Seed of every CRC (dm-pcache's seed, kept for familiarity).
const CRC_SEED: u32 = 0x3B15A;

/// Why an on-media object was rejected.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MediaError {
    #[error("{0}: bad checksum")]
    Crc(&'static str),
    #[error("{0}: unsupported format version {1} (this build reads version {FORMAT_VERSION})")]
    Version(&'static str, u16),
    #[error("{what}: invalid field {field} = {value}")]
    Field {
        what: &'static str,
        field: &'static str,
        value: u64,
    },
}

pub fn crc(data: &[u8]) -> u32 {
    crc32c::crc32c_append(CRC_SEED, data)
}

// Little-endian field access at byte offset `o` (public for the property tests and
// fuzzers that craft media; they panic if `b` is too short).
pub fn get_u16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub fn get_u32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
pub fn get_u64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}
pub fn put_u16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// Seals a metadata object: header fields, then the CRC over bytes 4.. .
fn seal(b: &mut [u8], kind: u16, seq: u64) {
    put_u16(b, 4, kind);
    put_u16(b, 6, FORMAT_VERSION);
    put_u64(b, 8, seq);
    let c = crc(&b[4..]);
    put_u32(b, 0, c);
}

/// Checks a metadata object's CRC, kind and version; returns its sequence number.
fn unseal(b: &[u8], kind: u16, what: &'static str) -> Result<u64, MediaError> {
    if get_u32(b, 0) != crc(&b[4..]) || get_u16(b, 4) != kind {
        return Err(MediaError::Crc(what));
    }
    let v = get_u16(b, 6);
    if v != FORMAT_VERSION {
        return Err(MediaError::Version(what, v));
    }
    let seq = get_u64(b, 8);
    if seq >= SEQ_LIMIT {
        return Err(MediaError::Field {
            what,
            field: "sequence",
            value: seq,
        });
    }
    Ok(seq)
}

/// Picks the newest valid replica. Returns (slot, seq, value) or the first slot's error
/// when neither is valid (a version error wins over a CRC error: it is the more useful
/// message).
pub fn pick_replica<T>(
    slots: [Result<(u64, T), MediaError>; 2],
) -> Result<(usize, u64, T), MediaError> {
    let [a, b] = slots;
    match (a, b) {
        (Ok((sa, va)), Ok((sb, vb))) => {
            if sb > sa {
                Ok((1, sb, vb))
            } else {
                Ok((0, sa, va))
            }
        }
        (Ok((s, v)), Err(_)) => Ok((0, s, v)),
        (Err(_), Ok((s, v))) => Ok((1, s, v)),
        (Err(ea), Err(eb)) => Err(if matches!(eb, MediaError::Version(..)) {
            eb
        } else {
            ea
        }),
    }
}

/// The identity of the backing device a cache was formatted for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BackingIdentity {
    /// Size in bytes.
    pub size: u64,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// A stable name: a UUID, a serial number or a path (at most 128 bytes).
    pub id: String,
}

/// The superblock: geometry and identity, written once at format time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub pmem_size: u64,
    pub seg_size: u32,
    pub n_segs: u32,
    pub kset_keys: u32,
    /// Random id of this format; every kset carries it.
    pub format_id: u64,
    pub backing: BackingIdentity,
}

impl Superblock {
    pub fn encode(&self, seq: u64) -> [u8; SB_SIZE] {
        let mut b = [0u8; SB_SIZE];
        put_u64(&mut b, 16, SB_MAGIC);
        put_u64(&mut b, 24, self.pmem_size);
        put_u32(&mut b, 32, self.seg_size);
        put_u32(&mut b, 36, self.n_segs);
        put_u32(&mut b, 40, self.kset_keys);
        put_u32(&mut b, 44, self.backing.block_size);
        put_u64(&mut b, 48, self.backing.size);
        put_u64(&mut b, 56, self.format_id);
        let id = clip_id(&self.backing.id).as_bytes();
        let n = id.len();
        put_u32(&mut b, 64, n as u32);
        b[72..72 + n].copy_from_slice(&id[..n]);
        seal(&mut b, KIND_SB, seq);
        b
    }

    /// Decodes and validates a superblock replica against the medium's size.
    pub fn decode(b: &[u8], medium_size: u64) -> Result<(u64, Self), MediaError> {
        const W: &str = "superblock";
        if b.len() < SB_SIZE {
            return Err(MediaError::Crc(W));
        }
        let b = &b[..SB_SIZE];
        if get_u64(b, 16) != SB_MAGIC {
            return Err(MediaError::Crc(W));
        }
        let seq = unseal(b, KIND_SB, W)?;
        let field = |field, value| MediaError::Field {
            what: W,
            field,
            value,
        };
        let pmem_size = get_u64(b, 24);
        let seg_size = get_u32(b, 32);
        let n_segs = get_u32(b, 36);
        let kset_keys = get_u32(b, 40);
        let id_len = get_u32(b, 64) as usize;
        if pmem_size > medium_size {
            return Err(field("pmem_size (larger than the medium)", pmem_size));
        }
        check_seg_size(seg_size).map_err(|_| field("seg_size", seg_size as u64))?;
        if n_segs == 0 || SEGMENTS_OFF + n_segs as u64 * seg_size as u64 > pmem_size {
            return Err(field("n_segs", n_segs as u64));
        }
        if kset_keys == 0 || kset_keys > KSET_KEYS_MAX {
            return Err(field("kset_keys", kset_keys as u64));
        }
        if id_len > BACKING_ID_MAX {
            return Err(field("backing id length", id_len as u64));
        }
        let id = String::from_utf8_lossy(&b[72..72 + id_len]).into_owned();
        Ok((
            seq,
            Superblock {
                pmem_size,
                seg_size,
                n_segs,
                kset_keys,
                format_id: get_u64(b, 56),
                backing: BackingIdentity {
                    size: get_u64(b, 48),
                    block_size: get_u32(b, 44),
                    id,
                },
            },
        ))
    }

    /// Bytes of the data area of one segment.
    pub fn seg_data_size(&self) -> u64 {
        self.seg_size as u64 - SEG_HDR
    }
}

/// Smallest and largest segment size `auto_seg_size` picks.
pub const SEG_SIZE_AUTO_MIN: u32 = 1 << 20;
pub const SEG_SIZE_AUTO_MAX: u32 = 16 << 20;
/// Segments `auto_seg_size` aims for (before the header's share).
pub const SEGS_AUTO: u64 = 128;

/// The segment size for a medium of `pmem_size` bytes when none is given: the largest
/// power of two from 1 to 16 MiB that divides it into at least 128 (16 MiB from 2 GiB
/// up, as dm-pcache; 2 MiB for 256 MiB, whose header leaves 127 segments). Space is
/// reclaimed a whole segment at a time, so with a few large segments the GC watermark is
/// coarse and a cache that fills waits for a whole segment's writeback (the overload
/// benchmark: 16 MiB segments on a 256 MiB medium held writers up to 50-70 ms; 2 MiB
/// ones, under 15 ms).
pub fn auto_seg_size(pmem_size: u64) -> u32 {
    let mut s = SEG_SIZE_AUTO_MAX;
    while s > SEG_SIZE_AUTO_MIN && pmem_size / (s as u64) < SEGS_AUTO {
        s /= 2;
    }
    s
}

/// Validates a segment size: a multiple of 4 KiB, room for the largest kset plus its
/// LAST link and terminator, at most 1 GiB.
pub fn check_seg_size(seg_size: u32) -> Result<(), String> {
    let s = seg_size as u64;
    if s % 4096 != 0 || !(SEG_HDR + 4096..=(1 << 30)).contains(&s) {
        return Err(format!(
            "segment size {s} must be a multiple of 4096 between 8 KiB and 1 GiB"
        ));
    }
    if s - SEG_HDR < (KSET_SIZE_MAX + 2 * KSET_HDR) as u64 {
        return Err(format!("segment size {s} cannot hold a full kset"));
    }
    Ok(())
}

/// cache_info: the run-time settings that persist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheInfo {
    pub gc_percent: u32,
    pub flags: u32,
    /// Cache mode, sequential cutoff, write bypass and promotion (bytes 24..36, zero on
    /// media written before they existed, which reads as write-back with the cutoff and
    /// the bypass off, promoting every miss).
    pub policy: Policy,
}

impl CacheInfo {
    pub fn encode(&self, seq: u64) -> [u8; INFO_SIZE] {
        let mut b = [0u8; INFO_SIZE];
        put_u32(&mut b, 16, self.gc_percent);
        put_u32(&mut b, 20, self.flags);
        b[24] = self.policy.mode.code();
        b[25] = self.policy.seq_policy.code();
        b[26] = self.policy.promotion.code();
        put_u32(&mut b, 28, self.policy.seq_cutoff_kib);
        put_u32(&mut b, 32, self.policy.write_bypass_kib);
        seal(&mut b, KIND_INFO, seq);
        b
    }
    pub fn decode(b: &[u8]) -> Result<(u64, Self), MediaError> {
        const W: &str = "cache_info";
        let seq = unseal(&b[..INFO_SIZE], KIND_INFO, W)?;
        let gc_percent = get_u32(b, 16);
        if gc_percent > GC_PERCENT_MAX {
            return Err(MediaError::Field {
                what: W,
                field: "gc_percent",
                value: gc_percent as u64,
            });
        }
        let field = |field, value| MediaError::Field {
            what: W,
            field,
            value,
        };
        let mode = CacheMode::from_code(b[24]).ok_or(field("cache_mode", b[24] as u64))?;
        let seq_policy =
            SeqPolicy::from_code(b[25]).ok_or(field("seq_cutoff_policy", b[25] as u64))?;
        let promotion = Promotion::from_code(b[26]).ok_or(field("promotion", b[26] as u64))?;
        let seq_cutoff_kib = get_u32(b, 28);
        if seq_cutoff_kib > SEQ_CUTOFF_MAX_KIB {
            return Err(field("seq_cutoff_kib", seq_cutoff_kib as u64));
        }
        let write_bypass_kib = get_u32(b, 32);
        if write_bypass_kib > super::modes::WRITE_BYPASS_MAX_KIB {
            return Err(field("write_bypass_kib", write_bypass_kib as u64));
        }
        Ok((
            seq,
            CacheInfo {
                gc_percent,
                flags: get_u32(b, 20),
                policy: Policy {
                    mode,
                    seq_cutoff_kib,
                    seq_policy,
                    write_bypass_kib,
                    promotion,
                },
            },
        ))
    }
}

/// A position in the kset log: segment, offset in its data area, and the sequence
/// number the kset at that position must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub struct LogPos {
    pub seq: u64,
    pub seg: u32,
    pub off: u32,
}

impl LogPos {
    /// The position of the kset that follows the valid kset `hdr` found here: the next
    /// segment's start after a LAST link, the next byte after a normal kset.
    pub fn after(&self, hdr: &KsetHdr) -> LogPos {
        if hdr.is_last() {
            LogPos {
                seq: self.seq + 1,
                seg: hdr.count,
                off: 0,
            }
        } else {
            LogPos {
                seq: self.seq + 1,
                seg: self.seg,
                off: self.off + hdr.size() as u32,
            }
        }
    }

    pub fn encode(&self, kind: u16, seq: u64) -> [u8; TAIL_SIZE] {
        let mut b = [0u8; TAIL_SIZE];
        put_u32(&mut b, 16, self.seg);
        put_u32(&mut b, 20, self.off);
        put_u64(&mut b, 24, self.seq);
        seal(&mut b, kind, seq);
        b
    }
    /// Decodes a tail and checks it lies inside the geometry.
    pub fn decode(
        b: &[u8],
        kind: u16,
        n_segs: u32,
        data_size: u64,
    ) -> Result<(u64, Self), MediaError> {
        let what = if kind == KIND_KEY_TAIL {
            "key_tail"
        } else {
            "dirty_tail"
        };
        let seq = unseal(&b[..TAIL_SIZE], kind, what)?;
        let p = LogPos {
            seg: get_u32(b, 16),
            off: get_u32(b, 20),
            seq: get_u64(b, 24),
        };
        if p.seq == 0 || p.seq >= SEQ_LIMIT {
            return Err(MediaError::Field {
                what,
                field: "kset sequence",
                value: p.seq,
            });
        }
        if p.seg >= n_segs {
            return Err(MediaError::Field {
                what,
                field: "segment",
                value: p.seg as u64,
            });
        }
        if p.off as u64 + KSET_HDR as u64 > data_size {
            return Err(MediaError::Field {
                what,
                field: "offset",
                value: p.off as u64,
            });
        }
        Ok((seq, p))
    }
}

/// Segment generation record.
pub fn encode_gen(seg: u32, gen: u64, seq: u64) -> [u8; GEN_SIZE] {
    let mut b = [0u8; GEN_SIZE];
    put_u32(&mut b, 16, seg);
    put_u64(&mut b, 24, gen);
    seal(&mut b, KIND_GEN, seq);
    b
}

pub fn decode_gen(b: &[u8], seg: u32) -> Result<(u64, u64), MediaError> {
    const W: &str = "segment generation";
    let seq = unseal(&b[..GEN_SIZE], KIND_GEN, W)?;
    let s = get_u32(b, 16);
    if s != seg {
        return Err(MediaError::Field {
            what: W,
            field: "segment id",
            value: s as u64,
        });
    }
    let gen = get_u64(b, 24);
    if gen >= SEQ_LIMIT {
        return Err(MediaError::Field {
            what: W,
            field: "generation",
            value: gen,
        });
    }
    Ok((seq, gen))
}

/// The flush record: which ksets' KEY_UNSYNCED keys a completed backing FLUSH covers.
///
/// `through`: every kset up to this sequence number was closed before a backing FLUSH
/// was issued, and that FLUSH completed; so the backing writes (and reads) behind their
/// unsynced keys are durable on the backing device. `drop_lo..=drop_hi` (empty when
/// `drop_hi` is 0): ksets whose unsynced keys an earlier replay dropped because they
/// were past `through` then; they stay dropped even once `through` passes them (their
/// backing writes may have been lost with that crash). Replay keeps an unsynced key of
/// kset `s` only if `s <= through` and `s` is outside the drop range.
///
/// Both replicas all-zero (media from before the record, or no FLUSH recorded yet)
/// reads as `through` 0 with no drop range: every unsynced key is dropped, and media
/// from before the record hold none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlushRec {
    pub through: u64,
    pub drop_lo: u64,
    pub drop_hi: u64,
}

impl FlushRec {
    /// Whether replay keeps the unsynced keys of kset `seq`.
    pub fn covers(&self, seq: u64) -> bool {
        seq <= self.through && !(self.drop_lo <= seq && seq <= self.drop_hi)
    }

    pub fn encode(&self, seq: u64) -> [u8; FLUSH_REC_SIZE] {
        let mut b = [0u8; FLUSH_REC_SIZE];
        put_u64(&mut b, 16, self.through);
        put_u64(&mut b, 24, self.drop_lo);
        put_u64(&mut b, 32, self.drop_hi);
        seal(&mut b, KIND_FLUSH_REC, seq);
        b
    }

    /// Decodes one replica. An all-zero replica is a valid record of sequence 0 (never
    /// written); anything else must be sealed and in bounds.
    pub fn decode(b: &[u8]) -> Result<(u64, Self), MediaError> {
        const W: &str = "flush record";
        let b = &b[..FLUSH_REC_SIZE];
        if b.iter().all(|&x| x == 0) {
            return Ok((0, FlushRec::default()));
        }
        let seq = unseal(b, KIND_FLUSH_REC, W)?;
        let r = FlushRec {
            through: get_u64(b, 16),
            drop_lo: get_u64(b, 24),
            drop_hi: get_u64(b, 32),
        };
        let field = |field, value| MediaError::Field {
            what: W,
            field,
            value,
        };
        if r.through >= SEQ_LIMIT {
            return Err(field("through", r.through));
        }
        if r.drop_hi >= SEQ_LIMIT {
            return Err(field("drop_hi", r.drop_hi));
        }
        if r.drop_hi == 0 && r.drop_lo != 0 || r.drop_lo > r.drop_hi {
            return Err(field("drop_lo", r.drop_lo));
        }
        Ok((seq, r))
    }
}

/// The index shard ("subtree") size: requests and keys never cross a 4 MiB boundary.
pub const SUBTREE_SHIFT: u32 = 22;
pub const SUBTREE_SIZE: u64 = 1 << SUBTREE_SHIFT;

/// Largest GC watermark (`CacheInfo::gc_percent`). Higher than dm-pcache's 90: reclaim
/// runs just ahead of need and keeps read-hot data by moving it, so a cache under
/// pressure holds data in 90% and more of its medium instead of keeping a third free.
pub const GC_PERCENT_MAX: u32 = 95;

/// Geometry derived from the superblock, used by every validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub n_segs: u32,
    pub seg_size: u64,
    pub seg_data_size: u64,
    pub kset_keys: u32,
    pub backing_size: u64,
    pub format_id: u64,
}

impl Geometry {
    pub fn from_sb(sb: &Superblock) -> Self {
        Geometry {
            n_segs: sb.n_segs,
            seg_size: sb.seg_size as u64,
            seg_data_size: sb.seg_data_size(),
            kset_keys: sb.kset_keys,
            backing_size: sb.backing.size,
            format_id: sb.format_id,
        }
    }
    /// Medium offset of a segment's header.
    pub fn seg_base(&self, seg: u32) -> u64 {
        SEGMENTS_OFF + seg as u64 * self.seg_size
    }
    /// Medium offset of byte `off` of a segment's data area.
    pub fn data_off(&self, seg: u32, off: u64) -> u64 {
        self.seg_base(seg) + SEG_HDR + off
    }
    /// The segment and data-area offset of medium offset `pmem_off` (which lies in a
    /// segment's data area): the inverse of `data_off`.
    pub fn locate(&self, pmem_off: u64) -> (u32, u32) {
        let rel = pmem_off - SEGMENTS_OFF;
        (
            (rel / self.seg_size) as u32,
            (rel % self.seg_size - SEG_HDR) as u32,
        )
    }
    pub fn kset_max_size(&self) -> usize {
        KSET_HDR + KEY_SIZE * self.kset_keys as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry {
            n_segs: 8,
            seg_size: 64 << 10,
            seg_data_size: (64 << 10) - SEG_HDR,
            kset_keys: 16,
            backing_size: 1 << 30,
            format_id: 42,
        }
    }

    #[test]
    fn replica_prefers_newest_valid() {
        let a = CacheInfo {
            gc_percent: 10,
            flags: 0,
            ..Default::default()
        }
        .encode(5);
        let mut b = CacheInfo {
            gc_percent: 20,
            flags: 0,
            ..Default::default()
        }
        .encode(6);
        let r = pick_replica([CacheInfo::decode(&a), CacheInfo::decode(&b)]).unwrap();
        assert_eq!((r.0, r.2.gc_percent), (1, 20));
        b[20] ^= 1;
        let r = pick_replica([CacheInfo::decode(&a), CacheInfo::decode(&b)]).unwrap();
        assert_eq!((r.0, r.2.gc_percent), (0, 10));
    }

    #[test]
    fn kset_stale_sequence_is_end_of_log() {
        let g = geo();
        let mut b = vec![0u8; KSET_HDR + KEY_SIZE];
        KeyRec {
            off: 0,
            len: 512,
            seg: 1,
            ..Default::default()
        }
        .encode(&mut b[KSET_HDR..]);
        seal_kset(
            &mut b,
            g.format_id,
            KsetHdr {
                seq: 7,
                flags: 0,
                count: 1,
            },
        );
        assert!(matches!(check_kset(&b, &g, 7), Ok(KsetCheck::Valid(_))));
        assert_eq!(check_kset(&b, &g, 8), Ok(KsetCheck::End));
        b[40] ^= 1;
        assert_eq!(check_kset(&b, &g, 7), Ok(KsetCheck::End));
    }
}
