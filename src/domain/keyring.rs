//! The key ring: an in-memory, bounded map from encryption id to that
//! encryption's [`VersionedKey`], its data keys ready for AES-256-GCM. It is what
//! makes encrypt and decrypt of a platform-managed key cost no database query and
//! no provider call in steady state.
//!
//! Client-mode encryptions are cached with their *wrapped* keys only: the
//! unwrapped key exists only inside the request that brought the client's key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::ids::{EncryptionId, TenantId, VersionId};
use super::keys::{UseCount, VersionedKey};

/// How long an encryption id is remembered as unknown to a tenant (missing,
/// or another tenant's). Ids are random UUIDs minted by the server, and the
/// owner of an id never changes, so a remembered answer cannot turn wrong
/// except by a creation of that id, which drops it ([`KeyRing::invalidate`]);
/// the point is that probing ids costs no query after the first.
const NEGATIVE_TTL: Duration = Duration::from_secs(10);

/// What is remembered about an id that is not in the ring for a tenant.
#[derive(Debug, Clone, Copy)]
enum Unknown {
    /// No such encryption.
    Missing,
    /// It exists and belongs to this tenant: unknown to every other one.
    OwnedBy(TenantId),
}

/// The bounded cache of unwrapped keys. See the module docs.
#[derive(Debug)]
pub struct KeyRing {
    entries: RwLock<HashMap<EncryptionId, Arc<VersionedKey>>>,
    unknown: Mutex<HashMap<EncryptionId, (Unknown, Instant)>>,
    /// Answers given from `unknown` (no query made).
    negative_hits: AtomicU64,
    capacity: usize,
    /// Bumped by every invalidation. A loader notes it before reading the
    /// database and inserts its result only if it is unchanged, so a load that
    /// raced with a rotation can never reinstate the pre-rotation entry.
    generation: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Per-version use counts: not yet flushed, and recorded.
    counters: Mutex<HashMap<VersionId, Arc<UseCount>>>,
}

impl KeyRing {
    /// An empty ring holding at most `capacity` encryptions.
    pub fn new(capacity: usize) -> Self {
        KeyRing {
            entries: RwLock::new(HashMap::new()),
            unknown: Mutex::new(HashMap::new()),
            negative_hits: AtomicU64::new(0),
            capacity: capacity.max(1),
            generation: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            counters: Mutex::new(HashMap::new()),
        }
    }

    /// The cached entry, counting a hit or a miss.
    pub fn get(&self, id: EncryptionId) -> Option<Arc<VersionedKey>> {
        let found = self
            .entries
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned();
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// The current generation, to pass to [`KeyRing::insert`] after a load.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Caches `entry` unless an invalidation happened since `generation` was read.
    /// When full, an arbitrary entry makes room: a miss costs one query, and a
    /// bounded ring matters more than a perfect hit rate.
    pub fn insert(&self, entry: Arc<VersionedKey>, generation: u64) {
        let mut map = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if map.len() >= self.capacity && !map.contains_key(&entry.id) {
            if let Some(victim) = map.keys().next().copied() {
                map.remove(&victim);
            }
        }
        map.insert(entry.id, entry);
    }

    /// Drops the cached entry for `id` (after a rotation or state change),
    /// and anything remembered about it being unknown (after a creation).
    pub fn invalidate(&self, id: EncryptionId) {
        let mut map = self.entries.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.remove(&id);
        drop(map);
        self.unknown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    /// Drops every entry (when a change may have been missed).
    pub fn clear(&self) {
        let mut map = self.entries.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.clear();
    }

    /// Whether `id` was recently found not to exist, or to be another
    /// tenant's than `tenant`: either way unknown to `tenant`, answered
    /// without a query.
    pub fn is_known_unknown(&self, tenant: TenantId, id: EncryptionId) -> bool {
        let mut unknown = self.unknown.lock().unwrap_or_else(|e| e.into_inner());
        let known = match unknown.get(&id) {
            Some((_, at)) if at.elapsed() >= NEGATIVE_TTL => {
                unknown.remove(&id);
                false
            }
            Some((Unknown::Missing, _)) => true,
            Some((Unknown::OwnedBy(owner), _)) => *owner != tenant,
            None => false,
        };
        if known {
            self.negative_hits.fetch_add(1, Ordering::Relaxed);
        }
        known
    }

    /// Remembers, for a short while, that `id` does not exist (`owner`
    /// `None`) or belongs to `owner` (so it is unknown to every other tenant).
    pub fn remember_unknown(&self, id: EncryptionId, owner: Option<TenantId>) {
        let mut unknown = self.unknown.lock().unwrap_or_else(|e| e.into_inner());
        if unknown.len() >= self.capacity {
            unknown.retain(|_, (_, at)| at.elapsed() < NEGATIVE_TTL);
            if unknown.len() >= self.capacity {
                unknown.clear();
            }
        }
        let what = match owner {
            None => Unknown::Missing,
            Some(t) => Unknown::OwnedBy(t),
        };
        unknown.insert(id, (what, Instant::now()));
    }

    /// How many lookups were answered as unknown without a query, since start.
    pub fn negative_hits(&self) -> u64 {
        self.negative_hits.load(Ordering::Relaxed)
    }

    /// The use count of a version (created on first use), knowing that the
    /// store holds at least `recorded` for it.
    pub fn counter(&self, version: VersionId, recorded: u64) -> Arc<UseCount> {
        let count = self
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(version)
            .or_default()
            .clone();
        count.recorded.fetch_max(recorded, Ordering::AcqRel);
        count
    }

    /// Takes every non-zero count (resetting it, and counting it as recorded
    /// while it is sent) and forgets counters that no cached version uses any
    /// more.
    pub fn drain_counts(&self) -> Vec<(VersionId, u64)> {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        counters.retain(|version, count| {
            let n = count.unflushed.swap(0, Ordering::AcqRel);
            if n > 0 {
                count.recorded.fetch_add(n, Ordering::AcqRel);
                out.push((*version, n));
            }
            Arc::strong_count(count) > 1
        });
        out
    }

    /// Puts counts back after a failed flush: not recorded after all.
    pub fn restore_counts(&self, counts: &[(VersionId, u64)]) {
        for (version, n) in counts {
            let count = self.counter(*version, 0);
            count.recorded.fetch_sub(*n, Ordering::AcqRel);
            count.unflushed.fetch_add(*n, Ordering::AcqRel);
        }
    }

    /// The store's total for `version` after a flush (every replica's counts).
    pub fn recorded_total(&self, version: VersionId, total: u64) {
        if let Some(count) = self
            .counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&version)
        {
            count.recorded.fetch_max(total, Ordering::AcqRel);
        }
    }

    /// How many encryptions are cached.
    pub fn len(&self) -> usize {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (hits, misses) since start.
    pub fn hit_counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::DataKey;
    use crate::domain::ids::TenantId;
    use crate::domain::keys::{KeyVersion, Mode, VersionKey, VersionState};

    fn entry(id: EncryptionId) -> Arc<VersionedKey> {
        let v = VersionId::new_random();
        Arc::new(VersionedKey {
            loaded_at: Instant::now(),
            id,
            tenant_id: TenantId::new_random(),
            mode: Mode::Platform,
            algorithm: crate::domain::algorithm::Algorithm::Aes256Gcm,
            indexes: Vec::new(),
            salt: vec![],
            active: v,
            min_decryption_version: 1,
            versions: vec![KeyVersion {
                id: v,
                number: 1,
                state: VersionState::Active,
                key: VersionKey::Ready(DataKey::generate().cipher()),
                uses: Arc::new(UseCount::default()),
            }],
        })
    }

    #[test]
    fn the_nonce_bound_counts_what_is_recorded_and_what_is_not_yet() {
        let ring = KeyRing::new(10);
        let v = VersionId::new_random();
        let count = ring.counter(v, 3);
        assert!(count.take(5));
        assert!(count.take(5));
        assert!(!count.take(5), "3 recorded + 2 not yet");
        // A failed flush puts the count back as not recorded; either way it
        // counts.
        let drained = ring.drain_counts();
        assert_eq!(drained, vec![(v, 2)]);
        assert!(!count.take(5), "counted as recorded while sent");
        ring.restore_counts(&drained);
        assert!(!count.take(5));
        assert_eq!(count.unflushed.load(Ordering::Relaxed), 2);
        ring.drain_counts();
        ring.recorded_total(v, 5);
        assert!(!count.take(5));
        // Another replica's counts, learned at a flush, count too.
        let w = VersionId::new_random();
        let other = ring.counter(w, 0);
        ring.recorded_total(w, 5);
        assert!(!other.take(5));
    }

    #[test]
    fn ring_is_bounded() {
        let ring = KeyRing::new(3);
        for _ in 0..10 {
            let g = ring.generation();
            ring.insert(entry(EncryptionId::new_random()), g);
        }
        assert_eq!(ring.len(), 3);
    }

    #[test]
    fn a_load_that_raced_an_invalidation_is_not_cached() {
        let ring = KeyRing::new(10);
        let id = EncryptionId::new_random();
        let g = ring.generation();
        ring.invalidate(id);
        ring.insert(entry(id), g);
        assert!(ring.get(id).is_none());
        let g = ring.generation();
        ring.insert(entry(id), g);
        assert!(ring.get(id).is_some());
        assert_eq!(ring.hit_counts(), (1, 1));
    }

    #[test]
    fn counts_survive_entry_rebuilds_and_drain_once() {
        let ring = KeyRing::new(10);
        let v = VersionId::new_random();
        let a = ring.counter(v, 0);
        a.unflushed.fetch_add(3, Ordering::Relaxed);
        let b = ring.counter(v, 0);
        b.unflushed.fetch_add(2, Ordering::Relaxed);
        assert_eq!(ring.drain_counts(), vec![(v, 5)]);
        assert!(ring.drain_counts().is_empty());
        drop((a, b));
        ring.drain_counts();
        assert!(
            ring.counters.lock().unwrap().is_empty(),
            "unused counters are dropped"
        );
    }
}
