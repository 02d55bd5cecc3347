"""Client side of scripts/bench-preempt: fills a ringside node with `low` sessions,
then times critical upgrades (request written -> "HTTP/1.1 101" read) one at a time.

Usage: preempt_client.py PORT HMAC_SECRET FILL ATTEMPTS OUT.json SERVER_PID
Raw sockets only; tokens minted with PyJWT.
"""

import base64
import json
import os
import socket
import sys
import time

import jwt

port, secret, fill, attempts, out, pid = (
    int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], int(sys.argv[6]))
exp = int(time.time()) + 3600


def token(sub, cls):
    return jwt.encode({"sub": sub, "exp": exp, "class": cls}, secret, algorithm="HS256")


def request(tok):
    key = base64.b64encode(os.urandom(16)).decode()
    return (f"GET /ws?token={tok} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def upgrade(sock, tok, timeout=10.0):
    """Writes the upgrade and reads the status line; returns (status, µs, leftover)."""
    sock.settimeout(timeout)
    req = request(tok)
    t0 = time.perf_counter_ns()
    sock.sendall(req)
    buf = b""
    while b"\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return 0, 0, b""
        buf += chunk
    us = (time.perf_counter_ns() - t0) // 1000
    return int(buf.split(b" ", 2)[1]), us, buf


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


lows, refused = [], 0
for i in range(fill):
    s = socket.create_connection(("127.0.0.1", port))
    status, _, _ = upgrade(s, token(f"low{i}", "low"))
    if status != 101:
        # A shard that is full refuses (the other may still have room).
        refused += 1
        s.close()
        continue
    lows.append(s)
time.sleep(0.5)
cpu0 = cpu_seconds(pid)
lat, crits, upgraded = [], [], 0
for i in range(attempts):
    s = socket.create_connection(("127.0.0.1", port))
    status, us, _ = upgrade(s, token(f"crit{i}", "critical"))
    if status == 101:
        upgraded += 1
        lat.append(us)
    crits.append(s)
    time.sleep(0.005)
cpu = cpu_seconds(pid) - cpu0
# Victims: lows that got close 4004 (opcode 0x88, code 0x0fa4) after a preempted notice.
victims = 0
for s in lows:
    s.setblocking(False)
    try:
        data = s.recv(65536)
    except (BlockingIOError, ConnectionError):
        continue
    if b"\x88" in data and b"\x0f\xa4" in data:
        victims += 1
lat.sort()


def q(p):
    return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0


json.dump({"attempts": attempts, "upgraded": upgraded, "fill": len(lows), "fill_refused": refused,
           "victims_4004": victims,
           "server_cpu_s": cpu,
           "latency_us": {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": lat[-1] if lat else 0}},
          open(out, "w"), indent=1)
