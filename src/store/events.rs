//! The `key_events` change feed that keeps every process's caches current.

use sqlx::{Any, Row, Transaction};

use super::pool::{Backend, Store, StoreError};

/// The PostgreSQL channel on which every change is announced.
pub const CHANNEL: &str = "keyward_events";

/// Now in Unix milliseconds by the database's clock. Events are stamped and read
/// by the database's clock, so that a writer (say, the CLI on another host) whose
/// clock is off cannot hide its events from the pollers.
pub(super) fn db_now_ms(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT",
        Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    }
}

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// An encryption's versions or policy changed (rotate, state change...).
    EncryptionChanged,
    /// An API key changed (revoked).
    ApiKeyChanged,
    /// A root KEK was added or retired.
    RootKeysChanged,
    /// A tenant changed (disabled): every cached key of it must be read again.
    TenantChanged,
    /// The Keyward client CA was made or its CRL changed (a client
    /// certificate revoked): every mutual-TLS listener rebuilds its verifier.
    ClientCaChanged,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            EventKind::EncryptionChanged => "encryption",
            EventKind::ApiKeyChanged => "api_key",
            EventKind::RootKeysChanged => "root_keys",
            EventKind::TenantChanged => "tenant",
            EventKind::ClientCaChanged => "client_ca",
        }
    }
}

/// One change.
#[derive(Debug, Clone)]
pub struct KeyEvent {
    /// Position in the feed.
    pub seq: i64,
    /// What changed.
    pub kind: Option<EventKind>,
    /// The id of what changed.
    pub subject: String,
    /// When it was recorded (Unix ms, the database's clock).
    pub created_at: i64,
}

/// Commits a change that may not have happened (a compare-and-swap that found
/// nothing to change): with `changed`, the event first, so replicas hear of
/// it. Returns `changed`.
pub(super) async fn commit_change(
    mut tx: Transaction<'_, Any>,
    backend: Backend,
    changed: bool,
    kind: EventKind,
    subject: &str,
) -> Result<bool, StoreError> {
    if changed {
        record(&mut tx, backend, kind, subject).await?;
    }
    tx.commit().await?;
    Ok(changed)
}

/// Appends an event inside the transaction that makes the change, so the event
/// exists exactly when the change does. On PostgreSQL it is also announced with
/// NOTIFY, which PostgreSQL delivers at commit.
pub(super) async fn record(
    tx: &mut Transaction<'_, Any>,
    backend: Backend,
    kind: EventKind,
    subject: &str,
) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO key_events (kind, subject, created_at) VALUES ($1, $2, {})",
        db_now_ms(backend)
    );
    sqlx::query(&sql)
        .bind(kind.as_str())
        .bind(subject)
        .execute(&mut **tx)
        .await?;
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(kind.as_str())
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

impl Store {
    /// Every event recorded in the last `look_back_ms` (by the database's clock),
    /// oldest first.
    ///
    /// The poller asks by time with a look-back window rather than by sequence
    /// number: on PostgreSQL a sequence value is taken before its transaction
    /// commits, so a lower number can become visible after a higher one.
    pub async fn recent_events(&self, look_back_ms: i64) -> Result<Vec<KeyEvent>, StoreError> {
        let sql = format!(
            "SELECT seq, kind, subject, created_at FROM key_events WHERE created_at >= {} - $1 ORDER BY seq",
            db_now_ms(self.backend)
        );
        let rows = sqlx::query(&sql)
            .bind(look_back_ms)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get("kind")?;
                Ok(KeyEvent {
                    seq: r.try_get("seq")?,
                    kind: match kind.as_str() {
                        "encryption" => Some(EventKind::EncryptionChanged),
                        "api_key" => Some(EventKind::ApiKeyChanged),
                        "root_keys" => Some(EventKind::RootKeysChanged),
                        "tenant" => Some(EventKind::TenantChanged),
                        "client_ca" => Some(EventKind::ClientCaChanged),
                        _ => None,
                    },
                    subject: r.try_get("subject")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// Deletes events older than `age_ms` (every poller has seen them).
    pub async fn prune_events(&self, age_ms: i64) -> Result<u64, StoreError> {
        let _turn = self.write_turn().await?;
        let sql = format!(
            "DELETE FROM key_events WHERE created_at < {} - $1",
            db_now_ms(self.backend)
        );
        Ok(sqlx::query(&sql)
            .bind(age_ms)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// On PostgreSQL, a listener for change announcements (see [`CHANNEL`]);
    /// `None` on SQLite, where polling alone carries changes.
    pub async fn change_listener(&self) -> Option<sqlx::postgres::PgListener> {
        let url = self.listen_url.as_ref()?.get();
        match sqlx::postgres::PgListener::connect(&url).await {
            Ok(mut listener) => match listener.listen(CHANNEL).await {
                Ok(()) => Some(listener),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot LISTEN for changes; relying on polling");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot LISTEN for changes; relying on polling");
                None
            }
        }
    }
}
