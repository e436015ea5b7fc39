//! The `key_events` change feed that keeps every process's caches current.

use sqlx::{Any, Row, Transaction};

use super::{Store, StoreError};

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// An encryption's versions or policy changed (rotate, state change...).
    EncryptionChanged,
    /// An API key changed (revoked).
    ApiKeyChanged,
}

impl EventKind {
    fn as_str(self) -> &'static str {
        match self {
            EventKind::EncryptionChanged => "encryption",
            EventKind::ApiKeyChanged => "api_key",
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
    /// When it was recorded (Unix ms, writer's clock).
    pub created_at: i64,
}

/// Appends an event inside the transaction that makes the change, so the event
/// exists exactly when the change does.
pub(super) async fn record(
    tx: &mut Transaction<'_, Any>,
    kind: EventKind,
    subject: &str,
    now_ms: i64,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO key_events (kind, subject, created_at) VALUES ($1, $2, $3)")
        .bind(kind.as_str())
        .bind(subject)
        .bind(now_ms)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

impl Store {
    /// Every event recorded at or after `since_ms`, oldest first.
    ///
    /// The poller asks by time with a look-back window rather than by sequence
    /// number: on PostgreSQL a sequence value is taken before its transaction
    /// commits, so a lower number can become visible after a higher one.
    pub async fn events_since(&self, since_ms: i64) -> Result<Vec<KeyEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, kind, subject, created_at FROM key_events WHERE created_at >= $1 ORDER BY seq",
        )
        .bind(since_ms)
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
                        _ => None,
                    },
                    subject: r.try_get("subject")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// Deletes events older than `before_ms` (they have been seen by every poller).
    pub async fn prune_events(&self, before_ms: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM key_events WHERE created_at < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}
