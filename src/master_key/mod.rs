//! Master-key providers. A provider does one thing: wrap and unwrap the root KEK.
//! It is called at start (and when an operator migrates to another provider),
//! never on the encrypt or decrypt path: after start every data key is unwrapped
//! by the root KEK held in memory.
//!
//! Each provider is one file behind [`MasterKeyProvider`] (env, AWS KMS,
//! Vault, PKCS#11, TPM, Azure Key Vault); adding a provider means adding a
//! file, not touching the request path. What a
//! provider needs is a [`ProviderSettings`], which the configuration produces:
//! nothing here reads settings.

mod aws_kms;
mod azure;
mod env;
mod pkcs11;
mod provider;
mod settings;
mod tpm;
mod vault;

use std::sync::Arc;

pub use aws_kms::AwsKms;
pub use azure::{AzureAlgorithm, AzureCredential, AzureKeyVault, AzureSettings};
pub use env::EnvMasterKey;
pub use pkcs11::{Pkcs11, Pkcs11Mechanism, Pkcs11Settings, TokenSelector};
pub use provider::{MasterKeyProvider, ProviderError, ProviderFuture};
pub use settings::{ProviderConfigError, ProviderKind, ProviderSettings};
pub use tpm::{Tpm, TpmSettings};
pub use vault::{Vault, VaultAuth, VaultSettings};

/// Builds the provider its settings describe (the configuration's
/// `Settings::provider_settings` checks them for completeness). A provider
/// that can tell a configuration error from an outage at once (PKCS#11: a
/// wrong PIN, a missing key) fails here; an unreachable one is built and
/// connects when first called.
pub async fn build(
    settings: ProviderSettings,
) -> Result<Arc<dyn MasterKeyProvider>, ProviderConfigError> {
    Ok(match settings {
        ProviderSettings::Env { key } => Arc::new(EnvMasterKey::new(&key)),
        ProviderSettings::AwsKms { key_id, endpoint } => {
            let kms = AwsKms::new(key_id, endpoint).await;
            kms.check_key()
                .await
                .map_err(|reason| ProviderConfigError {
                    provider: "aws-kms",
                    reason,
                })?;
            Arc::new(kms)
        }
        ProviderSettings::Vault(settings) => Arc::new(Vault::new(settings)),
        ProviderSettings::Pkcs11(settings) => Arc::new(Pkcs11::connect(settings).await.map_err(
            |reason| ProviderConfigError {
                provider: "pkcs11",
                reason,
            },
        )?),
        ProviderSettings::Tpm(settings) => Arc::new(Tpm::new(settings)),
        ProviderSettings::AzureKeyVault(settings) => Arc::new(AzureKeyVault::new(settings)),
    })
}
