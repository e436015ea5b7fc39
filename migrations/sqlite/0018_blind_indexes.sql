-- Blind indexes (docs/search.md): per encryption, named indexes whose values
-- are HMAC-SHA256 of a normalised plaintext, truncated to `bits` bits, under a
-- key derived from one of the encryption's key versions (the version's
-- "anchor"). Nothing secret is stored here: the index keys are derived, on
-- use, from data keys that stay wrapped in encryption_key_versions.
--
-- `normalizations`: the comma-separated steps applied, in order, before the
-- HMAC (trim, casefold, nfkc, digits), declared once so that every caller
-- computes the same value. `active_version`: the index version new values are
-- computed under; versions from `min_version` to `active_version` are live
-- (lookups may ask for all of them), older ones retired.
CREATE TABLE blind_indexes (
    encryption_id   TEXT NOT NULL REFERENCES encryptions(id),
    name            TEXT NOT NULL,
    bits            BIGINT NOT NULL CHECK (bits BETWEEN 1 AND 256),
    normalizations  TEXT NOT NULL,
    active_version  BIGINT NOT NULL,
    min_version     BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    PRIMARY KEY (encryption_id, name),
    CHECK (min_version BETWEEN 1 AND active_version)
);

-- One row per index version: which key version's data key its key is derived
-- from. A key version anchoring a live index version cannot be destroyed
-- (the destroy guard reads this through the index below).
CREATE TABLE blind_index_versions (
    encryption_id      TEXT NOT NULL,
    name               TEXT NOT NULL,
    version            BIGINT NOT NULL,
    anchor_version_id  TEXT NOT NULL REFERENCES encryption_key_versions(id),
    created_at         BIGINT NOT NULL,
    PRIMARY KEY (encryption_id, name, version),
    FOREIGN KEY (encryption_id, name) REFERENCES blind_indexes(encryption_id, name)
);
CREATE INDEX blind_index_versions_by_anchor ON blind_index_versions (anchor_version_id);
