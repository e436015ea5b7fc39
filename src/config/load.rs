//! Loading: [`Settings::load`] reads the sources into the raw layer and
//! validates every value into [`Settings`] at once, so a bad value fails at
//! start with the setting's name, never later in use.

use std::path::{Path, PathBuf};
use std::time::Duration;

use zeroize::Zeroizing;

use super::raw::{ConfigError, Raw};
use super::secrets::{DatabaseUrl, SecretFiles, SecretString};
use super::settings::Settings;
use super::values::{duration, non_empty, parse_master_key, positive, readable_file, url};
use crate::domain::client_addr::{ForwardedHeader, TrustedProxies};
use crate::master_key::{AzureAlgorithm, Pkcs11Mechanism, ProviderKind, TpmSettings};
use crate::secret_cell::SecretCell;
use crate::telemetry::LogFormat;
use crate::tls::{ServerCert, TlsFiles};

impl Settings {
    /// Reads the optional TOML file and the `KEYWARD_*` variables in `env`.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let mut raw = Raw::default();
        if let Some(path) = file {
            raw.read_file(path)?;
        }
        raw.read_env(env)?;
        raw.resolve_references()?;
        raw.validate()
    }

    /// Settings with every default and the given database URL (for dev mode and
    /// tests); the caller fills in the rest.
    pub fn with_defaults(database_url: DatabaseUrl) -> Result<Settings, ConfigError> {
        let mut raw = Raw::default();
        raw.0.insert(
            "database_url",
            (
                Zeroizing::new(database_url.expose().to_string()),
                "dev".into(),
            ),
        );
        raw.validate()
    }
}

/// A value that may be a secret reference (`env://`, `file://`; `vault://`
/// needs the Vault settings, which only [`Settings::load`] has), resolved
/// against the process environment: for `keyward dev --job-sources`.
pub fn resolve_reference(value: &str) -> Result<Zeroizing<String>, String> {
    let mut raw = Raw::default();
    raw.read_env(std::env::vars().filter(|(k, _)| !k.starts_with("KEYWARD_")))
        .map_err(|e| e.to_string())?;
    raw.resolve_value(value)
}

impl Raw {
    pub(super) fn validate(self) -> Result<Settings, ConfigError> {
        let mut secret_files = SecretFiles::default();
        let vault_token = self.secret("vault_token", &mut secret_files)?;
        let vault_secret_id = self.secret("vault_secret_id", &mut secret_files)?;
        let pkcs11_pin = self.secret("pkcs11_pin", &mut secret_files)?;
        // Resolved at start like every secret (references apply), but not
        // re-read on SIGHUP: the Azure credential is built once with it, so
        // a changed secret needs a restart (docs/master-keys.md).
        let azure_client_secret = self.parse("azure_client_secret", |v| {
            non_empty(v).map(SecretString::new)
        })?;
        let sync_interval = self.required("sync_interval", duration)?;
        let feed_max_lag = self.required("change_feed_max_lag", |v| {
            let d = duration(v)?;
            if d < sync_interval * 3 {
                return Err(format!(
                    "must be at least three times KEYWARD_SYNC_INTERVAL ({} ms)",
                    sync_interval.as_millis()
                ));
            }
            Ok(d)
        })?;
        let freshness = crate::domain::service::Freshness {
            feed_max_lag,
            entry_max_age: self.required("key_cache_max_age", |v| {
                duration(v).and_then(|d| {
                    if d.is_zero() {
                        Err("must be more than 0".to_string())
                    } else {
                        Ok(d)
                    }
                })
            })?,
            destroy_grace: self.required("destroy_grace", |v| {
                let d = duration(v)?;
                if d <= feed_max_lag + sync_interval {
                    return Err(format!(
                        "must be longer than KEYWARD_CHANGE_FEED_MAX_LAG plus KEYWARD_SYNC_INTERVAL ({} ms), the longest a replica may take to stop using a disabled version",
                        (feed_max_lag + sync_interval).as_millis()
                    ));
                }
                Ok(d)
            })?,
        };
        Ok(Settings {
            listen: self.required("listen", |v| {
                v.parse()
                    .map_err(|_| format!("`{v}` is not an address like 127.0.0.1:8480"))
            })?,
            ops_listen: self.parse("ops_listen", |v| {
                v.parse()
                    .map_err(|_| format!("`{v}` is not an address like 0.0.0.0:8481"))
            })?,
            database_url: {
                let url = self.required("database_url", |v| {
                    if v.starts_with("sqlite:")
                        || v.starts_with("postgres://")
                        || v.starts_with("postgresql://")
                    {
                        Ok(DatabaseUrl::new(v))
                    } else {
                        Err("must start with sqlite: or postgres://".into())
                    }
                })?;
                if let Some(path) = self.1.files.get("database_url") {
                    secret_files.add(
                        "KEYWARD_DATABASE_URL".into(),
                        path.clone(),
                        SecretCell::new(Zeroizing::new(url.expose().to_string())),
                    );
                }
                url
            },
            database_max_connections: self.required("database_max_connections", |v| {
                positive(v).and_then(|n| u32::try_from(n).map_err(|_| "too large".into()))
            })?,
            master_key_provider: self.required("master_key_provider", |v| {
                ProviderKind::parse(v).ok_or_else(|| format!("must be {}", ProviderKind::NAMES))
            })?,
            master_key: self.parse("master_key", parse_master_key)?,
            new_master_key: self.parse("new_master_key", parse_master_key)?,
            aws_kms_key_id: self.parse("aws_kms_key_id", non_empty)?,
            aws_kms_endpoint: self.parse("aws_kms_endpoint", url)?,
            vault_addr: self.parse("vault_addr", url)?,
            vault_token,
            vault_role_id: self.parse("vault_role_id", non_empty)?,
            vault_secret_id,
            vault_approle_mount: self.required("vault_approle_mount", non_empty)?,
            vault_transit_mount: self.required("vault_transit_mount", non_empty)?,
            vault_transit_key: self.parse("vault_transit_key", non_empty)?,
            vault_ca_file: self.parse("vault_ca_file", readable_file)?,
            pkcs11_module: self.parse("pkcs11_module", |v| non_empty(v).map(PathBuf::from))?,
            pkcs11_token_label: self.parse("pkcs11_token_label", non_empty)?,
            pkcs11_slot: self.parse("pkcs11_slot", |v| {
                v.parse::<u64>()
                    .map_err(|_| "must be a slot id (a whole number)".to_string())
            })?,
            pkcs11_pin,
            pkcs11_key_label: self.parse("pkcs11_key_label", non_empty)?,
            pkcs11_mechanism: self.required("pkcs11_mechanism", |v| {
                Pkcs11Mechanism::parse(v)
                    .ok_or_else(|| "must be `auto`, `aes-gcm` or `aes-key-wrap-pad`".to_string())
            })?,
            tpm_tcti: self.required("tpm_tcti", |v| {
                TpmSettings::check_tcti(v).map(|()| v.to_string())
            })?,
            azure_key_vault_url: self.parse("azure_key_vault_url", |v| {
                if v.starts_with("https://") {
                    Ok(v.trim_end_matches('/').to_string())
                } else {
                    Err("must be an https:// URL like https://NAME.vault.azure.net".into())
                }
            })?,
            azure_key_vault_key: self.parse("azure_key_vault_key", non_empty)?,
            azure_key_vault_algorithm: self.required("azure_key_vault_algorithm", |v| {
                AzureAlgorithm::parse(v)
                    .ok_or_else(|| "must be `RSA-OAEP-256` or `A256KW` (Managed HSM)".to_string())
            })?,
            azure_key_vault_ca_file: self.parse("azure_key_vault_ca_file", readable_file)?,
            azure_key_vault_verify_challenge_resource: self.required(
                "azure_key_vault_verify_challenge_resource",
                |v| match v {
                    "true" => Ok(true),
                    "false" => Ok(false),
                    _ => Err("must be `true` or `false`".into()),
                },
            )?,
            azure_credential: self.required("azure_credential", |v| match v {
                "client-secret" | "managed-identity" | "workload-identity" => Ok(v.to_string()),
                _ => {
                    Err("must be `client-secret`, `managed-identity` or `workload-identity`".into())
                }
            })?,
            azure_tenant_id: self.parse("azure_tenant_id", non_empty)?,
            azure_client_id: self.parse("azure_client_id", non_empty)?,
            azure_client_secret,
            tpm_pcrs: self
                .parse("tpm_pcrs", TpmSettings::parse_pcrs)?
                .unwrap_or_default(),
            max_body_bytes: self.required("max_body_bytes", positive)?,
            max_batch_items: self.required("max_batch_items", positive)?,
            max_batch_body_bytes: self.required("max_batch_body_bytes", positive)?,
            max_concurrent_body_bytes: self.required("max_concurrent_body_bytes", |v| {
                positive(v).and_then(|n| {
                    u32::try_from(n)
                        .map(|_| n)
                        .map_err(|_| "must be below 4 GiB".to_string())
                })
            })?,
            stream_max_concurrent: self.required("stream_max_concurrent", positive)?,
            stream_read_timeout: self.required("stream_read_timeout", duration)?,
            key_ring_capacity: self.required("key_ring_capacity", positive)?,
            rate_limit: self.required("rate_limit", |v| {
                v.parse::<u32>().map_err(|_| {
                    "must be a whole number of requests per second (0: no limit)".to_string()
                })
            })?,
            auth_max_failures: self.required("auth_max_failures", |v| {
                positive(v).and_then(|n| u32::try_from(n).map_err(|_| "too large".into()))
            })?,
            auth_lockout: self.required("auth_lockout", duration)?,
            unauthenticated_rate_limit: self.required("unauthenticated_rate_limit", |v| {
                v.parse::<u32>().map_err(|_| {
                    "must be a whole number of requests per second (0: no limit)".to_string()
                })
            })?,
            trusted_proxies: {
                let header = self.required("trusted_proxy_header", ForwardedHeader::parse)?;
                self.parse("trusted_proxies", |v| TrustedProxies::parse(v, header))?
                    .unwrap_or_default()
            },
            audit_refused_per_minute: self.required("audit_refused_per_minute", |v| {
                positive(v).and_then(|n| u32::try_from(n).map_err(|_| "too large".into()))
            })?,
            client_key_max_failures: self.required("client_key_max_failures", |v| {
                positive(v).and_then(|n| u32::try_from(n).map_err(|_| "too large".into()))
            })?,
            client_key_lockout: self.required("client_key_lockout", duration)?,
            max_api_keys_per_tenant: self.required("max_api_keys_per_tenant", |v| {
                positive(v).and_then(|n| i64::try_from(n).map_err(|_| "too large".into()))
            })?,
            rotate_after_encryptions: self.required("rotate_after_encryptions", |v| {
                positive(v).map(|n| n as u64)
            })?,
            max_encryptions_per_version: self.max_encryptions_per_version()?,
            maintenance_interval: self.required("maintenance_interval", duration)?,
            job_lease: self.required("job_lease", duration)?,
            job_batch_rows: self.required("job_batch_rows", positive)?,
            job_sources: self
                .parse("job_sources_file", |v| {
                    super::sources::read(std::path::Path::new(v), &|url| self.resolve_value(url))
                })?
                .unwrap_or_default(),
            job_source_connect_timeout: self.required("job_source_connect_timeout", duration)?,
            job_source_statement_timeout: self
                .required("job_source_statement_timeout", duration)?,
            job_max_running: self.required("job_max_running", positive)?,
            job_max_running_per_tenant: self.required("job_max_running_per_tenant", positive)?,
            sync_interval,
            freshness,
            request_timeout: self.required("request_timeout", duration)?,
            shutdown_timeout: self.required("shutdown_timeout", duration)?,
            max_connections: self.required("max_connections", positive)?,
            max_connections_per_address: self.required("max_connections_per_address", positive)?,
            connection_first_request_timeout: self
                .required("connection_first_request_timeout", duration)?,
            ops_max_connections: self.required("ops_max_connections", positive)?,
            connection_idle_timeout: self.required("connection_idle_timeout", duration)?,
            connection_max_age: self.required("connection_max_age", duration)?,
            tls: self.tls()?,
            acme: self.acme()?,
            allow_plaintext: self.required("allow_plaintext", |v| match v {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err("must be `true` or `false`".into()),
            })?,
            audit: self.required("audit_file", |v| match v {
                "-" => Ok(crate::audit::Destination::Stdout),
                "" => Err("must be a file path or `-` (standard output)".to_string()),
                path => Ok(crate::audit::Destination::File(PathBuf::from(path))),
            })?,
            audit_file_max_bytes: self.required("audit_file_max_bytes", |v| {
                v.parse::<u64>()
                    .map(|n| (n > 0).then_some(n))
                    .map_err(|_| "must be a whole number of bytes (0: never rotate)".to_string())
            })?,
            audit_checkpoints: crate::audit::CheckpointSettings {
                every_records: self.required("audit_checkpoint_records", |v| {
                    positive(v).map(|n| n as u64)
                })?,
                every: self.required("audit_checkpoint_interval", duration)?,
            },
            audit_retention: self.required("audit_retention", |v| match v {
                "forever" => Ok(None),
                _ => duration(v).map(Some).map_err(|_| {
                    "must be a positive duration like `90d` or `400d`, or `forever`".to_string()
                }),
            })?,
            metrics_refresh_interval: self.required("metrics_refresh_interval", duration)?,
            memory_release_idle_after: self.required("memory_release_idle_after", |v| match v {
                "off" => Ok(None),
                _ => match duration(v) {
                    Ok(d) if d >= Duration::from_secs(1) => Ok(Some(d)),
                    _ => Err(
                        "must be a duration of at least `1s`, like `2s` or `1m`, or `off`"
                            .to_string(),
                    ),
                },
            })?,
            client_cert_expiry_warning: self.required("client_cert_expiry_warning", duration)?,
            log_format: self.required("log_format", |v| match v {
                "json" => Ok(LogFormat::Json),
                "text" => Ok(LogFormat::Text),
                _ => Err("must be `json` or `text`".into()),
            })?,
            log_level: self.required("log_level", |v| {
                tracing_subscriber::EnvFilter::try_new(v)
                    .map(|_| v.to_string())
                    .map_err(|e| format!("not a valid log filter: {e}"))
            })?,
            secret_files,
        })
    }

    /// A secret setting as a [`SecretString`]; one that came from a
    /// `file://` reference is recorded in `files`, to be re-read on SIGHUP.
    fn secret(
        &self,
        name: &'static str,
        files: &mut SecretFiles,
    ) -> Result<Option<SecretString>, ConfigError> {
        let secret = self.parse(name, |v| non_empty(v).map(SecretString::new))?;
        if let (Some(secret), Some(path)) = (&secret, self.1.files.get(name)) {
            files.add(
                format!("KEYWARD_{}", name.to_ascii_uppercase()),
                path.clone(),
                secret.cell(),
            );
        }
        Ok(secret)
    }

    /// The nonce bound, at least `rotate_after_encryptions` (a version must
    /// be rotated before it is stopped).
    fn max_encryptions_per_version(&self) -> Result<u64, ConfigError> {
        let rotate_after = self.required("rotate_after_encryptions", |v| {
            positive(v).map(|n| n as u64)
        })?;
        self.required("max_encryptions_per_version", |v| {
            let n = positive(v)? as u64;
            if n < rotate_after {
                return Err(format!(
                    "must be at least KEYWARD_ROTATE_AFTER_ENCRYPTIONS ({rotate_after})"
                ));
            }
            Ok(n)
        })
    }

    fn acme(&self) -> Result<Option<crate::acme::AcmeSettings>, ConfigError> {
        let Some(directory) = self.parse("acme_directory", url)? else {
            for name in [
                "acme_domains",
                "acme_contact",
                "acme_directory_ca",
                "acme_challenge_listen",
            ] {
                if self.get(name).is_some() {
                    return Err(invalid(name, "needs KEYWARD_ACME_DIRECTORY as well"));
                }
            }
            return Ok(None);
        };
        let list = |v: &str| -> Vec<String> {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        };
        let domains = self.required("acme_domains", |v| {
            let domains = list(v);
            if domains.is_empty() {
                return Err("must name at least one DNS name".into());
            }
            for d in &domains {
                if d.contains('*')
                    || d.parse::<std::net::IpAddr>().is_ok()
                    || d.contains('/')
                    || d.contains(':')
                {
                    return Err(format!(
                        "`{d}` is not a DNS name (no wildcards, addresses or ports)"
                    ));
                }
            }
            Ok(domains)
        })?;
        let contact = self
            .parse("acme_contact", |v| {
                let contact = list(v);
                match contact.iter().find(|c| !c.starts_with("mailto:")) {
                    Some(c) => Err(format!("`{c}` must be a `mailto:` URL")),
                    None => Ok(contact),
                }
            })?
            .unwrap_or_default();
        let retry_min = self.required("acme_retry_min", duration)?;
        let retry_max = self.required("acme_retry_max", |v| {
            let d = duration(v)?;
            if d < retry_min {
                return Err("must be at least KEYWARD_ACME_RETRY_MIN".into());
            }
            Ok(d)
        })?;
        Ok(Some(crate::acme::AcmeSettings {
            directory,
            domains,
            contact,
            directory_ca: self.parse("acme_directory_ca", readable_file)?,
            challenge: self.required("acme_challenge", |v| match v {
                "tls-alpn-01" => Ok(crate::acme::ChallengeKind::TlsAlpn01),
                "http-01" => Ok(crate::acme::ChallengeKind::Http01),
                _ => Err("must be `tls-alpn-01` or `http-01`".into()),
            })?,
            challenge_listen: self.required("acme_challenge_listen", |v| {
                v.parse::<std::net::SocketAddr>()
                    .map_err(|_| "must be an address and port like `0.0.0.0:443`".to_string())
            })?,
            check_interval: self.required("acme_check_interval", duration)?,
            retry_min,
            retry_max,
        }))
    }

    fn tls(&self) -> Result<Option<TlsFiles>, ConfigError> {
        let path = |name: &'static str| self.parse(name, readable_file);
        let (cert, key) = (path("tls_cert")?, path("tls_key")?);
        let client_ca = path("tls_client_ca")?;
        let client_crl = path("tls_client_crl")?;
        let needs = |what: &str, needed: &str| ConfigError::Invalid {
            setting: format!("KEYWARD_{}", what.to_ascii_uppercase()),
            source_desc: "configuration".into(),
            reason: format!("needs KEYWARD_{} as well", needed.to_ascii_uppercase()),
        };
        if self.get("acme_directory").is_some() {
            if cert.is_some() || key.is_some() {
                return Err(invalid(
                    "tls_cert",
                    "cannot be set with KEYWARD_ACME_DIRECTORY (the certificate comes from ACME)",
                ));
            }
            if client_crl.is_some() && client_ca.is_none() {
                return Err(needs("tls_client_crl", "tls_client_ca"));
            }
            return Ok(Some(TlsFiles {
                server: ServerCert::Managed,
                client_ca,
                client_crl,
            }));
        }
        match (cert, key) {
            (None, None) => {
                if client_ca.is_some() {
                    return Err(needs("tls_client_ca", "tls_cert"));
                }
                if client_crl.is_some() {
                    return Err(needs("tls_client_crl", "tls_client_ca"));
                }
                Ok(None)
            }
            (Some(_), None) => Err(needs("tls_cert", "tls_key")),
            (None, Some(_)) => Err(needs("tls_key", "tls_cert")),
            (Some(cert), Some(key)) => {
                if client_crl.is_some() && client_ca.is_none() {
                    return Err(needs("tls_client_crl", "tls_client_ca"));
                }
                Ok(Some(TlsFiles {
                    server: ServerCert::Files { cert, key },
                    client_ca,
                    client_crl,
                }))
            }
        }
    }
}

/// An invalid-value error for setting `name`.
fn invalid(name: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        setting: format!("KEYWARD_{}", name.to_ascii_uppercase()),
        source_desc: "configuration".into(),
        reason: reason.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::env;

    #[test]
    fn acme_settings_are_checked_at_start() {
        let base = [
            ("KEYWARD_DATABASE_URL", "sqlite://x"),
            (
                "KEYWARD_MASTER_KEY",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ),
        ];
        let load = |extra: &[(&str, &str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            Settings::load(None, env(&all))
        };
        let acme = [
            ("KEYWARD_ACME_DIRECTORY", "https://acme.example/dir"),
            ("KEYWARD_ACME_DOMAINS", "b.example, a.example"),
            ("KEYWARD_ACME_CHALLENGE_LISTEN", "0.0.0.0:443"),
        ];
        let s = load(&acme).unwrap();
        let a = s.acme.unwrap();
        assert_eq!(a.domains, ["b.example", "a.example"]);
        assert_eq!(a.challenge, crate::acme::ChallengeKind::TlsAlpn01);
        assert_eq!(s.tls.unwrap().server, ServerCert::Managed);

        let e = load(&[("KEYWARD_ACME_DOMAINS", "a.example")]).unwrap_err();
        assert!(e.to_string().contains("KEYWARD_ACME_DOMAINS"), "{e}");
        let mut bad = acme.to_vec();
        bad[1] = ("KEYWARD_ACME_DOMAINS", "*.example");
        assert!(load(&bad)
            .unwrap_err()
            .to_string()
            .contains("not a DNS name"));
        let mut bad = acme.to_vec();
        bad.push(("KEYWARD_ACME_CONTACT", "ops@example.com"));
        assert!(load(&bad).unwrap_err().to_string().contains("mailto:"));
        let mut bad = acme.to_vec();
        bad.push(("KEYWARD_ACME_CHALLENGE", "dns-01"));
        assert!(load(&bad)
            .unwrap_err()
            .to_string()
            .contains("KEYWARD_ACME_CHALLENGE"));
        let mut bad = acme.to_vec();
        bad.push(("KEYWARD_ACME_RETRY_MIN", "2h"));
        assert!(load(&bad)
            .unwrap_err()
            .to_string()
            .contains("KEYWARD_ACME_RETRY_MAX"));
        let no_listen = &acme[..2];
        assert!(load(no_listen)
            .unwrap_err()
            .to_string()
            .contains("KEYWARD_ACME_CHALLENGE_LISTEN"));
    }

    #[test]
    fn secret_references_resolve_for_settings_and_job_sources_and_files_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("pin");
        std::fs::write(&pin, "1234\n").unwrap();
        let sources = dir.path().join("sources.toml");
        std::fs::write(
            &sources,
            "[sources.billing]\ndatabase_url = \"env://BILLING_URL\"\ntenants = [\"acme\"]\n",
        )
        .unwrap();
        let pin_ref = format!("file://{}", pin.display());
        let sources_path = sources.display().to_string();
        let s = Settings::load(
            None,
            env(&[
                ("KEYWARD_DATABASE_URL", "env://DB_URL"),
                ("DB_URL", "postgres://k:pw-1@db/k"),
                ("KEYWARD_PKCS11_PIN", &pin_ref),
                ("KEYWARD_JOB_SOURCES_FILE", &sources_path),
                ("BILLING_URL", "postgres://j:pw-2@db/billing"),
            ]),
        )
        .unwrap();
        assert_eq!(s.database_url.expose(), "postgres://k:pw-1@db/k");
        assert_eq!(s.pkcs11_pin.as_ref().unwrap().expose().as_str(), "1234");
        assert_eq!(
            s.job_sources[0].url.expose(),
            "postgres://j:pw-2@db/billing"
        );
        let pin_cell = s.secret_files.cell("KEYWARD_PKCS11_PIN").unwrap();
        std::fs::write(&pin, "5678").unwrap();
        let reloaded = s.secret_files.reload();
        assert_eq!(reloaded.len(), 1);
        assert!(matches!(reloaded[0].1, Ok(true)));
        assert_eq!(pin_cell.get().as_str(), "5678");
        assert_eq!(s.pkcs11_pin.unwrap().expose().as_str(), "5678");

        // Errors name the setting and the reference, never a value.
        let e = Settings::load(
            None,
            env(&[
                ("KEYWARD_DATABASE_URL", "sqlite://x"),
                ("KEYWARD_MASTER_KEY", "env://MK"),
                ("MK", "c2VjcmV0LXNlY3JldA=="),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("KEYWARD_MASTER_KEY") && e.contains("env://MK"),
            "{e}"
        );
        assert!(!e.contains("c2VjcmV0"), "{e}");
        let e = Settings::load(
            None,
            env(&[
                ("KEYWARD_DATABASE_URL", "sqlite://x"),
                ("KEYWARD_VAULT_TOKEN", "vault://secret/x#token"),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("cannot come from Vault"), "{e}");
        let e = Settings::load(
            None,
            env(&[
                ("KEYWARD_DATABASE_URL", "sqlite://x"),
                ("KEYWARD_JOB_SOURCES_FILE", &sources_path),
            ]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("billing") && e.contains("BILLING_URL is not set"),
            "{e}"
        );
    }

    #[test]
    fn bad_values_name_the_setting_and_never_echo_secrets() {
        let e = Settings::load(
            None,
            env(&[
                ("KEYWARD_DATABASE_URL", "sqlite://x"),
                ("KEYWARD_MASTER_KEY", "c2VjcmV0LXNlY3JldA=="),
            ]),
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("KEYWARD_MASTER_KEY") && msg.contains("13 bytes"),
            "{msg}"
        );
        assert!(!msg.contains("c2VjcmV0"), "{msg}");
        let e = Settings::load(None, env(&[("KEYWARD_DATABASE_URL", "mysql://x")])).unwrap_err();
        assert!(e.to_string().contains("KEYWARD_DATABASE_URL"), "{e}");
        let e = Settings::load(None, env(&[])).unwrap_err();
        assert!(e.to_string().contains("KEYWARD_DATABASE_URL"), "{e}");
    }
}
