#!/usr/bin/env python3
"""Zero-disconnect upgrade of permessage-deflate connections, with Python `websockets` clients.

Starts target/debug/ringside (or $RINGSIDE_BIN) with websocket.deflate=true and
server.upgrade_socket, opens /ws clients that negotiate permessage-deflate (the library's
default offer) and keep echoing compressible messages in order, some of them members of a room
with history that a publisher feeds throughout; then starts a second process with
--upgrade-from. Checks: the old process exits 0, no client sees a close, every echo comes back in
order and compressed both before and after, every member gets every offset exactly once, and the
new process counts every connection as resumed. Prints "N passed, N failed".
"""
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import re
import time
import urllib.request

import websockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BIN, check, start_node, summary  # noqa: E402

CLIENTS = 40
MEMBERS = 10


async def client(base, i, stop, result):
    ws = await websockets.connect(f"{base}/ws?client_id=c{i}", max_size=None)
    welcome = json.loads(await ws.recv())
    ext = [e.name for e in ws.protocol.extensions]
    member = i < MEMBERS
    if member:
        await ws.send(json.dumps({"type": "join", "room": "h"}))
        joined = json.loads(await ws.recv())
        assert joined["type"] == "joined", joined
        stop["joined"] += 1
    offsets, echoes, n, err = [], 0, 0, None
    data = ("compress me " * 1000) + str(i)  # 12 KB, compressible: tests the codec both ways
    await ws.send(json.dumps({"type": "echo", "data": [n, data]}))
    try:
        while True:
            if stop["echo"] and (not member or len(offsets) >= stop["sent"]):
                break
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.1)
            except asyncio.TimeoutError:
                if time.monotonic() - stop["t"] > 30:
                    err = f"silent: {echoes} echoes, {len(offsets)} messages"
                    break
                continue
            m = json.loads(raw)
            if m["type"] == "echo":
                if m["data"] != [n, data]:
                    err = f"echo out of order: {m['data'][0]} after {n}"
                    break
                echoes += 1
                if not stop["echo"]:
                    n += 1
                    await asyncio.sleep(0.02)
                    await ws.send(json.dumps({"type": "echo", "data": [n, data]}))
            elif m["type"] == "message" and member:
                offsets.append(m["offset"])
            else:
                err = f"unexpected {m}"
                break
    except websockets.ConnectionClosed as e:
        err = f"closed: {e}"
    result[i] = {"welcome": welcome["type"], "ext": ext, "ext_after": [e.name for e in ws.protocol.extensions],
                 "echoes": echoes, "offsets": offsets, "err": err}
    await ws.close()


async def main():
    tmp = tempfile.mkdtemp(prefix="ringside-upgrade-deflate-")
    sock, sock2 = os.path.join(tmp, "a.sock"), os.path.join(tmp, "b.sock")
    common = ["--set", "websocket.deflate=true", "--set", "rooms.history_size=100000", "--set", "server.pin_cores=false"]
    old, addr = start_node(*common, "--set", f"server.upgrade_socket={sock}")
    base = f"ws://{addr}"
    stop = {"echo": False, "sent": 1 << 60, "t": time.monotonic(), "joined": 0}
    result = {}
    tasks = [asyncio.create_task(client(base, i, stop, result)) for i in range(CLIENTS)]
    pub = await websockets.connect(f"{base}/ws?client_id=publisher")
    await pub.recv()
    await pub.send(json.dumps({"type": "join", "room": "h"}))
    await pub.recv()
    sent = 0
    # Every member is in the room before the first publish (offset 1).
    until = time.monotonic() + 10
    while stop["joined"] < MEMBERS and time.monotonic() < until:
        await asyncio.sleep(0.01)
    check(f"{MEMBERS} members joined before the first publish", stop["joined"] == MEMBERS, stop["joined"])

    async def publish():
        nonlocal sent
        while not stop["echo"]:
            await pub.send(json.dumps({"type": "publish", "room": "h", "data": sent}))
            sent += 1
            await asyncio.sleep(0.005)

    publishing = asyncio.create_task(publish())
    await asyncio.sleep(1.0)

    new = subprocess.Popen([BIN, "--listen", addr, "--shards", "2", "--set", "auth.allow_client_ids=true", *common,
                            "--set", f"server.upgrade_socket={sock2}", "--upgrade-from", sock],
                           stderr=subprocess.PIPE, text=True)
    log = []
    threading.Thread(target=lambda: [log.append(line) for line in new.stderr], daemon=True).start()
    code = await asyncio.get_running_loop().run_in_executor(None, lambda: old.wait(20))
    check("old process exits 0 once empty", code == 0, code)
    await asyncio.sleep(1.0)  # talking on, to the new process
    stop["echo"] = True
    await publishing
    await pub.send(json.dumps({"type": "ping", "id": "end"}))
    while json.loads(await pub.recv())["type"] != "pong":
        pass
    stop["sent"], stop["t"] = sent, time.monotonic()
    await asyncio.gather(*tasks)
    errs = {i: r["err"] for i, r in result.items() if r["err"]}
    check(f"{CLIENTS} clients: no close, echoes in order", not errs and len(result) == CLIENTS, errs)
    check("every client negotiated permessage-deflate",
          all(r["ext"] == ["permessage-deflate"] for r in result.values()), [r["ext"] for r in result.values()])
    check("the clients kept echoing through the upgrade", all(r["echoes"] > 30 for r in result.values()),
          sorted(r["echoes"] for r in result.values())[:5])
    bad = {i: (len(r["offsets"]), r["offsets"][:3]) for i, r in result.items()
           if i < MEMBERS and r["offsets"] != list(range(1, sent + 1))}
    check(f"{MEMBERS} members: all {sent} offsets exactly once", not bad and sent > 100, bad)
    text = "".join(log)
    m = re.search(r"(\d+) connection\(s\) taken over, (\d+) closed", text)
    check("the new process took every connection over, none closed",
          m is not None and int(m.group(1)) == CLIENTS + 1 and int(m.group(2)) == 0, m and m.group(0))
    # The new process compresses and inflates for the connections it took over.
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()

    def total(name):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    inflated, compressed = total("ringside_deflate_inflated_total"), total("ringside_deflate_compressed_total")
    check("the new process inflates and compresses on the moved connections",
          inflated >= CLIENTS and compressed >= CLIENTS, (inflated, compressed))
    await pub.close()
    new.terminate()
    new.wait(20)


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(summary())
