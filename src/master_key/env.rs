//! The `env` provider: a 32-byte master key given as base64 in
//! `KEYWARD_MASTER_KEY`. It wraps the root KEK locally with AES-256-GCM.

use super::provider::{MasterKeyProvider, ProviderError, ProviderFuture};
use crate::crypto::{root_kek_aad, CipherKey, DataKey, WrappedKey};
use crate::domain::ids::KekId;

/// A master key held in memory, from the environment (or, in dev mode, a file).
pub struct EnvMasterKey {
    cipher: CipherKey,
}

impl EnvMasterKey {
    /// The provider for this key.
    pub fn new(key: &DataKey) -> Self {
        EnvMasterKey {
            cipher: key.cipher(),
        }
    }
}

impl MasterKeyProvider for EnvMasterKey {
    fn name(&self) -> &'static str {
        "env"
    }

    fn key_setting(&self) -> &'static str {
        "KEYWARD_MASTER_KEY"
    }

    fn wrap_root_kek<'a>(&'a self, kek_id: KekId, kek: &'a DataKey) -> ProviderFuture<'a, Vec<u8>> {
        let wrapped = self.cipher.wrap(kek, &root_kek_aad(kek_id.as_bytes()));
        Box::pin(async move { Ok(wrapped.0) })
    }

    fn unwrap_root_kek<'a>(
        &'a self,
        kek_id: KekId,
        wrapped: &'a [u8],
    ) -> ProviderFuture<'a, DataKey> {
        let result = self
            .cipher
            .unwrap_key(
                &WrappedKey(wrapped.to_vec()),
                &root_kek_aad(kek_id.as_bytes()),
            )
            .map_err(|_| ProviderError::KeyMismatch);
        Box::pin(async move { result })
    }
}
