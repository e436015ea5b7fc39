//! The OpenAPI description against the real server, with two independent tools
//! from the test peers' venv (scripts/peers.sh installs them; a missing tool
//! fails these tests, it does not skip them):
//!
//! - schemathesis (`tests/peers/schemathesis.sh`) generates requests from the
//!   served spec, valid and invalid, once with an all-scopes tenant key and
//!   once with an operator key, and checks every answer: no 5xx, only
//!   documented status codes, content types and bodies, schema-violating input
//!   refused and schema-valid input accepted; its stateful phase follows the
//!   spec's links (create → encrypt → decrypt, rewrap, rotate → encrypt with
//!   the new version), so it decrypts ciphertexts the server made;
//! - openapi-python-client (`tests/peers/generated_client.py`) generates a
//!   typed Python client from `openapi/keyward.json` into a temporary folder
//!   and runs encrypt, decrypt and rotate through it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::helpers::{Backend, Creds, TestApp};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn venv() -> PathBuf {
    PathBuf::from(std::env::var("KEYWARD_PEER_VENV").expect(
        "KEYWARD_PEER_VENV is not set: run the tests through scripts/test \
         (it installs schemathesis and openapi-python-client into the peers' venv)",
    ))
}

/// The venv's Python (KEYWARD_TEST_PYTHON when set, as scripts/peers.sh exports it).
fn python() -> PathBuf {
    std::env::var("KEYWARD_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| venv().join("bin/python"))
}

#[track_caller]
fn assert_tool(path: &Path, what: &str) {
    assert!(
        path.is_file(),
        "{what} is missing at {}: `source scripts/peers.sh && ensure_peer_venv` installs it",
        path.display()
    );
}

/// A server whose brute-force lockout and per-address limit for requests
/// without credentials do not end the run: schemathesis sends missing and
/// wrong credentials on purpose, and after `auth_max_failures` of them from
/// one address every later request would be 429.
/// Returns it with an all-scopes key and an encryption (id, active version id).
async fn app_for_tools() -> (TestApp, Creds, (String, String)) {
    let env = [
        ("KEYWARD_AUTH_MAX_FAILURES", "1000000"),
        ("KEYWARD_UNAUTHENTICATED_RATE_LIMIT", "0"),
    ];
    let app = TestApp::spawn_with(Backend::Sqlite, &env).await;
    let creds = app.create_tenant("acme");
    let encryption = app.create_encryption(&creds).await;
    (app, creds, encryption)
}

/// Runs a peer script with the server's URL, credentials and encryption in its
/// environment.
async fn run_script(
    mut cmd: Command,
    app: &TestApp,
    creds: &Creds,
    (encryption_id, version_id): &(String, String),
) -> Output {
    cmd.current_dir(root())
        .env("KEYWARD_URL", app.url(""))
        .env("KEYWARD_API_KEY", &creds.key)
        .env("KEYWARD_API_SECRET", &creds.secret)
        .env("KEYWARD_ENCRYPTION_ID", encryption_id)
        .env("KEYWARD_VERSION_ID", version_id)
        .env("KEYWARD_TENANT_ID", &creds.tenant_id)
        .env("KEYWARD_PEER_VENV", venv())
        // A throwaway server and key: show the real values so the printed curl
        // commands reproduce a failure as they are.
        .env("KEYWARD_ST_SANITIZE", "false")
        .env_remove("KEYWARD_SPEC");
    tokio::task::spawn_blocking(move || cmd.output().expect("run the peer script"))
        .await
        .unwrap()
}

#[track_caller]
fn assert_script_passed(name: &str, out: &Output, app: &TestApp) {
    assert!(
        out.status.success(),
        "{name} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- server log (last 100 lines) ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        tail(&app.log_text(), 100),
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs tests/peers/schemathesis.sh with `creds` and checks it passed and the
/// server never answered 500 or panicked.
async fn schemathesis_passes(app: &TestApp, creds: &Creds, encryption: &(String, String)) {
    let st = venv().join("bin/st");
    assert_tool(&st, "schemathesis (st)");
    let mut cmd = Command::new("bash");
    cmd.arg(root().join("tests/peers/schemathesis.sh"))
        .env("KEYWARD_ST", &st);
    let out = run_script(cmd, app, creds, encryption).await;
    assert_script_passed("tests/peers/schemathesis.sh", &out, app);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("schemathesis.sh: OK"),
        "schemathesis.sh exited 0 without its OK line:\n{stdout}"
    );
    // Bad input never yields a 500, whatever schemathesis's verdict.
    let log = app.log_text();
    assert!(
        !log.contains("\"status\":500") && !log.contains("panicked"),
        "the server answered 500 or panicked during the run:\n{}",
        tail(&log, 100)
    );
}

/// How many `operation` records of `tenant` succeeded, read with an
/// operator key (which the run cannot revoke: it is not the tenant's).
async fn succeeded(app: &TestApp, operator: &Creds, tenant: &str, operation: &str) -> usize {
    let (status, page) = app
        .get(
            &format!("/v1/audit?tenantId={tenant}&operation={operation}&limit=1000"),
            operator,
        )
        .await;
    assert_eq!(status, 200, "{page}");
    page["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["outcome"] == "ok")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_with_a_tenant_key_finds_no_failure_and_decrypts_real_ciphertexts() {
    let (app, creds, encryption) = app_for_tools().await;
    let operator = app.create_operator();
    schemathesis_passes(&app, &creds, &encryption).await;
    // Only a ciphertext the server made decrypts: the stateful phase followed
    // the links (encrypt → decrypt, encrypt → rewrap → decrypt). The audit
    // table is written in batches: wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let decrypted = succeeded(&app, &operator, &creds.tenant_id, "decrypt").await;
        let rewrapped = succeeded(&app, &operator, &creds.tenant_id, "rewrap").await;
        if decrypted > 0 && rewrapped > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the run decrypted {decrypted} and rewrapped {rewrapped} real ciphertexts: \
             the spec's links were not followed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_with_an_operator_key_finds_no_failure() {
    let (app, creds, encryption) = app_for_tools().await;
    let operator = app.create_operator();
    let operator = Creds {
        // Bound to `{tenantId}` so the tenant routes get past 404.
        tenant_id: creds.tenant_id.clone(),
        ..operator
    };
    schemathesis_passes(&app, &operator, &encryption).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_generated_from_the_spec_encrypts_decrypts_and_rotates() {
    let python = python();
    assert_tool(&python, "the test venv's python");
    let generator = venv().join("bin/openapi-python-client");
    assert_tool(&generator, "openapi-python-client");
    let (app, creds, encryption) = app_for_tools().await;
    let mut cmd = Command::new(&python);
    cmd.arg(root().join("tests/peers/generated_client.py"))
        .env("KEYWARD_OPENAPI_PYTHON_CLIENT", &generator);
    let out = run_script(cmd, &app, &creds, &encryption).await;
    assert_script_passed("tests/peers/generated_client.py", &out, &app);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for step in [
        "decrypt: round trip equal",
        "rotate: new version",
        "the old ciphertext still decrypts",
        "400 decryption_failed",
        "OK",
    ] {
        assert!(stdout.contains(step), "no `{step}` in:\n{stdout}");
    }
    // The encryption now has two versions, the second active.
    let (status, body) = app
        .get(&format!("/v1/encryptions/{}", encryption.0), &creds)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["latestVersion"], 2, "{body}");
}
