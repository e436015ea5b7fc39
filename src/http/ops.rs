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

/// Readiness: the database answers, and a server certificate Keyward obtains
/// through ACME is not expired. With ACME, `certificate` details it:
/// `notAfter`, `renewAt`, and while renewal fails `failures`, `lastError` and
/// `nextAttemptAt` (RFC 3339): the current certificate is still served, so
/// the replica stays ready until it expires.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready", body = Object, example = json!({"status": "ready"})),
        (status = 503, description = "Not ready, with the reason", body = Object, example = json!({"status": "not_ready", "reason": "the database does not answer"})),
    ))]
pub(super) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let (status, mut body) = database_readiness(&state).await;
    if let Some(cert) = state.certificate.get() {
        let now = crate::domain::time::now_ms();
        let expired = cert.not_after.is_none_or(|t| t <= now);
        let mut detail = json!({
            "notAfter": cert.not_after.map(rfc3339),
            "renewAt": cert.renew_at.map(rfc3339),
            "failures": cert.failures,
        });
        if cert.failures > 0 {
            detail["lastError"] = json!(cert.last_error);
            detail["nextAttemptAt"] = json!(cert.next_attempt.map(rfc3339));
        }
        body["certificate"] = detail;
        if expired && status == StatusCode::OK {
            body["status"] = json!("not_ready");
            body["reason"] = json!(match cert.not_after {
                None => "no server certificate obtained through ACME yet",
                Some(_) => "the server certificate has expired and could not be renewed",
            });
            return (StatusCode::SERVICE_UNAVAILABLE, Json(body));
        }
    }
    (status, Json(body))
}

/// A Unix-ms time as RFC 3339 (UTC).
fn rfc3339(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(at).to_string()
}

/// Readiness of the service and its database.
async fn database_readiness(state: &AppState) -> (StatusCode, Value) {
    if let Some(reason) = state.service.not_ready_reason() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "not_ready", "reason": reason}),
        );
    }
    let ping = tokio::time::timeout(
        std::time::Duration::from_secs(1),
        state.service.check_database(),
    );
    match ping.await {
        Ok(Ok(())) => (StatusCode::OK, json!({"status": "ready"})),
        failed => {
            let reason = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "no answer within 1 s".to_string(),
            };
            tracing::warn!(error = %reason, "not ready: database unreachable");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"status": "not_ready", "reason": "the database does not answer"}),
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
