//! The server certificate through ACME, against Pebble (Let's Encrypt's test
//! server, started by `scripts/peers.sh`'s `start_pebble`, which `scripts/test`
//! runs): first issuance, verification against Pebble's root, renewal of a
//! short-lived certificate under a keep-alive connection, an ACME server down
//! at renewal time, and replicas sharing one certificate. Without Pebble these
//! tests fail; they do not skip.
//!
//! Pebble runs with PEBBLE_VA_ALWAYS_VALID=1 (see scripts/peers.sh): it does
//! not connect back to the challenge listener, so these tests prove the ACME
//! exchange and the certificate's life in Keyward, not the CA's validation.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::{Backend, TestApp, TestDatabase};
use crate::on_both_databases;
use crate::pki::https_client;

/// The Pebble `start_pebble` runs.
struct Pebble {
    directory: String,
    ca: PathBuf,
    management: String,
    validity: u64,
}

fn pebble() -> Pebble {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: start Pebble first (scripts/peers.sh start_pebble; scripts/test does)")
        })
    };
    Pebble {
        directory: var("KEYWARD_TEST_PEBBLE_DIRECTORY"),
        ca: PathBuf::from(var("KEYWARD_TEST_PEBBLE_CA")),
        management: var("KEYWARD_TEST_PEBBLE_MANAGEMENT"),
        validity: var("KEYWARD_TEST_PEBBLE_VALIDITY").parse().unwrap(),
    }
}

impl Pebble {
    /// The root the certificates Pebble issues chain to, fetched from its
    /// management API, written to `dir`.
    async fn root(&self, dir: &std::path::Path) -> PathBuf {
        let client = https_client(&self.ca, None);
        let pem = client
            .get(format!("{}/roots/0", self.management))
            .send()
            .await
            .expect("Pebble's management API answers")
            .text()
            .await
            .unwrap();
        assert!(pem.contains("BEGIN CERTIFICATE"), "{pem}");
        let path = dir.join("pebble-root.pem");
        std::fs::write(&path, pem).unwrap();
        path
    }
}

/// ACME settings for an app whose directory is `directory`.
fn acme_env(directory: &str, ca: &std::path::Path) -> Vec<(String, String)> {
    [
        ("KEYWARD_ACME_DIRECTORY", directory.to_string()),
        ("KEYWARD_ACME_DOMAINS", "localhost".to_string()),
        ("KEYWARD_ACME_CONTACT", "mailto:ops@example.com".to_string()),
        ("KEYWARD_ACME_DIRECTORY_CA", ca.display().to_string()),
        ("KEYWARD_ACME_CHALLENGE_LISTEN", "127.0.0.1:0".to_string()),
        ("KEYWARD_ACME_CHECK_INTERVAL", "1s".to_string()),
        ("KEYWARD_ACME_RETRY_MIN", "1s".to_string()),
        ("KEYWARD_ACME_RETRY_MAX", "4s".to_string()),
        ("KEYWARD_OPS_LISTEN", "127.0.0.1:0".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// The certificate chain the server presents to a new connection verified
/// against `root`, or the handshake's error.
async fn presented_chain(port: u16, root: &std::path::Path) -> Result<Vec<Vec<u8>>, String> {
    crate::helpers::install_crypto_provider();
    let mut config = crate::pki::client_config(root, None);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, session) = tls.get_ref();
    Ok(session
        .peer_certificates()
        .unwrap()
        .iter()
        .map(|c| c.to_vec())
        .collect())
}

/// The serial (hex) and notAfter (Unix s) of a DER certificate.
fn serial_and_expiry(der: &[u8]) -> (String, i64) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    (
        cert.raw_serial_as_string(),
        cert.validity().not_after.timestamp(),
    )
}

/// Waits (up to `within`) until the server presents a certificate that
/// verifies against `root` and whose serial is not `not`; returns its serial and notAfter.
async fn wait_for_certificate(
    app: &TestApp,
    root: &std::path::Path,
    not: Option<&str>,
    within: Duration,
) -> (String, i64) {
    let deadline = Instant::now() + within;
    let mut last;
    loop {
        match presented_chain(app.port(), root).await {
            Ok(chain) => {
                let (serial, expiry) = serial_and_expiry(&chain[0]);
                if Some(serial.as_str()) != not {
                    return (serial, expiry);
                }
                last = format!("still serial {serial}");
            }
            Err(e) => last = e,
        }
        assert!(
            Instant::now() < deadline,
            "no new certificate within {within:?} (last: {last}):\n{}",
            app.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn readyz(_app: &TestApp, ops: &str) -> (u16, Value) {
    let r = reqwest::get(format!("http://{ops}/readyz")).await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

async fn metrics_text(ops: &str) -> String {
    reqwest::get(format!("http://{ops}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A metric's value in a Prometheus text scrape.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn first_issuance_is_served_and_verifies_against_pebbles_root(backend: Backend) {
    let pebble = pebble();
    let dir = tempfile::tempdir().unwrap();
    let root = pebble.root(dir.path()).await;
    let env = acme_env(&pebble.directory, &pebble.ca);
    let mut app = TestApp::spawn_with(backend, &as_refs(&env)).await;
    let (serial, not_after) =
        wait_for_certificate(&app, &root, None, Duration::from_secs(60)).await;
    assert!(!serial.is_empty());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(not_after > now && not_after <= now + pebble.validity as i64 + 5);

    // The leaf is for the configured domain, issued by Pebble's intermediate.
    let chain = presented_chain(app.port(), &root).await.unwrap();
    assert!(chain.len() >= 2, "leaf and intermediate");
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert!(format!("{:?}", san.value).contains("localhost"));
    assert!(leaf.issuer().to_string().contains("Pebble Intermediate"));

    // A client verifying against Pebble's root uses the API over it.
    app.client = https_client(&root, None);
    let creds = app.create_tenant("acme-tenant");
    let (enc, _) = app.create_encryption(&creds).await;
    let e = app.encrypt(&creds, &enc, "over an ACME certificate").await;
    let (status, body) = app.decrypt(&creds, &e).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"], "over an ACME certificate");

    // A client trusting another root refuses the handshake: it is verified.
    let other = crate::pki::Ca::new("not Pebble");
    let other_pem = other.write(dir.path(), "other.pem");
    let err = presented_chain(app.port(), &other_pem).await.unwrap_err();
    assert!(
        err.contains("UnknownIssuer") || err.contains("invalid peer certificate"),
        "{err}"
    );

    // Readiness details the certificate; the metric carries its expiry.
    let ops = crate::metrics::ops_addr(&app).await;
    let (code, body) = readyz(&app, &ops).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["certificate"]["failures"], 0, "{body}");
    assert!(body["certificate"]["notAfter"].is_string(), "{body}");
    let m = metrics_text(&ops).await;
    let expiry = metric(&m, "keyward_server_certificate_expiry_timestamp_seconds").unwrap();
    assert!(expiry as i64 >= not_after - 1, "{expiry} vs {not_after}");
    assert!(app.log_shows("ACME: obtained the server certificate").await);

    // The key never reaches the log; a restart serves the stored certificate
    // without ordering again.
    assert!(!app.log_text().contains("PRIVATE KEY"));
    app.restart();
    let (again, _) = wait_for_certificate(&app, &root, None, Duration::from_secs(20)).await;
    // Either the same (stored) certificate or, if renewal fell due meanwhile, a new one.
    let restarted_log = app.log_text();
    let orders = restarted_log
        .matches("ACME: obtained the server certificate")
        .count();
    assert!(again == serial || orders >= 2, "{restarted_log}");
    assert!(restarted_log.contains("ACME: serving the stored server certificate"));
}

async fn renewal_swaps_the_certificate_while_a_keep_alive_client_keeps_working(backend: Backend) {
    let pebble = pebble();
    let dir = tempfile::tempdir().unwrap();
    let root = pebble.root(dir.path()).await;
    let env = acme_env(&pebble.directory, &pebble.ca);
    let mut app = TestApp::spawn_with(backend, &as_refs(&env)).await;
    let (first, first_expiry) =
        wait_for_certificate(&app, &root, None, Duration::from_secs(60)).await;
    app.client = https_client(&root, None);
    let creds = app.create_tenant("renewal");
    let (enc, _) = app.create_encryption(&creds).await;

    // One HTTP/1.1 keep-alive connection, opened under the first certificate,
    // used every 250 ms through the renewal.
    let mut config = crate::pki::client_config(&root, None);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(("127.0.0.1", app.port())).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let body = serde_json::json!({"encryptionId": enc, "data": "kept alive"}).to_string();
    let renewed: Arc<Mutex<Option<(String, i64)>>> = Arc::default();
    let watcher = {
        let renewed = renewed.clone();
        let root = root.clone();
        let port = app.port();
        let first = first.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(pebble.validity + 30);
            while Instant::now() < deadline {
                if let Ok(chain) = presented_chain(port, &root).await {
                    let (serial, expiry) = serial_and_expiry(&chain[0]);
                    if serial != first {
                        *renewed.lock().unwrap() = Some((serial, expiry));
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let mut requests = 0;
    let mut after_renewal = 0;
    while !watcher.is_finished() || after_renewal < 8 {
        let req = hyper::Request::post("/v1/encrypt")
            .header("host", "localhost")
            .header("content-type", "application/json")
            .header("x-api-key", &creds.key)
            .header("x-api-secret", &creds.secret)
            .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap_or_else(|e| {
            panic!("the keep-alive connection failed after {requests} requests: {e}")
        });
        assert_eq!(resp.status(), 200);
        requests += 1;
        if watcher.is_finished() {
            after_renewal += 1;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (second, second_expiry) = renewed.lock().unwrap().clone().unwrap_or_else(|| {
        panic!(
            "no renewal within the certificate's lifetime:\n{}",
            app.log_text()
        )
    });
    assert_ne!(second, first);
    assert!(second_expiry > first_expiry);
    // Renewed before the first expired, on the same process (no restart).
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(now <= first_expiry + 2 || requests > 0);
    assert!(requests > 20, "{requests}");
    assert!(
        app.log_text()
            .matches("ACME: obtained the server certificate")
            .count()
            >= 2
    );
    app.stop();
}

/// A TCP relay to Pebble that the test can take down: connections through it
/// end, new ones are refused.
struct Relay {
    port: u16,
    up: Arc<AtomicBool>,
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Relay {
    async fn start(target: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        {
            let up = up.clone();
            let tasks = tasks.clone();
            tokio::spawn(async move {
                loop {
                    let (mut inbound, _) = listener.accept().await.unwrap();
                    if !up.load(Ordering::SeqCst) {
                        drop(inbound);
                        continue;
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    tasks.lock().unwrap().push(task.abort_handle());
                }
            });
        }
        Relay { port, up, tasks }
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

async fn acme_server_down_at_renewal_keeps_the_certificate_and_retries_with_backoff(
    backend: Backend,
) {
    let pebble = pebble();
    let dir = tempfile::tempdir().unwrap();
    let root = pebble.root(dir.path()).await;
    let pebble_port: u16 = pebble
        .directory
        .trim_start_matches("https://localhost:")
        .trim_end_matches("/dir")
        .parse()
        .unwrap();
    let relay = Relay::start(pebble_port).await;
    let directory = format!("https://localhost:{}/dir", relay.port);
    let env = acme_env(&directory, &pebble.ca);
    let app = TestApp::spawn_with(backend, &as_refs(&env)).await;
    let (serial, not_after) =
        wait_for_certificate(&app, &root, None, Duration::from_secs(60)).await;
    let ops = crate::metrics::ops_addr(&app).await;
    relay.down();

    // Renewal falls due two thirds into the lifetime; every attempt fails.
    let deadline = Instant::now() + Duration::from_secs(pebble.validity + 10);
    let body = loop {
        let (code, body) = readyz(&app, &ops).await;
        if body["certificate"]["failures"].as_i64().unwrap_or(0) >= 3 {
            assert_eq!(
                code, 200,
                "still ready while the certificate is valid: {body}"
            );
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "no failed renewal reported: {body}\n{}",
            app.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(now < not_after, "the failures are visible before expiry");
    assert!(body["certificate"]["lastError"].is_string(), "{body}");
    assert!(body["certificate"]["nextAttemptAt"].is_string(), "{body}");
    // The current certificate is still served.
    let chain = presented_chain(app.port(), &root).await.unwrap();
    assert_eq!(serial_and_expiry(&chain[0]).0, serial);
    // Metrics and log say so too; the waits grow (1 s, 2 s, 4 s, capped at 4 s).
    let m = metrics_text(&ops).await;
    assert!(
        metric(&m, "keyward_acme_consecutive_failures").unwrap() >= 3.0,
        "{m}"
    );
    assert!(
        metric(&m, "keyward_acme_orders_total{outcome=\"failure\"}").unwrap() >= 3.0,
        "{m}"
    );
    let waits: Vec<i64> = app
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("ACME: ordering the server certificate failed"))
        })
        .map(|v| v["retry_in_s"].as_i64().unwrap())
        .collect();
    assert!(waits.len() >= 3, "{waits:?}");
    assert_eq!(&waits[..3], &[1, 2, 4], "{waits:?}");

    // Back up: the next attempt renews, and the failures clear.
    relay.up();
    wait_for_certificate(&app, &root, Some(&serial), Duration::from_secs(30)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = readyz(&app, &ops).await;
        if code == 200 && body["certificate"]["failures"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn root_kek_rotation_reseals_the_acme_account_and_renewal_goes_on(backend: Backend) {
    use sqlx::Connection;
    let pebble = pebble();
    let dir = tempfile::tempdir().unwrap();
    let root = pebble.root(dir.path()).await;
    let env = acme_env(&pebble.directory, &pebble.ca);
    let mut app = TestApp::spawn_with(backend, &as_refs(&env)).await;
    let (first, _) = wait_for_certificate(&app, &root, None, Duration::from_secs(60)).await;
    app.client = https_client(&root, None);
    let operator = app.create_operator();

    // Rotate the root KEK; the rotation re-seals the ACME account and
    // certificate key, and only then retires the old KEK.
    let (status, body) = app
        .post(
            "/v1/admin/root-kek/rotate",
            &operator,
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let active = loop {
        let (_, st) = app.get("/v1/admin/root-kek", &operator).await;
        let keks = st["rootKeks"].as_array().unwrap();
        if keks.len() == 1 {
            break keks[0]["kekId"].as_str().unwrap().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the old root KEK is not retired: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&app.db.url).await.unwrap();
    let (account_kek, key_kek): (String, String) =
        sqlx::query_as("SELECT account_kek, key_kek FROM acme_certificates WHERE name = 'server'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        (account_kek.as_str(), key_kek.as_str()),
        (active.as_str(), active.as_str())
    );

    // A restarted process opens the re-sealed key and serves the certificate.
    app.restart();
    let (again, _) = wait_for_certificate(&app, &root, None, Duration::from_secs(20)).await;
    let count = |app: &TestApp, what: &str| app.log_text().matches(what).count();
    assert!(count(&app, "ACME: serving the stored server certificate") >= 2);

    // Renewal, due two thirds into the certificate's life, uses the re-sealed
    // account: no new account is created.
    let (second, _) = wait_for_certificate(
        &app,
        &root,
        Some(&again),
        Duration::from_secs(pebble.validity + 30),
    )
    .await;
    assert_ne!(second, first);
    // (The log spans both processes: the one account is the first process's.)
    let log = app.log_text();
    assert_eq!(count(&app, "ACME: account created"), 1, "{log}");
    assert!(!log.contains("stored account cannot be opened"), "{log}");

    // An account that cannot be opened at all (here: damaged) is replaced
    // by a new account, and renewals go on.
    sqlx::query("UPDATE acme_certificates SET account_sealed = $1 WHERE name = 'server'")
        .bind(vec![7u8; 60])
        .execute(&mut conn)
        .await
        .unwrap();
    wait_for_certificate(
        &app,
        &root,
        Some(&second),
        Duration::from_secs(pebble.validity + 30),
    )
    .await;
    assert!(
        app.log_shows("ACME: the stored account cannot be opened; creating a new one")
            .await
    );
    assert_eq!(count(&app, "ACME: account created"), 2);
}

on_both_databases!(
    root_kek_rotation_reseals_the_acme_account_and_renewal_goes_on,
    first_issuance_is_served_and_verifies_against_pebbles_root,
    renewal_swaps_the_certificate_while_a_keep_alive_client_keeps_working,
    acme_server_down_at_renewal_keeps_the_certificate_and_retries_with_backoff,
);

/// Two replicas on one PostgreSQL: one orders, both serve the same certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_certificate_and_one_of_them_orders() {
    let pebble = pebble();
    let dir = tempfile::tempdir().unwrap();
    let root = pebble.root(dir.path()).await;
    let env = acme_env(&pebble.directory, &pebble.ca);
    let db = TestDatabase::new(Backend::Postgres).await;
    let a = TestApp::spawn_on(db, &as_refs(&env));
    let b = a.spawn_replica(&[]);
    let (serial_a, _) = wait_for_certificate(&a, &root, None, Duration::from_secs(60)).await;
    let (serial_b, _) = wait_for_certificate(&b, &root, None, Duration::from_secs(60)).await;
    assert_eq!(serial_a, serial_b, "both serve the one stored certificate");
    let ordered = |app: &TestApp| {
        app.log_text()
            .matches("ACME: obtained the server certificate")
            .count()
    };
    assert_eq!(ordered(&a) + ordered(&b), 1, "exactly one replica ordered");
}

/// Connects to `addr` from loopback address `from` (any 127.x.y.z is this
/// machine), so that one test plays several peers.
async fn connect_from(from: &str, addr: std::net::SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Reads until the peer closes or `within` passes: the bytes, and whether it closed.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline.into(), stream.read(&mut buf)).await {
            Err(_) => return (got, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// An http-01 request on a new connection from `from`: the answer's first line.
async fn ask_challenge(from: &str, addr: std::net::SocketAddr) -> String {
    use tokio::io::AsyncWriteExt;
    let mut s = connect_from(from, addr).await;
    s.write_all(
        b"GET /.well-known/acme-challenge/no-such-token HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .await
    .unwrap();
    let (answer, _) = read_until_closed(&mut s, Duration::from_secs(3)).await;
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The challenge listener cannot be held by connections that send nothing:
/// they are closed after the first-byte timeout, one address gets at most 8,
/// and when all 64 slots are taken the CA's connection takes the oldest
/// silent one's. Raw sockets from several loopback addresses; no ACME server
/// is needed (the directory does not answer, so orders fail meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_challenge_listener_cannot_be_starved_by_silent_connections() {
    let env = [
        ("KEYWARD_ACME_DIRECTORY", "https://127.0.0.1:9/dir"),
        ("KEYWARD_ACME_DOMAINS", "localhost"),
        ("KEYWARD_ACME_CHALLENGE", "http-01"),
        ("KEYWARD_ACME_CHALLENGE_LISTEN", "127.0.0.1:0"),
        ("KEYWARD_ACME_RETRY_MIN", "30s"),
        ("KEYWARD_OPS_LISTEN", "127.0.0.1:0"),
    ];
    let app = TestApp::spawn_with(Backend::Sqlite, &env).await;
    assert!(app.log_shows("ACME challenge listener").await);
    let addr: std::net::SocketAddr = app
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "ACME challenge listener")
        .and_then(|v| v["address"].as_str().map(|a| a.parse().unwrap()))
        .expect("the challenge listener's address is logged");
    assert!(ask_challenge("127.0.0.2", addr)
        .await
        .starts_with("HTTP/1.1 404"));

    // A connection that sends nothing is closed after the first-byte timeout (3 s).
    let started = Instant::now();
    let mut silent = connect_from("127.0.0.3", addr).await;
    let (got, closed) = read_until_closed(&mut silent, Duration::from_secs(8)).await;
    let waited = started.elapsed();
    assert!(closed && got.is_empty(), "not closed within 8 s");
    assert!(
        waited >= Duration::from_millis(2500) && waited < Duration::from_secs(6),
        "{waited:?}"
    );

    // One address holds at most 8: the 9th is closed at once; another
    // address is still served.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(connect_from("127.0.0.4", addr).await);
    }
    let mut ninth = connect_from("127.0.0.4", addr).await;
    let (got, closed) = read_until_closed(&mut ninth, Duration::from_millis(1500)).await;
    assert!(
        closed && got.is_empty(),
        "a 9th connection from one address was kept"
    );
    assert!(ask_challenge("127.0.0.5", addr)
        .await
        .starts_with("HTTP/1.1 404"));
    drop(held);
    drop(ninth);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 64 silent connections from 8 addresses take every slot; the CA's
    // connection is served all the same, in the oldest one's place.
    let mut flood = Vec::new();
    for a in 1..=8 {
        for _ in 0..8 {
            flood.push(connect_from(&format!("127.0.1.{a}"), addr).await);
        }
    }
    let answered = Instant::now();
    assert!(ask_challenge("127.0.2.1", addr)
        .await
        .starts_with("HTTP/1.1 404"));
    assert!(answered.elapsed() < Duration::from_secs(2));
    let (_, closed) = read_until_closed(&mut flood[0], Duration::from_millis(500)).await;
    assert!(
        closed,
        "the oldest silent connection was not the one evicted"
    );
    let (_, closed) = read_until_closed(&mut flood[63], Duration::from_millis(200)).await;
    assert!(!closed, "a newer silent connection was evicted first");

    // Each way of closing is counted.
    let ops = crate::metrics::ops_addr(&app).await;
    let m = metrics_text(&ops).await;
    for reason in ["first_byte_timeout", "per_address", "evicted_idle"] {
        let series =
            format!("keyward_acme_challenge_connections_closed_total{{reason=\"{reason}\"}}");
        assert!(metric(&m, &series).unwrap_or(0.0) >= 1.0, "{series}:\n{m}");
    }
}
