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
    #[allow(clippy::expect_used)]
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

/// SHA-256 of `parts`, one after the other (without joining them first).
pub fn sha256_parts(parts: &[&[u8]]) -> [u8; 32] {
    let mut context = digest::Context::new(&digest::SHA256);
    for part in parts {
        context.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
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
        // As in `random_bytes`: only a broken OS entropy source fails here.
        #[allow(clippy::expect_used)]
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
        // The type holds exactly 32 bytes, and every 32 bytes are an AES-256 key.
        #[allow(clippy::expect_used)]
        let unbound = UnboundKey::new(&AES_256_GCM, self.0.as_ref())
            .expect("a 32-byte key is valid for AES-256-GCM");
        CipherKey {
            aead: LessSafeKey::new(unbound),
            raw: self.clone(),
        }
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// A key prepared for AES-256-GCM (its expanded key schedule lives in AWS-LC's
/// memory, which AWS-LC zeroes when it frees it). This is what the key ring keeps,
/// so that the hot path does no key expansion. It keeps the key's bytes too
/// (zeroed on drop), from which the keys of deterministic encryption and blind
/// indexes are derived ([`CipherKey::derive`]).
pub struct CipherKey {
    aead: LessSafeKey,
    raw: DataKey,
}

impl CipherKey {
    pub(super) fn aead(&self) -> &LessSafeKey {
        &self.aead
    }

    /// A key for another purpose, derived from this one with HKDF-SHA256:
    /// `label` names the purpose, `parts` what the key is for (each part is
    /// length-prefixed, so no two lists of parts give the same input). The
    /// key itself is never used for anything but AES-256-GCM.
    pub fn derive(&self, label: &str, parts: &[&[u8]]) -> DataKey {
        struct Len;
        impl hkdf::KeyType for Len {
            fn len(&self) -> usize {
                KEY_LEN
            }
        }
        let mut info = Vec::with_capacity(64);
        info.extend_from_slice(label.as_bytes());
        info.push(0);
        for part in parts {
            info.extend_from_slice(&(part.len() as u32).to_be_bytes());
            info.extend_from_slice(part);
        }
        let prk =
            hkdf::Salt::new(hkdf::HKDF_SHA256, b"keyward:derive:v1").extract(self.raw.expose());
        let info = [info.as_slice()];
        // Infallible: 32 bytes is far within HKDF-SHA256's output bound.
        #[allow(clippy::expect_used)]
        let okm = prk
            .expand(&info, Len)
            .expect("32 bytes is within HKDF-SHA256's output bound");
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        #[allow(clippy::expect_used)]
        okm.fill(key.as_mut()).expect("lengths match");
        DataKey(key)
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
    DataKey(hkdf_sha256_key(
        salt,
        client_key,
        &[b"keyward:client-wrap:v1", encryption_id],
    ))
}

/// HKDF-SHA256's output is at most 255 blocks of 32 bytes (RFC 5869, 2.3).
pub const HKDF_SHA256_MAX_LEN: usize = 255 * 32;

/// An HKDF output longer than [`HKDF_SHA256_MAX_LEN`] was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HkdfLengthError;

/// HKDF-SHA256 (RFC 5869): extracts from `ikm` with `salt`, then expands with
/// the concatenation of `info` into all of `out`. An empty salt is the RFC's
/// default (32 zero bytes). Fails only for an `out` longer than
/// [`HKDF_SHA256_MAX_LEN`].
pub fn hkdf_sha256(
    salt: &[u8],
    ikm: &[u8],
    info: &[&[u8]],
    out: &mut [u8],
) -> Result<(), HkdfLengthError> {
    struct Len(usize);
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            self.0
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    let okm = prk
        .expand(info, Len(out.len()))
        .map_err(|_| HkdfLengthError)?;
    okm.fill(out).map_err(|_| HkdfLengthError)
}

/// [`hkdf_sha256`] into a 32-byte key, in zeroizing memory.
pub(crate) fn hkdf_sha256_key(salt: &[u8], ikm: &[u8], info: &[&[u8]]) -> Zeroizing<[u8; KEY_LEN]> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    // 32 bytes is far within HKDF-SHA256's bound, the one way it can fail.
    #[allow(clippy::expect_used)]
    hkdf_sha256(salt, ikm, info, key.as_mut()).expect("32 bytes is within HKDF-SHA256's bound");
    key
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
    fn derived_keys_differ_by_key_label_and_parts_and_from_the_key() {
        let k = DataKey::from_slice(&[1; 32]).unwrap().cipher();
        let a = k.derive("x", &[b"ab", b"c"]);
        assert_eq!(a.expose(), k.derive("x", &[b"ab", b"c"]).expose());
        assert_ne!(a.expose(), k.derive("x", &[b"a", b"bc"]).expose());
        assert_ne!(a.expose(), k.derive("y", &[b"ab", b"c"]).expose());
        assert_ne!(a.expose(), &[1; 32]);
        let other = DataKey::from_slice(&[2; 32]).unwrap().cipher();
        assert_ne!(a.expose(), other.derive("x", &[b"ab", b"c"]).expose());
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
