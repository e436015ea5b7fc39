//! Managing encryptions: `POST /v1/encryptions`, `GET /v1/encryptions`,
//! `GET /v1/encryptions/{id}`. Key material, wrapped or not, never appears in
//! any response.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::audit_note::AuditNote;
use super::contract::ALGORITHM;
use super::error::{ApiError, ErrorBody};
use super::extract::{parse_id, MasterKeyParam};
use super::extract::{ApiJson, Auth, ManageScope, MasterKeyHeader};
use super::query::{self, ApiQuery};
use super::state::AppState;
use crate::domain::algorithm::Algorithm;
use crate::domain::keys::VersionState;
use crate::domain::records::{EncryptionRow, VersionRow};
use crate::domain::service::EncryptionDetails;
use crate::domain::time::rfc3339;
use crate::domain::EncryptionId;

/// `POST /v1/encryptions` input (every field optional; an empty body is fine).
/// Send `X-Master-Key` to create a client-mode (zero-knowledge) encryption.
#[derive(Deserialize, Default, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateRequest {
    /// A human name, 1 to 200 printable characters (no control characters).
    #[serde(default)]
    #[schema(
        min_length = 1,
        max_length = 200,
        nullable = true,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    name: Option<String>,
    /// `AES-256-GCM` (the default: a random nonce per call), or
    /// `AES-256-GCM-SIV` for deterministic encryption (equal plaintexts under
    /// the same version and `context` give equal ciphertexts: see
    /// docs/search.md for what that leaks). Fixed for the encryption's life.
    #[serde(default)]
    #[schema(value_type = Option<AlgorithmSchema>, nullable = true)]
    algorithm: Option<String>,
}

/// The algorithms offered.
#[derive(ToSchema)]
#[allow(dead_code)]
enum AlgorithmSchema {
    /// AES-256-GCM with 96-bit random nonces.
    #[schema(rename = "AES-256-GCM")]
    Aes256Gcm,
    /// AES-256-GCM-SIV (RFC 8452), deterministic under a context.
    #[schema(rename = "AES-256-GCM-SIV")]
    Aes256GcmSiv,
}

/// Who wraps an encryption's data keys.
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "snake_case")]
enum ModeSchema {
    Platform,
    Client,
}

/// A key version's lifecycle state.
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "snake_case")]
enum StateSchema {
    Active,
    Enabled,
    DecryptOnly,
    Disabled,
    Destroyed,
}

/// One encryption as listed.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionSummary {
    /// Its id.
    #[schema(format = Uuid)]
    encryption_id: String,
    /// Its name, if given.
    name: Option<String>,
    /// `AES-256-GCM`, or `AES-256-GCM-SIV` (deterministic).
    #[schema(value_type = AlgorithmSchema)]
    algorithm: String,
    /// `platform` (root KEK) or `client` (X-Master-Key).
    #[schema(value_type = ModeSchema)]
    mode: &'static str,
    /// The version encrypt uses by default.
    #[schema(format = Uuid)]
    active_version_id: String,
    /// The highest version number.
    latest_version: i64,
    /// RFC 3339.
    #[schema(format = DateTime)]
    created_at: String,
    /// RFC 3339.
    #[schema(format = DateTime)]
    updated_at: String,
    /// Rotate by itself when the active version is this old (e.g. `30days`);
    /// `null`: never.
    auto_rotate_period: Option<String>,
    /// Versions numbered below this do not decrypt.
    min_decryption_version: i64,
}

/// One version as shown (never any key material).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VersionView {
    /// The contract's `encryptionVersionId`.
    #[schema(format = Uuid)]
    version_id: String,
    /// 1, 2, 3...
    version: i64,
    /// Lifecycle state.
    #[schema(value_type = StateSchema)]
    state: &'static str,
    /// RFC 3339.
    #[schema(format = DateTime)]
    created_at: String,
    /// When it stopped being active (RFC 3339).
    #[schema(format = DateTime)]
    rotated_at: Option<String>,
    /// Encryptions made with it (counted in memory, flushed every few seconds).
    encrypt_count: i64,
}

/// One encryption with its versions.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionView {
    #[serde(flatten)]
    summary: EncryptionSummary,
    /// Every version, by number.
    versions: Vec<VersionView>,
}

/// A page of encryptions.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionPage {
    /// This page.
    items: Vec<EncryptionSummary>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    next_cursor: Option<String>,
}

/// Paging parameters of `GET /v1/encryptions`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Page size, 1 to 1000 (default 100).
    #[serde(default, deserialize_with = "query::page_limit")]
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// The `nextCursor` of the previous page.
    #[serde(default, deserialize_with = "cursor")]
    #[param(value_type = Option<String>)]
    cursor: Option<(i64, EncryptionId)>,
}

fn cursor<'de, D>(deserializer: D) -> Result<Option<(i64, EncryptionId)>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    query::value(deserializer, decode_cursor, query::NOT_A_CURSOR)
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
        auto_rotate_period: e.auto_rotate_period_ms.map(|ms| {
            humantime::format_duration(std::time::Duration::from_millis(ms.max(0) as u64))
                .to_string()
        }),
        min_decryption_version: e.min_decryption_version,
    }
}

fn version_view(v: &VersionRow) -> VersionView {
    VersionView {
        version_id: v.id.to_string(),
        version: v.version,
        state: v.state.as_str(),
        created_at: rfc3339(v.created_at),
        rotated_at: v.rotated_at.map(rfc3339),
        encrypt_count: v.encrypt_count,
    }
}

fn view(d: &EncryptionDetails) -> EncryptionView {
    EncryptionView {
        summary: summary(&d.encryption),
        versions: d.versions.iter().map(version_view).collect(),
    }
}

/// Create an encryption (a key context) with its first version.
#[utoipa::path(
    post,
    path = "/v1/encryptions",
    tag = "encryptions",
    params(MasterKeyParam),
    request_body(content = CreateRequest, description = "Optional; an empty body is fine"),
    responses(
        (status = 201, description = "Created", body = EncryptionView),
        (status = 400, description = "Bad input", body = ErrorBody),
    )
)]
pub(super) async fn create(
    State(state): State<AppState>,
    auth: Auth<ManageScope>,
    note: AuditNote,
    MasterKeyHeader(client_key): MasterKeyHeader,
    ApiJson(req): ApiJson<CreateRequest>,
) -> Result<(StatusCode, Json<EncryptionView>), ApiError> {
    let algorithm = match req.algorithm.as_deref() {
        None => Algorithm::Aes256Gcm,
        Some(name) => Algorithm::parse(name).ok_or_else(|| {
            ApiError::InvalidRequest(format!(
                "`algorithm`: unsupported, expected `{ALGORITHM}` or `{}`",
                Algorithm::Aes256GcmSiv.as_str()
            ))
        })?,
    };
    if let Some(name) = &req.name {
        if name.is_empty() || name.chars().count() > 200 || name.chars().any(char::is_control) {
            return Err(ApiError::InvalidRequest(
                "`name`: must be 1 to 200 printable characters".into(),
            ));
        }
    }
    let details = state
        .service
        .create_encryption_with(auth.tenant, req.name, algorithm, client_key.as_ref())
        .await?;
    note.encryption(details.encryption.id);
    tracing::info!(encryption_id = %details.encryption.id, mode = details.encryption.mode.as_str(), "created encryption");
    Ok((StatusCode::CREATED, Json(view(&details))))
}

/// One encryption with its versions.
#[utoipa::path(
    get,
    path = "/v1/encryptions/{id}",
    tag = "encryptions",
    params(("id" = String, Path, format = Uuid, description = "The encryption id")),
    responses(
        (status = 200, description = "The encryption", body = EncryptionView),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found`", body = ErrorBody),
    )
)]
pub(super) async fn show(
    State(state): State<AppState>,
    auth: Auth<ManageScope>,
    Path(id): Path<String>,
) -> Result<Json<EncryptionView>, ApiError> {
    let id = parse_id(&id, "encryption id in the path")?;
    let details = state.service.encryption_details(auth.tenant, id).await?;
    Ok(Json(view(&details)))
}

/// `PATCH /v1/encryptions/{id}` input: the rotation policy. Omitted fields stay.
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "camelCase")]
pub struct PolicyRequest {
    /// Rotate when the active version is this old: `720h`, `30days`, ...
    /// (at least 1s); `null` turns automatic rotation by age off.
    #[schema(nullable = true)]
    auto_rotate_period: Option<String>,
    /// Versions numbered below this stop decrypting (1 to the active version).
    #[schema(minimum = 1, nullable = false)]
    min_decryption_version: Option<i64>,
}

/// Set the encryption's rotation policy.
#[utoipa::path(
    patch,
    path = "/v1/encryptions/{id}",
    tag = "encryptions",
    params(("id" = String, Path, format = Uuid, description = "The encryption id")),
    request_body = PolicyRequest,
    responses(
        (status = 200, description = "The encryption with its new policy", body = EncryptionView),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_policy`", body = ErrorBody),
    )
)]
pub(super) async fn update(
    State(state): State<AppState>,
    auth: Auth<ManageScope>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<serde_json::Map<String, serde_json::Value>>,
) -> Result<Json<EncryptionView>, ApiError> {
    let id = parse_id(&id, "encryption id in the path")?;
    let mut period = None;
    let mut min = None;
    for (key, value) in body {
        match (key.as_str(), value) {
            ("autoRotatePeriod", serde_json::Value::Null) => period = Some(None),
            ("autoRotatePeriod", serde_json::Value::String(p)) => {
                period = Some(Some(humantime::parse_duration(&p).map_err(|_| {
                    ApiError::InvalidRequest(
                        "`autoRotatePeriod`: not a duration like `720h` or `30days`".into(),
                    )
                })?))
            }
            ("autoRotatePeriod", _) => {
                return Err(ApiError::InvalidRequest(
                    "`autoRotatePeriod`: wrong type, expected a string or null".into(),
                ))
            }
            ("minDecryptionVersion", serde_json::Value::Number(n)) => {
                let whole = n.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15);
                min = Some(n.as_i64().or(whole.map(|f| f as i64)).ok_or_else(|| {
                    ApiError::InvalidRequest("`minDecryptionVersion`: expected an integer".into())
                })?)
            }
            ("minDecryptionVersion", _) => {
                return Err(ApiError::InvalidRequest(
                    "`minDecryptionVersion`: wrong type, expected an integer".into(),
                ))
            }
            _ => {
                return Err(ApiError::InvalidRequest(
                    "unknown field (expected `autoRotatePeriod` or `minDecryptionVersion`)".into(),
                ))
            }
        }
    }
    let details = state
        .service
        .set_policy(auth.tenant, id, period, min)
        .await?;
    Ok(Json(view(&details)))
}

/// `PATCH /v1/encryptions/{id}/versions/{versionId}` input.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VersionStateRequest {
    /// `enabled`, `decrypt_only`, `disabled` (reversible) or `destroyed` (the
    /// key material is erased for good).
    #[schema(value_type = StateSchema)]
    state: String,
    /// Destroy even though the last re-encryption job found rows still on
    /// this version (their data becomes unreadable for good).
    #[serde(default)]
    force: bool,
}

/// Change a version's state.
#[utoipa::path(
    patch,
    path = "/v1/encryptions/{id}/versions/{versionId}",
    tag = "encryptions",
    params(
        ("id" = String, Path, format = Uuid, description = "The encryption id"),
        ("versionId" = String, Path, format = Uuid, description = "The version id"),
    ),
    request_body = VersionStateRequest,
    responses(
        (status = 200, description = "The encryption with the changed version", body = EncryptionView),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found` or `version_not_found`", body = ErrorBody),
        (status = 409, description = "`invalid_state_change` (the active version, a destroyed version, or `active`), or `version_in_use` (the last job found rows on it; send `force`)", body = ErrorBody),
    )
)]
pub(super) async fn update_version(
    State(state): State<AppState>,
    auth: Auth<ManageScope>,
    Path((id, version_id)): Path<(String, String)>,
    ApiJson(req): ApiJson<VersionStateRequest>,
) -> Result<Json<EncryptionView>, ApiError> {
    let id = parse_id(&id, "encryption id in the path")?;
    let version = parse_id(&version_id, "version id in the path")?;
    let new_state = VersionState::parse(&req.state).ok_or_else(|| {
        ApiError::InvalidRequest(
            "`state`: expected `enabled`, `decrypt_only`, `disabled` or `destroyed`".into(),
        )
    })?;
    let details = state
        .service
        .set_version_state(auth.tenant, id, version, new_state, req.force)
        .await?;
    Ok(Json(view(&details)))
}

const CURSOR_B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

fn encode_cursor(e: &EncryptionRow) -> String {
    CURSOR_B64.encode(format!("{}:{}", e.created_at, e.id))
}

fn decode_cursor(c: &str) -> Option<(i64, EncryptionId)> {
    let text = String::from_utf8(CURSOR_B64.decode(c).ok()?).ok()?;
    let (ms, id) = text.split_once(':')?;
    Some((ms.parse().ok()?, id.parse().ok()?))
}

/// The caller's tenant's encryptions, paginated.
#[utoipa::path(
    get,
    path = "/v1/encryptions",
    tag = "encryptions",
    params(ListParams),
    responses(
        (status = 200, description = "A page", body = EncryptionPage),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
    )
)]
pub(super) async fn list(
    State(state): State<AppState>,
    auth: Auth<ManageScope>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<EncryptionPage>, ApiError> {
    let limit = params.limit.unwrap_or(query::DEFAULT_PAGE);
    let mut rows = state
        .service
        .list_encryptions(auth.tenant, params.cursor, limit + 1)
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
