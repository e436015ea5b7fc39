//! Blind indexes as the key object holds them: each index's name, truncation,
//! normalisations and key versions, and the normalisation of a plaintext
//! before it is indexed. The keyed digest itself is [`crate::crypto::blind_index`];
//! which key it runs under is the service's business (docs/search.md).

use unicode_normalization::UnicodeNormalization;
use zeroize::Zeroizing;

use super::error::KeyError;
use super::ids::VersionId;
use crate::crypto::MAX_INDEX_BITS;
use crate::domain::records::BlindIndexRow;

/// Most blind indexes one encryption may have.
pub const MAX_INDEXES: usize = 32;

/// The most live versions (from `minVersion` to the active one) a blind index
/// keeps: an all-versions lookup computes one value per live version, so this
/// bounds its cost. Raising `minVersion` makes room for another rotation.
pub const MAX_LIVE_INDEX_VERSIONS: i64 = 8;

/// One normalisation step, applied before a value is indexed so that every
/// caller computes the same value for what the platform considers equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalization {
    /// Removes leading and trailing Unicode white space.
    Trim,
    /// Unicode lower case (`char::to_lowercase`, the default case mapping of
    /// the Unicode standard): `Ä` and `ä` index alike. Not full case folding:
    /// `ß` stays `ß`.
    Casefold,
    /// Unicode compatibility composition (NFKC): `ｆｕｌｌ` and `full`, a
    /// composed and a decomposed `é`, index alike.
    Nfkc,
    /// Keeps the ASCII digits only (`+1 (555) 010-0199` → `15550100199`);
    /// after `nfkc`, full-width digits count too.
    Digits,
}

impl Normalization {
    /// Every step.
    pub const ALL: [Normalization; 4] = [
        Normalization::Trim,
        Normalization::Casefold,
        Normalization::Nfkc,
        Normalization::Digits,
    ];

    /// Its name in the API and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Normalization::Trim => "trim",
            Normalization::Casefold => "casefold",
            Normalization::Nfkc => "nfkc",
            Normalization::Digits => "digits",
        }
    }

    /// The step named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Normalization::ALL.into_iter().find(|n| n.as_str() == s)
    }

    /// `input` after this step; `None` when the result would be over
    /// [`MAX_INDEXED_BYTES`] (NFKC and lower-casing can make a text many
    /// times longer: up to 18 times for NFKC).
    fn apply(self, input: &str) -> Option<Zeroizing<String>> {
        match self {
            Normalization::Trim => Some(Zeroizing::new(input.trim().to_string())),
            // `str::to_lowercase`, not per character: it applies Unicode's
            // final-sigma rule (a word-final `Σ` becomes `ς`), which values
            // indexed before must keep. Its buffer grows only for the few
            // characters whose lower case is longer.
            Normalization::Casefold => {
                let lower = Zeroizing::new(input.to_lowercase());
                (lower.len() <= MAX_INDEXED_BYTES).then_some(lower)
            }
            Normalization::Nfkc => bounded(input.nfkc(), input.len()),
            Normalization::Digits => {
                bounded(input.chars().filter(char::is_ascii_digit), input.len())
            }
        }
    }
}

/// The most bytes a value may have, before and after each normalization, to
/// be given a blind-index value: indexed fields are short (an e-mail
/// address, a name, a number), and a bound keeps one request from making
/// the server normalize (and hash) megabytes per item.
pub const MAX_INDEXED_BYTES: usize = 64 * 1024;

/// Collects `chars` into memory cleared on drop, `None` once over
/// [`MAX_INDEXED_BYTES`]: grown by hand, so that no buffer it outgrows is
/// left behind uncleared (as `String`'s own growth would).
fn bounded(chars: impl Iterator<Item = char>, hint: usize) -> Option<Zeroizing<String>> {
    let mut out = Zeroizing::new(String::with_capacity(hint.min(MAX_INDEXED_BYTES) + 4));
    for c in chars {
        if out.len() + c.len_utf8() > MAX_INDEXED_BYTES {
            return None;
        }
        if out.len() + c.len_utf8() > out.capacity() {
            let mut grown = Zeroizing::new(String::with_capacity(
                (out.capacity() * 2).min(MAX_INDEXED_BYTES + 4),
            ));
            grown.push_str(&out);
            out = grown;
        }
        out.push(c);
    }
    Some(out)
}

/// Parses a list of step names: each known, none twice.
pub fn parse_normalizations<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<Normalization>, String> {
    let mut out = Vec::new();
    for name in names {
        let step = Normalization::parse(name).ok_or_else(|| {
            let name: String = name.chars().take(32).collect();
            format!(
                "unknown normalization `{name}` (expected some of trim, casefold, nfkc, digits)"
            )
        })?;
        if out.contains(&step) {
            return Err(format!("normalization `{}` given twice", step.as_str()));
        }
        out.push(step);
    }
    Ok(out)
}

/// `input` after `steps`, in order, in memory cleared on drop; `None` when
/// it is, or becomes, longer than [`MAX_INDEXED_BYTES`].
pub fn normalize(steps: &[Normalization], input: &str) -> Option<Zeroizing<String>> {
    if input.len() > MAX_INDEXED_BYTES {
        return None;
    }
    let mut value = Zeroizing::new(input.to_string());
    for step in steps {
        value = step.apply(&value)?;
    }
    Some(value)
}

/// Whether `name` can name an index: 1 to 64 of `a-z`, `0-9`, `_`, `-`,
/// starting with a letter.
pub fn is_index_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// One blind index as the key object holds it.
#[derive(Debug, Clone)]
pub struct BlindIndex {
    /// Its name.
    pub name: String,
    /// Bits kept of each value.
    pub bits: u16,
    /// Applied in order before the HMAC.
    pub normalizations: Vec<Normalization>,
    /// The version new values are computed under.
    pub active_version: i64,
    /// Versions from this one to the active one are live.
    pub min_version: i64,
    /// Each version's number and the key version its key derives from.
    pub versions: Vec<(i64, VersionId)>,
}

impl BlindIndex {
    /// The index a stored row describes; a row that does not hold together
    /// (unknown step, bits out of range, no row for a live version) is an
    /// integrity failure.
    pub fn from_row(row: &BlindIndexRow) -> Result<BlindIndex, KeyError> {
        let fail = |what: &str| {
            Err(KeyError::Integrity(format!(
                "blind index {} of encryption {}: {what}",
                row.name, row.encryption_id
            )))
        };
        let normalizations =
            match parse_normalizations(row.normalizations.split(',').filter(|s| !s.is_empty())) {
                Ok(n) => n,
                Err(_) => return fail("unknown normalization"),
            };
        let Ok(bits) = u16::try_from(row.bits) else {
            return fail("bits out of range");
        };
        if !(1..=MAX_INDEX_BITS).contains(&bits) {
            return fail("bits out of range");
        }
        let index = BlindIndex {
            name: row.name.clone(),
            bits,
            normalizations,
            active_version: row.active_version,
            min_version: row.min_version,
            versions: row
                .versions
                .iter()
                .map(|v| (v.version, v.anchor_version_id))
                .collect(),
        };
        if index.live_versions().count() as i64 != index.active_version - index.min_version + 1 {
            return fail("a live version has no row");
        }
        Ok(index)
    }

    /// The live versions, newest (the active one) first.
    pub fn live_versions(&self) -> impl Iterator<Item = (i64, VersionId)> + '_ {
        self.versions
            .iter()
            .rev()
            .filter(|(n, _)| (self.min_version..=self.active_version).contains(n))
            .copied()
    }

    /// The active version and its anchor.
    pub fn active(&self) -> Option<(i64, VersionId)> {
        self.live_versions().next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(list: &[&str], input: &str) -> String {
        let steps = parse_normalizations(list.iter().copied()).unwrap();
        normalize(&steps, input).unwrap().to_string()
    }

    #[test]
    fn values_over_the_bound_are_refused_before_and_after_each_step() {
        let steps = parse_normalizations(["nfkc"]).unwrap();
        let at_bound = "a".repeat(MAX_INDEXED_BYTES);
        assert_eq!(
            normalize(&steps, &at_bound).unwrap().len(),
            MAX_INDEXED_BYTES
        );
        assert!(normalize(&steps, &"a".repeat(MAX_INDEXED_BYTES + 1)).is_none());
        // U+FDFA is one character (3 bytes) that NFKC makes 18 (33 bytes):
        // 4 KiB of it would become 45 KiB, 8 KiB of it 90 KiB.
        let expands = "\u{fdfa}".repeat(1400);
        assert!(normalize(&steps, &expands).is_some());
        assert!(normalize(&steps, &"\u{fdfa}".repeat(2800)).is_none());
        // Growth by hand keeps every character.
        let mixed: String = "Straße ﬁ ".repeat(500);
        let steps = parse_normalizations(["nfkc", "casefold"]).unwrap();
        assert_eq!(
            *normalize(&steps, &mixed).unwrap(),
            mixed.nfkc().collect::<String>().to_lowercase()
        );
    }

    #[test]
    fn normalisations_do_what_they_say_in_the_order_declared() {
        assert_eq!(norm(&[], "  Alice "), "  Alice ");
        assert_eq!(norm(&["trim"], " \t Alice\u{3000}\n"), "Alice");
        assert_eq!(norm(&["casefold"], "ÄLICE Straße"), "älice straße");
        // Unicode's final sigma, as `str::to_lowercase` does it.
        assert_eq!(norm(&["casefold"], "ΟΔΟΣ ΟΔΟΣ"), "οδος οδος");
        // A decomposed é and the composed one, full-width letters, a ligature.
        assert_eq!(norm(&["nfkc"], "e\u{301}"), "\u{e9}");
        assert_eq!(norm(&["nfkc"], "ｆｕｌｌ ﬁ"), "full fi");
        assert_eq!(norm(&["digits"], "+1 (555) 010-0199"), "15550100199");
        assert_eq!(norm(&["digits"], "１２３"), "");
        assert_eq!(norm(&["nfkc", "digits"], "１２３"), "123");
        assert_eq!(
            norm(&["nfkc", "trim", "casefold"], "  ＡＬＩＣＥ@Example.COM "),
            "alice@example.com"
        );
    }

    #[test]
    fn unknown_or_repeated_normalisations_are_refused() {
        assert!(parse_normalizations(["trim", "lower"])
            .unwrap_err()
            .contains("`lower`"));
        assert!(parse_normalizations(["trim", "trim"])
            .unwrap_err()
            .contains("twice"));
    }

    #[test]
    fn index_names_are_plain() {
        for good in ["email", "e", "phone_e164", "last-name2"] {
            assert!(is_index_name(good), "{good}");
        }
        for bad in ["", "Email", "1st", "a b", "é", "_x", &"a".repeat(65)] {
            assert!(!is_index_name(bad), "{bad}");
        }
    }
}
