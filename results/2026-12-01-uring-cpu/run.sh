#!/usr/bin/env bash
# Same-run CPU per echoed message with the user/kernel split (issue 10), alternating rounds.
# Servers (each FRESH per round and setup, one at a time, pinned to core 0; loadtest on core 1):
#   base     ringside at the previous commit, server.io=direct    ($BASE_BIN)
#   direct   ringside as built, server.io=direct (its defaults)    ($NEW_BIN)
#   poll     ringside as built, server.io=poll                     ($NEW_BIN)
#   uws      uWebSockets (epoll)                                   ($UWS_BIN)
# Setups: 64 B binary echo on CONNS (100) connections, closed loop (1 in flight each) and a
# fixed RATE (40,000) msg/s, SECS (10) s each. utime and stime from /proc/<pid>/stat (100 Hz
# ticks) just before and after the loadtest run; messages = loadtest's received count.
# Usage: BASE_BIN=... NEW_BIN=... UWS_BIN=... run.sh [ROUNDS] [OUT.tsv]
set -euo pipefail
ROUNDS=${1:-3}
OUT=${2:-$(dirname "$0")/cpu.tsv}
LT=${LT:-${CARGO_TARGET_DIR:-target}/release/loadtest}
CONNS=${CONNS:-100} RATE=${RATE:-40000} SECS=${SECS:-10}
SERVERS=${SERVERS:-base direct poll uws}
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
[ -s "$OUT" ] || printf 'round\tserver\tsetup\tmessages\tmsgs_per_s\tutime_s\tstime_s\tuser_us_per_msg\tsys_us_per_msg\ttotal_us_per_msg\tlost\tloadavg_before\tloadavg_after\n' > "$OUT"
for r in $(seq 1 "$ROUNDS"); do
  for who in $SERVERS; do
    for rate in 0 "$RATE"; do
      port=$(free)
      case $who in
        base) taskset -c 0 "$BASE_BIN" --listen "127.0.0.1:$port" --shards 1 --set server.io=direct >/dev/null 2>&1 & ;;
        direct) taskset -c 0 "$NEW_BIN" --listen "127.0.0.1:$port" --shards 1 --set server.io=direct $NEW_EXTRA >/dev/null 2>&1 & ;;
        poll) taskset -c 0 "$NEW_BIN" --listen "127.0.0.1:$port" --shards 1 --set server.io=poll >/dev/null 2>&1 & ;;
        uws) taskset -c 0 "$UWS_BIN" "$port" >/dev/null 2>&1 & ;;
      esac
      pid=$!
      for _ in $(seq 50); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$port),0.2)" 2>/dev/null && break; sleep 0.1; done
      out=$(mktemp -d)
      b=$(cut -d' ' -f1-3 /proc/loadavg); s0=$(awk '{print $14, $15}' /proc/$pid/stat)
      taskset -c 1 "$LT" echo --url "ws://127.0.0.1:$port/echo" --conns "$CONNS" --msg-rate "$rate" --size 64 \
          --in-flight 1 --duration "$SECS" --workers 2 --timeout 5 --out "$out" --label "$who-$rate" >/dev/null 2>&1 || true
      s1=$(awk '{print $14, $15}' /proc/$pid/stat); a=$(cut -d' ' -f1-3 /proc/loadavg)
      kill $pid; wait $pid 2>/dev/null || true
      python3 - "$out" "$s0" "$s1" "$r" "$who" "$rate" "$b" "$a" >> "$OUT" <<'PY'
import glob, json, sys
out, s0, s1, r, who, rate, b, a = sys.argv[1:]
d = json.load(open(glob.glob(out + "/*/summary.json")[0]))
m = d["messages"]; n = m["received"]
u0, k0 = map(int, s0.split()); u1, k1 = map(int, s1.split())
u, k = (u1 - u0) / 100, (k1 - k0) / 100
setup = "closed" if rate == "0" else f"rate{rate}"
print("\t".join(map(str, [r, who, setup, n, round(m["per_second"]), u, k, round(u * 1e6 / n, 3), round(k * 1e6 / n, 3), round((u + k) * 1e6 / n, 3), m["lost"], b, a])))
PY
      rm -rf "$out"
    done
  done
done
python3 - "$OUT" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
key = lambda r: (r["setup"], r["server"])
groups = {}
for r in rows: groups.setdefault(key(r), []).append(r)
print("setup\tserver\tn\ttotal_us/msg(median, range)\tuser\tsys\tmsg/s")
for (setup, who), g in sorted(groups.items()):
    med = lambda k: statistics.median(float(x[k]) for x in g)
    tot = [float(x["total_us_per_msg"]) for x in g]
    print(f"{setup}\t{who}\t{len(g)}\t{med('total_us_per_msg'):.2f} ({min(tot):.2f}-{max(tot):.2f})\t{med('user_us_per_msg'):.2f}\t{med('sys_us_per_msg'):.2f}\t{med('msgs_per_s'):.0f}")
PY
