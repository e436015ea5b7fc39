-- Audit segments are 100 KB to 500 KB of JSON lines, so PostgreSQL compresses
-- them into TOAST, by default with pglz: about 6 ms per 1,000 records, on the
-- database server's CPU, for every segment the audit writer inserts (measured
-- on PostgreSQL 15: pglz 6.2 ms, LZ4 1.7 ms, no compression 2.3 ms with four
-- times the size). LZ4 (PostgreSQL 14 and later, built with lz4, as the
-- common packages are) compresses as well at a quarter of the cost. Where the
-- server has no LZ4, the segments are stored uncompressed rather than paying
-- for pglz. Only new rows are affected; both read back the same.
DO $$
BEGIN
    ALTER TABLE audit_segments ALTER COLUMN records SET COMPRESSION lz4;
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'audit_segments.records: LZ4 unavailable (%), stored uncompressed', SQLERRM;
    ALTER TABLE audit_segments ALTER COLUMN records SET STORAGE EXTERNAL;
END
$$;
