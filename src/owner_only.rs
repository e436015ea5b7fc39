//! Files only their owner can read: the dev master key and credentials, the
//! dev certificates' private keys, the audit file, the SQLite database. One
//! place sets the mode, so none of them can be created world-readable by a
//! forgotten `#[cfg(unix)]`.

use std::fs::OpenOptions;

/// Open options that create files with mode 0600 (on Unix; elsewhere the
/// platform's defaults). The caller adds read, write, append and create flags.
pub fn owner_only_options() -> OpenOptions {
    #[allow(unused_mut)]
    let mut options = OpenOptions::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options
}

#[cfg(test)]
mod tests {
    #[cfg(unix)]
    #[test]
    fn files_are_created_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        super::owner_only_options()
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
