//! Key wrapping: a data key sealed under another key with AES-256-GCM, bound
//! to its row by associated data.

use std::fmt;

use super::aead::{open, seal, Sealed, NONCE_LEN, TAG_LEN};
use super::keys::{CipherKey, DataKey, KEY_LEN};

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

impl WrappedKey {
    /// The wrapped form of a sealed key: `nonce || ciphertext || tag`.
    pub(super) fn frame(sealed: &Sealed) -> WrappedKey {
        let mut out = Vec::with_capacity(NONCE_LEN + KEY_LEN + TAG_LEN);
        out.extend_from_slice(&sealed.nonce);
        out.extend_from_slice(&sealed.ciphertext);
        WrappedKey(out)
    }
}

impl CipherKey {
    /// Wraps `key` under this key, binding `aad`.
    pub fn wrap(&self, key: &DataKey, aad: &[u8]) -> WrappedKey {
        WrappedKey::frame(&seal(self, aad, key.expose()))
    }

    /// Unwraps a key wrapped by [`CipherKey::wrap`] under the same `aad`.
    pub fn unwrap_key(&self, wrapped: &WrappedKey, aad: &[u8]) -> Result<DataKey, UnwrapError> {
        if wrapped.0.len() != NONCE_LEN + KEY_LEN + TAG_LEN {
            return Err(UnwrapError);
        }
        let (nonce, ct) = wrapped
            .0
            .split_first_chunk::<NONCE_LEN>()
            .ok_or(UnwrapError)?;
        let plain = open(self, nonce, aad, ct).map_err(|_| UnwrapError)?;
        DataKey::from_slice(&plain).ok_or(UnwrapError)
    }
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
}
