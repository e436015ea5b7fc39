//! The raw layer: the values of the TOML file and the `KEYWARD_*` variables by
//! setting name, each with where it came from, before any is validated; and
//! [`ConfigError`], which names the setting and that source.

use std::collections::BTreeMap;
use std::path::Path;

use zeroize::Zeroizing;

use super::table::{is_service_link, CLIENT_VARIABLES, SETTINGS};

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

/// Raw values by setting name, with where each came from.
pub(super) struct Raw(pub(super) BTreeMap<&'static str, (Zeroizing<String>, String)>);

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
