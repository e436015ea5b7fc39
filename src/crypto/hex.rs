//! Lower-case hex, as digests and key ids are shown (audit hashes, SPKI
//! digests, API key ids).

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    hex_into(bytes, &mut out);
    out
}

/// The bytes of lower-case hex text, or `None` when it is anything else (odd
/// length, another character, upper case).
pub fn parse_hex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let text = text.as_bytes();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// Appends `bytes` as lower-case hex to `out`.
pub fn hex_into(bytes: &[u8], out: &mut String) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_parses_back_and_anything_else_is_refused() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(parse_hex(&hex(&bytes)).unwrap(), bytes);
        for bad in ["0", "0g", "AB", "0x00", " 00"] {
            assert_eq!(parse_hex(bad), None, "{bad}");
        }
        assert_eq!(parse_hex("").unwrap(), Vec::<u8>::new());
    }
}
