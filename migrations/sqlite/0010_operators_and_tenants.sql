-- Two kinds of identity (issue #17). An operator key runs the service (tenants,
-- any tenant's API keys, the root KEK, every tenant's audit) and belongs to no
-- tenant: its `tenant_id` is NULL and its scopes are a subset of
-- operator,audit. A tenant key has a `tenant_id` and a subset of
-- encrypt,decrypt,rotate,manage,admin, where `admin` means the administration
-- of its own tenant only. Keyward refuses a row that mixes the two
-- (`domain::apikeys::record_from_row`). Existing keys are all tenant keys and
-- keep working inside their tenant.
--
-- SQLite cannot drop a NOT NULL constraint in place, so the table is rebuilt
-- with the same columns and index; nothing references `api_keys`.
CREATE TABLE api_keys_new (
    id                TEXT PRIMARY KEY,
    tenant_id         TEXT REFERENCES tenants(id),
    secret_sha256     BLOB NOT NULL,
    scopes            TEXT NOT NULL,
    cert_spki_sha256  BLOB,
    created_at        INTEGER NOT NULL,
    revoked_at        INTEGER
);
INSERT INTO api_keys_new (id, tenant_id, secret_sha256, scopes, cert_spki_sha256, created_at, revoked_at)
    SELECT id, tenant_id, secret_sha256, scopes, cert_spki_sha256, created_at, revoked_at FROM api_keys;
DROP TABLE api_keys;
ALTER TABLE api_keys_new RENAME TO api_keys;
CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id);

-- A disabled tenant's API keys stop working (on every replica, through the
-- change feed); its encryptions and records stay. NULL: enabled.
ALTER TABLE tenants ADD COLUMN disabled_at INTEGER;
