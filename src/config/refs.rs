//! Secret references: the value of any secret setting (and a job source's
//! `database_url`) may name where the secret is instead of holding it:
//!
//! - `env://NAME`: the environment variable `NAME`;
//! - `file:///PATH`: the file's contents (one trailing newline dropped),
//!   re-read on SIGHUP (see [`SecretFiles`](super::SecretFiles));
//! - `vault://MOUNT/PATH#FIELD`: the field of a KV version 2 secret, read
//!   through the configured Vault or OpenBao (`KEYWARD_VAULT_ADDR`, its token
//!   or AppRole, `KEYWARD_VAULT_CA_FILE`).
//!
//! References are resolved once, at start, before any value is validated; a
//! reference that cannot be resolved is an error naming the setting and the
//! reference (which is not secret), never a value. A reference is never
//! logged resolved.

use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::master_key::{Vault, VaultAuth, VaultSettings};

/// Where a secret is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SecretRef {
    /// An environment variable.
    Env(String),
    /// A file, by absolute path.
    File(PathBuf),
    /// A field of a KV v2 secret.
    Vault {
        /// The KV v2 mount.
        mount: String,
        /// The secret's path in the mount.
        path: String,
        /// The field.
        field: String,
    },
}

impl SecretRef {
    /// The reference `value` is, if it is one (`None`: a literal value).
    pub(super) fn parse(value: &str) -> Result<Option<SecretRef>, String> {
        if let Some(name) = value.strip_prefix("env://") {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err("an `env://` reference must name a variable: `env://NAME` (letters, digits, `_`)".into());
            }
            return Ok(Some(SecretRef::Env(name.to_string())));
        }
        if let Some(path) = value.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(
                    "a `file://` reference must name an absolute path: `file:///run/secrets/x`"
                        .into(),
                );
            }
            return Ok(Some(SecretRef::File(PathBuf::from(path))));
        }
        if let Some(rest) = value.strip_prefix("vault://") {
            let bad = || {
                "a `vault://` reference is `vault://MOUNT/PATH#FIELD` (a KV version 2 secret)"
                    .to_string()
            };
            let (location, field) = rest.split_once('#').ok_or_else(bad)?;
            let (mount, path) = location.split_once('/').ok_or_else(bad)?;
            if mount.is_empty() || path.is_empty() || field.is_empty() {
                return Err(bad());
            }
            return Ok(Some(SecretRef::Vault {
                mount: mount.to_string(),
                path: path.to_string(),
                field: field.to_string(),
            }));
        }
        Ok(None)
    }
}

impl std::fmt::Display for SecretRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretRef::Env(name) => write!(f, "env://{name}"),
            SecretRef::File(path) => write!(f, "file://{}", path.display()),
            SecretRef::Vault { mount, path, field } => write!(f, "vault://{mount}/{path}#{field}"),
        }
    }
}

/// The largest secret file read: a PEM bundle or a database URL is far
/// smaller, and a bound keeps `file:///dev/zero` from filling memory.
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// A secret file's contents, one trailing newline (`\n` or `\r\n`) dropped.
/// Only a regular file of at most [`MAX_SECRET_FILE`] bytes, read into a
/// buffer allocated once (nothing outgrown is left uncleared), and refused
/// if its size or modification time changed while it was read (a file being
/// rewritten in place: the old value is kept). The error is the I/O error's
/// kind, never a value.
pub(super) fn read_secret_file(path: &Path) -> Result<Zeroizing<String>, String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let before = file.metadata().map_err(|e| e.to_string())?;
    if !before.is_file() {
        return Err("not a regular file".into());
    }
    if before.len() > MAX_SECRET_FILE {
        return Err(format!("larger than {MAX_SECRET_FILE} bytes"));
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_SECRET_FILE as usize + 1));
    (&mut file)
        .take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    let after = std::fs::metadata(path).map_err(|e| e.to_string())?;
    let same = |m: &std::fs::Metadata| (m.len(), m.modified().ok());
    if bytes.len() as u64 != before.len() || same(&before) != same(&after) {
        return Err("the file changed while it was read (kept the old value; send SIGHUP again once it is written)".into());
    }
    let mut text = Zeroizing::new(
        std::str::from_utf8(&bytes)
            .map_err(|_| "not UTF-8 text".to_string())?
            .to_string(),
    );
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err("the file is empty".into());
    }
    Ok(text)
}

/// How `vault://` references reach Vault: the provider's own address, login
/// and CA.
pub(super) struct VaultAccess {
    pub(super) addr: String,
    pub(super) auth: VaultAuth,
    pub(super) ca_file: Option<String>,
}

/// Reads a `vault://` reference. Called while the configuration loads, which
/// may be inside the async runtime: the read runs on its own thread with its
/// own small runtime, and the caller waits for it (bounded by the Vault
/// client's 10-second timeout).
pub(super) fn read_vault(
    access: &VaultAccess,
    mount: &str,
    path: &str,
    field: &str,
) -> Result<Zeroizing<String>, String> {
    let settings = VaultSettings {
        addr: access.addr.clone(),
        auth: access.auth.clone(),
        mount: String::new(),
        key: String::new(),
        ca_file: access.ca_file.clone(),
    };
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("cannot start a runtime to read Vault: {e}"))?;
                runtime.block_on(Vault::new(settings).read_kv2_field(mount, path, field))
            })
            .join()
            .unwrap_or_else(|_| Err("the Vault read failed".to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_small_regular_files_are_read_as_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("pin");
        std::fs::write(&ok, "1234\r\n").unwrap();
        assert_eq!(read_secret_file(&ok).unwrap().as_str(), "1234");
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; MAX_SECRET_FILE as usize + 1]).unwrap();
        assert!(read_secret_file(&big).unwrap_err().contains("larger"));
        assert!(read_secret_file(dir.path()).is_err());
        assert_eq!(
            read_secret_file(Path::new("/dev/zero")).unwrap_err(),
            "not a regular file"
        );
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        assert!(read_secret_file(&empty).unwrap_err().contains("empty"));
    }

    #[test]
    fn references_parse_and_print_back_and_literals_are_not_references() {
        for text in [
            "env://DB_PASSWORD",
            "file:///run/secrets/pin",
            "vault://secret/keyward/db#password",
        ] {
            let r = SecretRef::parse(text).unwrap().unwrap();
            assert_eq!(r.to_string(), text);
        }
        assert_eq!(
            SecretRef::parse("vault://secret/a/b#f").unwrap(),
            Some(SecretRef::Vault {
                mount: "secret".into(),
                path: "a/b".into(),
                field: "f".into()
            })
        );
        for literal in ["postgres://u:p@h/d", "s.token", "q83vEjRWeJq8="] {
            assert_eq!(SecretRef::parse(literal).unwrap(), None);
        }
        for bad in [
            "env://",
            "env://A-B",
            "file://relative",
            "vault://secret#f",
            "vault://secret/x",
            "vault://secret/x#",
        ] {
            assert!(SecretRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_secret_file_loses_one_trailing_newline_and_an_empty_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, "pw\n").unwrap();
        assert_eq!(read_secret_file(&f).unwrap().as_str(), "pw");
        std::fs::write(&f, "pw\r\n").unwrap();
        assert_eq!(read_secret_file(&f).unwrap().as_str(), "pw");
        std::fs::write(&f, "\n").unwrap();
        assert!(read_secret_file(&f).is_err());
        assert!(read_secret_file(&dir.path().join("none")).is_err());
    }
}
