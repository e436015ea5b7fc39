//! The `pkcs11` master-key provider against SoftHSM2, a PKCS#11 token kept in
//! files (`scripts/softhsm.sh`, started by `scripts/test`, installs it). Each
//! test makes its own token in a temp folder with `softhsm2-util` and a
//! sensitive, non-extractable AES-256 key with OpenSC's `pkcs11-tool`, and
//! points Keyward's module at it through its own `SOFTHSM2_CONF`; taking the
//! token away is renaming its folder.

use std::path::{Path, PathBuf};
use std::process::Command;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{assert_error, random_master_key, Backend, TestApp};
use crate::providers::{as_refs, decrypts, migrate, readiness, wait_ready};

fn module() -> String {
    std::env::var("KEYWARD_TEST_PKCS11_MODULE").unwrap_or_else(|_| {
        panic!("KEYWARD_TEST_PKCS11_MODULE is not set: run the tests through scripts/test, which sets up SoftHSM2 (scripts/softhsm.sh)")
    })
}

const PIN: &str = "4711-pin";
const LABEL: &str = "keyward-hsm";
const KEY: &str = "keyward-root-kek-wrapper";

/// A SoftHSM token of its own, in a temp folder.
struct Token {
    dir: tempfile::TempDir,
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Token {
    fn new() -> Token {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).unwrap();
        std::fs::write(
            dir.path().join("softhsm2.conf"),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .unwrap();
        let token = Token { dir };
        run(Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", token.conf())
            .args(["--init-token", "--free", "--label", LABEL])
            .args(["--so-pin", "so-secret", "--pin", PIN]));
        run(Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", token.conf())
            .args(["--module", &module(), "--token-label", LABEL, "--login"])
            .args(["--pin", PIN, "--keygen", "--key-type", "AES:32"])
            .args(["--label", KEY, "--sensitive"]));
        token
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }

    fn tokens(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }

    /// The token removed: its folder renamed away.
    fn remove(&self) {
        std::fs::rename(self.tokens(), self.dir.path().join("away")).unwrap();
    }

    fn put_back(&self) {
        std::fs::rename(self.dir.path().join("away"), self.tokens()).unwrap();
    }

    /// The provider's settings; the PIN through an `env://` reference.
    fn env(&self) -> Vec<(String, String)> {
        [
            ("KEYWARD_MASTER_KEY_PROVIDER", "pkcs11"),
            ("KEYWARD_PKCS11_MODULE", &module()),
            ("KEYWARD_PKCS11_TOKEN_LABEL", LABEL),
            ("KEYWARD_PKCS11_PIN", "env://KW_TEST_HSM_PIN"),
            ("KW_TEST_HSM_PIN", PIN),
            ("KEYWARD_PKCS11_KEY_LABEL", KEY),
            ("SOFTHSM2_CONF", &self.conf().display().to_string()),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

fn exists(p: &Path) -> bool {
    p.exists()
}

crate::on_both_databases!(pkcs11_provider_survives_restarts_and_outages);

/// Start, encrypt, restart, decrypt; the token gone after start: still
/// serving from the root KEK in memory; gone at a restart: serving, not
/// ready, `/readyz` naming the provider, then ready once it is back.
async fn pkcs11_provider_survives_restarts_and_outages(backend: Backend) {
    let token = Token::new();
    let env = token.env();
    let mut app = TestApp::spawn_with(backend, &as_refs(&env)).await;
    wait_ready(&app).await;
    assert!(app.log_shows("logged in to the PKCS#11 token").await);
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let first = app.encrypt(&creds, &enc, "before restart").await;
    app.restart();
    wait_ready(&app).await;
    decrypts(&app, &creds, &first, "before restart").await;

    token.remove();
    assert!(!exists(&token.tokens()));
    let second = app.encrypt(&creds, &enc, "token gone").await;
    decrypts(&app, &creds, &second, "token gone").await;
    app.rotate(&creds, &enc).await;
    let (status, _) = readiness(&app).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a token outage after start does not make Keyward unready"
    );

    app.restart();
    let (status, body) = readiness(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "not_ready");
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.contains("pkcs11"),
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

    token.put_back();
    wait_ready(&app).await;
    decrypts(&app, &creds, &first, "before restart").await;
    decrypts(&app, &creds, &second, "token gone").await;
    assert!(!app.log_text().contains(PIN), "the PIN is logged");
}

/// `master-key migrate` env → pkcs11 → env (under a new master key): every
/// ciphertext made under each provider still decrypts, and the old provider
/// is refused with a clear message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_env_to_pkcs11_and_back_keeps_every_ciphertext() {
    let token = Token::new();
    let hsm = token.env();
    let with_provider = |p: &str| {
        let mut env: Vec<(String, String)> = hsm
            .iter()
            .filter(|(k, _)| k != "KEYWARD_MASTER_KEY_PROVIDER")
            .cloned()
            .collect();
        env.push(("KEYWARD_MASTER_KEY_PROVIDER".into(), p.into()));
        env
    };
    let mut app = TestApp::spawn_with(Backend::Sqlite, &as_refs(&with_provider("env"))).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let mut made = vec![(app.encrypt(&creds, &enc, "under env").await, "under env")];

    app.stop();
    migrate(&app, &with_provider("env"), "pkcs11");
    app.extra_env = with_provider("env");
    let out = app.serve_command().output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the master key does not match") && err.contains("pkcs11"),
        "{err}"
    );
    app.extra_env = with_provider("pkcs11");
    app.start();
    wait_ready(&app).await;
    for (e, d) in &made {
        decrypts(&app, &creds, e, d).await;
    }
    app.rotate(&creds, &enc).await;
    made.push((
        app.encrypt(&creds, &enc, "under pkcs11").await,
        "under pkcs11",
    ));

    app.stop();
    let new_key = random_master_key();
    let mut env = with_provider("pkcs11");
    env.push(("KEYWARD_MASTER_KEY".into(), new_key.clone()));
    migrate(&app, &env, "env");
    app.master_key = new_key;
    app.extra_env = with_provider("env");
    app.start();
    wait_ready(&app).await;
    for (e, d) in &made {
        decrypts(&app, &creds, e, d).await;
    }
    app.extra_env = with_provider("pkcs11");
    app.stop();
    let out = app.serve_command().output().unwrap();
    assert!(
        !out.status.success(),
        "pkcs11 after migrating away still starts"
    );
}

/// A wrong PIN, a key label the token does not hold, or a token without the
/// settings it needs: `serve` stops at start with an error naming what to fix,
/// never the PIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_or_a_missing_key_is_a_startup_error() {
    let token = Token::new();
    let app = TestApp::spawn_with(Backend::Sqlite, &[]).await;
    let cases: [(&str, &str, &str); 3] = [
        ("KW_TEST_HSM_PIN", "0000-wrong", "wrong PIN"),
        (
            "KEYWARD_PKCS11_KEY_LABEL",
            "no-such-key",
            "no secret key labelled `no-such-key`",
        ),
        ("KEYWARD_PKCS11_PIN", "", "KEYWARD_PKCS11_PIN"),
    ];
    for (name, value, want) in cases {
        let mut env = token.env();
        for (k, v) in env.iter_mut() {
            if k == name {
                *v = value.to_string();
            }
        }
        let mut cmd = app.serve_command();
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "started with {name}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{name}={value}: {err}");
        assert!(err.contains("pkcs11") || err.contains("PKCS11"), "{err}");
        assert!(
            !err.contains(PIN) && !err.contains("0000-wrong"),
            "a PIN in {err}"
        );
    }
}

/// The token pulled after start: a call that needs it (a root-KEK rotation)
/// fails cleanly with 503 while encrypt and decrypt go on; with the token
/// back, the next call opens a new session, logs in again and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_pulled_after_start_fails_a_rotation_cleanly_then_reconnects() {
    let token = Token::new();
    let app = TestApp::spawn_with(Backend::Sqlite, &as_refs(&token.env())).await;
    wait_ready(&app).await;
    let admin = app.create_operator();
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let made = app.encrypt(&creds, &enc, "kept").await;

    token.remove();
    let (status, body) = app
        .post("/v1/admin/root-kek/rotate", &admin, &json!({}))
        .await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{body}\n{}",
        app.log_text()
    );
    decrypts(&app, &creds, &made, "kept").await;

    token.put_back();
    let (status, body) = app
        .post("/v1/admin/root-kek/rotate", &admin, &json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}\n{}", app.log_text());
    decrypts(&app, &creds, &made, "kept").await;
}

/// AES key wrap with padding (`C_WrapKey`, for tokens without GCM or that
/// refuse a caller's IV): start, encrypt, restart, decrypt; then the
/// mechanism switched to AES-GCM still unwraps the key-wrapped root KEK (the
/// stored value names its mechanism), and a root-KEK rotation under GCM
/// survives another restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aes_key_wrap_with_padding_works_and_either_mechanism_unwraps_the_other() {
    let token = Token::new();
    let mut env = token.env();
    env.push(("KEYWARD_PKCS11_MECHANISM".into(), "aes-key-wrap-pad".into()));
    let mut app = TestApp::spawn_with(Backend::Sqlite, &as_refs(&env)).await;
    wait_ready(&app).await;
    assert!(app.log_shows("AES key wrap with padding").await);
    let creds = app.create_tenant("acme");
    let admin = app.create_operator();
    let (enc, _) = app.create_encryption(&creds).await;
    let made = app.encrypt(&creds, &enc, "under kwp").await;
    app.restart();
    wait_ready(&app).await;
    decrypts(&app, &creds, &made, "under kwp").await;

    app.stop();
    for (k, v) in app.extra_env.iter_mut() {
        if k == "KEYWARD_PKCS11_MECHANISM" {
            *v = "aes-gcm".into();
        }
    }
    app.start();
    wait_ready(&app).await;
    decrypts(&app, &creds, &made, "under kwp").await;
    let (status, body) = app
        .post("/v1/admin/root-kek/rotate", &admin, &json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (_, st) = app.get("/v1/admin/root-kek", &admin).await;
        if st["rootKeks"].as_array().map(|k| k.len()) == Some(1) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{st}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    app.restart();
    wait_ready(&app).await;
    decrypts(&app, &creds, &made, "under kwp").await;
}
