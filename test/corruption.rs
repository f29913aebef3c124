//! The corruption classes upstream dm-pcache had to fix after its merge into Linux
//! 6.18, each as a named case against pcache's own on-media format (issue 21, item 4):
//!
//! - a kset chain that loops (LAST links back into the log, or into itself);
//! - a tail or a kset that overruns its segment;
//! - key offsets or lengths beyond the backing device or the segment;
//! - segment numbers beyond the geometry (in keys, LAST links, tails, generations,
//!   the superblock);
//! - a dirty_tail that does not chain to key_tail;
//! - gc_percent out of range on the medium;
//! - the dual-replica ordering rule: a metadata update never overwrites the replica
//!   that is current, checked persistence point by persistence point.
//!
//! Each case starts from a real medium (formatted and written by the engine on the
//! tiny simulated geometry, with a log over several segments), damages exactly the
//! field the class names, re-seals the CRC so the damage reaches the field checks and
//! replay (a CRC failure would hide them), and opens it. Every case states which of
//! two verdicts it expects:
//!
//! - refused: `Engine::open` returns an error whose message names the damage;
//! - safe replay: the medium opens, every block reads as a value that block really
//!   had (never garbage, never another block's data), and a write and a flush after
//!   it survive a reopen with every segment header still valid.
//!
//! A panic anywhere fails the case. The same classes are seeds of the replay fuzz
//! target (`fuzz/seeds/replay/`, written by `fuzz/make_seeds.py`).

use pcache::engine::format::{
    check_kset, crc, decode_gen, get_u32, pick_replica, put_u32, put_u64, CacheInfo, FlushRec,
    KeyRec, KsetCheck, KsetHdr, LogPos, MediaError, Superblock, DIRTY_TAIL_OFF, FLUSH_REC_OFF,
    FLUSH_REC_SIZE, GEN_OFF, GEN_SIZE, INFO_OFF, INFO_SIZE, KEY_SIZE, KEY_TAIL_OFF, KEY_ZERO,
    KIND_DIRTY_TAIL, KIND_KEY_TAIL, KSET_HDR, KSET_LAST, KSET_MAGIC, SB_OFF, SB_SIZE, SEGMENTS_OFF,
    SEG_HDR, TAIL_SIZE,
};
use pcache::engine::{Channel, Engine, FormatOptions, WbBatch, WbNext};
use pcache::env::sim::pmem::SimPmem;
use pcache::env::sim::tiny::{
    config, geometry, identity, BACKING, BS, DATA, KEYS, NSEG, PMEM, SEG,
};
use std::panic::{catch_unwind, AssertUnwindSafe};

const FORMAT_ID: u64 = 0xc0_4447;
const ID: &str = "corruption";
/// Blocks the written medium touches (at the start of the backing device).
const BLOCKS: u64 = 64;

// ---------------------------------------------------------------------------------
// A written medium and its content model.
// ---------------------------------------------------------------------------------

/// Content of block `blk` after write version `v` (0 = zeros, the initial content and
/// what write-zeroes and discards leave): every 8-byte word names version and block.
fn pattern(v: u64, blk: u64) -> Vec<u8> {
    let w = if v == 0 { 0 } else { (v << 24) | blk };
    w.to_le_bytes().repeat(BS as usize / 8)
}

/// Which version a block holds; Err for garbage or another block's data.
fn version_of(blk: u64, b: &[u8]) -> Result<u64, String> {
    let w = u64::from_le_bytes(b[..8].try_into().unwrap());
    if b.chunks_exact(8).any(|c| c != w.to_le_bytes()) {
        return Err(format!("block {blk}: garbage"));
    }
    if w != 0 && w & 0xff_ffff != blk {
        return Err(format!("block {blk}: holds block {}'s data", w & 0xff_ffff));
    }
    Ok(w >> 24)
}

/// A medium the engine wrote, and per block every version it ever held.
struct Medium {
    img: Vec<u8>,
    hist: Vec<Vec<u64>>,
}

/// 700 flushed operations over 64 blocks: one in six writes a block with a fresh
/// version, the others write zeroes or discard (keys without data), so the log (one
/// kset per flush) spans several segments while the data fits the cache without
/// writeback: the backing device stays all zeros and the model stays simple.
fn written() -> Medium {
    let mut fo = FormatOptions::new(identity(ID), FORMAT_ID);
    fo.seg_size = SEG;
    fo.kset_keys = KEYS;
    fo.data_crc = true;
    fo.gc_percent = 70;
    let e = Engine::format(SimPmem::new(PMEM), &fo, &config()).expect("format");
    let mut ch = Channel::default();
    let mut hist = vec![vec![0u64]; BLOCKS as usize];
    for i in 0..700u64 {
        if i % 6 == 0 {
            let blk = (i * 7) % BLOCKS;
            e.write(&mut ch, blk * BS, &pattern(i + 1, blk), false)
                .expect("write");
            hist[blk as usize].push(i + 1);
        } else {
            let blk = (i * 5) % BLOCKS;
            e.write_zeroes(blk * BS, BS, i % 2 == 0, false)
                .expect("write_zeroes");
            hist[blk as usize].push(0);
        }
        e.flush().expect("flush");
    }
    e.release_channel(&mut ch);
    Medium {
        img: e.pmem().image(),
        hist,
    }
}

/// A formatted medium with an empty log, and its (all-zero) model.
fn formatted() -> Medium {
    let mut fo = FormatOptions::new(identity(ID), FORMAT_ID);
    fo.seg_size = SEG;
    fo.kset_keys = KEYS;
    fo.gc_percent = 70;
    let e = Engine::format(SimPmem::new(PMEM), &fo, &config()).expect("format");
    Medium {
        img: e.pmem().image(),
        hist: vec![vec![0u64]; BLOCKS as usize],
    }
}

/// A kset of the live log: where it is and its header.
#[derive(Clone, Copy, Debug)]
struct Site {
    pos: LogPos,
    hdr: KsetHdr,
    /// Medium offset of its header.
    at: usize,
}

fn tail_of(img: &[u8], offs: [u64; 2], kind: u16) -> LogPos {
    let dec = |o: u64| LogPos::decode(&img[o as usize..o as usize + TAIL_SIZE], kind, NSEG, DATA);
    pick_replica([dec(offs[0]), dec(offs[1])]).expect("tail").2
}

/// The live log from key_tail, kset by kset, as replay walks it.
fn chain(img: &[u8]) -> Vec<Site> {
    let geo = geometry(FORMAT_ID);
    let mut pos = tail_of(img, KEY_TAIL_OFF, KIND_KEY_TAIL);
    let mut v = vec![];
    loop {
        let at = geo.data_off(pos.seg, pos.off as u64) as usize;
        let n = ((DATA - pos.off as u64) as usize).min(geo.kset_max_size());
        match check_kset(&img[at..at + n], &geo, pos.seq) {
            Ok(KsetCheck::Valid(hdr)) => {
                v.push(Site { pos, hdr, at });
                pos = pos.after(&hdr);
            }
            _ => return v,
        }
    }
}

/// The position after the last kset of the log (where the next one would go).
fn log_end(img: &[u8]) -> LogPos {
    let c = chain(img);
    let last = c.last().expect("a non-empty log");
    last.pos.after(&last.hdr)
}

/// Re-seals the kset at medium offset `at` over the size its header claims (bounded
/// by its segment), as a writer that made a valid kset of the damaged fields would.
fn reseal_kset(img: &mut [u8], at: usize) {
    let in_seg = (at as u64 - SEGMENTS_OFF) % SEG as u64 - SEG_HDR;
    let size = if get_u32(img, at + 16) & KSET_LAST != 0 {
        KSET_HDR
    } else {
        KSET_HDR + KEY_SIZE * get_u32(img, at + 20) as usize
    };
    let size = size.min((DATA - in_seg) as usize);
    let c = crc(&img[at + 4..at + size]);
    put_u32(img, at, c);
}

/// Re-seals the sealed metadata object of `n` bytes at `off`.
fn reseal_obj(img: &mut [u8], off: u64, n: usize) {
    let o = off as usize;
    let c = crc(&img[o + 4..o + n]);
    put_u32(img, o, c);
}

/// Writes `pos` into both replicas of a tail, the second newest (so it is current).
fn set_tail(img: &mut [u8], kind: u16, pos: LogPos) {
    let offs = if kind == KIND_KEY_TAIL {
        KEY_TAIL_OFF
    } else {
        DIRTY_TAIL_OFF
    };
    for (i, o) in offs.iter().enumerate() {
        let o = *o as usize;
        img[o..o + TAIL_SIZE].copy_from_slice(&pos.encode(kind, 100 + i as u64));
    }
}

/// Patches key `k` of the kset at `site` with `f` and re-seals the kset.
fn patch_key(img: &mut [u8], site: &Site, k: usize, f: impl FnOnce(&mut KeyRec)) {
    let o = site.at + KSET_HDR + k * KEY_SIZE;
    let mut key = KeyRec::decode(&img[o..o + KEY_SIZE], &geometry(FORMAT_ID)).expect("key");
    f(&mut key);
    key.encode(&mut img[o..o + KEY_SIZE]);
    reseal_kset(img, site.at);
}

/// The first kset of the log holding a key with data, and that key's index.
fn data_key(img: &[u8]) -> (Site, usize) {
    let geo = geometry(FORMAT_ID);
    for s in chain(img) {
        for k in 0..if s.hdr.is_last() {
            0
        } else {
            s.hdr.count as usize
        } {
            let o = s.at + KSET_HDR + k * KEY_SIZE;
            if KeyRec::decode(&img[o..o + KEY_SIZE], &geo).unwrap().flags & KEY_ZERO == 0 {
                return (s, k);
            }
        }
    }
    panic!("no key with data in the log")
}

/// The last LAST link of the log (in a segment other than the log's first when the
/// log spans three segments or more).
fn last_link(img: &[u8]) -> Site {
    *chain(img)
        .iter()
        .rev()
        .find(|s| s.hdr.is_last())
        .expect("the log spans segments")
}

// ---------------------------------------------------------------------------------
// Verdicts.
// ---------------------------------------------------------------------------------

#[derive(Debug)]
enum Verdict {
    Refused(String),
    SafeReplay,
}

fn open(img: Vec<u8>) -> Result<Engine<SimPmem>, String> {
    Engine::open(SimPmem::from_image(img), &identity(ID), false, &config())
        .map_err(|e| e.to_string())
}

/// Reads every block of the model; each must hold a version it really had.
fn check_reads(e: &Engine<SimPmem>, hist: &[Vec<u64>]) -> Result<(), String> {
    let mut ch = Channel::default();
    for blk in 0..BLOCKS {
        let mut buf = vec![0xa5u8; BS as usize];
        let missed = e
            .read(&mut ch, blk * BS, &mut buf)
            .map_err(|x| format!("read {blk}: {x:?}"))?;
        if missed > 0 {
            buf.fill(0); // the backing device is all zeros
        }
        let v = version_of(blk, &buf)?;
        if !hist[blk as usize].contains(&v) {
            return Err(format!(
                "block {blk} reads version {v}, which it never held"
            ));
        }
    }
    Ok(())
}

/// Every segment's generation record still decodes (a write past a segment's end
/// would land on the next segment's header).
fn check_gens(img: &[u8]) -> Result<(), String> {
    let geo = geometry(FORMAT_ID);
    for s in 0..NSEG {
        let slot = |i: usize| {
            let o = (geo.seg_base(s) + GEN_OFF[i]) as usize;
            decode_gen(&img[o..o + GEN_SIZE], s)
        };
        pick_replica([slot(0), slot(1)]).map_err(|e| format!("segment {s} header: {e}"))?;
    }
    Ok(())
}

/// Opens `img`; if accepted, checks the reads, writes two blocks, flushes, reopens
/// and reads them back. Any panic is caught and returned as an error.
fn verdict(img: Vec<u8>, hist: &[Vec<u64>]) -> Result<Verdict, String> {
    let r = catch_unwind(AssertUnwindSafe(|| -> Result<Verdict, String> {
        let e = match open(img) {
            Err(m) => return Ok(Verdict::Refused(m)),
            Ok(e) => e,
        };
        e.check_invariants(&[])
            .map_err(|m| format!("invariants after open: {m}"))?;
        check_reads(&e, hist)?;
        let mut ch = Channel::default();
        let new = 1 << 30;
        for blk in [1, BLOCKS - 1] {
            e.write(&mut ch, blk * BS, &pattern(new, blk), false)
                .map_err(|x| format!("write after open: {x:?}"))?;
        }
        e.release_channel(&mut ch);
        e.flush().map_err(|x| format!("flush after open: {x:?}"))?;
        let img = e.pmem().image();
        check_gens(&img)?;
        let e = open(img).map_err(|m| format!("reopen after a write: {m}"))?;
        let mut hist2 = vec![vec![]; BLOCKS as usize];
        hist2[1] = vec![new];
        hist2[BLOCKS as usize - 1] = vec![new];
        for blk in [1, BLOCKS - 1] {
            let mut buf = vec![0u8; BS as usize];
            let missed = e
                .read(&mut ch, blk * BS, &mut buf)
                .map_err(|x| format!("{x:?}"))?;
            if missed > 0 || version_of(blk, &buf)? != new {
                return Err(format!(
                    "block {blk}: a flushed write after open is lost on reopen"
                ));
            }
        }
        Ok(Verdict::SafeReplay)
    }));
    r.map_err(|p| {
        let m = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("panicked: {m}")
    })?
}

/// The case must be refused with a message containing `needle`.
fn refused(case: &str, img: Vec<u8>, hist: &[Vec<u64>], needle: &str) {
    match verdict(img, hist) {
        Ok(Verdict::Refused(m)) if m.contains(needle) => println!("{case}: refused: {m}"),
        Ok(Verdict::Refused(m)) => {
            panic!("{case}: refused, but the message does not say '{needle}': {m}")
        }
        Ok(Verdict::SafeReplay) => panic!("{case}: accepted; expected a refusal naming '{needle}'"),
        Err(m) => panic!("{case}: {m}"),
    }
}

/// The case must replay safely (reads are values the blocks had, later writes last).
fn safe(case: &str, img: Vec<u8>, hist: &[Vec<u64>]) {
    match verdict(img, hist) {
        Ok(Verdict::SafeReplay) => println!("{case}: safe replay"),
        Ok(Verdict::Refused(m)) => panic!("{case}: refused ({m}); expected a safe replay"),
        Err(m) => panic!("{case}: {m}"),
    }
}

/// Either verdict is right, as long as it is one of them.
fn refused_or_safe(case: &str, img: Vec<u8>, hist: &[Vec<u64>]) {
    match verdict(img, hist) {
        Ok(v) => println!("{case}: {v:?}"),
        Err(m) => panic!("{case}: {m}"),
    }
}

// ---------------------------------------------------------------------------------
// The cases.
// ---------------------------------------------------------------------------------

#[test]
fn control_written_medium_replays_exactly() {
    // The base every case damages: it must open and read every block's newest
    // version (so a case's refusal is the damage's doing, not the base's).
    let m = written();
    assert!(chain(&m.img).iter().filter(|s| s.hdr.is_last()).count() >= 1);
    let e = open(m.img.clone()).expect("open");
    let newest: Vec<Vec<u64>> = m.hist.iter().map(|h| vec![*h.last().unwrap()]).collect();
    check_reads(&e, &newest).expect("exact reads");
    safe("control", m.img, &m.hist);
}

/// The flush record (which ksets' unsynced keys a backing FLUSH covered): absent on
/// media from before it (all-zero replicas, what `written` has: it holds no unsynced
/// key), it replays exactly; one damaged replica falls back to the other; both damaged,
/// or a resealed one with an impossible field, is refused by name. A medium whose
/// record lost track of an unsynced key drops that key (its block reads from the
/// backing device), never serves it.
#[test]
fn flush_record_damage() {
    let m = written();
    let at = |i: usize| FLUSH_REC_OFF[i] as usize;
    assert!(
        m.img[at(0)..at(1) + FLUSH_REC_SIZE].iter().all(|&b| b == 0),
        "a write-back medium never writes the record"
    );
    safe(
        "no flush record (media from before it)",
        m.img.clone(),
        &m.hist,
    );
    let rec = FlushRec {
        through: 5,
        drop_lo: 2,
        drop_hi: 3,
    };
    let mut img = m.img.clone();
    img[at(0)..at(0) + FLUSH_REC_SIZE].copy_from_slice(&rec.encode(1));
    safe("a valid flush record", img.clone(), &m.hist);
    let mut one = img.clone();
    one[at(1) + 20] ^= 0x40;
    safe("flush record: the unwritten replica damaged", one, &m.hist);
    let mut one = img.clone();
    one[at(0) + 20] ^= 0x40;
    safe(
        "flush record: the written replica damaged (the zero one stands)",
        one,
        &m.hist,
    );
    let mut both = img.clone();
    both[at(0) + 20] ^= 0x40;
    both[at(1) + 9] = 1;
    refused(
        "flush record: both replicas damaged",
        both,
        &m.hist,
        "flush record",
    );
    for (field, off, v) in [
        ("drop_lo", 24usize, 9u64),
        ("through", 16, u64::MAX),
        ("drop_hi", 32, 1 << 62),
    ] {
        let mut bad = img.clone();
        for i in 0..2 {
            bad[at(i)..at(i) + FLUSH_REC_SIZE].copy_from_slice(&rec.encode(1 + i as u64));
            put_u64(&mut bad, at(i) + off, v);
            reseal_obj(&mut bad, FLUSH_REC_OFF[i], FLUSH_REC_SIZE);
        }
        refused(
            &format!("flush record: {field} out of range"),
            bad,
            &m.hist,
            field,
        );
    }
}

/// A data key marked unsynced in a kset the flush record does not cover is dropped at
/// replay: its block reads an older value (here the backing device's zeros), never the
/// unsynced copy, and the medium stays consistent (a write and reopen after it work).
#[test]
fn unsynced_key_without_a_covering_flush_is_dropped() {
    let m = written();
    let (site, k) = data_key(&m.img);
    let mut img = m.img.clone();
    patch_key(&mut img, &site, k, |key| {
        key.flags |= pcache::engine::format::KEY_CLEAN | pcache::engine::format::KEY_UNSYNCED
    });
    let e = open(img.clone()).expect("open");
    assert_eq!(e.replay_unsynced_dropped(), 1);
    drop(e);
    safe("an unsynced key no FLUSH covers", img.clone(), &m.hist);
    // Without KEY_CLEAN the flag is corruption.
    let mut bad = m.img.clone();
    patch_key(&mut bad, &site, k, |key| {
        key.flags |= pcache::engine::format::KEY_UNSYNCED
    });
    refused("an unsynced dirty key", bad, &m.hist, "unsynced");
}

#[test]
fn kset_chain_loops() {
    let m = written();
    let first = chain(&m.img)[0];
    let link = last_link(&m.img);
    assert_ne!(
        first.pos.seg, link.pos.seg,
        "the log must span three segments"
    );
    // A LAST link back to the log's first segment: following it would replay the log
    // again and again (dm-pcache looped forever on such a chain).
    let mut img = m.img.clone();
    put_u32(&mut img, link.at + 20, first.pos.seg);
    reseal_kset(&mut img, link.at);
    refused("loop back to the first log segment", img, &m.hist, "cycle");
    // A LAST link to its own segment.
    let mut img = m.img.clone();
    put_u32(&mut img, link.at + 20, link.pos.seg);
    reseal_kset(&mut img, link.at);
    refused("LAST link to its own segment", img, &m.hist, "cycle");
    // A LAST link into a segment that holds cached data: that segment cannot also
    // be log, whatever it happens to contain.
    let (ds, k) = data_key(&m.img);
    let o = ds.at + KSET_HDR + k * KEY_SIZE;
    let data_seg = get_u32(&m.img, o + 16);
    let mut img = m.img.clone();
    put_u32(&mut img, link.at + 20, data_seg);
    reseal_kset(&mut img, link.at);
    refused_or_safe("LAST link into a data segment", img, &m.hist);
}

#[test]
fn tail_overruns_segment() {
    let m = written();
    let kt = tail_of(&m.img, KEY_TAIL_OFF, KIND_KEY_TAIL);
    for (case, off) in [
        (
            "key_tail offset past the last header slot",
            DATA as u32 - KSET_HDR as u32 + 8,
        ),
        ("key_tail offset at the data area's end", DATA as u32),
        ("key_tail offset u32::MAX", u32::MAX),
    ] {
        let mut img = m.img.clone();
        set_tail(&mut img, KIND_KEY_TAIL, LogPos { off, ..kt });
        refused(case, img, &m.hist, "offset");
    }
    let mut img = m.img.clone();
    let dt = tail_of(&m.img, DIRTY_TAIL_OFF, KIND_DIRTY_TAIL);
    set_tail(
        &mut img,
        KIND_DIRTY_TAIL,
        LogPos {
            off: DATA as u32,
            ..dt
        },
    );
    refused(
        "dirty_tail offset at the data area's end",
        img,
        &m.hist,
        "offset",
    );
}

#[test]
fn tail_at_segment_end_replays_safely() {
    // An empty log whose tails sit where little or no room is left before the
    // segment's end (and at an unaligned offset): valid positions, so replay must
    // accept them, and the next kset close must not write past the segment (into the
    // next segment's header, or past the medium for the last segment).
    let m = formatted();
    for seg in [0, 5, NSEG - 1] {
        for back in [
            KSET_HDR,
            KSET_HDR + 8,
            KSET_HDR + 3,
            2 * KSET_HDR + KEY_SIZE,
            3 * KSET_HDR + KEY_SIZE,
            2 * KSET_HDR + 2 * KEY_SIZE + 5,
        ] {
            let t = LogPos {
                seq: 1,
                seg,
                off: (DATA as usize - back) as u32,
            };
            let mut img = m.img.clone();
            set_tail(&mut img, KIND_KEY_TAIL, t);
            set_tail(&mut img, KIND_DIRTY_TAIL, t);
            safe(
                &format!("empty log at segment {seg}, {back} bytes before its end"),
                img,
                &m.hist,
            );
        }
    }
}

#[test]
fn kset_overruns_segment() {
    let m = formatted();
    let geo = geometry(FORMAT_ID);
    // An authentic kset that ends where its segment ends leaves no room for the LAST
    // link a close needs: the log could never continue past it.
    let size = KSET_HDR + KEY_SIZE * KEYS as usize;
    for (case, back, count, expect_refusal) in [
        (
            "authentic full kset ending at the segment's end",
            size,
            KEYS,
            true,
        ),
        (
            "kset claiming keys past the segment's end",
            size - KEY_SIZE,
            KEYS,
            false,
        ),
        (
            "kset claiming more keys than a kset holds",
            size + 4 * KEY_SIZE,
            KEYS + 1,
            false,
        ),
        (
            "kset claiming u32::MAX keys",
            size + 4 * KEY_SIZE,
            u32::MAX,
            false,
        ),
    ] {
        let seg = 3;
        let off = DATA as usize - back;
        let mut img = m.img.clone();
        let at = geo.data_off(seg, off as u64) as usize;
        for i in 0..(count.min(KEYS) as usize).min((back - KSET_HDR) / KEY_SIZE) {
            KeyRec {
                off: (i as u64 + 20) * BS,
                len: BS as u32,
                flags: KEY_ZERO,
                ..Default::default()
            }
            .encode(&mut img[at + KSET_HDR + i * KEY_SIZE..]);
        }
        put_u32(&mut img, at + 4, KSET_MAGIC);
        put_u64(&mut img, at + 8, 1);
        put_u32(&mut img, at + 16, 0);
        put_u32(&mut img, at + 20, count);
        put_u64(&mut img, at + 24, FORMAT_ID);
        reseal_kset(&mut img, at);
        let t = LogPos {
            seq: 1,
            seg,
            off: off as u32,
        };
        set_tail(&mut img, KIND_KEY_TAIL, t);
        set_tail(&mut img, KIND_DIRTY_TAIL, t);
        if expect_refusal {
            refused(case, img, &m.hist, "overruns its segment");
        } else {
            // Not verifiable (its CRC would cover bytes it does not have): the end of
            // the log, like a torn write.
            safe(case, img, &m.hist);
        }
    }
}

#[test]
fn key_beyond_device_or_segment() {
    let m = written();
    let (site, k) = data_key(&m.img);
    type Patch = fn(&mut KeyRec);
    let cases: [(&str, Patch, &str); 8] = [
        ("key offset at the device's end", |k| k.off = BACKING, "off"),
        (
            "key running past the device's end",
            |k| k.off = BACKING - BS / 2,
            "off",
        ),
        (
            "key offset near u64::MAX (overflow)",
            |k| k.off = u64::MAX - 100,
            "off",
        ),
        ("key length 0", |k| k.len = 0, "len"),
        ("key length over 4 MiB", |k| k.len = 8 << 20, "len"),
        ("key length u32::MAX", |k| k.len = u32::MAX, "len"),
        (
            "key data running past its segment",
            |k| k.seg_off = DATA as u32 - BS as u32 / 2,
            "segment offset",
        ),
        (
            "key segment offset u32::MAX",
            |k| k.seg_off = u32::MAX,
            "segment offset",
        ),
    ];
    for (case, f, needle) in cases {
        let mut img = m.img.clone();
        patch_key(&mut img, &site, k, f);
        refused(case, img, &m.hist, needle);
    }
}

#[test]
fn segment_beyond_geometry() {
    let m = written();
    let (site, k) = data_key(&m.img);
    for (case, seg) in [
        ("key segment = n_segs", NSEG),
        ("key segment u32::MAX", u32::MAX),
    ] {
        let mut img = m.img.clone();
        patch_key(&mut img, &site, k, |key| key.seg = seg);
        refused(case, img, &m.hist, "segment");
    }
    let link = last_link(&m.img);
    for (case, seg) in [
        ("LAST link to segment n_segs", NSEG),
        ("LAST link to u32::MAX", u32::MAX),
    ] {
        let mut img = m.img.clone();
        put_u32(&mut img, link.at + 20, seg);
        reseal_kset(&mut img, link.at);
        refused(case, img, &m.hist, "next segment");
    }
    let kt = tail_of(&m.img, KEY_TAIL_OFF, KIND_KEY_TAIL);
    let mut img = m.img.clone();
    set_tail(&mut img, KIND_KEY_TAIL, LogPos { seg: NSEG, ..kt });
    refused("key_tail segment = n_segs", img, &m.hist, "segment");
    let dt = tail_of(&m.img, DIRTY_TAIL_OFF, KIND_DIRTY_TAIL);
    let mut img = m.img.clone();
    set_tail(
        &mut img,
        KIND_DIRTY_TAIL,
        LogPos {
            seg: u32::MAX,
            ..dt
        },
    );
    refused("dirty_tail segment u32::MAX", img, &m.hist, "segment");
    // A generation record naming another segment (both replicas).
    let geo = geometry(FORMAT_ID);
    let mut img = m.img.clone();
    for o in GEN_OFF {
        let at = geo.seg_base(4) + o;
        put_u32(&mut img, at as usize + 16, NSEG + 4);
        reseal_obj(&mut img, at, GEN_SIZE);
    }
    refused(
        "generation record of segment n_segs + 4",
        img,
        &m.hist,
        "segment id",
    );
    // A superblock whose segments do not fit the medium (both replicas).
    let mut img = m.img.clone();
    for o in SB_OFF {
        put_u32(&mut img, o as usize + 36, NSEG * 100);
        reseal_obj(&mut img, o, SB_SIZE);
    }
    refused(
        "superblock n_segs beyond the medium",
        img,
        &m.hist,
        "n_segs",
    );
}

#[test]
fn dirty_tail_off_the_chain() {
    let m = written();
    let c = chain(&m.img);
    assert!(c.len() > 20);
    let s = c[10];
    let end = log_end(&m.img);
    let cases = [
        (
            "dirty_tail at a kset sequence the log has, wrong offset",
            LogPos {
                off: s.pos.off + 8,
                ..s.pos
            },
        ),
        (
            "dirty_tail at a kset sequence the log has, wrong segment",
            LogPos {
                seg: (s.pos.seg + 1) % NSEG,
                ..s.pos
            },
        ),
        (
            "dirty_tail beyond the log's end",
            LogPos {
                seq: end.seq + 10,
                ..end
            },
        ),
        (
            "dirty_tail one kset past the log's end",
            LogPos {
                seq: end.seq + 1,
                ..end
            },
        ),
    ];
    for (case, dt) in cases {
        let mut img = m.img.clone();
        set_tail(&mut img, KIND_DIRTY_TAIL, dt);
        refused(case, img, &m.hist, "is not in the log");
    }
    // dirty_tail behind key_tail.
    let mut img = m.img.clone();
    set_tail(&mut img, KIND_KEY_TAIL, c[12].pos);
    set_tail(&mut img, KIND_DIRTY_TAIL, c[3].pos);
    refused(
        "dirty_tail behind key_tail",
        img,
        &m.hist,
        "behind key_tail",
    );
    // Controls: dirty_tail on a kset of the chain, and at the log's end (everything
    // written back), are valid and must replay.
    let mut img = m.img.clone();
    set_tail(&mut img, KIND_DIRTY_TAIL, s.pos);
    safe(
        "dirty_tail on a kset in the middle of the log",
        img,
        &m.hist,
    );
    let mut img = m.img.clone();
    set_tail(&mut img, KIND_DIRTY_TAIL, end);
    safe("dirty_tail at the log's end", img, &m.hist);
}

#[test]
fn gc_percent_out_of_range_on_media() {
    let m = written();
    let info_at = |i: usize| INFO_OFF[i] as usize;
    let cur = pick_replica([
        CacheInfo::decode(&m.img[info_at(0)..info_at(0) + INFO_SIZE]),
        CacheInfo::decode(&m.img[info_at(1)..info_at(1) + INFO_SIZE]),
    ])
    .expect("cache_info");
    assert_eq!(cur.2.gc_percent, 70);
    // A newer, CRC-valid replica with gc_percent 96: the decoder refuses that replica
    // and replay takes the older valid one (gc_percent drives the GC watermark and
    // pacing arithmetic; dm-pcache used it unchecked).
    for bad in [96u32, 100, u32::MAX] {
        let mut img = m.img.clone();
        let other = 1 - cur.0;
        let b = CacheInfo {
            gc_percent: bad,
            ..cur.2
        }
        .encode(cur.1 + 1);
        img[info_at(other)..info_at(other) + INFO_SIZE].copy_from_slice(&b);
        assert!(matches!(
            CacheInfo::decode(&b),
            Err(MediaError::Field {
                field: "gc_percent",
                ..
            })
        ));
        let e = open(img.clone()).expect("the older replica is valid");
        assert_eq!(
            e.gc_percent(),
            70,
            "gc_percent {bad}: must replay the older replica's setting"
        );
        safe(
            &format!("newest cache_info replica with gc_percent {bad}"),
            img,
            &m.hist,
        );
    }
    // Both replicas out of range: nothing valid to replay.
    let mut img = m.img.clone();
    for (i, bad) in [96u32, u32::MAX].into_iter().enumerate() {
        let b = CacheInfo {
            gc_percent: bad,
            ..cur.2
        }
        .encode(5 + i as u64);
        img[info_at(i)..info_at(i) + INFO_SIZE].copy_from_slice(&b);
    }
    refused(
        "both cache_info replicas with gc_percent out of range",
        img,
        &m.hist,
        "gc_percent",
    );
    // And nothing writes one: the setter refuses it.
    let e = open(m.img.clone()).unwrap();
    assert!(e.set_gc_percent(96).is_err());
    assert_eq!(e.gc_percent(), 70);
}

// ---------------------------------------------------------------------------------
// The dual-replica ordering rule.
// ---------------------------------------------------------------------------------

/// A replicated object: name, its two slots' offsets, its size, and a decoder
/// returning a replica's sequence number.
type Replicated = (
    String,
    [u64; 2],
    usize,
    Box<dyn Fn(&[u8]) -> Result<u64, MediaError>>,
);

/// Every replicated metadata object of the tiny geometry.
fn replicated() -> Vec<Replicated> {
    let mut v: Vec<Replicated> = vec![
        (
            "superblock".into(),
            SB_OFF,
            SB_SIZE,
            Box::new(|b: &[u8]| Superblock::decode(b, PMEM).map(|x| x.0)),
        ),
        (
            "cache_info".into(),
            INFO_OFF,
            INFO_SIZE,
            Box::new(|b: &[u8]| CacheInfo::decode(b).map(|x| x.0)),
        ),
        (
            "key_tail".into(),
            KEY_TAIL_OFF,
            TAIL_SIZE,
            Box::new(|b: &[u8]| LogPos::decode(b, KIND_KEY_TAIL, NSEG, DATA).map(|x| x.0)),
        ),
        (
            "dirty_tail".into(),
            DIRTY_TAIL_OFF,
            TAIL_SIZE,
            Box::new(|b: &[u8]| LogPos::decode(b, KIND_DIRTY_TAIL, NSEG, DATA).map(|x| x.0)),
        ),
        (
            "flush record".into(),
            FLUSH_REC_OFF,
            FLUSH_REC_SIZE,
            Box::new(|b: &[u8]| FlushRec::decode(b).map(|x| x.0)),
        ),
    ];
    let geo = geometry(FORMAT_ID);
    for s in 0..NSEG {
        let base = geo.seg_base(s);
        v.push((
            format!("generation of segment {s}"),
            [base + GEN_OFF[0], base + GEN_OFF[1]],
            GEN_SIZE,
            Box::new(move |b: &[u8]| decode_gen(b, s).map(|x| x.0)),
        ));
    }
    v
}

/// Checks the rule between the durable images of two consecutive persistence points:
/// every object has a valid replica in both, and the replica current in `before` is
/// byte for byte the same in `after`. Returns the objects that changed.
fn replica_rule(before: &[u8], after: &[u8]) -> Result<Vec<String>, String> {
    let mut changed = vec![];
    for (name, offs, n, dec) in replicated() {
        let range = |i: usize| offs[i] as usize..offs[i] as usize + n;
        let pick = |img: &[u8]| {
            pick_replica([
                dec(&img[range(0)]).map(|s| (s, ())),
                dec(&img[range(1)]).map(|s| (s, ())),
            ])
        };
        let (cur, _, _) =
            pick(before).map_err(|e| format!("{name}: no valid replica before: {e}"))?;
        pick(after).map_err(|e| format!("{name}: no valid replica after: {e}"))?;
        if before[range(cur)] != after[range(cur)] {
            return Err(format!(
                "{name}: the current replica (slot {cur}) was overwritten"
            ));
        }
        if before[range(1 - cur)] != after[range(1 - cur)] {
            changed.push(name);
        }
    }
    Ok(changed)
}

/// A workload that updates every replicated object: writes and flushes (kset closes),
/// writeback (dirty_tail), GC (key_tail, generations) and gc_percent changes
/// (cache_info), with a power loss after persistence point `limit` (counted from the
/// end of format). Returns the durable image and the points the run passed.
fn replica_workload(limit: Option<u64>) -> (Vec<u8>, u64) {
    let mut fo = FormatOptions::new(identity(ID), FORMAT_ID);
    fo.seg_size = SEG;
    fo.kset_keys = KEYS;
    fo.gc_percent = 0;
    let e = Engine::format(SimPmem::new(PMEM), &fo, &config()).expect("format");
    let start = e.pmem().persistence_points();
    e.pmem().set_fence_limit(limit.map(|l| start + l));
    let mut ch = Channel::default();
    for i in 0..160u64 {
        let blk = (i * 13) % 200;
        let _ = e.write(&mut ch, blk * BS, &pattern(i + 1, blk), false);
        let _ = e.flush();
        if i % 20 == 19 {
            e.release_channel(&mut ch);
            let mut b = WbBatch::default();
            for _ in 0..64 {
                match e.writeback_next(&mut b) {
                    WbNext::Ready => e.writeback_done(&b, true),
                    _ => break,
                }
            }
            let _ = e.gc(&mut Vec::new());
        }
        if i % 30 == 29 {
            let _ = e.set_gc_percent(((i / 30) % 4 * 20) as u32);
        }
        if i % 40 == 5 {
            // A write-through (unsynced key), its kset closed, then a backing FLUSH:
            // the flush record moves.
            let off = (300 + i % 7) * BS;
            if let Ok(Some(d)) = e.begin_direct(off, BS, true) {
                e.end_direct(&mut ch, off, &pattern(i + 1, 300), d, true);
                let _ = e.flush();
                e.direct_flushed(e.direct_mark());
            }
        }
    }
    e.release_channel(&mut ch);
    let _ = e.flush();
    (
        e.pmem().durable_image(),
        e.pmem().persistence_points() - start,
    )
}

#[test]
fn dual_replica_update_never_overwrites_the_current_replica() {
    let (_, total) = replica_workload(None);
    let mut updates: std::collections::BTreeMap<String, u64> = Default::default();
    let (mut prev, _) = replica_workload(Some(0));
    for p in 1..=total {
        let (img, _) = replica_workload(Some(p));
        let changed =
            replica_rule(&prev, &img).unwrap_or_else(|m| panic!("persistence point {p}: {m}"));
        for name in changed {
            let kind = if name.starts_with("generation") {
                "generation".into()
            } else {
                name
            };
            *updates.entry(kind).or_default() += 1;
        }
        prev = img;
    }
    println!(
        "replica rule held over {total} persistence points; replica updates seen: {updates:?}"
    );
    for kind in [
        "cache_info",
        "key_tail",
        "dirty_tail",
        "generation",
        "flush record",
    ] {
        assert!(
            updates.get(kind).copied().unwrap_or(0) > 0,
            "the workload never updated {kind}"
        );
    }
    // The check itself catches an update written over the current replica.
    let (img, _) = replica_workload(Some(total / 2));
    let cur = tail_of(&img, KEY_TAIL_OFF, KIND_KEY_TAIL);
    let mut bad = img.clone();
    let slot = pick_replica([0, 1].map(|i| {
        let o = KEY_TAIL_OFF[i] as usize;
        LogPos::decode(&img[o..o + TAIL_SIZE], KIND_KEY_TAIL, NSEG, DATA)
    }))
    .unwrap();
    let o = KEY_TAIL_OFF[slot.0] as usize;
    bad[o..o + TAIL_SIZE].copy_from_slice(&cur.encode(KIND_KEY_TAIL, slot.1 + 1));
    assert!(
        replica_rule(&img, &bad).is_err(),
        "an overwrite of the current replica went unseen"
    );
}
