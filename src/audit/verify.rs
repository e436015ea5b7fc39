//! Checking a file's chain: `keyward audit verify FILE`.

use std::io::BufRead;

use serde::Serialize;

use super::record::AuditRecord;
use crate::crypto::{hex, sha256};

/// What [`verify`] found in an intact file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    /// Records checked.
    pub records: u64,
    /// The first record's `seq` (1 unless the file starts mid-chain, e.g. after
    /// log rotation).
    pub first_seq: Option<u64>,
    /// The last record's `seq`.
    pub last_seq: Option<u64>,
    /// The first record's `prev`.
    pub starts_after: Option<String>,
    /// The last record's `hash`: keep it elsewhere to detect later truncation.
    pub last_hash: Option<String>,
}

/// The first broken record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}{}: {reason}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
pub struct Broken {
    /// 1-based line number.
    pub line: u64,
    /// The record's `seq`, if it could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    pub reason: String,
}

/// Checks every record's hash and its link to the one before.
pub fn verify(input: impl BufRead) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport {
        records: 0,
        first_seq: None,
        last_seq: None,
        starts_after: None,
        last_hash: None,
    };
    for (index, line) in input.split(b'\n').enumerate() {
        let line = line.map_err(VerifyError::Io)?;
        let line_no = index as u64 + 1;
        let broken = |seq: Option<u64>, reason: &str| {
            VerifyError::Broken(Broken {
                line: line_no,
                seq,
                reason: reason.to_string(),
            })
        };
        let record: AuditRecord = serde_json::from_slice(&line)
            .map_err(|_| broken(None, "not an audit record (not JSON, or fields missing)"))?;
        let seq = Some(record.seq);
        let stated = record
            .hash
            .as_deref()
            .ok_or_else(|| broken(seq, "no `hash` field"))?;
        let suffix = format!(",\"hash\":\"{stated}\"}}");
        let body = line
            .strip_suffix(suffix.as_bytes())
            .ok_or_else(|| broken(seq, "`hash` is not the last field"))?;
        let mut hashed = body.to_vec();
        hashed.push(b'}');
        if hex(&sha256(&hashed)) != stated {
            return Err(broken(
                seq,
                "the record was changed: its hash does not match its content",
            ));
        }
        match &report.last_hash {
            None => {
                report.first_seq = seq;
                report.starts_after = Some(record.prev.clone());
            }
            Some(previous) => {
                if &record.prev != previous {
                    return Err(broken(
                        seq,
                        "`prev` is not the hash of the record before it: a record before it was changed, removed or inserted",
                    ));
                }
                if report.last_seq.map(|s| s + 1) != seq {
                    return Err(broken(seq, "`seq` does not follow the record before it"));
                }
            }
        }
        report.records += 1;
        report.last_seq = seq;
        report.last_hash = Some(stated.to_string());
    }
    Ok(report)
}

/// Why [`verify`] failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The file could not be read.
    #[error("cannot read: {0}")]
    Io(std::io::Error),
    /// A record is broken.
    #[error("broken at {0}")]
    Broken(Broken),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::tests::{chain_of, seal};
    use crate::audit::chain::Chain;
    use crate::audit::GENESIS;

    fn check(lines: &[String]) -> Result<VerifyReport, VerifyError> {
        verify(lines.join("\n").as_bytes())
    }

    #[test]
    fn an_intact_chain_verifies_and_any_edit_is_named() {
        let lines = chain_of(5);
        let report = check(&lines).unwrap();
        assert_eq!(
            (report.records, report.first_seq, report.last_seq),
            (5, Some(1), Some(5))
        );
        assert_eq!(report.starts_after.as_deref(), Some(GENESIS));

        let mut changed = lines.clone();
        changed[2] = changed[2].replace("op2", "opX");
        match check(&changed) {
            Err(VerifyError::Broken(b)) => {
                assert_eq!((b.line, b.seq), (3, Some(3)));
                assert!(b.reason.contains("changed"), "{b}");
            }
            other => panic!("{other:?}"),
        }

        let mut removed = lines.clone();
        removed.remove(1);
        match check(&removed) {
            Err(VerifyError::Broken(b)) => assert_eq!((b.line, b.seq), (2, Some(3))),
            other => panic!("{other:?}"),
        }

        let mut swapped = lines.clone();
        swapped.swap(3, 4);
        assert!(matches!(check(&swapped), Err(VerifyError::Broken(b)) if b.line == 4));

        // Re-hashing a changed record does not help: the next link breaks.
        let mut forged: AuditRecord<&str> = serde_json::from_str(&lines[1]).unwrap();
        forged.operation = "forged";
        let mut chain = Chain::new();
        chain.seq = 1;
        chain.prev = forged.prev.to_string();
        let mut rehashed = lines.clone();
        rehashed[1] = seal(&mut chain, &forged);
        match check(&rehashed) {
            Err(VerifyError::Broken(b)) => assert_eq!((b.line, b.seq), (3, Some(3))),
            other => panic!("{other:?}"),
        }

        let mut garbage = lines.clone();
        garbage[4] = "not json".into();
        assert!(
            matches!(check(&garbage), Err(VerifyError::Broken(b)) if b.line == 5 && b.seq.is_none())
        );
    }
}
