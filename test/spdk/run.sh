#!/usr/bin/env bash
# The SPDK tier of pcache's tests: builds the bdev module against the SPDK found via
# SPDK_DIR (install prefix or built tree) or pkg-config, preloads it into stock spdk_tgt
# and bdevperf, and checks:
#   verify_malloc   bdevperf -w verify on pcache over a malloc bdev (GC and writeback run)
#   verify_nvmf     the same over an NVMe-oF/TCP-attached base (second target, 127.0.0.1)
#   configs/...     the shipped spdk_tgt configs: NVMe-oF base -> pcache -> NVMe-oF export
#                   (verified from a third process), and the vhost-blk export (verified
#                   from a virtio-user initiator when hugepages can be reserved)
#   reset           bdevperf -w reset: verify with RESETs in between
#   load            the module installed by scripts/install-spdk-module.sh logs its load
#                   line (pcache and SPDK versions); the installed rpc.py plugin works
#   version_guard   an app with another SPDK version, or a second libspdk_bdev: the
#                   module registers nothing (no RPCs) and logs why
#   deferred        create before the base exists: "waiting", then attached when it appears
#   export_nvmf     pcache exported over NVMe-oF/TCP, bdevperf verify from a second process
#                   (4 KiB, and 64 KiB requests split into 8 KiB iovecs)
#   save_load       save_config / load_config round trip restores the cache and its export
#   persistence     write + flush over NVMe-oF, kill -9 spdk_tgt, restart from the saved
#                   config, read everything back intact (dirty data replayed from pmem)
#   bad_rpc_*       malformed / invalid RPCs: each one fails, changes nothing, target alive
#   writeback_content  data written through a small cache, drained: the base file equals it
#   verify_recycle  verify jobs over an aio file with writeback recycling live data: no
#                   miscompare, data recycled (where the base's FLUSH is slow), drained
#   hot_remove      the base bdev deleted under I/O: pcache unregisters, process survives
#   policy_*        cache modes and the sequential cutoff (test/spdk/policy.sh)
# Prints PASS/FAIL per case and "N passed, M failed"; exits non-zero on any failure.
# Without SPDK, and without a source to build one, it prints "SKIP: ..." and exits 0.
#
# Environment: SPDK_DIR, PKG_CONFIG_PATH (where SPDK is; unset: the SPDK that
# scripts/build-spdk.sh builds from the pinned source and caches), SPDK_TEST_SECONDS (length of
# each verify run, default 30), SPDK_TEST_KEEP=1 (keep the work directory), and
# overrides SPDK_TGT, BDEVPERF, SPDK_DD, RPC_PY, SPDK_PYTHONPATH.
# Cores: the app under test runs on core 0, the second process (backend target or
# initiator) on core 1; both busy-poll.
set -u

HERE=$(cd "$(dirname "$0")" && pwd)
SECS=${SPDK_TEST_SECONDS:-30}
# shellcheck source=test/spdk/common.sh
. "$HERE/common.sh"

PASS=0
FAILED=0
pass() { echo "PASS: $*"; PASS=$((PASS + 1)); }
fail() { echo "FAIL: $*"; FAILED=$((FAILED + 1)); }

T0=$(date +%s)
cfg bdevperf-nvme-tcp.json > "$WORK/bp-initiator.json"

# ---------------------------------------------------------------- verify on malloc
cfg bdevperf-pcache-malloc.json | sed 's/"pmem_size_mb": 256/"pmem_size_mb": 128/' \
    > "$WORK/bp-malloc.json"
run_bdevperf bp_malloc "$WORK/bp-malloc.json" verify "$SECS"
check_bdevperf "verify_malloc (${SECS}s, 128 MiB cache over 512 MiB malloc)" bp_malloc

# ---------------------------------------------------------------- verify over NVMe-oF
cfg spdk_tgt-nvmf-backend.json > "$WORK/backend.json"
start backend 0 0x2 "$WORK/backend.sock" "$SPDK_TGT" -c "$WORK/backend.json"
BACKEND_PID=$APP_PID
if wait_up "$WORK/backend.sock"; then
    cfg bdevperf-pcache-nvmf.json > "$WORK/bp-nvmf.json"
    run_bdevperf bp_nvmf "$WORK/bp-nvmf.json" verify "$SECS"
    check_bdevperf "verify_nvmf (${SECS}s, 128 MiB cache over NVMe-oF/TCP 512 MiB)" bp_nvmf

    # The shipped configs: pcache on the NVMe-oF base, exported again over NVMe-oF;
    # then the same cache exported over vhost-blk (controller only: no initiator here).
    cfg spdk_tgt-pcache-nvmf.json > "$WORK/tgt-nvmf.json"
    start cfg_nvmf 1 0x1 "$WORK/cfg.sock" "$SPDK_TGT" -c "$WORK/tgt-nvmf.json"
    CFG_PID=$APP_PID
    if wait_up "$WORK/cfg.sock"; then
        initiator_verify cfg_initiator "configs/spdk_tgt-pcache-nvmf.json: NVMe-oF base -> pcache -> NVMe-oF export, verify from a third process" \
            "$WORK/bp-initiator.json" -q 32 -o 4096 -w verify -t 5
    else
        fail "configs/spdk_tgt-pcache-nvmf.json: spdk_tgt did not come up"
        tail -10 "$WORK/cfg_nvmf.log"
    fi
    stop "$WORK/cfg.sock" "$CFG_PID"
    mkdir -p "$WORK/vhost"
    cfg spdk_tgt-pcache-vhost.json > "$WORK/tgt-vhost.json"
    start cfg_vhost 1 0x1 "$WORK/cfg.sock" "$SPDK_TGT" -S "$WORK/vhost" -c "$WORK/tgt-vhost.json"
    CFG_PID=$APP_PID
    if wait_up "$WORK/cfg.sock" &&
        raw "$WORK/cfg.sock" vhost_get_controllers '' 10 2> /dev/null | grep -q '"bdev": "PCache0"' &&
        [ -S "$WORK/vhost/vhost.pcache0" ]; then
        pass "configs/spdk_tgt-pcache-vhost.json: vhost-blk controller vhost.pcache0 serves PCache0"
        # The data path: bdevperf as a virtio-user initiator. vhost-user shares the
        # initiator's memory by file descriptor, so that side needs hugepages (-g: one
        # file, so the memory table is fixed when the device starts).
        if hugepages_reserve 1100; then
            sed "s|/var/tmp/vhost.pcache0|$WORK/vhost/vhost.pcache0|" \
                "$ROOT/configs/bdevperf-vhost-blk.json" > "$WORK/bp-vhost.json"
            APP_MEM="-g -s 1024 --huge-dir $HUGE_DIR" initiator_verify vhost_initiator \
                "vhost_blk: bdevperf verify over virtio-user -> vhost-blk -> pcache over NVMe-oF" \
                "$WORK/bp-vhost.json" -q 32 -o 4096 -w verify -t 5
            hugepages_release
        else
            echo "SKIP: vhost_blk data path: $HUGE_WHY (the controller check above ran)"
        fi
    else
        fail "configs/spdk_tgt-pcache-vhost.json: no vhost.pcache0 controller"
        tail -10 "$WORK/cfg_vhost.log"
    fi
    stop "$WORK/cfg.sock" "$CFG_PID"
else
    fail "verify_nvmf: backend target did not start"
    tail -20 "$WORK/backend.log"
fi
stop "$WORK/backend.sock" "$BACKEND_PID"

# ---------------------------------------------------------------- reset
# bdevperf's reset workload verifies data and sends a RESET every 10 s.
cfg bdevperf-pcache-malloc.json | sed 's/"pmem_size_mb": 256/"pmem_size_mb": 128/' \
    > "$WORK/bp-reset.json"
run_bdevperf bp_reset "$WORK/bp-reset.json" reset 12
# I/O caught by a RESET is aborted by the bdev layer and counted in Fail/s (a malloc bdev
# shows the same); bdevperf itself fails the job on a data mismatch.
if [ "$BP_RC" = 0 ] && [ -n "${BP_IOPS:-}" ] &&
    ! tr '\r' '\n' < "$WORK/bp_reset.log" | grep -q "Buffer mismatch"; then
    pass "reset: bdevperf -w reset (verify + RESET) for 12s: ${BP_IOPS} IOPS, no data mismatch (${BP_FAILS} I/O/s aborted by resets)"
else
    fail "reset: rc=$BP_RC IOPS=${BP_IOPS:-?} fail/s=${BP_FAILS:-?}"
    tail -15 "$WORK/bp_reset.log"
fi

# ---------------------------------------------------------------- the target under test
SOCK=$WORK/tgt.sock
start tgt 1 0x1 "$SOCK" "$SPDK_TGT"
TGT_PID=$APP_PID
if ! wait_up "$SOCK"; then
    fail "spdk_tgt with the module did not start"
    tail -20 "$WORK/tgt.log"
    echo "$PASS passed, $FAILED failed"
    exit 1
fi
R="rpc -s $SOCK"

# ---------------------------------------------------------------- module load and version guard
# The module as installed (scripts/install-spdk-module.sh into $WORK/prefix): its load
# line names pcache's version and both SPDKs, and the installed plugin drives it.
line=$(grep -m1 'SPDK module (bdev_pcache): built against SPDK v' "$WORK/tgt.log")
if [ -n "$line" ] && [ "$MOD" = "$WORK/prefix/lib/libspdk_bdev_pcache.so" ] &&
    $R bdev_pcache_get_stats > /dev/null 2>&1; then
    pass "load: installed module preloaded, plugin from $PLUGIN_DIR; log: ${line#*\*NOTICE\*: }"
else
    fail "load: no load line or no bdev_pcache_get_stats (line: '$line')"
fi
# guard NAME WHAT UP: an app whose SPDK is not the module's: the module must register
# nothing and say why, naming both (WHAT: a phrase of that line). UP=1: the app must
# come up, without the bdev_pcache RPC methods; UP=0: it may fail on its own (a second
# libspdk_bdev registers SPDK's bdev RPCs twice, which spdk_tgt refuses).
guard() {
    local name=$1 what=$2 must=$3 gsock=$WORK/$1.sock gpid err= up=0
    start "$name" 1 0x2 "$gsock" "$SPDK_TGT"
    gpid=$APP_PID
    if wait_up "$gsock"; then
        up=1
        err=$(raw "$gsock" bdev_pcache_get_stats '' 5 2>&1 > /dev/null)
    fi
    if grep -q "NOT registered.*$what" "$WORK/$name.log" &&
        ! grep -q 'SPDK module (bdev_pcache): built against' "$WORK/$name.log" &&
        { [ $up = 1 ] && echo "$err" | grep -q 'not found' || [ "$must" = 0 ]; }; then
        pass "version_guard $name: $([ $up = 1 ] && echo "app up, no bdev_pcache RPCs" || echo "app failed on its own"); log: $(grep -o 'NOT registered.*' "$WORK/$name.log" | cut -c1-230)"
    else
        fail "version_guard $name: app up=$up, rpc error '$err'"
        grep pcache "$WORK/$name.log" | head -3
    fi
    stop "$gsock" "$gpid"
}
# Another SPDK version: the app's libspdk_rpc with its version string changed (same
# length), first on LD_LIBRARY_PATH.
mkdir -p "$WORK/other-spdk"
rpclib=$(readelf -d "$MOD" | sed -n 's/.*NEEDED.*\[\(libspdk_rpc\.so[^]]*\)\].*/\1/p')
if python3 - "$LIBDIR/$rpclib" "$WORK/other-spdk/$rpclib" << 'PYEOF'
import re, sys
data = open(sys.argv[1], "rb").read()
m = re.search(rb"SPDK v(\d)", data)
if not m:
    sys.exit(1)
other = b"1" if m.group(1) != b"1" else b"2"
open(sys.argv[2], "wb").write(data[: m.start(1)] + other + data[m.end(1) :])
PYEOF
then
    LD_LIBRARY_PATH=$WORK/other-spdk:$LD_LIBRARY_PATH guard other_version "the app runs SPDK v" 1
else
    fail "version_guard other_version: no SPDK version string in $LIBDIR/$rpclib"
fi
# Two copies of libspdk_bdev: the module linked against its own (another soname), as a
# module built against another SPDK would be.
if command -v patchelf > /dev/null; then
    bdevlib=$(readelf -d "$MOD" | sed -n 's/.*NEEDED.*\[\(libspdk_bdev\.so[^]]*\)\].*/\1/p')
    mkdir -p "$WORK/two"
    cp "$LIBDIR/$bdevlib" "$WORK/two/libspdk_bdev.so.999.0"
    cp "$MOD" "$WORK/two/libspdk_bdev_pcache.so"
    if patchelf --set-soname libspdk_bdev.so.999.0 "$WORK/two/libspdk_bdev.so.999.0" &&
        patchelf --replace-needed "$bdevlib" libspdk_bdev.so.999.0 "$WORK/two/libspdk_bdev_pcache.so"; then
        MOD=$WORK/two/libspdk_bdev_pcache.so LD_LIBRARY_PATH=$WORK/two:$LD_LIBRARY_PATH \
            guard two_copies "2 copies of libspdk_bdev are loaded" 0
    else
        fail "version_guard two_copies: patchelf failed"
    fi
else
    echo "SKIP: version_guard two_copies: no patchelf"
fi

# ---------------------------------------------------------------- deferred creation
$R bdev_pcache_create -n Late0 -b LateBase -p "$SHM-late" -s 128 --persistence volatile \
    > /dev/null 2>&1
st1=$($R bdev_pcache_get_stats -n Late0 2> /dev/null | field "['state']")
$R bdev_malloc_create -b LateBase 64 4096 > /dev/null 2>&1
sleep 0.5
st2=$($R bdev_pcache_get_stats -n Late0 2> /dev/null | field "['state']")
if [ "$st1" = waiting ] && [ "$st2" = active ] && raw "$SOCK" bdev_get_bdevs '{"name": "Late0"}' \
    > /dev/null 2>&1; then
    pass "deferred: state '$st1' before the base existed, '$st2' after"
else
    fail "deferred: states '$st1' then '$st2'"
fi
$R bdev_pcache_delete Late0 > /dev/null 2>&1
$R bdev_malloc_delete LateBase > /dev/null 2>&1

# ---------------------------------------------------------------- export over NVMe-oF
NQN=nqn.2016-06.io.spdk:pcache0
$R bdev_malloc_create -b Malloc0 256 4096 > /dev/null &&
    $R bdev_pcache_create -n PCache0 -b Malloc0 -p "$SHM-export" -s 128 \
        --persistence volatile > /dev/null &&
    raw "$SOCK" nvmf_create_transport '{"trtype": "TCP", "io_unit_size": 8192}' > /dev/null &&
    raw "$SOCK" nvmf_create_subsystem "{\"nqn\": \"$NQN\", \"allow_any_host\": true, \"serial_number\": \"PCACHE0000000001\"}" > /dev/null &&
    raw "$SOCK" nvmf_subsystem_add_ns "{\"nqn\": \"$NQN\", \"namespace\": {\"bdev_name\": \"PCache0\"}}" > /dev/null &&
    raw "$SOCK" nvmf_subsystem_add_listener "{\"nqn\": \"$NQN\", \"listen_address\": {\"trtype\": \"TCP\", \"adrfam\": \"IPv4\", \"traddr\": \"127.0.0.1\", \"trsvcid\": \"$PORT_EXPORT\"}}" > /dev/null
setup=$?
ESECS=$((SECS / 2 > 10 ? SECS / 2 : 10))
if [ $setup = 0 ]; then
    initiator_verify initiator "export_nvmf: bdevperf verify from a second process over NVMe-oF/TCP" \
        "$WORK/bp-initiator.json" -q 32 -o 4096 -w verify -t "$ESECS"
    # 64 KiB requests arrive in 8 KiB iovecs (io_unit_size above): the multi-iovec paths.
    initiator_verify initiator64k "export_nvmf_64k: verify with 64 KiB requests split in 8 KiB iovecs" \
        "$WORK/bp-initiator.json" -q 16 -o 65536 -w verify -t 10
else
    fail "export_nvmf: setting up the export failed"
fi

# ---------------------------------------------------------------- save_config / load_config
$R save_config > "$WORK/saved.json" 2> /dev/null
stop "$SOCK" "$TGT_PID"
start tgt2 1 0x1 "$SOCK" "$SPDK_TGT"
TGT_PID=$APP_PID
wait_up "$SOCK"
$R load_config -j "$WORK/saved.json" > "$WORK/load.log" 2>&1
lrc=$?
$R save_config > "$WORK/saved2.json" 2> /dev/null
pick='import json,sys
d=json.load(open(sys.argv[1]))
out=[]
for s in d["subsystems"]:
    for c in s["config"] or []:
        if c["method"] in ("bdev_pcache_create", "nvmf_subsystem_add_ns"):
            out.append(c)
print(json.dumps(out, sort_keys=True))'
a=$(python3 -c "$pick" "$WORK/saved.json" 2> /dev/null)
b=$(python3 -c "$pick" "$WORK/saved2.json" 2> /dev/null)
state=$($R bdev_pcache_get_stats -n PCache0 2> /dev/null | field "['state']")
if [ $lrc = 0 ] && [ -n "$a" ] && [ "$a" = "$b" ] && [ "$state" = active ] &&
    grep -q '"format": false' "$WORK/saved.json"; then
    pass "save_load: save_config -> restart -> load_config restores PCache0 (format=false) and its NVMe-oF export"
else
    fail "save_load: load rc=$lrc state=$state"
    echo "  before: $a"
    echo "  after:  $b"
    tail -5 "$WORK/load.log"
fi

# ---------------------------------------------------------------- bad RPCs
$R bdev_malloc_create -b Bad0 64 4096 > /dev/null 2>&1
$R bdev_malloc_create -b Bad1 64 4096 > /dev/null 2>&1
$R bdev_malloc_create -b Bad2 64 4096 > /dev/null 2>&1
$R bdev_passthru_create -b Bad2 -p BadPT > /dev/null 2>&1
$R bdev_malloc_create -b Bad3 64 4096 > /dev/null 2>&1
$R bdev_pcache_create -n BadP -b Bad0 -p "$SHM-bad" -s 128 --persistence volatile > /dev/null 2>&1
# A medium formatted for Bad3, then detached: attaching it to Bad1 must be refused.
$R bdev_pcache_create -n Other -b Bad3 -p "$SHM-other" -s 128 --persistence volatile > /dev/null 2>&1
$R bdev_pcache_delete Other > /dev/null 2>&1
head -c 8M /dev/urandom > "$SHM-foreign"
mkdir -p "$WORK/adir"
snapshot() {
    echo "$(raw "$SOCK" bdev_get_bdevs '' 10 2> /dev/null | python3 -c 'import json,sys; print(sorted(b["name"] for b in json.load(sys.stdin)))') $(raw "$SOCK" bdev_pcache_get_stats '' 10 2> /dev/null | python3 -c 'import json,sys; print(sorted((c["name"], c["state"], c.get("gc_percent"), c.get("cache_mode"), c.get("seq_cutoff_kib"), c.get("seq_cutoff_policy")) for c in json.load(sys.stdin)))') $(ls "$SHM"-* 2> /dev/null | tr '\n' ' ')"
}
V='"persistence": "volatile"'
bad() { # NAME METHOD PARAMS_TEXT (X in PARAMS_TEXT becomes a name unique to the case)
    local name=$1 method=$2 params=${3//\"X\"/\"X_$1\"} before after err
    before=$(snapshot)
    err=$(raw "$SOCK" "$method" "$params" 10 2>&1 > /dev/null)
    local rc=$?
    after=$(snapshot)
    if [ $rc = 1 ] && [ "$before" = "$after" ] && raw "$SOCK" spdk_get_version '' 5 > /dev/null 2>&1; then
        pass "bad_rpc $name: $(python3 -c 'import json,sys; e=json.loads(sys.argv[1]); print(e["code"], e["message"])' "$err" 2> /dev/null | cut -c1-120)"
    else
        fail "bad_rpc $name: rc=$rc error=$err"
        [ "$before" = "$after" ] || echo "  state changed: $before -> $after"
    fi
}
P="\"base_bdev_name\": \"Bad1\", \"pmem_path\": \"$SHM-b1\", \"pmem_size_mb\": 64, $V"
bad missing_name bdev_pcache_create "{\"base_bdev_name\": \"Bad1\", \"pmem_path\": \"$SHM-b1\"}"
bad missing_base bdev_pcache_create "{\"name\": \"X\", \"pmem_path\": \"$SHM-b1\"}"
bad missing_pmem_path bdev_pcache_create '{"name": "X", "base_bdev_name": "Bad1"}'
bad no_params bdev_pcache_create ''
bad params_not_object bdev_pcache_create '["X", "Bad1"]'
bad name_wrong_type bdev_pcache_create "{\"name\": 7, $P}"
bad empty_name bdev_pcache_create "{\"name\": \"\", $P}"
bad unknown_param bdev_pcache_create "{\"name\": \"X\", $P, \"cache_size\": 64}"
bad cache_mode_bad_value bdev_pcache_create "{\"name\": \"X\", $P, \"cache_mode\": \"wb\"}"
bad cache_mode_wrong_type bdev_pcache_create "{\"name\": \"X\", $P, \"cache_mode\": 1}"
bad seq_cutoff_negative bdev_pcache_create "{\"name\": \"X\", $P, \"seq_cutoff_kib\": -1}"
bad seq_cutoff_too_large bdev_pcache_create "{\"name\": \"X\", $P, \"seq_cutoff_kib\": 4194305}"
bad seq_cutoff_string bdev_pcache_create "{\"name\": \"X\", $P, \"seq_cutoff_kib\": \"1M\"}"
bad seq_policy_bad_value bdev_pcache_create "{\"name\": \"X\", $P, \"seq_cutoff_policy\": \"sometimes\"}"
bad promotion_bad_value bdev_pcache_create "{\"name\": \"X\", $P, \"promotion\": \"nhit\"}"
bad duplicate_key bdev_pcache_create "{\"name\": \"X\", \"name\": \"Y\", $P}"
bad gc_percent_96 bdev_pcache_create "{\"name\": \"X\", $P, \"gc_percent\": 96}"
bad gc_percent_negative bdev_pcache_create "{\"name\": \"X\", $P, \"gc_percent\": -5}"
bad gc_percent_float bdev_pcache_create "{\"name\": \"X\", $P, \"gc_percent\": 50.5}"
bad gc_percent_string bdev_pcache_create "{\"name\": \"X\", $P, \"gc_percent\": \"50\"}"
bad pmem_size_zero bdev_pcache_create "{\"name\": \"X\", \"base_bdev_name\": \"Bad1\", \"pmem_path\": \"$SHM-b1\", \"pmem_size_mb\": 0, $V}"
bad pmem_size_too_small bdev_pcache_create "{\"name\": \"X\", \"base_bdev_name\": \"Bad1\", \"pmem_path\": \"$SHM-b1\", \"pmem_size_mb\": 1, $V}"
bad persistence_file bdev_pcache_create "{\"name\": \"X\", \"base_bdev_name\": \"Bad1\", \"pmem_path\": \"$SHM-b1\", \"pmem_size_mb\": 64, \"persistence\": \"file\"}"
bad persistence_bogus bdev_pcache_create "{\"name\": \"X\", \"base_bdev_name\": \"Bad1\", \"pmem_path\": \"$SHM-b1\", \"pmem_size_mb\": 64, \"persistence\": \"nvram\"}"
bad persistence_pmem_not_dax bdev_pcache_create "{\"name\": \"X\", \"base_bdev_name\": \"Bad1\", \"pmem_path\": \"$SHM-b1\", \"pmem_size_mb\": 64}"
bad format_wrong_type bdev_pcache_create "{\"name\": \"X\", $P, \"format\": \"yes\"}"
bad data_crc_wrong_type bdev_pcache_create "{\"name\": \"X\", $P, \"data_crc\": 1}"
bad relative_pmem_path bdev_pcache_create "{\"name\": \"X\", \"base_bdev_name\": \"Bad1\", \"pmem_path\": \"shm/x\", $V}"
bad pmem_path_directory bdev_pcache_create "{\"name\": \"X\", \"base_bdev_name\": \"Bad1\", \"pmem_path\": \"$WORK/adir\", $V}"
bad pmem_path_missing_no_size bdev_pcache_create "{\"name\": \"X\", \"base_bdev_name\": \"Bad1\", \"pmem_path\": \"$SHM-nosuch\", $V}"
bad pmem_path_unwritable_dir bdev_pcache_create "{\"name\": \"X\", \"base_bdev_name\": \"Bad1\", \"pmem_path\": \"/proc/pcache-x\", \"pmem_size_mb\": 64, $V}"
bad pmem_size_mismatch bdev_pcache_create "{\"name\": \"X\", \"base_bdev_name\": \"Bad1\", \"pmem_path\": \"$SHM-foreign\", \"pmem_size_mb\": 64, $V}"
bad foreign_medium bdev_pcache_create "{\"name\": \"X\", \"base_bdev_name\": \"Bad1\", \"pmem_path\": \"$SHM-foreign\", $V}"
bad duplicate_pcache_name bdev_pcache_create "{\"name\": \"BadP\", $P}"
bad name_of_existing_bdev bdev_pcache_create "{\"name\": \"Bad0\", $P}"
bad base_used_by_pcache bdev_pcache_create "{\"name\": \"X\", \"base_bdev_name\": \"Bad0\", \"pmem_path\": \"$SHM-b1\", \"pmem_size_mb\": 64, $V}"
bad base_claimed bdev_pcache_create "{\"name\": \"X\", \"base_bdev_name\": \"Bad2\", \"pmem_path\": \"$SHM-b1\", \"pmem_size_mb\": 64, $V}"
bad pmem_in_use bdev_pcache_create "{\"name\": \"X\", \"base_bdev_name\": \"Bad1\", \"pmem_path\": \"$SHM-bad\", $V}"
bad medium_of_other_backing bdev_pcache_create "{\"name\": \"X\", \"base_bdev_name\": \"Bad1\", \"pmem_path\": \"$SHM-other\", $V}"
# That refusal names the identity the medium expects (Bad3's UUID) and the ways out that
# keep the dirty data (recreate the base with that UUID, flush offline) before "format".
err=$(raw "$SOCK" bdev_pcache_create "{\"name\": \"X_advice\", \"base_bdev_name\": \"Bad1\", \"pmem_path\": \"$SHM-other\", $V}" 10 2>&1 > /dev/null)
uuid3=$($R bdev_get_bdevs -b Bad3 2> /dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["uuid"])' 2> /dev/null)
if python3 -c '
import json,sys
m=json.loads(sys.argv[1])["message"]; u=sys.argv[2]
keep=[m.find("-u "+u), m.find("pcache flush --pmem")]; fmt=m.find("\"format\": true")
sys.exit(0 if u and min(keep) >= 0 and fmt > max(keep) else 1)' "$err" "$uuid3" 2> /dev/null; then
    pass "bad_rpc medium_of_other_backing_advice: names UUID $uuid3, keeps data before format"
else
    fail "bad_rpc medium_of_other_backing_advice: $err"
fi
bad delete_unknown bdev_pcache_delete '{"name": "NoSuch"}'
bad delete_flush_wrong_type bdev_pcache_delete '{"name": "BadP", "flush": "no"}'
bad get_stats_unknown bdev_pcache_get_stats '{"name": "NoSuch"}'
bad set_options_nothing bdev_pcache_set_options '{"name": "BadP"}'
bad set_options_cache_mode bdev_pcache_set_options '{"name": "BadP", "cache_mode": "fast"}'
bad set_options_seq_policy bdev_pcache_set_options '{"name": "BadP", "seq_cutoff_policy": 3}'
bad set_options_seq_cutoff bdev_pcache_set_options '{"name": "BadP", "seq_cutoff_kib": 4194305}'
bad set_options_good_and_bad bdev_pcache_set_options '{"name": "BadP", "gc_percent": 50, "cache_mode": "passthrough", "seq_cutoff_policy": "sometimes"}'
bad set_options_unknown_option bdev_pcache_set_options '{"name": "BadP", "cache_mode": "passthrough", "mode": "x"}'
bad set_options_gc_96 bdev_pcache_set_options '{"name": "BadP", "gc_percent": 96}'
bad set_options_unknown bdev_pcache_set_options '{"name": "NoSuch", "gc_percent": 50}'
bad flush_unknown bdev_pcache_flush '{"name": "NoSuch"}'
bad flush_missing_name bdev_pcache_flush '{}'

# ---------------------------------------------------------------- persistence (kill -9)
# Base: an aio file behind a delay bdev (slow writes keep data dirty in the cache), pcache
# in /dev/shm (survives the process), exported over NVMe-oF/TCP. spdk_dd on core 1
# writes a random pattern through the export, bdevperf -w flush flushes it, then the
# target is killed with SIGKILL and restarted from its saved config.
stop "$SOCK" "$TGT_PID"
truncate -s 256M "$WORK/base.img"
head -c 32M /dev/urandom > "$WORK/pattern"
start tgt3 1 0x1 "$SOCK" "$SPDK_TGT"
TGT_PID=$APP_PID
wait_up "$SOCK"
$R bdev_aio_create "$WORK/base.img" Aio0 4096 > /dev/null &&
    raw "$SOCK" bdev_delay_create '{"name": "Slow0", "base_bdev_name": "Aio0", "avg_read_latency": 100, "p99_read_latency": 100, "avg_write_latency": 200000, "p99_write_latency": 200000}' > /dev/null &&
    $R bdev_pcache_create -n PCache0 -b Slow0 -p "$SHM-persist" -s 128 \
        --persistence volatile > /dev/null &&
    raw "$SOCK" nvmf_create_transport '{"trtype": "TCP"}' > /dev/null &&
    raw "$SOCK" nvmf_create_subsystem "{\"nqn\": \"$NQN\", \"allow_any_host\": true, \"serial_number\": \"PCACHE0000000001\"}" > /dev/null &&
    raw "$SOCK" nvmf_subsystem_add_ns "{\"nqn\": \"$NQN\", \"namespace\": {\"bdev_name\": \"PCache0\"}}" > /dev/null &&
    raw "$SOCK" nvmf_subsystem_add_listener "{\"nqn\": \"$NQN\", \"listen_address\": {\"trtype\": \"TCP\", \"adrfam\": \"IPv4\", \"traddr\": \"127.0.0.1\", \"trsvcid\": \"$PORT_EXPORT\"}}" > /dev/null
setup=$?
prc=1
if [ $setup = 0 ]; then
    start dd_write 0 0x2 "$WORK/dd.sock" "$SPDK_DD" --json "$WORK/bp-initiator.json" \
        --if "$WORK/pattern" --ob Nvme1n1 --bs 4096
    wait "$APP_PID"
    wrc=$?
    start flusher 0 0x2 "$WORK/flush.sock" "$BDEVPERF" -c "$WORK/bp-initiator.json" \
        -q 1 -o 4096 -w flush -t 1
    wait "$APP_PID"
    frc=$?
    dirty=$($R bdev_pcache_get_stats -n PCache0 2> /dev/null | field "['dirty_bytes']")
    flushes=$($R bdev_pcache_get_stats -n PCache0 2> /dev/null | field "['flushes']")
    $R save_config > "$WORK/persist.json" 2> /dev/null
    kill -9 "$TGT_PID"
    wait "$TGT_PID" 2> /dev/null
    start tgt4 1 0x1 "$SOCK" "$SPDK_TGT" -c "$WORK/persist.json"
    TGT_PID=$APP_PID
    wait_up "$SOCK"
    sleep 1
    start dd_read 0 0x2 "$WORK/dd.sock" "$SPDK_DD" --json "$WORK/bp-initiator.json" \
        --ib Nvme1n1 --of "$WORK/readback" --bs 4096 --count 8192
    wait "$APP_PID"
    rrc=$?
    if [ $wrc = 0 ] && [ $frc = 0 ] && [ $rrc = 0 ] && cmp -s "$WORK/pattern" "$WORK/readback"; then
        prc=0
        pass "persistence: 32 MiB written + flushed over NVMe-oF ($flushes flushes), $dirty dirty bytes at kill -9, restarted from saved config, read back intact"
    else
        fail "persistence: write rc=$wrc flush rc=$frc read rc=$rrc, dirty at kill=$dirty; cmp: $(cmp "$WORK/pattern" "$WORK/readback" 2>&1 | head -1)"
        tail -5 "$WORK/tgt4.log"
    fi
else
    fail "persistence: setup failed"
    tail -10 "$WORK/tgt3.log"
fi
stop "$SOCK" "$TGT_PID"

# ---------------------------------------------------------------- writeback content
# What writeback puts on the base must be the data: spdk_dd writes 192 MiB through a
# 128 MiB cache over an aio file in 12 KiB requests (GC runs; neighbouring extents of a
# kset go to the base as one request), then a second process opens the same cache,
# drains it (bdev_pcache_flush) and the base file itself is compared with the data.
truncate -s 256M "$WORK/wb-base.img"
head -c 192M /dev/urandom > "$WORK/wb-pattern"
wb_config() { # FORMAT(true|false)
    echo '{"subsystems": [{"subsystem": "bdev", "config": [
{"method": "bdev_aio_create", "params": {"name": "Aio0", "filename": "'"$WORK"'/wb-base.img", "block_size": 4096, "uuid": "3f0c6a52-8d1e-4b7a-9c25-6e0d4f1b2a77"}},
{"method": "bdev_pcache_create", "params": {"name": "PCache0", "base_bdev_name": "Aio0", "pmem_path": "'"$SHM"'-wb", "pmem_size_mb": 128, "persistence": "volatile", "format": '"$1"'}},
{"method": "bdev_wait_for_examine"}]}]}'
}
wb_config true > "$WORK/wb-write.json"
wb_config false > "$WORK/wb-drain.json"
start wb_write 1 0x1 "$WORK/wbdd.sock" "$SPDK_DD" --json "$WORK/wb-write.json" \
    --if "$WORK/wb-pattern" --ob PCache0 --bs 12288 --qd 32
wait "$APP_PID"
wrc=$?
start wb_drain 1 0x1 "$SOCK" "$SPDK_TGT" --json "$WORK/wb-drain.json"
TGT_PID=$APP_PID
wait_up "$SOCK"
$R bdev_pcache_flush -n PCache0 > /dev/null 2>&1
drained=0
for _ in $(seq 1 120); do
    st=$($R bdev_pcache_get_stats -n PCache0 2> /dev/null | field "['dirty_bytes'], d[0]['flush']['active']")
    if [ "$st" = "0 False" ]; then
        drained=1
        break
    fi
    sleep 0.5
done
wbk=$($R bdev_pcache_get_stats -n PCache0 2> /dev/null | field "['writeback_ksets']")
stop "$SOCK" "$TGT_PID"
if [ $wrc = 0 ] && [ $drained = 1 ] && cmp -s -n $((192 << 20)) "$WORK/wb-pattern" "$WORK/wb-base.img"; then
    pass "writeback_content: 192 MiB through a 128 MiB cache in 12 KiB writes, drained ($wbk ksets in the second process); the base file equals the data"
else
    fail "writeback_content: write rc=$wrc drained=$drained; cmp: $(cmp -n $((192 << 20)) "$WORK/wb-pattern" "$WORK/wb-base.img" 2>&1 | head -1)"
    tail -5 "$WORK/wb_write.log" "$WORK/wb_drain.log"
fi
rm -f "$WORK/wb-pattern" "$WORK/wb-base.img"

# ---------------------------------------------------------------- verify through recycling
# Writeback recycling (moving live dirty data of the current write epoch instead of
# writing it back) runs where the base's FLUSH is slow: an aio file's is an fsync. Two
# verify jobs on one core share a 48 MiB cache over it: one laps 4 MiB, the other
# 160 MiB, so writeback windows are about half live (the first job's blocks superseded,
# the second's not), and reads are half the requests. Every write is read back at once
# (a move that raced a newer write would show as a mismatch); afterwards a drain must
# empty the cache without errors.
truncate -s 256M "$WORK/rc-base.img"
cat > "$WORK/rc-jobs.conf" << EOF
[global]
filename=PCache0
rw=verify
bs=4096
iodepth=16
[lap]
offset=0
length=1024
[wide]
offset=1024
length=40960
EOF
echo '{"subsystems": [{"subsystem": "bdev", "config": [
{"method": "bdev_aio_create", "params": {"name": "Aio0", "filename": "'"$WORK"'/rc-base.img", "block_size": 4096}},
{"method": "bdev_pcache_create", "params": {"name": "PCache0", "base_bdev_name": "Aio0", "pmem_path": "'"$SHM"'-rc", "pmem_size_mb": 48, "persistence": "volatile", "format": true}},
{"method": "bdev_wait_for_examine"}]}]}' > "$WORK/rc.json"
rc_secs=$((SECS < 20 ? SECS : 20))
start rc 1 0x1 "$WORK/rc.sock" "$BDEVPERF" -c "$WORK/rc.json" -j "$WORK/rc-jobs.conf" -z
RC_PID=$APP_PID
rc_ok=0
if wait_up "$WORK/rc.sock"; then
    raw "$WORK/rc.sock" perform_tests '{"time_in_sec": '"$rc_secs"'}' $((rc_secs + 60)) > "$WORK/rc-result.json" 2>&1
    prc=$?
    rc_stats=$(raw "$WORK/rc.sock" bdev_pcache_get_stats '{"name": "PCache0"}' 10 2> /dev/null)
    raw "$WORK/rc.sock" bdev_pcache_flush '{"name": "PCache0"}' 10 > /dev/null 2>&1
    rc_drained=0
    for _ in $(seq 1 120); do
        st=$(raw "$WORK/rc.sock" bdev_pcache_get_stats '{"name": "PCache0"}' 10 2> /dev/null | field "['dirty_bytes'], d[0]['flush']['active']")
        if [ "$st" = "0 False" ]; then
            rc_drained=1
            break
        fi
        sleep 0.5
    done
    read -r rec flush_us errs <<< "$(field "['recycled_bytes'], d[0]['writeback']['base_flush_us'], d[0]['io_errors'] + d[0]['writeback_errors']" <<< "${rc_stats:-[]}" 2> /dev/null)"
    # A miscompare stops its job ("status": "failed"); failed I/O counts in io_failed.
    read -r nfail iops <<< "$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["results"]; print(sum(j["io_failed"] + (j["status"] != "finished") for j in r), sum(j["iops"] for j in r))' "$WORK/rc-result.json" 2> /dev/null)"
    # Recycling is gated on the FLUSH's cost (RECYCLE_FLUSH_US = 100 us): over a base
    # whose fsync is faster it does not run, and only the data checks apply.
    if [ $prc = 0 ] && [ "${nfail:-x}" = 0 ] && [ "${errs:-x}" = 0 ] && [ $rc_drained = 1 ] &&
        { [ "${rec:-0}" -gt 0 ] || [ "${flush_us:-0}" -lt 100 ]; }; then
        rc_ok=1
        pass "verify_recycle (${rc_secs}s, 48 MiB cache over an aio file, two verify jobs): $(printf '%.0f' "${iops:-0}") IOPS, 0 miscompares, $((${rec:-0} >> 20)) MiB recycled (base FLUSH ${flush_us} us), drained"
    fi
fi
if [ $rc_ok = 0 ]; then
    fail "verify_recycle: perform_tests rc=${prc:-?} failed/stopped jobs=${nfail:-?} errors=${errs:-?} recycled=${rec:-?} flush_us=${flush_us:-?} drained=${rc_drained:-?}"
    tail -5 "$WORK/rc-result.json" "$WORK/rc.log"
fi
stop "$WORK/rc.sock" "$RC_PID"
rm -f "$WORK/rc-base.img"

# ---------------------------------------------------------------- hot removal under I/O
# spdk_tgt exports PCache0 (over Malloc0) over NVMe-oF/TCP; bdevperf on core 1 writes to
# it; Malloc0 is deleted under that load. PCache0 must unregister (its namespace goes
# away), the initiator's I/O must end (with errors), and the target must stay up.
start tgt5 1 0x1 "$SOCK" "$SPDK_TGT"
TGT_PID=$APP_PID
wait_up "$SOCK"
$R bdev_malloc_create -b Malloc0 256 4096 > /dev/null &&
    $R bdev_pcache_create -n PCache0 -b Malloc0 -p "$SHM-hot" -s 128 --persistence volatile \
        --format > /dev/null &&
    raw "$SOCK" nvmf_create_transport '{"trtype": "TCP"}' > /dev/null &&
    raw "$SOCK" nvmf_create_subsystem "{\"nqn\": \"$NQN\", \"allow_any_host\": true, \"serial_number\": \"PCACHE0000000001\"}" > /dev/null &&
    raw "$SOCK" nvmf_subsystem_add_ns "{\"nqn\": \"$NQN\", \"namespace\": {\"bdev_name\": \"PCache0\"}}" > /dev/null &&
    raw "$SOCK" nvmf_subsystem_add_listener "{\"nqn\": \"$NQN\", \"listen_address\": {\"trtype\": \"TCP\", \"adrfam\": \"IPv4\", \"traddr\": \"127.0.0.1\", \"trsvcid\": \"$PORT_EXPORT\"}}" > /dev/null
setup=$?
if [ $setup = 0 ]; then
    start hot_initiator 0 0x2 "$WORK/hot.sock" "$BDEVPERF" -c "$WORK/bp-initiator.json" \
        -q 32 -o 4096 -w randwrite -t 20
    HOT_PID=$APP_PID
    sleep 6
    raw "$SOCK" bdev_malloc_delete '{"name": "Malloc0"}' 10 > /dev/null 2>&1
    drc=$?
    ended=0
    for _ in $(seq 1 60); do
        kill -0 "$HOT_PID" 2> /dev/null || { ended=1; break; }
        sleep 0.5
    done
    wait "$HOT_PID" 2> /dev/null
    names=$(raw "$SOCK" bdev_get_bdevs '' 10 2> /dev/null | python3 -c 'import json,sys; print(sorted(b["name"] for b in json.load(sys.stdin)))' 2> /dev/null)
    left=$(raw "$SOCK" bdev_pcache_get_stats '' 10 2> /dev/null | tr -d ' \n')
    if [ $drc = 0 ] && [ $ended = 1 ] && [ "$names" = "[]" ] && [ "$left" = "[]" ] &&
        raw "$SOCK" spdk_get_version '' 5 > /dev/null 2>&1; then
        pass "hot_remove: base deleted under NVMe-oF randwrite; PCache0 unregistered, initiator I/O ended, target alive"
    else
        fail "hot_remove: delete rc=$drc initiator ended=$ended bdevs=$names stats=$left"
        tail -10 "$WORK/tgt5.log"
    fi
else
    fail "hot_remove: setup failed"
fi
stop "$SOCK" "$TGT_PID"

# ---------------------------------------------------------------- observability
. "$HERE/observe.sh"

# ---------------------------------------------------------------- cache modes, cutoff
. "$HERE/policy.sh"

echo "elapsed $(($(date +%s) - T0)) s (SPDK_TEST_SECONDS=$SECS)"
echo "$PASS passed, $FAILED failed"
[ "$FAILED" = 0 ]
