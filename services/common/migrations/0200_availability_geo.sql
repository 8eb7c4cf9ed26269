-- depends: 0004_reservations
-- Nearby search in PostgreSQL (when Redis cannot answer): a bounding box on the lots' positions,
-- served by a GiST index on point(lon, lat), then exact haversine distances.

CREATE INDEX lots_position ON lots USING gist (point(lon, lat)) WHERE deleted_at IS NULL;
