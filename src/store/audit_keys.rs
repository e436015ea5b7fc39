//! The `audit_checkpoint_keys` table: the public keys that verify the audit
//! file's checkpoints (no secret: the private keys are derived from the root
//! KEKs and never stored).

use sqlx::Row;

use super::pool::{Store, StoreError};

/// One checkpoint key's public half.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointKeyRow {
    /// The key id each checkpoint names.
    pub key_id: String,
    /// The Ed25519 public key, hex.
    pub public_key: String,
    /// The root KEK it is derived from.
    pub kek_id: String,
    /// When it was first recorded (Unix ms).
    pub created_at: i64,
}

impl Store {
    /// Records a checkpoint key's public half; one already recorded (by this
    /// process before, or by another replica) is left as it is.
    pub async fn record_checkpoint_key(&self, key: &CheckpointKeyRow) -> Result<(), StoreError> {
        let _turn = self.write_turn().await?;
        sqlx::query(
            "INSERT INTO audit_checkpoint_keys (key_id, public_key, kek_id, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (key_id) DO NOTHING",
        )
        .bind(&key.key_id)
        .bind(&key.public_key)
        .bind(&key.kek_id)
        .bind(key.created_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every checkpoint key ever recorded, oldest first.
    pub async fn checkpoint_keys(&self) -> Result<Vec<CheckpointKeyRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT key_id, public_key, kek_id, created_at FROM audit_checkpoint_keys \
             ORDER BY created_at, key_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CheckpointKeyRow {
                    key_id: r.try_get("key_id")?,
                    public_key: r.try_get("public_key")?,
                    kek_id: r.try_get("kek_id")?,
                    created_at: r.try_get("created_at")?,
                })
            })
            .collect()
    }
}
