//! Asymmetric keys and key import/export: a version's public key (PEM and
//! JWK), the tenant's import wrapping key, importing key material as a new
//! version, and exporting an exportable encryption's key wrapped to the
//! caller's public key. Private key material never appears in a response
//! except wrapped to a key the caller holds, and only for an encryption
//! created `exportable`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::audit_note::AuditNote;
use super::error::{ApiError, ErrorBody};
use super::extract::{parse_id, ApiJson, Auth, EncryptScope, ExportScope, ImportScope};
use super::state::AppState;
use crate::crypto::{ImportWrapping, RsaPublicKey};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The JOSE name of the one-block wrapping and of the encryption algorithm.
const RSA_OAEP_256: &str = "RSA-OAEP-256";
/// An ephemeral AES key under RSA-OAEP-256, then AES-KWP (RFC 5649).
const RSA_AES_KEY_WRAP: &str = "RSA_AES_KEY_WRAP_SHA_256";

/// An RSA public key as a JWK (RFC 7517).
#[derive(Serialize, ToSchema)]
pub struct Jwk {
    /// `RSA`.
    kty: &'static str,
    /// The modulus, base64url.
    n: String,
    /// The public exponent, base64url.
    e: String,
    /// `RSA-OAEP-256`.
    alg: &'static str,
    /// `enc`.
    #[serde(rename = "use")]
    use_: &'static str,
    /// The key id: the version id (a version's key), or `import-<tenant id>`
    /// (the wrapping key).
    kid: String,
}

fn jwk(key: &RsaPublicKey, kid: String) -> Result<Jwk, ApiError> {
    let (n, e) = key
        .jwk_modulus_exponent()
        .map_err(|e| ApiError::Key(crate::domain::service::KeyError::Integrity(e.to_string())))?;
    Ok(Jwk {
        kty: "RSA",
        n,
        e,
        alg: RSA_OAEP_256,
        use_: "enc",
        kid,
    })
}

/// A version's public key.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublicKeyView {
    /// The encryption.
    #[schema(format = Uuid)]
    encryption_id: String,
    /// The version (also the JWK's `kid`).
    #[schema(format = Uuid)]
    encryption_version_id: String,
    /// `RSA-OAEP-256`.
    algorithm: &'static str,
    /// The modulus size in bits.
    key_size: usize,
    /// SubjectPublicKeyInfo in PEM (`-----BEGIN PUBLIC KEY-----`).
    public_key_pem: String,
    /// The same key as a JWK.
    jwk: Jwk,
}

/// The public key of an `RSA-OAEP-256` encryption's version, as PEM and as
/// JWK: encrypt with any standard library (one RSA-OAEP-256 block, or a
/// compact JWE with `RSA-OAEP-256` + `A256GCM`), decrypt with `/v1/decrypt`.
#[utoipa::path(
    get,
    path = "/v1/encryptions/{id}/versions/{versionId}/public-key",
    tag = "keys",
    params(
        ("id" = String, Path, format = Uuid, description = "The encryption id"),
        ("versionId" = String, Path, format = Uuid, description = "The version id"),
    ),
    responses(
        (status = 200, description = "The public key", body = PublicKeyView),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found` or `version_not_found`", body = ErrorBody),
        (status = 410, description = "`version_destroyed`", body = ErrorBody),
        (status = 422, description = "`not_asymmetric`: an AES-256-GCM encryption has no public key", body = ErrorBody),
    )
)]
pub(super) async fn public_key(
    State(state): State<AppState>,
    auth: Auth<EncryptScope>,
    Path((id, version)): Path<(String, String)>,
) -> Result<Json<PublicKeyView>, ApiError> {
    // The audit layer notes the ids in the path.
    let id = parse_id(&id, "encryption id in the path")?;
    let version = parse_id(&version, "version id in the path")?;
    let key = state.service.public_key(auth.tenant, id, version).await?;
    Ok(Json(PublicKeyView {
        encryption_id: id.to_string(),
        encryption_version_id: version.to_string(),
        algorithm: RSA_OAEP_256,
        key_size: key.bits(),
        public_key_pem: key.pem(),
        jwk: jwk(&key, version.to_string())?,
    }))
}

/// The tenant's import wrapping key.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WrappingKeyView {
    /// The modulus size in bits (4096).
    key_size: usize,
    /// SubjectPublicKeyInfo in PEM.
    public_key_pem: String,
    /// The same key as a JWK.
    jwk: Jwk,
    /// How key material may be wrapped under it: `RSA-OAEP-256` (the key
    /// itself, one block: an AES-256 key) or `RSA_AES_KEY_WRAP_SHA_256` (an
    /// ephemeral AES-256 key under RSA-OAEP-256, followed by the key material
    /// under that key with AES Key Wrap with Padding, RFC 5649).
    wrapping_algorithms: [&'static str; 2],
}

/// The tenant's RSA-OAEP-256 key for wrapping key material to import (like
/// AWS KMS `GetParametersForImport` or Vault's `wrapping_key`). Made on first
/// use and kept; the same for every encryption of the tenant.
#[utoipa::path(
    get,
    path = "/v1/import/wrapping-key",
    tag = "keys",
    responses(
        (status = 200, description = "The wrapping key", body = WrappingKeyView),
    )
)]
pub(super) async fn wrapping_key(
    State(state): State<AppState>,
    auth: Auth<ImportScope>,
) -> Result<Json<WrappingKeyView>, ApiError> {
    let key = state.service.wrapping_public_key(auth.tenant).await?;
    Ok(Json(WrappingKeyView {
        key_size: key.bits(),
        public_key_pem: key.pem(),
        jwk: jwk(&key, format!("import-{}", auth.tenant))?,
        wrapping_algorithms: [RSA_OAEP_256, RSA_AES_KEY_WRAP],
    }))
}

/// `POST /v1/encryptions/{id}/import` input.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImportRequest {
    /// The key material wrapped under the tenant's wrapping key, base64:
    /// 32 raw bytes for an AES-256-GCM encryption, PKCS#8 DER of an RSA 3072
    /// or 4096 key for an RSA-OAEP-256 one.
    #[schema(format = Byte)]
    wrapped_key: String,
    /// `RSA-OAEP-256` or `RSA_AES_KEY_WRAP_SHA_256`.
    #[schema(value_type = WrappingAlgorithmSchema)]
    wrapping_algorithm: String,
}

/// How imported key material is wrapped.
#[derive(ToSchema)]
#[allow(dead_code)]
enum WrappingAlgorithmSchema {
    /// RSA-OAEP-256 of the material itself (an AES-256 key).
    #[schema(rename = "RSA-OAEP-256")]
    RsaOaep256,
    /// An ephemeral AES-256 key under RSA-OAEP-256, then AES-KWP (RFC 5649).
    #[schema(rename = "RSA_AES_KEY_WRAP_SHA_256")]
    RsaAesKeyWrapSha256,
}

/// `POST /v1/encryptions/{id}/import` output.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImportResponse {
    /// The encryption.
    #[schema(format = Uuid)]
    encryption_id: String,
    /// The new active version, holding the imported key.
    #[schema(format = Uuid)]
    new_version_id: String,
    /// Always `true`.
    imported: bool,
}

/// Import key material (bring your own key) as a new active version of a
/// platform-managed encryption; older versions keep decrypting, as after a
/// rotation. The version shows `"imported": true`.
#[utoipa::path(
    post,
    path = "/v1/encryptions/{id}/import",
    tag = "keys",
    params(("id" = String, Path, format = Uuid, description = "The encryption id")),
    request_body = ImportRequest,
    responses(
        (status = 201, description = "Imported", body = ImportResponse),
        (status = 400, description = "`import_failed` (the wrapped key does not unwrap to a key this encryption can use: wrong wrapping key or algorithm, tampered bytes, wrong key material; one answer for all) or `invalid_request`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found`", body = ErrorBody),
        (status = 422, description = "`import_not_supported` (a client-mode encryption)", body = ErrorBody),
    )
)]
pub(super) async fn import(
    State(state): State<AppState>,
    auth: Auth<ImportScope>,
    note: AuditNote,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ImportRequest>,
) -> Result<(StatusCode, Json<ImportResponse>), ApiError> {
    // The audit layer notes the encryption id in the path.
    let id = parse_id(&id, "encryption id in the path")?;
    let wrapping = match req.wrapping_algorithm.as_str() {
        RSA_OAEP_256 => ImportWrapping::RsaOaep256,
        RSA_AES_KEY_WRAP => ImportWrapping::RsaAesKeyWrapSha256,
        _ => {
            return Err(ApiError::InvalidRequest(format!(
                "`wrappingAlgorithm`: expected `{RSA_OAEP_256}` or `{RSA_AES_KEY_WRAP}`"
            )))
        }
    };
    let wrapped = B64
        .decode(req.wrapped_key.as_bytes())
        .map_err(|_| ApiError::InvalidRequest("`wrappedKey`: not valid base64".into()))?;
    let version = state
        .service
        .import_version(auth.tenant, id, wrapping, &wrapped)
        .await?;
    note.version(version);
    Ok((
        StatusCode::CREATED,
        Json(ImportResponse {
            encryption_id: id.to_string(),
            new_version_id: version.to_string(),
            imported: true,
        }),
    ))
}

/// `POST /v1/encryptions/{id}/versions/{versionId}/export` input.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExportRequest {
    /// The RSA public key (3072 bits or more) to wrap the key material to,
    /// SubjectPublicKeyInfo in PEM (`-----BEGIN PUBLIC KEY-----`).
    public_key: String,
}

/// `POST /v1/encryptions/{id}/versions/{versionId}/export` output.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExportResponse {
    /// The encryption.
    #[schema(format = Uuid)]
    encryption_id: String,
    /// The version exported.
    #[schema(format = Uuid)]
    encryption_version_id: String,
    /// The encryption's algorithm.
    algorithm: String,
    /// `RSA_AES_KEY_WRAP_SHA_256`.
    wrapping_algorithm: &'static str,
    /// The key material wrapped to the caller's public key, base64: 32 raw
    /// bytes (AES-256-GCM) or PKCS#8 DER (RSA-OAEP-256).
    #[schema(format = Byte)]
    wrapped_key: String,
}

/// Export a version's key material, wrapped to the caller's public key, if
/// the encryption was created `exportable`; refused (and audited) otherwise.
#[utoipa::path(
    post,
    path = "/v1/encryptions/{id}/versions/{versionId}/export",
    tag = "keys",
    params(
        ("id" = String, Path, format = Uuid, description = "The encryption id"),
        ("versionId" = String, Path, format = Uuid, description = "The version id"),
    ),
    request_body = ExportRequest,
    responses(
        (status = 200, description = "Exported", body = ExportResponse),
        (status = 400, description = "`invalid_request` (not an RSA public key of 3072 bits or more in PEM)", body = ErrorBody),
        (status = 403, description = "`export_not_allowed`: the encryption was not created exportable", body = ErrorBody),
        (status = 404, description = "`encryption_not_found` or `version_not_found`", body = ErrorBody),
        (status = 410, description = "`version_destroyed`", body = ErrorBody),
    )
)]
pub(super) async fn export(
    State(state): State<AppState>,
    auth: Auth<ExportScope>,
    Path((id, version)): Path<(String, String)>,
    ApiJson(req): ApiJson<ExportRequest>,
) -> Result<Json<ExportResponse>, ApiError> {
    // The audit layer notes the ids in the path.
    let id = parse_id(&id, "encryption id in the path")?;
    let version = parse_id(&version, "version id in the path")?;
    let target = RsaPublicKey::from_pem(&req.public_key).map_err(|e| {
        ApiError::InvalidRequest(format!(
            "`publicKey`: expected an RSA public key of 3072 bits or more in PEM (-----BEGIN PUBLIC KEY-----): {e}"
        ))
    })?;
    let (algorithm, wrapped) = state
        .service
        .export_version(auth.tenant, id, version, &target)
        .await?;
    Ok(Json(ExportResponse {
        encryption_id: id.to_string(),
        encryption_version_id: version.to_string(),
        algorithm,
        wrapping_algorithm: RSA_AES_KEY_WRAP,
        wrapped_key: B64.encode(wrapped),
    }))
}
