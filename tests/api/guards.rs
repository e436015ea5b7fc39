//! Guards nobody can aim at someone else: lockouts per client address (never
//! per key id), the client address behind declared proxies only, client-key
//! guesses bounded per encryption, rate limits and bounded audit of refused
//! requests on by default, another tenant's ids answered from memory like
//! unknown ones, and the nonce bound on every version that encrypts.

use std::net::IpAddr;
use std::time::Duration;

use base64::Engine;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{
    assert_error, decrypt_body, install_crypto_provider, rand_bytes, send, Backend, Creds, TestApp,
};

crate::on_both_databases!(
    wrong_client_keys_for_one_encryption_are_bounded,
    another_tenants_id_is_answered_from_memory_like_an_unknown_one,
    an_enabled_version_named_explicitly_stops_at_the_nonce_bound,
    a_replica_stops_at_the_nonce_bound_when_its_count_is_not_recorded,
    a_replica_whose_counts_the_database_refuses_stops_at_the_bound_then_resumes,
);

/// A client whose connections come from `source` (any 127.x.y.z reaches a
/// server on 127.0.0.1): another client address on one machine.
fn client_from(source: &str) -> reqwest::Client {
    install_crypto_provider();
    reqwest::Client::builder()
        .local_address(source.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

/// `POST path` with `creds`, from `client`, with extra headers.
async fn post_from(
    app: &TestApp,
    client: &reqwest::Client,
    creds: &Creds,
    headers: &[(&str, &str)],
    body: &Value,
) -> (StatusCode, Value) {
    let mut req = client
        .post(app.url("/v1/encrypt"))
        .header("X-Api-Key", &creds.key)
        .header("X-Api-Secret", &creds.secret)
        .json(body);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    send(req).await
}

/// The value of an unlabelled counter in `/metrics` (0 when absent).
async fn counter(app: &TestApp, name: &str) -> f64 {
    let text = app.get_text("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// Every record of an audit file.
fn audit_records(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    keyward::audit::read_records(&text)
        .into_iter()
        .map(|r| serde_json::to_value(r.unwrap()).unwrap())
        .collect()
}

/// Waits until `path` holds at least `n` records (the writer batches).
async fn audit_with_at_least(path: &std::path::Path, n: usize) -> Vec<Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let records = audit_records(path);
        if records.len() >= n || std::time::Instant::now() > deadline {
            return records;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn someone_who_knows_a_key_id_but_not_its_secret_cannot_lock_its_holder_out() {
    let env = [("KEYWARD_AUTH_MAX_FAILURES", "3")];
    let app = TestApp::spawn_with(Backend::Sqlite, &env).await;
    let holder = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&holder).await;
    let body = json!({"encryptionId": enc, "data": "x"});
    let attacker = client_from("127.0.0.2");
    let guess = Creds {
        secret: "kws_guess".into(),
        ..holder.clone()
    };
    for _ in 0..3 {
        let (status, resp) = post_from(&app, &attacker, &guess, &[], &body).await;
        assert_error(status, &resp, 401, "invalid_credentials");
    }
    // The guesser's own address is locked out for guesses...
    let (status, resp) = post_from(&app, &attacker, &guess, &[], &body).await;
    assert_error(status, &resp, 429, "too_many_failed_attempts");
    // ...though not for a right secret, which is no guess (whoever shares an
    // address with a guesser keeps working)...
    let (status, resp) = post_from(&app, &attacker, &holder, &[], &body).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    // ...and the holder, elsewhere, is not.
    for _ in 0..3 {
        let (status, resp) = app.post("/v1/encrypt", &holder, &body).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
    }
    assert!(app.log_shows("client address locked out").await);
    assert!(!app.log_text().contains("kws_guess"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_address_is_believed_only_from_a_declared_proxy() {
    let audit_dir = tempfile::tempdir().unwrap();
    let audit_file = audit_dir.path().join("audit.jsonl");
    let env = [
        ("KEYWARD_AUTH_MAX_FAILURES", "3"),
        ("KEYWARD_TRUSTED_PROXIES", "127.0.0.1/32, 10.0.0.0/8"),
        ("KEYWARD_AUDIT_FILE", audit_file.to_str().unwrap()),
    ];
    let app = TestApp::spawn_with(Backend::Sqlite, &env).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let body = json!({"encryptionId": enc, "data": "x"});
    let wrong = Creds {
        secret: "kws_wrong".into(),
        ..creds.clone()
    };
    let proxy = app.client.clone(); // 127.0.0.1: a declared proxy.
                                    // Behind the proxy, the client is the right-most hop that is not a proxy:
                                    // what the client itself put in front is not believed.
    let mallory = [("X-Forwarded-For", "192.0.2.99, 203.0.113.7, 10.1.2.3")];
    for _ in 0..3 {
        let (status, _) = post_from(&app, &proxy, &wrong, &mallory, &body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, resp) = post_from(&app, &proxy, &wrong, &mallory, &body).await;
    assert_error(status, &resp, 429, "too_many_failed_attempts");
    // Only the declared header (X-Forwarded-For by default) is read: a
    // `Forwarded` the proxy passed through from a client is not.
    let not_read = [("Forwarded", "for=203.0.113.7;proto=https")];
    let (status, _) = post_from(&app, &proxy, &wrong, &not_read, &body).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "Forwarded is not the declared header: not locked"
    );
    // Another client behind the same proxy is not locked out, and so is
    // neither the one whose address mallory put in front (a wrong secret
    // from them is a plain 401, not a lockout).
    for other in ["203.0.113.8", "192.0.2.99"] {
        let hdr = [("X-Forwarded-For", other)];
        let (status, resp) = post_from(&app, &proxy, &wrong, &hdr, &body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{other}: {resp}");
        let (status, resp) = post_from(&app, &proxy, &creds, &hdr, &body).await;
        assert_eq!(status, StatusCode::OK, "{other}: {resp}");
    }

    // From a peer that is not a declared proxy the headers are ignored: its
    // failures count against its own address, whatever it claims.
    let outsider = client_from("127.0.0.2");
    for i in 0..3 {
        let claim = format!("198.51.100.{i}");
        let hdr = [("X-Forwarded-For", claim.as_str())];
        let (status, _) = post_from(&app, &outsider, &wrong, &hdr, &body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let hdr = [("X-Forwarded-For", "198.51.100.200")];
    let (status, resp) = post_from(&app, &outsider, &wrong, &hdr, &body).await;
    assert_error(status, &resp, 429, "too_many_failed_attempts");
    // ...and a spoofed header cannot lock out the address it names.
    let hdr = [("X-Forwarded-For", "198.51.100.0")];
    let (status, _) = post_from(&app, &proxy, &wrong, &hdr, &body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = post_from(&app, &proxy, &creds, &hdr, &body).await;
    assert_eq!(status, StatusCode::OK);

    // The audit names the client address as found, never a spoofed one.
    let records = audit_with_at_least(&audit_file, 15).await;
    let peers: Vec<&str> = records
        .iter()
        .filter(|r| r["operation"] == "encrypt")
        .filter_map(|r| r["peer"].as_str())
        .collect();
    assert!(peers.contains(&"203.0.113.7"), "{peers:?}");
    assert!(peers.contains(&"203.0.113.8"), "{peers:?}");
    assert!(peers.contains(&"127.0.0.2"), "{peers:?}");
    assert!(
        !peers
            .iter()
            .any(|p| p.starts_with("198.51.100.") && *p != "198.51.100.0")
            && !peers.contains(&"10.1.2.3"),
        "{peers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_that_write_forwarded_are_read_from_forwarded_only() {
    let env = [
        ("KEYWARD_AUTH_MAX_FAILURES", "2"),
        ("KEYWARD_TRUSTED_PROXIES", "127.0.0.1"),
        ("KEYWARD_TRUSTED_PROXY_HEADER", "forwarded"),
    ];
    let app = TestApp::spawn_with(Backend::Sqlite, &env).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let body = json!({"encryptionId": enc, "data": "x"});
    let wrong = Creds {
        secret: "kws_wrong".into(),
        ..creds.clone()
    };
    let proxy = app.client.clone();
    let client = [("Forwarded", r#"for="[2001:db8::9]:4711";proto=https"#)];
    for _ in 0..2 {
        let (status, _) = post_from(&app, &proxy, &wrong, &client, &body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    let (status, resp) = post_from(&app, &proxy, &wrong, &client, &body).await;
    assert_error(status, &resp, 429, "too_many_failed_attempts");
    // The same /64 is the same client; another /64 is not.
    let same = [("Forwarded", "for=\"[2001:db8::ffff]\"")];
    let (status, _) = post_from(&app, &proxy, &wrong, &same, &body).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let other = [("Forwarded", "for=\"[2001:db8:0:1::9]\"")];
    let (status, _) = post_from(&app, &proxy, &wrong, &other, &body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // X-Forwarded-For is not the declared header: not read.
    let not_read = [("X-Forwarded-For", "2001:db8::9")];
    let (status, _) = post_from(&app, &proxy, &wrong, &not_read, &body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_trusted_proxy_list_is_a_startup_error_naming_the_setting() {
    let out = crate::helpers::keyward_command()
        .arg("serve")
        .env("KEYWARD_DATABASE_URL", "sqlite::memory:")
        .env("KEYWARD_MASTER_KEY", crate::helpers::random_master_key())
        .env("KEYWARD_TRUSTED_PROXIES", "10.0.0.0/33")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("KEYWARD_TRUSTED_PROXIES"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_credentials_are_rate_limited_per_address_by_default() {
    // Only the per-address connection cap (256) is raised, so that 300
    // requests at once from one address open their connections; the rate
    // limit under test keeps its default.
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[("KEYWARD_MAX_CONNECTIONS_PER_ADDRESS", "1024")],
    )
    .await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let body = json!({"encryptionId": enc, "data": "x"});
    // 300 at once: far over the default burst (5 s of 20 per second),
    // however slow the machine.
    let flood = (0..300).map(|_| app.client.post(app.url("/v1/encrypt")).json(&body).send());
    let mut limited = None;
    for resp in futures::future::join_all(flood).await {
        let resp = resp.unwrap();
        match resp.status() {
            StatusCode::TOO_MANY_REQUESTS => limited = Some(resp),
            status => assert_eq!(status, StatusCode::UNAUTHORIZED),
        }
    }
    let resp = limited.expect("a flood without credentials is rate limited by default");
    assert!(resp.headers().contains_key("retry-after"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limited");
    // Another address, and a caller with credentials, are not affected.
    let other = client_from("127.0.0.3");
    let resp = other.post(app.url("/v1/encrypt")).json(&body).send().await;
    assert_eq!(resp.unwrap().status(), StatusCode::UNAUTHORIZED);
    let (status, resp) = app.post("/v1/encrypt", &creds, &body).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_refused_requests_leaves_a_bounded_audit_and_a_visible_count() {
    let audit_dir = tempfile::tempdir().unwrap();
    let audit_file = audit_dir.path().join("audit.jsonl");
    let env = [
        ("KEYWARD_AUDIT_REFUSED_PER_MINUTE", "5"),
        // Let the flood through the other guards: the audit is the subject.
        ("KEYWARD_UNAUTHENTICATED_RATE_LIMIT", "0"),
        ("KEYWARD_AUTH_MAX_FAILURES", "100000"),
        ("KEYWARD_AUDIT_FILE", audit_file.to_str().unwrap()),
    ];
    let app = TestApp::spawn_with(Backend::Sqlite, &env).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let body = json!({"encryptionId": enc, "data": "x"});
    let before = audit_with_at_least(&audit_file, 1).await.len();
    let wrong = Creds {
        secret: "kws_wrong".into(),
        ..creds.clone()
    };
    let flood = 200;
    for i in 0..flood {
        let req = app.client.post(app.url("/v1/encrypt")).json(&body);
        let req = if i % 2 == 0 {
            req
        } else {
            req.header("X-Api-Key", &wrong.key)
                .header("X-Api-Secret", &wrong.secret)
        };
        assert_eq!(send(req).await.0, StatusCode::UNAUTHORIZED);
    }
    // Another address gets its own share; an authenticated call is always
    // recorded.
    let other = client_from("127.0.0.4");
    for _ in 0..3 {
        let resp = other.post(app.url("/v1/encrypt")).json(&body).send().await;
        assert_eq!(resp.unwrap().status(), StatusCode::UNAUTHORIZED);
    }
    app.encrypt(&creds, &enc, "recorded").await;
    let records = audit_with_at_least(&audit_file, before + 9).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let records = if audit_records(&audit_file).len() > records.len() {
        audit_records(&audit_file)
    } else {
        records
    };
    let new = &records[before..];
    let refused = |peer: &str| {
        new.iter()
            .filter(|r| r["actor"] == "unauthenticated" && r["peer"] == peer)
            .count()
    };
    assert_eq!(refused("127.0.0.1"), 5, "the first 5 per minute, in full");
    assert_eq!(refused("127.0.0.4"), 3);
    assert_eq!(new.len(), 5 + 3 + 1, "{new:?}");
    let unrecorded = counter(&app, "keyward_audit_refused_unrecorded_total").await;
    assert_eq!(unrecorded, f64::from(flood - 5), "the rest are counted");
    assert!(app.log_shows("the rest are counted").await);
}

async fn wrong_client_keys_for_one_encryption_are_bounded(backend: Backend) {
    let env = [
        ("KEYWARD_CLIENT_KEY_MAX_FAILURES", "3"),
        ("KEYWARD_CLIENT_KEY_LOCKOUT", "3s"),
    ];
    let app = TestApp::spawn_with(backend, &env).await;
    let creds = app.create_tenant("acme");
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.encode(rand_bytes::<32>());
    let call = |path: &'static str, k: String, body: Value| {
        let req = app
            .req(Method::POST, path, &creds)
            .header("X-Master-Key", k)
            .json(&body);
        send(req)
    };
    let create = |k: String| call("/v1/encryptions", k, json!({}));
    let (status, created) = create(key.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let enc = created["encryptionId"].as_str().unwrap().to_string();
    let (_, other) = create(key.clone()).await;
    let other = other["encryptionId"].as_str().unwrap().to_string();
    let (status, sealed) = call(
        "/v1/encrypt",
        key.clone(),
        json!({"encryptionId": enc, "data": "zk"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{sealed}");

    // Three wrong keys, over decrypt, encrypt and rotate...
    for (path, body) in [
        ("/v1/decrypt", decrypt_body(&sealed)),
        ("/v1/encrypt", json!({"encryptionId": enc, "data": "zk"})),
        ("/v1/rotate", json!({"encryptionId": enc})),
    ] {
        let guess = b64.encode(rand_bytes::<32>());
        let (status, resp) = call(path, guess, body).await;
        assert_error(status, &resp, 403, "master_key_mismatch");
    }
    // ...and every client-key call on that encryption waits, the right key's
    // too (a guesser cannot tell a hit from the refusal).
    for k in [b64.encode(rand_bytes::<32>()), key.clone()] {
        let req = app
            .req(Method::POST, "/v1/decrypt", &creds)
            .header("X-Master-Key", k)
            .json(&decrypt_body(&sealed));
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        let retry: u64 = resp.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=3).contains(&retry), "{retry}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "too_many_master_key_attempts");
    }
    // Another encryption is not affected.
    let (status, resp) = call(
        "/v1/encrypt",
        key.clone(),
        json!({"encryptionId": other, "data": "zk"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    tokio::time::sleep(Duration::from_millis(3200)).await;
    let (status, resp) = call("/v1/decrypt", key.clone(), decrypt_body(&sealed)).await;
    assert_eq!((status, resp), (StatusCode::OK, json!({"data": "zk"})));
    assert!(!app.log_text().contains(&key));
}

async fn another_tenants_id_is_answered_from_memory_like_an_unknown_one(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let a = app.create_tenant("a");
    let b = app.create_tenant("b");
    let (theirs, _) = app.create_encryption(&b).await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let answer = |id: String| {
        let app = &app;
        let a = a.clone();
        async move {
            app.post("/v1/encrypt", &a, &json!({"encryptionId": id, "data": "x"}))
                .await
        }
    };
    let (status, body) = answer(unknown.clone()).await;
    assert_error(status, &body, 404, "encryption_not_found");
    let (foreign_status, foreign_body) = answer(theirs.clone()).await;
    assert_eq!((foreign_status, &foreign_body), (status, &body));

    let before = counter(&app, "keyward_key_ring_negative_hits_total").await;
    for _ in 0..20 {
        assert_eq!(answer(theirs.clone()).await, (status, body.clone()));
    }
    let after = counter(&app, "keyward_key_ring_negative_hits_total").await;
    // At most one query in all (should the 10 s memory lapse mid-loop).
    assert!(
        after - before >= 19.0,
        "a query per request for a foreign id: {before} -> {after}"
    );
    // The owner is not affected by what was remembered for the others.
    app.encrypt(&b, &theirs, "mine").await;
}

async fn an_enabled_version_named_explicitly_stops_at_the_nonce_bound(backend: Backend) {
    let env = [
        ("KEYWARD_ROTATE_AFTER_ENCRYPTIONS", "3"),
        ("KEYWARD_MAX_ENCRYPTIONS_PER_VERSION", "4"),
        ("KEYWARD_MAINTENANCE_INTERVAL", "100ms"),
    ];
    let app = TestApp::spawn_with(backend, &env).await;
    let creds = app.create_tenant("acme");
    let (enc, first) = app.create_encryption(&creds).await;
    app.rotate(&creds, &enc).await;
    let named = json!({"encryptionId": enc, "data": "x", "encryptionVersionId": first});
    for _ in 0..4 {
        let (status, resp) = app.post("/v1/encrypt", &creds, &named).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
        assert_eq!(resp["encryptionVersionId"], first.as_str());
    }
    // The version is spent, for good: before its count is recorded (what this
    // replica counted itself) and after (what every replica counted).
    let (status, resp) = app.post("/v1/encrypt", &creds, &named).await;
    assert_error(status, &resp, 409, "version_exhausted");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, resp) = app.post("/v1/encrypt", &creds, &named).await;
    assert_error(status, &resp, 409, "version_exhausted");
    // Its ciphertexts still decrypt, and the active version still encrypts.
    let sealed = app.encrypt(&creds, &enc, "y").await;
    assert_ne!(sealed["encryptionVersionId"], first.as_str());
    let (status, _) = app.decrypt(&creds, &sealed).await;
    assert_eq!(status, StatusCode::OK);
}

async fn a_replica_stops_at_the_nonce_bound_when_its_count_is_not_recorded(backend: Backend) {
    // No flush for an hour: what a replica that cannot reach its database
    // sees. Its own count must stop it at the bound.
    let env = [
        ("KEYWARD_ROTATE_AFTER_ENCRYPTIONS", "5"),
        ("KEYWARD_MAX_ENCRYPTIONS_PER_VERSION", "5"),
        ("KEYWARD_MAINTENANCE_INTERVAL", "1h"),
    ];
    let mut app = TestApp::spawn_with(backend, &env).await;
    let creds = app.create_tenant("acme");
    let (enc, first) = app.create_encryption(&creds).await;
    let mut sealed = Vec::new();
    for _ in 0..5 {
        sealed.push(app.encrypt(&creds, &enc, "x").await);
    }
    let resp = app
        .req(Method::POST, "/v1/encrypt", &creds)
        .json(&json!({"encryptionId": enc, "data": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rotation_pending");
    assert!(!v.to_string().contains("database"), "{v}");
    // Decryption is not affected.
    let (status, body) = app.decrypt(&creds, &sealed[4]).await;
    assert_eq!((status, body), (StatusCode::OK, json!({"data": "x"})));

    // A clean stop records the count (and rotates the spent active version):
    // after a restart the old version is spent and a new one encrypts.
    app.stop();
    app.start();
    let sealed = app.encrypt(&creds, &enc, "z").await;
    assert_ne!(sealed["encryptionVersionId"], first.as_str());
    let named = json!({"encryptionId": enc, "data": "x", "encryptionVersionId": first});
    let (status, resp) = app.post("/v1/encrypt", &creds, &named).await;
    assert_error(status, &resp, 409, "version_exhausted");
}

async fn a_replica_whose_counts_the_database_refuses_stops_at_the_bound_then_resumes(
    backend: Backend,
) {
    use sqlx::Connection;
    let env = [
        ("KEYWARD_ROTATE_AFTER_ENCRYPTIONS", "5"),
        ("KEYWARD_MAX_ENCRYPTIONS_PER_VERSION", "6"),
        ("KEYWARD_MAINTENANCE_INTERVAL", "100ms"),
    ];
    let app = TestApp::spawn_with(backend, &env).await;
    let creds = app.create_tenant("acme");
    let (enc, first) = app.create_encryption(&creds).await;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&app.db.url).await.unwrap();
    let (refuse, accept): (&[&str], &str) = match backend {
        Backend::Sqlite => (
            &[
                "CREATE TRIGGER refuse_counts BEFORE UPDATE ON encryption_key_versions \
               BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
            ],
            "DROP TRIGGER refuse_counts",
        ),
        Backend::Postgres => (
            &[
                "CREATE FUNCTION refuse_counts() RETURNS trigger LANGUAGE plpgsql \
                 AS $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
                "CREATE TRIGGER refuse_counts BEFORE UPDATE ON encryption_key_versions \
                 FOR EACH ROW EXECUTE FUNCTION refuse_counts()",
            ],
            "DROP TRIGGER refuse_counts ON encryption_key_versions",
        ),
    };
    for sql in refuse {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
    for _ in 0..6 {
        app.encrypt(&creds, &enc, "x").await;
    }
    // The counts cannot be recorded: at the bound the replica stops on its
    // own, and stays stopped while the database refuses them.
    assert!(app.log_shows("could not flush use counts").await);
    for _ in 0..5 {
        let (status, resp) = app
            .post(
                "/v1/encrypt",
                &creds,
                &json!({"encryptionId": enc, "data": "x"}),
            )
            .await;
        assert_error(status, &resp, 503, "rotation_pending");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once the database takes them, the count is recorded, the spent version
    // rotated, and encryption resumes under a new version.
    sqlx::query(accept).execute(&mut conn).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, resp) = app
            .post(
                "/v1/encrypt",
                &creds,
                &json!({"encryptionId": enc, "data": "y"}),
            )
            .await;
        if status == StatusCode::OK {
            assert_ne!(resp["encryptionVersionId"], first.as_str());
            break;
        }
        assert_error(status, &resp, 503, "rotation_pending");
        assert!(std::time::Instant::now() < deadline, "never resumed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
