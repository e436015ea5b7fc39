//! The hash chain: each record is numbered, carries `prev`, the hash of the
//! record before it, and ends in `hash`, the SHA-256 of its own JSON up to
//! (not including) the `hash` field.

use std::ops::Range;

use super::record::AuditRecord;
use crate::crypto::{hex_into, sha256};

/// The `prev` of the first record of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The running end of a hash chain.
pub(super) struct Chain {
    /// The last record's `seq` (0 before the first).
    pub(super) seq: u64,
    /// The last record's hash, hex.
    pub(super) prev: String,
    /// The file ends in a partial line (a crash mid-write): start on a new line.
    pub(super) needs_newline: bool,
}

impl Chain {
    /// A new chain: its first record follows [`GENESIS`].
    pub(super) fn new() -> Chain {
        Chain {
            seq: 0,
            prev: GENESIS.to_string(),
            needs_newline: false,
        }
    }

    /// Appends `record` to `out` as the chain's next line, newline-terminated;
    /// returns where in `out` the line is (without its newline).
    pub(super) fn append(&mut self, record: &AuditRecord<&str>, out: &mut String) -> Range<usize> {
        if self.needs_newline {
            out.push('\n');
            self.needs_newline = false;
        }
        let line = self.seal(record, out);
        out.push('\n');
        line
    }

    /// Numbers, links and hashes `record`, appending its line (without
    /// newline) to `out`; returns where in `out` the line is.
    pub(super) fn seal(&mut self, record: &AuditRecord<&str>, out: &mut String) -> Range<usize> {
        let start = out.len();
        self.seq += 1;
        let record = AuditRecord {
            seq: self.seq,
            prev: self.prev.as_str(),
            hash: None,
            ..*record
        };
        record.write_json(out);
        // `hash` covers the line up to it, closed as the object it was: the
        // JSON without its `hash` field.
        let digest = sha256(&out.as_bytes()[start..]);
        out.pop();
        self.prev.clear();
        hex_into(&digest, &mut self.prev);
        out.push_str(",\"hash\":\"");
        out.push_str(&self.prev);
        out.push_str("\"}");
        start..out.len()
    }
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

    /// `record`'s line, sealed into `chain`.
    pub(in crate::audit) fn seal(chain: &mut Chain, record: &AuditRecord<&str>) -> String {
        let mut out = String::new();
        chain.seal(record, &mut out);
        out
    }

    /// An intact chain of `n` lines.
    pub(in crate::audit) fn chain_of(n: usize) -> Vec<String> {
        let mut chain = Chain::new();
        (0..n)
            .map(|i| seal(&mut chain, &sample(&format!("op{i}"))))
            .collect()
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
        let (mut chain, mut time, mut out) = (Chain::new(), TextCache::default(), String::new());
        let mut rows = Vec::new();
        event.for_each_record(&mut time, |record| {
            let line = chain.append(record, &mut out);
            rows.push((record.outcome.to_string(), out[line].to_string()))
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(rows[1].1, lines[1]);
        let first: AuditRecord = serde_json::from_str(lines[0]).unwrap();
        let second: AuditRecord = serde_json::from_str(lines[1]).unwrap();
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
        // The writer's bytes are exactly what serde writes for the record:
        // the same fields in the same order.
        let mut unhashed = first.clone();
        unhashed.hash = None;
        let body = serde_json::to_string(&unhashed).unwrap();
        assert!(
            lines[0].starts_with(&body[..body.len() - 1]),
            "{}",
            lines[0]
        );
        assert_eq!(verify(out.as_bytes(), &[]).unwrap().records, 2);
    }
}
