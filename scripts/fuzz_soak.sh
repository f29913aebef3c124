#!/usr/bin/env bash
# Fuzz soak (issue 21 item 3): every cargo-fuzz target in fuzz/ for RUNS executions
# (default 10,000,000 each), starting from the named seeds in fuzz/seeds/<target>
# (fuzz/make_seeds.py) and the working corpus fuzz/corpus/<target>. Not run in CI
# (test/fuzz_smoke.sh is the CI version: a few seconds per target). Uses
# RUSTC_BOOTSTRAP so a stable toolchain builds the sanitizer-instrumented targets.
# Prints per target libFuzzer's `Done N runs in S second(s)` and a closing line;
# exits non-zero on the first crash (the input is left in fuzz/artifacts/<target>/).
#
# Usage: bash scripts/fuzz_soak.sh [target...]      RUNS=100000 bash scripts/fuzz_soak.sh decode
# Env:   RUNS (10000000), JOBS (1: libFuzzer -fork workers), PCACHE_FUZZ_STRICT (0)
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
RUNS="${RUNS:-10000000}"
JOBS="${JOBS:-1}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "SKIP: cargo-fuzz is not installed (cargo install cargo-fuzz)"
  exit 0
fi
export RUSTC_BOOTSTRAP=1
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
cargo fuzz build
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  dirs=("corpus/$t")
  [ -d "seeds/$t" ] && dirs+=("seeds/$t")
  log="$(mktemp)"
  start=$SECONDS
  extra=()
  [ "$JOBS" -gt 1 ] && extra=(-fork="$JOBS")
  if cargo fuzz run "$t" "${dirs[@]}" -- -runs="$RUNS" "${extra[@]}" >"$log" 2>&1; then
    echo "fuzz soak: $t: $(grep -E '^Done [0-9]+ runs' "$log" | tail -1 || echo done) ($((SECONDS - start)) s, corpus $(ls "corpus/$t" | wc -l) inputs)"
  else
    status=1
    echo "fuzz soak: $t: FAILED after $((SECONDS - start)) s"
    grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" || tail -40 "$log"
  fi
  rm -f "$log"
  [ $status = 0 ] || break
done
echo "fuzz soak: ${targets[*]}: $RUNS runs each, exit $status"
exit $status
