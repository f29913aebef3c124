# Shared by test/spdk/run.sh and test/spdk/bench.sh (sourced, not run): locates SPDK
# (SPDK_DIR: install prefix or built tree; else the cache of scripts/build-spdk.sh,
# building it from the pinned source when needed; else pkg-config), builds and installs
# the module the way README says: scripts/install-spdk-module.sh (which runs
# `cargo build --release -p spdk_bdev_pcache`) into a scratch prefix $WORK/prefix, so
# the apps preload $WORK/prefix/lib/libspdk_bdev_pcache.so and rpc.py finds the plugin
# only where the script installed it. Defines helpers to start, wait for and stop SPDK
# apps with the module preloaded. Without SPDK or a source to build one it prints
# "SKIP: ..." and exits 0. Cleans up every process it started and every medium file in
# /dev/shm on exit.

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/test/spdk"

# ---------------------------------------------------------------- locate SPDK
# Without SPDK_DIR: the SPDK that scripts/build-spdk.sh keeps in its cache, built now from
# the pinned source (../shared/spdk or PCACHE_SPDK_SOURCE) when not built yet; then
# an installed SPDK found by pkg-config.
if [ -z "${SPDK_DIR:-}" ]; then
    SPDK_DIR=$("$ROOT/scripts/build-spdk.sh")
    case $? in
        0) export SPDK_DIR ;;
        3) SPDK_DIR= ;;
        *)
            echo "FAIL: building SPDK (scripts/build-spdk.sh) failed"
            exit 1
            ;;
    esac
fi
if [ -n "${SPDK_DIR:-}" ]; then
    if [ -x "$SPDK_DIR/build/bin/spdk_tgt" ]; then
        LIBDIR=$SPDK_DIR/build/lib
        : "${SPDK_TGT:=$SPDK_DIR/build/bin/spdk_tgt}"
        : "${BDEVPERF:=$SPDK_DIR/build/examples/bdevperf}"
        : "${SPDK_DD:=$SPDK_DIR/build/bin/spdk_dd}"
        : "${RPC_PY:=$SPDK_DIR/scripts/rpc.py}"
        : "${SPDK_PYTHONPATH:=$SPDK_DIR/python}"
    else
        PREFIX=$SPDK_DIR
    fi
elif command -v pkg-config > /dev/null && pkg-config --exists spdk_log 2> /dev/null; then
    # spdk_log.pc requires nothing (spdk_bdev.pc pulls in the module list, which fails
    # on an SPDK with OCF).
    PREFIX=$(pkg-config --variable=prefix spdk_log)
else
    echo "SKIP: no SPDK found and no SPDK source to build one. Set SPDK_DIR to an SPDK"
    echo "      install prefix or source tree built --with-shared, or PCACHE_SPDK_SOURCE to"
    echo "      an SPDK tarball or checkout with submodules (git 3230130e6a), which"
    echo "      scripts/build-spdk.sh builds and caches; CI has the pinned source at"
    echo "      ../shared/spdk/ beside the clone. See README.md, section SPDK."
    exit 0
fi
if [ -n "${PREFIX:-}" ]; then
    LIBDIR=$PREFIX/lib
    : "${SPDK_TGT:=$PREFIX/bin/spdk_tgt}"
    : "${BDEVPERF:=$PREFIX/bin/bdevperf}"
    : "${SPDK_DD:=$PREFIX/bin/spdk_dd}"
    : "${RPC_PY:=$PREFIX/bin/spdk-rpc}"
    : "${SPDK_PYTHONPATH:=$(echo "$PREFIX"/lib/python3*/site-packages)}"
fi
for b in "$SPDK_TGT" "$BDEVPERF" "$SPDK_DD" "$RPC_PY"; do
    if [ ! -x "$b" ]; then
        echo "FAIL: $b not found or not executable (set SPDK_TGT/BDEVPERF/SPDK_DD/RPC_PY)"
        exit 1
    fi
done
export LD_LIBRARY_PATH=$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# A built tree links its own ISA-L; the preloaded module must not pull in the system's
# (older, missing symbols SPDK's libraries need).
if [ -n "${SPDK_DIR:-}" ] && [ -d "$SPDK_DIR/isa-l/.libs" ]; then
    LD_LIBRARY_PATH=$SPDK_DIR/isa-l/.libs:$LD_LIBRARY_PATH
fi

# ---------------------------------------------------------------- build
WORK=$(mktemp -d /tmp/pcache-spdk.XXXXXX)
SHM=/dev/shm/pcache-test-$$
TAG=$$
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do
        kill -9 "$p" 2> /dev/null
    done
    wait 2> /dev/null
    # Trace buffers of apps that did not exit cleanly (SPDK removes them on a clean exit).
    for p in "${PIDS[@]}"; do
        rm -f /dev/shm/*_trace.pid"$p"
    done
    rm -f "$SHM"-*
    hugepages_release
    if [ "${SPDK_TEST_KEEP:-0}" = 1 ]; then
        echo "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

# hugepages_reserve MB: a hugetlbfs mount ($HUGE_DIR) with MB MiB of free 2 MiB pages,
# reserved for this run (root only) and given back by hugepages_release. False, with
# the reason in HUGE_WHY, when that is not possible.
HUGE_DIR= HUGE_ADDED=0
hugepages_reserve() {
    local want=$(($1 / 2)) free total
    HUGE_WHY=
    if [ ! -w /proc/sys/vm/nr_hugepages ]; then
        HUGE_WHY="cannot reserve hugepages (not root)"
        return 1
    fi
    free=$(awk '/^HugePages_Free:/ { print $2 }' /proc/meminfo)
    total=$(cat /proc/sys/vm/nr_hugepages)
    if [ "${free:-0}" -lt "$want" ]; then
        HUGE_ADDED=$((want - free))
        echo $((total + HUGE_ADDED)) > /proc/sys/vm/nr_hugepages
        free=$(awk '/^HugePages_Free:/ { print $2 }' /proc/meminfo)
        if [ "${free:-0}" -lt "$want" ]; then
            HUGE_WHY="the kernel gave only $free of $want free 2 MiB pages"
            hugepages_release
            return 1
        fi
    fi
    HUGE_DIR=$WORK/huge
    mkdir -p "$HUGE_DIR"
    if ! mount -t hugetlbfs -o pagesize=2M nodev "$HUGE_DIR" 2> /dev/null; then
        HUGE_WHY="cannot mount hugetlbfs"
        HUGE_DIR=
        hugepages_release
        return 1
    fi
}
hugepages_release() {
    if [ -n "$HUGE_DIR" ]; then
        umount "$HUGE_DIR" 2> /dev/null
        HUGE_DIR=
    fi
    if [ "$HUGE_ADDED" -gt 0 ]; then
        echo $(($(cat /proc/sys/vm/nr_hugepages) - HUGE_ADDED)) > /proc/sys/vm/nr_hugepages
        HUGE_ADDED=0
    fi
}

echo "building and installing the module (scripts/install-spdk-module.sh $WORK/prefix)..."
if ! "$ROOT/scripts/install-spdk-module.sh" "$WORK/prefix" > "$WORK/build.log" 2>&1; then
    tail -30 "$WORK/build.log"
    echo "FAIL: build or install (scripts/install-spdk-module.sh)"
    exit 1
fi
MOD=$WORK/prefix/lib/libspdk_bdev_pcache.so
PLUGIN_DIR=$(sed -n 's|^installed \(.*\)/pcache_rpc\.py$|\1|p' "$WORK/build.log" | head -1)
if [ ! -f "$MOD" ] || [ ! -f "$PLUGIN_DIR/pcache_rpc.py" ]; then
    cat "$WORK/build.log"
    echo "FAIL: the install script did not install $MOD and pcache_rpc.py"
    exit 1
fi
# SPDK's Python package, then the plugin where the install put it (not configs/rpc).
export PYTHONPATH=$SPDK_PYTHONPATH:$PLUGIN_DIR${PYTHONPATH:+:$PYTHONPATH}

# ---------------------------------------------------------------- helpers
raw() { python3 "$HERE/rpc_raw.py" "$@"; }
rpc() { "$RPC_PY" --plugin pcache_rpc "$@"; }

# start NAME PRELOAD(0|1) MASK SOCK BINARY ARGS... ; sets APP_PID
# Memory options come from APP_MEM (default: no hugepages, 2 GiB).
start() {
    local name=$1 pre=$2 mask=$3 sock=$4 bin=$5
    local -a mem
    read -r -a mem <<< "${APP_MEM:---no-huge -s 2048}"
    shift 5
    rm -f "$sock"
    if [ "$pre" = 1 ]; then
        LD_PRELOAD=$MOD "$bin" "${mem[@]}" -u -m "$mask" --disable-cpumask-locks \
            -r "$sock" "$@" > "$WORK/$name.log" 2>&1 < /dev/null &
    else
        "$bin" "${mem[@]}" -u -m "$mask" --disable-cpumask-locks \
            -r "$sock" "$@" > "$WORK/$name.log" 2>&1 < /dev/null &
    fi
    APP_PID=$!
    PIDS+=("$APP_PID")
}

# Waits until the app on SOCK answers (and finished its JSON config).
wait_up() {
    local i
    for i in $(seq 1 120); do
        if raw "$1" framework_wait_init '' 5 > /dev/null 2>&1; then
            return 0
        fi
        # The app started last has exited (a bad config): no point waiting a minute.
        if [ -n "${APP_PID:-}" ] && ! kill -0 "$APP_PID" 2> /dev/null; then
            return 1
        fi
        sleep 0.5
    done
    return 1
}

# Stops an app: SIGTERM through RPC, then kill -9 after 20 s.
stop() {
    local sock=$1 pid=$2 i
    raw "$sock" spdk_kill_instance '{"sig_name": "SIGTERM"}' 5 > /dev/null 2>&1
    for i in $(seq 1 80); do
        kill -0 "$pid" 2> /dev/null || { wait "$pid" 2> /dev/null; return 0; }
        sleep 0.25
    done
    kill -9 "$pid" 2> /dev/null
    wait "$pid" 2> /dev/null
    return 1
}

# A config from configs/ with its medium paths and ports made unique to this run.
cfg() {
    sed -e "s|/dev/shm/pcache|$SHM-|g" \
        -e "s|\"4420\"|\"$PORT_BASE\"|g" -e "s|\"4421\"|\"$PORT_EXPORT\"|g" \
        "$ROOT/configs/$1"
}
PORT_BASE=$((20000 + TAG % 20000))
PORT_EXPORT=$((PORT_BASE + 1))

# "IOPS FAILS" of a bdevperf log's Total line.
bp_total() {
    tr '\r' '\n' < "$1" | awk '$1 == "Total" && $2 == ":" { print $3, $5 }' | tail -1
}

# Field of the first cache in a get_stats answer on stdin.
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d[0]$1 if d else '')"; }

# last_stats SOCK PID PARAMS: polls bdev_pcache_get_stats (PARAMS) every half second
# while PID runs and sets LAST_STATS to the last answer that holds a cache. The
# statistics as late as the cache answers: a run slowed down (a busy machine) reaches
# writeback and GC late, and one sample at a fixed moment missed them or landed in the
# app's teardown (the bdev gone: an empty answer).
last_stats() {
    local s
    LAST_STATS=
    while kill -0 "$2" 2> /dev/null; do
        s=$(raw "$1" bdev_pcache_get_stats "$3" 5 2> /dev/null)
        [[ $s == *writeback_ksets* ]] && LAST_STATS=$s
        sleep 0.5
    done
}

# Runs bdevperf (preloaded) on CONFIG for SECS with WORKLOAD; samples pcache's stats
# from halfway until it exits. Sets BP_RC, BP_IOPS, BP_FAILS, BP_STATS.
run_bdevperf() {
    local name=$1 config=$2 workload=$3 secs=$4
    local sock=$WORK/$name.sock
    start "$name" 1 0x1 "$sock" "$BDEVPERF" -c "$config" -q 32 -o 4096 -w "$workload" \
        -t "$secs" -T PCache0
    local pid=$APP_PID
    wait_up "$sock"
    sleep $((secs / 2))
    last_stats "$sock" "$pid" ''
    BP_STATS=$LAST_STATS
    wait "$pid"
    BP_RC=$?
    read -r BP_IOPS BP_FAILS <<< "$(bp_total "$WORK/$name.log")"
}

# initiator_verify NAME WHAT CONFIG BDEVPERF_ARGS...: runs a plain bdevperf (core 1) on
# CONFIG to the end; WHAT passes if it exited 0 with no failed I/O.
initiator_verify() {
    local name=$1 what=$2 config=$3 rc iops fails
    shift 3
    start "$name" 0 0x2 "$WORK/$name.sock" "$BDEVPERF" -c "$config" "$@"
    wait "$APP_PID"
    rc=$?
    read -r iops fails <<< "$(bp_total "$WORK/$name.log")"
    if [ $rc = 0 ] && [ "${fails:-x}" = "0.00" ]; then
        pass "$what: $iops IOPS, 0 failures"
    else
        fail "$what: rc=$rc IOPS=${iops:-?} fail/s=${fails:-?}"
        tail -15 "$WORK/$name.log"
    fi
}

check_bdevperf() {
    local what=$1
    local wb gc
    wb=$(field "['writeback_ksets']" <<< "${BP_STATS:-[]}" 2> /dev/null)
    gc=$(field "['gc_ksets']" <<< "${BP_STATS:-[]}" 2> /dev/null)
    if [ "$BP_RC" = 0 ] && [ -n "${BP_IOPS:-}" ] && [ "${BP_FAILS:-x}" = "0.00" ] &&
        [ "${wb:-0}" -gt 0 ] && [ "${gc:-0}" -gt 0 ]; then
        pass "$what: ${BP_IOPS} IOPS, 0 failures, writeback ksets $wb, GC ksets $gc"
    else
        fail "$what: rc=$BP_RC IOPS=${BP_IOPS:-?} fail/s=${BP_FAILS:-?} writeback=${wb:-?} gc=${gc:-?}"
        tail -15 "$WORK/$2.log"
    fi
}

