//! Asymmetric keys out and tenant keys in: a version's public key, the
//! tenant's import wrapping key, importing key material as a new version
//! (bring your own key), and the controlled export of an exportable
//! encryption's key wrapped to a public key the caller supplies.

use super::state::KeyService;
use crate::crypto::{
    self, data_key_aad, wrapping_key_aad, ImportWrapping, RsaBits, RsaPrivateKey, RsaPublicKey,
    WrappedKey,
};
use crate::domain::algorithm::Algorithm;
use crate::domain::error::KeyError;
use crate::domain::ids::{EncryptionId, TenantId, VersionId};
use crate::domain::keys::VersionKey;
use crate::domain::states::{Mode, VersionState};
use crate::domain::time::now_ms;
use crate::store::WrappingKeyRow;

/// The size of every tenant's import wrapping key (as Vault's `wrapping_key`).
const WRAPPING_KEY_BITS: RsaBits = RsaBits::B4096;

impl KeyService {
    /// The public key of an RSA-OAEP-256 encryption's version. Any version
    /// that still has its key answers (encrypting to one that no longer
    /// decrypts is the caller's choice; its state says so).
    pub async fn public_key(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        version: VersionId,
    ) -> Result<RsaPublicKey, KeyError> {
        let key = self.entry(tenant, id).await?;
        if key.algorithm != Algorithm::RsaOaep256 {
            return Err(KeyError::NotAsymmetric);
        }
        let key = self.entry_with_version(key, version).await?;
        let v = key.version(version).ok_or(KeyError::VersionNotFound)?;
        match &v.key {
            VersionKey::Rsa(rsa) => Ok(rsa.public().clone()),
            VersionKey::Destroyed => Err(KeyError::VersionDestroyed),
            _ => Err(KeyError::NotAsymmetric),
        }
    }

    /// The tenant's import wrapping key: made (RSA 4096) on first use and
    /// kept, its private half wrapped under the active root KEK.
    pub async fn wrapping_public_key(&self, tenant: TenantId) -> Result<RsaPublicKey, KeyError> {
        Ok(self.wrapping_key(tenant).await?.public().clone())
    }

    /// The tenant's wrapping key pair, made on first use.
    async fn wrapping_key(&self, tenant: TenantId) -> Result<RsaPrivateKey, KeyError> {
        if let Some(row) = self.store.wrapping_key(tenant).await? {
            return self.open_wrapping_key(&row).await;
        }
        let key = crate::domain::keys::generate_rsa(WRAPPING_KEY_BITS).await?;
        let root = self.root()?;
        let kek_id = root.active;
        let kek = root.keys.get(&kek_id).ok_or(KeyError::UnknownKek(kek_id))?;
        let row = WrappingKeyRow {
            tenant_id: tenant,
            wrapped_key: kek
                .wrap_bytes(
                    &crate::domain::keys::pkcs8(&key)?,
                    &wrapping_key_aad(tenant.as_bytes(), kek_id.as_bytes()),
                )
                .0,
            kek_id,
            public_key: key.public().spki_der().to_vec(),
            created_at: now_ms(),
        };
        self.store.insert_wrapping_key(&row).await?;
        // Another replica may have stored its key first: use the stored one.
        let stored = self
            .store
            .wrapping_key(tenant)
            .await?
            .ok_or_else(|| KeyError::Integrity("a stored wrapping key vanished".into()))?;
        self.open_wrapping_key(&stored).await
    }

    async fn open_wrapping_key(&self, row: &WrappingKeyRow) -> Result<RsaPrivateKey, KeyError> {
        let root = match self.root()? {
            r if r.keys.contains_key(&row.kek_id) => r,
            _ => {
                self.load_root_keys_for(row.kek_id).await?;
                self.root()?
            }
        };
        let kek = root
            .keys
            .get(&row.kek_id)
            .ok_or(KeyError::UnknownKek(row.kek_id))?;
        let aad = wrapping_key_aad(row.tenant_id.as_bytes(), row.kek_id.as_bytes());
        let der = kek
            .unwrap_bytes(&WrappedKey(row.wrapped_key.clone()), &aad)
            .map_err(|_| {
                KeyError::Integrity(format!(
                    "the import wrapping key of tenant {} fails to authenticate under root KEK {}",
                    row.tenant_id, row.kek_id
                ))
            })?;
        RsaPrivateKey::from_pkcs8(&der)
            .map_err(|e| KeyError::Integrity(format!("the import wrapping key is unusable: {e}")))
    }

    /// Imports key material, wrapped under the tenant's wrapping key, as a
    /// new active version of a platform-managed encryption: 32 bytes for
    /// AES-256-GCM, PKCS#8 DER of an RSA 3072 or 4096 key for RSA-OAEP-256.
    /// Every way the material can fail to unwrap or to be such a key is the
    /// same [`KeyError::ImportFailed`].
    pub async fn import_version(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        wrapping: ImportWrapping,
        wrapped: &[u8],
    ) -> Result<VersionId, KeyError> {
        let key = self.entry(tenant, id).await?;
        if key.mode != Mode::Platform {
            return Err(KeyError::ImportNotSupported(
                "a client-mode encryption's keys are wrapped by the client's key: import into a platform-managed encryption",
            ));
        }
        let unwrapping = self.wrapping_key(tenant).await?;
        let wrapped = wrapped.to_vec();
        let material = crate::domain::keys::rsa_private_work(move || {
            unwrapping.unwrap_import(wrapping, &wrapped)
        })
        .await?
        .map_err(|()| KeyError::ImportFailed)?;
        let usable = match key.algorithm {
            Algorithm::Aes256Gcm | Algorithm::Aes256GcmSiv => material.len() == crypto::KEY_LEN,
            Algorithm::RsaOaep256 => RsaPrivateKey::from_pkcs8(&material).is_ok(),
        };
        if !usable {
            return Err(KeyError::ImportFailed);
        }
        let new_id = VersionId::new_random();
        let new_version = self.wrap_platform_material(id, new_id, &material, true)?;
        let outcome = self
            .store
            .rotate(tenant, id, &new_version, now_ms())
            .await?
            .ok_or(KeyError::EncryptionNotFound)?;
        self.ring.invalidate(id);
        metrics::counter!("keyward_key_imports_total", "algorithm" => key.algorithm.as_str())
            .increment(1);
        tracing::info!(encryption_id = %id, version_id = %outcome.new_version_id, "imported key material as a new version");
        Ok(outcome.new_version_id)
    }

    /// The key material of `version` wrapped to `target` with
    /// `RSA_AES_KEY_WRAP_SHA_256`, if the encryption was created exportable.
    /// Read from its stored row (the key ring keeps no raw AES key).
    /// Returns the encryption's algorithm and the wrapped material.
    pub async fn export_version(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        version: VersionId,
        target: &RsaPublicKey,
    ) -> Result<(String, Vec<u8>), KeyError> {
        let details = self.encryption_details(tenant, id).await?;
        if !details.encryption.exportable {
            metrics::counter!("keyward_key_exports_total", "outcome" => "refused").increment(1);
            return Err(KeyError::ExportNotAllowed);
        }
        let row = details.version(version).ok_or(KeyError::VersionNotFound)?;
        let (Some(wrapped), Some(kek_id)) = (&row.wrapped_key, row.kek_id) else {
            return Err(match row.state {
                VersionState::Destroyed => KeyError::VersionDestroyed,
                _ => KeyError::ImportNotSupported(
                    "this version's key is wrapped by a client key; only platform-managed keys export",
                ),
            });
        };
        let root = match self.root()? {
            r if r.keys.contains_key(&kek_id) => r,
            _ => {
                self.load_root_keys_for(kek_id).await?;
                self.root()?
            }
        };
        let kek = root.keys.get(&kek_id).ok_or(KeyError::UnknownKek(kek_id))?;
        let aad = data_key_aad(id.as_bytes(), version.as_bytes(), kek_id.as_bytes());
        let material = kek
            .unwrap_bytes(&WrappedKey(wrapped.clone()), &aad)
            .map_err(|_| {
                KeyError::Integrity(format!(
                    "the key of version {version} fails to authenticate under root KEK {kek_id}"
                ))
            })?;
        let out = target
            .wrap_rsa_aes_kwp(&material)
            .map_err(|e| KeyError::Integrity(format!("export wrapping failed: {e}")))?;
        metrics::counter!("keyward_key_exports_total", "outcome" => "exported").increment(1);
        tracing::warn!(encryption_id = %id, version_id = %version, "key material exported, wrapped to a caller's public key");
        Ok((details.encryption.algorithm.clone(), out))
    }
}
