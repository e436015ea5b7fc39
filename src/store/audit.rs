//! The audit log's table copy: segments of records written by the audit
//! writer, and the filtered, paginated reads behind `GET /v1/audit`.
//!
//! One row per writer batch (a *segment*: up to [`SEGMENT_RECORDS`] JSON
//! lines, exactly as in the audit file), not one per record: at tens of
//! thousands of operations a second, a row and three index entries per record
//! were the most expensive thing the service did. A segment row names the time
//! span of its records, and `audit_segment_keys` lists each tenant, encryption
//! and operation that occurs in it, so a filtered read visits only the segments
//! that can match and checks each of their records exactly.
//!
//! A segment's lines are stored compressed (zstd, column `packed`; `records`
//! is then empty): about 8 times smaller, which the database writes twice
//! (SQLite's WAL and checkpoint, PostgreSQL's WAL and heap). Segments written
//! before migration 0006 (SQLite) / 0007 (PostgreSQL) keep their text in
//! `records`.

use std::collections::BTreeSet;

use serde::Deserialize;
use sqlx::Row;

use super::pool::{Store, StoreError};
use super::sql::{statement_chunks, values_list};
pub use crate::domain::records::{AuditLine, AuditQuery};

/// Most records in one segment. A read cursor is a record's position,
/// `segment id * POSITIONS + line`, so this stays below [`POSITIONS`].
pub const SEGMENT_RECORDS: usize = 1000;
const POSITIONS: i64 = 1024;
/// Segments read per round trip while a page fills.
const SEGMENTS_PER_READ: i64 = 8;
/// zstd's level for segments: its fastest standard level, about 1 ns per
/// byte for 8x on audit lines (LZ4 is about as fast for 4x).
const PACK_LEVEL: i32 = 1;
/// The most a stored segment may unpack to: 1,000 records of at most a few
/// kilobytes each, with room to spare. A larger claim is a corrupt row.
const MAX_SEGMENT_BYTES: u64 = 64 << 20;

/// Compresses segments for the table. One per audit writer: zstd's context
/// is kept from segment to segment rather than allocated for each.
pub struct SegmentPacker {
    compressor: zstd::bulk::Compressor<'static>,
}

impl SegmentPacker {
    /// A packer at [`PACK_LEVEL`].
    pub fn new() -> std::io::Result<SegmentPacker> {
        Ok(SegmentPacker {
            compressor: zstd::bulk::Compressor::new(PACK_LEVEL)?,
        })
    }

    /// Fails only where zstd cannot allocate its buffers.
    fn pack(&mut self, lines: &str) -> Result<Vec<u8>, StoreError> {
        self.compressor
            .compress(lines.as_bytes())
            .map_err(|e| StoreError::Other(sqlx::Error::Encode(Box::new(e))))
    }
}

impl std::fmt::Debug for SegmentPacker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SegmentPacker")
    }
}

/// A stored segment's lines: `packed` when set, else the `records` text.
fn unpack(id: i64, records: String, packed: Option<Vec<u8>>) -> Result<String, StoreError> {
    let Some(packed) = packed else {
        return Ok(records);
    };
    let corrupt = |detail: String| StoreError::Corrupt {
        table: "audit_segments",
        detail: format!("segment {id}: {detail}"),
    };
    let size = match zstd::zstd_safe::get_frame_content_size(&packed) {
        Ok(Some(n)) if n <= MAX_SEGMENT_BYTES => n as usize,
        Ok(Some(n)) => return Err(corrupt(format!("claims {n} bytes unpacked"))),
        Ok(None) | Err(_) => return Err(corrupt("not a zstd frame with its size".into())),
    };
    let bytes = zstd::bulk::decompress(&packed, size).map_err(|e| corrupt(e.to_string()))?;
    String::from_utf8(bytes).map_err(|_| corrupt("not UTF-8 text".into()))
}

/// Records as the writer hands them to the table: one segment.
#[derive(Debug, Clone, Default)]
pub struct AuditSegment {
    /// The earliest record's time (Unix ms).
    pub first_ms: i64,
    /// The latest record's time (Unix ms).
    pub last_ms: i64,
    /// The records' lines, each ending in a newline, in chain order.
    pub lines: String,
    /// How many records.
    pub records: usize,
    /// Every tenant a record names.
    pub tenants: BTreeSet<String>,
    /// Every encryption a record names.
    pub encryptions: BTreeSet<String>,
    /// Every operation recorded.
    pub operations: BTreeSet<&'static str>,
    /// `lines` compressed, kept from a failed insert for its retry; any
    /// record pushed after drops it.
    packed: Option<Vec<u8>>,
}

impl AuditSegment {
    /// Adds one record's line and the keys it can be found by.
    pub fn push(
        &mut self,
        time_ms: i64,
        line: &str,
        tenant: Option<&str>,
        encryption: Option<&str>,
        operation: &'static str,
    ) {
        if self.records == 0 || time_ms < self.first_ms {
            self.first_ms = time_ms;
        }
        if self.records == 0 || time_ms > self.last_ms {
            self.last_ms = time_ms;
        }
        self.packed = None;
        self.lines.push_str(line);
        self.lines.push('\n');
        self.records += 1;
        if let Some(t) = tenant {
            if !self.tenants.contains(t) {
                self.tenants.insert(t.to_owned());
            }
        }
        if let Some(e) = encryption {
            if !self.encryptions.contains(e) {
                self.encryptions.insert(e.to_owned());
            }
        }
        self.operations.insert(operation);
    }

    /// Whether it holds as many records as a segment may.
    pub fn is_full(&self) -> bool {
        self.records >= SEGMENT_RECORDS
    }
}

/// The fields of a record that reads filter on, in either record format:
/// v1 (`time` as RFC 3339 text, ids as UUID text) or v2 (`t` in Unix ms,
/// `op`, ids in their 22-character form under `ten` and `enc`, or as text
/// under their v1 names when they are not canonical UUIDs).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Filterable<'a> {
    #[serde(borrow, default)]
    time: Option<&'a str>,
    #[serde(default)]
    t: Option<i64>,
    #[serde(borrow, default, alias = "op")]
    operation: Option<&'a str>,
    #[serde(borrow, default)]
    tenant_id: Option<&'a str>,
    #[serde(borrow, default)]
    ten: Option<&'a str>,
    #[serde(borrow, default)]
    encryption_id: Option<&'a str>,
    #[serde(borrow, default)]
    enc: Option<&'a str>,
}

/// A query's filters in the forms records state them, worked out once per
/// read.
struct Bounds {
    /// `from`/`to` as v1 record time text (fixed-width RFC 3339 UTC, so
    /// text order is time order).
    from: Option<String>,
    to: Option<String>,
    /// The tenant and encryption filters in v2's compact form.
    tenant: Option<String>,
    encryption: Option<String>,
}

impl Bounds {
    fn of(q: &AuditQuery) -> Bounds {
        let compact = |id: Option<&str>| {
            id.and_then(|id| {
                let mut buf = [0; 22];
                crate::domain::ids::compact_uuid(id, &mut buf).map(str::to_string)
            })
        };
        Bounds {
            from: q.from_ms.map(crate::domain::time::rfc3339),
            to: q.to_ms.map(crate::domain::time::rfc3339),
            tenant: compact(q.tenant_id.as_deref()),
            encryption: compact(q.encryption_id.as_deref()),
        }
    }
}

impl AuditQuery {
    /// Whether a record line passes every filter. A line that does not
    /// parse passes, for the caller to report, unless the query is limited
    /// to a tenant: a tenant's reader must never see a line nobody could
    /// tell was theirs.
    fn admits(&self, line: &str, b: &Bounds) -> bool {
        let parsed = serde_json::from_str::<Filterable<'_>>(line)
            .ok()
            .filter(|r| r.operation.is_some() && (r.time.is_some() || r.t.is_some()));
        let Some(r) = parsed else {
            return self.tenant_id.is_none();
        };
        let in_time = match (r.t, r.time) {
            (Some(ms), _) => {
                self.from_ms.is_none_or(|f| ms >= f) && self.to_ms.is_none_or(|t| ms < t)
            }
            (None, time) => {
                b.from.as_deref().is_none_or(|f| time >= Some(f))
                    && b.to.as_deref().is_none_or(|t| time < Some(t))
            }
        };
        // An id matches in its compact form (v2) or its text (v1, or v2's
        // fallback for a non-canonical id).
        let id_matches = |wanted: Option<&str>,
                          compact: Option<&str>,
                          short: Option<&str>,
                          long: Option<&str>| {
            wanted.is_none_or(|w| long == Some(w) || (short.is_some() && short == compact))
        };
        in_time
            && self
                .operation
                .as_deref()
                .is_none_or(|o| r.operation == Some(o))
            && id_matches(
                self.tenant_id.as_deref(),
                b.tenant.as_deref(),
                r.ten,
                r.tenant_id,
            )
            && id_matches(
                self.encryption_id.as_deref(),
                b.encryption.as_deref(),
                r.enc,
                r.encryption_id,
            )
    }
}

/// The last member's value of a record line: its hash (`hash` in v1, `h`
/// in v2; both formats end with it).
fn last_value(line: &str) -> Option<&str> {
    let rest = line.strip_suffix("\"}")?;
    Some(&rest[rest.rfind('"')? + 1..])
}

impl Store {
    /// Appends `segments` in one transaction, compressed by `packer`. Each
    /// segment keeps its frame, so a retry after a failure compresses only
    /// what grew since.
    pub async fn insert_audit(
        &self,
        segments: &mut [AuditSegment],
        packer: &mut SegmentPacker,
    ) -> Result<(), StoreError> {
        // Compressed before the transaction, which holds a connection. This
        // runs on a runtime worker that also serves requests: a full segment
        // takes a few hundred microseconds, so yield between segments rather
        // than hold the worker for a whole backlog (up to 16 of them).
        for segment in segments.iter_mut() {
            if segment.packed.is_none() {
                segment.packed = Some(packer.pack(&segment.lines)?);
                tokio::task::yield_now().await;
            }
        }
        // Compressed before the turn too: other writers wait only for the
        // statements.
        let _turn = self.write_turn().await?;
        let mut tx = self.pool.begin().await?;
        for segment in segments.iter() {
            // Packed by the loop above (packing here would be as correct,
            // only inside the transaction).
            let packed = match segment.packed.as_deref() {
                Some(packed) => std::borrow::Cow::Borrowed(packed),
                None => std::borrow::Cow::Owned(packer.pack(&segment.lines)?),
            };
            let id: i64 = sqlx::query(
                "INSERT INTO audit_segments (first_ms, last_ms, records, packed) VALUES ($1, $2, '', $3) RETURNING id",
            )
            .bind(segment.first_ms)
            .bind(segment.last_ms)
            .bind(packed.as_ref())
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
            let keys: Vec<(&str, &str)> = segment
                .tenants
                .iter()
                .map(|t| ("tenant", t.as_str()))
                .chain(
                    segment
                        .encryptions
                        .iter()
                        .map(|e| ("encryption", e.as_str())),
                )
                .chain(segment.operations.iter().map(|o| ("operation", *o)))
                .collect();
            for chunk in statement_chunks(self.backend, &keys) {
                let sql = format!(
                    "INSERT INTO audit_segment_keys (kind, value, segment_id) VALUES {}",
                    values_list(self.backend, chunk.len(), 3)
                );
                let mut query = sqlx::query(&sql);
                for (kind, value) in chunk {
                    query = query.bind(*kind).bind(*value).bind(id);
                }
                query.execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Deletes up to `max_segments` segments whose newest record is older
    /// than `before_ms` (Unix ms), oldest first, with their keys, in one
    /// transaction; returns how many went. Idempotent: replicas pruning at
    /// once delete each segment once, and the others find nothing left. A
    /// segment that straddles `before_ms` stays whole until its newest
    /// record passes it.
    pub async fn prune_audit(&self, before_ms: i64, max_segments: i64) -> Result<u64, StoreError> {
        let _turn = self.write_turn().await?;
        let mut tx = self.pool.begin().await?;
        let ids: Vec<i64> = sqlx::query(
            "SELECT id FROM audit_segments WHERE last_ms < $1 ORDER BY last_ms LIMIT $2",
        )
        .bind(before_ms)
        .bind(max_segments)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
        if ids.is_empty() {
            return Ok(0);
        }
        let mut deleted = 0;
        for chunk in statement_chunks(self.backend, &ids) {
            let list: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
            let list = list.join(", ");
            let keys = format!("DELETE FROM audit_segment_keys WHERE segment_id IN ({list})");
            let segments = format!("DELETE FROM audit_segments WHERE id IN ({list})");
            let (mut keys, mut segments) = (sqlx::query(&keys), sqlx::query(&segments));
            for id in chunk {
                keys = keys.bind(*id);
                segments = segments.bind(*id);
            }
            keys.execute(&mut *tx).await?;
            deleted += segments.execute(&mut *tx).await?.rows_affected();
        }
        tx.commit().await?;
        Ok(deleted)
    }

    /// The records matching `q`, newest first, each with its position (the
    /// cursor for the next page).
    ///
    /// Pages go backwards by position: a segment committed late with a lower
    /// id than the first page's (PostgreSQL hands out ids before commit) still
    /// shows up on a later page instead of being skipped.
    pub async fn audit_records(&self, q: &AuditQuery) -> Result<Vec<AuditLine>, StoreError> {
        let bounds = Bounds::of(q);
        let mut out = Vec::new();
        let mut before = q.before_id;
        while (out.len() as i64) < q.limit {
            let segments = self
                .audit_segments(q, before.map(|p| (p - 1).div_euclid(POSITIONS)))
                .await?;
            let Some((last_id, _)) = segments.last() else {
                break;
            };
            let next_before = last_id * POSITIONS;
            for (id, lines) in segments {
                let lines: Vec<&str> = lines.lines().collect();
                for (index, line) in lines.iter().enumerate().rev() {
                    let position = id * POSITIONS + index as i64;
                    if before.is_some_and(|b| position >= b) {
                        continue;
                    }
                    if (out.len() as i64) < q.limit && q.admits(line, &bounds) {
                        let previous = index.checked_sub(1).and_then(|i| lines.get(i));
                        out.push(AuditLine {
                            position,
                            line: line.to_string(),
                            previous_hash: previous.and_then(|l| last_value(l)).map(str::to_string),
                        });
                    }
                }
            }
            before = Some(next_before);
        }
        Ok(out)
    }

    /// Up to [`SEGMENTS_PER_READ`] segments that may hold records matching
    /// `q`, at or below segment `at_most`, newest first. The most selective key
    /// filter drives the read through `audit_segment_keys`' primary key.
    async fn audit_segments(
        &self,
        q: &AuditQuery,
        at_most: Option<i64>,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        let keys: Vec<(&str, &str)> = [
            ("encryption", q.encryption_id.as_deref()),
            ("tenant", q.tenant_id.as_deref()),
            ("operation", q.operation.as_deref()),
        ]
        .into_iter()
        .filter_map(|(kind, value)| value.map(|v| (kind, v)))
        .collect();
        let mut binds: Vec<Bind> = Vec::new();
        fn param(b: Bind, binds: &mut Vec<Bind>) -> String {
            binds.push(b);
            format!("${}", binds.len())
        }
        let mut conditions = Vec::new();
        let (source, id) = match keys.first() {
            Some((kind, value)) => {
                let kind = param(Bind::Text((*kind).to_owned()), &mut binds);
                let value = param(Bind::Text((*value).to_owned()), &mut binds);
                conditions.push(format!("k.kind = {kind} AND k.value = {value}"));
                (
                    "audit_segment_keys k JOIN audit_segments s ON s.id = k.segment_id",
                    "k.segment_id",
                )
            }
            None => ("audit_segments s", "s.id"),
        };
        for (kind, value) in keys.iter().skip(1) {
            let kind = param(Bind::Text((*kind).to_owned()), &mut binds);
            let value = param(Bind::Text((*value).to_owned()), &mut binds);
            conditions.push(format!(
                "EXISTS (SELECT 1 FROM audit_segment_keys o WHERE o.kind = {kind} AND o.value = {value} AND o.segment_id = s.id)"
            ));
        }
        if let Some(v) = q.from_ms {
            conditions.push(format!("s.last_ms >= {}", param(Bind::Int(v), &mut binds)));
        }
        if let Some(v) = q.to_ms {
            conditions.push(format!("s.first_ms < {}", param(Bind::Int(v), &mut binds)));
        }
        if let Some(v) = at_most {
            conditions.push(format!("{id} <= {}", param(Bind::Int(v), &mut binds)));
        }
        let limit = param(Bind::Int(SEGMENTS_PER_READ), &mut binds);
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let sql = format!(
            "SELECT s.id, s.records, s.packed FROM {source} {filter} ORDER BY {id} DESC LIMIT {limit}"
        );
        let mut query = sqlx::query(&sql);
        for b in binds {
            query = match b {
                Bind::Text(t) => query.bind(t),
                Bind::Int(i) => query.bind(i),
            };
        }
        let rows = query.fetch_all(&self.pool).await?;
        let rows: Vec<(i64, String, Option<Vec<u8>>)> = rows
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
            .collect::<Result<_, StoreError>>()?;
        let any_packed = rows.iter().any(|(_, _, packed)| packed.is_some());
        let unpack_all = move || {
            rows.into_iter()
                .map(|(id, records, packed)| Ok((id, unpack(id, records, packed)?)))
                .collect()
        };
        // Unpacking eight full segments takes a few milliseconds: off the
        // runtime's workers, which serve the hot path.
        if any_packed {
            tokio::task::spawn_blocking(unpack_all)
                .await
                .map_err(|_| StoreError::Other(sqlx::Error::WorkerCrashed))?
        } else {
            unpack_all()
        }
    }
}

/// A query parameter of [`Store::audit_segments`].
enum Bind {
    Text(String),
    Int(i64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_unpacks_to_its_lines_and_anything_else_is_corrupt() {
        let lines: String = (0..500)
            .map(|i| format!("{{\"seq\":{i},\"operation\":\"encrypt\"}}\n"))
            .collect();
        let packed = SegmentPacker::new().unwrap().pack(&lines).unwrap();
        assert!(packed.len() * 4 < lines.len());
        assert_eq!(
            unpack(7, String::new(), Some(packed.clone())).unwrap(),
            lines
        );
        // Before the migration: the text, as stored.
        assert_eq!(unpack(7, lines.clone(), None).unwrap(), lines);

        let corrupt = |packed: Vec<u8>| match unpack(7, String::new(), Some(packed)) {
            Err(StoreError::Corrupt { table, detail }) => {
                assert_eq!(table, "audit_segments");
                assert!(detail.starts_with("segment 7: "), "{detail}");
            }
            other => panic!("{:?}", other.map(|s| s.len())),
        };
        corrupt(b"not a zstd frame".to_vec());
        corrupt(packed[..packed.len() / 2].to_vec());
        // A frame that does not state its size (a streaming encoder's).
        corrupt(zstd::stream::encode_all(lines.as_bytes(), 1).unwrap());
        // Bytes that are not UTF-8.
        corrupt(zstd::bulk::compress(&[0xff, 0xfe, 0xfd], 1).unwrap());
    }

    /// A failed insert leaves each segment's frame for the retry; a record
    /// pushed after drops that segment's frame, and the retry writes both.
    #[tokio::test]
    async fn a_retry_reuses_frames_of_segments_that_did_not_grow() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/k.db", dir.path().display());
        let store = Store::connect(&url, 2).await.unwrap();
        store.migrate().await.unwrap();
        let line = |seq: usize| format!("{{\"seq\":{seq},\"operation\":\"encrypt\"}}");
        let mut segments = vec![AuditSegment::default(), AuditSegment::default()];
        for seq in 0..SEGMENT_RECORDS {
            segments[0].push(1, &line(seq), Some("t"), None, "encrypt");
        }
        segments[1].push(2, &line(SEGMENT_RECORDS), Some("t"), None, "encrypt");
        let mut packer = SegmentPacker::new().unwrap();

        sqlx::query(
            "CREATE TRIGGER refuse BEFORE INSERT ON audit_segments \
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .execute(&store.pool)
        .await
        .unwrap();
        assert!(store
            .insert_audit(&mut segments, &mut packer)
            .await
            .is_err());
        let kept = segments[0].packed.as_ref().unwrap().as_ptr();
        assert!(segments[1].packed.is_some());
        segments[1].push(3, &line(SEGMENT_RECORDS + 1), Some("t"), None, "encrypt");
        assert!(segments[1].packed.is_none(), "a grown segment packs again");

        sqlx::query("DROP TRIGGER refuse")
            .execute(&store.pool)
            .await
            .unwrap();
        store
            .insert_audit(&mut segments, &mut packer)
            .await
            .unwrap();
        assert_eq!(segments[0].packed.as_ref().unwrap().as_ptr(), kept);
        let q = AuditQuery {
            limit: 5000,
            ..AuditQuery::default()
        };
        let records = store.audit_records(&q).await.unwrap();
        assert_eq!(records.len(), SEGMENT_RECORDS + 2);
        assert_eq!(records[0].line, line(SEGMENT_RECORDS + 1));
        assert_eq!(records.last().unwrap().line, line(0));
    }
}
