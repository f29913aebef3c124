#!/usr/bin/env bash
# SIGKILL soak (issue 21 item 3): the embedded durability test (test/embedded.rs
# kill9_durability: `pcache serve` under NBD load killed with SIGKILL at random
# moments, restarted, replayed and checked against what was acknowledged) run for
# CYCLES cycles instead of CI's 20, and the file-medium variant for FILE_CYCLES.
# Not run in CI. Builds as `cargo test` does (opt-level 2), so CI's build is reused.
# Prints the test's own `kill cycles` lines and a closing `soak: ...` line; exits
# non-zero if any cycle loses data.
#
# Usage: bash test/soak_kill.sh                 # CYCLES=1000, FILE_CYCLES=100
#        CYCLES=50 FILE_CYCLES=0 SEED=7 bash test/soak_kill.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CYCLES="${CYCLES:-1000}"
FILE_CYCLES="${FILE_CYCLES:-100}"
SEED="${SEED:-$(( (RANDOM << 15) | RANDOM ))}"
tests=(kill9_durability)
[ "$FILE_CYCLES" -gt 0 ] && tests+=(kill9_durability_file_medium)
echo "soak: $CYCLES SIGKILL cycles (volatile medium), $FILE_CYCLES (file medium), seed $SEED"
start=$SECONDS
log=$(mktemp)
rc=0
for t in "${tests[@]}"; do
  PCACHE_SOAK_CYCLES="$CYCLES" PCACHE_SOAK_CYCLES_FILE="$FILE_CYCLES" PCACHE_SOAK_SEED="$SEED" \
    cargo test --test embedded -- --exact "$t" --nocapture --test-threads 1 >"$log" 2>&1 || rc=$?
  grep -E "kill cycles|NOTE|SKIP|panicked|test result" "$log" || tail -30 "$log"
done
rm -f "$log"
echo "soak: $((SECONDS - start)) s, exit $rc (replay a failure with SEED=$SEED)"
exit $rc
