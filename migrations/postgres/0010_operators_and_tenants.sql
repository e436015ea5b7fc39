-- Two kinds of identity (issue #17). An operator key runs the service (tenants,
-- any tenant's API keys, the root KEK, every tenant's audit) and belongs to no
-- tenant: its `tenant_id` is NULL and its scopes are a subset of
-- operator,audit. A tenant key has a `tenant_id` and a subset of
-- encrypt,decrypt,rotate,manage,admin, where `admin` means the administration
-- of its own tenant only. Keyward refuses a row that mixes the two
-- (`domain::apikeys::record_from_row`). Existing keys are all tenant keys and
-- keep working inside their tenant.
ALTER TABLE api_keys ALTER COLUMN tenant_id DROP NOT NULL;

-- A disabled tenant's API keys stop working (on every replica, through the
-- change feed); its encryptions and records stay. NULL: enabled.
ALTER TABLE tenants ADD COLUMN disabled_at BIGINT;
