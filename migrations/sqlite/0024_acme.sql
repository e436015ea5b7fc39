-- The server certificate obtained through ACME (KEYWARD_ACME_DIRECTORY),
-- shared by every replica on this database: one replica at a time holds the
-- lease and orders; every replica reads the row and serves what is in it.
-- One row per certificate name ('server').
CREATE TABLE acme_certificates (
    name             TEXT PRIMARY KEY,
    -- The directory and the comma-separated, sorted domains the certificate
    -- and account were obtained for: a change of either orders anew.
    directory        TEXT NOT NULL,
    domains          TEXT NOT NULL,
    -- The ACME account's credentials (JSON with its private key), sealed
    -- (AES-256-GCM, nonce first) under root KEK account_kek, bound to the name.
    account_sealed   BLOB,
    account_kek      TEXT,
    -- The certificate chain (PEM, public), its private key sealed like the
    -- account, and the leaf's notBefore/notAfter (Unix ms).
    cert_pem         TEXT,
    key_sealed       BLOB,
    key_kek          TEXT,
    not_before       BIGINT,
    not_after        BIGINT,
    -- The replica ordering (a random id per process) and until when (Unix
    -- ms). After a failed order the lease is kept until the next attempt, so
    -- that the backoff holds for every replica, not for one.
    lease_holder     TEXT,
    lease_until      BIGINT NOT NULL DEFAULT 0,
    -- Failed orders since the last success, and the last one's error (the
    -- ACME problem, no secrets): what /readyz and the metrics report.
    failures         BIGINT NOT NULL DEFAULT 0,
    last_error       TEXT,
    updated_at       BIGINT NOT NULL
);

-- Pending ACME challenge responses (http-01 token -> key authorization, and
-- for tls-alpn-01 the domain -> key authorization), written by the ordering
-- replica, so that whichever replica the CA's validation reaches can answer.
-- Key authorizations are public by design (RFC 8555 serves them to anyone);
-- rows are deleted when the order ends.
CREATE TABLE acme_challenges (
    token              TEXT PRIMARY KEY,
    domain             TEXT NOT NULL,
    key_authorization  TEXT NOT NULL,
    created_at         BIGINT NOT NULL
);
