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

The work is set-based, in PostgreSQL: the validated batch goes over as one JSON array and the
function ``ingest_events`` (migrations 0102-0108) applies it in one call, whatever the batch's
size. It claims the event ids with a plain insert, so a batch bringing an id claimed before (or
twice) fails on the key, and runs again with ``p_check``, leaving out the ids already claimed
(and the repeats).
Python only hashes plates, hands the gate events that may move a reservation (their plate has
one at their lot) to the reservation lifecycle, and turns the answer into the outcome and the
lots' live states.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
import psycopg

from services.common.auth import plate_hash
from services.common.livestate import LotState
from services.reservations.lifecycle import GateEvent, apply_gate_events

log = logging.getLogger("parking.ingestion.intake")
RETRIES = 4
_CLAIMS_KEY = "event_ids_pkey"

_INGEST = (
    "SELECT * FROM ingest_events("
    "%s::uuid, %s::uuid[], %s::json, %s::integer[], %s::timestamptz, %s::boolean)"
)

# The function names a rejection by code, or code:argument; the words are said here.
_DETAILS = {
    "unknown-lot": ("unknown-lot", "no such lot of yours"),
    "unknown-space": ("unknown-space", "the lot has no such space"),
    "wrong-lot-kind:gates": (
        "wrong-lot-kind",
        "the lot is counted at its gates: send entry, exit or count",
    ),
    "wrong-lot-kind:spaces": (
        "wrong-lot-kind",
        "the lot is counted by space sensors: send space events",
    ),
}


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


def _rejection(index: int, problem: str, future: str) -> dict[str, Any]:
    if problem == "observed-in-future":
        return reject(index, problem, future)
    known = _DETAILS.get(problem)
    if known is not None:
        return reject(index, *known)
    code, _, argument = problem.partition(":")
    if code == "unknown-space-type":
        return reject(index, code, f"the lot has no {argument} spaces")
    return reject(index, code, argument or code)


def ingest(
    conn: psycopg.Connection[Any],
    *,
    operator_id: str,
    events: list[dict[str, Any]],
    index: list[int] | None,
    plate_key: str,
    horizon: datetime,
    future: str,
    outcome: Outcome,
) -> None:
    """Apply valid ``events`` (the batch's events at ``index``, or the whole batch if None).

    An event observed after ``horizon`` is rejected as ``observed-in-future`` with the detail
    ``future``. The transaction is retried on a deadlock or serialization failure.
    """
    # Plates never leave this process: each is replaced by its keyed hash.
    plates: dict[int, tuple[dict[str, Any], bytes]] = {}
    for n, e in enumerate(events):
        if "plate" in e:
            hashed = plate_hash(plate_key, e.pop("plate"))
            e["plate_hash"] = hashed.hex()
            plates[n if index is None else index[n]] = (e, hashed)
    payload = orjson.dumps(events).decode()
    lot_ids = sorted({e["lot_id"].lower() for e in events})
    base_rejected = list(outcome.rejected)
    # a batch normally brings new ids only: claim them without looking first, unless it repeats
    # one (which would fail the plain claim)
    check = len({e["id"] for e in events}) < len(events)
    for attempt in range(1, RETRIES + 1):
        outcome.accepted = outcome.duplicate = outcome.stale = 0
        outcome.rejected = list(base_rejected)
        outcome.states = []
        outcome.reservations_moved = []
        try:
            with conn.transaction():
                params = (operator_id, lot_ids, payload, index, horizon, check)
                _apply(conn, params, plates, future, outcome)
            return
        except psycopg.errors.UniqueViolation as e:
            # an id of the batch was claimed before (a replay), or by a concurrent batch that
            # has committed since: again, leaving out the ids claimed
            if e.diag.constraint_name != _CLAIMS_KEY or attempt == RETRIES:
                raise
            check = True
        except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
            if attempt == RETRIES:
                raise
            log.warning("event batch deadlocked, retrying (attempt %d)", attempt)


def _apply(
    conn: psycopg.Connection[Any],
    params: tuple[Any, ...],
    plates: dict[int, tuple[dict[str, Any], bytes]],
    future: str,
    out: Outcome,
) -> None:
    rows = conn.execute(_INGEST, params).fetchall()
    summary: dict[str, Any] = {}
    for lot_id, version, updated_at, district, counts in rows:
        if lot_id is None:
            summary = orjson.loads(counts)
            continue
        state = orjson.loads(counts)
        out.states.append(
            LotState(
                lot_id=lot_id,
                version=int(version),
                updated_at=updated_at.isoformat() if updated_at else None,
                district=district,
                occupied=state["o"],
                capacity=state["c"],
            )
        )
    if not summary["lots_ok"]:
        raise RuntimeError("ingest_events was not given every lot of the batch")
    if not summary["spaces_ok"]:
        # a space row moved under the lot's lock: only a writer that skipped the lock does that
        raise psycopg.errors.SerializationFailure("a space changed during the batch")
    out.accepted = summary["accepted"]
    out.duplicate = summary["duplicate"]
    out.stale = summary["stale"]
    out.rejected.extend(_rejection(i, problem, future) for i, problem in summary["rejected"])
    gates = [
        GateEvent(e["lot_id"].lower(), e["type"], hashed, e["observed_at"])
        for e, hashed in (plates[i] for i in summary["plates"])
    ]
    if gates and apply_gate_events(conn, events=gates):
        out.reservations_moved = sorted({g.lot_id for g in gates})
