//! Two kinds of identity: an operator key runs the service and touches no
//! tenant's keys or data; a tenant key, however scoped, acts inside its own
//! tenant and sees nothing of another. Tenants and API keys over the API;
//! revocation and disabling reach every replica.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

use crate::helpers::{assert_error, send, Backend, Creds, TestApp};

crate::on_both_databases!(
    a_tenant_create_key_cannot_rotate_the_root_kek_nor_read_other_tenants_audit,
    a_tenant_key_finds_nothing_of_another_tenant_anywhere,
    an_operator_key_is_refused_on_every_tenant_data_route,
    a_tenant_admin_makes_keys_only_with_scopes_it_holds_and_lists_no_secrets,
    an_operator_manages_tenants_and_their_keys_over_the_api,
    a_revoked_key_and_a_disabled_tenant_stop_working_on_every_replica,
    a_second_root_kek_rotation_waits_for_the_first,
    the_cli_lists_keys_without_secrets_and_disables_a_tenant_on_a_running_server,
    a_database_from_before_operator_keys_upgrades_and_its_keys_stay_in_their_tenant,
);

/// Everything a tenant has that another must never see.
struct Tenant {
    creds: Creds,
    name: String,
    encryption: String,
    version: String,
    encrypted: Value,
    job: String,
}

impl Tenant {
    /// A tenant with an encryption, a ciphertext and a (cancelled) job over
    /// `platform` (registered by [`spawn_with_platform`]).
    async fn new(app: &TestApp, platform: &crate::jobs::Platform, name: &str) -> Tenant {
        let creds = app.create_tenant(name);
        let (encryption, version) = app.create_encryption(&creds).await;
        let encrypted = app.encrypt(&creds, &encryption, "tenant-secret").await;
        let (status, body) = app
            .post(
                "/v1/jobs",
                &creds,
                &json!({"kind": "reencrypt", "encryptionId": encryption, "source": platform.source()}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        Tenant {
            name: name.to_string(),
            job: body["jobId"].as_str().unwrap().to_string(),
            creds,
            encryption,
            version,
            encrypted,
        }
    }

    /// Every identifier of this tenant's.
    fn identifiers(&self) -> Vec<&str> {
        vec![
            &self.creds.tenant_id,
            &self.creds.key,
            &self.name,
            &self.encryption,
            &self.version,
            &self.job,
        ]
    }
}

/// Keyward with one platform database registered as job source `platform`
/// for the tenants `alpha` and `bravo`.
async fn spawn_with_platform(backend: Backend) -> (TestApp, crate::jobs::Platform) {
    let platform = crate::jobs::Platform::new(backend).await;
    let (k, v) = platform.sources_env(&["alpha", "bravo"]);
    let app = TestApp::spawn_with(backend, &[(k, v.as_str())]).await;
    (app, platform)
}

/// Asserts that `body` names nothing of `tenant`'s.
fn reveals_nothing_of(body: &Value, tenant: &Tenant, what: &str) {
    let text = body.to_string();
    for id in tenant.identifiers() {
        assert!(!text.contains(id), "{what} reveals {id}: {text}");
    }
}

async fn call(
    app: &TestApp,
    method: Method,
    path: &str,
    creds: &Creds,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = app.req(method, path, creds);
    if let Some(b) = body {
        req = req.json(&b);
    }
    send(req).await
}

/// Every operator route, with a body where it takes one, aimed at `tenant`.
fn operator_routes(tenant: &Tenant) -> Vec<(Method, String, Option<Value>)> {
    let t = &tenant.creds.tenant_id;
    vec![
        (Method::GET, "/v1/tenants".into(), None),
        (
            Method::POST,
            "/v1/tenants".into(),
            Some(json!({"name": "mallory"})),
        ),
        (Method::POST, format!("/v1/tenants/{t}/disable"), None),
        (Method::GET, format!("/v1/tenants/{t}/api-keys"), None),
        (
            Method::POST,
            format!("/v1/tenants/{t}/api-keys"),
            Some(json!({"scopes": ["encrypt", "decrypt", "admin"]})),
        ),
        (
            Method::POST,
            format!("/v1/tenants/{t}/api-keys/{}/revoke", tenant.creds.key),
            None,
        ),
        (Method::GET, "/v1/admin/root-kek".into(), None),
        (Method::POST, "/v1/admin/root-kek/rotate".into(), None),
        (Method::GET, "/v1/admin/client-certificates".into(), None),
    ]
}

/// Polls until `creds` are refused on `app` with 401 (at most 10 s).
async fn refused_soon(app: &TestApp, creds: &Creds, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = app.get("/v1/encryptions", creds).await;
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(body["error"]["code"], "invalid_credentials");
            return;
        }
        assert!(Instant::now() < deadline, "{what}: still {status} {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn a_tenant_create_key_cannot_rotate_the_root_kek_nor_read_other_tenants_audit(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let a = app.create_tenant("alpha");
    let b = app.create_tenant("bravo");
    let (b_enc, _) = app.create_encryption(&b).await;
    app.encrypt(&b, &b_enc, "bravo-data").await;

    // `tenant create`'s key has every tenant scope, and nothing service-wide.
    let (status, body) = app.post("/v1/admin/root-kek/rotate", &a, &json!({})).await;
    assert_error(status, &body, 403, "insufficient_scope");
    let (status, body) = app.get("/v1/admin/root-kek", &a).await;
    assert_error(status, &body, 403, "insufficient_scope");

    // Its audit holds its own records only, whatever it filters on.
    let (status, mine) = app.get("/v1/audit?limit=1000", &a).await;
    assert_eq!(status, StatusCode::OK, "{mine}");
    for r in mine["records"].as_array().unwrap() {
        assert_eq!(r["tenantId"], a.tenant_id.as_str(), "{r}");
    }
    for query in [
        format!("tenantId={}", b.tenant_id),
        format!("encryptionId={b_enc}"),
        format!("tenantId={}", b.tenant_id.to_uppercase()),
    ] {
        let (status, page) = app.get(&format!("/v1/audit?{query}"), &a).await;
        assert_eq!(status, StatusCode::OK, "{query}: {page}");
        assert_eq!(page["records"], json!([]), "{query}");
        assert!(!page.to_string().contains(&b_enc), "{query}");
    }
    // A tenant that does not exist answers exactly like B.
    let (_, unknown) = app
        .get(&format!("/v1/audit?tenantId={}", uuid::Uuid::new_v4()), &a)
        .await;
    assert_eq!(unknown, json!({"records": [], "nextCursor": null}));

    // Nobody writes into B's audit by naming B in a path: not A, not a caller
    // without credentials.
    let disable = format!("/v1/tenants/{}/disable", b.tenant_id);
    let (status, _) = send(app.client.post(app.url(&disable))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = app.post(&disable, &a, &json!({})).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, theirs) = app.get("/v1/audit?operation=tenant.disable", &b).await;
    assert_eq!(theirs["records"], json!([]), "{theirs}");

    // B's records are there, for B and for an operator.
    let (_, theirs) = app.get("/v1/audit?operation=encrypt", &b).await;
    assert_eq!(theirs["records"].as_array().unwrap().len(), 1, "{theirs}");
    let operator = app.create_operator();
    let (_, all) = app
        .get(
            "/v1/audit?operation=encryption.create&limit=1000",
            &operator,
        )
        .await;
    let tenants: std::collections::BTreeSet<&str> = all["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["tenantId"].as_str())
        .collect();
    assert_eq!(tenants.len(), 1, "{all}");
    assert!(tenants.contains(b.tenant_id.as_str()));
}

async fn a_tenant_key_finds_nothing_of_another_tenant_anywhere(backend: Backend) {
    let (app, platform) = spawn_with_platform(backend).await;
    let a = Tenant::new(&app, &platform, "alpha").await;
    let b = Tenant::new(&app, &platform, "bravo").await;
    let (b_enc, b_ver, b_job) = (&b.encryption, &b.version, &b.job);

    // Each of B's resources, with A's full-scope key: 404, nothing of B.
    let mut on_b: Vec<(Method, String, Option<Value>)> = vec![
        (
            Method::POST,
            "/v1/encrypt".into(),
            Some(json!({"encryptionId": b_enc, "data": "x"})),
        ),
        (
            Method::POST,
            "/v1/encrypt".into(),
            Some(json!({"encryptionId": b_enc, "encryptionVersionId": b_ver, "data": "x"})),
        ),
        (
            Method::POST,
            "/v1/decrypt".into(),
            Some(crate::helpers::decrypt_body(&b.encrypted)),
        ),
        (
            Method::POST,
            "/v1/rewrap".into(),
            Some(crate::helpers::decrypt_body(&b.encrypted)),
        ),
        (
            Method::POST,
            "/v1/rotate".into(),
            Some(json!({"encryptionId": b_enc})),
        ),
        (Method::GET, format!("/v1/encryptions/{b_enc}"), None),
        (
            Method::PATCH,
            format!("/v1/encryptions/{b_enc}"),
            Some(json!({"autoRotatePeriod": null})),
        ),
        (
            Method::PATCH,
            format!("/v1/encryptions/{b_enc}/versions/{b_ver}"),
            Some(json!({"state": "disabled"})),
        ),
        (Method::GET, format!("/v1/jobs/{b_job}"), None),
        (Method::POST, format!("/v1/jobs/{b_job}/cancel"), None),
        (
            Method::POST,
            "/v1/jobs".into(),
            Some(
                json!({"kind": "reencrypt", "encryptionId": b_enc, "source": crate::jobs::Platform::new(backend).await.source()}),
            ),
        ),
        (
            Method::POST,
            format!("/v1/api-keys/{}/revoke", b.creds.key),
            None,
        ),
    ];
    for (method, path, body) in on_b.drain(..) {
        let what = format!("{method} {path}");
        let (status, answer) = call(&app, method, &path, &a.creds, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{what}: {answer}");
        reveals_nothing_of(&answer, &b, &what);
    }
    // Batches answer per item, the same way.
    let (status, answer) = app
        .post(
            "/v1/decrypt/batch",
            &a.creds,
            &json!({"items": [crate::helpers::decrypt_body(&b.encrypted)]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        answer["results"][0]["error"]["code"],
        "encryption_not_found"
    );
    reveals_nothing_of(&answer, &b, "decrypt batch");

    // Listings show A's own things only.
    for path in [
        "/v1/encryptions",
        "/v1/jobs",
        "/v1/api-keys",
        "/v1/audit?limit=1000",
    ] {
        let (status, answer) = app.get(path, &a.creds).await;
        assert_eq!(status, StatusCode::OK, "{path}: {answer}");
        if path.starts_with("/v1/audit") {
            // A's own records name the ids A sent (B's encryption and API
            // key ids, above), as A's requests; nothing B did or owns.
            let text = answer.to_string();
            for id in [&b.creds.tenant_id, &b.name] {
                assert!(!text.contains(id.as_str()), "{path} reveals {id}");
            }
            // B's key id only where A named it: the revoke A tried.
            for record in answer["records"].as_array().unwrap() {
                if record.to_string().contains(b.creds.key.as_str()) {
                    assert_eq!(record["apiKeyId"], a.creds.key.as_str(), "{record}");
                    assert_eq!(record["operation"], "api_key.revoke", "{record}");
                    assert_eq!(record["targetApiKeyId"], b.creds.key.as_str());
                }
            }
        } else {
            reveals_nothing_of(&answer, &b, path);
        }
        assert!(
            answer.to_string().contains(&a.encryption) || path == "/v1/api-keys",
            "{path}"
        );
    }

    // Every operator route: 403, nothing of B, and nothing changed.
    for (method, path, body) in operator_routes(&b) {
        let what = format!("{method} {path}");
        let (status, answer) = call(&app, method, &path, &a.creds, body).await;
        assert_error(status, &answer, 403, "insufficient_scope");
        reveals_nothing_of(&answer, &b, &what);
    }
    // B is untouched: its key works and its data decrypts.
    let (status, answer) = app.decrypt(&b.creds, &b.encrypted).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["data"], "tenant-secret");
    let operator = app.create_operator();
    let (_, tenants) = app.get("/v1/tenants", &operator).await;
    let names: Vec<&str> = tenants["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alpha", "bravo"], "no tenant was made by A");
    assert!(tenants["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["disabledAt"].is_null()));
}

async fn an_operator_key_is_refused_on_every_tenant_data_route(backend: Backend) {
    let (app, platform) = spawn_with_platform(backend).await;
    let t = Tenant::new(&app, &platform, "alpha").await;
    let operator = app.create_operator();
    let (enc, ver, job) = (&t.encryption, &t.version, &t.job);
    let routes: Vec<(Method, String, Option<Value>)> = vec![
        (
            Method::POST,
            "/v1/encrypt".into(),
            Some(json!({"encryptionId": enc, "data": "x"})),
        ),
        (
            Method::POST,
            "/v1/decrypt".into(),
            Some(crate::helpers::decrypt_body(&t.encrypted)),
        ),
        (
            Method::POST,
            "/v1/rotate".into(),
            Some(json!({"encryptionId": enc})),
        ),
        (
            Method::POST,
            "/v1/rewrap".into(),
            Some(crate::helpers::decrypt_body(&t.encrypted)),
        ),
        (
            Method::POST,
            "/v1/encrypt/batch".into(),
            Some(json!({"items": []})),
        ),
        (
            Method::POST,
            "/v1/decrypt/batch".into(),
            Some(json!({"items": []})),
        ),
        (
            Method::POST,
            "/v1/rewrap/batch".into(),
            Some(json!({"items": []})),
        ),
        (Method::GET, "/v1/encryptions".into(), None),
        (Method::POST, "/v1/encryptions".into(), Some(json!({}))),
        (Method::GET, format!("/v1/encryptions/{enc}"), None),
        (
            Method::PATCH,
            format!("/v1/encryptions/{enc}"),
            Some(json!({})),
        ),
        (
            Method::PATCH,
            format!("/v1/encryptions/{enc}/versions/{ver}"),
            Some(json!({"state": "disabled"})),
        ),
        (Method::GET, "/v1/jobs".into(), None),
        (Method::POST, "/v1/jobs".into(), Some(json!({}))),
        (Method::GET, format!("/v1/jobs/{job}"), None),
        (Method::POST, format!("/v1/jobs/{job}/cancel"), None),
        (Method::GET, "/v1/api-keys".into(), None),
        (
            Method::POST,
            "/v1/api-keys".into(),
            Some(json!({"scopes": ["encrypt"]})),
        ),
        (
            Method::POST,
            format!("/v1/api-keys/{}/revoke", t.creds.key),
            None,
        ),
    ];
    for (method, path, body) in routes {
        let what = format!("{method} {path}");
        let (status, answer) = call(&app, method, &path, &operator, body).await;
        assert_error(status, &answer, 403, "tenant_key_required");
        reveals_nothing_of(&answer, &t, &what);
    }
    // The tenant's key still works: nothing was revoked or changed.
    let (status, _) = app.decrypt(&t.creds, &t.encrypted).await;
    assert_eq!(status, StatusCode::OK);
    // A read-only audit operator key reads audit and nothing else.
    let out = app.cli(&["operator-key", "create", "--scopes", "audit", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["scopes"], json!(["audit"]));
    let siem = Creds {
        tenant_id: String::new(),
        key: v["apiKey"].as_str().unwrap().into(),
        secret: v["apiSecret"].as_str().unwrap().into(),
    };
    let query = format!("/v1/audit?operation=encrypt&tenantId={}", t.creds.tenant_id);
    let (status, page) = app.get(&query, &siem).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(page["records"][0]["tenantId"], t.creds.tenant_id.as_str());
    let (status, body) = app.get("/v1/tenants", &siem).await;
    assert_error(status, &body, 403, "insufficient_scope");
    // The CLI refuses to mix the kinds.
    let out = app.cli(&["operator-key", "create", "--scopes", "operator,decrypt"]);
    assert!(!out.status.success());
    let out = app.cli(&[
        "apikey",
        "create",
        "--tenant",
        &t.creds.tenant_id,
        "--scopes",
        "encrypt,operator",
    ]);
    assert!(!out.status.success());
}

async fn a_tenant_admin_makes_keys_only_with_scopes_it_holds_and_lists_no_secrets(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let t = app.create_tenant("alpha");
    let (enc, _) = app.create_encryption(&t).await;
    // An admin that can encrypt but not decrypt.
    let limited = app.create_key(&t.tenant_id, "admin,encrypt");
    for (scopes, status, code) in [
        (json!(["decrypt"]), 403, "scope_not_held"),
        (json!(["encrypt", "manage"]), 403, "scope_not_held"),
        (json!(["operator"]), 422, "invalid_scopes"),
        (json!(["audit"]), 422, "invalid_scopes"),
        (json!(["root"]), 400, "invalid_request"),
        (json!([]), 400, "invalid_request"),
    ] {
        let (got, body) = app
            .post("/v1/api-keys", &limited, &json!({"scopes": scopes}))
            .await;
        assert_error(got, &body, status, code);
    }
    let (status, made) = app
        .post("/v1/api-keys", &limited, &json!({"scopes": ["encrypt"]}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    assert_eq!(made["scopes"], json!(["encrypt"]));
    assert_eq!(made["tenantId"], t.tenant_id.as_str());
    let child = Creds {
        tenant_id: t.tenant_id.clone(),
        key: made["apiKey"].as_str().unwrap().into(),
        secret: made["apiSecret"].as_str().unwrap().into(),
    };
    app.encrypt(&child, &enc, "x").await;
    let (status, body) = app.get("/v1/encryptions", &child).await;
    assert_error(status, &body, 403, "insufficient_scope");
    // A key without admin cannot make keys at all.
    let (status, body) = app
        .post("/v1/api-keys", &child, &json!({"scopes": ["encrypt"]}))
        .await;
    assert_error(status, &body, 403, "insufficient_scope");
    // A bad binding is a clear 400.
    let (status, body) = app
        .post(
            "/v1/api-keys",
            &t,
            &json!({"scopes": ["encrypt"], "certificateSpkiSha256": "zz"}),
        )
        .await;
    assert_error(status, &body, 400, "invalid_request");
    let spki = "ab".repeat(32);
    let (status, bound) = app
        .post(
            "/v1/api-keys",
            &t,
            &json!({"scopes": ["encrypt"], "certificateSpkiSha256": spki}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{bound}");
    assert_eq!(bound["certificateSpkiSha256"], spki.as_str());

    // The listing: every key of the tenant, never a secret or digest.
    let (status, list) = app.get("/v1/api-keys", &t).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let items = list["items"].as_array().unwrap();
    assert_eq!(items.len(), 4, "{list}");
    let text = list.to_string();
    for secret in [
        &t.secret,
        &limited.secret,
        &child.secret,
        &bound["apiSecret"].as_str().unwrap().to_string(),
    ] {
        assert!(!text.contains(secret.as_str()), "a secret is listed");
    }
    for item in items {
        let mut fields: Vec<&str> = item
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        fields.sort();
        assert_eq!(
            fields,
            [
                "apiKey",
                "certificateSpkiSha256",
                "createdAt",
                "revokedAt",
                "scopes",
                "tenantId"
            ]
        );
    }
    // No stored digest appears either.
    let digests = stored_digests(&app).await;
    assert!(!digests.is_empty());
    for d in digests {
        assert!(!text.to_lowercase().contains(&d), "a digest is listed");
    }

    // Revoking its own keys: the key stops working.
    let (status, body) = call(
        &app,
        Method::POST,
        &format!("/v1/api-keys/{}/revoke", child.key),
        &t,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    refused_soon(&app, &child, "revoked child").await;
    let (status, body) = call(
        &app,
        Method::POST,
        &format!("/v1/api-keys/{}/revoke", child.key),
        &t,
        None,
    )
    .await;
    assert_error(status, &body, 404, "api_key_not_found");
    let (_, list) = app.get("/v1/api-keys", &t).await;
    let revoked = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["apiKey"] == child.key.as_str())
        .unwrap();
    assert!(revoked["revokedAt"].is_string());
}

/// Hex of every secret digest in the database.
async fn stored_digests(app: &TestApp) -> Vec<String> {
    use sqlx::{Connection, Row};
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&app.db.url).await.unwrap();
    sqlx::query("SELECT secret_sha256 FROM api_keys")
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .iter()
        .map(|r| {
            let d: Vec<u8> = r.get(0);
            d.iter().map(|b| format!("{b:02x}")).collect()
        })
        .collect()
}

async fn an_operator_manages_tenants_and_their_keys_over_the_api(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let operator = app.create_operator();
    let (status, tenant) = app
        .post("/v1/tenants", &operator, &json!({"name": "globex"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{tenant}");
    assert!(tenant["disabledAt"].is_null());
    let id = tenant["tenantId"].as_str().unwrap().to_string();
    let (status, body) = app
        .post("/v1/tenants", &operator, &json!({"name": "globex"}))
        .await;
    assert_error(status, &body, 409, "tenant_exists");
    let (status, body) = app
        .post("/v1/tenants", &operator, &json!({"name": " "}))
        .await;
    assert_error(status, &body, 400, "invalid_request");

    // A key for it, with every tenant scope: it works inside the tenant.
    let path = format!("/v1/tenants/{id}/api-keys");
    let (status, body) = app
        .post(
            &path,
            &operator,
            &json!({"scopes": ["encrypt", "operator"]}),
        )
        .await;
    assert_error(status, &body, 422, "invalid_scopes");
    let (status, made) = app
        .post(
            &path,
            &operator,
            &json!({"scopes": ["encrypt", "decrypt", "rotate", "manage", "admin"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{made}");
    let creds = Creds {
        tenant_id: id.clone(),
        key: made["apiKey"].as_str().unwrap().into(),
        secret: made["apiSecret"].as_str().unwrap().into(),
    };
    let (enc, _) = app.create_encryption(&creds).await;
    let encrypted = app.encrypt(&creds, &enc, "globex-data").await;
    assert_eq!(app.decrypt(&creds, &encrypted).await.0, StatusCode::OK);

    // Listing it: no secret.
    let (status, list) = app.get(&path, &operator).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["items"][0]["apiKey"], creds.key.as_str());
    assert!(!list.to_string().contains(&creds.secret));
    // Unknown tenants and keys are 404; a malformed id 400.
    let unknown = uuid::Uuid::new_v4();
    let (status, body) = app
        .get(&format!("/v1/tenants/{unknown}/api-keys"), &operator)
        .await;
    assert_error(status, &body, 404, "tenant_not_found");
    let (status, body) = app.get("/v1/tenants/not-a-uuid/api-keys", &operator).await;
    assert_error(status, &body, 400, "invalid_request");
    let (status, body) = app
        .post(
            &format!("/v1/tenants/{unknown}/api-keys"),
            &operator,
            &json!({"scopes": ["encrypt"]}),
        )
        .await;
    assert_error(status, &body, 404, "tenant_not_found");
    // Another tenant's key cannot be revoked through this tenant's path.
    let other = app.create_tenant("initech");
    let (status, body) = call(
        &app,
        Method::POST,
        &format!("{path}/{}/revoke", other.key),
        &operator,
        None,
    )
    .await;
    assert_error(status, &body, 404, "api_key_not_found");
    assert_eq!(app.get("/v1/encryptions", &other).await.0, StatusCode::OK);
    // Nor an operator key (it belongs to no tenant).
    let (status, body) = call(
        &app,
        Method::POST,
        &format!("{path}/{}/revoke", operator.key),
        &operator,
        None,
    )
    .await;
    assert_error(status, &body, 404, "api_key_not_found");

    // Revoke, then disable: the tenant gets no new keys.
    let (status, _) = call(
        &app,
        Method::POST,
        &format!("{path}/{}/revoke", creds.key),
        &operator,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    refused_soon(&app, &creds, "revoked by the operator").await;
    let (status, disabled) = call(
        &app,
        Method::POST,
        &format!("/v1/tenants/{id}/disable"),
        &operator,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{disabled}");
    assert!(disabled["disabledAt"].is_string());
    let (status, body) = app
        .post(&path, &operator, &json!({"scopes": ["encrypt"]}))
        .await;
    assert_error(status, &body, 409, "tenant_disabled");
    let (_, tenants) = app.get("/v1/tenants", &operator).await;
    assert_eq!(tenants["items"].as_array().unwrap().len(), 2);
    assert!(tenants["nextCursor"].is_null());
    // The operator's actions are in the tenant's own audit.
    let (_, page) = app
        .get(
            &format!("/v1/audit?tenantId={id}&operation=api_key.create"),
            &operator,
        )
        .await;
    let records = page["records"].as_array().unwrap();
    assert_eq!(records.len(), 3, "{page}");
    assert!(records
        .iter()
        .all(|r| r["apiKeyId"] == operator.key.as_str()));
}

async fn a_revoked_key_and_a_disabled_tenant_stop_working_on_every_replica(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let replica = app.spawn_replica(&[]);
    let operator = app.create_operator();
    let t = app.create_tenant("alpha");
    let spare = app.create_key(&t.tenant_id, "encrypt,decrypt,manage");
    let other = app.create_tenant("bravo");
    // Every key is cached on the replica first.
    for creds in [&t, &spare, &other] {
        assert_eq!(
            replica.get("/v1/encryptions", creds).await.0,
            StatusCode::OK
        );
    }

    // The tenant revokes a key on the first replica: the second stops taking it.
    let (status, _) = call(
        &app,
        Method::POST,
        &format!("/v1/api-keys/{}/revoke", spare.key),
        &t,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    refused_soon(&app, &spare, "revoked, same replica").await;
    refused_soon(&replica, &spare, "revoked, other replica").await;

    // The operator disables the tenant on the second replica: its keys stop
    // working on both; the other tenant's keep working.
    let (status, body) = call(
        &replica,
        Method::POST,
        &format!("/v1/tenants/{}/disable", t.tenant_id),
        &operator,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    refused_soon(&replica, &t, "disabled, same replica").await;
    refused_soon(&app, &t, "disabled, other replica").await;
    assert_eq!(app.get("/v1/encryptions", &other).await.0, StatusCode::OK);
    assert_eq!(
        replica.get("/v1/encryptions", &other).await.0,
        StatusCode::OK
    );
    // Disabling is kept across restarts (it is in the database).
    let mut app = app;
    app.restart();
    assert_eq!(
        app.get("/v1/encryptions", &t).await.0,
        StatusCode::UNAUTHORIZED
    );
}

async fn a_second_root_kek_rotation_waits_for_the_first(backend: Backend) {
    use sqlx::Connection;
    let app = TestApp::spawn(backend).await;
    let operator = app.create_operator();
    let (status, body) = app
        .post("/v1/admin/root-kek/rotate", &operator, &json!({}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    // Wait until the first has finished: one KEK left.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, st) = app.get("/v1/admin/root-kek", &operator).await;
        if st["rootKeks"].as_array().unwrap().len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A rotation still re-wrapping (as another replica may have left it): a
    // KEK in the `retiring` state. Another one is refused, not started.
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&app.db.url).await.unwrap();
    let (status, st) = app.get("/v1/admin/root-kek", &operator).await;
    assert_eq!(status, StatusCode::OK);
    let active = st["rootKeks"][0]["kekId"].as_str().unwrap().to_string();
    sqlx::query(
        "INSERT INTO root_keks (id, provider, wrapped_key, state, created_at) \
         SELECT $1, provider, wrapped_key, 'retiring', created_at FROM root_keks WHERE id = $2",
    )
    .bind(uuid::Uuid::new_v4().to_string())
    .bind(&active)
    .execute(&mut conn)
    .await
    .unwrap();
    for _ in 0..2 {
        let (status, body) = app
            .post("/v1/admin/root-kek/rotate", &operator, &json!({}))
            .await;
        assert_error(status, &body, 409, "rotation_in_progress");
    }
    let (_, st) = app.get("/v1/admin/root-kek", &operator).await;
    assert_eq!(
        st["rootKeks"].as_array().unwrap().len(),
        2,
        "no third KEK: {st}"
    );
    let still_active = st["rootKeks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["state"] == "active")
        .unwrap();
    assert_eq!(still_active["kekId"], active.as_str(), "{st}");
}

async fn the_cli_lists_keys_without_secrets_and_disables_a_tenant_on_a_running_server(
    backend: Backend,
) {
    let app = TestApp::spawn(backend).await;
    let t = app.create_tenant("alpha");
    let narrow = app.create_key(&t.tenant_id, "encrypt");
    assert_eq!(app.get("/v1/encryptions", &t).await.0, StatusCode::OK);

    let out = app.cli(&["apikey", "list", "--tenant", &t.tenant_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let keys: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(keys.len(), 2, "{text}");
    assert_eq!(keys[0]["apiKey"], t.key.as_str());
    assert_eq!(keys[1]["scopes"], json!(["encrypt"]));
    assert!(!text.contains(&t.secret) && !text.contains(&narrow.secret));

    let out = app.cli(&["tenant", "disable", &t.tenant_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Made by another process: the running server hears of it through the
    // change feed.
    refused_soon(&app, &t, "disabled by the CLI").await;
    let out = app.cli(&[
        "apikey",
        "create",
        "--tenant",
        &t.tenant_id,
        "--scopes",
        "encrypt",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("disabled"));
    let out = app.cli(&["tenant", "disable", &uuid::Uuid::new_v4().to_string()]);
    assert!(!out.status.success());
}

async fn a_database_from_before_operator_keys_upgrades_and_its_keys_stay_in_their_tenant(
    backend: Backend,
) {
    // The schema as the Keyward before migration 0010 left it.
    let db = crate::helpers::TestDatabase::new(backend).await;
    let folder = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("migrations")
        .join(folder);
    let mut migrator = sqlx::migrate::Migrator::new(dir).await.unwrap();
    migrator.migrations = std::borrow::Cow::Owned(
        migrator
            .migrations
            .iter()
            .filter(|m| m.version < 10)
            .cloned()
            .collect(),
    );
    sqlx::any::install_default_drivers();
    let url = match backend {
        Backend::Sqlite => format!("{}?mode=rwc", db.url),
        Backend::Postgres => db.url.clone(),
    };
    let pool = sqlx::AnyPool::connect(&url).await.unwrap();
    migrator.run(&pool).await.unwrap();
    // A tenant and its all-scopes key, as the old `tenant create` wrote them.
    let tenant = uuid::Uuid::new_v4().to_string();
    let key = "kw_0123456789abcdef01234567".to_string();
    let secret = "kws_an-old-secret-of-the-old-tenant-create-0000".to_string();
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes());
    sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, 'old', 1)")
        .bind(&tenant)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO api_keys (id, tenant_id, secret_sha256, scopes, created_at) \
         VALUES ($1, $2, $3, 'encrypt,decrypt,rotate,manage,admin', 1)",
    )
    .bind(&key)
    .bind(&tenant)
    .bind(digest.as_ref().to_vec())
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    // The new Keyward migrates at start; the old key works in its tenant.
    let app = TestApp::spawn_on(db, &[]);
    let old = Creds {
        tenant_id: tenant.clone(),
        key,
        secret,
    };
    let (enc, _) = app.create_encryption(&old).await;
    let encrypted = app.encrypt(&old, &enc, "kept").await;
    assert_eq!(app.decrypt(&old, &encrypted).await.0, StatusCode::OK);
    let (status, keys) = app.get("/v1/api-keys", &old).await;
    assert_eq!(status, StatusCode::OK, "{keys}");
    assert_eq!(keys["items"][0]["apiKey"], old.key.as_str());
    // ... and nothing service-wide any more: that is an operator key's.
    let (status, body) = app
        .post("/v1/admin/root-kek/rotate", &old, &json!({}))
        .await;
    assert_error(status, &body, 403, "insufficient_scope");
    let operator = app.create_operator();
    let (status, tenants) = app.get("/v1/tenants", &operator).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(tenants["items"][0]["tenantId"], tenant.as_str());
    assert!(tenants["items"][0]["disabledAt"].is_null());
}
