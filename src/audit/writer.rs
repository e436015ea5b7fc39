//! The writer: [`AuditLog`] queues events; one task seals their records into
//! the chain, appends the lines to the file (or standard output) and hands
//! segments to the table task.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::chain::{hex32, parse_sealed, Chain};
use super::checkpoint::{self, Checkpoint};
use super::record::{AuditEvent, TextCache};
use super::table::TableShared;
use crate::crypto::CheckpointKey;
use crate::store::{AuditSegment, Store};

/// How many events may wait for the writer before requests wait for room.
const QUEUE: usize = 8_192;
/// How many bytes queued events may hold, counting the lines they become
/// (see [`AuditEvent::queued_bytes`]), before requests wait for room: the
/// queue's memory is bounded in bytes, whatever the events are.
pub const QUEUE_BYTES: usize = 8 << 20;
/// The writer's line buffer is given back when a burst left it larger.
const KEEP_LINES_CAPACITY: usize = 1 << 20;
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

/// Where audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// Standard output (the default for `serve`; logs go to standard error).
    Stdout,
    /// Appended to this file (created with mode 0600).
    File(PathBuf),
    /// Only the database's audit table: the operator CLI's commands, whose
    /// records must not fork the chain of the file a running server writes.
    TableOnly,
}

/// When the writer signs a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointSettings {
    /// After this many records not yet covered by one.
    pub every_records: u64,
    /// Or once the oldest record not yet covered is this old.
    pub every: Duration,
}

impl Default for CheckpointSettings {
    fn default() -> Self {
        CheckpointSettings {
            every_records: 1000,
            every: Duration::from_secs(10),
        }
    }
}

/// Where the writer gets the checkpoint key: the active root KEK's, or `None`
/// while the root keys are not loaded.
pub type CheckpointKeySource = Box<dyn Fn() -> Option<Arc<CheckpointKey>> + Send + Sync>;

// Events are held inline (boxing them would be an allocation per request);
// flushes are rare.
#[allow(clippy::large_enum_variant)]
enum Message {
    /// An event with its share of the record budget, released once written.
    Event(AuditEvent, OwnedSemaphorePermit),
    Flush(oneshot::Sender<()>),
    /// A flush that also signs a final checkpoint (shutdown).
    Close(oneshot::Sender<()>),
}

/// The handle requests use to record events. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Message>,
    /// Bytes queued and not yet written, at most [`QUEUE_BYTES`]: memory is
    /// bounded in bytes, not in requests or records.
    budget: Arc<Semaphore>,
    /// Set once, when the service that holds the root keys exists.
    keys: Arc<OnceLock<CheckpointKeySource>>,
    /// The size at which the audit file is rotated (0: never).
    rotate_at: Arc<AtomicU64>,
    /// The table's queue, for its backlog gauge.
    table: Option<Arc<TableShared>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditLog")
    }
}

impl AuditLog {
    /// Opens the destination and starts the writer. A file's chain continues
    /// from its last record. Checkpoints are signed once
    /// [`AuditLog::sign_checkpoints_with`] has given a key.
    pub fn start(
        destination: &Destination,
        store: Option<Store>,
        checkpoints: CheckpointSettings,
    ) -> anyhow::Result<AuditLog> {
        let (sink, chain, file) = match destination {
            Destination::Stdout => (
                Sink::Stdout(std::io::stdout()),
                Chain::new(),
                FileState::default(),
            ),
            Destination::TableOnly => (Sink::Nowhere, Chain::new(), FileState::default()),
            Destination::File(path) => {
                let (file, chain, state) = open_file(path).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot open the audit file {} (KEYWARD_AUDIT_FILE): {e}",
                        path.display()
                    )
                })?;
                (Sink::File(file, path.clone()), chain, state)
            }
        };
        let table = store.map(TableShared::start).transpose()?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let keys = Arc::new(OnceLock::new());
        let signer = Signer {
            settings: checkpoints,
            keys: keys.clone(),
            file,
            last_at: tokio::time::Instant::now(),
            announced: None,
        };
        let rotate_at = Arc::new(AtomicU64::new(0));
        tokio::spawn(write_loop(
            rx,
            sink,
            chain,
            signer,
            table.clone(),
            rotate_at.clone(),
        ));
        Ok(AuditLog {
            tx,
            budget: Arc::new(Semaphore::new(QUEUE_BYTES)),
            keys,
            rotate_at,
            table,
        })
    }

    /// Bytes of events queued for the writer now (at most [`QUEUE_BYTES`]).
    pub fn queued_bytes(&self) -> usize {
        QUEUE_BYTES.saturating_sub(self.budget.available_permits())
    }

    /// Bytes of lines written to the file and waiting for the table (at most
    /// the table's `MAX_PENDING_BYTES`); 0 without a table.
    pub fn table_backlog_bytes(&self) -> usize {
        self.table.as_ref().map_or(0, |t| t.backlog_bytes())
    }

    /// Rotates the audit file (not standard output) once it reaches `bytes`
    /// (`audit_file_max_bytes`; `None`: never), after the write that took it
    /// there: see [`rotated_name`].
    pub fn rotate_file_at(&self, bytes: Option<u64>) {
        self.rotate_at.store(bytes.unwrap_or(0), Ordering::Relaxed);
    }

    /// Signs checkpoints with the key `source` gives (at each checkpoint, so
    /// that a root-KEK rotation changes the key). Only the first call counts.
    pub fn sign_checkpoints_with(&self, source: CheckpointKeySource) {
        let _ = self.keys.set(source);
    }

    /// Writes out everything queued before this call, then a checkpoint
    /// covering it (reason `shutdown`), and waits as [`AuditLog::flush`]
    /// does.
    pub async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Message::Close(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// The event's share of [`QUEUE_BYTES`] (all of it at most).
    fn cost_of(event: &AuditEvent) -> u32 {
        event.queued_bytes().clamp(1, QUEUE_BYTES) as u32
    }

    /// Queues an event. Waits only when the queue is full.
    pub async fn record(&self, event: AuditEvent) {
        let n = Self::cost_of(&event);
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
            .try_acquire_many_owned(Self::cost_of(&event))
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
    File(std::fs::File, PathBuf),
    /// No lines: the table has the records.
    Nowhere,
}

impl Sink {
    /// The file's length, when it is a file (to notice a truncation).
    fn len(&self) -> Option<u64> {
        match self {
            Sink::Stdout(_) | Sink::Nowhere => None,
            Sink::File(file, _) => file.metadata().ok().map(|m| m.len()),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout(out) => {
                let mut out = out.lock();
                out.write_all(bytes)?;
                out.flush()
            }
            Sink::File(file, _) => file.write_all(bytes),
            Sink::Nowhere => Ok(()),
        }
    }
}

/// What the writer knows of its file beyond the chain's end.
#[derive(Debug, Default, PartialEq)]
struct FileState {
    /// The `seq` and `prev` of the file's first record (`None` before it).
    start: Option<(u64, [u8; 32])>,
    /// The last `seq` a checkpoint in the file covers.
    covered: u64,
    /// How long the file is after the writer's last write: shorter later
    /// means it was truncated (`copytruncate` log rotation).
    len: u64,
}

/// Checkpoints: when to sign one, with what, and what the file holds.
struct Signer {
    settings: CheckpointSettings,
    keys: Arc<OnceLock<CheckpointKeySource>>,
    file: FileState,
    /// When the last checkpoint was signed, or signing was last tried.
    last_at: tokio::time::Instant,
    /// The key id last logged.
    announced: Option<String>,
}

impl Signer {
    /// When the next checkpoint is due by time, if records wait for one.
    fn due(&self, chain: &Chain) -> Option<tokio::time::Instant> {
        (chain.seq > self.file.covered).then(|| self.last_at + self.settings.every)
    }

    /// Appends a checkpoint line covering the chain's end to `out` when one
    /// is due (or `closing`) and a key is available.
    fn maybe_sign(&mut self, chain: &mut Chain, closing: bool, out: &mut String) {
        let waiting = chain.seq.saturating_sub(self.file.covered);
        let now = tokio::time::Instant::now();
        let due = closing
            || waiting >= self.settings.every_records
            || now >= self.last_at + self.settings.every;
        if waiting == 0 || !due {
            return;
        }
        // Tried now: without a key, the next try is an interval later rather
        // than at every wake-up.
        self.last_at = now;
        self.sign(chain, if closing { "shutdown" } else { "interval" }, out);
    }

    /// Appends a checkpoint line covering the chain's end to `out`, for
    /// `reason`; whether a key was available to sign it.
    fn sign(&mut self, chain: &mut Chain, reason: &str, out: &mut String) -> bool {
        let Some(key) = self.keys.get().and_then(|source| source()) else {
            return false;
        };
        if self.announced.as_deref() != Some(key.id()) {
            tracing::info!(
                key_id = key.id(),
                public_key = %crate::crypto::hex(key.public_key()),
                "audit checkpoints are signed with this key (verify with `keyward audit verify --public-key`)"
            );
            self.announced = Some(key.id().to_string());
        }
        let (start_seq, start_prev) = match &self.file.start {
            Some((seq, prev)) => (*seq, crate::crypto::hex(prev)),
            None => (chain.seq + 1, chain.prev_hex()),
        };
        let hash = chain.prev_hex();
        let time = crate::domain::time::rfc3339(crate::domain::time::now_ms());
        if chain.needs_newline {
            // The file ended mid-line (a crash) and no record came since.
            out.push('\n');
            chain.needs_newline = false;
        }
        Checkpoint {
            seq: chain.seq,
            hash: hash.as_str(),
            file_start: start_seq,
            file_start_prev: start_prev.as_str(),
            time: &time,
            reason,
            key_id: key.id(),
        }
        .write_signed(&key, out);
        out.push('\n');
        self.file.covered = chain.seq;
        true
    }
}

/// The name a file starting at record `start_seq` is rotated to: `FILE.SEQ`,
/// 20 digits, so that a directory listing is in chain order.
pub fn rotated_name(path: &Path, start_seq: u64) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{start_seq:020}"));
    PathBuf::from(name)
}

/// Rotates the audit file once it has reached `limit` bytes: signs a
/// checkpoint covering the chain's end (reason `rotate`) at its end, renames
/// it to [`rotated_name`], and starts a new file at `path` with the same
/// checkpoint as its first line, so that each file verifies alone and the
/// chain runs on from one to the next. Without a checkpoint key yet, or on
/// any file error, the writer stays in the file it has (and says why).
fn rotate(file: &mut std::fs::File, path: &Path, chain: &mut Chain, signer: &mut Signer) {
    let Some(start_seq) = signer.file.start.as_ref().map(|(seq, _)| *seq) else {
        return; // No record in this file yet.
    };
    let mut line = String::new();
    if !signer.sign(chain, "rotate", &mut line) {
        return;
    }
    if let Err(e) = file.write_all(line.as_bytes()) {
        tracing::error!(error = %e, "cannot write the audit file");
        return;
    }
    signer.file.len += line.len() as u64;
    let rotated = rotated_name(path, start_seq);
    if rotated.exists() {
        tracing::error!(file = %rotated.display(), "cannot rotate the audit file: the rotated file's name is taken; writing on");
        return;
    }
    if let Err(e) = std::fs::rename(path, &rotated) {
        tracing::error!(error = %e, file = %path.display(), "cannot rotate the audit file; writing on");
        return;
    }
    let opened = crate::owner_only::owner_only_options()
        .append(true)
        .create(true)
        .open(path)
        .and_then(|mut new| new.write_all(line.as_bytes()).map(|()| new));
    match opened {
        Ok(new) => {
            *file = new;
            // The new file's first record states the hash it follows.
            chain.state_prev = true;
            signer.file = FileState {
                start: Some((chain.seq + 1, chain.prev)),
                covered: chain.seq,
                len: line.len() as u64,
            };
            tracing::info!(
                rotated = %rotated.display(),
                next_seq = chain.seq + 1,
                "audit file rotated; the chain continues in a new file"
            );
        }
        Err(e) => {
            // The handle still writes to the rotated file: records go on
            // there, chained, rather than nowhere.
            tracing::error!(error = %e, file = %path.display(), "cannot start a new audit file; writing on in the rotated one");
        }
    }
}

/// Opens `path` for appending (creating it, mode 0600) and reads the chain's
/// end from its last complete line (a record, or a checkpoint that covers
/// the last record), and where the file starts from its first line.
fn open_file(path: &Path) -> std::io::Result<(std::fs::File, Chain, FileState)> {
    let mut file = crate::owner_only::owner_only_options()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    let len = file.metadata()?.len();
    let mut chain = Chain::new();
    let mut state = FileState {
        len,
        ..FileState::default()
    };
    if len > 0 {
        file.seek(SeekFrom::Start(0))?;
        let mut head = Vec::new();
        (&mut file).take(64 * 1024).read_to_end(&mut head)?;
        let first = head.split(|b| *b == b'\n').next().unwrap_or_default();
        state.start = if checkpoint::is_checkpoint(first) {
            // A file that starts with a checkpoint (a rotated file's
            // successor) starts with the record after the one it covers.
            checkpoint::parse(first)
                .ok()
                .and_then(|c| hex32(&c.checkpoint.hash).map(|hash| (c.checkpoint.seq + 1, hash)))
        } else {
            // A first record states its `prev` (v1: every record does; v2:
            // the first of a file), or follows the genesis.
            // A v2 record past the first without one (a head cut, or the
            // copytruncate race) leaves the start unknown, never genesis.
            parse_sealed(first).ok().and_then(|r| match r.prev {
                Some(prev) => Some((r.seq, prev)),
                None if r.seq == 1 => Some((1, [0; 32])),
                None => None,
            })
        };
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
        let end = match last {
            Some(l) if checkpoint::is_checkpoint(l) => checkpoint::parse(l)
                .ok()
                .and_then(|c| hex32(&c.checkpoint.hash).map(|hash| (c.checkpoint.seq, hash, true))),
            // A v1 line too: a file written before format v2 continues in v2.
            Some(l) => parse_sealed(l).ok().map(|r| (r.seq, r.hash, false)),
            None => None,
        };
        match end {
            Some((seq, hash, covered)) => {
                chain.seq = seq;
                chain.prev = hash;
                if covered {
                    state.covered = seq;
                }
            }
            None => {
                tracing::warn!(
                    file = %path.display(),
                    "the audit file's last line is not an audit record; starting a new chain (verify will report the break)"
                );
                // The new chain's first record starts what verify can check.
                state.start = None;
            }
        }
    }
    Ok((file, chain, state))
}

/// `line` (format v2, without `prev`) with `"prev"` stated before its `h`,
/// into `out` (cleared first).
fn stating_prev(line: &str, prev: &[u8; 32], out: &mut String) {
    out.clear();
    // The line ends in `,"h":"` + 43 characters + `"}`.
    let cut = line.len().saturating_sub(51);
    let (body, hash) = (
        line.get(..cut).unwrap_or(line),
        line.get(cut..).unwrap_or(""),
    );
    let mut buf = [0; 43];
    out.push_str(body);
    out.push_str(",\"prev\":\"");
    out.push_str(crate::domain::ids::compact_bytes(prev, &mut buf).unwrap_or_default());
    out.push('"');
    out.push_str(hash);
}

/// The writer: seals records into the chain, appends them to the file, and
/// hands segments to the table task.
async fn write_loop(
    mut rx: mpsc::Receiver<Message>,
    mut sink: Sink,
    mut chain: Chain,
    mut signer: Signer,
    table: Option<Arc<TableShared>>,
    rotate_at: Arc<AtomicU64>,
) {
    let mut messages = Vec::with_capacity(BATCH);
    // The segment being filled, and when it goes to the table even if not
    // full.
    let mut current: Option<AuditSegment> = None;
    let mut current_due: Option<tokio::time::Instant> = None;
    // The lines of one batch, reused from batch to batch.
    let mut out = String::new();
    // A segment's first line with its `prev`, reused.
    let mut first_line = String::new();
    let mut texts = TextCache::default();
    // Whether the last write to the file failed.
    let mut file_failing = false;
    loop {
        let wake = match (current_due, signer.due(&chain)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let received = match wake {
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
        let mut closing = false;
        // Where this batch starts the chain: where the file starts if it is
        // new or was truncated.
        let batch_start = (chain.seq + 1, chain.prev);
        if received == usize::MAX || messages.iter().any(|m| !matches!(m, Message::Flush(_))) {
            // Before the lines are made: the first record written into a
            // truncated file states the hash it follows.
            let len = sink.len();
            if len.is_some_and(|len| len < signer.file.len) {
                // Truncated under us (`copytruncate`): the file now starts
                // here, and the chain continues in it.
                tracing::info!(
                    seq = batch_start.0,
                    "the audit file was truncated (log rotation); the chain continues in it"
                );
                signer.file.start = None;
                chain.state_prev = true;
            }
            if let Some(len) = len {
                signer.file.len = len;
            }
        }
        for message in messages.drain(..) {
            match message {
                Message::Flush(done) => flushes.push(done),
                Message::Close(done) => {
                    closing = true;
                    flushes.push(done);
                }
                Message::Event(event, permit) => {
                    permits.push(permit);
                    event.for_each_record(&mut texts, |record| {
                        let (follows, stated) = (chain.prev, chain.state_prev);
                        let line = chain.append(record, event.time_ms, &mut out);
                        records += 1;
                        let Some(table) = &table else {
                            return;
                        };
                        let segment = current.get_or_insert_with(|| {
                            started = true;
                            let mut segment = AuditSegment::default();
                            segment.lines = table.spare_lines();
                            segment
                        });
                        let mut text = &out[line];
                        if segment.records == 0 && !stated {
                            // A segment's first line states the hash it
                            // follows, so that a read of the table gives
                            // every record its `prev` from its own segment
                            // (the hash does not cover `prev`: the line
                            // still verifies).
                            stating_prev(text, &follows, &mut first_line);
                            text = &first_line;
                        }
                        segment.push(
                            event.time_ms,
                            text,
                            record.tenant_id,
                            record.encryption_id,
                            event.operation,
                        );
                        if segment.is_full() {
                            full.extend(current.take());
                        }
                    });
                }
            }
        }
        if records > 0 && signer.file.start.is_none() {
            signer.file.start = Some(batch_start);
        }
        signer.maybe_sign(&mut chain, closing, &mut out);
        if !out.is_empty() {
            metrics::counter!("keyward_audit_records_total").increment(records);
            match sink.write(out.as_bytes()) {
                Ok(()) => {
                    signer.file.len += out.len() as u64;
                    if std::mem::take(&mut file_failing) {
                        tracing::info!("the audit file is written again");
                    }
                }
                Err(e) => {
                    metrics::counter!("keyward_audit_write_errors_total", "sink" => "file")
                        .increment(1);
                    // These records are lost from the file. The next one
                    // states its `prev`, so that the chain can be checked
                    // again from it (format v2 states it only there), and
                    // starts on a line of its own after whatever part of
                    // this batch did reach the file.
                    chain.state_prev = true;
                    if let Some(now) = sink.len().filter(|now| *now > signer.file.len) {
                        chain.needs_newline = true;
                        signer.file.len = now;
                    }
                    // Once per outage: a full disk fails every batch, and a
                    // line per batch would fill what is left of it (often the
                    // same disk) with the news.
                    if !std::mem::replace(&mut file_failing, true) {
                        tracing::error!(error = %e, "cannot write the audit file; records are lost from it until it can be written again (counted in keyward_audit_write_errors_total)");
                    }
                }
            }
        }
        let limit = rotate_at.load(Ordering::Relaxed);
        if limit > 0 && signer.file.len >= limit {
            if let Sink::File(file, path) = &mut sink {
                rotate(file, path, &mut chain, &mut signer);
            }
        }
        drop(permits);
        if out.capacity() > KEEP_LINES_CAPACITY {
            out = String::new();
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::tests::{sample, seal};
    use crate::audit::verify;

    #[test]
    fn a_file_continues_its_chain_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (mut file, mut chain, _) = open_file(&path).unwrap();
        for i in 0..3 {
            writeln!(file, "{}", seal(&mut chain, &sample(&format!("a{i}")))).unwrap();
        }
        drop(file);
        let (mut file, mut chain, state) = open_file(&path).unwrap();
        assert_eq!((chain.seq, state.start), (3, Some((1, [0; 32]))));
        let line = seal(&mut chain, &sample("b"));
        // The first record a writer writes into a file states its `prev`.
        assert!(line.contains("\"prev\":\""), "{line}");
        writeln!(file, "{line}").unwrap();
        let report = verify(
            std::io::BufReader::new(std::fs::File::open(&path).unwrap()),
            &[],
        )
        .unwrap();
        assert_eq!((report.records, report.last_seq), (4, Some(4)));
    }

    #[test]
    fn a_file_of_format_v1_continues_in_format_v2_after_a_restart() {
        use crate::audit::chain::tests::seal_v1;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (mut file, mut chain, _) = open_file(&path).unwrap();
        let mut v1 = Vec::new();
        for i in 0..3 {
            let line = seal_v1(&mut chain, &sample(&format!("a{i}")));
            writeln!(file, "{line}").unwrap();
            v1.push(line);
        }
        drop(file);
        let last_v1 = crate::audit::AuditRecord::from_line(&v1[2], None).unwrap();
        let (mut file, mut chain, state) = open_file(&path).unwrap();
        assert_eq!(chain.seq, 3);
        assert_eq!(chain.prev_hex(), last_v1.hash.unwrap());
        assert_eq!(state.start, Some((1, [0; 32])));
        for i in 0..2 {
            writeln!(file, "{}", seal(&mut chain, &sample(&format!("b{i}")))).unwrap();
        }
        drop(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[3].starts_with("{\"v\":2,\"seq\":4,") && lines[3].contains("\"prev\""));
        assert!(!lines[4].contains("\"prev\""));
        let report = verify(text.as_bytes(), &[]).unwrap();
        assert_eq!((report.records, report.last_seq), (5, Some(5)));
        // And a v2 file continues in v2.
        let (_, chain, _) = open_file(&path).unwrap();
        assert_eq!(Some(chain.prev_hex()), report.last_hash);
    }

    /// A log writing to the file `path` that signs checkpoints, and the
    /// public key that checks them.
    fn signing_file_log(path: &Path) -> (AuditLog, [u8; crate::crypto::CHECKPOINT_PUBLIC_KEY_LEN]) {
        let log = AuditLog::start(
            &Destination::File(path.to_path_buf()),
            None,
            CheckpointSettings::default(),
        )
        .unwrap();
        let key = Arc::new(CheckpointKey::derive(
            &crate::crypto::DataKey::from_slice(&[5; 32]).unwrap(),
        ));
        let public = *key.public_key();
        log.sign_checkpoints_with(Box::new(move || Some(key.clone())));
        (log, public)
    }

    #[tokio::test]
    async fn the_file_rotates_by_size_and_the_files_verify_as_one_chain() {
        use crate::audit::record::{Actor, AuditEvent};
        use crate::audit::{verify_files, BreakKind, VerifyError};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (log, public) = signing_file_log(&path);
        log.rotate_file_at(Some(1500));
        for i in 0..40 {
            let event = AuditEvent {
                time_ms: 1_780_000_000_000 + i,
                operation: "encrypt",
                actor: Actor::System,
                ..AuditEvent::default()
            };
            log.record(event).await;
            if i % 4 == 3 {
                log.flush().await;
            }
        }
        log.close().await;
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        assert!(files.len() >= 4, "{files:?}");
        assert_eq!(files[0], path, "the current file sorts first");
        assert_eq!(files[1], rotated_name(&path, 1), "{files:?}");
        let open = |f: &PathBuf| {
            let name = f.display().to_string();
            (
                name,
                std::io::BufReader::new(std::fs::File::open(f).unwrap()),
            )
        };
        // Each file verifies alone, covered from its first line to its last.
        for f in &files {
            let report = verify(open(f).1, &[public]).unwrap();
            assert_eq!(report.uncovered, None, "{f:?}: {report:?}");
            assert!(report.records > 0 || *f == path, "{f:?}");
        }
        // Together, in any order: one chain of every record.
        for set in [files.clone(), files.iter().rev().cloned().collect()] {
            let report = verify_files(set.iter().map(open).collect(), &[public]).unwrap();
            assert_eq!(
                (report.records, report.first_seq, report.last_seq),
                (40, Some(1), Some(40))
            );
            assert_eq!((report.covered_to, report.uncovered), (Some(40), None));
        }
        // A rotated file missing from the middle is a cut, named.
        let mut gap = files.clone();
        let missing = gap.remove(2);
        match verify_files(gap.iter().map(open).collect(), &[public]) {
            Err((name, VerifyError::Broken(b))) => {
                assert_eq!(b.kind, BreakKind::HeadCut, "{b}");
                assert!(b.reason.contains("missing between"), "{b}");
                assert_ne!(name, missing.display().to_string());
            }
            other => panic!("{other:?}"),
        }
        // A restart continues the chain in the current file.
        let log = AuditLog::start(
            &Destination::File(path.clone()),
            None,
            CheckpointSettings::default(),
        )
        .unwrap();
        log.record(AuditEvent {
            time_ms: 1_780_000_000_100,
            operation: "decrypt",
            actor: Actor::System,
            ..AuditEvent::default()
        })
        .await;
        log.flush().await;
        let report = verify_files(files.iter().map(open).collect(), &[]).unwrap();
        assert_eq!((report.records, report.last_seq), (41, Some(41)));
    }

    #[tokio::test]
    async fn after_copytruncate_the_new_file_verifies_alone_and_joined_to_the_copy() {
        use crate::audit::record::{Actor, AuditEvent};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let (log, public) = signing_file_log(&path);
        let event = |i: i64| AuditEvent {
            time_ms: 1_780_000_000_000 + i,
            operation: "encrypt",
            actor: Actor::System,
            ..AuditEvent::default()
        };
        for i in 0..3 {
            log.record(event(i)).await;
        }
        log.flush().await;
        // logrotate's copytruncate: copy, then truncate in place.
        let old = std::fs::read_to_string(&path).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        for i in 3..5 {
            log.record(event(i)).await;
        }
        log.close().await;
        let new = std::fs::read_to_string(&path).unwrap();
        // The new file's first record states the hash it follows.
        let first = new.lines().next().unwrap();
        assert!(
            first.starts_with("{\"v\":2,\"seq\":4,") && first.contains("\"prev\":\""),
            "{new}"
        );
        let alone = verify(new.as_bytes(), &[public]).unwrap();
        assert_eq!(
            (alone.first_seq, alone.last_seq, alone.uncovered),
            (Some(4), Some(5), None)
        );
        let joined = verify(format!("{old}{new}").as_bytes(), &[public]).unwrap();
        assert_eq!(
            (joined.records, joined.covered_to, joined.uncovered),
            (5, Some(5), None)
        );
    }

    #[tokio::test]
    async fn a_batch_of_a_thousand_items_on_one_key_is_one_short_record() {
        use crate::audit::record::{Actor, AuditEvent, ItemGroup, Target};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::start(
            &Destination::File(path.clone()),
            None,
            CheckpointSettings::default(),
        )
        .unwrap();
        let event = |targets| AuditEvent {
            time_ms: 1_780_000_000_000,
            operation: "encrypt",
            status: Some(200),
            // What the edge generates when the client sends none.
            request_id: Some(uuid::Uuid::new_v4().to_string().as_str().into()),
            // A tenant's API key, which names its tenant.
            actor: Actor::ApiKey(Arc::new(crate::domain::apikeys::ApiKeyRecord {
                key_id: "kw_3c8e0d1f2a4b5c6d7e8f9a0b".into(),
                tenant_id: Some(crate::domain::TenantId::new_random()),
                secret_sha256: [0; 32],
                scopes: crate::domain::apikeys::Scopes::tenant_all(),
                cert_spki_sha256: None,
            })),
            peer: Some("10.1.2.3".parse().unwrap()),
            targets,
            ..AuditEvent::default()
        };
        let target = |items| Target {
            encryption_id: Some(crate::domain::EncryptionId::new_random()),
            version_id: Some(crate::domain::VersionId::new_random()),
            items,
            ..Target::default()
        };
        let single = event(vec![target(None)]);
        let batch = event(vec![target(Some(ItemGroup {
            count: 1000,
            ..ItemGroup::default()
        }))]);
        // The file's first record also states the hash it follows (the
        // genesis): the typical record is the one after it.
        log.record(single.clone()).await;
        log.flush().await;
        let first_bytes = std::fs::metadata(&path).unwrap().len();
        log.record(single).await;
        log.flush().await;
        let single_bytes = std::fs::metadata(&path).unwrap().len() - first_bytes;
        log.record(batch).await;
        log.flush().await;
        let batch_bytes = std::fs::metadata(&path).unwrap().len() - first_bytes - single_bytes;
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        // A request's record, with every id a request has (issue #25: at
        // most 300 bytes; 533 in format v1).
        assert!(single_bytes <= 300, "{single_bytes}: {text}");
        assert!(first_bytes <= single_bytes + 60, "{first_bytes}");
        assert!(batch_bytes < single_bytes + 16, "{batch_bytes}");
        println!(
            "audit bytes: single request {single_bytes}, batch of 1000 {batch_bytes} ({:.2} per item)",
            batch_bytes as f64 / 1000.0
        );
    }
}
