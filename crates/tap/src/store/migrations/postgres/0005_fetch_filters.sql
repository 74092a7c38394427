-- The collection filters a repo's last fetch was made under (issue 12): an unchanged head
-- skips the download only when the filters are the same too, so widened filters re-fetch.
ALTER TABLE repos ADD COLUMN fetch_filters TEXT NOT NULL DEFAULT '';
