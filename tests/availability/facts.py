"""Lots, live counts and reservations for the availability tests, written as their owners write
them: the registry through ``registry.create_lot``, live counts in PostgreSQL (occupancy plus a
version bump) and then in Redis through ``livestate.apply_states`` (which publishes the change),
reservations as rows of the reservations table.
"""

from __future__ import annotations

import http.client
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import psycopg
import redis

from services.availability import readpath, repository
from services.common import livestate
from services.common.lots import LotIn
from services.ingestion import registry

TARIFF = {"currency": "CNY", "per_hour": "5.00", "free_minutes": 15}


def operator(conn: psycopg.Connection[Any], name: str = "availability tests") -> str:
    row = conn.execute("INSERT INTO operators (name) VALUES (%s) RETURNING id", (name,)).fetchone()
    assert row is not None
    return str(row[0])


def somewhere() -> tuple[float, float]:
    """A random point far from other tests' lots (searches use radii of a few km)."""
    return random.uniform(-55, 55), random.uniform(-170, 170)


def offset(lat: float, lon: float, north_m: float, east_m: float = 0.0) -> tuple[float, float]:
    import math

    return (
        lat + north_m / 111_195.0,
        lon + east_m / (111_195.0 * math.cos(math.radians(lat))),
    )


def lot(
    conn: psycopg.Connection[Any],
    operator_id: str,
    *,
    lat: float,
    lon: float,
    capacity: dict[str, int] | None = None,
    opening_hours: str = "24/7",
    timezone: str = "Asia/Shanghai",
    name: str | None = None,
    client: redis.Redis | None = None,
) -> str:
    """Register a gate-counted lot; with ``client``, also write it to Redis as ingestion does."""
    body: dict[str, Any] = {
        "name": name or f"lot {uuid.uuid4().hex[:6]}",
        "location": {"lat": lat, "lon": lon},
        "district": "xihu",
        "opening_hours": opening_hours,
        "timezone": timezone,
        "capacity": capacity or {"standard": 10},
        "reservable": {},
        "tariff": TARIFF,
    }
    view = registry.create_lot(conn, operator_id=operator_id, lot=LotIn.model_validate(body))
    lot_id = str(view["id"])
    if client is not None:
        readpath.write_lots(client, repository.live_lots(conn, lot_ids=[lot_id]))
    return lot_id


def set_occupied(
    conn: psycopg.Connection[Any],
    client: redis.Redis | None,
    lot_id: str,
    occupied: dict[str, int],
    observed_at: datetime | None = None,
) -> int:
    """Commit new counts and a new version as an accepted event would; then update Redis."""
    observed_at = observed_at or datetime.now(UTC)
    with conn.transaction():
        for space_type, n in occupied.items():
            conn.execute(
                "UPDATE lot_occupancy SET occupied = %s, snapshot_occupied = %s"
                " WHERE lot_id = %s AND space_type = %s",
                (n, n, lot_id, space_type),
            )
        row = conn.execute(
            "UPDATE lot_live SET version = version + 1, updated_at = %s WHERE lot_id = %s"
            " RETURNING version",
            (observed_at, lot_id),
        ).fetchone()
    assert row is not None
    if client is not None:
        states = registry.live_states(conn, lot_ids=[lot_id])
        livestate.apply_states(client, states)
    return int(row[0])


def driver(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute(
        "INSERT INTO drivers (email, password_hash) VALUES (%s, 'x') RETURNING id",
        (f"{uuid.uuid4().hex[:12]}@example.com",),
    ).fetchone()
    assert row is not None
    return str(row[0])


def reservation(
    conn: psycopg.Connection[Any],
    lot_id: str,
    space_type: str,
    starts_at: datetime,
    ends_at: datetime,
    status: str = "confirmed",
) -> str:
    row = conn.execute(
        "INSERT INTO reservations (driver_id, lot_id, space_type, starts_at, ends_at,"
        " plate_hash, status, price_amount, price_currency)"
        " VALUES (%s, %s, %s, %s, %s, '\\x00', %s, 5.00, 'CNY') RETURNING id",
        (driver(conn), lot_id, space_type, starts_at, ends_at, status),
    ).fetchone()
    assert row is not None
    return str(row[0])


def closed_hours(timezone: str = "Asia/Shanghai") -> str:
    """Opening hours that exclude the current local time (a 2-hour window 6 hours away)."""
    from zoneinfo import ZoneInfo

    local = datetime.now(ZoneInfo(timezone)) + timedelta(hours=6)
    end = local + timedelta(hours=2)
    return f"{local:%H}:00-{end:%H}:00"


class EventStream:
    """A raw server-sent events client: reads one event at a time with a deadline."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, timeout: float = 5.0):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        self.conn.request(
            "GET",
            parts.path + ("?" + parts.query if parts.query else ""),
            headers={"Accept": "text/event-stream", **(headers or {})},
        )
        self.response = self.conn.getresponse()

    @property
    def status(self) -> int:
        return self.response.status

    def next_event(self, timeout: float = 5.0, comments: bool = False) -> dict[str, str]:
        """The next event's fields (or comment lines, under ``_comments``, if ``comments``);
        a block without data (``retry:``) is skipped. TimeoutError past ``timeout``."""
        deadline = time.monotonic() + timeout
        fields: dict[str, str] = {}
        assert self.conn.sock is not None
        for _ in range(10_000):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no event in time")
            self.conn.sock.settimeout(remaining)
            line = self.response.readline().decode()
            if not line:
                raise EOFError("stream closed")
            line = line.rstrip("\n")
            if line == "":
                if "data" in fields or (comments and "_comments" in fields):
                    return fields
                fields = {}
                continue
            if line.startswith(":"):
                fields.setdefault("_comments", "")
                fields["_comments"] += line
                continue
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        raise TimeoutError("too many lines")

    def close(self) -> None:
        self.conn.close()


@contextmanager
def event_stream(url: str, headers: dict[str, str] | None = None) -> Iterator[EventStream]:
    s = EventStream(url, headers)
    try:
        yield s
    finally:
        s.close()
