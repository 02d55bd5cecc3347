"""What the Python checks share: the ringside binary, pass/fail bookkeeping, and starting a node.

A started node's stderr is read to the end by a thread: ringside logs to stderr, and a pipe
nobody reads fills up and blocks the node mid-test.
"""
import os
import re
import subprocess
import threading

BIN = os.environ.get("RINGSIDE_BIN", os.path.join(os.path.dirname(__file__), "..", "..", "target", "debug", "ringside"))
RESULTS = []


def check(name, ok, detail=""):
    RESULTS.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else ': ' + str(detail)}", flush=True)


def start_node(*args, shards=2):
    """`ringside --listen 127.0.0.1:0 --shards N` with client-chosen ids; (process, "host:port")."""
    p = subprocess.Popen([BIN, "--listen", "127.0.0.1:0", "--shards", str(shards), "--set", "auth.allow_client_ids=true",
                          *args], stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        m = re.search(r"listening on (\S+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p, m.group(1)
    raise RuntimeError("ringside did not start")


def summary():
    """Prints "N passed, N failed"; the exit status."""
    failed = RESULTS.count(False)
    print(f"{len(RESULTS) - failed} passed, {failed} failed")
    return 1 if failed or not RESULTS else 0
