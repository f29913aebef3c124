//! Fuzz target: replay of damaged media.
//!
//! A few valid small media are built once (formatted, written, some with a log over
//! several segments, writeback and GC done). The input picks one and patches it, so
//! the fuzzer starts from deep, valid states instead of having to discover the format:
//!
//! ```text
//! byte 0      bits 0-1 base medium, bit 2 re-seal every CRC after patching (so the
//!             damage reaches field checks and replay), bit 3 open with force,
//!             bit 4 also write, flush, write back and GC after the full read
//! then        chunks of [region u8][offset u16 LE][len u8][len bytes]
//! ```
//!
//! Regions aim a chunk at the superblocks, cache_info, tails, segment headers, the
//! ksets of the base medium's log, segment data, or anywhere (region 7 XORs instead
//! of overwriting). The medium is then opened; if accepted, the invariants are checked
//! and every block is read (misses filled with zeros). Any panic is a finding. With
//! `PCACHE_FUZZ_STRICT=1`, an accepted medium that fails `check_invariants` is one too.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pcache::engine::format::{
    crc, get_u32, DIRTY_TAIL_OFF, GEN_OFF, GEN_SIZE, INFO_OFF, INFO_SIZE, KEY_SIZE, KEY_TAIL_OFF,
    KSET_HDR, KSET_LAST, KSET_MAGIC, SB_OFF, SB_SIZE, SEGMENTS_OFF, SEG_HDR, TAIL_SIZE,
};
use pcache::engine::{Channel, Engine, FormatOptions, WbBatch, WbNext};
use pcache::env::sim::pmem::SimPmem;
use pcache::env::sim::tiny::{
    config, geometry, identity, BACKING, BS, DATA, KEYS, NSEG, PMEM, SEG,
};
use std::sync::OnceLock;

/// A tiny deterministic generator for building the base media.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One base medium and the medium offsets of the ksets in its log.
struct Base {
    img: Vec<u8>,
    sites: Vec<u64>,
}

/// Reads `[off, off + len)`, filling misses with zeros (the backing device here).
fn read_range(e: &Engine<SimPmem>, ch: &mut Channel, off: u64, len: usize) {
    let mut buf = vec![0u8; len];
    if let Ok(n) = e.read(ch, off, &mut buf) {
        if n > 0 {
            let misses: Vec<_> = ch.misses().collect();
            for m in misses {
                buf[m.at..m.at + m.len].fill(0);
            }
            e.fill(ch, off, &buf, true);
        }
    }
}

fn write_back_all(e: &Engine<SimPmem>, limit: usize) {
    let mut b = WbBatch::default();
    for _ in 0..limit {
        match e.writeback_next(&mut b) {
            WbNext::Ready => e.writeback_done(&b, true),
            _ => break,
        }
    }
}

/// Builds base medium `variant`: 0 formatted only; 1 writes (data CRC on); 2 many
/// small flushed writes (a log over several segments), then writeback and GC; 3
/// zeroes, discards and miss fills (clean keys), data CRC on.
fn build(variant: u8) -> Base {
    let mut fo = FormatOptions::new(identity("fuzz"), 0xf022 + variant as u64);
    fo.seg_size = SEG;
    fo.kset_keys = KEYS;
    fo.data_crc = variant % 2 == 1;
    fo.gc_percent = if variant == 2 { 0 } else { 70 };
    let e = Engine::format(SimPmem::new(PMEM), &fo, &config()).expect("format");
    let mut rng = Lcg(variant as u64);
    let mut ch = Channel::default();
    let ops = [0, 12, 120, 20][variant as usize];
    for i in 0..ops {
        let blocks = if variant == 2 { 1 } else { 1 + rng.below(8) };
        let off = rng.below(BACKING / BS - blocks + 1) * BS;
        let len = blocks * BS;
        match (variant, i % 3) {
            (3, 0) => {
                let _ = e.write_zeroes(off, len, i % 2 == 0, false);
            }
            (3, 1) => read_range(&e, &mut ch, off, len as usize),
            _ => {
                let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                let _ = e.write(&mut ch, off, &data, false);
            }
        }
        if variant == 2 || i % 4 == 3 {
            let _ = e.flush();
        }
        if variant == 2 && i % 40 == 39 {
            write_back_all(&e, 6);
            let _ = e.gc(&mut Vec::new());
        }
    }
    e.release_channel(&mut ch);
    let _ = e.flush();
    let img = e.pmem().image();
    let sites = kset_sites(&img);
    Base { img, sites }
}

/// Medium offsets of the kset headers found by walking each segment's data area from
/// its start while the magic matches.
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
            off += (KSET_HDR + KEY_SIZE * get_u32(img, at + 20).clamp(1, KEYS) as usize) as u64;
        }
    }
    sites
}

fn reseal(b: &mut [u8]) {
    let c = crc(&b[4..]);
    b[..4].copy_from_slice(&c.to_le_bytes());
}

/// Recomputes every metadata CRC, and the CRC of every kset at `sites` over the size
/// its (possibly patched) header claims.
fn reseal_image(img: &mut [u8], sites: &[u64]) {
    let geo = geometry(0);
    let mut objs: Vec<(u64, usize)> = vec![];
    objs.extend(SB_OFF.iter().map(|&o| (o, SB_SIZE)));
    objs.extend(INFO_OFF.iter().map(|&o| (o, INFO_SIZE)));
    objs.extend(KEY_TAIL_OFF.iter().map(|&o| (o, TAIL_SIZE)));
    objs.extend(DIRTY_TAIL_OFF.iter().map(|&o| (o, TAIL_SIZE)));
    for s in 0..NSEG {
        objs.extend(GEN_OFF.iter().map(|&o| (geo.seg_base(s) + o, GEN_SIZE)));
    }
    for (o, n) in objs {
        reseal(&mut img[o as usize..o as usize + n]);
    }
    for &at in sites {
        let at = at as usize;
        let in_seg = (at as u64 - SEGMENTS_OFF) % SEG as u64 - SEG_HDR;
        let size = if get_u32(img, at + 16) & KSET_LAST != 0 {
            KSET_HDR
        } else {
            KSET_HDR + KEY_SIZE * (get_u32(img, at + 20) as usize).min(KEYS as usize)
        };
        let n = size.min((DATA - in_seg) as usize);
        let c = crc(&img[at + 4..at + n]);
        img[at..at + 4].copy_from_slice(&c.to_le_bytes());
    }
}

/// Applies the input's chunks to `img`.
fn patch(img: &mut [u8], sites: &[u64], mut data: &[u8]) {
    let geo = geometry(0);
    while data.len() >= 4 {
        let region = data[0] % 8;
        let off = u16::from_le_bytes([data[1], data[2]]) as u64;
        let len = (data[3] as usize).min(data.len() - 4);
        let bytes = &data[4..4 + len];
        data = &data[4 + len..];
        let pos = match region {
            0 => SB_OFF[0] + off % 8192,
            1 => INFO_OFF[0] + off % 8192,
            2 => KEY_TAIL_OFF[0] + off % 256,
            3 => geo.seg_base((off >> 7) as u32 % NSEG) + (off & 127),
            4 if !sites.is_empty() => sites[(off >> 9) as usize % sites.len()] + (off & 511),
            5 => geo.data_off((off >> 12) as u32 % NSEG, off & 4095),
            _ => off * PMEM / 65536,
        } as usize;
        let end = (pos + len).min(img.len());
        let dst = &mut img[pos..end];
        if region == 7 {
            dst.iter_mut().zip(bytes).for_each(|(d, s)| *d ^= s);
        } else {
            dst.copy_from_slice(&bytes[..dst.len()]);
        }
    }
}

fn bases() -> &'static [Base; 4] {
    static BASES: OnceLock<[Base; 4]> = OnceLock::new();
    BASES.get_or_init(|| [build(0), build(1), build(2), build(3)])
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let base = &bases()[(mode & 3) as usize];
    let mut img = base.img.clone();
    patch(&mut img, &base.sites, rest);
    if mode & 4 != 0 {
        reseal_image(&mut img, &base.sites);
    }
    let force = mode & 8 != 0;
    let Ok(e) = Engine::open(
        SimPmem::from_image(img),
        &identity("fuzz"),
        force,
        &config(),
    ) else {
        return;
    };
    let strict = std::env::var_os("PCACHE_FUZZ_STRICT").is_some_and(|v| v == "1");
    if let Err(m) = e.check_invariants(&[]) {
        assert!(!strict, "accepted medium fails its invariants: {m}");
    }
    let mut ch = Channel::default();
    for off in (0..BACKING).step_by(64 << 10) {
        read_range(&e, &mut ch, off, 64 << 10);
    }
    if mode & 16 != 0 {
        for i in 0..4u64 {
            let _ = e.write(&mut ch, i * 3 * BS, &[i as u8; 2 * BS as usize], false);
        }
        let _ = e.flush();
        if let Err(m) = e.check_invariants(&[&ch]) {
            assert!(!strict, "invariants fail after writes: {m}");
        }
        e.release_channel(&mut ch);
        write_back_all(&e, 64);
        let _ = e.gc(&mut Vec::new());
    }
});
