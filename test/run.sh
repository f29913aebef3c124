#!/usr/bin/env bash
# The whole test suite, as CI runs it (`.ci/run` calls exactly this script).
# Installs the real clients the tests use (Debian packages) when they are missing,
# then: format check, clippy with -D warnings, every cargo test, a check that a build
# without SPDK writes no shared object (no module look-alike), clippy and the unit tests
# of the SPDK side with --features spdk, the file-system tier (test/fs_tier.sh: ext4
# and xfs on pcache, kill -9, fsck), the SPDK module's tier
# (test/spdk/run.sh), and a time-boxed fuzz smoke run. The SPDK tier runs against
# SPDK_DIR or the SPDK that scripts/build-spdk.sh builds from the pinned source
# (../shared/spdk) and keeps in its cache; it skips, saying how to get an SPDK, only when
# there is neither an SPDK nor a source to build one.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
# bindgen (the SPDK module's bindings) needs libclang whenever there is an SPDK to build
# against; the packages SPDK's own build needs are installed by scripts/build-spdk.sh,
# only when it has to build.
if [ -n "${SPDK_DIR:-}" ] || [ -n "${PCACHE_SPDK_SOURCE:-}" ] || compgen -G "../shared/spdk/spdk-*.tar.*" >/dev/null; then
  dpkg-query -W -f='${Status}' libclang-dev 2>/dev/null | grep -q "install ok installed" || need+=(libclang-dev)
fi
command -v fio >/dev/null || need+=(fio)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v qemu-io >/dev/null || need+=(qemu-utils)
# The file-system tier (test/fs_tier.sh): nbdfuse is in libnbd-bin (above).
command -v fusermount3 >/dev/null || need+=(fuse3)
command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "SKIP: cannot install ${need[*]} (not root); tests using them will skip"
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -D warnings"
cargo clippy --all-targets -- -D warnings
echo "== cargo test"
cargo test -- --nocapture 2>&1 | tee /tmp/pcache-test.log | grep -E "^(test |running|test result|crash points|total crash points|seeds run|kill cycles|SKIP)|violations|replica rule" || true
if grep -q "test result: FAILED\|error: test failed\|error\[" /tmp/pcache-test.log || ! grep -q "test result: ok" /tmp/pcache-test.log; then
  echo "== cargo test FAILED; log tail:"
  tail -60 /tmp/pcache-test.log
  exit 1
fi
echo "== a build without SPDK writes no shared object (the module is libspdk_bdev_pcache.so of -p spdk_bdev_pcache only)"
# Every artifact the default build (the root crate: lib, binary, and its dependencies)
# reports, in whatever target directory: none may be a .so, above all none named like
# the module.
so_files=$(env -u SPDK_DIR cargo build --release --message-format=json 2> /tmp/pcache-nospdk-build.log |
  python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    # Proc-macro dependencies are compiler plugins in deps/, not products.
    if m.get("reason") == "compiler-artifact" and "proc-macro" not in m["target"]["kind"]:
        for f in m["filenames"]:
            if ".so" in f.rsplit("/", 1)[-1]:
                print(f)' || echo "build failed")
if [ -n "$so_files" ]; then
  echo "== FAILED: cargo build --release without SPDK produced: $so_files"
  tail -20 /tmp/pcache-nospdk-build.log
  exit 1
fi
echo "   ok: cargo build --release (no SPDK) produced no lib*.so"
echo "== SPDK side: clippy -D warnings and unit tests with --features spdk"
# The SPDK code is linted and unit-tested whenever there is an SPDK: SPDK_DIR, else the
# one scripts/build-spdk.sh keeps in its cache (building it from the pinned source the
# first time; the SPDK tier below then reuses it). Exit 3: no SPDK and no source.
spdk_dir=${SPDK_DIR:-}
if [ -z "$spdk_dir" ]; then
  build_rc=0
  spdk_dir=$(bash scripts/build-spdk.sh) || build_rc=$?
  if [ "$build_rc" = 3 ]; then
    spdk_dir=
  elif [ "$build_rc" != 0 ]; then
    echo "== FAILED: building SPDK (scripts/build-spdk.sh, exit $build_rc)"
    exit 1
  fi
fi
if [ -n "$spdk_dir" ]; then
  SPDK_DIR=$spdk_dir cargo clippy --features spdk --all-targets -- -D warnings
  SPDK_DIR=$spdk_dir cargo clippy -p spdk_bdev_pcache --all-targets -- -D warnings
  # Only the SPDK side's tests: the rest of the library's ran above without the feature.
  SPDK_DIR=$spdk_dir cargo test --features spdk --lib env::spdk 2>&1 | tee /tmp/pcache-spdk-unit.log | grep -E "^test result" || true
  if ! grep -q "^test result: ok" /tmp/pcache-spdk-unit.log || grep -q "test result: FAILED\|error\[\|error: " /tmp/pcache-spdk-unit.log; then
    echo "== SPDK unit tests FAILED; log tail:"
    tail -40 /tmp/pcache-spdk-unit.log
    exit 1
  fi
  spdk_unit=$(grep -oE "^test result: ok\. [0-9]+ passed" /tmp/pcache-spdk-unit.log | awk '{ n += $4 } END { print n + 0 }')
  echo "   ok: clippy (lib, tests, module crate) and $spdk_unit unit tests with --features spdk"
  export SPDK_DIR=$spdk_dir
else
  echo "SKIP: SPDK side lint and unit tests (no SPDK_DIR, no SPDK source in ../shared/spdk)"
fi
crash_total=$(grep -oE "total crash points: [0-9]+, violations: [0-9]+" /tmp/pcache-test.log | tail -1 || true)
echo "== file-system tier (ext4 and xfs on pcache serve via nbdfuse + loop, kill -9, replay, fsck)"
# Time-boxed for CI (FS_CYCLES per file system, FS_TIME_BOX seconds); the same script
# with FS_CYCLES=100 FS_TIME_BOX=0 is the soak. It prints a SKIP line (and passes)
# only when the container cannot do FUSE, loop devices or mounts.
# The release binary, as the no-SPDK build above made it (so nothing is rebuilt).
env -u SPDK_DIR cargo build --release --bin pcache
fs_rc=0
FS_CYCLES="${FS_CYCLES:-3}" FS_TIME_BOX="${FS_TIME_BOX:-170}" bash test/fs_tier.sh 2>&1 | tee /tmp/pcache-fs-test.log || fs_rc=$?
fs_counts=$(grep -E "^fs cycles: " /tmp/pcache-fs-test.log | tail -1 || true)
if [ "$fs_rc" != 0 ]; then
  echo "== file-system tier FAILED (${fs_counts:-no cycle completed})"
  exit 1
fi
[ -n "$fs_counts" ] || fs_counts="skipped: $(grep -m1 "^SKIP" /tmp/pcache-fs-test.log || echo "no result")"
echo "== SPDK module (SPDK_DIR, else the SPDK scripts/build-spdk.sh builds from ../shared/spdk and caches)"
# The tier exits non-zero on any failed case (or a failed build): that fails the run.
spdk_rc=0
SPDK_TEST_SECONDS="${SPDK_TEST_SECONDS:-5}" bash test/spdk/run.sh 2>&1 | tee /tmp/pcache-spdk-test.log || spdk_rc=$?
spdk_counts=$(grep -E "^[0-9]+ passed, [0-9]+ failed$" /tmp/pcache-spdk-test.log | tail -1 || true)
if [ "$spdk_rc" != 0 ]; then
  echo "== SPDK module FAILED (${spdk_counts:-before any test ran})"
  exit 1
elif [ -n "$spdk_counts" ]; then
  echo "== SPDK module: $spdk_counts"
else
  spdk_counts=skipped
  echo "== SPDK module: skipped (no SPDK and no SPDK source, see above)"
fi
echo "== fuzz smoke (build every target, run each time-boxed)"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install --locked cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz >/dev/null
fi
FUZZ_SECONDS="${FUZZ_SECONDS:-20}" bash test/fuzz_smoke.sh
cargo_passed=$(grep -oE "^test result: ok\. [0-9]+ passed" /tmp/pcache-test.log | awk '{ n += $4 } END { print n + 0 }')
echo "== all tests passed (cargo test: $cargo_passed passed; ${crash_total:-total crash points: not reported}; $fs_counts; SPDK module: $spdk_counts)"
