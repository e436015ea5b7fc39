#!/usr/bin/env python3
"""Measures a re-encryption job's rows per second on local PostgreSQL.

Starts the release `keyward serve` on a fresh database, fills a platform table
with N rows of ~1 KiB ciphertexts (through /v1/encrypt/batch), rotates, runs a
job over the table and prints the rate. Needs a PostgreSQL server URL in
KEYWARD_TEST_DATABASE_URL (scripts/postgres.sh starts one) and `psql`.

    cargo build --release && python3 bench/reencrypt.py [ROWS]
"""
import base64, json, os, subprocess, sys, tempfile, time, urllib.request, uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/keyward/target"))
BIN = os.path.join(TARGET, "release", "keyward")
ADMIN = os.environ["KEYWARD_TEST_DATABASE_URL"]
ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
BASE = ADMIN.rsplit("/", 1)[0]


def psql(url, sql, stdin=None):
    subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", url, "-c", sql], check=True, input=stdin, text=True,
                   stdout=subprocess.DEVNULL)


def call(base, creds, method, path, body=None):
    req = urllib.request.Request(base + path, method=method, data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json", "X-Api-Key": creds["apiKey"],
                                          "X-Api-Secret": creds["apiSecret"]})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def main():
    suffix = uuid.uuid4().hex[:8]
    kw_db, pf_db = f"bench_keyward_{suffix}", f"bench_platform_{suffix}"
    for db in (kw_db, pf_db):
        psql(ADMIN, f"CREATE DATABASE {db}")
    kw_url, pf_url = f"{BASE}/{kw_db}", f"{BASE}/{pf_db}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    env.update(KEYWARD_DATABASE_URL=kw_url, KEYWARD_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
               KEYWARD_LISTEN="127.0.0.1:0", KEYWARD_LOG_LEVEL="warn,keyward=info")
    log = tempfile.TemporaryFile(mode="w+")
    # Audit records (one per call, as in production) go to a file, not the terminal.
    audit = tempfile.NamedTemporaryFile(prefix="keyward-bench-audit-", suffix=".jsonl")
    env["KEYWARD_AUDIT_FILE"] = audit.name
    # The platform database is a job source the operator grants to the tenant `bench`.
    sources = tempfile.NamedTemporaryFile(mode="w", prefix="keyward-bench-sources-", suffix=".toml")
    sources.write(f'[sources.bench]\ndatabase_url = "{pf_url}"\ntenants = ["bench"]\n')
    sources.flush()
    env["KEYWARD_JOB_SOURCES_FILE"] = sources.name
    server = subprocess.Popen([BIN, "serve"], env=env, stderr=log, stdout=subprocess.DEVNULL)
    try:
        addr = None
        for _ in range(200):
            log.seek(0)
            for line in log:
                if '"listening"' in line:
                    addr = json.loads(line)["addr"]
            if addr:
                break
            time.sleep(0.05)
        base = f"http://{addr}"
        creds = json.loads(subprocess.run([BIN, "tenant", "create", "bench", "--json"], env=env, check=True,
                                          capture_output=True, text=True).stdout)
        enc = call(base, creds, "POST", "/v1/encryptions", {})["encryptionId"]
        psql(pf_url, "CREATE TABLE secrets (id BIGINT PRIMARY KEY, cipher_text TEXT NOT NULL, version TEXT NOT NULL, metadata TEXT NOT NULL)")
        data = "d" * 700  # ~1 KiB of base64 ciphertext per row
        lines = []
        t = time.time()
        for start in range(0, ROWS, 1000):
            items = [{"encryptionId": enc, "data": data} for _ in range(start, min(start + 1000, ROWS))]
            for i, r in enumerate(call(base, creds, "POST", "/v1/encrypt/batch", {"items": items})["results"]):
                lines.append(f"{start + i}\t{r['cipherText']}\t{r['encryptionVersionId']}\t{json.dumps(r['metadata'])}")
        psql(pf_url, "\\copy secrets FROM STDIN", stdin="\n".join(lines) + "\n")
        fill = time.time() - t
        call(base, creds, "POST", "/v1/rotate", {"encryptionId": enc})
        source = {"name": "bench", "table": "secrets", "keyColumn": "id", "cipherTextColumn": "cipher_text",
                  "versionColumn": "version", "metadataColumn": "metadata"}
        t = time.time()
        job = call(base, creds, "POST", "/v1/jobs", {"kind": "reencrypt", "encryptionId": enc, "source": source})["jobId"]
        while True:
            j = call(base, creds, "GET", f"/v1/jobs/{job}")
            if j["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.1)
        elapsed = time.time() - t
        print(f"fill: {ROWS} rows encrypted in batches in {fill:.1f} s ({ROWS / fill:.0f} rows/s)")
        print(f"job: {j['state']}, {j['rewrapped']} rows re-encrypted in {elapsed:.1f} s = {ROWS / elapsed:.0f} rows/s "
              f"(job's own rate {j['rowsPerSecond']} rows/s), left on old versions: {j['remainingByVersion']}")
    finally:
        server.terminate()
        server.wait()
        for db in (kw_db, pf_db):
            psql(ADMIN, f"DROP DATABASE IF EXISTS {db}")


if __name__ == "__main__":
    main()
