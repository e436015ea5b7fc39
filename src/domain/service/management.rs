//! Creating and reading encryptions.

use super::contract::wrap_client_key;
use super::state::KeyService;
use crate::crypto::{self, DataKey};
use crate::domain::algorithm::Algorithm;
use crate::domain::client_key::ClientKey;
use crate::domain::error::KeyError;
use crate::domain::ids::{EncryptionId, TenantId, VersionId};
use crate::domain::records::{EncryptionRow, VersionRow};
use crate::domain::states::Mode;
use crate::domain::time::now_ms;
use crate::store::NewEncryption;

/// An encryption with its versions, as management endpoints show it.
#[derive(Debug)]
pub struct EncryptionDetails {
    /// The encryption.
    pub encryption: EncryptionRow,
    /// Its versions by number.
    pub versions: Vec<VersionRow>,
}

impl EncryptionDetails {
    /// The version with this id.
    pub fn version(&self, id: VersionId) -> Option<&VersionRow> {
        self.versions.iter().find(|v| v.id == id)
    }

    /// The active version's number (1 if the rows do not show it).
    pub fn active_number(&self) -> i64 {
        self.version(self.encryption.active_version_id)
            .map(|v| v.version)
            .unwrap_or(1)
    }
}

impl KeyService {
    /// Creates an encryption with its first version. With a client key the
    /// encryption is client-mode: every later call must bring the same key.
    pub async fn create_encryption(
        &self,
        tenant: TenantId,
        name: Option<String>,
        client_key: Option<&ClientKey>,
    ) -> Result<EncryptionDetails, KeyError> {
        self.create_encryption_with(tenant, name, Algorithm::Aes256Gcm, client_key)
            .await
    }

    /// [`KeyService::create_encryption`] with the algorithm chosen: every
    /// version of the encryption uses it.
    pub async fn create_encryption_with(
        &self,
        tenant: TenantId,
        name: Option<String>,
        algorithm: Algorithm,
        client_key: Option<&ClientKey>,
    ) -> Result<EncryptionDetails, KeyError> {
        let id = EncryptionId::new_random();
        let version_id = VersionId::new_random();
        let salt: [u8; 32] = crypto::random_bytes();
        let data_key = DataKey::generate();
        let (mode, first) = match client_key {
            None => (
                Mode::Platform,
                self.wrap_platform_key(id, version_id, &data_key)?,
            ),
            Some(ck) => (
                Mode::Client,
                wrap_client_key(id, &salt, ck, version_id, &data_key),
            ),
        };
        self.store
            .insert_encryption(
                &NewEncryption {
                    id,
                    tenant_id: tenant,
                    name,
                    mode,
                    algorithm: algorithm.as_str(),
                    salt: salt.to_vec(),
                    now_ms: now_ms(),
                },
                &first,
            )
            .await?;
        // Nothing remembered about the id (ids are random, so nothing should
        // be) may hide the new encryption from its tenant.
        self.ring.invalidate(id);
        let (encryption, versions) = self
            .store
            .encryption_with_versions(id)
            .await?
            .ok_or_else(|| KeyError::Integrity("a created encryption vanished".into()))?;
        Ok(EncryptionDetails {
            encryption,
            versions,
        })
    }

    /// One of the tenant's encryptions with its versions, fresh from the store.
    pub async fn encryption_details(
        &self,
        tenant: TenantId,
        id: EncryptionId,
    ) -> Result<EncryptionDetails, KeyError> {
        match self.store.encryption_with_versions(id).await? {
            Some((encryption, versions)) if encryption.tenant_id == tenant => {
                Ok(EncryptionDetails {
                    encryption,
                    versions,
                })
            }
            _ => Err(KeyError::EncryptionNotFound),
        }
    }

    /// One page of the tenant's encryptions.
    pub async fn list_encryptions(
        &self,
        tenant: TenantId,
        after: Option<(i64, EncryptionId)>,
        limit: u32,
    ) -> Result<Vec<EncryptionRow>, KeyError> {
        Ok(self.store.list_encryptions(tenant, after, limit).await?)
    }

    /// The active version of the tenant's encryption (from the ring).
    pub async fn active_version(
        &self,
        tenant: TenantId,
        id: EncryptionId,
    ) -> Result<(VersionId, Mode), KeyError> {
        let key = self.entry(tenant, id).await?;
        Ok((key.active, key.mode))
    }
}
