//! The audit log: one record per operation (who, tenant, encryption, version,
//! operation, outcome, request id, client identity, time), never a plaintext,
//! ciphertext, key or secret.
//!
//! Requests hand their events to [`AuditLog::record`], which only queues them; one
//! writer task takes whatever has queued up, seals each record into a SHA-256
//! hash chain, appends the lines to the audit file (or standard output), and
//! inserts the batch into the `audit_log` table with one statement per few
//! hundred records. No request waits for a database round trip; when the writer
//! falls far behind, requests wait for room in the queue rather than lose
//! records.
//!
//! Tamper evidence: each record carries `prev`, the hash of the record before it,
//! and `hash`, the SHA-256 of the record's own JSON up to (not including) the
//! `hash` field. Changing, removing, inserting or reordering a record breaks the
//! chain at that point, which [`verify`] (`keyward audit verify FILE`) reports.
//! Cutting records off the end cannot be seen from the file alone: ship the file
//! off the host, or compare with the table.

use std::collections::VecDeque;
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use utoipa::ToSchema;

use crate::crypto::sha256;
use crate::domain::service::Principal;
use crate::domain::time::rfc3339;
use crate::domain::{EncryptionId, TenantId, VersionId};
use crate::store::{AuditRow, Store};
use crate::tls::ClientIdentity;

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
/// Most records kept for the table while the database is unreachable (they are
/// in the file already); beyond, the oldest are dropped from the table copy.
const MAX_PENDING_ROWS: usize = 200_000;

/// One audit record, as written: a JSON object per line, fields in this order,
/// `hash` last.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// Position in this writer's chain, from 1.
    pub seq: u64,
    /// When the operation started, RFC 3339 UTC.
    pub time: String,
    /// What was done: `encrypt`, `decrypt`, `rotate`, `rewrap`,
    /// `encryption.create`, `version.update`, `job.create`, `audit.read`,
    /// `rotate.automatic`, ...
    pub operation: String,
    /// `ok` or `error`.
    pub outcome: String,
    /// The error code when the outcome is `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The HTTP status answered (absent for background operations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The request's `X-Request-Id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// `api_key` (an authenticated caller), `unauthenticated` (credentials
    /// missing or refused) or `system` (Keyward itself, e.g. a rotation policy).
    pub actor: String,
    /// The API key id used, or presented when authentication failed (only if
    /// it has the form of a key id; never the secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_id: Option<String>,
    /// The tenant acted for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = Uuid)]
    pub tenant_id: Option<String>,
    /// The client certificate's subject (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_subject: Option<String>,
    /// SHA-256 of the client certificate's public key, hex (mutual TLS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_spki_sha256: Option<String>,
    /// The peer's IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The encryption acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = Uuid)]
    pub encryption_id: Option<String>,
    /// The version used or made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = Uuid)]
    pub version_id: Option<String>,
    /// The re-encryption job acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(format = Uuid)]
    pub job_id: Option<String>,
    /// The item's position in a batch request (one record per item).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_index: Option<u32>,
    /// The previous record's `hash` (all zeros for the first record of a chain).
    pub prev: String,
    /// SHA-256, hex, of this record's JSON without the `hash` field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
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

impl AuditEvent {
    /// The records this event makes: one per target (at least one).
    fn records(self) -> Vec<AuditRecord> {
        let (actor, api_key_id, tenant) = match &self.actor {
            Actor::ApiKey(p) => ("api_key", Some(p.key_id.clone()), Some(p.tenant_id)),
            Actor::Unauthenticated => ("unauthenticated", None, self.tenant_id),
            Actor::Refused(id) => ("unauthenticated", Some(id.clone()), self.tenant_id),
            Actor::System => ("system", None, self.tenant_id),
        };
        let base = AuditRecord {
            seq: 0,
            time: rfc3339(self.time_ms),
            operation: self.operation.to_string(),
            outcome: String::new(),
            error: None,
            status: self.status,
            request_id: self.request_id.clone(),
            actor: actor.to_string(),
            api_key_id,
            tenant_id: tenant.map(|t| t.to_string()),
            client_subject: self.client.as_ref().map(|c| c.subject.clone()),
            client_spki_sha256: self.client.as_ref().map(|c| c.spki_hex()),
            peer: self.peer.map(|p| p.to_string()),
            encryption_id: None,
            version_id: None,
            job_id: None,
            batch_index: None,
            prev: String::new(),
            hash: None,
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
        if self.targets.is_empty() {
            let (o, e) = outcome(self.error, request_failed);
            return vec![AuditRecord {
                outcome: o.into(),
                error: e.map(Into::into),
                ..base
            }];
        }
        self.targets
            .into_iter()
            .map(|t| {
                let (o, e) = match t.item_outcome {
                    // A batch item reports its own outcome when the request as a
                    // whole succeeded.
                    Some(item) if !request_failed => outcome(item, item.is_some()),
                    _ => outcome(self.error, request_failed),
                };
                AuditRecord {
                    outcome: o.into(),
                    error: e.map(Into::into),
                    encryption_id: t.encryption_id.map(|i| i.to_string()),
                    version_id: t.version_id.map(|v| v.to_string()),
                    job_id: t.job_id,
                    batch_index: t.batch_index,
                    ..base.clone()
                }
            })
            .collect()
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
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(rx, sink, chain, store));
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

    /// Waits until everything queued before this call is in the file and (if
    /// the database answers) the table.
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

    /// Numbers and hashes `record`, returning its line (without newline).
    fn seal(&mut self, mut record: AuditRecord) -> String {
        self.seq += 1;
        record.seq = self.seq;
        record.prev = std::mem::take(&mut self.prev);
        record.hash = None;
        let body = serde_json::to_string(&record).expect("an audit record serializes");
        let hash = crate::tls::hex(&sha256(body.as_bytes()));
        let line = format!("{},\"hash\":\"{hash}\"}}", &body[..body.len() - 1]);
        self.prev = hash;
        line
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

async fn write_loop(
    mut rx: mpsc::Receiver<Message>,
    mut sink: Sink,
    mut chain: Chain,
    store: Option<Store>,
) {
    let mut messages = Vec::with_capacity(BATCH);
    let mut pending: VecDeque<AuditRow> = VecDeque::new();
    let mut database_failing = false;
    loop {
        let received = if pending.is_empty() {
            rx.recv_many(&mut messages, BATCH).await
        } else {
            // Retry the table while the database was failing, even when idle.
            match tokio::time::timeout(Duration::from_secs(1), rx.recv_many(&mut messages, BATCH))
                .await
            {
                Ok(n) => n,
                Err(_) => usize::MAX,
            }
        };
        if received == 0 {
            return; // Every handle is gone.
        }
        let pace = received != usize::MAX && received < BATCH;
        let mut out = String::new();
        let mut flushes = Vec::new();
        let mut permits = Vec::new();
        for message in messages.drain(..) {
            match message {
                Message::Flush(done) => flushes.push(done),
                Message::Event(event, permit) => {
                    permits.push(permit);
                    let (time_ms, operation) = (event.time_ms, event.operation);
                    for record in event.records() {
                        let mut row = AuditRow {
                            time_ms,
                            tenant_id: record.tenant_id.clone(),
                            encryption_id: record.encryption_id.clone(),
                            operation,
                            outcome: if record.outcome == "ok" {
                                "ok"
                            } else {
                                "error"
                            },
                            request_id: record.request_id.clone(),
                            record: String::new(),
                        };
                        let line = chain.seal(record);
                        if chain.needs_newline {
                            out.push('\n');
                            chain.needs_newline = false;
                        }
                        out.push_str(&line);
                        out.push('\n');
                        if store.is_some() {
                            row.record = line;
                            pending.push_back(row);
                        }
                    }
                }
            }
        }
        if !out.is_empty() {
            metrics::counter!("keyward_audit_records_total")
                .increment(out.bytes().filter(|b| *b == b'\n').count() as u64);
            if let Err(e) = sink.write(out.as_bytes()) {
                metrics::counter!("keyward_audit_write_errors_total", "sink" => "file")
                    .increment(1);
                tracing::error!(error = %e, "cannot write the audit file");
            }
        }
        if let Some(store) = &store {
            if pending.len() > MAX_PENDING_ROWS {
                let drop = pending.len() - MAX_PENDING_ROWS;
                pending.drain(..drop);
                metrics::counter!("keyward_audit_lost_total").increment(drop as u64);
                tracing::error!(
                    dropped = drop,
                    "the database has refused audit records for too long; oldest dropped from the table (they are in the audit file)"
                );
            }
            while !pending.is_empty() {
                let n = pending.len().min(5000);
                let rows: Vec<AuditRow> = pending.iter().take(n).cloned().collect();
                match store.insert_audit(&rows).await {
                    Ok(()) => {
                        pending.drain(..n);
                        if database_failing {
                            tracing::info!("audit records reach the database again");
                            database_failing = false;
                        }
                    }
                    Err(e) => {
                        metrics::counter!("keyward_audit_write_errors_total", "sink" => "database")
                            .increment(1);
                        if !database_failing {
                            tracing::error!(error = %e, "cannot write audit records to the database; retrying");
                            database_failing = true;
                        }
                        break;
                    }
                }
            }
        }
        drop(permits);
        let waited_on = !flushes.is_empty();
        for done in flushes {
            let _ = done.send(());
        }
        // Under load, let events gather for a moment instead of being woken
        // for every request (each wake is a cross-thread futex call on the
        // request path); a flush (shutdown, GET /v1/audit) is not delayed.
        if pace && !waited_on && !rx.is_empty() {
            tokio::time::sleep(PACE).await;
        }
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
        if crate::tls::hex(&sha256(&hashed)) != stated {
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

    fn sample(op: &str) -> AuditRecord {
        AuditRecord {
            time: "2026-01-01T00:00:00.000Z".into(),
            operation: op.into(),
            outcome: "ok".into(),
            actor: "system".into(),
            ..AuditRecord::default()
        }
    }

    fn chain_of(n: usize) -> Vec<String> {
        let mut chain = Chain::new();
        (0..n)
            .map(|i| chain.seal(sample(&format!("op{i}"))))
            .collect()
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
        let mut forged: AuditRecord = serde_json::from_str(&lines[1]).unwrap();
        forged.operation = "forged".into();
        let mut chain = Chain::new();
        chain.seq = 1;
        chain.prev = forged.prev.clone();
        let mut rehashed = lines.clone();
        rehashed[1] = chain.seal(forged);
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
            writeln!(file, "{}", chain.seal(sample(&format!("a{i}")))).unwrap();
        }
        drop(file);
        let (mut file, mut chain) = open_file(&path).unwrap();
        assert_eq!(chain.seq, 3);
        writeln!(file, "{}", chain.seal(sample("b"))).unwrap();
        let report = verify(std::io::BufReader::new(std::fs::File::open(&path).unwrap())).unwrap();
        assert_eq!((report.records, report.last_seq), (4, Some(4)));
    }
}
