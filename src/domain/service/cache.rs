//! Loading encryptions into the key ring: a miss reads the store, unwraps the
//! versions' keys under the root KEKs, checks the versioned key object, and
//! caches it unless a change raced the load.

use std::sync::Arc;

use super::state::{KeyService, RootKeys};
use crate::crypto::{data_key_aad, WrappedKey};
use crate::domain::algorithm::Algorithm;
use crate::domain::error::KeyError;
use crate::domain::ids::{EncryptionId, TenantId, VersionId};
use crate::domain::keys::{KeyVersion, Mode, VersionKey, VersionState, VersionedKey};
use crate::domain::records::{BlindIndexRow, EncryptionRow, VersionRow};
use crate::domain::search::BlindIndex;

/// How soon a cached encryption may be reloaded to look for a version it does
/// not know (one made moments ago by another replica).
const VERSION_RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

impl KeyService {
    /// The tenant's encryption from the ring, loading it on a miss or when the
    /// cached entry is older than `entry_max_age`. Another tenant's encryption
    /// is reported exactly like a missing one. Nothing is served from memory
    /// while the change feed has gone unread for too long (another replica may
    /// have disabled or destroyed a version meanwhile), nor while this process
    /// cannot follow the root keys (see `stop_if_root_keys_moved_on`).
    pub(super) async fn entry(
        &self,
        tenant: TenantId,
        id: EncryptionId,
    ) -> Result<Arc<VersionedKey>, KeyError> {
        if let Some(reason) = self.not_ready_reason() {
            return Err(KeyError::NotReady(reason));
        }
        let entry = match self.ring.get(id) {
            Some(e) if e.loaded_at.elapsed() < self.freshness.entry_max_age => e,
            _ => self
                .load(id, tenant)
                .await?
                .ok_or(KeyError::EncryptionNotFound)?,
        };
        if entry.tenant_id != tenant {
            return Err(KeyError::EncryptionNotFound);
        }
        Ok(entry)
    }

    /// `entry` if it knows `version`; otherwise the entry reloaded once from the
    /// store, which picks up a version another replica just created before the
    /// change feed reports it.
    pub(super) async fn entry_with_version(
        &self,
        entry: Arc<VersionedKey>,
        version: VersionId,
    ) -> Result<Arc<VersionedKey>, KeyError> {
        if entry.version(version).is_some() {
            return Ok(entry);
        }
        // At most one reload per entry per interval, so a caller naming unknown
        // versions cannot turn every request into a query.
        if entry.loaded_at.elapsed() < VERSION_RELOAD_INTERVAL {
            return Err(KeyError::VersionNotFound);
        }
        let fresh = self
            .load(entry.id, entry.tenant_id)
            .await?
            .ok_or(KeyError::EncryptionNotFound)?;
        if fresh.tenant_id != entry.tenant_id {
            return Err(KeyError::EncryptionNotFound);
        }
        if fresh.version(version).is_none() {
            return Err(KeyError::VersionNotFound);
        }
        Ok(fresh)
    }

    /// `entry` reloaded from the store, to find something (a blind index)
    /// another replica made moments ago; at most once per entry per
    /// interval, so a caller naming unknown things cannot turn every request
    /// into a query.
    pub(super) async fn entry_reloaded(
        &self,
        entry: Arc<VersionedKey>,
    ) -> Result<Arc<VersionedKey>, KeyError> {
        if entry.loaded_at.elapsed() < VERSION_RELOAD_INTERVAL {
            return Ok(entry);
        }
        let fresh = self
            .load(entry.id, entry.tenant_id)
            .await?
            .ok_or(KeyError::EncryptionNotFound)?;
        if fresh.tenant_id != entry.tenant_id {
            return Err(KeyError::EncryptionNotFound);
        }
        Ok(fresh)
    }

    /// Loads the tenant's encryption into the ring. Another tenant's encryption
    /// is treated exactly like a missing one *before* any key is touched: not
    /// unwrapped, not cached, no root-key or provider access, so it cannot be
    /// told apart from a missing id by status or timing class.
    async fn load(
        &self,
        id: EncryptionId,
        tenant: TenantId,
    ) -> Result<Option<Arc<VersionedKey>>, KeyError> {
        if self.ring.is_known_unknown(tenant, id) {
            return Ok(None);
        }
        let generation = self.ring.generation();
        let Some((enc, versions)) = self.store.encryption_with_versions(id).await? else {
            self.ring.remember_unknown(id, None);
            return Ok(None);
        };
        if enc.tenant_id != tenant {
            // Remembered like a missing id, so that probing another tenant's
            // ids costs a query only once and answers in the same time class.
            self.ring.remember_unknown(id, Some(enc.tenant_id));
            return Ok(None);
        }
        // Read after the versions: an index version created meanwhile names
        // a key version that is at worst missing from this object, which
        // then answers that index as not found until the change feed
        // reloads it.
        let indexes = self.store.blind_indexes(id).await?;
        let entry = match self.build_entry(&enc, &versions, &indexes, &*self.root()?) {
            Err(KeyError::UnknownKek(kek_id)) => {
                // A root KEK rotation elsewhere: load the new KEK (a provider
                // call, rare, and never for a key already in the ring) and retry.
                // One reload at a time: requests that missed together wait for
                // it instead of each calling the provider.
                self.load_root_keys_for(kek_id).await?;
                self.build_entry(&enc, &versions, &indexes, &*self.root()?)?
            }
            other => other?,
        };
        let entry = Arc::new(entry);
        self.ring.insert(entry.clone(), generation);
        Ok(Some(entry))
    }

    fn build_entry(
        &self,
        enc: &EncryptionRow,
        rows: &[VersionRow],
        index_rows: &[BlindIndexRow],
        root: &RootKeys,
    ) -> Result<VersionedKey, KeyError> {
        let mut versions = Vec::with_capacity(rows.len());
        for row in rows {
            let key = match (&row.wrapped_key, row.state, enc.mode) {
                (_, VersionState::Destroyed, _) => VersionKey::Destroyed,
                (None, ..) => {
                    tracing::warn!(encryption_id = %enc.id, version_id = %row.id, state = row.state.as_str(), "a key version that is not destroyed has no key material; it answers as destroyed");
                    VersionKey::Destroyed
                }
                (Some(w), _, Mode::Client) => VersionKey::ClientWrapped(WrappedKey(w.clone())),
                (Some(w), _, Mode::Platform) => {
                    let kek_id = row.kek_id.ok_or_else(|| {
                        KeyError::Integrity(format!("version {} names no root KEK", row.id))
                    })?;
                    let kek = root.keys.get(&kek_id).ok_or(KeyError::UnknownKek(kek_id))?;
                    let aad = data_key_aad(enc.id.as_bytes(), row.id.as_bytes(), kek_id.as_bytes());
                    let key = kek.unwrap_key(&WrappedKey(w.clone()), &aad).map_err(|_| {
                        KeyError::Integrity(format!(
                            "the data key of version {} failed to authenticate under root KEK {kek_id}",
                            row.id
                        ))
                    })?;
                    VersionKey::Ready(key.cipher())
                }
            };
            versions.push(KeyVersion {
                id: row.id,
                number: row.version,
                state: row.state,
                key,
                uses: self.ring.counter(row.id, row.encrypt_count.max(0) as u64),
            });
        }
        let algorithm = Algorithm::parse(&enc.algorithm).ok_or_else(|| {
            KeyError::Integrity(format!("encryption {}: unknown algorithm", enc.id))
        })?;
        let indexes = index_rows
            .iter()
            .map(BlindIndex::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let key = VersionedKey {
            loaded_at: std::time::Instant::now(),
            id: enc.id,
            tenant_id: enc.tenant_id,
            mode: enc.mode,
            algorithm,
            indexes,
            salt: enc.salt.clone(),
            active: enc.active_version_id,
            min_decryption_version: enc.min_decryption_version,
            versions,
        };
        key.check()?;
        Ok(key)
    }
}
