//! What handlers, extractors and the router share: the state every request
//! can reach, and the settings the router is built with.

use std::sync::Arc;
use std::time::Duration;

use crate::domain::service::KeyService;

/// What every handler can reach. Cloned for every request (axum's `State`), so
/// it is one shared pointer: one atomic increment per clone, not one per field.
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl AppState {
    /// Shares `parts` between every request.
    pub fn new(parts: AppParts) -> AppState {
        AppState(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct AppParts {
    /// Every operation.
    pub service: Arc<KeyService>,
    /// Rate limit and brute-force lockout.
    pub guard: Arc<crate::domain::guard::AuthGuard>,
    /// Where audit events go.
    pub audit: crate::audit::AuditLog,
    /// The ACME server certificate's state, for `/readyz` (empty without ACME).
    pub certificate: Arc<crate::domain::cert_status::CertStatus>,
}

/// Settings the router needs.
#[derive(Debug, Clone, Copy)]
pub struct RouterSettings {
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// Longest time one request may take.
    pub request_timeout: Duration,
    /// Batch limits.
    pub batch: BatchLimits,
    /// Most body bytes batch and large requests hold at once
    /// (`max_concurrent_body_bytes`).
    pub max_concurrent_body_bytes: usize,
    /// Limits of the streaming routes.
    pub stream: StreamLimits,
}

/// Limits of the streaming routes (`/v1/encrypt/stream`,
/// `/v1/decrypt/stream`), which have no body limit and no overall time limit.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// Most streams served at once (`stream_max_concurrent`).
    pub max_concurrent: usize,
    /// How long a client may send nothing (`stream_read_timeout`).
    pub read_timeout: Duration,
}

/// Limits of batch requests.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most items in one batch (413 beyond).
    pub max_items: usize,
    /// Largest batch body.
    pub max_body_bytes: usize,
}
