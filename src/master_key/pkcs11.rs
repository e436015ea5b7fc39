//! The `pkcs11` provider: the root KEK is wrapped by an AES key that never
//! leaves an HSM (or any PKCS#11 token), the way OpenBao's `pkcs11` seal
//! works. Configured by the module (the vendor's PKCS#11 library), the token
//! (by label or slot), the user PIN and the key's label.
//!
//! The mechanism is AES-GCM where the token offers it, with the KEK id as
//! associated data; otherwise AES key wrap with padding (RFC 5649) of a
//! plaintext that carries the KEK id, checked on the way back. Either way a
//! wrapped KEK copied onto another row fails to unwrap. The first byte of the
//! stored value says which mechanism made it.
//!
//! Every PKCS#11 call blocks, so each runs on tokio's blocking pool. One
//! logged-in session is kept; when a call fails for anything but a bad
//! ciphertext (the token removed, the session closed, the module gone), the
//! session is dropped and the next call opens a new one: a provider outage,
//! which the caller retries, while the root KEK already in memory keeps
//! serving. A wrong PIN or a missing key at start is a configuration error.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11 as Module};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::{Zeroize, Zeroizing};

use super::provider::{MasterKeyProvider, ProviderError, ProviderFuture};
use crate::crypto::{random_bytes, root_kek_aad, DataKey, KEY_LEN};
use crate::domain::ids::KekId;
use crate::secret_cell::SecretCell;

/// The plaintext prefix of a key-wrap-with-padding wrapped KEK.
const PREFIX: &[u8; 16] = b"keyward:kek:v1\0\0";
/// First byte of a value wrapped with AES-GCM: then a 12-byte IV and the
/// ciphertext with its 16-byte tag.
const TAG_GCM: u8 = 1;
/// First byte of a value wrapped with AES key wrap with padding.
const TAG_KWP: u8 = 2;
const IV_LEN: usize = 12;

/// Which token to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSelector {
    /// The token with this label (CKA_LABEL of the token info).
    Label(String),
    /// The token in this slot id.
    Slot(u64),
}

/// Which mechanism wraps the root KEK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pkcs11Mechanism {
    /// AES-GCM where the token offers it, else AES key wrap with padding.
    Auto,
    /// AES-GCM (`CKM_AES_GCM`) through `C_Encrypt`, with an IV from Keyward.
    AesGcm,
    /// AES key wrap with padding (`CKM_AES_KEY_WRAP_PAD`, RFC 5649) through
    /// `C_WrapKey`: for tokens that offer no GCM or refuse a caller's IV
    /// (FIPS mode on some HSMs).
    AesKeyWrapPad,
}

impl Pkcs11Mechanism {
    /// Parses `auto`, `aes-gcm` or `aes-key-wrap-pad`.
    pub fn parse(s: &str) -> Option<Pkcs11Mechanism> {
        match s {
            "auto" => Some(Pkcs11Mechanism::Auto),
            "aes-gcm" => Some(Pkcs11Mechanism::AesGcm),
            "aes-key-wrap-pad" => Some(Pkcs11Mechanism::AesKeyWrapPad),
            _ => None,
        }
    }
}

/// Settings of the PKCS#11 provider.
pub struct Pkcs11Settings {
    /// The PKCS#11 library, e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The token.
    pub token: TokenSelector,
    /// The user PIN (a cell: a `file://` reference re-read on SIGHUP is
    /// used at the next login).
    pub pin: SecretCell,
    /// The label of the AES key (CKO_SECRET_KEY) that wraps the root KEK.
    pub key_label: String,
    /// The mechanism for new wraps (either unwraps what the other made).
    pub mechanism: Pkcs11Mechanism,
}

/// Why connecting failed.
enum ConnectError {
    /// Worth retrying: the module, token or session is not there now.
    Outage(String),
    /// The operator must fix something: a wrong PIN, a missing key.
    Config(String),
}

struct Connected {
    session: Session,
    key: ObjectHandle,
    gcm: bool,
}

struct Inner {
    settings: Pkcs11Settings,
    module: Mutex<Option<Module>>,
    session: Mutex<Option<Connected>>,
}

/// An AES key in a PKCS#11 token.
pub struct Pkcs11 {
    inner: Arc<Inner>,
}

fn describe(e: &CkError) -> String {
    match e {
        CkError::LibraryLoading(e) => format!("cannot load the PKCS#11 module: {e}"),
        other => other.to_string(),
    }
}

impl Pkcs11 {
    /// Loads the module, finds the token, logs in and finds the key. A wrong
    /// PIN or a missing key is an error; the module or the token not being
    /// there is an outage: the provider is returned and connects on its next
    /// call (Keyward then starts not ready, and retries). The error says
    /// what to fix, never the PIN.
    pub async fn connect(settings: Pkcs11Settings) -> Result<Pkcs11, String> {
        let inner = Arc::new(Inner {
            settings,
            module: Mutex::new(None),
            session: Mutex::new(None),
        });
        let first = inner.clone();
        let result = tokio::task::spawn_blocking(move || first.connect())
            .await
            .unwrap_or_else(|e| {
                Err(ConnectError::Outage(format!(
                    "the PKCS#11 task failed: {e}"
                )))
            });
        match result {
            Ok(connected) => {
                tracing::info!(
                    mechanism = if connected.gcm {
                        "AES-GCM"
                    } else {
                        "AES key wrap with padding"
                    },
                    "logged in to the PKCS#11 token"
                );
                *lock(&inner.session) = Some(connected);
            }
            Err(ConnectError::Config(reason)) => return Err(reason),
            Err(ConnectError::Outage(reason)) => {
                tracing::warn!(error = %reason, "the PKCS#11 token is unreachable; retrying when needed")
            }
        }
        Ok(Pkcs11 { inner })
    }

    /// Runs `op` with the logged-in session on the blocking pool, connecting
    /// first when there is none. A failure drops the session, so the next
    /// call starts afresh; a bad ciphertext does not.
    async fn with_session<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Connected) -> Result<T, ProviderError> + Send + 'static,
    ) -> Result<T, ProviderError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = lock(&inner.session);
            if guard.is_none() {
                // A wrong PIN or a missing key is the operator's to fix, not
                // an outage to retry: retrying a login with a wrong PIN
                // every few seconds would lock the token's user PIN.
                let connected = inner.connect().map_err(|e| match e {
                    ConnectError::Outage(r) => ProviderError::Unavailable(format!("pkcs11: {r}")),
                    ConnectError::Config(r) => ProviderError::Misconfigured(format!("pkcs11: {r}")),
                })?;
                *guard = Some(connected);
            }
            let connected = guard
                .as_ref()
                .ok_or_else(|| ProviderError::Unavailable("pkcs11: no session".into()))?;
            let result = op(connected);
            if let Err(ProviderError::Unavailable(_)) = &result {
                // The session (or the module under it) may be gone: start
                // over on the next call.
                *guard = None;
                *lock(&inner.module) = None;
            }
            result
        })
        .await
        .unwrap_or_else(|e| {
            Err(ProviderError::Unavailable(format!(
                "pkcs11: the task failed: {e}"
            )))
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing panics while holding these locks but a PKCS#11 module; the
    // state under them is then dropped and rebuilt, so poison is harmless.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unavailable(what: &str, e: CkError) -> ProviderError {
    ProviderError::Unavailable(format!("pkcs11 {what} failed: {}", describe(&e)))
}

impl Inner {
    fn module(&self) -> Result<Module, ConnectError> {
        let mut guard = lock(&self.module);
        if let Some(m) = guard.as_ref() {
            return Ok(m.clone());
        }
        let module = Module::new(&self.settings.module).map_err(|e| {
            ConnectError::Outage(format!(
                "{} ({})",
                describe(&e),
                self.settings.module.display()
            ))
        })?;
        match module.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => {
                return Err(ConnectError::Outage(format!(
                    "C_Initialize: {}",
                    describe(&e)
                )))
            }
        }
        *guard = Some(module.clone());
        Ok(module)
    }

    fn slot(&self, module: &Module) -> Result<Slot, ConnectError> {
        let outage = |e: CkError| ConnectError::Outage(describe(&e));
        let slots = module.get_slots_with_token().map_err(outage)?;
        for slot in slots {
            match &self.settings.token {
                TokenSelector::Slot(id) if slot.id() == *id => return Ok(slot),
                TokenSelector::Label(label) => {
                    let info = module.get_token_info(slot).map_err(outage)?;
                    if info.label().trim_end() == label {
                        return Ok(slot);
                    }
                }
                TokenSelector::Slot(_) => {}
            }
        }
        Err(ConnectError::Outage(match &self.settings.token {
            TokenSelector::Label(l) => format!("no token labelled `{l}` is present"),
            TokenSelector::Slot(id) => format!("no token is present in slot {id}"),
        }))
    }

    fn connect(&self) -> Result<Connected, ConnectError> {
        let module = self.module()?;
        let slot = self.slot(&module)?;
        let outage =
            |what: &str, e: CkError| ConnectError::Outage(format!("{what}: {}", describe(&e)));
        let mechanisms = module
            .get_mechanism_list(slot)
            .map_err(|e| outage("C_GetMechanismList", e))?;
        let has_gcm = mechanisms.contains(&MechanismType::AES_GCM);
        let has_kwp = mechanisms.contains(&MechanismType::AES_KEY_WRAP_PAD);
        let gcm = match self.settings.mechanism {
            Pkcs11Mechanism::Auto if has_gcm => true,
            Pkcs11Mechanism::Auto if has_kwp => false,
            Pkcs11Mechanism::Auto => {
                return Err(ConnectError::Config(
                    "the token offers neither AES-GCM nor AES key wrap with padding".into(),
                ))
            }
            Pkcs11Mechanism::AesGcm if has_gcm => true,
            Pkcs11Mechanism::AesKeyWrapPad if has_kwp => false,
            Pkcs11Mechanism::AesGcm | Pkcs11Mechanism::AesKeyWrapPad => {
                return Err(ConnectError::Config(format!(
                    "the token does not offer {:?} (KEYWARD_PKCS11_MECHANISM)",
                    self.settings.mechanism
                )))
            }
        };
        let session = module
            .open_ro_session(slot)
            .map_err(|e| outage("C_OpenSession", e))?;
        let pin = AuthPin::new(self.settings.pin.get().as_str().into());
        match session.login(UserType::User, Some(&pin)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
            Err(CkError::Pkcs11(
                RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
                _,
            )) => {
                return Err(ConnectError::Config(
                    "the token refused KEYWARD_PKCS11_PIN (wrong PIN)".into(),
                ))
            }
            Err(CkError::Pkcs11(RvError::PinLocked, _)) => {
                return Err(ConnectError::Config(
                    "the token's user PIN is locked (too many wrong PINs)".into(),
                ))
            }
            Err(e) => return Err(outage("C_Login", e)),
        }
        let label = &self.settings.key_label;
        let keys = session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .map_err(|e| outage("C_FindObjects", e))?;
        let key = match keys.as_slice() {
            [key] => *key,
            [] => {
                return Err(ConnectError::Config(format!(
                    "the token has no secret key labelled `{label}` (KEYWARD_PKCS11_KEY_LABEL)"
                )))
            }
            _ => {
                return Err(ConnectError::Config(format!(
                    "the token has {} secret keys labelled `{label}`; the label must name one",
                    keys.len()
                )))
            }
        };
        Ok(Connected { session, key, gcm })
    }
}

impl Connected {
    fn wrap(&self, kek_id: KekId, kek: &DataKey) -> Result<Vec<u8>, ProviderError> {
        if self.gcm {
            let mut iv: [u8; IV_LEN] = random_bytes();
            let aad = root_kek_aad(kek_id.as_bytes());
            let params = GcmParams::new(&mut iv, &aad, 128.into())
                .map_err(|e| unavailable("GCM parameters", e))?;
            let sealed = self
                .session
                .encrypt(&Mechanism::AesGcm(params), self.key, kek.expose())
                .map_err(|e| unavailable("C_Encrypt (AES-GCM)", e))?;
            let mut out = Vec::with_capacity(1 + IV_LEN + sealed.len());
            out.push(TAG_GCM);
            out.extend_from_slice(&iv);
            out.extend_from_slice(&sealed);
            Ok(out)
        } else {
            let mut plain = Zeroizing::new(Vec::with_capacity(32 + KEY_LEN));
            plain.extend_from_slice(PREFIX);
            plain.extend_from_slice(kek_id.as_bytes());
            plain.extend_from_slice(kek.expose());
            // The plaintext becomes a session object (never stored on the
            // token, gone with the session) that the token wraps.
            let mut template = [
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::GENERIC_SECRET),
                Attribute::Token(false),
                Attribute::Sensitive(false),
                Attribute::Extractable(true),
                Attribute::Value(plain.to_vec()),
            ];
            let created = self.session.create_object(&template);
            if let Attribute::Value(v) = &mut template[5] {
                v.zeroize();
            }
            let object = created.map_err(|e| unavailable("C_CreateObject", e))?;
            let sealed = self
                .session
                .wrap_key(&Mechanism::AesKeyWrapPad, self.key, object);
            let _ = self.session.destroy_object(object);
            let sealed =
                sealed.map_err(|e| unavailable("C_WrapKey (AES key wrap with padding)", e))?;
            let mut out = Vec::with_capacity(1 + sealed.len());
            out.push(TAG_KWP);
            out.extend_from_slice(&sealed);
            Ok(out)
        }
    }

    fn unwrap(&self, kek_id: KekId, wrapped: &[u8]) -> Result<DataKey, ProviderError> {
        // A ciphertext the key cannot open is a mismatch (another key, or a
        // value moved to another KEK's row), not an outage.
        let refused = |e: &CkError| {
            matches!(
                e,
                CkError::Pkcs11(
                    RvError::EncryptedDataInvalid
                        | RvError::EncryptedDataLenRange
                        | RvError::WrappedKeyInvalid
                        | RvError::WrappedKeyLenRange,
                    _
                )
            )
        };
        match wrapped.split_first() {
            Some((&TAG_GCM, rest)) if rest.len() > IV_LEN => {
                let (iv, sealed) = rest.split_at(IV_LEN);
                let mut iv: [u8; IV_LEN] = iv.try_into().map_err(|_| ProviderError::KeyMismatch)?;
                let aad = root_kek_aad(kek_id.as_bytes());
                let params = GcmParams::new(&mut iv, &aad, 128.into())
                    .map_err(|e| unavailable("GCM parameters", e))?;
                let plain = Zeroizing::new(
                    self.session
                        .decrypt(&Mechanism::AesGcm(params), self.key, sealed)
                        .map_err(|e| {
                            if refused(&e) {
                                ProviderError::KeyMismatch
                            } else {
                                unavailable("C_Decrypt (AES-GCM)", e)
                            }
                        })?,
                );
                DataKey::from_slice(&plain).ok_or(ProviderError::KeyMismatch)
            }
            Some((&TAG_KWP, sealed)) => {
                let object = self
                    .session
                    .unwrap_key(
                        &Mechanism::AesKeyWrapPad,
                        self.key,
                        sealed,
                        &[
                            Attribute::Class(ObjectClass::SECRET_KEY),
                            Attribute::KeyType(KeyType::GENERIC_SECRET),
                            Attribute::Token(false),
                            Attribute::Sensitive(false),
                            Attribute::Extractable(true),
                        ],
                    )
                    .map_err(|e| {
                        if refused(&e) {
                            ProviderError::KeyMismatch
                        } else {
                            unavailable("C_UnwrapKey (AES key wrap with padding)", e)
                        }
                    })?;
                let attributes = self.session.get_attributes(object, &[AttributeType::Value]);
                let _ = self.session.destroy_object(object);
                let mut plain = Zeroizing::new(Vec::new());
                for attribute in attributes.map_err(|e| unavailable("C_GetAttributeValue", e))? {
                    if let Attribute::Value(mut v) = attribute {
                        plain.extend_from_slice(&v);
                        v.zeroize();
                    }
                }
                if plain.len() != 32 + KEY_LEN
                    || &plain[..16] != PREFIX
                    || &plain[16..32] != kek_id.as_bytes()
                {
                    return Err(ProviderError::KeyMismatch);
                }
                DataKey::from_slice(&plain[32..]).ok_or(ProviderError::KeyMismatch)
            }
            _ => Err(ProviderError::KeyMismatch),
        }
    }
}

impl MasterKeyProvider for Pkcs11 {
    fn name(&self) -> &'static str {
        "pkcs11"
    }

    fn key_setting(&self) -> &'static str {
        "KEYWARD_PKCS11_KEY_LABEL"
    }

    fn wrap_root_kek<'a>(&'a self, kek_id: KekId, kek: &'a DataKey) -> ProviderFuture<'a, Vec<u8>> {
        let kek = kek.clone();
        Box::pin(self.with_session(move |c| c.wrap(kek_id, &kek)))
    }

    fn unwrap_root_kek<'a>(
        &'a self,
        kek_id: KekId,
        wrapped: &'a [u8],
    ) -> ProviderFuture<'a, DataKey> {
        let wrapped = wrapped.to_vec();
        Box::pin(self.with_session(move |c| c.unwrap(kek_id, &wrapped)))
    }
}
