-- The audit log's table copy: one row per audit record, written in batches by
-- the audit writer (never on a request's path). `record` is the JSON line
-- exactly as written to the audit file, hash chain included; the other columns
-- are copies of its fields for filtering. No plaintext, ciphertext, key or
-- secret is ever part of a record.
CREATE TABLE audit_log (
    id             BIGSERIAL PRIMARY KEY,
    time_ms        BIGINT NOT NULL,
    tenant_id      TEXT,
    encryption_id  TEXT,
    operation      TEXT NOT NULL,
    outcome        TEXT NOT NULL,
    request_id     TEXT,
    record         TEXT NOT NULL
);
CREATE INDEX audit_log_by_time ON audit_log (time_ms);
CREATE INDEX audit_log_by_encryption ON audit_log (encryption_id, id);
CREATE INDEX audit_log_by_tenant ON audit_log (tenant_id, id);
