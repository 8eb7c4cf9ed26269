-- depends: 0004_reservations
-- Every accepted event updates a space, and every batch its lots' occupancy and live rows:
-- leave room on each page so those updates stay HOT (no index writes, cheap pruning).

ALTER TABLE spaces SET (fillfactor = 80);
ALTER TABLE lot_occupancy SET (fillfactor = 50);
ALTER TABLE lot_live SET (fillfactor = 50);
