//! The `tenant_wrapping_keys` table: each tenant's RSA-OAEP key for
//! importing key material, its private half wrapped under a root KEK.

use sqlx::Row;

use super::pool::{Store, StoreError};
use super::sql::get_id;
use crate::domain::ids::{KekId, TenantId};

/// One tenant's import wrapping key as stored.
#[derive(Debug, Clone)]
pub struct WrappingKeyRow {
    /// The tenant.
    pub tenant_id: TenantId,
    /// The private key (PKCS#8 DER), wrapped under `kek_id`.
    pub wrapped_key: Vec<u8>,
    /// The root KEK that wraps it.
    pub kek_id: KekId,
    /// The public key, SubjectPublicKeyInfo DER.
    pub public_key: Vec<u8>,
    /// Creation time (Unix ms).
    pub created_at: i64,
}

fn from_row(r: &sqlx::any::AnyRow) -> Result<WrappingKeyRow, StoreError> {
    Ok(WrappingKeyRow {
        tenant_id: get_id(r, "tenant_id", "tenant_wrapping_keys")?,
        wrapped_key: r.try_get("wrapped_key")?,
        kek_id: get_id(r, "kek_id", "tenant_wrapping_keys")?,
        public_key: r.try_get("public_key")?,
        created_at: r.try_get("created_at")?,
    })
}

const COLUMNS: &str = "tenant_id, wrapped_key, kek_id, public_key, created_at";

impl Store {
    /// The tenant's wrapping key, if it has one.
    pub async fn wrapping_key(
        &self,
        tenant: TenantId,
    ) -> Result<Option<WrappingKeyRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM tenant_wrapping_keys WHERE tenant_id = $1");
        sqlx::query(&sql)
            .bind(tenant.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(from_row)
            .transpose()
    }

    /// Stores the tenant's wrapping key unless it has one already (two
    /// replicas making one at once: the first stays; read it back).
    pub async fn insert_wrapping_key(&self, row: &WrappingKeyRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tenant_wrapping_keys (tenant_id, wrapped_key, kek_id, public_key, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id) DO NOTHING",
        )
        .bind(row.tenant_id.to_string())
        .bind(&row.wrapped_key)
        .bind(row.kek_id.to_string())
        .bind(&row.public_key)
        .bind(row.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The wrapping keys wrapped under root KEK `kek`.
    pub async fn wrapping_keys_wrapped_by(
        &self,
        kek: KekId,
    ) -> Result<Vec<WrappingKeyRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM tenant_wrapping_keys WHERE kek_id = $1");
        sqlx::query(&sql)
            .bind(kek.to_string())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(from_row)
            .collect()
    }

    /// Moves one wrapping key from root KEK `old` to `new`, compare-and-swap
    /// on the old wrapped bytes. `false` if it changed meanwhile.
    pub async fn rewrap_wrapping_key(
        &self,
        tenant: TenantId,
        old: KekId,
        old_wrapped: &[u8],
        new: KekId,
        new_wrapped: &[u8],
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE tenant_wrapping_keys SET wrapped_key = $1, kek_id = $2 \
             WHERE tenant_id = $3 AND kek_id = $4 AND wrapped_key = $5",
        )
        .bind(new_wrapped)
        .bind(new.to_string())
        .bind(tenant.to_string())
        .bind(old.to_string())
        .bind(old_wrapped)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }
}
