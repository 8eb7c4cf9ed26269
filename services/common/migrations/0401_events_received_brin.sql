-- depends: 0400_city_worker
-- Late events are found by when they arrived: received_at is the time the batch's transaction
-- started, so rows lie in the log nearly in its order, and a BRIN index finds a time range's
-- blocks as well as the B-tree did, without an index entry written per event.
DROP INDEX events_received;
CREATE INDEX events_received ON events USING brin (received_at) WITH (autosummarize = on);
