//! What search over encrypted fields is built from: deterministic
//! AES-256-GCM-SIV (RFC 8452) with a nonce derived from the caller's context,
//! and HMAC-SHA256 blind indexes truncated to a chosen number of bits. Both
//! run under keys derived from a version's data key with HKDF-SHA256 (see
//! [`super::CipherKey::derive`]), never under the data key itself.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM_SIV};
use aws_lc_rs::hmac;

use super::aead::{NONCE_LEN, TAG_LEN};
use super::keys::{sha256, DataKey};
use super::secret::SecretBytes;

/// A key prepared for AES-256-GCM-SIV. `Debug` prints no key bytes.
pub struct SivKey(LessSafeKey);

impl SivKey {
    /// The AES-256-GCM-SIV context of `key`.
    pub fn new(key: &DataKey) -> SivKey {
        // Infallible: a 32-byte key is what AES-256-GCM-SIV takes.
        #[allow(clippy::expect_used)]
        let unbound = UnboundKey::new(&AES_256_GCM_SIV, key.expose())
            .expect("a 32-byte key is valid for AES-256-GCM-SIV");
        SivKey(LessSafeKey::new(unbound))
    }
}

impl std::fmt::Debug for SivKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SivKey(<redacted>)")
    }
}

/// The nonce of deterministic encryption under `context`: the first 96 bits
/// of SHA-256 over a label and the context. Equal contexts give equal nonces
/// (so equal plaintexts give equal ciphertexts); different contexts give
/// different nonces, hence (RFC 8452 §4) different per-nonce keys inside
/// GCM-SIV. The context is bound into the associated data as well, so the
/// nonce is no secret and needs none.
pub fn siv_nonce(context: &[u8]) -> [u8; NONCE_LEN] {
    let mut input = Vec::with_capacity(24 + context.len());
    input.extend_from_slice(b"keyward:siv-nonce:v1\0");
    input.extend_from_slice(context);
    let digest = sha256(&input);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&digest[..NONCE_LEN]);
    nonce
}

/// AES-256-GCM-SIV encryption (RFC 8452): deterministic for a given key,
/// nonce, associated data and plaintext. Returns the ciphertext followed by
/// the 16-byte tag.
pub fn siv_seal(key: &SivKey, nonce: &[u8; NONCE_LEN], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(plaintext.len() + TAG_LEN);
    buf.extend_from_slice(plaintext);
    // Sealing fails only past GCM-SIV's 2^36-byte bound, far beyond any body
    // limit: the invariant violation it would be.
    #[allow(clippy::expect_used)]
    key.0
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(*nonce),
            Aad::from(aad),
            &mut buf,
        )
        .expect("AES-256-GCM-SIV seal of a bounded message cannot fail");
    buf
}

/// Opens what [`siv_seal`] made. Any mismatch gives the same `Err(())`; the
/// plaintext comes in memory cleared on drop, and a failed open clears what
/// was decrypted before the tag check.
#[allow(clippy::result_unit_err)]
pub fn siv_open(
    key: &SivKey,
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<SecretBytes, ()> {
    if ciphertext.len() < TAG_LEN {
        return Err(());
    }
    let mut buf = SecretBytes::new(ciphertext.to_vec());
    let len = key
        .0
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

/// A blind-index key (HMAC-SHA256). `Debug` prints no key bytes.
pub struct IndexKey(hmac::Key);

impl IndexKey {
    /// The HMAC-SHA256 key `key`.
    pub fn new(key: &DataKey) -> IndexKey {
        IndexKey(hmac::Key::new(hmac::HMAC_SHA256, key.expose()))
    }
}

impl std::fmt::Debug for IndexKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IndexKey(<redacted>)")
    }
}

/// Most bits a blind index keeps (all of HMAC-SHA256).
pub const MAX_INDEX_BITS: u16 = 256;

/// The blind index of `input`: HMAC-SHA256 under `key`, keeping the first
/// `bits` bits (1 to 256). The bytes are `ceil(bits / 8)` long, the bits past
/// `bits` in the last byte zero, so equal inputs give equal bytes.
pub fn blind_index(key: &IndexKey, input: &[u8], bits: u16) -> Vec<u8> {
    let bits = bits.clamp(1, MAX_INDEX_BITS) as usize;
    let tag = hmac::sign(&key.0, input);
    let mut out = tag.as_ref()[..bits.div_ceil(8)].to_vec();
    let spare = out.len() * 8 - bits;
    if let Some(last) = out.last_mut() {
        *last &= 0xffu8 << spare;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::parse_hex;

    fn hex(s: &str) -> Vec<u8> {
        parse_hex(s).unwrap()
    }

    fn key(s: &str) -> SivKey {
        SivKey::new(&DataKey::from_slice(&hex(s)).unwrap())
    }

    /// RFC 8452, Appendix C.2 (AEAD_AES_256_GCM_SIV): key, nonce, AAD,
    /// plaintext, result (ciphertext and tag).
    const RFC_8452_C2: &[(&str, &str, &str, &str, &str)] = &[
        ("0100000000000000000000000000000000000000000000000000000000000000", "030000000000000000000000", "", "",
         "07f5f4169bbf55a8400cd47ea6fd400f"),
        ("0100000000000000000000000000000000000000000000000000000000000000", "030000000000000000000000", "", "0100000000000000",
         "c2ef328e5c71c83b843122130f7364b761e0b97427e3df28"),
        ("0100000000000000000000000000000000000000000000000000000000000000", "030000000000000000000000", "", "010000000000000000000000",
         "9aab2aeb3faa0a34aea8e2b18ca50da9ae6559e48fd10f6e5c9ca17e"),
        ("0100000000000000000000000000000000000000000000000000000000000000", "030000000000000000000000", "", "01000000000000000000000000000000",
         "85a01b63025ba19b7fd3ddfc033b3e76c9eac6fa700942702e90862383c6c366"),
        ("0100000000000000000000000000000000000000000000000000000000000000", "030000000000000000000000", "",
         "0100000000000000000000000000000002000000000000000000000000000000",
         "4a6a9db4c8c6549201b9edb53006cba821ec9cf850948a7c86c68ac7539d027fe819e63abcd020b006a976397632eb5d"),
        ("0100000000000000000000000000000000000000000000000000000000000000", "030000000000000000000000", "01", "0200000000000000",
         "1de22967237a813291213f267e3b452f02d01ae33e4ec854"),
        ("0100000000000000000000000000000000000000000000000000000000000000", "030000000000000000000000", "01", "020000000000000000000000",
         "163d6f9cc1b346cd453a2e4cc1a4a19ae800941ccdc57cc8413c277f"),
        ("0100000000000000000000000000000000000000000000000000000000000000", "030000000000000000000000", "01", "02000000000000000000000000000000",
         "c91545823cc24f17dbb0e9e807d5ec17b292d28ff61189e8e49f3875ef91aff7"),
        ("0100000000000000000000000000000000000000000000000000000000000000", "030000000000000000000000", "01",
         "0200000000000000000000000000000003000000000000000000000000000000",
         "07dad364bfc2b9da89116d7bef6daaaf6f255510aa654f920ac81b94e8bad365aea1bad12702e1965604374aab96dbbc"),
    ];

    #[test]
    fn siv_seal_and_open_match_rfc_8452_appendix_c2() {
        for (k, n, aad, pt, result) in RFC_8452_C2 {
            let key = key(k);
            let nonce: [u8; NONCE_LEN] = hex(n).try_into().unwrap();
            let sealed = siv_seal(&key, &nonce, &hex(aad), &hex(pt));
            assert_eq!(
                crate::crypto::hex(&sealed),
                *result,
                "plaintext {pt}, aad {aad}"
            );
            let opened = siv_open(&key, &nonce, &hex(aad), &sealed).unwrap();
            assert_eq!(&*opened, hex(pt).as_slice());
        }
    }

    #[test]
    fn siv_is_deterministic_and_refuses_any_tampering() {
        let key = SivKey::new(&DataKey::generate());
        let nonce = siv_nonce(b"users.email");
        let a = siv_seal(&key, &nonce, b"aad", b"alice@example.com");
        assert_eq!(a, siv_seal(&key, &nonce, b"aad", b"alice@example.com"));
        assert_ne!(
            a,
            siv_seal(&key, &siv_nonce(b"other"), b"aad", b"alice@example.com")
        );
        assert_ne!(a, siv_seal(&key, &nonce, b"aad", b"bob@example.com"));
        let mut bad = a.clone();
        bad[0] ^= 1;
        assert!(siv_open(&key, &nonce, b"aad", &bad).is_err());
        assert!(siv_open(&key, &nonce, b"other", &a).is_err());
        assert!(siv_open(&key, &siv_nonce(b"other"), b"aad", &a).is_err());
        assert!(siv_open(&key, &nonce, b"aad", &a[..10]).is_err());
    }

    #[test]
    fn siv_nonces_differ_by_context_and_are_stable() {
        assert_eq!(siv_nonce(b""), siv_nonce(b""));
        assert_ne!(siv_nonce(b""), siv_nonce(b"a"));
        assert_ne!(siv_nonce(b"a"), siv_nonce(b"b"));
    }

    /// RFC 4231 test case 2 through [`blind_index`] at full length, then
    /// truncated: the prefix, with the spare bits of the last byte cleared.
    #[test]
    fn blind_index_is_hmac_sha256_truncated_to_its_bits() {
        let key = IndexKey(hmac::Key::new(hmac::HMAC_SHA256, b"Jefe"));
        let full = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        let input = b"what do ya want for nothing?";
        assert_eq!(crate::crypto::hex(&blind_index(&key, input, 256)), full);
        assert_eq!(
            crate::crypto::hex(&blind_index(&key, input, 32)),
            &full[..8]
        );
        // 0x5b = 0101 1011: 12 bits keep 0x5b and the high nibble of 0xdc.
        assert_eq!(blind_index(&key, input, 12), vec![0x5b, 0xd0]);
        assert_eq!(blind_index(&key, input, 1), vec![0x00]);
        assert_eq!(blind_index(&key, input, 2), vec![0x40]);
    }

    #[test]
    fn debug_prints_no_key_bytes() {
        let k = DataKey::from_slice(&[0xAB; 32]).unwrap();
        let s = format!("{:?} {:?}", SivKey::new(&k), IndexKey::new(&k));
        assert!(!s.to_lowercase().contains("ab"), "{s}");
    }
}
