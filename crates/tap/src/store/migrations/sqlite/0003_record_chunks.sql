-- The record index packed into chunks (store/record_index.rs, docs/architecture.md "Write
-- volume"): one row per sorted run of a collection's entries, keyed by its first rkey,
-- instead of one row per record. A rowid table, so a chunk (at most ~3.5 KB of text) stays
-- within one page; the unique index finds a key's chunk and orders the runs.
CREATE TABLE record_chunks (
    did        TEXT    NOT NULL,
    collection TEXT    NOT NULL CHECK (collection <> ''),
    first_rkey TEXT    NOT NULL CHECK (first_rkey <> ''),
    n          INTEGER NOT NULL CHECK (n > 0),
    entries    TEXT    NOT NULL
);
CREATE UNIQUE INDEX record_chunks_key ON record_chunks (did, collection, first_rkey);

-- Existing rows become one-entry chunks ("rkey SP cid LF"): correct if not compact; a later
-- write into a chunk's range repacks that chunk, a resync repacks what it rewrites.
INSERT INTO record_chunks (did, collection, first_rkey, n, entries)
    SELECT did, collection, rkey, 1, rkey || ' ' || cid || char(10) FROM repo_records;
DROP TABLE repo_records;
