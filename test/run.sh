#!/usr/bin/env bash
# The whole test suite, as CI runs it (`.ci/run` calls exactly this script).
# Installs the real clients the tests use (Debian packages) when they are missing,
# then: format check, clippy with -D warnings, every cargo test, and a time-boxed
# fuzz smoke run. SPDK tests skip with a visible message when no SPDK is found.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v fio >/dev/null || need+=(fio)
command -v nbdinfo >/dev/null || need+=(libnbd-bin)
command -v nbdkit >/dev/null || need+=(nbdkit)
command -v qemu-io >/dev/null || need+=(qemu-utils)
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
cargo test -- --nocapture 2>&1 | tee /tmp/pcache-test.log | grep -E "^(test |running|test result|crash points|seeds run|kill cycles|SKIP)|violations" || true
if grep -q "test result: FAILED\|error: test failed\|error\[" /tmp/pcache-test.log || ! grep -q "test result: ok" /tmp/pcache-test.log; then
  echo "== cargo test FAILED; log tail:"
  tail -60 /tmp/pcache-test.log
  exit 1
fi
echo "== SPDK module (runs when SPDK is found via SPDK_DIR or pkg-config)"
SPDK_TEST_SECONDS="${SPDK_TEST_SECONDS:-10}" bash test/spdk/run.sh
echo "== fuzz smoke (build every target, run each time-boxed)"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install --locked cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz >/dev/null
fi
FUZZ_SECONDS="${FUZZ_SECONDS:-20}" bash test/fuzz_smoke.sh
echo "== all tests passed"
