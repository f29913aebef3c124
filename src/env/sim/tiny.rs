//! A tiny cache geometry for the property tests and fuzzers that build, damage and
//! replay whole media: 12 segments of 24 KiB with 8 keys per kset in front of a
//! 512 KiB device of 512-byte blocks. A medium is 300 KiB, and a few hundred small
//! writes make a log that spans several segments.

use crate::engine::format::{Geometry, SEGMENTS_OFF, SEG_HDR};
use crate::engine::{BackingIdentity, Config};

pub const SEG: u32 = 24 << 10;
pub const NSEG: u32 = 12;
pub const KEYS: u32 = 8;
pub const BACKING: u64 = 512 << 10;
pub const BS: u64 = 512;
/// Bytes of the medium.
pub const PMEM: u64 = SEGMENTS_OFF + NSEG as u64 * SEG as u64;
/// Data bytes of a segment.
pub const DATA: u64 = SEG as u64 - SEG_HDR;

/// The backing device, named `id`.
pub fn identity(id: &str) -> BackingIdentity {
    BackingIdentity {
        size: BACKING,
        block_size: BS as u32,
        id: id.into(),
    }
}

pub fn config() -> Config {
    Config {
        log_reserve: 2,
        ..Config::default()
    }
}

/// The geometry a medium formatted with these constants has.
pub fn geometry(format_id: u64) -> Geometry {
    Geometry {
        n_segs: NSEG,
        seg_size: SEG as u64,
        seg_data_size: DATA,
        kset_keys: KEYS,
        backing_size: BACKING,
        format_id,
    }
}
