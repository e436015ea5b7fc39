//! The records the store keeps and the layers above read: an encryption, its
//! versions, a job, and an audit query. Plain data, so that the HTTP layer can
//! show them without knowing the store, and the store can persist them without
//! knowing the domain's rules.

use super::ids::{EncryptionId, KekId, TenantId, VersionId};
use super::states::{JobState, Mode, VersionState};

/// One encryption as stored.
#[derive(Debug, Clone)]
pub struct EncryptionRow {
    /// Its id.
    pub id: EncryptionId,
    /// The owning tenant.
    pub tenant_id: TenantId,
    /// An optional human name.
    pub name: Option<String>,
    /// `AES-256-GCM` or `RSA-OAEP-256` (see `domain::algorithm`).
    pub algorithm: String,
    /// Whether its keys may be exported (wrapped to a caller's public key);
    /// fixed at creation.
    pub exportable: bool,
    /// RSA modulus size of new versions (`None` for AES-256-GCM).
    pub key_bits: Option<i64>,
    /// Who wraps the data keys.
    pub mode: Mode,
    /// Random salt for deriving the client-mode wrapping key.
    pub salt: Vec<u8>,
    /// The version encrypt uses by default.
    pub active_version_id: VersionId,
    /// The highest version number handed out.
    pub latest_version: i64,
    /// Creation time (Unix ms).
    pub created_at: i64,
    /// Last change (Unix ms).
    pub updated_at: i64,
    /// Rotate when the active version is this old (ms), if set.
    pub auto_rotate_period_ms: Option<i64>,
    /// Versions numbered below this do not decrypt.
    pub min_decryption_version: i64,
}

/// One blind index of an encryption, as stored (see docs/search.md).
#[derive(Debug, Clone)]
pub struct BlindIndexRow {
    /// The encryption it belongs to.
    pub encryption_id: EncryptionId,
    /// Its name, unique within the encryption.
    pub name: String,
    /// How many bits of HMAC-SHA256 a value keeps (1 to 256).
    pub bits: i64,
    /// The normalisations, comma-separated, in the order applied.
    pub normalizations: String,
    /// The index version new values are computed under.
    pub active_version: i64,
    /// Index versions from this one to the active one are live.
    pub min_version: i64,
    /// Creation time (Unix ms).
    pub created_at: i64,
    /// Last change (Unix ms).
    pub updated_at: i64,
    /// Its versions, in number order.
    pub versions: Vec<BlindIndexVersionRow>,
}

/// One version of a blind index's key, as stored.
#[derive(Debug, Clone)]
pub struct BlindIndexVersionRow {
    /// 1, 2, 3...
    pub version: i64,
    /// The key version whose data key its key is derived from.
    pub anchor_version_id: VersionId,
    /// Creation time (Unix ms).
    pub created_at: i64,
}

/// One key version as stored.
#[derive(Debug, Clone)]
pub struct VersionRow {
    /// The contract's `encryptionVersionId`.
    pub id: VersionId,
    /// The encryption it belongs to.
    pub encryption_id: EncryptionId,
    /// Human version number (1, 2, 3...).
    pub version: i64,
    /// Lifecycle state.
    pub state: VersionState,
    /// The wrapped data key; `None` once destroyed.
    pub wrapped_key: Option<Vec<u8>>,
    /// The root KEK that wraps it (`None` in client mode).
    pub kek_id: Option<KekId>,
    /// Creation time (Unix ms).
    pub created_at: i64,
    /// When it stopped being the active version (Unix ms).
    pub rotated_at: Option<i64>,
    /// Encryptions made with it, as flushed by every process.
    pub encrypt_count: i64,
    /// Its key material was imported by the tenant (BYOK).
    pub imported: bool,
}

/// One job as stored.
#[derive(Debug, Clone)]
pub struct JobRow {
    /// Its id.
    pub id: uuid::Uuid,
    /// The tenant that started it.
    pub tenant_id: TenantId,
    /// `reencrypt`.
    pub kind: String,
    /// The table's one encryption, if not per row.
    pub encryption_id: Option<EncryptionId>,
    /// The sealed source specification.
    pub source_sealed: Vec<u8>,
    /// The root KEK that seals it.
    pub source_kek_id: KekId,
    /// Rate limit.
    pub max_rows_per_second: Option<i64>,
    /// Where it is in its life.
    pub state: JobState,
    /// Last key handled in this pass.
    pub cursor: Option<String>,
    /// Pass number (0 first).
    pub pass: i64,
    /// Rows looked at.
    pub processed: i64,
    /// Rows moved to the active version.
    pub rewrapped: i64,
    /// Rows changed by the platform meanwhile (left for the next pass) or not
    /// the tenant's.
    pub skipped: i64,
    /// Rows that could not be decrypted.
    pub failed: i64,
    /// Rows in scope when the job started.
    pub total: Option<i64>,
    /// Recent rate.
    pub rows_per_second: i64,
    /// JSON {versionId: rows} at the last scan.
    pub remaining_by_version: Option<String>,
    /// Digest of the source name, table and columns the job walks: the
    /// destroy guard reads the last job per target.
    pub target: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Start (Unix ms).
    pub started_at: Option<i64>,
    /// End (Unix ms).
    pub finished_at: Option<i64>,
    /// Creation (Unix ms).
    pub created_at: i64,
}

/// One record line read from the audit table.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditLine {
    /// Its position (the cursor for the next page).
    pub position: i64,
    /// The line, as the writer wrote it.
    pub line: String,
    /// The hash on the line before it in its segment (the last member of
    /// every record line), for a line that does not state its `prev`.
    pub previous_hash: Option<String>,
}

/// Which records to read: every filter is optional; newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// At or after (Unix ms).
    pub from_ms: Option<i64>,
    /// Before (Unix ms).
    pub to_ms: Option<i64>,
    /// Of this tenant.
    pub tenant_id: Option<String>,
    /// On this encryption.
    pub encryption_id: Option<String>,
    /// This operation.
    pub operation: Option<String>,
    /// Only records before this position (the pagination cursor).
    pub before_id: Option<i64>,
    /// At most this many.
    pub limit: i64,
}
