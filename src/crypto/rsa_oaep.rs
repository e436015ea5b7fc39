//! RSA-OAEP with SHA-256 and MGF1-SHA-256 (JOSE's `RSA-OAEP-256`), through
//! AWS-LC only: its private-key operation is constant time, which the `rsa`
//! crate's is not (RUSTSEC-2023-0071, the Marvin attack). Keyward never
//! compiles the `rsa` crate into its binary (`scripts/test` checks).
//!
//! Two ciphertext forms, told apart by length (docs/algorithms.md):
//!
//! - **one block**: `RSA-OAEP-256(public key, plaintext)`, exactly as long as
//!   the modulus, for plaintexts of at most `k - 66` bytes (318 for RSA 3072,
//!   446 for RSA 4096);
//! - **hybrid**: a JWE in compact serialization (RFC 7516) with `alg`
//!   `RSA-OAEP-256` and `enc` `A256GCM`, as ASCII bytes: a fresh AES-256 key
//!   per message, wrapped with RSA-OAEP, seals the plaintext with AES-256-GCM
//!   under the protected header as associated data. Any JOSE library makes one.
//!
//! Every decryption failure (wrong key, tampered block, header, IV, tag, a
//! wrapped key of the wrong size) is the same `Err(())`.

use std::fmt;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeySize, OaepPrivateDecryptingKey, OaepPublicEncryptingKey, PrivateDecryptingKey,
    PublicEncryptingKey, OAEP_SHA256_MGF1SHA256,
};
use base64::Engine;
use zeroize::Zeroizing;

use super::aead::{open, seal, NONCE_LEN, TAG_LEN};
use super::keys::{DataKey, KEY_LEN};
use super::secret::SecretBytes;

const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Bytes of OAEP overhead with SHA-256: `2 * 32 + 2`.
const OAEP_OVERHEAD: usize = 66;

/// Why a key was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RsaKeyError {
    /// Not an RSA key in the expected encoding (PKCS#8 DER for a private key,
    /// SubjectPublicKeyInfo DER or PEM for a public one), or inconsistent.
    #[error("not a valid RSA key in the expected encoding")]
    Malformed,
    /// An RSA key of another size than the ones accepted.
    #[error("an RSA key of {0} bits; 3072 or 4096 bits are accepted")]
    Size(usize),
}

/// The RSA key sizes Keyward makes and accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RsaBits {
    /// 3072 bits (about 128-bit security; the default).
    B3072,
    /// 4096 bits.
    B4096,
}

impl RsaBits {
    /// The size for a number of bits, if accepted.
    pub fn from_bits(bits: usize) -> Option<RsaBits> {
        match bits {
            3072 => Some(RsaBits::B3072),
            4096 => Some(RsaBits::B4096),
            _ => None,
        }
    }

    /// Its number of bits.
    pub fn bits(self) -> usize {
        match self {
            RsaBits::B3072 => 3072,
            RsaBits::B4096 => 4096,
        }
    }
}

/// An RSA private key for OAEP-SHA-256 decryption, with its public half. Its
/// material lives in AWS-LC's memory (freed and cleared by AWS-LC); `Debug`
/// prints no key bytes.
pub struct RsaPrivateKey {
    private: OaepPrivateDecryptingKey,
    public: RsaPublicKey,
    /// The same AWS-LC key (a second reference, no copy of the material),
    /// for serializing it to PKCS#8 when it is wrapped.
    key: PrivateDecryptingKey,
}

impl fmt::Debug for RsaPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RsaPrivateKey({} bits, <redacted>)", self.bits())
    }
}

impl RsaPrivateKey {
    /// A fresh key pair. Slow (RSA key generation: tens to hundreds of
    /// milliseconds): call it off the async runtime's worker threads.
    pub fn generate(bits: RsaBits) -> Result<RsaPrivateKey, RsaKeyError> {
        let size = match bits {
            RsaBits::B3072 => KeySize::Rsa3072,
            RsaBits::B4096 => KeySize::Rsa4096,
        };
        let key = PrivateDecryptingKey::generate(size).map_err(|_| RsaKeyError::Malformed)?;
        Self::from_key(key)
    }

    /// A key from PKCS#8 (v1) DER, of 3072 or 4096 bits.
    pub fn from_pkcs8(der: &[u8]) -> Result<RsaPrivateKey, RsaKeyError> {
        let key = PrivateDecryptingKey::from_pkcs8(der).map_err(|_| RsaKeyError::Malformed)?;
        let bits = key.key_size_bits();
        if RsaBits::from_bits(bits).is_none() {
            return Err(RsaKeyError::Size(bits));
        }
        Self::from_key(key)
    }

    /// A key from PKCS#8 DER of any size AWS-LC accepts (2048 to 8192 bits):
    /// for test vectors only.
    #[cfg(test)]
    pub(crate) fn from_pkcs8_any_size(der: &[u8]) -> Result<RsaPrivateKey, RsaKeyError> {
        let key = PrivateDecryptingKey::from_pkcs8(der).map_err(|_| RsaKeyError::Malformed)?;
        Self::from_key(key)
    }

    fn from_key(key: PrivateDecryptingKey) -> Result<RsaPrivateKey, RsaKeyError> {
        let public = RsaPublicKey::from_key(key.public_key())?;
        let private =
            OaepPrivateDecryptingKey::new(key.clone()).map_err(|_| RsaKeyError::Malformed)?;
        Ok(RsaPrivateKey {
            private,
            public,
            key,
        })
    }

    /// The key as PKCS#8 DER, to be wrapped at once: in memory cleared on
    /// drop (as is AWS-LC's own buffer).
    pub fn pkcs8(&self) -> Result<Zeroizing<Vec<u8>>, RsaKeyError> {
        let der = self.key.as_der().map_err(|_| RsaKeyError::Malformed)?;
        Ok(Zeroizing::new(der.as_ref().to_vec()))
    }

    /// The public half.
    pub fn public(&self) -> &RsaPublicKey {
        &self.public
    }

    /// The modulus size in bits.
    pub fn bits(&self) -> usize {
        self.private.key_size_bits()
    }

    /// RSA-OAEP-256 decryption of one block: exactly the modulus's length
    /// in, the plaintext out in memory cleared on drop. This is the one place
    /// Keyward's private-key operation happens (Wycheproof's vectors run
    /// against it).
    #[allow(clippy::result_unit_err)]
    pub fn decrypt_block(&self, ciphertext: &[u8]) -> Result<SecretBytes, ()> {
        self.decrypt_block_labelled(ciphertext, None)
    }

    /// [`RsaPrivateKey::decrypt_block`] with an OAEP label (a caller's
    /// context binding: see [`crate::crypto::context_binding`]).
    fn decrypt_block_labelled(
        &self,
        ciphertext: &[u8],
        label: Option<&[u8]>,
    ) -> Result<SecretBytes, ()> {
        if ciphertext.len() != self.private.key_size_bytes() {
            return Err(());
        }
        let mut out = SecretBytes::new(vec![0u8; self.private.min_output_size()]);
        let len = self
            .private
            .decrypt(&OAEP_SHA256_MGF1SHA256, ciphertext, out.vec_mut(), label)
            .map_err(|_| ())?
            .len();
        out.truncate(len);
        Ok(out)
    }

    /// Decrypts either form (see the module docs). `kid`: a JWE whose header
    /// names another key id fails. `binding`: the caller's context binding
    /// the ciphertext was sealed with (see [`RsaPublicKey::seal`]); a
    /// different or missing one fails.
    #[allow(clippy::result_unit_err)]
    pub fn open(
        &self,
        ciphertext: &[u8],
        kid: &str,
        binding: Option<&[u8]>,
    ) -> Result<SecretBytes, ()> {
        if ciphertext.len() == self.private.key_size_bytes() {
            return self.decrypt_block_labelled(ciphertext, binding);
        }
        self.open_jwe(ciphertext, kid, binding)
    }

    fn open_jwe(
        &self,
        compact: &[u8],
        kid: &str,
        binding: Option<&[u8]>,
    ) -> Result<SecretBytes, ()> {
        let text = std::str::from_utf8(compact).map_err(|_| ())?;
        let mut parts = text.split('.');
        let (Some(header), Some(ek), Some(iv), Some(ct), Some(tag), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(());
        };
        check_header(&B64URL.decode(header).map_err(|_| ())?, kid)?;
        let ek = B64URL.decode(ek).map_err(|_| ())?;
        let iv: [u8; NONCE_LEN] = B64URL
            .decode(iv)
            .map_err(|_| ())?
            .try_into()
            .map_err(|_| ())?;
        let tag = B64URL.decode(tag).map_err(|_| ())?;
        if tag.len() != TAG_LEN {
            return Err(());
        }
        let mut sealed = B64URL.decode(ct).map_err(|_| ())?;
        sealed.extend_from_slice(&tag);
        let cek = self.decrypt_block(&ek)?;
        let cek = DataKey::from_slice(&cek).ok_or(())?;
        open(&cek.cipher(), &iv, &jwe_aad(header, binding), &sealed)
    }
}

/// The GCM associated data of a compact JWE: the protected header as ASCII,
/// and with a context binding, `"." ‖ BASE64URL(binding)` after it (RFC 7516
/// §5.1 step 14, the rule for the JSON serialization's `aad` member; the
/// compact form cannot carry it, so the caller supplies it again to decrypt).
fn jwe_aad(header: &str, binding: Option<&[u8]>) -> Vec<u8> {
    let mut aad = header.as_bytes().to_vec();
    if let Some(b) = binding {
        aad.push(b'.');
        aad.extend_from_slice(B64URL.encode(b).as_bytes());
    }
    aad
}

/// The JWE protected header must be exactly what RSA-OAEP-256 + A256GCM
/// needs: those two, no compression, nothing critical, and `kid` (if any)
/// the version's id.
fn check_header(json: &[u8], kid: &str) -> Result<(), ()> {
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(json).map_err(|_| ())?;
    let is = |name: &str, want: &str| header.get(name).and_then(|v| v.as_str()) == Some(want);
    if !is("alg", "RSA-OAEP-256") || !is("enc", "A256GCM") {
        return Err(());
    }
    if header.contains_key("zip") || header.contains_key("crit") {
        return Err(());
    }
    match header.get("kid") {
        None => Ok(()),
        Some(v) if v.as_str() == Some(kid) => Ok(()),
        Some(_) => Err(()),
    }
}

/// An RSA public key for OAEP-SHA-256 encryption.
#[derive(Clone)]
pub struct RsaPublicKey {
    key: std::sync::Arc<OaepPublicEncryptingKey>,
    /// SubjectPublicKeyInfo DER.
    spki: Vec<u8>,
}

impl fmt::Debug for RsaPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RsaPublicKey({} bits)", self.key.key_size_bits())
    }
}

impl RsaPublicKey {
    fn from_key(key: PublicEncryptingKey) -> Result<RsaPublicKey, RsaKeyError> {
        let spki = key
            .as_der()
            .map_err(|_| RsaKeyError::Malformed)?
            .as_ref()
            .to_vec();
        let key = OaepPublicEncryptingKey::new(key).map_err(|_| RsaKeyError::Malformed)?;
        Ok(RsaPublicKey {
            key: std::sync::Arc::new(key),
            spki,
        })
    }

    /// A public key from SubjectPublicKeyInfo DER, of 3072 bits or more.
    pub fn from_spki_der(der: &[u8]) -> Result<RsaPublicKey, RsaKeyError> {
        let key = PublicEncryptingKey::from_der(der).map_err(|_| RsaKeyError::Malformed)?;
        let bits = key.key_size_bits();
        if bits < 3072 {
            return Err(RsaKeyError::Size(bits));
        }
        Self::from_key(key)
    }

    /// A public key from PEM (`-----BEGIN PUBLIC KEY-----`, SubjectPublicKeyInfo).
    pub fn from_pem(pem: &str) -> Result<RsaPublicKey, RsaKeyError> {
        let body = pem
            .trim()
            .strip_prefix("-----BEGIN PUBLIC KEY-----")
            .and_then(|rest| rest.trim_end().strip_suffix("-----END PUBLIC KEY-----"))
            .ok_or(RsaKeyError::Malformed)?;
        let b64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
        let der = B64.decode(b64).map_err(|_| RsaKeyError::Malformed)?;
        Self::from_spki_der(&der)
    }

    /// SubjectPublicKeyInfo DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki
    }

    /// The modulus size in bits.
    pub fn bits(&self) -> usize {
        self.key.key_size_bits()
    }

    /// The modulus size in bytes (the length of one block).
    pub fn block_len(&self) -> usize {
        self.key.ciphertext_size()
    }

    /// The longest plaintext one block holds.
    pub fn max_block_plaintext(&self) -> usize {
        self.block_len() - OAEP_OVERHEAD
    }

    /// PEM of the SubjectPublicKeyInfo, as OpenSSL writes it.
    pub fn pem(&self) -> String {
        let b64 = B64.encode(&self.spki);
        let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END PUBLIC KEY-----\n");
        out
    }

    /// The JWK members `n` and `e` (base64url, no padding, big-endian
    /// without leading zeros), read from the SubjectPublicKeyInfo.
    pub fn jwk_modulus_exponent(&self) -> Result<(String, String), RsaKeyError> {
        use x509_parser::prelude::FromDer;
        use x509_parser::public_key::PublicKey;
        let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&self.spki)
            .map_err(|_| RsaKeyError::Malformed)?;
        match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => {
                let strip = |b: &[u8]| {
                    let start = b.iter().position(|&x| x != 0).unwrap_or(b.len());
                    B64URL.encode(&b[start..])
                };
                Ok((strip(rsa.modulus), strip(rsa.exponent)))
            }
            _ => Err(RsaKeyError::Malformed),
        }
    }

    /// RSA-OAEP-256 of one block; `None` if `plaintext` is too long for one.
    pub fn encrypt_block(&self, plaintext: &[u8]) -> Option<Vec<u8>> {
        self.encrypt_block_labelled(plaintext, None)
    }

    /// [`RsaPublicKey::encrypt_block`] with an OAEP label.
    fn encrypt_block_labelled(&self, plaintext: &[u8], label: Option<&[u8]>) -> Option<Vec<u8>> {
        if plaintext.len() > self.max_block_plaintext() {
            return None;
        }
        let mut out = vec![0u8; self.block_len()];
        let len = self
            .key
            .encrypt(&OAEP_SHA256_MGF1SHA256, plaintext, &mut out, label)
            .ok()?
            .len();
        out.truncate(len);
        Some(out)
    }

    /// Encrypts `plaintext`: one block when it fits, else a compact JWE
    /// (RSA-OAEP-256 + A256GCM) whose header names `kid`. `binding`: a
    /// caller's context binding ([`crate::crypto::context_binding`]), the
    /// block's OAEP label or the JWE's additional authenticated data (see
    /// `jwe_aad`); `None` seals exactly as before contexts existed.
    pub fn seal(&self, plaintext: &[u8], kid: &str, binding: Option<&[u8]>) -> Vec<u8> {
        if let Some(block) = self.encrypt_block_labelled(plaintext, binding) {
            return block;
        }
        self.seal_jwe(plaintext, kid, binding)
    }

    /// A compact JWE (RSA-OAEP-256 + A256GCM) of `plaintext`, as ASCII bytes.
    pub fn seal_jwe(&self, plaintext: &[u8], kid: &str, binding: Option<&[u8]>) -> Vec<u8> {
        let header = serde_json::json!({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": kid});
        let header = B64URL.encode(header.to_string());
        let cek = DataKey::generate();
        let ek = self
            .encrypt_block(cek.expose())
            // A 32-byte key always fits one block of a 2048-bit or larger key.
            .unwrap_or_default();
        let sealed = seal(&cek.cipher(), &jwe_aad(&header, binding), plaintext);
        let (ct, tag) = sealed
            .ciphertext
            .split_at(sealed.ciphertext.len() - TAG_LEN);
        let mut out = String::with_capacity(header.len() + (ek.len() + ct.len()) * 4 / 3 + 64);
        out.push_str(&header);
        for part in [&ek[..], &sealed.nonce[..], ct, tag] {
            out.push('.');
            B64URL.encode_string(part, &mut out);
        }
        out.into_bytes()
    }

    /// `RSA_AES_KEY_WRAP_SHA_256` (as AWS KMS and Vault name it): a fresh
    /// AES-256 key wrapped with RSA-OAEP-256, followed by `material` wrapped
    /// under that key with AES Key Wrap with Padding (RFC 5649).
    pub fn wrap_rsa_aes_kwp(&self, material: &[u8]) -> Result<Vec<u8>, RsaKeyError> {
        use aws_lc_rs::key_wrap::{KeyEncryptionKey, KeyWrapPadded, AES_256};
        let ephemeral = DataKey::generate();
        let mut out = self
            .encrypt_block(ephemeral.expose())
            .ok_or(RsaKeyError::Malformed)?;
        let kek = KeyEncryptionKey::new(&AES_256, ephemeral.expose())
            .map_err(|_| RsaKeyError::Malformed)?;
        let mut wrapped = vec![0u8; material.len() + 16];
        let len = kek
            .wrap_with_padding(material, &mut wrapped)
            .map_err(|_| RsaKeyError::Malformed)?
            .len();
        out.extend_from_slice(&wrapped[..len]);
        Ok(out)
    }
}

/// How key material arrives wrapped for import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportWrapping {
    /// `RSA-OAEP-256` of the material itself (fits one block: an AES key).
    RsaOaep256,
    /// `RSA_AES_KEY_WRAP_SHA_256`: see [`RsaPublicKey::wrap_rsa_aes_kwp`].
    RsaAesKeyWrapSha256,
}

impl RsaPrivateKey {
    /// Unwraps imported key material. Every failure is the same `Err(())`.
    #[allow(clippy::result_unit_err)]
    pub fn unwrap_import(
        &self,
        wrapping: ImportWrapping,
        wrapped: &[u8],
    ) -> Result<SecretBytes, ()> {
        match wrapping {
            ImportWrapping::RsaOaep256 => self.decrypt_block(wrapped),
            ImportWrapping::RsaAesKeyWrapSha256 => {
                use aws_lc_rs::key_wrap::{KeyEncryptionKey, KeyWrapPadded, AES_256};
                let k = self.private.key_size_bytes();
                if wrapped.len() <= k + 8 {
                    return Err(());
                }
                let (block, rest) = wrapped.split_at(k);
                let ephemeral = self.decrypt_block(block)?;
                if ephemeral.len() != KEY_LEN {
                    return Err(());
                }
                let kek = KeyEncryptionKey::new(&AES_256, &ephemeral).map_err(|_| ())?;
                let mut out = SecretBytes::new(vec![0u8; rest.len()]);
                let len = kek
                    .unwrap_with_padding(rest, out.vec_mut())
                    .map_err(|_| ())?
                    .len();
                out.truncate(len);
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> &'static RsaPrivateKey {
        static KEY: std::sync::OnceLock<RsaPrivateKey> = std::sync::OnceLock::new();
        KEY.get_or_init(|| RsaPrivateKey::generate(RsaBits::B3072).unwrap())
    }

    #[test]
    fn rsa_oaep_blocks_and_jwe_round_trip_and_fail_alike() {
        let k = key();
        assert_eq!(k.public().max_block_plaintext(), 318);
        for len in [0usize, 1, 190, 318, 319, 400, 100_000] {
            let pt: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let ct = k.public().seal(&pt, "v1", None);
            assert_eq!(ct.len() == 384, len <= 318, "{len}");
            assert_eq!(&*k.open(&ct, "v1", None).unwrap(), &pt[..], "{len}");
            let mut bad = ct.clone();
            let at = bad.len() - 3;
            bad[at] ^= 1;
            assert!(k.open(&bad, "v1", None).is_err(), "{len}");
            if len > 318 {
                assert!(k.open(&ct, "v2", None).is_err(), "another kid");
            }
        }
    }

    #[test]
    fn a_context_binding_is_needed_again_in_both_forms() {
        let k = key();
        for len in [5usize, 1000] {
            let pt = vec![7u8; len];
            let ct = k.public().seal(&pt, "v1", Some(b"ctx-a"));
            assert_eq!(&*k.open(&ct, "v1", Some(b"ctx-a")).unwrap(), &pt[..]);
            assert!(k.open(&ct, "v1", Some(b"ctx-b")).is_err(), "{len}");
            assert!(k.open(&ct, "v1", None).is_err(), "{len}");
            let plain = k.public().seal(&pt, "v1", None);
            assert!(k.open(&plain, "v1", Some(b"ctx-a")).is_err(), "{len}");
        }
    }

    #[test]
    fn rsa_oaep_jwe_headers_other_than_rsa_oaep_256_with_a256gcm_fail() {
        let k = key();
        let ct = String::from_utf8(k.public().seal_jwe(b"x", "v1", None)).unwrap();
        let rest = ct.split_once('.').unwrap().1;
        for header in [
            r#"{"alg":"RSA-OAEP","enc":"A256GCM"}"#,
            r#"{"alg":"RSA-OAEP-256","enc":"A128GCM"}"#,
            r#"{"alg":"RSA-OAEP-256","enc":"A256GCM","zip":"DEF"}"#,
            r#"{"alg":"RSA-OAEP-256", "enc":"A256GCM","kid":"v1"}"#,
        ] {
            // Other headers fail the checks or the GCM tag (the header is the
            // associated data).
            let forged = format!("{}.{rest}", B64URL.encode(header));
            assert!(k.open(forged.as_bytes(), "v1", None).is_err(), "{header}");
        }
        assert!(k.open(b"a.b.c.d", "v1", None).is_err());
        assert!(k.open(b"", "v1", None).is_err());
    }

    #[test]
    fn rsa_oaep_import_wrappings_round_trip_and_refuse_tampering() {
        let k = key();
        let material: Vec<u8> = (0..1217u32).map(|i| (i * 7) as u8).collect();
        let wrapped = k.public().wrap_rsa_aes_kwp(&material).unwrap();
        let back = k
            .unwrap_import(ImportWrapping::RsaAesKeyWrapSha256, &wrapped)
            .unwrap();
        assert_eq!(&*back, &material[..]);
        let mut bad = wrapped.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(k
            .unwrap_import(ImportWrapping::RsaAesKeyWrapSha256, &bad)
            .is_err());
        let aes = [7u8; 32];
        let block = k.public().encrypt_block(&aes).unwrap();
        assert_eq!(
            &*k.unwrap_import(ImportWrapping::RsaOaep256, &block).unwrap(),
            &aes
        );
        assert!(k
            .unwrap_import(ImportWrapping::RsaAesKeyWrapSha256, &block)
            .is_err());
    }

    #[test]
    fn rsa_oaep_keys_round_trip_through_pkcs8_pem_and_jwk() {
        let k = key();
        let again = RsaPrivateKey::from_pkcs8(&k.pkcs8().unwrap()).unwrap();
        assert_eq!(again.public().spki_der(), k.public().spki_der());
        let public = RsaPublicKey::from_pem(&k.public().pem()).unwrap();
        assert_eq!(public.spki_der(), k.public().spki_der());
        let (n, e) = k.public().jwk_modulus_exponent().unwrap();
        assert_eq!(e, "AQAB");
        assert_eq!(B64URL.decode(n).unwrap().len(), 384);
        assert!(format!("{k:?}").contains("redacted"));
        assert!(RsaPublicKey::from_pem(
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----"
        )
        .is_err());
    }

    /// Wycheproof's RSA-OAEP (SHA-256, MGF1-SHA-256) vectors against
    /// [`RsaPrivateKey::decrypt_block`]: every valid vector decrypts to its
    /// message, every invalid one fails. Keyward uses no label, so vectors
    /// with a label must fail too.
    #[test]
    fn rsa_oaep_wycheproof_vectors() {
        use wycheproof::rsa_oaep::{TestName, TestSet};
        use wycheproof::TestResult;
        let mut checked = 0;
        for name in [
            TestName::Rsa2048Sha256Mgf1Sha256,
            TestName::Rsa3072Sha256Mgf1Sha256,
            TestName::Rsa4096Sha256Mgf1Sha256,
        ] {
            let set = TestSet::load(name).unwrap();
            for group in &set.test_groups {
                let key = RsaPrivateKey::from_pkcs8_any_size(&group.pkcs8).unwrap();
                let sized = RsaPrivateKey::from_pkcs8(&group.pkcs8);
                assert_eq!(sized.is_ok(), group.key_size != 2048);
                for test in &group.tests {
                    let got = key.decrypt_block(&test.ct);
                    // Keyward uses no label: a vector made with one must fail.
                    let labelled = !test.label.is_empty();
                    match (test.result, got) {
                        (TestResult::Valid, Ok(pt)) if !labelled => {
                            assert_eq!(&pt[..], &test.pt[..], "tc {}", test.tc_id)
                        }
                        (TestResult::Valid, Err(())) if labelled => {}
                        (TestResult::Invalid, Err(())) => {}
                        (TestResult::Acceptable, Ok(pt)) => {
                            assert_eq!(&pt[..], &test.pt[..], "tc {}", test.tc_id)
                        }
                        (TestResult::Acceptable, Err(())) => {}
                        (result, got) => panic!(
                            "tc {} ({}): expected {result:?}, got {}",
                            test.tc_id,
                            test.comment,
                            if got.is_ok() {
                                "a plaintext"
                            } else {
                                "a failure"
                            }
                        ),
                    }
                    checked += 1;
                }
            }
        }
        assert!(checked > 100, "{checked}");
    }
}
