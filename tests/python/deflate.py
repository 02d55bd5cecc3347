#!/usr/bin/env python3
"""permessage-deflate interop with Python `websockets`, which offers the extension by default.

Starts target/debug/ringside (or $RINGSIDE_BIN) with websocket.deflate=true and checks: the 101
answers both no_context_takeover parameters; echo round trips (text, binary, unicode, small and
large) with the client's default offer (asking for context takeover), with no_context_takeover
asked both ways, and with server_max_window_bits=10; room fan-out to compressed and plain members
(compressed once per shard: ringside_deflate_reused_total);
a compressed bomb closed 1009 without the node's memory growing; then a node with deflate off
answers no extension header and the same client still works. Prints "N passed, N failed".
"""
import asyncio
import json
import os
import re
import sys

import websockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import check, start_node, summary  # noqa: E402
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

BOTH = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"






def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


MESSAGES = ["hello", "ünïcødé ✓ " * 100, "x" * 60000, b"\x00\x01\xff" * 1000, b"", "", json.dumps({"k": list(range(500))})]


async def echo_all(ws):
    for m in MESSAGES * 3:  # repeated: a client keeping context across messages would break here
        await ws.send(m)
        back = await asyncio.wait_for(ws.recv(), 5)
        if back != m:
            return f"sent {len(m)} got {len(back)}"
    return None


async def echo_with(base, name, factory, want_header):
    kwargs = {"max_size": None}
    if factory is not None:
        kwargs["extensions"] = [factory]
    async with websockets.connect(base + "/echo", **kwargs) as ws:
        header = ws.response.headers.get("Sec-WebSocket-Extensions")
        check(f"{name}: 101 answers {want_header!r}", header == want_header, header)
        check(f"{name}: client uses the extension", [e.name for e in ws.protocol.extensions] == ["permessage-deflate"],
              ws.protocol.extensions)
        err = await echo_all(ws)
        check(f"{name}: echo round trips", err is None, err)


def metric(addr, name):
    import urllib.request
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


async def fan_out(base, addr):
    compressed = [await websockets.connect(f"{base}/ws?client_id=z{i}") for i in range(4)]
    plain = await websockets.connect(f"{base}/ws?client_id=zp", compression=None)
    members = compressed + [plain]
    for ws in members:
        await ws.recv()  # welcome
        await ws.send(json.dumps({"type": "join", "room": "z.room"}))
        assert json.loads(await ws.recv())["type"] == "joined"
    data = {"text": "fan out to many " * 100}
    await compressed[0].send(json.dumps({"type": "publish", "room": "z.room", "data": data}))
    got = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for ws in members[1:]]
    check("fan-out reaches compressed and plain members intact", all(g.get("data") == data for g in got),
          [str(g)[:80] for g in got])
    check("plain member negotiated nothing", plain.protocol.extensions == [], plain.protocol.extensions)
    await asyncio.sleep(0.5)  # the sweep publishes the codec's totals
    reused = metric(addr, "ringside_deflate_reused_total")
    check("fan-out compressed once, copied to the other compressed members", reused >= 2, reused)
    ratio = metric(addr, "ringside_deflate_wire_bytes_total") / max(1, metric(addr, "ringside_deflate_plain_bytes_total"))
    check("compression ratio reported", 0 < ratio < 0.5, ratio)
    for ws in members:
        await ws.close()


async def bomb(base, pid):
    before = rss_kib(pid)
    for _ in range(5):
        async with websockets.connect(base + "/echo", max_size=None) as ws:
            await ws.send(b"\x00" * (32 << 20))  # 32 MiB of zeros, ~32 KiB on the wire
            try:
                await asyncio.wait_for(ws.recv(), 10)
                check("compressed bomb closes 1009", False, "no close")
                return
            except websockets.ConnectionClosed as c:
                if c.rcvd is None or c.rcvd.code != 1009:
                    check("compressed bomb closes 1009", False, c)
                    return
    check("compressed bomb closes 1009 (5 times)", True)
    grew = rss_kib(pid) - before
    check("node RSS grew < 8 MiB through the bombs", grew < 8 * 1024, f"{grew} KiB")


async def deflate_on():
    # One shard: the fan-out members share one codec (its reuse is checked).
    proc, addr = start_node("--set", "websocket.deflate=true", "--set", "websocket.sweep_interval_ms=100", shards=1)
    base = f"ws://{addr}"
    try:
        await echo_with(base, "default offer (context takeover asked)", None, BOTH)
        nct = ClientPerMessageDeflateFactory(server_no_context_takeover=True, client_no_context_takeover=True)
        await echo_with(base, "no_context_takeover both ways", nct, BOTH)
        bits = ClientPerMessageDeflateFactory(server_max_window_bits=10, client_max_window_bits=True)
        await echo_with(base, "server_max_window_bits=10", bits, BOTH + "; server_max_window_bits=10")
        await fan_out(base, addr)
        await bomb(base, proc.pid)
    finally:
        proc.kill()
        proc.wait()


async def deflate_off():
    proc, addr = start_node()
    try:
        async with websockets.connect(f"ws://{addr}/echo", max_size=None) as ws:
            header = ws.response.headers.get("Sec-WebSocket-Extensions")
            check("deflate off: no extension header in the 101", header is None, header)
            check("deflate off: client runs uncompressed", ws.protocol.extensions == [], ws.protocol.extensions)
            err = await echo_all(ws)
            check("deflate off: echo round trips", err is None, err)
    finally:
        proc.kill()
        proc.wait()


async def main():
    for t in (deflate_on, deflate_off):
        try:
            await t()
        except Exception as e:  # noqa: BLE001 - report and go on
            check(t.__name__, False, repr(e))
    sys.exit(summary())


asyncio.run(main())
