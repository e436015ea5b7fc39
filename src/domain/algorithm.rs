//! The algorithms an encryption can be created with. Fixed at creation: every
//! version of an encryption uses its algorithm.

/// An encryption's algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// AES-256-GCM with a fresh random 96-bit nonce per call: the default.
    Aes256Gcm,
    /// AES-256-GCM-SIV (RFC 8452) with a nonce derived from the caller's
    /// context: deterministic (equal plaintexts under the same version and
    /// context give equal ciphertexts), opt-in, for equality lookups.
    Aes256GcmSiv,
}

impl Algorithm {
    /// Every algorithm, in display order.
    pub const ALL: [Algorithm; 2] = [Algorithm::Aes256Gcm, Algorithm::Aes256GcmSiv];

    /// The algorithm named `s` (as the API and the database write it).
    pub fn parse(s: &str) -> Option<Self> {
        Algorithm::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// Its name in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Aes256Gcm => "AES-256-GCM",
            Algorithm::Aes256GcmSiv => "AES-256-GCM-SIV",
        }
    }

    /// Whether equal plaintexts give equal ciphertexts.
    pub fn is_deterministic(self) -> bool {
        matches!(self, Algorithm::Aes256GcmSiv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for a in Algorithm::ALL {
            assert_eq!(Algorithm::parse(a.as_str()), Some(a));
        }
        assert_eq!(Algorithm::parse("aes-256-gcm"), None);
        assert_eq!(Algorithm::parse("AES-SIV"), None);
    }
}
