//! Known answers: Project Wycheproof's AES-GCM and HKDF-SHA256 vectors run
//! through Keyward's own sealing, opening, key wrapping and key derivation
//! (not only through aws-lc-rs underneath), and fixed vectors of Keyward's own
//! byte layouts (docs/security.md, "Byte layouts"), computed independently by
//! `scripts/known-answers.py` with Python's `cryptography`. A change that
//! would stop old ciphertexts, wrapped keys or checkpoints from opening fails
//! here.
//!
//! Run alone with `scripts/test wycheproof` (the HTTP contract's nonce
//! format and the audit file format have their own `wycheproof` modules).

use ::wycheproof::aead::{TestName as AeadSet, TestSet as AeadTests};
use ::wycheproof::hkdf::{TestName as HkdfSet, TestSet as HkdfTests};
use ::wycheproof::TestResult;

use super::aead::{open, seal_with_nonce, NONCE_LEN, TAG_LEN};
use super::keys::{hkdf_sha256, DataKey, HkdfLengthError, HKDF_SHA256_MAX_LEN, KEY_LEN};
use super::wrap::WrappedKey;
use super::{
    checkpoint_key_id, data_aad, data_key_aad, derive_client_wrapping_key, hex, parse_hex,
    root_kek_aad, verify_checkpoint, CheckpointKey,
};

fn aes_gcm() -> AeadTests {
    AeadTests::load(AeadSet::AesGcm).unwrap()
}

/// Whether a vector is one Keyward's format can carry: AES-256, a 96-bit
/// nonce, a 128-bit tag.
fn keyward_parameters(key_size: usize, nonce_size: usize, tag_size: usize) -> bool {
    key_size == 256 && nonce_size == 96 && tag_size == 128
}

fn sealed_bytes(ct: &[u8], tag: &[u8]) -> Vec<u8> {
    [ct, tag].concat()
}

#[test]
fn wycheproof_aes_gcm_valid_vectors_seal_to_their_ciphertext_and_tag_and_open() {
    let (mut valid, mut invalid) = (0, 0);
    for group in aes_gcm().test_groups {
        if !keyward_parameters(group.key_size, group.nonce_size, group.tag_size) {
            continue;
        }
        for t in group.tests {
            let key = DataKey::from_slice(&t.key).unwrap().cipher();
            let nonce: [u8; NONCE_LEN] = t.nonce.as_slice().try_into().unwrap();
            let expected = sealed_bytes(&t.ct, &t.tag);
            let opened = open(&key, &nonce, &t.aad, &expected);
            match t.result {
                TestResult::Valid | TestResult::Acceptable => {
                    let sealed = seal_with_nonce(&key, nonce, &t.aad, &t.pt);
                    assert_eq!(sealed.nonce, nonce, "tcId {}", t.tc_id);
                    assert_eq!(
                        hex(&sealed.ciphertext),
                        hex(&expected),
                        "tcId {}: ciphertext and tag",
                        t.tc_id
                    );
                    assert_eq!(
                        opened.as_deref().ok(),
                        Some(t.pt.as_slice()),
                        "tcId {}: opens to its plaintext",
                        t.tc_id
                    );
                    valid += 1;
                }
                TestResult::Invalid => {
                    assert!(
                        opened.is_err(),
                        "tcId {}: an invalid vector opened",
                        t.tc_id
                    );
                    invalid += 1;
                }
            }
        }
    }
    // Every AES-256 / 96-bit nonce / 128-bit tag vector of the set ran.
    assert!(valid >= 39, "only {valid} valid vectors");
    assert!(invalid >= 20, "only {invalid} invalid vectors");
}

#[test]
fn wycheproof_aes_gcm_keys_other_than_256_bits_are_not_keys() {
    let mut refused = 0;
    for group in aes_gcm().test_groups {
        for t in &group.tests {
            let key = DataKey::from_slice(&t.key);
            if group.key_size == 256 {
                assert!(key.is_some(), "tcId {}", t.tc_id);
            } else {
                assert!(
                    key.is_none(),
                    "tcId {}: a {}-bit key",
                    t.tc_id,
                    group.key_size
                );
                refused += 1;
            }
        }
    }
    assert!(refused > 0);
}

#[test]
fn wycheproof_aes_gcm_nonces_other_than_96_bits_have_no_place_in_the_format() {
    // The nonce is a `[u8; 12]` from the metadata onwards (the HTTP
    // contract's own `wycheproof` module checks its parser refuses the rest),
    // so a vector with another nonce size cannot reach `open` at all; and
    // under the 96-bit nonce its first 12 bytes would give, it does not open.
    let mut refused = 0;
    for group in aes_gcm().test_groups {
        if group.key_size != 256 || group.tag_size != 128 || group.nonce_size == 96 {
            continue;
        }
        for t in group.tests {
            assert!(<[u8; NONCE_LEN]>::try_from(t.nonce.as_slice()).is_err());
            if t.nonce.len() >= NONCE_LEN && t.result != TestResult::Invalid {
                let key = DataKey::from_slice(&t.key).unwrap().cipher();
                let truncated: [u8; NONCE_LEN] = t.nonce[..NONCE_LEN].try_into().unwrap();
                let sealed = sealed_bytes(&t.ct, &t.tag);
                assert!(
                    open(&key, &truncated, &t.aad, &sealed).is_err(),
                    "tcId {}",
                    t.tc_id
                );
            }
            refused += 1;
        }
    }
    assert!(refused > 0);
}

#[test]
fn wycheproof_aes_gcm_short_tags_are_refused() {
    // Keyward's ciphertext always ends in a 16-byte tag. A vector with a
    // shorter tag, presented the only way the format allows (ciphertext then
    // tag), does not open: those of the set (its groups with `tagSize` below
    // 128, when it has them), and every valid vector with its tag cut to
    // the lengths GCM allows (SP 800-38D: 32, 64, 96 to 120 bits).
    let mut refused = 0;
    for group in aes_gcm().test_groups {
        if group.key_size != 256 || group.nonce_size != 96 {
            continue;
        }
        for t in group.tests {
            let key = DataKey::from_slice(&t.key).unwrap().cipher();
            let nonce: [u8; NONCE_LEN] = t.nonce.as_slice().try_into().unwrap();
            if group.tag_size < 128 {
                assert!(t.tag.len() < TAG_LEN);
                let sealed = sealed_bytes(&t.ct, &t.tag);
                assert!(
                    open(&key, &nonce, &t.aad, &sealed).is_err(),
                    "tcId {}",
                    t.tc_id
                );
                refused += 1;
            } else if t.result == TestResult::Valid {
                for len in [4, 8, 12, 13, 14, 15] {
                    let sealed = sealed_bytes(&t.ct, &t.tag[..len]);
                    assert!(
                        open(&key, &nonce, &t.aad, &sealed).is_err(),
                        "tcId {}: a {len}-byte tag",
                        t.tc_id
                    );
                    refused += 1;
                }
            }
        }
    }
    assert!(refused >= 200, "only {refused} short tags");
}

#[test]
fn wycheproof_aes_gcm_vectors_frame_as_wrapped_keys_and_unwrap_only_as_32_byte_keys() {
    // Key wrapping is AES-256-GCM of the 32-byte key, framed as nonce ||
    // ciphertext || tag. Every Keyward-shaped vector goes through the real
    // framing (`WrappedKey::frame` of Keyward's seal) and `unwrap_key`: the
    // frame is byte for byte the vector's, and nothing that is not a valid
    // 32-byte key unwraps (the set has no 32-byte message; the fixed vectors
    // in `keyward_layouts` unwrap real keys).
    let (mut framed, mut refused, mut unwrapped) = (0, 0, 0);
    for group in aes_gcm().test_groups {
        if !keyward_parameters(group.key_size, group.nonce_size, group.tag_size) {
            continue;
        }
        for t in group.tests {
            let key = DataKey::from_slice(&t.key).unwrap().cipher();
            let nonce: [u8; NONCE_LEN] = t.nonce.as_slice().try_into().unwrap();
            let wrapped =
                WrappedKey([t.nonce.as_slice(), t.ct.as_slice(), t.tag.as_slice()].concat());
            let result = key.unwrap_key(&wrapped, &t.aad);
            if t.result == TestResult::Invalid {
                assert!(result.is_err(), "tcId {}", t.tc_id);
                refused += 1;
                continue;
            }
            let sealed = WrappedKey::frame(&seal_with_nonce(&key, nonce, &t.aad, &t.pt));
            assert_eq!(sealed, wrapped, "tcId {}", t.tc_id);
            framed += 1;
            if t.pt.len() == KEY_LEN {
                assert_eq!(result.unwrap().expose().as_slice(), t.pt.as_slice());
                unwrapped += 1;
            } else {
                assert!(
                    result.is_err(),
                    "tcId {}: a {}-byte key",
                    t.tc_id,
                    t.pt.len()
                );
                refused += 1;
            }
        }
    }
    assert!(
        framed >= 39 && refused >= 60,
        "{framed} framed, {refused} refused, {unwrapped} unwrapped"
    );
}

#[test]
fn wycheproof_hkdf_sha256_vectors_derive_their_output_or_refuse_its_size() {
    let set = HkdfTests::load(HkdfSet::HkdfSha256).unwrap();
    let (mut derived, mut refused) = (0, 0);
    for group in set.test_groups {
        for t in group.tests {
            let mut out = vec![0u8; t.size];
            let result = hkdf_sha256(&t.salt, &t.ikm, &[t.info.as_slice()], &mut out);
            match t.result {
                TestResult::Valid | TestResult::Acceptable => {
                    assert_eq!(result, Ok(()), "tcId {}", t.tc_id);
                    assert_eq!(hex(&out), hex(&t.okm), "tcId {}", t.tc_id);
                    derived += 1;
                }
                TestResult::Invalid => {
                    assert!(t.size > HKDF_SHA256_MAX_LEN, "tcId {}", t.tc_id);
                    assert_eq!(result, Err(HkdfLengthError), "tcId {}", t.tc_id);
                    refused += 1;
                }
            }
        }
    }
    assert!(
        derived >= 80 && refused > 0,
        "{derived} derived, {refused} refused"
    );
}

#[test]
fn wycheproof_rfc_5869_hkdf_sha256_test_cases() {
    // RFC 5869, appendix A, test cases 1 to 3.
    let cases: [(&str, &str, &str, &str); 3] = [
        (
            "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
            "000102030405060708090a0b0c",
            "f0f1f2f3f4f5f6f7f8f9",
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        ),
        (
            "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\
             202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f\
             404142434445464748494a4b4c4d4e4f",
            "606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7f\
             808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f\
             a0a1a2a3a4a5a6a7a8a9aaabacadaeaf",
            "b0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0c1c2c3c4c5c6c7c8c9cacbcccdcecf\
             d0d1d2d3d4d5d6d7d8d9dadbdcdddedfe0e1e2e3e4e5e6e7e8e9eaebecedeeef\
             f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff",
            "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c\
             59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71\
             cc30c58179ec3e87c14c01d5c1f3434f1d87",
        ),
        (
            "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b",
            "",
            "",
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        ),
    ];
    for (ikm, salt, info, okm) in cases {
        let okm = parse_hex(okm).unwrap();
        let mut out = vec![0u8; okm.len()];
        hkdf_sha256(
            &parse_hex(salt).unwrap(),
            &parse_hex(ikm).unwrap(),
            &[&parse_hex(info).unwrap()],
            &mut out,
        )
        .unwrap();
        assert_eq!(out, okm);
    }
}

/// Keyward's own layouts, fixed: the inputs are test patterns, the outputs
/// were computed by `scripts/known-answers.py` (Python's `cryptography`).
mod keyward_layouts {
    use super::*;

    const ENCRYPTION_ID: &str = "00112233445566778899aabbccddeeff";
    const VERSION_ID: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";
    const KEK_ID: &str = "a0a1a2a3a4a5a6a7a8a9aaabacadaeaf";
    const PLAINTEXT: &str = "Keyward known answer: 1 €";

    const DATA_AAD: &str = "6b6579776172643a646174613a76310000112233445566778899aabbccddeeff0f1e2d3c4b5a69788796a5b4c3d2e1f0";
    const DEK_AAD: &str = "6b6579776172643a64656b3a7631000000112233445566778899aabbccddeeff0f1e2d3c4b5a69788796a5b4c3d2e1f0a0a1a2a3a4a5a6a7a8a9aaabacadaeaf";
    const KEK_AAD: &str = "6b6579776172643a6b656b3a76310000a0a1a2a3a4a5a6a7a8a9aaabacadaeaf";
    const SEALED_DATA: &str =
        "0c67af6ca497a63be62ff8fcdfc91903f0a1e246ca5b6e5cdae54922915af8d7dd17ea8d86b992fc1c12e9";
    const WRAPPED_DEK: &str = "101112131415161718191a1b20dcfd114b4614817b512d2fd8c5ae2e7d9cc64b211d1105b8235cf890d59cf491ce20fcf2624132fac0a7e6cf510750";
    const WRAPPED_KEK: &str = "202122232425262728292a2b15cae1c33b51763e5c1c16c7125970bca397de7b7541358eb951c4139d83f6ea3e91e2135ad9ab85e0cc642849e44c98";
    const CLIENT_WRAPPING_KEY: &str =
        "5b34958d0e0ddf1bdadbbaad76af62796a3a08e6d75bc0e0dbbab235ae59160e";
    const CLIENT_WRAPPED_DEK: &str = "303132333435363738393a3bf17720b0d720307ed2141271fddc05afd50bd4f91de742515b26c1caa23b098128a379a69cf193ba31be86ddc6410690";
    const CHECKPOINT_PUBLIC_KEY: &str =
        "6190544cba389083aa03dfba511ec77a555e45116368f08b1a2411031e7ed0a3";
    const CHECKPOINT_SIGNATURE: &str = "b1800fef47440c9d860db92f91caf7649b18d445cc5475177120c46ac0baa7f3e14386da9df0a1f906b68c432a3435b7a632d7b9e3f80c16ca3ea1f51e2b9806";
    const CHECKPOINT_KEY_ID: &str = "2657b19b9bf14f4b";

    fn id(text: &str) -> [u8; 16] {
        parse_hex(text).unwrap().try_into().unwrap()
    }

    /// 32 bytes counting up from `start`.
    fn pattern<const N: usize>(start: u8) -> [u8; N] {
        std::array::from_fn(|i| start + i as u8)
    }

    fn key(start: u8) -> DataKey {
        DataKey::from_slice(&pattern::<KEY_LEN>(start)).unwrap()
    }

    #[test]
    fn wycheproof_keyward_associated_data_layouts_are_fixed() {
        let (e, v, k) = (id(ENCRYPTION_ID), id(VERSION_ID), id(KEK_ID));
        assert_eq!(hex(&data_aad(&e, &v)), DATA_AAD);
        assert_eq!(hex(&data_key_aad(&e, &v, &k)), DEK_AAD);
        assert_eq!(hex(&root_kek_aad(&k)), KEK_AAD);
    }

    #[test]
    fn wycheproof_keyward_data_ciphertext_of_format_v1_seals_and_opens() {
        let aad = data_aad(&id(ENCRYPTION_ID), &id(VERSION_ID));
        let dek = key(0x00).cipher();
        let nonce = pattern::<NONCE_LEN>(0x00);
        let sealed = seal_with_nonce(&dek, nonce, &aad, PLAINTEXT.as_bytes());
        assert_eq!(hex(&sealed.ciphertext), SEALED_DATA);
        let stored = parse_hex(SEALED_DATA).unwrap();
        assert_eq!(
            &*open(&dek, &nonce, &aad, &stored).unwrap(),
            PLAINTEXT.as_bytes()
        );
    }

    #[test]
    fn wycheproof_keyward_wrapped_data_key_of_format_v1_unwraps() {
        let aad = data_key_aad(&id(ENCRYPTION_ID), &id(VERSION_ID), &id(KEK_ID));
        let kek = key(0x20).cipher();
        let framed = WrappedKey::frame(&seal_with_nonce(
            &kek,
            pattern(0x10),
            &aad,
            key(0x00).expose(),
        ));
        assert_eq!(hex(&framed.0), WRAPPED_DEK);
        let stored = WrappedKey(parse_hex(WRAPPED_DEK).unwrap());
        assert_eq!(
            kek.unwrap_key(&stored, &aad).unwrap().expose(),
            key(0x00).expose()
        );
    }

    #[test]
    fn wycheproof_keyward_root_kek_wrapped_by_the_env_master_key_of_format_v1_unwraps() {
        let aad = root_kek_aad(&id(KEK_ID));
        let master = key(0x40).cipher();
        let stored = WrappedKey(parse_hex(WRAPPED_KEK).unwrap());
        assert_eq!(
            master.unwrap_key(&stored, &aad).unwrap().expose(),
            key(0x20).expose()
        );
        let framed = WrappedKey::frame(&seal_with_nonce(
            &master,
            pattern(0x20),
            &aad,
            key(0x20).expose(),
        ));
        assert_eq!(framed, stored);
    }

    #[test]
    fn wycheproof_keyward_client_key_derivation_and_wrapping_of_format_v1() {
        let e = id(ENCRYPTION_ID);
        let wrapping = derive_client_wrapping_key(&pattern::<32>(0x60), &pattern::<32>(0x80), &e);
        assert_eq!(hex(wrapping.expose()), CLIENT_WRAPPING_KEY);
        // Client mode binds 16 zero bytes where platform mode names the KEK.
        let aad = data_key_aad(&e, &id(VERSION_ID), &[0; 16]);
        let stored = WrappedKey(parse_hex(CLIENT_WRAPPED_DEK).unwrap());
        assert_eq!(
            wrapping
                .cipher()
                .unwrap_key(&stored, &aad)
                .unwrap()
                .expose(),
            key(0x00).expose()
        );
    }

    #[test]
    fn wycheproof_keyward_checkpoint_key_of_a_root_kek_is_fixed() {
        let checkpoint = CheckpointKey::derive(&key(0x20));
        assert_eq!(hex(checkpoint.public_key()), CHECKPOINT_PUBLIC_KEY);
        assert_eq!(checkpoint.id(), CHECKPOINT_KEY_ID);
        assert_eq!(
            checkpoint_key_id(checkpoint.public_key()),
            CHECKPOINT_KEY_ID
        );
        // Ed25519 is deterministic: the same signature, and the stored one verifies.
        let body = b"{\"seq\":0}";
        assert_eq!(hex(&checkpoint.sign(body)), CHECKPOINT_SIGNATURE);
        let signature: [u8; 64] = parse_hex(CHECKPOINT_SIGNATURE).unwrap().try_into().unwrap();
        assert!(verify_checkpoint(checkpoint.public_key(), body, &signature));
        assert!(!verify_checkpoint(
            checkpoint.public_key(),
            b"{\"seq\":1}",
            &signature
        ));
    }

    #[test]
    fn wycheproof_keyward_any_flipped_bit_of_a_stored_ciphertext_or_its_ids_is_refused() {
        let (e, v) = (id(ENCRYPTION_ID), id(VERSION_ID));
        let dek = key(0x00).cipher();
        let nonce = pattern::<NONCE_LEN>(0x00);
        let stored = parse_hex(SEALED_DATA).unwrap();
        for bit in 0..stored.len() * 8 {
            let mut changed = stored.clone();
            changed[bit / 8] ^= 1 << (bit % 8);
            assert!(open(&dek, &nonce, &data_aad(&e, &v), &changed).is_err());
        }
        for bit in 0..NONCE_LEN * 8 {
            let mut changed = nonce;
            changed[bit / 8] ^= 1 << (bit % 8);
            assert!(open(&dek, &changed, &data_aad(&e, &v), &stored).is_err());
        }
        for bit in 0..128 {
            let (mut e2, mut v2) = (e, v);
            e2[bit / 8] ^= 1 << (bit % 8);
            v2[bit / 8] ^= 1 << (bit % 8);
            assert!(open(&dek, &nonce, &data_aad(&e2, &v), &stored).is_err());
            assert!(open(&dek, &nonce, &data_aad(&e, &v2), &stored).is_err());
        }
    }
}
