//! Operational endpoints, without authentication: `/healthz` (the process is
//! up), `/readyz` (it can serve: the database answers) and `/openapi.json`.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::state::AppState;

/// Liveness: the process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Up", body = Object, example = json!({"status": "ok"}))))]
pub(super) async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: the database answers.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Object, example = json!({"status": "ready"})),
        (status = 503, description = "Not ready, with the reason", body = Object, example = json!({"status": "not_ready", "reason": "the database does not answer"})),
    ))]
pub(super) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if let Some(reason) = state.service.not_ready_reason() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": reason})),
        );
    }
    let ping = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        state.service.check_database(),
    );
    match ping.await {
        Ok(Ok(())) => (StatusCode::OK, Json(json!({"status": "ready"}))),
        failed => {
            let reason = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "no answer within 1 s".to_string(),
            };
            tracing::warn!(error = %reason, "not ready: database unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"status": "not_ready", "reason": "the database does not answer"})),
            )
        }
    }
}

/// The OpenAPI document (`super::openapi::document`), set once when the
/// router is built.
pub(super) static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The OpenAPI description of the API: this document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub(super) async fn openapi_json() -> Response {
    // Set before the router that serves this route exists.
    let Some(document) = DOCUMENT.get() else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        document.as_str(),
    )
        .into_response()
}
