//! Audit retention for the table copy: segments whose newest record is older
//! than `audit_retention` are deleted in the background, oldest first, in
//! bounded batches. The audit file is never touched (it is the evidence the
//! operator archives), and neither is the hash chain: the table has no
//! verifier of its own, and each kept segment's lines still carry their
//! `prev` and `hash`, so a verifier of a table export starts at the oldest
//! kept record, whose `prev` names the pruned one before it.

use std::time::Duration;

use tokio::sync::watch;

use crate::store::Store;

/// Most segments (of up to 1,000 records each) deleted per transaction: a
/// transaction holds SQLite's write lock, which the audit writer waits for.
const BATCH_SEGMENTS: i64 = 100;
/// The pause between batches while a backlog is deleted, so that pruning a
/// long history takes turns with the writers instead of starving them.
const BATCH_PAUSE: Duration = Duration::from_millis(200);
/// How often to look for expired segments at most and at least: a tenth of
/// the retention, within these bounds.
const CHECK_AT_MOST: Duration = Duration::from_secs(1);
const CHECK_AT_LEAST: Duration = Duration::from_secs(600);

/// How often [`prune_table`] looks for expired segments under `retention`.
fn check_interval(retention: Duration) -> Duration {
    (retention / 10).clamp(CHECK_AT_MOST, CHECK_AT_LEAST)
}

/// Deletes audit segments older than `retention` from the table, now and
/// then every [`check_interval`], until `shutdown`. Every replica runs it;
/// deletes are idempotent, so replicas pruning at once only repeat a cheap
/// query. A database error is logged and tried again at the next check.
pub async fn prune_table(store: Store, retention: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut ticker = tokio::time::interval(check_interval(retention));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let before_ms = crate::domain::time::now_ms().saturating_sub(retention_ms);
        let mut total = 0;
        loop {
            match store.prune_audit(before_ms, BATCH_SEGMENTS).await {
                Ok(deleted) => {
                    total += deleted;
                    metrics::counter!("keyward_audit_segments_pruned_total").increment(deleted);
                    if deleted < BATCH_SEGMENTS as u64 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "audit retention: cannot delete expired segments; trying again later");
                    break;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(BATCH_PAUSE) => {}
                _ = shutdown.changed() => return,
            }
        }
        if total > 0 {
            tracing::info!(
                segments = total,
                retention = %humantime::format_duration(retention),
                "audit retention: deleted expired segments from the audit table"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_run_a_tenth_of_the_retention_apart_within_bounds() {
        assert_eq!(check_interval(Duration::from_secs(2)), CHECK_AT_MOST);
        assert_eq!(
            check_interval(Duration::from_secs(100)),
            Duration::from_secs(10)
        );
        assert_eq!(
            check_interval(Duration::from_secs(400 * 86_400)),
            CHECK_AT_LEAST
        );
    }
}
