//! The one API error type. Every failure a handler can meet is a variant; one
//! exhaustive `match` gives each its status and stable code, so handlers just
//! use `?`. 5xx bodies are generic and their cause goes to the log. No message
//! ever contains a secret, a key or plaintext.

use std::borrow::Cow;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::domain::accounts::AccountError;
use crate::domain::apikeys::Scope;
use crate::domain::service::{AuthError, KeyError};

/// Everything that can go wrong in a request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Neither `X-Api-Key` nor `X-Api-Secret` was sent.
    #[error("missing X-Api-Key and X-Api-Secret headers")]
    MissingCredentials,
    /// Unknown, revoked or wrong credentials, or malformed credential headers.
    #[error("invalid API key or secret")]
    InvalidCredentials,
    /// The API key is bound to a client certificate this connection did not present.
    #[error("this API key is bound to another client certificate")]
    CertificateMismatch,
    /// The API key lacks the scope the route needs.
    #[error("this API key lacks the `{}` scope", .0.as_str())]
    InsufficientScope(Scope),
    /// An operator key on a route that acts on a tenant's keys or data.
    #[error("operator keys act on the service, not on a tenant's keys or data; use a tenant key")]
    TenantKeyRequired,
    /// A tenant, tenant key or operator-key operation failed.
    #[error(transparent)]
    Account(#[from] crate::domain::accounts::AccountError),
    /// Too many failed authentications for this key or address.
    #[error("too many failed authentications; retry in {} s", retry_secs(*.0))]
    TooManyFailedAttempts(std::time::Duration),
    /// Over the API key's request rate.
    #[error("request rate limit exceeded; retry in {} s", retry_secs(*.0))]
    RateLimited(std::time::Duration),
    /// The body is not JSON.
    #[error("the request body is not valid JSON: {0}")]
    MalformedJson(String),
    /// A field is missing, of the wrong type, or invalid. The message names the
    /// field and the problem, never the value.
    #[error("{0}")]
    InvalidRequest(String),
    /// The body is not `application/json`.
    #[error("the request body must be application/json")]
    UnsupportedMediaType,
    /// No such job for this tenant.
    #[error("job not found")]
    JobNotFound,
    /// A job that cannot run (bad identifiers, client-mode encryption...).
    #[error("{0}")]
    InvalidJob(String),
    /// The job's source is unknown, not granted to the tenant, given as a URL,
    /// or unusable: one error for all, which tells nothing about which.
    #[error("{}", crate::domain::sources::SOURCE_UNAVAILABLE)]
    JobSourceUnavailable,
    /// A batch has more items than allowed.
    #[error("a batch may hold at most {0} items")]
    TooManyItems(usize),
    /// The body is over the limit.
    #[error("the request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// `X-Master-Key` is present but not base64 of 32 to 512 bytes.
    #[error("X-Master-Key must be base64 of 32 to 512 bytes")]
    InvalidMasterKeyHeader,
    /// No such route.
    #[error("no such endpoint")]
    RouteNotFound,
    /// The route exists but not with this method.
    #[error("method not allowed for this endpoint")]
    MethodNotAllowed,
    /// A key operation failed.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A handler panicked (caught; the process keeps serving).
    #[error("internal error")]
    Panic,
    /// The request took longer than the time limit.
    #[error("the request timed out")]
    Timeout,
    /// Batch and large requests already hold the memory set aside for them
    /// (`max_concurrent_body_bytes`).
    #[error("too many large requests are in progress; retry after Retry-After seconds")]
    Busy,
    /// A streaming decrypt's body does not start with a Keyward stream
    /// (version 1) header.
    #[error("the body is not a Keyward stream (version 1)")]
    InvalidStream,
    /// A streaming request's client sent nothing for `stream_read_timeout`
    /// before its response started.
    #[error("the client sent nothing for the stream read timeout")]
    StreamTimeout,
    /// An error response some extractor or layer wrote as text, with its status.
    #[error("{}", rejected_message(*.0))]
    Rejected(StatusCode),
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::InvalidCredentials => ApiError::InvalidCredentials,
            AuthError::Store(s) => ApiError::Key(KeyError::Store(s)),
        }
    }
}

/// Every error response: `{"error": {"code", "message"}}`.
// Also every failed batch item's result; made by `ApiError::body` only (the
// doc comment above is the OpenAPI description).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

/// The error's stable code and a human message.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable snake_case code, e.g. `decryption_failed`.
    #[schema(example = "decryption_failed")]
    code: &'static str,
    /// What went wrong, for people. Never contains secrets or plaintext.
    #[schema(value_type = String)]
    message: Cow<'static, str>,
}

impl ApiError {
    /// The status and stable code of this error.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        use StatusCode as S;
        match self {
            ApiError::MissingCredentials => (S::UNAUTHORIZED, "missing_credentials"),
            ApiError::InvalidCredentials => (S::UNAUTHORIZED, "invalid_credentials"),
            ApiError::CertificateMismatch => (S::FORBIDDEN, "certificate_mismatch"),
            ApiError::InsufficientScope(_) => (S::FORBIDDEN, "insufficient_scope"),
            ApiError::TenantKeyRequired => (S::FORBIDDEN, "tenant_key_required"),
            ApiError::Account(a) => match a {
                AccountError::TenantNotFound(_) => (S::NOT_FOUND, "tenant_not_found"),
                AccountError::TenantExists(_) => (S::CONFLICT, "tenant_exists"),
                AccountError::TenantDisabled(_) => (S::CONFLICT, "tenant_disabled"),
                AccountError::InvalidName => (S::BAD_REQUEST, "invalid_request"),
                AccountError::WrongKindOfScope(_) => (S::UNPROCESSABLE_ENTITY, "invalid_scopes"),
                AccountError::ScopeNotHeld(_) => (S::FORBIDDEN, "scope_not_held"),
                AccountError::CertificateBindingRequired => {
                    (S::FORBIDDEN, "certificate_binding_required")
                }
                AccountError::ApiKeyNotFound => (S::NOT_FOUND, "api_key_not_found"),
                AccountError::ApiKeyLimitReached(_) => (S::CONFLICT, "api_key_limit_reached"),
                a if a.is_unavailable() => (S::SERVICE_UNAVAILABLE, "unavailable"),
                AccountError::Store(_) => (S::INTERNAL_SERVER_ERROR, "internal"),
            },
            ApiError::TooManyFailedAttempts(_) => {
                (S::TOO_MANY_REQUESTS, "too_many_failed_attempts")
            }
            ApiError::RateLimited(_) => (S::TOO_MANY_REQUESTS, "rate_limited"),
            ApiError::MalformedJson(_) => (S::BAD_REQUEST, "malformed_json"),
            ApiError::InvalidRequest(_) => (S::BAD_REQUEST, "invalid_request"),
            ApiError::UnsupportedMediaType => (S::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            ApiError::PayloadTooLarge(_) => (S::PAYLOAD_TOO_LARGE, "payload_too_large"),
            ApiError::TooManyItems(_) => (S::PAYLOAD_TOO_LARGE, "too_many_items"),
            ApiError::JobNotFound => (S::NOT_FOUND, "job_not_found"),
            ApiError::InvalidJob(_) => (S::UNPROCESSABLE_ENTITY, "invalid_job"),
            ApiError::JobSourceUnavailable => (S::UNPROCESSABLE_ENTITY, "job_source_unavailable"),
            ApiError::InvalidMasterKeyHeader => (S::BAD_REQUEST, "invalid_master_key"),
            ApiError::RouteNotFound => (S::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (S::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Panic => (S::INTERNAL_SERVER_ERROR, "internal"),
            ApiError::Timeout => (S::SERVICE_UNAVAILABLE, "timeout"),
            ApiError::Busy => (S::SERVICE_UNAVAILABLE, "server_busy"),
            ApiError::InvalidStream => (S::BAD_REQUEST, "invalid_stream"),
            ApiError::StreamTimeout => (S::REQUEST_TIMEOUT, "request_timeout"),
            ApiError::Rejected(status) => (*status, rejected_code(*status)),
            ApiError::Key(k) => match k {
                KeyError::EncryptionNotFound => (S::NOT_FOUND, "encryption_not_found"),
                KeyError::VersionNotFound => (S::NOT_FOUND, "version_not_found"),
                KeyError::DecryptionFailed => (S::BAD_REQUEST, "decryption_failed"),
                KeyError::NotAsymmetric => (S::UNPROCESSABLE_ENTITY, "not_asymmetric"),
                KeyError::ImportFailed => (S::BAD_REQUEST, "import_failed"),
                KeyError::ImportNotSupported(_) => {
                    (S::UNPROCESSABLE_ENTITY, "import_not_supported")
                }
                KeyError::ExportNotAllowed => (S::FORBIDDEN, "export_not_allowed"),
                KeyError::VersionDisabled => (S::FORBIDDEN, "version_disabled"),
                KeyError::VersionDestroyed => (S::GONE, "version_destroyed"),
                KeyError::VersionNotEncryptable => {
                    (S::UNPROCESSABLE_ENTITY, "version_not_encryptable")
                }
                KeyError::MasterKeyRequired => (S::UNAUTHORIZED, "master_key_required"),
                KeyError::MasterKeyMismatch => (S::FORBIDDEN, "master_key_mismatch"),
                KeyError::MasterKeyNotApplicable => (S::BAD_REQUEST, "master_key_not_applicable"),
                KeyError::TooManyMasterKeyAttempts(_) => {
                    (S::TOO_MANY_REQUESTS, "too_many_master_key_attempts")
                }
                KeyError::VersionExhausted => (S::CONFLICT, "version_exhausted"),
                KeyError::RotationPending => (S::SERVICE_UNAVAILABLE, "rotation_pending"),
                k if k.is_unavailable() => (S::SERVICE_UNAVAILABLE, "unavailable"),
                KeyError::VersionBelowMinimum => (S::FORBIDDEN, "version_below_min_decryption"),
                KeyError::InvalidStateChange(_) => (S::CONFLICT, "invalid_state_change"),
                KeyError::IndexNotFound => (S::NOT_FOUND, "index_not_found"),
                KeyError::IndexExists => (S::CONFLICT, "index_exists"),
                KeyError::TooManyIndexes(_) => (S::CONFLICT, "too_many_indexes"),
                KeyError::InvalidIndexChange(_) => {
                    (S::UNPROCESSABLE_ENTITY, "invalid_index_change")
                }
                KeyError::IndexValueTooLong => (S::BAD_REQUEST, "index_value_too_long"),
                KeyError::TooManyIndexVersions(_) => (S::CONFLICT, "too_many_index_versions"),
                KeyError::VersionAnchorsIndex => (S::CONFLICT, "version_anchors_index"),
                KeyError::InvalidPolicy(_) => (S::UNPROCESSABLE_ENTITY, "invalid_policy"),
                KeyError::VersionInUse(_) => (S::CONFLICT, "version_in_use"),
                KeyError::DestroyNeedsDisabled => (S::CONFLICT, "version_not_disabled"),
                KeyError::VersionUnverified => (S::CONFLICT, "version_unverified"),
                KeyError::DestroyGracePending { .. } => (S::CONFLICT, "destroy_grace_pending"),
                KeyError::NotReady(_) => (S::SERVICE_UNAVAILABLE, "not_ready"),
                KeyError::RotationInProgress => (S::CONFLICT, "rotation_in_progress"),
                KeyError::MasterKeyChanged => (S::CONFLICT, "master_key_changed"),
                KeyError::Provider(_) => (S::SERVICE_UNAVAILABLE, "unavailable"),
                KeyError::Store(_) | KeyError::Integrity(_) | KeyError::UnknownKek(_) => {
                    (S::INTERNAL_SERVER_ERROR, "internal")
                }
            },
        }
    }
}

/// Whole seconds to wait, at least one.
fn retry_secs(d: std::time::Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl From<crate::domain::guard::Refusal> for ApiError {
    fn from(r: crate::domain::guard::Refusal) -> Self {
        match r {
            crate::domain::guard::Refusal::LockedOut(d) => ApiError::TooManyFailedAttempts(d),
            crate::domain::guard::Refusal::RateLimited(d) => ApiError::RateLimited(d),
        }
    }
}

impl ApiError {
    /// The body of this error's response, or of a batch item that failed with
    /// it: the stable code and a message for people. A server error's own text
    /// may name internals (a database error, a KMS answer): it goes to the
    /// log, and the body gets a fixed message (a time-out's text says nothing
    /// more than its code, so it stays).
    pub fn body(&self) -> ErrorBody {
        let (status, code) = self.status_and_code();
        self.body_with(status, code)
    }

    fn body_with(&self, status: StatusCode, code: &'static str) -> ErrorBody {
        let message = if status.is_server_error() {
            tracing::error!(code, error = %self, "request failed");
            match self {
                ApiError::Timeout | ApiError::Busy | ApiError::Key(KeyError::RotationPending) => {
                    Cow::Owned(self.to_string())
                }
                ApiError::Rejected(_) => Cow::Borrowed(INTERNAL),
                _ if status == StatusCode::SERVICE_UNAVAILABLE => {
                    Cow::Borrowed("a dependency is unavailable; retry later")
                }
                _ => Cow::Borrowed(INTERNAL),
            }
        } else {
            Cow::Owned(self.to_string())
        };
        ErrorBody {
            error: ErrorDetail { code, message },
        }
    }
}

/// The Retry-After of a 503 that names no wait of its own.
pub const UNAVAILABLE_RETRY_SECS: u64 = 1;

/// The message of every server error that does not say more.
const INTERNAL: &str = "internal error; see the server log";

/// The code of a text error response with `status`.
fn rejected_code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        s if s.is_server_error() => "internal",
        _ => "invalid_request",
    }
}

/// The message of a text error response with `status` (a server error's is
/// replaced by [`INTERNAL`]).
fn rejected_message(status: StatusCode) -> &'static str {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => "the request body is too large",
        _ => "the request was refused",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if !status.is_server_error() {
            tracing::debug!(code, status = status.as_u16(), "request refused");
        }
        let body = serde_json::to_vec(&self.body_with(status, code)).unwrap_or_default();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("ApiKey realm=\"keyward\""),
            );
        }
        let retry = match &self {
            ApiError::TooManyFailedAttempts(d)
            | ApiError::RateLimited(d)
            | ApiError::Key(KeyError::TooManyMasterKeyAttempts(d)) => Some(retry_secs(*d)),
            ApiError::Key(KeyError::RotationPending) | ApiError::Busy => Some(1),
            // Every other 503 (a database busy, locked, full or restarting, a
            // master-key provider down, not ready, a request over its time):
            // a dependency that comes back on its own; a client that honours
            // Retry-After spreads its retries instead of hammering it.
            _ if status == StatusCode::SERVICE_UNAVAILABLE => Some(UNAVAILABLE_RETRY_SECS),
            _ => None,
        };
        if let Some(secs) = retry {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response.extensions_mut().insert(ErrorCode(code));
        response
    }
}

/// The error code of an error response, for the audit layer.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);
