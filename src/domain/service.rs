//! [`KeyService`]: every Keyward operation, over the store, the key ring and the
//! root keys. HTTP handlers and the CLI call these methods and never touch SQL
//! or key bytes themselves.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine;
use zeroize::Zeroizing;

use super::apikeys::{burn_secret_check, ApiKeyCache, ApiKeyRecord, Lookup, Scopes};
use super::keyring::{KeyRing, RingEntry, RingKey, RingVersion};
use super::keys::{Mode, VersionState};
use super::time::now_ms;
use super::{EncryptionId, KekId, TenantId, VersionId};
use crate::crypto::{
    self, data_aad, data_key_aad, derive_client_wrapping_key, CipherKey, DataKey, WrappedKey,
    NONCE_LEN,
};
use crate::master_key::{MasterKeyProvider, ProviderError};
use crate::store::{
    ApiKeyRow, EncryptionRow, NewEncryption, NewVersion, RootKekRow, Store, StoreError, VersionRow,
};

/// Why a key operation failed. Each variant is one answer the API gives.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No such encryption for this tenant (also: it belongs to another tenant).
    #[error("encryption not found")]
    EncryptionNotFound,
    /// The encryption has no version with this id.
    #[error("encryption version not found")]
    VersionNotFound,
    /// The ciphertext, nonce, metadata or version do not authenticate.
    #[error("decryption failed")]
    DecryptionFailed,
    /// The version is disabled.
    #[error("the encryption version is disabled")]
    VersionDisabled,
    /// The version's key material was destroyed.
    #[error("the encryption version was destroyed")]
    VersionDestroyed,
    /// The version may decrypt but not encrypt.
    #[error("the encryption version cannot encrypt")]
    VersionNotEncryptable,
    /// A client-mode encryption was used without `X-Master-Key`.
    #[error("this encryption needs the client master key (X-Master-Key)")]
    MasterKeyRequired,
    /// The client key is not the one the encryption was created with.
    #[error("the client master key does not match this encryption")]
    MasterKeyMismatch,
    /// `X-Master-Key` was sent for a platform-managed encryption.
    #[error("this encryption is platform-managed and takes no X-Master-Key")]
    MasterKeyNotApplicable,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Stored state violates an invariant (e.g. a wrapped key that fails to
    /// authenticate under the root KEK): never the caller's fault.
    #[error("integrity failure: {0}")]
    Integrity(String),
    /// The version is numbered below the encryption's minimum decryption version.
    #[error("the encryption version is below the minimum decryption version")]
    VersionBelowMinimum,
    /// The requested state change is not allowed (e.g. the active version).
    #[error("{0}")]
    InvalidStateChange(&'static str),
    /// The last re-encryption job still found rows on this version.
    #[error("the last re-encryption job found {0} rows still on this version; run a job again, or send \"force\": true")]
    VersionInUse(i64),
    /// A policy value is out of range.
    #[error("{0}")]
    InvalidPolicy(String),
    /// A version names a root KEK that is not loaded (internal: triggers a
    /// reload of the root keys).
    #[error("unknown root KEK {0}")]
    UnknownKek(KekId),
    /// The root keys are not loaded yet (the master-key provider was
    /// unreachable at start); the reason is for readiness and logs.
    #[error("not ready: {0}")]
    NotReady(String),
    /// The master-key provider failed during an operation that needs it.
    #[error("master-key provider: {0}")]
    Provider(#[from] ProviderError),
}

/// Why authentication failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Unknown key id, revoked key, or wrong secret: one answer for all three.
    #[error("invalid API key or secret")]
    InvalidCredentials,
    /// The database failed while looking the key up.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why the root keys could not be loaded at start.
#[derive(Debug, thiserror::Error)]
pub enum RootKeyError {
    /// The configured master key is not the one that protects this database.
    #[error(
        "{setting} does not match the master key this database was created with: \
         root KEK {kek_id} failed to unwrap. Start with the master key this database was created with"
    )]
    MasterKeyMismatch {
        /// The setting that holds the master key.
        setting: &'static str,
        /// The root KEK that failed.
        kek_id: KekId,
    },
    /// The KEK was wrapped by another provider.
    #[error(
        "the master key does not match: root KEK {kek_id} is wrapped by the `{stored}` master-key provider, but KEYWARD_MASTER_KEY_PROVIDER is `{configured}`"
    )]
    ProviderMismatch {
        /// The root KEK.
        kek_id: KekId,
        /// The provider named in the database.
        stored: String,
        /// The configured provider.
        configured: &'static str,
    },
    /// The provider could not be reached.
    #[error(transparent)]
    Provider(ProviderError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A client-provided master key from `X-Master-Key`: at least 32 bytes, held in
/// zeroizing memory for the duration of one request.
pub struct ClientKey(Zeroizing<Vec<u8>>);

impl ClientKey {
    /// Shortest accepted key (256 bits).
    pub const MIN_LEN: usize = 32;
    /// Longest accepted key.
    pub const MAX_LEN: usize = 512;

    /// Parses the header value (standard base64, padding optional).
    pub fn from_base64(value: &str) -> Option<ClientKey> {
        let engine = base64::engine::general_purpose::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let bytes = Zeroizing::new(engine.decode(value.trim()).ok()?);
        (Self::MIN_LEN..=Self::MAX_LEN)
            .contains(&bytes.len())
            .then(|| ClientKey(bytes))
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientKey(<redacted>)")
    }
}

/// Who is calling: the authenticated API key, shared with the cache so that a
/// request copies a pointer, not the key id.
pub type Principal = Arc<ApiKeyRecord>;

/// The root KEKs in memory: the active one wraps new versions; older ones still
/// unwrap the versions that name them.
struct RootKeys {
    active: KekId,
    keys: HashMap<KekId, Arc<CipherKey>>,
}

impl RootKeys {
    fn clone_keys(&self) -> RootKeys {
        RootKeys {
            active: self.active,
            keys: self.keys.clone(),
        }
    }
}

/// The result of an encryption.
#[derive(Debug)]
pub struct Encrypted {
    /// The version used.
    pub version_id: VersionId,
    /// The nonce (goes into the response's metadata).
    pub nonce: [u8; NONCE_LEN],
    /// Ciphertext with tag.
    pub ciphertext: Vec<u8>,
}

/// An encryption with its versions, as management endpoints show it.
#[derive(Debug)]
pub struct EncryptionDetails {
    /// The encryption.
    pub encryption: EncryptionRow,
    /// Its versions by number.
    pub versions: Vec<VersionRow>,
}

/// Owns every operation. Shared by all handlers behind an `Arc`.
pub struct KeyService {
    store: Store,
    ring: KeyRing,
    api_keys: ApiKeyCache,
    /// The root KEKs, once unwrapped by the provider (`None` until then).
    /// Read on ring misses, creates and rotations, never on a ring hit.
    root: RwLock<Option<Arc<RootKeys>>>,
    /// Why the root keys are not loaded, while they are not.
    not_ready: Mutex<Option<String>>,
    provider: Arc<dyn MasterKeyProvider>,
    /// Serializes root-key reloads triggered by requests.
    reload: tokio::sync::Mutex<()>,
    /// Where operations Keyward does by itself (policy rotations) are audited.
    audit: std::sync::OnceLock<crate::audit::AuditLog>,
}

impl fmt::Debug for KeyService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyService")
            .field("ring_len", &self.ring.len())
            .field("provider", &self.provider.name())
            .finish_non_exhaustive()
    }
}

/// How soon a cached encryption may be reloaded to look for a version it does
/// not know (one made moments ago by another replica).
const VERSION_RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// The id bound into the wrapping of client-mode data keys in place of a KEK id.
const CLIENT_WRAPPING_ID: [u8; 16] = [0u8; 16];

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
            audit: std::sync::OnceLock::new(),
        }
    }

    /// Audits the operations Keyward does by itself (set once, by the server).
    pub fn set_audit(&self, audit: crate::audit::AuditLog) {
        let _ = self.audit.set(audit);
    }

    /// Loads (or, on a new database, creates) the root KEKs through the
    /// provider. A provider that cannot be reached leaves the reason for
    /// readiness; a key that does not match is an error to stop on.
    pub async fn load_root_keys(&self) -> Result<(), RootKeyError> {
        match load_root_keys(&self.store, self.provider.as_ref()).await {
            Ok(keys) => {
                *self.root.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(keys));
                *self.not_ready.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Ok(())
            }
            Err(e) => {
                if self.root().is_err() {
                    // Readiness is unauthenticated: say which provider and what
                    // kind of failure, and leave details (ARNs, URLs) to the log.
                    let reason = match &e {
                        RootKeyError::Provider(_) => format!(
                            "master-key provider `{}` unavailable (see the log)",
                            self.provider.name()
                        ),
                        RootKeyError::Store(_) => "the database is unavailable".to_string(),
                        RootKeyError::MasterKeyMismatch { .. }
                        | RootKeyError::ProviderMismatch { .. } => {
                            "the master key does not match this database (see the log)".to_string()
                        }
                    };
                    *self.not_ready.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
                }
                Err(e)
            }
        }
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

    fn root(&self) -> Result<Arc<RootKeys>, KeyError> {
        self.root
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| {
                KeyError::NotReady(
                    self.not_ready_reason()
                        .unwrap_or_else(|| "the root key is not loaded".into()),
                )
            })
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

    // ----- identity -------------------------------------------------------------

    /// Checks an API key id and secret. Costs no query once the key is cached.
    pub async fn authenticate(&self, key_id: &str, secret: &str) -> Result<Principal, AuthError> {
        let record = if !looks_like_key_id(key_id) {
            None
        } else {
            match self.api_keys.lookup(key_id) {
                Lookup::Found(r) => Some(r),
                Lookup::KnownUnknown => None,
                Lookup::NotCached(generation) => match self.store.api_key(key_id).await? {
                    Some(row) if row.revoked_at.is_none() => {
                        let record = Arc::new(record_from_row(row)?);
                        self.api_keys.insert(record.clone(), generation);
                        Some(record)
                    }
                    _ => {
                        self.api_keys.remember_unknown(key_id);
                        None
                    }
                },
            }
        };
        match record {
            Some(r) if r.secret_matches(secret) => Ok(r),
            Some(_) => Err(AuthError::InvalidCredentials),
            None => {
                burn_secret_check(secret);
                Err(AuthError::InvalidCredentials)
            }
        }
    }

    // ----- the contract ---------------------------------------------------------

    /// Encrypts `plaintext` under the active version, or under `version` if given
    /// (which must be `active` or `enabled`).
    pub async fn encrypt(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        version: Option<VersionId>,
        plaintext: &[u8],
        client_key: Option<&ClientKey>,
    ) -> Result<Encrypted, KeyError> {
        let entry = self.entry(tenant, id).await?;
        check_mode(&entry, client_key)?;
        let (entry, v) = match version {
            None => {
                let v = entry.active;
                (entry, v)
            }
            Some(v) => (self.entry_with_version(entry, v).await?, v),
        };
        let version = entry.version(v).ok_or(KeyError::VersionNotFound)?;
        match version.state {
            VersionState::Active | VersionState::Enabled => {}
            VersionState::DecryptOnly => return Err(KeyError::VersionNotEncryptable),
            VersionState::Disabled => return Err(KeyError::VersionDisabled),
            VersionState::Destroyed => return Err(KeyError::VersionDestroyed),
        }
        // A ciphertext no one could ever decrypt is not worth making.
        if version.number < entry.min_decryption_version {
            return Err(KeyError::VersionBelowMinimum);
        }
        let aad = data_aad(id.as_bytes(), version.id.as_bytes());
        let sealed = with_key(&entry, version, client_key, |key| {
            crypto::seal(key, &aad, plaintext)
        })?;
        // Counted per version for the nonce bound (flushed in batches).
        version
            .uses
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(Encrypted {
            version_id: version.id,
            nonce: sealed.nonce,
            ciphertext: sealed.ciphertext,
        })
    }

    /// Decrypts a ciphertext made by [`KeyService::encrypt`]. A wrong version,
    /// nonce, ciphertext or encryption all give [`KeyError::DecryptionFailed`].
    pub async fn decrypt(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        version: VersionId,
        nonce: Option<[u8; NONCE_LEN]>,
        ciphertext: &[u8],
        client_key: Option<&ClientKey>,
    ) -> Result<Vec<u8>, KeyError> {
        let entry = self.entry(tenant, id).await?;
        check_mode(&entry, client_key)?;
        let entry = match self.entry_with_version(entry, version).await {
            Ok(e) => e,
            // A version id that is not this encryption's is a ciphertext presented
            // under the wrong encryption: the same answer as any other mismatch.
            Err(KeyError::VersionNotFound) => return Err(KeyError::DecryptionFailed),
            Err(e) => return Err(e),
        };
        let v = entry.version(version).ok_or(KeyError::DecryptionFailed)?;
        match v.state {
            VersionState::Active | VersionState::Enabled | VersionState::DecryptOnly
                if v.number < entry.min_decryption_version =>
            {
                return Err(KeyError::VersionBelowMinimum)
            }
            VersionState::Active | VersionState::Enabled | VersionState::DecryptOnly => {}
            VersionState::Disabled => return Err(KeyError::VersionDisabled),
            VersionState::Destroyed => return Err(KeyError::VersionDestroyed),
        }
        let nonce = nonce.ok_or(KeyError::DecryptionFailed)?;
        let aad = data_aad(id.as_bytes(), v.id.as_bytes());
        with_key(&entry, v, client_key, |key| {
            crypto::open(key, &nonce, &aad, ciphertext)
        })?
        .map_err(|()| KeyError::DecryptionFailed)
    }

    /// Re-encrypts a ciphertext under the active version: decrypt, then encrypt,
    /// with the plaintext held only in zeroizing memory inside this call.
    #[allow(clippy::too_many_arguments)]
    pub async fn rewrap(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        version: VersionId,
        nonce: Option<[u8; NONCE_LEN]>,
        ciphertext: &[u8],
        client_key: Option<&ClientKey>,
    ) -> Result<Encrypted, KeyError> {
        let plaintext = Zeroizing::new(
            self.decrypt(tenant, id, version, nonce, ciphertext, client_key)
                .await?,
        );
        self.encrypt(tenant, id, None, &plaintext, client_key).await
    }

    /// Makes a new version active; every older version keeps decrypting.
    pub async fn rotate(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        client_key: Option<&ClientKey>,
    ) -> Result<VersionId, KeyError> {
        let entry = self.entry(tenant, id).await?;
        check_mode(&entry, client_key)?;
        let new_id = VersionId::new_random();
        let data_key = DataKey::generate();
        let new_version = match client_key {
            None => self.wrap_platform_key(id, new_id, &data_key)?,
            Some(ck) => {
                let wrapping =
                    derive_client_wrapping_key(&ck.0, &entry.salt, id.as_bytes()).cipher();
                // Prove the caller's key is the encryption's key before adding a
                // version under it: otherwise a wrong key would create a version
                // nobody else can use.
                let active = entry.active_version();
                if let RingKey::ClientWrapped(w) = &active.key {
                    wrapping
                        .unwrap_key(
                            w,
                            &data_key_aad(id.as_bytes(), active.id.as_bytes(), &CLIENT_WRAPPING_ID),
                        )
                        .map_err(|_| KeyError::MasterKeyMismatch)?;
                }
                NewVersion {
                    id: new_id,
                    wrapped_key: wrapping
                        .wrap(
                            &data_key,
                            &data_key_aad(id.as_bytes(), new_id.as_bytes(), &CLIENT_WRAPPING_ID),
                        )
                        .0,
                    kek_id: None,
                }
            }
        };
        let outcome = self
            .store
            .rotate(tenant, id, &new_version, now_ms())
            .await?
            .ok_or(KeyError::EncryptionNotFound)?;
        self.ring.invalidate(id);
        tracing::info!(encryption_id = %id, new_version = outcome.new_version, version_id = %outcome.new_version_id, "rotated");
        Ok(outcome.new_version_id)
    }

    // ----- management -----------------------------------------------------------

    /// Creates an encryption with its first version. With a client key the
    /// encryption is client-mode: every later call must bring the same key.
    pub async fn create_encryption(
        &self,
        tenant: TenantId,
        name: Option<String>,
        client_key: Option<&ClientKey>,
    ) -> Result<EncryptionDetails, KeyError> {
        let id = EncryptionId::new_random();
        let version_id = VersionId::new_random();
        let salt: [u8; 32] = crypto::random_bytes();
        let data_key = DataKey::generate();
        let (mode, first) = match client_key {
            None => (
                Mode::Platform,
                self.wrap_platform_key(id, version_id, &data_key)?,
            ),
            Some(ck) => {
                let wrapping = derive_client_wrapping_key(&ck.0, &salt, id.as_bytes()).cipher();
                let wrapped = wrapping.wrap(
                    &data_key,
                    &data_key_aad(id.as_bytes(), version_id.as_bytes(), &CLIENT_WRAPPING_ID),
                );
                (
                    Mode::Client,
                    NewVersion {
                        id: version_id,
                        wrapped_key: wrapped.0,
                        kek_id: None,
                    },
                )
            }
        };
        let now = now_ms();
        self.store
            .insert_encryption(
                &NewEncryption {
                    id,
                    tenant_id: tenant,
                    name,
                    mode,
                    salt: salt.to_vec(),
                    now_ms: now,
                },
                &first,
            )
            .await?;
        let (encryption, versions) = self
            .store
            .encryption_with_versions(id)
            .await?
            .ok_or_else(|| KeyError::Integrity("a created encryption vanished".into()))?;
        Ok(EncryptionDetails {
            encryption,
            versions,
        })
    }

    /// One of the tenant's encryptions with its versions, fresh from the store.
    pub async fn encryption_details(
        &self,
        tenant: TenantId,
        id: EncryptionId,
    ) -> Result<EncryptionDetails, KeyError> {
        match self.store.encryption_with_versions(id).await? {
            Some((encryption, versions)) if encryption.tenant_id == tenant => {
                Ok(EncryptionDetails {
                    encryption,
                    versions,
                })
            }
            _ => Err(KeyError::EncryptionNotFound),
        }
    }

    /// One page of the tenant's encryptions.
    pub async fn list_encryptions(
        &self,
        tenant: TenantId,
        after: Option<(i64, EncryptionId)>,
        limit: u32,
    ) -> Result<Vec<EncryptionRow>, KeyError> {
        Ok(self.store.list_encryptions(tenant, after, limit).await?)
    }

    // ----- lifecycle --------------------------------------------------------------

    /// Sets the rotation policy: `period` (`Some(None)` clears it) and the
    /// minimum decryption version (at least 1, at most the active version).
    pub async fn set_policy(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        period: Option<Option<std::time::Duration>>,
        min_decryption_version: Option<i64>,
    ) -> Result<EncryptionDetails, KeyError> {
        let details = self.encryption_details(tenant, id).await?;
        if let Some(min) = min_decryption_version {
            let active = details
                .versions
                .iter()
                .find(|v| v.id == details.encryption.active_version_id)
                .map(|v| v.version)
                .unwrap_or(1);
            if min < 1 || min > active {
                return Err(KeyError::InvalidPolicy(format!(
                    "`minDecryptionVersion` must be from 1 to the active version ({active})"
                )));
            }
        }
        if let Some(Some(p)) = period {
            if p < std::time::Duration::from_secs(1) {
                return Err(KeyError::InvalidPolicy(
                    "`autoRotatePeriod` must be at least 1s".into(),
                ));
            }
            if details.encryption.mode == Mode::Client {
                return Err(KeyError::InvalidPolicy(
                    "a client-mode encryption cannot rotate by itself: Keyward does not hold its key".into(),
                ));
            }
        }
        let period_ms = period.map(|p| p.map(|d| d.as_millis().min(i64::MAX as u128) as i64));
        if !self
            .store
            .set_policy(tenant, id, period_ms, min_decryption_version, now_ms())
            .await?
        {
            return Err(KeyError::EncryptionNotFound);
        }
        self.ring.invalidate(id);
        self.encryption_details(tenant, id).await
    }

    /// Moves a version to another state. The active version cannot change
    /// (rotate first); a destroyed version never comes back.
    pub async fn set_version_state(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        version: VersionId,
        state: VersionState,
        force: bool,
    ) -> Result<EncryptionDetails, KeyError> {
        let details = self.encryption_details(tenant, id).await?;
        let current = details
            .versions
            .iter()
            .find(|v| v.id == version)
            .ok_or(KeyError::VersionNotFound)?
            .state;
        match (current, state) {
            (VersionState::Active, _) => {
                return Err(KeyError::InvalidStateChange(
                    "the active version cannot change state: rotate first",
                ))
            }
            (_, VersionState::Active) => {
                return Err(KeyError::InvalidStateChange(
                    "a version becomes active only by rotation",
                ))
            }
            (VersionState::Destroyed, _) => {
                return Err(KeyError::InvalidStateChange(
                    "a destroyed version's key material is gone for good",
                ))
            }
            _ => {}
        }
        if state == VersionState::Destroyed && !force {
            let in_use = self
                .store
                .rows_last_seen_on(id, &version.to_string())
                .await?;
            if in_use > 0 {
                return Err(KeyError::VersionInUse(in_use));
            }
        }
        let from = [
            VersionState::Enabled,
            VersionState::DecryptOnly,
            VersionState::Disabled,
        ];
        if !self
            .store
            .set_version_state(id, version, &from, state, now_ms())
            .await?
        {
            return Err(KeyError::InvalidStateChange(
                "the version changed meanwhile; read it again",
            ));
        }
        self.ring.invalidate(id);
        if state == VersionState::Destroyed {
            tracing::warn!(encryption_id = %id, version_id = %version, "key version destroyed: its ciphertexts can never be decrypted again");
        }
        self.encryption_details(tenant, id).await
    }

    /// Adds this process's use counts to the store and rotates every platform
    /// encryption whose active version reached `bound` encryptions. Several
    /// replicas may decide at once; the compare-and-swap lets one rotate.
    pub async fn flush_counts(&self, bound: u64) -> Result<(), KeyError> {
        let counts = self.ring.drain_counts();
        if counts.is_empty() {
            return Ok(());
        }
        let totals = match self.store.add_encrypt_counts(&counts).await {
            Ok(t) => t,
            Err(e) => {
                self.ring.restore_counts(&counts);
                return Err(e.into());
            }
        };
        for (encryption, version, total, state) in totals {
            if state == VersionState::Active && total as u64 >= bound {
                if self.auto_rotate(encryption, version).await? {
                    tracing::info!(encryption_id = %encryption, version_id = %version, total, "encryption count reached the bound; rotated");
                } else {
                    // Another replica rotated it already, or it is client-mode:
                    // Keyward cannot make a version without the client's key.
                    tracing::warn!(encryption_id = %encryption, version_id = %version, total, "encryption count reached the bound; not rotated here (client-mode encryptions must be rotated with their client key)");
                }
            }
        }
        Ok(())
    }

    /// Rotates every platform encryption whose active version is older than its
    /// rotation period.
    pub async fn rotate_due(&self) -> Result<usize, KeyError> {
        let due = self.store.due_for_rotation(now_ms(), 100).await?;
        let mut rotated = 0;
        for (encryption, active) in due {
            if self.auto_rotate(encryption, active).await? {
                rotated += 1;
            }
        }
        Ok(rotated)
    }

    async fn auto_rotate(
        &self,
        id: EncryptionId,
        expected_active: VersionId,
    ) -> Result<bool, KeyError> {
        let new_id = VersionId::new_random();
        let new_version = self.wrap_platform_key(id, new_id, &DataKey::generate())?;
        let done = self
            .store
            .rotate_if_active(id, expected_active, &new_version, now_ms())
            .await?;
        self.ring.invalidate(id);
        if let Some(outcome) = &done {
            tracing::info!(encryption_id = %id, new_version = outcome.new_version, "rotated automatically");
            if let Some(audit) = self.audit.get() {
                audit
                    .record(crate::audit::AuditEvent {
                        time_ms: now_ms(),
                        operation: "rotate.automatic",
                        actor: crate::audit::Actor::System,
                        targets: vec![crate::audit::Target {
                            encryption_id: Some(id),
                            version_id: Some(outcome.new_version_id),
                            ..Default::default()
                        }],
                        ..Default::default()
                    })
                    .await;
            }
        }
        Ok(done.is_some())
    }

    // ----- root keys ------------------------------------------------------------

    /// Starts a root-KEK rotation: a new KEK, wrapped by the provider, becomes
    /// active (new versions are wrapped by it at once) and the previous one
    /// `retiring`. [`KeyService::rewrap_retiring`] then moves every version over.
    pub async fn rotate_root_kek(&self) -> Result<KekId, KeyError> {
        self.root()?;
        let kek_id = KekId::new_random();
        let kek = DataKey::generate();
        let wrapped = self.provider.wrap_root_kek(kek_id, &kek).await?;
        self.store
            .begin_kek_rotation(&RootKekRow {
                id: kek_id,
                provider: self.provider.name().to_string(),
                wrapped_key: wrapped,
                state: "active".into(),
                created_at: now_ms(),
            })
            .await?;
        // Install the new KEK from what we hold, without another provider call.
        let mut root = (*self.root()?).clone_keys();
        root.keys.insert(kek_id, Arc::new(kek.cipher()));
        root.active = kek_id;
        *self.root.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(root));
        tracing::info!(%kek_id, "root KEK rotation started");
        Ok(kek_id)
    }

    /// Re-wraps every version still wrapped by a retiring root KEK under the
    /// active one, `batch` rows per transaction, then deletes the retired KEKs.
    /// Each row is tagged with its KEK and updated by compare-and-swap, so the
    /// work can stop at any point (a crash, SIGKILL) and resume, by this process
    /// or another, with every key still unwrappable. Returns rows re-wrapped.
    pub async fn rewrap_retiring(
        &self,
        batch: u32,
        pause: std::time::Duration,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<u64, KeyError> {
        let keks = self.store.root_keks().await?;
        let retiring: Vec<KekId> = keks
            .iter()
            .filter(|k| k.state == "retiring")
            .map(|k| k.id)
            .collect();
        let db_active = keks.iter().find(|k| k.state == "active").map(|k| k.id);
        let mut root = self.root()?;
        if db_active != Some(root.active) || retiring.iter().any(|k| !root.keys.contains_key(k)) {
            // Another process rotated: work with the database's view.
            self.load_root_keys()
                .await
                .map_err(|e| KeyError::Integrity(e.to_string()))?;
            root = self.root()?;
        }
        let remaining: u64 = self
            .store
            .versions_per_kek()
            .await?
            .iter()
            .filter(|(k, _)| retiring.contains(k))
            .map(|(_, n)| *n as u64)
            .sum();
        let new_id = root.active;
        let new_kek = &root.keys[&new_id];
        let mut done = 0u64;
        for old_id in retiring {
            let old_kek = root.keys.get(&old_id).ok_or(KeyError::UnknownKek(old_id))?;
            // Passes over the versions in id order until none is left: a replica
            // that has not yet heard of the rotation may still add versions
            // under the old KEK behind the cursor.
            for pass in 0.. {
                if self
                    .store
                    .versions_wrapped_by(old_id, None, 1)
                    .await?
                    .is_empty()
                {
                    break;
                }
                if pass == 10 {
                    return Err(KeyError::Integrity(format!(
                        "versions keep appearing under retiring root KEK {old_id}; run the re-wrap again once every replica has loaded the new root KEK"
                    )));
                }
                if pass > 0 {
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                let mut after = None;
                loop {
                    let rows = self.store.versions_wrapped_by(old_id, after, batch).await?;
                    let Some(last) = rows.last() else { break };
                    after = Some(last.id);
                    let mut updates = Vec::with_capacity(rows.len());
                    for row in &rows {
                        let old_aad = data_key_aad(
                            row.encryption_id.as_bytes(),
                            row.id.as_bytes(),
                            old_id.as_bytes(),
                        );
                        let key = old_kek
                            .unwrap_key(&WrappedKey(row.wrapped_key.clone()), &old_aad)
                            .map_err(|_| {
                                KeyError::Integrity(format!(
                                    "version {} fails to unwrap under root KEK {old_id}",
                                    row.id
                                ))
                            })?;
                        let new_aad = data_key_aad(
                            row.encryption_id.as_bytes(),
                            row.id.as_bytes(),
                            new_id.as_bytes(),
                        );
                        updates.push((
                            row.id,
                            row.wrapped_key.clone(),
                            new_kek.wrap(&key, &new_aad).0,
                        ));
                    }
                    done += self.store.rewrap_versions(old_id, new_id, &updates).await?;
                    progress(done, remaining);
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            }
            for (job, sealed) in self.store.jobs_sealed_by(old_id).await? {
                let plain = self.open_job_source(job, old_id, &sealed)?;
                let (kek, resealed) = self.seal_job_source(job, &plain)?;
                self.store.reseal_job(job, &sealed, &resealed, kek).await?;
            }
            if self.store.retire_root_kek(old_id).await? {
                tracing::info!(kek_id = %old_id, "root KEK retired: no version names it any more");
            } else {
                return Err(KeyError::Integrity(format!(
                    "root KEK {old_id} still wraps key versions; run the re-wrap again"
                )));
            }
        }
        Ok(done)
    }

    // ----- job sources ------------------------------------------------------------

    /// Seals a job's source specification (it holds database credentials) under
    /// the active root KEK, bound to the job id.
    pub fn seal_job_source(
        &self,
        job: uuid::Uuid,
        plain: &[u8],
    ) -> Result<(KekId, Vec<u8>), KeyError> {
        let root = self.root()?;
        let sealed = crypto::seal(&root.keys[&root.active], &job_aad(job), plain);
        let mut out = sealed.nonce.to_vec();
        out.extend_from_slice(&sealed.ciphertext);
        Ok((root.active, out))
    }

    /// Opens a sealed job source.
    pub fn open_job_source(
        &self,
        job: uuid::Uuid,
        kek: KekId,
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let root = self.root()?;
        let key = root.keys.get(&kek).ok_or(KeyError::UnknownKek(kek))?;
        if sealed.len() < NONCE_LEN {
            return Err(KeyError::Integrity(format!(
                "job {job}: sealed source too short"
            )));
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        crypto::open(
            key,
            nonce.try_into().expect("split at NONCE_LEN"),
            &job_aad(job),
            ct,
        )
        .map(Zeroizing::new)
        .map_err(|()| {
            KeyError::Integrity(format!("job {job}: sealed source fails to authenticate"))
        })
    }

    /// The active version of the tenant's encryption (from the ring).
    pub async fn active_version(
        &self,
        tenant: TenantId,
        id: EncryptionId,
    ) -> Result<(VersionId, Mode), KeyError> {
        let entry = self.entry(tenant, id).await?;
        Ok((entry.active, entry.mode))
    }

    // ----- internals ------------------------------------------------------------

    fn wrap_platform_key(
        &self,
        id: EncryptionId,
        version: VersionId,
        key: &DataKey,
    ) -> Result<NewVersion, KeyError> {
        let root = self.root()?;
        let kek_id = root.active;
        let kek = &root.keys[&kek_id];
        Ok(NewVersion {
            id: version,
            wrapped_key: kek
                .wrap(
                    key,
                    &data_key_aad(id.as_bytes(), version.as_bytes(), kek_id.as_bytes()),
                )
                .0,
            kek_id: Some(kek_id),
        })
    }

    /// The tenant's encryption from the ring, loading it on a miss. Another
    /// tenant's encryption is reported exactly like a missing one.
    async fn entry(&self, tenant: TenantId, id: EncryptionId) -> Result<Arc<RingEntry>, KeyError> {
        let entry = match self.ring.get(id) {
            Some(e) => e,
            None => self
                .load(id, tenant)
                .await?
                .ok_or(KeyError::EncryptionNotFound)?,
        };
        if entry.tenant_id != tenant {
            return Err(KeyError::EncryptionNotFound);
        }
        Ok(entry)
    }

    /// `entry` if it knows `version`; otherwise the entry reloaded once from the
    /// store, which picks up a version another replica just created before the
    /// change feed reports it.
    async fn entry_with_version(
        &self,
        entry: Arc<RingEntry>,
        version: VersionId,
    ) -> Result<Arc<RingEntry>, KeyError> {
        if entry.version(version).is_some() {
            return Ok(entry);
        }
        // At most one reload per entry per interval, so a caller naming unknown
        // versions cannot turn every request into a query.
        if entry.loaded_at.elapsed() < VERSION_RELOAD_INTERVAL {
            return Err(KeyError::VersionNotFound);
        }
        let fresh = self
            .load(entry.id, entry.tenant_id)
            .await?
            .ok_or(KeyError::EncryptionNotFound)?;
        if fresh.tenant_id != entry.tenant_id {
            return Err(KeyError::EncryptionNotFound);
        }
        if fresh.version(version).is_none() {
            return Err(KeyError::VersionNotFound);
        }
        Ok(fresh)
    }

    /// Loads the tenant's encryption into the ring. Another tenant's encryption
    /// is treated exactly like a missing one *before* any key is touched: not
    /// unwrapped, not cached, no root-key or provider access, so it cannot be
    /// told apart from a missing id by status or timing class.
    async fn load(
        &self,
        id: EncryptionId,
        tenant: TenantId,
    ) -> Result<Option<Arc<RingEntry>>, KeyError> {
        if self.ring.is_known_unknown(id) {
            return Ok(None);
        }
        let generation = self.ring.generation();
        let Some((enc, versions)) = self.store.encryption_with_versions(id).await? else {
            self.ring.remember_unknown(id);
            return Ok(None);
        };
        if enc.tenant_id != tenant {
            return Ok(None);
        }
        let entry = match self.build_entry(&enc, &versions, &*self.root()?) {
            Err(KeyError::UnknownKek(kek_id)) => {
                // A root KEK rotation elsewhere: load the new KEK (a provider
                // call, rare, and never for a key already in the ring) and retry.
                // One reload at a time: requests that missed together wait for
                // it instead of each calling the provider.
                let _one = self.reload.lock().await;
                if !self.root()?.keys.contains_key(&kek_id) {
                    tracing::info!(%kek_id, "a key version names a root KEK not loaded here; reloading the root keys");
                    self.load_root_keys().await.map_err(|e| match e {
                        RootKeyError::Provider(p) => KeyError::Provider(p),
                        RootKeyError::Store(s) => KeyError::Store(s),
                        other => KeyError::Integrity(other.to_string()),
                    })?;
                }
                self.build_entry(&enc, &versions, &*self.root()?)?
            }
            other => other?,
        };
        let entry = Arc::new(entry);
        self.ring.insert(entry.clone(), generation);
        Ok(Some(entry))
    }

    fn build_entry(
        &self,
        enc: &EncryptionRow,
        rows: &[VersionRow],
        root: &RootKeys,
    ) -> Result<RingEntry, KeyError> {
        let mut versions = Vec::with_capacity(rows.len());
        for row in rows {
            let key = match (&row.wrapped_key, row.state, enc.mode) {
                (None, ..) | (_, VersionState::Destroyed, _) => RingKey::Destroyed,
                (Some(w), _, Mode::Client) => RingKey::ClientWrapped(WrappedKey(w.clone())),
                (Some(w), _, Mode::Platform) => {
                    let kek_id = row.kek_id.ok_or_else(|| {
                        KeyError::Integrity(format!("version {} names no root KEK", row.id))
                    })?;
                    let kek = root.keys.get(&kek_id).ok_or(KeyError::UnknownKek(kek_id))?;
                    let aad = data_key_aad(enc.id.as_bytes(), row.id.as_bytes(), kek_id.as_bytes());
                    let key = kek.unwrap_key(&WrappedKey(w.clone()), &aad).map_err(|_| {
                        KeyError::Integrity(format!(
                            "the data key of version {} failed to authenticate under root KEK {kek_id}",
                            row.id
                        ))
                    })?;
                    RingKey::Ready(key.cipher())
                }
            };
            versions.push(RingVersion {
                id: row.id,
                number: row.version,
                state: row.state,
                key,
                uses: self.ring.counter(row.id),
            });
        }
        if !versions.iter().any(|v| v.id == enc.active_version_id) {
            return Err(KeyError::Integrity(format!(
                "encryption {} has no row for its active version",
                enc.id
            )));
        }
        Ok(RingEntry {
            loaded_at: std::time::Instant::now(),
            id: enc.id,
            tenant_id: enc.tenant_id,
            mode: enc.mode,
            salt: enc.salt.clone(),
            active: enc.active_version_id,
            min_decryption_version: enc.min_decryption_version,
            versions,
        })
    }
}

fn job_aad(job: uuid::Uuid) -> [u8; 32] {
    let mut aad = [0u8; 32];
    aad[..16].copy_from_slice(b"keyward:job:v1\0\0");
    aad[16..].copy_from_slice(job.as_bytes());
    aad
}

fn check_mode(entry: &RingEntry, client_key: Option<&ClientKey>) -> Result<(), KeyError> {
    match (entry.mode, client_key) {
        (Mode::Platform, Some(_)) => Err(KeyError::MasterKeyNotApplicable),
        (Mode::Client, None) => Err(KeyError::MasterKeyRequired),
        _ => Ok(()),
    }
}

/// Runs `f` with the version's key: the cached one in platform mode, or one
/// unwrapped for this call only from the client's key in client mode.
fn with_key<R>(
    entry: &RingEntry,
    version: &RingVersion,
    client_key: Option<&ClientKey>,
    f: impl FnOnce(&CipherKey) -> R,
) -> Result<R, KeyError> {
    match (&version.key, client_key) {
        (RingKey::Destroyed, _) => Err(KeyError::VersionDestroyed),
        (RingKey::Ready(key), None) => Ok(f(key)),
        (RingKey::ClientWrapped(wrapped), Some(ck)) => {
            let wrapping =
                derive_client_wrapping_key(&ck.0, &entry.salt, entry.id.as_bytes()).cipher();
            let aad = data_key_aad(
                entry.id.as_bytes(),
                version.id.as_bytes(),
                &CLIENT_WRAPPING_ID,
            );
            let key = wrapping
                .unwrap_key(wrapped, &aad)
                .map_err(|_| KeyError::MasterKeyMismatch)?;
            Ok(f(&key.cipher()))
        }
        (RingKey::Ready(_), Some(_)) => Err(KeyError::MasterKeyNotApplicable),
        (RingKey::ClientWrapped(_), None) => Err(KeyError::MasterKeyRequired),
    }
}

/// Whether `key_id` has the form of an API key id (`kw_` + 24 hex digits).
pub fn looks_like_key_id(key_id: &str) -> bool {
    key_id.len() == 27
        && key_id.starts_with("kw_")
        && key_id[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

fn record_from_row(row: ApiKeyRow) -> Result<ApiKeyRecord, StoreError> {
    let corrupt = |detail: &str| StoreError::Corrupt {
        table: "api_keys",
        detail: detail.to_string(),
    };
    Ok(ApiKeyRecord {
        secret_sha256: row
            .secret_sha256
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("secret digest is not 32 bytes"))?,
        scopes: Scopes::parse(&row.scopes).map_err(|e| corrupt(&e))?,
        cert_spki_sha256: row
            .cert_spki_sha256
            .map(|d| d.as_slice().try_into())
            .transpose()
            .map_err(|_| corrupt("certificate digest is not 32 bytes"))?,
        key_id: row.id,
        tenant_id: row.tenant_id,
    })
}

async fn load_root_keys(
    store: &Store,
    provider: &dyn MasterKeyProvider,
) -> Result<RootKeys, RootKeyError> {
    let mut rows = store.root_keks().await?;
    if rows.is_empty() {
        let kek_id = KekId::new_random();
        let kek = DataKey::generate();
        let wrapped = provider
            .wrap_root_kek(kek_id, &kek)
            .await
            .map_err(RootKeyError::Provider)?;
        let row = RootKekRow {
            id: kek_id,
            provider: provider.name().to_string(),
            wrapped_key: wrapped,
            state: "active".into(),
            created_at: now_ms(),
        };
        match store.insert_active_root_kek(&row).await {
            Ok(()) => {
                tracing::info!(kek_id = %kek_id, provider = provider.name(), "created the root KEK")
            }
            // Another process initialised the database first: use its KEK.
            Err(StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
        rows = store.root_keks().await?;
    }
    let mut keys = HashMap::new();
    let mut active = None;
    for row in rows {
        let kek = unwrap_root_kek(provider, &row).await?;
        if row.state == "active" {
            active = Some(row.id);
        }
        keys.insert(row.id, Arc::new(kek.cipher()));
    }
    let active = active.ok_or_else(|| {
        RootKeyError::Store(StoreError::Corrupt {
            table: "root_keks",
            detail: "no active root KEK".into(),
        })
    })?;
    Ok(RootKeys { active, keys })
}

/// Unwraps one root-KEK row with `provider`, which must be the provider that
/// wrapped it; a key that does not match names the setting to look at.
async fn unwrap_root_kek(
    provider: &dyn MasterKeyProvider,
    row: &RootKekRow,
) -> Result<DataKey, RootKeyError> {
    if row.provider != provider.name() {
        return Err(RootKeyError::ProviderMismatch {
            kek_id: row.id,
            stored: row.provider.clone(),
            configured: provider.name(),
        });
    }
    provider
        .unwrap_root_kek(row.id, &row.wrapped_key)
        .await
        .map_err(|e| match e {
            ProviderError::KeyMismatch => RootKeyError::MasterKeyMismatch {
                setting: provider.key_setting(),
                kek_id: row.id,
            },
            other => RootKeyError::Provider(other),
        })
}

/// Re-wraps every root KEK, now wrapped by `from`, under `to`, in one
/// transaction. Returns how many KEKs moved. Running servers keep working (they
/// hold the unwrapped KEKs); after this they must start with `to`'s settings.
pub async fn migrate_master_key(
    store: &Store,
    from: &dyn MasterKeyProvider,
    to: &dyn MasterKeyProvider,
) -> Result<usize, RootKeyError> {
    let rows = store.root_keks().await?;
    let mut updates = Vec::with_capacity(rows.len());
    for row in rows {
        let kek = unwrap_root_kek(from, &row).await?;
        let wrapped = to
            .wrap_root_kek(row.id, &kek)
            .await
            .map_err(RootKeyError::Provider)?;
        // Prove the new wrapping before committing to it.
        let back = to
            .unwrap_root_kek(row.id, &wrapped)
            .await
            .map_err(RootKeyError::Provider)?;
        if back.expose() != kek.expose() {
            return Err(RootKeyError::Provider(ProviderError::Unavailable(
                "the target provider returned a different key on unwrap".into(),
            )));
        }
        updates.push((row.id, row.wrapped_key, to.name().to_string(), wrapped));
    }
    store.rewrap_root_keks(&updates).await?;
    Ok(updates.len())
}
