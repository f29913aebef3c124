//! Fuzz target: every on-media decoder on arbitrary bytes.
//!
//! The first 48 bytes of the input are parameters (geometry, expected sequence,
//! medium size); the rest is the object. Each decoder sees the bytes raw and
//! "stamped" (magic, kind and version set and the CRC recomputed) so its field checks
//! run on arbitrary values. Beyond not panicking, whatever a decoder accepts must
//! satisfy its documented bounds and survive encode -> decode unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pcache::engine::format::{
    check_kset, crc, decode_gen, encode_gen, CacheInfo, Geometry, KeyRec, KsetCheck, LogPos,
    Superblock, BACKING_ID_MAX, FORMAT_VERSION, GC_PERCENT_MAX, GEN_SIZE, INFO_SIZE, KEY_SIZE,
    KIND_DIRTY_TAIL, KIND_KEY_TAIL, KSET_HDR, KSET_LAST, KSET_MAGIC, SB_MAGIC, SB_SIZE, SEG_HDR,
    SUBTREE_SIZE, TAIL_SIZE,
};

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// A copy of `b[..n]` with kind and version set and the metadata CRC recomputed.
fn stamped(b: &[u8], n: usize, kind: u16) -> Vec<u8> {
    let mut c = b[..n].to_vec();
    c[4..6].copy_from_slice(&kind.to_le_bytes());
    c[6..8].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let x = crc(&c[4..]);
    c[..4].copy_from_slice(&x.to_le_bytes());
    c
}

fn superblock(b: &[u8], medium: u64) {
    if let Ok((seq, sb)) = Superblock::decode(b, medium) {
        assert!(sb.pmem_size <= medium);
        assert!(sb.n_segs > 0 && sb.kset_keys > 0);
        if sb.backing.id.len() <= BACKING_ID_MAX {
            assert_eq!(Superblock::decode(&sb.encode(seq), medium), Ok((seq, sb)));
        }
    }
}

fn info(b: &[u8]) {
    if let Ok((seq, ci)) = CacheInfo::decode(b) {
        assert!(ci.gc_percent <= GC_PERCENT_MAX);
        assert_eq!(CacheInfo::decode(&ci.encode(seq)), Ok((seq, ci)));
    }
}

fn tail(b: &[u8], kind: u16, n_segs: u32, data: u64) {
    if let Ok((seq, p)) = LogPos::decode(b, kind, n_segs, data) {
        assert!(p.seg < n_segs && p.off as u64 + KSET_HDR as u64 <= data);
        assert_eq!(
            LogPos::decode(&p.encode(kind, seq), kind, n_segs, data),
            Ok((seq, p))
        );
    }
}

fn gen(b: &[u8], seg: u32) {
    if let Ok((seq, g)) = decode_gen(b, seg) {
        assert_eq!(decode_gen(&encode_gen(seg, g, seq), seg), Ok((seq, g)));
    }
}

fn key(b: &[u8], geo: &Geometry) {
    if let Ok(k) = KeyRec::decode(b, geo) {
        assert!(k.len > 0 && k.off + k.len as u64 <= geo.backing_size);
        assert_eq!(
            k.off / SUBTREE_SIZE,
            (k.off + k.len as u64 - 1) / SUBTREE_SIZE
        );
        if k.has_data() {
            assert!(k.seg < geo.n_segs);
            assert!(k.seg_off as u64 + k.len as u64 <= geo.seg_data_size);
        }
        let mut e = [0u8; KEY_SIZE];
        k.encode(&mut e);
        assert_eq!(KeyRec::decode(&e, geo), Ok(k));
    }
}

fn kset(b: &[u8], geo: &Geometry, seq: u64) {
    if let Ok(KsetCheck::Valid(h)) = check_kset(b, geo, seq) {
        assert!(h.size() <= b.len() && h.seq == seq);
        if h.is_last() {
            assert!(h.count < geo.n_segs);
        } else {
            assert!(h.count >= 1 && h.count <= geo.kset_keys);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 48 {
        return;
    }
    let (p, b) = data.split_at(48);
    let seg_data = u64_at(p, 4) % (1 << 31);
    let geo = Geometry {
        n_segs: u32_at(p, 0),
        seg_size: seg_data + SEG_HDR,
        seg_data_size: seg_data,
        kset_keys: u32_at(p, 12) % 256,
        backing_size: u64_at(p, 16),
        format_id: u64_at(p, 24),
    };
    let seq = u64_at(p, 32);
    let medium = u64_at(p, 40);

    superblock(b, medium);
    if b.len() >= SB_SIZE {
        let mut s = stamped(b, SB_SIZE, 1);
        s[16..24].copy_from_slice(&SB_MAGIC.to_le_bytes());
        let x = crc(&s[4..]);
        s[..4].copy_from_slice(&x.to_le_bytes());
        superblock(&s, medium);
    }
    if b.len() >= INFO_SIZE {
        info(b);
        info(&stamped(b, INFO_SIZE, 2));
    }
    if b.len() >= TAIL_SIZE {
        for kind in [KIND_KEY_TAIL, KIND_DIRTY_TAIL] {
            tail(b, kind, geo.n_segs, geo.seg_data_size);
            tail(
                &stamped(b, TAIL_SIZE, kind),
                kind,
                geo.n_segs,
                geo.seg_data_size,
            );
        }
    }
    if b.len() >= GEN_SIZE {
        let seg = u32_at(b, 16);
        gen(b, seg);
        gen(&stamped(b, GEN_SIZE, 5), seg);
    }
    if b.len() >= KEY_SIZE {
        key(b, &geo);
    }
    kset(b, &geo, seq);
    if b.len() >= KSET_HDR {
        // Right magic, format id and sequence, and a CRC over the claimed size.
        let mut k = b.to_vec();
        k[4..8].copy_from_slice(&KSET_MAGIC.to_le_bytes());
        k[8..16].copy_from_slice(&seq.to_le_bytes());
        k[24..32].copy_from_slice(&geo.format_id.to_le_bytes());
        let size = if u32_at(&k, 16) & KSET_LAST != 0 {
            KSET_HDR
        } else {
            KSET_HDR.saturating_add((u32_at(&k, 20) as usize).saturating_mul(KEY_SIZE))
        };
        let n = size.min(k.len());
        let x = crc(&k[4..n]);
        k[..4].copy_from_slice(&x.to_le_bytes());
        kset(&k, &geo, seq);
    }
});
