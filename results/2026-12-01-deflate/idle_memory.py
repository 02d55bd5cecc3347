#!/usr/bin/env python3
"""Idle memory per connection, plain vs permessage-deflate, measured from the node's RSS.

For each mode, starts its own node (RINGSIDE_BIN, default target/debug/ringside; 1 shard),
opens N /echo connections with Python `websockets` (compression on or off), has each send
one 1,000-byte compressible message and read the echo (so every connection has been through
the inflate/deflate path and the shard's codec exists), waits for two sweeps (idle readers
are freed at a frame boundary), then reads VmRSS from /proc. Prints one JSON line per mode:
RSS before and after, and bytes per connection.
Usage: idle_memory.py [N]   (default 5000)
"""
import asyncio
import json
import os
import re
import subprocess
import sys

import websockets

BIN = os.environ.get("RINGSIDE_BIN", "target/debug/ringside")
N = int(sys.argv[1]) if len(sys.argv) > 1 else 5000


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) * 1024


async def run(mode):
    args = [BIN, "--listen", "127.0.0.1:0", "--shards", "1", "--set", "websocket.sweep_interval_ms=200"]
    if mode == "deflate":
        args += ["--set", "websocket.deflate=true"]
    p = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        m = re.search(r"listening on (\S+)", line)
        if m:
            addr = m.group(1)
            break
    # Warm-up: one connection through the whole path (codec, buffers), then closed.
    kw = {} if mode == "deflate" else {"compression": None}
    async with websockets.connect(f"ws://{addr}/echo", **kw) as ws:
        await ws.send("warm " * 200)
        await ws.recv()
    await asyncio.sleep(0.5)
    before = rss(p.pid)
    conns = []
    msg = "an idle client said hello once " * 32  # 1,000 bytes, compressible
    for i in range(N):
        ws = await websockets.connect(f"ws://{addr}/echo", ping_interval=None, **kw)
        await ws.send(msg)
        assert await ws.recv() == msg
        conns.append(ws)
    negotiated = [e.name for e in conns[0].protocol.extensions]
    await asyncio.sleep(1.0)  # > 2 sweeps: idle readers dropped
    after = rss(p.pid)
    print(json.dumps({"mode": mode, "connections": N, "extensions": negotiated, "rss_before": before,
                      "rss_after": after, "bytes_per_connection": round((after - before) / N)}), flush=True)
    for ws in conns:
        ws.transport.abort()
    p.kill()
    p.wait()


async def main():
    for mode in ("plain", "deflate"):
        await run(mode)


asyncio.run(main())
