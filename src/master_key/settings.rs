//! Which provider wraps the root KEK and what it needs: the typed settings the
//! configuration produces and [`build`](super::build) consumes.

use crate::crypto::DataKey;

use super::azure::AzureSettings;
use super::pkcs11::Pkcs11Settings;
use super::tpm::TpmSettings;
use super::vault::VaultSettings;

/// Which provider wraps the root KEK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// `KEYWARD_MASTER_KEY`.
    Env,
    /// AWS KMS (or a KMS-compatible endpoint).
    AwsKms,
    /// Vault or OpenBao transit.
    Vault,
    /// An AES key in an HSM or other PKCS#11 token.
    Pkcs11,
    /// A TPM 2.0.
    Tpm,
    /// Azure Key Vault or Managed HSM.
    AzureKeyVault,
}

impl ProviderKind {
    /// Every provider's name, for messages.
    pub const NAMES: &'static str =
        "`env`, `aws-kms`, `vault`, `pkcs11`, `tpm` or `azure-key-vault`";

    /// Parses a provider's name ([`ProviderKind::NAMES`]).
    pub fn parse(s: &str) -> Option<ProviderKind> {
        match s {
            "env" => Some(ProviderKind::Env),
            "aws-kms" => Some(ProviderKind::AwsKms),
            "vault" => Some(ProviderKind::Vault),
            "pkcs11" => Some(ProviderKind::Pkcs11),
            "tpm" => Some(ProviderKind::Tpm),
            "azure-key-vault" => Some(ProviderKind::AzureKeyVault),
            _ => None,
        }
    }

    /// The name as configured and stored.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Env => "env",
            ProviderKind::AwsKms => "aws-kms",
            ProviderKind::Vault => "vault",
            ProviderKind::Pkcs11 => "pkcs11",
            ProviderKind::Tpm => "tpm",
            ProviderKind::AzureKeyVault => "azure-key-vault",
        }
    }
}

/// A provider that cannot be built from the settings: names what is missing.
#[derive(Debug, thiserror::Error)]
#[error("master-key provider `{provider}`: {reason}")]
pub struct ProviderConfigError {
    /// The provider.
    pub provider: &'static str,
    /// What is missing or wrong.
    pub reason: String,
}

/// One provider's settings, complete and validated. Secrets are zeroed on
/// drop: the key is a [`DataKey`], Vault's token and secret id are `Zeroizing`.
pub enum ProviderSettings {
    /// The `env` provider.
    Env {
        /// The master key (`KEYWARD_MASTER_KEY`, or `KEYWARD_NEW_MASTER_KEY`
        /// as the target of an env-to-env migration).
        key: DataKey,
    },
    /// The `aws-kms` provider.
    AwsKms {
        /// The KMS key's id, ARN or alias.
        key_id: String,
        /// A KMS-compatible endpoint instead of AWS's.
        endpoint: Option<String>,
    },
    /// The `vault` provider.
    Vault(VaultSettings),
    /// The `pkcs11` provider.
    Pkcs11(Pkcs11Settings),
    /// The `tpm` provider.
    Tpm(TpmSettings),
    /// The `azure-key-vault` provider.
    AzureKeyVault(AzureSettings),
}
