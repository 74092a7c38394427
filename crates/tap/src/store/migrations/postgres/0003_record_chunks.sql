-- The record index packed into chunks (store/record_index.rs, docs/architecture.md "Write
-- volume"): one row per sorted run of a collection's entries, keyed by its first rkey,
-- instead of one row per record. Keys are COLLATE "C" (byte order, as the MST and the
-- chunk text are ordered).
CREATE TABLE record_chunks (
    did        TEXT COLLATE "C" NOT NULL,
    collection TEXT COLLATE "C" NOT NULL CHECK (collection <> ''),
    first_rkey TEXT COLLATE "C" NOT NULL CHECK (first_rkey <> ''),
    n          BIGINT NOT NULL CHECK (n > 0),
    entries    TEXT   NOT NULL,
    PRIMARY KEY (did, collection, first_rkey)
);

-- Existing rows become one-entry chunks ("rkey SP cid LF"): correct if not compact; a later
-- write into a chunk's range repacks that chunk, a resync repacks what it rewrites.
INSERT INTO record_chunks (did, collection, first_rkey, n, entries)
    SELECT did, collection, rkey, 1, rkey || ' ' || cid || E'\n' FROM repo_records;
DROP TABLE repo_records;
