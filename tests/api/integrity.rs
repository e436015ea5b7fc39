//! Integrity: key material is never destroyed or stranded while acknowledged
//! data needs it, and no operation silently undoes another (issue #26).
//! `scripts/test integrity` runs these alone.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::Connection;

use crate::helpers::{assert_error, random_master_key, send, Backend, Creds, TestApp};

crate::on_both_databases!(
    a_destroyed_version_does_not_pin_a_root_kek,
    a_second_root_kek_rotation_waits_for_the_first,
    a_root_kek_rotation_after_a_master_key_migration_is_refused,
    a_stalled_root_kek_rotation_is_visible_and_moves_everything_it_can,
    a_version_is_destroyed_only_after_it_was_disabled_for_the_grace_period,
    no_replica_uses_a_version_after_its_destroy_returned,
);

/// A key for the operator's routes.
fn operator(app: &TestApp) -> Creds {
    app.create_operator()
}

async fn root_kek_status(app: &TestApp, operator: &Creds) -> Value {
    let (status, body) = app.get("/v1/admin/root-kek", operator).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// Waits until the root-KEK rotation has finished: one KEK, `done`.
async fn rotation_done(app: &TestApp, operator: &Creds) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = root_kek_status(app, operator).await;
        if st["rotation"] == "done" && st["rootKeks"].as_array().unwrap().len() == 1 {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "the root-KEK rotation never finished: {st}\n{}",
            app.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn rotate_root_kek(app: &TestApp, operator: &Creds) -> (StatusCode, Value) {
    app.post("/v1/admin/root-kek/rotate", operator, &json!({}))
        .await
}

async fn decrypts(app: &TestApp, creds: &Creds, encrypted: &Value, data: &str) {
    let (status, body) = app.decrypt(creds, encrypted).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["data"], data);
}

/// A destroyed version holds no key, so it must not keep its old root KEK
/// alive: before, it did, and every later root-KEK rotation stopped for good
/// with the live versions left under the old KEK while the API said 202.
async fn a_destroyed_version_does_not_pin_a_root_kek(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let op = operator(&app);
    let creds = app.create_tenant("acme");
    let (enc, v1) = app.create_encryption(&creds).await;
    app.encrypt(&creds, &enc, "under v1").await;
    app.rotate(&creds, &enc).await;
    let e2 = app.encrypt(&creds, &enc, "under v2").await;
    let (status, body) = send(
        app.req(
            reqwest::Method::PATCH,
            &format!("/v1/encryptions/{enc}/versions/{v1}"),
            &creds,
        )
        .json(&json!({"state": "destroyed", "force": true})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let before = root_kek_status(&app, &op).await;
    let old_kek = before["rootKeks"][0]["kekId"].clone();
    let (status, body) = rotate_root_kek(&app, &op).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let st = rotation_done(&app, &op).await;
    assert_ne!(st["rootKeks"][0]["kekId"], old_kek, "{st}");
    assert_eq!(st["rootKeks"][0]["versions"], 1, "{st}");
    decrypts(&app, &creds, &e2, "under v2").await;
    // And the next rotation is not blocked either.
    let (status, body) = rotate_root_kek(&app, &op).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    rotation_done(&app, &op).await;
    decrypts(&app, &creds, &e2, "under v2").await;
}

async fn a_second_root_kek_rotation_waits_for_the_first(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let op = operator(&app);
    let creds = app.create_tenant("acme");
    let mut made = vec![];
    for i in 0..200 {
        let (enc, _) = app.create_encryption(&creds).await;
        made.push((app.encrypt(&creds, &enc, &format!("{i}")).await, i));
    }
    let mut tries = vec![];
    for _ in 0..4 {
        tries.push(rotate_root_kek(&app, &op));
    }
    let answers = futures::future::join_all(tries).await;
    let started = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::ACCEPTED)
        .count();
    assert!(started >= 1, "{answers:?}");
    for (status, body) in &answers {
        if *status != StatusCode::ACCEPTED {
            assert_error(*status, body, 409, "rotation_in_progress");
        }
    }
    let st = rotation_done(&app, &op).await;
    assert_eq!(st["rootKeks"][0]["versions"], 200, "{st}");
    for (e, i) in &made {
        decrypts(&app, &creds, e, &i.to_string()).await;
    }
}

/// `master-key migrate` to a new key while a server still runs on the old one
/// (the documented procedure lets it run until restarted): a root-KEK
/// rotation on that server used to wrap a new KEK with the old key, re-wrap
/// every version to it and delete the migrated KEK, so that only the old key
/// opened anything. Now it is refused, and the migration holds.
async fn a_root_kek_rotation_after_a_master_key_migration_is_refused(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let op = operator(&app);
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let e1 = app.encrypt(&creds, &enc, "before the migration").await;

    let new_key = random_master_key();
    crate::providers::migrate(
        &app,
        &[("KEYWARD_NEW_MASTER_KEY".into(), new_key.clone())],
        "env",
    );

    // The server still on the old key keeps serving, but does not rotate.
    decrypts(&app, &creds, &e1, "before the migration").await;
    let (status, body) = rotate_root_kek(&app, &op).await;
    assert_error(status, &body, 409, "master_key_changed");
    let st = root_kek_status(&app, &op).await;
    assert_eq!(st["rootKeks"].as_array().unwrap().len(), 1, "{st}");
    let e2 = app.encrypt(&creds, &enc, "after the migration").await;

    // Restarted with the new key: everything opens, and rotation works.
    app.stop();
    let old_key = std::mem::replace(&mut app.master_key, new_key);
    app.start();
    decrypts(&app, &creds, &e1, "before the migration").await;
    decrypts(&app, &creds, &e2, "after the migration").await;
    let (status, body) = rotate_root_kek(&app, &op).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    rotation_done(&app, &op).await;
    decrypts(&app, &creds, &e1, "before the migration").await;

    // The old key is out of force for good.
    app.stop();
    app.master_key = old_key;
    let out = app.serve_command().output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("KEYWARD_MASTER_KEY does not match"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One version whose wrapped key no longer authenticates (a damaged row): the
/// rotation moves every other version, keeps the damaged one under its old
/// KEK (which therefore stays), and says so through the API, not only the log.
async fn a_stalled_root_kek_rotation_is_visible_and_moves_everything_it_can(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let op = operator(&app);
    let creds = app.create_tenant("acme");
    let mut made = vec![];
    for i in 0..5 {
        let (enc, v) = app.create_encryption(&creds).await;
        made.push((app.encrypt(&creds, &enc, &format!("{i}")).await, v));
    }
    let damaged = made[2].1.clone();
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&app.db.url).await.unwrap();
    let original: Vec<u8> =
        sqlx::query_scalar("SELECT wrapped_key FROM encryption_key_versions WHERE id = $1")
            .bind(&damaged)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    let mut flipped = original.clone();
    flipped[20] ^= 1;
    sqlx::query("UPDATE encryption_key_versions SET wrapped_key = $1 WHERE id = $2")
        .bind(&flipped)
        .bind(&damaged)
        .execute(&mut conn)
        .await
        .unwrap();

    let (status, body) = rotate_root_kek(&app, &op).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        let st = root_kek_status(&app, &op).await;
        if st["rotation"] == "stalled" {
            break st;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let keks = st["rootKeks"].as_array().unwrap();
    assert_eq!(keks.len(), 2, "{st}");
    assert_eq!(keks[0]["state"], "active");
    assert_eq!(keks[0]["versions"], 4, "every other version moved: {st}");
    assert_eq!(keks[1]["state"], "retiring");
    assert_eq!(keks[1]["versions"], 1, "{st}");
    let error = keks[1]["rewrapError"].as_str().unwrap();
    assert!(error.contains(&damaged), "{error}");
    for (i, (e, _)) in made.iter().enumerate() {
        if i != 2 {
            decrypts(&app, &creds, e, &i.to_string()).await;
        }
    }
    // A new rotation waits until this one is resolved.
    let (status, body) = rotate_root_kek(&app, &op).await;
    assert_error(status, &body, 409, "rotation_in_progress");

    // Repaired (from a backup, say): the next attempt finishes it.
    sqlx::query("UPDATE encryption_key_versions SET wrapped_key = $1 WHERE id = $2")
        .bind(&original)
        .bind(&damaged)
        .execute(&mut conn)
        .await
        .unwrap();
    app.restart();
    let st = rotation_done(&app, &op).await;
    assert!(st["rootKeks"][0].get("rewrapError").is_none(), "{st}");
    for (i, (e, _)) in made.iter().enumerate() {
        decrypts(&app, &creds, e, &i.to_string()).await;
    }
}

/// Settings for tests that destroy: a short grace, longer than the feed's lag
/// bound plus its poll interval (the test helper polls every 100 ms).
const SHORT_GRACE: &[(&str, &str)] = &[
    ("KEYWARD_CHANGE_FEED_MAX_LAG", "2s"),
    ("KEYWARD_DESTROY_GRACE", "3s"),
];

async fn set_state(app: &TestApp, creds: &Creds, path: &str, body: Value) -> (StatusCode, Value) {
    send(app.req(reqwest::Method::PATCH, path, creds).json(&body)).await
}

/// Destroy is safe by construction: only a version disabled for the grace
/// period (so every replica has stopped using it and a missed ciphertext has
/// failed loudly while it was still recoverable), unless `force`.
async fn a_version_is_destroyed_only_after_it_was_disabled_for_the_grace_period(backend: Backend) {
    let platform = crate::jobs::Platform::new(backend).await;
    let app = crate::jobs::spawn_with_platform(backend, &platform, SHORT_GRACE).await;
    let creds = app.create_tenant("platform");
    let (enc, v1) = app.create_encryption(&creds).await;
    let e1 = app.encrypt(&creds, &enc, "under v1").await;
    app.rotate(&creds, &enc).await;
    let path = format!("/v1/encryptions/{enc}/versions/{v1}");

    // Nothing shows yet that no data needs v1: no job has looked since it
    // stopped being active.
    let (status, body) = set_state(&app, &creds, &path, json!({"state": "destroyed"})).await;
    assert_error(status, &body, 409, "version_unverified");
    // A job over the platform's table (which holds none of it) now has.
    let job = crate::job_integrity::run_job(&app, &creds, &platform, "secrets", Some(&enc)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let (status, body) = set_state(&app, &creds, &path, json!({"state": "destroyed"})).await;
    assert_error(status, &body, 409, "version_not_disabled");
    let (status, body) = set_state(&app, &creds, &path, json!({"state": "disabled"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let disabled_at = Instant::now();
    let (status, body) = set_state(&app, &creds, &path, json!({"state": "destroyed"})).await;
    assert_error(status, &body, 409, "destroy_grace_pending");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("s of the destroy grace period remain"),
        "{body}"
    );
    // The missed ciphertext fails loudly meanwhile, and re-enabling recovers it.
    let (status, body) = app.decrypt(&creds, &e1).await;
    assert_error(status, &body, 403, "version_disabled");
    // Re-enabling and disabling again starts the grace period over.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    set_state(&app, &creds, &path, json!({"state": "enabled"})).await;
    decrypts(&app, &creds, &e1, "under v1").await;
    set_state(&app, &creds, &path, json!({"state": "disabled"})).await;
    let disabled_again = Instant::now();
    while disabled_at.elapsed() < Duration::from_millis(3200) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = set_state(&app, &creds, &path, json!({"state": "destroyed"})).await;
    assert_error(status, &body, 409, "destroy_grace_pending");
    while disabled_again.elapsed() < Duration::from_millis(3200) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = set_state(&app, &creds, &path, json!({"state": "destroyed"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app.decrypt(&creds, &e1).await;
    assert_error(status, &body, 410, "version_destroyed");

    // `force` skips both, for the operator who knows better.
    let (enc, v1) = app.create_encryption(&creds).await;
    app.rotate(&creds, &enc).await;
    let (status, body) = set_state(
        &app,
        &creds,
        &format!("/v1/encryptions/{enc}/versions/{v1}"),
        json!({"state": "destroyed", "force": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// Two replicas: one rotates, disables and destroys while the other encrypts
/// and decrypts as fast as it can. Before, the other acknowledged encrypts
/// under the destroyed version after the destroy returned, all of them then
/// undecryptable. Now the destroy waits out the grace period, by which time
/// the other replica has long stopped using the version.
async fn no_replica_uses_a_version_after_its_destroy_returned(backend: Backend) {
    let platform = crate::jobs::Platform::new(backend).await;
    let a = crate::jobs::spawn_with_platform(backend, &platform, SHORT_GRACE).await;
    let b = a.spawn_replica(&[]);
    let creds = a.create_tenant("platform");
    let (enc, v1) = a.create_encryption(&creds).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let (url, client, creds, enc, stop) = (
            b.url("/v1/encrypt"),
            b.client.clone(),
            creds.clone(),
            enc.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            // (version id, when the answer arrived, ciphertext)
            let mut acks: Vec<(String, Instant, Value)> = vec![];
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let (status, body) = send(
                    client
                        .post(&url)
                        .header("X-Api-Key", &creds.key)
                        .header("X-Api-Secret", &creds.secret)
                        .json(&json!({"encryptionId": enc, "data": format!("{i}")})),
                )
                .await;
                if status == StatusCode::OK {
                    acks.push((
                        body["encryptionVersionId"].as_str().unwrap().to_string(),
                        Instant::now(),
                        body,
                    ));
                }
            }
            acks
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.rotate(&creds, &enc).await;
    let path = format!("/v1/encryptions/{enc}/versions/{v1}");
    let job = crate::job_integrity::run_job(&a, &creds, &platform, "secrets", Some(&enc)).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let (status, body) = set_state(&a, &creds, &path, json!({"state": "destroyed"})).await;
    assert_error(status, &body, 409, "version_not_disabled");
    let (status, body) = set_state(&a, &creds, &path, json!({"state": "disabled"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let destroyed_at = loop {
        let started = Instant::now();
        let (status, body) = set_state(&a, &creds, &path, json!({"state": "destroyed"})).await;
        if status == StatusCode::OK {
            break started;
        }
        assert_error(status, &body, 409, "destroy_grace_pending");
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acks = worker.await.unwrap();
    assert!(
        acks.len() > 20,
        "the other replica kept encrypting: {}",
        acks.len()
    );
    let late: Vec<_> = acks
        .iter()
        .filter(|(v, at, _)| *v == v1 && *at >= destroyed_at)
        .collect();
    assert!(
        late.is_empty(),
        "{} encrypts under the destroyed version were acknowledged after its destroy began",
        late.len()
    );
    // Every acknowledged ciphertext under a live version still decrypts, on
    // either replica.
    for (v, _, e) in acks.iter().rev().take(50) {
        if *v != v1 {
            assert_eq!(b.decrypt(&creds, e).await.0, StatusCode::OK);
            assert_eq!(a.decrypt(&creds, e).await.0, StatusCode::OK);
        }
    }
}

/// A replica that cannot read the change feed (its database connection cut)
/// stops serving key operations from memory once `change_feed_max_lag` has
/// passed, says why in `/readyz`, and serves again once it can read the feed.
/// PostgreSQL only: a SQLite file cannot be cut from one process alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cannot_read_the_change_feed_stops_serving_from_memory() {
    let a = TestApp::spawn(Backend::Postgres).await;
    let creds = a.create_tenant("acme");
    let (enc, _) = a.create_encryption(&creds).await;
    let pg = a.db.url.clone();
    let host_port = pg
        .split('@')
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .unwrap()
        .to_string();
    let mut forwarder = crate::providers::Forwarder::start(&host_port).await;
    let through = pg.replace(&host_port, &format!("127.0.0.1:{}", forwarder.port));
    let b = a.spawn_replica(&[
        ("KEYWARD_DATABASE_URL", &through),
        ("KEYWARD_CHANGE_FEED_MAX_LAG", "2s"),
    ]);
    // Warm: B holds the encryption's keys in memory.
    let e = b.encrypt(&creds, &enc, "warm").await;
    decrypts(&b, &creds, &e, "warm").await;

    forwarder.stop();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = b.decrypt(&creds, &e).await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            assert_error(status, &body, 503, "not_ready");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B kept serving from memory: {body}\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, body) = send(b.client.get(b.url("/readyz"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["reason"].as_str().unwrap().contains("change feed"),
        "{body}"
    );
    let (status, _) = send(
        b.client
            .post(b.url("/v1/encrypt"))
            .header("X-Api-Key", &creds.key)
            .header("X-Api-Secret", &creds.secret)
            .json(&json!({"encryptionId": enc, "data": "x"})),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    forwarder.resume().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _) = b.decrypt(&creds, &e).await;
        if status == StatusCode::OK {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B never recovered:\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
