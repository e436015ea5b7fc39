-- When each version last changed state (the database's clock, Unix ms): a
-- version can be destroyed only once it has been disabled for the destroy
-- grace period. Versions that exist at the upgrade start their clock now, so a
-- version disabled moments before the upgrade still waits the whole period.
ALTER TABLE encryption_key_versions ADD COLUMN state_changed_at BIGINT;
UPDATE encryption_key_versions SET state_changed_at = CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER);
