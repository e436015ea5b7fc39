//! The `root_keks` table.

use sqlx::Row;

use super::{get_id, Store, StoreError};
use crate::domain::KekId;

/// One root KEK, wrapped by the master-key provider named in `provider`.
#[derive(Debug, Clone)]
pub struct RootKekRow {
    /// Its id, bound into the wrapping's associated data.
    pub id: KekId,
    /// The provider that wrapped it (`env`, ...).
    pub provider: String,
    /// The wrapped key bytes (provider-specific format).
    pub wrapped_key: Vec<u8>,
    /// `active` or `retiring`.
    pub state: String,
    /// Creation time (Unix ms).
    pub created_at: i64,
}

impl Store {
    /// Every root KEK still in use, the active one first.
    pub async fn root_keks(&self) -> Result<Vec<RootKekRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, provider, wrapped_key, state, created_at FROM root_keks \
             ORDER BY CASE state WHEN 'active' THEN 0 ELSE 1 END, created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RootKekRow {
                    id: get_id(r, "id", "root_keks")?,
                    provider: r.try_get("provider")?,
                    wrapped_key: r.try_get("wrapped_key")?,
                    state: r.try_get("state")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// Inserts the first root KEK as active. When another process won the race,
    /// returns [`StoreError::Conflict`] (the unique index on the active state).
    pub async fn insert_active_root_kek(&self, kek: &RootKekRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO root_keks (id, provider, wrapped_key, state, created_at) \
             VALUES ($1, $2, $3, 'active', $4)",
        )
        .bind(kek.id.to_string())
        .bind(&kek.provider)
        .bind(&kek.wrapped_key)
        .bind(kek.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
