//! Job sources: the databases re-encryption jobs may reach, named and
//! granted by the operator (in configuration), never given by a tenant.
//!
//! A tenant's job names a source (`source.name`); Keyward looks it up here,
//! checks that it is granted to the tenant (by tenant id or tenant name), and
//! connects with the operator's URL and credentials. The URL never leaves
//! this module except to connect: it is not stored with the job, logged or
//! returned. Keyward's own database is refused as a source, at start and again
//! at every connection (a SQLite file linked under another name after start).
//!
//! Every way a source can be unusable (unknown name, not granted, a
//! `databaseUrl` given by the tenant, unreachable, timed out, missing table or
//! column, Keyward's own database) looks the same to the tenant:
//! [`SOURCE_UNAVAILABLE`]. The operator's log has the reason.

use std::fmt;

use zeroize::Zeroizing;

use super::TenantId;
use crate::store::source::{same_database, SourceLimits};

/// The one text a tenant sees for any unusable source, in the API's error and
/// in a failed job's `error`. It names no file, host, driver or reason.
pub const SOURCE_UNAVAILABLE: &str = "the job source is not available: name a source the operator \
     registered and granted to this tenant, over a table and columns it holds";

/// Whom a source is granted to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Grant {
    /// A tenant by id.
    Id(TenantId),
    /// A tenant by its (unique) name.
    Name(String),
}

/// A source as the operator declared it.
pub struct SourceSpec {
    /// Its name, as jobs give it.
    pub name: String,
    /// `postgres://...` or `sqlite:...`, credentials included.
    pub url: Zeroizing<String>,
    /// Tenant ids or names it is granted to.
    pub tenants: Vec<String>,
    /// The only tables jobs may walk in it (`None`: any).
    pub tables: Option<Vec<String>>,
}

impl fmt::Debug for SourceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceSpec")
            .field("name", &self.name)
            .field("tenants", &self.tenants)
            .finish_non_exhaustive()
    }
}

/// One registered source.
pub struct Source {
    name: String,
    url: Zeroizing<String>,
    grants: Vec<Grant>,
    tables: Option<Vec<String>>,
}

impl Source {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether jobs may walk `table` in it: a tenant granted a source shared
    /// with others, or holding other tables, reads nothing (not even whether
    /// a table exists or how many rows it has) outside the operator's list.
    pub fn allows_table(&self, table: &str) -> bool {
        self.tables
            .as_ref()
            .is_none_or(|tables| tables.iter().any(|t| t == table))
    }

    /// The URL to connect with (credentials included): for the connection only.
    pub(super) fn url(&self) -> &str {
        &self.url
    }
}

/// The registered sources, the limits on them, and Keyward's own database.
pub struct JobSources {
    sources: Vec<Source>,
    own_database: Zeroizing<String>,
    /// Time bounds on every source.
    pub limits: SourceLimits,
}

impl fmt::Debug for JobSources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobSources")
            .field(
                "names",
                &self.sources.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Whether `name` is a valid source name: 1 to 64 of letters, digits, `-`, `_`.
pub fn is_source_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl JobSources {
    /// No source: every job is refused.
    pub fn none(limits: SourceLimits) -> JobSources {
        JobSources {
            sources: Vec::new(),
            own_database: Zeroizing::new(String::new()),
            limits,
        }
    }

    /// The operator's sources. Refuses (naming the source, never its URL) a
    /// source that is Keyward's own database, a name given twice, a source
    /// granted to nobody, or a URL that is neither SQLite nor PostgreSQL.
    pub fn new(
        specs: Vec<SourceSpec>,
        own_database: &str,
        limits: SourceLimits,
    ) -> Result<JobSources, String> {
        let mut sources: Vec<Source> = Vec::with_capacity(specs.len());
        for spec in specs {
            let name = spec.name;
            if !is_source_name(&name) {
                return Err(format!(
                    "job source `{name}`: a name is 1 to 64 letters, digits, `-` or `_`"
                ));
            }
            if sources.iter().any(|s| s.name == name) {
                return Err(format!("job source `{name}` is declared twice"));
            }
            if crate::store::Backend::from_url(&spec.url).is_none() {
                return Err(format!(
                    "job source `{name}`: the URL must start with postgres:// or sqlite:"
                ));
            }
            if same_database(&spec.url, own_database) {
                return Err(format!(
                    "job source `{name}` is Keyward's own database: jobs may never read it"
                ));
            }
            if spec.tenants.is_empty() {
                return Err(format!(
                    "job source `{name}` is granted to no tenant (`tenants`)"
                ));
            }
            let grants = spec
                .tenants
                .iter()
                .map(|t| match t.parse::<TenantId>() {
                    Ok(id) => Grant::Id(id),
                    Err(_) => Grant::Name(t.clone()),
                })
                .collect();
            sources.push(Source {
                name,
                url: spec.url,
                grants,
                tables: spec.tables,
            });
        }
        Ok(JobSources {
            sources,
            own_database: Zeroizing::new(own_database.to_string()),
            limits,
        })
    }

    /// The source `name` if it is granted to the tenant (by id or by name).
    pub fn granted(&self, name: &str, tenant: TenantId, tenant_name: &str) -> Option<&Source> {
        self.sources.iter().find(|s| {
            s.name == name
                && s.grants.iter().any(|g| match g {
                    Grant::Id(id) => *id == tenant,
                    Grant::Name(n) => n == tenant_name,
                })
        })
    }

    /// Whether `source` is Keyward's own database now (checked before every
    /// connection: a file may have been linked there since start).
    pub fn is_own_database(&self, source: &Source) -> bool {
        !self.own_database.is_empty() && same_database(source.url(), &self.own_database)
    }

    /// How many sources are registered.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits() -> SourceLimits {
        SourceLimits {
            connect_timeout: Duration::from_secs(1),
            statement_timeout: Duration::from_secs(1),
        }
    }

    fn spec(name: &str, url: &str, tenants: &[&str]) -> SourceSpec {
        SourceSpec {
            name: name.into(),
            url: Zeroizing::new(url.into()),
            tenants: tenants.iter().map(|t| t.to_string()).collect(),
            tables: None,
        }
    }

    #[test]
    fn keywards_own_database_is_refused_under_any_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let own = dir.path().join("keyward.db");
        std::fs::write(&own, b"").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let link = dir.path().join("alias.db");
        std::os::unix::fs::symlink(&own, &link).unwrap();
        let hard = dir.path().join("hard.db");
        std::fs::hard_link(&own, &hard).unwrap();
        let own_url = format!("sqlite://{}", own.display());
        for url in [
            format!("sqlite:{}", own.display()),
            format!("sqlite://{}?mode=ro", own.display()),
            format!("sqlite://{}/sub/../keyward.db", dir.path().display()),
            format!("sqlite://{}", link.display()),
            format!("sqlite://{}", hard.display()),
        ] {
            let e =
                JobSources::new(vec![spec("own", &url, &["t"])], &own_url, limits()).unwrap_err();
            assert!(e.contains("own database"), "{url}: {e}");
            assert!(!e.contains(dir.path().to_str().unwrap()), "{e}");
        }
        let other = format!("sqlite://{}", dir.path().join("platform.db").display());
        assert!(JobSources::new(vec![spec("p", &other, &["t"])], &own_url, limits()).is_ok());

        let own_pg = "postgres://keyward:pw@LocalHost:5432/keyward";
        for url in [
            "postgres://other:secret@127.0.0.1/keyward",
            "postgresql://x@localhost:5432/keyward?sslmode=disable",
            "postgres://keyward@[::1]:5432/keyward",
        ] {
            let e = JobSources::new(vec![spec("own", url, &["t"])], own_pg, limits()).unwrap_err();
            assert!(
                e.contains("own database") && !e.contains("secret"),
                "{url}: {e}"
            );
        }
        for url in [
            "postgres://keyward@localhost:5432/platform",
            "postgres://keyward@localhost:5433/keyward",
            "postgres://keyward@db.internal:5432/keyward",
        ] {
            assert!(
                JobSources::new(vec![spec("p", url, &["t"])], own_pg, limits()).is_ok(),
                "{url}"
            );
        }
    }

    #[test]
    fn a_source_is_found_only_by_a_tenant_it_is_granted_to() {
        let id = TenantId::new_random();
        let other = TenantId::new_random();
        let sources = JobSources::new(
            vec![spec(
                "billing",
                "postgres://u:p@db/billing",
                &["acme", &id.to_string()],
            )],
            "sqlite://keyward.db",
            limits(),
        )
        .unwrap();
        assert!(sources.granted("billing", other, "acme").is_some());
        assert!(sources.granted("billing", id, "renamed").is_some());
        assert!(sources.granted("billing", other, "globex").is_none());
        assert!(sources.granted("Billing", other, "acme").is_none());
        assert!(sources.granted("other", id, "acme").is_none());
        let printed = format!("{sources:?}");
        assert!(
            printed.contains("billing") && !printed.contains("u:p@"),
            "{printed}"
        );
    }

    #[test]
    fn bad_declarations_are_refused_without_echoing_the_url() {
        let own = "sqlite://keyward.db";
        for (s, want) in [
            (spec("a b", "postgres://u:pw1@h/d", &["t"]), "a name is"),
            (spec("a", "mysql://u:pw1@h/d", &["t"]), "must start with"),
            (
                spec("a", "postgres://u:pw1@h/d", &[]),
                "granted to no tenant",
            ),
        ] {
            let e = JobSources::new(vec![s], own, limits()).unwrap_err();
            assert!(e.contains(want) && !e.contains("pw1"), "{e}");
        }
        let twice = vec![
            spec("a", "postgres://u@h/d", &["t"]),
            spec("a", "postgres://u@h/e", &["t"]),
        ];
        assert!(JobSources::new(twice, own, limits())
            .unwrap_err()
            .contains("twice"));
    }
}
