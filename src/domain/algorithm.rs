//! The algorithms an encryption can use: fixed at its creation, stored as
//! text in its row, reported by encrypt.

/// An encryption's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// AES-256-GCM with 96-bit random nonces (the default).
    Aes256Gcm,
    /// RSA-OAEP with SHA-256 and MGF1-SHA-256 (3072 or 4096 bits); longer
    /// plaintexts as a JWE with an AES-256-GCM content key
    /// (docs/algorithms.md).
    RsaOaep256,
}

impl Algorithm {
    /// The algorithm named `s` exactly as [`Algorithm::as_str`] writes it.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "AES-256-GCM" => Some(Algorithm::Aes256Gcm),
            "RSA-OAEP-256" => Some(Algorithm::RsaOaep256),
            _ => None,
        }
    }

    /// Its name in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Aes256Gcm => "AES-256-GCM",
            Algorithm::RsaOaep256 => "RSA-OAEP-256",
        }
    }

    /// Every algorithm, the default first.
    pub const ALL: [Algorithm; 2] = [Algorithm::Aes256Gcm, Algorithm::RsaOaep256];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for a in Algorithm::ALL {
            assert_eq!(Algorithm::parse(a.as_str()), Some(a));
        }
        assert_eq!(Algorithm::parse("aes-256-gcm"), None);
    }
}
