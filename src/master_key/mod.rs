//! Master-key providers. A provider does one thing: wrap and unwrap the root KEK.
//! It is called at start (and when an operator migrates to another provider),
//! never on the encrypt or decrypt path: after start every data key is unwrapped
//! by the root KEK held in memory.
//!
//! Each provider is one file behind [`MasterKeyProvider`]; adding Azure Key Vault
//! or PKCS#11 means adding a file, not touching the request path.

mod env;

use std::future::Future;
use std::pin::Pin;

pub use env::EnvMasterKey;

use crate::crypto::DataKey;
use crate::domain::KekId;

/// Why a provider could not wrap or unwrap.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider holds a different key than the one that wrapped this KEK.
    #[error("the master key does not match the one that wrapped the root KEK")]
    KeyMismatch,
    /// The provider could not be reached or refused the call; worth retrying.
    #[error("master-key provider unavailable: {0}")]
    Unavailable(String),
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
}
