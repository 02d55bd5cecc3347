#!/usr/bin/env bash
# The user/kernel split of results/2026-12-01-peers-uws/README.md: each server fresh,
# one thread on core 0, 10 s of echo on 100 connections (closed loop, then 40,000 msg/s)
# from loadtest on core 1; utime and stime (100 Hz ticks) from /proc/<pid>/stat before
# and after. Usage: UWS_BIN=/tmp/uws/bench/uws-echo-epoll results/2026-12-01-peers-uws/cpu-split/run.sh
set -euo pipefail
cd "$(dirname "$0")"
T=${CARGO_TARGET_DIR:-../../../target}
LT=$T/release/loadtest RS=$T/release/ringside
printf 'server\tsetup\tmessages\tutime_s\tstime_s\tuser_us_per_msg\tsys_us_per_msg\tloadavg_before\tloadavg_after\n' > cpu-split.tsv
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for who in poll direct uws; do
    for rate in 0 40000; do
        port=$(free)
        if [ $who = uws ]; then taskset -c 0 "$UWS_BIN" "$port" >/dev/null 2>&1 &
        else taskset -c 0 "$RS" --listen "127.0.0.1:$port" --shards 1 --set server.io=$who >/dev/null 2>&1 & fi
        pid=$!
        sleep 1
        b=$(cut -d' ' -f1-3 /proc/loadavg); s0=$(awk '{print $14, $15}' /proc/$pid/stat)
        out=$(mktemp -d)
        taskset -c 1 "$LT" echo --url "ws://127.0.0.1:$port/echo" --conns 100 --msg-rate $rate --size 64 \
            --duration 10 --workers 2 --timeout 5 --out "$out" --label "$who-$rate" 2>/dev/null
        s1=$(awk '{print $14, $15}' /proc/$pid/stat); a=$(cut -d' ' -f1-3 /proc/loadavg)
        msgs=$(python3 -c "import json,glob; print(json.load(open(glob.glob('$out/*/summary.json')[0]))['messages']['received'])")
        python3 -c "
u0,s0=map(int,'$s0'.split()); u1,s1=map(int,'$s1'.split()); m=$msgs
print('\t'.join(map(str,['$who','c100-rate$rate',m,(u1-u0)/100,(s1-s0)/100,round((u1-u0)/100*1e6/m,3),round((s1-s0)/100*1e6/m,3),'$b','$a'])))" >> cpu-split.tsv
        kill $pid; wait $pid 2>/dev/null || true; rm -rf "$out"
    done
done
column -t -s$'\t' cpu-split.tsv
