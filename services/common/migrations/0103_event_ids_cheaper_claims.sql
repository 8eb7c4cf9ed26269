-- depends: 0102_ingest_events_function
-- Claiming event ids is the largest write of an event batch (one row per event). Make it cheaper
-- without weakening it (the table stays logged, the key unique):
-- - the key's text compares byte-wise (COLLATE "C": memcmp and abbreviated keys instead of the
--   locale's strcoll); equality, hence uniqueness, is the same under any deterministic collation,
--   and nothing sorts by event id for display;
-- - retention deletes by received_at once a day: a BRIN index (a few pages, rows arrive in
--   received_at order) serves that range scan instead of a B-tree written once per event.

ALTER TABLE event_ids ALTER COLUMN event_id TYPE text COLLATE "C";
DROP INDEX event_ids_received;
CREATE INDEX event_ids_received ON event_ids USING brin (received_at) WITH (autosummarize = on);
