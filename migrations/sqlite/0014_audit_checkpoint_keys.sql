-- The public keys that verify the audit file's signed checkpoints, one per
-- root KEK that has signed any (the private key is derived from the root KEK
-- and never stored). Rows are never deleted: a root-KEK rotation retires the
-- KEK, but the checkpoints its key signed must stay verifiable, and a public
-- key is no secret. `keyward audit public-keys` lists them for
-- `keyward audit verify --public-keys`.
CREATE TABLE audit_checkpoint_keys (
    -- The first 8 bytes of the SHA-256 of the public key, hex: what each
    -- checkpoint names.
    key_id      TEXT PRIMARY KEY,
    -- The Ed25519 public key, hex (64 characters).
    public_key  TEXT NOT NULL,
    -- The root KEK it is derived from (that KEK may be retired since).
    kek_id      TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
