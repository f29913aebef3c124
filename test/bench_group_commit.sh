#!/usr/bin/env bash
# Group-commit benchmark (issue 12): fio 4 KiB random writes at QD32 over NBD against
#   file      `pcache serve` as a new user runs it: the medium is a regular file on disk
#             (no --persistence: `file` mode, durable through the page cache), the
#             default 256 MiB medium in 4 MiB segments, a 1 GiB backing file;
#   volatile  the same, with the medium in /dev/shm and --persistence volatile (no sync
#             at all: the ceiling group commit is measured against).
# Rounds alternate file/volatile so drift on a shared machine hits both alike; prints
# each round, the median of the file/volatile IOPS ratios (issue target >= 0.3) and the
# group syncs the file run issued per write. A benchmark, not a test: nothing here
# passes or fails on a number.
#
# Usage: bash test/bench_group_commit.sh [seconds-per-job (default 10)] [rounds (default 3)]
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-10}"
ROUNDS="${2:-3}"
command -v fio >/dev/null || { echo "SKIP: fio not installed"; exit 0; }
cargo build --release --quiet
# Where Cargo put it: CARGO_TARGET_DIR when set (relative to the root, like Cargo).
BIN=${CARGO_TARGET_DIR:-target}/release/pcache
W=$(mktemp -d /var/tmp/pcache-gc-bench.XXXXXX)
SHM=/dev/shm/pcache-gc-bench-$$
PID=
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$W" "$SHM"
}
trap cleanup EXIT

wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "no socket $1"; exit 1; }

# One round of one mode -> "iops p50_us p99_us"
run_mode() {
  local mode=$1 pmem extra=()
  rm -rf "$W/$mode" "$SHM"
  mkdir -p "$W/$mode"
  truncate -s 1G "$W/$mode/backing.img"
  if [ "$mode" = volatile ]; then
    pmem=$SHM
    extra=(--persistence volatile)
  else
    pmem=$W/$mode/pmem.img
  fi
  $BIN serve --pmem "$pmem" "${extra[@]}" --pmem-size 256M --segment-size 4M \
    --backing "$W/$mode/backing.img" --nbd-socket "$W/$mode/nbd.sock" \
    --control "$W/$mode/ctl" >"$W/$mode/log" 2>&1 &
  PID=$!
  wait_sock "$W/$mode/nbd.sock"
  grep -q "persistence $mode" "$W/$mode/log" || { echo "wrong mode:"; cat "$W/$mode/log"; exit 1; }
  fio --output-format=json --name=gc --ioengine=nbd --uri="nbd+unix:///?socket=$W/$mode/nbd.sock" \
    --rw=randwrite --bs=4k --iodepth=32 --size=64m --time_based --runtime="$SECS" \
    --randrepeat=0 --norandommap 2>/dev/null |
    python3 -c '
import json,sys
t=sys.stdin.read()
j=json.loads(t[t.index("{"):])["jobs"][0]["write"]
p=j["clat_ns"].get("percentile",{})
print("%.0f %.1f %.1f" % (j["iops"], p.get("50.000000",0)/1e3, p.get("99.000000",0)/1e3))'
  kill "$PID"; wait "$PID" 2>/dev/null || true
  PID=
}

RATIOS=()
printf '%-6s %-26s %-26s %s\n' round "file IOPS/p50us/p99us" "volatile IOPS/p50us/p99us" ratio
for r in $(seq "$ROUNDS"); do
  read -r fi fp50 fp99 <<<"$(run_mode file)"
  read -r vi vp50 vp99 <<<"$(run_mode volatile)"
  ratio=$(python3 -c "print('%.3f' % ($fi/$vi if $vi else 0))")
  RATIOS+=("$ratio")
  printf '%-6s %-26s %-26s %s\n' "$r" "$fi/$fp50/$fp99" "$vi/$vp50/$vp99" "$ratio"
done
median=$(printf '%s\n' "${RATIOS[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
echo
echo "group commit: file / volatile randwrite 4k QD32, median of $ROUNDS: $median  (target >= 0.3)"
