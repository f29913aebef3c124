//! The log's records: keys (one cached extent each) and the kset that carries them
//! (header, seal and the checks replay applies). Part of `format`: the same byte-level
//! rules hold (little-endian, CRC32C seals, every field validated on decode).

use super::*;

/// One cached extent as stored in a kset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeyRec {
    /// Byte offset on the backing device.
    pub off: u64,
    pub len: u32,
    pub flags: u32,
    /// Cache segment and offset in its data area (unused for ZERO keys).
    pub seg: u32,
    pub seg_off: u32,
    /// Segment generation when the space was allocated.
    pub gen: u64,
    /// CRC32C of the data (when the cache has data_crc).
    pub data_crc: u32,
}

impl KeyRec {
    pub fn has_data(&self) -> bool {
        self.flags & KEY_ZERO == 0
    }
    pub fn encode(&self, b: &mut [u8]) {
        put_u64(b, 0, self.off);
        put_u32(b, 8, self.len);
        put_u32(b, 12, self.flags);
        put_u32(b, 16, self.seg);
        put_u32(b, 20, self.seg_off);
        put_u64(b, 24, self.gen);
        put_u32(b, 32, self.data_crc);
        put_u32(b, 36, 0);
    }
    /// Decodes a key and validates it against the geometry and the backing size.
    pub fn decode(b: &[u8], geo: &Geometry) -> Result<Self, MediaError> {
        const W: &str = "key";
        let k = KeyRec {
            off: get_u64(b, 0),
            len: get_u32(b, 8),
            flags: get_u32(b, 12),
            seg: get_u32(b, 16),
            seg_off: get_u32(b, 20),
            gen: get_u64(b, 24),
            data_crc: get_u32(b, 32),
        };
        let bad = |field, value| {
            Err(MediaError::Field {
                what: W,
                field,
                value,
            })
        };
        if k.len == 0 || k.len as u64 > SUBTREE_SIZE {
            return bad("len", k.len as u64);
        }
        // Every block size is a multiple of 512, so every key the engine writes is too
        // (the index counts cached bytes in 512-byte units).
        if k.len % 512 != 0 {
            return bad("len (not a multiple of 512)", k.len as u64);
        }
        if k.off % 512 != 0 {
            return bad("off (not a multiple of 512)", k.off);
        }
        if k.off
            .checked_add(k.len as u64)
            .is_none_or(|e| e > geo.backing_size)
        {
            return bad("off", k.off);
        }
        if (k.off >> SUBTREE_SHIFT) != ((k.off + k.len as u64 - 1) >> SUBTREE_SHIFT) {
            return bad("off (crosses a 4 MiB subtree)", k.off);
        }
        if k.flags & !KEY_FLAGS_KNOWN != 0 {
            return bad("flags", k.flags as u64);
        }
        let tomb = KEY_INVALID | KEY_CLEAN | KEY_ZERO;
        if k.flags & KEY_INVALID != 0 && k.flags & tomb != tomb {
            return bad(
                "flags (a tombstone is clean and has no data)",
                k.flags as u64,
            );
        }
        if k.flags & KEY_UNSYNCED != 0 && (k.flags & KEY_CLEAN == 0 || !k.has_data()) {
            return bad(
                "flags (an unsynced key is clean and has data)",
                k.flags as u64,
            );
        }
        if k.has_data() {
            if k.seg >= geo.n_segs {
                return bad("segment", k.seg as u64);
            }
            if k.seg_off as u64 + k.len as u64 > geo.seg_data_size {
                return bad("segment offset", k.seg_off as u64);
            }
        }
        Ok(k)
    }
}

/// A decoded kset header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KsetHdr {
    pub seq: u64,
    pub flags: u32,
    /// Key count, or for a LAST kset the next log segment.
    pub count: u32,
}

impl KsetHdr {
    pub fn is_last(&self) -> bool {
        self.flags & KSET_LAST != 0
    }
    /// On-media size of the kset.
    pub fn size(&self) -> usize {
        if self.is_last() {
            KSET_HDR
        } else {
            KSET_HDR + KEY_SIZE * self.count as usize
        }
    }
}

/// Writes a kset header into `b[..KSET_HDR]` and seals the whole kset `b` (header and
/// keys) with its CRC.
pub fn seal_kset(b: &mut [u8], format_id: u64, hdr: KsetHdr) {
    put_u32(b, 4, KSET_MAGIC);
    put_u64(b, 8, hdr.seq);
    put_u32(b, 16, hdr.flags);
    put_u32(b, 20, hdr.count);
    put_u64(b, 24, format_id);
    let c = crc(&b[4..]);
    put_u32(b, 0, c);
}

/// Outcome of looking at a log position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KsetCheck {
    /// A valid kset with the expected sequence number.
    Valid(KsetHdr),
    /// Not a live kset: the end of the log (terminator, torn write, stale lap).
    End,
}

/// Reads the header at `b` (which must hold `min(remaining, max kset size)` bytes of
/// the log from the position) and validates magic, format id, sequence, size and CRC.
/// `remaining` is the number of data-area bytes left in the segment at that position.
pub fn check_kset(b: &[u8], geo: &Geometry, expect_seq: u64) -> Result<KsetCheck, MediaError> {
    const W: &str = "kset";
    if b.len() < KSET_HDR
        || get_u32(b, 4) != KSET_MAGIC
        || get_u64(b, 24) != geo.format_id
        || get_u64(b, 8) != expect_seq
    {
        return Ok(KsetCheck::End);
    }
    let hdr = KsetHdr {
        seq: expect_seq,
        flags: get_u32(b, 16),
        count: get_u32(b, 20),
    };
    if hdr.flags & !KSET_LAST != 0 {
        return Ok(KsetCheck::End);
    }
    if !hdr.is_last() && (hdr.count == 0 || hdr.count > geo.kset_keys) {
        return Ok(KsetCheck::End);
    }
    let size = hdr.size();
    if size > b.len() {
        return Ok(KsetCheck::End);
    }
    if get_u32(b, 0) != crc(&b[4..size]) {
        return Ok(KsetCheck::End);
    }
    // From here on the kset is authentic (magic, format id, sequence and CRC all
    // match), so a bad field is corruption or a bug, not the end of the log.
    if hdr.is_last() && hdr.count >= geo.n_segs {
        return Err(MediaError::Field {
            what: W,
            field: "next segment",
            value: hdr.count as u64,
        });
    }
    Ok(KsetCheck::Valid(hdr))
}
