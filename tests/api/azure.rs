//! The `azure-key-vault` master-key provider, through Azure's official crates,
//! against a fake of Key Vault's data plane and Entra ID's token endpoint
//! (tests/peers/azure_key_vault_fake.py: built from Azure's REST
//! specification, real RSA-OAEP-256, HTTPS with a throwaway CA, the bearer
//! challenge, the client-secret flow). Each test starts its own fake with its
//! own state folder, so it can stop it and start it again as the same vault.
//! What the fake does not prove is in docs/master-keys.md.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_error, random_master_key, send, Backend, Creds, TestApp};
use crate::providers::migrate;

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const CLIENT_ID: &str = "0f5fd1b4-c3d9-4a4a-8c3b-0a7d2e3b6c1d";
const SECRET: &str = "fake-client-secret-for-tests";

fn python() -> String {
    std::env::var("KEYWARD_TEST_PYTHON").unwrap_or_else(|_| {
        panic!("KEYWARD_TEST_PYTHON is not set: run the tests through scripts/test, which makes the peers' venv (pyca/cryptography)")
    })
}

/// The fake vault: one process on a fixed loopback port with its own state
/// (its CA, its RSA keys), stoppable and startable again as the same vault.
struct FakeVault {
    port: u16,
    state: tempfile::TempDir,
    child: Option<Child>,
}

impl FakeVault {
    fn start() -> FakeVault {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut fake = FakeVault {
            port,
            state: tempfile::tempdir().unwrap(),
            child: None,
        };
        fake.resume();
        fake
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn ca(&self) -> PathBuf {
        self.state.path().join("ca.pem")
    }

    fn resume(&mut self) {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/azure_key_vault_fake.py");
        let child = Command::new(python())
            .arg(script)
            .args(["--port", &self.port.to_string()])
            .arg("--state")
            .arg(self.state.path())
            .args([
                "--tenant",
                TENANT,
                "--client-id",
                CLIENT_ID,
                "--client-secret",
                SECRET,
            ])
            .args(["--key", "keyward-root", "--key", "other"])
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.state.path().join("fake.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(self.ca().exists()
            && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok())
        {
            assert!(
                Instant::now() < deadline,
                "the fake Key Vault did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for FakeVault {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.state.path().join("fake.log")).unwrap_or_default();
            eprintln!("the fake Key Vault's log:\n{log}");
        }
    }
}

fn azure_env(fake: &FakeVault, key: &str, secret: &str) -> Vec<(String, String)> {
    vec![
        (
            "KEYWARD_MASTER_KEY_PROVIDER".into(),
            "azure-key-vault".into(),
        ),
        ("KEYWARD_AZURE_KEY_VAULT_URL".into(), fake.url()),
        ("KEYWARD_AZURE_KEY_VAULT_KEY".into(), key.into()),
        (
            "KEYWARD_AZURE_KEY_VAULT_CA_FILE".into(),
            fake.ca().display().to_string(),
        ),
        // The fake answers on 127.0.0.1, not under the challenge's
        // vault.azure.net (see docs/master-keys.md).
        (
            "KEYWARD_AZURE_KEY_VAULT_VERIFY_CHALLENGE_RESOURCE".into(),
            "false".into(),
        ),
        ("KEYWARD_AZURE_CREDENTIAL".into(), "client-secret".into()),
        ("KEYWARD_AZURE_TENANT_ID".into(), TENANT.into()),
        ("KEYWARD_AZURE_CLIENT_ID".into(), CLIENT_ID.into()),
        ("KEYWARD_AZURE_CLIENT_SECRET".into(), secret.into()),
        // Entra ID is the fake too.
        ("AZURE_AUTHORITY_HOST".into(), fake.url()),
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
        assert!(Instant::now() < deadline, "not ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn decrypts(app: &TestApp, creds: &Creds, encrypted: &Value, data: &str) {
    let (status, body) = app.decrypt(creds, encrypted).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"], data);
}

fn start_fails(app: &mut TestApp, env: Vec<(String, String)>) -> String {
    app.extra_env = env;
    command_fails(app.serve_command())
}

/// Runs `serve`, which must stop with an error (a refusal stops the start at
/// once; an outage would keep it serving); returns its output.
fn command_fails(mut cmd: Command) -> String {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(!status.success());
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve kept running instead of stopping with an error");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

crate::on_both_databases!(azure_key_vault_provider_survives_restarts_and_outages);

/// Start (wrapkey), encrypt, restart (unwrapkey), decrypt; the vault gone
/// after start: serving from the root KEK in memory, ready; gone at start:
/// serving, not ready, `/readyz` naming the provider, ready once it is back.
async fn azure_key_vault_provider_survives_restarts_and_outages(backend: Backend) {
    let mut fake = FakeVault::start();
    let env = azure_env(&fake, "keyward-root", SECRET);
    let mut app = TestApp::spawn_with(backend, &as_refs(&env)).await;
    wait_ready(&app).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let first = app.encrypt(&creds, &enc, "wrapped by Key Vault").await;
    app.restart();
    wait_ready(&app).await;
    decrypts(&app, &creds, &first, "wrapped by Key Vault").await;
    let status = crate::providers::status(&app);
    assert_eq!(status[0]["provider"], "azure-key-vault", "{status:?}");
    assert!(
        !app.log_text().contains(SECRET),
        "the client secret is logged"
    );

    fake.stop();
    let second = app.encrypt(&creds, &enc, "vault down").await;
    decrypts(&app, &creds, &second, "vault down").await;
    app.rotate(&creds, &enc).await;
    let (status, body) = readiness(&app).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    app.restart();
    let (status, body) = readiness(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let reason = body["reason"].as_str().unwrap();
    assert!(reason.contains("`azure-key-vault` unavailable"), "{reason}");
    let (status, resp) = app
        .post(
            "/v1/encrypt",
            &creds,
            &json!({"encryptionId": enc, "data": "x"}),
        )
        .await;
    assert_error(status, &resp, 503, "not_ready");
    assert!(
        app.log_shows("unreachable at start").await,
        "the log says why"
    );

    fake.resume();
    wait_ready(&app).await;
    decrypts(&app, &creds, &first, "wrapped by Key Vault").await;
    decrypts(&app, &creds, &second, "vault down").await;
}

/// A wrong client secret and a key the vault does not have stop the start
/// with Entra ID's or Key Vault's reason, never retried like an outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_or_an_unknown_key_are_clear_startup_errors() {
    let fake = FakeVault::start();
    // A database whose root KEK the vault wrapped: unwrapkey is refused.
    let mut app = TestApp::spawn_with(
        Backend::Sqlite,
        &as_refs(&azure_env(&fake, "keyward-root", SECRET)),
    )
    .await;
    wait_ready(&app).await;
    app.stop();
    let err = start_fails(&mut app, azure_env(&fake, "keyward-root", "wrong-secret"));
    assert!(
        err.contains("AADSTS7000215") && err.contains("cannot unwrap root KEK"),
        "{err}"
    );
    assert!(!err.contains("wrong-secret"), "the secret is echoed: {err}");
    let err = start_fails(&mut app, azure_env(&fake, "no-such-key", SECRET));
    assert!(err.contains("KeyNotFound"), "{err}");

    // A new database, whose first start wraps a new root KEK: wrapkey is
    // refused the same way.
    let dir = tempfile::tempdir().unwrap();
    for (secret, key, want) in [
        ("wrong-secret", "keyward-root", "AADSTS7000215"),
        (SECRET, "no-such-key", "KeyNotFound"),
    ] {
        let mut cmd = crate::helpers::keyward_command();
        cmd.arg("serve")
            .env("KEYWARD_LISTEN", "127.0.0.1:0")
            .env(
                "KEYWARD_DATABASE_URL",
                format!("sqlite://{}", dir.path().join("new.db").display()),
            )
            .envs(azure_env(&fake, key, secret));
        let err = command_fails(cmd);
        assert!(err.contains(want), "{err}");
    }
}

/// env → azure-key-vault → env: every ciphertext made under each provider
/// decrypts after each migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_env_to_azure_key_vault_and_back_keeps_every_ciphertext() {
    let fake = FakeVault::start();
    let settings: Vec<(String, String)> = azure_env(&fake, "keyward-root", SECRET)
        .into_iter()
        .filter(|(k, _)| k != "KEYWARD_MASTER_KEY_PROVIDER")
        .collect();
    let with_provider = |p: &str| {
        let mut env = settings.clone();
        env.push(("KEYWARD_MASTER_KEY_PROVIDER".into(), p.into()));
        env
    };
    let mut app = TestApp::spawn_with(Backend::Sqlite, &as_refs(&with_provider("env"))).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let mut made = vec![(app.encrypt(&creds, &enc, "under env").await, "under env")];

    app.stop();
    migrate(&app, &with_provider("env"), "azure-key-vault");
    app.extra_env = with_provider("azure-key-vault");
    app.start();
    wait_ready(&app).await;
    for (e, d) in &made {
        decrypts(&app, &creds, e, d).await;
    }
    app.rotate(&creds, &enc).await;
    made.push((
        app.encrypt(&creds, &enc, "under azure").await,
        "under azure",
    ));

    app.stop();
    let new_key = random_master_key();
    let mut env = with_provider("azure-key-vault");
    env.push(("KEYWARD_MASTER_KEY".into(), new_key.clone()));
    migrate(&app, &env, "env");
    app.master_key = new_key;
    app.extra_env = with_provider("env");
    app.start();
    for (e, d) in &made {
        decrypts(&app, &creds, e, d).await;
    }
}

/// The fake's answers are the specification's examples with its own key in
/// them: every field of GetKey-example.json, wrapKey-example.json and
/// unwrapKey-example.json is there, and the RSA key is the one that wraps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_answers_in_the_shape_of_the_specifications_examples() {
    let fake = FakeVault::start();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls({
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile_certs(&fake.ca()) {
                roots.add(c).unwrap();
            }
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
        })
        .build()
        .unwrap();
    let examples =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/peers/azure_key_vault_examples");
    let example = |name: &str| -> Value {
        let v: Value =
            serde_json::from_slice(&std::fs::read(examples.join(name)).unwrap()).unwrap();
        v["responses"]["200"]["body"].clone()
    };
    // Unauthenticated: the challenge.
    let resp = client
        .get(format!("{}/keys/keyward-root?api-version=7.5", fake.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        challenge.starts_with("Bearer authorization=")
            && challenge.contains("resource=\"https://vault.azure.net\""),
        "{challenge}"
    );
    let token: Value = client
        .post(format!("{}/{TENANT}/oauth2/v2.0/token", fake.url()))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", CLIENT_ID),
            ("client_secret", SECRET),
            ("scope", "https://vault.azure.net/.default"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bearer = format!("Bearer {}", token["access_token"].as_str().unwrap());
    let call = |method: reqwest::Method, path: &str, body: Option<Value>| {
        let mut req = client
            .request(method, format!("{}{path}?api-version=7.5", fake.url()))
            .header("Authorization", &bearer);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let resp = req.send().await.unwrap();
            (resp.status(), resp.json::<Value>().await.unwrap())
        }
    };
    let keys_of = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let (status, key) = call(reqwest::Method::GET, "/keys/keyward-root", None).await;
    assert_eq!(status, 200);
    let want = example("GetKey-example.json");
    assert_eq!(keys_of(&key), keys_of(&want));
    assert_eq!(keys_of(&key["key"]), keys_of(&want["key"]));
    assert_eq!(key["key"]["kty"], "RSA");
    let plain = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8";
    let (status, wrapped) = call(
        reqwest::Method::POST,
        "/keys/keyward-root/wrapkey",
        Some(json!({"alg": "RSA-OAEP-256", "value": plain})),
    )
    .await;
    assert_eq!(status, 200, "{wrapped}");
    assert_eq!(keys_of(&wrapped), keys_of(&example("wrapKey-example.json")));
    assert_eq!(wrapped["kid"], key["key"]["kid"]);
    let version = wrapped["kid"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let (status, unwrapped) = call(
        reqwest::Method::POST,
        &format!("/keys/keyward-root/{version}/unwrapkey"),
        Some(json!({"alg": "RSA-OAEP-256", "value": wrapped["value"]})),
    )
    .await;
    assert_eq!(status, 200, "{unwrapped}");
    assert_eq!(
        keys_of(&unwrapped),
        keys_of(&example("unwrapKey-example.json"))
    );
    assert_eq!(unwrapped["value"], plain);
    let (status, err) = call(
        reqwest::Method::POST,
        &format!("/keys/other/{version}/unwrapkey"),
        Some(json!({"alg": "RSA-OAEP-256", "value": wrapped["value"]})),
    )
    .await;
    assert_eq!(
        (status.as_u16(), err["error"]["code"].as_str()),
        (404, Some("KeyNotFound"))
    );
}

fn rustls_pemfile_certs(path: &std::path::Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}
