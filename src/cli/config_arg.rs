//! `--config FILE`, shared by every command that reads the settings (the
//! database, the master-key provider): the server's and the offline
//! administration commands alike.

use std::path::PathBuf;

use crate::config::Settings;

/// Where the settings come from besides the environment.
#[derive(Debug, clap::Args)]
pub(super) struct ConfigArg {
    /// A TOML file with settings (KEYWARD_* variables override it).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    /// The settings from the file, if one was given, and the process's
    /// KEYWARD_* variables, validated.
    pub(super) fn settings(&self) -> anyhow::Result<Settings> {
        Ok(Settings::load(self.config.as_deref(), std::env::vars())?)
    }
}
