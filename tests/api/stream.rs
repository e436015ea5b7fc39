//! Files and bodies of any size (issue #20). `keyward encrypt-file` /
//! `decrypt-file` seal a file in Keyward's stream format under a data key
//! from the server's data-key routes, so the file's bytes never cross the
//! network; `POST /v1/encrypt/stream` and `/v1/decrypt/stream` do the same
//! on the server for raw bodies, in the same format. Either way the server's
//! memory does not grow with the data; a damaged stream is refused (a file
//! leaves no output, a streamed response is aborted).

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::helpers::{assert_error, keyward_command, send, Backend, Creds, TestApp};
use aws_lc_rs::digest::{Context, SHA256};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

crate::on_both_databases!(
    a_one_gib_file_round_trips_through_the_cli_with_the_server_under_64_mib,
    the_cli_refuses_a_damaged_file_and_leaves_no_output,
    one_gib_streams_through_both_routes_with_the_server_under_64_mib,
    the_routes_and_the_cli_read_each_others_streams,
    a_stream_needs_its_context_its_scope_and_its_tenant,
    a_damaged_stream_aborts_the_transfer_and_releases_no_damaged_plaintext,
    a_stalled_client_is_cut_off_and_streams_beyond_the_limit_are_busy,
    a_disabled_version_is_refused_before_any_byte,
    a_client_mode_stream_needs_the_same_master_key,
    streams_take_their_working_memory_from_the_shared_budget,
);

/// The server's peak resident set (VmHWM), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn cli(app: &TestApp, creds: &Creds, args: &[&str]) -> std::process::Output {
    keyward_command()
        .args(args)
        .env("KEYWARD_URL", app.url(""))
        .env("KEYWARD_API_KEY", &creds.key)
        .env("KEYWARD_API_SECRET", &creds.secret)
        .output()
        .unwrap()
}

/// Runs the CLI as [`cli`] does; it must succeed.
fn cli_ok(app: &TestApp, creds: &Creds, args: &[&str]) {
    let out = cli(app, creds, args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes `size` bytes of a repeating, position-dependent pattern; returns
/// their SHA-256.
fn write_pattern(path: &Path, size: u64) -> Vec<u8> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut digest = Context::new(&SHA256);
    let mut block = vec![0u8; 1 << 20];
    let mut written = 0u64;
    let mut n = 0u32;
    while written < size {
        for (i, b) in block.iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(31).wrapping_add(n) as u8;
        }
        let take = (size - written).min(block.len() as u64) as usize;
        file.write_all(&block[..take]).unwrap();
        digest.update(&block[..take]);
        written += take as u64;
        n += 1;
    }
    file.flush().unwrap();
    digest.finish().as_ref().to_vec()
}

fn sha256_file(path: &Path) -> Vec<u8> {
    let mut file = std::fs::File::open(path).unwrap();
    let mut digest = Context::new(&SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
    }
    digest.finish().as_ref().to_vec()
}

async fn a_one_gib_file_round_trips_through_the_cli_with_the_server_under_64_mib(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let dir = tempfile::tempdir().unwrap();
    let (plain, sealed, opened) = (
        dir.path().join("plain"),
        dir.path().join("sealed"),
        dir.path().join("opened"),
    );
    const SIZE: u64 = 1 << 30;
    let want = write_pattern(&plain, SIZE);
    cli_ok(
        &app,
        &creds,
        &[
            "encrypt-file",
            plain.to_str().unwrap(),
            sealed.to_str().unwrap(),
            "--encryption-id",
            &enc,
            "--context",
            "backups/2026-12-06",
        ],
    );
    std::fs::remove_file(&plain).unwrap();
    // 64 KiB chunks: a 16-byte tag each, and the header.
    let len = std::fs::metadata(&sealed).unwrap().len();
    assert!(
        len > SIZE + (SIZE >> 16) * 16 && len < SIZE + (SIZE >> 16) * 16 + 300,
        "{len}"
    );
    cli_ok(
        &app,
        &creds,
        &[
            "decrypt-file",
            sealed.to_str().unwrap(),
            opened.to_str().unwrap(),
            "--context",
            "backups/2026-12-06",
        ],
    );
    assert_eq!(sha256_file(&opened), want);
    // The wrong context unwraps no key.
    let out = cli(
        &app,
        &creds,
        &[
            "decrypt-file",
            sealed.to_str().unwrap(),
            dir.path().join("x").to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("decryption_failed"));
    assert!(!dir.path().join("x").exists());
    let peak = peak_rss_kib(app.pid());
    assert!(peak < 64 * 1024, "the server's peak RSS was {peak} KiB");
    eprintln!("server peak RSS during a 1 GiB CLI round trip: {peak} KiB");
}

async fn the_cli_refuses_a_damaged_file_and_leaves_no_output(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    let sealed = dir.path().join("sealed");
    write_pattern(&plain, 5 * 1024 + 10);
    cli_ok(
        &app,
        &creds,
        &[
            "encrypt-file",
            plain.to_str().unwrap(),
            sealed.to_str().unwrap(),
            "--encryption-id",
            &enc,
            "--chunk-size",
            "1024",
        ],
    );
    let bytes = std::fs::read(&sealed).unwrap();
    let header = bytes.len() - (5 * 1024 + 10) - 6 * 16;
    let chunk = 1024 + 16;
    let chunks: Vec<&[u8]> = bytes[header..].chunks(chunk).collect();
    let with = |parts: Vec<&[u8]>| -> Vec<u8> {
        let mut out = bytes[..header].to_vec();
        for p in parts {
            out.extend_from_slice(p);
        }
        out
    };
    let mut damaged: Vec<(String, Vec<u8>)> = vec![
        (
            "swapped".into(),
            with(vec![
                chunks[1], chunks[0], chunks[2], chunks[3], chunks[4], chunks[5],
            ]),
        ),
        (
            "duplicated".into(),
            with(vec![
                chunks[0], chunks[0], chunks[1], chunks[2], chunks[3], chunks[4], chunks[5],
            ]),
        ),
        (
            "dropped".into(),
            with(vec![chunks[0], chunks[2], chunks[3], chunks[4], chunks[5]]),
        ),
        (
            "extended".into(),
            with(vec![
                chunks[0], chunks[1], chunks[2], chunks[3], chunks[4], chunks[5], chunks[5],
            ]),
        ),
    ];
    for k in 0..chunks.len() {
        damaged.push((format!("cut after {k} chunks"), with(chunks[..k].to_vec())));
    }
    let mut flipped = bytes.clone();
    flipped[header + 3000] ^= 1;
    damaged.push(("flipped".into(), flipped));
    for (what, bytes) in damaged {
        let input = dir.path().join("damaged");
        let output = dir.path().join("out");
        std::fs::write(&input, &bytes).unwrap();
        let out = cli(
            &app,
            &creds,
            &[
                "decrypt-file",
                input.to_str().unwrap(),
                output.to_str().unwrap(),
            ],
        );
        assert!(!out.status.success(), "{what} decrypted");
        assert!(!output.exists(), "{what}: output left behind");
        assert!(
            !dir.path().join("out.partial").exists(),
            "{what}: partial output left behind"
        );
    }
    // Intact, it decrypts.
    let output = dir.path().join("out");
    cli_ok(
        &app,
        &creds,
        &[
            "decrypt-file",
            sealed.to_str().unwrap(),
            output.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read(&output).unwrap(),
        std::fs::read(&plain).unwrap()
    );
}

// ---------------------------------------------------------------------------
// The streaming routes, through a raw HTTP/1.1 client: it sends the request
// body (chunked) while it reads the response, as a streaming client must, and
// it tells a response that ended with its final empty chunk from one whose
// connection was closed without it.

/// What a streaming request sends.
enum Source {
    /// These bytes, then the end.
    Bytes(Vec<u8>),
    /// `n` bytes of a pattern (each MiB distinct), then the end.
    Pattern(u64),
    /// Whatever comes down the channel, then the end.
    Channel(mpsc::Receiver<Vec<u8>>),
    /// These bytes, then nothing: the connection stays open, silent.
    Stall(Vec<u8>),
}

/// Where a streamed response body goes.
enum Sink {
    /// Kept.
    Keep,
    /// Hashed only.
    Hash,
    /// Forwarded (and hashed).
    Channel(mpsc::Sender<Vec<u8>>),
    /// Never read: the client only sends.
    Never,
}

/// A streamed answer.
struct Answer {
    status: u16,
    /// The JSON body of an error answer.
    json: Value,
    /// The body, for [`Sink::Keep`].
    body: Vec<u8>,
    /// Body bytes received.
    len: u64,
    /// Their SHA-256.
    sha256: Vec<u8>,
    /// Whether the body ended cleanly (its final empty chunk, or all of its
    /// Content-Length): `false` when the server aborted the transfer.
    complete: bool,
    retry_after: Option<String>,
}

/// The pattern's `i`-th MiB: one block, its first 8 bytes the index.
fn pattern_block(base: &[u8], i: u64) -> Vec<u8> {
    let mut block = base.to_vec();
    block[..8].copy_from_slice(&i.to_be_bytes());
    block
}

fn base_block() -> Vec<u8> {
    (0..1u32 << 20)
        .map(|i| i.wrapping_mul(31).wrapping_add(i >> 9) as u8)
        .collect()
}

/// [`stream_call`] to `app` with no extra headers, in a task of its own, so
/// that the test can call meanwhile.
fn spawn_stream_call(
    app: &TestApp,
    path: &str,
    creds: &Creds,
    source: Source,
    sink: Sink,
) -> tokio::task::JoinHandle<Answer> {
    let (addr, path, creds) = (app.addr.clone(), path.to_string(), creds.clone());
    tokio::spawn(async move { stream_call(&addr, &path, &creds, &[], source, sink).await })
}

/// Sends `source` as the chunked body of `POST path` with `creds` and
/// `headers`, reading the answer into `sink` meanwhile.
async fn stream_call(
    addr: &str,
    path: &str,
    creds: &Creds,
    headers: &[(&str, &str)],
    source: Source,
    sink: Sink,
) -> Answer {
    let conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.set_nodelay(true).unwrap();
    let (read, mut write) = conn.into_split();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nX-Api-Key: {}\r\nX-Api-Secret: {}\r\n\
         Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n",
        addr, creds.key, creds.secret
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let writer = tokio::spawn(async move {
        async fn piece(
            w: &mut tokio::net::tcp::OwnedWriteHalf,
            data: &[u8],
        ) -> std::io::Result<()> {
            if data.is_empty() {
                return Ok(());
            }
            w.write_all(format!("{:x}\r\n", data.len()).as_bytes())
                .await?;
            w.write_all(data).await?;
            w.write_all(b"\r\n").await
        }
        let sent: std::io::Result<()> = async {
            write.write_all(head.as_bytes()).await?;
            match source {
                Source::Bytes(bytes) => {
                    for part in bytes.chunks(1 << 16) {
                        piece(&mut write, part).await?;
                    }
                }
                Source::Pattern(n) => {
                    let base = base_block();
                    let mut sent = 0u64;
                    let mut i = 0u64;
                    while sent < n {
                        let block = pattern_block(&base, i);
                        let take = (n - sent).min(block.len() as u64) as usize;
                        piece(&mut write, &block[..take]).await?;
                        sent += take as u64;
                        i += 1;
                    }
                }
                Source::Channel(mut rx) => {
                    while let Some(part) = rx.recv().await {
                        piece(&mut write, &part).await?;
                    }
                }
                Source::Stall(bytes) => {
                    piece(&mut write, &bytes).await?;
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
            }
            write.write_all(b"0\r\n\r\n").await?;
            write.flush().await
        }
        .await;
        // The server may answer (and close) before it read everything.
        let _ = sent;
        write
    });
    let mut reader = BufReader::with_capacity(1 << 20, read);
    let mut answer = Answer {
        status: 0,
        json: Value::Null,
        body: Vec::new(),
        len: 0,
        sha256: Vec::new(),
        complete: false,
        retry_after: None,
    };
    let mut digest = Context::new(&SHA256);
    let mut line = String::new();
    let mut chunked = false;
    let mut length: Option<usize> = None;
    'read: {
        if matches!(sink, Sink::Never) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            break 'read;
        }
        answer.status = line.split(' ').nth(1).unwrap().parse().unwrap();
        loop {
            line.clear();
            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                break 'read;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (name, value) = l.split_once(':').unwrap();
            let (name, value) = (name.to_ascii_lowercase(), value.trim().to_string());
            match name.as_str() {
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "content-length" => length = Some(value.parse().unwrap()),
                "retry-after" => answer.retry_after = Some(value),
                _ => {}
            }
        }
        let mut take = |data: &[u8], answer: &mut Answer| {
            digest.update(data);
            answer.len += data.len() as u64;
            data.to_vec()
        };
        if !chunked {
            let mut body = vec![0u8; length.unwrap_or(0)];
            if reader.read_exact(&mut body).await.is_err() {
                break 'read;
            }
            take(&body, &mut answer);
            answer.json = serde_json::from_slice(&body).unwrap_or(Value::Null);
            answer.body = body;
            answer.complete = true;
            break 'read;
        }
        loop {
            line.clear();
            if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                break 'read;
            }
            let Ok(size) = usize::from_str_radix(line.trim_end(), 16) else {
                break 'read;
            };
            if size == 0 {
                line.clear();
                let _ = reader.read_line(&mut line).await;
                answer.complete = line == "\r\n";
                break 'read;
            }
            let mut data = vec![0u8; size + 2];
            if reader.read_exact(&mut data).await.is_err() {
                break 'read;
            }
            data.truncate(size);
            let data = take(&data, &mut answer);
            match &sink {
                Sink::Keep => answer.body.extend_from_slice(&data),
                Sink::Hash | Sink::Never => {}
                Sink::Channel(tx) => {
                    if tx.send(data).await.is_err() {
                        break 'read;
                    }
                }
            }
        }
    }
    drop(sink);
    writer.abort();
    answer.sha256 = digest.finish().as_ref().to_vec();
    answer
}

/// `stream_call` with the bytes in and the body kept.
async fn stream_bytes(
    app: &TestApp,
    path: &str,
    creds: &Creds,
    headers: &[(&str, &str)],
    bytes: &[u8],
) -> Answer {
    stream_call(
        &app.addr,
        path,
        creds,
        headers,
        Source::Bytes(bytes.to_vec()),
        Sink::Keep,
    )
    .await
}

fn pattern_sha256(n: u64) -> Vec<u8> {
    let base = base_block();
    let mut digest = Context::new(&SHA256);
    let (mut sent, mut i) = (0u64, 0u64);
    while sent < n {
        let block = pattern_block(&base, i);
        let take = (n - sent).min(block.len() as u64) as usize;
        digest.update(&block[..take]);
        sent += take as u64;
        i += 1;
    }
    digest.finish().as_ref().to_vec()
}

fn some_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 13 + i / 1021) as u8).collect()
}

async fn one_gib_streams_through_both_routes_with_the_server_under_64_mib(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    const SIZE: u64 = 1 << 30;
    let want = pattern_sha256(SIZE);
    let started = Instant::now();
    // The encrypted stream goes straight from one route into the other.
    let (tx, rx) = mpsc::channel(4);
    let context = [("X-Keyward-Context", "backups/2026-12-06")];
    let path = format!("/v1/encrypt/stream?encryptionId={enc}");
    let (sealed, opened) = tokio::join!(
        stream_call(
            &app.addr,
            &path,
            &creds,
            &context,
            Source::Pattern(SIZE),
            Sink::Channel(tx)
        ),
        stream_call(
            &app.addr,
            "/v1/decrypt/stream",
            &creds,
            &context,
            Source::Channel(rx),
            Sink::Hash
        ),
    );
    let elapsed = started.elapsed();
    assert_eq!(sealed.status, 200, "{}", sealed.json);
    assert!(sealed.complete, "the encrypted stream was cut");
    // 64 KiB chunks: a 16-byte tag each, and the header.
    let tags = (SIZE >> 16) * 16;
    assert!(
        sealed.len > SIZE + tags && sealed.len < SIZE + tags + 300,
        "{}",
        sealed.len
    );
    assert_eq!(opened.status, 200, "{}", opened.json);
    assert!(opened.complete, "the decrypted stream was cut");
    assert_eq!(opened.len, SIZE);
    assert_eq!(opened.sha256, want);
    let peak = peak_rss_kib(app.pid());
    eprintln!(
        "1 GiB through /v1/encrypt/stream into /v1/decrypt/stream: {:.1} s, server peak RSS {peak} KiB",
        elapsed.as_secs_f64()
    );
    assert!(peak < 64 * 1024, "the server's peak RSS was {peak} KiB");
    // Audited once per stream, when it ended, with the version.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for operation in ["encrypt.stream", "decrypt.stream"] {
        let (status, records) = app
            .get(&format!("/v1/audit?operation={operation}&limit=10"), &creds)
            .await;
        assert_eq!(status, StatusCode::OK, "{records}");
        let records = records["records"].as_array().unwrap();
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0]["outcome"], "ok", "{records:?}");
        assert_eq!(records[0]["encryptionId"], enc.as_str());
        assert!(records[0]["versionId"].is_string(), "{records:?}");
        assert!(!records[0].to_string().contains("backups/2026"));
    }
    let metrics = app.get_text("/metrics").await;
    assert!(
        metrics.contains("keyward_stream_bytes_total{operation=\"encrypt\"} 1073741824"),
        "{metrics}"
    );
    assert!(
        metrics.contains("keyward_streams_total{operation=\"decrypt.stream\",outcome=\"ok\"} 1")
    );
}

async fn the_routes_and_the_cli_read_each_others_streams(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let dir = tempfile::tempdir().unwrap();
    let plain = some_bytes(3 * 1024 * 1024 + 77);
    // The route's stream opens with `keyward decrypt-file`.
    let sealed = stream_bytes(
        &app,
        &format!("/v1/encrypt/stream?encryptionId={enc}&chunkSize=100000"),
        &creds,
        &[("X-Keyward-Context", "caf%C3%A9 %25 2026")],
        &plain,
    )
    .await;
    assert_eq!(sealed.status, 200, "{}", sealed.json);
    assert!(sealed.complete);
    assert_eq!(&sealed.body[..8], b"KWSTREAM");
    std::fs::write(dir.path().join("from-route"), &sealed.body).unwrap();
    cli_ok(
        &app,
        &creds,
        &[
            "decrypt-file",
            dir.path().join("from-route").to_str().unwrap(),
            dir.path().join("opened").to_str().unwrap(),
            "--context",
            "café % 2026",
        ],
    );
    assert_eq!(std::fs::read(dir.path().join("opened")).unwrap(), plain);
    // A `keyward encrypt-file` file opens through the route.
    std::fs::write(dir.path().join("plain"), &plain).unwrap();
    cli_ok(
        &app,
        &creds,
        &[
            "encrypt-file",
            dir.path().join("plain").to_str().unwrap(),
            dir.path().join("from-cli").to_str().unwrap(),
            "--encryption-id",
            &enc,
            "--context",
            "café % 2026",
        ],
    );
    let file = std::fs::read(dir.path().join("from-cli")).unwrap();
    let opened = stream_bytes(
        &app,
        "/v1/decrypt/stream",
        &creds,
        &[("X-Keyward-Context", "caf%C3%A9%20%25%202026")],
        &file,
    )
    .await;
    assert_eq!(opened.status, 200, "{}", opened.json);
    assert!(opened.complete);
    assert_eq!(opened.body, plain);
    // An empty body is a stream too.
    let sealed = stream_bytes(
        &app,
        &format!("/v1/encrypt/stream?encryptionId={enc}"),
        &creds,
        &[],
        b"",
    )
    .await;
    assert!(sealed.complete);
    let opened = stream_bytes(&app, "/v1/decrypt/stream", &creds, &[], &sealed.body).await;
    assert!(opened.complete);
    assert_eq!((opened.status, opened.len), (200, 0));
    // Bodies with a Content-Length work as well (reqwest sends one).
    let resp = app
        .req(
            Method::POST,
            &format!("/v1/encrypt/stream?encryptionId={enc}"),
            &creds,
        )
        .header("Content-Type", "application/octet-stream")
        .body(plain.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    let sealed = resp.bytes().await.unwrap();
    let opened = stream_bytes(&app, "/v1/decrypt/stream", &creds, &[], &sealed).await;
    assert!(opened.complete);
    assert_eq!(opened.body, plain);
}

async fn a_stream_needs_its_context_its_scope_and_its_tenant(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let plain = some_bytes(200_000);
    let enc_path = format!("/v1/encrypt/stream?encryptionId={enc}");
    let sealed = stream_bytes(
        &app,
        &enc_path,
        &creds,
        &[("X-Keyward-Context", "order-7")],
        &plain,
    )
    .await;
    assert!(sealed.complete);
    // Wrong or missing context: one `decryption_failed`, before any byte.
    for headers in [vec![], vec![("X-Keyward-Context", "order-8")]] {
        let answer = stream_bytes(&app, "/v1/decrypt/stream", &creds, &headers, &sealed.body).await;
        assert_eq!(answer.status, 400, "{}", answer.json);
        assert_eq!(answer.json["error"]["code"], "decryption_failed");
    }
    // The context is a header, never a query parameter (URLs reach access logs).
    let answer = stream_bytes(
        &app,
        "/v1/decrypt/stream?context=order-7",
        &creds,
        &[],
        &sealed.body,
    )
    .await;
    assert_eq!(
        answer.json["error"]["code"], "invalid_request",
        "{}",
        answer.json
    );
    assert!(!answer.json.to_string().contains("order-7"));
    // Malformed input before any byte: clear 4xx codes.
    let answer = stream_bytes(
        &app,
        "/v1/decrypt/stream",
        &creds,
        &[],
        b"not a stream at all, no",
    )
    .await;
    assert_eq!(
        (answer.status, answer.json["error"]["code"].as_str()),
        (400, Some("invalid_stream"))
    );
    let answer = stream_bytes(&app, "/v1/encrypt/stream", &creds, &[], b"x").await;
    assert_eq!(answer.status, 400, "{}", answer.json);
    let answer = stream_bytes(&app, &format!("{enc_path}&chunkSize=10"), &creds, &[], b"x").await;
    assert_eq!(answer.json["error"]["code"], "invalid_request");
    let answer = stream_bytes(
        &app,
        &enc_path,
        &creds,
        &[("X-Keyward-Context", "%FF")],
        b"x",
    )
    .await;
    assert_eq!(answer.json["error"]["code"], "invalid_request");
    let resp = app
        .req(Method::POST, &enc_path, &creds)
        .header("Content-Type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // Scopes: encrypt for encrypt, decrypt for decrypt; data-key scopes do not do.
    let keys = app.create_key(&creds.tenant_id, "datakey,unwrap");
    let encrypter = app.create_key(&creds.tenant_id, "encrypt");
    let decrypter = app.create_key(&creds.tenant_id, "decrypt");
    for (who, path, body) in [
        (&keys, enc_path.as_str(), &plain),
        (&keys, "/v1/decrypt/stream", &sealed.body),
        (&decrypter, enc_path.as_str(), &plain),
        (&encrypter, "/v1/decrypt/stream", &sealed.body),
    ] {
        let answer = stream_bytes(&app, path, who, &[], body).await;
        assert_eq!(answer.status, 403, "{path}: {}", answer.json);
        assert_eq!(answer.json["error"]["code"], "insufficient_scope");
    }
    let answer = stream_bytes(
        &app,
        "/v1/decrypt/stream",
        &decrypter,
        &[("X-Keyward-Context", "order-7")],
        &sealed.body,
    )
    .await;
    assert!(answer.complete);
    assert_eq!(answer.body, plain);
    // Another tenant's encryption answers like one that does not exist.
    let other = app.create_tenant("globex");
    let answer = stream_bytes(&app, &enc_path, &other, &[], &plain).await;
    assert_eq!(answer.status, 404, "{}", answer.json);
    assert_eq!(answer.json["error"]["code"], "encryption_not_found");
    let answer = stream_bytes(
        &app,
        "/v1/decrypt/stream",
        &other,
        &[("X-Keyward-Context", "order-7")],
        &sealed.body,
    )
    .await;
    assert_eq!(answer.status, 404, "{}", answer.json);
    assert_eq!(answer.json["error"]["code"], "encryption_not_found");
    // No credentials: 401, and no slot taken.
    let (status, body) = send(
        app.client
            .post(app.url("/v1/decrypt/stream"))
            .header("Content-Type", "application/octet-stream")
            .body(sealed.body.clone()),
    )
    .await;
    assert_error(status, &body, 401, "missing_credentials");
}

/// The sealed stream of `n` bytes in 1 KiB chunks, cut into its header and
/// its chunks.
fn cut(sealed: &[u8], n: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
    let chunks = n.div_ceil(1024).max(1);
    let header = sealed.len() - n - chunks * 16;
    let parts = sealed[header..]
        .chunks(1024 + 16)
        .map(<[u8]>::to_vec)
        .collect();
    (sealed[..header].to_vec(), parts)
}

async fn a_damaged_stream_aborts_the_transfer_and_releases_no_damaged_plaintext(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    const N: usize = 5 * 1024 + 10;
    let plain = some_bytes(N);
    let sealed = stream_bytes(
        &app,
        &format!("/v1/encrypt/stream?encryptionId={enc}&chunkSize=1024"),
        &creds,
        &[],
        &plain,
    )
    .await;
    assert!(sealed.complete);
    let (header, c) = cut(&sealed.body, N);
    assert_eq!(c.len(), 6);
    let join = |parts: &[&Vec<u8>]| -> Vec<u8> {
        let mut out = header.clone();
        for p in parts {
            out.extend_from_slice(p);
        }
        out
    };
    let mut flipped = c[2].clone();
    flipped[100] ^= 1;
    // Each damaged stream, with the plaintext bytes that verify before the
    // damage (the most the route may release).
    let mut damaged: Vec<(String, Vec<u8>, usize)> = vec![
        (
            "flipped".into(),
            join(&[&c[0], &c[1], &flipped, &c[3], &c[4], &c[5]]),
            2048,
        ),
        (
            "swapped".into(),
            join(&[&c[0], &c[2], &c[1], &c[3], &c[4], &c[5]]),
            1024,
        ),
        (
            "duplicated".into(),
            join(&[&c[0], &c[1], &c[1], &c[2], &c[3], &c[4], &c[5]]),
            2048,
        ),
        (
            "dropped".into(),
            join(&[&c[0], &c[2], &c[3], &c[4], &c[5]]),
            1024,
        ),
        (
            "extended".into(),
            join(&[&c[0], &c[1], &c[2], &c[3], &c[4], &c[5], &c[5]]),
            5 * 1024,
        ),
    ];
    for k in 0..c.len() {
        let parts: Vec<&Vec<u8>> = c[..k].iter().collect();
        damaged.push((
            format!("cut after {k} chunks"),
            join(&parts),
            k.saturating_sub(1) * 1024,
        ));
    }
    let mut one_more = sealed.body.clone();
    one_more.push(0);
    damaged.push(("a byte after the last chunk".into(), one_more, 5 * 1024));
    for (what, bytes, verified) in damaged {
        let answer = stream_bytes(&app, "/v1/decrypt/stream", &creds, &[], &bytes).await;
        assert!(!answer.complete, "{what}: the transfer ended cleanly");
        assert!(
            answer.status == 200 || answer.status == 0,
            "{what}: {}",
            answer.status
        );
        assert!(
            answer.body.len() <= verified,
            "{what}: {} bytes released",
            answer.body.len()
        );
        assert_eq!(answer.body[..], plain[..answer.body.len()], "{what}");
    }
    // Intact, it decrypts.
    let answer = stream_bytes(&app, "/v1/decrypt/stream", &creds, &[], &sealed.body).await;
    assert!(answer.complete);
    assert_eq!(answer.body, plain);
    // The aborted streams are audited as errors.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, records) = app
        .get("/v1/audit?operation=decrypt.stream&limit=100", &creds)
        .await;
    assert_eq!(status, StatusCode::OK, "{records}");
    let records = records["records"].as_array().unwrap();
    let errors: Vec<&str> = records
        .iter()
        .filter(|r| r["outcome"] == "error")
        .map(|r| r["error"].as_str().unwrap())
        .collect();
    assert_eq!(errors.len(), 12, "{records:?}");
    assert!(errors.contains(&"decryption_failed"), "{errors:?}");
    assert!(errors.contains(&"stream_truncated"), "{errors:?}");
}

async fn a_stalled_client_is_cut_off_and_streams_beyond_the_limit_are_busy(backend: Backend) {
    let app = TestApp::spawn_with(
        backend,
        &[
            ("KEYWARD_STREAM_READ_TIMEOUT", "2s"),
            ("KEYWARD_STREAM_MAX_CONCURRENT", "1"),
        ],
    )
    .await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let enc_path = format!("/v1/encrypt/stream?encryptionId={enc}");
    let started = Instant::now();
    let stalled = spawn_stream_call(
        &app,
        &enc_path,
        &creds,
        Source::Stall(some_bytes(100_000)),
        Sink::Keep,
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The one slot is taken: 503 server_busy with Retry-After, before a byte.
    let busy = stream_bytes(&app, &enc_path, &creds, &[], b"hello").await;
    assert_eq!(busy.status, 503, "{}", busy.json);
    assert_eq!(busy.json["error"]["code"], "server_busy");
    assert_eq!(busy.retry_after.as_deref(), Some("1"));
    // The stalled client is cut off after the read timeout: its transfer fails.
    let stalled = stalled.await.unwrap();
    let took = started.elapsed();
    assert_eq!(stalled.status, 200);
    assert!(!stalled.complete, "a stalled stream ended cleanly");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "{took:?}"
    );
    // Its slot is free again.
    let answer = stream_bytes(&app, &enc_path, &creds, &[], b"hello").await;
    assert!(answer.complete, "{}", answer.json);
    // A client that sends but never reads: once the socket is full the
    // server cannot write, and after the read timeout it gives the stream
    // up and frees its slot.
    let deaf = spawn_stream_call(
        &app,
        &enc_path,
        &creds,
        Source::Pattern(1 << 30),
        Sink::Never,
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let busy = stream_bytes(&app, &enc_path, &creds, &[], b"hello").await;
    assert_eq!(busy.status, 503, "{}", busy.json);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = stream_bytes(&app, &enc_path, &creds, &[], b"hello").await;
        if answer.status == 200 {
            assert!(answer.complete);
            break;
        }
        assert_eq!(answer.status, 503, "{}", answer.json);
        assert!(Instant::now() < deadline, "the unread stream kept its slot");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    deaf.abort();
    let metrics = app.get_text("/metrics").await;
    assert!(
        metrics.contains("keyward_streams_unread_total 1"),
        "{metrics}"
    );
    // Silent before the header is complete: 408 request_timeout.
    let header_only = answer.body[..20].to_vec();
    let answer = stream_call(
        &app.addr,
        "/v1/decrypt/stream",
        &creds,
        &[],
        Source::Stall(header_only),
        Sink::Keep,
    )
    .await;
    assert_eq!(answer.status, 408, "{}", answer.json);
    assert_eq!(answer.json["error"]["code"], "request_timeout");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, records) = app
        .get("/v1/audit?operation=encrypt.stream&limit=100", &creds)
        .await;
    let text = records.to_string();
    assert!(text.contains("stream_timeout"), "{text}");
    assert!(text.contains("server_busy"), "{text}");
}

async fn a_disabled_version_is_refused_before_any_byte(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, v1) = app.create_encryption(&creds).await;
    let plain = some_bytes(300_000);
    let sealed = stream_bytes(
        &app,
        &format!("/v1/encrypt/stream?encryptionId={enc}"),
        &creds,
        &[],
        &plain,
    )
    .await;
    assert!(sealed.complete);
    app.rotate(&creds, &enc).await;
    let (status, body) = send(
        app.req(
            Method::PATCH,
            &format!("/v1/encryptions/{enc}/versions/{v1}"),
            &creds,
        )
        .json(&serde_json::json!({"state": "disabled"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let answer = stream_bytes(&app, "/v1/decrypt/stream", &creds, &[], &sealed.body).await;
    assert_eq!(answer.status, 403, "{}", answer.json);
    assert_eq!(answer.json["error"]["code"], "version_disabled");
    // New streams use the active version.
    let sealed = stream_bytes(
        &app,
        &format!("/v1/encrypt/stream?encryptionId={enc}"),
        &creds,
        &[],
        &plain,
    )
    .await;
    let answer = stream_bytes(&app, "/v1/decrypt/stream", &creds, &[], &sealed.body).await;
    assert!(answer.complete);
    assert_eq!(answer.body, plain);
}

async fn a_client_mode_stream_needs_the_same_master_key(backend: Backend) {
    use base64::Engine;
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.encode(crate::helpers::rand_bytes::<32>());
    let wrong = b64.encode(crate::helpers::rand_bytes::<32>());
    let (status, created) = send(
        app.req(Method::POST, "/v1/encryptions", &creds)
            .header("X-Master-Key", &key)
            .json(&serde_json::json!({})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let enc = created["encryptionId"].as_str().unwrap();
    let enc_path = format!("/v1/encrypt/stream?encryptionId={enc}");
    let plain = some_bytes(150_000);
    let with = [("X-Master-Key", key.as_str())];
    let sealed = stream_bytes(&app, &enc_path, &creds, &with, &plain).await;
    assert_eq!(sealed.status, 200, "{}", sealed.json);
    assert!(sealed.complete);
    let opened = stream_bytes(&app, "/v1/decrypt/stream", &creds, &with, &sealed.body).await;
    assert!(opened.complete);
    assert_eq!(opened.body, plain);
    for (path, body) in [
        (enc_path.as_str(), &plain),
        ("/v1/decrypt/stream", &sealed.body),
    ] {
        let answer = stream_bytes(&app, path, &creds, &[], body).await;
        assert_eq!(answer.status, 401, "{path}: {}", answer.json);
        assert_eq!(answer.json["error"]["code"], "master_key_required");
        let answer = stream_bytes(
            &app,
            path,
            &creds,
            &[("X-Master-Key", wrong.as_str())],
            body,
        )
        .await;
        assert_eq!(answer.status, 403, "{path}: {}", answer.json);
        assert_eq!(answer.json["error"]["code"], "master_key_mismatch");
    }
}

/// A stream's chunk size is its caller's choice: the streams' memory comes
/// from `max_concurrent_body_bytes`, the budget batches share, all streams
/// together at most half of it, and a chunk size whose memory one stream may
/// not hold is refused, on encrypt and on decrypt. At the defaults (16 MiB):
/// a stream of 1 MiB chunks holds 5 MiB, so a second one is 503
/// `server_busy` while batches are still served; HTTP/1.0 is refused, since
/// an aborted stream would look complete there.
async fn streams_take_their_working_memory_from_the_shared_budget(backend: Backend) {
    let app = TestApp::spawn_with(backend, &[("KEYWARD_STREAM_READ_TIMEOUT", "2s")]).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let small = format!("/v1/encrypt/stream?encryptionId={enc}");
    let one_mib = format!("/v1/encrypt/stream?encryptionId={enc}&chunkSize=1048576");
    // Chunks whose memory one stream may not hold: 400, before any of it.
    let too_large = format!("/v1/encrypt/stream?encryptionId={enc}&chunkSize=2097152");
    let refused = stream_bytes(&app, &too_large, &creds, &[], b"hello").await;
    assert_eq!(refused.status, 400, "{}", refused.json);
    assert_eq!(refused.json["error"]["code"], "invalid_request");
    assert!(
        refused.json["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1834992"),
        "{}",
        refused.json
    );
    // One stream of 1 MiB chunks holds 5 MiB of the streams' 8 MiB.
    let holder = spawn_stream_call(
        &app,
        &one_mib,
        &creds,
        Source::Stall(some_bytes(1000)),
        Sink::Keep,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A stream of 64 KiB chunks fits beside it; a second of 1 MiB chunks not.
    let answer = stream_bytes(&app, &small, &creds, &[], b"beside it").await;
    assert!(answer.complete, "{}", answer.json);
    let busy = stream_bytes(&app, &one_mib, &creds, &[], b"hello").await;
    assert_eq!(busy.status, 503, "{}", busy.json);
    assert_eq!(busy.json["error"]["code"], "server_busy");
    // Batches keep the other half.
    let items: Vec<Value> = (0..10)
        .map(|_| serde_json::json!({"encryptionId": enc, "data": "hello"}))
        .collect();
    let batch = serde_json::json!({ "items": items });
    let (status, body) = app.post("/v1/encrypt/batch", &creds, &batch).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Cut off by the read timeout, the holder gives its memory back.
    assert!(!holder.await.unwrap().complete);
    let answer = stream_bytes(&app, &one_mib, &creds, &[], b"hello").await;
    assert!(answer.complete, "{}", answer.json);
    // A file made with larger chunks than the server streams: 400 on
    // decrypt too (keyward decrypt-file opens it).
    let dir = tempfile::tempdir().unwrap();
    let (plain, sealed) = (dir.path().join("in"), dir.path().join("in.kw"));
    std::fs::write(&plain, b"made with 4 MiB chunks").unwrap();
    cli_ok(
        &app,
        &creds,
        &[
            "encrypt-file",
            plain.to_str().unwrap(),
            sealed.to_str().unwrap(),
            "--encryption-id",
            &enc,
            "--chunk-size",
            "4194304",
        ],
    );
    let file = std::fs::read(&sealed).unwrap();
    let refused = stream_bytes(&app, "/v1/decrypt/stream", &creds, &[], &file).await;
    assert_eq!(refused.status, 400, "{}", refused.json);
    assert_eq!(refused.json["error"]["code"], "invalid_request");
    // HTTP/1.0: refused, since its end is the connection's close.
    let mut conn = tokio::net::TcpStream::connect(&app.addr).await.unwrap();
    let request = format!(
        "POST {small} HTTP/1.0\r\nHost: {}\r\nX-Api-Key: {}\r\nX-Api-Secret: {}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: 5\r\n\r\nhello",
        app.addr, creds.key, creds.secret
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    let status_line = answer.lines().next().unwrap_or_default();
    assert!(status_line.contains(" 400 "), "{answer}");
    assert!(answer.contains("HTTP/1.1 or HTTP/2"), "{answer}");
}
