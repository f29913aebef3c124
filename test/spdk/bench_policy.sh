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
# POLICY_HOT_MB (128), POLICY_MODE_MB (256), POLICY_ROUNDS (1: each round runs every
# case once, in turn; the report gives medians, ranges and per-round ratios),
# POLICY_PARTS ("hot modes": which parts run), POLICY_CASES ("pcache_nocut pcache_cut
# ocf_nocut ocf_cut"), POLICY_MODES ("base writeback writethrough writearound
# passthrough"), POLICY_DIR (raw logs, default target/bench/policy/spdk-<time>).
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
PARTS=" ${POLICY_PARTS:-hot modes} "
ROUNDS=${POLICY_ROUNDS:-1}
CASES=${POLICY_CASES:-pcache_nocut pcache_cut ocf_nocut ocf_cut}
MODES=${POLICY_MODES:-base writeback writethrough writearound passthrough}
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
echo "policy tier: base ${BASE_MB} MiB on disk (bdev_aio), cache ${CACHE_MB} MiB, hot set ${HOT_MB} MiB, warm ${WARM}s + ${SECS}s per case, $ROUNDS round(s); results in $OUT" >&2
RES=$OUT/results.tsv # one line per case and round, for the report
: > "$RES"
# hot_case CASE ROUND: one hot-set + stream case, appended to RES.
hot_case() {
    local c=$1 r=$2 cfg_json hot seq hit r0 h0 r1 h1
    case $c in
        pcache_nocut) cfg_json=$(config "$(aio Base0)" "$(pcache_on writeback 0)") ;;
        pcache_cut) cfg_json=$(config "$(aio Base0)" "$(pcache_on writeback 1024)") ;;
        ocf*) cfg_json=$(config "$(aio Base0)" "$ocf_cache" "$ocf") ;;
    esac
    session "$c" "$cfg_json" -j "$WORK/jobs.conf" -t "$SECS" || return 0
    if [ "$c" = ocf_cut ]; then
        raw "$SOCK" bdev_ocf_set_seqcutoff '{"name": "Target0", "policy": "always", "threshold": 1024}' 10 > /dev/null
    elif [ "$c" = ocf_nocut ]; then
        raw "$SOCK" bdev_ocf_set_seqcutoff '{"name": "Target0", "policy": "never"}' 10 > /dev/null
    fi
    echo "  round $r, $c: warm-up ${WARM}s, measured ${SECS}s" >&2
    perform "$WARM" '{"time_in_sec": '"$WARM"'}'
    read -r r0 h0 <<< "$(read_stats "$c")"
    perform "$SECS" '{"time_in_sec": '"$SECS"'}'
    read -r r1 h1 <<< "$(read_stats "$c")"
    case $c in # the target's own statistics, kept with the raw logs
        ocf*) raw "$SOCK" bdev_ocf_get_stats '{"name": "Target0"}' 10 > "$OUT/$c-r$r-stats.json" 2>&1 ;;
        *) raw "$SOCK" bdev_pcache_get_stats '{"name": "Target0"}' 10 > "$OUT/$c-r$r-stats.json" 2>&1 ;;
    esac
    read -r hot seq <<< "$(job_iops "$LOG")"
    hit=$(python3 -c 'import sys; r, h = int(sys.argv[1]) - int(sys.argv[3]), int(sys.argv[2]) - int(sys.argv[4]); print(f"{100 * h / r:.1f}" if r > 0 else "nan")' "${r1:-0}" "${h1:-0}" "${r0:-0}" "${h0:-0}")
    echo "hot $c $r ${hot:-nan} ${hit:-nan} ${seq:-nan}" >> "$RES"
    stop "$SOCK" "$SPID"
    cp "$LOG" "$OUT/pol-$c-r$r.log"
}

# ------------------------------------------------------------- 2. each mode vs base
# A base of MODE_MB (its own file on disk, inside the cache), so that reads can hit;
# writes outside write-back go to the disk.
MBASE=$ROOT/target/bench/policy/modes-${MODE_MB}m.img
mkdir -p "$(dirname "$MBASE")"
if [ "$(stat -c %s "$MBASE" 2> /dev/null || echo 0)" != $((MODE_MB << 20)) ]; then
    dd if=/dev/zero of="$MBASE" bs=4M count=$((MODE_MB / 4)) oflag=direct status=none
fi
maio() { echo '{"method": "bdev_aio_create", "params": {"name": "'"$1"'", "filename": "'"$MBASE"'", "block_size": 4096}}'; }
# mode_case MODE ROUND: one mode (or the bare base) against the modes' base, to RES.
mode_case() {
    local t=$1 r=$2 cfg_json w rd
    if [ "$t" = base ]; then
        cfg_json=$(config "$(maio Target0)")
    else
        cfg_json=$(config "$(maio Base0)" "$(pcache_on "$t" 0)")
    fi
    session "mode-$t" "$cfg_json" -q 32 -o 4096 -w write -t "$SECS" || return 0
    echo "  round $r, mode $t: sequential fill, randwrite ${SECS}s, randread ${SECS}s" >&2
    perform 5 '{"workload_type": "write", "time_in_sec": 5}'
    perform "$SECS" '{"workload_type": "randwrite", "time_in_sec": '"$SECS"'}'
    w=$(bp_total "$LOG" | cut -d' ' -f1)
    perform "$SECS" '{"workload_type": "randread", "time_in_sec": '"$SECS"'}'
    rd=$(bp_total "$LOG" | cut -d' ' -f1)
    echo "mode $t $r ${w:-nan} ${rd:-nan}" >> "$RES"
    stop "$SOCK" "$SPID"
    cp "$LOG" "$OUT/pol-mode-$t-r$r.log"
}

# Rounds interleave every case, so a slow spell of the disk lands on all of them; the
# report gives per-round ratios' medians with their ranges.
for r in $(seq 1 "$ROUNDS"); do
    if [[ $PARTS == *" hot "* ]]; then
        for c in $CASES; do hot_case "$c" "$r"; done
    fi
    if [[ $PARTS == *" modes "* ]]; then
        for t in $MODES; do mode_case "$t" "$r"; done
    fi
done

# ------------------------------------------------------------- report
python3 - "$RES" "$HOT_MB" "$SECS" "$WARM" "$MODE_MB" << 'PY' | tee "$OUT/summary.txt"
import math, statistics, sys
res, hot_mb, secs, warm, mode_mb = sys.argv[1:]
hot, mode = {}, {}
for line in open(res):
    f = line.split()
    if f[0] == "hot":
        hot.setdefault(f[1], {})[int(f[2])] = [float(x) for x in f[3:6]]
    elif f[0] == "mode":
        mode.setdefault(f[1], {})[int(f[2])] = [float(x) for x in f[3:5]]
def med(xs):
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "n/a"
    m = statistics.median(xs)
    if len(xs) == 1:
        return f"{m:.4g}"
    return f"{m:.4g} ({min(xs):.4g}-{max(xs):.4g})"
def ratio(a, b, i):  # per-round ratios of column i, where both ran
    rs = [a[r][i] / b[r][i] for r in a if r in b and b[r][i] > 0 and not math.isnan(a[r][i])]
    if not rs:
        return "n/a"
    m = statistics.median(rs)
    return f"{m:.2f}x" + (f" ({min(rs):.2f}-{max(rs):.2f}, {len(rs)} rounds)" if len(rs) > 1 else "")
print()
print(f"1. hot set (4 KiB randrw 70/30 QD8 over {hot_mb} MiB) + one sequential writer (1 MiB QD4), {secs}s after {warm}s warm-up; medians (ranges) over rounds")
print(f"  {'case':<14} {'hot_IOPS':>28} {'hit_%':>20} {'stream_IOPS':>24}")
for c in ["pcache_nocut", "pcache_cut", "ocf_nocut", "ocf_cut"]:
    if c in hot:
        v = list(hot[c].values())
        print(f"  {c:<14} {med([x[0] for x in v]):>28} {med([x[1] for x in v]):>20} {med([x[2] for x in v]):>24}")
if "pcache_cut" in hot and "pcache_nocut" in hot:
    print(f"  pcache hot-set IOPS with the cutoff / without: {ratio(hot['pcache_cut'], hot['pcache_nocut'], 0)}")
if "pcache_cut" in hot and "ocf_cut" in hot:
    print(f"  pcache with cutoff / bdev_ocf with cutoff (hot set): {ratio(hot['pcache_cut'], hot['ocf_cut'], 0)}")
if mode:
    print()
    print(f"2. each mode, 4 KiB QD32 over {mode_mb} MiB (in cache): IOPS medians (ranges), and per-round ratios to the bare base")
    print(f"  {'mode':<13} {'randwrite':>26} {'ratio':>24} {'randread':>26} {'ratio':>24}")
    base = mode.get("base", {})
    for t in ["base", "writeback", "writethrough", "writearound", "passthrough"]:
        if t in mode:
            v = list(mode[t].values())
            print(f"  {t:<13} {med([x[0] for x in v]):>26} {ratio(mode[t], base, 0):>24} {med([x[1] for x in v]):>26} {ratio(mode[t], base, 1):>24}")
PY
echo "raw logs: $OUT" | tee -a "$OUT/summary.txt"
