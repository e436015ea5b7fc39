//! The `encryptions` and `encryption_key_versions` tables: the versioned key
//! object of each encryption.

use sqlx::any::AnyRow;
use sqlx::Row;

use super::events::{commit_change, record, EventKind};
use super::pool::{Store, StoreError};
use super::sql::{get_id, get_opt_id, get_state};
use crate::domain::ids::{EncryptionId, KekId, TenantId, VersionId};
pub use crate::domain::records::{EncryptionRow, VersionRow};
use crate::domain::states::{Mode, VersionState};

/// A new encryption to insert.
#[derive(Debug)]
pub struct NewEncryption {
    /// Its id.
    pub id: EncryptionId,
    /// The owning tenant.
    pub tenant_id: TenantId,
    /// An optional human name.
    pub name: Option<String>,
    /// Who wraps the data keys.
    pub mode: Mode,
    /// Random salt (client mode key derivation).
    pub salt: Vec<u8>,
    /// Its algorithm's name (`AES-256-GCM`, `AES-256-GCM-SIV`, `RSA-OAEP-256`).
    pub algorithm: &'static str,
    /// Whether its keys may ever be exported.
    pub exportable: bool,
    /// RSA modulus size of its versions (`None` for AES).
    pub key_bits: Option<i64>,
    /// Creation time (Unix ms).
    pub now_ms: i64,
}

/// A new key version to insert: the caller chose its id and wrapped its key
/// (the id is bound into the wrapping); the store assigns its number.
#[derive(Debug)]
pub struct NewVersion {
    /// The new version's id.
    pub id: VersionId,
    /// Its data key, wrapped.
    pub wrapped_key: Vec<u8>,
    /// The root KEK that wraps it (`None` in client mode).
    pub kek_id: Option<KekId>,
    /// Its key material was imported by the tenant.
    pub imported: bool,
}

/// What a rotation did.
#[derive(Debug, Clone, Copy)]
pub struct RotateOutcome {
    /// The new active version.
    pub new_version_id: VersionId,
    /// Its number.
    pub new_version: i64,
    /// The version that was active before.
    pub previous_version_id: VersionId,
}

const ENCRYPTION_COLUMNS: &str = "id, tenant_id, name, algorithm, mode, salt, active_version_id, latest_version, created_at, updated_at, auto_rotate_period_ms, min_decryption_version, exportable, key_bits";
const VERSION_COLUMNS: &str =
    "id, encryption_id, version, state, wrapped_key, kek_id, created_at, rotated_at, encrypt_count, imported";

fn encryption_from_row(r: &AnyRow) -> Result<EncryptionRow, StoreError> {
    Ok(EncryptionRow {
        id: get_id(r, "id", "encryptions")?,
        tenant_id: get_id(r, "tenant_id", "encryptions")?,
        name: r.try_get("name")?,
        algorithm: r.try_get("algorithm")?,
        mode: get_state(r, "mode", "encryptions", Mode::parse)?,
        salt: r.try_get("salt")?,
        active_version_id: get_id(r, "active_version_id", "encryptions")?,
        latest_version: r.try_get("latest_version")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
        auto_rotate_period_ms: r.try_get("auto_rotate_period_ms")?,
        min_decryption_version: r.try_get("min_decryption_version")?,
        exportable: r.try_get::<i64, _>("exportable")? != 0,
        key_bits: r.try_get("key_bits")?,
    })
}

fn version_from_row(r: &AnyRow) -> Result<VersionRow, StoreError> {
    Ok(VersionRow {
        id: get_id(r, "id", "encryption_key_versions")?,
        encryption_id: get_id(r, "encryption_id", "encryption_key_versions")?,
        version: r.try_get("version")?,
        state: get_state(r, "state", "encryption_key_versions", VersionState::parse)?,
        wrapped_key: r.try_get("wrapped_key")?,
        kek_id: get_opt_id(r, "kek_id", "encryption_key_versions")?,
        created_at: r.try_get("created_at")?,
        rotated_at: r.try_get("rotated_at")?,
        encrypt_count: r.try_get("encrypt_count")?,
        imported: r.try_get::<i64, _>("imported")? != 0,
    })
}

impl Store {
    /// Inserts an encryption with its first (active) version, in one transaction.
    pub async fn insert_encryption(
        &self,
        enc: &NewEncryption,
        first: &NewVersion,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO encryptions (id, tenant_id, name, algorithm, mode, salt, active_version_id, latest_version, created_at, updated_at, exportable, key_bits) \
             VALUES ($1, $2, $3, $8, $4, $5, $6, 1, $7, $7, $9, $10)",
        )
        .bind(enc.id.to_string())
        .bind(enc.tenant_id.to_string())
        .bind(&enc.name)
        .bind(enc.mode.as_str())
        .bind(&enc.salt)
        .bind(first.id.to_string())
        .bind(enc.now_ms)
        .bind(enc.algorithm)
        .bind(i64::from(enc.exportable))
        .bind(enc.key_bits)
        .execute(&mut *tx)
        .await?;
        insert_version(&mut tx, enc.id, first, 1, enc.now_ms).await?;
        tx.commit().await?;
        Ok(())
    }

    /// An encryption with all its versions (ordered by number), whichever tenant
    /// owns it: the caller checks ownership.
    ///
    /// Two queries, no transaction, and in this order on purpose: the
    /// encryption row first, then its versions. A rotation between them adds
    /// a version but never removes one, so the active id the first query saw
    /// always has its row in the second (`VersionedKey::check` relies on it).
    pub async fn encryption_with_versions(
        &self,
        id: EncryptionId,
    ) -> Result<Option<(EncryptionRow, Vec<VersionRow>)>, StoreError> {
        let sql = format!("SELECT {ENCRYPTION_COLUMNS} FROM encryptions WHERE id = $1");
        let Some(row) = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let enc = encryption_from_row(&row)?;
        let sql = format!(
            "SELECT {VERSION_COLUMNS} FROM encryption_key_versions WHERE encryption_id = $1 ORDER BY version"
        );
        let versions = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(version_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some((enc, versions)))
    }

    /// One page of a tenant's encryptions in creation order, after the keyset
    /// position `after` = (created_at, id) of the previous page's last row.
    pub async fn list_encryptions(
        &self,
        tenant: TenantId,
        after: Option<(i64, EncryptionId)>,
        limit: u32,
    ) -> Result<Vec<EncryptionRow>, StoreError> {
        let (after_ms, after_id) = after
            .map(|(ms, id)| (ms, id.to_string()))
            .unwrap_or((i64::MIN, String::new()));
        let sql = format!(
            "SELECT {ENCRYPTION_COLUMNS} FROM encryptions WHERE tenant_id = $1 \
             AND (created_at > $2 OR (created_at = $2 AND id > $3)) \
             ORDER BY created_at, id LIMIT $4"
        );
        sqlx::query(&sql)
            .bind(tenant.to_string())
            .bind(after_ms)
            .bind(after_id)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(encryption_from_row)
            .collect()
    }

    /// Makes `new` the active version of the tenant's encryption `id`; the version
    /// that was active becomes `enabled` (still decrypts). `Ok(None)` if the tenant
    /// has no such encryption.
    ///
    /// Concurrency: the first statement increments `latest_version` on the
    /// encryption row, which takes that row's write lock (PostgreSQL) or the
    /// database write lock (SQLite) until commit. Concurrent rotates therefore run
    /// one after the other: each gets its own number and sees the previous one's
    /// active version, so N rotates give N new versions and exactly one active
    /// (also enforced by a partial unique index).
    pub async fn rotate(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        new: &NewVersion,
        now_ms: i64,
    ) -> Result<Option<RotateOutcome>, StoreError> {
        self.rotate_guarded(id, Some(tenant), None, new, now_ms)
            .await
    }

    /// Rotates a platform-mode encryption only if `expected_active` is still its
    /// active version: how automatic rotations (by age or by use count) make sure
    /// that of several replicas deciding at once, exactly one rotates.
    pub async fn rotate_if_active(
        &self,
        id: EncryptionId,
        expected_active: VersionId,
        new: &NewVersion,
        now_ms: i64,
    ) -> Result<Option<RotateOutcome>, StoreError> {
        self.rotate_guarded(id, None, Some(expected_active), new, now_ms)
            .await
    }

    async fn rotate_guarded(
        &self,
        id: EncryptionId,
        tenant: Option<TenantId>,
        expected_active: Option<VersionId>,
        new: &NewVersion,
        now_ms: i64,
    ) -> Result<Option<RotateOutcome>, StoreError> {
        let _turn = self.write_turn().await?;
        let mut tx = self.pool.begin().await?;
        let Some(row) = sqlx::query(
            "UPDATE encryptions SET latest_version = latest_version + 1, active_version_id = $1, updated_at = $2 \
             WHERE id = $3 AND ($4 = '' OR tenant_id = $4) \
             AND ($5 = '' OR (active_version_id = $5 AND mode = 'platform')) RETURNING latest_version",
        )
        .bind(new.id.to_string())
        .bind(now_ms)
        .bind(id.to_string())
        .bind(tenant.map(|t| t.to_string()).unwrap_or_default())
        .bind(expected_active.map(|v| v.to_string()).unwrap_or_default())
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(None);
        };
        let new_version: i64 = row.try_get("latest_version")?;
        // By the database's clock, like the jobs' end times the destroy guard
        // compares it with.
        let sql = format!(
            "UPDATE encryption_key_versions SET state = 'enabled', rotated_at = {} \
             WHERE encryption_id = $1 AND state = 'active' RETURNING id",
            super::events::db_now_ms(self.backend)
        );
        let previous = sqlx::query(&sql)
            .bind(id.to_string())
            .fetch_one(&mut *tx)
            .await?;
        let previous_version_id = get_id(&previous, "id", "encryption_key_versions")?;
        insert_version(&mut tx, id, new, new_version, now_ms).await?;
        record(
            &mut tx,
            self.backend,
            EventKind::EncryptionChanged,
            &id.to_string(),
        )
        .await?;
        tx.commit().await?;
        Ok(Some(RotateOutcome {
            new_version_id: new.id,
            new_version,
            previous_version_id,
        }))
    }
}

impl Store {
    /// Adds in-memory use counts to the stored ones, in one transaction.
    /// Returns, for each version, its encryption, its new total and its state.
    pub async fn add_encrypt_counts(
        &self,
        counts: &[(VersionId, u64)],
    ) -> Result<Vec<(EncryptionId, VersionId, i64, VersionState)>, StoreError> {
        let _turn = self.write_turn().await?;
        let mut tx = self.pool.begin().await?;
        let mut out = Vec::with_capacity(counts.len());
        for (version, n) in counts {
            let row = sqlx::query(
                "UPDATE encryption_key_versions SET encrypt_count = encrypt_count + $1 WHERE id = $2 \
                 RETURNING encryption_id, encrypt_count, state",
            )
            .bind(i64::try_from(*n).unwrap_or(i64::MAX))
            .bind(version.to_string())
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(r) = row {
                out.push((
                    get_id(&r, "encryption_id", "encryption_key_versions")?,
                    *version,
                    r.try_get("encrypt_count")?,
                    get_state(&r, "state", "encryption_key_versions", VersionState::parse)?,
                ));
            }
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Platform-mode encryptions whose active version is older than their
    /// rotation period, with that active version.
    pub async fn due_for_rotation(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<(EncryptionId, VersionId)>, StoreError> {
        let rows = sqlx::query(
            "SELECT e.id AS id, e.active_version_id AS active FROM encryptions e \
             JOIN encryption_key_versions v ON v.id = e.active_version_id \
             WHERE e.mode = 'platform' AND e.auto_rotate_period_ms IS NOT NULL \
             AND v.created_at + e.auto_rotate_period_ms <= $1 LIMIT $2",
        )
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    get_id(r, "id", "encryptions")?,
                    get_id(r, "active", "encryptions")?,
                ))
            })
            .collect()
    }

    /// Sets an encryption's policy. `period`: `None` leaves it, `Some(None)`
    /// clears it. `false` if the tenant has no such encryption.
    pub async fn set_policy(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        period: Option<Option<i64>>,
        min_decryption_version: Option<i64>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await?;
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE encryptions SET \
             auto_rotate_period_ms = CASE WHEN $1 = 1 THEN $2 ELSE auto_rotate_period_ms END, \
             min_decryption_version = COALESCE($3, min_decryption_version), updated_at = $4 \
             WHERE id = $5 AND tenant_id = $6",
        )
        .bind(i64::from(period.is_some()))
        .bind(period.flatten())
        .bind(min_decryption_version)
        .bind(now_ms)
        .bind(id.to_string())
        .bind(tenant.to_string())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        commit_change(
            tx,
            self.backend,
            n == 1,
            EventKind::EncryptionChanged,
            &id.to_string(),
        )
        .await
    }

    /// How long ago (ms, by the database's clock) the version last changed
    /// state; `None` for an unknown version. A version whose change time is
    /// unknown (changed by a Keyward from before migration 0016 during a
    /// rolling upgrade) has its clock started now, so it waits the whole
    /// grace period rather than none.
    pub async fn version_state_age_ms(
        &self,
        version: VersionId,
    ) -> Result<Option<i64>, StoreError> {
        let _turn = self.write_turn().await?;
        let db_now = super::events::db_now_ms(self.backend);
        sqlx::query(&format!(
            "UPDATE encryption_key_versions SET state_changed_at = {db_now} \
             WHERE id = $1 AND state_changed_at IS NULL"
        ))
        .bind(version.to_string())
        .execute(&self.pool)
        .await?;
        let sql = format!(
            "SELECT {db_now} - state_changed_at FROM encryption_key_versions WHERE id = $1"
        );
        Ok(sqlx::query_scalar::<_, i64>(&sql)
            .bind(version.to_string())
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Moves a non-active version to `state`; destroying erases its wrapped key
    /// for good. `Ok(false)` if the version is not (or no longer) in one of the
    /// `from` states, or, with `min_age_ms`, changed state less than that long
    /// ago by the database's clock (the destroy grace period). Records when the
    /// state changed, by the database's clock.
    pub async fn set_version_state(
        &self,
        encryption: EncryptionId,
        version: VersionId,
        from: &[VersionState],
        state: VersionState,
        min_age_ms: Option<i64>,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await?;
        let from: Vec<String> = from.iter().map(|s| format!("'{}'", s.as_str())).collect();
        let erase = if state == VersionState::Destroyed {
            // No key left: no root KEK is needed for it any more either.
            ", wrapped_key = NULL, kek_id = NULL"
        } else {
            ""
        };
        let db_now = super::events::db_now_ms(self.backend);
        let aged = match min_age_ms {
            // An unknown change time never counts as old enough.
            Some(ms) => format!(
                " AND state_changed_at IS NOT NULL AND state_changed_at <= {db_now} - {}",
                ms.max(0)
            ),
            None => String::new(),
        };
        let sql = format!(
            "UPDATE encryption_key_versions SET state = $1, state_changed_at = {db_now}{erase} \
             WHERE id = $2 AND encryption_id = $3 AND state IN ({}){aged}",
            from.join(", ")
        );
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(&sql)
            .bind(state.as_str())
            .bind(version.to_string())
            .bind(encryption.to_string())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n == 1 {
            sqlx::query("UPDATE encryptions SET updated_at = $1 WHERE id = $2")
                .bind(now_ms)
                .bind(encryption.to_string())
                .execute(&mut *tx)
                .await?;
        }
        commit_change(
            tx,
            self.backend,
            n == 1,
            EventKind::EncryptionChanged,
            &encryption.to_string(),
        )
        .await
    }
}

async fn insert_version(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    encryption: EncryptionId,
    v: &NewVersion,
    number: i64,
    now_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO encryption_key_versions (id, encryption_id, version, state, wrapped_key, kek_id, created_at, rotated_at, imported) \
         VALUES ($1, $2, $3, 'active', $4, $5, $6, NULL, $7)",
    )
    .bind(v.id.to_string())
    .bind(encryption.to_string())
    .bind(number)
    .bind(&v.wrapped_key)
    .bind(v.kek_id.map(|k| k.to_string()))
    .bind(now_ms)
    .bind(i64::from(v.imported))
    .execute(&mut **tx)
    .await?;
    Ok(())
}
