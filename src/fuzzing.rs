//! The fuzz targets' entry points (`fuzz/`, run with `cargo fuzz`; see
//! docs/reliability.md, "Fuzzing"): one function per kind of untrusted bytes
//! Keyward parses, each taking the bytes exactly where the service takes them.
//! Compiled only with the `fuzzing` feature, so the library's API is the same
//! without it; nothing here is for anything but fuzzing.
//!
//! Each function returns nothing: a fuzz target fails on a panic, an abort,
//! a timeout or running out of memory, and on the invariants asserted here.

use crate::crypto::{self, CipherKey, DataKey, WrappedKey, NONCE_LEN};

/// A fixed key for the targets that open or unwrap: random bytes never
/// authenticate under any key (it is none of the known-answer keys, whose
/// vectors are among the seeds and do authenticate under theirs).
fn fixed_key() -> CipherKey {
    match DataKey::from_slice(&[0x5a; 32]) {
        Some(key) => key.cipher(),
        None => unreachable!("32 bytes are a key"),
    }
}

/// A request body, as every route that takes one parses it; and, when it is
/// text, the same bytes as a query string.
pub fn request(data: &[u8]) {
    crate::http::fuzzing::request_body(data);
    if let Ok(text) = std::str::from_utf8(data) {
        crate::http::fuzzing::query_string(text);
    }
}

/// A ciphertext with its nonce and associated data as decrypt opens it: the
/// first 12 bytes are the nonce, the next 48 the associated data, the rest
/// the ciphertext and tag. Forged bytes never open.
pub fn ciphertext(data: &[u8]) {
    let Some((nonce, rest)) = data.split_first_chunk::<NONCE_LEN>() else {
        return;
    };
    let (aad, sealed) = rest.split_at(rest.len().min(48));
    assert!(
        crypto::open(&fixed_key(), nonce, aad, sealed).is_err(),
        "forged bytes opened"
    );
}

/// A wrapped key as a stored row holds it, unwrapped under a fixed key with
/// the data-key associated data. Forged bytes never unwrap.
pub fn wrapped_key(data: &[u8]) {
    let aad = crypto::data_key_aad(&[1; 16], &[2; 16], &[3; 16]);
    let wrapped = WrappedKey(data.to_vec());
    assert!(
        fixed_key().unwrap_key(&wrapped, &aad).is_err(),
        "forged bytes unwrapped"
    );
}

/// The `X-Master-Key` header's value.
pub fn client_key_header(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(key) = crate::domain::service::ClientKey::from_base64(text) {
            let len = key.0.len();
            assert!((32..=512).contains(&len), "a {len}-byte client key");
        }
    }
}

/// An audit file, as `keyward audit verify` reads it, without and with a
/// trusted public key (the checkpoint key of the known-answer root KEK, so
/// that the seed files' signatures verify), and its lines as `GET
/// /v1/audit` reads them back (format v1 or v2).
pub fn audit_file(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::audit::read_records(text);
    }
    let _ = crate::audit::verify(data, &[]);
    let kek: [u8; 32] = std::array::from_fn(|i| 0x20 + i as u8);
    let key = crypto::CheckpointKey::derive(&match DataKey::from_slice(&kek) {
        Some(key) => key,
        None => unreachable!("32 bytes are a key"),
    });
    let _ = crate::audit::verify(data, &[*key.public_key()]);
}

/// The settings file and the job sources file.
pub fn config_files(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        crate::config::fuzzing::settings_file(text);
        crate::config::fuzzing::job_sources_file(text);
    }
}
