"""Builders for lots and events, and the truth a set of events implies (ARCHITECTURE.md, 1)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import requests

from tests.stack import Client, wait_for

TARIFF = {"currency": "CNY", "per_hour": "5.00", "free_minutes": 15, "daily_max": "40.00"}
T0 = datetime(2026, 1, 1, tzinfo=UTC)
_ids = itertools.count()


def space_lot_body(n: int = 4, **extra: Any) -> dict[str, Any]:
    spaces = [{"id": f"A-{i:03d}", "type": "ev" if i % 4 == 3 else "standard"} for i in range(n)]
    return {
        "name": "Yunqi Town P1",
        "location": {"lat": 30.1352, "lon": 120.0876},
        "district": "yunqi",
        "address": "1 Yunqi Rd",
        "opening_hours": "24/7",
        "spaces": spaces,
        "reservable": {"standard": 1},
        "tariff": TARIFF,
        **extra,
    }


def gate_lot_body(capacity: dict[str, int] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "name": "Xihu Gate Lot",
        "location": {"lat": 30.259, "lon": 120.13},
        "district": "xihu",
        "capacity": capacity or {"standard": 5, "ev": 2},
        "tariff": TARIFF,
        **extra,
    }


def not_limited(call: Callable[[], requests.Response]) -> requests.Response:
    """The answer of ``call``, repeated while the gateway's rate limit says 429."""
    # a list, since a Response with an error status is falsy
    answer: list[requests.Response] = wait_for(
        lambda: [r] if (r := call()).status_code != 429 else None, timeout=30, interval=0.2
    )
    return answer[0]


def create_lot(client: Client, body: dict[str, Any]) -> dict[str, Any]:
    resp = not_limited(lambda: client.post("/v1/lots", json=body))
    assert resp.status_code == 201, resp.text
    lot: dict[str, Any] = resp.json()
    return lot


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def new_id(prefix: str = "ev") -> str:
    return f"{prefix}-{next(_ids)}"


def space(lot_id: str, space_id: str, occupied: bool, t: float, eid: str | None = None) -> dict:
    return {
        "id": eid or new_id("s"),
        "lot_id": lot_id,
        "type": "space",
        "space_id": space_id,
        "occupied": occupied,
        "observed_at": at(t),
    }


def gate(
    lot_id: str, kind: str, t: float, space_type: str = "standard", plate: str | None = None
) -> dict:
    event = {
        "id": new_id("g"),
        "lot_id": lot_id,
        "type": kind,
        "space_type": space_type,
        "observed_at": at(t),
    }
    if plate:
        event["plate"] = plate
    return event


def count(lot_id: str, occupied: dict[str, int], t: float) -> dict:
    return {
        "id": new_id("c"),
        "lot_id": lot_id,
        "type": "count",
        "occupied": occupied,
        "observed_at": at(t),
    }


def post(client: Client, events: list[dict]) -> dict[str, Any]:
    resp = not_limited(lambda: client.post("/v1/events", json={"events": events}))
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def truth(lot: dict[str, Any], events: Iterable[dict[str, Any]]) -> dict[str, int]:
    """The occupancy per space type that ``events`` (any order, any duplicates) imply."""
    unique = {e["id"]: e for e in events if e["lot_id"] == lot["id"]}.values()
    if "spaces" in lot:
        latest: dict[str, tuple[str, str, bool]] = {}
        for e in unique:
            if e["type"] != "space":
                continue
            key = (_t(e), e["id"], e["occupied"])
            if e["space_id"] not in latest or key[:2] > latest[e["space_id"]][:2]:
                latest[e["space_id"]] = key
        result = {t: 0 for t in lot["capacity"]}
        types = {s["id"]: s["type"] for s in lot["spaces"]}
        for space_id, (_, _, occupied) in latest.items():
            result[types[space_id]] += int(occupied)
        return result
    result = {}
    for space_type, capacity in lot["capacity"].items():
        snapshots = [
            (_t(e), e["id"], min(e["occupied"][space_type], capacity))
            for e in unique
            if e["type"] == "count" and space_type in e["occupied"]
        ]
        snap_at, _, value = max(snapshots) if snapshots else (None, None, 0)
        delta = sum(
            1 if e["type"] == "entry" else -1
            for e in unique
            if e["type"] in ("entry", "exit")
            and e.get("space_type", "standard") == space_type
            and (snap_at is None or _t(e) > snap_at)
        )
        result[space_type] = max(0, min(capacity, value + delta))
    return result


def _t(event: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(event["observed_at"])


def occupancy(conn: psycopg.Connection[Any], lot_id: str) -> dict[str, int]:
    rows = conn.execute(
        "SELECT space_type, occupied FROM lot_occupancy WHERE lot_id = %s", (lot_id,)
    ).fetchall()
    return {r[0]: r[1] for r in rows}


def redis_occupancy(redis_client: Any, lot_id: str) -> dict[str, int] | None:
    raw = redis_client.hgetall(f"lot:{lot_id}")
    if not raw:
        return None
    return {k[2:]: int(v) for k, v in raw.items() if k.startswith("o:")}
