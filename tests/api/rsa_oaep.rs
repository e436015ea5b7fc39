//! RSA-OAEP-256 encryptions: the v1 contract unchanged in shape, one block
//! or a JWE (RSA-OAEP-256 + A256GCM) by size, rotation, rewrap, batches and
//! version states, public keys in PEM and JWK used by outside libraries
//! (pyca/cryptography, joserfc), one answer for every decryption failure,
//! and Wycheproof's vectors through Keyward's decryption.

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_error, decrypt_body, run_python, Backend, Creds, TestApp};

crate::on_both_databases!(
    rsa_oaep_round_trips_of_every_size_as_blocks_or_jwe,
    rsa_oaep_rotation_rewrap_batches_and_version_states,
    rsa_oaep_public_key_in_pem_and_jwk_encrypts_outside_and_decrypts_inside,
    rsa_oaep_every_decryption_failure_is_one_answer,
    rsa_oaep_creation_is_validated,
    rsa_oaep_wycheproof_vectors_through_import_and_decrypt,
    rsa_oaep_reencryption_jobs_and_root_kek_rotation_carry_rsa_keys,
);

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Creates an RSA-OAEP-256 encryption of `bits`; returns (id, version).
pub async fn create_rsa(app: &TestApp, creds: &Creds, body: Value) -> (String, String) {
    let (status, created) = app.post("/v1/encryptions", creds, &body).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["algorithm"], "RSA-OAEP-256");
    (
        created["encryptionId"].as_str().unwrap().into(),
        created["activeVersionId"].as_str().unwrap().into(),
    )
}

/// A string of `n` bytes (ASCII).
fn data_of(n: usize) -> String {
    (0..n).map(|i| (b'a' + (i % 26) as u8) as char).collect()
}

async fn rsa_oaep_round_trips_of_every_size_as_blocks_or_jwe(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let started = std::time::Instant::now();
    let (enc, _) = create_rsa(&app, &creds, json!({"algorithm": "RSA-OAEP-256"})).await;
    let (big, _) = create_rsa(
        &app,
        &creds,
        json!({"algorithm": "RSA-OAEP-256", "keySize": 4096}),
    )
    .await;
    eprintln!(
        "two RSA encryptions (3072, 4096) created in {:?}",
        started.elapsed()
    );
    let (_, shown) = app.get(&format!("/v1/encryptions/{big}"), &creds).await;
    assert_eq!(shown["keySize"], 4096);
    // One block up to k - 66 bytes (318 for 3072, 446 for 4096), else a JWE.
    for (id, block, sizes) in [
        (
            &enc,
            384usize,
            // 1,000,000 bytes: about the most `max_body_bytes` (1 MiB) lets
            // encrypt take; its JWE, base64, must still fit decrypt's limit.
            &[0usize, 1, 190, 318, 319, 400, 100_000, 1_000_000][..],
        ),
        (&big, 512, &[400, 446, 447, 100_000][..]),
    ] {
        for &n in sizes {
            let data = data_of(n);
            let out = app.encrypt(&creds, id, &data).await;
            assert_eq!(out["algorithm"], "RSA-OAEP-256");
            assert_eq!(out["metadata"], json!({}));
            let ct = B64.decode(out["cipherText"].as_str().unwrap()).unwrap();
            if n <= block - 66 {
                assert_eq!(ct.len(), block, "{n} bytes: one block");
            } else {
                let jwe = String::from_utf8(ct).expect("a JWE is ASCII");
                assert_eq!(jwe.split('.').count(), 5, "{n} bytes: a compact JWE");
                let header: Value = serde_json::from_slice(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(jwe.split('.').next().unwrap())
                        .unwrap(),
                )
                .unwrap();
                assert_eq!(header["alg"], "RSA-OAEP-256");
                assert_eq!(header["enc"], "A256GCM");
                assert_eq!(header["kid"], out["encryptionVersionId"]);
            }
            let (status, body) = app.decrypt(&creds, &out).await;
            assert_eq!(status, StatusCode::OK, "{n}: {body}");
            assert_eq!(body["data"].as_str().unwrap().len(), n);
            assert_eq!(body, json!({"data": data}));
        }
    }
    // Non-ASCII data survives too.
    let text = "ünïcødé 日本語 🙂 \" \\ \n";
    let out = app.encrypt(&creds, &enc, text).await;
    assert_eq!(app.decrypt(&creds, &out).await.1, json!({"data": text}));
}

async fn rsa_oaep_rotation_rewrap_batches_and_version_states(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, v1) = create_rsa(&app, &creds, json!({"algorithm": "RSA-OAEP-256"})).await;
    let short = app.encrypt(&creds, &enc, "short").await;
    let long = app.encrypt(&creds, &enc, &data_of(5000)).await;
    let started = std::time::Instant::now();
    let v2 = app.rotate(&creds, &enc).await;
    eprintln!("an RSA-3072 rotation took {:?}", started.elapsed());
    assert_ne!(v1, v2);
    // The new version encrypts; the old one still decrypts.
    let fresh = app.encrypt(&creds, &enc, "fresh").await;
    assert_eq!(fresh["encryptionVersionId"], v2.as_str());
    for (out, data) in [(&short, "short".to_string()), (&long, data_of(5000))] {
        let (status, body) = app.decrypt(&creds, out).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"], data.as_str());
    }
    // The versions' public keys differ.
    let key = |v: String| {
        let app = &app;
        let creds = &creds;
        let enc = enc.clone();
        async move {
            app.get(
                &format!("/v1/encryptions/{enc}/versions/{v}/public-key"),
                creds,
            )
            .await
            .1["publicKeyPem"]
                .clone()
        }
    };
    assert_ne!(key(v1.clone()).await, key(v2.clone()).await);
    // Rewrap moves a ciphertext (block and JWE) to the active version.
    for (out, data) in [(&short, "short".to_string()), (&long, data_of(5000))] {
        let (status, moved) = app.post("/v1/rewrap", &creds, &decrypt_body(out)).await;
        assert_eq!(status, StatusCode::OK, "{moved}");
        assert_eq!(moved["encryptionVersionId"], v2.as_str());
        assert_eq!(moved["algorithm"], "RSA-OAEP-256");
        assert_eq!(app.decrypt(&creds, &moved).await.1["data"], data.as_str());
    }
    // Batches.
    let (status, batch) = app
        .post(
            "/v1/encrypt/batch",
            &creds,
            &json!({"items": [{"encryptionId": enc, "data": "one"}, {"encryptionId": enc, "data": data_of(2000)}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    let items: Vec<Value> = batch["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(decrypt_body)
        .collect();
    let (status, opened) = app
        .post("/v1/decrypt/batch", &creds, &json!({"items": items}))
        .await;
    assert_eq!(status, StatusCode::OK, "{opened}");
    assert_eq!(opened["results"][0]["data"], "one");
    assert_eq!(opened["results"][1]["data"], data_of(2000).as_str());
    // minDecryptionVersion and version states apply as for AES.
    let (status, body) = app
        .req(
            reqwest::Method::PATCH,
            &format!("/v1/encryptions/{enc}"),
            &creds,
        )
        .json(&json!({"minDecryptionVersion": 2}))
        .send()
        .await
        .map(|r| (r.status(), ()))
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let (status, body) = app.decrypt(&creds, &short).await;
    assert_error(status, &body, 403, "version_below_min_decryption");
    let (status, body) = app
        .req(
            reqwest::Method::PATCH,
            &format!("/v1/encryptions/{enc}/versions/{v1}"),
            &creds,
        )
        .json(&json!({"state": "disabled"}))
        .send()
        .await
        .map(|r| (r.status(), ()))
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let (_, shown) = app.get(&format!("/v1/encryptions/{enc}"), &creds).await;
    assert_eq!(shown["versions"][0]["state"], "disabled");
    assert_eq!(shown["versions"][0]["imported"], false);
    assert_eq!(shown["keySize"], 3072);
}

/// Encrypts outside Keyward: with the PEM through pyca/cryptography (one
/// OAEP block) and with the JWK through joserfc (a compact JWE).
const ENCRYPT_OUTSIDE: &str = r#"
import base64, json, sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from joserfc import jwe
from joserfc.jwk import RSAKey
i = json.load(sys.stdin)
pub = serialization.load_pem_public_key(i["pem"].encode())
block = pub.encrypt(i["short"].encode(), padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
key = RSAKey.import_key(i["jwk"])
token = jwe.encrypt_compact({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": i["jwk"]["kid"]}, i["long"].encode(), key, algorithms=["RSA-OAEP-256", "A256GCM"])
print(json.dumps({"block": base64.b64encode(block).decode(), "jwe": base64.b64encode(token.encode()).decode(), "jwe_text": token}))
"#;

async fn rsa_oaep_public_key_in_pem_and_jwk_encrypts_outside_and_decrypts_inside(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, v1) = create_rsa(&app, &creds, json!({"algorithm": "RSA-OAEP-256"})).await;
    let (status, key) = app
        .get(
            &format!("/v1/encryptions/{enc}/versions/{v1}/public-key"),
            &creds,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{key}");
    assert_eq!(key["algorithm"], "RSA-OAEP-256");
    assert_eq!(key["keySize"], 3072);
    assert_eq!(key["jwk"]["kty"], "RSA");
    assert_eq!(key["jwk"]["kid"], v1.as_str());
    assert_eq!(key["jwk"]["alg"], "RSA-OAEP-256");
    assert_eq!(key["jwk"]["use"], "enc");
    assert!(key["publicKeyPem"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN PUBLIC KEY-----\n"));
    let long = data_of(100_000);
    let out = run_python(
        ENCRYPT_OUTSIDE,
        &json!({"pem": key["publicKeyPem"], "jwk": key["jwk"], "short": "made outside", "long": long}),
    );
    for (ct, data) in [
        (&out["block"], "made outside"),
        (&out["jwe"], long.as_str()),
    ] {
        let (status, body) = app
            .post(
                "/v1/decrypt",
                &creds,
                &json!({"encryptionId": enc, "encryptionVersionId": v1, "cipherText": ct, "metadata": {}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"], data);
    }
    // The public key of an AES encryption does not exist; another tenant's
    // is not found.
    let (aes, aes_v) = app.create_encryption(&creds).await;
    let (status, body) = app
        .get(
            &format!("/v1/encryptions/{aes}/versions/{aes_v}/public-key"),
            &creds,
        )
        .await;
    assert_error(status, &body, 422, "not_asymmetric");
    let other = app.create_tenant("other");
    let (status, body) = app
        .get(
            &format!("/v1/encryptions/{enc}/versions/{v1}/public-key"),
            &other,
        )
        .await;
    assert_error(status, &body, 404, "encryption_not_found");
    let reader = app.create_key(&creds.tenant_id, "decrypt");
    let (status, body) = app
        .get(
            &format!("/v1/encryptions/{enc}/versions/{v1}/public-key"),
            &reader,
        )
        .await;
    assert_error(status, &body, 403, "insufficient_scope");
}

async fn rsa_oaep_every_decryption_failure_is_one_answer(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, v1) = create_rsa(&app, &creds, json!({"algorithm": "RSA-OAEP-256"})).await;
    let block = app.encrypt(&creds, &enc, "secret").await;
    let jwe = app.encrypt(&creds, &enc, &data_of(1000)).await;
    let v2 = app.rotate(&creds, &enc).await;
    let flip = |out: &Value, at: usize| {
        let mut ct = B64.decode(out["cipherText"].as_str().unwrap()).unwrap();
        let i = at.min(ct.len() - 1);
        ct[i] ^= 1;
        let mut body = decrypt_body(out);
        body["cipherText"] = json!(B64.encode(ct));
        body
    };
    let jwe_text =
        String::from_utf8(B64.decode(jwe["cipherText"].as_str().unwrap()).unwrap()).unwrap();
    let with_ct = |text: &str| {
        let mut body = decrypt_body(&jwe);
        body["cipherText"] = json!(B64.encode(text));
        body
    };
    let parts: Vec<&str> = jwe_text.split('.').collect();
    let other_kid = {
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(json!({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": v2}).to_string());
        format!("{header}.{}", parts[1..].join("."))
    };
    let mut under_v2 = decrypt_body(&block);
    under_v2["encryptionVersionId"] = json!(v2);
    let cases = vec![
        ("a flipped block byte", flip(&block, 100)),
        ("a flipped last block byte", flip(&block, 383)),
        ("a flipped JWE byte", flip(&jwe, 700)),
        ("a flipped JWE tag", flip(&jwe, usize::MAX)),
        ("the other version", under_v2),
        ("a JWE naming another kid", with_ct(&other_kid)),
        ("a JWE with four parts", with_ct(&parts[..4].join("."))),
        (
            "a JWE without its wrapped key",
            with_ct(&format!("{}..{}", parts[0], parts[2..].join("."))),
        ),
        ("a short block", with_ct("x")),
        ("empty", with_ct("")),
    ];
    let mut messages = std::collections::HashSet::new();
    for (what, body) in cases {
        let (status, answer) = app.post("/v1/decrypt", &creds, &body).await;
        assert_error(status, &answer, 400, "decryption_failed");
        messages.insert(answer["error"]["message"].as_str().unwrap().to_string());
        let _ = what;
    }
    assert_eq!(messages.len(), 1, "{messages:?}");
    // The genuine ones still decrypt; the metadata carries nothing.
    let mut body = decrypt_body(&block);
    body["metadata"] = json!({"anything": 1});
    assert_eq!(
        app.post("/v1/decrypt", &creds, &body).await.1["data"],
        "secret"
    );
    let _ = v1;
}

async fn rsa_oaep_creation_is_validated(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    for (body, code) in [
        (json!({"algorithm": "RSA-OAEP"}), "invalid_request"),
        (
            json!({"algorithm": "RSA-OAEP-256", "keySize": 2048}),
            "invalid_request",
        ),
        (
            json!({"algorithm": "AES-256-GCM", "keySize": 3072}),
            "invalid_request",
        ),
        (json!({"keySize": "big"}), "invalid_request"),
    ] {
        let (status, answer) = app.post("/v1/encryptions", &creds, &body).await;
        assert_error(status, &answer, 400, code);
    }
    // Platform-managed only.
    let (status, answer) = app
        .req(reqwest::Method::POST, "/v1/encryptions", &creds)
        .header("X-Master-Key", crate::helpers::random_master_key())
        .json(&json!({"algorithm": "RSA-OAEP-256"}))
        .send()
        .await
        .map(|r| (r.status(), ()))
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer:?}");
    let (status, listed) = app.get("/v1/encryptions", &creds).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["items"].as_array().unwrap().len(), 0, "{listed}");
}

/// Wraps each PKCS#8 key (hex) for import under the wrapping key (PEM) with
/// RSA_AES_KEY_WRAP_SHA_256, as pyca/cryptography does it.
pub const WRAP_FOR_IMPORT: &str = r#"
import base64, json, os, sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
i = json.load(sys.stdin)
pub = serialization.load_pem_public_key(i["pem"].encode())
oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
out = []
for hexkey in i["keys"]:
    material = bytes.fromhex(hexkey)
    if i.get("alg") == "RSA-OAEP-256":
        out.append(base64.b64encode(pub.encrypt(material, oaep)).decode())
    else:
        eph = os.urandom(32)
        out.append(base64.b64encode(pub.encrypt(eph, oaep) + aes_key_wrap_with_padding(eph, material)).decode())
print(json.dumps(out))
"#;

/// Wycheproof's RSA-OAEP-256 keys (3072, 4096) imported into RSA encryptions;
/// each vector's ciphertext through `/v1/decrypt`: the valid ones without a
/// label decrypt to their message when it is text (data is a JSON string),
/// and every other one is `400 decryption_failed`.
async fn rsa_oaep_wycheproof_vectors_through_import_and_decrypt(backend: Backend) {
    use wycheproof::rsa_oaep::{TestName, TestSet};
    use wycheproof::TestResult;
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (status, wrapping) = app.get("/v1/import/wrapping-key", &creds).await;
    assert_eq!(status, StatusCode::OK, "{wrapping}");
    let (mut decrypted, mut refused) = (0, 0);
    for name in [
        TestName::Rsa3072Sha256Mgf1Sha256,
        TestName::Rsa4096Sha256Mgf1Sha256,
    ] {
        let set = TestSet::load(name).unwrap();
        for group in &set.test_groups {
            let hex: String = group.pkcs8.iter().map(|b| format!("{b:02x}")).collect();
            let wrapped = run_python(
                WRAP_FOR_IMPORT,
                &json!({"pem": wrapping["publicKeyPem"], "keys": [hex]}),
            );
            let (enc, _) = create_rsa(&app, &creds, json!({"algorithm": "RSA-OAEP-256"})).await;
            let (status, imported) = app
                .post(
                    &format!("/v1/encryptions/{enc}/import"),
                    &creds,
                    &json!({"wrappedKey": wrapped[0], "wrappingAlgorithm": "RSA_AES_KEY_WRAP_SHA_256"}),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{imported}");
            let version = imported["newVersionId"].as_str().unwrap();
            for test in &group.tests {
                let (status, body) = app
                    .post(
                        "/v1/decrypt",
                        &creds,
                        &json!({"encryptionId": enc, "encryptionVersionId": version, "cipherText": B64.encode(&test.ct[..]), "metadata": {}}),
                    )
                    .await;
                let text = std::str::from_utf8(&test.pt).ok();
                let expect = match (test.result, test.label.is_empty(), text) {
                    (TestResult::Valid, true, Some(t)) => Some(t),
                    (TestResult::Invalid, ..) | (TestResult::Valid, ..) => None,
                    (TestResult::Acceptable, ..) => {
                        // Either answer is allowed; it must still be one of the two.
                        assert!(status == StatusCode::OK || status == StatusCode::BAD_REQUEST);
                        continue;
                    }
                };
                match expect {
                    Some(t) => {
                        assert_eq!(status, StatusCode::OK, "tc {}: {body}", test.tc_id);
                        assert_eq!(body["data"], t, "tc {}", test.tc_id);
                        decrypted += 1;
                    }
                    None => {
                        assert_error(status, &body, 400, "decryption_failed");
                        refused += 1;
                    }
                }
            }
        }
    }
    eprintln!("Wycheproof through /v1/decrypt: {decrypted} decrypted, {refused} refused");
    assert!(decrypted > 5 && refused > 20, "{decrypted} {refused}");
}

/// A re-encryption job moves RSA ciphertexts in the platform's table to the
/// active version; a root-KEK rotation re-wraps the RSA private keys and the
/// tenant's import wrapping key, and after a restart (everything unwrapped
/// afresh under the new KEK) every row still decrypts and imports still work.
async fn rsa_oaep_reencryption_jobs_and_root_kek_rotation_carry_rsa_keys(backend: Backend) {
    use crate::jobs::{decrypt_all, plaintext, spawn_with_platform, wait_for_job, Platform};
    use std::time::{Duration, Instant};
    let platform = Platform::new(backend).await;
    let mut app = spawn_with_platform(backend, &platform, &[]).await;
    let creds = app.create_tenant("platform");
    let (enc, _) = create_rsa(&app, &creds, json!({"algorithm": "RSA-OAEP-256"})).await;
    let (_, wrapping) = app.get("/v1/import/wrapping-key", &creds).await;
    let n = 120;
    platform.fill_rows(&app, &creds, &enc, n).await;
    let active = app.rotate(&creds, &enc).await;
    let (status, created) = app
        .post(
            "/v1/jobs",
            &creds,
            &json!({"kind": "reencrypt", "encryptionId": enc, "source": platform.source()}),
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
    assert_eq!(done["rewrapped"], n, "{done}");
    let rows = platform.rows().await;
    assert!(rows.iter().all(|(_, _, v, m)| v == &active && m == "{}"));
    // Root-KEK rotation: every RSA version and the wrapping key move.
    let operator = app.create_operator();
    let (status, body) = app
        .post("/v1/admin/root-kek/rotate", &operator, &json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, st) = app.get("/v1/admin/root-kek", &operator).await;
        if st["rootKeks"].as_array().unwrap().len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old root KEK was not retired: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.restart();
    let plain = decrypt_all(&app, &creds, &enc, &rows).await;
    for (i, p) in plain.iter().enumerate() {
        assert_eq!(p, &plaintext(i, 0));
    }
    let (status, again) = app.get("/v1/import/wrapping-key", &creds).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["publicKeyPem"], wrapping["publicKeyPem"]);
    let key: String = (0..32).map(|i| format!("{:02x}", i * 7)).collect();
    let (aes, _) = app.create_encryption(&creds).await;
    let wrapped = run_python(
        WRAP_FOR_IMPORT,
        &json!({"pem": again["publicKeyPem"], "keys": [key]}),
    );
    let (status, body) = app
        .post(
            &format!("/v1/encryptions/{aes}/import"),
            &creds,
            &json!({"wrappedKey": wrapped[0], "wrappingAlgorithm": "RSA_AES_KEY_WRAP_SHA_256"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}
