//! Identifier newtypes, so that an encryption id can never be passed where a
//! version id is expected.

use std::fmt;
use std::str::FromStr;

use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh random (v4) id.
            pub fn new_random() -> Self {
                $name(Uuid::new_v4())
            }
            /// The 16 raw bytes, as bound into associated data.
            pub fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }
            /// The hyphenated lower-case text form, written into `buf`
            /// (what `Display` prints, without the formatting machinery).
            pub fn encode<'b>(&self, buf: &'b mut [u8; 36]) -> &'b str {
                self.0.hyphenated().encode_lower(buf)
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                $name(id)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0.hyphenated())
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::try_parse(s).map($name)
            }
        }
    };
}

uuid_id!(
    /// Identifies one encryption (one key context of one tenant): the contract's `encryptionId`.
    EncryptionId
);
uuid_id!(
    /// Identifies one key version of an encryption: the contract's `encryptionVersionId`.
    VersionId
);
uuid_id!(
    /// Identifies a tenant.
    TenantId
);
uuid_id!(
    /// Identifies one root key-encryption key (KEK).
    KekId
);

/// The base64url alphabet without padding: what the audit format (v2) writes
/// ids and hashes in.
const B64URL: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The 22-character base64url (no padding) form of a UUID given as its
/// hyphenated lower-case text, written into `buf`; `None` for any other text
/// (upper case, braces, no hyphens), which would not come back the same from
/// [`expand_uuid`]. The audit format v2 writes ids so.
pub fn compact_uuid<'b>(text: &str, buf: &'b mut [u8; 22]) -> Option<&'b str> {
    let id = Uuid::try_parse(text).ok()?;
    let mut canonical = [0; 36];
    if id.hyphenated().encode_lower(&mut canonical) != text {
        return None;
    }
    compact_bytes(id.as_bytes(), buf)
}

/// The hyphenated lower-case text of a UUID given in its 22-character
/// base64url form, written into `buf`; `None` when it is not one.
pub fn expand_uuid<'b>(compact: &str, buf: &'b mut [u8; 36]) -> Option<&'b str> {
    let mut bytes = [0; 16];
    if compact.len() != 22 || decode_b64url(compact, &mut bytes) != Some(16) {
        return None;
    }
    Some(Uuid::from_bytes(bytes).hyphenated().encode_lower(buf))
}

/// `bytes` in base64url without padding, written into `buf` (which must be
/// exactly long enough: 22 characters for 16 bytes, 43 for 32).
pub fn compact_bytes<'b, const N: usize>(bytes: &[u8], buf: &'b mut [u8; N]) -> Option<&'b str> {
    use base64::Engine;
    let n = B64URL.encode_slice(bytes, &mut buf[..]).ok()?;
    std::str::from_utf8(&buf[..n]).ok()
}

/// Decodes base64url without padding into `out`; how many bytes, or `None`
/// when `text` is not canonical base64url or does not fit.
pub fn decode_b64url(text: &str, out: &mut [u8]) -> Option<usize> {
    use base64::Engine;
    // A slice too short for the worst case is refused by `decode_slice`, so
    // decode into a buffer with room and copy.
    if text.len() > 64 {
        return None;
    }
    let mut buf = [0u8; 48];
    let n = B64URL.decode_slice(text, &mut buf).ok()?;
    out.get_mut(..n)?.copy_from_slice(&buf[..n]);
    Some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compact_uuid_comes_back_as_the_same_text_and_only_canonical_text_is_compacted() {
        let id = Uuid::new_v4();
        let text = id.hyphenated().to_string();
        let mut short = [0; 22];
        let compact = compact_uuid(&text, &mut short).unwrap().to_string();
        assert_eq!(compact.len(), 22);
        let mut long = [0; 36];
        assert_eq!(expand_uuid(&compact, &mut long), Some(text.as_str()));
        let upper = text.to_uppercase();
        assert_eq!(compact_uuid(&upper, &mut short), None);
        assert_eq!(compact_uuid(&id.simple().to_string(), &mut short), None);
        for bad in ["", "AAAA", "not base64 at all here!", &"A".repeat(23)] {
            assert_eq!(expand_uuid(bad, &mut long), None, "{bad}");
        }
        // Non-canonical trailing bits are refused: one text per id.
        let mut last = compact.as_bytes().to_vec();
        last[21] = b'B';
        let changed = String::from_utf8(last).unwrap();
        assert_eq!(expand_uuid(&changed, &mut long), None);
    }
}
