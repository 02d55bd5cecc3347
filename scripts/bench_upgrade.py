#!/usr/bin/env python3
"""Drain vs zero-disconnect upgrade, with N live clients (issue 12's storm).

Clients (Python `websockets`, one asyncio process, each from its own
127.0.0.x source address) hold /ws connections and send a `ping` every
second, timing each `pong`.

* upgrade: node A has `server.upgrade_socket`; a second process starts with
  `--upgrade-from`. Measured: the takeover time (new process started to old
  process exited), each client's longest pong wait around it (its pause),
  closes and reconnects (both should be 0), pings without a pong, the RSS of
  both processes.
* drain: nodes A and B; SIGTERM to A. Clients follow the `reconnect` hint
  (url "" here: they go to B, their fallback) or reconnect on close. Measured:
  time from SIGTERM until every client is on B, the peak reconnect rate (per
  100 ms), the upgrade latency clients see on B during the storm (p50, p99),
  pings without a pong.

Usage: scripts/bench_upgrade.py [--clients 10000] [--out results/DIR]
Needs a release build (cargo build --release) and Python websockets.
"""
import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time

import websockets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "ringside")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def start_node(port, extra, upgrade_from=None):
    args = [BIN, "--listen", f"127.0.0.1:{port}", "--shards", "2", "--set", "auth.allow_client_ids=true",
            "--set", "server.pin_cores=false", "--log", "warn,ringside::node=info"]
    for kv in extra:
        args += ["--set", kv]
    if upgrade_from:
        args += ["--upgrade-from", upgrade_from]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + 20
    while time.time() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        lines.append(line)
        if "listening on" in line:
            break
    # Keep draining stderr so the node never blocks on a full pipe.
    def pump():
        for line in p.stderr:
            lines.append(line)
    import threading
    threading.Thread(target=pump, daemon=True).start()
    p.log = lines
    return p


def percentile(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Client:
    def __init__(self, i, urls):
        self.i, self.urls = i, urls
        self.src = f"127.0.{1 + i // 250}.{1 + i % 250}"
        self.rtts = []          # (sent_at, rtt)
        self.unanswered = 0
        self.closes = 0
        self.reconnected_at = None
        self.connect_lat = []
        self.hint = None
        self.connected = asyncio.Event()

    async def connect(self, url):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((self.src, 0))
        host, port = url.split("//")[1].split("/")[0].split(":")
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (host, int(port)))
        t = time.monotonic()
        ws = await websockets.connect(f"{url}?client_id=c{self.i}", sock=sock, ping_interval=None,
                                      max_queue=None, open_timeout=30)
        welcome = json.loads(await ws.recv())
        self.connect_lat.append(time.monotonic() - t)
        return ws, welcome

    async def run(self, stop):
        url = self.urls[0]
        first = True
        while not stop.is_set():
            try:
                ws, _ = await self.connect(url)
            except Exception:
                await asyncio.sleep(0.05)
                continue
            if not first:
                self.reconnected_at = time.monotonic()
            first = False
            self.connected.set()
            n = 0
            try:
                while not stop.is_set():
                    n += 1
                    sent = time.monotonic()
                    await ws.send(json.dumps({"type": "ping", "id": str(n)}))
                    while True:
                        m = json.loads(await asyncio.wait_for(ws.recv(), 30))
                        if m.get("type") == "pong":
                            self.rtts.append((sent, time.monotonic() - sent))
                            break
                        if m.get("type") == "reconnect":
                            self.hint = m
                            raise ConnectionResetError("hint")
                    await asyncio.sleep(1.0)
            except Exception:
                self.unanswered += 1
                self.closes += 1
                try:
                    await ws.close()
                except Exception:
                    pass
                delay = (self.hint or {}).get("after_ms", 0) / 1000.0
                self.hint = None
                await asyncio.sleep(delay)
                url = self.urls[-1]  # the hint's "" means: through the balancer; here: node B


async def scenario(mode, n, out):
    port_a, port_b = free_port(), free_port()
    sock_path = f"/tmp/ringside-bench-upgrade-{os.getpid()}.sock"
    extra = [f"server.upgrade_socket={sock_path}"] if mode == "upgrade" else []
    extra += ["shutdown.drain_timeout_ms=30000", "shutdown.reconnect_spread_ms=5000"]
    a = start_node(port_a, extra)
    b = start_node(port_b, []) if mode == "drain" else None
    urls = [f"ws://127.0.0.1:{port_a}/ws"] + ([f"ws://127.0.0.1:{port_b}/ws"] if b else [])
    clients = [Client(i, urls) for i in range(n)]
    stop = asyncio.Event()
    tasks = []
    for c in clients:
        tasks.append(asyncio.create_task(c.run(stop)))
        if len(tasks) % 200 == 0:
            await asyncio.sleep(0.05)
    await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in clients)), 300)
    await asyncio.sleep(3)
    res = {"mode": mode, "clients": n, "rss_kb_before": rss_kb(a.pid)}
    for c in clients:
        c.rtts.clear()
        c.connect_lat.clear()
    # Baseline: each client's longest pong wait over 3.5 s of steady state
    # (the same length as the window around the takeover below).
    await asyncio.sleep(3.5)
    t_base = time.monotonic()
    base = [max([r for (_, r) in c.rtts] or [0.0]) for c in clients]
    res["steady_longest_pong_ms"] = {q: round(1000 * percentile(base, v), 1) for q, v in
                                     (("p50", 0.5), ("p99", 0.99), ("max", 1.0))}
    for c in clients:
        c.rtts = [x for x in c.rtts if x[0] >= t_base]
    t0 = time.monotonic()
    load0 = os.getloadavg()
    if mode == "upgrade":
        new = start_node(port_a, [f"server.upgrade_socket={sock_path}.2"], upgrade_from=sock_path)
        code = await asyncio.get_running_loop().run_in_executor(None, a.wait, 60)
        t1 = time.monotonic()
        res["takeover_s"] = round(t1 - t0, 3)
        res["old_exit_code"] = code
        await asyncio.sleep(3)
        res["rss_kb_new"] = rss_kb(new.pid)
        pauses = []
        for c in clients:
            around = [r for (s, r) in c.rtts if t0 - 1.5 <= s <= t1 + 1.5]
            pauses.append(max(around) if around else 0.0)
        res["pause_ms"] = {q: round(1000 * percentile(pauses, v), 1) for q, v in
                           (("p50", 0.5), ("p99", 0.99), ("max", 1.0))}
        res["closes"] = sum(c.closes for c in clients)
        res["old_log_tail"] = [l.strip() for l in a.log[-3:]]
        res["new_log_tail"] = [l.strip() for l in new.log[-3:]]
        procs = [new]
    else:
        a.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(c.reconnected_at is None for c in clients):
            await asyncio.sleep(0.1)
        back = [c.reconnected_at - t0 for c in clients if c.reconnected_at]
        res["all_on_b_s"] = round(max(back), 3) if len(back) == n else None
        res["on_b"] = len(back)
        buckets = {}
        for x in back:
            buckets[int(x * 10)] = buckets.get(int(x * 10), 0) + 1
        res["peak_reconnects_per_100ms"] = max(buckets.values()) if buckets else 0
        lat = [x for c in clients for x in c.connect_lat]
        res["upgrade_on_b_ms"] = {"p50": round(1000 * percentile(lat, 0.5), 2),
                                   "p99": round(1000 * percentile(lat, 0.99), 2)}
        res["reconnect_time_s"] = {q: round(percentile(back, v), 3) for q, v in
                                   (("p50", 0.5), ("p99", 0.99), ("max", 1.0))} if back else None
        res["closes"] = sum(c.closes for c in clients)
        a.wait(60)
        procs = [b]
    res["pings_unanswered"] = sum(c.unanswered for c in clients)
    res["loadavg_before"] = load0
    res["loadavg_after"] = os.getloadavg()
    stop.set()
    for p in procs:
        p.kill()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=10000)
    ap.add_argument("--modes", default="upgrade,drain")
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "2026-12-01-upgrade-vs-drain"))
    args = ap.parse_args()
    if not os.path.exists(BIN):
        sys.exit(f"{BIN} missing: cargo build --release")
    os.makedirs(args.out, exist_ok=True)
    runs = []
    for mode in args.modes.split(","):
        r = asyncio.run(scenario(mode, args.clients, args.out))
        print(json.dumps(r, indent=1))
        runs.append(r)
    meta = {"machine": f"{platform.node()} {os.cpu_count()} cpus, {platform.release()}",
            "setup": "one node process per role, 2 shards unpinned, release build; one Python asyncio client "
                     "process on the same 2 cores; each client pings once a second",
            "command": f"scripts/bench_upgrade.py --clients {args.clients} --modes {args.modes}"}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
