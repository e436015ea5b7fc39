//! Connection limits: an idle connection is closed after
//! `connection_idle_timeout`, a busy one gracefully at `connection_max_age`
//! (its requests in flight finish), one that sends no request within
//! `connection_first_request_timeout` is closed, one client address holds at
//! most `max_connections_per_address`, and at `max_connections` the oldest
//! connection that has sent nothing makes room; if none has, new connections
//! wait, unserved, until one closes.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::helpers::{Backend, TestApp};

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// Sends `GET /healthz` on a raw HTTP/1.1 connection and reads its answer.
pub(crate) async fn healthz_over<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
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

/// How long until the server closes `stream` (reads EOF, or a reset), at
/// most `within`.
pub(crate) async fn closed_within<S: AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    match tokio::time::timeout(within, stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Some(started.elapsed()),
        Ok(Ok(n)) => panic!("unexpected bytes: {:?}", &buf[..n]),
        Err(_) => None,
    }
}

/// A TCP connection to `addr` from the local address `source` (such as
/// `127.0.0.2`: all of 127.0.0.0/8 is loopback), to stand for another client.
pub(crate) async fn connect_from(source: &str, addr: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(addr.parse().unwrap()).await.unwrap()
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

/// Over `max_connections`, when every connection has sent a request, a new
/// connection is not served: it waits in the listen queue until a served one
/// closes, and the first wait is logged.
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

/// The value of the sample `series` (name and labels, as the scrape writes
/// them) in a Prometheus text scrape; 0 if absent.
fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Security review of #17: one client address could take every slot of a
/// listener. Over `max_connections_per_address`, its extra connections are
/// accepted and closed at once (and counted, without the address), while
/// another address is served, and its own connections keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_over_its_limit_is_closed_while_another_address_is_served() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[
            ("KEYWARD_MAX_CONNECTIONS_PER_ADDRESS", "3"),
            ("KEYWARD_CONNECTION_IDLE_TIMEOUT", "60s"),
        ],
    )
    .await;
    // 127.0.0.3 floods; the test client's own pool uses 127.0.0.1.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut conn = connect_from("127.0.0.3", &app.addr).await;
        healthz_over(&mut conn).await;
        held.push(conn);
    }
    for _ in 0..2 {
        let mut extra = connect_from("127.0.0.3", &app.addr).await;
        // Closed without a byte read or written, well before any timeout.
        let closed = closed_within(&mut extra, Duration::from_secs(2))
            .await
            .expect("a connection over the per-address limit is closed");
        assert!(closed < Duration::from_secs(1), "{closed:?}");
    }
    // Another address is served, the flooding address's own connections
    // still are, and a slot freed is a slot usable again.
    let mut other = connect_from("127.0.0.2", &app.addr).await;
    healthz_over(&mut other).await;
    for conn in &mut held {
        healthz_over(conn).await;
    }
    drop(held.pop());
    // The server notices the close when it reads EOF; give it a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut again = connect_from("127.0.0.3", &app.addr).await;
    healthz_over(&mut again).await;

    let scrape = app.get_text("/metrics").await;
    assert_eq!(
        sample(
            &scrape,
            r#"keyward_connections_dropped_total{listener="api",reason="address_limit"}"#
        ),
        2.0,
        "{scrape}"
    );
    assert!(
        !scrape.contains("127.0.0.3"),
        "a client address in the metrics"
    );
    assert!(app.log_shows("per-address connection limit reached").await);
    assert!(
        !app.log_text().contains("127.0.0.3"),
        "a client address in the log"
    );
}

/// Security review of #17: a connection that never sent a request held its
/// slot for the idle timeout (120 s), so 14 connections a second kept the
/// ops listener full and its probes failing. One that sends nothing, or only
/// part of a request's headers, is now closed at
/// `connection_first_request_timeout`; one whose first request came in time
/// then lives by the idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_first_request_are_closed_at_the_first_request_timeout() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[
            ("KEYWARD_OPS_LISTEN", "127.0.0.1:0"),
            ("KEYWARD_CONNECTION_FIRST_REQUEST_TIMEOUT", "1s"),
            ("KEYWARD_CONNECTION_IDLE_TIMEOUT", "60s"),
        ],
    )
    .await;
    let ops = crate::metrics::ops_addr(&app).await;
    for addr in [ops.as_str(), app.addr.as_str()] {
        let opened = Instant::now();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut partial = TcpStream::connect(addr).await.unwrap();
        partial
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: k 4 2")
            .await
            .unwrap();
        let mut asked = TcpStream::connect(addr).await.unwrap();
        healthz_over(&mut asked).await;
        for (what, conn) in [("silent", &mut silent), ("partial", &mut partial)] {
            closed_within(conn, Duration::from_secs(5))
                .await
                .unwrap_or_else(|| panic!("a {what} connection to {addr} is closed"));
            let closed = opened.elapsed();
            assert!(
                closed >= Duration::from_millis(700),
                "{what}: closed after {closed:?}, before the deadline"
            );
        }
        // Past the deadline, the connection that asked in time still works.
        tokio::time::sleep(Duration::from_millis(500)).await;
        healthz_over(&mut asked).await;
    }
    let scrape = app.get_text("/metrics").await;
    for listener in ["api", "ops"] {
        let series = format!(
            r#"keyward_connections_dropped_total{{listener="{listener}",reason="first_request_timeout"}}"#
        );
        assert_eq!(sample(&scrape, &series), 2.0, "{series}\n{scrape}");
    }
}

/// Security review of #17: at `max_connections`, connections that never sent
/// a request kept every newcomer waiting. Now the oldest of them is closed to
/// make room, so a client that asks at once is served at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_limit_the_oldest_silent_connection_makes_room_for_a_new_one() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[
            ("KEYWARD_MAX_CONNECTIONS", "3"),
            ("KEYWARD_CONNECTION_FIRST_REQUEST_TIMEOUT", "60s"),
            ("KEYWARD_CONNECTION_IDLE_TIMEOUT", "60s"),
        ],
    )
    .await;
    let mut served = TcpStream::connect(&app.addr).await.unwrap();
    healthz_over(&mut served).await;
    let mut oldest_silent = TcpStream::connect(&app.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut younger_silent = TcpStream::connect(&app.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut newcomer = TcpStream::connect(&app.addr).await.unwrap();
    let started = Instant::now();
    healthz_over(&mut newcomer).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        closed_within(&mut oldest_silent, Duration::from_secs(2))
            .await
            .is_some(),
        "the oldest silent connection made room"
    );
    assert!(
        closed_within(&mut younger_silent, Duration::from_millis(500))
            .await
            .is_none(),
        "only one connection is closed per newcomer"
    );
    // The connection that had asked was never a candidate.
    healthz_over(&mut served).await;
    assert!(app.log_shows("connection limit reached").await);
    let scrape = app.get_text("/metrics").await;
    assert!(
        sample(
            &scrape,
            r#"keyward_connections_dropped_total{listener="api",reason="evicted_silent"}"#
        ) >= 1.0,
        "{scrape}"
    );
}

/// Security review of #17: the ops listener had the API's 2,048 slots and no
/// per-address bound. It has `ops_max_connections`, and one address may hold
/// at most half of them, so a flood from one address leaves room for the
/// probes' address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ops_listener_has_its_own_small_budget_that_one_address_cannot_fill() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[
            ("KEYWARD_OPS_LISTEN", "127.0.0.1:0"),
            ("KEYWARD_OPS_MAX_CONNECTIONS", "4"),
            ("KEYWARD_CONNECTION_IDLE_TIMEOUT", "60s"),
        ],
    )
    .await;
    let ops = crate::metrics::ops_addr(&app).await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = connect_from("127.0.0.3", &ops).await;
        healthz_over(&mut conn).await;
        held.push(conn);
    }
    let mut third = connect_from("127.0.0.3", &ops).await;
    assert!(
        closed_within(&mut third, Duration::from_secs(2))
            .await
            .is_some(),
        "one address holds at most half of the ops listener"
    );
    // The probes' address is served, twice over.
    let mut probe = connect_from("127.0.0.2", &ops).await;
    healthz_over(&mut probe).await;
    let mut probe2 = connect_from("127.0.0.2", &ops).await;
    healthz_over(&mut probe2).await;
    // The API listener is not bound by the ops budget.
    let mut api = Vec::new();
    for _ in 0..6 {
        let mut conn = connect_from("127.0.0.3", &app.addr).await;
        healthz_over(&mut conn).await;
        api.push(conn);
    }
}

/// On the ops listener (probes and scrapers, idempotent GETs), a full set of
/// connections that each asked once and then sat idle does not keep a probe
/// waiting: at `ops_max_connections`, the connection idle the longest is
/// closed to make room. (The API listener keeps its idle connections and
/// makes newcomers wait instead: see above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_ops_limit_the_longest_idle_connection_makes_room_for_a_probe() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[
            ("KEYWARD_OPS_LISTEN", "127.0.0.1:0"),
            ("KEYWARD_OPS_MAX_CONNECTIONS", "4"),
            ("KEYWARD_CONNECTION_IDLE_TIMEOUT", "60s"),
        ],
    )
    .await;
    let ops = crate::metrics::ops_addr(&app).await;
    // Two addresses, two connections each: every slot, each asked once.
    let mut idle = Vec::new();
    for source in ["127.0.0.3", "127.0.0.3", "127.0.0.4", "127.0.0.4"] {
        let mut conn = connect_from(source, &ops).await;
        healthz_over(&mut conn).await;
        idle.push(conn);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Keep all but the first busy-ish: the first is idle the longest.
    for conn in idle.iter_mut().skip(1) {
        healthz_over(conn).await;
    }
    let mut probe = connect_from("127.0.0.2", &ops).await;
    let started = Instant::now();
    healthz_over(&mut probe).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(
        closed_within(&mut idle[0], Duration::from_secs(2))
            .await
            .is_some(),
        "the connection idle the longest made room"
    );
    for conn in idle.iter_mut().skip(1) {
        healthz_over(conn).await;
    }
    let scrape = app.get_text("/metrics").await;
    assert_eq!(
        sample(
            &scrape,
            r#"keyward_connections_dropped_total{listener="ops",reason="evicted_idle"}"#
        ),
        1.0,
        "{scrape}"
    );
}

/// A connection that waited for a slot longer than the first-request timeout
/// is still served: its clocks start when it gets its slot, not at accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_waited_for_a_slot_is_served_despite_the_first_request_timeout() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[
            ("KEYWARD_MAX_CONNECTIONS", "1"),
            ("KEYWARD_CONNECTION_FIRST_REQUEST_TIMEOUT", "1s"),
            ("KEYWARD_CONNECTION_IDLE_TIMEOUT", "60s"),
        ],
    )
    .await;
    let mut first = TcpStream::connect(&app.addr).await.unwrap();
    healthz_over(&mut first).await;
    let mut waiting = TcpStream::connect(&app.addr).await.unwrap();
    waiting
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: keyward\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    assert!(
        tokio::time::timeout(Duration::from_millis(2000), waiting.read(&mut buf))
            .await
            .is_err(),
        "a connection over the limit was served or closed"
    );
    drop(first);
    let n = tokio::time::timeout(Duration::from_secs(5), waiting.read(&mut buf))
        .await
        .expect("served once a slot is free")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
}

/// Found by the soak (bench/soak): at `connection_max_age` an HTTP/1.1
/// connection that was idle for a moment between two requests was closed,
/// racing the client's next request, which then failed without an answer.
/// Now an idle connection at its maximum age waits for its next request and
/// answers it with `Connection: close`: a client that sends one request after
/// another, with short pauses, never sees one go unanswered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_connection_at_its_max_age_closes_after_an_answer_never_between_requests() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[
            ("KEYWARD_CONNECTION_MAX_AGE", "1s"),
            ("KEYWARD_CONNECTION_IDLE_TIMEOUT", "30s"),
        ],
    )
    .await;
    for _ in 0..3 {
        let mut s = TcpStream::connect(&app.addr).await.unwrap();
        let started = Instant::now();
        let mut answered = 0;
        loop {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "still open after 10 s"
            );
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: keyward\r\n\r\n")
                .await
                .unwrap_or_else(|e| panic!("closed before request {answered}: {e}"));
            let mut answer = Vec::new();
            let mut buf = [0u8; 1024];
            while !crate::helpers::contains(&answer, br#"{"status":"ok"}"#) {
                let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                    .await
                    .expect("an answer within 5 s")
                    .unwrap_or(0);
                assert!(
                    n > 0,
                    "request {answered} went unanswered: the connection closed between requests"
                );
                answer.extend_from_slice(&buf[..n]);
            }
            answered += 1;
            let head = String::from_utf8_lossy(&answer).to_ascii_lowercase();
            if head.contains("connection: close") {
                assert!(started.elapsed() >= Duration::from_millis(900));
                assert!(closed_within(&mut s, Duration::from_secs(5))
                    .await
                    .is_some());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
