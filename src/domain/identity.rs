//! The caller's certificate identity on mutual TLS: what an API key can be bound
//! to, and what audit records name.
//!
//! As in MinIO KES, a client is known by the SHA-256 of its certificate's
//! SubjectPublicKeyInfo: a renewed certificate for the same key keeps its
//! identity, a new key is a new identity. Reading it from a certificate is the
//! transport's job (`tls::client_identity`).

use std::fmt;

use crate::crypto::hex;

/// Who is on the other end of a mutual-TLS connection.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// The certificate's subject, as an RFC 4514 string.
    pub subject: String,
    /// SHA-256 of the certificate's SubjectPublicKeyInfo.
    pub spki_sha256: [u8; 32],
}

impl ClientIdentity {
    /// The SPKI digest as lower-case hex (how logs and the CLI show it).
    pub fn spki_hex(&self) -> String {
        hex(&self.spki_sha256)
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ClientIdentity({}, spki={})",
            self.subject,
            self.spki_hex()
        )
    }
}
