#!/usr/bin/env bash
# Cache policy benchmark (issue 11), embedded runtime, everything in one run:
#  1. a hot random set (4 KiB, 70% reads, QD8, 32 MiB) next to one large sequential
#     writer (1 MiB, QD4, over 1 GiB): the hot set's IOPS and the cache's hit ratio with
#     the sequential cutoff off and on (1 MiB, policy always). Without the cutoff the
#     stream floods the cache and evicts the hot set.
#  2. each cache mode's 4 KiB random write and read IOPS against the bare backing file
#     (qemu-storage-daemon, O_DIRECT), same jobs, same run.
# The medium is in /dev/shm (volatile: stands in for pmem), the backing file on disk.
# A benchmark, not a test: it prints numbers and ratios, nothing passes or fails.
#
# Usage: bash test/bench_policy.sh [seconds-per-job (default 8)]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-8}"
for c in fio qemu-storage-daemon; do
  command -v "$c" >/dev/null || { echo "SKIP: $c not installed"; exit 0; }
done
cargo build --release --quiet
# Where Cargo put it: CARGO_TARGET_DIR when set (relative to the root, like Cargo).
BIN=${CARGO_TARGET_DIR:-target}/release/pcache
W=$(mktemp -d /var/tmp/pcache-bench-policy.XXXXXX)
SHM=/dev/shm/pcache-bench-policy-$$
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  cat "$W/pcache.log" 2>/dev/null | tail -3 >&2 || true
  rm -rf "$W" "$SHM"
}
trap cleanup EXIT
truncate -s 2G "$W/backing.img"

wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "no socket $1"; exit 1; }

serve() { # serve <pmem-size> <extra args...>
  local size=$1; shift
  rm -f "$SHM" "$W/pcache.sock"
  $BIN serve --pmem "$SHM" --persistence volatile --pmem-size "$size" --force \
    --segment-size 4M --backing "$W/backing.img" --nbd-socket "$W/pcache.sock" \
    --control "$W/pcache.ctl" "$@" >"$W/pcache.log" 2>&1 &
  PIDS+=($!)
  wait_sock "$W/pcache.sock"
}
stop() { kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true; unset 'PIDS[-1]'; }
status() { $BIN status --json --pmem "$SHM" --control "$W/pcache.ctl"; }

# fio JSON on stdin -> "iops-of-job-0 (read+write)"
job_iops() {
  python3 -c '
import json,sys
t=sys.stdin.read()
j=json.loads(t[t.index("{"):])["jobs"][int(sys.argv[1])]
print("%.0f" % (j["read"]["iops"]+j["write"]["iops"]))' "$1"
}

# 1. hot set + sequential stream, cutoff off / on
hot_vs_stream() { # <label> <serve args...>
  local label=$1; shift
  serve 256M "$@"
  local uri="nbd+unix:///?socket=$W/pcache.sock"
  # warm the hot set so it starts cached
  fio --name=warm --ioengine=nbd --uri="$uri" --rw=write --bs=64k --size=32m >/dev/null 2>&1
  # Status JSON goes through files: with its latency buckets it can pass the 128 KiB
  # limit of one command-line argument.
  status > "$W/before.json"
  local out
  out=$(fio --output-format=json --ioengine=nbd --uri="$uri" --time_based --runtime="$SECS" \
    --name=hot --rw=randrw --rwmixread=70 --bs=4k --iodepth=8 --size=32m --offset=0 \
    --randrepeat=0 --norandommap \
    --name=stream --rw=write --bs=1m --iodepth=4 --size=1g --offset=512m 2>/dev/null)
  status > "$W/after.json"
  local hot
  hot=$(echo "$out" | job_iops 0)
  local hit
  hit=$(python3 -c '
import json,sys
a,b=(json.load(open(f)) for f in sys.argv[1:3])
r=b["bytes_read"]-a["bytes_read"]; h=b["bytes_hit"]-a["bytes_hit"]
print("%.3f %d" % (h/r if r else 0, b["bypassed_requests"]-a["bypassed_requests"]))' "$W/before.json" "$W/after.json")
  stop
  read -r ratio byp <<<"$hit"
  printf '%-26s hot-set IOPS %8s   read hit ratio %s   bypassed requests %s\n' "$label" "$hot" "$ratio" "$byp"
  LAST_HOT=$hot
}

echo "== hot random set + one sequential writer (cache 256 MiB, ${SECS}s each) =="
hot_vs_stream "cutoff off" --seq-cutoff 0
H_OFF=$LAST_HOT
hot_vs_stream "cutoff 1M always" --seq-cutoff 1M --seq-cutoff-policy always
H_ON=$LAST_HOT
python3 -c "a,b=$H_ON,$H_OFF; print('hot-set IOPS with cutoff / without: %.2f' % (a/b if b else 0))"

# 2. modes against the bare backing file
run_rw() { # <uri> <rw> -> iops
  fio --output-format=json --name=j --ioengine=nbd --uri="$1" --rw="$2" --bs=4k --iodepth=16 \
    --size=256m --time_based --runtime="$SECS" --randrepeat=0 --norandommap 2>/dev/null | job_iops 0
}
echo
echo "== 4 KiB random write / read QD16 over 256 MiB, cache 512 MiB, vs the bare backing file =="
qemu-storage-daemon \
  --blockdev "driver=file,node-name=f,filename=$W/backing.img,cache.direct=on,aio=io_uring" \
  --nbd-server "addr.type=unix,addr.path=$W/file.sock" \
  --export "type=nbd,id=e,node-name=f,writable=on" >/dev/null 2>&1 &
PIDS+=($!)
wait_sock "$W/file.sock"
BW=$(run_rw "nbd+unix:///f?socket=$W/file.sock" randwrite)
BR=$(run_rw "nbd+unix:///f?socket=$W/file.sock" randread)
stop
printf '%-14s write %8s IOPS   read %8s IOPS\n' "bare backing" "$BW" "$BR"
for m in writeback writethrough writearound passthrough; do
  serve 512M --cache-mode "$m" --seq-cutoff 0
  u="nbd+unix:///?socket=$W/pcache.sock"
  w=$(run_rw "$u" randwrite)
  r=$(run_rw "$u" randread)
  stop
  python3 -c "
w,r,bw,br=$w,$r,$BW,$BR
print('%-14s write %8d IOPS   read %8d IOPS   (x%.2f / x%.2f of the bare backing)' % ('$m', w, r, w/bw if bw else 0, r/br if br else 0))"
done
echo "(machine shared with other jobs: compare ratios from one run, not absolute numbers)"
