-- depends: 0001_foundation
-- The lot registry, the live occupancy derived from events, and the raw event log.

CREATE TABLE lots (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    operator_id    uuid NOT NULL REFERENCES operators (id),
    name           text NOT NULL,
    district       text NOT NULL,
    address        text,
    lat            double precision NOT NULL CHECK (lat BETWEEN -90 AND 90),
    lon            double precision NOT NULL CHECK (lon BETWEEN -180 AND 180),
    opening_hours  text NOT NULL DEFAULT '24/7',
    timezone       text NOT NULL DEFAULT 'Asia/Shanghai',
    counting       text NOT NULL CHECK (counting IN ('spaces', 'gates')),
    capacity       jsonb NOT NULL,              -- {"standard": 300, "ev": 20}
    reservable     jsonb NOT NULL DEFAULT '{}', -- {"standard": 10}
    tariff         jsonb NOT NULL,              -- {"currency", "per_hour", "free_minutes", "daily_max"}
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    deleted_at     timestamptz
);
CREATE INDEX lots_operator ON lots (operator_id) WHERE deleted_at IS NULL;
CREATE INDEX lots_district ON lots (district) WHERE deleted_at IS NULL;

-- Per-space sensor state of lots counted by space. A state moves only forward in observed time
-- (observed_at, then event_id to break ties), so replays and reordering cannot corrupt it.
CREATE TABLE spaces (
    lot_id       uuid NOT NULL REFERENCES lots (id) ON DELETE CASCADE,
    space_id     text NOT NULL,
    space_type   text NOT NULL,
    occupied     boolean NOT NULL DEFAULT false,
    observed_at  timestamptz,
    event_id     text,
    PRIMARY KEY (lot_id, space_id)
);

-- Live occupancy per lot and space type. For gate-counted lots:
-- occupied = clamp(snapshot_occupied + gate_delta, 0, capacity), where gate_delta sums the
-- entries (+1) and exits (-1) observed after snapshot_at, so it is independent of arrival order.
CREATE TABLE lot_occupancy (
    lot_id             uuid NOT NULL REFERENCES lots (id) ON DELETE CASCADE,
    space_type         text NOT NULL,
    capacity           integer NOT NULL CHECK (capacity >= 0),
    occupied           integer NOT NULL DEFAULT 0,
    snapshot_occupied  integer NOT NULL DEFAULT 0,
    snapshot_at        timestamptz,
    gate_delta         integer NOT NULL DEFAULT 0,
    PRIMARY KEY (lot_id, space_type),
    CHECK (occupied BETWEEN 0 AND capacity)
);

-- One row per lot: the version orders live-state writes to Redis (a write with an older version
-- than Redis holds is ignored), updated_at is the observed time of the latest accepted event.
CREATE TABLE lot_live (
    lot_id      uuid PRIMARY KEY REFERENCES lots (id) ON DELETE CASCADE,
    version     bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz
);

-- Idempotency of events by (operator, event id), across all time partitions of the log.
CREATE TABLE event_ids (
    operator_id  uuid NOT NULL,
    event_id     text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (operator_id, event_id)
);
CREATE INDEX event_ids_received ON event_ids (received_at);

-- The raw event log, partitioned by observed day so retention drops whole partitions.
CREATE TABLE events (
    operator_id  uuid NOT NULL,
    event_id     text NOT NULL,
    lot_id       uuid NOT NULL,
    type         text NOT NULL CHECK (type IN ('space', 'entry', 'exit', 'count')),
    space_id     text,
    space_type   text,
    occupied     boolean,
    counts       jsonb,
    plate_hash   bytea,
    observed_at  timestamptz NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    stale        boolean NOT NULL DEFAULT false
) PARTITION BY RANGE (observed_at);
CREATE INDEX events_lot_observed ON events (lot_id, observed_at);
CREATE TABLE events_default PARTITION OF events DEFAULT;

-- Create the daily partitions of the event log for [first_day, first_day + days).
CREATE FUNCTION ensure_event_partitions(first_day date, days integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    created integer := 0;
    day date;
    name text;
BEGIN
    FOR i IN 0 .. days - 1 LOOP
        day := first_day + i;
        name := format('events_%s', to_char(day, 'YYYYMMDD'));
        IF to_regclass(name) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%L) TO (%L)',
                name, day::timestamptz, (day + 1)::timestamptz);
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END;
$$;

DO $$ BEGIN PERFORM ensure_event_partitions(current_date, 8); END $$;
