//! Transport: TLS 1.3 only, mutual TLS, CRLs, certificate-bound API keys, reload
//! on SIGHUP, and the plain-HTTP guard. Tested with real peers: rustls (reqwest
//! and tokio-rustls), curl and openssl.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::{assert_error, keyward_command, random_master_key, Backend, TestApp};
use crate::pki::{client_config, https_client, Ca, CertFiles};

struct Setup {
    app: TestApp,
    ca_pem: std::path::PathBuf,
    ca: Ca,
    server: CertFiles,
    client: CertFiles,
    dir: tempfile::TempDir,
}

async fn spawn_mtls(with_crl_revoking: Option<u64>) -> Setup {
    spawn_mtls_with(with_crl_revoking, &[]).await
}

/// [`spawn_mtls`] with extra settings.
async fn spawn_mtls_with(with_crl_revoking: Option<u64>, extra: &[(&str, &str)]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Keyward test CA");
    let ca_pem = ca.write(dir.path(), "ca.pem");
    let server = ca.server(dir.path(), "server");
    let client = ca.client(dir.path(), "platform-a", 1001, false);
    let mut env = vec![
        (
            "KEYWARD_TLS_CERT".to_string(),
            server.cert.display().to_string(),
        ),
        (
            "KEYWARD_TLS_KEY".to_string(),
            server.key.display().to_string(),
        ),
        (
            "KEYWARD_TLS_CLIENT_CA".to_string(),
            ca_pem.display().to_string(),
        ),
        ("KEYWARD_OPS_LISTEN".to_string(), "127.0.0.1:0".to_string()),
    ];
    if let Some(serial) = with_crl_revoking {
        let crl = ca.crl(dir.path(), &[serial]);
        env.push((
            "KEYWARD_TLS_CLIENT_CRL".to_string(),
            crl.display().to_string(),
        ));
    }
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut app = TestApp::spawn_with(Backend::Sqlite, &env).await;
    app.client = https_client(&ca_pem, Some(&client));
    Setup {
        app,
        ca_pem,
        ca,
        server,
        client,
        dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_serves_a_valid_client_and_refuses_every_other() {
    let s = spawn_mtls(None).await;
    let creds = s.app.create_tenant("acme");
    let (enc, _) = s.app.create_encryption(&creds).await;
    let e = s.app.encrypt(&creds, &enc, "over mTLS").await;
    let (status, body) = s.app.decrypt(&creds, &e).await;
    assert_eq!(
        (status, body["data"].as_str()),
        (StatusCode::OK, Some("over mTLS"))
    );

    let other_ca = Ca::new("Another CA");
    let foreign = other_ca.client(s.dir.path(), "foreign", 7, false);
    let expired = s.ca.client(s.dir.path(), "expired", 8, true);
    let refused = [
        ("no client certificate", https_client(&s.ca_pem, None)),
        (
            "a certificate from another CA",
            https_client(&s.ca_pem, Some(&foreign)),
        ),
        (
            "an expired certificate",
            https_client(&s.ca_pem, Some(&expired)),
        ),
    ];
    for (what, client) in refused {
        let result = client.get(s.app.url("/healthz")).send().await;
        assert!(result.is_err(), "{what} was accepted: {result:?}");
    }

    // Health and readiness on the separate plain-HTTP ops listener need no certificate.
    wait_for_log(&s.app, "ops endpoints listening", 1).await;
    let log = s.app.log_text();
    let ops_addr = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "ops endpoints listening (plain HTTP)")
        .map(|v| v["addr"].as_str().unwrap().to_string())
        .expect("the ops listener is logged");
    let plain = crate::helpers::http_client();
    for path in ["/healthz", "/readyz"] {
        let resp = plain
            .get(format!("http://{ops_addr}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{path}");
    }
    let resp = plain
        .get(format!("http://{ops_addr}/v1/encryptions"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.status(),
        StatusCode::NOT_FOUND,
        "the API is not on the ops listener"
    );

    // The client identity reaches the logs; no key does.
    let log = s.app.log_text();
    assert!(log.contains("CN=platform-a"), "{log}");
    let spki = crate::pki_spki_hex(&s.client.cert);
    assert!(log.contains(&spki), "the client's SPKI hash is not logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_is_refused_and_http2_works_with_curl() {
    let s = spawn_mtls(None).await;
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", s.app.port()),
            "-tls1_2",
        ])
        .arg("-cert")
        .arg(&s.client.cert)
        .arg("-key")
        .arg(&s.client.key)
        .arg("-CAfile")
        .arg(&s.ca_pem)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "TLS 1.2 handshake succeeded:\n{text}"
    );
    assert!(
        text.contains("protocol version") || text.contains("Cipher is (NONE)"),
        "{text}"
    );

    // TLS 1.3 with openssl works, with one of the three suites.
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{}", s.app.port()),
            "-tls1_3",
            "-ciphersuites",
            "TLS_CHACHA20_POLY1305_SHA256",
        ])
        .arg("-cert")
        .arg(&s.client.cert)
        .arg("-key")
        .arg(&s.client.key)
        .arg("-CAfile")
        .arg(&s.ca_pem)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("TLS_CHACHA20_POLY1305_SHA256"), "{text}");

    let creds = s.app.create_tenant("acme");
    let (enc, _) = s.app.create_encryption(&creds).await;
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "-w",
            "\n%{http_version} %{http_code}",
            "--cacert",
        ])
        .arg(&s.ca_pem)
        .arg("--cert")
        .arg(&s.client.cert)
        .arg("--key")
        .arg(&s.client.key)
        .args([
            "-H",
            "Content-Type: application/json",
            "-H",
            &format!("X-Api-Key: {}", creds.key),
            "-H",
            &format!("X-Api-Secret: {}", creds.secret),
        ])
        .args([
            "-d",
            &json!({"encryptionId": enc, "data": "via curl"}).to_string(),
        ])
        .arg(s.app.url("/v1/encrypt"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.ends_with("\n2 200"),
        "curl over HTTP/2: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("cipherText"));

    // Without a client certificate curl fails at the handshake.
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&s.ca_pem)
        .arg(s.app.url("/healthz"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_certificate_fails_the_handshake() {
    let s = spawn_mtls(Some(2002)).await;
    let revoked = s.ca.client(s.dir.path(), "revoked", 2002, false);
    let result = https_client(&s.ca_pem, Some(&revoked))
        .get(s.app.url("/healthz"))
        .send()
        .await;
    assert!(result.is_err(), "a revoked certificate was accepted");
    let (status, _) = crate::helpers::send(s.app.client.get(s.app.url("/healthz"))).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "a certificate not on the CRL still works"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_bound_key_works_only_with_its_certificate() {
    let mut s = spawn_mtls(None).await;
    let admin = s.app.create_tenant("acme");
    let (enc, _) = s.app.create_encryption(&admin).await;
    let other = s.ca.client(s.dir.path(), "platform-b", 1002, false);

    let out = s.app.cli(&[
        "apikey",
        "create",
        "--tenant",
        &admin.tenant_id,
        "--scopes",
        "encrypt",
        "--json",
        "--bind-cert",
        s.client.cert.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["boundCertificateSpkiSha256"],
        crate::pki_spki_hex(&s.client.cert)
    );
    let bound = crate::helpers::Creds {
        tenant_id: admin.tenant_id.clone(),
        key: v["apiKey"].as_str().unwrap().into(),
        secret: v["apiSecret"].as_str().unwrap().into(),
    };
    let body = json!({"encryptionId": enc, "data": "x"});

    let (status, resp) = s.app.post("/v1/encrypt", &bound, &body).await;
    assert_eq!(status, StatusCode::OK, "{resp}");

    s.app.client = https_client(&s.ca_pem, Some(&other));
    let (status, resp) = s.app.post("/v1/encrypt", &bound, &body).await;
    assert_error(status, &resp, 403, "certificate_mismatch");
    // An unbound key works with any certificate the CA accepts.
    let (status, _) = s.app.post("/v1/encrypt", &admin, &body).await;
    assert_eq!(status, StatusCode::OK);

    // The audit log names the certificate of each call, and the refusal.
    let (status, page) = s.app.get("/v1/audit?operation=encrypt", &admin).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let records = page["records"].as_array().unwrap();
    let spki_b = crate::pki_spki_hex(&other.cert);
    let mismatch = records
        .iter()
        .find(|r| r["error"] == "certificate_mismatch")
        .expect("the refused call is audited");
    assert_eq!(mismatch["clientSpkiSha256"], spki_b.as_str());
    assert!(mismatch["clientSubject"]
        .as_str()
        .unwrap()
        .contains("platform-b"));
    assert!(records.iter().any(|r| r["outcome"] == "ok"
        && r["clientSpkiSha256"] == crate::pki_spki_hex(&s.client.cert).as_str()));
}

/// One HTTP/1.1 request on an open TLS stream; returns the status code.
async fn get_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(stream: &mut S) -> u16 {
    try_get_on(stream).await.expect("connection closed")
}

/// `GET /healthz` on an open connection: its status, or `None` if the
/// connection is closed.
async fn try_get_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
) -> Option<u16> {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return Some(text[9..12].parse().unwrap());
            }
        }
    }
}

async fn connect(
    port: u16,
    config: rustls::ClientConfig,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut config = config;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap()
}

fn presented(stream: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> Vec<u8> {
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der(path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path).unwrap().to_vec()
}

async fn wait_for_log(app: &TestApp, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.log_text().matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "no `{needle}` in the log:\n{}",
            app.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificates_while_open_connections_keep_working() {
    let s = spawn_mtls(None).await;
    let config = client_config(&s.ca_pem, Some(&s.client));
    let mut old_conn = connect(s.app.port(), config.clone()).await;
    assert_eq!(get_on(&mut old_conn).await, 200);
    assert_eq!(presented(&old_conn), der(&s.server.cert));

    // New server certificate and key at the same paths, then SIGHUP.
    let renewed = s.ca.server(s.dir.path(), "renewed");
    std::fs::copy(&renewed.cert, &s.server.cert).unwrap();
    std::fs::copy(&renewed.key, &s.server.key).unwrap();
    Command::new("kill")
        .args(["-HUP", &s.app.pid().to_string()])
        .status()
        .unwrap();
    wait_for_log(&s.app, "reloaded the TLS", 1).await;

    let mut new_conn = connect(s.app.port(), config.clone()).await;
    assert_eq!(
        presented(&new_conn),
        der(&renewed.cert),
        "a new connection sees the new certificate"
    );
    assert_eq!(get_on(&mut new_conn).await, 200);
    assert_eq!(
        get_on(&mut old_conn).await,
        200,
        "the open keep-alive connection still works"
    );

    // A broken file keeps the previous configuration.
    std::fs::write(&s.server.cert, "not a certificate").unwrap();
    Command::new("kill")
        .args(["-HUP", &s.app.pid().to_string()])
        .status()
        .unwrap();
    wait_for_log(&s.app, "kept the previous TLS configuration", 1).await;
    let mut after_bad = connect(s.app.port(), config).await;
    assert_eq!(presented(&after_bad), der(&renewed.cert));
    assert_eq!(get_on(&mut after_bad).await, 200);
    assert_eq!(get_on(&mut old_conn).await, 200);
}

/// Issue #17: the CRL is checked at the handshake, so a client whose
/// certificate was revoked (CRL reloaded on SIGHUP) kept working for as long
/// as it kept its connection busy. At `connection_max_age` the server closes
/// the connection, and the client's next handshake is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_loses_its_open_connection_at_the_max_age() {
    let s = spawn_mtls_with(Some(9999), &[("KEYWARD_CONNECTION_MAX_AGE", "3s")]).await;
    let config = client_config(&s.ca_pem, Some(&s.client));
    let mut conn = connect(s.app.port(), config).await;
    let opened = Instant::now();
    assert_eq!(get_on(&mut conn).await, 200);

    // Revoke the client's certificate (serial 1001) and reload.
    s.ca.crl(s.dir.path(), &[9999, 1001]);
    Command::new("kill")
        .args(["-HUP", &s.app.pid().to_string()])
        .status()
        .unwrap();
    wait_for_log(&s.app, "reloaded the TLS", 1).await;
    let refused = https_client(&s.ca_pem, Some(&s.client))
        .get(s.app.url("/healthz"))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "a new connection with the revoked certificate was accepted"
    );

    // The open connection, kept busy, works until its max age, then closes.
    let closed_at = loop {
        assert!(
            opened.elapsed() < Duration::from_secs(8),
            "still open after 8 s"
        );
        match try_get_on(&mut conn).await {
            Some(status) => assert_eq!(status, 200),
            None => break opened.elapsed(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        closed_at >= Duration::from_millis(2800),
        "closed after {closed_at:?}"
    );
}

#[test]
fn plain_http_on_a_non_loopback_address_needs_an_explicit_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("k.db").display());
    let key = random_master_key();
    let out = keyward_command()
        .arg("serve")
        .env("KEYWARD_DATABASE_URL", &db)
        .env("KEYWARD_MASTER_KEY", &key)
        .env("KEYWARD_LISTEN", "0.0.0.0:0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refusing to serve plain HTTP") && err.contains("KEYWARD_ALLOW_PLAINTEXT"),
        "{err}"
    );

    let mut child = keyward_command()
        .arg("serve")
        .env("KEYWARD_DATABASE_URL", &db)
        .env("KEYWARD_MASTER_KEY", &key)
        .env("KEYWARD_LISTEN", "0.0.0.0:0")
        .env("KEYWARD_ALLOW_PLAINTEXT", "true")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.contains("listening") {
        let mut buf = [0u8; 4096];
        let n = std::io::Read::read(&mut stderr, &mut buf).unwrap();
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        assert!(n > 0 && Instant::now() < deadline, "{seen}");
    }
    assert!(
        seen.contains("plain HTTP on a non-loopback address"),
        "{seen}"
    );
    child.kill().unwrap();
    child.wait().unwrap();

    // Half a TLS configuration is a clear error too.
    let out = keyward_command()
        .arg("serve")
        .env("KEYWARD_DATABASE_URL", &db)
        .env("KEYWARD_MASTER_KEY", &key)
        .env(
            "KEYWARD_TLS_CERT",
            dir.path().join("k.db").to_str().unwrap(),
        )
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("KEYWARD_TLS_KEY"));
}

/// Security review of #17: the TLS handshake had 10 s, inside a connection
/// slot, and a connection could then sit silent for the idle timeout, so
/// connections that never finish (or never start) a handshake filled the
/// listener without a certificate. A connection must now be through its
/// handshake and have sent its first request within
/// `connection_first_request_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_connections_that_never_handshake_or_never_ask_are_closed_at_the_first_request_timeout()
{
    let s = spawn_mtls_with(
        None,
        &[
            ("KEYWARD_CONNECTION_FIRST_REQUEST_TIMEOUT", "1s"),
            ("KEYWARD_CONNECTION_IDLE_TIMEOUT", "60s"),
        ],
    )
    .await;
    let port = s.app.port();
    let config = client_config(&s.ca_pem, Some(&s.client));
    // Plain TCP, no ClientHello ever.
    let opened = Instant::now();
    let mut no_handshake = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    // A whole handshake, then nothing.
    let mut no_request = connect(port, config.clone()).await;
    // A whole handshake and a request in time: lives by the idle timeout.
    let mut asked = connect(port, config).await;
    crate::connections::healthz_over(&mut asked).await;
    let closed = crate::connections::closed_within(&mut no_handshake, Duration::from_secs(5))
        .await
        .map(|_| opened.elapsed());
    assert!(
        closed.is_some_and(|at| at >= Duration::from_millis(800)),
        "no handshake: closed at {closed:?}"
    );
    let closed = crate::connections::closed_within(&mut no_request, Duration::from_secs(5))
        .await
        .map(|_| opened.elapsed());
    assert!(
        closed.is_some_and(|at| at >= Duration::from_millis(800)),
        "no request: closed at {closed:?}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    crate::connections::healthz_over(&mut asked).await;
}
