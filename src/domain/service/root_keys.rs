//! The root keys: loading them through the master-key provider, rotating the
//! root KEK and re-wrapping every version under the new one, sealing job
//! sources, and migrating to another master key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::state::{KeyService, RootKeys};
use crate::crypto::{self, data_key_aad, CheckpointKey, DataKey, WrappedKey, NONCE_LEN};
use crate::domain::error::{KeyError, RootKeyError};
use crate::domain::ids::{EncryptionId, KekId, VersionId};
use crate::domain::states::KekState;
use crate::domain::time::now_ms;
use crate::master_key::{MasterKeyProvider, ProviderError};
use crate::store::{CheckpointKeyRow, NewVersion, RootKekRow, Store, StoreError};

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
                self.set_not_ready(None);
                Ok(())
            }
            Err(e) => {
                let loaded = self
                    .root
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .is_some();
                if !loaded {
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
                        RootKeyError::ProviderRefused { .. } => format!(
                            "master-key provider `{}` refused its configuration (see the log)",
                            self.provider.name()
                        ),
                    };
                    self.set_not_ready(Some(reason));
                } else if matches!(
                    e,
                    RootKeyError::MasterKeyMismatch { .. } | RootKeyError::ProviderMismatch { .. }
                ) {
                    self.stop_if_root_keys_moved_on().await;
                }
                Err(e)
            }
        }
    }

    /// After a master-key migration this process, still on the old master
    /// key, keeps every root KEK it holds and may go on serving with them
    /// until it is restarted. But once a root KEK it does not hold is in use
    /// (a replica started with the new key rotated the root KEK), it can
    /// neither unwrap the versions re-wrapped under that KEK nor wrap new
    /// versions under the active one (its own active KEK is retiring or
    /// gone): it stops serving key operations (`503 not_ready`, `/readyz`
    /// says why) until it is restarted with the new master key, rather than
    /// failing some requests with 500 or wrapping new versions under a KEK
    /// about to be deleted.
    async fn stop_if_root_keys_moved_on(&self) {
        let Ok(rows) = self.store.root_keks().await else {
            return;
        };
        let Some(root) = self.root.read().unwrap_or_else(|e| e.into_inner()).clone() else {
            return;
        };
        let follows = rows.iter().all(|row| root.keys.contains_key(&row.id))
            && rows
                .iter()
                .any(|row| row.state == KekState::Active && row.id == root.active);
        if !follows {
            tracing::warn!("a root KEK this process cannot unwrap is in use after a master-key change; key operations stop until it is restarted with the new master key");
            self.set_not_ready(Some(
                "the master key changed and a root KEK made since cannot be unwrapped with this process's: restart it with the new master key".into(),
            ));
        }
    }

    /// The key that signs the audit file's checkpoints: derived from the
    /// active root KEK, so `None` until the root keys are loaded.
    pub fn checkpoint_key(&self) -> Option<Arc<CheckpointKey>> {
        self.root
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|root| root.checkpoint.clone())
    }

    /// The loaded root KEKs, or why they are not loaded.
    pub(super) fn root(&self) -> Result<Arc<RootKeys>, KeyError> {
        if let Some(reason) = self.stored_not_ready() {
            return Err(KeyError::NotReady(reason));
        }
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
        self.wrap_platform_material(id, version, key.expose(), false)
    }

    /// A new version's key material (a data key, or an RSA private key's
    /// PKCS#8 DER) wrapped under the active root KEK.
    pub(super) fn wrap_platform_material(
        &self,
        id: EncryptionId,
        version: VersionId,
        material: &[u8],
        imported: bool,
    ) -> Result<NewVersion, KeyError> {
        let root = self.root()?;
        let kek_id = root.active;
        let kek = root.keys.get(&kek_id).ok_or(KeyError::UnknownKek(kek_id))?;
        Ok(NewVersion {
            id: version,
            wrapped_key: kek
                .wrap_bytes(
                    material,
                    &data_key_aad(id.as_bytes(), version.as_bytes(), kek_id.as_bytes()),
                )
                .0,
            kek_id: Some(kek_id),
            imported,
        })
    }

    /// Starts a root-KEK rotation: a new KEK, wrapped by the provider, becomes
    /// active (new versions are wrapped by it at once) and the previous one
    /// `retiring`. [`KeyService::rewrap_retiring`] then moves every version over.
    ///
    /// Refused while an earlier rotation still has a retiring KEK, and unless
    /// the active root KEK is wrapped by this process's own provider and
    /// unwraps with it: after a master-key migration, a server still running
    /// with the old master key would otherwise wrap the new KEK with the old
    /// key, re-wrap every version to it and delete the migrated KEK, putting
    /// the old (perhaps leaked or destroyed) master key back in force. The
    /// database write is a compare-and-swap on what was checked, so a
    /// migration or rotation that commits in between is not undone either.
    pub async fn rotate_root_kek(&self) -> Result<KekId, KeyError> {
        self.root()?;
        let rows = self.store.root_keks().await?;
        let current = self.check_rotatable(&rows).await?;
        if !self.root()?.keys.contains_key(&current.id) {
            // Another process rotated and finished: learn its KEK first.
            self.load_root_keys()
                .await
                .map_err(|e| KeyError::Integrity(e.to_string()))?;
        }
        let kek_id = KekId::new_random();
        let kek = DataKey::generate();
        let wrapped = self.provider.wrap_root_kek(kek_id, &kek).await?;
        // Recorded before the KEK becomes active, so that no checkpoint is
        // ever signed by a key the database does not list (a rotation that
        // then loses the race leaves a listed key that never signs).
        let checkpoint = checkpoint_key(&self.store, kek_id, &kek).await?;
        let new = RootKekRow {
            id: kek_id,
            provider: self.provider.name().to_string(),
            wrapped_key: wrapped,
            state: KekState::Active,
            created_at: now_ms(),
            rewrap_error: None,
        };
        match self.store.begin_kek_rotation(&new, current).await {
            Ok(()) => {}
            Err(StoreError::Raced(_)) => {
                // Say which: a migration, or (the usual case) another
                // rotation, which may even have finished already.
                let now = self.store.root_keks().await?;
                self.check_rotatable(&now).await?;
                return Err(KeyError::RotationInProgress);
            }
            Err(e) => return Err(e.into()),
        }
        // Install the new KEK from what we hold, without another provider call.
        let mut root = (*self.root()?).clone_keys();
        root.keys.insert(kek_id, Arc::new(kek.cipher()));
        root.active = kek_id;
        root.checkpoint = checkpoint;
        *self.root.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(root));
        tracing::info!(%kek_id, "root KEK rotation started");
        Ok(kek_id)
    }

    /// The active root KEK, if a rotation may start from it: no KEK is
    /// retiring, and the active one is wrapped by this process's own provider
    /// and unwraps with it.
    async fn check_rotatable<'a>(
        &self,
        rows: &'a [RootKekRow],
    ) -> Result<&'a RootKekRow, KeyError> {
        if rows.iter().any(|k| k.state == KekState::Retiring) {
            return Err(KeyError::RotationInProgress);
        }
        let current = rows
            .iter()
            .find(|k| k.state == KekState::Active)
            .ok_or_else(|| KeyError::Integrity("no active root KEK".into()))?;
        if current.provider != self.provider.name() {
            return Err(KeyError::MasterKeyChanged);
        }
        match self
            .provider
            .unwrap_root_kek(current.id, &current.wrapped_key)
            .await
        {
            Ok(_) => Ok(current),
            Err(ProviderError::KeyMismatch) => Err(KeyError::MasterKeyChanged),
            Err(e) => Err(e.into()),
        }
    }

    /// Finishes a root-KEK rotation in the background: after a rotation was
    /// requested, or at start when an earlier process left one unfinished (a
    /// crash, SIGKILL), and every minute while one is unfinished. Re-wraps
    /// [`REWRAP_BATCH`] versions per transaction and logs the outcome (the
    /// API shows it too). Safe to run on several replicas at once.
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
                tracing::warn!(error = %e, "root KEK re-wrap stopped; it is retried in a minute and at the next start")
            }
        }
    }

    /// Re-wraps every version still wrapped by a retiring root KEK under the
    /// active one, `batch` rows per transaction, then deletes the retired KEKs.
    /// Each row is tagged with its KEK and updated by compare-and-swap, so the
    /// work can stop at any point (a crash, SIGKILL) and resume, by this process
    /// or another, with every key still unwrappable. Each retiring KEK is
    /// re-wrapped and retired on its own: one that fails does not keep the
    /// others' versions under their old KEK. Why one stopped is kept on its
    /// row (`rewrap_error`, shown by `GET /v1/admin/root-kek`) and counted in
    /// `keyward_root_kek_rewrap_failures_total`. Returns rows re-wrapped, or
    /// the first failure once every KEK was tried.
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
        let mut done = 0u64;
        let mut first_failure = None;
        for old_id in retiring {
            let outcome = self
                .retire_one(
                    &root,
                    old_id,
                    batch,
                    pause,
                    &mut done,
                    remaining,
                    &mut progress,
                )
                .await;
            let error = outcome.as_ref().err().map(|e| e.to_string());
            if let Err(e) = self.store.set_rewrap_error(old_id, error.as_deref()).await {
                tracing::warn!(kek_id = %old_id, error = %e, "cannot record the re-wrap's state");
            }
            if let Err(e) = outcome {
                metrics::counter!("keyward_root_kek_rewrap_failures_total").increment(1);
                tracing::warn!(kek_id = %old_id, error = %e, "re-wrap of a retiring root KEK stopped; the others go on");
                first_failure.get_or_insert(e);
            }
        }
        match first_failure {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    /// Re-wraps the versions and job sources of one retiring KEK under the
    /// active one and deletes it.
    #[allow(clippy::too_many_arguments)]
    async fn retire_one(
        &self,
        root: &RootKeys,
        old_id: KekId,
        batch: u32,
        pause: Duration,
        done: &mut u64,
        remaining: u64,
        progress: &mut impl FnMut(u64, u64),
    ) -> Result<(), KeyError> {
        let new_id = root.active;
        let new_kek = &root.keys[&new_id];
        let old_kek = root.keys.get(&old_id).ok_or(KeyError::UnknownKek(old_id))?;
        // Passes over the versions in id order until a pass moves none: a
        // replica that has not yet heard of the rotation may still add
        // versions under the old KEK behind the cursor. A version whose key
        // fails to unwrap is left where it is (with its KEK) and reported,
        // while every other version moves on.
        let mut failed: Vec<VersionId> = vec![];
        for pass in 0.. {
            if pass == 10 {
                return Err(KeyError::Integrity(format!(
                    "versions keep appearing under retiring root KEK {old_id}; run the re-wrap again once every replica has loaded the new root KEK"
                )));
            }
            if pass > 1 {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let mut moved = 0u64;
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
                    // Any length: a data key or an RSA private key.
                    let Ok(key) =
                        old_kek.unwrap_bytes(&WrappedKey(row.wrapped_key.clone()), &old_aad)
                    else {
                        if !failed.contains(&row.id) {
                            failed.push(row.id);
                        }
                        continue;
                    };
                    let new_aad = data_key_aad(
                        row.encryption_id.as_bytes(),
                        row.id.as_bytes(),
                        new_id.as_bytes(),
                    );
                    updates.push((
                        row.id,
                        row.wrapped_key.clone(),
                        new_kek.wrap_bytes(&key, &new_aad).0,
                    ));
                }
                if !updates.is_empty() {
                    let n = self.store.rewrap_versions(old_id, new_id, &updates).await?;
                    moved += n;
                    *done += n;
                    progress(*done, remaining);
                }
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
            }
            if moved == 0 {
                break;
            }
        }
        if !failed.is_empty() {
            let shown: Vec<String> = failed.iter().take(5).map(|v| v.to_string()).collect();
            return Err(KeyError::Integrity(format!(
                "{} key version(s) fail to unwrap under root KEK {old_id} and stay under it ({}{}); every other version was re-wrapped",
                failed.len(),
                shown.join(", "),
                if failed.len() > shown.len() { ", ..." } else { "" }
            )));
        }
        for (job, sealed) in self.store.jobs_sealed_by(old_id).await? {
            let plain = self.open_job_source(job, old_id, &sealed)?;
            let (kek, resealed) = self.seal_job_source(job, &plain)?;
            self.store.reseal_job(job, &sealed, &resealed, kek).await?;
        }
        for row in self.store.wrapping_keys_wrapped_by(old_id).await? {
            let old_aad = crypto::wrapping_key_aad(row.tenant_id.as_bytes(), old_id.as_bytes());
            let der = old_kek
                .unwrap_bytes(&WrappedKey(row.wrapped_key.clone()), &old_aad)
                .map_err(|_| {
                    KeyError::Integrity(format!(
                        "the import wrapping key of tenant {} fails to unwrap under root KEK {old_id}",
                        row.tenant_id
                    ))
                })?;
            let new_aad = crypto::wrapping_key_aad(row.tenant_id.as_bytes(), new_id.as_bytes());
            let rewrapped = new_kek.wrap_bytes(&der, &new_aad).0;
            self.store
                .rewrap_wrapping_key(row.tenant_id, old_id, &row.wrapped_key, new_id, &rewrapped)
                .await?;
        }
        // Keyward's own sealed secrets (the ACME account and certificate
        // key): without this, retiring the KEK would leave them unopenable.
        // One that fails to open stays under the old KEK, which then is not
        // retired, and is named.
        for row in self.store.secrets_sealed_by(old_id).await? {
            let purpose = row.slot.purpose();
            let aad = secret_aad(&purpose);
            let plain = row
                .sealed
                .split_first_chunk::<NONCE_LEN>()
                .and_then(|(nonce, ct)| crypto::open(old_kek, nonce, &aad, ct).ok())
                .ok_or_else(|| {
                    KeyError::Integrity(format!(
                        "sealed {purpose} fails to open under root KEK {old_id}"
                    ))
                })?;
            let sealed = crypto::seal(new_kek, &aad, &plain);
            let mut resealed = sealed.nonce.to_vec();
            resealed.extend_from_slice(&sealed.ciphertext);
            // A slot replaced meanwhile (a renewal stored a new key under the
            // active KEK) needs nothing.
            self.store
                .reseal_secret(&row.slot, &row.sealed, &resealed, new_id)
                .await?;
        }
        if self.store.retire_root_kek(old_id).await? {
            tracing::info!(kek_id = %old_id, "root KEK retired: no version needs it any more");
            Ok(())
        } else {
            Err(KeyError::Integrity(format!(
                "root KEK {old_id} still wraps key versions; run the re-wrap again"
            )))
        }
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

    /// [`KeyService::open_job_source`], loading the root keys first when the
    /// source is sealed under a root KEK this process has not loaded yet: one
    /// that another replica made moments ago by a root-KEK rotation, before
    /// it created the job. Without this the job failed for good.
    pub async fn open_job_source_loading(
        &self,
        job: uuid::Uuid,
        kek: KekId,
        sealed: &[u8],
    ) -> Result<crypto::SecretBytes, KeyError> {
        match self.open_job_source(job, kek, sealed) {
            Err(KeyError::UnknownKek(_)) => {
                self.load_root_keys_for(kek).await?;
                self.open_job_source(job, kek, sealed)
            }
            other => other,
        }
    }

    /// Loads the root keys again unless `kek` is loaded meanwhile: one reload
    /// at a time, so that requests that missed together wait for one
    /// provider call instead of each making one.
    pub(super) async fn load_root_keys_for(&self, kek: KekId) -> Result<(), KeyError> {
        let _one = self.reload.lock().await;
        if self.root()?.keys.contains_key(&kek) {
            return Ok(());
        }
        tracing::info!(%kek, "a root KEK not loaded here is named; reloading the root keys");
        self.load_root_keys().await.map_err(|e| match e {
            RootKeyError::Provider(p) => KeyError::Provider(p),
            RootKeyError::ProviderRefused { reason, .. } => {
                KeyError::Provider(ProviderError::Misconfigured(reason))
            }
            RootKeyError::Store(s) => KeyError::Store(s),
            // A master key migrated away from under this process, and a KEK
            // made since: it stopped serving (503).
            other => match self.not_ready_reason() {
                Some(reason) => KeyError::NotReady(reason),
                None => KeyError::Integrity(other.to_string()),
            },
        })
    }

    /// Opens a sealed job source.
    pub fn open_job_source(
        &self,
        job: uuid::Uuid,
        kek: KekId,
        sealed: &[u8],
    ) -> Result<crypto::SecretBytes, KeyError> {
        let root = self.root()?;
        let key = root.keys.get(&kek).ok_or(KeyError::UnknownKek(kek))?;
        let Some((nonce, ct)) = sealed.split_first_chunk::<NONCE_LEN>() else {
            return Err(KeyError::Integrity(format!(
                "job {job}: sealed source too short"
            )));
        };
        crypto::open(key, nonce, &job_aad(job), ct).map_err(|()| {
            KeyError::Integrity(format!("job {job}: sealed source fails to authenticate"))
        })
    }
}

impl KeyService {
    /// Seals a small secret Keyward keeps for itself (the ACME account and
    /// certificate keys, the client CA's key) under the active root KEK,
    /// bound to `purpose` (a row copied onto another purpose fails to open).
    /// Returns the KEK id and `nonce || ciphertext || tag`.
    pub fn seal_secret(&self, purpose: &str, plain: &[u8]) -> Result<(KekId, Vec<u8>), KeyError> {
        let root = self.root()?;
        let sealed = crypto::seal(&root.keys[&root.active], &secret_aad(purpose), plain);
        let mut out = sealed.nonce.to_vec();
        out.extend_from_slice(&sealed.ciphertext);
        Ok((root.active, out))
    }

    /// Opens what [`KeyService::seal_secret`] sealed, loading the root keys
    /// first when `kek` is one another replica made since this one loaded them.
    pub async fn open_secret(
        &self,
        purpose: &str,
        kek: KekId,
        sealed: &[u8],
    ) -> Result<crypto::SecretBytes, KeyError> {
        if !self.root()?.keys.contains_key(&kek) {
            self.load_root_keys_for(kek).await?;
        }
        let root = self.root()?;
        let key = root.keys.get(&kek).ok_or(KeyError::UnknownKek(kek))?;
        let Some((nonce, ct)) = sealed.split_first_chunk::<NONCE_LEN>() else {
            return Err(KeyError::Integrity(format!("sealed {purpose}: too short")));
        };
        crypto::open(key, nonce, &secret_aad(purpose), ct)
            .map_err(|()| KeyError::Integrity(format!("sealed {purpose} fails to authenticate")))
    }
}

fn secret_aad(purpose: &str) -> Vec<u8> {
    let mut aad = b"keyward:secret:v1:".to_vec();
    aad.extend_from_slice(purpose.as_bytes());
    aad
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
            .map_err(|e| wrap_failed(provider, kek_id, e))?;
        let row = RootKekRow {
            id: kek_id,
            provider: provider.name().to_string(),
            wrapped_key: wrapped,
            state: KekState::Active,
            created_at: now_ms(),
            rewrap_error: None,
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
            active = Some((row.id, checkpoint_key(store, row.id, &kek).await?));
        }
        keys.insert(row.id, Arc::new(kek.cipher()));
    }
    let (active, checkpoint) = active.ok_or_else(|| {
        RootKeyError::Store(StoreError::Corrupt {
            table: "root_keks",
            detail: "no active root KEK".into(),
        })
    })?;
    Ok(RootKeys {
        active,
        keys,
        checkpoint,
    })
}

/// The audit checkpoint key of root KEK `kek_id`, its public half recorded
/// in the database (where `keyward audit public-keys` finds it, also after
/// the KEK is retired).
async fn checkpoint_key(
    store: &Store,
    kek_id: KekId,
    kek: &DataKey,
) -> Result<Arc<CheckpointKey>, StoreError> {
    let key = CheckpointKey::derive(kek);
    store
        .record_checkpoint_key(&CheckpointKeyRow {
            key_id: key.id().to_string(),
            public_key: crypto::hex(key.public_key()),
            kek_id: kek_id.to_string(),
            created_at: now_ms(),
        })
        .await?;
    Ok(Arc::new(key))
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
            ProviderError::Misconfigured(reason) => RootKeyError::ProviderRefused {
                provider: provider.name(),
                kek_id: row.id,
                reason,
            },
            other => RootKeyError::Provider(other),
        })
}

/// A failed wrap: a provider that refuses its configuration (credentials,
/// key) says so and is not retried; anything else is an outage.
fn wrap_failed(provider: &dyn MasterKeyProvider, kek_id: KekId, e: ProviderError) -> RootKeyError {
    match e {
        ProviderError::Misconfigured(reason) => RootKeyError::ProviderRefused {
            provider: provider.name(),
            kek_id,
            reason,
        },
        other => RootKeyError::Provider(other),
    }
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
            .map_err(|e| wrap_failed(to, row.id, e))?;
        // Prove the new wrapping before committing to it.
        let back = to
            .unwrap_root_kek(row.id, &wrapped)
            .await
            .map_err(|e| wrap_failed(to, row.id, e))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::master_key::EnvMasterKey;
    use crate::store::StoreError;

    async fn service(master: &DataKey) -> (Store, KeyService) {
        let store = Store::connect("sqlite::memory:", 1).await.unwrap();
        store.migrate().await.unwrap();
        let service = KeyService::new(store.clone(), Arc::new(EnvMasterKey::new(master)), 16);
        service.load_root_keys().await.unwrap();
        (store, service)
    }

    /// A migration's re-wrap of the root KEKs, built from what it read.
    async fn migration_of(
        rows: &[RootKekRow],
        from: &EnvMasterKey,
        to: &EnvMasterKey,
    ) -> Vec<(KekId, Vec<u8>, String, Vec<u8>)> {
        let mut out = vec![];
        for row in rows {
            let kek = from
                .unwrap_root_kek(row.id, &row.wrapped_key)
                .await
                .unwrap();
            let wrapped = to.wrap_root_kek(row.id, &kek).await.unwrap();
            out.push((row.id, row.wrapped_key.clone(), "env".to_string(), wrapped));
        }
        out
    }

    #[tokio::test]
    async fn a_rotation_between_a_migrations_read_and_commit_fails_the_migration() {
        let old = DataKey::generate();
        let (store, service) = service(&old).await;
        let read = store.root_keks().await.unwrap();
        let update = migration_of(
            &read,
            &EnvMasterKey::new(&old),
            &EnvMasterKey::new(&DataKey::generate()),
        )
        .await;
        // A server still on the old master key rotates in between.
        service.rotate_root_kek().await.unwrap();
        match store.rewrap_root_keks(&update).await {
            Err(StoreError::Raced(_)) => {}
            other => panic!("the migration committed over a rotation: {other:?}"),
        }
        // Nothing changed: the old master key still opens every KEK.
        let after = store.root_keks().await.unwrap();
        assert_eq!(after.len(), 2);
        for row in after {
            EnvMasterKey::new(&old)
                .unwrap_root_kek(row.id, &row.wrapped_key)
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn a_migration_between_a_rotations_check_and_commit_fails_the_rotation() {
        let old = DataKey::generate();
        let new = DataKey::generate();
        let (store, _service) = service(&old).await;
        let read = store.root_keks().await.unwrap();
        let checked = read[0].clone();
        let update = migration_of(&read, &EnvMasterKey::new(&old), &EnvMasterKey::new(&new)).await;
        store.rewrap_root_keks(&update).await.unwrap();
        let kek = RootKekRow {
            id: KekId::new_random(),
            provider: "env".into(),
            wrapped_key: vec![1, 2, 3],
            state: KekState::Active,
            created_at: now_ms(),
            rewrap_error: None,
        };
        match store.begin_kek_rotation(&kek, &checked).await {
            Err(StoreError::Raced(_)) => {}
            other => panic!("the rotation committed over a migration: {other:?}"),
        }
        let after = store.root_keks().await.unwrap();
        assert_eq!(after.len(), 1);
        EnvMasterKey::new(&new)
            .unwrap_root_kek(after[0].id, &after[0].wrapped_key)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_server_on_the_old_master_key_refuses_to_rotate_after_a_migration() {
        let old = DataKey::generate();
        let (store, service) = service(&old).await;
        let n = migrate_master_key(
            &store,
            &EnvMasterKey::new(&old),
            &EnvMasterKey::new(&DataKey::generate()),
        )
        .await
        .unwrap();
        assert_eq!(n, 1);
        assert!(matches!(
            service.rotate_root_kek().await,
            Err(KeyError::MasterKeyChanged)
        ));
        assert_eq!(store.root_keks().await.unwrap().len(), 1);
    }

    /// Replica B has not loaded the root KEK that replica A made and sealed
    /// a job's source under: B, running the job, loads it instead of
    /// failing the job for good (found by the integrity schedule).
    #[tokio::test]
    async fn a_job_sealed_under_a_root_kek_made_elsewhere_opens_after_a_reload() {
        let master = DataKey::generate();
        let (store, a) = service(&master).await;
        let b = KeyService::new(store.clone(), Arc::new(EnvMasterKey::new(&master)), 16);
        b.load_root_keys().await.unwrap();
        a.rotate_root_kek().await.unwrap();
        let job = uuid::Uuid::new_v4();
        let (kek, sealed) = a.seal_job_source(job, b"the source").unwrap();
        assert!(matches!(
            b.open_job_source(job, kek, &sealed),
            Err(KeyError::UnknownKek(_))
        ));
        let plain = b.open_job_source_loading(job, kek, &sealed).await.unwrap();
        assert_eq!(plain.as_ref(), b"the source");
    }

    #[tokio::test]
    async fn a_second_rotation_waits_for_the_first() {
        let (store, service) = service(&DataKey::generate()).await;
        service.rotate_root_kek().await.unwrap();
        assert!(matches!(
            service.rotate_root_kek().await,
            Err(KeyError::RotationInProgress)
        ));
        service
            .rewrap_retiring(10, Duration::ZERO, |_, _| {})
            .await
            .unwrap();
        assert_eq!(store.root_keks().await.unwrap().len(), 1);
        service.rotate_root_kek().await.unwrap();
    }

    #[tokio::test]
    async fn a_rotate_under_a_root_kek_another_replica_retired_is_a_503_and_the_next_works() {
        let master = DataKey::generate();
        let (store, a) = service(&master).await;
        let b = KeyService::new(store.clone(), Arc::new(EnvMasterKey::new(&master)), 16);
        b.load_root_keys().await.unwrap();
        let tenant = crate::domain::accounts::create_tenant(&store, "acme")
            .await
            .unwrap()
            .tenant
            .id;
        let enc = b
            .create_encryption(
                tenant,
                crate::domain::service::EncryptionOptions::aes(None),
                None,
            )
            .await
            .unwrap()
            .encryption
            .id;
        b.entry(tenant, enc).await.unwrap();
        // A rotates the root KEK and retires the old one before B hears of it.
        a.rotate_root_kek().await.unwrap();
        a.rewrap_retiring(10, Duration::ZERO, |_, _| {})
            .await
            .unwrap();
        let refused = b.rotate(tenant, enc, None).await.unwrap_err();
        assert!(refused.is_unavailable(), "{refused:?}");
        // B reloaded its root keys on the way out: the retry works.
        b.rotate(tenant, enc, None).await.unwrap();
    }
}
