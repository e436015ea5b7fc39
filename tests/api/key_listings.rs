//! No API key can hide: every key listing pages to the end (the tenant's, the
//! operator's, the CLI's), a tenant holds a bounded number of live keys, and
//! the audit names every key made or revoked and every tenant created or
//! disabled.

use std::collections::HashSet;

use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{assert_error, send, Backend, Creds, TestApp};

crate::on_both_databases!(
    a_key_made_after_a_thousand_others_is_found_by_following_the_pages,
    a_tenant_gets_no_more_live_keys_than_the_cap_allows,
    the_audit_names_the_key_made_or_revoked_and_the_tenant_acted_on,
);

/// Makes `count` keys in `creds`' tenant over the API, a few at a time;
/// returns their ids.
async fn make_keys(app: &TestApp, creds: &Creds, count: usize) -> Vec<String> {
    futures::stream::iter(0..count)
        .map(|_| async {
            let (status, made) = app
                .post("/v1/api-keys", creds, &json!({"scopes": ["encrypt"]}))
                .await;
            assert_eq!(status, StatusCode::CREATED, "{made}");
            made["apiKey"].as_str().unwrap().to_string()
        })
        .buffer_unordered(8)
        .collect()
        .await
}

/// Every key id of a listing at `path`, following `nextCursor` to the end;
/// also the number of pages.
async fn follow_pages(app: &TestApp, path: &str, creds: &Creds) -> (Vec<String>, usize) {
    let mut ids = Vec::new();
    let mut pages = 0;
    let mut cursor: Option<String> = None;
    loop {
        let url = match &cursor {
            None => path.to_string(),
            Some(c) => format!(
                "{path}{}cursor={c}",
                if path.contains('?') { '&' } else { '?' }
            ),
        };
        let (status, page) = app.get(&url, creds).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        pages += 1;
        for item in page["items"].as_array().unwrap() {
            ids.push(item["apiKey"].as_str().unwrap().to_string());
        }
        match page["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return (ids, pages),
        }
        assert!(pages < 1000, "the pages never end");
    }
}

async fn a_key_made_after_a_thousand_others_is_found_by_following_the_pages(backend: Backend) {
    let app = TestApp::spawn_with(backend, &[("KEYWARD_MAX_API_KEYS_PER_TENANT", "1100")]).await;
    let operator = app.create_operator();
    let t = app.create_tenant("acme");
    let mut made = make_keys(&app, &t, 1001).await;
    // The backdoor: the newest key, made after a thousand others.
    let backdoor = make_keys(&app, &t, 1).await.remove(0);
    made.push(backdoor.clone());
    made.push(t.key.clone());

    // One page is never the whole story: it says where the next one starts.
    let (status, first) = app.get("/v1/api-keys?limit=1000", &t).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert_eq!(first["items"].as_array().unwrap().len(), 1000);
    assert!(first["nextCursor"].is_string(), "a full page has a cursor");
    assert!(!first.to_string().contains(&backdoor));

    let want: HashSet<String> = made.into_iter().collect();
    assert_eq!(want.len(), 1003);
    for (path, creds) in [
        ("/v1/api-keys".to_string(), &t),
        ("/v1/api-keys?limit=1000".to_string(), &t),
        ("/v1/api-keys?limit=7".to_string(), &t),
        (format!("/v1/tenants/{}/api-keys", t.tenant_id), &operator),
        (
            format!("/v1/tenants/{}/api-keys?limit=1000", t.tenant_id),
            &operator,
        ),
    ] {
        let (ids, pages) = follow_pages(&app, &path, creds).await;
        assert!(pages > 1, "{path}: one page");
        // Every key exactly once, oldest first, the backdoor last.
        assert_eq!(ids.len(), 1003, "{path}");
        assert_eq!(ids.iter().cloned().collect::<HashSet<_>>(), want, "{path}");
        assert_eq!(ids.first(), Some(&t.key), "{path}: oldest first");
        assert_eq!(ids.last(), Some(&backdoor), "{path}: newest last");
    }

    // The CLI follows the pages too.
    let out = app.cli(&["apikey", "list", "--tenant", &t.tenant_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["apiKey"]
                .as_str()
                .unwrap()
                .into()
        })
        .collect();
    assert_eq!(listed.len(), 1003);
    assert_eq!(listed.last(), Some(&backdoor));

    // Bad paging is a clear 400 that does not echo the value.
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("cursor=not-a-cursor", "cursor"),
        // Well-formed base64 of something that is not a cursor.
        ("cursor=MTIzOnNlY3JldA", "cursor"),
    ] {
        let (status, body) = app.get(&format!("/v1/api-keys?{query}"), &t).await;
        assert_error(status, &body, 400, "invalid_request");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{message}");
        assert!(!message.contains("not-a-cursor") && !message.contains("secret"));
    }
    // Another tenant's cursor shows nothing of that tenant: the listing stays
    // in the caller's tenant.
    let other = app.create_tenant("globex");
    let (_, page) = app.get("/v1/api-keys?limit=1", &t).await;
    let cursor = page["nextCursor"].as_str().unwrap();
    let (status, theirs) = app
        .get(&format!("/v1/api-keys?cursor={cursor}"), &other)
        .await;
    assert_eq!(status, StatusCode::OK, "{theirs}");
    let theirs = theirs.to_string();
    assert!(
        !want.iter().any(|k| theirs.contains(k.as_str())),
        "{theirs}"
    );

    // The tenants listing pages the same way.
    let (status, tenants) = app.get("/v1/tenants?limit=1", &operator).await;
    assert_eq!(status, StatusCode::OK, "{tenants}");
    assert_eq!(tenants["items"].as_array().unwrap().len(), 1);
    let next = tenants["nextCursor"].as_str().unwrap();
    let (_, rest) = app
        .get(&format!("/v1/tenants?limit=1&cursor={next}"), &operator)
        .await;
    assert_eq!(rest["items"][0]["tenantId"], other.tenant_id.as_str());
    assert!(rest["nextCursor"].is_null(), "{rest}");
}

async fn a_tenant_gets_no_more_live_keys_than_the_cap_allows(backend: Backend) {
    let app = TestApp::spawn_with(backend, &[("KEYWARD_MAX_API_KEYS_PER_TENANT", "5")]).await;
    let operator = app.create_operator();
    let t = app.create_tenant("acme");
    // Its first key counts: four more reach the cap, however they are asked
    // for at once.
    let body = json!({"scopes": ["encrypt"]});
    let tries = (0..12).map(|_| app.post("/v1/api-keys", &t, &body));
    let answers = futures::future::join_all(tries).await;
    let made = answers
        .iter()
        .filter(|(s, _)| *s == StatusCode::CREATED)
        .count();
    assert_eq!(made, 4, "{answers:?}");
    for (status, body) in answers.iter().filter(|(s, _)| *s != StatusCode::CREATED) {
        assert_error(*status, body, 409, "api_key_limit_reached");
    }
    // The same on the operator's route and with the CLI.
    let (status, body) = app
        .post(
            &format!("/v1/tenants/{}/api-keys", t.tenant_id),
            &operator,
            &json!({"scopes": ["encrypt"]}),
        )
        .await;
    assert_error(status, &body, 409, "api_key_limit_reached");
    let out = crate::helpers::keyward_command()
        .args([
            "apikey",
            "create",
            "--tenant",
            &t.tenant_id,
            "--scopes",
            "encrypt",
            "--json",
        ])
        .env("KEYWARD_DATABASE_URL", &app.db.url)
        .env("KEYWARD_MAX_API_KEYS_PER_TENANT", "5")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_api_keys_per_tenant"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, list) = app.get("/v1/api-keys", &t).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 5, "{list}");

    // A revoked key no longer counts: revoking one makes room for one.
    let victim = list["items"][4]["apiKey"].as_str().unwrap().to_string();
    let (status, body) =
        send(app.req(Method::POST, &format!("/v1/api-keys/{victim}/revoke"), &t)).await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    let (status, body) = app
        .post(
            &format!("/v1/tenants/{}/api-keys", t.tenant_id),
            &operator,
            &json!({"scopes": ["decrypt"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = app
        .post("/v1/api-keys", &t, &json!({"scopes": ["encrypt"]}))
        .await;
    assert_error(status, &body, 409, "api_key_limit_reached");
    // Another tenant has its own allowance.
    let other = app.create_tenant("globex");
    let (status, body) = app
        .post("/v1/api-keys", &other, &json!({"scopes": ["encrypt"]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
}

/// The audit records of `operation` that `creds` can read.
async fn records(app: &TestApp, creds: &Creds, operation: &str) -> Vec<Value> {
    let (status, page) = app
        .get(
            &format!("/v1/audit?operation={operation}&limit=1000"),
            creds,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["records"].as_array().unwrap().clone()
}

/// The one record in `records` whose `field` is `value`.
fn the_record<'a>(records: &'a [Value], field: &str, value: &str) -> &'a Value {
    let found: Vec<&Value> = records.iter().filter(|r| r[field] == value).collect();
    assert_eq!(found.len(), 1, "{field}={value} in {records:?}");
    found[0]
}

async fn the_audit_names_the_key_made_or_revoked_and_the_tenant_acted_on(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let operator = app.create_operator();
    let t = app.create_tenant("acme");

    // The tenant's admin makes a key and revokes it.
    let (status, own) = app
        .post(
            "/v1/api-keys",
            &t,
            &json!({"scopes": ["encrypt", "decrypt"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{own}");
    let own_key = own["apiKey"].as_str().unwrap().to_string();
    let (status, _) =
        send(app.req(Method::POST, &format!("/v1/api-keys/{own_key}/revoke"), &t)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // The operator makes one in the tenant and revokes it.
    let (status, op) = app
        .post(
            &format!("/v1/tenants/{}/api-keys", t.tenant_id),
            &operator,
            &json!({"scopes": ["rotate", "manage"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{op}");
    let op_key = op["apiKey"].as_str().unwrap().to_string();
    let (status, _) = send(app.req(
        Method::POST,
        &format!("/v1/tenants/{}/api-keys/{op_key}/revoke", t.tenant_id),
        &operator,
    ))
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    // The operator creates a tenant and disables it.
    let (status, made) = app
        .post("/v1/tenants", &operator, &json!({"name": "globex"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let globex = made["tenantId"].as_str().unwrap().to_string();
    let (status, _) = send(app.req(
        Method::POST,
        &format!("/v1/tenants/{globex}/disable"),
        &operator,
    ))
    .await;
    assert_eq!(status, StatusCode::OK);

    // The tenant's admin and the operator both see every change to the
    // tenant's keys, each naming the key acted on and, when made, its scopes.
    for reader in [&t, &operator] {
        let created = records(&app, reader, "api_key.create").await;
        let r = the_record(&created, "targetApiKeyId", &own_key);
        assert_eq!(r["apiKeyId"], t.key.as_str());
        assert_eq!(r["tenantId"], t.tenant_id.as_str());
        assert_eq!(r["scopes"], "encrypt,decrypt");
        assert_eq!(r["outcome"], "ok");
        let r = the_record(&created, "targetApiKeyId", &op_key);
        assert_eq!(r["apiKeyId"], operator.key.as_str());
        assert_eq!(r["tenantId"], t.tenant_id.as_str());
        assert_eq!(r["scopes"], "rotate,manage");
        let revoked = records(&app, reader, "api_key.revoke").await;
        let r = the_record(&revoked, "targetApiKeyId", &own_key);
        assert_eq!(r["apiKeyId"], t.key.as_str());
        assert!(r.get("scopes").is_none(), "{r}");
        let r = the_record(&revoked, "targetApiKeyId", &op_key);
        assert_eq!(r["apiKeyId"], operator.key.as_str());
        assert_eq!(r["tenantId"], t.tenant_id.as_str());
    }
    // Tenants created and disabled are named in the operator's view.
    let r = records(&app, &operator, "tenant.create").await;
    assert_eq!(the_record(&r, "tenantId", &globex)["outcome"], "ok");
    let r = records(&app, &operator, "tenant.disable").await;
    assert_eq!(the_record(&r, "tenantId", &globex)["outcome"], "ok");

    // A refused revoke names the key asked for only if it has a key id's
    // form; made-up text is never recorded.
    let (status, body) =
        send(app.req(Method::POST, "/v1/api-keys/not-a-key-secret/revoke", &t)).await;
    assert_error(status, &body, 404, "api_key_not_found");

    // No secret and no digest anywhere in the audit.
    let (_, all) = app.get("/v1/audit?limit=1000", &operator).await;
    let text = all.to_string();
    for secret in [&t.secret, &operator.secret] {
        assert!(!text.contains(secret.as_str()));
    }
    for secret in [&own["apiSecret"], &op["apiSecret"]] {
        assert!(!text.contains(secret.as_str().unwrap()));
    }
    assert!(!text.contains("not-a-key-secret"), "{text}");
}
