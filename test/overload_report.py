#!/usr/bin/env python3
"""Report of the overload benchmark tier (test/spdk/bench.sh overload, test/bench_nbd.sh
overload): parses the raw logs of every run, prints IOPS, p50/p99/p99.9/max latency,
the IOPS of every 5 s interval, pcache's ratios against the baselines with the issue's
targets beside them, and writes PNG plots (IOPS over time, latency distribution) with
gnuplot. A benchmark report: it never fails on a number.

Input: RESULTS_DIR/runs.tsv, one line per measured run:
    round  target  workload  kind  log  [iops_log]
kind "bdevperf": `log` is the slice of a bdevperf -S 1 -ll log holding one perform_tests;
kind "fio": `log` is fio's --output-format=json+ output and `iops_log` its
--write_iops_log file (log_avg_msec=1000).

Usage: overload_report.py RESULTS_DIR BASELINE_LABEL OTHER_LABEL SKIP_SECONDS spdk|embedded
  BASELINE_LABEL is the bare base's target name, OTHER_LABEL the other cache (or
  export) compared with; SKIP_SECONDS leaves the fill out of the interval check.
"""
import json
import os
import re
import shutil
import statistics
import subprocess
import sys

INTERVAL = 5


def parse_bdevperf(path):
    """(iops, per-second IOPS list, {pct: us}, max_us, [(lo_us, hi_us, count)])."""
    text = open(path, errors="replace").read().replace("\r", "\n")
    secs, total, max_us = [], 0.0, 0.0
    # Periodic lines carry zero latency columns; the final one carries min/max.
    row = re.compile(r"^\s+\S+\s+:\s+([\d.]+)\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s*$")
    for line in text.split("\n"):
        m = row.match(line)
        if not m:
            continue
        iops, avg, mx = float(m.group(2)), float(m.group(3)), float(m.group(5))
        if avg == 0.0:
            secs.append(iops)
        else:
            total, max_us = iops, mx
    pct = {}
    for m in re.finditer(r"^\s*([\d.]+)% :\s+([\d.]+)us", text, re.M):
        pct.setdefault(float(m.group(1)), float(m.group(2)))
    hist = [(float(a), float(b), int(c)) for a, b, c in
            re.findall(r"^\s*([\d.]+) -\s+([\d.]+):\s+[\d.]+%\s+\(\s*(\d+)\)", text, re.M)]
    if not total and secs:
        total = statistics.mean(secs)
    return total, secs, pct, max_us, hist


def parse_fio(path, iops_log):
    raw = open(path, errors="replace").read()
    j = json.loads(raw[raw.index("{"):])["jobs"][0]
    sides = [j[s] for s in ("read", "write") if j[s]["io_bytes"] > 0]
    total = sum(s["iops"] for s in sides)
    # Percentiles and bins over both directions (a mix reports each side apart).
    bins = {}
    for s in sides:
        for ns, c in s["clat_ns"].get("bins", {}).items():
            bins[int(ns)] = bins.get(int(ns), 0) + c
    n = sum(bins.values())
    pct = {}
    if n:
        acc, keys = 0, sorted(bins)
        want = [50.0, 99.0, 99.9, 99.99]
        for ns in keys:
            acc += bins[ns]
            while want and acc >= n * want[0] / 100:
                pct[want.pop(0)] = ns / 1000
    max_us = max(s["clat_ns"]["max"] for s in sides) / 1000
    hist = [(ns / 1000, ns / 1000, c) for ns, c in sorted(bins.items())]
    per = {}
    if iops_log and os.path.exists(iops_log):
        for line in open(iops_log):
            f = [x.strip() for x in line.split(",")]
            if len(f) >= 2:
                # An entry stamped T ms covers the second ending at T; fio's stamps jitter
                # by a millisecond or two (17001, 18000), so round rather than truncate, or
                # two entries share a second and the plot shows a false zero beside a spike.
                t = max(round(int(f[0]) / 1000) - 1, 0)
                per[t] = per.get(t, 0) + int(f[1])
    secs = [per.get(t, 0) for t in range(max(per) + 1)] if per else []
    return total, secs, pct, max_us, hist


def intervals(secs):
    return [statistics.mean(secs[i:i + INTERVAL]) for i in range(0, len(secs) - INTERVAL + 1, INTERVAL)]


def main():
    d, base, other, skip = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    spdk = len(sys.argv) < 6 or sys.argv[5] == "spdk"
    runs = {}  # (workload, target) -> [result per round]
    for line in open(os.path.join(d, "runs.tsv")):
        f = line.rstrip("\n").split("\t")
        rnd, target, wl, kind, log = f[:5]
        try:
            r = parse_bdevperf(log) if kind == "bdevperf" else parse_fio(log, f[5] if len(f) > 5 else "")
        except Exception as e:  # a failed run is reported, not fatal
            print(f"round {rnd} {target} {wl}: cannot parse {log}: {e}")
            continue
        runs.setdefault((wl, target), []).append((int(rnd), r))
    workloads = list(dict.fromkeys(wl for wl, _ in runs))
    targets = list(dict.fromkeys(t for _, t in runs))
    med = lambda xs: statistics.median(xs) if xs else float("nan")

    def stat(wl, t, f):
        return med([f(r) for _, r in runs.get((wl, t), [])])

    print(f"\noverload tier: medians over rounds (ranges in parentheses); latency in us; intervals are {INTERVAL} s means")
    for wl in workloads:
        print(f"\n{wl}")
        print(f"  {'target':<10}{'IOPS':>10}{'p50':>10}{'p99':>10}{'p99.9':>10}{'max':>10}  min 5s after fill / mean")
        for t in targets:
            if (wl, t) not in runs:
                continue
            rs = runs[(wl, t)]
            print(f"  {t:<10}{stat(wl, t, lambda r: r[0]):>10.0f}"
                  + "".join(f"{stat(wl, t, lambda r, p=p: r[2].get(p, float('nan'))):>10.0f}" for p in (50.0, 99.0, 99.9))
                  + f"{stat(wl, t, lambda r: r[3]):>10.0f}  "
                  + f"{stat(wl, t, lambda r: min(intervals(r[1][skip:]) or [0]) / r[0] if r[0] else 0):.2f}")
            for rnd, r in rs:
                iv = " ".join(f"{x / 1000:.0f}K" for x in intervals(r[1]))
                print(f"      round {rnd}: {r[0] / 1000:.1f}K IOPS, p99.9 {r[2].get(99.9, float('nan')):.0f}, max {r[3]:.0f}; 5 s intervals: {iv}")

    def ratio(wl, a, b, f=lambda r: r[0]):
        """The per-round ratios."""
        ra, rb = dict(runs.get((wl, a), [])), dict(runs.get((wl, b), []))
        return [f(ra[k]) / f(rb[k]) for k in ra if k in rb and f(rb[k])]

    def each(wl, t, f):
        return [f(r) for _, r in runs.get((wl, t), [])]

    def show(name, vals, target):
        """Median over rounds, with the range when there are several."""
        rng = f"  ({min(vals):.2f}-{max(vals):.2f})" if len(vals) > 1 else ""
        print(f"  {name:<46}{med(vals):8.2f}  [{target}]{rng}")

    print("\npcache against the baselines of the same run (issue targets in brackets):")
    rw = next((w for w in workloads if w.startswith("randwrite")), None)
    if rw:
        show(f"{rw}: IOPS vs {base}", ratio(rw, "pcache", base), ">= 1.0, aim 1.3" if spdk else ">= 2.0")
        if other != base:
            show(f"{rw}: IOPS vs {other}", ratio(rw, "pcache", other), "context")
        show(f"{rw}: p99.9 vs {base}'s", ratio(rw, "pcache", base, lambda r: r[2].get(99.9, float("nan"))), "<= 2.0")
        show(f"{rw}: max latency (ms)", each(rw, "pcache", lambda r: r[3] / 1000), "<= 20")
        show(f"{rw}: lowest 5 s interval after fill / mean",
             each(rw, "pcache", lambda r: min(intervals(r[1][skip:]) or [0]) / r[0] if r[0] else 0), ">= 0.5")
    for wl in workloads:
        if "zipf" in wl and other != base:
            show(f"{wl}: IOPS vs {other}", ratio(wl, "pcache", other), ">= 1.9 (SPDK vs ocf_wb)")
        if "zipf" in wl:
            show(f"{wl}: IOPS vs {base}", ratio(wl, "pcache", base), "context")
    plot(d, runs, workloads, targets)


def plot(d, runs, workloads, targets):
    if not shutil.which("gnuplot"):
        print("\nno gnuplot: plots skipped (apt-get install gnuplot-nox)")
        return
    made = []
    for wl in workloads:
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", wl)
        series, dists = [], []
        for t in targets:
            if (wl, t) not in runs:
                continue
            rnd, r = runs[(wl, t)][0]
            p = os.path.join(d, f"{stem}.{t}.iops.dat")
            with open(p, "w") as f:
                for i, v in enumerate(r[1]):
                    f.write(f"{i + 1} {v}\n")
            series.append((t, p))
            # Latency distribution as a survival curve: share of I/Os slower than x.
            hist = sorted(r[4])
            n = sum(c for _, _, c in hist)
            q = os.path.join(d, f"{stem}.{t}.lat.dat")
            with open(q, "w") as f:
                left = n
                for lo, hi, c in hist:
                    left -= c
                    if left > 0:
                        f.write(f"{hi} {left / n}\n")
            dists.append((t, q))
        png = os.path.join(d, f"{stem}.iops.png")
        cmds = [f"set terminal png size 1000,500", f"set output '{png}'",
                f"set title '{wl}: IOPS per second (round 1)'", "set xlabel 'seconds'",
                "set ylabel 'IOPS'", "set yrange [0:*]", "set key outside right",
                "plot " + ", ".join(f"'{p}' with lines lw 2 title '{t}'" for t, p in series)]
        png2 = os.path.join(d, f"{stem}.latency.png")
        cmds += [f"set output '{png2}'", f"set title '{wl}: share of I/Os slower than x (round 1)'",
                 "set xlabel 'latency (us)'", "set ylabel 'share'", "set logscale xy",
                 "set yrange [1e-6:1]", "set format y '%g'",
                 "plot " + ", ".join(f"'{p}' with steps lw 2 title '{t}'" for t, p in dists)]
        subprocess.run(["gnuplot"], input="\n".join(cmds) + "\n", text=True, check=False)
        cmds.clear()
        made += [png, png2]
    print("\nplots:\n  " + "\n  ".join(made))


if __name__ == "__main__":
    main()
