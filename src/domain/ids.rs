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
