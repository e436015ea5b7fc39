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
}

impl Store {
    /// Inserts a tenant; a taken name is [`StoreError::Conflict`].
    pub async fn insert_tenant(&self, tenant: &TenantRow) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO tenants (id, name, created_at) VALUES ($1, $2, $3)")
            .bind(tenant.id.to_string())
            .bind(&tenant.name)
            .bind(tenant.created_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The tenant with this id, if any.
    pub async fn tenant(&self, id: TenantId) -> Result<Option<TenantRow>, StoreError> {
        let row = sqlx::query("SELECT id, name, created_at FROM tenants WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok(TenantRow {
                id: get_id(&r, "id", "tenants")?,
                name: r.try_get("name")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .transpose()
    }
}
