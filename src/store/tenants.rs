//! The `tenants` table.

use sqlx::Row;

use super::pool::{Store, StoreError};
use super::sql::get_id;
use crate::domain::ids::TenantId;

/// One tenant.
#[derive(Debug, Clone)]
pub struct TenantRow {
    /// Its id.
    pub id: TenantId,
    /// Its unique name.
    pub name: String,
    /// When it was created (Unix ms).
    pub created_at: i64,
    /// When it was disabled (Unix ms); its API keys then stop working.
    pub disabled_at: Option<i64>,
}

const COLUMNS: &str = "id, name, created_at, disabled_at";

fn from_row(r: &sqlx::any::AnyRow) -> Result<TenantRow, StoreError> {
    Ok(TenantRow {
        id: get_id(r, "id", "tenants")?,
        name: r.try_get("name")?,
        created_at: r.try_get("created_at")?,
        disabled_at: r.try_get("disabled_at")?,
    })
}

impl Store {
    /// Inserts a tenant; a taken name is [`StoreError::Conflict`].
    pub async fn insert_tenant(&self, tenant: &TenantRow) -> Result<(), StoreError> {
        let _turn = self.write_turn().await?;
        sqlx::query(
            "INSERT INTO tenants (id, name, created_at, disabled_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(tenant.id.to_string())
        .bind(&tenant.name)
        .bind(tenant.created_at)
        .bind(tenant.disabled_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The tenant with this id, if any.
    pub async fn tenant(&self, id: TenantId) -> Result<Option<TenantRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM tenants WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Up to `limit` tenants created after the one with id `after` (keyset
    /// pagination by creation, then id), oldest first.
    pub async fn tenants(
        &self,
        after: Option<TenantId>,
        limit: i64,
    ) -> Result<Vec<TenantRow>, StoreError> {
        let rows = match after {
            None => {
                let sql = format!("SELECT {COLUMNS} FROM tenants ORDER BY created_at, id LIMIT $1");
                sqlx::query(&sql).bind(limit).fetch_all(&self.pool).await?
            }
            Some(after) => {
                let sql = format!(
                    "SELECT {COLUMNS} FROM tenants t WHERE (t.created_at, t.id) > \
                     (SELECT created_at, id FROM tenants WHERE id = $1) \
                     ORDER BY created_at, id LIMIT $2"
                );
                sqlx::query(&sql)
                    .bind(after.to_string())
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(from_row).collect()
    }

    /// Disables a tenant and announces it, so every process drops the cached
    /// API keys of the tenant. `false` if there is no such tenant or it was
    /// already disabled.
    pub async fn disable_tenant(&self, id: TenantId, now_ms: i64) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await?;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE tenants SET disabled_at = $1 WHERE id = $2 AND disabled_at IS NULL",
        )
        .bind(now_ms)
        .bind(id.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        super::events::commit_change(
            tx,
            self.backend,
            done,
            super::events::EventKind::TenantChanged,
            &id.to_string(),
        )
        .await
    }
}
