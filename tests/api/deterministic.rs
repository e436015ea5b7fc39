//! Deterministic encryption (AES-256-GCM-SIV, RFC 8452), opt-in at creation:
//! equal plaintexts under the same version and context give equal
//! ciphertexts, so the platform can look a row up by its ciphertext; every
//! lifecycle operation works as for any encryption (docs/search.md).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::{Connection, Row};

use crate::helpers::{assert_error, decrypt_body, Backend, Creds, TestApp};
use crate::jobs::{spawn_with_platform, wait_for_job, Platform};

crate::on_both_databases!(
    deterministic_encryption_round_trips_and_equal_inputs_give_equal_outputs,
    a_different_context_gives_a_different_ciphertext_and_decrypt_needs_the_same_one,
    deterministic_is_opt_in_and_other_encryptions_bind_a_context_without_it,
    rotation_rewrap_batches_and_jobs_work_for_deterministic_encryptions,
);

/// Creates a deterministic encryption; returns its id and first version.
async fn create_deterministic(app: &TestApp, creds: &Creds) -> (String, String) {
    let (status, body) = app
        .post(
            "/v1/encryptions",
            creds,
            &json!({"algorithm": "AES-256-GCM-SIV"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["algorithm"], "AES-256-GCM-SIV");
    (
        body["encryptionId"].as_str().unwrap().into(),
        body["activeVersionId"].as_str().unwrap().into(),
    )
}

async fn encrypt(app: &TestApp, creds: &Creds, enc: &str, data: &str, context: &str) -> Value {
    let (status, body) = app
        .post(
            "/v1/encrypt",
            creds,
            &json!({"encryptionId": enc, "data": data, "context": context}),
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

async fn deterministic_encryption_round_trips_and_equal_inputs_give_equal_outputs(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, v1) = create_deterministic(&app, &creds).await;
    let big = "y".repeat(100_000);
    for data in ["", "alice@example.com", "ünïcødé 🙂 \u{0} \"", big.as_str()] {
        let a = encrypt(&app, &creds, &enc, data, "users.email").await;
        let b = encrypt(&app, &creds, &enc, data, "users.email").await;
        assert_eq!(a, b, "equal inputs, equal outputs");
        assert_eq!(a["algorithm"], "AES-256-GCM-SIV");
        assert_eq!(a["encryptionVersionId"], v1.as_str());
        let (status, body) = app
            .post("/v1/decrypt", &creds, &with_context(&a, "users.email"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"], data);
    }
    // Without a context (absent or empty: the same), still deterministic.
    let a = app.encrypt(&creds, &enc, "bob").await;
    let b = encrypt(&app, &creds, &enc, "bob", "").await;
    assert_eq!(a, b);
    let (status, body) = app.decrypt(&creds, &a).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"data": "bob"})));
    // Different plaintexts differ.
    let c = app.encrypt(&creds, &enc, "bob2").await;
    assert_ne!(a["cipherText"], c["cipherText"]);
    // Tampering fails as for any ciphertext.
    let mut tampered = decrypt_body(&a);
    let mut ct = tampered["cipherText"].as_str().unwrap().to_string();
    ct.replace_range(0..1, if ct.starts_with('A') { "B" } else { "A" });
    tampered["cipherText"] = json!(ct);
    let (status, body) = app.post("/v1/decrypt", &creds, &tampered).await;
    assert_error(status, &body, 400, "decryption_failed");
    // Another encryption's key, same plaintext and context: unrelated.
    let (other, _) = create_deterministic(&app, &creds).await;
    let d = app.encrypt(&creds, &other, "bob").await;
    assert_ne!(a["cipherText"], d["cipherText"]);
}

async fn a_different_context_gives_a_different_ciphertext_and_decrypt_needs_the_same_one(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = create_deterministic(&app, &creds).await;
    let email = encrypt(&app, &creds, &enc, "alice", "users.email").await;
    let name = encrypt(&app, &creds, &enc, "alice", "users.name").await;
    let none = app.encrypt(&creds, &enc, "alice").await;
    assert_ne!(email["cipherText"], name["cipherText"]);
    assert_ne!(email["cipherText"], none["cipherText"]);
    assert_ne!(email["metadata"], name["metadata"]);
    for (sealed, wrong) in [
        (&email, Some("users.name")),
        (&email, None),
        (&name, Some("users.email")),
        (&none, Some("users.email")),
    ] {
        let body = match wrong {
            Some(c) => with_context(sealed, c),
            None => decrypt_body(sealed),
        };
        let (status, body) = app.post("/v1/decrypt", &creds, &body).await;
        assert_error(status, &body, 400, "decryption_failed");
    }
    // A context is bounded.
    let (status, body) = app
        .post(
            "/v1/encrypt",
            &creds,
            &json!({"encryptionId": enc, "data": "x", "context": "c".repeat(1025)}),
        )
        .await;
    assert_error(status, &body, 400, "invalid_request");
}

async fn deterministic_is_opt_in_and_other_encryptions_bind_a_context_without_it(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    // The default stays AES-256-GCM with a fresh nonce per call.
    let (enc, _) = app.create_encryption(&creds).await;
    let a = app.encrypt(&creds, &enc, "same").await;
    let b = app.encrypt(&creds, &enc, "same").await;
    assert_eq!(a["algorithm"], "AES-256-GCM");
    assert_ne!(a["cipherText"], b["cipherText"]);
    // A context is bound there too (issue #20), but stays randomised: a
    // ciphertext made without one does not open under one.
    let c1 = encrypt(&app, &creds, &enc, "x", "users.email").await;
    let c2 = encrypt(&app, &creds, &enc, "x", "users.email").await;
    assert_ne!(c1["cipherText"], c2["cipherText"]);
    let (status, body) = app
        .post("/v1/decrypt", &creds, &with_context(&a, "users.email"))
        .await;
    assert_error(status, &body, 400, "decryption_failed");
    let (status, body) = app
        .post("/v1/encryptions", &creds, &json!({"algorithm": "AES-SIV"}))
        .await;
    assert_error(status, &body, 400, "invalid_request");
    let (status, body) = app.get(&format!("/v1/encryptions/{enc}"), &creds).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["algorithm"], "AES-256-GCM");
}

async fn rotation_rewrap_batches_and_jobs_work_for_deterministic_encryptions(backend: Backend) {
    let platform = Platform::new(backend).await;
    let app = spawn_with_platform(backend, &platform, &[]).await;
    let creds = app.create_tenant("platform");
    let (enc, v1) = create_deterministic(&app, &creds).await;
    let old = encrypt(&app, &creds, &enc, "alice", "ctx").await;

    // Rotation: the new version gives new (still deterministic) ciphertexts;
    // the old one keeps decrypting.
    let v2 = app.rotate(&creds, &enc).await;
    let new = encrypt(&app, &creds, &enc, "alice", "ctx").await;
    assert_eq!(new["encryptionVersionId"], v2.as_str());
    assert_ne!(new["cipherText"], old["cipherText"]);
    assert_eq!(new, encrypt(&app, &creds, &enc, "alice", "ctx").await);
    let (status, body) = app
        .post("/v1/decrypt", &creds, &with_context(&old, "ctx"))
        .await;
    assert_eq!((status, body), (StatusCode::OK, json!({"data": "alice"})));
    // Naming the old version still encrypts under it, the same way.
    let (status, named) = app
        .post(
            "/v1/encrypt",
            &creds,
            &json!({"encryptionId": enc, "data": "alice", "context": "ctx", "encryptionVersionId": v1}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{named}");
    assert_eq!(named, old);

    // Rewrap (with the context) gives exactly what encrypt gives now.
    let (status, rewrapped) = app
        .post("/v1/rewrap", &creds, &with_context(&old, "ctx"))
        .await;
    assert_eq!(status, StatusCode::OK, "{rewrapped}");
    assert_eq!(rewrapped, new);
    // Batches: equal items, equal results.
    let item = json!({"encryptionId": enc, "data": "alice", "context": "ctx"});
    let (status, batch) = app
        .post("/v1/encrypt/batch", &creds, &json!({"items": [item, item]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    assert_eq!(batch["results"][0], new);
    assert_eq!(batch["results"][1], new);
    let (status, batch) = app
        .post(
            "/v1/decrypt/batch",
            &creds,
            &json!({"items": [with_context(&old, "ctx"), with_context(&new, "ctx"), decrypt_body(&new)]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    assert_eq!(batch["results"][0]["data"], "alice");
    assert_eq!(batch["results"][1]["data"], "alice");
    assert_eq!(batch["results"][2]["error"]["code"], "decryption_failed");

    // A job moves rows, each under its own context, to the active version:
    // the result is what encrypt gives under that version and context.
    sqlx::any::install_default_drivers();
    let url = if platform.url().starts_with("sqlite:") {
        format!("{}?mode=rwc", platform.url())
    } else {
        platform.url()
    };
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE people (id BIGINT PRIMARY KEY, ct TEXT NOT NULL, version TEXT NOT NULL, metadata TEXT NOT NULL, ctx TEXT)")
        .execute(&mut conn)
        .await
        .unwrap();
    let v3 = app.rotate(&creds, &enc).await;
    let rows: Vec<(String, &str)> = (0..50)
        .map(|i| (format!("person {i}"), if i % 2 == 0 { "a" } else { "b" }))
        .collect();
    for (i, (data, ctx)) in rows.iter().enumerate() {
        let (status, sealed) = app
            .post(
                "/v1/encrypt",
                &creds,
                &json!({"encryptionId": enc, "data": data, "context": ctx, "encryptionVersionId": v2}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{sealed}");
        sqlx::query(
            "INSERT INTO people (id, ct, version, metadata, ctx) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(i as i64)
        .bind(sealed["cipherText"].as_str().unwrap())
        .bind(sealed["encryptionVersionId"].as_str().unwrap())
        .bind(sealed["metadata"].to_string())
        .bind(*ctx)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let source = json!({
        "name": "platform", "table": "people", "keyColumn": "id",
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
    assert_eq!(done["rewrapped"], 50, "{done}");
    assert_eq!(done["failed"], 0, "{done}");
    let stored = sqlx::query("SELECT id, ct, version FROM people ORDER BY id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    for row in &stored {
        let i: i64 = row.get(0);
        let (data, ctx) = &rows[i as usize];
        let expected = encrypt(&app, &creds, &enc, data, ctx).await;
        assert_eq!(row.get::<String, _>(2), v3, "row {i}");
        assert_eq!(
            row.get::<String, _>(1),
            expected["cipherText"].as_str().unwrap(),
            "row {i}: what encrypt gives under the active version and its context"
        );
    }
}

/// RFC 8452 Appendix C.2 (AEAD_AES_256_GCM_SIV) through Keyward's own
/// sealing code, the one deterministic encryptions use.
#[test]
fn deterministic_sealing_matches_rfc_8452_test_vectors() {
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len() / 2)
            .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    };
    let key = keyward::crypto::SivKey::new(
        &keyward::crypto::DataKey::from_slice(&hex(
            "0100000000000000000000000000000000000000000000000000000000000000",
        ))
        .unwrap(),
    );
    let nonce: [u8; 12] = hex("030000000000000000000000").try_into().unwrap();
    for (aad, plaintext, result) in [
        ("", "", "07f5f4169bbf55a8400cd47ea6fd400f"),
        ("", "0100000000000000", "c2ef328e5c71c83b843122130f7364b761e0b97427e3df28"),
        (
            "",
            "01000000000000000000000000000000",
            "85a01b63025ba19b7fd3ddfc033b3e76c9eac6fa700942702e90862383c6c366",
        ),
        ("01", "0200000000000000", "1de22967237a813291213f267e3b452f02d01ae33e4ec854"),
        (
            "01",
            "0200000000000000000000000000000003000000000000000000000000000000",
            "07dad364bfc2b9da89116d7bef6daaaf6f255510aa654f920ac81b94e8bad365aea1bad12702e1965604374aab96dbbc",
        ),
    ] {
        let sealed = keyward::crypto::siv_seal(&key, &nonce, &hex(aad), &hex(plaintext));
        assert_eq!(keyward::crypto::hex(&sealed), result);
        let opened = keyward::crypto::siv_open(&key, &nonce, &hex(aad), &sealed).unwrap();
        assert_eq!(&*opened, hex(plaintext).as_slice());
    }
}
