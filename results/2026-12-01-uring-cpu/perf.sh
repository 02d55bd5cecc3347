#!/usr/bin/env bash
# perf BIN IO RATE OUT: perf record 5 s mid-run
BIN=$1 IO=$2 RATE=$3 OUTF=$4 CONNS=${CONNS:-100}
LT=/work/tgt-cpu/release/loadtest
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
if [ "$IO" = uws ]; then taskset -c 0 /tmp/uws/bench/uws-echo-epoll $port >/dev/null 2>&1 &
else taskset -c 0 $BIN --listen 127.0.0.1:$port --shards 1 --set server.io=$IO $EXTRA >/tmp/probe-server.log 2>&1 & fi
pid=$!
sleep 1
out=$(mktemp -d)
taskset -c 1 /work/tgt-cpu/release/loadtest echo --url ws://127.0.0.1:$port/echo --conns $CONNS --msg-rate $RATE --size 64 --duration 10 --workers 2 --timeout 5 --out $out --label p 2>/dev/null >/dev/null &
lpid=$!
sleep 3
perf record -e cpu-clock -F 4000 -g -o $OUTF -p $pid -- sleep 5 2>/dev/null >/dev/null
wait $lpid
kill $pid; wait $pid 2>/dev/null
rm -rf $out
