//! The domain's errors: each variant is one answer the API gives, mapped to a
//! status and code in one place (`http::error`).

use crate::master_key::ProviderError;
use crate::store::StoreError;

use super::ids::KekId;

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
    /// Too many wrong client keys for this encryption lately; retry after.
    /// Only callers holding the tenant's credentials can cause it.
    #[error("too many wrong client master keys for this encryption; retry in {} s", .0.as_secs() + u64::from(.0.subsec_nanos() > 0))]
    TooManyMasterKeyAttempts(std::time::Duration),
    /// The version has made as many encryptions as its random nonces allow.
    #[error("this encryption version has made as many encryptions as its nonces allow; rotate, or use the active version")]
    VersionExhausted,
    /// The active version of a platform-mode encryption reached the nonce
    /// bound (counting this replica's uses not yet recorded); an automatic
    /// rotation replaces it once the count is recorded: a 503 to retry.
    #[error("the active version reached its encryption bound and is rotated once its use count is recorded; retry shortly")]
    RotationPending,
    /// `X-Master-Key` was sent for a platform-managed encryption.
    #[error("this encryption is platform-managed and takes no X-Master-Key")]
    MasterKeyNotApplicable,
    /// A public key was asked of an encryption that has none (AES-256-GCM).
    #[error("this encryption's algorithm has no public key (only RSA-OAEP-256 encryptions do)")]
    NotAsymmetric,
    /// Imported key material failed to unwrap or is not a key this
    /// encryption can use: one answer for every cause, so that an import
    /// tells nothing about a wrapped key it did not unwrap.
    #[error("the wrapped key does not unwrap to a valid key for this encryption: check the wrapping key (GET /v1/import/wrapping-key), the wrapping algorithm, and the key material (32 raw bytes for AES-256-GCM, PKCS#8 DER of RSA 3072 or 4096 for RSA-OAEP-256)")]
    ImportFailed,
    /// Import into this encryption is not possible.
    #[error("{0}")]
    ImportNotSupported(&'static str),
    /// The encryption was not created exportable: its keys never leave Keyward.
    #[error("this encryption was not created exportable: its key material never leaves Keyward")]
    ExportNotAllowed,
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
    /// The encryption has no blind index of that name.
    #[error("blind index not found")]
    IndexNotFound,
    /// A blind index of that name exists already.
    #[error("the encryption already has a blind index of that name")]
    IndexExists,
    /// The encryption has as many blind indexes as it may.
    #[error("an encryption has at most {0} blind indexes")]
    TooManyIndexes(usize),
    /// A blind-index change that does not fit the index (e.g. a minimum
    /// version above the active one).
    #[error("{0}")]
    InvalidIndexChange(String),
    /// A value over `MAX_INDEXED_BYTES` (before or after its index's
    /// normalizations) asked for a blind-index value.
    #[error("a value given a blind-index value may have at most 65536 bytes, before and after its index's normalizations")]
    IndexValueTooLong,
    /// A blind index has as many live versions as it may: `minVersion` must
    /// be raised before it rotates again.
    #[error("a blind index keeps at most {0} live versions: raise its `minVersion` before rotating it again")]
    TooManyIndexVersions(i64),
    /// A destroy of a version whose data key a live blind-index version's
    /// key is derived from.
    #[error("a live blind-index version derives its key from this version: rotate the index and retire its older versions (minVersion) first")]
    VersionAnchorsIndex,
    /// The requested state change is not allowed (e.g. the active version).
    #[error("{0}")]
    InvalidStateChange(&'static str),
    /// The last re-encryption job still found rows on this version.
    #[error("the last re-encryption job found {0} rows still on this version; run a job again, or send \"force\": true")]
    VersionInUse(i64),
    /// A destroy without `force` of a version no re-encryption job has looked
    /// for since it stopped being active.
    #[error("no re-encryption job over this encryption has finished since this version stopped being active, so nothing shows that no data still needs it: run one (over every table that holds its ciphertexts), or send \"force\": true")]
    VersionUnverified,
    /// A destroy without `force` of a version that is not `disabled`.
    #[error("disable the version first: it can be destroyed once it has been disabled for the destroy grace period (or send \"force\": true)")]
    DestroyNeedsDisabled,
    /// A destroy without `force` of a version disabled too recently.
    #[error("the version was disabled too recently to be destroyed: {remaining_s} s of the destroy grace period remain (or send \"force\": true)")]
    DestroyGracePending {
        /// Seconds until it may be destroyed.
        remaining_s: u64,
    },
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
    /// A root-KEK rotation is still re-wrapping versions under the previous
    /// one; a new rotation waits until it finishes.
    #[error("a root-KEK rotation is still in progress: wait until GET /v1/admin/root-kek shows a single root KEK (or see its rewrapError)")]
    RotationInProgress,
    /// The active root KEK is no longer wrapped by this process's master key
    /// (a master-key migration ran since it started): rotating now would
    /// bring the old master key back into force.
    #[error("the root KEK is no longer wrapped by this server's master key (a master-key migration ran); restart Keyward with the new master-key settings, then rotate")]
    MasterKeyChanged,
    /// The master-key provider failed during an operation that needs it.
    #[error("master-key provider: {0}")]
    Provider(#[from] ProviderError),
}

impl KeyError {
    /// Whether a dependency (the database) is down, rather than anything
    /// being wrong: a 503 the caller may retry.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            KeyError::Store(StoreError::Unavailable(_) | StoreError::StaleReference(_))
        )
    }
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
    /// The provider refused its configuration (credentials, key, TPM):
    /// retrying will not help.
    #[error("cannot unwrap root KEK {kek_id} with the `{provider}` master-key provider: {reason}")]
    ProviderRefused {
        /// The configured provider.
        provider: &'static str,
        /// The root KEK.
        kek_id: KekId,
        /// What the provider said.
        reason: String,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}
