//! One audit record, and how an operation becomes its records.
//!
//! A record's fields are declared once, in [`AuditRecord`], generic over its
//! text: `String` for a record read back (what the API returns and
//! [`verify`](fn@super::verify) parses), `&str` for the one the writer seals,
//! which borrows every field so that writing a record allocates nothing but its
//! line.

use std::net::IpAddr;
use std::ops::Deref;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::domain::identity::ClientIdentity;
use crate::domain::ids::{compact_bytes, compact_uuid, decode_b64url, expand_uuid};
use crate::domain::service::Principal;
use crate::domain::{EncryptionId, TenantId, VersionId};

/// Every operation name a record can carry.
pub const OPERATIONS: &[&str] = &[
    "encrypt",
    "decrypt",
    "rotate",
    "rewrap",
    "datakey.generate",
    "datakey.unwrap",
    "datakey.rewrap",
    "encrypt.stream",
    "decrypt.stream",
    "encryption.create",
    "encryption.read",
    "encryption.list",
    "encryption.update",
    "version.update",
    "index.compute",
    "index.create",
    "index.list",
    "index.update",
    "index.rotate",
    "version.public_key",
    "version.import",
    "version.export",
    "import.wrapping_key",
    "job.create",
    "job.read",
    "job.list",
    "job.cancel",
    "root_kek.read",
    "root_kek.rotate",
    "audit.read",
    "api_key.list",
    "api_key.create",
    "api_key.revoke",
    "tenant.list",
    "tenant.create",
    "tenant.disable",
    "rotate.automatic",
    "client_cert.issue",
    "client_cert.revoke",
    "client_cert.list",
];

/// One audit record, as `GET /v1/audit` answers it and as format v1 lines
/// were written (fields in this order, `hash` last). The audit file now
/// writes format v2, the same record with short names and compact values
/// (docs/audit.md, "Record format"), and every reader gives it back in this
/// form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord<S = String> {
    /// Position in this writer's chain, from 1.
    pub seq: u64,
    /// When the operation started, RFC 3339 UTC.
    #[schema(value_type = String)]
    pub time: S,
    /// What was done: `encrypt`, `decrypt`, `rotate`, `rewrap`,
    /// `encryption.create`, `version.update`, `job.create`, `audit.read`,
    /// `rotate.automatic`, ...
    #[schema(value_type = String)]
    pub operation: S,
    /// `ok` or `error`.
    #[schema(value_type = String)]
    pub outcome: S,
    /// The error code when the outcome is `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub error: Option<S>,
    /// The HTTP status answered (absent for background operations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The request's `X-Request-Id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub request_id: Option<S>,
    /// `api_key` (an authenticated caller), `unauthenticated` (credentials
    /// missing or refused), `system` (Keyward itself, e.g. a rotation policy)
    /// or `operator_cli` (an operator command run on the database).
    #[schema(value_type = String)]
    pub actor: S,
    /// The API key id used, or presented when authentication failed (only if
    /// it has the form of a key id; never the secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub api_key_id: Option<S>,
    /// The tenant acted for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Uuid)]
    pub tenant_id: Option<S>,
    /// The client certificate's subject (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub client_subject: Option<S>,
    /// SHA-256 of the client certificate's public key, hex (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub client_spki_sha256: Option<S>,
    /// The client's IP address: the TCP peer's, or behind a proxy listed in
    /// `trusted_proxies` the address it forwarded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub peer: Option<S>,
    /// The encryption acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Uuid)]
    pub encryption_id: Option<S>,
    /// The version used or made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Uuid)]
    pub version_id: Option<S>,
    /// The re-encryption job acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, format = Uuid)]
    pub job_id: Option<S>,
    /// The API key acted on (`api_key.create`: the key made; `api_key.revoke`:
    /// the key named), distinct from `apiKeyId`, the caller's. Never a secret
    /// or its digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub target_api_key_id: Option<S>,
    /// The scopes granted, comma-separated (`api_key.create`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub scopes: Option<S>,
    /// The item's position in a batch request, in records written before
    /// batches were grouped (one record per item); no longer written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_index: Option<u32>,
    /// A batch request's record: how many of its items acted on this
    /// encryption and version with this outcome (one record per such group,
    /// not per item).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<u32>,
    /// The positions of those items in the batch, as ranges (`3,17-20`);
    /// written for failed items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub item_indexes: Option<S>,
    /// The previous record's `hash` (all zeros for the first record of a chain).
    #[schema(value_type = String)]
    pub prev: S,
    /// This record's hash, hex: SHA-256 of its line without the `hash`
    /// field (format v1), or of the previous record's hash followed by its
    /// line without `prev` and `h` (format v2; see docs/audit.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub hash: Option<S>,
}

/// A request id, held inline: at most [`RequestId::MAX`] bytes (the edge
/// replaces a longer or non-ASCII one), so that handing an event to the
/// writer allocates nothing for it.
#[derive(Clone, Copy)]
pub struct RequestId {
    len: u8,
    bytes: [u8; RequestId::MAX],
}

impl RequestId {
    /// The longest request id kept.
    pub const MAX: usize = 128;

    /// The id as text.
    pub fn as_str(&self) -> &str {
        // Only ever filled from a `&str` cut at a character boundary.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl From<&str> for RequestId {
    /// `id`, cut to [`RequestId::MAX`] bytes at a character boundary.
    fn from(id: &str) -> RequestId {
        let mut end = id.len().min(RequestId::MAX);
        while !id.is_char_boundary(end) {
            end -= 1;
        }
        let mut bytes = [0; RequestId::MAX];
        bytes[..end].copy_from_slice(&id.as_bytes()[..end]);
        RequestId {
            len: end as u8,
            bytes,
        }
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Who acted.
#[derive(Debug, Clone, Default)]
pub enum Actor {
    /// An authenticated API key.
    ApiKey(Principal),
    /// Credentials were missing or refused; the key id presented, if it had
    /// the form of one.
    #[default]
    Unauthenticated,
    /// A presented key id whose authentication failed.
    Refused(String),
    /// Keyward itself (a rotation policy, a background task).
    System,
    /// An operator at the command line (`keyward client-cert ...`), who
    /// holds the configuration and the master key: no API key.
    OperatorCli,
}

/// What an operation acted on. A batch request has one per group of items
/// that acted on the same encryption and version with the same outcome.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// The encryption.
    pub encryption_id: Option<EncryptionId>,
    /// The version used or made.
    pub version_id: Option<VersionId>,
    /// The job.
    pub job_id: Option<String>,
    /// The API key acted on (made or revoked).
    pub api_key_id: Option<String>,
    /// The scopes granted to a key made.
    pub scopes: Option<String>,
    /// For a batch request: the items of this group.
    pub items: Option<ItemGroup>,
}

/// Batch items that acted on the same encryption and version with the same
/// outcome: one record however many there are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ItemGroup {
    /// How many items.
    pub count: u32,
    /// Their error code; `None`: they succeeded.
    pub error: Option<&'static str>,
    /// The positions of failed items, as ascending inclusive ranges (empty
    /// for items that succeeded: their count is what matters).
    pub failed: Vec<(u32, u32)>,
}

impl ItemGroup {
    /// Adds the item at `index` (items come in ascending order).
    pub fn add(&mut self, index: u32) {
        self.count = self.count.saturating_add(1);
        if self.error.is_none() {
            return;
        }
        match self.failed.last_mut() {
            Some((_, end)) if end.checked_add(1) == Some(index) => *end = index,
            _ => self.failed.push((index, index)),
        }
    }

    /// The failed positions as `3,17-20`, into `out` (cleared first).
    fn write_indexes(&self, out: &mut String) {
        out.clear();
        let mut buf = itoa::Buffer::new();
        for (i, &(start, end)) in self.failed.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(buf.format(start));
            if end != start {
                out.push('-');
                out.push_str(buf.format(end));
            }
        }
    }

    /// About how many bytes it holds besides itself.
    fn heap_bytes(&self) -> usize {
        self.failed.capacity() * std::mem::size_of::<(u32, u32)>()
    }
}

/// One operation, as handed to the writer.
#[derive(Debug, Clone, Default)]
pub struct AuditEvent {
    /// When it started (Unix ms).
    pub time_ms: i64,
    /// What was done.
    pub operation: &'static str,
    /// The HTTP status, for requests.
    pub status: Option<u16>,
    /// The error code, if it failed.
    pub error: Option<&'static str>,
    /// The request id, for requests.
    pub request_id: Option<RequestId>,
    /// Who.
    pub actor: Actor,
    /// The tenant acted on, when the actor is not a tenant's API key (which
    /// names its own): an operator key's target tenant, a system task's.
    pub tenant_id: Option<TenantId>,
    /// The client certificate, on mutual TLS.
    pub client: Option<Arc<ClientIdentity>>,
    /// The peer's address.
    pub peer: Option<IpAddr>,
    /// What it acted on (empty: nothing in particular).
    pub targets: Vec<Target>,
}

impl<S: Deref<Target = str>> AuditRecord<S> {
    /// Appends the record as a JSON object, byte for byte what serde_json
    /// writes for the derived `Serialize` (the tests compare the two): a
    /// line of format v1 without its `hash`, which the tests write to check
    /// that v1 files still verify.
    #[cfg(test)]
    pub(super) fn write_json(&self, out: &mut String) {
        crate::json::Object::new(out)
            .u64("seq", self.seq)
            .str("time", &self.time)
            .str("operation", &self.operation)
            .str("outcome", &self.outcome)
            .opt_str("error", self.error.as_deref())
            .opt_u64("status", self.status.map(u64::from))
            .opt_str("requestId", self.request_id.as_deref())
            .str("actor", &self.actor)
            .opt_str("apiKeyId", self.api_key_id.as_deref())
            .opt_str("tenantId", self.tenant_id.as_deref())
            .opt_str("clientSubject", self.client_subject.as_deref())
            .opt_str("clientSpkiSha256", self.client_spki_sha256.as_deref())
            .opt_str("peer", self.peer.as_deref())
            .opt_str("encryptionId", self.encryption_id.as_deref())
            .opt_str("versionId", self.version_id.as_deref())
            .opt_str("jobId", self.job_id.as_deref())
            .opt_str("targetApiKeyId", self.target_api_key_id.as_deref())
            .opt_str("scopes", self.scopes.as_deref())
            .opt_u64("batchIndex", self.batch_index.map(u64::from))
            .opt_u64("items", self.items.map(u64::from))
            .opt_str("itemIndexes", self.item_indexes.as_deref())
            .str("prev", &self.prev)
            .opt_str("hash", self.hash.as_deref())
            .end();
    }
}

/// How every line of format v2 starts (and no v1 line or checkpoint does).
pub(super) const V2_PREFIX: &str = "{\"v\":2,";

/// `N` bytes given as `2 * N` lower-case hex digits (only those: upper case
/// would not come back the same), without allocating.
fn lower_hex<const N: usize>(hex: &str) -> Option<[u8; N]> {
    let digits = hex.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let nibble = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    };
    let mut out = [0; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// The 16-character base64url form of an API key id (`kw_` + 24 lower-case
/// hex digits: 12 bytes), written into `buf`; `None` for any other text.
fn compact_key_id<'b>(id: &str, buf: &'b mut [u8; 16]) -> Option<&'b str> {
    let bytes = lower_hex::<12>(id.strip_prefix("kw_")?)?;
    compact_bytes(&bytes, buf)
}

/// The key id a [`compact_key_id`] form stands for.
fn expand_key_id(compact: &str) -> Option<String> {
    let mut bytes = [0; 12];
    (compact.len() == 16 && decode_b64url(compact, &mut bytes) == Some(12))
        .then(|| format!("kw_{}", crate::crypto::hex(&bytes)))
}

/// A SHA-256 digest given as 64 lower-case hex digits, in base64url (43
/// characters).
fn compact_digest<'b>(hex: &str, buf: &'b mut [u8; 43]) -> Option<&'b str> {
    compact_bytes(&lower_hex::<32>(hex)?, buf)
}

/// A 32-byte digest given in base64url (43 characters).
pub(super) fn digest_of(compact: &str) -> Option<[u8; 32]> {
    let mut bytes = [0; 32];
    (compact.len() == 43 && decode_b64url(compact, &mut bytes) == Some(32)).then_some(bytes)
}

/// An id field: the short name with the id's compact form when `compact`
/// has one for the text (a canonical UUID, a `kw_` key id, a hex digest),
/// else the v1 name with the text as it is.
fn id_member<const N: usize>(
    o: &mut crate::json::Object<'_>,
    short: &str,
    long: &str,
    value: Option<&str>,
    compact: for<'b> fn(&str, &'b mut [u8; N]) -> Option<&'b str>,
) {
    let Some(text) = value else {
        return;
    };
    let mut buf = [0; N];
    match compact(text, &mut buf) {
        Some(compact) => o.str(short, compact),
        None => o.str(long, text),
    };
}

impl<S: Deref<Target = str>> AuditRecord<S> {
    /// Appends the record in format v2 (docs/audit.md, "Record format"),
    /// every field but `prev` and `h`, the object left open: `{"v":2,...`.
    /// Short names carry compact values (UUIDs and key ids in base64url, the
    /// time in Unix ms); a value that has no compact form goes under its v1
    /// name as it is; a value that is the default is left out (`outcome`
    /// when `err` says it, `actor` when it is `api_key`). `time_ms` is the
    /// record's time (`self.time` is not read). [`AuditRecord::from_line`]
    /// gives back exactly the record.
    pub(super) fn write_compact(&self, time_ms: i64, out: &mut String) {
        let mut o = crate::json::Object::new(out);
        o.u64("v", 2)
            .u64("seq", self.seq)
            .u64("t", u64::try_from(time_ms).unwrap_or(0))
            .str("op", &self.operation);
        let implied = if self.error.is_some() { "error" } else { "ok" };
        if *self.outcome != *implied {
            o.str("outcome", &self.outcome);
        }
        o.opt_str("err", self.error.as_deref())
            .opt_u64("st", self.status.map(u64::from));
        id_member(
            &mut o,
            "rid",
            "requestId",
            self.request_id.as_deref(),
            compact_uuid,
        );
        if *self.actor != *"api_key" {
            o.str("act", &self.actor);
        }
        id_member(
            &mut o,
            "key",
            "apiKeyId",
            self.api_key_id.as_deref(),
            compact_key_id,
        );
        id_member(
            &mut o,
            "ten",
            "tenantId",
            self.tenant_id.as_deref(),
            compact_uuid,
        );
        o.opt_str("sub", self.client_subject.as_deref());
        id_member(
            &mut o,
            "spki",
            "clientSpkiSha256",
            self.client_spki_sha256.as_deref(),
            compact_digest,
        );
        o.opt_str("ip", self.peer.as_deref());
        id_member(
            &mut o,
            "enc",
            "encryptionId",
            self.encryption_id.as_deref(),
            compact_uuid,
        );
        id_member(
            &mut o,
            "ver",
            "versionId",
            self.version_id.as_deref(),
            compact_uuid,
        );
        id_member(&mut o, "job", "jobId", self.job_id.as_deref(), compact_uuid);
        id_member(
            &mut o,
            "tkey",
            "targetApiKeyId",
            self.target_api_key_id.as_deref(),
            compact_key_id,
        );
        o.opt_str("scopes", self.scopes.as_deref())
            .opt_u64("batchIndex", self.batch_index.map(u64::from))
            .opt_u64("n", self.items.map(u64::from))
            .opt_str("idx", self.item_indexes.as_deref());
    }
}

/// A line of format v2 as written: short names, compact values (see
/// [`AuditRecord::write_compact`]).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct CompactRecord {
    v: u8,
    pub(super) seq: u64,
    t: i64,
    op: String,
    outcome: Option<String>,
    err: Option<String>,
    st: Option<u16>,
    rid: Option<String>,
    request_id: Option<String>,
    act: Option<String>,
    key: Option<String>,
    api_key_id: Option<String>,
    ten: Option<String>,
    tenant_id: Option<String>,
    sub: Option<String>,
    spki: Option<String>,
    client_spki_sha256: Option<String>,
    ip: Option<String>,
    enc: Option<String>,
    encryption_id: Option<String>,
    ver: Option<String>,
    version_id: Option<String>,
    job: Option<String>,
    job_id: Option<String>,
    tkey: Option<String>,
    target_api_key_id: Option<String>,
    scopes: Option<String>,
    batch_index: Option<u32>,
    n: Option<u32>,
    idx: Option<String>,
    /// The previous record's hash, base64url: on the first record of a file
    /// (and of a table segment) only.
    pub(super) prev: Option<String>,
    /// This record's hash, base64url.
    pub(super) h: String,
}

/// Why a line is not a record.
pub(super) const NOT_A_RECORD: &str = "not an audit record (not JSON, or fields missing)";

impl CompactRecord {
    /// Parses a line of format v2.
    pub(super) fn parse(line: &[u8]) -> Result<CompactRecord, &'static str> {
        match serde_json::from_slice::<CompactRecord>(line) {
            Ok(r) if r.v == 2 => Ok(r),
            _ => Err(NOT_A_RECORD),
        }
    }

    /// The record it stands for, its `prev` and `hash` in hex: `prev` from
    /// the line or else `previous`, the record before it's hash.
    fn expand(self, previous: Option<[u8; 32]>) -> Result<AuditRecord, &'static str> {
        let uuid = |short: Option<String>, long: Option<String>| match short {
            Some(c) => {
                let mut buf = [0; 36];
                expand_uuid(&c, &mut buf)
                    .map(|t| Some(t.to_string()))
                    .ok_or("a compact id is not 22 characters of base64url")
            }
            None => Ok(long),
        };
        let key = |short: Option<String>, long: Option<String>| match short {
            Some(c) => expand_key_id(&c)
                .map(Some)
                .ok_or("a compact key id is not 16 characters of base64url"),
            None => Ok(long),
        };
        let hash = digest_of(&self.h).ok_or("`h` is not 43 characters of base64url")?;
        let prev = match self.prev.as_deref() {
            Some(p) => Some(digest_of(p).ok_or("`prev` is not 43 characters of base64url")?),
            None => previous,
        };
        let spki = match self.spki {
            Some(c) => Some(
                digest_of(&c)
                    .map(|d| crate::crypto::hex(&d))
                    .ok_or("`spki` is not 43 characters of base64url")?,
            ),
            None => self.client_spki_sha256,
        };
        let outcome = self
            .outcome
            .unwrap_or_else(|| if self.err.is_some() { "error" } else { "ok" }.to_string());
        Ok(AuditRecord {
            seq: self.seq,
            time: crate::domain::time::rfc3339(self.t),
            operation: self.op,
            outcome,
            error: self.err,
            status: self.st,
            request_id: uuid(self.rid, self.request_id)?,
            actor: self.act.unwrap_or_else(|| "api_key".to_string()),
            api_key_id: key(self.key, self.api_key_id)?,
            tenant_id: uuid(self.ten, self.tenant_id)?,
            client_subject: self.sub,
            client_spki_sha256: spki,
            peer: self.ip,
            encryption_id: uuid(self.enc, self.encryption_id)?,
            version_id: uuid(self.ver, self.version_id)?,
            job_id: uuid(self.job, self.job_id)?,
            target_api_key_id: key(self.tkey, self.target_api_key_id)?,
            scopes: self.scopes,
            batch_index: self.batch_index,
            items: self.n,
            item_indexes: self.idx,
            prev: prev.map(|p| crate::crypto::hex(&p)).unwrap_or_default(),
            hash: Some(crate::crypto::hex(&hash)),
        })
    }
}

impl AuditRecord {
    /// A record line of either format, as the record it stands for (v2's
    /// compact values given back in v1's form: RFC 3339 time, UUID text, hex
    /// hashes). `previous_hash` is the hash of the line before it (hex or
    /// base64url), for a v2 line that does not state its `prev`; without it
    /// such a record's `prev` is empty.
    pub fn from_line(line: &str, previous_hash: Option<&str>) -> Result<AuditRecord, &'static str> {
        if !line.starts_with(V2_PREFIX) {
            return serde_json::from_str(line).map_err(|_| NOT_A_RECORD);
        }
        let previous = previous_hash.and_then(|p| {
            digest_of(p).or_else(|| {
                crate::crypto::parse_hex(p)
                    .filter(|_| p.len() == 64)
                    .and_then(|b| b.try_into().ok())
            })
        });
        CompactRecord::parse(line.as_bytes())?.expand(previous)
    }
}

/// Every record of `text`, the lines of an audit file (checkpoint lines
/// left out), each read as [`AuditRecord::from_line`] reads it with the hash
/// of the record before it.
pub fn read_records(text: &str) -> Vec<Result<AuditRecord, &'static str>> {
    let mut previous: Option<String> = None;
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with("{\"checkpoint\":"))
        .map(|line| {
            let record = AuditRecord::from_line(line, previous.as_deref());
            previous = record.as_ref().ok().and_then(|r| r.hash.clone());
            record
        })
        .collect()
}

/// The text of the last peer address written: most records in a row come
/// from the same few clients. (The time needs none: format v2 writes the
/// event's milliseconds.)
#[derive(Default)]
pub(super) struct TextCache {
    peer: Option<IpAddr>,
    peer_text: String,
}

impl TextCache {
    /// The text of the peer address.
    fn of(&mut self, peer: Option<IpAddr>) -> Option<&str> {
        if let Some(ip) = peer {
            if self.peer != Some(ip) {
                self.peer = Some(ip);
                self.peer_text.clear();
                // Writing to a `String` cannot fail.
                let _ = std::fmt::Write::write_fmt(&mut self.peer_text, format_args!("{ip}"));
            }
        }
        peer.map(|_| self.peer_text.as_str())
    }
}

impl AuditEvent {
    /// Hands this event's records (one per target, at least one) to `each`,
    /// in order, borrowed; `seq`, `prev` and `hash` are the chain's to set.
    pub(super) fn for_each_record(
        &self,
        texts: &mut TextCache,
        mut each: impl FnMut(&AuditRecord<&str>),
    ) {
        let (actor, api_key_id, tenant) = match &self.actor {
            // A tenant key names its own tenant; an operator key none, or the
            // tenant it acted on (so that tenant's admin sees it too).
            Actor::ApiKey(p) => (
                "api_key",
                Some(p.key_id.as_str()),
                p.tenant_id.or(self.tenant_id),
            ),
            Actor::Unauthenticated => ("unauthenticated", None, self.tenant_id),
            Actor::Refused(id) => ("unauthenticated", Some(id.as_str()), self.tenant_id),
            Actor::System => ("system", None, self.tenant_id),
            Actor::OperatorCli => ("operator_cli", None, self.tenant_id),
        };
        let mut tenant_buf = [0; 36];
        let tenant_id = tenant.map(|t| t.encode(&mut tenant_buf));
        let spki = self.client.as_ref().map(|c| c.spki_hex());
        let peer = texts.of(self.peer);
        // No `time`: the chain writes the event's `time_ms` (format v2).
        let base = AuditRecord {
            operation: self.operation,
            outcome: "ok",
            status: self.status,
            request_id: self.request_id.as_ref().map(RequestId::as_str),
            actor,
            api_key_id,
            tenant_id,
            client_subject: self.client.as_ref().map(|c| c.subject.as_str()),
            client_spki_sha256: spki.as_deref(),
            peer,
            ..AuditRecord::default()
        };
        let request_failed =
            self.error.is_some() || self.status.is_some_and(|s| !(200..400).contains(&s));
        let outcome = |error: Option<&'static str>, failed: bool| {
            if failed {
                ("error", error.or(Some("failed")))
            } else {
                ("ok", None)
            }
        };
        let none = Target::default();
        let targets = if self.targets.is_empty() {
            std::slice::from_ref(&none)
        } else {
            &self.targets[..]
        };
        let mut indexes = String::new();
        for t in targets {
            let (o, e) = match &t.items {
                // A batch's items report their own outcome when the request
                // as a whole succeeded.
                Some(group) if !request_failed => outcome(group.error, group.error.is_some()),
                _ => outcome(self.error, request_failed),
            };
            let item_indexes = match &t.items {
                Some(group) if !group.failed.is_empty() => {
                    group.write_indexes(&mut indexes);
                    Some(indexes.as_str())
                }
                _ => None,
            };
            let (mut enc_buf, mut ver_buf) = ([0; 36], [0; 36]);
            let record = AuditRecord {
                outcome: o,
                error: e,
                encryption_id: t.encryption_id.as_ref().map(|i| i.encode(&mut enc_buf)),
                version_id: t.version_id.as_ref().map(|v| v.encode(&mut ver_buf)),
                job_id: t.job_id.as_deref(),
                target_api_key_id: t.api_key_id.as_deref(),
                scopes: t.scopes.as_deref(),
                items: t.items.as_ref().map(|g| g.count),
                item_indexes,
                ..base
            };
            each(&record);
        }
    }

    /// How many records it becomes.
    pub(super) fn records(&self) -> usize {
        self.targets.len().max(1)
    }

    /// About how much memory it holds while queued, and its lines take once
    /// written (each record's line, about [`LINE_ESTIMATE`] bytes): what the
    /// writer's queue is bounded by.
    pub(super) fn queued_bytes(&self) -> usize {
        let targets: usize = self
            .targets
            .iter()
            .map(|t| {
                t.job_id.as_ref().map_or(0, String::capacity)
                    + t.api_key_id.as_ref().map_or(0, String::capacity)
                    + t.scopes.as_ref().map_or(0, String::capacity)
                    + t.items.as_ref().map_or(0, |g| g.heap_bytes() * 3)
            })
            .sum();
        std::mem::size_of::<AuditEvent>()
            + self.targets.capacity() * std::mem::size_of::<Target>()
            + targets
            + self.records() * LINE_ESTIMATE
    }
}

/// About how long a record's line is (a request's: ids, time, hashes).
pub(super) const LINE_ESTIMATE: usize = 512;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::GENESIS;

    #[test]
    fn the_hand_written_line_is_what_serde_json_writes() {
        let full = AuditRecord {
            seq: u64::MAX,
            time: "2026-01-01T00:00:00.000Z",
            operation: "encrypt",
            outcome: "error",
            error: Some("invalid_request"),
            status: Some(400),
            request_id: Some("a \"client\" id\n\u{1}\\ with ünïcödé"),
            actor: "api_key",
            api_key_id: Some("kw_0123"),
            tenant_id: Some("00000000-0000-0000-0000-000000000001"),
            client_subject: Some("CN=platform,O=\"Example, Inc.\""),
            client_spki_sha256: Some(
                "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ),
            peer: Some("::1"),
            encryption_id: Some("00000000-0000-0000-0000-000000000002"),
            version_id: Some("00000000-0000-0000-0000-000000000003"),
            job_id: Some("job"),
            target_api_key_id: Some("kw_4567"),
            scopes: Some("encrypt,decrypt"),
            batch_index: Some(u32::MAX),
            items: Some(u32::MAX),
            item_indexes: Some("0-3,7"),
            prev: GENESIS,
            hash: Some(GENESIS),
        };
        let sparse = AuditRecord {
            seq: 1,
            error: None,
            status: None,
            request_id: None,
            api_key_id: None,
            tenant_id: None,
            client_subject: None,
            client_spki_sha256: None,
            peer: None,
            encryption_id: None,
            version_id: None,
            job_id: None,
            target_api_key_id: None,
            scopes: None,
            batch_index: None,
            items: None,
            item_indexes: None,
            hash: None,
            ..full
        };
        for record in [full, sparse] {
            let mut ours = String::new();
            record.write_json(&mut ours);
            assert_eq!(ours, serde_json::to_string(&record).expect("serializes"));
        }
    }
}
