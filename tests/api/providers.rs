//! Master-key providers against real servers: AWS KMS through moto_server and
//! Vault through OpenBao, both started by `scripts/test` (scripts/peers.sh).
//! A TCP forwarder between Keyward and the provider lets a test take the
//! provider away and bring it back.

use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::helpers::{assert_error, random_master_key, send, Backend, Creds, TestApp};

pub(crate) fn peer_env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run the tests through scripts/test, which starts moto_server and OpenBao")
    })
}

/// A TCP forwarder on a fixed loopback port that can be stopped (connections
/// refused, open ones cut) and started again on the same port.
pub struct Forwarder {
    pub port: u16,
    target: String,
    task: Option<JoinHandle<()>>,
}

impl Forwarder {
    pub async fn start(target: &str) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut f = Forwarder {
            port,
            target: target.trim_start_matches("http://").to_string(),
            task: None,
        };
        f.task = Some(tokio::spawn(forward(listener, f.target.clone())));
        f
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    pub async fn resume(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        Instant::now() < deadline,
                        "cannot re-bind port {}: {e}",
                        self.port
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        self.task = Some(tokio::spawn(forward(listener, self.target.clone())));
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn forward(listener: TcpListener, target: String) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        let target = target.clone();
        conns.spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

/// A fresh KMS key in moto; returns its id.
pub(crate) async fn new_kms_key() -> String {
    let creds = aws_sdk_kms::config::Credentials::new(
        peer_env("KEYWARD_TEST_AWS_ACCESS_KEY_ID"),
        peer_env("KEYWARD_TEST_AWS_SECRET_ACCESS_KEY"),
        None,
        None,
        "test",
    );
    let config = aws_sdk_kms::config::Builder::new()
        .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
        .region(aws_sdk_kms::config::Region::new(peer_env(
            "KEYWARD_TEST_AWS_REGION",
        )))
        .endpoint_url(peer_env("KEYWARD_TEST_MOTO_URL"))
        .credentials_provider(creds)
        .build();
    let client = aws_sdk_kms::Client::from_conf(config);
    let key = client
        .create_key()
        .description("keyward test")
        .send()
        .await
        .expect("moto CreateKey");
    key.key_metadata.unwrap().key_id
}

/// A fresh transit key in OpenBao; returns its name.
pub(crate) async fn new_transit_key() -> String {
    let name = format!("kw-{}", uuid::Uuid::new_v4().simple());
    let resp = crate::helpers::http_client()
        .post(format!(
            "{}/v1/transit/keys/{name}",
            peer_env("KEYWARD_TEST_VAULT_ADDR")
        ))
        .header("X-Vault-Token", peer_env("KEYWARD_TEST_VAULT_TOKEN"))
        .json(&json!({"type": "aes256-gcm96"}))
        .send()
        .await
        .expect("OpenBao reachable");
    assert!(
        resp.status().is_success(),
        "create transit key: {}",
        resp.status()
    );
    name
}

pub(crate) async fn vault_api(method: reqwest::Method, path: &str, body: Value) -> Value {
    let resp = crate::helpers::http_client()
        .request(
            method,
            format!("{}/v1/{path}", peer_env("KEYWARD_TEST_VAULT_ADDR")),
        )
        .header("X-Vault-Token", peer_env("KEYWARD_TEST_VAULT_TOKEN"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "{path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// A policy named `key` allowing transit encrypt and decrypt with `key`.
pub(crate) async fn write_policy(key: &str) {
    let policy = format!(
        "path \"transit/encrypt/{key}\" {{ capabilities = [\"update\"] }}\npath \"transit/decrypt/{key}\" {{ capabilities = [\"update\"] }}"
    );
    vault_api(
        reqwest::Method::PUT,
        &format!("sys/policies/acl/{key}"),
        json!({"policy": policy}),
    )
    .await;
}

/// An AppRole allowed to use `key`; returns (role_id, secret_id).
async fn new_approle(key: &str) -> (String, String) {
    let auths = vault_api(reqwest::Method::GET, "sys/auth", Value::Null).await;
    if auths.get("approle/").is_none() && auths["data"].get("approle/").is_none() {
        vault_api(
            reqwest::Method::POST,
            "sys/auth/approle",
            json!({"type": "approle"}),
        )
        .await;
    }
    write_policy(key).await;
    vault_api(
        reqwest::Method::POST,
        &format!("auth/approle/role/{key}"),
        json!({"token_policies": [key], "token_ttl": "1h", "token_max_ttl": "4h"}),
    )
    .await;
    let role_id = vault_api(
        reqwest::Method::GET,
        &format!("auth/approle/role/{key}/role-id"),
        Value::Null,
    )
    .await;
    let secret_id = vault_api(
        reqwest::Method::POST,
        &format!("auth/approle/role/{key}/secret-id"),
        json!({}),
    )
    .await;
    (
        role_id["data"]["role_id"].as_str().unwrap().into(),
        secret_id["data"]["secret_id"].as_str().unwrap().into(),
    )
}

pub(crate) fn aws_env(endpoint: &str, key_id: &str) -> Vec<(String, String)> {
    vec![
        ("KEYWARD_MASTER_KEY_PROVIDER".into(), "aws-kms".into()),
        ("KEYWARD_AWS_KMS_KEY_ID".into(), key_id.into()),
        ("KEYWARD_AWS_KMS_ENDPOINT".into(), endpoint.into()),
        ("AWS_REGION".into(), peer_env("KEYWARD_TEST_AWS_REGION")),
        (
            "AWS_ACCESS_KEY_ID".into(),
            peer_env("KEYWARD_TEST_AWS_ACCESS_KEY_ID"),
        ),
        (
            "AWS_SECRET_ACCESS_KEY".into(),
            peer_env("KEYWARD_TEST_AWS_SECRET_ACCESS_KEY"),
        ),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
    ]
}

pub(crate) fn vault_env(addr: &str, key: &str) -> Vec<(String, String)> {
    vec![
        ("KEYWARD_MASTER_KEY_PROVIDER".into(), "vault".into()),
        ("KEYWARD_VAULT_ADDR".into(), addr.into()),
        (
            "KEYWARD_VAULT_TOKEN".into(),
            peer_env("KEYWARD_TEST_VAULT_TOKEN"),
        ),
        ("KEYWARD_VAULT_TRANSIT_KEY".into(), key.into()),
    ]
}

pub(crate) fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

pub(crate) async fn readiness(app: &TestApp) -> (StatusCode, Value) {
    send(app.client.get(app.url("/readyz"))).await
}

pub(crate) async fn wait_ready(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = readiness(app).await;
        if status == StatusCode::OK {
            return;
        }
        assert!(Instant::now() < deadline, "not ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn decrypts(app: &TestApp, creds: &Creds, encrypted: &Value, data: &str) {
    let (status, body) = app.decrypt(creds, encrypted).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"], data);
}

/// Start, encrypt, restart, decrypt; provider gone after start: still serves;
/// provider gone at start: not ready with the reason, then ready when it is back.
async fn survives_restarts_and_outages(
    env: Vec<(String, String)>,
    mut forwarder: Forwarder,
    reason_word: &str,
) {
    let mut app = TestApp::spawn_with(Backend::Sqlite, &as_refs(&env)).await;
    wait_ready(&app).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let first = app.encrypt(&creds, &enc, "before restart").await;
    app.restart();
    wait_ready(&app).await;
    decrypts(&app, &creds, &first, "before restart").await;

    // The provider goes away: encrypt, decrypt and rotate do not need it.
    forwarder.stop();
    let second = app.encrypt(&creds, &enc, "provider down").await;
    decrypts(&app, &creds, &second, "provider down").await;
    decrypts(&app, &creds, &first, "before restart").await;
    app.rotate(&creds, &enc).await;
    let (status, _) = readiness(&app).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a provider outage after start does not make Keyward unready"
    );

    // Restart while it is away: serving, not ready, and saying why.
    app.restart();
    let (status, body) = readiness(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "not_ready");
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.contains(reason_word),
        "the reason names the provider: {reason}"
    );
    let (status, resp) = app
        .post(
            "/v1/encrypt",
            &creds,
            &json!({"encryptionId": enc, "data": "x"}),
        )
        .await;
    assert_error(status, &resp, 503, "not_ready");
    assert!(app.log_shows("unreachable").await, "the log says why");

    forwarder.resume().await;
    wait_ready(&app).await;
    decrypts(&app, &creds, &first, "before restart").await;
    decrypts(&app, &creds, &second, "provider down").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_kms_provider_survives_restarts_and_outages() {
    let key = new_kms_key().await;
    let fwd = Forwarder::start(&peer_env("KEYWARD_TEST_MOTO_URL")).await;
    let env = aws_env(&fwd.url(), &key);
    survives_restarts_and_outages(env, fwd, "aws-kms").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_provider_survives_restarts_and_outages() {
    let key = new_transit_key().await;
    let fwd = Forwarder::start(&peer_env("KEYWARD_TEST_VAULT_ADDR")).await;
    let env = vault_env(&fwd.url(), &key);
    survives_restarts_and_outages(env, fwd, "vault").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_provider_logs_in_with_approle() {
    let key = new_transit_key().await;
    let (role_id, secret_id) = new_approle(&key).await;
    let env = [
        ("KEYWARD_MASTER_KEY_PROVIDER", "vault"),
        ("KEYWARD_VAULT_ADDR", &peer_env("KEYWARD_TEST_VAULT_ADDR")),
        ("KEYWARD_VAULT_ROLE_ID", &role_id),
        ("KEYWARD_VAULT_SECRET_ID", &secret_id),
        ("KEYWARD_VAULT_TRANSIT_KEY", &key),
    ];
    let mut app = TestApp::spawn_with(Backend::Sqlite, &env).await;
    wait_ready(&app).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let e = app.encrypt(&creds, &enc, "approle").await;
    app.restart();
    wait_ready(&app).await;
    decrypts(&app, &creds, &e, "approle").await;
    assert!(app.log_shows("logged in to Vault with AppRole").await);
    assert!(
        !app.log_text().contains(&secret_id),
        "the secret id is logged"
    );
}

pub(crate) fn migrate(app: &TestApp, env: &[(String, String)], to: &str) {
    let mut cmd = crate::helpers::keyward_command();
    cmd.args(["master-key", "migrate", "--to", to])
        .env("KEYWARD_DATABASE_URL", &app.db.url)
        .env("KEYWARD_MASTER_KEY", &app.master_key);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "migrate --to {to}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_env_to_vault_to_aws_kms_and_back_keeps_every_ciphertext() {
    let vault_key = new_transit_key().await;
    let kms_key = new_kms_key().await;
    let vault = vault_env(&peer_env("KEYWARD_TEST_VAULT_ADDR"), &vault_key);
    let aws = aws_env(&peer_env("KEYWARD_TEST_MOTO_URL"), &kms_key);
    // Every provider's settings side by side; the provider variable picks one.
    let all: Vec<(String, String)> = vault
        .iter()
        .chain(aws.iter())
        .filter(|(k, _)| k != "KEYWARD_MASTER_KEY_PROVIDER")
        .cloned()
        .collect();
    let with_provider = |all: &[(String, String)], p: &str| {
        let mut env = all.to_vec();
        env.push(("KEYWARD_MASTER_KEY_PROVIDER".into(), p.into()));
        env
    };

    let mut app = TestApp::spawn_with(Backend::Sqlite, &as_refs(&with_provider(&all, "env"))).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let mut made = vec![(app.encrypt(&creds, &enc, "under env").await, "under env")];

    for (from, to, data) in [
        ("env", "vault", "under vault"),
        ("vault", "aws-kms", "under aws-kms"),
    ] {
        app.stop();
        migrate(&app, &with_provider(&all, from), to);
        // The old provider now fails the key check with a clear message.
        app.extra_env = with_provider(&all, from);
        let out = app.serve_command().output().unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("the master key does not match") && err.contains(to),
            "{err}"
        );

        app.extra_env = with_provider(&all, to);
        app.start();
        wait_ready(&app).await;
        for (e, d) in &made {
            decrypts(&app, &creds, e, d).await;
        }
        app.rotate(&creds, &enc).await;
        made.push((app.encrypt(&creds, &enc, data).await, data));
    }

    // Back to env, under a new master key.
    app.stop();
    let new_key = random_master_key();
    let mut env = with_provider(&all, "aws-kms");
    env.push(("KEYWARD_MASTER_KEY".into(), new_key.clone()));
    migrate(&app, &env, "env");
    let old_key = std::mem::replace(&mut app.master_key, new_key);
    app.extra_env = with_provider(&all, "env");
    app.start();
    for (e, d) in &made {
        decrypts(&app, &creds, e, d).await;
    }
    app.stop();
    app.master_key = old_key;
    let out = app.serve_command().output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEYWARD_MASTER_KEY does not match"));
}

pub(crate) fn status(app: &TestApp) -> Vec<Value> {
    let out = app.cli(&["master-key", "status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["rootKeks"].as_array().unwrap().clone()
}

crate::on_both_databases!(root_kek_rotation_survives_sigkill_and_finishes);

async fn root_kek_rotation_survives_sigkill_and_finishes(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let mut made = vec![];
    for i in 0..20 {
        let (enc, _) = app.create_encryption(&creds).await;
        made.push(app.encrypt(&creds, &enc, &format!("v1 of {i}")).await);
        app.rotate(&creds, &enc).await;
        made.push(app.encrypt(&creds, &enc, &format!("v2 of {i}")).await);
    }
    let total = 40;

    // Two runs killed with SIGKILL part-way through, slow enough to be caught.
    let mut interrupted = false;
    for (args, wait_ms) in [
        (
            vec![
                "master-key",
                "rotate-kek",
                "--batch-size",
                "2",
                "--pause-ms",
                "40",
            ],
            250,
        ),
        (
            vec![
                "master-key",
                "rotate-kek",
                "--resume",
                "--batch-size",
                "2",
                "--pause-ms",
                "40",
            ],
            150,
        ),
    ] {
        let mut child = crate::helpers::keyward_command()
            .args(&args)
            .env("KEYWARD_DATABASE_URL", &app.db.url)
            .env("KEYWARD_MASTER_KEY", &app.master_key)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(wait_ms)).await;
        Command::new("kill")
            .args(["-KILL", &child.id().to_string()])
            .status()
            .unwrap();
        let _ = child.wait();
        let keks = status(&app);
        let retiring: i64 = keks
            .iter()
            .filter(|k| k["state"] == "retiring")
            .map(|k| k["versions"].as_i64().unwrap())
            .sum();
        let active: i64 = keks
            .iter()
            .filter(|k| k["state"] == "active")
            .map(|k| k["versions"].as_i64().unwrap())
            .sum();
        assert_eq!(
            retiring + active,
            total,
            "no version lost or doubled: {keks:?}"
        );
        if retiring > 0 && active > 0 {
            interrupted = true;
        }
        // Half-way is a valid state: the running server still decrypts everything.
        for (i, e) in made.iter().enumerate() {
            let (status, _) = app.decrypt(&creds, e).await;
            assert_eq!(status, StatusCode::OK, "ciphertext {i} mid-rotation");
        }
    }
    assert!(interrupted, "the kills never landed mid-rotation");

    // A restarted server finishes the job.
    app.restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let keks = status(&app);
        if keks.len() == 1 {
            assert_eq!(keks[0]["state"], "active");
            assert_eq!(keks[0]["versions"], total);
            break;
        }
        assert!(Instant::now() < deadline, "rotation not finished: {keks:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (i, e) in made.iter().enumerate() {
        let data = if i % 2 == 0 {
            format!("v1 of {}", i / 2)
        } else {
            format!("v2 of {}", i / 2)
        };
        decrypts(&app, &creds, e, &data).await;
    }
    // And after another restart (only the new KEK exists now).
    app.restart();
    decrypts(&app, &creds, &made[0], "v1 of 0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_rotates_the_root_kek_in_the_background() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let tenant = app.create_tenant("operator");
    let manager = app.create_key(&tenant.tenant_id, "encrypt,decrypt,manage");
    let admin = app.create_operator();
    let mut made = vec![];
    for i in 0..10 {
        let (enc, _) = app.create_encryption(&tenant).await;
        made.push((
            app.encrypt(&tenant, &enc, &format!("{i}")).await,
            format!("{i}"),
        ));
    }
    let (status, body) = app
        .post("/v1/admin/root-kek/rotate", &manager, &json!({}))
        .await;
    assert_error(status, &body, 403, "insufficient_scope");

    let (_, before) = app.get("/v1/admin/root-kek", &admin).await;
    let old_kek = before["rootKeks"][0]["kekId"].as_str().unwrap().to_string();
    let (status, body) = app
        .post("/v1/admin/root-kek/rotate", &admin, &json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let new_kek = body["kekId"].as_str().unwrap().to_string();
    assert_ne!(new_kek, old_kek);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, st) = app.get("/v1/admin/root-kek", &admin).await;
        let keks = st["rootKeks"].as_array().unwrap();
        if keks.len() == 1 {
            assert_eq!(keks[0]["kekId"], new_kek.as_str());
            assert_eq!(keks[0]["versions"], 10);
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (e, d) in &made {
        decrypts(&app, &tenant, e, d).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_vault_token_is_renewed_while_keyward_runs() {
    let key = new_transit_key().await;
    write_policy(&key).await;
    let token = vault_api(
        reqwest::Method::POST,
        "auth/token/create",
        json!({"policies": [key], "ttl": "3s", "renewable": true, "explicit_max_ttl": "1h"}),
    )
    .await["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();
    let env = [
        ("KEYWARD_MASTER_KEY_PROVIDER", "vault"),
        ("KEYWARD_VAULT_ADDR", &peer_env("KEYWARD_TEST_VAULT_ADDR")),
        ("KEYWARD_VAULT_TOKEN", &token),
        ("KEYWARD_VAULT_TRANSIT_KEY", &key),
    ];
    let app = TestApp::spawn_with(Backend::Sqlite, &env).await;
    wait_ready(&app).await;
    let admin = app.create_operator();
    // Well past the token's 3-second TTL: only renewal keeps it valid.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (status, body) = app
        .post("/v1/admin/root-kek/rotate", &admin, &json!({}))
        .await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "the provider still works after the token's first TTL: {body}\n{}",
        app.log_text()
    );
    assert!(app.log_shows("renewed the Vault token").await);
    assert!(!app.log_text().contains(&token), "the token is logged");
}

/// A KMS key id that does not exist, or a key looked for in another region,
/// stops `serve` at start with a configuration error (not retried as an
/// outage, which would leave Keyward up and never ready).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_kms_key_not_found_or_wrong_region_is_a_startup_error() {
    let key = new_kms_key().await;
    let moto = peer_env("KEYWARD_TEST_MOTO_URL");
    let app = TestApp::spawn_with(Backend::Sqlite, &[]).await;
    let missing = uuid::Uuid::new_v4().to_string();
    let mut wrong_region = aws_env(&moto, &key);
    for (k, v) in wrong_region.iter_mut() {
        if k == "AWS_REGION" {
            *v = "eu-north-1".into();
        }
    }
    for (env, words) in [
        (
            aws_env(&moto, &missing),
            vec![missing.as_str(), "does not exist"],
        ),
        (
            wrong_region,
            vec![key.as_str(), "eu-north-1", "does not exist"],
        ),
    ] {
        let mut cmd = app.serve_command();
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let started = Instant::now();
        let out = cmd.output().unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "retried instead of failing"
        );
        assert!(!out.status.success(), "started with {env:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("master-key provider `aws-kms`"), "{err}");
        for w in words {
            assert!(err.contains(w), "`{w}` not in {err}");
        }
    }
}
