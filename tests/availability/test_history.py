"""GET /v1/lots/{id}/history: the worker's rollup buckets of the lot, bounded and validated."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from tests.availability import facts
from tests.stack import Client

PROBLEM = "application/problem+json"


def bucket(
    conn: psycopg.Connection[Any], lot_id: str, interval: str, at: datetime, occupied: float
) -> None:
    conn.execute(
        "INSERT INTO occupancy_buckets (level, key, interval, bucket, occupied_avg, occupied_max,"
        " capacity, entries, exits) VALUES ('lot', %s, %s, %s, %s, %s, 10, 3, 2)",
        (lot_id, interval, at, occupied, int(occupied) + 1),
    )


@pytest.fixture
def lot_with_buckets(conn: psycopg.Connection[Any], operator_id: str) -> tuple[str, datetime]:
    lat, lon = facts.somewhere()
    lot_id = facts.lot(conn, operator_id, lat=lat, lon=lon)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=10)
    for n in range(4):
        bucket(conn, lot_id, "1h", hour + timedelta(hours=n), 2.5 + n)
    for n in range(8):
        bucket(conn, lot_id, "15m", hour + timedelta(minutes=15 * n), 1.0 + n)
    other = facts.lot(conn, operator_id, lat=lat, lon=lon)
    bucket(conn, other, "1h", hour, 9.0)
    return lot_id, hour


def test_history_lists_the_lots_buckets_in_the_window(
    anonymous: Client, lot_with_buckets: tuple[str, datetime]
) -> None:
    lot_id, hour = lot_with_buckets
    start = hour.isoformat()
    end = (hour + timedelta(hours=2)).isoformat()
    resp = anonymous.get(
        f"/v1/lots/{lot_id}/history", params={"from": start, "to": end, "interval": "1h"}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["interval"] == "1h"
    series = body["series"]
    assert [datetime.fromisoformat(s["bucket"]) for s in series] == [
        hour,
        hour + timedelta(hours=1),
    ]  # [from, to)
    assert series[0] == {
        "bucket": series[0]["bucket"],
        "occupied_avg": 2.5,
        "occupied_max": 3,
        "capacity": 10,
        "entries": 3,
        "exits": 2,
    }
    quarter = anonymous.get(
        f"/v1/lots/{lot_id}/history",
        params={"from": start, "to": (hour + timedelta(hours=1)).isoformat(), "interval": "15m"},
    ).json()["series"]
    assert [s["occupied_avg"] for s in quarter] == [1.0, 2.0, 3.0, 4.0]
    # defaults: the last day of 15-minute buckets up to now (the worker may add recent ones)
    recent = anonymous.get(f"/v1/lots/{lot_id}/history").json()["series"]
    assert [s["occupied_avg"] for s in recent][:8] == [1.0 + n for n in range(8)]


@pytest.mark.parametrize(
    "params",
    [
        {"interval": "5m"},
        {"from": "yesterday"},
        {"from": "2026-01-01T00:00:00"},  # no offset
        {"to": "0.5"},  # not a unix time either
        {"from": "2026-01-01"},
        {"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
        {"from": "2026-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
        {"from": "2026-01-01T00:00:00Z", "to": "2026-01-04T00:00:00Z", "interval": "1m"},
        {"from": "2026-01-01T00:00:00Z", "to": "2026-03-01T00:00:00Z", "interval": "15m"},
        {"from": "2024-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z", "interval": "1h"},
        # extreme times: the default span or UTC conversion would overflow datetime
        {"to": "0001-01-01T00:30:00Z"},
        {"to": "9999-12-31T23:00:00-05:00"},
        {"from": "0001-01-01T00:00:00+01:00"},
        {"from": "9999-12-31T23:59:59Z"},
        {"from": "1999-12-31T23:00:00Z", "to": "2000-01-01T01:00:00Z"},
        {"from": "2099-12-31T23:00:00Z", "to": "2100-01-01T01:00:00Z"},
    ],
)
def test_bad_history_parameters_are_422_problems(
    anonymous: Client, lot_with_buckets: tuple[str, datetime], params: dict[str, str]
) -> None:
    resp = anonymous.get(f"/v1/lots/{lot_with_buckets[0]}/history", params=params)
    assert resp.status_code == 422, resp.text
    assert resp.headers["Content-Type"] == PROBLEM and resp.json()["errors"]
    body = resp.json()
    assert body["code"] == "validation"
    assert all(set(e) == {"loc", "msg"} and e["loc"] and e["msg"] for e in body["errors"])


def test_history_of_an_unknown_lot_is_404(anonymous: Client) -> None:
    resp = anonymous.get("/v1/lots/00000000-0000-0000-0000-000000000000/history")
    assert resp.status_code == 404 and resp.headers["Content-Type"] == PROBLEM
