#!/usr/bin/env bash
# The overload tier of the SPDK benchmark (issue 9), `bash test/spdk/bench.sh overload`:
# the working set is many times the cache and the base is a real file on this machine's
# disk (bdev_uring), so writeback, GC and admission decide what the initiator sees. On
# one core (bdevperf -m 0x1), 4 KiB I/O QD32, per round, each in its own bdevperf:
#   base    bdev_uring over the base file alone
#   ocf_wb  bdev_ocf write-back over it, cache = a malloc bdev of the pcache's size
#   pcache  pcache over it, medium in /dev/shm (volatile)
# Jobs: a random-write fill (FILL seconds, not measured), then randwrite over the whole
# base for OVERLOAD_SECS (sustained, after the fill); then, in a fresh bdevperf with
# zipf(1.2) offsets (-F 1.2), randrw 70/30 (-M 70) and randread for OVERLOAD_ZIPF_SECS
# each. bdevperf -S 1 -P 1 gives the IOPS of every second (-S alone prints running
# averages since the start, which hide a stall) and -ll the latency histogram;
# test/overload_report.py prints IOPS, p50/p99/p99.9/max, every 5 s interval, pcache's
# ratios with the issue's targets, and writes PNG plots next to the raw logs.
# Multi-core: pcache and malloc in cache, randwrite on one core and on two (-m 0x3 -C).
# A benchmark: nothing here fails on a number.
#
# Environment: as test/spdk/run.sh (SPDK_DIR / PKG_CONFIG_PATH), OVERLOAD_SECS (60),
# OVERLOAD_FILL_SECS (20), OVERLOAD_ZIPF_SECS (30), OVERLOAD_ROUNDS (1),
# OVERLOAD_CACHE_MB (1024), OVERLOAD_BASE_MB (8192, at least 8x the cache),
# OVERLOAD_DIR (results, default target/bench/overload/spdk-<time>), OVERLOAD_TARGETS
# (default "base ocf_wb pcache"), OVERLOAD_MULTICORE (1; 0 skips it).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=test/spdk/common.sh
. "$HERE/common.sh"

SECS=${OVERLOAD_SECS:-60}
FILL=${OVERLOAD_FILL_SECS:-20}
ZSECS=${OVERLOAD_ZIPF_SECS:-30}
ROUNDS=${OVERLOAD_ROUNDS:-1}
CACHE_MB=${OVERLOAD_CACHE_MB:-1024}
BASE_MB=${OVERLOAD_BASE_MB:-8192}
TARGETS=${OVERLOAD_TARGETS:-base ocf_wb pcache}
if ((BASE_MB < 8 * CACHE_MB)); then
    echo "OVERLOAD_BASE_MB ($BASE_MB) must be at least 8x OVERLOAD_CACHE_MB ($CACHE_MB)" >&2
    exit 1
fi
OUT=${OVERLOAD_DIR:-$ROOT/target/bench/overload/spdk-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/runs.tsv"
# The base lives on the real disk (target/ is in the worktree), written once so reads
# and overwrites hit allocated blocks; it is kept for the next run. Its directory is
# made here: it is not the results directory unless OVERLOAD_DIR is left at its default.
BASE=$ROOT/target/bench/overload/base-${BASE_MB}m.img
mkdir -p "$(dirname "$BASE")"
if [ "$(stat -c %s "$BASE" 2> /dev/null || echo 0)" != $((BASE_MB << 20)) ]; then
    echo "writing the ${BASE_MB} MiB base file $BASE once" >&2
    rm -f "$BASE"
    dd if=/dev/zero of="$BASE" bs=4M count=$((BASE_MB / 4)) oflag=direct status=none
fi
# Room for bdevperf's buffers and, for ocf_wb, its malloc cache.
APP_MEM="--no-huge -s $((CACHE_MB + 2048))"

uring() { # NAME
    echo '{"method": "bdev_uring_create", "params": {"name": "'"$1"'", "filename": "'"$BASE"'", "block_size": 4096}}'
}
pcache_on() { # BASE_NAME SIZE_MB
    echo '{"method": "bdev_pcache_create", "params": {"name": "Target0", "base_bdev_name": "'"$1"'", "pmem_path": "'"$SHM"'-overload", "pmem_size_mb": '"$2"', "persistence": "volatile", "format": true}}'
}
ocf_cache='{"method": "bdev_malloc_create", "params": {"name": "OcfCache0", "num_blocks": '$((CACHE_MB * 256))', "block_size": 4096}}'
ocf='{"method": "bdev_ocf_create", "params": {"name": "Target0", "mode": "wb", "cache_bdev_name": "OcfCache0", "core_bdev_name": "Base0"}}'
# bdev_ocf's core is a bdev_aio over the same file: bdev_uring has no FLUSH, which OCF
# forwards (it fails such runs with "vbdev_forward_flush: Submission failed with
# status=-95"). Both submit to the same kernel file; aio is what OCF users run.
aio() { # NAME
    echo '{"method": "bdev_aio_create", "params": {"name": "'"$1"'", "filename": "'"$BASE"'", "block_size": 4096}}'
}
config() { # JSON method objects...
    local IFS=,
    echo "{\"subsystems\": [{\"subsystem\": \"bdev\", \"config\": [$*, {\"method\": \"bdev_wait_for_examine\"}]}]}"
}
target_config() { # LABEL
    case $1 in
        base) config "$(uring Target0)" ;;
        ocf_wb) config "$(aio Base0)" "$ocf_cache" "$ocf" ;;
        pcache) config "$(uring Base0)" "$(pcache_on Base0 "$CACHE_MB")" ;;
    esac
}

# perform ROUND LABEL SOCK LOG NAME PARAMS [measured]: one perform_tests; a measured one
# has its slice of the bdevperf log saved and listed for the report.
perform() {
    local rnd=$1 label=$2 sock=$3 log=$4 name=$5 params=$6 secs
    secs=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["time_in_sec"])' "$params")
    echo "  round $rnd $label: $name ${secs}s" >&2
    local from
    from=$(stat -c %s "$log")
    raw "$sock" perform_tests "$params" $((secs + 120)) > "$OUT/r$rnd.$label.$name.rpc" 2>&1
    sleep 1 # the histogram is printed as the RPC answers
    if [ "${7:-}" = measured ]; then
        tail -c +$((from + 1)) "$log" > "$OUT/r$rnd.$label.$name.log"
        printf '%s\t%s\t%s\tbdevperf\t%s\n' "$rnd" "$label" "$name" "$OUT/r$rnd.$label.$name.log" >> "$OUT/runs.tsv"
    fi
}

# session ROUND LABEL TAG EXTRA-ARGS...: a bdevperf waiting for perform_tests; sets SOCK, LOG.
session() {
    local rnd=$1 label=$2 tag=$3
    shift 3
    SOCK=$WORK/ov-$label-$tag.sock
    target_config "$label" > "$WORK/ov-$label.json"
    rm -f "$SHM"-overload
    start "ov-$label-$tag-r$rnd" 1 0x1 "$SOCK" "$BDEVPERF" -c "$WORK/ov-$label.json" -z \
        -q 32 -o 4096 -w randwrite -t "$SECS" -T Target0 -S 1 -P 1 -ll "$@"
    SPID=$APP_PID
    LOG=$WORK/ov-$label-$tag-r$rnd.log
    if ! wait_up "$SOCK"; then
        echo "$label: bdevperf did not start" >&2
        tail -5 "$LOG" >&2
        return 1
    fi
}

echo "overload tier: base ${BASE_MB} MiB on disk (bdev_uring), cache ${CACHE_MB} MiB, fill ${FILL}s, randwrite ${SECS}s, zipf ${ZSECS}s, $ROUNDS round(s), one core; results in $OUT" >&2
for ((r = 1; r <= ROUNDS; r++)); do
    for t in $TARGETS; do
        if session "$r" "$t" uniform; then
            perform "$r" "$t" "$SOCK" "$LOG" fill '{"workload_type": "randwrite", "queue_depth": 32, "io_size": "4096", "time_in_sec": '"$FILL"'}'
            perform "$r" "$t" "$SOCK" "$LOG" randwrite '{"workload_type": "randwrite", "queue_depth": 32, "io_size": "4096", "time_in_sec": '"$SECS"'}' measured
            if [ "$t" = pcache ]; then
                raw "$SOCK" bdev_pcache_get_stats '' 10 > "$OUT/r$r.pcache.stats.json" 2>&1
            fi
            stop "$SOCK" "$SPID"
        fi
        if session "$r" "$t" zipf -F 1.2; then
            perform "$r" "$t" "$SOCK" "$LOG" zipf-randrw70 '{"workload_type": "randrw", "rw_percentage": 70, "queue_depth": 32, "io_size": "4096", "time_in_sec": '"$ZSECS"'}' measured
            perform "$r" "$t" "$SOCK" "$LOG" zipf-randread '{"workload_type": "randread", "queue_depth": 32, "io_size": "4096", "time_in_sec": '"$ZSECS"'}' measured
            stop "$SOCK" "$SPID"
        fi
    done
done
cp "$WORK"/ov-*.log "$OUT"/ 2> /dev/null

python3 "$ROOT/test/overload_report.py" "$OUT" base ocf_wb 0 spdk

if [ "${OVERLOAD_MULTICORE:-1}" = 1 ]; then
    # In cache: 256 MiB malloc base under a 512 MiB medium; randwrite QD32 per core.
    mc_secs=${OVERLOAD_MC_SECS:-5}
    echo >&2
    malloc_base='{"method": "bdev_malloc_create", "params": {"name": "Malloc0", "num_blocks": 65536, "block_size": 4096}}'
    malloc_t='{"method": "bdev_malloc_create", "params": {"name": "Target0", "num_blocks": 65536, "block_size": 4096}}'
    declare -A MC
    for t in malloc pcache; do
        if [ $t = malloc ]; then config "$malloc_t"; else config "$malloc_base" "$(pcache_on Malloc0 512)"; fi > "$WORK/mc-$t.json"
        for m in 0x1 0x3; do
            rm -f "$SHM"-overload
            echo "  multi-core: $t randwrite on mask $m, ${mc_secs}s" >&2
            start "mc-$t-$m" 1 "$m" "$WORK/mc.sock" "$BDEVPERF" -c "$WORK/mc-$t.json" -C \
                -q 32 -o 4096 -w randwrite -t "$mc_secs" -T Target0
            wait "$APP_PID"
            MC[$t,$m]=$(bp_total "$WORK/mc-$t-$m.log" | cut -d' ' -f1)
        done
    done
    echo "multi-core (in cache, randwrite QD32 per core, bdevperf -C): IOPS one core / two cores / ratio"
    for t in malloc pcache; do
        python3 -c 'import sys; a, b = float(sys.argv[2] or 0), float(sys.argv[3] or 0); print(f"  {sys.argv[1]:<8}{a:>12.0f}{b:>12.0f}{(b / a if a else 0):>8.2f}x")' \
            "$t" "${MC[$t,0x1]}" "${MC[$t,0x3]}"
    done
fi
echo "raw logs and plots: $OUT"
