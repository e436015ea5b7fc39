//! The one API error type. Every failure a handler can meet is a variant; one
//! exhaustive `match` gives each its status and stable code, so handlers just
//! use `?`. 5xx bodies are generic and their cause goes to the log. No message
//! ever contains a secret, a key or plaintext.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

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
    /// A job that cannot run (bad identifiers, unreachable source...).
    #[error("{0}")]
    InvalidJob(String),
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
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ErrorBody)]
pub struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

/// The error's stable code and a human message.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail<'a> {
    /// A stable snake_case code, e.g. `decryption_failed`.
    #[schema(example = "decryption_failed")]
    code: &'a str,
    /// What went wrong, for people. Never contains secrets or plaintext.
    message: &'a str,
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
            ApiError::InvalidMasterKeyHeader => (S::BAD_REQUEST, "invalid_master_key"),
            ApiError::RouteNotFound => (S::NOT_FOUND, "not_found"),
            ApiError::MethodNotAllowed => (S::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Panic => (S::INTERNAL_SERVER_ERROR, "internal"),
            ApiError::Timeout => (S::SERVICE_UNAVAILABLE, "timeout"),
            ApiError::Key(k) => match k {
                KeyError::EncryptionNotFound => (S::NOT_FOUND, "encryption_not_found"),
                KeyError::VersionNotFound => (S::NOT_FOUND, "version_not_found"),
                KeyError::DecryptionFailed => (S::BAD_REQUEST, "decryption_failed"),
                KeyError::VersionDisabled => (S::FORBIDDEN, "version_disabled"),
                KeyError::VersionDestroyed => (S::GONE, "version_destroyed"),
                KeyError::VersionNotEncryptable => {
                    (S::UNPROCESSABLE_ENTITY, "version_not_encryptable")
                }
                KeyError::MasterKeyRequired => (S::UNAUTHORIZED, "master_key_required"),
                KeyError::MasterKeyMismatch => (S::FORBIDDEN, "master_key_mismatch"),
                KeyError::MasterKeyNotApplicable => (S::BAD_REQUEST, "master_key_not_applicable"),
                k if k.is_unavailable() => (S::SERVICE_UNAVAILABLE, "unavailable"),
                KeyError::VersionBelowMinimum => (S::FORBIDDEN, "version_below_min_decryption"),
                KeyError::InvalidStateChange(_) => (S::CONFLICT, "invalid_state_change"),
                KeyError::InvalidPolicy(_) => (S::UNPROCESSABLE_ENTITY, "invalid_policy"),
                KeyError::VersionInUse(_) => (S::CONFLICT, "version_in_use"),
                KeyError::NotReady(_) => (S::SERVICE_UNAVAILABLE, "not_ready"),
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = match &self {
            ApiError::TooManyFailedAttempts(d) | ApiError::RateLimited(d) => {
                Some(retry_secs(*d).max(1))
            }
            _ => None,
        };
        let (status, code) = self.status_and_code();
        let message = if status.is_server_error() {
            tracing::error!(code, error = %self, "request failed");
            // A server error's own text may name internals (a database
            // error, a KMS answer): the client gets a fixed message, except
            // for a time-out, whose text says nothing more than its code.
            match self {
                ApiError::Timeout => self.to_string(),
                _ if status == StatusCode::SERVICE_UNAVAILABLE => {
                    "a dependency is unavailable; retry later".to_string()
                }
                _ => "internal error; see the server log".to_string(),
            }
        } else {
            tracing::debug!(code, status = status.as_u16(), "request refused");
            self.to_string()
        };
        let mut response = error_response(status, code, &message);
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The error code of an error response, for the audit layer.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

/// Builds the JSON error body `{"error": {"code", "message"}}`.
pub fn error_response(status: StatusCode, code: &'static str, message: &str) -> Response {
    let body = serde_json::to_vec(&ErrorBody {
        error: ErrorDetail { code, message },
    })
    .unwrap_or_default();
    let mut response = (status, body).into_response();
    response.extensions_mut().insert(ErrorCode(code));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("ApiKey realm=\"keyward\""),
        );
    }
    response
}
