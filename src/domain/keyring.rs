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

use super::ids::{EncryptionId, VersionId};
use super::keys::VersionedKey;

/// How long an unknown encryption id is remembered as unknown. Ids are random
/// UUIDs minted by the server, so a later creation of a remembered id is not a
/// concern; the point is that probing unknown ids costs no query after the first.
const NEGATIVE_TTL: Duration = Duration::from_secs(10);

/// The bounded cache of unwrapped keys. See the module docs.
#[derive(Debug)]
pub struct KeyRing {
    entries: RwLock<HashMap<EncryptionId, Arc<VersionedKey>>>,
    unknown: Mutex<HashMap<EncryptionId, Instant>>,
    capacity: usize,
    /// Bumped by every invalidation. A loader notes it before reading the
    /// database and inserts its result only if it is unchanged, so a load that
    /// raced with a rotation can never reinstate the pre-rotation entry.
    generation: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Per-version use counters not yet flushed to the store.
    counters: Mutex<HashMap<VersionId, Arc<AtomicU64>>>,
}

impl KeyRing {
    /// An empty ring holding at most `capacity` encryptions.
    pub fn new(capacity: usize) -> Self {
        KeyRing {
            entries: RwLock::new(HashMap::new()),
            unknown: Mutex::new(HashMap::new()),
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

    /// Drops the cached entry for `id` (after a rotation or state change).
    pub fn invalidate(&self, id: EncryptionId) {
        let mut map = self.entries.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.remove(&id);
    }

    /// Drops every entry (when a change may have been missed).
    pub fn clear(&self) {
        let mut map = self.entries.write().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.clear();
    }

    /// Whether `id` was recently found not to exist.
    pub fn is_known_unknown(&self, id: EncryptionId) -> bool {
        let mut unknown = self.unknown.lock().unwrap_or_else(|e| e.into_inner());
        match unknown.get(&id) {
            Some(at) if at.elapsed() < NEGATIVE_TTL => true,
            Some(_) => {
                unknown.remove(&id);
                false
            }
            None => false,
        }
    }

    /// Remembers that `id` does not exist, for a short while.
    pub fn remember_unknown(&self, id: EncryptionId) {
        let mut unknown = self.unknown.lock().unwrap_or_else(|e| e.into_inner());
        if unknown.len() >= self.capacity {
            unknown.retain(|_, at| at.elapsed() < NEGATIVE_TTL);
            if unknown.len() >= self.capacity {
                unknown.clear();
            }
        }
        unknown.insert(id, Instant::now());
    }

    /// The use counter of a version (created on first use).
    pub fn counter(&self, version: VersionId) -> Arc<AtomicU64> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(version)
            .or_default()
            .clone()
    }

    /// Takes every non-zero count (resetting it) and forgets counters that no
    /// cached version uses any more.
    pub fn drain_counts(&self) -> Vec<(VersionId, u64)> {
        let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        counters.retain(|version, counter| {
            let n = counter.swap(0, Ordering::AcqRel);
            if n > 0 {
                out.push((*version, n));
            }
            Arc::strong_count(counter) > 1
        });
        out
    }

    /// Puts counts back after a failed flush.
    pub fn restore_counts(&self, counts: &[(VersionId, u64)]) {
        for (version, n) in counts {
            self.counter(*version).fetch_add(*n, Ordering::AcqRel);
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
            salt: vec![],
            active: v,
            min_decryption_version: 1,
            versions: vec![KeyVersion {
                id: v,
                number: 1,
                state: VersionState::Active,
                key: VersionKey::Ready(DataKey::generate().cipher()),
                uses: Arc::new(AtomicU64::new(0)),
            }],
        })
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
        let a = ring.counter(v);
        a.fetch_add(3, Ordering::Relaxed);
        let b = ring.counter(v);
        b.fetch_add(2, Ordering::Relaxed);
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
