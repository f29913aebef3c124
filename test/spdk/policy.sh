# Cache modes and the sequential cutoff in the SPDK module (issue 11), sourced by
# test/spdk/run.sh (uses its helpers, pass/fail and $WORK/$SHM):
#   policy_verify_<mode>  bdevperf verify (QD32, 4 KiB and 64 KiB) on pcache over an aio
#                         file in each mode: no failures; outside write-back the base got
#                         direct writes and no dirty data stays behind
#   policy_switch         verify running while bdev_pcache_set_options switches
#                         writeback -> writethrough -> writearound -> passthrough ->
#                         writeback: no failures, dirty data drained after leaving
#                         write-back
#   policy_zeroes         in writearound: data written, then WRITE_ZEROES and UNMAP on
#                         ranges of it (bdevperf job file); read back with spdk_dd: the
#                         ranges are zero, the rest intact, nothing dirty
#   policy_persist        set_options changes the mode and cutoff, save_config carries
#                         them, a restart from that config keeps them
# Runs in about a minute.

# A bdev config: aio base over FILE, pcache in MODE with cutoff KIB (always), FORMAT.
policy_cfg() { # FILE MODE KIB FORMAT
    echo '{"subsystems": [{"subsystem": "bdev", "config": [
{"method": "bdev_aio_create", "params": {"name": "Aio0", "filename": "'"$1"'", "block_size": 4096, "uuid": "'"$POL_UUID"'"}},
{"method": "bdev_pcache_create", "params": {"name": "PCache0", "base_bdev_name": "Aio0", "pmem_path": "'"$SHM"'-pol", "pmem_size_mb": 128, "persistence": "volatile", "format": '"$4"', "cache_mode": "'"$2"'", "seq_cutoff_kib": '"$3"', "seq_cutoff_policy": "always"}},
{"method": "bdev_wait_for_examine"}]}]}'
}
# The same base identity in every process that reattaches a medium.
POL_UUID=5b1d0c2e-7f3a-4e8b-9d61-2c4f8a7e3b10
pstat() { python3 -c "import json,sys; d=json.load(sys.stdin); d=d[0] if isinstance(d, list) else d; print($1)" 2> /dev/null; }

PSECS=$((SECS < 6 ? SECS : 6))
truncate -s 256M "$WORK/pol-base.img"
for mode in writeback writethrough writearound passthrough; do
    rm -f "$SHM"-pol
    policy_cfg "$WORK/pol-base.img" "$mode" 256 true > "$WORK/pol-$mode.json"
    ok=1 msg=""
    # 128 KiB: 32 in flight exceed what large direct writes may have at the base
    # while read misses wait (direct.rs, STREAM_INFLIGHT), so some wait their turn.
    for io in 4096 131072; do
        name=pol_${mode}_$io
        start "$name" 1 0x1 "$WORK/$name.sock" "$BDEVPERF" -c "$WORK/pol-$mode.json" -q 32 \
            -o "$io" -w verify -t "$PSECS" -T PCache0
        pid=$APP_PID
        wait_up "$WORK/$name.sock"
        sleep $((PSECS / 2))
        last_stats "$WORK/$name.sock" "$pid" '{"name": "PCache0"}'
        st=$LAST_STATS
        wait "$pid"
        rc=$?
        read -r iops fails <<< "$(bp_total "$WORK/$name.log")"
        direct=$(pstat "d['direct']['writes']" <<< "$st")
        dirty=$(pstat "d['dirty_bytes']" <<< "$st")
        got=$(pstat "d['cache_mode']" <<< "$st")
        held=$(pstat "d['direct']['held_for_misses']" <<< "$st")
        msg="$msg ${io}B: $iops IOPS, direct writes ${direct:-?} (${held:-?} held for misses), dirty ${dirty:-?};"
        if [ $rc != 0 ] || [ "${fails:-x}" != "0.00" ] || [ "$got" != "$mode" ]; then
            ok=0
            msg="$msg rc=$rc fail/s=${fails:-?} mode=${got:-?};"
            tail -5 "$WORK/$name.log"
        fi
        if [ "$mode" != writeback ] && [ "${direct:-0}" -le 0 ]; then
            ok=0
        fi
        if { [ "$mode" = passthrough ] || [ "$mode" = writearound ]; } && [ "${dirty:-1}" != 0 ]; then
            ok=0
        fi
        # The next I/O size reattaches the same medium.
        sed -i 's/"format": true/"format": false/' "$WORK/pol-$mode.json"
    done
    if [ $ok = 1 ]; then pass "policy_verify_$mode:$msg"; else fail "policy_verify_$mode:$msg"; fi
done

# ---------------------------------------------------------------- switch under load
rm -f "$SHM"-pol
policy_cfg "$WORK/pol-base.img" writeback 0 true > "$WORK/pol-switch.json"
SW=$WORK/pol-switch.sock
start pol_switch 1 0x1 "$SW" "$BDEVPERF" -c "$WORK/pol-switch.json" -q 32 -o 4096 \
    -w verify -t 14 -T PCache0
pid=$APP_PID
wait_up "$SW"
sw_ok=1 sw_msg=""
for mode in writethrough writearound passthrough writeback; do
    sleep 2.5
    if ! raw "$SW" bdev_pcache_set_options '{"name": "PCache0", "cache_mode": "'"$mode"'"}' 10 > /dev/null 2>&1; then
        sw_ok=0
        sw_msg="$sw_msg set $mode failed;"
    fi
    st=$(raw "$SW" bdev_pcache_get_stats '{"name": "PCache0"}' 10 2> /dev/null)
    sw_msg="$sw_msg $(pstat "d['cache_mode'] + ' dirty ' + str(d['dirty_bytes']) + ' direct ' + str(d['direct']['writes'])" <<< "$st");"
    if [ "$mode" = writeback ]; then
        continue
    fi
    # Passthrough: everything dirty from the write-back phase must drain while I/O goes on.
    if [ "$mode" = passthrough ]; then
        for _ in $(seq 1 20); do
            d=$(raw "$SW" bdev_pcache_get_stats '{"name": "PCache0"}' 10 2> /dev/null | pstat "d['dirty_bytes']")
            [ "$d" = 0 ] && break
            sleep 0.1
        done
        [ "$d" = 0 ] || { sw_ok=0; sw_msg="$sw_msg passthrough left $d dirty bytes;"; }
    fi
done
wait "$pid"
rc=$?
read -r iops fails <<< "$(bp_total "$WORK/pol_switch.log")"
if [ $sw_ok = 1 ] && [ $rc = 0 ] && [ "${fails:-x}" = "0.00" ]; then
    pass "policy_switch: verify $iops IOPS, 0 failures across$sw_msg"
else
    fail "policy_switch: rc=$rc fail/s=${fails:-?};$sw_msg"
    tail -5 "$WORK/pol_switch.log"
fi

# ---------------------------------------------------------------- zeroes and unmap
rm -f "$SHM"-pol
truncate -s 16M "$WORK/pol-z.img"
head -c 16M /dev/urandom > "$WORK/pol-z.pattern"
policy_cfg "$WORK/pol-z.img" writearound 0 true > "$WORK/pol-z1.json"
policy_cfg "$WORK/pol-z.img" writearound 0 false > "$WORK/pol-z2.json"
# Blocks of 4 KiB: [0, 1 MiB) write-zeroes, [2, 3 MiB) unmap; the rest keeps the pattern.
printf '[global]\nfilename=PCache0\nbs=65536\niodepth=4\n[z]\nrw=write_zeroes\noffset=0\nlength=256\n[u]\nrw=unmap\noffset=512\nlength=256\n' > "$WORK/pol-z.jobs"
start pol_z_write 1 0x1 "$WORK/pz.sock" "$SPDK_DD" --json "$WORK/pol-z1.json" \
    --if "$WORK/pol-z.pattern" --ob PCache0 --bs 65536
wait "$APP_PID"
zrc1=$?
start pol_z_zero 1 0x1 "$WORK/pz.sock" "$BDEVPERF" -c "$WORK/pol-z2.json" -j "$WORK/pol-z.jobs" -t 2
wait "$APP_PID"
zrc2=$?
start pol_z_read 1 0x1 "$WORK/pz.sock" "$SPDK_DD" --json "$WORK/pol-z2.json" \
    --ib PCache0 --of "$WORK/pol-z.out" --bs 65536
wait "$APP_PID"
zrc3=$?
zcheck=$(python3 - "$WORK/pol-z.pattern" "$WORK/pol-z.out" "$WORK/pol-z.img" << 'PY'
import sys
M = 1 << 20
want = bytearray(open(sys.argv[1], "rb").read())
want[0:M] = bytes(M)
want[2 * M:3 * M] = bytes(M)
bad = []
for what, path in (("read back", sys.argv[2]), ("base file", sys.argv[3])):
    got = open(path, "rb").read()[:16 * M]
    if got != bytes(want):
        first = next((i for i in range(min(len(got), len(want))) if got[i] != want[i]), len(got))
        bad.append(f"{what} differs at byte {first}")
print("; ".join(bad) or "ok")
PY
)
if [ $zrc1 = 0 ] && [ $zrc2 = 0 ] && [ $zrc3 = 0 ] && [ "$zcheck" = ok ]; then
    pass "policy_zeroes: writearound WRITE_ZEROES and UNMAP read back as zeros from pcache and the base, the rest intact"
else
    fail "policy_zeroes: dd rc=$zrc1 bdevperf rc=$zrc2 read rc=$zrc3: $zcheck"
    tail -5 "$WORK/pol_z_zero.log"
fi
rm -f "$WORK/pol-z.pattern" "$WORK/pol-z.out" "$WORK/pol-z.img"

# ---------------------------------------------------------------- persistence of the policy
rm -f "$SHM"-pol
start pol_tgt 1 0x1 "$SOCK" "$SPDK_TGT"
TGT_PID=$APP_PID
wait_up "$SOCK"
$R bdev_aio_create "$WORK/pol-base.img" Aio0 4096 -u "$POL_UUID" > /dev/null 2>&1
$R bdev_pcache_create -n PCache0 -b Aio0 -p "$SHM-pol" -s 128 --persistence volatile --format \
    --cache-mode writethrough > /dev/null 2>&1
prc=$?
$R bdev_pcache_set_options PCache0 --cache-mode writearound --seq-cutoff-kib 512 \
    --seq-cutoff-policy never > /dev/null 2>&1
src=$?
$R save_config > "$WORK/pol-saved.json" 2> /dev/null
saved=$(python3 -c '
import json,sys
for s in json.load(open(sys.argv[1]))["subsystems"]:
    for m in s.get("config") or []:
        if m["method"] == "bdev_pcache_create":
            p = m["params"]; print(p.get("cache_mode"), p.get("seq_cutoff_kib"), p.get("seq_cutoff_policy"))' "$WORK/pol-saved.json" 2> /dev/null)
stop "$SOCK" "$TGT_PID"
start pol_tgt2 1 0x1 "$SOCK" "$SPDK_TGT" -c "$WORK/pol-saved.json"
TGT_PID=$APP_PID
wait_up "$SOCK"
after=$($R bdev_pcache_get_stats -n PCache0 2> /dev/null | pstat "d['cache_mode'], d['seq_cutoff_kib'], d['seq_cutoff_policy']")
stop "$SOCK" "$TGT_PID"
if [ $prc = 0 ] && [ $src = 0 ] && [ "$saved" = "writearound 512 never" ] && [ "$after" = "writearound 512 never" ]; then
    pass "policy_persist: set_options -> save_config ($saved) -> restart keeps it ($after)"
else
    fail "policy_persist: create rc=$prc set rc=$src saved='$saved' after restart='$after'"
fi
rm -f "$WORK/pol-base.img" "$SHM"-pol
