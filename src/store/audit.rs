//! The audit log's table copy: batched inserts from the audit writer, and the
//! filtered, paginated reads behind `GET /v1/audit`.

use sqlx::Row;

use super::{rows_per_statement, values_list, Store, StoreError};

/// One audit record as stored.
#[derive(Debug, Clone)]
pub struct AuditRow {
    /// When (Unix ms).
    pub time_ms: i64,
    /// The tenant acted for, if known.
    pub tenant_id: Option<String>,
    /// The encryption acted on, if any.
    pub encryption_id: Option<String>,
    /// What was done.
    pub operation: &'static str,
    /// `ok` or `error`.
    pub outcome: &'static str,
    /// The request's id, if it came from a request.
    pub request_id: Option<String>,
    /// The whole record, as written to the audit file.
    pub record: String,
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
    /// Only rows older than this row id (the pagination cursor).
    pub before_id: Option<i64>,
    /// At most this many.
    pub limit: i64,
}

impl Store {
    /// Appends `rows` in one transaction, a few hundred rows per statement.
    pub async fn insert_audit(&self, rows: &[AuditRow]) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for chunk in rows.chunks(rows_per_statement(self.backend)) {
            let sql = format!(
                "INSERT INTO audit_log (time_ms, tenant_id, encryption_id, operation, outcome, request_id, record) VALUES {}",
                values_list(chunk.len(), 7)
            );
            let mut query = sqlx::query(&sql);
            for row in chunk {
                query = query
                    .bind(row.time_ms)
                    .bind(row.tenant_id.as_deref())
                    .bind(row.encryption_id.as_deref())
                    .bind(row.operation)
                    .bind(row.outcome)
                    .bind(row.request_id.as_deref())
                    .bind(row.record.as_str());
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The records matching `q`, newest first, each with its row id (the
    /// cursor for the next page).
    ///
    /// Pages go backwards by row id: a record committed late with a lower id
    /// than the first page's (PostgreSQL hands out ids before commit) still
    /// shows up on a later page instead of being skipped.
    pub async fn audit_records(&self, q: &AuditQuery) -> Result<Vec<(i64, String)>, StoreError> {
        let mut conditions: Vec<String> = Vec::new();
        let mut next = 0;
        let mut placeholder = || {
            next += 1;
            format!("${next}")
        };
        if q.from_ms.is_some() {
            conditions.push(format!("time_ms >= {}", placeholder()));
        }
        if q.to_ms.is_some() {
            conditions.push(format!("time_ms < {}", placeholder()));
        }
        if q.tenant_id.is_some() {
            conditions.push(format!("tenant_id = {}", placeholder()));
        }
        if q.encryption_id.is_some() {
            conditions.push(format!("encryption_id = {}", placeholder()));
        }
        if q.operation.is_some() {
            conditions.push(format!("operation = {}", placeholder()));
        }
        if q.before_id.is_some() {
            conditions.push(format!("id < {}", placeholder()));
        }
        let limit = placeholder();
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let sql =
            format!("SELECT id, record FROM audit_log {filter} ORDER BY id DESC LIMIT {limit}");
        let mut query = sqlx::query(&sql);
        if let Some(v) = q.from_ms {
            query = query.bind(v);
        }
        if let Some(v) = q.to_ms {
            query = query.bind(v);
        }
        if let Some(v) = &q.tenant_id {
            query = query.bind(v.as_str());
        }
        if let Some(v) = &q.encryption_id {
            query = query.bind(v.as_str());
        }
        if let Some(v) = &q.operation {
            query = query.bind(v.as_str());
        }
        if let Some(v) = q.before_id {
            query = query.bind(v);
        }
        query = query.bind(q.limit);
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("record")?)))
            .collect()
    }
}
