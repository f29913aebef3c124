#!/usr/bin/env bash
# Builds pcache's SPDK bdev module when needed and installs it where an SPDK expects it:
#
#   scripts/install-spdk-module.sh [--no-build] PREFIX
#
# PREFIX: an SPDK install prefix (lib/libspdk_bdev.so*, installed with `make install`),
# an SPDK source tree built --with-shared (build/lib/), or any other directory (then
# SPDK_DIR or pkg-config must name the SPDK to build against).
#
# What it does:
#   1. `cargo build --release -p spdk_bdev_pcache` against SPDK_DIR (default: PREFIX when
#      PREFIX holds an SPDK; else pkg-config's spdk_log, as spdk-sys finds it). Cargo
#      rebuilds only what changed; --no-build skips this and installs what is built.
#   2. libspdk_bdev_pcache.so -> PREFIX/lib (a source tree: PREFIX/build/lib, beside
#      SPDK's own libraries).
#   3. the rpc.py plugin configs/rpc/pcache_rpc.py -> where SPDK's rpc.py imports it
#      from with `--plugin pcache_rpc`: beside the `spdk` Python package, i.e.
#      PREFIX/lib/python3*/site-packages (installed SPDK: spdk-rpc, with that directory on
#      PYTHONPATH) or PREFIX/python (a source tree: scripts/rpc.py adds it to sys.path);
#      without an `spdk` package in PREFIX, PREFIX/lib/python3.X/site-packages.
# Prints the installed paths and the commands to load the module and use the plugin.
#
# Invariants: installs exactly those two files, never anything else, and only after
# the build succeeded and the built library is found; every failure says what is
# missing and exits non-zero (1: usage or environment, 2: build failed). The module
# built is the one Cargo reports for this build (any CARGO_TARGET_DIR), never a stale
# file from another target directory.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
say() { echo "install-spdk-module: $*" >&2; }
die() {
    say "$*"
    exit "${2:-1}"
}
usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

BUILD=1
PREFIX=
while [ $# -gt 0 ]; do
    case $1 in
        --no-build) BUILD=0 ;;
        -h | --help)
            usage
            exit 0
            ;;
        -*) die "unknown option $1 (see --help)" ;;
        *)
            [ -z "$PREFIX" ] || die "one PREFIX only (got '$PREFIX' and '$1')"
            PREFIX=$1
            ;;
    esac
    shift
done
[ -n "$PREFIX" ] || {
    usage >&2
    die "missing PREFIX (an SPDK install prefix or source tree, or a directory to install into)"
}
mkdir -p "$PREFIX" || die "cannot create $PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)
command -v python3 > /dev/null || die "python3 is needed (SPDK's rpc.py needs it too)"

# ---------------------------------------------------------------- what PREFIX is
if compgen -G "$PREFIX/build/lib/libspdk_bdev.so*" > /dev/null; then
    KIND=tree
    LIBDIR=$PREFIX/build/lib
elif compgen -G "$PREFIX/lib/libspdk_bdev.so*" > /dev/null; then
    KIND=prefix
    LIBDIR=$PREFIX/lib
else
    KIND=other
    LIBDIR=$PREFIX/lib
fi
if [ -z "${SPDK_DIR:-}" ] && [ "$KIND" != other ]; then
    export SPDK_DIR=$PREFIX
fi
if [ -z "${SPDK_DIR:-}" ] && [ "$BUILD" = 1 ] &&
    ! { command -v pkg-config > /dev/null && pkg-config --exists spdk_log 2> /dev/null; }; then
    die "$PREFIX holds no SPDK (no lib/libspdk_bdev.so* or build/lib/libspdk_bdev.so*), and
    neither SPDK_DIR nor pkg-config (spdk_log) names one to build against. Set SPDK_DIR to
    the SPDK the module will run in (scripts/build-spdk.sh builds the tested one)."
fi
if [ -n "${SPDK_DIR:-}" ] && [ "$KIND" != other ] &&
    [ "$(cd "$SPDK_DIR" 2> /dev/null && pwd -P)" != "$(cd "$PREFIX" && pwd -P)" ]; then
    say "warning: building against SPDK_DIR=$SPDK_DIR but installing into the SPDK at $PREFIX;"
    say "         the module refuses to register in an app whose SPDK version differs"
fi

# ---------------------------------------------------------------- build
# cargo metadata names the target directory Cargo uses (CARGO_TARGET_DIR, a config file
# or ./target), so the library installed is the one this build wrote.
TARGET_DIR=$(cd "$ROOT" && cargo metadata --format-version 1 --no-deps 2> /dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])') ||
    die "cargo metadata failed in $ROOT (is cargo installed?)"
MOD=$TARGET_DIR/release/libspdk_bdev_pcache.so
if [ "$BUILD" = 1 ]; then
    say "building: cargo build --release -p spdk_bdev_pcache (SPDK_DIR=${SPDK_DIR:-<pkg-config>})"
    LOG=$(mktemp /tmp/pcache-install.XXXXXX)
    if ! (cd "$ROOT" && cargo build --release -p spdk_bdev_pcache) > "$LOG" 2>&1; then
        tail -30 "$LOG" >&2
        rm -f "$LOG"
        die "build failed (full output above; needs libclang-dev for bindgen and an SPDK
    configured --with-shared)" 2
    fi
    rm -f "$LOG"
fi
[ -f "$MOD" ] || die "$MOD does not exist: build it (drop --no-build)"
DYN=$(readelf -d "$MOD" 2> /dev/null || true)
grep -q 'libspdk_bdev\.so' <<< "$DYN" ||
    die "$MOD does not link libspdk_bdev: not an SPDK module build"

# ---------------------------------------------------------------- install
mkdir -p "$LIBDIR" || die "cannot create $LIBDIR"
install -m 755 "$MOD" "$LIBDIR/libspdk_bdev_pcache.so" ||
    die "cannot install into $LIBDIR (permissions?)"
PLUGIN_DIRS=()
if [ "$KIND" = tree ]; then
    PLUGIN_DIRS=("$PREFIX/python")
else
    for d in "$PREFIX"/lib/python3*/site-packages; do
        [ -d "$d/spdk" ] && PLUGIN_DIRS+=("$d")
    done
    if [ ${#PLUGIN_DIRS[@]} = 0 ]; then
        PLUGIN_DIRS=("$PREFIX/lib/$(python3 -c 'import sys; print("python%d.%d" % sys.version_info[:2])')/site-packages")
    fi
fi
for d in "${PLUGIN_DIRS[@]}"; do
    mkdir -p "$d" && install -m 644 "$ROOT/configs/rpc/pcache_rpc.py" "$d/pcache_rpc.py" ||
        die "cannot install the rpc.py plugin into $d"
done

echo "installed $LIBDIR/libspdk_bdev_pcache.so"
for d in "${PLUGIN_DIRS[@]}"; do echo "installed $d/pcache_rpc.py"; done
if [ "$KIND" = tree ]; then
    cat << EOF
load:  LD_PRELOAD=$LIBDIR/libspdk_bdev_pcache.so $PREFIX/build/bin/spdk_tgt ...
rpc:   $PREFIX/scripts/rpc.py --plugin pcache_rpc bdev_pcache_get_stats
EOF
else
    cat << EOF
load:  LD_LIBRARY_PATH=$LIBDIR LD_PRELOAD=$LIBDIR/libspdk_bdev_pcache.so <SPDK>/bin/spdk_tgt ...
rpc:   PYTHONPATH=${PLUGIN_DIRS[0]} <SPDK>/bin/spdk-rpc --plugin pcache_rpc bdev_pcache_get_stats
EOF
fi
