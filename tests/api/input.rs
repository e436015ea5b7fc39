//! Bad input: always a 4xx JSON error with a stable code; never a 500, a panic,
//! or an echo of a secret or plaintext.

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{assert_error, decrypt_body, send, Backend, TestApp};

crate::on_both_databases!(
    malformed_and_invalid_bodies_get_stable_4xx_codes,
    bodies_over_the_limit_get_413,
    unknown_routes_and_methods_get_json_errors,
    bad_pagination_and_path_ids_are_400,
    batch_items_refuse_a_field_given_twice_like_single_calls,
);

async fn malformed_and_invalid_bodies_get_stable_4xx_codes(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let encrypted = app.encrypt(&creds, &enc, "x").await;
    let secret_data = "TOP-SECRET-PLAINTEXT-7731";

    let raw = |path: &str, body: &'static str| {
        app.req(Method::POST, path, &creds)
            .header("content-type", "application/json")
            .body(body)
    };
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "not JSON",
            raw("/v1/encrypt", "{not json"),
            400,
            "malformed_json",
        ),
        (
            "truncated",
            raw("/v1/encrypt", r#"{"encryptionId": "#),
            400,
            "malformed_json",
        ),
        (
            "trailing garbage",
            raw("/v1/encrypt", r#"{"encryptionId":"x","data":"y"} z"#),
            400,
            "malformed_json",
        ),
        ("empty body", raw("/v1/encrypt", ""), 400, "invalid_request"),
        (
            "array body",
            raw("/v1/encrypt", "[]"),
            400,
            "invalid_request",
        ),
        (
            "lone surrogate",
            raw("/v1/encrypt", r#"{"encryptionId":"x","data":"\ud800"}"#),
            400,
            "malformed_json",
        ),
        (
            "wrong content type",
            app.req(Method::POST, "/v1/encrypt", &creds)
                .header("content-type", "text/plain")
                .body("{}"),
            415,
            "unsupported_media_type",
        ),
    ];
    for (what, req, status, code) in cases {
        let (s, body) = send(req).await;
        assert_error(s, &body, status, code);
        assert!(!body.to_string().contains("500"), "{what}: {body}");
    }

    let json_cases: Vec<(&str, &str, Value, u16, &str)> = vec![
        (
            "missing data",
            "/v1/encrypt",
            json!({"encryptionId": enc}),
            400,
            "invalid_request",
        ),
        (
            "missing id",
            "/v1/encrypt",
            json!({"data": secret_data}),
            400,
            "invalid_request",
        ),
        (
            "data not a string",
            "/v1/encrypt",
            json!({"encryptionId": enc, "data": 12345}),
            400,
            "invalid_request",
        ),
        (
            "data null",
            "/v1/encrypt",
            json!({"encryptionId": enc, "data": null}),
            400,
            "invalid_request",
        ),
        (
            "id not a UUID",
            "/v1/encrypt",
            json!({"encryptionId": secret_data, "data": "x"}),
            400,
            "invalid_request",
        ),
        (
            "id a number",
            "/v1/encrypt",
            json!({"encryptionId": 7, "data": "x"}),
            400,
            "invalid_request",
        ),
        (
            "version not a UUID",
            "/v1/encrypt",
            json!({"encryptionId": enc, "data": "x", "encryptionVersionId": "v1"}),
            400,
            "invalid_request",
        ),
        (
            "unknown field",
            "/v1/encrypt",
            json!({"encryptionId": enc, "data": "x", "encryptionID": enc}),
            400,
            "invalid_request",
        ),
        (
            "unknown encryption",
            "/v1/encrypt",
            json!({"encryptionId": uuid::Uuid::new_v4().to_string(), "data": secret_data}),
            404,
            "encryption_not_found",
        ),
        (
            "decrypt missing metadata",
            "/v1/decrypt",
            json!({"encryptionId": enc, "cipherText": encrypted["cipherText"], "encryptionVersionId": encrypted["encryptionVersionId"]}),
            400,
            "invalid_request",
        ),
        (
            "decrypt metadata not an object",
            "/v1/decrypt",
            json!({"encryptionId": enc, "cipherText": encrypted["cipherText"], "encryptionVersionId": encrypted["encryptionVersionId"], "metadata": "nonce"}),
            400,
            "invalid_request",
        ),
        (
            "decrypt bad base64",
            "/v1/decrypt",
            json!({"encryptionId": enc, "cipherText": "%%%not base64%%%", "encryptionVersionId": encrypted["encryptionVersionId"], "metadata": encrypted["metadata"]}),
            400,
            "invalid_request",
        ),
        (
            "decrypt missing version",
            "/v1/decrypt",
            json!({"encryptionId": enc, "cipherText": encrypted["cipherText"], "metadata": encrypted["metadata"]}),
            400,
            "invalid_request",
        ),
        (
            "decrypt unknown encryption",
            "/v1/decrypt",
            {
                let mut b = decrypt_body(&encrypted);
                b["encryptionId"] = json!(uuid::Uuid::new_v4().to_string());
                b
            },
            404,
            "encryption_not_found",
        ),
        (
            "rotate bad id",
            "/v1/rotate",
            json!({"encryptionId": "nope"}),
            400,
            "invalid_request",
        ),
        (
            "rotate unknown",
            "/v1/rotate",
            json!({"encryptionId": uuid::Uuid::new_v4().to_string()}),
            404,
            "encryption_not_found",
        ),
        (
            "create with bad algorithm",
            "/v1/encryptions",
            json!({"algorithm": "ROT13"}),
            400,
            "invalid_request",
        ),
        (
            "create with empty name",
            "/v1/encryptions",
            json!({"name": ""}),
            400,
            "invalid_request",
        ),
        (
            "create with unknown field",
            "/v1/encryptions",
            json!({"nme": "x"}),
            400,
            "invalid_request",
        ),
    ];
    for (what, path, body, status, code) in json_cases {
        let (s, resp) = app.post(path, &creds, &body).await;
        assert_error(s, &resp, status, code);
        let text = resp.to_string();
        assert!(
            !text.contains(secret_data),
            "{what}: the error echoes input: {text}"
        );
        assert!(!text.contains(&creds.secret), "{what}: {text}");
    }
    // The field is named in the message.
    let (_, resp) = app
        .post("/v1/encrypt", &creds, &json!({"encryptionId": enc}))
        .await;
    assert!(
        resp["error"]["message"].as_str().unwrap().contains("data"),
        "{resp}"
    );
    let (_, resp) = app
        .post(
            "/v1/encrypt",
            &creds,
            &json!({"encryptionId": "x", "data": "y"}),
        )
        .await;
    assert!(
        resp["error"]["message"]
            .as_str()
            .unwrap()
            .contains("encryptionId"),
        "{resp}"
    );

    // serde would take a struct's fields as an array in order; every body and
    // nested object must be a JSON object.
    for (path, body) in [
        ("/v1/encrypt", json!([enc, secret_data])),
        ("/v1/rotate", json!([enc])),
        ("/v1/encryptions", json!([null, null])),
        ("/v1/encrypt/batch", json!({"items": [[enc, secret_data]]})),
        (
            "/v1/encrypt/batch",
            json!({"items": [{"encryptionId": enc, "data": "a"}, "x"]}),
        ),
        (
            "/v1/jobs",
            json!({"kind": "reencrypt", "encryptionId": enc, "source": ["sqlite://x", "t", "id", "ct", "v", "m"]}),
        ),
    ] {
        let (status, resp) = app.post(path, &creds, &body).await;
        assert_error(status, &resp, 400, "invalid_request");
        assert!(!resp.to_string().contains(secret_data), "{resp}");
    }
    // A whole number written with a zero fraction is a whole number.
    let (status, resp) = app
        .req(Method::PATCH, &format!("/v1/encryptions/{enc}"), &creds)
        .json(&json!({"minDecryptionVersion": 1.0}))
        .send()
        .await
        .map(|r| (r.status(), r))
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{:?}", resp.text().await);
}

async fn bodies_over_the_limit_get_413(backend: Backend) {
    let app = TestApp::spawn_with(backend, &[("KEYWARD_MAX_BODY_BYTES", "4096")]).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let (status, body) = app
        .post(
            "/v1/encrypt",
            &creds,
            &json!({"encryptionId": enc, "data": "x".repeat(5000)}),
        )
        .await;
    assert_error(status, &body, 413, "payload_too_large");
    let (status, e) = app
        .post(
            "/v1/encrypt",
            &creds,
            &json!({"encryptionId": enc, "data": "x".repeat(3900)}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // Whatever encrypt accepted, decrypt and rewrap accept back, though base64
    // made it a third larger.
    let (status, d) = app.decrypt(&creds, &e).await;
    assert_eq!(status, StatusCode::OK, "{d}");
    assert_eq!(d["data"].as_str().unwrap().len(), 3900);
    let (status, r) = app
        .post("/v1/rewrap", &creds, &crate::helpers::decrypt_body(&e))
        .await;
    assert_eq!(status, StatusCode::OK, "{r}");
    let (status, body) = app
        .post(
            "/v1/decrypt",
            &creds,
            &json!({"encryptionId": enc, "cipherText": "A".repeat(200_000),
                "encryptionVersionId": e["encryptionVersionId"], "metadata": e["metadata"]}),
        )
        .await;
    assert_error(status, &body, 413, "payload_too_large");
}

async fn unknown_routes_and_methods_get_json_errors(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (status, body) = app.get("/v1/nothing-here", &creds).await;
    assert_error(status, &body, 404, "not_found");
    let (status, body) = app.get("/v1/encrypt", &creds).await;
    assert_error(status, &body, 405, "method_not_allowed");
    let (status, body) = send(app.client.delete(app.url("/v1/rotate"))).await;
    assert_error(status, &body, 405, "method_not_allowed");
}

async fn bad_pagination_and_path_ids_are_400(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    for query in [
        "limit=0",
        "limit=abc",
        "limit=100000",
        "cursor=garbage",
        "foo=bar",
    ] {
        let (status, body) = app.get(&format!("/v1/encryptions?{query}"), &creds).await;
        assert_error(status, &body, 400, "invalid_request");
    }
    let (status, body) = app.get("/v1/encryptions/not-a-uuid", &creds).await;
    assert_error(status, &body, 400, "invalid_request");
}

/// A field given twice (a second `data`, a second `nonce` in the metadata) is
/// refused by the single routes; a batch item, parsed by the same parser from
/// its own JSON text, is refused with the same code rather than silently
/// taking the last value.
async fn batch_items_refuse_a_field_given_twice_like_single_calls(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let encrypted = app.encrypt(&creds, &enc, "x").await;
    let raw = |path: &str, body: String| {
        app.req(Method::POST, path, &creds)
            .header("content-type", "application/json")
            .body(body)
    };
    let twice_data = format!(r#"{{"encryptionId":"{enc}","data":"a","data":"b"}}"#);
    let nonce = encrypted["metadata"]["nonce"].as_str().unwrap();
    let twice_nonce = format!(
        r#"{{"encryptionId":"{enc}","cipherText":{ct},"encryptionVersionId":{ver},"metadata":{{"nonce":"{nonce}","nonce":"{nonce}"}}}}"#,
        ct = encrypted["cipherText"],
        ver = encrypted["encryptionVersionId"],
    );
    let well_formed = decrypt_body(&encrypted).to_string();
    for (single, batch, item) in [
        ("/v1/encrypt", "/v1/encrypt/batch", &twice_data),
        ("/v1/decrypt", "/v1/decrypt/batch", &twice_nonce),
        ("/v1/rewrap", "/v1/rewrap/batch", &twice_nonce),
    ] {
        // The single route refuses it: invalid_request for a request field,
        // decryption_failed for the metadata (as any altered metadata is).
        let (s, body) = send(raw(single, item.clone())).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{single}: {body}");
        let code = body["error"]["code"].clone();
        let batch_body = format!(r#"{{"items":[{item},{well_formed}]}}"#);
        let batch_body = if batch == "/v1/encrypt/batch" {
            format!(r#"{{"items":[{item},{{"encryptionId":"{enc}","data":"ok"}}]}}"#)
        } else {
            batch_body
        };
        let (s, body) = send(raw(batch, batch_body)).await;
        assert_eq!(s, StatusCode::OK, "{batch}: {body}");
        let results = body["results"].as_array().unwrap();
        assert_eq!(results[0]["error"]["code"], code, "{batch}: {body}");
        assert!(results[1].get("error").is_none(), "{batch}: {body}");
    }
}
