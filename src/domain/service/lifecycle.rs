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
use crate::store::JobEvidence;

/// The destroy guard's count of rows that still need `version` of
/// `encryption`, from what jobs found (`evidence`, the last finished first by
/// the database's clock).
///
/// Per table (a job's *target*: source, table, ciphertext and version
/// columns) the last job that covers the encryption counts: a job over the
/// encryption itself always covers it, a per-row job only if it saw a row of
/// it. Its count includes the version that was active when it ended, so the
/// rows a job moved onto a version keep that version in use after the next
/// rotation until a later job over the same table finds them moved again.
/// A later job over another table, or over another encryption, clears nothing.
/// Jobs from before targets were recorded count as one table, by the rows
/// they reported left on old versions.
fn rows_found_on(evidence: &[JobEvidence], encryption: EncryptionId, version: VersionId) -> i64 {
    use std::collections::{BTreeMap, HashSet};
    let (encryption, version) = (encryption.to_string(), version.to_string());
    let mut tables: HashSet<Option<&str>> = HashSet::new();
    let mut rows = 0;
    for job in evidence {
        let target = job.target.as_deref();
        if tables.contains(&target) {
            continue;
        }
        let found = match &job.rows_by_version {
            Some(text) => {
                let Ok(map) = serde_json::from_str::<BTreeMap<String, BTreeMap<String, i64>>>(text)
                else {
                    continue;
                };
                match map.get(&encryption) {
                    Some(per_version) => per_version.get(&version).copied().unwrap_or(0),
                    // It never saw the encryption: it covers nothing of it.
                    None => continue,
                }
            }
            None => job
                .remaining_by_version
                .as_deref()
                .and_then(|t| serde_json::from_str::<BTreeMap<String, i64>>(t).ok())
                .and_then(|m| m.get(&version).copied())
                .unwrap_or(0),
        };
        tables.insert(target);
        rows += found;
    }
    rows
}

/// Whether some job in `evidence` covers `encryption` (it was started for it,
/// or, per row, saw a row of it) and finished at or after `since` (Unix ms).
fn covered_since(evidence: &[JobEvidence], encryption: EncryptionId, since: i64) -> bool {
    let id = encryption.to_string();
    evidence.iter().any(|job| {
        let covers = job.encryption_id == Some(encryption)
            || job.rows_by_version.as_deref().is_some_and(|text| {
                serde_json::from_str::<std::collections::BTreeMap<String, serde_json::Value>>(text)
                    .is_ok_and(|m| m.contains_key(&id))
            });
        covers && job.finished_ms.is_some_and(|t| t >= since)
    })
}

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
    /// (rotate first); a destroyed version never comes back. Without `force`,
    /// a destroy needs the last job to have found no row on the version, and
    /// the version to have been `disabled` for `destroy_grace`: by then every
    /// replica has stopped using it, and any ciphertext a job missed has
    /// failed loudly (`403 version_disabled`) while it was still recoverable.
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
        // Even with `force`: a live blind-index key is derived from the
        // version's data key, and every index value under it would be
        // stranded. (Index versions are anchored at the active version,
        // which cannot be destroyed, so none can appear meanwhile.)
        if state == VersionState::Destroyed && self.store.anchors_live_index(version).await? {
            return Err(KeyError::VersionAnchorsIndex);
        }
        if state == VersionState::Destroyed && !force {
            let evidence = self.store.job_evidence(tenant, id).await?;
            let in_use = rows_found_on(&evidence, id, version);
            if in_use > 0 {
                return Err(KeyError::VersionInUse(in_use));
            }
            // Zero rows counted means something only if a job looked after
            // the version stopped receiving new ciphertexts: a job that ended
            // before saw none of what was written under it later.
            let stopped = details
                .version(version)
                .and_then(|v| v.rotated_at)
                .unwrap_or(0);
            if !covered_since(&evidence, id, stopped) {
                return Err(KeyError::VersionUnverified);
            }
            if current != VersionState::Disabled {
                return Err(KeyError::DestroyNeedsDisabled);
            }
        }
        let guarded = state == VersionState::Destroyed && !force;
        let from: &[VersionState] = if guarded {
            &[VersionState::Disabled]
        } else {
            &[
                VersionState::Enabled,
                VersionState::DecryptOnly,
                VersionState::Disabled,
            ]
        };
        let grace_ms = self
            .freshness
            .destroy_grace
            .as_millis()
            .min(i64::MAX as u128) as i64;
        if !self
            .store
            .set_version_state(
                id,
                version,
                from,
                state,
                guarded.then_some(grace_ms),
                now_ms(),
            )
            .await?
        {
            if guarded {
                if let Some(age) = self.store.version_state_age_ms(version).await? {
                    if age < grace_ms {
                        return Err(KeyError::DestroyGracePending {
                            remaining_s: ((grace_ms - age) as u64).div_ceil(1000),
                        });
                    }
                }
            }
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
                // The record names the tenant, so that the tenant's own audit
                // shows its automatic rotations (a rare event: one query).
                let tenant = match self.store.encryption_with_versions(id).await {
                    Ok(found) => found.map(|(e, _)| e.tenant_id),
                    Err(e) => {
                        tracing::warn!(error = %e, encryption_id = %id, "cannot read the tenant of an automatic rotation");
                        None
                    }
                };
                recorder
                    .rotated_automatically(tenant, id, outcome.new_version_id)
                    .await;
            }
        }
        Ok(done.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(encryption: Option<EncryptionId>, target: &str, rows: serde_json::Value) -> JobEvidence {
        JobEvidence {
            encryption_id: encryption,
            target: Some(target.into()),
            rows_by_version: Some(rows.to_string()),
            remaining_by_version: None,
            finished_ms: Some(1_000),
        }
    }

    #[test]
    fn the_last_job_per_table_that_covers_the_encryption_counts() {
        let (e, other) = (EncryptionId::new_random(), EncryptionId::new_random());
        let (v1, v2) = (VersionId::new_random(), VersionId::new_random());
        let found = |rows: i64| serde_json::json!({ e.to_string(): { v1.to_string(): rows } });
        // Newest first: a later job on table B clears nothing found on table A.
        let evidence = vec![
            job(Some(e), "B", serde_json::json!({ e.to_string(): {} })),
            job(
                None,
                "A",
                serde_json::json!({ other.to_string(): { v2.to_string(): 3 } }),
            ),
            job(Some(e), "A", found(20)),
            job(Some(e), "A", found(99)),
        ];
        assert_eq!(rows_found_on(&evidence, e, v1), 20);
        assert_eq!(rows_found_on(&evidence, e, v2), 0);
        // A later job on A that saw the rows moved clears v1.
        let mut later = vec![job(Some(e), "A", found(0))];
        later.extend(evidence);
        assert_eq!(rows_found_on(&later, e, v1), 0);
        // Jobs from before targets were recorded count as one table.
        let legacy = JobEvidence {
            encryption_id: Some(e),
            target: None,
            rows_by_version: None,
            remaining_by_version: Some(format!("{{\"{v1}\": 7}}")),
            finished_ms: None,
        };
        assert_eq!(rows_found_on(&[legacy], e, v1), 7);
    }

    #[test]
    fn only_a_job_over_the_encryption_that_ended_after_the_version_stopped_counts() {
        let (e, other) = (EncryptionId::new_random(), EncryptionId::new_random());
        let per_row_saw = |enc: EncryptionId| serde_json::json!({ enc.to_string(): {} });
        // Job evidence finishes at 1,000 ms.
        let ours = [job(Some(e), "A", per_row_saw(e))];
        assert!(covered_since(&ours, e, 1_000));
        assert!(!covered_since(&ours, e, 1_001), "it ended before");
        assert!(!covered_since(
            &[job(Some(other), "A", per_row_saw(other))],
            e,
            0
        ));
        assert!(covered_since(&[job(None, "A", per_row_saw(e))], e, 0));
        assert!(
            !covered_since(&[job(None, "A", per_row_saw(other))], e, 0),
            "a per-row job that never saw the encryption covers nothing of it"
        );
    }
}
