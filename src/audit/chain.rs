//! The hash chain: each record is numbered and ends in its hash, which
//! covers the record before it.
//!
//! Format v2 (what the writer writes): `h` is the SHA-256 of the previous
//! record's hash (32 bytes) followed by the line's bytes up to (not
//! including) its `prev` and `h` members, closed by `}`; both hashes are
//! base64url. `prev` is written on the first record the writer writes into a
//! file only (elsewhere it is the hash on the line before). Format v1 (older
//! lines, still verified): `hash` is the SHA-256, hex, of the line up to its
//! `hash` member, closed by `}`, and every line states `prev`.

use std::ops::Range;

use super::record::{digest_of, AuditRecord, CompactRecord, NOT_A_RECORD, V2_PREFIX};
use crate::crypto::{hex, parse_hex, sha256_parts};
use crate::domain::ids::compact_bytes;

/// The `prev` of the first record of a chain, hex (32 zero bytes).
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The running end of a hash chain.
pub(super) struct Chain {
    /// The last record's `seq` (0 before the first).
    pub(super) seq: u64,
    /// The last record's hash (zeros before the first).
    pub(super) prev: [u8; 32],
    /// The next record states `prev`: it is the first the writer writes into
    /// its file (at start, after a rotation or a truncation).
    pub(super) state_prev: bool,
    /// The file ends in a partial line (a crash mid-write): start on a new line.
    pub(super) needs_newline: bool,
}

impl Chain {
    /// A new chain: its first record follows [`GENESIS`].
    pub(super) fn new() -> Chain {
        Chain {
            seq: 0,
            prev: [0; 32],
            state_prev: true,
            needs_newline: false,
        }
    }

    /// The last record's hash, hex (as checkpoints state it).
    pub(super) fn prev_hex(&self) -> String {
        hex(&self.prev)
    }

    /// Appends `record` (of time `time_ms`) to `out` as the chain's next
    /// line, newline-terminated; returns where in `out` the line is (without
    /// its newline).
    pub(super) fn append(
        &mut self,
        record: &AuditRecord<&str>,
        time_ms: i64,
        out: &mut String,
    ) -> Range<usize> {
        if self.needs_newline {
            out.push('\n');
            self.needs_newline = false;
        }
        let line = self.seal(record, time_ms, out);
        out.push('\n');
        line
    }

    /// Numbers, links and hashes `record` in format v2, appending its line
    /// (without newline) to `out`; returns where in `out` the line is.
    pub(super) fn seal(
        &mut self,
        record: &AuditRecord<&str>,
        time_ms: i64,
        out: &mut String,
    ) -> Range<usize> {
        let start = out.len();
        self.seq += 1;
        AuditRecord {
            seq: self.seq,
            ..*record
        }
        .write_compact(time_ms, out);
        // The hash covers the previous hash and the line up to its `prev`
        // and `h`, closed as the object it would be without them.
        out.push('}');
        let digest = sha256_parts(&[&self.prev, &out.as_bytes()[start..]]);
        out.pop();
        let mut buf = [0; 43];
        if std::mem::take(&mut self.state_prev) {
            out.push_str(",\"prev\":\"");
            out.push_str(compact_bytes(&self.prev, &mut buf).unwrap_or_default());
            out.push('"');
        }
        self.prev = digest;
        out.push_str(",\"h\":\"");
        out.push_str(compact_bytes(&digest, &mut buf).unwrap_or_default());
        out.push_str("\"}");
        start..out.len()
    }
}

/// A record line's place in the chain, as written (not yet checked).
pub(super) struct Sealed<'a> {
    /// Its `seq`.
    pub(super) seq: u64,
    /// The `prev` it states (v1: always; v2: on the first record the writer
    /// wrote into a file).
    pub(super) prev: Option<[u8; 32]>,
    /// The hash it states.
    pub(super) hash: [u8; 32],
    /// Format v2.
    pub(super) v2: bool,
    /// The line up to its `prev` (v2) or hash member.
    body: &'a [u8],
}

impl Sealed<'_> {
    /// Whether the stated hash is the line's, when it follows the record
    /// whose hash is `follows` (a v1 line states that inside what it hashes).
    pub(super) fn hash_matches(&self, follows: &[u8; 32]) -> bool {
        let digest = if self.v2 {
            sha256_parts(&[follows, self.body, b"}"])
        } else {
            sha256_parts(&[self.body, b"}"])
        };
        digest == self.hash
    }
}

/// 64 lower-case hex digits as 32 bytes.
pub(super) fn hex32(text: &str) -> Option<[u8; 32]> {
    let bytes: [u8; 32] = parse_hex(text)?.try_into().ok()?;
    (hex(&bytes) == text).then_some(bytes)
}

/// Takes a record line of either format apart; on failure, its `seq` if it
/// could be read and what is wrong.
pub(super) fn parse_sealed(line: &[u8]) -> Result<Sealed<'_>, (Option<u64>, &'static str)> {
    if line.starts_with(V2_PREFIX.as_bytes()) {
        let record = CompactRecord::parse(line).map_err(|e| (None, e))?;
        let seq = Some(record.seq);
        let hash = digest_of(&record.h).ok_or((seq, "`h` is not 43 characters of base64url"))?;
        let prev = match record.prev.as_deref() {
            Some(p) => Some(digest_of(p).ok_or((seq, "`prev` is not 43 characters of base64url"))?),
            None => None,
        };
        let mut suffix = String::with_capacity(120);
        if let Some(p) = &record.prev {
            suffix.push_str(",\"prev\":\"");
            suffix.push_str(p);
            suffix.push('"');
        }
        suffix.push_str(",\"h\":\"");
        suffix.push_str(&record.h);
        suffix.push_str("\"}");
        let body = line
            .strip_suffix(suffix.as_bytes())
            .ok_or((seq, "`prev` and `h` are not the last fields"))?;
        return Ok(Sealed {
            seq: record.seq,
            prev,
            hash,
            v2: true,
            body,
        });
    }
    let record: AuditRecord = serde_json::from_slice(line).map_err(|_| (None, NOT_A_RECORD))?;
    let seq = Some(record.seq);
    let stated = record.hash.as_deref().ok_or((seq, "no `hash` field"))?;
    let suffix = format!(",\"hash\":\"{stated}\"}}");
    let body = line
        .strip_suffix(suffix.as_bytes())
        .ok_or((seq, "`hash` is not the last field"))?;
    let hash = hex32(stated).ok_or((
        seq,
        "the record was changed: its hash does not match its content",
    ))?;
    let prev = hex32(&record.prev).ok_or((seq, "`prev` is not a SHA-256 hash in hex"))?;
    Ok(Sealed {
        seq: record.seq,
        prev: Some(prev),
        hash,
        v2: false,
        body,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::audit::record::{Actor, AuditEvent, ItemGroup, Target, TextCache};
    use crate::audit::verify;
    use crate::domain::identity::ClientIdentity;
    use crate::domain::{EncryptionId, TenantId, VersionId};

    /// A record of `op`, as a background task would make it.
    pub(in crate::audit) fn sample(op: &str) -> AuditRecord<&str> {
        AuditRecord {
            time: "2026-01-01T00:00:00.000Z",
            operation: op,
            outcome: "ok",
            actor: "system",
            ..AuditRecord::default()
        }
    }

    /// The time of [`sample`] records: 2026-01-01T00:00:00.000Z.
    pub(in crate::audit) const SAMPLE_MS: i64 = 1_767_225_600_000;

    /// `record`'s line, sealed into `chain` (format v2).
    pub(in crate::audit) fn seal(chain: &mut Chain, record: &AuditRecord<&str>) -> String {
        let mut out = String::new();
        chain.seal(record, SAMPLE_MS, &mut out);
        out
    }

    /// `record`'s line in format v1, as writers before v2 sealed it: every
    /// line states `prev`, and `hash` (hex) covers the line up to it.
    pub(in crate::audit) fn seal_v1(chain: &mut Chain, record: &AuditRecord<&str>) -> String {
        chain.seq += 1;
        let prev = chain.prev_hex();
        let mut out = String::new();
        AuditRecord {
            seq: chain.seq,
            prev: prev.as_str(),
            hash: None,
            ..*record
        }
        .write_json(&mut out);
        chain.prev = crate::crypto::sha256(out.as_bytes());
        out.pop();
        out.push_str(",\"hash\":\"");
        out.push_str(&chain.prev_hex());
        out.push_str("\"}");
        chain.state_prev = true;
        out
    }

    #[test]
    fn a_typical_single_request_record_is_at_most_300_bytes() {
        // A single encrypt: request id generated by the edge (a UUID), a
        // tenant's API key, an IPv4 peer, the encryption and version used,
        // status 200, deep into a long-running server's chain.
        let (tenant, enc, ver, rid) = (
            TenantId::new_random().to_string(),
            EncryptionId::new_random().to_string(),
            VersionId::new_random().to_string(),
            uuid::Uuid::new_v4().to_string(),
        );
        let record = AuditRecord {
            time: "",
            operation: "decrypt",
            outcome: "ok",
            status: Some(200),
            request_id: Some(rid.as_str()),
            actor: "api_key",
            api_key_id: Some("kw_3c8e0d1f2a4b5c6d7e8f9a0b"),
            tenant_id: Some(tenant.as_str()),
            peer: Some("203.0.113.254"),
            encryption_id: Some(enc.as_str()),
            version_id: Some(ver.as_str()),
            ..AuditRecord::default()
        };
        let mut chain = Chain::new();
        chain.seq = 9_999_999_997;
        let mut out = String::new();
        chain.append(&record, 1_780_000_000_123, &mut out);
        out.clear();
        let line = chain.append(&record, 1_780_000_000_123, &mut out);
        let bytes = out.len();
        assert!(bytes <= 300, "{bytes} bytes: {out}");
        println!("a typical record: {bytes} bytes (with its newline): {out}");
        // It reads back as the record it was.
        let read = AuditRecord::from_line(&out[line], None).unwrap();
        assert_eq!(
            (
                read.request_id.as_deref(),
                read.tenant_id.as_deref(),
                read.encryption_id.as_deref(),
                read.version_id.as_deref(),
                read.api_key_id.as_deref(),
                read.actor.as_str(),
                read.outcome.as_str(),
                read.seq,
            ),
            (
                Some(rid.as_str()),
                Some(tenant.as_str()),
                Some(enc.as_str()),
                Some(ver.as_str()),
                Some("kw_3c8e0d1f2a4b5c6d7e8f9a0b"),
                "api_key",
                "ok",
                9_999_999_999
            )
        );
    }

    #[test]
    fn every_field_reads_back_from_format_v2_as_it_was_written() {
        let full = AuditRecord {
            seq: u64::MAX,
            time: "2026-05-28T20:26:40.123Z",
            operation: "encrypt",
            outcome: "error",
            error: Some("invalid_request"),
            status: Some(400),
            request_id: Some("a \"client\" id\n\u{1}\\ with ünïcödé"),
            actor: "operator_cli",
            api_key_id: Some("kw_0123456789ABCDEF01234567"),
            tenant_id: Some("00000000-0000-0000-0000-000000000001"),
            client_subject: Some("CN=platform,O=\"Example, Inc.\""),
            client_spki_sha256: Some(
                "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ),
            peer: Some("::1"),
            encryption_id: Some("00000000-0000-0000-0000-000000000002"),
            version_id: Some("00000000-0000-0000-0000-000000000003"),
            job_id: Some("not-a-uuid"),
            target_api_key_id: Some("kw_4567456745674567456745ab"),
            scopes: Some("encrypt,decrypt"),
            batch_index: Some(u32::MAX),
            items: Some(u32::MAX),
            item_indexes: Some("0-3,7"),
            prev: "",
            hash: None,
        };
        let odd = AuditRecord {
            outcome: "error",
            error: None,
            request_id: Some("0000000A-0000-0000-0000-000000000001"),
            actor: "api_key",
            tenant_id: Some("not a uuid"),
            client_spki_sha256: Some("ABCDEF"),
            job_id: Some("00000000-0000-0000-0000-000000000004"),
            ..full
        };
        let sparse = AuditRecord {
            seq: 1,
            time: "1970-01-01T00:00:00.000Z",
            operation: "rotate.automatic",
            outcome: "ok",
            actor: "system",
            ..AuditRecord::default()
        };
        for record in [full, odd, sparse] {
            let mut chain = Chain::new();
            chain.seq = record.seq.wrapping_sub(1);
            let line = seal(&mut chain, &record);
            let read = AuditRecord::from_line(&line, None).unwrap();
            let hash = read.hash.clone().unwrap();
            assert_eq!(hash, chain.prev_hex());
            let expected = AuditRecord {
                time: crate::domain::time::rfc3339(SAMPLE_MS),
                prev: GENESIS.to_string(),
                hash: Some(hash),
                ..AuditRecord::<String>::default()
            };
            let written = AuditRecord {
                seq: record.seq,
                operation: record.operation.to_string(),
                outcome: record.outcome.to_string(),
                error: record.error.map(str::to_string),
                status: record.status,
                request_id: record.request_id.map(str::to_string),
                actor: record.actor.to_string(),
                api_key_id: record.api_key_id.map(str::to_string),
                tenant_id: record.tenant_id.map(str::to_string),
                client_subject: record.client_subject.map(str::to_string),
                client_spki_sha256: record.client_spki_sha256.map(str::to_string),
                peer: record.peer.map(str::to_string),
                encryption_id: record.encryption_id.map(str::to_string),
                version_id: record.version_id.map(str::to_string),
                job_id: record.job_id.map(str::to_string),
                target_api_key_id: record.target_api_key_id.map(str::to_string),
                scopes: record.scopes.map(str::to_string),
                batch_index: record.batch_index,
                items: record.items,
                item_indexes: record.item_indexes.map(str::to_string),
                ..expected
            };
            assert_eq!(read, written, "{line}");
        }
    }

    #[test]
    fn written_lines_are_audit_records_with_every_field_in_order() {
        let tenant = TenantId::new_random();
        let (e1, e2, v1) = (
            EncryptionId::new_random(),
            EncryptionId::new_random(),
            VersionId::new_random(),
        );
        let event = AuditEvent {
            time_ms: 1_780_000_000_123,
            operation: "encrypt",
            status: Some(200),
            error: None,
            request_id: Some("req-1".into()),
            actor: Actor::Refused("kw_0123456789abcdef01234567".into()),
            tenant_id: Some(tenant),
            client: Some(Arc::new(ClientIdentity {
                subject: "CN=client \"one\"".into(),
                spki_sha256: [7; 32],
            })),
            peer: Some("127.0.0.1".parse().unwrap()),
            targets: vec![
                Target {
                    encryption_id: Some(e1),
                    version_id: Some(v1),
                    items: Some(ItemGroup {
                        count: 998,
                        ..ItemGroup::default()
                    }),
                    ..Target::default()
                },
                Target {
                    encryption_id: Some(e2),
                    items: Some(ItemGroup {
                        count: 2,
                        error: Some("encryption_not_found"),
                        failed: vec![(3, 3), (7, 7)],
                    }),
                    ..Target::default()
                },
            ],
        };
        let (mut chain, mut texts, mut out) = (Chain::new(), TextCache::default(), String::new());
        let mut rows = Vec::new();
        event.for_each_record(&mut texts, |record| {
            let line = chain.append(record, event.time_ms, &mut out);
            rows.push((record.outcome.to_string(), out[line].to_string()))
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(rows[1].1, lines[1]);
        let first = AuditRecord::from_line(lines[0], None).unwrap();
        let second = AuditRecord::from_line(lines[1], first.hash.as_deref()).unwrap();
        let expected = AuditRecord {
            seq: 1,
            time: "2026-05-28T20:26:40.123Z".into(),
            operation: "encrypt".into(),
            outcome: "ok".into(),
            error: None,
            status: Some(200),
            request_id: Some("req-1".into()),
            actor: "unauthenticated".into(),
            api_key_id: Some("kw_0123456789abcdef01234567".into()),
            tenant_id: Some(tenant.to_string()),
            client_subject: Some("CN=client \"one\"".into()),
            client_spki_sha256: Some("07".repeat(32)),
            peer: Some("127.0.0.1".into()),
            encryption_id: Some(e1.to_string()),
            version_id: Some(v1.to_string()),
            job_id: None,
            target_api_key_id: None,
            scopes: None,
            batch_index: None,
            items: Some(998),
            item_indexes: None,
            prev: GENESIS.into(),
            hash: first.hash.clone(),
        };
        assert_eq!(first, expected);
        assert_eq!((second.seq, second.outcome.as_str()), (2, "error"));
        assert_eq!(second.error.as_deref(), Some("encryption_not_found"));
        assert_eq!(
            (second.items, second.item_indexes.as_deref()),
            (Some(2), Some("3,7"))
        );
        assert_eq!(second.prev, first.hash.clone().unwrap());
        // Format v2: short names, compact values, `prev` on the file's first
        // record only.
        assert!(
            lines[0].starts_with("{\"v\":2,\"seq\":1,\"t\":1780000000123,\"op\":\"encrypt\",\"st\":200,\"requestId\":\"req-1\",\"act\":\"unauthenticated\",\"key\":\"ASNFZ4mrze8BI0Vn\","),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].contains(",\"prev\":\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\",\"h\":\"")
        );
        assert!(!lines[1].contains("\"prev\""), "{}", lines[1]);
        assert_eq!(verify(out.as_bytes(), &[]).unwrap().records, 2);
    }
}
