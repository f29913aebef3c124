#!/usr/bin/env bash
# NBD benchmark (issue 3): the same fio jobs, in one run, against
#   pcache      `pcache serve`, medium in /dev/shm (volatile: stands in for pmem, which
#               this machine lacks), backing file on disk through io_uring + O_DIRECT;
#   memory      nbdkit's memory plugin: the ceiling for an NBD export served from RAM;
#   file        qemu-storage-daemon exporting the same backing file with O_DIRECT
#               (cache.direct=on, aio=io_uring): what a user would otherwise run.
# Jobs: 4 KiB random write QD32, 4 KiB random read QD32 after a warm-up write of the
# range (read hits for pcache), 128 KiB sequential write QD8. Prints IOPS, p50/p99
# completion latency and the ratios the issue sets targets for. A benchmark, not a test:
# nothing here passes or fails on a number.
#
# Usage: bash test/bench_nbd.sh [seconds-per-job (default 8)]
#        bash test/bench_nbd.sh overload     (the overload tier, test/bench_nbd_overload.sh)
set -euo pipefail
# A relative OVERLOAD_DIR names a directory relative to where the script was started.
if [ -n "${OVERLOAD_DIR:-}" ]; then
  mkdir -p "$OVERLOAD_DIR"
  OVERLOAD_DIR=$(cd "$OVERLOAD_DIR" && pwd)
  export OVERLOAD_DIR
fi
cd "$(dirname "$0")/.."
if [ "${1:-}" = overload ]; then
  exec bash test/bench_nbd_overload.sh
fi
SECS="${1:-8}"
SIZE_MB=512
for c in fio nbdkit qemu-storage-daemon; do
  command -v "$c" >/dev/null || { echo "SKIP: $c not installed"; exit 0; }
done
cargo build --release --quiet
# Where Cargo put it: CARGO_TARGET_DIR when set (relative to the root, like Cargo).
BIN=${CARGO_TARGET_DIR:-target}/release/pcache
W=$(mktemp -d /var/tmp/pcache-bench.XXXXXX)
SHM=/dev/shm/pcache-bench-$$
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$W" "$SHM"
}
trap cleanup EXIT
truncate -s 2G "$W/backing.img"

wait_sock() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done; echo "no socket $1"; exit 1; }

# fio job on an NBD URI -> "iops p50_us p99_us"
run_job() {
  local sock=$1 name=$2 rw=$3 bs=$4 qd=$5
  fio --output-format=json --name="$name" --ioengine=nbd --uri="$sock" \
    --rw="$rw" --bs="$bs" --iodepth="$qd" --size="${SIZE_MB}m" --time_based --runtime="$SECS" \
    --randrepeat=0 --norandommap 2>/dev/null |
    python3 -c '
import json,sys
t=sys.stdin.read()
j=json.loads(t[t.index("{"):])["jobs"][0]
side=j["write"] if j["write"]["io_bytes"]>0 else j["read"]
p=side["clat_ns"].get("percentile",{})
print("%.0f %.1f %.1f" % (side["iops"], p.get("50.000000",0)/1e3, p.get("99.000000",0)/1e3))'
}

warm() {
  fio --name=warm --ioengine=nbd --uri="$1" --rw=write --bs=1m --iodepth=8 \
    --size="${SIZE_MB}m" >/dev/null 2>&1
}

declare -A R
bench_target() {
  local t=$1 sock=$2
  R[$t,rw]=$(run_job "$sock" rw randwrite 4k 32)
  warm "$sock"
  R[$t,rr]=$(run_job "$sock" rr randread 4k 32)
  R[$t,sw]=$(run_job "$sock" sw write 128k 8)
}

# pcache
$BIN serve --pmem "$SHM" --persistence volatile --pmem-size 2G --backing "$W/backing.img" \
  --nbd-socket "$W/pcache.sock" --control "$W/pcache.ctl" >"$W/pcache.log" 2>&1 &
PIDS+=($!)
wait_sock "$W/pcache.sock"
bench_target pcache "nbd+unix:///?socket=$W/pcache.sock"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

# nbdkit memory
nbdkit -f -U "$W/mem.sock" memory 2G >/dev/null 2>&1 &
PIDS+=($!)
wait_sock "$W/mem.sock"
bench_target memory "nbd+unix:///?socket=$W/mem.sock"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

# qemu-storage-daemon, O_DIRECT file export
qemu-storage-daemon \
  --blockdev "driver=file,node-name=f,filename=$W/backing.img,cache.direct=on,aio=io_uring" \
  --nbd-server "addr.type=unix,addr.path=$W/file.sock" \
  --export "type=nbd,id=e,node-name=f,writable=on" >/dev/null 2>&1 &
PIDS+=($!)
wait_sock "$W/file.sock"
bench_target file "nbd+unix:///f?socket=$W/file.sock"
kill "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

printf '\n%-28s %12s %12s %12s\n' "job (IOPS / p50 us / p99 us)" pcache memory file
for j in rw:"4k randwrite QD32" rr:"4k randread QD32 (hits)" sw:"128k seq write QD8"; do
  k=${j%%:*}; label=${j#*:}
  printf '%-28s' "$label"
  for t in pcache memory file; do
    read -r iops p50 p99 <<<"${R[$t,$k]}"
    printf ' %6s/%s/%s' "$iops" "$p50" "$p99"
  done
  echo
done
ratio() { python3 -c "a,b=$1,$2; print('%.2f' % (a/b if b else 0))"; }
iops() { echo "${R[$1,$2]}" | cut -d' ' -f1; }
echo
echo "pcache randwrite / file export:   $(ratio "$(iops pcache rw)" "$(iops file rw)")  (target >= 2.0)"
echo "pcache randwrite / memory export: $(ratio "$(iops pcache rw)" "$(iops memory rw)")  (target >= 0.7)"
echo "pcache read hits / memory export: $(ratio "$(iops pcache rr)" "$(iops memory rr)")  (target >= 0.8)"
echo "pcache seq write / file export:   $(ratio "$(iops pcache sw)" "$(iops file sw)")"
