//! The raw layer: the values of the TOML file and the `KEYWARD_*` variables by
//! setting name, each with where it came from, before any is validated; and
//! [`ConfigError`], which names the setting and that source.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use super::refs::{read_secret_file, read_vault, SecretRef, VaultAccess};
use super::table::{is_service_link, CLIENT_VARIABLES, SETTINGS};
use crate::master_key::VaultAuth;
use crate::secret_cell::SecretCell;

/// A configuration problem, naming the setting and where its value came from.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read or parsed.
    #[error("config file {path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A key or variable that Keyward does not know.
    #[error("unknown setting `{name}` ({source_desc}); known settings: {known}")]
    Unknown {
        /// The key as given.
        name: String,
        /// Where it came from.
        source_desc: String,
        /// The accepted names.
        known: String,
    },
    /// A required setting is missing.
    #[error("{env} (or `{name}` in the config file) is required: {doc}")]
    Missing {
        /// The file key.
        name: &'static str,
        /// The environment variable.
        env: String,
        /// What it is.
        doc: &'static str,
    },
    /// A value that does not parse or is out of range. Never contains a secret.
    #[error("{setting} ({source_desc}): {reason}")]
    Invalid {
        /// The setting's environment variable name.
        setting: String,
        /// Where the value came from.
        source_desc: String,
        /// What is wrong.
        reason: String,
    },
}

/// Raw values by setting name, with where each came from; and what secret
/// references need: the environment (`env://`) and which settings came from
/// a file (`file://`, re-read on SIGHUP).
#[derive(Default)]
pub(super) struct Raw(
    pub(super) BTreeMap<&'static str, (Zeroizing<String>, String)>,
    pub(super) RefState,
);

/// The environment as read, for `env://` references, and the settings whose
/// value came from a `file://` reference.
#[derive(Default)]
pub(super) struct RefState {
    env: BTreeMap<String, Zeroizing<String>>,
    pub(super) files: BTreeMap<&'static str, PathBuf>,
}

fn known_names() -> String {
    SETTINGS
        .iter()
        .map(|s| s.name)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Raw {
    pub(super) fn read_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let file_err = |reason: String| ConfigError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?;
        self.read_text(&text, path)
    }

    /// [`Raw::read_file`] of a file's text; `path` names it in errors.
    pub(super) fn read_text(&mut self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let file_err = |reason: String| ConfigError::File {
            path: path.display().to_string(),
            reason,
        };
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| file_err(e.message().to_string()))?;
        for (key, value) in table {
            let setting =
                SETTINGS
                    .iter()
                    .find(|s| s.name == key)
                    .ok_or_else(|| ConfigError::Unknown {
                        name: key.clone(),
                        source_desc: format!("in {}", path.display()),
                        known: known_names(),
                    })?;
            let text = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                toml::Value::Float(f) => f.to_string(),
                _ => {
                    return Err(ConfigError::Invalid {
                        setting: setting.env_var(),
                        source_desc: format!("`{key}` in {}", path.display()),
                        reason: "must be a string, number or boolean".into(),
                    })
                }
            };
            self.0.insert(
                setting.name,
                (
                    Zeroizing::new(text),
                    format!("`{key}` in {}", path.display()),
                ),
            );
        }
        Ok(())
    }

    pub(super) fn read_env(
        &mut self,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (var, value) in env {
            let Some(rest) = var.strip_prefix("KEYWARD_") else {
                self.1.env.insert(var, Zeroizing::new(value));
                continue;
            };
            if is_service_link(rest) || CLIENT_VARIABLES.contains(&var.as_str()) {
                continue;
            }
            let setting = SETTINGS
                .iter()
                .find(|s| s.name.eq_ignore_ascii_case(rest) && s.env_var() == var)
                .ok_or_else(|| ConfigError::Unknown {
                    name: var.clone(),
                    source_desc: "environment variable".into(),
                    known: SETTINGS
                        .iter()
                        .map(|s| s.env_var())
                        .collect::<Vec<_>>()
                        .join(", "),
                })?;
            self.0.insert(
                setting.name,
                (Zeroizing::new(value), "environment variable".into()),
            );
        }
        Ok(())
    }

    /// Replaces every secret setting's reference (`env://`, `file://`,
    /// `vault://`) by the value it names: Vault's own credentials first (they
    /// cannot come from Vault), then the rest. An error names the setting and
    /// the reference, never a value.
    pub(super) fn resolve_references(&mut self) -> Result<(), ConfigError> {
        let mut names: Vec<&'static str> = SETTINGS
            .iter()
            .filter(|s| s.secret)
            .map(|s| s.name)
            .collect();
        names.sort_by_key(|n| !VAULT_CREDENTIALS.contains(n));
        for name in names {
            let Some((value, source)) = self.0.get(name) else {
                continue;
            };
            let source = source.clone();
            let fail = |reason: String| ConfigError::Invalid {
                setting: format!("KEYWARD_{}", name.to_ascii_uppercase()),
                source_desc: source.clone(),
                reason,
            };
            let Some(reference) = SecretRef::parse(value.trim()).map_err(fail)? else {
                continue;
            };
            if VAULT_CREDENTIALS.contains(&name) && matches!(reference, SecretRef::Vault { .. }) {
                return Err(fail(
                    "Vault's own credentials cannot come from Vault: use `env://` or `file://`"
                        .into(),
                ));
            }
            let value = self
                .resolve(&reference)
                .map_err(|e| fail(format!("{reference}: {e}")))?;
            if let SecretRef::File(path) = &reference {
                self.1.files.insert(name, path.clone());
            }
            self.0
                .insert(name, (value, format!("{source}, through {reference}")));
        }
        Ok(())
    }

    /// A job source's URL, or any other secret, that may be a reference:
    /// the value it names, or the literal value.
    pub(super) fn resolve_value(&self, value: &str) -> Result<Zeroizing<String>, String> {
        match SecretRef::parse(value.trim())? {
            None => Ok(Zeroizing::new(value.to_string())),
            Some(reference) => self
                .resolve(&reference)
                .map_err(|e| format!("{reference}: {e}")),
        }
    }

    fn resolve(&self, reference: &SecretRef) -> Result<Zeroizing<String>, String> {
        match reference {
            SecretRef::Env(name) => match self.1.env.get(name) {
                Some(v) if !v.is_empty() => Ok(v.clone()),
                Some(_) => Err(format!("the environment variable {name} is empty")),
                None => Err(format!("the environment variable {name} is not set")),
            },
            SecretRef::File(path) => read_secret_file(path),
            SecretRef::Vault { mount, path, field } => {
                read_vault(&self.vault_access()?, mount, path, field)
            }
        }
    }

    /// Vault's address, login and CA for `vault://` references, from the
    /// provider's own settings (already resolved: they are read first).
    fn vault_access(&self) -> Result<VaultAccess, String> {
        let value = |name: &'static str| self.get(name).map(|(v, _)| v.trim().to_string());
        let addr = value("vault_addr")
            .ok_or("a `vault://` reference needs KEYWARD_VAULT_ADDR and a Vault login")?;
        let secret = |name: &'static str| {
            self.0
                .get(name)
                .map(|(v, _)| SecretCell::new(Zeroizing::new(v.trim().to_string())))
        };
        let auth = match (secret("vault_token"), value("vault_role_id"), secret("vault_secret_id")) {
            (Some(token), None, None) => VaultAuth::Token(token),
            (None, Some(role_id), Some(secret_id)) => VaultAuth::AppRole {
                mount: value("vault_approle_mount").unwrap_or_else(|| "approle".into()),
                role_id,
                secret_id,
            },
            _ => return Err("a `vault://` reference needs either KEYWARD_VAULT_TOKEN, or KEYWARD_VAULT_ROLE_ID and KEYWARD_VAULT_SECRET_ID".into()),
        };
        Ok(VaultAccess {
            addr,
            auth,
            ca_file: value("vault_ca_file"),
        })
    }

    /// The value of `name` (or its default) with its source, or `None`.
    pub(super) fn get(&self, name: &'static str) -> Option<(&str, &str)> {
        if let Some((v, src)) = self.0.get(name) {
            return Some((v.as_str(), src.as_str()));
        }
        SETTINGS
            .iter()
            .find(|s| s.name == name)
            .and_then(|s| s.default)
            .map(|d| (d, "default"))
    }

    pub(super) fn parse<T>(
        &self,
        name: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        let Some((value, source)) = self.get(name) else {
            return Ok(None);
        };
        parse(value.trim())
            .map(Some)
            .map_err(|reason| ConfigError::Invalid {
                setting: format!("KEYWARD_{}", name.to_ascii_uppercase()),
                source_desc: source.to_string(),
                reason,
            })
    }

    pub(super) fn required<T>(
        &self,
        name: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        self.parse(name, parse)?
            .ok_or_else(|| ConfigError::Missing {
                name,
                env: format!("KEYWARD_{}", name.to_ascii_uppercase()),
                doc: SETTINGS
                    .iter()
                    .find(|s| s.name == name)
                    .map_or("", |s| s.doc),
            })
    }
}

/// The settings that log in to Vault, resolved before the others.
const VAULT_CREDENTIALS: [&str; 2] = ["vault_token", "vault_secret_id"];

/// The `env` argument of [`Settings::load`](super::Settings::load) from
/// literal pairs, for the tests of every part of config.
#[cfg(test)]
pub(super) fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::Settings;

    #[test]
    fn env_overrides_file_and_defaults_apply() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1\"\ndatabase_url = \"sqlite://x.db\"\nmax_body_bytes = 10\n",
        )
        .unwrap();
        let s = Settings::load(
            Some(&file),
            env(&[("KEYWARD_LISTEN", "127.0.0.1:2"), ("OTHER", "x")]),
        )
        .unwrap();
        assert_eq!(s.listen.port(), 2);
        assert_eq!(s.max_body_bytes, 10);
        assert_eq!(s.sync_interval, Duration::from_secs(1));
        assert!(s.master_key.is_none());
    }

    #[test]
    fn kubernetes_service_link_variables_are_not_settings() {
        let vars = [
            ("KEYWARD_SERVICE_HOST", "10.0.0.1"),
            ("KEYWARD_SERVICE_PORT", "8480"),
            ("KEYWARD_PORT", "tcp://10.0.0.1:8480"),
            ("KEYWARD_PORT_8480_TCP_ADDR", "10.0.0.1"),
            ("KEYWARD_KEYWARD_SERVICE_HOST", "10.0.0.1"),
            ("KEYWARD_KEYWARD_PORT_8480_TCP", "tcp://10.0.0.1:8480"),
            ("KEYWARD_DATABASE_URL", "sqlite://x"),
        ];
        assert!(Settings::load(None, env(&vars)).is_ok());
        assert!(SETTINGS
            .iter()
            .all(|s| !is_service_link(&s.name.to_ascii_uppercase())));
    }

    #[test]
    fn unknown_settings_are_errors_naming_them() {
        let e = Settings::load(
            None,
            env(&[
                ("KEYWARD_DATABASE_URL", "sqlite://x"),
                ("KEYWARD_LISTN", "x"),
            ]),
        )
        .unwrap_err();
        assert!(e.to_string().contains("KEYWARD_LISTN"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("k.toml");
        std::fs::write(&file, "databse_url = \"sqlite://x.db\"\n").unwrap();
        let e = Settings::load(Some(&file), env(&[])).unwrap_err();
        assert!(e.to_string().contains("databse_url"), "{e}");
    }
}
