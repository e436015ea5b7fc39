//! Auditing requests: the route layer gives every audited request an
//! [`AuditNote`] that the auth extractor fills with the caller and the
//! handlers with what they acted on
//! (encryption, version, job; one target per batch item). When the response is
//! ready, the note becomes an [`AuditEvent`] handed to the writer without
//! waiting for it. A request that is dropped before it answers (time limit,
//! client gone) is recorded as `cancelled`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, FromRequestParts, RawPathParams};
use axum::http::request::Parts;

use super::error::ErrorCode;
use super::state::AppState;
use crate::audit::{Actor, AuditEvent, AuditLog, Target};
use crate::domain::apikeys::{looks_like_key_id, Scopes};
use crate::domain::client_addr::ClientAddr;
use crate::domain::guard::AuthGuard;
use crate::domain::identity::ClientIdentity;
use crate::domain::service::Principal;
use crate::domain::time::now_ms;
use crate::domain::{EncryptionId, TenantId, VersionId};

#[derive(Default)]
struct NoteFields {
    actor: Actor,
    tenant: Option<TenantId>,
    targets: Vec<Target>,
}

/// What a request did, filled in as it runs. Handlers take it as an extractor.
#[derive(Clone, Default)]
pub struct AuditNote(Arc<Mutex<NoteFields>>);

impl AuditNote {
    fn with<R>(&self, f: impl FnOnce(&mut NoteFields) -> R) -> R {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// The authenticated caller.
    pub fn caller(&self, principal: &Principal) {
        self.with(|n| n.actor = Actor::ApiKey(principal.clone()));
    }

    /// The tenant an operator acted on.
    pub fn tenant(&self, id: TenantId) {
        self.with(|n| n.tenant = Some(id));
    }

    /// A key id whose authentication failed.
    pub fn refused(&self, key_id: &str) {
        self.with(|n| n.actor = Actor::Refused(key_id.to_string()));
    }

    /// The encryption acted on (the open batch item's, or the request's).
    pub fn encryption(&self, id: EncryptionId) {
        self.with(|n| match n.targets.last_mut() {
            Some(t) if t.item_outcome.is_none() && t.encryption_id.is_none() => {
                t.encryption_id = Some(id)
            }
            _ => n.targets.push(Target {
                encryption_id: Some(id),
                ..Target::default()
            }),
        });
    }

    /// The version used or made, for the current target.
    pub fn version(&self, id: VersionId) {
        self.with(|n| match n.targets.last_mut() {
            Some(t) => t.version_id = Some(id),
            None => n.targets.push(Target {
                version_id: Some(id),
                ..Target::default()
            }),
        });
    }

    /// The job acted on.
    pub fn job(&self, id: String) {
        self.with(|n| match n.targets.last_mut() {
            Some(t) if t.job_id.is_none() => t.job_id = Some(id),
            _ => n.targets.push(Target {
                job_id: Some(id),
                ..Target::default()
            }),
        });
    }

    /// The API key acted on: made (with the `scopes` granted) or revoked.
    /// Only an id, never a secret or digest.
    pub fn api_key(&self, key_id: &str, scopes: Option<&Scopes>) {
        self.with(|n| {
            let reusable = n
                .targets
                .last()
                .is_some_and(|t| t.api_key_id.is_none() && t.batch_index.is_none());
            if !reusable {
                n.targets.push(Target::default());
            }
            let Some(target) = n.targets.last_mut() else {
                return;
            };
            target.api_key_id = Some(key_id.to_string());
            if let Some(scopes) = scopes {
                target.scopes = Some(scopes.to_string());
            }
        });
    }

    /// Starts batch item `index`.
    pub fn begin_item(&self, index: usize) {
        self.with(|n| {
            n.targets.push(Target {
                batch_index: Some(index as u32),
                ..Target::default()
            })
        });
    }

    /// Ends the open batch item with its error code, if it failed.
    pub fn end_item(&self, error: Option<&'static str>) {
        self.with(|n| {
            if let Some(t) = n.targets.last_mut() {
                t.item_outcome = Some(error);
            }
        });
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AuditNote {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // Outside the audit layer (never, for audited routes), a detached note.
        Ok(parts
            .extensions
            .get::<AuditNote>()
            .cloned()
            .unwrap_or_default())
    }
}

/// An audited request in flight: its event is sent when it answers, or as
/// `cancelled` if it is dropped first (the client went away).
pub(super) struct Pending {
    log: AuditLog,
    note: AuditNote,
    event: Option<AuditEvent>,
    /// Samples the records of refused requests per client address.
    guard: Arc<AuthGuard>,
}

impl Pending {
    /// The event to record, if any: a request refused for its credentials
    /// (no authenticated caller) is recorded in full only within its
    /// address's share (see [`AuthGuard::audit_refused`]), otherwise counted.
    fn finish(&mut self, status: Option<u16>, error: Option<&'static str>) -> Option<AuditEvent> {
        let mut event = self.event.take()?;
        let fields = std::mem::take(&mut *self.note.0.lock().unwrap_or_else(|e| e.into_inner()));
        if !matches!(fields.actor, Actor::ApiKey(_)) && !self.guard.audit_refused(event.peer) {
            return None;
        }
        event.status = status;
        event.error = error;
        // The tenant an operator acted on goes into the record, so that
        // tenant's admin sees it; a path naming a tenant proves nothing for
        // anyone else (a refused or unauthenticated caller, a tenant key).
        event.tenant_id = match &fields.actor {
            Actor::ApiKey(p) if p.tenant_id.is_none() => fields.tenant,
            _ => None,
        };
        event.actor = fields.actor;
        event.targets = fields.targets;
        Some(event)
    }

    /// Hands the record of the request, answered with `status` (and the error
    /// code of an error response), to the writer.
    pub(super) async fn answered(mut self, status: u16, error: Option<ErrorCode>) {
        if let Some(event) = self.finish(Some(status), error.map(|c| c.0)) {
            self.log.record(event).await;
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(event) = self.finish(None, Some("cancelled")) {
            self.log.record_now(event);
        }
    }
}

/// Starts the audit record of request `request_id` to `route`, which performs
/// `operation`: puts the [`AuditNote`] the handlers fill in the request's
/// extensions, with the targets its path names.
pub(super) async fn begin(
    state: &AppState,
    parts: &mut Parts,
    request_id: Option<String>,
    operation: &'static str,
    route: &str,
) -> Pending {
    let note = AuditNote::default();
    if route.contains('{') {
        if let Ok(params) = RawPathParams::from_request_parts(parts, state).await {
            for (name, value) in &params {
                match name {
                    "id" if operation.starts_with("job.") => {
                        // Only a well-formed id: never attacker-chosen text.
                        if let Ok(id) = value.parse::<uuid::Uuid>() {
                            note.job(id.to_string());
                        }
                    }
                    "id" => {
                        if let Ok(id) = value.parse() {
                            note.encryption(id);
                        }
                    }
                    "tenantId" => {
                        if let Ok(id) = value.parse() {
                            note.tenant(id);
                        }
                    }
                    // Only a well-formed key id: never attacker-chosen text.
                    "keyId" if looks_like_key_id(value) => note.api_key(value, None),
                    "versionId" => {
                        if let Ok(id) = value.parse() {
                            note.version(id);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    parts.extensions.insert(note.clone());
    let event = AuditEvent {
        time_ms: now_ms(),
        operation,
        // At most 128 visible ASCII characters: the edge replaced any other.
        request_id,
        client: parts.extensions.get::<Arc<ClientIdentity>>().cloned(),
        // The client's address: the peer's, or behind a trusted proxy the
        // forwarded one.
        peer: parts
            .extensions
            .get::<ClientAddr>()
            .map(|c| c.0)
            .or_else(|| {
                parts
                    .extensions
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|c| c.0.ip())
            }),
        ..AuditEvent::default()
    };
    Pending {
        log: state.audit.clone(),
        note,
        event: Some(event),
        guard: state.guard.clone(),
    }
}
