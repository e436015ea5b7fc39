//! Creating and reading encryptions.

use super::contract::wrap_client_key;
use super::state::KeyService;
use crate::crypto::{self, DataKey, RsaBits};
use crate::domain::algorithm::Algorithm;
use crate::domain::client_key::ClientKey;
use crate::domain::error::KeyError;
use crate::domain::ids::{EncryptionId, TenantId, VersionId};
use crate::domain::keys::{generate_rsa, pkcs8};
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

/// What an encryption is created with besides its tenant.
#[derive(Debug, Clone)]
pub struct EncryptionOptions {
    /// An optional human name.
    pub name: Option<String>,
    /// Its algorithm.
    pub algorithm: Algorithm,
    /// The RSA size (RSA-OAEP-256 only; 3072 when not given).
    pub rsa_bits: Option<RsaBits>,
    /// Whether its keys may ever be exported (fixed now, for good).
    pub exportable: bool,
}

impl EncryptionOptions {
    /// An AES-256-GCM encryption named `name`, not exportable.
    pub fn aes(name: Option<String>) -> EncryptionOptions {
        EncryptionOptions {
            name,
            algorithm: Algorithm::Aes256Gcm,
            rsa_bits: None,
            exportable: false,
        }
    }
}

impl KeyService {
    /// Creates an encryption with its first version. With a client key the
    /// encryption is client-mode: every later call must bring the same key.
    /// An RSA-OAEP-256 encryption is platform-managed only.
    pub async fn create_encryption(
        &self,
        tenant: TenantId,
        options: EncryptionOptions,
        client_key: Option<&ClientKey>,
    ) -> Result<EncryptionDetails, KeyError> {
        let EncryptionOptions {
            name,
            algorithm,
            rsa_bits,
            exportable,
        } = options;
        let id = EncryptionId::new_random();
        let version_id = VersionId::new_random();
        let salt: [u8; 32] = crypto::random_bytes();
        let rsa_bits = match algorithm {
            Algorithm::Aes256Gcm | Algorithm::Aes256GcmSiv => None,
            Algorithm::RsaOaep256 => Some(rsa_bits.unwrap_or(RsaBits::B3072)),
        };
        let (mode, first) = match (client_key, rsa_bits) {
            (None, None) => (
                Mode::Platform,
                self.wrap_platform_key(id, version_id, &DataKey::generate())?,
            ),
            (Some(ck), None) => (
                Mode::Client,
                wrap_client_key(id, &salt, ck, version_id, &DataKey::generate()),
            ),
            (None, Some(bits)) => {
                self.root()?;
                let key = generate_rsa(bits).await?;
                (
                    Mode::Platform,
                    self.wrap_platform_material(id, version_id, &pkcs8(&key)?, false)?,
                )
            }
            (Some(_), Some(_)) => return Err(KeyError::InvalidPolicy(
                "an RSA-OAEP-256 encryption is platform-managed: create it without X-Master-Key"
                    .into(),
            )),
        };
        self.store
            .insert_encryption(
                &NewEncryption {
                    id,
                    tenant_id: tenant,
                    name,
                    mode,
                    salt: salt.to_vec(),
                    algorithm: algorithm.as_str(),
                    exportable,
                    key_bits: rsa_bits.map(|b| b.bits() as i64),
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
