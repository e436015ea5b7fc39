//! Slow and oversized input, over raw sockets: a declared body length over
//! the limit is refused at once, before any of the body is sent; a body that
//! trickles in, and the headers of a later request on a kept-alive
//! connection that trickle in, are cut by a timeout. (Connections that never
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

/// Reads one response's head (up to the blank line) within `within`.
async fn read_head(stream: &mut TcpStream, within: Duration) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    let deadline = Instant::now() + within;
    while !got.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline.into(), stream.read(&mut byte)).await {
            Ok(Ok(1)) => got.push(byte[0]),
            other => panic!(
                "no response head within {within:?} ({other:?}): {}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    String::from_utf8(got).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_length_over_the_limit_is_refused_before_the_body_is_sent() {
    let app = TestApp::spawn_with(Backend::Sqlite, &[("KEYWARD_MAX_BODY_BYTES", "4096")]).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let _ = enc;
    for (path, length) in [
        ("/v1/encrypt", 10_000_000u64),
        ("/v1/encrypt/batch", 1_000_000_000),
        ("/v1/decrypt", 4_000_000_000),
    ] {
        for authenticated in [true, false] {
            let mut s = TcpStream::connect(&app.addr).await.unwrap();
            let credentials = if authenticated {
                format!(
                    "X-Api-Key: {}\r\nX-Api-Secret: {}\r\n",
                    creds.key, creds.secret
                )
            } else {
                String::new()
            };
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: keyward\r\nContent-Type: application/json\r\n\
                 {credentials}Content-Length: {length}\r\n\r\n"
            );
            let started = Instant::now();
            s.write_all(head.as_bytes()).await.unwrap();
            // Not a byte of the body: the answer comes anyway, at once.
            let head = read_head(&mut s, Duration::from_secs(2)).await;
            let status = head.split(' ').nth(1).unwrap_or_default().to_string();
            let want = if authenticated { "413" } else { "401" };
            assert!(
                status == want || (status == "413" && !authenticated),
                "{path} ({length} bytes declared, authenticated: {authenticated}): {head}"
            );
            assert!(started.elapsed() < Duration::from_secs(2));
            // The server does not wait for the body it refused: the
            // connection ends rather than reading gigabytes.
            let (_, closed) = read_until_closed(&mut s, Duration::from_secs(3)).await;
            assert!(closed, "{path}: the connection stays open for a refused body");
        }
    }
    // Whoever sent those, the service still answers.
    app.encrypt(&creds, &enc, "still here").await;
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
    let trickle = b"GET /healthz HTTP/1.1\r\nHost: keyward\r\nX-Slow: ".iter().chain(b"a".repeat(400).iter()).copied().collect::<Vec<u8>>();
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
