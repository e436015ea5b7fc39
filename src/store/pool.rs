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
            sqlx::Error::Database(db) if is_capacity(db.code().as_deref()) => {
                StoreError::Unavailable(e)
            }
            _ => StoreError::Other(e),
        }
    }
}

/// Whether a database error code says the database cannot answer now (busy,
/// locked, full, shutting down, out of connections, failed over) rather than
/// that the statement is wrong: a 503 the caller retries, never a 500.
///
/// SQLite codes are numbers, the primary code in the low byte (`517` is
/// `SQLITE_BUSY_SNAPSHOT`): BUSY (5), LOCKED (6), NOMEM (7), READONLY (8, a
/// file made read-only under us), IOERR (10), FULL (13), CANTOPEN (14),
/// PROTOCOL (15). PostgreSQL codes are SQLSTATEs: class 08 (connection
/// exception), 53 (insufficient resources: disk full, out of memory, too many
/// connections), 57P01 to 57P05 (administrator shutdown, crash shutdown,
/// cannot connect now, idle session timeouts), 25006 (read-only transaction:
/// a standby after a failover), 40001 and 40P01 (serialization failure and
/// deadlock: nothing was written, a retry succeeds).
fn is_capacity(code: Option<&str>) -> bool {
    let Some(code) = code else {
        return false;
    };
    // A SQLSTATE is five characters, often all digits; SQLite's extended
    // codes stay below 10,000.
    if code.len() < 5 {
        if let Ok(n) = code.parse::<u32>() {
            return matches!(n & 0xff, 5 | 6 | 7 | 8 | 10 | 13 | 14 | 15);
        }
    }
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || matches!(code, "25006" | "40001" | "40P01")
}

/// The longest a SQLite writer waits for its turn behind the others: past
/// SQLite's own busy timeout (10 s), so a turn times out only when the file
/// itself cannot be written.
const WRITE_TURN_WAIT: Duration = Duration::from_secs(15);

/// The database behind Keyward. Cheap to clone (a pool handle).
#[derive(Clone)]
pub struct Store {
    pub(super) pool: AnyPool,
    pub(super) backend: Backend,
    /// The PostgreSQL URL, kept for the LISTEN connection (it may hold a
    /// password); replaced by [`Store::replace_url`].
    pub(super) listen_url: Option<crate::secret_cell::SecretCell>,
    /// Writers' turns. SQLite takes one write lock for the whole file: one
    /// writer at a time in this process. Without this, writers (rotations,
    /// management, the audit table, job bookkeeping) each hold a pooled
    /// connection while they sleep in SQLite's busy handler, and the reads
    /// key operations need (a key reloaded after a rotation) wait behind them
    /// for a connection. With it, writers queue here, holding nothing. On
    /// PostgreSQL, writers to the same row wait on its lock the same way:
    /// they may hold half the pool, never all of it.
    pub(super) write_turn: Option<std::sync::Arc<tokio::sync::Semaphore>>,
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
            .then(|| crate::secret_cell::SecretCell::new(zeroize::Zeroizing::new(url.to_string())));
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
            .after_release(move |conn, _meta| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // A COMMIT that failed for a full disk leaves SQLite's
                        // transaction open, and the pool would keep the
                        // connection with the write lock held: every writer
                        // after it waits out the busy timeout and fails, long
                        // after the disk has room again. End whatever is left
                        // open; with nothing open this fails at once and
                        // changes nothing.
                        let _ = conn.execute("ROLLBACK").await;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await?;
        Ok(Store {
            pool,
            backend,
            listen_url,
            write_turn: Some(std::sync::Arc::new(tokio::sync::Semaphore::new(
                match backend {
                    Backend::Sqlite => 1,
                    Backend::Postgres => (max_connections as usize / 2).max(1),
                },
            ))),
        })
    }

    /// Lets the memory of the SQLite connections idle in the pool now go:
    /// one keeps running with its page cache dropped (`PRAGMA
    /// shrink_memory`), the others are closed (each holds its own page cache,
    /// schema and prepared statements; the pool opens connections again as
    /// load needs them, a millisecond each). How many it closed. Every idle
    /// connection is held until all are done, so none is visited twice; a
    /// query meanwhile waits a moment or opens a new one. Nothing to do on
    /// PostgreSQL, whose caches are the server's.
    pub async fn release_idle_memory(&self) -> usize {
        if self.backend != Backend::Sqlite {
            return 0;
        }
        let mut held = Vec::new();
        while let Some(conn) = self.pool.try_acquire() {
            held.push(conn);
        }
        let Some(mut kept) = held.pop() else {
            return 0;
        };
        // An in-memory database lives only as long as its connection.
        let url = self.pool.connect_options().database_url.to_string();
        if url.contains(":memory:") || url.contains("mode=memory") {
            held.push(kept);
            for conn in &mut held {
                let _ = conn.execute("PRAGMA shrink_memory").await;
            }
            return 0;
        }
        let closed = held.len();
        for conn in held {
            // A close that fails has dropped the connection all the same.
            let _ = conn.close().await;
        }
        // A failure only leaves that connection's cache as it was.
        let _ = kept.execute("PRAGMA shrink_memory").await;
        closed
    }

    /// Connects with `url` from now on (a password rotated and its
    /// `file://` reference re-read on SIGHUP): new pool connections and the
    /// next LISTEN connection use it; open connections stay as they are. Only
    /// on PostgreSQL (a SQLite URL carries no credential); the URL must name
    /// the same kind of database.
    pub fn replace_url(&self, url: &str) -> Result<(), StoreError> {
        let (Backend::Postgres, Some(listen)) = (self.backend, &self.listen_url) else {
            return Err(StoreError::Other(sqlx::Error::Configuration(
                "only a PostgreSQL URL is replaced while running".into(),
            )));
        };
        if Backend::from_url(url) != Some(Backend::Postgres) {
            return Err(StoreError::Other(sqlx::Error::Configuration(
                "the new URL is not a PostgreSQL URL".into(),
            )));
        }
        let options = sqlx::any::AnyConnectOptions::from_str(url)?;
        self.pool.set_connect_options(options);
        listen.replace(zeroize::Zeroizing::new(url.to_string()));
        Ok(())
    }

    /// Waits for this process's turn to write (see `write_turn`). Hold the
    /// permit until the write is committed; never ask for a second one while
    /// holding it. Longer than [`WRITE_TURN_WAIT`] (the writers ahead are
    /// stuck on a locked or unwritable database): unavailable, a 503 the
    /// caller retries.
    pub(super) async fn write_turn(
        &self,
    ) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, StoreError> {
        let Some(turn) = &self.write_turn else {
            return Ok(None);
        };
        match tokio::time::timeout(WRITE_TURN_WAIT, turn.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(Some(permit)),
            Ok(Err(_)) => Err(StoreError::Unavailable(sqlx::Error::PoolClosed)),
            Err(_) => {
                metrics::counter!("keyward_database_write_turn_timeouts_total").increment(1);
                Err(StoreError::Unavailable(sqlx::Error::PoolTimedOut))
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    /// A real SQLite error from `sql` on a fresh file, after `setup`.
    async fn sqlite_error(setup: &str, hold_lock: bool, sql: &str) -> StoreError {
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let mut a = sqlx::AnyConnection::connect(&url).await.unwrap();
        a.execute("PRAGMA journal_mode = WAL; CREATE TABLE t (v TEXT)")
            .await
            .unwrap();
        let mut b = sqlx::AnyConnection::connect(&url).await.unwrap();
        b.execute(setup).await.unwrap();
        if hold_lock {
            a.execute("BEGIN IMMEDIATE").await.unwrap();
        }
        StoreError::from(b.execute(sql).await.unwrap_err())
    }

    /// A table with one row, `kept`.
    async fn write_kept(store: &Store) {
        store
            .pool
            .execute("CREATE TABLE t (v TEXT); INSERT INTO t VALUES ('kept')")
            .await
            .unwrap();
    }

    /// What [`write_kept`] wrote.
    async fn read_kept(store: &Store) -> String {
        let row: (String,) = sqlx::query_as("SELECT v FROM t")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        row.0
    }

    /// Holds `n` connections of `store` at once, then gives them back idle.
    async fn open_idle(store: &Store, n: usize) {
        let mut held = Vec::new();
        for _ in 0..n {
            held.push(store.pool.acquire().await.unwrap());
        }
        drop(held);
        while store.pool.num_idle() < n {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn releasing_idle_memory_closes_all_idle_connections_but_one_and_keeps_the_data() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("k.db").display());
        let store = Store::connect(&url, 4).await.unwrap();
        write_kept(&store).await;
        open_idle(&store, 4).await;
        assert_eq!(store.release_idle_memory().await, 3);
        assert_eq!(store.pool.size(), 1);
        assert_eq!(read_kept(&store).await, "kept");
        // The pool opens connections again as they are needed.
        open_idle(&store, 4).await;
        assert_eq!(store.pool.size(), 4);

        // An in-memory database lives in its connections: none is closed.
        let memory = Store::connect("sqlite::memory:", 1).await.unwrap();
        write_kept(&memory).await;
        open_idle(&memory, 1).await;
        assert_eq!(memory.release_idle_memory().await, 0);
        assert_eq!(read_kept(&memory).await, "kept");
    }

    #[tokio::test]
    async fn a_locked_or_full_sqlite_database_is_unavailable_not_an_internal_error() {
        let locked = sqlite_error(
            "PRAGMA busy_timeout = 0",
            true,
            "INSERT INTO t VALUES ('x')",
        )
        .await;
        assert!(matches!(locked, StoreError::Unavailable(_)), "{locked:?}");
        // A database at its size limit answers SQLITE_FULL, as a full disk does.
        let full = sqlite_error(
            "PRAGMA max_page_count = 2",
            false,
            "INSERT INTO t SELECT hex(zeroblob(100000))",
        )
        .await;
        assert!(matches!(full, StoreError::Unavailable(_)), "{full:?}");
        // A statement that is wrong stays an error of its own.
        let wrong = sqlite_error("SELECT 1", false, "INSERT INTO missing VALUES (1)").await;
        assert!(matches!(wrong, StoreError::Other(_)), "{wrong:?}");
    }

    #[test]
    fn capacity_codes_are_told_from_statement_errors() {
        for code in [
            "5", "517", "6", "13", "10", "778", "14", "08006", "57P01", "57P03", "53100", "53300",
            "25006", "40001", "40P01",
        ] {
            assert!(is_capacity(Some(code)), "{code}");
        }
        for code in ["1", "19", "2067", "787", "42P01", "23505", "22P02", "XX000"] {
            assert!(!is_capacity(Some(code)), "{code}");
        }
        assert!(!is_capacity(None));
    }
}

/// A real full disk: a tmpfs of 2 MiB, mounted for the test (root only; the
/// fault run `bench/faults` covers the same through the whole server).
#[cfg(test)]
mod full_disk_tests {
    use super::*;

    struct Tmpfs(tempfile::TempDir);

    impl Tmpfs {
        fn mount() -> Option<Tmpfs> {
            let dir = tempfile::tempdir().unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            ok.then_some(Tmpfs(dir))
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }

    #[tokio::test]
    async fn writes_work_again_once_a_full_disk_has_room() {
        let Some(fs) = Tmpfs::mount() else {
            assert_ne!(
                std::process::Command::new("id")
                    .arg("-u")
                    .output()
                    .unwrap()
                    .stdout,
                b"0\n",
                "root could not mount a tmpfs"
            );
            eprintln!("skipped: mounting a tmpfs needs root");
            return;
        };
        let dir = fs.0.path();
        let url = format!("sqlite://{}", dir.join("k.db").display());
        let store = Store::connect(&url, 3).await.unwrap();
        let insert = "INSERT INTO t VALUES (hex(randomblob(3000)))";
        sqlx::query("CREATE TABLE t (v TEXT)")
            .execute(&store.pool)
            .await
            .unwrap();
        let filler = dir.join("filler");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&filler).unwrap();
            while f.write_all(&[0u8; 65536]).is_ok() {}
            while f.write_all(&[0u8; 512]).is_ok() {}
        }
        let mut refused = 0;
        for _ in 0..10 {
            let mut tx = store.pool.begin().await.unwrap();
            let result = match sqlx::query(insert).execute(&mut *tx).await {
                Ok(_) => tx.commit().await,
                Err(e) => Err(e),
            };
            if let Err(e) = result {
                let e = StoreError::from(e);
                assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
                refused += 1;
            }
        }
        assert!(refused > 0, "the disk was never full");
        // Room again: every writer gets through at once; none waits out the
        // busy timeout behind a transaction a failed COMMIT left open.
        std::fs::remove_file(&filler).unwrap();
        for _ in 0..6 {
            let started = std::time::Instant::now();
            sqlx::query(insert).execute(&store.pool).await.unwrap();
            assert!(started.elapsed() < Duration::from_secs(2));
        }
    }
}
