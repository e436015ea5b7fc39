//! The small secrets Keyward seals for itself under the root KEK, wherever
//! they are kept: the ACME account credentials and certificate key
//! (`acme_certificates`) and the client CA's key (`client_cas`). A root-KEK
//! rotation re-seals them and may retire the old KEK only once none is left
//! under it; this file is the one list of where they are.

use sqlx::Row;

use super::pool::{Store, StoreError};
use crate::domain::ids::KekId;

/// Where one sealed secret lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SealedSlot {
    /// `acme_certificates.account_sealed` of the named certificate.
    AcmeAccount(String),
    /// `acme_certificates.key_sealed` of the named certificate.
    AcmeKey(String),
    /// `client_cas.key_sealed` of the named client CA.
    ClientCaKey(String),
}

impl SealedSlot {
    /// The purpose the secret is sealed for (bound into its associated
    /// data, so a sealed value copied into another slot fails to open).
    pub fn purpose(&self) -> String {
        match self {
            SealedSlot::AcmeAccount(name) => format!("acme-account:{name}"),
            SealedSlot::AcmeKey(name) => format!("acme-key:{name}"),
            SealedSlot::ClientCaKey(name) => format!("client-ca:{name}"),
        }
    }

    /// (table, sealed column, KEK column, key column, key).
    fn columns(&self) -> (&'static str, &'static str, &'static str, &'static str, &str) {
        match self {
            SealedSlot::AcmeAccount(n) => (
                "acme_certificates",
                "account_sealed",
                "account_kek",
                "name",
                n,
            ),
            SealedSlot::AcmeKey(n) => ("acme_certificates", "key_sealed", "key_kek", "name", n),
            SealedSlot::ClientCaKey(n) => ("client_cas", "key_sealed", "key_kek", "name", n),
        }
    }
}

/// Makes the slot of a row from its name.
type SlotOf = fn(String) -> SealedSlot;

/// A sealed secret as stored.
#[derive(Debug, Clone)]
pub struct SealedSecretRow {
    /// Where it lives.
    pub slot: SealedSlot,
    /// `nonce || ciphertext || tag`.
    pub sealed: Vec<u8>,
}

impl Store {
    /// Every secret sealed under `kek`.
    pub async fn secrets_sealed_by(&self, kek: KekId) -> Result<Vec<SealedSecretRow>, StoreError> {
        let kek = kek.to_string();
        let mut out = Vec::new();
        let kinds: [(SlotOf, &str); 3] = [
            (SealedSlot::AcmeAccount, "SELECT name, account_sealed AS sealed FROM acme_certificates WHERE account_kek = $1 AND account_sealed IS NOT NULL"),
            (SealedSlot::AcmeKey, "SELECT name, key_sealed AS sealed FROM acme_certificates WHERE key_kek = $1 AND key_sealed IS NOT NULL"),
            (SealedSlot::ClientCaKey, "SELECT name, key_sealed AS sealed FROM client_cas WHERE key_kek = $1"),
        ];
        for (slot, query) in kinds {
            for r in sqlx::query(query).bind(&kek).fetch_all(&self.pool).await? {
                out.push(SealedSecretRow {
                    slot: slot(r.try_get("name")?),
                    sealed: r.try_get("sealed")?,
                });
            }
        }
        Ok(out)
    }

    /// Replaces one sealed secret by its re-sealing under `new_kek`
    /// (compare-and-swap on the bytes read: a secret replaced meanwhile, a
    /// renewed certificate, is left as it is). Returns whether it changed.
    pub async fn reseal_secret(
        &self,
        slot: &SealedSlot,
        old: &[u8],
        new: &[u8],
        new_kek: KekId,
    ) -> Result<bool, StoreError> {
        let _turn = self.write_turn().await?;
        let (table, sealed, kek, key, name) = slot.columns();
        let done = sqlx::query(&format!(
            "UPDATE {table} SET {sealed} = $1, {kek} = $2 WHERE {key} = $3 AND {sealed} = $4"
        ))
        .bind(new)
        .bind(new_kek.to_string())
        .bind(name)
        .bind(old)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
