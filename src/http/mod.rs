//! The HTTP layer: one file per resource with its handlers; every route
//! declared once in [`routes::ROUTES`] (method, path, scope, body limit,
//! audited operation), from which the router is built here, behind [`Edge`]
//! (request ids, tracing, body limit, time limit, panic catching, audit,
//! metrics, JSON errors for everything).

mod admin;
pub mod audit;
mod batch;
mod contract;
mod edge;
mod encryptions;
pub mod error;
pub mod extract;
mod jobs;
pub mod metrics;
pub mod openapi;
mod ops;
mod query;
mod routes;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;

use crate::domain::service::KeyService;
pub use batch::BatchLimits;
pub use edge::Edge;
use error::ApiError;

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

/// The whole API ([`routes::ROUTES`]), with what every request passes through.
pub fn router(state: AppState, settings: RouterSettings) -> Edge {
    std::sync::LazyLock::force(&openapi::DOCUMENT);
    let routes = routes::build(&state, Some(&settings), settings.request_timeout, |_| true);
    behind_edge(routes, state, Some(settings.max_body_bytes))
}

/// The operational endpoints alone (health, readiness, metrics), for a
/// separate plain-HTTP listener that probes can reach without a client
/// certificate.
pub fn ops_router(state: AppState, request_timeout: Duration) -> Edge {
    let routes = routes::build(&state, None, request_timeout, |r| r.on_ops_listener);
    behind_edge(routes, state, None)
}

/// `routes` with the fallbacks and the state, behind an [`Edge`].
fn behind_edge(routes: Router<AppState>, state: AppState, body_limit: Option<usize>) -> Edge {
    let router = routes
        .fallback(edge::not_found)
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state);
    Edge::new(router, body_limit)
}

/// Parses a UUID field into an id newtype; the error names the field only.
pub(crate) fn parse_id<T: FromStr>(value: &str, field: &str) -> Result<T, ApiError> {
    value
        .parse()
        .map_err(|_| ApiError::InvalidRequest(format!("`{field}`: not a UUID")))
}

/// Like [`parse_id`], for a field that may be left out.
pub(crate) fn parse_optional_id<T: FromStr>(
    value: Option<&str>,
    field: &str,
) -> Result<Option<T>, ApiError> {
    value.map(|v| parse_id(v, field)).transpose()
}

#[cfg(test)]
mod tests;
