//! Rate limits and brute-force lockout (per client address; see also
//! `guards.rs`).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{assert_error, Backend, Creds, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_lock_their_address_for_guesses_then_expire() {
    let env = [
        ("KEYWARD_AUTH_MAX_FAILURES", "3"),
        ("KEYWARD_AUTH_LOCKOUT", "2s"),
    ];
    let app = TestApp::spawn_with(Backend::Sqlite, &env).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let body = json!({"encryptionId": enc, "data": "x"});
    let wrong = Creds {
        secret: "kws_wrong".into(),
        ..creds.clone()
    };
    for _ in 0..3 {
        let (status, resp) = app.post("/v1/encrypt", &wrong, &body).await;
        assert_error(status, &resp, 401, "invalid_credentials");
    }
    // A further guess from the address is refused outright...
    let resp = app
        .req(reqwest::Method::POST, "/v1/encrypt", &wrong)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "too_many_failed_attempts");
    assert!(app.log_shows("client address locked out").await);
    assert!(!app.log_text().contains("kws_wrong"));
    // ...while the right secret is no guess and still works from it.
    let (status, _) = app.post("/v1/encrypt", &creds, &body).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (status, resp) = app.post("/v1/encrypt", &wrong, &body).await;
    assert_error(status, &resp, 401, "invalid_credentials");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_from_one_address_lock_that_address_for_guesses_not_for_right_secrets() {
    let env = [
        ("KEYWARD_AUTH_MAX_FAILURES", "3"),
        ("KEYWARD_AUTH_LOCKOUT", "2s"),
    ];
    let app = TestApp::spawn_with(Backend::Sqlite, &env).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let body = json!({"encryptionId": enc, "data": "x"});
    for i in 0..3 {
        let spray = Creds {
            key: format!("kw_{:024x}", i + 1),
            ..creds.clone()
        };
        let (status, _) = app.post("/v1/encrypt", &spray, &body).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }
    // The address is locked for guesses: any wrong secret, for any key id,
    // gets 429 until the lockout ends...
    let guess = Creds {
        secret: "kws_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
        ..creds.clone()
    };
    let (status, resp) = app.post("/v1/encrypt", &guess, &body).await;
    assert_error(status, &resp, 429, "too_many_failed_attempts");
    // ...but a right secret is not a guess: whoever else shares the address
    // (a NAT, a load balancer) earned the lockout, not the key's holder.
    assert_eq!(
        app.post("/v1/encrypt", &creds, &body).await.0,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        app.post("/v1/encrypt", &guess, &body).await.0,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_api_key_has_a_request_rate_limit() {
    let app = TestApp::spawn_with(Backend::Sqlite, &[("KEYWARD_RATE_LIMIT", "5")]).await;
    let creds = app.create_tenant("acme");
    let other = app.create_key(&creds.tenant_id, "encrypt,manage");
    let (enc, _) = app.create_encryption(&creds).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let body = json!({"encryptionId": enc, "data": "x"});
    let mut limited = None;
    for _ in 0..12 {
        let resp = app
            .req(reqwest::Method::POST, "/v1/encrypt", &creds)
            .json(&body)
            .send()
            .await
            .unwrap();
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(resp);
            break;
        }
    }
    let resp = limited.expect("12 requests at once exceed 5 per second");
    assert!(resp.headers().contains_key("retry-after"));
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limited");
    // Another key is not affected.
    assert_eq!(
        app.post("/v1/encrypt", &other, &body).await.0,
        StatusCode::OK
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        app.post("/v1/encrypt", &creds, &body).await.0,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_or_odd_request_id_is_replaced_not_recorded() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let kept = "k".repeat(128);
    let long = format!("long-{}", "x".repeat(100_000));
    let too_long = "y".repeat(129);
    let cases = [
        (kept.as_str(), true),
        ("checkout-7f3a:9/abc=", true),
        (long.as_str(), false),
        (too_long.as_str(), false),
        ("has space", false),
    ];
    let mut answered = Vec::new();
    for (sent, is_kept) in cases {
        let resp = app
            .req(reqwest::Method::POST, "/v1/encrypt", &creds)
            .header("x-request-id", sent)
            .json(&json!({"encryptionId": enc, "data": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
        if is_kept {
            assert_eq!(id, sent);
        } else {
            assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
        }
        answered.push(id);
    }

    // The audit records carry what was answered, never the refused ids.
    let (status, page) = app.get("/v1/audit?operation=encrypt", &creds).await;
    assert_eq!(status, StatusCode::OK);
    let mut recorded: Vec<String> = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["requestId"].as_str().unwrap().to_string())
        .collect();
    recorded.reverse();
    assert_eq!(recorded, answered);
    let log = app.log_text();
    assert!(!log.contains("xxxxxxxxxx") && !log.contains(&too_long));
}
