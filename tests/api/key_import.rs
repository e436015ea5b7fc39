//! Bring your own key: the tenant's wrapping key, importing AES and RSA keys
//! made outside Keyward (pyca/cryptography) as new versions, ciphertexts
//! crossing between Keyward and an outside implementation both ways, clear
//! refusals of wrong or tampered imports, and controlled export.

use std::time::Duration;

use base64::Engine;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_error, decrypt_body, run_python, Backend, Creds, TestApp};
use crate::rsa_oaep::{create_rsa, WRAP_FOR_IMPORT};

crate::on_both_databases!(
    key_import_wrapping_key_is_per_tenant_stable_and_needs_the_import_scope,
    key_import_of_an_aes_key_made_outside_interoperates_both_ways,
    key_import_of_an_rsa_key_made_outside_interoperates_both_ways,
    key_import_wrong_wrapping_or_tampering_is_a_clear_400,
    key_import_export_is_refused_without_exportable_and_audited,
    key_import_export_of_an_exportable_key_unwraps_outside,
);

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

fn uuid_hex(id: &str) -> String {
    id.replace('-', "")
}

async fn wrapping_pem(app: &TestApp, creds: &Creds) -> Value {
    let (status, key) = app.get("/v1/import/wrapping-key", creds).await;
    assert_eq!(status, StatusCode::OK, "{key}");
    key["publicKeyPem"].clone()
}

async fn import(
    app: &TestApp,
    creds: &Creds,
    enc: &str,
    wrapped: &Value,
    alg: &str,
) -> (StatusCode, Value) {
    app.post(
        &format!("/v1/encryptions/{enc}/import"),
        creds,
        &json!({"wrappedKey": wrapped, "wrappingAlgorithm": alg}),
    )
    .await
}

async fn key_import_wrapping_key_is_per_tenant_stable_and_needs_the_import_scope(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let acme = app.create_tenant("acme");
    let other = app.create_tenant("other");
    let started = std::time::Instant::now();
    let (status, first) = app.get("/v1/import/wrapping-key", &acme).await;
    eprintln!("first wrapping key (RSA 4096) in {:?}", started.elapsed());
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["keySize"], 4096);
    assert_eq!(
        first["wrappingAlgorithms"],
        json!(["RSA-OAEP-256", "RSA_AES_KEY_WRAP_SHA_256"])
    );
    assert_eq!(first["jwk"]["kty"], "RSA");
    let (_, again) = app.get("/v1/import/wrapping-key", &acme).await;
    assert_eq!(first, again, "the same key every time");
    let (_, theirs) = app.get("/v1/import/wrapping-key", &other).await;
    assert_ne!(first["publicKeyPem"], theirs["publicKeyPem"]);
    // Only with `import`: a key that chooses an encryption's key can read
    // what is encrypted under it later.
    let manager = app.create_key(&acme.tenant_id, "encrypt,decrypt,rotate,manage");
    let (status, body) = app.get("/v1/import/wrapping-key", &manager).await;
    assert_error(status, &body, 403, "insufficient_scope");
    let (enc, _) = app.create_encryption(&acme).await;
    let (status, body) = import(&app, &manager, &enc, &json!("AAAA"), "RSA-OAEP-256").await;
    assert_error(status, &body, 403, "insufficient_scope");
    // It survives a restart (stored, wrapped under the root KEK).
    let mut app = app;
    app.restart();
    let (_, after) = app.get("/v1/import/wrapping-key", &acme).await;
    assert_eq!(first["publicKeyPem"], after["publicKeyPem"]);
}

/// Makes an AES key, wraps it both ways, and seals text with it the way
/// Keyward does (docs/algorithms.md): AES-256-GCM, a 12-byte nonce, associated
/// data `keyward:data:v1\0 || encryption id || version id` (16-byte UUIDs).
const AES_OUTSIDE: &str = r#"
import base64, json, os, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
i = json.load(sys.stdin)
if i["op"] == "seal":
    key = bytes.fromhex(i["key"])
    aad = b"keyward:data:v1\0" + bytes.fromhex(i["enc"]) + bytes.fromhex(i["ver"])
    nonce = os.urandom(12)
    ct = AESGCM(key).encrypt(nonce, i["data"].encode(), aad)
    print(json.dumps({"cipherText": base64.b64encode(ct).decode(), "nonce": base64.b64encode(nonce).decode()}))
else:
    key = bytes.fromhex(i["key"])
    aad = b"keyward:data:v1\0" + bytes.fromhex(i["enc"]) + bytes.fromhex(i["ver"])
    pt = AESGCM(key).decrypt(base64.b64decode(i["nonce"]), base64.b64decode(i["cipherText"]), aad)
    print(json.dumps(pt.decode()))
"#;

async fn key_import_of_an_aes_key_made_outside_interoperates_both_ways(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, v1) = app.create_encryption(&creds).await;
    let before = app.encrypt(&creds, &enc, "before the import").await;
    let pem = wrapping_pem(&app, &creds).await;
    for alg in ["RSA-OAEP-256", "RSA_AES_KEY_WRAP_SHA_256"] {
        let key: String = crate::helpers::rand_bytes::<32>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let wrapped = run_python(
            WRAP_FOR_IMPORT,
            &json!({"pem": pem, "keys": [key], "alg": alg}),
        );
        let (status, imported) = import(&app, &creds, &enc, &wrapped[0], alg).await;
        assert_eq!(status, StatusCode::CREATED, "{alg}: {imported}");
        assert_eq!(imported["imported"], true);
        let version = imported["newVersionId"].as_str().unwrap().to_string();
        let (_, shown) = app.get(&format!("/v1/encryptions/{enc}"), &creds).await;
        let row = shown["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["versionId"] == version.as_str())
            .unwrap()
            .clone();
        assert_eq!(row["imported"], true);
        assert_eq!(row["state"], "active");
        assert_eq!(shown["versions"][0]["imported"], false);
        // Made outside, decrypted by Keyward.
        let sealed = run_python(
            AES_OUTSIDE,
            &json!({"op": "seal", "key": key, "enc": uuid_hex(&enc), "ver": uuid_hex(&version), "data": "made outside"}),
        );
        let (status, body) = app
            .post(
                "/v1/decrypt",
                &creds,
                &json!({"encryptionId": enc, "encryptionVersionId": version, "cipherText": sealed["cipherText"], "metadata": {"nonce": sealed["nonce"]}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"], "made outside");
        // Made by Keyward (under the imported active version), decrypted outside.
        let out = app.encrypt(&creds, &enc, "made by Keyward").await;
        assert_eq!(out["encryptionVersionId"], version.as_str());
        let opened = run_python(
            AES_OUTSIDE,
            &json!({"op": "open", "key": key, "enc": uuid_hex(&enc), "ver": uuid_hex(&version), "cipherText": out["cipherText"], "nonce": out["metadata"]["nonce"]}),
        );
        assert_eq!(opened, "made by Keyward");
    }
    // The version before the import still decrypts.
    assert_eq!(before["encryptionVersionId"], v1.as_str());
    assert_eq!(
        app.decrypt(&creds, &before).await.1["data"],
        "before the import"
    );
}

/// Makes an RSA 3072 key (PKCS#8 DER, hex) and its public PEM; or encrypts
/// with its public key (one block, and a joserfc JWE); or decrypts a Keyward
/// ciphertext (block or JWE) with its private key.
const RSA_OUTSIDE: &str = r#"
import base64, json, sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from joserfc import jwe
from joserfc.jwk import RSAKey
i = json.load(sys.stdin)
oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
if i["op"] == "make":
    k = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    der = k.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pem = k.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    print(json.dumps({"pkcs8": der.hex(), "pem": pem}))
elif i["op"] == "seal":
    k = serialization.load_der_private_key(bytes.fromhex(i["pkcs8"]), None)
    block = k.public_key().encrypt(i["short"].encode(), oaep)
    token = jwe.encrypt_compact({"alg": "RSA-OAEP-256", "enc": "A256GCM"}, i["long"].encode(), RSAKey.import_key(k.public_key()), algorithms=["RSA-OAEP-256", "A256GCM"])
    print(json.dumps({"block": base64.b64encode(block).decode(), "jwe": base64.b64encode(token.encode()).decode()}))
else:
    k = serialization.load_der_private_key(bytes.fromhex(i["pkcs8"]), None)
    ct = base64.b64decode(i["cipherText"])
    if len(ct) == k.key_size // 8:
        print(json.dumps(k.decrypt(ct, oaep).decode()))
    else:
        print(json.dumps(jwe.decrypt_compact(ct.decode(), RSAKey.import_key(k), algorithms=["RSA-OAEP-256", "A256GCM"]).plaintext.decode()))
"#;

async fn key_import_of_an_rsa_key_made_outside_interoperates_both_ways(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = create_rsa(&app, &creds, json!({"algorithm": "RSA-OAEP-256"})).await;
    let made = run_python(RSA_OUTSIDE, &json!({"op": "make"}));
    let pem = wrapping_pem(&app, &creds).await;
    let wrapped = run_python(
        WRAP_FOR_IMPORT,
        &json!({"pem": pem, "keys": [made["pkcs8"]]}),
    );
    let (status, imported) =
        import(&app, &creds, &enc, &wrapped[0], "RSA_AES_KEY_WRAP_SHA_256").await;
    assert_eq!(status, StatusCode::CREATED, "{imported}");
    let version = imported["newVersionId"].as_str().unwrap().to_string();
    // Its public key is the outside key's.
    let (_, key) = app
        .get(
            &format!("/v1/encryptions/{enc}/versions/{version}/public-key"),
            &creds,
        )
        .await;
    assert_eq!(key["publicKeyPem"], made["pem"]);
    // Made outside (block and JWE), decrypted by Keyward.
    let long = "l".repeat(3000);
    let sealed = run_python(
        RSA_OUTSIDE,
        &json!({"op": "seal", "pkcs8": made["pkcs8"], "short": "short outside", "long": long}),
    );
    for (ct, data) in [
        (&sealed["block"], "short outside"),
        (&sealed["jwe"], long.as_str()),
    ] {
        let (status, body) = app
            .post(
                "/v1/decrypt",
                &creds,
                &json!({"encryptionId": enc, "encryptionVersionId": version, "cipherText": ct, "metadata": {}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"], data);
    }
    // Made by Keyward (block and JWE), decrypted outside.
    for data in ["short inside", &"i".repeat(2000)] {
        let out = app.encrypt(&creds, &enc, data).await;
        assert_eq!(out["encryptionVersionId"], version.as_str());
        let opened = run_python(
            RSA_OUTSIDE,
            &json!({"op": "open", "pkcs8": made["pkcs8"], "cipherText": out["cipherText"]}),
        );
        assert_eq!(opened, data);
    }
}

async fn key_import_wrong_wrapping_or_tampering_is_a_clear_400(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let other = app.create_tenant("other");
    let (aes, _) = app.create_encryption(&creds).await;
    let (rsa, _) = create_rsa(&app, &creds, json!({"algorithm": "RSA-OAEP-256"})).await;
    let pem = wrapping_pem(&app, &creds).await;
    let theirs = wrapping_pem(&app, &other).await;
    let key32 = "11".repeat(32);
    let ok_kwp = run_python(WRAP_FOR_IMPORT, &json!({"pem": pem, "keys": [key32]}));
    let ok_oaep = run_python(
        WRAP_FOR_IMPORT,
        &json!({"pem": pem, "keys": [key32], "alg": "RSA-OAEP-256"}),
    );
    let short_key = run_python(
        WRAP_FOR_IMPORT,
        &json!({"pem": pem, "keys": ["22".repeat(31)], "alg": "RSA-OAEP-256"}),
    );
    let foreign = run_python(WRAP_FOR_IMPORT, &json!({"pem": theirs, "keys": [key32]}));
    let tamper = |wrapped: &Value, at_end: bool| {
        let mut bytes = B64.decode(wrapped.as_str().unwrap()).unwrap();
        let i = if at_end { bytes.len() - 1 } else { 10 };
        bytes[i] ^= 1;
        json!(B64.encode(bytes))
    };
    let cases = [
        (
            "a tampered AES-KWP part",
            &aes,
            tamper(&ok_kwp[0], true),
            "RSA_AES_KEY_WRAP_SHA_256",
        ),
        (
            "a tampered RSA part",
            &aes,
            tamper(&ok_kwp[0], false),
            "RSA_AES_KEY_WRAP_SHA_256",
        ),
        (
            "a tampered OAEP block",
            &aes,
            tamper(&ok_oaep[0], false),
            "RSA-OAEP-256",
        ),
        (
            "the wrong wrapping algorithm",
            &aes,
            ok_kwp[0].clone(),
            "RSA-OAEP-256",
        ),
        (
            "the other wrapping algorithm",
            &aes,
            ok_oaep[0].clone(),
            "RSA_AES_KEY_WRAP_SHA_256",
        ),
        (
            "another tenant's wrapping key",
            &aes,
            foreign[0].clone(),
            "RSA_AES_KEY_WRAP_SHA_256",
        ),
        (
            "a 31-byte AES key",
            &aes,
            short_key[0].clone(),
            "RSA-OAEP-256",
        ),
        (
            "an AES key into an RSA encryption",
            &rsa,
            ok_kwp[0].clone(),
            "RSA_AES_KEY_WRAP_SHA_256",
        ),
        (
            "random bytes",
            &aes,
            json!(B64.encode([7u8; 600])),
            "RSA_AES_KEY_WRAP_SHA_256",
        ),
    ];
    let mut messages = std::collections::HashSet::new();
    for (what, enc, wrapped, alg) in cases {
        let (status, body) = import(&app, &creds, enc, &wrapped, alg).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {body}");
        assert_eq!(body["error"]["code"], "import_failed", "{what}: {body}");
        messages.insert(body["error"]["message"].as_str().unwrap().to_string());
    }
    assert_eq!(
        messages.len(),
        1,
        "one answer for every cause: {messages:?}"
    );
    for (wrapped, alg) in [
        (json!("not base64!"), "RSA-OAEP-256"),
        (ok_kwp[0].clone(), "AES_KEY_WRAP"),
    ] {
        let (status, body) = import(&app, &creds, &aes, &wrapped, alg).await;
        assert_error(status, &body, 400, "invalid_request");
    }
    // Nothing was imported by any of them: one version each.
    for enc in [&aes, &rsa] {
        let (_, shown) = app.get(&format!("/v1/encryptions/{enc}"), &creds).await;
        assert_eq!(shown["versions"].as_array().unwrap().len(), 1, "{shown}");
    }
    // Another tenant's encryption answers like a missing one.
    let (status, body) = import(&app, &other, &aes, &ok_kwp[0], "RSA_AES_KEY_WRAP_SHA_256").await;
    assert_error(status, &body, 404, "encryption_not_found");
    // The genuine one imports.
    let (status, body) = import(&app, &creds, &aes, &ok_kwp[0], "RSA_AES_KEY_WRAP_SHA_256").await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// Makes an RSA 3072 key pair for the export target, or unwraps an export
/// (RSA_AES_KEY_WRAP_SHA_256) and opens a Keyward AES ciphertext with it.
const EXPORT_TARGET: &str = r#"
import base64, json, sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
i = json.load(sys.stdin)
if i["op"] == "make":
    k = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    der = k.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    pem = k.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    print(json.dumps({"pkcs8": der.hex(), "pem": pem}))
else:
    k = serialization.load_der_private_key(bytes.fromhex(i["pkcs8"]), None)
    wrapped = base64.b64decode(i["wrappedKey"])
    n = k.key_size // 8
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    eph = k.decrypt(wrapped[:n], oaep)
    key = aes_key_unwrap_with_padding(eph, wrapped[n:])
    aad = b"keyward:data:v1\0" + bytes.fromhex(i["enc"]) + bytes.fromhex(i["ver"])
    pt = AESGCM(key).decrypt(base64.b64decode(i["nonce"]), base64.b64decode(i["cipherText"]), aad)
    print(json.dumps({"keyLength": len(key), "data": pt.decode()}))
"#;

async fn key_import_export_is_refused_without_exportable_and_audited(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl").display().to_string();
    let app = TestApp::spawn_with(backend, &[("KEYWARD_AUDIT_FILE", audit.as_str())]).await;
    let creds = app.create_tenant("acme");
    let (enc, v1) = app.create_encryption(&creds).await;
    let target = run_python(EXPORT_TARGET, &json!({"op": "make"}));
    let path = format!("/v1/encryptions/{enc}/versions/{v1}/export");
    let (status, body) = app
        .post(&path, &creds, &json!({"publicKey": target["pem"]}))
        .await;
    assert_error(status, &body, 403, "export_not_allowed");
    // `exportable` cannot be turned on later.
    let (status, _) = crate::helpers::send(
        app.req(
            reqwest::Method::PATCH,
            &format!("/v1/encryptions/{enc}"),
            &creds,
        )
        .json(&json!({"exportable": true})),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (_, shown) = app.get(&format!("/v1/encryptions/{enc}"), &creds).await;
    assert_eq!(shown["exportable"], false);
    let (status, body) = app
        .post(&path, &creds, &json!({"publicKey": target["pem"]}))
        .await;
    assert_error(status, &body, 403, "export_not_allowed");
    // Without the `export` scope: refused before anything else.
    let manager = app.create_key(&creds.tenant_id, "manage,decrypt,import");
    let (status, body) = app
        .post(&path, &manager, &json!({"publicKey": target["pem"]}))
        .await;
    assert_error(status, &body, 403, "insufficient_scope");
    // Every refusal is in the audit log.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, page) = app
            .get("/v1/audit?operation=version.export&limit=100", &creds)
            .await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let records = page["records"].as_array().unwrap().clone();
        let refused = records
            .iter()
            .filter(|r| r["outcome"] == "error" && r["encryptionId"] == enc.as_str())
            .count();
        if refused >= 3 {
            assert!(records.iter().all(|r| r["outcome"] != "ok"), "{records:#?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{records:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = std::fs::read_to_string(&audit).unwrap_or_default();
    assert!(text.contains("version.export"), "{text}");
}

async fn key_import_export_of_an_exportable_key_unwraps_outside(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (status, created) = app
        .post("/v1/encryptions", &creds, &json!({"exportable": true}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["exportable"], true);
    let enc = created["encryptionId"].as_str().unwrap().to_string();
    let v1 = created["activeVersionId"].as_str().unwrap().to_string();
    let out = app.encrypt(&creds, &enc, "exported key opens this").await;
    let target = run_python(EXPORT_TARGET, &json!({"op": "make"}));
    let path = format!("/v1/encryptions/{enc}/versions/{v1}/export");
    // A public key that is not one, or too small, is bad input.
    for bad in [
        json!("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"),
        json!("x"),
    ] {
        let (status, body) = app.post(&path, &creds, &json!({"publicKey": bad})).await;
        assert_error(status, &body, 400, "invalid_request");
    }
    let (status, exported) = app
        .post(&path, &creds, &json!({"publicKey": target["pem"]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{exported}");
    assert_eq!(exported["wrappingAlgorithm"], "RSA_AES_KEY_WRAP_SHA_256");
    assert_eq!(exported["algorithm"], "AES-256-GCM");
    let opened = run_python(
        EXPORT_TARGET,
        &json!({"op": "open", "pkcs8": target["pkcs8"], "wrappedKey": exported["wrappedKey"],
                "enc": uuid_hex(&enc), "ver": uuid_hex(&v1), "cipherText": out["cipherText"], "nonce": out["metadata"]["nonce"]}),
    );
    assert_eq!(
        opened,
        json!({"keyLength": 32, "data": "exported key opens this"})
    );
    // An unknown version is 404; the export of a version of an RSA
    // encryption is its PKCS#8 key (checked by length here).
    let (status, body) = app
        .post(
            &format!(
                "/v1/encryptions/{enc}/versions/{}/export",
                uuid::Uuid::new_v4()
            ),
            &creds,
            &json!({"publicKey": target["pem"]}),
        )
        .await;
    assert_error(status, &body, 404, "version_not_found");
    let (rsa, rsa_v) = create_rsa(
        &app,
        &creds,
        json!({"algorithm": "RSA-OAEP-256", "exportable": true}),
    )
    .await;
    let (status, exported) = app
        .post(
            &format!("/v1/encryptions/{rsa}/versions/{rsa_v}/export"),
            &creds,
            &json!({"publicKey": target["pem"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{exported}");
    assert_eq!(exported["algorithm"], "RSA-OAEP-256");
    let wrapped = B64
        .decode(exported["wrappedKey"].as_str().unwrap())
        .unwrap();
    assert!(wrapped.len() > 384 + 1200, "{}", wrapped.len());
    let _ = decrypt_body(&out);
}
