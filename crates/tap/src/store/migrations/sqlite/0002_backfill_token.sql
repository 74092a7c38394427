-- A first backfill may deliver its historical events from memory instead of storing each in
-- the outbox (docs/architecture.md, "Write volume"). While any of them may be unacked, the
-- repo carries a token (the first id of the latest such write); a start-up finding one left
-- over re-runs that backfill from scratch, so a crash loses no event.
ALTER TABLE repos ADD COLUMN backfill_token INTEGER;
