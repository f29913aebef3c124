#!/usr/bin/env bash
# The SPDK benchmark of issue 4 (a benchmark, not a test: it reports, never fails on a
# number). On one core (bdevperf -m 0x1), 4 KiB I/O:
#   malloc     a malloc bdev of the base's size: the memcpy ceiling inside SPDK
#   base       the slow base alone: a delay bdev over malloc, 80 us reads / 25 us writes
#   passthru   a passthru vbdev over that base
#   ocf_wb     bdev_ocf in write-back mode, cache = a malloc bdev of the pcache's size
#   pcache     pcache over the base, medium in /dev/shm (volatile), which pcache
#              rebuilds into 2 MiB pages in the background (huge_pages, default), as
#              device-dax maps real pmem; malloc's memory keeps 4 KiB pages under
#              --no-huge, where a production SPDK would give it hugepages
#   pcache_4k  context: the same with "huge_pages": false (4 KiB pages, as before)
# Each runs in its own bdevperf process: a sequential write fills the device (so reads
# hit in the caches; its IOPS are shown too), then randread QD32, randread QD1,
# randwrite QD32, randwrite QD1.
# Cold reads: pcache and passthru over a delay bdev over a 64 GiB null bdev (misses
# all the way: the cache cannot warm up), randread QD32 and QD1.
# The machine's speed drifts over minutes (a VM shares memory bandwidth), so the
# targets pcache is compared with run in rounds: each round runs malloc, ocf_wb, pcache
# and the cold pair back to back, a ratio is taken within a round, and the summary
# gives the median over rounds (with every round's value). base and passthru, context
# only, run once.
# Prints IOPS and mean latency per target and workload (medians), and pcache's ratios.
#
# Environment: as test/spdk/run.sh (SPDK_DIR / PKG_CONFIG_PATH), BENCH_SECONDS (per
# workload, default 5), BENCH_ROUNDS (default 3), BENCH_CACHE_MB (pcache medium and
# OCF cache, default 512), BENCH_BASE_MB (base, default 256).
#
# `bash test/spdk/bench.sh overload` runs the overload tier instead (test/spdk/bench_overload.sh:
# working set 8x the cache on the real disk, sustained writes, tail latency, plots), and
# `bash test/spdk/bench.sh policy` the cache-policy tier (test/spdk/bench_policy.sh).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
if [ "${1:-}" = overload ]; then
    exec bash "$HERE/bench_overload.sh"
elif [ "${1:-}" = policy ]; then
    exec bash "$HERE/bench_policy.sh"
fi
# shellcheck source=test/spdk/common.sh
. "$HERE/common.sh"

T=${BENCH_SECONDS:-5}
ROUNDS=${BENCH_ROUNDS:-3}
ROUND=1
CACHE_MB=${BENCH_CACHE_MB:-512}
BASE_MB=${BENCH_BASE_MB:-256}
BASE_BLOCKS=$((BASE_MB * 256))
RESULTS=$WORK/results.tsv
: > "$RESULTS"

malloc_base='{"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": '$BASE_BLOCKS', "block_size": 4096}}'
delay_base='{"method": "bdev_delay_create", "params": {"name": "Delay0", "base_bdev_name": "Malloc0", "avg_read_latency": 80, "p99_read_latency": 80, "avg_write_latency": 25, "p99_write_latency": 25}}'
# Named like the malloc base so the same delay bdev config sits on top of it.
null_base='{"method": "bdev_null_create", "params": {"name": "Malloc0", "num_blocks": 16777216, "block_size": 4096}}'
pcache='{"method": "bdev_pcache_create", "params": {"name": "Target0", "base_bdev_name": "Delay0", "pmem_path": "'$SHM'-bench", "pmem_size_mb": '$CACHE_MB', "persistence": "volatile", "format": true}}'
passthru='{"method": "bdev_passthru_create", "params": {"name": "Target0", "base_bdev_name": "Delay0"}}'
ocf_cache='{"method": "bdev_malloc_create", "params": {"name": "OcfCache0", "num_blocks": '$((CACHE_MB * 256))', "block_size": 4096}}'
ocf='{"method": "bdev_ocf_create", "params": {"name": "Target0", "mode": "wb", "cache_bdev_name": "OcfCache0", "core_bdev_name": "Delay0"}}'
malloc_only='{"method": "bdev_malloc_create", "params": {"name": "Target0", "num_blocks": '$BASE_BLOCKS', "block_size": 4096}}'
base_only='{"method": "bdev_delay_create", "params": {"name": "Target0", "base_bdev_name": "Malloc0", "avg_read_latency": 80, "p99_read_latency": 80, "avg_write_latency": 25, "p99_write_latency": 25}}'

pcache_4k='{"method": "bdev_pcache_create", "params": {"name": "Target0", "base_bdev_name": "Delay0", "pmem_path": "'$SHM'-bench", "pmem_size_mb": '$CACHE_MB', "persistence": "volatile", "format": true, "huge_pages": false}}'

config() { # JSON method objects...
    local IFS=,
    echo "{\"subsystems\": [{\"subsystem\": \"bdev\", \"config\": [$*, {\"method\": \"bdev_wait_for_examine\"}]}]}"
}

# perform TARGET LABEL WORKLOAD QD SECONDS: one bdevperf run over RPC, appended to RESULTS.
perform() {
    local sock=$1 label=$2 wl=$3 qd=$4 secs=$5 out
    out=$(raw "$sock" perform_tests "{\"workload_type\": \"$wl\", \"queue_depth\": $qd, \"io_size\": \"4096\", \"time_in_sec\": $secs}" $((secs + 60)) 2>&1)
    python3 - "$ROUND" "$label" "$wl" "$qd" "$out" >> "$RESULTS" << 'PY'
import json, sys
rnd, label, wl, qd, out = sys.argv[1:6]
try:
    r = json.loads(out)["results"][0]
    print(f"{rnd}\t{label}\t{wl}\t{qd}\t{r['iops']:.0f}\t{r['avg_latency_us']:.2f}\t{r['io_failed']}")
except Exception:
    print(f"{rnd}\t{label}\t{wl}\t{qd}\t0\t0\terror: {out[:80]!r}")
PY
}

# bench LABEL CONFIG_JSON WORKLOADS...: WORKLOADS are "wl:qd:secs" triples.
bench() {
    local label=$1 cfgtext=$2
    shift 2
    local sock=$WORK/bench-$label.sock
    echo "$cfgtext" > "$WORK/bench-$label.json"
    rm -f "$SHM"-bench
    start "bench-$label" 1 0x1 "$sock" "$BDEVPERF" -c "$WORK/bench-$label.json" -z \
        -q 32 -o 4096 -w randread -t "$T" -T Target0
    local pid=$APP_PID
    if ! wait_up "$sock"; then
        echo "$label: bdevperf did not start" >&2
        tail -5 "$WORK/bench-$label.log" >&2
        return
    fi
    raw "$sock" spdk_get_version '' 5 2> /dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])' > "$WORK/version" 2> /dev/null
    local w
    for w in "$@"; do
        IFS=: read -r wl qd secs <<< "$w"
        echo "  round $ROUND $label: $wl qd$qd ${secs}s" >&2
        perform "$sock" "$label" "$wl" "$qd" "$secs"
    done
    stop "$sock" "$pid"
}

WL=("write:32:3" "randread:32:$T" "randread:1:$T" "randwrite:32:$T" "randwrite:1:$T")
echo "benchmark: ${T}s per workload, $ROUNDS rounds, base ${BASE_MB} MiB, cache ${CACHE_MB} MiB, one core" >&2
COLD=("randread:32:$T" "randread:1:$T")
bench base "$(config "$malloc_base" "$base_only")" "${WL[@]}"
bench passthru "$(config "$malloc_base" "$delay_base" "$passthru")" "${WL[@]}"
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
    bench malloc "$(config "$malloc_only")" "${WL[@]}"
    bench ocf_wb "$(config "$malloc_base" "$delay_base" "$ocf_cache" "$ocf")" "${WL[@]}"
    bench pcache "$(config "$malloc_base" "$delay_base" "$pcache")" "${WL[@]}"
    bench pcache_4k "$(config "$malloc_base" "$delay_base" "$pcache_4k")" "${WL[@]}"
    bench passthru_cold "$(config "$null_base" "$delay_base" "$passthru")" "${COLD[@]}"
    bench pcache_cold "$(config "$null_base" "$delay_base" "$pcache")" "${COLD[@]}"
done

python3 - "$RESULTS" "$(cat "$WORK/version" 2> /dev/null)" << 'PY'
import statistics, sys
rows = {}  # (label, wl, qd) -> {round: (iops, lat)}
errors = []
for line in open(sys.argv[1]):
    rnd, label, wl, qd, iops, lat, failed = line.rstrip("\n").split("\t")
    rows.setdefault((label, wl, int(qd)), {})[int(rnd)] = (float(iops), float(lat))
    if failed != "0":
        errors.append(f"round {rnd} {label} {wl} qd{qd}: {failed}")
nan = float("nan")

def get(label, wl, qd, i):
    v = rows.get((label, wl, qd))
    return statistics.median(x[i] for x in v.values()) if v else nan

def per_round(f):
    """f(round) for every round where it is defined, and their median."""
    vals = []
    for rnd in sorted({r for v in rows.values() for r in v}):
        try:
            vals.append(f(rnd))
        except (KeyError, ZeroDivisionError):
            pass
    return (statistics.median(vals) if vals else nan), vals

def val(rnd, label, wl, qd, i):
    return rows[(label, wl, qd)][rnd][i]

targets = ["malloc", "base", "passthru", "ocf_wb", "pcache"]
if any(k[0] == "pcache_4k" for k in rows):
    targets.append("pcache_4k")
n_rounds = len({r for v in rows.values() for r in v})
print()
print(sys.argv[2] or "SPDK")
print(f"medians over {n_rounds} round(s) (base and passthru: one run)")
print(f"{'workload':<24}" + "".join(f"{t:>12}" for t in targets))
for wl, qd, what in [("write", 32, "IOPS"), ("randwrite", 32, "IOPS"), ("randread", 32, "IOPS"),
                     ("randwrite", 1, "lat_us"), ("randread", 1, "lat_us")]:
    i = 0 if what == "IOPS" else 1
    name = f"{wl} qd{qd} {what}"
    print(f"{name:<24}" + "".join(f"{get(t, wl, qd, i):>12.2f}" if i else f"{get(t, wl, qd, i):>12.0f}" for t in targets))
print(f"{'cold randread qd32 IOPS':<24}{'':>24}{get('passthru_cold', 'randread', 32, 0):>12.0f}{'':>12}{get('pcache_cold', 'randread', 32, 0):>12.0f}")
print(f"{'cold randread qd1 lat_us':<24}{'':>24}{get('passthru_cold', 'randread', 1, 1):>12.2f}{'':>12}{get('pcache_cold', 'randread', 1, 1):>12.2f}")
print()

def ratio(a, wa, b, wb=None, qd=32):
    wb = wb or wa
    return per_round(lambda r: val(r, a, wa, qd, 0) / val(r, b, wb, qd, 0))

def show(name, med_vals, target, unit="x"):
    med, vals = med_vals
    each = ", ".join(f"{v:.2f}" for v in vals)
    print(f"  {name:<28}{med:6.2f}{unit}  [{target}]  rounds: {each}")

print("pcache ratios, median of per-round ratios (issue targets in brackets):")
show("randwrite qd32 vs malloc", ratio("pcache", "randwrite", "malloc"), ">= 0.9")
show("randread  qd32 vs malloc", ratio("pcache", "randread", "malloc"), ">= 0.9, read hits")
show("randwrite qd32 vs ocf_wb", ratio("pcache", "randwrite", "ocf_wb"), ">= 3")
show("randread  qd32 vs ocf_wb", ratio("pcache", "randread", "ocf_wb"), ">= 3")
show("cold randread vs passthru", ratio("pcache_cold", "randread", "passthru_cold"), ">= 0.95")
show("randwrite qd1 lat - malloc's",
     per_round(lambda r: val(r, "pcache", "randwrite", 1, 1) - val(r, "malloc", "randwrite", 1, 1)),
     "<= +0.3", " us")
if "pcache_4k" in targets:
    show("4k randwrite qd32 vs malloc", ratio("pcache_4k", "randwrite", "malloc"), "context")
    show("4k randread  qd32 vs malloc", ratio("pcache_4k", "randread", "malloc"), "context")
    show("4k randwrite qd1 lat - malloc's",
         per_round(lambda r: val(r, "pcache_4k", "randwrite", 1, 1) - val(r, "malloc", "randwrite", 1, 1)),
         "context", " us")
show("ocf_wb randwrite vs malloc", ratio("ocf_wb", "randwrite", "malloc"), "context")
show("ocf_wb randread  vs malloc", ratio("ocf_wb", "randread", "malloc"), "context")
if errors:
    print("I/O errors: " + "; ".join(errors))
PY
