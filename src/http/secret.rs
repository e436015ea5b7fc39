//! Plaintext on its way in and out of a request, in memory Keyward clears.
//!
//! A decrypted plaintext is written into a [`SecretBody`]: memory cleared on
//! drop ([`SecretBytes`]) that is handed to hyper as the response body itself
//! (no copy) and cleared when hyper has sent it and drops the last
//! reference. It never regrows in place, since a regrown buffer would leave
//! its old copy in freed memory: a larger one is allocated, filled, and the
//! old one cleared. The request side keeps what it parses (`data` of
//! encrypt, a batch's items) in memory cleared on drop, and clears the
//! request body when it holds the only reference to it. What remains in the
//! HTTP and TLS libraries' own buffers is listed in `docs/security.md`
//! (Memory).

use std::fmt;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use serde::{Deserialize, Deserializer, Serializer};
use zeroize::Zeroize;

use crate::crypto::{SecretBytes, SecretString};

/// A JSON response body that holds plaintext: cleared on drop, never
/// regrown in place, and sent without a copy.
pub struct SecretBody(SecretBytes);

impl SecretBody {
    /// An empty body with room for `capacity` bytes (a close estimate saves
    /// a move to a larger buffer, which costs a copy).
    pub fn with_capacity(capacity: usize) -> SecretBody {
        SecretBody(SecretBytes::with_capacity(capacity))
    }

    /// Appends `bytes`, moving to a larger buffer (and clearing this one)
    /// when they do not fit.
    pub fn push(&mut self, bytes: &[u8]) {
        if bytes.len() > self.0.room() {
            let needed = self.0.len() + bytes.len();
            let mut larger = SecretBytes::with_capacity(needed.max(2 * self.0.capacity()));
            larger.extend_within(&self.0);
            // The old buffer drops here, cleared.
            self.0 = larger;
        }
        self.0.extend_within(bytes);
    }

    /// How many bytes were written.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The buffer as `Bytes`, which own it and clear it when the last
    /// reference is dropped.
    pub fn into_bytes(self) -> Bytes {
        Bytes::from_owner(self.0)
    }

    /// The bytes written so far.
    #[cfg(test)]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// `value` serialized by serde_json into a body of `capacity` bytes.
    pub fn json(value: &impl serde::Serialize, capacity: usize) -> SecretBody {
        let mut body = SecretBody::with_capacity(capacity);
        // The writer is memory and cannot fail; serde_json itself fails only
        // for a map with non-string keys or a `Serialize` impl that errors,
        // and the responses given here are derived structs of strings.
        #[allow(clippy::expect_used)]
        serde_json::to_writer(&mut body, value).expect("a response serializes");
        body
    }
}

impl fmt::Write for SecretBody {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

impl std::io::Write for SecretBody {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl IntoResponse for SecretBody {
    /// A `200` JSON response whose body is this buffer itself: `Bytes` owns
    /// it, and clears it when hyper drops the last reference.
    fn into_response(self) -> Response {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            Body::from(self.into_bytes()),
        )
            .into_response()
    }
}

/// Deserializes a string field into memory cleared on drop (`data` of
/// encrypt). serde_json hands over the one string it built (unescaping, if
/// needed, in a scratch buffer of its own).
pub fn secret_string<'de, D: Deserializer<'de>>(d: D) -> Result<SecretString, D::Error> {
    String::deserialize(d).map(SecretString::new)
}

/// Serializes a secret string field as a plain JSON string.
pub fn plain_str<S: Serializer>(value: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(value)
}

/// Clears a request body after it has been parsed, if this is the only
/// reference to its memory (a body that came in several pieces, which axum
/// joined into a buffer of its own). A body that is a slice of hyper's
/// connection buffer, still shared with it, is hyper's and is left alone.
pub fn clear_if_unique(body: Bytes) {
    drop(cleared(body));
}

/// The body's memory, cleared, if nobody else holds it; else the body.
fn cleared(body: Bytes) -> Result<BytesMut, Bytes> {
    let mut only = body.try_into_mut()?;
    only.as_mut().zeroize();
    Ok(only)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write;

    /// A body that outgrows its first buffer keeps every byte in order, in
    /// memory cleared on drop; a body's bytes are what serde_json writes.
    #[test]
    fn a_body_grows_into_new_cleared_buffers_and_keeps_its_bytes() {
        fn clears_on_drop<T: zeroize::ZeroizeOnDrop>(_: &T) {}
        let mut body = SecretBody::with_capacity(4);
        clears_on_drop(&body.0);
        let first = body.0.as_ptr();
        let mut expected = Vec::new();
        for i in 0..100 {
            let piece = format!("piece {i};");
            body.write_str(&piece).unwrap();
            expected.extend_from_slice(piece.as_bytes());
        }
        assert_eq!(body.as_bytes(), expected.as_slice());
        assert_ne!(body.0.as_ptr(), first, "moved to larger buffers");
        let value = serde_json::json!({"data": "ünï \"x\"\n", "n": [1, 2]});
        assert_eq!(
            SecretBody::json(&value, 1).as_bytes(),
            serde_json::to_vec(&value).unwrap().as_slice()
        );
    }

    /// A body Keyward holds alone is cleared in place; one still shared is
    /// left as it is (it is not Keyward's to clear).
    #[test]
    fn a_request_body_is_cleared_only_when_no_one_else_holds_it() {
        let body = Bytes::from(b"{\"data\":\"secret\"}".to_vec());
        let other = body.clone();
        let body = cleared(body).expect_err("shared with `other`");
        assert_eq!(&other[..], b"{\"data\":\"secret\"}");
        drop(other);
        let ptr = body.as_ptr();
        let cleared = cleared(body).expect("held once");
        assert_eq!(cleared.as_ptr(), ptr, "the same memory, not a copy");
        assert_eq!(cleared.len(), 17);
        assert!(cleared.iter().all(|b| *b == 0));
    }
}
