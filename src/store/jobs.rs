//! The `jobs` table: re-encryption jobs, their progress and their lease.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::events::db_now_ms;
use super::pool::{Store, StoreError};
use super::sql::{get_id, get_opt_id, get_state};
use crate::domain::ids::{EncryptionId, KekId, TenantId};
pub use crate::domain::records::JobRow;
use crate::domain::states::JobState;

const COLUMNS: &str = "id, tenant_id, kind, encryption_id, source_sealed, source_kek_id, max_rows_per_second, state, cursor, pass, processed, rewrapped, skipped, failed, total, rows_per_second, remaining_by_version, target, error, started_at, finished_at, created_at";

fn from_row(r: &AnyRow) -> Result<JobRow, StoreError> {
    Ok(JobRow {
        id: get_id::<uuid::Uuid>(r, "id", "jobs")?,
        tenant_id: get_id(r, "tenant_id", "jobs")?,
        kind: r.try_get("kind")?,
        encryption_id: get_opt_id(r, "encryption_id", "jobs")?,
        source_sealed: r.try_get("source_sealed")?,
        source_kek_id: get_id(r, "source_kek_id", "jobs")?,
        max_rows_per_second: r.try_get("max_rows_per_second")?,
        state: get_state(r, "state", "jobs", JobState::parse)?,
        cursor: r.try_get("cursor")?,
        pass: r.try_get("pass")?,
        processed: r.try_get("processed")?,
        rewrapped: r.try_get("rewrapped")?,
        skipped: r.try_get("skipped")?,
        failed: r.try_get("failed")?,
        total: r.try_get("total")?,
        rows_per_second: r.try_get("rows_per_second")?,
        remaining_by_version: r.try_get("remaining_by_version")?,
        target: r.try_get("target")?,
        error: r.try_get("error")?,
        started_at: r.try_get("started_at")?,
        finished_at: r.try_get("finished_at")?,
        created_at: r.try_get("created_at")?,
    })
}

/// What one finished job found, for the destroy guard.
#[derive(Debug, Clone)]
pub struct JobEvidence {
    /// The job's one encryption, or `None` for a per-row job.
    pub encryption_id: Option<EncryptionId>,
    /// Which source table it walked (`None`: a job from before migration 0011).
    pub target: Option<String>,
    /// JSON `{encryptionId: {versionId: rows}}`, the active version included
    /// (`None`: a job from before migration 0011).
    pub rows_by_version: Option<String>,
    /// JSON `{versionId: rows}` on old versions (what older jobs left).
    pub remaining_by_version: Option<String>,
    /// When it finished (Unix ms; the database's clock since migration 0011).
    pub finished_ms: Option<i64>,
}

/// The jobs in one state, with their progress summed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobTotals {
    /// The state's name.
    pub state: String,
    /// How many jobs are in it.
    pub jobs: i64,
    /// Rows they looked at.
    pub processed: i64,
    /// Rows their tables had when counted (0 where not yet counted).
    pub total: i64,
    /// Their current rates, added up.
    pub rows_per_second: i64,
}

/// Progress to record after a batch.
#[derive(Debug, Clone, Copy)]
pub struct JobProgress<'a> {
    /// Last key handled.
    pub cursor: Option<&'a str>,
    /// Pass number.
    pub pass: i64,
    /// Rows looked at (added).
    pub processed: i64,
    /// Rows moved (added).
    pub rewrapped: i64,
    /// Rows skipped (added).
    pub skipped: i64,
    /// Rows failed (added).
    pub failed: i64,
    /// Current rate.
    pub rows_per_second: i64,
}

impl Store {
    /// Inserts a queued job.
    pub async fn insert_job(&self, job: &JobRow) -> Result<(), StoreError> {
        let _turn = self.write_turn().await?;
        sqlx::query(
            "INSERT INTO jobs (id, tenant_id, kind, encryption_id, source_sealed, source_kek_id, max_rows_per_second, state, created_at, updated_at, target) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'queued', $8, $8, $9)",
        )
        .bind(job.id.to_string())
        .bind(job.tenant_id.to_string())
        .bind(&job.kind)
        .bind(job.encryption_id.map(|e| e.to_string()))
        .bind(&job.source_sealed)
        .bind(job.source_kek_id.to_string())
        .bind(job.max_rows_per_second)
        .bind(job.created_at)
        .bind(job.target.as_deref())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The tenant's job.
    pub async fn job(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
    ) -> Result<Option<JobRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = $1 AND tenant_id = $2");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .bind(tenant.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// The tenant's most recent jobs.
    pub async fn jobs(&self, tenant: TenantId, limit: u32) -> Result<Vec<JobRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM jobs WHERE tenant_id = $1 ORDER BY created_at DESC, id LIMIT $2"
        );
        sqlx::query(&sql)
            .bind(tenant.to_string())
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(from_row)
            .collect()
    }

    /// Takes the lease of one runnable job (queued, or running with an expired
    /// lease), oldest first, of a tenant not in `busy_tenants` and not one of
    /// `running` (jobs this runner already works on, whose lease may have run
    /// out while a statement hangs). The lease condition is in the outer WHERE
    /// too, so that of two replicas racing for the same job only one gets it.
    pub async fn claim_job(
        &self,
        owner: &str,
        now_ms: i64,
        lease_ms: i64,
        busy_tenants: &[TenantId],
        running: &[uuid::Uuid],
    ) -> Result<Option<JobRow>, StoreError> {
        let _turn = self.write_turn().await?;
        let list = |from: usize, n: usize| {
            (from..from + n)
                .map(|i| format!("${i}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut exclude = String::new();
        if !busy_tenants.is_empty() {
            exclude += &format!(" AND tenant_id NOT IN ({})", list(4, busy_tenants.len()));
        }
        if !running.is_empty() {
            exclude += &format!(
                " AND id NOT IN ({})",
                list(4 + busy_tenants.len(), running.len())
            );
        }
        let sql = format!(
            "UPDATE jobs SET lease_owner = $1, lease_until = $2, state = 'running', \
             started_at = COALESCE(started_at, $3), updated_at = $3 \
             WHERE id = (SELECT id FROM jobs WHERE state IN ('queued', 'running') \
                         AND (lease_until IS NULL OR lease_until < $3){exclude} \
                         AND tenant_id NOT IN (SELECT id FROM tenants WHERE disabled_at IS NOT NULL) \
                         ORDER BY created_at LIMIT 1) \
             AND state IN ('queued', 'running') AND (lease_until IS NULL OR lease_until < $3) \
             RETURNING {COLUMNS}"
        );
        let mut q = sqlx::query(&sql)
            .bind(owner)
            .bind(now_ms + lease_ms)
            .bind(now_ms);
        for t in busy_tenants {
            q = q.bind(t.to_string());
        }
        for j in running {
            q = q.bind(j.to_string());
        }
        let row = q.fetch_optional(&self.pool).await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Records progress and renews the lease. `false` when the lease is lost or
    /// the job was cancelled: the runner must stop.
    pub async fn record_job_progress(
        &self,
        id: uuid::Uuid,
        owner: &str,
        p: JobProgress<'_>,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await?;
        let n = sqlx::query(
            "UPDATE jobs SET cursor = $1, pass = $2, processed = processed + $3, rewrapped = rewrapped + $4, \
             skipped = skipped + $5, failed = failed + $6, rows_per_second = $7, lease_until = $8, updated_at = $9 \
             WHERE id = $10 AND lease_owner = $11 AND state = 'running'",
        )
        .bind(p.cursor)
        .bind(p.pass)
        .bind(p.processed)
        .bind(p.rewrapped)
        .bind(p.skipped)
        .bind(p.failed)
        .bind(p.rows_per_second)
        .bind(now_ms + lease_ms)
        .bind(now_ms)
        .bind(id.to_string())
        .bind(owner)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Whether `owner` still holds the running job (not cancelled, not taken over).
    pub async fn job_is_held(&self, id: uuid::Uuid, owner: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query(
            "SELECT 1 FROM jobs WHERE id = $1 AND lease_owner = $2 AND state = 'running'",
        )
        .bind(id.to_string())
        .bind(owner)
        .fetch_optional(&self.pool)
        .await?
        .is_some())
    }

    /// Sets the row count in scope (once, at the first start).
    pub async fn set_job_total(&self, id: uuid::Uuid, total: i64) -> Result<(), StoreError> {
        let _turn = self.write_turn().await?;
        sqlx::query("UPDATE jobs SET total = $1 WHERE id = $2 AND total IS NULL")
            .bind(total)
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Ends a job this runner holds; `found` is (`remaining_by_version`,
    /// `rows_by_version`) of a job that succeeded. Stamped with the database's
    /// clock too ([`Store::job_evidence`] orders by it).
    pub async fn finish_job(
        &self,
        id: uuid::Uuid,
        owner: &str,
        state: JobState,
        found: Option<(&str, &str)>,
        error: Option<&str>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await?;
        let sql = format!(
            "UPDATE jobs SET state = $1, remaining_by_version = COALESCE($2, remaining_by_version), \
             rows_by_version = COALESCE($7, rows_by_version), error = $3, \
             finished_at = $4, finished_db_ms = {}, updated_at = $4, lease_owner = NULL, lease_until = NULL \
             WHERE id = $5 AND lease_owner = $6 AND state = 'running'",
            db_now_ms(self.backend)
        );
        let n = sqlx::query(&sql)
            .bind(state.as_str())
            .bind(found.map(|f| f.0))
            .bind(error)
            .bind(now_ms)
            .bind(id.to_string())
            .bind(owner)
            .bind(found.map(|f| f.1))
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    /// Cancels a queued or running job. `None` if the tenant has no such job;
    /// otherwise its state afterwards.
    pub async fn cancel_job(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
        now_ms: i64,
    ) -> Result<Option<JobState>, StoreError> {
        let _turn = self.write_turn().await?;
        sqlx::query(
            "UPDATE jobs SET state = 'cancelled', finished_at = $1, updated_at = $1, lease_owner = NULL, lease_until = NULL \
             WHERE id = $2 AND tenant_id = $3 AND state IN ('queued', 'running')",
        )
        .bind(now_ms)
        .bind(id.to_string())
        .bind(tenant.to_string())
        .execute(&self.pool)
        .await?;
        Ok(self.job(tenant, id).await?.map(|j| j.state))
    }

    /// What the succeeded jobs of `tenant` that may cover `encryption` found
    /// (its own jobs and the tenant's per-row jobs), the last finished first
    /// by the database's clock. The destroy guard decides which count.
    pub async fn job_evidence(
        &self,
        tenant: TenantId,
        encryption: EncryptionId,
    ) -> Result<Vec<JobEvidence>, StoreError> {
        let rows = sqlx::query(
            "SELECT encryption_id, target, rows_by_version, remaining_by_version, \
             COALESCE(finished_db_ms, finished_at) AS finished FROM jobs \
             WHERE tenant_id = $1 AND state = 'succeeded' \
             AND (encryption_id = $2 OR encryption_id IS NULL) \
             ORDER BY COALESCE(finished_db_ms, finished_at) DESC, id DESC",
        )
        .bind(tenant.to_string())
        .bind(encryption.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(JobEvidence {
                    encryption_id: get_opt_id(r, "encryption_id", "jobs")?,
                    target: r.try_get("target")?,
                    rows_by_version: r.try_get("rows_by_version")?,
                    remaining_by_version: r.try_get("remaining_by_version")?,
                    finished_ms: r.try_get("finished")?,
                })
            })
            .collect()
    }

    /// Jobs of every tenant per state, with their progress summed (for
    /// metrics). One row per state that has jobs.
    pub async fn jobs_per_state(&self) -> Result<Vec<JobTotals>, StoreError> {
        sqlx::query(
            "SELECT state, COUNT(*) AS jobs, \
                 CAST(COALESCE(SUM(processed), 0) AS BIGINT) AS processed, \
                 CAST(COALESCE(SUM(total), 0) AS BIGINT) AS total, \
                 CAST(COALESCE(SUM(rows_per_second), 0) AS BIGINT) AS rate \
             FROM jobs GROUP BY state",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(JobTotals {
                state: r.try_get("state")?,
                jobs: r.try_get("jobs")?,
                processed: r.try_get("processed")?,
                total: r.try_get("total")?,
                rows_per_second: r.try_get("rate")?,
            })
        })
        .collect()
    }

    /// How many key versions are in each state (for metrics).
    pub async fn versions_per_state(&self) -> Result<Vec<(String, i64)>, StoreError> {
        sqlx::query("SELECT state, COUNT(*) AS n FROM encryption_key_versions GROUP BY state")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("state")?, r.try_get("n")?)))
            .collect()
    }

    /// Jobs whose source is sealed by `kek` (re-sealed by a KEK rotation).
    pub async fn jobs_sealed_by(
        &self,
        kek: KekId,
    ) -> Result<Vec<(uuid::Uuid, Vec<u8>)>, StoreError> {
        let rows = sqlx::query("SELECT id, source_sealed FROM jobs WHERE source_kek_id = $1")
            .bind(kek.to_string())
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    get_id::<uuid::Uuid>(r, "id", "jobs")?,
                    r.try_get("source_sealed")?,
                ))
            })
            .collect()
    }

    /// Re-seals one job's source (compare-and-swap on the old bytes).
    pub async fn reseal_job(
        &self,
        id: uuid::Uuid,
        old: &[u8],
        new: &[u8],
        kek: KekId,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await?;
        sqlx::query("UPDATE jobs SET source_sealed = $1, source_kek_id = $2 WHERE id = $3 AND source_sealed = $4")
            .bind(new)
            .bind(kek.to_string())
            .bind(id.to_string())
            .bind(old)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
