//! The one provider trait every provider implements, and its error.

use std::future::Future;
use std::pin::Pin;

use crate::crypto::DataKey;
use crate::domain::ids::KekId;

/// Why a provider could not wrap or unwrap.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider holds a different key than the one that wrapped this KEK.
    #[error("the master key does not match the one that wrapped the root KEK")]
    KeyMismatch,
    /// The provider could not be reached or refused the call; worth retrying.
    #[error("master-key provider unavailable: {0}")]
    Unavailable(String),
    /// The provider answered but refuses this configuration: wrong
    /// credentials, a key that does not exist, a TPM that is not the one the
    /// key was sealed to. Retrying will not help; the operator must act.
    #[error("master-key provider refused: {0}")]
    Misconfigured(String),
}

/// A boxed future, so that providers can live behind `dyn`.
pub type ProviderFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, ProviderError>> + Send + 'a>>;

/// Wraps and unwraps the root KEK.
pub trait MasterKeyProvider: Send + Sync {
    /// The provider's name as stored with each wrapped KEK (`env`, ...).
    fn name(&self) -> &'static str;

    /// The setting an operator must look at when this provider's key does not
    /// match (for error messages).
    fn key_setting(&self) -> &'static str;

    /// Wraps a root KEK, binding its id.
    fn wrap_root_kek<'a>(&'a self, kek_id: KekId, kek: &'a DataKey) -> ProviderFuture<'a, Vec<u8>>;

    /// Unwraps a root KEK wrapped by [`MasterKeyProvider::wrap_root_kek`].
    fn unwrap_root_kek<'a>(
        &'a self,
        kek_id: KekId,
        wrapped: &'a [u8],
    ) -> ProviderFuture<'a, DataKey>;

    /// Keeps the provider's credentials alive (e.g. renews a Vault token before
    /// it expires) while the process runs. Runs until dropped; by default there
    /// is nothing to do.
    fn keep_alive(&self) -> ProviderFuture<'_, ()> {
        Box::pin(std::future::pending())
    }
}
