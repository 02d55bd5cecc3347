#!/usr/bin/env python3
"""A real HTTP backend for ringside's upstream tests and benchmark, written
with the standard library only (http.server's ThreadingHTTPServer, HTTP/1.1
keep-alive): what an application behind the node would run.

  POST /connect     the connect proxy: ?user=NAME in the client's query
                    allows (client_id NAME, room "lobby", welcome data),
                    user=banned is refused, user=slow sleeps 30 s
  POST /rpc         methods: echo, add, slow (sleeps data.ms), fail
                    (backend error), crash (HTTP 500)
  POST /publish     room "moderated": data.text containing "bad" is
                    rejected, anything else is rewritten to upper case
  POST /disconnect  records the batch
  GET  /health      200, or 503 after POST /control/health?fail=1
  GET  /control/stats        connections open / accepted, requests, batches
  GET  /control/disconnects  every disconnect notice received
  POST /control/health?fail=0|1

Usage: upstream_backend.py [--port N] [--reuse-port]   (prints "PORT <n>" once listening)
"""
import argparse
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

LOCK = threading.Lock()
STATE = {"open": 0, "accepted": 0, "requests": 0, "health_fail": False, "disconnects": [], "batches": 0,
         "health_checks": 0, "max_open": 0}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    # One write per response (headers and body together, flushed by the
    # base class after each request) and no Nagle: with the stdlib's
    # default (unbuffered, headers then body) every answer waits ~40 ms for
    # the client's delayed ACK.
    wbufsize = 1 << 16

    # Connections are counted from their first request that is not a
    # /control/ one, so the test's own control calls do not count.
    counted = False

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def count(self):
        if self.counted or self.path.startswith("/control/"):
            return
        self.counted = True
        with LOCK:
            STATE["open"] += 1
            STATE["accepted"] += 1
            STATE["max_open"] = max(STATE["max_open"], STATE["open"])

    def finish(self):
        try:
            super().finish()
        finally:
            if self.counted:
                with LOCK:
                    STATE["open"] -= 1

    def log_message(self, *args):
        pass

    def reply(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        return json.loads(raw) if raw else None

    def do_GET(self):
        self.count()
        with LOCK:
            STATE["requests"] += 1
        path = urlsplit(self.path).path
        if path == "/health":
            with LOCK:
                STATE["health_checks"] += 1
                fail = STATE["health_fail"]
            return self.reply(503 if fail else 200, {"ok": not fail})
        if path == "/control/stats":
            with LOCK:
                s = {k: v for k, v in STATE.items() if k != "disconnects"}
            return self.reply(200, s)
        if path == "/control/disconnects":
            with LOCK:
                return self.reply(200, list(STATE["disconnects"]))
        self.reply(404, {"error": {"code": "not_found"}})

    def do_POST(self):
        self.count()
        with LOCK:
            STATE["requests"] += 1
        url = urlsplit(self.path)
        try:
            req = self.body()
        except ValueError:
            return self.reply(400, {"error": {"code": "bad_json"}})
        if url.path == "/connect":
            return self.connect(req)
        if url.path == "/rpc":
            return self.rpc(req)
        if url.path == "/publish":
            return self.publish(req)
        if url.path == "/disconnect":
            with LOCK:
                STATE["batches"] += 1
                STATE["disconnects"].extend(req.get("disconnects", []))
            return self.reply(200, {})
        if url.path == "/control/health":
            with LOCK:
                STATE["health_fail"] = parse_qs(url.query).get("fail") == ["1"]
            return self.reply(200, {})
        self.reply(404, {"error": {"code": "not_found"}})

    def connect(self, req):
        user = parse_qs(req.get("query", "")).get("user", [None])[0]
        if user == "banned":
            return self.reply(200, {"error": {"code": "banned", "reason": "not welcome here"}})
        if user == "slow":
            time.sleep(30)
        if user is None:
            # No user: admit with the id the token or the client gave.
            return self.reply(200, {})
        return self.reply(200, {
            "client_id": user, "rooms": ["lobby"], "class": "high",
            "data": {"greeting": "hello " + user, "addr": req.get("addr"),
                     "ua": req.get("headers", {}).get("user-agent"), "claims": req.get("claims")},
        })

    def rpc(self, req):
        method, data = (req.get("method") or "").rsplit(".", 1)[-1], req.get("data")
        if method == "echo":
            return self.reply(200, {"data": {"echo": data, "client_id": req.get("client_id")}})
        if method == "add":
            return self.reply(200, {"data": sum(data)})
        if method == "slow":
            time.sleep((data or {}).get("ms", 100) / 1000)
            return self.reply(200, {"data": "slept"})
        if method == "fail":
            return self.reply(200, {"error": {"code": "boom", "reason": "failed on purpose"}})
        if method == "crash":
            return self.reply(500, {"error": {"code": "internal"}})
        return self.reply(200, {"error": {"code": "unknown_method", "reason": method}})

    def publish(self, req):
        data = req.get("data") or {}
        text = data.get("text", "") if isinstance(data, dict) else ""
        if "bad" in text:
            return self.reply(200, {"error": {"code": "moderated", "reason": "no bad words"}})
        return self.reply(200, {"data": {"text": text.upper(), "by": req.get("client_id")}})


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--reuse-port", action="store_true", help="SO_REUSEPORT: several processes share the port")
    args = ap.parse_args()
    Server.allow_reuse_port = args.reuse_port
    srv = Server(("127.0.0.1", args.port), Handler)
    print(f"PORT {srv.server_address[1]}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
