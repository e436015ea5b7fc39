//! The change feed follower: keeps this process's key ring and API key cache in
//! step with changes made by the CLI or by other replicas.
//!
//! Every change that a cache must see is appended to `key_events` in the same
//! transaction as the change itself. This task reads the feed every
//! `sync_interval` and drops the affected cache entries, so a rotation or a
//! revocation made elsewhere takes effect here within one interval. On
//! PostgreSQL the change is also announced with NOTIFY, and a LISTEN connection
//! makes this task read the feed at once; polling stays as the safety net for a
//! lost notification or a dropped LISTEN connection. If the feed cannot be read
//! for longer than half its look-back window, every cache is cleared once it
//! can, since events may have been missed. While it has gone unread for longer
//! than `change_feed_max_lag`, this process serves no key operation from
//! memory (`503 not_ready`, and `/readyz` says why): it might be using a
//! version another replica disabled, destroyed or rotated away.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::service::KeyService;
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
    let announced = Arc::new(tokio::sync::Notify::new());
    if let Some(listener) = service.store().change_listener().await {
        tokio::spawn(listen(listener, announced.clone(), shutdown.clone()));
    }
    // seq -> created_at (database clock) of every event already applied.
    let mut seen: HashMap<i64, i64> = HashMap::new();
    let mut last_ok = Instant::now();
    // From now on key operations need the feed read within `feed_max_lag`.
    service.change_feed_read();
    let mut last_prune: Option<Instant> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = announced.notified() => {}
            _ = shutdown.changed() => return,
        }
        match service.store().recent_events(LOOK_BACK_MS).await {
            Ok(events) => {
                service.change_feed_read();
                if last_ok.elapsed() > Duration::from_millis(LOOK_BACK_MS as u64 / 2) {
                    tracing::warn!("the change feed was unreadable for a while; clearing caches");
                    service.ring().clear();
                    service.api_key_cache().clear();
                }
                last_ok = Instant::now();
                let newest = events.iter().map(|e| e.created_at).max();
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
                        Some(EventKind::TenantChanged) => match e.subject.parse() {
                            Ok(tenant) => service.api_key_cache().invalidate_tenant(tenant),
                            Err(_) => service.api_key_cache().clear(),
                        },
                        // A root KEK rotation elsewhere: load the new KEK now
                        // (a provider call, in the background) rather than on
                        // the first ring miss that needs it.
                        Some(EventKind::RootKeysChanged) => {
                            let service = service.clone();
                            tokio::spawn(async move {
                                if let Err(e) = service.load_root_keys().await {
                                    tracing::warn!(error = %e, "could not reload the root keys");
                                }
                            });
                        }
                        Some(EventKind::ClientCaChanged) => {
                            service.client_ca_changed().notify_one()
                        }
                        // Written by a newer Keyward: be safe and drop everything.
                        None => {
                            service.ring().clear();
                            service.api_key_cache().clear();
                        }
                    }
                }
                if let Some(newest) = newest {
                    seen.retain(|_, created| *created >= newest - 2 * LOOK_BACK_MS);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read the change feed"),
        }
        if last_prune.is_none_or(|t| t.elapsed() > Duration::from_secs(600)) {
            last_prune = Some(Instant::now());
            if let Err(e) = service.store().prune_events(RETAIN_MS).await {
                tracing::warn!(error = %e, "could not prune the change feed");
            }
        }
    }
}

/// Wakes the follower on every NOTIFY. `PgListener` reconnects by itself after
/// a dropped connection; notifications sent meanwhile are lost, which the
/// periodic poll covers.
async fn listen(
    mut listener: sqlx::postgres::PgListener,
    announced: Arc<tokio::sync::Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            received = listener.recv() => match received {
                Ok(_) => announced.notify_one(),
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                    announced.notify_one();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}
