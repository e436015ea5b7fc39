//! Data keys for envelope encryption (issue #20): minted in plaintext and
//! wrapped under the active version, used locally, unwrapped under their own
//! scope, rewrapped after a rotation, and bound to version states, the
//! minimum decryption version and the caller's context like any ciphertext.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use base64::Engine;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{assert_error, send, Backend, Creds, TestApp};
use crate::jobs::{spawn_with_platform, wait_for_job, Platform};
use crate::rsa_oaep::create_rsa;

crate::on_both_databases!(
    a_data_key_is_minted_used_locally_unwrapped_rotated_rewrapped_and_refused_once_disabled,
    a_key_that_mints_wrapped_data_keys_cannot_unwrap_them,
    a_wrapped_data_key_is_bound_to_its_context_encryption_and_purpose,
    a_reencryption_job_moves_wrapped_data_keys_under_their_contexts,
);

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

async fn mint(app: &TestApp, creds: &Creds, body: Value) -> Value {
    let (status, made) = app.post("/v1/datakey", creds, &body).await;
    assert_eq!(status, StatusCode::OK, "{made}");
    made
}

async fn unwrap(
    app: &TestApp,
    creds: &Creds,
    enc: &str,
    wrapped: &Value,
    ctx: Option<&str>,
) -> (StatusCode, Value) {
    let mut body = json!({"encryptionId": enc, "wrappedKey": wrapped});
    if let Some(c) = ctx {
        body["context"] = json!(c);
    }
    app.post("/v1/datakey/unwrap", creds, &body).await
}

fn local_key(b64: &Value) -> LessSafeKey {
    let raw = B64.decode(b64.as_str().unwrap()).unwrap();
    assert_eq!(raw.len(), 32);
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw).unwrap())
}

async fn a_data_key_is_minted_used_locally_unwrapped_rotated_rewrapped_and_refused_once_disabled(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, v1) = app.create_encryption(&creds).await;
    let made = mint(&app, &creds, json!({"encryptionId": enc})).await;
    assert_eq!(made["encryptionId"], enc.as_str());
    assert_eq!(made["encryptionVersionId"], v1.as_str());
    // Used locally: seal a record with it, as a client would.
    let mut record = b"a record sealed on the client".to_vec();
    local_key(&made["plaintextKey"])
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key([9; 12]),
            Aad::empty(),
            &mut record,
        )
        .unwrap();
    // Two mints give two keys.
    let other = mint(&app, &creds, json!({"encryptionId": enc})).await;
    assert_ne!(other["plaintextKey"], made["plaintextKey"]);
    // Wrapped only.
    let bare = mint(
        &app,
        &creds,
        json!({"encryptionId": enc, "wrappedOnly": true}),
    )
    .await;
    assert!(bare.get("plaintextKey").is_none(), "{bare}");
    let (status, opened) = unwrap(&app, &creds, &enc, &bare["wrappedKey"], None).await;
    assert_eq!(status, StatusCode::OK, "{opened}");
    assert_eq!(
        B64.decode(opened["plaintextKey"].as_str().unwrap())
            .unwrap()
            .len(),
        32
    );

    // Unwrapped: the same key opens the record.
    let (status, opened) = unwrap(&app, &creds, &enc, &made["wrappedKey"], None).await;
    assert_eq!(status, StatusCode::OK, "{opened}");
    assert_eq!(opened["plaintextKey"], made["plaintextKey"]);
    assert_eq!(opened["encryptionVersionId"], v1.as_str());
    let opened_record = local_key(&opened["plaintextKey"])
        .open_in_place(
            Nonce::assume_unique_for_key([9; 12]),
            Aad::empty(),
            &mut record,
        )
        .unwrap()
        .to_vec();
    assert_eq!(opened_record, b"a record sealed on the client");

    // Rotated, then rewrapped: the same key under the new version.
    let v2 = app.rotate(&creds, &enc).await;
    let (status, moved) = app
        .post(
            "/v1/datakey/rewrap",
            &creds,
            &json!({"encryptionId": enc, "wrappedKey": made["wrappedKey"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{moved}");
    assert_eq!(moved["encryptionVersionId"], v2.as_str());
    assert_ne!(moved["wrappedKey"], made["wrappedKey"]);
    let (status, again) = unwrap(&app, &creds, &enc, &moved["wrappedKey"], None).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["plaintextKey"], made["plaintextKey"]);
    assert_eq!(again["encryptionVersionId"], v2.as_str());
    // New keys are wrapped under the new version.
    let fresh = mint(&app, &creds, json!({"encryptionId": enc})).await;
    assert_eq!(fresh["encryptionVersionId"], v2.as_str());

    // The minimum decryption version and version states apply.
    let enc_path = format!("/v1/encryptions/{enc}");
    let (status, body) = send(
        app.req(Method::PATCH, &enc_path, &creds)
            .json(&json!({"minDecryptionVersion": 2})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = unwrap(&app, &creds, &enc, &made["wrappedKey"], None).await;
    assert_error(status, &body, 403, "version_below_min_decryption");
    let (status, body) = send(
        app.req(Method::PATCH, &enc_path, &creds)
            .json(&json!({"minDecryptionVersion": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v1_path = format!("/v1/encryptions/{enc}/versions/{v1}");
    let (status, body) = send(
        app.req(Method::PATCH, &v1_path, &creds)
            .json(&json!({"state": "disabled"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = unwrap(&app, &creds, &enc, &made["wrappedKey"], None).await;
    assert_error(status, &body, 403, "version_disabled");
    let (status, body) = app
        .post(
            "/v1/datakey/rewrap",
            &creds,
            &json!({"encryptionId": enc, "wrappedKey": made["wrappedKey"]}),
        )
        .await;
    assert_error(status, &body, 403, "version_disabled");
    // The rewrapped copy lives on.
    let (status, _) = unwrap(&app, &creds, &enc, &moved["wrappedKey"], None).await;
    assert_eq!(status, StatusCode::OK);

    // RSA-OAEP-256 encryptions wrap data keys too (one OAEP block).
    let (rsa, _) = create_rsa(&app, &creds, json!({"algorithm": "RSA-OAEP-256"})).await;
    let made = mint(&app, &creds, json!({"encryptionId": rsa, "context": "c"})).await;
    let (status, opened) = unwrap(&app, &creds, &rsa, &made["wrappedKey"], Some("c")).await;
    assert_eq!(status, StatusCode::OK, "{opened}");
    assert_eq!(opened["plaintextKey"], made["plaintextKey"]);
    let (status, body) = unwrap(&app, &creds, &rsa, &made["wrappedKey"], None).await;
    assert_error(status, &body, 400, "decryption_failed");

    // Audited under their own operation names, with the version.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (status, records) = app
        .get("/v1/audit?operation=datakey.unwrap&limit=100", &creds)
        .await;
    assert_eq!(status, StatusCode::OK, "{records}");
    let text = records.to_string();
    assert!(text.contains(&v1), "{text}");
    assert!(!text.contains(made["plaintextKey"].as_str().unwrap()));
}

async fn a_key_that_mints_wrapped_data_keys_cannot_unwrap_them(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let admin = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&admin).await;
    let minter = app.create_key(&admin.tenant_id, "datakey");
    let opener = app.create_key(&admin.tenant_id, "unwrap");
    let decrypter = app.create_key(&admin.tenant_id, "encrypt,decrypt");
    let made = mint(
        &app,
        &minter,
        json!({"encryptionId": enc, "wrappedOnly": true}),
    )
    .await;
    let (status, body) = unwrap(&app, &minter, &enc, &made["wrappedKey"], None).await;
    assert_error(status, &body, 403, "insufficient_scope");
    let (status, body) = unwrap(&app, &decrypter, &enc, &made["wrappedKey"], None).await;
    assert_error(status, &body, 403, "insufficient_scope");
    let (status, body) = app
        .post("/v1/datakey", &decrypter, &json!({"encryptionId": enc}))
        .await;
    assert_error(status, &body, 403, "insufficient_scope");
    let (status, body) = app
        .post("/v1/datakey", &opener, &json!({"encryptionId": enc}))
        .await;
    assert_error(status, &body, 403, "insufficient_scope");
    let (status, opened) = unwrap(&app, &opener, &enc, &made["wrappedKey"], None).await;
    assert_eq!(status, StatusCode::OK, "{opened}");
    // Another tenant's encryption is a 404, as everywhere.
    let other = app.create_tenant("other");
    let (status, body) = unwrap(&app, &other, &enc, &made["wrappedKey"], None).await;
    assert_error(status, &body, 404, "encryption_not_found");
}

async fn a_wrapped_data_key_is_bound_to_its_context_encryption_and_purpose(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, v1) = app.create_encryption(&creds).await;
    let (enc2, _) = app.create_encryption(&creds).await;
    let made = mint(
        &app,
        &creds,
        json!({"encryptionId": enc, "context": "files/report.pdf"}),
    )
    .await;
    let (status, opened) = unwrap(
        &app,
        &creds,
        &enc,
        &made["wrappedKey"],
        Some("files/report.pdf"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{opened}");
    assert_eq!(opened["plaintextKey"], made["plaintextKey"]);
    for ctx in [None, Some("files/other.pdf")] {
        let (status, body) = unwrap(&app, &creds, &enc, &made["wrappedKey"], ctx).await;
        assert_error(status, &body, 400, "decryption_failed");
    }
    // Rewrap keeps the context.
    app.rotate(&creds, &enc).await;
    let (status, body) = app
        .post(
            "/v1/datakey/rewrap",
            &creds,
            &json!({"encryptionId": enc, "wrappedKey": made["wrappedKey"]}),
        )
        .await;
    assert_error(status, &body, 400, "decryption_failed");
    let (status, moved) = app
        .post("/v1/datakey/rewrap", &creds, &json!({"encryptionId": enc, "wrappedKey": made["wrappedKey"], "context": "files/report.pdf"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{moved}");
    let (status, body) = unwrap(&app, &creds, &enc, &moved["wrappedKey"], None).await;
    assert_error(status, &body, 400, "decryption_failed");
    let (status, again) = unwrap(
        &app,
        &creds,
        &enc,
        &moved["wrappedKey"],
        Some("files/report.pdf"),
    )
    .await;
    assert_eq!(
        (status, &again["plaintextKey"]),
        (StatusCode::OK, &made["plaintextKey"])
    );
    // Under another encryption, or with any byte changed: the same failure.
    let (status, body) = unwrap(
        &app,
        &creds,
        &enc2,
        &made["wrappedKey"],
        Some("files/report.pdf"),
    )
    .await;
    assert_error(status, &body, 400, "decryption_failed");
    let raw = B64.decode(made["wrappedKey"].as_str().unwrap()).unwrap();
    for at in [0, 1, 20, raw.len() - 1] {
        let mut bad = raw.clone();
        bad[at] ^= 1;
        let (status, body) = unwrap(
            &app,
            &creds,
            &enc,
            &json!(B64.encode(&bad)),
            Some("files/report.pdf"),
        )
        .await;
        assert_error(status, &body, 400, "decryption_failed");
    }
    let (status, body) = unwrap(&app, &creds, &enc, &json!("not base64!"), None).await;
    assert_error(status, &body, 400, "invalid_request");
    // A wrapped data key is no ciphertext: /v1/decrypt cannot open it, even
    // given its parts as a ciphertext of the same version.
    let nonce = B64.encode(&raw[17..29]);
    let sealed = B64.encode(&raw[29..]);
    let (status, body) = app
        .post(
            "/v1/decrypt",
            &creds,
            &json!({"encryptionId": enc, "cipherText": sealed, "encryptionVersionId": v1, "metadata": {"nonce": nonce}, "context": "files/report.pdf"}),
        )
        .await;
    assert_error(status, &body, 400, "decryption_failed");
}

async fn a_reencryption_job_moves_wrapped_data_keys_under_their_contexts(backend: Backend) {
    use sqlx::{Connection, Row};
    let platform = Platform::new(backend).await;
    let app = spawn_with_platform(backend, &platform, &[]).await;
    let creds = app.create_tenant("platform");
    let (enc, v1) = app.create_encryption(&creds).await;
    sqlx::any::install_default_drivers();
    let url = if platform.url().starts_with("sqlite:") {
        format!("{}?mode=rwc", platform.url())
    } else {
        platform.url()
    };
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE files (id BIGINT PRIMARY KEY, dk TEXT NOT NULL, version TEXT NOT NULL, metadata TEXT NOT NULL, ctx TEXT)")
        .execute(&mut conn)
        .await
        .unwrap();
    let mut keys = Vec::new();
    for i in 0..30i64 {
        let made = mint(
            &app,
            &creds,
            json!({"encryptionId": enc, "context": format!("files/{i}")}),
        )
        .await;
        sqlx::query(
            "INSERT INTO files (id, dk, version, metadata, ctx) VALUES ($1, $2, $3, '{}', $4)",
        )
        .bind(i)
        .bind(made["wrappedKey"].as_str().unwrap())
        .bind(made["encryptionVersionId"].as_str().unwrap())
        .bind(format!("files/{i}"))
        .execute(&mut conn)
        .await
        .unwrap();
        keys.push(made["plaintextKey"].clone());
    }
    let v2 = app.rotate(&creds, &enc).await;
    let source = json!({
        "name": "platform", "table": "files", "keyColumn": "id",
        "cipherTextColumn": "dk", "versionColumn": "version", "metadataColumn": "metadata",
        "contextColumn": "ctx", "wrappedKeys": true,
    });
    let (status, created) = app
        .post(
            "/v1/jobs",
            &creds,
            &json!({"kind": "reencrypt", "encryptionId": enc, "source": source}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::ACCEPTED, "{created}");
    let done = wait_for_job(
        &app,
        &creds,
        created["jobId"].as_str().unwrap(),
        std::time::Duration::from_secs(120),
    )
    .await;
    assert_eq!(done["rewrapped"], 30, "{done}");
    assert_eq!(done["failed"], 0, "{done}");
    let rows = sqlx::query("SELECT id, dk, version FROM files ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    for row in &rows {
        let i: i64 = row.get(0);
        assert_eq!(row.get::<String, _>(2), v2, "row {i}");
        let wrapped = json!(row.get::<String, _>(1));
        let (status, opened) =
            unwrap(&app, &creds, &enc, &wrapped, Some(&format!("files/{i}"))).await;
        assert_eq!(status, StatusCode::OK, "{opened}");
        assert_eq!(
            opened["plaintextKey"], keys[i as usize],
            "row {i}: the same key"
        );
        assert_eq!(opened["encryptionVersionId"], v2.as_str());
    }
    // Nothing is left on the first version: it can be disabled.
    let v1_path = format!("/v1/encryptions/{enc}/versions/{v1}");
    let (status, body) = send(
        app.req(Method::PATCH, &v1_path, &creds)
            .json(&json!({"state": "disabled"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
