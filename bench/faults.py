#!/usr/bin/env python3
"""Fault injection with a count: nothing acknowledged is ever lost.

Drives encrypt traffic with rotations, management and audit reads against a
real `keyward serve`, records every acknowledged ciphertext with its
plaintext, and injects one fault at a time:

  sqlite-sigkill     SIGKILL of Keyward on SQLite, restart
  postgres-sigkill   SIGKILL of Keyward on PostgreSQL, restart
  postgres-restart   `pg_ctl restart -m fast` under load
  vault-down         OpenBao unreachable (refused, then answering nothing)
                     during traffic and during root-KEK rotations
  aws-kms-down       the same with AWS KMS (moto)
  sqlite-disk-full   the SQLite data folder, the audit file and the server's
                     redirected output on a full tmpfs, then space freed
  job-sigkill        a re-encryption job killed mid-batch while the platform
                     keeps writing its table; restart, the job resumes

After each: every acknowledged ciphertext decrypts to its plaintext (and
every row of the job's table to the platform's last write); every failure a
client saw was a 5xx with an error code (a 503 with Retry-After), never a
500 `internal`, never a hang past the bound, never a 200 that lied; the
write path (rotate, management, the audit table) works again within seconds
of the fault ending and stays working. Prints a table and exits 1 if any
fault lost anything or broke a rule.

Run through bench/faults (which starts PostgreSQL, moto and OpenBao):

    bench/faults            # every fault, 8 s of load around each
    bench/faults --short    # the CI version, 3 s
    bench/faults --only sqlite-disk-full,job-sigkill

Needs root for the tmpfs of sqlite-disk-full (skipped with a note otherwise,
an error with --require-all).
"""
import argparse, base64, ctypes, shlex, http.client, json, os, random, shutil, signal, socket, sqlite3, subprocess, sys
import tempfile, threading, time, urllib.request, uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.expanduser("~/.cache/keyward/target"))

# The longest a request may take before it counts as a hang: the server's
# request_timeout (set to 5 s below) plus slack for this busy machine.
REQUEST_TIMEOUT_S = 5
BOUND_S = REQUEST_TIMEOUT_S + 5
# The fault is over; the write path must work again within this.
RECOVER_BOUND_S = 30


def die_with_parent():
    """In a child before exec: SIGKILL when this script dies, however it dies."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    """One `keyward serve` on a fixed port, restartable, output to a file."""

    def __init__(self, binary, env, log_path):
        self.binary, self.env, self.log_path = binary, env, log_path
        self.port = free_port()
        self.env["KEYWARD_LISTEN"] = f"127.0.0.1:{self.port}"
        self.proc = None
        self.generation = 0
        self.down = False

    def start(self, wait=True):
        self.generation += 1
        out = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.binary, "serve"], env=self.env, stdout=out, stderr=out,
                                     preexec_fn=die_with_parent)
        out.close()
        if wait:
            self.wait_ready()

    def wait_ready(self, limit=60):
        deadline = time.time() + limit
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"keyward exited with {self.proc.returncode}; see {self.log_path}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                c.request("GET", "/readyz")
                r = c.getresponse()
                r.read()
                c.close()
                if r.status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"keyward not ready in {limit} s; see {self.log_path}")

    def sigkill(self):
        self.down = True
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cli(self, *args):
        r = subprocess.run([self.binary, *args], env=self.env, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"keyward {' '.join(args)}: {r.stderr}")
        return json.loads(r.stdout)


class Forwarder:
    """A TCP forwarder in front of a master-key provider that can refuse
    connections (the provider is down) or accept and never answer (it hangs)."""

    def __init__(self, target_port):
        self.target = target_port
        self.mode = "up"
        self.port = free_port()
        self.lock = threading.Lock()
        self.sock = None
        self.open_listener()
        self.conns = []

    def close_listener(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.sock = None

    def open_listener(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(64)
        threading.Thread(target=self.accept_loop, args=(self.sock,), daemon=True).start()

    def accept_loop(self, sock):
        while True:
            try:
                c, _ = sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(c)
                if self.mode == "hang":
                    continue  # accepted, never answered
            try:
                u = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                c.close()
                continue
            with self.lock:
                self.conns.append(u)
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                    c.close()
                except OSError:
                    pass
            self.conns = []

    def set(self, mode):
        """`up`, `refuse` (nothing listens) or `hang` (accepts, never answers)."""
        if mode == "refuse" and self.sock:
            self.close_listener()
        if mode != "refuse" and self.sock is None:
            self.open_listener()
        with self.lock:
            self.mode = mode
        if mode != "up":
            self.cut()


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.acked = 0
        self.errors = {}  # "503 unavailable" -> count
        self.bad = []  # rule breaks, with what happened
        self.latencies = []  # (time, seconds) of acknowledged encrypts

    def error(self, what):
        with self.lock:
            self.errors[what] = self.errors.get(what, 0) + 1

    def broke(self, what):
        with self.lock:
            self.bad.append(what)
            self.errors[what.split(":")[0]] = self.errors.get(what.split(":")[0], 0) + 1


class Client:
    """A keep-alive HTTP client that classifies every answer by the rules."""

    def __init__(self, server, creds, stats):
        self.server, self.creds, self.stats = server, creds, stats
        self.conn, self.gen = None, 0

    def call(self, method, path, body=None, expect=(200, 201, 202), allowed_4xx=()):
        """The JSON of a success, or None after counting the failure."""
        started = time.time()
        opened_before = self.conn is not None and self.gen != self.server.generation
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=BOUND_S)
                self.gen = self.server.generation
            headers = {"X-Api-Key": self.creds["apiKey"], "X-Api-Secret": self.creds["apiSecret"],
                       "Content-Type": "application/json"}
            self.conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
            r = self.conn.getresponse()
            raw = r.read()
        except (socket.timeout, TimeoutError):
            self.close()
            self.stats.broke(f"hang: {method} {path} unanswered after {time.time() - started:.1f} s")
            return None
        except (OSError, http.client.HTTPException) as e:
            self.close()
            if self.server.down or opened_before:
                self.stats.error("connection refused/reset (server down)")
            else:
                self.stats.broke(f"connection error while the server was up: {method} {path}: {e!r}")
            return None
        elapsed = time.time() - started
        if elapsed > BOUND_S:
            self.stats.broke(f"hang: {method} {path} took {elapsed:.1f} s")
        try:
            doc = json.loads(raw) if raw else {}
        except ValueError:
            doc = None
        if r.status in expect:
            if doc is None:
                self.stats.broke(f"200 that lied: {method} {path} answered {r.status} with a body that is not JSON")
                return None
            return doc
        code = (doc or {}).get("error", {}).get("code") if isinstance(doc, dict) else None
        if r.status >= 500:
            if code is None:
                self.stats.broke(f"{r.status} without an error code: {method} {path}")
            elif code == "internal" or r.status == 500:
                self.stats.broke(f"{r.status} {code}: {method} {path}")
            elif r.status == 503 and not r.getheader("Retry-After"):
                self.stats.broke(f"503 {code} without Retry-After: {method} {path}")
            else:
                self.stats.error(f"{r.status} {code}")
            return None
        if code in allowed_4xx:
            self.stats.error(f"{r.status} {code}")
            return None
        self.stats.broke(f"unexpected {r.status} {code}: {method} {path}")
        return None

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Load:
    """Encrypt workers, a decrypting checker, a rotator and a manager."""

    def __init__(self, server, creds, encryptions, stats, ledger, workers=3):
        self.server, self.creds, self.encs, self.stats, self.ledger = server, creds, encryptions, stats, ledger
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=self.encrypter, daemon=True) for _ in range(workers)]
        self.threads += [threading.Thread(target=f, daemon=True) for f in (self.rotator, self.manager, self.checker)]

    def start(self):
        for t in self.threads:
            t.start()

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=BOUND_S + 5)

    def encrypter(self):
        c = Client(self.server, self.creds, self.stats)
        while not self.stop_flag.is_set():
            enc = random.choice(self.encs)
            plain = f"p-{uuid.uuid4()}"
            t = time.time()
            doc = c.call("POST", "/v1/encrypt", {"encryptionId": enc, "data": plain})
            if doc is None:
                time.sleep(0.05)
                continue
            if not doc.get("cipherText") or doc.get("encryptionId") != enc:
                self.stats.broke(f"200 that lied: encrypt answered {sorted(doc)}")
                continue
            with self.stats.lock:
                self.stats.acked += 1
                self.stats.latencies.append((time.time(), time.time() - t))
            self.ledger.append((plain, doc))

    def rotator(self):
        c = Client(self.server, self.creds, self.stats)
        while not self.stop_flag.is_set():
            doc = c.call("POST", "/v1/rotate", {"encryptionId": random.choice(self.encs)})
            if doc is not None:
                with self.stats.lock:
                    self.stats.acked += 1
            time.sleep(0.2)

    def manager(self):
        c = Client(self.server, self.creds, self.stats)
        i = 0
        while not self.stop_flag.is_set():
            i += 1
            path = f"/v1/encryptions/{random.choice(self.encs)}" if i % 2 else "/v1/audit?limit=5"
            if c.call("GET", path) is not None:
                with self.stats.lock:
                    self.stats.acked += 1
            time.sleep(0.2)

    def checker(self):
        """Decrypts recent acknowledged ciphertexts while the faults happen."""
        c = Client(self.server, self.creds, self.stats)
        while not self.stop_flag.is_set():
            if not self.ledger:
                time.sleep(0.1)
                continue
            plain, doc = self.ledger[-1 - random.randrange(min(len(self.ledger), 50))]
            got = c.call("POST", "/v1/decrypt", decrypt_item(doc))
            if got is not None and got.get("data") != plain:
                self.stats.broke("200 that lied: a decrypt answered another plaintext")
            time.sleep(0.05)


def decrypt_item(doc):
    return {k: doc[k] for k in ("encryptionId", "cipherText", "encryptionVersionId", "metadata")}


def verify_all(server, creds, ledger, stats):
    """Every acknowledged ciphertext decrypts to its plaintext. Returns the
    number lost."""
    c = Client(server, creds, stats)
    lost = 0
    for start in range(0, len(ledger), 500):
        chunk = ledger[start:start + 500]
        for attempt in range(20):
            doc = c.call("POST", "/v1/decrypt/batch", {"items": [decrypt_item(d) for _, d in chunk]})
            if doc is not None:
                break
            time.sleep(0.5)
        else:
            raise RuntimeError("cannot verify: decrypt/batch keeps failing")
        for (plain, _), result in zip(chunk, doc["results"]):
            if result.get("data") != plain:
                lost += 1
                if lost <= 3:
                    stats.broke(f"lost: an acknowledged ciphertext answers {result.get('error', {}).get('code')}")
    return lost


def recover(server, creds, op_creds, stats, encs, since):
    """Seconds from `since` until rotate, management and the audit table all
    work (and root-KEK status answers)."""
    c = Client(server, creds, Stats())  # the probe's own failures are expected
    op = Client(server, op_creds, Stats())
    deadline = since + RECOVER_BOUND_S
    while time.time() < deadline:
        if (c.call("POST", "/v1/rotate", {"encryptionId": encs[0]}) is not None
                and c.call("PATCH", f"/v1/encryptions/{encs[0]}", {"autoRotatePeriod": "720h"}) is not None
                and c.call("GET", "/v1/audit?limit=1") is not None
                and op.call("GET", "/v1/admin/root-kek") is not None):
            return time.time() - since
        time.sleep(0.1)
    stats.broke(f"no recovery: the write path still fails {RECOVER_BOUND_S} s after the fault ended")
    return None


class Run:
    """Everything one fault needs: a data folder, a server, credentials."""

    def __init__(self, args, name, backend, extra_env=None, data_dir=None):
        self.args, self.name = args, name
        self.dir = data_dir or tempfile.mkdtemp(prefix=f"keyward-faults-{name}-")
        env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
        env.update(KEYWARD_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(), KEYWARD_LOG_LEVEL="warn,keyward=info",
                   KEYWARD_RATE_LIMIT="0", KEYWARD_REQUEST_TIMEOUT=f"{REQUEST_TIMEOUT_S}s",
                   KEYWARD_AUDIT_FILE=os.path.join(self.dir, "audit.jsonl"))
        if backend == "sqlite":
            env["KEYWARD_DATABASE_URL"] = f"sqlite://{os.path.join(self.dir, 'keyward.db')}"
        else:
            admin = os.environ["KEYWARD_FAULTS_DATABASE_URL"]
            db = f"faults_{name.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
            psql(admin, f"CREATE DATABASE {db}")
            env["KEYWARD_DATABASE_URL"] = admin.rsplit("/", 1)[0] + "/" + db
        env.update(extra_env or {})
        self.server = Server(args.binary, env, os.path.join(self.dir, "server.log"))
        self.stats = Stats()
        self.ledger = []

    def setup(self, encryptions=3):
        self.server.start()
        self.creds = self.server.cli("tenant", "create", "faults", "--json")
        self.op = self.server.cli("operator-key", "create", "--json")
        c = Client(self.server, self.creds, self.stats)
        self.encs = [c.call("POST", "/v1/encryptions", {})["encryptionId"] for _ in range(encryptions)]

    def load(self):
        return Load(self.server, self.creds, self.encs, self.stats, self.ledger)

    def finish(self, t_recover):
        """Runs load a little longer (it must stay working), verifies, stops."""
        errors_before = sum(self.stats.errors.values())
        load = self.load()
        load.start()
        time.sleep(self.args.seconds / 2)
        load.stop()
        if sum(self.stats.errors.values()) != errors_before:
            self.stats.broke("did not stay working: errors after recovery")
        alive = self.server.proc.poll() is None
        if not alive:
            self.stats.broke(f"the process died (exit status {self.server.proc.returncode})")
        lost = verify_all(self.server, self.creds, self.ledger, self.stats) if alive else len(self.ledger)
        self.server.stop()
        return Result(self.name, self.stats, lost, t_recover)


class Result:
    def __init__(self, name, stats, lost, t_recover, note=""):
        self.name, self.stats, self.lost, self.t_recover, self.note = name, stats, lost, t_recover, note


def psql(url, sql):
    subprocess.run(["psql", "-q", "-v", "ON_ERROR_STOP=1", url, "-c", sql], check=True, capture_output=True)


def around(run, inject, lift):
    """Load, then the fault for a while, then lifted; returns the result."""
    run.setup()
    load = run.load()
    load.start()
    time.sleep(run.args.seconds / 2)
    inject()
    time.sleep(run.args.seconds / 2)
    lifted = time.time()
    lift()
    t = recover(run.server, run.creds, run.op, run.stats, run.encs, lifted)
    load.stop()
    return run.finish(t)


def sigkill(args, backend):
    run = Run(args, f"{backend}-sigkill", backend)

    def inject():
        run.server.sigkill()

    def lift():
        run.server.start(wait=False)
        run.server.wait_ready()
        run.server.down = False

    return around(run, inject, lift)


def postgres_restart(args):
    """`pg_ctl restart -m fast` under load: PostgreSQL down for as long as the
    other faults last (stopped, then started again with its own options)."""
    run = Run(args, "postgres-restart", "postgres")
    data = os.environ["KEYWARD_FAULTS_PG_DATA"]
    pg = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
    pg += [os.path.join(os.environ["KEYWARD_FAULTS_PG_BIN"], "pg_ctl"), "-D", data]
    with open(os.path.join(data, "postmaster.opts")) as f:
        opts = shlex.split(f.read())[1:]
    # The server's own options (port, socket folder, fsync...), without -D.
    i = opts.index("-D")
    opts = opts[:i] + opts[i + 2:]

    def inject():
        subprocess.run(pg + ["stop", "-m", "fast", "-w"], check=True, capture_output=True)

    def lift():
        subprocess.run(pg + ["start", "-w", "-l", os.path.join(os.path.dirname(data), "restart.log"),
                             "-o", shlex.join(opts)], check=True, capture_output=True)

    return around(run, inject, lift)


def provider_down(args, provider):
    if provider == "vault":
        addr = os.environ["KEYWARD_TEST_VAULT_ADDR"]
        key = f"faults-{uuid.uuid4().hex[:8]}"
        r = urllib.request.Request(f"{addr}/v1/transit/keys/{key}", data=b'{"type":"aes256-gcm96"}', method="POST",
                                   headers={"X-Vault-Token": os.environ["KEYWARD_TEST_VAULT_TOKEN"]})
        urllib.request.urlopen(r).read()
        fwd = Forwarder(int(addr.rsplit(":", 1)[1]))
        env = dict(KEYWARD_MASTER_KEY_PROVIDER="vault", KEYWARD_VAULT_ADDR=f"http://127.0.0.1:{fwd.port}",
                   KEYWARD_VAULT_TOKEN=os.environ["KEYWARD_TEST_VAULT_TOKEN"], KEYWARD_VAULT_TRANSIT_KEY=key)
    else:
        url = os.environ["KEYWARD_TEST_MOTO_URL"]
        region = os.environ.get("KEYWARD_TEST_AWS_REGION", "us-east-1")
        auth = (f"AWS4-HMAC-SHA256 Credential=testing/20250101/{region}/kms/aws4_request, "
                f"SignedHeaders=host, Signature=0")
        r = urllib.request.Request(url + "/", data=b'{"Description":"keyward faults"}', method="POST", headers={
            "Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "TrentService.CreateKey",
            "Authorization": auth})
        key = json.loads(urllib.request.urlopen(r).read())["KeyMetadata"]["KeyId"]
        fwd = Forwarder(int(url.rsplit(":", 1)[1]))
        env = dict(KEYWARD_MASTER_KEY_PROVIDER="aws-kms", KEYWARD_AWS_KMS_KEY_ID=key,
                   KEYWARD_AWS_KMS_ENDPOINT=f"http://127.0.0.1:{fwd.port}", AWS_REGION=region,
                   AWS_ACCESS_KEY_ID=os.environ.get("KEYWARD_TEST_AWS_ACCESS_KEY_ID", "testing"),
                   AWS_SECRET_ACCESS_KEY=os.environ.get("KEYWARD_TEST_AWS_SECRET_ACCESS_KEY", "testing"),
                   AWS_EC2_METADATA_DISABLED="true")
    run = Run(args, f"{provider}-down", "sqlite", env)
    run.setup()
    op = Client(run.server, run.op, run.stats)
    load = run.load()
    load.start()
    time.sleep(args.seconds / 4)
    # A root-KEK rotation while the provider is fine, then cut it during the
    # next ones: refused connections, then a provider that never answers.
    if op.call("POST", "/v1/admin/root-kek/rotate", allowed_4xx=("rotation_in_progress",)) is not None:
        run.stats.acked += 1
    for mode in ("refuse", "hang"):
        fwd.set(mode)
        t = time.time()
        if op.call("POST", "/v1/admin/root-kek/rotate", allowed_4xx=("rotation_in_progress",)) is not None:
            run.stats.broke(f"200 that lied: a root-KEK rotation succeeded with the provider {mode}")
        if time.time() - t > BOUND_S:
            run.stats.broke(f"hang: root-KEK rotation with the provider {mode} took {time.time() - t:.1f} s")
        time.sleep(args.seconds / 4)
    lifted = time.time()
    fwd.set("up")
    t_recover = recover(run.server, run.creds, run.op, run.stats, run.encs, lifted)
    # The rotation works again, and the server restarts with the provider.
    deadline = time.time() + RECOVER_BOUND_S
    while time.time() < deadline:
        if op.call("POST", "/v1/admin/root-kek/rotate", allowed_4xx=("rotation_in_progress",)) is not None:
            run.stats.acked += 1
            break
        time.sleep(0.5)
    else:
        run.stats.broke("the root-KEK rotation never worked again after the provider came back")
    load.stop()
    run.server.stop()
    run.server.start()
    return run.finish(t_recover)


def disk_full(args):
    if os.getuid() != 0:
        return None
    mnt = tempfile.mkdtemp(prefix="keyward-faults-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128m", "tmpfs", mnt], check=True)
    try:
        run = Run(args, "sqlite-disk-full", "sqlite", data_dir=mnt)
        filler = os.path.join(mnt, "filler")

        def inject():
            # Unbuffered: every write reaches the file system inside the
            # try, and closing has nothing left to flush onto the full disk.
            with open(filler, "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass

        def lift():
            os.remove(filler)

        return around(run, inject, lift)
    finally:
        # The server's output, as far as it got, for a post-mortem.
        shutil.copy(os.path.join(mnt, "server.log"), os.path.join(tempfile.gettempdir(), "keyward-faults-disk-full.log"))
        subprocess.run(["umount", "-l", mnt], check=False)
        shutil.rmtree(mnt, ignore_errors=True)


def job_sigkill(args):
    """A re-encryption job over a platform table (SQLite) killed mid-batch
    while the platform keeps writing: every row ends readable as the
    platform's last write, and the job finishes after the restart."""
    tmp = tempfile.mkdtemp(prefix="keyward-faults-job-")
    platform = os.path.join(tmp, "platform.db")
    sources = os.path.join(tmp, "sources.toml")
    with open(sources, "w") as f:
        f.write(f'[sources.platform]\ndatabase_url = "sqlite://{platform}"\ntenants = ["faults"]\n')
    run = Run(args, "job-sigkill", "sqlite", dict(KEYWARD_JOB_SOURCES_FILE=sources, KEYWARD_JOB_LEASE="2s",
                                                  KEYWARD_JOB_BATCH_ROWS="50"), data_dir=tmp)
    run.setup(encryptions=1)
    enc = run.encs[0]
    db = sqlite3.connect(platform, timeout=30, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE secrets (id INTEGER PRIMARY KEY, cipher_text TEXT NOT NULL, version TEXT NOT NULL, "
               "metadata TEXT NOT NULL)")
    c = Client(run.server, run.creds, run.stats)
    rows = args.job_rows
    expected = {}
    for start in range(0, rows, 1000):
        items = [{"encryptionId": enc, "data": f"row-{i}-{uuid.uuid4()}"} for i in range(start, min(start + 1000, rows))]
        res = c.call("POST", "/v1/encrypt/batch", {"items": items})["results"]
        for i, (item, r) in enumerate(zip(items, res)):
            expected[start + i] = item["data"]
            db.execute("INSERT INTO secrets VALUES (?, ?, ?, ?)",
                       (start + i, r["cipherText"], r["encryptionVersionId"], json.dumps(r["metadata"])))
    db.commit()
    run.stats.acked += rows
    c.call("POST", "/v1/rotate", {"encryptionId": enc})
    source = {"name": "platform", "table": "secrets", "keyColumn": "id", "cipherTextColumn": "cipher_text",
              "versionColumn": "version", "metadataColumn": "metadata"}
    job = c.call("POST", "/v1/jobs", {"kind": "reencrypt", "encryptionId": enc, "source": source})
    if job is None:
        raise RuntimeError(f"cannot create the job: {run.stats.bad}")
    job = job["jobId"]
    stop = threading.Event()
    lock = threading.Lock()

    def platform_writer():
        w = Client(run.server, run.creds, run.stats)
        conn = sqlite3.connect(platform, timeout=30)
        while not stop.is_set():
            i = random.randrange(rows + 200)
            plain = f"rewritten-{i}-{uuid.uuid4()}"
            doc = w.call("POST", "/v1/encrypt", {"encryptionId": enc, "data": plain})
            if doc is None:
                time.sleep(0.05)
                continue
            with lock:
                conn.execute("INSERT INTO secrets VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                             "cipher_text = excluded.cipher_text, version = excluded.version, "
                             "metadata = excluded.metadata",
                             (i, doc["cipherText"], doc["encryptionVersionId"], json.dumps(doc["metadata"])))
                conn.commit()
                expected[i] = plain
            with run.stats.lock:
                run.stats.acked += 1

    writers = [threading.Thread(target=platform_writer, daemon=True) for _ in range(2)]
    for t in writers:
        t.start()
    # Kill once the job has written some batches, not all.
    deadline = time.time() + 60
    while time.time() < deadline:
        j = c.call("GET", f"/v1/jobs/{job}")
        if j and j.get("rewrapped", 0) > 0:
            break
        time.sleep(0.02)
    progress = j.get("rewrapped", 0) if j else 0
    run.server.sigkill()
    time.sleep(0.5)
    lifted = time.time()
    run.server.start(wait=False)
    run.server.wait_ready()
    run.server.down = False
    t_recover = recover(run.server, run.creds, run.op, run.stats, run.encs, lifted)
    deadline = time.time() + 120
    state = None
    while time.time() < deadline:
        j = c.call("GET", f"/v1/jobs/{job}")
        state = j and j["state"]
        if state in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.2)
    stop.set()
    for t in writers:
        t.join(timeout=BOUND_S + 5)
    note = f"killed at {progress}/{rows} rows; job {state}"
    if state != "succeeded":
        run.stats.broke(f"the job did not finish after the restart: {state}")
    # Every row of the platform's table decrypts to the platform's last write.
    lost = 0
    got = db.execute("SELECT id, cipher_text, version, metadata FROM secrets ORDER BY id").fetchall()
    for start in range(0, len(got), 500):
        chunk = got[start:start + 500]
        doc = c.call("POST", "/v1/decrypt/batch", {"items": [
            {"encryptionId": enc, "cipherText": ct, "encryptionVersionId": v, "metadata": json.loads(m)}
            for _, ct, v, m in chunk]})
        for (i, *_), r in zip(chunk, doc["results"]):
            if r.get("data") != expected.get(i):
                lost += 1
                if lost <= 3:
                    run.stats.broke(f"lost: platform row {i} answers {r.get('error', {}).get('code') or 'another plaintext'}")
    lost += len(set(expected) - {i for i, *_ in got})
    run.server.stop()
    return Result("job-sigkill", run.stats, lost, t_recover, note)


def writers(args, backend):
    """Not a fault but the load that made SQLite answer `database is locked`:
    concurrent writers (rotations, key creations and policy changes, API-key
    creations, the audit table, job bookkeeping) beside encrypt traffic. Every
    write must queue and succeed; prints rotations per second."""
    run = Run(args, f"writers-{backend}", backend)
    run.setup()
    stats, encs = run.stats, run.encs
    stop = threading.Event()
    rotations = [0]

    def rotator():
        c = Client(run.server, run.creds, stats)
        while not stop.is_set():
            if c.call("POST", "/v1/rotate", {"encryptionId": random.choice(encs)}) is not None:
                with stats.lock:
                    stats.acked += 1
                    rotations[0] += 1

    def manager():
        c = Client(run.server, run.creds, stats)
        op = Client(run.server, run.op, stats)
        i = 0
        while not stop.is_set():
            i += 1
            calls = [lambda: c.call("POST", "/v1/encryptions", {}),
                     lambda: c.call("PATCH", f"/v1/encryptions/{random.choice(encs)}",
                                    {"autoRotatePeriod": f"{random.randrange(1, 999)}h"}),
                     lambda: c.call("POST", "/v1/api-keys", {"scopes": ["encrypt"]}, allowed_4xx=("api_key_limit_reached",)),
                     lambda: c.call("GET", "/v1/audit?limit=20"),
                     lambda: op.call("GET", "/v1/tenants"),
                     lambda: c.call("GET", "/v1/jobs")]
            if calls[i % len(calls)]() is not None:
                with stats.lock:
                    stats.acked += 1

    load = Load(run.server, run.creds, encs, stats, run.ledger, workers=4)
    threads = [threading.Thread(target=rotator, daemon=True) for _ in range(args.rotators)]
    threads += [threading.Thread(target=manager, daemon=True) for _ in range(2)]
    load.start()
    started = time.time()
    for t in threads:
        t.start()
    time.sleep(args.seconds * 2)
    stop.set()
    for t in threads:
        t.join(timeout=BOUND_S + 5)
    elapsed = time.time() - started
    load.stop()
    enc_rate = len(run.ledger) / elapsed
    result = run.finish(0.0)
    result.note = f"{rotations[0] / elapsed:.0f} rotations/s beside {enc_rate:.0f} encrypts/s"
    return result


FAULTS = {
    "writers-sqlite": lambda a: writers(a, "sqlite"),
    "writers-postgres": lambda a: writers(a, "postgres"),
    "sqlite-sigkill": lambda a: sigkill(a, "sqlite"),
    "postgres-sigkill": lambda a: sigkill(a, "postgres"),
    "postgres-restart": postgres_restart,
    "vault-down": lambda a: provider_down(a, "vault"),
    "aws-kms-down": lambda a: provider_down(a, "aws-kms"),
    "sqlite-disk-full": disk_full,
    "job-sigkill": job_sigkill,
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help="the CI version: 3 s of load around each fault")
    p.add_argument("--seconds", type=float, default=8, help="seconds of load around each fault")
    p.add_argument("--only", help="comma-separated faults to run")
    p.add_argument("--rotators", type=int, default=8, help="concurrent rotating clients in the writers runs")
    p.add_argument("--release", action="store_true", help="the release build (for recorded figures)")
    p.add_argument("--require-all", action="store_true", help="fail when a fault cannot run here")
    args = p.parse_args()
    if args.short:
        args.seconds = 3
    args.job_rows = 1000 if args.short else 5000
    args.binary = os.path.join(TARGET, "release" if args.release else "debug", "keyward")
    names = args.only.split(",") if args.only else list(FAULTS)
    results, failed = [], False
    for name in names:
        print(f"==> {name}", file=sys.stderr, flush=True)
        try:
            r = FAULTS[name](args)
        except Exception as e:  # a harness or server failure fails the run
            print(f"{name}: {e!r}", file=sys.stderr)
            failed = True
            continue
        if r is None:
            print(f"{name}: skipped (needs root to mount a tmpfs)", file=sys.stderr)
            failed |= args.require_all
            continue
        results.append(r)
    print(f"\n{'fault':<18} {'acknowledged':>12} {'lost':>5} {'recovered in':>12}  errors seen by clients")
    for r in results:
        errors = ", ".join(f"{k} x{v}" for k, v in sorted(r.stats.errors.items())) or "none"
        rec = f"{r.t_recover:.2f} s" if r.t_recover is not None else "never"
        print(f"{r.name:<18} {r.stats.acked:>12} {r.lost:>5} {rec:>12}  {errors}" + (f" ({r.note})" if r.note else ""))
    for r in results:
        if r.lost or r.stats.bad or r.t_recover is None:
            failed = True
            print(f"\nFAILED {r.name}: lost {r.lost}", file=sys.stderr)
            for b in r.stats.bad[:20]:
                print(f"  {b}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
