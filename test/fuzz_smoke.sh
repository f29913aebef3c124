#!/usr/bin/env bash
# Fuzz smoke test: builds the cargo-fuzz targets in fuzz/ and runs each for a short
# time (FUZZ_SECONDS, default 30). Skips with a visible SKIP message when cargo-fuzz
# is not installed (install it with `cargo install cargo-fuzz`). Uses RUSTC_BOOTSTRAP
# so a stable toolchain can build the sanitizer-instrumented targets. Exits non-zero
# if a build fails or a target finds a crash (the input is left in fuzz/artifacts/).
#
# Usage: test/fuzz_smoke.sh [target...]     (default: every target in fuzz/)

set -euo pipefail

cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-30}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "SKIP: cargo-fuzz is not installed (cargo install cargo-fuzz); fuzz smoke test not run"
    exit 0
fi

export RUSTC_BOOTSTRAP=1
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

echo "fuzz smoke: building ${targets[*]}"
cargo fuzz build

status=0
for t in "${targets[@]}"; do
    echo "fuzz smoke: running $t for ${seconds}s"
    log="$(mktemp)"
    # The named seeds (fuzz/seeds/<target>, fuzz/make_seeds.py) ride along with the
    # working corpus, so every run replays the corruption classes first.
    dirs=()
    if [ -d "seeds/$t" ]; then
        mkdir -p "corpus/$t"
        dirs=("corpus/$t" "seeds/$t")
    fi
    if cargo fuzz run "$t" "${dirs[@]}" -- -max_total_time="$seconds" >"$log" 2>&1; then
        echo "fuzz smoke: $t: $(grep -E '^Done [0-9]+ runs' "$log" || echo 'done')"
    else
        status=1
        echo "fuzz smoke: $t: FAILED"
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written|^0x' "$log" || tail -40 "$log"
    fi
    rm -f "$log"
done
exit $status
