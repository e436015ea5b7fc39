//! Re-encryption jobs: `POST /v1/jobs`, `GET /v1/jobs`, `GET /v1/jobs/{id}`,
//! `POST /v1/jobs/{id}/cancel` (scope `manage`). A job names a source the
//! operator registered and granted to the tenant; it never gives a database
//! URL, and its view shows the source's name only.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::audit_note::AuditNote;
use super::error::{ApiError, ErrorBody};
use super::extract::{parse_id, parse_optional_id};
use super::extract::{ApiJson, Auth, ManageScope};
use super::state::AppState;
use crate::domain::jobs::{describe_source, start_job, JobError, JobSource, NewJob};
use crate::domain::records::JobRow;
use crate::domain::states::JobState;
use crate::domain::time::rfc3339;

/// `POST /v1/jobs` input.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateJobRequest {
    /// `reencrypt`.
    #[schema(value_type = KindSchema)]
    kind: String,
    /// The encryption of every row (or give `source.encryptionIdColumn`).
    #[serde(default)]
    #[schema(format = Uuid, nullable = false)]
    encryption_id: Option<String>,
    /// Rows per second at most, to spare the platform's database.
    #[serde(default, deserialize_with = "super::extract::whole_number")]
    #[schema(minimum = 1, nullable = false)]
    max_rows_per_second: Option<u32>,
    /// The platform's table.
    #[schema(value_type = JobSourceSchema)]
    #[serde(deserialize_with = "super::extract::object")]
    source: JobSource,
}

/// The kinds of job.
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "snake_case")]
enum KindSchema {
    /// Move every ciphertext to its encryption's active version.
    Reencrypt,
}

/// Where the ciphertexts are: a job source the operator registered and granted
/// to this tenant, and a table in it. A `databaseUrl` is refused, like an
/// unknown or ungranted name, with `422 job_source_unavailable`.
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "camelCase")]
struct JobSourceSchema {
    /// The source's name, as the operator registered it.
    name: String,
    /// The table (`schema.table` allowed).
    table: String,
    /// A unique, ordered key column (integer or text).
    key_column: String,
    /// The ciphertext (base64 text) column.
    cipher_text_column: String,
    /// The version id (text) column.
    version_column: String,
    /// The metadata (JSON text) column.
    metadata_column: String,
    /// A column with each row's encryption id, instead of one `encryptionId`.
    encryption_id_column: Option<String>,
    /// A text column with each row's `context` (any algorithm): each row is
    /// decrypted and re-encrypted under it, so the context is kept.
    context_column: Option<String>,
    /// The cipher-text column holds wrapped data keys (`/v1/datakey`), moved
    /// as `/v1/datakey/rewrap` moves them; metadata is written `{}`; no index
    /// columns.
    wrapped_keys: bool,
    /// Blind-index columns to recompute under each index's active version
    /// (at most 8); with any, rows already on the active key version whose
    /// index values are stale are rewritten too.
    #[schema(max_items = 8)]
    index_columns: Vec<IndexColumnSchema>,
}

/// A blind-index column of the job's table.
#[derive(ToSchema)]
#[allow(dead_code)]
#[schema(rename_all = "camelCase")]
struct IndexColumnSchema {
    /// The index, as declared on the encryption.
    index: String,
    /// The column holding its value (hex text).
    column: String,
}

/// `POST /v1/jobs` output.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobCreated {
    #[schema(format = Uuid)]
    job_id: String,
}

/// A job's state and progress.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct JobView {
    #[schema(format = Uuid)]
    job_id: String,
    /// `reencrypt`.
    kind: String,
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    state: String,
    #[schema(format = Uuid)]
    encryption_id: Option<String>,
    /// Rows looked at in the first pass.
    processed: i64,
    /// Rows in the table when the job started.
    total: Option<i64>,
    /// Rows moved to the active version.
    rewrapped: i64,
    /// Rows the platform changed meanwhile (retried in a later pass) or not the tenant's.
    skipped: i64,
    /// Rows that could not be decrypted (tampered, or a disabled or destroyed version).
    failed: i64,
    /// Recent rate.
    rows_per_second: i64,
    /// Estimated seconds to the end of the first pass.
    eta_seconds: Option<i64>,
    /// Rows still on each old version at the last scan (empty: every row is current).
    remaining_by_version: BTreeMap<String, i64>,
    /// Rate limit.
    max_rows_per_second: Option<i64>,
    /// Why it failed; for any problem with the source, the same generic text
    /// as `job_source_unavailable`.
    error: Option<String>,
    /// The source: `{"name": ...}`, its name only.
    #[schema(value_type = Object)]
    source: Option<serde_json::Value>,
    #[schema(format = DateTime)]
    created_at: String,
    #[schema(format = DateTime)]
    started_at: Option<String>,
    #[schema(format = DateTime)]
    finished_at: Option<String>,
}

/// Jobs of the tenant, newest first.
#[derive(Serialize, ToSchema)]
pub struct JobList {
    items: Vec<JobView>,
}

fn view(state: &AppState, job: &JobRow) -> JobView {
    let eta_seconds = match (job.state, job.total) {
        (JobState::Running, Some(total)) if job.rows_per_second > 0 => {
            Some((total - job.processed).max(0) / job.rows_per_second)
        }
        (JobState::Succeeded, _) => Some(0),
        _ => None,
    };
    JobView {
        job_id: job.id.to_string(),
        kind: job.kind.clone(),
        state: job.state.as_str().to_string(),
        encryption_id: job.encryption_id.map(|e| e.to_string()),
        processed: job.processed,
        total: job.total,
        rewrapped: job.rewrapped,
        skipped: job.skipped,
        failed: job.failed,
        rows_per_second: job.rows_per_second,
        eta_seconds,
        remaining_by_version: job
            .remaining_by_version
            .as_deref()
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default(),
        max_rows_per_second: job.max_rows_per_second,
        error: job.error.clone(),
        source: describe_source(&state.service, job),
        created_at: rfc3339(job.created_at),
        started_at: job.started_at.map(rfc3339),
        finished_at: job.finished_at.map(rfc3339),
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Key(k) => ApiError::Key(k),
            JobError::SourceUnavailable => ApiError::JobSourceUnavailable,
            other => ApiError::InvalidJob(other.to_string()),
        }
    }
}

/// Start a re-encryption job over a table of the platform's database.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body = CreateJobRequest,
    responses(
        (status = 202, description = "Queued", body = JobCreated),
        (status = 400, description = "`invalid_request`", body = ErrorBody),
        (status = 404, description = "`encryption_not_found`", body = ErrorBody),
        (status = 422, description = "`job_source_unavailable` (the source is unknown, not granted to this tenant, or given as a `databaseUrl`), or `invalid_job` (bad identifiers, client-mode encryption)", body = ErrorBody),
    ))]
pub(super) async fn create(
    State(state): State<AppState>,
    auth: Auth<ManageScope>,
    note: AuditNote,
    ApiJson(req): ApiJson<CreateJobRequest>,
) -> Result<(StatusCode, Json<JobCreated>), ApiError> {
    if req.kind != "reencrypt" {
        return Err(ApiError::InvalidRequest(
            "`kind`: expected `reencrypt`".into(),
        ));
    }
    // A job that writes blind-index columns computes index values: the
    // `index` scope, as on `/v1/index`, besides `manage`.
    if !req.source.index_columns.is_empty()
        && !auth
            .principal
            .scopes
            .contains(crate::domain::apikeys::Scope::Index)
    {
        return Err(ApiError::InsufficientScope(
            crate::domain::apikeys::Scope::Index,
        ));
    }
    let encryption_id = parse_optional_id(req.encryption_id.as_deref(), "encryptionId")?;
    if let Some(e) = encryption_id {
        note.encryption(e);
    }
    let id = start_job(
        &state.service,
        auth.tenant,
        NewJob {
            encryption_id,
            max_rows_per_second: req.max_rows_per_second.filter(|n| *n > 0),
            source: req.source,
        },
    )
    .await?;
    tracing::info!(job_id = %id, "re-encryption job queued");
    note.job(id.to_string());
    Ok((
        StatusCode::ACCEPTED,
        Json(JobCreated {
            job_id: id.to_string(),
        }),
    ))
}

/// A job's state and progress.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, format = Uuid, description = "The job id")),
    responses(
        (status = 200, description = "The job", body = JobView),
        (status = 400, description = "`invalid_request` (the id is not a UUID)", body = ErrorBody),
        (status = 404, description = "`job_not_found`", body = ErrorBody),
    ))]
pub(super) async fn show(
    State(state): State<AppState>,
    auth: Auth<ManageScope>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_id(&id, "job id in the path")?;
    let job = state.service.job(auth.tenant, id).await?;
    found(&state, job)
}

/// A job as shown, or `job_not_found` when the tenant has none with its id.
fn found(state: &AppState, job: Option<JobRow>) -> Result<Json<JobView>, ApiError> {
    let job = job.ok_or(ApiError::JobNotFound)?;
    Ok(Json(view(state, &job)))
}

/// The tenant's jobs, newest first (at most 100).
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs",
    responses(
        (status = 200, description = "Jobs", body = JobList),
    ))]
pub(super) async fn list(
    State(state): State<AppState>,
    auth: Auth<ManageScope>,
) -> Result<Json<JobList>, ApiError> {
    let jobs = state.service.jobs(auth.tenant, 100).await?;
    Ok(Json(JobList {
        items: jobs.iter().map(|j| view(&state, j)).collect(),
    }))
}

/// Cancel a queued or running job (rows already moved stay moved).
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, format = Uuid, description = "The job id")),
    responses(
        (status = 200, description = "The job after cancelling", body = JobView),
        (status = 400, description = "`invalid_request` (the id is not a UUID)", body = ErrorBody),
        (status = 404, description = "`job_not_found`", body = ErrorBody),
    ))]
pub(super) async fn cancel(
    State(state): State<AppState>,
    auth: Auth<ManageScope>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_id(&id, "job id in the path")?;
    let job = state.service.cancel_job(auth.tenant, id).await?;
    found(&state, job)
}
