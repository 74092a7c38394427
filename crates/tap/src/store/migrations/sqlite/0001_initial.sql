-- Initial schema (SQLite). Applied once, inside a transaction, by store::sqlite.
-- Text compares bytewise (BINARY collation), so (collection, rkey) order is MST key order.

-- Tracked repos. WITHOUT ROWID: the DID is the only key, so one B-tree instead of two.
CREATE TABLE repos (
    did         TEXT    NOT NULL PRIMARY KEY,
    state       TEXT    NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'resyncing', 'active', 'desynchronized', 'error')),
    status      TEXT    NOT NULL DEFAULT 'active'
                CHECK (status IN ('active', 'takendown', 'suspended', 'deactivated')),
    handle      TEXT,
    rev         TEXT,
    prev_data   TEXT,
    error_msg   TEXT    NOT NULL DEFAULT '',
    retry_count INTEGER NOT NULL DEFAULT 0,
    retry_after INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- Resync claims: one index range per state, earliest retry_after first.
CREATE INDEX repos_state_retry ON repos (state, retry_after);

-- Record index (no bodies): what the resync diff compares a snapshot against.
CREATE TABLE repo_records (
    did        TEXT NOT NULL,
    collection TEXT NOT NULL CHECK (collection <> ''),
    rkey       TEXT NOT NULL CHECK (rkey <> ''),
    cid        TEXT NOT NULL,
    PRIMARY KEY (did, collection, rkey)
) WITHOUT ROWID;

-- Durable event queue. Append-only by id and deliberately without secondary indexes: a
-- random-key index on this hot table costs ~10x in write throughput.
-- AUTOINCREMENT: sqlite_sequence never hands out an id again, even after every row was
-- deleted, so ids grow for the life of the database.
CREATE TABLE outbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    did     TEXT    NOT NULL,
    live    INTEGER NOT NULL,
    payload TEXT    NOT NULL
);

-- Live commits that arrived while their repo was resyncing, in arrival order.
CREATE TABLE resync_buffer (
    id   INTEGER PRIMARY KEY AUTOINCREMENT,
    did  TEXT NOT NULL,
    rev  TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX resync_buffer_did ON resync_buffer (did, id);

CREATE TABLE firehose_cursors (
    url    TEXT    NOT NULL PRIMARY KEY,
    cursor INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE list_repos_cursors (
    url    TEXT NOT NULL PRIMARY KEY,
    cursor TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE collection_cursors (
    url        TEXT NOT NULL,
    collection TEXT NOT NULL,
    cursor     TEXT NOT NULL,
    PRIMARY KEY (url, collection)
) WITHOUT ROWID;
