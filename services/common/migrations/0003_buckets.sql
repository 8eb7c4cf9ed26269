-- depends: 0002_registry_events
-- Time-bucketed occupancy written by the worker's rollups, read by history and city aggregates.
-- level 'lot' keys by lot id, 'district' by district name, 'city' by 'city'.

CREATE TABLE occupancy_buckets (
    level         text NOT NULL CHECK (level IN ('lot', 'district', 'city')),
    key           text NOT NULL,
    interval      text NOT NULL CHECK (interval IN ('1m', '15m', '1h')),
    bucket        timestamptz NOT NULL,
    occupied_avg  double precision NOT NULL,
    occupied_max  integer NOT NULL,
    capacity      integer NOT NULL,
    entries       integer NOT NULL DEFAULT 0,
    exits         integer NOT NULL DEFAULT 0,
    computed_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (level, key, interval, bucket)
);
CREATE INDEX occupancy_buckets_interval_bucket ON occupancy_buckets (interval, bucket);
