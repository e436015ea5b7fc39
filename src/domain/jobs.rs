//! Re-encryption jobs: Keyward walks a table in the platform's database and
//! moves every ciphertext to its encryption's active version, so that old
//! versions can be retired with confidence.
//!
//! The walk is keyset-paginated on the key column. Each row still on an old
//! version is decrypted and encrypted again inside Keyward (the plaintext never
//! leaves it) and written back with a compare-and-swap on the old ciphertext and
//! version: a row the platform changed meanwhile is skipped, never overwritten,
//! and picked up by the next pass. Progress (cursor, counts) is stored after
//! every batch, so a job resumes after a crash; a lease in the database lets
//! one replica of many run each job. When a pass finds no row left on an old
//! version (or after a bounded number of passes) the job reports how many rows
//! still reference each old version.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::keys::Mode;
use super::service::{KeyError, KeyService, Sealed};
use super::time::now_ms;
use super::{EncryptionId, TenantId, VersionId};
use crate::crypto::NONCE_LEN;
use crate::domain::records::JobRow;
use crate::domain::states::JobState;
use crate::store::source::{is_plain_identifier, SourceLayout, SourceTable, SourceWrite};
use crate::store::{Backend, JobProgress};

/// Where the platform keeps its ciphertexts.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobSource {
    /// `postgres://...` or `sqlite://...` (credentials included; sealed at rest).
    pub database_url: String,
    /// The table (optionally `schema.table`).
    pub table: String,
    /// A unique, ordered key column (integer or text).
    pub key_column: String,
    /// Holds `cipherText` (base64 text).
    pub cipher_text_column: String,
    /// Holds `encryptionVersionId` (text).
    pub version_column: String,
    /// Holds `metadata` as JSON text.
    pub metadata_column: String,
    /// Holds each row's `encryptionId` (text), instead of one `encryptionId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_id_column: Option<String>,
}

impl std::fmt::Debug for JobSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobSource")
            .field("table", &self.table)
            .field("key_column", &self.key_column)
            .finish_non_exhaustive()
    }
}

/// Why a job could not be started.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A name that is not a plain SQL identifier.
    #[error("`{0}` must be a plain identifier (letters, digits, underscore; `schema.table` for the table)")]
    BadIdentifier(&'static str),
    /// Neither or both of `encryptionId` and `encryptionIdColumn`.
    #[error("give either `encryptionId` or `source.encryptionIdColumn`")]
    EncryptionScope,
    /// The source database cannot be reached or the table does not fit.
    #[error("the source is not usable: {0}")]
    Source(String),
    /// A key error (unknown encryption, client mode...).
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl JobSource {
    /// Which columns of which table, for the store.
    fn layout(&self) -> SourceLayout<'_> {
        SourceLayout {
            table: &self.table,
            key_column: &self.key_column,
            cipher_text_column: &self.cipher_text_column,
            version_column: &self.version_column,
            metadata_column: &self.metadata_column,
            encryption_id_column: self.encryption_id_column.as_deref(),
        }
    }

    /// Opens the source table.
    async fn open(&self) -> Result<SourceTable, JobError> {
        SourceTable::open(&self.database_url, &self.layout())
            .await
            .map_err(|e| JobError::Source(e.to_string()))
    }

    fn validate(&self) -> Result<(), JobError> {
        if Backend::from_url(&self.database_url).is_none() {
            return Err(JobError::Source(
                "`databaseUrl` must start with postgres:// or sqlite:".into(),
            ));
        }
        for (name, value, dotted) in [
            ("source.table", &self.table, true),
            ("source.keyColumn", &self.key_column, false),
            ("source.cipherTextColumn", &self.cipher_text_column, false),
            ("source.versionColumn", &self.version_column, false),
            ("source.metadataColumn", &self.metadata_column, false),
        ] {
            if !is_plain_identifier(value, dotted) {
                return Err(JobError::BadIdentifier(name));
            }
        }
        if let Some(c) = &self.encryption_id_column {
            if !is_plain_identifier(c, false) {
                return Err(JobError::BadIdentifier("source.encryptionIdColumn"));
            }
        }
        Ok(())
    }
}

/// A job to start.
pub struct NewJob {
    /// The table's one encryption (or `None` with an encryption id column).
    pub encryption_id: Option<EncryptionId>,
    /// Rate limit.
    pub max_rows_per_second: Option<u32>,
    /// The source.
    pub source: JobSource,
}

/// Validates and queues a job; the runner picks it up.
pub async fn start_job(
    service: &KeyService,
    tenant: TenantId,
    job: NewJob,
) -> Result<uuid::Uuid, JobError> {
    job.source.validate()?;
    match (&job.encryption_id, &job.source.encryption_id_column) {
        (Some(e), None) => {
            let (_, mode) = service.active_version(tenant, *e).await?;
            if mode == Mode::Client {
                return Err(JobError::Source(
                    "a client-mode encryption needs its client key for every row; Keyward cannot walk it".into(),
                ));
            }
        }
        (None, Some(_)) => {}
        _ => return Err(JobError::EncryptionScope),
    }
    job.source.open().await?.close().await;
    let id = uuid::Uuid::new_v4();
    let spec = Zeroizing::new(serde_json::to_vec(&job.source).expect("a source serializes"));
    let (kek, sealed) = service.seal_job_source(id, &spec)?;
    service
        .store()
        .insert_job(&JobRow {
            id,
            tenant_id: tenant,
            kind: "reencrypt".into(),
            encryption_id: job.encryption_id,
            source_sealed: sealed,
            source_kek_id: kek,
            max_rows_per_second: job.max_rows_per_second.map(i64::from),
            state: JobState::Queued,
            cursor: None,
            pass: 0,
            processed: 0,
            rewrapped: 0,
            skipped: 0,
            failed: 0,
            total: None,
            rows_per_second: 0,
            remaining_by_version: None,
            error: None,
            started_at: None,
            finished_at: None,
            created_at: now_ms(),
        })
        .await
        .map_err(KeyError::from)?;
    Ok(id)
}

/// The source of a job as stored (without credentials), for display.
pub fn describe_source(service: &KeyService, job: &JobRow) -> Option<serde_json::Value> {
    let plain = service
        .open_job_source(job.id, job.source_kek_id, &job.source_sealed)
        .ok()?;
    let source: JobSource = serde_json::from_slice(&plain).ok()?;
    let mut v = serde_json::json!({
        "table": source.table,
        "keyColumn": source.key_column,
        "cipherTextColumn": source.cipher_text_column,
        "versionColumn": source.version_column,
        "metadataColumn": source.metadata_column,
    });
    if let Some(c) = source.encryption_id_column {
        v["encryptionIdColumn"] = c.into();
    }
    Some(v)
}

/// Tuning of the runner.
#[derive(Debug, Clone, Copy)]
pub struct RunnerSettings {
    /// How long a runner's claim lasts without renewal.
    pub lease: Duration,
    /// Rows per batch.
    pub batch: i64,
    /// How often to look for runnable jobs.
    pub poll: Duration,
}

/// Runs jobs until `shutdown`: claims one at a time, runs it, repeats.
pub async fn run_jobs(
    service: Arc<KeyService>,
    settings: RunnerSettings,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let owner = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
    loop {
        if service.not_ready_reason().is_none() {
            match service
                .store()
                .claim_job(&owner, now_ms(), settings.lease.as_millis() as i64)
                .await
            {
                Ok(Some(job)) => {
                    let id = job.id;
                    tracing::info!(job_id = %id, pass = job.pass, "running re-encryption job");
                    let outcome = tokio::select! {
                        r = run_one(&service, &owner, job, settings) => r,
                        _ = shutdown.changed() => return,
                    };
                    if let Err(e) = outcome {
                        tracing::warn!(job_id = %id, error = %e, "re-encryption job failed");
                        let _ = service
                            .store()
                            .finish_job(id, &owner, JobState::Failed, None, Some(&e), now_ms())
                            .await;
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot look for jobs"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.poll) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Most passes over the table before a job reports what is left.
const MAX_PASSES: i64 = 3;

async fn run_one(
    service: &KeyService,
    owner: &str,
    job: JobRow,
    settings: RunnerSettings,
) -> Result<(), String> {
    let plain = service
        .open_job_source(job.id, job.source_kek_id, &job.source_sealed)
        .map_err(|e| e.to_string())?;
    let source: JobSource = serde_json::from_slice(&plain)
        .map_err(|_| "the stored source does not parse".to_string())?;
    let db = source.open().await.map_err(|e| e.to_string())?;
    let result = walk(service, owner, &job, &db, settings).await;
    db.close().await;
    result
}

async fn walk(
    service: &KeyService,
    owner: &str,
    job: &JobRow,
    db: &SourceTable,
    settings: RunnerSettings,
) -> Result<(), String> {
    let lease_ms = settings.lease.as_millis() as i64;
    // With a rate limit, a batch must fit well inside the lease, which is
    // renewed once per batch.
    let batch = match job.max_rows_per_second.filter(|m| *m > 0) {
        Some(max) => settings.batch.min((max * lease_ms / 3000).max(1)),
        None => settings.batch,
    };
    if job.total.is_none() {
        let total = db.count().await.map_err(|e| e.to_string())?;
        service
            .store()
            .set_job_total(job.id, total)
            .await
            .map_err(|e| e.to_string())?;
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut cursor = job.cursor.clone();
    let mut pass = job.pass;
    let started = Instant::now();
    let mut done_this_run = 0i64;
    loop {
        let rows = db
            .batch(cursor.as_deref(), batch)
            .await
            .map_err(|e| e.to_string())?;
        if rows.is_empty() {
            // End of a pass: what still references an old version?
            let remaining = remaining(service, job, db).await?;
            let left: i64 = remaining.values().sum();
            if left == 0 || pass + 1 >= MAX_PASSES {
                let json = serde_json::to_string(&remaining).expect("a map serializes");
                service
                    .store()
                    .finish_job(
                        job.id,
                        owner,
                        JobState::Succeeded,
                        Some(&json),
                        None,
                        now_ms(),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(job_id = %job.id, passes = pass + 1, left, "re-encryption job finished");
                return Ok(());
            }
            // Rows the platform changed under an old version: another pass.
            pass += 1;
            cursor = None;
            if !service
                .store()
                .record_job_progress(
                    job.id,
                    owner,
                    JobProgress {
                        cursor: None,
                        pass,
                        processed: 0,
                        rewrapped: 0,
                        skipped: 0,
                        failed: 0,
                        rows_per_second: 0,
                    },
                    now_ms(),
                    lease_ms,
                )
                .await
                .map_err(|e| e.to_string())?
            {
                return Ok(());
            }
            continue;
        }
        let (mut rewrapped, mut skipped, mut failed) = (0i64, 0i64, 0i64);
        // Skipped and failed rows are counted in the first pass only, so that
        // each row counts once; later passes retry them.
        let first_pass = pass == 0;
        // New values first, then one statement per few hundred rows for the
        // batch's writes, each row still its own compare-and-swap.
        let mut writes: Vec<SourceWrite<'_>> = Vec::new();
        for row in &rows {
            // An encrypted field left empty (NULL) has nothing to move.
            let Some(cipher_text) = row.cipher_text.as_deref() else {
                skipped += 1;
                continue;
            };
            let encryption = match (job.encryption_id, &row.encryption) {
                (Some(e), _) => e,
                (None, Some(text)) => match text.parse() {
                    Ok(e) => e,
                    Err(_) => {
                        skipped += 1;
                        continue;
                    }
                },
                (None, None) => {
                    skipped += 1;
                    continue;
                }
            };
            let active = match service.active_version(job.tenant_id, encryption).await {
                Ok((active, Mode::Platform)) => active,
                // Not the tenant's, gone, or client-mode: not ours to touch.
                Ok((_, Mode::Client)) | Err(KeyError::EncryptionNotFound) => {
                    skipped += 1;
                    continue;
                }
                Err(e) => return Err(e.to_string()),
            };
            // Compared as UUIDs, not as text: `ABCD...` is the same version.
            let version: VersionId = match row.version.as_deref().map(str::parse) {
                Some(Ok(v)) => v,
                _ => {
                    failed += 1;
                    continue;
                }
            };
            if version == active {
                continue;
            }
            let nonce = row
                .metadata
                .as_deref()
                .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
                .and_then(|m| m.get("nonce").and_then(|n| n.as_str()).map(str::to_string))
                .and_then(|n| b64.decode(n).ok())
                .and_then(|n| <[u8; NONCE_LEN]>::try_from(n).ok());
            let Ok(ciphertext) = b64.decode(cipher_text) else {
                failed += 1;
                continue;
            };
            let out = match service
                .rewrap(
                    job.tenant_id,
                    encryption,
                    Sealed::new(version, nonce, &ciphertext),
                    None,
                )
                .await
            {
                Ok(out) => out,
                Err(
                    KeyError::DecryptionFailed
                    | KeyError::VersionDisabled
                    | KeyError::VersionDestroyed
                    | KeyError::VersionBelowMinimum,
                ) => {
                    failed += 1;
                    continue;
                }
                Err(e) => return Err(e.to_string()),
            };
            let metadata = serde_json::json!({"nonce": b64.encode(out.nonce)}).to_string();
            writes.push((
                row,
                b64.encode(&out.ciphertext),
                out.version_id.to_string(),
                metadata,
            ));
        }
        // A job cancelled (or taken over) meanwhile writes nothing more.
        if !writes.is_empty()
            && !service
                .store()
                .job_is_held(job.id, owner)
                .await
                .map_err(|e| e.to_string())?
        {
            tracing::info!(job_id = %job.id, "job cancelled or taken over; stopping");
            return Ok(());
        }
        if !writes.is_empty() {
            let written = db.swap_batch(&writes).await.map_err(|e| e.to_string())?;
            rewrapped += written as i64;
            // The platform wrote the others meanwhile: never overwrite them.
            skipped += (writes.len() - written) as i64;
        }
        let n = rows.len() as i64;
        done_this_run += n;
        cursor = rows.last().map(|r| r.key.clone());
        let elapsed = started.elapsed().as_secs_f64().max(0.001);
        let rate = (done_this_run as f64 / elapsed) as i64;
        let progress = JobProgress {
            cursor: cursor.as_deref(),
            pass,
            processed: if first_pass { n } else { 0 },
            rewrapped,
            skipped: if first_pass { skipped } else { 0 },
            failed: if first_pass { failed } else { 0 },
            rows_per_second: rate,
        };
        if !service
            .store()
            .record_job_progress(job.id, owner, progress, now_ms(), lease_ms)
            .await
            .map_err(|e| e.to_string())?
        {
            tracing::info!(job_id = %job.id, "job cancelled or taken over; stopping");
            return Ok(());
        }
        if let Some(max) = job.max_rows_per_second.filter(|m| *m > 0) {
            let due = Duration::from_secs_f64(done_this_run as f64 / max as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// What [`remaining`] reports rows under when their version column holds no
/// version id: never the column's text, which the job's caller did not write
/// into Keyward and may not be meant to read back.
const UNRECOGNIZED: &str = "unrecognized";

/// Rows still on an old version of one of the job's tenant's encryptions, by
/// version id in its canonical form (the column's text may differ in case), or
/// [`UNRECOGNIZED`]. Rows of other tenants' encryptions are not the job's
/// business; rows without a ciphertext have nothing to report.
async fn remaining(
    service: &KeyService,
    job: &JobRow,
    db: &SourceTable,
) -> Result<BTreeMap<String, i64>, String> {
    let histogram = db.histogram().await.map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for (encryption, version, rows) in histogram {
        let encryption = match (job.encryption_id, encryption) {
            (Some(e), _) => e,
            (None, Some(text)) => match text.parse::<EncryptionId>() {
                Ok(e) => e,
                Err(_) => continue,
            },
            (None, None) => continue,
        };
        let active = match service.active_version(job.tenant_id, encryption).await {
            Ok((active, _)) => active,
            Err(KeyError::EncryptionNotFound) => continue,
            Err(e) => return Err(e.to_string()),
        };
        let key = match version.as_deref().map(str::parse::<VersionId>) {
            Some(Ok(v)) if v == active => continue,
            Some(Ok(v)) => v.to_string(),
            _ => UNRECOGNIZED.to_string(),
        };
        *out.entry(key).or_insert(0) += rows;
    }
    Ok(out)
}
