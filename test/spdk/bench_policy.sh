#!/usr/bin/env bash
# The cache-policy benchmark of issue 11, SPDK side: `bash test/spdk/bench.sh policy`.
# A benchmark: it prints numbers and ratios, nothing fails on a number. One core
# (bdevperf -m 0x1), the base a real file on this machine's disk through bdev_aio (the
# core bdev_ocf accepts: bdev_uring answers FLUSH with -95), caches of POLICY_CACHE_MB.
#  1. A hot random set (4 KiB randrw 70% reads, QD8, over HOT_MB at the start of the
#     device) next to one large sequential writer (1 MiB writes, QD4, over the rest):
#     the hot job's IOPS and the read hit ratio, for pcache and bdev_ocf write-back,
#     each with the sequential cutoff off and on (1 MiB, policy "always"; OCF's
#     bdev_ocf_set_seqcutoff). A warm-up run first, then the measured run; the hit
#     ratio is taken over the measured run only (statistics before and after).
#     Without the cutoff the stream floods the cache and evicts the hot set.
#  2. Each pcache cache mode against the bare base: a fill, then 4 KiB randwrite and
#     randread QD32 over MODE_MB (inside the cache), IOPS and the ratio to the base.
#
# Environment: as test/spdk/run.sh (SPDK_DIR), POLICY_SECS (measured seconds per job,
# default 20), POLICY_WARM_SECS (10), POLICY_CACHE_MB (512), POLICY_BASE_MB (4096),
# POLICY_HOT_MB (128), POLICY_MODE_MB (256), POLICY_DIR (raw logs, default
# target/bench/policy/spdk-<time>).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=test/spdk/common.sh
. "$HERE/common.sh"

SECS=${POLICY_SECS:-20}
WARM=${POLICY_WARM_SECS:-10}
CACHE_MB=${POLICY_CACHE_MB:-512}
BASE_MB=${POLICY_BASE_MB:-4096}
HOT_MB=${POLICY_HOT_MB:-128}
MODE_MB=${POLICY_MODE_MB:-256}
OUT=${POLICY_DIR:-$ROOT/target/bench/policy/spdk-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if ((HOT_MB * 2 > CACHE_MB || MODE_MB > CACHE_MB || BASE_MB < 4 * CACHE_MB)); then
    echo "need POLICY_HOT_MB <= half the cache, POLICY_MODE_MB <= the cache, base >= 4x the cache" >&2
    exit 1
fi
# Shared with the overload tiers: written once, kept for the next run.
BASE=$ROOT/target/bench/overload/base-${BASE_MB}m.img
mkdir -p "$(dirname "$BASE")"
if [ "$(stat -c %s "$BASE" 2> /dev/null || echo 0)" != $((BASE_MB << 20)) ]; then
    echo "writing the ${BASE_MB} MiB base file $BASE once" >&2
    rm -f "$BASE"
    dd if=/dev/zero of="$BASE" bs=4M count=$((BASE_MB / 4)) oflag=direct status=none
fi
APP_MEM="--no-huge -s $((CACHE_MB + 2048))"

aio() { # NAME
    echo '{"method": "bdev_aio_create", "params": {"name": "'"$1"'", "filename": "'"$BASE"'", "block_size": 4096}}'
}
pcache_on() { # MODE CUTOFF_KIB
    echo '{"method": "bdev_pcache_create", "params": {"name": "Target0", "base_bdev_name": "Base0", "pmem_path": "'"$SHM"'-policy", "pmem_size_mb": '"$CACHE_MB"', "persistence": "volatile", "format": true, "cache_mode": "'"$1"'", "seq_cutoff_kib": '"$2"', "seq_cutoff_policy": "always"}}'
}
ocf_cache='{"method": "bdev_malloc_create", "params": {"name": "OcfCache0", "num_blocks": '$((CACHE_MB * 256))', "block_size": 4096}}'
ocf='{"method": "bdev_ocf_create", "params": {"name": "Target0", "mode": "wb", "cache_bdev_name": "OcfCache0", "core_bdev_name": "Base0"}}'
config() { # JSON method objects...
    local IFS=,
    echo "{\"subsystems\": [{\"subsystem\": \"bdev\", \"config\": [$*, {\"method\": \"bdev_wait_for_examine\"}]}]}"
}

# session LABEL CONFIG-JSON BDEVPERF-ARGS...: a bdevperf waiting for perform_tests.
session() {
    local label=$1
    echo "$2" > "$WORK/pol-$label.json"
    shift 2
    SOCK=$WORK/pol-$label.sock
    rm -f "$SHM"-policy
    start "pol-$label" 1 0x1 "$SOCK" "$BDEVPERF" -c "$WORK/pol-$label.json" -z -T Target0 "$@"
    SPID=$APP_PID
    LOG=$WORK/pol-$label.log
    if ! wait_up "$SOCK"; then
        echo "$label: bdevperf did not start" >&2
        tail -5 "$LOG" >&2
        return 1
    fi
}
# perform SECS [PARAMS]: one perform_tests (PARAMS empty: the -j job file's jobs).
perform() {
    raw "$SOCK" perform_tests "${2:-}" $(($1 + 120)) > /dev/null 2>&1
    sleep 1
}
# read_stats LABEL: "reads hits" of the target so far.
read_stats() {
    case $1 in
        ocf*) raw "$SOCK" bdev_ocf_get_stats '{"name": "Target0"}' 10 |
            python3 -c 'import json,sys; r=json.load(sys.stdin)["requests"]; print(r["rd_total"]["count"], r["rd_hits"]["count"])' ;;
        *) raw "$SOCK" bdev_pcache_get_stats '{"name": "Target0"}' 10 |
            python3 -c 'import json,sys; d=json.load(sys.stdin); d=d[0] if isinstance(d,list) else d; print(d["hits"]+d["misses"]+d["partial_hits"], d["hits"])' ;;
    esac
}
# The last perform_tests' per-job IOPS from a bdevperf log: "hot_iops stream_iops".
job_iops() {
    tr '\r' '\n' < "$1" | awk '
        /^ *Job: .*workload: randrw/ { want = "hot" } /^ *Job: .*workload: write/ { want = "seq" }
        want != "" && $2 == ":" { v[want] = $4; want = "" }
        /^ *Total *:/ { out = v["hot"] " " v["seq"] }
        END { print out }'
}

# ------------------------------------------------------------- 1. hot set + stream
hot_blocks=$((HOT_MB * 256))
seq_off=$(((BASE_MB / 4) * 256)) # the stream runs over the last three quarters
seq_len=$((BASE_MB * 256 - seq_off))
cat > "$WORK/jobs.conf" << EOF
[global]
filename=Target0
[hot]
rw=randrw
rwmixread=70
bs=4096
iodepth=8
offset=0
length=$hot_blocks
[stream]
rw=write
bs=1048576
iodepth=4
offset=$seq_off
length=$seq_len
EOF
echo "policy tier: base ${BASE_MB} MiB on disk (bdev_aio), cache ${CACHE_MB} MiB, hot set ${HOT_MB} MiB, warm ${WARM}s + ${SECS}s per case; results in $OUT" >&2
declare -A HOT SEQ HIT
for c in pcache_nocut pcache_cut ocf_nocut ocf_cut; do
    case $c in
        pcache_nocut) cfg_json=$(config "$(aio Base0)" "$(pcache_on writeback 0)") ;;
        pcache_cut) cfg_json=$(config "$(aio Base0)" "$(pcache_on writeback 1024)") ;;
        ocf*) cfg_json=$(config "$(aio Base0)" "$ocf_cache" "$ocf") ;;
    esac
    session "$c" "$cfg_json" -j "$WORK/jobs.conf" -t "$SECS" || continue
    if [ "$c" = ocf_cut ]; then
        raw "$SOCK" bdev_ocf_set_seqcutoff '{"name": "Target0", "policy": "always", "threshold": 1024}' 10 > /dev/null
    elif [ "$c" = ocf_nocut ]; then
        raw "$SOCK" bdev_ocf_set_seqcutoff '{"name": "Target0", "policy": "never"}' 10 > /dev/null
    fi
    echo "  $c: warm-up ${WARM}s, measured ${SECS}s" >&2
    perform "$WARM" '{"time_in_sec": '"$WARM"'}'
    read -r r0 h0 <<< "$(read_stats "$c")"
    perform "$SECS" '{"time_in_sec": '"$SECS"'}'
    read -r r1 h1 <<< "$(read_stats "$c")"
    read -r HOT[$c] SEQ[$c] <<< "$(job_iops "$LOG")"
    HIT[$c]=$(python3 -c 'import sys; r, h = int(sys.argv[1]) - int(sys.argv[3]), int(sys.argv[2]) - int(sys.argv[4]); print(f"{100 * h / r:.1f}" if r > 0 else "n/a")' "${r1:-0}" "${h1:-0}" "${r0:-0}" "${h0:-0}")
    stop "$SOCK" "$SPID"
    cp "$LOG" "$OUT/"
done

# ------------------------------------------------------------- 2. each mode vs base
# A base of MODE_MB (its own file on disk, inside the cache), so that reads can hit;
# writes outside write-back go to the disk.
MBASE=$ROOT/target/bench/policy/modes-${MODE_MB}m.img
mkdir -p "$(dirname "$MBASE")"
if [ "$(stat -c %s "$MBASE" 2> /dev/null || echo 0)" != $((MODE_MB << 20)) ]; then
    dd if=/dev/zero of="$MBASE" bs=4M count=$((MODE_MB / 4)) oflag=direct status=none
fi
maio() { echo '{"method": "bdev_aio_create", "params": {"name": "'"$1"'", "filename": "'"$MBASE"'", "block_size": 4096}}'; }
declare -A MW MR
for t in base writeback writethrough writearound passthrough; do
    if [ "$t" = base ]; then
        cfg_json=$(config "$(maio Target0)")
    else
        cfg_json=$(config "$(maio Base0)" "$(pcache_on "$t" 0)")
    fi
    session "mode-$t" "$cfg_json" -q 32 -o 4096 -w write -t "$SECS" || continue
    echo "  mode $t: sequential fill, randwrite ${SECS}s, randread ${SECS}s" >&2
    perform 5 '{"workload_type": "write", "time_in_sec": 5}'
    perform "$SECS" '{"workload_type": "randwrite", "time_in_sec": '"$SECS"'}'
    MW[$t]=$(bp_total "$LOG" | cut -d' ' -f1)
    perform "$SECS" '{"workload_type": "randread", "time_in_sec": '"$SECS"'}'
    MR[$t]=$(bp_total "$LOG" | cut -d' ' -f1)
    stop "$SOCK" "$SPID"
    cp "$LOG" "$OUT/"
done

# ------------------------------------------------------------- report
{
    echo
    echo "1. hot set (4 KiB randrw 70/30 QD8 over ${HOT_MB} MiB) + one sequential writer (1 MiB QD4), ${SECS}s after ${WARM}s warm-up"
    printf '  %-14s %12s %10s %14s\n' case hot_IOPS hit_% stream_IOPS
    for c in pcache_nocut pcache_cut ocf_nocut ocf_cut; do
        printf '  %-14s %12s %10s %14s\n' "$c" "${HOT[$c]:-n/a}" "${HIT[$c]:-n/a}" "${SEQ[$c]:-n/a}"
    done
    python3 - "${HOT[pcache_cut]:-0}" "${HOT[pcache_nocut]:-0}" "${HOT[ocf_cut]:-0}" << 'PY'
import sys
pc, pn, oc = (float(x or 0) for x in sys.argv[1:])
if pn: print(f"  pcache hot-set IOPS with the cutoff / without: {pc / pn:.2f}x")
if oc: print(f"  pcache with cutoff / bdev_ocf with cutoff (hot set): {pc / oc:.2f}x")
PY
    echo
    echo "2. each mode, 4 KiB QD32 over ${MODE_MB} MiB (in cache), IOPS and ratio to the bare base"
    printf '  %-13s %12s %8s %12s %8s\n' mode randwrite ratio randread ratio
    for t in base writeback writethrough writearound passthrough; do
        python3 -c 'import sys
t, w, r, bw, br = sys.argv[1], *(float(x or 0) for x in sys.argv[2:])
f = lambda a, b: f"{a / b:.2f}x" if b else "n/a"
print(f"  {t:<13} {w:>12.0f} {f(w, bw):>8} {r:>12.0f} {f(r, br):>8}")' \
            "$t" "${MW[$t]:-0}" "${MR[$t]:-0}" "${MW[base]:-0}" "${MR[base]:-0}"
    done
    echo "raw logs: $OUT"
} | tee "$OUT/summary.txt"
