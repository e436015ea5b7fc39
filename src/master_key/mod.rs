//! Master-key providers. A provider does one thing: wrap and unwrap the root KEK.
//! It is called at start (and when an operator migrates to another provider),
//! never on the encrypt or decrypt path: after start every data key is unwrapped
//! by the root KEK held in memory.
//!
//! Each provider is one file behind [`MasterKeyProvider`]; adding Azure Key Vault
//! or PKCS#11 means adding a file, not touching the request path.

mod aws_kms;
mod env;
mod vault;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub use aws_kms::AwsKms;
pub use env::EnvMasterKey;
pub use vault::{Vault, VaultAuth, VaultSettings};

use crate::config::Settings;

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

    /// Keeps the provider's credentials alive (e.g. renews a Vault token before
    /// it expires) while the process runs. Runs until dropped; by default there
    /// is nothing to do.
    fn keep_alive(&self) -> ProviderFuture<'_, ()> {
        Box::pin(std::future::pending())
    }
}

/// Which provider wraps the root KEK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// `KEYWARD_MASTER_KEY`.
    Env,
    /// AWS KMS (or a KMS-compatible endpoint).
    AwsKms,
    /// Vault or OpenBao transit.
    Vault,
}

impl ProviderKind {
    /// Parses `env`, `aws-kms` or `vault`.
    pub fn parse(s: &str) -> Option<ProviderKind> {
        match s {
            "env" => Some(ProviderKind::Env),
            "aws-kms" => Some(ProviderKind::AwsKms),
            "vault" => Some(ProviderKind::Vault),
            _ => None,
        }
    }

    /// The name as configured and stored.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Env => "env",
            ProviderKind::AwsKms => "aws-kms",
            ProviderKind::Vault => "vault",
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

/// Builds the provider of `kind` from its own settings. For `env`, `use_new_key`
/// takes `KEYWARD_NEW_MASTER_KEY` instead of `KEYWARD_MASTER_KEY` (the target of
/// an env-to-env migration).
pub async fn build(
    kind: ProviderKind,
    settings: &Settings,
    use_new_key: bool,
) -> Result<Arc<dyn MasterKeyProvider>, ProviderConfigError> {
    let missing = |setting: &str, why: &str| ProviderConfigError {
        provider: kind.as_str(),
        reason: format!("{setting} is required{why}"),
    };
    Ok(match kind {
        ProviderKind::Env => {
            let key = if use_new_key {
                settings.new_master_key.as_ref().ok_or_else(|| {
                    missing(
                        "KEYWARD_NEW_MASTER_KEY",
                        " to migrate from one env master key to another",
                    )
                })?
            } else {
                settings.master_key.as_ref().ok_or_else(|| {
                    missing(
                        "KEYWARD_MASTER_KEY",
                        ": base64 of 32 random bytes (generate one with `openssl rand -base64 32`)",
                    )
                })?
            };
            Arc::new(EnvMasterKey::new(key))
        }
        ProviderKind::AwsKms => {
            let key_id = settings
                .aws_kms_key_id
                .clone()
                .ok_or_else(|| missing("KEYWARD_AWS_KMS_KEY_ID", " (a key id, ARN or alias)"))?;
            Arc::new(AwsKms::new(key_id, settings.aws_kms_endpoint.clone()).await)
        }
        ProviderKind::Vault => {
            let addr = settings
                .vault_addr
                .clone()
                .ok_or_else(|| missing("KEYWARD_VAULT_ADDR", ""))?;
            let key = settings
                .vault_transit_key
                .clone()
                .ok_or_else(|| missing("KEYWARD_VAULT_TRANSIT_KEY", ""))?;
            let auth = match (&settings.vault_token, &settings.vault_role_id, &settings.vault_secret_id) {
                (Some(token), None, None) => {
                    VaultAuth::Token(zeroize::Zeroizing::new(token.expose().to_string()))
                }
                (None, Some(role_id), Some(secret_id)) => VaultAuth::AppRole {
                    mount: settings.vault_approle_mount.clone(),
                    role_id: role_id.clone(),
                    secret_id: zeroize::Zeroizing::new(secret_id.expose().to_string()),
                },
                _ => {
                    return Err(ProviderConfigError {
                        provider: "vault",
                        reason: "set either KEYWARD_VAULT_TOKEN, or KEYWARD_VAULT_ROLE_ID and KEYWARD_VAULT_SECRET_ID (AppRole)".into(),
                    })
                }
            };
            Arc::new(Vault::new(VaultSettings {
                addr,
                auth,
                mount: settings.vault_transit_mount.clone(),
                key,
                ca_file: settings
                    .vault_ca_file
                    .as_ref()
                    .map(|p| p.display().to_string()),
            }))
        }
    })
}
