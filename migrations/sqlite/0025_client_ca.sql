-- The client CA Keyward holds itself (`keyward client-cert issue`), and the
-- client certificates it issued. Mutual TLS trusts this CA in addition to
-- KEYWARD_TLS_CLIENT_CA, and refuses what its CRL lists.
--
-- One row per CA ('default'), created on first use by the CLI.
CREATE TABLE client_cas (
    name         TEXT PRIMARY KEY,
    -- The self-signed CA certificate (PEM, public).
    cert_pem     TEXT NOT NULL,
    -- Its private key (PKCS#8 PEM), sealed (AES-256-GCM, nonce first) under
    -- root KEK key_kek and bound to the purpose 'client-ca:<name>'. A
    -- root-KEK rotation re-seals it.
    key_sealed   BLOB NOT NULL,
    key_kek      TEXT NOT NULL,
    -- The current CRL (DER), signed by the CA: every revoked certificate of
    -- the CA. crl_number only grows; every replica rebuilds its mutual-TLS
    -- verifier when it changes (polled, and announced on the change feed).
    crl_der      BLOB NOT NULL,
    crl_number   BIGINT NOT NULL,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);

-- Every client certificate issued, and the API key bound to it in the same
-- step (api_keys.cert_spki_sha256 = spki_sha256). No private key is kept:
-- the CLI writes it to a file and forgets it.
CREATE TABLE client_certificates (
    -- The certificate's serial number, lower-case hex.
    serial       TEXT PRIMARY KEY,
    ca_name      TEXT NOT NULL,
    tenant_id    TEXT NOT NULL,
    api_key_id   TEXT NOT NULL,
    spki_sha256  BLOB NOT NULL,
    not_before   BIGINT NOT NULL,
    not_after    BIGINT NOT NULL,
    issued_at    BIGINT NOT NULL,
    -- Set by `keyward client-cert revoke`: the serial is then on the CRL.
    revoked_at   BIGINT
);
-- Revocation by API key, and the expiring-soon count per key.
CREATE INDEX client_certificates_api_key ON client_certificates (api_key_id);
-- The expiring-soon gauge counts live certificates by notAfter.
CREATE INDEX client_certificates_not_after ON client_certificates (not_after);
