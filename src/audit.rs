//! The audit log: one record per operation (who, tenant, encryption, version,
//! operation, outcome, request id, client identity, time), never a plaintext,
//! ciphertext, key or secret.
//!
//! Requests hand their events to [`AuditLog::record`], which only queues them; one
//! writer task takes whatever has queued up, seals each record into a SHA-256
//! hash chain, appends the lines to the audit file (or standard output), and
//! hands them on in segments of up to 1,000 records (see
//! [`crate::store::AuditSegment`]), each when full, 100 ms after its first
//! record, or when a read or shutdown flushes; a table task stores them. No
//! request waits for a database round trip, the file never waits for the
//! database, and the database sees a row per segment, not per record; when the
//! writer falls far behind, requests wait for room in the queue rather than
//! lose records.
//!
//! Tamper evidence: each record carries `prev`, the hash of the record before it,
//! and `hash`, the SHA-256 of the record's own JSON up to (not including) the
//! `hash` field. Changing, removing, inserting or reordering a record breaks the
//! chain at that point, which [`verify`] (`keyward audit verify FILE`) reports.
//! Cutting records off the end cannot be seen from the file alone: ship the file
//! off the host, or compare with the table.
//!
//! A record's fields are declared once, in [`AuditRecord`], generic over its
//! text: `String` for a record read back (what the API returns and [`verify`]
//! parses), `&str` for the one the writer seals, which borrows every field so
//! that writing a record allocates nothing but its line.

use std::collections::VecDeque;
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use utoipa::ToSchema;

use crate::crypto::sha256;
use crate::domain::identity::ClientIdentity;
use crate::domain::service::Principal;
use crate::domain::time::rfc3339;
use crate::domain::{EncryptionId, TenantId, VersionId};
use crate::store::{AuditSegment, SegmentPacker, Store};

/// Every operation name a record can carry.
pub const OPERATIONS: &[&str] = &[
    "encrypt",
    "decrypt",
    "rotate",
    "rewrap",
    "encryption.create",
    "encryption.read",
    "encryption.list",
    "encryption.update",
    "version.update",
    "job.create",
    "job.read",
    "job.list",
    "job.cancel",
    "root_kek.read",
    "root_kek.rotate",
    "audit.read",
    "rotate.automatic",
];

/// The `prev` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// How many events may wait for the writer before requests wait for room.
const QUEUE: usize = 8_192;
/// How many records may wait for the writer (a batch item is one).
const RECORD_BUDGET: usize = 65_536;
/// Most events the writer takes at once.
const BATCH: usize = 4096;
/// How long the writer lets events gather after a batch when more are coming.
const PACE: Duration = Duration::from_millis(5);
/// How long a record may wait for the table while its segment is not full.
/// Under load a segment fills in a few tens of milliseconds, so the table
/// takes one transaction per 1,000 records rather than one per batch; reads
/// flush first, so this only bounds what a killed process leaves out of the
/// table (the file has every record).
const TABLE_DELAY: Duration = Duration::from_millis(100);
/// How long after a failed table write the table task tries again.
const TABLE_RETRY: Duration = Duration::from_secs(1);
/// The longest one table write may take before it counts as failed (a
/// database that hangs rather than refuses).
const TABLE_ATTEMPT: Duration = Duration::from_secs(30);
/// Most records kept for the table while the database is unreachable (they are
/// in the file already); beyond, the oldest are dropped from the table copy.
const MAX_PENDING_RECORDS: usize = 200_000;
/// The line buffer the writer keeps for its next segment, if its capacity is
/// at most this (a full segment's lines fit).
const SPARE_LINES_CAPACITY: usize = 1024 * 1024;

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
    /// missing or refused) or `system` (Keyward itself, e.g. a rotation policy).
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
    /// The peer's IP address.
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
    /// The item's position in a batch request (one record per item).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_index: Option<u32>,
    /// The previous record's `hash` (all zeros for the first record of a chain).
    #[schema(value_type = String)]
    pub prev: S,
    /// SHA-256, hex, of this record's JSON without the `hash` field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub hash: Option<S>,
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
}

/// What an operation acted on. A batch request has one per item.
#[derive(Debug, Clone, Default)]
pub struct Target {
    /// The encryption.
    pub encryption_id: Option<EncryptionId>,
    /// The version used or made.
    pub version_id: Option<VersionId>,
    /// The job.
    pub job_id: Option<String>,
    /// The item's position, for batch items.
    pub batch_index: Option<u32>,
    /// A batch item's own outcome: `None` while running, `Some(None)` when it
    /// succeeded, `Some(Some(code))` when it failed.
    pub item_outcome: Option<Option<&'static str>>,
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
    pub request_id: Option<String>,
    /// Who.
    pub actor: Actor,
    /// The tenant, when the actor is not an API key (which names its own).
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
    fn write_json(&self, out: &mut String) {
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
            .opt_u64("batchIndex", self.batch_index.map(u64::from))
            .str("prev", &self.prev)
            .opt_str("hash", self.hash.as_deref())
            .end();
    }
}

/// The RFC 3339 text of the last timestamp written (records come in bursts
/// within the same millisecond, so most reuse it), and of the last peer.
#[derive(Default)]
struct TextCache {
    ms: Option<i64>,
    text: String,
    peer: Option<std::net::IpAddr>,
    peer_text: String,
}

impl TextCache {
    /// The text of `ms`, and of the peer address: most records in a row come
    /// from the same few clients too.
    fn of(&mut self, ms: i64, peer: Option<std::net::IpAddr>) -> (&str, Option<&str>) {
        if self.ms != Some(ms) {
            self.ms = Some(ms);
            self.text = rfc3339(ms);
        }
        if let Some(ip) = peer {
            if self.peer != Some(ip) {
                self.peer = Some(ip);
                self.peer_text = ip.to_string();
            }
        }
        (&self.text, peer.map(|_| self.peer_text.as_str()))
    }
}

impl AuditEvent {
    /// Seals this event's records (one per target, at least one) into `chain`,
    /// appending their lines to `out`; `row` receives each record's fields and
    /// line (for the table copy).
    fn write_records(
        &self,
        chain: &mut Chain,
        time: &mut TextCache,
        out: &mut String,
        mut row: impl FnMut(&AuditRecord<&str>, &str),
    ) {
        let (actor, api_key_id, tenant) = match &self.actor {
            Actor::ApiKey(p) => ("api_key", Some(p.key_id.as_str()), Some(p.tenant_id)),
            Actor::Unauthenticated => ("unauthenticated", None, self.tenant_id),
            Actor::Refused(id) => ("unauthenticated", Some(id.as_str()), self.tenant_id),
            Actor::System => ("system", None, self.tenant_id),
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
            request_id: self.request_id.as_deref(),
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
        for t in targets {
            let (o, e) = match t.item_outcome {
                // A batch item reports its own outcome when the request as a
                // whole succeeded.
                Some(item) if !request_failed => outcome(item, item.is_some()),
                _ => outcome(self.error, request_failed),
            };
            let (mut enc_buf, mut ver_buf) = ([0; 36], [0; 36]);
            let record = AuditRecord {
                outcome: o,
                error: e,
                encryption_id: t.encryption_id.as_ref().map(|i| i.encode(&mut enc_buf)),
                version_id: t.version_id.as_ref().map(|v| v.encode(&mut ver_buf)),
                job_id: t.job_id.as_deref(),
                batch_index: t.batch_index,
                ..base
            };
            if chain.needs_newline {
                out.push('\n');
                chain.needs_newline = false;
            }
            let line = chain.seal(&record, out);
            row(&record, &out[line]);
            out.push('\n');
        }
    }
}

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Standard output (the default for `serve`; logs go to standard error).
    Stdout,
    /// Appended to this file (created with mode 0600).
    File(PathBuf),
}

enum Message {
    /// An event with its share of the record budget, released once written.
    Event(AuditEvent, OwnedSemaphorePermit),
    Flush(oneshot::Sender<()>),
}

/// The handle requests use to record events. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Message>,
    /// Records queued and not yet written, at most [`RECORD_BUDGET`]: a batch
    /// request of 1,000 items takes 1,000, so memory is bounded by records,
    /// not requests.
    budget: Arc<Semaphore>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

impl AuditLog {
    /// Opens the destination and starts the writer. A file's chain continues
    /// from its last record.
    pub fn start(destination: &Destination, store: Option<Store>) -> anyhow::Result<AuditLog> {
        let (sink, chain) = match destination {
            Destination::Stdout => (Sink::Stdout(std::io::stdout()), Chain::new()),
            Destination::File(path) => {
                let (file, chain) = open_file(path).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot open the audit file {} (KEYWARD_AUDIT_FILE): {e}",
                        path.display()
                    )
                })?;
                (Sink::File(file), chain)
            }
        };
        let table = match store {
            Some(store) => {
                let packer = SegmentPacker::new().map_err(|e| {
                    anyhow::anyhow!("cannot start the audit table's compressor: {e}")
                })?;
                let shared = Arc::new(TableShared {
                    queue: std::sync::Mutex::new(TableQueue::default()),
                    wake: tokio::sync::Notify::new(),
                });
                tokio::spawn(table_loop(shared.clone(), store, packer));
                Some(shared)
            }
            None => None,
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(rx, sink, chain, table));
        Ok(AuditLog {
            tx,
            budget: Arc::new(Semaphore::new(RECORD_BUDGET)),
        })
    }

    fn records_of(event: &AuditEvent) -> u32 {
        event.targets.len().clamp(1, RECORD_BUDGET) as u32
    }

    /// Queues an event. Waits only when the queue is full.
    pub async fn record(&self, event: AuditEvent) {
        let n = Self::records_of(&event);
        let permit = match self.budget.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) => {
                metrics::counter!("keyward_audit_queue_full_total").increment(1);
                match self.budget.clone().acquire_many_owned(n).await {
                    Ok(p) => p,
                    Err(_) => return, // Never closed.
                }
            }
        };
        match self.tx.try_send(Message::Event(event, permit)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(message)) => {
                metrics::counter!("keyward_audit_queue_full_total").increment(1);
                let _ = self.tx.send(message).await;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("audit writer stopped; an audit record was lost");
            }
        }
    }

    /// Queues an event without waiting (for code that cannot wait, such as a
    /// request being dropped); counts it as lost when the queue is full.
    pub fn record_now(&self, event: AuditEvent) {
        let sent = match self
            .budget
            .clone()
            .try_acquire_many_owned(Self::records_of(&event))
        {
            Ok(permit) => self.tx.try_send(Message::Event(event, permit)).is_ok(),
            Err(_) => false,
        };
        if !sent {
            metrics::counter!("keyward_audit_lost_total").increment(1);
            tracing::error!("audit queue full or closed; an audit record was lost");
        }
    }

    /// Waits until everything queued before this call is in the file and has
    /// been tried in the table (at once, unless a table write failed within
    /// the last second: then the table is left to its retry).
    pub async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

enum Sink {
    Stdout(std::io::Stdout),
    File(std::fs::File),
}

impl Sink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout(out) => {
                let mut out = out.lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Sink::File(file) => file.write_all(bytes),
        }
    }
}

/// The running end of a hash chain.
struct Chain {
    seq: u64,
    /// The last record's hash, hex.
    prev: String,
    /// The file ends in a partial line (a crash mid-write): start on a new line.
    needs_newline: bool,
}

impl Chain {
    fn new() -> Chain {
        Chain {
            seq: 0,
            prev: GENESIS.to_string(),
            needs_newline: false,
        }
    }

    /// Numbers, links and hashes `record`, appending its line (without
    /// newline) to `out`; returns where in `out` the line is.
    fn seal(&mut self, record: &AuditRecord<&str>, out: &mut String) -> Range<usize> {
        let start = out.len();
        self.seq += 1;
        let record = AuditRecord {
            seq: self.seq,
            prev: self.prev.as_str(),
            hash: None,
            ..*record
        };
        record.write_json(out);
        // `hash` covers the line up to it, closed as the object it was: the
        // JSON without its `hash` field.
        let digest = sha256(&out.as_bytes()[start..]);
        out.pop();
        self.prev.clear();
        crate::crypto::hex_into(&digest, &mut self.prev);
        out.push_str(",\"hash\":\"");
        out.push_str(&self.prev);
        out.push_str("\"}");
        start..out.len()
    }
}

/// Opens `path` for appending (creating it, mode 0600) and reads the chain's
/// end from its last complete line.
fn open_file(path: &Path) -> std::io::Result<(std::fs::File, Chain)> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true).append(true).create(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    let len = file.metadata()?.len();
    let mut chain = Chain::new();
    if len > 0 {
        let start = len.saturating_sub(256 * 1024);
        file.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail)?;
        chain.needs_newline = tail.last() != Some(&b'\n');
        let complete = match tail.iter().rposition(|b| *b == b'\n') {
            Some(end) => &tail[..end],
            None => &[][..],
        };
        let last = complete
            .rsplit(|b| *b == b'\n')
            .next()
            .filter(|l| !l.is_empty());
        match last.and_then(|l| serde_json::from_slice::<AuditRecord>(l).ok()) {
            Some(AuditRecord {
                seq,
                hash: Some(hash),
                ..
            }) => {
                chain.seq = seq;
                chain.prev = hash;
            }
            _ => tracing::warn!(
                file = %path.display(),
                "the audit file's last line is not an audit record; starting a new chain (verify will report the break)"
            ),
        }
    }
    Ok((file, chain))
}

/// Segments on their way to the table: the writer adds them, the table task
/// stores them. Kept apart so that the file never waits for the database.
#[derive(Default)]
struct TableQueue {
    /// Oldest first.
    segments: VecDeque<AuditSegment>,
    /// Records in `segments`.
    records: usize,
    /// Reads (and shutdown) waiting for what was queued before them.
    flushes: Vec<oneshot::Sender<()>>,
    /// A stored segment's line buffer, emptied, for the writer's next segment:
    /// a fresh buffer of hundreds of kilobytes came from pages the allocator
    /// had just given back, a page fault per 4 KiB.
    spare_lines: Option<String>,
    /// The writer has stopped: nothing more will come.
    closed: bool,
}

struct TableShared {
    queue: std::sync::Mutex<TableQueue>,
    wake: tokio::sync::Notify,
}

impl TableShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, TableQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `segments` in order; beyond [`MAX_PENDING_RECORDS`] the oldest
    /// are dropped from the table copy (they are in the file).
    fn push(&self, segments: Vec<AuditSegment>) {
        let dropped = {
            let mut q = self.lock();
            q.records += segments.iter().map(|s| s.records).sum::<usize>();
            q.segments.extend(segments);
            q.trim()
        };
        report_dropped(dropped);
        self.wake.notify_one();
    }

    fn flush(&self, done: oneshot::Sender<()>) {
        self.lock().flushes.push(done);
        self.wake.notify_one();
    }

    fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }
}

impl TableQueue {
    /// Takes up to `n` of the oldest segments.
    fn take_front(&mut self, n: usize) -> Vec<AuditSegment> {
        let n = self.segments.len().min(n);
        let taken: Vec<AuditSegment> = self.segments.drain(..n).collect();
        self.records -= taken.iter().map(|s| s.records).sum::<usize>();
        taken
    }

    /// Puts segments taken with [`TableQueue::take_front`] back, in order,
    /// then trims; how many records the trim dropped.
    fn put_front(&mut self, segments: Vec<AuditSegment>) -> usize {
        self.records += segments.iter().map(|s| s.records).sum::<usize>();
        for segment in segments.into_iter().rev() {
            self.segments.push_front(segment);
        }
        self.trim()
    }

    /// Drops the oldest segments beyond [`MAX_PENDING_RECORDS`]; how many
    /// records went.
    fn trim(&mut self) -> usize {
        let mut dropped = 0;
        while self.records > MAX_PENDING_RECORDS {
            let Some(oldest) = self.segments.pop_front() else {
                break;
            };
            self.records -= oldest.records;
            dropped += oldest.records;
        }
        dropped
    }
}

fn report_dropped(records: usize) {
    if records > 0 {
        metrics::counter!("keyward_audit_lost_total").increment(records as u64);
        tracing::error!(
            dropped = records,
            "the database has refused audit records for too long; oldest dropped from the table (they are in the audit file)"
        );
    }
}

/// The writer: seals records into the chain, appends them to the file, and
/// hands segments to the table task.
async fn write_loop(
    mut rx: mpsc::Receiver<Message>,
    mut sink: Sink,
    mut chain: Chain,
    table: Option<Arc<TableShared>>,
) {
    let mut messages = Vec::with_capacity(BATCH);
    // The segment being filled, and when it goes to the table even if not
    // full.
    let mut current: Option<AuditSegment> = None;
    let mut current_due: Option<tokio::time::Instant> = None;
    // The lines of one batch, reused from batch to batch.
    let mut out = String::new();
    let mut time = TextCache::default();
    loop {
        let received = match current_due {
            None => rx.recv_many(&mut messages, BATCH).await,
            Some(due) => {
                match tokio::time::timeout_at(due, rx.recv_many(&mut messages, BATCH)).await {
                    Ok(n) => n,
                    Err(_) => usize::MAX,
                }
            }
        };
        if received == 0 {
            // Every handle is gone (shutdown has flushed first).
            if let Some(table) = &table {
                table.close();
            }
            return;
        }
        let pace = received != usize::MAX && received < BATCH;
        out.clear();
        let mut records = 0u64;
        let mut flushes = Vec::new();
        let mut permits = Vec::new();
        let mut full = Vec::new();
        let mut started = false;
        for message in messages.drain(..) {
            match message {
                Message::Flush(done) => flushes.push(done),
                Message::Event(event, permit) => {
                    permits.push(permit);
                    event.write_records(&mut chain, &mut time, &mut out, |fields, line| {
                        records += 1;
                        let Some(table) = &table else {
                            return;
                        };
                        let segment = current.get_or_insert_with(|| {
                            started = true;
                            let mut segment = AuditSegment::default();
                            segment.lines = table.lock().spare_lines.take().unwrap_or_default();
                            segment
                        });
                        segment.push(
                            event.time_ms,
                            line,
                            fields.tenant_id,
                            fields.encryption_id,
                            event.operation,
                        );
                        if segment.is_full() {
                            full.extend(current.take());
                        }
                    });
                }
            }
        }
        if !out.is_empty() {
            metrics::counter!("keyward_audit_records_total").increment(records);
            if let Err(e) = sink.write(out.as_bytes()) {
                metrics::counter!("keyward_audit_write_errors_total", "sink" => "file")
                    .increment(1);
                tracing::error!(error = %e, "cannot write the audit file");
            }
        }
        drop(permits);
        let waited_on = !flushes.is_empty();
        match &table {
            None => {
                for done in flushes {
                    let _ = done.send(());
                }
            }
            Some(table) => {
                let now = tokio::time::Instant::now();
                if started {
                    current_due = Some(now + TABLE_DELAY);
                }
                // The segment still filling goes when it is due or a read is
                // waiting for it.
                if waited_on || current_due.is_some_and(|due| due <= now) {
                    full.extend(current.take());
                }
                if current.is_none() {
                    current_due = None;
                }
                if !full.is_empty() {
                    table.push(full);
                }
                for done in flushes {
                    table.flush(done);
                }
            }
        }
        // Under load, let events gather for a moment instead of being woken
        // for every request (each wake is a cross-thread futex call on the
        // request path); a flush (shutdown, GET /v1/audit) is not delayed.
        if pace && !waited_on && !rx.is_empty() {
            tokio::time::sleep(PACE).await;
        }
    }
}

/// The table task: stores queued segments, up to 16 per transaction, oldest
/// first. After a failure it tries again [`TABLE_RETRY`] after the attempt
/// ended; reads waiting meanwhile are answered from what the table has.
async fn table_loop(shared: Arc<TableShared>, store: Store, mut packer: SegmentPacker) {
    // When the last attempt failed, while the database is failing.
    let mut failed_at: Option<tokio::time::Instant> = None;
    loop {
        match failed_at {
            None => shared.wake.notified().await,
            Some(at) => {
                let _ = tokio::time::timeout_at(at + TABLE_RETRY, shared.wake.notified()).await;
            }
        }
        let (flushes, closed) = {
            let mut q = shared.lock();
            (std::mem::take(&mut q.flushes), q.closed)
        };
        if failed_at.is_none_or(|at| at.elapsed() >= TABLE_RETRY) {
            failed_at = store_queued(&shared, &store, &mut packer, failed_at).await;
        }
        for done in flushes {
            let _ = done.send(());
        }
        if closed {
            return;
        }
    }
}

/// Stores the queued segments, 16 per transaction, until the queue is empty
/// or an attempt fails. Returns when the last attempt failed, or None;
/// `failed_at` is the previous failure, so that an outage is logged once.
async fn store_queued(
    shared: &TableShared,
    store: &Store,
    packer: &mut SegmentPacker,
    mut failed_at: Option<tokio::time::Instant>,
) -> Option<tokio::time::Instant> {
    loop {
        let mut batch = shared.lock().take_front(16);
        if batch.is_empty() {
            return failed_at;
        }
        let error =
            match tokio::time::timeout(TABLE_ATTEMPT, store.insert_audit(&mut batch, packer)).await
            {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer in {} s", TABLE_ATTEMPT.as_secs())),
            };
        let Some(error) = error else {
            if let Some(mut lines) = batch.pop().map(|s| s.lines) {
                if lines.capacity() <= SPARE_LINES_CAPACITY {
                    lines.clear();
                    shared.lock().spare_lines = Some(lines);
                }
            }
            if failed_at.take().is_some() {
                tracing::info!("audit records reach the database again");
            }
            continue;
        };
        metrics::counter!("keyward_audit_write_errors_total", "sink" => "database").increment(1);
        if failed_at.is_none() {
            tracing::error!(%error, "cannot write audit records to the database; retrying");
        }
        // Back at the front, in order, for the retry.
        let dropped = shared.lock().put_front(batch);
        report_dropped(dropped);
        // From when the attempt ended: it may have waited seconds for a
        // connection.
        return Some(tokio::time::Instant::now());
    }
}

/// What [`verify`] found in an intact file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    /// Records checked.
    pub records: u64,
    /// The first record's `seq` (1 unless the file starts mid-chain, e.g. after
    /// log rotation).
    pub first_seq: Option<u64>,
    /// The last record's `seq`.
    pub last_seq: Option<u64>,
    /// The first record's `prev`.
    pub starts_after: Option<String>,
    /// The last record's `hash`: keep it elsewhere to detect later truncation.
    pub last_hash: Option<String>,
}

/// The first broken record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}{}: {reason}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
pub struct Broken {
    /// 1-based line number.
    pub line: u64,
    /// The record's `seq`, if it could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    pub reason: String,
}

/// Checks every record's hash and its link to the one before.
pub fn verify(input: impl BufRead) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport {
        records: 0,
        first_seq: None,
        last_seq: None,
        starts_after: None,
        last_hash: None,
    };
    for (index, line) in input.split(b'\n').enumerate() {
        let line = line.map_err(VerifyError::Io)?;
        let line_no = index as u64 + 1;
        let broken = |seq: Option<u64>, reason: &str| {
            VerifyError::Broken(Broken {
                line: line_no,
                seq,
                reason: reason.to_string(),
            })
        };
        let record: AuditRecord = serde_json::from_slice(&line)
            .map_err(|_| broken(None, "not an audit record (not JSON, or fields missing)"))?;
        let seq = Some(record.seq);
        let stated = record
            .hash
            .as_deref()
            .ok_or_else(|| broken(seq, "no `hash` field"))?;
        let suffix = format!(",\"hash\":\"{stated}\"}}");
        let body = line
            .strip_suffix(suffix.as_bytes())
            .ok_or_else(|| broken(seq, "`hash` is not the last field"))?;
        let mut hashed = body.to_vec();
        hashed.push(b'}');
        if crate::crypto::hex(&sha256(&hashed)) != stated {
            return Err(broken(
                seq,
                "the record was changed: its hash does not match its content",
            ));
        }
        match &report.last_hash {
            None => {
                report.first_seq = seq;
                report.starts_after = Some(record.prev.clone());
            }
            Some(previous) => {
                if &record.prev != previous {
                    return Err(broken(
                        seq,
                        "`prev` is not the hash of the record before it: a record before it was changed, removed or inserted",
                    ));
                }
                if report.last_seq.map(|s| s + 1) != seq {
                    return Err(broken(seq, "`seq` does not follow the record before it"));
                }
            }
        }
        report.records += 1;
        report.last_seq = seq;
        report.last_hash = Some(stated.to_string());
    }
    Ok(report)
}

/// Why [`verify`] failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The file could not be read.
    #[error("cannot read: {0}")]
    Io(std::io::Error),
    /// A record is broken.
    #[error("broken at {0}")]
    Broken(Broken),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(op: &str) -> AuditRecord<&str> {
        AuditRecord {
            time: "2026-01-01T00:00:00.000Z",
            operation: op,
            outcome: "ok",
            actor: "system",
            ..AuditRecord::default()
        }
    }

    fn seal(chain: &mut Chain, record: &AuditRecord<&str>) -> String {
        let mut out = String::new();
        chain.seal(record, &mut out);
        out
    }

    fn chain_of(n: usize) -> Vec<String> {
        let mut chain = Chain::new();
        (0..n)
            .map(|i| seal(&mut chain, &sample(&format!("op{i}"))))
            .collect()
    }

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
            batch_index: Some(u32::MAX),
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
            batch_index: None,
            hash: None,
            ..full
        };
        for record in [full, sparse] {
            let mut ours = String::new();
            record.write_json(&mut ours);
            assert_eq!(ours, serde_json::to_string(&record).expect("serializes"));
        }
    }

    #[test]
    fn written_lines_are_audit_records_with_every_field_in_order() {
        let tenant = TenantId::new_random();
        let (e1, e2, v1) = (
            EncryptionId::new_random(),
            EncryptionId::new_random(),
            VersionId::new_random(),
        );
        let event = AuditEvent {
            time_ms: 1_780_000_000_123,
            operation: "encrypt",
            status: Some(200),
            error: None,
            request_id: Some("req-1".into()),
            actor: Actor::Refused("kw_0123456789abcdef01234567".into()),
            tenant_id: Some(tenant),
            client: Some(Arc::new(ClientIdentity {
                subject: "CN=client \"one\"".into(),
                spki_sha256: [7; 32],
            })),
            peer: Some("127.0.0.1".parse().unwrap()),
            targets: vec![
                Target {
                    encryption_id: Some(e1),
                    version_id: Some(v1),
                    batch_index: Some(0),
                    item_outcome: Some(None),
                    ..Target::default()
                },
                Target {
                    encryption_id: Some(e2),
                    batch_index: Some(1),
                    item_outcome: Some(Some("encryption_not_found")),
                    ..Target::default()
                },
            ],
        };
        let (mut chain, mut time, mut out) = (Chain::new(), TextCache::default(), String::new());
        let mut rows = Vec::new();
        event.write_records(&mut chain, &mut time, &mut out, |fields, line| {
            rows.push((fields.outcome.to_string(), line.to_string()))
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(rows[1].1, lines[1]);
        let first: AuditRecord = serde_json::from_str(lines[0]).unwrap();
        let second: AuditRecord = serde_json::from_str(lines[1]).unwrap();
        let expected = AuditRecord {
            seq: 1,
            time: "2026-05-28T20:26:40.123Z".into(),
            operation: "encrypt".into(),
            outcome: "ok".into(),
            error: None,
            status: Some(200),
            request_id: Some("req-1".into()),
            actor: "unauthenticated".into(),
            api_key_id: Some("kw_0123456789abcdef01234567".into()),
            tenant_id: Some(tenant.to_string()),
            client_subject: Some("CN=client \"one\"".into()),
            client_spki_sha256: Some("07".repeat(32)),
            peer: Some("127.0.0.1".into()),
            encryption_id: Some(e1.to_string()),
            version_id: Some(v1.to_string()),
            job_id: None,
            batch_index: Some(0),
            prev: GENESIS.into(),
            hash: first.hash.clone(),
        };
        assert_eq!(first, expected);
        assert_eq!((second.seq, second.outcome.as_str()), (2, "error"));
        assert_eq!(second.error.as_deref(), Some("encryption_not_found"));
        assert_eq!(second.prev, first.hash.clone().unwrap());
        // The writer's bytes are exactly what serde writes for the record:
        // the same fields in the same order.
        let mut unhashed = first.clone();
        unhashed.hash = None;
        let body = serde_json::to_string(&unhashed).unwrap();
        assert!(
            lines[0].starts_with(&body[..body.len() - 1]),
            "{}",
            lines[0]
        );
        assert_eq!(
            check(&lines.iter().map(|l| l.to_string()).collect::<Vec<_>>())
                .unwrap()
                .records,
            2
        );
    }

    fn check(lines: &[String]) -> Result<VerifyReport, VerifyError> {
        verify(lines.join("\n").as_bytes())
    }

    #[test]
    fn an_intact_chain_verifies_and_any_edit_is_named() {
        let lines = chain_of(5);
        let report = check(&lines).unwrap();
        assert_eq!(
            (report.records, report.first_seq, report.last_seq),
            (5, Some(1), Some(5))
        );
        assert_eq!(report.starts_after.as_deref(), Some(GENESIS));

        let mut changed = lines.clone();
        changed[2] = changed[2].replace("op2", "opX");
        match check(&changed) {
            Err(VerifyError::Broken(b)) => {
                assert_eq!((b.line, b.seq), (3, Some(3)));
                assert!(b.reason.contains("changed"), "{b}");
            }
            other => panic!("{other:?}"),
        }

        let mut removed = lines.clone();
        removed.remove(1);
        match check(&removed) {
            Err(VerifyError::Broken(b)) => assert_eq!((b.line, b.seq), (2, Some(3))),
            other => panic!("{other:?}"),
        }

        let mut swapped = lines.clone();
        swapped.swap(3, 4);
        assert!(matches!(check(&swapped), Err(VerifyError::Broken(b)) if b.line == 4));

        // Re-hashing a changed record does not help: the next link breaks.
        let mut forged: AuditRecord<&str> = serde_json::from_str(&lines[1]).unwrap();
        forged.operation = "forged";
        let mut chain = Chain::new();
        chain.seq = 1;
        chain.prev = forged.prev.to_string();
        let mut rehashed = lines.clone();
        rehashed[1] = seal(&mut chain, &forged);
        match check(&rehashed) {
            Err(VerifyError::Broken(b)) => assert_eq!((b.line, b.seq), (3, Some(3))),
            other => panic!("{other:?}"),
        }

        let mut garbage = lines.clone();
        garbage[4] = "not json".into();
        assert!(
            matches!(check(&garbage), Err(VerifyError::Broken(b)) if b.line == 5 && b.seq.is_none())
        );
    }

    #[test]
    fn a_file_continues_its_chain_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (mut file, mut chain) = open_file(&path).unwrap();
        for i in 0..3 {
            writeln!(file, "{}", seal(&mut chain, &sample(&format!("a{i}")))).unwrap();
        }
        drop(file);
        let (mut file, mut chain) = open_file(&path).unwrap();
        assert_eq!(chain.seq, 3);
        writeln!(file, "{}", seal(&mut chain, &sample("b"))).unwrap();
        let report = verify(std::io::BufReader::new(std::fs::File::open(&path).unwrap())).unwrap();
        assert_eq!((report.records, report.last_seq), (4, Some(4)));
    }
}
