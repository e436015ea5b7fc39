//! Client certificates without a ceremony: `keyward client-cert issue`
//! issues from the client CA Keyward holds and binds the API key in the same
//! step; `revoke` puts the certificate on the CRL every mutual-TLS listener
//! enforces, without a restart. Real TLS handshakes (rustls through reqwest),
//! a real second replica on PostgreSQL.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{keyward_command, Backend, Creds, TestApp};
use crate::on_both_databases;
use crate::pki::{https_client, Ca, CertFiles};

/// An app serving mutual TLS with an operator-provided client CA (the file),
/// and a client certificate of that CA for the calls that set things up.
struct Setup {
    app: TestApp,
    server_ca: PathBuf,
    file_ca: Ca,
    file_client: CertFiles,
    dir: tempfile::TempDir,
}

async fn spawn(backend: Backend) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let file_ca = Ca::new("Operator client CA");
    let server_ca = file_ca.write(dir.path(), "ca.pem");
    let server = file_ca.server(dir.path(), "server");
    let file_client = file_ca.client(dir.path(), "setup-client", 501, false);
    let env = [
        ("KEYWARD_TLS_CERT", server.cert.display().to_string()),
        ("KEYWARD_TLS_KEY", server.key.display().to_string()),
        ("KEYWARD_TLS_CLIENT_CA", server_ca.display().to_string()),
        ("KEYWARD_OPS_LISTEN", "127.0.0.1:0".to_string()),
        ("KEYWARD_METRICS_REFRESH_INTERVAL", "200ms".to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut app = TestApp::spawn_with(backend, &env).await;
    app.client = https_client(&server_ca, Some(&file_client));
    Setup {
        app,
        server_ca,
        file_ca,
        file_client,
        dir,
    }
}

/// Runs `keyward client-cert ARGS` on the app's database with its master key.
fn client_cert(app: &TestApp, args: &[&str]) -> std::process::Output {
    keyward_command()
        .arg("client-cert")
        .args(args)
        .env("KEYWARD_DATABASE_URL", &app.db.url)
        .env("KEYWARD_MASTER_KEY", &app.master_key)
        .env("KEYWARD_LOG_FORMAT", "json")
        .output()
        .expect("run keyward")
}

/// Issues a certificate for `creds`' key into `dir`; returns the JSON and
/// the files as a client certificate.
fn issue(app: &TestApp, creds: &Creds, dir: &Path, extra: &[&str]) -> (Value, CertFiles) {
    let mut args = vec![
        "issue",
        "--tenant",
        &creds.tenant_id,
        "--api-key",
        &creds.key,
        "--out",
        dir.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = client_cert(app, &args);
    assert!(
        out.status.success(),
        "client-cert issue failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let files = CertFiles {
        cert: PathBuf::from(v["certFile"].as_str().unwrap()),
        key: PathBuf::from(v["keyFile"].as_str().unwrap()),
    };
    (v, files)
}

/// POST /v1/encrypt over a new connection presenting `cert`: the status, or
/// the transport error (a refused handshake).
async fn encrypt_with(
    s: &Setup,
    app: &TestApp,
    cert: &CertFiles,
    creds: &Creds,
    enc: &str,
) -> Result<(StatusCode, Value), String> {
    let client = https_client(&s.server_ca, Some(cert));
    let resp = client
        .post(app.url("/v1/encrypt"))
        .header("x-api-key", &creds.key)
        .header("x-api-secret", &creds.secret)
        .json(&json!({"encryptionId": enc, "data": "over a Keyward client certificate"}))
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

/// Waits (up to 10 s) until a call with `cert` gets through (`true`) or is
/// refused at the handshake (`false`).
async fn wait_until(
    s: &Setup,
    app: &TestApp,
    cert: &CertFiles,
    creds: &Creds,
    enc: &str,
    accepted: bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let outcome = encrypt_with(s, app, cert, creds, enc).await;
        match (&outcome, accepted) {
            (Ok((StatusCode::OK, _)), true) | (Err(_), false) => return,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "still {outcome:?}, waiting for accepted={accepted}:\n{}",
            app.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metrics_text(app: &TestApp) -> String {
    let ops = crate::metrics::ops_addr(app).await;
    reqwest::get(format!("http://{ops}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn issued_certificate_calls_encrypt_over_mutual_tls_and_binds_its_key(backend: Backend) {
    let s = spawn(backend).await;
    let app = &s.app;
    let creds = app.create_tenant("client-cert");
    let (enc, _) = app.create_encryption(&creds).await;
    let out = s.dir.path().join("issued");
    let (issued, cert) = issue(app, &creds, &out, &[]);

    // 90 days by default; the key file is the owner's only.
    let not_after = time::OffsetDateTime::parse(
        issued["notAfter"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let days = (not_after - time::OffsetDateTime::now_utc()).whole_hours();
    assert!((89 * 24..=90 * 24).contains(&days), "{issued}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&cert.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    assert!(std::fs::read_to_string(&cert.key)
        .unwrap()
        .contains("PRIVATE KEY"));

    // The listener trusts the Keyward CA once the change feed announces it:
    // a client with that certificate and key encrypts.
    wait_until(&s, app, &cert, &creds, &enc, true).await;
    let (status, body) = encrypt_with(&s, app, &cert, &creds, &enc).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["cipherText"].is_string());

    // The key is bound to it: over the operator CA's (valid) certificate it
    // is refused, and so it is over another Keyward certificate.
    let (status, body) = encrypt_with(&s, app, &s.file_client, &creds, &enc)
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("certificate_mismatch"))
    );
    let other_key = app.create_key(&creds.tenant_id, "encrypt");
    let (_, other_cert) = issue(app, &other_key, &out, &[]);
    wait_until(&s, app, &other_cert, &other_key, &enc, true).await;
    let (status, body) = encrypt_with(&s, app, &other_cert, &creds, &enc)
        .await
        .unwrap();
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("certificate_mismatch"))
    );
    // Issuing for a key that is not the tenant's, or not live, is refused.
    let stranger = app.create_tenant("stranger");
    let refused = client_cert(
        app,
        &[
            "issue",
            "--tenant",
            &stranger.tenant_id,
            "--api-key",
            &creds.key,
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("no live API key"));

    // Both issues are audited, by the operator at the command line.
    let operator = app.create_operator();
    let (status, audit) = app
        .get("/v1/audit?operation=client_cert.issue", &operator)
        .await;
    assert_eq!(status, StatusCode::OK, "{audit}");
    let records = audit["records"].as_array().unwrap();
    assert_eq!(records.len(), 2, "{audit}");
    let record = records
        .iter()
        .find(|r| r["targetApiKeyId"] == creds.key.as_str())
        .unwrap_or_else(|| panic!("{audit}"));
    assert_eq!(record["actor"], "operator_cli");
    assert_eq!(record["outcome"], "ok");
    assert_eq!(record["tenantId"], creds.tenant_id.as_str());
    assert_eq!(
        record["clientSpkiSha256"],
        issued["spkiSha256"].as_str().unwrap()
    );

    // A certificate expiring within client_cert_expiry_warning (14 days)
    // shows in the unauthenticated gauge as a count, with no identifier;
    // the operator route names it.
    let soon_key = app.create_key(&creds.tenant_id, "encrypt");
    let (soon, _) = issue(app, &soon_key, &out, &["--lifetime", "2d"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = metrics_text(app).await;
        if metric(&text, "keyward_client_certificates_expiring_soon") == Some(1.0)
            && metric(&text, "keyward_client_certificates_bound") == Some(3.0)
        {
            break text;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for secret in [&creds.key, &soon_key.key, &creds.tenant_id] {
        assert!(!text.contains(secret.as_str()), "an identifier in /metrics");
    }
    assert!(!text.contains(soon["serial"].as_str().unwrap()));
    let (status, listed) = app.get("/v1/admin/client-certificates", &operator).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let certs = listed["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 3, "{listed}");
    // Soonest first: the two-day one.
    assert_eq!(certs[0]["apiKey"], soon_key.key.as_str());
    assert_eq!(certs[0]["serial"], soon["serial"]);
    assert!(certs[0]["secondsLeft"].as_i64().unwrap() <= 2 * 86_400);
    assert_eq!(certs[0]["bound"], true);
    // A tenant key does not reach it.
    let (status, _) = app.get("/v1/admin/client-certificates", &creds).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // The CLI lists them too.
    let listed = client_cert(app, &["list"]);
    assert!(listed.status.success());
    assert_eq!(String::from_utf8_lossy(&listed.stdout).lines().count(), 3);
}

async fn revocation_refuses_new_handshakes_on_every_replica_without_restart(backend: Backend) {
    let s = spawn(backend).await;
    let app = &s.app;
    let creds = app.create_tenant("revocation");
    let (enc, _) = app.create_encryption(&creds).await;
    let out = s.dir.path().join("issued");
    let (issued, cert) = issue(app, &creds, &out, &[]);
    // A second replica on the same PostgreSQL database (SQLite is one node).
    let replica = (backend == Backend::Postgres).then(|| app.spawn_replica(&[]));
    let apps: Vec<&TestApp> = std::iter::once(app).chain(replica.as_ref()).collect();
    for a in &apps {
        wait_until(&s, a, &cert, &creds, &enc, true).await;
    }

    // A kept-alive connection opened before the revocation, per replica.
    let open: Vec<reqwest::Client> = apps
        .iter()
        .map(|_| https_client(&s.server_ca, Some(&cert)))
        .collect();
    for (a, client) in apps.iter().zip(&open) {
        let resp = client
            .post(a.url("/v1/encrypt"))
            .header("x-api-key", &creds.key)
            .header("x-api-secret", &creds.secret)
            .json(&json!({"encryptionId": enc, "data": "before"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }

    let serial = issued["serial"].as_str().unwrap();
    let out_revoke = client_cert(app, &["revoke", "--serial", serial]);
    assert!(
        out_revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&out_revoke.stderr)
    );
    // Every replica refuses a new handshake with it, without a restart.
    let pids: Vec<u32> = apps.iter().map(|a| a.pid()).collect();
    for a in &apps {
        wait_until(&s, a, &cert, &creds, &enc, false).await;
        // The server says why (at debug level): the CRL lists it.
        assert!(encrypt_with(&s, a, &cert, &creds, &enc).await.is_err());
        assert!(
            a.log_shows("invalid peer certificate: Revoked").await,
            "{}",
            a.log_text()
        );
    }
    assert_eq!(pids, apps.iter().map(|a| a.pid()).collect::<Vec<_>>());
    // Review finding: the CRL refuses only new handshakes. The key bound to
    // the revoked certificate is refused on connections opened before, too
    // (its binding now matches no certificate), on every replica.
    for (a, client) in apps.iter().zip(&open) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let resp = client
                .post(a.url("/v1/encrypt"))
                .header("x-api-key", &creds.key)
                .header("x-api-secret", &creds.secret)
                .json(&json!({"encryptionId": enc, "data": "after"}))
                .send()
                .await;
            match resp {
                Ok(r) if r.status() == StatusCode::FORBIDDEN => {
                    let body: Value = r.json().await.unwrap();
                    assert_eq!(body["error"]["code"], "certificate_mismatch", "{body}");
                    break;
                }
                // Reconnected: the handshake is refused, as above.
                Err(_) => break,
                Ok(r) => assert!(
                    Instant::now() < deadline,
                    "a connection opened before the revocation still gets {}",
                    r.status()
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Revoking it again finds nothing live.
    assert!(!client_cert(app, &["revoke", "--serial", serial])
        .status
        .success());

    // Revocation by API key: a renewed certificate for the same key is
    // revoked with every other live one of it.
    let (_, renewed) = issue(app, &creds, &out, &["--days", "30"]);
    for a in &apps {
        wait_until(&s, a, &renewed, &creds, &enc, true).await;
    }
    let by_key = client_cert(app, &["revoke", "--api-key", &creds.key]);
    assert!(by_key.status.success());
    for a in &apps {
        wait_until(&s, a, &renewed, &creds, &enc, false).await;
    }
    // Certificates of the operator's own CA still work on every replica.
    let plain = app.create_key(&creds.tenant_id, "encrypt");
    for a in &apps {
        let (status, body) = encrypt_with(&s, a, &s.file_client, &plain, &enc)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // Both revocations are audited.
    let operator = app.create_operator();
    let (_, audit) = app
        .get("/v1/audit?operation=client_cert.revoke", &operator)
        .await;
    assert_eq!(audit["records"].as_array().unwrap().len(), 2, "{audit}");
}

async fn expired_and_foreign_certificates_are_refused(backend: Backend) {
    let s = spawn(backend).await;
    let app = &s.app;
    let creds = app.create_tenant("expiry");
    let (enc, _) = app.create_encryption(&creds).await;
    let out = s.dir.path().join("issued");
    let (_, first) = issue(app, &creds, &out, &[]);
    wait_until(&s, app, &first, &creds, &enc, true).await;

    // A certificate of the Keyward CA that has expired: refused.
    let (_, short) = issue(app, &creds, &out, &["--lifetime", "2s"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(encrypt_with(&s, app, &short, &creds, &enc).await.is_err());
    assert!(
        app.log_shows("invalid peer certificate: certificate expired")
            .await,
        "{}",
        app.log_text()
    );

    // A certificate of another CA, for the same subject: refused.
    let other = Ca::new("Keyward client CA");
    let foreign = other.client(s.dir.path(), "foreign", 9, false);
    assert!(encrypt_with(&s, app, &foreign, &creds, &enc).await.is_err());
    // Nor does an expired certificate of the operator's CA get through.
    let expired = s.file_ca.client(s.dir.path(), "expired", 10, true);
    assert!(encrypt_with(&s, app, &expired, &creds, &enc).await.is_err());
}

async fn a_root_kek_rotation_reseals_the_client_ca_key(backend: Backend) {
    let s = spawn(backend).await;
    let app = &s.app;
    let creds = app.create_tenant("reseal");
    let (enc, _) = app.create_encryption(&creds).await;
    let out = s.dir.path().join("issued");
    let (_, cert) = issue(app, &creds, &out, &[]);
    let ca_before = std::fs::read(out.join("keyward-client-ca.pem")).unwrap();
    let operator = app.create_operator();
    let (status, body) = app
        .post("/v1/admin/root-kek/rotate", &operator, &json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, st) = app.get("/v1/admin/root-kek", &operator).await;
        if st["rootKeks"].as_array().unwrap().len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "not retired: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The old KEK is gone; the same CA still signs (its key re-sealed) and
    // revokes.
    let (_, renewed) = issue(app, &creds, &out, &[]);
    assert_eq!(
        std::fs::read(out.join("keyward-client-ca.pem")).unwrap(),
        ca_before
    );
    wait_until(&s, app, &renewed, &creds, &enc, true).await;
    assert!(client_cert(app, &["revoke", "--api-key", &creds.key])
        .status
        .success());
    wait_until(&s, app, &renewed, &creds, &enc, false).await;
    wait_until(&s, app, &cert, &creds, &enc, false).await;
}

on_both_databases!(
    issued_certificate_calls_encrypt_over_mutual_tls_and_binds_its_key,
    revocation_refuses_new_handshakes_on_every_replica_without_restart,
    expired_and_foreign_certificates_are_refused,
    a_root_kek_rotation_reseals_the_client_ca_key,
);
