-- depends: 0303_reserve_space_claim_answer
-- A booking in one statement, and the capacity sweep with a cached plan.
--
-- 1. reservations_peak becomes PL/pgSQL (same signature, same sweep): a LANGUAGE sql function
--    that cannot be inlined is parsed and planned again in every transaction that calls it,
--    which was about a third of a booking's CPU in PostgreSQL; PL/pgSQL keeps the plan for the
--    session. reserve_space (0303) and quotes call it unchanged.
--
-- 2. reserve_space_checked: reserve_space, plus the lot's registry fields the caller priced and
--    checked the window against (opening hours, time zone, the tariff's text). With the locks
--    held it compares them with the lot's row; if the lot changed or is gone since the caller
--    read them, it raises SQLSTATE PR409 and the whole statement (the key's claim too) rolls
--    back: the caller reads the lot again and retries. So the service may keep lots' registry
--    entries in memory and book in one round trip, and a price is never from a stale tariff.
--    reserve_space stays for the previous release during a rolling update.

CREATE OR REPLACE FUNCTION reservations_peak(
    p_lot uuid, p_space_type text, p_start timestamptz, p_end timestamptz
) RETURNS integer
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (
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
    );
END;
$$;

CREATE FUNCTION reserve_space_checked(
    p_driver uuid, p_key text, p_request_hash bytea, p_driver_lock bigint, p_quota_lock bigint,
    p_id uuid, p_lot uuid, p_space_type text, p_start timestamptz, p_end timestamptz,
    p_plate_hash bytea, p_price numeric, p_currency text, p_created_at timestamptz,
    p_max_open integer, p_created jsonb, p_no_capacity jsonb, p_limit jsonb,
    p_opening_hours text, p_timezone text, p_tariff text
) RETURNS TABLE (status integer, response jsonb, request_hash bytea, replayed boolean)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_quota integer;
    v_current boolean;
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

    SELECT coalesce((l.reservable ->> p_space_type)::integer, 0),
           l.opening_hours = p_opening_hours AND l.timezone = p_timezone
           AND l.tariff = p_tariff::jsonb
    INTO v_quota, v_current
    FROM lots l WHERE l.id = p_lot AND l.deleted_at IS NULL;
    IF v_current IS NOT TRUE THEN
        RAISE EXCEPTION 'lot % changed since it was read', p_lot USING ERRCODE = 'PR409';
    END IF;

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
