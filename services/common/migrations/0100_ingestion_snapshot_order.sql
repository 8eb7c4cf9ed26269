-- depends: 0004_reservations
-- Count snapshots are ordered like space states, by (observed_at, event_id), so two snapshots
-- observed at the same instant resolve the same way whatever order they arrive in.

ALTER TABLE lot_occupancy ADD COLUMN snapshot_event_id text;
