//! Blind indexes (docs/search.md): keyed, truncated digests of normalised
//! plaintexts that let the platform find a row by equality without Keyward
//! decrypting anything, computed under keys that rotate on their own.

use std::collections::HashMap;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::{Connection, Row};

use crate::helpers::{assert_error, rand_bytes, send, Backend, Creds, TestApp};
use crate::jobs::{spawn_with_platform, wait_for_job, Platform};

crate::on_both_databases!(
    equal_plaintexts_index_alike_and_different_ones_collide_only_at_the_stated_rate,
    normalisations_apply_as_the_index_declares_them,
    index_definitions_are_checked_listed_and_kept_per_tenant,
    an_index_key_rotation_then_a_job_leaves_every_row_findable_under_the_new_version,
    a_key_without_decrypt_computes_index_values_and_cannot_decrypt,
    what_one_lookup_may_cost_is_bounded,
);

/// Declares an index; returns its view.
async fn create_index(app: &TestApp, creds: &Creds, enc: &str, body: Value) -> Value {
    let (status, view) = app
        .post(&format!("/v1/encryptions/{enc}/indexes"), creds, &body)
        .await;
    assert_eq!(status, StatusCode::CREATED, "{view}");
    view
}

/// `POST /v1/index` for `data`: (name, version) -> value.
async fn index_values(
    app: &TestApp,
    creds: &Creds,
    enc: &str,
    data: &str,
    all_versions: bool,
) -> HashMap<(String, i64), String> {
    let (status, body) = app
        .post(
            "/v1/index",
            creds,
            &json!({"encryptionId": enc, "data": data, "allVersions": all_versions}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    values_of(&body)
}

fn values_of(body: &Value) -> HashMap<(String, i64), String> {
    body["indexes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                (
                    v["name"].as_str().unwrap().to_string(),
                    v["version"].as_i64().unwrap(),
                ),
                v["value"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Colliding pairs among `values`: for each value shared by k inputs,
/// k(k-1)/2.
fn colliding_pairs<'a>(values: impl Iterator<Item = &'a str>) -> u64 {
    let mut counts: HashMap<&str, u64> = HashMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    counts.values().map(|k| k * (k - 1) / 2).sum()
}

async fn equal_plaintexts_index_alike_and_different_ones_collide_only_at_the_stated_rate(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    create_index(&app, &creds, &enc, json!({"name": "wide", "bits": 32})).await;
    create_index(&app, &creds, &enc, json!({"name": "narrow", "bits": 16})).await;

    // 100,000 distinct random values, through the batch route.
    let n = 100_000usize;
    let inputs: Vec<String> = (0..n)
        .map(|i| format!("{i}:{}", hex(&rand_bytes::<12>())))
        .collect();
    let (mut wide, mut narrow) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for chunk in inputs.chunks(1000) {
        let items: Vec<Value> = chunk
            .iter()
            .map(|d| json!({"encryptionId": enc, "data": d}))
            .collect();
        let (status, body) = app
            .post("/v1/index/batch", &creds, &json!({"items": items}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        for result in body["results"].as_array().unwrap() {
            let values = values_of(result);
            wide.push(values[&("wide".to_string(), 1)].clone());
            narrow.push(values[&("narrow".to_string(), 1)].clone());
        }
    }
    assert_eq!(wide.len(), n);
    assert!(wide.iter().all(|v| v.len() == 8), "32 bits: 4 bytes of hex");
    assert!(
        narrow.iter().all(|v| v.len() == 4),
        "16 bits: 2 bytes of hex"
    );

    // The same plaintext gives the same value, single call or batch.
    for i in (0..n).step_by(9_973) {
        let again = index_values(&app, &creds, &enc, &inputs[i], false).await;
        assert_eq!(again[&("wide".to_string(), 1)], wide[i]);
        assert_eq!(again[&("narrow".to_string(), 1)], narrow[i]);
    }

    // Different plaintexts: two given values share an index value with
    // probability 2^-bits (the false-positive rate of one comparison).
    let pairs = (n * (n - 1) / 2) as f64;
    let narrow_pairs = colliding_pairs(narrow.iter().map(String::as_str));
    let narrow_rate = narrow_pairs as f64 / pairs;
    let stated = 2f64.powi(-16);
    println!(
        "blind index, 16 bits, {n} random values ({backend:?}): {narrow_pairs} colliding pairs, \
         false-positive rate {narrow_rate:.3e} (stated 2^-16 = {stated:.3e}), \
         {:.2} false matches per lookup",
        narrow_rate * (n - 1) as f64
    );
    assert!(
        (narrow_rate / stated - 1.0).abs() < 0.05,
        "16 bits: measured {narrow_rate:e}, stated {stated:e}"
    );
    // 32 bits: about n²/2^33 = 1.2 colliding pairs expected; more than 10
    // has a probability below 1e-8.
    let wide_pairs = colliding_pairs(wide.iter().map(String::as_str));
    println!(
        "blind index, 32 bits, {n} random values ({backend:?}): {wide_pairs} colliding pairs \
         (expected {:.2})",
        pairs * 2f64.powi(-32)
    );
    assert!(wide_pairs <= 10, "32 bits: {wide_pairs} colliding pairs");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn normalisations_apply_as_the_index_declares_them(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let email = create_index(
        &app,
        &creds,
        &enc,
        json!({"name": "email", "bits": 64, "normalizations": ["nfkc", "trim", "casefold"]}),
    )
    .await;
    assert_eq!(email["normalizations"], json!(["nfkc", "trim", "casefold"]));
    create_index(
        &app,
        &creds,
        &enc,
        json!({"name": "phone", "bits": 64, "normalizations": ["nfkc", "digits"]}),
    )
    .await;
    create_index(&app, &creds, &enc, json!({"name": "exact", "bits": 64})).await;

    let value = |values: &HashMap<(String, i64), String>, name: &str| {
        values[&(name.to_string(), 1)].clone()
    };
    let a = index_values(&app, &creds, &enc, "alice@example.com", false).await;
    // Case, surrounding white space (an ideographic space too) and
    // full-width letters fold away for `email`, not for `exact`.
    for same in [
        "  Alice@Example.COM\n",
        "\u{3000}ALICE@EXAMPLE.COM",
        "ａｌｉｃｅ@example.com",
    ] {
        let b = index_values(&app, &creds, &enc, same, false).await;
        assert_eq!(value(&a, "email"), value(&b, "email"), "{same:?}");
        assert_ne!(value(&a, "exact"), value(&b, "exact"), "{same:?}");
    }
    assert_ne!(
        value(&a, "email"),
        value(
            &index_values(&app, &creds, &enc, "alice@example.org", false).await,
            "email"
        )
    );
    // Two indexes of one encryption never share a key: the same input gives
    // unrelated values.
    assert_ne!(value(&a, "email"), value(&a, "exact"));

    // Digits only (after NFKC, full-width digits count).
    let p = index_values(&app, &creds, &enc, "+1 (555) 010-0199", false).await;
    for same in [
        "15550100199",
        "1-555-010-0199",
        "＋１ ５５５ ０１０ ０１９９",
    ] {
        let q = index_values(&app, &creds, &enc, same, false).await;
        assert_eq!(value(&p, "phone"), value(&q, "phone"), "{same:?}");
    }

    // Encrypt returns the same values with the ciphertext when asked, and
    // only the indexes named.
    let (status, encrypted) = app
        .post(
            "/v1/encrypt",
            &creds,
            &json!({"encryptionId": enc, "data": " ALICE@example.com ", "indexes": ["email"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{encrypted}");
    assert_eq!(
        encrypted["indexes"],
        json!([{"name": "email", "version": 1, "value": value(&a, "email")}])
    );
    // And the batch route too.
    let (status, batch) = app
        .post(
            "/v1/encrypt/batch",
            &creds,
            &json!({"items": [{"encryptionId": enc, "data": "alice@EXAMPLE.com", "indexes": ["email", "phone"]}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{batch}");
    let values = values_of(&batch["results"][0]);
    assert_eq!(value(&values, "email"), value(&a, "email"));
    assert_eq!(values.len(), 2);
    // Without the option, the contract's response is unchanged.
    let plain = app.encrypt(&creds, &enc, "x").await;
    assert!(plain.get("indexes").is_none(), "{plain}");
}

async fn index_definitions_are_checked_listed_and_kept_per_tenant(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let other = app.create_tenant("other");
    let (enc, v1) = app.create_encryption(&creds).await;
    let path = format!("/v1/encryptions/{enc}/indexes");
    for (body, what) in [
        (json!({"name": "Email", "bits": 32}), "name"),
        (json!({"name": "", "bits": 32}), "name"),
        (json!({"name": "email", "bits": 0}), "bits"),
        (json!({"name": "email", "bits": 257}), "bits"),
        (
            json!({"name": "email", "bits": 32, "normalizations": ["lower"]}),
            "normalizations",
        ),
        (
            json!({"name": "email", "bits": 32, "normalizations": ["trim", "trim"]}),
            "normalizations",
        ),
        (json!({"name": "email", "bits": 32, "extra": 1}), "extra"),
    ] {
        let (status, body) = app.post(&path, &creds, &body).await;
        assert_error(status, &body, 400, "invalid_request");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(what),
            "{body}"
        );
    }
    let view = create_index(&app, &creds, &enc, json!({"name": "email", "bits": 32})).await;
    assert_eq!(view["activeVersion"], 1);
    assert_eq!(view["versions"][0]["anchorVersionId"], v1.as_str());
    assert_eq!(view["versions"][0]["live"], true);
    let (status, body) = app
        .post(&path, &creds, &json!({"name": "email", "bits": 16}))
        .await;
    assert_error(status, &body, 409, "index_exists");
    let (status, list) = app.get(&path, &creds).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["indexes"].as_array().unwrap().len(), 1);
    assert_eq!(list["indexes"][0]["bits"], 32);

    // An unknown index, and another tenant's encryption (exactly like a
    // missing one, for every index route).
    let (status, body) = app
        .post(
            "/v1/index",
            &creds,
            &json!({"encryptionId": enc, "data": "x", "indexes": ["nope"]}),
        )
        .await;
    assert_error(status, &body, 404, "index_not_found");
    let (status, body) = app
        .post(
            "/v1/index",
            &other,
            &json!({"encryptionId": enc, "data": "x"}),
        )
        .await;
    assert_error(status, &body, 404, "encryption_not_found");
    let (status, body) = app.get(&path, &other).await;
    assert_error(status, &body, 404, "encryption_not_found");
    let (status, body) = app
        .post(&path, &other, &json!({"name": "mine", "bits": 32}))
        .await;
    assert_error(status, &body, 404, "encryption_not_found");
    let (status, body) = app
        .post(&format!("{path}/email/rotate"), &other, &json!({}))
        .await;
    assert_error(status, &body, 404, "encryption_not_found");
    let (status, body) = app
        .post(&format!("{path}/nope/rotate"), &creds, &json!({}))
        .await;
    assert_error(status, &body, 404, "index_not_found");
    let (status, body) = crate::helpers::send(
        app.req(reqwest::Method::PATCH, &format!("{path}/email"), &creds)
            .json(&json!({"minVersion": 2})),
    )
    .await;
    assert_error(status, &body, 422, "invalid_index_change");
    // An encryption without indexes computes none.
    let (bare, _) = app.create_encryption(&creds).await;
    let (status, body) = app
        .post(
            "/v1/index",
            &creds,
            &json!({"encryptionId": bare, "data": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["indexes"], json!([]));
}

/// The platform's `users` table: a ciphertext and its blind index.
async fn users_table(platform: &Platform) -> sqlx::AnyConnection {
    sqlx::any::install_default_drivers();
    let url = if platform.url().starts_with("sqlite:") {
        format!("{}?mode=rwc", platform.url())
    } else {
        platform.url()
    };
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TABLE users (id BIGINT PRIMARY KEY, email TEXT NOT NULL, version TEXT NOT NULL, metadata TEXT NOT NULL, email_idx TEXT)")
        .execute(&mut conn)
        .await
        .unwrap();
    conn
}

/// Every row: (id, ciphertext, version, email_idx).
async fn users(conn: &mut sqlx::AnyConnection) -> Vec<(i64, String, String, String)> {
    sqlx::query("SELECT id, email, version, email_idx FROM users ORDER BY id")
        .fetch_all(conn)
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect()
}

fn email(i: usize) -> String {
    format!("user{i}@example.com")
}

async fn run_job(app: &TestApp, creds: &Creds, enc: &str) -> Value {
    let source = json!({
        "name": "platform", "table": "users", "keyColumn": "id",
        "cipherTextColumn": "email", "versionColumn": "version", "metadataColumn": "metadata",
        "indexColumns": [{"index": "email", "column": "email_idx"}],
    });
    let (status, created) = app
        .post(
            "/v1/jobs",
            creds,
            &json!({"kind": "reencrypt", "encryptionId": enc, "source": source}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    wait_for_job(
        app,
        creds,
        created["jobId"].as_str().unwrap(),
        Duration::from_secs(120),
    )
    .await
}

async fn an_index_key_rotation_then_a_job_leaves_every_row_findable_under_the_new_version(
    backend: Backend,
) {
    let platform = Platform::new(backend).await;
    let mut conn = users_table(&platform).await;
    let app = spawn_with_platform(backend, &platform, &[]).await;
    let creds = app.create_tenant("platform");
    let (enc, v1) = app.create_encryption(&creds).await;
    create_index(
        &app,
        &creds,
        &enc,
        json!({"name": "email", "bits": 32, "normalizations": ["trim", "casefold"]}),
    )
    .await;
    // The platform writes 300 rows: ciphertext and index value in one call.
    let n = 300;
    let items: Vec<Value> = (0..n)
        .map(|i| json!({"encryptionId": enc, "data": email(i), "indexes": ["email"]}))
        .collect();
    let (status, body) = app
        .post("/v1/encrypt/batch", &creds, &json!({"items": items}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for (i, r) in body["results"].as_array().unwrap().iter().enumerate() {
        sqlx::query("INSERT INTO users (id, email, version, metadata, email_idx) VALUES ($1, $2, $3, $4, $5)")
            .bind(i as i64)
            .bind(r["cipherText"].as_str().unwrap())
            .bind(r["encryptionVersionId"].as_str().unwrap())
            .bind(r["metadata"].to_string())
            .bind(r["indexes"][0]["value"].as_str().unwrap())
            .execute(&mut conn)
            .await
            .unwrap();
    }
    let before = users(&mut conn).await;

    // Rotate the index key: lookups ask for both live versions, and the
    // stored value matches the old one only.
    let (status, rotated) = app
        .post(
            &format!("/v1/encryptions/{enc}/indexes/email/rotate"),
            &creds,
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    assert_eq!(rotated["activeVersion"], 2);
    let lookup = index_values(&app, &creds, &enc, " USER7@example.com", true).await;
    assert_eq!(lookup.len(), 2, "{lookup:?}");
    let (old, new) = (
        lookup[&("email".to_string(), 1)].clone(),
        lookup[&("email".to_string(), 2)].clone(),
    );
    assert_eq!(before[7].3, old);
    assert_ne!(old, new);

    // A job with the index column: every row gets its value under version
    // 2; the ciphertexts, already on the active key version, are unchanged.
    let done = run_job(&app, &creds, &enc).await;
    assert_eq!(done["rewrapped"], n, "{done}");
    let after = users(&mut conn).await;
    let items: Vec<Value> = (0..n)
        .map(|i| json!({"encryptionId": enc, "data": email(i)}))
        .collect();
    let (status, fresh) = app
        .post("/v1/index/batch", &creds, &json!({"items": items}))
        .await;
    assert_eq!(status, StatusCode::OK, "{fresh}");
    for (i, (row, r)) in after
        .iter()
        .zip(fresh["results"].as_array().unwrap())
        .enumerate()
    {
        assert_eq!(row.1, before[i].1, "row {i}: ciphertext untouched");
        assert_eq!(r["indexes"][0]["version"], 2);
        assert_eq!(
            row.3,
            r["indexes"][0]["value"].as_str().unwrap(),
            "row {i} findable under version 2"
        );
    }
    // Run again: nothing is stale, nothing is written.
    let again = run_job(&app, &creds, &enc).await;
    assert_eq!(again["rewrapped"], 0, "{again}");

    // A key rotation and a job: ciphertexts move, index values stay right.
    let active = app.rotate(&creds, &enc).await;
    let done = run_job(&app, &creds, &enc).await;
    assert_eq!(done["remainingByVersion"], json!({}), "{done}");
    let moved = users(&mut conn).await;
    for (i, row) in moved.iter().enumerate() {
        assert_eq!(row.2, active, "row {i} on the active version");
        assert_eq!(row.3, after[i].3, "row {i}: index value unchanged");
    }

    // The key version the first index version derives from cannot be
    // destroyed while that index version is live, even with force.
    let version_path = format!("/v1/encryptions/{enc}/versions/{v1}");
    let destroy = json!({"state": "destroyed", "force": true});
    let (status, body) = crate::helpers::send(
        app.req(reqwest::Method::PATCH, &version_path, &creds)
            .json(&destroy),
    )
    .await;
    assert_error(status, &body, 409, "version_anchors_index");
    // Index version 2 was made before the key rotation, so it derives from
    // version 1 too: rotate the index once more (anchored at the active key
    // version), recompute, retire the older index versions, and version 1
    // may go.
    let (status, rotated) = app
        .post(
            &format!("/v1/encryptions/{enc}/indexes/email/rotate"),
            &creds,
            &json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    assert_eq!(rotated["versions"][2]["anchorVersionId"], active.as_str());
    run_job(&app, &creds, &enc).await;
    let (status, retired) = crate::helpers::send(
        app.req(
            reqwest::Method::PATCH,
            &format!("/v1/encryptions/{enc}/indexes/email"),
            &creds,
        )
        .json(&json!({"minVersion": 3})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{retired}");
    assert_eq!(retired["versions"][0]["live"], false);
    assert_eq!(retired["versions"][1]["live"], false);
    assert_eq!(retired["versions"][2]["live"], true);
    let lookup = index_values(&app, &creds, &enc, "user7@example.com", true).await;
    assert_eq!(lookup.len(), 1, "{lookup:?}");
    let latest = lookup[&("email".to_string(), 3)].clone();
    assert_ne!(latest, new);
    for (i, row) in users(&mut conn).await.iter().enumerate() {
        if i == 7 {
            assert_eq!(row.3, latest, "row 7 findable under version 3");
        }
        assert_eq!(row.2, active);
    }
    let (status, body) = crate::helpers::send(
        app.req(reqwest::Method::PATCH, &version_path, &creds)
            .json(&destroy),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Still findable, and still decrypting, after the old key is gone.
    assert_eq!(
        index_values(&app, &creds, &enc, "user7@example.com", false).await
            [&("email".to_string(), 3)],
        latest
    );
    // A retired index version stays retired: its anchor is gone now, and
    // lowering `minVersion` would make every all-versions lookup fail.
    let (status, body) = crate::helpers::send(
        app.req(
            reqwest::Method::PATCH,
            &format!("/v1/encryptions/{enc}/indexes/email"),
            &creds,
        )
        .json(&json!({"minVersion": 1})),
    )
    .await;
    assert_error(status, &body, 422, "invalid_index_change");
    assert_eq!(
        index_values(&app, &creds, &enc, "user7@example.com", true)
            .await
            .len(),
        1
    );
    // A job that writes index columns computes index values: `manage`
    // alone is not enough.
    let manager = app.create_key(&creds.tenant_id, "manage");
    let source = json!({
        "name": "platform", "table": "users", "keyColumn": "id",
        "cipherTextColumn": "email", "versionColumn": "version", "metadataColumn": "metadata",
        "indexColumns": [{"index": "email", "column": "email_idx"}],
    });
    let (status, body) = app
        .post(
            "/v1/jobs",
            &manager,
            &json!({"kind": "reencrypt", "encryptionId": enc, "source": source}),
        )
        .await;
    assert_error(status, &body, 403, "insufficient_scope");
}

async fn a_key_without_decrypt_computes_index_values_and_cannot_decrypt(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let admin = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&admin).await;
    create_index(&app, &admin, &enc, json!({"name": "email", "bits": 32})).await;
    let encrypted = app.encrypt(&admin, &enc, "alice@example.com").await;
    let expected = index_values(&app, &admin, &enc, "alice@example.com", false).await;

    let indexer = app.create_key(&admin.tenant_id, "index");
    let got = index_values(&app, &indexer, &enc, "alice@example.com", false).await;
    assert_eq!(got, expected);
    let (status, body) = app
        .post(
            "/v1/index/batch",
            &indexer,
            &json!({"items": [{"encryptionId": enc, "data": "a"}]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Nothing else: no decrypt (single or batch), no encrypt, no rewrap, no
    // index management.
    let (status, body) = app.decrypt(&indexer, &encrypted).await;
    assert_error(status, &body, 403, "insufficient_scope");
    let (status, body) = app
        .post(
            "/v1/decrypt/batch",
            &indexer,
            &json!({"items": [crate::helpers::decrypt_body(&encrypted)]}),
        )
        .await;
    assert_error(status, &body, 403, "insufficient_scope");
    let (status, body) = app
        .post(
            "/v1/encrypt",
            &indexer,
            &json!({"encryptionId": enc, "data": "x"}),
        )
        .await;
    assert_error(status, &body, 403, "insufficient_scope");
    let (status, body) = app
        .post(
            "/v1/rewrap",
            &indexer,
            &crate::helpers::decrypt_body(&encrypted),
        )
        .await;
    assert_error(status, &body, 403, "insufficient_scope");
    let (status, body) = app
        .post(
            &format!("/v1/encryptions/{enc}/indexes"),
            &indexer,
            &json!({"name": "other", "bits": 8}),
        )
        .await;
    assert_error(status, &body, 403, "insufficient_scope");

    // And an encrypt-only key cannot compute index values, on encrypt or
    // directly (each value is a plaintext-confirmation oracle).
    let writer = app.create_key(&admin.tenant_id, "encrypt");
    let (status, body) = app
        .post(
            "/v1/encrypt",
            &writer,
            &json!({"encryptionId": enc, "data": "x", "indexes": ["email"]}),
        )
        .await;
    assert_error(status, &body, 403, "insufficient_scope");
    assert!(body["error"]["message"].as_str().unwrap().contains("index"));
    let (status, body) = app
        .post(
            "/v1/index",
            &writer,
            &json!({"encryptionId": enc, "data": "x"}),
        )
        .await;
    assert_error(status, &body, 403, "insufficient_scope");
    // With both, one call does both.
    let both = app.create_key(&admin.tenant_id, "encrypt,index");
    let (status, body) = app
        .post(
            "/v1/encrypt",
            &both,
            &json!({"encryptionId": enc, "data": "alice@example.com", "indexes": ["email"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["indexes"][0]["value"].as_str().unwrap(),
        expected[&("email".to_string(), 1)]
    );
}

/// Review finding: an index could be rotated without end, and an
/// all-versions lookup computes a value per live version; and a value's
/// normalization (NFKC: up to 18 times longer) was unbounded. At most 8 live
/// versions (raising `minVersion` makes room), at most 64 KiB per value
/// before and after each normalization.
async fn what_one_lookup_may_cost_is_bounded(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    create_index(
        &app,
        &creds,
        &enc,
        json!({"name": "name", "bits": 64, "normalizations": ["nfkc"]}),
    )
    .await;
    let rotate = format!("/v1/encryptions/{enc}/indexes/name/rotate");
    for version in 2..=8 {
        let (status, view) = app.post(&rotate, &creds, &json!({})).await;
        assert_eq!(status, StatusCode::OK, "{view}");
        assert_eq!(view["activeVersion"], version);
    }
    let (status, body) = app.post(&rotate, &creds, &json!({})).await;
    assert_error(status, &body, 409, "too_many_index_versions");
    assert_eq!(index_values(&app, &creds, &enc, "x", true).await.len(), 8);
    let (status, view) = send(
        app.req(
            reqwest::Method::PATCH,
            &format!("/v1/encryptions/{enc}/indexes/name"),
            &creds,
        )
        .json(&json!({"minVersion": 2})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    let (status, view) = app.post(&rotate, &creds, &json!({})).await;
    assert_eq!(status, StatusCode::OK, "{view}");
    assert_eq!(view["activeVersion"], 9);

    // 8,400 bytes that NFKC makes 92,400: refused, as is a longer input;
    // one that stays within 64 KiB is indexed.
    for data in ["\u{fdfa}".repeat(2800), "a".repeat(65537)] {
        let (status, body) = app
            .post(
                "/v1/index",
                &creds,
                &json!({"encryptionId": enc, "data": data}),
            )
            .await;
        assert_error(status, &body, 400, "index_value_too_long");
        let (status, body) = app
            .post(
                "/v1/encrypt",
                &creds,
                &json!({"encryptionId": enc, "data": data, "indexes": ["name"]}),
            )
            .await;
        assert_error(status, &body, 400, "index_value_too_long");
    }
    let fits = index_values(&app, &creds, &enc, &"\u{fdfa}".repeat(1400), false).await;
    assert_eq!(fits.len(), 1);
}
