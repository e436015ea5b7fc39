#!/usr/bin/env python3
"""Instructions per request of `keyward serve`, counted by valgrind's
callgrind (stable on a noisy machine, unlike throughput).

    bench/callgrind.py BINARY [N]

Starts BINARY `serve` on a fresh SQLite database (JSON logs at info, an audit
file, no rate limit) under `valgrind --tool=callgrind`, creates a tenant and
an encryption, warms up, zeroes the counters, then sends N (default 2000)
sequential keep-alive requests of each kind (encrypt and decrypt of 64 B and
1 KiB) and prints the whole process's instructions per request: the request
path, the audit writer and the table task included. Needs valgrind.
"""
import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def counted(out_dir):
    """Total instructions in the newest dump."""
    dumps = sorted((os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.startswith("cg.out")),
                   key=os.path.getmtime)
    total = 0
    with open(dumps[-1]) as f:
        for line in f:
            if line.startswith("summary:") or line.startswith("totals:"):
                total = int(line.split()[1])
    for d in dumps:
        os.remove(d)
    return total


def main():
    binary = os.path.abspath(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    d = tempfile.mkdtemp(prefix="kw-callgrind-")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    env.update(KEYWARD_DATABASE_URL=f"sqlite://{d}/k.db",
               KEYWARD_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
               KEYWARD_LISTEN=f"127.0.0.1:{port}", KEYWARD_RATE_LIMIT="0",
               KEYWARD_AUDIT_FILE=f"{d}/audit.jsonl")
    subprocess.run([binary, "migrate"], env=env, check=True, capture_output=True)
    creds = json.loads(subprocess.run([binary, "tenant", "create", "bench", "--json"], env=env, check=True,
                                      capture_output=True, text=True).stdout)
    headers = {"X-Api-Key": creds["apiKey"], "X-Api-Secret": creds["apiSecret"],
               "Content-Type": "application/json"}
    log = open(f"{d}/server.log", "w")
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={d}/cg.out.%p",
                             binary, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.time() + 120
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                conn.request("GET", "/healthz")
                conn.getresponse().read()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"server did not start; see {d}/server.log")
                time.sleep(0.5)

        def call(path, body):
            conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
            r = conn.getresponse()
            raw = r.read()
            if r.status not in (200, 201):
                raise RuntimeError(f"{path}: {r.status} {raw[:200]!r}")
            return json.loads(raw)

        enc = call("/v1/encryptions", {})["encryptionId"]
        print(f"{os.path.basename(binary)}: instructions per request ({n} requests each)")
        for size in (64, 1024):
            encrypt = {"encryptionId": enc, "data": "a" * size}
            out = call("/v1/encrypt", encrypt)
            decrypt = {k: out[k] for k in ("encryptionId", "cipherText", "encryptionVersionId", "metadata")}
            for op, body in (("encrypt", encrypt), ("decrypt", decrypt)):
                for _ in range(200):
                    call(f"/v1/{op}", body)
                time.sleep(0.3)
                subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
                for _ in range(n):
                    call(f"/v1/{op}", body)
                time.sleep(0.3)  # let the audit writer finish
                subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
                time.sleep(0.5)
                print(f"  {op} {size} B: {counted(d) / n:,.0f}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        subprocess.run(["rm", "-rf", d])


if __name__ == "__main__":
    main()
