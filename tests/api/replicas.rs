//! Several `keyward serve` processes on one database.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{Backend, TestApp};

crate::on_both_databases!(a_rotation_on_one_replica_reaches_the_others);

async fn a_rotation_on_one_replica_reaches_the_others(backend: Backend) {
    // On PostgreSQL the poll interval is a minute, so only LISTEN/NOTIFY can
    // deliver the change quickly; on SQLite polling does, every 100 ms.
    let interval = match backend {
        Backend::Postgres => "60s",
        Backend::Sqlite => "100ms",
    };
    let a = TestApp::spawn_with(
        backend,
        &[
            ("KEYWARD_SYNC_INTERVAL", interval),
            // The feed's lag bound must allow for the poll interval.
            ("KEYWARD_CHANGE_FEED_MAX_LAG", "3m"),
            ("KEYWARD_DESTROY_GRACE", "5m"),
        ],
    )
    .await;
    let b = a.spawn_replica(&[]);
    let creds = a.create_tenant("acme");
    let (enc, v1) = a.create_encryption(&creds).await;
    // B caches the encryption with version 1 active.
    let on_b = b.encrypt(&creds, &enc, "x").await;
    assert_eq!(on_b["encryptionVersionId"], v1.as_str());
    // Give B's LISTEN connection a moment to be established.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let v2 = a.rotate(&creds, &enc).await;
    let started = Instant::now();
    loop {
        let e = b.encrypt(&creds, &enc, "y").await;
        if e["encryptionVersionId"] == v2.as_str() {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "replica B still encrypts under the old version"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A ciphertext made on one replica decrypts on the other.
    let made_on_a = a.encrypt(&creds, &enc, "from a").await;
    let (status, body) = b.decrypt(&creds, &made_on_a).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"data": "from a"}));
    let (status, _) = a.decrypt(&creds, &on_b).await;
    assert_eq!(status, StatusCode::OK);
}
