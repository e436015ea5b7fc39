//! The fixed v1 contract: encrypt, decrypt, rotate.

use std::collections::HashSet;

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_error, decrypt_body, Backend, TestApp};

crate::on_both_databases!(
    encrypt_then_decrypt_returns_the_data_byte_for_byte,
    encrypt_response_has_the_contract_fields,
    every_encryption_uses_a_fresh_nonce,
    ciphertext_under_another_encryption_or_version_fails_as_decryption_failed,
    tampered_ciphertext_nonce_or_metadata_is_decryption_failed,
    rotate_activates_a_new_version_and_old_versions_still_decrypt,
    encrypt_with_an_explicit_older_version_uses_it,
    twenty_concurrent_rotates_give_twenty_new_versions_and_one_active,
);

async fn encrypt_then_decrypt_returns_the_data_byte_for_byte(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let big = "x".repeat(200_000);
    let samples = [
        "",
        "hello",
        "unicode: ünïcødé 日本語 🙂 \u{0} \" \\ \n\t",
        "aGVsbG8gd29ybGQ=",
        "  leading and trailing spaces  ",
        big.as_str(),
    ];
    for data in samples {
        let encrypted = app.encrypt(&creds, &enc, data).await;
        let (status, body) = app.decrypt(&creds, &encrypted).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, json!({"data": data}));
    }
}

async fn encrypt_response_has_the_contract_fields(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, version) = app.create_encryption(&creds).await;
    let body = app.encrypt(&creds, &enc, "hello").await;
    let obj = body.as_object().unwrap();
    let keys: HashSet<&str> = obj.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        HashSet::from([
            "cipherText",
            "encryptionId",
            "encryptionVersionId",
            "algorithm",
            "metadata"
        ])
    );
    assert_eq!(body["encryptionId"], enc.as_str());
    assert_eq!(body["encryptionVersionId"], version.as_str());
    assert_eq!(body["algorithm"], "AES-256-GCM");
    let ct = base64::engine::general_purpose::STANDARD
        .decode(body["cipherText"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        ct.len(),
        "hello".len() + 16,
        "ciphertext is plaintext plus the GCM tag"
    );
    let nonce = base64::engine::general_purpose::STANDARD
        .decode(body["metadata"]["nonce"].as_str().unwrap())
        .unwrap();
    assert_eq!(nonce.len(), 12, "a 96-bit nonce");
}

async fn every_encryption_uses_a_fresh_nonce(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let mut nonces = HashSet::new();
    let mut ciphertexts = HashSet::new();
    for _ in 0..50 {
        let e = app.encrypt(&creds, &enc, "same plaintext").await;
        assert!(nonces.insert(e["metadata"]["nonce"].as_str().unwrap().to_string()));
        assert!(ciphertexts.insert(e["cipherText"].as_str().unwrap().to_string()));
    }
}

async fn ciphertext_under_another_encryption_or_version_fails_as_decryption_failed(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (a, _) = app.create_encryption(&creds).await;
    let (b, b_version) = app.create_encryption(&creds).await;
    let encrypted = app.encrypt(&creds, &a, "secret").await;

    // Same ciphertext presented under encryption B with A's version id.
    let mut moved = decrypt_body(&encrypted);
    moved["encryptionId"] = json!(b);
    let (status, body) = app.post("/v1/decrypt", &creds, &moved).await;
    assert_error(status, &body, 400, "decryption_failed");

    // ... and under B with B's own version.
    moved["encryptionVersionId"] = json!(b_version);
    let (status, body) = app.post("/v1/decrypt", &creds, &moved).await;
    assert_error(status, &body, 400, "decryption_failed");

    // Under A but naming a newer version of A.
    let new_version = app.rotate(&creds, &a).await;
    let mut other_version = decrypt_body(&encrypted);
    other_version["encryptionVersionId"] = json!(new_version);
    let (status, body) = app.post("/v1/decrypt", &creds, &other_version).await;
    assert_error(status, &body, 400, "decryption_failed");

    // An unknown version id.
    other_version["encryptionVersionId"] = json!(uuid::Uuid::new_v4().to_string());
    let (status, body) = app.post("/v1/decrypt", &creds, &other_version).await;
    assert_error(status, &body, 400, "decryption_failed");
}

fn flip_first_byte(b64: &str) -> String {
    let engine = base64::engine::general_purpose::STANDARD;
    let mut bytes = engine.decode(b64).unwrap();
    bytes[0] ^= 0x01;
    engine.encode(bytes)
}

async fn tampered_ciphertext_nonce_or_metadata_is_decryption_failed(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let encrypted = app.encrypt(&creds, &enc, "attack at dawn").await;
    let good = decrypt_body(&encrypted);
    let mut cases: Vec<(&str, Value)> = vec![];

    let mut v = good.clone();
    v["cipherText"] = json!(flip_first_byte(v["cipherText"].as_str().unwrap()));
    cases.push(("flipped ciphertext bit", v));

    let mut v = good.clone();
    let ct = base64::engine::general_purpose::STANDARD
        .decode(v["cipherText"].as_str().unwrap())
        .unwrap();
    v["cipherText"] = json!(base64::engine::general_purpose::STANDARD.encode(&ct[..ct.len() - 1]));
    cases.push(("truncated tag", v));

    let mut v = good.clone();
    v["cipherText"] = json!("");
    cases.push(("empty ciphertext", v));

    let mut v = good.clone();
    v["metadata"]["nonce"] = json!(flip_first_byte(v["metadata"]["nonce"].as_str().unwrap()));
    cases.push(("flipped nonce bit", v));

    let mut v = good.clone();
    v["metadata"]["nonce"] = json!("AAAA");
    cases.push(("short nonce", v));

    let mut v = good.clone();
    v["metadata"]["nonce"] = json!("not base64!");
    cases.push(("nonce not base64", v));

    let mut v = good.clone();
    v["metadata"] = json!({});
    cases.push(("empty metadata", v));

    let mut v = good.clone();
    v["metadata"]["extra"] = json!(1);
    cases.push(("extra metadata", v));

    let mut v = good.clone();
    v["metadata"]["nonce"] = json!(7);
    cases.push(("nonce of the wrong type", v));

    let mut first_body = None;
    for (what, body) in cases {
        let (status, resp) = app.post("/v1/decrypt", &creds, &body).await;
        assert_error(status, &resp, 400, "decryption_failed");
        // The same answer whatever was wrong.
        match &first_body {
            None => first_body = Some(resp),
            Some(b) => assert_eq!(b, &resp, "{what}"),
        }
    }
    let (status, _) = app.post("/v1/decrypt", &creds, &good).await;
    assert_eq!(status, StatusCode::OK);
}

async fn rotate_activates_a_new_version_and_old_versions_still_decrypt(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, v1) = app.create_encryption(&creds).await;
    let before = app.encrypt(&creds, &enc, "before rotation").await;
    assert_eq!(before["encryptionVersionId"], v1.as_str());

    let v2 = app.rotate(&creds, &enc).await;
    assert_ne!(v1, v2);
    let after = app.encrypt(&creds, &enc, "after rotation").await;
    assert_eq!(
        after["encryptionVersionId"],
        v2.as_str(),
        "encrypt uses the new active version"
    );

    for (encrypted, data) in [(&before, "before rotation"), (&after, "after rotation")] {
        let (status, body) = app.decrypt(&creds, encrypted).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"], data);
    }

    let (_, details) = app.get(&format!("/v1/encryptions/{enc}"), &creds).await;
    assert_eq!(details["activeVersionId"], v2.as_str());
    let versions = details["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[0]["versionId"], v1.as_str());
    assert_eq!(versions[0]["version"], 1);
    assert_eq!(versions[0]["state"], "enabled");
    assert_eq!(versions[1]["versionId"], v2.as_str());
    assert_eq!(versions[1]["version"], 2);
    assert_eq!(versions[1]["state"], "active");
}

async fn encrypt_with_an_explicit_older_version_uses_it(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, v1) = app.create_encryption(&creds).await;
    app.rotate(&creds, &enc).await;
    let (status, body) = app
        .post(
            "/v1/encrypt",
            &creds,
            &json!({"encryptionId": enc, "data": "old", "encryptionVersionId": v1}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["encryptionVersionId"], v1.as_str());
    let (status, plain) = app.decrypt(&creds, &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(plain["data"], "old");

    let (status, body) = app
        .post(
            "/v1/encrypt",
            &creds,
            &json!({"encryptionId": enc, "data": "x", "encryptionVersionId": uuid::Uuid::new_v4().to_string()}),
        )
        .await;
    assert_error(status, &body, 404, "version_not_found");
}

async fn twenty_concurrent_rotates_give_twenty_new_versions_and_one_active(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let old = app.encrypt(&creds, &enc, "from version 1").await;

    let rotates = (0..20).map(|_| app.rotate(&creds, &enc));
    let new_versions: HashSet<String> = futures::future::join_all(rotates)
        .await
        .into_iter()
        .collect();
    assert_eq!(new_versions.len(), 20);

    let (_, details) = app.get(&format!("/v1/encryptions/{enc}"), &creds).await;
    let versions = details["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 21);
    let numbers: Vec<i64> = versions
        .iter()
        .map(|v| v["version"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, (1..=21).collect::<Vec<_>>());
    let active: Vec<&Value> = versions.iter().filter(|v| v["state"] == "active").collect();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0]["versionId"], details["activeVersionId"]);
    assert_eq!(active[0]["version"], 21);

    // Every version encrypts when named and decrypts.
    for v in versions {
        let (status, e) = app
            .post(
                "/v1/encrypt",
                &creds,
                &json!({"encryptionId": enc, "data": "v", "encryptionVersionId": v["versionId"]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{e}");
        let (status, _) = app.decrypt(&creds, &e).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, body) = app.decrypt(&creds, &old).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"], "from version 1");
}
