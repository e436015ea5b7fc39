//! Integrity across replicas and master-key changes (issue #26), found by
//! the randomised schedule. `scripts/test integrity` runs it with the other
//! integrity tests.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{decrypt_body, keyward_command, random_master_key, send, Backend, TestApp};

crate::on_both_databases!(
    integrity_a_replica_on_the_replaced_master_key_stops_once_a_root_kek_it_cannot_unwrap_is_in_use,
);

/// Found by the schedule (seed 3766025441060773630 on SQLite): after a
/// master-key migration, replica A restarts with the new key and rotates the
/// root KEK; replica B, still on the old key, cannot unwrap the new KEK. It
/// used to keep serving from its stale root keys: a rotate wrapped the new
/// version under the deleted KEK (500, a foreign-key failure) and a version
/// re-wrapped under the new KEK failed to load (500). Now B stops serving key
/// operations with `503 not_ready` (and `/readyz` says why) until it is
/// restarted with the new key, and then everything decrypts.
async fn integrity_a_replica_on_the_replaced_master_key_stops_once_a_root_kek_it_cannot_unwrap_is_in_use(
    backend: Backend,
) {
    let mut a = TestApp::spawn(backend).await;
    let mut b = a.spawn_replica(&[]);
    let creds = a.create_tenant("acme");
    let operator = a.create_operator();
    let (enc, _) = a.create_encryption(&creds).await;
    let before = a.encrypt(&creds, &enc, "before").await;
    let (cold, _) = a.create_encryption(&creds).await;
    let cold_ct = a.encrypt(&creds, &cold, "cold").await;

    let new_key = random_master_key();
    let out = keyward_command()
        .args(["master-key", "migrate", "--to", "env"])
        .env("KEYWARD_DATABASE_URL", &a.db.url)
        .env("KEYWARD_MASTER_KEY", &a.master_key)
        .env("KEYWARD_NEW_MASTER_KEY", &new_key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A migration alone: B keeps serving with the KEKs it holds.
    let (status, body) = b.decrypt(&creds, &before).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    a.stop();
    a.master_key = new_key.clone();
    a.start();
    let (status, body) = a
        .post("/v1/admin/root-kek/rotate", &operator, &json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, st) = a.get("/v1/admin/root-kek", &operator).await;
        if st["rotation"] == "done" && st["rootKeks"].as_array().unwrap().len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // B cannot follow: every key operation is a clear 503, never a 500.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = b
            .post("/v1/rotate", &creds, &json!({"encryptionId": enc}))
            .await;
        assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
        if status == StatusCode::SERVICE_UNAVAILABLE {
            crate::helpers::assert_error(status, &body, 503, "not_ready");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B kept rotating: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (path, body) in [
        ("/v1/decrypt", decrypt_body(&cold_ct)),
        ("/v1/decrypt", decrypt_body(&before)),
        ("/v1/encrypt", json!({"encryptionId": enc, "data": "x"})),
        ("/v1/encryptions", json!({})),
    ] {
        let (status, body) = b.post(path, &creds, &body).await;
        crate::helpers::assert_error(status, &body, 503, "not_ready");
    }
    let (status, body) = send(b.client.get(b.url("/readyz"))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("master key changed"),
        "{body}"
    );

    // Restarted with the new key, B serves again and everything decrypts.
    b.stop();
    b.master_key = new_key;
    b.start();
    for (ct, data) in [(&before, "before"), (&cold_ct, "cold")] {
        let (status, body) = b.decrypt(&creds, ct).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"], data);
    }
    b.rotate(&creds, &enc).await;
}
