-- Audit segments stored compressed: `packed` holds the segment's lines as one
-- zstd frame (with its unpacked size), and `records` is then empty. The lines
-- are about 8 times smaller, and SQLite writes every byte twice (WAL, then
-- checkpoint). Segments written before this migration keep their text in
-- `records` and have no `packed`.
ALTER TABLE audit_segments ADD COLUMN packed BLOB;
