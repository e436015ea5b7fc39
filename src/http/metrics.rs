//! `GET /metrics`: Prometheus text. Request counts and latency per route and
//! status, bytes encrypted and decrypted, failed authentications and lockouts
//! (recorded where they happen), and, read at scrape time, the key ring's size,
//! hits and misses, versions per state, job progress and master-key provider
//! health. Never a key, secret, tenant name or plaintext.

use std::time::Instant;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;

use super::state::AppState;

/// The Prometheus recorder, installed once per process by the first server.
static RECORDER: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();

/// Installs the process-wide metrics recorder (once) and returns its handle.
/// A server installs it before anything records: a counter handle taken from
/// the no-op recorder before (and kept, like [`bytes_encrypted`]) would count
/// nothing.
pub fn install_metrics_recorder() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
            let buckets = [
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("keyward_http_request_duration_seconds".into()),
                    &buckets,
                )
                .expect("non-empty buckets")
                .build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first (a test harness).
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

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
    with_series(route, method, status, |series| {
        series.requests.increment(1);
        series.duration.record(started.elapsed().as_secs_f64());
    });
}

/// `keyward_bytes_encrypted_total`. The handle is kept: looking a series up
/// by name hashes its key on every call.
pub(super) fn bytes_encrypted() -> &'static metrics::Counter {
    static COUNTER: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    COUNTER.get_or_init(|| metrics::counter!("keyward_bytes_encrypted_total"))
}

/// `keyward_bytes_decrypted_total`, kept like [`bytes_encrypted`].
pub(super) fn bytes_decrypted() -> &'static metrics::Counter {
    static COUNTER: std::sync::OnceLock<metrics::Counter> = std::sync::OnceLock::new();
    COUNTER.get_or_init(|| metrics::counter!("keyward_bytes_decrypted_total"))
}

/// One route, method and status's counter and histogram.
struct Series {
    method: &'static str,
    status: u16,
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

thread_local! {
    /// The series this worker thread has recorded into, by [`Matched::slot`].
    /// Looking a series up in the recorder means building its key (three
    /// label strings) and hashing it on every request; the handles it returns
    /// stay valid, so each thread keeps them. Bounded: routes are the table's,
    /// methods and statuses a short list.
    static SERIES: std::cell::RefCell<Vec<Vec<Series>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

fn with_series(route: Matched, method: &'static str, status: u16, f: impl FnOnce(&Series)) {
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
                let status_label: metrics::SharedString = match status_label(status) {
                    Some(s) => s.into(),
                    None => status.to_string().into(),
                };
                let labels = [
                    ("route", metrics::SharedString::from(route.label())),
                    ("method", method.into()),
                    ("status", status_label),
                ];
                list.push(Series {
                    method,
                    status,
                    requests: metrics::counter!("keyward_http_requests_total", &labels),
                    duration: metrics::histogram!("keyward_http_request_duration_seconds", &labels),
                });
                list.len() - 1
            }
        };
        f(&list[index]);
    })
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

/// The statuses Keyward answers, as labels without allocating.
fn status_label(status: u16) -> Option<&'static str> {
    Some(match status {
        200 => "200",
        201 => "201",
        202 => "202",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        410 => "410",
        413 => "413",
        415 => "415",
        422 => "422",
        429 => "429",
        500 => "500",
        503 => "503",
        _ => return None,
    })
}

/// Prometheus metrics (text exposition format 0.0.4): requests by route,
/// method and status with latency histograms, bytes encrypted and decrypted,
/// key-ring size, hits and misses, versions per state, job progress, master-key
/// provider health, failed authentications and lockouts, audit records.
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
    match service.versions_per_state().await {
        Ok(counts) => {
            for (state, n) in counts {
                metrics::gauge!("keyward_key_versions", "state" => state).set(n as f64);
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: cannot count versions"),
    }
    match service.active_jobs().await {
        Ok(jobs) => {
            for job in jobs {
                let id = job.id.to_string();
                metrics::gauge!("keyward_job_rows_processed", "job" => id.clone())
                    .set(job.processed as f64);
                metrics::gauge!("keyward_job_rows_total", "job" => id.clone())
                    .set(job.total.unwrap_or(0) as f64);
                metrics::gauge!("keyward_job_rows_per_second", "job" => id)
                    .set(job.rows_per_second as f64);
            }
        }
        Err(e) => tracing::warn!(error = %e, "metrics: cannot read jobs"),
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        install_metrics_recorder().render(),
    )
        .into_response()
}
