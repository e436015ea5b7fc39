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
use crate::domain::service::Principal;
use crate::domain::time::write_rfc3339;
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

/// One audit record, as written: a JSON object per line, fields in this order,
/// `hash` last.
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
    /// SHA-256, hex, of this record's JSON without the `hash` field.
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
    /// writes for the derived `Serialize` (the tests compare the two).
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

/// The RFC 3339 text of the last timestamp written (records come in bursts
/// within the same millisecond, so most reuse it), and of the last peer.
#[derive(Default)]
pub(super) struct TextCache {
    ms: Option<i64>,
    text: String,
    peer: Option<IpAddr>,
    peer_text: String,
}

impl TextCache {
    /// The text of `ms`, and of the peer address: most records in a row come
    /// from the same few clients too.
    fn of(&mut self, ms: i64, peer: Option<IpAddr>) -> (&str, Option<&str>) {
        if self.ms != Some(ms) {
            self.ms = Some(ms);
            write_rfc3339(ms, &mut self.text);
        }
        if let Some(ip) = peer {
            if self.peer != Some(ip) {
                self.peer = Some(ip);
                self.peer_text.clear();
                // Writing to a `String` cannot fail.
                let _ = std::fmt::Write::write_fmt(&mut self.peer_text, format_args!("{ip}"));
            }
        }
        (&self.text, peer.map(|_| self.peer_text.as_str()))
    }
}

impl AuditEvent {
    /// Hands this event's records (one per target, at least one) to `each`,
    /// in order, borrowed; `seq`, `prev` and `hash` are the chain's to set.
    pub(super) fn for_each_record(
        &self,
        time: &mut TextCache,
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
        let (time, peer) = time.of(self.time_ms, self.peer);
        let base = AuditRecord {
            time,
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
