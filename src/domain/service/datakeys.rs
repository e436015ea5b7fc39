//! Data keys for envelope encryption (`POST /v1/datakey`, `/v1/datakey/unwrap`,
//! `/v1/datakey/rewrap`): a fresh 256-bit key, returned in plaintext and
//! wrapped under one of the encryption's versions, for the caller to encrypt
//! with locally (or for a stream, see [`crate::crypto::stream`]).
//!
//! A wrapped data key is self-describing, so unwrapping needs nothing but it,
//! the encryption id and the context (docs/envelope.md, "Data keys"):
//!
//! ```text
//! AES encryptions:  0x01 ‖ version id (16) ‖ nonce (12) ‖ AES-256-GCM(key) with tag (48)   77 bytes
//! RSA-OAEP-256:     0x02 ‖ version id (16) ‖ RSA-OAEP-256 block, label = binding
//! ```
//!
//! The AES form seals under `HKDF(version key, "keyward:datakey:v1", enc id,
//! version id)`, never the version key itself; both forms bind
//! [`wrapped_data_key_binding`] (encryption, version, caller context), whose
//! label differs from every `/v1/decrypt` binding, so a wrapped data key
//! never opens through decrypt, which is why unwrapping is its own scope.
//! Version states, `minDecryptionVersion`, client mode and the nonce bound
//! apply exactly as to ciphertexts.

use super::state::KeyService;
use crate::crypto::{self, wrapped_data_key_binding, DataKey, NONCE_LEN, TAG_LEN};
use crate::domain::client_key::ClientKey;
use crate::domain::error::KeyError;
use crate::domain::ids::{EncryptionId, TenantId, VersionId};
use crate::domain::keys::{rsa_open, Mode, VersionKey};

/// The label of the key that wraps an AES encryption's data keys.
const WRAPPING_LABEL: &str = "keyward:datakey:v1";
/// The first byte of a wrapped data key under an AES version.
const FORM_AES: u8 = 1;
/// The first byte of a wrapped data key under an RSA-OAEP-256 version.
const FORM_RSA: u8 = 2;
/// The length of the AES form.
const AES_FORM_LEN: usize = 1 + 16 + NONCE_LEN + crypto::KEY_LEN + TAG_LEN;

/// A data key fresh from [`KeyService::generate_data_key`].
#[derive(Debug)]
pub struct GeneratedDataKey {
    /// The key (zeroized on drop).
    pub key: DataKey,
    /// The key wrapped under `version_id` (the format above).
    pub wrapped: Vec<u8>,
    /// The version that wraps it.
    pub version_id: VersionId,
}

/// The version id a wrapped data key names, if it is well formed.
pub fn wrapped_key_version(wrapped: &[u8]) -> Option<VersionId> {
    match wrapped.first() {
        Some(&FORM_AES) if wrapped.len() == AES_FORM_LEN => {}
        Some(&FORM_RSA) if wrapped.len() > 17 => {}
        _ => return None,
    }
    let id: [u8; 16] = wrapped.get(1..17)?.try_into().ok()?;
    Some(VersionId(uuid::Uuid::from_bytes(id)))
}

impl KeyService {
    /// A fresh data key wrapped under the encryption's active version, bound
    /// to `context` (empty: none).
    pub async fn generate_data_key(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        context: &[u8],
        client_key: Option<&ClientKey>,
    ) -> Result<GeneratedDataKey, KeyError> {
        let key = DataKey::generate();
        let (wrapped, version_id) = self
            .wrap_data_key(tenant, id, &key, context, client_key)
            .await?;
        Ok(GeneratedDataKey {
            key,
            wrapped,
            version_id,
        })
    }

    /// Unwraps a data key made by [`KeyService::generate_data_key`] (or
    /// rewrapped since). Any mismatch (another encryption, version or
    /// context, a changed byte) is [`KeyError::DecryptionFailed`]; a
    /// disabled, destroyed or below-minimum version answers as for decrypt.
    pub async fn unwrap_data_key(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        wrapped: &[u8],
        context: &[u8],
        client_key: Option<&ClientKey>,
    ) -> Result<(DataKey, VersionId), KeyError> {
        let key = self.entry(tenant, id).await?;
        key.check_mode(client_key)?;
        self.check_client_key_attempts(id, client_key)?;
        let version = wrapped_key_version(wrapped).ok_or(KeyError::DecryptionFailed)?;
        let key = match self.entry_with_version(key, version).await {
            Ok(k) => k,
            Err(KeyError::VersionNotFound) => return Err(KeyError::DecryptionFailed),
            Err(e) => return Err(e),
        };
        let v = key.key_for_decrypt(version)?;
        let binding = wrapped_data_key_binding(id.as_bytes(), version.as_bytes(), context);
        let body = &wrapped[17..];
        let opened = match (&v.key, wrapped[0]) {
            (VersionKey::Rsa(_), FORM_RSA) => {
                rsa_open(key.clone(), version, body.to_vec(), Some(binding.to_vec())).await?
            }
            (VersionKey::Rsa(_), _) => return Err(KeyError::DecryptionFailed),
            (_, FORM_AES) => {
                let (nonce, sealed) = body.split_at(NONCE_LEN);
                let nonce: [u8; NONCE_LEN] =
                    nonce.try_into().map_err(|_| KeyError::DecryptionFailed)?;
                let opened = key.with_key(v, client_key, |k| {
                    let wrapping = k.derive(WRAPPING_LABEL, &[id.as_bytes(), version.as_bytes()]);
                    crypto::open(&wrapping.cipher(), &nonce, &binding, sealed)
                });
                self.count_client_key(id, opened)?
                    .map_err(|()| KeyError::DecryptionFailed)?
            }
            _ => return Err(KeyError::DecryptionFailed),
        };
        let data_key = DataKey::from_slice(&opened).ok_or(KeyError::DecryptionFailed)?;
        Ok((data_key, version))
    }

    /// A wrapped data key moved to the encryption's active version, under
    /// the same context; the data key itself never leaves the service.
    pub async fn rewrap_data_key(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        wrapped: &[u8],
        context: &[u8],
        client_key: Option<&ClientKey>,
    ) -> Result<(Vec<u8>, VersionId), KeyError> {
        let (key, _) = self
            .unwrap_data_key(tenant, id, wrapped, context, client_key)
            .await?;
        self.wrap_data_key(tenant, id, &key, context, client_key)
            .await
    }

    /// `data_key` wrapped under the active version.
    async fn wrap_data_key(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        data_key: &DataKey,
        context: &[u8],
        client_key: Option<&ClientKey>,
    ) -> Result<(Vec<u8>, VersionId), KeyError> {
        let key = self.entry(tenant, id).await?;
        key.check_mode(client_key)?;
        self.check_client_key_attempts(id, client_key)?;
        let version = key.key_for_encrypt(None)?;
        if !version.uses.take(self.max_encryptions_per_version) {
            return Err(if version.id == key.active && key.mode == Mode::Platform {
                KeyError::RotationPending
            } else {
                KeyError::VersionExhausted
            });
        }
        let vid = version.id;
        let binding = wrapped_data_key_binding(id.as_bytes(), vid.as_bytes(), context);
        let mut out = Vec::with_capacity(AES_FORM_LEN);
        if let VersionKey::Rsa(rsa) = &version.key {
            out.push(FORM_RSA);
            out.extend_from_slice(vid.as_bytes());
            out.extend_from_slice(&rsa.public().seal(
                data_key.expose(),
                &vid.to_string(),
                Some(&binding),
            ));
            return Ok((out, vid));
        }
        let sealed = key.with_key(version, client_key, |k| {
            let wrapping = k.derive(WRAPPING_LABEL, &[id.as_bytes(), vid.as_bytes()]);
            crypto::seal(&wrapping.cipher(), &binding, data_key.expose())
        });
        let sealed = self
            .count_client_key(id, sealed)
            .inspect_err(|_| version.uses.give_back())?;
        out.push(FORM_AES);
        out.extend_from_slice(vid.as_bytes());
        out.extend_from_slice(&sealed.nonce);
        out.extend_from_slice(&sealed.ciphertext);
        Ok((out, vid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_wrapped_keys_name_a_version() {
        let vid = VersionId::new_random();
        let mut aes = vec![FORM_AES];
        aes.extend_from_slice(vid.as_bytes());
        aes.resize(AES_FORM_LEN, 0);
        assert_eq!(wrapped_key_version(&aes), Some(vid));
        assert_eq!(wrapped_key_version(&aes[..AES_FORM_LEN - 1]), None);
        aes[0] = 3;
        assert_eq!(wrapped_key_version(&aes), None);
        assert_eq!(wrapped_key_version(&[]), None);
        assert_eq!(wrapped_key_version(&[FORM_RSA; 17]), None);
    }
}
