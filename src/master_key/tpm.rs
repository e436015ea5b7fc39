//! The `tpm` provider: the root KEK is wrapped (AES-256-GCM, binding the KEK
//! id, as the `env` provider does) by a 32-byte wrapping key that only a TPM
//! 2.0 can give back, because it is sealed to that TPM.
//!
//! Sealing: the TPM re-creates its storage primary key (ECC P-256, the TCG SRK
//! template) under the owner hierarchy, and a sealed data object holding the
//! wrapping key is created under that primary (`TPM2_Create`), optionally with
//! a policy that lets it be unsealed only while the PCRs named by
//! `KEYWARD_TPM_PCRS` (SHA-256 bank) hold the values they held at sealing.
//! The object's public and private parts (the private part encrypted by the
//! TPM under a key derived from its owner seed) are stored with the wrapped
//! KEK in the database, in the row the wrap belongs to: nothing is stored on
//! the TPM (no persistent handle, no NV index) and no file needs keeping.
//!
//! Unsealing, at start: the primary is re-created (the same one, as long as
//! the owner hierarchy is not cleared), the object is loaded under it
//! (`TPM2_Load`, which another TPM refuses: its primary is not the one the
//! private part was protected under) and unsealed (`TPM2_Unseal`, which the
//! PCR policy refuses if the PCRs have changed). Every command that carries
//! the wrapping key runs in a session salted to the primary with parameter
//! encryption, so the key does not cross the TPM's bus or socket in the clear.
//!
//! Each wrap seals a new wrapping key (one sealed object per root KEK); every
//! call connects to the TPM, does its work, flushes what it loaded and
//! disconnects, so a TPM that goes away is an outage like a network
//! provider's, and one that comes back just works. The TSS is a blocking C
//! library: its calls run on tokio's blocking pool.

use std::str::FromStr;

use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::response_code::Tss2ResponseCodeKind as Rc;
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, ObjectHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Digest, EccPoint, KeyedHashScheme, PcrSelectionList, PcrSelectionListBuilder, PcrSlot, Private,
    Public, PublicBuilder, PublicEccParametersBuilder, PublicKeyedHashParameters, SensitiveData,
    SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::{Context, TctiNameConf};

use super::provider::{MasterKeyProvider, ProviderError, ProviderFuture};
use crate::crypto::{root_kek_aad, DataKey, WrappedKey};
use crate::domain::ids::KekId;

/// Marks (and versions) a TPM-wrapped root KEK.
const MAGIC: &[u8; 8] = b"kwtpm\0v1";

/// Settings of the TPM provider.
#[derive(Debug, Clone)]
pub struct TpmSettings {
    /// The TCTI: `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`,
    /// `mssim:...` or `tabrmd:...`.
    pub tcti: String,
    /// PCRs of the SHA-256 bank the wrapping key is sealed to (empty: none).
    pub pcrs: Vec<u8>,
}

impl TpmSettings {
    /// Checks a TCTI string (the same parser the TSS loader is given).
    pub fn check_tcti(tcti: &str) -> Result<(), String> {
        TctiNameConf::from_str(tcti).map(|_| ()).map_err(|_| {
            format!(
                "`{tcti}` is not a TCTI: use `device:/dev/tpmrm0`, `swtpm:host=HOST,port=PORT`, `mssim:host=HOST,port=PORT` or `tabrmd:`"
            )
        })
    }

    /// Parses a PCR list such as `0,2,7` (indexes 0 to 23; empty: none).
    pub fn parse_pcrs(v: &str) -> Result<Vec<u8>, String> {
        let mut pcrs = Vec::new();
        for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let pcr = part
                .parse::<u8>()
                .ok()
                .filter(|n| *n < 24)
                .ok_or_else(|| format!("`{part}` is not a PCR index (0 to 23)"))?;
            if !pcrs.contains(&pcr) {
                pcrs.push(pcr);
            }
        }
        pcrs.sort_unstable();
        Ok(pcrs)
    }
}

/// A TPM 2.0 reached through a TCTI.
pub struct Tpm {
    settings: TpmSettings,
}

impl Tpm {
    /// A provider; the TPM is not contacted until the first call.
    pub fn new(settings: TpmSettings) -> Tpm {
        Tpm { settings }
    }
}

/// A wrapped root KEK as stored: the sealed object that holds its wrapping
/// key, the PCRs that object is bound to, and the KEK wrapped under the key.
struct Blob {
    pcr_mask: u32,
    public: Vec<u8>,
    private: Vec<u8>,
    wrapped: Vec<u8>,
}

impl Blob {
    /// `MAGIC || pcr mask (u32 BE) || u16 BE length || public || u16 BE
    /// length || private || nonce || wrapped KEK || tag`.
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            MAGIC.len() + 8 + self.public.len() + self.private.len() + self.wrapped.len(),
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.pcr_mask.to_be_bytes());
        for part in [&self.public, &self.private] {
            // Both are TPM2B structures, whose sizes are u16 by definition.
            out.extend_from_slice(&(part.len() as u16).to_be_bytes());
            out.extend_from_slice(part);
        }
        out.extend_from_slice(&self.wrapped);
        out
    }

    fn decode(bytes: &[u8]) -> Option<Blob> {
        let rest = bytes.strip_prefix(MAGIC.as_slice())?;
        let (mask, mut rest) = rest.split_first_chunk::<4>()?;
        let mut part = || {
            let (len, tail) = rest.split_first_chunk::<2>()?;
            let len = u16::from_be_bytes(*len) as usize;
            let (part, tail) = (tail.get(..len)?, tail.get(len..)?);
            rest = tail;
            Some(part.to_vec())
        };
        let (public, private) = (part()?, part()?);
        Some(Blob {
            pcr_mask: u32::from_be_bytes(*mask),
            public,
            private,
            wrapped: rest.to_vec(),
        })
    }
}

fn pcr_mask(pcrs: &[u8]) -> u32 {
    pcrs.iter().fold(0, |m, p| m | (1u32 << p))
}

fn selection(mask: u32) -> Result<PcrSelectionList, ProviderError> {
    let slots: Vec<PcrSlot> = (0..24)
        .filter(|i| mask & (1 << i) != 0)
        .map(|i| PcrSlot::try_from(1u32 << i))
        .collect::<Result<_, _>>()
        .map_err(|e| ProviderError::Misconfigured(format!("PCR selection: {e}")))?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|e| ProviderError::Misconfigured(format!("PCR selection: {e}")))
}

/// The TCG storage root key template (ECC P-256, AES-128-CFB): the same
/// template gives the same key for as long as the owner seed is unchanged.
fn primary_template() -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()
}

/// The sealed data object's template: no unseal with a password when a PCR
/// policy is set (`userWithAuth` clear), never duplicable, exempt from
/// dictionary-attack lockout (it has no password to guess).
fn sealed_template(policy: Option<Digest>) -> Result<Public, tss_esapi::Error> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_no_da(true)
        .with_admin_with_policy(true)
        .with_user_with_auth(policy.is_none())
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_auth_policy(policy.unwrap_or_default())
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
}

/// One connection to the TPM and the transient handles it made, flushed when
/// it ends (a TPM without a resource manager, such as swtpm on a socket,
/// keeps transient objects loaded after the connection closes).
struct Connection {
    context: Context,
    loaded: Vec<ObjectHandle>,
    tcti: String,
}

impl Drop for Connection {
    fn drop(&mut self) {
        for handle in self.loaded.drain(..).rev() {
            // Best effort: a TPM that went away has flushed them anyway.
            let _ = self.context.flush_context(handle);
        }
    }
}

impl Connection {
    fn open(tcti: &str) -> Result<Connection, ProviderError> {
        let conf = TctiNameConf::from_str(tcti)
            .map_err(|e| ProviderError::Misconfigured(format!("TCTI `{tcti}`: {e}")))?;
        let context = Context::new(conf).map_err(|e| {
            ProviderError::Unavailable(format!("cannot reach the TPM at `{tcti}`: {e}"))
        })?;
        Ok(Connection {
            context,
            loaded: Vec::new(),
            tcti: tcti.to_string(),
        })
    }

    fn unavailable(&self, what: &str, e: tss_esapi::Error) -> ProviderError {
        ProviderError::Unavailable(format!("TPM at `{}`: {what} failed: {e}", self.tcti))
    }

    /// The storage primary key, re-created under the owner hierarchy.
    fn primary(&mut self) -> Result<KeyHandle, ProviderError> {
        let template = primary_template().map_err(|e| self.unavailable("primary template", e))?;
        let result = self
            .context
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.create_primary(Hierarchy::Owner, template, None, None, None, None)
            });
        match result {
            Ok(primary) => {
                self.loaded.push(primary.key_handle.into());
                Ok(primary.key_handle)
            }
            Err(tss_esapi::Error::Tss2Error(rc))
                if matches!(rc.kind(), Some(Rc::BadAuth | Rc::AuthFail)) =>
            {
                Err(ProviderError::Misconfigured(format!(
                    "the TPM at `{}` refuses the owner hierarchy's empty authorization value: \
                     Keyward creates its storage key under the owner hierarchy and needs it without a password",
                    self.tcti
                )))
            }
            Err(e) => Err(self.unavailable("creating the storage primary key", e)),
        }
    }

    /// A session salted to `primary` (so its keys are secret from anyone on
    /// the bus) with parameter encryption both ways.
    fn session(
        &mut self,
        primary: KeyHandle,
        kind: SessionType,
    ) -> Result<AuthSession, ProviderError> {
        let session = self
            .context
            .start_auth_session(
                Some(primary),
                None,
                None,
                kind,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(|e| self.unavailable("starting a session", e))?
            .ok_or_else(|| ProviderError::Unavailable("the TPM returned no session".to_string()))?;
        self.loaded
            .push(tss_esapi::handles::SessionHandle::from(session).into());
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_continue_session(true)
            .with_decrypt(true)
            .with_encrypt(true)
            .build();
        self.context
            .tr_sess_set_attributes(session, attributes, mask)
            .map_err(|e| self.unavailable("setting session attributes", e))?;
        Ok(session)
    }

    /// A policy session that has run `TPM2_PolicyPCR` over the PCRs in
    /// `mask` with their current values.
    fn pcr_policy(
        &mut self,
        primary: KeyHandle,
        mask: u32,
    ) -> Result<PolicySession, ProviderError> {
        let session = self.session(primary, SessionType::Policy)?;
        let policy = PolicySession::try_from(session)
            .map_err(|e| self.unavailable("starting a policy session", e))?;
        let selection = selection(mask)?;
        // An empty digest: the TPM uses the PCRs' current values.
        self.context
            .execute_without_session(|ctx| ctx.policy_pcr(policy, Digest::default(), selection))
            .map_err(|e| self.unavailable("PolicyPCR", e))?;
        Ok(policy)
    }

    /// Seals `key` under a new sealed data object; returns its public and
    /// private parts.
    fn seal(&mut self, key: &DataKey, mask: u32) -> Result<(Vec<u8>, Vec<u8>), ProviderError> {
        let primary = self.primary()?;
        let policy = if mask != 0 {
            let session = self.pcr_policy(primary, mask)?;
            Some(
                self.context
                    .execute_without_session(|ctx| ctx.policy_get_digest(session))
                    .map_err(|e| self.unavailable("PolicyGetDigest", e))?,
            )
        } else {
            None
        };
        let template =
            sealed_template(policy).map_err(|e| self.unavailable("sealed template", e))?;
        let sensitive = SensitiveData::try_from(key.expose().to_vec())
            .map_err(|e| self.unavailable("sealing", e))?;
        let session = self.session(primary, SessionType::Hmac)?;
        let created = self
            .context
            .execute_with_session(Some(session), |ctx| {
                ctx.create(primary, template, None, Some(sensitive), None, None)
            })
            .map_err(|e| self.unavailable("creating the sealed object", e))?;
        let public = created
            .out_public
            .marshall()
            .map_err(|e| self.unavailable("encoding the sealed object", e))?;
        Ok((public, created.out_private.value().to_vec()))
    }

    /// Loads and unseals a sealed wrapping key.
    fn unseal(&mut self, blob: &Blob) -> Result<DataKey, ProviderError> {
        let public = Public::unmarshall(&blob.public).map_err(|_| ProviderError::KeyMismatch)?;
        let private =
            Private::try_from(blob.private.clone()).map_err(|_| ProviderError::KeyMismatch)?;
        let primary = self.primary()?;
        let session = self.session(primary, SessionType::Hmac)?;
        let object = match self
            .context
            .execute_with_session(Some(session), |ctx| ctx.load(primary, private, public))
        {
            Ok(object) => object,
            Err(tss_esapi::Error::Tss2Error(rc)) if matches!(rc.kind(), Some(Rc::Integrity)) => {
                return Err(ProviderError::Misconfigured(format!(
                    "the TPM at `{}` cannot load the sealed wrapping key: it was sealed by a different TPM, \
                     or this TPM's owner hierarchy has been cleared since (TPM: {rc})",
                    self.tcti
                )))
            }
            Err(e) => return Err(self.unavailable("loading the sealed object", e)),
        };
        self.loaded.push(object.into());
        let session = if blob.pcr_mask != 0 {
            self.pcr_policy(primary, blob.pcr_mask)?.into()
        } else {
            session
        };
        let unsealed = match self
            .context
            .execute_with_session(Some(session), |ctx| ctx.unseal(object.into()))
        {
            Ok(data) => data,
            Err(tss_esapi::Error::Tss2Error(rc))
                if matches!(rc.kind(), Some(Rc::PolicyFail | Rc::Value | Rc::PcrChanged)) =>
            {
                return Err(ProviderError::Misconfigured(format!(
                    "the TPM at `{}` refuses to unseal the wrapping key: the PCRs it is sealed to ({}) \
                     no longer hold the values they held when it was sealed (TPM: {rc})",
                    self.tcti,
                    pcr_list(blob.pcr_mask)
                )))
            }
            Err(e) => return Err(self.unavailable("unsealing", e)),
        };
        // `SensitiveData` keeps its bytes in zeroizing memory.
        DataKey::from_slice(unsealed.value()).ok_or(ProviderError::KeyMismatch)
    }
}

fn pcr_list(mask: u32) -> String {
    (0..24)
        .filter(|i| mask & (1 << i) != 0)
        .map(|i: u32| i.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ProviderError> + Send + 'static,
) -> Result<T, ProviderError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ProviderError::Unavailable(format!("TPM call did not finish: {e}")))?
}

impl MasterKeyProvider for Tpm {
    fn name(&self) -> &'static str {
        "tpm"
    }

    fn key_setting(&self) -> &'static str {
        "the TPM at KEYWARD_TPM_TCTI"
    }

    fn wrap_root_kek<'a>(&'a self, kek_id: KekId, kek: &'a DataKey) -> ProviderFuture<'a, Vec<u8>> {
        let tcti = self.settings.tcti.clone();
        let pcr_mask = pcr_mask(&self.settings.pcrs);
        Box::pin(async move {
            let wrapping_key = DataKey::generate();
            let sealing_key = wrapping_key.clone();
            let (public, private) =
                blocking(move || Connection::open(&tcti)?.seal(&sealing_key, pcr_mask)).await?;
            let wrapped = wrapping_key
                .cipher()
                .wrap(kek, &root_kek_aad(kek_id.as_bytes()));
            Ok(Blob {
                pcr_mask,
                public,
                private,
                wrapped: wrapped.0,
            }
            .encode())
        })
    }

    fn unwrap_root_kek<'a>(
        &'a self,
        kek_id: KekId,
        wrapped: &'a [u8],
    ) -> ProviderFuture<'a, DataKey> {
        let tcti = self.settings.tcti.clone();
        let blob = Blob::decode(wrapped);
        Box::pin(async move {
            let blob = blob.ok_or(ProviderError::KeyMismatch)?;
            let wrapped = WrappedKey(blob.wrapped.clone());
            let wrapping_key = blocking(move || Connection::open(&tcti)?.unseal(&blob)).await?;
            wrapping_key
                .cipher()
                .unwrap_key(&wrapped, &root_kek_aad(kek_id.as_bytes()))
                .map_err(|_| ProviderError::KeyMismatch)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_round_trips_and_a_cut_one_is_refused() {
        let blob = Blob {
            pcr_mask: pcr_mask(&[0, 7, 23]),
            public: vec![1; 90],
            private: vec![2; 126],
            wrapped: vec![3; 60],
        };
        let bytes = blob.encode();
        let back = Blob::decode(&bytes).unwrap();
        assert_eq!(
            (back.pcr_mask, back.public, back.private, back.wrapped),
            (blob.pcr_mask, blob.public, blob.private, blob.wrapped)
        );
        assert_eq!(pcr_list(back.pcr_mask), "0,7,23");
        assert!(Blob::decode(&bytes[..20]).is_none());
        assert!(Blob::decode(b"kwtpm\0v2whatever").is_none());
    }

    #[test]
    fn pcr_lists_and_tctis_are_checked() {
        assert_eq!(TpmSettings::parse_pcrs("7, 0,7").unwrap(), vec![0, 7]);
        assert_eq!(TpmSettings::parse_pcrs("").unwrap(), Vec::<u8>::new());
        assert!(TpmSettings::parse_pcrs("24").is_err());
        assert!(TpmSettings::parse_pcrs("x").is_err());
        assert!(TpmSettings::check_tcti("swtpm:host=127.0.0.1,port=2321").is_ok());
        assert!(TpmSettings::check_tcti("device:/dev/tpmrm0").is_ok());
        assert!(TpmSettings::check_tcti("carrier-pigeon").is_err());
    }
}
