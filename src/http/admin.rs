//! Operator endpoints (operator keys with scope `operator`): root-KEK rotation
//! and its status, and the client certificates Keyward issued.
//!
//! The root KEK is shared by every tenant, so these act on the whole service;
//! no tenant key, whatever its scopes, reaches them.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorBody};
use super::extract::{Auth, OperatorScope};
use super::state::AppState;

/// One root KEK.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RootKekView {
    /// Its id.
    #[schema(format = Uuid)]
    kek_id: String,
    /// `active` (wraps new versions) or `retiring` (being replaced).
    state: String,
    /// The master-key provider that wraps it.
    provider: String,
    /// How many key versions it still wraps (destroyed versions need none).
    versions: i64,
    /// For a retiring KEK: why the last re-wrap of its versions stopped (it is
    /// retried every minute and at every start). Absent when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    rewrap_error: Option<String>,
}

/// The root KEKs.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RootKekStatus {
    /// `done`: one root KEK, nothing to re-wrap; `rewrapping`: a rotation is
    /// moving versions to the active KEK; `stalled`: a retiring KEK's re-wrap
    /// stopped (see its `rewrapError`), and it is retried.
    #[schema(value_type = RotationStateSchema)]
    rotation: &'static str,
    /// Every root KEK: the active one first, then any retiring ones, oldest
    /// first.
    root_keks: Vec<RootKekView>,
}

/// The state of the last root-KEK rotation.
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "snake_case")]
enum RotationStateSchema {
    /// One root KEK, nothing to re-wrap.
    Done,
    /// Versions are being re-wrapped under the active KEK.
    Rewrapping,
    /// A retiring KEK's re-wrap stopped; see its `rewrapError`.
    Stalled,
}

/// A started rotation.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RootKekRotation {
    /// The new active root KEK.
    #[schema(format = Uuid)]
    kek_id: String,
}

/// The root KEKs and how many key versions each still wraps.
#[utoipa::path(
    get,
    path = "/v1/admin/root-kek",
    tag = "admin",
    responses(
        (status = 200, description = "Root KEKs", body = RootKekStatus),
    )
)]
pub(super) async fn status(
    State(state): State<AppState>,
    _auth: Auth<OperatorScope>,
) -> Result<Json<RootKekStatus>, ApiError> {
    let keks = state.service.root_kek_status().await?;
    let rotation = if keks.iter().any(|k| k.rewrap_error.is_some()) {
        "stalled"
    } else if keks.len() > 1 {
        "rewrapping"
    } else {
        "done"
    };
    let root_keks = keks
        .into_iter()
        .map(|k| RootKekView {
            kek_id: k.id.to_string(),
            versions: k.versions,
            state: k.state.as_str().to_string(),
            provider: k.provider,
            rewrap_error: k.rewrap_error,
        })
        .collect();
    Ok(Json(RootKekStatus {
        rotation,
        root_keks,
    }))
}

/// Start a root-KEK rotation: a new KEK becomes active at once and every key
/// version is re-wrapped under it in the background (resumable).
#[utoipa::path(
    post,
    path = "/v1/admin/root-kek/rotate",
    tag = "admin",
    responses(
        (status = 202, description = "Rotation started; poll GET /v1/admin/root-kek", body = RootKekRotation),
        (status = 409, description = "`rotation_in_progress` (the previous rotation is still re-wrapping, or another one started meanwhile) or `master_key_changed` (a master-key migration ran since this server started: restart it with the new settings)", body = ErrorBody),
        (status = 503, description = "`not_ready` or `unavailable` (the master-key provider is needed)", body = ErrorBody),
    )
)]
pub(super) async fn rotate(
    State(state): State<AppState>,
    auth: Auth<OperatorScope>,
) -> Result<(StatusCode, Json<RootKekRotation>), ApiError> {
    let kek_id = state.service.rotate_root_kek().await?;
    tracing::info!(%kek_id, api_key = %auth.principal.key_id, "root KEK rotation requested");
    // Re-wrapped after the answer; if the process stops first, the next
    // start resumes it.
    let service = state.service.clone();
    tokio::spawn(async move { service.finish_kek_rotation().await });
    Ok((
        StatusCode::ACCEPTED,
        Json(RootKekRotation {
            kek_id: kek_id.to_string(),
        }),
    ))
}

/// One client certificate issued by `keyward client-cert issue`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertView {
    /// Its serial number, lower-case hex.
    serial: String,
    /// The tenant of the API key bound to it.
    #[schema(format = Uuid)]
    tenant_id: String,
    /// The API key bound to it.
    api_key: String,
    /// SHA-256 of its public key, hex (what the key is bound to).
    spki_sha256: String,
    /// When it expires, RFC 3339.
    not_after: String,
    /// Seconds until it expires.
    seconds_left: i64,
    /// Whether the API key is still bound to it (a later certificate for the
    /// same key, or the key's revocation, ends the binding).
    bound: bool,
}

/// The live client certificates.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientCertList {
    /// Live (neither revoked nor expired) certificates issued by the Keyward
    /// client CA, soonest to expire first, at most 1,000.
    certificates: Vec<ClientCertView>,
}

/// The live client certificates issued by the Keyward client CA, with the
/// API key each is bound to and its expiry: the per-key detail behind the
/// `keyward_client_certificates_expiring_soon` gauge.
#[utoipa::path(
    get,
    path = "/v1/admin/client-certificates",
    tag = "admin",
    responses(
        (status = 200, description = "Live client certificates", body = ClientCertList),
    )
)]
pub(super) async fn client_certificates(
    State(state): State<AppState>,
    _auth: Auth<OperatorScope>,
) -> Result<Json<ClientCertList>, ApiError> {
    let now = crate::domain::time::now_ms();
    let mut rows = state.service.client_certificates(None, true, 1000).await?;
    rows.sort_by_key(|c| c.not_after);
    let certificates = rows
        .into_iter()
        .map(|c| ClientCertView {
            serial: c.serial,
            tenant_id: c.tenant_id,
            api_key: c.api_key_id,
            spki_sha256: crate::crypto::hex(&c.spki_sha256),
            not_after: crate::domain::time::rfc3339(c.not_after),
            seconds_left: (c.not_after - now) / 1000,
            bound: c.bound,
        })
        .collect();
    Ok(Json(ClientCertList { certificates }))
}
