//! Search over encrypted fields: computing blind-index values, and managing
//! an encryption's blind indexes (create, rotate, retire). Deterministic
//! encryption is in `contract.rs`, beside the encryption it is a mode of.
//!
//! A blind-index key is never stored: each index version names the key
//! version (its "anchor") whose data key its key is derived from, with
//! HKDF-SHA256 over the encryption id, the index name, the index version and
//! the anchor's id. The data key itself never computes an index value, and an
//! index value never needs or reveals a decryption (see docs/search.md).

use super::state::KeyService;
use crate::crypto::{blind_index, IndexKey};
use crate::domain::client_key::ClientKey;
use crate::domain::error::KeyError;
use crate::domain::ids::{EncryptionId, TenantId};
use crate::domain::keys::VersionedKey;
use crate::domain::records::BlindIndexRow;
use crate::domain::search::{
    normalize, BlindIndex, Normalization, MAX_INDEXES, MAX_LIVE_INDEX_VERSIONS,
};
use crate::domain::time::now_ms;
use crate::store::IndexChange;

/// One blind-index value.
#[derive(Debug, Clone)]
pub struct IndexValue {
    /// The index's name.
    pub name: String,
    /// The index version it was computed under.
    pub version: i64,
    /// `ceil(bits / 8)` bytes.
    pub value: Vec<u8>,
}

/// Which indexes, under which versions.
#[derive(Debug, Clone, Copy)]
pub struct IndexSelection<'a> {
    /// These indexes (each must exist); `None`: every index of the encryption.
    pub names: Option<&'a [String]>,
    /// Every live version of each (newest first) instead of the active one
    /// only: what a lookup during an index rotation asks for.
    pub all_versions: bool,
}

/// The label of blind-index key derivation.
const INDEX_KEY_LABEL: &str = "keyward:blind-index:v1";

impl KeyService {
    /// The blind-index values of `data` under the tenant's encryption `id`.
    /// Needs no decryption and makes none.
    pub async fn index_values(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        data: &str,
        which: IndexSelection<'_>,
        client_key: Option<&ClientKey>,
    ) -> Result<Vec<IndexValue>, KeyError> {
        let key = self.entry(tenant, id).await?;
        key.check_mode(client_key)?;
        self.check_client_key_attempts(id, client_key)?;
        let key = match which.names {
            // An index created moments ago on another replica: one reload
            // (bounded like an unknown version's).
            Some(names) if names.iter().any(|n| key.index(n).is_none()) => {
                self.entry_reloaded(key).await?
            }
            _ => key,
        };
        let mut out = Vec::new();
        let selected: Vec<&BlindIndex> = match which.names {
            None => key.indexes.iter().collect(),
            Some(names) => names
                .iter()
                .map(|n| key.index(n).ok_or(KeyError::IndexNotFound))
                .collect::<Result<_, _>>()?,
        };
        for index in selected {
            let normalized =
                normalize(&index.normalizations, data).ok_or(KeyError::IndexValueTooLong)?;
            let versions: Vec<(i64, crate::domain::VersionId)> = if which.all_versions {
                index.live_versions().collect()
            } else {
                index.active().into_iter().collect()
            };
            for (number, anchor) in versions {
                let index_key = self.index_key(&key, index, number, anchor, client_key)?;
                out.push(IndexValue {
                    name: index.name.clone(),
                    version: number,
                    value: blind_index(&index_key, normalized.as_bytes(), index.bits),
                });
            }
        }
        metrics::counter!("keyward_index_values_total").increment(out.len() as u64);
        Ok(out)
    }

    /// The key of `index`'s version `number`, derived from its anchor's data
    /// key (unwrapped from the client's key for this call in client mode).
    fn index_key(
        &self,
        key: &VersionedKey,
        index: &BlindIndex,
        number: i64,
        anchor: crate::domain::VersionId,
        client_key: Option<&ClientKey>,
    ) -> Result<IndexKey, KeyError> {
        let id = key.id;
        let derived = key.with_key_of(anchor, client_key, |k| {
            k.derive(
                INDEX_KEY_LABEL,
                &[
                    id.as_bytes(),
                    index.name.as_bytes(),
                    &number.to_be_bytes(),
                    anchor.as_bytes(),
                ],
            )
        });
        let derived = self.count_client_key(id, derived)?;
        Ok(IndexKey::new(&derived))
    }

    /// Creates a blind index on the tenant's encryption, its first version
    /// anchored at the active key version.
    pub async fn create_index(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        name: String,
        bits: u16,
        normalizations: &[Normalization],
    ) -> Result<BlindIndexRow, KeyError> {
        let key = self.entry(tenant, id).await?;
        if key.algorithm == crate::domain::algorithm::Algorithm::RsaOaep256 {
            // Index keys derive from a version's AES data key; an RSA
            // encryption's versions hold RSA keys.
            return Err(KeyError::InvalidPolicy(
                "blind indexes need an AES encryption (`AES-256-GCM` or `AES-256-GCM-SIV`)".into(),
            ));
        }
        if self.store.blind_indexes(id).await?.len() >= MAX_INDEXES {
            return Err(KeyError::TooManyIndexes(MAX_INDEXES));
        }
        let row = BlindIndexRow {
            encryption_id: id,
            name,
            bits: i64::from(bits),
            normalizations: normalizations
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(","),
            active_version: 1,
            min_version: 1,
            created_at: now_ms(),
            updated_at: now_ms(),
            versions: Vec::new(),
        };
        match self
            .store
            .insert_blind_index(tenant, &row, key.active)
            .await?
        {
            IndexChange::Done => {}
            IndexChange::NoEncryption => return Err(KeyError::EncryptionNotFound),
            IndexChange::Conflict | IndexChange::NoIndex => return Err(KeyError::IndexExists),
        }
        self.ring.invalidate(id);
        tracing::info!(encryption_id = %id, index = %row.name, "blind index created");
        self.index(tenant, id, &row.name).await
    }

    /// The tenant's encryption's blind indexes, fresh from the store.
    pub async fn list_indexes(
        &self,
        tenant: TenantId,
        id: EncryptionId,
    ) -> Result<Vec<BlindIndexRow>, KeyError> {
        self.encryption_details(tenant, id).await?;
        Ok(self.store.blind_indexes(id).await?)
    }

    /// One blind index, fresh from the store.
    pub async fn index(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        name: &str,
    ) -> Result<BlindIndexRow, KeyError> {
        self.list_indexes(tenant, id)
            .await?
            .into_iter()
            .find(|i| i.name == name)
            .ok_or(KeyError::IndexNotFound)
    }

    /// Makes a new version of a blind index's key active, anchored at the
    /// encryption's active key version. Older versions stay live (lookups
    /// can ask for them) until `minVersion` retires them.
    pub async fn rotate_index(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        name: &str,
    ) -> Result<BlindIndexRow, KeyError> {
        let key = self.entry(tenant, id).await?;
        let version = match self
            .store
            .rotate_blind_index(
                tenant,
                id,
                name,
                key.active,
                MAX_LIVE_INDEX_VERSIONS,
                now_ms(),
            )
            .await?
        {
            Ok(v) => v,
            Err(IndexChange::NoEncryption) => return Err(KeyError::EncryptionNotFound),
            Err(IndexChange::Conflict) => {
                return Err(KeyError::TooManyIndexVersions(MAX_LIVE_INDEX_VERSIONS))
            }
            Err(_) => return Err(KeyError::IndexNotFound),
        };
        self.ring.invalidate(id);
        tracing::info!(encryption_id = %id, index = %name, version, "blind index key rotated");
        self.index(tenant, id, name).await
    }

    /// Retires the blind index's versions below `min_version` (from 1 to the
    /// active version): lookups no longer get values under them, and the key
    /// versions they were anchored at may be destroyed.
    pub async fn set_index_min_version(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        name: &str,
        min_version: i64,
    ) -> Result<BlindIndexRow, KeyError> {
        match self
            .store
            .set_blind_index_min_version(tenant, id, name, min_version, now_ms())
            .await?
        {
            IndexChange::Done => {}
            IndexChange::NoEncryption => return Err(KeyError::EncryptionNotFound),
            IndexChange::NoIndex => return Err(KeyError::IndexNotFound),
            IndexChange::Conflict => {
                return Err(KeyError::InvalidIndexChange(
                    "`minVersion` must be from the index's current minimum to its active version (a retired index version stays retired)".into(),
                ))
            }
        }
        self.ring.invalidate(id);
        self.index(tenant, id, name).await
    }
}
