-- How tap last fetched each repo (issue 12, the byte ledger): `full` (getRepo), `sparse`
-- (commit, wanted MST paths and records through getBlocks) or `skipped` (the PDS's head
-- was the commit tap already held), the bytes it downloaded, and when (unix seconds).
ALTER TABLE repos ADD COLUMN fetch_kind TEXT NOT NULL DEFAULT '';
ALTER TABLE repos ADD COLUMN fetch_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE repos ADD COLUMN fetched_at INTEGER NOT NULL DEFAULT 0;
