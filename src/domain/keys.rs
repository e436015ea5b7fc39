//! The versioned key object, after OpenBao transit's `keysutil.Policy`: one
//! [`VersionedKey`] holds an encryption's versions, its active version and its
//! minimum decryption version, and answers which key an operation may use
//! ([`VersionedKey::key_for_encrypt`], [`VersionedKey::key_for_decrypt`]). The
//! rules of a lifecycle change ([`check_state_change`], [`check_policy`]) are
//! checked here before the service persists anything.
//!
//! A `VersionedKey` is immutable once built: a change (rotate, state change,
//! policy) is persisted first and then replaces the whole object in the
//! [`super::keyring::KeyRing`], so a reader always sees one consistent snapshot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::algorithm::Algorithm;
use super::client_key::ClientKey;
use super::error::KeyError;
use super::ids::{EncryptionId, TenantId, VersionId};
use super::search::BlindIndex;
use crate::crypto::{
    data_key_aad, derive_client_wrapping_key, CipherKey, DataKey, RsaBits, RsaPrivateKey,
    SecretBytes, WrappedKey,
};

/// The id bound into the wrapping of client-mode data keys in place of a KEK id.
pub const CLIENT_WRAPPING_ID: [u8; 16] = [0u8; 16];

pub use super::states::{Mode, VersionState};

/// How a loaded version holds its key.
#[derive(Debug)]
pub enum VersionKey {
    /// Platform mode: unwrapped and prepared.
    Ready(CipherKey),
    /// An RSA-OAEP-256 version (platform mode only): its private key,
    /// unwrapped and parsed, with its public half.
    Rsa(RsaPrivateKey),
    /// Client mode: still wrapped; the request's client key unwraps it.
    ClientWrapped(WrappedKey),
    /// Destroyed: no key material exists any more.
    Destroyed,
}

/// How many encryptions one version has made, as far as this replica knows:
/// what the store holds (or is being sent to it) and what only this replica
/// has counted so far. Their sum is what the nonce bound is checked against
/// on every encrypt, so a replica that cannot record its counts stops on its
/// own before the bound instead of running past it.
#[derive(Debug, Default)]
pub struct UseCount {
    /// Encryptions made here and not yet handed to the store.
    pub unflushed: AtomicU64,
    /// The store's count when last read (load, flush), plus counts being
    /// flushed right now.
    pub recorded: AtomicU64,
}

impl UseCount {
    /// Takes one use under the bound `max`: false (and nothing taken) when
    /// the recorded count plus this replica's not yet recorded count has
    /// reached it, so the version has made every encryption it may.
    pub fn take(&self, max: u64) -> bool {
        let recorded = self.recorded.load(Ordering::Acquire);
        if recorded >= max {
            return false;
        }
        let unflushed = self.unflushed.fetch_add(1, Ordering::AcqRel) + 1;
        if recorded.saturating_add(unflushed) > max {
            self.unflushed.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives back a use taken for an encryption that did not happen.
    pub fn give_back(&self) {
        self.unflushed.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One version of a [`VersionedKey`].
#[derive(Debug)]
pub struct KeyVersion {
    /// The version id.
    pub id: VersionId,
    /// The version number (1, 2, 3...).
    pub number: i64,
    /// Its state when loaded.
    pub state: VersionState,
    /// Its key.
    pub key: VersionKey,
    /// Encryptions made with it, recorded and not yet recorded. Shared by
    /// every object built for this version (the key ring hands it out), so a
    /// rebuilt object loses no count.
    pub uses: Arc<UseCount>,
}

/// One encryption with its versions: what encrypt and decrypt consult.
#[derive(Debug)]
pub struct VersionedKey {
    /// When it was read from the store.
    pub loaded_at: Instant,
    /// The id.
    pub id: EncryptionId,
    /// The owning tenant.
    pub tenant_id: TenantId,
    /// Who wraps the keys.
    pub mode: Mode,
    /// Its algorithm (fixed at creation).
    pub algorithm: Algorithm,
    /// Its blind indexes, by name.
    pub indexes: Vec<BlindIndex>,
    /// The RSA size new versions get (RSA-OAEP-256 only).
    pub rsa_bits: Option<RsaBits>,
    /// Salt for client-mode key derivation.
    pub salt: Vec<u8>,
    /// The active version.
    pub active: VersionId,
    /// Versions numbered below this do not decrypt.
    pub min_decryption_version: i64,
    /// Every version, in number order.
    pub versions: Vec<KeyVersion>,
}

impl VersionedKey {
    /// The version with this id.
    pub fn version(&self, id: VersionId) -> Option<&KeyVersion> {
        self.versions.iter().rev().find(|v| v.id == id)
    }

    /// The active version. A key that passed [`VersionedKey::check`] always
    /// holds it; one that did not is an integrity error, not a panic.
    pub fn active_version(&self) -> Result<&KeyVersion, KeyError> {
        self.version(self.active).ok_or_else(|| {
            KeyError::Integrity(format!(
                "encryption {}: no row for its active version",
                self.id
            ))
        })
    }

    /// The blind index named `name`.
    pub fn index(&self, name: &str) -> Option<&BlindIndex> {
        self.indexes.iter().find(|i| i.name == name)
    }

    /// Runs `f` with the key of version `id` for a derivation (a blind-index
    /// key): any state but destroyed will do, since no ciphertext is made or
    /// opened with it.
    pub fn with_key_of(
        &self,
        id: VersionId,
        client_key: Option<&ClientKey>,
        f: impl FnOnce(&CipherKey) -> DataKey,
    ) -> Result<DataKey, KeyError> {
        let version = self.version(id).ok_or(KeyError::IndexNotFound)?;
        self.with_key(version, client_key, f)
    }

    /// Whether the caller brought the kind of key this encryption needs: a
    /// client key for a client-mode encryption, none for a platform one.
    pub fn check_mode(&self, client_key: Option<&ClientKey>) -> Result<(), KeyError> {
        match (self.mode, client_key) {
            (Mode::Platform, Some(_)) => Err(KeyError::MasterKeyNotApplicable),
            (Mode::Client, None) => Err(KeyError::MasterKeyRequired),
            _ => Ok(()),
        }
    }

    /// The version encrypt uses: the active one, or `version` when named,
    /// which must be `active` or `enabled` and not below the minimum
    /// decryption version (a ciphertext no one could decrypt is not worth
    /// making).
    pub fn key_for_encrypt(&self, version: Option<VersionId>) -> Result<&KeyVersion, KeyError> {
        let v = match version {
            None => self.active_version()?,
            Some(id) => self.version(id).ok_or(KeyError::VersionNotFound)?,
        };
        match v.state {
            VersionState::Active | VersionState::Enabled => {}
            VersionState::DecryptOnly => return Err(KeyError::VersionNotEncryptable),
            VersionState::Disabled => return Err(KeyError::VersionDisabled),
            VersionState::Destroyed => return Err(KeyError::VersionDestroyed),
        }
        if v.number < self.min_decryption_version {
            return Err(KeyError::VersionBelowMinimum);
        }
        Ok(v)
    }

    /// The version that decrypts a ciphertext made under `version`. A version
    /// id that is not this encryption's is a ciphertext presented under the
    /// wrong encryption: the same answer as any other mismatch.
    pub fn key_for_decrypt(&self, version: VersionId) -> Result<&KeyVersion, KeyError> {
        let v = self.version(version).ok_or(KeyError::DecryptionFailed)?;
        match v.state {
            VersionState::Disabled => Err(KeyError::VersionDisabled),
            VersionState::Destroyed => Err(KeyError::VersionDestroyed),
            _ if v.number < self.min_decryption_version => Err(KeyError::VersionBelowMinimum),
            VersionState::Active | VersionState::Enabled | VersionState::DecryptOnly => Ok(v),
        }
    }

    /// Runs `f` with the version's key: the loaded one in platform mode, or
    /// one unwrapped for this call only from the client's key in client mode.
    pub fn with_key<R>(
        &self,
        version: &KeyVersion,
        client_key: Option<&ClientKey>,
        f: impl FnOnce(&CipherKey) -> R,
    ) -> Result<R, KeyError> {
        match (&version.key, client_key) {
            (VersionKey::Destroyed, _) => Err(KeyError::VersionDestroyed),
            (VersionKey::Ready(key), None) => Ok(f(key)),
            // Not an AES key: the caller's algorithm check failed to route
            // it; answer like any mismatch rather than panic.
            (VersionKey::Rsa(_), _) => Err(KeyError::DecryptionFailed),
            (VersionKey::ClientWrapped(wrapped), Some(ck)) => {
                let wrapping = self.client_wrapping_key(ck);
                let aad = data_key_aad(
                    self.id.as_bytes(),
                    version.id.as_bytes(),
                    &CLIENT_WRAPPING_ID,
                );
                let key = wrapping
                    .unwrap_key(wrapped, &aad)
                    .map_err(|_| KeyError::MasterKeyMismatch)?;
                Ok(f(&key.cipher()))
            }
            (VersionKey::Ready(_), Some(_)) => Err(KeyError::MasterKeyNotApplicable),
            (VersionKey::ClientWrapped(_), None) => Err(KeyError::MasterKeyRequired),
        }
    }

    /// The key that wraps this encryption's data keys in client mode, derived
    /// from the caller's key for this request only.
    pub fn client_wrapping_key(&self, client_key: &ClientKey) -> CipherKey {
        client_wrapping_key(client_key, &self.salt, self.id)
    }

    /// The invariants every loaded object holds: a row for the version
    /// `active` names; numbers strictly increasing; the minimum decryption
    /// version from 1 to the active version's number; a destroyed version
    /// holds no key material.
    ///
    /// Not checked, on purpose: that exactly one version is `active`. The
    /// encryption row and its versions are read in two queries, so a rotation
    /// elsewhere may show the new version `active` beside the older id this
    /// object names; the change feed soon replaces it. A live version whose
    /// key is missing from its row answers like a destroyed one, as it always
    /// has; the loader logs it.
    pub fn check(&self) -> Result<(), KeyError> {
        let fail = |what: &str| {
            Err(KeyError::Integrity(format!(
                "encryption {}: {what}",
                self.id
            )))
        };
        let Some(active) = self.version(self.active) else {
            return fail("no row for its active version");
        };
        if self.versions.windows(2).any(|w| w[0].number >= w[1].number) {
            return fail("version numbers out of order");
        }
        if !(1..=active.number).contains(&self.min_decryption_version) {
            return fail("minimum decryption version outside 1 to the active version");
        }
        let holds_key = |v: &KeyVersion| !matches!(v.key, VersionKey::Destroyed);
        if self
            .versions
            .iter()
            .any(|v| v.state == VersionState::Destroyed && holds_key(v))
        {
            return fail("a destroyed version still holds key material");
        }
        Ok(())
    }
}

/// The key that wraps encryption `id`'s data keys in client mode:
/// HKDF-SHA256 of the client's key with the encryption's salt.
pub fn client_wrapping_key(client_key: &ClientKey, salt: &[u8], id: EncryptionId) -> CipherKey {
    derive_client_wrapping_key(&client_key.0, salt, id.as_bytes()).cipher()
}

/// Whether a version may move from `current` to `to`. The active version
/// changes only by rotation; a destroyed version never comes back.
pub fn check_state_change(current: VersionState, to: VersionState) -> Result<(), KeyError> {
    match (current, to) {
        (VersionState::Active, _) => Err(KeyError::InvalidStateChange(
            "the active version cannot change state: rotate first",
        )),
        (_, VersionState::Active) => Err(KeyError::InvalidStateChange(
            "a version becomes active only by rotation",
        )),
        (VersionState::Destroyed, _) => Err(KeyError::InvalidStateChange(
            "a destroyed version's key material is gone for good",
        )),
        _ => Ok(()),
    }
}

/// Whether a policy change is valid for an encryption in `mode` whose active
/// version is numbered `active`: a minimum decryption version from 1 to the
/// active version, a rotation period of at least a second, and no period for a
/// client-mode encryption (Keyward does not hold its key, so it cannot rotate).
pub fn check_policy(
    mode: Mode,
    active: i64,
    period: Option<Option<Duration>>,
    min_decryption_version: Option<i64>,
) -> Result<(), KeyError> {
    if let Some(min) = min_decryption_version {
        if min < 1 || min > active {
            return Err(KeyError::InvalidPolicy(format!(
                "`minDecryptionVersion` must be from 1 to the active version ({active})"
            )));
        }
    }
    if let Some(Some(p)) = period {
        if p < Duration::from_secs(1) {
            return Err(KeyError::InvalidPolicy(
                "`autoRotatePeriod` must be at least 1s".into(),
            ));
        }
        if mode == Mode::Client {
            return Err(KeyError::InvalidPolicy(
                "a client-mode encryption cannot rotate by itself: Keyward does not hold its key"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// A fresh RSA key of `bits`, made on a blocking thread (RSA key generation
/// takes tens to hundreds of milliseconds, which would stall the runtime).
pub async fn generate_rsa(bits: RsaBits) -> Result<RsaPrivateKey, KeyError> {
    rsa_private_work(move || RsaPrivateKey::generate(bits))
        .await?
        .map_err(|e| KeyError::Integrity(format!("RSA key generation failed: {e}")))
}

/// Opens `ciphertext` (a JWE or one OAEP block, the `kid` being version
/// `vid`'s id, `label` the caller's binding) with `key`'s RSA version `vid`,
/// through [`rsa_private_work`]: the one way every RSA decryption runs.
/// Anything that does not open, or a version that is not RSA, is
/// [`KeyError::DecryptionFailed`].
pub async fn rsa_open(
    key: Arc<VersionedKey>,
    vid: VersionId,
    ciphertext: Vec<u8>,
    label: Option<Vec<u8>>,
) -> Result<SecretBytes, KeyError> {
    rsa_private_work(move || match key.version(vid) {
        Some(KeyVersion {
            key: VersionKey::Rsa(rsa),
            ..
        }) => rsa.open(&ciphertext, &vid.to_string(), label.as_deref()),
        _ => Err(()),
    })
    .await?
    .map_err(|()| KeyError::DecryptionFailed)
}

/// Runs RSA private-key work (a decryption: about a millisecond at 3072
/// bits; an unwrap; a key generation) on tokio's blocking threads, at most
/// as many at once as there are CPUs: on the async workers it would stall
/// every other request on the same worker, and unbounded it would start a
/// blocking thread per waiting request. Callers beyond the bound wait here,
/// within their request's time limit.
pub async fn rsa_private_work<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, KeyError> {
    static SLOTS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    let slots = SLOTS.get_or_init(|| {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        Arc::new(tokio::sync::Semaphore::new(cpus))
    });
    let slot = slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| KeyError::Integrity("the RSA work pool is closed".into()))?;
    tokio::task::spawn_blocking(move || {
        let out = work();
        drop(slot);
        out
    })
    .await
    .map_err(|e| KeyError::Integrity(format!("RSA work stopped: {e}")))
}

/// `key` as PKCS#8 DER (cleared on drop), to be wrapped.
pub fn pkcs8(key: &RsaPrivateKey) -> Result<zeroize::Zeroizing<Vec<u8>>, KeyError> {
    key.pkcs8()
        .map_err(|e| KeyError::Integrity(format!("cannot serialize an RSA key: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::DataKey;

    fn version(number: i64, state: VersionState) -> KeyVersion {
        KeyVersion {
            id: VersionId::new_random(),
            number,
            state,
            key: match state {
                VersionState::Destroyed => VersionKey::Destroyed,
                _ => VersionKey::Ready(DataKey::generate().cipher()),
            },
            uses: Arc::new(UseCount::default()),
        }
    }

    /// Versions 1..=n with the given states; the one `Active` is active.
    fn key(states: &[VersionState], min: i64) -> VersionedKey {
        let versions: Vec<KeyVersion> = states
            .iter()
            .enumerate()
            .map(|(i, s)| version(i as i64 + 1, *s))
            .collect();
        let active = versions
            .iter()
            .find(|v| v.state == VersionState::Active)
            .map(|v| v.id)
            .unwrap_or(versions[0].id);
        VersionedKey {
            loaded_at: Instant::now(),
            id: EncryptionId::new_random(),
            tenant_id: TenantId::new_random(),
            mode: Mode::Platform,
            algorithm: Algorithm::Aes256Gcm,
            indexes: Vec::new(),
            rsa_bits: None,
            salt: vec![0; 32],
            active,
            min_decryption_version: min,
            versions,
        }
    }

    use VersionState::{Active, DecryptOnly, Destroyed, Disabled, Enabled};

    #[test]
    fn encrypt_uses_the_active_version_unless_one_is_named() {
        let k = key(&[Enabled, DecryptOnly, Active], 1);
        assert_eq!(k.key_for_encrypt(None).unwrap().number, 3);
        let v1 = k.versions[0].id;
        assert_eq!(k.key_for_encrypt(Some(v1)).unwrap().number, 1);
    }

    #[test]
    fn encrypt_refuses_versions_that_cannot_encrypt() {
        let k = key(&[DecryptOnly, Disabled, Destroyed, Enabled, Active], 4);
        let id = |i: usize| Some(k.versions[i].id);
        assert!(matches!(
            k.key_for_encrypt(id(0)),
            Err(KeyError::VersionNotEncryptable)
        ));
        assert!(matches!(
            k.key_for_encrypt(id(1)),
            Err(KeyError::VersionDisabled)
        ));
        assert!(matches!(
            k.key_for_encrypt(id(2)),
            Err(KeyError::VersionDestroyed)
        ));
        assert!(k.key_for_encrypt(id(3)).is_ok());
        assert!(matches!(
            k.key_for_encrypt(Some(VersionId::new_random())),
            Err(KeyError::VersionNotFound)
        ));
    }

    #[test]
    fn encrypt_under_a_version_below_the_minimum_is_refused() {
        let k = key(&[Enabled, Active], 2);
        let v1 = Some(k.versions[0].id);
        assert!(matches!(
            k.key_for_encrypt(v1),
            Err(KeyError::VersionBelowMinimum)
        ));
    }

    #[test]
    fn decrypt_follows_the_version_states_and_the_minimum() {
        let k = key(&[Enabled, DecryptOnly, Disabled, Destroyed, Active], 2);
        let id = |i: usize| k.versions[i].id;
        assert!(matches!(
            k.key_for_decrypt(id(0)),
            Err(KeyError::VersionBelowMinimum)
        ));
        assert!(k.key_for_decrypt(id(1)).is_ok());
        assert!(matches!(
            k.key_for_decrypt(id(2)),
            Err(KeyError::VersionDisabled)
        ));
        assert!(matches!(
            k.key_for_decrypt(id(3)),
            Err(KeyError::VersionDestroyed)
        ));
        assert!(k.key_for_decrypt(id(4)).is_ok());
    }

    #[test]
    fn decrypt_under_another_encryptions_version_is_a_plain_decryption_failure() {
        let k = key(&[Active], 1);
        assert!(matches!(
            k.key_for_decrypt(VersionId::new_random()),
            Err(KeyError::DecryptionFailed)
        ));
    }

    #[test]
    fn a_client_key_is_required_exactly_in_client_mode() {
        let mut k = key(&[Active], 1);
        let ck = ClientKey::from_base64(&"A".repeat(44)).unwrap();
        assert!(k.check_mode(None).is_ok());
        assert!(matches!(
            k.check_mode(Some(&ck)),
            Err(KeyError::MasterKeyNotApplicable)
        ));
        k.mode = Mode::Client;
        assert!(matches!(
            k.check_mode(None),
            Err(KeyError::MasterKeyRequired)
        ));
        assert!(k.check_mode(Some(&ck)).is_ok());
    }

    #[test]
    fn check_accepts_a_sound_key_and_names_each_broken_invariant() {
        assert!(key(&[Enabled, Destroyed, Active], 1).check().is_ok());
        let mut k = key(&[Enabled, Active], 1);
        k.active = VersionId::new_random();
        assert!(k.check().is_err(), "no row for the active version");
        let mut k = key(&[Enabled, Active], 1);
        k.versions[1].number = 1;
        assert!(k.check().is_err(), "numbers out of order");
        assert!(
            key(&[Enabled, Active], 3).check().is_err(),
            "minimum above the active"
        );
        assert!(
            key(&[Enabled, Active], 0).check().is_err(),
            "minimum below 1"
        );
        let mut k = key(&[Destroyed, Active], 1);
        k.versions[0].key = VersionKey::Ready(DataKey::generate().cipher());
        assert!(
            k.check().is_err(),
            "key material left in a destroyed version"
        );
    }

    #[test]
    fn state_changes_never_touch_the_active_version_nor_revive_a_destroyed_one() {
        for to in [Enabled, DecryptOnly, Disabled, Destroyed] {
            assert!(check_state_change(Active, to).is_err());
            assert!(check_state_change(Destroyed, to).is_err());
        }
        for from in [Enabled, DecryptOnly, Disabled] {
            assert!(check_state_change(from, Active).is_err());
            for to in [Enabled, DecryptOnly, Disabled, Destroyed] {
                assert!(check_state_change(from, to).is_ok(), "{from:?} -> {to:?}");
            }
        }
    }

    #[test]
    fn policies_keep_the_minimum_in_range_and_client_keys_out_of_auto_rotation() {
        let day = Some(Some(Duration::from_secs(86_400)));
        assert!(check_policy(Mode::Platform, 3, day, Some(3)).is_ok());
        assert!(check_policy(Mode::Platform, 3, None, Some(4)).is_err());
        assert!(check_policy(Mode::Platform, 3, None, Some(0)).is_err());
        assert!(check_policy(
            Mode::Platform,
            3,
            Some(Some(Duration::from_millis(10))),
            None
        )
        .is_err());
        assert!(check_policy(Mode::Client, 3, day, None).is_err());
        assert!(check_policy(Mode::Client, 3, Some(None), Some(2)).is_ok());
    }
}
