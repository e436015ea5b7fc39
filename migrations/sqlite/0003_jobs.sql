-- Re-encryption jobs: walks over a table in the platform's database that move
-- every ciphertext to its encryption's active version.

CREATE TABLE jobs (
    id                    TEXT PRIMARY KEY,
    tenant_id             TEXT NOT NULL REFERENCES tenants(id),
    kind                  TEXT NOT NULL CHECK (kind IN ('reencrypt')),
    -- The one encryption of the table's rows, or NULL when the source names a
    -- column holding each row's encryption id.
    encryption_id         TEXT,
    -- The source (database URL with its credentials, table, columns) as JSON,
    -- sealed with AES-256-GCM under the root KEK named in source_kek_id, with
    -- the job id as associated data: credentials are never stored in the clear.
    source_sealed         BLOB NOT NULL,
    source_kek_id         TEXT NOT NULL,
    max_rows_per_second   INTEGER,
    state                 TEXT NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    -- Keyset position: the last key handled (as text), and the pass number.
    cursor                TEXT,
    pass                  INTEGER NOT NULL DEFAULT 0,
    processed             INTEGER NOT NULL DEFAULT 0,
    rewrapped             INTEGER NOT NULL DEFAULT 0,
    skipped               INTEGER NOT NULL DEFAULT 0,
    failed                INTEGER NOT NULL DEFAULT 0,
    total                 INTEGER,
    rows_per_second       INTEGER NOT NULL DEFAULT 0,
    -- {versionId: rows} still on an old version at the last scan.
    remaining_by_version  TEXT,
    error                 TEXT,
    -- One runner per job across replicas: a lease renewed while it works.
    lease_owner           TEXT,
    lease_until           INTEGER,
    started_at            INTEGER,
    finished_at           INTEGER,
    created_at            INTEGER NOT NULL,
    updated_at            INTEGER NOT NULL
);
CREATE INDEX jobs_by_tenant ON jobs (tenant_id, created_at);
CREATE INDEX jobs_runnable ON jobs (state) WHERE state IN ('queued', 'running');
