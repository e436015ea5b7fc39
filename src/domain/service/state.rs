//! The service's state: what it holds, how it is shared, how it is built.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};

use crate::crypto::CipherKey;
use crate::domain::apikeys::ApiKeyCache;
use crate::domain::guard::FailureCounter;
use crate::domain::ids::{EncryptionId, KekId, VersionId};
use crate::domain::keyring::KeyRing;
use crate::master_key::MasterKeyProvider;
use crate::store::Store;

/// Where the service records what it does by itself, with no request behind
/// it (an automatic rotation). A running server passes the audit log; the CLI
/// passes nothing, since it never rotates by itself.
pub trait SystemRecorder: Send + Sync {
    /// A policy (a period or the nonce bound) rotated `encryption` to
    /// `new_version`. Waits only when the recorder's queue is full.
    fn rotated_automatically(
        &self,
        encryption: EncryptionId,
        new_version: VersionId,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The root KEKs in memory: the active one wraps new versions; older ones still
/// unwrap the versions that name them.
pub(super) struct RootKeys {
    pub(super) active: KekId,
    pub(super) keys: HashMap<KekId, Arc<CipherKey>>,
}

impl RootKeys {
    pub(super) fn clone_keys(&self) -> RootKeys {
        RootKeys {
            active: self.active,
            keys: self.keys.clone(),
        }
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
    /// Why the root keys are not loaded, while they are not.
    pub(super) not_ready: Mutex<Option<String>>,
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
    /// Wrong client keys per encryption (internally locked; a lock only once
    /// a wrong key was ever seen).
    pub(super) client_key_failures: FailureCounter<EncryptionId>,
    /// The nonce bound: most encryptions per version.
    pub(super) max_encryptions_per_version: u64,
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
}

impl Default for ServiceLimits {
    fn default() -> Self {
        ServiceLimits {
            client_key_max_failures: 10,
            client_key_lockout: std::time::Duration::from_secs(300),
            max_encryptions_per_version: 1 << 32,
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
            provider,
            reload: tokio::sync::Mutex::new(()),
            recorder: None,
            client_key_failures: FailureCounter::new(
                ServiceLimits::default().client_key_max_failures,
                ServiceLimits::default().client_key_lockout,
            ),
            max_encryptions_per_version: ServiceLimits::default().max_encryptions_per_version,
        }
    }

    /// Applies `limits`.
    pub fn with_limits(mut self, limits: ServiceLimits) -> KeyService {
        self.client_key_failures =
            FailureCounter::new(limits.client_key_max_failures, limits.client_key_lockout);
        self.max_encryptions_per_version = limits.max_encryptions_per_version;
        self
    }

    /// Records the operations Keyward does by itself with `recorder`.
    pub fn with_recorder(mut self, recorder: Arc<dyn SystemRecorder>) -> KeyService {
        self.recorder = Some(recorder);
        self
    }

    /// Why the service cannot serve key operations, if it cannot.
    pub fn not_ready_reason(&self) -> Option<String> {
        self.not_ready
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
