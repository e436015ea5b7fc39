//! The client-provided master key (X-Master-Key): zero-knowledge mode.

use base64::Engine;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{assert_error, decrypt_body, rand_bytes, send, Backend, Creds, TestApp};

crate::on_both_databases!(a_client_key_encryption_needs_the_same_key_every_time);

async fn call(
    app: &TestApp,
    creds: &Creds,
    path: &str,
    key: Option<&str>,
    body: &Value,
) -> (StatusCode, Value) {
    let mut req = app.req(Method::POST, path, creds).json(body);
    if let Some(k) = key {
        req = req.header("X-Master-Key", k);
    }
    send(req).await
}

async fn a_client_key_encryption_needs_the_same_key_every_time(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.encode(rand_bytes::<32>());
    let wrong = b64.encode(rand_bytes::<32>());

    let (status, created) = call(&app, &creds, "/v1/encryptions", Some(&key), &json!({})).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["mode"], "client");
    let enc = created["encryptionId"].as_str().unwrap().to_string();

    let (status, e) = call(
        &app,
        &creds,
        "/v1/encrypt",
        Some(&key),
        &json!({"encryptionId": enc, "data": "zk"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{e}");
    let (status, d) = call(&app, &creds, "/v1/decrypt", Some(&key), &decrypt_body(&e)).await;
    assert_eq!((status, d), (StatusCode::OK, json!({"data": "zk"})));

    for (path, body) in [
        ("/v1/encrypt", json!({"encryptionId": enc, "data": "zk"})),
        ("/v1/decrypt", decrypt_body(&e)),
        ("/v1/rotate", json!({"encryptionId": enc})),
    ] {
        let (status, resp) = call(&app, &creds, path, None, &body).await;
        assert_error(status, &resp, 401, "master_key_required");
        let (status, resp) = call(&app, &creds, path, Some(&wrong), &body).await;
        assert_error(status, &resp, 403, "master_key_mismatch");
        for malformed in ["not base64!", "c2hvcnQ="] {
            let (status, resp) = call(&app, &creds, path, Some(malformed), &body).await;
            assert_error(status, &resp, 400, "invalid_master_key");
        }
    }

    // Rotation with the right key; old ciphertexts still decrypt, also after a restart.
    let (status, r) = call(
        &app,
        &creds,
        "/v1/rotate",
        Some(&key),
        &json!({"encryptionId": enc}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    app.restart();
    let (status, d) = call(&app, &creds, "/v1/decrypt", Some(&key), &decrypt_body(&e)).await;
    assert_eq!((status, d), (StatusCode::OK, json!({"data": "zk"})));
    let (status, e2) = call(
        &app,
        &creds,
        "/v1/encrypt",
        Some(&key),
        &json!({"encryptionId": enc, "data": "zk2"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(e2["encryptionVersionId"], r["newVersionId"]);

    // A client key sent for a platform-managed encryption is refused, not ignored.
    let (platform, _) = app.create_encryption(&creds).await;
    let (status, pe) = call(
        &app,
        &creds,
        "/v1/encrypt",
        None,
        &json!({"encryptionId": platform, "data": "p"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for (path, body) in [
        (
            "/v1/encrypt",
            json!({"encryptionId": platform, "data": "p"}),
        ),
        ("/v1/decrypt", decrypt_body(&pe)),
        ("/v1/rotate", json!({"encryptionId": platform})),
    ] {
        let (status, resp) = call(&app, &creds, path, Some(&key), &body).await;
        assert_error(status, &resp, 400, "master_key_not_applicable");
    }
}
