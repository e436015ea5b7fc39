-- Rotation policies and per-version use counts (the same in both flavours).

-- How many encryptions each version has made, summed over every replica. Each
-- process counts in memory and adds its count here in batches, so the hot path
-- makes no write; a crash loses at most one flush interval of counts, far
-- inside the margin between the rotation bound (2^31) and the 2^32 messages
-- NIST allows per key with random 96-bit nonces.
ALTER TABLE encryption_key_versions ADD COLUMN encrypt_count BIGINT NOT NULL DEFAULT 0;

-- Rotate automatically once the active version is this old (NULL: never).
ALTER TABLE encryptions ADD COLUMN auto_rotate_period_ms BIGINT;

-- Versions numbered below this no longer decrypt (as Vault Transit's
-- min_decryption_version); 1 allows every version.
ALTER TABLE encryptions ADD COLUMN min_decryption_version BIGINT NOT NULL DEFAULT 1;

-- The rotation scheduler looks for platform encryptions with a period.
CREATE INDEX encryptions_with_period ON encryptions (auto_rotate_period_ms) WHERE auto_rotate_period_ms IS NOT NULL;
