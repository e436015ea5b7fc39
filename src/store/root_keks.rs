//! The `root_keks` table.

use sqlx::Row;

use super::pool::{Store, StoreError};
use super::sql::{get_id, get_state};
use crate::domain::ids::KekId;
use crate::domain::states::KekState;

/// One root KEK, wrapped by the master-key provider named in `provider`.
#[derive(Debug, Clone)]
pub struct RootKekRow {
    /// Its id, bound into the wrapping's associated data.
    pub id: KekId,
    /// The provider that wrapped it (`env`, ...).
    pub provider: String,
    /// The wrapped key bytes (provider-specific format).
    pub wrapped_key: Vec<u8>,
    /// Active or retiring.
    pub state: KekState,
    /// Creation time (Unix ms).
    pub created_at: i64,
    /// Why the last re-wrap of a retiring KEK's versions stopped (no secrets:
    /// ids and the kind of failure), until a later attempt finishes it.
    pub rewrap_error: Option<String>,
}

impl Store {
    /// Every root KEK still in use, the active one first.
    pub async fn root_keks(&self) -> Result<Vec<RootKekRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, provider, wrapped_key, state, created_at, rewrap_error FROM root_keks \
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
                    state: get_state(r, "state", "root_keks", KekState::parse)?,
                    created_at: r.try_get("created_at")?,
                    rewrap_error: r.try_get("rewrap_error")?,
                })
            })
            .collect()
    }

    /// Inserts the first root KEK as active. When another process won the race,
    /// returns [`StoreError::Conflict`] (the unique index on the active state).
    pub async fn insert_active_root_kek(&self, kek: &RootKekRow) -> Result<(), StoreError> {
        let _turn = self.write_turn().await?;
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

/// A key version still wrapped by a retiring root KEK.
#[derive(Debug, Clone)]
pub struct VersionToRewrap {
    /// The version.
    pub id: crate::domain::ids::VersionId,
    /// Its encryption.
    pub encryption_id: crate::domain::ids::EncryptionId,
    /// Its data key wrapped by the retiring KEK.
    pub wrapped_key: Vec<u8>,
}

impl Store {
    /// Makes `new` the active root KEK and `expected` (the active one, as the
    /// caller read and checked it) `retiring`, in one transaction, and
    /// announces the change. A compare-and-swap on `expected`'s provider and
    /// wrapped bytes, and on no KEK being `retiring`: if a master-key migration
    /// re-wrapped the active KEK, or another rotation began, since the caller
    /// read it, nothing changes and the answer is [`StoreError::Raced`].
    pub async fn begin_kek_rotation(
        &self,
        new: &RootKekRow,
        expected: &RootKekRow,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await?;
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE root_keks SET state = 'retiring' \
             WHERE id = $1 AND state = 'active' AND provider = $2 AND wrapped_key = $3 \
             AND NOT EXISTS (SELECT 1 FROM root_keks r WHERE r.state = 'retiring')",
        )
        .bind(expected.id.to_string())
        .bind(&expected.provider)
        .bind(&expected.wrapped_key)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n != 1 {
            return Err(StoreError::Raced(
                "the root KEKs changed meanwhile (another rotation or a master-key migration)"
                    .into(),
            ));
        }
        sqlx::query(
            "INSERT INTO root_keks (id, provider, wrapped_key, state, created_at) VALUES ($1, $2, $3, 'active', $4)",
        )
        .bind(new.id.to_string())
        .bind(&new.provider)
        .bind(&new.wrapped_key)
        .bind(new.created_at)
        .execute(&mut *tx)
        .await?;
        super::events::record(
            &mut tx,
            self.backend,
            super::events::EventKind::RootKeysChanged,
            &new.id.to_string(),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Up to `limit` versions wrapped by `kek`, in id order after `after`.
    pub async fn versions_wrapped_by(
        &self,
        kek: KekId,
        after: Option<crate::domain::ids::VersionId>,
        limit: u32,
    ) -> Result<Vec<VersionToRewrap>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, encryption_id, wrapped_key FROM encryption_key_versions \
             WHERE kek_id = $1 AND wrapped_key IS NOT NULL AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(kek.to_string())
        .bind(after.map(|a| a.to_string()).unwrap_or_default())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(VersionToRewrap {
                    id: get_id(r, "id", "encryption_key_versions")?,
                    encryption_id: get_id(r, "encryption_id", "encryption_key_versions")?,
                    wrapped_key: r.try_get("wrapped_key")?,
                })
            })
            .collect()
    }

    /// Re-points a batch of versions from `old` to `new` with their re-wrapped
    /// keys, each guarded by a compare-and-swap on the old KEK and wrapped key,
    /// in one transaction. Returns how many rows changed.
    pub async fn rewrap_versions(
        &self,
        old: KekId,
        new: KekId,
        batch: &[(crate::domain::ids::VersionId, Vec<u8>, Vec<u8>)],
    ) -> Result<u64, StoreError> {
        let _turn = self.write_turn().await?;
        let mut tx = self.pool.begin().await?;
        let mut changed = 0;
        for (id, old_wrapped, new_wrapped) in batch {
            changed += sqlx::query(
                "UPDATE encryption_key_versions SET wrapped_key = $1, kek_id = $2 \
                 WHERE id = $3 AND kek_id = $4 AND wrapped_key = $5",
            )
            .bind(new_wrapped)
            .bind(new.to_string())
            .bind(id.to_string())
            .bind(old.to_string())
            .bind(old_wrapped)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(changed)
    }

    /// How many versions each root KEK still wraps (destroyed versions hold
    /// no wrapped key and need no KEK).
    pub async fn versions_per_kek(&self) -> Result<Vec<(KekId, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT k.id AS id, (SELECT COUNT(*) FROM encryption_key_versions v \
             WHERE v.kek_id = k.id AND v.wrapped_key IS NOT NULL) AS n \
             FROM root_keks k ORDER BY k.created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((get_id(r, "id", "root_keks")?, r.try_get::<i64, _>("n")?)))
            .collect()
    }

    /// Deletes a retiring root KEK that no version needs any more. `false` if
    /// some version still holds a key wrapped by it (or a job's sealed source,
    /// a tenant's import wrapping key, a sealed ACME account or key, the client CA's key).
    /// Destroyed versions hold no key: the name of their old KEK (kept by
    /// versions destroyed before Keyward cleared it) is cleared first.
    pub async fn retire_root_kek(&self, kek: KekId) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE encryption_key_versions SET kek_id = NULL \
             WHERE kek_id = $1 AND wrapped_key IS NULL",
        )
        .bind(kek.to_string())
        .execute(&mut *tx)
        .await?;
        let done = sqlx::query(
            "DELETE FROM root_keks WHERE id = $1 AND state = 'retiring' \
             AND NOT EXISTS (SELECT 1 FROM encryption_key_versions WHERE kek_id = $1) \
             AND NOT EXISTS (SELECT 1 FROM jobs WHERE source_kek_id = $1) \
             AND NOT EXISTS (SELECT 1 FROM tenant_wrapping_keys WHERE kek_id = $1) \
             AND NOT EXISTS (SELECT 1 FROM acme_certificates \
                             WHERE account_kek = $1 OR key_kek = $1) \
             AND NOT EXISTS (SELECT 1 FROM client_cas WHERE key_kek = $1)",
        )
        .bind(kek.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !done {
            tx.rollback().await?;
            return Ok(false);
        }
        super::events::commit_change(
            tx,
            self.backend,
            done,
            super::events::EventKind::RootKeysChanged,
            &kek.to_string(),
        )
        .await
    }

    /// Records why the re-wrap of a retiring KEK's versions stopped, or clears
    /// it (`None`), so the rotation's state is visible to every replica.
    pub async fn set_rewrap_error(
        &self,
        kek: KekId,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await?;
        sqlx::query("UPDATE root_keks SET rewrap_error = $1 WHERE id = $2")
            .bind(error)
            .bind(kek.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Re-wraps root KEKs under another provider in one transaction: each row is
    /// `(id, wrapped as read, new provider, new wrapped)`, guarded by a
    /// compare-and-swap on the wrapped bytes read, and on the set of KEKs being
    /// exactly the rows given. Fails (and changes nothing) if any row changed or
    /// a KEK was added or removed meanwhile (a root-KEK rotation by a server
    /// still running on the old master key), and announces the change.
    pub async fn rewrap_root_keks(
        &self,
        rows: &[(KekId, Vec<u8>, String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await?;
        let mut tx = self.pool.begin().await?;
        for (id, old, provider, new) in rows {
            let n = sqlx::query("UPDATE root_keks SET provider = $1, wrapped_key = $2 WHERE id = $3 AND wrapped_key = $4")
                .bind(provider)
                .bind(new)
                .bind(id.to_string())
                .bind(old)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if n != 1 {
                return Err(StoreError::Raced(format!(
                    "root KEK {id} changed during the migration; nothing was changed, run it again"
                )));
            }
        }
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM root_keks")
            .fetch_one(&mut *tx)
            .await?;
        if usize::try_from(total).ok() != Some(rows.len()) {
            return Err(StoreError::Raced(
                "a root KEK was added or retired during the migration (a rotation ran); nothing was changed, run it again".into(),
            ));
        }
        if let Some((id, ..)) = rows.first() {
            super::events::record(
                &mut tx,
                self.backend,
                super::events::EventKind::RootKeysChanged,
                &id.to_string(),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
