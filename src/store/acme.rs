//! The `acme_certificates` and `acme_challenges` tables: the ACME server
//! certificate shared by replicas, the lease that lets one of them order, and
//! the pending challenge responses every replica answers with.

use sqlx::Row;

use super::pool::{Store, StoreError};

/// One ACME certificate's row.
#[derive(Debug, Clone, Default)]
pub struct AcmeRow {
    /// The directory URL it was obtained from.
    pub directory: String,
    /// The sorted, comma-separated domains.
    pub domains: String,
    /// The account credentials, sealed under `account_kek`.
    pub account_sealed: Option<Vec<u8>>,
    /// The root KEK sealing the account.
    pub account_kek: Option<String>,
    /// The certificate chain, PEM.
    pub cert_pem: Option<String>,
    /// Its private key (PKCS#8 PEM), sealed under `key_kek`.
    pub key_sealed: Option<Vec<u8>>,
    /// The root KEK sealing the key.
    pub key_kek: Option<String>,
    /// The leaf's notBefore (Unix ms).
    pub not_before: Option<i64>,
    /// The leaf's notAfter (Unix ms).
    pub not_after: Option<i64>,
    /// Until when the current lease runs (Unix ms).
    pub lease_until: i64,
    /// Failed orders since the last success.
    pub failures: i64,
    /// The last failure's error.
    pub last_error: Option<String>,
}

/// A pending challenge response.
#[derive(Debug, Clone)]
pub struct AcmeChallengeRow {
    /// The http-01 token.
    pub token: String,
    /// The domain being validated.
    pub domain: String,
    /// The key authorization (public by design).
    pub key_authorization: String,
}

impl Store {
    /// The row of certificate `name`, if any.
    pub async fn acme_row(&self, name: &str) -> Result<Option<AcmeRow>, StoreError> {
        let row = sqlx::query(
            "SELECT directory, domains, account_sealed, account_kek, cert_pem, key_sealed, key_kek, \
             not_before, not_after, lease_until, failures, last_error \
             FROM acme_certificates WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(AcmeRow {
                directory: r.try_get("directory")?,
                domains: r.try_get("domains")?,
                account_sealed: r.try_get("account_sealed")?,
                account_kek: r.try_get("account_kek")?,
                cert_pem: r.try_get("cert_pem")?,
                key_sealed: r.try_get("key_sealed")?,
                key_kek: r.try_get("key_kek")?,
                not_before: r.try_get("not_before")?,
                not_after: r.try_get("not_after")?,
                lease_until: r.try_get("lease_until")?,
                failures: r.try_get("failures")?,
                last_error: r.try_get("last_error")?,
            })
        })
        .transpose()
    }

    /// Takes (or extends) the ordering lease of `name` for `holder` until
    /// `until` (Unix ms), when nobody else holds an unexpired one. Creates
    /// the row on first use. Returns whether `holder` has it.
    pub async fn acme_take_lease(
        &self,
        name: &str,
        directory: &str,
        domains: &str,
        holder: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, StoreError> {
        sqlx::query(
            "INSERT INTO acme_certificates (name, directory, domains, lease_until, failures, updated_at) \
             VALUES ($1, $2, $3, 0, 0, $4) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(directory)
        .bind(domains)
        .bind(now)
        .execute(&self.pool)
        .await?;
        let done = sqlx::query(
            "UPDATE acme_certificates SET lease_holder = $1, lease_until = $2 \
             WHERE name = $3 AND (lease_until <= $4 OR lease_holder = $1)",
        )
        .bind(holder)
        .bind(until)
        .bind(name)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Stores the sealed account credentials (only while `holder` holds the lease).
    pub async fn acme_store_account(
        &self,
        name: &str,
        holder: &str,
        directory: &str,
        sealed: &[u8],
        kek: &str,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE acme_certificates SET account_sealed = $1, account_kek = $2, directory = $3 \
             WHERE name = $4 AND lease_holder = $5",
        )
        .bind(sealed)
        .bind(kek)
        .bind(directory)
        .bind(name)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Stores a new certificate and releases the lease (only while `holder`
    /// holds it): every replica picks it up at its next check.
    #[allow(clippy::too_many_arguments)]
    pub async fn acme_store_certificate(
        &self,
        name: &str,
        holder: &str,
        domains: &str,
        cert_pem: &str,
        key_sealed: &[u8],
        key_kek: &str,
        not_before: i64,
        not_after: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE acme_certificates SET cert_pem = $1, key_sealed = $2, key_kek = $3, \
             not_before = $4, not_after = $5, domains = $6, failures = 0, last_error = NULL, \
             lease_holder = NULL, lease_until = 0, updated_at = $7 \
             WHERE name = $8 AND lease_holder = $9",
        )
        .bind(cert_pem)
        .bind(key_sealed)
        .bind(key_kek)
        .bind(not_before)
        .bind(not_after)
        .bind(domains)
        .bind(now)
        .bind(name)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records a failed order: the failure count goes up and the lease is
    /// kept until `retry_at` (Unix ms), the next attempt of any replica.
    pub async fn acme_record_failure(
        &self,
        name: &str,
        holder: &str,
        error: &str,
        retry_at: i64,
        now: i64,
    ) -> Result<i64, StoreError> {
        sqlx::query(
            "UPDATE acme_certificates SET failures = failures + 1, last_error = $1, \
             lease_until = $2, updated_at = $3 WHERE name = $4 AND lease_holder = $5",
        )
        .bind(error)
        .bind(retry_at)
        .bind(now)
        .bind(name)
        .bind(holder)
        .execute(&self.pool)
        .await?;
        let failures: Option<i64> =
            sqlx::query_scalar("SELECT failures FROM acme_certificates WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        Ok(failures.unwrap_or(0))
    }

    /// Publishes a challenge response for every replica to serve.
    pub async fn acme_put_challenge(
        &self,
        challenge: &AcmeChallengeRow,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO acme_challenges (token, domain, key_authorization, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (token) DO UPDATE SET \
             domain = excluded.domain, key_authorization = excluded.key_authorization, \
             created_at = excluded.created_at",
        )
        .bind(&challenge.token)
        .bind(&challenge.domain)
        .bind(&challenge.key_authorization)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes challenge responses (the order ended), and any older than
    /// `stale_before` (Unix ms) a crashed replica left.
    pub async fn acme_remove_challenges(
        &self,
        tokens: &[String],
        stale_before: i64,
    ) -> Result<(), StoreError> {
        for token in tokens {
            sqlx::query("DELETE FROM acme_challenges WHERE token = $1")
                .bind(token)
                .execute(&self.pool)
                .await?;
        }
        sqlx::query("DELETE FROM acme_challenges WHERE created_at < $1")
            .bind(stale_before)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every pending challenge response (a handful at most: one per domain
    /// of an order in progress).
    pub async fn acme_challenges(&self) -> Result<Vec<AcmeChallengeRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT token, domain, key_authorization FROM acme_challenges ORDER BY created_at LIMIT 100",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AcmeChallengeRow {
                    token: r.try_get("token")?,
                    domain: r.try_get("domain")?,
                    key_authorization: r.try_get("key_authorization")?,
                })
            })
            .collect()
    }
}
