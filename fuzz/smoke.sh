#!/usr/bin/env bash
# Fuzz smoke test: every target briefly, from its committed corpus, plus
# every saved finding in fuzz/crashes/<target>/ as a regression input.
# Fails on any crash. This is what scripts/test calls; docs/fuzzing.md has
# the long runs.
#
# Works on stable Rust: cargo-fuzz passes -Z flags (-Zsanitizer=address,
# ...) and RUSTC_BOOTSTRAP=1 lets a stable rustc accept them.
#
# Usage: fuzz/smoke.sh [target...]
#   env: SMOKE_RUNS (default 50000) and SMOKE_TIME (seconds, default 20):
#        each target stops at whichever comes first.
#        FUZZ_SANITIZER (default address; "none" if ASan will not link).
set -euo pipefail
cd "$(dirname "$0")"

RUNS=${SMOKE_RUNS:-50000}
TIME=${SMOKE_TIME:-20}
SAN=${FUZZ_SANITIZER:-address}
export RUSTC_BOOTSTRAP=1

run() {
    printf '+ %s\n' "$*"
    "$@"
}

if ! cargo fuzz --version >/dev/null 2>&1; then
    run cargo install cargo-fuzz --locked
fi

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(http_head frame_reader ws_json deflate)

run cargo fuzz build --sanitizer "$SAN"

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

for t in "${targets[@]}"; do
    # Saved findings: each must now run clean (the targets tolerate the
    # documented known classes; see docs/fuzzing.md).
    if [ -d "crashes/$t" ] && [ -n "$(ls -A "crashes/$t")" ]; then
        run cargo fuzz run --sanitizer "$SAN" "$t" crashes/"$t"/* -- -runs=1
    fi
    # New inputs go to a scratch corpus (first directory), so the committed
    # corpus stays as it is; artifacts land in fuzz/artifacts/ (ignored).
    mkdir -p "$scratch/$t"
    rc=0
    run cargo fuzz run --sanitizer "$SAN" "$t" "$scratch/$t" "corpus/$t" -- \
        -runs="$RUNS" -max_total_time="$TIME" -print_final_stats=1 >"$scratch/$t.log" 2>&1 || rc=$?
    grep -E '^#[0-9]+[[:space:]]+(INITED|DONE)|^Done|^stat::number_of_executed_units|panicked|ERROR' "$scratch/$t.log" || true
    if [ "$rc" -ne 0 ]; then
        tail -n 60 "$scratch/$t.log"
        echo "fuzz smoke: $t FAILED (exit $rc; the input is in fuzz/artifacts/$t/)"
        exit 1
    fi
done
echo "fuzz smoke: ok (${targets[*]})"
