//! The audit checkpoint key: an Ed25519 key pair derived from a root KEK, so
//! that whoever holds the root KEK (the running service) can sign audit
//! checkpoints and anyone with the public key can check them, without any
//! secret.
//!
//! The private half is never stored: it is HKDF-SHA256 of the root KEK with
//! info `keyward:audit-checkpoint:v1`, recomputed whenever the KEK is loaded.
//! Changing the master key re-wraps the same KEK, so the key stays the same;
//! rotating the root KEK makes a new one (the old public key keeps verifying
//! the checkpoints it signed).

use std::fmt;

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};

use super::keys::{hkdf_sha256_key, sha256, DataKey};

/// Length of an Ed25519 public key.
pub const CHECKPOINT_PUBLIC_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const CHECKPOINT_SIGNATURE_LEN: usize = 64;
/// What every checkpoint signature covers before the checkpoint's own bytes,
/// so that a signature made for anything else never verifies as one.
pub const CHECKPOINT_CONTEXT: &[u8] = b"keyward:audit-checkpoint:v1\n";

/// Signs audit checkpoints. `Debug` prints only the key id.
pub struct CheckpointKey {
    pair: Ed25519KeyPair,
    public: [u8; CHECKPOINT_PUBLIC_KEY_LEN],
    id: String,
}

impl CheckpointKey {
    /// The checkpoint key of the root KEK `kek`.
    pub fn derive(kek: &DataKey) -> CheckpointKey {
        // HKDF with an empty salt: the KEK is already uniformly random.
        let seed = hkdf_sha256_key(&[], kek.expose(), &[b"keyward:audit-checkpoint:v1"]);
        // Every 32-byte seed is an Ed25519 private key (RFC 8032, 5.1.5).
        #[allow(clippy::expect_used)]
        let pair = Ed25519KeyPair::from_seed_unchecked(seed.as_ref())
            .expect("every 32-byte seed is an Ed25519 private key");
        let mut public = [0u8; CHECKPOINT_PUBLIC_KEY_LEN];
        public.copy_from_slice(pair.public_key().as_ref());
        CheckpointKey {
            id: checkpoint_key_id(&public),
            pair,
            public,
        }
    }

    /// The public key, which verifies this key's signatures.
    pub fn public_key(&self) -> &[u8; CHECKPOINT_PUBLIC_KEY_LEN] {
        &self.public
    }

    /// The key's id: [`checkpoint_key_id`] of its public key.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Signs [`CHECKPOINT_CONTEXT`] followed by `body`.
    pub fn sign(&self, body: &[u8]) -> [u8; CHECKPOINT_SIGNATURE_LEN] {
        let mut message = Vec::with_capacity(CHECKPOINT_CONTEXT.len() + body.len());
        message.extend_from_slice(CHECKPOINT_CONTEXT);
        message.extend_from_slice(body);
        // Ed25519 signing is deterministic and total over any message; AWS-LC
        // reports an error only for an allocation failure, which aborts anyway.
        #[allow(clippy::expect_used)]
        let signature = self
            .pair
            .try_sign(&message)
            .expect("Ed25519 signing does not fail for a valid key");
        let mut out = [0u8; CHECKPOINT_SIGNATURE_LEN];
        out.copy_from_slice(signature.as_ref());
        out
    }
}

impl fmt::Debug for CheckpointKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CheckpointKey({})", self.id)
    }
}

/// A checkpoint key's id: the first 8 bytes of the SHA-256 of its public key,
/// hex. Names the key in each checkpoint; it is not a trust anchor (the
/// public key is).
pub fn checkpoint_key_id(public_key: &[u8; CHECKPOINT_PUBLIC_KEY_LEN]) -> String {
    super::hex(&sha256(public_key)[..8])
}

/// Whether `signature` is `public_key`'s signature of [`CHECKPOINT_CONTEXT`]
/// followed by `body`.
pub fn verify_checkpoint(
    public_key: &[u8; CHECKPOINT_PUBLIC_KEY_LEN],
    body: &[u8],
    signature: &[u8],
) -> bool {
    let mut message = Vec::with_capacity(CHECKPOINT_CONTEXT.len() + body.len());
    message.extend_from_slice(CHECKPOINT_CONTEXT);
    message.extend_from_slice(body);
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&message, signature)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_follows_the_kek_and_only_its_public_key_verifies() {
        let kek = DataKey::from_slice(&[7; 32]).unwrap();
        let key = CheckpointKey::derive(&kek);
        let again = CheckpointKey::derive(&kek);
        assert_eq!(key.public_key(), again.public_key());
        assert_eq!(key.id().len(), 16);
        let other = CheckpointKey::derive(&DataKey::from_slice(&[8; 32]).unwrap());
        assert_ne!(key.public_key(), other.public_key());
        assert_ne!(key.id(), other.id());

        let signature = key.sign(b"body");
        assert!(verify_checkpoint(key.public_key(), b"body", &signature));
        assert!(!verify_checkpoint(key.public_key(), b"bodY", &signature));
        assert!(!verify_checkpoint(other.public_key(), b"body", &signature));
        assert!(!verify_checkpoint(
            key.public_key(),
            b"body",
            &signature[..63]
        ));
        let debug = format!("{key:?}");
        assert_eq!(debug, format!("CheckpointKey({})", key.id()));
    }
}
