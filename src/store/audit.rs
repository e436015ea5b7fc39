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

use std::collections::BTreeSet;

use serde::Deserialize;
use sqlx::Row;

use super::{statement_chunks, values_list, Store, StoreError};

/// Most records in one segment. A read cursor is a record's position,
/// `segment id * POSITIONS + line`, so this stays below [`POSITIONS`].
pub const SEGMENT_RECORDS: usize = 1000;
const POSITIONS: i64 = 1024;
/// Segments read per round trip while a page fills.
const SEGMENTS_PER_READ: i64 = 8;

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

/// Which records to read: every filter is optional; newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// At or after (Unix ms).
    pub from_ms: Option<i64>,
    /// Before (Unix ms).
    pub to_ms: Option<i64>,
    /// Of this tenant.
    pub tenant_id: Option<String>,
    /// On this encryption.
    pub encryption_id: Option<String>,
    /// This operation.
    pub operation: Option<String>,
    /// Only records before this position (the pagination cursor).
    pub before_id: Option<i64>,
    /// At most this many.
    pub limit: i64,
}

/// The fields of a record that reads filter on.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Filterable<'a> {
    #[serde(borrow)]
    time: &'a str,
    #[serde(borrow)]
    operation: &'a str,
    #[serde(borrow, default)]
    tenant_id: Option<&'a str>,
    #[serde(borrow, default)]
    encryption_id: Option<&'a str>,
}

impl AuditQuery {
    /// Whether a record line passes every filter; `from`/`to` are the bounds
    /// as record time text (fixed-width RFC 3339 UTC, so text order is time
    /// order). A line that does not parse passes, for the caller to report.
    fn admits(&self, line: &str, from: Option<&str>, to: Option<&str>) -> bool {
        let Ok(r) = serde_json::from_str::<Filterable<'_>>(line) else {
            return true;
        };
        from.is_none_or(|f| r.time >= f)
            && to.is_none_or(|t| r.time < t)
            && self.operation.as_deref().is_none_or(|o| r.operation == o)
            && self
                .tenant_id
                .as_deref()
                .is_none_or(|t| r.tenant_id == Some(t))
            && self
                .encryption_id
                .as_deref()
                .is_none_or(|e| r.encryption_id == Some(e))
    }
}

impl Store {
    /// Appends `segments` in one transaction.
    pub async fn insert_audit(&self, segments: &[AuditSegment]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for segment in segments {
            let id: i64 = sqlx::query(
                "INSERT INTO audit_segments (first_ms, last_ms, records) VALUES ($1, $2, $3) RETURNING id",
            )
            .bind(segment.first_ms)
            .bind(segment.last_ms)
            .bind(segment.lines.as_str())
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

    /// The records matching `q`, newest first, each with its position (the
    /// cursor for the next page).
    ///
    /// Pages go backwards by position: a segment committed late with a lower
    /// id than the first page's (PostgreSQL hands out ids before commit) still
    /// shows up on a later page instead of being skipped.
    pub async fn audit_records(&self, q: &AuditQuery) -> Result<Vec<(i64, String)>, StoreError> {
        let from = q.from_ms.map(crate::domain::time::rfc3339);
        let to = q.to_ms.map(crate::domain::time::rfc3339);
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
                    if (out.len() as i64) < q.limit
                        && q.admits(line, from.as_deref(), to.as_deref())
                    {
                        out.push((position, line.to_string()));
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
            "SELECT s.id, s.records FROM {source} {filter} ORDER BY {id} DESC LIMIT {limit}"
        );
        let mut query = sqlx::query(&sql);
        for b in binds {
            query = match b {
                Bind::Text(t) => query.bind(t),
                Bind::Int(i) => query.bind(i),
            };
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }
}

/// A query parameter of [`Store::audit_segments`].
enum Bind {
    Text(String),
    Int(i64),
}
