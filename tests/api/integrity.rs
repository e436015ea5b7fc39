//! Integrity: key material is never destroyed or stranded while acknowledged
//! data needs it, and no operation silently undoes another (issue #26).
//! `scripts/test integrity` runs these alone.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::Connection;

use crate::helpers::{
    assert_error, keyward_command, random_master_key, send, Backend, Creds, TestApp,
};

crate::on_both_databases!(
    a_destroyed_version_does_not_pin_a_root_kek,
    a_second_root_kek_rotation_waits_for_the_first,
    a_root_kek_rotation_after_a_master_key_migration_is_refused,
    a_stalled_root_kek_rotation_is_visible_and_moves_everything_it_can,
);

/// A key for the operator's routes.
fn operator(app: &TestApp) -> Creds {
    app.create_tenant("operator")
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
    let out = keyward_command()
        .args(["master-key", "migrate", "--to", "env"])
        .env("KEYWARD_DATABASE_URL", &app.db.url)
        .env("KEYWARD_MASTER_KEY", &app.master_key)
        .env("KEYWARD_NEW_MASTER_KEY", &new_key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
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
