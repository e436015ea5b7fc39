//! Secret references (`env://NAME`, `file:///PATH`, `vault://MOUNT/PATH#FIELD`)
//! in place of secret settings, against OpenBao's KV version 2 engine started
//! by `scripts/test` (scripts/peers.sh): resolved at start, a `file://` one
//! re-read on SIGHUP, and every unresolvable reference a startup error that
//! names the setting and never the value.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{random_master_key, Backend, TestApp, TestDatabase};
use crate::providers::{decrypts, new_transit_key, peer_env, vault_api, wait_ready, write_policy};

/// A fresh KV version 2 mount in OpenBao; returns its path.
async fn new_kv_mount() -> String {
    let mount = format!("kv-{}", uuid::Uuid::new_v4().simple());
    vault_api(
        Method::POST,
        &format!("sys/mounts/{mount}"),
        json!({"type": "kv", "options": {"version": "2"}}),
    )
    .await;
    mount
}

async fn write_kv(mount: &str, path: &str, data: Value) {
    vault_api(
        Method::POST,
        &format!("{mount}/data/{path}"),
        json!({ "data": data }),
    )
    .await;
}

/// A token allowed to use transit key `key` (policy `key`), not renewable.
async fn transit_token(key: &str) -> String {
    vault_api(
        Method::POST,
        "auth/token/create",
        json!({"policies": [key], "ttl": "1h", "renewable": false}),
    )
    .await["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string()
}

fn hangup(app: &TestApp) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &app.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

crate::on_both_databases!(the_master_key_and_the_database_url_come_from_vault_kv);

/// The master key and the database URL (with its password, on PostgreSQL)
/// are read from KV v2 with a token given by `env://`: start, encrypt,
/// restart, decrypt; neither value is logged.
async fn the_master_key_and_the_database_url_come_from_vault_kv(backend: Backend) {
    let mount = new_kv_mount().await;
    let db = TestDatabase::new(backend).await;
    let master_key = random_master_key();
    write_kv(
        &mount,
        "keyward/prod",
        json!({"master_key": master_key, "database_url": db.url}),
    )
    .await;
    let master_ref = format!("vault://{mount}/keyward/prod#master_key");
    let db_ref = format!("vault://{mount}/keyward/prod#database_url");
    let vault_addr = peer_env("KEYWARD_TEST_VAULT_ADDR");
    let token = peer_env("KEYWARD_TEST_VAULT_TOKEN");
    let env = [
        ("KEYWARD_MASTER_KEY", master_ref.as_str()),
        ("KEYWARD_DATABASE_URL", db_ref.as_str()),
        ("KEYWARD_VAULT_ADDR", vault_addr.as_str()),
        ("KEYWARD_VAULT_TOKEN", "env://KW_TEST_BAO_TOKEN"),
        ("KW_TEST_BAO_TOKEN", token.as_str()),
    ];
    let mut app = TestApp::spawn_on(db, &env);
    app.master_key = master_key.clone();
    wait_ready(&app).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let made = app.encrypt(&creds, &enc, "from kv").await;
    app.restart();
    wait_ready(&app).await;
    decrypts(&app, &creds, &made, "from kv").await;

    // The app ran with the references, not the values: with another master
    // key in KV, the same start is refused.
    app.stop();
    write_kv(
        &mount,
        "keyward/prod",
        json!({"master_key": random_master_key(), "database_url": app.db.url}),
    )
    .await;
    let out = app.serve_command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("KEYWARD_MASTER_KEY does not match"), "{err}");

    let log = app.log_text();
    assert!(!log.contains(&master_key), "the master key is logged");
    assert!(!log.contains(&token), "the Vault token is logged");
    if backend == Backend::Postgres {
        let password = app
            .db
            .url
            .split('@')
            .next()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap();
        assert!(
            !log.contains(&format!(":{password}@")),
            "the database password is logged"
        );
    }
}

/// The Vault provider's token comes from a file; the token is revoked and a
/// new one written to the file; after SIGHUP the provider works again with
/// the new one (a root-KEK rotation wraps through Vault).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_reference_is_reread_on_sighup() {
    let key = new_transit_key().await;
    write_policy(&key).await;
    let first = transit_token(&key).await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("vault-token");
    std::fs::write(&token_file, format!("{first}\n")).unwrap();
    let token_ref = format!("file://{}", token_file.display());
    let master_key = random_master_key();
    let vault_addr = peer_env("KEYWARD_TEST_VAULT_ADDR");
    let env = [
        ("KEYWARD_MASTER_KEY_PROVIDER", "vault"),
        ("KEYWARD_VAULT_ADDR", vault_addr.as_str()),
        ("KEYWARD_VAULT_TOKEN", token_ref.as_str()),
        ("KEYWARD_VAULT_TRANSIT_KEY", key.as_str()),
        ("KEYWARD_MASTER_KEY", "env://KW_TEST_MASTER_KEY"),
        ("KW_TEST_MASTER_KEY", master_key.as_str()),
    ];
    let app = TestApp::spawn_with(Backend::Sqlite, &env).await;
    wait_ready(&app).await;
    let admin = app.create_operator();

    vault_api(Method::POST, "auth/token/revoke", json!({ "token": first })).await;
    let second = transit_token(&key).await;
    std::fs::write(&token_file, format!("{second}\n")).unwrap();
    hangup(&app);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !app.log_text().contains("SIGHUP: re-read the secret file") {
        assert!(
            Instant::now() < deadline,
            "no reload logged: {}",
            app.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        app.log_text().contains("\"changed\":true"),
        "{}",
        app.log_text()
    );

    let (status, body) = app
        .post("/v1/admin/root-kek/rotate", &admin, &json!({}))
        .await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "the provider works with the re-read token (the first is revoked): {body}\n{}",
        app.log_text()
    );
    let log = app.log_text();
    for secret in [&first, &second, &master_key] {
        assert!(!log.contains(secret.as_str()), "a secret is logged");
    }

    // A file that went away keeps the value it had, and says so.
    std::fs::remove_file(&token_file).unwrap();
    hangup(&app);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !app.log_text().contains("SIGHUP: kept the previous secret") {
        assert!(Instant::now() < deadline, "{}", app.log_text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Settings, the setting the error must name, and words it must hold.
type FailureCase<'a> = (Vec<(&'a str, &'a str)>, &'a str, &'a [&'a str]);

/// Each way a reference can fail stops `serve` at start with an error that
/// names the setting and the reference, and holds none of the secrets around.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unresolvable_reference_is_a_startup_error_naming_the_setting_not_the_value() {
    let mount = new_kv_mount().await;
    let master_key = random_master_key();
    write_kv(&mount, "keyward", json!({"master_key": master_key})).await;
    let vault_addr = peer_env("KEYWARD_TEST_VAULT_ADDR");
    let token = peer_env("KEYWARD_TEST_VAULT_TOKEN");
    let dir = tempfile::tempdir().unwrap();
    let missing_file = format!("file://{}", dir.path().join("absent").display());
    let no_field = format!("vault://{mount}/keyward#no_such_field");
    let no_secret = format!("vault://{mount}/nothing/here#master_key");
    let fine = format!("vault://{mount}/keyward#master_key");
    let cases: Vec<FailureCase> = vec![
        (
            vec![("KEYWARD_MASTER_KEY", "env://KW_TEST_NOT_SET")],
            "KEYWARD_MASTER_KEY",
            &["env://KW_TEST_NOT_SET", "not set"],
        ),
        (
            vec![("KEYWARD_MASTER_KEY", &missing_file)],
            "KEYWARD_MASTER_KEY",
            &["No such file"],
        ),
        (
            vec![
                ("KEYWARD_MASTER_KEY", &no_field),
                ("KEYWARD_VAULT_ADDR", &vault_addr),
                ("KEYWARD_VAULT_TOKEN", &token),
            ],
            "KEYWARD_MASTER_KEY",
            &["no field `no_such_field`"],
        ),
        (
            vec![
                ("KEYWARD_MASTER_KEY", &no_secret),
                ("KEYWARD_VAULT_ADDR", &vault_addr),
                ("KEYWARD_VAULT_TOKEN", &token),
            ],
            "KEYWARD_MASTER_KEY",
            &["no KV v2 secret"],
        ),
        (
            // Vault down: nothing listens on port 9 of loopback.
            vec![
                ("KEYWARD_MASTER_KEY", &fine),
                ("KEYWARD_VAULT_ADDR", "http://127.0.0.1:9"),
                ("KEYWARD_VAULT_TOKEN", &token),
            ],
            "KEYWARD_MASTER_KEY",
            &["unavailable"],
        ),
        (
            vec![
                ("KEYWARD_MASTER_KEY", &fine),
                ("KEYWARD_VAULT_ADDR", &vault_addr),
            ],
            "KEYWARD_MASTER_KEY",
            &["needs either KEYWARD_VAULT_TOKEN"],
        ),
        (
            vec![
                ("KEYWARD_MASTER_KEY_PROVIDER", "vault"),
                ("KEYWARD_VAULT_ADDR", &vault_addr),
                ("KEYWARD_VAULT_TRANSIT_KEY", "k"),
                ("KEYWARD_VAULT_TOKEN", &missing_file),
            ],
            "KEYWARD_VAULT_TOKEN",
            &["No such file"],
        ),
    ];
    let db = TestDatabase::new(Backend::Sqlite).await;
    for (env, setting, words) in cases {
        let mut cmd = crate::helpers::keyward_command();
        cmd.arg("serve")
            .env("KEYWARD_LISTEN", "127.0.0.1:0")
            .env("KEYWARD_DATABASE_URL", &db.url);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let started = Instant::now();
        let out = cmd.output().unwrap();
        assert!(started.elapsed() < Duration::from_secs(30));
        assert!(!out.status.success(), "{env:?} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(setting), "{env:?}: {err}");
        for w in words {
            assert!(err.contains(w), "{env:?}: `{w}` not in {err}");
        }
        for secret in [&master_key, &token] {
            assert!(!err.contains(secret.as_str()), "a secret in {err}");
        }
    }
}

/// `bao server -dev -dev-tls` on a free loopback port: TLS with a CA that
/// OpenBao generates into a temp folder. Killed on drop.
struct TlsBao {
    addr: String,
    ca: std::path::PathBuf,
    token: String,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for TlsBao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsBao {
    async fn start() -> TlsBao {
        let bin = peer_env("KEYWARD_PEER_BAO_BIN");
        let dir = tempfile::tempdir().unwrap();
        // The dev server's cluster listener takes the next port: find two.
        let port = loop {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = l.local_addr().unwrap().port();
            if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
                break port;
            }
        };
        let token = format!("tls-root-{}", uuid::Uuid::new_v4().simple());
        let log = std::fs::File::create(dir.path().join("bao.log")).unwrap();
        let child = std::process::Command::new(bin)
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .env("HOME", "/nonexistent")
            .args(["server", "-dev", "-dev-tls", "-dev-no-store-token"])
            .arg(format!("-dev-root-token-id={token}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .arg(format!("-dev-tls-cert-dir={}", dir.path().display()))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let bao = TlsBao {
            addr: format!("https://127.0.0.1:{port}"),
            ca: dir.path().join("vault-ca.pem"),
            token,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if bao.ca.exists() {
                if let Ok(resp) = bao
                    .client()
                    .get(format!("{}/v1/sys/health", bao.addr))
                    .send()
                    .await
                {
                    if resp.status() == StatusCode::OK {
                        break;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "bao -dev-tls did not start: {}",
                std::fs::read_to_string(bao._dir.path().join("bao.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        bao
    }

    fn client(&self) -> reqwest::Client {
        crate::helpers::install_crypto_provider();
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&self.ca).unwrap()).unwrap();
        reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .unwrap()
    }

    async fn api(&self, path: &str, body: Value) {
        let resp = self
            .client()
            .post(format!("{}/v1/{path}", self.addr))
            .header("X-Vault-Token", &self.token)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
    }
}

/// `KEYWARD_VAULT_CA_FILE` against OpenBao serving TLS with its own CA: the
/// transit provider and a `vault://` reference both reach it through the CA
/// file (start, encrypt, restart, decrypt); without the CA file the
/// certificate is refused and Keyward is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vault_ca_file_verifies_openbao_over_tls() {
    let bao = TlsBao::start().await;
    bao.api("sys/mounts/transit", json!({"type": "transit"}))
        .await;
    bao.api("transit/keys/kek", json!({"type": "aes256-gcm96"}))
        .await;
    bao.api(
        "sys/mounts/kv",
        json!({"type": "kv", "options": {"version": "2"}}),
    )
    .await;
    let master_key = random_master_key();
    bao.api(
        "kv/data/keyward",
        json!({"data": {"master_key": master_key}}),
    )
    .await;
    let ca = bao.ca.display().to_string();
    let mut env = vec![
        ("KEYWARD_MASTER_KEY_PROVIDER", "vault"),
        ("KEYWARD_VAULT_ADDR", bao.addr.as_str()),
        ("KEYWARD_VAULT_TOKEN", bao.token.as_str()),
        ("KEYWARD_VAULT_TRANSIT_KEY", "kek"),
        ("KEYWARD_VAULT_CA_FILE", ca.as_str()),
        ("KEYWARD_MASTER_KEY", "vault://kv/keyward#master_key"),
    ];
    let mut app = TestApp::spawn_with(Backend::Sqlite, &env).await;
    crate::providers::wait_ready(&app).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let made = app.encrypt(&creds, &enc, "over tls").await;
    app.restart();
    wait_ready(&app).await;
    decrypts(&app, &creds, &made, "over tls").await;
    app.stop();

    // Without the CA file: the reference cannot be read (a startup error),
    // and with a plain master key the provider cannot be reached (not ready).
    env.retain(|(k, _)| *k != "KEYWARD_VAULT_CA_FILE");
    app.extra_env = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let out = app.serve_command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("KEYWARD_MASTER_KEY") && err.contains("vault://kv/keyward#master_key"),
        "{err}"
    );
    app.extra_env.retain(|(k, _)| k != "KEYWARD_MASTER_KEY");
    app.start();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, body) = crate::providers::readiness(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["reason"].as_str().unwrap_or("").contains("vault"),
        "{body}"
    );
}
