"""Reconciliation: the live counts recomputed from PostgreSQL, Redis repaired, gate drift reported.

- Each lot's counts are recomputed from the space states (space lots) or from the event log
  (gate lots: the latest count snapshot plus the gate events observed after it) and compared
  with ``lot_occupancy``; a disagreement is logged and counted, since PostgreSQL is the truth
  and only ingestion writes it.
- Redis is compared with PostgreSQL lot by lot and repaired where it differs: a missing or older
  lot is written again; a lot whose counts differ at the same version (or that claims a version
  PostgreSQL never had) gets its version bumped under the lot's ``lot_live`` row lock, the lock
  every writer of a lot's counts takes, so the repair wins over the bad state and loses to any
  newer write. District and city totals are checked against the sum of their lots in one Lua
  script, atomically with respect to ingest.
- For gate-counted lots the latest count snapshot is compared with what the gates implied just
  before it (the previous snapshot plus the entries and exits between the two): the drift is
  exported as a gauge and logged once per drifting lot and space type.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import redis
from prometheus_client import Counter, Gauge
from psycopg.rows import dict_row

from services.common import livestate
from services.ingestion import registry

log = logging.getLogger("parking.worker.reconcile")

# Any pool process may run a pass: the gauges export the latest pass's values, whichever process
# ran it (a lot deleted since keeps its last value until the worker restarts).
GATE_DRIFT = Gauge(
    "parking_gate_drift",
    "latest count snapshot minus what the gate events implied before it",
    ["lot_id", "space_type"],
    multiprocess_mode="mostrecent",
)
REDIS_REPAIRS = Counter("parking_reconcile_redis_repairs_total", "lots rewritten in Redis")
TOTAL_REPAIRS = Counter("parking_reconcile_total_repairs_total", "district/city totals rewritten")
PG_MISMATCHES = Gauge(
    "parking_reconcile_pg_mismatches",
    "lots whose stored counts disagree with the event log",
    multiprocess_mode="mostrecent",
)


@dataclass(frozen=True, slots=True)
class Drift:
    lot_id: str
    space_type: str
    snapshot: int
    implied: int

    @property
    def drift(self) -> int:
        return self.snapshot - self.implied


_RECOMPUTE = """
SELECT o.lot_id::text AS lot_id, o.space_type, o.occupied AS stored,
  CASE WHEN l.counting = 'gates'
         AND coalesce(o.snapshot_at, l.created_at) < %(retained_since)s::timestamptz
       THEN o.occupied  -- the events it rests on are past retention: nothing to check against
  WHEN l.counting = 'spaces' THEN (
      SELECT count(*) FROM spaces s
      WHERE s.lot_id = o.lot_id AND s.space_type = o.space_type AND s.occupied)
  ELSE least(greatest(coalesce((snap.counts ->> o.space_type)::int, 0) + coalesce((
      SELECT sum(CASE g.type WHEN 'entry' THEN 1 ELSE -1 END) FROM events g
      WHERE g.lot_id = o.lot_id AND g.space_type = o.space_type AND g.type IN ('entry', 'exit')
        AND (snap.observed_at IS NULL OR g.observed_at > snap.observed_at)), 0), 0), o.capacity)
  END::int AS recomputed
FROM lot_occupancy o JOIN lots l ON l.id = o.lot_id AND l.deleted_at IS NULL
LEFT JOIN LATERAL (
    SELECT e.counts, e.observed_at FROM events e
    WHERE l.counting = 'gates' AND e.lot_id = o.lot_id AND e.type = 'count'
      AND e.counts ? o.space_type
    ORDER BY e.observed_at DESC, e.event_id DESC LIMIT 1) snap ON true
"""

_DRIFT = """
SELECT o.lot_id::text AS lot_id, o.space_type, o.capacity,
  (s.vs)[1] AS snapshot, (s.vs)[2] AS previous,
  coalesce((SELECT sum(CASE g.type WHEN 'entry' THEN 1 ELSE -1 END) FROM events g
    WHERE g.lot_id = o.lot_id AND g.space_type = o.space_type AND g.type IN ('entry', 'exit')
      AND g.observed_at > (s.ts)[2] AND g.observed_at <= (s.ts)[1]), 0)::int AS delta
FROM lot_occupancy o JOIN lots l ON l.id = o.lot_id AND l.deleted_at IS NULL
  AND l.counting = 'gates'
JOIN LATERAL (
    SELECT array_agg(x.v ORDER BY x.t DESC, x.id DESC) AS vs,
           array_agg(x.t ORDER BY x.t DESC, x.id DESC) AS ts
    FROM (SELECT (e.counts ->> o.space_type)::int AS v, e.observed_at AS t, e.event_id AS id
          FROM events e WHERE e.lot_id = o.lot_id AND e.type = 'count'
            AND e.counts ? o.space_type
          ORDER BY e.observed_at DESC, e.event_id DESC LIMIT 2) x) s ON true
WHERE cardinality(s.vs) = 2
"""

# KEYS: city, districts.  ARGV: every lot id.  Sets each district's and the city's totals to
# the sum of their lots where they differ; returns how many hashes it rewrote.
_FIX_TOTALS = """
local sums, city_o, city_c = {}, 0, 0
for _, id in ipairs(ARGV) do
  local h = redis.call('HGETALL', 'lot:' .. id)
  local o, c, d = 0, 0, nil
  for i = 1, #h, 2 do
    local f = h[i]
    if string.sub(f, 1, 2) == 'o:' then o = o + tonumber(h[i + 1])
    elseif string.sub(f, 1, 2) == 'c:' then c = c + tonumber(h[i + 1])
    elseif f == 'd' then d = h[i + 1] end
  end
  if d then
    sums[d] = sums[d] or {0, 0}
    sums[d][1] = sums[d][1] + o
    sums[d][2] = sums[d][2] + c
    city_o, city_c = city_o + o, city_c + c
  end
end
for _, d in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  sums[d] = sums[d] or {0, 0}
end
local fixed = 0
for d, s in pairs(sums) do
  local k = 'district:' .. d
  local o = tonumber(redis.call('HGET', k, 'o') or '0')
  local c = tonumber(redis.call('HGET', k, 'c') or '0')
  if o ~= s[1] or c ~= s[2] then
    redis.call('HSET', k, 'o', s[1], 'c', s[2])
    redis.call('SADD', KEYS[2], d)
    fixed = fixed + 1
  end
end
local o = tonumber(redis.call('HGET', KEYS[1], 'o') or '0')
local c = tonumber(redis.call('HGET', KEYS[1], 'c') or '0')
if o ~= city_o or c ~= city_c then
  redis.call('HSET', KEYS[1], 'o', city_o, 'c', city_c)
  fixed = fixed + 1
end
return fixed
"""


def recompute_counts(
    conn: psycopg.Connection[Any], *, retained_since: datetime | None = None
) -> list[dict[str, Any]]:
    """Lots and types whose stored occupied count disagrees with its recomputation (gate lots
    whose snapshot is older than ``retained_since``, the event retention, are not checked)."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        # under the tasks' soft time limit (celery_app.py), which stops the task, not the
        # statement: this is what ends the statement in PostgreSQL
        cur.execute("SET LOCAL statement_timeout = '80s'")
        cur.execute(_RECOMPUTE, {"retained_since": retained_since})
        return [r for r in cur.fetchall() if r["stored"] != r["recomputed"]]


def gate_drift(conn: psycopg.Connection[Any]) -> list[Drift]:
    """For every gate lot and type with two snapshots: the latest against the gates' count."""
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        cur.execute("SET LOCAL statement_timeout = '80s'")
        cur.execute(_DRIFT)
        return [
            Drift(
                r["lot_id"],
                r["space_type"],
                int(r["snapshot"]),
                min(max(int(r["previous"]) + int(r["delta"]), 0), int(r["capacity"])),
            )
            for r in cur.fetchall()
        ]


def _same(redis_state: dict[str, Any], pg: livestate.LotState) -> bool:
    return (
        redis_state["district"] == pg.district
        and redis_state["occupied"] == {t: int(n) for t, n in pg.occupied.items()}
        and redis_state["capacity"] == {t: int(n) for t, n in pg.capacity.items()}
        and _instant(redis_state["updated_at"]) == _instant(pg.updated_at)
    )


def _instant(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def repair_redis(conn: psycopg.Connection[Any], client: redis.Redis) -> dict[str, int]:
    """Rewrite in Redis every lot that is missing, older or different; fix the totals."""
    ids = [r[0] for r in conn.execute("SELECT id::text FROM lots WHERE deleted_at IS NULL")]
    pipe = client.pipeline(transaction=False)
    for lot_id in ids:
        pipe.hgetall(livestate.lot_key(lot_id))
        pipe.exists(livestate.meta_key(lot_id))
    raw = pipe.execute()
    in_redis = {
        lot_id: (livestate.decode_state(raw[2 * i]) if raw[2 * i] else None, raw[2 * i + 1])
        for i, lot_id in enumerate(ids)
    }
    # Read PostgreSQL after Redis: a state Redis holds was committed before this read.
    pg = {s.lot_id: s for s in registry.live_states(conn, lot_ids=ids)}
    missing: list[str] = []
    behind: list[str] = []
    bump: list[tuple[str, int]] = []
    for lot_id, state in pg.items():
        held, has_meta = in_redis.get(lot_id, (None, 0))
        if held is None or not has_meta:
            missing.append(lot_id)
        elif held["version"] < state.version:
            behind.append(lot_id)
        elif held["version"] > state.version or not _same(held, state):
            bump.append((lot_id, max(held["version"], state.version)))
    if bump:
        with conn.transaction():
            for lot_id, version in bump:
                # Locks the row as ingestion does; a concurrent newer write keeps its own version.
                conn.execute(
                    "UPDATE lot_live SET version = greatest(version, %s) + 1 WHERE lot_id = %s",
                    (version, lot_id),
                )
    if missing:
        registry.sync_lots_to_redis(conn, client, lot_ids=missing)
    again = behind + [lot_id for lot_id, _ in bump]
    if again:
        livestate.apply_states(client, registry.live_states(conn, lot_ids=again))
    for lot_id in missing + again:
        log.warning("redis live state repaired", extra={"lot_id": lot_id})
    REDIS_REPAIRS.inc(len(missing) + len(again))
    removed = _remove_deleted(conn, client, live=set(ids))
    fixed = int(
        client.register_script(_FIX_TOTALS)(
            keys=[livestate.CITY_KEY, livestate.DISTRICTS_KEY], args=ids
        )
    )
    if fixed:
        log.warning("redis district/city totals repaired", extra={"hashes": fixed})
        TOTAL_REPAIRS.inc(fixed)
    return {
        "missing": len(missing),
        "behind": len(behind),
        "bumped": len(bump),
        "removed": removed,
        "totals": fixed,
    }


def _remove_deleted(conn: psycopg.Connection[Any], client: redis.Redis, *, live: set[str]) -> int:
    """Remove from Redis the lots PostgreSQL no longer has (deleted, or never committed)."""
    held: list[str] = client.zrange(livestate.GEO_KEY, 0, -1)  # type: ignore[assignment]
    candidates = [lot_id for lot_id in held if lot_id not in live]
    if not candidates:
        return 0
    # Re-read: a lot created since ``live`` was read is in Redis and must stay.
    still = {
        r[0]
        for r in conn.execute(
            "SELECT id::text FROM lots WHERE id::text = ANY(%s) AND deleted_at IS NULL",
            (candidates,),
        )
    }
    gone = [lot_id for lot_id in candidates if lot_id not in still]
    for lot_id in gone:
        livestate.remove_lot(client, lot_id)
        log.warning("deleted lot removed from redis", extra={"lot_id": lot_id})
    return len(gone)


def reconcile(
    conn: psycopg.Connection[Any],
    client: redis.Redis,
    *,
    drift_threshold: int = 0,
    retained_since: datetime | None = None,
) -> dict[str, Any]:
    """One reconciliation pass: PostgreSQL checked, Redis repaired, gate drift reported."""
    mismatches = recompute_counts(conn, retained_since=retained_since)
    for m in mismatches:
        log.error("stored count disagrees with the event log", extra=m)
    PG_MISMATCHES.set(len(mismatches))
    repaired = repair_redis(conn, client)
    drifting = []
    GATE_DRIFT.clear()
    for d in gate_drift(conn):
        GATE_DRIFT.labels(d.lot_id, d.space_type).set(d.drift)
        if abs(d.drift) > drift_threshold:
            drifting.append(d)
            log.warning(
                "gate count drift",
                extra={
                    "lot_id": d.lot_id,
                    "space_type": d.space_type,
                    "drift": d.drift,
                    "snapshot": d.snapshot,
                    "gate_implied": d.implied,
                },
            )
    return {
        "pg_mismatches": len(mismatches),
        **repaired,
        "drifting": [
            {"lot_id": d.lot_id, "space_type": d.space_type, "drift": d.drift} for d in drifting
        ],
    }
