#!/usr/bin/env bash
# probe BIN IO RATE CONNS: server on core 0, loadtest on core 1, perf stat tracepoints 5 s mid-run
BIN=$1 IO=$2 RATE=$3 CONNS=${4:-100}
LT=/work/tgt-cpu/release/loadtest
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
if [ "$IO" = uws ]; then taskset -c 0 /tmp/uws/bench/uws-echo-epoll $port >/dev/null 2>&1 &
else taskset -c 0 $BIN --listen 127.0.0.1:$port --shards 1 --set server.io=$IO $EXTRA >/tmp/probe-server.log 2>&1 & fi
pid=$!
sleep 1
out=$(mktemp -d)
taskset -c 1 $LT echo --url ws://127.0.0.1:$port/echo --conns $CONNS --msg-rate $RATE --size 64 --duration 10 --workers 2 --timeout 5 --out $out --label p 2>/dev/null >/dev/null &
lpid=$!
sleep 3
s0=$(awk '{print $14, $15}' /proc/$pid/stat)
perf stat -x, -e raw_syscalls:sys_enter,io_uring:io_uring_submit_req,io_uring:io_uring_complete,io_uring:io_uring_task_work_run,io_uring:io_uring_poll_arm,io_uring:io_uring_local_work_run,sched:sched_switch -p $pid -- sleep 5 2>/tmp/probe-stat.txt
s1=$(awk '{print $14, $15}' /proc/$pid/stat)
[ -n "$STRACE" ] && timeout 3 strace -c -f -p $pid 2>&1 | head -20
wait $lpid
msgs=$(python3 -c "import json,glob; d=json.load(open(glob.glob('$out/*/summary.json')[0])); print(d['messages']['per_second'])")
kill $pid; wait $pid 2>/dev/null
python3 - $msgs "$s0" "$s1" <<'PY'
import sys
rate=float(sys.argv[1]); u0,s0=map(int,sys.argv[2].split()); u1,s1=map(int,sys.argv[3].split())
m=rate*5
print(f"msg/s {rate:.0f}  user {(u1-u0)/100*1e6/m:.2f} us/msg  sys {(s1-s0)/100*1e6/m:.2f} us/msg (5s window, msgs est from rate)")
for l in open('/tmp/probe-stat.txt'):
    p=l.strip().split(',')
    if len(p)>3 and p[0].replace('.','').isdigit(): print(f"  {p[2]:40s} {float(p[0])/m:8.3f} per msg")
PY
rm -rf $out
