//! Key material: data keys, prepared ciphers, and key wrapping.

use std::fmt;

use aws_lc_rs::aead::{LessSafeKey, UnboundKey, AES_256_GCM};
use aws_lc_rs::{digest, hkdf, rand};
use zeroize::Zeroizing;

use super::aead::{open, seal, NONCE_LEN, TAG_LEN};

/// Length of every symmetric key Keyward handles (AES-256).
pub const KEY_LEN: usize = 32;

/// Fills an array with bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    // AWS-LC's RNG fails only if the OS entropy source is broken; nothing safe can
    // continue then.
    rand::fill(&mut out).expect("the system random number generator failed");
    out
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A 256-bit symmetric key in memory that is zeroed when dropped. `Debug` prints
/// no key bytes.
#[derive(Clone)]
pub struct DataKey(Zeroizing<[u8; KEY_LEN]>);

impl DataKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rand::fill(key.as_mut()).expect("the system random number generator failed");
        DataKey(key)
    }

    /// A key from exactly 32 bytes; `None` for any other length.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != KEY_LEN {
            return None;
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(bytes);
        Some(DataKey(key))
    }

    /// The raw bytes, for handing to a master-key provider.
    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// Prepares the AES-256-GCM context for this key.
    pub fn cipher(&self) -> CipherKey {
        let unbound = UnboundKey::new(&AES_256_GCM, self.0.as_ref())
            .expect("a 32-byte key is valid for AES-256-GCM");
        CipherKey(LessSafeKey::new(unbound))
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// A key prepared for AES-256-GCM (its expanded key schedule lives in AWS-LC's
/// memory, which AWS-LC zeroes when it frees it). This is what the key ring keeps,
/// so that the hot path does no key expansion.
pub struct CipherKey(LessSafeKey);

impl CipherKey {
    pub(super) fn aead(&self) -> &LessSafeKey {
        &self.0
    }
}

impl fmt::Debug for CipherKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CipherKey(<redacted>)")
    }
}

/// A key wrapped (encrypted) under another key: `nonce || ciphertext || tag`.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey(pub Vec<u8>);

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WrappedKey({} bytes)", self.0.len())
    }
}

/// Unwrapping failed: the wrapping key is wrong, or the wrapped bytes or their
/// associated data were changed. The two cannot be told apart, by design.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the wrapped key failed to authenticate")]
pub struct UnwrapError;

impl CipherKey {
    /// Wraps `key` under this key, binding `aad`.
    pub fn wrap(&self, key: &DataKey, aad: &[u8]) -> WrappedKey {
        let sealed = seal(self, aad, key.expose());
        let mut out = Vec::with_capacity(NONCE_LEN + KEY_LEN + TAG_LEN);
        out.extend_from_slice(&sealed.nonce);
        out.extend_from_slice(&sealed.ciphertext);
        WrappedKey(out)
    }

    /// Unwraps a key wrapped by [`CipherKey::wrap`] under the same `aad`.
    pub fn unwrap_key(&self, wrapped: &WrappedKey, aad: &[u8]) -> Result<DataKey, UnwrapError> {
        if wrapped.0.len() != NONCE_LEN + KEY_LEN + TAG_LEN {
            return Err(UnwrapError);
        }
        let (nonce, ct) = wrapped.0.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("split at NONCE_LEN");
        let plain = Zeroizing::new(open(self, &nonce, aad, ct).map_err(|_| UnwrapError)?);
        DataKey::from_slice(&plain).ok_or(UnwrapError)
    }
}

/// Derives the key that wraps a client-mode encryption's data keys from the
/// client-provided master key: HKDF-SHA256 with the encryption's random salt and
/// its id as info. The result lives only as long as the request that needs it.
pub fn derive_client_wrapping_key(
    client_key: &[u8],
    salt: &[u8],
    encryption_id: &[u8; 16],
) -> DataKey {
    struct Len;
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            KEY_LEN
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(client_key);
    let info: [&[u8]; 2] = [b"keyward:client-wrap:v1", encryption_id];
    let okm = prk
        .expand(&info, Len)
        .expect("32 bytes is within HKDF-SHA256's output bound");
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    okm.fill(key.as_mut()).expect("lengths match");
    DataKey(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_binds_the_associated_data() {
        let kek = DataKey::generate().cipher();
        let dek = DataKey::generate();
        let wrapped = kek.wrap(&dek, b"row-1");
        let back = kek.unwrap_key(&wrapped, b"row-1").unwrap();
        assert_eq!(back.expose(), dek.expose());
        assert_eq!(kek.unwrap_key(&wrapped, b"row-2").unwrap_err(), UnwrapError);
        let other = DataKey::generate().cipher();
        assert!(other.unwrap_key(&wrapped, b"row-1").is_err());
        assert!(kek.unwrap_key(&WrappedKey(vec![0; 10]), b"row-1").is_err());
    }

    #[test]
    fn debug_prints_no_key_bytes() {
        let k = DataKey::from_slice(&[0xAB; 32]).unwrap();
        let s = format!("{k:?} {:?}", k.cipher());
        assert!(
            !s.contains("171") && !s.to_lowercase().contains("ab"),
            "{s}"
        );
    }

    #[test]
    fn client_wrapping_key_depends_on_key_salt_and_id() {
        let a = derive_client_wrapping_key(&[1; 32], &[2; 16], &[3; 16]);
        assert_eq!(
            a.expose(),
            derive_client_wrapping_key(&[1; 32], &[2; 16], &[3; 16]).expose()
        );
        assert_ne!(
            a.expose(),
            derive_client_wrapping_key(&[9; 32], &[2; 16], &[3; 16]).expose()
        );
        assert_ne!(
            a.expose(),
            derive_client_wrapping_key(&[1; 32], &[9; 16], &[3; 16]).expose()
        );
        assert_ne!(
            a.expose(),
            derive_client_wrapping_key(&[1; 32], &[2; 16], &[9; 16]).expose()
        );
    }
}
