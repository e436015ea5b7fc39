//! The database never answers for capacity: a SQLite file another process
//! holds locked is a `503 unavailable` with `Retry-After` (never `500
//! internal`), while key operations keep answering and the write path works
//! again as soon as the lock goes; concurrent writers (rotations, key
//! creations, policy changes, API keys, the audit table) queue instead of
//! failing. The faults themselves (SIGKILL, PostgreSQL restarts, providers
//! down, a full disk, a job killed mid-batch) are counted by `bench/faults`,
//! which scripts/test runs.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use sqlx::Connection;

use crate::helpers::{Backend, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_sqlite_database_is_a_503_with_retry_after_and_key_operations_go_on() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let before = app.encrypt(&creds, &enc, "before the lock").await;

    // Another process takes SQLite's write lock and keeps it (a backup tool,
    // a stuck CLI): WAL lets readers on, every writer waits.
    sqlx::any::install_default_drivers();
    let mut locker = sqlx::AnyConnection::connect(&app.db.url).await.unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut locker)
        .await
        .unwrap();

    let started = Instant::now();
    let rotate = app
        .req(reqwest::Method::POST, "/v1/rotate", &creds)
        .json(&json!({"encryptionId": enc}));
    let rotating = tokio::spawn(rotate.send());
    // Meanwhile encrypt and decrypt answer at once.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let during = app.encrypt(&creds, &enc, "during the lock").await;
    let (status, body) = app.decrypt(&creds, &before).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "key operations waited for the write lock: {:?}",
        t.elapsed()
    );

    let resp = rotating.await.unwrap().unwrap();
    let waited = started.elapsed();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after = resp.headers().get("retry-after").cloned();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert!(retry_after.is_some(), "a 503 without Retry-After");
    // It queued (SQLite's busy timeout) before giving up, and did not hang
    // past the request time limit.
    assert!(
        waited >= Duration::from_secs(5) && waited < Duration::from_secs(30),
        "{waited:?}"
    );

    // The lock goes: the write path works again at once, nothing was lost.
    sqlx::query("ROLLBACK").execute(&mut locker).await.unwrap();
    drop(locker);
    let new_version = app.rotate(&creds, &enc).await;
    let after = app.encrypt(&creds, &enc, "after the lock").await;
    assert_eq!(after["encryptionVersionId"], new_version.as_str());
    for (sealed, plain) in [
        (&before, "before the lock"),
        (&during, "during the lock"),
        (&after, "after the lock"),
    ] {
        let (status, body) = app.decrypt(&creds, sealed).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"], plain);
    }
    assert!(
        !app.log_text().contains("\"code\":\"internal\""),
        "a locked database was logged as an internal error"
    );
}

async fn concurrent_writers_queue_instead_of_failing(backend: Backend) {
    let app = TestApp::spawn_with(backend, &[("KEYWARD_RATE_LIMIT", "0")]).await;
    let creds = app.create_tenant("acme");
    let mut encs = Vec::new();
    for _ in 0..3 {
        encs.push(app.create_encryption(&creds).await.0);
    }
    let app = std::sync::Arc::new(app);
    let mut tasks = Vec::new();
    for i in 0..24usize {
        let (app, creds, enc) = (app.clone(), creds.clone(), encs[i % 3].clone());
        tasks.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            for j in 0..5usize {
                let (status, body) = match (i + j) % 4 {
                    0 | 1 => {
                        app.post("/v1/rotate", &creds, &json!({"encryptionId": enc}))
                            .await
                    }
                    2 => app.post("/v1/encryptions", &creds, &json!({})).await,
                    _ => {
                        let path = format!("/v1/encryptions/{enc}");
                        let req = app
                            .req(reqwest::Method::PATCH, &path, &creds)
                            .json(&json!({"autoRotatePeriod": format!("{}h", 10 + j)}));
                        crate::helpers::send(req).await
                    }
                };
                statuses.push((status, body));
                let (status, body) = app.get("/v1/audit?limit=5", &creds).await;
                statuses.push((status, body));
            }
            statuses
        }));
    }
    // Encryptions keep answering beside them.
    let mut slowest = Duration::ZERO;
    let mut sealed = Vec::new();
    while !tasks.iter().all(|t| t.is_finished()) {
        let t = Instant::now();
        sealed.push(app.encrypt(&creds, &encs[0], "beside the writers").await);
        slowest = slowest.max(t.elapsed());
    }
    for task in tasks {
        for (status, body) in task.await.unwrap() {
            assert!(status.is_success(), "{status} {body}");
        }
    }
    assert!(
        slowest < Duration::from_secs(3),
        "an encrypt waited {slowest:?} behind the writers"
    );
    for s in &sealed {
        let (status, body) = app.decrypt(&creds, s).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    assert!(!app.log_text().contains("database is locked"));
}

crate::on_both_databases!(concurrent_writers_queue_instead_of_failing);
