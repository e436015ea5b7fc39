//! Prometheus metrics, parsed with the official Python parser
//! (`prometheus_client`, installed into the test peers' venv by scripts/test).

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{Backend, Creds, TestApp};
use crate::jobs::Platform;

crate::on_both_databases!(metrics_name_no_tenant_encryption_or_job_and_keep_the_same_series);

const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    out[fam.name] = {"type": fam.type, "samples": [[s.name, s.labels, s.value] for s in fam.samples]}
print(json.dumps(out))
"#;

fn parse(text: &str) -> Value {
    let python = std::env::var("KEYWARD_TEST_PYTHON")
        .expect("KEYWARD_TEST_PYTHON is not set: run the tests through scripts/test (it installs prometheus_client)");
    let mut child = Command::new(python)
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the text: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sample(families: &Value, family: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    families[family]["samples"]
        .as_array()
        .unwrap_or_else(|| panic!("no family {family} in {families}"))
        .iter()
        .find(|s| s[0] == name && labels.iter().all(|(k, v)| s[1][k] == *v))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?} in {}", families[family]))[2]
        .as_f64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_valid_prometheus_text_with_the_promised_series() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[("KEYWARD_METRICS_REFRESH_INTERVAL", "100ms")],
    )
    .await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    for _ in 0..3 {
        let e = app.encrypt(&creds, &enc, "0123456789").await;
        assert_eq!(app.decrypt(&creds, &e).await.0, 200);
    }
    let wrong = Creds {
        secret: "kws_nope".into(),
        ..creds.clone()
    };
    let (status, _) = app
        .post(
            "/v1/encrypt",
            &wrong,
            &json!({"encryptionId": enc, "data": "x"}),
        )
        .await;
    assert_eq!(status, 401);

    // Key versions come from the database by a refresh every 100 ms here.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let text = app.get_text("/metrics").await;
    assert!(!text.contains(&creds.secret) && !text.contains("0123456789"));
    let m = parse(&text);
    let ok = [
        ("route", "/v1/encrypt"),
        ("method", "POST"),
        ("status", "200"),
    ];
    assert!(
        sample(
            &m,
            "keyward_http_requests",
            "keyward_http_requests_total",
            &ok
        ) >= 3.0
    );
    assert_eq!(
        m["keyward_http_request_duration_seconds"]["type"],
        "histogram"
    );
    assert!(
        sample(
            &m,
            "keyward_http_request_duration_seconds",
            "keyward_http_request_duration_seconds_count",
            &ok
        ) >= 3.0
    );
    assert!(
        sample(
            &m,
            "keyward_http_requests",
            "keyward_http_requests_total",
            &[("status", "401")]
        ) >= 1.0
    );
    assert!(
        sample(
            &m,
            "keyward_bytes_encrypted",
            "keyward_bytes_encrypted_total",
            &[]
        ) >= 30.0
    );
    assert!(
        sample(
            &m,
            "keyward_bytes_decrypted",
            "keyward_bytes_decrypted_total",
            &[]
        ) >= 30.0
    );
    assert!(
        sample(
            &m,
            "keyward_key_ring_entries",
            "keyward_key_ring_entries",
            &[]
        ) >= 1.0
    );
    assert!(
        sample(
            &m,
            "keyward_key_ring_hits",
            "keyward_key_ring_hits_total",
            &[]
        ) >= 5.0
    );
    assert!(
        sample(
            &m,
            "keyward_key_versions",
            "keyward_key_versions",
            &[("state", "active")]
        ) >= 1.0
    );
    assert_eq!(
        sample(
            &m,
            "keyward_master_key_provider_up",
            "keyward_master_key_provider_up",
            &[("provider", "env")]
        ),
        1.0
    );
    assert!(
        sample(
            &m,
            "keyward_auth_failures",
            "keyward_auth_failures_total",
            &[]
        ) >= 1.0
    );
}

/// A request over the time limit is answered 503 `timeout` inside the audit
/// and metrics layer: its audit record and its metric carry that status (not a
/// `cancelled` record and no metric at all). A path no route has is counted as
/// `unmatched`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_unknown_paths_are_answered_recorded_and_counted() {
    use futures::StreamExt;

    let app = TestApp::spawn_with(Backend::Sqlite, &[("KEYWARD_REQUEST_TIMEOUT", "1s")]).await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;

    // The body's end comes after the time limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(format!(r#"{{"encryptionId":"{enc}","data":""#).into_bytes()),
        Ok(b"late\"}".to_vec()),
    ];
    let stream = futures::stream::iter(chunks)
        .enumerate()
        .then(|(i, c)| async move {
            if i > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
            }
            c
        });
    let started = std::time::Instant::now();
    let resp = app
        .req(reqwest::Method::POST, "/v1/encrypt", &creds)
        .header("content-type", "application/json")
        .header("x-request-id", "slow-request-1")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(started.elapsed() < std::time::Duration::from_millis(2400));
    assert_eq!(resp.headers()["x-request-id"], "slow-request-1");
    assert_eq!(resp.headers()["content-type"], "application/json");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "timeout", "{body}");
    assert_eq!(body["error"]["message"], "the request timed out");

    let (status, page) = app.get("/v1/audit?operation=encrypt", &creds).await;
    assert_eq!(status, 200, "{page}");
    let record = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["requestId"] == "slow-request-1")
        .unwrap_or_else(|| panic!("no record of the slow request in {page}"));
    assert_eq!(record["status"], 503, "{record}");
    assert_eq!(record["outcome"], "error");
    assert_eq!(record["error"], "timeout");
    // The body never arrived whole: who called is known, what it named is not.
    assert_eq!(record["tenantId"], creds.tenant_id.as_str());
    assert!(record.get("encryptionId").is_none(), "{record}");

    let resp = app
        .client
        .get(app.url("/v1/no-such-thing"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.headers().contains_key("x-request-id"));

    let text = app.get_text("/metrics").await;
    let m = parse(&text);
    let count = |labels: &[(&str, &str)]| {
        sample(
            &m,
            "keyward_http_requests",
            "keyward_http_requests_total",
            labels,
        )
    };
    assert_eq!(
        count(&[
            ("route", "/v1/encrypt"),
            ("method", "POST"),
            ("status", "503")
        ]),
        1.0
    );
    assert_eq!(
        count(&[("route", "unmatched"), ("method", "GET"), ("status", "404")]),
        1.0
    );
}

/// The access log: `keyward::http=debug` gives one line per request in the
/// request's span (method, path, request id; never a credential), and one per
/// refusal with its code; nothing else at debug.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_is_one_line_per_request_in_its_span() {
    let app = TestApp::spawn_with(
        Backend::Sqlite,
        &[("KEYWARD_LOG_LEVEL", "keyward::http=debug,info")],
    )
    .await;
    let creds = app.create_tenant("acme");
    let (enc, _) = app.create_encryption(&creds).await;
    let resp = app
        .req(reqwest::Method::POST, "/v1/encrypt", &creds)
        .header("x-request-id", "access-log-1")
        .json(&json!({"encryptionId": enc, "data": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let wrong = Creds {
        secret: "kws_nope".into(),
        ..creds.clone()
    };
    let resp = app
        .req(reqwest::Method::POST, "/v1/encrypt", &wrong)
        .header("x-request-id", "access-log-2")
        .json(&json!({"encryptionId": enc, "data": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    let lines = |request_id: &str| -> Vec<Value> {
        app.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["span"]["request_id"] == request_id)
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while lines("access-log-2").len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let ok = lines("access-log-1");
    assert_eq!(ok.len(), 1, "{ok:?}");
    assert_eq!(ok[0]["level"], "DEBUG");
    assert_eq!(ok[0]["message"], "finished processing request");
    assert_eq!(ok[0]["status"], 200);
    assert!(ok[0]["latency"].as_str().unwrap().ends_with(" μs"));
    assert_eq!(
        ok[0]["span"],
        json!({"name": "request", "method": "POST", "path": "/v1/encrypt", "request_id": "access-log-1"})
    );
    let refused = lines("access-log-2");
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert_eq!(refused[0]["message"], "request refused");
    assert_eq!(refused[0]["code"], "invalid_credentials");
    assert_eq!(refused[1]["status"], 401);
    assert!(!app.log_text().contains(&creds.secret));
}

/// The address of the app's ops listener (`KEYWARD_OPS_LISTEN`), from its log.
pub(crate) async fn ops_addr(app: &TestApp) -> String {
    assert!(app.log_shows("ops endpoints listening").await);
    app.log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "ops endpoints listening (plain HTTP)")
        .and_then(|v| v["addr"].as_str().map(str::to_string))
        .expect("the ops listener is logged")
}

/// Every series of a parsed scrape: its sample name and labels, no value.
fn series(families: &Value) -> BTreeSet<String> {
    families
        .as_object()
        .unwrap()
        .values()
        .flat_map(|family| family["samples"].as_array().unwrap())
        .map(|s| format!("{}{}", s[0].as_str().unwrap(), s[1]))
        .collect()
}

/// Issue #17: the unauthenticated `/metrics` (on the ops listener too) named
/// every running job by id, kept a series per job forever, and counted key
/// versions in the database on every scrape. Two tenants with the same
/// traffic, encryptions and running jobs now leave exactly the series one
/// tenant did, with no tenant, key, encryption, version or job id in them;
/// jobs are counted per state.
async fn metrics_name_no_tenant_encryption_or_job_and_keep_the_same_series(backend: Backend) {
    // One platform database per tenant, each registered as that tenant's
    // job source.
    let mut new_platforms = vec![Platform::new(backend).await, Platform::new(backend).await];
    let (k, sources) = crate::jobs::sources_env(
        &new_platforms[0].db.dir,
        &[
            ("platform-a", &new_platforms[0].db.url, &["tenant-a"]),
            ("platform-b", &new_platforms[1].db.url, &["tenant-b"]),
        ],
    );
    let app = TestApp::spawn_with(
        backend,
        &[
            ("KEYWARD_OPS_LISTEN", "127.0.0.1:0"),
            ("KEYWARD_METRICS_REFRESH_INTERVAL", "100ms"),
            (k, &sources),
        ],
    )
    .await;
    let ops = ops_addr(&app).await;
    let plain = crate::helpers::http_client();
    let mut identifiers: Vec<String> = Vec::new();
    let mut platforms = Vec::new();
    let mut scrapes = Vec::new();
    // A scrape counts itself after it answers: one first, so that both
    // compared below include the scrapes' own series.
    app.get_text("/metrics").await;
    plain
        .get(format!("http://{ops}/metrics"))
        .send()
        .await
        .unwrap();
    for name in ["tenant-a", "tenant-b"] {
        let creds = app.create_tenant(name);
        let (enc, first) = app.create_encryption(&creds).await;
        let e = app.encrypt(&creds, &enc, "some data").await;
        assert_eq!(app.decrypt(&creds, &e).await.0, 200);
        let platform = new_platforms.remove(0);
        platform.fill(&app, &creds, &enc, 300).await;
        let second = app.rotate(&creds, &enc).await;
        // 300 rows at 10 a second: running for the rest of the test.
        let (status, created) = app
            .post(
                "/v1/jobs",
                &creds,
                &json!({"kind": "reencrypt", "encryptionId": enc, "maxRowsPerSecond": 10,
                        "source": {"name": format!("platform-{}", &name[7..]), "table": "secrets",
                            "keyColumn": "id", "cipherTextColumn": "cipher_text",
                            "versionColumn": "version", "metadataColumn": "metadata"}}),
            )
            .await;
        assert_eq!(status, 202, "{created}");
        let job = created["jobId"].as_str().unwrap().to_string();
        // Each tenant's job runs (the runner runs one job per tenant at a
        // time, several tenants at once).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (_, body) = app.get(&format!("/v1/jobs/{job}"), &creds).await;
            let running = body["state"] == "running" && body["processed"].as_i64() > Some(0);
            if running || (name == "tenant-b" && body["state"] == "queued") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        identifiers.extend([
            creds.tenant_id.clone(),
            creds.key.clone(),
            enc,
            first,
            second,
            job,
        ]);
        platforms.push(platform);
        // Past a refresh of the figures read from the database.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let text = app.get_text("/metrics").await;
        let from_ops = plain
            .get(format!("http://{ops}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        for id in &identifiers {
            assert!(!text.contains(id.as_str()), "{id} in /metrics:\n{text}");
            assert!(!from_ops.contains(id.as_str()), "{id} on the ops listener");
        }
        let m = parse(&text);
        assert!(sample(&m, "keyward_jobs", "keyward_jobs", &[("state", "running")]) >= 1.0);
        assert!(
            sample(
                &m,
                "keyward_job_rows_processed",
                "keyward_job_rows_processed",
                &[]
            ) >= 1.0
        );
        assert!(
            sample(
                &m,
                "keyward_key_versions",
                "keyward_key_versions",
                &[("state", "enabled")]
            ) >= 1.0
        );
        scrapes.push(series(&m));
    }
    let added: Vec<_> = scrapes[1].difference(&scrapes[0]).collect();
    let removed: Vec<_> = scrapes[0].difference(&scrapes[1]).collect();
    assert!(
        added.is_empty() && removed.is_empty(),
        "a second tenant with the same traffic added {added:?} and removed {removed:?}"
    );
    assert!(scrapes[1].len() < 400, "{} series", scrapes[1].len());
}

/// A flood of scrapes sends no query to the database: the figures that come
/// from it are refreshed by a background task (here once, at start), not per
/// scrape. Counted in PostgreSQL's own statistics; before, every scrape ran
/// two queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_scrapes_sends_no_query_to_the_database() {
    use sqlx::Connection;

    let quiet = [
        ("KEYWARD_METRICS_REFRESH_INTERVAL", "1h"),
        ("KEYWARD_SYNC_INTERVAL", "1h"),
        ("KEYWARD_CHANGE_FEED_MAX_LAG", "3h"),
        ("KEYWARD_DESTROY_GRACE", "5h"),
        ("KEYWARD_MAINTENANCE_INTERVAL", "1h"),
    ];
    let app = TestApp::spawn_with(Backend::Postgres, &quiet).await;
    sqlx::any::install_default_drivers();
    let mut conn = sqlx::AnyConnection::connect(&app.db.url).await.unwrap();
    let mut transactions = async || -> i64 {
        // Backends report their counts at most once a second.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        sqlx::query("SELECT pg_stat_clear_snapshot()")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::query_scalar(
            "SELECT CAST(xact_commit + xact_rollback AS BIGINT) FROM pg_stat_database \
             WHERE datname = current_database()",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap()
    };
    let before = transactions().await;
    let scrapes = 300;
    for _ in 0..scrapes {
        app.get_text("/metrics").await;
    }
    let during = transactions().await - before;
    // What remains is the job runner's poll (twice a second) and this test's
    // own statements.
    assert!(
        during < scrapes / 3,
        "{scrapes} scrapes came with {during} database transactions"
    );
}

/// What each listener serves: the ops listener (`KEYWARD_OPS_LISTEN`, plain
/// HTTP, no credentials) answers `/healthz`, `/readyz` and `/metrics` and
/// nothing else; every other route of the API, `/openapi.json` included, is
/// `404` there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ops_listener_serves_the_probes_and_metrics_and_nothing_else() {
    let app = TestApp::spawn_with(Backend::Sqlite, &[("KEYWARD_OPS_LISTEN", "127.0.0.1:0")]).await;
    let ops = ops_addr(&app).await;
    let creds = app.create_tenant("acme");
    let document: Value = serde_json::from_str(&app.get_text("/openapi.json").await).unwrap();
    let plain = crate::helpers::http_client();
    let mut served = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        let concrete = path
            .replace("{id}", &uuid_like())
            .replace("{versionId}", &uuid_like());
        for method in item.as_object().unwrap().keys() {
            let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let resp = plain
                .request(method.clone(), format!("http://{ops}{concrete}"))
                .header("X-Api-Key", &creds.key)
                .header("X-Api-Secret", &creds.secret)
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            match resp.status().as_u16() {
                404 => {
                    let body: Value = resp.json().await.unwrap();
                    assert_eq!(body["error"]["code"], "not_found", "{method} {path}");
                }
                status => served.push(format!("{method} {path} {status}")),
            }
        }
    }
    served.sort();
    assert_eq!(
        served,
        ["GET /healthz 200", "GET /metrics 200", "GET /readyz 200"],
        "the ops listener serves these and nothing else"
    );
    // The same paths on the API listener: all of them.
    assert_eq!(
        app.client
            .get(app.url("/openapi.json"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

fn uuid_like() -> String {
    "8c5b7a8e-3f0e-4d8e-9a51-2b1e6f0c9d42".to_string()
}
