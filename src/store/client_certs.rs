//! The `client_cas` and `client_certificates` tables: the client CA Keyward
//! holds itself, its CRL, and the client certificates it issued with the API
//! key each is bound to.

use sqlx::Row;

use super::events::{self, EventKind};
use super::pool::{Store, StoreError};

/// The client CA's row.
#[derive(Debug, Clone)]
pub struct ClientCaRow {
    /// The CA's name ('default').
    pub name: String,
    /// The self-signed CA certificate, PEM.
    pub cert_pem: String,
    /// Its private key (PKCS#8 PEM), sealed under `key_kek`.
    pub key_sealed: Vec<u8>,
    /// The root KEK sealing the key.
    pub key_kek: String,
    /// The current CRL, DER.
    pub crl_der: Vec<u8>,
    /// The CRL's number (only grows).
    pub crl_number: i64,
}

/// One issued client certificate.
#[derive(Debug, Clone)]
pub struct ClientCertRow {
    /// Serial number, lower-case hex.
    pub serial: String,
    /// The issuing CA's name.
    pub ca_name: String,
    /// The tenant of the bound API key.
    pub tenant_id: String,
    /// The bound API key.
    pub api_key_id: String,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo.
    pub spki_sha256: Vec<u8>,
    /// notBefore (Unix ms).
    pub not_before: i64,
    /// notAfter (Unix ms).
    pub not_after: i64,
    /// When it was issued (Unix ms).
    pub issued_at: i64,
    /// When it was revoked (Unix ms), if it was.
    pub revoked_at: Option<i64>,
    /// Whether the API key is still bound to it (live and naming its SPKI).
    pub bound: bool,
}

/// The binding an API key gets when its certificate is revoked: the SHA-256
/// of no public key (all zeros), so that no certificate matches it and the key
/// is refused (`403 certificate_mismatch`) until a new certificate is issued
/// for it.
pub const REVOKED_BINDING: [u8; 32] = [0; 32];

const CERT_COLUMNS: &str = "c.serial, c.ca_name, c.tenant_id, c.api_key_id, c.spki_sha256, \
     c.not_before, c.not_after, c.issued_at, c.revoked_at, \
     CAST(CASE WHEN k.id IS NOT NULL AND k.revoked_at IS NULL AND k.cert_spki_sha256 = c.spki_sha256 \
      THEN 1 ELSE 0 END AS BIGINT) AS bound";

fn cert_from_row(r: &sqlx::any::AnyRow) -> Result<ClientCertRow, StoreError> {
    Ok(ClientCertRow {
        serial: r.try_get("serial")?,
        ca_name: r.try_get("ca_name")?,
        tenant_id: r.try_get("tenant_id")?,
        api_key_id: r.try_get("api_key_id")?,
        spki_sha256: r.try_get("spki_sha256")?,
        not_before: r.try_get("not_before")?,
        not_after: r.try_get("not_after")?,
        issued_at: r.try_get("issued_at")?,
        revoked_at: r.try_get("revoked_at")?,
        bound: r.try_get::<i64, _>("bound")? == 1,
    })
}

impl Store {
    /// The client CA `name`, if it was made.
    pub async fn client_ca(&self, name: &str) -> Result<Option<ClientCaRow>, StoreError> {
        let row = sqlx::query(
            "SELECT name, cert_pem, key_sealed, key_kek, crl_der, crl_number \
             FROM client_cas WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(ClientCaRow {
                name: r.try_get("name")?,
                cert_pem: r.try_get("cert_pem")?,
                key_sealed: r.try_get("key_sealed")?,
                key_kek: r.try_get("key_kek")?,
                crl_der: r.try_get("crl_der")?,
                crl_number: r.try_get("crl_number")?,
            })
        })
        .transpose()
    }

    /// Stores a new client CA unless one of that name exists (two first uses
    /// at once: one wins, the other reads the winner's). Announces it.
    pub async fn insert_client_ca(&self, ca: &ClientCaRow, now: i64) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await?;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "INSERT INTO client_cas (name, cert_pem, key_sealed, key_kek, crl_der, crl_number, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&ca.name)
        .bind(&ca.cert_pem)
        .bind(&ca.key_sealed)
        .bind(&ca.key_kek)
        .bind(&ca.crl_der)
        .bind(ca.crl_number)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        events::commit_change(tx, self.backend, done, EventKind::ClientCaChanged, &ca.name).await
    }

    /// Records an issued certificate and binds live API key `api_key_id` of
    /// `tenant` to its public key, in one transaction, announced to every
    /// cache. `false` (nothing written) if there is no such live key.
    pub async fn insert_client_certificate(
        &self,
        cert: &ClientCertRow,
    ) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await?;
        let mut tx = self.pool.begin().await?;
        let bound = sqlx::query(
            "UPDATE api_keys SET cert_spki_sha256 = $1 \
             WHERE id = $2 AND tenant_id = $3 AND revoked_at IS NULL",
        )
        .bind(&cert.spki_sha256)
        .bind(&cert.api_key_id)
        .bind(&cert.tenant_id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !bound {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO client_certificates (serial, ca_name, tenant_id, api_key_id, spki_sha256, \
             not_before, not_after, issued_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&cert.serial)
        .bind(&cert.ca_name)
        .bind(&cert.tenant_id)
        .bind(&cert.api_key_id)
        .bind(&cert.spki_sha256)
        .bind(cert.not_before)
        .bind(cert.not_after)
        .bind(cert.issued_at)
        .execute(&mut *tx)
        .await?;
        events::commit_change(
            tx,
            self.backend,
            true,
            EventKind::ApiKeyChanged,
            &cert.api_key_id,
        )
        .await
    }

    /// The certificates with serial `serial` or issued for
    /// `api_key_id`, revoked or not.
    pub async fn client_certificates_matching(
        &self,
        serial: Option<&str>,
        api_key_id: Option<&str>,
    ) -> Result<Vec<ClientCertRow>, StoreError> {
        let sql = format!(
            "SELECT {CERT_COLUMNS} FROM client_certificates c LEFT JOIN api_keys k ON k.id = c.api_key_id \
             WHERE c.serial = $1 OR c.api_key_id = $2 ORDER BY c.issued_at, c.serial"
        );
        let rows = sqlx::query(&sql)
            .bind(serial)
            .bind(api_key_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(cert_from_row).collect()
    }

    /// Up to `limit` certificates issued, oldest first, after serial
    /// `after` in (issued_at, serial) order; with `live_only`, those neither
    /// revoked nor expired at `now`.
    pub async fn client_certificates(
        &self,
        after: Option<(i64, &str)>,
        live_only: bool,
        now: i64,
        limit: i64,
    ) -> Result<Vec<ClientCertRow>, StoreError> {
        let (after_ms, after_serial) = match after {
            Some((ms, s)) => (Some(ms), Some(s)),
            None => (None, None),
        };
        let sql = format!(
            "SELECT {CERT_COLUMNS} FROM client_certificates c LEFT JOIN api_keys k ON k.id = c.api_key_id \
             WHERE ($1 IS NULL OR c.issued_at > $1 OR (c.issued_at = $1 AND c.serial > $2)) \
             AND ($5 = 0 OR (c.revoked_at IS NULL AND c.not_after > $4)) \
             ORDER BY c.issued_at, c.serial LIMIT $3"
        );
        let rows = sqlx::query(&sql)
            .bind(after_ms)
            .bind(after_serial)
            .bind(limit)
            .bind(now)
            .bind(i64::from(live_only))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(cert_from_row).collect()
    }

    /// The revoked, unexpired certificates of CA `ca_name` (what its CRL
    /// lists: an expired certificate is refused anyway) as (serial hex,
    /// revoked_at).
    pub async fn revoked_client_certificates(
        &self,
        ca_name: &str,
        now: i64,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT serial, revoked_at FROM client_certificates \
             WHERE ca_name = $1 AND revoked_at IS NOT NULL AND not_after > $2 ORDER BY serial",
        )
        .bind(ca_name)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("serial")?, r.try_get("revoked_at")?)))
            .collect()
    }

    /// Marks `serials` revoked at `now` and replaces CA `ca_name`'s CRL by
    /// `crl_der` (number `crl_number`), in one transaction guarded by the
    /// CRL number read (`previous`): two revocations at once cannot drop
    /// each other's serials. Announced to every replica.
    pub async fn revoke_client_certificates(
        &self,
        ca_name: &str,
        serials: &[String],
        now: i64,
        previous: i64,
        crl_der: &[u8],
        crl_number: i64,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await?;
        let mut tx = self.pool.begin().await?;
        let swapped = sqlx::query(
            "UPDATE client_cas SET crl_der = $1, crl_number = $2, updated_at = $3 \
             WHERE name = $4 AND crl_number = $5",
        )
        .bind(crl_der)
        .bind(crl_number)
        .bind(now)
        .bind(ca_name)
        .bind(previous)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !swapped {
            tx.rollback().await?;
            return Err(StoreError::Raced(
                "the client CA's CRL changed meanwhile (another revocation); nothing was changed, run it again".into(),
            ));
        }
        for serial in serials {
            sqlx::query(
                "UPDATE client_certificates SET revoked_at = $1 \
                 WHERE serial = $2 AND revoked_at IS NULL",
            )
            .bind(now)
            .bind(serial)
            .execute(&mut *tx)
            .await?;
            // The API key bound to it stops working at once, on every
            // replica, also on connections opened before the revocation (the
            // CRL only refuses new handshakes) and with any other certificate
            // of the same key pair: its binding becomes one no certificate
            // matches, until a new certificate is issued for it. Unbinding
            // it instead would free the key for any connection.
            let unbound = sqlx::query(
                "UPDATE api_keys SET cert_spki_sha256 = $1 \
                 WHERE id = (SELECT api_key_id FROM client_certificates WHERE serial = $2) \
                 AND cert_spki_sha256 = (SELECT spki_sha256 FROM client_certificates WHERE serial = $2) \
                 RETURNING id",
            )
            .bind(REVOKED_BINDING.to_vec())
            .bind(serial)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(row) = unbound {
                let key_id: String = row.try_get("id")?;
                events::record(&mut tx, self.backend, EventKind::ApiKeyChanged, &key_id).await?;
            }
        }
        events::commit_change(tx, self.backend, true, EventKind::ClientCaChanged, ca_name).await?;
        Ok(())
    }

    /// How many certificates are live (not revoked, not expired at `now`)
    /// and still bound to their API key, and how many of them expire
    /// before `soon` (Unix ms).
    pub async fn bound_client_certificates(
        &self,
        now: i64,
        soon: i64,
    ) -> Result<(i64, i64), StoreError> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS live, \
             CAST(COALESCE(SUM(CASE WHEN c.not_after <= $2 THEN 1 ELSE 0 END), 0) AS BIGINT) AS soon \
             FROM client_certificates c JOIN api_keys k ON k.id = c.api_key_id \
             WHERE c.revoked_at IS NULL AND c.not_after > $1 \
             AND k.revoked_at IS NULL AND k.cert_spki_sha256 = c.spki_sha256",
        )
        .bind(now)
        .bind(soon)
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get("live")?, row.try_get("soon")?))
    }
}
