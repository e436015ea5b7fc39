-- Job sources are named by the operator (configuration), and what a job found
-- is evidence for the destroy guard.
--
-- target: a digest of the job's source name, table, ciphertext and version
-- columns. The guard reads the last job per target, so that a later job over
-- another table cannot clear a version an earlier job found in use.
ALTER TABLE jobs ADD COLUMN target TEXT;
-- {encryptionId: {versionId | "unrecognized": rows}} at the end of the job,
-- the version active at that moment included: every encryption the job saw.
ALTER TABLE jobs ADD COLUMN rows_by_version TEXT;
-- When the job finished by the database's clock (finished_at is the replica's),
-- so that jobs finished on different replicas are ordered truly.
ALTER TABLE jobs ADD COLUMN finished_db_ms BIGINT;
CREATE INDEX jobs_evidence ON jobs (tenant_id, state, finished_db_ms);
