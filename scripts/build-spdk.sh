#!/usr/bin/env bash
# Builds the SPDK that the pcache SPDK module is tested with, from a source tarball or a
# source tree, into a cache outside the clone, and prints the built tree's path (usable as
# SPDK_DIR) as the last line of stdout. Messages go to stderr.
#
#   scripts/build-spdk.sh [--deps-only] [--no-deps] [SOURCE]
#
# SOURCE: an SPDK source tarball (one top folder, e.g. spdk-*.tar.xz) or an SPDK source
# tree (a checkout with its submodules: git clone --recurse-submodules). Default:
# $PCACHE_SPDK_SOURCE, else the pinned snapshot ../shared/spdk/spdk-*.tar.xz beside the
# clone, when present.
#
# Cache: $PCACHE_SPDK_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/pcache), one folder
# spdk-<key> per source, where <key> hashes the source (the tarball's bytes, or a tree's
# HEAD, submodule commits and uncommitted changes) and this script's configure line. A
# second run with the same source prints the cached tree at once; a changed source builds
# a new one. Invariants: a tree counts as built only when its stamp file exists, written
# last, so an interrupted build is never reused (it is wiped and rebuilt); the build runs
# under a lock (flock), so concurrent runs wait for one build instead of racing. SPDK
# bakes absolute paths (RUNPATH to its ISA-L) into its binaries, so the tree is built in
# its final folder rather than in a temporary one renamed at the end.
#
# Debian packages SPDK needs (and libclang-dev for the module's bindings) are installed
# with apt-get when missing and running as root (--no-deps: never; --deps-only: only
# that). Nothing else is installed anywhere: the tree is used in place (build/lib,
# build/bin, build/examples, scripts/rpc.py).
#
# Exit status: 0 built or cached; 3 no source found (nothing to build); 1 anything else.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)

# Part of the cache key: changing it rebuilds every cached tree. --with-dpdk (Debian's
# DPDK) is added when the source has no dpdk/ submodule, as in the pinned snapshot, which
# is patched to accept Debian's DPDK 22.11; an upstream checkout with its submodules
# builds its own DPDK instead (slower, but no patches needed).
CONFIGURE=(--with-shared --with-ocf --with-uring --without-crypto
    --without-isal-crypto --without-fio --without-xnvme --without-vfio-user
    --without-fsdev --without-nvme-cuse --without-usdt --without-idxd --disable-unit-tests)
# SPDK's build (with Debian's DPDK 22.11), its rpc.py and genrpc.py, and bindgen.
PACKAGES=(build-essential pkg-config dpdk-dev libdpdk-dev libnuma-dev libaio-dev
    liburing-dev libssl-dev uuid-dev libncurses-dev libkeyutils-dev libjson-c-dev
    libcunit1-dev libbsd-dev python3 python3-pyelftools python3-tabulate python3-jinja2
    python3-yaml meson ninja-build nasm autoconf automake libtool patchelf libclang-dev)

say() { echo "build-spdk: $*" >&2; }
die() {
    say "$*"
    exit 1
}

DEPS=auto
SRC=
while [ $# -gt 0 ]; do
    case $1 in
        --no-deps) DEPS=no ;;
        --deps-only) DEPS=only ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
            exit 0
            ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) SRC=$1 ;;
    esac
    shift
done

# ---------------------------------------------------------------- Debian packages
install_deps() {
    local missing=() p
    if ! command -v dpkg-query > /dev/null; then
        say "not a Debian system: make sure SPDK's build dependencies and libclang are installed"
        return 0
    fi
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2> /dev/null | grep -q "install ok installed" ||
            missing+=("$p")
    done
    [ ${#missing[@]} = 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        die "missing Debian packages: ${missing[*]}
  install them (as root): apt-get install ${missing[*]}"
    fi
    say "installing ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" > /dev/null ||
        die "apt-get install ${missing[*]} failed"
}

if [ "$DEPS" = only ]; then
    install_deps
    exit 0
fi

# ---------------------------------------------------------------- source and key
if [ -z "$SRC" ]; then
    SRC=${PCACHE_SPDK_SOURCE:-}
fi
if [ -z "$SRC" ]; then
    for f in "$ROOT"/../shared/spdk/spdk-*.tar.*; do
        [ -f "$f" ] && SRC=$f
    done
fi
if [ -z "$SRC" ]; then
    say "no SPDK source: pass a tarball or a source tree (git clone --recurse-submodules
  https://github.com/spdk/spdk, at the commit in README.md), or set PCACHE_SPDK_SOURCE"
    exit 3
fi
[ -e "$SRC" ] || die "$SRC: no such file or directory"
SRC=$(cd "$(dirname "$SRC")" && pwd)/$(basename "$SRC")

# The key names the source's content, not its path: a moved tarball reuses its build.
if [ -f "$SRC" ]; then
    KIND=tarball
    src_id=$(sha256sum < "$SRC")
elif [ -f "$SRC/configure" ] && [ -f "$SRC/include/spdk/bdev_module.h" ]; then
    KIND=tree
    if git -C "$SRC" rev-parse --git-dir > /dev/null 2>&1; then
        # HEAD, the submodules' commits, and every uncommitted change (also inside the
        # submodules); untracked files count by name.
        src_id=$({
            git -C "$SRC" rev-parse HEAD
            git -C "$SRC" submodule status --recursive
            git -C "$SRC" diff HEAD --binary
            git -C "$SRC" submodule foreach --quiet --recursive 'git diff HEAD --binary'
            git -C "$SRC" status --porcelain --untracked-files=all --ignore-submodules=none
        } | sha256sum)
    else
        # No git: every file's path, size and modification time (build outputs excluded).
        src_id=$(cd "$SRC" && find . -path ./build -prune -o -type f -printf '%p %s %T@\n' |
            LC_ALL=C sort | sha256sum)
    fi
else
    die "$SRC: neither a tarball nor an SPDK source tree (no configure / include/spdk)"
fi
KEY=$(printf '%s\n%s\n' "${src_id%% *}" "${CONFIGURE[*]}" | sha256sum | cut -c1-16)

CACHE=${PCACHE_SPDK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pcache}
DIR=$CACHE/spdk-$KEY
STAMP=$DIR/.pcache-build-complete

if [ -f "$STAMP" ]; then
    say "cached: $DIR (from $SRC)"
    echo "$DIR"
    exit 0
fi

mkdir -p "$CACHE" || die "cannot create the cache folder $CACHE (set PCACHE_SPDK_CACHE)"
exec 9> "$DIR.lock"
if ! flock -n 9; then
    say "another build of $DIR is running; waiting for it"
    flock 9
fi
if [ -f "$STAMP" ]; then
    say "cached: $DIR (built by a concurrent run)"
    echo "$DIR"
    exit 0
fi

# ---------------------------------------------------------------- build
[ "$DEPS" = auto ] && install_deps
for t in make gcc pkg-config python3 tar; do
    command -v "$t" > /dev/null || die "$t not found (install SPDK's build dependencies)"
done

T0=$(date +%s)
# A folder without the stamp is a build that was interrupted: start over.
rm -rf "$DIR"
mkdir -p "$DIR"
LOG=$CACHE/spdk-$KEY.log
say "building SPDK from $SRC ($KIND) in $DIR; log: $LOG"
if [ $KIND = tarball ]; then
    tar -xf "$SRC" -C "$DIR" --strip-components=1 || die "cannot unpack $SRC"
else
    # Copies the tree without its git metadata or earlier build outputs.
    tar -C "$SRC" --exclude=.git --anchored --exclude=./build -cf - . | tar -C "$DIR" -xf - ||
        die "cannot copy $SRC"
fi
[ -x "$DIR/configure" ] || die "$SRC holds no SPDK source (no configure at its top)"
for sub in ocf isa-l; do
    if [ ! -e "$DIR/$sub/Makefile" ] && [ ! -e "$DIR/$sub/Makefile.am" ] &&
        [ ! -e "$DIR/$sub/Makefile.unx" ]; then
        die "$SRC has no $sub/ submodule: clone with --recurse-submodules"
    fi
done

if [ ! -f "$DIR/dpdk/meson.build" ]; then
    CONFIGURE=(--with-dpdk "${CONFIGURE[@]}")
fi

# SPDK's generators (scripts/genrpc.py) need Debian's python3 modules, not those of
# whatever python3 comes first on PATH (pyenv, venv).
export PATH=/usr/bin:$PATH
(
    cd "$DIR"
    ./configure "${CONFIGURE[@]}"
    make -j"$(nproc)"
) > "$LOG" 2>&1 || {
    tail -30 "$LOG" >&2
    die "SPDK build failed (full log: $LOG); $DIR is left incomplete and will be rebuilt"
}
for f in build/lib/libspdk_bdev.so build/bin/spdk_tgt build/examples/bdevperf \
    build/bin/spdk_dd scripts/rpc.py; do
    [ -e "$DIR/$f" ] || die "SPDK built without $f (see $LOG)"
done
printf 'source %s\nkey %s\nbuilt %s in %s s\n' "$SRC" "$KEY" "$(date -u +%FT%TZ)" \
    "$(($(date +%s) - T0))" > "$STAMP.tmp"
mv "$STAMP.tmp" "$STAMP"
say "built $DIR in $(($(date +%s) - T0)) s"
echo "$DIR"
