-- depends: 0003_buckets
-- Drivers, reservations and idempotency keys. A reservation is `confirmed` until the car
-- arrives (`active`), leaves (`completed`), never comes (`no_show`) or it is `cancelled`.

CREATE TABLE drivers (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email          text NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
    password_hash  text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX drivers_email ON drivers (lower(email));

CREATE TABLE reservations (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    driver_id       uuid NOT NULL REFERENCES drivers (id),
    lot_id          uuid NOT NULL REFERENCES lots (id),
    space_type      text NOT NULL,
    starts_at       timestamptz NOT NULL,
    ends_at         timestamptz NOT NULL,
    plate_hash      bytea NOT NULL,
    status          text NOT NULL DEFAULT 'confirmed'
                    CHECK (status IN ('confirmed', 'active', 'completed', 'cancelled', 'no_show')),
    price_amount    numeric(10, 2) NOT NULL,
    price_currency  text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    arrived_at      timestamptz,
    departed_at     timestamptz,
    cancelled_at    timestamptz,
    CHECK (ends_at > starts_at)
);
CREATE INDEX reservations_confirmed_window
    ON reservations (lot_id, space_type, starts_at, ends_at) WHERE status = 'confirmed';
CREATE INDEX reservations_driver ON reservations (driver_id, created_at DESC);
CREATE INDEX reservations_plate ON reservations (lot_id, plate_hash) WHERE status IN ('confirmed', 'active');

CREATE TABLE idempotency_keys (
    driver_id     uuid NOT NULL REFERENCES drivers (id),
    key           text NOT NULL,
    request_hash  bytea NOT NULL,
    status        integer,
    response      jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (driver_id, key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
