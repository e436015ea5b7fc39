//! Master-key providers. A provider does one thing: wrap and unwrap the root KEK.
//! It is called at start (and when an operator migrates to another provider),
//! never on the encrypt or decrypt path: after start every data key is unwrapped
//! by the root KEK held in memory.
//!
//! Each provider is one file behind [`MasterKeyProvider`]; adding a provider
//! means adding a file, not touching the request path. What a
//! provider needs is a [`ProviderSettings`], which the configuration produces:
//! nothing here reads settings.

mod aws_kms;
mod azure;
mod env;
mod provider;
mod settings;
mod tpm;
mod vault;

use std::sync::Arc;

pub use aws_kms::AwsKms;
pub use azure::{AzureAlgorithm, AzureCredential, AzureKeyVault, AzureSettings};
pub use env::EnvMasterKey;
pub use provider::{MasterKeyProvider, ProviderError, ProviderFuture};
pub use settings::{ProviderConfigError, ProviderKind, ProviderSettings};
pub use tpm::{Tpm, TpmSettings};
pub use vault::{Vault, VaultAuth, VaultSettings};

/// Builds the provider its settings describe (the configuration's
/// `Settings::provider_settings` checks them for completeness).
pub async fn build(settings: ProviderSettings) -> Arc<dyn MasterKeyProvider> {
    match settings {
        ProviderSettings::Env { key } => Arc::new(EnvMasterKey::new(&key)),
        ProviderSettings::AwsKms { key_id, endpoint } => {
            Arc::new(AwsKms::new(key_id, endpoint).await)
        }
        ProviderSettings::Vault(settings) => Arc::new(Vault::new(settings)),
        ProviderSettings::Tpm(settings) => Arc::new(Tpm::new(settings)),
        ProviderSettings::AzureKeyVault(settings) => Arc::new(AzureKeyVault::new(settings)),
    }
}
