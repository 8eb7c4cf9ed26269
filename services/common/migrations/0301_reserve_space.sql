-- depends: 0300_reservations_lifecycle
-- reserve_space: the capacity-checked insert of a reservation, with its idempotency key, in one
-- call (one round trip, one transaction). Prices, windows and opening hours are checked before
-- it, in Python (services/reservations/booking.py); what must not race happens here:
--
-- 1. claim the key: a concurrent call with the same key waits on the INSERT until the first
--    commits, then finds the row and replays the stored answer;
-- 2. lock the driver, then the lot's space type (transaction-scoped advisory locks; always in
--    this order, so no cycle);
-- 3. with the locks held (each statement of a VOLATILE function takes a fresh snapshot, so it
--    sees every booking committed before the locks were granted) measure the peak of confirmed
--    reservations over [start, end) by a sweep over their clipped starts (+1) and ends (-1),
--    ends first at equal instants, and the driver's confirmed reservations;
-- 4. insert if the peak stays within the quota and the driver under the cap; store the answer.

CREATE FUNCTION reserve_space(
    p_driver uuid, p_key text, p_request_hash bytea, p_driver_lock bigint, p_quota_lock bigint,
    p_id uuid, p_lot uuid, p_space_type text, p_start timestamptz, p_end timestamptz,
    p_plate_hash bytea, p_price numeric, p_currency text, p_created_at timestamptz,
    p_max_open integer, p_created jsonb, p_no_capacity jsonb, p_limit jsonb
) RETURNS TABLE (status integer, response jsonb, request_hash bytea, replayed boolean)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_quota integer;
    v_peak integer;
    v_open integer;
    v_status integer;
    v_response jsonb;
BEGIN
    INSERT INTO idempotency_keys AS k (driver_id, key, request_hash)
    VALUES (p_driver, p_key, p_request_hash)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN QUERY
            SELECT k.status, k.response, k.request_hash, true FROM idempotency_keys k
            WHERE k.driver_id = p_driver AND k.key = p_key;
        RETURN;
    END IF;

    PERFORM pg_advisory_xact_lock(p_driver_lock);
    PERFORM pg_advisory_xact_lock(p_quota_lock);

    SELECT coalesce((l.reservable ->> p_space_type)::integer, 0) INTO v_quota
    FROM lots l WHERE l.id = p_lot AND l.deleted_at IS NULL;

    WITH overlapping AS (
        SELECT greatest(r.starts_at, p_start) AS s, least(r.ends_at, p_end) AS e
        FROM reservations r
        WHERE r.lot_id = p_lot AND r.space_type = p_space_type AND r.status = 'confirmed'
          AND r.starts_at < p_end AND r.ends_at > p_start
    ), edges AS (
        SELECT s AS at, 1 AS delta FROM overlapping
        UNION ALL
        SELECT e AS at, -1 AS delta FROM overlapping
    ), running AS (
        SELECT sum(delta) OVER (ORDER BY at, delta ROWS UNBOUNDED PRECEDING) AS n FROM edges
    )
    SELECT coalesce(max(n), 0) INTO v_peak FROM running;

    SELECT count(*) INTO v_open FROM reservations r
    WHERE r.driver_id = p_driver AND r.status = 'confirmed';

    IF v_peak + 1 > coalesce(v_quota, 0) THEN
        v_status := 409;
        v_response := p_no_capacity;
    ELSIF v_open >= p_max_open THEN
        v_status := 409;
        v_response := p_limit;
    ELSE
        INSERT INTO reservations (id, driver_id, lot_id, space_type, starts_at, ends_at,
                                  plate_hash, price_amount, price_currency, created_at)
        VALUES (p_id, p_driver, p_lot, p_space_type, p_start, p_end,
                p_plate_hash, p_price, p_currency, p_created_at);
        v_status := 201;
        v_response := p_created;
    END IF;

    UPDATE idempotency_keys k SET status = v_status, response = v_response
    WHERE k.driver_id = p_driver AND k.key = p_key;
    RETURN QUERY SELECT v_status, v_response, p_request_hash, false;
END;
$$;
