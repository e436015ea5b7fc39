//! `GET /v1/audit`: the audit log, filtered and paginated. An operator key
//! with `audit` reads every tenant's records; a tenant key with `admin` reads
//! its own tenant's only.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ErrorBody};
use super::extract::{AuditReadScope, Auth};
use super::query::{self, ApiQuery};
use super::state::AppState;
use crate::audit::{AuditRecord, OPERATIONS};
use crate::domain::records::AuditQuery;

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

/// The audit log, newest first, filtered and paginated: every tenant's for an
/// operator key with `audit`, the caller's own tenant's for a tenant key with
/// `admin` (a `tenantId` filter naming another tenant then finds nothing).
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
        (status = 403, description = "`certificate_mismatch` or `insufficient_scope` (needs `admin` on a tenant key, `audit` on an operator key)", body = ErrorBody),
    )
)]
pub(super) async fn list(
    State(state): State<AppState>,
    auth: Auth<AuditReadScope>,
    ApiQuery(params): ApiQuery<AuditParams>,
) -> Result<Json<AuditPage>, ApiError> {
    let tenant_id = match auth.tenant {
        None => params.tenant_id,
        Some(own) => {
            // A tenant sees its own records only; asking for another tenant's
            // finds nothing, exactly like a tenant without records.
            let asked = params
                .tenant_id
                .as_deref()
                .map(|t| t.parse::<crate::domain::TenantId>().ok());
            if asked.is_some_and(|t| t != Some(own)) {
                return Ok(Json(AuditPage {
                    records: Vec::new(),
                    next_cursor: None,
                }));
            }
            Some(own.to_string())
        }
    };
    let mut q = AuditQuery {
        from_ms: params.from,
        to_ms: params.to,
        tenant_id,
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
        rows.last().map(|row| row.position.to_string())
    } else {
        None
    };
    // Lines of either format, read back as records of the v1 form (the
    // response is the same whatever the file's format).
    let records = rows
        .into_iter()
        .filter_map(
            |row| match AuditRecord::from_line(&row.line, row.previous_hash.as_deref()) {
                Ok(r) => Some(r),
                Err(_) => {
                    tracing::error!(
                        position = row.position,
                        "an audit record in the table does not parse; skipped"
                    );
                    None
                }
            },
        )
        .collect();
    Ok(Json(AuditPage {
        records,
        next_cursor,
    }))
}
