//! Auditing requests: the route layer gives every audited request an
//! [`AuditNote`] that the auth extractor fills with the caller and the
//! handlers with what they acted on
//! (encryption, version, job; one target per batch item). When the response is
//! ready, the note becomes an [`AuditEvent`] handed to the writer without
//! waiting for it. A request that is dropped before it answers (time limit,
//! client gone) is recorded as `cancelled`.

use std::cell::RefCell;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use axum::http::HeaderMap;

use super::error::ErrorCode;
use super::state::AppState;
use crate::audit::{Actor, AuditEvent, AuditLog, ItemGroup, RequestId, Target};
use crate::domain::apikeys::{looks_like_key_id, Scopes};
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
    /// The batch item running, until it ends and joins its group.
    item: Option<OpenItem>,
}

/// A batch item that has not ended yet.
struct OpenItem {
    index: u32,
    encryption: Option<EncryptionId>,
    version: Option<VersionId>,
}

impl NoteFields {
    /// Ends the open batch item: it joins the group of the items with its
    /// encryption, version and outcome (the last such group is usually the
    /// one: a batch mostly names one encryption), or starts one.
    fn end_item(&mut self, error: Option<&'static str>) {
        let Some(item) = self.item.take() else {
            return;
        };
        let found = self.targets.iter_mut().rev().find(|t| {
            t.items.as_ref().is_some_and(|g| g.error == error)
                && t.encryption_id == item.encryption
                && t.version_id == item.version
        });
        let target = match found {
            Some(t) => t,
            None => {
                self.targets.push(Target {
                    encryption_id: item.encryption,
                    version_id: item.version,
                    items: Some(ItemGroup {
                        error,
                        ..ItemGroup::default()
                    }),
                    ..Target::default()
                });
                let Some(t) = self.targets.last_mut() else {
                    return;
                };
                t
            }
        };
        if let Some(group) = &mut target.items {
            group.add(item.index);
        }
    }
}

tokio::task_local! {
    /// The facts of the request the task is answering, set by the edge for
    /// the time it answers (see [`RequestFacts::scope`]).
    static FACTS: RefCell<RequestFacts>;
}

/// What the edge learned about a request, with its body limit and the audit
/// note the route layer gives it. Not a request extension: the first
/// extension costs three allocations (the map's box, its table, the boxed
/// value) and each further one a box; these are in a task-local value that
/// lives inside the request's future (none). Extractors and the route
/// layer, which run in the task that answers the request, read it there.
#[derive(Default)]
pub(crate) struct RequestFacts {
    /// The client's address: the peer's, or behind a trusted proxy the
    /// forwarded one (what lockouts, rate limits and records use).
    pub(crate) client_addr: Option<IpAddr>,
    /// The request id: the client's `X-Request-Id` when acceptable (at most
    /// 128 visible ASCII characters), otherwise a new one.
    pub(crate) request_id: Option<RequestId>,
    /// The most body bytes read: the listener's, or the route's own (see
    /// [`super::extract::ApiJson`]); `None`: axum's default.
    pub(crate) body_limit: Option<usize>,
    /// The audit note of an audited route (see [`begin`]).
    pub(crate) note: Option<AuditNote>,
    /// What that note holds, unless it has its own (see [`AuditNote`]).
    fields: Option<NoteFields>,
    /// The request's header map, emptied once the body extractor (the last
    /// to read headers) has checked them: an answer may take it for its own
    /// headers rather than allocate a map (its room, not its content: every
    /// header was dropped).
    pub(crate) spare_headers: Option<HeaderMap>,
}

impl RequestFacts {
    /// The facts of a request from `client_addr` with id `request_id`,
    /// whose body may be `body_limit` bytes.
    pub(crate) fn new(
        client_addr: IpAddr,
        request_id: RequestId,
        body_limit: Option<usize>,
    ) -> RequestFacts {
        RequestFacts {
            client_addr: Some(client_addr),
            request_id: Some(request_id),
            body_limit,
            ..RequestFacts::default()
        }
    }

    /// `answer`, run with these as the facts of its request.
    pub(crate) fn scope<F: Future>(self, answer: F) -> impl Future<Output = F::Output> {
        FACTS.scope(RefCell::new(self), answer)
    }

    /// `f` of the current request's facts; `None` outside a request (never
    /// on the server: every request passes the edge).
    pub(crate) fn read<R>(f: impl FnOnce(&RequestFacts) -> R) -> Option<R> {
        FACTS
            .try_with(|facts| facts.try_borrow().ok().map(|facts| f(&facts)))
            .ok()
            .flatten()
    }

    /// `f` of the current request's facts, changing them.
    pub(crate) fn change<R>(f: impl FnOnce(&mut RequestFacts) -> R) -> Option<R> {
        FACTS
            .try_with(|facts| facts.try_borrow_mut().ok().map(|mut facts| f(&mut facts)))
            .ok()
            .flatten()
    }
}

/// What a request did, filled in as it runs. Handlers take it as an extractor.
///
/// Its fields are in the request's [`RequestFacts`] (no allocation of its
/// own) when the request has them and is answered inside the edge's scope,
/// which the route layer and handlers always are; a streamed answer, whose
/// record is made when its body ends (outside that scope), and a note made
/// outside any request have fields of their own.
#[derive(Clone)]
pub struct AuditNote(NoteRef);

#[derive(Clone)]
enum NoteRef {
    /// In the current request's facts.
    Request,
    /// Its own.
    Own(Arc<Mutex<NoteFields>>),
}

impl Default for AuditNote {
    /// A note with fields of its own.
    fn default() -> AuditNote {
        AuditNote(NoteRef::Own(Arc::default()))
    }
}

impl AuditNote {
    fn with(&self, f: impl FnOnce(&mut NoteFields)) {
        match &self.0 {
            NoteRef::Request => {
                RequestFacts::change(|facts| facts.fields.as_mut().map(f));
            }
            NoteRef::Own(fields) => f(&mut fields.lock().unwrap_or_else(|e| e.into_inner())),
        }
    }

    /// Takes what the note holds, leaving it empty.
    fn take(&self) -> NoteFields {
        match &self.0 {
            NoteRef::Request => RequestFacts::change(|facts| facts.fields.take())
                .flatten()
                .unwrap_or_default(),
            NoteRef::Own(fields) => {
                std::mem::take(&mut *fields.lock().unwrap_or_else(|e| e.into_inner()))
            }
        }
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
        self.with(|n| match (&mut n.item, n.targets.last_mut()) {
            (Some(item), _) => item.encryption = Some(id),
            (None, Some(t)) if t.items.is_none() && t.encryption_id.is_none() => {
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
        self.with(|n| match (&mut n.item, n.targets.last_mut()) {
            (Some(item), _) => item.version = Some(id),
            (None, Some(t)) if t.items.is_none() => t.version_id = Some(id),
            (None, _) => n.targets.push(Target {
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
                .is_some_and(|t| t.api_key_id.is_none() && t.items.is_none());
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
            n.end_item(Some("incomplete"));
            n.item = Some(OpenItem {
                index: u32::try_from(index).unwrap_or(u32::MAX),
                encryption: None,
                version: None,
            });
        });
    }

    /// Ends the open batch item with its error code, if it failed: it joins
    /// the group of items with the same encryption, version and outcome.
    pub fn end_item(&self, error: Option<&'static str>) {
        self.with(|n| n.end_item(error));
    }
}

impl<S: Send + Sync> FromRequestParts<S> for AuditNote {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(_: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // Outside the audit layer (never, for audited routes), a detached note.
        Ok(RequestFacts::read(|f| f.note.clone())
            .flatten()
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
        let mut fields = self.note.take();
        // An item still running when the request ended (a time limit, the
        // client gone) joins a group with the request's error.
        fields.end_item(Some(error.unwrap_or("failed")));
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

impl Pending {
    /// Like [`Pending::answered`], from code that cannot wait: a streamed
    /// answer's body, when the stream ends or is dropped. The record is
    /// queued by a task of its own, which waits for room in the writer's
    /// queue as every request's record does (a record that did not wait
    /// would be lost whenever the queue is under pressure: a stream must
    /// not go unrecorded because other calls keep the writer busy). Outside
    /// a runtime (never, in the server), queued without waiting.
    pub(super) fn answered_later(mut self, status: Option<u16>, error: Option<&'static str>) {
        let Some(event) = self.finish(status, error) else {
            return;
        };
        let log = self.log.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move { log.record(event).await });
            }
            Err(_) => log.record_now(event),
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

/// Starts the audit record of a request to `route`, which performs
/// `operation`: puts the [`AuditNote`] the handlers fill in the request's
/// [`RequestFacts`], with the targets its path names. A `streamed` answer's
/// note has fields of its own (its record is made after the request's
/// scope ended).
pub(super) async fn begin(
    state: &AppState,
    parts: &mut Parts,
    operation: &'static str,
    route: &str,
    streamed: bool,
) -> Pending {
    let in_facts = !streamed
        && RequestFacts::change(|facts| facts.fields = Some(NoteFields::default())).is_some();
    let note = if in_facts {
        AuditNote(NoteRef::Request)
    } else {
        AuditNote::default()
    };
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
    // Every request has its facts from the edge; one that had none would
    // still be recorded, without its request id and address.
    let (request_id, peer) = RequestFacts::change(|facts| {
        facts.note = Some(note.clone());
        (facts.request_id, facts.client_addr)
    })
    .unwrap_or_default();
    let event = AuditEvent {
        time_ms: now_ms(),
        operation,
        request_id,
        client: parts.extensions.get::<Arc<ClientIdentity>>().cloned(),
        peer,
        ..AuditEvent::default()
    };
    Pending {
        log: state.audit.clone(),
        note,
        event: Some(event),
        guard: state.guard.clone(),
    }
}
