#!/usr/bin/env python3
"""Writes the hand-made seed inputs into fuzz/corpus/<target>/seed-*.

Run from anywhere: python3 fuzz/seeds/make_seeds.py. The seeds are committed
together with the minimized corpus; this script documents how they were made
(and recreates them).
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "corpus")
KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def write(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def upgrade(path, extra=""):
    return (
        f"GET {path} HTTP/1.1\r\nHost: node:8080\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {KEY}\r\n{extra}\r\n"
    ).encode()


def masked(opcode, payload, fin=True, mask=b"\x11\x22\x33\x44"):
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes([b0, 0x80 | n])
    elif n < 65536:
        head = bytes([b0, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([b0, 0x80 | 127]) + n.to_bytes(8, "big")
    body = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    return head + mask + body


# http_head: byte 0 = control (bits 0-1: admission; 0 full, 1 draining,
# else open; bits 2-7: split point as a fraction of 63). 0xFE: open, split
# at the end; 0x7E: open, split in the middle.
heads = {
    "ws": upgrade("/ws"),
    "ws-client-id": upgrade("/ws?client_id=alice_1"),
    "ws-header-id": upgrade("/ws", "X-Client-Id: bob-2\r\n"),
    "echo": upgrade("/echo"),
    "echo-pipelined-frame": upgrade("/echo") + masked(1, b"hello"),
    "health": b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    "ready-head": b"HEAD /ready HTTP/1.1\r\nHost: x\r\n\r\n",
    "metrics": b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
    "cluster-post": b"POST /cluster HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    "ws-version-8": upgrade("/ws").replace(b"Version: 13", b"Version: 8"),
    "ws-http10": upgrade("/ws").replace(b"HTTP/1.1", b"HTTP/1.0"),
    "ws-no-upgrade": b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n",
    "not-found": b"GET /nope?x=1 HTTP/1.1\r\nHost: x\r\n\r\n",
    "partial": b"GET /ws HTTP/1.1\r\nHost: x\r\nConn",
}
for name, h in heads.items():
    write("http_head", name, b"\xfe" + h)
write("http_head", "ws-split", b"\x7e" + upgrade("/ws?client_id=c"))
write("http_head", "ws-full", b"\x00" + upgrade("/ws"))
write("http_head", "ws-draining", b"\x01" + upgrade("/echo"))

# frame_reader: byte 0 = chunks - 1 (mod 8), then chunks-1 size bytes
# (size - 1), then the stream.
def fr(stream, sizes=()):
    return bytes([len(sizes)]) + bytes(s - 1 for s in sizes) + stream

text = masked(1, b"hello")
write("frame_reader", "text", fr(text))
write("frame_reader", "text-split-3", fr(text, (3,)))
write("frame_reader", "binary-300", fr(masked(2, bytes(range(256)) + bytes(44)), (10, 200)))
write("frame_reader", "ping", fr(masked(9, b"\x00\x00\x00\x00\x00\x00\x00\x07")))
write("frame_reader", "pong", fr(masked(10, b"stamp")))
frag = masked(1, b"hel", fin=False) + masked(9, b"") + masked(0, b"lo", fin=False) + masked(0, b"!")
write("frame_reader", "fragmented", fr(frag, (9, 6, 9)))
write("frame_reader", "close", fr(masked(8, (1000).to_bytes(2, "big") + b"bye") + masked(1, b"late")))
write("frame_reader", "text-then-close", fr(text + masked(8, (1001).to_bytes(2, "big")), (11,)))
write("frame_reader", "json-16bit-len", fr(masked(1, json.dumps({"type": "publish", "room": "r", "data": "x" * 200}).encode()), (1, 1, 2)))
write("frame_reader", "unmasked", fr(b"\x81\x02hi"))
write("frame_reader", "bad-utf8", fr(masked(1, b"\xff\xfe")))
write("frame_reader", "too-big-frame", fr(b"\x82\xfe\x40\x01" + b"\x00" * 4 + b"\x00" * 64))

# ws_json: one client message per file.
msgs = {
    "join": {"type": "join", "room": "lobby"},
    "leave": {"type": "leave", "room": "a.b:c-d_e"},
    "publish": {"type": "publish", "room": "r1", "data": {"text": "hi", "n": [1, 2.5, None, True]}},
    "publish-string": {"type": "publish", "room": "r1", "data": "caf\u00e9 \u2603 \"quoted\""},
    "direct": {"type": "direct", "to": "user_42", "data": {"k": "v"}},
    "echo": {"type": "echo", "data": [1, {"a": {}}]},
    "echo-null": {"type": "echo"},
    "ping": {"type": "ping", "id": 7},
    "ping-obj": {"type": "ping", "id": {"seq": 1, "t": "x"}},
    "unknown": {"type": "dance"},
    "extra-field": {"room": "r", "type": "join", "x": [1]},
}
for name, m in msgs.items():
    write("ws_json", name, json.dumps(m, ensure_ascii=False).encode())
write("ws_json", "escaped-room", br'{"type":"join","room":"\u0072oom"}')
write("ws_json", "escaped-type", br'{"type":"p\u0075blish","room":"r","data":"\ud83d\ude00"}')

# deflate: [offer length][offer][chunk count-1][chunk sizes-1...][stream]


def raw_deflate(data):
    import zlib
    z = zlib.compressobj(1, zlib.DEFLATED, -15)
    out = z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)
    return out[:-4]  # RFC 7692 removes the empty block's 00 00 ff ff


def compressed(opcode, payload, fin=True):
    f = bytearray(masked(opcode, payload, fin))
    f[0] |= 0x40
    return bytes(f)


def dfl(offer, stream, sizes=()):
    o = offer.encode()
    return bytes([len(o)]) + o + bytes([len(sizes)]) + bytes(s - 1 for s in sizes) + stream


hello = raw_deflate(b"hello hello hello hello")
write("deflate", "one-message", dfl("permessage-deflate; client_max_window_bits", compressed(1, hello)))
half = len(hello) // 2
frag = compressed(1, hello[:half], fin=False) + masked(9, b"p") + masked(0, hello[half:])
write("deflate", "fragmented-with-ping", dfl("permessage-deflate; server_max_window_bits=10", frag, (9, 3)))
write("deflate", "plain-and-compressed", dfl("permessage-deflate", masked(2, b"plain") + compressed(2, raw_deflate(bytes(300)))))
write("deflate", "bomb", dfl("permessage-deflate", compressed(2, raw_deflate(bytes(1 << 20)))))
write("deflate", "corrupt", dfl("x, permessage-deflate; foo", compressed(1, b"\xff\xff\xff")))
write("deflate", "bad-offer", dfl('permessage-deflate; server_max_window_bits="8"; client_no_context_takeover', b""))
