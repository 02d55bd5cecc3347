#!/bin/bash
# profile: label io
set -e
label=$1; io=$2
cd /work/main
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
taskset -c 0 target/release/ringside --listen 127.0.0.1:$PORT --shards 1 --set server.pin_cores=false --set server.io=$io > /tmp/prof-$label.log 2>&1 &
pid=$!
sleep 1
taskset -c 1 target/release/loadtest echo --url ws://127.0.0.1:$PORT/echo --conns 100 --in-flight 8 --duration 8 --workers 1 --out /tmp/prof-lt --label $label --server-pid $pid > /tmp/prof-lt-$label.txt 2>&1 &
lt=$!
sleep 2
perf record -e cpu-clock -F 2000 -g -p $pid -o /tmp/perf-$label.data -- sleep 4 > /dev/null 2>&1
wait $lt || true
kill $pid; wait $pid 2>/dev/null || true
perf report -i /tmp/perf-$label.data --stdio --no-children --sort dso,sym --percent-limit 1.2 2>/dev/null | grep -v "^$" | grep -E "^ +[0-9]" | head -40 > /tmp/perf-$label.top
perf report -i /tmp/perf-$label.data --stdio --no-children --sort dso 2>/dev/null | grep -E "^ +[0-9]" | head -10 > /tmp/perf-$label.dso
