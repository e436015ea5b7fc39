//! Job sources are the operator's: a tenant names one that was registered
//! and granted to it, and cannot make Keyward open anything else, its own
//! database least of all. Every unusable source looks the same to the tenant,
//! and one tenant's hung source holds up no other tenant's jobs.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_error, keyward_command, Backend, TestApp, TestDatabase};
use crate::jobs::{sources_env, wait_for_job, Platform};

crate::on_both_databases!(
    a_tenant_cannot_aim_a_job_at_a_database_of_its_choosing,
    keywards_own_database_is_never_a_job_source,
    a_hung_source_holds_up_only_its_own_tenants_jobs,
    a_source_limited_to_tables_refuses_every_other_table,
);

/// The generic refusal, as the API says it.
const GENERIC: &str = "job_source_unavailable";

/// What must never reach a tenant about a source: paths, hosts, drivers.
fn assert_reveals_nothing(text: &str, secrets: &[&str]) {
    for needle in secrets.iter().copied().chain([
        "sqlite",
        "postgres",
        "database file",
        "no such table",
        "refused",
        "timed out",
        "pg_hba",
        "127.0.0.1",
        "/tmp",
    ]) {
        assert!(
            !text.to_lowercase().contains(&needle.to_lowercase()),
            "`{needle}` revealed in {text}"
        );
    }
}

/// Waits until the job has ended as `failed`; returns its view.
async fn wait_for_failure(app: &TestApp, creds: &crate::helpers::Creds, job: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = app.get(&format!("/v1/jobs/{job}"), creds).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        match body["state"].as_str().unwrap() {
            "failed" => return body,
            "succeeded" | "cancelled" => panic!("the job was to fail: {body}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "job not failed: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A tenant's `databaseUrl` (Keyward's own database, or any other), an
/// unknown source name and a source granted to another tenant are refused
/// with one error, word for word the same, and create no job; a granted
/// source over a table that does not exist fails its job with that same text.
async fn a_tenant_cannot_aim_a_job_at_a_database_of_its_choosing(backend: Backend) {
    let platform = Platform::new(backend).await;
    let other_db = TestDatabase::new(backend).await;
    let (k, v) = sources_env(
        platform.db_dir(),
        &[
            ("platform", &platform.url(), &["acme"]),
            ("theirs", &other_db.url, &["globex"]),
        ],
    );
    let app = TestApp::spawn_with(backend, &[(k, &v)]).await;
    let acme = app.create_tenant("acme");
    let _globex = app.create_tenant("globex");
    let (enc, _) = app.create_encryption(&acme).await;
    let job = |source: Value| json!({"kind": "reencrypt", "encryptionId": enc, "source": source});
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut s = platform.source();
        edit(&mut s);
        job(s)
    };
    let own_url = app.db.url.clone();
    let attempts = [
        // Keyward's own database, with the table of API keys.
        with(&|s| {
            s.as_object_mut().unwrap().remove("name");
            s["databaseUrl"] = json!(own_url);
            s["table"] = json!("api_keys");
            s["versionColumn"] = json!("tenant_id");
        }),
        // Any database, even next to a granted name.
        with(&|s| s["databaseUrl"] = json!(format!("{own_url}?mode=rwc"))),
        with(&|s| {
            s.as_object_mut().unwrap().remove("name");
            s["databaseUrl"] = json!("postgres://u:p@10.1.2.3:5432/x?sslkey=/etc/shadow");
        }),
        // A name nobody registered, and one granted to another tenant.
        with(&|s| s["name"] = json!("nope")),
        with(&|s| s["name"] = json!("theirs")),
        with(&|s| s["name"] = json!("Platform")),
    ];
    let mut messages = Vec::new();
    for body in &attempts {
        let (status, answer) = app.post("/v1/jobs", &acme, body).await;
        assert_error(status, &answer, 422, GENERIC);
        assert_reveals_nothing(
            &answer.to_string(),
            &[&own_url, "10.1.2.3", "theirs", "nope"],
        );
        messages.push(answer["error"]["message"].as_str().unwrap().to_string());
    }
    assert!(
        messages.iter().all(|m| m == &messages[0]),
        "one error for all: {messages:?}"
    );
    let (_, listed) = app.get("/v1/jobs", &acme).await;
    assert_eq!(listed["items"], json!([]), "no job was created");

    // The granted source over a table it does not hold: the job fails, and
    // its error is the same text.
    let (status, created) = app
        .post(
            "/v1/jobs",
            &acme,
            &with(&|s| s["table"] = json!("no_such_table")),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let failed = wait_for_failure(&app, &acme, created["jobId"].as_str().unwrap()).await;
    assert_eq!(failed["error"], json!(messages[0]), "{failed}");
    assert_eq!(failed["source"], json!({"name": "platform"}));
    assert_reveals_nothing(&failed.to_string(), &[&platform.url()]);
    // The operator's log says why.
    assert!(app.log_shows("job source unusable").await);
}

/// Keyward's own database named as a source, under another spelling of its
/// URL, stops the server at start with an error naming the source and not
/// the URL. A SQLite source that becomes a link to Keyward's database after
/// start is refused when a job would open it.
async fn keywards_own_database_is_never_a_job_source(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let alias = match backend {
        Backend::Sqlite => db
            .url
            .replacen("sqlite://", "sqlite:", 1)
            .replace("keyward.db", "./keyward.db"),
        Backend::Postgres => db
            .url
            .replacen(
                "postgres://postgres@localhost",
                "postgresql://intruder:pw@127.0.0.1",
                1,
            )
            .replacen(
                "postgres://postgres@127.0.0.1",
                "postgresql://intruder:pw@localhost",
                1,
            ),
    };
    assert_ne!(alias, db.url);
    let (k, v) = sources_env(&db.dir, &[("mine", &alias, &["acme"])]);
    let out = keyward_command()
        .arg("serve")
        .env("KEYWARD_LISTEN", "127.0.0.1:0")
        .env("KEYWARD_DATABASE_URL", &db.url)
        .env("KEYWARD_MASTER_KEY", crate::helpers::random_master_key())
        .env(k, &v)
        .output()
        .unwrap();
    let stderr =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("job source `mine` is Keyward's own database"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(&alias) && !stderr.contains("intruder:pw"),
        "{stderr}"
    );

    if backend == Backend::Sqlite {
        let later = db.dir.path().join("later.db");
        let later_url = format!("sqlite://{}", later.display());
        let (k, v) = sources_env(&db.dir, &[("later", &later_url, &["acme"])]);
        let app = TestApp::spawn_with(backend, &[(k, &v)]).await;
        let acme = app.create_tenant("acme");
        let (enc, _) = app.create_encryption(&acme).await;
        let own = app.db.url.strip_prefix("sqlite://").unwrap();
        std::os::unix::fs::symlink(own, &later).unwrap();
        let (status, created) = app
            .post("/v1/jobs", &acme, &json!({"kind": "reencrypt", "encryptionId": enc, "source": {
                "name": "later", "table": "api_keys", "keyColumn": "id", "cipherTextColumn": "digest",
                "versionColumn": "tenant_id", "metadataColumn": "scopes"}}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{created}");
        let failed = wait_for_failure(&app, &acme, created["jobId"].as_str().unwrap()).await;
        assert_eq!(failed["remainingByVersion"], json!({}), "{failed}");
        assert_eq!(failed["total"], Value::Null, "nothing was read: {failed}");
        assert_reveals_nothing(&failed.to_string(), &[own]);
        assert!(app.log_shows("the source is Keyward's own database").await);
    }
}

/// Tenant `slow`'s source accepts connections and never answers. Its job,
/// queued first, holds up neither tenant `fast`'s job, which completes
/// meanwhile, nor anything else; it fails after the connection timeout with
/// the generic error.
async fn a_hung_source_holds_up_only_its_own_tenants_jobs(backend: Backend) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        loop {
            if let Ok((socket, _)) = listener.accept().await {
                sockets.push(socket);
            }
        }
    });
    let platform = Platform::new(backend).await;
    let hung_url = format!("postgres://jobs:hung-password@127.0.0.1:{port}/platform");
    let (k, v) = sources_env(
        platform.db_dir(),
        &[
            ("hung", &hung_url, &["slow"]),
            ("platform", &platform.url(), &["fast"]),
        ],
    );
    let app = TestApp::spawn_with(
        backend,
        &[(k, &v), ("KEYWARD_JOB_SOURCE_CONNECT_TIMEOUT", "12s")],
    )
    .await;
    let slow = app.create_tenant("slow");
    let fast = app.create_tenant("fast");
    let (slow_enc, _) = app.create_encryption(&slow).await;
    let (fast_enc, _) = app.create_encryption(&fast).await;
    platform.fill_rows(&app, &fast, &fast_enc, 300).await;
    app.rotate(&fast, &fast_enc).await;

    let started = Instant::now();
    let mut hung_source = platform.source();
    hung_source["name"] = json!("hung");
    let (status, slow_job) = app
        .post(
            "/v1/jobs",
            &slow,
            &json!({"kind": "reencrypt", "encryptionId": slow_enc, "source": hung_source}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{slow_job}");
    let slow_job = slow_job["jobId"].as_str().unwrap().to_string();
    // Let the runner take the hung job first.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, fast_job) = app
        .post(
            "/v1/jobs",
            &fast,
            &json!({"kind": "reencrypt", "encryptionId": fast_enc, "source": platform.source()}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{fast_job}");
    let done = wait_for_job(
        &app,
        &fast,
        fast_job["jobId"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done["rewrapped"], 300, "{done}");
    let (_, slow_view) = app.get(&format!("/v1/jobs/{slow_job}"), &slow).await;
    assert_eq!(
        slow_view["state"],
        "running",
        "the other job finished while the hung one still waited ({:?}): {slow_view}",
        started.elapsed()
    );

    let failed = wait_for_failure(&app, &slow, &slow_job).await;
    assert!(
        started.elapsed() >= Duration::from_secs(12),
        "it failed by the connection timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(
        failed["error"],
        json!(crate::jobs::generic_source_message(&app, &slow).await)
    );
    assert_reveals_nothing(&failed.to_string(), &["hung-password", &port.to_string()]);
    assert!(!app.log_text().contains("hung-password"));
    held.abort();
}

/// A source the operator limited to some tables: a job over any other table
/// of it (another tenant's, the catalogue) is refused like an unknown source,
/// before anything is opened, so its existence and row count stay unknown.
async fn a_source_limited_to_tables_refuses_every_other_table(backend: Backend) {
    let platform = Platform::new(backend).await;
    let file = platform.db.dir.path().join("sources-tables.toml");
    std::fs::write(
        &file,
        format!(
            "[sources.platform]\ndatabase_url = {:?}\ntenants = [\"platform\"]\ntables = [\"secrets\"]\n",
            platform.db.url
        ),
    )
    .unwrap();
    let app = TestApp::spawn_with(
        backend,
        &[("KEYWARD_JOB_SOURCES_FILE", file.to_str().unwrap())],
    )
    .await;
    let creds = app.create_tenant("platform");
    let (enc, _) = app.create_encryption(&creds).await;
    platform.fill_rows(&app, &creds, &enc, 3).await;
    let generic = crate::jobs::generic_source_message(&app, &creds).await;
    for table in [
        "other_tenants_secrets",
        "information_schema.tables",
        "Secrets",
    ] {
        let mut source = platform.source();
        source["table"] = json!(table);
        let (status, body) = app
            .post(
                "/v1/jobs",
                &creds,
                &json!({"kind": "reencrypt", "encryptionId": enc, "source": source}),
            )
            .await;
        assert_error(status, &body, 422, GENERIC);
        assert_eq!(body["error"]["message"], generic.as_str(), "{table}");
    }
    let (status, body) = app
        .post(
            "/v1/jobs",
            &creds,
            &json!({"kind": "reencrypt", "encryptionId": enc, "source": platform.source()}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let done = wait_for_job(
        &app,
        &creds,
        body["jobId"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done["state"], "succeeded", "{done}");
}
