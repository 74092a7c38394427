-- Settings changed at runtime through the API (issue 14): the collection filters and signal
-- collections, each stored as JSON `{"seed": [...], "current": [...]}` — the flag value that
-- seeded it and the value in force — so a restart keeps runtime changes unless the flag
-- itself changed.
CREATE TABLE settings (
    name  TEXT NOT NULL PRIMARY KEY,
    value TEXT NOT NULL
);
