-- RSA-OAEP encryptions, key import and controlled export (docs/algorithms.md).
--
-- An encryption's algorithm is its `algorithm` column (0001); an RSA
-- version's `wrapped_key` holds its private key (PKCS#8 DER) wrapped under
-- the root KEK exactly like a data key, so root-KEK rotation and destroy
-- treat both alike.
--
-- `exportable`: fixed at creation; only then may a version's key leave
-- Keyward, wrapped to a public key the caller supplies.
ALTER TABLE encryptions ADD COLUMN exportable BIGINT NOT NULL DEFAULT 0;
-- `key_bits`: the RSA modulus size new versions get (3072 or 4096); NULL for
-- AES-256-GCM.
ALTER TABLE encryptions ADD COLUMN key_bits BIGINT;
-- `imported`: the version's key material came from the tenant (BYOK), not
-- from Keyward's random generator; shown in GET /v1/encryptions/{id}.
ALTER TABLE encryption_key_versions ADD COLUMN imported BIGINT NOT NULL DEFAULT 0;
-- Each tenant's RSA-OAEP wrapping key for imports (like AWS KMS
-- GetParametersForImport or Vault's wrapping_key): made on first use, its
-- private key wrapped under a root KEK (`kek_id`, re-wrapped by root-KEK
-- rotation like a version), its public key in the clear for GET.
CREATE TABLE tenant_wrapping_keys (
    tenant_id    TEXT PRIMARY KEY REFERENCES tenants(id),
    wrapped_key  BYTEA NOT NULL,
    kek_id       TEXT NOT NULL,
    public_key   BYTEA NOT NULL,
    created_at   BIGINT NOT NULL
);
-- Root-KEK rotation finds the rows of a retiring KEK by it.
CREATE INDEX tenant_wrapping_keys_kek ON tenant_wrapping_keys (kek_id);
