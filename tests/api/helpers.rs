//! One way to start Keyward for a test: the real binary, on port 0, against a
//! fresh database (a new SQLite file, or a new database in the PostgreSQL
//! cluster named by KEYWARD_TEST_DATABASE_URL, which `scripts/test` starts).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::Connection;

pub const BIN: &str = env!("CARGO_BIN_EXE_keyward");

/// Which database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates one test per backend for each listed async fn taking a `Backend`.
#[macro_export]
macro_rules! on_both_databases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Postgres).await
                }
            )*
        }
    };
}

/// A fresh, empty database for one test.
pub struct TestDatabase {
    pub url: String,
    /// Holds the SQLite file (and anything else the test writes).
    pub dir: tempfile::TempDir,
}

impl TestDatabase {
    pub async fn new(backend: Backend) -> TestDatabase {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = match backend {
            Backend::Sqlite => format!("sqlite://{}", dir.path().join("keyward.db").display()),
            Backend::Postgres => {
                let admin = std::env::var("KEYWARD_TEST_DATABASE_URL").expect(
                    "KEYWARD_TEST_DATABASE_URL is not set: run the tests through scripts/test, \
                     which starts a throwaway PostgreSQL, or point it at a server",
                );
                let name = format!("keyward_test_{}", uuid::Uuid::new_v4().simple());
                let mut conn = sqlx::PgConnection::connect(&admin)
                    .await
                    .expect("cannot reach the test PostgreSQL (KEYWARD_TEST_DATABASE_URL)");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&mut conn)
                    .await
                    .expect("create test database");
                let (base, _) = admin.rsplit_once('/').expect("database URL has a path");
                format!("{base}/{name}")
            }
        };
        TestDatabase { url, dir }
    }
}

/// Credentials of one API key.
#[derive(Debug, Clone)]
pub struct Creds {
    pub tenant_id: String,
    pub key: String,
    pub secret: String,
}

/// A running Keyward.
pub struct TestApp {
    pub db: Arc<TestDatabase>,
    pub master_key: String,
    pub addr: String,
    pub client: reqwest::Client,
    child: Option<Child>,
    /// Everything the server wrote to stdout and stderr, across restarts.
    pub log: Arc<Mutex<String>>,
    pub extra_env: Vec<(String, String)>,
}

/// Makes AWS-LC the process-wide rustls provider (reqwest needs one).
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// A plain HTTP client.
pub fn http_client() -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// A random master key, base64.
pub fn random_master_key() -> String {
    let bytes: [u8; 32] = rand_bytes();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn rand_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    for chunk in out.chunks_mut(16) {
        let u = uuid::Uuid::new_v4();
        chunk.copy_from_slice(&u.as_bytes()[..chunk.len()]);
    }
    out
}

/// A `Command` for the keyward binary with no inherited KEYWARD_* settings.
pub fn keyward_command() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("KEYWARD_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Reads a child's output into `log`, line by line, on a thread.
fn collect(stream: impl std::io::Read + Send + 'static, log: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut l = log.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
}

/// Polls `log` until a line `{"message":"listening","addr":...}` appears after
/// byte offset `from`.
fn wait_for_listening(log: &Arc<Mutex<String>>, from: usize, child: &mut Child) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        {
            let l = log.lock().unwrap();
            for line in l[from..].lines() {
                if let Ok(v) = serde_json::from_str::<Value>(line) {
                    if v["message"] == "listening" {
                        return v["addr"].as_str().unwrap().to_string();
                    }
                }
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "keyward exited with {status} before listening:\n{}",
                log.lock().unwrap()
            );
        }
        assert!(
            Instant::now() < deadline,
            "keyward did not start:\n{}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl TestApp {
    /// Starts Keyward on a fresh database.
    pub async fn spawn(backend: Backend) -> TestApp {
        Self::spawn_with(backend, &[]).await
    }

    /// Starts Keyward on a fresh database with extra KEYWARD_* settings.
    pub async fn spawn_with(backend: Backend, env: &[(&str, &str)]) -> TestApp {
        Self::spawn_on(TestDatabase::new(backend).await, env)
    }

    /// Starts Keyward on `db`, which may hold what an older Keyward left.
    pub fn spawn_on(db: TestDatabase, env: &[(&str, &str)]) -> TestApp {
        let db = Arc::new(db);
        let mut app = TestApp {
            db,
            master_key: random_master_key(),
            addr: String::new(),
            client: http_client(),
            child: None,
            log: Arc::new(Mutex::new(String::new())),
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        app.start();
        app
    }

    /// A second server process on the same database and master key (a replica),
    /// with extra settings.
    pub fn spawn_replica(&self, env: &[(&str, &str)]) -> TestApp {
        let mut extra_env = self.extra_env.clone();
        extra_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut replica = TestApp {
            db: self.db.clone(),
            master_key: self.master_key.clone(),
            addr: String::new(),
            client: http_client(),
            child: None,
            log: Arc::new(Mutex::new(String::new())),
            extra_env,
        };
        replica.start();
        replica
    }

    /// The command that starts this app's server (not yet spawned).
    pub fn serve_command(&self) -> Command {
        let mut cmd = keyward_command();
        cmd.arg("serve")
            .env("KEYWARD_LISTEN", "127.0.0.1:0")
            .env("KEYWARD_DATABASE_URL", &self.db.url)
            .env("KEYWARD_MASTER_KEY", &self.master_key)
            .env("KEYWARD_LOG_FORMAT", "json")
            .env("KEYWARD_LOG_LEVEL", "debug")
            .env("KEYWARD_SYNC_INTERVAL", "100ms")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts the server process and waits until it listens.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let from = self.log.lock().unwrap().len();
        let mut child = self.serve_command().spawn().expect("spawn keyward");
        collect(child.stdout.take().unwrap(), self.log.clone());
        collect(child.stderr.take().unwrap(), self.log.clone());
        self.addr = wait_for_listening(&self.log, from, &mut child);
        self.child = Some(child);
    }

    /// Sends SIGTERM and waits for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "TERM");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(
                        status.success(),
                        "keyward exited with {status}:\n{}",
                        self.log.lock().unwrap()
                    );
                    break;
                }
                assert!(Instant::now() < deadline, "keyward did not stop on SIGTERM");
                std::thread::sleep(Duration::from_millis(20));
            }
            // Let the output threads drain.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for a process killed from outside to be gone.
    pub fn kill_wait(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops and starts again on the same database and master key.
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Whether this app serves HTTPS.
    pub fn tls(&self) -> bool {
        self.extra_env
            .iter()
            .any(|(k, _)| k == "KEYWARD_TLS_CERT" || k == "KEYWARD_ACME_DIRECTORY")
    }

    /// The port the app listens on.
    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        if self.tls() {
            format!("https://localhost:{}{}", self.port(), path)
        } else {
            format!("http://{}{}", self.addr, path)
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Whether the log comes to contain `needle` within 5 s. The server's
    /// output reaches the log through a reader thread, so a line it wrote
    /// before answering may arrive here after the answer.
    pub async fn log_shows(&self, needle: &str) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            if self.log_text().contains(needle) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Runs a CLI command against this app's database.
    pub fn cli(&self, args: &[&str]) -> Output {
        keyward_command()
            .args(args)
            .env("KEYWARD_DATABASE_URL", &self.db.url)
            .env("KEYWARD_LOG_FORMAT", "json")
            .output()
            .expect("run keyward")
    }

    /// Creates a tenant with the CLI; returns its all-scopes credentials.
    pub fn create_tenant(&self, name: &str) -> Creds {
        let out = self.cli(&["tenant", "create", name, "--json"]);
        assert!(
            out.status.success(),
            "tenant create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value =
            serde_json::from_slice(&out.stdout).expect("tenant create --json prints JSON");
        Creds {
            tenant_id: v["tenantId"].as_str().unwrap().into(),
            key: v["apiKey"].as_str().unwrap().into(),
            secret: v["apiSecret"].as_str().unwrap().into(),
        }
    }

    /// Creates an operator key (scopes operator, audit) with the CLI; its
    /// `tenant_id` is empty.
    pub fn create_operator(&self) -> Creds {
        let out = self.cli(&["operator-key", "create", "--json"]);
        assert!(
            out.status.success(),
            "operator-key create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        Creds {
            tenant_id: String::new(),
            key: v["apiKey"].as_str().unwrap().into(),
            secret: v["apiSecret"].as_str().unwrap().into(),
        }
    }

    /// Creates an API key with the given scopes with the CLI.
    pub fn create_key(&self, tenant_id: &str, scopes: &str) -> Creds {
        let out = self.cli(&[
            "apikey", "create", "--tenant", tenant_id, "--scopes", scopes, "--json",
        ]);
        assert!(
            out.status.success(),
            "apikey create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        Creds {
            tenant_id: tenant_id.into(),
            key: v["apiKey"].as_str().unwrap().into(),
            secret: v["apiSecret"].as_str().unwrap().into(),
        }
    }

    /// A request with `creds`' headers.
    pub fn req(
        &self,
        method: reqwest::Method,
        path: &str,
        creds: &Creds,
    ) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .header("X-Api-Key", &creds.key)
            .header("X-Api-Secret", &creds.secret)
    }

    /// POSTs JSON with `creds`; returns status and body.
    pub async fn post(&self, path: &str, creds: &Creds, body: &Value) -> (StatusCode, Value) {
        send(self.req(reqwest::Method::POST, path, creds).json(body)).await
    }

    /// GETs with `creds`; returns status and body.
    /// The body of an unauthenticated `GET path` that answers 200, as text.
    pub async fn get_text(&self, path: &str) -> String {
        let resp = self.client.get(self.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "GET {path}");
        resp.text().await.unwrap()
    }

    pub async fn get(&self, path: &str, creds: &Creds) -> (StatusCode, Value) {
        send(self.req(reqwest::Method::GET, path, creds)).await
    }

    /// Creates an encryption; returns its id and active version id.
    pub async fn create_encryption(&self, creds: &Creds) -> (String, String) {
        let (status, body) = self.post("/v1/encryptions", creds, &json!({})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        (
            body["encryptionId"].as_str().unwrap().into(),
            body["activeVersionId"].as_str().unwrap().into(),
        )
    }

    /// Encrypts `data`; asserts success.
    pub async fn encrypt(&self, creds: &Creds, encryption_id: &str, data: &str) -> Value {
        let (status, body) = self
            .post(
                "/v1/encrypt",
                creds,
                &json!({"encryptionId": encryption_id, "data": data}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Decrypts an encrypt response; returns status and body.
    pub async fn decrypt(&self, creds: &Creds, encrypted: &Value) -> (StatusCode, Value) {
        self.post("/v1/decrypt", creds, &decrypt_body(encrypted))
            .await
    }

    /// Rotates; returns the new version id.
    pub async fn rotate(&self, creds: &Creds, encryption_id: &str) -> String {
        let (status, body) = self
            .post("/v1/rotate", creds, &json!({"encryptionId": encryption_id}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["newVersionId"].as_str().unwrap().into()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends a signal to a child process.
pub fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// Sends a request; returns status and JSON body (Null if the body is empty,
/// a string if it is not JSON).
pub async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let resp = req.send().await.expect("request failed");
    let status = resp.status();
    let bytes = resp.bytes().await.expect("read body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (status, body)
}

/// The decrypt request for an encrypt response.
pub fn decrypt_body(encrypted: &Value) -> Value {
    json!({
        "encryptionId": encrypted["encryptionId"],
        "cipherText": encrypted["cipherText"],
        "encryptionVersionId": encrypted["encryptionVersionId"],
        "metadata": encrypted["metadata"],
    })
}

/// Asserts an error response: status, JSON shape, and code.
#[track_caller]
pub fn assert_error(status: StatusCode, body: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status.as_u16(), want_status, "body: {body}");
    assert_eq!(body["error"]["code"], want_code, "body: {body}");
    assert!(body["error"]["message"].is_string(), "body: {body}");
}

/// Every file under `dir`, read whole.
pub fn read_tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((p, bytes));
            }
        }
    }
    out
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(haystack, needle).is_some()
}

/// Runs `script` with the peers' Python (pyca/cryptography, joserfc: see
/// scripts/peers.sh), `input` as JSON on its standard input; returns what it
/// prints as JSON.
pub fn run_python(script: &str, input: &Value) -> Value {
    use std::io::Write;
    let python = std::env::var("KEYWARD_TEST_PYTHON").expect(
        "KEYWARD_TEST_PYTHON is not set: run the tests through scripts/test (it installs cryptography and joserfc)",
    );
    let mut child = Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python printed JSON")
}
