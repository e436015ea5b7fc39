//! Auditing requests, and `GET /v1/audit`.
//!
//! A route layer gives every API request an [`AuditNote`] that the auth
//! extractor fills with the caller and the handlers with what they acted on
//! (encryption, version, job; one target per batch item). When the response is
//! ready, the note becomes an [`AuditEvent`] handed to the writer without
//! waiting for it. A request that is dropped before it answers (time limit,
//! client gone) is recorded as `cancelled`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{ConnectInfo, FromRequestParts, RawPathParams, State};
use axum::http::request::Parts;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody, ErrorCode};
use super::extract::{AdminScope, Auth};
use super::query::{self, ApiQuery};
use super::AppState;
use crate::audit::{Actor, AuditEvent, AuditLog, AuditRecord, Target, OPERATIONS};
use crate::domain::identity::ClientIdentity;
use crate::domain::records::AuditQuery;
use crate::domain::service::Principal;
use crate::domain::time::now_ms;
use crate::domain::{EncryptionId, VersionId};

#[derive(Default)]
struct NoteFields {
    actor: Actor,
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
}

impl Pending {
    fn finish(&mut self, status: Option<u16>, error: Option<&'static str>) -> Option<AuditEvent> {
        let mut event = self.event.take()?;
        let fields = std::mem::take(&mut *self.note.0.lock().unwrap_or_else(|e| e.into_inner()));
        event.status = status;
        event.error = error;
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

/// Starts the audit record of a request to `route`, which performs
/// `operation`: puts the [`AuditNote`] the handlers fill in the request's
/// extensions, with the targets its path names.
pub(super) async fn begin(
    state: &AppState,
    parts: &mut Parts,
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
        request_id: parts
            .headers
            .get(&super::edge::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        client: parts.extensions.get::<Arc<ClientIdentity>>().cloned(),
        peer: parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip()),
        ..AuditEvent::default()
    };
    Pending {
        log: state.audit.clone(),
        note,
        event: Some(event),
    }
}

/// Filters and paging of `GET /v1/audit`.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
pub struct AuditParams {
    /// Records at or after this time (RFC 3339, e.g. `2026-11-23T10:00:00Z`).
    #[serde(default, deserialize_with = "unix_ms")]
    #[param(value_type = Option<String>, format = DateTime)]
    from: Option<i64>,
    /// Records before this time (RFC 3339).
    #[serde(default, deserialize_with = "unix_ms")]
    #[param(value_type = Option<String>, format = DateTime)]
    to: Option<i64>,
    /// Records of this tenant.
    #[serde(default, deserialize_with = "query::uuid_text")]
    #[param(format = Uuid)]
    tenant_id: Option<String>,
    /// Records about this encryption.
    #[serde(default, deserialize_with = "query::uuid_text")]
    #[param(format = Uuid)]
    encryption_id: Option<String>,
    /// Records of this operation (`encrypt`, `decrypt`, `rotate`, ...).
    #[serde(default, deserialize_with = "operation")]
    #[param(schema_with = operation_schema)]
    operation: Option<String>,
    /// Page size, 1 to 1000 (default 100).
    #[serde(default, deserialize_with = "query::page_limit")]
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// The `nextCursor` of the previous page.
    #[serde(default, deserialize_with = "cursor")]
    #[param(value_type = Option<String>)]
    cursor: Option<i64>,
}

/// An RFC 3339 time, as Unix milliseconds.
fn unix_ms<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    let read = |v: &str| {
        time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
            .ok()
            .and_then(|t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok())
    };
    query::value(
        deserializer,
        read,
        "expected an RFC 3339 time such as 2026-11-23T10:00:00Z",
    )
}

/// One of [`OPERATIONS`].
fn operation<'de, D>(deserializer: D) -> Result<Option<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Expected;
    impl std::fmt::Display for Expected {
        fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "expected one of {}", OPERATIONS.join(", "))
        }
    }
    let read = |v: &str| OPERATIONS.contains(&v).then(|| v.to_string());
    query::value(deserializer, read, Expected)
}

/// A position in the table, from 1.
fn cursor<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    let read = |v: &str| v.parse().ok().filter(|n| *n > 0);
    query::value(deserializer, read, query::NOT_A_CURSOR)
}

/// A page of audit records, newest first.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    /// This page.
    records: Vec<AuditRecord>,
    /// Pass as `cursor` for the next (older) page; `null` on the last page.
    next_cursor: Option<String>,
}

fn operation_schema() -> utoipa::openapi::schema::Object {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(OPERATIONS.iter().copied()))
        .build()
}

/// The audit log (every tenant's), newest first, filtered and paginated.
///
/// Records from every replica are here; each replica also writes its own
/// hash-chained file (`KEYWARD_AUDIT_FILE`) that `keyward audit verify` checks.
#[utoipa::path(
    get,
    path = "/v1/audit",
    tag = "admin",
    params(AuditParams),
    responses(
        (status = 200, description = "A page of records", body = AuditPage),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 403, description = "`certificate_mismatch` or `insufficient_scope` (needs `admin`)", body = ErrorBody),
    )
)]
pub(super) async fn list(
    State(state): State<AppState>,
    _auth: Auth<AdminScope>,
    ApiQuery(params): ApiQuery<AuditParams>,
) -> Result<Json<AuditPage>, ApiError> {
    let mut q = AuditQuery {
        from_ms: params.from,
        to_ms: params.to,
        tenant_id: params.tenant_id,
        encryption_id: params.encryption_id,
        operation: params.operation,
        before_id: params.cursor,
        limit: params.limit.unwrap_or(query::DEFAULT_PAGE).into(),
    };
    // What this replica recorded before this call is in the table first.
    state.audit.flush().await;
    let limit = q.limit;
    q.limit += 1;
    let mut rows = state.service.audit_records(&q).await?;
    let next_cursor = if rows.len() as i64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|(id, _)| id.to_string())
    } else {
        None
    };
    let records = rows
        .into_iter()
        .filter_map(|(position, text)| match serde_json::from_str(&text) {
            Ok(r) => Some(r),
            Err(_) => {
                tracing::error!(
                    position,
                    "an audit record in the table does not parse; skipped"
                );
                None
            }
        })
        .collect();
    Ok(Json(AuditPage {
        records,
        next_cursor,
    }))
}
