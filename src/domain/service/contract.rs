//! The v1 contract: encrypt, decrypt, rewrap, rotate. Encrypt and decrypt of a
//! platform-managed key touch only the key ring in steady state.

use super::state::KeyService;
use crate::crypto::{
    self, context_binding, data_aad, data_key_aad, deterministic_aad, siv_nonce, siv_open,
    siv_seal, DataKey, SivKey, NONCE_LEN,
};
use crate::domain::algorithm::Algorithm;
use crate::domain::client_key::ClientKey;
use crate::domain::error::KeyError;
use crate::domain::ids::{EncryptionId, TenantId, VersionId};
use crate::domain::keys::{client_wrapping_key, rsa_open, VersionKey, CLIENT_WRAPPING_ID};
use crate::domain::time::now_ms;
use crate::store::{NewVersion, StoreError};

/// The result of an encryption.
#[derive(Debug)]
pub struct Encrypted {
    /// The encryption's algorithm.
    pub algorithm: Algorithm,
    /// The version used.
    pub version_id: VersionId,
    /// The nonce (goes into the response's metadata); `None` for
    /// RSA-OAEP-256, whose ciphertext carries all it needs.
    pub nonce: Option<[u8; NONCE_LEN]>,
    /// Ciphertext with tag (AES-256-GCM), or one RSA-OAEP block or a compact
    /// JWE (RSA-OAEP-256, see `crypto::RsaPrivateKey`).
    pub ciphertext: Vec<u8>,
}

/// A ciphertext as the contract carries it back: the version that made it,
/// the nonce from its metadata (absent or malformed: `None`, which fails like
/// any mismatch), and the sealed bytes with their tag.
#[derive(Debug, Clone, Copy)]
pub struct Sealed<'a> {
    /// The contract's `encryptionVersionId`.
    pub version: VersionId,
    /// The nonce, if the metadata held a well-formed one.
    pub nonce: Option<[u8; NONCE_LEN]>,
    /// Ciphertext with tag.
    pub ciphertext: &'a [u8],
    /// The context it was made under (deterministic encryptions; empty:
    /// none).
    pub context: &'a [u8],
}

impl<'a> Sealed<'a> {
    /// The ciphertext `ciphertext` made by `version` with `nonce`.
    pub fn new(version: VersionId, nonce: Option<[u8; NONCE_LEN]>, ciphertext: &'a [u8]) -> Self {
        Sealed {
            version,
            nonce,
            ciphertext,
            context: &[],
        }
    }

    /// The same ciphertext, made under `context`.
    pub fn with_context(self, context: &'a [u8]) -> Self {
        Sealed { context, ..self }
    }
}

/// The label of the deterministic-encryption key's derivation.
const SIV_KEY_LABEL: &str = "keyward:siv:v1";

/// The AES-256-GCM-SIV key of encryption `id`'s version `version`: derived
/// from the version's data key, which itself only ever runs AES-256-GCM.
fn siv_key(k: &crypto::CipherKey, id: EncryptionId, version: VersionId) -> SivKey {
    SivKey::new(&k.derive(SIV_KEY_LABEL, &[id.as_bytes(), version.as_bytes()]))
}

impl KeyService {
    /// Encrypts `plaintext` under the active version, or under `version` if given
    /// (which must be `active` or `enabled`). A deterministic encryption
    /// (AES-256-GCM-SIV) gives equal ciphertexts for equal plaintexts under
    /// the same version and `context`. A `context` (empty: none) is bound
    /// into every algorithm's associated data and needed again to decrypt.
    pub async fn encrypt(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        version: Option<VersionId>,
        plaintext: &[u8],
        context: &[u8],
        client_key: Option<&ClientKey>,
    ) -> Result<Encrypted, KeyError> {
        let key = self.entry(tenant, id).await?;
        key.check_mode(client_key)?;
        self.check_client_key_attempts(id, client_key)?;
        let key = match version {
            None => key,
            Some(v) => self.entry_with_version(key, v).await?,
        };
        let version = key.key_for_encrypt(version)?;
        // The nonce bound, on every version that encrypts (the active one,
        // or an enabled one named explicitly), before the nonce is drawn:
        // counted with this replica's uses not yet recorded, so a replica
        // that cannot record them stops here instead of running past it.
        if !version.uses.take(self.max_encryptions_per_version) {
            return Err(
                if version.id == key.active && key.mode == crate::domain::keys::Mode::Platform {
                    // Spent, and replaced by an automatic rotation as soon
                    // as its count is recorded: retry shortly.
                    tracing::warn!(encryption_id = %id, version_id = %version.id, "the active version reached the nonce bound: encryptions wait for its count to be recorded and the version rotated");
                    KeyError::RotationPending
                } else {
                    // Nothing will make it encrypt again.
                    KeyError::VersionExhausted
                },
            );
        }
        if let VersionKey::Rsa(rsa) = &version.key {
            // Public-key encryption: no nonce to bound, but counted all the
            // same (the versions' counts stay comparable).
            let binding = (!context.is_empty())
                .then(|| context_binding(id.as_bytes(), version.id.as_bytes(), context));
            let ciphertext =
                rsa.public()
                    .seal(plaintext, &version.id.to_string(), binding.as_deref());
            return Ok(Encrypted {
                version_id: version.id,
                algorithm: Algorithm::RsaOaep256,
                nonce: None,
                ciphertext,
            });
        }
        let vid = version.id;
        let sealed = key.with_key(version, client_key, |k| match key.algorithm {
            Algorithm::Aes256GcmSiv => {
                let nonce = siv_nonce(context);
                let aad = deterministic_aad(id.as_bytes(), vid.as_bytes(), context);
                (
                    nonce,
                    siv_seal(&siv_key(k, id, vid), &nonce, &aad, plaintext),
                )
            }
            // An RSA encryption's versions hold RSA keys (handled above); an
            // AES key under one would still only ever run AES-256-GCM.
            Algorithm::Aes256Gcm | Algorithm::RsaOaep256 => {
                // No context: the 48-byte associated data on the stack, as
                // always; a context appends its binding (`context_binding`).
                let sealed = if context.is_empty() {
                    crypto::seal(k, &data_aad(id.as_bytes(), vid.as_bytes()), plaintext)
                } else {
                    crypto::seal(
                        k,
                        &context_binding(id.as_bytes(), vid.as_bytes(), context),
                        plaintext,
                    )
                };
                (sealed.nonce, sealed.ciphertext)
            }
        });
        let (nonce, ciphertext) = self
            .count_client_key(id, sealed)
            .inspect_err(|_| version.uses.give_back())?;
        Ok(Encrypted {
            algorithm: key.algorithm,
            version_id: vid,
            nonce: Some(nonce),
            ciphertext,
        })
    }

    /// Decrypts a ciphertext made by [`KeyService::encrypt`]. A wrong version,
    /// nonce, ciphertext or encryption all give [`KeyError::DecryptionFailed`].
    /// The plaintext comes in memory cleared on drop (see [`crypto::open`]).
    pub async fn decrypt(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        sealed: Sealed<'_>,
        client_key: Option<&ClientKey>,
    ) -> Result<crypto::SecretBytes, KeyError> {
        let Sealed {
            version,
            nonce,
            ciphertext,
            context,
        } = sealed;
        let key = self.entry(tenant, id).await?;
        key.check_mode(client_key)?;
        self.check_client_key_attempts(id, client_key)?;
        let key = match self.entry_with_version(key, version).await {
            Ok(k) => k,
            // Not this encryption's version: the same answer as any mismatch.
            Err(KeyError::VersionNotFound) => return Err(KeyError::DecryptionFailed),
            Err(e) => return Err(e),
        };
        let v = key.key_for_decrypt(version)?;
        if let VersionKey::Rsa(_) = &v.key {
            // The metadata carries nothing for RSA-OAEP-256 (the JWE header
            // is authenticated by the tag; a block has no header): ignored.
            let vid = v.id;
            let binding = (!context.is_empty())
                .then(|| context_binding(id.as_bytes(), vid.as_bytes(), context));
            return rsa_open(key.clone(), vid, ciphertext.to_vec(), binding).await;
        }
        let nonce = nonce.ok_or(KeyError::DecryptionFailed)?;
        let vid = v.id;
        let opened = key.with_key(v, client_key, |k| match key.algorithm {
            Algorithm::Aes256GcmSiv => {
                let aad = deterministic_aad(id.as_bytes(), vid.as_bytes(), context);
                siv_open(&siv_key(k, id, vid), &nonce, &aad, ciphertext)
            }
            Algorithm::Aes256Gcm | Algorithm::RsaOaep256 if context.is_empty() => crypto::open(
                k,
                &nonce,
                &data_aad(id.as_bytes(), vid.as_bytes()),
                ciphertext,
            ),
            Algorithm::Aes256Gcm | Algorithm::RsaOaep256 => crypto::open(
                k,
                &nonce,
                &context_binding(id.as_bytes(), vid.as_bytes(), context),
                ciphertext,
            ),
        });
        self.count_client_key(id, opened)?
            .map_err(|()| KeyError::DecryptionFailed)
    }

    /// Re-encrypts a ciphertext under the active version: decrypt, then encrypt,
    /// with the plaintext held only in zeroizing memory inside this call.
    pub async fn rewrap(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        sealed: Sealed<'_>,
        client_key: Option<&ClientKey>,
    ) -> Result<Encrypted, KeyError> {
        let plaintext = self.decrypt(tenant, id, sealed, client_key).await?;
        self.encrypt(tenant, id, None, &plaintext, sealed.context, client_key)
            .await
    }

    /// Makes a new version active; every older version keeps decrypting.
    pub async fn rotate(
        &self,
        tenant: TenantId,
        id: EncryptionId,
        client_key: Option<&ClientKey>,
    ) -> Result<VersionId, KeyError> {
        let key = self.entry(tenant, id).await?;
        key.check_mode(client_key)?;
        self.check_client_key_attempts(id, client_key)?;
        let new_id = VersionId::new_random();
        let data_key = DataKey::generate();
        let new_version = match client_key {
            None if key.algorithm == Algorithm::RsaOaep256 => {
                let bits = key.rsa_bits.unwrap_or(crypto::RsaBits::B3072);
                let rsa = crate::domain::keys::generate_rsa(bits).await?;
                self.wrap_platform_material(id, new_id, &crate::domain::keys::pkcs8(&rsa)?, false)?
            }
            None => self.wrap_platform_key(id, new_id, &data_key)?,
            Some(ck) => {
                // Prove the caller's key is the encryption's key before adding a
                // version under it: otherwise a wrong key would create a version
                // nobody else can use.
                let active = key.active_version()?;
                if let VersionKey::ClientWrapped(_) = &active.key {
                    self.count_client_key(id, key.with_key(active, Some(ck), |_| ()))?;
                }
                wrap_client_key(id, &key.salt, ck, new_id, &data_key)
            }
        };
        let outcome = match self.store.rotate(tenant, id, &new_version, now_ms()).await {
            Err(StoreError::StaleReference(e)) => {
                // Wrapped under a root KEK another replica retired after a
                // root-KEK rotation this process has not heard of yet: learn
                // the new one (or find out this process is stranded on a
                // replaced master key), and let the caller retry: 503.
                if let Err(reload) = self.load_root_keys().await {
                    tracing::warn!(error = %reload, "cannot reload the root keys after a stale root KEK");
                }
                return Err(KeyError::Store(StoreError::StaleReference(e)));
            }
            other => other?,
        }
        .ok_or(KeyError::EncryptionNotFound)?;
        self.ring.invalidate(id);
        tracing::info!(encryption_id = %id, new_version = outcome.new_version, version_id = %outcome.new_version_id, "rotated");
        Ok(outcome.new_version_id)
    }
}

impl KeyService {
    /// Refuses a call with a client key on an encryption that has seen too
    /// many wrong ones lately. Per encryption, as the bound on guessing must
    /// be: it can be aimed, but only by a caller who already holds one of the
    /// tenant's keys with `encrypt`, `decrypt` or `rotate` (even a key that
    /// could not otherwise change the encryption); without it, such a caller
    /// could try client keys as fast as the service answers. A right key is
    /// refused too while the lock lasts, since letting it through would tell
    /// a guesser which guess was right.
    pub(super) fn check_client_key_attempts(
        &self,
        id: EncryptionId,
        client_key: Option<&ClientKey>,
    ) -> Result<(), KeyError> {
        match client_key.and_then(|_| self.client_key_failures.locked(&id)) {
            Some(left) => Err(KeyError::TooManyMasterKeyAttempts(left)),
            None => Ok(()),
        }
    }

    /// Counts `result` against the encryption if it is a wrong client key.
    pub(super) fn count_client_key<R>(
        &self,
        id: EncryptionId,
        result: Result<R, KeyError>,
    ) -> Result<R, KeyError> {
        if let Err(KeyError::MasterKeyMismatch) = &result {
            metrics::counter!("keyward_client_key_failures_total").increment(1);
            if self.client_key_failures.fail(&id) {
                tracing::warn!(encryption_id = %id, "too many wrong client master keys: calls with a client key on this encryption refused for a while");
            }
        }
        result
    }
}

/// A new version's data key wrapped under the key derived from the client's
/// key (client mode: the row is useless without that key).
pub(super) fn wrap_client_key(
    id: EncryptionId,
    salt: &[u8],
    client_key: &ClientKey,
    version: VersionId,
    data_key: &DataKey,
) -> NewVersion {
    let aad = data_key_aad(id.as_bytes(), version.as_bytes(), &CLIENT_WRAPPING_ID);
    NewVersion {
        id: version,
        wrapped_key: client_wrapping_key(client_key, salt, id)
            .wrap(data_key, &aad)
            .0,
        kek_id: None,
        imported: false,
    }
}

/// Properties over random inputs (proptest): whatever the plaintexts, the
/// mode, the versions named and the rotations between them, every ciphertext
/// decrypts to its plaintext under the version that made it, and any single
/// flipped bit in its ciphertext, tag, nonce (the contract's metadata),
/// version id or encryption id is refused.
#[cfg(test)]
mod properties {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;
    use crate::crypto::TAG_LEN;
    use crate::master_key::EnvMasterKey;
    use crate::store::Store;

    /// What one step does before it encrypts.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// Encrypt under the active version.
        Active,
        /// Rotate, then encrypt under the new active version.
        RotateFirst,
        /// Encrypt naming an older version (`enabled` after a rotation).
        NameEarlier(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            Just(Step::Active),
            Just(Step::RotateFirst),
            any::<usize>().prop_map(Step::NameEarlier),
        ]
    }

    /// Where a bit is flipped.
    #[derive(Debug, Clone, Copy)]
    enum Part {
        Ciphertext,
        Tag,
        Nonce,
        Version,
        Encryption,
    }

    fn part() -> impl Strategy<Value = Part> {
        prop_oneof![
            Just(Part::Ciphertext),
            Just(Part::Tag),
            Just(Part::Nonce),
            Just(Part::Version),
            Just(Part::Encryption),
        ]
    }

    fn flip<const N: usize>(mut bytes: [u8; N], bit: usize) -> [u8; N] {
        bytes[(bit / 8) % N] ^= 1 << (bit % 8);
        bytes
    }

    fn run(
        client_mode: bool,
        steps: Vec<(Vec<u8>, Step)>,
        flips: Vec<(usize, Part, usize)>,
    ) -> Result<(), TestCaseError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        rt.block_on(async move {
            let store = Store::connect("sqlite::memory:", 1).await.unwrap();
            store.migrate().await.unwrap();
            let service = KeyService::new(
                store.clone(),
                Arc::new(EnvMasterKey::new(&DataKey::generate())),
                16,
            );
            service.load_root_keys().await.unwrap();
            let tenant = crate::domain::accounts::create_tenant(&store, "acme")
                .await
                .unwrap()
                .tenant
                .id;
            let ck = client_mode.then(|| ClientKey::from_base64(&"Q".repeat(44)).unwrap());
            let ck = ck.as_ref();
            let created = service
                .create_encryption(tenant, super::super::EncryptionOptions::aes(None), ck)
                .await
                .unwrap();
            let id = created.encryption.id;
            let mut versions = vec![created.encryption.active_version_id];
            let mut made = Vec::new();
            for (plaintext, step) in &steps {
                let named = match *step {
                    Step::Active => None,
                    Step::RotateFirst => {
                        versions.push(service.rotate(tenant, id, ck).await.unwrap());
                        None
                    }
                    Step::NameEarlier(i) => Some(versions[i % versions.len()]),
                };
                let out = service
                    .encrypt(tenant, id, named, plaintext, &[], ck)
                    .await
                    .unwrap();
                if let Some(v) = named {
                    prop_assert_eq!(out.version_id, v);
                }
                made.push((plaintext.clone(), out));
            }
            for (plaintext, out) in &made {
                let sealed = Sealed::new(out.version_id, out.nonce, &out.ciphertext);
                let opened = service.decrypt(tenant, id, sealed, ck).await.unwrap();
                prop_assert_eq!(&*opened, plaintext.as_slice());
            }
            for (which, part, bit) in flips {
                let (_, out) = &made[which % made.len()];
                let body = out.ciphertext.len() - TAG_LEN;
                let mut ciphertext = out.ciphertext.clone();
                let (mut nonce, mut version, mut enc) = (out.nonce.unwrap(), out.version_id, id);
                match part {
                    Part::Ciphertext if body > 0 => ciphertext[(bit / 8) % body] ^= 1 << (bit % 8),
                    Part::Ciphertext | Part::Tag => {
                        ciphertext[body + (bit / 8) % TAG_LEN] ^= 1 << (bit % 8)
                    }
                    Part::Nonce => nonce = flip(nonce, bit),
                    Part::Version => {
                        version = VersionId(uuid::Uuid::from_bytes(flip(*version.as_bytes(), bit)))
                    }
                    Part::Encryption => {
                        enc = EncryptionId(uuid::Uuid::from_bytes(flip(*enc.as_bytes(), bit)))
                    }
                }
                let sealed = Sealed::new(version, Some(nonce), &ciphertext);
                let result = service.decrypt(tenant, enc, sealed, ck).await;
                prop_assert!(result.is_err(), "a flipped bit in {:?} decrypted", part);
            }
            Ok(())
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn every_ciphertext_round_trips_and_any_flipped_bit_is_refused(
            client_mode in any::<bool>(),
            steps in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..300), step()),
                1..8,
            ),
            flips in proptest::collection::vec((any::<usize>(), part(), any::<usize>()), 1..16),
        ) {
            run(client_mode, steps, flips)?;
        }
    }
}
