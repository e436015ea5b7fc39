//! The [`Store`] itself: connecting to SQLite or PostgreSQL, migrating, and
//! the error every store operation returns. The table files add their queries
//! to [`Store`] in `impl` blocks of their own.

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor};

static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// Which database a [`Store`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite (single node).
    Sqlite,
    /// PostgreSQL (shared by replicas).
    Postgres,
}

impl Backend {
    /// The backend a database URL names, or `None` for an unsupported scheme.
    pub fn from_url(url: &str) -> Option<Backend> {
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }
}

/// A failed store operation. Callers decide what the user sees; the cause is for
/// the log (sqlx errors never contain bound parameter values).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or did not answer in time.
    #[error("database unavailable: {0}")]
    Unavailable(sqlx::Error),
    /// A uniqueness constraint refused the write.
    #[error("conflicting row: {0}")]
    Conflict(sqlx::Error),
    /// A compare-and-swap found the rows changed since they were read: another
    /// process got there first; nothing was changed.
    #[error("{0}")]
    Raced(String),
    /// A row would name something another process deleted meanwhile (a
    /// retired root KEK this process still took for active): nothing was
    /// written; retry once this process has reloaded what it holds.
    #[error("a referenced row is gone: {0}")]
    StaleReference(sqlx::Error),
    /// Any other database error, or a row that does not decode.
    #[error("database error: {0}")]
    Other(sqlx::Error),
    /// A row holds a value this version of Keyward cannot interpret.
    #[error("corrupt row in {table}: {detail}")]
    Corrupt {
        /// The table the row is in.
        table: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(e),
            sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
                StoreError::StaleReference(e)
            }
            _ => StoreError::Other(e),
        }
    }
}

/// The database behind Keyward. Cheap to clone (a pool handle).
#[derive(Clone)]
pub struct Store {
    pub(super) pool: AnyPool,
    pub(super) backend: Backend,
    /// The PostgreSQL URL, kept for the LISTEN connection (it may hold a password).
    pub(super) listen_url: Option<std::sync::Arc<zeroize::Zeroizing<String>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Connects to `url` (`sqlite://PATH` or `postgres://...`). A SQLite file is
    /// created if missing and put in WAL mode.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url).ok_or_else(|| {
            StoreError::Other(sqlx::Error::Configuration(
                "the database URL must start with sqlite: or postgres://".into(),
            ))
        })?;
        let listen_url = (backend == Backend::Postgres)
            .then(|| std::sync::Arc::new(zeroize::Zeroizing::new(url.to_string())));
        if backend == Backend::Sqlite {
            create_private_sqlite_file(url);
        }
        let url = zeroize::Zeroizing::new(match backend {
            Backend::Sqlite if !url.contains("mode=") => {
                let sep = if url.contains('?') { '&' } else { '?' };
                format!("{url}{sep}mode=rwc")
            }
            _ => url.to_string(),
        });
        let options = sqlx::any::AnyConnectOptions::from_str(&url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers proceed during a write; the busy timeout
                        // makes concurrent writers (rotates, CLI) wait instead of fail.
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                             PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        Ok(Store {
            pool,
            backend,
            listen_url,
        })
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Applies every pending migration.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Other(e.into()))
    }

    /// Applies the migrations numbered below `version` only: a database as an
    /// older Keyward left it, for upgrade tests.
    #[cfg(test)]
    pub(crate) async fn migrate_before(&self, version: i64) -> Result<(), StoreError> {
        let all = match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        let older = Migrator {
            migrations: std::borrow::Cow::Owned(
                all.migrations
                    .iter()
                    .filter(|m| m.version < version)
                    .cloned()
                    .collect(),
            ),
            ..Migrator::DEFAULT
        };
        older
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Other(e.into()))
    }

    /// The pool itself, for tests that write rows as an older Keyward did.
    #[cfg(test)]
    pub(crate) fn pool_for_tests(&self) -> &AnyPool {
        &self.pool
    }

    /// A cheap round trip, for readiness checks.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Closes every connection (at shutdown).
    pub async fn close(&self) {
        self.pool.close().await
    }
}

/// Creates a missing SQLite database file readable by its owner only; SQLite
/// gives its -wal and -shm files the same permissions.
fn create_private_sqlite_file(url: &str) {
    let path = url
        .trim_start_matches("sqlite:")
        .trim_start_matches("//")
        .split('?')
        .next()
        .unwrap_or("");
    if path.is_empty() || path == ":memory:" {
        return;
    }
    // Exists already, or the folder is missing (sqlx reports that clearly).
    let _ = crate::owner_only::owner_only_options()
        .write(true)
        .create_new(true)
        .open(path);
}
