//! Key material: random bytes, digests, data keys, prepared ciphers, and the
//! derivation of client wrapping keys.

use std::fmt;

use aws_lc_rs::aead::{LessSafeKey, UnboundKey, AES_256_GCM};
use aws_lc_rs::{digest, hkdf, rand};
use zeroize::Zeroizing;

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
