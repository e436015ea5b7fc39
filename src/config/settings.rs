//! [`Settings`], the validated settings, and the provider settings they yield
//! ([`Settings::provider_settings`]): a provider's own settings are checked
//! only when one is built, so that commands that need no provider run without
//! its settings, a missing one is named only for the provider in use, and
//! `master-key migrate` can name its target on the command line.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use zeroize::Zeroizing;

use super::secrets::{DatabaseUrl, SecretFiles, SecretString};
use super::sources::JobSourceSpec;
use crate::crypto::DataKey;
use crate::master_key::{
    AzureAlgorithm, AzureCredential, AzureSettings, Pkcs11Mechanism, Pkcs11Settings,
    ProviderConfigError, ProviderKind, ProviderSettings, TokenSelector, TpmSettings, VaultAuth,
    VaultSettings,
};
use crate::telemetry::LogFormat;
use crate::tls::TlsFiles;

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The plain-HTTP address for health and readiness, if any.
    pub ops_listen: Option<SocketAddr>,
    /// The database.
    pub database_url: DatabaseUrl,
    /// Pool size.
    pub database_max_connections: u32,
    /// Which provider wraps the root KEK.
    pub master_key_provider: ProviderKind,
    /// The master key (the `env` provider), if configured.
    pub master_key: Option<DataKey>,
    /// The target key of an env-to-env migration.
    pub new_master_key: Option<DataKey>,
    /// AWS KMS key id, ARN or alias.
    pub aws_kms_key_id: Option<String>,
    /// KMS-compatible endpoint.
    pub aws_kms_endpoint: Option<String>,
    /// Vault address.
    pub vault_addr: Option<String>,
    /// Vault token.
    pub vault_token: Option<SecretString>,
    /// AppRole role id.
    pub vault_role_id: Option<String>,
    /// AppRole secret id.
    pub vault_secret_id: Option<SecretString>,
    /// AppRole mount.
    pub vault_approle_mount: String,
    /// Transit mount.
    pub vault_transit_mount: String,
    /// Transit key name.
    pub vault_transit_key: Option<String>,
    /// CA bundle for Vault's TLS.
    pub vault_ca_file: Option<PathBuf>,
    /// The PKCS#11 module.
    pub pkcs11_module: Option<PathBuf>,
    /// The PKCS#11 token's label.
    pub pkcs11_token_label: Option<String>,
    /// The PKCS#11 token's slot id.
    pub pkcs11_slot: Option<u64>,
    /// The PKCS#11 user PIN.
    pub pkcs11_pin: Option<SecretString>,
    /// The label of the PKCS#11 AES key.
    pub pkcs11_key_label: Option<String>,
    /// The PKCS#11 wrapping mechanism.
    pub pkcs11_mechanism: Pkcs11Mechanism,
    /// The Azure Key Vault (or Managed HSM) URL.
    pub azure_key_vault_url: Option<String>,
    /// The Key Vault key's name.
    pub azure_key_vault_key: Option<String>,
    /// RSA-OAEP-256 or A256KW.
    pub azure_key_vault_algorithm: AzureAlgorithm,
    /// A CA bundle for Key Vault's and Entra ID's TLS, besides the system's.
    pub azure_key_vault_ca_file: Option<PathBuf>,
    /// Whether the vault's challenge must name the vault's domain.
    pub azure_key_vault_verify_challenge_resource: bool,
    /// `client-secret`, `managed-identity` or `workload-identity`.
    pub azure_credential: String,
    /// Directory (tenant) id, for a client secret.
    pub azure_tenant_id: Option<String>,
    /// Application (client) id, or a user-assigned managed identity's.
    pub azure_client_id: Option<String>,
    /// A service principal's client secret.
    pub azure_client_secret: Option<SecretString>,
    /// How to reach the TPM (a TCTI string).
    pub tpm_tcti: String,
    /// The PCRs (SHA-256 bank) the TPM provider seals to.
    pub tpm_pcrs: Vec<u8>,
    /// Body size limit.
    pub max_body_bytes: usize,
    /// Most items per batch.
    pub max_batch_items: usize,
    /// Most live (not revoked) API keys per tenant.
    pub max_api_keys_per_tenant: i64,
    /// Largest batch body.
    pub max_batch_body_bytes: usize,
    /// Most body bytes batch and large requests hold at once.
    pub max_concurrent_body_bytes: usize,
    /// Most streaming requests served at once.
    pub stream_max_concurrent: usize,
    /// How long a streaming request's body may send nothing.
    pub stream_read_timeout: Duration,
    /// Key ring bound.
    pub key_ring_capacity: usize,
    /// Requests per second per API key (0: off).
    pub rate_limit: u32,
    /// Failures before a lockout.
    pub auth_max_failures: u32,
    /// Failure window and lockout length.
    pub auth_lockout: Duration,
    /// Requests without credentials per second per address (0: off).
    pub unauthenticated_rate_limit: u32,
    /// Proxies whose forwarding headers are believed.
    pub trusted_proxies: crate::domain::client_addr::TrustedProxies,
    /// Refused requests audited in full per address per minute.
    pub audit_refused_per_minute: u32,
    /// Wrong client keys per encryption before a refusal.
    pub client_key_max_failures: u32,
    /// Window and refusal length for wrong client keys.
    pub client_key_lockout: Duration,
    /// Rotate after this many encryptions of one version.
    pub rotate_after_encryptions: u64,
    /// The nonce bound: no version encrypts more than this.
    pub max_encryptions_per_version: u64,
    /// Count flush and policy check interval.
    pub maintenance_interval: Duration,
    /// Job lease duration.
    pub job_lease: Duration,
    /// Rows per job batch.
    pub job_batch_rows: usize,
    /// The operator's job sources (empty: every job is refused).
    pub job_sources: Vec<JobSourceSpec>,
    /// Connection bound on job sources.
    pub job_source_connect_timeout: Duration,
    /// Statement bound on job sources.
    pub job_source_statement_timeout: Duration,
    /// Jobs one process runs at once.
    pub job_max_running: usize,
    /// Jobs one process runs at once for one tenant.
    pub job_max_running_per_tenant: usize,
    /// Change feed poll interval.
    pub sync_interval: Duration,
    /// How long cached state may be trusted, and the destroy grace period.
    pub freshness: crate::domain::service::Freshness,
    /// Per-request time limit.
    pub request_timeout: Duration,
    /// Grace period at shutdown.
    pub shutdown_timeout: Duration,
    /// Most connections the API listener serves at once.
    pub max_connections: usize,
    /// Most connections one client address holds on each listener.
    pub max_connections_per_address: usize,
    /// How long a new connection may take to complete its TLS handshake and
    /// send its first request.
    pub connection_first_request_timeout: Duration,
    /// Most connections the ops listener serves at once.
    pub ops_max_connections: usize,
    /// How long a connection may sit with no request in flight.
    pub connection_idle_timeout: Duration,
    /// How long a connection may stay open at all.
    pub connection_max_age: Duration,
    /// TLS files, if HTTPS is on.
    pub tls: Option<TlsFiles>,
    /// ACME for the server certificate, if on (then `tls` is `Managed`).
    pub acme: Option<crate::acme::AcmeSettings>,
    /// Whether plain HTTP may listen on a non-loopback address.
    pub allow_plaintext: bool,
    /// Where audit records are written.
    pub audit: crate::audit::Destination,
    /// The size at which the audit file is rotated; `None`: never.
    pub audit_file_max_bytes: Option<u64>,
    /// When the audit writer signs checkpoints.
    pub audit_checkpoints: crate::audit::CheckpointSettings,
    /// How long the audit table keeps records; `None`: forever.
    pub audit_retention: Option<Duration>,
    /// How often the database-read metrics are refreshed.
    pub metrics_refresh_interval: Duration,
    /// How long the server must be idle before it gives memory back
    /// ([`crate::memory`]); `None`: never.
    pub memory_release_idle_after: Option<Duration>,
    /// How far ahead a Keyward-issued client certificate counts as
    /// expiring soon.
    pub client_cert_expiry_warning: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter.
    pub log_level: String,
    /// The secret settings that came from `file://` references, re-read on
    /// SIGHUP.
    pub secret_files: SecretFiles,
}

impl Settings {
    /// The settings of the provider of `kind`, or the setting that is missing.
    /// For `env`, `use_new_key` takes `KEYWARD_NEW_MASTER_KEY` (the target of
    /// an env-to-env migration) instead of `KEYWARD_MASTER_KEY`.
    pub fn provider_settings(
        &self,
        kind: ProviderKind,
        use_new_key: bool,
    ) -> Result<ProviderSettings, ProviderConfigError> {
        let missing = |setting: &str, why: &str| ProviderConfigError {
            provider: kind.as_str(),
            reason: format!("{setting} is required{why}"),
        };
        Ok(match kind {
            ProviderKind::Env => {
                let key = if use_new_key {
                    self.new_master_key.as_ref().ok_or_else(|| {
                        missing(
                            "KEYWARD_NEW_MASTER_KEY",
                            " to migrate from one env master key to another",
                        )
                    })?
                } else {
                    self.master_key.as_ref().ok_or_else(|| {
                        missing(
                            "KEYWARD_MASTER_KEY",
                            ": base64 of 32 random bytes (generate one with `openssl rand -base64 32`)",
                        )
                    })?
                };
                ProviderSettings::Env { key: key.clone() }
            }
            ProviderKind::AwsKms => ProviderSettings::AwsKms {
                key_id: self.aws_kms_key_id.clone().ok_or_else(|| {
                    missing("KEYWARD_AWS_KMS_KEY_ID", " (a key id, ARN or alias)")
                })?,
                endpoint: self.aws_kms_endpoint.clone(),
            },
            ProviderKind::Vault => {
                let addr = self
                    .vault_addr
                    .clone()
                    .ok_or_else(|| missing("KEYWARD_VAULT_ADDR", ""))?;
                let key = self
                    .vault_transit_key
                    .clone()
                    .ok_or_else(|| missing("KEYWARD_VAULT_TRANSIT_KEY", ""))?;
                let auth = match (&self.vault_token, &self.vault_role_id, &self.vault_secret_id) {
                    (Some(token), None, None) => {
                        VaultAuth::Token(token.cell())
                    }
                    (None, Some(role_id), Some(secret_id)) => VaultAuth::AppRole {
                        mount: self.vault_approle_mount.clone(),
                        role_id: role_id.clone(),
                        secret_id: secret_id.cell(),
                    },
                    _ => {
                        return Err(ProviderConfigError {
                            provider: "vault",
                            reason: "set either KEYWARD_VAULT_TOKEN, or KEYWARD_VAULT_ROLE_ID and KEYWARD_VAULT_SECRET_ID (AppRole)".into(),
                        })
                    }
                };
                ProviderSettings::Vault(VaultSettings {
                    addr,
                    auth,
                    mount: self.vault_transit_mount.clone(),
                    key,
                    ca_file: self.vault_ca_file.as_ref().map(|p| p.display().to_string()),
                })
            }
            ProviderKind::Pkcs11 => {
                let token = match (&self.pkcs11_token_label, self.pkcs11_slot) {
                    (Some(label), None) => TokenSelector::Label(label.clone()),
                    (None, Some(slot)) => TokenSelector::Slot(slot),
                    _ => {
                        return Err(ProviderConfigError {
                            provider: "pkcs11",
                            reason: "set either KEYWARD_PKCS11_TOKEN_LABEL or KEYWARD_PKCS11_SLOT"
                                .into(),
                        })
                    }
                };
                ProviderSettings::Pkcs11(Pkcs11Settings {
                    module: self.pkcs11_module.clone().ok_or_else(|| {
                        missing("KEYWARD_PKCS11_MODULE", " (the PKCS#11 library)")
                    })?,
                    token,
                    pin: self
                        .pkcs11_pin
                        .as_ref()
                        .ok_or_else(|| missing("KEYWARD_PKCS11_PIN", " (the token's user PIN)"))?
                        .cell(),
                    key_label: self
                        .pkcs11_key_label
                        .clone()
                        .ok_or_else(|| missing("KEYWARD_PKCS11_KEY_LABEL", ""))?,
                    mechanism: self.pkcs11_mechanism,
                })
            }
            ProviderKind::AzureKeyVault => {
                let vault_url = self.azure_key_vault_url.clone().ok_or_else(|| {
                    missing(
                        "KEYWARD_AZURE_KEY_VAULT_URL",
                        " (https://NAME.vault.azure.net)",
                    )
                })?;
                let key = self
                    .azure_key_vault_key
                    .clone()
                    .ok_or_else(|| missing("KEYWARD_AZURE_KEY_VAULT_KEY", " (the key's name)"))?;
                let credential = match self.azure_credential.as_str() {
                    "client-secret" => AzureCredential::ClientSecret {
                        tenant_id: self.azure_tenant_id.clone().ok_or_else(|| {
                            missing(
                                "KEYWARD_AZURE_TENANT_ID",
                                " with KEYWARD_AZURE_CREDENTIAL=client-secret",
                            )
                        })?,
                        client_id: self.azure_client_id.clone().ok_or_else(|| {
                            missing(
                                "KEYWARD_AZURE_CLIENT_ID",
                                " with KEYWARD_AZURE_CREDENTIAL=client-secret",
                            )
                        })?,
                        secret: Zeroizing::new(
                            self.azure_client_secret
                                .as_ref()
                                .ok_or_else(|| {
                                    missing(
                                        "KEYWARD_AZURE_CLIENT_SECRET",
                                        " with KEYWARD_AZURE_CREDENTIAL=client-secret",
                                    )
                                })?
                                .expose()
                                .to_string(),
                        ),
                    },
                    "managed-identity" => AzureCredential::ManagedIdentity {
                        client_id: self.azure_client_id.clone(),
                    },
                    _ => AzureCredential::WorkloadIdentity,
                };
                ProviderSettings::AzureKeyVault(AzureSettings {
                    vault_url,
                    key,
                    algorithm: self.azure_key_vault_algorithm,
                    credential,
                    ca_file: self
                        .azure_key_vault_ca_file
                        .as_ref()
                        .map(|p| p.display().to_string()),
                    verify_challenge_resource: self.azure_key_vault_verify_challenge_resource,
                })
            }
            ProviderKind::Tpm => ProviderSettings::Tpm(TpmSettings {
                tcti: self.tpm_tcti.clone(),
                pcrs: self.tpm_pcrs.clone(),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::env;
    use crate::config::values::parse_master_key;

    #[test]
    fn debug_output_of_the_settings_holds_no_secret() {
        let key = "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=";
        let s = Settings::load(
            None,
            env(&[
                (
                    "KEYWARD_DATABASE_URL",
                    "postgres://keyward:db-password-123@db/keyward",
                ),
                ("KEYWARD_MASTER_KEY", key),
                ("KEYWARD_VAULT_TOKEN", "s.vault-token-456"),
                ("KEYWARD_VAULT_SECRET_ID", "approle-secret-789"),
            ]),
        )
        .unwrap();
        let printed = format!("{s:?}");
        for secret in [
            key,
            "db-password-123",
            "vault-token-456",
            "approle-secret-789",
        ] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
    }

    #[test]
    fn a_provider_is_checked_when_built_and_names_the_missing_setting() {
        let key = "q83vEjRWeJq83vEjRWeJq83vEjRWeJq83vEjRWeJq80=";
        let s = Settings::load(
            None,
            env(&[
                ("KEYWARD_DATABASE_URL", "sqlite://x"),
                ("KEYWARD_MASTER_KEY_PROVIDER", "vault"),
                ("KEYWARD_VAULT_ADDR", "https://vault:8200"),
                ("KEYWARD_NEW_MASTER_KEY", key),
            ]),
        )
        .expect("incomplete provider settings load");
        let missing = |kind, use_new_key| {
            s.provider_settings(kind, use_new_key)
                .err()
                .map(|e| e.to_string())
        };
        assert_eq!(
            missing(ProviderKind::Vault, false).as_deref(),
            Some("master-key provider `vault`: KEYWARD_VAULT_TRANSIT_KEY is required")
        );
        assert_eq!(
            missing(ProviderKind::AwsKms, false).as_deref(),
            Some("master-key provider `aws-kms`: KEYWARD_AWS_KMS_KEY_ID is required (a key id, ARN or alias)")
        );
        assert!(missing(ProviderKind::Env, false)
            .is_some_and(|e| e.contains("KEYWARD_MASTER_KEY is required")));
        match s.provider_settings(ProviderKind::Env, true) {
            Ok(ProviderSettings::Env { key: new }) => {
                assert_eq!(new.expose(), parse_master_key(key).unwrap().expose())
            }
            _ => panic!("the env provider with the new key"),
        }
    }
}
