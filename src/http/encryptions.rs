//! Managing encryptions: `POST /v1/encryptions`, `GET /v1/encryptions`,
//! `GET /v1/encryptions/{id}`. Key material, wrapped or not, never appears in
//! any response.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::contract::ALGORITHM;
use super::error::ApiError;
use super::extract::{ApiJson, Auth, ManageScope, MasterKeyHeader};
use super::{parse_id, AppState};
use crate::domain::service::EncryptionDetails;
use crate::domain::time::rfc3339;
use crate::domain::EncryptionId;
use crate::store::{EncryptionRow, VersionRow};

/// The routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/encryptions", get(list).post(create))
        .route("/v1/encryptions/{id}", get(show))
}

/// `POST /v1/encryptions` input (every field optional; an empty body is fine).
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateRequest {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    algorithm: Option<String>,
}

/// One encryption as listed.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionSummary {
    encryption_id: String,
    name: Option<String>,
    algorithm: String,
    mode: &'static str,
    active_version_id: String,
    latest_version: i64,
    created_at: String,
    updated_at: String,
}

/// One version as shown.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionView {
    version_id: String,
    version: i64,
    state: &'static str,
    created_at: String,
    rotated_at: Option<String>,
}

/// One encryption with its versions.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionView {
    #[serde(flatten)]
    summary: EncryptionSummary,
    versions: Vec<VersionView>,
}

/// A page of encryptions.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionPage {
    items: Vec<EncryptionSummary>,
    next_cursor: Option<String>,
}

fn summary(e: &EncryptionRow) -> EncryptionSummary {
    EncryptionSummary {
        encryption_id: e.id.to_string(),
        name: e.name.clone(),
        algorithm: e.algorithm.clone(),
        mode: e.mode.as_str(),
        active_version_id: e.active_version_id.to_string(),
        latest_version: e.latest_version,
        created_at: rfc3339(e.created_at),
        updated_at: rfc3339(e.updated_at),
    }
}

fn version_view(v: &VersionRow) -> VersionView {
    VersionView {
        version_id: v.id.to_string(),
        version: v.version,
        state: v.state.as_str(),
        created_at: rfc3339(v.created_at),
        rotated_at: v.rotated_at.map(rfc3339),
    }
}

fn view(d: &EncryptionDetails) -> EncryptionView {
    EncryptionView {
        summary: summary(&d.encryption),
        versions: d.versions.iter().map(version_view).collect(),
    }
}

async fn create(
    State(state): State<AppState>,
    auth: Auth<ManageScope>,
    MasterKeyHeader(client_key): MasterKeyHeader,
    ApiJson(req): ApiJson<CreateRequest>,
) -> Result<(StatusCode, Json<EncryptionView>), ApiError> {
    if let Some(alg) = &req.algorithm {
        if alg != ALGORITHM {
            return Err(ApiError::InvalidRequest(format!(
                "`algorithm`: unsupported, expected `{ALGORITHM}`"
            )));
        }
    }
    if let Some(name) = &req.name {
        if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
            return Err(ApiError::InvalidRequest(
                "`name`: must be 1 to 200 printable characters".into(),
            ));
        }
    }
    let details = state
        .service
        .create_encryption(auth.principal.tenant_id, req.name, client_key.as_ref())
        .await?;
    tracing::info!(encryption_id = %details.encryption.id, mode = details.encryption.mode.as_str(), "created encryption");
    Ok((StatusCode::CREATED, Json(view(&details))))
}

async fn show(
    State(state): State<AppState>,
    auth: Auth<ManageScope>,
    Path(id): Path<String>,
) -> Result<Json<EncryptionView>, ApiError> {
    let id = parse_id(&id, "encryption id in the path")?;
    let details = state
        .service
        .encryption_details(auth.principal.tenant_id, id)
        .await?;
    Ok(Json(view(&details)))
}

/// Largest page size.
const MAX_PAGE: u32 = 1000;
/// Default page size.
const DEFAULT_PAGE: u32 = 100;

const CURSOR_B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn encode_cursor(e: &EncryptionRow) -> String {
    CURSOR_B64.encode(format!("{}:{}", e.created_at, e.id))
}

fn decode_cursor(c: &str) -> Option<(i64, EncryptionId)> {
    let text = String::from_utf8(CURSOR_B64.decode(c).ok()?).ok()?;
    let (ms, id) = text.split_once(':')?;
    Some((ms.parse().ok()?, id.parse().ok()?))
}

async fn list(
    State(state): State<AppState>,
    auth: Auth<ManageScope>,
    RawQuery(query): RawQuery,
) -> Result<Json<EncryptionPage>, ApiError> {
    let mut limit = DEFAULT_PAGE;
    let mut after = None;
    for (key, value) in url_pairs(query.as_deref().unwrap_or("")) {
        match key.as_str() {
            "limit" => {
                limit = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE).contains(n))
                    .ok_or_else(|| {
                        ApiError::InvalidRequest(format!(
                            "`limit`: must be an integer from 1 to {MAX_PAGE}"
                        ))
                    })?
            }
            "cursor" => {
                after = Some(decode_cursor(&value).ok_or_else(|| {
                    ApiError::InvalidRequest(
                        "`cursor`: not a cursor returned by this endpoint".into(),
                    )
                })?)
            }
            _ => {
                return Err(ApiError::InvalidRequest(
                    "unknown query parameter (expected `limit` or `cursor`)".into(),
                ))
            }
        }
    }
    let mut rows = state
        .service
        .list_encryptions(auth.principal.tenant_id, after, limit + 1)
        .await?;
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(encode_cursor)
    } else {
        None
    };
    Ok(Json(EncryptionPage {
        items: rows.iter().map(summary).collect(),
        next_cursor,
    }))
}

/// Splits a query string into decoded pairs. Only `limit` and `cursor` are
/// accepted, whose values are plain ASCII, so percent-decoding is not needed
/// beyond rejecting it.
fn url_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k.to_string(), v.to_string())
    })
}
