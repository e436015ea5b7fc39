//! Pure cryptography: AEAD sealing of data, wrapping of keys, random values,
//! digests and their hex form. Nothing here knows about HTTP, databases or
//! async runtimes.
//!
//! Every primitive comes from `aws-lc-rs` (AWS-LC, a maintained BoringSSL fork):
//! AES-256-GCM with 96-bit random nonces, RSA-OAEP-256 (constant-time
//! private-key operations), AES Key Wrap with Padding (key import), SHA-256, HKDF-SHA256 and Ed25519
//! (audit checkpoints). We invent no
//! cryptography; this module only fixes *how* the primitives are combined, most
//! importantly the associated data that binds every ciphertext and every wrapped
//! key to the row it belongs to.

mod aead;
mod checkpoint;
mod hex;
mod keys;
mod rsa_oaep;
mod search;
mod secret;
pub mod stream;
mod wrap;
#[cfg(test)]
mod wycheproof;

pub use aead::{open, seal, Sealed, NONCE_LEN, TAG_LEN};
pub use checkpoint::{
    checkpoint_key_id, verify_checkpoint, CheckpointKey, CHECKPOINT_PUBLIC_KEY_LEN,
    CHECKPOINT_SIGNATURE_LEN,
};
pub use hex::{hex, hex_into, parse_hex};
pub use keys::{
    derive_client_wrapping_key, hkdf_sha256, random_bytes, sha256, sha256_parts, CipherKey,
    DataKey, HkdfLengthError, HKDF_SHA256_MAX_LEN, KEY_LEN,
};
pub use rsa_oaep::{ImportWrapping, RsaBits, RsaKeyError, RsaPrivateKey, RsaPublicKey};
pub use search::{blind_index, siv_nonce, siv_open, siv_seal, IndexKey, SivKey, MAX_INDEX_BITS};
pub use secret::{SecretBytes, SecretString};
pub use wrap::{UnwrapError, WrappedKey};

/// Associated data for a ciphertext produced by `/v1/encrypt`: it binds the
/// ciphertext to its encryption and its version, so a ciphertext presented under
/// another encryption or version fails to open instead of decrypting.
pub fn data_aad(encryption_id: &[u8; 16], version_id: &[u8; 16]) -> [u8; 48] {
    let mut aad = [0u8; 48];
    aad[..16].copy_from_slice(b"keyward:data:v1\0");
    aad[16..32].copy_from_slice(encryption_id);
    aad[32..].copy_from_slice(version_id);
    aad
}

/// What a caller's context adds after the 48 bytes of [`data_aad`]: a label
/// of its own, then the context's bytes (the prefix has a fixed length, so the
/// context needs no length). Only built when a context is given: a ciphertext
/// without one keeps exactly the associated data it always had.
pub const CONTEXT_LABEL: &[u8; 16] = b"keyward:ctx:v1\0\0";

/// The context binding of a ciphertext of encryption `encryption_id`'s
/// version `version_id` made under the caller's `context` (not empty):
/// `data_aad ‖ "keyward:ctx:v1\0\0" ‖ context`. AES-256-GCM takes it as its
/// associated data; RSA-OAEP-256 as the OAEP label of a block, or the JWE's
/// additional authenticated data (see `RsaPublicKey::seal`).
pub fn context_binding(encryption_id: &[u8; 16], version_id: &[u8; 16], context: &[u8]) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64 + context.len());
    aad.extend_from_slice(&data_aad(encryption_id, version_id));
    aad.extend_from_slice(CONTEXT_LABEL);
    aad.extend_from_slice(context);
    aad
}

/// The binding of a data key from `POST /v1/datakey`, wrapped under
/// encryption `encryption_id`'s version `version_id`, with the caller's
/// `context` (possibly empty): `"keyward:dkey:v1\0" ‖ encryption id ‖
/// version id ‖ "keyward:ctx:v1\0\0" ‖ context`. Its own first label, so a
/// wrapped data key never opens through `/v1/decrypt` (whose bindings all
/// start `"keyward:data:v1\0"`), nor a ciphertext through the unwrap route.
pub fn wrapped_data_key_binding(
    encryption_id: &[u8; 16],
    version_id: &[u8; 16],
    context: &[u8],
) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64 + context.len());
    aad.extend_from_slice(b"keyward:dkey:v1\0");
    aad.extend_from_slice(encryption_id);
    aad.extend_from_slice(version_id);
    aad.extend_from_slice(CONTEXT_LABEL);
    aad.extend_from_slice(context);
    aad
}

/// Associated data for a deterministic (AES-256-GCM-SIV) ciphertext: the
/// same binding to encryption and version as [`data_aad`] under its own label,
/// followed by the caller's context (the prefix has a fixed length, so the
/// context needs no length of its own).
pub fn deterministic_aad(
    encryption_id: &[u8; 16],
    version_id: &[u8; 16],
    context: &[u8],
) -> Vec<u8> {
    let mut aad = Vec::with_capacity(48 + context.len());
    aad.extend_from_slice(b"keyward:siv:v1\0\0");
    aad.extend_from_slice(encryption_id);
    aad.extend_from_slice(version_id);
    aad.extend_from_slice(context);
    aad
}

/// Associated data for a data key wrapped under a root KEK or a client key: it
/// binds the wrapped key to its encryption, its version and the id of the key that
/// wraps it, so a wrapped key copied onto another row fails to unwrap.
pub fn data_key_aad(
    encryption_id: &[u8; 16],
    version_id: &[u8; 16],
    wrapping_key_id: &[u8; 16],
) -> [u8; 64] {
    let mut aad = [0u8; 64];
    aad[..16].copy_from_slice(b"keyward:dek:v1\0\0");
    aad[16..32].copy_from_slice(encryption_id);
    aad[32..48].copy_from_slice(version_id);
    aad[48..].copy_from_slice(wrapping_key_id);
    aad
}

/// Associated data for a tenant's import wrapping key (its PKCS#8 DER)
/// wrapped under a root KEK: bound to the tenant and the KEK.
pub fn wrapping_key_aad(tenant_id: &[u8; 16], kek_id: &[u8; 16]) -> [u8; 48] {
    let mut aad = [0u8; 48];
    aad[..16].copy_from_slice(b"keyward:import\0\0");
    aad[16..32].copy_from_slice(tenant_id);
    aad[32..].copy_from_slice(kek_id);
    aad
}

/// Associated data for the root KEK wrapped under the master key.
pub fn root_kek_aad(kek_id: &[u8; 16]) -> [u8; 32] {
    let mut aad = [0u8; 32];
    aad[..16].copy_from_slice(b"keyward:kek:v1\0\0");
    aad[16..].copy_from_slice(kek_id);
    aad
}
