-- depends: 0004_reservations
-- The worker's own state: rollup progress, webhook subscriptions and their delivery log, and
-- the last lot status each subscription was told about.

-- Progress of the periodic rollup: the last complete minute written for every lot, and the
-- received_at high-water mark up to which late events have been folded into their buckets.
CREATE TABLE rollup_state (
    name         text PRIMARY KEY,
    last_minute  timestamptz,
    high_water   timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- Late events are found by when they arrived, across every time partition of the log.
CREATE INDEX events_received ON events (received_at);
-- Rollups read every lot's events of a time range; events arrive roughly in observed order, so
-- a BRIN index finds a range's blocks for almost no write cost.
CREATE INDEX events_observed_brin ON events USING brin (observed_at);

CREATE TABLE city_subscriptions (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    city_client_id  uuid NOT NULL REFERENCES city_clients (id),
    url             text NOT NULL CHECK (url ~ '^https?://'),
    events          text[] NOT NULL
                    CHECK (events <@ ARRAY['lot.full', 'lot.available', 'district.snapshot']
                           AND cardinality(events) > 0),
    -- kept as given: the worker needs it to sign deliveries (HMAC), so it cannot be hashed
    secret          text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz
);
CREATE INDEX city_subscriptions_client ON city_subscriptions (city_client_id)
    WHERE deleted_at IS NULL;

-- One row per (subscription, notification): attempts, last answer and when to try next.
CREATE TABLE webhook_deliveries (
    id               bigserial PRIMARY KEY,
    subscription_id  uuid NOT NULL REFERENCES city_subscriptions (id) ON DELETE CASCADE,
    event            text NOT NULL,
    dedupe_key       text NOT NULL,
    payload          jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    last_status_code integer,
    last_error       text,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    created_at       timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    UNIQUE (subscription_id, dedupe_key)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_created ON webhook_deliveries (created_at);

-- The full/available status of each lot as last notified; a change enqueues deliveries.
CREATE TABLE lot_notify_state (
    lot_id      uuid PRIMARY KEY REFERENCES lots (id) ON DELETE CASCADE,
    status      text NOT NULL CHECK (status IN ('full', 'available')),
    changes     bigint NOT NULL DEFAULT 0,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
