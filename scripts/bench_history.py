#!/usr/bin/env python3
"""Room history figures (issue 11), same run, Python `websockets` clients.

1. Recovery: a subscriber misses N messages, comes back with `since`, and we time
   from the join written to `joined` read (all N replayed first); 10 rounds.
2. Publish-to-delivery latency with history on vs off: one publisher at a fixed rate
   (its send time in `data`), S subscribers; rooms `h.*` have history (a rule), `p.*`
   none; rounds alternate.

Single node by default; with --redis URL two nodes on that Redis (the publisher on
one, the subscribers split), so history goes through the Lua script.

Usage: bench_history.py BIN OUT.json [--redis URL] [--missed 1000] [--subs 10]
       [--rate 500] [--secs 5]
"""
import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time

import websockets


def start(bin_, *args):
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write('[[rooms.history_rules]]\npattern = "h.*"\nsize = 5000\n')
    cfg.close()
    p = subprocess.Popen([bin_, "--listen", "127.0.0.1:0", "--shards", "2", "--config", cfg.name,
                          "--set", "server.pin_cores=false", "--set", "auth.allow_client_ids=true",
                          "--set", "limits.messages_per_second=0", *args], stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        m = re.search(r"listening on (\S+)", line)
        if m:
            # Keep reading its log, or a full pipe would block the node.
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p, "ws://" + m.group(1)
    raise RuntimeError("ringside did not start")


async def client(base, cid):
    ws = await websockets.connect(f"{base}/ws?client_id={cid}", max_size=None, compression=None)
    assert json.loads(await ws.recv())["type"] == "welcome"
    return ws


async def join(ws, room, since=None):
    msg = {"type": "join", "room": room}
    if since:
        msg["since"] = {"offset": since[0], "epoch": since[1]}
    await ws.send(json.dumps(msg))
    before = []
    while True:
        m = json.loads(await ws.recv())
        if m["type"] == "joined":
            return before, m
        before.append(m)


def q(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else 0


async def recovery(pub_base, sub_base, missed, rounds=10):
    pub = await client(pub_base, "rpub")
    await join(pub, "h.recover")
    sub = await client(sub_base, "rsub")
    _, j = await join(sub, "h.recover")
    epoch, last = j["epoch"], j["offset"]
    times = []
    for r in range(rounds):
        await sub.close()
        for i in range(missed):
            await pub.send(json.dumps({"type": "publish", "room": "h.recover", "data": i}))
        # Let the last one be numbered before coming back.
        probe = await client(sub_base, f"probe{r}")
        _, pj = await join(probe, "h.recover")
        while pj["offset"] < last + missed:
            await asyncio.sleep(0.01)
            await probe.send(json.dumps({"type": "leave", "room": "h.recover"}))
            await probe.recv()
            _, pj = await join(probe, "h.recover")
        await probe.close()
        sub = await client(sub_base, "rsub")
        t0 = time.perf_counter()
        got, j = await join(sub, "h.recover", (last, epoch))
        dt = time.perf_counter() - t0
        assert j["recovered"] and len(got) == missed, (j, len(got))
        assert [m["offset"] for m in got] == list(range(last + 1, last + missed + 1))
        times.append(dt * 1000)
        last = j["offset"]
    await sub.close()
    await pub.close()
    return {"missed": missed, "rounds": rounds, "ms_p50": statistics.median(times), "ms_max": max(times),
            "ms_all": [round(t, 2) for t in times]}


async def latency(pub_base, sub_bases, room, subs, rate, secs):
    pub = await client(pub_base, f"lp-{room.replace('.', '_')}")
    await join(pub, room)
    clients = []
    for i in range(subs):
        ws = await client(sub_bases[i % len(sub_bases)], f"ls{i}-{room.replace('.', '_')}")
        await join(ws, room)
        clients.append(ws)
    await asyncio.sleep(0.3)
    n = int(rate * secs)
    lat = []

    async def reader(ws):
        got = 0
        while got < n:
            m = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if m["type"] == "message":
                lat.append((time.perf_counter() - m["data"]) * 1e6)
                got += 1

    readers = [asyncio.create_task(reader(ws)) for ws in clients]
    start = time.perf_counter()
    for i in range(n):
        # Paced on a schedule: latency counts from the intended send time.
        intended = start + i / rate
        delay = intended - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await pub.send(json.dumps({"type": "publish", "room": room, "data": intended}))
    await asyncio.gather(*readers)
    for ws in clients + [pub]:
        await ws.close()
    return {"room": room, "deliveries": len(lat), "p50_us": q(lat, 0.5), "p99_us": q(lat, 0.99), "max_us": max(lat)}


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin")
    ap.add_argument("out")
    ap.add_argument("--redis")
    ap.add_argument("--missed", type=int, default=1000)
    ap.add_argument("--subs", type=int, default=10)
    ap.add_argument("--rate", type=int, default=500)
    ap.add_argument("--secs", type=float, default=5)
    a = ap.parse_args()
    procs = []
    if a.redis:
        pa, ba = start(a.bin, "--redis", a.redis, "--node-id", "bh-a")
        pb, bb = start(a.bin, "--redis", a.redis, "--node-id", "bh-b")
        procs = [pa, pb]
        pub_base, sub_bases = ba, [bb, ba]
        await asyncio.sleep(2.5)  # registry: both nodes live
    else:
        p, b = start(a.bin)
        procs = [p]
        pub_base, sub_bases = b, [b]
    out = {"setup": {"redis": a.redis, "nodes": len(procs), "shards": 2, "subs": a.subs, "rate": a.rate,
                     "secs": a.secs, "python_websockets": websockets.__version__, "cpus": os.cpu_count()}}
    out["recovery"] = await recovery(pub_base, sub_bases[0], a.missed)
    rounds = []
    for r in range(2):
        for kind in ("p", "h"):
            rounds.append(await latency(pub_base, sub_bases, f"{kind}.lat{r}", a.subs, a.rate, a.secs))
    out["latency"] = rounds
    for p in procs:
        p.terminate()
        p.wait()
    json.dump(out, open(a.out, "w"), indent=1)
    print(json.dumps(out, indent=1))


asyncio.run(main())
