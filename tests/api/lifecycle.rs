//! Start, restart, shutdown and health.

use std::time::Duration;

use futures::StreamExt;
use reqwest::StatusCode;

use crate::helpers::{random_master_key, send, Backend, TestApp};

crate::on_both_databases!(
    restart_keeps_every_key,
    a_wrong_master_key_at_start_fails_with_a_clear_message,
    health_and_readiness_answer,
    sigterm_lets_requests_in_flight_finish,
);

async fn restart_keeps_every_key(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let first = app.encrypt(&creds, &enc, "before restart").await;
    app.rotate(&creds, &enc).await;
    let second = app.encrypt(&creds, &enc, "after rotate").await;

    app.restart();

    for (e, data) in [(&first, "before restart"), (&second, "after rotate")] {
        let (status, body) = app.decrypt(&creds, e).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"], data);
    }
    let third = app.encrypt(&creds, &enc, "after restart").await;
    assert_eq!(third["encryptionVersionId"], second["encryptionVersionId"]);
}

async fn a_wrong_master_key_at_start_fails_with_a_clear_message(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    app.create_encryption(&creds).await;
    app.stop();

    let right_key = app.master_key.clone();
    app.master_key = random_master_key();
    let out = app.serve_command().output().expect("run keyward");
    assert!(!out.status.success(), "started with the wrong master key");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("KEYWARD_MASTER_KEY does not match"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(&app.master_key) && !stderr.contains(&right_key),
        "the key is echoed"
    );

    // A malformed key is refused before anything else, naming the setting.
    app.master_key = "dG9vIHNob3J0".into();
    let out = app.serve_command().output().expect("run keyward");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("KEYWARD_MASTER_KEY") && stderr.contains("32"),
        "{stderr}"
    );

    // The right key still works.
    app.master_key = right_key;
    app.start();
    app.encrypt(&creds, &app.create_encryption(&creds).await.0, "ok")
        .await;
}

async fn health_and_readiness_answer(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let (status, body) = send(app.client.get(app.url("/healthz"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ok");
    let (status, body) = send(app.client.get(app.url("/readyz"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ready");
    let resp = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert!(resp.headers().contains_key("x-request-id"));

    // The served OpenAPI document is the checked-in one.
    let served = app.get_text("/openapi.json").await;
    let checked_in =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/keyward.json"))
            .unwrap();
    assert!(
        served == checked_in,
        "openapi/keyward.json differs from /openapi.json"
    );
}

async fn sigterm_lets_requests_in_flight_finish(backend: Backend) {
    let mut app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;

    // A request whose body arrives slowly is in flight when SIGTERM comes.
    let prefix = format!(r#"{{"encryptionId":"{enc}","data":""#);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(prefix.into_bytes()),
        Ok(b"slow ".to_vec()),
        Ok(b"request\"}".to_vec()),
    ];
    let stream = futures::stream::iter(chunks).then(|c| async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        c
    });
    let req = app
        .req(reqwest::Method::POST, "/v1/encrypt", &creds)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream));
    let in_flight = tokio::spawn(async move { send(req).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let child_pid = app.pid();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &child_pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["encryptionId"], enc.as_str());
    app.stop(); // waits for the clean exit
    let log = app.log_text();
    assert!(log.contains("shutting down"), "{log}");
}
