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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::keys::Mode;
use super::service::{IndexSelection, KeyError, KeyService, Sealed};
use super::sources::{is_source_name, SOURCE_UNAVAILABLE};
use super::time::now_ms;
use super::{EncryptionId, TenantId, VersionId};
use crate::crypto::NONCE_LEN;
use crate::domain::records::JobRow;
use crate::domain::states::JobState;
use crate::store::source::{
    is_plain_identifier, SourceError, SourceLayout, SourceTable, SourceWrite,
};
use crate::store::JobProgress;

/// Where the platform keeps its ciphertexts, as a tenant's job names it: a
/// source the operator registered, and a table in it.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobSource {
    /// The name of a source the operator registered and granted to the tenant.
    #[serde(default)]
    pub name: Option<String>,
    /// No longer accepted: a tenant cannot make Keyward connect to a database
    /// of its choosing. Present, it is refused with the generic source error
    /// (and not kept).
    #[serde(default)]
    pub database_url: Option<serde::de::IgnoredAny>,
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
    #[serde(default)]
    pub encryption_id_column: Option<String>,
    /// Holds each row's `context` (text), kept through re-encryption
    /// (AES-256-GCM-SIV); without it, rows are taken to have none.
    #[serde(default)]
    pub context_column: Option<String>,
    /// The cipher-text column holds wrapped data keys (from `/v1/datakey`,
    /// base64) rather than ciphertexts: each is moved as
    /// `/v1/datakey/rewrap` moves it (under the row's context), and the
    /// metadata column is written `{}`. Takes no index columns.
    #[serde(default)]
    pub wrapped_keys: bool,
    /// Blind-index columns to recompute (under each index's active version)
    /// while the job moves each row; with any, the job also rewrites rows
    /// already on the active version whose index values are stale, so a
    /// job after an index-key rotation leaves every row findable under the
    /// new index version (docs/search.md).
    #[serde(default)]
    pub index_columns: Vec<IndexColumn>,
}

/// One blind-index column of a job's table.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IndexColumn {
    /// The index (declared on the row's encryption).
    pub index: String,
    /// The column that holds its value (hex text).
    pub column: String,
}

/// Most index columns one job recomputes.
pub const MAX_INDEX_COLUMNS: usize = 8;

impl std::fmt::Debug for JobSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobSource")
            .field("name", &self.name)
            .field("table", &self.table)
            .field("key_column", &self.key_column)
            .finish_non_exhaustive()
    }
}

/// A job's source as stored (sealed): the source's name and the table, never
/// a URL or credentials, which stay in the operator's configuration.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct StoredSource {
    name: String,
    table: String,
    key_column: String,
    cipher_text_column: String,
    version_column: String,
    metadata_column: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    encryption_id_column: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    context_column: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    wrapped_keys: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    index_columns: Vec<IndexColumn>,
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
    /// Too many index columns, or one naming no possible index.
    #[error("`source.indexColumns`: at most 8, each naming an index of the encryption, and none with `wrappedKeys`")]
    IndexColumns,
    /// A client-mode encryption cannot be walked without its client key.
    #[error("a client-mode encryption needs its client key for every row; Keyward cannot walk it")]
    ClientMode,
    /// The source is unknown, not granted to the tenant, given as a URL, or
    /// not usable: one error, whichever it is ([`SOURCE_UNAVAILABLE`]).
    #[error("{}", SOURCE_UNAVAILABLE)]
    SourceUnavailable,
    /// A key error (unknown encryption, client mode...).
    #[error(transparent)]
    Key(#[from] KeyError),
}

impl StoredSource {
    /// Which columns of which table, for the store.
    fn layout(&self) -> SourceLayout<'_> {
        SourceLayout {
            table: &self.table,
            key_column: &self.key_column,
            cipher_text_column: &self.cipher_text_column,
            version_column: &self.version_column,
            metadata_column: &self.metadata_column,
            encryption_id_column: self.encryption_id_column.as_deref(),
            context_column: self.context_column.as_deref(),
            index_columns: self
                .index_columns
                .iter()
                .map(|c| c.column.as_str())
                .collect(),
        }
    }

    /// The names of the indexes the job recomputes, in column order.
    fn index_names(&self) -> Vec<String> {
        self.index_columns.iter().map(|c| c.index.clone()).collect()
    }

    /// What the destroy guard tells tables apart by: a digest of the source's
    /// name, the table and the columns that hold the ciphertext and version.
    fn target(&self) -> String {
        let text = [
            self.name.as_str(),
            &self.table,
            &self.cipher_text_column,
            &self.version_column,
        ]
        .join("\0");
        crate::crypto::hex(&crate::crypto::sha256(text.as_bytes()))
    }

    /// Opens the source table with the operator's URL, if the source is
    /// still registered and granted to the job's tenant and is not Keyward's
    /// own database. The error is for the operator's log only.
    async fn open(
        &self,
        service: &KeyService,
        tenant: TenantId,
        tenant_name: &str,
    ) -> Result<SourceTable, SourceError> {
        let sources = service.job_sources();
        let source = sources
            .granted(&self.name, tenant, tenant_name)
            .filter(|s| s.allows_table(&self.table))
            .ok_or_else(|| {
                SourceError::Connect(
                    "no such source is granted to the job's tenant (or not this table)".into(),
                )
            })?;
        if sources.is_own_database(source) {
            return Err(SourceError::Connect(
                "the source is Keyward's own database".into(),
            ));
        }
        SourceTable::open(source.url(), &self.layout(), sources.limits).await
    }
}

impl JobSource {
    fn validate(&self) -> Result<(), JobError> {
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
        if let Some(c) = &self.context_column {
            if !is_plain_identifier(c, false) {
                return Err(JobError::BadIdentifier("source.contextColumn"));
            }
        }
        if self.index_columns.len() > MAX_INDEX_COLUMNS
            || (self.wrapped_keys && !self.index_columns.is_empty())
        {
            return Err(JobError::IndexColumns);
        }
        for c in &self.index_columns {
            if !is_plain_identifier(&c.column, false) {
                return Err(JobError::BadIdentifier("source.indexColumns[].column"));
            }
            if !crate::domain::search::is_index_name(&c.index) {
                return Err(JobError::IndexColumns);
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

/// The tenant's name (sources may be granted by name).
async fn tenant_name(service: &KeyService, tenant: TenantId) -> Result<String, KeyError> {
    Ok(service
        .store()
        .tenant(tenant)
        .await?
        .map(|t| t.name)
        .unwrap_or_default())
}

/// Validates and queues a job; the runner picks it up. The source is not
/// opened here: a tenant's request never makes Keyward connect anywhere, and
/// a source that cannot be used fails the job with the same generic error.
pub async fn start_job(
    service: &KeyService,
    tenant: TenantId,
    job: NewJob,
) -> Result<uuid::Uuid, JobError> {
    job.source.validate()?;
    let tenant_name = tenant_name(service, tenant).await?;
    let granted = match (&job.source.database_url, &job.source.name) {
        (None, Some(name)) if is_source_name(name) => service
            .job_sources()
            .granted(name, tenant, &tenant_name)
            .filter(|s| s.allows_table(&job.source.table))
            .map(|s| s.name().to_string()),
        _ => None,
    };
    let Some(name) = granted else {
        tracing::info!(tenant_id = %tenant, "job refused: no source of that name is granted to the tenant (or it gave a database URL)");
        return Err(JobError::SourceUnavailable);
    };
    match (&job.encryption_id, &job.source.encryption_id_column) {
        (Some(e), None) => {
            let (_, mode) = service.active_version(tenant, *e).await?;
            if mode == Mode::Client {
                return Err(JobError::ClientMode);
            }
            let declared = service.list_indexes(tenant, *e).await?;
            if job
                .source
                .index_columns
                .iter()
                .any(|c| !declared.iter().any(|i| i.name == c.index))
            {
                return Err(JobError::IndexColumns);
            }
        }
        (None, Some(_)) => {}
        _ => return Err(JobError::EncryptionScope),
    }
    let source = job.source;
    let stored = StoredSource {
        name,
        table: source.table,
        key_column: source.key_column,
        cipher_text_column: source.cipher_text_column,
        version_column: source.version_column,
        metadata_column: source.metadata_column,
        encryption_id_column: source.encryption_id_column,
        context_column: source.context_column,
        wrapped_keys: source.wrapped_keys,
        index_columns: source.index_columns,
    };
    let id = uuid::Uuid::new_v4();
    let spec = Zeroizing::new(
        serde_json::to_vec(&stored)
            .map_err(|e| KeyError::Integrity(format!("job source does not serialize: {e}")))?,
    );
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
            target: Some(stored.target()),
            error: None,
            started_at: None,
            finished_at: None,
            created_at: now_ms(),
        })
        .await
        .map_err(KeyError::from)?;
    Ok(id)
}

/// The source of a job as shown to its tenant: the source's name only.
pub fn describe_source(service: &KeyService, job: &JobRow) -> Option<serde_json::Value> {
    let plain = service
        .open_job_source(job.id, job.source_kek_id, &job.source_sealed)
        .ok()?;
    let source: StoredSource = serde_json::from_slice(&plain).ok()?;
    Some(serde_json::json!({ "name": source.name }))
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
    /// Jobs this process runs at once, over all tenants.
    pub max_running: usize,
    /// Jobs this process runs at once for one tenant.
    pub max_running_per_tenant: usize,
}

/// Why a running job stopped short.
enum RunError {
    /// The source could not be used: the detail is for the operator's log,
    /// the tenant sees [`SOURCE_UNAVAILABLE`].
    Source(SourceError),
    /// A condition that passes (this replica not ready: its change feed
    /// unread, its root keys not loaded; the database or the master-key
    /// provider unavailable): the job is not failed, its lease runs out and
    /// it is taken up again, here or on another replica.
    Transient(String),
    /// Anything else (the text is stored as the job's `error`).
    Other(String),
}

impl From<SourceError> for RunError {
    fn from(e: SourceError) -> Self {
        RunError::Source(e)
    }
}

fn other(e: impl std::fmt::Display) -> RunError {
    RunError::Other(e.to_string())
}

/// A database error: unavailable pauses the job, the rest fail it.
fn store_error(e: crate::store::StoreError) -> RunError {
    key_error(KeyError::Store(e))
}

/// A key error: transient ones pause the job, the rest fail it.
fn key_error(e: KeyError) -> RunError {
    if matches!(e, KeyError::NotReady(_) | KeyError::Provider(_)) || e.is_unavailable() {
        RunError::Transient(e.to_string())
    } else {
        other(e)
    }
}

/// Runs jobs until `shutdown`: each claimed job in a task of its own, at most
/// `max_running` at once and `max_running_per_tenant` of one tenant, so that
/// one tenant's slow or hung source holds up its own jobs only.
pub async fn run_jobs(
    service: Arc<KeyService>,
    settings: RunnerSettings,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let owner: Arc<str> =
        format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple()).into();
    let mut tasks = tokio::task::JoinSet::new();
    // Job and tenant of each task, by task id.
    let mut running: HashMap<tokio::task::Id, (uuid::Uuid, TenantId)> = HashMap::new();
    loop {
        while let Some(done) = tasks.try_join_next_with_id() {
            let id = done.map(|(id, ())| id).unwrap_or_else(|e| e.id());
            running.remove(&id);
        }
        let mut claimed = false;
        if service.not_ready_reason().is_none() && running.len() < settings.max_running {
            let mut per_tenant: HashMap<TenantId, usize> = HashMap::new();
            for (_, tenant) in running.values() {
                *per_tenant.entry(*tenant).or_default() += 1;
            }
            let busy: Vec<TenantId> = per_tenant
                .into_iter()
                .filter(|(_, n)| *n >= settings.max_running_per_tenant)
                .map(|(t, _)| t)
                .collect();
            let jobs: Vec<uuid::Uuid> = running.values().map(|(j, _)| *j).collect();
            match service
                .store()
                .claim_job(
                    &owner,
                    now_ms(),
                    settings.lease.as_millis() as i64,
                    &busy,
                    &jobs,
                )
                .await
            {
                Ok(Some(job)) => {
                    let (id, tenant) = (job.id, job.tenant_id);
                    let task =
                        tasks.spawn(run_claimed(service.clone(), owner.clone(), job, settings));
                    running.insert(task.id(), (id, tenant));
                    claimed = true;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot look for jobs"),
            }
        }
        if claimed {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.poll) => {}
            Some(done) = tasks.join_next_with_id(), if !tasks.is_empty() => {
                let id = done.map(|(id, ())| id).unwrap_or_else(|e| e.id());
                running.remove(&id);
            }
            _ = shutdown.changed() => {
                // The leases run out; this process or another resumes the jobs.
                tasks.abort_all();
                return;
            }
        }
    }
}

/// Runs one claimed job to its end, and records a failure.
async fn run_claimed(
    service: Arc<KeyService>,
    owner: Arc<str>,
    job: JobRow,
    settings: RunnerSettings,
) {
    let id = job.id;
    tracing::info!(job_id = %id, tenant_id = %job.tenant_id, pass = job.pass, "running re-encryption job");
    let error = match run_one(&service, &owner, job, settings).await {
        Ok(()) => return,
        Err(RunError::Transient(e)) => {
            tracing::warn!(job_id = %id, error = %e, "re-encryption job paused; it is taken up again when its lease ends");
            return;
        }
        // Detail already logged by run_one, with the source's name.
        Err(RunError::Source(_)) => SOURCE_UNAVAILABLE.to_string(),
        Err(RunError::Other(e)) => {
            tracing::warn!(job_id = %id, error = %e, "re-encryption job failed");
            e
        }
    };
    let _ = service
        .store()
        .finish_job(id, &owner, JobState::Failed, None, Some(&error), now_ms())
        .await;
}

/// Most passes over the table before a job reports what is left.
const MAX_PASSES: i64 = 3;

async fn run_one(
    service: &KeyService,
    owner: &str,
    job: JobRow,
    settings: RunnerSettings,
) -> Result<(), RunError> {
    let plain = service
        .open_job_source_loading(job.id, job.source_kek_id, &job.source_sealed)
        .await
        .map_err(|e| match e {
            // Still unknown after reloading the root keys: a root-KEK
            // rotation re-sealed this job's source under the new KEK and
            // retired the old one after this row was read (retire waits for
            // no job to name it). The row read again names the new KEK, so
            // the job pauses and is taken up again instead of failing.
            KeyError::UnknownKek(_) => RunError::Transient(e.to_string()),
            e => key_error(e),
        })?;
    let Ok(source) = serde_json::from_slice::<StoredSource>(&plain) else {
        // A job queued before sources were named (it held a database URL).
        tracing::warn!(job_id = %job.id, "job source refused: the job names no registered source (queued by an older Keyward with a database URL)");
        return Err(RunError::Source(SourceError::Connect(
            "no source name".into(),
        )));
    };
    let tenant_name = tenant_name(service, job.tenant_id)
        .await
        .map_err(key_error)?;
    let result = async {
        let db = source.open(service, job.tenant_id, &tenant_name).await?;
        let indexes = source.index_names();
        let result = walk(
            service,
            owner,
            &job,
            &db,
            &indexes,
            source.wrapped_keys,
            settings,
        )
        .await;
        db.close().await;
        result
    }
    .await;
    if let Err(RunError::Source(e)) = &result {
        tracing::warn!(job_id = %job.id, tenant_id = %job.tenant_id, source = %source.name, error = %e, "job source unusable; the job fails with the generic source error");
    }
    result
}

async fn walk(
    service: &KeyService,
    owner: &str,
    job: &JobRow,
    db: &SourceTable,
    indexes: &[String],
    wrapped_keys: bool,
    settings: RunnerSettings,
) -> Result<(), RunError> {
    let lease_ms = settings.lease.as_millis() as i64;
    // With a rate limit, a batch must fit well inside the lease, which is
    // renewed once per batch.
    let batch = match job.max_rows_per_second.filter(|m| *m > 0) {
        Some(max) => settings.batch.min((max * lease_ms / 3000).max(1)),
        None => settings.batch,
    };
    if job.total.is_none() {
        let total = db.count().await?;
        service
            .store()
            .set_job_total(job.id, total)
            .await
            .map_err(store_error)?;
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut cursor = job.cursor.clone();
    let mut pass = job.pass;
    let started = Instant::now();
    let mut done_this_run = 0i64;
    loop {
        let rows = db.batch(cursor.as_deref(), batch).await?;
        if rows.is_empty() {
            // End of a pass: what still references an old version?
            let found = tally(service, job, db).await?;
            let remaining = found.remaining();
            let left: i64 = remaining.values().sum();
            if left == 0 || pass + 1 >= MAX_PASSES {
                let remaining = serde_json::to_string(&remaining).map_err(other)?;
                let rows = serde_json::to_string(&found.rows).map_err(other)?;
                service
                    .store()
                    .finish_job(
                        job.id,
                        owner,
                        JobState::Succeeded,
                        Some((&remaining, &rows)),
                        None,
                        now_ms(),
                    )
                    .await
                    .map_err(store_error)?;
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
                .map_err(store_error)?
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
                Err(e) => return Err(key_error(e)),
            };
            // Compared as UUIDs, not as text: `ABCD...` is the same version.
            let version: VersionId = match row.version.as_deref().map(str::parse) {
                Some(Ok(v)) => v,
                _ => {
                    failed += 1;
                    continue;
                }
            };
            // With index columns, a row on the active version is still
            // looked at: its index values may be under an older index key.
            if version == active && indexes.is_empty() {
                continue;
            }
            if wrapped_keys {
                let Ok(wrapped) = b64.decode(cipher_text) else {
                    failed += 1;
                    continue;
                };
                let context = row.context.as_deref().unwrap_or("").as_bytes();
                let moved = service
                    .rewrap_data_key(job.tenant_id, encryption, &wrapped, context, None)
                    .await;
                match moved {
                    Ok((rewrapped, version)) => writes.push((
                        row,
                        b64.encode(rewrapped),
                        version.to_string(),
                        "{}".to_string(),
                        Vec::new(),
                    )),
                    Err(
                        KeyError::DecryptionFailed
                        | KeyError::VersionNotFound
                        | KeyError::VersionDisabled
                        | KeyError::VersionDestroyed
                        | KeyError::VersionBelowMinimum,
                    ) => failed += 1,
                    Err(e) => return Err(key_error(e)),
                }
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
            let context = row.context.as_deref().unwrap_or("").as_bytes();
            let sealed = Sealed::new(version, nonce, &ciphertext).with_context(context);
            let moved =
                match move_row(service, job.tenant_id, encryption, sealed, active, indexes).await {
                    Ok(moved) => moved,
                    // A version id that is not one of this encryption's, an index
                    // the row's encryption does not have: the row's problem
                    // (counted), not the job's.
                    Err(
                        KeyError::DecryptionFailed
                        | KeyError::VersionNotFound
                        | KeyError::VersionDisabled
                        | KeyError::VersionDestroyed
                        | KeyError::VersionBelowMinimum
                        | KeyError::IndexNotFound,
                    ) => {
                        failed += 1;
                        continue;
                    }
                    Err(e) => return Err(key_error(e)),
                };
            let (cipher_text, version, metadata) = match moved.encrypted {
                Some(out) => (
                    b64.encode(&out.ciphertext),
                    out.version_id.to_string(),
                    match out.nonce {
                        Some(nonce) => serde_json::json!({"nonce": b64.encode(nonce)}),
                        // RSA-OAEP-256: the ciphertext carries all it needs.
                        None => serde_json::json!({}),
                    }
                    .to_string(),
                ),
                None => {
                    let current: Vec<Option<&str>> =
                        row.index_values.iter().map(Option::as_deref).collect();
                    let fresh: Vec<Option<&str>> = moved
                        .index_values
                        .iter()
                        .map(|v| Some(v.as_str()))
                        .collect();
                    if current == fresh {
                        continue;
                    }
                    // Same ciphertext, new index values.
                    (
                        cipher_text.to_string(),
                        row.version.clone().unwrap_or_default(),
                        row.metadata.clone().unwrap_or_default(),
                    )
                }
            };
            writes.push((row, cipher_text, version, metadata, moved.index_values));
        }
        // A job cancelled (or taken over) meanwhile writes nothing more.
        if !writes.is_empty()
            && !service
                .store()
                .job_is_held(job.id, owner)
                .await
                .map_err(store_error)?
        {
            tracing::info!(job_id = %job.id, "job cancelled or taken over; stopping");
            return Ok(());
        }
        if !writes.is_empty() {
            let written = db.swap_batch(&writes).await?;
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
            .map_err(store_error)?
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

/// What moving one row gives: its new ciphertext (`None`: it is on the
/// active version already) and its index columns' values under each index's
/// active version.
struct Moved {
    encrypted: Option<crate::domain::service::Encrypted>,
    index_values: Vec<String>,
}

/// Decrypts a row, encrypts it again under the active version if it is on
/// another, and computes its index values, with the plaintext held only in
/// memory cleared on drop inside this call.
async fn move_row(
    service: &KeyService,
    tenant: TenantId,
    encryption: EncryptionId,
    sealed: Sealed<'_>,
    active: VersionId,
    indexes: &[String],
) -> Result<Moved, KeyError> {
    if indexes.is_empty() {
        let out = service.rewrap(tenant, encryption, sealed, None).await?;
        return Ok(Moved {
            encrypted: Some(out),
            index_values: Vec::new(),
        });
    }
    let plaintext = service.decrypt(tenant, encryption, sealed, None).await?;
    let encrypted = if sealed.version == active {
        None
    } else {
        Some(
            service
                .encrypt(tenant, encryption, None, &plaintext, sealed.context, None)
                .await?,
        )
    };
    // Encrypt took a JSON string: its bytes are UTF-8.
    let text = std::str::from_utf8(&plaintext).map_err(|_| KeyError::DecryptionFailed)?;
    let which = IndexSelection {
        names: Some(indexes),
        all_versions: false,
    };
    let values = service
        .index_values(tenant, encryption, text, which, None)
        .await?;
    Ok(Moved {
        encrypted,
        index_values: values
            .into_iter()
            .map(|v| crate::crypto::hex(&v.value))
            .collect(),
    })
}

/// What a job reports rows under when their version column holds no version
/// id of their encryption: never the column's text, which the job's caller
/// did not write into Keyward and may not be meant to read back, nor a
/// version id of another encryption.
const UNRECOGNIZED: &str = "unrecognized";

/// What the end of a pass found: for each of the tenant's encryptions the job
/// saw (its one encryption always), rows by version id in canonical form (the
/// column's text may differ in case) or [`UNRECOGNIZED`], the active version
/// included; and which version was active.
struct Tally {
    rows: BTreeMap<String, BTreeMap<String, i64>>,
    active: BTreeMap<String, String>,
}

impl Tally {
    /// Rows not on their encryption's active version, by version id (what
    /// the job reports as `remainingByVersion`).
    fn remaining(&self) -> BTreeMap<String, i64> {
        let mut out = BTreeMap::new();
        for (encryption, versions) in &self.rows {
            let active = self.active.get(encryption);
            for (version, n) in versions {
                if Some(version) != active {
                    *out.entry(version.clone()).or_insert(0) += n;
                }
            }
        }
        out
    }
}

/// Counts the rows holding a ciphertext by encryption and version. Rows of
/// other tenants' encryptions, or of no encryption Keyward knows, are not the
/// job's business and not counted; rows without a ciphertext have nothing to
/// report.
async fn tally(service: &KeyService, job: &JobRow, db: &SourceTable) -> Result<Tally, RunError> {
    let histogram = db.histogram().await?;
    // Each encryption's active version and version ids; `None`: not the tenant's.
    let mut known: HashMap<EncryptionId, Option<(VersionId, HashSet<VersionId>)>> = HashMap::new();
    let mut tally = Tally {
        rows: BTreeMap::new(),
        active: BTreeMap::new(),
    };
    // A job over one encryption covers it even when the table holds no row.
    if let Some(e) = job.encryption_id {
        if let Some((active, _)) = versions_of(service, job.tenant_id, e, &mut known).await? {
            tally.active.insert(e.to_string(), active.to_string());
            tally.rows.insert(e.to_string(), BTreeMap::new());
        }
    }
    for (column, version, n) in histogram {
        let encryption = match (job.encryption_id, column) {
            (Some(e), _) => e,
            (None, Some(text)) => match text.parse::<EncryptionId>() {
                Ok(e) => e,
                Err(_) => continue,
            },
            (None, None) => continue,
        };
        let Some((active, ids)) =
            versions_of(service, job.tenant_id, encryption, &mut known).await?
        else {
            continue;
        };
        let key = match version.as_deref().map(str::parse::<VersionId>) {
            Some(Ok(v)) if ids.contains(&v) => v.to_string(),
            _ => UNRECOGNIZED.to_string(),
        };
        tally
            .active
            .insert(encryption.to_string(), active.to_string());
        *tally
            .rows
            .entry(encryption.to_string())
            .or_default()
            .entry(key)
            .or_insert(0) += n;
    }
    Ok(tally)
}

/// The active version and version ids of one of the tenant's encryptions
/// (`None`: not the tenant's), looked up once per job end.
async fn versions_of<'k>(
    service: &KeyService,
    tenant: TenantId,
    encryption: EncryptionId,
    known: &'k mut HashMap<EncryptionId, Option<(VersionId, HashSet<VersionId>)>>,
) -> Result<&'k Option<(VersionId, HashSet<VersionId>)>, RunError> {
    if let std::collections::hash_map::Entry::Vacant(slot) = known.entry(encryption) {
        let versions = match service.encryption_details(tenant, encryption).await {
            Ok(d) => Some((
                d.encryption.active_version_id,
                d.versions.iter().map(|v| v.id).collect(),
            )),
            Err(KeyError::EncryptionNotFound) => None,
            Err(e) => return Err(key_error(e)),
        };
        slot.insert(versions);
    }
    Ok(&known[&encryption])
}
