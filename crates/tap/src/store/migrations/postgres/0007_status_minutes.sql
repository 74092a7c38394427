-- A compact per-minute history for the status page's charts (issue 14): one row per minute
-- tap ran, counters as deltas over span_ms, kept 7 days, so a restart does not blank it.
CREATE TABLE status_minutes (
    minute    BIGINT NOT NULL PRIMARY KEY,
    span_ms   BIGINT NOT NULL,
    events    BIGINT NOT NULL,
    delivered BIGINT NOT NULL,
    bytes     BIGINT NOT NULL,
    records   BIGINT NOT NULL,
    lag_ms    BIGINT NOT NULL
);
