//! Re-encryption jobs over a real table in a "platform" database: every row
//! ends on the active version and decrypts to its original plaintext; SIGKILL
//! and restarts lose nothing; rows the platform writes meanwhile are never
//! overwritten; two replicas give one runner.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::{Connection, Row};

use crate::helpers::{decrypt_body, Backend, Creds, TestApp, TestDatabase};

crate::on_both_databases!(
    a_job_moves_fifty_thousand_rows_to_the_active_version,
    a_job_survives_sigkill_and_never_overwrites_platform_writes,
    a_job_skips_empty_fields_and_reads_version_ids_in_any_case,
    integrity_a_job_resumed_on_a_table_emptied_meanwhile_binds_its_cursor_as_the_key_type,
);

/// The platform's database and its table.
pub(crate) struct Platform {
    pub(crate) db: TestDatabase,
}

impl Platform {
    pub(crate) async fn new(backend: Backend) -> Platform {
        let db = TestDatabase::new(backend).await;
        let mut conn = Self::connect_url(&db.url).await;
        sqlx::query("CREATE TABLE secrets (id BIGINT PRIMARY KEY, cipher_text TEXT NOT NULL, version TEXT NOT NULL, metadata TEXT NOT NULL)")
            .execute(&mut conn)
            .await
            .unwrap();
        Platform { db }
    }

    async fn connect_url(url: &str) -> sqlx::AnyConnection {
        sqlx::any::install_default_drivers();
        let url = if url.starts_with("sqlite:") {
            format!("{url}?mode=rwc")
        } else {
            url.to_string()
        };
        sqlx::AnyConnection::connect(&url).await.unwrap()
    }

    async fn connect(&self) -> sqlx::AnyConnection {
        Self::connect_url(&self.db.url).await
    }

    /// The platform database's URL.
    pub(crate) fn url(&self) -> String {
        self.db.url.clone()
    }

    /// The directory that holds the platform database's files.
    pub(crate) fn db_dir(&self) -> &tempfile::TempDir {
        &self.db.dir
    }

    /// [`Platform::fill`], for other test modules.
    pub(crate) async fn fill_rows(&self, app: &TestApp, creds: &Creds, enc: &str, n: usize) {
        self.fill(app, creds, enc, n).await
    }

    /// Encrypts `n` rows through the API (batches of 1000) and inserts them.
    pub(crate) async fn fill(&self, app: &TestApp, creds: &Creds, enc: &str, n: usize) {
        let mut conn = self.connect().await;
        for start in (0..n).step_by(1000) {
            let end = (start + 1000).min(n);
            let items: Vec<Value> = (start..end)
                .map(|i| json!({"encryptionId": enc, "data": plaintext(i, 0)}))
                .collect();
            let (status, body) = app
                .post("/v1/encrypt/batch", creds, &json!({"items": items}))
                .await;
            assert_eq!(status, StatusCode::OK);
            let mut tx = conn.begin().await.unwrap();
            for (i, r) in (start..end).zip(body["results"].as_array().unwrap()) {
                sqlx::query("INSERT INTO secrets (id, cipher_text, version, metadata) VALUES ($1, $2, $3, $4)")
                    .bind(i as i64)
                    .bind(r["cipherText"].as_str().unwrap())
                    .bind(r["encryptionVersionId"].as_str().unwrap())
                    .bind(r["metadata"].to_string())
                    .execute(&mut *tx)
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
        }
    }

    /// Every row as (id, cipherText, version, metadata).
    pub(crate) async fn rows(&self) -> Vec<(i64, String, String, String)> {
        let mut conn = self.connect().await;
        sqlx::query("SELECT id, cipher_text, version, metadata FROM secrets ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect()
    }

    /// Registers this database as job source `platform`, granted to
    /// `tenants` (names or ids): the `KEYWARD_JOB_SOURCES_FILE` setting.
    pub(crate) fn sources_env(&self, tenants: &[&str]) -> (&'static str, String) {
        sources_env(&self.db.dir, &[("platform", &self.db.url, tenants)])
    }

    pub(crate) fn source(&self) -> Value {
        json!({
            "name": "platform",
            "table": "secrets",
            "keyColumn": "id",
            "cipherTextColumn": "cipher_text",
            "versionColumn": "version",
            "metadataColumn": "metadata",
        })
    }
}

/// The generic source error's message, as the API says it (asked with a
/// source name nobody registered).
pub(crate) async fn generic_source_message(app: &TestApp, creds: &Creds) -> String {
    let (status, body) = app
        .post(
            "/v1/jobs",
            creds,
            &json!({"kind": "reencrypt", "encryptionId": uuid::Uuid::new_v4().to_string(), "source": {
                "name": "no-such-source", "table": "t", "keyColumn": "k", "cipherTextColumn": "c",
                "versionColumn": "v", "metadataColumn": "m"}}),
        )
        .await;
    crate::helpers::assert_error(status, &body, 422, "job_source_unavailable");
    body["error"]["message"].as_str().unwrap().to_string()
}

/// Writes a job sources file into `dir` declaring each (name, URL, tenants);
/// returns the setting that names it.
pub(crate) fn sources_env(
    dir: &tempfile::TempDir,
    sources: &[(&str, &str, &[&str])],
) -> (&'static str, String) {
    let mut text = String::new();
    for (name, url, tenants) in sources {
        let tenants: Vec<String> = tenants.iter().map(|t| format!("{t:?}")).collect();
        text += &format!(
            "[sources.{name}]\ndatabase_url = {url:?}\ntenants = [{}]\n",
            tenants.join(", ")
        );
    }
    let path = dir
        .path()
        .join(format!("sources-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, text).unwrap();
    ("KEYWARD_JOB_SOURCES_FILE", path.display().to_string())
}

/// Starts Keyward with `platform` registered as source `platform` for the
/// tenant named `platform`, and `extra` settings.
pub(crate) async fn spawn_with_platform(
    backend: Backend,
    platform: &Platform,
    extra: &[(&str, &str)],
) -> TestApp {
    let (k, v) = platform.sources_env(&["platform"]);
    let mut env = vec![(k, v.as_str())];
    env.extend_from_slice(extra);
    TestApp::spawn_with(backend, &env).await
}

pub(crate) fn plaintext(i: usize, generation: usize) -> String {
    format!("row {i} generation {generation}: {}", "p".repeat(40))
}

/// Decrypts every row through the batch API; returns the plaintexts by id.
pub(crate) async fn decrypt_all(
    app: &TestApp,
    creds: &Creds,
    enc: &str,
    rows: &[(i64, String, String, String)],
) -> Vec<String> {
    let mut out = Vec::with_capacity(rows.len());
    for chunk in rows.chunks(1000) {
        let items: Vec<Value> = chunk
            .iter()
            .map(|(_, ct, v, m)| {
                decrypt_body(&json!({"encryptionId": enc, "cipherText": ct, "encryptionVersionId": v, "metadata": serde_json::from_str::<Value>(m).unwrap()}))
            })
            .collect();
        let (status, body) = app
            .post("/v1/decrypt/batch", creds, &json!({"items": items}))
            .await;
        assert_eq!(status, StatusCode::OK);
        for r in body["results"].as_array().unwrap() {
            out.push(
                r["data"]
                    .as_str()
                    .unwrap_or_else(|| panic!("a row does not decrypt: {r}"))
                    .to_string(),
            );
        }
    }
    out
}

pub(crate) async fn wait_for_job(
    app: &TestApp,
    creds: &Creds,
    job: &str,
    timeout: Duration,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = app.get(&format!("/v1/jobs/{job}"), creds).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        match body["state"].as_str().unwrap() {
            "succeeded" => return body,
            "failed" | "cancelled" => panic!("job ended as {body}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "job not finished: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn a_job_moves_fifty_thousand_rows_to_the_active_version(backend: Backend) {
    let platform = Platform::new(backend).await;
    let app = spawn_with_platform(backend, &platform, &[]).await;
    let creds = app.create_tenant("platform");
    let (enc, _) = app.create_encryption(&creds).await;
    let n = 50_000;
    platform.fill(&app, &creds, &enc, n).await;
    app.rotate(&creds, &enc).await;
    let active = app.rotate(&creds, &enc).await;

    let started = Instant::now();
    let (status, created) = app
        .post(
            "/v1/jobs",
            &creds,
            &json!({"kind": "reencrypt", "encryptionId": enc, "source": platform.source()}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let job = created["jobId"].as_str().unwrap();
    let done = wait_for_job(&app, &creds, job, Duration::from_secs(600)).await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "re-encryption job ({backend:?}, debug build): {n} rows in {secs:.1} s = {:.0} rows/s",
        n as f64 / secs
    );

    assert_eq!(done["total"], n);
    assert_eq!(done["processed"], n);
    assert_eq!(done["rewrapped"], n);
    assert_eq!(done["remainingByVersion"], json!({}), "{done}");
    assert_eq!(
        done["source"],
        json!({"name": "platform"}),
        "the source's name only"
    );
    let rows = platform.rows().await;
    assert_eq!(rows.len(), n);
    assert!(
        rows.iter().all(|(_, _, v, _)| v == &active),
        "every row is on the active version"
    );
    let plain = decrypt_all(&app, &creds, &enc, &rows).await;
    for (i, p) in plain.iter().enumerate() {
        assert_eq!(p, &plaintext(i, 0));
    }
    // The stored job holds the source sealed, not in the clear.
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&app.db.url).await.unwrap();
    let sealed: Vec<u8> = sqlx::query_scalar("SELECT source_sealed FROM jobs")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert!(!crate::helpers::contains(
        &sealed,
        platform.db.url.as_bytes()
    ));
    assert!(!crate::helpers::contains(&sealed, b"secrets"));
}

async fn a_job_survives_sigkill_and_never_overwrites_platform_writes(backend: Backend) {
    let env = [
        ("KEYWARD_JOB_LEASE", "1s"),
        ("KEYWARD_JOB_BATCH_ROWS", "100"),
    ];
    let platform = Platform::new(backend).await;
    let mut app = spawn_with_platform(backend, &platform, &env).await;
    let creds = app.create_tenant("platform");
    let (enc, v1) = app.create_encryption(&creds).await;
    let n = 6_000;
    platform.fill(&app, &creds, &enc, n).await;
    let active = app.rotate(&creds, &enc).await;

    let (status, created) = app
        .post("/v1/jobs", &creds, &json!({"kind": "reencrypt", "encryptionId": enc, "maxRowsPerSecond": 3000, "source": platform.source()}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let job = created["jobId"].as_str().unwrap().to_string();

    // The platform keeps writing rows (under the old version, as an old client
    // would) while Keyward is killed and restarted three times.
    let mut latest: Vec<usize> = vec![0; n];
    let mut conn = platform.connect().await;
    for round in 1..=3 {
        for k in 0..40 {
            let i = (round * 997 + k * 131) % n;
            latest[i] += 1;
            let (status, e) = app
                .post("/v1/encrypt", &creds, &json!({"encryptionId": enc, "data": plaintext(i, latest[i]), "encryptionVersionId": v1}))
                .await;
            assert_eq!(status, StatusCode::OK);
            sqlx::query(
                "UPDATE secrets SET cipher_text = $1, version = $2, metadata = $3 WHERE id = $4",
            )
            .bind(e["cipherText"].as_str().unwrap())
            .bind(e["encryptionVersionId"].as_str().unwrap())
            .bind(e["metadata"].to_string())
            .bind(i as i64)
            .execute(&mut conn)
            .await
            .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200 + 150 * round as u64)).await;
        std::process::Command::new("kill")
            .args(["-KILL", &app.pid().to_string()])
            .status()
            .unwrap();
        app.kill_wait();
        app.start();
    }
    let done = wait_for_job(&app, &creds, &job, Duration::from_secs(300)).await;
    let rows = platform.rows().await;
    assert_eq!(rows.len(), n, "no row lost");
    let plain = decrypt_all(&app, &creds, &enc, &rows).await;
    for (i, p) in plain.iter().enumerate() {
        assert_eq!(
            p,
            &plaintext(i, latest[i]),
            "row {i}: the platform's last write wins"
        );
    }
    let on_old = rows.iter().filter(|(_, _, v, _)| v != &active).count() as i64;
    let reported: i64 = done["remainingByVersion"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_i64().unwrap())
        .sum();
    assert_eq!(
        on_old, reported,
        "the job reports exactly the rows left on old versions: {done}"
    );
    assert!(
        on_old < 200,
        "the passes after the writes moved them: {on_old} left"
    );
    assert!(
        done["rowsPerSecond"].as_i64().unwrap() <= 4000,
        "rate limit: {done}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_and_one_job_give_one_runner() {
    let backend = Backend::Postgres;
    let platform = Platform::new(backend).await;
    let a = spawn_with_platform(backend, &platform, &[]).await;
    let b = a.spawn_replica(&[]);
    let creds = a.create_tenant("platform");
    let (enc, _) = a.create_encryption(&creds).await;
    platform.fill(&a, &creds, &enc, 3000).await;
    a.rotate(&creds, &enc).await;
    let started = Instant::now();
    let (status, created) = a
        .post("/v1/jobs", &creds, &json!({"kind": "reencrypt", "encryptionId": enc, "maxRowsPerSecond": 1000, "source": platform.source()}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let job = created["jobId"].as_str().unwrap();
    let done = wait_for_job(&b, &creds, job, Duration::from_secs(120)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "the rate limit holds: {:?}",
        started.elapsed()
    );
    assert_eq!(done["rewrapped"], 3000);
    let runs = a.log_text().matches("running re-encryption job").count()
        + b.log_text().matches("running re-encryption job").count();
    assert_eq!(runs, 1, "exactly one replica ran the job");
    // Cancel and list.
    let (status, list) = a.get("/v1/jobs", &creds).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["items"][0]["jobId"], job);
    let other = a.create_tenant("other");
    let (status, body) = a.get(&format!("/v1/jobs/{job}"), &other).await;
    crate::helpers::assert_error(status, &body, 404, "job_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroying_a_version_the_last_job_found_in_use_needs_force() {
    let platform = Platform::new(Backend::Sqlite).await;
    let app = spawn_with_platform(Backend::Sqlite, &platform, &[]).await;
    let creds = app.create_tenant("platform");
    let (enc, v1) = app.create_encryption(&creds).await;
    platform.fill(&app, &creds, &enc, 50).await;
    app.rotate(&creds, &enc).await;
    let v1_path = format!("/v1/encryptions/{enc}/versions/{v1}");
    // Disabled, v1 cannot be read: the job leaves its rows and says so.
    let patch = |body: Value| {
        let app = &app;
        let creds = &creds;
        let path = v1_path.clone();
        async move {
            crate::helpers::send(app.req(reqwest::Method::PATCH, &path, creds).json(&body)).await
        }
    };
    assert_eq!(patch(json!({"state": "disabled"})).await.0, StatusCode::OK);
    let (_, created) = app
        .post(
            "/v1/jobs",
            &creds,
            &json!({"kind": "reencrypt", "encryptionId": enc, "source": platform.source()}),
        )
        .await;
    let done = wait_for_job(
        &app,
        &creds,
        created["jobId"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done["failed"].as_i64().unwrap() % 50, 0, "{done}");
    assert_eq!(done["remainingByVersion"][&v1], 50, "{done}");
    let (status, body) = patch(json!({"state": "destroyed"})).await;
    crate::helpers::assert_error(status, &body, 409, "version_in_use");
    let (status, body) = patch(json!({"state": "destroyed", "force": true})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_starts_watches_and_reports_a_job() {
    let platform = Platform::new(Backend::Sqlite).await;
    let app = spawn_with_platform(Backend::Sqlite, &platform, &[]).await;
    let creds = app.create_tenant("platform");
    let (enc, _) = app.create_encryption(&creds).await;
    platform.fill(&app, &creds, &enc, 500).await;
    app.rotate(&creds, &enc).await;
    let cli = |args: &[&str]| {
        crate::helpers::keyward_command()
            .args(args)
            .env("KEYWARD_URL", format!("http://{}", app.addr))
            .env("KEYWARD_API_KEY", &creds.key)
            .env("KEYWARD_API_SECRET", &creds.secret)
            .output()
            .unwrap()
    };
    let out = cli(&[
        "job",
        "start",
        "--encryption-id",
        &enc,
        "--source",
        "platform",
        "--table",
        "secrets",
        "--key-column",
        "id",
        "--cipher-text-column",
        "cipher_text",
        "--version-column",
        "version",
        "--metadata-column",
        "metadata",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    let job = job["jobId"].as_str().unwrap().to_string();
    let out = cli(&["job", "watch", &job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["state"], "succeeded");
    assert_eq!(done["rewrapped"], 500);
    let out = cli(&["job", "status", &job]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["jobId"], job.as_str());
    let out = cli(&["job", "status", "00000000-0000-4000-8000-000000000000"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("job_not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_follows_a_per_row_encryption_column_and_never_reveals_its_credentials() {
    let platform = TestDatabase::new(Backend::Postgres).await;
    // Trust authentication ignores the password, so it can be a marker.
    let password = "PLATFORM-DB-PASSWORD-5150";
    let url = platform.url.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{password}@"),
        1,
    );
    let (k, v) = sources_env(&platform.dir, &[("notes", &url, &["platform"])]);
    let app = TestApp::spawn_with(Backend::Postgres, &[(k, &v)]).await;
    let creds = app.create_tenant("platform");
    let other = app.create_tenant("other");
    let (a, _) = app.create_encryption(&creds).await;
    let (b, _) = app.create_encryption(&creds).await;
    let (foreign, _) = app.create_encryption(&other).await;
    let mut conn = Platform::connect_url(&platform.url).await;
    sqlx::query("CREATE TABLE notes (note_id TEXT PRIMARY KEY, enc TEXT NOT NULL, ct TEXT NOT NULL, ver TEXT NOT NULL, meta TEXT NOT NULL)")
        .execute(&mut conn)
        .await
        .unwrap();
    let mut expected = vec![];
    for i in 0..30 {
        let (enc, who) = match i % 3 {
            0 => (&a, &creds),
            1 => (&b, &creds),
            _ => (&foreign, &other),
        };
        let data = format!("note {i}");
        let e = app.encrypt(who, enc, &data).await;
        sqlx::query("INSERT INTO notes VALUES ($1, $2, $3, $4, $5)")
            .bind(format!("n-{i:03}"))
            .bind(enc.as_str())
            .bind(e["cipherText"].as_str().unwrap())
            .bind(e["encryptionVersionId"].as_str().unwrap())
            .bind(e["metadata"].to_string())
            .execute(&mut conn)
            .await
            .unwrap();
        expected.push((enc.clone(), data));
    }
    let new_a = app.rotate(&creds, &a).await;
    let new_b = app.rotate(&creds, &b).await;
    let foreign_version: String =
        sqlx::query_scalar("SELECT ver FROM notes WHERE note_id = 'n-002'")
            .fetch_one(&mut conn)
            .await
            .unwrap();

    let source = json!({"name": "notes", "table": "public.notes", "keyColumn": "note_id", "cipherTextColumn": "ct",
        "versionColumn": "ver", "metadataColumn": "meta", "encryptionIdColumn": "enc"});
    let (status, created) = app
        .post(
            "/v1/jobs",
            &creds,
            &json!({"kind": "reencrypt", "source": source}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let done = wait_for_job(
        &app,
        &creds,
        created["jobId"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(done["rewrapped"], 20, "{done}");
    assert_eq!(
        done["skipped"], 10,
        "the other tenant's rows are not touched: {done}"
    );
    assert_eq!(
        done["remainingByVersion"],
        json!({}),
        "nor reported as the job's: {done}"
    );

    let rows = sqlx::query("SELECT note_id, enc, ct, ver, meta FROM notes ORDER BY note_id")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    for (i, r) in rows.iter().enumerate() {
        let (enc, ver): (String, String) = (r.get(1), r.get(3));
        let want = match i % 3 {
            0 => new_a.clone(),
            1 => new_b.clone(),
            _ => foreign_version.clone(),
        };
        assert_eq!(ver, want, "row {i}");
        let who = if i % 3 == 2 { &other } else { &creds };
        let body = json!({"encryptionId": enc, "cipherText": r.get::<String, _>(2), "encryptionVersionId": ver,
            "metadata": serde_json::from_str::<Value>(&r.get::<String, _>(4)).unwrap()});
        let (status, d) = app.post("/v1/decrypt", who, &body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(d["data"], expected[i].1);
    }

    // Bad identifiers are refused before anything runs.
    let mut bad = source.clone();
    bad["table"] = json!("notes; DROP TABLE notes");
    let (status, body) = app
        .post(
            "/v1/jobs",
            &creds,
            &json!({"kind": "reencrypt", "source": bad}),
        )
        .await;
    crate::helpers::assert_error(status, &body, 422, "invalid_job");

    // The password is nowhere: not in responses, logs or Keyward's database.
    let (_, listed) = app.get("/v1/jobs", &creds).await;
    assert!(!listed.to_string().contains(password));
    assert!(
        !app.log_text().contains(password),
        "the platform's password is logged"
    );
    let mut kw = sqlx::PgConnection::connect(&app.db.url).await.unwrap();
    for table in ["jobs", "key_events"] {
        let dump: Vec<String> = sqlx::query_scalar(&format!("SELECT t::text FROM {table} t"))
            .fetch_all(&mut kw)
            .await
            .unwrap();
        assert!(
            !dump.join("\n").contains(password),
            "the password is stored in {table}"
        );
    }
}

/// A row of a table whose encrypted field is optional: (id, cipher_text,
/// version, metadata), each text column nullable.
type OptionalRow = (i64, Option<String>, Option<String>, Option<String>);

/// A table whose encrypted field is optional (NULL ciphertext, version and
/// metadata) and whose version column holds a version id in upper case: the
/// job skips and counts the empty rows instead of failing, moves the
/// upper-case row like any other, and reports nothing left.
async fn a_job_skips_empty_fields_and_reads_version_ids_in_any_case(backend: Backend) {
    let platform = Platform::new(backend).await;
    let app = spawn_with_platform(backend, &platform, &[]).await;
    let creds = app.create_tenant("platform");
    let (enc, _) = app.create_encryption(&creds).await;
    let mut conn = platform.connect().await;
    sqlx::query("CREATE TABLE profiles (id BIGINT PRIMARY KEY, cipher_text TEXT, version TEXT, metadata TEXT)")
        .execute(&mut conn)
        .await
        .unwrap();
    let first = app.encrypt(&creds, &enc, "first").await;
    let third = app.encrypt(&creds, &enc, "third").await;
    let rows: [OptionalRow; 3] = [
        (
            1,
            first["cipherText"].as_str().map(str::to_string),
            first["encryptionVersionId"].as_str().map(str::to_string),
            Some(first["metadata"].to_string()),
        ),
        (2, None, None, None),
        (
            3,
            third["cipherText"].as_str().map(str::to_string),
            third["encryptionVersionId"]
                .as_str()
                .map(|v| v.to_uppercase()),
            Some(third["metadata"].to_string()),
        ),
    ];
    for (id, ct, v, m) in &rows {
        sqlx::query(
            "INSERT INTO profiles (id, cipher_text, version, metadata) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(ct.as_deref())
        .bind(v.as_deref())
        .bind(m.as_deref())
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let active = app.rotate(&creds, &enc).await;
    let mut source = platform.source();
    source["table"] = json!("profiles");
    let (status, created) = app
        .post(
            "/v1/jobs",
            &creds,
            &json!({"kind": "reencrypt", "encryptionId": enc, "source": source}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let job = created["jobId"].as_str().unwrap();
    let done = wait_for_job(&app, &creds, job, Duration::from_secs(60)).await;
    assert_eq!(done["processed"], 3, "{done}");
    assert_eq!(done["rewrapped"], 2, "{done}");
    assert_eq!(
        done["skipped"], 1,
        "the empty row is skipped and counted: {done}"
    );
    assert_eq!(done["failed"], 0, "{done}");
    assert_eq!(done["remainingByVersion"], json!({}), "{done}");

    let after: Vec<OptionalRow> =
        sqlx::query("SELECT id, cipher_text, version, metadata FROM profiles ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
    assert_eq!(
        after[1],
        (2, None, None, None),
        "the empty row is untouched"
    );
    for (i, want) in [(0, "first"), (2, "third")] {
        let (_, ct, v, m) = &after[i];
        assert_eq!(v.as_deref(), Some(active.as_str()));
        let encrypted = json!({
            "encryptionId": enc,
            "cipherText": ct,
            "encryptionVersionId": v,
            "metadata": serde_json::from_str::<Value>(m.as_deref().unwrap()).unwrap(),
        });
        let (status, body) = app.decrypt(&creds, &encrypted).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["data"], want);
    }
}

/// A job is killed mid-walk (its cursor, an integer key, is stored); while
/// Keyward is down the platform empties the table. The resumed job opens a
/// table with no row to learn the key column's type from: it must still bind
/// its cursor as an integer (PostgreSQL refuses `bigint > text`; before the
/// fix the job failed there) and finish with nothing left. Rows arriving
/// after an empty start are read by their own type (the unit test
/// `store::source::tests::a_table_empty_when_opened_reads_and_writes_the_keys_of_rows_that_arrive_later`
/// shows it deterministically; from outside the arrival cannot be timed).
async fn integrity_a_job_resumed_on_a_table_emptied_meanwhile_binds_its_cursor_as_the_key_type(
    backend: Backend,
) {
    let env = [
        ("KEYWARD_JOB_LEASE", "1s"),
        ("KEYWARD_JOB_BATCH_ROWS", "100"),
    ];
    let platform = Platform::new(backend).await;
    let mut app = spawn_with_platform(backend, &platform, &env).await;
    let creds = app.create_tenant("platform");
    let (enc, _) = app.create_encryption(&creds).await;
    platform.fill(&app, &creds, &enc, 3_000).await;
    app.rotate(&creds, &enc).await;
    let (status, created) = app
        .post("/v1/jobs", &creds, &json!({"kind": "reencrypt", "encryptionId": enc, "maxRowsPerSecond": 500, "source": platform.source()}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    let job = created["jobId"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, view) = app.get(&format!("/v1/jobs/{job}"), &creds).await;
        assert!(
            matches!(view["state"].as_str(), Some("queued" | "running")),
            "the job is still walking: {view}"
        );
        if view["processed"].as_i64().unwrap_or(0) >= 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the job makes no progress: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::process::Command::new("kill")
        .args(["-KILL", &app.pid().to_string()])
        .status()
        .unwrap();
    app.kill_wait();
    let mut conn = platform.connect().await;
    sqlx::query("DELETE FROM secrets")
        .execute(&mut conn)
        .await
        .unwrap();
    app.start();
    let done = wait_for_job(&app, &creds, &job, Duration::from_secs(60)).await;
    assert_eq!(done["remainingByVersion"], json!({}), "{done}");
    assert!(done["rewrapped"].as_i64().unwrap() >= 200, "{done}");
}
