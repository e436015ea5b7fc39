//! The fixed v1 contract: `POST /v1/encrypt`, `/v1/decrypt`, `/v1/rotate`.
//! Field names, paths and meanings are not ours to change.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{ApiJson, Auth, DecryptScope, EncryptScope, MasterKeyHeader, RotateScope};
use super::{parse_id, AppState};
use crate::crypto::NONCE_LEN;

/// The routes of this resource.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/encrypt", post(encrypt))
        .route("/v1/decrypt", post(decrypt))
        .route("/v1/rotate", post(rotate))
}

/// The only algorithm v1 offers.
pub const ALGORITHM: &str = "AES-256-GCM";

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// `POST /v1/encrypt` input.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EncryptRequest {
    encryption_id: String,
    data: String,
    #[serde(default)]
    encryption_version_id: Option<String>,
}

/// What decrypt needs besides the ciphertext.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    nonce: String,
}

/// `POST /v1/encrypt` output.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptResponse {
    cipher_text: String,
    encryption_id: String,
    encryption_version_id: String,
    algorithm: &'static str,
    metadata: Metadata,
}

async fn encrypt(
    State(state): State<AppState>,
    auth: Auth<EncryptScope>,
    MasterKeyHeader(client_key): MasterKeyHeader,
    ApiJson(req): ApiJson<EncryptRequest>,
) -> Result<Json<EncryptResponse>, ApiError> {
    let id = parse_id(&req.encryption_id, "encryptionId")?;
    let version = req
        .encryption_version_id
        .as_deref()
        .map(|v| parse_id(v, "encryptionVersionId"))
        .transpose()?;
    let out = state
        .service
        .encrypt(
            auth.principal.tenant_id,
            id,
            version,
            req.data.as_bytes(),
            client_key.as_ref(),
        )
        .await?;
    Ok(Json(EncryptResponse {
        cipher_text: B64.encode(&out.ciphertext),
        encryption_id: req.encryption_id,
        encryption_version_id: out.version_id.to_string(),
        algorithm: ALGORITHM,
        metadata: Metadata {
            nonce: B64.encode(out.nonce),
        },
    }))
}

/// `POST /v1/decrypt` input.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DecryptRequest {
    encryption_id: String,
    cipher_text: String,
    encryption_version_id: String,
    metadata: serde_json::Map<String, serde_json::Value>,
}

/// `POST /v1/decrypt` output.
#[derive(Serialize)]
pub struct DecryptResponse {
    data: String,
}

/// The nonce from decrypt's metadata; `None` for anything that is not exactly
/// what encrypt produced (reported as `decryption_failed`, like any tampering).
fn nonce_from(metadata: serde_json::Map<String, serde_json::Value>) -> Option<[u8; NONCE_LEN]> {
    let m: Metadata = serde_json::from_value(serde_json::Value::Object(metadata)).ok()?;
    B64.decode(m.nonce).ok()?.try_into().ok()
}

async fn decrypt(
    State(state): State<AppState>,
    auth: Auth<DecryptScope>,
    MasterKeyHeader(client_key): MasterKeyHeader,
    ApiJson(req): ApiJson<DecryptRequest>,
) -> Result<Json<DecryptResponse>, ApiError> {
    let id = parse_id(&req.encryption_id, "encryptionId")?;
    let version = parse_id(&req.encryption_version_id, "encryptionVersionId")?;
    let ciphertext = B64
        .decode(req.cipher_text.as_bytes())
        .map_err(|_| ApiError::InvalidRequest("`cipherText`: not valid base64".into()))?;
    let nonce = nonce_from(req.metadata);
    let plaintext = state
        .service
        .decrypt(
            auth.principal.tenant_id,
            id,
            version,
            nonce,
            &ciphertext,
            client_key.as_ref(),
        )
        .await?;
    // The plaintext was a JSON string's UTF-8 bytes, and GCM authenticated it, so
    // this cannot fail unless the key itself is wrong, which GCM already refused.
    let data = String::from_utf8(plaintext)
        .map_err(|_| ApiError::Key(crate::domain::service::KeyError::DecryptionFailed))?;
    Ok(Json(DecryptResponse { data }))
}

/// `POST /v1/rotate` input.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RotateRequest {
    encryption_id: String,
}

/// `POST /v1/rotate` output.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RotateResponse {
    new_version_id: String,
}

async fn rotate(
    State(state): State<AppState>,
    auth: Auth<RotateScope>,
    MasterKeyHeader(client_key): MasterKeyHeader,
    ApiJson(req): ApiJson<RotateRequest>,
) -> Result<Json<RotateResponse>, ApiError> {
    let id = parse_id(&req.encryption_id, "encryptionId")?;
    let new_version = state
        .service
        .rotate(auth.principal.tenant_id, id, client_key.as_ref())
        .await?;
    Ok(Json(RotateResponse {
        new_version_id: new_version.to_string(),
    }))
}
