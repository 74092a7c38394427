-- A compact per-minute history for the status page's charts (issue 14): one row per minute
-- tap ran, counters as deltas over span_ms, kept 7 days, so a restart does not blank it.
CREATE TABLE status_minutes (
    minute    INTEGER NOT NULL PRIMARY KEY,
    span_ms   INTEGER NOT NULL,
    events    INTEGER NOT NULL,
    delivered INTEGER NOT NULL,
    bytes     INTEGER NOT NULL,
    records   INTEGER NOT NULL,
    lag_ms    INTEGER NOT NULL
);
