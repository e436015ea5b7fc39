//! The `tpm` master-key provider against swtpm, a software TPM 2.0 (libtpms,
//! the TPM reference implementation) on loopback TCP. scripts/test installs
//! swtpm and tpm2-tools (scripts/peers.sh, `ensure_swtpm`) and starts one
//! (`KEYWARD_TEST_SWTPM_TCTI`); the tests that need a TPM of their own (one to
//! stop and start again, a second TPM, PCRs to change) start their own swtpm
//! with a fresh state folder, which is a new TPM with a new owner seed.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_error, random_master_key, send, Backend, Creds, TestApp};
use crate::providers::migrate;

fn swtpm_bin() -> String {
    std::env::var("KEYWARD_TEST_SWTPM_BIN").unwrap_or_else(|_| "swtpm".into())
}

/// One swtpm process on two fixed loopback ports with its own state folder;
/// stopped and started again it is the same TPM (same owner seed).
struct Swtpm {
    port: u16,
    state: tempfile::TempDir,
    child: Option<Child>,
}

/// A port whose next port is free too (swtpm's control channel).
fn free_port_pair() -> u16 {
    loop {
        let first = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

impl Swtpm {
    /// A new TPM (fresh state), started.
    fn start() -> Swtpm {
        let mut tpm = Swtpm {
            port: free_port_pair(),
            state: tempfile::tempdir().unwrap(),
            child: None,
        };
        tpm.resume();
        tpm
    }

    fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Starts (again) on the same ports and state.
    fn resume(&mut self) {
        assert!(self.child.is_none());
        let child = Command::new(swtpm_bin())
            .args(["socket", "--tpm2", "--server"])
            .arg(format!("type=tcp,bindaddr=127.0.0.1,port={}", self.port))
            .arg("--ctrl")
            .arg(format!(
                "type=tcp,bindaddr=127.0.0.1,port={}",
                self.port + 1
            ))
            .args(["--flags", "not-need-init,startup-clear", "--tpmstate"])
            .arg(format!("dir={}", self.state.path().display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm: run the tests through scripts/test, which installs it");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "swtpm did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the process (SIGTERM, then waits): the TPM is gone.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            crate::helpers::signal(&child, "TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Runs a tpm2-tools command against this TPM.
    fn tool(&self, args: &[&str]) {
        let out = Command::new(args[0])
            .args(&args[1..])
            .arg("-T")
            .arg(self.tcti())
            .output()
            .unwrap_or_else(|e| panic!("{}: {e} (scripts/test installs tpm2-tools)", args[0]));
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[allow(dead_code)]
    fn state_dir(&self) -> PathBuf {
        self.state.path().to_path_buf()
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tpm_env(tcti: &str) -> Vec<(String, String)> {
    vec![
        ("KEYWARD_MASTER_KEY_PROVIDER".into(), "tpm".into()),
        ("KEYWARD_TPM_TCTI".into(), tcti.into()),
    ]
}

fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

async fn readiness(app: &TestApp) -> (StatusCode, Value) {
    send(app.client.get(app.url("/readyz"))).await
}

async fn wait_ready(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = readiness(app).await;
        if status == StatusCode::OK {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not ready: {body}\n{}",
            app.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn decrypts(app: &TestApp, creds: &Creds, encrypted: &Value, data: &str) {
    let (status, body) = app.decrypt(creds, encrypted).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"], data);
}

/// `serve` on `app`'s database with `env` fails at start; returns its stderr.
fn start_fails(app: &mut TestApp, env: Vec<(String, String)>) -> String {
    app.extra_env = env;
    let out = app.serve_command().output().unwrap();
    assert!(!out.status.success(), "serve started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

crate::on_both_databases!(tpm_provider_seals_unseals_after_restart_and_survives_outages);

/// Seal (the first start wraps the root KEK), encrypt, restart (unseal),
/// decrypt; the TPM stopped after start: still serving from the root KEK in
/// memory, and ready; stopped at start: serving, not ready, saying which
/// provider, then ready once the TPM is back.
async fn tpm_provider_seals_unseals_after_restart_and_survives_outages(backend: Backend) {
    let mut tpm = Swtpm::start();
    let mut app = TestApp::spawn_with(backend, &as_refs(&tpm_env(&tpm.tcti()))).await;
    wait_ready(&app).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let first = app.encrypt(&creds, &enc, "sealed by the TPM").await;
    app.restart();
    wait_ready(&app).await;
    decrypts(&app, &creds, &first, "sealed by the TPM").await;
    let status = crate::providers::status(&app);
    assert_eq!(status[0]["provider"], "tpm", "{status:?}");

    // The TPM goes away: encrypt, decrypt and rotate do not need it.
    tpm.stop();
    let second = app.encrypt(&creds, &enc, "TPM down").await;
    decrypts(&app, &creds, &second, "TPM down").await;
    decrypts(&app, &creds, &first, "sealed by the TPM").await;
    app.rotate(&creds, &enc).await;
    let (status, body) = readiness(&app).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Restarted while the TPM is away: not ready, and saying why.
    app.restart();
    let (status, body) = readiness(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], "not_ready");
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.contains("`tpm` unavailable"), "{reason}");
    let (status, resp) = app
        .post(
            "/v1/encrypt",
            &creds,
            &json!({"encryptionId": enc, "data": "x"}),
        )
        .await;
    assert_error(status, &resp, 503, "not_ready");
    assert!(
        app.log_shows("cannot reach the TPM").await,
        "the log says why"
    );

    tpm.resume();
    wait_ready(&app).await;
    decrypts(&app, &creds, &first, "sealed by the TPM").await;
    decrypts(&app, &creds, &second, "TPM down").await;
}

/// A fresh swtpm state is a different TPM (another owner seed): it cannot
/// load the sealed wrapping key, and Keyward stops at start saying so, not
/// retrying as if it were an outage. The right TPM still works after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_tpm_cannot_unseal_and_start_says_so() {
    let tpm = Swtpm::start();
    let mut app = TestApp::spawn_with(Backend::Sqlite, &as_refs(&tpm_env(&tpm.tcti()))).await;
    wait_ready(&app).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let made = app.encrypt(&creds, &enc, "only this TPM").await;
    app.stop();

    let other = Swtpm::start();
    let err = start_fails(&mut app, tpm_env(&other.tcti()));
    assert!(
        err.contains("sealed by a different TPM") && err.contains(&other.tcti()),
        "{err}"
    );
    drop(other);

    app.extra_env = tpm_env(&tpm.tcti());
    app.start();
    wait_ready(&app).await;
    decrypts(&app, &creds, &made, "only this TPM").await;
}

/// Sealed to PCR 16 (the debug PCR, which tpm2-tools may extend and reset):
/// unseals while it is unchanged, refuses with a clear startup error once it
/// is extended, and unseals again once it holds the sealed value again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sealed_to_pcrs_unseals_only_while_they_hold_their_values() {
    let tpm = Swtpm::start();
    let mut env = tpm_env(&tpm.tcti());
    env.push(("KEYWARD_TPM_PCRS".into(), "16".into()));
    let mut app = TestApp::spawn_with(Backend::Sqlite, &as_refs(&env)).await;
    wait_ready(&app).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let made = app.encrypt(&creds, &enc, "bound to PCR 16").await;
    app.restart();
    wait_ready(&app).await;
    decrypts(&app, &creds, &made, "bound to PCR 16").await;
    app.stop();

    tpm.tool(&[
        "tpm2_pcrextend",
        "16:sha256=0101010101010101010101010101010101010101010101010101010101010101",
    ]);
    let err = start_fails(&mut app, env.clone());
    assert!(
        err.contains("no longer hold the values") && err.contains("(16)"),
        "{err}"
    );

    tpm.tool(&["tpm2_pcrreset", "16"]);
    app.extra_env = env;
    app.start();
    wait_ready(&app).await;
    decrypts(&app, &creds, &made, "bound to PCR 16").await;
}

/// env → tpm → env: every ciphertext made under each provider decrypts
/// after each migration; the old provider then fails the key check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_env_to_tpm_and_back_keeps_every_ciphertext() {
    let tcti = std::env::var("KEYWARD_TEST_SWTPM_TCTI").unwrap_or_else(|_| {
        panic!("KEYWARD_TEST_SWTPM_TCTI is not set: run the tests through scripts/test, which starts swtpm")
    });
    let tpm_settings = vec![("KEYWARD_TPM_TCTI".to_string(), tcti.clone())];
    let with_provider = |p: &str| {
        let mut env = tpm_settings.clone();
        env.push(("KEYWARD_MASTER_KEY_PROVIDER".into(), p.into()));
        env
    };
    let mut app = TestApp::spawn_with(Backend::Sqlite, &as_refs(&with_provider("env"))).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let mut made = vec![(app.encrypt(&creds, &enc, "under env").await, "under env")];

    app.stop();
    migrate(&app, &with_provider("env"), "tpm");
    let err = start_fails(&mut app, with_provider("env"));
    assert!(
        err.contains("the master key does not match") && err.contains("tpm"),
        "{err}"
    );
    app.extra_env = with_provider("tpm");
    app.start();
    wait_ready(&app).await;
    for (e, d) in &made {
        decrypts(&app, &creds, e, d).await;
    }
    app.rotate(&creds, &enc).await;
    made.push((app.encrypt(&creds, &enc, "under tpm").await, "under tpm"));

    // Back to env, under a new master key.
    app.stop();
    let new_key = random_master_key();
    let mut env = with_provider("tpm");
    env.push(("KEYWARD_MASTER_KEY".into(), new_key.clone()));
    migrate(&app, &env, "env");
    app.master_key = new_key;
    app.extra_env = with_provider("env");
    app.start();
    for (e, d) in &made {
        decrypts(&app, &creds, e, d).await;
    }
    let err = {
        app.stop();
        start_fails(&mut app, with_provider("tpm"))
    };
    assert!(
        err.contains("wrapped by the `env` master-key provider"),
        "{err}"
    );
}
