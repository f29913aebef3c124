# Observability of the SPDK module (sourced by run.sh, after its other cases): latency
# histograms checked against a base with a KNOWN read delay (bdev_delay), and the error
# counters against a base that fails every write and flush for a while (bdev_error).
# Uses run.sh's helpers (start, wait_up, raw, field, bp_total, pass, fail).

# get_stats of bdevperf on SOCK, as JSON.
obs_stats() { raw "$1" bdev_pcache_get_stats '' 10 2> /dev/null; }

# ---------------------------------------------------------------- latency (bdev_delay)
# Reads of a base whose every read takes 2 ms: read misses must show p50 >= 2 ms, hits
# far below it.
OBS_DELAY_US=2000
cat > "$WORK/obs-lat.json" << JSON
{"subsystems": [{"subsystem": "bdev", "config": [
{"method": "bdev_malloc_create", "params": {"name": "Mal9", "num_blocks": 2048, "block_size": 4096}},
{"method": "bdev_delay_create", "params": {"name": "Dly9", "base_bdev_name": "Mal9",
  "avg_read_latency": $OBS_DELAY_US, "p99_read_latency": $OBS_DELAY_US,
  "avg_write_latency": 1, "p99_write_latency": 1}},
{"method": "bdev_pcache_create", "params": {"name": "PCache9", "base_bdev_name": "Dly9",
  "pmem_path": "$SHM-obs-lat", "pmem_size_mb": 128, "persistence": "volatile", "format": true}},
{"method": "bdev_wait_for_examine"}]}]}
JSON
start obs_lat 1 0x1 "$WORK/obs-lat.sock" "$BDEVPERF" -c "$WORK/obs-lat.json" -q 4 -o 4096 \
    -w randread -t 6 -T PCache9
OBS_PID=$APP_PID
wait_up "$WORK/obs-lat.sock"
sleep 4
OBS=$(obs_stats "$WORK/obs-lat.sock")
wait "$OBS_PID"
obs_rc=$?
read -r obs_iops obs_fails <<< "$(bp_total "$WORK/obs_lat.log")"
obs_check=$(python3 -c '
import json, sys
d = json.loads(sys.argv[1])[0]["latency"]
m, h, delay = d["read_miss"], d["read_hit"], float(sys.argv[2])
ok = m["count"] > 100 and m["p50_us"] >= 0.99 * delay and h["count"] > 100 and h["p99_us"] < delay / 2
print("ok" if ok else "bad", "misses", m["count"], "p50", m["p50_us"], "p99", m["p99_us"],
      "us; hits", h["count"], "p50", h["p50_us"], "p99", h["p99_us"], "us")
' "${OBS:-[]}" "$OBS_DELAY_US" 2>&1 | tail -1)
if [ "$obs_rc" = 0 ] && [ "${obs_fails:-x}" = "0.00" ] && [ "${obs_check%% *}" = ok ]; then
    pass "latency: base reads delayed ${OBS_DELAY_US} us: ${obs_check#ok }"
else
    fail "latency: rc=$obs_rc fail/s=${obs_fails:-?} ${obs_check:-no stats: $OBS}"
    tail -5 "$WORK/obs_lat.log"
fi

# ---------------------------------------------------------------- counters (bdev_error)
# A 128 MiB cache over a 512 MiB base; bdevperf writes at QD16 while every base write and
# flush fails (6 s), then the errors stop (bdevperf runs 22 s). During the errors: writeback_errors > 0 with
# last_error text and time, the cache filled at most a few times (no reclaim is possible)
# with the waiting requests beside it; no request ever fails. After: no new full episodes.
cat > "$WORK/obs-err.json" << JSON
{"subsystems": [{"subsystem": "bdev", "config": [
{"method": "bdev_malloc_create", "params": {"name": "Mal9", "num_blocks": 131072, "block_size": 4096}},
{"method": "bdev_error_create", "params": {"base_name": "Mal9"}},
{"method": "bdev_pcache_create", "params": {"name": "PCache9", "base_bdev_name": "EE_Mal9",
  "pmem_path": "$SHM-obs-err", "pmem_size_mb": 128, "persistence": "volatile", "format": true}},
{"method": "bdev_wait_for_examine"}]}]}
JSON
start obs_err 1 0x1 "$WORK/obs-err.sock" "$BDEVPERF" -c "$WORK/obs-err.json" -q 16 -o 4096 \
    -w randwrite -t 22 -T PCache9
OBS_PID=$APP_PID
wait_up "$WORK/obs-err.sock"
t_inject=$(date +%s%3N)
raw "$WORK/obs-err.sock" bdev_error_inject_error '{"name": "EE_Mal9", "io_type": "write", "error_type": "failure", "num": 100000000}' > /dev/null 2>&1
raw "$WORK/obs-err.sock" bdev_error_inject_error '{"name": "EE_Mal9", "io_type": "flush", "error_type": "failure", "num": 100000000}' > /dev/null 2>&1
sleep 6
OBS1=$(obs_stats "$WORK/obs-err.sock")
t_now=$(date +%s%3N)
raw "$WORK/obs-err.sock" bdev_error_inject_error '{"name": "EE_Mal9", "io_type": "clear", "error_type": "failure"}' > /dev/null 2>&1
# Writeback retries within its backoff (at most 5 s) and then drains.
sleep 7
OBS2=$(obs_stats "$WORK/obs-err.sock")
wait "$OBS_PID"
obs_rc=$?
read -r obs_iops obs_fails <<< "$(bp_total "$WORK/obs_err.log")"
obs_check=$(python3 -c '
import json, sys
a, b = json.loads(sys.argv[1])[0], json.loads(sys.argv[2])[0]
t0, t1 = int(sys.argv[3]), int(sys.argv[4])
e = a["writeback"]["last_error"] or {}
ok = (a["writeback_errors"] > 0 and e.get("message") and t0 - 1000 <= e.get("unix_ms", 0) <= t1 + 1000
      and e == a["last_writeback_error"] and a["cache_full_events"] <= 3 and a["waiting_requests"] > 0
      # Writers are held by pacing (writeback earns no credit; overdraw stops halfway
      # from the watermark to full) or, with little headroom, by a full cache.
      and (a["paced_writes"] > 0 or a["cache_full_events"] >= 1)
      # Recovered, writeback keeps up: no new full episodes (a stale pacing flag once
      # let writers run the cache full 250 times in those 7 s).
      and b["cache_full_events"] <= a["cache_full_events"] + 1
      and b["writeback_ksets"] > a["writeback_ksets"] and b["io_errors"] == 0)
print("ok" if ok else "bad", "writeback_errors", a["writeback_errors"], "last_error", json.dumps(e),
      "cache_full_events", a["cache_full_events"], "paced_writes", a["paced_writes"], "waiting", a["waiting_requests"],
      "| after: writeback_ksets", a["writeback_ksets"], "->", b["writeback_ksets"],
      "cache_full_events", b["cache_full_events"], "io_errors", b["io_errors"])
' "${OBS1:-[]}" "${OBS2:-[]}" "$t_inject" "$t_now" 2>&1 | tail -1)
if [ "$obs_rc" = 0 ] && [ "${obs_fails:-x}" = "0.00" ] && [ "${obs_check%% *}" = ok ]; then
    pass "counters: base writes failing 6 s under QD16 randwrite, no request failed: ${obs_check#ok }"
else
    fail "counters: rc=$obs_rc fail/s=${obs_fails:-?} ${obs_check:-no stats: $OBS1 / $OBS2}"
    tail -5 "$WORK/obs_err.log"
fi
