//! Property tests of the on-media format and of replay over damaged media.
//!
//! Codec level (`pcache::engine::format`): every encoder round-trips through its
//! decoder for valid values; every single-bit flip of a sealed object is rejected;
//! every field a decoder validates is rejected when out of range (the object re-sealed
//! so the CRC does not hide the check); kset sealing detects a wrong sequence, a wrong
//! format id and bit flips; `pick_replica` picks the newest valid replica; and no
//! decoder panics on arbitrary bytes, raw or re-sealed so the field checks run.
//!
//! Engine level: a small simulated medium is formatted and written, then damaged
//! (random bytes, biased to the metadata area and the log, optionally with every CRC
//! recomputed afterwards so the damage reaches the field checks and replay) or crafted
//! from scratch (a CRC-valid log with random tails, links, keys and generations).
//! `Engine::open` must return Ok or Err without panicking; an accepted medium must
//! keep its invariants, survive a full read with miss fills, writes and a flush, reopen
//! with those writes intact, and survive writeback and GC. Every case runs; a failure
//! lists each distinct panic location or anomaly with a seed that replays it:
//! `PROP_SEED=<seed> cargo test --test format_props <test name> -- --nocapture`.
//! `PROP_CASES` sets the number of engine-level cases (default 256), `PROPTEST_CASES`
//! that of the codec-level ones.
//!
//! Engine bugs found here (sequence and generation overflows from crafted media, a kset
//! leaving no room for its LAST link, long backing ids) were fixed; their minimal
//! reproducers stay at the end as `regression_*` tests, and the crafted-medium property
//! includes their fault classes.

use pcache::engine::format::{
    self, check_kset, crc, decode_gen, encode_gen, get_u32, pick_replica, put_u16, put_u32,
    put_u64, seal_kset, CacheInfo, FlushRec, Geometry, KeyRec, KsetCheck, KsetHdr, LogPos,
    MediaError, Superblock, BACKING_ID_MAX, DIRTY_TAIL_OFF, FLUSH_REC_OFF, FLUSH_REC_SIZE,
    FORMAT_VERSION, GEN_OFF, GEN_SIZE, INFO_DATA_CRC, INFO_INIT_DONE, INFO_OFF, INFO_SIZE,
    KEY_CLEAN, KEY_DISCARD, KEY_INVALID, KEY_SIZE, KEY_TAIL_OFF, KEY_UNSYNCED, KEY_ZERO,
    KIND_DIRTY_TAIL, KIND_KEY_TAIL, KSET_HDR, KSET_KEYS_MAX, KSET_LAST, KSET_MAGIC, KSET_SIZE_MAX,
    SB_OFF, SB_SIZE, SEGMENTS_OFF, SEG_HDR, SEQ_LIMIT, SUBTREE_SIZE, TAIL_SIZE,
};
use pcache::engine::policy::SEQ_CUTOFF_MAX_KIB;
use pcache::engine::{
    probe, BackingIdentity, CacheMode, Channel, Engine, FormatOptions, IoError, OpenError, Policy,
    Promotion, SeqPolicy, WbBatch, WbNext,
};
use pcache::env::sim::pmem::SimPmem;
use pcache::env::sim::rng::Rng;
use pcache::env::sim::tiny::{
    config, geometry, identity, BACKING, BS, DATA, KEYS, NSEG, PMEM, SEG,
};
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestCaseError, TestRunner};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};

// ---------------------------------------------------------------------------------
// Shared helpers.
// ---------------------------------------------------------------------------------

/// Codec-level proptest configuration: `cases` unless `PROPTEST_CASES` says
/// otherwise; no regression files are written.
fn pt(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: env_u64("PROPTEST_CASES").map_or(cases, |c| c as u32),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Recomputes the CRC of a sealed metadata object (superblock, cache_info, tail, gen).
fn reseal(b: &mut [u8]) {
    let c = crc(&b[4..]);
    b[..4].copy_from_slice(&c.to_le_bytes());
}

/// Every encoded bit flipped in turn must be rejected by `dec`.
fn all_flips_rejected<T: std::fmt::Debug>(
    enc: &[u8],
    dec: impl Fn(&[u8]) -> Result<T, MediaError>,
) -> Result<(), TestCaseError> {
    let mut b = enc.to_vec();
    for bit in 0..b.len() * 8 {
        b[bit / 8] ^= 1 << (bit % 8);
        let r = dec(&b);
        prop_assert!(r.is_err(), "bit {bit} flipped, still decodes: {r:?}");
        b[bit / 8] ^= 1 << (bit % 8);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Superblock.
// ---------------------------------------------------------------------------------

prop_compose! {
    /// A valid superblock, the size of the medium holding it, and a replica sequence.
    fn arb_sb()(
        seg_pages in prop_oneof![3u32..=64, 3u32..=(1 << 18)],
        n_segs in prop_oneof![1u32..=64, 1u32..=4096],
        kset_keys in 1u32..=KSET_KEYS_MAX,
        format_id in any::<u64>(),
        bsize in any::<u64>(),
        bbs in any::<u32>(),
        id in prop_oneof!["[ -~]{0,128}", ".{0,32}"],
        pmem_extra in prop_oneof![Just(0u64), 0u64..(1 << 20)],
        medium_extra in prop_oneof![Just(0u64), 0u64..(1 << 20)],
        seq in 0..SEQ_LIMIT,
    ) -> (Superblock, u64, u64) {
        let seg_size = seg_pages * 4096;
        let pmem_size = SEGMENTS_OFF + n_segs as u64 * seg_size as u64 + pmem_extra;
        let sb = Superblock {
            pmem_size,
            seg_size,
            n_segs,
            kset_keys,
            format_id,
            backing: BackingIdentity { size: bsize, block_size: bbs, id },
        };
        (sb, pmem_size + medium_extra, seq)
    }
}

/// Ways to make a valid superblock invalid.
#[derive(Debug, Clone, Copy)]
enum SbBreak {
    MediumSmaller,
    SegSizeUnaligned(u32),
    SegSizeTiny(u32),
    SegSizeHuge(u32),
    NoSegs,
    TooManySegs(u32),
    NoKsetKeys,
    TooManyKsetKeys(u32),
    IdTooLong(u32),
    Version(u16),
    Kind(u16),
    Magic(u64),
}

fn arb_sb_break() -> impl Strategy<Value = SbBreak> {
    prop_oneof![
        Just(SbBreak::MediumSmaller),
        (1u32..4096).prop_map(SbBreak::SegSizeUnaligned),
        (0u32..3).prop_map(SbBreak::SegSizeTiny),
        ((1u32 << 18) + 1..=u32::MAX / 4096).prop_map(SbBreak::SegSizeHuge),
        Just(SbBreak::NoSegs),
        (1u32..=u32::MAX).prop_map(SbBreak::TooManySegs),
        Just(SbBreak::NoKsetKeys),
        (KSET_KEYS_MAX + 1..=u32::MAX).prop_map(SbBreak::TooManyKsetKeys),
        (BACKING_ID_MAX as u32 + 1..=u32::MAX).prop_map(SbBreak::IdTooLong),
        any::<u16>()
            .prop_filter("not the current version", |v| *v != FORMAT_VERSION)
            .prop_map(SbBreak::Version),
        any::<u16>()
            .prop_filter("not the superblock kind", |k| *k != 1)
            .prop_map(SbBreak::Kind),
        any::<u64>()
            .prop_filter("not the magic", |m| *m != format::SB_MAGIC)
            .prop_map(SbBreak::Magic),
    ]
}

proptest! {
    #![proptest_config(pt(256))]

    #[test]
    fn superblock_round_trips((sb, medium, seq) in arb_sb()) {
        let enc = sb.encode(seq);
        prop_assert_eq!(Superblock::decode(&enc, medium), Ok((seq, sb.clone())));
        // Trailing bytes beyond the object are ignored.
        let mut long = enc.to_vec();
        long.extend_from_slice(&[0xa5; 100]);
        prop_assert_eq!(Superblock::decode(&long, medium), Ok((seq, sb.clone())));
        // Any shorter slice is rejected.
        for n in [0, 1, 16, SB_SIZE / 2, SB_SIZE - 1] {
            prop_assert!(Superblock::decode(&enc[..n], medium).is_err());
        }
        prop_assert!(sb.seg_data_size() == sb.seg_size as u64 - SEG_HDR);
        prop_assert!(format::check_seg_size(sb.seg_size).is_ok());
    }

    #[test]
    fn superblock_bit_flips_rejected((sb, medium, seq) in arb_sb()) {
        all_flips_rejected(&sb.encode(seq), |b| Superblock::decode(b, medium))?;
    }

    #[test]
    fn superblock_long_id_is_truncated(id in "[a-z]{129,300}", seq in 0..SEQ_LIMIT) {
        let sb = Superblock {
            pmem_size: SEGMENTS_OFF + 4 * 65536,
            seg_size: 65536,
            n_segs: 4,
            kset_keys: 16,
            format_id: 7,
            backing: BackingIdentity { size: 1 << 20, block_size: 512, id: id.clone() },
        };
        let (_, got) = Superblock::decode(&sb.encode(seq), sb.pmem_size).unwrap();
        prop_assert_eq!(got.backing.id.as_str(), &id[..BACKING_ID_MAX]);
    }

    #[test]
    fn superblock_invalid_fields_rejected((sb, medium, seq) in arb_sb(), br in arb_sb_break()) {
        let mut sb = sb;
        let mut medium = medium;
        // Bytes to overwrite (offset, value) before re-sealing.
        let mut patch: Option<(usize, Vec<u8>)> = None;
        match br {
            SbBreak::MediumSmaller => medium = sb.pmem_size - 1,
            SbBreak::SegSizeUnaligned(d) => sb.seg_size = sb.seg_size.wrapping_add(d),
            SbBreak::SegSizeTiny(p) => sb.seg_size = p * 4096,
            SbBreak::SegSizeHuge(p) => sb.seg_size = p * 4096,
            SbBreak::NoSegs => sb.n_segs = 0,
            SbBreak::TooManySegs(n) => {
                let fit = (sb.pmem_size - SEGMENTS_OFF) / sb.seg_size as u64;
                prop_assume!(fit < u32::MAX as u64);
                sb.n_segs = n.max(fit as u32 + 1);
            }
            SbBreak::NoKsetKeys => sb.kset_keys = 0,
            SbBreak::TooManyKsetKeys(k) => sb.kset_keys = k,
            SbBreak::IdTooLong(n) => patch = Some((64, n.to_le_bytes().to_vec())),
            SbBreak::Version(v) => patch = Some((6, v.to_le_bytes().to_vec())),
            SbBreak::Kind(k) => patch = Some((4, k.to_le_bytes().to_vec())),
            SbBreak::Magic(m) => patch = Some((16, m.to_le_bytes().to_vec())),
        }
        let mut enc = sb.encode(seq);
        if let Some((o, v)) = patch {
            enc[o..o + v.len()].copy_from_slice(&v);
            reseal(&mut enc);
        }
        let r = Superblock::decode(&enc, medium);
        prop_assert!(r.is_err(), "{br:?} accepted: {r:?}");
        if let SbBreak::Version(v) = br {
            prop_assert_eq!(r, Err(MediaError::Version("superblock", v)));
        }
    }

    #[test]
    fn superblock_decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..600),
                                      medium in any::<u64>(), stamp in any::<bool>()) {
        let mut b = b;
        if stamp && b.len() >= SB_SIZE {
            // Make the magic, kind, version and CRC right so the field checks run.
            put_u64(&mut b, 16, format::SB_MAGIC);
            put_u16(&mut b, 4, 1);
            put_u16(&mut b, 6, FORMAT_VERSION);
            reseal(&mut b[..SB_SIZE]);
        }
        let _ = Superblock::decode(&b, medium);
    }
}

// ---------------------------------------------------------------------------------
// cache_info, tails, generations.
// ---------------------------------------------------------------------------------

fn arb_tail_kind() -> impl Strategy<Value = u16> {
    prop_oneof![Just(KIND_KEY_TAIL), Just(KIND_DIRTY_TAIL)]
}

prop_compose! {
    /// A tail inside a geometry: (pos, n_segs, data_size).
    fn arb_tail()(
        n_segs in prop_oneof![1u32..=16, 1u32..=u32::MAX],
        data_size in prop_oneof![(KSET_HDR as u64)..=65536, (KSET_HDR as u64)..=(1 << 32)],
        a in any::<u32>(), b in any::<u64>(), seq in 0..SEQ_LIMIT,
    ) -> (LogPos, u32, u64) {
        let max_off = (data_size - KSET_HDR as u64).min(u32::MAX as u64);
        let pos = LogPos { seq: 1 + seq % (SEQ_LIMIT - 1), seg: a % n_segs, off: (b % (max_off + 1)) as u32 };
        (pos, n_segs, data_size)
    }
}

proptest! {
    #![proptest_config(pt(256))]

    #[test]
    fn cache_info_round_trips(gc in 0u32..=95, flags in any::<u32>(), seq in 0..SEQ_LIMIT,
                              mode in 0u8..4, sp in 0u8..3, kib in 0u32..=SEQ_CUTOFF_MAX_KIB,
                              wb in 0u32..=SEQ_CUTOFF_MAX_KIB, pr in 0u8..2) {
        let policy = Policy {
            mode: CacheMode::from_code(mode).unwrap(),
            seq_policy: SeqPolicy::from_code(sp).unwrap(),
            seq_cutoff_kib: kib,
            write_bypass_kib: wb,
            promotion: Promotion::from_code(pr).unwrap(),
        };
        let ci = CacheInfo { gc_percent: gc, flags, policy };
        let enc = ci.encode(seq);
        prop_assert_eq!(CacheInfo::decode(&enc), Ok((seq, ci)));
        all_flips_rejected(&enc, CacheInfo::decode)?;
    }

    #[test]
    fn cache_info_bad_gc_rejected(gc in 91u32..=u32::MAX, flags in any::<u32>(), seq in any::<u64>()) {
        let enc = CacheInfo { gc_percent: gc, flags, ..Default::default() }.encode(seq);
        prop_assert!(CacheInfo::decode(&enc).is_err());
    }

    /// A cache_info written before modes existed (zeros in bytes 24..32) reads as
    /// write-back with the cutoff off; unknown mode or policy codes and oversized
    /// thresholds are corruption, never a panic.
    #[test]
    fn cache_info_policy_fields(gc in 0u32..=95, seq in 0..SEQ_LIMIT, mode in 4u8..=255,
                                sp in 3u8..=255, kib in (SEQ_CUTOFF_MAX_KIB + 1)..=u32::MAX,
                                pr in 2u8..=255) {
        let old = CacheInfo { gc_percent: gc, flags: 0, ..Default::default() }.encode(seq);
        prop_assert!(old[24..32].iter().all(|&b| b == 0));
        let (_, ci) = CacheInfo::decode(&old).unwrap();
        prop_assert_eq!(ci.policy, Policy::default());
        prop_assert_eq!(ci.policy.mode, CacheMode::WriteBack);
        prop_assert_eq!(ci.policy.seq_cutoff_kib, 0);
        prop_assert_eq!(ci.policy.promotion, Promotion::Always);
        for (at, v) in [(24usize, mode), (25, sp), (26, pr)] {
            let mut b = old;
            b[at] = v;
            reseal(&mut b);
            prop_assert!(CacheInfo::decode(&b).is_err());
        }
        let mut b = old;
        b[28..32].copy_from_slice(&kib.to_le_bytes());
        reseal(&mut b);
        prop_assert!(CacheInfo::decode(&b).is_err());
    }

    /// The flush record round-trips, rejects every flipped bit, and reads as "nothing
    /// flushed yet" when all-zero (media from before it).
    #[test]
    fn flush_rec_round_trips(through in 0..SEQ_LIMIT, lo in 0..SEQ_LIMIT, span in 0u64..1000,
                             seq in 0..SEQ_LIMIT, empty in any::<bool>()) {
        let (drop_lo, drop_hi) = if empty { (0, 0) } else { (lo, (lo + span).min(SEQ_LIMIT - 1)) };
        prop_assume!(empty || drop_hi > 0);
        let r = FlushRec { through, drop_lo, drop_hi };
        let enc = r.encode(seq);
        prop_assert_eq!(FlushRec::decode(&enc), Ok((seq, r)));
        all_flips_rejected(&enc, FlushRec::decode)?;
        prop_assert_eq!(FlushRec::decode(&[0u8; FLUSH_REC_SIZE]), Ok((0, FlushRec::default())));
        // covers: up to `through`, outside the drop range.
        for s in [1, through, through.saturating_add(1), drop_lo, drop_hi] {
            let want = s <= through && !(drop_lo <= s && s <= drop_hi);
            prop_assert_eq!(r.covers(s), want);
        }
    }

    /// Out-of-range fields are corruption: a sequence at the limit, an inverted drop
    /// range, a drop range starting with no end.
    #[test]
    fn flush_rec_bad_fields_rejected(seq in 0..SEQ_LIMIT, v in SEQ_LIMIT..=u64::MAX,
                                     lo in 1..SEQ_LIMIT, which in 0u8..4) {
        let r = match which {
            0 => FlushRec { through: v, ..Default::default() },
            1 => FlushRec { drop_lo: 1, drop_hi: v, ..Default::default() },
            2 => FlushRec { drop_lo: lo, drop_hi: 0, ..Default::default() },
            _ => FlushRec { drop_lo: lo, drop_hi: lo - 1, ..Default::default() },
        };
        prop_assert!(FlushRec::decode(&r.encode(seq)).is_err());
    }

    #[test]
    fn tail_round_trips(kind in arb_tail_kind(), (pos, n_segs, data) in arb_tail(),
                        seq in 0..SEQ_LIMIT) {
        let enc = pos.encode(kind, seq);
        prop_assert_eq!(LogPos::decode(&enc, kind, n_segs, data), Ok((seq, pos)));
        // The other kind of tail is not accepted in its place.
        let other = if kind == KIND_KEY_TAIL { KIND_DIRTY_TAIL } else { KIND_KEY_TAIL };
        prop_assert!(LogPos::decode(&enc, other, n_segs, data).is_err());
        all_flips_rejected(&enc, |b| LogPos::decode(b, kind, n_segs, data))?;
    }

    #[test]
    fn tail_outside_geometry_rejected(kind in arb_tail_kind(), (pos, n_segs, data) in arb_tail(),
                                      seq in any::<u64>(), d in any::<u32>(), which in any::<bool>()) {
        let mut p = pos;
        if which {
            p.seg = n_segs.saturating_add(d % (u32::MAX - n_segs + 1).max(1));
            prop_assume!(p.seg >= n_segs);
        } else {
            let min_bad = data - KSET_HDR as u64 + 1;
            prop_assume!(min_bad <= u32::MAX as u64);
            p.off = (min_bad + d as u64 % (u32::MAX as u64 - min_bad + 1)) as u32;
        }
        let enc = p.encode(kind, seq);
        let r = LogPos::decode(&enc, kind, n_segs, data);
        prop_assert!(matches!(r, Err(MediaError::Field { .. })), "{p:?} accepted: {r:?}");
    }

    #[test]
    fn gen_round_trips(seg in any::<u32>(), gen in 0..SEQ_LIMIT, seq in 0..SEQ_LIMIT,
                       other in any::<u32>()) {
        let enc = encode_gen(seg, gen, seq);
        prop_assert_eq!(decode_gen(&enc, seg), Ok((seq, gen)));
        if other != seg {
            prop_assert!(decode_gen(&enc, other).is_err());
        }
        all_flips_rejected(&enc, |b| decode_gen(b, seg))?;
    }

    #[test]
    fn small_decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 64..160),
                                  kind in 0u16..8, n_segs in any::<u32>(), data in any::<u64>(),
                                  seg in any::<u32>(), stamp in any::<bool>()) {
        // Each decoder gets the bytes raw, and re-sealed with the right kind and
        // version so its field checks run on arbitrary field values.
        let sealed = |k: u16, n: usize| {
            let mut c = b[..n].to_vec();
            if stamp {
                put_u16(&mut c, 4, k);
                put_u16(&mut c, 6, FORMAT_VERSION);
                reseal(&mut c);
            }
            c
        };
        let _ = CacheInfo::decode(&sealed(2, INFO_SIZE));
        let _ = CacheInfo::decode(&b);
        let _ = LogPos::decode(&sealed(kind, TAIL_SIZE), kind, n_segs, data);
        let _ = LogPos::decode(&b, kind, n_segs, data);
        let _ = decode_gen(&sealed(5, GEN_SIZE), seg);
        let _ = decode_gen(&b, seg);
    }

    #[test]
    fn pick_replica_prefers_newest_valid(
        a in proptest::option::of((any::<u64>(), any::<u32>())),
        b in proptest::option::of((any::<u64>(), any::<u32>())),
        a_version in any::<bool>(), b_version in any::<bool>(),
    ) {
        let err = |version: bool| if version {
            MediaError::Version("x", 9)
        } else {
            MediaError::Crc("x")
        };
        let ra = a.ok_or_else(|| err(a_version));
        let rb = b.ok_or_else(|| err(b_version));
        let got = pick_replica([ra, rb]);
        match (a, b) {
            (Some((sa, va)), Some((sb, vb))) => {
                let want = if sb > sa { (1, sb, vb) } else { (0, sa, va) };
                prop_assert_eq!(got, Ok(want));
            }
            (Some((s, v)), None) => prop_assert_eq!(got, Ok((0, s, v))),
            (None, Some((s, v))) => prop_assert_eq!(got, Ok((1, s, v))),
            // Both bad: a version error wins over a CRC error.
            (None, None) => prop_assert_eq!(got, Err(err(a_version || b_version))),
        }
    }
}

// ---------------------------------------------------------------------------------
// Keys.
// ---------------------------------------------------------------------------------

prop_compose! {
    fn arb_geo()(
        n_segs in 1u32..=64,
        seg_data_size in prop_oneof![8192u64..=65536, 8192u64..=(1 << 30)],
        kset_keys in 1u32..=KSET_KEYS_MAX,
        backing_blocks in prop_oneof![1u64..=2048, 1u64..=(128 << 10), 1u64..=(1 << 31)],
        format_id in any::<u64>(),
    ) -> Geometry {
        // Backing sizes are whole blocks, and every block size is a multiple of 512.
        let backing_size = backing_blocks * 512;
        Geometry {
            n_segs,
            seg_size: seg_data_size + SEG_HDR,
            seg_data_size,
            kset_keys,
            backing_size,
            format_id,
        }
    }
}

prop_compose! {
    /// A key valid for `geo`.
    fn arb_key(geo: Geometry)(
        zero in any::<bool>(), clean in any::<bool>(), discard in any::<bool>(),
        r_len in any::<u64>(), r_off in any::<u64>(), r_seg in any::<u32>(), r_soff in any::<u64>(),
        gen in any::<u64>(), data_crc in any::<u32>(),
    ) -> KeyRec {
        let mut flags = 0;
        if zero { flags |= KEY_ZERO; }
        if clean { flags |= KEY_CLEAN; }
        if discard { flags |= KEY_DISCARD; }
        let mut max_len = SUBTREE_SIZE.min(geo.backing_size);
        if !zero { max_len = max_len.min(geo.seg_data_size); }
        // Keys are whole 512-byte units (every block size is a multiple of 512).
        let len = (r_len % (max_len / 512) + 1) * 512;
        let mut off = r_off % ((geo.backing_size - len) / 512 + 1) * 512;
        let end = off + len;
        if off / SUBTREE_SIZE != (end - 1) / SUBTREE_SIZE {
            off = (end - 1) / SUBTREE_SIZE * SUBTREE_SIZE - len;
        }
        let (seg, seg_off) = if zero {
            (r_seg, r_soff as u32)
        } else {
            (r_seg % geo.n_segs, (r_soff % (geo.seg_data_size - len + 1)) as u32)
        };
        KeyRec { off, len: len as u32, flags, seg, seg_off, gen, data_crc }
    }
}

fn arb_geo_key() -> impl Strategy<Value = (Geometry, KeyRec)> {
    arb_geo().prop_flat_map(|g| (Just(g), arb_key(g)))
}

/// Ways to make a valid key invalid.
#[derive(Debug, Clone, Copy)]
enum KeyBreak {
    LenZero,
    LenHuge(u32),
    PastBacking(u64),
    OffOverflow,
    CrossesSubtree(u32),
    SegTooBig(u32),
    SegOffTooBig(u32),
    UnknownFlag(u32),
    Unaligned(u32),
}

fn arb_key_break() -> impl Strategy<Value = KeyBreak> {
    prop_oneof![
        Just(KeyBreak::LenZero),
        (SUBTREE_SIZE as u32 + 1..=u32::MAX).prop_map(KeyBreak::LenHuge),
        any::<u64>().prop_map(KeyBreak::PastBacking),
        Just(KeyBreak::OffOverflow),
        any::<u32>().prop_map(KeyBreak::CrossesSubtree),
        any::<u32>().prop_map(KeyBreak::SegTooBig),
        any::<u32>().prop_map(KeyBreak::SegOffTooBig),
        (0u32..32)
            // KEY_INVALID is known: valid on a tombstone (with KEY_CLEAN | KEY_ZERO).
            .prop_filter("unknown bit", |b| (1 << b)
                & (KEY_CLEAN | KEY_ZERO | KEY_DISCARD | KEY_INVALID | KEY_UNSYNCED)
                == 0)
            .prop_map(KeyBreak::UnknownFlag),
        (1u32..512).prop_map(KeyBreak::Unaligned),
    ]
}

proptest! {
    #![proptest_config(pt(512))]

    #[test]
    fn key_round_trips((geo, k) in arb_geo_key()) {
        let mut b = [0xeeu8; KEY_SIZE];
        k.encode(&mut b);
        prop_assert_eq!(&b[36..40], &[0u8; 4], "padding is zeroed");
        prop_assert_eq!(KeyRec::decode(&b, &geo), Ok(k));
        prop_assert_eq!(k.has_data(), k.flags & KEY_ZERO == 0);
    }

    /// KEY_UNSYNCED is valid on clean data keys only.
    #[test]
    fn key_unsynced_only_on_clean_data((geo, k) in arb_geo_key()) {
        let mut u = k;
        u.flags = (k.flags & !KEY_INVALID) | KEY_UNSYNCED;
        let mut b = [0u8; KEY_SIZE];
        u.encode(&mut b);
        let ok = u.flags & KEY_CLEAN != 0 && u.flags & KEY_ZERO == 0;
        prop_assert_eq!(KeyRec::decode(&b, &geo).is_ok(), ok, "flags {:#x}", u.flags);
    }

    #[test]
    fn key_invalid_fields_rejected((geo, k) in arb_geo_key(), br in arb_key_break()) {
        let mut k = k;
        match br {
            KeyBreak::LenZero => k.len = 0,
            KeyBreak::LenHuge(l) => k.len = l,
            KeyBreak::PastBacking(d) => {
                // A start at or past the end, or an end past it.
                if d % 2 == 0 {
                    k.off = geo.backing_size - k.len as u64 + 1 + d % 4096;
                } else {
                    k.off = geo.backing_size.saturating_add(d / 2);
                }
            }
            KeyBreak::OffOverflow => k.off = u64::MAX - k.len as u64 / 2,
            KeyBreak::CrossesSubtree(d) => {
                let boundary = (geo.backing_size - 1) / SUBTREE_SIZE * SUBTREE_SIZE;
                prop_assume!(boundary > 0);
                let before = 1 + d as u64 % (SUBTREE_SIZE - 1);
                let after = 1 + (d as u64 >> 8) % (geo.backing_size - boundary).min(4096);
                k.off = boundary - before.min(boundary);
                k.len = (boundary - k.off + after) as u32;
                prop_assume!(k.len as u64 <= SUBTREE_SIZE);
            }
            KeyBreak::SegTooBig(s) => {
                k.flags &= !KEY_ZERO;
                k.len = k.len.min(geo.seg_data_size as u32);
                k.seg_off = 0;
                k.seg = geo.n_segs.saturating_add(s % (u32::MAX - geo.n_segs + 1).max(1));
                prop_assume!(k.seg >= geo.n_segs);
            }
            KeyBreak::SegOffTooBig(d) => {
                k.flags &= !KEY_ZERO;
                k.len = k.len.min(geo.seg_data_size as u32);
                k.seg %= geo.n_segs;
                let min_bad = geo.seg_data_size - k.len as u64 + 1;
                k.seg_off = (min_bad + d as u64 % (u32::MAX as u64 - min_bad + 1)) as u32;
            }
            KeyBreak::UnknownFlag(bit) => k.flags |= 1 << bit,
            KeyBreak::Unaligned(d) => {
                if d % 2 == 0 && k.len > 512 {
                    k.len -= d;
                } else {
                    k.off += d as u64;
                    prop_assume!(k.off + (k.len as u64) <= geo.backing_size);
                }
            }
        }
        let mut b = [0u8; KEY_SIZE];
        k.encode(&mut b);
        let r = KeyRec::decode(&b, &geo);
        prop_assert!(matches!(r, Err(MediaError::Field { what: "key", .. })),
                     "{br:?}: {k:?} accepted: {r:?}");
    }

    #[test]
    fn key_decode_never_panics(b in proptest::array::uniform32(any::<u8>()),
                               tail in proptest::array::uniform8(any::<u8>()),
                               n_segs in any::<u32>(), seg_data in any::<u64>(),
                               backing in any::<u64>()) {
        let mut k = [0u8; KEY_SIZE];
        k[..32].copy_from_slice(&b);
        k[32..].copy_from_slice(&tail);
        let geo = Geometry {
            n_segs,
            seg_size: seg_data.saturating_add(SEG_HDR),
            seg_data_size: seg_data,
            kset_keys: 8,
            backing_size: backing,
            format_id: 0,
        };
        if let Ok(d) = KeyRec::decode(&k, &geo) {
            // Whatever is accepted satisfies the documented bounds.
            prop_assert!(d.len > 0 && d.off + d.len as u64 <= backing);
            prop_assert_eq!(d.off / SUBTREE_SIZE, (d.off + d.len as u64 - 1) / SUBTREE_SIZE);
            if d.has_data() {
                prop_assert!(d.seg < n_segs);
                prop_assert!(d.seg_off as u64 + d.len as u64 <= seg_data);
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Ksets.
// ---------------------------------------------------------------------------------

prop_compose! {
    /// A sealed kset valid for `geo`: (bytes, header).
    fn arb_kset(geo: Geometry)(
        last in prop::bool::weighted(0.2),
        r_count in any::<u32>(),
        seq in any::<u64>(),
        keys in proptest::collection::vec(any::<u8>(), KEY_SIZE * geo.kset_keys as usize),
    ) -> (Vec<u8>, KsetHdr) {
        let hdr = if last {
            KsetHdr { seq, flags: KSET_LAST, count: r_count % geo.n_segs }
        } else {
            KsetHdr { seq, flags: 0, count: 1 + r_count % geo.kset_keys }
        };
        let mut b = vec![0u8; hdr.size()];
        b[KSET_HDR..].copy_from_slice(&keys[..hdr.size() - KSET_HDR]);
        seal_kset(&mut b, geo.format_id, hdr);
        (b, hdr)
    }
}

fn arb_geo_kset() -> impl Strategy<Value = (Geometry, Vec<u8>, KsetHdr)> {
    arb_geo().prop_flat_map(|g| arb_kset(g).prop_map(move |(b, h)| (g, b, h)))
}

proptest! {
    #![proptest_config(pt(256))]

    #[test]
    fn kset_round_trips((geo, b, hdr) in arb_geo_kset(),
                        trailing in proptest::collection::vec(any::<u8>(), 0..200),
                        cut in any::<usize>(), other_seq in any::<u64>(), other_fid in any::<u64>()) {
        prop_assert_eq!(check_kset(&b, &geo, hdr.seq), Ok(KsetCheck::Valid(hdr)));
        prop_assert_eq!(hdr.size(), b.len());
        // Bytes after the kset do not matter.
        let mut long = b.clone();
        long.extend_from_slice(&trailing);
        prop_assert_eq!(check_kset(&long, &geo, hdr.seq), Ok(KsetCheck::Valid(hdr)));
        // A truncated kset is the end of the log.
        let n = cut % b.len();
        prop_assert_eq!(check_kset(&b[..n], &geo, hdr.seq), Ok(KsetCheck::End));
        // Another sequence number (a stale lap) or format id (an earlier format) is too.
        if other_seq != hdr.seq {
            prop_assert_eq!(check_kset(&b, &geo, other_seq), Ok(KsetCheck::End));
        }
        if other_fid != geo.format_id {
            let g2 = Geometry { format_id: other_fid, ..geo };
            prop_assert_eq!(check_kset(&b, &g2, hdr.seq), Ok(KsetCheck::End));
        }
    }

    #[test]
    fn kset_bit_flips_are_end((geo, b, hdr) in arb_geo_kset(),
                              bits in proptest::collection::vec(any::<usize>(), 64)) {
        // Every bit of the header, plus a sample of the key bits.
        let n_bits = b.len() * 8;
        let header_bits = 0..KSET_HDR * 8;
        let sample = bits.into_iter().map(|x| x % n_bits);
        let mut b = b;
        for bit in header_bits.chain(sample) {
            b[bit / 8] ^= 1 << (bit % 8);
            let r = check_kset(&b, &geo, hdr.seq);
            prop_assert_eq!(r, Ok(KsetCheck::End), "bit {} flipped", bit);
            b[bit / 8] ^= 1 << (bit % 8);
        }
    }

    #[test]
    fn kset_authentic_but_invalid((geo, seq, fid_ok) in (arb_geo(), any::<u64>(), any::<bool>()),
                                  next in any::<u32>(), flags in any::<u32>(), count in any::<u32>()) {
        let fid = if fid_ok { geo.format_id } else { geo.format_id ^ 1 };
        // A sealed LAST kset linking outside the geometry is corruption, not the end.
        let mut b = vec![0u8; KSET_HDR];
        let bad_next = geo.n_segs.saturating_add(next % (u32::MAX - geo.n_segs + 1).max(1));
        seal_kset(&mut b, fid, KsetHdr { seq, flags: KSET_LAST, count: bad_next });
        let r = check_kset(&b, &geo, seq);
        if fid_ok && bad_next >= geo.n_segs {
            prop_assert!(matches!(r, Err(MediaError::Field { .. })), "{r:?}");
        } else if !fid_ok {
            prop_assert_eq!(r, Ok(KsetCheck::End));
        }
        // Unknown flags, an empty kset, or more keys than the geometry allows: End.
        let mut b = vec![0u8; KSET_SIZE_MAX + 64];
        let unknown = flags & !KSET_LAST;
        if unknown != 0 {
            let n = KSET_HDR + KEY_SIZE;
            seal_kset(&mut b[..n], geo.format_id, KsetHdr { seq, flags: unknown, count: 1 });
            prop_assert_eq!(check_kset(&b, &geo, seq), Ok(KsetCheck::End));
        }
        seal_kset(&mut b[..KSET_HDR], geo.format_id, KsetHdr { seq, flags: 0, count: 0 });
        prop_assert_eq!(check_kset(&b, &geo, seq), Ok(KsetCheck::End));
        let over = geo.kset_keys + 1 + count % (KSET_KEYS_MAX + 1 - geo.kset_keys.min(KSET_KEYS_MAX));
        let n = (KSET_HDR + KEY_SIZE * over as usize).min(b.len());
        seal_kset(&mut b[..n], geo.format_id, KsetHdr { seq, flags: 0, count: over });
        prop_assert_eq!(check_kset(&b, &geo, seq), Ok(KsetCheck::End));
    }

    #[test]
    fn check_kset_never_panics(b in proptest::collection::vec(any::<u8>(), 0..6000),
                               n_segs in any::<u32>(), kset_keys in any::<u32>(),
                               fid in any::<u64>(), seq in any::<u64>(), stamp in 0u8..3) {
        let mut b = b;
        let geo = Geometry {
            n_segs,
            seg_size: 1 << 20,
            seg_data_size: (1 << 20) - SEG_HDR,
            kset_keys,
            backing_size: 1 << 30,
            format_id: fid,
        };
        if stamp > 0 && b.len() >= KSET_HDR {
            // Right magic, format id and sequence; with stamp 2 also a CRC over the
            // size the header claims (clipped to the buffer), so every path is reached.
            put_u32(&mut b, 4, KSET_MAGIC);
            put_u64(&mut b, 8, seq);
            put_u64(&mut b, 24, fid);
            if stamp == 2 {
                let count = get_u32(&b, 20) as usize;
                let size = if get_u32(&b, 16) & KSET_LAST != 0 {
                    KSET_HDR
                } else {
                    KSET_HDR.saturating_add(count.saturating_mul(KEY_SIZE))
                };
                let n = size.min(b.len());
                let c = crc(&b[4..n]);
                put_u32(&mut b, 0, c);
            }
        }
        match check_kset(&b, &geo, seq) {
            Ok(KsetCheck::Valid(h)) => {
                prop_assert!(h.size() <= b.len());
                prop_assert_eq!(h.seq, seq);
                if h.is_last() {
                    prop_assert!(h.count < n_segs);
                } else {
                    prop_assert!(h.count >= 1 && h.count <= kset_keys);
                }
            }
            Ok(KsetCheck::End) | Err(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------------
// Engine level: replay of damaged and crafted media.
// ---------------------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Outcome counters of an engine-level property, printed at the end.
#[derive(Default)]
struct Tally(RefCell<BTreeMap<String, u64>>);

impl Tally {
    fn add(&self, what: impl Into<String>) {
        *self.0.borrow_mut().entry(what.into()).or_default() += 1;
    }
    fn print(&self, name: &str) {
        println!("{name}:");
        for (k, v) in self.0.borrow().iter() {
            println!("  {v:6}  {k}");
        }
    }
}

/// `m` with every number replaced by `#`, to group messages that differ only in them.
fn mask_numbers(m: &str) -> String {
    let mut r = String::new();
    for c in m.chars() {
        let c = if c.is_ascii_digit() { '#' } else { c };
        if !(c == '#' && r.ends_with('#')) {
            r.push(c);
        }
    }
    r
}

/// An open error's kind, with a corruption's reason (numbers masked) for the tally.
fn open_error_kind(e: &OpenError) -> String {
    match e {
        OpenError::Blank => "open: Blank".into(),
        OpenError::Foreign => "open: Foreign".into(),
        OpenError::Corrupt(m) => {
            let mut r = mask_numbers(m);
            r.truncate(70);
            format!("open: Corrupt: {r}")
        }
        OpenError::WrongBacking(_) => "open: WrongBacking".into(),
        OpenError::Invalid(_) => "open: Invalid".into(),
    }
}

thread_local! {
    /// Where the last panic on this thread happened (set by the hook below).
    static PANIC_AT: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Chains a panic hook that remembers each panic's location per thread, so a caught
/// panic can be reported (and distinct panics told apart) by where it happened.
fn record_panic_locations() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            PANIC_AT.with(|p| *p.borrow_mut() = at);
            prev(info);
        }));
    });
}

/// Runs `case` for `PROP_CASES` (default 256) random seeds, or only for `PROP_SEED`.
/// Every case runs even after a failure; the property fails at the end, listing each
/// distinct failure (panic location or message) with the first seed that shows it.
fn run_seeds(name: &str, case: impl Fn(u64, &Tally) -> Result<(), String>) {
    record_panic_locations();
    let tally = Tally::default();
    // Failures grouped by message with numbers masked: (first seed, count, message).
    let failures: RefCell<BTreeMap<String, (u64, u64, String)>> = RefCell::default();
    let one = |seed: u64| {
        let what = match catch_unwind(AssertUnwindSafe(|| case(seed, &tally))) {
            Ok(Ok(())) => return,
            Ok(Err(m)) => m,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let at = PANIC_AT.with(|p| p.borrow().clone());
                format!("PANIC at {at}: {msg}")
            }
        };
        tally.add("FAILED");
        let key = mask_numbers(&what);
        failures
            .borrow_mut()
            .entry(key)
            .or_insert((seed, 0, what))
            .1 += 1;
    };
    if let Some(seed) = env_u64("PROP_SEED") {
        one(seed);
    } else {
        let cases = env_u64("PROP_CASES").unwrap_or(256) as u32;
        let mut runner = TestRunner::new(PtConfig {
            cases,
            failure_persistence: None,
            ..PtConfig::default()
        });
        runner
            .run(&any::<u64>(), |seed| {
                one(seed);
                Ok(())
            })
            .expect("the runner itself");
    }
    tally.print(name);
    let failures = failures.into_inner();
    if !failures.is_empty() {
        let list: Vec<String> = failures
            .iter()
            .map(|(_, (seed, n, what))| {
                format!(
                    "{n} case(s): {what}\n    replay: PROP_SEED={seed} cargo test --test format_props {name}"
                )
            })
            .collect();
        panic!("{} distinct failure(s):\n{}", list.len(), list.join("\n"));
    }
}

/// A formatted medium with a few writes, zeroes and fills on it, flushed.
fn written_image(rng: &mut Rng) -> (Vec<u8>, u64) {
    let format_id = rng.next_u64();
    let mut fo = FormatOptions::new(identity("format-props"), format_id);
    fo.seg_size = SEG;
    fo.kset_keys = KEYS;
    fo.data_crc = rng.chance(1, 2);
    fo.gc_percent = rng.below(96) as u32;
    let e = Engine::format(SimPmem::new(PMEM), &fo, &config()).expect("format");
    let mut ch = Channel::default();
    for _ in 0..rng.range(1, 24) {
        let blocks = rng.range(1, 17);
        let off = rng.below(BACKING / BS - blocks + 1) * BS;
        let len = blocks * BS;
        match rng.below(8) {
            0 => {
                let _ = e.write_zeroes(off, len, rng.chance(1, 2), false);
            }
            1 => {
                let _ = read_range(&e, &mut ch, off, len as usize);
            }
            _ => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                let _ = e.write(&mut ch, off, &data, rng.chance(1, 8));
            }
        }
        if rng.chance(1, 6) {
            let _ = e.flush();
        }
    }
    let _ = e.flush();
    (e.pmem().image(), format_id)
}

/// Reads `[off, off + len)`, filling the misses with zeros (the backing device's
/// content in these tests). Returns the bytes read, None on a read error.
fn read_range(e: &Engine<SimPmem>, ch: &mut Channel, off: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0xa5u8; len];
    match e.read(ch, off, &mut buf) {
        Ok(0) => Some(buf),
        Ok(_) => {
            let misses: Vec<_> = ch.misses().collect();
            for m in misses {
                buf[m.at..m.at + m.len].fill(0);
            }
            e.fill(ch, off, &buf, true);
            Some(buf)
        }
        Err(IoError::Corrupt) => None,
        Err(e) => panic!("read of {off}+{len}: unexpected {e:?}"),
    }
}

/// Where the ksets of an image's log are: medium offsets of each kset header found by
/// walking every segment's data area from its start while the magic matches.
fn kset_sites(img: &[u8]) -> Vec<u64> {
    let geo = geometry(0);
    let mut sites = vec![];
    for s in 0..NSEG {
        let mut off = 0u64;
        while off + KSET_HDR as u64 <= DATA {
            let at = geo.data_off(s, off) as usize;
            if get_u32(img, at + 4) != KSET_MAGIC {
                break;
            }
            sites.push(at as u64);
            if get_u32(img, at + 16) & KSET_LAST != 0 {
                break;
            }
            off += (KSET_HDR + KEY_SIZE * get_u32(img, at + 20).min(KEYS) as usize) as u64;
        }
    }
    sites
}

/// Recomputes the CRC of every metadata object and of every kset at `sites`, so that
/// damage to their fields reaches the field checks and replay instead of the CRC check.
fn reseal_image(img: &mut [u8], sites: &[u64]) {
    let geo = geometry(0);
    let mut objs: Vec<(u64, usize)> = vec![];
    objs.extend(SB_OFF.iter().map(|&o| (o, SB_SIZE)));
    objs.extend(INFO_OFF.iter().map(|&o| (o, INFO_SIZE)));
    objs.extend(KEY_TAIL_OFF.iter().map(|&o| (o, TAIL_SIZE)));
    objs.extend(DIRTY_TAIL_OFF.iter().map(|&o| (o, TAIL_SIZE)));
    // An all-zero flush record replica is "never written", not a damaged one.
    objs.extend(
        FLUSH_REC_OFF
            .iter()
            .filter(|&&o| {
                img[o as usize..o as usize + FLUSH_REC_SIZE]
                    .iter()
                    .any(|&b| b != 0)
            })
            .map(|&o| (o, FLUSH_REC_SIZE)),
    );
    for s in 0..NSEG {
        objs.extend(GEN_OFF.iter().map(|&o| (geo.seg_base(s) + o, GEN_SIZE)));
    }
    for (o, n) in objs {
        reseal(&mut img[o as usize..o as usize + n]);
    }
    for &at in sites {
        let at = at as usize;
        let off_in_seg = (at as u64 - SEGMENTS_OFF) % SEG as u64 - SEG_HDR;
        let remaining = (DATA - off_in_seg) as usize;
        let size = if get_u32(img, at + 16) & KSET_LAST != 0 {
            KSET_HDR
        } else {
            KSET_HDR + KEY_SIZE * (get_u32(img, at + 20) as usize).min(KEYS as usize)
        };
        let n = size.min(remaining);
        let c = crc(&img[at + 4..at + n]);
        put_u32(img, at, c);
    }
}

/// Damages `img` at 1..64 random places, biased to the metadata objects, the segment
/// headers and the log. Returns a description of the damage.
fn damage(img: &mut [u8], sites: &[u64], rng: &mut Rng) -> Vec<String> {
    let hot: [(u64, u64); 5] = [
        (SB_OFF[0], SB_SIZE as u64),
        (SB_OFF[1], SB_SIZE as u64),
        (INFO_OFF[0], 2 * 4096),
        (KEY_TAIL_OFF[0], 256),
        (INFO_OFF[0], INFO_SIZE as u64),
    ];
    let mut log = vec![];
    for _ in 0..rng.range(1, 65) {
        let pos = match rng.below(20) {
            0..=6 => {
                let (o, n) = hot[rng.index(hot.len())];
                o + rng.below(n)
            }
            7..=9 => rng.below(SEGMENTS_OFF),
            10..=14 if !sites.is_empty() => {
                sites[rng.index(sites.len())] + rng.below((KSET_HDR + KEY_SIZE * 2) as u64)
            }
            15..=16 => SEGMENTS_OFF + rng.below(4) * SEG as u64 + rng.below(128),
            _ => rng.below(img.len() as u64),
        } as usize;
        let old = img[pos];
        match rng.below(10) {
            0..=4 => img[pos] ^= 1 << rng.below(8),
            5..=7 => img[pos] = rng.next_u32() as u8,
            8 => img[pos] = if rng.chance(1, 2) { 0 } else { 0xff },
            _ => {
                // A small plausible value in an aligned 32-bit field.
                let p = pos & !3;
                let v = rng.below(64) as u32;
                img[p..p + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        log.push(format!("{pos}:{old:02x}->{:02x}", img[pos]));
    }
    log
}

/// Exercises an engine that accepted a medium: invariants, a full read with fills,
/// writes and a flush, a reopen of the result (which must succeed and hold the
/// writes), then writeback and GC. Panics propagate; anomalies that are not panics are
/// counted in `tally` and returned as notes.
fn exercise(e: Engine<SimPmem>, rng: &mut Rng, tally: &Tally) -> Vec<String> {
    let mut notes = vec![];
    match e.check_invariants(&[]) {
        Ok(_) => tally.add("accepted: invariants hold after open"),
        Err(m) => {
            tally.add("ANOMALY accepted: invariants fail after open");
            notes.push(format!("invariants after open: {m}"));
        }
    }
    let mut ch = Channel::default();
    let chunk = [4096usize, 16384, 65536][rng.index(3)];
    let mut read_errors = 0;
    for off in (0..BACKING).step_by(chunk) {
        if read_range(&e, &mut ch, off, chunk).is_none() {
            read_errors += 1;
        }
    }
    if read_errors > 0 {
        tally.add("accepted: some reads report corrupt dirty data");
    }
    // Writes after the replayed log, then a flush: they must survive a reopen.
    let mut expect: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let mut flushed = true;
    for _ in 0..rng.range(1, 9) {
        let blocks = rng.range(1, 9);
        let off = rng.below(BACKING / BS - blocks + 1) * BS;
        let mut data = vec![0u8; (blocks * BS) as usize];
        rng.fill(&mut data);
        let ok = e.write(&mut ch, off, &data, false).is_ok();
        for (i, b) in data.chunks(BS as usize).enumerate() {
            let blk = off + i as u64 * BS;
            if ok {
                expect.insert(blk, b.to_vec());
            } else {
                expect.remove(&blk);
            }
        }
    }
    if e.flush().is_err() {
        flushed = false;
        tally.add("accepted: flush after writes is Busy");
    }
    if let Err(m) = e.check_invariants(&[&ch]) {
        tally.add("ANOMALY accepted: invariants fail after writes");
        notes.push(format!("invariants after writes: {m}"));
    }
    e.release_channel(&mut ch);
    let img = e.pmem().image();
    drop(e);
    let e = match Engine::open(
        SimPmem::from_image(img),
        &identity("format-props"),
        true,
        &config(),
    ) {
        Ok(e) => e,
        Err(err) => {
            tally.add("ANOMALY accepted: reopen after writes fails");
            notes.push(format!("reopen after writes: {err}"));
            return notes;
        }
    };
    if flushed {
        let mut lost = 0;
        for (&blk, want) in &expect {
            let mut buf = vec![0u8; BS as usize];
            match e.read(&mut ch, blk, &mut buf) {
                Ok(0) if buf == *want => {}
                Ok(n) => {
                    lost += 1;
                    if n > 0 {
                        e.fill(&mut ch, blk, &buf, false);
                    }
                }
                Err(_) => lost += 1,
            }
        }
        if lost > 0 {
            tally.add("ANOMALY accepted: flushed writes lost after reopen");
            notes.push(format!("{lost} flushed blocks lost after reopen"));
        } else {
            tally.add("accepted: flushed writes survive reopen");
        }
    }
    // Writeback everything (the backing device is a sink here), then GC.
    let mut b = WbBatch::default();
    for _ in 0..1000 {
        match e.writeback_next(&mut b) {
            WbNext::Ready => e.writeback_done(&b, true),
            WbNext::Idle => break,
            WbNext::Stopped(_) => {
                tally.add("accepted: writeback stopped");
                break;
            }
        }
    }
    let _ = e.gc(&mut Vec::new());
    if let Err(m) = e.check_invariants(&[]) {
        tally.add("ANOMALY accepted: invariants fail after writeback and GC");
        notes.push(format!("invariants after writeback/gc: {m}"));
    }
    notes
}

/// Opens `img` and, if accepted, exercises the engine. Counts outcomes in `tally`.
fn open_and_exercise(img: Vec<u8>, force: bool, rng: &mut Rng, tally: &Tally) -> Vec<String> {
    let pmem = SimPmem::from_image(img);
    let _ = probe(&pmem);
    match Engine::open(pmem, &identity("format-props"), force, &config()) {
        Err(e) => {
            tally.add(open_error_kind(&e));
            vec![]
        }
        Ok(e) => {
            tally.add("open: Ok");
            exercise(e, rng, tally)
        }
    }
}

#[test]
fn clean_image_reopens() {
    // Baseline for the damage properties: undamaged images reopen, keep every
    // invariant, and hold the writes made after the reopen.
    for seed in 0..32 {
        let mut rng = Rng::new(seed);
        let (img, _) = written_image(&mut rng);
        let tally = Tally::default();
        let notes = open_and_exercise(img, false, &mut rng, &tally);
        assert!(notes.is_empty(), "seed {seed}: {notes:?}");
        assert_eq!(tally.0.borrow().get("open: Ok"), Some(&1), "seed {seed}");
    }
}

#[test]
fn damaged_image_replay_never_panics() {
    run_seeds("damaged_image_replay_never_panics", |seed, tally| {
        let mut rng = Rng::new(seed);
        let (mut img, _) = written_image(&mut rng);
        let sites = kset_sites(&img);
        let what = damage(&mut img, &sites, &mut rng);
        let resealed = rng.chance(1, 2);
        if resealed {
            reseal_image(&mut img, &sites);
        }
        tally.add(if resealed {
            "mode: resealed"
        } else {
            "mode: raw"
        });
        let force = rng.chance(1, 2);
        let notes = open_and_exercise(img, force, &mut rng, tally);
        if !notes.is_empty() && env_u64("PROP_SEED").is_some() {
            println!("damage: {what:?}\nnotes: {notes:?}");
        }
        match notes.first() {
            Some(n) => Err(n.clone()),
            None => Ok(()),
        }
    });
}

#[test]
fn arbitrary_medium_never_panics() {
    // Media of any size and content, including too small ones and one whose only
    // valid object is a superblock (the rest random).
    run_seeds("arbitrary_medium_never_panics", |seed, tally| {
        let mut rng = Rng::new(seed);
        let size = match rng.below(3) {
            0 => rng.below(SEGMENTS_OFF + 1),
            _ => PMEM,
        } as usize;
        let mut img = vec![0u8; size];
        rng.fill(&mut img);
        if size as u64 == PMEM && rng.chance(3, 4) {
            let sb = Superblock {
                pmem_size: PMEM,
                seg_size: SEG,
                n_segs: NSEG,
                kset_keys: KEYS,
                format_id: rng.next_u64(),
                backing: identity("format-props"),
            };
            img[..SB_SIZE].copy_from_slice(&sb.encode(1));
            if rng.chance(1, 2) {
                let sites: Vec<u64> = (0..NSEG).map(|s| geometry(0).data_off(s, 0)).collect();
                reseal_image(&mut img, &sites);
            }
        }
        let _ = open_and_exercise(img, true, &mut rng, tally);
        Ok(())
    });
}

/// Whether the crafted-medium property includes the fault classes of the (fixed)
/// regression_* bugs; always on, kept as a switch for bisecting.
const KNOWN_BUGS: bool = true;

fn known_bugs() -> bool {
    KNOWN_BUGS || env_u64("PROP_KNOWN_BUGS") == Some(1)
}

/// Which kinds of damage a crafted medium carries; each is present in about one
/// medium in six, so about a third of the media are entirely well-formed.
#[derive(Debug, Default, Clone, Copy)]
struct Faults {
    /// Keys whose generation is ahead of their segment's.
    future_gen: bool,
    /// Keys with unknown flag bits.
    bad_flags: bool,
    /// Ksets with 0 or too many keys (the log ends there).
    bad_count: bool,
    /// LAST links to any segment (cycles, data segments).
    wild_links: bool,
    /// A dirty_tail anywhere.
    wild_dirty_tail: bool,
    /// Keys pointing into any segment, including log segments.
    wild_segments: bool,
    /// Keys at unaligned offsets and lengths.
    unaligned: bool,
    /// Keys whose data CRC is wrong.
    bad_crc: bool,
    /// Ksets that fill their segment to (almost) the end, leaving no room for a link.
    squeeze: bool,
    /// Log sequence numbers close to u64::MAX.
    huge_seq: bool,
    /// Segment generations close to u64::MAX (and u32::MAX).
    huge_gen: bool,
}

impl Faults {
    fn pick(rng: &mut Rng) -> Faults {
        let mut f = || rng.chance(1, 6);
        let mut faults = Faults {
            future_gen: f(),
            bad_flags: f(),
            bad_count: f(),
            wild_links: f(),
            wild_dirty_tail: f(),
            wild_segments: f(),
            unaligned: f(),
            bad_crc: f(),
            squeeze: f(),
            huge_seq: f(),
            huge_gen: f(),
        };
        if !known_bugs() {
            // Known engine bugs (see regression_*): sequence and generation overflow,
            // and a kset that leaves no room for the LAST link.
            faults.huge_seq = false;
            faults.huge_gen = false;
            faults.squeeze = false;
        }
        faults
    }
}

/// Builds a CRC-valid medium from scratch: superblock, cache_info, random segment
/// generations, and a log of random ksets (random keys, LAST links) with random
/// tails, damaged as `Faults::pick` decides.
fn crafted_image(rng: &mut Rng) -> (Vec<u8>, String) {
    let geo = geometry(rng.next_u64());
    let faults = Faults::pick(rng);
    let mut img = vec![0u8; PMEM as usize];
    fn put(img: &mut [u8], off: u64, b: &[u8]) {
        img[off as usize..off as usize + b.len()].copy_from_slice(b);
    }
    let sb = Superblock {
        pmem_size: PMEM,
        seg_size: SEG,
        n_segs: NSEG,
        kset_keys: KEYS,
        format_id: geo.format_id,
        backing: identity("format-props"),
    };
    put(&mut img, SB_OFF[0], &sb.encode(1));
    put(&mut img, SB_OFF[1], &sb.encode(1));
    let data_crc = rng.chance(1, 2);
    let info = CacheInfo {
        gc_percent: rng.below(96) as u32,
        flags: INFO_INIT_DONE | if data_crc { INFO_DATA_CRC } else { 0 },
        ..Default::default()
    };
    put(
        &mut img,
        INFO_OFF[rng.index(2)],
        &info.encode(rng.below(100)),
    );
    let gens: Vec<u64> = (0..NSEG)
        .map(|_| match rng.below(4) {
            0 if faults.huge_gen => u64::MAX - rng.below(2),
            1 if faults.huge_gen => u32::MAX as u64 + rng.below(2),
            _ => rng.below(4),
        })
        .collect();
    for s in 0..NSEG {
        let g = gens[s as usize];
        put(
            &mut img,
            geo.seg_base(s) + GEN_OFF[(g % 2) as usize],
            &encode_gen(s, g, g),
        );
        if g > 0 && rng.chance(1, 2) {
            put(
                &mut img,
                geo.seg_base(s) + GEN_OFF[((g - 1) % 2) as usize],
                &encode_gen(s, g - 1, g - 1),
            );
        }
    }
    // Segments for the log and for data.
    let mut perm: Vec<u32> = (0..NSEG).collect();
    rng.shuffle(&mut perm);
    let (log_pool, data_pool) = perm.split_at(4);
    let mut log_pool = log_pool[1..].to_vec();
    let mut bump = vec![0u64; NSEG as usize];
    let mut seq = if faults.huge_seq {
        u64::MAX - rng.below(8)
    } else {
        rng.range(1, 1000)
    };
    let mut seg = perm[0];
    let mut off = if rng.chance(1, 4) {
        rng.below((DATA - KSET_HDR as u64) / 8 + 1) * 8
    } else {
        0
    };
    let key_tail = LogPos {
        seq,
        seg,
        off: off as u32,
    };
    let mut positions = vec![key_tail];
    let mut notes = format!("{faults:?}; key_tail {key_tail:?};");
    for _ in 0..rng.below(40) {
        let tight = (DATA - off).saturating_sub(KSET_HDR as u64) / KEY_SIZE as u64;
        let count = match rng.below(20) {
            0 if faults.bad_count => 0,
            1 if faults.bad_count => KEYS + 1,
            // As many keys as fit in the rest of the segment: no room for a link.
            2..=4 if faults.squeeze && (1..=KEYS as u64).contains(&tight) => tight as u32,
            _ => rng.range(1, KEYS as u64 + 1) as u32,
        };
        let size = (KSET_HDR + KEY_SIZE * count as usize) as u64;
        let fits_with_link = off + size + 2 * KSET_HDR as u64 <= DATA;
        let squeeze = faults.squeeze && off + size <= DATA && rng.chance(1, 2);
        if !fits_with_link && !squeeze {
            if off + KSET_HDR as u64 > DATA {
                notes += " no room for LAST;";
                break;
            }
            let next = if (faults.wild_links && rng.chance(1, 3)) || log_pool.is_empty() {
                rng.below(NSEG as u64) as u32
            } else {
                log_pool.pop().unwrap()
            };
            let mut b = [0u8; KSET_HDR];
            seal_kset(
                &mut b,
                geo.format_id,
                KsetHdr {
                    seq,
                    flags: KSET_LAST,
                    count: next,
                },
            );
            put(&mut img, geo.data_off(seg, off), &b);
            notes += &format!(" LAST@{seg}:{off}->{next};");
            seq = seq.wrapping_add(1);
            seg = next;
            off = 0;
            positions.push(LogPos {
                seq,
                seg,
                off: off as u32,
            });
            continue;
        }
        let mut b = vec![0u8; size as usize];
        for i in 0..count as usize {
            let k = crafted_key(
                rng, &faults, &gens, data_pool, &mut bump, data_crc, &mut img,
            );
            k.encode(&mut b[KSET_HDR + i * KEY_SIZE..KSET_HDR + (i + 1) * KEY_SIZE]);
        }
        seal_kset(
            &mut b,
            geo.format_id,
            KsetHdr {
                seq,
                flags: 0,
                count,
            },
        );
        put(&mut img, geo.data_off(seg, off), &b);
        notes += &format!(" kset@{seg}:{off}x{count};");
        off += size;
        seq = seq.wrapping_add(1);
        positions.push(LogPos {
            seq,
            seg,
            off: off as u32,
        });
    }
    if off + KSET_HDR as u64 <= DATA {
        put(&mut img, geo.data_off(seg, off), &[0u8; KSET_HDR]);
    }
    let dirty_tail = if faults.wild_dirty_tail && rng.chance(1, 2) {
        LogPos {
            seq: rng.next_u64(),
            seg: rng.below(NSEG as u64) as u32,
            off: rng.below(DATA - KSET_HDR as u64) as u32,
        }
    } else {
        positions[rng.index(positions.len())]
    };
    notes += &format!(" dirty_tail {dirty_tail:?}");
    let (ks, ds) = (rng.index(2), rng.index(2));
    put(
        &mut img,
        KEY_TAIL_OFF[ks],
        &key_tail.encode(KIND_KEY_TAIL, 5),
    );
    put(
        &mut img,
        DIRTY_TAIL_OFF[ds],
        &dirty_tail.encode(KIND_DIRTY_TAIL, 5),
    );
    (img, notes)
}

/// A random key for a crafted log: valid and mostly fresh (sometimes stale), unless
/// `faults` asks for damage.
fn crafted_key(
    rng: &mut Rng,
    faults: &Faults,
    gens: &[u64],
    data_pool: &[u32],
    bump: &mut [u64],
    data_crc: bool,
    img: &mut [u8],
) -> KeyRec {
    let geo = geometry(0);
    let blocks = rng.range(1, 17);
    let (mut off, mut len) = (rng.below(BACKING / BS - blocks + 1) * BS, blocks * BS);
    if faults.unaligned && rng.chance(1, 4) {
        off = rng.below(BACKING - 1);
        len = rng.range(1, (BACKING - off).min(8192) + 1);
    }
    let mut flags = 0;
    if rng.chance(1, 6) {
        flags |= KEY_ZERO;
        if rng.chance(1, 2) {
            flags |= KEY_DISCARD;
        }
    }
    if rng.chance(1, 4) {
        flags |= KEY_CLEAN;
    }
    if faults.bad_flags && rng.chance(1, 20) {
        flags |= 1 << [0, 4, 9, 31][rng.index(4)];
    }
    let mut k = KeyRec {
        off,
        len: len as u32,
        flags,
        ..Default::default()
    };
    if k.has_data() {
        k.seg = if faults.wild_segments && rng.chance(1, 4) {
            rng.below(NSEG as u64) as u32
        } else {
            data_pool[rng.index(data_pool.len())]
        };
        let s = k.seg as usize;
        if bump[s] + len > DATA {
            bump[s] = 0;
        }
        k.seg_off = bump[s] as u32;
        bump[s] += len.div_ceil(BS) * BS;
        k.gen = match rng.below(20) {
            0 | 1 if gens[s] > 0 => gens[s] - 1,
            2 if faults.future_gen => gens[s].wrapping_add(1),
            _ => gens[s],
        };
        let at = geo.data_off(k.seg, k.seg_off as u64) as usize;
        rng.fill(&mut img[at..at + len as usize]);
        if data_crc {
            k.data_crc = crc(&img[at..at + len as usize]);
            if faults.bad_crc && rng.chance(1, 4) {
                k.data_crc ^= 1;
            }
        }
    }
    k
}

#[test]
fn crafted_medium_replay_never_panics() {
    run_seeds("crafted_medium_replay_never_panics", |seed, tally| {
        let mut rng = Rng::new(seed);
        let (img, layout) = crafted_image(&mut rng);
        let notes = open_and_exercise(img, false, &mut rng, tally);
        if !notes.is_empty() && env_u64("PROP_SEED").is_some() {
            println!("layout: {layout}\nnotes: {notes:?}");
        }
        match notes.first() {
            Some(n) => Err(n.clone()),
            None => Ok(()),
        }
    });
}

// ---------------------------------------------------------------------------------
// Minimal reproducers of engine bugs found by the properties above. They assert the
// correct behaviour and are ignored until the engine is fixed:
// `cargo test --test format_props known_bug -- --ignored`.
// ---------------------------------------------------------------------------------

/// A freshly formatted small medium (empty log: key_tail = dirty_tail = kset 1 at 0:0).
fn formatted(gc_percent: u32) -> (Vec<u8>, u64) {
    let format_id = 0x5eed;
    let mut fo = FormatOptions::new(identity("format-props"), format_id);
    fo.seg_size = SEG;
    fo.kset_keys = KEYS;
    fo.gc_percent = gc_percent;
    let e = Engine::format(SimPmem::new(PMEM), &fo, &config()).expect("format");
    (e.pmem().image(), format_id)
}

fn put_tails(img: &mut [u8], key: LogPos, dirty: LogPos) {
    // Slot 1 with replica sequence 2 supersedes the formatted slot 0 (sequence 1).
    let (k, d) = (KEY_TAIL_OFF[1] as usize, DIRTY_TAIL_OFF[1] as usize);
    img[k..k + TAIL_SIZE].copy_from_slice(&key.encode(KIND_KEY_TAIL, 2));
    img[d..d + TAIL_SIZE].copy_from_slice(&dirty.encode(KIND_DIRTY_TAIL, 2));
}

/// Opens `img`, writes one block and flushes; a panic fails the caller's test.
fn open_write_flush(img: Vec<u8>) -> Result<Engine<SimPmem>, String> {
    let e = Engine::open(
        SimPmem::from_image(img),
        &identity("format-props"),
        false,
        &config(),
    )
    .map_err(|e| e.to_string())?;
    let mut ch = Channel::default();
    e.write(&mut ch, 0, &[7u8; BS as usize], false)
        .map_err(|e| e.to_string())?;
    e.release_channel(&mut ch);
    e.flush().map_err(|e| e.to_string())?;
    Ok(e)
}

#[test]
fn regression_tail_seq_near_max_overflows_on_close() {
    // CRC-valid tails whose kset sequence is u64::MAX, over the formatted empty log.
    // Open accepts them; the next kset close computes seq + 1 and panics (overflow
    // checks) or wraps to 0 (release), after which replay cannot follow the log.
    let (mut img, _) = formatted(70);
    let t = LogPos {
        seq: u64::MAX,
        seg: 0,
        off: 0,
    };
    put_tails(&mut img, t, t);
    let r = catch_unwind(AssertUnwindSafe(|| open_write_flush(img).map(|_| ())));
    assert!(r.is_ok(), "open + write + flush panicked");
}

#[test]
fn regression_kset_seq_max_overflows_in_replay() {
    // Tails at kset u64::MAX and a valid one-key kset carrying that sequence: replay
    // computes pos.seq + 1 and panics instead of returning Corrupt.
    let (mut img, format_id) = formatted(70);
    let t = LogPos {
        seq: u64::MAX,
        seg: 0,
        off: 0,
    };
    put_tails(&mut img, t, t);
    let geo = geometry(format_id);
    let mut b = vec![0u8; KSET_HDR + KEY_SIZE];
    KeyRec {
        off: 0,
        len: BS as u32,
        flags: KEY_ZERO,
        ..Default::default()
    }
    .encode(&mut b[KSET_HDR..]);
    seal_kset(
        &mut b,
        format_id,
        KsetHdr {
            seq: u64::MAX,
            flags: 0,
            count: 1,
        },
    );
    let at = geo.data_off(0, 0) as usize;
    img[at..at + b.len()].copy_from_slice(&b);
    let r = catch_unwind(AssertUnwindSafe(|| {
        Engine::open(
            SimPmem::from_image(img),
            &identity("format-props"),
            false,
            &config(),
        )
        .map(|_| ())
    }));
    assert!(r.is_ok(), "open panicked");
}

#[test]
fn regression_gen_max_overflows_on_reclaim() {
    // Every segment's generation records say u64::MAX (CRC-valid). Open accepts them;
    // the first reclaim computes gen + 1 and panics (or wraps to 0 in release, making
    // every stale key of the segment look fresh again).
    let (mut img, _) = formatted(0);
    let geo = geometry(0);
    for s in 0..NSEG {
        for o in GEN_OFF {
            let at = (geo.seg_base(s) + o) as usize;
            img[at..at + GEN_SIZE].copy_from_slice(&encode_gen(s, u64::MAX, u64::MAX));
        }
    }
    let r = catch_unwind(AssertUnwindSafe(|| {
        // Fixed: open refuses such generations as corrupt.
        let Ok(e) = open_write_flush(img) else {
            return 0;
        };
        let mut b = WbBatch::default();
        while e.writeback_next(&mut b) == WbNext::Ready {
            e.writeback_done(&b, true);
        }
        e.gc(&mut Vec::new()).ksets
    }));
    assert!(r.is_ok(), "writeback + GC panicked");
}

/// A medium whose key_tail points at a valid 8-key kset that ends exactly at the end
/// of segment `seg`'s data area (no room for the LAST link a close needs).
fn kset_filling_segment(seg: u32) -> Vec<u8> {
    let (mut img, format_id) = formatted(70);
    let geo = geometry(format_id);
    let size = KSET_HDR + KEY_SIZE * KEYS as usize;
    let off = DATA - size as u64;
    let mut b = vec![0u8; size];
    for i in 0..KEYS as usize {
        KeyRec {
            off: (i as u64 + 100) * BS,
            len: BS as u32,
            flags: KEY_ZERO,
            ..Default::default()
        }
        .encode(&mut b[KSET_HDR + i * KEY_SIZE..KSET_HDR + (i + 1) * KEY_SIZE]);
    }
    seal_kset(
        &mut b,
        format_id,
        KsetHdr {
            seq: 1,
            flags: 0,
            count: KEYS,
        },
    );
    let at = geo.data_off(seg, off) as usize;
    img[at..at + size].copy_from_slice(&b);
    let t = LogPos {
        seq: 1,
        seg,
        off: off as u32,
    };
    put_tails(&mut img, t, t);
    img
}

#[test]
fn regression_kset_filling_segment_loses_later_writes() {
    // Replay ends with the head at offset DATA of segment 0. The next close writes its
    // LAST link at that offset, i.e. over segment 1's generation record, and the new
    // kset in another segment; replay can never read a kset at offset DATA, so on the
    // next open everything written after the first open is gone.
    let img = kset_filling_segment(0);
    // Fixed: such a kset is corruption, reported at open instead of losing writes.
    let e = match open_write_flush(img) {
        Err(m) if m.contains("overruns its segment") => return,
        Err(m) => panic!("unexpected error: {m}"),
        Ok(e) => e,
    };
    let img = e.pmem().image();
    drop(e);
    let e = Engine::open(
        SimPmem::from_image(img),
        &identity("format-props"),
        false,
        &config(),
    )
    .expect("reopen");
    let mut ch = Channel::default();
    let mut buf = vec![0u8; BS as usize];
    let missed = e.read(&mut ch, 0, &mut buf).unwrap();
    assert_eq!(
        (missed, buf[0]),
        (0, 7),
        "the flushed write at 0 is lost after reopen"
    );
}

#[test]
fn regression_kset_filling_last_segment_writes_out_of_bounds() {
    let img = kset_filling_segment(NSEG - 1);
    let r = catch_unwind(AssertUnwindSafe(|| open_write_flush(img).map(|_| ())));
    assert!(
        r.is_ok(),
        "open + write + flush panicked (pmem access out of bounds)"
    );
}

#[test]
fn regression_long_backing_id_fails_format() {
    // Superblock::encode truncates the id to BACKING_ID_MAX bytes (possibly inside a
    // UTF-8 character); open compares the stored id with the full one, so format's
    // own open fails with WrongBacking (e.g. a `loop:<long path>@0` identity).
    for id in [
        "x".repeat(BACKING_ID_MAX + 1),
        format!("{}é", "x".repeat(127)),
    ] {
        let backing = BackingIdentity {
            id: id.clone(),
            ..identity("format-props")
        };
        let mut fo = FormatOptions::new(backing, 1);
        fo.seg_size = SEG;
        fo.kset_keys = KEYS;
        let r = Engine::format(SimPmem::new(PMEM), &fo, &config());
        assert!(r.is_ok(), "id of {} bytes: {:?}", id.len(), r.err());
    }
}
