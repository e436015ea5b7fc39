//! The table copy: the writer queues full segments of lines, and a task of its
//! own stores them, so that the file never waits for the database.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::store::{AuditSegment, SegmentPacker, Store};

/// How long after a failed table write the table task tries again.
const TABLE_RETRY: Duration = Duration::from_secs(1);
/// The longest one table write may take before it counts as failed (a
/// database that hangs rather than refuses).
const TABLE_ATTEMPT: Duration = Duration::from_secs(30);
/// Most bytes of lines kept for the table while the database is unreachable
/// (they are in the file already); beyond, the oldest segments are dropped
/// from the table copy.
pub const MAX_PENDING_BYTES: usize = 16 << 20;
/// The line buffer the writer keeps for its next segment, if its capacity is
/// at most this (a full segment's lines fit).
const SPARE_LINES_CAPACITY: usize = 1024 * 1024;

/// Segments on their way to the table: the writer adds them, the table task
/// stores them. Kept apart so that the file never waits for the database.
#[derive(Default)]
struct TableQueue {
    /// Oldest first.
    segments: VecDeque<AuditSegment>,
    /// Records in `segments`.
    records: usize,
    /// Bytes of lines in `segments`.
    bytes: usize,
    /// Reads (and shutdown) waiting for what was queued before them.
    flushes: Vec<oneshot::Sender<()>>,
    /// A stored segment's line buffer, emptied, for the writer's next segment:
    /// a fresh buffer of hundreds of kilobytes came from pages the allocator
    /// had just given back, a page fault per 4 KiB.
    spare_lines: Option<String>,
    /// The writer has stopped: nothing more will come.
    closed: bool,
}

/// The queue, shared by the writer and the table task.
pub(super) struct TableShared {
    queue: std::sync::Mutex<TableQueue>,
    wake: tokio::sync::Notify,
}

impl TableShared {
    /// Starts the table task; the writer queues segments for it here.
    pub(super) fn start(store: Store) -> anyhow::Result<Arc<TableShared>> {
        let packer = SegmentPacker::new()
            .map_err(|e| anyhow::anyhow!("cannot start the audit table's compressor: {e}"))?;
        let shared = Arc::new(TableShared {
            queue: std::sync::Mutex::new(TableQueue::default()),
            wake: tokio::sync::Notify::new(),
        });
        tokio::spawn(table_loop(shared.clone(), store, packer));
        Ok(shared)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TableQueue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `segments` in order; beyond [`MAX_PENDING_BYTES`] the oldest
    /// are dropped from the table copy (they are in the file).
    pub(super) fn push(&self, segments: Vec<AuditSegment>) {
        let dropped = {
            let mut q = self.lock();
            q.records += segments.iter().map(|s| s.records).sum::<usize>();
            q.bytes += segments.iter().map(|s| s.lines.len()).sum::<usize>();
            q.segments.extend(segments);
            q.trim()
        };
        report_dropped(dropped);
        self.wake.notify_one();
    }

    /// Bytes of lines queued for the table.
    pub(super) fn backlog_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// The line buffer of a stored segment, emptied, or a new one.
    pub(super) fn spare_lines(&self) -> String {
        self.lock().spare_lines.take().unwrap_or_default()
    }

    /// Answers `done` once everything queued before it has been tried.
    pub(super) fn flush(&self, done: oneshot::Sender<()>) {
        self.lock().flushes.push(done);
        self.wake.notify_one();
    }

    /// The writer has stopped: the table task stores what is queued and ends.
    pub(super) fn close(&self) {
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
        self.bytes -= taken.iter().map(|s| s.lines.len()).sum::<usize>();
        taken
    }

    /// Puts segments taken with [`TableQueue::take_front`] back, in order,
    /// then trims; how many records the trim dropped.
    fn put_front(&mut self, segments: Vec<AuditSegment>) -> usize {
        self.records += segments.iter().map(|s| s.records).sum::<usize>();
        self.bytes += segments.iter().map(|s| s.lines.len()).sum::<usize>();
        for segment in segments.into_iter().rev() {
            self.segments.push_front(segment);
        }
        self.trim()
    }

    /// Drops the oldest segments beyond [`MAX_PENDING_BYTES`]; how many
    /// records went.
    fn trim(&mut self) -> usize {
        let mut dropped = 0;
        while self.bytes > MAX_PENDING_BYTES {
            let Some(oldest) = self.segments.pop_front() else {
                break;
            };
            self.records -= oldest.records;
            self.bytes -= oldest.lines.len();
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
        let (flushes, closed, queued) = {
            let mut q = shared.lock();
            (std::mem::take(&mut q.flushes), q.closed, q.segments.len())
        };
        // One round stores what was queued when it began, then answers the
        // reads that came meanwhile: a read waits for what was queued before
        // it, not for what keeps arriving after (under steady load the queue
        // never empties, and a read that waited for it to would time out).
        let limit = (!closed).then_some(queued);
        if failed_at.is_none_or(|at| at.elapsed() >= TABLE_RETRY) {
            failed_at = store_queued(&shared, &store, &mut packer, failed_at, limit).await;
        }
        for done in flushes {
            let _ = done.send(());
        }
        if closed {
            return;
        }
        if failed_at.is_none() && !shared.lock().segments.is_empty() {
            // Stopped at the read's limit: carry on with the rest at once.
            shared.wake.notify_one();
        }
    }
}

/// Stores the queued segments, 16 per transaction, until the queue is empty,
/// `limit` segments are stored, or an attempt fails. Returns when the last
/// attempt failed, or None; `failed_at` is the previous failure, so that an
/// outage is logged once.
async fn store_queued(
    shared: &TableShared,
    store: &Store,
    packer: &mut SegmentPacker,
    mut failed_at: Option<tokio::time::Instant>,
    limit: Option<usize>,
) -> Option<tokio::time::Instant> {
    let mut left = limit.unwrap_or(usize::MAX);
    loop {
        let mut batch = shared.lock().take_front(left.min(16));
        if batch.is_empty() {
            return failed_at;
        }
        left -= batch.len();
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
