-- Keyward schema, PostgreSQL flavour. The SQLite flavour in ../sqlite has the
-- same tables, columns and indexes; only type names differ (BYTEA for BLOB,
-- BIGINT for INTEGER, BIGSERIAL for AUTOINCREMENT). Timestamps are Unix milliseconds.

-- A tenant is the unit of isolation: every encryption and API key belongs to one,
-- and no request ever sees another tenant's rows.
CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    created_at  BIGINT NOT NULL
);

-- API keys. `id` is the public key id sent as X-Api-Key. The secret is a random
-- 256-bit value; only its SHA-256 digest is kept (a slow password hash would buy
-- nothing for random secrets and would dominate the request path).
-- `scopes` is a comma-separated subset of encrypt,decrypt,rotate,manage,admin.
-- `cert_spki_sha256` optionally binds the key to one client certificate.
-- Revoked keys stay for the record; `revoked_at` makes them unusable.
CREATE TABLE api_keys (
    id                TEXT PRIMARY KEY,
    tenant_id         TEXT NOT NULL REFERENCES tenants(id),
    secret_sha256     BYTEA NOT NULL,
    scopes            TEXT NOT NULL,
    cert_spki_sha256  BYTEA,
    created_at        BIGINT NOT NULL,
    revoked_at        BIGINT
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id);

-- Root key-encryption keys: 32 random bytes each, stored only wrapped by the
-- master key, with the name of the provider that wrapped it. One is `active`
-- (wraps new key versions); others are `retiring` while a KEK rotation re-wraps
-- the versions that still name them. The wrapped key doubles as the key-check
-- value: a wrong master key fails to unwrap it at start.
CREATE TABLE root_keks (
    id           TEXT PRIMARY KEY,
    provider     TEXT NOT NULL,
    wrapped_key  BYTEA NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('active', 'retiring')),
    created_at   BIGINT NOT NULL
);
-- At most one active root KEK, enforced by the database, not by hope.
CREATE UNIQUE INDEX root_keks_one_active ON root_keks (state) WHERE state = 'active';

-- One encryption = one key context of one tenant. `mode` is `platform` (data
-- keys wrapped by the root KEK) or `client` (wrapped by a key derived from the
-- X-Master-Key header with HKDF and `salt`; Keyward keeps no copy of that key).
-- `latest_version` is the highest version number handed out; rotate increments it
-- in the same statement that locks the row, which serializes concurrent rotates.
CREATE TABLE encryptions (
    id                 TEXT PRIMARY KEY,
    tenant_id          TEXT NOT NULL REFERENCES tenants(id),
    name               TEXT,
    algorithm          TEXT NOT NULL,
    mode               TEXT NOT NULL CHECK (mode IN ('platform', 'client')),
    salt               BYTEA NOT NULL,
    active_version_id  TEXT NOT NULL,
    latest_version     BIGINT NOT NULL,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL
);
-- Listing a tenant's encryptions pages through this index (keyset pagination).
CREATE INDEX encryptions_by_tenant ON encryptions (tenant_id, created_at, id);

-- The versions of each encryption's data key. `id` is the contract's
-- encryptionVersionId; `version` the human number 1, 2, 3...
-- `wrapped_key` is NULL once the version is destroyed (crypto-shredding).
-- `kek_id` names the root KEK that wraps it (NULL in client mode), so a
-- half-finished KEK rotation is a valid state.
CREATE TABLE encryption_key_versions (
    id             TEXT PRIMARY KEY,
    encryption_id  TEXT NOT NULL REFERENCES encryptions(id),
    version        BIGINT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('active', 'enabled', 'decrypt_only', 'disabled', 'destroyed')),
    wrapped_key    BYTEA,
    kek_id         TEXT REFERENCES root_keks(id),
    created_at     BIGINT NOT NULL,
    rotated_at     BIGINT,
    UNIQUE (encryption_id, version)
);
-- Exactly one active version per encryption, enforced by the database.
CREATE UNIQUE INDEX versions_one_active ON encryption_key_versions (encryption_id) WHERE state = 'active';
-- KEK rotation finds the versions still wrapped by an old KEK through this.
CREATE INDEX versions_by_kek ON encryption_key_versions (kek_id);

-- Change feed for in-memory caches: every change that a cached copy must see
-- (rotation, API key revocation, ...) appends a row here in the same transaction.
-- Every process polls it (and, on PostgreSQL, also hears NOTIFY), so a change made
-- by the CLI or another replica reaches its caches within a bounded time.
CREATE TABLE key_events (
    seq         BIGSERIAL PRIMARY KEY,
    kind        TEXT NOT NULL,
    subject     TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX key_events_by_time ON key_events (created_at);
