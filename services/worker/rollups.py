"""Occupancy rollups: exact per-minute occupancy reconstructed from the event log.

A lot's occupancy is a step function of observed time: a space-counted lot holds the latest
state of each space (by ``observed_at``, then ``event_id``), a gate-counted lot holds, per
space type, ``clamp(latest snapshot + entries - exits observed after it, 0, capacity)``, the
same rules ingestion applies to the live state. Each minute's bucket is the time-weighted
average and the maximum of that function over the minute (sample and hold), with the entries
and exits observed in it; districts and the city take the exact maximum of the sum of their
lots. 15-minute and 1-hour buckets are rolled up from the 1-minute rows.

Everything here is a recomputation from PostgreSQL written with upserts, so running it twice,
or again after a crash half way, leaves the same rows as one clean run.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg.rows import dict_row

MINUTE = timedelta(minutes=1)
INTERVALS = {"1m": timedelta(minutes=1), "15m": timedelta(minutes=15), "1h": timedelta(hours=1)}
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_ROLLUP_LOCK = 0x70617231  # one rollup at a time: concurrent runs would race their upserts
STATE_NAME = "rollup"


def floor_to(t: datetime, step: timedelta) -> datetime:
    """``t`` rounded down to a multiple of ``step`` since 2000-01-01 UTC."""
    return _EPOCH + ((t - _EPOCH) // step) * step


def ceil_to(t: datetime, step: timedelta) -> datetime:
    f = floor_to(t, step)
    return f if f == t else f + step


@dataclass(frozen=True, slots=True)
class Bucket:
    level: str
    key: str
    interval: str
    bucket: datetime
    occupied_avg: float
    occupied_max: int
    capacity: int
    entries: int
    exits: int


@dataclass
class _Lot:
    lot_id: str
    district: str
    counting: str
    created_at: datetime
    capacity: dict[str, int] = field(default_factory=dict)
    snapshot: dict[str, tuple[int, datetime | None, int]] = field(default_factory=dict)
    occupied: int = 0  # the stored live count, over all types
    changed: bool = True  # space lots: whether any space changed since the range's start
    spaces: dict[str, bool] = field(default_factory=dict)  # space id -> occupied at start
    raw: dict[str, int] = field(default_factory=dict)  # gate lots: unclamped count at start

    def value(self) -> int:
        if self.counting == "spaces":
            return sum(self.spaces.values()) if self.changed else self.occupied
        return sum(min(max(self.raw.get(t, 0), 0), c) for t, c in self.capacity.items())


@dataclass
class _Series:
    """One lot's step function over the range, cut into minutes."""

    start_values: list[int]
    changes: list[list[tuple[float, int]]]  # per minute: (seconds into the minute, new value)
    entries: list[int]
    exits: list[int]


class RollupBusy(Exception):
    """Another rollup holds the lock."""


@contextmanager
def rollup_lock(conn: psycopg.Connection[Any], *, timeout_s: float = 120.0) -> Iterator[None]:
    """Hold the rollup advisory lock (session level, so a killed worker releases it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (_ROLLUP_LOCK,)).fetchone()
        if row and row[0]:
            break
        if time.monotonic() >= deadline:
            raise RollupBusy("another rollup holds the lock")
        time.sleep(0.2)
    try:
        yield
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (_ROLLUP_LOCK,))


def _load_lots(cur: psycopg.Cursor[Any], start: datetime, end: datetime) -> dict[str, _Lot]:
    """Live lots created before ``end``, with capacity and the current snapshot per type."""
    cur.execute(
        "SELECT l.id::text AS lot_id, l.district, l.counting, l.created_at, o.space_type,"
        " o.capacity, o.occupied, o.snapshot_occupied, o.snapshot_at, o.gate_delta"
        " FROM lots l JOIN lot_occupancy o ON o.lot_id = l.id"
        " WHERE l.deleted_at IS NULL AND l.created_at < %s",
        (end,),
    )
    lots: dict[str, _Lot] = {}
    for r in cur.fetchall():
        lot = lots.get(r["lot_id"])
        if lot is None:
            lot = lots[r["lot_id"]] = _Lot(
                r["lot_id"], r["district"], r["counting"], r["created_at"]
            )
        lot.capacity[r["space_type"]] = int(r["capacity"])
        lot.occupied += int(r["occupied"])
        lot.snapshot[r["space_type"]] = (
            int(r["snapshot_occupied"]),
            r["snapshot_at"],
            int(r["gate_delta"]),
        )
    return lots


def _load_space_states(cur: psycopg.Cursor[Any], lots: dict[str, _Lot], start: datetime) -> None:
    """Each space's state at ``start``: its current state unless it changed since.

    A lot none of whose spaces has an event observed since ``start`` held its stored count
    all along, so only the lots with such events are read space by space.
    """
    cur.execute(
        "SELECT DISTINCT lot_id::text FROM events WHERE type = 'space' AND observed_at >= %s",
        (start,),
    )
    recent = {r["lot_id"] for r in cur.fetchall()}
    ids = []
    for lot_id, lot in lots.items():
        if lot.counting == "spaces":
            lot.changed = lot_id in recent
            if lot.changed:
                ids.append(lot_id)
    if not ids:
        return
    cur.execute(
        "SELECT s.lot_id::text AS lot_id, s.space_id,"
        " CASE WHEN s.observed_at IS NULL OR s.observed_at < %(start)s THEN s.occupied"
        "      ELSE coalesce(prev.occupied, false) END AS occupied"
        " FROM spaces s LEFT JOIN LATERAL ("
        "   SELECT e.occupied FROM events e"
        "   WHERE s.observed_at >= %(start)s AND e.lot_id = s.lot_id AND e.type = 'space'"
        "     AND e.space_id = s.space_id AND e.observed_at < %(start)s"
        "   ORDER BY e.observed_at DESC, e.event_id DESC LIMIT 1) prev ON true"
        " WHERE s.lot_id = ANY(%(ids)s::uuid[])",
        {"start": start, "ids": ids},
    )
    for r in cur.fetchall():
        lots[r["lot_id"]].spaces[r["space_id"]] = bool(r["occupied"])


def _load_gate_counts(cur: psycopg.Cursor[Any], lots: dict[str, _Lot], start: datetime) -> None:
    """Each gate lot's unclamped count per type at ``start``.

    When the current snapshot is older than ``start``, walk back from the live count (snapshot
    plus its gate delta) over the gate events since ``start``; otherwise start from the latest
    snapshot before ``start`` and add the gate events between them.
    """
    gate_lots = [lot for lot in lots.values() if lot.counting == "gates"]
    if not gate_lots:
        return
    back: list[str] = []
    forward: list[tuple[str, str]] = []
    for lot in gate_lots:
        for space_type, (_, snapshot_at, _) in lot.snapshot.items():
            if snapshot_at is None or snapshot_at < start:
                back.append(lot.lot_id)
            else:
                forward.append((lot.lot_id, space_type))
    after: dict[tuple[str, str], int] = {}
    if back:
        cur.execute(
            "SELECT lot_id::text AS lot_id, space_type,"
            " sum(CASE type WHEN 'entry' THEN 1 ELSE -1 END)::int AS delta"
            " FROM events WHERE lot_id = ANY(%s::uuid[]) AND type IN ('entry', 'exit')"
            " AND NOT stale AND observed_at >= %s GROUP BY 1, 2",
            (sorted(set(back)), start),
        )
        after = {(r["lot_id"], r["space_type"]): int(r["delta"]) for r in cur.fetchall()}
    for lot in gate_lots:
        for space_type, (occupied, snapshot_at, delta) in lot.snapshot.items():
            if snapshot_at is None or snapshot_at < start:
                lot.raw[space_type] = occupied + delta - after.get((lot.lot_id, space_type), 0)
    if forward:
        cur.execute(
            "SELECT f.lot_id::text AS lot_id, f.space_type,"
            " coalesce((snap.counts ->> f.space_type)::int, 0) + coalesce(("
            "   SELECT sum(CASE g.type WHEN 'entry' THEN 1 ELSE -1 END) FROM events g"
            "   WHERE g.lot_id = f.lot_id AND g.type IN ('entry', 'exit')"
            "     AND g.space_type = f.space_type AND g.observed_at < %(start)s"
            "     AND (snap.observed_at IS NULL OR g.observed_at > snap.observed_at)), 0)::int"
            "   AS raw"
            " FROM unnest(%(lots)s::uuid[], %(types)s::text[]) AS f(lot_id, space_type)"
            " LEFT JOIN LATERAL ("
            "   SELECT e.counts, e.observed_at FROM events e"
            "   WHERE e.lot_id = f.lot_id AND e.type = 'count' AND e.counts ? f.space_type"
            "     AND e.observed_at < %(start)s"
            "   ORDER BY e.observed_at DESC, e.event_id DESC LIMIT 1) snap ON true",
            {
                "start": start,
                "lots": [lot_id for lot_id, _ in forward],
                "types": [t for _, t in forward],
            },
        )
        for r in cur.fetchall():
            lots[r["lot_id"]].raw[r["space_type"]] = int(r["raw"])


def _replay(lot: _Lot, events: list[dict[str, Any]], start: datetime, n_minutes: int) -> _Series:
    """Apply the lot's events in observed order; cut the step function into minutes."""
    series = _Series(
        start_values=[0] * n_minutes,
        changes=[[] for _ in range(n_minutes)],
        entries=[0] * n_minutes,
        exits=[0] * n_minutes,
    )
    value = lot.value()
    spaces = dict(lot.spaces)
    raw = dict(lot.raw)
    occupied_spaces = value
    i = 0
    for minute in range(n_minutes):
        series.start_values[minute] = value
        minute_end = start + (minute + 1) * MINUTE
        while i < len(events) and events[i]["observed_at"] < minute_end:
            e = events[i]
            i += 1
            kind = e["type"]
            if lot.counting == "spaces":
                if kind != "space" or e["space_id"] not in spaces or e["occupied"] is None:
                    continue
                new = bool(e["occupied"])
                if new == spaces[e["space_id"]]:
                    continue
                spaces[e["space_id"]] = new
                occupied_spaces += 1 if new else -1
                if new:
                    series.entries[minute] += 1
                else:
                    series.exits[minute] += 1
                new_value = occupied_spaces
            else:
                if kind in ("entry", "exit"):
                    if e["space_type"] not in lot.capacity:
                        continue
                    step = 1 if kind == "entry" else -1
                    raw[e["space_type"]] = raw.get(e["space_type"], 0) + step
                    if step > 0:
                        series.entries[minute] += 1
                    else:
                        series.exits[minute] += 1
                elif kind == "count" and e["counts"]:
                    for space_type, n in e["counts"].items():
                        if space_type in lot.capacity:
                            raw[space_type] = int(n)
                else:
                    continue
                new_value = sum(min(max(raw.get(t, 0), 0), c) for t, c in lot.capacity.items())
            if new_value != value:
                offset = (e["observed_at"] - (start + minute * MINUTE)).total_seconds()
                series.changes[minute].append((offset, new_value))
                value = new_value
    return series


def _minute_stats(start_value: int, changes: list[tuple[float, int]]) -> tuple[float, int]:
    """(time-weighted average, maximum) of a step function over one minute."""
    area = 0.0
    last_t, last_v, peak = 0.0, start_value, start_value
    for t, v in changes:
        area += last_v * (t - last_t)
        last_t, last_v = t, v
        peak = max(peak, v)
    area += last_v * (60.0 - last_t)
    return round(area / 60.0, 6), peak


def compute_minutes(
    conn: psycopg.Connection[Any], *, start: datetime, end: datetime
) -> list[Bucket]:
    """The 1-minute buckets of every lot, district and the city for ``[start, end)``."""
    start, end = floor_to(start, MINUTE), ceil_to(end, MINUTE)
    n_minutes = int((end - start) / MINUTE)
    if n_minutes <= 0:
        return []
    # One consistent snapshot: the current state and the log must agree with each other.
    with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        # under the tasks' soft time limit (celery_app.py), which stops the task, not the
        # statement: this is what ends the statement in PostgreSQL
        cur.execute("SET LOCAL statement_timeout = '80s'")
        lots = _load_lots(cur, start, end)
        _load_space_states(cur, lots, start)
        _load_gate_counts(cur, lots, start)
        cur.execute(
            "SELECT lot_id::text AS lot_id, type, space_id, space_type, occupied, counts,"
            " observed_at FROM events WHERE observed_at >= %s AND observed_at < %s"
            " AND lot_id = ANY(%s::uuid[])"
            # at one instant a count comes after the gate events it already includes
            " ORDER BY lot_id, observed_at, type = 'count', event_id",
            (start, end, list(lots)),
        )
        by_lot: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in cur.fetchall():
            by_lot[r["lot_id"]].append(r)

    buckets: list[Bucket] = []
    groups: dict[tuple[str, str], list[tuple[_Lot, _Series]]] = defaultdict(list)
    for lot in lots.values():
        series = _replay(lot, by_lot.get(lot.lot_id, []), start, n_minutes)
        groups[("district", lot.district)].append((lot, series))
        groups[("city", "city")].append((lot, series))
        capacity = sum(lot.capacity.values())
        for m in range(n_minutes):
            bucket = start + m * MINUTE
            if lot.created_at >= bucket + MINUTE:
                continue
            avg, peak = _minute_stats(series.start_values[m], series.changes[m])
            buckets.append(
                Bucket(
                    "lot",
                    lot.lot_id,
                    "1m",
                    bucket,
                    avg,
                    peak,
                    capacity,
                    series.entries[m],
                    series.exits[m],
                )
            )
    for (level, key), members in sorted(groups.items()):
        for m in range(n_minutes):
            bucket = start + m * MINUTE
            present = [(lot, s) for lot, s in members if lot.created_at < bucket + MINUTE]
            if not present:
                continue
            total = sum(s.start_values[m] for _, s in present)
            # The group's own step function: merge its lots' changes as deltas in time order.
            deltas: list[tuple[float, int]] = []
            for _, s in present:
                previous = s.start_values[m]
                for t, v in s.changes[m]:
                    deltas.append((t, v - previous))
                    previous = v
            deltas.sort(key=lambda d: d[0])
            changes: list[tuple[float, int]] = []
            running = total
            for t, d in deltas:
                running += d
                changes.append((t, running))
            avg, peak = _minute_stats(total, changes)
            buckets.append(
                Bucket(
                    level,
                    key,
                    "1m",
                    bucket,
                    avg,
                    peak,
                    sum(sum(lot.capacity.values()) for lot, _ in present),
                    sum(s.entries[m] for _, s in present),
                    sum(s.exits[m] for _, s in present),
                )
            )
    return buckets


_UPSERT = (
    "INSERT INTO occupancy_buckets (level, key, interval, bucket, occupied_avg, occupied_max,"
    " capacity, entries, exits, computed_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, now())"
    " ON CONFLICT (level, key, interval, bucket) DO UPDATE SET"
    " occupied_avg = EXCLUDED.occupied_avg, occupied_max = EXCLUDED.occupied_max,"
    " capacity = EXCLUDED.capacity, entries = EXCLUDED.entries, exits = EXCLUDED.exits,"
    " computed_at = EXCLUDED.computed_at"
)

_ROLL_UP = (
    "INSERT INTO occupancy_buckets (level, key, interval, bucket, occupied_avg, occupied_max,"
    " capacity, entries, exits, computed_at)"
    " SELECT level, key, %(interval)s, date_bin(%(step)s, bucket, %(origin)s),"
    # summed in bucket order and rounded: a recomputation gives the same float to the bit
    " round(avg(occupied_avg ORDER BY bucket)::numeric, 6)::float8, max(occupied_max),"
    " max(capacity), sum(entries), sum(exits), now()"
    " FROM occupancy_buckets WHERE interval = '1m' AND bucket >= %(start)s AND bucket < %(end)s"
    " GROUP BY 1, 2, 3, 4"
    " ON CONFLICT (level, key, interval, bucket) DO UPDATE SET"
    " occupied_avg = EXCLUDED.occupied_avg, occupied_max = EXCLUDED.occupied_max,"
    " capacity = EXCLUDED.capacity, entries = EXCLUDED.entries, exits = EXCLUDED.exits,"
    " computed_at = EXCLUDED.computed_at"
)


def write_buckets(conn: psycopg.Connection[Any], buckets: list[Bucket]) -> None:
    """Upsert ``buckets`` (pipelined) and roll the minutes they cover up to 15 m and 1 h."""
    if not buckets:
        return
    first = min(b.bucket for b in buckets)
    last = max(b.bucket for b in buckets)
    with conn.transaction(), conn.cursor() as cur:
        cur.execute("SET LOCAL statement_timeout = '80s'")
        cur.executemany(
            _UPSERT,
            [
                (
                    b.level,
                    b.key,
                    b.interval,
                    b.bucket,
                    b.occupied_avg,
                    b.occupied_max,
                    b.capacity,
                    b.entries,
                    b.exits,
                )
                for b in buckets
            ],
        )
        for interval in ("15m", "1h"):
            step = INTERVALS[interval]
            cur.execute(
                _ROLL_UP,
                {
                    "interval": interval,
                    "step": step,
                    "origin": _EPOCH,
                    "start": floor_to(first, step),
                    "end": floor_to(last, step) + step,
                },
            )


def recompute(
    conn: psycopg.Connection[Any], *, start: datetime, end: datetime, chunk_minutes: int = 60
) -> int:
    """Recompute every bucket of ``[start, end)``, committing a chunk of minutes at a time."""
    written, _ = recompute_until(conn, start=start, end=end, chunk_minutes=chunk_minutes)
    return written


def recompute_until(
    conn: psycopg.Connection[Any],
    *,
    start: datetime,
    end: datetime,
    deadline: float | None = None,
    chunk_minutes: int = 60,
) -> tuple[int, datetime]:
    """``recompute``, stopping after the first chunk that ends past ``deadline`` (a
    ``time.monotonic()`` instant): the buckets written and the minute it got to (the end of
    the range, rounded up to a minute, when it finished)."""
    start, end = floor_to(start, MINUTE), ceil_to(end, MINUTE)
    written = 0
    chunk = max(1, chunk_minutes) * MINUTE
    cursor = start
    while cursor < end:
        upto = min(end, cursor + chunk)
        buckets = compute_minutes(conn, start=cursor, end=upto)
        write_buckets(conn, buckets)
        written += len(buckets)
        cursor = upto
        if deadline is not None and time.monotonic() >= deadline:
            break  # after a whole chunk: every call makes progress
    return written, min(cursor, end)


def _merge(ranges: list[tuple[datetime, datetime]]) -> list[tuple[datetime, datetime]]:
    """Overlapping or touching ``[start, end)`` ranges merged, in order."""
    merged: list[tuple[datetime, datetime]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


# A late event changes its lot's occupancy from its minute until the event that supersedes it
# (the same space's next event; for gate counts, the type's next snapshot) or until now.
_LATE_RANGES = """
SELECT e.observed_at, next.observed_at
FROM events e
LEFT JOIN LATERAL (
    SELECT n.observed_at FROM events n
    WHERE n.lot_id = e.lot_id AND n.observed_at > e.observed_at
      AND ((e.type = 'space' AND n.type = 'space' AND n.space_id = e.space_id)
        OR (e.type IN ('entry', 'exit') AND n.type = 'count' AND n.counts ? e.space_type)
        OR (e.type = 'count' AND n.type = 'count'
            AND n.counts ?& ARRAY(SELECT jsonb_object_keys(e.counts))))
    ORDER BY n.observed_at LIMIT 1
) next ON true
WHERE e.received_at >= %(since)s AND e.observed_at < %(before)s AND e.observed_at >= %(floor)s
"""


def rollup_recent(
    conn: psycopg.Connection[Any],
    *,
    now: datetime | None = None,
    lookback_minutes: int = 3,
    max_backfill_minutes: int = 1440,
    late_margin_s: float = 120.0,
    oldest: datetime | None = None,
    lock_wait_s: float = 5.0,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Bring the buckets up to date: every complete minute since the last run (at least the
    last ``lookback_minutes``), and every older minute a late event arrived for since the
    previous high-water mark (less a margin for transactions that committed late).

    When another rollup is running it does this work already: the call returns at once. Past
    ``deadline`` (``time.monotonic()``) it stops after the chunk it is on and records how far
    it got, so the next run carries on from there (a run stopped among the late minutes, which
    come first, records nothing: the next one finds the same late events again)."""
    try:
        return _rollup_recent(
            conn,
            now=now,
            lookback_minutes=lookback_minutes,
            max_backfill_minutes=max_backfill_minutes,
            late_margin_s=late_margin_s,
            oldest=oldest,
            lock_wait_s=lock_wait_s,
            deadline=deadline,
        )
    except RollupBusy:
        return {"skipped": "another rollup is running"}


def _rollup_recent(
    conn: psycopg.Connection[Any],
    *,
    now: datetime | None,
    lookback_minutes: int,
    max_backfill_minutes: int,
    late_margin_s: float,
    oldest: datetime | None,
    lock_wait_s: float,
    deadline: float | None,
) -> dict[str, Any]:
    with rollup_lock(conn, timeout_s=lock_wait_s):
        row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        mark: datetime = row[0]
        now = now or mark
        complete_end = floor_to(now, MINUTE)
        state = conn.execute(
            "SELECT last_minute, high_water FROM rollup_state WHERE name = %s", (STATE_NAME,)
        ).fetchone()
        last_minute, high_water = state if state else (None, None)
        new_start = complete_end - lookback_minutes * MINUTE
        if last_minute is not None:
            new_start = min(new_start, last_minute + MINUTE)
        new_start = max(new_start, complete_end - max_backfill_minutes * MINUTE)
        late: list[tuple[datetime, datetime]] = []
        if high_water is not None:
            # late events are folded in as far back as 1-minute buckets are kept
            floor = oldest or (complete_end - max_backfill_minutes * MINUTE)
            for observed_at, superseded_at in conn.execute(
                _LATE_RANGES,
                {
                    "since": high_water - timedelta(seconds=late_margin_s),
                    "before": new_start,
                    "floor": floor,
                },
            ).fetchall():
                end = complete_end if superseded_at is None else ceil_to(superseded_at, MINUTE)
                late.append((floor_to(observed_at, MINUTE), min(end, complete_end)))
        written = 0
        ranges = list(late)
        if new_start < complete_end:
            ranges.append((new_start, complete_end))
        reached = complete_end
        for start, end in _merge(ranges):
            n, upto = recompute_until(conn, start=start, end=end, deadline=deadline)
            written += n
            if upto < end:
                reached = upto
                break
        # Ranges go oldest first, so every minute before ``reached`` is done; past new_start
        # that is the new minutes' progress (late events after it are in the next new range).
        if reached >= new_start:
            conn.execute(
                "INSERT INTO rollup_state (name, last_minute, high_water, updated_at)"
                " VALUES (%s, %s, %s, now()) ON CONFLICT (name) DO UPDATE SET"
                " last_minute = greatest(rollup_state.last_minute, EXCLUDED.last_minute),"
                " high_water = greatest(rollup_state.high_water, EXCLUDED.high_water),"
                " updated_at = now()",
                (STATE_NAME, reached - MINUTE, mark),
            )
    return {
        "written": written,
        "late_events": len(late),
        "from": new_start.isoformat(),
        "to": reached.isoformat(),
    }
