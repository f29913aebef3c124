#!/usr/bin/env bash
# Trace-driven benchmark tier (a benchmark, never pass/fail): replays block traces at a
# fixed queue depth, as fast as they go, through fio's nbd engine (read_iolog) against
#   pcache  `pcache serve`, a volatile medium in /dev/shm of each cache size (stands in for
#           pmem), over a sparse base file on the real disk, and
#   qsd     qemu-storage-daemon exporting the same kind of file with O_DIRECT (io_uring),
# and prints, per trace and cache size: pcache's speed over qsd's (median and range over
# rounds), read and write p50/p99/p99.9 of both, pcache's read byte-hit ratio, and beside
# it the hit ratios of FIFO, LRU and Belady's OPT at the same cache size, computed offline
# by test/trace_tier.py from the same trace.
#
#   bash test/bench_trace.sh                      # the four synthetic traces, 256 MiB and 1 GiB
#   TRACE_FILES="a.csv b.csv" bash test/bench_trace.sh   # your own traces (time_us,op,offset,len)
#
# Environment: TRACE_NAMES (synthetic shapes: zipf loop scan_hot mixed), TRACE_FILES,
# TRACE_CACHES_MB ("256 1024"), TRACE_ROUNDS (3), TRACE_QD (16), TRACE_REQUESTS (100000
# per synthetic trace), TRACE_DIR (results; any directory, relative to where the script
# was started; default target/bench/trace/<time>), TRACE_BASE_GB (32: the sparse base),
# TRACE_SERVE_ARGS (more `pcache serve` options, e.g. "--promotion always").
# Each round starts from a fresh base and a fresh medium, and alternates which target
# goes first. Public traces may be used locally this way; none is committed.
set -euo pipefail
if [ -n "${TRACE_DIR:-}" ]; then
  mkdir -p "$TRACE_DIR"
  TRACE_DIR=$(cd "$TRACE_DIR" && pwd)
fi
declare -a FILES=()
for f in ${TRACE_FILES:-}; do FILES+=("$(cd "$(dirname "$f")" && pwd)/$(basename "$f")"); done
cd "$(dirname "$0")/.."
NAMES=${TRACE_NAMES:-zipf loop scan_hot mixed}
[ ${#FILES[@]} -gt 0 ] && [ -z "${TRACE_NAMES:-}" ] && NAMES=
CACHES=${TRACE_CACHES_MB:-256 1024}
ROUNDS=${TRACE_ROUNDS:-3}
QD=${TRACE_QD:-16}
REQS=${TRACE_REQUESTS:-100000}
BASE_GB=${TRACE_BASE_GB:-32}

for c in fio qemu-storage-daemon; do
  if ! command -v "$c" > /dev/null; then
    pkg=$c
    [ "$c" = qemu-storage-daemon ] && pkg=qemu-system-common
    echo "installing $pkg"
    apt-get install -y -q "$pkg" > /dev/null 2>&1 || { echo "SKIP: $c not installed"; exit 0; }
  fi
done
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/pcache
OUT=${TRACE_DIR:-target/bench/trace/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# The base is on the real disk (target/ is in the clone), sparse, made anew each round.
BASE=$(pwd)/target/bench/trace/base.img
mkdir -p "$(dirname "$BASE")"
W=$(mktemp -d /tmp/pcache-trace.XXXXXX)
SHM=/dev/shm/pcache-trace-$$
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  rm -rf "$W" "$SHM" "$BASE"
}
trap cleanup EXIT
RESULTS=$OUT/results.jsonl
: > "$RESULTS"

wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "no socket $1"; exit 1; }
stop() { kill "$1" 2> /dev/null || true; wait "$1" 2> /dev/null || true; }

# replay URI IOLOG JSON: one fio replay at QD, as fast as it goes.
replay() {
  fio --name=replay --ioengine=nbd --uri="$1" --read_iolog="$2" --iodepth="$QD" \
    --output-format=json --output="$3" > /dev/null 2>&1
}

# side JSON: seconds and per-op p50/p99/p99.9 (us) of a fio result.
side() {
  python3 - "$1" << 'EOF'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
out = {"secs": j["job_runtime"] / 1000.0}
for op in ("read", "write"):
    p = j[op]["clat_ns"].get("percentile", {})
    for k, name in (("50.000000", "p50"), ("99.000000", "p99"), ("99.900000", "p999")):
        out[f"{op}_{name}_us"] = p.get(k, 0) / 1000.0
    out[f"{op}_ios"] = j[op]["total_ios"]
print(json.dumps(out))
EOF
}

declare -a TRACES=()
for n in $NAMES; do
  python3 test/trace_tier.py gen "$n" "$OUT/$n.csv" --requests "$REQS"
  TRACES+=("$OUT/$n.csv")
done
TRACES+=("${FILES[@]}")
echo "results: $OUT"
for tr in "${TRACES[@]}"; do
  name=$(basename "$tr" .csv)
  python3 test/trace_tier.py iolog "$tr" "$W/$name.iolog"
  for mb in $CACHES; do
    off=$(python3 test/trace_tier.py offline "$tr" $((mb << 20)))
    for r in $(seq "$ROUNDS"); do
      order="pcache qsd"
      [ $((r % 2)) = 0 ] && order="qsd pcache"
      for t in $order; do
        rm -f "$BASE" "$SHM"
        truncate -s "${BASE_GB}G" "$BASE"
        if [ "$t" = qsd ]; then
          qemu-storage-daemon \
            --blockdev "driver=file,node-name=f,filename=$BASE,cache.direct=on,aio=io_uring" \
            --nbd-server "addr.type=unix,addr.path=$W/qsd.sock" \
            --export "type=nbd,id=e,node-name=f,writable=on" > "$OUT/$name.$mb.r$r.qsd.log" 2>&1 &
          pid=$!
          PIDS+=("$pid")
          wait_sock "$W/qsd.sock"
          replay "nbd+unix:///f?socket=$W/qsd.sock" "$W/$name.iolog" "$OUT/$name.$mb.r$r.qsd.json"
          stop "$pid"
          rm -f "$W/qsd.sock"
        else
          "$BIN" serve --pmem "$SHM" --persistence volatile --pmem-size "${mb}M" --backing "$BASE" \
            --nbd-socket "$W/pc.sock" --control "$W/pc.ctl" ${TRACE_SERVE_ARGS:-} > "$OUT/$name.$mb.r$r.pcache.log" 2>&1 &
          pid=$!
          PIDS+=("$pid")
          wait_sock "$W/pc.sock"
          replay "nbd+unix:///?socket=$W/pc.sock" "$W/$name.iolog" "$OUT/$name.$mb.r$r.pcache.json"
          "$BIN" status --pmem "$SHM" --control "$W/pc.ctl" --json > "$OUT/$name.$mb.r$r.status.json"
          stop "$pid"
        fi
      done
      python3 - "$name" "$mb" "$r" "$off" "$(side "$OUT/$name.$mb.r$r.pcache.json")" \
        "$(side "$OUT/$name.$mb.r$r.qsd.json")" "$OUT/$name.$mb.r$r.status.json" >> "$RESULTS" << 'EOF'
import json, sys
name, mb, r, off, pc, qsd, st = sys.argv[1:]
s = json.load(open(st))
pc = json.loads(pc)
pc["byte_hit"] = s["bytes_hit"] / s["bytes_read"] if s.get("bytes_read") else 0.0
# How much of the medium held cached data at the end (older builds lack the fields).
pc["cached"] = s["cached_bytes"] / s["capacity_bytes"] if s.get("capacity_bytes") else 0.0
print(json.dumps({"trace": name, "cache_mb": int(mb), "round": int(r), "offline": json.loads(off),
                  "pcache": pc, "qsd": json.loads(qsd)}))
EOF
      tail -1 "$RESULTS" | python3 test/trace_tier.py line
    done
  done
done
echo
python3 test/trace_tier.py report "$RESULTS" | tee "$OUT/report.md"
