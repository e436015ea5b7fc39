-- Audit retention (setting `audit_retention`) deletes whole segments whose
-- newest record is older than the retention, oldest first, a bounded batch per
-- transaction: `audit_segments_by_time` (last_ms) finds them, and this index
-- finds their rows in `audit_segment_keys`, whose primary key starts with
-- (kind, value) and would otherwise be scanned whole for every batch.
CREATE INDEX audit_segment_keys_by_segment ON audit_segment_keys (segment_id);
