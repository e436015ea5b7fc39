//! AES-256-GCM sealing with a fresh random 96-bit nonce per call.

use aws_lc_rs::aead::{Aad, Nonce};

use super::keys::{random_bytes, CipherKey};
use super::secret::SecretBytes;

/// Length of the random nonce (96 bits, the GCM standard).
pub const NONCE_LEN: usize = 12;
/// Length of the GCM authentication tag appended to every ciphertext.
pub const TAG_LEN: usize = 16;

/// The output of [`seal`]: the nonce and the ciphertext with its tag appended.
pub struct Sealed {
    /// The random nonce this ciphertext was sealed with.
    pub nonce: [u8; NONCE_LEN],
    /// Ciphertext followed by the 16-byte tag.
    pub ciphertext: Vec<u8>,
}

/// Encrypts `plaintext` under `key` with a fresh random nonce, authenticating `aad`.
///
/// A random nonce allows about 2^32 messages per key before the collision risk
/// passes NIST's bound (SP 800-38D); callers count uses per key and rotate well
/// before that.
pub fn seal(key: &CipherKey, aad: &[u8], plaintext: &[u8]) -> Sealed {
    seal_with_nonce(key, fresh_nonce(), aad, plaintext)
}

/// [`seal`] with a given nonce. Only [`seal`] (a fresh nonce) and the
/// known-answer tests (the standard vectors' nonces) call it: a nonce must
/// never be used twice under one key.
pub(super) fn seal_with_nonce(
    key: &CipherKey,
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Sealed {
    let mut buf = Vec::with_capacity(plaintext.len() + TAG_LEN);
    buf.extend_from_slice(plaintext);
    #[allow(clippy::expect_used)] // see the comment below
    key.aead()
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buf,
        )
        // Sealing fails only for inputs longer than GCM's 64 GiB bound, far beyond any
        // request body limit; treat it as the invariant violation it would be.
        // (`Vec` itself cannot grow past `isize::MAX` bytes either.)
        .expect("AES-256-GCM seal of a bounded message cannot fail");
    Sealed {
        nonce,
        ciphertext: buf,
    }
}

/// Nonces drawn from the CSPRNG this many at a time: one call for 64 nonces
/// costs little more than one call for one, and the call was a twentieth of an
/// encrypt request's CPU.
const NONCES_PER_DRAW: usize = 64;

/// A nonce no other call has had: the next unused 12 bytes of this thread's
/// draw from AWS-LC's CSPRNG (each draw is used once, front to back, and never
/// leaves the thread).
fn fresh_nonce() -> [u8; NONCE_LEN] {
    thread_local! {
        static POOL: std::cell::RefCell<(usize, [u8; NONCE_LEN * NONCES_PER_DRAW])> =
            const { std::cell::RefCell::new((NONCES_PER_DRAW, [0; NONCE_LEN * NONCES_PER_DRAW])) };
    }
    POOL.with_borrow_mut(|(next, bytes)| {
        if *next == NONCES_PER_DRAW {
            *bytes = random_bytes();
            *next = 0;
        }
        let mut nonce = [0; NONCE_LEN];
        let used = &mut bytes[*next * NONCE_LEN..][..NONCE_LEN];
        nonce.copy_from_slice(used);
        used.fill(0);
        *next += 1;
        nonce
    })
}

/// Decrypts and authenticates `ciphertext` (with its tag). Any mismatch of key,
/// nonce, associated data or ciphertext gives the same `Err(())`: the caller must
/// not learn which part was wrong.
///
/// The plaintext comes in a [`SecretBytes`]: the one buffer it is decrypted
/// into, in place, is cleared when the caller drops it. A failed open clears
/// it too: what GCM decrypted before the tag check failed is the keystream
/// XOR the caller's bytes, which would give away the keystream under that
/// nonce.
#[allow(clippy::result_unit_err)]
pub fn open(
    key: &CipherKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<SecretBytes, ()> {
    if ciphertext.len() < TAG_LEN {
        return Err(());
    }
    let mut buf = SecretBytes::new(ciphertext.to_vec());
    let len = key
        .aead()
        .open_in_place(
            Nonce::assume_unique_for_key(*nonce),
            Aad::from(aad),
            buf.vec_mut(),
        )
        .map_err(|_| ())?
        .len();
    buf.truncate(len);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::DataKey;

    #[test]
    fn nonces_never_repeat_across_draws_and_threads() {
        let per_thread = NONCES_PER_DRAW * 5 + 3;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    (0..per_thread).map(|_| fresh_nonce()).collect::<Vec<_>>()
                })
            })
            .collect();
        let mut seen = std::collections::HashSet::new();
        for t in threads {
            for nonce in t.join().unwrap() {
                assert_ne!(nonce, [0; NONCE_LEN]);
                assert!(seen.insert(nonce), "a nonce repeated");
            }
        }
        assert_eq!(seen.len(), 4 * per_thread);
    }

    #[test]
    fn seal_then_open_round_trips_and_nonces_differ() {
        let key = DataKey::generate().cipher();
        let a = seal(&key, b"aad", b"hello");
        let b = seal(&key, b"aad", b"hello");
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
        assert_eq!(
            &*open(&key, &a.nonce, b"aad", &a.ciphertext).unwrap(),
            b"hello"
        );
    }

    /// The plaintext's only buffer is one that clears itself: a change of
    /// `open`'s type back to a plain `Vec` does not compile.
    #[test]
    fn open_hands_out_the_plaintext_in_zeroizing_memory() {
        type Open = fn(&CipherKey, &[u8; NONCE_LEN], &[u8], &[u8]) -> Result<SecretBytes, ()>;
        fn clears_on_drop<T: zeroize::ZeroizeOnDrop>(_: &T) {}
        let open: Open = open;
        let key = DataKey::generate().cipher();
        let s = seal(&key, b"aad", b"hello");
        let plain = open(&key, &s.nonce, b"aad", &s.ciphertext).unwrap();
        clears_on_drop(&plain);
        assert_eq!(&*plain, b"hello");
    }

    #[test]
    fn any_tampering_fails_the_same_way() {
        let key = DataKey::generate().cipher();
        let s = seal(&key, b"aad", b"hello");
        let mut ct = s.ciphertext.clone();
        ct[0] ^= 1;
        assert!(open(&key, &s.nonce, b"aad", &ct).is_err());
        let mut nonce = s.nonce;
        nonce[0] ^= 1;
        assert!(open(&key, &nonce, b"aad", &s.ciphertext).is_err());
        assert!(open(&key, &s.nonce, b"other", &s.ciphertext).is_err());
        let other = DataKey::generate().cipher();
        assert!(open(&other, &s.nonce, b"aad", &s.ciphertext).is_err());
        assert!(open(&key, &s.nonce, b"aad", &s.ciphertext[..5]).is_err());
    }
}
