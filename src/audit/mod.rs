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
//! Tamper evidence: each record ends in its hash, the SHA-256 of the hash of
//! the record before it and of the record's own line up to (not including)
//! its `prev` and `h` (format v2; v1 lines, still read, state `prev` on every
//! line and hash their JSON up to `hash`). Changing, removing, inserting or
//! reordering a record breaks the chain at that point, which [`verify`](fn@verify) (`keyward audit verify
//! FILE`) reports. Every so many records or seconds, and at shutdown, the
//! writer also signs a checkpoint (Ed25519, with a key derived from the
//! active root KEK; see `checkpoint.rs`) covering every record before it, so
//! that a chain recomputed without the key, a cut head and a cut tail show
//! too, with public keys only.
//!
//! Layout, each file importing only those listed before it:
//! - `record.rs`: [`AuditRecord`] and what requests hand over ([`AuditEvent`],
//!   [`Actor`], [`Target`]), and how an event becomes its records;
//! - `chain.rs`: the hash chain that numbers, links and seals records into
//!   lines;
//! - `checkpoint.rs`: the signed checkpoint lines;
//! - `verify.rs`: [`verify`](fn@verify), which checks a file's chain and
//!   checkpoints;
//! - `table.rs`: the table task and the queue it takes segments from;
//! - `retention.rs`: [`prune_table`], which deletes table segments past
//!   `audit_retention`;
//! - `writer.rs`: [`AuditLog`], the writer task and the audit file.

mod chain;
mod checkpoint;
mod record;
mod retention;
mod table;
mod verify;
mod writer;

pub use chain::GENESIS;
pub use checkpoint::Checkpoint;
pub use record::{
    read_records, Actor, AuditEvent, AuditRecord, ItemGroup, RequestId, Target, OPERATIONS,
};
pub use retention::prune_table;
pub use verify::{verify, verify_files, BreakKind, Broken, VerifyError, VerifyReport};
pub use writer::{
    rotated_name, AuditLog, CheckpointKeySource, CheckpointSettings, Destination, QUEUE_BYTES,
};
