//! Rewrap and batches: `POST /v1/rewrap` re-encrypts a ciphertext under the
//! active version without the plaintext leaving the service;
//! `POST /v1/{encrypt,decrypt,rewrap}/batch` take `{"items": [...]}`, each item
//! the single call's input, and answer `{"results": [...]}` in the same order,
//! each the single call's output or `{"error": {"code", "message"}}`. One bad
//! item does not fail the others.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use utoipa::{IntoResponses, ToSchema};
use zeroize::Zeroizing;

use super::audit_note::AuditNote;
use super::contract::{Call, DecryptRequest, DecryptResponse, EncryptResponse};
use super::error::{ApiError, ErrorBody};
use super::extract::MasterKeyParam;
use super::extract::{ApiJson, Auth, DecryptScope, EncryptScope, MasterKeyHeader, RotateScope};
use super::secret::SecretBody;
use super::state::{AppState, BatchLimits};

/// Re-encrypt a ciphertext under the active version (decrypt's input,
/// encrypt's output). The plaintext never leaves Keyward.
#[utoipa::path(
    post,
    path = "/v1/rewrap",
    tag = "lifecycle",
    params(MasterKeyParam),
    request_body = DecryptRequest,
    responses(
        (status = 200, description = "Re-encrypted under the active version", body = EncryptResponse),
        (status = 400, description = "`decryption_failed` or bad input", body = ErrorBody),
        (status = 401, description = "`missing_credentials`, `invalid_credentials` or `master_key_required`", body = ErrorBody),
        (status = 403, description = "`insufficient_scope` (needs `rotate`), `certificate_mismatch`, `version_disabled`, `version_below_min_decryption` or `master_key_mismatch`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found`", body = ErrorBody),
        (status = 410, description = "`version_destroyed`", body = ErrorBody),
    )
)]
pub(super) async fn rewrap(
    State(state): State<AppState>,
    auth: Auth<RotateScope>,
    note: AuditNote,
    client_key: MasterKeyHeader,
    ApiJson(req): ApiJson<DecryptRequest>,
) -> Result<Json<EncryptResponse>, ApiError> {
    let call = Call::new(&state, &auth, &note, &client_key);
    call.rewrap(req).await.map(Json)
}

/// A batch: the single calls' inputs.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// The items, each the single call's input.
    // Kept as their JSON text, so that each is parsed by the single call's
    // own parser, as strictly (a field given twice is refused, not silently
    // the last one).
    #[schema(value_type = Vec<Object>)]
    items: Vec<Box<RawValue>>,
}

/// One item's outcome: the single call's output, or an error.
#[derive(Serialize)]
#[serde(untagged)]
pub enum ItemResult<T> {
    /// The output.
    Ok(T),
    /// `{"error": {"code", "message"}}`, as an error response's body.
    Err(ErrorBody),
}

impl ItemResult<DecryptResponse> {
    /// About the bytes this result takes in the response.
    fn len_hint(&self) -> usize {
        match self {
            ItemResult::Ok(o) => o.data.len() + 12,
            ItemResult::Err(_) => 128,
        }
    }
}

/// What a batch can be refused with as a whole, besides authentication (for
/// the OpenAPI document; a bad item is an item's error).
#[derive(IntoResponses)]
#[allow(dead_code)]
pub(super) enum BatchRefusals {
    #[response(status = 400, description = "Bad input")]
    BadInput(ErrorBody),
    #[response(status = 413, description = "`too_many_items` or `payload_too_large`")]
    TooLarge(ErrorBody),
    #[response(
        status = 503,
        description = "`server_busy`: batch and large requests already hold `max_concurrent_body_bytes`; retry after Retry-After"
    )]
    Busy(ErrorBody),
}

/// A batch's results, in item order.
#[derive(Serialize, ToSchema)]
pub struct BatchResponse<T> {
    /// One result per item.
    #[schema(value_type = Vec<Object>)]
    results: Vec<ItemResult<T>>,
}

/// Runs `f` on every item in order, after checking the item count; each item
/// gets its own audit target and outcome. The items' JSON text (an encrypt
/// item holds its plaintext) is cleared when the batch is done, whichever
/// way it ends.
pub(super) async fn run<I, O, F, Fut>(
    req: BatchRequest,
    limits: BatchLimits,
    note: &AuditNote,
    f: F,
) -> Result<BatchResponse<O>, ApiError>
where
    I: DeserializeOwned,
    F: Fn(I) -> Fut,
    Fut: std::future::Future<Output = Result<O, ApiError>>,
{
    // The same allocations, now cleared on drop.
    let items: Zeroizing<Vec<Box<str>>> =
        Zeroizing::new(req.items.into_iter().map(Box::<str>::from).collect());
    if items.len() > limits.max_items {
        return Err(ApiError::TooManyItems(limits.max_items));
    }
    let is_object = |item: &str| item.trim_start().starts_with('{');
    if let Some(i) = items.iter().position(|item| !is_object(item)) {
        return Err(ApiError::InvalidRequest(format!(
            "`items[{i}]`: expected an object"
        )));
    }
    let mut results = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        note.begin_item(index);
        let parsed: Result<I, ApiError> = super::extract::parse_json(item.as_bytes());
        let outcome = match parsed {
            Ok(input) => f(input).await,
            Err(e) => Err(e),
        };
        results.push(match outcome {
            Ok(o) => {
                note.end_item(None);
                ItemResult::Ok(o)
            }
            Err(e) => {
                note.end_item(Some(e.status_and_code().1));
                ItemResult::Err(e.body())
            }
        });
    }
    Ok(BatchResponse { results })
}

/// Encrypt many items in one call.
#[utoipa::path(post, path = "/v1/encrypt/batch", tag = "lifecycle", params(MasterKeyParam),
    request_body = BatchRequest,
    responses(
        (status = 200, description = "One result per item: encrypt's output or an error", body = BatchResponse<EncryptResponse>),
        (status = 403, description = "`insufficient_scope` or `certificate_mismatch`", body = ErrorBody),
        BatchRefusals,
    ))]
pub(super) async fn encrypt_batch(
    State(state): State<AppState>,
    auth: Auth<EncryptScope>,
    Extension(limits): Extension<BatchLimits>,
    note: AuditNote,
    client_key: MasterKeyHeader,
    ApiJson(req): ApiJson<BatchRequest>,
) -> Result<Json<BatchResponse<EncryptResponse>>, ApiError> {
    let call = Call::new(&state, &auth, &note, &client_key);
    run(req, limits, &note, |item| call.encrypt(item))
        .await
        .map(Json)
}

/// Decrypt many items in one call.
#[utoipa::path(post, path = "/v1/decrypt/batch", tag = "lifecycle", params(MasterKeyParam),
    request_body = BatchRequest,
    responses(
        (status = 200, description = "One result per item: decrypt's output or an error", body = BatchResponse<DecryptResponse>),
        (status = 403, description = "`insufficient_scope` or `certificate_mismatch`", body = ErrorBody),
        BatchRefusals,
    ))]
pub(super) async fn decrypt_batch(
    State(state): State<AppState>,
    auth: Auth<DecryptScope>,
    Extension(limits): Extension<BatchLimits>,
    note: AuditNote,
    client_key: MasterKeyHeader,
    ApiJson(req): ApiJson<BatchRequest>,
) -> Result<Response, ApiError> {
    let call = Call::new(&state, &auth, &note, &client_key);
    let out = run(req, limits, &note, |item| call.decrypt(item)).await?;
    // The plaintexts plus room for the field names and a few escapes.
    let data: usize = out.results.iter().map(ItemResult::len_hint).sum();
    Ok(SecretBody::json(&out, data + data / 16 + 16).into_response())
}

/// Re-encrypt many ciphertexts under the active version in one call.
#[utoipa::path(post, path = "/v1/rewrap/batch", tag = "lifecycle", params(MasterKeyParam),
    request_body = BatchRequest,
    responses(
        (status = 200, description = "One result per item: encrypt's output or an error", body = BatchResponse<EncryptResponse>),
        (status = 403, description = "`insufficient_scope` (needs `rotate`) or `certificate_mismatch`", body = ErrorBody),
        BatchRefusals,
    ))]
pub(super) async fn rewrap_batch(
    State(state): State<AppState>,
    auth: Auth<RotateScope>,
    Extension(limits): Extension<BatchLimits>,
    note: AuditNote,
    client_key: MasterKeyHeader,
    ApiJson(req): ApiJson<BatchRequest>,
) -> Result<Json<BatchResponse<EncryptResponse>>, ApiError> {
    let call = Call::new(&state, &auth, &note, &client_key);
    run(req, limits, &note, |item| call.rewrap(item))
        .await
        .map(Json)
}
