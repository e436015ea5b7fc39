//! The HTTP layer: one file per resource, each with its own `router()`, merged
//! here with the cross-cutting layers (request ids, tracing, body limit, time
//! limit, panic catching, JSON errors for everything).

mod admin;
pub mod audit;
mod batch;
mod contract;
mod encryptions;
pub mod error;
pub mod extract;
mod jobs;
mod metrics;
pub mod openapi;
mod ops;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::domain::service::KeyService;
use crate::tls::ClientIdentity;
pub use batch::BatchLimits;
use error::{error_response, ApiError};
use extract::BodyLimit;

/// What every handler can reach. Cloned for every request (axum's `State`), so
/// it is one shared pointer: one atomic increment per clone, not one per field.
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl AppState {
    /// Shares `parts` between every request.
    pub fn new(parts: AppParts) -> AppState {
        AppState(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct AppParts {
    /// Every operation.
    pub service: Arc<KeyService>,
    /// Rate limit and brute-force lockout.
    pub guard: Arc<crate::domain::guard::AuthGuard>,
    /// Where audit events go.
    pub audit: crate::audit::AuditLog,
}

/// Settings the router needs.
#[derive(Debug, Clone, Copy)]
pub struct RouterSettings {
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// Longest time one request may take.
    pub request_timeout: Duration,
    /// Batch limits.
    pub batch: batch::BatchLimits,
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The whole API.
pub fn router(state: AppState, settings: RouterSettings) -> Router {
    let limit = settings.max_body_bytes;
    Router::new()
        .merge(contract::router(limit))
        .merge(encryptions::router())
        .merge(admin::router())
        .merge(audit::router())
        .merge(jobs::router())
        .merge(batch::router(
            settings.batch,
            contract::ciphertext_body_limit(limit),
        ))
        .merge(ops::router())
        .merge(openapi::router())
        .merge(metrics::router())
        .route_layer(middleware::from_fn_with_state(state.clone(), audit::record))
        .route_layer(middleware::from_fn(metrics::record))
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(
            move |mut req: Request, next: Next| async move {
                req.extensions_mut().insert(BodyLimit(limit));
                json_errors(next.run(req).await)
            },
        ))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            settings.request_timeout,
        ))
        .layer(CatchPanicLayer::custom(|_panic| {
            ApiError::Panic.into_response()
        }))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let request_id = req
                        .headers()
                        .get(&REQUEST_ID)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    // Only the method, path, request id and client identity: never
                    // headers (they carry secrets) or bodies (they carry plaintext).
                    // Who called is in the request's audit record, found by its
                    // request id: recording it here too re-formatted every span's
                    // JSON fields on each request (a twentieth of the CPU).
                    let client = req.extensions().get::<Arc<ClientIdentity>>();
                    tracing::info_span!(
                        "request",
                        method = %req.method(),
                        path = req.uri().path(),
                        request_id,
                        client_subject = client.map(|c| c.subject.as_str()),
                        client_spki = client.map(|c| c.spki_hex()),
                    )
                })
                .on_request(())
                .on_response(
                    tower_http::trace::DefaultOnResponse::new()
                        .level(tracing::Level::DEBUG)
                        .latency_unit(tower_http::LatencyUnit::Micros),
                )
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

/// The operational endpoints alone (health, readiness), for a separate
/// plain-HTTP listener that probes can reach without a client certificate.
pub fn ops_router(state: AppState) -> Router {
    Router::new()
        .merge(ops::router())
        .merge(metrics::router())
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

/// Gives every error response the JSON error shape, including those produced by
/// layers (time limit) rather than handlers.
fn json_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return response;
    }
    let (code, message) = match status {
        StatusCode::SERVICE_UNAVAILABLE => ("timeout", "the request timed out"),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is too large"),
        s if s.is_server_error() => ("internal", "internal error; see the server log"),
        _ => ("invalid_request", "the request was refused"),
    };
    error_response(status, code, message)
}

/// Largest page size of the list endpoints.
pub(crate) const MAX_PAGE: u32 = 1000;
/// Default page size of the list endpoints.
pub(crate) const DEFAULT_PAGE: u32 = 100;

/// The query string's `name=value` pairs, percent-decoded.
pub(crate) fn query_pairs(uri: &axum::http::Uri) -> Result<Vec<(String, String)>, ApiError> {
    axum::extract::Query::try_from_uri(uri)
        .map(|axum::extract::Query(pairs)| pairs)
        .map_err(|_| ApiError::InvalidRequest("the query string does not parse".into()))
}

/// A `limit` parameter: 1 to [`MAX_PAGE`].
pub(crate) fn page_limit(value: &str) -> Result<u32, ApiError> {
    value
        .parse()
        .ok()
        .filter(|n| (1..=MAX_PAGE).contains(n))
        .ok_or_else(|| {
            ApiError::InvalidRequest(format!("`limit`: must be an integer from 1 to {MAX_PAGE}"))
        })
}

/// Parses a UUID field into an id newtype; the error names the field only.
pub(crate) fn parse_id<T: FromStr>(value: &str, field: &str) -> Result<T, ApiError> {
    value
        .parse()
        .map_err(|_| ApiError::InvalidRequest(format!("`{field}`: not a UUID")))
}
