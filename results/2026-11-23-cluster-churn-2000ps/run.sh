#!/usr/bin/env bash
# Redis commands per second while 2,000 /ws connections/s churn over two
# nodes (1 s sync interval, default), plus 2,000 held connections per node
# so that the rolling conn-key refresh is part of the load. Phases: 10 s
# held only (baseline), 30 s churn at 2,000 cycles/s, 10 s held only.
# A sampler reads each node's ringside_cluster_redis_{commands,batches}_total
# once per second into samples.csv; summary.txt has the per-phase rates.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=results/2026-11-23-cluster-churn-2000ps
T=${CARGO_TARGET_DIR:-target}
RS=$T/release/ringside LT=$T/release/loadtest
free() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
RP=$(free) PA=$(free) PB=$(free)
TMP=$(mktemp -d)
redis-server --port "$RP" --save '' --appendonly no --bind 127.0.0.1 --dir "$TMP" >/dev/null 2>&1 & RPID=$!
sleep 0.5
$RS --listen 127.0.0.1:$PA --node-id churn-a --redis redis://127.0.0.1:$RP 2>"$TMP/a.log" & A=$!
$RS --listen 127.0.0.1:$PB --node-id churn-b --redis redis://127.0.0.1:$RP 2>"$TMP/b.log" & B=$!
PIDS="$A $B $RPID"
trap 'kill $PIDS 2>/dev/null; rm -rf "$TMP"' EXIT
sleep 1.5
metric() { curl -s http://127.0.0.1:$1/metrics | awk -v m="$2" '$1==m {print $2}'; }
sampler() {
    echo "t,phase,a_commands,a_batches,b_commands,b_batches,redis_total_commands"
    local t0; t0=$(date +%s.%N)
    while :; do
        local now; now=$(date +%s.%N)
        printf '%.2f,%s,%s,%s,%s,%s,%s\n' "$(echo "$now - $t0" | bc)" "$(cat "$TMP/phase")" \
            "$(metric $PA ringside_cluster_redis_commands_total)" "$(metric $PA ringside_cluster_redis_batches_total)" \
            "$(metric $PB ringside_cluster_redis_commands_total)" "$(metric $PB ringside_cluster_redis_batches_total)" \
            "$(redis-cli -p $RP info stats | awk -F: '/total_commands_processed/ {print $2}' | tr -d '\r')"
        sleep 1
    done
}
echo hold > "$TMP/phase"
$LT connect --url ws://127.0.0.1:$PA/ws,ws://127.0.0.1:$PB/ws --conns 4000 --rate 2000 --hold 55 --workers 2 \
    --label held-4000 --out "$TMP" > "$TMP/held.log" 2>&1 & HELD=$!
PIDS="$PIDS $HELD"
sleep 4
sampler > $HERE/samples.csv & SAMPLER=$!
PIDS="$PIDS $SAMPLER"
sleep 10
echo churn > "$TMP/phase"
$LT churn --url ws://127.0.0.1:$PA/ws,ws://127.0.0.1:$PB/ws --rate 2000 --duration 30 --workers 2 \
    --server-pid $A --server-info "ringside $(git rev-parse --short HEAD), 2 nodes (server-pid = churn-a), redis sync 1 s, 2,000 held /ws connections per node" \
    --label 2nodes-ws-2000ps-30s --out $HERE
echo after > "$TMP/phase"
sleep 10
kill $SAMPLER
wait $HELD || true
redis-cli -p $RP info commandstats > $HERE/redis-commandstats.txt
python3 - "$HERE/samples.csv" > $HERE/summary.txt <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r['a_commands']]
def rate(phase, col):
    p = [r for r in rows if r['phase'] == phase]
    if len(p) < 2: return float('nan'), 0
    dt = float(p[-1]['t']) - float(p[0]['t'])
    return (float(p[-1][col]) - float(p[0][col])) / dt, dt
def peak(phase, col):
    p = [r for r in rows if r['phase'] == phase]
    return max((float(b[col]) - float(a[col])) / (float(b['t']) - float(a['t'])) for a, b in zip(p, p[1:]))
print("per-second rates from samples.csv (sync interval 1 s, so per second = per interval)")
for phase in ['hold', 'churn', 'after']:
    for node in 'ab':
        c, dt = rate(phase, node + '_commands'); b, _ = rate(phase, node + '_batches')
        print(f"{phase:6} node {node}: {c:8.0f} commands/s (peak 1 s: {peak(phase, node + '_commands'):8.0f}), {b:6.0f} round trips/s over {dt:.0f} s")
    r, _ = rate(phase, 'redis_total_commands')
    print(f"{phase:6} redis-server total_commands_processed: {r:8.0f}/s")
PY
cat $HERE/summary.txt
