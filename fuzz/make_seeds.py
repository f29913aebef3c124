#!/usr/bin/env python3
"""Writes the named seeds of the replay and decode fuzz targets into
fuzz/seeds/<target>/ (kept in git, unlike the growing fuzz/corpus/).

Replay: one seed per corruption class of issue 21 (the ones upstream dm-pcache fixed after
Linux 6.18), in the input format fuzz_targets/replay.rs documents: byte 0 picks the
base medium (bits 0-1), re-seals every CRC (bit 2, so the damage reaches the field
checks and replay) and exercises writes/writeback/GC after the read (bit 4); then
chunks of [region u8][offset u16 LE][len u8][bytes]. Regions: 1 cache_info, 2 tails
(key_tail slots at 0 and 64, dirty_tail slots at 128 and 192), 3 segment headers
((seg << 7) | offset), 4 ksets of the base log ((site << 9) | offset in the kset).
Field offsets follow src/engine/format.rs. test/corruption.rs checks the same
classes against exact expectations; these seeds start the fuzzer at them, and
test/fuzz_smoke.sh and scripts/fuzz_soak.sh pass fuzz/seeds/<target>/ to libFuzzer
beside the working corpus, so every run starts with every seed.
Decode: the same classes as single objects (see the decode part below).
Rerun after changing an input format: python3 fuzz/make_seeds.py
"""
import os
import struct

DATA = 24 * 1024 - 4096  # data bytes of a tiny segment (src/env/sim/tiny.rs)
NSEG = 12
BACKING = 512 * 1024
RESEAL, EXERCISE = 4, 16


def chunk(region, off, data):
    return bytes([region]) + struct.pack("<H", off) + bytes([len(data)]) + data


def u32(v):
    return struct.pack("<I", v)


def u64(v):
    return struct.pack("<Q", v)


def kset(site, field, data):
    return chunk(4, (site << 9) | field, data)


seeds = {}
# A kset chain that loops: a kset turned into a LAST link to segment 0, 1 or 2 (a
# site in segment 0 linking to 0 is a self-loop; a later one loops back).
for site in (0, 3, 8, 20, 40):
    for to in (0, 1, 2):
        seeds[f"loop_site{site}_to{to}"] = (2 | RESEAL, kset(site, 16, u32(1) + u32(to)))
# A tail that overruns its segment, and a kset claiming keys past it.
seeds["tail_offset_overrun"] = (2 | RESEAL, chunk(2, 20, u32(DATA - 32 + 8)) + chunk(2, 84, u32(DATA - 32 + 8)))
seeds["tail_at_last_header_slot"] = (0 | RESEAL | EXERCISE, chunk(2, 20, u32(DATA - 32)) + chunk(2, 148, u32(DATA - 32)))
seeds["tail_unaligned_near_end"] = (0 | RESEAL | EXERCISE, chunk(2, 20, u32(DATA - 107)) + chunk(2, 148, u32(DATA - 107)))
seeds["kset_count_past_segment"] = (2 | RESEAL, kset(5, 20, u32(0xFFFF)))
seeds["kset_count_over_max"] = (1 | RESEAL, kset(0, 20, u32(9)))
# Key offsets and lengths beyond the device or the segment.
seeds["key_off_device_end"] = (1 | RESEAL, kset(0, 32, u64(BACKING)))
seeds["key_off_overflow"] = (1 | RESEAL, kset(1, 32, u64(2**64 - 100)))
seeds["key_len_zero"] = (1 | RESEAL, kset(0, 40, u32(0)))
seeds["key_len_max"] = (3 | RESEAL, kset(2, 40, u32(0xFFFFFFFF)))
seeds["key_seg_off_past_segment"] = (1 | RESEAL, kset(0, 52, u32(DATA - 256)))
# Segment numbers beyond the geometry: key, LAST link, tails, generation record.
seeds["key_seg_beyond"] = (1 | RESEAL, kset(0, 48, u32(NSEG)))
seeds["last_link_beyond"] = (2 | RESEAL, kset(10, 16, u32(1) + u32(NSEG)))
seeds["key_tail_seg_beyond"] = (2 | RESEAL, chunk(2, 16, u32(NSEG)) + chunk(2, 80, u32(NSEG)))
seeds["gen_seg_id_beyond"] = (2 | RESEAL, chunk(3, (4 << 7) | 16, u32(NSEG + 4)) + chunk(3, (4 << 7) | 80, u32(NSEG + 4)))
# A dirty_tail that does not chain to key_tail: beyond the log, behind key_tail, and
# on a kset sequence the log has but at another offset.
seeds["dirty_tail_beyond_log"] = (2 | RESEAL, chunk(2, 128 + 24, u64(1 << 20)) + chunk(2, 192 + 24, u64(1 << 20)))
seeds["dirty_tail_behind_key_tail"] = (2 | RESEAL, chunk(2, 128 + 24, u64(1)) + chunk(2, 192 + 24, u64(1)))
seeds["dirty_tail_wrong_offset"] = (1 | RESEAL, chunk(2, 128 + 20, u32(8)) + chunk(2, 192 + 20, u32(8)))
# gc_percent out of range: the newest replica only (the older one replays), both.
seeds["gc_percent_91_one_replica"] = (1 | RESEAL | EXERCISE, chunk(1, 16, u32(91)))
seeds["gc_percent_both_replicas"] = (2 | RESEAL, chunk(1, 16, u32(91)) + chunk(1, 4096 + 16, u32(0xFFFFFFFF)))
# Dual replicas: the current replica torn (no re-seal), so the older one must replay.
seeds["replica_torn_key_tail"] = (2 | EXERCISE, chunk(2, 0, u32(0xDEADBEEF)))
seeds["replica_torn_dirty_tail"] = (2 | EXERCISE, chunk(2, 128, u32(0xDEADBEEF)) + chunk(2, 192 + 1, b"\x55"))
seeds["replica_torn_cache_info"] = (1 | EXERCISE, chunk(1, 2, b"\x77\x77"))
seeds["replica_torn_generation"] = (2 | EXERCISE, chunk(3, (1 << 7) | 0, u32(0)) + chunk(3, (2 << 7) | 64, u32(0)))


def write(target, files):
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds", target)
    os.makedirs(out, exist_ok=True)
    for name, data in sorted(files.items()):
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(f"{len(files)} seeds in {out}")


write("replay", {name: bytes([mode]) + body for name, (mode, body) in seeds.items()})

# The decode target: 48 bytes of parameters (n_segs, data bytes per segment, keys per
# kset, backing size, format id, expected kset sequence, medium size; the tiny
# geometry here), then one object that every decoder sees raw and re-sealed
# (fuzz_targets/decode.rs). The same classes at the codec level.
params = u32(NSEG) + u64(DATA) + u32(8) + u64(BACKING) + u64(0xF022) + u64(5) + u64(1 << 20)


def obj(fields, size=64):
    b = bytearray(size)
    for off, v in fields:
        b[off:off + len(v)] = v
    return bytes(b)


def key(off, length, flags=0, seg=0, seg_off=0):
    return u64(off) + u32(length) + u32(flags) + u32(seg) + u32(seg_off) + u64(0) + u32(0) + u32(0)


decode = {
    "gc_percent_91": obj([(16, u32(91))]),
    "gc_percent_max": obj([(16, u32(0xFFFFFFFF))]),
    "tail_seg_beyond": obj([(16, u32(NSEG)), (24, u64(5))]),
    "tail_offset_overrun": obj([(16, u32(1)), (20, u32(DATA - 32 + 8)), (24, u64(5))]),
    "key_off_device_end": key(BACKING, 512),
    "key_off_overflow": key(2**64 - 100, 512),
    "key_len_zero": key(0, 0),
    "key_seg_beyond": key(0, 512, seg=NSEG),
    "key_seg_off_past_segment": key(0, 512, seg=1, seg_off=DATA - 256),
    "kset_last_link_beyond": obj([(16, u32(1)), (20, u32(NSEG))], 32),
    "kset_count_over_max": obj([(20, u32(9))], 32 + 9 * 40),
    "kset_count_past_buffer": obj([(20, u32(8))], 32 + 3 * 40),
    "superblock_n_segs_beyond": obj([(24, u64(1 << 20)), (32, u32(24 << 10)), (36, u32(1000)), (40, u32(8))], 256),
}
write("decode", {name: params + body for name, body in decode.items()})
