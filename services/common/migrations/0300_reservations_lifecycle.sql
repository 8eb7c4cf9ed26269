-- depends: 0004_reservations
-- Indexes for the reservation lifecycle's hot paths, and constraints PostgreSQL can enforce.
-- Capacity itself is not a constraint here: it is checked under a per (lot, space type) advisory
-- lock inside the reserving transaction (services/reservations/repository.py).

-- The worker's no-show sweep: confirmed reservations by start.
CREATE INDEX reservations_confirmed_start ON reservations (starts_at) WHERE status = 'confirmed';

-- The per-driver cap on open (confirmed) reservations.
CREATE INDEX reservations_driver_confirmed ON reservations (driver_id) WHERE status = 'confirmed';

ALTER TABLE reservations
    ADD CONSTRAINT reservations_space_type
        CHECK (space_type IN ('standard', 'ev', 'accessible', 'motorcycle')),
    ADD CONSTRAINT reservations_price_amount CHECK (price_amount >= 0);

ALTER TABLE idempotency_keys
    ADD CONSTRAINT idempotency_key_length CHECK (length(key) BETWEEN 1 AND 255);
