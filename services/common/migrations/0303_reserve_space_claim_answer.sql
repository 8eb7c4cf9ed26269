-- depends: 0302_reservations_peak
-- reserve_space, one write fewer: the key is claimed with the answer a booking usually gets
-- (201 and its body) and rewritten only when the booking is refused. Nobody sees the claimed
-- answer before the transaction ends: a concurrent duplicate waits on the claim until commit.

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
    INSERT INTO idempotency_keys AS k (driver_id, key, request_hash, status, response)
    VALUES (p_driver, p_key, p_request_hash, 201, p_created)
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
        RETURN QUERY SELECT 201, p_created, p_request_hash, false;
        RETURN;
    END IF;

    UPDATE idempotency_keys k SET status = v_status, response = v_response
    WHERE k.driver_id = p_driver AND k.key = p_key;
    RETURN QUERY SELECT v_status, v_response, p_request_hash, false;
END;
$$;
