//! The service's state: what it holds, how it is shared, how it is built.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::crypto::{CheckpointKey, CipherKey};
use crate::domain::apikeys::ApiKeyCache;
use crate::domain::guard::FailureCounter;
use crate::domain::ids::{EncryptionId, KekId, TenantId, VersionId};
use crate::domain::keyring::KeyRing;
use crate::domain::sources::JobSources;
use crate::master_key::MasterKeyProvider;
use crate::store::source::SourceLimits;
use crate::store::Store;

/// Where the service records what it does by itself, with no request behind
/// it (an automatic rotation). A running server passes the audit log; the CLI
/// passes nothing, since it never rotates by itself.
pub trait SystemRecorder: Send + Sync {
    /// A policy (a period or the nonce bound) rotated `encryption` (of
    /// `tenant`, when known) to `new_version`. Waits only when the recorder's
    /// queue is full.
    fn rotated_automatically(
        &self,
        tenant: Option<TenantId>,
        encryption: EncryptionId,
        new_version: VersionId,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The root KEKs in memory: the active one wraps new versions; older ones still
/// unwrap the versions that name them.
pub(super) struct RootKeys {
    pub(super) active: KekId,
    pub(super) keys: HashMap<KekId, Arc<CipherKey>>,
    /// The audit checkpoint key derived from the active KEK.
    pub(super) checkpoint: Arc<CheckpointKey>,
}

impl RootKeys {
    pub(super) fn clone_keys(&self) -> RootKeys {
        RootKeys {
            active: self.active,
            keys: self.keys.clone(),
            checkpoint: self.checkpoint.clone(),
        }
    }
}

/// How long what this process holds in memory may be trusted, and how long a
/// version must stay disabled before it may be destroyed.
#[derive(Debug, Clone, Copy)]
pub struct Freshness {
    /// The oldest a key-ring entry may be before it is read again.
    pub entry_max_age: Duration,
    /// How long the change feed may go unread (while it is followed) before
    /// key operations stop with `503 not_ready`.
    pub feed_max_lag: Duration,
    /// How long a version must have been `disabled` before a destroy without
    /// `force`: longer than any replica may take to stop using it.
    pub destroy_grace: Duration,
}

impl Default for Freshness {
    fn default() -> Self {
        Freshness {
            entry_max_age: Duration::from_secs(300),
            feed_max_lag: Duration::from_secs(30),
            destroy_grace: Duration::from_secs(24 * 3600),
        }
    }
}

/// When this process last read the change feed, if it follows it.
pub(super) struct FeedHealth {
    base: Instant,
    /// Milliseconds after `base` of the last successful read; `u64::MAX`:
    /// the feed is not followed (the CLI), so it can never be stale.
    last_read_ms: AtomicU64,
}

impl FeedHealth {
    fn new() -> Self {
        FeedHealth {
            base: Instant::now(),
            last_read_ms: AtomicU64::new(u64::MAX),
        }
    }

    /// The feed was read just now.
    pub(super) fn read_now(&self) {
        let ms = self
            .base
            .elapsed()
            .as_millis()
            .min(u128::from(u64::MAX - 1)) as u64;
        self.last_read_ms.store(ms, Ordering::Release);
    }

    /// How long the feed has gone unread, if it is followed.
    pub(super) fn unread_for(&self) -> Option<Duration> {
        let last = self.last_read_ms.load(Ordering::Acquire);
        if last == u64::MAX {
            return None;
        }
        let now = self.base.elapsed().as_millis() as u64;
        Some(Duration::from_millis(now.saturating_sub(last)))
    }
}

/// Owns every operation. Shared by all handlers behind an `Arc`; every field
/// is safe to use from many requests at once, as each says.
pub struct KeyService {
    /// The database pool (itself shared and bounded).
    pub(super) store: Store,
    /// Loaded encryptions; internally locked, see [`KeyRing`].
    pub(super) ring: KeyRing,
    /// Authenticated API keys; internally locked, see [`ApiKeyCache`].
    pub(super) api_keys: ApiKeyCache,
    /// The root KEKs, once unwrapped by the provider (`None` until then).
    /// Read on ring misses, creates and rotations, never on a ring hit; a
    /// rotation swaps in a whole new `Arc`, so readers never see half of one.
    pub(super) root: RwLock<Option<Arc<RootKeys>>>,
    /// Why the root keys are not loaded, while they are not. Written only
    /// through [`KeyService::set_not_ready`], which keeps `is_not_ready` in
    /// step, so that key operations check an atomic, not this lock.
    not_ready: Mutex<Option<String>>,
    /// Whether `not_ready` holds a reason.
    is_not_ready: AtomicBool,
    /// Wraps and unwraps the root KEKs; called at start and on KEK changes,
    /// never on the request path.
    pub(super) provider: Arc<dyn MasterKeyProvider>,
    /// Serializes root-key reloads triggered by requests, so that requests
    /// that missed together wait for one provider call instead of each making
    /// one.
    pub(super) reload: tokio::sync::Mutex<()>,
    /// Where operations Keyward does by itself are recorded (set once, at
    /// construction).
    pub(super) recorder: Option<Arc<dyn SystemRecorder>>,
    /// How long cached state may be trusted (set once, at construction).
    pub(super) freshness: Freshness,
    /// When the change feed was last read; atomic.
    pub(super) feed: FeedHealth,
    /// The job sources the operator registered (set once, at construction;
    /// none by default, so every job is refused).
    pub(super) job_sources: Arc<JobSources>,
    /// Wrong client keys per encryption (internally locked; a lock only once
    /// a wrong key was ever seen).
    pub(super) client_key_failures: FailureCounter<EncryptionId>,
    /// The nonce bound: most encryptions per version.
    pub(super) max_encryptions_per_version: u64,
    /// Most live (not revoked) API keys per tenant.
    pub(super) max_api_keys_per_tenant: i64,
    /// Signalled when the change feed says the Keyward client CA or its CRL
    /// changed: the mutual-TLS listener rebuilds its verifier.
    pub(super) client_ca_changed: tokio::sync::Notify,
}

/// Limits of the service (defaults: those of the configuration reference).
#[derive(Debug, Clone, Copy)]
pub struct ServiceLimits {
    /// Wrong client keys for one encryption within `client_key_lockout`
    /// before client-key calls on it are refused for `client_key_lockout`.
    pub client_key_max_failures: u32,
    /// See `client_key_max_failures`.
    pub client_key_lockout: std::time::Duration,
    /// The nonce bound: no version encrypts more than this many times.
    pub max_encryptions_per_version: u64,
    /// Most live (not revoked) API keys one tenant may hold.
    pub max_api_keys_per_tenant: i64,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        ServiceLimits {
            client_key_max_failures: 10,
            client_key_lockout: std::time::Duration::from_secs(300),
            max_encryptions_per_version: 1 << 32,
            max_api_keys_per_tenant: 1000,
        }
    }
}

impl fmt::Debug for KeyService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyService")
            .field("ring_len", &self.ring.len())
            .field("provider", &self.provider.name())
            .finish_non_exhaustive()
    }
}

impl KeyService {
    /// A service whose root keys are not loaded yet: call
    /// [`KeyService::load_root_keys`].
    pub fn new(
        store: Store,
        provider: Arc<dyn MasterKeyProvider>,
        ring_capacity: usize,
    ) -> KeyService {
        KeyService {
            store,
            ring: KeyRing::new(ring_capacity),
            api_keys: ApiKeyCache::new(ring_capacity),
            root: RwLock::new(None),
            not_ready: Mutex::new(Some("the root key is not loaded yet".into())),
            is_not_ready: AtomicBool::new(true),
            provider,
            reload: tokio::sync::Mutex::new(()),
            recorder: None,
            freshness: Freshness::default(),
            feed: FeedHealth::new(),
            job_sources: Arc::new(JobSources::none(SourceLimits {
                connect_timeout: std::time::Duration::from_secs(10),
                statement_timeout: std::time::Duration::from_secs(30),
            })),
            client_key_failures: FailureCounter::new(
                ServiceLimits::default().client_key_max_failures,
                ServiceLimits::default().client_key_lockout,
            ),
            max_encryptions_per_version: ServiceLimits::default().max_encryptions_per_version,
            max_api_keys_per_tenant: ServiceLimits::default().max_api_keys_per_tenant,
            client_ca_changed: tokio::sync::Notify::new(),
        }
    }

    /// Signalled when the change feed says the Keyward client CA or its CRL
    /// changed (one waiter, the mutual-TLS listener's follower; the signal is
    /// kept while it is busy).
    pub fn client_ca_changed(&self) -> &tokio::sync::Notify {
        &self.client_ca_changed
    }

    /// Trusts cached state as long as `freshness` says.
    pub fn with_freshness(mut self, freshness: Freshness) -> KeyService {
        self.freshness = freshness;
        self
    }

    /// The change feed was read just now (called by its follower, which from
    /// then on must keep reading it within `feed_max_lag`).
    pub fn change_feed_read(&self) {
        self.feed.read_now();
    }

    /// Why cached state cannot be trusted: the change feed is followed but
    /// has gone unread for longer than `feed_max_lag`.
    pub fn stale_reason(&self) -> Option<String> {
        let unread = self.feed.unread_for()?;
        (unread > self.freshness.feed_max_lag).then(|| {
            format!(
                "the change feed has not been readable for {} s (more than the {} s allowed): changes made by other replicas may be missed",
                unread.as_secs(),
                self.freshness.feed_max_lag.as_secs()
            )
        })
    }

    /// Lets jobs reach the operator's `sources` (and nothing else).
    pub fn with_job_sources(mut self, sources: JobSources) -> KeyService {
        self.job_sources = Arc::new(sources);
        self
    }

    /// The job sources the operator registered.
    pub fn job_sources(&self) -> &JobSources {
        &self.job_sources
    }

    /// Applies `limits`.
    pub fn with_limits(mut self, limits: ServiceLimits) -> KeyService {
        self.client_key_failures =
            FailureCounter::new(limits.client_key_max_failures, limits.client_key_lockout);
        self.max_encryptions_per_version = limits.max_encryptions_per_version;
        self.max_api_keys_per_tenant = limits.max_api_keys_per_tenant;
        self
    }

    /// Most live (not revoked) API keys one tenant may hold.
    pub fn max_api_keys_per_tenant(&self) -> i64 {
        self.max_api_keys_per_tenant
    }

    /// Records the operations Keyward does by itself with `recorder`.
    pub fn with_recorder(mut self, recorder: Arc<dyn SystemRecorder>) -> KeyService {
        self.recorder = Some(recorder);
        self
    }

    /// Why the service cannot serve key operations, if it cannot.
    pub fn not_ready_reason(&self) -> Option<String> {
        self.stored_not_ready().or_else(|| self.stale_reason())
    }

    /// The reason set by [`KeyService::set_not_ready`]: an atomic load while
    /// there is none.
    pub(super) fn stored_not_ready(&self) -> Option<String> {
        if !self.is_not_ready.load(Ordering::Acquire) {
            return None;
        }
        self.not_ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Sets (or clears) why key operations cannot be served.
    pub(super) fn set_not_ready(&self, reason: Option<String>) {
        let mut slot = self.not_ready.lock().unwrap_or_else(|e| e.into_inner());
        self.is_not_ready.store(reason.is_some(), Ordering::Release);
        *slot = reason;
    }

    /// The master-key provider.
    pub fn provider(&self) -> &Arc<dyn MasterKeyProvider> {
        &self.provider
    }

    /// The store (for readiness checks and background tasks).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The key ring (for metrics and the change feed).
    pub fn ring(&self) -> &KeyRing {
        &self.ring
    }

    /// The API key cache (for the change feed).
    pub fn api_key_cache(&self) -> &ApiKeyCache {
        &self.api_keys
    }
}
