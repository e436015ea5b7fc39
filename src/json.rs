//! Writing JSON by hand on the request path, byte for byte what `serde_json`
//! writes.
//!
//! serde_json checks a string one byte at a time through its escape table, and
//! goes through the `Serializer` machinery for every key and value: for an audit
//! record and a response that was about 7,600 instructions per request. The
//! strings there are almost always clean (ids, base64, hex, times), so
//! [`push_str`] checks eight bytes at a time and copies clean runs whole.
//! [`write_str`] is the same for any `fmt::Write` (the log's span fields).
//!
//! The output must stay identical to serde_json's: audit lines are hashed as
//! written, and the tests compare the two. It goes into a `String`: UTF-8 by
//! construction, so the audit writer has no need to check its lines again.

use std::fmt;

/// Appends `s` as a JSON string (quoted and escaped exactly as serde_json does:
/// `"` and `\` with a backslash; `\b`, `\t`, `\n`, `\f`, `\r`; every other byte
/// below 0x20 as `\u00xx`; nothing else).
pub fn push_str(out: &mut String, s: &str) {
    out.reserve(s.len() + 2);
    // Writing to a `String` cannot fail.
    let _ = write_str(out, s);
}

/// [`push_str`] for any writer (the log formatter's span fields).
pub fn write_str<W: fmt::Write + ?Sized>(out: &mut W, s: &str) -> fmt::Result {
    out.write_char('"')?;
    let bytes = s.as_bytes();
    let mut written = 0;
    let mut at = 0;
    while at < bytes.len() {
        let end = bytes.len().min(at + 8);
        let clean = if let Some(next) = bytes[at..].first_chunk::<8>() {
            !word_needs_escape(word(next))
        } else if let Some(last) = bytes.last_chunk::<8>() {
            // The last few bytes, as the word that ends with them.
            !word_needs_escape(word(last))
        } else {
            !bytes[at..end].iter().any(|&b| needs_escape(b))
        };
        if clean {
            at = end;
            continue;
        }
        for (i, &b) in bytes.iter().enumerate().take(end).skip(at) {
            if needs_escape(b) {
                // `i` is at an ASCII byte, so a character boundary.
                out.write_str(&s[written..i])?;
                write_escape(out, b)?;
                written = i + 1;
            }
        }
        at = end;
    }
    out.write_str(&s[written..])?;
    out.write_char('"')
}

fn word(bytes: &[u8; 8]) -> u64 {
    u64::from_le_bytes(*bytes)
}

/// Whether any of the eight bytes in `x` is below 0x20, `"` or `\`, without
/// looking at them one by one (the "has less than" and "has zero byte" word
/// tricks, exact as a yes or no).
fn word_needs_escape(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH != 0;
    let below_space = x.wrapping_sub(ONES * 0x20) & !x & HIGH != 0;
    below_space | has_zero(x ^ (ONES * u64::from(b'"'))) | has_zero(x ^ (ONES * u64::from(b'\\')))
}

#[inline(always)]
fn needs_escape(b: u8) -> bool {
    (b < 0x20) | (b == b'"') | (b == b'\\')
}

fn write_escape<W: fmt::Write + ?Sized>(out: &mut W, b: u8) -> fmt::Result {
    const HEX: &[char; 16] = &[
        '0', '1', '2', '3', '4', '5', '6', '7', '8', '9', 'a', 'b', 'c', 'd', 'e', 'f',
    ];
    match b {
        b'"' => out.write_str("\\\""),
        b'\\' => out.write_str("\\\\"),
        0x08 => out.write_str("\\b"),
        b'\t' => out.write_str("\\t"),
        b'\n' => out.write_str("\\n"),
        0x0c => out.write_str("\\f"),
        b'\r' => out.write_str("\\r"),
        _ => {
            out.write_str("\\u00")?;
            out.write_char(HEX[usize::from(b >> 4)])?;
            out.write_char(HEX[usize::from(b & 0xf)])
        }
    }
}

/// A JSON object being written: `{`, then one member per call, then `}` from
/// [`Object::end`]. Keys are the caller's literals and are not escaped.
pub struct Object<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> Object<'a> {
    /// Opens an object at the end of `out`.
    pub fn new(out: &'a mut String) -> Object<'a> {
        out.push('{');
        Object { out, first: true }
    }

    fn key(&mut self, key: &str) {
        debug_assert!(key.bytes().all(|b| !needs_escape(b)), "a plain key");
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        self.out.push('"');
        self.out.push_str(key);
        self.out.push_str("\":");
    }

    /// A string member.
    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        push_str(self.out, value);
        self
    }

    /// A string member, left out when `None` (serde's `skip_serializing_if`).
    pub fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        if let Some(v) = value {
            self.str(key, v);
        }
        self
    }

    /// An integer member.
    pub fn u64(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        self.out.push_str(itoa::Buffer::new().format(value));
        self
    }

    /// An integer member, left out when `None`.
    pub fn opt_u64(&mut self, key: &str, value: Option<u64>) -> &mut Self {
        if let Some(v) = value {
            self.u64(key, v);
        }
        self
    }

    /// A member whose value the caller writes with `write` (a nested object).
    pub fn with(&mut self, key: &str, write: impl FnOnce(&mut String)) -> &mut Self {
        self.key(key);
        write(self.out);
        self
    }

    /// Closes the object.
    pub fn end(&mut self) {
        self.out.push('}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that is not a `String`.
    struct Plain(String);
    impl fmt::Write for Plain {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0.push_str(s);
            Ok(())
        }
    }

    fn ours(s: &str) -> String {
        let mut out = String::new();
        push_str(&mut out, s);
        out
    }

    #[test]
    fn strings_are_escaped_exactly_as_serde_json_escapes_them() {
        let mut cases: Vec<String> = (0u32..0x80)
            .map(|c| char::from_u32(c).expect("ASCII").to_string())
            .collect();
        cases.extend(
            [
                "",
                "plain",
                "exactly sixteen!",
                "seventeen bytes!!",
                "a \"quoted\" word and a back\\slash",
                "tab\there, newline\nthere, \u{7f} delete, \u{1f} unit separator",
                "ünïcödé, 日本語, emoji 🔐, and \u{2028} line separator",
                "clean for thirty-two bytes.....\"then a quote at 32",
                "\u{0}\u{1}\u{8}\u{c}\u{b}",
            ]
            .map(String::from),
        );
        // Every escape at every offset of a long clean run, across chunk edges.
        for at in 0..40 {
            for c in ['"', '\\', '\n', '\u{1}', 'é'] {
                let mut s = "x".repeat(40);
                s.insert(at, c);
                cases.push(s);
            }
        }
        for s in &cases {
            let expected = serde_json::to_string(s).expect("a string serializes");
            assert_eq!(ours(s), expected, "for {s:?}");
            // The same through another writer (the log formatter's).
            let mut other = Plain(String::new());
            write_str(&mut other, s).expect("writes");
            assert_eq!(other.0, expected, "for {s:?}");
        }
    }

    #[test]
    fn the_word_check_agrees_with_the_byte_check() {
        for filler in [b'a', b' ', b'~', 0x7f, 0x80, 0xc3, 0xff] {
            for b in 0..=255u8 {
                for at in 0..8 {
                    let mut bytes = [filler; 8];
                    bytes[at] = b;
                    assert_eq!(
                        word_needs_escape(word(&bytes)),
                        bytes.iter().any(|&b| needs_escape(b)),
                        "{bytes:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn objects_match_serde_json() {
        #[derive(serde::Serialize)]
        struct Inner<'a> {
            nonce: &'a str,
        }
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Sample<'a> {
            seq: u64,
            name: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            missing: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            present: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            count: Option<u64>,
            metadata: Inner<'a>,
        }
        let sample = Sample {
            seq: u64::MAX,
            name: "a \"name\"",
            missing: None,
            present: Some("yes\n"),
            count: Some(0),
            metadata: Inner { nonce: "AAAA" },
        };
        let mut out = String::new();
        Object::new(&mut out)
            .u64("seq", sample.seq)
            .str("name", sample.name)
            .opt_str("missing", sample.missing)
            .opt_str("present", sample.present)
            .opt_u64("count", sample.count)
            .with("metadata", |out| {
                Object::new(out).str("nonce", sample.metadata.nonce).end()
            })
            .end();
        assert_eq!(out, serde_json::to_string(&sample).expect("serializes"));
    }
}
