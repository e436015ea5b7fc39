//! The `api_keys` table.

use sqlx::Row;

use super::pool::{Backend, Store, StoreError};
use super::sql::get_opt_id;
use crate::domain::ids::TenantId;

/// One API key as stored: the secret only as its SHA-256 digest.
#[derive(Debug, Clone)]
pub struct ApiKeyRow {
    /// The public key id (`X-Api-Key`).
    pub id: String,
    /// The tenant it acts for; `None`: an operator key.
    pub tenant_id: Option<TenantId>,
    /// SHA-256 of the secret.
    pub secret_sha256: Vec<u8>,
    /// Comma-separated scopes.
    pub scopes: String,
    /// SHA-256 of the bound client certificate's SubjectPublicKeyInfo, if bound.
    pub cert_spki_sha256: Option<Vec<u8>>,
    /// Creation time (Unix ms).
    pub created_at: i64,
    /// Revocation time (Unix ms), if revoked.
    pub revoked_at: Option<i64>,
}

/// An API key as authentication reads it: the row, and whether its tenant is
/// disabled (which makes the key unusable like a revocation does).
#[derive(Debug, Clone)]
pub struct ApiKeyLookup {
    /// The key.
    pub key: ApiKeyRow,
    /// Whether the key's tenant is disabled (always `false` for an operator key).
    pub tenant_disabled: bool,
}

const COLUMNS: &str =
    "k.id, k.tenant_id, k.secret_sha256, k.scopes, k.cert_spki_sha256, k.created_at, k.revoked_at";

fn from_row(r: &sqlx::any::AnyRow) -> Result<ApiKeyRow, StoreError> {
    Ok(ApiKeyRow {
        id: r.try_get("id")?,
        tenant_id: get_opt_id(r, "tenant_id", "api_keys")?,
        secret_sha256: r.try_get("secret_sha256")?,
        scopes: r.try_get("scopes")?,
        cert_spki_sha256: r.try_get("cert_spki_sha256")?,
        created_at: r.try_get("created_at")?,
        revoked_at: r.try_get("revoked_at")?,
    })
}

impl Store {
    /// Inserts an API key.
    pub async fn insert_api_key(&self, key: &ApiKeyRow) -> Result<(), StoreError> {
        let _turn = self.write_turn().await?;
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, secret_sha256, scopes, cert_spki_sha256, created_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&key.id)
        .bind(key.tenant_id.map(|t| t.to_string()))
        .bind(&key.secret_sha256)
        .bind(&key.scopes)
        .bind(&key.cert_spki_sha256)
        .bind(key.created_at)
        .bind(key.revoked_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Inserts a tenant's API key unless the tenant already has `max_live`
    /// keys that are not revoked; `false` (nothing inserted) if it has.
    ///
    /// The count and the insert are one statement in one transaction, and on
    /// PostgreSQL the tenant's row is locked first, so concurrent creations
    /// (on any replica) cannot together pass the bound: SQLite runs one
    /// writing statement at a time, PostgreSQL queues them on the row lock.
    pub async fn insert_tenant_api_key_within(
        &self,
        key: &ApiKeyRow,
        tenant: TenantId,
        max_live: i64,
    ) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await?;
        let tenant = tenant.to_string();
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT id FROM tenants WHERE id = $1 FOR UPDATE")
                .bind(&tenant)
                .fetch_optional(&mut *tx)
                .await?;
        }
        let inserted = sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, secret_sha256, scopes, cert_spki_sha256, created_at, revoked_at) \
             SELECT $1, $2, $3, $4, $5, $6, $7 \
             WHERE (SELECT COUNT(*) FROM api_keys WHERE tenant_id = $2 AND revoked_at IS NULL) < $8",
        )
        .bind(&key.id)
        .bind(&tenant)
        .bind(&key.secret_sha256)
        .bind(&key.scopes)
        .bind(&key.cert_spki_sha256)
        .bind(key.created_at)
        .bind(key.revoked_at)
        .bind(max_live)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        tx.commit().await?;
        Ok(inserted)
    }

    /// The API key with this id, revoked or not, with its tenant's state.
    pub async fn api_key(&self, id: &str) -> Result<Option<ApiKeyLookup>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS}, t.disabled_at AS tenant_disabled_at FROM api_keys k \
             LEFT JOIN tenants t ON t.id = k.tenant_id WHERE k.id = $1"
        );
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref()
            .map(|r| {
                let disabled: Option<i64> = r.try_get("tenant_disabled_at")?;
                Ok(ApiKeyLookup {
                    key: from_row(r)?,
                    tenant_disabled: disabled.is_some(),
                })
            })
            .transpose()
    }

    /// Up to `limit` API keys of `tenant` (`None`: operator keys), revoked or
    /// not, oldest first (by creation, then id), after the key that was
    /// created at `after.0` with id `after.1` (keyset pagination: a page costs
    /// the same however deep it is, and keys created meanwhile are not
    /// skipped).
    pub async fn api_keys_of(
        &self,
        tenant: Option<TenantId>,
        after: Option<(i64, &str)>,
        limit: i64,
    ) -> Result<Vec<ApiKeyRow>, StoreError> {
        let owner = match tenant {
            Some(_) => "k.tenant_id = $1",
            None => "k.tenant_id IS NULL AND $1 IS NULL",
        };
        let (after_ms, after_id) = match after {
            Some((ms, id)) => (Some(ms), Some(id)),
            None => (None, None),
        };
        // Spelled out rather than as a row comparison, which SQLite and
        // PostgreSQL both accept but plan less predictably with NULLs.
        let sql = format!(
            "SELECT {COLUMNS} FROM api_keys k WHERE {owner} \
             AND ($2 IS NULL OR k.created_at > $2 OR (k.created_at = $2 AND k.id > $3)) \
             ORDER BY k.created_at, k.id LIMIT $4"
        );
        let rows = sqlx::query(&sql)
            .bind(tenant.map(|t| t.to_string()))
            .bind(after_ms)
            .bind(after_id)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(from_row).collect()
    }

    /// Marks a key revoked and announces it to every cache. With `tenant`,
    /// only a key of that tenant. `false` if there is no such live key.
    pub async fn revoke_api_key(
        &self,
        id: &str,
        tenant: Option<TenantId>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await?;
        let mut tx = self.pool.begin().await?;
        let query = match tenant {
            None => sqlx::query(
                "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
            )
            .bind(now_ms)
            .bind(id),
            Some(t) => sqlx::query(
                "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL \
                 AND tenant_id = $3",
            )
            .bind(now_ms)
            .bind(id)
            .bind(t.to_string()),
        };
        let done = query.execute(&mut *tx).await?.rows_affected() == 1;
        super::events::commit_change(
            tx,
            self.backend,
            done,
            super::events::EventKind::ApiKeyChanged,
            id,
        )
        .await
    }
}
