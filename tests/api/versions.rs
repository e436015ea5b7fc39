//! Key lifecycle: version states, rotation policies (by age and by use count),
//! rewrap and batches.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sqlx::Connection;

use crate::helpers::{assert_error, decrypt_body, send, Backend, Creds, TestApp};

crate::on_both_databases!(
    each_version_state_behaves_as_documented,
    min_decryption_version_stops_older_versions,
    rotation_by_use_count_and_by_age_happens_by_itself_once,
    rewrap_and_batches_answer_item_by_item,
);

async fn patch(app: &TestApp, creds: &Creds, path: &str, body: Value) -> (StatusCode, Value) {
    send(app.req(Method::PATCH, path, creds).json(&body)).await
}

async fn details(app: &TestApp, creds: &Creds, enc: &str) -> Value {
    let (status, body) = app.get(&format!("/v1/encryptions/{enc}"), creds).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn encrypt_with(
    app: &TestApp,
    creds: &Creds,
    enc: &str,
    version: &str,
) -> (StatusCode, Value) {
    app.post(
        "/v1/encrypt",
        creds,
        &json!({"encryptionId": enc, "data": "x", "encryptionVersionId": version}),
    )
    .await
}

async fn each_version_state_behaves_as_documented(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let other = app.create_tenant("other");
    let (enc, v1) = app.create_encryption(&creds).await;
    let e1 = app.encrypt(&creds, &enc, "made by v1").await;
    let v2 = app.rotate(&creds, &enc).await;
    let v1_path = format!("/v1/encryptions/{enc}/versions/{v1}");

    // decrypt_only: decrypts, does not encrypt.
    let (status, body) = patch(&app, &creds, &v1_path, json!({"state": "decrypt_only"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["versions"][0]["state"], "decrypt_only");
    assert_eq!(app.decrypt(&creds, &e1).await.0, StatusCode::OK);
    let (status, body) = encrypt_with(&app, &creds, &enc, &v1).await;
    assert_error(status, &body, 422, "version_not_encryptable");

    // disabled: neither, and reversible.
    patch(&app, &creds, &v1_path, json!({"state": "disabled"})).await;
    let (status, body) = app.decrypt(&creds, &e1).await;
    assert_error(status, &body, 403, "version_disabled");
    let (status, body) = encrypt_with(&app, &creds, &enc, &v1).await;
    assert_error(status, &body, 403, "version_disabled");
    let (status, _) = patch(&app, &creds, &v1_path, json!({"state": "enabled"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(app.decrypt(&creds, &e1).await.0, StatusCode::OK);
    assert_eq!(
        encrypt_with(&app, &creds, &enc, &v1).await.0,
        StatusCode::OK
    );

    // The active version cannot change; nothing becomes active by PATCH.
    let (status, body) = patch(
        &app,
        &creds,
        &format!("/v1/encryptions/{enc}/versions/{v2}"),
        json!({"state": "destroyed"}),
    )
    .await;
    assert_error(status, &body, 409, "invalid_state_change");
    let (status, body) = patch(&app, &creds, &v1_path, json!({"state": "active"})).await;
    assert_error(status, &body, 409, "invalid_state_change");
    let (status, body) = patch(&app, &creds, &v1_path, json!({"state": "sleeping"})).await;
    assert_error(status, &body, 400, "invalid_request");
    // Another tenant's encryption is not found.
    let (status, body) = patch(&app, &other, &v1_path, json!({"state": "disabled"})).await;
    assert_error(status, &body, 404, "encryption_not_found");

    // destroyed: crypto-shredding, for good; the row stays. Without `force`
    // only after a job showed no data needs it and it was disabled for the
    // grace period (see integrity.rs); `force` skips that.
    let (status, body) = patch(&app, &creds, &v1_path, json!({"state": "destroyed"})).await;
    assert_error(status, &body, 409, "version_unverified");
    let (status, body) = patch(
        &app,
        &creds,
        &v1_path,
        json!({"state": "destroyed", "force": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = app.decrypt(&creds, &e1).await;
    assert_error(status, &body, 410, "version_destroyed");
    let (status, body) = patch(&app, &creds, &v1_path, json!({"state": "enabled"})).await;
    assert_error(status, &body, 409, "invalid_state_change");
    let d = details(&app, &creds, &enc).await;
    assert_eq!(d["versions"][0]["state"], "destroyed");
    assert_eq!(d["versions"].as_array().unwrap().len(), 2);
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&app.db.url).await.unwrap();
    let wrapped: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT wrapped_key FROM encryption_key_versions WHERE id = $1")
            .bind(&v1)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert!(
        wrapped.is_none(),
        "the destroyed version's wrapped key is erased"
    );
    // The active version still works.
    let e2 = app.encrypt(&creds, &enc, "v2").await;
    assert_eq!(app.decrypt(&creds, &e2).await.0, StatusCode::OK);
}

async fn min_decryption_version_stops_older_versions(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let e1 = app.encrypt(&creds, &enc, "v1").await;
    app.rotate(&creds, &enc).await;
    let e2 = app.encrypt(&creds, &enc, "v2").await;
    let path = format!("/v1/encryptions/{enc}");
    for bad in [0, 3] {
        let (status, body) = patch(&app, &creds, &path, json!({"minDecryptionVersion": bad})).await;
        assert_error(status, &body, 422, "invalid_policy");
    }
    let (status, body) = patch(&app, &creds, &path, json!({"minDecryptionVersion": 2})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["minDecryptionVersion"], 2);
    let (status, body) = app.decrypt(&creds, &e1).await;
    assert_error(status, &body, 403, "version_below_min_decryption");
    // Nor is a ciphertext made that no one could decrypt.
    let (status, body) = encrypt_with(
        &app,
        &creds,
        &enc,
        e1["encryptionVersionId"].as_str().unwrap(),
    )
    .await;
    assert_error(status, &body, 403, "version_below_min_decryption");
    assert_eq!(app.decrypt(&creds, &e2).await.0, StatusCode::OK);
    patch(&app, &creds, &path, json!({"minDecryptionVersion": 1})).await;
    assert_eq!(app.decrypt(&creds, &e1).await.0, StatusCode::OK);
}

async fn wait_for_version(app: &TestApp, creds: &Creds, enc: &str, at_least: i64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let d = details(app, creds, enc).await;
        if d["latestVersion"].as_i64().unwrap() >= at_least {
            return d;
        }
        assert!(Instant::now() < deadline, "no rotation: {d}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn rotation_by_use_count_and_by_age_happens_by_itself_once(backend: Backend) {
    let env = [
        ("KEYWARD_MAINTENANCE_INTERVAL", "200ms"),
        ("KEYWARD_ROTATE_AFTER_ENCRYPTIONS", "5"),
    ];
    let mut app = TestApp::spawn_with(backend, &env).await;
    let replica = app.spawn_replica(&[]);
    let creds = app.create_tenant("acme");

    // By count: five encryptions, across two replicas, reach the bound.
    let (counted, _) = app.create_encryption(&creds).await;
    for i in 0..5 {
        let node = if i % 2 == 0 { &app } else { &replica };
        node.encrypt(&creds, &counted, "x").await;
    }
    let d = wait_for_version(&app, &creds, &counted, 2).await;
    assert_eq!(d["versions"][0]["encryptCount"], 5, "{d}");
    tokio::time::sleep(Duration::from_millis(800)).await;
    let d = details(&app, &creds, &counted).await;
    assert_eq!(
        d["latestVersion"], 2,
        "exactly one rotation for one crossing: {d}"
    );

    // By age: a one-second period rotates about once a second, never twice at once.
    let (aged, _) = app.create_encryption(&creds).await;
    let (status, body) = patch(
        &app,
        &creds,
        &format!("/v1/encryptions/{aged}"),
        json!({"autoRotatePeriod": "1s"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["autoRotatePeriod"], "1s");
    wait_for_version(&app, &creds, &aged, 3).await;
    // It survives a restart: the schedule lives in the database.
    app.restart();
    let d = wait_for_version(&app, &creds, &aged, 4).await;
    let times: Vec<i64> = d["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            humantime::parse_rfc3339(v["createdAt"].as_str().unwrap())
                .unwrap()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64
        })
        .collect();
    for pair in times.windows(2) {
        assert!(
            pair[1] - pair[0] >= 900,
            "two replicas rotated at once: {d}"
        );
    }
    let (status, body) = patch(
        &app,
        &creds,
        &format!("/v1/encryptions/{aged}"),
        json!({"autoRotatePeriod": null}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["autoRotatePeriod"], Value::Null);
}

async fn rewrap_and_batches_answer_item_by_item(backend: Backend) {
    let app = TestApp::spawn_with(backend, &[("KEYWARD_MAX_BATCH_ITEMS", "5")]).await;
    let creds = app.create_tenant("acme");
    let other = app.create_tenant("other");
    let encrypt_only = app.create_key(&creds.tenant_id, "encrypt");
    let (enc, v1) = app.create_encryption(&creds).await;
    let (foreign, _) = app.create_encryption(&other).await;
    let old = app.encrypt(&creds, &enc, "rewrap me").await;
    let v2 = app.rotate(&creds, &enc).await;

    // Rewrap: decrypt's input, encrypt's output under the active version.
    let (status, rewrapped) = app.post("/v1/rewrap", &creds, &decrypt_body(&old)).await;
    assert_eq!(status, StatusCode::OK, "{rewrapped}");
    assert_eq!(rewrapped["encryptionVersionId"], v2.as_str());
    assert_ne!(rewrapped["cipherText"], old["cipherText"]);
    assert!(rewrapped.get("data").is_none());
    let (_, plain) = app.decrypt(&creds, &rewrapped).await;
    assert_eq!(plain["data"], "rewrap me");
    let (status, body) = app
        .post("/v1/rewrap", &encrypt_only, &decrypt_body(&old))
        .await;
    assert_error(status, &body, 403, "insufficient_scope");

    // Encrypt batch: good and bad items mixed, answered in order.
    let items = json!({"items": [
        {"encryptionId": enc, "data": "one"},
        {"encryptionId": "not-a-uuid", "data": "two"},
        {"encryptionId": foreign, "data": "three"},
        {"encryptionId": enc, "data": "four", "encryptionVersionId": v1},
        {"data": "five"},
    ]});
    let (status, body) = app.post("/v1/encrypt/batch", &creds, &items).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let r = body["results"].as_array().unwrap();
    assert_eq!(r.len(), 5);
    assert_eq!(r[0]["encryptionVersionId"], v2.as_str());
    assert_eq!(r[1]["error"]["code"], "invalid_request");
    assert_eq!(r[2]["error"]["code"], "encryption_not_found");
    assert_eq!(r[3]["encryptionVersionId"], v1.as_str());
    assert_eq!(r[4]["error"]["code"], "invalid_request");

    // Decrypt batch of those, plus a tampered one.
    let mut tampered = decrypt_body(&r[0]);
    tampered["cipherText"] = json!("AAAAAAAAAAAAAAAAAAAAAAAA");
    let (status, body) = app
        .post(
            "/v1/decrypt/batch",
            &creds,
            &json!({"items": [decrypt_body(&r[0]), tampered, decrypt_body(&r[3])]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let d = body["results"].as_array().unwrap();
    assert_eq!(d[0], json!({"data": "one"}));
    assert_eq!(d[1]["error"]["code"], "decryption_failed");
    assert_eq!(d[2], json!({"data": "four"}));

    // Rewrap batch moves the v1 item to v2.
    let (status, body) = app
        .post(
            "/v1/rewrap/batch",
            &creds,
            &json!({"items": [decrypt_body(&r[3]), decrypt_body(&old)]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    for item in body["results"].as_array().unwrap() {
        assert_eq!(item["encryptionVersionId"], v2.as_str(), "{item}");
    }

    // The cap.
    let six: Vec<Value> = (0..6)
        .map(|_| json!({"encryptionId": enc, "data": "x"}))
        .collect();
    let (status, body) = app
        .post("/v1/encrypt/batch", &creds, &json!({"items": six}))
        .await;
    assert_error(status, &body, 413, "too_many_items");
    // A batch needs the single call's scope.
    let (status, body) = app
        .post("/v1/decrypt/batch", &encrypt_only, &json!({"items": []}))
        .await;
    assert_error(status, &body, 403, "insufficient_scope");
}
