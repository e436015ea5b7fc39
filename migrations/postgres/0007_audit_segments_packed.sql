-- Audit segments stored compressed by Keyward: `packed` holds the segment's
-- lines as one zstd frame (with its unpacked size), and `records` is then
-- empty. zstd makes them about 8 times smaller where the column's LZ4
-- (migration 0006) made them about 4 times, and the work moves from the
-- database server to the writer. EXTERNAL: TOAST stores the frame out of line
-- without trying to compress it again. Segments written before this migration
-- keep their text in `records` and have no `packed`.
ALTER TABLE audit_segments ADD COLUMN packed BYTEA;
ALTER TABLE audit_segments ALTER COLUMN packed SET STORAGE EXTERNAL;
