//! The `blind_indexes` and `blind_index_versions` tables: each encryption's
//! blind-index definitions and the versions of their keys (derived on use,
//! never stored; a row names the key version they are derived from).

use std::collections::BTreeMap;

use sqlx::Row;

use super::events::{commit_change, EventKind};
use super::pool::{Store, StoreError};
use super::sql::get_id;
use crate::domain::ids::{EncryptionId, TenantId, VersionId};
pub use crate::domain::records::{BlindIndexRow, BlindIndexVersionRow};

/// What a change to a blind index found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexChange {
    /// Done.
    Done,
    /// The tenant has no such encryption.
    NoEncryption,
    /// The encryption has no index of that name.
    NoIndex,
    /// An index of that name exists already (create), or another change came
    /// first (the caller may retry).
    Conflict,
}

impl Store {
    /// Every blind index of the encryption with its versions, by name.
    pub async fn blind_indexes(&self, id: EncryptionId) -> Result<Vec<BlindIndexRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, bits, normalizations, active_version, min_version, created_at, updated_at \
             FROM blind_indexes WHERE encryption_id = $1 ORDER BY name",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        let mut out: BTreeMap<String, BlindIndexRow> = BTreeMap::new();
        for r in rows {
            let name: String = r.try_get("name")?;
            out.insert(
                name.clone(),
                BlindIndexRow {
                    encryption_id: id,
                    name,
                    bits: r.try_get("bits")?,
                    normalizations: r.try_get("normalizations")?,
                    active_version: r.try_get("active_version")?,
                    min_version: r.try_get("min_version")?,
                    created_at: r.try_get("created_at")?,
                    updated_at: r.try_get("updated_at")?,
                    versions: Vec::new(),
                },
            );
        }
        if out.is_empty() {
            return Ok(Vec::new());
        }
        // Read after the definitions: a rotation between the two reads adds a
        // version row and never removes one, so every active version read
        // above has its row here.
        let versions = sqlx::query(
            "SELECT name, version, anchor_version_id, created_at FROM blind_index_versions \
             WHERE encryption_id = $1 ORDER BY name, version",
        )
        .bind(id.to_string())
        .fetch_all(&self.pool)
        .await?;
        for r in versions {
            let name: String = r.try_get("name")?;
            if let Some(index) = out.get_mut(&name) {
                index.versions.push(BlindIndexVersionRow {
                    version: r.try_get("version")?,
                    anchor_version_id: get_id(&r, "anchor_version_id", "blind_index_versions")?,
                    created_at: r.try_get("created_at")?,
                });
            }
        }
        Ok(out.into_values().collect())
    }

    /// Creates a blind index with its first version, anchored at `anchor`.
    pub async fn insert_blind_index(
        &self,
        tenant: TenantId,
        index: &BlindIndexRow,
        anchor: VersionId,
    ) -> Result<IndexChange, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Takes the encryption row's lock (PostgreSQL) or the write lock
        // (SQLite): index changes of one encryption run one after the other.
        let owned =
            sqlx::query("UPDATE encryptions SET updated_at = $1 WHERE id = $2 AND tenant_id = $3")
                .bind(index.created_at)
                .bind(index.encryption_id.to_string())
                .bind(tenant.to_string())
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if owned != 1 {
            return Ok(IndexChange::NoEncryption);
        }
        let exists =
            sqlx::query("SELECT 1 FROM blind_indexes WHERE encryption_id = $1 AND name = $2")
                .bind(index.encryption_id.to_string())
                .bind(&index.name)
                .fetch_optional(&mut *tx)
                .await?;
        if exists.is_some() {
            return Ok(IndexChange::Conflict);
        }
        sqlx::query(
            "INSERT INTO blind_indexes (encryption_id, name, bits, normalizations, active_version, min_version, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, 1, 1, $5, $5)",
        )
        .bind(index.encryption_id.to_string())
        .bind(&index.name)
        .bind(index.bits)
        .bind(&index.normalizations)
        .bind(index.created_at)
        .execute(&mut *tx)
        .await?;
        insert_index_version(
            &mut tx,
            index.encryption_id,
            &index.name,
            1,
            anchor,
            index.created_at,
        )
        .await?;
        commit_change(
            tx,
            self.backend,
            true,
            EventKind::EncryptionChanged,
            &index.encryption_id.to_string(),
        )
        .await?;
        Ok(IndexChange::Done)
    }

    /// Adds a version to a blind index, anchored at `anchor`, and makes it
    /// active; returns its number. Concurrent rotations run one after the
    /// other (the first statement locks the index row), each with its own
    /// number.
    pub async fn rotate_blind_index(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        name: &str,
        anchor: VersionId,
        max_live_versions: i64,
        now_ms: i64,
    ) -> Result<Result<i64, IndexChange>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let owned =
            sqlx::query("UPDATE encryptions SET updated_at = $1 WHERE id = $2 AND tenant_id = $3")
                .bind(now_ms)
                .bind(id.to_string())
                .bind(tenant.to_string())
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if owned != 1 {
            return Ok(Err(IndexChange::NoEncryption));
        }
        let Some(row) = sqlx::query(
            "UPDATE blind_indexes SET active_version = active_version + 1, updated_at = $1 \
             WHERE encryption_id = $2 AND name = $3 AND active_version - min_version + 1 < $4 \
             RETURNING active_version",
        )
        .bind(now_ms)
        .bind(id.to_string())
        .bind(name)
        .bind(max_live_versions)
        .fetch_optional(&mut *tx)
        .await?
        else {
            let exists =
                sqlx::query("SELECT 1 FROM blind_indexes WHERE encryption_id = $1 AND name = $2")
                    .bind(id.to_string())
                    .bind(name)
                    .fetch_optional(&mut *tx)
                    .await?
                    .is_some();
            return Ok(Err(if exists {
                IndexChange::Conflict
            } else {
                IndexChange::NoIndex
            }));
        };
        let version: i64 = row.try_get("active_version")?;
        insert_index_version(&mut tx, id, name, version, anchor, now_ms).await?;
        commit_change(
            tx,
            self.backend,
            true,
            EventKind::EncryptionChanged,
            &id.to_string(),
        )
        .await?;
        Ok(Ok(version))
    }

    /// Retires the index versions below `min_version` (1 to the active
    /// version: the caller checked). `Conflict` if the active version is now
    /// below it (a concurrent change).
    pub async fn set_blind_index_min_version(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        name: &str,
        min_version: i64,
        now_ms: i64,
    ) -> Result<IndexChange, StoreError> {
        let mut tx = self.pool.begin().await?;
        let owned =
            sqlx::query("UPDATE encryptions SET updated_at = $1 WHERE id = $2 AND tenant_id = $3")
                .bind(now_ms)
                .bind(id.to_string())
                .bind(tenant.to_string())
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if owned != 1 {
            return Ok(IndexChange::NoEncryption);
        }
        let exists = sqlx::query(
            "SELECT active_version, min_version FROM blind_indexes WHERE encryption_id = $1 AND name = $2",
        )
        .bind(id.to_string())
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = exists else {
            return Ok(IndexChange::NoIndex);
        };
        let active: i64 = row.try_get("active_version")?;
        let current: i64 = row.try_get("min_version")?;
        // Raise only: a retired index version stays retired, since the key
        // version it derives from may be destroyed once it is.
        if !(current..=active).contains(&min_version) {
            return Ok(IndexChange::Conflict);
        }
        sqlx::query(
            "UPDATE blind_indexes SET min_version = $1, updated_at = $2 WHERE encryption_id = $3 AND name = $4",
        )
        .bind(min_version)
        .bind(now_ms)
        .bind(id.to_string())
        .bind(name)
        .execute(&mut *tx)
        .await?;
        commit_change(
            tx,
            self.backend,
            true,
            EventKind::EncryptionChanged,
            &id.to_string(),
        )
        .await?;
        Ok(IndexChange::Done)
    }

    /// Whether a live blind-index version derives its key from `version`'s
    /// data key (the destroy guard: destroying it would strand the index).
    pub async fn anchors_live_index(&self, version: VersionId) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT 1 FROM blind_index_versions v JOIN blind_indexes i \
             ON i.encryption_id = v.encryption_id AND i.name = v.name \
             WHERE v.anchor_version_id = $1 AND v.version >= i.min_version",
        )
        .bind(version.to_string())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }
}

async fn insert_index_version(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: EncryptionId,
    name: &str,
    version: i64,
    anchor: VersionId,
    now_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO blind_index_versions (encryption_id, name, version, anchor_version_id, created_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id.to_string())
    .bind(name)
    .bind(version)
    .bind(anchor.to_string())
    .bind(now_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
