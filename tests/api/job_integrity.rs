//! The destroy guard reads what jobs found truly: the version active when a
//! job ended counts, the last job per table counts, a job over another table
//! or encryption clears nothing; and a job names no version id but its
//! encryption's (issue #26 item 1, issue #17 item 5).

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use sqlx::Connection;

use crate::helpers::{assert_error, send, Backend, Creds, TestApp};
use crate::jobs::{spawn_with_platform, wait_for_job, Platform};

crate::on_both_databases!(
    integrity_the_version_a_job_moved_every_row_to_stays_guarded_after_the_next_rotation,
    integrity_a_later_job_over_another_table_or_encryption_clears_no_version_in_use,
    integrity_a_job_reports_only_its_encryptions_version_ids,
);

/// Runs a job over `table` of the platform with `encryption` (or per row by
/// `encryption_id_column`), waits for it, returns its view.
pub(crate) async fn run_job(
    app: &TestApp,
    creds: &Creds,
    platform: &Platform,
    table: &str,
    encryption: Option<&str>,
) -> Value {
    let mut source = platform.source();
    source["table"] = json!(table);
    let mut body = json!({"kind": "reencrypt", "source": source});
    match encryption {
        Some(e) => body["encryptionId"] = json!(e),
        None => body["source"]["encryptionIdColumn"] = json!("enc"),
    }
    let (status, created) = app.post("/v1/jobs", creds, &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{created}");
    wait_for_job(
        app,
        creds,
        created["jobId"].as_str().unwrap(),
        Duration::from_secs(60),
    )
    .await
}

/// Sets a version's state; returns status and body.
async fn set_state(
    app: &TestApp,
    creds: &Creds,
    enc: &str,
    version: &str,
    body: Value,
) -> (StatusCode, Value) {
    let path = format!("/v1/encryptions/{enc}/versions/{version}");
    send(app.req(reqwest::Method::PATCH, &path, creds).json(&body)).await
}

async fn platform_sql(platform: &Platform, sql: &str) {
    sqlx::any::install_default_drivers();
    let url = platform.url();
    let url = if url.starts_with("sqlite:") {
        format!("{url}?mode=rwc")
    } else {
        url
    };
    let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
    sqlx::query(sql).execute(&mut conn).await.unwrap();
}

/// Job, rotate, destroy: the job moved every row to v2, which was active when
/// it ended; after the next rotation destroying v2 without `force` is
/// refused (the rows need it). A later job moves them on, and then v2 goes.
async fn integrity_the_version_a_job_moved_every_row_to_stays_guarded_after_the_next_rotation(
    backend: Backend,
) {
    let platform = Platform::new(backend).await;
    // A short destroy grace period (see integrity.rs), so the destroy that
    // the guard allows can happen within the test.
    let grace = [
        ("KEYWARD_CHANGE_FEED_MAX_LAG", "2s"),
        ("KEYWARD_DESTROY_GRACE", "3s"),
    ];
    let app = spawn_with_platform(backend, &platform, &grace).await;
    let creds = app.create_tenant("platform");
    let (enc, _) = app.create_encryption(&creds).await;
    platform.fill_rows(&app, &creds, &enc, 20).await;
    let v2 = app.rotate(&creds, &enc).await;
    let first = run_job(&app, &creds, &platform, "secrets", Some(&enc)).await;
    assert_eq!(first["rewrapped"], 20, "{first}");
    assert_eq!(first["remainingByVersion"], json!({}), "{first}");
    let v3 = app.rotate(&creds, &enc).await;

    let (status, body) = set_state(&app, &creds, &enc, &v2, json!({"state": "destroyed"})).await;
    assert_error(status, &body, 409, "version_in_use");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("20"),
        "{body}"
    );

    let second = run_job(&app, &creds, &platform, "secrets", Some(&enc)).await;
    assert_eq!(second["rewrapped"], 20, "{second}");
    // The guard is satisfied now; the grace period still applies.
    let (status, body) = set_state(&app, &creds, &enc, &v2, json!({"state": "disabled"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (status, body) =
            set_state(&app, &creds, &enc, &v2, json!({"state": "destroyed"})).await;
        if status == StatusCode::OK {
            break;
        }
        assert_error(status, &body, 409, "destroy_grace_pending");
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    // v3 now holds every row: the same holds for it after a rotation.
    app.rotate(&creds, &enc).await;
    let (status, body) = set_state(&app, &creds, &enc, &v3, json!({"state": "destroyed"})).await;
    assert_error(status, &body, 409, "version_in_use");
}

/// A job finds 20 rows left on v1 (disabled, so it cannot move them). Later
/// jobs over another table of the same encryption, over the same table with
/// another encryption, and per row over a table without the encryption's
/// rows each report nothing of v1: none of them clears it.
async fn integrity_a_later_job_over_another_table_or_encryption_clears_no_version_in_use(
    backend: Backend,
) {
    let platform = Platform::new(backend).await;
    let app = spawn_with_platform(backend, &platform, &[]).await;
    let creds = app.create_tenant("platform");
    let (enc, v1) = app.create_encryption(&creds).await;
    let (other_enc, _) = app.create_encryption(&creds).await;
    platform.fill_rows(&app, &creds, &enc, 20).await;
    app.rotate(&creds, &enc).await;
    let (status, body) = set_state(&app, &creds, &enc, &v1, json!({"state": "disabled"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let found = run_job(&app, &creds, &platform, "secrets", Some(&enc)).await;
    assert_eq!(found["remainingByVersion"][&v1], 20, "{found}");

    platform_sql(&platform, "CREATE TABLE others (id BIGINT PRIMARY KEY, cipher_text TEXT, version TEXT, metadata TEXT, enc TEXT)").await;
    let destroy = || set_state(&app, &creds, &enc, &v1, json!({"state": "destroyed"}));

    let other_table = run_job(&app, &creds, &platform, "others", Some(&enc)).await;
    assert_eq!(
        other_table["remainingByVersion"],
        json!({}),
        "{other_table}"
    );
    let (status, body) = destroy().await;
    assert_error(status, &body, 409, "version_in_use");

    let other_encryption = run_job(&app, &creds, &platform, "secrets", Some(&other_enc)).await;
    assert!(
        other_encryption["remainingByVersion"].get(&v1).is_none(),
        "{other_encryption}"
    );
    let (status, body) = destroy().await;
    assert_error(status, &body, 409, "version_in_use");

    let per_row = run_job(&app, &creds, &platform, "others", None).await;
    assert_eq!(per_row["remainingByVersion"], json!({}), "{per_row}");
    let (status, body) = destroy().await;
    assert_error(status, &body, 409, "version_in_use");

    let (status, body) = set_state(
        &app,
        &creds,
        &enc,
        &v1,
        json!({"state": "destroyed", "force": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "force stays: {body}");
}

/// Rows whose version column holds another encryption's version id, another
/// tenant's, an unknown UUID or no UUID at all are reported as
/// `unrecognized`, never under their text; the job's own rows move.
async fn integrity_a_job_reports_only_its_encryptions_version_ids(backend: Backend) {
    let platform = Platform::new(backend).await;
    let app = spawn_with_platform(backend, &platform, &[]).await;
    let creds = app.create_tenant("platform");
    let stranger = app.create_tenant("stranger");
    let (enc, _) = app.create_encryption(&creds).await;
    let (sibling, sibling_version) = app.create_encryption(&creds).await;
    let (_, foreign_version) = app.create_encryption(&stranger).await;
    platform.fill_rows(&app, &creds, &enc, 3).await;
    let unknown = uuid::Uuid::new_v4().to_string();
    for (id, version) in [
        (10, sibling_version.as_str()),
        (11, foreign_version.as_str()),
        (12, unknown.as_str()),
        (13, "not-a-version"),
    ] {
        platform_sql(
            &platform,
            &format!("INSERT INTO secrets VALUES ({id}, 'AAAA', '{version}', '{{}}')"),
        )
        .await;
    }
    let active = app.rotate(&creds, &enc).await;
    let done = run_job(&app, &creds, &platform, "secrets", Some(&enc)).await;
    assert_eq!(done["rewrapped"], 3, "{done}");
    assert_eq!(
        done["remainingByVersion"],
        json!({"unrecognized": 4}),
        "{done}"
    );
    let text = done.to_string();
    for leaked in [&sibling_version, &foreign_version, &unknown, &sibling] {
        assert!(!text.contains(leaked.as_str()), "{leaked} echoed: {text}");
    }
    assert!(!text.contains("not-a-version"));
    assert!(!text.contains(&active) || done["remainingByVersion"].get(&active).is_none());
}
