//! Checking a file: `keyward audit verify FILE`. The chain shows any record
//! changed, removed, inserted or reordered; the signed checkpoints show a
//! chain recomputed by someone without the key, a cut head and a cut tail
//! (up to the last checkpoint); records after the last checkpoint are
//! reported as not covered.

use std::io::BufRead;

use serde::Serialize;

use super::chain::{hex32, parse_sealed};
use super::checkpoint;
use crate::crypto::{hex, CHECKPOINT_PUBLIC_KEY_LEN};

/// What [`verify`] found in a file that shows no tampering.
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
    /// The last record's `hash`.
    pub last_hash: Option<String>,
    /// Checkpoint lines seen.
    pub checkpoints: u64,
    /// Whether their signatures were checked (trusted public keys given).
    pub signatures_checked: bool,
    /// The last `seq` a checkpoint covers (signed by a trusted key when
    /// `signaturesChecked`).
    pub covered_to: Option<u64>,
    /// Records after the last checkpoint, not covered by one: the first and
    /// last `seq`.
    pub uncovered: Option<(u64, u64)>,
    /// The line of the first record not covered.
    pub uncovered_from_line: Option<u64>,
    /// The keys that signed the checkpoints, by id.
    pub key_ids: Vec<String>,
}

/// What kind of break [`verify`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakKind {
    /// A record or checkpoint was changed, forged, removed, inserted or
    /// reordered, or a line is not one.
    Tampered,
    /// Records are missing before the first record of the file.
    HeadCut,
    /// Records a checkpoint covers are missing before it.
    TailCut,
}

/// The first break.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}{}: {reason}", seq.map(|s| format!(" (seq {s})")).unwrap_or_default())]
pub struct Broken {
    /// What kind of break.
    pub kind: BreakKind,
    /// 1-based line number.
    pub line: u64,
    /// The record's `seq` (or the checkpoint's), if it could be read.
    pub seq: Option<u64>,
    /// What is wrong.
    pub reason: String,
}

/// A record or checkpoint position: line and `seq`.
#[derive(Debug, Clone, Copy)]
struct At {
    line: u64,
    seq: u64,
}

/// The longest line `verify` reads: records are a few hundred bytes.
const MAX_LINE: usize = 1 << 20;

impl VerifyReport {
    /// The report of nothing read yet; signatures count as checked when
    /// there are trusted keys to check them with.
    fn empty(trusted: &[[u8; CHECKPOINT_PUBLIC_KEY_LEN]]) -> VerifyReport {
        VerifyReport {
            records: 0,
            first_seq: None,
            last_seq: None,
            starts_after: None,
            last_hash: None,
            checkpoints: 0,
            signatures_checked: !trusted.is_empty(),
            covered_to: None,
            uncovered: None,
            uncovered_from_line: None,
            key_ids: Vec::new(),
        }
    }
}

/// Checks every record's hash and its link to the one before, and every
/// checkpoint against the records before it; with `trusted` public keys,
/// also each checkpoint's signature (a checkpoint signed by any other key is
/// a break). Without trusted keys the report says the signatures were not
/// checked.
pub fn verify(
    mut input: impl BufRead,
    trusted: &[[u8; CHECKPOINT_PUBLIC_KEY_LEN]],
) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport::empty(trusted);
    // The first record; a checkpoint before any record; the last checkpoint
    // that matched the records before it.
    let mut first: Option<At> = None;
    let mut anchor: Option<(At, Option<[u8; 32]>)> = None;
    // The last record's hash.
    let mut last: Option<[u8; 32]> = None;
    let mut covered: Option<At> = None;
    // Whether the file's start is accounted for: it starts at the chain's
    // genesis, after a checkpoint, or where a checkpoint says it does.
    let mut head_known = false;
    let mut line = Vec::new();
    let mut line_no = 0u64;
    loop {
        // One line at a time, at most MAX_LINE bytes: a file with a huge
        // line is refused, not read into memory whole.
        line.clear();
        let read = std::io::Read::take(&mut input, MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(VerifyError::Io)?;
        if read == 0 {
            break;
        }
        line_no += 1;
        if line.last() == Some(&b'\n') {
            line.pop();
        } else if line.len() > MAX_LINE {
            return Err(VerifyError::Broken(Broken {
                kind: BreakKind::Tampered,
                line: line_no,
                seq: None,
                reason: format!(
                    "the line is longer than {MAX_LINE} bytes, far more than any record"
                ),
            }));
        }
        let line = line.as_slice();
        let broken = |kind: BreakKind, seq: Option<u64>, reason: String| {
            VerifyError::Broken(Broken {
                kind,
                line: line_no,
                seq,
                reason,
            })
        };
        let tampered =
            |seq: Option<u64>, reason: &str| broken(BreakKind::Tampered, seq, reason.to_string());
        if checkpoint::is_checkpoint(line) {
            let signed = checkpoint::parse(line)
                .map_err(|reason| tampered(None, &format!("not a valid checkpoint: {reason}")))?;
            let cp = &signed.checkpoint;
            let seq = Some(cp.seq);
            if !trusted.is_empty() {
                let key = trusted
                    .iter()
                    .find(|k| crate::crypto::checkpoint_key_id(k) == cp.key_id)
                    .ok_or_else(|| {
                        tampered(seq, &format!(
                            "the checkpoint names key {}, which is not one of the trusted public keys: it was forged, or that key is missing from --public-key (`keyward audit public-keys` lists them)",
                            cp.key_id
                        ))
                    })?;
                if !signed.signed_by(key) {
                    return Err(tampered(seq, &format!(
                        "the checkpoint's signature does not verify under key {}: the checkpoint was forged or changed",
                        cp.key_id
                    )));
                }
            }
            match (report.last_seq, report.last_hash.as_deref()) {
                (None, _) | (_, None) => {
                    // Before any record: the file starts after this point of
                    // the chain (e.g. after log rotation).
                    anchor = Some((
                        At {
                            line: line_no,
                            seq: cp.seq,
                        },
                        hex32(&cp.hash),
                    ));
                }
                (Some(last), Some(last_hash)) => {
                    if cp.seq > last {
                        return Err(broken(BreakKind::TailCut, seq, format!(
                            "the checkpoint covers records up to seq {}, but the records before it end at seq {last}: records {}..{} are missing, the file was cut",
                            cp.seq, last + 1, cp.seq
                        )));
                    }
                    if cp.seq < last {
                        return Err(tampered(seq, &format!(
                            "the checkpoint covers records up to seq {}, but records up to seq {last} come before it: records were inserted or moved",
                            cp.seq
                        )));
                    }
                    if cp.hash != last_hash {
                        let from = covered
                            .map(|c| c.seq.saturating_add(1))
                            .or(report.first_seq)
                            .unwrap_or(1);
                        return Err(tampered(seq, &format!(
                            "the checkpoint states hash {} for seq {}, but that record hashes to {last_hash}: records {from}..{} were rewritten after they were signed (the chain was recomputed)",
                            cp.hash, cp.seq, cp.seq
                        )));
                    }
                    // `first` is set with the first record, before `last_seq`.
                    if let Some(first) = first.filter(|f| f.seq > cp.file_start) {
                        return Err(VerifyError::Broken(Broken {
                            kind: BreakKind::HeadCut,
                            line: first.line,
                            seq: Some(first.seq),
                            reason: format!(
                                "records {}..{} are missing before the first record: the checkpoint at line {line_no} says the file starts at seq {}",
                                cp.file_start, first.seq.saturating_sub(1), cp.file_start
                            ),
                        }));
                    }
                    head_known = true;
                    covered = Some(At {
                        line: line_no,
                        seq: cp.seq,
                    });
                    report.covered_to = Some(cp.seq);
                }
            }
            // Whatever comes next is not covered (yet).
            report.uncovered_from_line = None;
            if !report.key_ids.contains(&cp.key_id) {
                report.key_ids.push(cp.key_id.clone());
            }
            report.checkpoints += 1;
            continue;
        }
        let sealed = parse_sealed(line).map_err(|(seq, reason)| tampered(seq, reason))?;
        let seq = Some(sealed.seq);
        // The hash this record follows: the record before it, or for the
        // file's first record the `prev` it states, the checkpoint before
        // it, or the genesis.
        let follows = match (last, sealed.prev, &anchor) {
            (Some(last), Some(stated), _) if stated != last => {
                return Err(tampered(
                    seq,
                    "`prev` is not the hash of the record before it: a record before it was changed, removed or inserted",
                ));
            }
            (Some(last), _, _) => last,
            (None, Some(stated), _) => stated,
            (None, None, Some((_, Some(hash)))) => *hash,
            (None, None, _) if sealed.seq == 1 => [0; 32],
            (None, None, _) => {
                return Err(broken(BreakKind::HeadCut, seq, format!(
                    "records 1..{} are missing before the first record, and it does not state the hash it follows (the first record of a file does): its head was cut (or is in an earlier file: verify the files together, in order)",
                    sealed.seq.saturating_sub(1)
                )));
            }
        };
        if last.is_none() {
            if let Some((at, _)) = &anchor {
                if sealed.seq > at.seq.saturating_add(1) {
                    return Err(broken(BreakKind::HeadCut, seq, format!(
                        "records {}..{} are missing between the checkpoint at line {} and the first record",
                        at.seq.saturating_add(1), sealed.seq.saturating_sub(1), at.line
                    )));
                }
            }
        }
        if !sealed.hash_matches(&follows) {
            let reason = if sealed.v2 && sealed.prev.is_none() && last.is_some() {
                "its hash does not match its content and the record before it: the record was changed, or one before it was changed, removed or inserted"
            } else {
                "the record was changed: its hash does not match its content"
            };
            return Err(tampered(seq, reason));
        }
        match last {
            None => {
                if let Some((at, hash)) = &anchor {
                    if sealed.seq != at.seq.saturating_add(1) || *hash != Some(follows) {
                        return Err(tampered(seq, &format!(
                            "the first record does not follow the checkpoint at line {} (seq {}): records were changed or moved",
                            at.line, at.seq
                        )));
                    }
                    head_known = true;
                    covered = Some(*at);
                    report.covered_to = Some(at.seq);
                }
                if sealed.seq == 1 && follows == [0; 32] {
                    head_known = true;
                }
                first = Some(At {
                    line: line_no,
                    seq: sealed.seq,
                });
                report.first_seq = seq;
                report.starts_after = Some(hex(&follows));
            }
            Some(_) => {
                // `prev` was checked above.
                if report.last_seq.map(|s| s + 1) != seq {
                    return Err(tampered(seq, "`seq` does not follow the record before it"));
                }
            }
        }
        if report.uncovered_from_line.is_none() {
            report.uncovered_from_line = Some(line_no);
        }
        report.records += 1;
        report.last_seq = seq;
        last = Some(sealed.hash);
        report.last_hash = Some(hex(&sealed.hash));
    }
    if let Some(first) = first {
        if !head_known {
            return Err(VerifyError::Broken(Broken {
                kind: BreakKind::HeadCut,
                line: first.line,
                seq: Some(first.seq),
                reason: format!(
                    "records 1..{} are missing before the first record, and no checkpoint says the file starts there: its head was cut (or is in an earlier file: verify the files together, in order)",
                    first.seq.saturating_sub(1)
                ),
            }));
        }
    }
    let last = report.last_seq.unwrap_or(0);
    if report.records > 0 && last > report.covered_to.unwrap_or(0) {
        let from = match report.covered_to {
            Some(c) => c + 1,
            None => report.first_seq.unwrap_or(1),
        };
        report.uncovered = Some((from, last));
    } else {
        report.uncovered_from_line = None;
    }
    Ok(report)
}
/// Checks a set of files as one chain: the audit file and the files it was
/// rotated to (`FILE.SEQ`), in any order. Each must verify alone (a rotated
/// file ends with a checkpoint and its successor starts with the same one),
/// and, taken in chain order, each file's first record must follow the
/// previous file's last (`seq` and `prev`): a file missing from the middle
/// is a head cut of the file after the gap. A checkpoint covers every record
/// before it in the chain, in whichever file, so the set's records are
/// covered up to its last trusted checkpoint. On failure, the name of the
/// file where the break is.
pub fn verify_files<R: BufRead>(
    files: Vec<(String, R)>,
    trusted: &[[u8; CHECKPOINT_PUBLIC_KEY_LEN]],
) -> Result<VerifyReport, (String, VerifyError)> {
    let mut reports = Vec::with_capacity(files.len());
    for (name, input) in files {
        let report = verify(input, trusted).map_err(|e| (name.clone(), e))?;
        reports.push((name, report));
    }
    // Chain order: by first record, or for a file with none yet (a new
    // file holding only its opening checkpoint) by the checkpoint.
    reports.sort_by_key(|(_, r)| {
        r.first_seq
            .unwrap_or_else(|| r.covered_to.unwrap_or(0).saturating_add(1))
    });
    let mut set = VerifyReport::empty(trusted);
    let mut previous: Option<&str> = None;
    for (name, report) in &reports {
        if let (Some(first), Some(last)) = (report.first_seq, set.last_seq) {
            let broken = |kind, reason: String| {
                (
                    name.clone(),
                    VerifyError::Broken(Broken {
                        kind,
                        line: report.uncovered_from_line.unwrap_or(1),
                        seq: Some(first),
                        reason,
                    }),
                )
            };
            let before = previous.unwrap_or_default();
            if first > last.saturating_add(1) {
                return Err(broken(BreakKind::HeadCut, format!(
                    "records {}..{} are missing between {before} and this file: a file of the set is missing or was cut",
                    last + 1, first - 1
                )));
            }
            if first != last.saturating_add(1) || report.starts_after != set.last_hash {
                return Err(broken(BreakKind::Tampered, format!(
                    "the first record does not follow the last record of {before} (seq {last}): the files overlap or were changed"
                )));
            }
        }
        set.records += report.records;
        set.checkpoints += report.checkpoints;
        set.covered_to = set.covered_to.max(report.covered_to);
        for id in &report.key_ids {
            if !set.key_ids.contains(id) {
                set.key_ids.push(id.clone());
            }
        }
        if report.first_seq.is_some() {
            if set.first_seq.is_none() {
                set.first_seq = report.first_seq;
                set.starts_after = report.starts_after.clone();
            }
            set.last_seq = report.last_seq;
            set.last_hash = report.last_hash.clone();
            set.uncovered_from_line = report.uncovered_from_line;
            previous = Some(name);
        }
    }
    let last = set.last_seq.unwrap_or(0);
    if set.records > 0 && last > set.covered_to.unwrap_or(0) {
        let from = match set.covered_to {
            Some(c) => c + 1,
            None => set.first_seq.unwrap_or(1),
        };
        set.uncovered = Some((from, last));
    } else {
        set.uncovered_from_line = None;
    }
    Ok(set)
}

/// Why [`verify`] failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The file could not be read.
    #[error("cannot read: {0}")]
    Io(std::io::Error),
    /// A record or checkpoint is broken, or records are missing.
    #[error("broken at {0}")]
    Broken(Broken),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::tests::{sample, seal, seal_v1};
    use crate::audit::chain::Chain;
    use crate::audit::record::AuditRecord;
    use crate::audit::GENESIS;

    /// How a format seals a record into a chain.
    type Sealer = fn(&mut Chain, &AuditRecord<&str>) -> String;
    /// Every tamper case runs on both formats: v1 lines (files written
    /// before v2) and v2 lines (what the writer writes).
    const FORMATS: [(&str, Sealer); 2] = [("v1", seal_v1), ("v2", seal)];

    fn check(lines: &[String]) -> Result<VerifyReport, VerifyError> {
        verify(lines.join("\n").as_bytes(), &[])
    }

    /// An intact chain of `n` lines.
    fn chain_with(sealer: Sealer, n: usize) -> Vec<String> {
        let mut chain = Chain::new();
        (0..n)
            .map(|i| sealer(&mut chain, &sample(&format!("op{i}"))))
            .collect()
    }

    /// The record on `lines[i]`, read as `GET /v1/audit` reads it.
    fn record_at(lines: &[String], i: usize) -> AuditRecord {
        let previous = i
            .checked_sub(1)
            .map(|p| record_at(lines, p).hash.unwrap_or_default());
        AuditRecord::from_line(&lines[i], previous.as_deref()).unwrap()
    }

    /// `r`, borrowed, to seal again.
    fn borrowed(r: &AuditRecord) -> AuditRecord<&str> {
        AuditRecord {
            seq: r.seq,
            time: &r.time,
            operation: &r.operation,
            outcome: &r.outcome,
            error: r.error.as_deref(),
            status: r.status,
            request_id: r.request_id.as_deref(),
            actor: &r.actor,
            api_key_id: r.api_key_id.as_deref(),
            tenant_id: r.tenant_id.as_deref(),
            client_subject: r.client_subject.as_deref(),
            client_spki_sha256: r.client_spki_sha256.as_deref(),
            peer: r.peer.as_deref(),
            encryption_id: r.encryption_id.as_deref(),
            version_id: r.version_id.as_deref(),
            job_id: r.job_id.as_deref(),
            target_api_key_id: r.target_api_key_id.as_deref(),
            scopes: r.scopes.as_deref(),
            batch_index: r.batch_index,
            items: r.items,
            item_indexes: r.item_indexes.as_deref(),
            prev: &r.prev,
            hash: None,
        }
    }

    /// A chain that continues after `hash_hex` at `seq`, as a restarted
    /// writer's does.
    fn chain_after(seq: u64, hash_hex: &str) -> Chain {
        let mut chain = Chain::new();
        chain.seq = seq;
        chain.prev = crate::audit::chain::hex32(hash_hex).unwrap();
        chain
    }

    #[test]
    fn an_intact_chain_verifies_and_any_edit_is_named() {
        for (format, sealer) in FORMATS {
            let lines = chain_with(sealer, 5);
            let report = check(&lines).unwrap();
            assert_eq!(
                (report.records, report.first_seq, report.last_seq),
                (5, Some(1), Some(5)),
                "{format}"
            );
            assert_eq!(report.starts_after.as_deref(), Some(GENESIS));
            assert_eq!(report.last_hash, record_at(&lines, 4).hash);

            let mut changed = lines.clone();
            changed[2] = changed[2].replace("op2", "opX");
            match check(&changed) {
                Err(VerifyError::Broken(b)) => {
                    assert_eq!((b.line, b.seq), (3, Some(3)), "{format}");
                    assert!(b.reason.contains("changed"), "{b}");
                }
                other => panic!("{format}: {other:?}"),
            }

            let mut removed = lines.clone();
            removed.remove(1);
            match check(&removed) {
                Err(VerifyError::Broken(b)) => {
                    assert_eq!((b.line, b.seq), (2, Some(3)), "{format}");
                    assert!(b.reason.contains("removed"), "{b}");
                }
                other => panic!("{format}: {other:?}"),
            }

            let mut swapped = lines.clone();
            swapped.swap(3, 4);
            assert!(
                matches!(check(&swapped), Err(VerifyError::Broken(b)) if b.line == 4),
                "{format}"
            );

            // A record inserted (a copy of another, or one sealed after the
            // record before it, with its seq) breaks the chain.
            let mut duplicated = lines.clone();
            duplicated.insert(3, lines[1].clone());
            assert!(
                matches!(check(&duplicated), Err(VerifyError::Broken(b)) if b.line == 4),
                "{format}"
            );
            let mut inserted = lines.clone();
            let hash2 = record_at(&lines, 1).hash.unwrap();
            inserted.insert(2, sealer(&mut chain_after(2, &hash2), &sample("inserted")));
            match check(&inserted) {
                Err(VerifyError::Broken(b)) => assert_eq!(b.line, 4, "{format}: {b}"),
                other => panic!("{format}: {other:?}"),
            }

            // The seq changed alone.
            let mut renumbered = lines.clone();
            renumbered[3] = renumbered[3].replace("\"seq\":4,", "\"seq\":9,");
            assert!(
                matches!(check(&renumbered), Err(VerifyError::Broken(b)) if b.line == 4),
                "{format}"
            );

            // Re-hashing a changed record does not help: the next link breaks.
            let original = record_at(&lines, 1);
            let mut forged = borrowed(&original);
            forged.operation = "forged";
            let mut chain = chain_after(1, &record_at(&lines, 0).hash.unwrap());
            chain.state_prev = false;
            let mut rehashed = lines.clone();
            rehashed[1] = sealer(&mut chain, &forged);
            match check(&rehashed) {
                Err(VerifyError::Broken(b)) => {
                    assert_eq!((b.line, b.seq), (3, Some(3)), "{format}")
                }
                other => panic!("{format}: {other:?}"),
            }

            let mut garbage = lines.clone();
            garbage[4] = "not json".into();
            assert!(
                matches!(check(&garbage), Err(VerifyError::Broken(b)) if b.line == 5 && b.seq.is_none()),
                "{format}"
            );
        }
    }

    #[test]
    fn a_v2_line_with_its_prev_or_hash_damaged_is_named() {
        let lines = chain_with(seal, 3);
        assert!(lines[0].contains("\"prev\":\"") && !lines[1].contains("\"prev\""));
        // The first line's stated `prev` is what its hash follows.
        let zeros = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        let mut other_prev = lines.clone();
        other_prev[0] = other_prev[0].replace(zeros, "BAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
        assert!(matches!(check(&other_prev), Err(VerifyError::Broken(b)) if b.line == 1));
        // A `prev` added to a later line must be the hash before it.
        let mut wrong_prev = lines.clone();
        wrong_prev[2] = wrong_prev[2].replace(",\"h\":", &format!(",\"prev\":\"{zeros}\",\"h\":"));
        match check(&wrong_prev) {
            Err(VerifyError::Broken(b)) => {
                assert_eq!((b.line, b.kind), (3, BreakKind::Tampered));
                assert!(b.reason.contains("`prev` is not the hash"), "{b}");
            }
            other => panic!("{other:?}"),
        }
        // ... and a correct one changes nothing (the table's copy of a
        // segment's first line states it).
        let mut stated = lines.clone();
        let hash1 = record_at(&lines, 1).hash.unwrap();
        let mut buf = [0; 43];
        let b64 = crate::domain::ids::compact_bytes(
            &crate::audit::chain::hex32(&hash1).unwrap(),
            &mut buf,
        )
        .unwrap();
        stated[2] = stated[2].replace(",\"h\":", &format!(",\"prev\":\"{b64}\",\"h\":"));
        assert_eq!(check(&stated).unwrap().records, 3);
        for damaged in [
            lines[1].replace(",\"h\":\"", ",\"h\":\"A"),
            lines[1].replace("\"v\":2,", "\"v\":3,"),
            lines[1].replace(",\"h\":", ",\"x\":1,\"h\":"),
            lines[1][..lines[1].len() - 2].to_string() + "\",\"extra\":1}",
        ] {
            let mut bad = lines.clone();
            bad[1] = damaged.clone();
            assert!(
                matches!(check(&bad), Err(VerifyError::Broken(b)) if b.line == 2),
                "{damaged}"
            );
        }
    }

    #[test]
    fn a_v1_file_continued_in_v2_after_a_restart_verifies_and_breaks_where_edited() {
        let mut chain = Chain::new();
        let mut lines: Vec<String> = (0..3)
            .map(|i| seal_v1(&mut chain, &sample(&format!("old{i}"))))
            .collect();
        // A restarted writer reads the last v1 line and goes on in v2; its
        // first record states the hash it follows.
        let last = record_at(&lines, 2);
        let mut chain = chain_after(3, &last.hash.unwrap());
        for i in 0..3 {
            lines.push(seal(&mut chain, &sample(&format!("new{i}"))));
        }
        assert!(lines[3].starts_with("{\"v\":2,\"seq\":4,") && lines[3].contains("\"prev\""));
        let report = check(&lines).unwrap();
        assert_eq!((report.records, report.last_seq), (6, Some(6)));
        assert_eq!(report.last_hash, record_at(&lines, 5).hash);
        assert_eq!(
            record_at(&lines, 3).prev,
            record_at(&lines, 2).hash.unwrap()
        );
        // The last v1 record changed: the first v2 record no longer follows it.
        let mut changed = lines.clone();
        changed[2] = changed[2].replace("old2", "oldX");
        assert!(matches!(check(&changed), Err(VerifyError::Broken(b)) if b.line == 3));
        let mut removed = lines.clone();
        removed.remove(2);
        assert!(matches!(check(&removed), Err(VerifyError::Broken(b)) if b.line == 3));
    }

    #[test]
    fn a_v1_file_rotated_into_a_v2_file_verifies_as_one_chain() {
        let key = crate::crypto::CheckpointKey::derive(
            &crate::crypto::DataKey::from_slice(&[5; 32]).unwrap(),
        );
        let public = *key.public_key();
        let checkpoint = |chain: &Chain, file_start: u64, start_prev: &str| {
            let mut line = String::new();
            crate::audit::Checkpoint {
                seq: chain.seq,
                hash: chain.prev_hex().as_str(),
                file_start,
                file_start_prev: start_prev,
                time: "2026-01-01T00:00:00.000Z",
                reason: "rotate",
                key_id: key.id(),
            }
            .write_signed(&key, &mut line);
            line
        };
        // A v1 writer's file, rotated at seq 3: it ends with the rotation's
        // checkpoint, and the new file (written by v2) starts with it.
        let mut chain = Chain::new();
        let mut old: Vec<String> = (0..3)
            .map(|i| seal_v1(&mut chain, &sample(&format!("old{i}"))))
            .collect();
        let rotation = checkpoint(&chain, 1, GENESIS);
        old.push(rotation.clone());
        let start_prev = chain.prev_hex();
        chain.state_prev = true;
        let mut new = vec![rotation];
        for i in 0..2 {
            new.push(seal(&mut chain, &sample(&format!("new{i}"))));
        }
        new.push(checkpoint(&chain, 4, &start_prev));
        let (old, new) = (old.join("\n"), new.join("\n"));
        for order in [[&old, &new], [&new, &old]] {
            let set = order
                .iter()
                .enumerate()
                .map(|(i, text)| (format!("file{i}"), text.as_bytes()))
                .collect();
            let report = verify_files(set, &[public]).unwrap();
            assert_eq!(
                (report.records, report.first_seq, report.last_seq),
                (5, Some(1), Some(5))
            );
            assert_eq!((report.covered_to, report.uncovered), (Some(5), None));
        }
        let alone = verify(new.as_bytes(), &[public]).unwrap();
        assert_eq!((alone.first_seq, alone.covered_to), (Some(4), Some(5)));
        // A v1 record of the old file changed: the set is refused.
        let changed = old.replacen("old1", "oldX", 1);
        let set = vec![
            ("old".to_string(), changed.as_bytes()),
            ("new".to_string(), new.as_bytes()),
        ];
        assert!(verify_files(set, &[public]).is_err());
    }

    /// Records 1..=n, a checkpoint after every `every` and after the last,
    /// each stating that the file starts at `start`.
    fn signed(
        sealer: Sealer,
        key: &crate::crypto::CheckpointKey,
        n: usize,
        every: usize,
        start: u64,
    ) -> Vec<String> {
        let mut chain = Chain::new();
        let mut lines = Vec::new();
        for i in 0..n {
            lines.push(sealer(&mut chain, &sample(&format!("op{i}"))));
            if (i + 1) % every == 0 || i + 1 == n {
                let mut line = String::new();
                crate::audit::Checkpoint {
                    seq: chain.seq,
                    hash: chain.prev_hex().as_str(),
                    file_start: start,
                    file_start_prev: GENESIS,
                    time: "2026-01-01T00:00:00.000Z",
                    reason: "interval",
                    key_id: key.id(),
                }
                .write_signed(key, &mut line);
                lines.push(line);
            }
        }
        lines
    }

    fn break_of(lines: &[String], key: &[u8; 32]) -> Broken {
        match verify(lines.join("\n").as_bytes(), &[*key]) {
            Err(VerifyError::Broken(b)) => b,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn checkpoints_show_a_rewritten_chain_a_cut_head_and_tail_and_what_they_do_not_cover() {
        for (format, sealer) in FORMATS {
            checkpoints_in(format, sealer);
        }
    }

    fn checkpoints_in(format: &str, sealer: Sealer) {
        let key = crate::crypto::CheckpointKey::derive(
            &crate::crypto::DataKey::from_slice(&[5; 32]).unwrap(),
        );
        let public = *key.public_key();
        let lines = signed(sealer, &key, 10, 4, 1); // records 1-4, cp, 5-8, cp, 9-10, cp
        assert_eq!(lines.len(), 13);
        let report = verify(lines.join("\n").as_bytes(), &[public]).unwrap();
        assert_eq!(
            (report.records, report.checkpoints, report.covered_to),
            (10, 3, Some(10)),
            "{format}"
        );
        assert_eq!((report.uncovered, report.signatures_checked), (None, true));
        assert_eq!(report.key_ids, vec![key.id().to_string()]);
        // Without a trusted key: intact, but the signatures were not checked.
        assert!(
            !verify(lines.join("\n").as_bytes(), &[])
                .unwrap()
                .signatures_checked
        );
        // The record lines alone, without checkpoints, in order.
        let records: Vec<String> = lines
            .iter()
            .filter(|l| !checkpoint::is_checkpoint(l.as_bytes()))
            .cloned()
            .collect();

        // Rewritten: record 6 changed and the chain recomputed after it.
        let mut chain = Chain::new();
        let mut rewritten = Vec::new();
        let mut index = 0;
        for line in &lines {
            if checkpoint::is_checkpoint(line.as_bytes()) {
                rewritten.push(line.clone());
                continue;
            }
            let original = record_at(&records, index);
            index += 1;
            let mut r = borrowed(&original);
            if r.seq == 6 {
                r.outcome = "error";
            }
            rewritten.push(sealer(&mut chain, &r));
        }
        assert!(
            verify(rewritten.join("\n").as_bytes(), &[]).is_err(),
            "{format}: even unsigned, the hash no longer matches the checkpoint"
        );
        let b = break_of(&rewritten, &public);
        assert_eq!(
            (b.kind, b.line, b.seq),
            (BreakKind::Tampered, 10, Some(8)),
            "{format}"
        );
        assert!(b.reason.contains("records 5..8 were rewritten"), "{b}");

        // A forged checkpoint: another key, or its seq changed.
        let forger = crate::crypto::CheckpointKey::derive(
            &crate::crypto::DataKey::from_slice(&[6; 32]).unwrap(),
        );
        let forged = signed(sealer, &forger, 10, 4, 1);
        let b = break_of(&forged, &public);
        assert_eq!((b.kind, b.line), (BreakKind::Tampered, 5));
        assert!(
            b.reason.contains("not one of the trusted public keys"),
            "{b}"
        );
        let mut changed = lines.clone();
        changed[4] = changed[4].replace("\"fileStart\":1", "\"fileStart\":2");
        assert!(break_of(&changed, &public)
            .reason
            .contains("signature does not verify"));

        // Head cut: records 1-2 gone.
        let b = break_of(&lines[2..], &public);
        assert_eq!(
            (b.kind, b.line, b.seq),
            (BreakKind::HeadCut, 1, Some(3)),
            "{format}"
        );
        assert!(
            b.reason
                .contains("records 1..2 are missing before the first record"),
            "{b}"
        );
        // ... and with no checkpoint left to say where the file starts.
        let b = break_of(&lines[2..4], &public);
        assert_eq!(b.kind, BreakKind::HeadCut);
        assert!(b.reason.contains("records 1..2 are missing"), "{b}");

        // Tail cut: records 9-10 gone, their checkpoint kept.
        let mut cut = lines[..10].to_vec();
        cut.push(lines[12].clone());
        let b = break_of(&cut, &public);
        assert_eq!((b.kind, b.line, b.seq), (BreakKind::TailCut, 11, Some(10)));
        assert!(b.reason.contains("records 9..10 are missing"), "{b}");
        // Tail cut after a checkpoint: what is left after it is not covered.
        let report = verify(lines[..11].join("\n").as_bytes(), &[public]).unwrap();
        assert_eq!(
            (
                report.covered_to,
                report.uncovered,
                report.uncovered_from_line
            ),
            (Some(8), Some((9, 9)), Some(11))
        );

        // Records appended (with a correct unkeyed chain) are not covered.
        let mut appended = lines.clone();
        let mut chain = chain_after(10, &record_at(&records, 9).hash.unwrap());
        chain.state_prev = false;
        appended.push(sealer(&mut chain, &sample("forged")));
        let report = verify(appended.join("\n").as_bytes(), &[public]).unwrap();
        assert_eq!(
            (report.covered_to, report.uncovered),
            (Some(10), Some((11, 11))),
            "{format}"
        );

        // A file after log rotation: starts after a checkpoint, or where a
        // checkpoint says it starts.
        // (`fileStartPrev` is not checked: the hash of the record it names
        // covers it.)
        let rotated = signed(sealer, &key, 10, 4, 5);
        let mut starts_with_record = rotated[5..].to_vec();
        if format == "v2" {
            // A v2 file's first record states the hash it follows, as the
            // writer writes it.
            let mut chain = chain_after(4, &record_at(&records, 3).hash.unwrap());
            starts_with_record[0] = sealer(&mut chain, &sample("op4"));
        }
        for file in [&rotated[4..], &starts_with_record[..]] {
            let report = verify(file.join("\n").as_bytes(), &[public]).unwrap();
            assert_eq!(
                (report.first_seq, report.covered_to, report.uncovered),
                (Some(5), Some(10), None),
                "{format}"
            );
        }
        // A head cut that kept the checkpoint before the records it cut.
        let b = break_of(&lines[4..], &public);
        assert_eq!(
            (b.kind, b.line, b.seq),
            (BreakKind::HeadCut, 2, Some(5)),
            "{format}"
        );
        assert!(b.reason.contains("records 1..4 are missing"), "{b}");
    }

    /// Known answers for the audit file format (docs/security.md, "Byte
    /// layouts"): a file written by `scripts/known-answers.py` from the
    /// layout alone, which this verifier must keep accepting and this writer
    /// must keep producing byte for byte. Run with `scripts/test wycheproof`.
    mod wycheproof {
        use super::*;
        use crate::audit::checkpoint::Checkpoint;
        use crate::audit::record::AuditRecord;
        use crate::crypto::{parse_hex, CheckpointKey, DataKey};

        const FILE: &str = include_str!("../../tests/known-answers/audit-format-v1.log");
        const TENANT: &str = "11111111-1111-4111-8111-111111111111";
        const ENCRYPTION: &str = "00112233-4455-6677-8899-aabbccddeeff";
        const VERSION: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

        /// The root KEK of `scripts/known-answers.py` (bytes 0x20..0x3f).
        fn checkpoint_key() -> CheckpointKey {
            let kek: [u8; 32] = std::array::from_fn(|i| 0x20 + i as u8);
            CheckpointKey::derive(&DataKey::from_slice(&kek).unwrap())
        }

        #[test]
        fn wycheproof_keyward_audit_file_of_format_v1_verifies_under_its_public_key() {
            let key = checkpoint_key();
            let public: [u8; 32] =
                parse_hex("6190544cba389083aa03dfba511ec77a555e45116368f08b1a2411031e7ed0a3")
                    .unwrap()
                    .try_into()
                    .unwrap();
            assert_eq!(key.public_key(), &public);
            let report = verify(FILE.as_bytes(), &[public]).unwrap();
            assert_eq!(report.records, 3);
            assert_eq!(report.checkpoints, 1);
            assert_eq!(report.covered_to, Some(3));
            assert!(report.signatures_checked);
            assert_eq!(report.key_ids, vec!["2657b19b9bf14f4b".to_string()]);
            // One byte changed anywhere in a record breaks it.
            let changed = FILE.replacen("\"status\":400", "\"status\":401", 1);
            assert!(verify(changed.as_bytes(), &[public]).is_err());
        }

        /// The v1 file continued in format v2 by a restarted writer.
        const FILE_V2: &str = include_str!("../../tests/known-answers/audit-format-v2.log");

        #[test]
        fn wycheproof_keyward_audit_file_continued_in_format_v2_verifies_and_reads_back() {
            let key = checkpoint_key();
            let report = verify(FILE_V2.as_bytes(), &[*key.public_key()]).unwrap();
            assert_eq!((report.records, report.checkpoints), (5, 2));
            assert_eq!((report.covered_to, report.uncovered), (Some(5), None));
            let records: Vec<AuditRecord> = crate::audit::read_records(FILE_V2)
                .into_iter()
                .map(Result::unwrap)
                .collect();
            let (fourth, fifth) = (&records[3], &records[4]);
            assert_eq!(fourth.prev, records[2].hash.clone().unwrap());
            assert_eq!(fifth.prev, fourth.hash.clone().unwrap());
            assert_eq!(
                (
                    fourth.time.as_str(),
                    fourth.request_id.as_deref(),
                    fourth.api_key_id.as_deref(),
                    fourth.tenant_id.as_deref(),
                    fourth.actor.as_str(),
                    fourth.outcome.as_str(),
                ),
                (
                    "2026-01-01T00:00:04.000Z",
                    Some("a258363d-c1c2-4faa-bc21-929259815394"),
                    Some("kw_bcf8ecd166f2eada597f837c"),
                    Some(TENANT),
                    "api_key",
                    "ok",
                )
            );
            assert_eq!(
                (
                    fifth.outcome.as_str(),
                    fifth.error.as_deref(),
                    fifth.items,
                    fifth.item_indexes.as_deref()
                ),
                ("error", Some("decryption_failed"), Some(2), Some("3,17"))
            );
            // One byte changed in a v2 record breaks it.
            let changed = FILE_V2.replacen("\"st\":200", "\"st\":201", 1);
            assert!(verify(changed.as_bytes(), &[*key.public_key()]).is_err());
        }

        #[test]
        fn wycheproof_keyward_audit_file_v2_any_byte_changed_is_caught_and_nothing_panics() {
            let public = *checkpoint_key().public_key();
            let bytes = FILE_V2.as_bytes();
            for i in 0..bytes.len() {
                if bytes[i] == b'\n' {
                    continue;
                }
                // Flipping the lowest bit never turns a hex digit into its
                // upper-case twin (which would parse to the same bytes).
                let mut changed = bytes.to_vec();
                changed[i] ^= 1;
                assert!(
                    verify(changed.as_slice(), &[public]).is_err(),
                    "byte {i} changed went unnoticed"
                );
                if let Ok(text) = std::str::from_utf8(&changed) {
                    let _ = crate::audit::read_records(text);
                }
                // Cut anywhere: an answer, never a panic.
                let _ = verify(&bytes[..i], &[public]);
                let _ = crate::audit::read_records(&FILE_V2[..FILE_V2.floor_char_boundary(i)]);
            }
        }

        #[test]
        fn wycheproof_keyward_audit_writer_continues_a_v1_file_in_format_v2_byte_for_byte() {
            // The writer restarted on the v1 file: it continues after its
            // closing checkpoint.
            let v1_end = FILE.lines().last().unwrap();
            let hash = checkpoint::parse(v1_end.as_bytes())
                .unwrap()
                .checkpoint
                .hash;
            let mut chain = Chain::new();
            chain.seq = 3;
            chain.prev = crate::audit::chain::hex32(&hash).unwrap();
            let records = [
                (
                    1_767_225_604_000,
                    AuditRecord {
                        operation: "encrypt",
                        outcome: "ok",
                        status: Some(200),
                        request_id: Some("a258363d-c1c2-4faa-bc21-929259815394"),
                        actor: "api_key",
                        api_key_id: Some("kw_bcf8ecd166f2eada597f837c"),
                        tenant_id: Some(TENANT),
                        peer: Some("10.1.2.3"),
                        encryption_id: Some(ENCRYPTION),
                        version_id: Some(VERSION),
                        ..AuditRecord::default()
                    },
                ),
                (
                    1_767_225_605_000,
                    AuditRecord {
                        operation: "decrypt",
                        outcome: "error",
                        error: Some("decryption_failed"),
                        status: Some(200),
                        request_id: Some("req-5"),
                        actor: "api_key",
                        api_key_id: Some("kw_bcf8ecd166f2eada597f837c"),
                        tenant_id: Some(TENANT),
                        encryption_id: Some(ENCRYPTION),
                        version_id: Some(VERSION),
                        items: Some(2),
                        item_indexes: Some("3,17"),
                        ..AuditRecord::default()
                    },
                ),
            ];
            let mut lines: Vec<String> = FILE.lines().map(str::to_string).collect();
            for (ms, record) in &records {
                let mut line = String::new();
                chain.seal(record, *ms, &mut line);
                lines.push(line);
            }
            lines.push(shutdown_checkpoint(&chain, 5, "2026-01-01T00:00:06.000Z"));
            assert_eq!(lines, FILE_V2.lines().collect::<Vec<_>>());
        }

        /// The signed checkpoint a writer closing `chain` at `seq` writes, for
        /// a file that starts the chain.
        fn shutdown_checkpoint(chain: &Chain, seq: u64, time: &str) -> String {
            let key = checkpoint_key();
            let mut checkpoint = String::new();
            Checkpoint {
                seq,
                hash: chain.prev_hex().as_str(),
                file_start: 1,
                file_start_prev: GENESIS,
                time,
                reason: "shutdown",
                key_id: key.id(),
            }
            .write_signed(&key, &mut checkpoint);
            checkpoint
        }

        #[test]
        fn wycheproof_keyward_audit_format_v1_is_sealed_byte_for_byte() {
            let mut chain = Chain::new();
            let records = [
                AuditRecord {
                    time: "2026-01-01T00:00:00.000Z",
                    operation: "encryption.create",
                    outcome: "ok",
                    status: Some(200),
                    request_id: Some("req-1"),
                    actor: "api_key",
                    api_key_id: Some("kw_test"),
                    tenant_id: Some(TENANT),
                    encryption_id: Some(ENCRYPTION),
                    version_id: Some(VERSION),
                    ..AuditRecord::default()
                },
                AuditRecord {
                    time: "2026-01-01T00:00:01.000Z",
                    operation: "decrypt",
                    outcome: "error",
                    error: Some("decryption_failed"),
                    status: Some(400),
                    request_id: Some("req-2"),
                    actor: "api_key",
                    api_key_id: Some("kw_test"),
                    tenant_id: Some(TENANT),
                    peer: Some("127.0.0.1"),
                    encryption_id: Some(ENCRYPTION),
                    version_id: Some(VERSION),
                    batch_index: Some(0),
                    ..AuditRecord::default()
                },
                AuditRecord {
                    time: "2026-01-01T00:00:02.000Z",
                    operation: "rotate.automatic",
                    outcome: "ok",
                    actor: "system",
                    ..AuditRecord::default()
                },
            ];
            let mut lines: Vec<String> = records.iter().map(|r| seal_v1(&mut chain, r)).collect();
            lines.push(shutdown_checkpoint(&chain, 3, "2026-01-01T00:00:03.000Z"));
            assert_eq!(lines, FILE.lines().collect::<Vec<_>>());
        }
    }
}
