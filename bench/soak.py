#!/usr/bin/env python3
"""Soak: mixed traffic at 32 connections for a long time, and nothing grows.

Runs a real `keyward serve` (release build) and drives, each on its own
keep-alive connection:

  16  encrypt then decrypt of the answer (1 KiB), checking the plaintext
   6  batch encrypt then batch decrypt (100 items of 64 B)
   2  rotations (each every 5 s, of one of four encryptions)
   2  re-encryption jobs over a SQLite platform table (2,000 rows; one
      job after another, each waited for)
   4  audit reads (`GET /v1/audit`, 100 records)
   2  management reads (list encryptions, one with its versions, its indexes)

and samples, every few seconds: the server's RSS, its open file
descriptors, the audit queue and the audit table's backlog (`/metrics`
gauges) and the database's size (SQLite's file with its WAL, or
`pg_database_size`). After the warm-up each must stay flat: the median of
the last fifth of the samples against the median of the first fifth after
the warm-up (RSS: at most 10 % or 8 MiB more; descriptors: at most 8 more;
database: at most 10 % or 4 MiB more; the audit queue and backlog: below
1 MiB in every sample). Any error a client sees fails the run.

The database keeps two minutes of audit records (`audit_retention=120s`; a
fifth of the run when that is shorter) and the audit file rotates at 64 MiB,
so that both prune and rotate during the run: with the default 400 days the
audit table grows with every call by design (docs/audit.md), and a flat
database would prove nothing. The warm-up (excluded from the verdict) is
the first half of the run, and at least one and a half retentions, so that
pruning has caught up and what fills with use up to a bound has filled:
SQLite's page cache (2 MiB per pooled connection, 20 MiB at the defaults,
filled as the database is read), the key ring's versions, the allocator's
arenas. Over the second half nothing may grow.

    bench/soak                      # 10 minutes on SQLite
    bench/soak --minutes 30 --postgres
    bench/soak --minutes 1          # a quick look (warm-up 20 s)

Prints a table of the samples and a verdict; exits 1 when anything grew or
any request failed. Record a run in docs/reliability.md ("Soak").
"""
import argparse, base64, http.client, json, os, random, sqlite3, subprocess, sys, tempfile, threading, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from faults import Client, Server, Stats, TARGET, psql  # noqa: E402

MIB = 1 << 20


def proc_status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def gauges(server):
    """The audit gauges from /metrics."""
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    want = {"keyward_audit_queue_bytes": 0.0, "keyward_audit_table_backlog_bytes": 0.0}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in want:
            want[name] = float(value)
    return want


class Soak:
    def __init__(self, args):
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="keyward-soak-")
        self.platform = os.path.join(self.dir, "platform.db")
        sources = os.path.join(self.dir, "sources.toml")
        with open(sources, "w") as f:
            f.write(f'[sources.platform]\ndatabase_url = "sqlite://{self.platform}"\ntenants = ["soak"]\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
        env.update(KEYWARD_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(), KEYWARD_LOG_LEVEL="warn",
                   KEYWARD_RATE_LIMIT="0", KEYWARD_AUDIT_FILE=os.path.join(self.dir, "audit.jsonl"),
                   KEYWARD_AUDIT_RETENTION=f"{args.audit_retention:.0f}s",
                   KEYWARD_AUDIT_FILE_MAX_BYTES=str(64 * MIB),
                   KEYWARD_JOB_SOURCES_FILE=sources)
        if args.postgres:
            admin = os.environ["KEYWARD_FAULTS_DATABASE_URL"]
            self.pg_db = f"soak_{os.getpid()}"
            psql(admin, f"CREATE DATABASE {self.pg_db}")
            self.pg_admin = admin
            env["KEYWARD_DATABASE_URL"] = admin.rsplit("/", 1)[0] + "/" + self.pg_db
        else:
            self.db_path = os.path.join(self.dir, "keyward.db")
            env["KEYWARD_DATABASE_URL"] = f"sqlite://{self.db_path}"
        self.server = Server(args.binary, env, os.path.join(self.dir, "server.log"))
        self.stats = Stats()
        self.stop = threading.Event()
        self.counts = {}
        self.count_lock = threading.Lock()

    def db_size(self):
        if self.args.postgres:
            out = subprocess.run(["psql", self.pg_admin, "-tAc", f"SELECT pg_database_size('{self.pg_db}')"],
                                 capture_output=True, text=True, check=True).stdout
            return int(out.strip())
        return sum(os.path.getsize(self.db_path + s) for s in ("", "-wal", "-shm")
                   if os.path.exists(self.db_path + s))

    def done(self, what, n=1):
        with self.count_lock:
            self.counts[what] = self.counts.get(what, 0) + n

    def client(self):
        return Client(self.server, self.creds, self.stats)

    # The workers: each loops until the end on its own connection.

    def encrypter(self):
        c = self.client()
        while not self.stop.is_set():
            plain = base64.b64encode(os.urandom(768)).decode()  # 1 KiB of text
            doc = c.call("POST", "/v1/encrypt", {"encryptionId": random.choice(self.encs), "data": plain})
            if doc is None:
                continue
            got = c.call("POST", "/v1/decrypt", {k: doc[k] for k in
                                                 ("encryptionId", "cipherText", "encryptionVersionId", "metadata")})
            if got is not None and got.get("data") != plain:
                self.stats.broke("200 that lied: decrypt answered another plaintext")
            self.done("encrypt+decrypt")

    def batcher(self):
        c = self.client()
        while not self.stop.is_set():
            enc = random.choice(self.encs)
            plains = [base64.b64encode(os.urandom(48)).decode() for _ in range(100)]
            doc = c.call("POST", "/v1/encrypt/batch",
                         {"items": [{"encryptionId": enc, "data": p} for p in plains]})
            if doc is None:
                continue
            items = [{k: r[k] for k in ("cipherText", "encryptionVersionId", "metadata")} | {"encryptionId": enc}
                     for r in doc["results"]]
            got = c.call("POST", "/v1/decrypt/batch", {"items": items})
            if got is not None and [r.get("data") for r in got["results"]] != plains:
                self.stats.broke("200 that lied: a batch decrypt answered other plaintexts")
            self.done("batch items", 100)

    def rotator(self):
        c = self.client()
        while not self.stop.wait(5):
            if c.call("POST", "/v1/rotate", {"encryptionId": random.choice(self.encs)}) is not None:
                self.done("rotate")

    def jobs(self, table):
        c = self.client()
        db = sqlite3.connect(self.platform, timeout=30)
        db.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, cipher_text TEXT NOT NULL, "
                   "version TEXT NOT NULL, metadata TEXT NOT NULL)")
        enc = self.encs[0]
        plains = {}
        for start in range(0, 2000, 500):
            items = [{"encryptionId": enc, "data": f"{table}-{i}"} for i in range(start, start + 500)]
            res = c.call("POST", "/v1/encrypt/batch", {"items": items})["results"]
            for i, r in zip(range(start, start + 500), res):
                plains[i] = f"{table}-{i}"
                db.execute(f"INSERT INTO {table} VALUES (?, ?, ?, ?)",
                           (i, r["cipherText"], r["encryptionVersionId"], json.dumps(r["metadata"])))
        db.commit()
        source = {"name": "platform", "table": table, "keyColumn": "id", "cipherTextColumn": "cipher_text",
                  "versionColumn": "version", "metadataColumn": "metadata"}
        while not self.stop.is_set():
            c.call("POST", "/v1/rotate", {"encryptionId": enc})
            job = c.call("POST", "/v1/jobs", {"kind": "reencrypt", "encryptionId": enc, "source": source})
            if job is None:
                self.stop.wait(1)
                continue
            while not self.stop.is_set():
                j = c.call("GET", f"/v1/jobs/{job['jobId']}")
                if j and j["state"] in ("succeeded", "failed", "cancelled"):
                    if j["state"] != "succeeded":
                        self.stats.broke(f"a job ended {j['state']}: {j.get('error')}")
                    else:
                        self.done("job rows", j.get("rewrapped", 0))
                    break
                self.stop.wait(0.5)
            self.stop.wait(5)
        # The table still decrypts, row for row.
        rows = db.execute(f"SELECT id, cipher_text, version, metadata FROM {table}").fetchall()
        for start in range(0, len(rows), 500):
            chunk = rows[start:start + 500]
            got = c.call("POST", "/v1/decrypt/batch", {"items": [
                {"encryptionId": enc, "cipherText": ct, "encryptionVersionId": v, "metadata": json.loads(m)}
                for _, ct, v, m in chunk]})
            if got is None:
                continue
            for (i, *_), r in zip(chunk, got["results"]):
                if r.get("data") != plains[i]:
                    self.stats.broke(f"lost: platform row {i} of {table}")

    def auditor(self):
        c = self.client()
        while not self.stop.wait(0.2):
            if c.call("GET", "/v1/audit?limit=100") is not None:
                self.done("audit reads")

    def manager(self):
        c = self.client()
        while not self.stop.wait(0.1):
            enc = random.choice(self.encs)
            ok = (c.call("GET", "/v1/encryptions?limit=20") is not None
                  and c.call("GET", f"/v1/encryptions/{enc}") is not None
                  and c.call("GET", f"/v1/encryptions/{enc}/indexes") is not None)
            if ok:
                self.done("management reads", 3)

    def sample(self, started):
        pid = self.server.proc.pid
        g = gauges(self.server)
        return dict(t=time.time() - started, rss=proc_status(pid, "VmRSS"), hwm=proc_status(pid, "VmHWM"),
                    fds=open_fds(pid), queue=g["keyward_audit_queue_bytes"],
                    backlog=g["keyward_audit_table_backlog_bytes"], db=self.db_size())

    def run(self):
        a = self.args
        self.server.start()
        self.creds = self.server.cli("tenant", "create", "soak", "--json")
        c = self.client()
        self.encs = [c.call("POST", "/v1/encryptions", {})["encryptionId"] for _ in range(4)]
        workers = ([self.encrypter] * 16 + [self.batcher] * 6 + [self.rotator] * 2
                   + [lambda: self.jobs("rows_a"), lambda: self.jobs("rows_b")]
                   + [self.auditor] * 4 + [self.manager] * 2)
        assert len(workers) == a.connections == 32, "the mix above is for 32 connections"
        threads = [threading.Thread(target=w, daemon=True) for w in workers]
        started = time.time()
        for t in threads:
            t.start()
        samples = []
        end = started + a.minutes * 60
        print(f"{'s':>6} {'RSS MiB':>8} {'peak MiB':>8} {'fds':>5} {'queue KiB':>9} {'backlog KiB':>11} "
              f"{'db MiB':>7}  done so far", flush=True)
        while time.time() < end:
            time.sleep(min(a.sample, max(0.0, end - time.time())))
            if self.server.proc.poll() is not None:
                self.stats.broke(f"the server exited with {self.server.proc.returncode}")
                break
            s = self.sample(started)
            samples.append(s)
            with self.count_lock:
                done = ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
            print(f"{s['t']:6.0f} {s['rss'] / MIB:8.1f} {s['hwm'] / MIB:8.1f} {s['fds']:5d} "
                  f"{s['queue'] / 1024:9.1f} {s['backlog'] / 1024:11.1f} {s['db'] / MIB:7.2f}  {done}", flush=True)
        self.stop.set()
        for t in threads:
            t.join(timeout=60)
        alive = self.server.proc.poll() is None
        self.server.stop()
        return samples, alive


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def verdict(samples, warmup, stats, counts, alive):
    problems = []
    after = [s for s in samples if s["t"] >= warmup]
    if len(after) < 10:
        problems.append(f"only {len(after)} samples after the warm-up: run longer")
        return problems
    fifth = max(2, len(after) // 5)
    first, last = after[:fifth], after[-fifth:]

    def grew(key, rel, absolute, unit, scale):
        a, b = median([s[key] for s in first]), median([s[key] for s in last])
        allowed = max(a * rel, absolute)
        line = f"{key}: {a / scale:.1f} -> {b / scale:.1f} {unit} (allowed growth {allowed / scale:.1f})"
        print("  " + line)
        if b - a > allowed:
            problems.append("grew: " + line)

    print("after the warm-up (median of the first fifth -> of the last fifth):")
    grew("rss", 0.10, 8 * MIB, "MiB", MIB)
    grew("fds", 0.0, 8, "descriptors", 1)
    grew("db", 0.10, 4 * MIB, "MiB", MIB)
    for key in ("queue", "backlog"):
        worst = max(s[key] for s in after)
        print(f"  {key}: at most {worst / 1024:.1f} KiB")
        if worst > MIB:
            problems.append(f"the audit {key} reached {worst / MIB:.1f} MiB")
    if not alive:
        problems.append("the server died")
    if stats.errors or stats.bad:
        problems.append(f"clients saw errors: {stats.errors}; {stats.bad[:5]}")
    for what in ("encrypt+decrypt", "batch items", "rotate", "job rows", "audit reads", "management reads"):
        if not counts.get(what):
            problems.append(f"no {what} completed: the mix did not run")
    return problems


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--warmup", type=float, help="seconds excluded from the verdict (default: half the run, at least 1.5 audit retentions)")
    p.add_argument("--sample", type=float, default=5, help="seconds between samples")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--postgres", action="store_true", help="on PostgreSQL (bench/soak starts a cluster)")
    p.add_argument("--debug", action="store_true", help="the debug build instead of the release build")
    p.add_argument("--binary", help="this keyward binary instead of the build's")
    args = p.parse_args()
    args.binary = args.binary or os.path.join(TARGET, "debug" if args.debug else "release", "keyward")
    args.audit_retention = max(10.0, min(120.0, args.minutes * 60 / 5))
    warmup = args.warmup if args.warmup is not None else max(20.0, 1.5 * args.audit_retention,
                                                             args.minutes * 60 / 2)
    args.sample = min(args.sample, max(1.0, args.minutes * 60 / 30))
    soak = Soak(args)
    samples, alive = soak.run()
    print(f"\n{args.minutes:g} minutes on {'PostgreSQL' if args.postgres else 'SQLite'}, "
          f"{args.connections} connections, warm-up {warmup:.0f} s; completed: "
          + ", ".join(f"{k} {v}" for k, v in sorted(soak.counts.items())))
    problems = verdict(samples, warmup, soak.stats, soak.counts, alive)
    peak = max((s["hwm"] for s in samples), default=0)
    print(f"peak RSS {peak / MIB:.1f} MiB; errors seen by clients: {soak.stats.errors or 'none'}")
    if problems:
        print("\nFAILED:", file=sys.stderr)
        for pr in problems:
            print(f"  {pr}", file=sys.stderr)
        print(f"server log: {soak.server.log_path}", file=sys.stderr)
        sys.exit(1)
    print("flat: nothing grew after the warm-up, no request failed")


if __name__ == "__main__":
    main()
