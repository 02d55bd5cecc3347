#!/usr/bin/env bash
# The long fuzzing runs behind results/2026-12-01-fuzz: each target, one
# process, from its committed corpus, for RUNS executions or MAX_TIME seconds,
# whichever comes first. Logs go to fuzz/logs/<target>.log (git-ignored).
# Usage: fuzz/long.sh [target...]   (env: RUNS=10000000 MAX_TIME=720)
set -euo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
RUNS=${RUNS:-10000000}
MAX_TIME=${MAX_TIME:-720}
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(ws_json http_head frame_reader)
mkdir -p logs
cargo fuzz build
for t in "${targets[@]}"; do
    extra=()
    # Heads up to 9000 bytes reach the 8192-byte limit (431).
    [ "$t" = http_head ] && extra+=(-max_len=9000)
    # Throughput is proportional to input length (per-byte unmasking, UTF-8
    # checks, coverage): 1024-byte streams run at ~13k exec/s, 4096 at ~6k.
    [ "$t" = frame_reader ] && extra+=(-max_len="${FRAME_MAX_LEN:-1024}")
    echo "==> cargo fuzz run $t -- -runs=$RUNS -max_total_time=$MAX_TIME -print_final_stats=1 ${extra[*]}"
    start=$(date +%s)
    cargo fuzz run "$t" -- -runs="$RUNS" -max_total_time="$MAX_TIME" -print_final_stats=1 "${extra[@]}" \
        >"logs/$t.log" 2>&1 || echo "!! $t exited non-zero (see logs/$t.log)"
    echo "    $t: $(( $(date +%s) - start ))s; $(grep -E 'DONE|Done' "logs/$t.log" | tail -2 | tr '\n' ' ')"
done
