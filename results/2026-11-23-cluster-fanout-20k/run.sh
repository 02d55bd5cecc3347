#!/usr/bin/env bash
# Two ringside nodes sharing one redis-server (1 s sync interval, default),
# 20,000 /ws subscribers spread round-robin over both nodes (10,000 each),
# one room, publishers on both nodes: every publish reaches the publisher's
# node's members locally and the other node's through Redis pub/sub.
# Four loadtest worker processes (5,000 connections each, under the 20,000
# open-file limit per process). Usage: .../run.sh [MSG_RATE] [DURATION] [PUBLISHERS]
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=results/2026-11-23-cluster-fanout-20k
RATE=${1:-5} DUR=${2:-30} PUBS=${3:-2}
T=${CARGO_TARGET_DIR:-target}
RS=$T/release/ringside LT=$T/release/loadtest
free() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
RP=$(free) PA=$(free) PB=$(free)
TMP=$(mktemp -d)
redis-server --port "$RP" --save '' --appendonly no --bind 127.0.0.1 --dir "$TMP" >/dev/null 2>&1 & RPID=$!
sleep 0.5
$RS --listen 127.0.0.1:$PA --node-id fan-a --redis redis://127.0.0.1:$RP 2>"$TMP/a.log" & A=$!
$RS --listen 127.0.0.1:$PB --node-id fan-b --redis redis://127.0.0.1:$RP 2>"$TMP/b.log" & B=$!
trap 'kill $A $B $RPID 2>/dev/null; rm -rf "$TMP"' EXIT
sleep 1.5
label="2nodes-20k-${RATE}ps-${PUBS}pub"
$LT fanout --url ws://127.0.0.1:$PA/ws,ws://127.0.0.1:$PB/ws --conns 20000 --rate 2000 --workers 4 \
    --publishers "$PUBS" --msg-rate "$RATE" --duration "$DUR" --drain 3 --timeout 20 \
    --server-pid $A --server-info "ringside $(git rev-parse --short HEAD), 2 nodes (server-pid = fan-a), redis sync 1 s" \
    --label "$label" --out $HERE
for n in a:$PA b:$PB; do
    curl -s http://127.0.0.1:${n#*:}/metrics | grep -E '^ringside_cluster_' > $HERE/node-${n%%:*}-cluster-metrics.txt
    curl -s http://127.0.0.1:${n#*:}/cluster > $HERE/node-${n%%:*}-cluster.json
done
redis-cli -p $RP info commandstats > $HERE/redis-commandstats.txt
