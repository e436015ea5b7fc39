//! Slow input, over raw sockets: a body that trickles in, and the headers of
//! a later request on a kept-alive connection that trickle in, are cut by a
//! timeout. (Connections that never
//! send a first request, idle ones, and the caps on connections per listener
//! and per address, with their metrics, are in connections.rs.)

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{Backend, TestApp};

/// Reads what the server sends until it closes the connection or `within`
/// passes; returns the bytes and whether it closed.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_in_is_cut_by_the_request_timeout() {
    let app = TestApp::spawn_with(Backend::Sqlite, &[("KEYWARD_REQUEST_TIMEOUT", "2s")]).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let body = format!(r#"{{"encryptionId":"{enc}","data":"{}"}}"#, "x".repeat(500));
    let mut s = TcpStream::connect(&app.addr).await.unwrap();
    let head = format!(
        "POST /v1/encrypt HTTP/1.1\r\nHost: keyward\r\nContent-Type: application/json\r\n\
         X-Api-Key: {}\r\nX-Api-Secret: {}\r\nContent-Length: {}\r\n\r\n",
        creds.key,
        creds.secret,
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    // One byte every 100 ms: the whole body would take 50 s.
    let mut answer = Vec::new();
    for byte in body.as_bytes() {
        if s.write_all(&[*byte]).await.is_err() {
            break;
        }
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => {
                answer.extend_from_slice(&buf[..n]);
                break;
            }
            Err(_) => {}
        }
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "a trickling body held its request past the time limit"
        );
    }
    let (rest, _) = read_until_closed(&mut s, Duration::from_secs(3)).await;
    answer.extend(rest);
    let text = String::from_utf8_lossy(&answer);
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(1500) && elapsed < Duration::from_secs(8),
        "cut after {elapsed:?}: {text}"
    );
    // Cut with an answer that says so, or by closing the connection.
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 503") || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    if !text.is_empty() {
        assert!(text.contains("\"timeout\""), "{text}");
    }
    app.encrypt(&creds, &enc, "still here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_headers_of_a_later_request_that_trickle_in_are_cut() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[
            ("KEYWARD_CONNECTION_FIRST_REQUEST_TIMEOUT", "1s"),
            ("KEYWARD_CONNECTION_IDLE_TIMEOUT", "60s"),
            ("KEYWARD_REQUEST_TIMEOUT", "2s"),
        ],
    )
    .await;
    let mut s = TcpStream::connect(&app.addr).await.unwrap();
    crate::connections::healthz_over(&mut s).await;
    // A second request on the kept-alive connection whose headers never end:
    // a byte every 200 ms, for as long as the server keeps listening.
    let started = Instant::now();
    let trickle = b"GET /healthz HTTP/1.1\r\nHost: keyward\r\nX-Slow: "
        .iter()
        .chain(b"a".repeat(400).iter())
        .copied()
        .collect::<Vec<u8>>();
    let mut cut = None;
    for byte in trickle {
        if s.write_all(&[byte]).await.is_err() {
            cut = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => {
                // An answer (408/400) or the close: either way, cut.
                cut = Some(started.elapsed());
                break;
            }
            Err(_) => {}
        }
    }
    let cut = cut.expect("a request whose headers trickled in for 80 s was never cut");
    assert!(cut < Duration::from_secs(40), "cut only after {cut:?}");
    // Other clients are served all along.
    let mut other = TcpStream::connect(&app.addr).await.unwrap();
    crate::connections::healthz_over(&mut other).await;
}

/// Sends `head` (a request's headers declaring a body it never sends) and
/// returns what the server answered within two seconds.
async fn answer_to_headers_alone(app: &TestApp, head: &str) -> String {
    let mut s = TcpStream::connect(&app.addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(2);
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_length_over_the_limit_is_refused_before_the_body_arrives() {
    let app = TestApp::spawn_with(Backend::Sqlite, &[("KEYWARD_MAX_BODY_BYTES", "65536")]).await;
    let creds = app.create_tenant("acme");
    for (path, authenticated) in [
        ("/v1/encrypt", true),
        ("/v1/encrypt", false),
        ("/v1/encrypt/batch", true),
        ("/v1/decrypt", false),
    ] {
        let auth = if authenticated {
            format!(
                "X-Api-Key: {}\r\nX-Api-Secret: {}\r\n",
                creds.key, creds.secret
            )
        } else {
            String::new()
        };
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: keyward\r\nContent-Type: application/json\r\n\
             {auth}Content-Length: 1000000000\r\n\r\n"
        );
        let text = answer_to_headers_alone(&app, &head).await;
        assert!(
            text.starts_with("HTTP/1.1 413"),
            "{path} (authenticated: {authenticated}): no 413 before the body: {text:?}"
        );
    }
}

/// Opens a batch request whose chunked body never ends (its first chunk
/// only), with `creds` or none; returns the connection, still open.
async fn endless_batch(app: &TestApp, creds: Option<&crate::helpers::Creds>) -> TcpStream {
    let auth = creds.map_or(String::new(), |c| {
        format!("X-Api-Key: {}\r\nX-Api-Secret: {}\r\n", c.key, c.secret)
    });
    let mut s = TcpStream::connect(&app.addr).await.unwrap();
    let head = format!(
        "POST /v1/encrypt/batch HTTP/1.1\r\nHost: keyward\r\nContent-Type: application/json\r\n\
         {auth}Transfer-Encoding: chunked\r\n\r\n1\r\n{{\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// Review finding: the memory budget of batch and large bodies was taken
/// before the caller was authenticated, and a chunked batch (no declared
/// length) counts as its route's whole limit, so a stream of requests
/// without valid credentials each held the whole budget while they were
/// being refused, and real batch callers saw `server_busy`. Now the share is
/// taken after authentication: callers without valid credentials are
/// answered before their body and hold nothing; an authenticated caller
/// holds its share until its response (here: its time limit), and others get
/// 503 `server_busy` with Retry-After meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_budget_is_taken_only_after_authentication() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[
            ("KEYWARD_MAX_BATCH_BODY_BYTES", "1048576"),
            ("KEYWARD_MAX_CONCURRENT_BODY_BYTES", "1048576"),
            ("KEYWARD_REQUEST_TIMEOUT", "10s"),
        ],
    )
    .await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let batch = serde_json::json!({"items": [{"encryptionId": enc, "data": "aGk="}]});

    // Unauthenticated endless batches: each answered 401 before its body.
    let wrong = crate::helpers::Creds {
        secret: "x".repeat(43),
        ..creds.clone()
    };
    let mut held = Vec::new();
    for who in [None, Some(&wrong), None] {
        let mut s = endless_batch(&app, who).await;
        let (text, _) = read_until_closed(&mut s, Duration::from_secs(2)).await;
        let text = String::from_utf8_lossy(&text).into_owned();
        assert!(text.starts_with("HTTP/1.1 401"), "{text:?}");
        held.push(s);
    }
    let (status, body) = app.post("/v1/encrypt/batch", &creds, &batch).await;
    assert_eq!(status, 200, "{body}");

    // An authenticated endless batch holds the whole budget (its size is
    // unknown) until its time limit: a second batch is refused at once.
    let _open = endless_batch(&app, Some(&creds)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resp = app
        .req(reqwest::Method::POST, "/v1/encrypt/batch", &creds)
        .json(&batch)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "server_busy", "{body}");
    // Single small requests never take a share.
    app.encrypt(&creds, &enc, "still here").await;
}
