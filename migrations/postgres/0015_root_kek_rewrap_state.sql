-- A root-KEK rotation's state, visible to every replica: why the last re-wrap
-- of a retiring KEK's versions stopped (NULL: it did not, or it finished).
ALTER TABLE root_keks ADD COLUMN rewrap_error TEXT;

-- A destroyed version holds no wrapped key, so it needs no root KEK: versions
-- destroyed before this release kept the name of theirs, which pinned a
-- retiring KEK for good and stopped every later root-KEK rotation.
UPDATE encryption_key_versions SET kek_id = NULL WHERE wrapped_key IS NULL;
