//! Caller context (issue #20): an optional `context` on encrypt, decrypt,
//! their batches, rewrap and re-encryption jobs, bound into the associated
//! data of every algorithm and needed again to decrypt; a ciphertext made
//! without one decrypts exactly as before (docs/envelope.md).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::{Connection, Row};

use crate::helpers::{assert_error, decrypt_body, Backend, Creds, TestApp};
use crate::jobs::{spawn_with_platform, wait_for_job, Platform};
use crate::rsa_oaep::create_rsa;

crate::on_both_databases!(
    a_context_round_trips_under_every_algorithm_and_a_wrong_or_missing_one_is_refused,
    a_context_is_kept_through_rewrap_batches_and_a_reencryption_job,
);

async fn encrypt_with(app: &TestApp, creds: &Creds, enc: &str, data: &str, ctx: &str) -> Value {
    let (status, body) = app
        .post(
            "/v1/encrypt",
            creds,
            &json!({"encryptionId": enc, "data": data, "context": ctx}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn with_context(encrypted: &Value, context: &str) -> Value {
    let mut body = decrypt_body(encrypted);
    body["context"] = json!(context);
    body
}

/// Decrypt of `encrypted` under `context` (None: the field absent).
async fn decrypt_under(
    app: &TestApp,
    creds: &Creds,
    encrypted: &Value,
    context: Option<&str>,
) -> (StatusCode, Value) {
    let body = match context {
        Some(c) => with_context(encrypted, c),
        None => decrypt_body(encrypted),
    };
    app.post("/v1/decrypt", creds, &body).await
}

async fn a_context_round_trips_under_every_algorithm_and_a_wrong_or_missing_one_is_refused(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (aes, _) = app.create_encryption(&creds).await;
    let (rsa, _) = create_rsa(&app, &creds, json!({"algorithm": "RSA-OAEP-256"})).await;
    // RSA: a short value is one OAEP block (the context its label), a long
    // one a JWE (the context in its additional authenticated data).
    let long = "z".repeat(600); // past the 318 bytes of one 3072-bit block
    for (enc, data) in [
        (&aes, "alice@example.com"),
        (&rsa, "short"),
        (&rsa, long.as_str()),
    ] {
        let ctx = "users/42/email";
        let sealed = encrypt_with(&app, &creds, enc, data, ctx).await;
        let (status, body) = decrypt_under(&app, &creds, &sealed, Some(ctx)).await;
        assert_eq!((status, body), (StatusCode::OK, json!({"data": data})));
        for wrong in [
            Some("users/43/email"),
            Some("users/42/email "),
            Some(""),
            None,
        ] {
            let (status, body) = decrypt_under(&app, &creds, &sealed, wrong).await;
            assert_error(status, &body, 400, "decryption_failed");
        }
        // Without a context: as before, and no context opens it.
        let plain = app.encrypt(&creds, enc, data).await;
        let (status, body) = decrypt_under(&app, &creds, &plain, None).await;
        assert_eq!((status, body), (StatusCode::OK, json!({"data": data})));
        let (status, body) = decrypt_under(&app, &creds, &plain, Some(ctx)).await;
        assert_error(status, &body, 400, "decryption_failed");
    }
    // Bounded, in characters.
    let (status, body) = app
        .post(
            "/v1/encrypt",
            &creds,
            &json!({"encryptionId": aes, "data": "x", "context": "é".repeat(1025)}),
        )
        .await;
    assert_error(status, &body, 400, "invalid_request");
    let ok = encrypt_with(&app, &creds, &aes, "x", &"é".repeat(1024)).await;
    assert_eq!(ok["algorithm"], "AES-256-GCM");
    // A string only: an object is bad input, not silently canonicalised.
    let (status, body) = app
        .post(
            "/v1/encrypt",
            &creds,
            &json!({"encryptionId": aes, "data": "x", "context": {"a": "b"}}),
        )
        .await;
    assert_error(status, &body, 400, "invalid_request");
    // The context is neither logged nor audited in the clear.
    let secret_context = "tenant-secret-context-7f3a";
    encrypt_with(&app, &creds, &aes, "x", secret_context).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!app.log_text().contains(secret_context));
    let audit = crate::helpers::read_tree(app.db.dir.path());
    for (path, bytes) in audit {
        assert!(
            !crate::helpers::contains(&bytes, secret_context.as_bytes()),
            "{path:?} holds the context"
        );
    }
}

async fn a_context_is_kept_through_rewrap_batches_and_a_reencryption_job(backend: Backend) {
    let platform = Platform::new(backend).await;
    let app = spawn_with_platform(backend, &platform, &[]).await;
    let creds = app.create_tenant("platform");
    let (enc, v1) = app.create_encryption(&creds).await;
    let old = encrypt_with(&app, &creds, &enc, "alice", "row-1").await;
    let v2 = app.rotate(&creds, &enc).await;

    // Rewrap: needs the context, and the new ciphertext keeps it.
    let (status, body) = app.post("/v1/rewrap", &creds, &decrypt_body(&old)).await;
    assert_error(status, &body, 400, "decryption_failed");
    let (status, rewrapped) = app
        .post("/v1/rewrap", &creds, &with_context(&old, "row-1"))
        .await;
    assert_eq!(status, StatusCode::OK, "{rewrapped}");
    assert_eq!(rewrapped["encryptionVersionId"], v2.as_str());
    let (status, body) = decrypt_under(&app, &creds, &rewrapped, Some("row-1")).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"data": "alice"})));
    let (status, body) = decrypt_under(&app, &creds, &rewrapped, None).await;
    assert_error(status, &body, 400, "decryption_failed");

    // Batches: each item under its own context.
    let items = json!([
        {"encryptionId": enc, "data": "a", "context": "row-a"},
        {"encryptionId": enc, "data": "b", "context": "row-b"},
        {"encryptionId": enc, "data": "c"},
    ]);
    let (status, batch) = app
        .post("/v1/encrypt/batch", &creds, &json!({"items": items}))
        .await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    let r = &batch["results"];
    let (status, opened) = app
        .post(
            "/v1/decrypt/batch",
            &creds,
            &json!({"items": [
                with_context(&r[0], "row-a"), with_context(&r[1], "row-b"), decrypt_body(&r[2]),
                with_context(&r[0], "row-b"), decrypt_body(&r[1]), with_context(&r[2], "row-a"),
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{opened}");
    let o = &opened["results"];
    assert_eq!(
        [&o[0]["data"], &o[1]["data"], &o[2]["data"]],
        ["a", "b", "c"]
    );
    for i in 3..6 {
        assert_eq!(o[i]["error"]["code"], "decryption_failed", "{}", o[i]);
    }
    let (status, moved) = app
        .post(
            "/v1/rewrap/batch",
            &creds,
            &json!({"items": [with_context(&old, "row-1"), decrypt_body(&old)]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{moved}");
    let (status, body) = decrypt_under(&app, &creds, &moved["results"][0], Some("row-1")).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"data": "alice"})));
    assert_eq!(moved["results"][1]["error"]["code"], "decryption_failed");

    // A job reads each row's context from the column it names, and the
    // rows it writes still need that context.
    sqlx::any::install_default_drivers();
    let url = if platform.url().starts_with("sqlite:") {
        format!("{}?mode=rwc", platform.url())
    } else {
        platform.url()
    };
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE docs (id BIGINT PRIMARY KEY, ct TEXT NOT NULL, version TEXT NOT NULL, metadata TEXT NOT NULL, ctx TEXT)")
        .execute(&mut conn)
        .await
        .unwrap();
    for i in 0..40i64 {
        let (status, sealed) = app
            .post(
                "/v1/encrypt",
                &creds,
                &json!({"encryptionId": enc, "data": format!("doc {i}"), "context": format!("docs/{i}"), "encryptionVersionId": v1}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{sealed}");
        sqlx::query(
            "INSERT INTO docs (id, ct, version, metadata, ctx) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(i)
        .bind(sealed["cipherText"].as_str().unwrap())
        .bind(sealed["encryptionVersionId"].as_str().unwrap())
        .bind(sealed["metadata"].to_string())
        .bind(format!("docs/{i}"))
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let v3 = app.rotate(&creds, &enc).await;
    let source = json!({
        "name": "platform", "table": "docs", "keyColumn": "id",
        "cipherTextColumn": "ct", "versionColumn": "version", "metadataColumn": "metadata",
        "contextColumn": "ctx",
    });
    let (status, created) = app
        .post(
            "/v1/jobs",
            &creds,
            &json!({"kind": "reencrypt", "encryptionId": enc, "source": source}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let done = wait_for_job(
        &app,
        &creds,
        created["jobId"].as_str().unwrap(),
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(done["rewrapped"], 40, "{done}");
    assert_eq!(done["failed"], 0, "{done}");
    let stored = sqlx::query("SELECT id, ct, version, metadata FROM docs ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    for row in &stored {
        let i: i64 = row.get(0);
        let sealed = json!({
            "encryptionId": enc,
            "cipherText": row.get::<String, _>(1),
            "encryptionVersionId": row.get::<String, _>(2),
            "metadata": serde_json::from_str::<Value>(&row.get::<String, _>(3)).unwrap(),
        });
        assert_eq!(sealed["encryptionVersionId"], v3.as_str(), "row {i}");
        let (status, body) = decrypt_under(&app, &creds, &sealed, Some(&format!("docs/{i}"))).await;
        assert_eq!(
            (status, body),
            (StatusCode::OK, json!({"data": format!("doc {i}")}))
        );
        let (status, body) = decrypt_under(&app, &creds, &sealed, None).await;
        assert_error(status, &body, 400, "decryption_failed");
    }
}
