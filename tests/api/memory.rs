//! Memory given back when idle (`memory_release_idle_after`): once the server
//! has been idle that long it closes all idle SQLite connections but one and
//! returns free pages to the operating system, once per idle period, and
//! everything keeps working on the connections it opens again.

use std::time::{Duration, Instant};

use futures::future::join_all;
use serde_json::{json, Value};

use crate::helpers::{Backend, TestApp};

crate::on_both_databases!(memory_is_released_once_per_idle_period_and_serving_goes_on);

/// The `closed_connections` of every release the log shows so far.
fn releases(app: &TestApp) -> Vec<u64> {
    app.log_text()
        .lines()
        .filter(|line| line.contains("idle: memory released"))
        .map(|line| {
            let record: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
            record["closed_connections"].as_u64().unwrap()
        })
        .collect()
}

/// Waits up to `within` for the log to show `n` releases.
async fn wait_for_releases(app: &TestApp, n: usize, within: Duration) -> Vec<u64> {
    let deadline = Instant::now() + within;
    loop {
        let seen = releases(app);
        if seen.len() >= n || Instant::now() > deadline {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn memory_is_released_once_per_idle_period_and_serving_goes_on(backend: Backend) {
    // Background work at production rates (the test harness polls the
    // change feed every 100 ms and logs every query): an idle debug build on
    // a loaded machine must stay under the 2 % of a core that counts as idle.
    let app = TestApp::spawn_with(
        backend,
        &[
            ("KEYWARD_MEMORY_RELEASE_IDLE_AFTER", "1s"),
            ("KEYWARD_SYNC_INTERVAL", "1s"),
            ("KEYWARD_LOG_LEVEL", "keyward::memory=debug,info"),
        ],
    )
    .await;
    let creds = app.create_tenant("idle");
    // Sixteen creations at once take several pooled connections.
    let created = join_all((0..16).map(|_| app.create_encryption(&creds))).await;
    let encrypted = join_all(
        created
            .iter()
            .map(|(id, _)| app.encrypt(&creds, id, "aGVsbG8=")),
    )
    .await;

    let first = wait_for_releases(&app, 1, Duration::from_secs(15)).await;
    assert_eq!(first.len(), 1, "no release after the server went idle");
    match backend {
        // All idle connections but one closed: the creations opened several.
        Backend::Sqlite => assert!(first[0] >= 1, "{first:?}"),
        // PostgreSQL's caches are the database server's: nothing to close.
        Backend::Postgres => assert_eq!(first[0], 0),
    }
    // Idle on: no further release (one per idle period).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(releases(&app).len(), 1);

    // Everything works on connections opened again: reads of every key,
    // writes (a rotation, new encryptions), listings.
    for (sealed, (id, _)) in encrypted.iter().zip(&created) {
        let (status, body) = app.decrypt(&creds, sealed).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"], "aGVsbG8=");
        app.rotate(&creds, id).await;
    }
    let more = join_all((0..8).map(|_| app.create_encryption(&creds))).await;
    assert_eq!(more.len(), 8);
    let (status, list) = app.get("/v1/encryptions?limit=100", &creds).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["items"].as_array().unwrap().len(), 24, "{list}");
    let sealed = app.encrypt(&creds, &created[0].0, "d29ybGQ=").await;
    let (status, body) = app.decrypt(&creds, &sealed).await;
    assert_eq!(
        (status.as_u16(), body["data"].clone()),
        (200, json!("d29ybGQ="))
    );

    // Busy, then idle again: a second release.
    let second = wait_for_releases(&app, 2, Duration::from_secs(15)).await;
    assert_eq!(second.len(), 2, "no release after the second busy period");
}
