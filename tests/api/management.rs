//! Managing encryptions: create, list (paginated, own tenant only), show.

use std::collections::HashSet;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{Backend, TestApp};

crate::on_both_databases!(
    create_returns_201_with_the_first_active_version,
    list_pages_through_the_tenants_encryptions_only,
    no_response_ever_contains_key_material,
);

async fn create_returns_201_with_the_first_active_version(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (status, body) = app
        .post(
            "/v1/encryptions",
            &creds,
            &json!({"name": "customers.email", "algorithm": "AES-256-GCM"}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["encryptionId"].as_str().unwrap();
    uuid::Uuid::parse_str(id).unwrap();
    assert_eq!(body["name"], "customers.email");
    assert_eq!(body["algorithm"], "AES-256-GCM");
    assert_eq!(body["mode"], "platform");
    assert_eq!(body["latestVersion"], 1);
    let versions = body["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0]["versionId"], body["activeVersionId"]);
    assert_eq!(versions[0]["version"], 1);
    assert_eq!(versions[0]["state"], "active");
    assert!(versions[0]["createdAt"].as_str().unwrap().ends_with('Z'));

    let (status, shown) = app.get(&format!("/v1/encryptions/{id}"), &creds).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(shown, body, "GET shows what POST returned");

    // An empty body is fine too.
    let resp = app
        .req(reqwest::Method::POST, "/v1/encryptions", &creds)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
}

async fn list_pages_through_the_tenants_encryptions_only(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let acme = app.create_tenant("acme");
    let other = app.create_tenant("other");
    let mut created = vec![];
    for _ in 0..5 {
        created.push(app.create_encryption(&acme).await.0);
    }
    app.create_encryption(&other).await;

    let mut seen = vec![];
    let mut path = "/v1/encryptions?limit=2".to_string();
    let mut pages = 0;
    loop {
        let (status, page) = app.get(&path, &acme).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        pages += 1;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2);
        seen.extend(
            items
                .iter()
                .map(|i| i["encryptionId"].as_str().unwrap().to_string()),
        );
        match page["nextCursor"].as_str() {
            Some(c) => path = format!("/v1/encryptions?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), created.len(), "no duplicates across pages");
    assert_eq!(
        seen.iter().collect::<HashSet<_>>(),
        created.iter().collect::<HashSet<_>>(),
        "every encryption of the tenant, and only those"
    );

    let (_, all) = app.get("/v1/encryptions", &acme).await;
    assert_eq!(all["items"].as_array().unwrap().len(), 5);
    assert_eq!(all["nextCursor"], Value::Null);
}

fn walk<'a>(v: &'a Value, out: &mut Vec<(&'a str, &'a Value)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                out.push((k.as_str(), v));
                walk(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
        _ => {}
    }
}

async fn no_response_ever_contains_key_material(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    app.rotate(&creds, &enc).await;
    let (_, details) = app.get(&format!("/v1/encryptions/{enc}"), &creds).await;
    let (_, list) = app.get("/v1/encryptions", &creds).await;
    let allowed: HashSet<&str> = [
        "encryptionId",
        "name",
        "algorithm",
        "mode",
        "activeVersionId",
        "latestVersion",
        "createdAt",
        "updatedAt",
        "versions",
        "versionId",
        "version",
        "state",
        "rotatedAt",
        "items",
        "nextCursor",
        "autoRotatePeriod",
        "minDecryptionVersion",
        "encryptCount",
        "exportable",
        "imported",
        "keySize",
    ]
    .into();
    for body in [&details, &list] {
        let mut fields = vec![];
        walk(body, &mut fields);
        for (k, v) in fields {
            assert!(allowed.contains(k), "unexpected field {k} in {body}");
            if let Some(s) = v.as_str() {
                assert!(s.len() < 64, "suspiciously long value in {k}: {s}");
            }
        }
    }
}
