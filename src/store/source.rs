//! The platform's table that a re-encryption job walks (the job's *source*):
//! its own small pool, and the SQL over the table and column names the job
//! named. Names are checked with [`is_plain_identifier`] before any SQL is
//! built and always quoted; values are always bound.
//!
//! Every call is bounded ([`SourceLimits`]): a source that accepts a
//! connection and never answers costs its job a timeout, never a runner.
//! [`same_database`] recognises Keyward's own database behind another
//! spelling of its URL, so that no job source can be it.

use std::future::Future;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::postgres::PgConnectOptions;
use sqlx::{AnyPool, Executor, Row};

use super::pool::Backend;
use super::sql::{statement_chunks, values_list};

/// Which columns of which table hold the ciphertexts, as the job named them.
#[derive(Debug, Clone)]
pub struct SourceLayout<'a> {
    /// The table (optionally `schema.table`).
    pub table: &'a str,
    /// A unique, ordered key column (integer or text).
    pub key_column: &'a str,
    /// Holds `cipherText` (base64 text).
    pub cipher_text_column: &'a str,
    /// Holds `encryptionVersionId` (text).
    pub version_column: &'a str,
    /// Holds `metadata` as JSON text.
    pub metadata_column: &'a str,
    /// Holds each row's `encryptionId` (text), when the table has several.
    pub encryption_id_column: Option<&'a str>,
    /// Holds each row's `context` (text), kept through re-encryption.
    pub context_column: Option<&'a str>,
    /// Hold blind-index values (hex text) the job recomputes as it moves
    /// each row.
    pub index_columns: Vec<&'a str>,
}

/// Time bounds on a source.
#[derive(Debug, Clone, Copy)]
pub struct SourceLimits {
    /// Longest wait for a connection (TCP, TLS and authentication).
    pub connect_timeout: Duration,
    /// Longest time one statement may take; on PostgreSQL also set as the
    /// session's `statement_timeout`, so the server stops the work too.
    pub statement_timeout: Duration,
}

/// Why the source could not be used: for the operator's log only (the
/// tenant sees one generic error). The text never holds a password (sqlx
/// errors can quote a URL's host, never its password) and is kept short.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The database could not be reached.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The table or its columns could not be read.
    #[error("cannot read the table: {0}")]
    Table(String),
    /// A later query failed.
    #[error("{0}")]
    Query(String),
    /// A connection or a statement took longer than its limit.
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
}

impl From<sqlx::Error> for SourceError {
    fn from(e: sqlx::Error) -> Self {
        SourceError::Query(short(&e))
    }
}

/// Whether `name` is a plain SQL identifier (letters, digits, underscore, at
/// most 63 characters, not starting with a digit); with `dotted`, also
/// `schema.table`.
pub fn is_plain_identifier(name: &str, dotted: bool) -> bool {
    let part = |p: &str| {
        !p.is_empty()
            && p.len() <= 63
            && p.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    match name.split_once('.') {
        Some((a, b)) if dotted => part(a) && part(b),
        Some(_) => false,
        None => part(name),
    }
}

fn quote(name: &str) -> String {
    name.split('.')
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(".")
}

/// How the key column's values are read and bound. Learned from the first
/// row read, never assumed from a table that was empty at the time: a job
/// that started on an empty table, or resumed on one, still reads the
/// integer keys of rows that arrive later, and binds its cursor as an
/// integer (PostgreSQL refuses `bigint > text`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyKind {
    Integer,
    Text,
}

/// One row as read.
#[derive(Debug)]
pub struct SourceRow {
    /// The key column's value, as text.
    pub key: String,
    /// How the key was stored, so the write binds it the same way.
    key_kind: KeyKind,
    /// The ciphertext column; `None` (NULL) for a row whose encrypted field
    /// is empty, which has nothing to move.
    pub cipher_text: Option<String>,
    /// The version column.
    pub version: Option<String>,
    /// The metadata column.
    pub metadata: Option<String>,
    /// The encryption id column, when the layout has one.
    pub encryption: Option<String>,
    /// The context column, when the layout has one.
    pub context: Option<String>,
    /// The index columns' values, in the layout's order.
    pub index_values: Vec<Option<String>>,
}

/// A row's new values: ciphertext, version id, metadata and the index
/// columns' values (one per index column of the layout, in its order).
pub type SourceWrite<'r> = (&'r SourceRow, String, String, String, Vec<String>);

/// Runs `f` within `limit`, or fails with [`SourceError::TimedOut`].
async fn bounded<T>(
    limit: Duration,
    f: impl Future<Output = Result<T, SourceError>>,
) -> Result<T, SourceError> {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or(Err(SourceError::TimedOut(limit)))
}

/// What a database URL points at, for comparing two spellings of it.
#[derive(Debug, PartialEq, Eq)]
enum Place {
    /// A SQLite file: its device and inode when it exists (so that a
    /// symbolic or hard link is the same file), else its canonical path.
    SqliteFile(u64, u64),
    SqlitePath(std::path::PathBuf),
    /// A PostgreSQL database: host (lower case, loopback names as one),
    /// port and database name.
    Postgres(String, u16, String),
}

fn place(url: &str) -> Option<Place> {
    match Backend::from_url(url)? {
        Backend::Sqlite => {
            let rest = url.strip_prefix("sqlite:")?;
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            let path = rest.split('?').next().unwrap_or(rest);
            if path.is_empty() || path == ":memory:" {
                return None;
            }
            let path = std::path::Path::new(path);
            if let Ok(meta) = std::fs::metadata(path) {
                use std::os::unix::fs::MetadataExt;
                return Some(Place::SqliteFile(meta.dev(), meta.ino()));
            }
            // Not there (yet): compare the canonical directory and the name.
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            let dir = dir
                .map(|d| d.canonicalize().unwrap_or_else(|_| d.to_path_buf()))
                .unwrap_or_else(|| std::env::current_dir().unwrap_or_default());
            Some(Place::SqlitePath(dir.join(path.file_name()?)))
        }
        Backend::Postgres => {
            let options = PgConnectOptions::from_str(url).ok()?;
            let host = options.get_host().to_ascii_lowercase();
            let host = match host.as_str() {
                "localhost" | "127.0.0.1" | "::1" | "[::1]" | "" => "localhost".to_string(),
                _ => host,
            };
            let database = options
                .get_database()
                .unwrap_or(options.get_username())
                .to_string();
            Some(Place::Postgres(host, options.get_port(), database))
        }
    }
}

/// Whether two database URLs name the same database: the same SQLite file
/// (through any path, link or query string), or the same PostgreSQL host,
/// port and database (user, password and parameters aside; `localhost`,
/// `127.0.0.1` and `::1` taken as one host). A host reached under two DNS
/// names is not recognised: the operator's source role should have no access
/// to Keyward's database anyway.
pub fn same_database(a: &str, b: &str) -> bool {
    matches!((place(a), place(b)), (Some(x), Some(y)) if x == y)
}

/// An open connection to the platform's table, with its quoted names.
pub struct SourceTable {
    limits: SourceLimits,
    pool: AnyPool,
    backend: Backend,
    /// Unset until a row has been read (see [`KeyKind`]).
    key_kind: OnceLock<KeyKind>,
    table: String,
    key: String,
    cipher_text: String,
    version: String,
    metadata: String,
    encryption: Option<String>,
    context: Option<String>,
    indexes: Vec<String>,
}

impl SourceTable {
    /// Connects (two connections at most, `connect_timeout` to get one) and
    /// probes the columns, learning whether the key is an integer if the
    /// table has a row (else the first row read later decides). The names
    /// must have passed [`is_plain_identifier`].
    pub async fn open(
        url: &str,
        layout: &SourceLayout<'_>,
        limits: SourceLimits,
    ) -> Result<SourceTable, SourceError> {
        let backend = Backend::from_url(url)
            .ok_or_else(|| SourceError::Connect("the database URL is not valid".into()))?;
        sqlx::any::install_default_drivers();
        let statement_ms = limits.statement_timeout.as_millis().max(1);
        let pool = bounded(limits.connect_timeout, async {
            AnyPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(limits.connect_timeout)
                .after_connect(move |conn, _| {
                    Box::pin(async move {
                        if backend == Backend::Postgres {
                            conn.execute(&*format!("SET statement_timeout = {statement_ms}"))
                                .await?;
                        }
                        Ok(())
                    })
                })
                .connect(url)
                .await
                .map_err(|e| SourceError::Connect(short(&e)))
        })
        .await?;
        // Keyward's own database under another name (a DNS alias, a socket
        // path, another spelling of the host), which comparing URLs cannot
        // see: a database that holds Keyward's own tables is refused.
        let own = bounded(limits.statement_timeout, async {
            for table in ["root_keks", "key_events", "api_keys"] {
                let probe = format!("SELECT 1 FROM {table} WHERE 1 = 0");
                if sqlx::query(&probe).fetch_optional(&pool).await.is_err() {
                    return Ok(false);
                }
            }
            Ok(true)
        })
        .await;
        if !matches!(own, Ok(false)) {
            pool.close().await;
            return Err(SourceError::Connect(
                "the source holds Keyward's own tables (or did not answer)".into(),
            ));
        }
        let source = SourceTable {
            limits,
            pool,
            backend,
            key_kind: OnceLock::new(),
            table: quote(layout.table),
            key: quote(layout.key_column),
            cipher_text: quote(layout.cipher_text_column),
            version: quote(layout.version_column),
            metadata: quote(layout.metadata_column),
            encryption: layout.encryption_id_column.map(quote),
            context: layout.context_column.map(quote),
            indexes: layout.index_columns.iter().map(|c| quote(c)).collect(),
        };
        if let Err(e) = source.learn_key_kind().await {
            source.close().await;
            return Err(match e {
                SourceError::Query(e) => SourceError::Table(e),
                e => e,
            });
        }
        Ok(source)
    }

    /// The key column's kind: the one learned, or else read from any one
    /// row (`None`: the table is empty).
    async fn learn_key_kind(&self) -> Result<Option<KeyKind>, SourceError> {
        if let Some(kind) = self.key_kind.get() {
            return Ok(Some(*kind));
        }
        let sql = format!("SELECT {} FROM {} LIMIT 1", self.columns(), self.table);
        let probe = bounded(self.limits.statement_timeout, async {
            Ok(sqlx::query(&sql).fetch_optional(&self.pool).await?)
        })
        .await?;
        // A row whose key reads as neither (NULL) teaches nothing; the
        // batch that reads it says why.
        Ok(probe
            .and_then(|row| read_key(&row).ok())
            .map(|(_, kind)| *self.key_kind.get_or_init(|| kind)))
    }

    /// Closes the pool (bounded: a hung source is dropped, not waited for).
    pub async fn close(self) {
        let _ = tokio::time::timeout(self.limits.connect_timeout, self.pool.close()).await;
    }

    fn columns(&self) -> String {
        let mut cols = vec![
            self.key.as_str(),
            &self.cipher_text,
            &self.version,
            &self.metadata,
        ];
        if let Some(c) = &self.encryption {
            cols.push(c);
        }
        if let Some(c) = &self.context {
            cols.push(c);
        }
        cols.extend(self.indexes.iter().map(String::as_str));
        cols.join(", ")
    }

    /// Rows in the table.
    pub async fn count(&self) -> Result<i64, SourceError> {
        let sql = format!("SELECT COUNT(*) FROM {}", self.table);
        bounded(self.limits.statement_timeout, async {
            Ok(sqlx::query(&sql).fetch_one(&self.pool).await?.try_get(0)?)
        })
        .await
    }

    /// Up to `limit` rows after the key `after`, in key order.
    pub async fn batch(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<SourceRow>, SourceError> {
        let key = &self.key;
        let sql = format!(
            "SELECT {} FROM {} {} ORDER BY {key} LIMIT {limit}",
            self.columns(),
            self.table,
            if after.is_some() {
                format!("WHERE {key} > $1")
            } else {
                String::new()
            },
        );
        let mut q = sqlx::query(&sql);
        if let Some(a) = after {
            // A cursor is bound as the column's kind. Not known yet (a job
            // resumed on a table that is empty now): ask the table; still
            // empty, and no row lies after the cursor either.
            let Some(kind) = self.learn_key_kind().await? else {
                return Ok(Vec::new());
            };
            q = match kind {
                KeyKind::Integer => q.bind(a.parse::<i64>().map_err(|_| {
                    SourceError::Query("the job's cursor is not an integer key".into())
                })?),
                KeyKind::Text => q.bind(a.to_string()),
            };
        }
        let rows = bounded(self.limits.statement_timeout, async {
            Ok(q.fetch_all(&self.pool).await?)
        })
        .await?;
        let decode = |r: &sqlx::any::AnyRow| -> Result<SourceRow, sqlx::Error> {
            let (key, key_kind) = read_key(r)?;
            self.key_kind.get_or_init(|| key_kind);
            // After the fixed columns: the encryption's, the context's, then
            // the index columns, each only if the layout has it.
            let mut next = 4 + usize::from(self.encryption.is_some());
            let context = match &self.context {
                Some(_) => {
                    next += 1;
                    r.try_get(next - 1)?
                }
                None => None,
            };
            let index_values = (0..self.indexes.len())
                .map(|i| r.try_get(next + i))
                .collect::<Result<Vec<Option<String>>, _>>()?;
            Ok(SourceRow {
                context,
                index_values,
                key,
                key_kind,
                cipher_text: r.try_get(1)?,
                version: r.try_get(2)?,
                metadata: r.try_get(3)?,
                encryption: if self.encryption.is_some() {
                    r.try_get(4)?
                } else {
                    None
                },
            })
        };
        Ok(rows.iter().map(decode).collect::<Result<_, _>>()?)
    }

    /// Writes each row's new values only if the row still holds the old
    /// ciphertext and version (a compare-and-swap per row), in one
    /// transaction, one statement for a few hundred rows:
    /// `WITH v(...) AS (VALUES ...) UPDATE t SET ... FROM v WHERE key, old
    /// ciphertext and old version match RETURNING 1` ([`statement_chunks`]).
    /// Returns how many rows were written; the others changed meanwhile and
    /// are left alone.
    pub async fn swap_batch(&self, writes: &[SourceWrite<'_>]) -> Result<usize, SourceError> {
        // One statement timeout per statement, and one for begin and commit.
        let statements = statement_chunks(self.backend, writes).count() as u32 + 1;
        bounded(
            self.limits.statement_timeout.saturating_mul(statements),
            self.swap_batch_unbounded(writes),
        )
        .await
    }

    async fn swap_batch_unbounded(&self, writes: &[SourceWrite<'_>]) -> Result<usize, SourceError> {
        let mut tx = self.pool.begin().await?;
        let mut written = 0;
        for chunk in statement_chunks(self.backend, writes) {
            let values = values_list(self.backend, chunk.len(), 6 + self.indexes.len());
            let (mut names, mut sets) = (String::new(), String::new());
            for (i, column) in self.indexes.iter().enumerate() {
                names.push_str(&format!(", new_idx{i}"));
                sets.push_str(&format!(", {column} = v.new_idx{i}"));
            }
            let sql = format!(
                "WITH v(k, old_ct, old_ver, new_ct, new_ver, new_meta{names}) AS (VALUES {values}) \
                 UPDATE {table} AS t SET {ct} = v.new_ct, {ver} = v.new_ver, {meta} = v.new_meta{sets} \
                 FROM v WHERE t.{key} = v.k AND t.{ct} = v.old_ct AND t.{ver} = v.old_ver \
                 RETURNING 1",
                table = self.table,
                ct = self.cipher_text,
                ver = self.version,
                meta = self.metadata,
                key = self.key,
            );
            let mut q = sqlx::query(&sql);
            for (row, cipher_text, version, metadata, index_values) in chunk {
                // Bound as it was read (the text of an integer read as one).
                q = match row.key_kind {
                    KeyKind::Integer => q.bind(row.key.parse::<i64>().unwrap_or(i64::MIN)),
                    KeyKind::Text => q.bind(row.key.clone()),
                };
                q = q
                    .bind(row.cipher_text.as_deref())
                    .bind(row.version.as_deref())
                    .bind(cipher_text.as_str())
                    .bind(version.as_str())
                    .bind(metadata.as_str());
                for i in 0..self.indexes.len() {
                    q = q.bind(index_values.get(i).map(String::as_str));
                }
            }
            written += q.fetch_all(&mut *tx).await?.len();
        }
        tx.commit().await?;
        Ok(written)
    }

    /// Rows that hold a ciphertext, per (encryption column value, version);
    /// the encryption is `None` when the table has one encryption, and the
    /// version `None` when the column is NULL.
    pub async fn histogram(
        &self,
    ) -> Result<Vec<(Option<String>, Option<String>, i64)>, SourceError> {
        let ver = &self.version;
        let group = match &self.encryption {
            Some(c) => format!("{c}, {ver}"),
            None => ver.clone(),
        };
        let sql = format!(
            "SELECT {group}, COUNT(*) FROM {} WHERE {} IS NOT NULL GROUP BY {group}",
            self.table, self.cipher_text
        );
        let per_row = self.encryption.is_some();
        let rows = bounded(self.limits.statement_timeout, async {
            Ok(sqlx::query(&sql).fetch_all(&self.pool).await?)
        })
        .await?;
        let decode = |r: &sqlx::any::AnyRow| -> Result<_, sqlx::Error> {
            Ok(if per_row {
                (
                    r.try_get::<Option<String>, _>(0)?,
                    r.try_get::<Option<String>, _>(1)?,
                    r.try_get::<i64, _>(2)?,
                )
            } else {
                (
                    None,
                    r.try_get::<Option<String>, _>(0)?,
                    r.try_get::<i64, _>(1)?,
                )
            })
        };
        Ok(rows.iter().map(decode).collect::<Result<_, _>>()?)
    }
}

/// A row's key (column 0) as text, and how it was stored: an integer if it
/// reads as one, else text.
fn read_key(row: &sqlx::any::AnyRow) -> Result<(String, KeyKind), sqlx::Error> {
    match row.try_get::<i64, _>(0) {
        Ok(k) => Ok((k.to_string(), KeyKind::Integer)),
        Err(_) => Ok((row.try_get::<String, _>(0)?, KeyKind::Text)),
    }
}

/// An error message without anything from a URL (sqlx errors can quote the
/// connection string's host; they never contain the password, but keep it short).
fn short(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => d.message().to_string(),
        sqlx::Error::Io(io) => io.kind().to_string(),
        sqlx::Error::PoolTimedOut => "timed out".into(),
        sqlx::Error::Configuration(_) => "the database URL is not valid".into(),
        other => other.to_string().chars().take(200).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(pool: &AnyPool, sql: &str) {
        sqlx::query(sql).execute(pool).await.unwrap();
    }

    /// A table empty when the job opened it (or resumed on it) learns its
    /// key column's kind from the first row that arrives: integer keys are
    /// read, the cursor is bound and the compare-and-swap finds its row;
    /// text keys likewise.
    #[tokio::test]
    async fn a_table_empty_when_opened_reads_and_writes_the_keys_of_rows_that_arrive_later() {
        sqlx::any::install_default_drivers();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/platform.db?mode=rwc", dir.path().display());
        let platform = AnyPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();
        let limits = SourceLimits {
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(5),
        };
        for (table, key_type, keys) in [
            ("by_number", "BIGINT", ["1", "2", "10", "11"]),
            ("by_name", "TEXT", ["a", "b", "c", "d"]),
        ] {
            run(
                &platform,
                &format!(
                    "CREATE TABLE {table} (id {key_type} PRIMARY KEY, ct TEXT, v TEXT, m TEXT)"
                ),
            )
            .await;
            let layout = SourceLayout {
                table,
                key_column: "id",
                cipher_text_column: "ct",
                version_column: "v",
                metadata_column: "m",
                encryption_id_column: None,
                context_column: None,
                index_columns: vec![],
            };
            let source = SourceTable::open(&url, &layout, limits).await.unwrap();
            assert!(source.batch(None, 10).await.unwrap().is_empty());
            // A job resumed with a cursor on a table that is empty now.
            assert!(source.batch(Some(keys[1]), 10).await.unwrap().is_empty());
            for key in keys {
                let value = if key_type == "BIGINT" {
                    key.to_string()
                } else {
                    format!("'{key}'")
                };
                run(
                    &platform,
                    &format!("INSERT INTO {table} VALUES ({value}, 'old', 'v1', '{{}}')"),
                )
                .await;
            }
            let first = source.batch(None, 2).await.unwrap();
            let first: Vec<&str> = first.iter().map(|r| r.key.as_str()).collect();
            assert_eq!(first, keys[..2], "{table}");
            let rest = source.batch(Some(keys[1]), 10).await.unwrap();
            let rest_keys: Vec<&str> = rest.iter().map(|r| r.key.as_str()).collect();
            assert_eq!(
                rest_keys,
                keys[2..],
                "{table}: in key order after the cursor"
            );
            let writes: Vec<SourceWrite<'_>> =
                vec![(&rest[0], "new".into(), "v2".into(), "{}".into(), vec![])];
            assert_eq!(source.swap_batch(&writes).await.unwrap(), 1, "{table}");
            let (key, v): (String, String) = sqlx::query_as(&format!(
                "SELECT CAST(id AS TEXT), v FROM {table} WHERE ct = 'new'"
            ))
            .fetch_one(&platform)
            .await
            .unwrap();
            assert_eq!((key.as_str(), v.as_str()), (keys[2], "v2"), "{table}");
            source.close().await;
        }
        platform.close().await;
    }
}
