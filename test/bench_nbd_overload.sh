#!/usr/bin/env bash
# The overload tier of the NBD benchmark (issue 9): the working set is many times the
# cache and the base is a real file on this machine's disk, so writeback, GC and
# admission decide what the client sees. In one run, per round, against
#   qsd     qemu-storage-daemon exporting the base file with O_DIRECT (io_uring): the bare
#           base a user would otherwise run;
#   pcache  `pcache serve` with a volatile medium in /dev/shm (stands in for pmem) over the
#           same file through io_uring + O_DIRECT.
# Jobs (fio's nbd engine, 4 KiB): a random-write fill of twice the cache (not measured),
# then randwrite QD32 over the whole base for OVERLOAD_SECS (sustained, after the fill);
# zipf(1.2) randrw 70/30 and zipf(1.2) randread QD32 for OVERLOAD_ZIPF_SECS each.
# test/overload_report.py prints IOPS, p50/p99/p99.9/max latency, every 5 s interval,
# pcache's ratios with the issue's targets, and writes PNG plots (IOPS per second and the
# latency distribution per target) next to the raw logs in the results directory.
# A benchmark: nothing here fails on a number.
#
# Environment: OVERLOAD_SECS (default 60), OVERLOAD_ZIPF_SECS (30), OVERLOAD_ROUNDS (1),
# OVERLOAD_CACHE_MB (256), OVERLOAD_BASE_MB (4096, kept at least 8x the cache),
# OVERLOAD_DIR (results, default target/bench/overload/nbd-<time>), OVERLOAD_CORES
# (pcache serve --cores, default all).
set -euo pipefail
# Results: OVERLOAD_DIR, any directory (created; relative to where the script was
# started), else target/bench/overload/nbd-<time> in the clone.
if [ -n "${OVERLOAD_DIR:-}" ]; then
  mkdir -p "$OVERLOAD_DIR"
  OVERLOAD_DIR=$(cd "$OVERLOAD_DIR" && pwd)
fi
cd "$(dirname "$0")/.."
SECS=${OVERLOAD_SECS:-60}
ZSECS=${OVERLOAD_ZIPF_SECS:-30}
ROUNDS=${OVERLOAD_ROUNDS:-1}
CACHE_MB=${OVERLOAD_CACHE_MB:-256}
BASE_MB=${OVERLOAD_BASE_MB:-4096}
if ((BASE_MB < 8 * CACHE_MB)); then
  echo "OVERLOAD_BASE_MB ($BASE_MB) must be at least 8x OVERLOAD_CACHE_MB ($CACHE_MB)" >&2
  exit 1
fi
for c in fio qemu-storage-daemon gnuplot; do
  if ! command -v "$c" > /dev/null; then
    pkg=$c
    [ "$c" = qemu-storage-daemon ] && pkg=qemu-system-common
    [ "$c" = gnuplot ] && pkg=gnuplot-nox
    echo "installing $pkg"
    apt-get install -y -q "$pkg" > /dev/null 2>&1 || { echo "SKIP: $c not installed"; exit 0; }
  fi
done
cargo build --release --quiet
# Where Cargo put it: CARGO_TARGET_DIR when set (relative to the root, like Cargo).
BIN=${CARGO_TARGET_DIR:-target}/release/pcache
OUT=${OVERLOAD_DIR:-target/bench/overload/nbd-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# The base lives on the real disk (target/ is in the worktree), written once so reads
# and overwrites hit allocated blocks; it is kept for the next run. Its directory is
# made here: it is not the results directory unless OVERLOAD_DIR is left at its default.
BASE=$(pwd)/target/bench/overload/base-${BASE_MB}m.img
mkdir -p "$(dirname "$BASE")"
if [ "$(stat -c %s "$BASE" 2> /dev/null || echo 0)" != $((BASE_MB << 20)) ]; then
  echo "writing the ${BASE_MB} MiB base file $BASE once"
  rm -f "$BASE"
  dd if=/dev/zero of="$BASE" bs=4M count=$((BASE_MB / 4)) oflag=direct status=none
fi
W=$(mktemp -d /tmp/pcache-overload.XXXXXX)
SHM=/dev/shm/pcache-overload-$$
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2> /dev/null || true; done
  wait 2> /dev/null || true
  rm -rf "$W" "$SHM"
}
trap cleanup EXIT
: > "$OUT/runs.tsv"

wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "no socket $1"; exit 1; }

# job ROUND TARGET URI NAME SECS FIO-ARGS...: one measured fio run, logged for the report.
job() {
  local rnd=$1 t=$2 uri=$3 name=$4 secs=$5
  shift 5
  local stem="$OUT/r$rnd.$t.$name"
  echo "  round $rnd $t: $name ${secs}s" >&2
  fio --output-format=json+ --name="$name" --ioengine=nbd --uri="$uri" --bs=4k --iodepth=32 \
    --size="${BASE_MB}m" --time_based --runtime="$secs" --randrepeat=0 --norandommap \
    --write_iops_log="$stem" --log_avg_msec=1000 --per_job_logs=0 "$@" > "$stem.json" 2> "$stem.err" || true
  printf '%s\t%s\t%s\tfio\t%s\t%s\n' "$rnd" "$t" "$name" "$stem.json" "${stem}_iops.log" >> "$OUT/runs.tsv"
}

target() { # ROUND TARGET URI
  local rnd=$1 t=$2 uri=$3
  echo "  round $rnd $t: fill, random writes of $((2 * CACHE_MB)) MiB" >&2
  fio --name=fill --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 \
    --size="${BASE_MB}m" --io_size="$((2 * CACHE_MB))m" --randrepeat=0 --norandommap > /dev/null 2>&1 || true
  job "$rnd" "$t" "$uri" randwrite "$SECS" --rw=randwrite
  job "$rnd" "$t" "$uri" zipf-randrw70 "$ZSECS" --rw=randrw --rwmixread=70 --random_distribution=zipf:1.2
  job "$rnd" "$t" "$uri" zipf-randread "$ZSECS" --rw=randread --random_distribution=zipf:1.2
}

echo "overload tier: base ${BASE_MB} MiB on disk, cache ${CACHE_MB} MiB, randwrite ${SECS}s after the fill, zipf ${ZSECS}s, $ROUNDS round(s); results in $OUT" >&2
for ((r = 1; r <= ROUNDS; r++)); do
  qemu-storage-daemon \
    --blockdev "driver=file,node-name=f,filename=$BASE,cache.direct=on,aio=io_uring" \
    --nbd-server "addr.type=unix,addr.path=$W/qsd.sock" \
    --export "type=nbd,id=e,node-name=f,writable=on" > "$OUT/r$r.qsd.log" 2>&1 &
  PIDS+=($!)
  wait_sock "$W/qsd.sock"
  target "$r" qsd "nbd+unix:///f?socket=$W/qsd.sock"
  kill "${PIDS[-1]}"
  wait "${PIDS[-1]}" 2> /dev/null || true
  rm -f "$W/qsd.sock"

  rm -f "$SHM"
  cores=()
  [ -n "${OVERLOAD_CORES:-}" ] && cores=(--cores "$OVERLOAD_CORES")
  $BIN serve --pmem "$SHM" --persistence volatile --pmem-size "${CACHE_MB}M" --backing "$BASE" \
    --nbd-socket "$W/pcache.sock" --control "$W/pcache.ctl" "${cores[@]}" > "$OUT/r$r.pcache.log" 2>&1 &
  PIDS+=($!)
  wait_sock "$W/pcache.sock"
  target "$r" pcache "nbd+unix:///?socket=$W/pcache.sock"
  echo '{"cmd":"status"}' | python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(sys.stdin.read().encode())
print(s.makefile().readline().strip())' "$W/pcache.ctl" > "$OUT/r$r.pcache.status.json" 2> /dev/null || true
  kill "${PIDS[-1]}"
  wait "${PIDS[-1]}" 2> /dev/null || true
  rm -f "$W/pcache.sock" "$SHM"
done

python3 test/overload_report.py "$OUT" qsd qsd 0 embedded
echo "raw logs: $OUT"
