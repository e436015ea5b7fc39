//! The root keys: loading them through the master-key provider, rotating the
//! root KEK and re-wrapping every version under the new one, sealing job
//! sources, and migrating to another master key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use super::state::{KeyService, RootKeys};
use crate::crypto::{self, data_key_aad, DataKey, WrappedKey, NONCE_LEN};
use crate::domain::error::{KeyError, RootKeyError};
use crate::domain::ids::{EncryptionId, KekId, VersionId};
use crate::domain::states::KekState;
use crate::domain::time::now_ms;
use crate::master_key::{MasterKeyProvider, ProviderError};
use crate::store::{NewVersion, RootKekRow, Store, StoreError};

/// Key versions re-wrapped per transaction when a root-KEK rotation finishes.
const REWRAP_BATCH: u32 = 500;

impl KeyService {
    /// Loads (or, on a new database, creates) the root KEKs through the
    /// provider. A provider that cannot be reached leaves the reason for
    /// readiness; a key that does not match is an error to stop on.
    pub async fn load_root_keys(&self) -> Result<(), RootKeyError> {
        match load_root_keys(&self.store, self.provider.as_ref()).await {
            Ok(keys) => {
                *self.root.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(keys));
                *self.not_ready.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Ok(())
            }
            Err(e) => {
                if self.root().is_err() {
                    // Readiness is unauthenticated: say which provider and what
                    // kind of failure, and leave details (ARNs, URLs) to the log.
                    let reason = match &e {
                        RootKeyError::Provider(_) => format!(
                            "master-key provider `{}` unavailable (see the log)",
                            self.provider.name()
                        ),
                        RootKeyError::Store(_) => "the database is unavailable".to_string(),
                        RootKeyError::MasterKeyMismatch { .. }
                        | RootKeyError::ProviderMismatch { .. } => {
                            "the master key does not match this database (see the log)".to_string()
                        }
                    };
                    *self.not_ready.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                }
                Err(e)
            }
        }
    }

    /// The loaded root KEKs, or why they are not loaded.
    pub(super) fn root(&self) -> Result<Arc<RootKeys>, KeyError> {
        self.root
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                KeyError::NotReady(
                    self.not_ready_reason()
                        .unwrap_or_else(|| "the root key is not loaded".into()),
                )
            })
    }

    /// A new version's data key wrapped under the active root KEK.
    pub(super) fn wrap_platform_key(
        &self,
        id: EncryptionId,
        version: VersionId,
        key: &DataKey,
    ) -> Result<NewVersion, KeyError> {
        let root = self.root()?;
        let kek_id = root.active;
        let kek = &root.keys[&kek_id];
        Ok(NewVersion {
            id: version,
            wrapped_key: kek
                .wrap(
                    key,
                    &data_key_aad(id.as_bytes(), version.as_bytes(), kek_id.as_bytes()),
                )
                .0,
            kek_id: Some(kek_id),
        })
    }

    /// Starts a root-KEK rotation: a new KEK, wrapped by the provider, becomes
    /// active (new versions are wrapped by it at once) and the previous one
    /// `retiring`. [`KeyService::rewrap_retiring`] then moves every version over.
    ///
    /// While an earlier rotation is still re-wrapping (a KEK is `retiring`,
    /// on any replica) it is [`KeyError::RotationInProgress`]: rotations never
    /// pile up.
    pub async fn rotate_root_kek(&self) -> Result<KekId, KeyError> {
        self.root()?;
        let in_progress = |keks: &[RootKekRow]| keks.iter().any(|k| k.state == KekState::Retiring);
        // Checked before the provider call too, so that a refused request
        // costs no KMS call; the store checks again atomically.
        if in_progress(&self.store.root_keks().await?) {
            return Err(KeyError::RotationInProgress);
        }
        let kek_id = KekId::new_random();
        let kek = DataKey::generate();
        let wrapped = self.provider.wrap_root_kek(kek_id, &kek).await?;
        let started = self
            .store
            .begin_kek_rotation(&RootKekRow {
                id: kek_id,
                provider: self.provider.name().to_string(),
                wrapped_key: wrapped,
                state: KekState::Active,
                created_at: now_ms(),
            })
            .await?;
        if !started {
            return Err(KeyError::RotationInProgress);
        }
        // Install the new KEK from what we hold, without another provider call.
        let mut root = (*self.root()?).clone_keys();
        root.keys.insert(kek_id, Arc::new(kek.cipher()));
        root.active = kek_id;
        *self.root.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(root));
        tracing::info!(%kek_id, "root KEK rotation started");
        Ok(kek_id)
    }

    /// Finishes a root-KEK rotation in the background: after a rotation was
    /// requested, or at start when an earlier process left one unfinished (a
    /// crash, SIGKILL). Re-wraps [`REWRAP_BATCH`] versions per transaction
    /// and logs the outcome; if it stops, the next start resumes it. Safe to
    /// run on several replicas at once.
    pub async fn finish_kek_rotation(&self) {
        match self.store.root_keks().await {
            Ok(keks) if keks.iter().any(|k| k.state == KekState::Retiring) => {
                tracing::info!("re-wrapping the key versions of the retiring root KEK")
            }
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot check for an unfinished root KEK rotation");
                return;
            }
        }
        let rewrapped = self.rewrap_retiring(REWRAP_BATCH, Duration::ZERO, |_, _| {});
        match rewrapped.await {
            Ok(n) => tracing::info!(rewrapped = n, "root KEK rotation finished"),
            Err(e) => {
                tracing::warn!(error = %e, "root KEK re-wrap stopped; it resumes at the next start")
            }
        }
    }

    /// Re-wraps every version still wrapped by a retiring root KEK under the
    /// active one, `batch` rows per transaction, then deletes the retired KEKs.
    /// Each row is tagged with its KEK and updated by compare-and-swap, so the
    /// work can stop at any point (a crash, SIGKILL) and resume, by this process
    /// or another, with every key still unwrappable. Returns rows re-wrapped.
    pub async fn rewrap_retiring(
        &self,
        batch: u32,
        pause: std::time::Duration,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<u64, KeyError> {
        let keks = self.store.root_keks().await?;
        let retiring: Vec<KekId> = keks
            .iter()
            .filter(|k| k.state == KekState::Retiring)
            .map(|k| k.id)
            .collect();
        let db_active = keks
            .iter()
            .find(|k| k.state == KekState::Active)
            .map(|k| k.id);
        let mut root = self.root()?;
        if db_active != Some(root.active) || retiring.iter().any(|k| !root.keys.contains_key(k)) {
            // Another process rotated: work with the database's view.
            self.load_root_keys()
                .await
                .map_err(|e| KeyError::Integrity(e.to_string()))?;
            root = self.root()?;
        }
        let remaining: u64 = self
            .store
            .versions_per_kek()
            .await?
            .iter()
            .filter(|(k, _)| retiring.contains(k))
            .map(|(_, n)| *n as u64)
            .sum();
        let new_id = root.active;
        let new_kek = &root.keys[&new_id];
        let mut done = 0u64;
        for old_id in retiring {
            let old_kek = root.keys.get(&old_id).ok_or(KeyError::UnknownKek(old_id))?;
            // Passes over the versions in id order until none is left: a replica
            // that has not yet heard of the rotation may still add versions
            // under the old KEK behind the cursor.
            for pass in 0.. {
                if self
                    .store
                    .versions_wrapped_by(old_id, None, 1)
                    .await?
                    .is_empty()
                {
                    break;
                }
                if pass == 10 {
                    return Err(KeyError::Integrity(format!(
                        "versions keep appearing under retiring root KEK {old_id}; run the re-wrap again once every replica has loaded the new root KEK"
                    )));
                }
                if pass > 0 {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                let mut after = None;
                loop {
                    let rows = self.store.versions_wrapped_by(old_id, after, batch).await?;
                    let Some(last) = rows.last() else { break };
                    after = Some(last.id);
                    let mut updates = Vec::with_capacity(rows.len());
                    for row in &rows {
                        let old_aad = data_key_aad(
                            row.encryption_id.as_bytes(),
                            row.id.as_bytes(),
                            old_id.as_bytes(),
                        );
                        let key = old_kek
                            .unwrap_key(&WrappedKey(row.wrapped_key.clone()), &old_aad)
                            .map_err(|_| {
                                KeyError::Integrity(format!(
                                    "version {} fails to unwrap under root KEK {old_id}",
                                    row.id
                                ))
                            })?;
                        let new_aad = data_key_aad(
                            row.encryption_id.as_bytes(),
                            row.id.as_bytes(),
                            new_id.as_bytes(),
                        );
                        updates.push((
                            row.id,
                            row.wrapped_key.clone(),
                            new_kek.wrap(&key, &new_aad).0,
                        ));
                    }
                    done += self.store.rewrap_versions(old_id, new_id, &updates).await?;
                    progress(done, remaining);
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            }
            for (job, sealed) in self.store.jobs_sealed_by(old_id).await? {
                let plain = self.open_job_source(job, old_id, &sealed)?;
                let (kek, resealed) = self.seal_job_source(job, &plain)?;
                self.store.reseal_job(job, &sealed, &resealed, kek).await?;
            }
            if self.store.retire_root_kek(old_id).await? {
                tracing::info!(kek_id = %old_id, "root KEK retired: no version names it any more");
            } else {
                return Err(KeyError::Integrity(format!(
                    "root KEK {old_id} still wraps key versions; run the re-wrap again"
                )));
            }
        }
        Ok(done)
    }

    /// Seals a job's source specification (it holds database credentials) under
    /// the active root KEK, bound to the job id.
    pub fn seal_job_source(
        &self,
        job: uuid::Uuid,
        plain: &[u8],
    ) -> Result<(KekId, Vec<u8>), KeyError> {
        let root = self.root()?;
        let sealed = crypto::seal(&root.keys[&root.active], &job_aad(job), plain);
        let mut out = sealed.nonce.to_vec();
        out.extend_from_slice(&sealed.ciphertext);
        Ok((root.active, out))
    }

    /// Opens a sealed job source.
    pub fn open_job_source(
        &self,
        job: uuid::Uuid,
        kek: KekId,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let root = self.root()?;
        let key = root.keys.get(&kek).ok_or(KeyError::UnknownKek(kek))?;
        if sealed.len() < NONCE_LEN {
            return Err(KeyError::Integrity(format!(
                "job {job}: sealed source too short"
            )));
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        crypto::open(
            key,
            nonce.try_into().expect("split at NONCE_LEN"),
            &job_aad(job),
            ct,
        )
        .map(Zeroizing::new)
        .map_err(|()| {
            KeyError::Integrity(format!("job {job}: sealed source fails to authenticate"))
        })
    }
}

fn job_aad(job: uuid::Uuid) -> [u8; 32] {
    let mut aad = [0u8; 32];
    aad[..16].copy_from_slice(b"keyward:job:v1\0\0");
    aad[16..].copy_from_slice(job.as_bytes());
    aad
}

async fn load_root_keys(
    store: &Store,
    provider: &dyn MasterKeyProvider,
) -> Result<RootKeys, RootKeyError> {
    let mut rows = store.root_keks().await?;
    if rows.is_empty() {
        let kek_id = KekId::new_random();
        let kek = DataKey::generate();
        let wrapped = provider
            .wrap_root_kek(kek_id, &kek)
            .await
            .map_err(RootKeyError::Provider)?;
        let row = RootKekRow {
            id: kek_id,
            provider: provider.name().to_string(),
            wrapped_key: wrapped,
            state: KekState::Active,
            created_at: now_ms(),
        };
        match store.insert_active_root_kek(&row).await {
            Ok(()) => {
                tracing::info!(kek_id = %kek_id, provider = provider.name(), "created the root KEK")
            }
            // Another process initialised the database first: use its KEK.
            Err(StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
        rows = store.root_keks().await?;
    }
    let mut keys = HashMap::new();
    let mut active = None;
    for row in rows {
        let kek = unwrap_root_kek(provider, &row).await?;
        if row.state == KekState::Active {
            active = Some(row.id);
        }
        keys.insert(row.id, Arc::new(kek.cipher()));
    }
    let active = active.ok_or_else(|| {
        RootKeyError::Store(StoreError::Corrupt {
            table: "root_keks",
            detail: "no active root KEK".into(),
        })
    })?;
    Ok(RootKeys { active, keys })
}

/// Unwraps one root-KEK row with `provider`, which must be the provider that
/// wrapped it; a key that does not match names the setting to look at.
async fn unwrap_root_kek(
    provider: &dyn MasterKeyProvider,
    row: &RootKekRow,
) -> Result<DataKey, RootKeyError> {
    if row.provider != provider.name() {
        return Err(RootKeyError::ProviderMismatch {
            kek_id: row.id,
            stored: row.provider.clone(),
            configured: provider.name(),
        });
    }
    provider
        .unwrap_root_kek(row.id, &row.wrapped_key)
        .await
        .map_err(|e| match e {
            ProviderError::KeyMismatch => RootKeyError::MasterKeyMismatch {
                setting: provider.key_setting(),
                kek_id: row.id,
            },
            other => RootKeyError::Provider(other),
        })
}

/// Re-wraps every root KEK, now wrapped by `from`, under `to`, in one
/// transaction. Returns how many KEKs moved. Running servers keep working (they
/// hold the unwrapped KEKs); after this they must start with `to`'s settings.
pub async fn migrate_master_key(
    store: &Store,
    from: &dyn MasterKeyProvider,
    to: &dyn MasterKeyProvider,
) -> Result<usize, RootKeyError> {
    let rows = store.root_keks().await?;
    let mut updates = Vec::with_capacity(rows.len());
    for row in rows {
        let kek = unwrap_root_kek(from, &row).await?;
        let wrapped = to
            .wrap_root_kek(row.id, &kek)
            .await
            .map_err(RootKeyError::Provider)?;
        // Prove the new wrapping before committing to it.
        let back = to
            .unwrap_root_kek(row.id, &wrapped)
            .await
            .map_err(RootKeyError::Provider)?;
        if back.expose() != kek.expose() {
            return Err(RootKeyError::Provider(ProviderError::Unavailable(
                "the target provider returned a different key on unwrap".into(),
            )));
        }
        updates.push((row.id, row.wrapped_key, to.name().to_string(), wrapped));
    }
    store.rewrap_root_keks(&updates).await?;
    Ok(updates.len())
}
