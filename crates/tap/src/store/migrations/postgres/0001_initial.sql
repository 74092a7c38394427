-- Initial schema (Postgres). Applied once, inside a transaction, by store::postgres.
-- Keys use COLLATE "C" so ORDER BY is byte order (the MST key order) whatever the database's
-- locale; records_page depends on it.

CREATE TABLE repos (
    did         TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    state       TEXT   NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'resyncing', 'active', 'desynchronized', 'error')),
    status      TEXT   NOT NULL DEFAULT 'active'
                CHECK (status IN ('active', 'takendown', 'suspended', 'deactivated')),
    handle      TEXT,
    rev         TEXT,
    prev_data   TEXT,
    error_msg   TEXT   NOT NULL DEFAULT '',
    retry_count BIGINT NOT NULL DEFAULT 0,
    retry_after BIGINT NOT NULL DEFAULT 0
);

-- Resync claims: one index range per state, earliest retry_after first.
CREATE INDEX repos_state_retry ON repos (state, retry_after);

-- Record index (no bodies): what the resync diff compares a snapshot against.
CREATE TABLE repo_records (
    did        TEXT COLLATE "C" NOT NULL,
    collection TEXT COLLATE "C" NOT NULL CHECK (collection <> ''),
    rkey       TEXT COLLATE "C" NOT NULL CHECK (rkey <> ''),
    cid        TEXT NOT NULL,
    PRIMARY KEY (did, collection, rkey)
);

-- Durable event queue, append-only by id, no secondary indexes (hot table).
-- Ids come from this sequence, which never goes back: ids grow for the life of the database.
CREATE SEQUENCE outbox_id_seq AS BIGINT;
CREATE TABLE outbox (
    id      BIGINT  NOT NULL PRIMARY KEY DEFAULT nextval('outbox_id_seq'),
    did     TEXT    NOT NULL,
    live    BOOLEAN NOT NULL,
    payload TEXT    NOT NULL
);
ALTER SEQUENCE outbox_id_seq OWNED BY outbox.id;

-- Live commits that arrived while their repo was resyncing, in arrival order.
CREATE TABLE resync_buffer (
    id   BIGSERIAL NOT NULL PRIMARY KEY,
    did  TEXT COLLATE "C" NOT NULL,
    rev  TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX resync_buffer_did ON resync_buffer (did, id);

CREATE TABLE firehose_cursors (
    url    TEXT   NOT NULL PRIMARY KEY,
    cursor BIGINT NOT NULL
);

CREATE TABLE list_repos_cursors (
    url    TEXT NOT NULL PRIMARY KEY,
    cursor TEXT NOT NULL
);

CREATE TABLE collection_cursors (
    url        TEXT NOT NULL,
    collection TEXT NOT NULL,
    cursor     TEXT NOT NULL,
    PRIMARY KEY (url, collection)
);
