#!/usr/bin/env python3
"""Token auth (`auth.mode = "token"`) checked end to end with tokens minted by PyJWT,
a JWT library this project did not write, and the Python `websockets` client.

Starts target/debug/ringside (or $RINGSIDE_BIN) a few times on free ports and checks:
every refusal reason (401, `WWW-Authenticate: Bearer error="invalid_token",
error_description="<reason>"`, the body, `ringside_auth_failures_total`); the three
token transports (Authorization: Bearer, the `ringside.bearer.<token>` subprotocol
with `ringside` selected, `?token=`) and that the client id is the token's `sub`;
room grants (`rooms`, `publish` → `forbidden`); refresh (`refreshed`, `forbidden`,
`invalid_token`) and expiry (close 4003, never early); that a token cannot take over
another client's id; `auth.sessions_per_client`; ES256 with a key generated here
(and the HS256-with-the-public-key confusion), issuer and audience; and the exit
code and message of a token node started without a key. Prints one line per check
and "N passed, N failed"; exits non-zero on any failure.

Needs `websockets`, `PyJWT` and `cryptography` (scripts/test installs them).
"""
import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

try:
    import websockets
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
except ImportError as e:  # pragma: no cover - environment problem, said plainly
    print(f"FAIL missing Python package: {e.name} (python3 -m pip install websockets PyJWT cryptography)", flush=True)
    sys.exit(1)

BIN = os.environ.get("RINGSIDE_BIN", os.path.join(os.path.dirname(__file__), "..", "..", "target", "debug", "ringside"))
SECRET = "ringside-auth-test-secret-0123456789abcdef"
OTHER_SECRET = "some-other-secret-0123456789abcdef-xyz"
# The node reads every RINGSIDE_* variable as a setting and refuses unknown ones: keep ours out of its env.
NODE_ENV = {k: v for k, v in os.environ.items() if k != "RINGSIDE_BIN"}
RESULTS = []
T = 5  # seconds to wait for any one answer


def check(name, ok, detail=""):
    RESULTS.append(bool(ok))
    print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else ': ' + str(detail)}", flush=True)


class Node:
    """A ringside process on a free port; its stderr is drained (kept for failure reports)."""

    def __init__(self, *args):
        cmd = [BIN, "--listen", "127.0.0.1:0", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=NODE_ENV)
        self.log = []
        self.addr = None
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            m = re.search(r"listening on (\S+)", line)
            if m:
                self.addr = m.group(1)
                break
        if self.addr is None:
            self.proc.wait(timeout=5)
            raise RuntimeError(f"ringside {' '.join(args)} did not start: {self.log[-5:]}")
        threading.Thread(target=self._drain, daemon=True).start()
        self.ws = f"ws://{self.addr}"

    def _drain(self):
        for line in self.proc.stderr:
            self.log.append(line.rstrip())
            del self.log[:-200]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def metrics(self):
        def get():
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(f"http://{self.addr}/metrics", timeout=T) as r:
                return r.read().decode()

        return await asyncio.to_thread(get)

    async def metric(self, name):
        text = await self.metrics()
        m = re.search(r"^" + re.escape(name) + r" (\d+)$", text, re.M)
        return int(m.group(1)) if m else None


def now():
    return int(time.time())


def hs(claims, secret=SECRET):
    return jwt.encode(claims, secret, algorithm="HS256")


def claims(sub, ttl=300, **more):
    c = {"exp": now() + ttl, **more}
    if sub is not None:
        c["sub"] = sub
    return c


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_by_hand(claims_, key_bytes):
    """HS256 signed with arbitrary key bytes (PyJWT refuses a PEM as an HMAC secret, rightly)."""
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims_).encode())
    sig = hmac.new(key_bytes, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


async def connect(url, token=None, how="bearer", **kw):
    """Opens `url` with `token` carried `how` (bearer, query, protocol)."""
    if token is not None:
        if how == "bearer":
            kw["additional_headers"] = {"Authorization": f"Bearer {token}"}
        elif how == "query":
            url += ("&" if "?" in url else "?") + "token=" + token
        elif how == "protocol":
            kw["subprotocols"] = [f"ringside.bearer.{token}", "ringside"]
    return await websockets.connect(url, open_timeout=T, proxy=None, **kw)


async def welcome(ws):
    w = json.loads(await asyncio.wait_for(ws.recv(), T))
    assert w.get("type") == "welcome", w
    return w


async def recv_json(ws, timeout=T):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def send(ws, **msg):
    await ws.send(json.dumps(msg))


async def ping_pong(ws, n):
    await send(ws, type="ping", id=n)
    return await recv_json(ws) == {"type": "pong", "id": n}


async def silent(ws, secs=0.4):
    """True if nothing arrives on `ws` for `secs`."""
    try:
        got = await asyncio.wait_for(ws.recv(), secs)
        return got
    except asyncio.TimeoutError:
        return True


async def refused(url, token, how="bearer"):
    """(status, WWW-Authenticate, body) of a refused upgrade, or None if it upgraded."""
    try:
        ws = await connect(url, token, how)
    except websockets.exceptions.InvalidStatus as e:
        r = e.response
        return r.status_code, r.headers.get("WWW-Authenticate", ""), (r.body or b"").decode(errors="replace")
    await ws.close()
    return None


async def expect_refused(name, url, token, reason, how="bearer"):
    got = await refused(url, token, how)
    want_hdr = f'Bearer error="invalid_token", error_description="{reason}"'
    ok = got is not None and got[0] == 401 and got[1] == want_hdr and got[2].startswith(f"unauthorized: {reason}: ")
    check(f"{name} -> 401 {reason}", ok, got)


async def expect_close(ws, timeout=T):
    """The close code received within `timeout` (None: still open / other)."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except websockets.ConnectionClosed as c:
        return c.rcvd.code if c.rcvd is not None else None
    except asyncio.TimeoutError:
        return None


# 1. Every refusal reason, and its counter.
async def token_errors(a):
    url = a.ws + "/ws"
    cases = [
        ("no token", None, "missing"),
        ('token "abc"', "abc", "malformed"),
        ("signed with another secret", hs(claims("x"), OTHER_SECRET), "bad_signature"),
        ("exp in the past", hs(claims("x", ttl=-30)), "expired"),
        ("nbf in the future", hs(claims("x", nbf=now() + 60)), "not_yet_valid"),
        ("no sub", hs(claims(None)), "bad_claims"),
        ('sub "a b"', hs(claims("a b")), "bad_claims"),
        ('rooms ["a*b"]', hs(claims("x", rooms=["a*b"])), "bad_claims"),
        ('class "vip"', hs(claims("x", **{"class": "vip"})), "bad_claims"),
        ("no exp", hs({"sub": "x"}), "bad_claims"),
    ]
    for name, tok, reason in cases:
        await expect_refused(name, url, tok, reason)
    # The other transports refuse the same way.
    await expect_refused("expired, as ?token=", url, hs(claims("x", ttl=-30)), "expired", "query")
    await expect_refused("expired, as subprotocol", url, hs(claims("x", ttl=-30)), "expired", "protocol")
    await expect_refused("/echo without a token", a.ws + "/echo", None, "missing")
    want = {"missing": 2, "malformed": 1, "bad_signature": 1, "expired": 3, "not_yet_valid": 1, "bad_claims": 5,
            "bad_issuer": 0, "bad_audience": 0}
    text = await a.metrics()
    got = {}
    for reason in want:
        m = re.search(r'^ringside_auth_failures_total\{reason="' + reason + r'"\} (\d+)$', text, re.M)
        got[reason] = int(m.group(1)) if m else None
    check("ringside_auth_failures_total counts each reason", got == want, f"got {got}, want {want}")


# 2. Transports; the client id is the token's sub.
async def transports(a):
    for how in ("bearer", "query", "protocol"):
        sub = f"via_{how}"
        ws = await connect(a.ws + "/ws?client_id=someone_else", hs(claims(sub)), how)
        w = await welcome(ws)
        check(f"{how}: upgrades, client_id is the token's sub (?client_id= ignored)", w["client_id"] == sub, w)
        if how == "protocol":
            check("subprotocol: 101 selects \"ringside\"", ws.subprotocol == "ringside", ws.subprotocol)
        else:
            check(f"{how}: no subprotocol selected", ws.subprotocol is None, ws.subprotocol)
        await ws.close()
    # Only the bearer entry offered: the upgrade works, nothing is selected (the token is never echoed).
    tok = hs(claims("via_protocol_only"))
    ws = await websockets.connect(a.ws + "/ws", subprotocols=[f"ringside.bearer.{tok}"], open_timeout=T,
                                    proxy=None)
    try:
        w = await welcome(ws)
        check("bearer subprotocol alone: upgrades, nothing selected", ws.subprotocol is None and
              w["client_id"] == "via_protocol_only", (ws.subprotocol, w))
    finally:
        await ws.close()
    ws = await connect(a.ws + "/echo", hs(claims("echoer")), "query")
    await ws.send("hi")
    check("/echo with a token echoes", await asyncio.wait_for(ws.recv(), T) == "hi")
    await ws.close()


# 3. Room grants.
async def permissions(a):
    grants = {"rooms": ["chat.*", "lobby"], "publish": ["lobby"]}
    p1 = await connect(a.ws + "/ws", hs(claims("perm1", **grants)))
    p2 = await connect(a.ws + "/ws", hs(claims("perm2", **grants)), "query")
    none = await connect(a.ws + "/ws", hs(claims("perm_none")))
    try:
        for ws in (p1, p2, none):
            await welcome(ws)
        await send(p1, type="join", room="chat.x")
        r = await recv_json(p1)
        check("join chat.x (rooms chat.*) -> joined", r == {"type": "joined", "room": "chat.x"}, r)
        await send(p1, type="join", room="other")
        r = await recv_json(p1)
        check("join other -> forbidden", r.get("type") == "error" and r.get("code") == "forbidden", r)
        await send(p1, type="join", room="chat")
        r = await recv_json(p1)
        check("join chat (not under chat.*) -> forbidden", r.get("code") == "forbidden", r)
        check("connection stays open after forbidden (ping -> pong)", await ping_pong(p1, 7))
        await send(p1, type="publish", room="chat.x", data="no")
        r = await recv_json(p1)
        check("publish to chat.x (not in publish) -> forbidden", r.get("code") == "forbidden", r)
        for ws in (p1, p2):
            await send(ws, type="join", room="lobby")
            r = await recv_json(ws)
            assert r == {"type": "joined", "room": "lobby"}, r
        await send(p1, type="publish", room="lobby", data={"n": 1})
        r = await recv_json(p2)
        want = {"type": "message", "room": "lobby", "from": "perm1", "data": {"n": 1}}
        check("publish to lobby reaches another member", r == want, r)
        await send(none, type="join", room="lobby")
        r = await recv_json(none)
        check("token without rooms: join lobby -> forbidden", r.get("code") == "forbidden", r)
        await send(none, type="join", room="chat.x")
        r = await recv_json(none)
        check("token without rooms: join chat.x -> forbidden", r.get("code") == "forbidden", r)
    finally:
        for ws in (p1, p2, none):
            await ws.close()


# 4a. Refresh keeps a connection past its first token's exp.
async def refresh(a):
    t0 = time.time()
    ws = await connect(a.ws + "/ws", hs({"sub": "fresh", "exp": int(t0) + 3}))
    try:
        await welcome(ws)
        exp = now() + 60
        await send(ws, type="refresh", token=hs({"sub": "fresh", "exp": exp}))
        r = await recv_json(ws)
        check("refresh (same sub) -> refreshed with the new exp", r == {"type": "refreshed", "exp": exp}, r)
        # auth.min_refresh_interval_ms=300: another at once is not even verified.
        await send(ws, type="refresh", token=hs({"sub": "fresh", "exp": exp + 1}))
        r = await recv_json(ws)
        check("a refresh within auth.min_refresh_interval_ms -> rate_limited", r.get("code") == "rate_limited", r)
        await asyncio.sleep(0.35)
        await send(ws, type="refresh", token=hs(claims("not_fresh")))
        r = await recv_json(ws)
        check("refresh with another sub's token -> forbidden", r.get("type") == "error" and
              r.get("code") == "forbidden", r)
        await asyncio.sleep(0.35)
        await send(ws, type="refresh", token=hs({"sub": "fresh", "exp": now() - 30}))
        r = await recv_json(ws)
        check("refresh with an expired token -> invalid_token", r.get("code") == "invalid_token", r)
        await asyncio.sleep(0.35)
        await send(ws, type="refresh", token=hs(claims("fresh"), OTHER_SECRET))
        r = await recv_json(ws)
        check("refresh with a badly signed token -> invalid_token", r.get("code") == "invalid_token", r)
        # The first token's close would come by int(t0) + 4 (+ a sweep); wait past it.
        await asyncio.sleep(max(0.0, t0 + 4.5 - time.time()))
        ok = False
        try:
            ok = await ping_pong(ws, 1)
        except websockets.ConnectionClosed as c:
            ok = c
        check("refreshed connection still open 4.5 s later (first token long expired)", ok is True, ok)
    finally:
        await ws.close()


# 4b. Expiry without refresh: 4003, never before exp.
async def expiry(a):
    t0 = time.time()
    exp = int(t0) + 2
    ws = await connect(a.ws + "/ws", hs({"sub": "expiring", "exp": exp}))
    try:
        await welcome(ws)
        await asyncio.sleep(max(0.0, t0 + 1.0 - time.time()))
        ok = False
        try:
            ok = await ping_pong(ws, 1)
        except websockets.ConnectionClosed as c:
            ok = c
        check("expiring connection still open at 1 s (before exp)", ok is True, ok)
        code = await expect_close(ws, timeout=5)
        dt = time.time() - t0
        # Closed once exp < now (whole seconds, leeway 0): at int(t0) + 3 plus a 100 ms sweep.
        check("token expiry closes 4003 between 2 s and 4 s", code == 4003 and 2.0 <= dt <= 4.0,
              f"code {code} after {dt:.2f} s (exp {exp - t0:+.2f} s)")
    finally:
        await ws.close()


async def refresh_and_expiry(a):
    await asyncio.gather(guard(refresh, a), guard(expiry, a))
    n = await a.metric("ringside_tokens_expired_total")
    check("ringside_tokens_expired_total >= 1", n is not None and n >= 1, n)
    n = await a.metric("ringside_tokens_refreshed_total")
    check("ringside_tokens_refreshed_total == 1", n == 1, n)


# 5. A token cannot take over another client's id.
async def takeover(a):
    alice = await connect(a.ws + "/ws", hs(claims("alice")))
    mallory = await connect(a.ws + "/ws?client_id=alice", hs(claims("mallory")), "query")
    bob = await connect(a.ws + "/ws", hs(claims("bob")))
    try:
        await welcome(alice)
        w = await welcome(mallory)
        check("?client_id=alice with mallory's token: welcome says mallory", w["client_id"] == "mallory", w)
        await welcome(bob)
        await send(bob, type="direct", to="alice", data="for alice")
        r = await recv_json(alice)
        check("alice still gets her direct messages", r == {"type": "direct", "from": "bob", "data": "for alice"}, r)
        s = await silent(mallory)
        check("mallory does not get alice's direct message", s is True, s)
        check("alice was not replaced (ping -> pong)", await ping_pong(alice, 2))
    finally:
        for ws in (alice, mallory, bob):
            await ws.close()


# 6. auth.sessions_per_client = 2.
async def sessions(b):
    tok = hs(claims("carol"))
    conns, shards = [], []
    try:
        for _ in range(3):
            ws = await connect(b.ws + "/ws", tok)
            shards.append((await welcome(ws))["shard"])
            conns.append(ws)
        code = await expect_close(conns[0], timeout=T)
        check("3rd session of carol (sessions_per_client=2) closes the 1st with 4000", code == 4000,
              f"code {code}, shards {shards}")
        dave = await connect(b.ws + "/ws", hs(claims("dave")))
        conns.append(dave)
        await welcome(dave)
        await send(dave, type="direct", to="carol", data=1)
        got = []
        for ws in conns[1:3]:
            try:
                got.append(await recv_json(ws))
            except (asyncio.TimeoutError, websockets.ConnectionClosed) as e:
                got.append(repr(e))
        want = {"type": "direct", "from": "dave", "data": 1}
        check(f"both remaining sessions get the direct message (shards {shards})", got == [want, want], got)
    finally:
        for ws in conns:
            await ws.close()


# 7. ES256, algorithm confusion, issuer and audience.
async def es256(c, d, private_key, public_pem):
    url = c.ws + "/ws"
    tok = jwt.encode(claims("es_user"), private_key, algorithm="ES256")
    ws = await connect(url, tok, "protocol")
    w = await welcome(ws)
    check("ES256 token connects (subprotocol)", w["client_id"] == "es_user" and ws.subprotocol == "ringside", w)
    await ws.close()
    await expect_refused("HS256 signed with the public key PEM (algorithm confusion)", url,
                         hs256_by_hand(claims("es_user"), public_pem), "bad_signature")
    await expect_refused("HS256 token on an ES256 node", url, hs(claims("es_user")), "bad_signature")
    other = ec.generate_private_key(ec.SECP256R1())
    await expect_refused("ES256 signed by another key", url, jwt.encode(claims("es_user"), other, algorithm="ES256"),
                         "bad_signature")
    none_head = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    none_alg = f"{none_head}.{b64(json.dumps(claims('es_user')).encode())}."
    got = await refused(url, none_alg)
    check('alg "none" token -> 401', got is not None and got[0] == 401, got)

    url = d.ws + "/ws"
    es = lambda **kw: jwt.encode(claims("es_iss", **kw), private_key, algorithm="ES256")  # noqa: E731
    await expect_refused("wrong iss", url, es(iss="someone-else", aud="edge"), "bad_issuer")
    await expect_refused("no iss", url, es(aud="edge"), "bad_issuer")
    await expect_refused("wrong aud", url, es(iss="ringside-tests", aud="elsewhere"), "bad_audience")
    await expect_refused("no aud", url, es(iss="ringside-tests"), "bad_audience")
    for aud in ("edge", ["other", "edge"]):
        ws = await connect(url, es(iss="ringside-tests", aud=aud))
        w = await welcome(ws)
        check(f"right iss and aud {aud!r} -> connects", w["client_id"] == "es_iss", w)
        await ws.close()
    want = {"bad_issuer": 2, "bad_audience": 2}
    text = await d.metrics()
    got = {r: int(m.group(1)) for r in want
           for m in [re.search(r'^ringside_auth_failures_total\{reason="' + r + r'"\} (\d+)$', text, re.M)] if m}
    check("ringside_auth_failures_total counts bad_issuer and bad_audience", got == want, got)


# 8. Configuration errors: exit 2 and one line naming the key.
def config_errors(tmp, private_pem_file):
    cases = [
        ("auth.mode=token without a key", ["--set", "auth.mode=token"], "auth.mode"),
        ("a short auth.hmac_secret", ["--set", "auth.mode=token", "--set", "auth.hmac_secret=short"],
         "auth.hmac_secret"),
        ("a private key as auth.public_key_file",
         ["--set", "auth.mode=token", "--set", f"auth.public_key_file={private_pem_file}"], "auth.public_key_file"),
    ]
    for name, args, key in cases:
        p = subprocess.run([BIN, "--check-config", *args], capture_output=True, text=True, timeout=20, env=NODE_ENV)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        ok = p.returncode == 2 and len(lines) == 1 and key in lines[0] and "ERROR" in lines[0]
        check(f"--check-config with {name}: exit 2, one line naming {key}", ok,
              f"rc {p.returncode}, stderr {lines}")


async def guard(f, *args):
    try:
        await f(*args)
    except Exception as e:  # noqa: BLE001 - report and go on
        check(f.__name__, False, repr(e))


async def main():
    started = time.time()
    tmp = tempfile.mkdtemp(prefix="ringside-auth-")
    key = ec.generate_private_key(ec.SECP256R1())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
    pub_file = os.path.join(tmp, "es256.pub.pem")
    with open(pub_file, "wb") as f:
        f.write(public_pem)
    priv_file = os.path.join(tmp, "es256.key.pem")
    with open(priv_file, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))

    hs_args = ["--shards", "2", "--set", "auth.mode=token", "--set", f"auth.hmac_secret={SECRET}",
               "--set", "auth.leeway_secs=0", "--set", "websocket.sweep_interval_ms=100",
               "--set", "auth.min_refresh_interval_ms=300"]
    nodes = []
    try:
        a = Node(*hs_args)
        nodes.append(a)
        b = Node(*hs_args, "--set", "auth.sessions_per_client=2")
        nodes.append(b)
        c = Node("--shards", "2", "--set", "auth.mode=token", "--set", f"auth.public_key_file={pub_file}")
        nodes.append(c)
        d = Node("--shards", "2", "--set", "auth.mode=token", "--set", f"auth.public_key_file={pub_file}",
                 "--set", "auth.issuer=ringside-tests", "--set", "auth.audience=edge")
        nodes.append(d)
        # The refusal counters are compared exactly: count them before anything else runs on node a.
        await guard(token_errors, a)
        await asyncio.gather(
            guard(refresh_and_expiry, a),
            guard(transports, a),
            guard(permissions, a),
            guard(takeover, a),
            guard(sessions, b),
            guard(es256, c, d, key, public_pem),
            asyncio.to_thread(config_errors, tmp, priv_file),
        )
        for n in nodes:
            check(f"node {n.addr} still running", n.proc.poll() is None, n.log[-5:])
    finally:
        for n in nodes:
            n.stop()
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)
    failed = RESULTS.count(False)
    print(f"{len(RESULTS) - failed} passed, {failed} failed ({time.time() - started:.1f} s)")
    sys.exit(1 if failed else 0)


asyncio.run(main())
