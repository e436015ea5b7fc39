//! Search over encrypted fields (docs/search.md): `POST /v1/index` and its
//! batch compute blind-index values (scope `index`: no ciphertext is made or
//! opened, and `decrypt` is neither needed nor granted); an encryption's
//! blind indexes are declared, listed and retired with `manage`, and their
//! keys rotated with `rotate`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::audit_note::AuditNote;
use super::batch::{run, BatchRefusals, BatchRequest, BatchResponse};
use super::contract::{Call, IndexRequest, IndexResponse};
use super::error::{ApiError, ErrorBody};
use super::extract::{parse_id, MasterKeyParam};
use super::extract::{ApiJson, Auth, IndexScope, ManageScope, MasterKeyHeader, RotateScope};
use super::state::{AppState, BatchLimits};
use crate::crypto::MAX_INDEX_BITS;
use crate::domain::records::BlindIndexRow;
use crate::domain::search::{is_index_name, parse_normalizations};
use crate::domain::time::rfc3339;
use crate::domain::EncryptionId;

/// Compute blind-index values of a plaintext: HMAC-SHA256 under each index's
/// key, after its normalisations, truncated to its bits.
#[utoipa::path(
    post,
    path = "/v1/index",
    tag = "search",
    params(MasterKeyParam),
    request_body = IndexRequest,
    responses(
        (status = 200, description = "The values", body = IndexResponse),
        (status = 400, description = "Bad input; `index_value_too_long` (over 64 KiB before or after the index's normalizations)", body = ErrorBody),
        (status = 401, description = "`missing_credentials`, `invalid_credentials` or `master_key_required`", body = ErrorBody),
        (status = 403, description = "`insufficient_scope` (needs `index`), `certificate_mismatch` or `master_key_mismatch`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found` or `index_not_found`", body = ErrorBody),
        (status = 410, description = "`version_destroyed`", body = ErrorBody),
    )
)]
pub(super) async fn index(
    State(state): State<AppState>,
    auth: Auth<IndexScope>,
    note: AuditNote,
    client_key: MasterKeyHeader,
    ApiJson(req): ApiJson<IndexRequest>,
) -> Result<Json<IndexResponse>, ApiError> {
    let call = Call::new(&state, &auth, &note, &client_key);
    call.index(req).await.map(Json)
}

/// Compute blind-index values of many plaintexts in one call.
#[utoipa::path(post, path = "/v1/index/batch", tag = "search", params(MasterKeyParam),
    request_body = BatchRequest,
    responses(
        (status = 200, description = "One result per item: `/v1/index`'s output or an error", body = BatchResponse<IndexResponse>),
        (status = 403, description = "`insufficient_scope` (needs `index`) or `certificate_mismatch`", body = ErrorBody),
        BatchRefusals,
    ))]
pub(super) async fn index_batch(
    State(state): State<AppState>,
    auth: Auth<IndexScope>,
    Extension(limits): Extension<BatchLimits>,
    note: AuditNote,
    client_key: MasterKeyHeader,
    ApiJson(req): ApiJson<BatchRequest>,
) -> Result<Json<BatchResponse<IndexResponse>>, ApiError> {
    let call = Call::new(&state, &auth, &note, &client_key);
    run(req, limits, &note, |item| call.index(item))
        .await
        .map(Json)
}

/// `POST /v1/encryptions/{id}/indexes` input.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateIndexRequest {
    /// 1 to 64 of `a-z`, `0-9`, `_`, `-`, starting with a letter; unique
    /// within the encryption.
    #[schema(pattern = "^[a-z][a-z0-9_-]{0,63}$")]
    name: String,
    /// Bits kept of each value, 1 to 256 (docs/search.md: how to choose).
    #[schema(minimum = 1, maximum = 256)]
    #[serde(deserialize_with = "whole_number")]
    bits: u16,
    /// Applied in this order before the HMAC: `trim`, `casefold`, `nfkc`,
    /// `digits` (each at most once: a repeated step is `400 invalid_request`).
    #[serde(default)]
    #[schema(value_type = Vec<NormalizationSchema>, max_items = 4)]
    normalizations: Vec<String>,
}

/// A normalisation step.
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "lowercase")]
enum NormalizationSchema {
    /// Leading and trailing Unicode white space removed.
    Trim,
    /// Unicode lower case (not full case folding: `ß` stays).
    Casefold,
    /// Unicode NFKC.
    Nfkc,
    /// ASCII digits only.
    Digits,
}

/// One blind index (never any key material).
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IndexView {
    /// Its name.
    name: String,
    /// Bits kept of each value.
    bits: i64,
    /// The normalisations, in the order applied.
    #[schema(value_type = Vec<NormalizationSchema>)]
    normalizations: Vec<String>,
    /// The version new values are computed under.
    active_version: i64,
    /// Versions from this one to the active one are live.
    min_version: i64,
    /// Its versions, oldest first.
    versions: Vec<IndexVersionView>,
    /// RFC 3339.
    #[schema(format = DateTime)]
    created_at: String,
    /// RFC 3339.
    #[schema(format = DateTime)]
    updated_at: String,
}

/// One version of a blind index's key.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IndexVersionView {
    /// 1, 2, 3...
    version: i64,
    /// The key version whose data key this index key is derived from: it
    /// cannot be destroyed while this index version is live.
    #[schema(format = Uuid)]
    anchor_version_id: String,
    /// Whether lookups still get values under it.
    live: bool,
    /// RFC 3339.
    #[schema(format = DateTime)]
    created_at: String,
}

/// The encryption's blind indexes.
#[derive(Serialize, ToSchema)]
pub struct IndexList {
    /// By name.
    indexes: Vec<IndexView>,
}

fn index_view(row: BlindIndexRow) -> IndexView {
    let live = |v: i64| (row.min_version..=row.active_version).contains(&v);
    IndexView {
        versions: row
            .versions
            .iter()
            .map(|v| IndexVersionView {
                version: v.version,
                anchor_version_id: v.anchor_version_id.to_string(),
                live: live(v.version),
                created_at: rfc3339(v.created_at),
            })
            .collect(),
        normalizations: row
            .normalizations
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        name: row.name,
        bits: row.bits,
        active_version: row.active_version,
        min_version: row.min_version,
        created_at: rfc3339(row.created_at),
        updated_at: rfc3339(row.updated_at),
    }
}

/// The encryption in the path (the audit layer has noted it already).
fn encryption_in_path(id: &str) -> Result<EncryptionId, ApiError> {
    parse_id(id, "encryption id in the path")
}

/// Declare a blind index on an encryption; its first key version is
/// anchored at the encryption's active key version.
#[utoipa::path(
    post,
    path = "/v1/encryptions/{id}/indexes",
    tag = "search",
    params(("id" = String, Path, format = Uuid, description = "The encryption id")),
    request_body = CreateIndexRequest,
    responses(
        (status = 201, description = "Created", body = IndexView),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found`", body = ErrorBody),
        (status = 409, description = "`index_exists` or `too_many_indexes`", body = ErrorBody),
    )
)]
pub(super) async fn create_index(
    State(state): State<AppState>,
    auth: Auth<ManageScope>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<CreateIndexRequest>,
) -> Result<(StatusCode, Json<IndexView>), ApiError> {
    let id = encryption_in_path(&id)?;
    if !is_index_name(&req.name) {
        return Err(ApiError::InvalidRequest(
            "`name`: 1 to 64 of a-z, 0-9, `_`, `-`, starting with a letter".into(),
        ));
    }
    if !(1..=MAX_INDEX_BITS).contains(&req.bits) {
        return Err(ApiError::InvalidRequest(format!(
            "`bits`: from 1 to {MAX_INDEX_BITS}"
        )));
    }
    let steps = parse_normalizations(req.normalizations.iter().map(String::as_str))
        .map_err(|e| ApiError::InvalidRequest(format!("`normalizations`: {e}")))?;
    let row = state
        .service
        .create_index(auth.tenant, id, req.name, req.bits, &steps)
        .await?;
    Ok((StatusCode::CREATED, Json(index_view(row))))
}

/// The encryption's blind indexes.
#[utoipa::path(
    get,
    path = "/v1/encryptions/{id}/indexes",
    tag = "search",
    params(("id" = String, Path, format = Uuid, description = "The encryption id")),
    responses(
        (status = 200, description = "Its indexes", body = IndexList),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found`", body = ErrorBody),
    )
)]
pub(super) async fn list_indexes(
    State(state): State<AppState>,
    auth: Auth<ManageScope>,
    Path(id): Path<String>,
) -> Result<Json<IndexList>, ApiError> {
    let id = encryption_in_path(&id)?;
    let rows = state.service.list_indexes(auth.tenant, id).await?;
    Ok(Json(IndexList {
        indexes: rows.into_iter().map(index_view).collect(),
    }))
}

/// `PATCH /v1/encryptions/{id}/indexes/{name}` input.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateIndexRequest {
    /// Retire the versions below this one (1 to the active version): lookups
    /// with `allVersions` no longer get values under them, and the key
    /// versions they were anchored at may be destroyed.
    #[schema(minimum = 1)]
    #[serde(deserialize_with = "whole_number")]
    min_version: i64,
}

/// An integer field that also takes a JSON number with no fraction (`8.0`),
/// as JSON Schema's `integer` does; anything else, or out of `T`'s range,
/// is a type error naming the field.
fn whole_number<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<i64>,
{
    let n = serde_json::Number::deserialize(deserializer)?;
    let whole = n
        .as_i64()
        .or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
                .map(|f| f as i64)
        })
        .and_then(|i| T::try_from(i).ok());
    whole.ok_or_else(|| serde::de::Error::custom("expected an integer in range"))
}

/// Retire a blind index's older key versions.
#[utoipa::path(
    patch,
    path = "/v1/encryptions/{id}/indexes/{name}",
    tag = "search",
    params(
        ("id" = String, Path, format = Uuid, description = "The encryption id"),
        ("name" = String, Path, description = "The index name"),
    ),
    request_body = UpdateIndexRequest,
    responses(
        (status = 200, description = "The index", body = IndexView),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found` or `index_not_found`", body = ErrorBody),
        (status = 422, description = "`invalid_index_change`", body = ErrorBody),
    )
)]
pub(super) async fn update_index(
    State(state): State<AppState>,
    auth: Auth<ManageScope>,
    Path((id, name)): Path<(String, String)>,
    ApiJson(req): ApiJson<UpdateIndexRequest>,
) -> Result<Json<IndexView>, ApiError> {
    let id = encryption_in_path(&id)?;
    let row = state
        .service
        .set_index_min_version(auth.tenant, id, &name, req.min_version)
        .await?;
    Ok(Json(index_view(row)))
}

/// Rotate a blind index's key: a new version, anchored at the encryption's
/// active key version, becomes active; older versions stay live until
/// retired. Run a re-encryption job with `indexColumns` to recompute the
/// stored values (docs/search.md).
#[utoipa::path(
    post,
    path = "/v1/encryptions/{id}/indexes/{name}/rotate",
    tag = "search",
    params(
        ("id" = String, Path, format = Uuid, description = "The encryption id"),
        ("name" = String, Path, description = "The index name"),
    ),
    responses(
        (status = 200, description = "The index with its new active version", body = IndexView),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 403, description = "`insufficient_scope` (needs `rotate`)", body = ErrorBody),
        (status = 404, description = "`encryption_not_found` or `index_not_found`", body = ErrorBody),
        (status = 409, description = "`too_many_index_versions`: the index has 8 live versions; raise `minVersion` first", body = ErrorBody),
    )
)]
pub(super) async fn rotate_index(
    State(state): State<AppState>,
    auth: Auth<RotateScope>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Json<IndexView>, ApiError> {
    let id = encryption_in_path(&id)?;
    let row = state.service.rotate_index(auth.tenant, id, &name).await?;
    Ok(Json(index_view(row)))
}
