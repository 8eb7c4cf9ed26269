-- depends: 0107_ingest_events_plain_claims
-- ingest_events, sixth version, the same answers for less work per event: each event row is
-- built once. The array is read in one pass that probes each space event's row by key and
-- decides, beside why an event cannot apply, whether it is stale against the state the batch
-- started from; that pass is the only set the statement materializes. Before, the events were
-- materialized four times (the array, the checks, the candidates sorted for in-batch duplicates,
-- the fresh ones), and the spaces once more, hashed.
-- A repeated id within the batch now fails the claims on the key like a replay does, and the
-- caller's p_check run, which leaves out the ids claimed before, also keeps only each id's first
-- valid occurrence (the caller passes p_check at once when it sees a repeated id).
-- (0104 describes the function.)

DROP FUNCTION ingest_events(uuid, uuid[], json, integer[], timestamptz, boolean);

-- Is a count observed at p_at (id p_id) newer than a type's snapshot? Ordered like space states,
-- by (observed_at, event id).
CREATE FUNCTION ingest_count_newer(
    p_at timestamptz, p_id text, p_snapshot_at timestamptz, p_snapshot_id text
) RETURNS boolean LANGUAGE sql IMMUTABLE
RETURN p_snapshot_at IS NULL OR p_at > p_snapshot_at
    OR (p_at = p_snapshot_at AND p_id COLLATE "C" > coalesce(p_snapshot_id, '') COLLATE "C");

CREATE FUNCTION ingest_events(
    p_operator uuid, p_lots uuid[], p_events json, p_index integer[], p_horizon timestamptz,
    p_check boolean
)
RETURNS TABLE (lot_id text, version bigint, updated_at timestamptz, district text, counts text)
LANGUAGE plpgsql VOLATILE
-- the statements below are written for one plan whatever the batch (probes by key, hashes of
-- the batch's own rows); planning them afresh per call would cost more than running them
SET plan_cache_mode = force_generic_plan
-- and each table by its keys, whatever its size (see 0107)
SET enable_seqscan = off
AS $$
BEGIN
    -- Every writer of a lot's counts first locks its lot_live row, in lot id order.
    -- Each lot is reached by its key (a scalar probe per lot, which no plan turns into a scan of
    -- the operator's lots).
    PERFORM 1 FROM lot_live lv
    WHERE lv.lot_id = ANY(p_lots)
      AND (SELECT l.operator_id FROM lots l WHERE l.id = lv.lot_id) = p_operator
    ORDER BY lv.lot_id FOR NO KEY UPDATE;

    -- A new statement, so a new snapshot: it holds every commit of the lots' earlier lockers.
    -- Tables of any size are reached through the batch's keys, one index probe each (LATERAL,
    -- OFFSET 0: never flattened into a join the planner could hash whole), and rows are
    -- updated by the ctid read here: under the lots' locks no one else writes them.
    RETURN QUERY
    WITH lot AS MATERIALIZED (
        SELECT l.id, l.counting, l.district, l.tid
        FROM unnest(p_lots) AS k(id)
        CROSS JOIN LATERAL (
            -- by the key alone: with the owner and deletion in this WHERE, a generic plan may
            -- scan the partial position index whole for every lot instead
            SELECT l.id, l.counting, l.district, l.operator_id, l.deleted_at,
                   (SELECT lv.ctid FROM lot_live lv WHERE lv.lot_id = l.id) AS tid
            FROM lots l
            WHERE l.id = k.id
            OFFSET 0) AS l
        WHERE l.operator_id = p_operator AND l.deleted_at IS NULL
    ), typ AS MATERIALIZED (
        SELECT o.lot_id, o.space_type, o.capacity, o.occupied, o.snapshot_occupied,
               o.snapshot_at, o.snapshot_event_id, o.gate_delta, o.tid
        FROM lot
        CROSS JOIN LATERAL (
            SELECT o.*, o.ctid AS tid FROM lot_occupancy o WHERE o.lot_id = lot.id OFFSET 0
        ) AS o
    ), chk AS MATERIALIZED (
        -- every event, in one pass over the array: the state it applies to (its space's row,
        -- probed by key), why it cannot apply (NULL: it can), and whether it is stale against
        -- the state the batch started from; `ok` is a column of its own for the planner's sake:
        -- filtering on it, it guesses that half the rows pass, not next to none
        SELECT c.*, c.problem IS NULL AS ok FROM (
        SELECT coalesce(p_index[x.n], x.n::integer - 1) AS idx, x.id, x.lot_id, x.type,
               x.space_id, g.gate_type, x.occupied, x.observed_at,
               decode(x.plate_hash, 'hex') AS plate_hash,
               sp.space_type AS sp_type, sp.occupied AS sp_occ, sp.tid AS sp_tid,
               CASE
                   WHEN x.observed_at > p_horizon THEN 'observed-in-future'
                   WHEN lot.id IS NULL THEN 'unknown-lot'
                   WHEN x.type = 'space' THEN
                       CASE WHEN lot.counting <> 'spaces' THEN 'wrong-lot-kind:gates'
                            WHEN sp.tid IS NULL THEN 'unknown-space' END
                   WHEN lot.counting <> 'gates' THEN 'wrong-lot-kind:spaces'
                   WHEN x.type = 'count' THEN (
                       SELECT 'unknown-space-type:' || string_agg(k.t, ', ' ORDER BY k.t COLLATE "C")
                       FROM json_object_keys(x.occupied) AS k(t)
                       WHERE NOT EXISTS (SELECT 1 FROM typ
                                         WHERE typ.lot_id = x.lot_id AND typ.space_type = k.t))
                   WHEN gt.lot_id IS NULL THEN 'unknown-space-type:' || g.gate_type
               END AS problem,
               CASE x.type
                   WHEN 'space' THEN sp.observed_at IS NOT NULL AND (x.observed_at < sp.observed_at
                       OR (x.observed_at = sp.observed_at
                           AND x.id COLLATE "C" <= coalesce(sp.event_id, '') COLLATE "C"))
                   WHEN 'count' THEN NOT EXISTS (
                       -- a count is fresh when it is newer than the snapshot of one of its types
                       SELECT 1 FROM json_object_keys(x.occupied) AS k(t)
                       JOIN typ t ON t.lot_id = x.lot_id AND t.space_type = k.t
                       WHERE ingest_count_newer(x.observed_at, x.id, t.snapshot_at,
                                                t.snapshot_event_id))
                   ELSE gt.snapshot_at IS NOT NULL AND x.observed_at <= gt.snapshot_at
               END AS stale,
               x.lot_id = ANY(p_lots) AS locked
        FROM ROWS FROM (json_to_recordset(p_events) AS (
                 id text, lot_id uuid, type text, space_id text, space_type text,
                 occupied json, observed_at timestamptz, plate_hash text))
             WITH ORDINALITY AS x(id, lot_id, type, space_id, space_type, occupied,
                                  observed_at, plate_hash, n)
        CROSS JOIN LATERAL (
            SELECT CASE WHEN x.type IN ('entry', 'exit') THEN coalesce(x.space_type, 'standard')
                   END AS gate_type
        ) AS g
        LEFT JOIN lot ON lot.id = x.lot_id
        LEFT JOIN LATERAL (
            SELECT s.space_type, s.occupied, s.observed_at, s.event_id, s.ctid AS tid
            FROM spaces s
            WHERE x.type = 'space' AND s.lot_id = x.lot_id AND s.space_id = x.space_id
            OFFSET 0
        ) AS sp ON true
        LEFT JOIN typ gt ON gt.lot_id = x.lot_id AND gt.space_type = g.gate_type
        ) AS c
    ), firsts AS (
        -- read only on a replay (p_check): a repeated id within the batch is a duplicate of its
        -- first valid occurrence
        SELECT chk.id, min(chk.idx) AS idx FROM chk WHERE chk.ok GROUP BY chk.id
    ), claimed AS (
        -- in id order, so concurrent batches of one operator wait on each other without deadlock;
        -- an id claimed before, or twice in the batch, fails the statement on the key unless
        -- p_check leaves it out
        INSERT INTO event_ids (operator_id, event_id)
        SELECT p_operator, c.id FROM chk c
        WHERE c.ok
          AND (NOT p_check
               OR ((c.id, c.idx) IN (SELECT firsts.id, firsts.idx FROM firsts)
                   AND NOT EXISTS (SELECT 1 FROM event_ids x
                                   WHERE x.operator_id = p_operator
                                     AND x.event_id = c.id COLLATE "C")))
        ORDER BY c.id COLLATE "C"
        RETURNING event_ids.event_id
    ), cls AS NOT MATERIALIZED (
        -- the fresh events: every valid one, unless on a replay, where only those whose ids this
        -- call claimed
        SELECT c.* FROM chk c
        WHERE c.ok
          AND (NOT p_check
               OR ((c.id, c.idx) IN (SELECT firsts.id, firsts.idx FROM firsts)
                   AND c.id IN (SELECT claimed.event_id FROM claimed)))
    ), cnt AS MATERIALIZED (
        -- the fresh count events per space type, each newer than the type's snapshot or not
        SELECT c.idx, c.id, c.lot_id, c.observed_at, k.t, t.tid, t.capacity,
               least(k.n::integer, t.capacity) AS n,
               ingest_count_newer(c.observed_at, c.id, t.snapshot_at, t.snapshot_event_id)
                   AS newer
        FROM cls c
        CROSS JOIN LATERAL json_each_text(c.occupied) AS k(t, n)
        JOIN typ t ON t.lot_id = c.lot_id AND t.space_type = k.t
        WHERE c.type = 'count'
    ), logged AS (
        INSERT INTO events (operator_id, event_id, lot_id, type, space_id, space_type, occupied,
                            counts, plate_hash, observed_at, stale)
        SELECT p_operator, c.id, c.lot_id, c.type, c.space_id,
               CASE WHEN c.type = 'space' THEN c.sp_type ELSE c.gate_type END,
               CASE WHEN c.type = 'space' THEN c.occupied::text::boolean END,
               CASE WHEN c.type = 'count' THEN c.occupied::jsonb END,
               c.plate_hash, c.observed_at, c.stale
        FROM cls c
    ), newest AS MATERIALIZED (
        -- each space's newest accepted event of the batch, ordered by (observed_at, event_id)
        SELECT DISTINCT ON (c.sp_tid) c.sp_tid, c.lot_id, c.sp_type, c.sp_occ,
               c.occupied::text::boolean AS occ, c.observed_at, c.id
        FROM cls c WHERE c.type = 'space' AND NOT c.stale
        ORDER BY c.sp_tid, c.observed_at DESC, c.id COLLATE "C" DESC
    ), spaces_set AS (
        UPDATE spaces s SET occupied = n.occ, observed_at = n.observed_at, event_id = n.id
        FROM newest n WHERE s.ctid = n.sp_tid
        RETURNING 1
    ), snap AS (
        -- each gate-counted type's newest count of the batch newer than its snapshot
        SELECT DISTINCT ON (cnt.tid) cnt.tid, cnt.lot_id, cnt.t, cnt.observed_at, cnt.id, cnt.n
        FROM cnt WHERE cnt.newer
        ORDER BY cnt.tid, cnt.observed_at DESC, cnt.id COLLATE "C" DESC
    ), upd AS MATERIALIZED (
        -- the new occupancy rows: a space lot moves by its spaces' changes; a gate lot's count
        -- is clamp(snapshot + gate delta), the delta restarting from the log after a new snapshot
        SELECT t.tid, t.lot_id, t.space_type, n.snapshot_occupied, n.snapshot_at,
               n.snapshot_event_id, n.gate_delta,
               CASE WHEN d.delta IS NOT NULL THEN t.occupied + d.delta
                    ELSE greatest(0, least(t.capacity, n.snapshot_occupied + n.gate_delta))
               END AS occupied
        FROM typ t
        LEFT JOIN (SELECT nw.lot_id, nw.sp_type, sum(CASE WHEN nw.occ THEN 1 ELSE -1 END)::integer
                   FROM newest nw WHERE nw.occ <> nw.sp_occ GROUP BY 1, 2) AS d(lot_id, t, delta)
               ON d.lot_id = t.lot_id AND d.t = t.space_type
        LEFT JOIN snap ON snap.tid = t.tid
        LEFT JOIN (SELECT c.lot_id, c.gate_type,
                          sum(CASE c.type WHEN 'entry' THEN 1 ELSE -1 END)::integer
                   FROM cls c WHERE c.type IN ('entry', 'exit') AND NOT c.stale
                   GROUP BY 1, 2) AS g(lot_id, t, delta)
               ON g.lot_id = t.lot_id AND g.t = t.space_type
        CROSS JOIN LATERAL (
            SELECT coalesce(snap.n, t.snapshot_occupied) AS snapshot_occupied,
                   coalesce(snap.observed_at, t.snapshot_at) AS snapshot_at,
                   coalesce(snap.id, t.snapshot_event_id) AS snapshot_event_id,
                   CASE WHEN snap.tid IS NULL THEN t.gate_delta + coalesce(g.delta, 0)
                        ELSE ingest_gate_delta(t.lot_id, t.space_type, snap.observed_at)
                             + (SELECT coalesce(sum(CASE c.type WHEN 'entry' THEN 1 ELSE -1 END), 0)
                                FROM cls c
                                WHERE c.lot_id = t.lot_id AND c.gate_type = t.space_type
                                  AND c.observed_at > snap.observed_at AND NOT c.stale)::integer
                   END AS gate_delta
        ) AS n
        WHERE d.delta <> 0 OR snap.tid IS NOT NULL OR g.delta <> 0
    ), occ_set AS (
        UPDATE lot_occupancy o
        SET occupied = u.occupied, snapshot_occupied = u.snapshot_occupied,
            snapshot_at = u.snapshot_at, snapshot_event_id = u.snapshot_event_id,
            gate_delta = u.gate_delta
        FROM upd u WHERE o.ctid = u.tid
    ), live AS (
        UPDATE lot_live lv SET version = lv.version + 1,
                               updated_at = greatest(lv.updated_at, a.latest)
        FROM (SELECT lot.tid, max(c.observed_at) AS latest
              FROM cls c JOIN lot ON lot.id = c.lot_id
              WHERE NOT c.stale GROUP BY lot.tid) AS a
        WHERE lv.ctid = a.tid
        RETURNING lv.lot_id, lv.version, lv.updated_at
    )
    SELECT NULL::text, NULL::bigint, NULL::timestamptz, NULL::text, json_build_object(
        'rejected', k.rejected, 'duplicate', k.ok - f.fresh, 'stale', f.stale,
        'accepted', f.fresh - f.stale, 'plates', f.plates,
        'spaces_ok', (SELECT count(*) FROM spaces_set) = (SELECT count(*) FROM newest),
        'lots_ok', k.lots_ok
    )::text
    FROM (SELECT coalesce(json_agg(json_build_array(chk.idx, chk.problem) ORDER BY chk.idx)
                              FILTER (WHERE NOT chk.ok), '[]') AS rejected,
                 count(*) FILTER (WHERE chk.ok) AS ok,
                 bool_and(chk.locked) AS lots_ok
          FROM chk) AS k,
         (SELECT count(*) AS fresh, count(*) FILTER (WHERE cls.stale) AS stale,
                 coalesce(json_agg(cls.idx) FILTER (
                     WHERE NOT cls.stale AND cls.plate_hash IS NOT NULL
                       AND EXISTS (SELECT 1 FROM reservations r
                                   WHERE r.lot_id = cls.lot_id
                                     AND r.plate_hash = cls.plate_hash
                                     AND r.status IN ('confirmed', 'active'))), '[]') AS plates
          FROM cls) AS f
    UNION ALL
    SELECT live.lot_id::text, live.version, live.updated_at, lot.district,
           json_build_object(
               'o', json_object_agg(t.space_type, coalesce(u.occupied, t.occupied)),
               'c', json_object_agg(t.space_type, t.capacity))::text
    FROM live
    JOIN lot ON lot.id = live.lot_id
    JOIN typ t ON t.lot_id = live.lot_id
    LEFT JOIN upd u ON u.tid = t.tid
    GROUP BY live.lot_id, live.version, live.updated_at, lot.district;
END;
$$;
