//! Wrappers for secret settings: zeroed on drop, never printed; and
//! [`SecretFiles`], the secrets that came from `file://` references, which
//! SIGHUP re-reads.

use std::fmt;
use std::path::PathBuf;

use zeroize::Zeroizing;

use crate::secret_cell::SecretCell;

/// A database URL, which may carry a password: never printed in full.
#[derive(Clone)]
pub struct DatabaseUrl(Zeroizing<String>);

impl DatabaseUrl {
    /// Wraps a URL.
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(Zeroizing::new(url.into()))
    }

    /// The full URL, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = self.0.split(':').next().unwrap_or("?");
        write!(f, "DatabaseUrl({scheme}:<redacted>)")
    }
}

/// A secret setting (a token, a secret id, a PIN): zeroed on drop, never
/// printed. Held in a [`SecretCell`] so that a `file://` reference re-read on
/// SIGHUP reaches the client that uses it.
#[derive(Clone)]
pub struct SecretString(SecretCell);

impl SecretString {
    /// Wraps a secret.
    pub fn new(value: String) -> Self {
        SecretString(SecretCell::new(Zeroizing::new(value)))
    }

    /// The current value, for handing to the one client that needs it.
    pub fn expose(&self) -> Zeroizing<String> {
        self.0.get()
    }

    /// The shared cell, for a client that must see a reloaded value.
    pub fn cell(&self) -> SecretCell {
        self.0.clone()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretString(<redacted>)")
    }
}

/// The secret settings whose value is a `file://` reference, with the cell
/// each was loaded into: [`SecretFiles::reload`] (on SIGHUP) re-reads the
/// files, and whoever holds a cell uses the new value from its next login or
/// connection on.
#[derive(Clone, Default)]
pub struct SecretFiles(Vec<(String, PathBuf, SecretCell)>);

impl SecretFiles {
    /// Records that `setting` came from `path` into `cell`.
    pub(super) fn add(&mut self, setting: String, path: PathBuf, cell: SecretCell) {
        self.0.push((setting, path, cell));
    }

    /// Re-reads every file; for each setting, whether its value changed, or
    /// why the file could not be read (the old value is kept then). The
    /// results name settings and files, never a value.
    pub fn reload(&self) -> Vec<(String, Result<bool, String>)> {
        self.0
            .iter()
            .map(|(setting, path, cell)| {
                let result = super::refs::read_secret_file(path)
                    .map(|value| cell.replace(value))
                    .map_err(|e| format!("file://{}: {e}", path.display()));
                (setting.clone(), result)
            })
            .collect()
    }

    /// The cell of `setting`, if it came from a file.
    pub fn cell(&self, setting: &str) -> Option<SecretCell> {
        self.0
            .iter()
            .find(|(s, _, _)| s == setting)
            .map(|(_, _, c)| c.clone())
    }

    /// Whether no secret came from a file.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(s, p, _)| (s, p)))
            .finish()
    }
}
