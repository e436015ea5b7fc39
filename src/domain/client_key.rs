//! The client-provided master key (`X-Master-Key`): held for one request,
//! never stored, logged or cached.

use std::fmt;

use base64::Engine;
use zeroize::Zeroizing;

/// A client-provided master key from `X-Master-Key`: at least 32 bytes, held in
/// zeroizing memory for the duration of one request.
pub struct ClientKey(pub(crate) Zeroizing<Vec<u8>>);

impl ClientKey {
    /// Shortest accepted key (256 bits).
    pub const MIN_LEN: usize = 32;
    /// Longest accepted key.
    pub const MAX_LEN: usize = 512;

    /// Parses the header value (standard base64, padding optional).
    pub fn from_base64(value: &str) -> Option<ClientKey> {
        let engine = base64::engine::general_purpose::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        let bytes = Zeroizing::new(engine.decode(value.trim()).ok()?);
        (Self::MIN_LEN..=Self::MAX_LEN)
            .contains(&bytes.len())
            .then(|| ClientKey(bytes))
    }
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientKey(<redacted>)")
    }
}
