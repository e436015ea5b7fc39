//! The change feed follower: keeps this process's key ring and API key cache in
//! step with changes made by the CLI or by other replicas.
//!
//! Every change that a cache must see is appended to `key_events` in the same
//! transaction as the change itself. This task reads the feed every
//! `sync_interval` and drops the affected cache entries, so a rotation or a
//! revocation made elsewhere takes effect here within one interval. If the feed
//! cannot be read for longer than its look-back window, every cache is cleared
//! once it can, since events may have been missed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::service::KeyService;
use super::time::now_ms;
use crate::store::EventKind;

/// How far back each poll looks. Events are read by time, not only by sequence
/// number, because on PostgreSQL a transaction that took a lower sequence number
/// can commit after one that took a higher number. The window also absorbs clock
/// differences between replicas.
const LOOK_BACK_MS: i64 = 120_000;

/// Events older than this are deleted from the feed.
const RETAIN_MS: i64 = 3_600_000;

/// Follows the change feed until `shutdown` turns true.
pub async fn follow_changes(
    service: Arc<KeyService>,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    // seq -> created_at of every event already applied inside the window.
    let mut seen: HashMap<i64, i64> = HashMap::new();
    let mut last_ok = now_ms();
    let mut last_prune = 0i64;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => return,
        }
        let started = now_ms();
        match service.store().events_since(started - LOOK_BACK_MS).await {
            Ok(events) => {
                if started - last_ok > LOOK_BACK_MS / 2 {
                    tracing::warn!("the change feed was unreadable for a while; clearing caches");
                    service.ring().clear();
                    service.api_key_cache().clear();
                }
                last_ok = started;
                for e in events {
                    if seen.insert(e.seq, e.created_at).is_some() {
                        continue;
                    }
                    match e.kind {
                        Some(EventKind::EncryptionChanged) => match e.subject.parse() {
                            Ok(id) => service.ring().invalidate(id),
                            Err(_) => service.ring().clear(),
                        },
                        Some(EventKind::ApiKeyChanged) => {
                            service.api_key_cache().invalidate(&e.subject)
                        }
                        // Written by a newer Keyward: be safe and drop everything.
                        None => {
                            service.ring().clear();
                            service.api_key_cache().clear();
                        }
                    }
                }
                seen.retain(|_, created| *created >= started - 2 * LOOK_BACK_MS);
            }
            Err(e) => tracing::warn!(error = %e, "could not read the change feed"),
        }
        if started - last_prune > 600_000 {
            last_prune = started;
            if let Err(e) = service.store().prune_events(started - RETAIN_MS).await {
                tracing::warn!(error = %e, "could not prune the change feed");
            }
        }
    }
}
