//! Data keys for envelope encryption: `POST /v1/datakey` mints one (in
//! plaintext and wrapped, or wrapped only), `POST /v1/datakey/unwrap` opens a
//! wrapped one (its own scope, `unwrap`), `POST /v1/datakey/rewrap` moves one
//! to the active version (docs/envelope.md).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::audit_note::AuditNote;
use super::contract::context_bytes;
use super::error::{ApiError, ErrorBody};
use super::extract::{
    parse_id, ApiJson, Auth, DataKeyScope, MasterKeyHeader, MasterKeyParam, RotateScope,
    UnwrapScope,
};
use super::secret::{plain_str, SecretBody};
use super::state::AppState;
use crate::crypto::{DataKey, SecretString};
use crate::domain::EncryptionId;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// `POST /v1/datakey` input.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DataKeyRequest {
    /// The encryption whose active version wraps the data key.
    #[schema(format = Uuid)]
    encryption_id: String,
    /// The caller's context (up to 1024 characters), bound into the wrapped
    /// key: unwrapping and rewrapping need it again.
    #[serde(default)]
    #[schema(max_length = 1024, nullable = false)]
    context: Option<String>,
    /// `true`: return the wrapped key alone, no `plaintextKey` (like
    /// Vault's `wrapped` and KMS `GenerateDataKeyWithoutPlaintext`).
    #[serde(default)]
    wrapped_only: bool,
}

/// `POST /v1/datakey` output.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataKeyResponse {
    /// The 256-bit data key, base64 (absent with `wrappedOnly`).
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "plain_opt")]
    #[schema(value_type = Option<String>, format = Byte)]
    plaintext_key: Option<SecretString>,
    /// The data key wrapped under `encryptionVersionId`, base64: keep it
    /// beside what the key encrypts.
    #[schema(format = Byte)]
    wrapped_key: String,
    /// The encryption.
    #[schema(format = Uuid)]
    encryption_id: String,
    /// The version that wraps it.
    #[schema(format = Uuid)]
    encryption_version_id: String,
}

fn plain_opt<S: serde::Serializer>(value: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(v) => plain_str(v, s),
        None => s.serialize_none(),
    }
}

/// `POST /v1/datakey/unwrap` and `/v1/datakey/rewrap` input.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WrappedKeyRequest {
    /// The encryption the key was wrapped under.
    #[schema(format = Uuid)]
    encryption_id: String,
    /// The wrapped key, base64, as `/v1/datakey` returned it.
    #[schema(format = Byte)]
    wrapped_key: String,
    /// The context it was made with, byte for byte (absent or empty: none).
    #[serde(default)]
    #[schema(max_length = 1024, nullable = false)]
    context: Option<String>,
}

/// `POST /v1/datakey/unwrap` output.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnwrapResponse {
    /// The data key, base64.
    #[serde(serialize_with = "plain_str")]
    #[schema(value_type = String, format = Byte)]
    plaintext_key: SecretString,
    /// The encryption.
    #[schema(format = Uuid)]
    encryption_id: String,
    /// The version that wrapped it.
    #[schema(format = Uuid)]
    encryption_version_id: String,
}

/// `POST /v1/datakey/rewrap` output.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RewrapKeyResponse {
    /// The same data key wrapped under the active version, base64.
    #[schema(format = Byte)]
    wrapped_key: String,
    /// The encryption.
    #[schema(format = Uuid)]
    encryption_id: String,
    /// The version that wraps it now.
    #[schema(format = Uuid)]
    encryption_version_id: String,
}

/// Base64 of a data key, in memory cleared on drop.
fn key_base64(key: &DataKey) -> SecretString {
    let mut out = String::with_capacity(44);
    B64.encode_string(key.expose(), &mut out);
    SecretString::new(out)
}

fn wrapped_bytes(text: &str) -> Result<Vec<u8>, ApiError> {
    B64.decode(text.as_bytes())
        .map_err(|_| ApiError::InvalidRequest("`wrappedKey`: not valid base64".into()))
}

/// What unwrap and rewrap take from their input: the encryption (noted for
/// the audit record), the wrapped key's bytes and the context.
fn wrapped_input<'a>(
    req: &'a WrappedKeyRequest,
    note: &AuditNote,
) -> Result<(EncryptionId, Vec<u8>, &'a [u8]), ApiError> {
    let id = parse_id(&req.encryption_id, "encryptionId")?;
    note.encryption(id);
    Ok((
        id,
        wrapped_bytes(&req.wrapped_key)?,
        context_bytes(&req.context)?,
    ))
}

/// Mint a fresh 256-bit data key, wrapped under the encryption's active
/// version (and, unless `wrappedOnly`, in plaintext too).
#[utoipa::path(
    post,
    path = "/v1/datakey",
    tag = "envelope",
    params(MasterKeyParam),
    request_body = DataKeyRequest,
    responses(
        (status = 200, description = "A data key", body = DataKeyResponse),
        (status = 400, description = "`invalid_request`, `invalid_master_key`, `master_key_not_applicable`", body = ErrorBody),
        (status = 401, description = "`missing_credentials`, `invalid_credentials` or `master_key_required`", body = ErrorBody),
        (status = 403, description = "`insufficient_scope` (needs `datakey`) or `master_key_mismatch`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found`", body = ErrorBody),
        (status = 503, description = "`rotation_pending` or `unavailable`", body = ErrorBody),
    )
)]
pub(super) async fn generate(
    State(state): State<AppState>,
    auth: Auth<DataKeyScope>,
    note: AuditNote,
    client_key: MasterKeyHeader,
    ApiJson(req): ApiJson<DataKeyRequest>,
) -> Result<Response, ApiError> {
    let id = parse_id(&req.encryption_id, "encryptionId")?;
    note.encryption(id);
    let context = context_bytes(&req.context)?;
    let made = state
        .service
        .generate_data_key(auth.tenant, id, context, client_key.0.as_ref())
        .await?;
    note.version(made.version_id);
    let response = DataKeyResponse {
        plaintext_key: (!req.wrapped_only).then(|| key_base64(&made.key)),
        wrapped_key: B64.encode(&made.wrapped),
        encryption_id: id.to_string(),
        encryption_version_id: made.version_id.to_string(),
    };
    Ok(SecretBody::json(&response, 512).into_response())
}

/// Unwrap a data key made by `/v1/datakey`. Any mismatch (another
/// encryption, a different or missing context, a changed byte) is
/// `decryption_failed`; version states and `minDecryptionVersion` apply as
/// to decrypt.
#[utoipa::path(
    post,
    path = "/v1/datakey/unwrap",
    tag = "envelope",
    params(MasterKeyParam),
    request_body = WrappedKeyRequest,
    responses(
        (status = 200, description = "The data key", body = UnwrapResponse),
        (status = 400, description = "`decryption_failed`, `invalid_request`, `invalid_master_key`", body = ErrorBody),
        (status = 401, description = "`missing_credentials`, `invalid_credentials` or `master_key_required`", body = ErrorBody),
        (status = 403, description = "`insufficient_scope` (needs `unwrap`), `version_disabled`, `version_below_minimum` or `master_key_mismatch`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found`", body = ErrorBody),
        (status = 410, description = "`version_destroyed`", body = ErrorBody),
    )
)]
pub(super) async fn unwrap(
    State(state): State<AppState>,
    auth: Auth<UnwrapScope>,
    note: AuditNote,
    client_key: MasterKeyHeader,
    ApiJson(req): ApiJson<WrappedKeyRequest>,
) -> Result<Response, ApiError> {
    let (id, wrapped, context) = wrapped_input(&req, &note)?;
    if let Some(v) = crate::domain::service::wrapped_key_version(&wrapped) {
        note.version(v);
    }
    let (key, version) = state
        .service
        .unwrap_data_key(auth.tenant, id, &wrapped, context, client_key.0.as_ref())
        .await?;
    let response = UnwrapResponse {
        plaintext_key: key_base64(&key),
        encryption_id: id.to_string(),
        encryption_version_id: version.to_string(),
    };
    Ok(SecretBody::json(&response, 256).into_response())
}

/// Move a wrapped data key to the encryption's active version, under the
/// same context; the data key never leaves the service.
#[utoipa::path(
    post,
    path = "/v1/datakey/rewrap",
    tag = "envelope",
    params(MasterKeyParam),
    request_body = WrappedKeyRequest,
    responses(
        (status = 200, description = "Rewrapped", body = RewrapKeyResponse),
        (status = 400, description = "`decryption_failed`, `invalid_request`", body = ErrorBody),
        (status = 401, description = "`missing_credentials`, `invalid_credentials` or `master_key_required`", body = ErrorBody),
        (status = 403, description = "`insufficient_scope` (needs `rotate`), `version_disabled`, `version_below_minimum`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found`", body = ErrorBody),
        (status = 410, description = "`version_destroyed`", body = ErrorBody),
    )
)]
pub(super) async fn rewrap(
    State(state): State<AppState>,
    auth: Auth<RotateScope>,
    note: AuditNote,
    client_key: MasterKeyHeader,
    ApiJson(req): ApiJson<WrappedKeyRequest>,
) -> Result<Json<RewrapKeyResponse>, ApiError> {
    // A version that is not the encryption's is already
    // `decryption_failed` in the service, as for unwrap.
    let (id, wrapped, context) = wrapped_input(&req, &note)?;
    let (rewrapped, version) = state
        .service
        .rewrap_data_key(auth.tenant, id, &wrapped, context, client_key.0.as_ref())
        .await?;
    note.version(version);
    Ok(Json(RewrapKeyResponse {
        wrapped_key: B64.encode(rewrapped),
        encryption_id: id.to_string(),
        encryption_version_id: version.to_string(),
    }))
}
