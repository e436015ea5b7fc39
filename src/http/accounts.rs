//! Tenants and API keys over the API, so that an operator never needs a shell
//! next to the database:
//!
//! - operator routes (operator key with `operator`): create, list and disable
//!   tenants; create, list and revoke any tenant's API keys;
//! - tenant routes (tenant key with `admin`): create keys in the caller's own
//!   tenant with at most the caller's scopes (and the caller's certificate
//!   binding), list them, revoke them.
//!
//! A secret is in the answer that creates it and nowhere else; listings never
//! carry a secret or its digest. Operator keys themselves are made only with
//! the CLI (`keyward operator-key create`), next to the database: a leaked
//! operator key cannot mint more of its kind.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::audit_note::AuditNote;
use super::error::{ApiError, ErrorBody};
use super::extract::{parse_id, AdminScope, ApiJson, Auth, OperatorScope};
use super::query::{self, ApiQuery};
use super::state::AppState;
use base64::Engine;

use crate::domain::accounts::{AccountError, ApiKeyCursor, ApiKeyInfo};
use crate::domain::apikeys::{looks_like_key_id, IssuedCredential, Scopes};
use crate::domain::time::rfc3339;
use crate::domain::TenantId;

/// `POST /v1/tenants` input.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTenantRequest {
    /// A unique name, 1 to 100 printable characters (no control characters),
    /// not only whitespace (it is trimmed).
    #[schema(
        min_length = 1,
        max_length = 100,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    name: String,
}

/// A tenant.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantView {
    /// Its id.
    #[schema(format = Uuid)]
    tenant_id: String,
    /// Its unique name.
    name: String,
    /// When it was created (RFC 3339).
    #[schema(format = DateTime)]
    created_at: String,
    /// When it was disabled (RFC 3339); `null` while enabled.
    #[schema(format = DateTime)]
    disabled_at: Option<String>,
}

/// A page of tenants, oldest first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantList {
    /// This page.
    items: Vec<TenantView>,
    /// Pass as `cursor` for the next page; `null` on the last page.
    #[schema(format = Uuid)]
    next_cursor: Option<String>,
}

/// Paging of `GET /v1/tenants`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct TenantParams {
    /// Page size, 1 to 1000 (default 100).
    #[serde(default, deserialize_with = "query::page_limit")]
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// The `nextCursor` of the previous page.
    #[serde(default, deserialize_with = "query::uuid_text")]
    #[param(format = Uuid)]
    cursor: Option<String>,
}

/// Paging of the API key listings.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct ApiKeyParams {
    /// Page size, 1 to 1000 (default 100).
    #[serde(default, deserialize_with = "query::page_limit")]
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// The `nextCursor` of the previous page.
    #[serde(default, deserialize_with = "key_cursor")]
    #[param(value_type = Option<String>)]
    cursor: Option<ApiKeyCursor>,
}

const CURSOR_B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// An API key listing's cursor: the last listed key's creation time and id,
/// so the next page starts right after it (keyset pagination).
fn encode_key_cursor(c: &ApiKeyCursor) -> String {
    CURSOR_B64.encode(format!("{}:{}", c.created_at, c.key_id))
}

fn decode_key_cursor(text: &str) -> Option<ApiKeyCursor> {
    let text = String::from_utf8(CURSOR_B64.decode(text).ok()?).ok()?;
    let (ms, id) = text.split_once(':')?;
    if !looks_like_key_id(id) {
        return None;
    }
    Some(ApiKeyCursor {
        created_at: ms.parse().ok()?,
        key_id: id.to_string(),
    })
}

fn key_cursor<'de, D>(deserializer: D) -> Result<Option<ApiKeyCursor>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    query::value(deserializer, decode_key_cursor, query::NOT_A_CURSOR)
}

/// One page of a tenant's keys, oldest first: `limit` of them (default
/// [`query::DEFAULT_PAGE`]) after `cursor`, and the cursor of the next page
/// if there is one (one more key is read to know).
async fn key_page(
    state: &AppState,
    tenant: TenantId,
    params: ApiKeyParams,
) -> Result<ApiKeyList, ApiError> {
    let limit = params.limit.unwrap_or(query::DEFAULT_PAGE) as usize;
    let mut keys = state
        .service
        .api_keys(tenant, params.cursor.as_ref(), limit as i64 + 1)
        .await?;
    let next_cursor = if keys.len() > limit {
        keys.truncate(limit);
        keys.last()
            .map(|k| encode_key_cursor(&ApiKeyCursor::after(k)))
    } else {
        None
    };
    Ok(ApiKeyList {
        items: keys.iter().map(key_view).collect(),
        next_cursor,
    })
}

/// A tenant key's scope.
#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
pub enum TenantScopeSchema {
    /// `POST /v1/encrypt` and its batch.
    Encrypt,
    /// `POST /v1/decrypt` and its batch.
    Decrypt,
    /// `POST /v1/rotate`, rewrap.
    Rotate,
    /// Encryptions and jobs.
    Manage,
    /// Its own tenant's API keys and audit records.
    Admin,
    /// Blind-index values (`POST /v1/index`, `indexes` on encrypt); grants
    /// no `decrypt`.
    Index,
    /// Import key material as a new version (bring your own key).
    Import,
    /// Export an exportable encryption's key, wrapped to a caller's public key.
    Export,
}

/// Input of the routes that create an API key.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateApiKeyRequest {
    /// Its scopes, some of `encrypt`, `decrypt`, `rotate`, `manage`, `admin`,
    /// `index`, `import`, `export`.
    /// A tenant key creating a key may give only scopes it holds itself.
    #[schema(value_type = Vec<TenantScopeSchema>, min_items = 1, max_items = 8)]
    scopes: Vec<String>,
    /// Bind the key to the client certificate whose SubjectPublicKeyInfo has
    /// this SHA-256 (64 hex digits): it then works only on mutual-TLS
    /// connections that present that public key. A key created by a bound key
    /// is always bound to the same certificate.
    #[serde(default)]
    #[schema(pattern = "^[0-9a-fA-F]{64}$")]
    certificate_spki_sha256: Option<String>,
}

/// A new API key: its secret is shown here once and never again.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedApiKey {
    /// The key id, sent as `X-Api-Key`.
    api_key: String,
    /// The secret, sent as `X-Api-Secret`. Not stored: lost if not kept now.
    api_secret: String,
    /// The key's tenant.
    #[schema(format = Uuid)]
    tenant_id: String,
    /// Its scopes.
    scopes: Vec<String>,
    /// The SPKI SHA-256 of the certificate it is bound to, if any.
    certificate_spki_sha256: Option<String>,
}

/// An API key as listed: never its secret nor the secret's digest.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyView {
    /// The key id.
    api_key: String,
    /// Its tenant.
    #[schema(format = Uuid)]
    tenant_id: Option<String>,
    /// Its scopes.
    scopes: Vec<String>,
    /// The SPKI SHA-256 of the certificate it is bound to, if any.
    certificate_spki_sha256: Option<String>,
    /// When it was created (RFC 3339).
    #[schema(format = DateTime)]
    created_at: String,
    /// When it was revoked (RFC 3339); `null` while it works.
    #[schema(format = DateTime)]
    revoked_at: Option<String>,
}

/// A page of API keys, oldest first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyList {
    /// This page.
    items: Vec<ApiKeyView>,
    /// Pass as `cursor` for the next page; `null` on the last page. Follow it
    /// to the end: a key may be on any page.
    next_cursor: Option<String>,
}

fn tenant_view(t: &crate::domain::accounts::TenantInfo) -> TenantView {
    TenantView {
        tenant_id: t.id.to_string(),
        name: t.name.clone(),
        created_at: rfc3339(t.created_at),
        disabled_at: t.disabled_at.map(rfc3339),
    }
}

fn key_view(k: &ApiKeyInfo) -> ApiKeyView {
    ApiKeyView {
        api_key: k.key_id.clone(),
        tenant_id: k.tenant_id.map(|t| t.to_string()),
        scopes: k.scopes.names().into_iter().map(String::from).collect(),
        certificate_spki_sha256: k.cert_spki_sha256.map(|d| crate::crypto::hex(&d)),
        created_at: rfc3339(k.created_at),
        revoked_at: k.revoked_at.map(rfc3339),
    }
}

fn created(
    tenant: TenantId,
    scopes: Scopes,
    binding: Option<[u8; 32]>,
    credential: &IssuedCredential,
) -> (StatusCode, Json<CreatedApiKey>) {
    (
        StatusCode::CREATED,
        Json(CreatedApiKey {
            api_key: credential.key_id.clone(),
            api_secret: credential.secret.as_str().to_string(),
            tenant_id: tenant.to_string(),
            scopes: scopes.names().into_iter().map(String::from).collect(),
            certificate_spki_sha256: binding.map(|d| crate::crypto::hex(&d)),
        }),
    )
}

/// The scopes and binding of a key-creation request.
fn parse_key_request(req: &CreateApiKeyRequest) -> Result<(Scopes, Option<[u8; 32]>), ApiError> {
    if req.scopes.len() > 8 {
        return Err(ApiError::InvalidRequest(
            "`scopes`: at most 8 entries".into(),
        ));
    }
    let scopes = Scopes::parse_words(req.scopes.iter().map(String::as_str))
        // The message names the field, never the value sent.
        .map_err(|_| {
            ApiError::InvalidRequest(
                "`scopes`: expected one to eight of encrypt, decrypt, rotate, manage, admin, index, import, export".into(),
            )
        })?;
    let binding = req
        .certificate_spki_sha256
        .as_deref()
        .map(|hex| {
            let bytes = (hex.len() == 64)
                .then(|| {
                    (0..32)
                        .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
                        .collect::<Option<Vec<u8>>>()
                })
                .flatten()
                .and_then(|v| <[u8; 32]>::try_from(v).ok());
            bytes.ok_or_else(|| {
                ApiError::InvalidRequest("`certificateSpkiSha256`: expected 64 hex digits".into())
            })
        })
        .transpose()?;
    Ok((scopes, binding))
}

/// A key id from the path; anything not shaped like one is simply not found.
fn key_id(value: &str) -> Result<&str, ApiError> {
    if looks_like_key_id(value) {
        Ok(value)
    } else {
        Err(AccountError::ApiKeyNotFound.into())
    }
}

/// Create a tenant (operator). It has no API key yet: create one with
/// `POST /v1/tenants/{tenantId}/api-keys`.
#[utoipa::path(post, path = "/v1/tenants", tag = "operator",
    request_body = CreateTenantRequest,
    responses(
        (status = 201, description = "The tenant", body = TenantView),
        (status = 400, description = "`invalid_request` (the name)", body = ErrorBody),
        (status = 409, description = "`tenant_exists`", body = ErrorBody),
    ))]
pub(super) async fn create_tenant(
    State(state): State<AppState>,
    _auth: Auth<OperatorScope>,
    note: AuditNote,
    ApiJson(req): ApiJson<CreateTenantRequest>,
) -> Result<(StatusCode, Json<TenantView>), ApiError> {
    let tenant = state.service.register_tenant(&req.name).await?;
    note.tenant(tenant.id);
    Ok((StatusCode::CREATED, Json(tenant_view(&tenant))))
}

/// The tenants, oldest first, paginated (operator).
#[utoipa::path(get, path = "/v1/tenants", tag = "operator",
    params(TenantParams),
    responses(
        (status = 200, description = "A page of tenants", body = TenantList),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
    ))]
pub(super) async fn list_tenants(
    State(state): State<AppState>,
    _auth: Auth<OperatorScope>,
    ApiQuery(params): ApiQuery<TenantParams>,
) -> Result<Json<TenantList>, ApiError> {
    let after = params
        .cursor
        .as_deref()
        .map(|c| parse_id::<TenantId>(c, "cursor"))
        .transpose()?;
    let limit = params.limit.unwrap_or(query::DEFAULT_PAGE) as usize;
    // One more than the page, to know whether another follows.
    let mut tenants = state.service.tenants(after, limit as i64 + 1).await?;
    let next_cursor = if tenants.len() > limit {
        tenants.truncate(limit);
        tenants.last().map(|t| t.id.to_string())
    } else {
        None
    };
    Ok(Json(TenantList {
        next_cursor,
        items: tenants.iter().map(tenant_view).collect(),
    }))
}

/// Disable a tenant (operator): its API keys stop working on every replica
/// within one sync interval; its encryptions and records stay.
#[utoipa::path(post, path = "/v1/tenants/{tenantId}/disable", tag = "operator",
    params(("tenantId" = String, Path, format = Uuid, description = "The tenant id")),
    responses(
        (status = 200, description = "The tenant, disabled", body = TenantView),
        (status = 400, description = "`invalid_request` (the id is not a UUID)", body = ErrorBody),
        (status = 404, description = "`tenant_not_found`", body = ErrorBody),
    ))]
pub(super) async fn disable_tenant(
    State(state): State<AppState>,
    _auth: Auth<OperatorScope>,
    Path(tenant): Path<String>,
) -> Result<Json<TenantView>, ApiError> {
    let tenant = parse_id(&tenant, "tenant id in the path")?;
    let tenant = state.service.disable_tenant(tenant).await?;
    tracing::info!(tenant_id = %tenant.id, "tenant disabled");
    Ok(Json(tenant_view(&tenant)))
}

/// A tenant's API keys, revoked or not, oldest first, paginated (operator).
#[utoipa::path(get, path = "/v1/tenants/{tenantId}/api-keys", tag = "operator",
    params(("tenantId" = String, Path, format = Uuid, description = "The tenant id"), ApiKeyParams),
    responses(
        (status = 200, description = "A page of keys, without secrets", body = ApiKeyList),
        (status = 400, description = "`invalid_request` (the id is not a UUID, or a bad `limit` or `cursor`)", body = ErrorBody),
        (status = 404, description = "`tenant_not_found`", body = ErrorBody),
    ))]
pub(super) async fn list_tenant_keys(
    State(state): State<AppState>,
    _auth: Auth<OperatorScope>,
    Path(tenant): Path<String>,
    ApiQuery(params): ApiQuery<ApiKeyParams>,
) -> Result<Json<ApiKeyList>, ApiError> {
    let tenant = parse_id(&tenant, "tenant id in the path")?;
    state.service.tenant(tenant).await?;
    Ok(Json(key_page(&state, tenant, params).await?))
}

/// Create an API key for a tenant (operator), with any tenant scopes.
#[utoipa::path(post, path = "/v1/tenants/{tenantId}/api-keys", tag = "operator",
    params(("tenantId" = String, Path, format = Uuid, description = "The tenant id")),
    request_body = CreateApiKeyRequest,
    responses(
        (status = 201, description = "The key and its secret (shown once)", body = CreatedApiKey),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 404, description = "`tenant_not_found`", body = ErrorBody),
        (status = 409, description = "`tenant_disabled`, or `api_key_limit_reached` (the tenant has `max_api_keys_per_tenant` live keys)", body = ErrorBody),
        (status = 422, description = "`invalid_scopes` (an operator scope)", body = ErrorBody),
    ))]
pub(super) async fn create_tenant_key(
    State(state): State<AppState>,
    _auth: Auth<OperatorScope>,
    note: AuditNote,
    Path(tenant): Path<String>,
    ApiJson(req): ApiJson<CreateApiKeyRequest>,
) -> Result<(StatusCode, Json<CreatedApiKey>), ApiError> {
    let tenant = parse_id(&tenant, "tenant id in the path")?;
    let (scopes, binding) = parse_key_request(&req)?;
    let credential = state
        .service
        .create_tenant_key(tenant, scopes, binding)
        .await?;
    note.api_key(&credential.key_id, Some(&scopes));
    tracing::info!(tenant_id = %tenant, api_key = %credential.key_id, "API key created");
    Ok(created(tenant, scopes, binding, &credential))
}

/// Revoke one of a tenant's API keys (operator). It stops working on every
/// replica within one sync interval.
#[utoipa::path(post, path = "/v1/tenants/{tenantId}/api-keys/{keyId}/revoke", tag = "operator",
    params(
        ("tenantId" = String, Path, format = Uuid, description = "The tenant id"),
        ("keyId" = String, Path, description = "The API key id (kw_...)"),
    ),
    responses(
        (status = 204, description = "Revoked"),
        (status = 400, description = "`invalid_request` (the tenant id is not a UUID)", body = ErrorBody),
        (status = 404, description = "`api_key_not_found` (also: another tenant's key, or already revoked)", body = ErrorBody),
    ))]
pub(super) async fn revoke_tenant_key(
    State(state): State<AppState>,
    _auth: Auth<OperatorScope>,
    Path((tenant, key)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let tenant = parse_id(&tenant, "tenant id in the path")?;
    let key = key_id(&key)?;
    state.service.revoke_tenant_key(tenant, key).await?;
    tracing::info!(tenant_id = %tenant, api_key = %key, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// The caller's own tenant's API keys, revoked or not, oldest first,
/// paginated (tenant `admin`).
#[utoipa::path(get, path = "/v1/api-keys", tag = "api-keys",
    params(ApiKeyParams),
    responses(
        (status = 200, description = "A page of keys, without secrets", body = ApiKeyList),
        (status = 400, description = "`invalid_request` (a bad `limit` or `cursor`)", body = ErrorBody),
    ))]
pub(super) async fn list_own_keys(
    State(state): State<AppState>,
    auth: Auth<AdminScope>,
    ApiQuery(params): ApiQuery<ApiKeyParams>,
) -> Result<Json<ApiKeyList>, ApiError> {
    Ok(Json(key_page(&state, auth.tenant, params).await?))
}

/// Create an API key in the caller's own tenant (tenant `admin`), with at most
/// the caller's own scopes; a certificate-bound caller's keys are bound to the
/// same certificate.
#[utoipa::path(post, path = "/v1/api-keys", tag = "api-keys",
    request_body = CreateApiKeyRequest,
    responses(
        (status = 201, description = "The key and its secret (shown once)", body = CreatedApiKey),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 403, description = "`scope_not_held` (a scope the caller lacks) or `certificate_binding_required`", body = ErrorBody),
        (status = 409, description = "`api_key_limit_reached` (the tenant has `max_api_keys_per_tenant` live keys: revoke one first)", body = ErrorBody),
        (status = 422, description = "`invalid_scopes` (an operator scope)", body = ErrorBody),
    ))]
pub(super) async fn create_own_key(
    State(state): State<AppState>,
    auth: Auth<AdminScope>,
    note: AuditNote,
    ApiJson(req): ApiJson<CreateApiKeyRequest>,
) -> Result<(StatusCode, Json<CreatedApiKey>), ApiError> {
    let (scopes, binding) = parse_key_request(&req)?;
    let credential = state
        .service
        .create_own_key(&auth.principal, auth.tenant, scopes, binding)
        .await?;
    note.api_key(&credential.key_id, Some(&scopes));
    // What the key was bound to: the caller's binding if it had one.
    let binding = binding.or(auth.principal.cert_spki_sha256);
    tracing::info!(api_key = %credential.key_id, "API key created");
    Ok(created(auth.tenant, scopes, binding, &credential))
}

/// Revoke an API key of the caller's own tenant (tenant `admin`); it may be the
/// caller's own key. Another tenant's key is not found.
#[utoipa::path(post, path = "/v1/api-keys/{keyId}/revoke", tag = "api-keys",
    params(("keyId" = String, Path, description = "The API key id (kw_...)")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 404, description = "`api_key_not_found` (also: another tenant's key, or already revoked)", body = ErrorBody),
    ))]
pub(super) async fn revoke_own_key(
    State(state): State<AppState>,
    auth: Auth<AdminScope>,
    Path(key): Path<String>,
) -> Result<StatusCode, ApiError> {
    let key = key_id(&key)?;
    state.service.revoke_tenant_key(auth.tenant, key).await?;
    tracing::info!(api_key = %key, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}
