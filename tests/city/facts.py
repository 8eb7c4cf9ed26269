"""Facts for the city and worker tests, written the way ingestion writes them.

Until ``POST /v1/events`` exists these helpers apply events directly: the event log, the space
states and lot counts under the documented rules (ARCHITECTURE.md, API.md), then the live state
in Redis through ``livestate.apply_states``, as the ingestion service does after its commit.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import psycopg
import redis
from psycopg.types.json import Jsonb

from services.common import livestate
from services.common.lots import LotIn
from services.ingestion import registry

TARIFF = {"currency": "CNY", "per_hour": "5.00", "free_minutes": 15}


def operator(conn: psycopg.Connection[Any], name: str = "facts operator") -> str:
    row = conn.execute("INSERT INTO operators (name) VALUES (%s) RETURNING id", (name,)).fetchone()
    assert row is not None
    return str(row[0])


def lot(
    conn: psycopg.Connection[Any],
    operator_id: str,
    *,
    district: str,
    spaces: int | None = None,
    capacity: dict[str, int] | None = None,
    lat: float = 30.135,
    lon: float = 120.087,
    name: str | None = None,
    created_at: datetime | None = None,
    client: redis.Redis | None = None,
) -> str:
    """Register a lot (``spaces`` sensors S-000.. or gate ``capacity``); return its id."""
    body: dict[str, Any] = {
        "name": name or f"lot {uuid.uuid4().hex[:6]}",
        "location": {"lat": lat, "lon": lon},
        "district": district,
        "tariff": TARIFF,
    }
    if spaces is not None:
        body["spaces"] = [{"id": f"S-{i:03d}", "type": "standard"} for i in range(spaces)]
    else:
        body["capacity"] = capacity
    view = registry.create_lot(conn, operator_id=operator_id, lot=LotIn.model_validate(body))
    if created_at is not None:
        conn.execute("UPDATE lots SET created_at = %s WHERE id = %s", (created_at, view["id"]))
    if client is not None:
        registry.sync_lots_to_redis(conn, client, lot_ids=[view["id"]])
    return str(view["id"])


def ingest(
    conn: psycopg.Connection[Any],
    operator_id: str,
    events: list[dict[str, Any]],
    *,
    client: redis.Redis | None = None,
) -> dict[str, int]:
    """Apply ``events`` (API shape, ``observed_at`` a datetime) as ingestion would."""
    result = {"accepted": 0, "duplicate": 0, "stale": 0}
    touched: set[str] = set()
    with conn.transaction():
        for e in events:
            fresh = conn.execute(
                "INSERT INTO event_ids (operator_id, event_id) VALUES (%s, %s)"
                " ON CONFLICT DO NOTHING RETURNING 1",
                (operator_id, e["id"]),
            ).fetchone()
            if fresh is None:
                result["duplicate"] += 1
                continue
            stale = _apply(conn, e)
            conn.execute(
                "INSERT INTO events (operator_id, event_id, lot_id, type, space_id, space_type,"
                " occupied, counts, observed_at, stale) VALUES (%s, %s, %s, %s, %s, %s, %s, %s,"
                " %s, %s)",
                (
                    operator_id,
                    e["id"],
                    e["lot_id"],
                    e["type"],
                    e.get("space_id"),
                    e.get("space_type"),
                    e["occupied"] if e["type"] == "space" else None,
                    Jsonb(e["occupied"]) if e["type"] == "count" else None,
                    e["observed_at"],
                    stale,
                ),
            )
            result["stale" if stale else "accepted"] += 1
            if not stale:
                touched.add(e["lot_id"])
                conn.execute(
                    "UPDATE lot_live SET version = version + 1,"
                    " updated_at = greatest(updated_at, %s) WHERE lot_id = %s",
                    (e["observed_at"], e["lot_id"]),
                )
    if client is not None and touched:
        livestate.apply_states(client, registry.live_states(conn, lot_ids=sorted(touched)))
    return result


def _apply(conn: psycopg.Connection[Any], e: dict[str, Any]) -> bool:
    """Move the lot's state forward with ``e``; True if the event is stale."""
    lot_id, at = e["lot_id"], e["observed_at"]
    if e["type"] == "space":
        row = conn.execute(
            "UPDATE spaces SET occupied = %s, observed_at = %s, event_id = %s"
            " WHERE lot_id = %s AND space_id = %s"
            " AND (observed_at IS NULL OR (observed_at, event_id) < (%s, %s))"
            " RETURNING space_type",
            (e["occupied"], at, e["id"], lot_id, e["space_id"], at, e["id"]),
        ).fetchone()
        if row is None:
            return True
        conn.execute(
            "UPDATE lot_occupancy o SET occupied = (SELECT count(*) FROM spaces s"
            " WHERE s.lot_id = o.lot_id AND s.space_type = o.space_type AND s.occupied)"
            " WHERE o.lot_id = %s AND o.space_type = %s",
            (lot_id, row[0]),
        )
        return False
    if e["type"] in ("entry", "exit"):
        step = 1 if e["type"] == "entry" else -1
        row = conn.execute(
            "UPDATE lot_occupancy SET gate_delta = gate_delta + %s,"
            " occupied = least(greatest(snapshot_occupied + gate_delta + %s, 0), capacity)"
            " WHERE lot_id = %s AND space_type = %s"
            " AND (snapshot_at IS NULL OR snapshot_at < %s) RETURNING 1",
            (step, step, lot_id, e["space_type"], at),
        ).fetchone()
        return row is None
    applied = False
    for space_type, n in e["occupied"].items():
        row = conn.execute(
            "UPDATE lot_occupancy o SET snapshot_occupied = %s, snapshot_at = %s,"
            " gate_delta = d.delta, occupied = least(greatest(%s + d.delta, 0), o.capacity)"
            " FROM (SELECT coalesce(sum(CASE type WHEN 'entry' THEN 1 ELSE -1 END), 0)::int"
            "   AS delta FROM events WHERE lot_id = %s AND space_type = %s"
            "   AND type IN ('entry', 'exit') AND NOT stale AND observed_at > %s) d"
            " WHERE o.lot_id = %s AND o.space_type = %s"
            " AND (o.snapshot_at IS NULL OR o.snapshot_at < %s) RETURNING 1",
            (n, at, n, lot_id, space_type, at, lot_id, space_type, at),
        ).fetchone()
        applied = applied or row is not None
    return not applied


def space(lot_id: str, space_id: str, occupied: bool, at: datetime) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "lot_id": lot_id,
        "type": "space",
        "space_id": space_id,
        "occupied": occupied,
        "observed_at": at,
    }


def gate(lot_id: str, kind: str, at: datetime, space_type: str = "standard") -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "lot_id": lot_id,
        "type": kind,
        "space_type": space_type,
        "observed_at": at,
    }


def count(lot_id: str, occupied: dict[str, int], at: datetime) -> dict[str, Any]:
    return {
        "id": uuid.uuid4().hex,
        "lot_id": lot_id,
        "type": "count",
        "occupied": occupied,
        "observed_at": at,
    }
