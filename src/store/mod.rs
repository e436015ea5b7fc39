//! Persistence: one [`Store`] over SQLite and PostgreSQL through sqlx's `Any`
//! driver, so every query is written once. Queries use `$1`-style parameters,
//! which both databases accept (multi-row `VALUES` lists excepted: see
//! [`values_list`]), and only the types both share (text, 64-bit integers,
//! bytes). Migrations live in `migrations/sqlite` and
//! `migrations/postgres`: the same tables with each database's type names.
//!
//! Nothing here knows about HTTP; nothing here sees a key in the clear.

mod api_keys;
mod audit;
mod encryptions;
mod events;
mod jobs;
mod root_keks;
pub mod source;
mod tenants;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, Executor, Row};

pub use api_keys::ApiKeyRow;
pub use audit::{AuditQuery, AuditSegment, SegmentPacker};
pub use encryptions::{EncryptionRow, NewEncryption, NewVersion, RotateOutcome, VersionRow};
pub use events::{EventKind, KeyEvent};
pub use jobs::{JobProgress, JobRow};
pub use root_keks::{RootKekRow, VersionToRewrap};
pub use tenants::TenantRow;

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
            _ => StoreError::Other(e),
        }
    }
}

/// The database behind Keyward. Cheap to clone (a pool handle).
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    /// The PostgreSQL URL, kept for the LISTEN connection (it may hold a password).
    listen_url: Option<std::sync::Arc<zeroize::Zeroizing<String>>>,
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
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    // Exists already, or the folder is missing (sqlx reports that clearly).
    let _ = options.open(path);
}

/// Most rows one multi-row statement carries. Both databases bind parameters
/// by position here (see [`values_list`]), so a statement's cost grows with its
/// rows, not with their square.
pub fn rows_per_statement(backend: Backend) -> usize {
    match backend {
        // 7 columns x 256 rows stays far below SQLite's 32,766 parameters.
        Backend::Sqlite => 256,
        Backend::Postgres => 512,
    }
}

/// Splits `rows` into one slice per multi-row statement: as many full
/// statements of [`rows_per_statement`] as fit, then the rest as powers of two.
/// A handful of distinct sizes means a handful of distinct SQL texts, each
/// prepared once per connection and then served from sqlx's statement cache.
pub fn statement_chunks<T>(backend: Backend, rows: &[T]) -> impl Iterator<Item = &[T]> {
    let max = rows_per_statement(backend);
    let (full, rest) = (rows.len() / max, rows.len() % max);
    let sizes = std::iter::repeat_n(max, full).chain(
        (0..usize::BITS)
            .rev()
            .map(|bit| 1usize << bit)
            .filter(move |size| rest & size != 0),
    );
    let mut remaining = rows;
    sizes.map(move |size| {
        let (chunk, after) = remaining.split_at(size);
        remaining = after;
        chunk
    })
}

/// `rows` tuples of `columns` parameters, for a multi-row `VALUES` list.
///
/// SQLite gets anonymous `?` parameters: sqlx's SQLite driver asks SQLite for
/// every parameter's name, which SQLite finds by a linear scan of the named
/// ones, so `$N` names cost time quadratic in a statement's parameters (a third
/// of a loaded server's CPU once, at 3,500 of them); `?` are bound in order at
/// constant cost. PostgreSQL gets `$1, $2, ...`.
pub fn values_list(backend: Backend, rows: usize, columns: usize) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(rows * columns * 6);
    for row in 0..rows {
        if row > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for column in 0..columns {
            if column > 0 {
                out.push_str(", ");
            }
            match backend {
                Backend::Sqlite => out.push('?'),
                Backend::Postgres => {
                    let _ = write!(out, "${}", row * columns + column + 1);
                }
            }
        }
        out.push(')');
    }
    out
}

/// Reads a text column that holds a UUID into one of the id newtypes.
fn get_id<T: FromStr>(row: &AnyRow, column: &str, table: &'static str) -> Result<T, StoreError> {
    let text: String = row.try_get(column)?;
    text.parse().map_err(|_| StoreError::Corrupt {
        table,
        detail: format!("column {column} is not a UUID"),
    })
}

/// Like [`get_id`] for a nullable column.
fn get_opt_id<T: FromStr>(
    row: &AnyRow,
    column: &str,
    table: &'static str,
) -> Result<Option<T>, StoreError> {
    let text: Option<String> = row.try_get(column)?;
    text.map(|t| {
        t.parse().map_err(|_| StoreError::Corrupt {
            table,
            detail: format!("column {column} is not a UUID"),
        })
    })
    .transpose()
}

#[cfg(test)]
mod tests {
    use super::Backend;

    #[test]
    fn values_list_numbers_parameters_row_by_row() {
        let pg = Backend::Postgres;
        assert_eq!(super::values_list(pg, 1, 2), "($1, $2)");
        assert_eq!(super::values_list(pg, 2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(super::values_list(Backend::Sqlite, 2, 2), "(?, ?), (?, ?)");
    }

    #[test]
    fn statement_chunks_cover_every_row_in_order_with_few_distinct_sizes() {
        let sizes = |backend, rows: &[usize]| -> Vec<usize> {
            super::statement_chunks(backend, rows)
                .map(<[usize]>::len)
                .collect()
        };
        for backend in [Backend::Sqlite, Backend::Postgres] {
            let max = super::rows_per_statement(backend);
            for len in [0, 1, 7, max - 1, max, max + 1, 3 * max + 100] {
                let rows: Vec<usize> = (0..len).collect();
                let joined: Vec<usize> = super::statement_chunks(backend, &rows)
                    .flatten()
                    .copied()
                    .collect();
                assert_eq!(joined, rows, "{backend:?} {len}");
                let sizes = sizes(backend, &rows);
                assert!(sizes.iter().all(|s| *s == max || s.is_power_of_two()));
                assert!(sizes.iter().all(|s| *s > 0 && *s <= max));
            }
        }
        let rows: Vec<usize> = (0..256 + 5).collect();
        assert_eq!(sizes(Backend::Sqlite, &rows), vec![256, 4, 1]);
    }
}
