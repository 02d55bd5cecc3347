#!/usr/bin/env python3
"""Interop check with Python `websockets`, a second client this project did not write.

Starts target/debug/ringside (or $RINGSIDE_BIN) on a free port and checks echo of
text/binary/empty/large messages, the rooms protocol across both shards, direct
messages, the replaced-client close code, the server's close codes for an oversize
message and for shutdown, and that ping/pong round trips work. Prints
"N passed, N failed" and exits non-zero on any failure.
"""
import asyncio
import json
import os
import signal
import sys

import websockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import check, start_node, summary  # noqa: E402







async def echo(base):
    async with websockets.connect(base + "/echo", max_size=None) as ws:
        for m in ["hello", b"\x00\x01\xff", "", b"", "ünïcødé", "x" * 60000]:
            await ws.send(m)
            back = await asyncio.wait_for(ws.recv(), 5)
            if back != m:
                return check("echo", False, f"sent {len(m)} got {len(back)}")
        pong = await ws.ping(b"abc")
        await asyncio.wait_for(pong, 5)
    check("echo text/binary/empty/large and ping", True)


async def rooms(base):
    clients, shards = [], set()
    for i in range(40):
        ws = await websockets.connect(f"{base}/ws?client_id=py{i}")
        w = json.loads(await ws.recv())
        clients.append(ws)
        shards.add(w["shard"])
        if len(shards) == 2 and i >= 3:
            break
    check("clients on both shards", len(shards) == 2, shards)
    for ws in clients:
        await ws.send(json.dumps({"type": "join", "room": "py.room"}))
        assert json.loads(await ws.recv()) == {"type": "joined", "room": "py.room"}
    await clients[0].send(json.dumps({"type": "publish", "room": "py.room", "data": {"n": [1, 2]}}))
    got = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for ws in clients[1:]]
    want = {"type": "message", "room": "py.room", "from": "py0", "data": {"n": [1, 2]}}
    check("publish reaches every other member once", all(g == want for g in got), got[:2])
    try:
        extra = await asyncio.wait_for(clients[0].recv(), 0.3)
        check("sender excluded", False, extra)
    except asyncio.TimeoutError:
        check("sender excluded", True)
    await clients[1].send(json.dumps({"type": "direct", "to": f"py{len(clients) - 1}", "data": "hi"}))
    d = json.loads(await asyncio.wait_for(clients[-1].recv(), 5))
    check("direct across shards", d == {"type": "direct", "from": "py1", "data": "hi"}, d)
    await clients[1].send("{not json")
    e = json.loads(await clients[1].recv())
    check("bad json answered, connection open", e["type"] == "error" and e["code"] == "bad_json", e)
    dup = await websockets.connect(f"{base}/ws?client_id=py0")
    await dup.recv()
    try:
        await asyncio.wait_for(clients[0].recv(), 5)
        check("replaced connection closed 4000", False, "no close")
    except websockets.ConnectionClosed as c:
        check("replaced connection closed 4000", c.rcvd is not None and c.rcvd.code == 4000, c)
    await dup.close()
    for ws in clients[1:]:
        await ws.close()


async def too_big(base):
    async with websockets.connect(base + "/echo") as ws:
        await ws.send("y" * 70000)  # over websocket.max_message_bytes (64 KiB)
        try:
            await asyncio.wait_for(ws.recv(), 5)
            check("oversize message closes 1009", False, "no close")
        except websockets.ConnectionClosed as c:
            check("oversize message closes 1009", c.rcvd is not None and c.rcvd.code == 1009, c)


async def shutdown(base, proc):
    ws = await websockets.connect(base + "/echo")
    rooms = await websockets.connect(base + "/ws?client_id=py-drain")
    await rooms.recv()  # welcome
    proc.send_signal(signal.SIGTERM)
    try:
        hint = json.loads(await asyncio.wait_for(rooms.recv(), 5))
        check("SIGTERM: a reconnect hint first (drain)", hint.get("type") == "reconnect"
              and hint.get("reason") == "drain" and "after_ms" in hint, hint)
    except Exception as e:  # noqa: BLE001
        check("SIGTERM: a reconnect hint first (drain)", False, repr(e))
    try:
        # The rest get 1001 at 3/4 of shutdown.drain_timeout_ms (3 s here).
        await asyncio.wait_for(ws.recv(), 5)
        check("SIGTERM closes 1001", False, "no close")
    except websockets.ConnectionClosed as c:
        check("SIGTERM closes 1001", c.rcvd is not None and c.rcvd.code == 1001, c)
    check("exit 0 after drain", proc.wait(timeout=15) == 0)


async def main():
    proc, addr = start_node("--set", "shutdown.drain_timeout_ms=3000", "--set", "shutdown.reconnect_spread_ms=500")
    base = f"ws://{addr}"
    try:
        for t in (echo, rooms):
            try:
                await t(base)
            except Exception as e:  # noqa: BLE001 - report and go on
                check(t.__name__, False, repr(e))
        try:
            await too_big(base)
        except Exception as e:  # noqa: BLE001
            check("oversize message closes 1009", False, repr(e))
        await shutdown(base, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    sys.exit(summary())


asyncio.run(main())
