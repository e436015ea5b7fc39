//! The lifecycle: rotation policies, version states, and the rotations
//! Keyward makes by itself (a period elapsed, or the nonce bound reached).

use super::state::KeyService;
use crate::crypto::DataKey;
use crate::domain::error::KeyError;
use crate::domain::ids::{EncryptionId, TenantId, VersionId};
use crate::domain::keys::{check_policy, check_state_change};
use crate::domain::states::VersionState;
use crate::domain::time::now_ms;

use super::management::EncryptionDetails;

impl KeyService {
    /// Sets the rotation policy: `period` (`Some(None)` clears it) and the
    /// minimum decryption version (at least 1, at most the active version).
    pub async fn set_policy(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        period: Option<Option<std::time::Duration>>,
        min_decryption_version: Option<i64>,
    ) -> Result<EncryptionDetails, KeyError> {
        let details = self.encryption_details(tenant, id).await?;
        check_policy(
            details.encryption.mode,
            details.active_number(),
            period,
            min_decryption_version,
        )?;
        let period_ms = period.map(|p| p.map(|d| d.as_millis().min(i64::MAX as u128) as i64));
        if !self
            .store
            .set_policy(tenant, id, period_ms, min_decryption_version, now_ms())
            .await?
        {
            return Err(KeyError::EncryptionNotFound);
        }
        self.ring.invalidate(id);
        self.encryption_details(tenant, id).await
    }

    /// Moves a version to another state. The active version cannot change
    /// (rotate first); a destroyed version never comes back.
    pub async fn set_version_state(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        version: VersionId,
        state: VersionState,
        force: bool,
    ) -> Result<EncryptionDetails, KeyError> {
        let details = self.encryption_details(tenant, id).await?;
        let current = details
            .version(version)
            .ok_or(KeyError::VersionNotFound)?
            .state;
        check_state_change(current, state)?;
        if state == VersionState::Destroyed && !force {
            let in_use = self
                .store
                .rows_last_seen_on(id, &version.to_string())
                .await?;
            if in_use > 0 {
                return Err(KeyError::VersionInUse(in_use));
            }
        }
        let from = [
            VersionState::Enabled,
            VersionState::DecryptOnly,
            VersionState::Disabled,
        ];
        if !self
            .store
            .set_version_state(id, version, &from, state, now_ms())
            .await?
        {
            return Err(KeyError::InvalidStateChange(
                "the version changed meanwhile; read it again",
            ));
        }
        self.ring.invalidate(id);
        if state == VersionState::Destroyed {
            tracing::warn!(encryption_id = %id, version_id = %version, "key version destroyed: its ciphertexts can never be decrypted again");
        }
        self.encryption_details(tenant, id).await
    }

    /// Adds this process's use counts to the store and rotates every platform
    /// encryption whose active version reached `bound` encryptions. Several
    /// replicas may decide at once; the compare-and-swap lets one rotate.
    pub async fn flush_counts(&self, bound: u64) -> Result<(), KeyError> {
        let counts = self.ring.drain_counts();
        if counts.is_empty() {
            return Ok(());
        }
        let totals = match self.store.add_encrypt_counts(&counts).await {
            Ok(t) => t,
            Err(e) => {
                self.ring.restore_counts(&counts);
                return Err(e.into());
            }
        };
        for (encryption, version, total, state) in totals {
            self.ring.recorded_total(version, total.max(0) as u64);
            if state == VersionState::Active && total as u64 >= bound {
                if self.auto_rotate(encryption, version).await? {
                    tracing::info!(encryption_id = %encryption, version_id = %version, total, "encryption count reached the bound; rotated");
                } else {
                    // Another replica rotated it already, or it is client-mode:
                    // Keyward cannot make a version without the client's key.
                    tracing::warn!(encryption_id = %encryption, version_id = %version, total, "encryption count reached the bound; not rotated here (client-mode encryptions must be rotated with their client key)");
                }
            }
        }
        Ok(())
    }

    /// Rotates every platform encryption whose active version is older than its
    /// rotation period.
    pub async fn rotate_due(&self) -> Result<usize, KeyError> {
        let due = self.store.due_for_rotation(now_ms(), 100).await?;
        let mut rotated = 0;
        for (encryption, active) in due {
            if self.auto_rotate(encryption, active).await? {
                rotated += 1;
            }
        }
        Ok(rotated)
    }

    async fn auto_rotate(
        &self,
        id: EncryptionId,
        expected_active: VersionId,
    ) -> Result<bool, KeyError> {
        let new_id = VersionId::new_random();
        let new_version = self.wrap_platform_key(id, new_id, &DataKey::generate())?;
        let done = self
            .store
            .rotate_if_active(id, expected_active, &new_version, now_ms())
            .await?;
        self.ring.invalidate(id);
        if let Some(outcome) = &done {
            tracing::info!(encryption_id = %id, new_version = outcome.new_version, "rotated automatically");
            if let Some(recorder) = &self.recorder {
                recorder
                    .rotated_automatically(id, outcome.new_version_id)
                    .await;
            }
        }
        Ok(done.is_some())
    }
}
