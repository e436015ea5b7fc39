//! The job sources file (`job_sources_file`): the databases re-encryption jobs
//! may reach, each named and granted to tenants by the operator.
//!
//! ```toml
//! [sources.billing]
//! database_url_file = "/run/secrets/billing-db-url"   # or database_url = "postgres://..."
//! tenants = ["acme", "0b9e4c1e-4a4b-4f4e-9a59-0c3f2f0c9d11"]
//! tables = ["secrets", "billing.cards"]                 # optional: only these
//! ```
//!
//! Errors name the source and the problem, never a URL or a credential.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use zeroize::Zeroizing;

use super::secrets::DatabaseUrl;

/// One declared source.
#[derive(Debug, Clone)]
pub struct JobSourceSpec {
    /// Its name, as jobs give it.
    pub name: String,
    /// Where it is, with its credentials.
    pub url: DatabaseUrl,
    /// The tenant names or ids it is granted to.
    pub tenants: Vec<String>,
    /// The tables jobs may walk in it (`None`: any table the URL's user can
    /// read and write).
    pub tables: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    sources: BTreeMap<String, Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    #[serde(default)]
    database_url: Option<String>,
    #[serde(default)]
    database_url_file: Option<PathBuf>,
    tenants: Vec<String>,
    #[serde(default)]
    tables: Option<Vec<String>>,
}

/// A `database_url` that may be a secret reference (`env://`, `file://`,
/// `vault://`): the value it names, or the literal.
pub type ResolveReference<'a> = &'a dyn Fn(&str) -> Result<Zeroizing<String>, String>;

/// Reads and checks the sources file; `resolve` resolves a `database_url`
/// that is a secret reference.
pub fn read(path: &Path, resolve: ResolveReference<'_>) -> Result<Vec<JobSourceSpec>, String> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("cannot read the file: {e}"))?,
    );
    parse(&text, |file| std::fs::read_to_string(file), resolve)
}

/// [`read`] of the file's text; `read_url_file` reads a `database_url_file`.
pub(super) fn parse(
    text: &str,
    read_url_file: impl Fn(&Path) -> std::io::Result<String>,
    resolve: ResolveReference<'_>,
) -> Result<Vec<JobSourceSpec>, String> {
    let file: File = toml::from_str(text).map_err(|e| e.message().to_string())?;
    let mut out = Vec::with_capacity(file.sources.len());
    for (name, entry) in file.sources {
        let url = match (entry.database_url, entry.database_url_file) {
            (Some(url), None) => {
                let url = Zeroizing::new(url);
                resolve(&url).map_err(|e| format!("source `{name}`: `database_url`: {e}"))?
            }
            (None, Some(file)) => {
                let text = Zeroizing::new(read_url_file(&file).map_err(|e| {
                    format!("source `{name}`: cannot read its `database_url_file`: {e}")
                })?);
                Zeroizing::new(text.trim().to_string())
            }
            _ => {
                return Err(format!(
                    "source `{name}`: give exactly one of `database_url` and `database_url_file`"
                ))
            }
        };
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(format!(
                "source `{name}`: the database URL must start with sqlite: or postgres://"
            ));
        }
        if entry.tenants.iter().any(|t| t.trim().is_empty()) {
            return Err(format!("source `{name}`: a tenant in `tenants` is empty"));
        }
        if let Some(tables) = &entry.tables {
            if tables.is_empty() {
                return Err(format!(
                    "source `{name}`: `tables` is empty (leave it out to allow any table)"
                ));
            }
            if let Some(bad) = tables
                .iter()
                .find(|t| !crate::store::source::is_plain_identifier(t, true))
            {
                return Err(format!(
                    "source `{name}`: `{bad}` in `tables` is not a table name (letters, digits, `_`, one optional `schema.`)"
                ));
            }
        }
        out.push(JobSourceSpec {
            name,
            url: DatabaseUrl::new(url.as_str()),
            tenants: entry.tenants,
            tables: entry.tables,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_read_from_the_file_or_a_file_reference_and_errors_echo_no_url() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("billing-url");
        std::fs::write(&secret, "postgres://jobs:pw-123@db.internal/billing\n").unwrap();
        let file = dir.path().join("sources.toml");
        std::fs::write(
            &file,
            format!(
                "[sources.billing]\ndatabase_url_file = \"{}\"\ntenants = [\"acme\"]\n\
                 [sources.local]\ndatabase_url = \"sqlite:///var/lib/p.db\"\ntenants = [\"a\", \"b\"]\n",
                secret.display()
            ),
        )
        .unwrap();
        let literal = |v: &str| Ok(Zeroizing::new(v.to_string()));
        let sources = read(&file, &literal).unwrap();
        assert_eq!(sources.len(), 2);
        assert_eq!(sources[0].name, "billing");
        assert_eq!(
            sources[0].url.expose(),
            "postgres://jobs:pw-123@db.internal/billing"
        );
        assert_eq!(sources[1].tenants, ["a", "b"]);
        assert!(!format!("{sources:?}").contains("pw-123"));

        for (body, want) in [
            (
                "[sources.x]\ndatabase_url = \"mysql://u:pw-9@h/d\"\ntenants = [\"a\"]\n",
                "must start with",
            ),
            (
                "[sources.x]\ntenants = [\"a\"]\n",
                "exactly one of",
            ),
            (
                "[sources.x]\ndatabase_url = \"postgres://u:pw-9@h/d\"\ntenants = [\"a\"]\nhost = \"h\"\n",
                "unknown field",
            ),
        ] {
            std::fs::write(&file, body).unwrap();
            let e = read(&file, &literal).unwrap_err();
            assert!(e.contains(want) && !e.contains("pw-9"), "{e}");
        }
    }
}
