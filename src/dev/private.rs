//! Files and folders readable by their owner only: the dev master key, the dev
//! credentials and the dev certificates' private keys live in them.

use std::io::Write;
use std::path::Path;

use anyhow::Context;

/// Creates a folder (and its parents) that only its owner can enter.
pub(super) fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot restrict {}", dir.display()))?;
    }
    Ok(())
}

/// Writes a file readable by its owner only.
pub(super) fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut file = crate::owner_only::owner_only_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(contents)?;
    file.sync_all()
}
