//! The `api_keys` table.

use sqlx::Row;

use super::pool::{Store, StoreError};
use super::sql::get_id;
use crate::domain::ids::TenantId;

/// One API key as stored: the secret only as its SHA-256 digest.
#[derive(Debug, Clone)]
pub struct ApiKeyRow {
    /// The public key id (`X-Api-Key`).
    pub id: String,
    /// The tenant it acts for.
    pub tenant_id: TenantId,
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

const COLUMNS: &str =
    "id, tenant_id, secret_sha256, scopes, cert_spki_sha256, created_at, revoked_at";

fn from_row(r: &sqlx::any::AnyRow) -> Result<ApiKeyRow, StoreError> {
    Ok(ApiKeyRow {
        id: r.try_get("id")?,
        tenant_id: get_id(r, "tenant_id", "api_keys")?,
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
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, secret_sha256, scopes, cert_spki_sha256, created_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&key.id)
        .bind(key.tenant_id.to_string())
        .bind(&key.secret_sha256)
        .bind(&key.scopes)
        .bind(&key.cert_spki_sha256)
        .bind(key.created_at)
        .bind(key.revoked_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The API key with this id, revoked or not.
    pub async fn api_key(&self, id: &str) -> Result<Option<ApiKeyRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM api_keys WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Marks a key revoked and announces it to every cache. `false` if there is no
    /// such key or it was already revoked.
    pub async fn revoke_api_key(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let done =
            sqlx::query("UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
                .bind(now_ms)
                .bind(id)
                .execute(&mut *tx)
                .await?
                .rows_affected()
                == 1;
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
