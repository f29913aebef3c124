#!/usr/bin/env python3
"""Trace-driven benchmark tier, offline half: deterministic synthetic block traces, fio
iolog conversion, and the hit ratios an ideal cache of a given size would reach.

  trace_tier.py gen NAME OUT.csv [--seed N] [--requests N]   write a synthetic trace
  trace_tier.py iolog IN.csv OUT.iolog                        fio version 2 iolog
  trace_tier.py offline IN.csv CACHE_BYTES                    FIFO, LRU, OPT (JSON)
  trace_tier.py report RESULTS.jsonl                          the table of a run
  trace_tier.py line < RESULT.json                            one round, one line

A trace is CSV: `time_us,op,offset,len` with op R or W, offsets and lengths in bytes,
aligned to 512. The synthetic shapes (all seeded, so two runs replay the same I/O):

  zipf      zipf(1.1) over a 1 GiB footprint, 4-64 KiB requests, 70% reads
  loop      reads looping over 1.5x the largest cache size (LRU's worst case), plus a
            zipf hot set (a third of the requests)
  scan_hot  a zipf hot set of 64 MiB read next to a sequential writer streaming through
            4 GiB (the hot set must survive the scan)
  mixed     a VM-like mix: 4-128 KiB (mostly 64 KiB), 59% writes, hot regions inside a
            1 GiB footprint spread over 31 GiB

Offline ratios model a write-allocate cache of 4 KiB blocks (writes and read misses
insert; hits of reads count): FIFO (insertion order), LRU (recency, updated by reads and
writes) and Belady's OPT (evict the block used furthest in the future; a block never used
again is evicted first). The reported number is the read byte-hit ratio: bytes read that
the cache held, over bytes read. Invariant: every result depends only on the trace and
the cache size. Replay and the offline ratios both see requests widened to 4 KiB
boundaries (`--align`), since both targets do O_DIRECT I/O in 4 KiB blocks here.
"""

import argparse
import bisect
import csv
import heapq
import json
import math
import random
import sys
from collections import OrderedDict

BLOCK = 4096
GIB = 1 << 30
MIB = 1 << 20


class Zipf:
    """Zipf(s) over n items by inverse CDF on a precomputed table (n up to a few 100K)."""

    def __init__(self, n, s, rng):
        self.rng = rng
        acc, self.cdf = 0.0, []
        for k in range(1, n + 1):
            acc += 1.0 / k**s
            self.cdf.append(acc)
        self.total = acc
        # Rank -> item: a fixed shuffle, so hot items are spread over the range.
        self.perm = list(range(n))
        rng.shuffle(self.perm)

    def draw(self):
        i = bisect.bisect_left(self.cdf, self.rng.random() * self.total)
        return self.perm[min(i, len(self.perm) - 1)]


def align(x, a=BLOCK):
    return x - x % a


def gen(name, seed, n):
    rng = random.Random(f"{name}:{seed}")
    out = []
    t = 0
    if name == "zipf":
        foot = 1 * GIB
        z = Zipf(foot // (64 << 10), 1.1, rng)
        for _ in range(n):
            size = rng.choice([4096, 8192, 16384, 65536])
            off = z.draw() * (64 << 10) + align(rng.randrange(0, (64 << 10) - size + 1))
            out.append((t, "R" if rng.random() < 0.7 else "W", off, size))
            t += 50
    elif name == "loop":
        region = 1536 * MIB
        hot = Zipf(64 * MIB // BLOCK, 1.1, rng)
        pos = 0
        for _ in range(n):
            if rng.random() < 1 / 3:
                out.append((t, "R", 2 * GIB + hot.draw() * BLOCK, BLOCK))
            else:
                out.append((t, "R", pos, 65536))
                pos = (pos + 65536) % region
            t += 50
    elif name == "scan_hot":
        hot = Zipf(64 * MIB // BLOCK, 1.0, rng)
        pos = 8 * GIB
        for _ in range(n):
            if rng.random() < 0.5:
                out.append((t, "R", hot.draw() * BLOCK, BLOCK))
            else:
                out.append((t, "W", pos, 131072))
                pos += 131072
                if pos >= 12 * GIB:
                    pos = 8 * GIB
            t += 50
    elif name == "mixed":
        # Hot regions of 16 MiB inside a 1 GiB footprint spread over 31 GiB.
        regions = [align(rng.randrange(0, 31 * GIB - 16 * MIB), MIB) for _ in range(64)]
        rz = Zipf(len(regions), 0.9, rng)
        for _ in range(n):
            size = rng.choices([512, 4096, 16384, 65536, 131072], [3, 12, 10, 65, 10])[0]
            base = regions[rz.draw()]
            off = base + align(rng.randrange(0, 16 * MIB - size + 1), 512 if size == 512 else BLOCK)
            out.append((t, "W" if rng.random() < 0.59 else "R", off, size))
            t += 50
    else:
        sys.exit(f"unknown trace shape {name!r}: zipf, loop, scan_hot or mixed")
    return out


def read_trace(path):
    with open(path) as f:
        rows = []
        for r in csv.reader(f):
            if not r or r[0].startswith("#") or r[0] == "time_us":
                continue
            t, op, off, ln = int(r[0]), r[1].strip().upper(), int(r[2]), int(r[3])
            if op not in ("R", "W") or ln <= 0 or off < 0:
                sys.exit(f"{path}: bad row {r}")
            rows.append((t, op, off, ln))
    return rows


def blocks(off, ln):
    """(block, bytes of the request inside it) for each 4 KiB block the request touches."""
    b, end = off // BLOCK, off + ln
    while b * BLOCK < end:
        lo, hi = max(off, b * BLOCK), min(end, (b + 1) * BLOCK)
        yield b, hi - lo
        b += 1


def offline(rows, cache_bytes):
    cap = max(1, cache_bytes // BLOCK)
    acc = [(op, b, n) for _, op, off, ln in rows for b, n in blocks(off, ln)]
    read_bytes = sum(n for op, _, n in acc if op == "R")
    # FIFO
    fifo, order, hit = set(), [], 0
    head = 0
    for op, b, n in acc:
        if b in fifo:
            hit += n if op == "R" else 0
            continue
        fifo.add(b)
        order.append(b)
        if len(fifo) > cap:
            fifo.discard(order[head])
            head += 1
    res = {"fifo": hit}
    # LRU
    lru, hit = OrderedDict(), 0
    for op, b, n in acc:
        if b in lru:
            hit += n if op == "R" else 0
            lru.move_to_end(b)
            continue
        lru[b] = True
        if len(lru) > cap:
            lru.popitem(last=False)
    res["lru"] = hit
    # OPT: next use of each access, then evict the furthest next use (lazy max-heap).
    nxt, last = [math.inf] * len(acc), {}
    for i in range(len(acc) - 1, -1, -1):
        b = acc[i][1]
        nxt[i] = last.get(b, math.inf)
        last[b] = i
    cur, heap, hit = {}, [], 0
    for i, (op, b, n) in enumerate(acc):
        if b in cur:
            hit += n if op == "R" else 0
        elif len(cur) >= cap:
            while True:
                negn, v = heapq.heappop(heap)
                if cur.get(v) == -negn:
                    del cur[v]
                    break
        cur[b] = nxt[i]
        heapq.heappush(heap, (-nxt[i], b))
    res["opt"] = hit
    return {k: (v / read_bytes if read_bytes else 0.0) for k, v in res.items()} | {
        "read_bytes": read_bytes,
        "footprint_bytes": len({b for _, b, _ in acc}) * BLOCK,
    }


def aligned(rows, a):
    """Requests widened to `a`-byte boundaries (the targets use O_DIRECT, whose logical
    block here is 4 KiB): offset rounded down, end rounded up."""
    out = []
    for t, op, off, ln in rows:
        lo, hi = off - off % a, -(-(off + ln) // a) * a
        out.append((t, op, lo, hi - lo))
    return out


def iolog(rows, out):
    with open(out, "w") as f:
        f.write("fio version 2 iolog\ndev add\ndev open\n")
        for _, op, off, ln in rows:
            f.write(f"dev {'read' if op == 'R' else 'write'} {off} {ln}\n")
        f.write("dev close\n")


def report(path):
    runs = [json.loads(l) for l in open(path) if l.strip()]
    keys = sorted({(r["trace"], r["cache_mb"]) for r in runs})
    print("| trace | cache | rounds | pcache / qsd speed (median, range) | read p99 us pcache / qsd |"
          " pcache read byte-hit | FIFO | LRU | OPT | medium holding data |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for tr, mb in keys:
        rs = [r for r in runs if (r["trace"], r["cache_mb"]) == (tr, mb)]
        ratios = sorted(r["qsd"]["secs"] / r["pcache"]["secs"] for r in rs)
        med = ratios[len(ratios) // 2] if len(ratios) % 2 else sum(ratios[len(ratios) // 2 - 1:len(ratios) // 2 + 1]) / 2
        hits = sorted(r["pcache"]["byte_hit"] for r in rs)
        p99 = lambda side: sorted(r[side]["read_p99_us"] for r in rs)[len(rs) // 2]
        o = rs[0]["offline"]
        cached = sorted(r["pcache"].get("cached", 0.0) for r in rs)[len(rs) // 2]
        print(f"| {tr} | {mb} MiB | {len(rs)} | **{med:.2f}x** ({ratios[0]:.2f}-{ratios[-1]:.2f}) |"
              f" {p99('pcache'):.0f} / {p99('qsd'):.0f} | {hits[len(hits) // 2]:.3f} |"
              f" {o['fifo']:.3f} | {o['lru']:.3f} | {o['opt']:.3f} | {cached:.0%} |")
    print()
    print("| trace | cache | target | read p50 / p99 / p99.9 us | write p50 / p99 / p99.9 us |")
    print("|---|---|---|---|---|")
    for tr, mb in keys:
        rs = [r for r in runs if (r["trace"], r["cache_mb"]) == (tr, mb)]
        for side in ("pcache", "qsd"):
            med = lambda k: sorted(r[side][k] for r in rs)[len(rs) // 2]
            cell = lambda op: " / ".join(f"{med(f'{op}_{p}_us'):.0f}" for p in ("p50", "p99", "p999"))
            print(f"| {tr} | {mb} MiB | {side} | {cell('read')} | {cell('write')} |")


def line(r):
    pc, q, o = r["pcache"], r["qsd"], r["offline"]
    print(f"  {r['trace']} {r['cache_mb']} MiB round {r['round']}: pcache {pc['secs']:.2f} s"
          f" (read byte-hit {pc['byte_hit']:.3f}), qsd {q['secs']:.2f} s;"
          f" offline FIFO {o['fifo']:.3f} LRU {o['lru']:.3f} OPT {o['opt']:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("name")
    g.add_argument("out")
    g.add_argument("--seed", type=int, default=1)
    g.add_argument("--requests", type=int, default=100_000)
    i = sub.add_parser("iolog")
    i.add_argument("trace")
    i.add_argument("out")
    i.add_argument("--align", type=int, default=BLOCK)
    o = sub.add_parser("offline")
    o.add_argument("trace")
    o.add_argument("cache_bytes", type=int)
    o.add_argument("--align", type=int, default=BLOCK)
    r = sub.add_parser("report")
    r.add_argument("results")
    sub.add_parser("line")
    a = ap.parse_args()
    if a.cmd == "gen":
        with open(a.out, "w") as f:
            f.write("time_us,op,offset,len\n")
            for row in gen(a.name, a.seed, a.requests):
                f.write("%d,%s,%d,%d\n" % row)
    elif a.cmd == "iolog":
        iolog(aligned(read_trace(a.trace), a.align), a.out)
    elif a.cmd == "offline":
        print(json.dumps(offline(aligned(read_trace(a.trace), a.align), a.cache_bytes)))
    elif a.cmd == "line":
        line(json.loads(sys.stdin.read()))
    else:
        report(a.results)


if __name__ == "__main__":
    main()
