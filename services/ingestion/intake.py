"""The event intake: one batch of events applied to PostgreSQL in one transaction.

The rules (API.md, Events; ARCHITECTURE.md, invariants 1 and 2):

- An event id is unique per operator: ``event_ids`` holds every accepted or stale one, so a
  repeated id, in the same batch or a later one, is a ``duplicate`` and changes nothing.
- A space's state moves only forward in observed time, ordered by (observed_at, event_id).
- A gate-counted lot's occupancy per space type is clamp(snapshot + gate_delta, 0, capacity):
  the latest count snapshot (ordered like space states) plus the entries (+1) and exits (-1)
  observed after it. That sum does not depend on the order events arrive in; a gate event not
  observed after the snapshot is ``stale``.
- Within a batch, an event is ``stale`` when it is older than the state the batch started from,
  as if the batch's events were applied in observed order.

Every writer of a lot's counts first locks the lot's ``lot_live`` row, in lot id order, so
concurrent batches, patches and deletes of a lot serialize without deadlocks, and the version
bumped under that lock orders the live-state writes to Redis.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
import psycopg

from services.common.auth import plate_hash
from services.common.livestate import LotState
from services.reservations.lifecycle import GateEvent, apply_gate_events

log = logging.getLogger("parking.ingestion.intake")
RETRIES = 3

# Per-lot rows (lots, lot_live, lot_occupancy: one to a few per lot) are joined as the
# planner likes, planned for each batch (prepare=False): a generic plan, blind to the array's
# length, can probe a small table once per lot, which costs milliseconds at a hundred lots.
# Spaces and the event log are too big to hash whole, so they are reached through the batch's
# keys, one index probe each: a LATERAL subquery with OFFSET 0 cannot be flattened, even in a
# generic plan; an update finds its rows by ctid from the probe.
_LOCK = (
    "SELECT lv.lot_id FROM lot_live lv JOIN lots l ON l.id = lv.lot_id"
    " WHERE lv.lot_id = ANY(%b::uuid[]) AND l.operator_id = %b::uuid"
    " ORDER BY lv.lot_id FOR NO KEY UPDATE OF lv"
)
# Read after the lock, so this statement's snapshot holds every commit of earlier lock holders.
_OCCUPANCY = (
    "SELECT o.lot_id::text, l.counting, l.district, o.space_type, o.capacity, o.occupied,"
    " o.snapshot_occupied, o.snapshot_at, o.snapshot_event_id, o.gate_delta"
    " FROM lot_occupancy o JOIN lots l ON l.id = o.lot_id"
    " WHERE o.lot_id = ANY(%b::uuid[]) AND l.operator_id = %b::uuid AND l.deleted_at IS NULL"
)
# The batch's long columns are sent as one text each, joined by SEP: psycopg dumps a list of
# strings element by element in Python, a joined string in one go. Ids cannot hold SEP (no
# control characters, schemas.py); lot ids are uuids, times ISO 8601 with their offset.
SEP = "\x1f"
_SPLIT = "string_to_array(%s::text, chr(31))"
# Rows come back by their keys' position (binary: no timestamps parsed from text).
_SPACES = (
    "SELECT k.i, s.space_type, s.occupied, s.observed_at, s.event_id, s.tid"
    f" FROM unnest({_SPLIT}::uuid[], {_SPLIT}) WITH ORDINALITY AS k(lot_id, space_id, i)"
    " CROSS JOIN LATERAL (SELECT space_type, occupied, observed_at, event_id, ctid::text AS tid"
    " FROM spaces"
    " WHERE lot_id = k.lot_id AND space_id = k.space_id OFFSET 0) AS s"
)
_CLAIM_IDS = (
    f"INSERT INTO event_ids (operator_id, event_id) SELECT %b::uuid, x FROM unnest({_SPLIT}) AS x"
    " ON CONFLICT DO NOTHING"
)
# Only when some ids were taken already: which of them this transaction claimed.
_CLAIMED_HERE = (
    "SELECT event_id FROM event_ids WHERE operator_id = %b::uuid AND event_id = ANY(%b::text[])"
    " AND xmin = pg_current_xact_id()::xid"
)
# COPY in text format, one line per event built as one string: ids and space ids hold no
# control characters (schemas.py), so only a backslash needs escaping.
_NULL = "\\N"
_BYTEA = "\\\\x"  # bytea's hex form, its backslash escaped for COPY
_COPY_EVENTS = (
    "COPY events (operator_id, event_id, lot_id, type, space_id, space_type, occupied, counts,"
    " plate_hash, observed_at, stale) FROM STDIN"
)
# The rows as _SPACES found them, by ctid: under the lots' locks no one else writes them, so
# the versions read are the ones to update (one TID fetch each, no second index probe).
_UPDATE_SPACES = (
    "UPDATE spaces s SET occupied = u.occupied, observed_at = u.observed_at,"
    " event_id = u.event_id"
    f" FROM unnest({_SPLIT}::tid[], {_SPLIT}::bool[], {_SPLIT}::timestamptz[], {_SPLIT})"
    " AS u(tid, occupied, observed_at, event_id)"
    " WHERE s.ctid = u.tid"
)
_GATE_DELTA = (
    "SELECT k.lot_id::text, k.space_type, d.delta"
    " FROM unnest(%b::uuid[], %b::text[], %b::timestamptz[]) AS k(lot_id, space_type, since)"
    " CROSS JOIN LATERAL (SELECT"
    " coalesce(sum(CASE e.type WHEN 'entry' THEN 1 WHEN 'exit' THEN -1 ELSE 0 END), 0)::int"
    " AS delta FROM events e WHERE e.lot_id = k.lot_id AND e.observed_at > k.since"
    " AND e.space_type = k.space_type AND e.type IN ('entry', 'exit') AND NOT e.stale) AS d"
)
_UPDATE_OCCUPANCY = (
    "UPDATE lot_occupancy o SET occupied = u.occupied, snapshot_occupied = u.snapshot_occupied,"
    " snapshot_at = u.snapshot_at, snapshot_event_id = u.snapshot_event_id,"
    " gate_delta = u.gate_delta"
    " FROM unnest(%b::uuid[], %b::text[], %b::int[], %b::int[], %b::timestamptz[], %b::text[],"
    " %b::int[]) AS u(lot_id, space_type, occupied, snapshot_occupied, snapshot_at,"
    " snapshot_event_id, gate_delta)"
    " WHERE o.lot_id = u.lot_id AND o.space_type = u.space_type"
)
_BUMP_LIVE = (
    "UPDATE lot_live lv SET version = lv.version + 1,"
    " updated_at = greatest(lv.updated_at, u.updated_at)"
    " FROM unnest(%b::uuid[], %b::timestamptz[]) AS u(lot_id, updated_at)"
    " WHERE lv.lot_id = u.lot_id RETURNING lv.lot_id::text, lv.version, lv.updated_at"
)


@dataclass(slots=True)
class Outcome:
    """What happened to a batch: each event counted in exactly one of the four."""

    accepted: int = 0
    duplicate: int = 0
    stale: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    states: list[LotState] = field(default_factory=list)
    # lots whose reservations a gate event moved: their cached ``reserved`` counts are stale
    reservations_moved: list[str] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        rejected = sorted(self.rejected, key=lambda r: r["index"])
        return {
            "accepted": self.accepted,
            "duplicate": self.duplicate,
            "stale": self.stale,
            "rejected": rejected,
        }


def reject(index: int, code: str, detail: str) -> dict[str, Any]:
    return {"index": index, "code": code, "detail": detail}


@dataclass(slots=True)
class _Type:
    """One (lot, space type) row of ``lot_occupancy`` as read under the lot's lock."""

    capacity: int
    occupied: int
    snapshot_occupied: int
    snapshot_at: datetime | None
    snapshot_event_id: str | None
    gate_delta: int
    # what the batch does to it
    new_snapshot: tuple[datetime, str, int] | None = None
    gate_sum: int = 0
    space_delta: int = 0


@dataclass(slots=True)
class _Lot:
    uuid: UUID
    counting: str
    district: str
    types: dict[str, _Type] = field(default_factory=dict)
    latest: datetime | None = None  # observed_at of the latest accepted event


@dataclass(slots=True)
class _Space:
    space_type: str
    occupied: bool
    observed_at: datetime | None
    event_id: str | None
    tid: str  # the row's ctid as read under the lot's lock
    # the newest accepted event of the batch for this space:
    # (observed_at, event_id, occupied, observed_at in ISO 8601)
    new: tuple[datetime, str, bool, str] | None = None


def ingest(
    conn: psycopg.Connection[Any],
    *,
    operator_id: str,
    events: list[tuple[int, dict[str, Any]]],
    plate_key: str,
    outcome: Outcome,
) -> None:
    """Apply the (index, valid event) pairs; retry the transaction on a deadlock."""
    base_rejected = list(outcome.rejected)
    for attempt in range(1, RETRIES + 1):
        outcome.accepted = outcome.duplicate = outcome.stale = 0
        outcome.rejected = list(base_rejected)
        outcome.states = []
        outcome.reservations_moved = []
        try:
            with conn.transaction():
                _apply(
                    conn, operator_id=operator_id, events=events, plate_key=plate_key, out=outcome
                )
            return
        except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
            if attempt == RETRIES:
                raise
            log.warning("event batch deadlocked, retrying (attempt %d)", attempt)


def _apply(
    conn: psycopg.Connection[Any],
    *,
    operator_id: str,
    events: list[tuple[int, dict[str, Any]]],
    plate_key: str,
    out: Outcome,
) -> None:
    cur = conn.cursor()
    for _, e in events:
        e["lot_id"] = e["lot_id"].lower()
    lot_ids = sorted({e["lot_id"] for _, e in events})
    cur.execute(_LOCK, (lot_ids, operator_id), prepare=False)
    lots = _read_lots(cur, lot_ids, operator_id) if cur.rowcount else {}
    spaces = _read_spaces(cur, events, lots)

    # 1. Reject what cannot apply; a repeated id within the batch is a duplicate of the first.
    candidates: list[tuple[dict[str, Any], _Lot, _Space | None]] = []
    seen: set[str] = set()
    for index, e in events:
        lot = lots.get(e["lot_id"])
        if lot is None:
            out.rejected.append(reject(index, "unknown-lot", "no such lot of yours"))
            continue
        space = None
        if e["type"] == "space" and lot.counting == "spaces":
            space = spaces.get((e["lot_id"], e["space_id"]))
        if space is None:
            problem = _check(e, lot, spaces)
            if problem:
                out.rejected.append(reject(index, *problem))
                continue
        event_id = e["id"]
        if event_id in seen:
            out.duplicate += 1
            continue
        seen.add(event_id)
        candidates.append((e, lot, space))
    if not candidates:
        return

    # 2. Claim the ids; those already claimed (by an earlier batch) are duplicates.
    ids = sorted(seen)
    cur.execute(_CLAIM_IDS, (operator_id, SEP.join(ids)))
    if cur.rowcount == len(ids):
        fresh = seen
    else:
        cur.execute(_CLAIMED_HERE, (operator_id, ids))
        fresh = {r[0] for r in cur.fetchall()}
    out.duplicate += len(ids) - len(fresh)

    # 3. Classify against the state the batch started from, and fold in the accepted events.
    rows: list[str] = []
    gates: list[GateEvent] = []
    for e, lot, space in candidates:
        event_id = e["id"]
        if event_id not in fresh:
            continue
        kind = e["type"]
        observed_at: datetime = e["observed_at"]
        lot_id = e["lot_id"]
        stale = False
        space_type: str | None
        if space is not None:
            occupied: bool = e["occupied"]
            at = observed_at.isoformat()
            key = (observed_at, event_id)
            if space.observed_at is not None and key <= (space.observed_at, space.event_id or ""):
                stale = True
            elif space.new is None or key > space.new[:2]:
                space.new = (observed_at, event_id, occupied, at)
            rows.append(
                f"{operator_id}\t{_esc(event_id)}\t{lot_id}\tspace\t{_esc(e['space_id'])}"
                f"\t{space.space_type}\t{'t' if occupied else 'f'}\t\\N\t\\N"
                f"\t{at}\t{'t' if stale else 'f'}\n"
            )
        elif kind == "count":
            counts: dict[str, int] = e["occupied"]
            newer = False
            for t, n in counts.items():
                row = lot.types[t]
                key = (observed_at, event_id)
                if row.snapshot_at is not None and key <= (
                    row.snapshot_at,
                    row.snapshot_event_id or "",
                ):
                    continue
                newer = True
                if row.new_snapshot is None or key > row.new_snapshot[:2]:
                    row.new_snapshot = (observed_at, event_id, min(n, row.capacity))
            stale = not newer
            rows.append(
                f"{operator_id}\t{_esc(event_id)}\t{lot_id}\tcount\t\\N\t\\N\t\\N"
                f"\t{_esc(orjson.dumps(counts).decode())}\t\\N"
                f"\t{observed_at.isoformat()}\t{'t' if stale else 'f'}\n"
            )
        else:
            space_type = e.get("space_type", "standard")
            row = lot.types[space_type]
            if row.snapshot_at is not None and observed_at <= row.snapshot_at:
                stale = True
            else:
                row.gate_sum += 1 if kind == "entry" else -1
            plate = e.get("plate")
            hashed = plate_hash(plate_key, plate) if plate else None
            if hashed is not None and not stale:
                gates.append(GateEvent(lot_id, kind, hashed, observed_at))
            plate_field = _NULL if hashed is None else _BYTEA + hashed.hex()
            rows.append(
                f"{operator_id}\t{_esc(event_id)}\t{lot_id}\t{kind}\t\\N\t{space_type}\t\\N"
                f"\t\\N\t{plate_field}\t{observed_at.isoformat()}\t{'t' if stale else 'f'}\n"
            )
        if stale:
            out.stale += 1
        else:
            out.accepted += 1
            if lot.latest is None or observed_at > lot.latest:
                lot.latest = observed_at

    # 4. The log, then the state.
    if rows:
        with cur.copy(_COPY_EVENTS) as copy:
            copy.write("".join(rows))
    _write_spaces(cur, spaces, lots)
    _write_occupancy(cur, lots)
    if gates and apply_gate_events(conn, events=gates):
        out.reservations_moved = sorted({g.lot_id for g in gates})
    changed = sorted(lot_id for lot_id, lot in lots.items() if lot.latest is not None)
    if changed:
        cur.execute(_BUMP_LIVE, (changed, [lots[i].latest for i in changed]), prepare=False)
        for lot_id, version, updated_at in cur.fetchall():
            lot = lots[lot_id]
            out.states.append(
                LotState(
                    lot_id=lot_id,
                    version=int(version),
                    updated_at=updated_at.isoformat() if updated_at else None,
                    district=lot.district,
                    occupied={t: r.occupied for t, r in lot.types.items()},
                    capacity={t: r.capacity for t, r in lot.types.items()},
                )
            )


def _esc(text: str) -> str:
    """``text`` as a field of COPY's text format (it holds no control characters)."""
    return text.replace("\\", "\\\\") if "\\" in text else text


def _read_lots(cur: psycopg.Cursor[Any], lot_ids: list[str], operator_id: str) -> dict[str, _Lot]:
    cur.execute(_OCCUPANCY, (lot_ids, operator_id), prepare=False)
    lots: dict[str, _Lot] = {}
    for lot_id, counting, district, t, cap, occ, snap_occ, snap_at, snap_id, delta in cur:
        lot = lots.get(lot_id)
        if lot is None:
            lot = lots[lot_id] = _Lot(UUID(lot_id), counting, district)
        lot.types[t] = _Type(cap, occ, snap_occ, snap_at, snap_id, delta)
    return lots


def _read_spaces(
    cur: psycopg.Cursor[Any], events: list[tuple[int, dict[str, Any]]], lots: dict[str, _Lot]
) -> dict[tuple[str, str], _Space]:
    space_lots = {lot_id for lot_id, lot in lots.items() if lot.counting == "spaces"}
    keys = {
        (e["lot_id"], e["space_id"])
        for _, e in events
        if e["type"] == "space" and e["lot_id"] in space_lots
    }
    if not keys:
        return {}
    ordered = sorted(keys)
    cur.execute(
        _SPACES,
        (SEP.join([k[0] for k in ordered]), SEP.join([k[1] for k in ordered])),
        binary=True,
    )
    return {ordered[r[0] - 1]: _Space(r[1], r[2], r[3], r[4], r[5]) for r in cur.fetchall()}


def _check(
    e: dict[str, Any], lot: _Lot, spaces: dict[tuple[str, str], _Space]
) -> tuple[str, str] | None:
    """(code, detail) if the event cannot apply to its lot, else None."""
    kind = e["type"]
    if kind == "space":
        if lot.counting != "spaces":
            return "wrong-lot-kind", "the lot is counted at its gates: send entry, exit or count"
        if (e["lot_id"], e["space_id"]) not in spaces:
            return "unknown-space", "the lot has no such space"
        return None
    if lot.counting != "gates":
        return "wrong-lot-kind", "the lot is counted by space sensors: send space events"
    if kind == "count":
        unknown = [t for t in e["occupied"] if t not in lot.types]
        if unknown:
            return "unknown-space-type", f"the lot has no {', '.join(sorted(unknown))} spaces"
        return None
    if e.get("space_type", "standard") not in lot.types:
        return "unknown-space-type", f"the lot has no {e.get('space_type', 'standard')} spaces"
    return None


def _write_spaces(
    cur: psycopg.Cursor[Any], spaces: dict[tuple[str, str], _Space], lots: dict[str, _Lot]
) -> None:
    cols: tuple[list[str], ...] = ([], [], [], [])
    tids, occupieds, times, event_ids = cols
    for (lot_id, _), space in sorted(spaces.items()):
        if space.new is None:
            continue
        _, event_id, occupied, at = space.new
        if occupied != space.occupied:
            lots[lot_id].types[space.space_type].space_delta += 1 if occupied else -1
        tids.append(space.tid)
        occupieds.append("t" if occupied else "f")
        times.append(at)
        event_ids.append(event_id)
    if tids:
        cur.execute(_UPDATE_SPACES, tuple(SEP.join(c) for c in cols))
        if cur.rowcount != len(tids):
            # a row moved under the lock: only a writer that skipped the lot's lock does that
            raise psycopg.errors.SerializationFailure("a space changed during the batch")


def _write_occupancy(cur: psycopg.Cursor[Any], lots: dict[str, _Lot]) -> None:
    resnap = [
        (lot_id, t, row.new_snapshot[0])
        for lot_id, lot in sorted(lots.items())
        for t, row in sorted(lot.types.items())
        if row.new_snapshot is not None
    ]
    recomputed: dict[tuple[str, str], int] = {}
    if resnap:
        # A newer snapshot restarts the sum from the log: the gate events observed after it.
        cur.execute(_GATE_DELTA, tuple(list(c) for c in zip(*resnap, strict=True)))
        recomputed = {(r[0], r[1]): int(r[2]) for r in cur.fetchall()}
    cols: tuple[list[Any], ...] = ([], [], [], [], [], [], [])
    for lot_id, lot in sorted(lots.items()):
        for t, row in sorted(lot.types.items()):
            if lot.counting == "spaces":
                if not row.space_delta:
                    continue
                row.occupied += row.space_delta
            else:
                if row.new_snapshot is not None:
                    row.snapshot_at, row.snapshot_event_id, row.snapshot_occupied = row.new_snapshot
                    row.gate_delta = recomputed.get((lot_id, t), 0)
                elif row.gate_sum:
                    row.gate_delta += row.gate_sum
                else:
                    continue
                total = row.snapshot_occupied + row.gate_delta
                row.occupied = max(0, min(row.capacity, total))
            values = (
                lot_id,
                t,
                row.occupied,
                row.snapshot_occupied,
                row.snapshot_at,
                row.snapshot_event_id,
                row.gate_delta,
            )
            for col, value in zip(cols, values, strict=True):
                col.append(value)
    if cols[0]:
        cur.execute(_UPDATE_OCCUPANCY, cols, prepare=False)
