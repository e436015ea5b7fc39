//! What the HTTP layer reads besides keys: jobs, root-KEK status, audit
//! records, readiness and the figures `/metrics` shows. Handlers go through
//! these rather than the store, so that a store change stays below the domain.

use super::state::KeyService;
use crate::domain::error::KeyError;
use crate::domain::ids::{KekId, TenantId};
use crate::domain::records::{AuditLine, AuditQuery, JobRow};
use crate::domain::states::KekState;
use crate::domain::time::now_ms;
use crate::store::JobTotals;

/// One root KEK as the status endpoint shows it.
#[derive(Debug, Clone)]
pub struct RootKekInfo {
    /// Its id.
    pub id: KekId,
    /// Active or retiring.
    pub state: KekState,
    /// The master-key provider that wraps it.
    pub provider: String,
    /// How many key versions it wraps.
    pub versions: i64,
    /// For a retiring KEK: why the last re-wrap of its versions stopped.
    pub rewrap_error: Option<String>,
}

impl KeyService {
    /// The root KEKs, the active one first, with how many versions each wraps.
    pub async fn root_kek_status(&self) -> Result<Vec<RootKekInfo>, KeyError> {
        let keks = self.store.root_keks().await?;
        let counts = self.store.versions_per_kek().await?;
        let out: Vec<RootKekInfo> = keks
            .into_iter()
            .map(|k| RootKekInfo {
                versions: counts
                    .iter()
                    .find(|(id, _)| *id == k.id)
                    .map(|(_, n)| *n)
                    .unwrap_or(0),
                id: k.id,
                state: k.state,
                provider: k.provider,
                rewrap_error: k.rewrap_error,
            })
            .collect();
        Ok(out)
    }

    /// One of the tenant's jobs.
    pub async fn job(&self, tenant: TenantId, id: uuid::Uuid) -> Result<Option<JobRow>, KeyError> {
        Ok(self.store.job(tenant, id).await?)
    }

    /// The tenant's newest jobs.
    pub async fn jobs(&self, tenant: TenantId, limit: u32) -> Result<Vec<JobRow>, KeyError> {
        Ok(self.store.jobs(tenant, limit).await?)
    }

    /// Cancels one of the tenant's queued or running jobs (rows already moved
    /// stay moved) and returns it as it is now; `None` if there is no such job.
    pub async fn cancel_job(
        &self,
        tenant: TenantId,
        id: uuid::Uuid,
    ) -> Result<Option<JobRow>, KeyError> {
        if self.store.cancel_job(tenant, id, now_ms()).await?.is_none() {
            return Ok(None);
        }
        self.job(tenant, id).await
    }

    /// Stored audit records matching `query`, newest first, as (position, line).
    pub async fn audit_records(&self, query: &AuditQuery) -> Result<Vec<AuditLine>, KeyError> {
        Ok(self.store.audit_records(query).await?)
    }

    /// Whether the database answers (for readiness).
    pub async fn check_database(&self) -> Result<(), KeyError> {
        Ok(self.store.ping().await?)
    }

    /// Key versions per state, for `/metrics`.
    pub async fn versions_per_state(&self) -> Result<Vec<(String, i64)>, KeyError> {
        Ok(self.store.versions_per_state().await?)
    }

    /// Jobs of every tenant per state, progress summed, for `/metrics`.
    pub async fn jobs_per_state(&self) -> Result<Vec<JobTotals>, KeyError> {
        Ok(self.store.jobs_per_state().await?)
    }

    /// Keyward-issued client certificates that are live (not revoked, not
    /// expired) and still bound to their API key, and how many of them
    /// expire within `warning`: for `/metrics`, counts only.
    pub async fn bound_client_certificates(
        &self,
        warning: std::time::Duration,
    ) -> Result<(i64, i64), KeyError> {
        let now = crate::domain::time::now_ms();
        let soon = now.saturating_add(i64::try_from(warning.as_millis()).unwrap_or(i64::MAX));
        Ok(self.store.bound_client_certificates(now, soon).await?)
    }

    /// Up to `limit` Keyward-issued client certificates after `after`
    /// (issued at, serial), oldest first; with `live_only`, neither revoked
    /// nor expired.
    pub async fn client_certificates(
        &self,
        after: Option<(i64, &str)>,
        live_only: bool,
        limit: i64,
    ) -> Result<Vec<crate::store::ClientCertRow>, KeyError> {
        Ok(self
            .store
            .client_certificates(after, live_only, crate::domain::time::now_ms(), limit)
            .await?)
    }
}
