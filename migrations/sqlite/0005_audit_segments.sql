-- The audit log's table copy, one row per batch of records instead of one per
-- record: at tens of thousands of operations a second, a row and three index
-- entries per record were the most expensive thing the service did.
--
-- A segment is what the audit writer wrote in one go (at most 1,000 records):
-- `records` holds their JSON lines exactly as in the audit file, hash chain
-- included, newline-terminated, in chain order; `first_ms`/`last_ms` bound
-- their times. `audit_segment_keys` lists each tenant, encryption and
-- operation that occurs in a segment, so `GET /v1/audit` visits only segments
-- that can match and then checks each of their records. No plaintext,
-- ciphertext, key or secret is ever part of a record.
CREATE TABLE audit_segments (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    first_ms  INTEGER NOT NULL,
    last_ms   INTEGER NOT NULL,
    records   TEXT NOT NULL
);
-- `from` filters (records at or after a time) without a full scan.
CREATE INDEX audit_segments_by_time ON audit_segments (last_ms);

-- kind: 'tenant' | 'encryption' | 'operation'. The primary key serves the
-- filtered reads newest first (kind, value, segment id descending).
CREATE TABLE audit_segment_keys (
    kind        TEXT NOT NULL,
    value       TEXT NOT NULL,
    segment_id  INTEGER NOT NULL,
    PRIMARY KEY (kind, value, segment_id)
) WITHOUT ROWID;

-- Earlier records: one segment each, keeping their ids (read cursors are
-- positions: id * 1024 + line).
INSERT INTO audit_segments (id, first_ms, last_ms, records)
    SELECT id, time_ms, time_ms, record || char(10) FROM audit_log;
INSERT INTO audit_segment_keys (kind, value, segment_id)
    SELECT 'tenant', tenant_id, id FROM audit_log WHERE tenant_id IS NOT NULL;
INSERT INTO audit_segment_keys (kind, value, segment_id)
    SELECT 'encryption', encryption_id, id FROM audit_log WHERE encryption_id IS NOT NULL;
INSERT INTO audit_segment_keys (kind, value, segment_id)
    SELECT 'operation', operation, id FROM audit_log;
DROP TABLE audit_log;
