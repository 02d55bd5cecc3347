#!/usr/bin/env bash
# Upgrade latency with Redis sync on vs off, same run: two ringside nodes from
# the same release binary, one alone (off) and one with --redis (on, 1 s sync
# interval, default), connect rounds alternating off/on so both see the same
# machine state. Each round opens 5,000 /ws connections at 1,000/s (so the "on"
# node's cluster thread gets ConnOpened/ConnClosed events for every client),
# holds 2 s, closes. Usage: results/2026-11-23-cluster-upgrade/run.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=results/2026-11-23-cluster-upgrade
ROUNDS=${1:-3}
T=${CARGO_TARGET_DIR:-target}
RS=$T/release/ringside LT=$T/release/loadtest
free() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
RP=$(free) P_OFF=$(free) P_ON=$(free)
TMP=$(mktemp -d)
redis-server --port "$RP" --save '' --appendonly no --bind 127.0.0.1 --dir "$TMP" >/dev/null 2>&1 & RPID=$!
sleep 0.5
$RS --listen 127.0.0.1:$P_OFF --node-id up-off 2>"$TMP/off.log" & OFF=$!
$RS --listen 127.0.0.1:$P_ON --node-id up-on --redis redis://127.0.0.1:$RP 2>"$TMP/on.log" & ON=$!
trap 'kill $OFF $ON $RPID 2>/dev/null; rm -rf "$TMP"' EXIT
sleep 1
for i in $(seq "$ROUNDS"); do
    for mode in off on; do
        port=$P_OFF pid=$OFF
        [ $mode = on ] && port=$P_ON pid=$ON
        $LT connect --url ws://127.0.0.1:$port/ws --conns 5000 --rate 1000 --hold 2 --workers 2 \
            --server-pid $pid --server-info "ringside $(git rev-parse --short HEAD) redis sync $mode" \
            --label "redis-$mode-r$i" --out $HERE
        sleep 1
    done
done
curl -s http://127.0.0.1:$P_ON/metrics | grep -E '^ringside_cluster_(redis_commands|redis_batches|redis_errors|dropped)' > $HERE/on-node-cluster-metrics.txt
redis-cli -p $RP info commandstats > $HERE/redis-commandstats.txt
