//! The audit log: one record per operation in a hash-chained JSON-lines file
//! and in the database, `GET /v1/audit` with filters and pages, and
//! `keyward audit verify` naming the first broken record.

use std::path::{Path, PathBuf};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{assert_error, contains, keyward_command, Backend, Creds, TestApp};
use crate::on_both_databases;

fn audit_env(dir: &Path) -> (PathBuf, String) {
    let path = dir.join("audit.jsonl");
    let text = path.display().to_string();
    (path, text)
}

async fn spawn_audited(backend: Backend) -> (TestApp, PathBuf) {
    let dir = tempfile::tempdir().unwrap().keep();
    let (path, text) = audit_env(&dir);
    let app = TestApp::spawn_with(backend, &[("KEYWARD_AUDIT_FILE", text.as_str())]).await;
    (app, path)
}

/// Every record matching `query`, following `nextCursor` pages of `limit`.
async fn all_records(app: &TestApp, creds: &Creds, query: &str, limit: u32) -> Vec<Value> {
    let mut records = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/audit?limit={limit}");
        if !query.is_empty() {
            path.push('&');
            path.push_str(query);
        }
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let (status, body) = app.get(&path, creds).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let page = body["records"].as_array().unwrap();
        assert!(page.len() <= limit as usize);
        records.extend(page.iter().cloned());
        match body["nextCursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return records,
        }
    }
}

/// An audited server with a tenant, an encryption and a connection of the
/// test's own to its database.
async fn audited_with_database(
    backend: Backend,
) -> (TestApp, PathBuf, Creds, String, sqlx::AnyConnection) {
    use sqlx::Connection;

    let (app, file) = spawn_audited(backend).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    sqlx::any::install_default_drivers();
    let conn = sqlx::AnyConnection::connect(&app.db.url).await.unwrap();
    (app, file, creds, enc, conn)
}

/// Encrypts under `enc` with `request_id`, which must be answered 200.
async fn encrypt_with_id(app: &TestApp, creds: &Creds, enc: &str, request_id: &str) {
    let resp = app
        .req(reqwest::Method::POST, "/v1/encrypt", creds)
        .header("x-request-id", request_id)
        .json(&json!({"encryptionId": enc, "data": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// Waits up to 15 s for `GET /v1/audit` to list exactly these encrypt
/// records, by request id, oldest first.
async fn table_holds_encrypts(app: &TestApp, creds: &Creds, request_ids: &[&str]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let records = all_records(app, creds, "operation=encrypt", 100).await;
        let mut ids: Vec<&str> = records
            .iter()
            .filter_map(|r| r["requestId"].as_str())
            .collect();
        ids.reverse();
        if ids == request_ids {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{ids:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `keyward audit verify FILE`, trusting `keys` (the server's checkpoint
/// public keys).
fn verify(path: &Path, keys: &[String]) -> std::process::Output {
    let mut command = keyward_command();
    command.args(["audit", "verify", path.to_str().unwrap()]);
    for key in keys {
        command.args(["--public-key", key]);
    }
    command.output().unwrap()
}

async fn every_operation_becomes_one_record_without_secrets(backend: Backend) {
    let (mut app, file) = spawn_audited(backend).await;
    let admin = app.create_tenant("acme");
    // Refused calls name no tenant: only an operator's audit key sees them all.
    let reader = app.create_operator();
    let (enc, first_version) = app.create_encryption(&admin).await;
    let plaintext = "audit-plaintext-7f3a9c";

    let resp = app
        .req(reqwest::Method::POST, "/v1/encrypt", &admin)
        .json(&json!({"encryptionId": enc, "data": plaintext}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let encrypt_request_id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let encrypted: Value = resp.json().await.unwrap();
    let (status, _) = app.decrypt(&admin, &encrypted).await;
    assert_eq!(status, StatusCode::OK);
    let mut tampered = crate::helpers::decrypt_body(&encrypted);
    tampered["metadata"]["nonce"] = json!("AAAAAAAAAAAAAAAA");
    let (status, body) = app.post("/v1/decrypt", &admin, &tampered).await;
    assert_error(status, &body, 400, "decryption_failed");
    let new_version = app.rotate(&admin, &enc).await;
    let (status, body) = app
        .post(
            "/v1/encrypt/batch",
            &admin,
            &json!({"items": [
                {"encryptionId": enc, "data": "batch-secret-1"},
                {"encryptionId": "nope", "data": "batch-secret-2"},
                {"encryptionId": enc, "data": "batch-secret-3"},
                {"encryptionId": "nope", "data": "batch-secret-4"},
                {"encryptionId": "nope", "data": "batch-secret-5"},
                {"encryptionId": enc, "data": "batch-secret-6"},
            ]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let wrong = Creds {
        secret: "kws_definitely-wrong-secret".into(),
        ..admin.clone()
    };
    let (status, _) = app
        .post(
            "/v1/encrypt",
            &wrong,
            &json!({"encryptionId": enc, "data": "x"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Newest first; filtered by encryption.
    let records = all_records(&app, &reader, &format!("encryptionId={enc}"), 1000).await;
    let ops: Vec<(&str, &str)> = records
        .iter()
        .rev()
        .map(|r| {
            (
                r["operation"].as_str().unwrap(),
                r["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ops,
        [
            ("encryption.create", "ok"),
            ("encrypt", "ok"),
            ("decrypt", "ok"),
            ("decrypt", "error"),
            ("rotate", "ok"),
            ("encrypt", "ok"),
        ],
        "{records:#?}"
    );
    let by_op = |op: &str, outcome: &str| {
        records
            .iter()
            .find(|r| r["operation"] == op && r["outcome"] == outcome)
            .unwrap_or_else(|| panic!("no {op}/{outcome} record"))
            .clone()
    };
    let enc_record = records
        .iter()
        .rev()
        .find(|r| r["operation"] == "encrypt")
        .unwrap();
    assert_eq!(enc_record["requestId"], encrypt_request_id.as_str());
    assert_eq!(enc_record["apiKeyId"], admin.key.as_str());
    assert_eq!(enc_record["tenantId"], admin.tenant_id.as_str());
    assert_eq!(enc_record["actor"], "api_key");
    assert_eq!(enc_record["versionId"], first_version.as_str());
    assert_eq!(enc_record["status"], 200);
    assert_eq!(enc_record["peer"], "127.0.0.1");
    assert!(enc_record["time"].as_str().unwrap().ends_with('Z'));
    let failed = by_op("decrypt", "error");
    assert_eq!(failed["error"], "decryption_failed");
    assert_eq!(failed["status"], 400);
    assert_eq!(by_op("rotate", "ok")["versionId"], new_version.as_str());
    // A batch is one record per encryption, version and outcome, not one
    // per item: the three good items in one, with their count.
    let batch_ok = records
        .iter()
        .find(|r| r["items"].is_number())
        .expect("the batch's items are recorded");
    assert_eq!(batch_ok["versionId"], new_version.as_str());
    assert_eq!(
        (&batch_ok["items"], &batch_ok["outcome"]),
        (&json!(3), &json!("ok"))
    );
    assert!(batch_ok.get("itemIndexes").is_none(), "{batch_ok}");

    // The batch's bad items have no encryption to filter by: find them by
    // operation; one record names the three, and where they were.
    let encrypts = all_records(&app, &reader, "operation=encrypt", 2).await;
    let groups: Vec<(i64, &str, Option<&str>, Option<&str>)> = encrypts
        .iter()
        .filter(|r| r["items"].is_number())
        .map(|r| {
            (
                r["items"].as_i64().unwrap(),
                r["outcome"].as_str().unwrap(),
                r["error"].as_str(),
                r["itemIndexes"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        groups,
        [
            (3, "error", Some("invalid_request"), Some("1,3-4")),
            (3, "ok", None, None)
        ]
    );
    let refused = encrypts
        .iter()
        .find(|r| r["actor"] == "unauthenticated")
        .expect("the refused call is recorded");
    assert_eq!(refused["error"], "invalid_credentials");
    assert_eq!(refused["apiKeyId"], admin.key.as_str());
    assert_eq!(refused["status"], 401);
    assert!(refused.get("tenantId").is_none());

    // Pages of 2 give exactly the records of one big page, newest first
    // (reading adds `audit.read` records, left out of the comparison).
    let everything = all_records(&app, &reader, "", 1000).await;
    let paged = all_records(&app, &reader, "", 2).await;
    let not_reads = |records: &[Value]| -> Vec<Value> {
        records
            .iter()
            .filter(|r| r["operation"] != "audit.read")
            .cloned()
            .collect()
    };
    assert_eq!(not_reads(&everything), not_reads(&paged));
    assert!(paged.len() > everything.len());
    let seqs: Vec<i64> = everything
        .iter()
        .map(|r| r["seq"].as_i64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] > w[1]), "{seqs:?}");
    // Reading the audit log is itself audited.
    assert!(everything.iter().any(|r| r["operation"] == "audit.read"));
    // Time filters.
    let none = all_records(&app, &reader, "to=2000-01-01T00:00:00Z", 100).await;
    assert!(none.is_empty());
    let recent = all_records(&app, &reader, "from=2000-01-01T00:00:00Z", 1000).await;
    assert!(recent.len() >= everything.len());
    // Any RFC 3339 offset: 02:00+02:00 is midnight UTC.
    let none = all_records(&app, &reader, "to=2000-01-01T02:00:00%2B02:00", 100).await;
    assert!(none.is_empty());
    let tenant_records = all_records(
        &app,
        &reader,
        &format!("tenantId={}&operation=decrypt", admin.tenant_id),
        1000,
    )
    .await;
    assert_eq!(tenant_records.len(), 2);

    // Admin scope only; bad parameters are 400s that name the parameter.
    let manager = app.create_key(&admin.tenant_id, "encrypt,decrypt,manage");
    let (status, body) = app.get("/v1/audit", &manager).await;
    assert_error(status, &body, 403, "insufficient_scope");
    for (query, word) in [
        ("limit=0", "limit"),
        ("cursor=abc", "cursor"),
        ("operation=steal", "operation"),
        ("from=yesterday", "from"),
        ("encryptionId=x", "encryptionId"),
        ("colour=red", "unknown"),
    ] {
        let (status, body) = app.get(&format!("/v1/audit?{query}"), &admin).await;
        assert_error(status, &body, 400, "invalid_request");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(word),
            "{query}: {body}"
        );
    }

    // The file holds the same records, chained and, once the server stopped,
    // covered by a signed checkpoint; nothing secret anywhere.
    app.stop();
    let out = verify(&file, &crate::checkpoints::public_keys(&app));
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: "));
    let text = std::fs::read(&file).unwrap();
    let ciphertext = encrypted["cipherText"].as_str().unwrap();
    let table = serde_json::to_vec(&everything).unwrap();
    for haystack in [&text, &table] {
        for needle in [
            plaintext,
            "batch-secret-1",
            "batch-secret-2",
            admin.secret.as_str(),
            wrong.secret.as_str(),
            ciphertext,
            app.master_key.as_str(),
        ] {
            assert!(!contains(haystack, needle.as_bytes()), "{needle} leaked");
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the audit file is private: {mode:o}");
    }
}

on_both_databases!(
    every_operation_becomes_one_record_without_secrets,
    every_audited_route_called_once_leaves_one_record_of_its_operation,
    audit_segments_are_stored_compressed,
    records_the_database_refused_arrive_once_it_accepts_them,
    the_file_keeps_up_while_the_table_waits_for_the_database,
    the_table_forgets_records_past_the_retention_and_the_file_keeps_them
);

/// Issue #17/#25: the audit table had no retention and grew with every call.
/// With `audit_retention`, segments whose newest record is older are deleted
/// in the background; `GET /v1/audit` then lists only newer records, while
/// the audit file keeps every record and its chain still verifies.
async fn the_table_forgets_records_past_the_retention_and_the_file_keeps_them(backend: Backend) {
    let dir = tempfile::tempdir().unwrap().keep();
    let (file, text) = audit_env(&dir);
    let mut app = TestApp::spawn_with(
        backend,
        &[
            ("KEYWARD_AUDIT_FILE", text.as_str()),
            ("KEYWARD_AUDIT_RETENTION", "3s"),
        ],
    )
    .await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    encrypt_with_id(&app, &creds, &enc, "retention-old-1").await;
    encrypt_with_id(&app, &creds, &enc, "retention-old-2").await;
    table_holds_encrypts(&app, &creds, &["retention-old-1", "retention-old-2"]).await;

    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    encrypt_with_id(&app, &creds, &enc, "retention-new").await;
    // Checked every second for a 3 s retention: the old ones go, the new
    // one stays for 3 s.
    table_holds_encrypts(&app, &creds, &["retention-new"]).await;
    assert!(
        app.log_shows("audit retention: deleted expired segments")
            .await
    );
    // The deleted segments' keys went with them.
    {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&app.db.url).await.unwrap();
        let orphans: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM audit_segment_keys k WHERE NOT EXISTS \
             (SELECT 1 FROM audit_segments s WHERE s.id = k.segment_id)",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!(orphans, 0);
    }

    let lines = std::fs::read_to_string(&file).unwrap();
    for id in ["retention-old-1", "retention-old-2", "retention-new"] {
        assert!(lines.contains(id), "{id} is not in the audit file");
    }
    // Stopped, so a signed checkpoint covers the whole file.
    app.stop();
    let verified = verify(&file, &crate::checkpoints::public_keys(&app));
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chain_continues_across_restarts_and_verify_names_the_first_broken_record() {
    let (mut app, file) = spawn_audited(Backend::Sqlite).await;
    let admin = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&admin).await;
    for i in 0..3 {
        app.encrypt(&admin, &enc, &format!("a{i}")).await;
    }
    app.restart();
    for i in 0..3 {
        app.encrypt(&admin, &enc, &format!("b{i}")).await;
    }
    app.stop(); // SIGTERM: every queued record is written before exit.

    let text = std::fs::read_to_string(&file).unwrap();
    // Each run ended with a checkpoint covering its records.
    let checkpoints: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("{\"checkpoint\":"))
        .collect();
    assert_eq!(checkpoints.len(), 2, "{text}");
    assert!(checkpoints[0].contains("\"seq\":4,"), "{text}");
    assert!(checkpoints[1].contains("\"seq\":7,"), "{text}");
    assert!(checkpoints
        .iter()
        .all(|c| c.contains("\"reason\":\"shutdown\"")));
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("{\"checkpoint\":"))
        .collect();
    assert_eq!(lines.len(), 7, "{text}");
    let seqs: Vec<u64> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
    let out = verify(&file, &crate::checkpoints::public_keys(&app));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("7 records"));
    // The tampering below is on the records alone (no checkpoints): the
    // chain names the first broken record.

    let broken = |lines: Vec<String>| {
        let path = file.with_file_name("tampered.jsonl");
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let out = verify(&path, &[]);
        assert_eq!(out.status.code(), Some(1), "tampering went unnoticed");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let owned = || lines.iter().map(|l| l.to_string()).collect::<Vec<_>>();

    // An edited field.
    let mut edited = owned();
    edited[3] = edited[3].replacen(",\"t\":1", ",\"t\":2", 1);
    assert_ne!(edited[3], lines[3]);
    let message = broken(edited);
    assert!(
        message.contains("line 4 (seq 4)") && message.contains("changed"),
        "{message}"
    );
    // A removed record.
    let mut removed = owned();
    removed.remove(2);
    let message = broken(removed);
    assert!(message.contains("line 3 (seq 4)"), "{message}");
    // Records swapped.
    let mut swapped = owned();
    swapped.swap(4, 5);
    assert!(broken(swapped).contains("line 5"));
    // Not a record at all.
    let mut garbage = owned();
    garbage[6] = "{\"hello\": 1}".into();
    assert!(broken(garbage).contains("line 7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn automatic_rotations_are_audited_as_the_system() {
    let env_app = TestApp::spawn_with(
        Backend::Sqlite,
        &[
            ("KEYWARD_MAINTENANCE_INTERVAL", "200ms"),
            ("KEYWARD_AUDIT_FILE", "-"),
        ],
    )
    .await;
    let admin = env_app.create_tenant("acme");
    let (enc, _) = env_app.create_encryption(&admin).await;
    let (status, body) = env_app
        .req(
            reqwest::Method::PATCH,
            &format!("/v1/encryptions/{enc}"),
            &admin,
        )
        .json(&json!({"autoRotatePeriod": "1s"}))
        .send()
        .await
        .map(|r| (r.status(), r))
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{:?}", body.text().await);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let records = all_records(&env_app, &admin, "operation=rotate.automatic", 100).await;
        if let Some(r) = records.first() {
            assert_eq!(r["actor"], "system");
            // In the tenant's own audit: the record names the tenant.
            assert_eq!(r["tenantId"], admin.tenant_id.as_str());
            assert_eq!(r["encryptionId"], enc.as_str());
            assert!(r["versionId"].is_string());
            assert!(r.get("apiKeyId").is_none());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no automatic rotation audited"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    // With KEYWARD_AUDIT_FILE=-, the records are lines on standard output,
    // as in a file (format v2).
    assert!(env_app.log_text().contains("\"op\":\"rotate.automatic\""));
}

/// Segments are stored as zstd frames (`packed`, migrations 0006/0007) with
/// `records` empty, several times smaller than their text, and unpack to the
/// lines of the audit file; one still filling is written after a short delay. A row that does not unpack is an error answer, not
/// a crash and not a silently shorter page.
/// `line` (format v2) as the first line of a table segment: stating
/// `prev`, which the writer adds there so that every record read from the
/// table has it (the hash does not cover `prev`).
fn as_segment_start(line: &str, record: &Value) -> String {
    use base64::Engine;
    if line.contains("\"prev\":") {
        return line.to_string();
    }
    let hex = record["prev"].as_str().unwrap();
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    let prev = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    line.replacen(",\"h\":", &format!(",\"prev\":\"{prev}\",\"h\":"), 1)
}

async fn audit_segments_are_stored_compressed(backend: Backend) {
    let (app, file, creds, enc, mut conn) = audited_with_database(backend).await;
    // 200 calls (a batch would be one record).
    for i in 0..200 {
        let item = json!({"encryptionId": enc, "data": format!("item {i}")});
        let (status, body) = app.post("/v1/encrypt", &creds, &item).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    // A segment that is not full reaches the table on its own within about
    // 100 ms, with no read waiting for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let frames: Vec<Vec<u8>> =
            sqlx::query_scalar("SELECT packed FROM audit_segments WHERE packed IS NOT NULL")
                .fetch_all(&mut conn)
                .await
                .unwrap();
        let encrypts: usize = frames
            .iter()
            .map(|f| {
                let text = zstd::decode_all(f.as_slice()).unwrap();
                let text = String::from_utf8(text).unwrap();
                assert!(text.lines().count() <= 1000);
                text.matches("\"op\":\"encrypt\"").count()
            })
            .sum();
        if encrypts == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{encrypts} of 200");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let records = all_records(&app, &creds, "operation=encrypt", 1000).await;
    assert_eq!(records.len(), 200);
    let rows: Vec<(i64, String, Option<Vec<u8>>)> =
        sqlx::query_as("SELECT id, records, packed FROM audit_segments ORDER BY id")
            .fetch_all(&mut conn)
            .await
            .unwrap();
    let lines = std::fs::read_to_string(&file).unwrap();
    let mut unpacked_total = 0;
    let mut packed_total = 0;
    for (id, text, packed) in &rows {
        assert_eq!(text, "", "segment {id} keeps its text only packed");
        let packed = packed.as_ref().expect("every new segment is packed");
        let unpacked = String::from_utf8(zstd::decode_all(packed.as_slice()).unwrap()).unwrap();
        assert!(unpacked.ends_with('\n'), "segment {id}");
        // What the table holds is what the file holds, line for line,
        // except that a segment's first line states its `prev` (the file
        // states it on the file's first record only).
        for (i, line) in unpacked.lines().enumerate() {
            let in_file = if i == 0 && !lines.contains(line) {
                let at = line.find(",\"prev\":\"").unwrap();
                let end = line.find(",\"h\":\"").unwrap();
                assert_eq!(end - at, 53, "{line}");
                format!("{}{}", &line[..at], &line[end..])
            } else {
                line.to_string()
            };
            assert!(lines.contains(&in_file), "segment {id}: {line}");
        }
        unpacked_total += unpacked.len();
        packed_total += packed.len();
    }
    assert!(
        packed_total * 4 < unpacked_total,
        "{packed_total} bytes packed for {unpacked_total}"
    );

    // A segment from before the migrations (its text in `records`, no
    // `packed`; one of the lines above, its status changed to tell it apart)
    // reads as it did.
    let newest = records.iter().max_by_key(|r| r["seq"].as_u64()).unwrap();
    let line = lines
        .lines()
        .find(|l| l.starts_with(&format!("{{\"v\":2,\"seq\":{},", newest["seq"])))
        .unwrap();
    let old: i64 = sqlx::query_scalar(
        "INSERT INTO audit_segments (first_ms, last_ms, records) VALUES (1, 2, $1) RETURNING id",
    )
    .bind(format!(
        "{}\n",
        as_segment_start(line, newest).replace("\"st\":200", "\"st\":299")
    ))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO audit_segment_keys (kind, value, segment_id) VALUES ('operation', 'encrypt', $1)",
    )
    .bind(old)
    .execute(&mut conn)
    .await
    .unwrap();
    // The hand-made segment is indexed by operation only: an operator reads it.
    let operator = app.create_operator();
    let (status, body) = app
        .get("/v1/audit?operation=encrypt&limit=1", &operator)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut expected = newest.clone();
    expected["status"] = json!(299);
    assert_eq!(body["records"], json!([expected]), "{body}");

    // Damaged frames: the read fails as a server error.
    sqlx::query("UPDATE audit_segments SET packed = $1 WHERE packed IS NOT NULL")
        .bind(b"not a zstd frame".to_vec())
        .execute(&mut conn)
        .await
        .unwrap();
    let (status, body) = app.get("/v1/audit?limit=10", &operator).await;
    assert_error(status, &body, 500, "internal");
    assert!(
        !app.log_text().contains("item 1"),
        "nothing of the records in the log"
    );
}

/// While the database refuses audit rows, requests are still answered and
/// recorded in the file; the writer retries, and once the database accepts
/// rows again every held record reaches the table, in order.
async fn records_the_database_refused_arrive_once_it_accepts_them(backend: Backend) {
    let (app, file, creds, enc, mut conn) = audited_with_database(backend).await;
    let (refuse, accept): (&[&str], &str) = match backend {
        Backend::Sqlite => (
            &[
                "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_segments \
               BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
            ],
            "DROP TRIGGER refuse_audit",
        ),
        Backend::Postgres => (
            &[
                "CREATE FUNCTION refuse_audit() RETURNS trigger LANGUAGE plpgsql \
                 AS $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$",
                "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_segments \
                 FOR EACH ROW EXECUTE FUNCTION refuse_audit()",
            ],
            "DROP TRIGGER refuse_audit ON audit_segments",
        ),
    };
    for sql in refuse {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }

    let sent = ["held-0", "held-1", "held-2", "held-3", "held-4"];
    for id in sent {
        encrypt_with_id(&app, &creds, &enc, id).await;
    }
    assert!(
        app.log_shows("cannot write audit records to the database; retrying")
            .await
    );
    let (status, page) = app.get("/v1/audit?operation=encrypt", &creds).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["records"], json!([]), "not in the table yet");
    let metrics = app.get_text("/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("keyward_audit_write_errors_total{sink=\"database\"}")),
        "{metrics}"
    );
    let in_file = std::fs::read_to_string(&file).unwrap();
    for id in sent {
        assert!(in_file.contains(&format!("\"requestId\":\"{id}\"")), "{id}");
    }

    sqlx::query(accept).execute(&mut conn).await.unwrap();
    table_holds_encrypts(&app, &creds, &sent).await;
    assert!(
        app.log_shows("audit records reach the database again")
            .await
    );
}

/// A database that hangs (here: a lock another connection holds) holds back
/// the table, never the file: records keep reaching the file, and the table
/// catches up once the lock is gone.
async fn the_file_keeps_up_while_the_table_waits_for_the_database(backend: Backend) {
    let (app, file, creds, enc, mut conn) = audited_with_database(backend).await;
    let lock: &[&str] = match backend {
        Backend::Sqlite => &["BEGIN IMMEDIATE"],
        Backend::Postgres => &[
            "BEGIN",
            "LOCK TABLE audit_segments IN ACCESS EXCLUSIVE MODE",
        ],
    };
    for sql in lock {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }

    encrypt_with_id(&app, &creds, &enc, "waits-1").await;
    // By now the table's write of the first record is waiting for the lock.
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    encrypt_with_id(&app, &creds, &enc, "waits-2").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while !std::fs::read_to_string(&file)
        .unwrap()
        .contains("\"requestId\":\"waits-2\"")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the file waits for the database"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    sqlx::query("ROLLBACK").execute(&mut conn).await.unwrap();
    table_holds_encrypts(&app, &creds, &["waits-1", "waits-2"]).await;
}

/// Every route that takes credentials (as the served OpenAPI document lists
/// them), called once with valid credentials, leaves exactly one record, of
/// its own operation. HEAD on a GET route is that GET's read.
async fn every_audited_route_called_once_leaves_one_record_of_its_operation(backend: Backend) {
    let platform = crate::jobs::Platform::new(backend).await;
    let dir = tempfile::tempdir().unwrap().keep();
    let (file, text) = audit_env(&dir);
    let (k, v) = platform.sources_env(&["acme"]);
    let app = TestApp::spawn_with(backend, &[("KEYWARD_AUDIT_FILE", text.as_str()), (k, &v)]).await;
    let creds = app.create_tenant("acme");
    let operator = app.create_operator();
    let (enc, first_version) = app.create_encryption(&creds).await;
    let encrypted = app.encrypt(&creds, &enc, "audited").await;
    let ciphertext = crate::helpers::decrypt_body(&encrypted);
    let source = platform.source();
    // An exportable RSA encryption (public key, export) and an AES one to
    // import a key into, wrapped outside Keyward; the export goes to the
    // wrapping key's public half (any RSA key of 3072 bits or more does).
    let (status, rsa) = app
        .post(
            "/v1/encryptions",
            &creds,
            &json!({"algorithm": "RSA-OAEP-256", "exportable": true}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{rsa}");
    let rsa_path = format!(
        "/v1/encryptions/{}/versions/{}",
        rsa["encryptionId"].as_str().unwrap(),
        rsa["activeVersionId"].as_str().unwrap()
    );
    let (byok, _) = app.create_encryption(&creds).await;
    let (_, wrapping) = app.get("/v1/import/wrapping-key", &creds).await;
    let wrapped = crate::helpers::run_python(
        crate::rsa_oaep::WRAP_FOR_IMPORT,
        &json!({"pem": wrapping["publicKeyPem"], "keys": ["33".repeat(32)]}),
    );

    // (method, route as documented, path, body, operation)
    use reqwest::Method;
    let enc_path = format!("/v1/encryptions/{enc}");
    let mut calls: Vec<(Method, &str, String, Option<Value>, &str)> = vec![
        (
            Method::POST,
            "/v1/encrypt",
            "/v1/encrypt".into(),
            Some(json!({"encryptionId": enc, "data": "x"})),
            "encrypt",
        ),
        (
            Method::POST,
            "/v1/decrypt",
            "/v1/decrypt".into(),
            Some(ciphertext.clone()),
            "decrypt",
        ),
        (
            Method::POST,
            "/v1/rotate",
            "/v1/rotate".into(),
            Some(json!({"encryptionId": enc})),
            "rotate",
        ),
        (
            Method::POST,
            "/v1/rewrap",
            "/v1/rewrap".into(),
            Some(ciphertext.clone()),
            "rewrap",
        ),
        (
            Method::POST,
            "/v1/encrypt/batch",
            "/v1/encrypt/batch".into(),
            Some(json!({"items": [{"encryptionId": enc, "data": "x"}]})),
            "encrypt",
        ),
        (
            Method::POST,
            "/v1/decrypt/batch",
            "/v1/decrypt/batch".into(),
            Some(json!({"items": [ciphertext]})),
            "decrypt",
        ),
        (
            Method::POST,
            "/v1/rewrap/batch",
            "/v1/rewrap/batch".into(),
            Some(json!({"items": [ciphertext]})),
            "rewrap",
        ),
        (
            Method::GET,
            "/v1/encryptions",
            "/v1/encryptions".into(),
            None,
            "encryption.list",
        ),
        (
            Method::POST,
            "/v1/encryptions",
            "/v1/encryptions".into(),
            Some(json!({})),
            "encryption.create",
        ),
        (
            Method::GET,
            "/v1/encryptions/{id}",
            enc_path.clone(),
            None,
            "encryption.read",
        ),
        (
            Method::HEAD,
            "/v1/encryptions/{id}",
            enc_path.clone(),
            None,
            "encryption.read",
        ),
        (
            Method::PATCH,
            "/v1/encryptions/{id}",
            enc_path.clone(),
            Some(json!({"autoRotatePeriod": null})),
            "encryption.update",
        ),
        // After the rotation above, the first version is no longer active.
        (
            Method::PATCH,
            "/v1/encryptions/{id}/versions/{versionId}",
            format!("{enc_path}/versions/{first_version}"),
            Some(json!({"state": "decrypt_only"})),
            "version.update",
        ),
        (
            Method::GET,
            "/v1/encryptions/{id}/versions/{versionId}/public-key",
            format!("{rsa_path}/public-key"),
            None,
            "version.public_key",
        ),
        (
            Method::GET,
            "/v1/import/wrapping-key",
            "/v1/import/wrapping-key".into(),
            None,
            "import.wrapping_key",
        ),
        (
            Method::POST,
            "/v1/encryptions/{id}/import",
            format!("/v1/encryptions/{byok}/import"),
            Some(
                json!({"wrappedKey": wrapped[0], "wrappingAlgorithm": "RSA_AES_KEY_WRAP_SHA_256"}),
            ),
            "version.import",
        ),
        (
            Method::POST,
            "/v1/encryptions/{id}/versions/{versionId}/export",
            format!("{rsa_path}/export"),
            Some(json!({"publicKey": wrapping["publicKeyPem"]})),
            "version.export",
        ),
        (
            Method::POST,
            "/v1/encryptions/{id}/indexes",
            format!("{enc_path}/indexes"),
            Some(json!({"name": "email", "bits": 32})),
            "index.create",
        ),
        (
            Method::GET,
            "/v1/encryptions/{id}/indexes",
            format!("{enc_path}/indexes"),
            None,
            "index.list",
        ),
        (
            Method::POST,
            "/v1/encryptions/{id}/indexes/{name}/rotate",
            format!("{enc_path}/indexes/email/rotate"),
            None,
            "index.rotate",
        ),
        (
            Method::PATCH,
            "/v1/encryptions/{id}/indexes/{name}",
            format!("{enc_path}/indexes/email"),
            Some(json!({"minVersion": 2})),
            "index.update",
        ),
        (
            Method::POST,
            "/v1/datakey",
            "/v1/datakey".into(),
            Some(json!({"encryptionId": enc})),
            "datakey.generate",
        ),
        // A raw body (below); its stream is then decrypted.
        (
            Method::POST,
            "/v1/encrypt/stream",
            format!("/v1/encrypt/stream?encryptionId={enc}"),
            None,
            "encrypt.stream",
        ),
        (
            Method::POST,
            "/v1/index",
            "/v1/index".into(),
            Some(json!({"encryptionId": enc, "data": "a"})),
            "index.compute",
        ),
        (
            Method::POST,
            "/v1/index/batch",
            "/v1/index/batch".into(),
            Some(json!({"items": [{"encryptionId": enc, "data": "a"}]})),
            "index.compute",
        ),
        (
            Method::POST,
            "/v1/jobs",
            "/v1/jobs".into(),
            Some(json!({"kind": "reencrypt", "encryptionId": enc, "source": source})),
            "job.create",
        ),
        (Method::GET, "/v1/jobs", "/v1/jobs".into(), None, "job.list"),
        (
            Method::GET,
            "/v1/admin/root-kek",
            "/v1/admin/root-kek".into(),
            None,
            "root_kek.read",
        ),
        (
            Method::POST,
            "/v1/admin/root-kek/rotate",
            "/v1/admin/root-kek/rotate".into(),
            None,
            "root_kek.rotate",
        ),
        (
            Method::GET,
            "/v1/admin/client-certificates",
            "/v1/admin/client-certificates".into(),
            None,
            "client_cert.list",
        ),
        (
            Method::GET,
            "/v1/audit",
            "/v1/audit".into(),
            None,
            "audit.read",
        ),
        (
            Method::GET,
            "/v1/api-keys",
            "/v1/api-keys".into(),
            None,
            "api_key.list",
        ),
        (
            Method::POST,
            "/v1/api-keys",
            "/v1/api-keys".into(),
            Some(json!({"scopes": ["encrypt"]})),
            "api_key.create",
        ),
        (
            Method::GET,
            "/v1/tenants",
            "/v1/tenants".into(),
            None,
            "tenant.list",
        ),
        (
            Method::POST,
            "/v1/tenants",
            "/v1/tenants".into(),
            Some(json!({"name": "globex"})),
            "tenant.create",
        ),
    ];
    // Operator routes are called with the operator key, the others with the
    // tenant's; an operator's record names the tenant it acted on, if any.
    let is_operator_route =
        |route: &str| route.starts_with("/v1/tenants") || route.starts_with("/v1/admin");
    let mut globex = String::new();

    let mut request_ids = Vec::new();
    let mut job = String::new();
    let mut sealed = Vec::new();
    let mut i = 0;
    while i < calls.len() {
        let (method, route, path, body, _) = calls[i].clone();
        let id = format!("every-route-{i}");
        let caller = if is_operator_route(route) {
            &operator
        } else {
            &creds
        };
        let mut req = app
            .req(method.clone(), &path, caller)
            .header("x-request-id", &id);
        if let Some(b) = &body {
            req = req.json(b);
        }
        if route.ends_with("/stream") {
            // The streaming routes take and give raw bytes.
            let raw = if route == "/v1/encrypt/stream" {
                b"audited".to_vec()
            } else {
                sealed.clone()
            };
            let resp = req
                .header("content-type", "application/octet-stream")
                .body(raw)
                .send()
                .await
                .unwrap();
            assert!(resp.status().is_success(), "{method} {path}");
            let bytes = resp.bytes().await.unwrap().to_vec();
            if route == "/v1/encrypt/stream" {
                sealed = bytes;
                calls.push((
                    Method::POST,
                    "/v1/decrypt/stream",
                    "/v1/decrypt/stream".into(),
                    None,
                    "decrypt.stream",
                ));
            } else {
                assert_eq!(bytes, b"audited");
            }
            request_ids.push(id);
            i += 1;
            continue;
        }
        let (status, answer) = crate::helpers::send(req).await;
        assert!(status.is_success(), "{method} {path}: {status} {answer}");
        if route == "/v1/jobs" && method == Method::POST {
            job = answer["jobId"].as_str().unwrap().to_string();
            calls.push((
                Method::GET,
                "/v1/jobs/{id}",
                format!("/v1/jobs/{job}"),
                None,
                "job.read",
            ));
            calls.push((
                Method::POST,
                "/v1/jobs/{id}/cancel",
                format!("/v1/jobs/{job}/cancel"),
                None,
                "job.cancel",
            ));
        }
        if route == "/v1/datakey" {
            let wrapped = answer["wrappedKey"].clone();
            let body = json!({"encryptionId": enc, "wrappedKey": wrapped});
            calls.push((
                Method::POST,
                "/v1/datakey/unwrap",
                "/v1/datakey/unwrap".into(),
                Some(body.clone()),
                "datakey.unwrap",
            ));
            calls.push((
                Method::POST,
                "/v1/datakey/rewrap",
                "/v1/datakey/rewrap".into(),
                Some(body),
                "datakey.rewrap",
            ));
        }
        if route == "/v1/api-keys" && method == Method::POST {
            let key = answer["apiKey"].as_str().unwrap().to_string();
            calls.push((
                Method::POST,
                "/v1/api-keys/{keyId}/revoke",
                format!("/v1/api-keys/{key}/revoke"),
                None,
                "api_key.revoke",
            ));
        }
        if route == "/v1/tenants" && method == Method::POST {
            globex = answer["tenantId"].as_str().unwrap().to_string();
            calls.push((
                Method::POST,
                "/v1/tenants/{tenantId}/api-keys",
                format!("/v1/tenants/{globex}/api-keys"),
                Some(json!({"scopes": ["encrypt", "decrypt"]})),
                "api_key.create",
            ));
            calls.push((
                Method::GET,
                "/v1/tenants/{tenantId}/api-keys",
                format!("/v1/tenants/{globex}/api-keys"),
                None,
                "api_key.list",
            ));
        }
        if route == "/v1/tenants/{tenantId}/api-keys" && method == Method::POST {
            let key = answer["apiKey"].as_str().unwrap().to_string();
            calls.push((
                Method::POST,
                "/v1/tenants/{tenantId}/api-keys/{keyId}/revoke",
                format!("/v1/tenants/{globex}/api-keys/{key}/revoke"),
                None,
                "api_key.revoke",
            ));
            calls.push((
                Method::POST,
                "/v1/tenants/{tenantId}/disable",
                format!("/v1/tenants/{globex}/disable"),
                None,
                "tenant.disable",
            ));
        }
        request_ids.push(id);
        i += 1;
    }
    assert!(!job.is_empty());

    // The calls cover every route that takes credentials, and only those.
    let document: Value = serde_json::from_str(&app.get_text("/openapi.json").await).unwrap();
    let mut documented = std::collections::BTreeSet::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            if operation["security"]
                .as_array()
                .is_some_and(|s| !s.is_empty())
            {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let called: std::collections::BTreeSet<(String, String)> = calls
        .iter()
        .filter(|c| c.0 != Method::HEAD)
        .map(|c| (c.0.to_string(), c.1.to_string()))
        .collect();
    assert_eq!(called, documented);

    // The writer keeps order: once the last call's record is in the file,
    // every earlier one is.
    let last = request_ids.last().unwrap().clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let records: Vec<Value> = loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let records: Vec<Value> = keyward::audit::read_records(&text)
            .into_iter()
            .map(|r| serde_json::to_value(r.unwrap()).unwrap())
            .collect();
        if records.iter().any(|r| r["requestId"] == last.as_str()) {
            break records;
        }
        assert!(std::time::Instant::now() < deadline, "no record of {last}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    for (call, id) in calls.iter().zip(&request_ids) {
        let mine: Vec<&Value> = records
            .iter()
            .filter(|r| r["requestId"] == id.as_str())
            .collect();
        assert_eq!(mine.len(), 1, "{} {}: {mine:?}", call.0, call.2);
        assert_eq!(mine[0]["operation"], call.4, "{} {}", call.0, call.2);
        assert_eq!(mine[0]["outcome"], "ok", "{} {}", call.0, call.2);
        let tenant = if !is_operator_route(call.1) {
            json!(creds.tenant_id)
        } else if call.1.starts_with("/v1/tenants/")
            || (call.1 == "/v1/tenants" && call.0 == Method::POST)
        {
            json!(globex)
        } else {
            Value::Null
        };
        assert_eq!(mine[0]["tenantId"], tenant, "{} {}", call.0, call.2);
    }
    let version_update = records
        .iter()
        .find(|r| r["operation"] == "version.update")
        .unwrap();
    assert_eq!(version_update["encryptionId"], enc.as_str());
    assert_eq!(version_update["versionId"], first_version.as_str());
}
