//! `GET /metrics`: Prometheus text. Request counts and latency per route
//! pattern, method and status, bytes encrypted and decrypted, failed
//! authentications and lockouts, audit records (recorded where they happen);
//! the key ring's size, hits and misses and the master-key provider's health
//! (read from memory at scrape time); key versions and jobs per state (read
//! from the database by a background task every `metrics_refresh_interval`,
//! never by a scrape).
//!
//! The endpoint needs no credentials, so it carries nothing that names a
//! tenant, an encryption, a job or a key, and its number of series is fixed by
//! the route table and the state names, whatever callers do. Never a key,
//! secret, tenant name or plaintext.
//!
//! Memory does not grow with traffic: request latency goes into fixed
//! buckets when it is recorded ([`RequestSeries`]), not into the exporter's
//! histogram, which keeps every sample until a render drains it (about 24
//! bytes a request, without bound while nobody scrapes). So nothing here uses
//! `metrics::histogram!`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;

use super::state::AppState;
use crate::domain::service::KeyService;
use crate::domain::states::{JobState, VersionState};

/// The Prometheus recorder, installed once per process by the first server.
static RECORDER: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();

/// Installs the process-wide metrics recorder (once) and returns its handle.
/// A server installs it before anything records: a counter handle taken from
/// the no-op recorder before (and kept, like [`bytes_encrypted`]) would count
/// nothing.
pub fn install_metrics_recorder() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first (a test harness).
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Upper bounds of the request-latency buckets, in seconds, as rendered.
const BUCKET_LABELS: [&str; 14] = [
    "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
    "0.25", "0.5", "1", "2.5",
];
/// The same bounds in nanoseconds, compared with a request's duration.
const BUCKET_NANOS: [u64; 14] = [
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
];

/// One route, method and status: its requests, by latency bucket. Fixed
/// size, aggregated when recorded: a million requests take the memory of one.
struct RequestSeries {
    /// The `route` label: a route's path pattern or `unmatched`.
    route: &'static str,
    method: &'static str,
    status: u16,
    /// Requests per bucket, not cumulative: `buckets[i]` took at most
    /// `BUCKET_NANOS[i]` and more than the bound before; the last took more
    /// than every bound.
    buckets: [AtomicU64; BUCKET_NANOS.len() + 1],
    /// Their total duration, in nanoseconds (wraps after 584 years).
    sum_nanos: AtomicU64,
}

impl RequestSeries {
    fn new(route: &'static str, method: &'static str, status: u16) -> RequestSeries {
        RequestSeries {
            route,
            method,
            status,
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn record(&self, nanos: u64) {
        let bucket = BUCKET_NANOS.partition_point(|&bound| bound < nanos);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

/// Every request series of the process, in the order first recorded. Taken
/// only when a worker thread records a series for the first time, and by
/// renders. Bounded: routes are the table's (plus `unmatched`), methods and
/// statuses short lists.
static REQUEST_SERIES: Mutex<Vec<Arc<RequestSeries>>> = Mutex::new(Vec::new());

/// Which route a request matched, for its series.
#[derive(Debug, Clone, Copy)]
pub(super) enum Matched {
    /// The route at position `index` of the route table, with its path.
    Route {
        /// Its position in the table.
        index: usize,
        /// Its path pattern: the `route` label (never the raw path).
        path: &'static str,
    },
    /// None: the `unmatched` series.
    Unmatched,
}

impl Matched {
    /// Its slot in [`SERIES`]: `unmatched`, then one per route.
    fn slot(self) -> usize {
        match self {
            Matched::Unmatched => 0,
            Matched::Route { index, .. } => index + 1,
        }
    }

    /// The `route` label.
    fn label(self) -> &'static str {
        match self {
            Matched::Route { path, .. } => path,
            Matched::Unmatched => "unmatched",
        }
    }
}

/// Records one request: its route, method, status, and the time since
/// `started`.
pub(super) fn record(route: Matched, method: &'static str, status: u16, started: Instant) {
    let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    with_series(route, method, status, |series| series.record(nanos));
}

/// `keyward_bytes_encrypted_total`. The handle is kept: looking a series up
/// by name hashes its key on every call.
pub(super) fn bytes_encrypted() -> &'static metrics::Counter {
    static COUNTER: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    COUNTER.get_or_init(|| metrics::counter!("keyward_bytes_encrypted_total"))
}

/// `keyward_requests_busy_total`: requests refused with `server_busy`
/// because batch and large requests held `max_concurrent_body_bytes`.
pub(super) fn busy() -> &'static metrics::Counter {
    static COUNTER: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    COUNTER.get_or_init(|| metrics::counter!("keyward_requests_busy_total"))
}

/// `keyward_stream_bytes_total{operation}`: plaintext bytes through the
/// streaming routes (`encrypt` or `decrypt`), counted per chunk.
pub(super) fn stream_bytes(operation: &'static str) -> &'static metrics::Counter {
    static ENCRYPT: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    static DECRYPT: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    let cell = if operation == "encrypt" {
        &ENCRYPT
    } else {
        &DECRYPT
    };
    cell.get_or_init(|| metrics::counter!("keyward_stream_bytes_total", "operation" => operation))
}

/// `keyward_streams_unread_total`: streams given up because their client
/// read no response for `stream_read_timeout`.
pub(super) fn stream_unread() -> &'static metrics::Counter {
    static COUNTER: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    COUNTER.get_or_init(|| metrics::counter!("keyward_streams_unread_total"))
}

/// `keyward_streams_total{operation, outcome}`: streams ended, by audited
/// operation and outcome (`ok`, the error code that aborted it, or
/// `cancelled` when the client went away). Once per stream, so looked up.
pub(super) fn stream_ended(operation: &'static str, outcome: &'static str) {
    metrics::counter!("keyward_streams_total", "operation" => operation, "outcome" => outcome)
        .increment(1);
}

/// `keyward_bytes_decrypted_total`, kept like [`bytes_encrypted`].
pub(super) fn bytes_decrypted() -> &'static metrics::Counter {
    static COUNTER: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    COUNTER.get_or_init(|| metrics::counter!("keyward_bytes_decrypted_total"))
}

thread_local! {
    /// The series this worker thread has recorded into, by [`Matched::slot`].
    /// Finding a series in [`REQUEST_SERIES`] takes its lock; the series stay,
    /// so each thread keeps the ones it used.
    static SERIES: std::cell::RefCell<Vec<Vec<Arc<RequestSeries>>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

fn with_series(route: Matched, method: &'static str, status: u16, f: impl FnOnce(&RequestSeries)) {
    SERIES.with_borrow_mut(|by_route| {
        let slot = route.slot();
        if by_route.len() <= slot {
            by_route.resize_with(slot + 1, Vec::new);
        }
        let list = &mut by_route[slot];
        let index = match list
            .iter()
            .position(|s| s.method == method && s.status == status)
        {
            Some(i) => i,
            None => {
                list.push(shared_series(route.label(), method, status));
                list.len() - 1
            }
        };
        f(&list[index]);
    })
}

/// The process's series for `route`, `method` and `status`, made if new.
fn shared_series(route: &'static str, method: &'static str, status: u16) -> Arc<RequestSeries> {
    let mut all = REQUEST_SERIES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = all
        .iter()
        .find(|s| s.route == route && s.method == method && s.status == status)
    {
        return s.clone();
    }
    let series = Arc::new(RequestSeries::new(route, method, status));
    all.push(series.clone());
    series
}

/// The method as a label without allocating (the routes use no others).
pub(super) fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PATCH => "PATCH",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Appends `keyward_http_requests_total` and
/// `keyward_http_request_duration_seconds` to `out`, in the text format.
fn render_requests(out: &mut String) {
    let mut all: Vec<Arc<RequestSeries>> = REQUEST_SERIES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    if all.is_empty() {
        return;
    }
    all.sort_by(|a, b| (a.route, a.method, a.status).cmp(&(b.route, b.method, b.status)));
    // One reading of each series, so that its count, buckets and sum agree
    // within the render (requests go on meanwhile).
    let read: Vec<([u64; BUCKET_NANOS.len() + 1], u64)> = all
        .iter()
        .map(|s| {
            let buckets = std::array::from_fn(|i| s.buckets[i].load(Ordering::Relaxed));
            (buckets, s.sum_nanos.load(Ordering::Relaxed))
        })
        .collect();
    let labels = |s: &RequestSeries| {
        format!(
            "route=\"{}\",method=\"{}\",status=\"{}\"",
            escape_label(s.route),
            s.method,
            s.status
        )
    };
    out.push_str(
        "# HELP keyward_http_requests_total Requests answered, by route pattern, method and status.\n\
         # TYPE keyward_http_requests_total counter\n",
    );
    for (s, (buckets, _)) in all.iter().zip(&read) {
        let count: u64 = buckets.iter().sum();
        let _ = writeln!(out, "keyward_http_requests_total{{{}}} {count}", labels(s));
    }
    out.push_str(
        "# HELP keyward_http_request_duration_seconds Time to answer a request, by route pattern, method and status.\n\
         # TYPE keyward_http_request_duration_seconds histogram\n",
    );
    for (s, (buckets, sum_nanos)) in all.iter().zip(&read) {
        let labels = labels(s);
        let mut cumulative = 0;
        for (bound, n) in BUCKET_LABELS.iter().zip(buckets) {
            cumulative += n;
            let _ = writeln!(
                out,
                "keyward_http_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += buckets[BUCKET_NANOS.len()];
        let sum = *sum_nanos as f64 / 1e9;
        let _ = writeln!(
            out,
            "keyward_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}\n\
             keyward_http_request_duration_seconds_sum{{{labels}}} {sum}\n\
             keyward_http_request_duration_seconds_count{{{labels}}} {cumulative}"
        );
    }
}

/// A label value in the text format: backslash, quote and newline escaped.
fn escape_label(value: &str) -> std::borrow::Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return value.into();
    }
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

/// Reads key versions and jobs per state from the database into their
/// gauges. A background task calls it every `metrics_refresh_interval`; a
/// scrape only renders what the last call left, so a flood of scrapes costs
/// the database nothing. Every state gets its gauge (0 when none), so the
/// series are the same from the first refresh on.
pub async fn refresh_database_gauges(service: &KeyService, cert_expiry_warning: Duration) {
    match service.bound_client_certificates(cert_expiry_warning).await {
        Ok((live, soon)) => {
            metrics::gauge!("keyward_client_certificates_bound").set(live as f64);
            metrics::gauge!("keyward_client_certificates_expiring_soon").set(soon as f64);
        }
        Err(e) => tracing::warn!(error = %e, "metrics: cannot count client certificates"),
    }
    match service.versions_per_state().await {
        Ok(counts) => {
            for state in VersionState::ALL {
                let n = counts
                    .iter()
                    .find(|(s, _)| s == state.as_str())
                    .map_or(0, |(_, n)| *n);
                metrics::gauge!("keyward_key_versions", "state" => state.as_str()).set(n as f64);
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: cannot count key versions"),
    }
    match service.jobs_per_state().await {
        Ok(totals) => {
            let (mut processed, mut total, mut rate) = (0, 0, 0);
            for state in JobState::ALL {
                let of_state = totals.iter().find(|t| t.state == state.as_str());
                let jobs = of_state.map_or(0, |t| t.jobs);
                metrics::gauge!("keyward_jobs", "state" => state.as_str()).set(jobs as f64);
                if let (Some(t), JobState::Queued | JobState::Running) = (of_state, state) {
                    processed += t.processed;
                    total += t.total;
                    rate += t.rows_per_second;
                }
            }
            metrics::gauge!("keyward_job_rows_processed").set(processed as f64);
            metrics::gauge!("keyward_job_rows_total").set(total as f64);
            metrics::gauge!("keyward_job_rows_per_second").set(rate as f64);
        }
        Err(e) => tracing::warn!(error = %e, "metrics: cannot count jobs"),
    }
}

/// Prometheus metrics (text exposition format 0.0.4): requests by route
/// pattern, method and status with latency histograms, bytes encrypted and
/// decrypted, key-ring size, hits and misses, key versions and jobs per
/// state, job progress summed over queued and running jobs, master-key
/// provider health, failed authentications and lockouts, audit records. No
/// tenant, encryption, job or key identifier; a fixed set of series.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format",
        content_type = "text/plain; version=0.0.4", body = String,
        example = "# TYPE keyward_http_requests_total counter\nkeyward_http_requests_total{route=\"/v1/encrypt\",method=\"POST\",status=\"200\"} 42\n")))]
pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let service = &state.service;
    let (hits, misses) = service.ring().hit_counts();
    metrics::gauge!("keyward_key_ring_entries").set(service.ring().len() as f64);
    metrics::counter!("keyward_key_ring_hits_total").absolute(hits);
    metrics::counter!("keyward_key_ring_misses_total").absolute(misses);
    // Misses answered as unknown (missing, or another tenant's) from memory:
    // every other miss is a query.
    metrics::counter!("keyward_key_ring_negative_hits_total")
        .absolute(service.ring().negative_hits());
    let provider = service.provider().name();
    let up = if service.not_ready_reason().is_none() {
        1.0
    } else {
        0.0
    };
    metrics::gauge!("keyward_master_key_provider_up", "provider" => provider).set(up);
    metrics::gauge!("keyward_audit_queue_bytes").set(state.audit.queued_bytes() as f64);
    metrics::gauge!("keyward_audit_table_backlog_bytes")
        .set(state.audit.table_backlog_bytes() as f64);
    let mut text = install_metrics_recorder().render();
    render_requests(&mut text);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads this process's resident set size, in bytes.
    fn resident_bytes() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        kib * 1024
    }

    #[test]
    fn a_duration_lands_in_the_first_bucket_whose_bound_it_does_not_pass() {
        let series = RequestSeries::new("/t", "GET", 200);
        for nanos in [
            0,
            100_000,
            100_001,
            2_500_000_000,
            2_500_000_001,
            u64::MAX / 2,
        ] {
            series.record(nanos);
        }
        let counts: Vec<u64> = series
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let mut want = vec![0; BUCKET_NANOS.len() + 1];
        want[0] = 2; // 0 and exactly 100 µs
        want[1] = 1; // just over 100 µs
        want[BUCKET_NANOS.len() - 1] = 1; // exactly 2.5 s
        want[BUCKET_NANOS.len()] = 2; // over every bound
        assert_eq!(counts, want);
        for (label, nanos) in BUCKET_LABELS.iter().zip(BUCKET_NANOS) {
            let seconds: f64 = label.parse().unwrap();
            assert_eq!((seconds * 1e9).round() as u64, nanos, "{label}");
        }
    }

    /// Issue #25: the exporter's histogram kept every sample until a render
    /// drained it, so memory grew about 24 bytes a request while nobody
    /// scraped. Two million requests recorded without a render now leave
    /// resident memory where it was (the old histogram took about 50 MB for
    /// them), and the render counts them all.
    ///
    /// Resident memory is the process's: the test runs itself again in a
    /// process of its own, so that the other tests running beside it in this
    /// one cannot move the figure.
    #[test]
    fn two_million_requests_without_a_scrape_take_no_memory() {
        const ALONE: &str = "KEYWARD_TEST_RUNNING_ALONE";
        if std::env::var_os(ALONE).is_none() {
            let name = "http::metrics::tests::two_million_requests_without_a_scrape_take_no_memory";
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([name, "--exact", "--test-threads=1", "--nocapture"])
                .env(ALONE, "1")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "{stdout}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        static ROUTE: &str = "/test/two-million";
        // What the server does first: with the exporter's histogram, the
        // samples went to this recorder.
        install_metrics_recorder();
        let started = Instant::now();
        let before = resident_bytes();
        for _ in 0..2_000_000 {
            record(
                Matched::Route {
                    index: 10_000,
                    path: ROUTE,
                },
                "GET",
                200,
                started,
            );
        }
        let grown = resident_bytes().saturating_sub(before);
        assert!(
            grown < 8 << 20,
            "resident memory grew {grown} bytes over 2,000,000 requests"
        );
        let mut text = String::new();
        render_requests(&mut text);
        let labels = format!("route=\"{ROUTE}\",method=\"GET\",status=\"200\"");
        assert!(
            text.contains(&format!(
                "keyward_http_requests_total{{{labels}}} 2000000\n"
            )),
            "{text}"
        );
        assert!(text.contains(&format!(
            "keyward_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} 2000000\n"
        )));
        assert!(text.contains(&format!(
            "keyward_http_request_duration_seconds_count{{{labels}}} 2000000\n"
        )));
    }
}
