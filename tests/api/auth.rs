//! Identity, scopes and tenant isolation.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{assert_error, decrypt_body, send, Backend, Creds, TestApp};

crate::on_both_databases!(
    another_tenants_encryption_answers_exactly_like_an_unknown_one,
    each_route_needs_its_scope,
    missing_or_wrong_credentials_are_401,
    a_revoked_key_stops_working_on_a_running_server,
);

async fn another_tenants_encryption_answers_exactly_like_an_unknown_one(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let alice = app.create_tenant("alice");
    let bob = app.create_tenant("bob");
    let (enc, version) = app.create_encryption(&alice).await;
    let encrypted = app.encrypt(&alice, &enc, "alice's secret").await;
    let unknown = uuid::Uuid::new_v4().to_string();

    let decrypt_of = |id: &str| {
        let mut body = decrypt_body(&encrypted);
        body["encryptionId"] = json!(id);
        body
    };
    let calls: Vec<(&str, serde_json::Value, serde_json::Value)> = vec![
        (
            "/v1/encrypt",
            json!({"encryptionId": enc, "data": "x"}),
            json!({"encryptionId": unknown, "data": "x"}),
        ),
        (
            "/v1/encrypt",
            json!({"encryptionId": enc, "data": "x", "encryptionVersionId": version}),
            json!({"encryptionId": unknown, "data": "x", "encryptionVersionId": version}),
        ),
        ("/v1/decrypt", decrypt_of(&enc), decrypt_of(&unknown)),
        (
            "/v1/rotate",
            json!({"encryptionId": enc}),
            json!({"encryptionId": unknown}),
        ),
    ];
    for (path, foreign, missing) in calls {
        let (s1, b1) = app.post(path, &bob, &foreign).await;
        let (s2, b2) = app.post(path, &bob, &missing).await;
        assert_error(s1, &b1, 404, "encryption_not_found");
        assert_eq!(
            (s1, &b1),
            (s2, &b2),
            "{path}: foreign and unknown ids must answer alike"
        );
    }
    let (s1, b1) = app.get(&format!("/v1/encryptions/{enc}"), &bob).await;
    let (s2, b2) = app.get(&format!("/v1/encryptions/{unknown}"), &bob).await;
    assert_error(s1, &b1, 404, "encryption_not_found");
    assert_eq!((s1, b1), (s2, b2));

    let (_, list) = app.get("/v1/encryptions", &bob).await;
    assert_eq!(
        list["items"],
        json!([]),
        "bob sees none of alice's encryptions"
    );

    // Bob's rotate attempt changed nothing for alice.
    let (_, details) = app.get(&format!("/v1/encryptions/{enc}"), &alice).await;
    assert_eq!(details["versions"].as_array().unwrap().len(), 1);
    let (status, body) = app.decrypt(&alice, &encrypted).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["data"], "alice's secret");
}

async fn each_route_needs_its_scope(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let admin = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&admin).await;
    let encrypted = app.encrypt(&admin, &enc, "data").await;
    let enc_path = format!("/v1/encryptions/{enc}");

    struct Call {
        scope: &'static str,
        method: Method,
        path: String,
        body: Option<serde_json::Value>,
    }
    let calls = vec![
        Call {
            scope: "encrypt",
            method: Method::POST,
            path: "/v1/encrypt".into(),
            body: Some(json!({"encryptionId": enc, "data": "x"})),
        },
        Call {
            scope: "decrypt",
            method: Method::POST,
            path: "/v1/decrypt".into(),
            body: Some(decrypt_body(&encrypted)),
        },
        Call {
            scope: "rotate",
            method: Method::POST,
            path: "/v1/rotate".into(),
            body: Some(json!({"encryptionId": enc})),
        },
        Call {
            scope: "manage",
            method: Method::POST,
            path: "/v1/encryptions".into(),
            body: Some(json!({})),
        },
        Call {
            scope: "manage",
            method: Method::GET,
            path: "/v1/encryptions".into(),
            body: None,
        },
        Call {
            scope: "manage",
            method: Method::GET,
            path: enc_path.clone(),
            body: None,
        },
    ];
    let scoped: Vec<(&str, Creds)> = ["encrypt", "decrypt", "rotate", "manage", "admin"]
        .into_iter()
        .map(|s| (s, app.create_key(&admin.tenant_id, s)))
        .collect();
    for call in &calls {
        for (scope, creds) in &scoped {
            let mut req = app.req(call.method.clone(), &call.path, creds);
            if let Some(b) = &call.body {
                req = req.json(b);
            }
            let (status, body) = send(req).await;
            if *scope == call.scope {
                assert!(
                    status.is_success(),
                    "{scope} on {} {}: {status} {body}",
                    call.method,
                    call.path
                );
            } else {
                assert_error(status, &body, 403, "insufficient_scope");
                assert!(
                    body["error"]["message"]
                        .as_str()
                        .unwrap()
                        .contains(call.scope),
                    "{body}"
                );
            }
        }
    }
    // An automation key with rotate + manage can rotate and inspect but never read plaintext.
    let automation = app.create_key(&admin.tenant_id, "rotate,manage");
    app.rotate(&automation, &enc).await;
    let (status, _) = app.get(&enc_path, &automation).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = app.decrypt(&automation, &encrypted).await;
    assert_error(status, &body, 403, "insufficient_scope");
}

async fn missing_or_wrong_credentials_are_401(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let body = json!({"encryptionId": enc, "data": "x"});
    let url = app.url("/v1/encrypt");

    let (status, resp) = send(app.client.post(&url).json(&body)).await;
    assert_error(status, &resp, 401, "missing_credentials");

    let cases = [
        (Some(creds.key.as_str()), None),
        (None, Some(creds.secret.as_str())),
        (Some(creds.key.as_str()), Some("kws_wrong")),
        (
            Some("kw_000000000000000000000000"),
            Some(creds.secret.as_str()),
        ),
        (Some("not-a-key"), Some(creds.secret.as_str())),
        (Some(creds.key.as_str()), Some("")),
    ];
    for (key, secret) in cases {
        let mut req = app.client.post(&url).json(&body);
        if let Some(k) = key {
            req = req.header("X-Api-Key", k);
        }
        if let Some(s) = secret {
            req = req.header("X-Api-Secret", s);
        }
        let (status, resp) = send(req).await;
        assert_error(status, &resp, 401, "invalid_credentials");
        assert!(!resp.to_string().contains(&creds.secret));
    }
    // A non-ASCII header value is malformed, not absent.
    let req = app
        .client
        .post(&url)
        .json(&body)
        .header("X-Api-Key", creds.key.as_str())
        .header(
            "X-Api-Secret",
            reqwest::header::HeaderValue::from_bytes(b"\xff\xfe").unwrap(),
        );
    let (status, resp) = send(req).await;
    assert_error(status, &resp, 401, "invalid_credentials");
}

async fn a_revoked_key_stops_working_on_a_running_server(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let admin = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&admin).await;
    let key = app.create_key(&admin.tenant_id, "encrypt");
    app.encrypt(&key, &enc, "works").await; // now cached in the server

    let out = app.cli(&["apikey", "revoke", &key.key]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The server learns of the revocation through the change feed (100 ms here).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = app
            .post(
                "/v1/encrypt",
                &key,
                &json!({"encryptionId": enc, "data": "x"}),
            )
            .await;
        if status == StatusCode::UNAUTHORIZED {
            assert_error(status, &body, 401, "invalid_credentials");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "revoked key still accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Revoking twice is an error on stderr with a non-zero exit.
    let out = app.cli(&["apikey", "revoke", &key.key]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no live API key"));
}
