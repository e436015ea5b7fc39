//! Settings for `keyward serve` and the administrative commands: read from an
//! optional TOML file and from `KEYWARD_*` environment variables (the
//! environment wins), validated once, with errors that name the setting.
//!
//! [`SETTINGS`] is the one list of what Keyward accepts: a key in the file or a
//! `KEYWARD_*` variable that is not in it is an error, never silently ignored.
//! The configuration reference in `docs/configuration.md` is checked against it.
//!
//! Layout, each file importing only those listed before it:
//! - `table.rs`: [`Setting`] and [`SETTINGS`], and the `KEYWARD_*` variables
//!   that are allowed without being settings;
//! - `refs.rs`: secret references (`env://`, `file://`, `vault://`) in
//!   place of a secret setting's value, resolved at start;
//! - `secrets.rs`: [`DatabaseUrl`] and [`SecretString`], zeroed and never
//!   printed, and [`SecretFiles`], the `file://` secrets SIGHUP re-reads;
//! - `values.rs`: the parsers of single values, [`parse_master_key`] among them;
//! - `raw.rs`: the values as read, by setting and with their source, and
//!   [`ConfigError`];
//! - `sources.rs`: the job sources file (`job_sources_file`);
//! - `settings.rs`: [`Settings`] and the provider settings it yields;
//! - `load.rs`: [`Settings::load`], which validates the raw values into
//!   [`Settings`].

mod load;
mod raw;
mod refs;
mod secrets;
mod settings;
mod sources;
mod table;
mod values;

pub use load::resolve_reference;
pub use raw::ConfigError;
pub use secrets::{DatabaseUrl, SecretFiles, SecretString};
pub use settings::Settings;
pub use sources::{read as read_job_sources, JobSourceSpec};
pub use table::{Setting, CLIENT_VARIABLES, SETTINGS};
pub use values::parse_master_key;

/// The log format is telemetry's own type; re-exported under its old path.
pub use crate::telemetry::LogFormat;

/// Entry points for the fuzz targets (`fuzz/`, through `crate::fuzzing`),
/// compiled only with the `fuzzing` feature: the two files an operator
/// writes, parsed from text exactly as from a file, reading no other file.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use std::path::Path;

    use zeroize::Zeroizing;

    use crate::config::raw::Raw;

    /// `text` as the settings file (`--config`), with a database URL
    /// defaulted so that validation goes past it; a `job_sources_file` it
    /// names is not read (see [`job_sources_file`] for that file).
    pub fn settings_file(text: &str) {
        let mut raw = Raw::default();
        raw.0.insert(
            "database_url",
            (Zeroizing::new("sqlite::memory:".into()), "fuzz".into()),
        );
        if raw.read_text(text, Path::new("fuzz.toml")).is_ok() {
            raw.0.remove("job_sources_file");
            let _ = raw.validate();
        }
    }

    /// `text` as the job sources file; a `database_url_file` it names reads
    /// as a fixed URL.
    pub fn job_sources_file(text: &str) {
        let _ = crate::config::sources::parse(
            text,
            |_| Ok("postgres://fuzz@localhost/db".into()),
            &|v| Ok(zeroize::Zeroizing::new(v.to_string())),
        );
    }
}
