-- depends: 0301_reserve_space
-- One definition of the capacity sweep, used by reserve_space and by quotes:
-- reservations_peak(lot, type, start, end) is the most confirmed reservations of the lot and
-- type at one instant of [start, end): a sweep over the starts (+1) and ends (-1) of the
-- confirmed windows overlapping it, clipped to it, ends first at equal instants (a window
-- ending when another starts does not overlap it). Windows are exact: no time buckets.

CREATE FUNCTION reservations_peak(
    p_lot uuid, p_space_type text, p_start timestamptz, p_end timestamptz
) RETURNS integer
LANGUAGE sql STABLE AS $$
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
    SELECT coalesce(max(n), 0)::integer FROM running
$$;

CREATE OR REPLACE FUNCTION reserve_space(
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

    v_peak := reservations_peak(p_lot, p_space_type, p_start, p_end);

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
