//! Connection limits: an idle connection is closed after
//! `connection_idle_timeout`, a busy one gracefully at `connection_max_age`
//! (its requests in flight finish), and connections over `max_connections`
//! wait, unserved, until one closes.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{Backend, TestApp};

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Sends `GET /healthz` on a raw HTTP/1.1 connection and reads its answer.
async fn healthz_over(stream: &mut TcpStream) {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: keyward\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !crate::helpers::contains(&answer, br#"{"status":"ok"}"#) {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"));
}

/// How long until the server closes `stream` (reads EOF), at most `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    match tokio::time::timeout(within, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Some(started.elapsed()),
        Ok(Ok(n)) => panic!("unexpected bytes: {:?}", &buf[..n]),
        Err(_) => None,
    }
}

/// An HTTP/2 connection (prior knowledge, plain) to `addr`: its request
/// sender, and a receiver that completes when the connection has ended.
async fn http2(
    addr: &str,
) -> (
    hyper::client::conn::http2::SendRequest<Body>,
    tokio::sync::oneshot::Receiver<Instant>,
) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let (ended_tx, ended) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = conn.await;
        let _ = ended_tx.send(Instant::now());
    });
    (sender, ended)
}

fn empty() -> Body {
    http_body_util::Empty::new().map_err(|e| match e {}).boxed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout_and_busy_ones_are_not() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[("KEYWARD_CONNECTION_IDLE_TIMEOUT", "1s")],
    )
    .await;

    // HTTP/1.1: one request, then nothing.
    let mut idle = TcpStream::connect(&app.addr).await.unwrap();
    healthz_over(&mut idle).await;
    let closed = closed_within(&mut idle, Duration::from_secs(5))
        .await
        .expect("an idle HTTP/1.1 connection is closed");
    assert!(
        closed >= Duration::from_millis(800),
        "closed after {closed:?}, before the idle timeout"
    );

    // A connection that never sends a request is idle too.
    let mut silent = TcpStream::connect(&app.addr).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(5))
        .await
        .is_some());

    // HTTP/2: one request, then nothing; the server ends the connection.
    let (mut h2, ended) = http2(&app.addr).await;
    let answer = h2
        .send_request(
            hyper::Request::get(format!("http://{}/healthz", app.addr))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let answered = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), ended)
        .await
        .expect("an idle HTTP/2 connection is closed")
        .unwrap();
    assert!(ended - answered >= Duration::from_millis(800));

    // A connection used every 300 ms for 2.5 s is never idle for 1 s.
    let mut busy = TcpStream::connect(&app.addr).await.unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2500) {
        healthz_over(&mut busy).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    healthz_over(&mut busy).await;
}

/// Issue #17: a connection stayed open as long as its client kept it busy,
/// so a client certificate revoked after the handshake kept working on it.
/// At `connection_max_age` the server sends GOAWAY: the request in flight
/// (its body still arriving) completes, and the connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_http2_connection_ends_at_its_max_age_and_its_last_request_completes() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[
            ("KEYWARD_CONNECTION_MAX_AGE", "2s"),
            ("KEYWARD_CONNECTION_IDLE_TIMEOUT", "60s"),
        ],
    )
    .await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;

    let (mut h2, ended) = http2(&app.addr).await;
    let opened = Instant::now();
    let uri = |path: &str| format!("http://{}{path}", app.addr);
    // Busy: a request every 100 ms.
    while opened.elapsed() < Duration::from_millis(1200) {
        let answer = h2
            .send_request(hyper::Request::get(uri("/healthz")).body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A request whose body ends after the connection's max age.
    let chunks = vec![
        (
            Duration::ZERO,
            format!(r#"{{"encryptionId":"{enc}","data":"#),
        ),
        (
            Duration::from_millis(1800),
            r#""late but whole"}"#.to_string(),
        ),
    ];
    let body = futures::stream::iter(chunks).then(|(wait, chunk)| async move {
        tokio::time::sleep(wait).await;
        Ok::<_, Infallible>(Frame::data(Bytes::from(chunk)))
    });
    let request = hyper::Request::post(uri("/v1/encrypt"))
        .header("content-type", "application/json")
        .header("x-api-key", &creds.key)
        .header("x-api-secret", &creds.secret)
        .body(BodyExt::boxed(StreamBody::new(body)))
        .unwrap();
    let answer = h2.send_request(request).await.unwrap();
    let status = answer.status();
    let body = answer.into_body().collect().await.unwrap().to_bytes();
    let answered = opened.elapsed();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(answered > Duration::from_millis(2500), "{answered:?}");
    let encrypted: Value = serde_json::from_slice(&body).unwrap();
    let (status, plain) = app.decrypt(&creds, &encrypted).await;
    assert_eq!(status, 200);
    assert_eq!(plain["data"], "late but whole");

    let ended = tokio::time::timeout(Duration::from_secs(5), ended)
        .await
        .expect("the connection ends after its max age")
        .unwrap();
    assert!(ended - opened >= Duration::from_secs(2));
    // Nothing more goes over it.
    let late = h2
        .send_request(hyper::Request::get(uri("/healthz")).body(empty()).unwrap())
        .await;
    assert!(late.is_err(), "a request went over an ended connection");
}

/// Over `max_connections`, a new connection is not served: it waits in the
/// listen queue until a served one closes, and the first wait is logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_wait_unserved_until_one_closes() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[
            ("KEYWARD_MAX_CONNECTIONS", "2"),
            ("KEYWARD_CONNECTION_IDLE_TIMEOUT", "60s"),
        ],
    )
    .await;
    let mut first = TcpStream::connect(&app.addr).await.unwrap();
    healthz_over(&mut first).await;
    let mut second = TcpStream::connect(&app.addr).await.unwrap();
    healthz_over(&mut second).await;

    let mut third = TcpStream::connect(&app.addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: keyward\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), third.read(&mut buf))
            .await
            .is_err(),
        "a connection over the limit was served"
    );
    assert!(app.log_shows("connection limit reached").await);

    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), third.read(&mut buf))
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // The two served connections still work.
    healthz_over(&mut second).await;
}
